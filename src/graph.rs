//! The whole graph of a run, built once: the model's forward pass, the loss, its gradients
//! (the `GradientTape` equivalent), Adam, initialisation, weight feeds, checkpoint save/restore
//! and, for generation, the sampler; plus the session that runs it.

use anyhow::{ensure, Context, Result};
use tensorflow::{
    ops, DataType, Graph, Operation, Output, Scope, Session, SessionRunArgs, Tensor, TensorType,
};

use crate::model::{Dropout, Forward, LanguageModel, ModelConfig};
use crate::optim::{Adam, AdamConfig};
use crate::sample::{Sampler, SamplerConfig};
use crate::summary::Summaries;
use crate::tfx::{self, SessionConfig, Var};

/// How to build a [`ModelGraph`].
#[derive(Debug, Clone)]
pub struct GraphOptions {
    pub dtype: DataType,
    /// Graph seed: fixes the initial weights.
    pub seed: i64,
    pub adam: AdamConfig,
    /// TensorFlow device for every op (e.g. `/device:GPU:0`); `None` lets TensorFlow place them.
    pub device: Option<String>,
    /// Adds the sampling ops.
    pub sampler: Option<SamplerConfig>,
    /// Adds the TensorBoard summary ops.
    pub summaries: bool,
}

impl GraphOptions {
    pub fn new(seed: i64) -> Self {
        Self { dtype: DataType::Float, seed, adam: AdamConfig::default(), device: None, sampler: None, summaries: false }
    }
}

pub struct ModelGraph {
    /// The root scope, which owns the graph.
    pub scope: Scope,
    pub model: Box<dyn LanguageModel>,
    pub dtype: DataType,
    /// `x`: [B, T] int32 placeholder.
    pub tokens: Operation,
    /// `y`: [B, T] int32 placeholder.
    pub targets: Operation,
    /// bool scalar, false unless fed: true in train steps (dropout).
    pub training: Operation,
    /// [B, T, V]
    pub logits: Output,
    /// Mean sparse categorical cross-entropy over all B·T positions.
    pub loss: Output,
    /// d loss / d variable, in `model.variables()` order.
    pub grads: Vec<Output>,
    pub optimizer: Adam,
    /// One Adam step (fetch `loss` with it to get the pre-step loss, as Keras' train_step).
    pub train_op: Operation,
    /// Initialises every variable.
    pub init: Operation,
    /// For each model variable, a placeholder `<name>/value` and the op assigning it.
    pub setters: Vec<(Operation, Operation)>,
    /// String scalar placeholder naming the checkpoint prefix for `save` and `restore`.
    pub ckpt_prefix: Operation,
    /// int64 [2] placeholder saved with every checkpoint as `data/position`: (epoch, batches done
    /// in it), where the input pipeline resumes.
    pub ckpt_position: Operation,
    pub save: Operation,
    pub restore: Operation,
    /// `RestoreV2` of `data/position` alone (a checkpoint written elsewhere may lack it).
    pub restore_position: Operation,
    pub sampler: Option<Sampler>,
    pub summaries: Option<Summaries>,
}

impl ModelGraph {
    pub fn build(cfg: &ModelConfig, opts: &GraphOptions) -> Result<Self> {
        cfg.validate()?;
        Self::build_graph(cfg, opts).context("building the TensorFlow graph")
    }

