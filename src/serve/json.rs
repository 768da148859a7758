//! TensorFlow Serving's JSON for tensors (its REST API's `predict`): a request's `instances` (row
//! format: one value or object per example) or `inputs` (columnar: one value or object for the
//! batch) into tensors of a signature's types, and its outputs back into `predictions` or
//! `outputs`. Numbers are written so that they read back as the same float32.

use std::collections::BTreeMap;
use std::fmt::Write;

use serde_json::{Map, Value};
use tensorflow::{DataType, Tensor, TensorType};

use crate::saved_model::Signature;
use crate::tfx::AnyTensor;

/// A request's inputs: row or columnar.
pub enum Format {
    Row,
    Columnar,
}

/// `predict`'s request body, parsed against `signature`: the inputs by key, and the format the
/// answer takes. Errors are the message of a 400.
pub fn request(body: &Map<String, Value>, signature: &Signature) -> Result<(Format, Vec<(String, AnyTensor)>), String> {
    for key in body.keys() {
        if !matches!(key.as_str(), "signature_name" | "instances" | "inputs") {
            return Err(format!(
                "unknown field {key:?}: a request has \"signature_name\" and \"instances\" or \"inputs\""
            ));
        }
    }
    match (body.get("instances"), body.get("inputs")) {
        (Some(_), Some(_)) => Err("give \"instances\" (row format) or \"inputs\" (columnar), not both".into()),
        (None, None) => Err("missing \"instances\" (row format) or \"inputs\" (columnar)".into()),
        (Some(instances), None) => Ok((Format::Row, rows(instances, signature)?)),
        (None, Some(inputs)) => Ok((Format::Columnar, columns(inputs, signature)?)),
    }
}

/// The row format: a list of examples, each a value (a signature with one input) or an object of
/// every input; stacked into a batch per input.
fn rows(instances: &Value, signature: &Signature) -> Result<Vec<(String, AnyTensor)>, String> {
    let Value::Array(list) = instances else {
        return Err("\"instances\" must be a list (one entry per example)".into());
    };
    if list.is_empty() {
        return Err("\"instances\" is empty".into());
    }
    let mut per_input: BTreeMap<&str, Vec<&Value>> = BTreeMap::new();
    for (i, instance) in list.iter().enumerate() {
        match instance {
            Value::Object(named) => {
                check_keys(named.keys(), signature, &format!("instance {i}"))?;
                for (key, value) in named {
                    per_input.entry(key).or_default().push(value);
                }
            }
            value => per_input.entry(only_input(signature)?).or_default().push(value),
        }
    }
    per_input
        .into_iter()
        .map(|(key, values)| {
            let batch = Value::Array(values.into_iter().cloned().collect());
            Ok((key.to_string(), tensor(&batch, &signature.inputs[key], key)?))
        })
        .collect()
}

/// The columnar format: a value (a signature with one input) or an object of every input.
fn columns(inputs: &Value, signature: &Signature) -> Result<Vec<(String, AnyTensor)>, String> {
    match inputs {
        Value::Object(named) => {
            check_keys(named.keys(), signature, "\"inputs\"")?;
            named.iter().map(|(key, value)| Ok((key.clone(), tensor(value, &signature.inputs[key], key)?))).collect()
        }
        value => {
            let key = only_input(signature)?;
            Ok(vec![(key.to_string(), tensor(value, &signature.inputs[key], key)?)])
        }
    }
}

/// The signature's input, when it has only one (so examples may be given without its name).
fn only_input(signature: &Signature) -> Result<&str, String> {
    match signature.inputs.keys().collect::<Vec<_>>()[..] {
        [key] => Ok(key),
        ref keys => Err(format!("the signature has {} inputs: name each ({})", keys.len(), list(&signature.inputs))),
    }
}

/// Every input named once, and nothing else.
fn check_keys<'a>(keys: impl Iterator<Item = &'a String>, signature: &Signature, what: &str) -> Result<(), String> {
    let keys: Vec<&String> = keys.collect();
    if let Some(unknown) = keys.iter().find(|k| !signature.inputs.contains_key(k.as_str())) {
        return Err(format!("{what}: the signature has no input {unknown:?} (it has: {})", list(&signature.inputs)));
    }
    if let Some(missing) = signature.inputs.keys().find(|k| !keys.contains(k)) {
        return Err(format!("{what}: input {missing:?} is missing"));
    }
    Ok(())
}

