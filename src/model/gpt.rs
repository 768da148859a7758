//! The notebook's "Scaling up" section: a GPT. Token and learned position embeddings; `n_layer`
//! pre-LayerNorm blocks of causal multi-head self-attention and a 4× GELU MLP, each added back
//! to the residual stream; a final LayerNorm; a linear head to the vocabulary.

use std::cell::Cell;

use tensorflow::{ops, DataType, Output, Scope};

use super::layers::{self, Dense, Embedding, LayerNorm};
use super::{CacheSpec, Decoded, Dropout, Forward, LanguageModel, ModelConfig, Rows};
use crate::tfx::{self, Var};

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
    /// Gradients are taken of this pass: it is a train step's (it was given a [`Dropout`]).
    train_step: bool,
    /// P (0 without cached positions)
    p: Output,
    /// [T, P + T]: the causal mask, added to the attention scores.
    mask: Output,
}

impl Pass<'_> {
    /// The pass of one position of each window (B, 1), without dropout; the same mask, keys and
    /// values.
    fn one_position(&self, scope: &mut Scope) -> tensorflow::Result<Self> {
        let one = ops::constant(&[1i32][..], scope)?;
        Ok(Pass {
            bt: tfx::concat(&[self.b.clone(), one.clone().into()], 0, scope)?, // (B, 1)
            b: self.b.clone(),
            t1: one.into(),
            t: ops::constant(1i32, scope)?.into(),
            dropout: None,
            train_step: self.train_step,
            p: self.p.clone(),
            mask: self.mask.clone(),
        })
    }

    /// Dropout at `site` of x with shape `dims` (shape tensors), when this pass has dropout.
    fn dropout(&self, x: Output, dims: &[Output], site: i64, scope: &mut Scope) -> tensorflow::Result<Output> {
        match &self.dropout {
            Some(dropout) => dropout.apply(x, tfx::concat(dims, 0, scope)?, site, scope),
            None => Ok(x),
        }
    }
}

/// What the model's variables are made with: their dtype and the dtype the layers compute in,
/// and for each initializer an op seed of its own, in creation order.
struct Params {
    dtype: (DataType, DataType),
    seed: i64,
    stream: Cell<i64>,
}

impl Params {
    /// (graph seed, the next op seed)
    fn seeds(&self) -> (i64, i64) {
        self.stream.set(self.stream.get() + 1);
        (self.seed, self.stream.get())
    }

    fn dense(&self, name: &str, n_in: u64, n_out: u64, scope: &mut Scope) -> tensorflow::Result<Dense> {
        Dense::new(name, n_in, n_out, self.dtype, self.seeds(), scope)
    }
}

/// Causal multi-head self-attention: one fused query/key/value projection, `n_head` heads of
/// `n_embd / n_head`, an output projection.
struct Attention {
    qkv: Dense,  // [C, 3C]
    proj: Dense, // [C, C]
    n_embd: i64,
    n_head: i64,
}

impl Attention {
    /// `<name>/qkv/{kernel,bias}`, `<name>/proj/{kernel,bias}`.
    fn new(name: &str, cfg: &ModelConfig, p: &Params, scope: &mut Scope) -> tensorflow::Result<Self> {
        let c = cfg.n_embd;
        let qkv = p.dense(&format!("{name}/qkv"), c, 3 * c, scope)?;
        let proj = p.dense(&format!("{name}/proj"), c, c, scope)?;
        Ok(Self { qkv, proj, n_embd: c as i64, n_head: cfg.n_head as i64 })
    }

