//! The command line: clap types, their one conversion into each command's validated config
//! (the raw flags stay here), and dispatch to the module that does the work.

use std::path::PathBuf;

use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::cluster::tf_config::{self, Role};
use crate::cluster::{self, Cluster, ClusterOptions, ClusterSpec, Listen};
use crate::data::{self, Shuffle, NOTEBOOK_BATCH_SIZE, NOTEBOOK_BLOCK_SIZE, NOTEBOOK_SHUFFLE_BUFFER};
use crate::device::{self, DeviceChoice, GpuConfig, SessionConfig, Xla};
use crate::eval::{self, EvalConfig, Split};
use crate::graph;
use crate::info;
use crate::model::{Arch, ModelConfig, ModelShape, Precision};
use crate::optim::AdamConfig;
use crate::output;
use crate::run::{TrainSettings, KEEP_CHECKPOINTS};
use crate::sample::{self, GenerateConfig, Generation};
use crate::sampler::SamplerConfig;
use crate::saved_model::{self, OpenOptions};
use crate::serve::{self, model::Settings, ServeConfig};
use crate::train::{self, Given, Report, Start, TrainConfig, DEFAULT_SEED, NOTEBOOK_EPOCHS};

#[derive(Parser, Debug)]
#[command(name = "minigpt", version, about = "Train and sample a character-level GPT on TensorFlow, from Rust")]
pub struct Cli {
    /// Let TensorFlow's own C++ logs through (silenced by default).
    #[arg(short, long, global = true)]
    pub verbose: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
#[allow(clippy::large_enum_variant)] // one value per process
pub enum Command {
    /// List the devices TensorFlow sees (with --cluster, every device of every task).
    Devices(DevicesArgs),
    /// Serve as a worker of `train --cluster`: a TensorFlow gRPC server, until SIGTERM or Ctrl-C.
    Server(ServerArgs),
    /// Serve models over HTTP: TensorFlow Serving's REST API and streamed generation.
    Serve(ServeArgs),
    /// Train a model; write checkpoints, metrics and config to a run directory.
    Train(TrainArgs),
    /// Sample text from a run directory or a SavedModel.
    Generate(GenerateArgs),
    /// Print the validation loss of a run directory or a SavedModel.
    Eval(EvalArgs),
    /// Export a run as a SavedModel that Python's tf.saved_model.load reads.
    Export(ExportArgs),
    /// Describe a run directory or a SavedModel: model, parameters, vocabulary, training, data.
    Info(InfoArgs),
    /// Write the text GraphDef of a model's training graph.
    Graph(GraphArgs),
}

#[derive(Args, Debug)]
pub struct DevicesArgs {
    /// The workers to list too: `worker=HOST:PORT[,HOST:PORT...]` (see `train --cluster`).
    #[arg(long)]
    pub cluster: Option<String>,
    /// With --cluster: seconds to wait for a worker that does not answer.
    #[arg(long, default_value_t = 300)]
    pub worker_timeout: u64,
}

#[derive(Args, Debug)]
pub struct ServerArgs {
    /// HOST:PORT to serve on, and only there: an address of this machine (a host name is resolved
    /// once), the one the chief and the other workers reach it by; `0.0.0.0:PORT` or `[::]:PORT`
    /// for every interface [default: this task's address in TF_CONFIG].
    #[arg(long)]
    pub listen: Option<String>,
}

impl ServerArgs {
    /// Where to serve: `--listen`, else this worker's address in TF_CONFIG.
    fn to_listen(&self) -> Result<Listen> {
        if let Some(text) = &self.listen {
            return Listen::parse(text).context("--listen");
        }
        match tf_config::from_env()? {
            None => bail!("give --listen HOST:PORT (or set TF_CONFIG to a cluster that names this task)"),
            Some(Role::Worker { address, .. }) => listen_of_task(&address),
            Some(Role::Chief { address, .. }) => {
                bail!("TF_CONFIG makes this task the chief ({address}): run `minigpt train` here, not `minigpt server`")
            }
        }
    }
}

/// Where a task of TF_CONFIG listens: at `--listen` if given (which must be at the task's port in
/// TF_CONFIG: the others reach it by its name there), else at its address in TF_CONFIG.
fn listen_as_task(listen: Option<&str>, address: &str) -> Result<Listen> {
    let Some(text) = listen else { return listen_of_task(address) };
    let listen = Listen::parse(text).context("--listen")?;
    let name = cluster::parse_address(address)?;
    ensure!(
        name.ends_with(&format!(":{}", listen.bind.port())),
        "--listen {}: TF_CONFIG has this task at {name}, where the others reach it: listen at that port",
        listen.bind
    );
    Ok(Listen { name, ..listen })
}

/// This task's address in TF_CONFIG as the place to listen: it must be this machine's.
fn listen_of_task(address: &str) -> Result<Listen> {
    let listen = Listen::of_task(address).context("TF_CONFIG's address of this task")?;
    crate::listen::check_bindable(listen.bind, address).with_context(|| {
        format!(
            "TF_CONFIG's address of this task, {address}, is not where this process can listen: give --listen \
             with this machine's address and that port (on Kubernetes, the pod's IP)"
        )
    })?;
    Ok(listen)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ShuffleArg {
    /// tf.data's shuffle(10000) of the notebook: local shuffling.
    Buffer,
    /// A full permutation of the windows each epoch.
    Global,
    /// Windows in order.
    None,
}

#[derive(Args, Debug)]
pub struct TrainArgs {
    /// Corpus: a path, an http(s) URL (downloaded once into the cache), or `builtin:tinyshakespeare`,
    /// the notebook's corpus that ships with minigpt [default: builtin:tinyshakespeare]. With
    /// --resume it must be the text the run was trained on (the same SHA-256).
    #[arg(long, env = "MINIGPT_DATA", hide_env_values = true)]
    pub data: Option<String>,
    /// Seconds a download of --data may wait for the server: to connect, and each time for more.
    #[arg(long, default_value_t = data::DEFAULT_DOWNLOAD_TIMEOUT, value_parser = clap::value_parser!(u64).range(1..))]
    pub download_timeout: u64,
    /// Run directory to create (or, with --resume, to continue).
    #[arg(long)]
    pub out: PathBuf,
    /// Continue the run in --out from its newest checkpoint, with its own settings: other flags
    /// given must equal them (--max-steps and --epochs may raise its bounds, --device move it).
    #[arg(long)]
    pub resume: bool,
    /// Model architecture [default: bigram]
    #[arg(long, value_enum)]
    pub model: Option<Arch>,
    /// Start from the weights of a SavedModel (minigpt's or Python's; see the README) or of a run
    /// directory's newest checkpoint, instead of fresh ones; the vocabulary and the model are its.
    #[arg(long, conflicts_with_all = ["resume", "embedding_dim", "model", "n_layer", "n_head", "dropout"])]
    pub init_from: Option<PathBuf>,
    /// The vocabulary of an --init-from SavedModel that carries none (as for generate).
    #[arg(long, requires = "init_from")]
    pub vocab: Option<PathBuf>,
    /// Passes over the training data [default: 3].
    #[arg(long)]
    pub epochs: Option<u64>,
    /// Stop after this many steps in all (whichever of this and --epochs ends first).
    #[arg(long)]
    pub max_steps: Option<u64>,
    /// Characters per training window [default: 64]
    #[arg(long)]
    pub block_size: Option<usize>,
    /// Windows per batch [default: 32]
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Embedding width [default: 128]
    #[arg(long, alias = "n-embd")]
    pub embedding_dim: Option<u64>,
    /// Transformer blocks (--model gpt) [default: 4]
    #[arg(long)]
    pub n_layer: Option<u64>,
    /// Attention heads per block (--model gpt); must divide the embedding width [default: 4]
    #[arg(long)]
    pub n_head: Option<u64>,
    /// Dropout rate in train steps (--model gpt): after the embeddings, on the attention weights,
    /// after each attention and MLP [default: 0]
    #[arg(long)]
    pub dropout: Option<f64>,
    /// Adam's learning rate (the peak, with a schedule) [default: 0.001]
    #[arg(long)]
    pub lr: Option<f64>,
    /// Linear learning-rate warm-up over this many steps [default: 0]
    #[arg(long)]
    pub warmup_steps: Option<u64>,
    /// Cosine decay of the learning rate from the end of warm-up to --min-lr at this step.
    #[arg(long)]
    pub lr_decay_steps: Option<u64>,
    /// The learning rate after --lr-decay-steps [default: 0]
    #[arg(long, requires = "lr_decay_steps")]
    pub min_lr: Option<f64>,
    /// AdamW weight decay of matrices (not biases, norms or embeddings); 0: plain Adam [default: 0]
    #[arg(long)]
    pub weight_decay: Option<f64>,
    /// Adam's beta_1 [default: 0.9]
    #[arg(long)]
    pub beta1: Option<f64>,
    /// Adam's beta_2 [default: 0.999]
    #[arg(long)]
    pub beta2: Option<f64>,
    /// Clip gradients to this global norm, as Keras' `global_clipnorm` (an embedding counts its per-lookup rows).
    #[arg(long)]
    pub grad_clip: Option<f64>,
    /// Seed of every random source (initial weights, shuffling) [default: 1337]
    #[arg(long)]
    pub seed: Option<u64>,
    /// How windows are shuffled each epoch [default: buffer (the notebook's shuffle(10000), which
    /// walks the text nearly in order) for --model bigram, global for --model gpt, which trains
    /// far better with it]
    #[arg(long, value_enum)]
    pub shuffle: Option<ShuffleArg>,
    /// Also write a checkpoint every this many steps (one is always written at each epoch's end
    /// and at the end of the run).
    #[arg(long)]
    pub save_every: Option<u64>,
    /// Also evaluate every this many steps (validation loss in the log, metrics.csv, loss.png).
    #[arg(long)]
    pub eval_every: Option<u64>,
    /// Checkpoints to keep (the newest) [default: 3]
    #[arg(long)]
    pub keep: Option<usize>,
    /// Print the loss every this many steps.
    #[arg(long, default_value_t = 100)]
    pub log_every: u64,
    /// Validation batches per evaluation (default: every validation window).
    #[arg(long)]
    pub eval_batches: Option<usize>,
    /// Where the graph runs [default: auto].
    #[arg(long, value_enum)]
    pub device: Option<DeviceChoice>,
    #[command(flatten)]
    pub session: SessionArgs,
    /// Train on several machines with TensorFlow's gRPC runtime: `worker=H1:P1,H2:P2,...`, each
    /// running `minigpt server --listen H:P`. This process holds the weights and Adam's state and
    /// applies the updates; each worker computes the step on its slice of --batch-size (which must
    /// divide among them). The run directory is an ordinary one. Without --cluster, the workers
    /// of TF_CONFIG if it is set and makes this process the chief.
    #[arg(long)]
    pub cluster: Option<String>,
    /// With --cluster (or TF_CONFIG): this process's HOST:PORT, where its server listens and only
    /// there, which every worker must be able to reach (on separate machines, an address of this
    /// machine on their network) [default: a free port of 127.0.0.1, which only workers on this
    /// machine reach; with TF_CONFIG, this task's address in it].
    #[arg(long)]
    pub listen: Option<String>,
    /// With --cluster: seconds to wait for a worker that does not answer, at start or after it
    /// failed (the run goes on from the step that failed once it is back).
    #[arg(long, default_value_t = 300)]
    pub worker_timeout: u64,
    /// With --cluster: the longest a step may take, in seconds; a worker that hangs longer is
    /// treated as failed.
    #[arg(long, default_value_t = 120)]
    pub step_timeout: u64,
    /// Print only the summary.
    #[arg(short, long)]
    pub quiet: bool,
}

impl TrainArgs {
    /// `--cluster` and its companions, checked; without `--cluster`, the cluster TF_CONFIG gives
    /// (explicit flags win: `--listen` over this task's address in it).
    fn cluster(&self) -> Result<Option<ClusterOptions>> {
        ensure!(self.worker_timeout > 0, "--worker-timeout must be at least 1 second");
        ensure!(self.step_timeout > 0, "--step-timeout must be at least 1 second");
        let listen = self.listen.as_deref().map(Listen::parse).transpose().context("--listen")?;
        let from_env = match &self.cluster {
            Some(_) => None,
            None => tf_config::from_env()?,
        };
        let (spec, listen) = match (&self.cluster, from_env) {
            (Some(text), _) => (ClusterSpec::parse(text)?, listen),
            (None, Some(Role::Chief { address, workers })) => {
                if workers.is_empty() {
                    return Ok(None);
                }
                let listen = listen_as_task(self.listen.as_deref(), &address)?;
                (ClusterSpec { workers }, Some(listen))
            }
            (None, Some(Role::Worker { index, address })) => {
                bail!("TF_CONFIG makes this task worker {index} ({address}): it serves, the chief trains")
            }
            (None, None) => {
                ensure!(listen.is_none(), "--listen is the chief's address on a cluster: give --cluster too");
                return Ok(None);
            }
        };
        Ok(Some(ClusterOptions {
            spec,
            listen,
            worker_timeout: Duration::from_secs(self.worker_timeout),
            step_timeout: Duration::from_secs(self.step_timeout),
            await_names: self.cluster.is_none(),
        }))
    }

    /// Where to serve instead of training: TF_CONFIG makes this task a worker (and no
    /// `--cluster` says otherwise), so that every task of a job can run the same command.
    fn worker_task(&self) -> Result<Option<Listen>> {
        if self.cluster.is_some() {
            return Ok(None);
        }
        let Some(Role::Worker { address, .. }) = tf_config::from_env()? else { return Ok(None) };
        listen_as_task(self.listen.as_deref(), &address).map(Some)
    }

    /// The one conversion of the raw flags into a validated [`TrainConfig`]; the settings pass
    /// the same checks as a `config.json` read back.
    pub fn to_config(&self) -> Result<TrainConfig> {
        ensure!(self.log_every > 0, "--log-every must be at least 1");
        ensure!(self.eval_batches != Some(0), "--eval-batches must be at least 1");
        ensure!(self.epochs != Some(0), "--epochs must be at least 1");
        ensure!(self.max_steps != Some(0), "--max-steps must be at least 1");
        let arch = self.model.unwrap_or(Arch::Bigram);
        let shuffle = match self.shuffle {
            Some(ShuffleArg::Buffer) => Shuffle::Buffer(NOTEBOOK_SHUFFLE_BUFFER),
            Some(ShuffleArg::Global) => Shuffle::Global,
            Some(ShuffleArg::None) => Shuffle::None,
            None if arch == Arch::Gpt => Shuffle::Global,
            None => Shuffle::Buffer(NOTEBOOK_SHUFFLE_BUFFER),
        };
        let defaults = AdamConfig::default();
        let settings = TrainSettings {
            epochs: self.epochs.unwrap_or(NOTEBOOK_EPOCHS),
            max_steps: self.max_steps,
            block_size: self.block_size.unwrap_or(NOTEBOOK_BLOCK_SIZE),
            batch_size: self.batch_size.unwrap_or(NOTEBOOK_BATCH_SIZE),
            adam: AdamConfig {
                learning_rate: self.lr.unwrap_or(defaults.learning_rate),
                beta_1: self.beta1.unwrap_or(defaults.beta_1),
                beta_2: self.beta2.unwrap_or(defaults.beta_2),
                warmup_steps: self.warmup_steps.unwrap_or(0),
                decay_steps: self.lr_decay_steps,
                min_lr: self.min_lr.unwrap_or(0.0),
                weight_decay: self.weight_decay.unwrap_or(0.0),
                clip_norm: self.grad_clip,
                ..defaults
            },
            shuffle,
            seed: self.seed.unwrap_or(DEFAULT_SEED),
            device: self.device.unwrap_or_default(),
            save_every: self.save_every,
            eval_every: self.eval_every,
            keep: self.keep.unwrap_or(KEEP_CHECKPOINTS),
        };
        let model = ModelShape {
            arch,
            n_embd: self.embedding_dim.unwrap_or(128),
            n_layer: self.n_layer.unwrap_or(4),
            n_head: self.n_head.unwrap_or(4),
            dropout: self.dropout.unwrap_or(0.0),
            precision: self.session.precision.unwrap_or_default(),
        };
        let start = if self.resume {
            Start::Resume {
                data: self.data.clone(),
                max_steps: self.max_steps,
                epochs: self.epochs,
                device: self.device,
                given: Given {
                    flags: self.given(),
                    settings,
                    model: model.with(0, self.block_size.unwrap_or(0) as u64),
                },
            }
        } else if let Some(dir) = &self.init_from {
            settings.validate()?;
            Start::InitFrom {
                data: self.data.clone().unwrap_or_else(data::default_source),
                dir: dir.clone(),
                vocab: self.vocab.clone(),
                settings,
            }
        } else {
            settings.validate()?;
            model.validate()?;
            Start::New { data: self.data.clone().unwrap_or_else(data::default_source), model, settings }
        };
        let report = Report { log_every: self.log_every, eval_batches: self.eval_batches, quiet: self.quiet };
        Ok(TrainConfig {
            out: self.out.clone(),
            start,
            session: self.session.to_config(self.device.unwrap_or_default())?,
            cluster: self.cluster()?,
            report,
        })
    }

    /// The run settings given on the command line: each flag and where config.json keeps it.
    fn given(&self) -> Vec<(&'static str, &'static str)> {
        let flags = [
            ("--model", "/model/arch", self.model.is_some()),
            ("--block-size", "/train/block_size", self.block_size.is_some()),
            ("--batch-size", "/train/batch_size", self.batch_size.is_some()),
            ("--embedding-dim", "/model/n_embd", self.embedding_dim.is_some()),
            ("--n-layer", "/model/n_layer", self.n_layer.is_some()),
            ("--n-head", "/model/n_head", self.n_head.is_some()),
            ("--dropout", "/model/dropout", self.dropout.is_some()),
            ("--precision", "/model/precision", self.session.precision.is_some()),
            ("--lr", "/train/adam/learning_rate", self.lr.is_some()),
            ("--warmup-steps", "/train/adam/warmup_steps", self.warmup_steps.is_some()),
            ("--lr-decay-steps", "/train/adam/decay_steps", self.lr_decay_steps.is_some()),
            ("--min-lr", "/train/adam/min_lr", self.min_lr.is_some()),
            ("--weight-decay", "/train/adam/weight_decay", self.weight_decay.is_some()),
            ("--beta1", "/train/adam/beta_1", self.beta1.is_some()),
            ("--beta2", "/train/adam/beta_2", self.beta2.is_some()),
            ("--grad-clip", "/train/adam/clip_norm", self.grad_clip.is_some()),
            ("--seed", "/train/seed", self.seed.is_some()),
            ("--shuffle", "/train/shuffle", self.shuffle.is_some()),
            ("--save-every", "/train/save_every", self.save_every.is_some()),
            ("--eval-every", "/train/eval_every", self.eval_every.is_some()),
            ("--keep", "/train/keep", self.keep.is_some()),
        ];
        flags.into_iter().filter(|(.., given)| *given).map(|(flag, field, _)| (flag, field)).collect()
    }
}

/// The most threads `--intra-op-threads` or `--inter-op-threads` may ask for: TensorFlow starts
/// them all at once, as threads of the system.
const MAX_THREADS: u32 = 1024;

/// TensorFlow runtime settings shared by the commands that run a graph.
#[derive(Args, Debug, Clone, Default)]
pub struct SessionArgs {
    /// Threads inside one op (0: TensorFlow's choice, one per core).
    #[arg(long, default_value_t = 0)]
    pub intra_op_threads: u32,
    /// Ops run side by side (0: TensorFlow's choice, one per core).
    #[arg(long, default_value_t = 0)]
    pub inter_op_threads: u32,
    /// Compile the graph with XLA's JIT [default: for the transformer's training and evaluation,
    /// where it is faster and keeps the parity tolerances; the bigram keeps the notebook's exact
    /// kernels, and generation runs faster without].
    #[arg(long, conflicts_with = "no_xla")]
    pub xla: bool,
    /// Never compile with XLA (the transformer's training and evaluation included).
    #[arg(long)]
    pub no_xla: bool,
    /// The GPUs TensorFlow may use, by index (e.g. `0,2`) [default: all]. GPU memory grows as
    /// needed rather than being taken whole at start-up.
    #[arg(long)]
    pub gpus: Option<String>,
    /// Take at most this fraction of each GPU's memory (0 < F <= 1).
    #[arg(long)]
    pub gpu_memory_fraction: Option<f64>,
    /// Print the device each op is placed on (TensorFlow's own log, on stderr).
    #[arg(long)]
    pub log_placement: bool,
    /// Keras' dtype policy: the layers compute in float32, bfloat16 or float16; variables,
    /// LayerNorm's statistics, the loss and the logits sampled from stay float32 [default:
    /// float32 for a new run, a run's own otherwise; a SavedModel computes as it was exported].
    #[arg(long, value_enum)]
    pub precision: Option<Precision>,
}

impl SessionArgs {
    /// The session settings, on `device`.
    pub fn to_config(&self, device: DeviceChoice) -> Result<SessionConfig> {
        let fraction = self.gpu_memory_fraction.unwrap_or(0.0);
        ensure!(
            self.gpu_memory_fraction.is_none() || (fraction > 0.0 && fraction <= 1.0),
            "--gpu-memory-fraction must be in (0, 1], not {fraction}"
        );
        for (flag, threads) in
            [("--intra-op-threads", self.intra_op_threads), ("--inter-op-threads", self.inter_op_threads)]
        {
            ensure!(
                threads <= MAX_THREADS,
                "{flag} {threads} is more than {MAX_THREADS} (this machine has {} cores; 0 is one a core)",
                std::thread::available_parallelism().map_or(1, |n| n.get())
            );
        }
        let visible = match &self.gpus {
            Some(list) => GpuConfig::parse_list(list)?,
            None => 0,
        };
        Ok(SessionConfig {
            intra_op_threads: self.intra_op_threads,
            inter_op_threads: self.inter_op_threads,
            xla: match (self.xla, self.no_xla) {
                (true, _) => Xla::On,
                (_, true) => Xla::Off,
                _ => Xla::Auto,
            },
            device,
            gpu: GpuConfig { memory_fraction: fraction, visible, log_placement: self.log_placement },
            own_threads: false,
            precision: self.precision,
            onednn_bfloat16_rewrite: false,
        })
    }
}

/// How `generate` and `eval` load a run directory or a SavedModel.
#[derive(Args, Debug)]
pub struct LoadArgs {
    /// Vocabulary of a SavedModel that carries none: a JSON array of its characters, or the text
    /// it was trained on.
    #[arg(long)]
    pub vocab: Option<PathBuf>,
    /// Where the graph runs.
    #[arg(long, value_enum, default_value_t = DeviceChoice::Auto)]
    pub device: DeviceChoice,
    #[command(flatten)]
    pub session: SessionArgs,
}

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// NAME=PATH, once per model: a run directory, a SavedModel, or a TensorFlow Serving base path
    /// (PATH/<version>/saved_model.pb, the highest version served and new ones picked up).
    #[arg(long = "model", required = true, value_parser = serve::parse_model)]
    pub models: Vec<(String, PathBuf)>,
    /// HOST:PORT to listen on, and only there (port 0: any free one, printed at start).
    #[arg(long, default_value = "127.0.0.1:8501")]
    pub listen: String,
    /// Every request but /health needs `Authorization: Bearer <the file's content>`.
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// Seconds between looks at a base path for a new version.
    #[arg(long, default_value_t = 1.0)]
    pub poll_seconds: f64,
    /// Streams and predictions running at once; beyond, 429.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=4096))]
    pub max_concurrent: u64,
    /// Streams sharing one forward pass, at most (1: no batching) [default: --max-concurrent].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=4096))]
    pub max_batch: Option<u64>,
    /// The largest `max_chars` a request may ask for.
    #[arg(long, default_value_t = 10_000)]
    pub max_chars: usize,
    /// The largest request body, in bytes; beyond, 413.
    #[arg(long, default_value_t = 16 << 20)]
    pub max_body_bytes: usize,
    /// Seconds a prediction or a (non-streamed) generation may take; beyond, 504.
    #[arg(long, default_value_t = 300.0)]
    pub timeout_seconds: f64,
    /// Seconds a request's headers may take to arrive (beyond, the connection is closed), and
    /// then its body (beyond, 408: a client that stalls would otherwise hold its slot).
    #[arg(long, default_value_t = 30.0)]
    pub read_timeout_seconds: f64,
    /// After SIGTERM or Ctrl-C, seconds running requests may take to finish.
    #[arg(long, default_value_t = 30.0)]
    pub drain_seconds: f64,
    /// Where the models run.
    #[arg(long, value_enum, default_value_t = DeviceChoice::Auto)]
    pub device: DeviceChoice,
    #[command(flatten)]
    pub session: SessionArgs,
}

impl ServeArgs {
    pub fn to_config(&self) -> Result<ServeConfig> {
        let seconds = |flag: &str, v: f64| {
            ensure!(v.is_finite() && v > 0.0 && v <= 1e6, "{flag} must be a positive number of seconds, got {v}");
            Ok(Duration::from_secs_f64(v))
        };
        let max_concurrent = self.max_concurrent as usize;
        Ok(ServeConfig {
            models: self.models.clone(),
            listen: self.listen.clone(),
            poll: seconds("--poll-seconds", self.poll_seconds)?,
            max_concurrent,
            max_chars: self.max_chars,
            max_body_bytes: self.max_body_bytes,
            drain: seconds("--drain-seconds", self.drain_seconds)?,
            timeout: seconds("--timeout-seconds", self.timeout_seconds)?,
            read_timeout: seconds("--read-timeout-seconds", self.read_timeout_seconds)?,
            token: self.token_file.as_deref().map(serve::read_token).transpose()?,
            settings: Settings {
                session: self.session.to_config(self.device)?,
                max_batch: self.max_batch.map_or(max_concurrent, |b| b as usize),
                max_streams: max_concurrent,
            },
        })
    }
}

#[derive(Args, Debug)]
pub struct GenerateArgs {
    /// Run directory or SavedModel to sample from.
    #[arg(long)]
    pub run: PathBuf,
    /// Text to continue.
    #[arg(long)]
    pub prompt: String,
    /// Characters to generate.
    #[arg(long, default_value_t = 200)]
    pub chars: usize,
    /// Divides the logits: below 1 is more conservative, above 1 more random; any positive value
    /// works (towards 0 it always picks the most likely character).
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f32,
    /// Sample only among the k most likely characters (all of them if k exceeds the vocabulary).
    #[arg(long)]
    pub top_k: Option<u32>,
    /// Seed of the sampler; the same seed gives the same text.
    #[arg(long, default_value_t = 1337)]
    pub seed: u64,
    /// One pass over the whole (cropped) context per character, the notebook's loop, instead of
    /// continuing from cached attention keys and values (gpt) or drawing every character in one
    /// in-graph loop (bigram): the same text, slower; for comparison. (A SavedModel is always
    /// sampled that way.)
    #[arg(long)]
    pub no_cache: bool,
    #[command(flatten)]
    pub load: LoadArgs,
}

#[derive(Args, Debug)]
pub struct EvalArgs {
    /// Run directory or SavedModel to evaluate.
    #[arg(long)]
    pub run: PathBuf,
    /// Corpus (default: the run's own; for a SavedModel, as train's --data).
    #[arg(long)]
    pub data: Option<String>,
    /// Seconds a download of --data may wait for the server: to connect, and each time for more.
    #[arg(long, default_value_t = data::DEFAULT_DOWNLOAD_TIMEOUT, value_parser = clap::value_parser!(u64).range(1..))]
    pub download_timeout: u64,
    /// `val`, or `all` to add the training split's loss.
    #[arg(long, value_enum, default_value_t = Split::Val)]
    pub split: Split,
    /// Estimate from this many random batches (of the run's batch size, or 32 for a SavedModel
    /// that does not say; the same ones every time) instead of every window.
    #[arg(long)]
    pub eval_batches: Option<usize>,
    #[command(flatten)]
    pub load: LoadArgs,
}

#[derive(Args, Debug)]
pub struct InfoArgs {
    /// Run directory or SavedModel.
    #[arg(long)]
    pub run: PathBuf,
}

#[derive(Args, Debug)]
pub struct ExportArgs {
    /// Run directory to export (its newest usable checkpoint).
    #[arg(long)]
    pub run: PathBuf,
    /// SavedModel directory to create.
    #[arg(long)]
    pub out: PathBuf,
    #[command(flatten)]
    pub session: SessionArgs,
}

#[derive(Args, Debug)]
pub struct GraphArgs {
    #[arg(long, value_enum, default_value_t = Arch::Bigram)]
    pub model: Arch,
    /// Folder to write `<model>.pbtxt` into.
    #[arg(long)]
    pub out: PathBuf,
    /// Vocabulary size (Tiny Shakespeare's: 65).
    #[arg(long, default_value_t = 65)]
    pub vocab_size: u64,
    #[arg(long, alias = "n-embd", default_value_t = 128)]
    pub embedding_dim: u64,
    /// Transformer blocks (gpt).
    #[arg(long, default_value_t = 4)]
    pub n_layer: u64,
    /// Attention heads (gpt).
    #[arg(long, default_value_t = 4)]
    pub n_head: u64,
    /// Position table size (gpt).
    #[arg(long, default_value_t = 64)]
    pub block_size: u64,
    /// Dropout rate in train steps (gpt).
    #[arg(long, default_value_t = 0.0)]
    pub dropout: f64,
    /// Keras' dtype policy the graph computes in.
    #[arg(long, value_enum, default_value_t = Precision::Float32)]
    pub precision: Precision,
}

impl LoadArgs {
    fn to_options(&self) -> Result<OpenOptions> {
        Ok(OpenOptions { vocab: self.vocab.clone(), session: self.session.to_config(self.device)?, sampler: None })
    }
}

impl GenerateArgs {
    pub fn to_config(&self) -> Result<GenerateConfig> {
        let sampler = SamplerConfig { seed: self.seed as i64, temperature: self.temperature, top_k: self.top_k };
        sampler.validate()?;
        let generation = Generation { chars: self.chars, sampler, stepwise: self.no_cache };
        Ok(GenerateConfig {
            run: self.run.clone(),
            prompt: self.prompt.clone(),
            generation,
            open: self.load.to_options()?,
        })
    }
}

impl EvalArgs {
    pub fn to_config(&self) -> Result<EvalConfig> {
        ensure!(self.eval_batches != Some(0), "--eval-batches must be at least 1");
        Ok(EvalConfig {
            run: self.run.clone(),
            data: self.data.clone(),
            split: self.split,
            eval_batches: self.eval_batches,
            open: self.load.to_options()?,
        })
    }
}

impl GraphArgs {
    pub fn to_config(&self) -> Result<ModelConfig> {
        let shape = ModelShape {
            arch: self.model,
            n_embd: self.embedding_dim,
            n_layer: self.n_layer,
            n_head: self.n_head,
            dropout: self.dropout,
            precision: self.precision,
        };
        let model = shape.with(self.vocab_size, self.block_size);
        model.validate()?;
        Ok(model)
    }
}

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Devices(args) => match &args.cluster {
            None => device::print_devices(SessionConfig::default()),
            Some(text) => {
                let timeout = Duration::from_secs(args.worker_timeout);
                let options = ClusterOptions {
                    spec: ClusterSpec::parse(text)?,
                    listen: None,
                    worker_timeout: timeout,
                    step_timeout: timeout,
                    await_names: false,
                };
                let cluster = Cluster::start(&options, None)?;
                cluster.wait_for_workers()?;
                device::print_device_list(&cluster.devices()?)
            }
        },
        Command::Server(args) => cluster::serve(&args.to_listen()?),
        Command::Train(args) => match args.worker_task()? {
            Some(listen) => cluster::serve(&listen),
            None => {
                data::set_download_timeout(Duration::from_secs(args.download_timeout));
                train::run(&args.to_config()?)
            }
        },
        Command::Serve(args) => serve::run(&args.to_config()?),
        Command::Generate(args) => sample::run(&args.to_config()?),
        Command::Eval(args) => {
            data::set_download_timeout(Duration::from_secs(args.download_timeout));
            eval::run(&args.to_config()?)
        }
        Command::Export(args) => {
            let path = saved_model::export(&args.run, &args.out, args.session.to_config(DeviceChoice::Cpu)?)?;
            output::line(format_args!(
                "wrote SavedModel {} (signatures serving_default: tokens -> logits, train_step: x, y -> loss)",
                path.display()
            ))
        }
        Command::Info(args) => output::write(info::describe(&args.run)?),
        Command::Graph(args) => {
            let path = graph::write_text(&args.to_config()?, &args.out)?;
            output::line(format_args!("wrote {}", path.display()))
        }
    }
}
