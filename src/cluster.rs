//! TensorFlow's gRPC runtime: `minigpt server`'s server, the address list of `--cluster`, and
//! the chief's view of a cluster (its own in-process server, the `ConfigProto` that names every
//! task, and probes of the workers).
//!
//! Every server boots as job `local`, task 0, knowing only its own address; the chief passes the
//! whole cluster in `ConfigProto.cluster_def` (a server that sees its own boot name in that list
//! refuses the session, so the chief's server is `local` to itself and `chief` to the session).
//! A session's resources (the chief's variables) live as long as the session: after a worker
//! fails, the state is read from the failed session and written into the next one.

use std::ffi::CStr;
use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use prost::Message;
use tensorflow::{ops, Graph, Scope, Session, SessionOptions, SessionRunArgs};
use tensorflow_sys_runtime as tf;

use crate::device::DeviceInfo;
use crate::proto;
use crate::tfx::OwnedStatus;

/// The job of the process that holds the variables and runs the loop.
pub const CHIEF: &str = "/job:chief/task:0";

/// How long a probe of one worker may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// The addresses of `--cluster worker=H1:P1,H2:P2`, in task order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterSpec {
    pub workers: Vec<String>,
}

impl ClusterSpec {
    /// Parses `worker=HOST:PORT[,HOST:PORT...]`.
    pub fn parse(text: &str) -> Result<Self> {
        let list = text
            .strip_prefix("worker=")
            .with_context(|| format!("--cluster {text:?}: expected worker=HOST:PORT[,HOST:PORT...]"))?;
        let mut workers: Vec<String> = Vec::new();
        for address in list.split(',') {
            let address = parse_address(address).with_context(|| format!("--cluster {text:?}"))?;
            ensure!(!workers.contains(&address), "--cluster {text:?}: {address} is listed twice");
            workers.push(address);
        }
        Ok(Self { workers })
    }

    /// `/job:worker/task:i`.
    pub fn worker(i: usize) -> String {
        format!("/job:worker/task:{i}")
    }
}

/// Checks `HOST:PORT` (a port from 1 to 65535, a host without spaces or commas).
pub fn parse_address(address: &str) -> Result<String> {
    let (host, port) =
        address.rsplit_once(':').with_context(|| format!("{address:?} is not HOST:PORT (the port is missing)"))?;
    ensure!(
        !host.is_empty() && !host.contains(|c: char| c.is_whitespace() || c == ',' || c == '='),
        "{address:?} is not HOST:PORT (bad host)"
    );
    let port: u16 = port.parse().ok().filter(|&p| p > 0).with_context(|| {
        format!("{address:?} is not HOST:PORT: the port must be a number from 1 to 65535, not {port:?}")
    })?;
    Ok(format!("{host}:{port}"))
}

/// A free port on 127.0.0.1 (bound, then released for the server to take).
pub fn free_local_address() -> Result<String> {
    let listener = TcpListener::bind("127.0.0.1:0").context("finding a free port on 127.0.0.1")?;
    Ok(format!("127.0.0.1:{}", listener.local_addr()?.port()))
}

/// A started TensorFlow gRPC server. It is never deleted: `TF_DeleteServer` on a started server
/// aborts the process, and `TF_ServerStop` is not implemented; it lives as long as the process.
pub struct Server {
    raw: *mut tf::TF_Server,
    target: String,
}

// SAFETY: TensorFlow's server object is thread-safe (its methods lock), and it is never freed.
unsafe impl Send for Server {}
unsafe impl Sync for Server {}

