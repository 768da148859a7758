//! Checkpoints and `--resume`: a run stopped and resumed computes what an uninterrupted run
//! computes, bit for bit; `--keep` and `--save-every` rotate checkpoints; a damaged checkpoint is
//! named and the one before it used.

mod common;

use std::path::{Path, PathBuf};

use std::process::Output;

use common::{last_stderr_line, minigpt};

/// 700 characters: with `--block-size 16`, 19 batches an epoch, so a 57-step run crosses two
/// epoch boundaries.
fn tiny_corpus(dir: &Path) -> PathBuf {
    let text = std::fs::read_to_string(common::corpus_path()).unwrap();
    let path = dir.join("tiny.txt");
    std::fs::write(&path, &text[..700]).unwrap();
    path
}

fn run(args: &[&str]) -> Output {
    let out = minigpt().args(args).output().unwrap();
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    out
}

fn train(corpus: &Path, dir: &Path, extra: &[&str]) -> Output {
    let base = [
        "train",
        "--data",
        corpus.to_str().unwrap(),
        "--out",
        dir.to_str().unwrap(),
        "--block-size",
        "16",
        "--log-every",
        "3",
    ];
    run(&[&base[..], &["--save-every", "10", "--keep", "2"], extra].concat())
}

fn step_lines(out: &Output) -> Vec<String> {
    String::from_utf8_lossy(&out.stdout).lines().filter(|l| l.starts_with("Step ")).map(str::to_string).collect()
}

fn train_rows(dir: &Path) -> Vec<String> {
    std::fs::read_to_string(dir.join("metrics.csv"))
        .unwrap()
        .lines()
        .filter(|l| l.ends_with(','))
        .map(str::to_string)
        .collect()
}

