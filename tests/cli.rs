//! The command line end to end: a short run, reproducibility, generation, and every kind of bad
//! input giving one clear error line and a non-zero exit.

mod common;

use std::path::Path;

use common::minigpt;

/// A small corpus made from the start of Tiny Shakespeare.
fn small_corpus(dir: &Path) -> std::path::PathBuf {
    let text = std::fs::read_to_string(common::corpus_path()).unwrap();
    let path = dir.join("small.txt");
    std::fs::write(&path, &text[..60_000]).unwrap();
    path
}

fn train(corpus: &Path, out: &Path, steps: u32, extra: &[&str]) -> std::process::Output {
    minigpt()
        .arg("train")
        .arg("--data")
        .arg(corpus)
        .arg("--out")
        .arg(out)
        .args(["--max-steps", &steps.to_string(), "--eval-batches", "4"])
        .args(extra)
        .output()
        .unwrap()
}

fn losses(stdout: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(stdout).lines().filter(|l| l.starts_with("Step ")).map(str::to_string).collect()
}

#[test]
fn train_then_generate_and_eval() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = small_corpus(tmp.path());
    let run = tmp.path().join("run");
    let out = train(&corpus, &run, 120, &["--log-every", "20"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("Epoch 1"), "{stdout}");
    let steps = losses(&out.stdout);
    assert_eq!(steps.len(), 6, "{stdout}");
    let first: f64 = steps[0].rsplit(' ').next().unwrap().parse().unwrap();
    let last: f64 = steps[5].rsplit(' ').next().unwrap().parse().unwrap();
    assert!((first - (65f64).ln()).abs() < 0.3, "initial loss {first} is not near ln(vocab)");
    assert!(last < first - 0.5, "loss did not fall: {first} -> {last}");
    for file in ["config.json", "metrics.csv", "loss.png", "ckpt/checkpoint", "ckpt/ckpt-120.index"] {
        assert!(run.join(file).is_file(), "{file} missing");
    }
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["steps_done"], 120);
    let vocab = config["vocab"].as_array().unwrap().len();
    assert!(
        stdout.contains(&format!(
            "model: bigram, {} parameters",
            minigpt::text::thousands((2 * vocab * 128 + vocab) as u64)
        )),
        "{stdout}"
    );
    let info = minigpt().arg("info").arg("--run").arg(&run).output().unwrap();
    assert!(info.status.success());
    let info = String::from_utf8_lossy(&info.stdout);
    for needle in [
        format!("parameters:   {}", minigpt::text::thousands((2 * vocab * 128 + vocab) as u64)),
        format!("vocabulary:   {vocab} characters"),
        "trained:      120 steps".to_string(),
        "last losses:  train ".to_string(),
        format!("SHA-256 {}", config["data"]["sha256"].as_str().unwrap()),
        "checkpoints:  ckpt-120".to_string(),
    ] {
        assert!(info.contains(&needle), "{needle:?} not in:\n{info}");
    }
    assert_eq!(config["train"]["block_size"], 64);

    let gen = |seed: &str| {
        minigpt()
            .args(["generate", "--prompt", "To be, or not to be", "--chars", "80", "--seed", seed])
            .arg("--run")
            .arg(&run)
            .output()
            .unwrap()
    };
    let a = gen("7");
    assert!(a.status.success(), "{}", String::from_utf8_lossy(&a.stderr));
    let text = String::from_utf8(a.stdout.clone()).unwrap();
    assert!(text.starts_with("To be, or not to be"));
    assert_eq!(text.trim_end_matches('\n').chars().count(), 19 + 80);
    assert_eq!(gen("7").stdout, a.stdout, "same seed, same text");
    assert_ne!(gen("8").stdout, a.stdout, "another seed, another text");

    let eval = minigpt().arg("eval").arg("--run").arg(&run).output().unwrap();
    assert!(eval.status.success(), "{}", String::from_utf8_lossy(&eval.stderr));
    let eval = String::from_utf8(eval.stdout).unwrap();
    let val: f64 = eval.lines().next().unwrap().strip_prefix("val_loss: ").unwrap().parse().unwrap();
    assert!(val > 1.0 && val < 4.0, "{eval}");
    assert!(eval.contains("val_perplexity: "));
    // An estimate from a few random batches: close, not equal, the same every time.
    let estimate = || {
        let out = minigpt().args(["eval", "--eval-batches", "3", "--run"]).arg(&run).output().unwrap();
        let text = String::from_utf8(out.stdout).unwrap();
        text.lines().next().unwrap().strip_prefix("val_loss: ").unwrap().parse::<f64>().unwrap()
    };
    let (e1, e2) = (estimate(), estimate());
    assert_eq!(e1, e2);
    assert!(e1 != val && (e1 - val).abs() < 0.3, "{e1} vs {val}");
}

