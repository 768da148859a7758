//! Model configuration and graph builders, one file per architecture.

pub mod bigram;
pub mod gpt;
pub mod layers;

use anyhow::{ensure, Result};
use serde::{Deserialize, Serialize};
use tensorflow::{ops, DataType, Output, Scope};

pub use crate::precision::Precision;
use crate::text::thousands;
use crate::tfx::Var;

/// An embedding lookup made by a forward pass: `rows = table[ids]`.
#[derive(Debug, Clone)]
pub struct Lookup {
    /// The looked-up variable's name.
    pub var: String,
    /// [...] int32
    pub ids: Output,
    /// [..., C] as gathered, in the variable's dtype (the rows gradients are taken at)
    pub rows: Output,
    /// [..., C] in the compute dtype: what the layer hands on
    pub out: Output,
}

/// A forward pass: the logits and the embedding lookups on the way (Keras' gradients of
/// embeddings are per-lookup `IndexedSlices`, which its Adam treats differently; see `optim`).
pub struct Forward {
    /// [B, T, V]
    pub logits: Output,
    pub lookups: Vec<Lookup>,
}

/// Dropout in a train step. Its masks come from a stateless generator keyed by the graph seed,
/// the optimizer step and the site, so a step draws the same masks when it is run again (a
/// resumed run, a finite-difference check).
#[derive(Debug, Clone)]
pub struct Dropout {
    /// bool scalar: true in train steps; false leaves every activation untouched.
    pub training: Output,
    /// int64 scalar: the optimizer step.
    pub step: Output,
    pub seed: i64,
}

/// What every architecture offers the trainer and the sampler.
pub trait LanguageModel {
    /// tokens: [B, T] int32 -> logits [B, T, V]; `dropout` where the model has any.
    fn forward(&self, tokens: Output, dropout: Option<&Dropout>, scope: &mut Scope) -> tensorflow::Result<Forward>;
    /// Trainable variables, in a fixed order (optimizer, initialisation, checkpoints).
    fn variables(&self) -> Vec<Var>;
    /// How many trailing tokens the next token's logits depend on (`None`: all of them).
    fn context_size(&self) -> Option<usize>;
    /// tokens [B, T] int32 -> logits [B, V] of position `at` (int32 scalar) alone: what the
    /// sampling loop needs of a window.
    fn logits_at(&self, tokens: Output, at: Output, scope: &mut Scope) -> tensorflow::Result<Output> {
        let logits = self.forward(tokens, None, scope)?.logits; // [B, T, V]
        Ok(ops::gather_v2(logits, at, ops::constant(1i32, scope)?, scope)?.into())
    }
    /// The attention caches of [`LanguageModel::forward_cached`], for models that keep them.
    fn cache(&self) -> Option<CacheSpec> {
        None
    }
    /// The forward pass continuing from cached attention keys and values: tokens [B, T] at
    /// positions P.. after `past` (the [`CacheSpec`]'s tensors, each [B, H, P, D]) -> logits
    /// [B, T, V] and the caches of all P + T positions. Each new position costs one position's
    /// work, not a pass over the whole context.
    fn forward_cached(
        &self,
        _tokens: Output,
        _past: &[Output],
        _scope: &mut Scope,
    ) -> tensorflow::Result<(Output, Vec<Output>)> {
        Err(tensorflow::Status::new_set_lossy(tensorflow::Code::Unimplemented, "this model keeps no attention cache"))
    }
    /// One step of decoding for many streams at once ([`Rows`]), each stream's keys and values
    /// kept between steps in a slot of `slots` variables the step makes (its caches, zero at
    /// first): the logits [M, V] of the `rows.last` rows. `None`: the model keeps no caches.
    fn decode_rows(&self, _rows: &Rows, _slots: u64, _scope: &mut Scope) -> tensorflow::Result<Option<Decoded>> {
        Ok(None)
    }
}

