//! Training on TensorFlow's gRPC runtime: `minigpt server` workers as child processes on free
//! ports of 127.0.0.1 (killed by PID when a test ends), `train --cluster` against them.
//! Two workers train what one process trains; the step's ops run on the workers; a worker that
//! dies or hangs is waited for and the run goes on as if nothing happened.

mod common;

use std::path::Path;
use std::time::Duration;

use common::cluster::{cluster_flag, corpus, fails_with, free_local_address, losses, train, Server, Training};
use common::minigpt;
use minigpt::cluster::{Cluster, ClusterOptions, ClusterSpec};
use minigpt::device::SessionConfig;
use minigpt::graph::{GraphOptions, Runner};
use minigpt::model::{Arch, ModelShape};
use minigpt::optim::AdamConfig;
use minigpt::run::{Load, RunDir};
use prost::Message;

/// Every weight and Adam slot of a run's newest checkpoint, by name, flattened.
fn state(run: &Path) -> Vec<(String, Vec<f64>)> {
    let runner = RunDir::open(run).unwrap().load(Load::Training { summaries: false }, SessionConfig::default());
    let runner = runner.unwrap().1;
    let names: Vec<String> = runner.variables().into_iter().map(|v| v.name).collect();
    let to_f64 = |t: &tensorflow::Tensor<f32>| t.iter().map(|&v| v as f64).collect::<Vec<_>>();
    let [m, v] = runner.adam_moments::<f32>().unwrap();
    let mut all = Vec::new();
    for (kind, tensors) in [("", runner.weights::<f32>().unwrap()), (" m", m), (" v", v)] {
        all.extend(names.iter().zip(&tensors).map(|(name, t)| (format!("{name}{kind}"), to_f64(t))));
    }
    all
}

/// One process and two workers, 100 steps: the same loss at every step to 1e-6 relative; every
/// weight and Adam slot to 1e-6 (bigram) or 2e-6 (transformer) of its tensor's largest magnitude.
/// The attention's key bias has no gradient in exact arithmetic: rounding noise moves it, which
/// Adam scales up, so its third of `qkv/bias` (and its slots) is held to 1e-4 in absolute terms.
/// The transformer's single-process run has XLA off, as the cluster's has.
#[test]
fn two_workers_train_what_one_process_trains() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = corpus(tmp.path());
    let (a, b) = (Server::start(), Server::start());
    let cluster = cluster_flag(&[&a, &b]);
    let gpt = [common::TINY_GPT, "--block-size 16 --batch-size 8 --no-xla"].join(" ");
    for (name, flags, tolerance) in [("bigram", "--block-size 16 --batch-size 32", 1e-6), ("gpt", gpt.as_str(), 2e-6)] {
        let flags: Vec<&str> = flags.split(' ').collect();
        let (one, two) = (tmp.path().join(format!("{name}-one")), tmp.path().join(format!("{name}-two")));
        train(&corpus, &one, 100, &flags);
        train(&corpus, &two, 100, &[&flags[..], &["--cluster", &cluster]].concat());
        let (l1, l2) = (losses(&one), losses(&two));
        assert_eq!(l1.len(), 100);
        common::assert_close(&format!("{name} losses"), &l2, &l1, 0.0, 1e-6);
        let worst_loss = l2.iter().zip(&l1).map(|(a, b)| ((a - b) / b).abs()).fold(0.0, f64::max);
        let (s1, s2) = (state(&one), state(&two));
        assert_eq!(s1.len(), s2.len());
        let (mut worst, mut worst_key_bias) = (0.0f64, 0.0f64);
        for ((what, x2), (_, x1)) in s2.iter().zip(&s1) {
            let scale = x1.iter().fold(0.0f64, |m, v| m.max(v.abs()));
            let key_bias = |i: usize| what.contains("qkv/bias") && (x1.len() / 3..2 * x1.len() / 3).contains(&i);
            for (i, (g, w)) in x2.iter().zip(x1).enumerate() {
                if key_bias(i) {
                    let d = (g - w).abs();
                    assert!(d <= 1e-4, "{name} {what}[{i}] (key bias): got {g}, want {w}");
                    worst_key_bias = worst_key_bias.max(d);
                    continue;
                }
                let d = (g - w).abs() / scale.max(f64::MIN_POSITIVE);
                assert!(
                    d <= tolerance,
                    "{name} {what}[{i}]: got {g}, want {w}: {d:.2e} of the tensor's scale {scale:.2e}"
                );
                worst = worst.max(d);
            }
        }
        eprintln!(
            "{name}: 100 steps; losses within {worst_loss:.2e} relative; weights and slots within {worst:.2e} of \
             their tensor's scale (key bias within {worst_key_bias:.2e} absolute)"
        );
        let config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(two.join("config.json")).unwrap()).unwrap();
        assert_eq!(config["cluster"], serde_json::json!([a.address, b.address]));
    }

    // A distributed run is an ordinary run: it resumes in one process, and generates.
    let two = tmp.path().join("bigram-two");
    let resumed =
        minigpt().args(["train", "-q", "--resume", "--max-steps", "110", "--out"]).arg(&two).output().unwrap();
    assert!(resumed.status.success(), "{}", String::from_utf8_lossy(&resumed.stderr));
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(two.join("config.json")).unwrap()).unwrap();
    assert_eq!((config["steps_done"].as_u64(), config.get("cluster")), (Some(110), None));
    let out = minigpt().args(["generate", "--prompt", "To", "--chars", "20", "--run"]).arg(&two).output();
    assert!(out.unwrap().status.success());
}