    fn build_graph(cfg: &ModelConfig, opts: &GraphOptions) -> tensorflow::Result<Self> {
        let root = Scope::new_root_scope();
        let mut placed = root.with_device(opts.device.as_deref().unwrap_or(""));
        let scope = &mut placed;
        let dtype = opts.dtype;
        let model = cfg.build(dtype, opts.seed, scope)?;
        let vars = model.variables();

        let tokens = tfx::placeholder("x", DataType::Int32, &[-1, -1], scope)?;
        let targets = tfx::placeholder("y", DataType::Int32, &[-1, -1], scope)?;
        let optimizer = Adam::new(&vars, &opts.adam, dtype, scope)?;
        let no = ops::constant(false, scope)?;
        let training = ops::PlaceholderWithDefault::new().shape(tensorflow::Shape::from(Some(vec![]))).build(no, &mut scope.with_op_name("training"))?;
        let dropout = Dropout { training: training.clone().into(), step: optimizer.iterations.read(scope)?, seed: opts.seed };
        let forward = model.forward(tokens.clone().into(), Some(&dropout), scope)?;
        let logits = forward.logits.clone(); // [B, T, V]
        let (loss, grads, squares) = loss_and_grads(&forward, targets.clone().into(), &vars, cfg.vocab_size, scope)?;

        // AdamW decays matrices, not biases, norms or embedding tables.
        let decayed: Vec<bool> = vars.iter().map(|v| v.shape.len() >= 2 && !forward.lookups.iter().any(|l| l.var == v.name)).collect();
        let train_op = optimizer.apply(&vars, &grads, &squares, &decayed, &opts.adam, dtype, &mut scope.with_op_name("train_step"))?;

        let all_vars: Vec<Var> = vars.iter().cloned().chain(optimizer.variables()).collect();
        let inits: Vec<Operation> = all_vars.iter().map(|v| v.initializer.clone()).collect();
        let init = tfx::group("init", &inits, scope)?;

        let mut setters = Vec::with_capacity(vars.len());
        for var in &vars {
            let dims: Vec<i64> = var.shape.iter().map(|&d| d as i64).collect();
            let value = tfx::placeholder(&format!("{}/value", var.name), var.dtype, &dims, scope)?;
            let assign = ops::assign_variable_op(var.handle.clone(), value.clone(), &mut scope.with_op_name(&format!("{}/set", var.name)))?;
            setters.push((value, assign));
        }

        let ckpt = checkpoint_ops(&all_vars, scope)?;
        let sampler = match &opts.sampler {
            Some(s) => Some(Sampler::build(model.as_ref(), cfg.vocab_size, s, opts.seed, scope)?),
            None => None,
        };
        let summaries = match opts.summaries {
            true => Some(Summaries::build(loss.clone(), optimizer.learning_rate.clone(), scope)?),
            false => None,
        };
        Ok(Self {
            summaries,
            scope: root,
            model,
            dtype,
            tokens,
            targets,
            training,
            logits,
            loss,
            grads,
            optimizer,
            train_op,
            init,
            setters,
            ckpt_prefix: ckpt.prefix,
            ckpt_position: ckpt.position,
            save: ckpt.save,
            restore: ckpt.restore,
            restore_position: ckpt.restore_position,
            sampler,
        })
    }

    pub fn graph(&self) -> impl std::ops::Deref<Target = Graph> + '_ {
        self.scope.graph()
    }

    /// Every variable a checkpoint holds: the model's, then Adam's slots and step count.
    pub fn checkpoint_variables(&self) -> Vec<Var> {
        self.model.variables().into_iter().chain(self.optimizer.variables()).collect()
    }
}

