//! The training loop (the notebook's `for epoch ...: for step, (x, y) in enumerate(...)`), one
//! `Session::run` per step: new runs, `--resume`, `--init-from`; evaluation, checkpoints, metrics,
//! the plot and TensorBoard; progress output; Ctrl-C.

use std::fmt::Write as _;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use tensorflow::Tensor;

use crate::cli::SessionArgs;
use crate::checkpoint::{write_atomic, DataInfo, RunConfig, RunDir, TrainSettings};
use crate::data::{self, Batches, Corpus, Shuffle, Vocab};
use crate::device;
use crate::graph::{GraphOptions, ModelGraph, Runner};
use crate::model::ModelConfig;

/// A validated training configuration.
#[derive(Debug, Clone)]
pub struct TrainConfig {
    /// The model; `vocab_size` is set from the corpus.
    pub model: ModelConfig,
    pub settings: TrainSettings,
    /// Start from this SavedModel's weights and vocabulary.
    pub init_from: Option<std::path::PathBuf>,
    /// The vocabulary file for an `init_from` SavedModel that carries none.
    pub vocab: Option<std::path::PathBuf>,
    /// Threads and XLA: not saved with the run (threads change speed only; XLA may change rounding).
    pub session: SessionArgs,
    /// Print `Step N: Loss X` every this many steps of an epoch.
    pub log_every: u64,
    /// Validation batches per evaluation (`None`: every validation window).
    pub eval_batches: Option<usize>,
    pub quiet: bool,
}

/// Set by the first SIGINT or SIGTERM once [`stop_on_signals`] is called: the loop finishes its
/// step, checkpoints and returns [`Interrupted`].
fn stop_flag() -> &'static Arc<AtomicBool> {
    static FLAG: OnceLock<Arc<AtomicBool>> = OnceLock::new();
    FLAG.get_or_init(|| Arc::new(AtomicBool::new(false)))
}

/// Makes Ctrl-C and SIGTERM stop training cleanly at the end of the current step; a second one
/// exits at once (code 130).
pub fn stop_on_signals() -> Result<()> {
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register_conditional_shutdown(signal, 130, stop_flag().clone()).context("installing the signal handler")?;
        signal_hook::flag::register(signal, stop_flag().clone()).context("installing the signal handler")?;
    }
    Ok(())
}

fn stop_requested() -> bool {
    stop_flag().load(Ordering::Relaxed)
}

/// Training stopped by a signal after checkpointing; `minigpt` exits with code 130.
#[derive(Debug, thiserror::Error)]
#[error("interrupted at step {step}: checkpoint saved; continue with `minigpt train --resume --out {}`", dir.display())]
pub struct Interrupted {
    pub step: u64,
    pub dir: std::path::PathBuf,
}

/// What a finished run reports.
#[derive(Debug, Clone)]
pub struct TrainSummary {
    pub steps: u64,
    pub last_loss: f32,
    pub val_loss: f64,
    pub seconds: f64,
}

/// Windows per evaluation batch (the mean is over windows, so this only sets speed).
const EVAL_WINDOWS: usize = 512;

/// Trains a fresh model on `corpus`, writing the run to `out`.
pub fn train(cfg: &TrainConfig, corpus: &Corpus, out: &Path) -> Result<TrainSummary> {
    let s = &cfg.settings;
    let vocab = match &cfg.init_from {
        Some(dir) => crate::saved_model::vocabulary(dir, cfg.vocab.as_deref())?,
        None => Vocab::from_text(&corpus.text),
    };
    let encoded = vocab.encode(&corpus.text).context("the corpus does not fit the --init-from model's vocabulary")?;
    let (train_data, val_data) = data::split(&encoded);
    check_sizes(train_data, val_data, s.block_size, s.batch_size)?;

    let model = match &cfg.init_from {
        Some(dir) => crate::saved_model::model_config(dir, vocab.len() as u64)?,
        None => ModelConfig { vocab_size: vocab.len() as u64, ..cfg.model.clone() },
    };
    if let Some(context) = model.context_limit() {
        ensure!(
            s.block_size as u64 <= context,
            "--block-size {} exceeds the model's {context} positions (--init-from: give --block-size {context} or less)",
            s.block_size
        );
    }
    let runner = build_runner(&model, s, &cfg.session)?;
    runner.init()?;
    if !cfg.quiet {
        let params = crate::model::parameters(runner.g.model.as_ref());
        println!("model: {}, {} parameters, vocabulary of {}", format!("{:?}", model.arch).to_lowercase(), crate::info::thousands(params), vocab.len());
    }
    if let Some(dir) = &cfg.init_from {
        runner.set_weights(&crate::saved_model::import_weights(dir, &runner.g.model.variables())?)?;
    }
    let dir = RunDir::create(out)?;
    let _lock = dir.lock()?;
    let mut config = RunConfig {
        model,
        train: s.clone(),
        vocab: vocab.to_strings(),
        data: DataInfo { source: corpus.source.clone(), sha256: corpus.sha256.clone() },
        steps_done: 0,
        epochs_done: 0,
        best: None,
        minigpt_version: env!("CARGO_PKG_VERSION").to_string(),
    };
    dir.write_config(&config)?;
    let metrics = String::from("step,epoch,loss,val_loss\n");
    run_steps(&runner, &dir, &mut config, cfg, train_data, val_data, Position { epoch: 0, batch: 0, step: 0 }, metrics)
}

