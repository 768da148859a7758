//! `minigpt export` writes a SavedModel that Python's `tf.saved_model.load` reads: its
//! `serving_default` logits equal minigpt's, and its `train_step` trains.

mod common;

use std::process::Command;

use minigpt::device::{DeviceChoice, SessionConfig};
use minigpt::graph::Runner;
use minigpt::run::{Load, RunConfig, RunDir};
use ndarray::ArrayD;
use ndarray_npy::ReadNpyExt;
use tensorflow::Tensor;

/// The run's newest checkpoint in an inference graph.
fn load(run: &std::path::Path) -> (RunConfig, Runner) {
    let session = SessionConfig { device: DeviceChoice::Cpu, ..Default::default() };
    RunDir::open(run).unwrap().load(Load::Inference { sampler: None }, session).unwrap()
}

#[test]
fn python_loads_the_export_and_computes_minigpts_logits() {
    let tmp = tempfile::tempdir().unwrap();
    let run = common::small_run(tmp.path(), 30_000, &["--max-steps", "20", "--eval-batches", "1"]);
    check_export(tmp.path(), &run, 50);
}

#[test]
fn python_loads_a_gpt_export_and_minigpt_reads_it_back() {
    let tmp = tempfile::tempdir().unwrap();
    // With dropout, which serving must not apply (the logits are compared with minigpt's).
    let flags = format!("{} --block-size 16 --batch-size 4 --dropout 0.2", common::TINY_GPT);
    let gpt: Vec<&str> = flags.split(' ').collect();
    let run =
        common::small_run(tmp.path(), 30_000, &[&gpt[..], &["--max-steps", "20", "--eval-batches", "1"]].concat());
    check_export(tmp.path(), &run, 16);
    let model = tmp.path().join("exported");
    // minigpt samples from it (cropping to its 16 positions) and fine-tunes it as the GPT it is.
    let out = common::minigpt()
        .args(["generate", "--prompt", "ROMEO:", "--chars", "40", "--run"])
        .arg(&model)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8(out.stdout).unwrap().trim_end_matches('\n').chars().count(), "ROMEO:".len() + 40);
    let tuned = tmp.path().join("tuned");
    let out = common::minigpt()
        .args([
            "train",
            "-q",
            "--max-steps",
            "5",
            "--eval-batches",
            "1",
            "--batch-size",
            "4",
            "--block-size",
            "16",
            "--data",
        ])
        .arg(tmp.path().join("small.txt"))
        .arg("--init-from")
        .arg(&model)
        .arg("--out")
        .arg(&tuned)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tuned.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["model"]["arch"], "gpt");
    assert_eq!(config["model"]["n_layer"], 2);
    // Its shape is the SavedModel's: a longer context than its position table, or another model,
    // is refused.
    let refused = |extra: &[&str]| {
        let out = common::minigpt()
            .args(["train", "-q", "--max-steps", "5", "--data"])
            .arg(tmp.path().join("small.txt"))
            .arg("--init-from")
            .arg(&model)
            .arg("--out")
            .arg(tmp.path().join("refused"))
            .args(extra)
            .output()
            .unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    assert!(refused(&["--block-size", "32"]).contains("--block-size 32 exceeds the model's 16 positions"));
    assert!(refused(&["--n-layer", "3"]).contains("cannot be used with"));
}

