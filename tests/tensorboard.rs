//! TensorBoard: the event file TensorFlow's summary ops write holds the losses of metrics.csv,
//! the learning rate and the throughput, as Python's summary_iterator reads it.

mod common;

use std::process::Command;

#[test]
fn python_reads_the_scalars_minigpt_wrote() {
    let tmp = tempfile::tempdir().unwrap();
    // 700 characters, block 16: 19 batches an epoch, 57 steps in 3 epochs.
    let run = common::small_run(tmp.path(), 700, &["--block-size", "16", "--log-every", "5", "--eval-every", "10"]);

    let script = r#"
import glob, sys, tensorflow as tf
for path in sorted(glob.glob(sys.argv[1] + "/events/events.out.tfevents.*")):
    for event in tf.compat.v1.train.summary_iterator(path):
        for v in event.summary.value:
            value = float(tf.make_ndarray(v.tensor)) if v.HasField("tensor") else v.simple_value
            print(v.tag, event.step, repr(value))
"#;
    let py = Command::new(common::python())
        .env("TF_CPP_MIN_LOG_LEVEL", "3")
        .arg("-c")
        .arg(script)
        .arg(&run)
        .output()
        .unwrap();
    assert!(py.status.success(), "{}", String::from_utf8_lossy(&py.stderr));
    let stdout = String::from_utf8(py.stdout).unwrap();
    let events: Vec<(String, u64, f64)> = stdout
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            (f[0].to_string(), f[1].parse().unwrap(), f[2].parse().unwrap())
        })
        .collect();
    let of = |tag: &str| -> Vec<(u64, f64)> { events.iter().filter(|e| e.0 == tag).map(|e| (e.1, e.2)).collect() };

    // Every loss and validation loss of metrics.csv, at its step, to float32 precision.
    let metrics = minigpt::run::RunDir::open(&run).unwrap().read_metrics().unwrap();
    let (train, val) = minigpt::plot::series(&metrics);
    let close = |a: &[(u64, f64)], b: &[(f64, f64)]| {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.0 as f64 == y.0 && (x.1 - y.1).abs() <= 1e-6 * y.1.abs())
    };
    assert!(close(&of("loss"), &train), "loss events {:?} vs metrics {train:?}", of("loss"));
    assert!(close(&of("val_loss"), &val), "val_loss events {:?} vs metrics {val:?}", of("val_loss"));
    assert_eq!(of("val_loss").iter().map(|e| e.0).collect::<Vec<_>>(), [10, 19, 20, 30, 38, 40, 50, 57]);
    // The learning rate the graph used, and a throughput at every logged step.
    let lr = of("learning_rate");
    assert_eq!(lr.len(), train.len());
    assert!(lr.iter().all(|e| (e.1 - 1e-3).abs() < 1e-9), "{lr:?}");
    let tokens = of("tokens_per_s");
    assert_eq!(tokens.len(), train.len());
    assert!(tokens.iter().all(|e| e.1 > 0.0), "{tokens:?}");
}
