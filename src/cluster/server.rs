//! A TensorFlow gRPC server that listens only where it is told: `minigpt server`'s, and the
//! chief's own in-process one.
//!
//! The address is resolved once and checked to be this machine's (a wildcard only when written
//! as one); the server's wildcard bind goes to it (`crate::listen`), and once the server runs,
//! the sockets the server opened are read back from the kernel: anything else than
//! the address asked for ends the process with an error. A server that listens on an address
//! other than loopback says once, on stderr, what that exposes.

use std::ffi::CStr;
use std::net::{IpAddr, SocketAddr};

use anyhow::{ensure, Context, Result};
use prost::Message;
use tensorflow_sys_runtime as tf;

use super::{cluster_def, parse_address};
use crate::listen::{self, Reservation};
use crate::proto;
use crate::tfx::OwnedStatus;

/// Where a server listens (`bind`) and the `HOST:PORT` the cluster reaches it by (`name`: its
/// task's address in every `ClusterDef`, and its session target).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listen {
    pub bind: SocketAddr,
    pub name: String,
}

impl Listen {
    /// `--listen HOST:PORT`: the host resolved once (an IP address as written, a name to the first
    /// address it resolves to), reached by that address. `0.0.0.0` and `[::]` (every interface)
    /// only when written so; the cluster then reaches the server by this machine's host name.
    pub fn parse(text: &str) -> Result<Self> {
        let text = parse_address(text)?;
        let (bind, wildcard) = resolve_to_listen(&text)?;
        let name = if wildcard { format!("{}:{}", host_name()?, bind.port()) } else { bind.to_string() };
        Ok(Self { bind, name })
    }

    /// A task's address of a cluster list (TF_CONFIG), where this process serves: it must resolve
    /// to an address of this machine, which is bound; the cluster keeps reaching it by `address`.
    pub fn of_task(address: &str) -> Result<Self> {
        let address = parse_address(address)?;
        let (bind, _) = resolve_to_listen(&address)?;
        Ok(Self { bind, name: address })
    }

    /// A free port of 127.0.0.1 (bound, then released for the server to take).
    pub fn free_local() -> Result<Self> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port on 127.0.0.1")?;
        let bind = listener.local_addr()?;
        Ok(Self { bind, name: bind.to_string() })
    }

    /// Whether only this machine can connect.
    pub fn is_loopback(&self) -> bool {
        listen::is_loopback(self.bind.ip())
    }

    /// The `warning:` line of a server reachable from other machines, if it is.
    pub fn exposure(&self) -> Option<String> {
        if self.is_loopback() {
            return None;
        }
        let what = if self.bind.ip().is_unspecified() {
            format!("every interface of this machine at port {} ({})", self.bind.port(), self.bind)
        } else {
            self.bind.to_string()
        };
        Some(format!(
            "warning: TensorFlow's server listens on {what}, beyond this machine: anyone who reaches it can run \
             TensorFlow operations as this user, including reading and writing files (TensorFlow's runtime has no \
             authentication and no encryption); use it only on a network you trust"
        ))
    }
}

/// The address `HOST:PORT` (checked) is to listen on, and whether it is written as every
/// interface. A wildcard only when written so; a host name other than `localhost` that resolves to
/// a loopback address (Debian's `/etc/hosts` maps the machine's own name to 127.0.1.1) is refused:
/// no other machine could reach it there.
fn resolve_to_listen(text: &str) -> Result<(SocketAddr, bool)> {
    let (bind, written_wildcard) = listen::resolve_bind(text)?;
    let host = &text[..text.rfind(':').unwrap_or(0)];
    let literal = host.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>().is_ok();
    ensure!(
        literal || host == "localhost" || !listen::is_loopback(bind.ip()),
        "{text}: {host} resolves to {}, a loopback address, where no other machine reaches it: give this \
         machine's address on the cluster's network (or 127.0.0.1 for this machine only)",
        bind.ip()
    );
    Ok((bind, written_wildcard))
}

