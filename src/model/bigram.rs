//! The notebook's `MiniGPT`: `Embedding(vocab, n_embd)` → `Dense(vocab)`. Each position's logits
//! depend on its own token only, so it is a bigram model.

use tensorflow::{ops, DataType, Output, Scope};

use super::layers::{Dense, Embedding};
use super::{Forward, LanguageModel};
use crate::tfx::{self, Var};

pub struct Bigram {
    pub embedding: Embedding, // embedding/embeddings [V, C]
    pub dense: Dense,         // dense/kernel [C, V], dense/bias [V]
    vocab_size: u64,
    n_embd: u64,
}

impl Bigram {
    pub fn new(
        vocab_size: u64,
        n_embd: u64,
        dtype: (DataType, DataType),
        seed: i64,
        scope: &mut Scope,
    ) -> tensorflow::Result<Self> {
        let embedding = Embedding::new("embedding", vocab_size, n_embd, dtype, (seed, 1), scope)?;
        let dense = Dense::new("dense", n_embd, vocab_size, dtype, (seed, 2), scope)?;
        Ok(Self { embedding, dense, vocab_size, n_embd })
    }
}

impl LanguageModel for Bigram {
    /// tokens: [B, T] int32 -> logits [B, T, V]
    fn forward(
        &self,
        tokens: Output,
        _dropout: Option<&super::Dropout>,
        scope: &mut Scope,
    ) -> tensorflow::Result<Forward> {
        let scope = &mut scope.new_sub_scope("mini_gpt");
        let lookup = self.embedding.apply(tokens.clone(), scope)?;
        let x = lookup.out.clone(); // [B, T, C]
        let flat = tfx::shape_const(&[-1, self.n_embd as i64], scope)?;
        let x = ops::reshape(x, flat, scope)?; // [B*T, C]
        let logits = self.dense.apply(x.into(), scope)?; // [B*T, V]
        let logits = tfx::cast(logits, self.embedding.embeddings.dtype, scope)?; // float32 for the loss
        let bt = ops::shape(tokens, scope)?; // [2] = (B, T)
        let v = tfx::shape_const(&[self.vocab_size as i64], scope)?;
        let shape = tfx::concat(&[bt.into(), v], 0, scope)?; // (B, T, V)
        Ok(Forward { logits: ops::reshape(logits, shape, scope)?.into(), lookups: vec![lookup] })
    }

    fn variables(&self) -> Vec<Var> {
        vec![self.embedding.embeddings.clone(), self.dense.kernel.clone(), self.dense.bias.clone()]
    }

    fn context_size(&self) -> Option<usize> {
        Some(1)
    }
}
