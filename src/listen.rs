//! Where TensorFlow's gRPC servers listen: the address a server is given, checked and resolved,
//! and the `bind(2)` that makes TensorFlow's server listen there and nowhere else.
//!
//! TensorFlow's C API has no bind address: its gRPC server asks gRPC for `0.0.0.0:PORT`
//! whatever its `ServerDef` names, and gRPC turns that wildcard into one dual-stack socket on
//! `[::]:PORT` (every interface, IPv4 and IPv6). gRPC, linked into TensorFlow's library, calls
//! libc's `bind`, which the dynamic loader resolves when it is first called, searching the
//! executable before any library. minigpt's executable therefore defines and exports a `bind` of
//! its own (below; build.rs exports it with `--export-dynamic-symbol=bind`). It passes every call
//! to the kernel unchanged except a wildcard bind at a port [`Reservation`] holds, which it binds
//! to the reserved address instead, in that address's family (an IPv6 socket becomes an IPv4 one,
//! with the same flags and the options gRPC sets, when the address is IPv4). [`Reservation::taken`] says
//! whether it happened: a server whose bind did not come through here is reported, not trusted.

use std::ffi::c_int;
use std::io;
use std::mem::{size_of, MaybeUninit};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, ToSocketAddrs};
use std::sync::Mutex;

use anyhow::{bail, Context, Result};

/// Ports whose wildcard binds go to an address instead, and whether one did.
static RESERVED: Mutex<Vec<(SocketAddr, bool)>> = Mutex::new(Vec::new());

/// A port whose wildcard binds in this process go to one address, until dropped.
#[derive(Debug)]
pub struct Reservation {
    address: SocketAddr,
}

impl Reservation {
    /// Makes wildcard binds at `address`'s port bind `address` (a wildcard address itself is
    /// bound as given: `0.0.0.0` IPv4 only, `[::]` both families as gRPC makes it).
    pub fn new(address: SocketAddr) -> Self {
        let mut reserved = RESERVED.lock().unwrap_or_else(|e| e.into_inner());
        reserved.retain(|(a, _)| a.port() != address.port());
        reserved.push((address, false));
        Self { address }
    }

    /// Whether a wildcard bind at the port went to the reserved address.
    pub fn taken(&self) -> bool {
        let reserved = RESERVED.lock().unwrap_or_else(|e| e.into_inner());
        reserved.iter().any(|&(a, taken)| a == self.address && taken)
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        RESERVED.lock().unwrap_or_else(|e| e.into_inner()).retain(|(a, _)| *a != self.address);
    }
}

/// Whether this executable's `bind` is the one the process resolves (it is not in a program
/// that links minigpt's library without exporting it).
pub fn interposed() -> bool {
    // SAFETY: dlsym only looks the name up in the global scope.
    let resolved = unsafe { libc::dlsym(libc::RTLD_DEFAULT, c"bind".as_ptr()) };
    std::ptr::eq(resolved.cast_const(), bind as *const libc::c_void)
}

/// `HOST:PORT` (`[V6]:PORT` for an IPv6 address) resolved once: an IP address as written, a host
/// name to the first address the resolver gives.
pub fn resolve(address: &str) -> Result<SocketAddr> {
    let (host, port) = split(address)?;
    let ip = match host.parse::<IpAddr>() {
        Ok(ip) => ip,
        Err(_) => (host, port)
            .to_socket_addrs()
            .ok()
            .and_then(|mut all| all.next())
            .with_context(|| format!("{address}: cannot resolve the host name {host:?}"))?
            .ip(),
    };
    Ok(SocketAddr::new(ip, port))
}

/// `HOST:PORT` to listen on, resolved once ([`resolve`]), and whether it is every interface:
/// a host that resolves to a wildcard is refused unless written `0.0.0.0` or `[::]`.
pub fn resolve_bind(address: &str) -> Result<(SocketAddr, bool)> {
    let bind = resolve(address)?;
    let host = &address[..address.rfind(':').unwrap_or(0)];
    let written_wildcard = matches!(host, "0.0.0.0" | "[::]" | "::");
    anyhow::ensure!(
        !bind.ip().is_unspecified() || written_wildcard,
        "{address}: the host resolves to {}, every interface: write 0.0.0.0 or [::] if that is meant",
        bind.ip()
    );
    Ok((bind, written_wildcard))
}