/// The keys of `m`, quoted, for a message.
pub(super) fn list<T>(m: &BTreeMap<String, T>) -> String {
    m.keys().map(|k| format!("{k:?}")).collect::<Vec<_>>().join(", ")
}

/// A (nested) JSON list of numbers or booleans as a tensor of `spec`'s type, its rank checked.
fn tensor(value: &Value, spec: &crate::saved_model::TensorSpec, key: &str) -> Result<AnyTensor, String> {
    let mut dims = Vec::new();
    let mut at = value;
    while let Value::Array(items) = at {
        dims.push(items.len() as u64);
        match items.first() {
            Some(first) => at = first,
            None => break,
        }
    }
    if let Some(want) = &spec.dims {
        if want.len() != dims.len() {
            return Err(format!("input {key:?} must have rank {} (shape {want:?}), got shape {dims:?}", want.len()));
        }
        for (i, (&w, &d)) in want.iter().zip(&dims).enumerate() {
            if w >= 0 && w as u64 != d {
                return Err(format!("input {key:?}: dimension {i} must be {w}, got {d} (shape {dims:?})"));
            }
        }
    }
    let mut leaves = Vec::new();
    flatten(value, &dims, &mut leaves).map_err(|e| format!("input {key:?}: {e}"))?;
    let numbers = |what: &str| format!("input {key:?} is {what}: every value must be");
    let t = match spec.dtype {
        DataType::Float => {
            AnyTensor::F32(filled(&dims, &leaves, |v| v.as_f64().map(|x| x as f32), &numbers("float32"))?)
        }
        DataType::Double => AnyTensor::F64(filled(&dims, &leaves, Value::as_f64, &numbers("float64"))?),
        DataType::Int32 => AnyTensor::I32(filled(
            &dims,
            &leaves,
            |v| v.as_i64().and_then(|x| i32::try_from(x).ok()),
            &numbers("int32: an integer that fits"),
        )?),
        DataType::Int64 => AnyTensor::I64(filled(&dims, &leaves, Value::as_i64, &numbers("int64: an integer"))?),
        DataType::Bool => AnyTensor::Bool(filled(&dims, &leaves, Value::as_bool, &numbers("bool: true or false"))?),
        other => return Err(format!("input {key:?} is {other}, which this server does not take")),
    };
    Ok(t)
}

/// The leaves of a list nested as `dims` says, in row-major order; an error where it is ragged.
fn flatten<'a>(value: &'a Value, dims: &[u64], out: &mut Vec<&'a Value>) -> Result<(), String> {
    match (value, dims.split_first()) {
        (Value::Array(items), Some((&n, rest))) if items.len() as u64 == n => {
            items.iter().try_for_each(|item| flatten(item, rest, out))
        }
        (Value::Array(_), _) | (_, Some(_)) => Err("its lists are ragged (every list at a depth must have the same \
                                                    length and depth)"
            .into()),
        (leaf, None) => {
            out.push(leaf);
            Ok(())
        }
    }
}

fn filled<T: TensorType>(
    dims: &[u64],
    leaves: &[&Value],
    read: impl Fn(&Value) -> Option<T>,
    what: &str,
) -> Result<Tensor<T>, String> {
    let mut t = Tensor::new(dims);
    for (slot, leaf) in t.iter_mut().zip(leaves) {
        *slot = read(leaf).ok_or_else(|| format!("{what} (got {leaf})"))?;
    }
    Ok(t)
}

