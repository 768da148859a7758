//! `minigpt serve`: TensorFlow Serving's REST API against a Python client and Python's
//! TensorFlow, generation alone and among others (continuous batching, attention caches and their
//! check at load), limits and bad requests, clients that go away or stall, SIGTERM, new and broken
//! versions, and a load with faults. Every server listens on a free port of 127.0.0.1
//! (`--listen 127.0.0.1:0`) and is killed by PID at the end.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::cluster::{command, until_first_line, Proc};
use common::{export, python, small_run, TINY_GPT};
use serde_json::{json, Value};

/// A `minigpt serve` child process.
struct Serving {
    child: Proc,
    url: String,
    stderr: tempfile::NamedTempFile,
}

impl Serving {
    /// `minigpt serve --listen 127.0.0.1:0 ARGS`, once it says where it listens (at most 120 s).
    fn start(args: &[&str]) -> Self {
        let mut cmd = command();
        cmd.args(["serve", "--listen", "127.0.0.1:0"]).args(args);
        Self::launch(cmd)
    }

    fn launch(cmd: Command) -> Self {
        let (child, line, stderr) = until_first_line(cmd, Duration::from_secs(120));
        let url = line.strip_prefix("listening on ").unwrap_or_else(|| panic!("{line}")).to_string();
        Self { child, url, stderr }
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(self.stderr.path()).unwrap()
    }

    fn get(&self, path: &str) -> (u16, Value) {
        answer(client().get(format!("{}{path}", self.url)).send().unwrap())
    }

    fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        answer(client().post(format!("{}{path}", self.url)).json(body).send().unwrap())
    }

    fn post_raw(&self, path: &str, body: &str) -> (u16, Value) {
        answer(client().post(format!("{}{path}", self.url)).body(body.to_string()).send().unwrap())
    }

    /// `:generate`'s text, which must succeed.
    fn text(&self, model: &str, body: &Value) -> String {
        let (status, answer) = self.post(&format!("/v1/models/{model}:generate"), body);
        assert_eq!(status, 200, "{answer}");
        answer["text"].as_str().unwrap().to_string()
    }

    /// `:generate_stream`'s characters, one event each, and its last event.
    fn stream(&self, model: &str, body: &Value) -> (String, Value) {
        let response =
            client().post(format!("{}/v1/models/{model}:generate_stream", self.url)).json(body).send().unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()["content-type"], "text/event-stream");
        let (mut text, mut last) = (String::new(), Value::Null);
        for event in events(response) {
            match event["token"]["text"].as_str() {
                Some(c) => text.push_str(c),
                None => last = event,
            }
        }
        (text, last)
    }

    /// A metric's value (summed over its labels), 0 if absent.
    fn metric(&self, name: &str) -> f64 {
        self.metric_where(name, "")
    }

    /// A metric's value summed over the series whose labels include `labels` (`key="value"`).
    fn metric_where(&self, name: &str, labels: &str) -> f64 {
        let text = client().get(format!("{}/monitoring/prometheus/metrics", self.url)).send().unwrap().text().unwrap();
        text.lines()
            .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']) && l.contains(labels))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    fn pid(&self) -> i32 {
        self.child.0.id() as i32
    }
}

fn client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder().timeout(Duration::from_secs(300)).build().unwrap()
}

fn answer(response: reqwest::blocking::Response) -> (u16, Value) {
    let status = response.status().as_u16();
    let text = response.text().unwrap();
    (status, serde_json::from_str(&text).unwrap_or_else(|e| panic!("{status}: {text:?}: {e}")))
}

/// The `data:` of each Server-Sent Event, as JSON.
fn events(response: impl Read) -> impl Iterator<Item = Value> {
    BufReader::new(response)
        .lines()
        .map_while(Result::ok)
        .filter_map(|line| line.strip_prefix("data: ").map(|d| serde_json::from_str(d).unwrap()))
}