/// Every address `HOST:PORT` resolves to (an IP address: itself), IPv4 addresses mapped into IPv6
/// as the IPv4 addresses they are.
pub fn resolve_all(address: &str) -> Result<Vec<SocketAddr>> {
    let (host, port) = split(address)?;
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(vec![SocketAddr::new(ip.to_canonical(), port)]);
    }
    let all: Vec<SocketAddr> = (host, port)
        .to_socket_addrs()
        .map(|a| a.map(|a| SocketAddr::new(a.ip().to_canonical(), port)).collect())
        .unwrap_or_default();
    if all.is_empty() {
        bail!("{address}: cannot resolve the host name {host:?}");
    }
    Ok(all)
}

/// The host (brackets of an IPv6 address removed) and port of `HOST:PORT`.
fn split(address: &str) -> Result<(&str, u16)> {
    let (host, port) =
        address.rsplit_once(':').with_context(|| format!("{address:?} is not HOST:PORT (the port is missing)"))?;
    let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    let port = port.parse().with_context(|| format!("{address:?} is not HOST:PORT (bad port)"))?;
    Ok((host, port))
}

/// Checks that a server can listen on `address`: an address of this machine (or a wildcard)
/// whose port is free.
pub fn check_bindable(address: SocketAddr, given: &str) -> Result<()> {
    bind_tcp(address, given).map(drop)
}

/// A listener on `address` (`given`: how the user wrote it), or the error that says why not.
pub fn bind_tcp(address: SocketAddr, given: &str) -> Result<TcpListener> {
    match TcpListener::bind(address) {
        Ok(listener) => Ok(listener),
        Err(e) if e.raw_os_error() == Some(libc::EADDRNOTAVAIL) => {
            bail!("cannot listen on {given}: {} is not an address of this machine", address.ip())
        }
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
            bail!("cannot listen on {given}: port {} is not free ({e})", address.port())
        }
        Err(e) => bail!("cannot listen on {given}: {e}"),
    }
}

/// The address a wildcard bind at `port` is to take instead, if the port is reserved; marks it
/// taken.
fn reserved_for(port: u16) -> Option<SocketAddr> {
    let mut reserved = RESERVED.lock().unwrap_or_else(|e| e.into_inner());
    let entry = reserved.iter_mut().find(|(a, _)| a.port() == port)?;
    Some(entry.0)
}

fn mark_taken(address: SocketAddr) {
    let mut reserved = RESERVED.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(entry) = reserved.iter_mut().find(|(a, _)| *a == address) {
        entry.1 = true;
    }
}

/// The wildcard address and port a `sockaddr` names, if it is a wildcard one.
///
/// # Safety
/// `addr` points to `len` readable bytes.
unsafe fn wildcard_port(addr: *const libc::sockaddr, len: libc::socklen_t) -> Option<u16> {
    if addr.is_null() || (len as usize) < size_of::<libc::sa_family_t>() {
        return None;
    }
    match std::ptr::read_unaligned(addr).sa_family as c_int {
        libc::AF_INET if len as usize >= size_of::<libc::sockaddr_in>() => {
            let a = std::ptr::read_unaligned(addr as *const libc::sockaddr_in);
            (a.sin_addr.s_addr == 0).then(|| u16::from_be(a.sin_port))
        }
        libc::AF_INET6 if len as usize >= size_of::<libc::sockaddr_in6>() => {
            let a = std::ptr::read_unaligned(addr as *const libc::sockaddr_in6);
            (a.sin6_addr.s6_addr == [0; 16]).then(|| u16::from_be(a.sin6_port))
        }
        _ => None,
    }
}

/// The `bind` TensorFlow's gRPC server calls (see the module's documentation): every call goes
/// to the kernel unchanged, but a wildcard bind at a reserved port, which binds the reserved
/// address instead.
///
/// # Safety
/// The contract of `bind(2)`.
#[no_mangle]
pub unsafe extern "C" fn bind(fd: c_int, addr: *const libc::sockaddr, len: libc::socklen_t) -> c_int {
    if let Some(target) = wildcard_port(addr, len).filter(|&p| p != 0).and_then(reserved_for) {
        return match bind_to(fd, target) {
            Ok(()) => {
                mark_taken(target);
                0
            }
            Err(e) => {
                *libc::__errno_location() = e.raw_os_error().unwrap_or(libc::EINVAL);
                -1
            }
        };
    }
    kernel_bind(fd, addr, len)
}

