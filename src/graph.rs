//! Graphs by purpose, and the [`Runner`] that owns one with its session.
//!
//! An inference graph (`generate`, `eval`, serving) holds the model's forward pass, the loss, the
//! next-character logits with their attention caches, and, for the bigram, the in-graph sampling
//! loop. A training graph adds the loss's gradients (the `GradientTape` equivalent), Adam,
//! TensorBoard summaries and the checkpoint's save ops. Both can initialise, set, read and
//! restore the model's weights.

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::path::Path;

use anyhow::{ensure, Context, Result};
use prost::Message;
use tensorflow::{ops, DataType, Operation, Output, Scope, Session, SessionRunArgs, Tensor, TensorType};

use crate::cluster::{Cluster, ClusterSpec};
use crate::device::SessionConfig;
use crate::loss::{self, CrossEntropy};
use crate::model::{Arch, CacheSpec, Dropout, Forward, LanguageModel, Lookup, ModelConfig};
use crate::optim::{Adam, AdamConfig};
use crate::proto;
use crate::sampler::{Cache, Chain, NextLogits, SamplerConfig};
use crate::summary::Summaries;
use crate::tfx::{self, Var};

/// The checkpoint key of the input pipeline's position.
pub const POSITION_KEY: &str = "data/position";

/// What a graph is for.
#[derive(Debug, Clone)]
pub enum Purpose {
    /// Forward pass, loss and next-character logits; with a sampler, the bigram's in-graph loop.
    Inference { chain: Option<SamplerConfig> },
    /// Adds gradients, the optimizer, checkpoint saving and (if asked) TensorBoard summaries.
    Training { adam: AdamConfig, summaries: bool },
}

/// How to build a graph.
#[derive(Debug, Clone)]
pub struct GraphOptions {
    /// Float or Double (the gradient checks).
    pub dtype: DataType,
    /// Graph seed: fixes the initial weights and dropout's masks.
    pub seed: i64,
    pub purpose: Purpose,
}

impl GraphOptions {
    pub fn inference(seed: i64) -> Self {
        Self { dtype: DataType::Float, seed, purpose: Purpose::Inference { chain: None } }
    }

    /// An inference graph with the in-graph sampling loop (models whose next character depends
    /// on the last one only).
    pub fn sampling(sampler: SamplerConfig) -> Self {
        Self { dtype: DataType::Float, seed: sampler.seed, purpose: Purpose::Inference { chain: Some(sampler) } }
    }

    pub fn training(seed: i64, adam: AdamConfig) -> Self {
        Self { dtype: DataType::Float, seed, purpose: Purpose::Training { adam, summaries: false } }
    }
}

/// The ops of a training graph.
struct TrainOps {
    /// bool scalar, false unless fed: true in train steps (dropout).
    training: Operation,
    /// [] the train step's loss (with dropout, on the replicas if any).
    step_loss: Output,
    /// d loss / d variable, in the model's variable order.
    grads: Vec<Output>,
    optimizer: Adam,
    /// One Adam step (fetch the loss with it to get the pre-step loss, as Keras' train_step).
    train_op: Operation,
    /// Every variable and the data position to the checkpoint at the fed prefix.
    save: Operation,
    /// int64 [2] placeholder saved as `data/position`: (epoch, batches done in it).
    position: Operation,
    /// `RestoreV2` of `data/position` alone.
    restore_position: Operation,
    summaries: Option<Summaries>,
}

/// The next-character ops of an inference graph: `sample/context` [1, L] (and, with caches, the
/// `sample/past/*` keys and values of earlier positions) → `logits` [1, V] of the next character
/// (and `sample/present/*`, the caches with the context's positions added).
struct NextOps {
    context: Operation,
    past: Vec<Operation>,
    present: Vec<Output>,
    logits: Output,
    cache: Option<CacheSpec>,
}

/// The graph's ops, as built.
struct Parts {
    /// The root scope, which owns the graph.
    scope: Scope,
    model: Box<dyn LanguageModel>,
    dtype: DataType,
    /// `x`: [B, T] int32.
    tokens: Operation,
    /// `y`: [B, T] int32.
    targets: Operation,
    /// [B, T, V] (an inference graph's without dropout, a training graph's with its `training` flag)
    logits: Output,
    /// [] mean cross-entropy
    loss: Output,
    /// Initialises every variable.
    init: Operation,
    /// For each model variable, a placeholder `<name>/value` and the op assigning it.
    setters: Vec<(Operation, Operation)>,
    /// Every checkpointed variable (the model's, then the optimizer's) and its read.
    reads: Vec<(Var, Output)>,
    /// String scalar naming the checkpoint for `restore` (and `save`).
    prefix: Operation,
    restore: Operation,
    train: Option<TrainOps>,
    next: Option<NextOps>,
    chain: Option<Chain>,
}

/// A graph with its session: the only way the rest of minigpt runs TensorFlow graphs.
pub struct Runner {
    g: Parts,
    session: RefCell<Session>,
    /// How the session was made (a new one replaces it after a worker fails).
    options: SessionConfig,
    /// The cluster a replicated training graph runs on.
    cluster: Option<Cluster>,
    /// `true`, fed to `training` in train steps (made once, not every step).
    yes: Tensor<bool>,
}

