//! Generation: the notebook's loop (run the model, take the last position's logits, sample with
//! `tf.random.categorical`, i.e. the `Multinomial` op, append), streamed as it goes.

use anyhow::{ensure, Context, Result};
use tensorflow::{ops, DataType, Operation, Output, Scope, SessionRunArgs, Tensor};

use crate::graph::Runner;
use crate::model::LanguageModel;
use crate::tfx;

/// Build-time sampler settings (the temperature is fed per call).
#[derive(Debug, Clone, Default)]
pub struct SamplerConfig {
    /// Keep only the k most likely characters.
    pub top_k: Option<u32>,
}

/// The sampling ops: `sample/context` [1, L] int32 → `sample/next` [1, 1] int64.
pub struct Sampler {
    pub context: Operation,
    pub temperature: Output,
    pub next: Output,
}

impl Sampler {
    /// `seed` is the graph seed of the `Multinomial` op; the same seed gives the same samples.
    pub fn build(model: &dyn LanguageModel, cfg: &SamplerConfig, seed: i64, scope: &mut Scope) -> tensorflow::Result<Self> {
        let scope = &mut scope.new_sub_scope("sample");
        let context = tfx::placeholder("sample/context", DataType::Int32, &[1, -1], scope)?;
        let one = ops::constant(1.0f32, scope)?;
        let temperature = tfx::scalar_with_default("sample/temperature", one.into(), scope)?;
        let logits = model.forward(context.clone().into(), scope)?.logits; // [1, L, V]
        // logits[:, -1, :]
        let begin = tfx::constant(&[0i32, -1, 0], &[3], scope)?;
        let end = tfx::constant(&[0i32, 0, 0], &[3], scope)?;
        let strides = tfx::constant(&[1i32, 1, 1], &[3], scope)?;
        let last = ops::StridedSlice::new()
            .begin_mask(0b101)
            .end_mask(0b101)
            .shrink_axis_mask(0b010)
            .build(logits, begin, end, strides, scope)?; // [1, V]
        let last = ops::Cast::new().DstT(DataType::Float).build(last, scope)?;
        let mut scaled: Output = ops::real_div(last, temperature.clone(), scope)?.into(); // [1, V]
        if let Some(k) = cfg.top_k {
            let k = ops::constant(k as i32, scope)?;
            let top = ops::top_kv2(scaled.clone(), k, scope)?; // values [1, k], descending
            let kth = ops::min(top.output(0), ops::constant(1i32, scope)?, &mut scope.with_op_name("sample/kth"))?;
            let kth = ops::expand_dims(kth, ops::constant(1i32, scope)?, scope)?; // [1, 1]
            let below = ops::less(scaled.clone(), kth, scope)?;
            let neg_inf = ops::constant(f32::NEG_INFINITY, scope)?;
            scaled = ops::select_v2(below, neg_inf, scaled, scope)?.into();
        }
        let n = ops::constant(1i32, scope)?;
        let next = ops::Multinomial::new()
            .seed(seed)
            .seed2(1)
            .output_dtype(DataType::Int64)
            .build(scaled, n, &mut scope.with_op_name("sample/next"))?; // [1, 1]
        Ok(Self { context, temperature, next: next.into() })
    }
}

/// Samples `n_chars` ids after `prompt`, calling `emit` with each as soon as it is drawn.
pub fn generate(runner: &Runner, prompt: &[i32], n_chars: usize, temperature: f32, mut emit: impl FnMut(i32) -> Result<()>) -> Result<Vec<i32>> {
    let sampler = runner.g.sampler.as_ref().context("the graph was built without a sampler")?;
    ensure!(!prompt.is_empty(), "the prompt is empty: give at least one character");
    ensure!(temperature > 0.0 && temperature.is_finite(), "--temperature must be a positive number, got {temperature}");
    let keep = runner.g.model.context_size();
    let temperature = Tensor::from(temperature);
    let mut ids = prompt.to_vec();
    for _ in 0..n_chars {
        let window = match keep {
            Some(k) => &ids[ids.len().saturating_sub(k)..],
            None => &ids[..],
        };
        let context = Tensor::new(&[1, window.len() as u64]).with_values(window)?;
        let mut args = SessionRunArgs::new();
        args.add_feed(&sampler.context, 0, &context);
        args.add_feed(&sampler.temperature.operation, 0, &temperature);
        let next = args.request_fetch(&sampler.next.operation, sampler.next.index);
        runner.session.run(&mut args).context("sampling")?;
        let id = args.fetch::<i64>(next)?[0] as i32;
        ids.push(id);
        emit(id)?;
    }
    Ok(ids.split_off(prompt.len()))
}
