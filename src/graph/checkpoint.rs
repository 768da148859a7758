//! The checkpoint's save and restore ops (TensorFlow's V2 format, keys by variable name).

use tensorflow::{ops, DataType, Operation, Output, Scope};

use super::POSITION_KEY;
use crate::tfx::{self, Var};

/// `SaveV2` of every read variable and the data position at `prefix`; `RestoreV2` of the position.
pub(super) fn save_ops(
    reads: &[(Var, Output)],
    prefix: Output,
    scope: &mut Scope,
) -> tensorflow::Result<(Operation, Operation, Operation)> {
    let position = tfx::placeholder("checkpoint/position", DataType::Int64, &[2], scope)?;
    let mut names: Vec<String> = reads.iter().map(|(v, _)| v.name.clone()).collect();
    let mut tensors: Vec<Output> = reads.iter().map(|(_, r)| r.clone()).collect();
    names.push(POSITION_KEY.to_string());
    tensors.push(position.clone().into());
    let save = tfx::save_v2(prefix.clone(), &names, &tensors, scope)?;
    let restore_position =
        tfx::restore_v2("restore_position", prefix, &[POSITION_KEY.to_string()], &[DataType::Int64], scope)?;
    Ok((save, position, restore_position))
}

/// `RestoreV2` of `vars` by name from `prefix`, each assigned to its variable.
pub(super) fn restore_ops(vars: &[Var], prefix: Output, scope: &mut Scope) -> tensorflow::Result<Operation> {
    let names: Vec<String> = vars.iter().map(|v| v.name.clone()).collect();
    let dtypes: Vec<DataType> = vars.iter().map(|v| v.dtype).collect();
    let restored = tfx::restore_v2("restore", prefix, &names, &dtypes, scope)?;
    let mut assigns = Vec::with_capacity(vars.len());
    for (i, v) in vars.iter().enumerate() {
        assigns.push(ops::assign_variable_op(
            v.handle.clone(),
            restored.output(i),
            &mut scope.with_op_name(&format!("restore/assign/{}", v.name)),
        )?);
    }
    tfx::group("restore/all", &assigns, scope)
}
