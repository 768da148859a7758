//! Hostile input, fuzz-style: random bytes and truncated files as the corpus, config.json, a
//! SavedModel's vocab.json and a checkpoint index. Every run either works or fails with one
//! `error:` line and exit code 1: never a panic, an abort or a hang.

mod common;

use std::path::Path;

use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Exit 0 with the output `ok` accepts, or exit 1 with a last stderr line starting `error: `;
/// never a panic or a signal.
fn assert_graceful(what: &str, out: &std::process::Output, ok: impl Fn(&str) -> bool) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked") && !stderr.contains("RUST_BACKTRACE"), "{what}: {stderr}");
    match out.status.code() {
        Some(0) => assert!(
            ok(&String::from_utf8_lossy(&out.stdout)),
            "{what}: exit 0 with {:?}",
            String::from_utf8_lossy(&out.stdout)
        ),
        Some(1) => assert!(common::last_stderr_line(out).starts_with("error: "), "{what}: {stderr}"),
        other => panic!("{what}: exit {other:?}: {stderr}"),
    }
}

/// A damaged copy of `good`: truncated, bytes flipped, or random bytes altogether.
fn damage(rng: &mut ChaCha8Rng, good: &[u8]) -> Vec<u8> {
    match rng.random_range(0..3) {
        0 => good[..rng.random_range(0..good.len().max(1))].to_vec(),
        1 => {
            let mut bad = good.to_vec();
            for _ in 0..rng.random_range(1..8) {
                if !bad.is_empty() {
                    let i = rng.random_range(0..bad.len());
                    bad[i] = rng.random();
                }
            }
            bad
        }
        _ => {
            let mut bad = vec![0u8; rng.random_range(0..512)];
            rng.fill_bytes(&mut bad);
            bad
        }
    }
}

fn minigpt(args: &[&str], path: &Path) -> std::process::Output {
    common::minigpt().args(args).arg(path).output().unwrap()
}

#[test]
fn damaged_files_give_clear_errors() {
    let mut rng = ChaCha8Rng::seed_from_u64(20261125);
    let tmp = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(common::corpus_path()).unwrap();
    let corpus = tmp.path().join("small.txt");
    std::fs::write(&corpus, &text[..30_000]).unwrap();
    let run = tmp.path().join("run");
    let out = common::minigpt()
        .args(["train", "--max-steps", "5", "--eval-batches", "1", "-q", "--data"])
        .arg(&corpus)
        .arg("--out")
        .arg(&run)
        .output()
        .unwrap();
    assert!(out.status.success());
    let saved = tmp.path().join("saved");
    common::export(&run, &saved);

    // Corpora: damaged text, random bytes.
    for i in 0..8 {
        let bad = tmp.path().join(format!("corpus-{i}.txt"));
        std::fs::write(&bad, damage(&mut rng, &text.as_bytes()[..2_000])).unwrap();
        let out = common::minigpt()
            .args(["train", "--max-steps", "2", "--eval-batches", "1", "-q", "--block-size", "8", "--data"])
            .arg(&bad)
            .arg("--out")
            .arg(tmp.path().join(format!("r{i}")))
            .output()
            .unwrap();
        // A corpus that trains: the summary line says so.
        assert_graceful(&format!("corpus {i}"), &out, |stdout| stdout.starts_with("trained 2 steps"));
    }

    // config.json, metrics.csv, vocab.json and the checkpoint index, each damaged in turn.
    let files = [
        run.join("config.json"),
        run.join("metrics.csv"),
        run.join("ckpt/ckpt-5.index"),
        run.join("ckpt/checkpoint"),
        saved.join("assets.extra/vocab.json"),
        saved.join("assets.extra/minigpt.json"),
        saved.join("variables/variables.index"),
    ];
    for file in &files {
        let good = std::fs::read(file).unwrap();
        for round in 0..4 {
            std::fs::write(file, damage(&mut rng, &good)).unwrap();
            let what = format!("{} round {round}", file.display());
            let dir = if file.starts_with(&saved) { &saved } else { &run };
            // Whatever still generates gives the prompt and five characters of the vocabulary.
            let generated = |stdout: &str| {
                let text = stdout.trim_end_matches('\n');
                text.starts_with("To be") && text.chars().count() == 10 && !text.contains('\u{FFFD}')
            };
            assert_graceful(
                &what,
                &minigpt(&["generate", "--prompt", "To be", "--chars", "5", "--run"], dir),
                generated,
            );
            let described = |stdout: &str| stdout.starts_with("run:") || stdout.starts_with("savedmodel:");
            assert_graceful(&what, &minigpt(&["info", "--run"], dir), described);
        }
        std::fs::write(file, &good).unwrap();
    }
    // Everything restored: it works again.
    let out = minigpt(&["generate", "--prompt", "To be", "--chars", "5", "--run"], &run);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}
