//! Adam against two steps computed by hand with Keras' rule and defaults.

mod common;

use minigpt::device::SessionConfig;
use minigpt::graph::{GraphOptions, Runner};
use minigpt::model::ModelConfig;
use minigpt::optim::AdamConfig;
use tensorflow::Tensor;

fn to_f64(t: &Tensor<f32>) -> Vec<f64> {
    t.iter().map(|&v| v as f64).collect()
}

#[test]
fn two_steps_follow_keras_adam() {
    let cfg = ModelConfig::bigram(11, 6);
    let runner =
        Runner::new(&cfg, &GraphOptions::training(5, AdamConfig::default()), SessionConfig::default()).unwrap();
    runner.init().unwrap();
    let x = Tensor::new(&[2, 3]).with_values(&[0, 4, 9, 10, 2, 2]).unwrap();
    let y = Tensor::new(&[2, 3]).with_values(&[4, 9, 1, 2, 2, 7]).unwrap();
    let vars = runner.variables();
    let AdamConfig { learning_rate: lr, beta_1: b1, beta_2: b2, epsilon: eps, .. } = AdamConfig::default();
    assert_eq!((lr, b1, b2, eps), (1e-3, 0.9, 0.999, 1e-7));
    // The graph holds the hyperparameters as float32 constants, as Keras does; Python computes
    // `1 - beta` in float64 first.
    let (keep_1, keep_2) = ((1.0 - b1) as f32 as f64, (1.0 - b2) as f32 as f64);
    let [lr, b1, b2, eps] = [lr, b1, b2, eps].map(|h| h as f32 as f64);

    let mut w: Vec<Vec<f64>> = runner.weights::<f32>().unwrap().iter().map(to_f64).collect();
    let mut m: Vec<Vec<f64>> = w.iter().map(|v| vec![0.0; v.len()]).collect();
    let mut v2 = m.clone();
    for t in 1..=2 {
        let g: Vec<Vec<f64>> = runner.loss_and_gradients::<f32>(&x, &y, false).unwrap().1.iter().map(to_f64).collect();
        // What Adam squares: g² for the dense layer; for the embedding, Keras' IndexedSlices rows
        // (one per lookup, d loss/d row = dlogits · kernelᵀ) squared, then summed per token.
        let mut sq: Vec<Vec<f64>> = g.iter().map(|gi| gi.iter().map(|v| v * v).collect()).collect();
        let logits = to_f64(&runner.logits::<f32>(&x).unwrap());
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
        let got_w: Vec<Tensor<f32>> = runner.weights().unwrap();
        let [got_m, got_v]: [Vec<Tensor<f32>>; 2] = runner.adam_moments().unwrap();
        for i in 0..vars.len() {
            let name = &vars[i].name;
            common::assert_close(&format!("{name} after step {t}"), &to_f64(&got_w[i]), &w[i], 1e-7, 1e-6);
            common::assert_close(&format!("{name}/m after step {t}"), &to_f64(&got_m[i]), &m[i], 1e-9, 1e-5);
            common::assert_close(&format!("{name}/v after step {t}"), &to_f64(&got_v[i]), &v2[i], 1e-12, 1e-5);
        }
        assert_eq!(runner.iterations().unwrap(), t as i64);
    }
}