    /// x [B, T, C] after the `past` keys and values ([B, H, P, D] each) -> the heads' outputs
    /// before the output projection ([`Attention::project`]), merged: [B, T, C], and the keys and
    /// values of all P + T positions. Dropout site `site` (the attention weights).
    fn attend(
        &self,
        x: Output,
        past: Option<[Output; 2]>,
        pass: &Pass,
        site: i64,
        scope: &mut Scope,
    ) -> tensorflow::Result<(Output, [Output; 2])> {
        let (bt, c, h) = (&pass.bt, self.n_embd, self.n_head);
        let d = c / h;
        let qkv = dense3(&self.qkv, x, pass, 3 * c, scope)?; // [B, T, 3C]
        let parts = ops::Split::new().num_split(3).build(ops::constant(2i32, scope)?, qkv, scope)?; // 3 × [B, T, C]
        let heads_shape = tfx::concat(&[bt.clone(), tfx::shape_const(&[h, d], scope)?], 0, scope)?; // (B, T, H, D)
        let perm = tfx::shape_const(&[0, 2, 1, 3], scope)?;
        let mut heads = Vec::new();
        for i in 0..3 {
            let z = ops::reshape(parts.output(i), heads_shape.clone(), scope)?; // [B, T, H, D]
            heads.push(Output::from(ops::transpose(z, perm.clone(), scope)?)); // [B, H, T, D]
        }
        let (q, mut k, mut v) = (heads[0].clone(), heads[1].clone(), heads[2].clone()); // [B, H, T, D]
        if let Some([past_k, past_v]) = past {
            k = tfx::concat(&[past_k, k], 2, scope)?; // [B, H, P + T, D]
            v = tfx::concat(&[past_v, v], 2, scope)?;
        }
        let scores = batch_matmul(q, k.clone(), true, scope)?; // [B, H, T, P + T]
        let att = attention_weights(scores, d, &pass.mask, scope)?; // [B, H, T, P + T]
                                                                    // (A pass with dropout has no cached positions: P = 0 here.)
        let dims = [pass.b.clone(), tfx::shape_const(&[h], scope)?, pass.t1.clone(), pass.t1.clone()];
        let att = pass.dropout(att, &dims, site, scope)?;
        let y = batch_matmul(att, v.clone(), false, scope)?; // [B, H, T, D]
        let y = ops::transpose(y, perm, scope)?; // [B, T, H, D]
        let merged = tfx::concat(&[bt.clone(), tfx::shape_const(&[c], scope)?], 0, scope)?;
        Ok((ops::reshape(y, merged, scope)?.into(), [k, v])) // [B, T, C]
    }

    /// The output projection of the heads' outputs y [B, T, C], dropout site `site`.
    fn project(&self, y: Output, pass: &Pass, site: i64, scope: &mut Scope) -> tensorflow::Result<Output> {
        let c = self.n_embd;
        let y = dense3(&self.proj, y, pass, c, scope)?;
        pass.dropout(y, &[pass.bt.clone(), tfx::shape_const(&[c], scope)?], site, scope)
    }

    /// A decoding step's rows x [N, C] -> the heads' outputs, merged and projected [N, C]. Each
    /// row's key and value are written to its slot of `cache` ([S, H, W, D] each) at its position
    /// first; then each row attends to its slot's positions up to its own. Those after it get
    /// the causal mask's -1e9, so a weight of exactly zero: they must hold finite numbers (a slot
    /// is zeroed before a stream takes it), as a NaN would survive that zero.
    fn decode(&self, x: Output, step: &DecodeStep, cache: [&Var; 2], scope: &mut Scope) -> tensorflow::Result<Output> {
        let (c, h) = (self.n_embd, self.n_head);
        let d = c / h;
        let qkv = self.qkv.apply(x, scope)?; // [N, 3C]
        let parts = ops::Split::new().num_split(3).build(ops::constant(1i32, scope)?, qkv, scope)?; // 3 × [N, C]
        let heads = tfx::shape_const(&[-1, h, d], scope)?;
        let head = |i: usize, scope: &mut Scope| ops::reshape(parts.output(i), heads.clone(), scope); // [N, H, D]
        let q = head(0, scope)?;
        let mut writes = Vec::with_capacity(2);
        for (i, var) in cache.iter().enumerate() {
            let kv = head(i + 1, scope)?;
            writes.push(ops::resource_scatter_nd_update(var.handle.clone(), step.at.clone(), kv, scope)?);
        }
        let after = &mut scope.with_control_dependencies(&writes);
        let read = |var: &Var, scope: &mut Scope| {
            ops::ResourceGather::new().dtype(var.dtype).build(var.handle.clone(), step.slots.clone(), scope)
        };
        let (keys, values) = (read(cache[0], after)?, read(cache[1], after)?); // [N, H, W, D]
        let q = ops::reshape(q, tfx::shape_const(&[-1, h, 1, d], scope)?, scope)?; // [N, H, 1, D]
        let scores = batch_matmul(q.into(), keys.into(), true, scope)?; // [N, H, 1, W]
        let att = attention_weights(scores, d, &step.bias, scope)?;
        let y = batch_matmul(att, values.into(), false, scope)?; // [N, H, 1, D]
        let y = ops::reshape(y, tfx::shape_const(&[-1, c], scope)?, scope)?; // [N, C]
        self.proj.apply(y.into(), scope)
    }