#[test]
fn same_seed_same_losses_bit_for_bit() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = small_corpus(tmp.path());
    let a = train(&corpus, &tmp.path().join("a"), 40, &["--log-every", "1"]);
    let b = train(&corpus, &tmp.path().join("b"), 40, &["--log-every", "1"]);
    let c = train(&corpus, &tmp.path().join("c"), 40, &["--log-every", "1", "--seed", "2"]);
    assert!(a.status.success() && b.status.success() && c.status.success());
    let metrics = |run: &str| std::fs::read_to_string(tmp.path().join(run).join("metrics.csv")).unwrap();
    assert_eq!(losses(&a.stdout), losses(&b.stdout));
    assert_eq!(metrics("a"), metrics("b"), "full-precision losses differ");
    assert_ne!(metrics("a"), metrics("c"));
}

/// Runs minigpt and checks it fails with one `error:` line containing `needle`, after nothing but
/// minigpt's own warnings.
fn fails_with(args: &[&str], needle: &str) {
    let out = minigpt().args(args).output().unwrap();
    assert!(!out.status.success(), "{args:?} succeeded");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let (last, before) = stderr.lines().collect::<Vec<_>>().split_last().map(|(l, b)| (*l, b.to_vec())).unwrap();
    assert!(last.starts_with("error: ") && last.contains(needle), "{args:?}: {stderr}");
    assert!(before.iter().all(|l| l.starts_with("warning: ")), "{args:?}: {stderr}");
    assert!(!stderr.contains("panicked") && !stderr.contains("RUST_BACKTRACE"), "{stderr}");
}

#[test]
fn bad_input_gives_one_clear_line() {
    let tmp = tempfile::tempdir().unwrap();
    let p = |name: &str| tmp.path().join(name).to_str().unwrap().to_string();
    std::fs::write(p("empty.txt"), "").unwrap();
    std::fs::write(p("short.txt"), "To be, or not to be").unwrap();
    std::fs::write(p("binary.txt"), [b'a', 0xff, 0xfe, b'b']).unwrap();
    let out = p("out");
    fails_with(&["train", "--data", &p("missing.txt"), "--out", &out], "reading corpus");
    fails_with(&["train", "--data", &p("empty.txt"), "--out", &out], "is empty");
    fails_with(&["train", "--data", &p("short.txt"), "--out", &out], "too short");
    fails_with(&["train", "--data", &p("binary.txt"), "--out", &out], "not valid UTF-8");
    fails_with(&["train", "--data", &p("short.txt"), "--out", &out, "--batch-size", "0"], "--batch-size");
    fails_with(&["train", "--data", &p("short.txt"), "--out", &out, "--block-size", "0"], "--block-size");
    fails_with(&["train", "--data", &p("short.txt"), "--out", &out, "--lr=-1"], "--lr");
    fails_with(&["generate", "--run", &p("no-such-run"), "--prompt", "hi"], "not a run directory");
    fails_with(&["eval", "--run", &p("no-such-run")], "not a run directory");

    // A real run, then damage it in several ways.
    let corpus = small_corpus(tmp.path());
    let run = tmp.path().join("run");
    assert!(train(&corpus, &run, 5, &[]).status.success());
    let run_s = run.to_str().unwrap();
    fails_with(&["generate", "--run", run_s, "--prompt", "Grüße, 世界"], "'ü', 'ß', '世', '界'");
    fails_with(&["generate", "--run", run_s, "--prompt", ""], "prompt is empty");
    fails_with(&["generate", "--run", run_s, "--prompt", "To", "--temperature", "0"], "--temperature");
    fails_with(&["train", "--data", corpus.to_str().unwrap(), "--out", run_s], "already holds a run");

    let ckpt = run.join("ckpt/ckpt-5.data-00000-of-00001");
    let good = std::fs::read(&ckpt).unwrap();
    std::fs::write(&ckpt, &good[..good.len() / 2]).unwrap();
    fails_with(&["generate", "--run", run_s, "--prompt", "To"], "no usable checkpoint");
    std::fs::remove_file(run.join("ckpt/ckpt-5.index")).unwrap();
    fails_with(&["generate", "--run", run_s, "--prompt", "To"], "ckpt-5 damaged");
    std::fs::remove_file(run.join("ckpt/checkpoint")).unwrap();
    fails_with(&["generate", "--run", run_s, "--prompt", "To"], "has no checkpoint");
    // A hand-edited config.json is checked by the command line's rules.
    let config = std::fs::read_to_string(run.join("config.json")).unwrap();
    for (field, bad, needle) in
        [("batch_size", "0", "--batch-size must be at least 1"), ("learning_rate", "-1", "--lr must be")]
    {
        let edited = config.replacen(&format!("\"{field}\": "), &format!("\"{field}\": {bad}, \"was_{field}\": "), 1);
        std::fs::write(run.join("config.json"), edited).unwrap();
        fails_with(&["generate", "--run", run_s, "--prompt", "To"], needle);
        fails_with(&["train", "--resume", "--out", run_s], needle);
    }
    std::fs::write(run.join("config.json"), "{ not json").unwrap();
    fails_with(&["generate", "--run", run_s, "--prompt", "To"], "not a valid run config");
}

