//! Evaluation: the mean cross-entropy over every window of a split (or an estimate from a fixed
//! set of random batches), and `minigpt eval`.

use std::path::PathBuf;

use anyhow::{ensure, Context, Result};
use tensorflow::Tensor;

use crate::data::{self, Shuffle, WindowOrder};
use crate::saved_model::{OpenOptions, Source};

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
/// `Some((n, batch_size))` (the same batches for the same `seed`).
pub fn evaluate(
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
            WindowOrder::new(n_windows, Shuffle::Global, seed, u64::MAX).take(n * batch_size).collect()
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
        let loss = evaluate(|x, y| source.loss(x, y), split, source.block_size(), sample, 0)?;
        crate::output::line(format_args!("{name}_loss: {loss:.6}\n{name}_perplexity: {:.6}", loss.exp()))?;
    }
    Ok(())
}
