//! SavedModels both ways (DESIGN.md §4), and the one way `generate` and `eval` open a model.
//!
//! Export: a TF1-style SavedModel, which TensorFlow 2 loads through its v1 loader:
//! `saved_model.pb` (one MetaGraph tagged `serve` holding the training graph, a `SaverDef` naming
//! the checkpoint ops, and the signatures), `variables/variables.{index,data-00000-of-00001}` (a V2
//! checkpoint of every variable), and `assets.extra/vocab.json` and `assets.extra/minigpt.json`.
//! The crate's own `SavedModelBuilder` leaves out what Python's loader needs (the saver's tensor
//! names with `:0`, the save tensor), so the protos are written here with the generated types.
//!
//! Import: any SavedModel with a `serving_default` signature int32 [B, T] → float32 [B, T, V],
//! through TensorFlow's C++ loader; its weights for `train --init-from`.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use prost::Message;
use serde::Deserialize;
use tensorflow::{DataType, Operation, Output, Scope, Session, SessionRunArgs, Tensor};

use crate::data::{self, Vocab, NOTEBOOK_BATCH_SIZE, NOTEBOOK_BLOCK_SIZE};
use crate::device::{DeviceChoice, SessionConfig};
use crate::files::path_str;
use crate::graph::Runner;
use crate::loss;
use crate::model::ModelConfig;
use crate::object_graph::ServingVariable;
use crate::proto;
use crate::run::{DataInfo, Load, RunConfig, RunDir};
use crate::sampler::{Cache, NextLogits, SamplerConfig};
use crate::text::{self, one_line};
use crate::tfx::{self, AnyTensor, CheckpointEntry, CheckpointReader, Var};

/// The signature Python's `model.signatures["serving_default"]` finds: `tokens` → `logits`.
pub const SERVING: &str = "serving_default";
/// One Adam step: `x`, `y` → `loss` (before the step).
pub const TRAIN_STEP: &str = "train_step";
pub const SERVE_TAG: &str = "serve";
const MINIGPT_JSON: &str = "assets.extra/minigpt.json";
const VOCAB_JSON: &str = "assets.extra/vocab.json";

/// `op:index` with its dtype and shape (-1: unknown size).
fn tensor_info(name: &str, dtype: proto::DataType, dims: &[i64]) -> proto::TensorInfo {
    proto::TensorInfo {
        dtype: dtype as i32,
        tensor_shape: Some(proto::TensorShapeProto {
            dim: dims.iter().map(|&size| proto::tensor_shape_proto::Dim { size, ..Default::default() }).collect(),
            ..Default::default()
        }),
        encoding: Some(proto::tensor_info::Encoding::Name(name.to_string())),
    }
}

fn signature(inputs: Vec<(&str, proto::TensorInfo)>, outputs: Vec<(&str, proto::TensorInfo)>) -> proto::SignatureDef {
    proto::SignatureDef {
        inputs: inputs.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
        outputs: outputs.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
        method_name: "tensorflow/serving/predict".into(),
        ..Default::default()
    }
}

