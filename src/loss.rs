//! The loss, built once for every graph that needs it (training, evaluation, a loaded
//! SavedModel): Keras' `SparseCategoricalCrossentropy(from_logits=True)`, the mean over all
//! B·T positions.

use tensorflow::{ops, Output, Scope};

use crate::tfx;

/// The mean cross-entropy and what its gradient needs.
pub struct CrossEntropy {
    /// [] the mean over all positions
    pub loss: Output,
    /// [N, V] the logits, flattened
    pub logits_2d: Output,
    /// [N, V] d(per-position loss)/d(logits) = softmax − onehot (the op's second output)
    pub backprop: Output,
    /// [N] the targets, flattened
    pub labels: Output,
}

/// logits [B, T, V] and targets [B, T] int32 → the loss, named `<scope>/loss/loss`.
///
/// The logits are reshaped to [N, V] first: TensorFlow's C++ gradients of the softmax ops reduce
/// over axis 1, right only for rank 2.
pub fn cross_entropy(
    logits: Output,
    targets: Output,
    vocab_size: i64,
    scope: &mut Scope,
) -> tensorflow::Result<CrossEntropy> {
    let scope = &mut scope.new_sub_scope("loss");
    let shape = tfx::shape_const(&[-1, vocab_size], scope)?;
    let logits_2d: Output = ops::reshape(logits, shape, scope)?.into(); // [N, V]
    let flat = tfx::shape_const(&[-1], scope)?;
    let labels: Output = ops::reshape(targets, flat, scope)?.into(); // [N]
    let xent = ops::sparse_softmax_cross_entropy_with_logits(logits_2d.clone(), labels.clone(), scope)?; // [N], [N, V]
    let axis = tfx::shape_const(&[0], scope)?;
    let loss = ops::mean(xent.output(0), axis, &mut scope.with_op_name("loss"))?.into(); // []
    Ok(CrossEntropy { loss, logits_2d, backprop: xent.output(1), labels })
}
