//! Command-line interface: clap types, validation into configs, dispatch.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{ensure, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::checkpoint::{RunDir, TrainSettings};
use crate::data::{self, Shuffle, Vocab, NOTEBOOK_SHUFFLE_BUFFER};
use crate::device::{self, DeviceChoice};
use crate::graph::GraphOptions;
use crate::model::{Arch, ModelConfig};
use crate::optim::AdamConfig;
use crate::checkpoint::KEEP_CHECKPOINTS;
use crate::sample::{self, SamplerConfig};
use crate::saved_model;
use crate::tfx::SessionConfig;
use crate::train::{self, TrainConfig};

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
pub enum Command {
    /// List the devices TensorFlow sees.
    Devices,
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
    /// Corpus: a path or an http(s) URL (downloaded once into the cache).
    #[arg(long, env = "MINIGPT_DATA", default_value = data::TINY_SHAKESPEARE_URL, hide_env_values = true)]
    pub data: String,
    /// Run directory to create (or, with --resume, to continue).
    #[arg(long)]
    pub out: PathBuf,
    /// Continue the run in --out from its newest checkpoint, with its own settings (--max-steps
    /// and --epochs may raise its bounds).
    #[arg(long)]
    pub resume: bool,
    /// Model architecture.
    #[arg(long, value_enum, default_value_t = Arch::Bigram, conflicts_with = "resume")]
    pub model: Arch,
    /// Start from the weights of a SavedModel (minigpt's or Python's; see the README) instead of
    /// fresh ones; the vocabulary and the model are the SavedModel's.
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
    /// Characters per training window.
    #[arg(long, default_value_t = 64, conflicts_with = "resume")]
    pub block_size: usize,
    /// Windows per batch.
    #[arg(long, default_value_t = DEFAULT_BATCH_SIZE, conflicts_with = "resume")]
    pub batch_size: usize,
    /// Embedding width.
    #[arg(long, alias = "n-embd", default_value_t = 128, conflicts_with = "resume")]
    pub embedding_dim: u64,
    /// Transformer blocks (--model gpt).
    #[arg(long, default_value_t = 4, conflicts_with = "resume")]
    pub n_layer: u64,
    /// Attention heads per block (--model gpt); must divide the embedding width.
    #[arg(long, default_value_t = 4, conflicts_with = "resume")]
    pub n_head: u64,
    /// Dropout rate in train steps (--model gpt): after the embeddings, on the attention weights,
    /// after each attention and MLP.
    #[arg(long, default_value_t = 0.0, conflicts_with = "resume")]
    pub dropout: f64,
    /// Adam's learning rate (the peak, with a schedule).
    #[arg(long, default_value_t = 1e-3, conflicts_with = "resume")]
    pub lr: f64,
    /// Linear learning-rate warm-up over this many steps.
    #[arg(long, default_value_t = 0, conflicts_with = "resume")]
    pub warmup_steps: u64,
    /// Cosine decay of the learning rate from the end of warm-up to --min-lr at this step.
    #[arg(long, conflicts_with = "resume")]
    pub lr_decay_steps: Option<u64>,
    /// The learning rate after --lr-decay-steps.
    #[arg(long, default_value_t = 0.0, requires = "lr_decay_steps", conflicts_with = "resume")]
    pub min_lr: f64,
    /// AdamW weight decay of matrices (not biases, norms or embeddings); 0: plain Adam.
    #[arg(long, default_value_t = 0.0, conflicts_with = "resume")]
    pub weight_decay: f64,
    /// Adam's beta_1.
    #[arg(long, default_value_t = 0.9, conflicts_with = "resume")]
    pub beta1: f64,
    /// Adam's beta_2.
    #[arg(long, default_value_t = 0.999, conflicts_with = "resume")]
    pub beta2: f64,
    /// Clip gradients to this global norm.
    #[arg(long, conflicts_with = "resume")]
    pub grad_clip: Option<f64>,
    /// Seed of every random source (initial weights, shuffling).
    #[arg(long, default_value_t = 1337, conflicts_with = "resume")]
    pub seed: u64,
    /// How windows are shuffled each epoch.
    #[arg(long, value_enum, default_value_t = ShuffleArg::Buffer, conflicts_with = "resume")]
    pub shuffle: ShuffleArg,
    /// Also write a checkpoint every this many steps (one is always written at each epoch's end
    /// and at the end of the run).
    #[arg(long, conflicts_with = "resume")]
    pub save_every: Option<u64>,
    /// Also evaluate every this many steps (validation loss in the log, metrics.csv, loss.png).
    #[arg(long, conflicts_with = "resume")]
    pub eval_every: Option<u64>,
    /// Checkpoints to keep (the newest).
    #[arg(long, default_value_t = KEEP_CHECKPOINTS, conflicts_with = "resume")]
    pub keep: usize,
    /// Print the loss every this many steps.
    #[arg(long, default_value_t = 100)]
    pub log_every: u64,
    /// Validation batches per evaluation (default: every validation window).
    #[arg(long)]
    pub eval_batches: Option<usize>,
    /// Where the graph runs.
    #[arg(long, value_enum, default_value_t = DeviceChoice::Auto)]
    pub device: DeviceChoice,
    #[command(flatten)]
    pub session: SessionArgs,
    /// Print only the summary.
    #[arg(short, long)]
    pub quiet: bool,
}