    fn variables(&self) -> [Var; 4] {
        [self.qkv.kernel.clone(), self.qkv.bias.clone(), self.proj.kernel.clone(), self.proj.bias.clone()]
    }
}

/// What every block of a decoding step shares (see [`Rows`]).
struct DecodeStep {
    /// [N] int32
    slots: Output,
    /// [N, H, 3] int32: where each row's key and value go in a cache (slot, head, position).
    at: Output,
    /// [N, 1, 1, W]: 0 up to each row's position, -1e9 after (the causal mask, per row), in the
    /// scores' dtype.
    bias: Output,
}

impl DecodeStep {
    fn new(rows: &Rows, heads: i64, context: i64, dtype: DataType, scope: &mut Scope) -> tensorflow::Result<Self> {
        let column = tfx::shape_const(&[-1, 1], scope)?;
        let one = ops::constant(1i32, scope)?;
        let zero = ops::constant(0i32, scope)?;
        let slots = ops::reshape(rows.slots.clone(), column.clone(), scope)?; // [N, 1]
        let positions = ops::reshape(rows.positions.clone(), column, scope)?; // [N, 1]
        let zeros = ops::mul(slots.clone(), zero.clone(), scope)?; // [N, 1] zeros
        let range = |n: i64, scope: &mut Scope| -> tensorflow::Result<Output> {
            let r = ops::range(zero.clone(), ops::constant(n as i32, scope)?, one.clone(), scope)?;
            Ok(ops::reshape(r, tfx::shape_const(&[1, -1], scope)?, scope)?.into())
            // [1, n]
        };
        let on_heads = |x: Output, scope: &mut Scope| -> tensorflow::Result<Output> {
            let x = ops::add_v2(x, ops::mul(range(heads, scope)?, zero.clone(), scope)?, scope)?; // [N, H]
            Ok(ops::expand_dims(x, ops::constant(2i32, scope)?, scope)?.into()) // [N, H, 1]
        };
        let parts = [
            on_heads(slots.into(), scope)?,
            on_heads(ops::add_v2(zeros, range(heads, scope)?, scope)?.into(), scope)?,
            on_heads(positions.clone().into(), scope)?,
        ];
        let at = tfx::concat(&parts, 2, scope)?; // [N, H, 3]
        let after = ops::less(positions, range(context, scope)?, scope)?; // [N, W]: key j after the row's position
        let bias = ops::mul(
            ops::Cast::new().DstT(dtype).build(after.clone(), scope)?,
            tfx::scalar(dtype, -1e9, scope)?,
            scope,
        )?;
        let bias = ops::reshape(bias, tfx::shape_const(&[-1, 1, 1, context], scope)?, scope)?;
        Ok(Self { slots: rows.slots.clone(), at, bias: bias.into() })
    }
}

/// The MLP: C → 4C, exact GELU, → C.
struct Mlp {
    fc: Dense,  // [C, 4C]
    out: Dense, // [4C, C]
    n_embd: i64,
}

