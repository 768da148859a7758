//! Training (`minigpt train`): the notebook's loop (`for epoch ...: for step, (x, y) in
//! enumerate(...)`), one `Session::run` per step, for new runs, `--init-from` and `--resume`;
//! evaluation, checkpoints, metrics, the plot and TensorBoard; progress output; Ctrl-C.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use tensorflow::Tensor;

use crate::cluster::{self, Cluster, ClusterOptions, Waited};
use crate::data::{self, Batches, Corpus, Vocab};
use crate::device::{DeviceChoice, SessionConfig};
use crate::eval;
use crate::graph::{GraphOptions, Purpose, Runner};
use crate::memory;
use crate::model::{ModelConfig, ModelShape};
use crate::output;
use crate::run::{Best, DataInfo, Load, MetricsRow, RunConfig, RunDir, TrainSettings};
use crate::saved_model;
use crate::text::thousands;

/// The notebook's `EPOCHS`.
pub const NOTEBOOK_EPOCHS: u64 = 3;
/// The seed of every random source unless `--seed` says otherwise.
pub const DEFAULT_SEED: u64 = 1337;

/// What `minigpt train` does, validated.
#[derive(Debug, Clone)]
pub struct TrainConfig {
    /// The run directory to create or continue.
    pub out: PathBuf,
    pub start: Start,
    /// Threads and XLA (the device is the run's).
    pub session: SessionConfig,
    /// Train on these workers (TensorFlow's gRPC runtime) instead of in this process.
    pub cluster: Option<ClusterOptions>,
    pub report: Report,
}

/// Where a run starts.
#[derive(Debug, Clone)]
pub enum Start {
    /// Fresh weights of `model`, trained on `data` (a path or URL).
    New { data: String, model: ModelShape, settings: TrainSettings },
    /// The weights, vocabulary and model of a SavedModel (`vocab`: for one that carries none).
    InitFrom { data: String, dir: PathBuf, vocab: Option<PathBuf>, settings: TrainSettings },
    /// The run in `out`, from its newest checkpoint, its bounds raised if given, on `device` if
    /// given; `data`, if given, must be the text it was trained on, and the `given` settings the
    /// run's own.
    Resume {
        data: Option<String>,
        max_steps: Option<u64>,
        epochs: Option<u64>,
        device: Option<DeviceChoice>,
        given: Given,
    },
}

/// Run settings given with `--resume`: each must equal the run's (a user re-running the command
/// that started the run, with `--resume` added, is continuing it).
#[derive(Debug, Clone)]
pub struct Given {
    /// Each flag given, and where config.json keeps its value (a JSON pointer).
    pub flags: Vec<(&'static str, &'static str)>,
    /// The settings and model as those flags (and defaults for the others) make them.
    pub settings: TrainSettings,
    pub model: ModelConfig,
}

impl Given {
    /// An error naming the first flag whose value differs from the run's.
    fn check(&self, run: &RunConfig) -> Result<()> {
        let stored = serde_json::to_value(run)?;
        let asked = serde_json::json!({ "model": self.model, "train": self.settings });
        for (flag, field) in &self.flags {
            let (want, have) = (asked.pointer(field), stored.pointer(field));
            ensure!(
                want == have,
                "{flag} {} differs from the run's {} (config.json {field}): a resumed run keeps its settings; \
                 leave {flag} out, or start a new run",
                want.map_or("none".into(), |v| v.to_string()),
                have.map_or("none".into(), |v| v.to_string())
            );
        }
        Ok(())
    }
}

/// How training reports.
#[derive(Debug, Clone)]
pub struct Report {
    /// Print `Step N: Loss X` every this many steps of an epoch.
    pub log_every: u64,
    /// Validation batches per evaluation (`None`: every validation window).
    pub eval_batches: Option<usize>,
    pub quiet: bool,
}

/// Set by the first SIGINT, SIGTERM or SIGHUP once [`stop_on_signals`] is called: the loop finishes its
/// step, checkpoints and returns [`Interrupted`].
fn stop_flag() -> &'static Arc<AtomicBool> {
    static FLAG: OnceLock<Arc<AtomicBool>> = OnceLock::new();
    FLAG.get_or_init(|| Arc::new(AtomicBool::new(false)))
}

