//! A graph for its purpose: the model's forward pass and loss; for inference the next-character
//! ops and the sampling loop; for training the gradients, Adam, summaries and save ops.

use tensorflow::{ops, DataType, Operation, Output, Scope, SessionRunArgs, Tensor, TensorType};

use super::checkpoint::{restore_ops, save_ops};
use super::gradients::{gradients, lookup_squares};
use super::replicas::replicated;
use super::{GraphOptions, Purpose};
use crate::loss;
use crate::model::{CacheSpec, Dropout, LanguageModel, ModelConfig};
use crate::optim::{Adam, LossScale};
use crate::sampler::Chain;
use crate::summary::Summaries;
use crate::tfx::{self, Var};

/// The ops of a training graph.
pub(super) struct TrainOps {
    /// bool scalar, false unless fed: true in train steps (dropout).
    pub(super) training: Operation,
    /// [] the train step's loss (with dropout, on the replicas if any).
    pub(super) step_loss: Output,
    /// d loss / d variable, in the model's variable order.
    pub(super) grads: Vec<Output>,
    pub(super) optimizer: Adam,
    /// One Adam step (fetch the loss with it to get the pre-step loss, as Keras' train_step).
    pub(super) train_op: Operation,
    /// Every variable and the data position to the checkpoint at the fed prefix.
    pub(super) save: Operation,
    /// int64 [2] placeholder saved as `data/position`: (epoch, batches done in it).
    pub(super) position: Operation,
    /// `RestoreV2` of `data/position` alone.
    pub(super) restore_position: Operation,
    pub(super) summaries: Option<Summaries>,
}

/// The next-character ops of an inference graph: `sample/context` [1, L] (and, with caches, the
/// `sample/past/*` keys and values of earlier positions) → `logits` [1, V] of the next character
/// (and `sample/present/*`, the caches with the context's positions added).
pub(super) struct NextOps {
    pub(super) context: Operation,
    pub(super) past: Vec<Operation>,
    pub(super) present: Vec<Output>,
    pub(super) logits: Output,
    pub(super) cache: Option<CacheSpec>,
}

/// For each of a model's variables, a placeholder `<name>/value` and the op assigning it.
pub(super) struct Setters(Vec<(Operation, Operation)>);

impl Setters {
    pub(super) fn new(vars: &[Var], scope: &mut Scope) -> tensorflow::Result<Self> {
        let mut setters = Vec::with_capacity(vars.len());
        for var in vars {
            let dims: Vec<i64> = var.shape.iter().map(|&d| d as i64).collect();
            let value = tfx::placeholder(&format!("{}/value", var.name), var.dtype, &dims, scope)?;
            let name = format!("{}/set", var.name);
            let assign = ops::assign_variable_op(var.handle.clone(), value.clone(), &mut scope.with_op_name(&name))?;
            setters.push((value, assign));
        }
        Ok(Self(setters))
    }

    /// Feeds `values` (in the variables' order) to `args`, with the assignments as targets.
    pub(super) fn feed<'a, T: TensorType>(
        &'a self,
        args: &mut SessionRunArgs<'a>,
        values: &'a [Tensor<T>],
    ) -> anyhow::Result<()> {
        anyhow::ensure!(values.len() == self.0.len(), "expected {} weight tensors, got {}", self.0.len(), values.len());
        for ((value, assign), t) in self.0.iter().zip(values) {
            args.add_feed(value, 0, t);
            args.add_target(assign);
        }
        Ok(())
    }
}

/// The graph's ops, as built.
pub(super) struct Parts {
    /// The root scope, which owns the graph.
    pub(super) scope: Scope,
    pub(super) model: Box<dyn LanguageModel>,
    pub(super) dtype: DataType,
    /// `x`: [B, T] int32.
    pub(super) tokens: Operation,
    /// `y`: [B, T] int32.
    pub(super) targets: Operation,
    /// [B, T, V] (an inference graph's without dropout, a training graph's with its `training` flag)
    pub(super) logits: Output,
    /// [] mean cross-entropy
    pub(super) loss: Output,
    /// Initialises every variable.
    pub(super) init: Operation,
    pub(super) setters: Setters,
    /// Every checkpointed variable (the model's, then the optimizer's) and its read.
    pub(super) reads: Vec<(Var, Output)>,
    /// String scalar naming the checkpoint for `restore` (and `save`).
    pub(super) prefix: Operation,
    pub(super) restore: Operation,
    pub(super) train: Option<TrainOps>,
    pub(super) next: Option<NextOps>,
    pub(super) chain: Option<Chain>,
}