impl Runner {
    /// Builds `model`'s graph for `opts.purpose` on the session's device, and its session.
    pub fn new(model: &ModelConfig, opts: &GraphOptions, session: SessionConfig) -> Result<Self> {
        model.validate()?;
        // XLA by default for the transformer's training and evaluation graphs (`minigpt eval` over
        // every validation window of the quality configuration: 56 s against 69 s), not its
        // sampling loop.
        let compile = matches!(opts.purpose, Purpose::Training { .. } | Purpose::Inference { chain: None });
        let session = session.for_graph(model.arch == Arch::Gpt && compile);
        // The transformer's sampling loop runs one small pass per character: one thread each
        // (unless set) spends less on handing work out than it loses (2000 characters: 2.3 s
        // against 3.9 s with TensorFlow's choice, on 2 cores).
        let sampling = model.arch == Arch::Gpt && matches!(opts.purpose, Purpose::Inference { chain: Some(_) });
        let session = if sampling { session.threads_unless_set(1, 1) } else { session };
        let device = session.graph_device()?;
        let g = build(model, opts, device.as_deref(), &[]).context("building the TensorFlow graph")?;
        let options = session;
        let session =
            Session::new(&session.session_options()?, &g.scope.graph()).context("creating the TensorFlow session")?;
        Ok(Self { g, session: RefCell::new(session), options, cluster: None, yes: Tensor::from(true) })
    }

    /// Builds `model`'s training graph with the variables on the chief (this process) and one
    /// replica of the step per worker of `cluster`, and its session on the cluster, once every
    /// worker answers (waiting up to the cluster's worker timeout).
    pub fn on_cluster(
        model: &ModelConfig,
        opts: &GraphOptions,
        session: SessionConfig,
        cluster: Cluster,
    ) -> Result<Self> {
        model.validate()?;
        ensure!(matches!(opts.purpose, Purpose::Training { .. }), "only training runs on a cluster");
        let session = session.for_graph(false);
        let suffix = session.device_suffix();
        let replicas: Vec<String> =
            (0..cluster.spec.workers.len()).map(|i| format!("{}{suffix}", ClusterSpec::worker(i))).collect();
        let chief = format!("{}{suffix}", cluster.chief_device());
        let g = build(model, opts, Some(&chief), &replicas).context("building the TensorFlow graph")?;
        cluster.wait_for_workers()?;
        let new = Session::new(&cluster.session_options(session.prepare())?, &g.scope.graph())
            .context("creating the TensorFlow session on the cluster")?;
        Ok(Self { g, session: RefCell::new(new), options: session, cluster: Some(cluster), yes: Tensor::from(true) })
    }

    /// The cluster of a replicated training graph.
    pub fn cluster(&self) -> Option<&Cluster> {
        self.cluster.as_ref()
    }

    /// Replaces the session with a new one on the same graph (its variables are uninitialised:
    /// restore them). After a worker fails, TensorFlow keeps the old session aborted.
    pub fn reconnect(&self) -> Result<()> {
        let options = match &self.cluster {
            Some(cluster) => cluster.session_options(self.options.prepare())?,
            None => self.options.session_options()?,
        };
        let new = Session::new(&options, &self.g.scope.graph()).context("creating a new TensorFlow session")?;
        self.session.replace(new);
        Ok(())
    }

