//! Parity with the notebook (shared by tests/parity.rs and `make parity`): minigpt's own graph
//! against what Python TensorFlow computed with the notebook's code.
//! `python_export/make_fixtures.py` writes the fixtures (its docstring describes the folder);
//! [`check`] loads the same initial weights into minigpt's graph, feeds the same batches and
//! returns one [`Check`] per quantity.

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, ensure, Context, Result};
use ndarray::ArrayD;
use ndarray_npy::{ReadNpyExt, ReadableElement};
use serde::Deserialize;
use sha2::{Digest as _, Sha256};
use tensorflow::{Tensor, TensorType};

use minigpt::data::{self, Batches, Corpus, Shuffle, Vocab, NOTEBOOK_SHUFFLE_BUFFER};
use minigpt::device::{SessionConfig, Xla};
use minigpt::graph::{GraphOptions, Runner};
use minigpt::model::{ModelConfig, Precision};
use minigpt::optim::AdamConfig;
use minigpt::sample::{self, Generation};
use minigpt::sampler::SamplerConfig;

/// One compared quantity: `diff` is the measured difference, passing when `diff ≤ tolerance`.
#[derive(Debug, Clone)]
pub struct Check {
    pub quantity: String,
    pub diff: f64,
    pub tolerance: f64,
    /// How `diff` is measured, e.g. "max |Δ|", or "|Δ| / (1e-6 + 1e-5·|ref|)" for a per-element
    /// tolerance (then the tolerance is 1: every element within atol + rtol·|ref|).
    pub measure: String,
}

impl Check {
    pub fn passed(&self) -> bool {
        self.diff <= self.tolerance // false for NaN
    }
}

/// The checks as a table: quantity, measure, difference, tolerance, PASS/FAIL.
pub struct Table<'a>(pub &'a [Check]);

impl fmt::Display for Table<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let width = self.0.iter().map(|c| c.quantity.len()).max().unwrap_or(8).max(8);
        writeln!(f, "{:<width$}  {:<28}  {:>10}  {:>9}  result", "quantity", "measure", "difference", "tolerance")?;
        for c in self.0 {
            let result = if c.passed() { "PASS" } else { "FAIL" };
            writeln!(
                f,
                "{:<width$}  {:<28}  {:>10.3e}  {:>9.0e}  {result}",
                c.quantity, c.measure, c.diff, c.tolerance
            )?;
        }
        Ok(())
    }
}

/// Runs `python_export/make_fixtures.py` from the repository `root` with `python`, writing to `out`.
pub fn make_fixtures(python: &Path, root: &Path, corpus: &Path, out: &Path) -> Result<()> {
    run_script(python, &root.join("python_export/make_fixtures.py"), corpus, out, &[])
}

/// The sizes of the transformer checked against Keras: a small one, and the width and depth of the
/// quality configuration (`make train-gpt`) on a shorter context; `make_gpt_fixtures.py` flags.
pub const GPT_SIZES: [&[&str]; 2] =
    [&[], &["--n-embd", "128", "--n-layer", "4", "--n-head", "4", "--block-size", "32", "--batch-size", "2"]];

/// The mixed precisions checked against Keras under the same policy, at the small size:
/// `make_gpt_fixtures.py` flags (mixed_float16's with the steps where float16 overflows).
pub const GPT_MIXED: [&[&str]; 2] =
    [&["--precision", "mixed_bfloat16"], &["--precision", "mixed_float16", "--overflow-steps", "8"]];

/// Runs `python_export/make_gpt_fixtures.py` (the Keras transformer) likewise, with `flags`.
pub fn make_gpt_fixtures(python: &Path, root: &Path, corpus: &Path, out: &Path, flags: &[&str]) -> Result<()> {
    run_script(python, &root.join("python_export/make_gpt_fixtures.py"), corpus, out, flags)
}

fn run_script(python: &Path, script: &Path, corpus: &Path, out: &Path, flags: &[&str]) -> Result<()> {
    let status = Command::new(python)
        .arg(script)
        .args(flags)
        .arg("--data")
        .arg(corpus)
        .arg("--out")
        .arg(out)
        .env("TF_CPP_MIN_LOG_LEVEL", "2")
        .stdout(std::process::Stdio::null())
        .status()
        .with_context(|| format!("running {} {}", python.display(), script.display()))?;
    ensure!(status.success(), "{} failed ({status})", script.display());
    Ok(())
}

#[derive(Deserialize)]
struct Manifest {
    seed: i64,
    data_sha256: String,
    block_size: usize,
    batch_size: usize,
    embedding_dim: u64,
    vocab: Vec<String>,
    steps: usize,
    batch0_loss: f64,
    step_losses: Vec<f64>,
    generate: Generated,
    none_val: Digest,
    curve_steps: usize,
}