fn checkpoint_files(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir.join("ckpt"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// The run in `whole` (its output `all`) and the one in `split`, stopped (`first`) and resumed
/// (`second`): the same step lines, the same metrics, byte-identical final checkpoints.
fn assert_same_run((whole, all): (&Path, &Output), (split, first, second): (&Path, &Output, &Output), last_step: u32) {
    let mut resumed = step_lines(first);
    resumed.extend(step_lines(second));
    assert_eq!(step_lines(all), resumed);
    assert_eq!(train_rows(whole), train_rows(split));
    for ext in ["data-00000-of-00001", "index"] {
        let file = format!("ckpt-{last_step}.{ext}");
        let (a, b) = (
            std::fs::read(whole.join("ckpt").join(&file)).unwrap(),
            std::fs::read(split.join("ckpt").join(&file)).unwrap(),
        );
        assert!(a == b, "{file} differs");
    }
}

#[test]
fn a_resumed_run_matches_an_uninterrupted_one_bit_for_bit() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = tiny_corpus(tmp.path());
    let (whole, split) = (tmp.path().join("whole"), tmp.path().join("split"));

    let all = train(&corpus, &whole, &[]); // 3 epochs: 57 steps
    let first = train(&corpus, &split, &["--max-steps", "25"]); // stops in epoch 2, batch 6
    let second = run(&["train", "--resume", "--out", split.to_str().unwrap(), "--log-every", "3", "--max-steps", "57"]);
    assert!(String::from_utf8_lossy(&second.stdout).contains("(step 25, epoch 2, batch 6)"));

    assert_same_run((&whole, &all), (&split, &first, &second), 57);
    // Saved every 10 steps and at each epoch's end (19, 38, 57); --keep 2 leaves the last two,
    // beside the best by validation loss.
    assert_eq!(
        checkpoint_files(&whole),
        [
            "best.data-00000-of-00001",
            "best.index",
            "checkpoint",
            "ckpt-50.data-00000-of-00001",
            "ckpt-50.index",
            "ckpt-57.data-00000-of-00001",
            "ckpt-57.index"
        ]
    );
    let best = |dir: &Path| std::fs::read(dir.join("ckpt/best.data-00000-of-00001")).unwrap();
    assert!(best(&whole) == best(&split), "the resumed run's best checkpoint differs");

    // A finished run says so; settings of the run cannot be changed on resume.
    let out = minigpt().args(["train", "--resume", "--out", whole.to_str().unwrap()]).output().unwrap();
    assert!(!out.status.success());
    assert!(
        last_stderr_line(&out).contains("the run is complete (57 steps, 3 epochs done)"),
        "{}",
        last_stderr_line(&out)
    );
    let out = minigpt().args(["train", "--resume", "--out", whole.to_str().unwrap(), "--lr", "0.1"]).output().unwrap();
    assert!(!out.status.success());
    assert!(last_stderr_line(&out).contains("--lr 0.1 differs from the run's 0.001"), "{}", last_stderr_line(&out));
    // More epochs continue it.
    let more = run(&["train", "--resume", "--out", whole.to_str().unwrap(), "--epochs", "4", "-q"]);
    assert!(
        String::from_utf8_lossy(&more.stdout).contains("trained 76 steps"),
        "{}",
        String::from_utf8_lossy(&more.stdout)
    );
}

#[test]
fn a_damaged_checkpoint_is_named_and_the_previous_one_used() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = tiny_corpus(tmp.path());
    let dir = tmp.path().join("run");
    train(&corpus, &dir, &["--max-steps", "30"]); // keeps ckpt-20 and ckpt-30
    let ckpt = dir.join("ckpt");
    let eval = || minigpt().args(["eval", "--run", dir.to_str().unwrap()]).output().unwrap();
    let good = eval();
    assert!(good.status.success());

    // Truncated data file.
    let data = ckpt.join("ckpt-30.data-00000-of-00001");
    let bytes = std::fs::read(&data).unwrap();
    std::fs::write(&data, &bytes[..bytes.len() / 2]).unwrap();
    let out = eval();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("warning: checkpoint") && stderr.contains("ckpt-30 is damaged"), "{stderr}");
    assert!(stderr.contains("ckpt-20 instead"), "{stderr}");
    assert_ne!(out.stdout, good.stdout, "the older checkpoint gives another loss");

    // Resuming picks the older checkpoint up too, and redoes the steps after it.
    let resumed = run(&["train", "--resume", "--out", dir.to_str().unwrap(), "--max-steps", "30", "-q"]);
    assert!(String::from_utf8_lossy(&resumed.stderr).contains("ckpt-30 is damaged"));
    assert_eq!(eval().stdout, good.stdout, "redone steps give the same weights");

    // Garbage in both: a clear error naming them.
    std::fs::write(ckpt.join("ckpt-30.index"), b"not a checkpoint index").unwrap();
    std::fs::write(ckpt.join("ckpt-20.data-00000-of-00001"), b"").unwrap();
    let out = eval();
    assert!(!out.status.success());
    let last = last_stderr_line(&out);
    assert!(
        last.starts_with("error: no usable checkpoint in") && last.contains("ckpt-30") && last.contains("ckpt-20"),
        "{last}"
    );
}

