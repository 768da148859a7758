//! SavedModel export: a run as a directory Python's `tf.saved_model.load` reads (DESIGN.md §4).
//!
//! The layout is a TF1-style SavedModel, which TensorFlow 2 loads through its v1 loader:
//! `saved_model.pb` (one MetaGraph tagged `serve` holding the training graph, a `SaverDef` naming
//! the checkpoint ops, and the signatures), `variables/variables.{index,data-00000-of-00001}` (a V2
//! checkpoint of every variable), and `assets.extra/vocab.json` and `assets.extra/minigpt.json`.
//! The crate's own `SavedModelBuilder` leaves out what Python's loader needs (the saver's tensor
//! names with `:0`, the save tensor), so the protos are written here with prost.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{ensure, Context, Result};
use prost::Message;
use tensorflow::{ops, DataType, Operation, Output, Scope, SessionRunArgs, Tensor};

use crate::checkpoint::{path_str, RunConfig, RunDir};
use crate::data::Vocab;
use crate::tfx::{self, CheckpointEntry, CheckpointReader};
use crate::cli::SessionArgs;
use crate::device::DeviceChoice;
use crate::graph::{GraphOptions, Runner};
use crate::train;

/// The signature Python's `model.signatures["serving_default"]` finds: `tokens` → `logits`.
pub const SERVING: &str = "serving_default";
/// One Adam step: `x`, `y` → `loss` (before the step).
pub const TRAIN_STEP: &str = "train_step";
pub const SERVE_TAG: &str = "serve";

#[derive(Clone, PartialEq, Message)]
struct SavedModel {
    #[prost(int64, tag = "1")]
    saved_model_schema_version: i64,
    #[prost(message, repeated, tag = "2")]
    meta_graphs: Vec<MetaGraphDef>,
}

#[derive(Clone, PartialEq, Message)]
struct MetaGraphDef {
    #[prost(message, optional, tag = "1")]
    meta_info_def: Option<MetaInfoDef>,
    /// A serialized `GraphDef` (an embedded message and `bytes` share their wire format).
    #[prost(bytes = "vec", tag = "2")]
    graph_def: Vec<u8>,
    #[prost(message, optional, tag = "3")]
    saver_def: Option<SaverDef>,
    #[prost(btree_map = "string, message", tag = "5")]
    signature_def: BTreeMap<String, SignatureDef>,
}

#[derive(Clone, PartialEq, Message)]
struct MetaInfoDef {
    #[prost(string, repeated, tag = "4")]
    tags: Vec<String>,
    #[prost(string, tag = "5")]
    tensorflow_version: String,
}

#[derive(Clone, PartialEq, Message)]
struct SaverDef {
    #[prost(string, tag = "1")]
    filename_tensor_name: String,
    #[prost(string, tag = "2")]
    save_tensor_name: String,
    #[prost(string, tag = "3")]
    restore_op_name: String,
    #[prost(int32, tag = "4")]
    max_to_keep: i32,
    /// `CheckpointFormatVersion`: 2 is V2.
    #[prost(int32, tag = "7")]
    version: i32,
}

#[derive(Clone, PartialEq, Message)]
struct SignatureDef {
    #[prost(btree_map = "string, message", tag = "1")]
    inputs: BTreeMap<String, TensorInfo>,
    #[prost(btree_map = "string, message", tag = "2")]
    outputs: BTreeMap<String, TensorInfo>,
    #[prost(string, tag = "3")]
    method_name: String,
}

#[derive(Clone, PartialEq, Message)]
struct TensorInfo {
    #[prost(string, tag = "1")]
    name: String,
    /// `DataType` enum value.
    #[prost(int32, tag = "2")]
    dtype: i32,
    #[prost(message, optional, tag = "3")]
    tensor_shape: Option<TensorShape>,
}

#[derive(Clone, PartialEq, Message)]
struct TensorShape {
    #[prost(message, repeated, tag = "2")]
    dim: Vec<Dim>,
}