/// The rows of a decoding step: each a token of some stream at its position in that stream's
/// window, the stream's keys and values in slot `slots[i]`. A stream's rows in one step are
/// consecutive positions (a prompt) or one (the character drawn last); each row sees the
/// positions up to its own of its slot, its step's rows included; the slot's later positions
/// must hold finite numbers (zeros, or what the same stream wrote there).
pub struct Rows {
    /// [N] int32
    pub tokens: Output,
    /// [N] int32, each below the model's context
    pub positions: Output,
    /// [N] int32
    pub slots: Output,
    /// [M] int32: the rows whose logits are wanted (each stream's last).
    pub last: Output,
}

/// What [`LanguageModel::decode_rows`] builds.
pub struct Decoded {
    /// [M, V]
    pub logits: Output,
    /// The slots' keys and values, each [slots, H, context, D].
    pub caches: Vec<Var>,
}

/// The attention caches a model keeps: `tensors` tensors of shape [B, heads, P, head_dim].
#[derive(Debug, Clone, Copy)]
pub struct CacheSpec {
    pub tensors: usize,
    pub heads: u64,
    pub head_dim: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    /// The notebook's MiniGPT: Embedding -> Dense.
    Bigram,
    /// The notebook's "scaling up": token + position embeddings, pre-LayerNorm transformer blocks
    /// (causal multi-head self-attention, GELU MLP), final LayerNorm, linear head.
    Gpt,
}

/// A model's shape as chosen before the corpus is read (its vocabulary gives the rest).
#[derive(Debug, Clone, PartialEq)]
pub struct ModelShape {
    pub arch: Arch,
    /// Embedding width (the notebook's `embedding_dim`, 128).
    pub n_embd: u64,
    /// Transformer blocks (gpt).
    pub n_layer: u64,
    /// Attention heads per block (gpt); must divide `n_embd`.
    pub n_head: u64,
    /// Dropout rate in train steps (gpt).
    pub dropout: f64,
    pub precision: Precision,
}

impl ModelShape {
    /// The rules every model configuration obeys, from the command line or read back from disk.
    pub fn validate(&self) -> Result<()> {
        ensure!(self.n_embd > 0, "--n-embd must be at least 1");
        if self.arch == Arch::Gpt {
            ensure!(self.n_layer > 0, "--n-layer must be at least 1");
            ensure!(
                self.n_head > 0 && self.n_embd.is_multiple_of(self.n_head),
                "--n-head ({}) must divide --n-embd ({})",
                self.n_head,
                self.n_embd
            );
        }
        ensure!((0.0..1.0).contains(&self.dropout), "--dropout must be in [0, 1), not {}", self.dropout);
        ensure!(
            self.dropout == 0.0 || self.arch == Arch::Gpt,
            "--dropout applies to --model gpt (the notebook's model has none)"
        );
        Ok(())
    }

    /// The full configuration, once the vocabulary and the context are known.
    pub fn with(&self, vocab_size: u64, block_size: u64) -> ModelConfig {
        ModelConfig {
            arch: self.arch,
            vocab_size,
            n_embd: self.n_embd,
            n_layer: self.n_layer,
            n_head: self.n_head,
            block_size: if self.arch == Arch::Gpt { block_size } else { 0 },
            dropout: self.dropout,
            precision: self.precision,
        }
    }
}

/// Everything needed to rebuild a model's graph; saved with every run (`config.json`'s `model`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub arch: Arch,
    /// Characters in the vocabulary.
    pub vocab_size: u64,
    /// Embedding width (the notebook's `embedding_dim`, 128).
    pub n_embd: u64,
    /// Transformer blocks (gpt).
    #[serde(default)]
    pub n_layer: u64,
    /// Attention heads per block (gpt); must divide `n_embd`.
    #[serde(default)]
    pub n_head: u64,
    /// The size of the position table (gpt), the longest context it takes; 0 for the bigram,
    /// whose logits depend on the last character only. (Training windows are `train.block_size`,
    /// which may be shorter when fine-tuning.)
    #[serde(default)]
    pub block_size: u64,
    /// Dropout rate in training (gpt).
    #[serde(default)]
    pub dropout: f64,
    /// The dtype policy (float32 in runs made before there was a choice).
    #[serde(default)]
    pub precision: Precision,
}

