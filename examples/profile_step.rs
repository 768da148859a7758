//! Where a train step's time goes: runs a configuration (the notebook's by default; `--model gpt`
//! for the transformer at the quality run's size) for 100 warm-up steps, times 200 (printed), then
//! traces 20 steps (`RunOptions.trace_level = FULL_TRACE`) and writes their `RunMetadata` protos,
//! each preceded by its length (u64, little-endian). `bench/profile.py` runs this and prints the
//! time per op. For `--model gpt` it also times generation with and without attention caches.
//!
//!     cargo run --release --example profile_step -- --data FILE --out FILE [--model gpt --batch-size 12] [--xla]

use anyhow::Result;
use clap::Parser;
use minigpt::data::{self, Batches, Shuffle, Vocab};
use minigpt::graph::{GraphOptions, Runner};
use minigpt::model::{Arch, ModelConfig};
use tensorflow::Tensor;

#[derive(Parser)]
struct Args {
    #[arg(long)]
    data: String,
    #[arg(long)]
    out: std::path::PathBuf,
    #[arg(long, value_enum, default_value_t = Arch::Bigram)]
    model: Arch,
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    #[arg(long, default_value_t = 64)]
    block_size: usize,
    #[arg(long, default_value_t = 4)]
    n_layer: u64,
    #[arg(long, default_value_t = 4)]
    n_head: u64,
    #[command(flatten)]
    session: minigpt::cli::SessionArgs,
}

fn main() -> Result<()> {
    let args = Args::parse();
    minigpt::library::load(false)?;
    let corpus = data::load_corpus(&args.data)?;
    let vocab = Vocab::from_text(&corpus.text);
    let encoded = vocab.encode(&corpus.text)?;
    let (train, _) = data::split(&encoded);
    let (b, t) = (args.batch_size, args.block_size);
    let cfg = match args.model {
        Arch::Bigram => ModelConfig::bigram(vocab.len() as u64, 128),
        Arch::Gpt => ModelConfig::gpt(vocab.len() as u64, 128, args.n_layer, args.n_head, t as u64),
    };
    let cfg = ModelConfig { precision: args.session.precision.unwrap_or_default(), ..cfg };
    let session = args.session.to_config(Default::default())?;
    let runner = Runner::new(&cfg, &GraphOptions::training(1337, Default::default()), session)?;
    runner.init()?;
    let mut x = Tensor::<i32>::new(&[b as u64, t as u64]);
    let mut y = Tensor::<i32>::new(&[b as u64, t as u64]);
    let mut batches = Batches::new(train, t, b, Shuffle::None, 0, 0);
    let mut started = std::time::Instant::now();
    for i in 0..300 {
        if i == 100 {
            started = std::time::Instant::now();
        }
        batches.fill(&mut x, &mut y);
        runner.train_step::<f32>(&x, &y)?;
    }
    eprintln!(
        "untraced: {:.2} ms per step (mean of 200 after 100 warm-up)",
        started.elapsed().as_secs_f64() * 1e3 / 200.0
    );
    let mut out = Vec::new();
    for _ in 0..20 {
        batches.fill(&mut x, &mut y);
        let (_, metadata) = runner.train_step_traced(&x, &y)?;
        out.extend((metadata.len() as u64).to_le_bytes());
        out.extend_from_slice(&metadata);
    }
    minigpt::files::write_atomic(&args.out, &out)?;

    // Generation (gpt): `block_size` characters with the attention caches and without.
    if args.model == Arch::Gpt {
        let sampler = minigpt::sampler::SamplerConfig::default();
        let runner = Runner::new(&cfg, &GraphOptions::sampling(sampler), session)?;
        runner.init()?;
        let prompt = [vocab.encode("T")?[0]];
        for cached in [true, false, true, false] {
            let start = std::time::Instant::now();
            let how = minigpt::sample::Generation { chars: t - 1, sampler, stepwise: !cached };
            minigpt::sample::generate(&runner, &prompt, &how, |_| Ok(()))?;
            let per_char = start.elapsed().as_secs_f64() * 1e3 / (t - 1) as f64;
            eprintln!(
                "untraced: generate {} chars, {}: {per_char:.2} ms per char",
                t - 1,
                if cached { "cached" } else { "whole context" }
            );
        }
    }
    Ok(())
}