/// True until the step loop starts: before it there is nothing to save.
fn loading_flag() -> &'static Arc<AtomicBool> {
    static FLAG: OnceLock<Arc<AtomicBool>> = OnceLock::new();
    FLAG.get_or_init(|| Arc::new(AtomicBool::new(true)))
}

/// Makes Ctrl-C, SIGTERM and SIGHUP (a closed terminal, a dropped SSH session) exit at once (code
/// 130) while the run is being set up (corpus, download, graph), and stop training cleanly at the
/// end of the current step once it trains; a second one then exits at once. Each exit at once
/// says why on stderr.
pub fn stop_on_signals() -> Result<()> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    for signal in [SIGINT, SIGTERM, SIGHUP] {
        let (loading, stop) = (loading_flag().clone(), stop_flag().clone());
        let action = move || {
            if loading.load(Ordering::SeqCst) {
                exit_at_once(b"interrupted while starting: nothing was trained, nothing to save\n");
            }
            if stop.swap(true, Ordering::SeqCst) {
                exit_at_once(b"interrupted again: exiting without a checkpoint; the newest one is kept\n");
            }
        };
        // SAFETY: the action only touches atomics, and write(2) and _exit(2), which are
        // async-signal-safe.
        unsafe { signal_hook::low_level::register(signal, action) }.context("installing the signal handler")?;
    }
    Ok(())
}

/// In a signal handler: writes `message` to stderr and exits with code 130.
fn exit_at_once(message: &[u8]) -> ! {
    // SAFETY: write(2) of a static buffer and _exit(2), both async-signal-safe.
    unsafe {
        libc::write(2, message.as_ptr().cast(), message.len());
        libc::_exit(130)
    }
}

fn stop_requested() -> bool {
    stop_flag().load(Ordering::Relaxed)
}

/// The workers of a cluster run did not come back within `--worker-timeout` (why), or a signal
/// came while waiting for them (`None`); the failed session still holds the chief's state, which
/// the loop checkpoints before giving up.
#[derive(Debug, thiserror::Error)]
#[error("{}", .0.as_deref().unwrap_or("interrupted while waiting for the workers"))]
struct WorkersLost(Option<String>);

/// Training stopped by a signal after checkpointing; `minigpt` exits with code 130.
#[derive(Debug, thiserror::Error)]
#[error("interrupted at step {step}: checkpoint saved; continue with `minigpt train --resume --out {}`", dir.display())]
pub struct Interrupted {
    pub step: u64,
    pub dir: PathBuf,
}

/// Training stopped after checkpointing because writing its log to stdout failed: its reader went
/// away (`closed`: `minigpt` exits 141) or stdout cannot be written (exit 1).
#[derive(Debug, thiserror::Error)]
#[error("{why} at step {step}: checkpoint saved; continue with `minigpt train --resume --out {}`", dir.display())]
pub struct OutputLost {
    pub step: u64,
    pub dir: PathBuf,
    pub closed: bool,
    why: String,
}

/// What a finished run reports.
#[derive(Debug, Clone)]
pub struct TrainSummary {
    pub steps: u64,
    pub last_loss: f32,
    pub val_loss: f64,
    pub seconds: f64,
}

/// `minigpt train`: trains, then prints one summary line.
pub fn run(cfg: &TrainConfig) -> Result<()> {
    stop_on_signals()?;
    let summary = match &cfg.start {
        Start::Resume { .. } => resume(cfg)?,
        Start::New { data, .. } | Start::InitFrom { data, .. } => {
            RunDir::check_new(&cfg.out)?;
            train(cfg, &data::load_corpus(data)?)?
        }
    };
    output::line(format_args!(
        "trained {} steps in {:.1} s ({:.0} steps/s): last loss {:.4}, val loss {:.4}; run saved to {}",
        summary.steps,
        summary.seconds,
        summary.steps as f64 / summary.seconds,
        summary.last_loss,
        summary.val_loss,
        cfg.out.display()
    ))
}

