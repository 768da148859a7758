//! The in-graph gradients (`add_gradients`) against central finite differences, in float64,
//! for every variable of every architecture.

mod common;

use minigpt::graph::{GraphOptions, ModelGraph, Runner};
use minigpt::model::{Arch, ModelConfig};
use minigpt::tfx::SessionConfig;
use tensorflow::{DataType, Tensor};

/// Checks every element of every gradient; returns the analytic gradients.
fn check(cfg: &ModelConfig, x: &Tensor<i32>, y: &Tensor<i32>) -> Vec<Tensor<f64>> {
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
    let analytic: Vec<Tensor<f64>> = runner.fetch_with_batch(&runner.g.grads, x, y).unwrap();

    let eps = 1e-6;
    for (v, var) in vars.iter().enumerate() {
        let mut numeric = Vec::with_capacity(weights[v].len());
        for j in 0..weights[v].len() {
            let w0 = weights[v][j];
            weights[v][j] = w0 + eps;
            runner.set_weights(&weights).unwrap();
            let up: f64 = runner.loss(x, y).unwrap();
            weights[v][j] = w0 - eps;
            runner.set_weights(&weights).unwrap();
            let down: f64 = runner.loss(x, y).unwrap();
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
    let analytic = check(&ModelConfig::bigram(7, 5), &x, &y);
    // Row 6 of the embedding table is never looked up.
    assert!(analytic[0][6 * 5..7 * 5].iter().all(|&g| g == 0.0));
}

#[test]
fn every_gpt_gradient_matches_finite_differences() {
    // Two blocks, two heads: embeddings, positions, LayerNorm, causal attention, GELU MLP, head.
    let cfg = ModelConfig { arch: Arch::Gpt, vocab_size: 7, n_embd: 8, n_layer: 2, n_head: 2, block_size: 5 };
    let x = Tensor::new(&[2, 5]).with_values(&[0, 1, 2, 3, 4, 3, 2, 1, 5, 6]).unwrap();
    let y = Tensor::new(&[2, 5]).with_values(&[1, 2, 3, 4, 2, 1, 0, 6, 6, 0]).unwrap();
    check(&cfg, &x, &y);
}

#[test]
fn gpt_attention_is_causal() {
    // Changing a later token leaves the logits of every earlier position unchanged.
    let cfg = ModelConfig { arch: Arch::Gpt, vocab_size: 9, n_embd: 8, n_layer: 2, n_head: 2, block_size: 6 };
    let runner = Runner::new(ModelGraph::build(&cfg, &GraphOptions::new(4)).unwrap(), SessionConfig::default()).unwrap();
    runner.init().unwrap();
    let a = Tensor::new(&[1, 6]).with_values(&[1, 2, 3, 4, 5, 6]).unwrap();
    let b = Tensor::new(&[1, 6]).with_values(&[1, 2, 3, 8, 0, 7]).unwrap();
    let logits = |x: &Tensor<i32>| runner.fetch_with_batch::<f32>(std::slice::from_ref(&runner.g.logits), x, x).unwrap().remove(0);
    let (la, lb) = (logits(&a), logits(&b));
    assert_eq!(&la[..3 * 9], &lb[..3 * 9], "positions 0..3 saw the future");
    assert_ne!(&la[3 * 9..4 * 9], &lb[3 * 9..4 * 9]);
}