impl TrainArgs {
    /// Validates the raw flags into a [`TrainConfig`].
    pub fn to_config(&self) -> Result<TrainConfig> {
        ensure!(self.block_size > 0, "--block-size must be at least 1");
        ensure!(self.batch_size > 0, "--batch-size must be at least 1");
        ensure!(self.embedding_dim > 0, "--embedding-dim must be at least 1");
        ensure!(self.epochs != Some(0), "--epochs must be at least 1");
        ensure!(self.save_every != Some(0), "--save-every must be at least 1");
        ensure!(self.eval_every != Some(0), "--eval-every must be at least 1");
        ensure!(self.keep > 0, "--keep must be at least 1");
        ensure!(self.max_steps != Some(0), "--max-steps must be at least 1");
        ensure!(self.log_every > 0, "--log-every must be at least 1");
        ensure!(self.eval_batches != Some(0), "--eval-batches must be at least 1");
        ensure!(self.lr > 0.0 && self.lr.is_finite(), "--lr must be a positive number");
        ensure!(self.min_lr >= 0.0 && self.min_lr <= self.lr, "--min-lr must be between 0 and --lr");
        ensure!(self.weight_decay >= 0.0 && self.weight_decay.is_finite(), "--weight-decay must be 0 or more");
        ensure!((0.0..1.0).contains(&self.beta1) && (0.0..1.0).contains(&self.beta2), "--beta1 and --beta2 must be in [0, 1)");
        ensure!(self.grad_clip.is_none_or(|c| c > 0.0 && c.is_finite()), "--grad-clip must be a positive number");
        ensure!(
            self.lr_decay_steps.is_none_or(|d| d > self.warmup_steps),
            "--lr-decay-steps must be larger than --warmup-steps"
        );
        let shuffle = match self.shuffle {
            ShuffleArg::Buffer => Shuffle::Buffer(NOTEBOOK_SHUFFLE_BUFFER),
            ShuffleArg::Global => Shuffle::Global,
            ShuffleArg::None => Shuffle::None,
        };
        Ok(TrainConfig {
            model: ModelConfig {
                arch: self.model,
                vocab_size: 0,
                n_embd: self.embedding_dim,
                n_layer: self.n_layer,
                n_head: self.n_head,
                block_size: self.block_size as u64,
                dropout: self.dropout,
            },
            settings: TrainSettings {
                epochs: self.epochs.unwrap_or(DEFAULT_EPOCHS),
                max_steps: self.max_steps,
                block_size: self.block_size,
                batch_size: self.batch_size,
                adam: AdamConfig {
                    learning_rate: self.lr,
                    beta_1: self.beta1,
                    beta_2: self.beta2,
                    warmup_steps: self.warmup_steps,
                    decay_steps: self.lr_decay_steps,
                    min_lr: self.min_lr,
                    weight_decay: self.weight_decay,
                    clip_norm: self.grad_clip,
                    ..AdamConfig::default()
                },
                shuffle,
                seed: self.seed,
                device: self.device,
                save_every: self.save_every,
                eval_every: self.eval_every,
                keep: self.keep,
            },
            session: self.session,
            init_from: self.init_from.clone(),
            vocab: self.vocab.clone(),
            log_every: self.log_every,
            eval_batches: self.eval_batches,
            quiet: self.quiet,
        })
    }
}