/// The answer to `predict`: `{"predictions": …}` (row format: a list with one entry per example,
/// each a value or, with several outputs, an object) or `{"outputs": …}` (columnar: a value or an
/// object). Errors are the message of a 400.
pub fn answer(format: Format, outputs: &[(String, AnyTensor)]) -> Result<String, String> {
    let mut out = String::new();
    match format {
        Format::Columnar => {
            out.push_str("{\"outputs\":");
            match outputs {
                [(_, t)] => write_tensor(&mut out, t, None),
                _ => object(&mut out, outputs, None),
            }
        }
        Format::Row => {
            let batch = outputs.first().and_then(|(_, t)| t.dims().first().copied());
            let Some(batch) = batch.filter(|&b| outputs.iter().all(|(_, t)| t.dims().first() == Some(&b))) else {
                return Err(
                    "the outputs do not share a batch dimension: ask in the columnar format (\"inputs\")".into()
                );
            };
            out.push_str("{\"predictions\":[");
            for row in 0..batch as usize {
                if row > 0 {
                    out.push(',');
                }
                match outputs {
                    [(_, t)] => write_tensor(&mut out, t, Some(row)),
                    _ => object(&mut out, outputs, Some(row)),
                }
            }
            out.push(']');
        }
    }
    out.push('}');
    Ok(out)
}

fn object(out: &mut String, outputs: &[(String, AnyTensor)], row: Option<usize>) {
    out.push('{');
    for (i, (key, t)) in outputs.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(&Value::String(key.clone()).to_string());
        out.push(':');
        write_tensor(out, t, row);
    }
    out.push('}');
}

/// `t` (or its row `row`) as nested lists.
fn write_tensor(out: &mut String, t: &AnyTensor, row: Option<usize>) {
    fn go<T: Leaf + TensorType>(out: &mut String, t: &Tensor<T>, row: Option<usize>) {
        let dims = t.dims();
        match row {
            None => nested(out, dims, t),
            Some(r) => {
                let size: u64 = dims[1..].iter().product();
                nested(out, &dims[1..], &t[r * size as usize..(r + 1) * size as usize]);
            }
        }
    }
    match t {
        AnyTensor::F32(t) => go(out, t, row),
        AnyTensor::F64(t) => go(out, t, row),
        AnyTensor::I32(t) => go(out, t, row),
        AnyTensor::I64(t) => go(out, t, row),
        AnyTensor::Bool(t) => go(out, t, row),
    }
}

fn nested<T: Leaf>(out: &mut String, dims: &[u64], values: &[T]) {
    let Some((&n, rest)) = dims.split_first() else {
        values[0].write(out);
        return;
    };
    let size = rest.iter().product::<u64>() as usize;
    out.push('[');
    for i in 0..n as usize {
        if i > 0 {
            out.push(',');
        }
        nested(out, rest, &values[i * size..(i + 1) * size]);
    }
    out.push(']');
}

/// A value as JSON. Floats in their shortest form that reads back the same; NaN and infinities
/// as TensorFlow Serving writes them (`NaN`, `Infinity`, `-Infinity`: Python's `json` reads them).
trait Leaf {
    fn write(&self, out: &mut String);
}

macro_rules! float_leaf {
    ($t:ty) => {
        impl Leaf for $t {
            fn write(&self, out: &mut String) {
                let _ = match *self {
                    v if v.is_nan() => write!(out, "NaN"),
                    v if v.is_infinite() => write!(out, "{}Infinity", if v < 0.0 { "-" } else { "" }),
                    v => write!(out, "{v:?}"),
                };
            }
        }
    };
}
float_leaf!(f32);
float_leaf!(f64);

