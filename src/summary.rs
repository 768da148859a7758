//! TensorBoard: scalar summaries written by TensorFlow's own summary ops (`SummaryWriter`,
//! `CreateSummaryFileWriter`, `WriteScalarSummary`, `FlushSummaryWriter`) into `RUN_DIR/events/`,
//! so `tensorboard --logdir RUN_DIR` shows the curves.

use std::path::Path;

use anyhow::{Context, Result};
use tensorflow::{ops, DataType, Operation, Output, Scope, SessionRunArgs, Tensor};

use crate::graph::Runner;
use crate::tfx;

/// The summary ops of a training graph. `loss` and `learning_rate` write the graph's own tensors
/// (run them with a train step); the others write fed values.
pub struct Summaries {
    logdir: Operation,
    create: Operation,
    /// int64 scalar placeholder: the step every write is stamped with.
    step: Operation,
    pub loss: Operation,
    pub learning_rate: Operation,
    fed: Vec<(String, Operation, Operation)>,
    flush: Operation,
}

/// Tags written from values computed outside the graph.
pub const FED_TAGS: [&str; 2] = ["val_loss", "tokens_per_s"];

impl Summaries {
    pub fn build(loss: Output, learning_rate: Output, scope: &mut Scope) -> tensorflow::Result<Self> {
        let scope = &mut scope.new_sub_scope("summary");
        let writer: Output = ops::SummaryWriter::new().shared_name("minigpt_events").build(&mut scope.with_op_name("summary/writer"))?.into();
        let logdir = tfx::placeholder("summary/logdir", DataType::String, &[], scope)?;
        let create = ops::create_summary_file_writer(
            writer.clone(),
            logdir.clone(),
            ops::constant(100i32, scope)?,
            ops::constant(5_000i32, scope)?,
            ops::constant(".minigpt".to_string(), scope)?,
            &mut scope.with_op_name("summary/create"),
        )?;
        let step = tfx::placeholder("summary/step", DataType::Int64, &[], scope)?;
        let write = |tag: &str, value: Output, scope: &mut Scope| {
            let tag_t = ops::constant(tag.to_string(), scope)?;
            ops::write_scalar_summary(writer.clone(), step.clone(), tag_t, value, &mut scope.with_op_name(&format!("summary/write/{tag}")))
        };
        let loss = write("loss", loss, scope)?;
        let learning_rate = write("learning_rate", learning_rate, scope)?;
        let mut fed = Vec::new();
        for tag in FED_TAGS {
            let value = tfx::placeholder(&format!("summary/value/{tag}"), DataType::Float, &[], scope)?;
            let op = write(tag, value.clone().into(), scope)?;
            fed.push((tag.to_string(), value, op));
        }
        let flush = ops::flush_summary_writer(writer, &mut scope.with_op_name("summary/flush"))?;
        Ok(Self { logdir, create, step, loss, learning_rate, fed, flush })
    }
}

impl Runner {
    fn summaries(&self) -> Result<&Summaries> {
        self.g.summaries.as_ref().context("the graph was built without summary ops")
    }

    /// Opens (creates) the event file in `dir`.
    pub fn open_events(&self, dir: &Path) -> Result<()> {
        let s = self.summaries()?;
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let logdir = Tensor::from(crate::checkpoint::path_str(dir)?.to_string());
        let mut args = SessionRunArgs::new();
        args.add_feed(&s.logdir, 0, &logdir);
        args.add_target(&s.create);
        self.session.run(&mut args).with_context(|| format!("creating the event file in {}", dir.display()))
    }

    /// One Adam step that also writes its loss and learning rate at `step`; returns the loss.
    pub fn train_step_logged(&self, x: &Tensor<i32>, y: &Tensor<i32>, step: u64) -> Result<f32> {
        let s = self.summaries()?;
        let step = Tensor::from(step as i64);
        self.train_step_with(x, y, |args| {
            args.add_feed(&s.step, 0, &step);
            args.add_target(&s.loss);
            args.add_target(&s.learning_rate);
        })
    }

    /// Writes `values` (tags from [`FED_TAGS`]) at `step`, then flushes the event file.
    pub fn write_scalars(&self, step: u64, values: &[(&str, f32)]) -> Result<()> {
        let s = self.summaries()?;
        let step = Tensor::from(step as i64);
        let tensors: Vec<Tensor<f32>> = values.iter().map(|&(_, v)| Tensor::from(v)).collect();
        let mut args = SessionRunArgs::new();
        args.add_feed(&s.step, 0, &step);
        for ((tag, _), value) in values.iter().zip(&tensors) {
            let (_, placeholder, op) = s.fed.iter().find(|(t, _, _)| t == tag).with_context(|| format!("no summary tag {tag}"))?;
            args.add_feed(placeholder, 0, value);
            args.add_target(op);
        }
        args.add_target(&s.flush);
        self.session.run(&mut args).context("writing summaries")
    }
}
