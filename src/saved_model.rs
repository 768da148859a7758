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
use tensorflow::{ops, DataType, Output, Scope};

use crate::checkpoint::{path_str, RunConfig, RunDir};
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