impl Mlp {
    /// `<name>/fc/{kernel,bias}`, `<name>/out/{kernel,bias}`.
    fn new(name: &str, cfg: &ModelConfig, p: &Params, scope: &mut Scope) -> tensorflow::Result<Self> {
        let c = cfg.n_embd;
        let fc = p.dense(&format!("{name}/fc"), c, 4 * c, scope)?;
        let out = p.dense(&format!("{name}/out"), 4 * c, c, scope)?;
        Ok(Self { fc, out, n_embd: c as i64 })
    }

    /// x [B, T, C] -> [B, T, C]; dropout site `site` on the output.
    fn forward(&self, x: Output, pass: &Pass, site: i64, scope: &mut Scope) -> tensorflow::Result<Output> {
        let c = self.n_embd;
        let hidden = dense3(&self.fc, x, pass, 4 * c, scope)?; // [B, T, 4C]
        let hidden = gelu(hidden, pass.train_step, scope)?;
        let y = dense3(&self.out, hidden, pass, c, scope)?; // [B, T, C]
        pass.dropout(y, &[pass.bt.clone(), tfx::shape_const(&[c], scope)?], site, scope)
    }

    fn variables(&self) -> [Var; 4] {
        [self.fc.kernel.clone(), self.fc.bias.clone(), self.out.kernel.clone(), self.out.bias.clone()]
    }
}

/// A pre-LayerNorm transformer block: `x + attn(ln_1(x))`, then `x + mlp(ln_2(x))`.
struct Block {
    ln_1: LayerNorm,
    attn: Attention,
    ln_2: LayerNorm,
    mlp: Mlp,
    /// Dropout sites 3i+1 (attention weights), 3i+2 (attention output), 3i+3 (MLP output).
    first_site: i64,
}

impl Block {
    /// Block `i`: variables under `gpt/h<i>/`.
    fn new(i: u64, cfg: &ModelConfig, p: &Params, scope: &mut Scope) -> tensorflow::Result<Self> {
        let name = |part: &str| format!("gpt/h{i}/{part}");
        let ln_1 = LayerNorm::new(&name("ln_1"), cfg.n_embd, p.dtype.0, scope)?;
        let attn = Attention::new(&name("attn"), cfg, p, scope)?;
        let ln_2 = LayerNorm::new(&name("ln_2"), cfg.n_embd, p.dtype.0, scope)?;
        let mlp = Mlp::new(&name("mlp"), cfg, p, scope)?;
        Ok(Self { ln_1, attn, ln_2, mlp, first_site: 3 * i as i64 + 1 })
    }

    /// x [B, T, C] -> [B, T, C], and the block's keys and values of all P + T positions.
    fn forward(
        &self,
        x: Output,
        past: Option<[Output; 2]>,
        pass: &Pass,
        scope: &mut Scope,
    ) -> tensorflow::Result<(Output, [Output; 2])> {
        let h = self.ln_1.apply(x.clone(), scope)?; // [B, T, C]
        let (y, kv) = self.attn.attend(h, past, pass, self.first_site, scope)?;
        let a = self.attn.project(y, pass, self.first_site + 1, scope)?;
        let x: Output = ops::add_v2(x, a, scope)?.into(); // residual
        let h = self.ln_2.apply(x.clone(), scope)?;
        let m = self.mlp.forward(h, pass, self.first_site + 2, scope)?;
        Ok((ops::add_v2(x, m, scope)?.into(), kv))
    }

    /// x [B, T, C] -> [B, 1, C]: the block's output at position `at` ([1] int32) alone, `row`
    /// being `pass` at one position. The attention reads every position's keys and values; the
    /// output projection and the MLP see only that position.
    fn forward_at(
        &self,
        x: Output,
        pass: &Pass,
        row: &Pass,
        at: &Output,
        scope: &mut Scope,
    ) -> tensorflow::Result<Output> {
        let h = self.ln_1.apply(x.clone(), scope)?; // [B, T, C]
        let (y, _) = self.attn.attend(h, None, pass, self.first_site, scope)?; // [B, T, C]
        let axis = ops::constant(1i32, scope)?;
        let y = ops::gather_v2(y, at.clone(), axis.clone(), scope)?; // [B, 1, C]
        let a = self.attn.project(y.into(), row, self.first_site + 1, scope)?;
        let x: Output = ops::add_v2(ops::gather_v2(x, at.clone(), axis, scope)?, a, scope)?.into(); // [B, 1, C]
        let h = self.ln_2.apply(x.clone(), scope)?;
        let m = self.mlp.forward(h, row, self.first_site + 2, scope)?;
        Ok(ops::add_v2(x, m, scope)?.into())
    }

