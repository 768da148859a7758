//! Standard output treated as a Unix tool treats it, as a table: each command with its stdout on
//! a full disk (`> /dev/full`), closed (`>&-`) or read by a reader that goes away (`| head`) →
//! its exit code, what it says on stderr, and what must still be true (no panic, nothing lost).

mod common;

use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Where a command's stdout goes.
#[derive(Clone, Copy, Debug)]
enum Sink {
    /// `> /dev/full`: every write fails with ENOSPC.
    Full,
    /// `>&-`: descriptor 1 closed before the command starts.
    Closed,
    /// `| head -c N`: a reader that takes N bytes, then closes the pipe.
    Bytes(usize),
    /// `| head -n N`: a reader that takes N lines, then closes the pipe.
    Lines(usize),
}

struct Case {
    name: &'static str,
    /// `RUN` and `DIR` stand for a trained run and a scratch folder.
    args: &'static str,
    sink: Sink,
    code: i32,
    /// Part of stderr's last line (empty: stderr must be empty).
    says: &'static str,
    after: fn(&Path, &Path),
}

fn nothing(_: &Path, _: &Path) {}

const CASES: &[Case] = &[
    Case {
        name: "generate to a full disk",
        args: "generate --run RUN --prompt To --chars 100",
        sink: Sink::Full,
        code: 1,
        says: "error: writing to stdout: No space left on device",
        after: nothing,
    },
    Case {
        name: "generate with stdout closed",
        args: "generate --run RUN --prompt To --chars 100",
        sink: Sink::Closed,
        code: 1,
        says: "error: stdout is closed",
        after: nothing,
    },
    Case {
        name: "generate | head -c 10",
        args: "generate --run RUN --prompt To --chars 1000000",
        sink: Sink::Bytes(10),
        code: 141,
        says: "",
        after: nothing,
    },
    Case {
        name: "info to a full disk",
        args: "info --run RUN",
        sink: Sink::Full,
        code: 1,
        says: "error: writing to stdout: No space left on device",
        after: nothing,
    },
    Case {
        name: "eval to a full disk",
        args: "eval --run RUN --eval-batches 1",
        sink: Sink::Full,
        code: 1,
        says: "error: writing to stdout: No space left on device",
        after: nothing,
    },
    Case {
        name: "devices with stdout closed",
        args: "devices",
        sink: Sink::Closed,
        code: 1,
        says: "error: stdout is closed",
        after: nothing,
    },
    Case {
        name: "export to a full disk still exports",
        args: "export --run RUN --out DIR/saved",
        sink: Sink::Full,
        code: 1,
        says: "error: writing to stdout: No space left on device",
        after: |_, dir| assert!(dir.join("saved/saved_model.pb").is_file()),
    },
    Case {
        name: "train to a full disk",
        args: "train --data DIR/small.txt --out DIR/new --max-steps 5",
        sink: Sink::Full,
        code: 1,
        says: "error: writing to stdout: No space left on device",
        after: nothing,
    },
    Case {
        name: "train | head -n 4 checkpoints and says how to resume",
        args: "train --data DIR/small.txt --out DIR/new --max-steps 100000 --log-every 1 --eval-batches 1",
        sink: Sink::Lines(4),
        code: 141,
        says: "stdout was closed by its reader at step ",
        after: |_, dir| {
            let config: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(dir.join("new/config.json")).unwrap()).unwrap();
            let step = config["steps_done"].as_u64().unwrap();
            assert!(step > 0 && dir.join(format!("new/ckpt/ckpt-{step}.index")).is_file(), "no checkpoint");
        },
    },
];

#[test]
fn every_command_treats_stdout_as_a_unix_tool_does() {
    let tmp = tempfile::tempdir().unwrap();
    let run = common::small_run(&tmp.path().join("base"), 30_000, &["--max-steps", "5", "--eval-batches", "1"]);
    for (i, case) in CASES.iter().enumerate() {
        let dir = tmp.path().join(format!("case{i}"));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::copy(tmp.path().join("base/small.txt"), dir.join("small.txt")).unwrap();
        let args: Vec<String> = case
            .args
            .split(' ')
            .map(|a| a.replace("RUN", run.to_str().unwrap()).replace("DIR", dir.to_str().unwrap()))
            .collect();
        let mut command = Command::new(assert_cmd::cargo::cargo_bin("minigpt"));
        command.args(&args).env_remove("TF_CPP_MIN_LOG_LEVEL").env_remove("TF_CONFIG").stderr(Stdio::piped());
        match case.sink {
            Sink::Full => {
                command.stdout(std::fs::File::create("/dev/full").unwrap());
            }
            Sink::Closed => {
                // SAFETY: only close(2) between fork and exec.
                unsafe {
                    command.pre_exec(|| {
                        libc::close(1);
                        Ok(())
                    });
                }
            }
            Sink::Bytes(_) | Sink::Lines(_) => {
                command.stdout(Stdio::piped());
            }
        }
        let mut child = command.spawn().unwrap();
        let mut stderr = child.stderr.take().unwrap();
        let read = std::thread::spawn(move || {
            let mut text = String::new();
            stderr.read_to_string(&mut text).unwrap();
            text
        });
        if let Some(stdout) = child.stdout.take() {
            match case.sink {
                Sink::Bytes(n) => {
                    let mut head = vec![0u8; n];
                    BufReader::new(stdout).read_exact(&mut head).unwrap();
                    assert!(String::from_utf8(head).unwrap().starts_with("To"), "{}", case.name);
                }
                Sink::Lines(n) => {
                    let lines: Vec<String> = BufReader::new(stdout).lines().take(n).map(Result::unwrap).collect();
                    assert_eq!(lines.len(), n, "{}", case.name);
                }
                _ => unreachable!(),
            }
        }
        let start = Instant::now();
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if start.elapsed() > Duration::from_secs(120) {
                let _ = child.kill();
                panic!("{}: still running", case.name);
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let stderr = read.join().unwrap();
        assert!(!stderr.contains("panicked") && !stderr.contains("Broken pipe"), "{}: {stderr}", case.name);
        assert_eq!(status.code(), Some(case.code), "{}: {stderr}", case.name);
        match case.says {
            "" => assert_eq!(stderr, "", "{}", case.name),
            says => {
                let lines: Vec<&str> = stderr.lines().collect();
                assert_eq!(lines.len(), 1, "{}: {stderr}", case.name);
                assert!(lines[0].contains(says), "{}: {stderr}", case.name);
            }
        }
        (case.after)(&run, &dir);
    }
}

/// `generate` writes as it samples: a long run's first characters arrive while it still runs,
/// and what it wrote stays when it is stopped.
#[test]
fn generate_writes_as_it_samples() {
    let tmp = tempfile::tempdir().unwrap();
    let run = common::small_run(&tmp.path().join("base"), 30_000, &["--max-steps", "5", "--eval-batches", "1"]);
    let mut child = Command::new(assert_cmd::cargo::cargo_bin("minigpt"))
        .args(["generate", "--prompt", "To", "--chars", "100000000", "--run"])
        .arg(&run)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut head = vec![0u8; 2000];
        let _ = tx.send(stdout.read_exact(&mut head).map(|()| head));
    });
    let Ok(Ok(head)) = rx.recv_timeout(Duration::from_secs(60)) else {
        child.kill().unwrap();
        child.wait().unwrap();
        panic!("generate wrote nothing for a minute");
    };
    assert!(child.try_wait().unwrap().is_none(), "generate ended before its text was read");
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(head.starts_with(b"To"));
}
