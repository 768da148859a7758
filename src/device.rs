//! Devices and session settings: what TensorFlow sees, where a graph goes, and the
//! `ConfigProto` (threads, soft placement, XLA) every session is made with.

use std::path::Path;

use anyhow::{bail, Context, Result};
use prost::Message;
use tensorflow::{Graph, Session, SessionOptions};

use crate::precision::Precision;
use crate::proto;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceChoice {
    /// TensorFlow's own placement (a GPU when one is visible), with soft placement.
    #[default]
    Auto,
    /// Everything on the CPU.
    Cpu,
    /// Everything on the first GPU; ops without a GPU kernel fall back to the CPU.
    Gpu,
}

/// How a session runs its graph. Threads and XLA change speed (XLA also rounding), never the
/// graph, so they are not saved with a run.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct SessionConfig {
    /// Threads inside one op (0: TensorFlow's choice, all cores).
    pub intra_op_threads: u32,
    /// Ops run in parallel (0: TensorFlow's choice).
    pub inter_op_threads: u32,
    /// XLA JIT compilation of the graph (`global_jit_level = ON_1`).
    pub xla: Xla,
    /// Where the graph's ops go.
    pub device: DeviceChoice,
    pub gpu: GpuConfig,
    /// Thread pools of the session's own (`use_per_session_threads`) instead of the process's,
    /// which the first session of a process sizes for all.
    pub own_threads: bool,
    /// The dtype policy a run directory's model is loaded under, instead of its own.
    pub precision: Option<Precision>,
    /// TensorFlow's own bfloat16 rewrite of a float32 graph (Grappler's
    /// `auto_mixed_precision_onednn_bfloat16`): `make bench` measures it against the mixed
    /// policies.
    pub onednn_bfloat16_rewrite: bool,
}

/// Whether a session compiles its graph with XLA's JIT.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Xla {
    /// The transformer's training and evaluation graphs are compiled (faster, and within the
    /// transformer's parity tolerances against Keras: tests/parity.rs), nothing else: the bigram
    /// keeps the notebook's kernels and numbers exactly, and the sampling loop runs one small pass
    /// per character, which XLA makes slower.
    #[default]
    Auto,
    On,
    Off,
}

/// GPU memory and visibility, as TensorFlow users set them (memory growth,
/// `per_process_gpu_memory_fraction`, a visible device list).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct GpuConfig {
    /// Allocate at most this fraction of each GPU's memory (0: no limit).
    pub memory_fraction: f64,
    /// The GPUs TensorFlow may use, by index (bit i: GPU i); 0: all of them.
    pub visible: u64,
    /// Log the device of every op as the graph is placed.
    pub log_placement: bool,
}

impl GpuConfig {
    /// `--gpus 0,2` → GPUs 0 and 2.
    pub fn parse_list(list: &str) -> Result<u64> {
        let mut mask = 0u64;
        for part in list.split(',') {
            let i: u32 = part.trim().parse().with_context(|| format!("--gpus: {part:?} is not a GPU index"))?;
            anyhow::ensure!(i < 64, "--gpus: GPU index {i} is out of range");
            mask |= 1 << i;
        }
        Ok(mask)
    }

    fn visible_list(self) -> String {
        (0..64).filter(|i| self.visible & (1 << i) != 0).map(|i| i.to_string()).collect::<Vec<_>>().join(",")
    }
}

impl SessionConfig {
    /// These settings for one graph: [`Xla::Auto`] becomes [`Xla::On`] if `compile` (the graph is
    /// the transformer's training or evaluation graph), else [`Xla::Off`].
    pub fn for_graph(self, compile: bool) -> Self {
        let xla = match self.xla {
            Xla::Auto if compile => Xla::On,
            Xla::Auto => Xla::Off,
            chosen => chosen,
        };
        Self { xla, ..self }
    }