#[derive(Clone, PartialEq, Message)]
struct Dim {
    #[prost(int64, tag = "1")]
    size: i64,
}

/// `op:index` with its dtype and shape (-1: unknown size).
fn tensor_info(output: &Output, dtype: DataType, dims: &[i64]) -> Result<TensorInfo> {
    Ok(TensorInfo {
        name: format!("{}:{}", output.operation.name()?, output.index),
        dtype: match dtype {
            DataType::Float => 1,
            DataType::Int32 => 3,
            other => anyhow::bail!("no SavedModel signature of {other} tensors"),
        },
        tensor_shape: Some(TensorShape { dim: dims.iter().map(|&size| Dim { size }).collect() }),
    })
}

fn signature(inputs: Vec<(&str, TensorInfo)>, outputs: Vec<(&str, TensorInfo)>) -> SignatureDef {
    SignatureDef {
        inputs: inputs.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
        outputs: outputs.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
        method_name: "tensorflow/serving/predict".into(),
    }
}

/// Writes the run in `run` as a SavedModel at `out` (built in a temporary folder beside it, then
/// renamed into place).
pub fn export(run: &Path, out: &Path, session: &SessionArgs) -> Result<PathBuf> {
    ensure!(!out.exists(), "{} already exists: choose another --out (or delete it)", out.display());
    let dir = RunDir::open(run)?;
    let (config, runner) = train::load_run(&dir, GraphOptions::new(0), DeviceChoice::Cpu, session)?;
    let parent = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    let tmp = tempfile::Builder::new().prefix(".minigpt-export-").tempdir_in(parent).with_context(|| format!("writing into {}", parent.display()))?;
    write(&config, &runner, tmp.path())?;
    let tmp = tmp.keep();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&tmp, fs::Permissions::from_mode(0o755))?;
    }
    fs::rename(&tmp, out).with_context(|| format!("renaming {} to {}", tmp.display(), out.display()))?;
    Ok(out.to_path_buf())
}

fn write(config: &RunConfig, runner: &Runner, dir: &Path) -> Result<()> {
    let g = &runner.g;
    // Fetching `train_step/loss` runs the step; `save/filename` is the saver's save tensor.
    let scope: Scope = g.scope.new_sub_scope("export");
    let loss = ops::identity(g.loss.clone(), &mut scope.with_op_name("train_step/loss").with_control_dependencies(std::slice::from_ref(&g.train_op)))?;
    let saved = ops::identity(g.ckpt_prefix.clone(), &mut scope.with_op_name("save/filename").with_control_dependencies(std::slice::from_ref(&g.save)))?;

    let vocab = config.model.vocab_size as i64;
    let tokens = tensor_info(&g.tokens.clone().into(), DataType::Int32, &[-1, -1])?;
    let targets = tensor_info(&g.targets.clone().into(), DataType::Int32, &[-1, -1])?;
    let mut signatures = BTreeMap::new();
    signatures.insert(SERVING.to_string(), signature(vec![("tokens", tokens.clone())], vec![("logits", tensor_info(&g.logits, DataType::Float, &[-1, -1, vocab])?)]));
    signatures.insert(TRAIN_STEP.to_string(), signature(vec![("x", tokens), ("y", targets)], vec![("loss", tensor_info(&loss.into(), DataType::Float, &[])?)]));
    let meta = MetaGraphDef {
        meta_info_def: Some(MetaInfoDef { tags: vec![SERVE_TAG.into()], tensorflow_version: tensorflow::version().unwrap_or_default() }),
        graph_def: g.graph().graph_def()?,
        saver_def: Some(SaverDef {
            filename_tensor_name: format!("{}:0", g.ckpt_prefix.name()?),
            save_tensor_name: format!("{}:0", saved.name()?),
            restore_op_name: g.restore.name()?,
            max_to_keep: 1,
            version: 2,
        }),
        signature_def: signatures,
    };
    let model = SavedModel { saved_model_schema_version: 1, meta_graphs: vec![meta] };

    fs::create_dir_all(dir.join("variables"))?;
    fs::create_dir_all(dir.join("assets.extra"))?;
    runner.save(path_str(&dir.join("variables/variables"))?, [config.epochs_done as i64, 0])?;
    write_file(&dir.join("saved_model.pb"), &model.encode_to_vec())?;
    write_file(&dir.join("assets.extra/vocab.json"), (serde_json::to_string(&config.vocab)? + "\n").as_bytes())?;
    write_file(&dir.join("assets.extra/minigpt.json"), (serde_json::to_string_pretty(config)? + "\n").as_bytes())?;
    Ok(())
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    fs::write(path, bytes).with_context(|| format!("writing {}", path.display()))
}

