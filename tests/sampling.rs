//! Generation: the in-graph `While` chain draws exactly what the step-by-step path draws, the
//! attention caches give the logits and the text of whole-context passes, and temperature and
//! top-k do what they say.

mod common;

use minigpt::device::SessionConfig;
use minigpt::graph::{Decoder, GraphOptions, Part, Runner};
use minigpt::model::ModelConfig;
use minigpt::run::{Load, RunDir};
use minigpt::sample::{self, Generation};
use minigpt::sampler::{Cache, NextLogits, SamplerConfig};
use minigpt::saved_model::{OpenOptions, Source};
use tensorflow::{DataType, Scope, Session, SessionOptions, SessionRunArgs, Tensor};

fn sampler(seed: i64, top_k: Option<u32>, temperature: f32) -> SamplerConfig {
    SamplerConfig { seed, top_k, temperature }
}

/// An inference graph (with `GraphOptions::sampling`, the in-graph loop), its weights scaled by
/// `factor(name)` so that what it draws depends on the context.
fn runner(cfg: &ModelConfig, opts: GraphOptions, factor: impl Fn(&str, usize) -> f32) -> Runner {
    let runner = Runner::new(cfg, &opts, SessionConfig::default()).unwrap();
    runner.init().unwrap();
    let vars = runner.variables();
    let mut w: Vec<Tensor<f32>> = runner.weights().unwrap();
    for (t, var) in w.iter_mut().zip(&vars) {
        t.iter_mut().enumerate().for_each(|(i, x)| *x *= factor(&var.name, i));
    }
    runner.set_weights(&w).unwrap();
    runner
}

/// A bigram over 30 characters with spread-out logits, so that samples depend on the previous
/// character.
fn bigram(s: SamplerConfig) -> Runner {
    let factor = |name: &str, i: usize| if name == "dense/kernel" { 40.0 + (i % 7) as f32 } else { 1.0 };
    runner(&ModelConfig::bigram(30, 8), GraphOptions::sampling(s), factor)
}

/// A small GPT (context 8), with the in-graph loop.
fn gpt(s: SamplerConfig) -> Runner {
    gpt_with(GraphOptions::sampling(s))
}

/// The same GPT without the in-graph loop: generation goes through the attention caches (or,
/// stepwise, whole-context passes).
fn gpt_cached(s: SamplerConfig) -> Runner {
    gpt_with(GraphOptions::inference(s.seed))
}

fn gpt_with(opts: GraphOptions) -> Runner {
    runner(&ModelConfig::gpt(20, 16, 2, 2, 8), opts, |name, _| if name.contains("head") { 8.0 } else { 3.0 })
}

fn generate(model: &Runner, prompt: &[i32], chars: usize, sampler: SamplerConfig, stepwise: bool) -> Vec<i32> {
    sample::generate(model, prompt, &Generation { chars, sampler, stepwise }, |_| Ok(())).unwrap()
}

#[test]
fn the_in_graph_chain_draws_what_the_step_by_step_path_draws() {
    for (top_k, temperature) in [(None, 1.0f32), (Some(5), 0.7), (None, 2.5)] {
        let s = sampler(11, top_k, temperature);
        let prompt = [3, 1, 4];
        let chained = generate(&bigram(s), &prompt, 500, s, false);
        let stepwise = generate(&bigram(s), &prompt, 500, s, true);
        assert!(bigram(s).chain(&[3], 1, &s).unwrap().is_some());
        assert_eq!(chained.len(), 500);
        assert_eq!(chained, stepwise, "top_k {top_k:?}, temperature {temperature}");
        // Another seed, another text.
        let other = sampler(12, top_k, temperature);
        assert_ne!(chained, generate(&bigram(other), &prompt, 500, other, false));
    }
}

#[test]
fn top_k_keeps_only_the_k_most_likely_characters() {
    let k = 3;
    let s = sampler(5, Some(k), 1.0);
    let runner = bigram(s);
    let x = Tensor::new(&[1, 30]).with_values(&(0..30).collect::<Vec<i32>>()).unwrap();
    let logits: Tensor<f32> = runner.logits(&x).unwrap();
    let ids = generate(&runner, &[0], 2000, s, false);
    let mut prev = 0usize;
    for &id in &ids {
        let row = &logits[prev * 30..(prev + 1) * 30];
        let better = row.iter().filter(|&&l| l > row[id as usize]).count();
        assert!(better < k as usize, "after {prev}, drew {id}, which {better} characters beat");
        prev = id as usize;
    }
}