/// Exports `run` to `dir/exported`; Python loads it: its logits on [2, t] tokens equal minigpt's,
/// its `train_step` starts from minigpt's loss and lowers it.
fn check_export(dir: &std::path::Path, run: &std::path::Path, t: usize) {
    let tmp = dir;
    let model = tmp.join("exported");
    let export = || common::minigpt().arg("export").arg("--run").arg(run).arg("--out").arg(&model).output().unwrap();
    let out = export();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // Never over an existing directory.
    let again = export();
    assert!(!again.status.success());
    assert!(common::last_stderr_line(&again).contains("already exists"));

    // Tokens [2, t] and a batch, made here and given to both sides.
    let tokens: Vec<i32> = (0..2 * t as i32).map(|i| (i * 7 + 3) % 40).collect();
    let targets: Vec<i32> = (0..2 * t as i32).map(|i| (i * 11 + 5) % 40).collect();
    let script = r#"
import json, sys, numpy as np, tensorflow as tf
model_dir, out, tokens, targets = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), json.loads(sys.argv[4])
m = tf.saved_model.load(model_dir)
x = tf.constant(np.array(tokens, np.int32).reshape(2, -1))
y = tf.constant(np.array(targets, np.int32).reshape(2, -1))
np.save(out, m.signatures["serving_default"](tokens=x)["logits"].numpy())
step = m.signatures["train_step"]
print(json.dumps([float(step(x=x, y=y)["loss"]) for _ in range(3)]))
print(json.dumps(json.load(open(model_dir + "/assets.extra/vocab.json"))))
"#;
    let npy = tmp.join("logits.npy");
    let json = |v: &[i32]| serde_json::to_string(v).unwrap();
    let py = Command::new(common::python())
        .env("TF_CPP_MIN_LOG_LEVEL", "3")
        .arg("-c")
        .arg(script)
        .arg(&model)
        .arg(&npy)
        .args([json(&tokens), json(&targets)])
        .output()
        .unwrap();
    assert!(py.status.success(), "{}", String::from_utf8_lossy(&py.stderr));
    let stdout = String::from_utf8(py.stdout).unwrap();
    let mut lines = stdout.lines();
    let losses: Vec<f64> = serde_json::from_str(lines.next().unwrap()).unwrap();
    let vocab: Vec<String> = serde_json::from_str(lines.next().unwrap()).unwrap();
    let python_logits = ArrayD::<f32>::read_npy(std::fs::File::open(&npy).unwrap()).unwrap();

    let (config, runner) = load(run);
    assert_eq!(vocab, config.vocab);
    let x = Tensor::new(&[2, t as u64]).with_values(&tokens).unwrap();
    let y = Tensor::new(&[2, t as u64]).with_values(&targets).unwrap();
    let ours: Vec<Tensor<f32>> = vec![runner.logits(&x).unwrap(), Tensor::from(runner.loss::<f32>(&x, &y).unwrap())];
    assert_eq!(python_logits.shape(), [2, t, config.model.vocab_size as usize]);
    let max_diff = ours[0].iter().zip(python_logits.iter()).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
    let scale = python_logits.iter().fold(1.0f32, |m, l| m.max(l.abs()));
    assert!(max_diff <= 1e-6 * scale, "logits differ by {max_diff}");
    // The first step's loss is minigpt's loss on the batch; the steps lower it.
    assert!((losses[0] - ours[1][0] as f64).abs() <= 1e-6, "{losses:?} vs {}", ours[1][0]);
    assert!(losses[2] < losses[1] && losses[1] < losses[0], "{losses:?}");
}

fn python(args: &[&std::ffi::OsStr]) -> String {
    let out = Command::new(common::python()).env("TF_CPP_MIN_LOG_LEVEL", "3").args(args).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

fn max_abs_diff(a: &[f32], b: &ArrayD<f32>) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b.iter()).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

#[test]
fn python_savedmodels_load_generate_evaluate_and_fine_tune() {
    let tmp = tempfile::tempdir().unwrap();
    let p = |name: &str| tmp.path().join(name);
    let text = std::fs::read_to_string(common::corpus_path()).unwrap();
    std::fs::write(p("small.txt"), &text[..30_000]).unwrap();
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));

    // The notebook's model, trained 30 steps by Python, in both SavedModel flavours.
    let script = root.join("python_export/export_savedmodel.py");
    python(&[
        script.as_os_str(),
        "--data".as_ref(),
        p("small.txt").as_os_str(),
        "--steps".as_ref(),
        "30".as_ref(),
        "--out".as_ref(),
        p("py").as_os_str(),
        "--keras-export".as_ref(),
        p("keras").as_os_str(),
    ]);
    // Python's logits for fixed tokens, from each.
    let tokens: Vec<i32> = (0..60).map(|i| (i * 13 + 1) % 30).collect();
    let logits_script = r#"
