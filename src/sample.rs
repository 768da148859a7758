//! Generation: the notebook's loop (run the model, take the last position's logits, sample with
//! `tf.random.categorical`, i.e. the `Multinomial` op, append).
//!
//! For models with attention caches (the GPT), one `Session::run` per character whose forward
//! pass covers the new position only, continuing from the keys and values of the earlier ones
//! (`sample/past/*` fed, `sample/present/*` fetched), while the context fits the block; once it is
//! longer, the window slides, every position moves, and each character costs one pass over the
//! last `block_size` characters (what cropping the context computes, exactly).
//!
//! For the other models two paths give the same samples for a seed. Step by step, one
//! `Session::run` per character (`sample/next`), streamed as it goes. In the graph, for models whose next character depends on
//! the last one only (the bigram): a `While` loop (`sample/chain`) over the same ops, so one
//! `Session::run` yields the whole text. Both take their logits from one table computed per call,
//! `sample/table` [V, V] (row = previous character), and their `Multinomial` ops carry the same
//! seeds, so their random streams are the same.

use anyhow::{ensure, Context, Result};
use tensorflow::{ops, DataType, FunctionOptions, Operation, Output, Scope, SessionRunArgs, Shape, Tensor};

use crate::graph::Runner;
use crate::model::{CacheSpec, LanguageModel};
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
    pub chain: Option<Chain>,
    pub cache: Option<Cache>,
}

/// The attention caches around `sample/next`: `past` placeholders fed with the earlier
/// positions' keys and values ([1, H, P, D] each; P = 0 to start afresh), `present` the same
/// with the context's positions added.
pub struct Cache {
    pub past: Vec<Operation>,
    pub present: Vec<Output>,
    pub spec: CacheSpec,
    /// The last position's logits [1, V], before temperature and top-k.
    pub logits: Output,
}

impl Cache {
    /// Caches of no position ([1, H, 0, D] each): a pass over the whole context.
    pub fn empty(&self) -> Vec<Tensor<f32>> {
        (0..self.past.len()).map(|_| Tensor::new(&[1, self.spec.heads, 0, self.spec.head_dim])).collect()
    }
}

/// The in-graph sampling loop: `sample/start` [1] int32 (the last prompt id) and `sample/count`
/// (int32 scalar) → `ids` [count] int64.
pub struct Chain {
    pub start: Operation,
    pub count: Operation,
    pub ids: Output,
}

const COND: &str = "minigpt_sample_cond";
const BODY: &str = "minigpt_sample_body";

impl Sampler {
    /// `seed` is the graph seed of the `Multinomial` ops; the same seed gives the same samples.
    pub fn build(model: &dyn LanguageModel, vocab_size: u64, cfg: &SamplerConfig, seed: i64, scope: &mut Scope) -> tensorflow::Result<Self> {
        let scope = &mut scope.new_sub_scope("sample");
        let context = tfx::placeholder("sample/context", DataType::Int32, &[1, -1], scope)?;
        let one = ops::constant(1.0f32, scope)?;
        let temperature = tfx::scalar_with_default("sample/temperature", one.into(), scope)?;
        if let Some(spec) = model.cache() {
            let (h, d) = (spec.heads as i64, spec.head_dim as i64);
            let dtype = model.variables()[0].dtype;
            let past: Vec<Operation> =
                (0..spec.tensors).map(|i| tfx::placeholder(&format!("sample/past/{i}"), dtype, &[1, h, -1, d], scope)).collect::<tensorflow::Result<_>>()?;
            let past_outputs: Vec<Output> = past.iter().map(|p| p.clone().into()).collect();
            let (logits, present) = model.forward_cached(context.clone().into(), &past_outputs, scope)?; // [1, L, V]
            let present = present
                .into_iter()
                .enumerate()
                .map(|(i, p)| Ok(ops::identity(p, &mut scope.with_op_name(&format!("sample/present/{i}")))?.into()))
                .collect::<tensorflow::Result<_>>()?;
            let last = slice_last(logits, 3, scope)?; // [1, V]
            let scaled = scale(last.clone(), temperature.clone(), cfg, scope)?;
            let next = multinomial(scaled, seed, Some("sample/next"), scope)?;
            return Ok(Self { context, temperature, next, chain: None, cache: Some(Cache { past, present, spec, logits: last }) });
        }
        if model.context_size() != Some(1) {
            let logits = model.forward(context.clone().into(), None, scope)?.logits; // [1, L, V]
            let last = slice_last(logits, 3, scope)?; // [1, V]
            let scaled = scale(last, temperature.clone(), cfg, scope)?;
            let next = multinomial(scaled, seed, Some("sample/next"), scope)?;
            return Ok(Self { context, temperature, next, chain: None, cache: None });
        }

        // Every character's logits for the next one: the model on each id alone.
        let v = vocab_size as i32;
        let range = ops::range(ops::constant(0i32, scope)?, ops::constant(v, scope)?, ops::constant(1i32, scope)?, scope)?;
        let ids = ops::reshape(range, tfx::shape_const(&[-1, 1], scope)?, scope)?; // [V, 1]
        let logits = model.forward(ids.into(), None, scope)?.logits; // [V, 1, V]
        let logits = ops::reshape(logits, tfx::shape_const(&[v as i64, v as i64], scope)?, scope)?;
        let table = scale(logits.into(), temperature.clone(), cfg, scope)?;
        let table: Output = ops::identity(table, &mut scope.with_op_name("sample/table"))?.into(); // [V, V]

        let last = slice_last(context.clone().into(), 2, scope)?; // [1]
        let row = ops::gather_v2(table.clone(), last, ops::constant(0i32, scope)?, scope)?; // [1, V]
        let next = multinomial(row.into(), seed, Some("sample/next"), scope)?;
        let chain = chain(table, v, seed, scope)?;
        Ok(Self { context, temperature, next, chain: Some(chain), cache: None })
    }
}

