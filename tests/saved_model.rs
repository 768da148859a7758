//! `minigpt export` writes a SavedModel that Python's `tf.saved_model.load` reads: its
//! `serving_default` logits equal minigpt's, and its `train_step` trains.

mod common;

use std::process::Command;

use minigpt::checkpoint::RunDir;
use minigpt::device::DeviceChoice;
use minigpt::graph::GraphOptions;
use ndarray::ArrayD;
use ndarray_npy::ReadNpyExt;
use tensorflow::Tensor;

const PYTHON: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/.venv/bin/python");

#[test]
fn python_loads_the_export_and_computes_minigpts_logits() {
    assert!(std::path::Path::new(PYTHON).exists(), "no {PYTHON}: run `make setup`");
    let tmp = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(common::corpus_path()).unwrap();
    std::fs::write(tmp.path().join("small.txt"), &text[..30_000]).unwrap();
    let (run, model) = (tmp.path().join("run"), tmp.path().join("exported"));
    let out = common::minigpt()
        .args(["train", "--max-steps", "20", "--eval-batches", "1", "-q", "--data"])
        .arg(tmp.path().join("small.txt"))
        .arg("--out")
        .arg(&run)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let export = || common::minigpt().arg("export").arg("--run").arg(&run).arg("--out").arg(&model).output().unwrap();
    let out = export();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // Never over an existing directory.
    let again = export();
    assert!(!again.status.success());
    assert!(common::last_stderr_line(&again).contains("already exists"));

    // Tokens [2, 50] and a batch, made here and given to both sides.
    let tokens: Vec<i32> = (0..100).map(|i| (i * 7 + 3) % 40).collect();
    let targets: Vec<i32> = (0..100).map(|i| (i * 11 + 5) % 40).collect();
    let script = r#"
import json, sys, numpy as np, tensorflow as tf
model_dir, out, tokens, targets = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), json.loads(sys.argv[4])
m = tf.saved_model.load(model_dir)
x = tf.constant(np.array(tokens, np.int32).reshape(2, 50))
y = tf.constant(np.array(targets, np.int32).reshape(2, 50))
np.save(out, m.signatures["serving_default"](tokens=x)["logits"].numpy())
step = m.signatures["train_step"]
print(json.dumps([float(step(x=x, y=y)["loss"]) for _ in range(3)]))
print(json.dumps(json.load(open(model_dir + "/assets.extra/vocab.json"))))
"#;
    let npy = tmp.path().join("logits.npy");
    let json = |v: &[i32]| serde_json::to_string(v).unwrap();
    let py = Command::new(PYTHON)
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

    let (config, runner) = minigpt::train::load_run(&RunDir::open(&run).unwrap(), GraphOptions::new(0), DeviceChoice::Cpu, &Default::default()).unwrap();
    assert_eq!(vocab, config.vocab);
    let x = Tensor::new(&[2, 50]).with_values(&tokens).unwrap();
    let y = Tensor::new(&[2, 50]).with_values(&targets).unwrap();
    let ours: Vec<Tensor<f32>> = runner.fetch_with_batch(&[runner.g.logits.clone(), runner.g.loss.clone()], &x, &y).unwrap();
    assert_eq!(python_logits.shape(), [2, 50, config.model.vocab_size as usize]);
    let max_diff = ours[0].iter().zip(python_logits.iter()).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
    assert!(max_diff <= 1e-6, "logits differ by {max_diff}");
    // The first step's loss is minigpt's loss on the batch; the steps lower it.
    assert!((losses[0] - ours[1][0] as f64).abs() <= 1e-6, "{losses:?} vs {}", ours[1][0]);
    assert!(losses[2] < losses[1] && losses[1] < losses[0], "{losses:?}");
}