#[test]
fn a_low_temperature_picks_the_most_likely_character() {
    let s = sampler(9, None, 1e-4);
    let runner = bigram(s);
    let x = Tensor::new(&[1, 30]).with_values(&(0..30).collect::<Vec<i32>>()).unwrap();
    let logits: Tensor<f32> = runner.logits(&x).unwrap();
    for stepwise in [false, true] {
        let ids = generate(&runner, &[7], 300, s, stepwise);
        let mut prev = 7usize;
        for &id in &ids {
            let row = &logits[prev * 30..(prev + 1) * 30];
            let best = (0..30).max_by(|&a, &b| row[a].total_cmp(&row[b])).unwrap();
            assert_eq!(id as usize, best);
            prev = id as usize;
        }
    }
}

#[test]
fn gpt_cached_steps_compute_the_logits_of_the_whole_context() {
    // Each character's logits from the attention caches (one new position per run) against a
    // forward pass over the whole context, for every length up to the block size.
    let runner = gpt(SamplerConfig::default());
    let ids: Vec<i32> = vec![4, 17, 0, 9, 9, 12, 3, 19];
    let mut cache = Cache::default();
    for n in 1..=ids.len() {
        assert_eq!(cache.len, n - 1, "the cache holds the earlier positions");
        let cached = runner.next_logits(&ids[..n], &mut cache).unwrap();
        let x = Tensor::new(&[1, n as u64]).with_values(&ids[..n]).unwrap();
        let full: Tensor<f32> = runner.logits(&x).unwrap(); // [1, n, V]
        let last = &full[(n - 1) * 20..n * 20];
        let diff = cached.iter().zip(last).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        let scale = last.iter().map(|l| l.abs()).fold(0.0f32, f32::max);
        assert!(diff <= 1e-6 * scale, "position {n}: cached logits differ by {diff} (largest {scale})");
        assert!(last.iter().any(|&l| (l - last[0]).abs() > 1.0), "logits too flat to tell contexts apart");
    }
    // A full window slides with the next character: nothing is kept.
    assert_eq!(cache.len, 0);
}

#[test]
fn the_serving_decoder_gives_each_stream_the_logits_of_its_whole_window() {
    // `minigpt serve`'s cached step: streams in slots of their own, a prompt written at once,
    // then one position a step, the window passed again whole when it slides; a slot taken over
    // by a shorter stream; steps with some of the streams only. Each stream's logits against a
    // pass over its window alone.
    let runner = gpt(SamplerConfig::default());
    let cfg = ModelConfig::gpt(20, 16, 2, 2, 8);
    let decoder = Decoder::new(&cfg, &runner.weights().unwrap(), 3, SessionConfig::default()).unwrap().unwrap();
    let whole = |w: &[i32]| -> Vec<f32> {
        let x = Tensor::new(&[1, w.len() as u64]).with_values(w).unwrap();
        let full: Tensor<f32> = runner.logits(&x).unwrap();
        full[(w.len() - 1) * 20..].to_vec()
    };
    // (window, positions already in the slot, slot)
    let mut streams: Vec<(Vec<i32>, usize, usize)> =
        vec![(vec![3, 1, 4], 0, 0), ((4..12).collect(), 0, 1), (vec![5], 0, 2)];
    for step in 0..30 {
        if step == 12 {
            streams[1] = (vec![9, 2], 0, 1); // a new stream in slot 1, which holds 8 positions of the old
        }
        let running: Vec<usize> = (0..streams.len()).filter(|&i| step % 5 != 3 || i != 2).collect();
        let parts: Vec<Part> = running
            .iter()
            .map(|&i| Part { slot: streams[i].2, from: streams[i].1, tokens: &streams[i].0[streams[i].1..] })
            .collect();
        let logits = decoder.step(&parts).unwrap();
        for (&i, got) in running.iter().zip(&logits) {
            let want = whole(&streams[i].0);
            let diff = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
            let scale = want.iter().map(|l| l.abs()).fold(0.0f32, f32::max);
            assert!(diff <= 1e-5 * scale, "step {step}, stream {i}: logits differ by {diff} (largest {scale})");
            let (window, cached, _) = &mut streams[i];
            *cached = window.len();
            if window.len() == 8 {
                window.remove(0);
                *cached = 0;
            }
            window.push(((step * 7 + i * 3) % 20) as i32);
        }
    }
}

