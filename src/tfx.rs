//! What the `tensorflow` crate lacks: resource variables, list-input ops, constants, TensorFlow's
//! checkpoint reader and the text form of a graph (C API calls the crate does not bind).

use tensorflow_sys_runtime as tf_sys;

use crate::library::{self, CheckpointReader as TfCheckpointReader};

use tensorflow::{ops, DataType, Graph, Operation, Output, Scope, Shape, Status, Tensor, TensorType};

/// A resource variable (`VarHandleOp`), as Keras and `tf.Variable` make them.
#[derive(Debug, Clone)]
pub struct Var {
    /// The variable's name: its op name, shared name and checkpoint key, e.g. `dense/kernel`.
    pub name: String,
    pub handle: Output,
    pub dtype: DataType,
    pub shape: Vec<u64>,
    /// Assigns the initial value.
    pub initializer: Operation,
}

impl Var {
    /// Creates the variable `name` (absolute, not prefixed by the scope) initialised by `init`.
    pub fn new(name: &str, dtype: DataType, shape: &[u64], init: Output, scope: &mut Scope) -> tensorflow::Result<Var> {
        let tf_shape = Shape::from(Some(shape.iter().map(|&d| Some(d as i64)).collect::<Vec<_>>()));
        let handle = ops::VarHandleOp::new()
            .dtype(dtype)
            .shape(tf_shape)
            .shared_name(name)
            .build(&mut scope.with_op_name(name))?;
        let initializer =
            ops::assign_variable_op(handle.clone(), init, &mut scope.with_op_name(&format!("{name}/Assign")))?;
        Ok(Var { name: name.to_string(), handle: handle.into(), dtype, shape: shape.to_vec(), initializer })
    }

    /// A zero-initialised variable shaped like `self` (an optimizer slot).
    pub fn zeros_like(&self, name: &str, scope: &mut Scope) -> tensorflow::Result<Var> {
        let zeros = zeros(self.dtype, &self.shape, &mut scope.with_op_name(&format!("{name}/Initializer")))?;
        Var::new(name, self.dtype, &self.shape, zeros, scope)
    }

    /// `ReadVariableOp`: the variable's current value.
    pub fn read(&self, scope: &mut Scope) -> tensorflow::Result<Output> {
        Ok(ops::ReadVariableOp::new().dtype(self.dtype).build(self.handle.clone(), scope)?.into())
    }

    /// The variable's value in `dtype`, the dtype a layer computes in (Keras' autocast).
    pub fn read_as(&self, dtype: DataType, scope: &mut Scope) -> tensorflow::Result<Output> {
        cast(self.read(scope)?, dtype, scope)
    }
}

/// A constant `[n]` int32 shape tensor.
pub fn shape_const(dims: &[i64], scope: &mut Scope) -> tensorflow::Result<Output> {
    let dims: Vec<i32> = dims.iter().map(|&d| d as i32).collect();
    let t = Tensor::new(&[dims.len() as u64]).with_values(&dims)?;
    Ok(ops::constant(t, scope)?.into())
}

/// A constant tensor of `dtype` filled with zeros.
pub fn zeros(dtype: DataType, shape: &[u64], scope: &mut Scope) -> tensorflow::Result<Output> {
    let dims: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
    let dims = shape_const(&dims, scope)?;
    let zero = scalar(dtype, 0.0, scope)?;
    Ok(ops::fill(dims, zero, scope)?.into())
}

/// A float scalar constant of `dtype` (double, float, or float16 and bfloat16 rounded from the
/// float, as Python's `tf.cast` of a number does).
pub fn scalar(dtype: DataType, value: f64, scope: &mut Scope) -> tensorflow::Result<Output> {
    Ok(match dtype {
        DataType::Double => ops::constant(value, scope)?.into(),
        DataType::BFloat16 | DataType::Half => cast(ops::constant(value as f32, scope)?.into(), dtype, scope)?,
        _ => ops::constant(value as f32, scope)?.into(),
    })
}