/// Trains a fresh (or `--init-from`) model on `corpus`, writing the run to `cfg.out`.
pub fn train(cfg: &TrainConfig, corpus: &Corpus) -> Result<TrainSummary> {
    let (settings, vocab, model) = match &cfg.start {
        Start::New { model, settings, .. } => {
            let vocab = Vocab::from_text(&corpus.text);
            let model = model.with(vocab.len() as u64, settings.block_size as u64);
            (settings, vocab, model)
        }
        Start::InitFrom { dir, vocab: vocab_file, settings, .. } if !saved_model::is_saved_model(dir) => {
            ensure!(
                vocab_file.is_none(),
                "--vocab is for SavedModels; a run directory has its vocabulary in config.json"
            );
            let from = RunDir::open(dir).context("--init-from takes a SavedModel or a run directory")?.read_config()?;
            (settings, from.vocab()?, from.model)
        }
        Start::InitFrom { dir, vocab, settings, .. } => {
            let vocab = saved_model::vocabulary(dir, vocab.as_deref())?;
            let model = saved_model::model_config(dir, vocab.len() as u64)?;
            (settings, vocab, model)
        }
        Start::Resume { .. } => bail!("a resumed run is continued, not trained afresh"),
    };
    let encoded = vocab.encode(&corpus.text).context("the corpus does not fit the --init-from model's vocabulary")?;
    let (train_data, val_data) = data::split(&encoded);
    check_sizes(train_data, val_data, settings.block_size, settings.batch_size)?;
    let model = match (&cfg.start, cfg.session.precision) {
        (Start::InitFrom { .. }, precision) => ModelConfig { precision: precision.unwrap_or_default(), ..model },
        _ => model,
    };
    let mut config = RunConfig {
        model,
        train: settings.clone(),
        vocab: vocab.to_strings(),
        data: DataInfo { source: corpus.source.clone(), sha256: corpus.sha256.clone() },
        steps_done: 0,
        epochs_done: 0,
        best: None,
        cluster: None,
        minigpt_version: env!("CARGO_PKG_VERSION").to_string(),
    };
    if let (Start::InitFrom { .. }, Some(context)) = (&cfg.start, config.model.context_limit()) {
        ensure!(
            settings.block_size as u64 <= context,
            "--block-size {} exceeds the model's {context} positions \
             (--init-from: give --block-size {context} or less)",
            settings.block_size
        );
    }
    config.validate()?;
    check_memory(&config, corpus.text.len())?;
    let runner = build_runner(&mut config, cfg)?;
    runner.init()?;
    if !cfg.report.quiet {
        let params = crate::model::parameters(&runner.variables());
        output::line(format_args!(
            "model: {}, {} parameters, vocabulary of {}",
            format!("{:?}", config.model.arch).to_lowercase(),
            thousands(params),
            vocab.len()
        ))?;
    }
    if let Start::InitFrom { dir, .. } = &cfg.start {
        let weights = match saved_model::is_saved_model(dir) {
            true => saved_model::import_weights(dir, &runner.variables())?,
            // The run's newest usable checkpoint, found and restored as `generate` does.
            false => RunDir::open(dir)?.load(Load::Inference { sampler: None }, cfg.session)?.1.weights()?,
        };
        runner.set_weights(&weights)?;
    }
    let dir = RunDir::create(&cfg.out)?;
    let _lock = dir.lock()?;
    dir.write_config(&config)?;
    run_steps(
        &runner,
        &dir,
        &mut config,
        &cfg.report,
        (train_data, val_data),
        Position { epoch: 0, batch: 0, step: 0 },
        Vec::new(),
    )
}

