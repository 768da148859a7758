//! `make bench`'s "training on several servers": train steps per second of one configuration in
//! this process (`--workers 0`) or replicated on N `minigpt server`s on 127.0.0.1 (started here as
//! child processes of this binary, killed by PID at the end), and the bytes each worker receives
//! and sends per step, from TensorFlow's step stats (`RunMetadata`) of a traced step. One JSON line.
//!
//!     cargo run --release --example bench_cluster -- --config bigram-32 --workers 2

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use minigpt::cluster::{self, Cluster, ClusterOptions, ClusterSpec};
use minigpt::device::SessionConfig;
use minigpt::graph::{GraphOptions, Runner};
use minigpt::model::{Arch, ModelShape};
use minigpt::optim::AdamConfig;
use prost::Message;
use serde_json::json;
use tensorflow::Tensor;

#[derive(Parser)]
struct Args {
    /// bigram-32, bigram-1024 (the notebook's bigram at batch 32 or 1024, context 64) or gpt (the
    /// transformer's quality configuration: 4 blocks, 4 heads, width 128, context 64, batch 12).
    #[arg(long, default_value = "bigram-32")]
    config: String,
    /// 0: one process; N: N workers on 127.0.0.1.
    #[arg(long, default_value_t = 0)]
    workers: usize,
    #[arg(long, default_value_t = 200)]
    steps: usize,
    #[arg(long, default_value_t = 20)]
    warmup: usize,
    /// Serve as a worker on this address (used by this binary for its own children).
    #[arg(long)]
    serve: Option<String>,
}

/// A worker process, killed when dropped.
struct Worker(Child);

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    minigpt::library::load(false)?;
    if let Some(address) = &args.serve {
        return cluster::serve(&cluster::Listen::parse(address)?);
    }
    let (model, batch) = match args.config.as_str() {
        "bigram-32" | "bigram-1024" => {
            let shape = ModelShape {
                arch: Arch::Bigram,
                n_embd: 128,
                n_layer: 1,
                n_head: 1,
                dropout: 0.0,
                precision: Default::default(),
            };
            (shape.with(65, 64), if args.config == "bigram-32" { 32 } else { 1024 })
        }
        "gpt" => (
            ModelShape {
                arch: Arch::Gpt,
                n_embd: 128,
                n_layer: 4,
                n_head: 4,
                dropout: 0.0,
                precision: Default::default(),
            }
            .with(65, 64),
            12,
        ),
        other => bail!("--config {other}: expected bigram-32, bigram-1024 or gpt"),
    };
    let block = 64u64;
    let opts = GraphOptions::training(1337, AdamConfig::default());
    // The one-process transformer runs without XLA, as a cluster's graph does by default.
    let session = SessionConfig { xla: minigpt::device::Xla::Off, ..Default::default() };
    let mut workers = Vec::new();
    let runner = if args.workers == 0 {
        Runner::new(&model, &opts, session)?
    } else {
        let me = std::env::current_exe()?;
        let mut addresses = Vec::new();
        for _ in 0..args.workers {
            let address = cluster::Listen::free_local()?.name;
            let child = Command::new(&me)
                .args(["--serve", &address])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("starting a worker")?;
            workers.push(Worker(child));
            addresses.push(address);
        }
        let spec = ClusterSpec { workers: addresses };
        let timeout = Duration::from_secs(120);
        let options =
            ClusterOptions { spec, listen: None, worker_timeout: timeout, step_timeout: timeout, await_names: false };
        Runner::on_cluster(&model, &opts, session, Cluster::start(&options, None)?)?
    };
    runner.init()?;
    let ids: Vec<i32> = (0..batch * block).map(|i| ((i * 7919 + 13) % 65) as i32).collect();
    let x = Tensor::new(&[batch, block]).with_values(&ids)?;
    let y = Tensor::new(&[batch, block]).with_values(&ids.iter().map(|i| (i + 1) % 65).collect::<Vec<_>>())?;
    for _ in 0..args.warmup {
        runner.train_step::<f32>(&x, &y)?;
    }
    let start = Instant::now();
    for _ in 0..args.steps {
        runner.train_step::<f32>(&x, &y)?;
    }
    let seconds = start.elapsed().as_secs_f64();
    let (_, metadata) = runner.train_step_traced(&x, &y)?;
    let (received, sent) = worker_bytes(&metadata, args.workers)?;
    println!(
        "{}",
        json!({
            "config": args.config,
            "workers": args.workers,
            "steps_per_s": args.steps as f64 / seconds,
            "step_ms": seconds * 1e3 / args.steps as f64,
            "parameters": minigpt::model::parameters(&runner.variables()),
            "worker_bytes_received": received,
            "worker_bytes_sent": sent,
        })
    );
    drop(workers);
    Ok(())
}

/// Per worker, the bytes it received (weights, its slice of the batch) and sent (its loss,
/// gradients and lookup squares) in one traced step: TensorFlow's step stats hold one `RecvTensor`
/// entry per tensor moved, labelled `[bytes] ... from DEVICE to DEVICE`, with its size as output.
fn worker_bytes(metadata: &[u8], workers: usize) -> Result<(Vec<i64>, Vec<i64>)> {
    let metadata = minigpt::proto::RunMetadata::decode(metadata)?;
    let (mut received, mut sent) = (vec![0i64; workers], vec![0i64; workers]);
    for dev in metadata.step_stats.context("no step stats")?.dev_stats {
        for node in dev.node_stats.iter().filter(|n| n.node_name == "RecvTensor") {
            let bytes: i64 = node
                .output
                .iter()
                .filter_map(|o| o.tensor_description.as_ref()?.allocation_description.as_ref())
                .map(|a| a.requested_bytes)
                .sum();
            let Some((from, to)) = node.timeline_label.rsplit_once(" from ").and_then(|(_, r)| r.split_once(" to "))
            else {
                bail!("a RecvTensor entry without its devices: {}", node.timeline_label);
            };
            for i in 0..workers {
                let worker = format!("/job:worker/replica:0/task:{i}/");
                if to.contains(&worker) {
                    received[i] += bytes;
                }
                if from.contains(&worker) {
                    sent[i] += bytes;
                }
            }
        }
    }
    Ok((received, sent))
}