    /// A decoding step's rows x [N, C] -> [N, C], with the block's keys and values in `cache`.
    fn decode(&self, x: Output, step: &DecodeStep, cache: [&Var; 2], scope: &mut Scope) -> tensorflow::Result<Output> {
        let h = self.ln_1.apply(x.clone(), scope)?; // [N, C]
        let a = self.attn.decode(h, step, cache, scope)?;
        let x: Output = ops::add_v2(x, a, scope)?.into(); // residual
        let h = self.ln_2.apply(x.clone(), scope)?;
        let hidden = gelu(self.mlp.fc.apply(h, scope)?, false, scope)?; // [N, 4C]
        let m = self.mlp.out.apply(hidden, scope)?; // [N, C]
        Ok(ops::add_v2(x, m, scope)?.into())
    }

    fn variables(&self) -> Vec<Var> {
        let mut vars = vec![self.ln_1.gamma.clone(), self.ln_1.beta.clone()];
        vars.extend(self.attn.variables());
        vars.extend([self.ln_2.gamma.clone(), self.ln_2.beta.clone()]);
        vars.extend(self.mlp.variables());
        vars
    }
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
    /// The dtype the layers compute in.
    fn compute(&self) -> DataType {
        self.head.compute
    }

    /// Variables of `dtype.0`, computing in `dtype.1`.
    pub fn new(
        cfg: &ModelConfig,
        dtype: (DataType, DataType),
        seed: i64,
        scope: &mut Scope,
    ) -> tensorflow::Result<Self> {
        let (v, c) = (cfg.vocab_size, cfg.n_embd);
        let p = Params { dtype, seed, stream: Cell::new(0) };
        let wte = Embedding::new("gpt/wte", v, c, dtype, p.seeds(), scope)?;
        let wpe = Embedding::new("gpt/wpe", cfg.block_size, c, dtype, p.seeds(), scope)?;
        let blocks = (0..cfg.n_layer).map(|i| Block::new(i, cfg, &p, scope)).collect::<tensorflow::Result<_>>()?;
        let ln_f = LayerNorm::new("gpt/ln_f", c, dtype.0, scope)?;
        let head = p.dense("gpt/head", c, v, scope)?;
        Ok(Self { wte, wpe, blocks, ln_f, head, cfg: cfg.clone() })
    }

