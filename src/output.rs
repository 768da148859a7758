//! Standard output, written as a Unix tool writes it: a reader that goes away (`| head`) ends
//! the command quietly, any other failure to write (a full disk, a closed descriptor) is an
//! error naming stdout, and nothing is lost silently.

use std::fmt::Display;
use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, Ordering};

/// Standard output's reader went away (`EPIPE`): `minigpt` ends quietly with code 141, as a tool
/// that SIGPIPE stopped.
#[derive(Debug, thiserror::Error)]
#[error("stdout was closed by its reader")]
pub struct StdoutClosed;

/// The exit code of a command whose stdout was closed (128 + SIGPIPE).
pub const CLOSED_EXIT_CODE: u8 = 141;

/// Writes `text` and a newline to stdout, flushed.
pub fn line(text: impl Display) -> anyhow::Result<()> {
    write(format_args!("{text}\n"))
}

/// Writes `text` to stdout, flushed.
pub fn write(text: impl Display) -> anyhow::Result<()> {
    let mut out = io::stdout().lock();
    write!(out, "{text}").and_then(|()| out.flush()).map_err(error)
}

/// Writes `text` to stdout, which flushes at each newline (and [`line`] and [`write`] flush).
pub fn put(text: impl Display) -> anyhow::Result<()> {
    write!(io::stdout().lock(), "{text}").map_err(error)
}

/// The error of a failed write to stdout: [`StdoutClosed`] for a closed pipe.
pub fn error(e: io::Error) -> anyhow::Error {
    match e.kind() {
        io::ErrorKind::BrokenPipe => StdoutClosed.into(),
        _ => anyhow::anyhow!("writing to stdout: {e}"),
    }
}

/// Whether `e` is, or was caused by, stdout's reader going away.
pub fn is_closed(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.is::<StdoutClosed>())
}

/// Whether stdout was closed when the process started, recorded before Rust's runtime starts
/// (which opens `/dev/null` on a closed standard descriptor, so that output would vanish).
static STDOUT_CLOSED_AT_START: AtomicBool = AtomicBool::new(false);

/// Runs before `main` and before Rust's runtime sets up the standard descriptors.
#[used]
#[link_section = ".init_array"]
static RECORD_STDOUT: extern "C" fn() = record_stdout;

extern "C" fn record_stdout() {
    // SAFETY: F_GETFD only asks whether descriptor 1 is open.
    let closed = unsafe { libc::fcntl(1, libc::F_GETFD) } == -1;
    STDOUT_CLOSED_AT_START.store(closed, Ordering::Relaxed);
}

/// An error if stdout was closed when the process started (`>&-`): what minigpt prints would be
/// lost.
pub fn check_stdout_open() -> anyhow::Result<()> {
    anyhow::ensure!(
        !STDOUT_CLOSED_AT_START.load(Ordering::Relaxed),
        "stdout is closed: give minigpt somewhere to write (`> FILE`, `> /dev/null`)"
    );
    Ok(())
}