/// A bigram and a tiny GPT trained on 20,000 characters, in `dir`.
fn runs(dir: &Path) -> (PathBuf, PathBuf) {
    let big = small_run(&dir.join("bigram"), 20_000, &["--max-steps", "200"]);
    let gpt = small_run(
        &dir.join("gpt"),
        20_000,
        &[&TINY_GPT.split(' ').collect::<Vec<_>>()[..], &["--max-steps", "60"]].concat(),
    );
    (big, gpt)
}

/// `minigpt generate`'s continuation of `prompt` (what it prints after the prompt).
fn generated(run: &Path, prompt: &str, chars: usize, seed: u64) -> String {
    let out = common::minigpt()
        .args(["generate", "--prompt", prompt, "--chars", &chars.to_string(), "--seed", &seed.to_string(), "--run"])
        .arg(run)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    text.strip_prefix(prompt).unwrap().strip_suffix('\n').unwrap().to_string()
}

/// A Python client written as TensorFlow Serving's documentation shows (`requests.post` of the
/// JSON), beside Python's TensorFlow running the same SavedModel.
const PYTHON_CLIENT: &str = r#"
import json, sys
import numpy as np
import requests
import tensorflow as tf

url, saved_model = sys.argv[1], sys.argv[2]
tokens = [[20, 43, 40, 40, 33, 1, 21, 33], [1, 2, 3, 4, 5, 6, 7, 8]]
row = requests.post(url + ":predict", json={"instances": tokens})
col = requests.post(url + ":predict", json={"signature_name": "serving_default", "inputs": {"tokens": tokens}})
row.raise_for_status(); col.raise_for_status()
row = np.array(row.json()["predictions"], dtype=np.float32)
col = np.array(col.json()["outputs"], dtype=np.float32)
model = tf.saved_model.load(saved_model)
local = model.signatures["serving_default"](tokens=tf.constant(tokens, tf.int32))
local = next(iter(local.values())).numpy()
print(json.dumps({
    "shape": list(row.shape),
    "row_equals_columnar": bool((row == col).all()),
    "max_abs_vs_python": float(np.abs(row - local).max()),
}))
"#;