/// `x` in `dtype`: a `Cast`, unless it is of `dtype` already.
pub fn cast(x: Output, dtype: DataType, scope: &mut Scope) -> tensorflow::Result<Output> {
    if dtype_of(&x) == dtype {
        return Ok(x);
    }
    Ok(ops::Cast::new().DstT(dtype).build(x, scope)?.into())
}

/// The element type of `x`.
pub fn dtype_of(x: &Output) -> DataType {
    x.operation.output_type(x.index as usize)
}

/// A constant of any tensor type.
pub fn constant<T: TensorType>(values: &[T], dims: &[u64], scope: &mut Scope) -> tensorflow::Result<Output> {
    Ok(ops::constant(Tensor::new(dims).with_values(values)?, scope)?.into())
}

/// A placeholder with a name, dtype and shape (`-1` for unknown dimensions).
pub fn placeholder(name: &str, dtype: DataType, dims: &[i64], scope: &mut Scope) -> tensorflow::Result<Operation> {
    let shape = Shape::from(Some(dims.iter().map(|&d| (d >= 0).then_some(d)).collect::<Vec<_>>()));
    ops::Placeholder::new().dtype(dtype).shape(shape).build(&mut scope.with_op_name(name))
}

/// A scalar `PlaceholderWithDefault`: `default` unless fed.
pub fn scalar_with_default(name: &str, default: Output, scope: &mut Scope) -> tensorflow::Result<Output> {
    Ok(ops::PlaceholderWithDefault::new()
        .shape(Shape::from(Some(vec![])))
        .build(default, &mut scope.with_op_name(name))?
        .into())
}

/// Groups operations under one `NoOp` target.
pub fn group(name: &str, deps: &[Operation], scope: &mut Scope) -> tensorflow::Result<Operation> {
    let mut s = scope.with_op_name(name).with_control_dependencies(deps);
    ops::no_op(&mut s)
}

/// `ConcatV2` of `values` along `axis` (the crate's generated builder cannot take a list input).
pub fn concat(values: &[Output], axis: i32, scope: &mut Scope) -> tensorflow::Result<Output> {
    let axis = ops::constant(axis, scope)?;
    let name = scope.get_unique_name_for_op("concat");
    let mut graph = scope.graph_mut();
    let mut nd = graph.new_operation("ConcatV2", &name)?;
    nd.add_input_list(values);
    nd.add_input(axis);
    Ok(nd.finish()?.into())
}

/// `a · b` kept out of XLA's clusters (`_XlaCompile = false`): TensorFlow's own kernel runs it
/// even where the graph around it is compiled.
pub fn mat_mul_outside_xla(a: Output, b: Output, scope: &mut Scope) -> tensorflow::Result<Output> {
    let name = scope.get_unique_name_for_op("MatMul");
    let mut graph = scope.graph_mut();
    let mut nd = graph.new_operation("MatMul", &name)?;
    nd.add_input(a);
    nd.add_input(b);
    nd.set_attr_bool("_XlaCompile", false)?;
    Ok(nd.finish()?.into())
}

/// The `tensor_names` and `shape_and_slices` inputs of `SaveV2` and `RestoreV2` (`<name>/...`):
/// every tensor whole.
fn checkpoint_keys(name: &str, names: &[String], scope: &mut Scope) -> tensorflow::Result<(Output, Output)> {
    let n = names.len() as u64;
    let keys = constant(names, &[n], &mut scope.with_op_name(&format!("{name}/tensor_names")))?;
    let whole = vec![String::new(); names.len()];
    let slices = constant(&whole, &[n], &mut scope.with_op_name(&format!("{name}/shape_and_slices")))?;
    Ok((keys, slices))
}

/// `save/SaveV2` of `tensors` under `names` at the string scalar `prefix` (the crate's generated
/// builder cannot take a list input).
pub fn save_v2(
    prefix: Output,
    names: &[String],
    tensors: &[Output],
    scope: &mut Scope,
) -> tensorflow::Result<Operation> {
    let (keys, slices) = checkpoint_keys("save", names, scope)?;
    let mut graph = scope.graph_mut();
    let mut nd = graph.new_operation("SaveV2", "save/SaveV2")?;
    nd.add_input(prefix);
    nd.add_input(keys);
    nd.add_input(slices);
    nd.add_input_list(tensors);
    nd.finish()
}

