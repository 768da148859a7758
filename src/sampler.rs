//! Drawing the next character: the [`NextLogits`] seam that every model source implements (a
//! run's graph, a loaded SavedModel), the attention [`Cache`] carried between its calls, and the
//! [`Sampler`], TensorFlow's `Multinomial` op (what `tf.random.categorical` runs) in a graph of
//! its own, after temperature and top-k.
//!
//! The in-graph `While` loops ([`Chain`]) draw from the same ops with the same seeds, so they
//! give the same text as the step-by-step path (`Multinomial`'s stream depends on its seeds and
//! the calls made, not on which graph holds it).

use anyhow::{Context, Result};
use tensorflow::{ops, DataType, FunctionOptions, Operation, Output, Scope, Session, SessionRunArgs, Shape, Tensor};

use crate::device::SessionConfig;
use crate::tfx;

/// What a model offers the generation loop.
pub trait NextLogits {
    /// The logits [V] of the character after `window` (the last ids of the context, at most
    /// [`NextLogits::context_size`]). `cache` holds what earlier calls computed for the first
    /// `cache.len()` ids of this window; a model may use it and extend it, or ignore it.
    fn next_logits(&self, window: &[i32], cache: &mut Cache) -> Result<Vec<f32>>;
    /// How many trailing ids the next character depends on (`None`: all of them).
    fn context_size(&self) -> Option<usize>;
    /// The whole continuation of `prompt` in one call, when the model has an in-graph loop for
    /// `sampler`.
    fn chain(&self, _prompt: &[i32], _count: usize, _sampler: &SamplerConfig) -> Result<Option<Vec<i32>>> {
        Ok(None)
    }
}

/// Keys and values of the first `len` positions of the current window ([1, H, len, D] each), as
/// a model with attention caches returned them. Empty: a pass over the whole window.
#[derive(Default)]
pub struct Cache {
    pub tensors: Vec<Tensor<f32>>,
    pub len: usize,
}

impl Cache {
    pub fn clear(&mut self) {
        self.tensors.clear();
        self.len = 0;
    }
}

/// How to draw: the `Multinomial` op's seed, the temperature dividing the logits, and top-k.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplerConfig {
    pub seed: i64,
    /// Positive and finite.
    pub temperature: f32,
    /// Keep only the k most likely characters (at least 1).
    pub top_k: Option<u32>,
}

impl SamplerConfig {
    pub fn validate(&self) -> Result<()> {
        match self.invalid() {
            Some((setting, what)) => anyhow::bail!("--{} {what}", setting.replace('_', "-")),
            None => Ok(()),
        }
    }

    /// The first setting out of range, if any: its name (`top_k`, `temperature`) and what it
    /// must be.
    pub fn invalid(&self) -> Option<(&'static str, String)> {
        if self.top_k == Some(0) {
            return Some(("top_k", "must be at least 1".into()));
        }
        // Below the smallest normal float, TensorFlow's kernels read the temperature as 0.
        let t = self.temperature;
        (!(t >= f32::MIN_POSITIVE && t.is_finite()))
            .then(|| ("temperature", format!("must be a positive number from {:e} up, got {t:e}", f32::MIN_POSITIVE)))
    }
}

impl Default for SamplerConfig {
    fn default() -> Self {
        Self { seed: 1337, temperature: 1.0, top_k: None }
    }
}

/// logits [1, V] → one id, in a session of its own.
pub struct Sampler {
    session: Session,
    logits: Operation,
    temperature: Output,
    next: Output,
    value: Tensor<f32>,
}

impl Sampler {
    pub fn new(cfg: &SamplerConfig) -> Result<Self> {
        let mut scope = Scope::new_root_scope();
        let build = |s: &mut Scope| -> tensorflow::Result<(Operation, Output, Output)> {
            let logits = tfx::placeholder("sample/logits", DataType::Float, &[1, -1], s)?;
            let temperature = temperature(s)?;
            let scaled = scale(logits.clone().into(), temperature.clone(), cfg.top_k, s)?;
            let next = multinomial(scaled, cfg.seed, Some("sample/next"), s)?;
            Ok((logits, temperature, next))
        };
        let (logits, temperature, next) = build(&mut scope).context("building the sampler")?;
        let options = SessionConfig::small_graph_options()?;
        let session = Session::new(&options, &scope.graph()).context("creating the sampler's session")?;
        Ok(Self { session, logits, temperature, next, value: Tensor::from(cfg.temperature) })
    }