    /// The `ConfigProto`. Soft placement is on: ops without a kernel on the chosen device run on
    /// the CPU. GPU memory grows as needed instead of being taken whole at start-up, in every
    /// session (TensorFlow's GPU allocator is per process, so the first session decides).
    pub fn to_proto(self) -> proto::ConfigProto {
        let jit = proto::optimizer_options::GlobalJitLevel::On1;
        proto::ConfigProto {
            intra_op_parallelism_threads: self.intra_op_threads as i32,
            inter_op_parallelism_threads: self.inter_op_threads as i32,
            allow_soft_placement: true,
            use_per_session_threads: self.own_threads,
            log_device_placement: self.gpu.log_placement,
            gpu_options: Some(proto::GpuOptions {
                allow_growth: true,
                per_process_gpu_memory_fraction: self.gpu.memory_fraction,
                visible_device_list: self.gpu.visible_list(),
                ..Default::default()
            }),
            graph_options: (self.xla == Xla::On || self.onednn_bfloat16_rewrite).then(|| proto::GraphOptions {
                optimizer_options: (self.xla == Xla::On)
                    .then(|| proto::OptimizerOptions { global_jit_level: jit as i32, ..Default::default() }),
                rewrite_options: self.onednn_bfloat16_rewrite.then(|| proto::RewriterConfig {
                    auto_mixed_precision_onednn_bfloat16: proto::rewriter_config::Toggle::On as i32,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// These settings with `intra` and `inter` threads where they are TensorFlow's choice (0), in
    /// pools of the session's own.
    pub fn threads_unless_set(self, intra: u32, inter: u32) -> Self {
        let pick = |set: u32, default: u32| if set == 0 { default } else { set };
        Self {
            intra_op_threads: pick(self.intra_op_threads, intra),
            inter_op_threads: pick(self.inter_op_threads, inter),
            own_threads: true,
            ..self
        }
    }

    /// The `ConfigProto`, with XLA's process-wide flags set first if it compiles.
    pub fn prepare(self) -> proto::ConfigProto {
        if self.xla == Xla::On {
            enable_jit();
        }
        self.to_proto()
    }

    /// Options for a session of a few small ops run once per character (a sampler): its ops run
    /// in the calling thread (`inter_op_parallelism_threads` < 0: no hand-off to a pool, about
    /// 5 µs a draw instead of 36 on 2 cores), and Grappler leaves the graph as built (optimising
    /// it took about 4 ms at the first run of every new sampler, more than it ever saved).
    pub fn small_graph_options() -> Result<SessionOptions> {
        let mut config = Self::default().prepare();
        config.inter_op_parallelism_threads = -1;
        let rewrite = proto::RewriterConfig { disable_meta_optimizer: true, ..Default::default() };
        config.graph_options = Some(proto::GraphOptions { rewrite_options: Some(rewrite), ..Default::default() });
        let mut options = SessionOptions::new();
        options.set_config(&config.encode_to_vec()).context("setting the session's ConfigProto")?;
        Ok(options)
    }

    pub fn session_options(self) -> Result<SessionOptions> {
        let mut options = SessionOptions::new();
        options.set_config(&self.prepare().encode_to_vec()).context("setting the session's ConfigProto")?;
        Ok(options)
    }

    /// The device part of an op's device on a cluster task (`""`: TensorFlow places it).
    pub fn device_suffix(self) -> &'static str {
        match self.device {
            DeviceChoice::Auto => "",
            DeviceChoice::Cpu => "/device:CPU:0",
            DeviceChoice::Gpu => "/device:GPU:0",
        }
    }

    /// The device every op of a graph is built on (`None`: TensorFlow places them).
    pub fn graph_device(self) -> Result<Option<String>> {
        Ok(match self.device {
            DeviceChoice::Auto => None,
            DeviceChoice::Cpu => Some("/device:CPU:0".into()),
            DeviceChoice::Gpu => {
                if gpu_count(&list_devices(self)?) == 0 {
                    bail!("--device gpu: TensorFlow sees no GPU: {}", why_no_gpu());
                }
                Some("/device:GPU:0".into())
            }
        })
    }
}

/// The folder of the TensorFlow library minigpt was linked with (the wheel's `tensorflow/`).
fn tensorflow_dir() -> &'static Path {
    Path::new(env!("MINIGPT_TF_DIR"))
}

/// Why TensorFlow sees no GPU, from what is installed: a CPU-only wheel, no NVIDIA driver, or a
/// GPU TensorFlow could not use.
fn why_no_gpu() -> String {
    if !tensorflow_dir().join("../nvidia/cuda_runtime").is_dir() {
        return format!(
            "minigpt is linked with a CPU-only TensorFlow ({}, no CUDA libraries beside it): build it with \
             `make TF_PACKAGE='tensorflow[and-cuda]==2.21.0' build` (see the README)",
            tensorflow_dir().display()
        );
    }
    // SAFETY: dlopen and dlclose of the driver library by name, only to see whether it loads.
    let driver = unsafe {
        let handle = libc::dlopen(c"libcuda.so.1".as_ptr(), libc::RTLD_LAZY | libc::RTLD_LOCAL);
        if !handle.is_null() {
            libc::dlclose(handle);
        }
        !handle.is_null()
    };
    match driver {
        false => "no NVIDIA driver is installed (libcuda.so.1 cannot be loaded); the CUDA libraries are there".into(),
        true => "the driver and the CUDA libraries load, but TensorFlow registered no GPU: `minigpt devices -v` \
                 shows its own messages"
            .into(),
    }
}

/// On CPU, `global_jit_level` clusters nothing unless XLA's `--tf_xla_cpu_global_jit` flag is
/// set; on a GPU, XLA needs `ptxas` and libdevice, which the CUDA wheel has in
/// `nvidia/cuda_nvcc` (pinned there, ahead of any other `ptxas` on `PATH`). TensorFlow reads
/// `TF_XLA_FLAGS` and `XLA_FLAGS` once, when XLA first runs in the process.
fn enable_jit() {
    add_flag("TF_XLA_FLAGS", "--tf_xla_cpu_global_jit", "--tf_xla_cpu_global_jit");
    if let Ok(nvcc) = tensorflow_dir().join("../nvidia/cuda_nvcc").canonicalize() {
        add_flag("XLA_FLAGS", "--xla_gpu_cuda_data_dir", &format!("--xla_gpu_cuda_data_dir={}", nvcc.display()));
    }
}

/// Appends `flag` to the environment variable `var` unless a flag named `name` is there.
fn add_flag(var: &str, name: &str, flag: &str) {
    let flags = std::env::var(var).unwrap_or_default();
    if !flags.split_whitespace().any(|f| f.split('=').next() == Some(name)) {
        std::env::set_var(var, format!("{flags} {flag}").trim());
    }
}

/// A device TensorFlow sees.
#[derive(Debug, Clone)]
pub struct DeviceInfo {
    pub name: String,
    pub kind: String,
    pub memory_bytes: i64,
}

/// The devices a session made with `config` sees.
pub fn list_devices(config: SessionConfig) -> Result<Vec<DeviceInfo>> {
    let graph = Graph::new();
    let session = Session::new(&config.session_options()?, &graph).context("starting TensorFlow")?;
    Ok(session
        .device_list()?
        .into_iter()
        .map(|d| DeviceInfo { name: d.name, kind: d.device_type, memory_bytes: d.memory_bytes })
        .collect())
}

pub fn gpu_count(devices: &[DeviceInfo]) -> usize {
    devices.iter().filter(|d| d.kind == "GPU").count()
}

/// `minigpt devices`: every device, then the notebook's line.
pub fn print_devices(config: SessionConfig) -> Result<()> {
    print_device_list(&list_devices(config)?)
}

/// Each device, then the notebook's line counting the GPUs among them.
pub fn print_device_list(devices: &[DeviceInfo]) -> Result<()> {
    let mut text = String::new();
    for d in devices {
        text += &format!("{:<28} {:<5} {:>8.1} MiB\n", d.name, d.kind, d.memory_bytes as f64 / (1 << 20) as f64);
    }
    text += &format!("Num GPUs Available:  {}", gpu_count(devices));
    crate::output::line(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_config_proto_carries_threads_and_xla() {
        let gpu =
            GpuConfig { memory_fraction: 0.5, visible: GpuConfig::parse_list("0,2").unwrap(), log_placement: true };
        let config = SessionConfig {
            intra_op_threads: 3,
            inter_op_threads: 2,
            xla: Xla::On,
            device: DeviceChoice::Cpu,
            gpu,
            ..Default::default()
        };
        let decoded = proto::ConfigProto::decode(&config.to_proto().encode_to_vec()[..]).unwrap();
        assert_eq!((decoded.intra_op_parallelism_threads, decoded.inter_op_parallelism_threads), (3, 2));
        assert!(decoded.allow_soft_placement);
        let jit = decoded.graph_options.unwrap().optimizer_options.unwrap().global_jit_level;
        assert_eq!(jit, proto::optimizer_options::GlobalJitLevel::On1 as i32);
        assert!(SessionConfig::default().to_proto().graph_options.is_none());
        let gpu = decoded.gpu_options.unwrap();
        assert!(gpu.allow_growth && decoded.log_device_placement);
        assert_eq!((gpu.per_process_gpu_memory_fraction, gpu.visible_device_list.as_str()), (0.5, "0,2"));
        // Memory growth in every session, whatever else is asked.
        assert!(SessionConfig::default().to_proto().gpu_options.unwrap().allow_growth);
        assert!(GpuConfig::parse_list("1,x").is_err());
    }

    #[test]
    fn xla_by_default_compiles_only_the_transformers_training_graph() {
        let auto = SessionConfig::default();
        assert_eq!((auto.for_graph(true).xla, auto.for_graph(false).xla), (Xla::On, Xla::Off));
        for chosen in [Xla::On, Xla::Off] {
            let session = SessionConfig { xla: chosen, ..auto };
            assert_eq!((session.for_graph(true).xla, session.for_graph(false).xla), (chosen, chosen));
        }
        assert!(auto.for_graph(true).to_proto().graph_options.is_some());
        assert!(auto.to_proto().graph_options.is_none());
    }
}
