//! Parity with the notebook: fixtures made by `python_export/make_fixtures.py` under the pinned
//! Python TensorFlow (`.venv`, or `$MINIGPT_PYTHON`), compared with minigpt's own graph.
//! `make parity` prints the same checks as a table.

mod common;

use std::path::{Path, PathBuf};

use common::parity;
use minigpt::data;
use minigpt::device::{SessionConfig, Xla};

fn python(root: &Path) -> PathBuf {
    let python = std::env::var_os("MINIGPT_PYTHON").map(PathBuf::from).unwrap_or_else(|| root.join(".venv/bin/python"));
    assert!(python.exists(), "{} not found: run `make setup` first", python.display());
    python
}

/// The Keras transformer's fixtures made with `flags` in `<target tmp>/<name>`, checked against
/// minigpt without XLA and with it (`train --model gpt` compiles its step with XLA by default):
/// `expected` checks, every one passing.
fn gpt_against_keras(name: &str, flags: &[&str], expected: usize) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let corpus_path = common::corpus_path();
    let corpus = data::load_corpus(corpus_path.to_str().unwrap()).unwrap();
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&out);
    parity::make_gpt_fixtures(&python(root), root, &corpus_path, &out, flags).unwrap();
    for xla in [Xla::Off, Xla::On] {
        let session = SessionConfig { xla, ..Default::default() };
        let checks = parity::check_gpt(&out, &corpus, session).unwrap();
        let table = parity::Table(&checks).to_string();
        println!("{flags:?}, {xla:?}:\n{table}");
        assert_eq!(checks.len(), expected, "{table}");
        assert!(checks.iter().all(|c| c.passed()), "parity failed ({flags:?}, {xla:?}):\n{table}");
    }
}

/// The checks of a float32 transformer of `blocks` blocks: logits, loss, the gradients of 2 + 12
/// per block + 4 variables; the inference graph's logits and loss; learning rates and losses of
/// the AdamW steps; each variable (the attention bias in two rows), m and v.
fn float32_checks(blocks: usize) -> usize {
    let variables = 2 + 12 * blocks + 4;
    2 + variables + 2 + 2 + 3 * variables + blocks
}

#[test]
fn minigpt_gpt_computes_what_the_keras_transformer_computes() {
    for (i, (flags, blocks)) in parity::GPT_SIZES.iter().zip([2, 4]).enumerate() {
        gpt_against_keras(&format!("parity-gpt-fixtures-{i}"), flags, float32_checks(blocks));
    }
}

#[test]
fn minigpt_gpt_under_mixed_precision_computes_what_keras_computes_under_the_same_policy() {
    // 2 blocks. mixed_float16 adds the loss scales of its steps, and its overflow steps: their
    // scales, which were applied, losses, the scale and count after them, the state.
    let variables = 2 + 12 * 2 + 4;
    let expected = [float32_checks(2), float32_checks(2) + 1 + 4 + 3 * variables + 2];
    for (i, flags) in parity::GPT_MIXED.iter().enumerate() {
        gpt_against_keras(&format!("parity-gpt-mixed-{i}"), flags, expected[i]);
    }
}

#[test]
fn minigpt_computes_what_the_notebook_computes() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let python = python(root);
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("parity-fixtures");
    let _ = std::fs::remove_dir_all(&out);
    let corpus_path = common::corpus_path();
    parity::make_fixtures(&python, root, &corpus_path, &out).unwrap();
    let corpus = data::load_corpus(corpus_path.to_str().unwrap()).unwrap();
    let checks = parity::check(&out, &corpus, Default::default()).unwrap();
    let table = parity::Table(&checks).to_string();
    println!("{table}");
    assert!(checks.len() >= 28, "too few checks:\n{table}");
    assert!(checks.iter().all(|c| c.passed()), "parity failed:\n{table}");
    // The shuffle check can fail: a global permutation, or a buffer of 1000, moves windows
    // otherwise than tf.data's shuffle(10000).
    for shuffle in [data::Shuffle::Global, data::Shuffle::Buffer(1000)] {
        let (ks, critical) = parity::shuffle_against_tfdata(&out, &corpus, shuffle).unwrap();
        println!("{shuffle:?} against tf.data's shuffle(10000): KS {ks:.4} (critical {critical:.4})");
        assert!(ks > 5.0 * critical, "{shuffle:?}: KS {ks} is not far above {critical}");
    }
}