/// What `--resume` may change in a stopped run: how far it goes, and how it reports.
#[derive(Debug, Clone, Default)]
pub struct ResumeOptions {
    pub max_steps: Option<u64>,
    pub epochs: Option<u64>,
    pub session: SessionArgs,
    pub log_every: u64,
    pub eval_batches: Option<usize>,
    pub quiet: bool,
}

/// Continues the run in `out` from its newest usable checkpoint: the same weights, Adam state
/// and place in the data, so a resumed run computes what an uninterrupted one would, bit for bit.
pub fn resume(out: &Path, opts: &ResumeOptions) -> Result<TrainSummary> {
    let dir = RunDir::open(out)?;
    let _lock = dir.lock()?;
    let mut config = dir.read_config()?;
    if let Some(n) = opts.max_steps {
        config.train.max_steps = Some(n);
    }
    if let Some(n) = opts.epochs {
        config.train.epochs = n;
    }
    let corpus = data::load_corpus(&config.data.source)?;
    ensure!(
        corpus.sha256 == config.data.sha256,
        "the run was trained on {} with SHA-256 {}, which now has SHA-256 {}",
        config.data.source,
        config.data.sha256,
        corpus.sha256
    );
    let vocab = config.vocab()?;
    let encoded = vocab.encode(&corpus.text)?;
    let (train_data, val_data) = data::split(&encoded);
    let s = config.train.clone();
    check_sizes(train_data, val_data, s.block_size, s.batch_size)?;
    let runner = build_runner(&config.model, &s, &opts.session)?;
    let prefix = dir.restore_latest(&runner)?;
    let [epoch, batch] = runner
        .restore_position(crate::checkpoint::path_str(&prefix)?)
        .with_context(|| format!("{} cannot be resumed from", prefix.display()))?;
    let step: i64 = runner.read::<i64>(std::slice::from_ref(&runner.g.optimizer.iterations))?[0][0];
    let position = Position { epoch: epoch as u64, batch: batch as u64, step: step as u64 };
    // Metrics up to the checkpoint; later rows belong to the steps about to be redone.
    let metrics = std::fs::read_to_string(dir.metrics_path()).unwrap_or_default();
    let mut kept = String::from("step,epoch,loss,val_loss\n");
    for line in metrics.lines().skip(1) {
        if line.split(',').next().and_then(|f| f.parse::<u64>().ok()).is_some_and(|st| st < position.step || (st == position.step && !line.ends_with(','))) {
            kept.push_str(line);
            kept.push('\n');
        }
    }
    let cfg = TrainConfig {
        model: config.model.clone(),
        settings: s,
        session: opts.session,
        init_from: None,
        vocab: None,
        log_every: opts.log_every,
        eval_batches: opts.eval_batches,
        quiet: opts.quiet,
    };
    if !cfg.quiet {
        println!("resuming {} from {} (step {}, epoch {}, batch {})", out.display(), prefix.display(), position.step, epoch + 1, batch);
    }
    run_steps(&runner, &dir, &mut config, &cfg, train_data, val_data, position, kept)
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

fn build_runner(model: &ModelConfig, s: &TrainSettings, session: &SessionArgs) -> Result<Runner> {
    let (device, session_config) = device::placement(s.device)?;
    let opts = GraphOptions { adam: s.adam, device, summaries: true, ..GraphOptions::new(s.seed as i64) };
    Runner::new(ModelGraph::build(model, &opts)?, session.apply(session_config))
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
}

impl Progress {
    fn new(cfg: &TrainConfig, total_steps: u64, at: u64) -> Self {
        use std::io::IsTerminal;
        let s = &cfg.settings;
        let bar = (!cfg.quiet && std::io::stdout().is_terminal()).then(|| {
            let bar = indicatif::ProgressBar::with_draw_target(Some(total_steps), indicatif::ProgressDrawTarget::stdout());
            bar.set_style(
                indicatif::ProgressStyle::with_template("{prefix} [{bar:28}] step {pos}/{len} {msg} eta {eta}")
                    .expect("a valid template")
                    .progress_chars("=> "),
            );
            bar.set_position(at);
            bar
        });
        let tokens_per_step = (s.batch_size * s.block_size) as u64;
        Self { bar, quiet: cfg.quiet, log_every: cfg.log_every, smoothed: None, tokens_per_step, start: Instant::now(), start_step: at, epochs: s.epochs }
    }

    /// A line above the bar (or on stdout).
    fn line(&self, text: &str) {
        match &self.bar {
            Some(bar) => bar.println(text),
            None if !self.quiet => println!("{text}"),
            None => {}
        }
    }

    fn epoch(&self, epoch: u64) {
        match &self.bar {
            Some(bar) => bar.set_prefix(format!("epoch {}/{}", epoch + 1, self.epochs)),
            None => self.line(&format!("\nEpoch {}", epoch + 1)),
        }
    }

    /// After the step `step` of an epoch (global step `global_step` done) with loss `loss`.
    fn step(&mut self, step: u64, global_step: u64, loss: f32) {
        let smoothed = match self.smoothed {
            Some(s) => 0.98 * s + 0.02 * loss as f64,
            None => loss as f64,
        };
        self.smoothed = Some(smoothed);
        match &self.bar {
            Some(bar) => {
                bar.set_position(global_step);
                if global_step.is_multiple_of(10) {
                    let rate = (global_step - self.start_step) as f64 / self.start.elapsed().as_secs_f64().max(1e-9);
                    bar.set_message(format!("loss {smoothed:.4} · {rate:.0} steps/s · {:.0}k tokens/s", rate * self.tokens_per_step as f64 / 1e3));
                }
            }
            None if !self.quiet && step.is_multiple_of(self.log_every) => println!("Step {step}: Loss {loss:.4}"),
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
    cfg: &'a TrainConfig,
    val_data: &'a [i32],
    metrics: String,
    progress: Progress,
    last_loss: f32,
    val_loss: f64,
}

impl Recorder<'_> {
    /// Validation loss (the mean over --eval-batches random batches, or every window), logged,
    /// added to metrics.csv (`epoch`: the 1-based epoch of the step), TensorBoard and the plot;
    /// a new lowest one also saves `ckpt/best`.
    fn evaluate(&mut self, step: u64, epoch: u64) -> Result<()> {
        let s = &self.cfg.settings;
        self.val_loss = evaluate(self.runner, self.val_data, s.block_size, self.cfg.eval_batches.map(|n| (n, s.batch_size)), s.seed)?;
        self.progress.line(&format!("step {step}: train loss {:.4}, val loss {:.4}", self.last_loss, self.val_loss));
        writeln!(self.metrics, "{step},{epoch},{},{}", self.last_loss, self.val_loss)?;
        self.runner.write_scalars(step, &[("val_loss", self.val_loss as f32)])?;
        if self.config.best.is_none_or(|b| self.val_loss < b.val_loss) {
            self.dir.save_best(self.runner, [epoch as i64, 0])?;
            self.config.best = Some(crate::checkpoint::Best { val_loss: self.val_loss, step });
            self.dir.write_config(self.config)?;
        }
        self.write_metrics()
    }

    fn write_metrics(&self) -> Result<()> {
        write_atomic(&self.dir.metrics_path(), self.metrics.as_bytes())?;
        crate::plot::write_loss_plot(&self.metrics, &self.dir.path.join("loss.png"))
    }

    /// A checkpoint at `step`, whose data position is `position` (epoch, batches done in it),
    /// with metrics and config brought up to date.
    fn checkpoint(&mut self, step: u64, position: [i64; 2]) -> Result<()> {
        self.dir.save_checkpoint(self.runner, step, position, self.cfg.settings.keep)?;
        self.runner.write_scalars(step, &[])?; // flushes the event file
        self.write_metrics()?;
        self.config.steps_done = step;
        self.config.epochs_done = position[0] as u64;
        self.dir.write_config(self.config)
    }
}

/// The notebook's loop from `at` on, with evaluation and checkpoints.
#[allow(clippy::too_many_arguments)]
fn run_steps(
    runner: &Runner,
    dir: &RunDir,
    config: &mut RunConfig,
    cfg: &TrainConfig,
    train_data: &[i32],
    val_data: &[i32],
    at: Position,
    metrics: String,
) -> Result<TrainSummary> {
    let s = &cfg.settings;
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
    let progress = Progress::new(cfg, max_steps.min(s.epochs.saturating_mul(n_batches)), at.step);
    let mut rec = Recorder { runner, dir, config, cfg, val_data, metrics, progress, last_loss: f32::NAN, val_loss: f64::NAN };
    let mut global_step = at.step;
    runner.open_events(&dir.path.join("events"))?;

    'epochs: for epoch in at.epoch..s.epochs {
        rec.progress.epoch(epoch);
        let mut batches = Batches::new(train_data, s.block_size, s.batch_size, s.shuffle, s.seed, epoch);
        let mut step = if epoch == at.epoch { at.batch } else { 0 };
        batches.skip(step as usize);
        while batches.fill(&mut x, &mut y) {
            let logged = step.is_multiple_of(cfg.log_every);
            let loss: f32 = if logged { runner.train_step_logged(&x, &y, global_step)? } else { runner.train_step(&x, &y)? };
            if !loss.is_finite() {
                // The loss of step g is that of the weights saved as ckpt-g, if any: not good ones.
                dir.discard_checkpoint(global_step)?;
                let last = dir.checkpoints().ok().and_then(|c| c.into_iter().next());
                let kept = last.map_or("no good checkpoint is left".to_string(), |p| format!("the newest checkpoint is still {}", p.display()));
                bail!("training stopped: the loss became {loss} at step {global_step} (try a lower --lr); {kept}");
            }
            rec.last_loss = loss;
            if logged {
                writeln!(rec.metrics, "{global_step},{},{loss},", epoch + 1)?;
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
    Ok(TrainSummary { steps: global_step, last_loss: rec.last_loss, val_loss: rec.val_loss, seconds: start.elapsed().as_secs_f64() })
}

/// Mean cross-entropy (nats per character) over every window of `data`, or over `n` random
/// batches of `batch_size` windows when `sample` is `Some((n, batch_size))`.
pub fn evaluate(runner: &Runner, data: &[i32], block_size: usize, sample: Option<(usize, usize)>, seed: u64) -> Result<f64> {
    evaluate_with(|x, y| runner.loss(x, y), data, block_size, sample, seed)
}

/// [`evaluate`] with any batch loss (e.g. a loaded SavedModel's).
pub fn evaluate_with(
    loss: impl Fn(&Tensor<i32>, &Tensor<i32>) -> Result<f32>,
    data: &[i32],
    block_size: usize,
    sample: Option<(usize, usize)>,
    seed: u64,
) -> Result<f64> {
    let n_windows = data::num_windows(data.len(), block_size);
    ensure!(n_windows > 0, "no window of {} + 1 characters fits in {} characters", block_size, data.len());
    let starts: Vec<usize> = match sample {
        None => (0..n_windows).collect(),
        Some((n, batch_size)) => {
            data::WindowOrder::new(n_windows, Shuffle::Global, seed, u64::MAX).take(n * batch_size).collect()
        }
    };
    let t = block_size;
    let mut total = 0.0f64;
    for chunk in starts.chunks(EVAL_WINDOWS) {
        let mut x = Tensor::<i32>::new(&[chunk.len() as u64, t as u64]);
        let mut y = Tensor::<i32>::new(&[chunk.len() as u64, t as u64]);
        for (row, &start) in chunk.iter().enumerate() {
            x[row * t..(row + 1) * t].copy_from_slice(&data[start..start + t]);
            y[row * t..(row + 1) * t].copy_from_slice(&data[start + 1..start + t + 1]);
        }
        total += loss(&x, &y)? as f64 * chunk.len() as f64;
    }
    Ok(total / starts.len() as f64)
}

/// Builds the runner of an existing run and restores its latest checkpoint.
pub fn load_run(dir: &RunDir, opts: GraphOptions, device: device::DeviceChoice, session: &SessionArgs) -> Result<(RunConfig, Runner)> {
    let config = dir.read_config()?;
    let (device, session_config) = device::placement(device)?;
    let session_config = session.apply(session_config);
    let opts = GraphOptions { adam: config.train.adam, device, ..opts };
    let runner = Runner::new(ModelGraph::build(&config.model, &opts)?, session_config)?;
    dir.restore_latest(&runner)?;
    Ok((config, runner))
}
