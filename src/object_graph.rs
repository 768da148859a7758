//! Restoring a SavedModel's variables through its object graph, as Python's
//! `tf.saved_model.load` does.
//!
//! TensorFlow's C++ loader (the C API's, TensorFlow Serving's) restores variables through the
//! MetaGraph's `SaverDef` only. A Keras 3 model saved inside a `tf.Module` with
//! `tf.saved_model.save` has signatures that read variables that `SaverDef` never writes: after
//! loading they are uninitialized. The SavedModel says where their values are: the graph calls
//! each saved function with the `VarHandleOp`s of its captured variables, listed by object node
//! id in `MetaGraphDef.object_graph_def` (the function's `bound_inputs`); each node has the same
//! id in the checkpoint's own object graph (`_CHECKPOINTABLE_OBJECT_GRAPH`), whose
//! `VARIABLE_VALUE` attribute gives its checkpoint key.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use prost::Message;
use tensorflow::{ops, DataType, Operation, Output, Scope, Session, SessionRunArgs};

use crate::files::path_str;
use crate::proto;
use crate::tfx::{self, CheckpointReader};

/// The checkpoint key of the checkpoint's object graph.
const OBJECT_GRAPH_KEY: &str = "_CHECKPOINTABLE_OBJECT_GRAPH";
/// The attribute of a variable node holding its value.
const VARIABLE_VALUE: &str = "VARIABLE_VALUE";

/// The MetaGraph tagged `tag`, if it has an object graph (a TF2 SavedModel; a TF1-style one's
/// saver restores everything).
fn meta_graph(dir: &Path, tag: &str) -> Result<Option<proto::MetaGraphDef>> {
    Ok(tagged_meta_graph(dir, tag)?.filter(|m| m.object_graph_def.is_some()))
}

/// The MetaGraph tagged `tag`, if there is one.
fn tagged_meta_graph(dir: &Path, tag: &str) -> Result<Option<proto::MetaGraphDef>> {
    // Protocol buffers stop at 2 GiB.
    let bytes = crate::files::read_input(&dir.join("saved_model.pb"), "SavedModel graph", 2 << 30)?;
    let model = proto::SavedModel::decode(&bytes[..]).with_context(|| format!("{}: saved_model.pb", dir.display()))?;
    let tagged = |m: &proto::MetaGraphDef| m.meta_info_def.as_ref().is_some_and(|i| i.tags.iter().any(|t| t == tag));
    Ok(model.meta_graphs.into_iter().find(tagged))
}

/// The init ops TensorFlow's loader runs when it loads the MetaGraph tagged `tag` (a TF1
/// `main_op` or `legacy_init_op`, a TF2 `__saved_model_init_op`) that do something: each as
/// `name (op type)`. A `NoOp` with no inputs does nothing and is left out.
pub fn init_ops(dir: &Path, tag: &str) -> Result<Vec<String>> {
    let Some(meta) = tagged_meta_graph(dir, tag)? else { return Ok(Vec::new()) };
    let mut names: Vec<String> = Vec::new();
    for key in ["saved_model_main_op", "legacy_init_op", "main_op"] {
        if let Some(proto::collection_def::Kind::NodeList(list)) =
            meta.collection_def.get(key).and_then(|c| c.kind.as_ref())
        {
            names.extend(
                list.value.iter().map(|n| n.split(':').next().unwrap_or(n).trim_start_matches('^').to_string()),
            );
        }
    }
    if let Some(output) = meta.signature_def.get("__saved_model_init_op").and_then(|s| s.outputs.values().next()) {
        if let Some(proto::tensor_info::Encoding::Name(name)) = &output.encoding {
            names.push(name.split(':').next().unwrap_or(name).to_string());
        }
    }
    let nodes = meta.graph_def.map(|g| g.node).unwrap_or_default();
    let mut out = Vec::new();
    for name in names {
        let node = nodes.iter().find(|n| n.name == name);
        if node.is_some_and(|n| n.op == "NoOp" && n.input.is_empty()) {
            continue;
        }
        let what = node.map_or("not in its graph".to_string(), |n| n.op.clone());
        let described = format!("{name} ({what})");
        if !out.contains(&described) {
            out.push(described);
        }
    }
    Ok(out)
}

/// The SavedModel's checkpoint: its prefix, reader and object graph.
fn checkpoint(dir: &Path) -> Result<(PathBuf, CheckpointReader, proto::TrackableObjectGraph)> {
    let prefix = dir.join("variables/variables");
    let reader = CheckpointReader::open(path_str(&prefix)?)
        .with_context(|| format!("{}: cannot read the variables", dir.display()))?;
    let graph = proto::TrackableObjectGraph::decode(&reader.bytes(OBJECT_GRAPH_KEY)?[..])
        .with_context(|| format!("{}: its checkpoint's object graph", dir.display()))?;
    Ok((prefix, reader, graph))
}

