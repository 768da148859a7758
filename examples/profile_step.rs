//! Where a train step's time goes: runs the notebook's configuration for 200 warm-up steps, then
//! traces 20 steps (`RunOptions.trace_level = FULL_TRACE`) and writes their `RunMetadata` protos,
//! each preceded by its length (u64, little-endian). `bench/profile.py` runs this and prints the
//! time per op.
//!
//!     cargo run --release --example profile_step -- --data FILE --out FILE [--xla] [--intra-op-threads N]

use anyhow::Result;
use clap::Parser;
use minigpt::data::{self, Batches, Shuffle, Vocab};
use minigpt::graph::{GraphOptions, ModelGraph, Runner};
use minigpt::model::{Arch, ModelConfig};
use tensorflow::{SessionRunArgs, Tensor};

#[derive(Parser)]
struct Args {
    #[arg(long)]
    data: String,
    #[arg(long)]
    out: std::path::PathBuf,
    #[command(flatten)]
    session: minigpt::cli::SessionArgs,
}

/// `RunOptions { trace_level: FULL_TRACE }` (field 1, value 3).
const FULL_TRACE: [u8; 2] = [1 << 3, 3];

fn main() -> Result<()> {
    let args = Args::parse();
    let corpus = data::load_corpus(&args.data)?;
    let vocab = Vocab::from_text(&corpus.text);
    let encoded = vocab.encode(&corpus.text)?;
    let (train, _) = data::split(&encoded);
    let cfg = ModelConfig::bigram(vocab.len() as u64, 128);
    let runner = Runner::new(ModelGraph::build(&cfg, &GraphOptions::new(1337))?, args.session.to_config())?;
    runner.init()?;
    let mut x = Tensor::<i32>::new(&[32, 64]);
    let mut y = Tensor::<i32>::new(&[32, 64]);
    let mut batches = Batches::new(train, 64, 32, Shuffle::None, 0, 0);
    for _ in 0..200 {
        batches.fill(&mut x, &mut y);
        runner.train_step::<f32>(&x, &y)?;
    }
    let mut out = Vec::new();
    for _ in 0..20 {
        batches.fill(&mut x, &mut y);
        let mut step = SessionRunArgs::new();
        step.add_feed(&runner.g.tokens, 0, &x);
        step.add_feed(&runner.g.targets, 0, &y);
        step.add_target(&runner.g.train_op);
        step.set_run_options(&FULL_TRACE);
        step.set_request_metadata(true);
        runner.session.run(&mut step)?;
        let metadata = step.get_metadata().unwrap_or_default();
        out.extend((metadata.len() as u64).to_le_bytes());
        out.extend_from_slice(metadata);
    }
    minigpt::checkpoint::write_atomic(&args.out, &out)?;
    Ok(())
}