#[derive(Deserialize)]
struct Digest {
    batches: usize,
    sha256: String,
}

#[derive(Deserialize)]
struct Generated {
    seed: i64,
    prompt: String,
    chars: usize,
    text: String,
}

/// The fixtures folder.
struct Fixtures(PathBuf);

impl Fixtures {
    /// `manifest.json`.
    fn manifest<T: serde::de::DeserializeOwned>(&self) -> Result<T> {
        let path = self.0.join("manifest.json");
        let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_slice(&bytes).with_context(|| format!("parsing {}", path.display()))
    }

    fn array<T: ReadableElement>(&self, rel: &str) -> Result<ArrayD<T>> {
        let path = self.0.join(rel);
        let file = std::fs::File::open(&path).with_context(|| format!("opening fixture {}", path.display()))?;
        ArrayD::<T>::read_npy(file).with_context(|| format!("reading fixture {}", path.display()))
    }

    fn tensor<T: ReadableElement + TensorType>(&self, rel: &str) -> Result<Tensor<T>> {
        let a = self.array::<T>(rel)?;
        let dims: Vec<u64> = a.shape().iter().map(|&d| d as u64).collect();
        Ok(Tensor::new(&dims).with_values(&a.iter().cloned().collect::<Vec<_>>())?)
    }

    /// `<folder>/<var>.npy` (or `<var>.<suffix>.npy`) for each variable name.
    fn vars(&self, folder: &str, names: &[String], suffix: &str) -> Result<Vec<Tensor<f32>>> {
        names.iter().map(|n| self.tensor(&format!("{folder}/{}{suffix}.npy", n.replace('/', ".")))).collect()
    }
}

/// Runs every check against the fixtures in `dir`, made from `corpus`, in sessions made with
/// `session` (e.g. to see what XLA changes).
pub fn check(dir: &Path, corpus: &Corpus, session: SessionConfig) -> Result<Vec<Check>> {
    let fx = Fixtures(dir.to_path_buf());
    let manifest: Manifest = fx.manifest()?;
    let m = &manifest;
    ensure!(
        m.data_sha256 == corpus.sha256,
        "the fixtures in {} were made from another corpus (SHA-256 {}, this one {})",
        dir.display(),
        m.data_sha256,
        corpus.sha256
    );
    let vocab = Vocab::from_strings(&m.vocab)?;
    let cfg = ModelConfig::bigram(vocab.len() as u64, m.embedding_dim);
    let new_runner = || -> Result<Runner> {
        let runner = Runner::new(&cfg, &GraphOptions::training(m.generate.seed, AdamConfig::default()), session)?;
        runner.init()?;
        Ok(runner)
    };
    let runner = new_runner()?;
    let names: Vec<String> = runner.variables().iter().map(|v| v.name.clone()).collect();
    let init = fx.vars("init", &names, "")?;
    runner.set_weights(&init)?;
    let mut checks = Vec::new();

    // Forward pass, loss and gradients on batch 0.
    let bx = fx.array::<i32>("batches/x.npy")?;
    let by = fx.array::<i32>("batches/y.npy")?;
    ensure!(bx.shape() == [m.steps, m.batch_size, m.block_size], "batches/x.npy has shape {:?}", bx.shape());
    let batch = |i: usize| -> Result<(Tensor<i32>, Tensor<i32>)> {
        let dims = [m.batch_size as u64, m.block_size as u64];
        let x: Vec<i32> = bx.index_axis(ndarray::Axis(0), i).iter().cloned().collect();
        let y: Vec<i32> = by.index_axis(ndarray::Axis(0), i).iter().cloned().collect();
        Ok((Tensor::new(&dims).with_values(&x)?, Tensor::new(&dims).with_values(&y)?))
    };
    let (x0, y0) = batch(0)?;
    // Without XLA minigpt runs the notebook's kernels: every number is the notebook's, exactly,
    // and that is what is asserted. XLA's fused kernels round differently: `make parity --xla`
    // shows by how much, against the tolerances of the transformer's checks.
    let exact = session.xla != Xla::On;
    let tol = |loose: f64| if exact { 0.0 } else { loose };
    let within = |atol: f64, rtol: f64| if exact { (0.0, 0.0) } else { (atol, rtol) };
    let tolerances = Tolerances { logits: within(1e-5, 1e-5), loss: tol(1e-6), grads: within(1e-8, 1e-5) };
    checks.extend(forward_checks(
        &runner,
        &fx,
        &names,
        (&x0, &y0),
        ("", ", batch 0", "batch0/"),
        m.batch0_loss,
        tolerances,
    )?);

    // Adam steps on the given batches.
    let mut losses = Vec::with_capacity(m.steps);
    for i in 0..m.steps {
        let (x, y) = batch(i)?;
        losses.push(runner.train_step::<f32>(&x, &y)? as f64);
        if i == 0 || i + 1 == m.steps {
            let state = [within(1e-6, 1e-5), within(1e-7, 1e-5), within(1e-10, 1e-5)];
            checks.extend(compare_state(
                &runner,
                &fx,
                &names,
                ("", &format!("step {}", i + 1), &format!("step{}", i + 1)),
                state,
                2e-5,
            )?);
        }
    }
    checks.push(close_slice(
        &format!("train_step losses, {} steps", m.steps),
        &losses,
        &m.step_losses,
        within(1e-5, 0.0),
    ));

    // Generation from the trained weights with the notebook's seed and prompt.
    let prompt = vocab.encode(&m.generate.prompt).map_err(|e| anyhow::anyhow!("prompt: {e}"))?;
    let sampler = SamplerConfig { seed: m.generate.seed, ..SamplerConfig::default() };
    let generator = Runner::new(&cfg, &GraphOptions::sampling(sampler), session)?;
    generator.set_weights(&runner.weights::<f32>()?)?;
    let generation = Generation { chars: m.generate.chars, sampler, stepwise: false };
    let ids = sample::generate(&generator, &prompt, &generation, |_| Ok(()))?;
    let text = format!("{}{}", m.generate.prompt, vocab.decode(&ids));
    checks.push(Check {
        quantity: format!("generate_text, {} characters", m.generate.chars),
        diff: differing_chars(&text, &m.generate.text) as f64,
        tolerance: 0.0,
        measure: "characters differing".into(),
    });

    let encoded = vocab.encode(&corpus.text).map_err(|e| anyhow::anyhow!("corpus: {e}"))?;
    let (train, val) = data::split(&encoded);
    checks.extend(check_pipeline(&fx, m, train, val)?);
    checks.push(check_curve(&fx, m, train, new_runner()?, &init, within(1e-3, 0.0))?);
    Ok(checks)
}

