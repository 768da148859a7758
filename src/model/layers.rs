//! Keras-equivalent layers as graph builders: parameters are made once by `new`, applied by
//! `apply`. Variable names follow Keras (`<layer>/embeddings`, `<layer>/kernel`, `<layer>/bias`).

use tensorflow::{ops, DataType, Output, Scope};

use super::{Dropout, Lookup};
use crate::tfx::{self, Var};

/// `uniform(-limit, limit)` of `shape`, seeded (`seed` is the graph seed, `seed2` the op's).
pub fn uniform_init(
    limit: f64,
    shape: &[u64],
    dtype: DataType,
    (seed, seed2): (i64, i64),
    scope: &mut Scope,
) -> tensorflow::Result<Output> {
    let dims: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
    let dims = tfx::shape_const(&dims, scope)?;
    let u = ops::RandomUniform::new().dtype(dtype).seed(seed).seed2(seed2).build(dims, scope)?; // [0, 1)
    let width = tfx::scalar(dtype, 2.0 * limit, scope)?;
    let scaled = ops::mul(u, width, scope)?;
    let offset = tfx::scalar(dtype, limit, scope)?;
    Ok(ops::sub(scaled, offset, scope)?.into())
}

/// Inverted dropout (`tf.nn.dropout`) for one forward pass: in train steps each element is kept
/// with probability `1 - rate` and scaled by `1 / (1 - rate)`; outside them the rate is 0 and
/// every `x` comes out unchanged. The rate in effect and the scale are built once, for every site.
pub struct DropoutPass<'a> {
    d: &'a Dropout,
    /// [] the rate in effect
    rate: Output,
    /// [] 1 / (1 - rate)
    scale: Output,
}

impl<'a> DropoutPass<'a> {
    pub fn new(rate: f64, dtype: DataType, d: &'a Dropout, scope: &mut Scope) -> tensorflow::Result<Self> {
        let zero = tfx::scalar(dtype, 0.0, scope)?;
        let rate: Output = ops::select_v2(d.training.clone(), tfx::scalar(dtype, rate, scope)?, zero, scope)?.into();
        let one = tfx::scalar(dtype, 1.0, scope)?;
        let scale = ops::real_div(one.clone(), ops::sub(one, rate.clone(), scope)?, scope)?.into();
        Ok(Self { d, rate, scale })
    }

    /// x with its elements dropped. `shape` (x's) must be computed without x: the gradient
    /// builder would follow it into the random op. `site` tells this dropout's masks from the
    /// others' in the same step: the generator's key is (seed + site·φ, step), φ an odd 64-bit
    /// constant, distinct for every site.
    pub fn apply(&self, x: Output, shape: Output, site: i64, scope: &mut Scope) -> tensorflow::Result<Output> {
        const PHI: u64 = 0x9E37_79B9_7F4A_7C15;
        let dtype = x.operation.output_type(x.index as usize);
        let key = self.d.seed.wrapping_add(site.wrapping_mul(PHI as i64));
        let step = ops::reshape(self.d.step.clone(), tfx::shape_const(&[1], scope)?, scope)?.into();
        let seed = tfx::concat(&[ops::constant(&[key][..], scope)?.into(), step], 0, scope)?; // [2] int64
        let u = ops::StatelessRandomUniform::new().dtype(dtype).build(shape, seed, scope)?; // [0, 1)
        let keep = ops::Cast::new().DstT(dtype).build(ops::greater_equal(u, self.rate.clone(), scope)?, scope)?;
        Ok(ops::mul(x, ops::mul(keep, self.scale.clone(), scope)?, scope)?.into())
    }
}

/// `layers.Embedding(vocab_size, n_embd)`: initializer `uniform(-0.05, 0.05)`.
pub struct Embedding {
    pub embeddings: Var, // [V, C]
    /// The dtype its rows are handed on in.
    compute: DataType,
}

impl Embedding {
    pub fn new(
        name: &str,
        vocab_size: u64,
        n_embd: u64,
        (dtype, compute): (DataType, DataType),
        seeds: (i64, i64),
        scope: &mut Scope,
    ) -> tensorflow::Result<Self> {
        let shape = [vocab_size, n_embd];
        let init = uniform_init(0.05, &shape, dtype, seeds, &mut scope.new_sub_scope(&format!("{name}/init")))?;
        Ok(Self { embeddings: Var::new(&format!("{name}/embeddings"), dtype, &shape, init, scope)?, compute })
    }

    /// ids: [...] int32 -> rows [..., C]. A read of the variable then `GatherV2`, whose gradient
    /// the C++ registry has (`ResourceGather`'s it lacks); then, as Keras' `Embedding` does, the
    /// rows cast to the compute dtype (the table is not: its gradient rows stay float32).
    pub fn apply(&self, ids: Output, scope: &mut Scope) -> tensorflow::Result<Lookup> {
        let table = self.embeddings.read(scope)?; // [V, C]
        let axis = ops::constant(0i32, scope)?;
        let rows: Output = ops::gather_v2(table, ids.clone(), axis, scope)?.into();
        let out = tfx::cast(rows.clone(), self.compute, scope)?;
        Ok(Lookup { var: self.embeddings.name.clone(), ids, rows, out })
    }
}

