//! The train step replicated on a cluster's workers (TensorFlow's in-graph replication).

use tensorflow::{ops, DataType, Operation, Output, Scope};

use super::gradients::{add_to, gradients, lookup_square, lookup_var, per_window};
use super::GraphOptions;
use crate::loss;
use crate::model::{Dropout, Lookup, ModelConfig};
use crate::tfx::{self, Var};

/// The train step computed by one replica per device of `replicas` (TensorFlow's in-graph
/// replication): replica `i` runs the forward pass, loss and gradients on the `i`-th slice of the
/// batch, with the weights read on the chief. Each replica is built in a graph of its own, with
/// the model's variables there standing for the chief's, and imported under `replica_<i>/` with
/// `replicas[i]` as the default device, so every op of it, gradients included, runs on its
/// worker. The chief averages the losses and gradients. For Keras' per-lookup squares
/// ([`lookup_squares`]): a lookup of tokens (ids [B, T]) has its squares summed on each worker,
/// and the chief adds them up divided by N² (each replica's rows are those of its own mean loss,
/// N times the batch's); a lookup every window shares (positions, ids [T]) has one row per
/// position summed over the batch, so the workers send the rows, and the chief sums them, divides
/// by N and squares. Nothing of the result exists until every replica has delivered, so a step
/// whose worker fails changes no variable.
///
/// `batch`: tokens [B, T], targets [B, T], the training flag and the optimizer step; `lookups`:
/// the chief's forward pass's. Returns the loss, the gradients and the squares.
pub(super) fn replicated(
    model_cfg: &ModelConfig,
    opts: &GraphOptions,
    vars: &[Var],
    lookups: &[Lookup],
    batch: [Output; 4],
    replicas: &[String],
    scope: &mut Scope,
) -> tensorflow::Result<(Output, Vec<Output>, Vec<Option<Output>>)> {
    let scope = &mut scope.new_sub_scope("replicas");
    let [tokens, targets, training, step] = batch;
    let n = replicas.len();
    let axis = ops::constant(0i32, scope)?;
    let xs = ops::Split::new().num_split(n as i64).build(axis.clone(), tokens, scope)?; // N × [B/N, T]
    let ys = ops::Split::new().num_split(n as i64).build(axis, targets, scope)?; // N × [B/N, T]
    let reads: Vec<Output> =
        vars.iter().map(|v| v.read(&mut scope.with_op_name(&format!("read/{}", v.name)))).collect::<Result<_, _>>()?;
    let nul = |_| tensorflow::Status::new_set_lossy(tensorflow::Code::InvalidArgument, "NUL in a name");
    let mut outputs: Vec<Vec<Output>> = Vec::with_capacity(n); // per replica: loss, grads, per lookup
    for (i, device) in replicas.iter().enumerate() {
        // Replica i's dropout masks are keyed by seed + i: one replica draws the single-process masks.
        let replica = replica_graph_def(model_cfg, opts.dtype, opts.seed + i as i64)?;
        let mut import = tensorflow::ImportGraphDefOptions::new();
        import.set_prefix(&format!("replica_{i}")).map_err(nul)?;
        import.set_default_device(device).map_err(nul)?;
        let inputs = [("x", xs.output(i)), ("y", ys.output(i)), ("training", training.clone()), ("step", step.clone())];
        for (name, input) in inputs {
            import.add_input_mapping(name, 0, &input).map_err(nul)?;
        }
        for (read, var) in replica.reads {
            let k = vars.iter().position(|v| v.name == var).expect("a replica reads only model variables");
            import.add_input_mapping(&read, 0, &reads[k]).map_err(nul)?;
        }
        let mut graph = scope.graph_mut();
        graph.import_graph_def(&replica.graph_def, &import)?;
        let get = |name: String| -> tensorflow::Result<Output> {
            Ok(graph.operation_by_name_required(&format!("replica_{i}/out/{name}"))?.into())
        };
        let mut got = vec![get("loss".into())?];
        got.extend((0..vars.len()).map(|k| get(format!("grad/{k}"))).collect::<tensorflow::Result<Vec<_>>>()?);
        got.extend((0..lookups.len()).map(|j| get(format!("lookup/{j}"))).collect::<tensorflow::Result<Vec<_>>>()?);
        outputs.push(got);
    }
    // Everything every replica delivers, as a control barrier for the combined results.
    let delivered: Vec<Operation> = outputs.iter().flatten().map(|o| o.operation.clone()).collect();
    let combine = |j: usize, scale: f64, name: &str, scope: &mut Scope| -> tensorflow::Result<Output> {
        let mut sum = outputs[0][j].clone();
        for replica in &outputs[1..] {
            sum = ops::add_v2(sum, replica[j].clone(), scope)?.into();
        }
        let scaled = ops::mul(sum, tfx::scalar(opts.dtype, scale, scope)?, scope)?;
        let mut barrier = scope.with_op_name(name).with_control_dependencies(&delivered);
        Ok(ops::identity(scaled, &mut barrier)?.into())
    };
    let inv_n = 1.0 / n as f64;
    let loss = combine(0, inv_n, "loss", scope)?;
    let grads =
        (0..vars.len()).map(|k| combine(1 + k, inv_n, &format!("grad/{k}"), scope)).collect::<Result<Vec<_>, _>>()?;
    let mut squares: Vec<Option<Output>> = vec![None; vars.len()];
    for (j, lookup) in lookups.iter().enumerate() {
        let k = lookup_var(lookup, vars)?;
        let square = match per_window(lookup, scope)? {
            true => combine(1 + vars.len() + j, inv_n * inv_n, &format!("square/{j}"), scope)?,
            false => {
                let rows = combine(1 + vars.len() + j, inv_n, &format!("rows/{j}"), scope)?;
                lookup_square(lookup, rows, &vars[k], scope)?
            }
        };
        add_to(&mut squares[k], square, scope)?;
    }
    Ok((loss, grads, squares))
}

