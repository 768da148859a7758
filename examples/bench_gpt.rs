//! `make bench`'s transformer section, minigpt's side (`python_export/bench_gpt.py` is Keras'):
//! the MatMul rate of this machine through TensorFlow, training steps per second of the quality
//! configuration with and without XLA and the fraction of the MatMul rate each reaches, generation
//! of 200 and 2000 characters (the whole `minigpt generate` process), and the evaluation over
//! every validation window; then the same for each mixed precision (Keras' `mixed_bfloat16` and
//! `mixed_float16` policies) and for TensorFlow's own bfloat16 rewrite of the float32 graph, with
//! the bfloat16 MatMul rate beside the float32 one. One JSON line.
//!
//!     cargo run --release --example bench_gpt -- --data FILE

use std::time::Instant;

use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{Context, Result};
use clap::Parser;
use minigpt::data::{self, Batches, Shuffle, Vocab};
use minigpt::device::{SessionConfig, Xla};
use minigpt::graph::{GraphOptions, Runner};
use minigpt::model::ModelConfig;
use minigpt::model::Precision;
use minigpt::optim::AdamConfig;
use serde_json::json;
use tensorflow::{ops, DataType, Scope, Session, SessionOptions, SessionRunArgs, Tensor};

// The quality configuration: 4 blocks, 4 heads, width 128, context 64, batch 12.
const LAYERS: u64 = 4;
const HEADS: u64 = 4;
const WIDTH: u64 = 128;
const BLOCK: u64 = 64;
const BATCH: u64 = 12;

#[derive(Parser)]
struct Args {
    #[arg(long)]
    data: String,
    #[arg(long, default_value_t = 200)]
    steps: usize,
    #[arg(long, default_value_t = 20)]
    warmup: usize,
}