/// The saved function a graph node calls, if any.
fn called<'a>(node: &proto::NodeDef, objects: &'a proto::SavedObjectGraph) -> Option<&'a proto::SavedConcreteFunction> {
    match node.attr.get("f").and_then(|a| a.value.as_ref()) {
        Some(proto::attr_value::Value::Func(f)) => objects.concrete_functions.get(&f.name),
        _ => None,
    }
}

/// The variable at object node `id`, if it is one.
fn variable(objects: &proto::SavedObjectGraph, id: i32) -> Option<&proto::SavedVariable> {
    match objects.nodes.get(id as usize).and_then(|n| n.kind.as_ref()) {
        Some(proto::saved_object::Kind::Variable(v)) => Some(v),
        _ => None,
    }
}

/// The checkpoint key the checkpoint's object graph gives node `id`'s value.
fn checkpoint_key(graph: &proto::TrackableObjectGraph, id: i32) -> Option<&str> {
    let node = graph.nodes.get(id as usize)?;
    node.attributes.iter().find(|a| a.name == VARIABLE_VALUE).map(|a| a.checkpoint_key.as_str())
}

/// A captured variable: the `VarHandleOp` a call feeds it through, and its object node.
struct Captured {
    op: String,
    node: i32,
    name: String,
    dtype: DataType,
}

/// A captured variable the loaded graph holds uninitialized.
struct Missing {
    captured: Captured,
    handle: Operation,
}

/// Initializes, from the SavedModel's checkpoint, every variable of its object graph that the
/// loaded graph (in `scope`, run by `session`) holds uninitialized; returns how many it restored.
pub fn restore_uninitialized(dir: &Path, tag: &str, scope: &mut Scope, session: &Session) -> Result<usize> {
    let Some(meta) = meta_graph(dir, tag)? else { return Ok(0) };
    let (Some(graph_def), Some(objects)) = (&meta.graph_def, &meta.object_graph_def) else { return Ok(0) };
    let missing = uninitialized(captured_variables(graph_def, objects), scope, session)?;
    if missing.is_empty() {
        return Ok(0);
    }
    let (prefix, reader, graph) = checkpoint(dir)?;
    let keys: Vec<String> = reader.entries()?.into_iter().map(|e| e.key).collect();
    let mut restore_keys = Vec::with_capacity(missing.len());
    for Missing { captured: c, .. } in &missing {
        match checkpoint_key(&graph, c.node) {
            Some(key) if keys.iter().any(|k| k == key) => restore_keys.push(key.to_string()),
            Some(key) => bail!(
                "{}: variable {} ({}) is read by its signatures but the checkpoint has no value for it (tried {key})",
                dir.display(),
                c.name,
                c.op
            ),
            None => bail!(
                "{}: variable {} ({}) is read by its signatures but the checkpoint's object graph gives no key for \
                 it (node {} has no {VARIABLE_VALUE})",
                dir.display(),
                c.name,
                c.op,
                c.node
            ),
        }
    }
    let restore = build_restore(&prefix, &missing, &restore_keys, scope).context("building the restore ops")?;
    let mut args = SessionRunArgs::new();
    args.add_target(&restore);
    session
        .run(&mut args)
        .with_context(|| format!("{}: restoring variables through the object graph", dir.display()))?;
    Ok(missing.len())
}

/// The crate's data type of a `DataType` enum value (the ones variables hold).
fn dtype(value: i32) -> DataType {
    use proto::DataType as P;
    match P::try_from(value) {
        Ok(P::DtFloat) => DataType::Float,
        Ok(P::DtDouble) => DataType::Double,
        Ok(P::DtInt32) => DataType::Int32,
        Ok(P::DtInt64) => DataType::Int64,
        Ok(P::DtBool) => DataType::Bool,
        Ok(P::DtHalf) => DataType::Half,
        Ok(P::DtBfloat16) => DataType::BFloat16,
        _ => DataType::UnrecognizedEnumValue(value as _),
    }
}

/// A variable the serving signature reads: its name in the object graph, shape and checkpoint key.
#[derive(Debug, Clone)]
pub struct ServingVariable {
    pub name: String,
    pub shape: Vec<i64>,
    pub key: String,
}

