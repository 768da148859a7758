//! Helpers of the tests that run TensorFlow's gRPC runtime: `minigpt server` and `minigpt train`
//! child processes on free ports of 127.0.0.1, killed by PID when dropped.

use std::io::{BufRead, BufReader, Lines};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use super::minigpt;

/// A child process, killed (by PID) when dropped if it is still running.
pub struct Proc(pub Child);

impl Proc {
    pub fn signal(&self, signal: i32) {
        // SAFETY: signalling our own child process.
        assert_eq!(unsafe { libc::kill(self.0.id() as i32, signal) }, 0);
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A `minigpt server` child process.
pub struct Server {
    pub child: Proc,
    pub address: String,
    /// The first line it printed on stdout.
    pub line: String,
    stderr: tempfile::NamedTempFile,
}

/// The `minigpt` binary as a plain child process, with none of TF_CONFIG or the tests' logging.
pub fn command() -> Command {
    let mut command = Command::new(assert_cmd::cargo::cargo_bin("minigpt"));
    command.env_remove("TF_CONFIG").env_remove("TF_CPP_MIN_LOG_LEVEL");
    command
}

impl Server {
    /// Starts a server on a free port of 127.0.0.1.
    pub fn start() -> Self {
        Self::at(&free_local_address())
    }

    /// Starts a server on `address` and waits (at most 60 s) for it to say it serves.
    pub fn at(address: &str) -> Self {
        let mut server = command();
        server.args(["server", "--listen", address]);
        Self::launch(server, address)
    }

    /// Starts `command`, a server that is to listen on `address`, and waits (at most 60 s) for it
    /// to say it serves there.
    pub fn launch(command: Command, address: &str) -> Self {
        let (child, line, stderr) = until_first_line(command, Duration::from_secs(60));
        let port = address.rsplit_once(':').unwrap().1;
        assert!(line.starts_with("minigpt server: TensorFlow gRPC server at grpc://") && line.contains(port), "{line}");
        Self { child, address: address.to_string(), line, stderr }
    }

    /// What it printed on stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.stderr.path()).unwrap()
    }

    /// The addresses it listens on (the kernel's tables, as `ss -ltnp` shows them).
    pub fn listening(&self) -> Vec<std::net::SocketAddr> {
        minigpt::listen::listening(self.child.0.id()).unwrap()
    }
}

/// Starts `command` with its stderr in a file and waits (at most `wait`) for the first line it
/// prints on stdout, the one a server prints once it serves.
pub fn until_first_line(mut command: Command, wait: Duration) -> (Proc, String, tempfile::NamedTempFile) {
    let stderr = tempfile::NamedTempFile::new().unwrap();
    let mut child = command.stdout(Stdio::piped()).stderr(Stdio::from(stderr.reopen().unwrap())).spawn().unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let first = BufReader::new(stdout).lines().next();
        let _ = tx.send(first);
    });
    let child = Proc(child);
    match rx.recv_timeout(wait) {
        Ok(Some(Ok(line))) => (child, line, stderr),
        _ => panic!("the server did not start: {}", std::fs::read_to_string(stderr.path()).unwrap()),
    }
}

/// A free port of 127.0.0.1, as `127.0.0.1:PORT`.
pub fn free_local_address() -> String {
    minigpt::cluster::Listen::free_local().unwrap().name
}

pub fn cluster_flag(servers: &[&Server]) -> String {
    format!("worker={}", servers.iter().map(|s| s.address.as_str()).collect::<Vec<_>>().join(","))
}

/// 20,000 characters of the corpus in `dir`.
pub fn corpus(dir: &Path) -> PathBuf {
    let text = std::fs::read_to_string(super::corpus_path()).unwrap();
    let path = dir.join("small.txt");
    std::fs::write(&path, &text[..20_000]).unwrap();
    path
}

/// `minigpt train -q` of `steps` steps, windows in order, every loss in metrics.csv.
pub fn train(corpus: &Path, out: &Path, steps: u32, extra: &[&str]) -> Output {
    train_with(corpus, out, steps, extra, &[])
}

