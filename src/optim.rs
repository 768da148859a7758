//! Adam with Keras' defaults and update rule (the crate ships only gradient descent and
//! Adadelta). Each variable gets slots `<name>/m` and `<name>/v`; the step count is
//! `optimizer/iterations`, as Keras' `optimizer.iterations`.

use tensorflow::{ops, DataType, Operation, Output, Scope};

use crate::tfx::{self, Var};

/// Keras `Adam()` defaults, plus what the defaults leave off: a learning-rate schedule, AdamW's
/// decoupled weight decay and gradient clipping by global norm.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AdamConfig {
    pub learning_rate: f64,
    pub beta_1: f64,
    pub beta_2: f64,
    pub epsilon: f64,
    /// Linear warm-up over this many steps (0: none).
    #[serde(default)]
    pub warmup_steps: u64,
    /// Cosine decay from the end of warm-up to `min_lr` at this step, then `min_lr`.
    #[serde(default)]
    pub decay_steps: Option<u64>,
    #[serde(default)]
    pub min_lr: f64,
    /// AdamW: `var -= lr · weight_decay · var` for matrices other than embedding tables.
    #[serde(default)]
    pub weight_decay: f64,
    /// Scale all gradients down so that their global norm is at most this.
    #[serde(default)]
    pub clip_norm: Option<f64>,
}

impl Default for AdamConfig {
    fn default() -> Self {
        Self {
            learning_rate: 1e-3,
            beta_1: 0.9,
            beta_2: 0.999,
            epsilon: 1e-7,
            warmup_steps: 0,
            decay_steps: None,
            min_lr: 0.0,
            weight_decay: 0.0,
            clip_norm: None,
        }
    }
}

impl AdamConfig {
    /// The rules the command line applies, and `config.json` when read back.
    pub fn validate(&self) -> anyhow::Result<()> {
        use anyhow::ensure;
        ensure!(
            self.learning_rate > 0.0 && self.learning_rate.is_finite(),
            "--lr must be a positive number, not {}",
            self.learning_rate
        );
        ensure!(
            self.min_lr >= 0.0 && self.min_lr <= self.learning_rate,
            "--min-lr must be between 0 and --lr, not {}",
            self.min_lr
        );
        ensure!(
            self.weight_decay >= 0.0 && self.weight_decay.is_finite(),
            "--weight-decay must be 0 or more, not {}",
            self.weight_decay
        );
        ensure!(
            (0.0..1.0).contains(&self.beta_1) && (0.0..1.0).contains(&self.beta_2),
            "--beta1 and --beta2 must be in [0, 1)"
        );
        ensure!(
            self.epsilon > 0.0 && self.epsilon.is_finite(),
            "epsilon must be a positive number, not {}",
            self.epsilon
        );
        ensure!(self.clip_norm.is_none_or(|c| c > 0.0 && c.is_finite()), "--grad-clip must be a positive number");
        ensure!(
            self.decay_steps.is_none_or(|d| d > self.warmup_steps),
            "--lr-decay-steps must be larger than --warmup-steps"
        );
        Ok(())
    }

    /// The learning rate of step `it` (from 0), as the graph computes it (nanoGPT's schedule):
    /// `lr·(it+1)/(warmup+1)` during warm-up, then a cosine from `lr` to `min_lr` at `decay_steps`.
    pub fn learning_rate_at(&self, it: u64) -> f64 {
        let (lr, warmup) = (self.learning_rate, self.warmup_steps);
        if it < warmup {
            return lr * (it + 1) as f64 / (warmup + 1) as f64;
        }
        let Some(decay) = self.decay_steps else { return lr };
        if it > decay {
            return self.min_lr;
        }
        let ratio = (it - warmup) as f64 / (decay.saturating_sub(warmup)).max(1) as f64;
        self.min_lr + 0.5 * (1.0 + (std::f64::consts::PI * ratio).cos()) * (lr - self.min_lr)
    }
}

pub struct Adam {
    pub m: Vec<Var>,
    pub v: Vec<Var>,
    /// int64 scalar: steps applied so far.
    pub iterations: Var,
    /// The learning rate, a scalar that defaults to the configured one and can be fed per step.
    pub learning_rate: Output,
    cfg: AdamConfig,
    dtype: DataType,
}

pub const ITERATIONS: &str = "optimizer/iterations";