/// Whether `dir` holds a SavedModel (rather than a run directory).
pub fn is_saved_model(dir: &Path) -> bool {
    dir.join("saved_model.pb").is_file()
}

/// A SavedModel's vocabulary: `--vocab FILE` if given (a JSON array of one-character strings, or
/// the corpus text the vocabulary was built from), else its `assets.extra/vocab.json`.
pub fn vocabulary(dir: &Path, vocab_file: Option<&Path>) -> Result<Vocab> {
    if let Some(file) = vocab_file {
        let text = fs::read_to_string(file).with_context(|| format!("reading vocabulary {}", file.display()))?;
        return match serde_json::from_str::<Vec<String>>(&text) {
            Ok(chars) => Vocab::from_strings(&chars).with_context(|| format!("vocabulary {}", file.display())),
            Err(_) => Ok(Vocab::from_text(&text)),
        };
    }
    let path = dir.join("assets.extra/vocab.json");
    ensure!(
        path.is_file(),
        "{} carries no vocabulary (no assets.extra/vocab.json): give --vocab FILE, a JSON array of its characters or the text it was trained on",
        dir.display()
    );
    let text = fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let chars: Vec<String> = serde_json::from_str(&text).with_context(|| format!("{} is not a JSON array of strings", path.display()))?;
    Vocab::from_strings(&chars).with_context(|| format!("{}", path.display()))
}

/// `assets.extra/minigpt.json`, if there is one and it is JSON.
fn minigpt_json(dir: &Path) -> Option<serde_json::Value> {
    serde_json::from_str(&fs::read_to_string(dir.join("assets.extra/minigpt.json")).ok()?).ok()
}

/// The model `assets.extra/minigpt.json` declares: `None` without one, an error if it does not
/// parse.
fn declared_model(dir: &Path) -> Result<Option<crate::model::ModelConfig>> {
    match minigpt_json(dir) {
        Some(json) if json.get("model").is_some() => Ok(Some(
            serde_json::from_value(json["model"].clone()).with_context(|| format!("{}: assets.extra/minigpt.json: its \"model\" is not a model configuration", dir.display()))?,
        )),
        _ => Ok(None),
    }
}

/// The context the model takes: a GPT's position table, else `train.block_size` from
/// `assets.extra/minigpt.json`, if it says.
fn block_size(dir: &Path) -> Option<usize> {
    let limit = declared_model(dir).ok().flatten().and_then(|m| m.context_limit());
    limit.or_else(|| minigpt_json(dir)?["train"]["block_size"].as_u64()).map(|b| b as usize)
}

/// `train.batch_size` from `assets.extra/minigpt.json`, if it says.
pub fn batch_size(dir: &Path) -> Option<usize> {
    minigpt_json(dir)?["train"]["batch_size"].as_u64().map(|b| b as usize)
}