/// Continues the run in `cfg.out` from its newest usable checkpoint: the same weights, Adam
/// state and place in the data, so a resumed run computes what an uninterrupted one would, bit
/// for bit.
fn resume(cfg: &TrainConfig) -> Result<TrainSummary> {
    let Start::Resume { data, max_steps, epochs, device, given } = &cfg.start else {
        bail!("a new run is trained, not resumed");
    };
    let (data, max_steps, epochs) = (data.as_deref(), *max_steps, *epochs);
    let dir = RunDir::open(&cfg.out)?;
    let _lock = dir.lock()?;
    let mut config = dir.read_config()?;
    given.check(&config)?;
    if let Some(device) = device {
        config.train.device = *device;
    }
    if let Some(n) = max_steps {
        config.train.max_steps = Some(n);
    }
    if let Some(n) = epochs {
        config.train.epochs = n;
    }
    let corpus = data::load_corpus(data.unwrap_or(&config.data.source))?;
    let trained_on = format!("{} (SHA-256 {})", config.data.source, config.data.sha256);
    match data {
        Some(given) => ensure!(
            corpus.sha256 == config.data.sha256,
            "--data {given} (SHA-256 {}) is not the text this run was trained on, {trained_on}: resume without --data",
            corpus.sha256
        ),
        None => ensure!(
            corpus.sha256 == config.data.sha256,
            "the run was trained on {trained_on}, which now has SHA-256 {}: give that text with --data",
            corpus.sha256
        ),
    }
    let vocab = config.vocab()?;
    let encoded = vocab.encode(&corpus.text)?;
    let (train_data, val_data) = data::split(&encoded);
    check_sizes(train_data, val_data, config.train.block_size, config.train.batch_size)?;
    check_memory(&config, corpus.text.len())?;
    let runner = build_runner(&mut config, cfg)?;
    let prefix = dir.restore_latest(&runner)?;
    let [epoch, batch] = runner
        .restore_position(crate::files::path_str(&prefix)?)
        .with_context(|| format!("{} cannot be resumed from", prefix.display()))?;
    let step = runner.iterations()?;
    let position = Position { epoch: epoch as u64, batch: batch as u64, step: step as u64 };
    // Metrics up to the checkpoint; later rows belong to the steps about to be redone.
    let mut metrics = dir.read_metrics()?;
    metrics.retain(|r| r.step < position.step || (r.step == position.step && r.val_loss.is_some()));
    if !cfg.report.quiet {
        output::line(format_args!(
            "resuming {} from {} (step {}, epoch {}, batch {})",
            cfg.out.display(),
            prefix.display(),
            position.step,
            epoch + 1,
            batch
        ))?;
    }
    run_steps(&runner, &dir, &mut config, &cfg.report, (train_data, val_data), position, metrics)
}

fn check_sizes(train_data: &[i32], val_data: &[i32], block_size: usize, batch_size: usize) -> Result<()> {
    let n_batches = Batches::len(train_data.len(), block_size, batch_size);
    ensure!(
        n_batches > 0,
        "the corpus is too short: its {} training characters give {} windows of {} + 1, fewer than one batch of {}",
        train_data.len(),
        data::num_windows(train_data.len(), block_size),
        block_size,
        batch_size
    );
    ensure!(
        data::num_windows(val_data.len(), block_size) > 0,
        "the corpus is too short: its {} validation characters hold no window of {} + 1",
        val_data.len(),
        block_size
    );
    Ok(())
}

/// An estimate of the memory a train step needs at its peak, in bytes: the weights, their
/// gradients and Adam's two slots (4 × 4 bytes a parameter); the step's tensors of B·T rows (the
/// logits, their softmax and gradients: 6 × [B·T, V]; the embeddings and their gradients: 8 ×
/// [B·T, C]; per block, the [B·T, C] and [B·T, 4C] tensors of attention and MLP, 24 × C in all, and
/// 4 × the attention weights [B, H, T, T]); the graph ([`ModelConfig::graph_bytes`]); the corpus,
/// its ids (4 bytes a character) and the epoch's window order (4 bytes a window): 9 bytes a byte
/// of corpus at most. Saturating: a size past `u64` is past any machine.
pub fn memory_needed(config: &RunConfig, corpus_bytes: usize) -> Result<u64> {
    let m = &config.model;
    let (b, t) = (config.train.batch_size as u64, config.train.block_size as u64);
    let params = m.parameter_count()?;
    let rows = b.saturating_mul(t);
    let per_block = (24 * m.n_embd)
        .saturating_mul(rows)
        .saturating_add((4 * b).saturating_mul(m.n_head).saturating_mul(t).saturating_mul(t));
    let blocks = if m.arch == crate::model::Arch::Gpt { m.n_layer } else { 0 };
    let activations =
        (6 * m.vocab_size + 8 * m.n_embd).saturating_mul(rows).saturating_add(blocks.saturating_mul(per_block));
    Ok(params
        .saturating_mul(16)
        .saturating_add(activations.saturating_mul(4))
        .saturating_add(m.graph_bytes())
        .saturating_add(9 * corpus_bytes as u64))
}

/// Refuses a run that cannot fit, with the numbers, before any graph is built (instead of
/// training until the kernel kills it).
fn check_memory(config: &RunConfig, corpus_bytes: usize) -> Result<()> {
    let parts = format!(
        "{} parameters with their gradients and Adam's slots, a batch of {} × {} characters' activations, the \
         graph, the corpus",
        thousands(config.model.parameter_count()?),
        config.train.batch_size,
        config.train.block_size,
    );
    memory::ensure_fits(
        memory_needed(config, corpus_bytes)?,
        "this run",
        &parts,
        "lower --batch-size, --block-size or the model's size",
    )
}