/// bind(2) itself.
unsafe fn kernel_bind(fd: c_int, addr: *const libc::sockaddr, len: libc::socklen_t) -> c_int {
    libc::syscall(libc::SYS_bind, fd, addr, len) as c_int
}

/// Binds socket `fd` to `target`, first replacing it by a socket of `target`'s family if its own
/// differs.
unsafe fn bind_to(fd: c_int, target: SocketAddr) -> io::Result<()> {
    let family = match target {
        SocketAddr::V4(_) => libc::AF_INET,
        SocketAddr::V6(_) => libc::AF_INET6,
    };
    if socket_family(fd)? != family {
        replace_socket(fd, family)?;
    }
    let (storage, len) = sockaddr(target);
    if kernel_bind(fd, (&storage as *const libc::sockaddr_storage).cast(), len) < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The address family of socket `fd`.
unsafe fn socket_family(fd: c_int) -> io::Result<c_int> {
    let mut storage = MaybeUninit::<libc::sockaddr_storage>::zeroed();
    let mut len = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    if libc::getsockname(fd, storage.as_mut_ptr().cast(), &mut len) < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(storage.assume_init().ss_family as c_int)
}

/// The integer socket options a listening socket carries over to the one that replaces it (and
/// its accepted connections inherit). Not the buffer sizes: read back and set again, they would
/// be doubled and locked, turning off the kernel's buffer autotuning for every connection.
const CARRIED_OPTIONS: [(c_int, c_int); 5] = [
    (libc::SOL_SOCKET, libc::SO_REUSEADDR),
    (libc::SOL_SOCKET, libc::SO_REUSEPORT),
    (libc::SOL_SOCKET, libc::SO_KEEPALIVE),
    (libc::IPPROTO_TCP, libc::TCP_NODELAY),
    (libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT),
];

/// Puts a new, unbound socket of `family` (same type and protocol, flags and the options above)
/// in place of `fd`, under the same descriptor number.
unsafe fn replace_socket(fd: c_int, family: c_int) -> io::Result<()> {
    let get = |level: c_int, name: c_int| -> io::Result<c_int> {
        let mut value: c_int = 0;
        let mut len = size_of::<c_int>() as libc::socklen_t;
        if libc::getsockopt(fd, level, name, (&mut value as *mut c_int).cast(), &mut len) < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(value)
    };
    let kind = get(libc::SOL_SOCKET, libc::SO_TYPE)?;
    let protocol = get(libc::SOL_SOCKET, libc::SO_PROTOCOL)?;
    let fresh = libc::socket(family, kind | libc::SOCK_CLOEXEC, protocol);
    if fresh < 0 {
        return Err(io::Error::last_os_error());
    }
    let result = (|| {
        for (level, name) in CARRIED_OPTIONS {
            let Ok(value) = get(level, name) else { continue };
            let size = size_of::<c_int>() as libc::socklen_t;
            if libc::setsockopt(fresh, level, name, (&value as *const c_int).cast(), size) < 0 {
                return Err(io::Error::last_os_error());
            }
        }
        let status = libc::fcntl(fd, libc::F_GETFL);
        let descriptor = libc::fcntl(fd, libc::F_GETFD);
        if status < 0 || descriptor < 0 || libc::fcntl(fresh, libc::F_SETFL, status) < 0 {
            return Err(io::Error::last_os_error());
        }
        let cloexec = if descriptor & libc::FD_CLOEXEC != 0 { libc::O_CLOEXEC } else { 0 };
        if libc::dup3(fresh, fd, cloexec) < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    })();
    libc::close(fresh);
    result
}

/// `address` as a `sockaddr_storage` and its length.
fn sockaddr(address: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: all-zero is a valid sockaddr_storage; the writes below stay within it.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match address {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr { s_addr: u32::from(*a.ip()).to_be() },
                sin_zero: [0; 8],
            };
            // SAFETY: a sockaddr_in fits in a sockaddr_storage.
            unsafe { std::ptr::write((&mut storage as *mut libc::sockaddr_storage).cast(), sin) };
            size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr { s6_addr: a.ip().octets() },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: a sockaddr_in6 fits in a sockaddr_storage.
            unsafe { std::ptr::write((&mut storage as *mut libc::sockaddr_storage).cast(), sin6) };
            size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, len as libc::socklen_t)
}

/// Whether `ip` is a loopback address (`127.0.0.0/8`, `::1`, or IPv4 loopback mapped into IPv6).
pub fn is_loopback(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback()),
    }
}