/// `x[:, -1]` of a rank-2 or `x[:, -1, :]` of a rank-3 tensor.
pub(crate) fn slice_last(x: Output, rank: usize, scope: &mut Scope) -> tensorflow::Result<Output> {
    let (begin, end, strides): (Vec<i32>, Vec<i32>, Vec<i32>) = match rank {
        2 => (vec![0, -1], vec![0, 0], vec![1, 1]),
        _ => (vec![0, -1, 0], vec![0, 0, 0], vec![1, 1, 1]),
    };
    let n = rank as u64;
    let mask = if rank == 2 { 0b01 } else { 0b101 };
    Ok(ops::StridedSlice::new()
        .begin_mask(mask)
        .end_mask(mask)
        .shrink_axis_mask(0b010)
        .build(x, tfx::constant(&begin, &[n], scope)?, tfx::constant(&end, &[n], scope)?, tfx::constant(&strides, &[n], scope)?, scope)?
        .into())
}

/// logits [N, V] → float32 logits / temperature, all but the top k of each row set to -inf.
pub(crate) fn scale(logits: Output, temperature: Output, cfg: &SamplerConfig, scope: &mut Scope) -> tensorflow::Result<Output> {
    let logits = ops::Cast::new().DstT(DataType::Float).build(logits, scope)?;
    let scaled = ops::real_div(logits, temperature, scope)?; // [N, V]
    let Some(k) = cfg.top_k else {
        return Ok(scaled.into());
    };
    let top = ops::top_kv2(scaled.clone(), ops::constant(k as i32, scope)?, scope)?; // values [N, k], descending
    let kth = ops::min(top.output(0), ops::constant(1i32, scope)?, scope)?; // [N]
    let kth = ops::expand_dims(kth, ops::constant(1i32, scope)?, scope)?; // [N, 1]
    let below = ops::less(scaled.clone(), kth, scope)?;
    let neg_inf = ops::constant(f32::NEG_INFINITY, scope)?;
    Ok(ops::select_v2(below, neg_inf, scaled, scope)?.into())
}

/// `tf.random.categorical(logits, 1)`: [N, V] → [N, 1] int64.
pub(crate) fn multinomial(logits: Output, seed: i64, name: Option<&str>, scope: &mut Scope) -> tensorflow::Result<Output> {
    let n = ops::constant(1i32, scope)?;
    let op = ops::Multinomial::new().seed(seed).seed2(1).output_dtype(DataType::Int64);
    Ok(match name {
        Some(name) => op.build(logits, n, &mut scope.with_op_name(name))?,
        None => op.build(logits, n, scope)?,
    }
    .into())
}