    /// One id drawn from `logits` [V].
    pub fn draw(&self, logits: &[f32]) -> Result<i32> {
        let logits = Tensor::new(&[1, logits.len() as u64]).with_values(logits)?;
        let mut args = SessionRunArgs::new();
        args.add_feed(&self.logits, 0, &logits);
        args.add_feed(&self.temperature.operation, self.temperature.index, &self.value);
        let next = args.request_fetch(&self.next.operation, self.next.index);
        self.session.run(&mut args).context("sampling")?;
        Ok(args.fetch::<i64>(next)?[0] as i32)
    }
}

/// `sample/temperature`: a float scalar, 1 unless fed.
pub(crate) fn temperature(scope: &mut Scope) -> tensorflow::Result<Output> {
    let one = ops::constant(1.0f32, scope)?;
    tfx::scalar_with_default("sample/temperature", one.into(), scope)
}

/// logits [N, V] → float32 (logits − max) / temperature, all but the top k of each row set to
/// −inf. The largest logit of each row becomes 0, so every temperature that passes validation
/// (however small) leaves the row finite where it matters: the most likely characters stay at 0,
/// the others go to −inf at worst, and `Multinomial` draws among the best (greedy decoding as
/// T → 0). `k` larger than the vocabulary keeps every character (nanoGPT clamps it the same way).
pub(crate) fn scale(
    logits: Output,
    temperature: Output,
    top_k: Option<u32>,
    scope: &mut Scope,
) -> tensorflow::Result<Output> {
    let logits = ops::Cast::new().DstT(DataType::Float).build(logits, scope)?;
    let last = ops::constant(-1i32, scope)?;
    let max = ops::Max::new().keep_dims(true).build(logits.clone(), last, scope)?; // [N, 1]
    let shifted = ops::sub(logits, max, scope)?; // [N, V], each row's largest 0
    let scaled = ops::real_div(shifted, temperature, scope)?; // [N, V]
    let Some(k) = top_k else {
        return Ok(scaled.into());
    };
    let v = ops::Slice::new().build(
        ops::shape(scaled.clone(), scope)?,
        ops::constant(&[1i32][..], scope)?,
        ops::constant(&[1i32][..], scope)?,
        scope,
    )?; // [1] = (V)
    let k = ops::minimum(ops::constant(&[k as i32][..], scope)?, v, scope)?; // [1]
    let k = ops::reshape(k, tfx::shape_const(&[], scope)?, scope)?; // min(k, V)
    let top = ops::top_kv2(scaled.clone(), k, scope)?; // values [N, k], descending
    let kth = ops::min(top.output(0), ops::constant(1i32, scope)?, scope)?; // [N]
    let kth = ops::expand_dims(kth, ops::constant(1i32, scope)?, scope)?; // [N, 1]
    let below = ops::less(scaled.clone(), kth, scope)?;
    let neg_inf = ops::constant(f32::NEG_INFINITY, scope)?;
    Ok(ops::select_v2(below, neg_inf, scaled, scope)?.into())
}

/// `tf.random.categorical(logits, 1)` with op seed 1: [N, V] → [N, 1] int64.
pub(crate) fn multinomial(
    logits: Output,
    seed: i64,
    name: Option<&str>,
    scope: &mut Scope,
) -> tensorflow::Result<Output> {
    let n = ops::constant(1i32, scope)?;
    let op = ops::Multinomial::new().seed(seed).seed2(1).output_dtype(DataType::Int64);
    Ok(match name {
        Some(name) => op.build(logits, n, &mut scope.with_op_name(name))?,
        None => op.build(logits, n, scope)?,
    }
    .into())
}

/// `next` ([1, 1] int64) where the row it was drawn from, `scaled` ([1, V], [`scale`]d), came
/// from finite logits, else -1: any NaN or infinite logit makes a NaN there, or leaves no finite
/// value (-inf stands only for what top-k removed). The loop's caller stops at the first -1.
fn unless_broken(scaled: Output, next: Output, scope: &mut Scope) -> tensorflow::Result<Output> {
    let axes = tfx::constant(&[0i32, 1], &[2], scope)?;
    let nan = ops::any(ops::is_nan(scaled.clone(), scope)?, axes.clone(), scope)?;
    let some_finite = ops::any(ops::is_finite(scaled, scope)?, axes, scope)?;
    let ok = ops::logical_and(ops::logical_not(nan, scope)?, some_finite, scope)?;
    let broken = ops::constant(-1i64, scope)?;
    Ok(ops::select_v2(ok, next, broken, scope)?.into())
}