#[derive(Deserialize)]
struct GptManifest {
    vocab_size: u64,
    n_embd: u64,
    n_layer: u64,
    n_head: u64,
    block_size: u64,
    data_sha256: String,
    loss: f64,
    optimizer: GptOptimizer,
    step_losses: Vec<f64>,
    step_learning_rates: Vec<f64>,
    step_grad_norms: Vec<f64>,
    #[serde(default)]
    precision: Precision,
    #[serde(default)]
    step_loss_scales: Vec<f64>,
    #[serde(default)]
    overflow: Option<Overflow>,
}

/// The steps after the head's kernel was scaled up to make float16's gradients overflow.
#[derive(Deserialize)]
struct Overflow {
    loss_scales: Vec<f64>,
    applied: Vec<bool>,
    losses: Vec<f64>,
    final_scale: f64,
    iterations: i64,
}

/// The parity tolerances of the transformer under one precision: per element `(atol, rtol)` for
/// arrays, relative for losses and learning rates.
struct GptTolerances {
    forward: Tolerances,
    rates: f64,
    losses: f64,
    /// Weights, Adam's m, Adam's v after the steps.
    state: [Within; 3],
    /// The attention's key bias, absolute (see [`key_bias_apart`]).
    key_bias: f64,
}

impl GptTolerances {
    fn of(precision: Precision) -> Self {
        match precision {
            // Weights are ~0.1, Adam's m ~1e-3 and v ~1e-6: each gets an atol below its own scale.
            Precision::Float32 => Self {
                forward: Tolerances { logits: (1e-5, 1e-5), loss: 1e-5, grads: (5e-7, 1e-4) },
                rates: 1e-6,
                losses: 1e-5,
                state: [(1e-5, 1e-4), (1e-6, 1e-4), (1e-9, 1e-4)],
                key_bias: 2e-5,
            },
            // bfloat16 keeps 8 bits: an element rounded once more or less differs by 2^-8 of itself.
            Precision::MixedBfloat16 => Self {
                forward: Tolerances { logits: (5e-2, 5e-2), loss: 2e-3, grads: (4e-3, 2e-1) },
                rates: 1e-6,
                losses: 2e-3,
                state: [(2e-2, 2e-2), (1e-3, 2e-1), (1e-6, 2e-1)],
                key_bias: 5e-2,
            },
            // float16 keeps 11 bits.
            Precision::MixedFloat16 => Self {
                forward: Tolerances { logits: (1e-2, 1e-2), loss: 1e-3, grads: (1e-3, 1e-1) },
                rates: 1e-6,
                losses: 1e-3,
                state: [(2e-3, 2e-3), (1e-4, 1e-1), (1e-7, 1e-1)],
                key_bias: 2.5e-2,
            },
        }
    }
}