#[test]
fn devices_prints_the_notebook_line_and_tensorflow_only_with_verbose() {
    let out = minigpt().arg("devices").output().unwrap();
    assert!(out.status.success());
    // TensorFlow loads after the command line is read: none of its start-up lines by default.
    assert_eq!(String::from_utf8_lossy(&out.stderr), "");
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(stdout.contains("CPU:0"), "{stdout}");
    assert!(stdout.lines().any(|l| l.starts_with("Num GPUs Available: ")), "{stdout}");
    let verbose = minigpt().args(["-v", "devices"]).output().unwrap();
    assert!(verbose.status.success());
    let stderr = String::from_utf8_lossy(&verbose.stderr);
    assert!(stderr.contains("oneDNN custom operations"), "-v shows TensorFlow's log: {stderr}");
    assert_eq!(verbose.stdout, stdout.as_bytes());
}

#[test]
fn gpu_settings_are_accepted_on_the_cpu_and_placement_is_logged() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = small_corpus(tmp.path());
    let run = tmp.path().join("run");
    let gpu = ["--gpus", "0", "--gpu-memory-fraction", "0.5", "--log-every", "1"];
    let out = train(&corpus, &run, 2, &gpu);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = minigpt()
        .args(["generate", "--prompt", "To", "--chars", "3", "--log-placement", "--run"])
        .arg(&run)
        .output()
        .unwrap();
    assert!(out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("device:CPU:0"), "no placement lines: {stderr}");
}

#[test]
fn eval_every_adds_validation_points_to_the_metrics_and_the_plot() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = small_corpus(tmp.path());
    let run = tmp.path().join("run");
    let out = train(&corpus, &run, 100, &["--eval-every", "25", "--log-every", "10"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let metrics = minigpt::run::RunDir::open(&run).unwrap().read_metrics().unwrap();
    let (train_points, val_points) = minigpt::plot::series(&metrics);
    assert_eq!(val_points.iter().map(|p| p.0 as u64).collect::<Vec<_>>(), [25, 50, 75, 100], "{metrics:?}");
    assert_eq!(train_points.len(), 10);
    // The lowest validation loss is kept as ckpt/best, apart from the rotation.
    let best = val_points.iter().cloned().fold((0.0, f64::INFINITY), |b, p| if p.1 < b.1 { p } else { b });
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["best"]["step"].as_f64(), Some(best.0), "{config}");
    assert!((config["best"]["val_loss"].as_f64().unwrap() - best.1).abs() < 1e-12);
    assert!(run.join("ckpt/best.index").is_file() && run.join("ckpt/best.data-00000-of-00001").is_file());
    let info = minigpt().arg("info").arg("--run").arg(&run).output().unwrap();
    assert!(String::from_utf8_lossy(&info.stdout).contains(&format!("at step {} (ckpt/best)", best.0)));
    let png = std::fs::read(run.join("loss.png")).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    assert!(png.len() > 20_000, "a plot with axes, labels and two curves is larger than {} bytes", png.len());
}

#[test]
fn session_settings_change_speed_not_what_is_learned() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = small_corpus(tmp.path());
    let loss_at_end = |extra: &[&str], name: &str| -> f64 {
        let out = train(&corpus, &tmp.path().join(name), 60, &[&["--log-every", "59"], extra].concat());
        assert!(out.status.success(), "{extra:?}: {}", String::from_utf8_lossy(&out.stderr));
        losses(&out.stdout).last().unwrap().rsplit(' ').next().unwrap().parse().unwrap()
    };
    let plain = loss_at_end(&[], "plain");
    let threads = loss_at_end(&["--intra-op-threads", "1", "--inter-op-threads", "1"], "threads");
    let xla = loss_at_end(&["--xla"], "xla");
    // Printed with 4 decimals; XLA rounds differently, by far less than that.
    assert!((plain - threads).abs() <= 1e-4 && (plain - xla).abs() <= 1e-4, "{plain} {threads} {xla}");
}