/// The notebook's `EPOCHS`.
pub const DEFAULT_EPOCHS: u64 = 3;
/// The notebook's `block_size`.
pub const DEFAULT_BLOCK_SIZE: usize = 64;
pub const DEFAULT_BATCH_SIZE: usize = 32;

/// TensorFlow runtime settings shared by the commands that run a graph.
#[derive(Args, Debug, Clone, Copy, Default)]
pub struct SessionArgs {
    /// Threads inside one op (0: TensorFlow's choice, one per core).
    #[arg(long, default_value_t = 0)]
    pub intra_op_threads: u32,
    /// Ops run side by side (0: TensorFlow's choice, one per core).
    #[arg(long, default_value_t = 0)]
    pub inter_op_threads: u32,
    /// Compile the graph with XLA's JIT.
    #[arg(long)]
    pub xla: bool,
}

impl SessionArgs {
    /// `base` (from the device choice) with these settings.
    pub fn apply(&self, base: SessionConfig) -> SessionConfig {
        SessionConfig { intra_op_threads: self.intra_op_threads, inter_op_threads: self.inter_op_threads, xla: self.xla, ..base }
    }

    pub fn to_config(&self) -> SessionConfig {
        self.apply(SessionConfig::default())
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
    /// Divides the logits: below 1 is more conservative, above 1 more random.
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f32,
    /// Sample only among the k most likely characters.
    #[arg(long)]
    pub top_k: Option<u32>,
    /// Seed of the sampler; the same seed gives the same text.
    #[arg(long, default_value_t = 1337)]
    pub seed: u64,
    /// (a --model gpt run) One pass over the whole context per character instead of continuing
    /// from the cached attention keys and values: the same text, slower; for comparison. (A
    /// SavedModel is always sampled that way; the bigram keeps no cache.)
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

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Split {
    Val,
    All,
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
}

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Devices => devices(),
        Command::Train(args) => train_cmd(&args),
        Command::Generate(args) => generate(&args),
        Command::Eval(args) => eval(&args),
        Command::Export(args) => {
            let path = crate::saved_model::export(&args.run, &args.out, &args.session)?;
            println!("wrote SavedModel {} (signatures serving_default: tokens -> logits, train_step: x, y -> loss)", path.display());
            Ok(())
        }
        Command::Info(args) => {
            print!("{}", crate::info::describe(&args.run)?);
            Ok(())
        }
        Command::Graph(args) => graph(&args),
    }
}

fn devices() -> Result<()> {
    let devices = device::list_devices()?;
    for d in &devices {
        println!("{:<28} {:<5} {:>8.1} MiB", d.name, d.kind, d.memory_bytes as f64 / (1 << 20) as f64);
    }
    println!("Num GPUs Available:  {}", device::gpu_count(&devices));
    Ok(())
}

fn train_cmd(args: &TrainArgs) -> Result<()> {
    let cfg = args.to_config()?;
    train::stop_on_signals()?;
    let summary = if args.resume {
        let opts = train::ResumeOptions {
            max_steps: args.max_steps,
            epochs: args.epochs,
            session: args.session,
            log_every: args.log_every,
            eval_batches: args.eval_batches,
            quiet: args.quiet,
        };
        train::resume(&args.out, &opts)?
    } else {
        let corpus = data::load_corpus(&args.data)?;
        train::train(&cfg, &corpus, &args.out)?
    };
    println!(
        "trained {} steps in {:.1} s ({:.0} steps/s): last loss {:.4}, val loss {:.4}; run saved to {}",
        summary.steps,
        summary.seconds,
        summary.steps as f64 / summary.seconds,
        summary.last_loss,
        summary.val_loss,
        args.out.display()
    );
    Ok(())
}