import json, sys, numpy as np, tensorflow as tf
tokens = tf.constant(np.array(json.loads(sys.argv[1]), np.int32).reshape(2, 30))
for d, key, out in [(sys.argv[2], "logits", sys.argv[3]), (sys.argv[4], "output_0", sys.argv[5])]:
    np.save(out, tf.saved_model.load(d).signatures["serving_default"](tokens=tokens)[key].numpy())
"#;
    let json = serde_json::to_string(&tokens).unwrap();
    python(&[
        "-c".as_ref(),
        logits_script.as_ref(),
        json.as_ref(),
        p("py").as_os_str(),
        p("py.npy").as_os_str(),
        p("keras").as_os_str(),
        p("keras.npy").as_os_str(),
    ]);
    let x = Tensor::new(&[2, 30]).with_values(&tokens).unwrap();
    for (dir, npy, vocab) in [("py", "py.npy", None), ("keras", "keras.npy", Some(p("small.txt")))] {
        let loaded = minigpt::saved_model::Loaded::load(&p(dir), vocab.as_deref(), Default::default()).unwrap();
        let want = ArrayD::<f32>::read_npy(std::fs::File::open(p(npy)).unwrap()).unwrap();
        let diff = max_abs_diff(&loaded.logits(&x).unwrap(), &want);
        assert!(diff <= 1e-6, "{dir}: logits differ by {diff}");
    }

    // The command line on them.
    let minigpt = |args: &[&std::ffi::OsStr]| common::minigpt().args(args).output().unwrap();
    let ok = |out: std::process::Output| {
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    let val_loss =
        |stdout: &str| -> f64 { stdout.lines().find_map(|l| l.strip_prefix("val_loss: ")).unwrap().parse().unwrap() };
    let generated = ok(minigpt(&[
        "generate".as_ref(),
        "--run".as_ref(),
        p("py").as_os_str(),
        "--prompt".as_ref(),
        "The".as_ref(),
        "--chars".as_ref(),
        "40".as_ref(),
    ]));
    assert_eq!(generated.trim_end_matches('\n').chars().count(), 43, "{generated}");
    // `eval` of a SavedModel on the small corpus, with `--vocab FILE` if given.
    let eval = |dir: &str, vocab: Option<std::path::PathBuf>| {
        let mut args: Vec<std::ffi::OsString> = vec!["eval".into(), "--data".into(), p("small.txt").into()];
        args.extend(["--run".into(), p(dir).into()]);
        if let Some(v) = vocab {
            args.extend(["--vocab".into(), v.into()]);
        }
        val_loss(&ok(common::minigpt().args(&args).output().unwrap()))
    };
    let before = eval("py", None);
    let keras = eval("keras", Some(p("small.txt")));
    assert!((before - keras).abs() < 1e-6, "the two exports of one model: {before} vs {keras}");
    // The vocabulary as a JSON array works as well as the corpus text.
    let keras_json = eval("keras", Some(p("py").join("assets.extra/vocab.json")));
    assert_eq!(keras, keras_json);
    let info = ok(minigpt(&["info".as_ref(), "--run".as_ref(), p("py").as_os_str()]));
    assert!(info.contains("model:        bigram, n_embd 128") && info.contains("trained:      30 steps"), "{info}");
    let info = ok(minigpt(&["info".as_ref(), "--run".as_ref(), p("keras").as_os_str()]));
    assert!(
        info.contains("vocabulary:   none (give --vocab") && info.contains("variables/0/.ATTRIBUTES/VARIABLE_VALUE ["),
        "{info}"
    );
    let out = minigpt(&[
        "eval".as_ref(),
        "--run".as_ref(),
        p("keras").as_os_str(),
        "--data".as_ref(),
        p("small.txt").as_os_str(),
    ]);
    assert!(
        !out.status.success() && common::last_stderr_line(&out).contains("carries no vocabulary"),
        "{}",
        common::last_stderr_line(&out)
    );

    // Fine-tuning from Python's weights lowers the loss; minigpt's export of it loads in Python.
    let words = |line: String| ok(common::minigpt().args(line.split(' ')).output().unwrap());
    let (py, small, tuned) = (p("py"), p("small.txt"), p("tuned"));
    words(format!(
        "train --init-from {} --data {} --out {} --max-steps 150 -q",
        py.display(),
        small.display(),
        tuned.display()
    ));
    let after = val_loss(&words(format!("eval --run {}", tuned.display())));
    assert!(after < before - 0.05, "fine-tuning: val loss {before} -> {after}");
    words(format!("export --run {} --out {}", tuned.display(), p("tuned-sm").display()));
    let back = r#"
import json, sys, numpy as np, tensorflow as tf
tokens = tf.constant(np.array(json.loads(sys.argv[1]), np.int32).reshape(2, 30))
np.save(sys.argv[3], tf.saved_model.load(sys.argv[2]).signatures["serving_default"](tokens=tokens)["logits"].numpy())
"#;
    python(&["-c".as_ref(), back.as_ref(), json.as_ref(), p("tuned-sm").as_os_str(), p("tuned.npy").as_os_str()]);
    let (_, runner) = load(&p("tuned"));
    let ours: Vec<Tensor<f32>> = vec![runner.logits(&x).unwrap()];
    let diff = max_abs_diff(&ours[0], &ArrayD::<f32>::read_npy(std::fs::File::open(p("tuned.npy")).unwrap()).unwrap());
    assert!(diff <= 1e-6, "fine-tuned export: logits differ by {diff}");
}

