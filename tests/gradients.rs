//! The in-graph gradients (`add_gradients`) against central finite differences, in float64,
//! for every variable of every architecture.

mod common;

use minigpt::graph::{GraphOptions, ModelGraph, Runner};
use minigpt::model::{Arch, ModelConfig};
use minigpt::tfx::SessionConfig;
use tensorflow::{DataType, Output, SessionRunArgs, Tensor};

/// `outputs` on the batch, in a train step's mode (`training`: dropout on) or not, without
/// changing any variable.
fn fetch(runner: &Runner, outputs: &[Output], x: &Tensor<i32>, y: &Tensor<i32>, training: bool) -> Vec<Tensor<f64>> {
    let flag = Tensor::from(training);
    let mut args = SessionRunArgs::new();
    args.add_feed(&runner.g.tokens, 0, x);
    args.add_feed(&runner.g.targets, 0, y);
    args.add_feed(&runner.g.training, 0, &flag);
    let tokens: Vec<_> = outputs.iter().map(|o| args.request_fetch(&o.operation, o.index)).collect();
    runner.session.run(&mut args).unwrap();
    tokens.into_iter().map(|t| args.fetch(t).unwrap()).collect()
}

/// Checks every element of every gradient (with dropout's masks when `training`); returns the
/// analytic gradients.
fn check(cfg: &ModelConfig, x: &Tensor<i32>, y: &Tensor<i32>, training: bool) -> Vec<Tensor<f64>> {
    let opts = GraphOptions { dtype: DataType::Double, ..GraphOptions::new(3) };
    let runner = Runner::new(ModelGraph::build(cfg, &opts).unwrap(), SessionConfig::default()).unwrap();
    runner.init().unwrap();
    let vars = runner.g.model.variables();
    let mut weights: Vec<Tensor<f64>> = runner.read(&vars).unwrap();
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
    let analytic = fetch(&runner, &runner.g.grads, x, y, training);
    let loss = |runner: &Runner| fetch(runner, std::slice::from_ref(&runner.g.loss), x, y, training)[0][0];

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
    let runner = |dropout: f64| {
        let cfg = ModelConfig { dropout, ..ModelConfig::gpt(9, 16, 2, 2, 8) };
        let opts = GraphOptions { dtype: DataType::Double, ..GraphOptions::new(5) };
        let r = Runner::new(ModelGraph::build(&cfg, &opts).unwrap(), SessionConfig::default()).unwrap();
        r.init().unwrap();
        r
    };
    let (plain, dropped) = (runner(0.0), runner(0.5));
    let loss = |r: &Runner, training: bool| fetch(r, std::slice::from_ref(&r.g.loss), &x, &y, training)[0][0];
    // Outside train steps the model is the one without dropout, exactly.
    assert_eq!(loss(&dropped, false), loss(&plain, false));
    // In a train step it differs, the same way each time the step is run ...
    let first = loss(&dropped, true);
    assert_ne!(first, loss(&dropped, false));
    assert_eq!(first, loss(&dropped, true));
    // ... and the next step draws other masks: a train step reports the first loss; with its
    // weights put back, the step after it sees the same model with other masks.
    let vars = dropped.g.model.variables();
    let weights: Vec<Tensor<f64>> = dropped.read(&vars).unwrap();
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
    let runner = Runner::new(ModelGraph::build(&cfg, &GraphOptions::new(4)).unwrap(), SessionConfig::default()).unwrap();
    runner.init().unwrap();
    let a = Tensor::new(&[1, 6]).with_values(&[1, 2, 3, 4, 5, 6]).unwrap();
    let b = Tensor::new(&[1, 6]).with_values(&[1, 2, 3, 8, 0, 7]).unwrap();
    let logits = |x: &Tensor<i32>| runner.fetch_with_batch::<f32>(std::slice::from_ref(&runner.g.logits), x, x).unwrap().remove(0);
    let (la, lb) = (logits(&a), logits(&b));
    assert_eq!(&la[..3 * 9], &lb[..3 * 9], "positions 0..3 saw the future");
    assert_ne!(&la[3 * 9..4 * 9], &lb[3 * 9..4 * 9]);
}