fn generate(args: &GenerateArgs) -> Result<()> {
    ensure!(args.top_k != Some(0), "--top-k must be at least 1");
    ensure!(args.temperature > 0.0 && args.temperature.is_finite(), "--temperature must be a positive number, got {}", args.temperature);
    let mut out = std::io::stdout().lock();
    let mut emit = |vocab: &Vocab, id: i32| -> Result<()> {
        write!(out, "{}", vocab.decode(&[id]))?;
        Ok(out.flush()?)
    };
    let check_top_k = |vocab: &Vocab| match args.top_k {
        Some(k) if k as usize > vocab.len() => Err(anyhow::anyhow!("--top-k {k} exceeds the vocabulary size {}", vocab.len())),
        _ => Ok(()),
    };
    if saved_model::is_saved_model(&args.run) {
        let model = saved_model::Loaded::load(&args.run, args.load.vocab.as_deref(), &args.load.session, args.seed as i64, args.top_k)?;
        check_top_k(&model.vocab)?;
        let prompt = model.vocab.encode(&args.prompt).context("the prompt cannot be encoded")?;
        print!("{}", args.prompt);
        let temperature = tensorflow::Tensor::from(args.temperature);
        sample::generate_with(&prompt, args.chars, model.block_size, |id| emit(&model.vocab, id), |context| model.next(context, &temperature))?;
    } else {
        ensure!(args.load.vocab.is_none(), "--vocab is for SavedModels; a run directory has its vocabulary in config.json");
        let dir = RunDir::open(&args.run)?;
        let opts = GraphOptions { sampler: Some(SamplerConfig { top_k: args.top_k }), ..GraphOptions::new(args.seed as i64) };
        let (config, runner) = train::load_run(&dir, opts, args.load.device, &args.load.session)?;
        let vocab = config.vocab()?;
        check_top_k(&vocab)?;
        let prompt = vocab.encode(&args.prompt).context("the prompt cannot be encoded")?;
        print!("{}", args.prompt);
        match args.no_cache {
            true => sample::generate_uncached(&runner, &prompt, args.chars, args.temperature, |id| emit(&vocab, id))?,
            false => sample::generate(&runner, &prompt, args.chars, args.temperature, |id| emit(&vocab, id))?,
        };
    }
    println!();
    Ok(())
}

fn eval(args: &EvalArgs) -> Result<()> {
    let print = |name: &str, loss: f64| {
        println!("{name}_loss: {loss:.6}");
        println!("{name}_perplexity: {:.6}", loss.exp());
    };
    let splits = |vocab: &Vocab, source: &str| -> Result<Vec<i32>> {
        let corpus = data::load_corpus(source)?;
        vocab.encode(&corpus.text).context("the corpus does not fit the model's vocabulary")
    };
    ensure!(args.eval_batches != Some(0), "--eval-batches must be at least 1");
    if saved_model::is_saved_model(&args.run) {
        let model = saved_model::Loaded::load(&args.run, args.load.vocab.as_deref(), &args.load.session, 0, None)?;
        let source = args.data.clone().unwrap_or_else(data::default_source);
        let encoded = splits(&model.vocab, &source)?;
        let (train_data, val_data) = data::split(&encoded);
        let block = model.block_size.unwrap_or(DEFAULT_BLOCK_SIZE);
        let sample = args.eval_batches.map(|n| (n, saved_model::batch_size(&args.run).unwrap_or(DEFAULT_BATCH_SIZE)));
        print("val", train::evaluate_with(|x, y| model.loss(x, y), val_data, block, sample, 0)?);
        if args.split == Split::All {
            print("train", train::evaluate_with(|x, y| model.loss(x, y), train_data, block, sample, 0)?);
        }
        return Ok(());
    }
    ensure!(args.load.vocab.is_none(), "--vocab is for SavedModels; a run directory has its vocabulary in config.json");
    let dir = RunDir::open(&args.run)?;
    // Evaluation draws nothing at random: the seed does not matter.
    let (config, runner) = train::load_run(&dir, GraphOptions::new(0), args.load.device, &args.load.session)?;
    let source = args.data.clone().unwrap_or_else(|| config.data.source.clone());
    let encoded = splits(&config.vocab()?, &source)?;
    let (train_data, val_data) = data::split(&encoded);
    let block = config.train.block_size;
    let sample = args.eval_batches.map(|n| (n, config.train.batch_size));
    print("val", train::evaluate(&runner, val_data, block, sample, 0)?);
    if args.split == Split::All {
        print("train", train::evaluate(&runner, train_data, block, sample, 0)?);
    }
    Ok(())
}

fn graph(args: &GraphArgs) -> Result<()> {
    let model = ModelConfig {
        arch: args.model,
        vocab_size: args.vocab_size,
        n_embd: args.embedding_dim,
        n_layer: args.n_layer,
        n_head: args.n_head,
        block_size: args.block_size,
        dropout: args.dropout,
    };
    let path = crate::write_graph(&model, &args.out)?;
    println!("wrote {}", path.display());
    Ok(())
}
