//! Graphs by purpose, and the [`Runner`] that owns one with its session.
//!
//! An inference graph (`generate`, `eval`, serving) holds the model's forward pass, the loss, the
//! next-character logits with their attention caches, and, for the bigram, the in-graph sampling
//! loop. A training graph adds the loss's gradients (the `GradientTape` equivalent), Adam,
//! TensorBoard summaries and the checkpoint's save ops. Both can initialise, set, read and
//! restore the model's weights.
//!
//! The parts, each in its file: `build.rs` builds a graph for its purpose (forward pass, loss,
//! next-character ops, the sampling loop, the training ops); `gradients.rs` the loss's gradients
//! and the per-lookup squares of embedding tables that Keras' Adam uses; `replicas.rs` the train
//! step replicated on a cluster's workers; `checkpoint.rs` the save and restore ops; `runner.rs`
//! the [`Runner`], which runs a built graph in its session; `decoder.rs` the cached decoding
//! step `minigpt serve` runs for many streams at once; `text.rs` the text graphs of
//! `minigpt graph`.

mod build;
mod checkpoint;
mod decoder;
mod gradients;
mod replicas;
mod runner;
mod text;

pub use decoder::{Decoder, Part};
pub use runner::{Runner, ServingTensors};
pub use text::{text, write_text, GRAPH_SEED};

use tensorflow::DataType;

use crate::optim::AdamConfig;
use crate::sampler::SamplerConfig;

/// The checkpoint key of the input pipeline's position.
pub const POSITION_KEY: &str = "data/position";

/// What a graph is for.
#[derive(Debug, Clone)]
pub enum Purpose {
    /// Forward pass, loss and next-character logits; with a sampler, the bigram's in-graph loop.
    Inference { chain: Option<SamplerConfig> },
    /// Adds gradients, the optimizer, checkpoint saving and (if asked) TensorBoard summaries.
    Training { adam: AdamConfig, summaries: bool },
}

/// How to build a graph.
#[derive(Debug, Clone)]
pub struct GraphOptions {
    /// Float or Double (the gradient checks).
    pub dtype: DataType,
    /// Graph seed: fixes the initial weights and dropout's masks.
    pub seed: i64,
    pub purpose: Purpose,
}

impl GraphOptions {
    pub fn inference(seed: i64) -> Self {
        Self { dtype: DataType::Float, seed, purpose: Purpose::Inference { chain: None } }
    }

    /// An inference graph with the in-graph sampling loop (models whose next character depends
    /// on the last one only).
    pub fn sampling(sampler: SamplerConfig) -> Self {
        Self { dtype: DataType::Float, seed: sampler.seed, purpose: Purpose::Inference { chain: Some(sampler) } }
    }

    pub fn training(seed: i64, adam: AdamConfig) -> Self {
        Self { dtype: DataType::Float, seed, purpose: Purpose::Training { adam, summaries: false } }
    }
}