    fn session(&self) -> std::cell::Ref<'_, Session> {
        self.session.borrow()
    }

    pub fn model(&self) -> &dyn LanguageModel {
        self.g.model.as_ref()
    }

    /// The model's trainable variables, in a fixed order.
    pub fn variables(&self) -> Vec<Var> {
        self.g.model.variables()
    }

    fn training(&self) -> Result<&TrainOps> {
        self.g.train.as_ref().context("this graph was built for inference: it has no training ops")
    }

    /// Runs the initialisers (fresh weights, zero slots).
    pub fn init(&self) -> Result<()> {
        let mut args = SessionRunArgs::new();
        args.add_target(&self.g.init);
        self.session().run(&mut args).context("initialising variables")
    }

    /// Sets the model's variables (in [`Runner::variables`] order).
    pub fn set_weights<T: TensorType>(&self, values: &[Tensor<T>]) -> Result<()> {
        ensure!(
            values.len() == self.g.setters.len(),
            "expected {} weight tensors, got {}",
            self.g.setters.len(),
            values.len()
        );
        let mut args = SessionRunArgs::new();
        for ((value, assign), t) in self.g.setters.iter().zip(values) {
            args.add_feed(value, 0, t);
            args.add_target(assign);
        }
        self.session().run(&mut args).context("setting weights")
    }

    /// Current values of the variables named `names`.
    fn read<T: TensorType>(&self, names: impl Iterator<Item = String>) -> Result<Vec<Tensor<T>>> {
        let mut args = SessionRunArgs::new();
        let mut tokens = Vec::new();
        for name in names {
            let (_, read) =
                self.g.reads.iter().find(|(v, _)| v.name == name).with_context(|| format!("no variable {name}"))?;
            tokens.push(args.request_fetch(&read.operation, read.index));
        }
        self.session().run(&mut args).context("reading variables")?;
        tokens.into_iter().map(|t| owned(args.fetch::<T>(t)?)).collect()
    }

    /// The model's weights (in [`Runner::variables`] order).
    pub fn weights<T: TensorType>(&self) -> Result<Vec<Tensor<T>>> {
        self.read(self.variables().into_iter().map(|v| v.name))
    }

    /// Adam's first and second moments (m, v), in [`Runner::variables`] order.
    pub fn adam_moments<T: TensorType>(&self) -> Result<[Vec<Tensor<T>>; 2]> {
        let adam = &self.training()?.optimizer;
        Ok([self.read(adam.m.iter().map(|v| v.name.clone()))?, self.read(adam.v.iter().map(|v| v.name.clone()))?])
    }

    /// Steps applied so far (Keras' `optimizer.iterations`).
    pub fn iterations(&self) -> Result<i64> {
        let adam = &self.training()?.optimizer;
        Ok(self.read::<i64>(std::iter::once(adam.iterations.name.clone()))?[0][0])
    }

    /// The learning rate of the coming step.
    pub fn learning_rate<T: TensorType + Copy>(&self) -> Result<T> {
        let lr = self.training()?.optimizer.learning_rate.clone();
        let mut args = SessionRunArgs::new();
        let token = args.request_fetch(&lr.operation, lr.index);
        self.session().run(&mut args).context("reading the learning rate")?;
        Ok(args.fetch::<T>(token)?[0])
    }

    /// Fetches `outputs` with the batch fed; `train_mode` feeds the training flag (dropout on).
    fn fetch<T: TensorType>(
        &self,
        outputs: &[Output],
        x: &Tensor<i32>,
        y: Option<&Tensor<i32>>,
        train_mode: bool,
    ) -> Result<Vec<Tensor<T>>> {
        let mut args = SessionRunArgs::new();
        args.add_feed(&self.g.tokens, 0, x);
        if let Some(y) = y {
            args.add_feed(&self.g.targets, 0, y);
        }
        if train_mode {
            args.add_feed(&self.training()?.training, 0, &self.yes);
        }
        let tokens: Vec<_> = outputs.iter().map(|o| args.request_fetch(&o.operation, o.index)).collect();
        self.session().run(&mut args).context("running the graph")?;
        tokens.into_iter().map(|t| owned(args.fetch::<T>(t)?)).collect()
    }

    /// The graph's names (`op:index`) of the tokens [B, T] fed and the logits [B, T, V] computed.
    pub fn serving_names(&self) -> Result<(String, String)> {
        let logits = &self.g.logits;
        Ok((format!("{}:0", self.g.tokens.name()?), format!("{}:{}", logits.operation.name()?, logits.index)))
    }

    /// tokens [B, T] → logits [B, T, V].
    pub fn logits<T: TensorType>(&self, x: &Tensor<i32>) -> Result<Tensor<T>> {
        Ok(self.fetch(std::slice::from_ref(&self.g.logits), x, None, false)?.remove(0))
    }

    /// Mean loss on a batch, without training (no dropout).
    pub fn loss<T: TensorType + Copy>(&self, x: &Tensor<i32>, y: &Tensor<i32>) -> Result<T> {
        self.loss_in_mode(x, y, false)
    }

    /// Mean loss on a batch as a train step (`train_mode`, dropout on) or evaluation sees it,
    /// without changing any variable.
    pub fn loss_in_mode<T: TensorType + Copy>(&self, x: &Tensor<i32>, y: &Tensor<i32>, train_mode: bool) -> Result<T> {
        Ok(self.fetch::<T>(std::slice::from_ref(&self.g.loss), x, Some(y), train_mode)?[0][0])
    }

    /// The loss and its gradient for every model variable, without changing any variable.
    pub fn loss_and_gradients<T: TensorType + Copy>(
        &self,
        x: &Tensor<i32>,
        y: &Tensor<i32>,
        train_mode: bool,
    ) -> Result<(T, Vec<Tensor<T>>)> {
        let train = self.training()?;
        let mut outputs = vec![train.step_loss.clone()];
        outputs.extend(train.grads.iter().cloned());
        let mut got = self.fetch::<T>(&outputs, x, Some(y), train_mode)?;
        let loss = got.remove(0)[0];
        Ok((loss, got))
    }

    /// One Adam step on the batch; returns the loss before the step.
    pub fn train_step<T: TensorType + Copy>(&self, x: &Tensor<i32>, y: &Tensor<i32>) -> Result<T> {
        self.train_step_with(x, y, None)
    }

    /// [`Runner::train_step`] that also writes its loss and learning rate to TensorBoard at `step`.
    pub fn train_step_logged(&self, x: &Tensor<i32>, y: &Tensor<i32>, step: u64) -> Result<f32> {
        self.train_step_with(x, y, Some(step))
    }

    fn train_step_with<T: TensorType + Copy>(
        &self,
        x: &Tensor<i32>,
        y: &Tensor<i32>,
        logged_at: Option<u64>,
    ) -> Result<T> {
        let train = self.training()?;
        let step = logged_at.map(|step| Tensor::from(step as i64));
        let mut args = SessionRunArgs::new();
        args.add_feed(&self.g.tokens, 0, x);
        args.add_feed(&self.g.targets, 0, y);
        args.add_feed(&train.training, 0, &self.yes);
        args.add_target(&train.train_op);
        if let Some(step) = &step {
            let summaries = train.summaries.as_ref().context("the graph was built without summary ops")?;
            summaries.add_graph_writes(&mut args, step);
        }
        let loss = args.request_fetch(&train.step_loss.operation, train.step_loss.index);
        self.session().run(&mut args).context("running the train step")?;
        Ok(args.fetch::<T>(loss)?[0])
    }

    /// One Adam step traced by TensorFlow (`RunOptions.trace_level = FULL_TRACE`): the loss and
    /// the serialized `RunMetadata` (its `step_stats` time every op on every device).
    pub fn train_step_traced(&self, x: &Tensor<i32>, y: &Tensor<i32>) -> Result<(f32, Vec<u8>)> {
        let train = self.training()?;
        let options =
            proto::RunOptions { trace_level: proto::run_options::TraceLevel::FullTrace as i32, ..Default::default() };
        let options = options.encode_to_vec();
        let mut args = SessionRunArgs::new();
        args.add_feed(&self.g.tokens, 0, x);
        args.add_feed(&self.g.targets, 0, y);
        args.add_feed(&train.training, 0, &self.yes);
        args.add_target(&train.train_op);
        args.set_run_options(&options);
        args.set_request_metadata(true);
        let loss = args.request_fetch(&train.step_loss.operation, train.step_loss.index);
        self.session().run(&mut args).context("running the traced train step")?;
        let metadata = args.get_metadata().unwrap_or_default().to_vec();
        Ok((args.fetch::<f32>(loss)?[0], metadata))
    }

    fn summaries(&self) -> Result<&Summaries> {
        self.training()?.summaries.as_ref().context("the graph was built without summary ops")
    }

    /// Opens (creates) the TensorBoard event file in `dir`.
    pub fn open_events(&self, dir: &Path) -> Result<()> {
        self.summaries()?.open(&self.session(), dir)
    }

    /// Writes `values` (tags from [`crate::summary::FED_TAGS`]) at `step`, then flushes.
    pub fn write_scalars(&self, step: u64, values: &[(&str, f32)]) -> Result<()> {
        self.summaries()?.write(&self.session(), step, values)
    }

    /// Writes every checkpointed variable and the data `position` (epoch, batches done in it)
    /// to the V2 checkpoint `prefix` (`prefix.index`, `prefix.data-00000-of-00001`).
    pub fn save(&self, prefix: &str, position: [i64; 2]) -> Result<()> {
        let train = self.training()?;
        let prefix_t = Tensor::from(prefix.to_string());
        let position = Tensor::new(&[2]).with_values(&position)?;
        let mut args = SessionRunArgs::new();
        args.add_feed(&self.g.prefix, 0, &prefix_t);
        args.add_feed(&train.position, 0, &position);
        args.add_target(&train.save);
        self.session().run(&mut args).with_context(|| format!("saving checkpoint {prefix}"))
    }

    /// Restores every checkpointed variable (an inference graph: the model's) from `prefix`.
    pub fn restore(&self, prefix: &str) -> Result<()> {
        let prefix_t = Tensor::from(prefix.to_string());
        let mut args = SessionRunArgs::new();
        args.add_feed(&self.g.prefix, 0, &prefix_t);
        args.add_target(&self.g.restore);
        self.session().run(&mut args).with_context(|| format!("restoring checkpoint {prefix}"))
    }

    /// The data position stored in the checkpoint `prefix`.
    pub fn restore_position(&self, prefix: &str) -> Result<[i64; 2]> {
        let train = self.training()?;
        let prefix_t = Tensor::from(prefix.to_string());
        let mut args = SessionRunArgs::new();
        args.add_feed(&self.g.prefix, 0, &prefix_t);
        let token = args.request_fetch(&train.restore_position, 0);
        self.session().run(&mut args).with_context(|| format!("reading {POSITION_KEY} from checkpoint {prefix}"))?;
        let t = args.fetch::<i64>(token)?;
        ensure!(
            t.len() == 2 && t[0] >= 0 && t[1] >= 0,
            "checkpoint {prefix}: {POSITION_KEY} is {:?}, not (epoch, batch)",
            &t[..]
        );
        Ok([t[0], t[1]])
    }

    /// The tensors a SavedModel's signatures and saver name. Adds `export/train_step/loss` (the
    /// loss, fetched after a train step) and `export/save/filename` (the prefix, after a save).
    pub fn serving_tensors(&self) -> Result<ServingTensors> {
        let train = self.training()?;
        let scope = self.g.scope.new_sub_scope("export");
        let step = std::slice::from_ref(&train.train_op);
        let loss = ops::identity(
            self.g.loss.clone(),
            &mut scope.with_op_name("train_step/loss").with_control_dependencies(step),
        )?;
        let save = std::slice::from_ref(&train.save);
        let filename = ops::identity(
            self.g.prefix.clone(),
            &mut scope.with_op_name("save/filename").with_control_dependencies(save),
        )?;
        let name = |o: &Output| -> Result<String> { Ok(format!("{}:{}", o.operation.name()?, o.index)) };
        Ok(ServingTensors {
            tokens: name(&self.g.tokens.clone().into())?,
            targets: name(&self.g.targets.clone().into())?,
            logits: name(&self.g.logits)?,
            loss_after_step: name(&loss.into())?,
            filename: name(&self.g.prefix.clone().into())?,
            save: name(&filename.into())?,
            restore: self.g.restore.name()?,
        })
    }

    /// The serialized `GraphDef`.
    pub fn graph_def(&self) -> Result<Vec<u8>> {
        Ok(self.g.scope.graph().graph_def()?)
    }

    /// The graph as text (TensorFlow's printer).
    pub fn graph_text(&self) -> Result<String> {
        Ok(tfx::graph_text(&self.g.scope.graph())?)
    }

    /// The type of every op in the graph.
    pub fn op_types(&self) -> BTreeSet<String> {
        self.g.scope.graph().operation_iter().filter_map(|op| op.op_type().ok()).collect()
    }

    /// The names of every op in the graph.
    pub fn op_names(&self) -> Vec<String> {
        self.g.scope.graph().operation_iter().filter_map(|op| op.name().ok()).collect()
    }
}