/// `While(i < count)`: row = table[prev]; next = Multinomial(row); ids ++= next; prev = next.
/// Loop variables: (i int32, count int32, prev [1] int32, ids [k] int64, table [V, V]).
fn chain(table: Output, v: i32, seed: i64, scope: &mut Scope) -> tensorflow::Result<Chain> {
    let shapes = [Shape::from(Some(vec![])), Shape::from(Some(vec![])), Shape::from(Some(vec![Some(1)])), Shape::from(Some(vec![None])), Shape::from(Some(vec![Some(v as i64), Some(v as i64)]))];
    let types = [DataType::Int32, DataType::Int32, DataType::Int32, DataType::Int64, DataType::Float];

    let loop_args = |s: &mut Scope| -> tensorflow::Result<Vec<Output>> {
        types
            .iter()
            .zip(&shapes)
            .enumerate()
            .map(|(i, (&t, shape))| Ok(ops::Placeholder::new().dtype(t).shape(shape.clone()).build(&mut s.with_op_name(&format!("arg{i}")))?.into()))
            .collect()
    };
    let function = |s: &Scope, name: &str, args: &[Output], outs: &[Output]| {
        s.graph().to_function::<&str>(name, false, None, args, outs, None, &FunctionOptions::new(), None)
    };

    let c = &mut Scope::new_root_scope();
    let args = loop_args(c)?;
    let less = ops::less(args[0].clone(), args[1].clone(), c)?;
    let cond = function(c, COND, &args, &[less.into()])?;

    let b = &mut Scope::new_root_scope();
    let args = loop_args(b)?;
    let row = ops::gather_v2(args[4].clone(), args[2].clone(), ops::constant(0i32, b)?, b)?; // [1, V]
    let next = multinomial(row.into(), seed, None, b)?; // [1, 1]
    let next = ops::reshape(next, tfx::shape_const(&[1], b)?, b)?; // [1]
    let ids = tfx::concat(&[args[3].clone(), next.clone().into()], 0, b)?;
    let prev = ops::Cast::new().DstT(DataType::Int32).build(next, b)?;
    let i = ops::add_v2(args[0].clone(), ops::constant(1i32, b)?, b)?;
    let body = function(b, BODY, &args, &[i.into(), args[1].clone(), prev.into(), ids, args[4].clone()])?;

    let start = tfx::placeholder("sample/start", DataType::Int32, &[1], scope)?;
    let count = tfx::placeholder("sample/count", DataType::Int32, &[], scope)?;
    let zero = ops::constant(0i32, scope)?;
    let empty = tfx::constant::<i64>(&[], &[0], scope)?;
    let inputs = [zero.into(), count.clone().into(), start.clone().into(), empty, table];
    let mut graph = scope.graph_mut();
    graph.copy_function(&cond, None)?;
    graph.copy_function(&body, None)?;
    let mut nd = graph.new_operation("While", "sample/chain")?;
    nd.add_input_list(&inputs);
    nd.set_attr_type_list("T", &types)?;
    nd.set_attr_func_name("cond", COND)?;
    nd.set_attr_func_name("body", BODY)?;
    nd.set_attr_shape_list("output_shapes", &shapes)?;
    nd.set_attr_int("parallel_iterations", 1)?;
    // Inlined into the graph as Switch/Merge control flow, as tf.while_loop's are.
    nd.set_attr_bool("_lower_using_switch_merge", true)?;
    let op = nd.finish()?;
    Ok(Chain { start, count, ids: Output { operation: op, index: 3 } })
}

/// Samples `n_chars` ids after `prompt`, calling `emit` with each as soon as it is drawn (all at
/// once when the whole chain runs in the graph).
pub fn generate(runner: &Runner, prompt: &[i32], n_chars: usize, temperature: f32, mut emit: impl FnMut(i32) -> Result<()>) -> Result<Vec<i32>> {
    let sampler = runner.g.sampler.as_ref().context("the graph was built without a sampler")?;
    ensure!(!prompt.is_empty(), "the prompt is empty: give at least one character");
    ensure!(temperature > 0.0 && temperature.is_finite(), "--temperature must be a positive number, got {temperature}");
    let temperature = Tensor::from(temperature);
    if let Some(chain) = &sampler.chain {
        ensure!(n_chars <= i32::MAX as usize, "too many characters: {n_chars}");
        let start = Tensor::new(&[1]).with_values(&prompt[prompt.len() - 1..])?;
        let count = Tensor::from(n_chars as i32);
        let mut args = SessionRunArgs::new();
        args.add_feed(&chain.start, 0, &start);
        args.add_feed(&chain.count, 0, &count);
        args.add_feed(&sampler.temperature.operation, 0, &temperature);
        let ids = args.request_fetch(&chain.ids.operation, chain.ids.index);
        runner.session.run(&mut args).context("sampling")?;
        let ids: Vec<i32> = args.fetch::<i64>(ids)?.iter().map(|&id| id as i32).collect();
        for &id in &ids {
            emit(id)?;
        }
        return Ok(ids);
    }
    if let Some(cache) = &sampler.cache {
        let block = runner.g.model.context_size().context("a cached model without a context size")?;
        return generate_cached(runner, sampler, cache, block, prompt, n_chars, &temperature, emit);
    }
    generate_stepwise(runner, prompt, n_chars, temperature, emit)
}

