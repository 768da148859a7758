//! Model configuration and graph builders, one file per architecture.

pub mod bigram;
pub mod layers;

use anyhow::{ensure, Result};
use serde::{Deserialize, Serialize};
use tensorflow::{DataType, Output, Scope};

use crate::tfx::Var;

/// An embedding lookup made by a forward pass: `rows = table[ids]`.
#[derive(Debug, Clone)]
pub struct Lookup {
    /// The looked-up variable's name.
    pub var: String,
    /// [...] int32
    pub ids: Output,
    /// [..., C]
    pub rows: Output,
}

/// A forward pass: the logits and the embedding lookups on the way (Keras' gradients of
/// embeddings are per-lookup `IndexedSlices`, which its Adam treats differently; see `optim`).
pub struct Forward {
    /// [B, T, V]
    pub logits: Output,
    pub lookups: Vec<Lookup>,
}

/// What every architecture offers the trainer and the sampler.
pub trait LanguageModel {
    /// tokens: [B, T] int32 -> logits [B, T, V]
    fn forward(&self, tokens: Output, scope: &mut Scope) -> tensorflow::Result<Forward>;
    /// Trainable variables, in a fixed order (optimizer, initialisation, checkpoints).
    fn variables(&self) -> Vec<Var>;
    /// How many trailing tokens the next token's logits depend on (`None`: all of them).
    fn context_size(&self) -> Option<usize>;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    /// The notebook's MiniGPT: Embedding -> Dense.
    Bigram,
}

/// Everything needed to rebuild a model's graph; saved with every run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub arch: Arch,
    /// Characters in the vocabulary.
    pub vocab_size: u64,
    /// Embedding width (the notebook's `embedding_dim`, 128).
    pub n_embd: u64,
}

impl ModelConfig {
    pub fn validate(&self) -> Result<()> {
        ensure!(self.vocab_size > 0, "vocab_size must be positive");
        ensure!(self.n_embd > 0, "the embedding dimension must be positive");
        Ok(())
    }

    /// Builds the model's variables in `scope`; `seed` fixes their initial values.
    pub fn build(&self, dtype: DataType, seed: i64, scope: &mut Scope) -> tensorflow::Result<Box<dyn LanguageModel>> {
        Ok(match self.arch {
            Arch::Bigram => Box::new(bigram::Bigram::new(self.vocab_size, self.n_embd, dtype, seed, scope)?),
        })
    }
}