/// The addresses process `pid` listens on by TCP, from the kernel's socket tables
/// (`/proc/PID/net/tcp`, `tcp6`) and the process's descriptors: what `ss -ltnp` shows of it.
pub fn listening(pid: u32) -> io::Result<Vec<SocketAddr>> {
    let mut inodes = std::collections::HashSet::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd"))? {
        let Ok(target) = std::fs::read_link(entry?.path()) else { continue };
        let target = target.to_string_lossy();
        if let Some(inode) = target.strip_prefix("socket:[").and_then(|t| t.strip_suffix(']')) {
            inodes.insert(inode.to_string());
        }
    }
    let mut found = Vec::new();
    for table in ["tcp", "tcp6"] {
        let text = match std::fs::read_to_string(format!("/proc/{pid}/net/{table}")) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // sl, local_address, rem_address, st, tx:rx, tr:when, retrnsmt, uid, timeout, inode
            let (Some(local), Some(&"0A"), Some(inode)) = (fields.get(1), fields.get(3), fields.get(9)) else {
                continue;
            };
            if !inodes.contains(*inode) {
                continue;
            }
            if let Some(address) = parse_proc_address(local) {
                found.push(address);
            }
        }
    }
    // Distinct addresses: two sockets on one address (a listener and its stand-in while a
    // restarted server binds again) are one place it listens.
    found.sort();
    found.dedup();
    Ok(found)
}

/// `0100007F:1F90` (IPv4) or 32 hex digits and a port (IPv6), each 32-bit word in host order.
fn parse_proc_address(text: &str) -> Option<SocketAddr> {
    let (ip, port) = text.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let word = |i: usize| u32::from_str_radix(ip.get(8 * i..8 * i + 8)?, 16).ok().map(|w| w.to_ne_bytes());
    let ip = match ip.len() {
        8 => IpAddr::V4(Ipv4Addr::from(word(0)?)),
        32 => {
            let mut octets = [0u8; 16];
            for i in 0..4 {
                octets[4 * i..4 * i + 4].copy_from_slice(&word(i)?);
            }
            IpAddr::V6(Ipv6Addr::from(octets))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_addresses_are_read_in_host_order() {
        assert_eq!(parse_proc_address("0100007F:1F90"), Some("127.0.0.1:8080".parse().unwrap()));
        assert_eq!(parse_proc_address("00000000000000000000000001000000:0016"), Some("[::1]:22".parse().unwrap()));
        assert_eq!(parse_proc_address("00000000000000000000000000000000:0016"), Some("[::]:22".parse().unwrap()));
    }

    #[test]
    fn a_wildcard_bind_at_a_reserved_port_binds_the_reserved_address() {
        // minigpt's `bind`, called as TensorFlow's gRPC calls it.
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let target: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let reservation = Reservation::new(target);
        // An IPv6 dual-stack socket, as gRPC makes for its wildcard.
        let fd = unsafe { libc::socket(libc::AF_INET6, libc::SOCK_STREAM | libc::SOCK_NONBLOCK, 0) };
        assert!(fd >= 0);
        let wildcard: SocketAddr = format!("[::]:{port}").parse().unwrap();
        let (storage, len) = sockaddr(wildcard);
        assert_eq!(unsafe { bind(fd, (&storage as *const libc::sockaddr_storage).cast(), len) }, 0);
        assert!(reservation.taken());
        assert_eq!(unsafe { libc::listen(fd, 8) }, 0);
        let at_port: Vec<SocketAddr> =
            listening(std::process::id()).unwrap().into_iter().filter(|a| a.port() == port).collect();
        assert_eq!(at_port, [target]);
        assert_eq!(unsafe { libc::fcntl(fd, libc::F_GETFL) } & libc::O_NONBLOCK, libc::O_NONBLOCK);
        // The buffer sizes are the kernel's defaults, not set (which would double and lock them).
        let sndbuf = |fd: c_int| {
            let (mut value, mut len) = (0 as c_int, size_of::<c_int>() as libc::socklen_t);
            let got = unsafe {
                libc::getsockopt(fd, libc::SOL_SOCKET, libc::SO_SNDBUF, (&mut value as *mut c_int).cast(), &mut len)
            };
            assert_eq!(got, 0);
            value
        };
        let fresh = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
        assert_eq!(sndbuf(fd), sndbuf(fresh));
        unsafe { libc::close(fresh) };
        std::net::TcpStream::connect(target).unwrap();
        unsafe { libc::close(fd) };
    }
}
