//! The memory this process may still use, and the one check every size goes through before
//! anything is built: refused with the numbers instead of trained until the kernel kills it.

use anyhow::{ensure, Result};

/// The memory this process may still use: what the kernel says is available, or less if a
/// cgroup limits it (`None` where neither can be read).
pub fn available() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse::<u64>()
        .ok()?;
    let mut available = kib * 1024;
    let cgroup = |f: &str| std::fs::read_to_string(format!("/sys/fs/cgroup/{f}")).ok()?.trim().parse::<u64>().ok();
    if let (Some(max), Some(current)) = (cgroup("memory.max"), cgroup("memory.current")) {
        available = available.min(max.saturating_sub(current));
    }
    Some(available)
}

/// Bytes as GiB, for messages.
pub fn gib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 30) as f64
}

/// Refuses `needed` bytes when more than is available: `{what} needs about X GiB ({parts}), more
/// than the Y GiB available: {advice}`.
pub fn ensure_fits(needed: u64, what: &str, parts: &str, advice: &str) -> Result<()> {
    let Some(available) = available() else { return Ok(()) };
    ensure!(
        needed <= available,
        "{what} needs about {:.1} GiB ({parts}), more than the {:.1} GiB available: {advice}",
        gib(needed),
        gib(available)
    );
    Ok(())
}