/// The flags of `make_gpt_fixtures.py`'s AdamW (minigpt's flags of the same names).
#[derive(Deserialize)]
struct GptOptimizer {
    lr: f64,
    warmup_steps: u64,
    lr_decay_steps: u64,
    min_lr: f64,
    weight_decay: f64,
    grad_clip: f64,
}

/// minigpt's `--model gpt` against the Keras transformer (`python_export/gpt.py`) from the same
/// weights, with the fixtures of `make_gpt_fixtures.py` in `dir`: logits, loss and every gradient
/// on one batch; then the steps of Keras' AdamW (warm-up and cosine schedule, decay with Keras'
/// exclusions, global-norm clipping) on the fixtures' batches: each step's learning rate and loss,
/// and the weights and Adam's m and v after them.
pub fn check_gpt(dir: &Path, corpus: &Corpus, session: SessionConfig) -> Result<Vec<Check>> {
    let fx = Fixtures(dir.to_path_buf());
    let m: GptManifest = fx.manifest()?;
    ensure!(m.data_sha256 == corpus.sha256, "the fixtures in {} were made from another corpus", dir.display());
    let cfg = ModelConfig {
        precision: m.precision,
        ..ModelConfig::gpt(m.vocab_size, m.n_embd, m.n_layer, m.n_head, m.block_size)
    };
    let tol = GptTolerances::of(m.precision);
    let o = &m.optimizer;
    let adam = AdamConfig {
        learning_rate: o.lr,
        warmup_steps: o.warmup_steps,
        decay_steps: Some(o.lr_decay_steps),
        min_lr: o.min_lr,
        weight_decay: o.weight_decay,
        clip_norm: Some(o.grad_clip),
        ..AdamConfig::default()
    };
    adam.validate()?;
    let runner = Runner::new(&cfg, &GraphOptions::training(1, adam), session)?;
    runner.init()?;
    let names: Vec<String> = runner.variables().iter().map(|v| v.name.clone()).collect();
    runner.set_weights(&fx.vars("init", &names, "")?)?;
    let (x, y) = (fx.tensor::<i32>("x.npy")?, fx.tensor::<i32>("y.npy")?);
    let label = format!("gpt ({} blocks, {} heads, C {}, {}): ", m.n_layer, m.n_head, m.n_embd, m.precision);
    let mut checks = forward_checks(&runner, &fx, &names, (&x, &y), (&label, "", ""), m.loss, tol.forward)?;
    // The inference graph (evaluation, generation, serving) computes without gradients: its
    // GELU has no gradient term, and in bfloat16 its products are left out of XLA's clusters.
    let inference = Runner::new(&cfg, &GraphOptions::inference(1), session)?;
    inference.set_weights(&fx.vars("init", &names, "")?)?;
    let logits: Tensor<f32> = inference.logits(&x)?;
    let want = fx.array::<f32>("logits.npy")?;
    checks.push(close(&format!("{label}logits, inference graph"), &logits, &want, tol.forward.logits)?);
    checks.push(relative(
        &format!("{label}loss, inference graph"),
        inference.loss::<f32>(&x, &y)?,
        m.loss,
        tol.forward.loss,
    ));

    let (xs, ys) = (fx.array::<i32>("steps/x.npy")?, fx.array::<i32>("steps/y.npy")?);
    let steps = xs.shape()[0];
    ensure!(steps == m.step_losses.len(), "steps/x.npy has {steps} batches, the manifest {}", m.step_losses.len());
    let clipped = m.step_grad_norms.iter().filter(|&&n| n > o.grad_clip).count();
    ensure!(clipped > 0, "no step of the fixtures is clipped: the check would not test clipping");
    let (mut rates, mut losses, mut scales) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..steps {
        rates.push(runner.learning_rate::<f32>()? as f64);
        scales.extend(runner.loss_scale()?.map(f64::from));
        losses.push(runner.train_step::<f32>(&batch(&xs, i)?, &batch(&ys, i)?)? as f64);
    }
    let what = format!("{steps} AdamW steps ({clipped} clipped)");
    checks.push(close_slice(
        &format!("{label}learning rate, {what}"),
        &rates,
        &m.step_learning_rates,
        (0.0, tol.rates),
    ));
    checks.push(close_slice(&format!("{label}losses, {what}"), &losses, &m.step_losses, (0.0, tol.losses)));
    if m.precision.scales_loss() {
        checks.push(close_slice(&format!("{label}loss scales, {what}"), &scales, &m.step_loss_scales, (0.0, 0.0)));
    }
    let state = tol.state;
    checks.extend(compare_state(
        &runner,
        &fx,
        &names,
        (&label, &format!("step {steps}"), &format!("step{steps}")),
        state,
        tol.key_bias,
    )?);
    if let Some(o) = &m.overflow {
        checks.extend(check_overflow(&runner, &fx, &names, o, &label, &tol)?);
    }
    Ok(checks)
}