#[test]
fn gpt_logits_at_one_position_are_the_whole_passes_logits_there() {
    // The sampling loop's pass computes its last block's MLP and the head at one position only:
    // its logits against the whole pass's, at every position of a full window and of a shorter one.
    let (v, t) = (20usize, 8usize);
    let mut scope = Scope::new_root_scope();
    let model = ModelConfig::gpt(v as u64, 16, 2, 2, t as u64).build(DataType::Float, 3, &mut scope).unwrap();
    let tokens = minigpt::tfx::placeholder("tokens", DataType::Int32, &[1, -1], &mut scope).unwrap();
    let at = minigpt::tfx::placeholder("at", DataType::Int32, &[], &mut scope).unwrap();
    let whole = model.forward(tokens.clone().into(), None, &mut scope).unwrap().logits; // [1, T, V]
    let one = model.logits_at(tokens.clone().into(), at.clone().into(), &mut scope).unwrap(); // [1, V]
    let session = Session::new(&SessionOptions::new(), &scope.graph()).unwrap();
    let mut init = SessionRunArgs::new();
    for var in model.variables() {
        init.add_target(&var.initializer);
    }
    session.run(&mut init).unwrap();
    for ids in [vec![4, 17, 0, 9, 9, 12, 3, 19], vec![5, 1, 2]] {
        let x = Tensor::new(&[1, ids.len() as u64]).with_values(&ids).unwrap();
        for i in 0..ids.len() {
            let position = Tensor::from(i as i32);
            let mut args = SessionRunArgs::new();
            args.add_feed(&tokens, 0, &x);
            args.add_feed(&at, 0, &position);
            let (w, o) = (args.request_fetch(&whole.operation, whole.index), args.request_fetch(&one.operation, 0));
            session.run(&mut args).unwrap();
            let (w, o): (Tensor<f32>, Tensor<f32>) = (args.fetch(w).unwrap(), args.fetch(o).unwrap());
            assert_eq!(o.dims(), [1, v as u64]);
            let row = &w[i * v..(i + 1) * v];
            let diff = o.iter().zip(row).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
            let scale = row.iter().map(|l| l.abs()).fold(0.0f32, f32::max);
            assert!(diff <= 1e-6 * scale, "position {i} of {}: logits differ by {diff} (largest {scale})", ids.len());
        }
    }
}

#[test]
fn gpt_cached_generation_draws_what_whole_context_passes_draw() {
    // 60 characters with a block of 8: caches while the context fits, then the sliding window.
    for (top_k, temperature) in [(None, 1.0f32), (Some(4), 0.8)] {
        let s = sampler(5, top_k, temperature);
        let prompt = [3, 1, 4];
        let cached = generate(&gpt_cached(s), &prompt, 60, s, false);
        let whole = generate(&gpt_cached(s), &prompt, 60, s, true);
        assert_eq!(cached.len(), 60);
        assert_eq!(cached, whole, "top_k {top_k:?}, temperature {temperature}");
        // The context matters: another prompt, another text from the same random stream.
        let other = generate(&gpt_cached(s), &[7, 7, 7, 7, 7, 7, 7, 7, 7, 7], 60, s, false);
        assert_ne!(cached, other);
    }
}