impl Adam {
    pub fn new(vars: &[Var], cfg: &AdamConfig, dtype: DataType, scope: &mut Scope) -> tensorflow::Result<Self> {
        let m = vars.iter().map(|v| v.zeros_like(&format!("{}/m", v.name), scope)).collect::<Result<_, _>>()?;
        let v = vars.iter().map(|v| v.zeros_like(&format!("{}/v", v.name), scope)).collect::<Result<_, _>>()?;
        let zero = ops::constant(0i64, &mut scope.with_op_name(&format!("{ITERATIONS}/Initializer")))?;
        let iterations = Var::new(ITERATIONS, DataType::Int64, &[], zero.into(), scope)?;
        let lr = if cfg.warmup_steps == 0 && cfg.decay_steps.is_none() {
            tfx::scalar(dtype, cfg.learning_rate, &mut scope.with_op_name("optimizer/learning_rate/default"))?
        } else {
            schedule(&iterations, cfg, dtype, &mut scope.new_sub_scope("schedule"))?
        };
        let learning_rate = tfx::scalar_with_default("optimizer/learning_rate", lr, scope)?;
        Ok(Self { m, v, iterations, learning_rate, cfg: *cfg, dtype })
    }

    /// One Adam step on every variable, then `iterations += 1`: Keras 3's `Adam.update_step`, op
    /// for op in the same order and with the same float32 constants, so that the notebook's
    /// numbers come out (`ResourceApplyAdam` rounds `1 - β` differently). With t = iterations + 1:
    /// `α = lr·√(1-β2ᵗ)/(1-β1ᵗ); m += (g - m)(1 - β1); v += (g² - v)(1 - β2); var -= mα / (√v + ε)`.
    ///
    /// `squares[i]`, when given, replaces `g²` for variable `i`: Keras receives an embedding's
    /// gradient as `IndexedSlices` with one row per lookup and squares those rows before summing
    /// duplicates, so its `v` grows by Σ(per-lookup row)², not (Σ rows)².
    ///
    /// With `only_if` (a bool scalar), a step where it is false changes nothing: the variables,
    /// m, v and `iterations` keep their values (Keras' `LossScaleOptimizer` skips the inner
    /// optimizer on a non-finite gradient, so the schedule does not advance either).
    pub fn apply(
        &self,
        vars: &[Var],
        grads: &[Output],
        squares: &[Option<Output>],
        decayed: &[bool],
        only_if: Option<&Output>,
        scope: &mut Scope,
    ) -> tensorflow::Result<Operation> {
        let (cfg, dtype) = (&self.cfg, self.dtype);
        let scope = &mut scope.new_sub_scope("adam");
        let (grads, squares) = match cfg.clip_norm {
            Some(clip) => clip_by_global_norm(grads, squares, clip, dtype, &mut scope.new_sub_scope("clip"))?,
            _ => (grads.to_vec(), squares.to_vec()),
        };
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
        let decay = (cfg.weight_decay != 0.0).then(|| -> tensorflow::Result<Output> {
            Ok(ops::mul(self.learning_rate.clone(), tfx::scalar(dtype, cfg.weight_decay, scope)?, scope)?.into())
        });
        let decay = decay.transpose()?;
        // `new`, or `old` where the step is skipped.
        let guard = |new: Output, old: Output, scope: &mut Scope| -> tensorflow::Result<Output> {
            match only_if {
                Some(cond) => Ok(ops::select_v2(cond.clone(), new, old, scope)?.into()),
                None => Ok(new),
            }
        };
        for (i, (var, grad)) in vars.iter().zip(&grads).enumerate() {
            let (m, v) = (&self.m[i], &self.v[i]);
            let m_old = m.read(scope)?;
            let m_new = ops::add_v2(
                m_old.clone(),
                ops::mul(ops::sub(grad.clone(), m_old.clone(), scope)?, keep_1.clone(), scope)?,
                scope,
            )?;
            let grad = grad.clone();
            let g2: Output = match squares.get(i).cloned().flatten() {
                Some(s) => s,
                None => ops::square(grad.clone(), scope)?.into(),
            };
            let v_old = v.read(scope)?;
            let v_new = ops::add_v2(
                v_old.clone(),
                ops::mul(ops::sub(g2, v_old.clone(), scope)?, keep_2.clone(), scope)?,
                scope,
            )?;
            let step = ops::real_div(
                ops::mul(m_new.clone(), alpha.clone(), scope)?,
                ops::add_v2(ops::sqrt(v_new.clone(), scope)?, epsilon.clone(), scope)?,
                scope,
            )?;
            updates.push(ops::assign_variable_op(m.handle.clone(), guard(m_new.into(), m_old, scope)?, scope)?);
            updates.push(ops::assign_variable_op(v.handle.clone(), guard(v_new.into(), v_old, scope)?, scope)?);
            match (&decay, only_if) {
                // AdamW (as Keras': the decay first, then the Adam step).
                (Some(lr_wd), _) if decayed.get(i).copied().unwrap_or(false) => {
                    let w = var.read(scope)?;
                    let shrunk = ops::sub(w.clone(), ops::mul(w.clone(), lr_wd.clone(), scope)?, scope)?;
                    let new = guard(ops::sub(shrunk, step, scope)?.into(), w, scope)?;
                    updates.push(ops::assign_variable_op(var.handle.clone(), new, scope)?);
                }
                (_, Some(_)) => {
                    let w = var.read(scope)?;
                    let new = guard(ops::sub(w.clone(), step, scope)?.into(), w, scope)?;
                    updates.push(ops::assign_variable_op(var.handle.clone(), new, scope)?);
                }
                _ => updates.push(ops::assign_sub_variable_op(var.handle.clone(), step, scope)?),
            }
        }
        let one: Output = match only_if {
            Some(cond) => ops::Cast::new().DstT(DataType::Int64).build(cond.clone(), scope)?.into(),
            None => ops::constant(1i64, scope)?.into(),
        };
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

/// The scheduled learning rate of the coming step (`iterations` steps done), in the graph.
fn schedule(iterations: &Var, cfg: &AdamConfig, dtype: DataType, scope: &mut Scope) -> tensorflow::Result<Output> {
    let it = ops::Cast::new().DstT(dtype).build(iterations.read(scope)?, scope)?;
    let c = |x: f64, scope: &mut Scope| tfx::scalar(dtype, x, scope);
    let (lr, warmup) = (cfg.learning_rate, cfg.warmup_steps as f64);
    // Warm-up: lr·(it+1)/(warmup+1).
    let ramp = ops::mul(c(lr / (warmup + 1.0), scope)?, ops::add_v2(it.clone(), c(1.0, scope)?, scope)?, scope)?;
    let after: Output = match cfg.decay_steps {
        None => c(lr, scope)?,
        Some(decay) => {
            // min_lr + ½(1 + cos(π·ratio))·(lr − min_lr), ratio = (it − warmup)/(decay − warmup) in [0, 1].
            let span = (decay as f64 - warmup).max(1.0);
            let ratio = ops::real_div(ops::sub(it.clone(), c(warmup, scope)?, scope)?, c(span, scope)?, scope)?;
            let ratio = ops::minimum(ops::maximum(ratio, c(0.0, scope)?, scope)?, c(1.0, scope)?, scope)?;
            let cos = ops::cos(ops::mul(ratio, c(std::f64::consts::PI, scope)?, scope)?, scope)?;
            let coeff = ops::mul(c(0.5, scope)?, ops::add_v2(cos, c(1.0, scope)?, scope)?, scope)?;
            ops::add_v2(c(cfg.min_lr, scope)?, ops::mul(coeff, c(lr - cfg.min_lr, scope)?, scope)?, scope)?.into()
        }
    };
    let warming = ops::less(it, c(warmup, scope)?, scope)?;
    Ok(ops::select_v2(warming, ramp, after, scope)?.into())
}

/// `g · clip · min(1/‖g‖, 1/clip)` for every gradient, ‖g‖ the global norm over all of them, as
/// Keras' `global_clipnorm` computes it. An embedding table's gradient reaches Keras as one row per
/// lookup (`IndexedSlices`), so its part of the norm is the sum of the per-lookup squares
/// (`squares[i]`), not of the summed gradient's squares; and scaling it makes it a dense tensor, so
/// after clipping Adam's `v` sees the squares of the summed, scaled gradient: no per-lookup
/// squares are returned.
fn clip_by_global_norm(
    grads: &[Output],
    squares: &[Option<Output>],
    clip: f64,
    dtype: DataType,
    scope: &mut Scope,
) -> tensorflow::Result<(Vec<Output>, Vec<Option<Output>>)> {
    if grads.is_empty() {
        return Ok((grads.to_vec(), squares.to_vec()));
    }
    let mut parts = Vec::with_capacity(grads.len());
    for (i, g) in grads.iter().enumerate() {
        let g2: Output = match squares.get(i).cloned().flatten() {
            Some(s) => s,
            None => ops::square(g.clone(), scope)?.into(),
        };
        let rank = ops::rank(g2.clone(), scope)?;
        let axes = ops::range(ops::constant(0i32, scope)?, rank, ops::constant(1i32, scope)?, scope)?;
        parts.push(ops::sum(g2, axes, scope)?.into());
    }
    let all = ops::Pack::new().N(parts.len() as i64).build_instance(parts, scope)?.output();
    let norm =
        ops::sqrt(ops::sum(all, ops::constant(0i32, scope)?, scope)?, &mut scope.with_op_name("clip/global_norm"))?;
    let one = tfx::scalar(dtype, 1.0, scope)?;
    let inverse = ops::real_div(one, norm, scope)?;
    let smaller = ops::minimum(inverse, tfx::scalar(dtype, 1.0 / clip, scope)?, scope)?;
    let factor: Output = ops::mul(tfx::scalar(dtype, clip, scope)?, smaller, scope)?.into();
    let grads = grads
        .iter()
        .map(|g| Ok(ops::mul(g.clone(), factor.clone(), scope)?.into()))
        .collect::<tensorflow::Result<Vec<Output>>>()?;
    Ok((grads, vec![None; squares.len()]))
}

/// Keras' `LossScaleOptimizer` with its defaults, for float16: the loss is multiplied by `scale`
/// before its gradients are taken, so that small ones do not vanish in float16, and the gradients
/// are divided by it before the optimizer sees them. A step with a non-finite gradient is skipped
/// and halves the scale; after [`LossScale::GROWTH_STEPS`] finite steps in a row it doubles. The
/// scale and the count of finite steps are checkpointed with the optimizer.
pub struct LossScale {
    /// float32 scalar, from [`LossScale::INITIAL`].
    pub scale: Var,
    /// int64 scalar: finite steps since the scale last changed.
    pub counter: Var,
}

impl LossScale {
    pub const INITIAL: f64 = 32768.0;
    pub const GROWTH_STEPS: i64 = 2000;
    pub const SCALE: &'static str = "optimizer/loss_scale/scale";
    pub const COUNTER: &'static str = "optimizer/loss_scale/counter";

    pub fn new(scope: &mut Scope) -> tensorflow::Result<Self> {
        let initial =
            ops::constant(Self::INITIAL as f32, &mut scope.with_op_name(&format!("{}/Initializer", Self::SCALE)))?;
        let scale = Var::new(Self::SCALE, DataType::Float, &[], initial.into(), scope)?;
        let zero = ops::constant(0i64, &mut scope.with_op_name(&format!("{}/Initializer", Self::COUNTER)))?;
        let counter = Var::new(Self::COUNTER, DataType::Int64, &[], zero.into(), scope)?;
        Ok(Self { scale, counter })
    }

    /// bool scalar: every element of every one of `grads` is finite.
    pub fn all_finite(grads: &[Output], scope: &mut Scope) -> tensorflow::Result<Output> {
        let mut parts = Vec::with_capacity(grads.len());
        for g in grads {
            let ok = ops::is_finite(g.clone(), scope)?;
            let rank = ops::rank(ok.clone(), scope)?;
            let axes = ops::range(ops::constant(0i32, scope)?, rank, ops::constant(1i32, scope)?, scope)?;
            parts.push(ops::all(ok, axes, scope)?.into());
        }
        let all = ops::Pack::new().N(parts.len() as i64).build_instance(parts, scope)?.output();
        Ok(ops::all(all, ops::constant(0i32, scope)?, &mut scope.with_op_name("loss_scale/finite"))?.into())
    }

    /// Each of `grads` divided by `scale` (the value the gradients were taken with).
    pub fn unscale(grads: Vec<Output>, scale: &Output, scope: &mut Scope) -> tensorflow::Result<Vec<Output>> {
        grads.into_iter().map(|g| Ok(ops::real_div(g, scale.clone(), scope)?.into())).collect()
    }

    /// After `after`: on a finite step the counter goes up, and at [`LossScale::GROWTH_STEPS`]
    /// the scale doubles and the counter restarts; on a non-finite step the scale halves and the
    /// counter restarts.
    pub fn update(&self, finite: &Output, after: &[Operation], scope: &mut Scope) -> tensorflow::Result<Operation> {
        let scope = &mut scope.new_sub_scope("loss_scale");
        let scale = self.scale.read(scope)?;
        let counter = self.counter.read(scope)?;
        let grown = ops::equal(counter.clone(), ops::constant(Self::GROWTH_STEPS - 1, scope)?, scope)?;
        let doubled = ops::mul(scale.clone(), ops::constant(2f32, scope)?, scope)?;
        let halved = ops::mul(scale.clone(), ops::constant(0.5f32, scope)?, scope)?;
        let on_finite = ops::select_v2(grown.clone(), doubled, scale, scope)?;
        let new_scale = ops::select_v2(finite.clone(), on_finite, halved, scope)?;
        let zero = ops::constant(0i64, scope)?;
        let next = ops::add_v2(counter, ops::constant(1i64, scope)?, scope)?;
        let on_finite = ops::select_v2(grown, zero.clone(), next, scope)?;
        let new_counter = ops::select_v2(finite.clone(), on_finite, zero, scope)?;
        let later = &mut scope.with_control_dependencies(after);
        let set_scale = ops::assign_variable_op(self.scale.handle.clone(), new_scale, later)?;
        let set_counter = ops::assign_variable_op(self.counter.handle.clone(), new_counter, later)?;
        tfx::group("update", &[set_scale, set_counter], later)
    }

    pub fn variables(&self) -> Vec<Var> {
        vec![self.scale.clone(), self.counter.clone()]
    }
}