/// The step's ops, gradients included, run on the workers; the variables and Adam on the chief.
#[test]
fn the_replicas_run_on_the_workers() {
    let (a, b) = (Server::start(), Server::start());
    let spec = ClusterSpec::parse(&cluster_flag(&[&a, &b])).unwrap();
    let timeout = Duration::from_secs(60);
    let options =
        ClusterOptions { spec, listen: None, worker_timeout: timeout, step_timeout: timeout, await_names: false };
    let cluster = Cluster::start(&options, None).unwrap();
    let chief = format!("/job:{}/", cluster.job);
    let model = ModelShape {
        arch: Arch::Bigram,
        n_embd: 16,
        n_layer: 1,
        n_head: 1,
        dropout: 0.0,
        precision: Default::default(),
    }
    .with(65, 8);
    let opts = GraphOptions::training(1, AdamConfig::default());
    let runner = Runner::on_cluster(&model, &opts, SessionConfig::default(), cluster).unwrap();
    runner.init().unwrap();
    let x = tensorflow::Tensor::new(&[4, 8]).with_values(&(0..32).collect::<Vec<i32>>()).unwrap();
    let (loss, metadata) = runner.train_step_traced(&x, &x).unwrap();
    assert!(loss.is_finite());
    let metadata = minigpt::proto::RunMetadata::decode(&metadata[..]).unwrap();
    let mut seen = Vec::new();
    for dev in metadata.step_stats.unwrap().dev_stats {
        for node in dev.node_stats {
            seen.push((dev.device.clone(), node.node_name));
        }
    }
    for i in 0..2 {
        let on = |device: &str, prefix: &str| seen.iter().any(|(d, n)| d.contains(device) && n.starts_with(prefix));
        let worker = format!("/job:worker/replica:0/task:{i}/");
        assert!(on(&worker, &format!("replica_{i}/gradients/")), "no gradient op of replica {i} ran on its worker");
        assert!(
            on(&worker, &format!("replica_{i}/loss/SparseSoftmaxCrossEntropyWithLogits")),
            "replica {i}'s forward pass did not run on its worker"
        );
    }
    for (device, node) in &seen {
        if node.starts_with("replica_") {
            let i = &node["replica_".len()..node.find('/').unwrap()];
            assert!(device.contains(&format!("/job:worker/replica:0/task:{i}/")), "{node} ran on {device}");
        }
        if node.starts_with("train_step") || node.starts_with("adam") {
            assert!(device.contains(&chief), "{node} ran on {device}");
        }
    }
    assert!(seen.iter().any(|(d, n)| d.contains(&chief) && n.contains("adam")), "Adam did not run on the chief");
}

