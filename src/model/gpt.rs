//! The notebook's "Scaling up" section: a GPT. Token and learned position embeddings; `n_layer`
//! pre-LayerNorm blocks of causal multi-head self-attention and a 4× GELU MLP, each added back
//! to the residual stream; a final LayerNorm; a linear head to the vocabulary.

use tensorflow::{ops, DataType, Output, Scope};

use super::layers::{self, Dense, Embedding, LayerNorm};
use super::{CacheSpec, Dropout, Forward, LanguageModel, ModelConfig};
use crate::tfx::{self, Var};

struct Block {
    ln_1: LayerNorm,
    qkv: Dense,  // [C, 3C]
    proj: Dense, // [C, C]
    ln_2: LayerNorm,
    fc: Dense,  // [C, 4C]
    out: Dense, // [4C, C]
}

/// Shapes of one forward pass, computed from the tokens (not from activations: see
/// [`layers::DropoutPass::apply`]), its dropout, and the cached keys and values it continues from.
struct Pass<'a> {
    /// (B, T)
    bt: Output,
    /// [B]
    b: Output,
    /// [T]
    t1: Output,
    /// T
    t: Output,
    dropout: Option<layers::DropoutPass<'a>>,
    /// Keys and values of the P earlier positions, 2 per block: [B, H, P, D].
    past: Option<&'a [Output]>,
    /// P (0 without `past`)
    p: Output,
    /// [T, P + T]: the causal mask, added to the attention scores.
    mask: Output,
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

    /// Dropout at `site` of x with shape `dims` (shape tensors), when this pass has dropout.
    fn dropout(&self, x: Output, dims: &[Output], site: i64, pass: &Pass, scope: &mut Scope) -> tensorflow::Result<Output> {
        match &pass.dropout {
            Some(dropout) => dropout.apply(x, tfx::concat(dims, 0, scope)?, site, scope),
            None => Ok(x),
        }
    }

    /// Causal multi-head self-attention of block i: x [B, T, C] -> [B, T, C], and the keys and
    /// values of all P + T positions [B, H, P + T, D]. Dropout sites 3i+1 (the attention weights)
    /// and 3i+2 (the output).
    fn attention(&self, i: usize, x: Output, pass: &Pass, scope: &mut Scope) -> tensorflow::Result<(Output, [Output; 2])> {
        let block = &self.blocks[i];
        let bt = &pass.bt;
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
        // Keras' MultiHeadAttention scales the queries, not the scores.
        let q = ops::mul(heads[0].clone(), tfx::scalar(dtype, 1.0 / (d as f64).sqrt(), scope)?, scope)?;
        let (mut k, mut v) = (heads[1].clone(), heads[2].clone()); // [B, H, T, D]
        if let Some(past) = pass.past {
            k = tfx::concat(&[past[2 * i].clone(), k], 2, scope)?; // [B, H, P + T, D]
            v = tfx::concat(&[past[2 * i + 1].clone(), v], 2, scope)?;
        }
        let scores = ops::BatchMatMulV2::new().adj_y(true).build(q, k.clone(), scope)?; // [B, H, T, P + T]
        let masked = ops::add_v2(scores, pass.mask.clone(), scope)?;
        let att = ops::softmax(masked, scope)?; // [B, H, T, P + T]
        // (`run` allows no dropout with a past: P = 0 here.)
        let dims = [pass.b.clone(), tfx::shape_const(&[h], scope)?, pass.t1.clone(), pass.t1.clone()];
        let att = self.dropout(att.into(), &dims, 3 * i as i64 + 1, pass, scope)?;
        let y = ops::BatchMatMulV2::new().build(att, v.clone(), scope)?; // [B, H, T, D]
        let y = ops::transpose(y, perm, scope)?; // [B, T, H, D]
        let merged = tfx::concat(&[bt.clone(), tfx::shape_const(&[c], scope)?], 0, scope)?;
        let y = ops::reshape(y, merged, scope)?; // [B, T, C]
        let y = dense3(&block.proj, y.into(), bt, c, scope)?;
        let y = self.dropout(y, &[bt.clone(), tfx::shape_const(&[c], scope)?], 3 * i as i64 + 2, pass, scope)?;
        Ok((y, [k, v]))
    }

    /// The MLP: x [B, T, C] -> [B, T, C] through 4C with GELU; dropout site 3i+3 for block i.
    fn mlp(&self, i: usize, x: Output, pass: &Pass, scope: &mut Scope) -> tensorflow::Result<Output> {
        let block = &self.blocks[i];
        let c = self.cfg.n_embd as i64;
        let hidden = dense3(&block.fc, x, &pass.bt, 4 * c, scope)?;
        let hidden = gelu(hidden, scope)?;
        let y = dense3(&block.out, hidden, &pass.bt, c, scope)?;
        self.dropout(y, &[pass.bt.clone(), tfx::shape_const(&[c], scope)?], 3 * i as i64 + 3, pass, scope)
    }

    /// tokens [B, T] at positions P..P+T after `past` (P = 0 without) -> the forward pass and
    /// the keys and values of all P + T positions, 2 per block.
    fn run(&self, tokens: Output, dropout: Option<&Dropout>, past: Option<&[Output]>, scope: &mut Scope) -> tensorflow::Result<(Forward, Vec<Output>)> {
        let scope = &mut scope.new_sub_scope("gpt");
        let bt: Output = ops::shape(tokens.clone(), scope)?.into(); // (B, T)
        let t1 = element(&bt, 1, scope)?;
        let scalar = tfx::shape_const(&[], scope)?;
        let t = ops::reshape(t1.clone(), scalar.clone(), scope)?.into();
        let p: Output = match past {
            Some(past) => ops::reshape(element(&ops::shape(past[0].clone(), scope)?.into(), 2, scope)?, scalar, scope)?.into(),
            None => ops::constant(0i32, scope)?.into(),
        };
        if dropout.is_some() && past.is_some() {
            return Err(tensorflow::Status::new_set_lossy(tensorflow::Code::InvalidArgument, "dropout applies to train steps, which have no cached positions"));
        }
        let dtype = self.wte.embeddings.dtype;
        let mask = causal_bias(&p, &t, dtype, scope)?;
        let dropout = match dropout {
            Some(d) if self.cfg.dropout > 0.0 => Some(layers::DropoutPass::new(self.cfg.dropout, dtype, d, scope)?),
            _ => None,
        };
        let pass = Pass { b: element(&bt, 0, scope)?, t1, t, bt, dropout, past, p, mask };
        let tok = self.wte.apply(tokens, scope)?; // rows [B, T, C]
        let end = ops::add_v2(pass.p.clone(), pass.t.clone(), scope)?;
        let positions = ops::range(pass.p.clone(), end, ops::constant(1i32, scope)?, scope)?; // P..P+T
        let pos = self.wpe.apply(positions.into(), scope)?; // rows [T, C]
        let x = ops::add_v2(tok.rows.clone(), pos.rows.clone(), scope)?.into(); // [B, T, C]
        let c = tfx::shape_const(&[self.cfg.n_embd as i64], scope)?;
        let mut x = self.dropout(x, &[pass.bt.clone(), c], 0, &pass, scope)?;
        let mut present = Vec::with_capacity(2 * self.blocks.len());
        for i in 0..self.blocks.len() {
            let h = self.blocks[i].ln_1.apply(x.clone(), scope)?;
            let (a, kv) = self.attention(i, h, &pass, scope)?;
            present.extend(kv);
            x = ops::add_v2(x, a, scope)?.into();
            let h = self.blocks[i].ln_2.apply(x.clone(), scope)?;
            let m = self.mlp(i, h, &pass, scope)?;
            x = ops::add_v2(x, m, scope)?.into();
        }
        let x = self.ln_f.apply(x, scope)?;
        let logits = dense3(&self.head, x, &pass.bt, self.cfg.vocab_size as i64, scope)?;
        Ok((Forward { logits, lookups: vec![tok, pos] }, present))
    }
}