/// Batch `i` of `[S, B, T]` batches.
fn batch(a: &ArrayD<i32>, i: usize) -> Result<Tensor<i32>> {
    let part = a.index_axis(ndarray::Axis(0), i);
    let dims: Vec<u64> = part.shape().iter().map(|&d| d as u64).collect();
    Ok(Tensor::new(&dims).with_values(&part.iter().cloned().collect::<Vec<_>>())?)
}

/// mixed_float16's loss scaling against Keras' `LossScaleOptimizer` where float16 overflows: the
/// weights of `overflow/init` (the head's kernel scaled up), the steps on `overflow/x.npy`: each
/// step's loss scale and whether it was applied (exactly), its loss, the scale and the step count
/// after them (exactly), the weights and Adam's m and v.
fn check_overflow(
    runner: &Runner,
    fx: &Fixtures,
    names: &[String],
    o: &Overflow,
    label: &str,
    tol: &GptTolerances,
) -> Result<Vec<Check>> {
    runner.set_weights(&fx.vars("overflow/init", names, "")?)?;
    let (xs, ys) = (fx.array::<i32>("overflow/x.npy")?, fx.array::<i32>("overflow/y.npy")?);
    let (mut scales, mut applied, mut losses) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..xs.shape()[0] {
        scales.push(runner.loss_scale()?.context("no loss scale in a mixed_float16 graph")? as f64);
        let before = runner.iterations()?;
        losses.push(runner.train_step::<f32>(&batch(&xs, i)?, &batch(&ys, i)?)? as f64);
        applied.push(runner.iterations()? > before);
    }
    let skipped = applied.iter().filter(|a| !**a).count();
    ensure!(skipped > 0 && skipped < applied.len(), "the overflow fixtures skip {skipped} of {} steps", applied.len());
    let what = format!("{} steps after the head's kernel was scaled up ({skipped} skipped by Keras)", applied.len());
    let as_f64 = |v: &[bool]| v.iter().map(|&a| a as u8 as f64).collect::<Vec<_>>();
    let mut checks = vec![
        close_slice(&format!("{label}loss scales, {what}"), &scales, &o.loss_scales, (0.0, 0.0)),
        close_slice(&format!("{label}steps applied, {what}"), &as_f64(&applied), &as_f64(&o.applied), (0.0, 0.0)),
        close_slice(&format!("{label}losses, {what}"), &losses, &o.losses, (0.0, tol.losses)),
    ];
    let after = [runner.loss_scale()?.unwrap_or(f32::NAN) as f64, runner.iterations()? as f64];
    checks.push(close_slice(
        &format!("{label}loss scale and step count after them"),
        &after,
        &[o.final_scale, o.iterations as f64],
        (0.0, 0.0),
    ));
    checks.extend(compare_state(
        runner,
        fx,
        names,
        (label, "after the overflow steps", "overflow/step"),
        tol.state,
        tol.key_bias,
    )?);
    Ok(checks)
}

/// Per-element tolerances `(atol, rtol)`: |Δ| ≤ atol + rtol·|ref| (`(0, 0)`: exact).
type Within = (f64, f64);

#[derive(Clone, Copy)]
struct Tolerances {
    logits: Within,
    /// |Δ| / |loss|
    loss: f64,
    grads: Within,
}

/// Logits, loss and every gradient on one batch against `<folder>logits.npy`, `loss` and
/// `<folder>grad/<var>.npy`; rows named `<label>logits<batch>`, `<label>loss<batch>`,
/// `<label>gradient <var>`.
fn forward_checks(
    runner: &Runner,
    fx: &Fixtures,
    names: &[String],
    (x, y): (&Tensor<i32>, &Tensor<i32>),
    (label, batch, folder): (&str, &str, &str),
    loss: f64,
    tol: Tolerances,
) -> Result<Vec<Check>> {
    let logits: Tensor<f32> = runner.logits(x)?;
    let (got_loss, grads) = runner.loss_and_gradients::<f32>(x, y, false)?;
    let mut checks = vec![close(
        &format!("{label}logits{batch}"),
        &logits,
        &fx.array::<f32>(&format!("{folder}logits.npy"))?,
        tol.logits,
    )?];
    checks.push(relative(&format!("{label}loss{batch}"), got_loss, loss, tol.loss));
    for (i, name) in names.iter().enumerate() {
        let want = fx.array::<f32>(&format!("{folder}grad/{}.npy", name.replace('/', ".")))?;
        checks.push(close(&format!("{label}gradient {name}"), &grads[i], &want, tol.grads)?);
    }
    Ok(checks)
}

/// A loss against Keras', relative.
fn relative(quantity: &str, got: f32, want: f64, tolerance: f64) -> Check {
    Check {
        quantity: quantity.into(),
        diff: (got as f64 - want).abs() / want.abs(),
        tolerance,
        measure: "|Δ| / |loss|".into(),
    }
}