/// `<name>/RestoreV2` of `names` (with `dtypes`) from the string scalar `prefix`.
pub fn restore_v2(
    name: &str,
    prefix: Output,
    names: &[String],
    dtypes: &[DataType],
    scope: &mut Scope,
) -> tensorflow::Result<Operation> {
    let (keys, slices) = checkpoint_keys(name, names, scope)?;
    ops::RestoreV2::new().dtypes(dtypes.to_vec()).build(
        prefix,
        keys,
        slices,
        &mut scope.with_op_name(&format!("{name}/RestoreV2")),
    )
}

/// One entry of a checkpoint: its key, dtype and shape.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckpointEntry {
    pub key: String,
    pub dtype: DataType,
    pub shape: Vec<i64>,
}

/// TensorFlow's checkpoint reader (V1 or V2 checkpoints, by prefix): lists keys, reads tensors.
pub struct CheckpointReader {
    raw: *mut TfCheckpointReader,
}

/// A `TF_Status` for the C calls the crate does not bind, deleted when dropped.
pub(crate) struct OwnedStatus(*mut tf_sys::TF_Status);

impl OwnedStatus {
    pub(crate) fn new() -> Self {
        // SAFETY: a fresh status object, owned by this value.
        Self(unsafe { tf_sys::TF_NewStatus() })
    }

    pub(crate) fn raw(&self) -> *mut tf_sys::TF_Status {
        self.0
    }

    /// The error message, if the call that filled the status failed.
    pub(crate) fn error(&self) -> Option<String> {
        // SAFETY: the status is alive; its message is copied.
        unsafe {
            (tf_sys::TF_GetCode(self.0) != tf_sys::TF_OK)
                .then(|| std::ffi::CStr::from_ptr(tf_sys::TF_Message(self.0)).to_string_lossy().into_owned())
        }
    }

    /// An error as a damaged checkpoint reports it.
    fn data_loss(&self) -> Result<(), Status> {
        self.error().map_or(Ok(()), |m| Err(Status::new_set_lossy(tensorflow::Code::DataLoss, &m)))
    }
}

impl Drop for OwnedStatus {
    fn drop(&mut self) {
        // SAFETY: created by TF_NewStatus, deleted once.
        unsafe { tf_sys::TF_DeleteStatus(self.0) }
    }
}

impl CheckpointReader {
    pub fn open(prefix: &str) -> Result<Self, Status> {
        let name = std::ffi::CString::new(prefix)
            .map_err(|_| Status::new_set_lossy(tensorflow::Code::InvalidArgument, "checkpoint path contains NUL"))?;
        let status = OwnedStatus::new();
        // SAFETY: the reader is owned by the returned value.
        let raw = unsafe { (library::extra().TF_NewCheckpointReader)(name.as_ptr(), status.raw()) };
        status.data_loss()?;
        Ok(Self { raw })
    }

    /// Every entry, in the reader's order.
    pub fn entries(&self) -> Result<Vec<CheckpointEntry>, Status> {
        // SAFETY: the reader is live; names are copied out.
        unsafe {
            let n = (library::extra().TF_CheckpointReaderSize)(self.raw);
            let mut entries = Vec::with_capacity(n.max(0) as usize);
            for i in 0..n {
                let key_ptr = (library::extra().TF_CheckpointReaderGetVariable)(self.raw, i);
                let key = std::ffi::CStr::from_ptr(key_ptr).to_string_lossy().into_owned();
                let dtype = match (library::extra().TF_CheckpointReaderGetVariableDataType)(self.raw, key_ptr) {
                    tf_sys::TF_FLOAT => DataType::Float,
                    tf_sys::TF_DOUBLE => DataType::Double,
                    tf_sys::TF_INT32 => DataType::Int32,
                    tf_sys::TF_INT64 => DataType::Int64,
                    tf_sys::TF_STRING => DataType::String,
                    other => DataType::UnrecognizedEnumValue(other as _),
                };
                let rank = (library::extra().TF_CheckpointReaderGetVariableNumDims)(self.raw, key_ptr);
                let mut shape = vec![0i64; rank.max(0) as usize];
                let status = OwnedStatus::new();
                (library::extra().TF_CheckpointReaderGetVariableShape)(
                    self.raw,
                    key_ptr,
                    shape.as_mut_ptr(),
                    rank,
                    status.raw(),
                );
                status.data_loss()?;
                entries.push(CheckpointEntry { key, dtype, shape });
            }
            Ok(entries)
        }
    }

