//! Links the TensorFlow C library from `.tf/lib` (made by `make setup` from the pip wheel) and
//! embeds its path as an rpath, so binaries and tests run with no environment variables; and
//! generates TensorFlow's protobuf types from `proto/tensorflow.fds.pb` (the descriptors of the
//! pinned wheel, written by `python_export/proto_descriptors.py`) with prost-build, no protoc.

use std::path::PathBuf;
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
    let lib = lib_dir.join(if cfg!(target_os = "macos") { "libtensorflow.dylib" } else { "libtensorflow.so" });
    if !lib.exists() {
        eprintln!("error: TensorFlow C library not found at {}: run `make setup` first", lib.display());
        exit(1);
    }
    let lib_dir = lib_dir.canonicalize().unwrap_or(lib_dir);
    println!("cargo:rustc-link-search=native={}", lib_dir.display());
    println!("cargo:rustc-link-lib=dylib=tensorflow");
    println!("cargo:rustc-link-lib=dylib=tensorflow_framework");
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib_dir.display());
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