/// Writes the run in `run` as a SavedModel at `out` (built in a temporary folder beside it, then
/// renamed into place).
pub fn export(run: &Path, out: &Path, session: SessionConfig) -> Result<PathBuf> {
    ensure!(!out.exists(), "{} already exists: choose another --out (or delete it)", out.display());
    let dir = RunDir::open(run)?;
    let (config, runner) =
        dir.load(Load::Training { summaries: false }, SessionConfig { device: DeviceChoice::Cpu, ..session })?;
    let parent = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    remove_stale_exports(parent);
    let tmp = tempfile::Builder::new()
        .prefix(&format!("{EXPORT_PREFIX}{}-", std::process::id()))
        .tempdir_in(parent)
        .with_context(|| format!("writing into {}", parent.display()))?;
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

/// Exports are built in `<parent>/.minigpt-export-<pid>-*` and renamed into place.
const EXPORT_PREFIX: &str = ".minigpt-export-";

/// Removes the temporary folders of exports whose process is gone (killed mid-export).
fn remove_stale_exports(parent: &Path) {
    let Ok(entries) = fs::read_dir(parent) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let pid = name.strip_prefix(EXPORT_PREFIX).and_then(|rest| rest.split('-').next()?.parse::<i32>().ok());
        // SAFETY: kill with signal 0 only asks whether the process exists.
        if pid.is_some_and(|pid| unsafe { libc::kill(pid, 0) } != 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH)) {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

fn write(config: &RunConfig, runner: &Runner, dir: &Path) -> Result<()> {
    let t = runner.serving_tensors()?;
    let vocab = config.model.vocab_size as i64;
    let (int32, float) = (proto::DataType::DtInt32, proto::DataType::DtFloat);
    let tokens = tensor_info(&t.tokens, int32, &[-1, -1]);
    let mut signatures = BTreeMap::new();
    signatures.insert(
        SERVING.to_string(),
        signature(vec![("tokens", tokens.clone())], vec![("logits", tensor_info(&t.logits, float, &[-1, -1, vocab]))]),
    );
    let step = signature(
        vec![("x", tokens), ("y", tensor_info(&t.targets, int32, &[-1, -1]))],
        vec![("loss", tensor_info(&t.loss_after_step, float, &[]))],
    );
    signatures.insert(TRAIN_STEP.to_string(), step);
    let meta = proto::MetaGraphDef {
        meta_info_def: Some(proto::meta_graph_def::MetaInfoDef {
            tags: vec![SERVE_TAG.into()],
            tensorflow_version: tensorflow::version().unwrap_or_default(),
            ..Default::default()
        }),
        graph_def: Some(proto::GraphDef::decode(&runner.graph_def()?[..]).context("decoding the graph")?),
        saver_def: Some(proto::SaverDef {
            filename_tensor_name: t.filename,
            save_tensor_name: t.save,
            restore_op_name: t.restore,
            max_to_keep: 1,
            version: proto::saver_def::CheckpointFormatVersion::V2 as i32,
            ..Default::default()
        }),
        signature_def: signatures,
        ..Default::default()
    };
    let model = proto::SavedModel { saved_model_schema_version: 1, meta_graphs: vec![meta] };

    fs::create_dir_all(dir.join("variables"))?;
    fs::create_dir_all(dir.join("assets.extra"))?;
    runner.save(path_str(&dir.join("variables/variables"))?, [config.epochs_done as i64, 0])?;
    write_file(&dir.join("saved_model.pb"), &model.encode_to_vec())?;
    write_file(&dir.join(VOCAB_JSON), (serde_json::to_string(&config.vocab)? + "\n").as_bytes())?;
    write_file(&dir.join(MINIGPT_JSON), (serde_json::to_string_pretty(config)? + "\n").as_bytes())?;
    Ok(())
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    fs::write(path, bytes).with_context(|| format!("writing {}", path.display()))
}

/// Whether `dir` holds a SavedModel (rather than a run directory).
pub fn is_saved_model(dir: &Path) -> bool {
    dir.join("saved_model.pb").is_file()
}

/// Whether `dir` has a vocabulary file of its own (usable or not).
pub fn carries_vocabulary(dir: &Path) -> bool {
    dir.join(VOCAB_JSON).exists()
}

/// A SavedModel's vocabulary: `--vocab FILE` if given (a JSON array of one-character strings, or
/// the corpus text the vocabulary was built from), else its `assets.extra/vocab.json`.
pub fn vocabulary(dir: &Path, vocab_file: Option<&Path>) -> Result<Vocab> {
    if let Some(file) = vocab_file {
        let text = crate::files::read_text(file, "vocabulary", crate::data::MAX_CORPUS_BYTES)?;
        return match serde_json::from_str::<Vec<String>>(&text) {
            Ok(chars) => Vocab::from_strings(&chars).with_context(|| format!("vocabulary {}", file.display())),
            // A file that opens a JSON array is meant as one: broken, not a text.
            Err(e) if text.trim_start().starts_with('[') => {
                bail!("vocabulary {} is not a JSON array of one-character strings: {e}", file.display())
            }
            Err(_) => Ok(Vocab::from_text(&text)),
        };
    }
    let path = dir.join(VOCAB_JSON);
    ensure!(
        path.exists(),
        "{} carries no vocabulary (no {VOCAB_JSON}): give --vocab FILE, a JSON array of its characters or \
         the text it was trained on",
        dir.display()
    );
    let text = crate::files::read_text(&path, "vocabulary", crate::files::MAX_SMALL_FILE)?;
    let chars: Vec<String> =
        serde_json::from_str(&text).with_context(|| format!("{} is not a JSON array of strings", path.display()))?;
    Vocab::from_strings(&chars).with_context(|| format!("{}", path.display()))
}

/// `assets.extra/minigpt.json`. minigpt writes a run's whole [`RunConfig`] there; other exporters
/// may write part of it (`python_export/export_savedmodel.py` writes `model`, `train.block_size`,
/// `train.batch_size` and `steps_done`), so every field is optional and what is present is used.
#[derive(Debug, Default, Deserialize)]
pub struct Declared {
    pub model: Option<ModelConfig>,
    #[serde(default)]
    pub train: DeclaredTraining,
    pub steps_done: Option<u64>,
    pub data: Option<DataInfo>,
}

/// The part of `train` a SavedModel's user needs.
#[derive(Debug, Default, Deserialize)]
pub struct DeclaredTraining {
    pub block_size: Option<usize>,
    pub batch_size: Option<usize>,
}

impl Declared {
    /// The file of `dir`, if it has one; an error if it does not parse.
    pub fn read(dir: &Path) -> Result<Option<Self>> {
        let path = dir.join(MINIGPT_JSON);
        if !path.is_file() {
            return Ok(None);
        }
        let text = crate::files::read_text(&path, "model description", crate::files::MAX_SMALL_FILE)?;
        let declared: Self = match serde_json::from_str(&text) {
            Ok(declared) => declared,
            Err(e) => {
                // Not what minigpt writes: the SavedModel is read as one without it.
                let e = one_line(&e.to_string());
                eprintln!("warning: {} is not in a form minigpt reads ({e}): ignored", path.display());
                return Ok(None);
            }
        };
        if let Some(model) = &declared.model {
            model.validate().with_context(|| format!("{}: its model", path.display()))?;
        }
        // Its training window and batch, the context and batch `eval` uses: checked as the
        // command line checks them.
        for (field, value) in [("block_size", declared.train.block_size), ("batch_size", declared.train.batch_size)] {
            ensure!(
                value.is_none_or(|n| (1..=crate::model::MAX_SIZE as usize).contains(&n)),
                "{}: its train.{field} must be from 1 to {}, not {}",
                path.display(),
                crate::model::MAX_SIZE,
                value.unwrap_or(0)
            );
        }
        if let (Some(limit), Some(window)) =
            (declared.model.as_ref().and_then(|m| m.context_limit()), declared.train.block_size)
        {
            ensure!(
                window as u64 <= limit,
                "{}: its train.block_size {window} exceeds its model's {limit} positions",
                path.display()
            );
        }
        Ok(Some(declared))
    }

    /// The context the model takes: a GPT's position table, else the training window.
    pub fn context(&self) -> Option<usize> {
        let limit = self.model.as_ref().and_then(|m| m.context_limit()).map(|b| b as usize);
        limit.or(self.train.block_size)
    }
}

/// Loads `dir` (tag `serve`) and restores what TensorFlow's C++ loader leaves uninitialized;
/// returns how many variables that took (`minigpt info`).
pub fn object_graph_restores(dir: &Path) -> Result<usize> {
    let mut scope = Scope::new_root_scope();
    let bundle = load_bundle(dir, SessionConfig::default(), &mut scope)?;
    crate::object_graph::restore_uninitialized(dir, SERVE_TAG, &mut scope, &bundle.session)
}

/// TensorFlow's C++ loader on `dir` (tag `serve`), into `scope`'s graph.
fn load_bundle(dir: &Path, session: SessionConfig, scope: &mut Scope) -> Result<tensorflow::SavedModelBundle> {
    let variables = dir.join("variables");
    if variables.is_dir() {
        let index = variables.join("variables.index");
        ensure!(index.is_file(), "{}: its variables index {} is missing", dir.display(), index.display());
    }
    // TensorFlow's loader runs the init op; it cannot be told not to. Say so before it does.
    let init = crate::object_graph::init_ops(dir, SERVE_TAG).unwrap_or_default();
    if !init.is_empty() {
        eprintln!(
            "warning: {}: loading it runs its init op {}, as TensorFlow's loader does: a SavedModel is a program; load \
             only ones you trust",
            dir.display(),
            init.join(", ")
        );
    }
    let options = session.session_options()?;
    tensorflow::SavedModelBundle::load(&options, [SERVE_TAG], &mut scope.graph_mut(), dir).map_err(|e| {
        let damaged =
            matches!(e.code(), tensorflow::Code::DataLoss | tensorflow::Code::NotFound | tensorflow::Code::OutOfRange);
        let e = one_line(&e.to_string());
        match damaged.then(|| variable_files(&variables)).filter(|f| !f.is_empty()) {
            Some(files) => anyhow::anyhow!(
                "{}: its variables are damaged or truncated ({files}): TensorFlow's loader says: {e}",
                dir.display()
            ),
            None => {
                anyhow::anyhow!("{}: TensorFlow's SavedModel loader (tag `{SERVE_TAG}`) failed: {e}", dir.display())
            }
        }
    })
}

/// The files of a SavedModel's `variables/` folder with their sizes, for an error message.
fn variable_files(variables: &Path) -> String {
    let Ok(entries) = fs::read_dir(variables) else { return String::new() };
    let mut files: Vec<String> = entries
        .flatten()
        .filter_map(|e| Some(format!("{} of {} bytes", e.path().display(), e.metadata().ok()?.len())))
        .collect();
    files.sort();
    files.join(", ")
}

/// Picks a signature's tensor: `preferred` keys first, else the only one; checks its dtype and rank.
fn pick<'a>(
    what: &str,
    tensors: &'a std::collections::HashMap<String, tensorflow::TensorInfo>,
    preferred: &[&str],
    dtype: DataType,
    rank: usize,
) -> Result<(&'a str, &'a tensorflow::TensorInfo)> {
    let found = preferred
        .iter()
        .find_map(|k| tensors.get_key_value(*k))
        .or_else(|| (tensors.len() == 1).then(|| tensors.iter().next()).flatten());
    let mut keys: Vec<&str> = tensors.keys().map(String::as_str).collect();
    keys.sort();
    let Some((key, info)) = found else {
        let wanted = preferred.iter().map(|k| format!("`{k}`")).collect::<Vec<_>>().join(" or ");
        bail!(
            "{SERVING}: expected {what} {wanted} (or a single one), found {}",
            if keys.is_empty() { "none".into() } else { keys.join(", ") }
        );
    };
    ensure!(info.dtype() == dtype, "{SERVING}: {what} `{key}` is {}, expected {dtype}", info.dtype());
    if let Some(dims) = info.shape().dims() {
        ensure!(dims == rank, "{SERVING}: {what} `{key}` has rank {dims}, expected {rank}");
    }
    Ok((key.as_str(), info))
}

fn output_of(graph: &tensorflow::Graph, info: &tensorflow::TensorInfo) -> Result<Output> {
    let name = info.name();
    let operation = graph
        .operation_by_name_required(&name.name)
        .with_context(|| format!("the graph has no tensor {}:{}", name.name, name.index))?;
    Ok(Output { operation, index: name.index })
}

/// A tensor of a signature: its tensor in the graph (`op:index`), type, and shape (`None`: unknown
/// rank; -1: a size not known).
#[derive(Debug, Clone, PartialEq)]
pub struct TensorSpec {
    pub name: String,
    pub dtype: DataType,
    pub dims: Option<Vec<i64>>,
}

impl TensorSpec {
    fn of(info: &tensorflow::TensorInfo) -> Self {
        let shape = info.shape();
        let dims = shape.dims().map(|n| (0..n).map(|i| shape[i].unwrap_or(-1)).collect());
        Self { name: format!("{}:{}", info.name().name, info.name().index), dtype: info.dtype(), dims }
    }
}

/// A signature as TensorFlow Serving describes and runs it: named inputs and outputs.
#[derive(Debug, Clone, PartialEq)]
pub struct Signature {
    pub method_name: String,
    pub inputs: BTreeMap<String, TensorSpec>,
    pub outputs: BTreeMap<String, TensorSpec>,
}

/// The signature a run directory serves, as `export` writes it: `tokens` int32 [B, T] → `logits`
/// float32 [B, T, V].
fn serving_signature(tokens: String, logits: String, vocab: i64) -> Signature {
    let spec = |name, dtype, dims: &[i64]| TensorSpec { name, dtype, dims: Some(dims.to_vec()) };
    Signature {
        method_name: "tensorflow/serving/predict".into(),
        inputs: [("tokens".to_string(), spec(tokens, DataType::Int32, &[-1, -1]))].into(),
        outputs: [("logits".to_string(), spec(logits, DataType::Float, &[-1, -1, vocab]))].into(),
    }
}

/// A SavedModel loaded for inference through its `serving_default` signature, with minigpt's
/// loss added to its graph.
pub struct Loaded {
    /// Owns the graph the SavedModel was loaded into.
    _scope: Scope,
    session: Session,
    pub vocab: Vocab,
    /// Its `assets.extra/minigpt.json`, if any.
    pub declared: Option<Declared>,
    /// Variables the C++ loader left uninitialized, restored through the object graph.
    pub restored_through_object_graph: usize,
    tokens: Output,
    logits: Output,
    labels: Operation,
    loss: Output,
    /// Every signature of its MetaGraph (TensorFlow's own `__…` ones aside).
    pub signatures: BTreeMap<String, Signature>,
}

impl Loaded {
    /// Loads `dir` (tag `serve`).
    pub fn load(dir: &Path, vocab_file: Option<&Path>, session: SessionConfig) -> Result<Self> {
        let vocab = vocabulary(dir, vocab_file)?;
        let declared = Declared::read(dir)?;
        let mut scope = Scope::new_root_scope();
        let bundle = load_bundle(dir, session, &mut scope)?;
        let signature = bundle.meta_graph_def().get_signature(SERVING).map_err(|_| {
            let mut names: Vec<&str> = bundle
                .meta_graph_def()
                .signatures()
                .keys()
                .map(String::as_str)
                .filter(|k| !k.starts_with("__"))
                .collect();
            names.sort();
            anyhow::anyhow!("{}: no `{SERVING}` signature (it has: {})", dir.display(), names.join(", "))
        })?;
        let (_, tokens) = pick("input", signature.inputs(), &["tokens"], DataType::Int32, 2)
            .with_context(|| dir.display().to_string())?;
        let (key, logits) = pick("output", signature.outputs(), &["logits", "output_0"], DataType::Float, 3)
            .with_context(|| dir.display().to_string())?;
        if let Some(v) = logits.shape().dims().and_then(|_| logits.shape()[2]) {
            ensure!(
                v as usize == vocab.len(),
                "{}: `{key}` has {v} classes but the vocabulary {} characters",
                dir.display(),
                vocab.len()
            );
        }
        let (tokens, logits) = {
            let g = scope.graph();
            (output_of(&g, tokens)?, output_of(&g, logits)?)
        };
        let specs = |m: &std::collections::HashMap<String, tensorflow::TensorInfo>| {
            m.iter().map(|(k, v)| (k.clone(), TensorSpec::of(v))).collect()
        };
        let signatures = bundle
            .meta_graph_def()
            .signatures()
            .iter()
            .filter(|(name, _)| !name.starts_with("__"))
            .map(|(name, s)| {
                let method_name = s.method_name().to_string();
                (name.clone(), Signature { method_name, inputs: specs(s.inputs()), outputs: specs(s.outputs()) })
            })
            .collect();
        let restored = crate::object_graph::restore_uninitialized(dir, SERVE_TAG, &mut scope, &bundle.session)?;
        let s = &mut scope.new_sub_scope("minigpt");
        let labels = tfx::placeholder("minigpt/labels", DataType::Int32, &[-1, -1], s)?;
        let loss = loss::cross_entropy(logits.clone(), labels.clone().into(), vocab.len() as i64, s)?.loss;
        let loaded = Self {
            session: bundle.session,
            vocab,
            declared,
            _scope: scope,
            restored_through_object_graph: restored,
            tokens,
            logits,
            labels,
            loss,
            signatures,
        };
        // One token through the model: a SavedModel whose signature reads variables its restore
        // op does not write fails here, not halfway through a command.
        loaded.logits(&Tensor::new(&[1, 1])).map_err(|e| {
            anyhow::anyhow!(
                "{}: its `{SERVING}` signature does not run after loading ({}): a variable it reads is neither \
                 restored by its saver nor found through its object graph",
                dir.display(),
                one_line(&format!("{e:#}"))
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

    /// Runs `signature` on `inputs` (every input of it, by key): its outputs by key.
    pub fn predict(&self, signature: &str, inputs: &[(String, AnyTensor)]) -> Result<Vec<(String, AnyTensor)>> {
        let sig = self.signatures.get(signature).with_context(|| format!("no signature `{signature}`"))?;
        let graph = self._scope.graph();
        let tensor = |spec: &TensorSpec| -> Result<Output> {
            let (op, index) = spec.name.rsplit_once(':').unwrap_or((&spec.name, "0"));
            let operation = graph
                .operation_by_name_required(op)
                .with_context(|| format!("the graph has no tensor {}", spec.name))?;
            Ok(Output { operation, index: index.parse().unwrap_or(0) })
        };
        let mut args = SessionRunArgs::new();
        let fed: Vec<Output> = inputs
            .iter()
            .map(|(key, _)| tensor(sig.inputs.get(key).with_context(|| format!("`{signature}` has no input `{key}`"))?))
            .collect::<Result<_>>()?;
        for ((_, value), output) in inputs.iter().zip(&fed) {
            value.feed(&mut args, output);
        }
        let fetches: Vec<(&String, DataType, tensorflow::FetchToken)> = sig
            .outputs
            .iter()
            .map(|(key, spec)| {
                let out = tensor(spec)?;
                Ok((key, spec.dtype, args.request_fetch(&out.operation, out.index)))
            })
            .collect::<Result<_>>()?;
        self.session.run(&mut args).with_context(|| format!("running `{signature}`"))?;
        fetches
            .into_iter()
            .map(|(key, dtype, token)| {
                let value = AnyTensor::fetch(&mut args, token, dtype)
                    .with_context(|| format!("output `{key}` is {dtype}, which this server does not return"))??;
                Ok((key.clone(), value))
            })
            .collect()
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
}

impl NextLogits for Loaded {
    /// A pass over the whole window (a SavedModel's signature keeps no cache).
    fn next_logits(&self, window: &[i32], _cache: &mut Cache) -> Result<Vec<f32>> {
        ensure!(!window.is_empty(), "the prompt is empty: give at least one character");
        let tokens = Tensor::new(&[1, window.len() as u64]).with_values(window)?;
        let logits = self.logits(&tokens)?; // [1, L, V]
        let v = self.vocab.len();
        ensure!(
            logits.len() == window.len() * v,
            "`{SERVING}` returned {} values for {} positions of {v} classes",
            logits.len(),
            window.len()
        );
        Ok(logits[logits.len() - v..].to_vec())
    }

    fn context_size(&self) -> Option<usize> {
        self.declared.as_ref().and_then(Declared::context)
    }
}

/// How `generate` and `eval` open a run directory or a SavedModel.
#[derive(Debug, Clone, Default)]
pub struct OpenOptions {
    /// The vocabulary of a SavedModel that carries none.
    pub vocab: Option<PathBuf>,
    pub session: SessionConfig,
    /// For a run directory: build the bigram's in-graph sampling loop for this sampler.
    pub sampler: Option<SamplerConfig>,
}

/// A model to sample from or evaluate: a run directory's newest checkpoint, or a SavedModel.
#[allow(clippy::large_enum_variant)] // one value per command
pub enum Source {
    Run { config: RunConfig, runner: Runner },
    Saved(Loaded),
}

impl Source {
    pub fn open(path: &Path, opts: &OpenOptions) -> Result<Self> {
        if is_saved_model(path) {
            if let Some(precision) = opts.session.precision {
                bail!(
                    "--precision {precision} applies to run directories: {} is a SavedModel, which computes as it was exported",
                    path.display()
                );
            }
            return Ok(Self::Saved(Loaded::load(path, opts.vocab.as_deref(), opts.session)?));
        }
        ensure!(opts.vocab.is_none(), "--vocab is for SavedModels; a run directory has its vocabulary in config.json");
        let (config, runner) = RunDir::open(path)?.load(Load::Inference { sampler: opts.sampler }, opts.session)?;
        Ok(Self::Run { config, runner })
    }

    pub fn vocab(&self) -> Result<Vocab> {
        match self {
            Self::Run { config, .. } => config.vocab(),
            Self::Saved(loaded) => Ok(loaded.vocab.clone()),
        }
    }

    pub fn next_logits(&self) -> &dyn NextLogits {
        match self {
            Self::Run { runner, .. } => runner,
            Self::Saved(loaded) => loaded,
        }
    }

    /// The signatures it serves by name: a SavedModel's own, a run's `serving_default` as `export`
    /// would write it.
    pub fn signatures(&self) -> Result<BTreeMap<String, Signature>> {
        Ok(match self {
            Self::Run { config, runner } => {
                let (tokens, logits) = runner.serving_names()?;
                [(SERVING.to_string(), serving_signature(tokens, logits, config.model.vocab_size as i64))].into()
            }
            Self::Saved(loaded) => loaded.signatures.clone(),
        })
    }

    /// Runs `signature` on `inputs` (every input of it, by key): its outputs by key.
    pub fn predict(&self, signature: &str, inputs: &[(String, AnyTensor)]) -> Result<Vec<(String, AnyTensor)>> {
        match self {
            Self::Run { runner, .. } => {
                ensure!(signature == SERVING, "no signature `{signature}`");
                let [(key, AnyTensor::I32(tokens))] = inputs else {
                    bail!("`{SERVING}` takes one input, `tokens`, int32 [B, T]");
                };
                ensure!(key == "tokens", "`{SERVING}` has no input `{key}`");
                Ok(vec![("logits".to_string(), AnyTensor::F32(runner.logits(tokens)?))])
            }
            Self::Saved(loaded) => loaded.predict(signature, inputs),
        }
    }

    /// tokens [B, T] → logits [B, T, V].
    pub fn logits(&self, tokens: &Tensor<i32>) -> Result<Tensor<f32>> {
        match self {
            Self::Run { runner, .. } => runner.logits(tokens),
            Self::Saved(loaded) => loaded.logits(tokens),
        }
    }

    /// Mean cross-entropy of the model on a batch.
    pub fn loss(&self, x: &Tensor<i32>, y: &Tensor<i32>) -> Result<f32> {
        match self {
            Self::Run { runner, .. } => runner.loss(x, y),
            Self::Saved(loaded) => loaded.loss(x, y),
        }
    }

    /// The window evaluation uses: the run's (or the SavedModel's declared) training window,
    /// else the notebook's.
    pub fn block_size(&self) -> usize {
        match self {
            Self::Run { config, .. } => config.train.block_size,
            Self::Saved(loaded) => loaded.declared.as_ref().and_then(Declared::context).unwrap_or(NOTEBOOK_BLOCK_SIZE),
        }
    }

    /// The batch size the model was trained with, if known, else the notebook's.
    pub fn batch_size(&self) -> usize {
        match self {
            Self::Run { config, .. } => config.train.batch_size,
            Self::Saved(loaded) => {
                loaded.declared.as_ref().and_then(|d| d.train.batch_size).unwrap_or(NOTEBOOK_BATCH_SIZE)
            }
        }
    }

    /// The corpus to evaluate on by default: the run's own, else `--data`'s default.
    pub fn data_source(&self) -> String {
        match self {
            Self::Run { config, .. } => config.data.source.clone(),
            Self::Saved(_) => data::default_source(),
        }
    }
}

/// The SavedModel's values for `vars`, from its `variables/` checkpoint. A variable is found by
/// its name: minigpt's own (`dense/kernel`, `gpt/h0/ln_1/gamma`), or the end of an object path as
/// Python writes them (`model/dense/_kernel/.ATTRIBUTES/VARIABLE_VALUE`); failing that, by its
/// shape, when every entry of that shape holds the same values (Keras' `model.export()` lists its
/// variables by number, some twice). Where names cannot tell (a Keras 3 model in a `tf.Module`,
/// whose blocks' variables are reachable only through its optimizer), the variables are taken in
/// the order the serving signature reads them ([`from_serving_order`]).
pub fn import_weights(dir: &Path, vars: &[Var]) -> Result<Vec<Tensor<f32>>> {
    match import_by_name(dir, vars) {
        Ok(values) => Ok(values),
        Err(by_name) => match from_serving_order(dir, vars) {
            Ok(Some(values)) => Ok(values),
            Ok(None) => Err(by_name),
            Err(e) => bail!(
                "{}; nor in the order its signature reads them: {}",
                text::error_line(&by_name),
                text::error_line(&e)
            ),
        },
    }
}

/// The model's variables as the serving signature reads them: the forward pass of a model built
/// like minigpt's reads its weights in minigpt's variable order, and each variable's name ends
/// like minigpt's (`embeddings`, `gamma`, `beta`, `kernel`, `bias`). Where a minigpt variable
/// holds several of them (Keras' query, key and value kernels [C, H, D] in one [C, 3C]), they are
/// flattened to [C, ·] (or [·] for a bias) and set side by side, as `python_export/gpt.py`'s
/// `to_minigpt` does; a single one of another shape (the output projection [H, D, C]) is read
/// row-major into minigpt's. `None` without an object graph.
fn from_serving_order(dir: &Path, vars: &[Var]) -> Result<Option<Vec<Tensor<f32>>>> {
    let read = crate::object_graph::signature_variables(dir, SERVE_TAG, SERVING)?;
    if read.is_empty() {
        return Ok(None);
    }
    let reader = variables_reader(dir)?;
    // Read but not yet used: Keras reads each query, key and value kernel with its bias, minigpt
    // keeps the three kernels in one variable and the three biases in the next.
    let mut pending: Vec<&ServingVariable> = read.iter().collect();
    let mut out = Vec::with_capacity(vars.len());
    for var in vars {
        let want: u64 = var.shape.iter().product();
        let kind = var.name.rsplit('/').next().unwrap_or_default();
        let (mut parts, mut got) = (Vec::new(), 0u64);
        while got < want {
            let near = pending.iter().take(8).position(|p| p.name.rsplit('/').next() == Some(kind));
            let Some(i) = near else {
                let next = pending.first().map_or("nothing".to_string(), |p| format!("{} {:?}", p.name, p.shape));
                bail!("{}: {} would come next, but its signature reads {next}", dir.display(), var.name);
            };
            let part = pending.remove(i);
            got += part.shape.iter().product::<i64>() as u64;
            parts.push(part);
        }
        ensure!(
            got == want,
            "{}: {} {:?} does not fit the weights read for it ({got} values)",
            dir.display(),
            var.name,
            var.shape
        );
        let values: Vec<Tensor<f32>> = parts.iter().map(|p| reader.tensor_f32(&p.key)).collect::<Result<_, _>>()?;
        let rows = if var.shape.len() == 2 && parts.len() > 1 { var.shape[0] as usize } else { 1 };
        let mut merged = Tensor::<f32>::new(&var.shape);
        let width: usize = want as usize / rows;
        let mut column = 0;
        for v in &values {
            let w = v.len() / rows;
            for r in 0..rows {
                merged[r * width + column..r * width + column + w].copy_from_slice(&v[r * w..(r + 1) * w]);
            }
            column += w;
        }
        out.push(merged);
    }
    ensure!(pending.is_empty(), "{}: its signature reads more weights than this model has", dir.display());
    Ok(Some(out))
}

fn import_by_name(dir: &Path, vars: &[Var]) -> Result<Vec<Tensor<f32>>> {
    let reader = variables_reader(dir)?;
    let entries = reader.entries()?;
    let model_entries: Vec<&CheckpointEntry> = entries.iter().filter(|e| is_weight(e)).collect();
    let mut out = Vec::with_capacity(vars.len());
    // Entries found by name, and for which variable: one entry named for two variables (a model
    // of more blocks than the SavedModel has) is not a match.
    let mut named: Vec<(&str, &str)> = Vec::new();
    for var in vars {
        let shape: Vec<i64> = var.shape.iter().map(|&d| d as i64).collect();
        let exact: Vec<&CheckpointEntry> = model_entries.iter().copied().filter(|e| e.key == var.name).collect();
        let by_name: Vec<&CheckpointEntry> = if exact.is_empty() {
            model_entries.iter().copied().filter(|e| names_match(&e.key, &var.name)).collect()
        } else {
            exact
        };
        if let [entry] = by_name[..] {
            if let Some((_, other)) = named.iter().find(|(key, _)| *key == entry.key) {
                bail!("{}: {} and {other} would both be its {}", dir.display(), var.name, entry.key);
            }
            named.push((&entry.key, &var.name));
        }
        let candidates = if by_name.is_empty() {
            model_entries.iter().copied().filter(|e| e.shape == shape).collect()
        } else {
            by_name
        };
        ensure!(
            !candidates.is_empty(),
            "{}: no variable for {} {:?} (it holds: {})",
            dir.display(),
            var.name,
            shape,
            describe(&model_entries)
        );
        let values: Vec<Tensor<f32>> =
            candidates.iter().map(|e| reader.tensor_f32(&e.key)).collect::<Result<_, _>>()?;
        ensure!(
            values.windows(2).all(|w| w[0][..] == w[1][..]),
            "{}: which variable is {} is ambiguous ({})",
            dir.display(),
            var.name,
            describe(&candidates)
        );
        ensure!(
            candidates[0].shape == shape,
            "{}: {} is {:?} there, {:?} in this model",
            dir.display(),
            var.name,
            candidates[0].shape,
            shape
        );
        out.extend(values.into_iter().next());
    }
    Ok(out)
}

/// Whether a `variables/` checkpoint entry may be a model weight (not an optimizer's slot or
/// counter, not a bookkeeping entry).
fn is_weight(e: &CheckpointEntry) -> bool {
    e.dtype == DataType::Float
        && !e.key.starts_with("optimizer/")
        && !e.key.starts_with('_')
        && !e.key.ends_with("/m")
        && !e.key.ends_with("/v")
}

/// The elements of every floating-point entry of a SavedModel's `variables/` checkpoint but its
/// bookkeeping: at least the model's parameter count (more with an optimizer's slots, or a weight
/// listed twice; a Keras model's weights may be listed only under its optimizer).
pub fn weight_elements(dir: &Path) -> Result<u64> {
    let entries = variables_reader(dir)?.entries()?;
    let float = |e: &&CheckpointEntry| e.dtype == DataType::Float && !e.key.starts_with('_');
    Ok(entries.iter().filter(float).map(|e| e.shape.iter().product::<i64>().max(0) as u64).sum())
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
pub fn model_config(dir: &Path, vocab_size: u64) -> Result<ModelConfig> {
    if let Some(model) = Declared::read(dir)?.and_then(|d| d.model) {
        ensure!(
            model.vocab_size == vocab_size,
            "{}: its minigpt.json declares a vocabulary of {}, its vocabulary has {vocab_size}",
            dir.display(),
            model.vocab_size
        );
        return Ok(model);
    }
    let entries = variables_reader(dir)?.entries()?;
    let table = |e: &&CheckpointEntry| {
        e.dtype == DataType::Float
            && e.shape.len() == 2
            && e.shape[0] == vocab_size as i64
            && !e.key.starts_with("optimizer/")
    };
    let embedding = entries
        .iter()
        .filter(table)
        .find(|e| names_match(&e.key, "embedding/embeddings"))
        .or_else(|| entries.iter().find(table))
        .with_context(|| format!("{}: no [{vocab_size}, width] embedding table among its variables", dir.display()))?;
    Ok(ModelConfig::bigram(vocab_size, embedding.shape[1] as u64))
}