/// An in-graph sampling loop: `sample/count` (int32 scalar) ids drawn in one `Session::run`, with
/// `temperature` fed, from the same `Multinomial` op (seeds, shapes, one call per character) as
/// [`Sampler`], so the same text.
///
/// Two kinds. A model whose next character depends on the last one only: `sample/start` [1]
/// int32 is the last prompt id and each step reads a row of the [V, V] logits table. A model with
/// a context of `block` characters: `sample/start` [1, block] int32 holds the last (at most
/// `block`) prompt ids from the left, `sample/length` how many, and each step runs the model on
/// the whole window, reads the logits at position `length − 1`, draws, and writes the character
/// at `length` (while the window is not full) or slides the window by one: the notebook's crop to
/// the last `block` characters, each computed by one pass over them.
pub struct Chain {
    pub start: Operation,
    pub count: Operation,
    /// `sample/length` of a windowed chain.
    length: Option<Operation>,
    block: Option<usize>,
    pub temperature: Output,
    pub ids: Output,
    /// What it was built for (temperature aside, which is fed).
    pub sampler: SamplerConfig,
}

/// The loop's variables: their types and shapes.
struct LoopVars {
    types: Vec<DataType>,
    shapes: Vec<Shape>,
}

impl LoopVars {
    /// A placeholder `arg<i>` per loop variable, in `s`'s graph.
    fn args(&self, s: &mut Scope) -> tensorflow::Result<Vec<Output>> {
        self.types
            .iter()
            .zip(&self.shapes)
            .enumerate()
            .map(|(i, (&t, shape))| {
                Ok(ops::Placeholder::new()
                    .dtype(t)
                    .shape(shape.clone())
                    .build(&mut s.with_op_name(&format!("arg{i}")))?
                    .into())
            })
            .collect()
    }

    /// `While(cond, body)` over `inputs` in `scope`'s graph, named `name`; `cond` and `body` build
    /// their function's outputs from its arguments in a graph of their own. Only the ops their
    /// outputs need go into the functions.
    fn build_while(
        &self,
        name: &str,
        inputs: &[Output],
        cond: impl FnOnce(&[Output], &mut Scope) -> tensorflow::Result<Output>,
        body: impl FnOnce(&[Output], &mut Scope) -> tensorflow::Result<Vec<Output>>,
        scope: &mut Scope,
    ) -> tensorflow::Result<Operation> {
        let function = |s: &Scope, fn_name: &str, args: &[Output], outs: &[Output]| {
            let graph = s.graph();
            let needed = needed_ops(outs);
            let needed: Vec<&Operation> = needed.iter().collect();
            graph.to_function::<&str>(fn_name, false, Some(&needed), args, outs, None, &FunctionOptions::new(), None)
        };
        let (cond_name, body_name) =
            (format!("{}_cond", name.replace('/', "_")), format!("{}_body", name.replace('/', "_")));
        let c = &mut Scope::new_root_scope();
        let args = self.args(c)?;
        let out = cond(&args, c)?;
        let cond_fn = function(c, &cond_name, &args, &[out])?;
        let b = &mut Scope::new_root_scope();
        let args = self.args(b)?;
        let outs = body(&args, b)?;
        let body_fn = function(b, &body_name, &args, &outs)?;

        let mut graph = scope.graph_mut();
        graph.copy_function(&cond_fn, None)?;
        graph.copy_function(&body_fn, None)?;
        let mut nd = graph.new_operation("While", name)?;
        nd.add_input_list(inputs);
        nd.set_attr_type_list("T", &self.types)?;
        nd.set_attr_func_name("cond", &cond_name)?;
        nd.set_attr_func_name("body", &body_name)?;
        nd.set_attr_shape_list("output_shapes", &self.shapes)?;
        nd.set_attr_int("parallel_iterations", 1)?;
        // Inlined into the graph as Switch/Merge control flow, as tf.while_loop's are.
        nd.set_attr_bool("_lower_using_switch_merge", true)?;
        nd.finish()
    }
}

/// The ops `outputs` depend on (through inputs and control inputs), each once.
fn needed_ops(outputs: &[Output]) -> Vec<Operation> {
    let mut seen = std::collections::HashSet::new();
    let mut stack: Vec<Operation> = outputs.iter().map(|o| o.operation.clone()).collect();
    let mut needed = Vec::new();
    while let Some(op) = stack.pop() {
        let Ok(name) = op.name() else { continue };
        if !seen.insert(name) {
            continue;
        }
        stack.extend((0..op.num_inputs()).map(|i| op.input(i).0));
        stack.extend(op.control_inputs());
        needed.push(op);
    }
    needed
}