/// This machine's host name.
pub(super) fn host_name() -> Result<String> {
    let mut buffer = [0u8; 256];
    // SAFETY: gethostname writes at most `len` bytes into the buffer.
    let status = unsafe { libc::gethostname(buffer.as_mut_ptr().cast(), buffer.len()) };
    ensure!(status == 0, "cannot read this machine's host name: {}", std::io::Error::last_os_error());
    let end = buffer.iter().position(|&b| b == 0).unwrap_or(buffer.len());
    Ok(String::from_utf8_lossy(&buffer[..end]).into_owned())
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
    /// Starts a server as job `local`, task 0, listening on `listen.bind` only, and prints the
    /// exposure warning if it is not loopback. An error once the server has started (it listens
    /// somewhere else too) must end the process: the server cannot be stopped.
    pub fn start(listen: &Listen) -> Result<Self> {
        let given = &listen.name;
        ensure!(
            listen::interposed(),
            "cannot listen on {given} only: this program does not export minigpt's bind (link it with \
             -Wl,--export-dynamic-symbol=bind), so TensorFlow's server would listen on every interface"
        );
        // TensorFlow binds the port of the name (ServerDef.port would also make its target
        // `localhost:PORT`, which no ClusterDef names).
        ensure!(
            given.ends_with(&format!(":{}", listen.bind.port())),
            "{given} and the address to listen on, {}, have different ports",
            listen.bind
        );
        listen::check_bindable(listen.bind, given)?;
        let pid = std::process::id();
        let before = listen::listening(pid).context("reading this process's listening sockets")?;
        let reservation = Reservation::new(listen.bind);
        let def = proto::ServerDef {
            cluster: Some(cluster_def(&[("local", std::slice::from_ref(&listen.name))])),
            job_name: "local".into(),
            task_index: 0,
            protocol: "grpc".into(),
            ..Default::default()
        };
        let bytes = def.encode_to_vec();
        let status = OwnedStatus::new();
        // SAFETY: the bytes outlive the call; the status is checked before the server is used.
        let raw = unsafe { tf::TF_NewServer(bytes.as_ptr().cast(), bytes.len(), status.raw()) };
        super::check(&status).with_context(|| format!("starting a TensorFlow server on {given}"))?;
        let mut opened = listen::listening(pid).context("reading this process's listening sockets")?;
        opened.retain(|a| !before.contains(a));
        ensure!(
            reservation.taken() && opened == [listen.bind],
            "TensorFlow's server was to listen on {} only but listens on {}: stopping",
            listen.bind,
            opened.iter().map(SocketAddr::to_string).collect::<Vec<_>>().join(", ")
        );
        if let Some(warning) = listen.exposure() {
            eprintln!("{warning}");
        }
        // SAFETY: `raw` is a server TF_NewServer returned with an OK status.
        unsafe { tf::TF_ServerStart(raw, status.raw()) };
        super::check(&status).with_context(|| format!("starting the TensorFlow server on {given}"))?;
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
        super::check(&status).context("the TensorFlow server stopped")
    }
}

/// `minigpt server`: starts a server on `listen`, prints its target and address, and serves
/// until SIGTERM or SIGINT, then exits 0 (a started server cannot be stopped, only left).
pub fn serve(listen: &Listen) -> Result<()> {
    let server = Server::start(listen)?;
    crate::output::line(format_args!(
        "minigpt server: TensorFlow gRPC server at {} (job local, task 0), listening on {}; stop with Ctrl-C",
        server.target(),
        listen.bind
    ))?;
    let mut signals = signal_hook::iterator::Signals::new([signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM])
        .context("installing the signal handler")?;
    std::thread::spawn(move || {
        if signals.forever().next().is_some() {
            std::process::exit(0);
        }
    });
    server.join()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards_only_as_written_and_what_is_exposed() {
        let any = Listen::parse("0.0.0.0:2222").unwrap();
        assert_eq!(any.bind, "0.0.0.0:2222".parse().unwrap());
        assert_eq!(any.name, format!("{}:2222", host_name().unwrap()));
        let warning = any.exposure().unwrap();
        assert!(
            warning.starts_with("warning: TensorFlow's server listens on every interface of this machine at port 2222")
        );
        assert!(warning.contains("including reading and writing files") && warning.contains("a network you trust"));
        assert_eq!(Listen::parse("[::]:2222").unwrap().bind, "[::]:2222".parse().unwrap());
        let local = Listen::parse("127.0.0.1:2222").unwrap();
        assert_eq!((local.exposure(), local.name.as_str()), (None, "127.0.0.1:2222"));
        assert_eq!(Listen::parse("[::1]:2222").unwrap().exposure(), None);
        let lan = Listen { bind: "10.0.0.11:2222".parse().unwrap(), name: "10.0.0.11:2222".into() };
        assert!(lan.exposure().unwrap().contains("listens on 10.0.0.11:2222, beyond this machine"));
        assert!(Listen::parse("localhost:2222").unwrap().is_loopback());
    }
}