#[test]
fn a_diverging_run_stops_at_the_first_non_finite_loss_keeping_the_last_good_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = tiny_corpus(tmp.path());
    // Trains into tmp/`name` at learning rate `lr`, expecting failure; its last stderr line.
    let diverge = |name: &str, lr: &str| {
        let dir = tmp.path().join(name);
        let out = minigpt()
            .args([
                "train",
                "--block-size",
                "16",
                "--lr",
                lr,
                "--save-every",
                "1",
                "--data",
                corpus.to_str().unwrap(),
                "--out",
                dir.to_str().unwrap(),
            ])
            .output()
            .unwrap();
        assert!(!out.status.success());
        (dir, last_stderr_line(&out))
    };
    let (dir, line) = diverge("run", "1e30");
    assert!(line.starts_with("error: training stopped: the loss became NaN at step 1"), "{line}");
    // ckpt-1 holds the weights whose loss was NaN: it is discarded, ckpt-0 does not exist.
    assert!(line.ends_with("no good checkpoint is left"), "{line}");
    assert!(!dir.join("ckpt/ckpt-1.index").exists());
    assert!(dir.join("ckpt/diverged-ckpt-1.index").exists(), "the diverged weights are kept aside, not deleted");

    // With a lower rate it diverges later; the checkpoint before the bad step (whose own loss
    // was finite) stays the newest, and the run resumes from it.
    let (dir, line) = diverge("later", "1e17");
    let step: u64 = line.split("at step ").nth(1).unwrap().split(' ').next().unwrap().parse().unwrap();
    assert!(step > 1, "{line}");
    assert!(
        line.contains(&format!(
            "the newest checkpoint is still {}",
            dir.join(format!("ckpt/ckpt-{}", step - 1)).display()
        )),
        "{line}"
    );
    assert!(!dir.join(format!("ckpt/ckpt-{step}.index")).exists());
    let again = minigpt().args(["train", "--resume", "--out", dir.to_str().unwrap()]).output().unwrap();
    assert!(
        last_stderr_line(&again).contains(&format!("the loss became inf at step {step}")),
        "{}",
        last_stderr_line(&again)
    );
}

