//! TensorFlow's gRPC runtime: `minigpt server`'s server (server.rs), the address list of
//! `--cluster` or TF_CONFIG (tf_config.rs), and the chief's view of a cluster (its own in-process
//! server, the `ConfigProto` that names every task, and probes of the workers).
//!
//! Every server boots as job `local`, task 0, knowing only its own address; the chief passes the
//! whole cluster in `ConfigProto.cluster_def` (a server that sees its own boot name in that list
//! refuses the session, so the chief's server is `local` to itself and the chief's job to the
//! session). A session's resources (the chief's variables) live as long as the session: after a
//! worker fails, the state is read from the failed session and written into the next one.
//!
//! The chief's job name is its own (`chief_` and 8 hex digits of its machine and run directory):
//! a worker keeps the sessions of one master task name from one process only, and drops them
//! when a process of another incarnation opens a session under that name (TensorFlow's
//! `SessionMgr`, which so cleans up after a chief that died). Two chiefs under one name would
//! keep dropping each other's sessions; under their own names they train side by side, and a
//! chief restarted on its run directory still cleans up after its earlier self.

mod server;
pub mod tf_config;

pub use server::{serve, Listen, Server};

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use prost::Message;
use sha2::{Digest, Sha256};
use tensorflow::{ops, Graph, Scope, Session, SessionOptions, SessionRunArgs};

use crate::device::DeviceInfo;
use crate::listen;
use crate::proto;
use crate::tfx::OwnedStatus;

/// How long a probe of one worker may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// How often a wait says what it is waiting for.
const WAIT_REPORT: Duration = Duration::from_secs(10);

/// How a wait for the workers ended.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Waited {
    /// Every worker answers, after this long.
    Answered(Duration),
    /// The caller asked to stop waiting (a signal).
    Stopped,
}

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

/// `--cluster` (or TF_CONFIG) and its companions, as the chief is told them.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    pub spec: ClusterSpec,
    /// The chief's own server (default: a free port of 127.0.0.1).
    pub listen: Option<Listen>,
    pub worker_timeout: Duration,
    pub step_timeout: Duration,
    /// Wait, up to `worker_timeout`, for worker names that do not resolve yet (TF_CONFIG: a cluster
    /// manager's names for tasks still starting); otherwise such a name is an error at once.
    pub await_names: bool,
}

/// The chief's view of a cluster: its own server, the workers, and the timeouts.
#[derive(Debug, Clone)]
pub struct Cluster {
    pub spec: ClusterSpec,
    /// The chief's own address, as the workers reach it.
    pub chief: String,
    /// The chief's job name (`chief_` and 8 hex digits).
    pub job: String,
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
    /// Starts the chief's in-process server on `options.listen` (default: a free port of
    /// 127.0.0.1), once the workers are known to be distinct tasks. The chief's job name comes
    /// from this machine and `run`, the run directory (a name of its own for each process
    /// without one).
    pub fn start(options: &ClusterOptions, run: Option<&Path>) -> Result<Self> {
        let listen = match &options.listen {
            Some(listen) => listen.clone(),
            None => Listen::free_local()?,
        };
        let wait_for_names = if options.await_names { options.worker_timeout } else { Duration::ZERO };
        let resolved = resolve_workers(&options.spec, wait_for_names)?;
        check_distinct(&options.spec, &resolved, &listen)?;
        // A worker that is not there fails a call at once instead of being waited for without end
        // (TensorFlow's master waits for every worker's devices with no deadline otherwise).
        std::env::set_var("GRPC_FAIL_FAST", "true");
        let server = Box::leak(Box::new(Server::start(&listen)?));
        let probing = Arc::new(options.spec.workers.iter().map(|_| AtomicBool::new(false)).collect());
        Ok(Self {
            spec: options.spec.clone(),
            chief: listen.name,
            job: chief_job(run)?,
            target: server.target().to_string(),
            worker_timeout: options.worker_timeout,
            step_timeout: options.step_timeout,
            probing,
        })
    }

    /// `/job:<the chief's job>/task:0`: where the variables and the loop's ops run.
    pub fn chief_device(&self) -> String {
        format!("/job:{}/task:0", self.job)
    }