/// What [`generate`] does for a model with attention caches, the notebook's way: the loop of
/// [`generate_with`], each character from a pass over the whole (cropped) context with the caches
/// left empty. The same ops and random stream, for comparison.
pub fn generate_uncached(runner: &Runner, prompt: &[i32], n_chars: usize, temperature: f32, emit: impl FnMut(i32) -> Result<()>) -> Result<Vec<i32>> {
    let sampler = runner.g.sampler.as_ref().context("the graph was built without a sampler")?;
    ensure!(sampler.cache.is_some(), "the model keeps no attention cache");
    ensure!(runner.g.dtype == DataType::Float, "generation runs float32 graphs");
    ensure!(temperature > 0.0 && temperature.is_finite(), "--temperature must be a positive number, got {temperature}");
    generate_stepwise(runner, prompt, n_chars, Tensor::from(temperature), emit)
}

/// One `Session::run` per character with the attention caches (see the module's documentation).
fn generate_cached(
    runner: &Runner,
    sampler: &Sampler,
    cache: &Cache,
    block: usize,
    prompt: &[i32],
    n_chars: usize,
    temperature: &Tensor<f32>,
    mut emit: impl FnMut(i32) -> Result<()>,
) -> Result<Vec<i32>> {
    ensure!(runner.g.dtype == DataType::Float, "generation runs float32 graphs");
    let mut ids = prompt.to_vec();
    // The cache holds the positions ids[start..start + cached].
    let (mut start, mut cached) = (0, 0);
    let mut past: Vec<Tensor<f32>> = Vec::new();
    for _ in 0..n_chars {
        let window = ids.len().saturating_sub(block);
        if window != start || past.is_empty() {
            (start, cached) = (window, 0);
            past = cache.empty();
        }
        let new = &ids[start + cached..];
        let tokens = Tensor::new(&[1, new.len() as u64]).with_values(new)?;
        // After this step the window slides if the context is full: no use for the caches then.
        let keep = ids.len() < block;
        let (id, present) = {
            let mut args = SessionRunArgs::new();
            args.add_feed(&sampler.context, 0, &tokens);
            args.add_feed(&sampler.temperature.operation, 0, temperature);
            for (op, t) in cache.past.iter().zip(&past) {
                args.add_feed(op, 0, t);
            }
            let next = args.request_fetch(&sampler.next.operation, sampler.next.index);
            let present: Vec<_> = if keep { cache.present.iter().map(|p| args.request_fetch(&p.operation, p.index)).collect() } else { Vec::new() };
            runner.session.run(&mut args).context("sampling")?;
            let present: Vec<Tensor<f32>> = present.into_iter().map(|t| args.fetch(t)).collect::<Result<_, _>>()?;
            (args.fetch::<i64>(next)?[0] as i32, present)
        };
        cached = ids.len() - start;
        past = present;
        ids.push(id);
        emit(id)?;
    }
    Ok(ids.split_off(prompt.len()))
}

/// One `Session::run` per character (`sample/next`) over the whole (cropped) context; a model's
/// attention caches, if it has any, are fed empty.
pub fn generate_stepwise(runner: &Runner, prompt: &[i32], n_chars: usize, temperature: Tensor<f32>, emit: impl FnMut(i32) -> Result<()>) -> Result<Vec<i32>> {
    let sampler = runner.g.sampler.as_ref().context("the graph was built without a sampler")?;
    let (past, empty) = match &sampler.cache {
        Some(cache) => (&cache.past[..], cache.empty()),
        None => (&[][..], Vec::new()),
    };
    generate_with(prompt, n_chars, runner.g.model.context_size(), emit, |window| {
        let context = Tensor::new(&[1, window.len() as u64]).with_values(window)?;
        let mut args = SessionRunArgs::new();
        args.add_feed(&sampler.context, 0, &context);
        args.add_feed(&sampler.temperature.operation, 0, &temperature);
        for (op, t) in past.iter().zip(&empty) {
            args.add_feed(op, 0, t);
        }
        let next = args.request_fetch(&sampler.next.operation, sampler.next.index);
        runner.session.run(&mut args).context("sampling")?;
        Ok(args.fetch::<i64>(next)?[0] as i32)
    })
}

/// The notebook's loop: `next(context)` draws an id given the last `keep` ids (all if `None`).
pub fn generate_with(
    prompt: &[i32],
    n_chars: usize,
    keep: Option<usize>,
    mut emit: impl FnMut(i32) -> Result<()>,
    mut next: impl FnMut(&[i32]) -> Result<i32>,
) -> Result<Vec<i32>> {
    ensure!(!prompt.is_empty(), "the prompt is empty: give at least one character");
    let mut ids = prompt.to_vec();
    for _ in 0..n_chars {
        let window = match keep {
            Some(k) => &ids[ids.len().saturating_sub(k)..],
            None => &ids[..],
        };
        let id = next(window)?;
        ids.push(id);
        emit(id)?;
    }
    Ok(ids.split_off(prompt.len()))
}