/// Mean sparse categorical cross-entropy, its gradients, and for each embedding table the sum of
/// its per-lookup gradient rows squared (what Keras' Adam squares; see [`Adam::apply`]).
///
/// The C++ gradient registry has no gradient for `SparseSoftmaxCrossEntropyWithLogits`, but the
/// op's second output is d(per-token loss)/d(logits) = softmax − onehot; times 1/N it is
/// d(mean loss)/d(logits), exactly as Python's gradient of the op computes it. (The crate's
/// `add_gradients` frees its `dx` array before TensorFlow reads it, so that upstream gradient
/// cannot be passed directly.) It is passed through a surrogate
/// `Σ logits · stop_gradient(dlogits)`, whose gradient at the logits is `dlogits` exactly.
fn loss_and_grads(
    forward: &Forward,
    targets: Output,
    vars: &[Var],
    vocab_size: u64,
    scope: &mut Scope,
) -> tensorflow::Result<(Output, Vec<Output>, Vec<Option<Output>>)> {
    let logits = forward.logits.clone();
    let scope = &mut scope.new_sub_scope("loss");
    let dtype = logits.operation.get_attr_type("T")?;
    let shape = tfx::shape_const(&[-1, vocab_size as i64], scope)?;
    let logits_2d = ops::reshape(logits, shape, scope)?; // [N, V]
    let flat = tfx::shape_const(&[-1], scope)?;
    let labels = ops::reshape(targets, flat, scope)?; // [N]
    let xent = ops::sparse_softmax_cross_entropy_with_logits(logits_2d.clone(), labels.clone(), scope)?; // [N], [N, V]
    let axis = tfx::shape_const(&[0], scope)?;
    let loss: Output = ops::mean(xent.output(0), axis, &mut scope.with_op_name("loss"))?.into(); // []

    let n = ops::size(labels, scope)?;
    let n = ops::Cast::new().DstT(dtype).build(n, scope)?;
    let one = tfx::scalar(dtype, 1.0, scope)?;
    let inv_n = ops::real_div(one, n, scope)?; // 1/N
    let dlogits = ops::mul(xent.output(1), inv_n, scope)?; // [N, V]
    let dlogits = ops::stop_gradient(dlogits, scope)?;
    let surrogate = ops::mul(logits_2d, dlogits, scope)?; // [N, V]
    let axes = tfx::shape_const(&[0, 1], scope)?;
    let surrogate: Output = ops::sum(surrogate, axes, &mut scope.with_op_name("surrogate"))?.into(); // []
    let mut xs: Vec<Output> = vars.iter().map(|v| v.handle.clone()).collect();
    xs.extend(forward.lookups.iter().map(|l| l.rows.clone()));
    let names = vars.iter().map(|v| v.name.as_str()).chain(forward.lookups.iter().map(|l| l.var.as_str()));
    let grads = scope.graph_mut().add_gradients(Some("gradients"), &[surrogate], &xs, None)?;
    let mut grads = grads
        .into_iter()
        .zip(names)
        .map(|(g, name)| g.ok_or_else(|| tensorflow::Status::new_set_lossy(tensorflow::Code::Internal, &format!("no gradient reaches {name}"))))
        .collect::<tensorflow::Result<Vec<_>>>()?;
    let row_grads = grads.split_off(vars.len());

    let mut squares: Vec<Option<Output>> = vec![None; vars.len()];
    let scope = &mut scope.new_sub_scope("lookup_squares");
    for (lookup, d_rows) in forward.lookups.iter().zip(row_grads) {
        let i = vars.iter().position(|v| v.name == lookup.var).ok_or_else(|| {
            tensorflow::Status::new_set_lossy(tensorflow::Code::Internal, &format!("lookup of unknown variable {}", lookup.var))
        })?;
        let (rows, width) = (vars[i].shape[0] as i64, vars[i].shape[1] as i64);
        let d_rows = ops::reshape(d_rows, tfx::shape_const(&[-1, width], scope)?, scope)?; // [N, C]
        let ids = ops::reshape(lookup.ids.clone(), tfx::shape_const(&[-1], scope)?, scope)?; // [N]
        let num = ops::constant(rows as i32, scope)?;
        let sum = ops::unsorted_segment_sum(ops::square(d_rows, scope)?, ids, num, scope)?; // [V, C]
        squares[i] = Some(match squares[i].take() {
            Some(prev) => ops::add_v2(prev, sum, scope)?.into(),
            None => sum.into(),
        });
    }
    Ok((loss, grads, squares))
}

/// The checkpoint key of the input pipeline's position.
pub const POSITION_KEY: &str = "data/position";

struct CheckpointOps {
    prefix: Operation,
    position: Operation,
    save: Operation,
    restore: Operation,
    restore_position: Operation,
}

