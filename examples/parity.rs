//! `make parity`: makes the fixtures with the notebook's code (and with the Keras transformer of
//! `python_export/gpt.py`, in float32 and under Keras' mixed policies) under the pinned Python
//! TensorFlow, compares minigpt against them and prints one row per check; exits 1 if any row
//! fails.
//!
//!     cargo run --example parity [-- [--xla] [FIXTURES_DIR]]
//!
//! `--xla` runs minigpt's side under XLA's JIT (`minigpt train --xla`), whose fused kernels round
//! differently: the table then shows how far from the notebook that takes it.

use std::path::PathBuf;
use std::process::ExitCode;

#[path = "../tests/common/mod.rs"]
mod common;

use common::parity;
use minigpt::data;

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
    minigpt::library::load(false)?;
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let xla = args.iter().any(|a| a == "--xla");
    args.retain(|a| a != "--xla");
    let out = args.first().map(PathBuf::from).unwrap_or_else(|| root.join("target/parity-fixtures"));
    let python = std::env::var_os("MINIGPT_PYTHON").map(PathBuf::from).unwrap_or_else(|| root.join(".venv/bin/python"));
    let source = data::default_source();
    let corpus = data::load_corpus(&source)?;
    eprintln!("making fixtures in {} with {} ...", out.display(), python.display());
    let local = data::local_path(&source)?;
    parity::make_fixtures(&python, &root, &local, &out)?;
    let xla = if xla { minigpt::device::Xla::On } else { minigpt::device::Xla::Off };
    let session = minigpt::device::SessionConfig { xla, ..Default::default() };
    let mut checks = parity::check(&out, &corpus, session)?;
    let gpt = parity::GPT_SIZES.iter().map(|f| ("gpt", f)).chain(parity::GPT_MIXED.iter().map(|f| ("gpt-mixed", f)));
    for (i, (name, flags)) in gpt.enumerate() {
        let gpt_out = out.join(format!("{name}-{i}"));
        parity::make_gpt_fixtures(&python, &root, &local, &gpt_out, flags)?;
        checks.extend(parity::check_gpt(&gpt_out, &corpus, session)?);
    }
    print!("{}", parity::Table(&checks));
    let failed = checks.iter().filter(|c| !c.passed()).count();
    println!("{} checks, {} failed", checks.len(), failed);
    Ok(failed == 0)
}