impl Server {
    /// Starts a server listening on `address` (`HOST:PORT`) as job `local`, task 0.
    pub fn start(address: &str) -> Result<Self> {
        let address = parse_address(address).context("--listen")?;
        let port: i32 = address.rsplit_once(':').and_then(|(_, p)| p.parse().ok()).unwrap_or(0);
        // Refuse a port in use with a clear line (gRPC would report it in its own words).
        if let Err(e) = TcpListener::bind(("0.0.0.0", port as u16)) {
            bail!("cannot listen on {address}: port {port} is not free ({e})");
        }
        let def = proto::ServerDef {
            cluster: Some(cluster_def(&[("local", std::slice::from_ref(&address))])),
            job_name: "local".into(),
            task_index: 0,
            protocol: "grpc".into(),
            ..Default::default()
        };
        let bytes = def.encode_to_vec();
        let status = OwnedStatus::new();
        // SAFETY: the bytes outlive the call; the status is checked before the server is used.
        let raw = unsafe { tf::TF_NewServer(bytes.as_ptr().cast(), bytes.len(), status.raw()) };
        check(&status).with_context(|| format!("starting a TensorFlow server on {address}"))?;
        // SAFETY: `raw` is a server TF_NewServer returned with an OK status.
        unsafe { tf::TF_ServerStart(raw, status.raw()) };
        check(&status).with_context(|| format!("starting the TensorFlow server on {address}"))?;
        // SAFETY: the target is a NUL-terminated string owned by the server, copied at once.
        let target = unsafe { CStr::from_ptr(tf::TF_ServerTarget(raw)) }.to_string_lossy().into_owned();
        Ok(Self { raw, target })
    }

    /// `grpc://HOST:PORT`: what sessions connect to.
    pub fn target(&self) -> &str {
        &self.target
    }

    /// Blocks until the process ends.
    pub fn join(&self) -> Result<()> {
        let status = OwnedStatus::new();
        // SAFETY: the server is alive for the whole process.
        unsafe { tf::TF_ServerJoin(self.raw, status.raw()) };
        check(&status).context("the TensorFlow server stopped")
    }
}

/// `Ok` unless the C call that filled `status` failed.
fn check(status: &OwnedStatus) -> Result<()> {
    match status.error() {
        Some(message) => bail!("{}", crate::text::one_line(&message)),
        None => Ok(()),
    }
}

/// TensorFlow's DEADLINE_EXCEEDED with `message`, as a run that timed out reports it.
fn deadline(message: &str) -> tensorflow::Status {
    tensorflow::Status::new_set_lossy(tensorflow::Code::DeadlineExceeded, message)
}

/// `ClusterDef` of `jobs`: each a name and its task addresses in order.
fn cluster_def(jobs: &[(&str, &[String])]) -> proto::ClusterDef {
    proto::ClusterDef {
        job: jobs
            .iter()
            .map(|(name, tasks)| proto::JobDef {
                name: name.to_string(),
                tasks: tasks.iter().enumerate().map(|(i, a)| (i as i32, a.clone())).collect(),
            })
            .collect(),
    }
}

/// `minigpt server --listen HOST:PORT`: starts a server, prints its target, and serves until
/// SIGTERM or SIGINT, then exits 0 (a started server cannot be stopped, only left).
pub fn serve(address: &str) -> Result<()> {
    let server = Server::start(address)?;
    println!("minigpt server: TensorFlow gRPC server at {} (job local, task 0); stop with Ctrl-C", server.target());
    use std::io::Write;
    std::io::stdout().flush()?;
    let mut signals = signal_hook::iterator::Signals::new([signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM])
        .context("installing the signal handler")?;
    std::thread::spawn(move || {
        if signals.forever().next().is_some() {
            std::process::exit(0);
        }
    });
    server.join()
}

/// The chief's view of a cluster: its own server, the workers, and the timeouts.
#[derive(Debug, Clone)]
pub struct Cluster {
    pub spec: ClusterSpec,
    /// The chief's own address, as the workers reach it.
    pub chief: String,
    /// The chief's session target (`grpc://...`).
    pub target: String,
    /// How long to wait for a worker that is down (at start and after a failure).
    pub worker_timeout: Duration,
    /// The longest a graph run may take (`operation_timeout_in_ms`): a hung worker fails the run.
    pub step_timeout: Duration,
    /// Per worker: a probe is still waiting for its answer (a hung worker never gives one).
    probing: Arc<Vec<AtomicBool>>,
}

