//! Finds the TensorFlow C library in `.tf/lib` (made by `make setup` from the pip wheel) and
//! records where it is for `library.rs`, which loads it at run time (nothing links it at build
//! time, so nothing of TensorFlow runs before `main`); and generates TensorFlow's protobuf types
//! from `proto/tensorflow.fds.pb` (the descriptors of the pinned wheel, written by
//! `python_export/proto_descriptors.py`) with prost-build, no protoc.
//!
//! `.tf/lib` holds symlinks under the names tensorflow-sys-runtime looks for; the library is
//! loaded first by its real path, not through `.tf/lib`: the wheel's libraries find their
//! neighbours (CUDA's `libcudart.so.12`, cuDNN, ...) through RUNPATH entries relative to
//! `$ORIGIN`, which the loader takes from the path it loaded them by.

use std::path::{Path, PathBuf};
use std::process::exit;

use prost::Message;

fn main() {
    // The executable's own `bind` is the one TensorFlow's gRPC server resolves (src/listen.rs).
    println!("cargo:rustc-link-arg=-Wl,--export-dynamic-symbol=bind");
    link_tensorflow();
    generate_protos();
}

fn link_tensorflow() {
    println!("cargo:rerun-if-env-changed=MINIGPT_TF_LIB");
    let lib_dir = match std::env::var_os("MINIGPT_TF_LIB") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap()).join(".tf/lib"),
    };
    println!("cargo:rerun-if-changed={}", lib_dir.display());
    let macos = cfg!(target_os = "macos");
    let lib = lib_dir.join(if macos { "libtensorflow.dylib" } else { "libtensorflow.so" });
    let framework = lib_dir.join(if macos { "libtensorflow_framework.dylib" } else { "libtensorflow_framework.so" });
    let (Ok(real_lib), Ok(real_framework)) = (lib.canonicalize(), framework.canonicalize()) else {
        eprintln!("error: TensorFlow C library not found at {}: run `make setup` first", lib.display());
        exit(1);
    };
    let lib_dir = lib_dir.canonicalize().unwrap_or(lib_dir);
    println!("cargo:rustc-env=MINIGPT_TF_LINKS={}", lib_dir.display());
    println!("cargo:rustc-env=MINIGPT_TF_LIBRARY={}", real_lib.display());
    println!("cargo:rustc-env=MINIGPT_TF_FRAMEWORK={}", real_framework.display());
    // Where the wheel's TensorFlow is: minigpt looks beside it for CUDA (device diagnostics, XLA's ptxas).
    let tf_dir = real_lib.parent().unwrap();
    println!("cargo:rustc-env=MINIGPT_TF_DIR={}", tf_dir.display());
    // The CUDA wheel (tensorflow[and-cuda]): once it has found a GPU, TensorFlow dlopens CUDA's
    // libraries from libtensorflow_framework.so.2, whose RUNPATH (2.21) lists every nvidia/ folder
    // but cuSOLVER's; failing to load one, it registers no GPU. Loaded before TensorFlow (a library
    // of the same soname already loaded is what dlopen returns), it is found.
    let cusolver = cusolver(real_framework.parent().unwrap()).map(|p| p.display().to_string()).unwrap_or_default();
    println!("cargo:rustc-env=MINIGPT_CUSOLVER={cusolver}");
}

/// `libcusolver.so.N` of the CUDA wheel installed next to TensorFlow's folder `tf_dir`, if any.
fn cusolver(tf_dir: &Path) -> Option<PathBuf> {
    let dir = tf_dir.join("../nvidia/cusolver/lib").canonicalize().ok()?;
    let mut found: Vec<PathBuf> = std::fs::read_dir(&dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            name.strip_prefix("libcusolver.so.").is_some_and(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
        })
        .collect();
    found.sort();
    found.pop()
}

fn generate_protos() {
    const FDS: &str = "proto/tensorflow.fds.pb";
    println!("cargo:rerun-if-changed={FDS}");
    let fail = |what: String| -> ! {
        eprintln!("error: {what}");
        exit(1);
    };
    let bytes = std::fs::read(FDS).unwrap_or_else(|e| fail(format!("reading {FDS}: {e}")));
    let fds = prost_types::FileDescriptorSet::decode(&bytes[..]).unwrap_or_else(|e| fail(format!("{FDS}: {e}")));
    let mut config = prost_build::Config::new();
    // Deterministic encoding: a SavedModel written twice is the same bytes.
    config.btree_map(["."]);
    config.include_file("tensorflow_protos.rs");
    config.compile_fds(fds).unwrap_or_else(|e| fail(format!("generating protobuf types from {FDS}: {e}")));
}