/// `SaveV2` of every variable and the data position, by name, at a fed prefix; `RestoreV2` of the
/// variables, and of the position on its own.
fn checkpoint_ops(vars: &[Var], scope: &mut Scope) -> tensorflow::Result<CheckpointOps> {
    let prefix = tfx::placeholder("checkpoint/prefix", DataType::String, &[], scope)?;
    let position = tfx::placeholder("checkpoint/position", DataType::Int64, &[2], scope)?;
    let mut names: Vec<String> = vars.iter().map(|v| v.name.clone()).collect();
    let dtypes: Vec<DataType> = vars.iter().map(|v| v.dtype).collect();
    let mut tensors = Vec::with_capacity(vars.len() + 1);
    for v in vars {
        tensors.push(v.read(&mut scope.with_op_name(&format!("save/read/{}", v.name)))?);
    }
    names.push(POSITION_KEY.to_string());
    tensors.push(position.clone().into());
    let save = tfx::save_v2(prefix.clone().into(), &names, &tensors, scope)?;
    names.pop();
    let restored = tfx::restore_v2("restore", prefix.clone().into(), &names, &dtypes, scope)?;
    let mut assigns = Vec::with_capacity(vars.len());
    for (i, v) in vars.iter().enumerate() {
        assigns.push(ops::assign_variable_op(
            v.handle.clone(),
            restored.output(i),
            &mut scope.with_op_name(&format!("restore/assign/{}", v.name)),
        )?);
    }
    let restore = tfx::group("restore/all", &assigns, scope)?;
    let restore_position = tfx::restore_v2("restore_position", prefix.clone().into(), &[POSITION_KEY.to_string()], &[DataType::Int64], scope)?;
    Ok(CheckpointOps { prefix, position, save, restore, restore_position })
}

/// A copy of a fetched tensor in a buffer of its own. TensorFlow may hand out one buffer for
/// several results (variables made from identical initial values share theirs until written),
/// and the crate lets a fetched tensor be written in place: a copy keeps such writes local.
fn owned<T: TensorType>(t: Tensor<T>) -> Result<Tensor<T>> {
    Ok(Tensor::new(t.dims()).with_values(&t[..])?)
}

/// A [`ModelGraph`] with its session.
pub struct Runner {
    pub g: ModelGraph,
    pub session: Session,
    /// `true`, fed to `training` in train steps.
    training: Tensor<bool>,
}

impl Runner {
    pub fn new(g: ModelGraph, config: SessionConfig) -> Result<Self> {
        let session = Session::new(&config.session_options()?, &g.graph()).context("creating the TensorFlow session")?;
        Ok(Self { g, session, training: Tensor::from(true) })
    }

    /// Runs the initialisers (fresh weights, zero slots).
    pub fn init(&self) -> Result<()> {
        let mut args = SessionRunArgs::new();
        args.add_target(&self.g.init);
        self.session.run(&mut args).context("initialising variables")
    }

    /// One Adam step on the batch; returns the loss before the step.
    pub fn train_step<T: TensorType + Copy>(&self, x: &Tensor<i32>, y: &Tensor<i32>) -> Result<T> {
        self.train_step_with(x, y, |_| {})
    }

    /// [`Runner::train_step`] with more feeds and targets added to the same run by `extra`.
    pub(crate) fn train_step_with<'a, T: TensorType + Copy>(
        &'a self,
        x: &'a Tensor<i32>,
        y: &'a Tensor<i32>,
        extra: impl FnOnce(&mut SessionRunArgs<'a>),
    ) -> Result<T> {
        let mut args = SessionRunArgs::new();
        args.add_feed(&self.g.tokens, 0, x);
        args.add_feed(&self.g.targets, 0, y);
        args.add_feed(&self.g.training, 0, &self.training);
        args.add_target(&self.g.train_op);
        extra(&mut args);
        let loss = args.request_fetch(&self.g.loss.operation, self.g.loss.index);
        self.session.run(&mut args).context("running the train step")?;
        Ok(args.fetch::<T>(loss)?[0])
    }

    /// Mean loss on a batch, without training.
    pub fn loss<T: TensorType + Copy>(&self, x: &Tensor<i32>, y: &Tensor<i32>) -> Result<T> {
        Ok(self.fetch_with_batch::<T>(std::slice::from_ref(&self.g.loss), x, y)?.remove(0)[0])
    }

