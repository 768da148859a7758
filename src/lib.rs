//! minigpt: a TensorFlow-native Rust port of a notebook that trains a character-level GPT-style
//! model on Tiny Shakespeare and samples from it. Rust builds the graph through the TensorFlow C
//! API, computes gradients in the graph, applies Adam, feeds batches, and samples with
//! TensorFlow's `Multinomial` op.

pub mod checkpoint;
pub mod cli;
pub mod data;
pub mod device;
pub mod graph;
pub mod info;
pub mod model;
pub mod optim;
pub mod parity;
pub mod plot;
pub mod sample;
pub mod saved_model;
pub mod summary;
pub mod tfx;
pub mod train;

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// Seed of the graphs written to `graphs/`.
pub const GRAPH_SEED: i64 = 1337;

/// The text GraphDef of a model's training graph, as `minigpt graph` writes it.
pub fn graph_text(model: &model::ModelConfig) -> Result<String> {
    let g = graph::ModelGraph::build(model, &graph::GraphOptions::new(GRAPH_SEED))?;
    let body = tfx::graph_text(&g.graph())?;
    Ok(format!(
        "# The training graph of minigpt's {:?} model (vocab_size {}, n_embd {}, seed {}).\n# Written by `minigpt graph --model {} --out graphs/`; tests/graphs.rs checks it is current.\n{body}",
        model.arch,
        model.vocab_size,
        model.n_embd,
        GRAPH_SEED,
        format!("{:?}", model.arch).to_lowercase(),
    ))
}

/// Writes `<dir>/<arch>.pbtxt`.
pub fn write_graph(model: &model::ModelConfig, dir: &Path) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join(format!("{}.pbtxt", format!("{:?}", model.arch).to_lowercase()));
    checkpoint::write_atomic(&path, graph_text(model)?.as_bytes())?;
    Ok(path)
}
