//! The notebook's "Scaling up" section: a GPT. Token and learned position embeddings; `n_layer`
//! pre-LayerNorm blocks of causal multi-head self-attention and a 4× GELU MLP, each added back
//! to the residual stream; a final LayerNorm; a linear head to the vocabulary.

use tensorflow::{ops, DataType, Output, Scope};

use super::layers::{Dense, Embedding, LayerNorm};
use super::{Forward, LanguageModel, ModelConfig};
use crate::tfx::{self, Var};

struct Block {
    ln_1: LayerNorm,
    qkv: Dense,  // [C, 3C]
    proj: Dense, // [C, C]
    ln_2: LayerNorm,
    fc: Dense,  // [C, 4C]
    out: Dense, // [4C, C]
}

pub struct Gpt {
    wte: Embedding, // [V, C]
    wpe: Embedding, // [block_size, C]
    blocks: Vec<Block>,
    ln_f: LayerNorm,
    head: Dense, // [C, V]
    cfg: ModelConfig,
}

impl Gpt {
    pub fn new(cfg: &ModelConfig, dtype: DataType, seed: i64, scope: &mut Scope) -> tensorflow::Result<Self> {
        let (v, c) = (cfg.vocab_size, cfg.n_embd);
        let mut stream = 0;
        let mut seeds = || {
            stream += 1;
            (seed, stream)
        };
        let wte = Embedding::new("gpt/wte", v, c, dtype, seeds(), scope)?;
        let wpe = Embedding::new("gpt/wpe", cfg.block_size, c, dtype, seeds(), scope)?;
        let mut blocks = Vec::new();
        for i in 0..cfg.n_layer {
            let name = |part: &str| format!("gpt/h{i}/{part}");
            blocks.push(Block {
                ln_1: LayerNorm::new(&name("ln_1"), c, dtype, scope)?,
                qkv: Dense::new(&name("attn/qkv"), c, 3 * c, dtype, seeds(), scope)?,
                proj: Dense::new(&name("attn/proj"), c, c, dtype, seeds(), scope)?,
                ln_2: LayerNorm::new(&name("ln_2"), c, dtype, scope)?,
                fc: Dense::new(&name("mlp/fc"), c, 4 * c, dtype, seeds(), scope)?,
                out: Dense::new(&name("mlp/out"), 4 * c, c, dtype, seeds(), scope)?,
            });
        }
        let ln_f = LayerNorm::new("gpt/ln_f", c, dtype, scope)?;
        let head = Dense::new("gpt/head", c, v, dtype, seeds(), scope)?;
        Ok(Self { wte, wpe, blocks, ln_f, head, cfg: cfg.clone() })
    }

    /// Causal multi-head self-attention: x [B, T, C] -> [B, T, C].
    fn attention(&self, block: &Block, x: Output, bt: &Output, t: &Output, scope: &mut Scope) -> tensorflow::Result<Output> {
        let (c, h) = (self.cfg.n_embd as i64, self.cfg.n_head as i64);
        let d = c / h;
        let qkv = dense3(&block.qkv, x, bt, 3 * c, scope)?; // [B, T, 3C]
        let parts = ops::Split::new().num_split(3).build(ops::constant(2i32, scope)?, qkv, scope)?; // 3 × [B, T, C]
        let heads_shape = tfx::concat(&[bt.clone(), tfx::shape_const(&[h, d], scope)?], 0, scope)?; // (B, T, H, D)
        let perm = tfx::shape_const(&[0, 2, 1, 3], scope)?;
        let mut heads = Vec::new();
        for i in 0..3 {
            let z = ops::reshape(parts.output(i), heads_shape.clone(), scope)?; // [B, T, H, D]
            heads.push(Output::from(ops::transpose(z, perm.clone(), scope)?)); // [B, H, T, D]
        }
        let dtype = x_dtype(&heads[0])?;
        let scores = ops::BatchMatMulV2::new().adj_y(true).build(heads[0].clone(), heads[1].clone(), scope)?; // [B, H, T, T]
        let scores = ops::mul(scores, tfx::scalar(dtype, 1.0 / (d as f64).sqrt(), scope)?, scope)?;
        // Position i sees positions j <= i.
        let r = ops::range(ops::constant(0i32, scope)?, t.clone(), ops::constant(1i32, scope)?, scope)?; // [T]
        let rows = ops::reshape(r.clone(), tfx::shape_const(&[-1, 1], scope)?, scope)?;
        let cols = ops::reshape(r, tfx::shape_const(&[1, -1], scope)?, scope)?;
        let future = ops::less(rows, cols, scope)?; // [T, T]
        let masked = ops::select_v2(future, tfx::scalar(dtype, -1e9, scope)?, scores, scope)?;
        let att = ops::softmax(masked, scope)?; // [B, H, T, T]
        let y = ops::BatchMatMulV2::new().build(att, heads[2].clone(), scope)?; // [B, H, T, D]
        let y = ops::transpose(y, perm, scope)?; // [B, T, H, D]
        let merged = tfx::concat(&[bt.clone(), tfx::shape_const(&[c], scope)?], 0, scope)?;
        let y = ops::reshape(y, merged, scope)?; // [B, T, C]
        dense3(&block.proj, y.into(), bt, c, scope)
    }

