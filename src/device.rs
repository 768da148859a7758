//! Devices and session settings: what TensorFlow sees, where a graph goes, and the
//! `ConfigProto` (threads, soft placement, XLA) every session is made with.

use anyhow::{bail, Context, Result};
use prost::Message;
use tensorflow::{Graph, Session, SessionOptions};

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
    pub xla: bool,
    /// Where the graph's ops go.
    pub device: DeviceChoice,
}

impl SessionConfig {
    /// The `ConfigProto`. Soft placement is on: ops without a kernel on the chosen device run on
    /// the CPU.
    pub fn to_proto(self) -> proto::ConfigProto {
        let jit = proto::optimizer_options::GlobalJitLevel::On1;
        proto::ConfigProto {
            intra_op_parallelism_threads: self.intra_op_threads as i32,
            inter_op_parallelism_threads: self.inter_op_threads as i32,
            allow_soft_placement: true,
            graph_options: self.xla.then(|| proto::GraphOptions {
                optimizer_options: Some(proto::OptimizerOptions { global_jit_level: jit as i32, ..Default::default() }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    pub fn session_options(self) -> Result<SessionOptions> {
        if self.xla {
            enable_cpu_jit();
        }
        let mut options = SessionOptions::new();
        options.set_config(&self.to_proto().encode_to_vec()).context("setting the session's ConfigProto")?;
        Ok(options)
    }

    /// The device every op of a graph is built on (`None`: TensorFlow places them).
    pub fn graph_device(self) -> Result<Option<String>> {
        Ok(match self.device {
            DeviceChoice::Auto => None,
            DeviceChoice::Cpu => Some("/device:CPU:0".into()),
            DeviceChoice::Gpu => {
                if gpu_count(&list_devices()?) == 0 {
                    bail!(
                        "--device gpu: TensorFlow sees no GPU (a GPU needs the tensorflow[and-cuda] wheel, \
                         see the README)"
                    );
                }
                Some("/device:GPU:0".into())
            }
        })
    }
}

/// On CPU, `global_jit_level` clusters nothing unless XLA's `--tf_xla_cpu_global_jit` flag is
/// set; TensorFlow reads `TF_XLA_FLAGS` once, when XLA first runs in the process.
fn enable_cpu_jit() {
    const FLAG: &str = "--tf_xla_cpu_global_jit";
    let flags = std::env::var("TF_XLA_FLAGS").unwrap_or_default();
    if !flags.split_whitespace().any(|f| f == FLAG) {
        std::env::set_var("TF_XLA_FLAGS", format!("{flags} {FLAG}").trim());
    }
}

/// A device TensorFlow sees.
#[derive(Debug, Clone)]
pub struct DeviceInfo {
    pub name: String,
    pub kind: String,
    pub memory_bytes: i64,
}

pub fn list_devices() -> Result<Vec<DeviceInfo>> {
    let graph = Graph::new();
    let session = Session::new(&SessionOptions::new(), &graph).context("starting TensorFlow")?;
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
pub fn print_devices() -> Result<()> {
    let devices = list_devices()?;
    for d in &devices {
        println!("{:<28} {:<5} {:>8.1} MiB", d.name, d.kind, d.memory_bytes as f64 / (1 << 20) as f64);
    }
    println!("Num GPUs Available:  {}", gpu_count(&devices));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_config_proto_carries_threads_and_xla() {
        let config = SessionConfig { intra_op_threads: 3, inter_op_threads: 2, xla: true, device: DeviceChoice::Cpu };
        let decoded = proto::ConfigProto::decode(&config.to_proto().encode_to_vec()[..]).unwrap();
        assert_eq!((decoded.intra_op_parallelism_threads, decoded.inter_op_parallelism_threads), (3, 2));
        assert!(decoded.allow_soft_placement);
        let jit = decoded.graph_options.unwrap().optimizer_options.unwrap().global_jit_level;
        assert_eq!(jit, proto::optimizer_options::GlobalJitLevel::On1 as i32);
        assert!(SessionConfig::default().to_proto().graph_options.is_none());
    }
}