/// Weights and Adam's m and v against `<folder>/<var>[.m|.v].npy`, rows named
/// `<label><when>: <var>[ Adam m|v]`.
fn compare_state(
    runner: &Runner,
    fx: &Fixtures,
    names: &[String],
    (label, when, folder): (&str, &str, &str),
    [weights_within, m_within, v_within]: [Within; 3],
    key_bias: f64,
) -> Result<Vec<Check>> {
    let weights = runner.weights::<f32>()?;
    let [m, v] = runner.adam_moments::<f32>()?;
    let mut checks = Vec::new();
    let sets = [("", &weights, "", weights_within), (".m", &m, " Adam m", m_within), (".v", &v, " Adam v", v_within)];
    for (suffix, got, which, tolerance) in sets {
        let want = fx.vars(folder, names, suffix)?;
        for (i, name) in names.iter().enumerate() {
            let quantity = format!("{label}{when}: {name}{which}");
            if suffix.is_empty() && name.ends_with("attn/qkv/bias") {
                checks.extend(key_bias_apart(&quantity, &got[i], &want[i], tolerance, key_bias));
                continue;
            }
            let want = ArrayD::from_shape_vec(
                want[i].dims().iter().map(|&d| d as usize).collect::<Vec<_>>(),
                want[i].to_vec(),
            )?;
            checks.push(close(&quantity, &got[i], &want, tolerance)?);
        }
    }
    Ok(checks)
}

/// The attention's key bias has no gradient in exact arithmetic (adding the same number to all of a
/// query's scores leaves its softmax unchanged): Keras and minigpt both move it by rounding noise,
/// which Adam's normalisation scales up. A `[q | k | v]` bias is compared as the query and value
/// parts at `within`, and the key part alone, to an absolute `key_within` (2e-5 in float32).
fn key_bias_apart(
    quantity: &str,
    got: &Tensor<f32>,
    want: &Tensor<f32>,
    within: Within,
    key_within: f64,
) -> Vec<Check> {
    let (got, want): (Vec<f64>, Vec<f64>) =
        (got.iter().map(|&g| g as f64).collect(), want.iter().map(|&w| w as f64).collect());
    let c = want.len() / 3;
    let qv = |v: &[f64]| [&v[..c], &v[2 * c..]].concat();
    vec![
        close_slice(&format!("{quantity} (query, value)"), &qv(&got), &qv(&want), within),
        close_slice(&format!("{quantity} (key)"), &got[c..2 * c], &want[c..2 * c], (key_within, 0.0)),
    ]
}

/// The input pipeline: in text order batch for batch, and one shuffled epoch as a multiset.
fn check_pipeline(fx: &Fixtures, m: &Manifest, train: &[i32], val: &[i32]) -> Result<Vec<Check>> {
    let (t, b) = (m.block_size, m.batch_size);
    let mut checks = Vec::new();

    let (nx, ny) = (fx.array::<i32>("none/x.npy")?, fx.array::<i32>("none/y.npy")?);
    let mut batches = Batches::new(train, t, b, Shuffle::None, 0, 0);
    let (mut x, mut y) = (vec![0; b * t], vec![0; b * t]);
    let mut differing = 0usize;
    for i in 0..nx.shape()[0] {
        ensure!(batches.fill(&mut x, &mut y), "minigpt ran out of batches at {i}");
        let want_x = nx.index_axis(ndarray::Axis(0), i);
        let want_y = ny.index_axis(ndarray::Axis(0), i);
        differing += x.iter().zip(want_x.iter()).filter(|(a, b)| a != b).count();
        differing += y.iter().zip(want_y.iter()).filter(|(a, b)| a != b).count();
    }
    checks.push(Check {
        quantity: format!("batches, no shuffle, first {}", nx.shape()[0]),
        diff: differing as f64,
        tolerance: 0.0,
        measure: "elements differing".into(),
    });

    // The whole validation split in text order, by digest.
    let mut digest = Sha256::new();
    let mut count = 0;
    let mut batches = Batches::new(val, t, b, Shuffle::None, 0, 0);
    while batches.fill(&mut x, &mut y) {
        for v in x.iter().chain(&y) {
            digest.update(v.to_le_bytes());
        }
        count += 1;
    }
    ensure!(
        count == m.none_val.batches,
        "validation split: minigpt made {count} batches, tf.data {}",
        m.none_val.batches
    );
    checks.push(Check {
        quantity: format!("batches, no shuffle, all {count} of val"),
        diff: (hex::encode(digest.finalize()) != m.none_val.sha256) as u8 as f64,
        tolerance: 0.0,
        measure: "SHA-256 differs".into(),
    });

    // One shuffled epoch over the first 20000 validation characters: the same windows, and windows
    // moved from their place in text order as far as tf.data's shuffle moves them.
    let part = &val[..20_000.min(val.len())];
    let mut theirs = tfdata_shuffled(fx, m)?;
    let mut ours = shuffled(part, t, b, Shuffle::Buffer(NOTEBOOK_SHUFFLE_BUFFER), m.seed as u64);
    let text_order: Vec<Vec<i32>> = part.windows(t + 1).take(ours.len()).map(<[i32]>::to_vec).collect();
    ensure!(ours != text_order, "minigpt's shuffled epoch came out in text order");
    let (ks, critical) = displacement_ks(part, &ours, &theirs);
    theirs.sort();
    ours.sort();
    checks.push(Check {
        quantity: format!("shuffled epoch, {} windows", theirs.len()),
        diff: multiset_difference(&ours, &theirs) as f64,
        tolerance: 0.0,
        measure: "windows not shared".into(),
    });
    checks.push(Check {
        quantity: "shuffled epoch, how far windows move".into(),
        diff: ks,
        tolerance: critical,
        measure: "two-sample KS statistic".into(),
    });
    Ok(checks)
}