/// The variables `signature` reads, in the order its function captured them (the order the
/// model's forward pass first reads them), with their checkpoint keys. Empty for a SavedModel
/// without an object graph.
pub fn signature_variables(dir: &Path, tag: &str, signature: &str) -> Result<Vec<ServingVariable>> {
    let Some(meta) = meta_graph(dir, tag)? else { return Ok(Vec::new()) };
    let (Some(graph_def), Some(objects)) = (&meta.graph_def, &meta.object_graph_def) else { return Ok(Vec::new()) };
    let output =
        meta.signature_def.get(signature).and_then(|s| s.outputs.values().next()).and_then(|t| match &t.encoding {
            Some(proto::tensor_info::Encoding::Name(name)) => Some(name.split(':').next().unwrap_or(name).to_string()),
            _ => None,
        });
    let call = graph_def.node.iter().find(|n| Some(&n.name) == output.as_ref());
    let Some(function) = call.and_then(|node| called(node, objects)) else { return Ok(Vec::new()) };
    let (_, _, graph) = checkpoint(dir)?;
    let mut out = Vec::new();
    for &id in &function.bound_inputs {
        let Some(v) = variable(objects, id) else { continue };
        let key = checkpoint_key(&graph, id)
            .with_context(|| format!("{}: no checkpoint key for variable {} (node {id})", dir.display(), v.name))?;
        let shape = v.shape.as_ref().map(|s| s.dim.iter().map(|d| d.size).collect()).unwrap_or_default();
        out.push(ServingVariable { name: v.name.clone(), shape, key: key.to_string() });
    }
    Ok(out)
}

/// The variables the signatures read: for each call of a saved function in the graph, its
/// captured inputs (the trailing ones) are the `VarHandleOp`s of the function's `bound_inputs`, in
/// order.
fn captured_variables(graph: &proto::GraphDef, objects: &proto::SavedObjectGraph) -> Vec<Captured> {
    let mut out: Vec<Captured> = Vec::new();
    for node in &graph.node {
        let Some(function) = called(node, objects) else { continue };
        let inputs: Vec<&str> = node.input.iter().map(String::as_str).filter(|i| !i.starts_with('^')).collect();
        let captured = &inputs[inputs.len().saturating_sub(function.bound_inputs.len())..];
        for (input, &id) in captured.iter().zip(&function.bound_inputs) {
            let op = input.split(':').next().unwrap_or(input).to_string();
            if let Some(v) = variable(objects, id).filter(|_| !out.iter().any(|c| c.op == op)) {
                out.push(Captured { op, node: id, name: v.name.clone(), dtype: dtype(v.dtype) });
            }
        }
    }
    out
}

/// The captured variables whose `VarHandleOp`s in the loaded graph are uninitialized.
fn uninitialized(captured: Vec<Captured>, scope: &mut Scope, session: &Session) -> Result<Vec<Missing>> {
    let mut found: Vec<Missing> = Vec::new();
    for c in captured {
        let handle = scope.graph().operation_by_name(&c.op)?;
        if let Some(handle) = handle.filter(|h| h.op_type().is_ok_and(|t| t == "VarHandleOp")) {
            found.push(Missing { captured: c, handle });
        }
    }
    let s = &mut scope.new_sub_scope("minigpt_object_graph");
    let checks: Vec<Output> = found
        .iter()
        .map(|m| Ok(ops::var_is_initialized_op(m.handle.clone(), s)?.into()))
        .collect::<tensorflow::Result<_>>()?;
    let mut args = SessionRunArgs::new();
    let tokens: Vec<_> = checks.iter().map(|o| args.request_fetch(&o.operation, o.index)).collect();
    session.run(&mut args).context("checking which variables are initialized")?;
    let initialized: Vec<bool> = tokens.into_iter().map(|t| Ok(args.fetch::<bool>(t)?[0])).collect::<Result<_>>()?;
    Ok(found.into_iter().zip(initialized).filter(|(_, init)| !init).map(|(m, _)| m).collect())
}

/// `RestoreV2` of `keys` from `prefix`, each value assigned to its variable's handle.
fn build_restore(prefix: &Path, missing: &[Missing], keys: &[String], scope: &mut Scope) -> Result<Operation> {
    let s = &mut scope.new_sub_scope("minigpt_object_graph");
    let prefix = ops::constant(path_str(prefix)?.to_string(), s)?;
    let dtypes: Vec<DataType> = missing.iter().map(|m| m.captured.dtype).collect();
    let restored = tfx::restore_v2("minigpt_object_graph/restore", prefix.into(), keys, &dtypes, s)?;
    let assigns = missing
        .iter()
        .enumerate()
        .map(|(i, m)| ops::assign_variable_op(m.handle.clone(), restored.output(i), s))
        .collect::<tensorflow::Result<Vec<_>>>()?;
    Ok(tfx::group("minigpt_object_graph/restore_all", &assigns, s)?)
}