    /// tokens [B, T] at positions P..P+T after `past` (P = 0 without) -> the forward pass and
    /// the keys and values of all P + T positions, 2 per block.
    /// With `at` ([1] int32), the last block and the head compute that position alone: logits
    /// [B, 1, V], and no keys and values.
    fn run(
        &self,
        tokens: Output,
        dropout: Option<&Dropout>,
        past: Option<&[Output]>,
        at: Option<&Output>,
        scope: &mut Scope,
    ) -> tensorflow::Result<(Forward, Vec<Output>)> {
        if dropout.is_some() && past.is_some() {
            return Err(tensorflow::Status::new_set_lossy(
                tensorflow::Code::InvalidArgument,
                "dropout applies to train steps, which have no cached positions",
            ));
        }
        let scope = &mut scope.new_sub_scope("gpt");
        let bt: Output = ops::shape(tokens.clone(), scope)?.into(); // (B, T)
        let t1 = element(&bt, 1, scope)?;
        let scalar = tfx::shape_const(&[], scope)?;
        let t = ops::reshape(t1.clone(), scalar.clone(), scope)?.into();
        let p: Output = match past {
            Some(past) => {
                ops::reshape(element(&ops::shape(past[0].clone(), scope)?.into(), 2, scope)?, scalar, scope)?.into()
            }
            None => ops::constant(0i32, scope)?.into(),
        };
        let mask = causal_bias(&p, &t, score_dtype(self.compute()), scope)?;
        let train_step = dropout.is_some();
        let dropout = match dropout {
            Some(d) if self.cfg.dropout > 0.0 => {
                Some(layers::DropoutPass::new(self.cfg.dropout, self.compute(), d, scope)?)
            }
            _ => None,
        };
        let pass = Pass { b: element(&bt, 0, scope)?, t1, t, bt, dropout, train_step, p, mask };
        let tok = self.wte.apply(tokens, scope)?; // rows [B, T, C]
        let end = ops::add_v2(pass.p.clone(), pass.t.clone(), scope)?;
        let positions = ops::range(pass.p.clone(), end, ops::constant(1i32, scope)?, scope)?; // P..P+T
        let pos = self.wpe.apply(positions.into(), scope)?; // rows [T, C]
        let x = ops::add_v2(tok.out.clone(), pos.out.clone(), scope)?.into(); // [B, T, C]
        let c = tfx::shape_const(&[self.cfg.n_embd as i64], scope)?;
        let mut x = pass.dropout(x, &[pass.bt.clone(), c], 0, scope)?;
        let mut present = Vec::with_capacity(2 * self.blocks.len());
        let row = at.map(|_| pass.one_position(scope)).transpose()?;
        let last = self.blocks.len() - 1;
        for (i, block) in self.blocks.iter().enumerate() {
            if let (Some(at), Some(row), true) = (at, &row, i == last) {
                x = block.forward_at(x, &pass, row, at, scope)?; // [B, 1, C]
                break;
            }
            let block_past = match past {
                Some(p) => Some([
                    tfx::cast(p[2 * i].clone(), self.compute(), scope)?,
                    tfx::cast(p[2 * i + 1].clone(), self.compute(), scope)?,
                ]),
                None => None,
            };
            let (y, kv) = block.forward(x, block_past, &pass, scope)?;
            present.extend(kv);
            x = y;
        }
        let x = self.ln_f.apply(x, scope)?;
        let at_pass = row.as_ref().unwrap_or(&pass);
        let logits = dense3(&self.head, x, at_pass, self.cfg.vocab_size as i64, scope)?; // [B, T or 1, V]
        let logits = tfx::cast(logits, self.wte.embeddings.dtype, scope)?; // float32 for the loss and sampling
        Ok((Forward { logits, lookups: vec![tok, pos] }, present))
    }
}

impl LanguageModel for Gpt {
    /// tokens: [B, T] int32 (T <= block_size) -> logits [B, T, V]
    fn forward(&self, tokens: Output, dropout: Option<&Dropout>, scope: &mut Scope) -> tensorflow::Result<Forward> {
        Ok(self.run(tokens, dropout, None, None, scope)?.0)
    }

    /// The last block past its attention, the final LayerNorm and the head at `at` alone (the
    /// quality configuration's window of 64: about 90 MFLOP instead of 110).
    fn logits_at(&self, tokens: Output, at: Output, scope: &mut Scope) -> tensorflow::Result<Output> {
        let at = ops::reshape(at, tfx::shape_const(&[1], scope)?, scope)?.into(); // [1]
        let logits = self.run(tokens, None, None, Some(&at), scope)?.0.logits; // [B, 1, V]
        let v = self.cfg.vocab_size as i64;
        let logits = ops::reshape(logits, tfx::shape_const(&[-1, v], scope)?, scope)?; // [B, V]
        Ok(logits.into())
    }

    fn cache(&self) -> Option<CacheSpec> {
        let (h, c) = (self.cfg.n_head, self.cfg.n_embd);
        Some(CacheSpec { tensors: 2 * self.blocks.len(), heads: h, head_dim: c / h })
    }

    fn forward_cached(
        &self,
        tokens: Output,
        past: &[Output],
        scope: &mut Scope,
    ) -> tensorflow::Result<(Output, Vec<Output>)> {
        let (forward, present) = self.run(tokens, None, Some(past), None, scope)?;
        Ok((forward.logits, present))
    }