/// The windows (`block_size + 1` ids) of tf.data's shuffled epoch in the fixtures, in the order
/// it emitted them.
fn tfdata_shuffled(fx: &Fixtures, m: &Manifest) -> Result<Vec<Vec<i32>>> {
    let (t, b) = (m.block_size, m.batch_size);
    let (sx, sy) = (fx.array::<i32>("shuffled/x.npy")?, fx.array::<i32>("shuffled/y.npy")?);
    let mut windows = Vec::new();
    let xs = sx.as_slice().context("shuffled/x.npy")?;
    let ys = sy.as_slice().context("shuffled/y.npy")?;
    for (x, y) in xs.chunks(t).zip(ys.chunks(t)) {
        ensure!(x[1..t] == y[..t - 1], "shuffled fixture: y is not x shifted");
        windows.push(x.iter().cloned().chain([y[t - 1]]).collect());
    }
    ensure!(windows.len() % b == 0, "shuffled fixture: {} windows is not whole batches of {b}", windows.len());
    Ok(windows)
}

/// minigpt's shuffled epoch of `data` (whole batches), window by window in the order emitted.
pub fn shuffled(data: &[i32], t: usize, b: usize, shuffle: Shuffle, seed: u64) -> Vec<Vec<i32>> {
    let (mut x, mut y) = (vec![0; b * t], vec![0; b * t]);
    let mut batches = Batches::new(data, t, b, shuffle, seed, 0);
    let mut windows = Vec::new();
    while batches.fill(&mut x, &mut y) {
        windows
            .extend(x.chunks(t).zip(y.chunks(t)).map(|(x, y)| x.iter().cloned().chain([y[t - 1]]).collect::<Vec<_>>()));
    }
    windows
}

/// The two-sample Kolmogorov–Smirnov statistic between how far each window of epoch `a` and of
/// epoch `b` moved from its place in text order (emitted position − start in `data`), and its
/// critical value at α = 0.001 (c(α) = 1.95). Windows that occur more than once in `data` are left
/// out. Equal shuffles give a statistic below the critical value; a different buffer size, or a
/// global permutation, one far above it.
pub fn displacement_ks(data: &[i32], a: &[Vec<i32>], b: &[Vec<i32>]) -> (f64, f64) {
    let t = a.first().map_or(1, |w| w.len());
    let mut starts: std::collections::HashMap<&[i32], Option<usize>> = std::collections::HashMap::new();
    for (i, w) in data.windows(t).enumerate() {
        starts.entry(w).and_modify(|s| *s = None).or_insert(Some(i));
    }
    let moves = |epoch: &[Vec<i32>]| -> Vec<f64> {
        let mut d: Vec<f64> = epoch
            .iter()
            .enumerate()
            .filter_map(|(pos, w)| starts.get(w.as_slice()).copied().flatten().map(|s| pos as f64 - s as f64))
            .collect();
        d.sort_by(f64::total_cmp);
        d
    };
    let (da, db) = (moves(a), moves(b));
    let (n, m) = (da.len() as f64, db.len() as f64);
    let (mut i, mut j, mut ks) = (0, 0, 0.0f64);
    while i < da.len() && j < db.len() {
        let v = da[i].min(db[j]);
        while i < da.len() && da[i] <= v {
            i += 1;
        }
        while j < db.len() && db[j] <= v {
            j += 1;
        }
        ks = ks.max((i as f64 / n - j as f64 / m).abs());
    }
    (ks, 1.95 * ((n + m) / (n * m)).sqrt())
}