impl Cluster {
    /// Starts the chief's in-process server on `listen` (default: a free port of 127.0.0.1).
    pub fn start(
        spec: ClusterSpec,
        listen: Option<&str>,
        worker_timeout: Duration,
        step_timeout: Duration,
    ) -> Result<Self> {
        let chief = match listen {
            Some(address) => parse_address(address).context("--listen")?,
            None => free_local_address()?,
        };
        ensure!(!spec.workers.contains(&chief), "--listen {chief} is also in --cluster: the chief needs its own port");
        // A worker that is not there fails a call at once instead of being waited for without end
        // (TensorFlow's master waits for every worker's devices with no deadline otherwise).
        std::env::set_var("GRPC_FAIL_FAST", "true");
        let server = Box::leak(Box::new(Server::start(&chief)?));
        let probing = Arc::new(spec.workers.iter().map(|_| AtomicBool::new(false)).collect());
        Ok(Self { spec, chief, target: server.target().to_string(), worker_timeout, step_timeout, probing })
    }

    /// The session's `ClusterDef`: job `chief` (this process) and job `worker`.
    pub fn cluster_def(&self) -> proto::ClusterDef {
        cluster_def(&[("chief", std::slice::from_ref(&self.chief)), ("worker", &self.spec.workers)])
    }

    /// `config` with the cluster and the run timeout added.
    pub fn configure(&self, mut config: proto::ConfigProto) -> proto::ConfigProto {
        config.cluster_def = Some(self.cluster_def());
        config.operation_timeout_in_ms = self.step_timeout.as_millis() as i64;
        config
    }

    /// Session options connecting to the chief's server with `config`.
    pub fn session_options(&self, config: proto::ConfigProto) -> Result<SessionOptions> {
        let mut options = SessionOptions::new();
        options.set_target(&self.target).context("setting the session's target")?;
        options.set_config(&self.configure(config).encode_to_vec()).context("setting the session's ConfigProto")?;
        Ok(options)
    }

    /// Whether worker `i` answers: runs a constant on it, within [`PROBE_TIMEOUT`]. A probe that
    /// gets no answer in that time is left waiting (a hung worker holds it), and the worker counts
    /// as down until it answers.
    pub fn probe(&self, i: usize) -> Result<()> {
        if self.probing[i].swap(true, Ordering::SeqCst) {
            return Err(deadline("the previous probe still has no answer").into());
        }
        let (tx, rx) = std::sync::mpsc::channel();
        let cluster = self.clone();
        std::thread::spawn(move || {
            let answer = cluster.run_probe(i);
            cluster.probing[i].store(false, Ordering::SeqCst);
            let _ = tx.send(answer);
        });
        match rx.recv_timeout(PROBE_TIMEOUT + Duration::from_secs(1)) {
            Ok(answer) => answer,
            Err(_) => Err(deadline("no answer").into()),
        }
    }

    fn run_probe(&self, i: usize) -> Result<()> {
        let mut scope = Scope::new_root_scope().with_device(&ClusterSpec::worker(i));
        let one = ops::constant(1i32, &mut scope)?;
        let probe = ops::identity(one, &mut scope)?;
        // Only this worker and the chief: the others may be down.
        let filters = vec![ClusterSpec::worker(i), CHIEF.to_string()];
        let mut config = self.configure(proto::ConfigProto { device_filters: filters, ..Default::default() });
        config.operation_timeout_in_ms = PROBE_TIMEOUT.as_millis() as i64;
        let mut options = SessionOptions::new();
        options.set_target(&self.target)?;
        options.set_config(&config.encode_to_vec())?;
        let session = Session::new(&options, &scope.graph())?;
        let mut args = SessionRunArgs::new();
        args.request_fetch(&probe, 0);
        Ok(session.run(&mut args)?)
    }