impl LanguageModel for Gpt {
    /// tokens: [B, T] int32 (T <= block_size) -> logits [B, T, V]
    fn forward(&self, tokens: Output, dropout: Option<&Dropout>, scope: &mut Scope) -> tensorflow::Result<Forward> {
        Ok(self.run(tokens, dropout, None, scope)?.0)
    }

    fn cache(&self) -> Option<CacheSpec> {
        let (h, c) = (self.cfg.n_head, self.cfg.n_embd);
        Some(CacheSpec { tensors: 2 * self.blocks.len(), heads: h, head_dim: c / h })
    }

    fn forward_cached(&self, tokens: Output, past: &[Output], scope: &mut Scope) -> tensorflow::Result<(Output, Vec<Output>)> {
        let (forward, present) = self.run(tokens, None, Some(past), scope)?;
        Ok((forward.logits, present))
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

/// [T, P + T]: 0 where query position P + i may see key position j (j <= P + i), -1e9 where it
/// may not. Added to the scores, it leaves the allowed ones exact and gives the others zero weight
/// after the softmax.
fn causal_bias(p: &Output, t: &Output, dtype: DataType, scope: &mut Scope) -> tensorflow::Result<Output> {
    let one = ops::constant(1i32, scope)?;
    let end = ops::add_v2(p.clone(), t.clone(), scope)?;
    let queries = ops::range(p.clone(), end.clone(), one.clone(), scope)?; // [T]
    let keys = ops::range(ops::constant(0i32, scope)?, end, one, scope)?; // [P + T]
    let rows = ops::reshape(queries, tfx::shape_const(&[-1, 1], scope)?, scope)?;
    let cols = ops::reshape(keys, tfx::shape_const(&[1, -1], scope)?, scope)?;
    let future = ops::less(rows, cols, scope)?; // [T, P + T]
    let future = ops::Cast::new().DstT(dtype).build(future, scope)?;
    Ok(ops::mul(future, tfx::scalar(dtype, -1e9, scope)?, scope)?.into())
}

/// `[shape[i]]` of a shape vector.
fn element(shape: &Output, i: i32, scope: &mut Scope) -> tensorflow::Result<Output> {
    let at = |k: i32, scope: &mut Scope| tfx::constant(&[k], &[1], scope);
    Ok(ops::StridedSlice::new().build(shape.clone(), at(i, scope)?, at(i + 1, scope)?, at(1, scope)?, scope)?.into())
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
