//! TensorFlow's C library, loaded at run time (`dlopen`) instead of linked at build time, and the
//! C functions the `tensorflow` crate does not bind.
//!
//! Linked at build time, the library would run its initialisers before `main`, and they print two
//! lines on stderr (absl's "All log messages before absl::InitializeLog()" and the oneDNN notice)
//! whatever `TF_CPP_MIN_LOG_LEVEL` says. Loaded here, after the command line is read, its logging
//! level is set first and stderr is parked on `/dev/null` while it loads, unless `-v` asks for
//! TensorFlow's messages. Every TensorFlow call of the crate goes through tensorflow-sys-runtime's
//! table of functions, filled by [`load`]: call it once before anything touches TensorFlow.

use std::ffi::{c_char, c_void, CStr, CString};
use std::sync::OnceLock;

use anyhow::{anyhow, Result};
use tensorflow_sys_runtime as tf_sys;

/// The wheel's `libtensorflow_cc.so.2` and `libtensorflow_framework.so.2` (real paths, build.rs).
const LIBRARY: &str = env!("MINIGPT_TF_LIBRARY");
const FRAMEWORK: &str = env!("MINIGPT_TF_FRAMEWORK");
/// `.tf/lib`, where the library is also `libtensorflow.so`, the name tensorflow-sys-runtime loads.
const LINKS: &str = env!("MINIGPT_TF_LINKS");
/// CUDA's solver library of the CUDA wheel, or empty (build.rs says why it is loaded first).
const CUSOLVER: &str = env!("MINIGPT_CUSOLVER");

/// The C functions TensorFlow exports and tensorflow-sys-runtime does not bind.
#[allow(non_snake_case)]
pub(crate) struct Extra {
    // From TensorFlow's c_api_experimental.h.
    pub TF_GraphDebugString: unsafe extern "C" fn(*mut tf_sys::TF_Graph, *mut usize) -> *mut c_char,
    // From tensorflow/c/checkpoint_reader.h.
    pub TF_NewCheckpointReader: unsafe extern "C" fn(*const c_char, *mut tf_sys::TF_Status) -> *mut CheckpointReader,
    pub TF_DeleteCheckpointReader: unsafe extern "C" fn(*mut CheckpointReader),
    pub TF_CheckpointReaderSize: unsafe extern "C" fn(*mut CheckpointReader) -> i32,
    pub TF_CheckpointReaderGetVariable: unsafe extern "C" fn(*mut CheckpointReader, i32) -> *const c_char,
    pub TF_CheckpointReaderGetVariableDataType:
        unsafe extern "C" fn(*mut CheckpointReader, *const c_char) -> tf_sys::TF_DataType,
    pub TF_CheckpointReaderGetVariableNumDims: unsafe extern "C" fn(*mut CheckpointReader, *const c_char) -> i32,
    pub TF_CheckpointReaderGetVariableShape:
        unsafe extern "C" fn(*mut CheckpointReader, *const c_char, *mut i64, i32, *mut tf_sys::TF_Status),
    pub TF_CheckpointReaderGetTensor:
        unsafe extern "C" fn(*mut CheckpointReader, *const c_char, *mut tf_sys::TF_Status) -> *mut tf_sys::TF_Tensor,
}

/// TensorFlow's `TF_CheckpointReader` (opaque).
#[repr(C)]
pub(crate) struct CheckpointReader {
    _private: [u8; 0],
}

static LOADED: OnceLock<Result<Extra, String>> = OnceLock::new();

/// Loads TensorFlow once per process; later calls return the first call's outcome. `verbose` lets
/// TensorFlow's own log through (level 0, stderr left open while it loads); otherwise its level is
/// 3 (errors hidden too: minigpt reports every failure itself, and TensorFlow's gRPC runtime logs
/// each unreachable worker as an error while minigpt waits for it) unless `TF_CPP_MIN_LOG_LEVEL`
/// is already set.
pub fn load(verbose: bool) -> Result<()> {
    match LOADED.get_or_init(|| open(verbose)) {
        Ok(_) => Ok(()),
        Err(e) => Err(anyhow!("{e}")),
    }
}

/// The functions [`Extra`] names, from the library [`load`] opened.
pub(crate) fn extra() -> &'static Extra {
    match LOADED.get() {
        Some(Ok(extra)) => extra,
        _ => panic!("TensorFlow is used before minigpt::library::load"),
    }
}

