//! The [`Runner`]: a built graph with its session, the only way the rest of minigpt runs
//! TensorFlow graphs.

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::path::Path;

use anyhow::{ensure, Context, Result};
use prost::Message;
use tensorflow::{ops, DataType, Output, Session, SessionRunArgs, Tensor, TensorType};

use super::build::{build, Parts, TrainOps};
use super::{GraphOptions, Purpose, POSITION_KEY};
use crate::cluster::{Cluster, ClusterSpec};
use crate::device::SessionConfig;
use crate::model::{Arch, LanguageModel, ModelConfig};
use crate::optim::LossScale;
use crate::proto;
use crate::sampler::{Cache, NextLogits, SamplerConfig};
use crate::summary::Summaries;
use crate::tfx::{self, Var};

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
        let mut args = SessionRunArgs::new();
        self.g.setters.feed(&mut args, values)?;
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

    /// The loss scale of the coming step (mixed_float16's training graphs; `None` in others).
    pub fn loss_scale(&self) -> Result<Option<f32>> {
        if !self.g.reads.iter().any(|(v, _)| v.name == LossScale::SCALE) {
            return Ok(None);
        }
        Ok(Some(self.read::<f32>(std::iter::once(LossScale::SCALE.to_string()))?[0][0]))
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
        let train = self.training()?;
        let mut args = SessionRunArgs::new();
        args.add_feed(&self.g.tokens, 0, x);
        args.add_feed(&self.g.targets, 0, y);
        args.add_feed(&train.training, 0, &self.yes);
        args.add_target(&train.train_op);
        let loss = args.request_fetch(&train.step_loss.operation, train.step_loss.index);
        self.session().run(&mut args).context("running the train step")?;
        Ok(args.fetch::<T>(loss)?[0])
    }

    /// [`Runner::train_step`] that also writes its loss and learning rate to TensorBoard at `step`:
    /// the same step (the same graph run, compiled once), with the learning rate read before it
    /// and both written after it.
    pub fn train_step_logged(&self, x: &Tensor<i32>, y: &Tensor<i32>, step: u64) -> Result<f32> {
        let learning_rate = self.learning_rate::<f32>()?;
        let loss = self.train_step::<f32>(x, y)?;
        self.write_scalars(step, &[("loss", loss), ("learning_rate", learning_rate)])?;
        Ok(loss)
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

/// A copy of a fetched tensor in a buffer of its own. TensorFlow may hand out one buffer for
/// several results (variables made from identical initial values share theirs until written),
/// and the crate lets a fetched tensor be written in place: a copy keeps such writes local.
fn owned<T: TensorType>(t: Tensor<T>) -> Result<Tensor<T>> {
    Ok(Tensor::new(t.dims()).with_values(&t[..])?)
}