#[test]
fn the_learning_rate_warms_up_then_decays_along_a_cosine() {
    let cfg = ModelConfig::bigram(11, 6);
    let adam = AdamConfig {
        learning_rate: 1e-2,
        warmup_steps: 5,
        decay_steps: Some(20),
        min_lr: 1e-3,
        ..AdamConfig::default()
    };
    let runner = Runner::new(&cfg, &GraphOptions::training(5, adam), SessionConfig::default()).unwrap();
    runner.init().unwrap();
    let x = Tensor::new(&[1, 3]).with_values(&[0, 4, 9]).unwrap();
    let lr_of = |it: u64| adam.learning_rate_at(it);
    // nanoGPT's formula at a few points.
    assert!((lr_of(0) - 1e-2 / 6.0).abs() < 1e-15 && (lr_of(5) - 1e-2).abs() < 1e-15);
    assert!((lr_of(20) - 1e-3).abs() < 1e-15 && (lr_of(30) - 1e-3).abs() < 1e-15);
    assert!((lr_of(12) - (1e-3 + 0.5 * (1.0 + (std::f64::consts::PI * 7.0 / 15.0).cos()) * 9e-3)).abs() < 1e-15);
    for it in 0..26u64 {
        let lr: f32 = runner.learning_rate().unwrap();
        let want = lr_of(it);
        assert!((lr as f64 - want).abs() <= 1e-6 * want, "step {it}: graph {lr} vs {want}");
        let _: f32 = runner.train_step(&x, &x).unwrap();
    }
}

#[test]
fn adamw_decays_matrices_only_and_clipping_bounds_the_global_norm() {
    let cfg = ModelConfig::bigram(11, 6);
    let adam = AdamConfig { weight_decay: 0.1, clip_norm: Some(1e-3), ..AdamConfig::default() };
    let runner = Runner::new(&cfg, &GraphOptions::training(5, adam), SessionConfig::default()).unwrap();
    runner.init().unwrap();
    let x = Tensor::new(&[2, 3]).with_values(&[0, 4, 9, 10, 2, 3]).unwrap();
    let y = Tensor::new(&[2, 3]).with_values(&[4, 9, 1, 2, 3, 7]).unwrap();
    let vars = runner.variables();
    let w0: Vec<Vec<f64>> = runner.weights::<f32>().unwrap().iter().map(to_f64).collect();
    let g: Vec<Vec<f64>> = runner.loss_and_gradients::<f32>(&x, &y, false).unwrap().1.iter().map(to_f64).collect();
    let norm = g.iter().flatten().map(|v| v * v).sum::<f64>().sqrt();
    assert!(norm > 1e-2, "the test needs clipping to bite: norm {norm}");
    let factor = 1e-3 / norm;
    let _: f32 = runner.train_step(&x, &y).unwrap();
    let w1: Vec<Vec<f64>> = runner.weights::<f32>().unwrap().iter().map(to_f64).collect();
    let m1: Vec<Vec<f64>> = runner.adam_moments::<f32>().unwrap()[0].iter().map(to_f64).collect();

    let (lr, b1, b2, eps) = (1e-3f32 as f64, 0.9f32 as f64, 0.999f32 as f64, 1e-7f32 as f64);
    let alpha = lr * (1.0 - b2).sqrt() / (1.0 - b1);
    for i in 0..3 {
        for j in 0..g[i].len() {
            let gc = g[i][j] * factor;
            let m = gc * 0.1;
            assert!((m1[i][j] - m).abs() <= 1e-6 * m.abs() + 1e-12, "{} m[{j}]: {} vs {m}", vars[i].name, m1[i][j]);
            if i == 0 {
                continue; // the embedding's v is Keras' per-lookup squares (tested above)
            }
            let v = gc * gc * 0.001;
            // Only the kernel (a matrix, not an embedding) decays: var·(1 − lr·wd) first.
            let decayed = if i == 1 { w0[i][j] * (1.0 - lr * 0.1) } else { w0[i][j] };
            let want = decayed - m * alpha / (v.sqrt() + eps);
            assert!(
                (w1[i][j] - want).abs() <= 1e-6 * want.abs().max(1e-3),
                "{}[{j}]: {} vs {want}",
                vars[i].name,
                w1[i][j]
            );
        }
    }
    // The embedding does not decay: rows no token looked up (5..9 minus 9) keep their values.
    for row in [5usize, 6, 7, 8] {
        assert_eq!(&w1[0][row * 6..(row + 1) * 6], &w0[0][row * 6..(row + 1) * 6]);
    }
}