#[test]
fn every_subcommand_has_help_with_defaults() {
    for (command, needles) in [
        (
            "train",
            &["[default: 64]", "[default: 32]", "[default: 0.001]", "[default: 3]", "--resume", "--init-from", "--xla"]
                [..],
        ),
        ("generate", &["[default: 200]", "[default: 1337]", "--vocab", "SavedModel"][..]),
        ("eval", &["--split", "[default: val]", "SavedModel"][..]),
        ("export", &["--run", "--out"][..]),
        ("info", &["--run"][..]),
        ("graph", &["[default: 65]", "[default: bigram]"][..]),
        ("devices", &["Usage: minigpt devices"][..]),
    ] {
        let out = minigpt().args([command, "--help"]).output().unwrap();
        assert!(out.status.success(), "{command} --help");
        let help = String::from_utf8_lossy(&out.stdout);
        assert!(help.contains(&format!("Usage: minigpt {command}")), "{help}");
        for needle in needles {
            assert!(help.contains(needle), "{command} --help lacks {needle:?}:\n{help}");
        }
    }
}

#[test]
fn optimizer_options_are_used_and_saved() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = small_corpus(tmp.path());
    let run = tmp.path().join("run");
    let flags = [
        "--warmup-steps",
        "10",
        "--lr-decay-steps",
        "50",
        "--min-lr",
        "1e-4",
        "--weight-decay",
        "0.1",
        "--grad-clip",
        "1.0",
        "--beta2",
        "0.99",
    ];
    let out = train(&corpus, &run, 60, &[&flags[..], &["--log-every", "10"]].concat());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("config.json")).unwrap()).unwrap();
    let adam = &config["train"]["adam"];
    assert_eq!((adam["warmup_steps"].as_u64(), adam["decay_steps"].as_u64()), (Some(10), Some(50)));
    assert_eq!(
        (adam["min_lr"].as_f64(), adam["weight_decay"].as_f64(), adam["clip_norm"].as_f64(), adam["beta_2"].as_f64()),
        (Some(1e-4), Some(0.1), Some(1.0), Some(0.99))
    );
    // A different optimizer, a different run.
    let plain = train(&corpus, &tmp.path().join("plain"), 60, &["--log-every", "10"]);
    assert_ne!(losses(&out.stdout), losses(&plain.stdout));
    fails_with(
        &[
            "train",
            "--data",
            corpus.to_str().unwrap(),
            "--out",
            &tmp.path().join("x").to_string_lossy(),
            "--warmup-steps",
            "10",
            "--lr-decay-steps",
            "5",
        ],
        "--lr-decay-steps must be larger",
    );
}

/// Whether TensorFlow's log (`-v`) says it compiled a cluster with XLA.
fn compiled_with_xla(corpus: &Path, dir: &Path, extra: &[&str]) -> bool {
    let out = minigpt()
        .args(["-v", "train", "--max-steps", "2", "--eval-batches", "1", "--block-size", "8", "--batch-size", "2"])
        .arg("--data")
        .arg(corpus)
        .arg("--out")
        .arg(dir)
        .args(extra)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stderr).contains("Compiled cluster using XLA")
}

#[test]
fn the_transformer_trains_with_xla_by_default_and_the_bigram_without() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = small_corpus(tmp.path());
    let gpt: Vec<&str> = common::TINY_GPT.split(' ').collect();
    assert!(compiled_with_xla(&corpus, &tmp.path().join("gpt"), &gpt));
    assert!(!compiled_with_xla(&corpus, &tmp.path().join("gpt-no"), &[&gpt[..], &["--no-xla"]].concat()));
    assert!(!compiled_with_xla(&corpus, &tmp.path().join("bigram"), &[]));
    assert!(compiled_with_xla(&corpus, &tmp.path().join("bigram-xla"), &["--xla"]));
}