    /// Reads every entry once, so that a truncated or corrupt data file (each tensor carries a
    /// checksum) is found even where a restore of some of its entries would not look.
    pub fn verify(&self) -> Result<(), Status> {
        for entry in self.entries()? {
            self.tensor(&entry.key)
                .map_err(|e| Status::new_set_lossy(tensorflow::Code::DataLoss, &format!("{}: {e}", entry.key)))?;
        }
        Ok(())
    }

    /// The tensor stored under `key`, as TensorFlow returns it.
    fn tensor(&self, key: &str) -> Result<OwnedTensor, Status> {
        let name = std::ffi::CString::new(key)
            .map_err(|_| Status::new_set_lossy(tensorflow::Code::InvalidArgument, "key contains NUL"))?;
        let status = OwnedStatus::new();
        // SAFETY: the returned TF_Tensor is owned by the result.
        let owned = OwnedTensor(unsafe {
            (library::extra().TF_CheckpointReaderGetTensor)(self.raw, name.as_ptr(), status.raw())
        });
        status.data_loss()?;
        Ok(owned)
    }

    /// The bytes of the scalar string stored under `key` (e.g. a serialized protobuf).
    pub fn bytes(&self, key: &str) -> Result<Vec<u8>, Status> {
        let t = self.tensor(key)?;
        // SAFETY: `t.0` is a live TF_Tensor; a scalar TF_STRING's data is one TF_TString, whose
        // bytes are copied out.
        unsafe {
            let raw = t.0;
            if tf_sys::TF_TensorType(raw) != tf_sys::TF_STRING || tf_sys::TF_NumDims(raw) != 0 {
                let message = format!("checkpoint entry {key} is not a scalar string");
                return Err(Status::new_set_lossy(tensorflow::Code::InvalidArgument, &message));
            }
            let tstring = tf_sys::TF_TensorData(raw) as *const tf_sys::TF_TString;
            let data = tf_sys::TF_StringGetDataPointer(tstring) as *const u8;
            Ok(std::slice::from_raw_parts(data, tf_sys::TF_StringGetSize(tstring)).to_vec())
        }
    }

    /// The float32 tensor stored under `key`.
    pub fn tensor_f32(&self, key: &str) -> Result<Tensor<f32>, Status> {
        let t = self.tensor(key)?;
        // SAFETY: `t.0` is a live TF_Tensor; its data is copied only if dtype and size match.
        unsafe {
            let raw = t.0;
            let dims: Vec<u64> = (0..tf_sys::TF_NumDims(raw)).map(|d| tf_sys::TF_Dim(raw, d) as u64).collect();
            let mut out = Tensor::<f32>::new(&dims);
            let ok = tf_sys::TF_TensorType(raw) == tf_sys::TF_FLOAT && tf_sys::TF_TensorByteSize(raw) == out.len() * 4;
            if !ok {
                let message = format!("checkpoint entry {key} is not a float32 tensor");
                return Err(Status::new_set_lossy(tensorflow::Code::InvalidArgument, &message));
            }
            std::ptr::copy_nonoverlapping(tf_sys::TF_TensorData(raw) as *const f32, out.as_mut_ptr(), out.len());
            Ok(out)
        }
    }
}

/// A `TF_Tensor` the checkpoint reader returned, deleted on drop.
struct OwnedTensor(*mut tf_sys::TF_Tensor);

impl Drop for OwnedTensor {
    fn drop(&mut self) {
        if !self.0.is_null() {
            // SAFETY: a TF_Tensor this value owns, deleted once.
            unsafe { tf_sys::TF_DeleteTensor(self.0) }
        }
    }
}

impl Drop for CheckpointReader {
    fn drop(&mut self) {
        // SAFETY: `raw` came from TF_NewCheckpointReader and is deleted once.
        unsafe { (library::extra().TF_DeleteCheckpointReader)(self.raw) }
    }
}