#[test]
fn a_failed_save_is_a_clear_error_and_leaves_the_previous_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = tiny_corpus(tmp.path());
    let dir = tmp.path().join("run");
    train(&corpus, &dir, &["--max-steps", "15"]); // ckpt-10, ckpt-15
    let ckpt = dir.join("ckpt");
    // Where TensorFlow will put ckpt-20's data file, a directory: its write fails, as on a full
    // or read-only disk (a permission change would not stop root).
    std::fs::create_dir(ckpt.join(".partial-ckpt-20.data-00000-of-00001")).unwrap();
    let out = minigpt()
        .args(["train", "--resume", "--out", dir.to_str().unwrap(), "--max-steps", "30", "-q"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let line = last_stderr_line(&out);
    assert!(line.starts_with("error: writing checkpoint ckpt-20 failed (the newest checkpoint is still"), "{line}");
    // (The resumed run wrote ckpt-19 at the end of epoch 1 before failing at step 20.)
    assert!(line.contains("ckpt-19)") && line.contains("Is a directory"), "{line}");
    assert!(!ckpt.join("ckpt-20.index").exists());
    assert!(std::fs::read_to_string(ckpt.join("checkpoint"))
        .unwrap()
        .starts_with("model_checkpoint_path: \"ckpt-19\""));
    let after = minigpt().args(["eval", "--run", dir.to_str().unwrap()]).output().unwrap();
    assert!(after.status.success(), "{}", String::from_utf8_lossy(&after.stderr));
}

#[test]
fn a_resumed_gpt_run_with_dropout_matches_an_uninterrupted_one_bit_for_bit() {
    // Dropout's masks are keyed by the step, so a resumed run draws the ones it would have drawn.
    let tmp = tempfile::tempdir().unwrap();
    let corpus = tiny_corpus(tmp.path());
    let (whole, split) = (tmp.path().join("whole"), tmp.path().join("split"));
    let flags = format!("{} --dropout 0.2 --shuffle global --epochs 2", common::TINY_GPT);
    let gpt: Vec<&str> = flags.split(' ').collect();
    let all = train(&corpus, &whole, &gpt);
    let first = train(&corpus, &split, &[&gpt[..], &["--max-steps", "25"]].concat());
    let second = run(&["train", "--resume", "--out", split.to_str().unwrap(), "--log-every", "3", "--max-steps", "38"]);
    assert_same_run((&whole, &all), (&split, &first, &second), 38);
}

/// The loss scale of the run in `dir`, as its newest checkpoint holds it.
fn loss_scale(dir: &Path) -> Option<f32> {
    let session = minigpt::device::SessionConfig { device: minigpt::device::DeviceChoice::Cpu, ..Default::default() };
    let run = minigpt::run::RunDir::open(dir).unwrap();
    let (_, runner) = run.load(minigpt::run::Load::Training { summaries: false }, session).unwrap();
    runner.loss_scale().unwrap()
}

#[test]
fn a_resumed_mixed_float16_run_matches_an_uninterrupted_one_loss_scale_included() {
    // The loss scale and its count of finite steps are checkpointed with the optimizer.
    let tmp = tempfile::tempdir().unwrap();
    let corpus = tiny_corpus(tmp.path());
    let (whole, split) = (tmp.path().join("whole"), tmp.path().join("split"));
    let flags = format!("{} --precision mixed_float16 --epochs 2", common::TINY_GPT);
    let gpt: Vec<&str> = flags.split(' ').collect();
    let all = train(&corpus, &whole, &gpt);
    let first = train(&corpus, &split, &[&gpt[..], &["--max-steps", "25"]].concat());
    let second = run(&["train", "--resume", "--out", split.to_str().unwrap(), "--log-every", "3", "--max-steps", "38"]);
    assert_same_run((&whole, &all), (&split, &first, &second), 38);
    let config = std::fs::read_to_string(whole.join("config.json")).unwrap();
    assert!(config.contains("\"precision\": \"mixed_float16\""), "{config}");
    assert_eq!(loss_scale(&whole), Some(32768.0));
    // Another precision on resume is refused, as any setting of the run.
    let out = minigpt()
        .args(["train", "--resume", "--out", split.to_str().unwrap(), "--precision", "mixed_bfloat16"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(last_stderr_line(&out).contains("--precision"), "{}", last_stderr_line(&out));
}

#[test]
fn the_loss_scale_doubles_after_2000_finite_steps() {
    // Keras' LossScaleOptimizer: 2^15 at first, doubled on the 2000th finite step in a row.
    let tmp = tempfile::tempdir().unwrap();
    let corpus = tiny_corpus(tmp.path());
    let (before, after) = (tmp.path().join("before"), tmp.path().join("after"));
    let flags = ["--precision", "mixed_float16", "--embedding-dim", "8", "--batch-size", "2", "--epochs", "100", "-q"];
    train(&corpus, &before, &[&flags[..], &["--max-steps", "1999"]].concat());
    train(&corpus, &after, &[&flags[..], &["--max-steps", "2000"]].concat());
    assert_eq!((loss_scale(&before), loss_scale(&after)), (Some(32768.0), Some(65536.0)));
    // A float32 run keeps none.
    let plain = tmp.path().join("plain");
    train(&corpus, &plain, &["--max-steps", "3", "-q"]);
    assert_eq!(loss_scale(&plain), None);
}

#[test]
fn under_mixed_float16_a_non_finite_loss_skips_the_step_and_twenty_in_a_row_stop_the_run() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = tiny_corpus(tmp.path());
    let dir = tmp.path().join("run");
    // The first step makes the weights about 1e30: float16 overflows in every forward pass after.
    let out = minigpt()
        .args(["train", "--precision", "mixed_float16", "--block-size", "16", "--lr", "1e30", "--save-every", "1"])
        .args(["--data", corpus.to_str().unwrap(), "--out", dir.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    // Steps 1 to 19 are skipped, each halving the loss scale, as Keras' LossScaleOptimizer does.
    let stdout = String::from_utf8_lossy(&out.stdout);
    for g in 1..20 {
        let scale = 32768f32 / 2f32.powi(g);
        let skipped = format!("step {g}: the loss is NaN (float16 overflowed): step skipped, loss scale now {scale}\n");
        assert!(stdout.contains(&skipped), "no {skipped:?} in:\n{stdout}");
    }
    let line = last_stderr_line(&out);
    assert!(
        line.starts_with("error: training stopped: the loss became NaN at step 20, the 20th step in a row"),
        "{line}"
    );
    // Every checkpoint since the first non-finite loss holds the same overflowing weights.
    assert!(line.ends_with("no good checkpoint is left"), "{line}");
    assert!((1..=20).all(|g| !dir.join(format!("ckpt/ckpt-{g}.index")).exists()));
}
