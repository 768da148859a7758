//! `make parity`: makes the fixtures with the notebook's code under the pinned Python TensorFlow,
//! compares minigpt against them and prints one row per check; exits 1 if any row fails.
//!
//!     cargo run --example parity [-- FIXTURES_DIR]

use std::path::PathBuf;
use std::process::ExitCode;

use minigpt::{data, parity};

fn main() -> ExitCode {
    match run() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {}", format!("{e:#}").replace('\n', " "));
            ExitCode::from(2)
        }
    }
}

fn run() -> anyhow::Result<bool> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let out = std::env::args_os().nth(1).map(PathBuf::from).unwrap_or_else(|| root.join("target/parity-fixtures"));
    let python = std::env::var_os("MINIGPT_PYTHON").map(PathBuf::from).unwrap_or_else(|| root.join(".venv/bin/python"));
    let source = data::default_source();
    let corpus = data::load_corpus(&source)?;
    eprintln!("making fixtures in {} with {} ...", out.display(), python.display());
    parity::make_fixtures(&python, &root, &data::local_path(&source)?, &out)?;
    let checks = parity::check(&out, &corpus)?;
    print!("{}", parity::Table(&checks));
    let failed = checks.iter().filter(|c| !c.passed()).count();
    println!("{} checks, {} failed", checks.len(), failed);
    Ok(failed == 0)
}