/// Trains 300 steps on two workers uninterrupted, then again, calling `fault` with the workers at
/// step 60: the second run must complete with the first one's losses and only `warning:` lines on
/// stderr, which it returns.
fn survive(fault: impl FnOnce(&mut [Server; 2]), extra: &[&str]) -> String {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = corpus(tmp.path());
    let (reference, out) = (tmp.path().join("reference"), tmp.path().join("run"));
    let mut servers = [Server::start(), Server::start()];
    let cluster = cluster_flag(&[&servers[0], &servers[1]]);
    let flags = ["--block-size", "16", "--batch-size", "32", "--worker-timeout", "60", "--cluster", &cluster];
    train(&corpus, &reference, 300, &flags);
    let args = [&["--shuffle", "none", "--log-every", "1", "--max-steps", "300"][..], &flags, extra].concat();
    let mut training = Training::spawn(&corpus, &out, &args);
    training.until_step(60);
    fault(&mut servers);
    let (rest, status, stderr) = training.finish();
    assert!(status.success(), "{stderr}");
    assert!(rest.last().unwrap().starts_with("trained 300 steps"), "{rest:?}");
    assert_eq!(losses(&out), losses(&reference), "the recovered run's losses differ from an uninterrupted run's");
    assert!(stderr.lines().all(|l| l.starts_with("warning: ")), "{stderr}");
    eprint!("{stderr}");
    stderr
}

#[test]
fn a_killed_worker_is_waited_for_and_the_run_goes_on_unchanged() {
    let stderr = survive(
        |servers| {
            let address = servers[1].address.clone();
            servers[1].child.0.kill().unwrap();
            servers[1].child.0.wait().unwrap();
            std::thread::sleep(Duration::from_secs(2));
            servers[1] = Server::at(&address);
        },
        &[],
    );
    let lines: Vec<&str> = stderr.lines().collect();
    assert!(lines.len() >= 2, "{stderr}");
    assert!(lines[0].contains("worker task 1 (127.0.0.1:") && lines[0].contains("failed at step"), "{stderr}");
    assert!(lines.last().unwrap().contains("every worker answers again after"), "{stderr}");
}

#[test]
fn a_hung_worker_times_out_and_the_run_goes_on_unchanged() {
    let stderr = survive(
        |servers| {
            servers[0].child.signal(libc::SIGSTOP);
            std::thread::sleep(Duration::from_secs(8));
            servers[0].child.signal(libc::SIGCONT);
        },
        &["--step-timeout", "3"],
    );
    assert!(stderr.contains("warning: worker task 0 (127.0.0.1:"), "{stderr}");
    assert!(stderr.contains("every worker answers again after"), "{stderr}");
}