#[test]
fn savedmodels_off_the_convention_get_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let script = r#"
import json, os, sys, tensorflow as tf
class M(tf.Module):
    @tf.function(input_signature=[tf.TensorSpec([None, None], tf.int32, name="tokens")])
    def ints(self, tokens):
        return {"logits": tf.zeros(tf.concat([tf.shape(tokens), [3]], 0))}
    @tf.function(input_signature=[tf.TensorSpec([None, None], tf.float32, name="tokens")])
    def floats(self, tokens):
        return {"logits": tf.zeros(tf.concat([tf.shape(tokens), [3]], 0))}
m = M()
for name, sigs in [("no-serving", {"predict": m.ints}), ("float-input", {"serving_default": m.floats})]:
    d = os.path.join(sys.argv[1], name)
    tf.saved_model.save(m, d, signatures=sigs)
    os.makedirs(d + "/assets.extra")
    json.dump(["a", "b", "c"], open(d + "/assets.extra/vocab.json", "w"))
"#;
    python(&["-c".as_ref(), script.as_ref(), tmp.path().as_os_str()]);
    for (dir, needle) in [
        ("no-serving", "no `serving_default` signature (it has: predict)"),
        ("float-input", "input `tokens` is Float, expected Int32"),
        ("missing", "not a run directory"),
    ] {
        let out =
            common::minigpt().args(["generate", "--prompt", "ab", "--run"]).arg(tmp.path().join(dir)).output().unwrap();
        assert!(!out.status.success());
        let line = common::last_stderr_line(&out);
        assert!(line.starts_with("error: ") && line.contains(needle), "{dir}: {line}");
    }
}