#[test]
fn the_transformer_trains_with_dropout_and_says_what_it_is() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = small_corpus(tmp.path());
    let flags = format!("{} --block-size 16 --batch-size 8 --log-every 10", common::TINY_GPT);
    let gpt: Vec<&str> = flags.split(' ').collect();
    let run = tmp.path().join("gpt");
    let out = train(&corpus, &run, 30, &[&gpt[..], &["--dropout", "0.2"]].concat());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // Token and position tables, 2 blocks of 12 variables, the final LayerNorm and the head.
    let (v, c) = (String::from_utf8(out.stdout.clone()).unwrap(), 16u64);
    let vocab: u64 =
        serde_json::from_str::<serde_json::Value>(&std::fs::read_to_string(run.join("config.json")).unwrap()).unwrap()
            ["vocab"]
            .as_array()
            .unwrap()
            .len() as u64;
    let block = 2 * c + 3 * c * c + 3 * c + c * c + c + 2 * c + 4 * c * c + 4 * c + 4 * c * c + c;
    let params = vocab * c + 16 * c + 2 * block + 2 * c + c * vocab + vocab;
    assert!(v.contains(&format!("{} parameters", minigpt::text::thousands(params))), "{v}");
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("config.json")).unwrap()).unwrap();
    assert_eq!((config["model"]["arch"].as_str(), config["model"]["dropout"].as_f64()), (Some("gpt"), Some(0.2)));
    let info = minigpt().arg("info").arg("--run").arg(&run).output().unwrap();
    assert!(String::from_utf8_lossy(&info.stdout)
        .contains("model:        gpt, 2 blocks, 2 heads, n_embd 16, block 16, dropout 0.2"));
    // Dropout changes what is learned; without it, another run.
    let plain = train(&corpus, &tmp.path().join("plain"), 30, &gpt);
    assert_ne!(losses(&out.stdout), losses(&plain.stdout));

    let x = tmp.path().join("x").to_string_lossy().to_string();
    let c = corpus.to_str().unwrap();
    fails_with(&["train", "--data", c, "--out", &x, "--dropout", "0.1"], "--dropout applies to --model gpt");
    fails_with(&["train", "--data", c, "--out", &x, "--model", "gpt", "--dropout", "1"], "--dropout must be in [0, 1)");
    fails_with(
        &["train", "--data", c, "--out", &x, "--model", "gpt", "--n-head", "3"],
        "--n-head (3) must divide --n-embd (128)",
    );
}

#[test]
fn a_mixed_precision_run_keeps_its_policy_through_eval_generate_and_export() {
    let tmp = tempfile::tempdir().unwrap();
    let flags = format!("{} --block-size 16 --max-steps 30 --precision mixed_bfloat16", common::TINY_GPT);
    let run = common::small_run(tmp.path(), 20_000, &flags.split(' ').collect::<Vec<_>>());
    let config = std::fs::read_to_string(run.join("config.json")).unwrap();
    assert!(config.contains("\"precision\": \"mixed_bfloat16\""), "{config}");
    let info = minigpt().arg("info").arg("--run").arg(&run).output().unwrap();
    assert!(String::from_utf8_lossy(&info.stdout).contains("dropout 0, mixed_bfloat16"));

    // The in-graph loop and the notebook's loop draw the same text under the run's policy.
    let generate = |extra: &[&str]| {
        let out = minigpt()
            .args(["generate", "--prompt", "ROMEO:", "--chars", "40", "--run"])
            .arg(&run)
            .args(extra)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    assert_eq!(generate(&[]), generate(&["--no-cache"]));
    // Variables are float32 whatever the policy: the same checkpoint evaluates in float32, close
    // to the bfloat16 loss.
    let val_loss = |extra: &[&str]| -> f64 {
        let out = minigpt().args(["eval", "--eval-batches", "4", "--run"]).arg(&run).args(extra).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let text = String::from_utf8(out.stdout).unwrap();
        text.lines().find_map(|l| l.strip_prefix("val_loss: ")).unwrap().parse().unwrap()
    };
    let (mixed, float32) = (val_loss(&[]), val_loss(&["--precision", "float32"]));
    assert!(mixed != float32 && (mixed - float32).abs() < 0.02, "{mixed} against {float32}");

    // An export computes in the run's policy and says so; its logits stay float32.
    let saved = tmp.path().join("saved");
    common::export(&run, &saved);
    let declared = std::fs::read_to_string(saved.join("assets.extra/minigpt.json")).unwrap();
    assert!(declared.contains("\"precision\": \"mixed_bfloat16\""), "{declared}");
    let saved_loss = val_loss_of(&saved);
    assert!((saved_loss - mixed).abs() < 0.02, "{saved_loss} against {mixed}");
    fails_with(
        &["eval", "--run", saved.to_str().unwrap(), "--precision", "float32"],
        "--precision float32 applies to run directories",
    );
}

/// The validation loss of a SavedModel on the corpus it was trained on (4 batches).
fn val_loss_of(saved: &Path) -> f64 {
    let out = minigpt()
        .args(["eval", "--eval-batches", "4", "--data", &saved.parent().unwrap().join("small.txt").to_string_lossy()])
        .arg("--run")
        .arg(saved)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    text.lines().find_map(|l| l.strip_prefix("val_loss: ")).unwrap().parse().unwrap()
}