    /// The workers that do not answer now, with why (all probed at once); an error if one
    /// answers wrongly (not a worker that is down or hung, but a cluster that cannot work).
    pub fn down(&self) -> Result<Vec<(usize, String)>> {
        let answers: Vec<Result<()>> = std::thread::scope(|s| {
            let probes: Vec<_> = (0..self.spec.workers.len()).map(|i| s.spawn(move || self.probe(i))).collect();
            probes
                .into_iter()
                .map(|p| p.join().unwrap_or_else(|_| Err(anyhow::anyhow!("the probe panicked"))))
                .collect()
        });
        let mut down = Vec::new();
        for (i, answer) in answers.into_iter().enumerate() {
            let Err(e) = answer else { continue };
            let why = short_status(&e.to_string());
            ensure!(transient(&e), "worker task {i} at {}: {why}", self.spec.workers[i]);
            down.push((i, why));
        }
        Ok(down)
    }

    /// Waits (polling) until every worker answers, for at most `worker_timeout`: an error naming
    /// each one still down.
    pub fn wait_for_workers(&self) -> Result<Duration> {
        let start = Instant::now();
        loop {
            let down = self.down()?;
            if down.is_empty() {
                return Ok(start.elapsed());
            }
            if start.elapsed() >= self.worker_timeout {
                let names: Vec<String> = down
                    .iter()
                    .map(|(i, why)| format!("worker task {i} at {} ({why})", self.spec.workers[*i]))
                    .collect();
                bail!(
                    "{} did not answer within {} s (--worker-timeout): is `minigpt server --listen {}` running there?",
                    names.join(", "),
                    self.worker_timeout.as_secs(),
                    self.spec.workers[down[0].0]
                );
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// Every device of every task.
    pub fn devices(&self) -> Result<Vec<DeviceInfo>> {
        let graph = Graph::new();
        let session = Session::new(&self.session_options(proto::ConfigProto::default())?, &graph)
            .context("connecting to the cluster")?;
        Ok(session
            .device_list()?
            .into_iter()
            .map(|d| DeviceInfo { name: d.name, kind: d.device_type, memory_bytes: d.memory_bytes })
            .collect())
    }
}

/// Whether `error` is what a worker that is down, restarting or hung causes.
pub fn transient(error: &anyhow::Error) -> bool {
    use tensorflow::Code;
    let code = error.downcast_ref::<tensorflow::Status>().map(|s| s.code());
    matches!(code, Some(Code::Unavailable | Code::Aborted | Code::DeadlineExceeded | Code::Cancelled))
}

/// The first line of a TensorFlow status message, without TensorFlow's banners.
pub fn short_status(message: &str) -> String {
    let lines = message.lines().map(str::trim);
    let line = lines.filter(|l| !l.is_empty() && !l.starts_with("=====") && !l.starts_with("Graph execution error"));
    crate::text::one_line(&line.take(2).collect::<Vec<_>>().join(" "))
}

/// The task a failed run's message names first (`/job:worker/replica:0/task:N`), if any.
pub fn failed_worker(message: &str) -> Option<usize> {
    let at = message.find("/job:worker/replica:0/task:")?;
    let rest = &message[at + "/job:worker/replica:0/task:".len()..];
    rest[..rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(rest.len())].parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_lists_are_checked() {
        let spec = ClusterSpec::parse("worker=127.0.0.1:2222,host-b:2223").unwrap();
        assert_eq!(spec.workers, ["127.0.0.1:2222", "host-b:2223"]);
        for bad in ["127.0.0.1:2222", "worker=", "worker=a:0", "worker=a:70000", "worker=a", "worker=a:1,a:1"] {
            assert!(ClusterSpec::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(failed_worker("UNAVAILABLE: From /job:worker/replica:0/task:12: reset"), Some(12));
        assert_eq!(failed_worker("Operation timed out."), None);
    }
}