#[test]
fn a_worker_that_stays_away_ends_the_run_with_a_checkpoint_it_resumes_from() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = corpus(tmp.path());
    let run = tmp.path().join("run");
    let (a, mut b) = (Server::start(), Server::start());
    let cluster = cluster_flag(&[&a, &b]);
    let args = ["--log-every", "1", "--max-steps", "100000", "--worker-timeout", "3", "--cluster", &cluster];
    let mut training = Training::spawn(&corpus, &run, &args);
    training.until_step(30);
    b.child.0.kill().unwrap();
    b.child.0.wait().unwrap();
    let (_, status, stderr) = training.finish();
    assert_eq!(status.code(), Some(1), "{stderr}");
    let last = stderr.lines().last().unwrap_or("");
    assert!(last.starts_with("error: ") && last.contains(&format!("worker task 1 at {}", b.address)), "{stderr}");
    assert!(
        last.contains("did not answer within 3 s") && last.contains("the run is checkpointed at step "),
        "{stderr}"
    );
    let step: u64 = last.split("checkpointed at step ").nth(1).unwrap().split(':').next().unwrap().parse().unwrap();
    assert!(run.join(format!("ckpt/ckpt-{step}.index")).is_file(), "{stderr}");
    // It resumes on the worker still there.
    let resumed = minigpt()
        .args(["train", "-q", "--resume", "--max-steps", &(step + 5).to_string(), "--out"])
        .arg(&run)
        .args(["--cluster", &cluster_flag(&[&a])])
        .output()
        .unwrap();
    assert!(resumed.status.success(), "{}", String::from_utf8_lossy(&resumed.stderr));
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("config.json")).unwrap()).unwrap();
    assert_eq!((config["steps_done"].as_u64(), &config["cluster"]), (Some(step + 5), &serde_json::json!([a.address])));
}

/// The transformer with dropout, AdamW, a schedule and clipping, on one worker: the losses of one
/// process (replica 0 draws one process's dropout masks; XLA off on both sides), to 1e-6.
#[test]
fn every_training_flag_works_on_a_cluster() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = corpus(tmp.path());
    let a = Server::start();
    let flags = [common::TINY_GPT, "--block-size 16 --batch-size 8 --dropout 0.1 --weight-decay 0.1 --grad-clip 1"]
        .join(" ")
        + " --warmup-steps 5 --lr-decay-steps 20 --min-lr 1e-4";
    let flags: Vec<&str> = flags.split(' ').collect();
    let (one, worker) = (tmp.path().join("one"), tmp.path().join("worker"));
    train(&corpus, &one, 20, &[&flags[..], &["--no-xla"]].concat());
    train(&corpus, &worker, 20, &[&flags[..], &["--cluster", &cluster_flag(&[&a])]].concat());
    common::assert_close("losses", &losses(&worker), &losses(&one), 0.0, 1e-6);
    for command in [&["info", "--run"][..], &["eval", "--eval-batches", "2", "--run"]] {
        let out = minigpt().args(command).arg(&worker).output().unwrap();
        assert!(out.status.success(), "{command:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    let export = minigpt().args(["export", "--run"]).arg(&worker).arg("--out").arg(tmp.path().join("saved")).output();
    assert!(export.unwrap().status.success());
}

#[test]
fn ctrl_c_of_a_distributed_run_checkpoints_and_exits_130() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = corpus(tmp.path());
    let run = tmp.path().join("run");
    let a = Server::start();
    let cluster = cluster_flag(&[&a]);
    let mut training =
        Training::spawn(&corpus, &run, &["--log-every", "10", "--max-steps", "100000", "--cluster", &cluster]);
    training.until_step(20);
    training.child.signal(libc::SIGINT);
    let (_, status, stderr) = training.finish();
    assert_eq!(status.code(), Some(130), "{stderr}");
    let message = stderr.lines().last().unwrap_or("");
    assert!(message.starts_with("interrupted at step "), "{message}");
    let step: u64 = message["interrupted at step ".len()..].split(':').next().unwrap().parse().unwrap();
    assert!(run.join(format!("ckpt/ckpt-{step}.index")).is_file());
}