/// What the shuffle check compares, for other shuffles: (KS statistic, critical value) of
/// minigpt's epoch with `shuffle` against tf.data's in the fixtures.
pub fn shuffle_against_tfdata(dir: &Path, corpus: &Corpus, shuffle: Shuffle) -> Result<(f64, f64)> {
    let fx = Fixtures(dir.to_path_buf());
    let m: Manifest = fx.manifest()?;
    let vocab = Vocab::from_strings(&m.vocab)?;
    let encoded = vocab.encode(&corpus.text).map_err(|e| anyhow::anyhow!("corpus: {e}"))?;
    let (_, val) = data::split(&encoded);
    let part = &val[..20_000.min(val.len())];
    let ours = shuffled(part, m.block_size, m.batch_size, shuffle, m.seed as u64);
    Ok(displacement_ks(part, &ours, &tfdata_shuffled(&fx, &m)?))
}

/// The notebook's loop for `curve_steps` steps, windows in text order, from the initial weights.
fn check_curve(
    fx: &Fixtures,
    m: &Manifest,
    train: &[i32],
    runner: Runner,
    init: &[Tensor<f32>],
    tolerance: Within,
) -> Result<Check> {
    let want = fx.array::<f32>("curve/losses.npy")?;
    runner.set_weights(init)?;
    let (t, b) = (m.block_size, m.batch_size);
    let mut batches = Batches::new(train, t, b, Shuffle::None, 0, 0);
    let mut x = Tensor::<i32>::new(&[b as u64, t as u64]);
    let mut y = Tensor::<i32>::new(&[b as u64, t as u64]);
    let mut logged = Vec::new();
    for step in 0..m.curve_steps {
        if !batches.fill(&mut x, &mut y) {
            bail!("the training split ran out of batches at step {step}");
        }
        let loss = runner.train_step::<f32>(&x, &y)?;
        if step % 100 == 0 {
            logged.push(loss as f64);
        }
    }
    let want: Vec<f64> = want.iter().map(|&v| v as f64).collect();
    Ok(close_slice(&format!("loss every 100 steps, {} steps", m.curve_steps), &logged, &want, tolerance))
}

fn differing_chars(a: &str, b: &str) -> usize {
    let (a, b): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
    a.iter().zip(&b).filter(|(x, y)| x != y).count() + a.len().abs_diff(b.len())
}

/// Elements of either sorted list not matched in the other.
fn multiset_difference<T: Ord>(a: &[T], b: &[T]) -> usize {
    let (mut i, mut j, mut unmatched) = (0, 0, 0);
    while i < a.len() && j < b.len() {
        match a[i].cmp(&b[j]) {
            std::cmp::Ordering::Equal => (i, j) = (i + 1, j + 1),
            std::cmp::Ordering::Less => (i, unmatched) = (i + 1, unmatched + 1),
            std::cmp::Ordering::Greater => (j, unmatched) = (j + 1, unmatched + 1),
        }
    }
    unmatched + (a.len() - i) + (b.len() - j)
}

fn same_shape(quantity: &str, got: &Tensor<f32>, want: &ArrayD<f32>) -> Result<()> {
    let dims: Vec<usize> = got.dims().iter().map(|&d| d as usize).collect();
    ensure!(dims == want.shape(), "{quantity}: minigpt's shape {dims:?}, the notebook's {:?}", want.shape());
    Ok(())
}

/// Every element of `got` against `want`: |Δ| ≤ atol + rtol·|want|. The row's difference is the
/// largest |Δ| / (atol + rtol·|want|), passing at ≤ 1; with `(0, 0)` the check is exact and the
/// difference is max |Δ|, passing at 0. NaN never passes.
fn close(quantity: &str, got: &Tensor<f32>, want: &ArrayD<f32>, within: Within) -> Result<Check> {
    same_shape(quantity, got, want)?;
    let got: Vec<f64> = got.iter().map(|&g| g as f64).collect();
    let want: Vec<f64> = want.iter().map(|&w| w as f64).collect();
    Ok(close_slice(quantity, &got, &want, within))
}

/// [`close`] for two series (a length mismatch fails).
fn close_slice(quantity: &str, got: &[f64], want: &[f64], (atol, rtol): Within) -> Check {
    let exact = atol == 0.0 && rtol == 0.0;
    let mut worst = if got.len() == want.len() { 0.0f64 } else { f64::INFINITY };
    for (&g, &w) in got.iter().zip(want) {
        let d = (g - w).abs();
        let ratio = if exact { d } else { d / (atol + rtol * w.abs()) };
        worst = if ratio.is_nan() || worst.is_nan() { f64::NAN } else { worst.max(ratio) };
    }
    let (tolerance, measure) = match exact {
        true => (0.0, "max |Δ|".to_string()),
        false => (1.0, format!("|Δ| / ({atol:.0e} + {rtol:.0e}·|ref|)")),
    };
    Check { quantity: quantity.into(), diff: worst, tolerance, measure }
}
