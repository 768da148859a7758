//! Evaluation: the mean cross-entropy over every window of a split (or an estimate from a fixed
//! set of random batches), and `minigpt eval`.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use tensorflow::Tensor;

use crate::data::{self, Shuffle, WindowOrder};
use crate::saved_model::{OpenOptions, Source};
use crate::text::thousands;

/// Windows per evaluation batch (the mean is over windows, so this only sets speed).
const EVAL_WINDOWS: usize = 512;

/// Which splits `minigpt eval` reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Split {
    Val,
    All,
}

/// What `minigpt eval` does, validated.
#[derive(Debug, Clone)]
pub struct EvalConfig {
    pub run: PathBuf,
    /// The corpus (default: the run's own, or `--data`'s default for a SavedModel).
    pub data: Option<String>,
    pub split: Split,
    /// Estimate from this many random batches instead of every window.
    pub eval_batches: Option<usize>,
    pub open: OpenOptions,
}

/// Mean cross-entropy (nats per character) of `loss`, a batch's mean loss, over every window of
/// `data`, or over `n` random batches of `batch_size` windows when `sample` is
/// `Some((n, batch_size))` (the same batches for the same `seed`). With `progress` (the split's
/// name), an evaluation of more than [`LONG_EVALUATION`] windows says so on stderr when it starts
/// and how far it is every [`PROGRESS_EVERY`].
pub fn evaluate(
    loss: impl Fn(&Tensor<i32>, &Tensor<i32>) -> Result<f32>,
    data: &[i32],
    block_size: usize,
    sample: Option<(usize, usize)>,
    seed: u64,
    progress: Option<&str>,
) -> Result<f64> {
    let n_windows = data::num_windows(data.len(), block_size);
    ensure!(n_windows > 0, "no window of {} + 1 characters fits in {} characters", block_size, data.len());
    // Window starts, made as they are used: every window of a split is as many as its characters.
    let (mut starts, total): (Box<dyn Iterator<Item = usize>>, usize) = match sample {
        None => (Box::new(0..n_windows), n_windows),
        Some((n, batch_size)) => {
            let order = WindowOrder::new(n_windows, Shuffle::Global, seed, u64::MAX);
            let count = n.saturating_mul(batch_size).min(n_windows);
            (Box::new(order.take(count)), count)
        }
    };
    let progress = progress.filter(|_| total > LONG_EVALUATION);
    if let Some(name) = progress {
        eprintln!("evaluating {} {name} windows (--eval-batches N evaluates N batches)", thousands(total as u64));
    }
    let (t, start) = (block_size, Instant::now());
    let mut reported = Duration::ZERO;
    let (mut sum, mut done) = (0.0f64, 0usize);
    let mut chunk = Vec::with_capacity(EVAL_WINDOWS);
    loop {
        chunk.clear();
        chunk.extend(starts.by_ref().take(EVAL_WINDOWS));
        if chunk.is_empty() {
            break;
        }
        let mut x = Tensor::<i32>::new(&[chunk.len() as u64, t as u64]);
        let mut y = Tensor::<i32>::new(&[chunk.len() as u64, t as u64]);
        for (row, &start) in chunk.iter().enumerate() {
            x[row * t..(row + 1) * t].copy_from_slice(&data[start..start + t]);
            y[row * t..(row + 1) * t].copy_from_slice(&data[start + 1..start + t + 1]);
        }
        sum += loss(&x, &y)? as f64 * chunk.len() as f64;
        done += chunk.len();
        if let Some(name) = progress {
            if start.elapsed() >= reported + PROGRESS_EVERY {
                reported = start.elapsed();
                eprintln!(
                    "evaluating {name}: {} of {} windows ({:.0}%), {} s",
                    thousands(done as u64),
                    thousands(total as u64),
                    100.0 * done as f64 / total as f64,
                    reported.as_secs()
                );
            }
        }
    }
    Ok(sum / done as f64)
}

/// Evaluations of more windows than this say how far they are.
pub const LONG_EVALUATION: usize = 1_000_000;

/// How often a long evaluation says how far it is.
const PROGRESS_EVERY: Duration = Duration::from_secs(10);

/// `minigpt eval`: `val_loss` and `val_perplexity` (and the training split's with `--split all`).
pub fn run(cfg: &EvalConfig) -> Result<()> {
    let source = Source::open(&cfg.run, &cfg.open)?;
    let vocab = source.vocab()?;
    let corpus = data::load_corpus(&cfg.data.clone().unwrap_or_else(|| source.data_source()))?;
    if let Source::Run { config, .. } = &source {
        if corpus.sha256 != config.data.sha256 {
            eprintln!(
                "note: evaluating on {} (SHA-256 {}), not the text the run was trained on: {} (SHA-256 {})",
                corpus.source, corpus.sha256, config.data.source, config.data.sha256
            );
        }
    }
    let encoded = vocab.encode(&corpus.text).context("the corpus does not fit the model's vocabulary")?;
    let (train_data, val_data) = data::split(&encoded);
    let sample = cfg.eval_batches.map(|n| (n, source.batch_size()));
    let splits = match cfg.split {
        Split::Val => vec![("val", val_data)],
        Split::All => vec![("val", val_data), ("train", train_data)],
    };
    for (name, split) in splits {
        let loss = evaluate(|x, y| source.loss(x, y), split, source.block_size(), sample, 0, Some(name))?;
        crate::output::line(format_args!("{name}_loss: {loss:.6}\n{name}_perplexity: {:.6}", loss.exp()))?;
    }
    Ok(())
}
