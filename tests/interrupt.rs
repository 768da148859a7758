//! Ctrl-C (and SIGTERM, and SIGHUP from a closed terminal) during training: the step finishes, a checkpoint is written, the process exits with
//! 130 and says how to resume; a second process on the same run directory is refused meanwhile.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

#[test]
fn sigint_checkpoints_exits_130_and_the_run_resumes() {
    interrupt(libc::SIGINT);
}

#[test]
fn sigterm_checkpoints_exits_130_and_the_run_resumes() {
    interrupt(libc::SIGTERM);
}

#[test]
fn sighup_checkpoints_exits_130_and_the_run_resumes() {
    interrupt(libc::SIGHUP);
}

/// Trains until step 100, sends `signal`, checks the checkpoint, the exit and the resume.
fn interrupt(signal: i32) {
    let tmp = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(common::corpus_path()).unwrap();
    let corpus = tmp.path().join("small.txt");
    std::fs::write(&corpus, &text[..60_000]).unwrap();
    let run = tmp.path().join("run");
    let mut child = Command::new(assert_cmd::cargo::cargo_bin("minigpt"))
        .args(["train", "--max-steps", "1000000", "--log-every", "50", "--eval-batches", "2", "--data"])
        .arg(&corpus)
        .arg("--out")
        .arg(&run)
        .env("TF_CPP_MIN_LOG_LEVEL", "2")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    assert!(lines.by_ref().map(|l| l.unwrap()).any(|l| l.starts_with("Step 100:")), "training never reached step 100");

    // The run directory is locked while it trains.
    let other = common::minigpt().args(["train", "--resume", "--out"]).arg(&run).output().unwrap();
    assert!(!other.status.success());
    let line = common::last_stderr_line(&other);
    assert!(line.contains(&format!("is in use by another minigpt process (pid {})", child.id())), "{line}");

    // SAFETY: signalling our own child process.
    assert_eq!(unsafe { libc::kill(child.id() as i32, signal) }, 0);
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130), "{}", String::from_utf8_lossy(&out.stderr));
    let message = common::last_stderr_line(&out);
    assert!(
        message.starts_with("interrupted at step ") && message.contains("minigpt train --resume --out"),
        "{message}"
    );
    let step: u64 = message["interrupted at step ".len()..].split(':').next().unwrap().parse().unwrap();
    assert!(step > 100);
    assert!(run.join(format!("ckpt/ckpt-{step}.index")).is_file());
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["steps_done"], step);

    // Resuming carries on from that step (the lock went with the process).
    let resumed = common::minigpt()
        .args(["train", "--resume", "--max-steps", &(step + 20).to_string(), "--out"])
        .arg(&run)
        .output()
        .unwrap();
    assert!(resumed.status.success(), "{}", String::from_utf8_lossy(&resumed.stderr));
    let stdout = String::from_utf8_lossy(&resumed.stdout);
    assert!(
        stdout.contains(&format!("(step {step},")) && stdout.contains(&format!("trained {} steps", step + 20)),
        "{stdout}"
    );
}