fn open(verbose: bool) -> Result<Extra, String> {
    let level = match (std::env::var("TF_CPP_MIN_LOG_LEVEL").ok(), verbose) {
        (None, false) => Some("3"),
        (Some(level), true) if level != "0" => Some("0"),
        (None, true) => Some("0"),
        _ => None,
    };
    if let Some(level) = level {
        std::env::set_var("TF_CPP_MIN_LOG_LEVEL", level);
    }
    std::env::set_var("TENSORFLOW_DIR", LINKS);
    // XLA's auto-clustering on the CPU needs this flag, which TensorFlow reads once per process,
    // when the first session optimizes its graph (with or without XLA): set before any session,
    // it lets the sessions that ask for XLA (`global_jit_level`) compile; the others compile nothing.
    let flags = std::env::var("TF_XLA_FLAGS").unwrap_or_default();
    if !flags.contains("--tf_xla_cpu_global_jit") {
        std::env::set_var("TF_XLA_FLAGS", format!("{flags} --tf_xla_cpu_global_jit").trim());
    }
    let _parked = (!verbose).then(ParkedStderr::new);
    if !CUSOLVER.is_empty() {
        dlopen(CUSOLVER)?;
    }
    dlopen(FRAMEWORK)?;
    let handle = dlopen(LIBRARY)?;
    // The same file again (through `.tf/lib`): the loader returns the object already loaded.
    tensorflow::library::load().map_err(|e| format!("loading TensorFlow from {LINKS}: {e}"))?;
    let symbol = |name: &str| -> Result<*mut c_void, String> {
        let c_name = CString::new(name).expect("symbol names have no NUL");
        // SAFETY: `handle` is a live dlopen handle; dlsym only looks the name up.
        let ptr = unsafe { libc::dlsym(handle, c_name.as_ptr()) };
        if ptr.is_null() {
            return Err(format!("{LIBRARY} has no function {name}: not the TensorFlow minigpt was built for"));
        }
        Ok(ptr)
    };
    // Each field gets the function of its own name; the field's type is the transmute's target.
    macro_rules! resolve {
        ($($name:ident),*) => {
            Extra { $(
                // SAFETY: the pointer is TensorFlow's C function of that name, whose C signature
                // the field's type spells.
                #[allow(clippy::missing_transmute_annotations)]
                $name: unsafe { std::mem::transmute(symbol(stringify!($name))?) },
            )* }
        };
    }
    Ok(resolve!(
        TF_GraphDebugString,
        TF_NewCheckpointReader,
        TF_DeleteCheckpointReader,
        TF_CheckpointReaderSize,
        TF_CheckpointReaderGetVariable,
        TF_CheckpointReaderGetVariableDataType,
        TF_CheckpointReaderGetVariableNumDims,
        TF_CheckpointReaderGetVariableShape,
        TF_CheckpointReaderGetTensor
    ))
}

/// `dlopen(path, RTLD_LAZY | RTLD_GLOBAL)`, kept open for the life of the process. Lazily bound,
/// the library's own calls are resolved as they are first made, not all at load (of the
/// TensorFlow wheel's hundreds of thousands, a command makes few): `minigpt info` took 0.20 s
/// here against 0.27 s with `RTLD_NOW`.
fn dlopen(path: &str) -> Result<*mut c_void, String> {
    let c_path = CString::new(path).map_err(|_| format!("{path}: path contains NUL"))?;
    // SAFETY: plain dlopen/dlerror; the message is copied before any other dl call.
    unsafe {
        let handle = libc::dlopen(c_path.as_ptr(), libc::RTLD_LAZY | libc::RTLD_GLOBAL);
        if handle.is_null() {
            let why = libc::dlerror();
            let why = if why.is_null() { "unknown error".into() } else { CStr::from_ptr(why).to_string_lossy() };
            return Err(format!("cannot load TensorFlow ({why}); run `make setup`"));
        }
        Ok(handle)
    }
}

/// stderr pointed at `/dev/null` until dropped.
struct ParkedStderr(i32);

impl ParkedStderr {
    fn new() -> Self {
        // SAFETY: descriptor juggling on this process's own stderr, undone in `drop`.
        unsafe {
            let saved = libc::fcntl(2, libc::F_DUPFD_CLOEXEC, 3);
            let null = libc::open(c"/dev/null".as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if saved >= 0 && null >= 0 {
                libc::dup2(null, 2);
            }
            if null >= 0 {
                libc::close(null);
            }
            Self(saved)
        }
    }
}

impl Drop for ParkedStderr {
    fn drop(&mut self) {
        if self.0 >= 0 {
            // SAFETY: `self.0` is the duplicate of stderr made in `new`.
            unsafe {
                libc::dup2(self.0, 2);
                libc::close(self.0);
            }
        }
    }
}
