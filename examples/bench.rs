//! minigpt's side of `make bench`: the figures `python_export/bench_notebook.py` measures for the
//! notebook, measured the same way on minigpt's own code paths, printed as one JSON object.
//!
//!     cargo run --release --example bench -- --data FILE [--intra-op-threads N] [--inter-op-threads N] [--xla]
//!
//! `BENCH_T0` (seconds since the epoch, set by the caller just before starting this process)
//! anchors start-up and time to first step.

use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::Result;
use clap::Parser;
use minigpt::data::{self, Batches, Shuffle, Vocab, NOTEBOOK_SHUFFLE_BUFFER};
use minigpt::device::SessionConfig;
use minigpt::graph::{GraphOptions, Runner};
use minigpt::model::ModelConfig;
use minigpt::optim::AdamConfig;
use minigpt::sample::{self, Generation};
use minigpt::sampler::SamplerConfig;
use serde_json::json;
use tensorflow::Tensor;

#[derive(Parser)]
struct Args {
    /// Corpus path or URL (downloaded into minigpt's cache).
    #[arg(long)]
    data: String,
    /// Only print the local path of the corpus (after downloading it) and exit.
    #[arg(long)]
    resolve: bool,
    #[arg(long, default_value_t = 20_000)]
    pipeline_batches: usize,
    #[arg(long, default_value_t = 2000)]
    steps: usize,
    #[arg(long, default_value_t = 100)]
    warmup: usize,
    #[command(flatten)]
    session: minigpt::cli::SessionArgs,
}

fn epoch_now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs_f64()
}

fn main() -> Result<()> {
    let t0: f64 = std::env::var("BENCH_T0").ok().and_then(|s| s.parse().ok()).unwrap_or_else(epoch_now);
    let args = Args::parse();
    minigpt::library::load(false)?;
    let startup = epoch_now() - t0;
    if args.resolve {
        data::load_corpus(&args.data)?;
        println!("{}", data::local_path(&args.data)?.display());
        return Ok(());
    }
    let session: SessionConfig = args.session.to_config(Default::default())?;

    // Time to first step: corpus, vocabulary, graph, session, first batch, first step.
    let corpus = data::load_corpus(&args.data)?;
    let vocab = Vocab::from_text(&corpus.text);
    let encoded = vocab.encode(&corpus.text)?;
    let (train, _) = data::split(&encoded);
    let cfg = ModelConfig::bigram(vocab.len() as u64, 128);
    let runner = Runner::new(&cfg, &GraphOptions::training(1337, AdamConfig::default()), session)?;
    runner.init()?;
    let (t, b) = (64usize, 32usize);
    let mut x = Tensor::<i32>::new(&[b as u64, t as u64]);
    let mut y = Tensor::<i32>::new(&[b as u64, t as u64]);
    let mut batches = Batches::new(train, t, b, Shuffle::Buffer(NOTEBOOK_SHUFFLE_BUFFER), 1337, 0);
    batches.fill(&mut x, &mut y);
    runner.train_step::<f32>(&x, &y)?;
    let first_step = epoch_now() - t0;

    // 1. The input pipeline alone, into the tensors the step is fed from.
    let mut pipeline = Batches::new(train, t, b, Shuffle::Buffer(NOTEBOOK_SHUFFLE_BUFFER), 7, 0);
    let (mut px, mut py) = (Tensor::<i32>::new(&[b as u64, t as u64]), Tensor::<i32>::new(&[b as u64, t as u64]));
    pipeline.fill(&mut px, &mut py);
    let start = Instant::now();
    for _ in 0..args.pipeline_batches {
        if !pipeline.fill(&mut px, &mut py) {
            pipeline = Batches::new(train, t, b, Shuffle::Buffer(NOTEBOOK_SHUFFLE_BUFFER), 7, 1);
        }
    }
    let pipeline_rate = args.pipeline_batches as f64 / start.elapsed().as_secs_f64();

    // 2. Training end to end: the trainer's loop body (fill, step), after warm-up.
    for _ in 0..args.warmup {
        batches.fill(&mut x, &mut y);
        runner.train_step::<f32>(&x, &y)?;
    }
    let start = Instant::now();
    for _ in 0..args.steps {
        batches.fill(&mut x, &mut y);
        runner.train_step::<f32>(&x, &y)?;
    }
    let train_rate = args.steps as f64 / start.elapsed().as_secs_f64();

    // 3. The train step alone on one batch already in memory.
    let start = Instant::now();
    for _ in 0..args.steps {
        runner.train_step::<f32>(&x, &y)?;
    }
    let step_rate = args.steps as f64 / start.elapsed().as_secs_f64();

    // 4. Generation, as `minigpt generate` does it (its inference graph with the trained weights,
    //    after a short warm-up call): the median of 5 calls for 200 characters, one for 2000.
    let prompt = vocab.encode("To be, or not to be")?;
    let sampler = SamplerConfig::default();
    let generator = Runner::new(&cfg, &GraphOptions::sampling(sampler), session)?;
    generator.set_weights(&runner.weights::<f32>()?)?;
    let how = |chars| Generation { chars, sampler, stepwise: false };
    sample::generate(&generator, &prompt, &how(10), |_| Ok(()))?;
    let mut generate = Vec::new();
    for (n, calls) in [(200usize, 5), (2000, 1)] {
        let mut rates = Vec::new();
        for _ in 0..calls {
            let start = Instant::now();
            sample::generate(&generator, &prompt, &how(n), |_| Ok(()))?;
            rates.push(n as f64 / start.elapsed().as_secs_f64());
        }
        rates.sort_by(f64::total_cmp);
        generate.push(rates[rates.len() / 2]);
    }

    // 5. Peak resident memory of this process.
    let peak_rss_mib = {
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: getrusage fills the struct it is given.
        unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
        usage.ru_maxrss as f64 / 1024.0
    };
    println!(
        "{}",
        json!({
            "startup_s": startup,
            "first_step_s": first_step,
            "pipeline_batches_per_s": pipeline_rate,
            "train_steps_per_s": train_rate,
            "step_only_steps_per_s": step_rate,
            "generate_200_chars_per_s": generate[0],
            "generate_2000_chars_per_s": generate[1],
            "peak_rss_mib": peak_rss_mib,
        })
    );
    Ok(())
}
