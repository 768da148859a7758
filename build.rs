//! Links the TensorFlow C library from `.tf/lib` (made by `make setup` from the pip wheel) and
//! embeds the wheel's own folder as an rpath, so binaries and tests run with no environment
//! variables; and generates TensorFlow's protobuf types from `proto/tensorflow.fds.pb` (the
//! descriptors of the pinned wheel, written by `python_export/proto_descriptors.py`) with
//! prost-build, no protoc.
//!
//! `.tf/lib` holds symlinks under the names the linker expects; the rpath is the folder those
//! symlinks point into, not `.tf/lib`. The wheel's libraries find their neighbours (CUDA's
//! `libcudart.so.12`, cuDNN, ...) through RUNPATH entries relative to `$ORIGIN`, which the loader
//! takes from the path it loaded them by: loaded through `.tf/lib`, `$ORIGIN/../nvidia/...` would
//! be `.tf/lib/../nvidia/...` and CUDA would not be found.

use std::path::{Path, PathBuf};
use std::process::exit;

use prost::Message;

fn main() {
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
    if !lib.exists() {
        eprintln!("error: TensorFlow C library not found at {}: run `make setup` first", lib.display());
        exit(1);
    }
    let lib_dir = lib_dir.canonicalize().unwrap_or(lib_dir);
    println!("cargo:rustc-link-search=native={}", lib_dir.display());
    println!("cargo:rustc-link-lib=dylib=tensorflow");
    println!("cargo:rustc-link-lib=dylib=tensorflow_framework");
    // The real folders of both libraries (the same folder in the wheel), in load order.
    let framework = lib_dir.join(if macos { "libtensorflow_framework.dylib" } else { "libtensorflow_framework.so" });
    let mut rpaths: Vec<PathBuf> = Vec::new();
    for link in [&lib, &framework] {
        let dir = real_parent(link).unwrap_or_else(|| lib_dir.clone());
        if !rpaths.contains(&dir) {
            rpaths.push(dir);
        }
    }
    for dir in rpaths {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{}", dir.display());
    }
}

/// The folder that holds the file `link` resolves to (following every symlink).
fn real_parent(link: &Path) -> Option<PathBuf> {
    Some(link.canonicalize().ok()?.parent()?.to_path_buf())
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
