//! TensorBoard: scalar summaries written by TensorFlow's own summary ops (`SummaryWriter`,
//! `CreateSummaryFileWriter`, `WriteScalarSummary`, `FlushSummaryWriter`) into `RUN_DIR/events/`,
//! so `tensorboard --logdir RUN_DIR` shows the curves.

use std::path::Path;

use anyhow::{Context, Result};
use tensorflow::{ops, DataType, Operation, Output, Scope, Session, SessionRunArgs, Tensor};

use crate::files::path_str;
use crate::tfx;

/// The summary ops of a training graph. Every value is fed: a train step's loss and learning
/// rate are written by a run of their own after the step, so that every train step runs the same
/// fetches and targets (each set of them is another pruned, optimized and, with XLA, compiled
/// graph).
pub struct Summaries {
    logdir: Operation,
    create: Operation,
    /// int64 scalar placeholder: the step every write is stamped with.
    step: Operation,
    fed: Vec<(String, Operation, Operation)>,
    flush: Operation,
}

/// The tags written.
pub const FED_TAGS: [&str; 4] = ["loss", "learning_rate", "val_loss", "tokens_per_s"];

impl Summaries {
    pub fn build(scope: &mut Scope) -> tensorflow::Result<Self> {
        let scope = &mut scope.new_sub_scope("summary");
        let writer: Output = ops::SummaryWriter::new()
            .shared_name("minigpt_events")
            .build(&mut scope.with_op_name("summary/writer"))?
            .into();
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
            ops::write_scalar_summary(
                writer.clone(),
                step.clone(),
                tag_t,
                value,
                &mut scope.with_op_name(&format!("summary/write/{tag}")),
            )
        };
        let mut fed = Vec::new();
        for tag in FED_TAGS {
            let value = tfx::placeholder(&format!("summary/value/{tag}"), DataType::Float, &[], scope)?;
            let op = write(tag, value.clone().into(), scope)?;
            fed.push((tag.to_string(), value, op));
        }
        let flush = ops::flush_summary_writer(writer, &mut scope.with_op_name("summary/flush"))?;
        Ok(Self { logdir, create, step, fed, flush })
    }
}

impl Summaries {
    /// Opens (creates) the event file in `dir`.
    pub fn open(&self, session: &Session, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let logdir = Tensor::from(path_str(dir)?.to_string());
        let mut args = SessionRunArgs::new();
        args.add_feed(&self.logdir, 0, &logdir);
        args.add_target(&self.create);
        session.run(&mut args).with_context(|| format!("creating the event file in {}", dir.display()))
    }

    /// Writes `values` (tags from [`FED_TAGS`]) at `step`, then flushes the event file.
    pub fn write(&self, session: &Session, step: u64, values: &[(&str, f32)]) -> Result<()> {
        let step = Tensor::from(step as i64);
        let tensors: Vec<Tensor<f32>> = values.iter().map(|&(_, v)| Tensor::from(v)).collect();
        let mut args = SessionRunArgs::new();
        args.add_feed(&self.step, 0, &step);
        for ((tag, _), value) in values.iter().zip(&tensors) {
            let (_, placeholder, op) =
                self.fed.iter().find(|(t, _, _)| t == tag).with_context(|| format!("no summary tag {tag}"))?;
            args.add_feed(placeholder, 0, value);
            args.add_target(op);
        }
        args.add_target(&self.flush);
        session.run(&mut args).context("writing summaries")
    }
}