    fn decode_rows(&self, rows: &Rows, slots: u64, scope: &mut Scope) -> tensorflow::Result<Option<Decoded>> {
        let (c, h, w) = (self.cfg.n_embd, self.cfg.n_head, self.cfg.block_size);
        let dtype = self.compute();
        let shape = [slots, h, w, c / h];
        let mut caches = Vec::with_capacity(2 * self.blocks.len());
        for i in 0..self.blocks.len() {
            for kind in ["keys", "values"] {
                let name = format!("decode/h{i}/{kind}");
                let zeros = tfx::zeros(dtype, &shape, &mut scope.new_sub_scope(&format!("{name}_init")))?;
                caches.push(Var::new(&name, dtype, &shape, zeros, scope)?);
            }
        }
        let scope = &mut scope.new_sub_scope("decode");
        let step = DecodeStep::new(rows, h as i64, w as i64, score_dtype(dtype), scope)?;
        let tok = self.wte.apply(rows.tokens.clone(), scope)?.out; // [N, C]
        let pos = self.wpe.apply(rows.positions.clone(), scope)?.out; // [N, C]
        let mut x: Output = ops::add_v2(tok, pos, scope)?.into();
        for (i, block) in self.blocks.iter().enumerate() {
            x = block.decode(x, &step, [&caches[2 * i], &caches[2 * i + 1]], scope)?;
        }
        let x = ops::gather_v2(x, rows.last.clone(), ops::constant(0i32, scope)?, scope)?; // [M, C]
        let x = self.ln_f.apply(x.into(), scope)?;
        let logits = self.head.apply(x, scope)?; // [M, V]
        let logits = tfx::cast(logits, self.wte.embeddings.dtype, scope)?;
        Ok(Some(Decoded { logits, caches }))
    }