/// Picks a signature's tensor: `preferred` keys first, else the only one; checks its dtype and rank.
fn pick<'a>(
    what: &str,
    tensors: &'a std::collections::HashMap<String, tensorflow::TensorInfo>,
    preferred: &[&str],
    dtype: DataType,
    rank: usize,
) -> Result<(&'a str, &'a tensorflow::TensorInfo)> {
    let found = preferred.iter().find_map(|k| tensors.get_key_value(*k)).or_else(|| (tensors.len() == 1).then(|| tensors.iter().next()).flatten());
    let mut keys: Vec<&str> = tensors.keys().map(String::as_str).collect();
    keys.sort();
    let Some((key, info)) = found else {
        anyhow::bail!("{SERVING}: expected {what} {} (or a single one), found {}", preferred.iter().map(|k| format!("`{k}`")).collect::<Vec<_>>().join(" or "), if keys.is_empty() { "none".into() } else { keys.join(", ") });
    };
    ensure!(info.dtype() == dtype, "{SERVING}: {what} `{key}` is {}, expected {dtype}", info.dtype());
    if let Some(dims) = info.shape().dims() {
        ensure!(dims == rank, "{SERVING}: {what} `{key}` has rank {dims}, expected {rank}");
    }
    Ok((key.as_str(), info))
}

fn output_of(graph: &tensorflow::Graph, info: &tensorflow::TensorInfo) -> Result<Output> {
    let name = info.name();
    let operation = graph.operation_by_name_required(&name.name).with_context(|| format!("the graph has no tensor {}:{}", name.name, name.index))?;
    Ok(Output { operation, index: name.index })
}

/// A SavedModel loaded for inference through its `serving_default` signature, with minigpt's
/// sampling and loss ops added to its graph.
pub struct Loaded {
    /// Owns the graph the SavedModel was loaded into.
    pub scope: Scope,
    pub session: tensorflow::Session,
    pub vocab: Vocab,
    /// The context the model was trained on, if its `minigpt.json` says.
    pub block_size: Option<usize>,
    tokens: Output,
    logits: Output,
    temperature: Output,
    next: Output,
    labels: Operation,
    loss: Output,
}

impl Loaded {
    /// Loads `dir` (tag `serve`). `seed` and `top_k` set the sampler, as for a run.
    pub fn load(dir: &Path, vocab_file: Option<&Path>, session: &SessionArgs, seed: i64, top_k: Option<u32>) -> Result<Self> {
        let vocab = vocabulary(dir, vocab_file)?;
        let mut scope = Scope::new_root_scope();
        let options = session.to_config().session_options()?;
        let bundle = tensorflow::SavedModelBundle::load(&options, [SERVE_TAG], &mut scope.graph_mut(), dir)
            .map_err(|e| anyhow::anyhow!("{}: not a SavedModel with the `{SERVE_TAG}` tag: {e}", dir.display()))?;
        let signature = bundle.meta_graph_def().get_signature(SERVING).map_err(|_| {
            let mut names: Vec<&str> = bundle.meta_graph_def().signatures().keys().map(String::as_str).filter(|k| !k.starts_with("__")).collect();
            names.sort();
            anyhow::anyhow!("{}: no `{SERVING}` signature (it has: {})", dir.display(), names.join(", "))
        })?;
        let (_, tokens) = pick("input", signature.inputs(), &["tokens"], DataType::Int32, 2).with_context(|| dir.display().to_string())?;
        let (key, logits) = pick("output", signature.outputs(), &["logits", "output_0"], DataType::Float, 3).with_context(|| dir.display().to_string())?;
        if let Some(v) = logits.shape().dims().and_then(|_| logits.shape()[2]) {
            ensure!(v as usize == vocab.len(), "{}: `{key}` has {v} classes but the vocabulary {} characters", dir.display(), vocab.len());
        }
        let (tokens, logits) = { let g = scope.graph(); (output_of(&g, tokens)?, output_of(&g, logits)?) };

        let s = &mut scope.new_sub_scope("minigpt");
        let one = ops::constant(1.0f32, s)?;
        let temperature = tfx::scalar_with_default("minigpt/temperature", one.into(), s)?;
        let cfg = crate::sample::SamplerConfig { top_k };
        let last = crate::sample::slice_last(logits.clone(), 3, s)?; // [B, V]
        let scaled = crate::sample::scale(last, temperature.clone(), &cfg, s)?;
        let next = crate::sample::multinomial(scaled, seed, Some("minigpt/next"), s)?;
        let labels = tfx::placeholder("minigpt/labels", DataType::Int32, &[-1, -1], s)?;
        let logits_2d = ops::reshape(logits.clone(), tfx::shape_const(&[-1, vocab.len() as i64], s)?, s)?;
        let flat = ops::reshape(labels.clone(), tfx::shape_const(&[-1], s)?, s)?;
        let xent = ops::sparse_softmax_cross_entropy_with_logits(logits_2d, flat, s)?;
        let loss = ops::mean(xent.output(0), tfx::shape_const(&[0], s)?, s)?.into();
        let loaded = Self { session: bundle.session, vocab, block_size: block_size(dir), scope, tokens, logits, temperature, next, labels, loss };
        // One token through the model: a SavedModel whose signature reads variables its restore
        // op does not write fails here, not halfway through a command.
        loaded.logits(&Tensor::new(&[1, 1])).map_err(|e| {
            anyhow::anyhow!(
                "{}: its `{SERVING}` signature does not run after loading ({}); a SavedModel written from Python with Keras 3 variables inside a tf.Module must also track their `.value` tf.Variables (see python_export/export_savedmodel.py)",
                dir.display(),
                format!("{e:#}").split_whitespace().collect::<Vec<_>>().join(" ")
            )
        })?;
        Ok(loaded)
    }