/// Ctrl-C while the chief waits for a dead worker (--worker-timeout's default 300 s): the wait
/// says what it waits for every 10 s, and the signal is honoured at once: checkpoint, the line
/// that says how to resume, exit 130 (after the wait ran out it would be exit 1).
#[test]
fn ctrl_c_while_waiting_for_a_worker_checkpoints_and_exits_130() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = corpus(tmp.path());
    let run = tmp.path().join("run");
    let (a, mut b) = (Server::start(), Server::start());
    let cluster = cluster_flag(&[&a, &b]);
    let mut training =
        Training::spawn(&corpus, &run, &["--log-every", "1", "--max-steps", "100000", "--cluster", &cluster]);
    training.until_step(20);
    b.child.0.kill().unwrap();
    b.child.0.wait().unwrap();
    std::thread::sleep(Duration::from_secs(13));
    training.child.signal(libc::SIGINT);
    let (_, status, stderr) = training.finish();
    assert_eq!(status.code(), Some(130), "{stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert!(lines[0].contains(&format!("worker task 1 ({}) failed at step", b.address)), "{stderr}");
    assert!(
        lines.iter().any(|l| l.starts_with(&format!("warning: still waiting for worker task 1 at {}", b.address))
            && l.ends_with("of 300 s (--worker-timeout)")),
        "{stderr}"
    );
    let message = lines.last().unwrap();
    assert!(
        message.starts_with("interrupted at step ") && message.contains("minigpt train --resume --out"),
        "{stderr}"
    );
    let step: u64 = message["interrupted at step ".len()..].split(':').next().unwrap().parse().unwrap();
    assert!(run.join(format!("ckpt/ckpt-{step}.index")).is_file());
}

#[test]
fn bad_clusters_and_addresses_give_one_clear_line() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = corpus(tmp.path());
    let (corpus, out) = (corpus.to_str().unwrap(), tmp.path().join("run"));
    let out = out.to_str().unwrap();
    let train = |cluster: &str, extra: &[&str], needle: &str| {
        let args = [&["train", "--data", corpus, "--out", out, "--cluster", cluster][..], extra].concat();
        fails_with(&args, needle);
    };
    train("127.0.0.1:2222", &[], "expected worker=HOST:PORT");
    train("worker=127.0.0.1:0", &[], "the port must be a number from 1 to 65535");
    train("worker=127.0.0.1:99999", &[], "the port must be a number from 1 to 65535");
    train("worker=127.0.0.1", &[], "the port is missing");
    train("worker=127.0.0.1:2222,127.0.0.1:2222", &[], "127.0.0.1:2222 is listed twice");

    // A worker nobody serves: named, within --worker-timeout.
    let nobody = free_local_address();
    train(&format!("worker={nobody}"), &["--worker-timeout", "2"], &format!("worker task 0 at {nobody}"));

    // The global batch must divide among the workers.
    let (a, b) = (Server::start(), Server::start());
    train(&cluster_flag(&[&a, &b]), &["--batch-size", "33"], "--batch-size 33 does not divide among the 2 workers");
    train(&cluster_flag(&[&a, &b]), &["--xla"], "--xla does not work with --cluster");

    // A server's port in use, a bad address.
    fails_with(&["server", "--listen", &a.address], "is not free");
    fails_with(&["server", "--listen", "127.0.0.1:http"], "not HOST:PORT");
    fails_with(&["devices", "--cluster", "worker:1"], "expected worker=HOST:PORT");
}

#[test]
fn the_server_exits_0_on_sigterm_and_sigint_and_devices_lists_the_cluster() {
    let (a, b) = (Server::start(), Server::start());
    let out = minigpt().args(["devices", "--cluster", &cluster_flag(&[&a, &b])]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    for task in [
        "/job:chief_",
        "/replica:0/task:0/device:CPU:0",
        "/job:worker/replica:0/task:0/",
        "/job:worker/replica:0/task:1/",
    ] {
        assert!(stdout.contains(task), "{stdout}");
    }
    assert!(stdout.lines().last().unwrap().starts_with("Num GPUs Available:"), "{stdout}");
    for (mut server, signal) in [(a, libc::SIGTERM), (b, libc::SIGINT)] {
        server.child.signal(signal);
        let status = server.child.0.wait().unwrap();
        assert_eq!(status.code(), Some(0), "signal {signal}");
    }
}
