//! The in-graph gradients (`add_gradients`) against central finite differences, in float64,
//! for every variable of every architecture.

mod common;

use minigpt::device::SessionConfig;
use minigpt::graph::{GraphOptions, Runner};
use minigpt::model::ModelConfig;
use minigpt::optim::AdamConfig;
use tensorflow::{DataType, Tensor};

/// A training graph in float64.
fn runner(cfg: &ModelConfig, seed: i64) -> Runner {
    let opts = GraphOptions { dtype: DataType::Double, ..GraphOptions::training(seed, AdamConfig::default()) };
    let runner = Runner::new(cfg, &opts, SessionConfig::default()).unwrap();
    runner.init().unwrap();
    runner
}

/// Checks every element of every gradient (with dropout's masks when `training`); returns the
/// analytic gradients.
fn check(cfg: &ModelConfig, x: &Tensor<i32>, y: &Tensor<i32>, training: bool) -> Vec<Tensor<f64>> {
    let runner = runner(cfg, 3);
    let vars = runner.variables();
    let mut weights: Vec<Tensor<f64>> = runner.weights().unwrap();
    // Move every vector (biases, LayerNorm scales and offsets) off its initial constant, so its
    // gradient is checked at a general point.
    for (w, var) in weights.iter_mut().zip(&vars) {
        if var.shape.len() == 1 {
            for (i, b) in w.iter_mut().enumerate() {
                *b += 0.1 * ((i * 7 % 5) as f64) - 0.2;
            }
        }
    }
    runner.set_weights(&weights).unwrap();
    let analytic = runner.loss_and_gradients::<f64>(x, y, training).unwrap().1;
    let loss = |runner: &Runner| runner.loss_in_mode::<f64>(x, y, training).unwrap();

    let eps = 1e-6;
    for (v, var) in vars.iter().enumerate() {
        let mut numeric = Vec::with_capacity(weights[v].len());
        for j in 0..weights[v].len() {
            let w0 = weights[v][j];
            weights[v][j] = w0 + eps;
            runner.set_weights(&weights).unwrap();
            let up = loss(&runner);
            weights[v][j] = w0 - eps;
            runner.set_weights(&weights).unwrap();
            let down = loss(&runner);
            weights[v][j] = w0;
            numeric.push((up - down) / (2.0 * eps));
        }
        runner.set_weights(&weights).unwrap();
        // Central differences in float64 with eps 1e-6: truncation ~1e-12, rounding ~1e-10.
        common::assert_close(&var.name, &analytic[v], &numeric, 1e-8, 1e-6);
        assert!(analytic[v].iter().any(|g| g.abs() > 1e-6), "{}: gradient is all zero", var.name);
    }
    analytic
}

#[test]
fn every_bigram_gradient_matches_finite_differences() {
    // Tokens 0..=5 appear, 6 never does: its embedding row must get a zero gradient.
    let x = Tensor::new(&[2, 4]).with_values(&[0, 1, 2, 3, 3, 2, 1, 5]).unwrap();
    let y = Tensor::new(&[2, 4]).with_values(&[1, 2, 3, 4, 2, 1, 0, 6]).unwrap();
    let analytic = check(&ModelConfig::bigram(7, 5), &x, &y, false);
    // Row 6 of the embedding table is never looked up.
    assert!(analytic[0][6 * 5..7 * 5].iter().all(|&g| g == 0.0));
}

#[test]
fn every_gpt_gradient_matches_finite_differences() {
    // Two blocks, two heads: embeddings, positions, LayerNorm, causal attention, GELU MLP, head.
    let cfg = ModelConfig::gpt(7, 8, 2, 2, 5);
    let x = Tensor::new(&[2, 5]).with_values(&[0, 1, 2, 3, 4, 3, 2, 1, 5, 6]).unwrap();
    let y = Tensor::new(&[2, 5]).with_values(&[1, 2, 3, 4, 2, 1, 0, 6, 6, 0]).unwrap();
    check(&cfg, &x, &y, false);
}

#[test]
fn every_gpt_gradient_with_dropout_matches_finite_differences() {
    // A train step's dropout masks depend on the step only, so the loss is a function of the
    // weights and can be differentiated numerically.
    let cfg = ModelConfig { dropout: 0.3, ..ModelConfig::gpt(7, 8, 2, 2, 5) };
    let x = Tensor::new(&[2, 5]).with_values(&[0, 1, 2, 3, 4, 3, 2, 1, 5, 6]).unwrap();
    let y = Tensor::new(&[2, 5]).with_values(&[1, 2, 3, 4, 2, 1, 0, 6, 6, 0]).unwrap();
    let with = check(&cfg, &x, &y, true);
    let without = check(&cfg, &x, &y, false);
    assert_ne!(with[2][..], without[2][..], "dropout changed nothing in a train step");
}

#[test]
fn dropout_acts_in_train_steps_only() {
    let x = Tensor::new(&[4, 8]).with_values(&(0..32).map(|i| i % 9).collect::<Vec<i32>>()).unwrap();
    let y = Tensor::new(&[4, 8]).with_values(&(0..32).map(|i| (i * 5 + 1) % 9).collect::<Vec<i32>>()).unwrap();
    let build = |dropout: f64| runner(&ModelConfig { dropout, ..ModelConfig::gpt(9, 16, 2, 2, 8) }, 5);
    let (plain, dropped) = (build(0.0), build(0.5));
    let loss = |r: &Runner, training: bool| r.loss_in_mode::<f64>(&x, &y, training).unwrap();
    // Outside train steps the model is the one without dropout, exactly.
    assert_eq!(loss(&dropped, false), loss(&plain, false));
    // In a train step it differs, the same way each time the step is run ...
    let first = loss(&dropped, true);
    assert_ne!(first, loss(&dropped, false));
    assert_eq!(first, loss(&dropped, true));
    // ... and the next step draws other masks: a train step reports the first loss; with its
    // weights put back, the step after it sees the same model with other masks.
    let weights: Vec<Tensor<f64>> = dropped.weights().unwrap();
    let pre_step: f64 = dropped.train_step(&x, &y).unwrap();
    assert_eq!(pre_step, first);
    dropped.set_weights(&weights).unwrap();
    assert_eq!(loss(&dropped, false), loss(&plain, false));
    assert_ne!(loss(&dropped, true), first);
}

#[test]
fn gpt_attention_is_causal() {
    // Changing a later token leaves the logits of every earlier position unchanged.
    let cfg = ModelConfig::gpt(9, 8, 2, 2, 6);
    let runner = Runner::new(&cfg, &GraphOptions::inference(4), SessionConfig::default()).unwrap();
    runner.init().unwrap();
    let a = Tensor::new(&[1, 6]).with_values(&[1, 2, 3, 4, 5, 6]).unwrap();
    let b = Tensor::new(&[1, 6]).with_values(&[1, 2, 3, 8, 0, 7]).unwrap();
    let logits = |x: &Tensor<i32>| runner.logits::<f32>(x).unwrap();
    let (la, lb) = (logits(&a), logits(&b));
    assert_eq!(&la[..3 * 9], &lb[..3 * 9], "positions 0..3 saw the future");
    assert_ne!(&la[3 * 9..4 * 9], &lb[3 * 9..4 * 9]);
}