#[test]
fn tensorflow_servings_api_answers_as_its_documentation_shows() {
    let tmp = tempfile::tempdir().unwrap();
    let (big, gpt) = runs(tmp.path());
    let base = tmp.path().join("base");
    std::fs::create_dir(&base).unwrap();
    export(&gpt, &base.join("1"));
    let (big_arg, gpt_arg) = (format!("big={}", big.display()), format!("gpt={}", base.display()));
    let server = Serving::start(&["--model", &big_arg, "--model", &gpt_arg, "--max-body-bytes", "4000"]);

    let available = json!({"model_version_status": [{"version": "1", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}]});
    assert_eq!(server.get("/v1/models/gpt"), (200, available.clone()));
    assert_eq!(server.get("/v1/models/gpt/versions/1"), (200, available));
    let (status, missing) = server.get("/v1/models/gpt/versions/2");
    assert_eq!((status, missing["error"].as_str().unwrap()), (404, "Servable not found for request: Specific(gpt, 2)"));
    let (status, missing) = server.get("/v1/models/nope");
    assert_eq!((status, missing["error"].as_str().unwrap()), (404, "Servable not found for request: Latest(nope)"));

    let (status, meta) = server.get("/v1/models/big/metadata");
    assert_eq!(status, 200);
    assert_eq!(meta["model_spec"], json!({"name": "big", "signature_name": "", "version": "1"}));
    let sig = &meta["metadata"]["signature_def"]["signature_def"]["serving_default"];
    assert_eq!(sig["method_name"], "tensorflow/serving/predict");
    assert_eq!(sig["inputs"]["tokens"]["dtype"], "DT_INT32");
    let dims = &sig["outputs"]["logits"]["tensor_shape"]["dim"];
    assert_eq!(
        dims.as_array().unwrap().iter().map(|d| d["size"].as_str().unwrap()).collect::<Vec<_>>(),
        ["-1", "-1", "58"]
    );
    // An export of minigpt's transformer decodes from attention caches, with the weights it
    // holds: the run's text.
    assert!(server.stderr().contains("(SavedModel); attention caches for 64 streams"), "{}", server.stderr());
    let request = json!({"prompt": "ROMEO:", "max_chars": 100, "seed": 9});
    assert_eq!(server.text("gpt", &request), generated(&gpt, "ROMEO:", 100, 9));
    let (_, meta) = server.get("/v1/models/gpt/versions/1/metadata");
    let sigs = meta["metadata"]["signature_def"]["signature_def"].as_object().unwrap();
    assert!(sigs.contains_key("serving_default") && sigs.contains_key("train_step"), "{meta}");

    // The Python client: row and columnar formats alike, and what Python's TensorFlow computes.
    let script = tmp.path().join("client.py");
    std::fs::write(&script, PYTHON_CLIENT).unwrap();
    let out = Command::new(python())
        .arg(&script)
        .arg(format!("{}/v1/models/gpt", server.url))
        .arg(base.join("1"))
        .env("TF_CPP_MIN_LOG_LEVEL", "3")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: Value =
        serde_json::from_slice(out.stdout.split(|&b| b == b'\n').rfind(|l| !l.is_empty()).unwrap()).unwrap();
    eprintln!("python client: {report}");
    assert_eq!(report["shape"], json!([2, 8, 58]));
    assert_eq!(report["row_equals_columnar"], true);
    assert_eq!(report["max_abs_vs_python"], 0.0, "the same logits as Python's TensorFlow, exactly");

    // The run directory's logits are the ones minigpt computes in this process, exactly.
    minigpt::library::load(false).unwrap();
    let source = minigpt::saved_model::Source::open(&big, &Default::default()).unwrap();
    let tokens = tensorflow::Tensor::new(&[1, 4]).with_values(&[1i32, 2, 3, 4]).unwrap();
    let local: Vec<f32> = source.logits(&tokens).unwrap().to_vec();
    let (status, served) = server.post("/v1/models/big:predict", &json!({"instances": [[1, 2, 3, 4]]}));
    assert_eq!(status, 200);
    let served: Vec<f32> = served["predictions"][0]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|r| r.as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32))
        .collect();
    assert_eq!(served, local);

    // Errors as TensorFlow Serving gives them.
    let cases: &[(&str, &str, u16, &str)] = &[
        ("/v1/models/big:predict", r#"{"instances": [[1, 2], [3]]}"#, 400, "ragged"),
        ("/v1/models/big:predict", r#"{"instances": [[1, 2]], "signature_name": "nope"}"#, 400, "\"nope\" not found"),
        ("/v1/models/big:predict", r#"{"instances": [[1, 99]]}"#, 400, "99"),
        ("/v1/models/big:predict", r#"{"instances": [[1, 2]"#, 400, "not JSON"),
        ("/v1/models/big:predict", r#"[1]"#, 400, "JSON object"),
        ("/v1/models/big:classify", r#"{}"#, 404, "unknown method"),
        ("/v1/models/big/metadata", r#"{}"#, 405, "GET"),
        ("/v1/models/nope:predict", r#"{"instances": [[1]]}"#, 404, "Servable not found"),
    ];
    for &(path, body, status, needle) in cases {
        let (got, answer) = server.post_raw(path, body);
        let error = answer["error"].as_str().unwrap_or_default();
        assert!(got == status && error.contains(needle), "{path} {body}: {got} {answer}");
    }
    let big_body = json!({"instances": [vec![1; 3000]]});
    let (status, answer) = server.post("/v1/models/big:predict", &big_body);
    assert_eq!(status, 413, "{answer}");
}

#[test]
fn a_streams_text_is_its_own_alone_or_batched_with_31_others() {
    let tmp = tempfile::tempdir().unwrap();
    let (big, gpt) = runs(tmp.path());
    let (big_arg, gpt_arg) = (format!("big={}", big.display()), format!("gpt={}", gpt.display()));
    let server = Serving::start(&["--model", &big_arg, "--model", &gpt_arg]);
    assert!(server.stderr().contains("attention caches for 64 streams"), "{}", server.stderr());
    for (model, run) in [("gpt", &gpt), ("big", &big)] {
        let request = json!({"prompt": "ROMEO:", "max_chars": 150, "seed": 5});
        let alone = server.text(model, &request);
        assert_eq!(alone, generated(run, "ROMEO:", 150, 5), "{model}: the server's text is `minigpt generate`'s");
        let batches_before = (server.metric("minigpt_batch_size_sum"), server.metric("minigpt_batch_size_count"));
        let texts: Vec<(u64, String)> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..32u64)
                .map(|i| {
                    let server = &server;
                    s.spawn(move || {
                        let seed = if i == 17 { 5 } else { 100 + i };
                        let body = json!({"prompt": "ROMEO:", "max_chars": 150, "seed": seed});
                        let text = match i % 2 {
                            0 => server.text(model, &body),
                            _ => {
                                let (text, last) = server.stream(model, &body);
                                assert_eq!(last["generated_text"].as_str(), Some(text.as_str()));
                                assert_eq!(
                                    last["details"],
                                    json!({"finish_reason": "length", "generated_chars": 150, "seed": seed})
                                );
                                text
                            }
                        };
                        (seed, text)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(texts.iter().find(|(seed, _)| *seed == 5).unwrap().1, alone, "{model}: among 31 others");
        assert!(texts.iter().all(|(_, t)| t.chars().count() == 150));
        let sum = server.metric("minigpt_batch_size_sum") - batches_before.0;
        let count = server.metric("minigpt_batch_size_count") - batches_before.1;
        eprintln!("{model}: {count} steps for 32 × 150 characters, {:.1} streams per step", sum / count);
        assert!(sum == 32.0 * 150.0 && sum / count > 2.0, "{model}: the streams did not share steps ({sum} / {count})");
    }
    // The transformer's streams took steps from their caches while their windows filled, and
    // passed over whole windows once they slid; the bigram has no caches.
    let steps = |model: &str, pass: &str| {
        server.metric_where("minigpt_stream_steps_total", &format!("model=\"{model}\",pass=\"{pass}\""))
    };
    let (cached, window) = (steps("gpt", "cached"), steps("gpt", "window"));
    eprintln!("gpt: {cached} stream steps from caches, {window} over whole windows");
    assert!(cached > 33.0 * 20.0 && window > 33.0 * 20.0, "{cached} cached, {window} whole");
    assert_eq!(steps("big", "cached"), 0.0);
    for name in [
        "minigpt_time_to_first_char_seconds_count",
        "minigpt_request_seconds_count",
        "minigpt_requests_total",
        "minigpt_active_streams",
        "minigpt_generated_chars_total",
    ] {
        assert!(server.metric(name) > 0.0 || name == "minigpt_active_streams", "{name}");
    }
}

#[test]
fn a_model_whose_caches_would_disagree_is_served_without_them() {
    // An export whose minigpt.json declares 1 head where the model has 2: a decoder built from
    // the declaration computes other logits. The check at load catches it, and the SavedModel's
    // own passes serve the run's text.
    let tmp = tempfile::tempdir().unwrap();
    let tiny: Vec<&str> = TINY_GPT.split(' ').chain(["--max-steps", "60"]).collect();
    let gpt = small_run(&tmp.path().join("gpt"), 20_000, &tiny);
    let saved = tmp.path().join("saved");
    export(&gpt, &saved);
    let declared = saved.join("assets.extra/minigpt.json");
    let mut json: Value = serde_json::from_str(&std::fs::read_to_string(&declared).unwrap()).unwrap();
    assert_eq!(json["model"]["n_head"], 2);
    json["model"]["n_head"] = json!(1);
    std::fs::write(&declared, json.to_string()).unwrap();
    let arg = format!("m={}", saved.display());
    let server = Serving::start(&["--model", &arg]);
    let stderr = server.stderr();
    assert!(stderr.contains("warning: model m: no cached decoding (its logits differ from the model's by"), "{stderr}");
    assert!(!stderr.contains("attention caches"), "{stderr}");
    let request = json!({"prompt": "ROMEO:", "max_chars": 100, "seed": 4});
    assert_eq!(server.text("m", &request), generated(&gpt, "ROMEO:", 100, 4));
    assert_eq!(server.metric_where("minigpt_stream_steps_total", "pass=\"cached\""), 0.0);
    assert_eq!(server.metric_where("minigpt_stream_steps_total", "pass=\"window\""), 100.0);
}

#[test]
fn limits_tokens_and_bad_requests_get_their_4xx() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, gpt) = runs(tmp.path());
    let token = tmp.path().join("token");
    std::fs::write(&token, "s3cret-token\n").unwrap();
    let gpt_arg = format!("gpt={}", gpt.display());
    let args = ["--model", &gpt_arg, "--max-concurrent", "2", "--max-chars", "2000", "--max-body-bytes", "2000"];
    let server = Serving::start(&[&args[..], &["--token-file", token.to_str().unwrap()]].concat());
    let url = |path: &str| format!("{}{path}", server.url);
    let with = |r: reqwest::blocking::RequestBuilder| r.header("Authorization", "Bearer s3cret-token");

    for auth in [None, Some("Bearer wrong"), Some("s3cret-token")] {
        let mut request = client().get(url("/v1/models/gpt"));
        if let Some(auth) = auth {
            request = request.header("Authorization", auth);
        }
        let response = request.send().unwrap();
        assert_eq!(response.status(), 401, "{auth:?}");
        assert_eq!(response.headers()["www-authenticate"], "Bearer");
    }
    assert_eq!(client().get(url("/health")).send().unwrap().status(), 200, "/health needs no token");
    assert_eq!(with(client().get(url("/v1/models/gpt"))).send().unwrap().status(), 200);

    let generate =
        |body: &str| answer(with(client().post(url("/v1/models/gpt:generate"))).body(body.to_string()).send().unwrap());
    let cases: &[(&str, u16, &str)] = &[
        (r#"{"prompt": "ROMEO:", "max_chars": "ten"}"#, 400, "max_chars: invalid type"),
        (r#"{"prompt": "ROMEO:", "max_tokens": 10}"#, 400, "unknown field `max_tokens`"),
        (r#"{"prompt": "ROMEO: ¿"}"#, 400, "¿"),
        (r#"{"prompt": ""}"#, 400, "the prompt is empty"),
        (r#"{"max_chars": 3}"#, 400, "missing field `prompt`"),
        (r#"{"prompt": "A", "max_chars": 2001}"#, 400, "--max-chars"),
        (r#"{"prompt": "A", "temperature": 0}"#, 400, "temperature"),
        (r#"{"prompt": "A", "top_k": 0}"#, 400, "top_k"),
        (r#"{"prompt": "A", "seed": -1}"#, 400, "seed"),
        (r#"{"prompt": "A""#, 400, "not JSON"),
    ];
    for &(body, status, needle) in cases {
        let (got, answer) = generate(body);
        let error = answer["error"].as_str().unwrap_or_default();
        assert!(got == status && error.contains(needle), "{body}: {got} {answer}");
    }
    let (status, _) = generate(&format!(r#"{{"prompt": "{}"}}"#, "A".repeat(3000)));
    assert_eq!(status, 413);

    // Two streams hold both slots: a third request is refused at once.
    let open = || {
        let body = json!({"prompt": "ROMEO:", "max_chars": 2000, "seed": 1});
        let response = with(client().post(url("/v1/models/gpt:generate_stream"))).json(&body).send().unwrap();
        let mut events = events(response);
        assert!(events.next().is_some());
        events
    };
    let (a, b) = (open(), open());
    let (status, answer) = generate(r#"{"prompt": "A", "max_chars": 1}"#);
    assert_eq!(status, 429, "{answer}");
    assert!(answer["error"].as_str().unwrap().contains("--max-concurrent"));
    drop((a, b));
}

#[test]
fn a_client_that_goes_away_frees_its_slot() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, gpt) = runs(tmp.path());
    let gpt_arg = format!("gpt={}", gpt.display());
    let server = Serving::start(&["--model", &gpt_arg, "--max-concurrent", "1", "--read-timeout-seconds", "2"]);
    let body = json!({"prompt": "ROMEO:", "max_chars": 10000, "seed": 1});
    let response = client().post(format!("{}/v1/models/gpt:generate_stream", server.url)).json(&body).send().unwrap();
    let mut stream = events(response);
    for _ in 0..3 {
        assert!(stream.next().is_some());
    }
    drop(stream);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, answer) =
            server.post("/v1/models/gpt:generate", &json!({"prompt": "A", "max_chars": 5, "seed": 2}));
        if status == 200 {
            break;
        }
        assert_eq!(status, 429, "{answer}");
        assert!(Instant::now() < deadline, "the slot of the client that went away was never freed");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(server.metric("minigpt_streams_cancelled_total"), 1.0);
    let drawn = server.metric("minigpt_generated_chars_total");
    assert!(drawn < 10000.0, "the abandoned stream went on: {drawn} characters");
    eprintln!("the abandoned stream stopped after {} characters", drawn - 5.0);

    // A client whose body stalls holds the only slot until --read-timeout-seconds, then gets 408.
    let address = server.url.trim_start_matches("http://");
    let mut stalled = TcpStream::connect(address).unwrap();
    let head = "POST /v1/models/gpt:generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
                Content-Length: 100\r\n\r\n{\"prompt\"";
    stalled.write_all(head.as_bytes()).unwrap();
    let sent = Instant::now();
    std::thread::sleep(Duration::from_millis(500));
    let small = json!({"prompt": "A", "max_chars": 5, "seed": 2});
    assert_eq!(server.post("/v1/models/gpt:generate", &small).0, 429, "the stalled request holds the slot");
    stalled.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut reply = [0u8; 512];
    let n = stalled.read(&mut reply).unwrap();
    let reply = String::from_utf8_lossy(&reply[..n]);
    assert!(reply.starts_with("HTTP/1.1 408"), "{reply}");
    assert!(reply.contains("--read-timeout-seconds"), "{reply}");
    assert!(sent.elapsed() >= Duration::from_secs(2), "answered before the timeout: {:?}", sent.elapsed());
    assert_eq!(server.post("/v1/models/gpt:generate", &small).0, 200, "the slot is free again");

    // Half its headers, then nothing: the connection is closed after the timeout.
    let mut slow = TcpStream::connect(address).unwrap();
    slow.write_all(b"POST /v1/models/gpt:generate HTTP/1.1\r\nHost: x\r\n").unwrap();
    let sent = Instant::now();
    slow.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut reply = Vec::new();
    let _ = slow.read_to_end(&mut reply);
    let waited = sent.elapsed();
    assert!(waited >= Duration::from_secs(2) && waited < Duration::from_secs(30), "closed after {waited:?}");
    assert!(reply.is_empty() || reply.starts_with(b"HTTP/1.1 408"), "{}", String::from_utf8_lossy(&reply));
}

#[test]
fn sigterm_lets_running_streams_finish_then_exits_0() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, gpt) = runs(tmp.path());
    let gpt_arg = format!("gpt={}", gpt.display());
    let mut server = Serving::start(&["--model", &gpt_arg, "--drain-seconds", "120"]);
    let body = json!({"prompt": "ROMEO:", "max_chars": 400, "seed": 9});
    let response = client().post(format!("{}/v1/models/gpt:generate_stream", server.url)).json(&body).send().unwrap();
    let mut stream = events(response);
    assert!(stream.next().is_some());
    // SAFETY: signalling our own child process.
    assert_eq!(unsafe { libc::kill(server.pid(), libc::SIGTERM) }, 0);
    let rest: Vec<Value> = stream.collect();
    let last = rest.last().unwrap();
    assert_eq!(last["details"]["generated_chars"], 400, "the running stream was cut: {last}");
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = server.child.0.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "the server did not exit after its last stream");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status:?}: {}", server.stderr());
    assert!(server.stderr().contains("SIGTERM: no new requests; 1 running finish"), "{}", server.stderr());
    let refused = TcpStream::connect(server.url.trim_start_matches("http://"));
    assert!(refused.is_err(), "still accepting after SIGTERM");
    server.child.0.kill().ok();
}

#[test]
fn new_versions_are_served_without_failing_a_request_and_broken_ones_are_not() {
    let tmp = tempfile::tempdir().unwrap();
    let one = small_run(&tmp.path().join("one"), 20_000, &["--max-steps", "50"]);
    let two = small_run(&tmp.path().join("two"), 20_000, &["--max-steps", "300", "--seed", "7"]);
    let base = tmp.path().join("base");
    std::fs::create_dir(&base).unwrap();
    export(&one, &base.join("1"));
    let staged = tmp.path().join("staged");
    std::fs::create_dir(&staged).unwrap();
    export(&two, &staged.join("2"));
    let base_arg = format!("m={}", base.display());
    let server = Serving::start(&["--model", &base_arg, "--poll-seconds", "0.2"]);
    let logits = |server: &Serving| server.post("/v1/models/m:predict", &json!({"instances": [[3, 4]]}));
    let (_, first) = logits(&server);

    let done = std::sync::atomic::AtomicBool::new(false);
    let served = std::thread::scope(|s| {
        let requests = s.spawn(|| {
            let mut answers = Vec::new();
            while !done.load(std::sync::atomic::Ordering::SeqCst) {
                answers.push(logits(&server));
            }
            answers
        });
        std::fs::rename(staged.join("2"), base.join("2")).unwrap();
        let deadline = Instant::now() + Duration::from_secs(120);
        while server.get("/v1/models/m").1["model_version_status"][0]["version"] != "2" {
            assert!(Instant::now() < deadline, "version 2 was never served: {}", server.stderr());
            std::thread::sleep(Duration::from_millis(50));
        }
        std::thread::sleep(Duration::from_millis(300));
        done.store(true, std::sync::atomic::Ordering::SeqCst);
        requests.join().unwrap()
    });
    assert!(served.iter().all(|(status, _)| *status == 200), "a request failed during the swap");
    let (_, second) = logits(&server);
    assert_ne!(first, second);
    assert!(served.iter().any(|a| a.1 == first) && served.last().unwrap().1 == second);
    assert_eq!(server.get("/v1/models/m/versions/2").0, 200);
    assert_eq!(server.get("/v1/models/m/versions/1").0, 404);

    // A broken version 3: a warning, and version 2 keeps serving.
    std::fs::create_dir(base.join("3")).unwrap();
    std::fs::write(base.join("3/saved_model.pb"), b"not a SavedModel").unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !server.stderr().contains("warning: model m: version 3") {
        assert!(Instant::now() < deadline, "no warning for the broken version: {}", server.stderr());
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(server.stderr().matches("warning: model m: version 3").count(), 1, "{}", server.stderr());
    assert!(server.stderr().contains("version 2 keeps serving"), "{}", server.stderr());
    assert_eq!(logits(&server), (200, second));
}

#[test]
fn under_load_with_faults_every_request_gets_its_answer() {
    let tmp = tempfile::tempdir().unwrap();
    let (big, gpt) = runs(tmp.path());
    let (big_arg, gpt_arg) = (format!("big={}", big.display()), format!("gpt={}", gpt.display()));
    let server = Serving::start(&["--model", &big_arg, "--model", &gpt_arg, "--max-concurrent", "256"]);
    let body = |seed: u64| json!({"prompt": "ROMEO:", "max_chars": 60, "seed": seed});
    let models = ["big", "gpt"];
    let expected: Vec<Vec<String>> =
        models.iter().map(|m| (0..4).map(|seed| server.text(m, &body(seed))).collect()).collect();
    let address = server.url.trim_start_matches("http://").to_string();
    let counts = std::thread::scope(|s| {
        let handles: Vec<_> = (0..16usize)
            .map(|who| {
                let (server, expected, address) = (&server, &expected, &address);
                s.spawn(move || {
                    let mut kinds = [0usize; 6];
                    for i in 0..20usize {
                        let (m, seed) = ((who + i) % 2, ((who * 7 + i) % 4) as u64);
                        let kind = (who + 3 * i) % 6;
                        kinds[kind] += 1;
                        match kind {
                            0 => assert_eq!(server.text(models[m], &body(seed)), expected[m][seed as usize]),
                            1 => assert_eq!(server.stream(models[m], &body(seed)).0, expected[m][seed as usize]),
                            2 => {
                                // Goes away after two characters.
                                let url = format!("{}/v1/models/{}:generate_stream", server.url, models[m]);
                                let response = client().post(url).json(&body(seed)).send().unwrap();
                                assert_eq!(events(response).take(2).count(), 2);
                            }
                            3 => {
                                let (status, answer) = server.post(
                                    &format!("/v1/models/{}:predict", models[m]),
                                    &json!({"instances": [[1, 2, 3]]}),
                                );
                                assert_eq!(status, 200, "{answer}");
                                assert_eq!(answer["predictions"][0].as_array().unwrap().len(), 3);
                            }
                            4 => {
                                let (status, answer) = server
                                    .post_raw(&format!("/v1/models/{}:generate", models[m]), "{\"prompt\": [1, 2]}");
                                assert_eq!(status, 400, "{answer}");
                            }
                            _ => {
                                // Not HTTP at all: the connection is answered with 400 or closed.
                                let mut raw = TcpStream::connect(address).unwrap();
                                raw.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
                                let _ = raw.write_all(b"\x16\x03\x01garbage\r\n\r\n{{{{");
                                let mut reply = Vec::new();
                                let _ = raw.read_to_end(&mut reply);
                                let reply = String::from_utf8_lossy(&reply);
                                assert!(reply.is_empty() || reply.starts_with("HTTP/1.1 400"), "{reply}");
                            }
                        }
                    }
                    kinds
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).fold([0; 6], |a, k| std::array::from_fn(|i| a[i] + k[i]))
    });
    eprintln!("requests by kind (text, stream, abandoned, predict, bad JSON, not HTTP): {counts:?}");
    assert_eq!(counts.iter().sum::<usize>(), 320);
    assert_eq!(server.get("/health"), (200, json!({"status": "ok"})));
    for (m, model) in models.iter().enumerate() {
        assert_eq!(server.text(model, &body(3)), expected[m][3], "{model} after the load");
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while server.metric("minigpt_active_streams") != 0.0 {
        assert!(Instant::now() < deadline, "streams left running after the load");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn beyond_loopback_it_warns_unless_a_token_is_needed() {
    // A network namespace of its own, with 10.9.9.9 on its loopback interface: not loopback,
    // reachable from nowhere but the namespace.
    let ok = Command::new("unshare").args(["-rn", "ip", "link", "set", "lo", "up"]).output();
    if !ok.is_ok_and(|o| o.status.success()) {
        eprintln!("skipped: `unshare -rn` and `ip` cannot make a network namespace here");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let big = small_run(&tmp.path().join("bigram"), 20_000, &["--max-steps", "20"]);
    let token = tmp.path().join("token");
    std::fs::write(&token, "t0ken").unwrap();
    for (extra, warns) in [("", true), (format!(" --token-file '{}'", token.display()).as_str(), false)] {
        let script = format!(
            "ip link set lo up && ip addr add 10.9.9.9/32 dev lo && exec \"$0\" serve --listen 10.9.9.9:0 --model 'm={}'{extra}",
            big.display()
        );
        let mut unshare = Command::new("unshare");
        unshare.args(["-rn", "sh", "-c", &script]).arg(assert_cmd::cargo::cargo_bin("minigpt"));
        unshare.env_remove("TF_CPP_MIN_LOG_LEVEL");
        let server = Serving::launch(unshare);
        assert!(server.url.starts_with("http://10.9.9.9:"), "{}", server.url);
        let bound = minigpt::listen::listening(server.child.0.id()).unwrap();
        assert_eq!(bound.len(), 1, "{bound:?}");
        assert_eq!(bound[0].ip().to_string(), "10.9.9.9");
        let stderr = server.stderr();
        let warning = stderr.lines().find(|l| l.starts_with("warning:"));
        match warns {
            true => assert!(
                warning.is_some_and(|w| w.contains("listens on 10.9.9.9:") && w.contains("without authentication")),
                "{stderr}"
            ),
            false => assert_eq!(warning, None, "{stderr}"),
        }
    }
}
