//! The hostile and careless cases, as a table: each input → exit code, the pattern of the last
//! stderr line, and what must still be true afterwards (the run directory usable, no file left
//! behind, no checkpoint lost). Plus signals while a run is still loading.

mod common;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// One case: how to break things, the command, and what must come out.
struct Case {
    name: &'static str,
    /// Changes a copy of the base run (`run`) and the folder it sits in before the command.
    setup: fn(&Path, &Path),
    /// The command's arguments; `RUN`, `DIR` and `CORPUS` stand for the run, the folder and the
    /// corpus it was trained on.
    args: &'static str,
    code: i32,
    /// Part of the last stderr line (errors) or of stdout (successes).
    says: &'static str,
    /// What must hold afterwards.
    after: fn(&Path, &Path),
}

fn no_setup(_: &Path, _: &Path) {}
fn nothing(_: &Path, _: &Path) {}

/// Replaces `"field": value` (its first occurrence) in the run's config.json.
fn edit_config(run: &Path, field: &str, value: &str) {
    let path = run.join("config.json");
    let mut config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let (section, key) = field.split_once('.').unwrap();
    let target = if section == "adam" { &mut config["train"]["adam"] } else { &mut config[section] };
    target[key] = serde_json::from_str(value).unwrap();
    std::fs::write(path, serde_json::to_string_pretty(&config).unwrap()).unwrap();
}

fn checkpoint_kept(run: &Path, _: &Path) {
    assert!(run.join("ckpt/ckpt-5.index").is_file() && run.join("ckpt/ckpt-5.data-00000-of-00001").is_file());
}

fn no_run_made(_: &Path, dir: &Path) {
    assert!(!dir.join("new").exists(), "a run directory was left behind");
}

