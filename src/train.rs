//! The training loop (the notebook's `for epoch ...: for step, (x, y) in enumerate(...)`), one
//! `Session::run` per step, and evaluation.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::Path;
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
    /// Threads and XLA: not saved with the run (threads change speed only; XLA may change rounding).
    pub session: SessionArgs,
    /// Print `Step N: Loss X` every this many steps of an epoch.
    pub log_every: u64,
    /// Validation batches at each epoch's end (`None`: every validation window).
    pub eval_batches: Option<usize>,
    pub quiet: bool,
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
    let vocab = Vocab::from_text(&corpus.text);
    let encoded = vocab.encode(&corpus.text)?;
    let (train_data, val_data) = data::split(&encoded);
    let n_batches = Batches::len(train_data.len(), s.block_size, s.batch_size);
    ensure!(
        n_batches > 0,
        "the corpus is too short: its {} training characters give {} windows of {} + 1, fewer than one batch of {}",
        train_data.len(),
        data::num_windows(train_data.len(), s.block_size),
        s.block_size,
        s.batch_size
    );
    ensure!(
        data::num_windows(val_data.len(), s.block_size) > 0,
        "the corpus is too short: its {} validation characters hold no window of {} + 1",
        val_data.len(),
        s.block_size
    );

    let model = ModelConfig { vocab_size: vocab.len() as u64, ..cfg.model.clone() };
    let (device, session_config) = device::placement(s.device)?;
    let session_config = cfg.session.apply(session_config);
    let opts = GraphOptions { adam: s.adam, device, ..GraphOptions::new(s.seed as i64) };
    let runner = Runner::new(ModelGraph::build(&model, &opts)?, session_config)?;
    runner.init()?;

    let dir = RunDir::create(out)?;
    let mut config = RunConfig {
        model,
        train: s.clone(),
        vocab: vocab.to_strings(),
        data: DataInfo { source: corpus.source.clone(), sha256: corpus.sha256.clone() },
        steps_done: 0,
        epochs_done: 0,
        minigpt_version: env!("CARGO_PKG_VERSION").to_string(),
    };
    dir.write_config(&config)?;

    let (b, t) = (s.batch_size as u64, s.block_size as u64);
    let mut x = Tensor::<i32>::new(&[b, t]);
    let mut y = Tensor::<i32>::new(&[b, t]);
    let mut metrics = String::from("step,epoch,loss,val_loss\n");
    let max_steps = s.max_steps.unwrap_or(u64::MAX);
    let mut global_step = 0u64;
    let mut last_loss = f32::NAN;
    let mut val_loss = f64::NAN;
    let start = Instant::now();
    let mut stdout = std::io::stdout();

    'epochs: for epoch in 0..s.epochs {
        if global_step >= max_steps {
            break;
        }
        if !cfg.quiet {
            writeln!(stdout, "\nEpoch {}", epoch + 1)?;
        }
        let mut batches = Batches::new(train_data, s.block_size, s.batch_size, s.shuffle, s.seed, epoch);
        let mut step = 0u64;
        while batches.fill(&mut x, &mut y) {
            let loss: f32 = runner.train_step(&x, &y)?;
            if !loss.is_finite() {
                bail!("the loss became {loss} at step {global_step}; the last checkpoint is left as it was");
            }
            last_loss = loss;
            if step.is_multiple_of(cfg.log_every) {
                if !cfg.quiet {
                    writeln!(stdout, "Step {step}: Loss {loss:.4}")?;
                }
                writeln!(metrics, "{global_step},{},{loss},", epoch + 1)?;
            }
            step += 1;
            global_step += 1;
            if global_step >= max_steps {
                let epoch_done = step as usize == n_batches;
                finish_epoch(&runner, &dir, &mut config, cfg, val_data, global_step, epoch + epoch_done as u64, &mut metrics, &mut val_loss, last_loss)?;
                break 'epochs;
            }
        }
        finish_epoch(&runner, &dir, &mut config, cfg, val_data, global_step, epoch + 1, &mut metrics, &mut val_loss, last_loss)?;
    }
    Ok(TrainSummary { steps: global_step, last_loss, val_loss, seconds: start.elapsed().as_secs_f64() })
}

/// Validation loss, a checkpoint, metrics and config at the end of an epoch (or of the run).
#[allow(clippy::too_many_arguments)]
fn finish_epoch(
    runner: &Runner,
    dir: &RunDir,
    config: &mut RunConfig,
    cfg: &TrainConfig,
    val_data: &[i32],
    step: u64,
    epochs_done: u64,
    metrics: &mut String,
    val_loss: &mut f64,
    last_loss: f32,
) -> Result<()> {
    let s = &cfg.settings;
    *val_loss = evaluate(runner, val_data, s.block_size, cfg.eval_batches.map(|n| (n, s.batch_size)), s.seed)?;
    if !cfg.quiet {
        println!("step {step}: train loss {last_loss:.4}, val loss {:.4}", *val_loss);
    }
    writeln!(metrics, "{step},{epochs_done},{last_loss},{}", *val_loss)?;
    dir.save_checkpoint(runner, step)?;
    write_atomic(&dir.metrics_path(), metrics.as_bytes())?;
    config.steps_done = step;
    config.epochs_done = epochs_done;
    dir.write_config(config)
}

/// Mean cross-entropy (nats per character) over every window of `data`, or over `n` random
/// batches of `batch_size` windows when `sample` is `Some((n, batch_size))`.
pub fn evaluate(runner: &Runner, data: &[i32], block_size: usize, sample: Option<(usize, usize)>, seed: u64) -> Result<f64> {
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
        let loss: f32 = runner.loss(&x, &y)?;
        total += loss as f64 * chunk.len() as f64;
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
    let prefix = dir.latest_checkpoint()?;
    runner
        .restore(crate::checkpoint::path_str(&prefix)?)
        .with_context(|| format!("{} holds a damaged checkpoint", dir.path.display()))?;
    Ok((config, runner))
}