#[test]
fn the_gpts_in_graph_loop_draws_what_the_cached_path_draws() {
    // A prompt shorter than the block of 8 (the window fills, then slides) and one longer (cropped).
    for (prompt, top_k, temperature) in [(vec![3, 1, 4], None, 1.0f32), ((0..12).collect(), Some(4), 0.8)] {
        let s = sampler(5, top_k, temperature);
        let looped = generate(&gpt(s), &prompt, 300, s, false);
        assert!(gpt(s).chain(&prompt, 1, &s).unwrap().is_some());
        assert_eq!(looped.len(), 300);
        assert_eq!(
            looped,
            generate(&gpt_cached(s), &prompt, 300, s, false),
            "top_k {top_k:?}, temperature {temperature}"
        );
    }
}

#[test]
fn generate_and_eval_build_no_training_ops() {
    // The graphs `generate` (with a sampler) and `eval` (without) open a run directory with hold
    // no gradient, no optimizer and no checkpoint saving; the training graph of the same model does.
    let tmp = tempfile::tempdir().unwrap();
    let flags = format!("{} --block-size 16 --batch-size 4 --max-steps 2 --eval-batches 1", common::TINY_GPT);
    let gpt = common::small_run(&tmp.path().join("gpt"), 30_000, &flags.split(' ').collect::<Vec<_>>());
    let bigram = common::small_run(&tmp.path().join("bigram"), 30_000, &["--max-steps", "2", "--eval-batches", "1"]);
    for run in [bigram, gpt] {
        let training =
            RunDir::open(&run).unwrap().load(Load::Training { summaries: true }, Default::default()).unwrap().1;
        for sampler in [Some(SamplerConfig::default()), None] {
            let Source::Run { runner, .. } =
                Source::open(&run, &OpenOptions { sampler, ..Default::default() }).unwrap()
            else {
                panic!("{} opened as a SavedModel", run.display());
            };
            for op in ["BroadcastGradientArgs", "AssignSubVariableOp", "AssignAddVariableOp", "SaveV2", "StopGradient"]
            {
                assert!(training.op_types().contains(op), "{op} is not a training op here");
                assert!(!runner.op_types().contains(op), "{}: the inference graph has {op}", run.display());
            }
            let names = runner.op_names();
            let training_names =
                |n: &&String| n.starts_with("gradients") || n.contains("adam") || n.starts_with("optimizer");
            assert_eq!(names.iter().filter(training_names).count(), 0, "{names:?}");
            assert!(runner.loss_and_gradients::<f32>(&Tensor::new(&[1, 1]), &Tensor::new(&[1, 1]), false).is_err());
        }
    }
}

/// A model that records the size of every in-graph loop run it is asked for.
struct Counted<'a> {
    model: &'a Runner,
    runs: std::cell::RefCell<Vec<(usize, usize)>>,
}

impl NextLogits for Counted<'_> {
    fn next_logits(&self, window: &[i32], cache: &mut Cache) -> anyhow::Result<Vec<f32>> {
        self.model.next_logits(window, cache)
    }
    fn context_size(&self) -> Option<usize> {
        self.model.context_size()
    }
    fn chain(&self, prompt: &[i32], count: usize, s: &SamplerConfig) -> anyhow::Result<Option<Vec<i32>>> {
        self.runs.borrow_mut().push((prompt.len(), count));
        self.model.chain(prompt, count, s)
    }
}

/// Generation costs the same per character at any length: the in-graph loop runs over bounded
/// chunks (at most 256 characters from a context of at most the model's), whose own output
/// does not grow with the text; 20,000 characters take 79 runs of the bigram's loop.
#[test]
fn long_generation_runs_the_loop_over_bounded_chunks() {
    let s = sampler(3, None, 1.0);
    for (model, context, chars) in [(bigram(s), 1, 20_000), (gpt(s), 8, 1_000)] {
        let counted = Counted { model: &model, runs: Default::default() };
        let how = Generation { chars, sampler: s, stepwise: false };
        let ids = sample::generate(&counted, &[1, 2, 3], &how, |_| Ok(())).unwrap();
        assert_eq!(ids.len(), chars);
        let runs = counted.runs.into_inner();
        let drawing: Vec<&(usize, usize)> = runs.iter().filter(|(_, count)| *count > 0).collect();
        assert_eq!(drawing.len(), chars.div_ceil(256));
        assert!(drawing.iter().all(|&&(prompt, count)| prompt <= context && count <= 256), "{drawing:?}");
    }
}