impl Chain {
    /// `While(i < count)`: row = table[prev]; next = Multinomial(row); ids ++= next; prev = next.
    /// `logits_table`: [V, V], the logits after each character. Loop variables: (i int32, count
    /// int32, prev [1] int32, ids [k] int64, table [V, V]).
    pub fn build(logits_table: Output, v: i64, sampler: &SamplerConfig, scope: &mut Scope) -> tensorflow::Result<Self> {
        let scope = &mut scope.new_sub_scope("sample");
        let temperature = temperature(scope)?;
        let table = scale(logits_table, temperature.clone(), sampler.top_k, scope)?;
        let table: Output = ops::identity(table, &mut scope.with_op_name("sample/table"))?.into(); // [V, V]
        let vars = LoopVars {
            types: vec![DataType::Int32, DataType::Int32, DataType::Int32, DataType::Int64, DataType::Float],
            shapes: vec![
                Shape::from(Some(vec![])),
                Shape::from(Some(vec![])),
                Shape::from(Some(vec![Some(1)])),
                Shape::from(Some(vec![None])),
                Shape::from(Some(vec![Some(v), Some(v)])),
            ],
        };
        let start = tfx::placeholder("sample/start", DataType::Int32, &[1], scope)?;
        let count = tfx::placeholder("sample/count", DataType::Int32, &[], scope)?;
        let zero = ops::constant(0i32, scope)?;
        let empty = tfx::constant::<i64>(&[], &[0], scope)?;
        let inputs = [zero.into(), count.clone().into(), start.clone().into(), empty, table];
        let op = vars.build_while(
            "sample/chain",
            &inputs,
            |args, c| Ok(ops::less(args[0].clone(), args[1].clone(), c)?.into()),
            |args, b| {
                let row = ops::gather_v2(args[4].clone(), args[2].clone(), ops::constant(0i32, b)?, b)?; // [1, V]
                let next = multinomial(row.clone().into(), sampler.seed, None, b)?; // [1, 1]
                let next = unless_broken(row.into(), next, b)?; // -1 after broken logits
                let next = ops::reshape(next, tfx::shape_const(&[1], b)?, b)?; // [1]
                let ids = tfx::concat(&[args[3].clone(), next.clone().into()], 0, b)?;
                let zero = ops::constant(0i64, b)?;
                let prev = ops::Cast::new().DstT(DataType::Int32).build(ops::maximum(next, zero, b)?, b)?;
                let i = ops::add_v2(args[0].clone(), ops::constant(1i32, b)?, b)?;
                Ok(vec![i.into(), args[1].clone(), prev.into(), ids, args[4].clone()])
            },
            scope,
        )?;
        let ids = Output { operation: op, index: 3 };
        Ok(Chain { start, count, length: None, block: None, temperature, ids, sampler: *sampler })
    }

