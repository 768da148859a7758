//! `minigpt graph`: a model's training graph as text.

use std::path::Path;

use anyhow::{Context, Result};

use super::build::build;
use super::{GraphOptions, Purpose};
use crate::model::ModelConfig;
use crate::optim::AdamConfig;
use crate::tfx;

/// `minigpt graph`: writes `<dir>/<arch>.pbtxt`, the text GraphDef of `model`'s training graph
/// (seed [`GRAPH_SEED`]).
pub fn write_text(model: &ModelConfig, dir: &Path) -> Result<std::path::PathBuf> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let arch = format!("{:?}", model.arch).to_lowercase();
    let path = dir.join(format!("{arch}.pbtxt"));
    crate::files::write_atomic(&path, text(model)?.as_bytes())?;
    Ok(path)
}

/// Seed of the graphs written to `graphs/`.
pub const GRAPH_SEED: i64 = 1337;

/// The text GraphDef of a model's training graph, as `minigpt graph` writes it.
pub fn text(model: &ModelConfig) -> Result<String> {
    let opts = GraphOptions {
        purpose: Purpose::Training { adam: AdamConfig::default(), summaries: false },
        ..GraphOptions::inference(GRAPH_SEED)
    };
    model.validate()?;
    let g = build(model, &opts, None, &[]).context("building the TensorFlow graph")?;
    let body = tfx::graph_text(&g.scope.graph())?;
    let arch = format!("{:?}", model.arch).to_lowercase();
    Ok(format!(
        "# The training graph of minigpt's {arch} model (vocab_size {}, n_embd {}, seed {GRAPH_SEED}).\n\
         # Written by `minigpt graph --model {arch} --out graphs/`; tests/graphs.rs checks it is current.\n{body}",
        model.vocab_size, model.n_embd,
    ))
}
