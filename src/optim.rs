//! Adam with Keras' defaults and update rule (the crate ships only gradient descent and
//! Adadelta). Each variable gets slots `<name>/m` and `<name>/v`; the step count is
//! `optimizer/iterations`, as Keras' `optimizer.iterations`.

use tensorflow::{ops, DataType, Operation, Output, Scope};

use crate::tfx::{self, Var};

/// Keras `Adam()` defaults.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AdamConfig {
    pub learning_rate: f64,
    pub beta_1: f64,
    pub beta_2: f64,
    pub epsilon: f64,
}

impl Default for AdamConfig {
    fn default() -> Self {
        Self { learning_rate: 1e-3, beta_1: 0.9, beta_2: 0.999, epsilon: 1e-7 }
    }
}

pub struct Adam {
    pub m: Vec<Var>,
    pub v: Vec<Var>,
    /// int64 scalar: steps applied so far.
    pub iterations: Var,
    /// The learning rate, a scalar that defaults to the configured one and can be fed per step.
    pub learning_rate: Output,
}

pub const ITERATIONS: &str = "optimizer/iterations";

impl Adam {
    pub fn new(vars: &[Var], cfg: &AdamConfig, dtype: DataType, scope: &mut Scope) -> tensorflow::Result<Self> {
        let m = vars.iter().map(|v| v.zeros_like(&format!("{}/m", v.name), scope)).collect::<Result<_, _>>()?;
        let v = vars.iter().map(|v| v.zeros_like(&format!("{}/v", v.name), scope)).collect::<Result<_, _>>()?;
        let zero = ops::constant(0i64, &mut scope.with_op_name(&format!("{ITERATIONS}/Initializer")))?;
        let iterations = Var::new(ITERATIONS, DataType::Int64, &[], zero.into(), scope)?;
        let lr = tfx::scalar(dtype, cfg.learning_rate, &mut scope.with_op_name("optimizer/learning_rate/default"))?;
        let learning_rate = tfx::scalar_with_default("optimizer/learning_rate", lr, scope)?;
        Ok(Self { m, v, iterations, learning_rate })
    }

    /// One Adam step on every variable, then `iterations += 1`: Keras 3's `Adam.update_step`, op
    /// for op in the same order and with the same float32 constants, so that the notebook's
    /// numbers come out (`ResourceApplyAdam` rounds `1 - β` differently). With t = iterations + 1:
    /// `α = lr·√(1-β2ᵗ)/(1-β1ᵗ); m += (g - m)(1 - β1); v += (g² - v)(1 - β2); var -= mα / (√v + ε)`.
    ///
    /// `squares[i]`, when given, replaces `g²` for variable `i`: Keras receives an embedding's
    /// gradient as `IndexedSlices` with one row per lookup and squares those rows before summing
    /// duplicates, so its `v` grows by Σ(per-lookup row)², not (Σ rows)².
    pub fn apply(
        &self,
        vars: &[Var],
        grads: &[Output],
        squares: &[Option<Output>],
        cfg: &AdamConfig,
        dtype: DataType,
        scope: &mut Scope,
    ) -> tensorflow::Result<Operation> {
        let scope = &mut scope.new_sub_scope("adam");
        let step = self.iterations.read(scope)?;
        let one_step = ops::constant(1i64, scope)?;
        let t = ops::add_v2(step, one_step, scope)?;
        let t = ops::Cast::new().DstT(dtype).build(t, scope)?; // float t
        let beta_1_power = ops::pow(tfx::scalar(dtype, cfg.beta_1, scope)?, t.clone(), scope)?;
        let beta_2_power = ops::pow(tfx::scalar(dtype, cfg.beta_2, scope)?, t, scope)?;
        let one = tfx::scalar(dtype, 1.0, scope)?;
        let root = ops::sqrt(ops::sub(one.clone(), beta_2_power, scope)?, scope)?;
        let lr_root = ops::mul(self.learning_rate.clone(), root, scope)?;
        let alpha = ops::real_div(lr_root, ops::sub(one, beta_1_power, scope)?, scope)?;
        // Python computes `1 - beta` in float64 before TensorFlow rounds it to float32.
        let keep_1 = tfx::scalar(dtype, 1.0 - cfg.beta_1, scope)?;
        let keep_2 = tfx::scalar(dtype, 1.0 - cfg.beta_2, scope)?;
        let epsilon = tfx::scalar(dtype, cfg.epsilon, scope)?;
        let mut updates = Vec::with_capacity(vars.len());
        for (i, (var, grad)) in vars.iter().zip(grads).enumerate() {
            let (m, v) = (&self.m[i], &self.v[i]);
            let m_old = m.read(scope)?;
            let m_new = ops::add_v2(m_old.clone(), ops::mul(ops::sub(grad.clone(), m_old, scope)?, keep_1.clone(), scope)?, scope)?;
            let g2: Output = match squares.get(i).cloned().flatten() {
                Some(s) => s,
                None => ops::square(grad.clone(), scope)?.into(),
            };
            let v_old = v.read(scope)?;
            let v_new = ops::add_v2(v_old.clone(), ops::mul(ops::sub(g2, v_old, scope)?, keep_2.clone(), scope)?, scope)?;
            let step = ops::real_div(
                ops::mul(m_new.clone(), alpha.clone(), scope)?,
                ops::add_v2(ops::sqrt(v_new.clone(), scope)?, epsilon.clone(), scope)?,
                scope,
            )?;
            updates.push(ops::assign_variable_op(m.handle.clone(), m_new, scope)?);
            updates.push(ops::assign_variable_op(v.handle.clone(), v_new, scope)?);
            updates.push(ops::assign_sub_variable_op(var.handle.clone(), step, scope)?);
        }
        let one = ops::constant(1i64, scope)?;
        let increment = ops::assign_add_variable_op(
            self.iterations.handle.clone(),
            one,
            &mut scope.with_control_dependencies(&updates),
        )?;
        Ok(increment)
    }

    /// The slot and step variables, for initialisation and checkpoints.
    pub fn variables(&self) -> Vec<Var> {
        self.m.iter().chain(&self.v).cloned().chain([self.iterations.clone()]).collect()
    }
}