/// `python_export/export_module.py --kind KIND` (a model saved inside a plain `tf.Module`) into
/// `tmp/KIND`; returns it and Python's validation loss on `corpus`.
fn export_module(
    tmp: &std::path::Path,
    corpus: &std::path::Path,
    kind: &str,
    extra: &[&str],
) -> (std::path::PathBuf, f64) {
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("python_export/export_module.py");
    let dir = tmp.join(kind);
    let args = [script.as_os_str(), "--data".as_ref(), corpus.as_os_str(), "--kind".as_ref(), kind.as_ref()];
    let mut args: Vec<&std::ffi::OsStr> = args.to_vec();
    args.extend(["--out".as_ref(), dir.as_os_str()]);
    args.extend(extra.iter().map(std::ffi::OsStr::new));
    let printed: serde_json::Value = serde_json::from_str(python(&args).lines().last().unwrap()).unwrap();
    (dir, printed["val_loss"].as_f64().unwrap())
}

#[test]
fn models_saved_inside_a_tf_module_load_through_their_object_graph() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = tmp.path().join("small.txt");
    std::fs::write(&corpus, &std::fs::read_to_string(common::corpus_path()).unwrap()[..30_000]).unwrap();
    let run = |args: Vec<std::ffi::OsString>| {
        let out = common::minigpt().args(&args).output().unwrap();
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    let val_loss =
        |stdout: &str| -> f64 { stdout.lines().find_map(|l| l.strip_prefix("val_loss: ")).unwrap().parse().unwrap() };
    // Keras 3 models in a tf.Module (TensorFlow's C++ loader leaves the variables their signatures
    // read uninitialized) and a tf.Module of plain tf.Variables (its saver restores them).
    for (kind, restored, block) in [("keras", true, "64"), ("gpt", true, "32"), ("variables", false, "64")] {
        let (dir, python_loss) = export_module(tmp.path(), &corpus, kind, &[]);
        let info = run(vec!["info".into(), "--run".into(), dir.clone().into()]);
        let want = if restored { "restored through its object graph" } else { "restored by its saver" };
        assert!(info.contains(want), "{kind}: {info}");
        let eval = run(vec!["eval".into(), "--run".into(), dir.clone().into(), "--data".into(), corpus.clone().into()]);
        assert!((val_loss(&eval) - python_loss).abs() <= 1e-5, "{kind}: minigpt {eval} vs Python {python_loss}");
        let text = run(vec![
            "generate".into(),
            "--run".into(),
            dir.clone().into(),
            "--prompt".into(),
            "The".into(),
            "--chars".into(),
            "40".into(),
        ]);
        assert_eq!(text.trim_end_matches('\n').chars().count(), 43, "{kind}: {text}");
        // Fine-tuning starts from the same weights: a step that barely moves them keeps the loss.
        let tuned = tmp.path().join(format!("{kind}-tuned"));
        let flags = ["--max-steps", "1", "--lr", "1e-12", "--batch-size", "16", "-q", "--block-size", block];
        let mut args: Vec<std::ffi::OsString> =
            vec!["train".into(), "--init-from".into(), dir.into(), "--data".into(), corpus.clone().into()];
        args.extend(["--out".into(), tuned.clone().into()]);
        args.extend(flags.iter().map(|f| f.into()));
        run(args);
        let eval = run(vec!["eval".into(), "--run".into(), tuned.into()]);
        assert!(
            (val_loss(&eval) - python_loss).abs() <= 1e-5,
            "{kind} fine-tuned: minigpt {eval} vs Python {python_loss}"
        );
    }
}

#[test]
fn a_savedmodel_whose_checkpoint_lacks_a_variable_names_it() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = tmp.path().join("small.txt");
    std::fs::write(&corpus, &std::fs::read_to_string(common::corpus_path()).unwrap()[..30_000]).unwrap();
    let (dir, _) = export_module(tmp.path(), &corpus, "keras", &["--steps", "1", "--drop-key-of", "dense/bias"]);
    let out = common::minigpt().args(["generate", "--prompt", "The", "--run"]).arg(&dir).output().unwrap();
    let line = common::last_stderr_line(&out);
    assert!(!out.status.success() && line.starts_with("error: ") && line.contains("dense/bias"), "{line}");
}
