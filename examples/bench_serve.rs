//! `make bench`'s serving section: a load generator against `minigpt serve` (started here as a
//! child process on a free port of 127.0.0.1, killed by PID at the end). For each level of
//! concurrent streaming clients and each request length: aggregate characters per second, and
//! p50/p99 of the time to the first character and of the whole request; with continuous batching
//! and with `--max-batch 1`.
//! Then the server's RSS after the first 100 and after 2,000 requests. JSON lines on stdout.
//!
//!     cargo run --release --example bench_serve -- --minigpt target/release/minigpt --run RUN

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use serde_json::json;

#[derive(Parser)]
struct Args {
    /// The `minigpt` binary.
    #[arg(long)]
    minigpt: PathBuf,
    /// The run directory or SavedModel to serve.
    #[arg(long)]
    run: PathBuf,
    /// Concurrent clients, per level.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32,64")]
    levels: Vec<usize>,
    /// Characters per request, one workload each (e.g. `50,100`: within a 64-character context
    /// after `ROMEO:`, and past it).
    #[arg(long, value_delimiter = ',', default_value = "100")]
    chars: Vec<usize>,
    /// Requests per client at each level.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// More flags for `minigpt serve` (e.g. `--serve-flag=--xla`).
    #[arg(long = "serve-flag", allow_hyphen_values = true)]
    serve_flags: Vec<String>,
    /// Also measure memory over this many short requests (0: not).
    #[arg(long, default_value_t = 0)]
    leak_requests: usize,
}

/// A `minigpt serve` child, killed when dropped.
struct Server {
    child: Child,
    url: String,
}

impl Server {
    fn start(args: &Args, extra: &[&str]) -> Result<Self> {
        let model = format!("m={}", args.run.display());
        let mut child = Command::new(&args.minigpt)
            .args(["serve", "--listen", "127.0.0.1:0", "--max-concurrent", "64", "--model", &model])
            .args(extra)
            .args(&args.serve_flags)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("starting minigpt serve")?;
        let mut line = String::new();
        BufReader::new(child.stdout.take().context("no stdout")?).read_line(&mut line)?;
        let Some(url) = line.trim().strip_prefix("listening on ") else {
            let _ = child.kill();
            bail!("the server did not start: {line:?}");
        };
        Ok(Self { url: url.to_string(), child })
    }

    fn rss_kib(&self) -> Result<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))?;
        let line = status.lines().find(|l| l.starts_with("VmRSS:")).context("no VmRSS")?;
        Ok(line.split_whitespace().nth(1).context("VmRSS")?.parse()?)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One streamed request: (time to the first character, whole time, characters).
fn stream(client: &reqwest::blocking::Client, url: &str, chars: usize, seed: u64) -> Result<(f64, f64, usize)> {
    let started = Instant::now();
    let body = json!({"prompt": "ROMEO:", "max_chars": chars, "seed": seed});
    let response = client.post(format!("{url}/v1/models/m:generate_stream")).json(&body).send()?;
    anyhow::ensure!(response.status() == 200, "status {}", response.status());
    let (mut first, mut count) = (None, 0);
    for line in BufReader::new(response).lines() {
        let line = line?;
        let event: serde_json::Value = match line.strip_prefix("data: ") {
            Some(data) => serde_json::from_str(data)?,
            None => continue,
        };
        if event["token"]["text"].is_string() {
            first.get_or_insert_with(|| started.elapsed().as_secs_f64());
            count += 1;
        }
    }
    Ok((first.context("no character came")?, started.elapsed().as_secs_f64(), count))
}

fn percentile(values: &mut [f64], p: f64) -> f64 {
    values.sort_by(f64::total_cmp);
    values[((values.len() - 1) as f64 * p).round() as usize]
}

/// `clients` threads, each making `rounds` requests: one JSON line.
fn level(server: &Server, clients: usize, rounds: usize, chars: usize) -> Result<serde_json::Value> {
    let next = AtomicUsize::new(0);
    let started = Instant::now();
    let results: Vec<(f64, f64, usize)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..clients)
            .map(|_| {
                s.spawn(|| -> Result<Vec<(f64, f64, usize)>> {
                    let client = reqwest::blocking::Client::builder().timeout(Duration::from_secs(600)).build()?;
                    (0..rounds)
                        .map(|_| stream(&client, &server.url, chars, next.fetch_add(1, Ordering::SeqCst) as u64))
                        .collect()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect::<Result<Vec<_>>>().map(|v| v.concat())
    })?;
    let wall = started.elapsed().as_secs_f64();
    let total: usize = results.iter().map(|r| r.2).sum();
    anyhow::ensure!(total == clients * rounds * chars, "{total} characters came of {}", clients * rounds * chars);
    let mut first: Vec<f64> = results.iter().map(|r| r.0).collect();
    let mut whole: Vec<f64> = results.iter().map(|r| r.1).collect();
    Ok(json!({
        "clients": clients,
        "requests": results.len(),
        "chars_per_s": total as f64 / wall,
        "ttfc_p50_ms": percentile(&mut first, 0.5) * 1e3,
        "ttfc_p99_ms": percentile(&mut first, 0.99) * 1e3,
        "latency_p50_ms": percentile(&mut whole, 0.5) * 1e3,
        "latency_p99_ms": percentile(&mut whole, 0.99) * 1e3,
    }))
}

fn main() -> Result<()> {
    let args = Args::parse();
    for (mode, extra) in [("batched", &[][..]), ("max_batch_1", &["--max-batch", "1"][..])] {
        let server = Server::start(&args, extra)?;
        // Warm-up: TensorFlow prepares its kernels for each new batch shape once.
        for clients in [1, 2] {
            level(&server, clients, 1, 100)?;
        }
        for &chars in &args.chars {
            for &clients in &args.levels {
                let mut line = level(&server, clients, args.rounds, chars)?;
                line["mode"] = json!(mode);
                line["chars"] = json!(chars);
                println!("{line}");
            }
        }
    }
    if args.leak_requests > 0 {
        let server = Server::start(&args, &[])?;
        let clients = 32;
        let (first, rest) = (100usize.div_ceil(clients), args.leak_requests.saturating_sub(100).div_ceil(clients));
        level(&server, clients, first, 20)?;
        let after_first = server.rss_kib()?;
        level(&server, clients, rest, 20)?;
        let after_all = server.rss_kib()?;
        println!(
            "{}",
            json!({
                "mode": "memory",
                "requests_first": first * clients,
                "rss_kib_after_first": after_first,
                "requests_all": (first + rest) * clients,
                "rss_kib_after_all": after_all,
            })
        );
    }
    Ok(())
}
