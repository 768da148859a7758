//! The in-graph gradients (`add_gradients`) against central finite differences, in float64.

mod common;

use minigpt::graph::{GraphOptions, ModelGraph, Runner};
use minigpt::model::{Arch, ModelConfig};
use minigpt::tfx::SessionConfig;
use tensorflow::{DataType, Tensor};

#[test]
fn every_gradient_matches_finite_differences() {
    let cfg = ModelConfig { arch: Arch::Bigram, vocab_size: 7, n_embd: 5 };
    let opts = GraphOptions { dtype: DataType::Double, ..GraphOptions::new(3) };
    let runner = Runner::new(ModelGraph::build(&cfg, &opts).unwrap(), SessionConfig::default()).unwrap();
    runner.init().unwrap();
    // Tokens 0..=5 appear, 6 never does: its embedding row must get a zero gradient.
    let x = Tensor::new(&[2, 4]).with_values(&[0, 1, 2, 3, 3, 2, 1, 5]).unwrap();
    let y = Tensor::new(&[2, 4]).with_values(&[1, 2, 3, 4, 2, 1, 0, 6]).unwrap();
    let vars = runner.g.model.variables();
    let mut weights: Vec<Tensor<f64>> = runner.read(&vars).unwrap();
    // A non-zero bias, so its gradient is checked away from the initial point.
    for (i, b) in weights[2].iter_mut().enumerate() {
        *b = 0.1 * (i as f64) - 0.3;
    }
    runner.set_weights(&weights).unwrap();
    let analytic: Vec<Tensor<f64>> = runner.fetch_with_batch(&runner.g.grads, &x, &y).unwrap();

    let eps = 1e-6;
    for (v, var) in vars.iter().enumerate() {
        let mut numeric = Vec::with_capacity(weights[v].len());
        for j in 0..weights[v].len() {
            let w0 = weights[v][j];
            weights[v][j] = w0 + eps;
            runner.set_weights(&weights).unwrap();
            let up: f64 = runner.loss(&x, &y).unwrap();
            weights[v][j] = w0 - eps;
            runner.set_weights(&weights).unwrap();
            let down: f64 = runner.loss(&x, &y).unwrap();
            weights[v][j] = w0;
            numeric.push((up - down) / (2.0 * eps));
        }
        runner.set_weights(&weights).unwrap();
        // Central differences in float64 with eps 1e-6: truncation ~1e-12, rounding ~1e-10.
        common::assert_close(&var.name, &analytic[v], &numeric, 1e-8, 1e-6);
        assert!(analytic[v].iter().any(|g| g.abs() > 1e-4), "{}: gradient is all zero", var.name);
    }
    // Row 6 of the embedding table is never looked up.
    assert!(analytic[0][6 * 5..7 * 5].iter().all(|&g| g == 0.0));
}