/// The training graph of a run, with summaries, on the run's device: in this process, or (with
/// `--cluster`, recorded in `config`) with its step replicated on the cluster's workers.
fn build_runner(config: &mut RunConfig, cfg: &TrainConfig) -> Result<Runner> {
    let s = &config.train;
    let opts = GraphOptions {
        purpose: Purpose::Training { adam: s.adam, summaries: true },
        ..GraphOptions::inference(s.seed as i64)
    };
    let session = SessionConfig { device: s.device, ..cfg.session };
    let Some(c) = &cfg.cluster else {
        config.cluster = None;
        return Runner::new(&config.model, &opts, session);
    };
    ensure!(
        cfg.session.xla != crate::device::Xla::On,
        "--xla does not work with --cluster: TensorFlow's distributed runtime compiles nothing with XLA's \
         auto-clustering (no cluster is compiled on the chief or the workers); drop --xla"
    );
    ensure!(
        !config.model.precision.scales_loss(),
        "--precision mixed_float16 does not work with --cluster: its loss scaling is built into the single-process \
         step; use mixed_bfloat16 or train in one process"
    );
    let workers = c.spec.workers.len();
    ensure!(
        s.batch_size.is_multiple_of(workers),
        "--batch-size {} does not divide among the {workers} workers of --cluster: give a multiple of {workers}",
        s.batch_size
    );
    let cluster = Cluster::start(c, Some(&cfg.out))?;
    let runner = Runner::on_cluster(&config.model, &opts, session, cluster)?;
    config.cluster = Some(c.spec.workers.clone());
    Ok(runner)
}

/// Runs `run` (a train step at `step`); on a cluster, a run that failed because a worker died or
/// hung runs again once every worker answers, in a new session that holds what the failed one
/// held: the chief's variables are read from the failed session (they live as long as it does)
/// and written into the new one, so no step but the failed one is lost, and that one is redone.
fn recovering<T>(runner: &Runner, dir: &RunDir, step: u64, run: impl Fn() -> Result<T>) -> Result<T> {
    use tensorflow::Code;
    loop {
        let started = Instant::now();
        let error = match run() {
            Ok(value) => return Ok(value),
            Err(error) => error,
        };
        let failed_after = started.elapsed().as_secs_f64();
        let Some(cluster) = runner.cluster() else { return Err(error) };
        if !cluster::transient(&error) {
            return Err(error);
        }
        let code = error.downcast_ref::<tensorflow::Status>().map(|s| s.code());
        let why = cluster::short_status(&error.root_cause().to_string());
        let down = cluster.down()?;
        ensure!(
            !(down.is_empty() && code == Some(Code::DeadlineExceeded)),
            "step {step} ran longer than --step-timeout {} s while every worker answers: give a larger \
             --step-timeout",
            cluster.step_timeout.as_secs()
        );
        let task = |i: usize| format!("worker task {i} ({})", cluster.spec.workers[i]);
        let who: Vec<String> = match (down.is_empty(), cluster::failed_worker(&why)) {
            (false, _) => down.iter().map(|&(i, _)| task(i)).collect(),
            (true, Some(i)) => vec![task(i)],
            (true, None) => vec!["a worker".to_string()],
        };
        eprintln!(
            "warning: {} failed at step {step}, {failed_after:.2} s into it ({why}); waiting up to {} s for it \
             (--worker-timeout)",
            who.join(", "),
            cluster.worker_timeout.as_secs()
        );
        let saved = tempfile::tempdir().context("making a folder for the chief's state")?;
        let prefix = saved.path().join("state");
        let prefix = crate::files::path_str(&prefix)?;
        runner.save(prefix, [0, 0]).context("reading the chief's state from the failed session")?;
        let waited = match cluster.wait_for_workers_unless(&stop_requested) {
            Ok(Waited::Answered(waited)) => waited,
            Ok(Waited::Stopped) => return Err(WorkersLost(None).into()),
            Err(e) => return Err(WorkersLost(Some(crate::text::error_line(&e))).into()),
        };
        runner.reconnect()?;
        runner.restore(prefix)?;
        runner.open_events(&dir.path.join("events"))?;
        eprintln!(
            "warning: every worker answers again after {:.1} s: step {step} runs again in a new session",
            waited.as_secs_f64()
        );
    }
}