macro_rules! plain_leaf {
    ($($t:ty),*) => {$(
        impl Leaf for $t {
            fn write(&self, out: &mut String) {
                let _ = write!(out, "{self}");
            }
        }
    )*};
}
plain_leaf!(i32, i64, bool);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::saved_model::TensorSpec;
    use serde_json::json;

    fn signature(inputs: &[(&str, DataType, Option<Vec<i64>>)]) -> Signature {
        let spec = |dtype, dims: &Option<Vec<i64>>| TensorSpec { name: "x:0".into(), dtype, dims: dims.clone() };
        Signature {
            method_name: "tensorflow/serving/predict".into(),
            inputs: inputs.iter().map(|(k, t, d)| (k.to_string(), spec(*t, d))).collect(),
            outputs: BTreeMap::new(),
        }
    }

    fn parse(body: Value, sig: &Signature) -> Result<Vec<(String, AnyTensor)>, String> {
        crate::library::load(false).unwrap();
        request(body.as_object().unwrap(), sig).map(|(_, inputs)| inputs)
    }

    #[test]
    fn rows_and_columns_of_one_input_give_one_batch() {
        let sig = signature(&[("tokens", DataType::Int32, Some(vec![-1, -1]))]);
        for body in [
            json!({"instances": [[1, 2], [3, 4]]}),
            json!({"inputs": [[1, 2], [3, 4]]}),
            json!({"inputs": {"tokens": [[1, 2], [3, 4]]}}),
            json!({"instances": [{"tokens": [1, 2]}, {"tokens": [3, 4]}]}),
        ] {
            let inputs = parse(body, &sig).unwrap();
            let AnyTensor::I32(t) = &inputs[0].1 else { panic!() };
            assert_eq!((inputs[0].0.as_str(), t.dims(), &t[..]), ("tokens", &[2u64, 2][..], &[1, 2, 3, 4][..]));
        }
    }

    #[test]
    fn bad_requests_name_the_problem() {
        let sig = signature(&[("tokens", DataType::Int32, Some(vec![-1, -1]))]);
        let cases = [
            (json!({"instances": [[1, 2], [3]]}), "ragged"),
            (json!({"instances": [[1.5, 2]]}), "int32"),
            (json!({"instances": [["a"]]}), "int32"),
            (json!({"instances": [[3000000000i64]]}), "fits"),
            (json!({"instances": [1, 2]}), "rank 2"),
            (json!({"instances": []}), "empty"),
            (json!({"instances": [[1]], "inputs": [[1]]}), "not both"),
            (json!({"instance": [[1]]}), "unknown field \"instance\""),
            (json!({"inputs": {"tokenz": [[1]]}}), "no input \"tokenz\""),
            (json!({}), "missing"),
        ];
        for (body, needle) in cases {
            let e = parse(body.clone(), &sig).err().unwrap_or_else(|| panic!("{body} was accepted"));
            assert!(e.contains(needle), "{body}: {e}");
        }
        let two = signature(&[("a", DataType::Float, None), ("b", DataType::Bool, None)]);
        assert!(parse(json!({"instances": [1.0]}), &two).unwrap_err().contains("2 inputs"));
        assert!(parse(json!({"inputs": {"a": 1.0}}), &two).unwrap_err().contains("\"b\" is missing"));
        let inputs = parse(json!({"inputs": {"a": [1.0, 2.5], "b": true}}), &two).unwrap();
        assert!(matches!(&inputs[1].1, AnyTensor::Bool(t) if t.dims().is_empty() && t[0]));
    }

    #[test]
    fn answers_read_back_as_the_same_floats() {
        crate::library::load(false).unwrap();
        let t = Tensor::new(&[2, 2]).with_values(&[0.1f32, -1e-30, f32::NAN, f32::NEG_INFINITY]).unwrap();
        let one = [("logits".to_string(), AnyTensor::F32(t.clone()))];
        assert_eq!(answer(Format::Row, &one).unwrap(), "{\"predictions\":[[0.1,-1e-30],[NaN,-Infinity]]}");
        assert_eq!(answer(Format::Columnar, &one).unwrap(), "{\"outputs\":[[0.1,-1e-30],[NaN,-Infinity]]}");
        let ids = Tensor::new(&[2]).with_values(&[7i64, 8]).unwrap();
        let two = [("logits".to_string(), AnyTensor::F32(t)), ("ids".to_string(), AnyTensor::I64(ids))];
        assert_eq!(
            answer(Format::Row, &two).unwrap(),
            "{\"predictions\":[{\"logits\":[0.1,-1e-30],\"ids\":7},{\"logits\":[NaN,-Infinity],\"ids\":8}]}"
        );
        let x = 0.1f32 + f32::EPSILON;
        let mut s = String::new();
        x.write(&mut s);
        assert_eq!(s.parse::<f32>().unwrap(), x);
    }
}