    /// The session's `ClusterDef`: the chief's job (this process) and job `worker`.
    pub fn cluster_def(&self) -> proto::ClusterDef {
        cluster_def(&[(&self.job, std::slice::from_ref(&self.chief)), ("worker", &self.spec.workers)])
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
        let filters = vec![ClusterSpec::worker(i), self.chief_device()];
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
    /// each one still down. Says on stderr every [`WAIT_REPORT`] what it waits for.
    pub fn wait_for_workers(&self) -> Result<Duration> {
        match self.wait_for_workers_unless(&|| false)? {
            Waited::Answered(waited) => Ok(waited),
            Waited::Stopped => bail!("stopped waiting for the workers"),
        }
    }

    /// [`Cluster::wait_for_workers`], which also ends, within a probe's time, once `stop` is true.
    pub fn wait_for_workers_unless(&self, stop: &dyn Fn() -> bool) -> Result<Waited> {
        let start = Instant::now();
        let mut reported = Duration::ZERO;
        loop {
            let down = self.down()?;
            if down.is_empty() {
                return Ok(Waited::Answered(start.elapsed()));
            }
            if stop() {
                return Ok(Waited::Stopped);
            }
            let names: Vec<String> =
                down.iter().map(|(i, why)| format!("worker task {i} at {} ({why})", self.spec.workers[*i])).collect();
            let waited = start.elapsed();
            if waited >= self.worker_timeout {
                bail!(
                    "{} did not answer within {} s (--worker-timeout): is `minigpt server --listen {}` running there?",
                    names.join(", "),
                    self.worker_timeout.as_secs(),
                    self.spec.workers[down[0].0]
                );
            }
            if waited >= reported + WAIT_REPORT {
                reported = waited;
                eprintln!(
                    "warning: still waiting for {}: {} s of {} s (--worker-timeout)",
                    names.join(", "),
                    waited.as_secs(),
                    self.worker_timeout.as_secs()
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

/// Every address of every worker, in task order. A name that does not resolve is an error, at
/// once with `timeout` zero; otherwise it is waited for (a cluster manager's name for a task that
/// is still starting), polling, up to `timeout`, saying so every [`WAIT_REPORT`].
fn resolve_workers(spec: &ClusterSpec, timeout: Duration) -> Result<Vec<Vec<SocketAddr>>> {
    let start = Instant::now();
    let mut reported: Option<Duration> = None;
    loop {
        let attempt: Result<Vec<Vec<SocketAddr>>> = spec
            .workers
            .iter()
            .enumerate()
            .map(|(i, worker)| listen::resolve_all(worker).with_context(|| format!("worker task {i}")))
            .collect();
        let error = match attempt {
            Ok(resolved) => return Ok(resolved),
            Err(e) if timeout.is_zero() => return Err(e),
            Err(e) if start.elapsed() >= timeout => {
                return Err(e.context(format!("still after {} s (--worker-timeout)", timeout.as_secs())))
            }
            Err(e) => e,
        };
        let waited = start.elapsed();
        if reported.is_none_or(|r| waited >= r + WAIT_REPORT) {
            reported = Some(waited);
            eprintln!(
                "warning: {}; waiting for it to resolve: {} s of {} s (--worker-timeout)",
                crate::text::error_line(&error),
                waited.as_secs(),
                timeout.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Checks that the workers are distinct tasks, none of them the chief: no two addresses of the list
/// (each resolved to every address it has) reach the same socket, whatever their spelling
/// (`localhost:P` and `127.0.0.1:P`, a host name and its address).
fn check_distinct(spec: &ClusterSpec, resolved: &[Vec<SocketAddr>], chief: &Listen) -> Result<()> {
    let mut seen: Vec<(usize, Vec<SocketAddr>)> = Vec::new();
    for ((i, worker), addresses) in spec.workers.iter().enumerate().zip(resolved) {
        let addresses = addresses.clone();
        ensure!(
            addresses.iter().all(|a| !a.ip().is_unspecified()),
            "worker task {i} at {worker}: a worker is reached at an address of its machine, not {}",
            addresses[0].ip()
        );
        let same_as_chief = |a: &SocketAddr| {
            *a == chief.bind
                || (chief.bind.ip().is_unspecified() && a.port() == chief.bind.port() && listen::is_loopback(a.ip()))
        };
        ensure!(
            !addresses.iter().any(same_as_chief),
            "worker task {i} at {worker} is the chief's own address ({}): the chief needs a port of its own",
            chief.bind
        );
        if let Some((j, _)) = seen.iter().find(|(_, other)| other.iter().any(|a| addresses.contains(a))) {
            let shared = addresses.iter().find(|a| seen[*j].1.contains(a)).expect("found above");
            bail!(
                "worker task {j} at {} and worker task {i} at {worker} are the same worker (both reach {shared}): \
                 list each worker once",
                spec.workers[*j]
            );
        }
        seen.push((i, addresses));
    }
    Ok(())
}

/// `chief_` and 8 hex digits of this machine's name and `run`'s absolute path (or, without a
/// run, of this process).
fn chief_job(run: Option<&Path>) -> Result<String> {
    let mut hash = Sha256::new();
    hash.update(server::host_name()?.as_bytes());
    match run {
        Some(dir) => {
            let dir =
                dir.canonicalize().or_else(|_| std::path::absolute(dir)).with_context(|| dir.display().to_string())?;
            hash.update(dir.as_os_str().as_encoded_bytes());
        }
        None => {
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
            hash.update(format!("process {} at {}", std::process::id(), now.as_nanos()).as_bytes());
        }
    }
    Ok(format!("chief_{}", hex::encode(&hash.finalize()[..4])))
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