/// Training output. On a terminal: a progress bar (epoch, step, smoothed loss, steps/s,
/// tokens/s, ETA) with the epoch and evaluation lines above it. Otherwise the notebook's lines:
/// `Epoch N`, `Step N: Loss X` every `log_every` steps, and the evaluations.
struct Progress {
    bar: Option<indicatif::ProgressBar>,
    quiet: bool,
    log_every: u64,
    smoothed: Option<f64>,
    tokens_per_step: u64,
    start: Instant,
    start_step: u64,
    epochs: u64,
    /// Why writing to stdout failed, once it did: nothing more is written there.
    lost: Option<anyhow::Error>,
}

impl Progress {
    fn new(report: &Report, s: &TrainSettings, total_steps: u64, at: u64) -> Self {
        use std::io::IsTerminal;
        let bar = (!report.quiet && std::io::stdout().is_terminal()).then(|| {
            let bar =
                indicatif::ProgressBar::with_draw_target(Some(total_steps), indicatif::ProgressDrawTarget::stdout());
            bar.set_style(
                indicatif::ProgressStyle::with_template("{prefix} [{bar:28}] step {pos}/{len} {msg} eta {eta}")
                    .expect("a valid template")
                    .progress_chars("=> "),
            );
            bar.set_position(at);
            bar
        });
        let tokens_per_step = (s.batch_size * s.block_size) as u64;
        Self {
            bar,
            quiet: report.quiet,
            log_every: report.log_every,
            smoothed: None,
            tokens_per_step,
            start: Instant::now(),
            start_step: at,
            epochs: s.epochs,
            lost: None,
        }
    }

    /// A line above the bar (or on stdout).
    fn line(&mut self, text: &str) {
        match &self.bar {
            Some(bar) => bar.println(text),
            None if !self.quiet => self.print(text),
            None => {}
        }
    }

    /// A line on stdout, until writing there fails once.
    fn print(&mut self, text: &str) {
        if self.lost.is_none() {
            self.lost = output::line(text).err();
        }
    }

    fn epoch(&mut self, epoch: u64) {
        match &self.bar {
            Some(bar) => bar.set_prefix(format!("epoch {}/{}", epoch + 1, self.epochs)),
            None => self.line(&format!("\nEpoch {}", epoch + 1)),
        }
    }

    /// After the step `step` of an epoch (global step `global_step` done) with loss `loss`.
    fn step(&mut self, step: u64, global_step: u64, loss: f32) {
        if loss.is_finite() {
            // (A skipped float16 step's loss is not.)
            self.smoothed = Some(self.smoothed.map_or(loss as f64, |s| 0.98 * s + 0.02 * loss as f64));
        }
        let smoothed = self.smoothed.unwrap_or(f64::NAN);
        match &self.bar {
            Some(bar) => {
                bar.set_position(global_step);
                if global_step.is_multiple_of(10) {
                    let rate = (global_step - self.start_step) as f64 / self.start.elapsed().as_secs_f64().max(1e-9);
                    bar.set_message(format!(
                        "loss {smoothed:.4} · {rate:.0} steps/s · {:.0}k tokens/s",
                        rate * self.tokens_per_step as f64 / 1e3
                    ));
                }
            }
            None if !self.quiet && step.is_multiple_of(self.log_every) => {
                self.print(&format!("Step {step}: Loss {loss:.4}"))
            }
            None => {}
        }
    }

