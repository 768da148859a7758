//! Adam against two steps computed by hand with Keras' rule and defaults.

mod common;

use minigpt::graph::{GraphOptions, ModelGraph, Runner};
use minigpt::model::{Arch, ModelConfig};
use minigpt::optim::AdamConfig;
use minigpt::tfx::SessionConfig;
use tensorflow::Tensor;

fn to_f64(t: &Tensor<f32>) -> Vec<f64> {
    t.iter().map(|&v| v as f64).collect()
}

#[test]
fn two_steps_follow_keras_adam() {
    let cfg = ModelConfig { arch: Arch::Bigram, vocab_size: 11, n_embd: 6 };
    let runner = Runner::new(ModelGraph::build(&cfg, &GraphOptions::new(5)).unwrap(), SessionConfig::default()).unwrap();
    runner.init().unwrap();
    let x = Tensor::new(&[2, 3]).with_values(&[0, 4, 9, 10, 2, 2]).unwrap();
    let y = Tensor::new(&[2, 3]).with_values(&[4, 9, 1, 2, 2, 7]).unwrap();
    let vars = runner.g.model.variables();
    let AdamConfig { learning_rate: lr, beta_1: b1, beta_2: b2, epsilon: eps } = AdamConfig::default();
    assert_eq!((lr, b1, b2, eps), (1e-3, 0.9, 0.999, 1e-7));
    // The graph holds the hyperparameters as float32 constants, as Keras does; Python computes
    // `1 - beta` in float64 first.
    let (keep_1, keep_2) = ((1.0 - b1) as f32 as f64, (1.0 - b2) as f32 as f64);
    let [lr, b1, b2, eps] = [lr, b1, b2, eps].map(|h| h as f32 as f64);

    let mut w: Vec<Vec<f64>> = runner.read::<f32>(&vars).unwrap().iter().map(to_f64).collect();
    let mut m: Vec<Vec<f64>> = w.iter().map(|v| vec![0.0; v.len()]).collect();
    let mut v2 = m.clone();
    for t in 1..=2 {
        let g: Vec<Vec<f64>> = runner.fetch_with_batch::<f32>(&runner.g.grads, &x, &y).unwrap().iter().map(to_f64).collect();
        // What Adam squares: g² for the dense layer; for the embedding, Keras' IndexedSlices rows
        // (one per lookup, d loss/d row = dlogits · kernelᵀ) squared, then summed per token.
        let mut sq: Vec<Vec<f64>> = g.iter().map(|gi| gi.iter().map(|v| v * v).collect()).collect();
        let logits = to_f64(&runner.fetch_with_batch::<f32>(std::slice::from_ref(&runner.g.logits), &x, &y).unwrap()[0]);
        let (vocab, width, n) = (11, 6, x.len());
        sq[0] = vec![0.0; vocab * width];
        for pos in 0..n {
            let row = &logits[pos * vocab..(pos + 1) * vocab];
            let max = row.iter().cloned().fold(f64::MIN, f64::max);
            let z: f64 = row.iter().map(|l| (l - max).exp()).sum();
            let dlogits: Vec<f64> = (0..vocab)
                .map(|k| ((row[k] - max).exp() / z - if k as i32 == y[pos] { 1.0 } else { 0.0 }) / n as f64)
                .collect();
            for c in 0..width {
                let d: f64 = (0..vocab).map(|k| dlogits[k] * w[1][c * vocab + k]).sum();
                sq[0][x[pos] as usize * width + c] += d * d;
            }
        }
        let _: f32 = runner.train_step(&x, &y).unwrap();
        let alpha = lr * (1.0 - b2.powi(t)).sqrt() / (1.0 - b1.powi(t));
        for i in 0..vars.len() {
            for j in 0..w[i].len() {
                m[i][j] += (g[i][j] - m[i][j]) * keep_1;
                v2[i][j] += (sq[i][j] - v2[i][j]) * keep_2;
                w[i][j] -= alpha * m[i][j] / (v2[i][j].sqrt() + eps);
            }
        }
        let got_w: Vec<Tensor<f32>> = runner.read(&vars).unwrap();
        let got_m: Vec<Tensor<f32>> = runner.read(&runner.g.optimizer.m).unwrap();
        let got_v: Vec<Tensor<f32>> = runner.read(&runner.g.optimizer.v).unwrap();
        for i in 0..vars.len() {
            let name = &vars[i].name;
            common::assert_close(&format!("{name} after step {t}"), &to_f64(&got_w[i]), &w[i], 1e-7, 1e-6);
            common::assert_close(&format!("{name}/m after step {t}"), &to_f64(&got_m[i]), &m[i], 1e-9, 1e-5);
            common::assert_close(&format!("{name}/v after step {t}"), &to_f64(&got_v[i]), &v2[i], 1e-12, 1e-5);
        }
        let iterations: Vec<Tensor<i64>> = runner.read(std::slice::from_ref(&runner.g.optimizer.iterations)).unwrap();
        assert_eq!(iterations[0][0], t as i64);
    }
}