/// One replica of the train step, as a `GraphDef` to import.
struct ReplicaDef {
    /// Placeholders `x`, `y` [b, T] int32, `training` (bool) and `step` (int64); outputs
    /// `out/loss`, `out/grad/<k>` for each variable and `out/lookup/<j>` for each embedding lookup:
    /// its squares [V, C] for a lookup of tokens, its gradient rows [T, C] for one of positions.
    graph_def: Vec<u8>,
    /// The `ReadVariableOp`s of the model's variables and the variable each reads, to be mapped
    /// to the chief's reads.
    reads: Vec<(String, String)>,
}

/// Builds one replica of `model_cfg`'s train step (see [`ReplicaDef`]).
fn replica_graph_def(model_cfg: &ModelConfig, dtype: DataType, seed: i64) -> tensorflow::Result<ReplicaDef> {
    let mut scope = Scope::new_root_scope();
    let scope = &mut scope;
    let model = model_cfg.build(dtype, seed, scope)?;
    let vars = model.variables();
    let tokens = tfx::placeholder("x", DataType::Int32, &[-1, -1], scope)?;
    let targets = tfx::placeholder("y", DataType::Int32, &[-1, -1], scope)?;
    let training = tfx::placeholder("training", DataType::Bool, &[], scope)?;
    let step = tfx::placeholder("step", DataType::Int64, &[], scope)?;
    let dropout = Dropout { training: training.into(), step: step.into(), seed };
    let forward = model.forward(tokens.into(), Some(&dropout), scope)?;
    let xent = loss::cross_entropy(forward.logits.clone(), targets.into(), model_cfg.vocab_size as i64, scope)?;
    let (grads, row_grads) = gradients(&xent, &forward, &vars, None, scope)?;
    ops::identity(xent.loss, &mut scope.with_op_name("out/loss"))?;
    for (k, g) in grads.into_iter().enumerate() {
        ops::identity(g, &mut scope.with_op_name(&format!("out/grad/{k}")))?;
    }
    for (j, (rows, lookup)) in row_grads.into_iter().zip(&forward.lookups).enumerate() {
        let out = match per_window(lookup, scope)? {
            true => lookup_square(lookup, rows, &vars[lookup_var(lookup, &vars)?], scope)?,
            false => rows,
        };
        ops::identity(out, &mut scope.with_op_name(&format!("out/lookup/{j}")))?;
    }
    let graph = scope.graph();
    let mut reads = Vec::new();
    for op in graph.operation_iter() {
        if op.op_type()? == "ReadVariableOp" {
            let (handle, _) = op.input(0);
            let var = handle.name()?;
            if vars.iter().any(|v| v.name == var) {
                reads.push((op.name()?, var));
            }
        }
    }
    Ok(ReplicaDef { graph_def: graph.graph_def()?, reads })
}
