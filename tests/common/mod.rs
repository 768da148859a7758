//! Helpers shared by the integration tests (and `make parity`'s example).
#![allow(dead_code)]

pub mod cluster;
pub mod parity;

use std::path::PathBuf;

/// TensorFlow is loaded before any test runs, as `minigpt`'s `main` loads it before any command.
#[ctor::ctor]
fn load_tensorflow() {
    if let Err(e) = minigpt::library::load(false) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

/// The Tiny Shakespeare copy the tests use: `$MINIGPT_DATA`, else the built-in corpus written
/// once to a file under the target folder.
pub fn corpus_path() -> PathBuf {
    if let Some(path) = std::env::var_os("MINIGPT_DATA") {
        return PathBuf::from(path);
    }
    let target = option_env!("CARGO_TARGET_TMPDIR").unwrap_or(concat!(env!("CARGO_MANIFEST_DIR"), "/target/tmp"));
    let path = std::path::Path::new(target).join("tinyshakespeare.txt");
    if !path.exists() {
        let corpus = minigpt::data::load_corpus(minigpt::data::BUILTIN).unwrap();
        minigpt::files::write_atomic(&path, corpus.text.as_bytes()).unwrap();
    }
    path
}

/// The flags of a small transformer the tests train in seconds.
pub const TINY_GPT: &str = "--model gpt --n-layer 2 --n-head 2 --n-embd 16";

/// The pinned Python of `make setup`, with TensorFlow.
pub fn python() -> &'static str {
    const PYTHON: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/.venv/bin/python");
    assert!(std::path::Path::new(PYTHON).exists(), "no {PYTHON}: run `make setup`");
    PYTHON
}

/// Trains `dir/run` on the first `chars` characters of the corpus (written to `dir/small.txt`)
/// with `args` added, quietly; returns the run directory.
pub fn small_run(dir: &std::path::Path, chars: usize, args: &[&str]) -> PathBuf {
    let text = std::fs::read_to_string(corpus_path()).unwrap();
    std::fs::create_dir_all(dir).unwrap();
    let corpus = dir.join("small.txt");
    std::fs::write(&corpus, &text[..chars]).unwrap();
    let run = dir.join("run");
    let out =
        minigpt().args(["train", "-q", "--data"]).arg(&corpus).arg("--out").arg(&run).args(args).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    run
}

/// The `minigpt` binary with TensorFlow's logging silenced.
pub fn minigpt() -> assert_cmd::Command {
    let mut cmd = assert_cmd::Command::cargo_bin("minigpt").unwrap();
    // What a user sees: TensorFlow's log level is minigpt's default, not the tests' own.
    cmd.env_remove("TF_CPP_MIN_LOG_LEVEL").env_remove("MINIGPT_DATA").env_remove("TF_CONFIG");
    cmd
}

/// How far `got` is from `want`, elementwise.
#[derive(Debug, Clone, Copy)]
pub struct Comparison {
    /// max |Δ| (NaN if any difference is NaN).
    pub max_abs: f64,
    /// The index where |Δ| exceeds atol + rtol·|want| the most (0 if none does).
    pub worst: usize,
    /// Every element within atol + rtol·|want|.
    pub passed: bool,
}

/// Compares `got` with `want` elementwise: |Δ| ≤ atol + rtol·|want|.
pub fn compare(got: &[f64], want: &[f64], atol: f64, rtol: f64) -> Comparison {
    let (mut worst_excess, mut worst, mut max_abs) = (f64::NEG_INFINITY, 0usize, 0.0f64);
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let d = (g - w).abs();
        if d.is_nan() {
            return Comparison { max_abs: f64::NAN, worst: i, passed: false };
        }
        max_abs = max_abs.max(d);
        let excess = d - (atol + rtol * w.abs());
        if excess > worst_excess {
            (worst_excess, worst) = (excess, i);
        }
    }
    Comparison { max_abs, worst, passed: got.len() == want.len() && worst_excess <= 0.0 }
}

/// Asserts `got` ≈ `want` elementwise (|Δ| ≤ atol + rtol·|want|), naming the worst index.
pub fn assert_close(what: &str, got: &[f64], want: &[f64], atol: f64, rtol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: lengths differ");
    let c = compare(got, want, atol, rtol);
    assert!(
        c.passed,
        "{what}: index {}: got {}, want {} (max |Δ| {:e}, atol {atol:e}, rtol {rtol:e})",
        c.worst, got[c.worst], want[c.worst], c.max_abs
    );
}

/// The last line of a command's stderr (TensorFlow may print start-up lines before it).
pub fn last_stderr_line(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stderr).lines().last().unwrap_or("").to_string()
}

/// `minigpt export --run RUN --out OUT`, which must succeed.
pub fn export(run: &std::path::Path, out: &std::path::Path) {
    let done = minigpt().args(["export", "--run"]).arg(run).arg("--out").arg(out).output().unwrap();
    assert!(done.status.success(), "{}", String::from_utf8_lossy(&done.stderr));
}