impl ModelConfig {
    /// The notebook's model.
    pub fn bigram(vocab_size: u64, n_embd: u64) -> Self {
        Self {
            arch: Arch::Bigram,
            vocab_size,
            n_embd,
            n_layer: 0,
            n_head: 0,
            block_size: 0,
            dropout: 0.0,
            precision: Precision::Float32,
        }
    }

    /// The transformer, without dropout.
    pub fn gpt(vocab_size: u64, n_embd: u64, n_layer: u64, n_head: u64, block_size: u64) -> Self {
        Self {
            arch: Arch::Gpt,
            vocab_size,
            n_embd,
            n_layer,
            n_head,
            block_size,
            dropout: 0.0,
            precision: Precision::Float32,
        }
    }

    pub fn shape(&self) -> ModelShape {
        ModelShape {
            arch: self.arch,
            n_embd: self.n_embd,
            n_layer: self.n_layer,
            n_head: self.n_head,
            dropout: self.dropout,
            precision: self.precision,
        }
    }

    /// The longest context the model takes (the GPT's position table), if it has a limit.
    pub fn context_limit(&self) -> Option<u64> {
        (self.arch == Arch::Gpt).then_some(self.block_size)
    }

    /// Whether the model keeps attention caches ([`LanguageModel::decode_rows`]).
    pub fn decodes_cached(&self) -> bool {
        self.arch == Arch::Gpt
    }

    /// The bytes of one stream's attention caches: keys and values of every block at every
    /// position of the context, in the precision computed.
    pub fn cache_bytes_per_stream(&self) -> u64 {
        2 * self.n_layer * self.block_size * self.n_embd * self.precision.compute_bytes()
    }

    /// One line: `bigram, n_embd 128` or `gpt, 4 blocks, 4 heads, n_embd 128, block 64, dropout 0`,
    /// then the precision unless float32.
    pub fn describe(&self) -> String {
        let model = match self.arch {
            Arch::Bigram => format!("bigram, n_embd {}", self.n_embd),
            Arch::Gpt => format!(
                "gpt, {} blocks, {} heads, n_embd {}, block {}, dropout {}",
                self.n_layer, self.n_head, self.n_embd, self.block_size, self.dropout
            ),
        };
        match self.precision {
            Precision::Float32 => model,
            precision => format!("{model}, {precision}"),
        }
    }

    /// The rules every model obeys, and that it fits in memory ([`ModelConfig::check_fits`]).
    pub fn validate(&self) -> Result<()> {
        self.check_rules()?;
        self.check_fits()
    }

    /// The rules alone: every size at least 1 where it counts and at most [`MAX_SIZE`].
    fn check_rules(&self) -> Result<()> {
        ensure!(self.vocab_size > 0, "vocab_size must be at least 1");
        ensure!(self.arch != Arch::Gpt || self.block_size > 0, "--block-size must be at least 1");
        for (flag, value) in [
            ("vocab_size", self.vocab_size),
            ("--n-embd", self.n_embd),
            ("--n-layer", self.n_layer),
            ("--n-head", self.n_head),
            ("--block-size", self.block_size),
        ] {
            ensure!(
                value <= MAX_SIZE,
                "{flag} {value} is more than {MAX_SIZE}, the most a TensorFlow shape here takes"
            );
        }
        if self.arch == Arch::Gpt {
            ensure!(
                4 * self.n_embd <= MAX_SIZE,
                "--n-embd {} is more than {}: the MLP's width, 4 × n_embd, is a TensorFlow shape (at most {MAX_SIZE})",
                self.n_embd,
                MAX_SIZE / 4
            );
        }
        self.shape().validate()
    }