/// The graph of `model` for `opts.purpose`, every op on `device`; a training graph's step on
/// the `replicas` devices if any (data parallelism, see [`replicated`]).
pub(super) fn build(
    model_cfg: &ModelConfig,
    opts: &GraphOptions,
    device: Option<&str>,
    replicas: &[String],
) -> tensorflow::Result<Parts> {
    let root = Scope::new_root_scope();
    let mut placed = root.with_device(device.unwrap_or(""));
    let scope = &mut placed;
    let dtype = opts.dtype;
    let model = model_cfg.build(dtype, opts.seed, scope)?;
    let vars = model.variables();
    let vocab = model_cfg.vocab_size as i64;
    let tokens = tfx::placeholder("x", DataType::Int32, &[-1, -1], scope)?;
    let targets = tfx::placeholder("y", DataType::Int32, &[-1, -1], scope)?;
    let mut checkpointed = vars.clone();
    let (logits, loss, learning, next, chain) = match &opts.purpose {
        Purpose::Training { adam, summaries } => {
            let optimizer = Adam::new(&vars, adam, dtype, scope)?;
            let no = ops::constant(false, scope)?;
            let training = ops::PlaceholderWithDefault::new()
                .shape(tensorflow::Shape::from(Some(vec![])))
                .build(no, &mut scope.with_op_name("training"))?;
            let step = optimizer.iterations.read(scope)?;
            let dropout = Dropout { training: training.clone().into(), step: step.clone(), seed: opts.seed };
            let loss_scale = match model_cfg.precision.scales_loss() {
                true => Some(LossScale::new(scope)?),
                false => None,
            };
            let mut finite = None;
            let (forward, xent, step_loss, grads, squares) = if replicas.is_empty() {
                let forward = model.forward(tokens.clone().into(), Some(&dropout), scope)?;
                let xent = loss::cross_entropy(forward.logits.clone(), targets.clone().into(), vocab, scope)?;
                let scale = loss_scale.as_ref().map(|ls| ls.scale.read(scope)).transpose()?;
                let (mut grads, mut row_grads) = gradients(&xent, &forward, &vars, scale.as_ref(), scope)?;
                if let Some(scale) = &scale {
                    let scope = &mut scope.new_sub_scope("loss_scale");
                    finite = Some(LossScale::all_finite(&[grads.clone(), row_grads.clone()].concat(), scope)?);
                    grads = LossScale::unscale(grads, scale, scope)?;
                    row_grads = LossScale::unscale(row_grads, scale, scope)?;
                }
                let squares = lookup_squares(&forward.lookups, row_grads, &vars, scope)?;
                let step_loss = xent.loss.clone();
                (forward, xent, step_loss, grads, squares)
            } else {
                // The chief evaluates (no dropout); the replicas compute the step.
                let forward = model.forward(tokens.clone().into(), None, scope)?;
                let xent = loss::cross_entropy(forward.logits.clone(), targets.clone().into(), vocab, scope)?;
                let batch = [tokens.clone().into(), targets.clone().into(), dropout.training.clone(), step];
                let (loss, grads, squares) =
                    replicated(model_cfg, opts, &vars, &forward.lookups, batch, replicas, scope)?;
                (forward, xent, loss, grads, squares)
            };
            // AdamW decays matrices, not biases, norms or embedding tables.
            let decayed: Vec<bool> =
                vars.iter().map(|v| v.shape.len() >= 2 && !forward.lookups.iter().any(|l| l.var == v.name)).collect();
            let mut train_op = optimizer.apply(
                &vars,
                &grads,
                &squares,
                &decayed,
                finite.as_ref(),
                &mut scope.with_op_name("train_step"),
            )?;
            if let (Some(ls), Some(finite)) = (&loss_scale, &finite) {
                let update = ls.update(finite, std::slice::from_ref(&train_op), scope)?;
                train_op = tfx::group("train_step/loss_scaled", &[train_op, update], scope)?;
            }
            let summaries = match summaries {
                true => Some(Summaries::build(scope)?),
                false => None,
            };
            checkpointed.extend(optimizer.variables());
            checkpointed.extend(loss_scale.iter().flat_map(LossScale::variables));
            let learning = (training, step_loss, grads, optimizer, train_op, summaries);
            (forward.logits, xent.loss, Some(learning), None, None)
        }
        Purpose::Inference { chain } => {
            let forward = model.forward(tokens.clone().into(), None, scope)?;
            let xent = loss::cross_entropy(forward.logits.clone(), targets.clone().into(), vocab, scope)?;
            let next = next_ops(model.as_ref(), vocab, scope)?;
            let chain = match (chain, model.context_size()) {
                (Some(sampler), Some(1)) => {
                    Some(Chain::build(logits_table(model.as_ref(), vocab, scope)?, vocab, sampler, scope)?)
                }
                // The loop body builds the model again in its own graph: its variables are the
                // same resources, found by name.
                (Some(sampler), Some(block)) => Some(Chain::windowed(
                    block,
                    sampler,
                    |window, at, body| model_cfg.build(dtype, opts.seed, body)?.logits_at(window, at, body),
                    scope,
                )?),
                _ => None,
            };
            (forward.logits, xent.loss, None, Some(next), chain)
        }
    };
    let inits: Vec<Operation> = checkpointed.iter().map(|v| v.initializer.clone()).collect();
    let init = tfx::group("init", &inits, scope)?;
    let setters = Setters::new(&vars, scope)?;
    let mut reads = Vec::with_capacity(checkpointed.len());
    for v in &checkpointed {
        reads.push((v.clone(), v.read(&mut scope.with_op_name(&format!("read/{}", v.name)))?));
    }
    let prefix = tfx::placeholder("checkpoint/prefix", DataType::String, &[], scope)?;
    let restore = restore_ops(&checkpointed, prefix.clone().into(), scope)?;
    let train = match learning {
        Some((training, step_loss, grads, optimizer, train_op, summaries)) => {
            let (save, position, restore_position) = save_ops(&reads, prefix.clone().into(), scope)?;
            Some(TrainOps {
                training,
                step_loss,
                grads,
                optimizer,
                train_op,
                save,
                position,
                restore_position,
                summaries,
            })
        }
        None => None,
    };
    Ok(Parts {
        scope: root,
        model,
        dtype,
        tokens,
        targets,
        logits,
        loss,
        init,
        setters,
        reads,
        prefix,
        restore,
        train,
        next,
        chain,
    })
}