/// Tensor and op names (`op:index`) a SavedModel refers to.
pub struct ServingTensors {
    pub tokens: String,
    pub targets: String,
    pub logits: String,
    pub loss_after_step: String,
    pub filename: String,
    pub save: String,
    pub restore: String,
}

impl NextLogits for Runner {
    fn next_logits(&self, window: &[i32], cache: &mut Cache) -> Result<Vec<f32>> {
        let next = self.g.next.as_ref().context("this graph was built for training: it has no generation ops")?;
        ensure!(self.g.dtype == DataType::Float, "generation runs float32 graphs");
        ensure!(!window.is_empty(), "the prompt is empty: give at least one character");
        let Some(spec) = next.cache else {
            let context = Tensor::new(&[1, window.len() as u64]).with_values(window)?;
            let mut args = SessionRunArgs::new();
            args.add_feed(&next.context, 0, &context);
            let logits = args.request_fetch(&next.logits.operation, next.logits.index);
            self.session().run(&mut args).context("sampling")?;
            return Ok(args.fetch::<f32>(logits)?.to_vec());
        };
        if cache.tensors.is_empty() || cache.len >= window.len() {
            cache.len = 0;
            cache.tensors = (0..next.past.len()).map(|_| Tensor::new(&[1, spec.heads, 0, spec.head_dim])).collect();
        }
        let new = &window[cache.len..];
        let tokens = Tensor::new(&[1, new.len() as u64]).with_values(new)?;
        // Once the window is full it slides with the next character: no use for the caches then.
        let keep = self.context_size().is_none_or(|block| window.len() < block);
        let past = std::mem::take(&mut cache.tensors);
        let (logits, present) = {
            let mut args = SessionRunArgs::new();
            args.add_feed(&next.context, 0, &tokens);
            for (op, t) in next.past.iter().zip(&past) {
                args.add_feed(op, 0, t);
            }
            let logits = args.request_fetch(&next.logits.operation, next.logits.index);
            let present: Vec<_> = if keep {
                next.present.iter().map(|p| args.request_fetch(&p.operation, p.index)).collect()
            } else {
                Vec::new()
            };
            self.session().run(&mut args).context("sampling")?;
            let present: Vec<Tensor<f32>> = present.into_iter().map(|t| args.fetch(t)).collect::<Result<_, _>>()?;
            (args.fetch::<f32>(logits)?.to_vec(), present)
        };
        cache.len = if keep { window.len() } else { 0 };
        cache.tensors = present;
        Ok(logits)
    }

