//! Generation: the in-graph `While` chain draws exactly what the step-by-step path draws, and
//! temperature and top-k do what they say.

use minigpt::graph::{GraphOptions, ModelGraph, Runner};
use minigpt::model::{Arch, ModelConfig};
use minigpt::sample::{self, SamplerConfig};
use minigpt::tfx::SessionConfig;
use tensorflow::Tensor;

fn runner(seed: i64, top_k: Option<u32>) -> Runner {
    let cfg = ModelConfig::bigram(30, 8);
    let opts = GraphOptions { sampler: Some(SamplerConfig { top_k }), ..GraphOptions::new(seed) };
    let runner = Runner::new(ModelGraph::build(&cfg, &opts).unwrap(), SessionConfig::default()).unwrap();
    runner.init().unwrap();
    // Spread-out logits, so that samples depend on the previous character.
    let vars = runner.g.model.variables();
    let mut w: Vec<Tensor<f32>> = runner.read(&vars).unwrap();
    for (i, v) in w[1].iter_mut().enumerate() {
        *v *= 40.0 + (i % 7) as f32;
    }
    runner.set_weights(&w).unwrap();
    runner
}

#[test]
fn the_in_graph_chain_draws_what_the_step_by_step_path_draws() {
    for (top_k, temperature) in [(None, 1.0f32), (Some(5), 0.7), (None, 2.5)] {
        let prompt = [3, 1, 4];
        let chained = sample::generate(&runner(11, top_k), &prompt, 500, temperature, |_| Ok(())).unwrap();
        let stepwise = sample::generate_stepwise(&runner(11, top_k), &prompt, 500, Tensor::from(temperature), |_| Ok(())).unwrap();
        assert!(runner(11, top_k).g.sampler.as_ref().unwrap().chain.is_some());
        assert_eq!(chained.len(), 500);
        assert_eq!(chained, stepwise, "top_k {top_k:?}, temperature {temperature}");
        // Another seed, another text.
        let other = sample::generate(&runner(12, top_k), &prompt, 500, temperature, |_| Ok(())).unwrap();
        assert_ne!(chained, other);
    }
}

#[test]
fn top_k_keeps_only_the_k_most_likely_characters() {
    let k = 3;
    let runner = runner(5, Some(k));
    let logits: Vec<Tensor<f32>> = {
        let x = Tensor::new(&[1, 30]).with_values(&(0..30).collect::<Vec<i32>>()).unwrap();
        runner.fetch_with_batch(std::slice::from_ref(&runner.g.logits), &x, &x).unwrap()
    };
    let ids = sample::generate(&runner, &[0], 2000, 1.0, |_| Ok(())).unwrap();
    let mut prev = 0usize;
    for &id in &ids {
        let row = &logits[0][prev * 30..(prev + 1) * 30];
        let better = row.iter().filter(|&&l| l > row[id as usize]).count();
        assert!(better < k as usize, "after {prev}, drew {id}, which {better} characters beat");
        prev = id as usize;
    }
}

#[test]
fn a_low_temperature_picks_the_most_likely_character() {
    let runner = runner(9, None);
    let x = Tensor::new(&[1, 30]).with_values(&(0..30).collect::<Vec<i32>>()).unwrap();
    let logits: Vec<Tensor<f32>> = runner.fetch_with_batch(std::slice::from_ref(&runner.g.logits), &x, &x).unwrap();
    let ids = sample::generate(&runner, &[7], 300, 1e-4, |_| Ok(())).unwrap();
    let mut prev = 7usize;
    for &id in &ids {
        let row = &logits[0][prev * 30..(prev + 1) * 30];
        let best = (0..30).max_by(|&a, &b| row[a].total_cmp(&row[b])).unwrap();
        assert_eq!(id as usize, best);
        prev = id as usize;
    }
}
