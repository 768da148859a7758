//! Generation, the notebook's loop (run the model, take the last position's logits, sample with
//! `tf.random.categorical`, append), written once over the [`NextLogits`] seam that run
//! directories and SavedModels both implement; and `minigpt generate`.
//!
//! The context is cropped to the model's block. A run's sampling graph draws the whole text in
//! one `Session::run` (an in-graph `While` loop over the same ops, with the same random stream):
//! the bigram reads a row of its logits table per character, the GPT runs one pass over its
//! window of `block_size` characters. Without that loop, a model with attention caches (the GPT)
//! continues from the keys and values of earlier positions while the context fits the block;
//! once it is longer, the window slides, every position moves, and each character costs one
//! pass over the last `block_size` characters (what cropping computes, exactly).

use std::path::PathBuf;

use anyhow::{ensure, Context, Result};

use crate::output;
use crate::sampler::{Cache, NextLogits, Sampler, SamplerConfig};
use crate::saved_model::{OpenOptions, Source};

/// Characters the in-graph loop draws per run.
const CHUNK: usize = 256;

/// How to continue a prompt.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Generation {
    pub chars: usize,
    pub sampler: SamplerConfig,
    /// One `Session::run` per character over the whole (cropped) context, the notebook's way,
    /// instead of the attention caches or the in-graph loop: the same text, slower.
    pub stepwise: bool,
}

/// What `minigpt generate` does, validated.
#[derive(Debug, Clone)]
pub struct GenerateConfig {
    pub run: PathBuf,
    pub prompt: String,
    pub generation: Generation,
    pub open: OpenOptions,
}

/// Draws `how.chars` ids after `prompt`, calling `emit` with each as soon as it is drawn (all at
/// once when the whole loop runs in the graph).
pub fn generate(
    model: &dyn NextLogits,
    prompt: &[i32],
    how: &Generation,
    mut emit: impl FnMut(i32) -> Result<()>,
) -> Result<Vec<i32>> {
    ensure!(!prompt.is_empty(), "the prompt is empty: give at least one character");
    let s = &how.sampler;
    s.validate()?;
    if !how.stepwise && model.chain(prompt, 0, s)?.is_some() {
        // The in-graph loop, a chunk of characters per run: each is emitted as its chunk ends,
        // and a chunk's cost does not grow with the text (the loop's own output grows per run).
        // The loop's Multinomial keeps its random stream from run to run, as one run would.
        let mut ids: Vec<i32> = prompt.to_vec();
        while ids.len() - prompt.len() < how.chars {
            let count = CHUNK.min(how.chars - (ids.len() - prompt.len()));
            let context = &ids[ids.len().saturating_sub(model.context_size().unwrap_or(1))..];
            let drawn = model.chain(context, count, s)?.context("the sampling loop went away")?;
            for &id in &drawn {
                ensure!(id >= 0, broken(ids.len() - prompt.len() + 1));
                emit(id)?;
                ids.push(id);
            }
        }
        return Ok(ids.split_off(prompt.len()));
    }
    let sampler = Sampler::new(s)?;
    let mut ids = prompt.to_vec();
    let mut cache = Cache::default();
    let mut start = 0;
    for _ in 0..how.chars {
        let window_start = model.context_size().map_or(0, |block| ids.len().saturating_sub(block));
        if window_start != start || how.stepwise {
            start = window_start;
            cache.clear();
        }
        let logits = model.next_logits(&ids[start..], &mut cache)?;
        ensure!(logits.iter().all(|v| v.is_finite()), broken(ids.len() - prompt.len() + 1));
        let id = sampler.draw(&logits)?;
        ids.push(id);
        emit(id)?;
    }
    Ok(ids.split_off(prompt.len()))
}

/// The error of a model whose logits are not numbers at the `n`th character drawn.
fn broken(n: usize) -> String {
    format!("the model's logits are NaN or infinite at generated character {n}: its weights are broken")
}

/// `minigpt generate`: the prompt, then each character as it is drawn.
pub fn run(cfg: &GenerateConfig) -> Result<()> {
    let source = Source::open(&cfg.run, &OpenOptions { sampler: Some(cfg.generation.sampler), ..cfg.open.clone() })?;
    let vocab = source.vocab()?;
    let prompt = vocab.encode(&cfg.prompt).context("the prompt cannot be encoded")?;
    ensure!(!prompt.is_empty(), "the prompt is empty: give at least one character");
    // Written as drawn (flushed at each line and each chunk of the in-graph loop): an interrupted
    // run keeps what it drew.
    output::write(&cfg.prompt)?;
    let mut drawn = 0;
    let generated = generate(source.next_logits(), &prompt, &cfg.generation, |id| {
        drawn += 1;
        output::put(vocab.decode(&[id]))?;
        if drawn % CHUNK == 0 {
            output::write("")?;
        }
        Ok(())
    });
    if let Err(e) = generated {
        // What was drawn stays printed, on a line of its own.
        let _ = output::line("");
        return Err(e.context(format!("generating from {}", cfg.run.display())));
    }
    output::line("")
}