    /// The windowed loop (see [`Chain`]) over `logits_at`, which builds the model's logits [1, V]
    /// at one position (int32 scalar) of a window [1, block] in the loop body's graph (the
    /// model's variables are found there by name). Loop variables: (i int32, count int32, window
    /// [1, block] int32, length int32, ids [k] int64, temperature float).
    pub fn windowed(
        block: usize,
        sampler: &SamplerConfig,
        logits_at: impl FnOnce(Output, Output, &mut Scope) -> tensorflow::Result<Output>,
        scope: &mut Scope,
    ) -> tensorflow::Result<Self> {
        let scope = &mut scope.new_sub_scope("sample");
        let t = block as i64;
        let scalar = || Shape::from(Some(vec![]));
        let vars = LoopVars {
            types: vec![
                DataType::Int32,
                DataType::Int32,
                DataType::Int32,
                DataType::Int32,
                DataType::Int64,
                DataType::Float,
            ],
            shapes: vec![
                scalar(),
                scalar(),
                Shape::from(Some(vec![Some(1), Some(t)])),
                scalar(),
                Shape::from(Some(vec![None])),
                scalar(),
            ],
        };
        let temperature = temperature(scope)?;
        let start = tfx::placeholder("sample/start", DataType::Int32, &[1, t], scope)?;
        let length = tfx::placeholder("sample/length", DataType::Int32, &[], scope)?;
        let count = tfx::placeholder("sample/count", DataType::Int32, &[], scope)?;
        let zero = ops::constant(0i32, scope)?;
        let empty = tfx::constant::<i64>(&[], &[0], scope)?;
        let inputs = [
            zero.into(),
            count.clone().into(),
            start.clone().into(),
            length.clone().into(),
            empty,
            temperature.clone(),
        ];
        let op = vars.build_while(
            "sample/window_chain",
            &inputs,
            |args, c| Ok(ops::less(args[0].clone(), args[1].clone(), c)?.into()),
            |args, b| {
                let (window, length) = (args[2].clone(), args[3].clone());
                let one = ops::constant(1i32, b)?;
                let last = ops::sub(length.clone(), one.clone(), b)?;
                let row = logits_at(window.clone(), last.into(), b)?; // [1, V]
                let scaled = scale(row, args[5].clone(), sampler.top_k, b)?;
                let next = multinomial(scaled.clone(), sampler.seed, None, b)?; // [1, 1] int64
                let next = unless_broken(scaled, next, b)?; // -1 after broken logits
                let ids = tfx::concat(
                    &[args[4].clone(), ops::reshape(next.clone(), tfx::shape_const(&[1], b)?, b)?.into()],
                    0,
                    b,
                )?;
                let next = ops::maximum(next, ops::constant(0i64, b)?, b)?; // a valid id, whatever follows
                let next = ops::Cast::new().DstT(DataType::Int32).build(next, b)?; // [1, 1]
                                                                                   // Not full: write at `length`. Full: drop the first character, append.
                let positions = ops::range(ops::constant(0i32, b)?, ops::constant(t as i32, b)?, one.clone(), b)?; // [T]
                let here = ops::reshape(ops::equal(positions, length.clone(), b)?, tfx::shape_const(&[1, t], b)?, b)?;
                let placed = ops::select_v2(here, next.clone(), window.clone(), b)?; // [1, T]
                let rest = ops::Slice::new().build(
                    window,
                    tfx::constant(&[0i32, 1], &[2], b)?,
                    tfx::constant(&[1i32, t as i32 - 1], &[2], b)?,
                    b,
                )?; // [1, T - 1]
                let shifted = tfx::concat(&[rest.into(), next.into()], 1, b)?; // [1, T]
                let full = ops::greater_equal(length.clone(), ops::constant(t as i32, b)?, b)?;
                let window = ops::select_v2(full, shifted, placed, b)?;
                let length = ops::minimum(ops::add_v2(length, one.clone(), b)?, ops::constant(t as i32, b)?, b)?;
                let i = ops::add_v2(args[0].clone(), one, b)?;
                Ok(vec![i.into(), args[1].clone(), window.into(), length.into(), ids, args[5].clone()])
            },
            scope,
        )?;
        let ids = Output { operation: op, index: 4 };
        Ok(Chain { start, count, length: Some(length), block: Some(block), temperature, ids, sampler: *sampler })
    }

    /// `count` ids after `prompt`, in one run of `session` (the session of the chain's graph).
    pub fn run(&self, session: &Session, prompt: &[i32], count: usize, temperature: f32) -> Result<Vec<i32>> {
        anyhow::ensure!(count <= i32::MAX as usize, "too many characters: {count}");
        anyhow::ensure!(!prompt.is_empty(), "the prompt is empty: give at least one character");
        let (start, length) = match self.block {
            None => (Tensor::new(&[1]).with_values(&prompt[prompt.len() - 1..])?, None),
            Some(block) => {
                let window = &prompt[prompt.len().saturating_sub(block)..];
                let mut padded = window.to_vec();
                padded.resize(block, 0);
                (Tensor::new(&[1, block as u64]).with_values(&padded)?, Some(Tensor::from(window.len() as i32)))
            }
        };
        let count = Tensor::from(count as i32);
        let temperature = Tensor::from(temperature);
        let mut args = SessionRunArgs::new();
        args.add_feed(&self.start, 0, &start);
        if let (Some(op), Some(length)) = (&self.length, &length) {
            args.add_feed(op, 0, length);
        }
        args.add_feed(&self.count, 0, &count);
        args.add_feed(&self.temperature.operation, self.temperature.index, &temperature);
        let ids = args.request_fetch(&self.ids.operation, self.ids.index);
        session.run(&mut args).context("sampling")?;
        Ok(args.fetch::<i64>(ids)?.iter().map(|&id| id as i32).collect())
    }
}