    /// tokens [B, T] → logits [B, T, V].
    pub fn logits(&self, tokens: &Tensor<i32>) -> Result<Tensor<f32>> {
        let mut args = SessionRunArgs::new();
        args.add_feed(&self.tokens.operation, self.tokens.index, tokens);
        let t = args.request_fetch(&self.logits.operation, self.logits.index);
        self.session.run(&mut args).context("running serving_default")?;
        Ok(args.fetch(t)?)
    }

    /// Mean cross-entropy of the model on a batch.
    pub fn loss(&self, x: &Tensor<i32>, y: &Tensor<i32>) -> Result<f32> {
        let mut args = SessionRunArgs::new();
        args.add_feed(&self.tokens.operation, self.tokens.index, x);
        args.add_feed(&self.labels, 0, y);
        let t = args.request_fetch(&self.loss.operation, self.loss.index);
        self.session.run(&mut args).context("computing the loss")?;
        Ok(args.fetch::<f32>(t)?[0])
    }

    /// The next id after `context`, drawn with the `Multinomial` op.
    pub fn next(&self, context: &[i32], temperature: &Tensor<f32>) -> Result<i32> {
        let context = Tensor::new(&[1, context.len() as u64]).with_values(context)?;
        let mut args = SessionRunArgs::new();
        args.add_feed(&self.tokens.operation, self.tokens.index, &context);
        args.add_feed(&self.temperature.operation, self.temperature.index, temperature);
        let t = args.request_fetch(&self.next.operation, self.next.index);
        self.session.run(&mut args).context("sampling")?;
        Ok(args.fetch::<i64>(t)?[0] as i32)
    }
}