/// The next-character ops (see [`NextOps`]). A model whose next character depends on the last
/// one only reads its row of the [V, V] logits table, the same numbers the in-graph loop draws
/// from.
pub(super) fn next_ops(model: &dyn LanguageModel, vocab: i64, scope: &mut Scope) -> tensorflow::Result<NextOps> {
    let context = tfx::placeholder("sample/context", DataType::Int32, &[1, -1], scope)?;
    if let Some(spec) = model.cache() {
        let (h, d) = (spec.heads as i64, spec.head_dim as i64);
        let dtype = model.variables()[0].dtype;
        let past: Vec<Operation> = (0..spec.tensors)
            .map(|i| tfx::placeholder(&format!("sample/past/{i}"), dtype, &[1, h, -1, d], scope))
            .collect::<tensorflow::Result<_>>()?;
        let past_outputs: Vec<Output> = past.iter().map(|p| p.clone().into()).collect();
        let (logits, present) = model.forward_cached(context.clone().into(), &past_outputs, scope)?; // [1, L, V]
        let present = present
            .into_iter()
            .enumerate()
            .map(|(i, p)| {
                // (In the variables' dtype, as the past is fed: exact from a lower precision.)
                let p = tfx::cast(p, dtype, scope)?;
                Ok(ops::identity(p, &mut scope.with_op_name(&format!("sample/present/{i}")))?.into())
            })
            .collect::<tensorflow::Result<_>>()?;
        let logits = slice_last(logits, 3, scope)?; // [1, V]
        return Ok(NextOps { context, past, present, logits, cache: Some(spec) });
    }
    let logits = if model.context_size() == Some(1) {
        let table = logits_table(model, vocab, scope)?; // [V, V]
        let last = slice_last(context.clone().into(), 2, scope)?; // [1]
        ops::gather_v2(table, last, ops::constant(0i32, scope)?, scope)?.into() // [1, V]
    } else {
        let logits = model.forward(context.clone().into(), None, scope)?.logits; // [1, L, V]
        slice_last(logits, 3, scope)? // [1, V]
    };
    Ok(NextOps { context, past: Vec::new(), present: Vec::new(), logits, cache: None })
}

/// [V, V]: the logits after each character, the model run on each id alone.
pub(super) fn logits_table(model: &dyn LanguageModel, vocab: i64, scope: &mut Scope) -> tensorflow::Result<Output> {
    let v = vocab as i32;
    let range = ops::range(ops::constant(0i32, scope)?, ops::constant(v, scope)?, ops::constant(1i32, scope)?, scope)?;
    let ids = ops::reshape(range, tfx::shape_const(&[-1, 1], scope)?, scope)?; // [V, 1]
    let logits = model.forward(ids.into(), None, scope)?.logits; // [V, 1, V]
    Ok(ops::reshape(logits, tfx::shape_const(&[vocab, vocab], scope)?, scope)?.into())
}

/// `x[:, -1]` of a rank-2 or `x[:, -1, :]` of a rank-3 tensor.
pub(super) fn slice_last(x: Output, rank: usize, scope: &mut Scope) -> tensorflow::Result<Output> {
    let (begin, end, strides): (Vec<i32>, Vec<i32>, Vec<i32>) = match rank {
        2 => (vec![0, -1], vec![0, 0], vec![1, 1]),
        _ => (vec![0, -1, 0], vec![0, 0, 0], vec![1, 1, 1]),
    };
    let n = rank as u64;
    let mask = if rank == 2 { 0b01 } else { 0b101 };
    Ok(ops::StridedSlice::new()
        .begin_mask(mask)
        .end_mask(mask)
        .shrink_axis_mask(0b010)
        .build(
            x,
            tfx::constant(&begin, &[n], scope)?,
            tfx::constant(&end, &[n], scope)?,
            tfx::constant(&strides, &[n], scope)?,
            scope,
        )?
        .into())
}
