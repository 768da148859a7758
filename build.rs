//! Links the TensorFlow C library from `.tf/lib` (made by `make setup` from the pip wheel) and
//! embeds its path as an rpath, so binaries and tests run with no environment variables.

use std::path::PathBuf;
use std::process::exit;

fn main() {
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