    /// Fetches `outputs` with the batch fed.
    pub fn fetch_with_batch<T: TensorType>(&self, outputs: &[Output], x: &Tensor<i32>, y: &Tensor<i32>) -> Result<Vec<Tensor<T>>> {
        let mut args = SessionRunArgs::new();
        args.add_feed(&self.g.tokens, 0, x);
        args.add_feed(&self.g.targets, 0, y);
        let tokens: Vec<_> = outputs.iter().map(|o| args.request_fetch(&o.operation, o.index)).collect();
        self.session.run(&mut args).context("running the graph")?;
        tokens.into_iter().map(|t| owned(args.fetch::<T>(t)?)).collect()
    }

    /// Current values of the given variables.
    pub fn read<T: TensorType>(&self, vars: &[Var]) -> Result<Vec<Tensor<T>>> {
        let mut args = SessionRunArgs::new();
        let mut reads = Vec::with_capacity(vars.len());
        // The checkpoint's save op reads every variable; reuse those reads by name.
        for v in vars {
            let op = self.g.graph().operation_by_name_required(&format!("save/read/{}", v.name))?;
            reads.push(args.request_fetch(&op, 0));
        }
        self.session.run(&mut args).context("reading variables")?;
        reads.into_iter().map(|t| owned(args.fetch::<T>(t)?)).collect()
    }

    /// Sets the model's variables (in `model.variables()` order).
    pub fn set_weights<T: TensorType>(&self, values: &[Tensor<T>]) -> Result<()> {
        ensure!(values.len() == self.g.setters.len(), "expected {} weight tensors, got {}", self.g.setters.len(), values.len());
        let mut args = SessionRunArgs::new();
        for ((value, assign), t) in self.g.setters.iter().zip(values) {
            args.add_feed(value, 0, t);
            args.add_target(assign);
        }
        self.session.run(&mut args).context("setting weights")
    }

    /// Writes every variable and the data `position` (epoch, batches done in it) to the V2
    /// checkpoint `prefix` (`prefix.index`, `prefix.data-00000-of-00001`).
    pub fn save(&self, prefix: &str, position: [i64; 2]) -> Result<()> {
        let prefix_t = Tensor::from(prefix.to_string());
        let position = Tensor::new(&[2]).with_values(&position)?;
        let mut args = SessionRunArgs::new();
        args.add_feed(&self.g.ckpt_prefix, 0, &prefix_t);
        args.add_feed(&self.g.ckpt_position, 0, &position);
        args.add_target(&self.g.save);
        self.session.run(&mut args).with_context(|| format!("saving checkpoint {prefix}"))
    }

    /// Restores every variable from the V2 checkpoint `prefix`.
    pub fn restore(&self, prefix: &str) -> Result<()> {
        let prefix_t = Tensor::from(prefix.to_string());
        let mut args = SessionRunArgs::new();
        args.add_feed(&self.g.ckpt_prefix, 0, &prefix_t);
        args.add_target(&self.g.restore);
        self.session.run(&mut args).with_context(|| format!("restoring checkpoint {prefix}"))
    }

    /// The data position stored in the checkpoint `prefix`.
    pub fn restore_position(&self, prefix: &str) -> Result<[i64; 2]> {
        let prefix_t = Tensor::from(prefix.to_string());
        let mut args = SessionRunArgs::new();
        args.add_feed(&self.g.ckpt_prefix, 0, &prefix_t);
        let token = args.request_fetch(&self.g.restore_position, 0);
        self.session.run(&mut args).with_context(|| format!("reading {POSITION_KEY} from checkpoint {prefix}"))?;
        let t = args.fetch::<i64>(token)?;
        ensure!(t.len() == 2 && t[0] >= 0 && t[1] >= 0, "checkpoint {prefix}: {POSITION_KEY} is {:?}, not (epoch, batch)", &t[..]);
        Ok([t[0], t[1]])
    }
}