    /// Refuses a model whose weights and graph alone ([`ModelConfig::memory_needed`]) exceed the
    /// memory available, before anything is built.
    pub fn check_fits(&self) -> Result<()> {
        let params = self.parameter_count()?;
        let parts = match self.arch {
            Arch::Bigram => format!("{} parameters", thousands(params)),
            Arch::Gpt => format!("{} parameters, the graph of {} blocks", thousands(params), self.n_layer),
        };
        // Its weights (4 bytes a parameter) and its graph.
        let needed = params.saturating_mul(4).saturating_add(self.graph_bytes());
        crate::memory::ensure_fits(needed, "the model", &parts, "lower --n-embd or --n-layer")
    }

    /// The memory of the model's graph, built and run: [`GRAPH_BYTES_PER_BLOCK`] a block.
    pub fn graph_bytes(&self) -> u64 {
        match self.arch {
            Arch::Bigram => 0,
            Arch::Gpt => self.n_layer.saturating_mul(GRAPH_BYTES_PER_BLOCK),
        }
    }

    /// Builds the model's variables in `scope` (of `dtype`; the layers compute in the dtype of
    /// the model's precision); `seed` fixes their initial values.
    pub fn build(&self, dtype: DataType, seed: i64, scope: &mut Scope) -> tensorflow::Result<Box<dyn LanguageModel>> {
        let dtype = (dtype, self.precision.compute(dtype));
        Ok(match self.arch {
            Arch::Bigram => Box::new(bigram::Bigram::new(self.vocab_size, self.n_embd, dtype, seed, scope)?),
            Arch::Gpt => Box::new(gpt::Gpt::new(self, dtype, seed, scope)?),
        })
    }

    /// The model's variables (names and shapes), built in a scratch graph holding nothing else.
    pub fn variables(&self) -> Result<Vec<Var>> {
        self.validate()?;
        Ok(self.build(DataType::Float, 0, &mut Scope::new_root_scope())?.variables())
    }

    /// Trainable parameters, counted from the variables the model's builder makes (in a scratch
    /// graph holding nothing else). The blocks are alike: a transformer of more than two counts
    /// those of one and two blocks and adds the difference for each further block. Saturating.
    pub fn parameter_count(&self) -> Result<u64> {
        self.check_rules()?;
        let count = |model: &ModelConfig| -> Result<u64> {
            let built = model.build(DataType::Float, 0, &mut Scope::new_root_scope())?;
            Ok(parameters(&built.variables()))
        };
        if self.arch != Arch::Gpt || self.n_layer <= 2 {
            return count(self);
        }
        let one = count(&Self { n_layer: 1, ..self.clone() })?;
        let two = count(&Self { n_layer: 2, ..self.clone() })?;
        Ok(one.saturating_add((two - one).saturating_mul(self.n_layer - 1)))
    }
}

/// The largest size (vocabulary, width, depth, heads, context) minigpt takes: TensorFlow's int32
/// shape operands.
pub const MAX_SIZE: u64 = i32::MAX as u64;

/// The memory one transformer block's graph takes, built and run: measured 11.6 MB a block
/// (`minigpt train --model gpt --n-embd 8 --n-head 1 --block-size 8 --batch-size 2`, peak RSS at
/// 2, 40 and 120 blocks), rounded up.
pub const GRAPH_BYTES_PER_BLOCK: u64 = 12 << 20;

/// The elements of `vars`, all told (a model's trainable parameters). Saturating.
pub fn parameters(vars: &[Var]) -> u64 {
    let size = |v: &Var| v.shape.iter().fold(1u64, |n, &d| n.saturating_mul(d));
    vars.iter().fold(0u64, |n, v| n.saturating_add(size(v)))
}