/// `layers.Dense(n_out)`: kernel `glorot_uniform`, bias zeros.
pub struct Dense {
    pub kernel: Var, // [n_in, n_out]
    pub bias: Var,   // [n_out]
    /// The dtype it computes in (its variables are cast to it when read).
    pub compute: DataType,
}

impl Dense {
    pub fn new(
        name: &str,
        n_in: u64,
        n_out: u64,
        (dtype, compute): (DataType, DataType),
        seeds: (i64, i64),
        scope: &mut Scope,
    ) -> tensorflow::Result<Self> {
        let limit = (6.0 / (n_in + n_out) as f64).sqrt();
        let shape = [n_in, n_out];
        let init = uniform_init(limit, &shape, dtype, seeds, &mut scope.new_sub_scope(&format!("{name}/init")))?;
        let kernel = Var::new(&format!("{name}/kernel"), dtype, &shape, init, scope)?;
        let zeros = tfx::zeros(dtype, &[n_out], &mut scope.new_sub_scope(&format!("{name}/bias_init")))?;
        let bias = Var::new(&format!("{name}/bias"), dtype, &[n_out], zeros, scope)?;
        Ok(Self { kernel, bias, compute })
    }

    /// x: [N, n_in] (in the compute dtype) -> [N, n_out]
    pub fn apply(&self, x: Output, scope: &mut Scope) -> tensorflow::Result<Output> {
        let xw = self.matmul(x, false, scope)?;
        self.add_bias(xw, scope)
    }

    /// x: [N, n_in] -> x · kernel [N, n_out], without the bias; `outside_xla`: the product is
    /// left to TensorFlow's kernel where the graph around it is compiled.
    pub fn matmul(&self, x: Output, outside_xla: bool, scope: &mut Scope) -> tensorflow::Result<Output> {
        let w = self.kernel.read_as(self.compute, scope)?; // [n_in, n_out]
        match outside_xla {
            true => tfx::mat_mul_outside_xla(x, w, scope),
            false => Ok(ops::mat_mul(x, w, scope)?.into()),
        }
    }

    /// xw [..., n_out] + bias.
    pub fn add_bias(&self, xw: Output, scope: &mut Scope) -> tensorflow::Result<Output> {
        let b = self.bias.read_as(self.compute, scope)?; // [n_out]
        Ok(ops::bias_add(xw, b, scope)?.into())
    }
}

/// `layers.LayerNormalization` over the last axis: gamma ones, beta zeros, epsilon 1e-5.
pub struct LayerNorm {
    pub gamma: Var, // [C]
    pub beta: Var,  // [C]
}

impl LayerNorm {
    pub const EPSILON: f64 = 1e-5;

    pub fn new(name: &str, width: u64, dtype: DataType, scope: &mut Scope) -> tensorflow::Result<Self> {
        let ones = ops::fill(
            tfx::shape_const(&[width as i64], scope)?,
            tfx::scalar(dtype, 1.0, scope)?,
            &mut scope.new_sub_scope(&format!("{name}/gamma_init")),
        )?;
        let gamma = Var::new(&format!("{name}/gamma"), dtype, &[width], ones.into(), scope)?;
        let zeros = tfx::zeros(dtype, &[width], &mut scope.new_sub_scope(&format!("{name}/beta_init")))?;
        let beta = Var::new(&format!("{name}/beta"), dtype, &[width], zeros, scope)?;
        Ok(Self { gamma, beta })
    }

    /// x [..., C] -> (x - mean) / sqrt(var + eps) * gamma + beta, statistics over the last axis,
    /// computed as Keras does: `x * inv + (beta - mean * inv)` with `inv = gamma / sqrt(var + eps)`,
    /// in at least the variables' precision (x of float16 or bfloat16 is cast to float32 and the
    /// output back to x's dtype).
    pub fn apply(&self, x: Output, scope: &mut Scope) -> tensorflow::Result<Output> {
        let dtype = tfx::dtype_of(&x);
        let x = tfx::cast(x, self.gamma.dtype, scope)?;
        let y = self.normalize(x, scope)?;
        tfx::cast(y, dtype, scope)
    }

    fn normalize(&self, x: Output, scope: &mut Scope) -> tensorflow::Result<Output> {
        let axis = ops::constant(-1i32, scope)?;
        let mean = ops::Mean::new().keep_dims(true).build(x.clone(), axis.clone(), scope)?; // [..., 1]
        let var = ops::Mean::new().keep_dims(true).build(
            ops::squared_difference(x.clone(), mean.clone(), scope)?,
            axis,
            scope,
        )?;
        let eps = tfx::scalar(self.gamma.dtype, Self::EPSILON, scope)?;
        let rsqrt = ops::rsqrt(ops::add_v2(var, eps, scope)?, scope)?; // [..., 1]
        let inv = ops::mul(rsqrt, self.gamma.read(scope)?, scope)?; // [..., C]
        let shift = ops::sub(self.beta.read(scope)?, ops::mul(mean, inv.clone(), scope)?, scope)?; // [..., C]
        Ok(ops::add_v2(ops::mul(x, inv, scope)?, shift, scope)?.into())
    }
}