fn main() -> Result<()> {
    let args = Args::parse();
    minigpt::library::load(false)?;
    let (matmul_gflops, matmul_gflops_bf16) = (matmul_rate(DataType::Float)?, matmul_rate(DataType::BFloat16)?);
    let corpus = data::load_corpus(&args.data)?;
    let vocab = Vocab::from_text(&corpus.text);
    let encoded = vocab.encode(&corpus.text)?;
    let (train, val) = data::split(&encoded);
    let cfg = ModelConfig::gpt(vocab.len() as u64, WIDTH, LAYERS, HEADS, BLOCK);
    let (b, t) = (BATCH as usize, BLOCK as usize);
    let mut x = Tensor::<i32>::new(&[BATCH, BLOCK]);
    let mut y = Tensor::<i32>::new(&[BATCH, BLOCK]);
    Batches::new(train, t, b, Shuffle::Global, 1337, 0).fill(&mut x, &mut y);

    // Training steps on one batch in memory, with XLA (the default) and without.
    let flops = step_flops(vocab.len() as u64);
    let mut rates = Vec::new();
    let mut trained = None;
    for xla in [Xla::Auto, Xla::Off] {
        let runner = Runner::new(&cfg, &GraphOptions::training(1337, AdamConfig::default()), session(xla))?;
        runner.init()?;
        rates.push(steps_per_s(&runner, (&x, &y), args.warmup, args.steps)?);
        trained.get_or_insert(runner.weights::<f32>()?);
    }
    let weights = trained.context("no training run")?;

    // Generation: the whole `minigpt generate` process (release build, beside this example), on a
    // run of the quality configuration trained for a few steps.
    let minigpt = std::env::current_exe()?.parent().and_then(|d| d.parent()).map(|d| d.join("minigpt"));
    let minigpt = minigpt.filter(|p| p.is_file()).context("no minigpt binary beside this example: build it")?;
    let tmp = tempfile::tempdir()?;
    let run = tmp.path().join("run");
    let shape = format!("--model gpt --n-layer {LAYERS} --n-head {HEADS} --n-embd {WIDTH} --block-size {BLOCK}");
    let status = Command::new(&minigpt)
        .args(["train", "-q", "--data", &args.data, "--out", path_str(&run)?, "--max-steps", "20"])
        .args(["--eval-batches", "1", "--batch-size", &BATCH.to_string()])
        .args(shape.split(' '))
        .stdout(Stdio::null())
        .status()?;
    anyhow::ensure!(status.success(), "training the run to generate from failed");
    // The training loop end to end, as a new user runs it: the whole `minigpt train` process
    // (start-up, the corpus, graph, compilation, feeding, evaluation, logging, checkpoints).
    let e2e_steps = 400;
    let start = Instant::now();
    let status = Command::new(&minigpt)
        .args(["train", "-q", "--data", &args.data, "--out", path_str(&tmp.path().join("e2e"))?])
        .args(["--max-steps", &e2e_steps.to_string(), "--batch-size", &BATCH.to_string()])
        .args(["--shuffle", "global", "--eval-batches", "5", "--log-every", "200"])
        .args(shape.split(' '))
        .stdout(Stdio::null())
        .status()?;
    anyhow::ensure!(status.success(), "the end-to-end training run failed");
    let e2e_rate = e2e_steps as f64 / start.elapsed().as_secs_f64();

    let mut generate = Vec::new();
    for n in [200usize, 2000] {
        let start = Instant::now();
        let status = Command::new(&minigpt)
            .args(["generate", "--run", path_str(&run)?, "--prompt", "To be, or not to be", "--chars", &n.to_string()])
            .stdout(Stdio::null())
            .status()?;
        anyhow::ensure!(status.success(), "minigpt generate failed");
        generate.push(n as f64 / start.elapsed().as_secs_f64());
    }

    // The mean loss over every validation window, as `minigpt eval` computes it.
    let evaluator = Runner::new(&cfg, &GraphOptions::inference(1337), SessionConfig::default())?;
    evaluator.set_weights(&weights)?;
    let start = Instant::now();
    let val_loss = minigpt::eval::evaluate(|x, y| evaluator.loss(x, y), val, t, None, 0, None)?;
    let eval_s = start.elapsed().as_secs_f64();

    // Each mixed precision, and TensorFlow's bfloat16 rewrite of the float32 graph: training steps
    // (XLA and without), the full evaluation, 2000 characters of `minigpt generate`.
    let mut mixed = serde_json::Map::new();
    let variants = [
        ("mixed_bfloat16", Precision::MixedBfloat16, false),
        ("mixed_float16", Precision::MixedFloat16, false),
        ("onednn_bfloat16_rewrite", Precision::Float32, true),
    ];
    for (name, precision, rewrite) in variants {
        let cfg = ModelConfig { precision, ..cfg.clone() };
        let config = |xla| SessionConfig { onednn_bfloat16_rewrite: rewrite, ..session(xla) };
        let mut row = serde_json::Map::new();
        for (key, xla) in [("train_steps_per_s", Xla::Auto), ("train_steps_per_s_no_xla", Xla::Off)] {
            let runner = Runner::new(&cfg, &GraphOptions::training(1337, AdamConfig::default()), config(xla))?;
            runner.init()?;
            runner.set_weights(&weights)?;
            row.insert(key.into(), json!(steps_per_s(&runner, (&x, &y), args.warmup, args.steps)?));
        }
        let evaluator = Runner::new(&cfg, &GraphOptions::inference(1337), config(Xla::Auto))?;
        evaluator.set_weights(&weights)?;
        let start = Instant::now();
        let loss = minigpt::eval::evaluate(|x, y| evaluator.loss(x, y), val, t, None, 0, None)?;
        row.insert("eval_full_s".into(), json!(start.elapsed().as_secs_f64()));
        row.insert("val_loss".into(), json!(loss));
        if !rewrite {
            let start = Instant::now();
            let status = Command::new(&minigpt)
                .args(["generate", "--run", path_str(&run)?, "--prompt", "To be, or not to be", "--chars", "2000"])
                .args(["--precision", precision.name()])
                .stdout(Stdio::null())
                .status()?;
            anyhow::ensure!(status.success(), "minigpt generate --precision {precision} failed");
            row.insert("generate_2000_chars_per_s".into(), json!(2000.0 / start.elapsed().as_secs_f64()));
        }
        mixed.insert(name.into(), row.into());
    }

    let fraction = |rate: f64| rate * flops / (matmul_gflops * 1e9);
    println!(
        "{}",
        json!({
            "matmul_gflops": matmul_gflops,
            "matmul_gflops_bf16": matmul_gflops_bf16,
            "gpt_precisions": mixed,
            "gpt_train_steps_per_s": rates[0],
            "gpt_train_steps_per_s_no_xla": rates[1],
            "gpt_train_e2e_steps_per_s": e2e_rate,
            "gpt_peak_fraction": fraction(rates[0]),
            "gpt_peak_fraction_no_xla": fraction(rates[1]),
            "gpt_generate_200_chars_per_s": generate[0],
            "gpt_generate_2000_chars_per_s": generate[1],
            "gpt_eval_full_s": eval_s,
            "gpt_val_loss": val_loss,
            "gpt_step_gflop": flops / 1e9,
        })
    );
    Ok(())
}