fn usable(run: &Path, _: &Path) {
    let out =
        common::minigpt().args(["generate", "--prompt", "To", "--chars", "5", "--run"]).arg(run).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// Sets every weight of the run's newest checkpoint's `dense/kernel` to `value` (Python
/// TensorFlow's own SaveV2 over the same keys).
fn poison(run: &Path, value: &str) {
    let script = "import sys, numpy as np, tensorflow as tf\n\
        prefix = tf.train.latest_checkpoint(sys.argv[1])\n\
        r = tf.train.load_checkpoint(prefix)\n\
        names = sorted(r.get_variable_to_shape_map())\n\
        values = [r.get_tensor(n) for n in names]\n\
        values = [np.full_like(v, float(sys.argv[2])) if n == 'dense/kernel' else v for n, v in zip(names, values)]\n\
        tf.raw_ops.SaveV2(prefix=prefix, tensor_names=names, shape_and_slices=[''] * len(names), tensors=values)\n";
    let out = Command::new(common::python()).args(["-c", script]).arg(run.join("ckpt")).arg(value).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// Sets `section.key` of the SavedModel `saved`'s `assets.extra/minigpt.json` to `value` (JSON).
fn edit_declared(saved: &Path, section: &str, key: &str, value: &str) {
    let path = saved.join("assets.extra/minigpt.json");
    let mut declared: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    declared[section][key] = serde_json::from_str(value).unwrap();
    std::fs::write(path, serde_json::to_string_pretty(&declared).unwrap()).unwrap();
}

/// `poison`, then `minigpt export` of the run to `DIR/saved`.
fn poison_and_export(run: &Path, dir: &Path, value: &str) {
    poison(run, value);
    common::export(run, &dir.join("saved"));
}

const CASES: &[Case] = &[
    Case {
        name: "a run whose logits are NaN (the in-graph loop)",
        setup: |run, _| poison(run, "nan"),
        args: "generate --run RUN --prompt To --chars 50",
        code: 1,
        says: "the model's logits are NaN or infinite at generated character 1",
        after: nothing,
    },
    Case {
        name: "a SavedModel whose logits are infinite (step by step)",
        setup: |run, dir| poison_and_export(run, dir, "inf"),
        args: "generate --run DIR/saved --prompt To --chars 500",
        code: 1,
        says: "the model's logits are NaN or infinite at generated character 1",
        after: nothing,
    },
    Case {
        name: "checkpoints that no run accounts for are not overwritten",
        setup: |run, _| std::fs::remove_file(run.join("config.json")).unwrap(),
        args: "train --data CORPUS --out RUN --max-steps 3",
        code: 1,
        says: "holds checkpoints (ckpt/) that no minigpt run accounts for (no config.json)",
        after: checkpoint_kept,
    },
    Case {
        name: "--out into a folder of the user's own config.json",
        setup: |_, dir| {
            std::fs::create_dir(dir.join("mine")).unwrap();
            std::fs::write(dir.join("mine/config.json"), "{\"theme\": \"dark\"}").unwrap();
            std::fs::write(dir.join("mine/metrics.csv"), "a,b\n1,2\n").unwrap();
        },
        args: "train --data CORPUS --out DIR/mine --max-steps 3",
        code: 1,
        says: "/mine holds a config.json that is not a minigpt run's",
        after: |_, dir| {
            assert_eq!(std::fs::read_to_string(dir.join("mine/config.json")).unwrap(), "{\"theme\": \"dark\"}");
            assert_eq!(std::fs::read_to_string(dir.join("mine/metrics.csv")).unwrap(), "a,b\n1,2\n");
            assert!(!dir.join("mine/ckpt").exists());
        },
    },
    Case {
        name: "--out into a folder that is not a run (and --out .)",
        setup: |_, dir| std::fs::write(dir.join("notes.txt"), "mine").unwrap(),
        args: "train --data CORPUS --out DIR/. --max-steps 3",
        code: 1,
        says: "holds files minigpt did not write there (notes.txt, run): give a new or empty folder",
        after: |_, dir| {
            let corpus = dir.join("../base/small.txt");
            let out = common::minigpt().current_dir(dir).args(["train", "--out", ".", "--data"]).arg(corpus).output();
            let out = out.unwrap();
            assert_eq!(out.status.code(), Some(1));
            assert!(common::last_stderr_line(&out).contains("--out . holds files minigpt did not write there"));
            assert!(!dir.join("ckpt").exists() && !dir.join("config.json").exists());
        },
    },
    Case {
        name: "--out is checked before the corpus is downloaded",
        setup: |_, dir| std::fs::write(dir.join("notes.txt"), "mine").unwrap(),
        args: "train --data http://127.0.0.1:9/input.txt --out DIR/. --max-steps 3",
        code: 1,
        says: "holds files minigpt did not write there (notes.txt, run)",
        after: nothing,
    },
    Case {
        name: "--out into a SavedModel",
        setup: |run, dir| poison_and_export(run, dir, "0"),
        args: "train --data CORPUS --out DIR/saved --max-steps 3",
        code: 1,
        says: "holds files minigpt did not write there (",
        after: |_, dir| {
            assert!(!dir.join("saved/ckpt").exists() && !dir.join("saved/config.json").exists());
            usable(&dir.join("saved"), dir);
        },
    },
    Case {
        name: "--init-from a run --out the same run",
        setup: no_setup,
        args: "train --init-from RUN --data CORPUS --out RUN --max-steps 3",
        code: 1,
        says: "already holds a run: choose another --out",
        after: checkpoint_kept,
    },
    Case {
        name: "--out a run whose ckpt/checkpoint was removed",
        setup: |run, _| std::fs::remove_file(run.join("ckpt/checkpoint")).unwrap(),
        args: "train --data CORPUS --out RUN --max-steps 3",
        code: 1,
        says: "already holds a run (checkpoints in ckpt/, 5 steps done)",
        after: checkpoint_kept,
    },
    Case {
        name: "a ckpt/ that leads out of the run is not written through",
        setup: |run, dir| {
            std::fs::rename(run.join("ckpt"), dir.join("elsewhere")).unwrap();
            std::os::unix::fs::symlink(dir.join("elsewhere"), run.join("ckpt")).unwrap();
        },
        args: "train --data CORPUS --out RUN --resume --max-steps 8",
        code: 1,
        says: "ckpt is a symbolic link: minigpt writes a run's files only inside its directory",
        after: |_, dir| {
            let state = std::fs::read_to_string(dir.join("elsewhere/checkpoint")).unwrap();
            assert!(state.contains("ckpt-5") && !state.contains("ckpt-8"), "{state}");
        },
    },
    Case {
        name: "a lock that leads out of the run is not written through",
        setup: |run, dir| {
            std::fs::write(dir.join("precious"), "keep").unwrap();
            let _ = std::fs::remove_file(run.join("lock"));
            std::os::unix::fs::symlink(dir.join("precious"), run.join("lock")).unwrap();
        },
        args: "train --data CORPUS --out RUN --resume --max-steps 8",
        code: 1,
        says: "lock is a symbolic link",
        after: |_, dir| assert_eq!(std::fs::read_to_string(dir.join("precious")).unwrap(), "keep"),
    },
    Case {
        name: "a --vocab that is a FIFO",
        setup: |run, dir| {
            poison_and_export(run, dir, "0");
            std::fs::remove_file(dir.join("saved/assets.extra/vocab.json")).unwrap();
            assert!(Command::new("mkfifo").arg(dir.join("fifo")).status().unwrap().success());
        },
        args: "generate --run DIR/saved --vocab DIR/fifo --prompt To",
        code: 1,
        says: "/fifo is a FIFO: give a regular file",
        after: nothing,
    },
    Case {
        name: "a --vocab that never ends",
        setup: |run, dir| {
            poison_and_export(run, dir, "0");
            std::fs::remove_file(dir.join("saved/assets.extra/vocab.json")).unwrap();
        },
        args: "generate --run DIR/saved --vocab /dev/zero --prompt To",
        code: 1,
        says: "vocabulary /dev/zero is a device",
        after: nothing,
    },
    Case {
        name: "a --vocab that is a truncated JSON array",
        setup: |run, dir| {
            poison_and_export(run, dir, "0");
            std::fs::remove_file(dir.join("saved/assets.extra/vocab.json")).unwrap();
            std::fs::write(dir.join("vocab.json"), "[\"a\", \"b\", \"c").unwrap();
        },
        args: "generate --run DIR/saved --vocab DIR/vocab.json --prompt To",
        code: 1,
        says: "is not a JSON array of one-character strings",
        after: nothing,
    },
    Case {
        name: "a config.json that is a FIFO",
        setup: |run, _| {
            std::fs::remove_file(run.join("config.json")).unwrap();
            assert!(Command::new("mkfifo").arg(run.join("config.json")).status().unwrap().success());
        },
        args: "info --run RUN",
        code: 1,
        says: "config.json is a FIFO: give a regular file",
        after: nothing,
    },
    Case {
        name: "info on a SavedModel whose vocabulary repeats a character",
        setup: |run, dir| {
            poison_and_export(run, dir, "0");
            std::fs::write(dir.join("saved/assets.extra/vocab.json"), "[\"a\", \"a\", \"b\"]").unwrap();
        },
        args: "info --run DIR/saved",
        code: 1,
        says: "vocab.json",
        after: nothing,
    },
    Case {
        name: "a SavedModel whose variables data is truncated names its files",
        setup: |run, dir| {
            poison_and_export(run, dir, "0");
            let data = dir.join("saved/variables/variables.data-00000-of-00001");
            let len = std::fs::metadata(&data).unwrap().len();
            std::fs::OpenOptions::new().write(true).open(&data).unwrap().set_len(len / 2).unwrap();
        },
        args: "generate --run DIR/saved --prompt To",
        code: 1,
        says: "its variables are damaged or truncated (",
        after: nothing,
    },
    Case {
        name: "a SavedModel without its variables index names it",
        setup: |run, dir| {
            poison_and_export(run, dir, "0");
            std::fs::remove_file(dir.join("saved/variables/variables.index")).unwrap();
        },
        args: "eval --run DIR/saved --eval-batches 1 --data CORPUS",
        code: 1,
        says: "variables/variables.index is missing",
        after: nothing,
    },
    Case {
        name: "an unknown built-in corpus is named with the ones there are",
        setup: no_setup,
        args: "train --data builtin:shakespeare --out DIR/new",
        code: 1,
        says: "builtin:shakespeare is not a built-in corpus: minigpt has builtin:tinyshakespeare",
        after: no_run_made,
    },
    Case {
        name: "corpus is a FIFO",
        setup: |_, dir| assert!(Command::new("mkfifo").arg(dir.join("fifo")).status().unwrap().success()),
        args: "train --data DIR/fifo --out DIR/new",
        code: 1,
        says: "is a FIFO: give a regular file",
        after: no_run_made,
    },
    Case {
        name: "corpus is a device",
        setup: no_setup,
        args: "train --data /dev/zero --out DIR/new",
        code: 1,
        says: "/dev/zero is a device",
        after: no_run_made,
    },
    Case {
        name: "corpus is a directory",
        setup: no_setup,
        args: "train --data DIR --out DIR/new",
        code: 1,
        says: "is a directory",
        after: no_run_made,
    },
    Case {
        name: "a subnormal temperature",
        setup: no_setup,
        args: "generate --run RUN --prompt To --temperature 1e-39",
        code: 1,
        says: "--temperature must be a positive number from 1.1754944e-38 up",
        after: nothing,
    },
    Case {
        name: "the smallest normal temperature picks the best",
        setup: no_setup,
        args: "generate --run RUN --prompt To --chars 30 --temperature 1.2e-38",
        code: 0,
        says: "To",
        after: nothing,
    },
    Case {
        name: "a huge temperature",
        setup: no_setup,
        args: "generate --run RUN --prompt To --chars 30 --temperature 3e38",
        code: 0,
        says: "To",
        after: nothing,
    },
    Case {
        name: "top-k beyond the vocabulary",
        setup: no_setup,
        args: "generate --run RUN --prompt To --chars 30 --top-k 100000",
        code: 0,
        says: "To",
        after: nothing,
    },
    Case {
        name: "config.json with batch_size 0",
        setup: |run, _| edit_config(run, "train.batch_size", "0"),
        args: "train --resume --out RUN",
        code: 1,
        says: "config.json is not a valid run config: --batch-size must be at least 1",
        after: checkpoint_kept,
    },
    Case {
        name: "config.json with block_size 0",
        setup: |run, _| edit_config(run, "train.block_size", "0"),
        args: "train --resume --out RUN --max-steps 8",
        code: 1,
        says: "--block-size must be at least 1",
        after: checkpoint_kept,
    },
    Case {
        name: "config.json with learning_rate -1",
        setup: |run, _| edit_config(run, "adam.learning_rate", "-1"),
        args: "train --resume --out RUN --max-steps 8",
        code: 1,
        says: "--lr must be a positive number, not -1",
        after: checkpoint_kept,
    },
    Case {
        name: "config.json n_embd not the checkpoint's",
        setup: |run, _| edit_config(run, "model.n_embd", "64"),
        args: "generate --run RUN --prompt To",
        code: 1,
        says: "does not match checkpoint",
        after: checkpoint_kept,
    },
    Case {
        name: "config.json arch not the checkpoint's",
        setup: |run, _| {
            edit_config(run, "model.arch", "\"gpt\"");
            edit_config(run, "model.n_layer", "1");
            edit_config(run, "model.n_head", "1");
            edit_config(run, "model.block_size", "64");
        },
        args: "eval --run RUN",
        code: 1,
        says: "the model it describes has a variable gpt/wte/embeddings",
        after: checkpoint_kept,
    },
    Case {
        name: "resume with another corpus",
        setup: |_, dir| {
            std::fs::write(dir.join("other.txt"), "another text altogether, long enough to matter ".repeat(200))
                .unwrap()
        },
        args: "train --resume --out RUN --data DIR/other.txt --max-steps 8",
        code: 1,
        says: "is not the text this run was trained on",
        after: checkpoint_kept,
    },
    Case {
        name: "resume with the same corpus and the same flags",
        setup: no_setup,
        args: "train --resume --out RUN --data CORPUS --max-steps 8 --eval-batches 1 --seed 1337 --batch-size 32",
        code: 0,
        says: "trained 8 steps",
        after: usable,
    },
    Case {
        name: "resume with a flag of another value",
        setup: no_setup,
        args: "train --resume --out RUN --max-steps 8 --batch-size 16",
        code: 1,
        says: "--batch-size 16 differs from the run's 32",
        after: checkpoint_kept,
    },
    Case {
        name: "generate from a file",
        setup: no_setup,
        args: "generate --run CORPUS --prompt To",
        code: 1,
        says: "is a file, not a run directory or a SavedModel",
        after: nothing,
    },
    Case {
        name: "init-from a run directory",
        setup: no_setup,
        args: "train --init-from RUN --data CORPUS --out DIR/new --max-steps 3 --eval-batches 1 -q",
        code: 0,
        says: "trained 3 steps",
        after: |_, dir| usable(&dir.join("new"), dir),
    },
    Case {
        name: "eval on another corpus",
        setup: |_, dir| {
            std::fs::write(dir.join("other.txt"), "To be, or not to be: that is the question. ".repeat(400)).unwrap()
        },
        args: "eval --run RUN --data DIR/other.txt",
        code: 0,
        says: "val_loss: ",
        after: nothing,
    },
    Case {
        name: "--device gpu with the CPU wheel says why",
        setup: no_setup,
        args: "train --data CORPUS --out DIR/new --device gpu --max-steps 2",
        code: 1,
        says: "TensorFlow sees no GPU: minigpt is linked with a CPU-only TensorFlow",
        after: no_run_made,
    },
    Case {
        name: "a GPU memory fraction out of range",
        setup: no_setup,
        args: "generate --run RUN --prompt To --gpu-memory-fraction 1.5",
        code: 1,
        says: "--gpu-memory-fraction must be in (0, 1], not 1.5",
        after: nothing,
    },
    Case {
        name: "a batch no machine here holds",
        setup: no_setup,
        args: "train --out DIR/new --batch-size 1000000",
        code: 1,
        says: "this run needs about 337.1 GiB",
        after: no_run_made,
    },
    Case {
        name: "a model no machine here holds",
        setup: no_setup,
        args: "train --data CORPUS --out DIR/new --model gpt --n-embd 65536 --n-head 1 --n-layer 2",
        code: 1,
        says: "the model needs about 384.1 GiB (103,092,846,650 parameters, the graph of 2 blocks)",
        after: no_run_made,
    },
    Case {
        name: "a depth no machine here holds",
        setup: no_setup,
        args: "train --data CORPUS --out DIR/new --model gpt --n-embd 8 --n-head 1 --n-layer 100000",
        code: 1,
        says: "the model needs about 1172.2 GiB (87,201,514 parameters, the graph of 100000 blocks)",
        after: no_run_made,
    },
    Case {
        name: "a width TensorFlow cannot shape",
        setup: no_setup,
        args: "train --data CORPUS --out DIR/new --model gpt --n-embd 1000000000 --n-head 1 --n-layer 1",
        code: 1,
        says: "--n-embd 1000000000 is more than 536870911: the MLP's width",
        after: no_run_made,
    },
    Case {
        name: "a width no machine here holds (the notebook's model)",
        setup: no_setup,
        args: "train --data CORPUS --out DIR/new --n-embd 2000000000",
        code: 1,
        says: "the model needs about 864.3 GiB (232,000,000,058 parameters), more than the",
        after: no_run_made,
    },
    Case {
        name: "more threads than TensorFlow should start",
        setup: no_setup,
        args: "generate --run RUN --prompt To --intra-op-threads 100000",
        code: 1,
        says: "--intra-op-threads 100000 is more than 1024",
        after: nothing,
    },
    Case {
        name: "config.json with a depth no machine here holds",
        setup: |run, _| {
            edit_config(run, "model.arch", "\"gpt\"");
            edit_config(run, "model.n_layer", "100000");
            edit_config(run, "model.n_head", "1");
            edit_config(run, "model.block_size", "64");
        },
        args: "eval --run RUN",
        code: 1,
        says: "config.json is not a valid run config: the model needs about",
        after: checkpoint_kept,
    },
    Case {
        name: "minigpt.json with a training window of 0",
        setup: |run, dir| {
            poison_and_export(run, dir, "0");
            edit_declared(&dir.join("saved"), "train", "block_size", "0");
        },
        args: "eval --run DIR/saved --data CORPUS",
        code: 1,
        says: "minigpt.json: its train.block_size must be from 1 to 2147483647, not 0",
        after: nothing,
    },
    Case {
        name: "info on a minigpt.json that claims more than the model holds",
        setup: |run, dir| {
            poison_and_export(run, dir, "0");
            edit_declared(&dir.join("saved"), "model", "n_embd", "512");
        },
        args: "info --run DIR/saved",
        code: 1,
        says: "its variables hold",
        after: nothing,
    },
    Case {
        name: "info on a config.json the checkpoint contradicts",
        setup: |run, _| edit_config(run, "model.n_embd", "64"),
        args: "info --run RUN",
        code: 1,
        says: "does not match checkpoint",
        after: checkpoint_kept,
    },
    Case {
        name: "export while training: config.json a checkpoint behind",
        setup: |run, _| {
            let path = run.join("config.json");
            let mut config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
            config["steps_done"] = serde_json::json!(3);
            std::fs::write(path, config.to_string()).unwrap();
        },
        args: "export --run RUN --out DIR/saved",
        code: 0,
        says: "wrote SavedModel",
        after: |_, dir| {
            let text = std::fs::read_to_string(dir.join("saved/assets.extra/minigpt.json")).unwrap();
            let declared: serde_json::Value = serde_json::from_str(&text).unwrap();
            assert_eq!(declared["steps_done"], 5, "the steps of the checkpoint it exported");
        },
    },
    Case {
        name: "a run stopped before its first checkpoint is started again",
        setup: |run, _| {
            std::fs::remove_dir_all(run.join("ckpt")).unwrap();
        },
        args: "train --data CORPUS --out RUN --max-steps 3 --eval-batches 1 -q",
        code: 0,
        says: "trained 3 steps",
        after: usable,
    },
];

#[test]
fn every_hostile_case_gives_its_exit_code_and_message_and_leaves_things_usable() {
    let tmp = tempfile::tempdir().unwrap();
    let base = common::small_run(&tmp.path().join("base"), 30_000, &["--max-steps", "5", "--eval-batches", "1"]);
    let corpus = tmp.path().join("base/small.txt");
    let mut table = Vec::new();
    for (i, case) in CASES.iter().enumerate() {
        let dir = tmp.path().join(format!("case{i}"));
        std::fs::create_dir_all(&dir).unwrap();
        let run = dir.join("run");
        copy_dir(&base, &run);
        (case.setup)(&run, &dir);
        let args: Vec<String> = case
            .args
            .split(' ')
            .map(|a| {
                a.replace("RUN", run.to_str().unwrap())
                    .replace("DIR", dir.to_str().unwrap())
                    .replace("CORPUS", corpus.to_str().unwrap())
            })
            .collect();
        let out = common::minigpt().args(&args).timeout(Duration::from_secs(120)).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(!stderr.contains("panicked") && !stderr.contains("RUST_BACKTRACE"), "{}: {stderr}", case.name);
        assert_eq!(out.status.code(), Some(case.code), "{}: {stderr}", case.name);
        // Nothing of TensorFlow's start-up: an error is stderr's first line.
        let line = stderr.lines().next().unwrap_or("").to_string();
        if case.code == 0 {
            assert!(stdout.contains(case.says), "{}: {stdout}", case.name);
            assert!(!stdout.contains('\u{FFFD}'), "{}: a sample outside the vocabulary: {stdout}", case.name);
        } else {
            assert!(line.starts_with("error: ") && line.contains(case.says), "{}: {stderr}", case.name);
        }
        (case.after)(&run, &dir);
        assert!(leftovers(&dir).is_empty(), "{}: left behind {:?}", case.name, leftovers(&dir));
        table.push(format!("{:<58} exit {} {}", case.name, case.code, if case.code == 0 { "" } else { &line }));
    }
    println!("{}", table.join("\n"));
}

/// Temporary files a command must not leave behind.
fn leftovers(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap().flatten() {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            if path.is_dir() {
                stack.push(path.clone());
            }
            if name.starts_with(".partial-") || name.starts_with(".minigpt-export-") || name.starts_with(".tmp") {
                found.push(path);
            }
        }
    }
    found
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap().flatten() {
        let target = to.join(entry.file_name());
        if entry.path().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// A server that accepts connections and never answers (a download that hangs); each accepted
/// connection is reported on the channel.
fn silent_server() -> (String, std::sync::mpsc::Receiver<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/input.txt", listener.local_addr().unwrap());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        listener.set_nonblocking(true).unwrap();
        let start = Instant::now();
        let mut held = Vec::new();
        while start.elapsed() < Duration::from_secs(60) {
            if let Ok((stream, _)) = listener.accept() {
                held.push(stream);
                let _ = tx.send(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    });
    (url, rx)
}

#[test]
fn a_signal_while_loading_exits_at_once() {
    let tmp = tempfile::tempdir().unwrap();
    let (url, connected) = silent_server();
    for signal in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
        let mut child = Command::new(assert_cmd::cargo::cargo_bin("minigpt"))
            .args(["train", "--data", &url, "--out"])
            .arg(tmp.path().join("run"))
            .env("MINIGPT_CACHE", tmp.path().join("cache"))
            .env("TF_CPP_MIN_LOG_LEVEL", "2")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Downloading: connected, waiting for an answer that never comes.
        connected.recv_timeout(Duration::from_secs(30)).expect("minigpt never connected");
        let sent = Instant::now();
        // SAFETY: signalling our own child process.
        assert_eq!(unsafe { libc::kill(child.id() as i32, signal) }, 0);
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if sent.elapsed() > Duration::from_secs(20) {
                // SAFETY: as above.
                unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
                panic!("signal {signal} ignored while downloading");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        assert_eq!(status.code(), Some(130), "signal {signal}");
        let mut stderr = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
        assert_eq!(stderr, "interrupted while starting: nothing was trained, nothing to save\n", "signal {signal}");
        assert!(!tmp.path().join("run").exists(), "a run directory was left behind");
    }
}

/// A `minigpt.json` in a form minigpt did not write is ignored with one warning line: the model
/// is read as a SavedModel without one is.
#[test]
fn a_model_description_minigpt_cannot_read_is_a_warning() {
    let tmp = tempfile::tempdir().unwrap();
    let run = common::small_run(&tmp.path().join("base"), 30_000, &["--max-steps", "5", "--eval-batches", "1"]);
    let saved = tmp.path().join("saved");
    common::export(&run, &saved);
    std::fs::write(saved.join("assets.extra/minigpt.json"), r#"{"model": "a bigram", "steps_done": "five"}"#).unwrap();
    for command in [&["generate", "--prompt", "To", "--chars", "20", "--run"][..], &["info", "--run"]] {
        let out = common::minigpt().args(command).arg(&saved).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{command:?}: {stderr}");
        let lines: Vec<&str> = stderr.lines().collect();
        assert_eq!(lines.len(), 1, "{command:?}: {stderr}");
        assert!(
            lines[0].starts_with("warning: ") && lines[0].contains("minigpt.json is not in a form minigpt reads"),
            "{stderr}"
        );
    }
}

/// Arguments that are not UTF-8: a path minigpt can use works (an export), one TensorFlow cannot
/// take is one error line before anything is made, and neither panics.
#[test]
fn paths_that_are_not_utf8_work_or_give_one_line() {
    use std::os::unix::ffi::OsStrExt;
    let tmp = tempfile::tempdir().unwrap();
    let run = common::small_run(&tmp.path().join("base"), 30_000, &["--max-steps", "2", "--eval-batches", "1"]);
    let odd = |name: &[u8]| tmp.path().join(std::ffi::OsStr::from_bytes(name));
    let export =
        common::minigpt().args(["export", "-v", "--run"]).arg(&run).arg("--out").arg(odd(b"saved\xff")).output();
    let export = export.unwrap();
    assert!(export.status.success(), "{}", String::from_utf8_lossy(&export.stderr));
    assert!(odd(b"saved\xff").join("saved_model.pb").is_file());
    let train = common::minigpt()
        .args(["train", "--data"])
        .arg(tmp.path().join("base/small.txt"))
        .arg("--out")
        .arg(odd(b"run\xff"))
        .output()
        .unwrap();
    assert_eq!(train.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&train.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(common::last_stderr_line(&train).starts_with("error: --out: path "), "{stderr}");
    assert!(!odd(b"run\xff").exists(), "a run directory was made");
}

/// An evaluation of over a million windows says so when it starts and how far it is every 10 s.
#[test]
fn a_long_evaluation_shows_progress() {
    use std::io::BufRead;
    let tmp = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(common::corpus_path()).unwrap();
    let run = tmp.path().join("run");
    let trained = common::minigpt()
        .args(["train", "-q", "--max-steps", "2", "--eval-batches", "1", "--data"])
        .arg(common::corpus_path())
        .arg("--out")
        .arg(&run)
        .output()
        .unwrap();
    assert!(trained.status.success(), "{}", String::from_utf8_lossy(&trained.stderr));
    let big = tmp.path().join("big.txt");
    std::fs::write(&big, text.repeat(12)).unwrap();
    let mut child = Command::new(assert_cmd::cargo::cargo_bin("minigpt"))
        .args(["eval", "--run"])
        .arg(&run)
        .arg("--data")
        .arg(&big)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id() as i32;
    let mut seen = Vec::new();
    let mut lines = std::io::BufReader::new(child.stderr.take().unwrap()).lines().map(|l| l.unwrap());
    let progress = lines.find(|line| {
        seen.push(line.clone());
        line.starts_with("evaluating val: ")
    });
    // SAFETY: our own child, not yet waited for.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let _ = child.wait();
    assert!(
        seen.iter().any(|l| l == "evaluating 1,338,409 val windows (--eval-batches N evaluates N batches)"),
        "{seen:?}"
    );
    let progress = progress.expect("no progress line before the evaluation ended");
    assert!(progress.contains(" of 1,338,409 windows (") && progress.ends_with(" s"), "{progress}");
}

/// A SavedModel is a program: TensorFlow's loader runs its init op (here a TF1 `main_op` that
/// writes a file), which minigpt cannot prevent; it says so, naming the op, before it loads.
#[test]
fn a_savedmodel_whose_init_op_does_something_is_named_before_it_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let (saved, marker) = (tmp.path().join("tf1"), tmp.path().join("marker"));
    let script = "import sys, tensorflow as tf\n\
        tf1 = tf.compat.v1\n\
        g = tf.Graph()\n\
        with g.as_default():\n\
        \x20   tokens = tf1.placeholder(tf.int32, [None, None], name='tokens')\n\
        \x20   table = tf1.get_variable('embedding/embeddings', shape=[3, 3])\n\
        \x20   logits = tf.gather(table, tokens, name='logits')\n\
        \x20   main_op = tf.io.write_file(sys.argv[2], 'written on load')\n\
        \x20   with tf1.Session() as s:\n\
        \x20       s.run(tf1.global_variables_initializer())\n\
        \x20       b = tf1.saved_model.Builder(sys.argv[1])\n\
        \x20       sig = tf1.saved_model.predict_signature_def({'tokens': tokens}, {'logits': logits})\n\
        \x20       b.add_meta_graph_and_variables(s, ['serve'], signature_def_map={'serving_default': sig}, \
        main_op=main_op)\n\
        \x20       b.save()\n";
    let made = Command::new(common::python()).args(["-c", script]).arg(&saved).arg(&marker).output().unwrap();
    assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
    assert!(!marker.exists());
    let out = common::minigpt().args(["info", "--run"]).arg(&saved).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let first = stderr.lines().next().unwrap_or("");
    assert!(
        first.starts_with("warning: ")
            && first.contains("loading it runs its init op WriteFile (WriteFile)")
            && first.ends_with("a SavedModel is a program; load only ones you trust"),
        "{stderr}"
    );
    assert!(marker.exists(), "TensorFlow's loader ran the init op, as the warning says");
}

/// The peak resident memory (VmHWM) of `minigpt train` on `corpus`, in bytes, read from /proc
/// until the process ends.
fn train_peak_memory(corpus: &Path, out: &Path) -> u64 {
    let mut child = Command::new(assert_cmd::cargo::cargo_bin("minigpt"))
        .args(["train", "-q", "--max-steps", "1", "--eval-batches", "1", "--shuffle", "none", "--data"])
        .arg(corpus)
        .arg("--out")
        .arg(out)
        .env("TF_CPP_MIN_LOG_LEVEL", "2")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let status = format!("/proc/{}/status", child.id());
    let mut peak = 0u64;
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        let kib = std::fs::read_to_string(&status).ok().and_then(|s| {
            s.lines().find_map(|l| l.strip_prefix("VmHWM:"))?.trim().trim_end_matches("kB").trim().parse::<u64>().ok()
        });
        peak = peak.max(kib.unwrap_or(0) * 1024);
        assert!(start.elapsed() < Duration::from_secs(300), "training never ended");
        std::thread::sleep(Duration::from_millis(5));
    }
    peak
}

/// A corpus costs memory in proportion to its size, a few bytes a character (its text and its
/// ids): 24 more MiB of corpus raise training's peak by at most 6 bytes a character.
#[test]
fn corpus_memory_is_a_few_bytes_a_character() {
    let tmp = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(common::corpus_path()).unwrap();
    let (small, big) = (tmp.path().join("small.txt"), tmp.path().join("big.txt"));
    std::fs::write(&small, &text).unwrap();
    let big_text = text.repeat(24);
    std::fs::write(&big, &big_text).unwrap();
    let base = train_peak_memory(&small, &tmp.path().join("small"));
    let peak = train_peak_memory(&big, &tmp.path().join("big"));
    let per_char = (peak.saturating_sub(base)) as f64 / (big_text.len() - text.len()) as f64;
    eprintln!(
        "peak {base} bytes with {} characters, {peak} with {}: {per_char:.2} bytes a character",
        text.len(),
        big_text.len()
    );
    assert!(per_char <= 6.0, "{per_char:.2} bytes a character");
}