    fn variables(&self) -> Vec<Var> {
        let mut vars = vec![self.wte.embeddings.clone(), self.wpe.embeddings.clone()];
        vars.extend(self.blocks.iter().flat_map(Block::variables));
        vars.extend([
            self.ln_f.gamma.clone(),
            self.ln_f.beta.clone(),
            self.head.kernel.clone(),
            self.head.bias.clone(),
        ]);
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

/// The attention weights of `scores` (q·kᵀ, [..., T, S], in the compute dtype) for heads of
/// width `d`, under `mask` (0 or -1e9, [T, S] or broadcast to it): Keras' `dot_product_attention`,
/// the path its `MultiHeadAttention` takes without dropout. The scores are cast to at least
/// float32 and scaled by 1/√d there, masked, put through the softmax, and the weights cast back
/// to the compute dtype.
fn attention_weights(scores: Output, d: i64, mask: &Output, scope: &mut Scope) -> tensorflow::Result<Output> {
    let dtype = tfx::dtype_of(&scores);
    let scores = tfx::cast(scores, score_dtype(dtype), scope)?;
    let scale = tfx::scalar(score_dtype(dtype), 1.0 / (d as f64).sqrt(), scope)?;
    let scaled = ops::mul(scores, scale, scope)?;
    let att = ops::softmax(ops::add_v2(scaled, mask.clone(), scope)?, scope)?;
    tfx::cast(att.into(), dtype, scope)
}

/// `a · b` (`a · bᵀ` with `adj_y`) over the leading axes. In float16 the product is taken in
/// float32 and rounded to float16 once: the C++ gradient of `BatchMatMulV2` is a `BatchMatMulV3`,
/// which has no float16 kernel on the CPU.
fn batch_matmul(a: Output, b: Output, adj_y: bool, scope: &mut Scope) -> tensorflow::Result<Output> {
    let dtype = tfx::dtype_of(&a);
    if dtype != DataType::Half {
        return Ok(ops::BatchMatMulV2::new().adj_y(adj_y).build(a, b, scope)?.into());
    }
    let (a, b) = (tfx::cast(a, DataType::Float, scope)?, tfx::cast(b, DataType::Float, scope)?);
    tfx::cast(ops::BatchMatMulV2::new().adj_y(adj_y).build(a, b, scope)?.into(), dtype, scope)
}

/// The dtype attention scores and their softmax are computed in: float32 for the half
/// precisions, else the compute dtype.
fn score_dtype(compute: DataType) -> DataType {
    match low(compute) {
        true => DataType::Float,
        false => compute,
    }
}

/// Float16 or bfloat16: the compute dtypes of Keras' mixed policies.
fn low(dtype: DataType) -> bool {
    matches!(dtype, DataType::BFloat16 | DataType::Half)
}

/// A Dense layer on [B, T, n_in] (`pass.bt` = (B, T)) -> [B, T, n_out]. In float16 and bfloat16
/// the bias is added after the reshape, as Keras' `tensordot` leaves it: a bias fused into the
/// matrix product (Grappler fuses a `BiasAdd` that follows a `MatMul`) would be added before the
/// product is rounded to the low precision, once where Keras rounds twice. Outside a train step,
/// a bfloat16 product is left out of XLA's clusters, to oneDNN's bfloat16 kernel: XLA's CPU
/// backend computes it in float32 (the full evaluation is about 30% faster so).
fn dense3(dense: &Dense, x: Output, pass: &Pass, n_out: i64, scope: &mut Scope) -> tensorflow::Result<Output> {
    let n_in = dense.kernel.shape[0] as i64;
    let flat = ops::reshape(x, tfx::shape_const(&[-1, n_in], scope)?, scope)?; // [B*T, n_in]
    let shape = tfx::concat(&[pass.bt.clone(), tfx::shape_const(&[n_out], scope)?], 0, scope)?;
    if !low(dense.compute) {
        let y = dense.apply(flat.into(), scope)?; // [B*T, n_out]
        return Ok(ops::reshape(y, shape, scope)?.into());
    }
    let outside_xla = dense.compute == DataType::BFloat16 && !pass.train_step;
    let xw = ops::reshape(dense.matmul(flat.into(), outside_xla, scope)?, shape, scope)?; // [B, T, n_out]
    dense.add_bias(xw.into(), scope)
}

/// Exact GELU, `x·Φ(x) = ½x(1 + erf(x/√2))` (TensorFlow 2.21 has no Gelu op). In float16 and
/// bfloat16, where `1 + erf` would round twice, its value is `tf.nn.gelu`'s, `½x·erfc(-x/√2)`.
/// The C++ registry has no gradient for `Erfc`: in a `train_step` the gradient comes from `erf`,
/// through a term that is exactly zero (`erf(z) - stop_gradient(erf(z))`).
fn gelu(x: Output, train_step: bool, scope: &mut Scope) -> tensorflow::Result<Output> {
    let dtype = tfx::dtype_of(&x);
    let root_half = tfx::scalar(dtype, std::f64::consts::FRAC_1_SQRT_2, scope)?;
    let half = tfx::scalar(dtype, 0.5, scope)?;
    if !low(dtype) {
        let scaled = ops::mul(x.clone(), root_half, scope)?;
        let cdf = ops::add_v2(tfx::scalar(dtype, 1.0, scope)?, ops::erf(scaled, scope)?, scope)?;
        let half_x = ops::mul(x, half, scope)?;
        return Ok(ops::mul(half_x, cdf, scope)?.into());
    }
    let minus_z = ops::mul(ops::neg(x.clone(), scope)?, root_half.clone(), scope)?; // -x/√2
    let mut cdf: Output = ops::erfc(minus_z, scope)?.into();
    if train_step {
        let erf = ops::erf(ops::mul(x.clone(), root_half, scope)?, scope)?;
        let zero = ops::sub(erf.clone(), ops::stop_gradient(erf, scope)?, scope)?;
        cdf = ops::add_v2(ops::stop_gradient(cdf, scope)?, zero, scope)?.into();
    }
    let half_x = ops::mul(half, x, scope)?;
    Ok(ops::mul(half_x, cdf, scope)?.into())
}