    fn context_size(&self) -> Option<usize> {
        self.g.model.context_size()
    }

    fn chain(&self, prompt: &[i32], count: usize, sampler: &SamplerConfig) -> Result<Option<Vec<i32>>> {
        match &self.g.chain {
            Some(chain) if chain.sampler.seed == sampler.seed && chain.sampler.top_k == sampler.top_k => {
                Ok(Some(chain.run(&self.session(), prompt, count, sampler.temperature)?))
            }
            _ => Ok(None),
        }
    }
}

/// The graph of `model` for `opts.purpose`, every op on `device`; a training graph's step on
/// the `replicas` devices if any (data parallelism, see [`replicated`]).
fn build(
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
            let (forward, xent, step_loss, grads, squares) = if replicas.is_empty() {
                let forward = model.forward(tokens.clone().into(), Some(&dropout), scope)?;
                let xent = loss::cross_entropy(forward.logits.clone(), targets.clone().into(), vocab, scope)?;
                let (grads, row_grads) = gradients(&xent, &forward, &vars, scope)?;
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
            let train_op = optimizer.apply(&vars, &grads, &squares, &decayed, &mut scope.with_op_name("train_step"))?;
            let summaries = match summaries {
                true => Some(Summaries::build(step_loss.clone(), optimizer.learning_rate.clone(), scope)?),
                false => None,
            };
            checkpointed.extend(optimizer.variables());
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
    let mut setters = Vec::with_capacity(vars.len());
    for var in &vars {
        let dims: Vec<i64> = var.shape.iter().map(|&d| d as i64).collect();
        let value = tfx::placeholder(&format!("{}/value", var.name), var.dtype, &dims, scope)?;
        let assign = ops::assign_variable_op(
            var.handle.clone(),
            value.clone(),
            &mut scope.with_op_name(&format!("{}/set", var.name)),
        )?;
        setters.push((value, assign));
    }
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
fn next_ops(model: &dyn LanguageModel, vocab: i64, scope: &mut Scope) -> tensorflow::Result<NextOps> {
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
            .map(|(i, p)| Ok(ops::identity(p, &mut scope.with_op_name(&format!("sample/present/{i}")))?.into()))
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
fn logits_table(model: &dyn LanguageModel, vocab: i64, scope: &mut Scope) -> tensorflow::Result<Output> {
    let v = vocab as i32;
    let range = ops::range(ops::constant(0i32, scope)?, ops::constant(v, scope)?, ops::constant(1i32, scope)?, scope)?;
    let ids = ops::reshape(range, tfx::shape_const(&[-1, 1], scope)?, scope)?; // [V, 1]
    let logits = model.forward(ids.into(), None, scope)?.logits; // [V, 1, V]
    Ok(ops::reshape(logits, tfx::shape_const(&[vocab, vocab], scope)?, scope)?.into())
}

/// `x[:, -1]` of a rank-2 or `x[:, -1, :]` of a rank-3 tensor.
fn slice_last(x: Output, rank: usize, scope: &mut Scope) -> tensorflow::Result<Output> {
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

/// The loss's gradients: for each variable, and for each embedding lookup of its looked-up rows.
///
/// The C++ gradient registry has no gradient for `SparseSoftmaxCrossEntropyWithLogits`, but the
/// op's second output is d(per-token loss)/d(logits) = softmax − onehot; times 1/N it is
/// d(mean loss)/d(logits), exactly as Python's gradient of the op computes it. (The crate's
/// `add_gradients` frees its `dx` array before TensorFlow reads it, so that upstream gradient
/// cannot be passed directly.) It is passed through a surrogate
/// `Σ logits · stop_gradient(dlogits)`, whose gradient at the logits is `dlogits` exactly.
fn gradients(
    xent: &CrossEntropy,
    forward: &Forward,
    vars: &[Var],
    scope: &mut Scope,
) -> tensorflow::Result<(Vec<Output>, Vec<Output>)> {
    let scope = &mut scope.new_sub_scope("loss_gradient");
    let dtype = xent.logits_2d.operation.output_type(xent.logits_2d.index as usize);
    let n = ops::size(xent.labels.clone(), scope)?;
    let n = ops::Cast::new().DstT(dtype).build(n, scope)?;
    let one = tfx::scalar(dtype, 1.0, scope)?;
    let inv_n = ops::real_div(one, n, scope)?; // 1/N
    let dlogits = ops::mul(xent.backprop.clone(), inv_n, scope)?; // [N, V]
    let dlogits = ops::stop_gradient(dlogits, scope)?;
    let surrogate = ops::mul(xent.logits_2d.clone(), dlogits, scope)?; // [N, V]
    let axes = tfx::shape_const(&[0, 1], scope)?;
    let surrogate: Output = ops::sum(surrogate, axes, &mut scope.with_op_name("surrogate"))?.into(); // []
    let mut xs: Vec<Output> = vars.iter().map(|v| v.handle.clone()).collect();
    xs.extend(forward.lookups.iter().map(|l| l.rows.clone()));
    let names = vars.iter().map(|v| v.name.as_str()).chain(forward.lookups.iter().map(|l| l.var.as_str()));
    let grads = scope.graph_mut().add_gradients(Some("gradients"), &[surrogate], &xs, None)?;
    let internal = |message: &str| tensorflow::Status::new_set_lossy(tensorflow::Code::Internal, message);
    let mut grads = grads
        .into_iter()
        .zip(names)
        .map(|(g, name)| g.ok_or_else(|| internal(&format!("no gradient reaches {name}"))))
        .collect::<tensorflow::Result<Vec<_>>>()?;
    let row_grads = grads.split_off(vars.len());
    Ok((grads, row_grads))
}

/// For each embedding table, the sum of its per-lookup gradient rows squared (what Keras' Adam
/// squares; see [`Adam::apply`]): `row_grads[j]` is d loss / d `lookups[j].rows`.
fn lookup_squares(
    lookups: &[Lookup],
    row_grads: Vec<Output>,
    vars: &[Var],
    scope: &mut Scope,
) -> tensorflow::Result<Vec<Option<Output>>> {
    let mut squares: Vec<Option<Output>> = vec![None; vars.len()];
    let scope = &mut scope.new_sub_scope("lookup_squares");
    for (lookup, d_rows) in lookups.iter().zip(row_grads) {
        let i = lookup_var(lookup, vars)?;
        let sum = lookup_square(lookup, d_rows, &vars[i], scope)?;
        add_to(&mut squares[i], sum, scope)?;
    }
    Ok(squares)
}

/// The index in `vars` of the variable `lookup` reads.
fn lookup_var(lookup: &Lookup, vars: &[Var]) -> tensorflow::Result<usize> {
    vars.iter().position(|v| v.name == lookup.var).ok_or_else(|| {
        tensorflow::Status::new_set_lossy(tensorflow::Code::Internal, &format!("lookup of unknown {}", lookup.var))
    })
}

/// [V, C]: one lookup's gradient rows `d_rows` squared and summed per id.
fn lookup_square(lookup: &Lookup, d_rows: Output, var: &Var, scope: &mut Scope) -> tensorflow::Result<Output> {
    let (rows, width) = (var.shape[0] as i64, var.shape[1] as i64);
    let d_rows = ops::reshape(d_rows, tfx::shape_const(&[-1, width], scope)?, scope)?; // [N, C]
    let ids = ops::reshape(lookup.ids.clone(), tfx::shape_const(&[-1], scope)?, scope)?; // [N]
    let num = ops::constant(rows as i32, scope)?;
    Ok(ops::unsorted_segment_sum(ops::square(d_rows, scope)?, ids, num, scope)?.into())
    // [V, C]
}

/// `total += value` (`total = value` the first time).
fn add_to(total: &mut Option<Output>, value: Output, scope: &mut Scope) -> tensorflow::Result<()> {
    *total = Some(match total.take() {
        Some(prev) => ops::add_v2(prev, value, scope)?.into(),
        None => value,
    });
    Ok(())
}

/// Whether a lookup's ids are per window ([B, T] tokens) rather than shared by every window
/// ([T] positions).
fn per_window(lookup: &Lookup, scope: &Scope) -> tensorflow::Result<bool> {
    Ok(scope.graph().tensor_shape(lookup.ids.clone())?.dims() != Some(1))
}

/// The train step computed by one replica per device of `replicas` (TensorFlow's in-graph
/// replication): replica `i` runs the forward pass, loss and gradients on the `i`-th slice of the
/// batch, with the weights read on the chief. Each replica is built in a graph of its own, with
/// the model's variables there standing for the chief's, and imported under `replica_<i>/` with
/// `replicas[i]` as the default device, so every op of it, gradients included, runs on its
/// worker. The chief averages the losses and gradients. For Keras' per-lookup squares
/// ([`lookup_squares`]): a lookup of tokens (ids [B, T]) has its squares summed on each worker,
/// and the chief adds them up divided by N² (each replica's rows are those of its own mean loss,
/// N times the batch's); a lookup every window shares (positions, ids [T]) has one row per
/// position summed over the batch, so the workers send the rows, and the chief sums them, divides
/// by N and squares. Nothing of the result exists until every replica has delivered, so a step
/// whose worker fails changes no variable.
///
/// `batch`: tokens [B, T], targets [B, T], the training flag and the optimizer step; `lookups`:
/// the chief's forward pass's. Returns the loss, the gradients and the squares.
fn replicated(
    model_cfg: &ModelConfig,
    opts: &GraphOptions,
    vars: &[Var],
    lookups: &[Lookup],
    batch: [Output; 4],
    replicas: &[String],
    scope: &mut Scope,
) -> tensorflow::Result<(Output, Vec<Output>, Vec<Option<Output>>)> {
    let scope = &mut scope.new_sub_scope("replicas");
    let [tokens, targets, training, step] = batch;
    let n = replicas.len();
    let axis = ops::constant(0i32, scope)?;
    let xs = ops::Split::new().num_split(n as i64).build(axis.clone(), tokens, scope)?; // N × [B/N, T]
    let ys = ops::Split::new().num_split(n as i64).build(axis, targets, scope)?; // N × [B/N, T]
    let reads: Vec<Output> =
        vars.iter().map(|v| v.read(&mut scope.with_op_name(&format!("read/{}", v.name)))).collect::<Result<_, _>>()?;
    let nul = |_| tensorflow::Status::new_set_lossy(tensorflow::Code::InvalidArgument, "NUL in a name");
    let mut outputs: Vec<Vec<Output>> = Vec::with_capacity(n); // per replica: loss, grads, per lookup
    for (i, device) in replicas.iter().enumerate() {
        // Replica i's dropout masks are keyed by seed + i: one replica draws the single-process masks.
        let replica = replica_graph_def(model_cfg, opts.dtype, opts.seed + i as i64)?;
        let mut import = tensorflow::ImportGraphDefOptions::new();
        import.set_prefix(&format!("replica_{i}")).map_err(nul)?;
        import.set_default_device(device).map_err(nul)?;
        let inputs = [("x", xs.output(i)), ("y", ys.output(i)), ("training", training.clone()), ("step", step.clone())];
        for (name, input) in inputs {
            import.add_input_mapping(name, 0, &input).map_err(nul)?;
        }
        for (read, var) in replica.reads {
            let k = vars.iter().position(|v| v.name == var).expect("a replica reads only model variables");
            import.add_input_mapping(&read, 0, &reads[k]).map_err(nul)?;
        }
        let mut graph = scope.graph_mut();
        graph.import_graph_def(&replica.graph_def, &import)?;
        let get = |name: String| -> tensorflow::Result<Output> {
            Ok(graph.operation_by_name_required(&format!("replica_{i}/out/{name}"))?.into())
        };
        let mut got = vec![get("loss".into())?];
        got.extend((0..vars.len()).map(|k| get(format!("grad/{k}"))).collect::<tensorflow::Result<Vec<_>>>()?);
        got.extend((0..lookups.len()).map(|j| get(format!("lookup/{j}"))).collect::<tensorflow::Result<Vec<_>>>()?);
        outputs.push(got);
    }
    // Everything every replica delivers, as a control barrier for the combined results.
    let delivered: Vec<Operation> = outputs.iter().flatten().map(|o| o.operation.clone()).collect();
    let combine = |j: usize, scale: f64, name: &str, scope: &mut Scope| -> tensorflow::Result<Output> {
        let mut sum = outputs[0][j].clone();
        for replica in &outputs[1..] {
            sum = ops::add_v2(sum, replica[j].clone(), scope)?.into();
        }
        let scaled = ops::mul(sum, tfx::scalar(opts.dtype, scale, scope)?, scope)?;
        let mut barrier = scope.with_op_name(name).with_control_dependencies(&delivered);
        Ok(ops::identity(scaled, &mut barrier)?.into())
    };
    let inv_n = 1.0 / n as f64;
    let loss = combine(0, inv_n, "loss", scope)?;
    let grads =
        (0..vars.len()).map(|k| combine(1 + k, inv_n, &format!("grad/{k}"), scope)).collect::<Result<Vec<_>, _>>()?;
    let mut squares: Vec<Option<Output>> = vec![None; vars.len()];
    for (j, lookup) in lookups.iter().enumerate() {
        let k = lookup_var(lookup, vars)?;
        let square = match per_window(lookup, scope)? {
            true => combine(1 + vars.len() + j, inv_n * inv_n, &format!("square/{j}"), scope)?,
            false => {
                let rows = combine(1 + vars.len() + j, inv_n, &format!("rows/{j}"), scope)?;
                lookup_square(lookup, rows, &vars[k], scope)?
            }
        };
        add_to(&mut squares[k], square, scope)?;
    }
    Ok((loss, grads, squares))
}

/// One replica of the train step, as a `GraphDef` to import.
struct ReplicaDef {
    /// Placeholders `x`, `y` [b, T] int32, `training` (bool) and `step` (int64); outputs
    /// `out/loss`, `out/grad/<k>` for each variable and `out/lookup/<j>` for each embedding lookup:
    /// its squares [V, C] for a lookup of tokens, its gradient rows [T, C] for one of positions.
    graph_def: Vec<u8>,
    /// The `ReadVariableOp`s of the model's variables and the variable each reads, to be mapped
    /// to the chief's reads.
    reads: Vec<(String, String)>,
}

/// Builds one replica of `model_cfg`'s train step (see [`ReplicaDef`]).
fn replica_graph_def(model_cfg: &ModelConfig, dtype: DataType, seed: i64) -> tensorflow::Result<ReplicaDef> {
    let mut scope = Scope::new_root_scope();
    let scope = &mut scope;
    let model = model_cfg.build(dtype, seed, scope)?;
    let vars = model.variables();
    let tokens = tfx::placeholder("x", DataType::Int32, &[-1, -1], scope)?;
    let targets = tfx::placeholder("y", DataType::Int32, &[-1, -1], scope)?;
    let training = tfx::placeholder("training", DataType::Bool, &[], scope)?;
    let step = tfx::placeholder("step", DataType::Int64, &[], scope)?;
    let dropout = Dropout { training: training.into(), step: step.into(), seed };
    let forward = model.forward(tokens.into(), Some(&dropout), scope)?;
    let xent = loss::cross_entropy(forward.logits.clone(), targets.into(), model_cfg.vocab_size as i64, scope)?;
    let (grads, row_grads) = gradients(&xent, &forward, &vars, scope)?;
    ops::identity(xent.loss, &mut scope.with_op_name("out/loss"))?;
    for (k, g) in grads.into_iter().enumerate() {
        ops::identity(g, &mut scope.with_op_name(&format!("out/grad/{k}")))?;
    }
    for (j, (rows, lookup)) in row_grads.into_iter().zip(&forward.lookups).enumerate() {
        let out = match per_window(lookup, scope)? {
            true => lookup_square(lookup, rows, &vars[lookup_var(lookup, &vars)?], scope)?,
            false => rows,
        };
        ops::identity(out, &mut scope.with_op_name(&format!("out/lookup/{j}")))?;
    }
    let graph = scope.graph();
    let mut reads = Vec::new();
    for op in graph.operation_iter() {
        if op.op_type()? == "ReadVariableOp" {
            let (handle, _) = op.input(0);
            let var = handle.name()?;
            if vars.iter().any(|v| v.name == var) {
                reads.push((op.name()?, var));
            }
        }
    }
    Ok(ReplicaDef { graph_def: graph.graph_def()?, reads })
}

/// `SaveV2` of every read variable and the data position at `prefix`; `RestoreV2` of the position.
fn save_ops(
    reads: &[(Var, Output)],
    prefix: Output,
    scope: &mut Scope,
) -> tensorflow::Result<(Operation, Operation, Operation)> {
    let position = tfx::placeholder("checkpoint/position", DataType::Int64, &[2], scope)?;
    let mut names: Vec<String> = reads.iter().map(|(v, _)| v.name.clone()).collect();
    let mut tensors: Vec<Output> = reads.iter().map(|(_, r)| r.clone()).collect();
    names.push(POSITION_KEY.to_string());
    tensors.push(position.clone().into());
    let save = tfx::save_v2(prefix.clone(), &names, &tensors, scope)?;
    let restore_position =
        tfx::restore_v2("restore_position", prefix, &[POSITION_KEY.to_string()], &[DataType::Int64], scope)?;
    Ok((save, position, restore_position))
}

/// `RestoreV2` of `vars` by name from `prefix`, each assigned to its variable.
fn restore_ops(vars: &[Var], prefix: Output, scope: &mut Scope) -> tensorflow::Result<Operation> {
    let names: Vec<String> = vars.iter().map(|v| v.name.clone()).collect();
    let dtypes: Vec<DataType> = vars.iter().map(|v| v.dtype).collect();
    let restored = tfx::restore_v2("restore", prefix, &names, &dtypes, scope)?;
    let mut assigns = Vec::with_capacity(vars.len());
    for (i, v) in vars.iter().enumerate() {
        assigns.push(ops::assign_variable_op(
            v.handle.clone(),
            restored.output(i),
            &mut scope.with_op_name(&format!("restore/assign/{}", v.name)),
        )?);
    }
    tfx::group("restore/all", &assigns, scope)
}

/// A copy of a fetched tensor in a buffer of its own. TensorFlow may hand out one buffer for
/// several results (variables made from identical initial values share theirs until written),
/// and the crate lets a fetched tensor be written in place: a copy keeps such writes local.
fn owned<T: TensorType>(t: Tensor<T>) -> Result<Tensor<T>> {
    Ok(Tensor::new(t.dims()).with_values(&t[..])?)
}

/// `minigpt graph`: writes `<dir>/<arch>.pbtxt`, the text GraphDef of `model`'s training graph
/// (seed [`GRAPH_SEED`]).
pub fn write_text(model: &ModelConfig, dir: &Path) -> Result<std::path::PathBuf> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let arch = format!("{:?}", model.arch).to_lowercase();
    let path = dir.join(format!("{arch}.pbtxt"));
    crate::files::write_atomic(&path, text(model)?.as_bytes())?;
    Ok(path)
}

/// Seed of the graphs written to `graphs/`.
pub const GRAPH_SEED: i64 = 1337;

/// The text GraphDef of a model's training graph, as `minigpt graph` writes it.
pub fn text(model: &ModelConfig) -> Result<String> {
    let opts = GraphOptions {
        purpose: Purpose::Training { adam: AdamConfig::default(), summaries: false },
        ..GraphOptions::inference(GRAPH_SEED)
    };
    model.validate()?;
    let g = build(model, &opts, None, &[]).context("building the TensorFlow graph")?;
    let body = tfx::graph_text(&g.scope.graph())?;
    let arch = format!("{:?}", model.arch).to_lowercase();
    Ok(format!(
        "# The training graph of minigpt's {arch} model (vocab_size {}, n_embd {}, seed {GRAPH_SEED}).\n\
         # Written by `minigpt graph --model {arch} --out graphs/`; tests/graphs.rs checks it is current.\n{body}",
        model.vocab_size, model.n_embd,
    ))
}
