//! A run's checkpoint is a TensorFlow V2 checkpoint that Python's `tf.train.load_checkpoint` reads
//! by name, with the values minigpt holds.

mod common;

use std::process::Command;

use minigpt::device::{DeviceChoice, SessionConfig};
use minigpt::run::{Load, RunDir};

/// The run's newest checkpoint in a training graph (the optimizer's variables too).
fn load(run: &std::path::Path) -> minigpt::graph::Runner {
    let session = SessionConfig { device: DeviceChoice::Cpu, ..Default::default() };
    RunDir::open(run).unwrap().load(Load::Training { summaries: false }, session).unwrap().1
}

#[test]
fn python_reads_the_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let run = common::small_run(tmp.path(), 30_000, &["--max-steps", "7", "--eval-batches", "1"]);

    let runner = load(&run);
    let vars = runner.variables();
    let values: Vec<tensorflow::Tensor<f32>> = runner.weights().unwrap();

    let script = r#"
import sys, numpy as np, tensorflow as tf
path = tf.train.latest_checkpoint(sys.argv[1])
reader = tf.train.load_checkpoint(path)
shapes = reader.get_variable_to_shape_map()
print(path.rsplit("/", 1)[-1])
print(int(reader.get_tensor("optimizer/iterations")))
for name in sys.argv[2:]:
    v = reader.get_tensor(name).astype(np.float64).ravel()
    print(name, list(shapes[name]), repr(float(v.sum())), repr(float(v[0])))
"#;
    let names: Vec<&str> = vars.iter().map(|v| v.name.as_str()).collect();
    let out = Command::new(common::python())
        .env("TF_CPP_MIN_LOG_LEVEL", "3")
        .arg("-c")
        .arg(script)
        .arg(run.join("ckpt"))
        .args(&names)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8(out.stdout).unwrap();
    let mut lines = stdout.lines();
    assert_eq!(lines.next(), Some("ckpt-7"));
    assert_eq!(lines.next(), Some("7"));
    for (var, value) in vars.iter().zip(&values) {
        let line = lines.next().unwrap();
        let sum: f64 = value.iter().map(|&v| v as f64).sum();
        let fields: Vec<&str> = line.split(' ').collect();
        assert_eq!(fields[0], var.name);
        let shape: Vec<String> = var.shape.iter().map(|d| d.to_string()).collect();
        assert_eq!(line.split('[').nth(1).unwrap().split(']').next().unwrap(), shape.join(", "));
        let py_sum: f64 = fields[fields.len() - 2].parse().unwrap();
        let py_first: f64 = fields[fields.len() - 1].parse().unwrap();
        assert_eq!(py_first, value[0] as f64, "{line}");
        assert!((py_sum - sum).abs() <= 1e-9 * sum.abs().max(1.0), "{line}: Rust sum {sum}");
    }
}

#[test]
fn minigpt_restores_a_checkpoint_python_wrote() {
    let tmp = tempfile::tempdir().unwrap();
    let run = common::small_run(tmp.path(), 30_000, &["--max-steps", "3", "--eval-batches", "1"]);

    // Python writes ckpt-100 with its own values under the documented names, and makes it the
    // latest in the state file, as tf.train.CheckpointManager would.
    let script = r#"
import sys, numpy as np, tensorflow as tf
ckpt_dir = sys.argv[1]
reader = tf.train.load_checkpoint(tf.train.latest_checkpoint(ckpt_dir))
shapes = reader.get_variable_to_shape_map()
names, tensors = [], []
for k, name in enumerate(["embedding/embeddings", "dense/kernel", "dense/bias"]):
    n = int(np.prod(shapes[name]))
    value = (np.arange(n) % 97).astype(np.float32) * np.float32(0.01) - np.float32(0.3) + np.float32(0.001 * k)
    names += [name, name + "/m", name + "/v"]
    tensors += [value.reshape(shapes[name]), np.zeros(shapes[name], np.float32), np.zeros(shapes[name], np.float32)]
names.append("optimizer/iterations")
tensors.append(np.array(100, np.int64))
tf.raw_ops.SaveV2(prefix=ckpt_dir + "/ckpt-100", tensor_names=names, shape_and_slices=[""] * len(names),
                  tensors=tensors)
tf.compat.v1.train.update_checkpoint_state(ckpt_dir, "ckpt-100", all_model_checkpoint_paths=["ckpt-3", "ckpt-100"])
"#;
    let out = Command::new(common::python())
        .env("TF_CPP_MIN_LOG_LEVEL", "3")
        .arg("-c")
        .arg(script)
        .arg(run.join("ckpt"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let runner = load(&run);
    let vars = runner.variables();
    let values: Vec<tensorflow::Tensor<f32>> = runner.weights().unwrap();
    for (k, (var, value)) in vars.iter().zip(&values).enumerate() {
        for (i, &v) in value.iter().enumerate() {
            let want = ((i % 97) as f32) * 0.01f32 - 0.3f32 + (0.001 * k as f64) as f32;
            assert_eq!(v, want, "{}[{i}]", var.name);
        }
    }
    assert_eq!(runner.iterations().unwrap(), 100);
    // The command line uses it too.
    let out =
        common::minigpt().args(["generate", "--prompt", "A", "--chars", "20", "--run"]).arg(&run).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}
