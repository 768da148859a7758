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

/// A small GPT (context 8) with a sampler, its weights scaled up so that what it draws depends
/// on the context.
fn gpt_runner(seed: i64, top_k: Option<u32>) -> Runner {
    let cfg = ModelConfig::gpt(20, 16, 2, 2, 8);
    let opts = GraphOptions { sampler: Some(SamplerConfig { top_k }), ..GraphOptions::new(seed) };
    let runner = Runner::new(ModelGraph::build(&cfg, &opts).unwrap(), SessionConfig::default()).unwrap();
    runner.init().unwrap();
    let vars = runner.g.model.variables();
    let mut w: Vec<Tensor<f32>> = runner.read(&vars).unwrap();
    for (t, var) in w.iter_mut().zip(&vars) {
        let factor = if var.name.contains("head") { 8.0 } else { 3.0 };
        t.iter_mut().for_each(|x| *x *= factor);
    }
    runner.set_weights(&w).unwrap();
    runner
}

#[test]
fn gpt_cached_steps_compute_the_logits_of_the_whole_context() {
    // Each character's logits from the attention caches (one new position per run) against a
    // forward pass over the whole context, for every length up to the block size.
    let runner = gpt_runner(3, None);
    let cache = runner.g.sampler.as_ref().unwrap().cache.as_ref().unwrap();
    let context_op = &runner.g.sampler.as_ref().unwrap().context;
    let ids: Vec<i32> = vec![4, 17, 0, 9, 9, 12, 3, 19];
    let mut past: Vec<Tensor<f32>> = (0..cache.past.len()).map(|_| Tensor::new(&[1, 2, 0, 8])).collect();
    for n in 1..=ids.len() {
        let token = Tensor::new(&[1, 1]).with_values(&ids[n - 1..n]).unwrap();
        let mut args = tensorflow::SessionRunArgs::new();
        args.add_feed(context_op, 0, &token);
        for (op, t) in cache.past.iter().zip(&past) {
            args.add_feed(op, 0, t);
        }
        let logits = args.request_fetch(&cache.logits.operation, cache.logits.index);
        let present: Vec<_> = cache.present.iter().map(|p| args.request_fetch(&p.operation, p.index)).collect();
        runner.session.run(&mut args).unwrap();
        let cached: Tensor<f32> = args.fetch(logits).unwrap();
        let new_past: Vec<Tensor<f32>> = present.into_iter().map(|t| args.fetch(t).unwrap()).collect();
        drop(args);
        past = new_past;
        assert_eq!(past[0].dims(), [1, 2, n as u64, 8]);

        let x = Tensor::new(&[1, n as u64]).with_values(&ids[..n]).unwrap();
        let full = runner.fetch_with_batch::<f32>(std::slice::from_ref(&runner.g.logits), &x, &x).unwrap().remove(0); // [1, n, V]
        let last = &full[(n - 1) * 20..n * 20];
        let diff = cached.iter().zip(last).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        let scale = last.iter().map(|l| l.abs()).fold(0.0f32, f32::max);
        assert!(diff <= 1e-6 * scale, "position {n}: cached logits differ by {diff} (largest {scale})");
        assert!(last.iter().any(|&l| (l - last[0]).abs() > 1.0), "logits too flat to tell contexts apart");
    }
}

#[test]
fn gpt_cached_generation_draws_what_whole_context_passes_draw() {
    // 60 characters with a block of 8: caches while the context fits, then the sliding window.
    for (top_k, temperature) in [(None, 1.0f32), (Some(4), 0.8)] {
        let prompt = [3, 1, 4];
        let cached = sample::generate(&gpt_runner(5, top_k), &prompt, 60, temperature, |_| Ok(())).unwrap();
        let whole = sample::generate_uncached(&gpt_runner(5, top_k), &prompt, 60, temperature, |_| Ok(())).unwrap();
        assert_eq!(cached.len(), 60);
        assert_eq!(cached, whole, "top_k {top_k:?}, temperature {temperature}");
        // The context matters: another prompt, another text from the same random stream.
        let other = sample::generate(&gpt_runner(5, top_k), &[7, 7, 7, 7, 7, 7, 7, 7, 7, 7], 60, temperature, |_| Ok(())).unwrap();
        assert_ne!(cached, other);
    }
}