/// [`train`] with `env` set.
pub fn train_with(corpus: &Path, out: &Path, steps: u32, extra: &[&str], env: &[(&str, &str)]) -> Output {
    let out = minigpt()
        .envs(env.iter().copied())
        .args(["train", "-q", "--shuffle", "none", "--log-every", "1", "--eval-batches", "2", "--data"])
        .arg(corpus)
        .arg("--out")
        .arg(out)
        .args(["--max-steps", &steps.to_string()])
        .args(extra)
        .timeout(Duration::from_secs(600))
        .output()
        .unwrap();
    assert!(out.status.success(), "{extra:?}: {}", String::from_utf8_lossy(&out.stderr));
    out
}

/// The training losses of metrics.csv, in step order.
pub fn losses(run: &Path) -> Vec<f64> {
    let text = std::fs::read_to_string(run.join("metrics.csv")).unwrap();
    text.lines().skip(1).filter(|l| l.ends_with(',')).map(|l| l.split(',').nth(2).unwrap().parse().unwrap()).collect()
}

/// A `minigpt train` child process and its stdout lines.
pub struct Training {
    pub child: Proc,
    pub lines: Lines<BufReader<ChildStdout>>,
    /// Set once its output has ended; until then a watchdog kills it after [`TRAINING_LIMIT`].
    ended: Arc<AtomicBool>,
}

/// The longest a training child may run in a test.
const TRAINING_LIMIT: Duration = Duration::from_secs(600);

impl Training {
    /// `minigpt train` on `corpus` into `out`, as a user runs it (TensorFlow's log level
    /// minigpt's own).
    pub fn spawn(corpus: &Path, out: &Path, args: &[&str]) -> Self {
        Self::spawn_with(corpus, out, args, &[])
    }

    /// [`Training::spawn`] with `env` set.
    pub fn spawn_with(corpus: &Path, out: &Path, args: &[&str], env: &[(&str, &str)]) -> Self {
        let mut child = command()
            .envs(env.iter().copied())
            .args(["train", "--eval-batches", "2", "--data"])
            .arg(corpus)
            .arg("--out")
            .arg(out)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let ended = Arc::new(AtomicBool::new(false));
        let (watched, pid) = (ended.clone(), child.id() as i32);
        std::thread::spawn(move || {
            let start = std::time::Instant::now();
            while start.elapsed() < TRAINING_LIMIT {
                std::thread::sleep(Duration::from_millis(200));
                if watched.load(Ordering::SeqCst) {
                    return;
                }
            }
            // SAFETY: our child, not yet waited for (its PID cannot have been reused).
            unsafe { libc::kill(pid, libc::SIGKILL) };
        });
        Self { child: Proc(child), lines, ended }
    }

    /// Reads stdout until the `Step {step}:` line.
    pub fn until_step(&mut self, step: u64) {
        let prefix = format!("Step {step}:");
        let reached = self.lines.by_ref().map(|l| l.unwrap()).any(|l| l.starts_with(&prefix));
        assert!(reached, "training never reached step {step}");
    }

    /// The rest of stdout, then the exit status and stderr.
    pub fn finish(&mut self) -> (Vec<String>, std::process::ExitStatus, String) {
        let rest: Vec<String> = self.lines.by_ref().map(|l| l.unwrap()).collect();
        let mut stderr = String::new();
        std::io::Read::read_to_string(&mut self.child.0.stderr.take().unwrap(), &mut stderr).unwrap();
        self.ended.store(true, Ordering::SeqCst);
        (rest, self.child.0.wait().unwrap(), stderr)
    }
}

impl Drop for Training {
    fn drop(&mut self) {
        // Before the child is killed and reaped: the watchdog must not signal its PID after that.
        self.ended.store(true, Ordering::SeqCst);
    }
}

/// Fails with one `error:` line containing `needle` (only `warning:` lines before it).
pub fn fails_with(args: &[&str], needle: &str) {
    fails_with_env(args, &[], needle)
}

/// [`fails_with`] with `env` set.
pub fn fails_with_env(args: &[&str], env: &[(&str, &str)], needle: &str) {
    let out = minigpt().args(args).envs(env.iter().copied()).timeout(Duration::from_secs(120)).output().unwrap();
    assert!(!out.status.success(), "{args:?} succeeded");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr.lines().collect();
    assert!(lines.last().is_some_and(|l| l.starts_with("error: ") && l.contains(needle)), "{args:?}: {stderr}");
    assert!(lines[..lines.len() - 1].iter().all(|l| l.starts_with("warning: ")), "{args:?}: {stderr}");
}
