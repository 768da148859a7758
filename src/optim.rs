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

    /// One Adam step on every variable, then `iterations += 1`. Keras' rule, with t = iterations + 1:
    /// `m += (g - m)(1 - β1); v += (g² - v)(1 - β2); var -= lr·√(1-β2ᵗ)/(1-β1ᵗ) · m / (√v + ε)`,
    /// which `ResourceApplyAdam` computes given β1ᵗ and β2ᵗ.
    pub fn apply(&self, vars: &[Var], grads: &[Output], cfg: &AdamConfig, dtype: DataType, scope: &mut Scope) -> tensorflow::Result<Operation> {
        let scope = &mut scope.new_sub_scope("adam");
        let step = self.iterations.read(scope)?;
        let one = ops::constant(1i64, scope)?;
        let t = ops::add_v2(step, one, scope)?;
        let t = ops::Cast::new().DstT(dtype).build(t, scope)?; // float t
        let beta_1 = tfx::scalar(dtype, cfg.beta_1, scope)?;
        let beta_2 = tfx::scalar(dtype, cfg.beta_2, scope)?;
        let epsilon = tfx::scalar(dtype, cfg.epsilon, scope)?;
        let beta_1_power = ops::pow(beta_1.clone(), t.clone(), scope)?;
        let beta_2_power = ops::pow(beta_2.clone(), t, scope)?;
        let mut updates = Vec::with_capacity(vars.len());
        for (i, (var, grad)) in vars.iter().zip(grads).enumerate() {
            updates.push(ops::resource_apply_adam(
                var.handle.clone(),
                self.m[i].handle.clone(),
                self.v[i].handle.clone(),
                beta_1_power.clone(),
                beta_2_power.clone(),
                self.learning_rate.clone(),
                beta_1.clone(),
                beta_2.clone(),
                epsilon.clone(),
                grad.clone(),
                scope,
            )?);
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