    /// Training tokens per second since this run (or resumption) started, at `global_step`.
    fn tokens_per_s(&self, global_step: u64) -> f64 {
        let seconds = self.start.elapsed().as_secs_f64();
        (global_step - self.start_step) as f64 * self.tokens_per_step as f64 / seconds
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

/// Where a run is: in epoch `epoch` (from 0), `batch` batches done in it, `step` in all.
#[derive(Debug, Clone, Copy)]
struct Position {
    epoch: u64,
    batch: u64,
    step: u64,
}

/// What the loop writes besides training: evaluations, metrics, the plot, checkpoints, config.
struct Recorder<'a> {
    runner: &'a Runner,
    dir: &'a RunDir,
    config: &'a mut RunConfig,
    report: &'a Report,
    val_data: &'a [i32],
    metrics: Vec<MetricsRow>,
    progress: Progress,
    last_loss: f32,
    val_loss: f64,
}

impl Recorder<'_> {
    /// Validation loss (the mean over --eval-batches random batches, or every window), logged,
    /// added to metrics.csv (`epoch`: the 1-based epoch of the step), TensorBoard and the plot;
    /// a new lowest one also saves `ckpt/best`.
    fn evaluate(&mut self, step: u64, epoch: u64) -> Result<()> {
        let s = &self.config.train;
        let sample = self.report.eval_batches.map(|n| (n, s.batch_size));
        self.val_loss =
            eval::evaluate(|x, y| self.runner.loss(x, y), self.val_data, s.block_size, sample, s.seed, None)?;
        self.progress.line(&format!("step {step}: train loss {:.4}, val loss {:.4}", self.last_loss, self.val_loss));
        self.metrics.push(MetricsRow { step, epoch, loss: self.last_loss, val_loss: Some(self.val_loss) });
        self.runner.write_scalars(step, &[("val_loss", self.val_loss as f32)])?;
        if self.config.best.is_none_or(|b| self.val_loss < b.val_loss) {
            self.dir.save_best(self.runner, [epoch as i64, 0])?;
            self.config.best = Some(Best { val_loss: self.val_loss, step });
            self.dir.write_config(self.config)?;
        }
        self.write_metrics()
    }

    fn write_metrics(&self) -> Result<()> {
        self.dir.write_metrics(&self.metrics)?;
        crate::plot::write_loss_plot(&self.metrics, &self.dir.path.join("loss.png"))
    }

    /// A checkpoint at `step`, whose data position is `position` (epoch, batches done in it),
    /// with metrics and config brought up to date.
    fn checkpoint(&mut self, step: u64, position: [i64; 2]) -> Result<()> {
        self.dir.save_checkpoint(self.runner, step, position, self.config.train.keep)?;
        self.runner.write_scalars(step, &[])?; // flushes the event file
        self.write_metrics()?;
        self.config.steps_done = step;
        self.config.epochs_done = position[0] as u64;
        self.dir.write_config(self.config)
    }
}

/// Under `mixed_float16` a step whose loss is not finite is skipped, as Keras'
/// `LossScaleOptimizer` skips it (its gradients are not finite either); this many in a row stop
/// the run: halving the scale cannot help when the weights themselves overflow float16.
const SKIPPED_IN_A_ROW: u32 = 20;