/// Training steps per second on one batch, after `warmup` steps.
fn steps_per_s(runner: &Runner, (x, y): (&Tensor<i32>, &Tensor<i32>), warmup: usize, steps: usize) -> Result<f64> {
    for _ in 0..warmup {
        runner.train_step::<f32>(x, y)?;
    }
    let start = Instant::now();
    for _ in 0..steps {
        runner.train_step::<f32>(x, y)?;
    }
    Ok(steps as f64 / start.elapsed().as_secs_f64())
}

fn path_str(path: &Path) -> Result<&str> {
    path.to_str().context("a temporary path that is not UTF-8")
}

fn session(xla: Xla) -> SessionConfig {
    SessionConfig { xla, ..Default::default() }
}

/// FLOPs of one training step: 6 per non-embedding parameter per token (forward 2, backward 4),
/// plus the attention's two [T, T] products per block (forward 4·T·C per token, ×3 with the
/// backward pass).
fn step_flops(vocab: u64) -> f64 {
    let c = WIDTH as f64;
    let per_block = 12.0 * c * c + 13.0 * c; // qkv, proj, fc, out kernels and biases, two LayerNorms
    let non_embedding = LAYERS as f64 * per_block + 2.0 * c + c * vocab as f64 + vocab as f64;
    let tokens = (BATCH * BLOCK) as f64;
    let attention = 3.0 * 4.0 * BLOCK as f64 * c * LAYERS as f64 * tokens;
    6.0 * non_embedding * tokens + attention
}

/// GFLOP/s of a 2048 × 2048 MatMul of `dtype` (float32 or bfloat16) through TensorFlow, its
/// inputs fed (constants would be folded away): the median of 5 timings of 10 runs.
fn matmul_rate(dtype: DataType) -> Result<f64> {
    let n = 2048u64;
    let mut scope = Scope::new_root_scope();
    let a = minigpt::tfx::placeholder("a", dtype, &[n as i64, n as i64], &mut scope)?;
    let b = minigpt::tfx::placeholder("b", dtype, &[n as i64, n as i64], &mut scope)?;
    let product = ops::mat_mul(a.clone(), b.clone(), &mut scope)?;
    let values: Vec<f32> = (0..n * n).map(|i| ((i * 7919) % 1000) as f32 / 1000.0).collect();
    match dtype {
        DataType::BFloat16 => {
            let values: Vec<tensorflow::BFloat16> = values.into_iter().map(tensorflow::BFloat16::from).collect();
            time_matmul(&scope, [&a, &b], &product, &Tensor::new(&[n, n]).with_values(&values)?, n)
        }
        _ => time_matmul(&scope, [&a, &b], &product, &Tensor::new(&[n, n]).with_values(&values)?, n),
    }
}

fn time_matmul<T: tensorflow::TensorType>(
    scope: &Scope,
    [a, b]: [&tensorflow::Operation; 2],
    product: &tensorflow::Operation,
    value: &Tensor<T>,
    n: u64,
) -> Result<f64> {
    let session = Session::new(&SessionOptions::new(), &scope.graph())?;
    let run = || -> Result<()> {
        let mut args = SessionRunArgs::new();
        args.add_feed(a, 0, value);
        args.add_feed(b, 0, value);
        args.request_fetch(product, 0);
        Ok(session.run(&mut args)?)
    };
    run()?;
    let mut timings = Vec::new();
    for _ in 0..5 {
        let start = Instant::now();
        for _ in 0..10 {
            run()?;
        }
        timings.push(10.0 * 2.0 * (n * n * n) as f64 / start.elapsed().as_secs_f64() / 1e9);
    }
    timings.sort_by(f64::total_cmp);
    Ok(timings[2])
}