/// The graph as a text-format `GraphDef` (TensorFlow's own printer).
pub fn graph_text(graph: &Graph) -> Result<String, Status> {
    let bytes = graph.graph_def()?;
    // SAFETY: every object made here is deleted before returning; the debug string is malloc'ed
    // by TensorFlow and freed with free().
    unsafe {
        let status = tf_sys::TF_NewStatus();
        let raw = tf_sys::TF_NewGraph();
        let buffer = tf_sys::TF_NewBufferFromString(bytes.as_ptr() as *const _, bytes.len());
        let options = tf_sys::TF_NewImportGraphDefOptions();
        tf_sys::TF_GraphImportGraphDef(raw, buffer, options, status);
        let ok = tf_sys::TF_GetCode(status) == tf_sys::TF_OK;
        let text = if ok {
            let mut len = 0usize;
            let ptr = (library::extra().TF_GraphDebugString)(raw, &mut len);
            let text = String::from_utf8_lossy(std::slice::from_raw_parts(ptr as *const u8, len))
                .lines()
                // Newer protobuf marks debug output with a first line (varying) that is not text format.
                .filter(|l| !l.starts_with("goo.gle/debug"))
                .fold(String::new(), |acc, l| acc + l + "\n");
            libc::free(ptr as *mut _);
            Some(text)
        } else {
            None
        };
        tf_sys::TF_DeleteImportGraphDefOptions(options);
        tf_sys::TF_DeleteBuffer(buffer);
        tf_sys::TF_DeleteGraph(raw);
        tf_sys::TF_DeleteStatus(status);
        text.ok_or_else(|| Status::new_set_lossy(tensorflow::Code::Internal, "could not re-import the graph"))
    }
}

/// A tensor of one of the types a signature's inputs and outputs may have where minigpt serves
/// them (TensorFlow Serving's REST API): numbers and booleans.
#[derive(Debug, Clone)]
pub enum AnyTensor {
    F32(Tensor<f32>),
    F64(Tensor<f64>),
    I32(Tensor<i32>),
    I64(Tensor<i64>),
    Bool(Tensor<bool>),
}

impl AnyTensor {
    pub fn dtype(&self) -> DataType {
        match self {
            Self::F32(_) => DataType::Float,
            Self::F64(_) => DataType::Double,
            Self::I32(_) => DataType::Int32,
            Self::I64(_) => DataType::Int64,
            Self::Bool(_) => DataType::Bool,
        }
    }

    pub fn dims(&self) -> &[u64] {
        match self {
            Self::F32(t) => t.dims(),
            Self::F64(t) => t.dims(),
            Self::I32(t) => t.dims(),
            Self::I64(t) => t.dims(),
            Self::Bool(t) => t.dims(),
        }
    }

    /// Feeds `self` to `output` of a run.
    pub fn feed<'a>(&'a self, args: &mut tensorflow::SessionRunArgs<'a>, output: &Output) {
        match self {
            Self::F32(t) => args.add_feed(&output.operation, output.index, t),
            Self::F64(t) => args.add_feed(&output.operation, output.index, t),
            Self::I32(t) => args.add_feed(&output.operation, output.index, t),
            Self::I64(t) => args.add_feed(&output.operation, output.index, t),
            Self::Bool(t) => args.add_feed(&output.operation, output.index, t),
        }
    }

    /// The fetched tensor `token` of a run, read as `dtype`; `None` for a type it does not hold.
    pub fn fetch(
        args: &mut tensorflow::SessionRunArgs<'_>,
        token: tensorflow::FetchToken,
        dtype: DataType,
    ) -> Option<Result<Self, Status>> {
        Some(match dtype {
            DataType::Float => args.fetch(token).map(Self::F32),
            DataType::Double => args.fetch(token).map(Self::F64),
            DataType::Int32 => args.fetch(token).map(Self::I32),
            DataType::Int64 => args.fetch(token).map(Self::I64),
            DataType::Bool => args.fetch(token).map(Self::Bool),
            _ => return None,
        })
    }
}