/// The notebook's loop from `at` on, with evaluation and checkpoints.
fn run_steps(
    runner: &Runner,
    dir: &RunDir,
    config: &mut RunConfig,
    report: &Report,
    (train_data, val_data): (&[i32], &[i32]),
    at: Position,
    metrics: Vec<MetricsRow>,
) -> Result<TrainSummary> {
    let s = &config.train.clone();
    let n_batches = Batches::len(train_data.len(), s.block_size, s.batch_size) as u64;
    let (b, t) = (s.batch_size as u64, s.block_size as u64);
    let mut x = Tensor::<i32>::new(&[b, t]);
    let mut y = Tensor::<i32>::new(&[b, t]);
    let max_steps = s.max_steps.unwrap_or(u64::MAX);
    ensure!(
        at.step < max_steps && at.epoch < s.epochs,
        "the run is complete ({} steps, {} epochs done): give a larger --max-steps or --epochs to go on",
        at.step,
        at.epoch
    );
    let start = Instant::now();
    let progress = Progress::new(report, s, max_steps.min(s.epochs.saturating_mul(n_batches)), at.step);
    let mut rec =
        Recorder { runner, dir, config, report, val_data, metrics, progress, last_loss: f32::NAN, val_loss: f64::NAN };
    let mut global_step = at.step;
    let (scaled, mut skipped) = (rec.config.model.precision.scales_loss(), 0);
    runner.open_events(&dir.path.join("events"))?;
    loading_flag().store(false, Ordering::Relaxed);

    'epochs: for epoch in at.epoch..s.epochs {
        rec.progress.epoch(epoch);
        let mut batches = Batches::new(train_data, s.block_size, s.batch_size, s.shuffle, s.seed, epoch);
        let mut step = if epoch == at.epoch { at.batch } else { 0 };
        batches.skip(step as usize);
        while batches.fill(&mut x, &mut y) {
            let logged = step.is_multiple_of(report.log_every);
            let loss: f32 = match recovering(runner, dir, global_step, || match logged {
                true => runner.train_step_logged(&x, &y, global_step),
                false => runner.train_step(&x, &y),
            }) {
                Err(e) if e.is::<WorkersLost>() => {
                    rec.checkpoint(global_step, [epoch as i64, step as i64])?;
                    rec.progress.finish();
                    if e.downcast_ref::<WorkersLost>().is_some_and(|lost| lost.0.is_none()) {
                        return Err(Interrupted { step: global_step, dir: dir.path.clone() }.into());
                    }
                    bail!(
                        "{e}; the run is checkpointed at step {global_step}: continue with `minigpt train --resume \
                         --out {}`, with or without --cluster",
                        dir.path.display()
                    );
                }
                result => result?,
            };
            // Under loss scaling a non-finite loss (float16 overflowed in the forward pass) made
            // the gradients non-finite too: the step was skipped and the scale halved.
            let skip = scaled && !loss.is_finite() && skipped + 1 < SKIPPED_IN_A_ROW;
            if !loss.is_finite() && !skip {
                let why = match scaled {
                    true => format!(
                        ", the {SKIPPED_IN_A_ROW}th step in a row (float16 overflows: try --precision mixed_bfloat16 \
                         or a lower --lr)"
                    ),
                    false => " (try a lower --lr)".into(),
                };
                // The loss of step g is that of the weights saved as ckpt-g, if any: not good ones,
                // nor are those of the skipped steps before it, which did not change them.
                let mut aside = None;
                for g in (global_step - skipped as u64..=global_step).rev() {
                    aside = dir.discard_checkpoint(g)?.or(aside);
                }
                let last = dir.checkpoints().ok().and_then(|c| c.into_iter().next());
                let kept = last.map_or("no good checkpoint is left".to_string(), |p| {
                    format!("the newest checkpoint is still {}", p.display())
                });
                let aside = aside.map_or(String::new(), |p| format!(" (its weights are kept as {})", p.display()));
                bail!("training stopped: the loss became {loss} at step {global_step}{why}{aside}; {kept}");
            }
            if skip {
                skipped += 1;
                let scale = runner.loss_scale()?.unwrap_or(f32::NAN);
                rec.progress.line(&format!(
                    "step {global_step}: the loss is {loss} (float16 overflowed): step skipped, loss scale now {scale}"
                ));
            } else {
                skipped = 0;
                rec.last_loss = loss;
            }
            if logged && !skip {
                rec.metrics.push(MetricsRow { step: global_step, epoch: epoch + 1, loss, val_loss: None });
                let tokens_per_s = rec.progress.tokens_per_s(global_step + 1);
                if tokens_per_s.is_finite() {
                    runner.write_scalars(global_step, &[("tokens_per_s", tokens_per_s as f32)])?;
                }
            }
            rec.progress.step(step, global_step + 1, loss);
            step += 1;
            global_step += 1;
            let position = if step == n_batches { [epoch as i64 + 1, 0] } else { [epoch as i64, step as i64] };
            if global_step >= max_steps {
                rec.evaluate(global_step, epoch + 1)?;
                rec.checkpoint(global_step, position)?;
                break 'epochs;
            }
            if stop_requested() {
                rec.checkpoint(global_step, position)?;
                rec.progress.finish();
                return Err(Interrupted { step: global_step, dir: dir.path.clone() }.into());
            }
            if let Some(e) = rec.progress.lost.take() {
                rec.checkpoint(global_step, position)?;
                let (closed, why) = (output::is_closed(&e), crate::text::error_line(&e));
                return Err(OutputLost { step: global_step, dir: dir.path.clone(), closed, why }.into());
            }
            if step == n_batches {
                break; // the epoch's end evaluates and checkpoints below
            }
            if s.eval_every.is_some_and(|n| global_step.is_multiple_of(n)) {
                rec.evaluate(global_step, epoch + 1)?;
            }
            if s.save_every.is_some_and(|n| global_step.is_multiple_of(n)) {
                rec.checkpoint(global_step, position)?;
            }
        }
        rec.evaluate(global_step, epoch + 1)?;
        rec.checkpoint(global_step, [epoch as i64 + 1, 0])?;
    }
    rec.progress.finish();
    Ok(TrainSummary {
        steps: global_step,
        last_loss: rec.last_loss,
        val_loss: rec.val_loss,
        seconds: start.elapsed().as_secs_f64(),
    })
}
