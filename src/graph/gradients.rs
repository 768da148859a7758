//! The loss's gradients (the `GradientTape` equivalent), and the per-lookup squares of the
//! embedding tables' gradient rows that Keras' Adam uses.

use tensorflow::{ops, Output, Scope};

use crate::loss::CrossEntropy;
use crate::model::{Forward, Lookup};
use crate::tfx::{self, Var};

/// The loss's gradients: for each variable, and for each embedding lookup of its looked-up rows.
///
/// The C++ gradient registry has no gradient for `SparseSoftmaxCrossEntropyWithLogits`, but the
/// op's second output is d(per-token loss)/d(logits) = softmax − onehot; times 1/N it is
/// d(mean loss)/d(logits), exactly as Python's gradient of the op computes it. (The crate's
/// `add_gradients` frees its `dx` array before TensorFlow reads it, so that upstream gradient
/// cannot be passed directly.) It is passed through a surrogate
/// `Σ logits · stop_gradient(dlogits)`, whose gradient at the logits is `dlogits` exactly.
///
/// With `scale` (a float32 scalar, [`crate::optim::LossScale`]), these are the gradients of the
/// loss times `scale`.
pub(super) fn gradients(
    xent: &CrossEntropy,
    forward: &Forward,
    vars: &[Var],
    scale: Option<&Output>,
    scope: &mut Scope,
) -> tensorflow::Result<(Vec<Output>, Vec<Output>)> {
    let scope = &mut scope.new_sub_scope("loss_gradient");
    let dtype = xent.logits_2d.operation.output_type(xent.logits_2d.index as usize);
    let n = ops::size(xent.labels.clone(), scope)?;
    let n = ops::Cast::new().DstT(dtype).build(n, scope)?;
    let one = match scale {
        Some(scale) => tfx::cast(scale.clone(), dtype, scope)?,
        None => tfx::scalar(dtype, 1.0, scope)?,
    };
    let inv_n = ops::real_div(one, n, scope)?; // 1/N (scale/N)
    let dlogits = ops::mul(xent.backprop.clone(), inv_n, scope)?; // [N, V]
    let dlogits = ops::stop_gradient(dlogits, scope)?;
    let surrogate = ops::mul(xent.logits_2d.clone(), dlogits, scope)?; // [N, V]
    let axes = tfx::shape_const(&[0, 1], scope)?;
    let surrogate: Output = ops::sum(surrogate, axes, &mut scope.with_op_name("surrogate"))?.into(); // []
    let mut xs: Vec<Output> = vars.iter().map(|v| v.handle.clone()).collect();
    xs.extend(forward.lookups.iter().map(|l| l.rows.clone()));
    let names = vars.iter().map(|v| v.name.as_str()).chain(forward.lookups.iter().map(|l| l.var.as_str()));
    let grads = scope.graph_mut().add_gradients(Some("gradients"), &[surrogate], &xs, None)?;
    let internal = |message: &str| tensorflow::Status::new_set_lossy(tensorflow::Code::Internal, message);
    let mut grads = grads
        .into_iter()
        .zip(names)
        .map(|(g, name)| g.ok_or_else(|| internal(&format!("no gradient reaches {name}"))))
        .collect::<tensorflow::Result<Vec<_>>>()?;
    let row_grads = grads.split_off(vars.len());
    Ok((grads, row_grads))
}

/// For each embedding table, the sum of its per-lookup gradient rows squared (what Keras' Adam
/// squares; see [`Adam::apply`]): `row_grads[j]` is d loss / d `lookups[j].rows`.
pub(super) fn lookup_squares(
    lookups: &[Lookup],
    row_grads: Vec<Output>,
    vars: &[Var],
    scope: &mut Scope,
) -> tensorflow::Result<Vec<Option<Output>>> {
    let mut squares: Vec<Option<Output>> = vec![None; vars.len()];
    let scope = &mut scope.new_sub_scope("lookup_squares");
    for (lookup, d_rows) in lookups.iter().zip(row_grads) {
        let i = lookup_var(lookup, vars)?;
        let sum = lookup_square(lookup, d_rows, &vars[i], scope)?;
        add_to(&mut squares[i], sum, scope)?;
    }
    Ok(squares)
}

/// The index in `vars` of the variable `lookup` reads.
pub(super) fn lookup_var(lookup: &Lookup, vars: &[Var]) -> tensorflow::Result<usize> {
    vars.iter().position(|v| v.name == lookup.var).ok_or_else(|| {
        tensorflow::Status::new_set_lossy(tensorflow::Code::Internal, &format!("lookup of unknown {}", lookup.var))
    })
}

/// [V, C]: one lookup's gradient rows `d_rows` squared and summed per id.
pub(super) fn lookup_square(
    lookup: &Lookup,
    d_rows: Output,
    var: &Var,
    scope: &mut Scope,
) -> tensorflow::Result<Output> {
    let (rows, width) = (var.shape[0] as i64, var.shape[1] as i64);
    let d_rows = ops::reshape(d_rows, tfx::shape_const(&[-1, width], scope)?, scope)?; // [N, C]
    let ids = ops::reshape(lookup.ids.clone(), tfx::shape_const(&[-1], scope)?, scope)?; // [N]
    let num = ops::constant(rows as i32, scope)?;
    Ok(ops::unsorted_segment_sum(ops::square(d_rows, scope)?, ids, num, scope)?.into())
    // [V, C]
}

/// `total += value` (`total = value` the first time).
pub(super) fn add_to(total: &mut Option<Output>, value: Output, scope: &mut Scope) -> tensorflow::Result<()> {
    *total = Some(match total.take() {
        Some(prev) => ops::add_v2(prev, value, scope)?.into(),
        None => value,
    });
    Ok(())
}

/// Whether a lookup's ids are per window ([B, T] tokens) rather than shared by every window
/// ([T] positions).
pub(super) fn per_window(lookup: &Lookup, scope: &Scope) -> tensorflow::Result<bool> {
    Ok(scope.graph().tensor_shape(lookup.ids.clone())?.dims() != Some(1))
}