    /// The MLP: x [B, T, C] -> [B, T, C] through 4C with GELU.
    fn mlp(&self, block: &Block, x: Output, bt: &Output, scope: &mut Scope) -> tensorflow::Result<Output> {
        let c = self.cfg.n_embd as i64;
        let hidden = dense3(&block.fc, x, bt, 4 * c, scope)?;
        let hidden = gelu(hidden, scope)?;
        dense3(&block.out, hidden, bt, c, scope)
    }
}

impl LanguageModel for Gpt {
    /// tokens: [B, T] int32 (T <= block_size) -> logits [B, T, V]
    fn forward(&self, tokens: Output, scope: &mut Scope) -> tensorflow::Result<Forward> {
        let scope = &mut scope.new_sub_scope("gpt");
        let shape = ops::shape(tokens.clone(), scope)?; // (B, T)
        let t = ops::StridedSlice::new().shrink_axis_mask(1).build(
            shape.clone(),
            tfx::constant(&[1i32], &[1], scope)?,
            tfx::constant(&[2i32], &[1], scope)?,
            tfx::constant(&[1i32], &[1], scope)?,
            scope,
        )?; // T
        let bt: Output = shape.into();
        let t: Output = t.into();
        let tok = self.wte.apply(tokens, scope)?; // rows [B, T, C]
        let positions = ops::range(ops::constant(0i32, scope)?, t.clone(), ops::constant(1i32, scope)?, scope)?;
        let pos = self.wpe.apply(positions.into(), scope)?; // rows [T, C]
        let mut x: Output = ops::add_v2(tok.rows.clone(), pos.rows.clone(), scope)?.into(); // [B, T, C]
        for block in &self.blocks {
            let h = block.ln_1.apply(x.clone(), scope)?;
            let a = self.attention(block, h, &bt, &t, scope)?;
            x = ops::add_v2(x, a, scope)?.into();
            let h = block.ln_2.apply(x.clone(), scope)?;
            let m = self.mlp(block, h, &bt, scope)?;
            x = ops::add_v2(x, m, scope)?.into();
        }
        let x = self.ln_f.apply(x, scope)?;
        let logits = dense3(&self.head, x, &bt, self.cfg.vocab_size as i64, scope)?;
        Ok(Forward { logits, lookups: vec![tok, pos] })
    }

    fn variables(&self) -> Vec<Var> {
        let mut vars = vec![self.wte.embeddings.clone(), self.wpe.embeddings.clone()];
        for b in &self.blocks {
            vars.extend([b.ln_1.gamma.clone(), b.ln_1.beta.clone()]);
            vars.extend([b.qkv.kernel.clone(), b.qkv.bias.clone(), b.proj.kernel.clone(), b.proj.bias.clone()]);
            vars.extend([b.ln_2.gamma.clone(), b.ln_2.beta.clone()]);
            vars.extend([b.fc.kernel.clone(), b.fc.bias.clone(), b.out.kernel.clone(), b.out.bias.clone()]);
        }
        vars.extend([self.ln_f.gamma.clone(), self.ln_f.beta.clone(), self.head.kernel.clone(), self.head.bias.clone()]);
        vars
    }

    fn context_size(&self) -> Option<usize> {
        Some(self.cfg.block_size as usize)
    }
}

fn x_dtype(x: &Output) -> tensorflow::Result<DataType> {
    Ok(x.operation.output_type(x.index as usize))
}

/// A Dense layer on [B, T, n_in] (`bt` = (B, T)) -> [B, T, n_out].
fn dense3(dense: &Dense, x: Output, bt: &Output, n_out: i64, scope: &mut Scope) -> tensorflow::Result<Output> {
    let n_in = dense.kernel.shape[0] as i64;
    let flat = ops::reshape(x, tfx::shape_const(&[-1, n_in], scope)?, scope)?; // [B*T, n_in]
    let y = dense.apply(flat.into(), scope)?; // [B*T, n_out]
    let shape = tfx::concat(&[bt.clone(), tfx::shape_const(&[n_out], scope)?], 0, scope)?;
    Ok(ops::reshape(y, shape, scope)?.into())
}

/// Exact GELU, `x·Φ(x) = ½x(1 + erf(x/√2))` (TensorFlow 2.21 has no Gelu op).
fn gelu(x: Output, scope: &mut Scope) -> tensorflow::Result<Output> {
    let dtype = x_dtype(&x)?;
    let scaled = ops::mul(x.clone(), tfx::scalar(dtype, std::f64::consts::FRAC_1_SQRT_2, scope)?, scope)?;
    let cdf = ops::add_v2(tfx::scalar(dtype, 1.0, scope)?, ops::erf(scaled, scope)?, scope)?;
    let half_x = ops::mul(x, tfx::scalar(dtype, 0.5, scope)?, scope)?;
    Ok(ops::mul(half_x, cdf, scope)?.into())
}