/// The SavedModel's values for `vars`, from its `variables/` checkpoint. A variable is found by
/// its name: minigpt's own (`dense/kernel`, `gpt/h0/ln_1/gamma`), or the end of an object path as Python writes them
/// (`model/dense/_kernel/.ATTRIBUTES/VARIABLE_VALUE`); failing that, by its shape, when every
/// entry of that shape holds the same values (Keras' `model.export()` lists its variables by
/// number, some twice).
pub fn import_weights(dir: &Path, vars: &[crate::tfx::Var]) -> Result<Vec<Tensor<f32>>> {
    let reader = variables_reader(dir)?;
    let entries = reader.entries()?;
    let model_entries: Vec<&CheckpointEntry> = entries
        .iter()
        .filter(|e| e.dtype == DataType::Float && !e.key.starts_with("optimizer/") && !e.key.starts_with('_') && !e.key.ends_with("/m") && !e.key.ends_with("/v"))
        .collect();
    let mut out = Vec::with_capacity(vars.len());
    for var in vars {
        let shape: Vec<i64> = var.shape.iter().map(|&d| d as i64).collect();
        let exact: Vec<&CheckpointEntry> = model_entries.iter().copied().filter(|e| e.key == var.name).collect();
        let by_name = if exact.is_empty() { model_entries.iter().copied().filter(|e| names_match(&e.key, &var.name)).collect() } else { exact };
        let candidates = if by_name.is_empty() { model_entries.iter().copied().filter(|e| e.shape == shape).collect() } else { by_name };
        ensure!(!candidates.is_empty(), "{}: no variable for {} {:?} (it holds: {})", dir.display(), var.name, shape, describe(&model_entries));
        let values: Vec<Tensor<f32>> = candidates.iter().map(|e| reader.tensor_f32(&e.key)).collect::<Result<_, _>>()?;
        ensure!(
            values.windows(2).all(|w| w[0][..] == w[1][..]),
            "{}: which variable is {} is ambiguous ({})",
            dir.display(),
            var.name,
            describe(&candidates)
        );
        ensure!(candidates[0].shape == shape, "{}: {} is {:?} there, {:?} in this model", dir.display(), var.name, candidates[0].shape, shape);
        out.push(values.into_iter().next().unwrap());
    }
    Ok(out)
}

/// The reader of a SavedModel's `variables/` checkpoint.
pub fn variables_reader(dir: &Path) -> Result<CheckpointReader> {
    let prefix = dir.join("variables/variables");
    CheckpointReader::open(path_str(&prefix)?).with_context(|| format!("{}: cannot read the variables", dir.display()))
}

fn describe(entries: &[&CheckpointEntry]) -> String {
    entries.iter().map(|e| format!("{} {:?}", e.key, e.shape)).collect::<Vec<_>>().join(", ")
}

/// `dense/kernel` matches itself and `…/dense/_kernel/.ATTRIBUTES/VARIABLE_VALUE`.
fn names_match(key: &str, name: &str) -> bool {
    let path = key.strip_suffix("/.ATTRIBUTES/VARIABLE_VALUE").unwrap_or(key);
    let parts: Vec<&str> = path.rsplit('/').take(2).map(|p| p.trim_start_matches('_')).collect();
    let want: Vec<&str> = name.rsplit('/').take(2).collect();
    key == name || parts == want
}

/// The model configuration of a SavedModel: the one its `minigpt.json` declares, else the
/// notebook's model with the width of the embedding table among its weights.
pub fn model_config(dir: &Path, vocab_size: u64) -> Result<crate::model::ModelConfig> {
    if let Some(model) = declared_model(dir)? {
        ensure!(
            model.vocab_size == vocab_size,
            "{}: its minigpt.json declares a vocabulary of {}, its vocabulary has {vocab_size}",
            dir.display(),
            model.vocab_size
        );
        model.validate().with_context(|| format!("{}: the model its minigpt.json declares", dir.display()))?;
        return Ok(model);
    }
    let probe = crate::model::ModelConfig::bigram(vocab_size, 1);
    let entries = variables_reader(dir)?.entries()?;
    let embedding = entries
        .iter()
        .filter(|e| e.dtype == DataType::Float && e.shape.len() == 2 && e.shape[0] == vocab_size as i64 && !e.key.starts_with("optimizer/"))
        .find(|e| names_match(&e.key, "embedding/embeddings"))
        .or_else(|| entries.iter().find(|e| e.dtype == DataType::Float && e.shape.len() == 2 && e.shape[0] == vocab_size as i64 && !e.key.starts_with("optimizer/")))
        .with_context(|| format!("{}: no [{vocab_size}, width] embedding table among its variables", dir.display()))?;
    Ok(crate::model::ModelConfig { n_embd: embedding.shape[1] as u64, ..probe })
}
