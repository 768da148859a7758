//! File helpers: the one checked way minigpt reads an input file, atomic writes (a temporary
//! name, then a rename), permissions of finished files, and paths as the UTF-8 strings
//! TensorFlow's ops take.

use std::fs;
use std::io::Read;
use std::path::Path;

use anyhow::{bail, ensure, Context, Result};

/// The most minigpt reads of a small file it is given (a config, a vocabulary, a checkpoint's state).
pub const MAX_SMALL_FILE: u64 = 64 << 20;

/// The bytes of `path`, `what` it is: a regular file (not a directory, FIFO or device, which could
/// block or never end) of at most `max` bytes, read with that bound.
pub fn read_input(path: &Path, what: &str, max: u64) -> Result<Vec<u8>> {
    let meta = fs::metadata(path).with_context(|| format!("reading {what} {}", path.display()))?;
    if !meta.is_file() {
        use std::os::unix::fs::FileTypeExt;
        let t = meta.file_type();
        let kind = if t.is_dir() {
            "a directory"
        } else if t.is_fifo() {
            "a FIFO"
        } else if t.is_char_device() || t.is_block_device() {
            "a device"
        } else if t.is_socket() {
            "a socket"
        } else {
            "not a regular file"
        };
        bail!("{what} {} is {kind}: give a regular file", path.display());
    }
    ensure!(
        meta.len() <= max,
        "{what} {} is {} bytes, more than minigpt reads ({max} bytes)",
        path.display(),
        meta.len()
    );
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    let file = fs::File::open(path).with_context(|| format!("reading {what} {}", path.display()))?;
    file.take(max + 1).read_to_end(&mut bytes).with_context(|| format!("reading {what} {}", path.display()))?;
    ensure!(bytes.len() as u64 <= max, "{what} {} grew past {max} bytes while read", path.display());
    Ok(bytes)
}

/// [`read_input`] of a text file: UTF-8, or an error naming the first bad byte.
pub fn read_text(path: &Path, what: &str, max: u64) -> Result<String> {
    String::from_utf8(read_input(path, what, max)?).map_err(|e| {
        anyhow::anyhow!(
            "{what} {} is not valid UTF-8 (first bad byte at offset {})",
            path.display(),
            e.utf8_error().valid_up_to()
        )
    })
}

/// Writes `bytes` to `path` through a temporary file in the same folder and a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir).with_context(|| format!("writing {}", path.display()))?;
    std::io::Write::write_all(&mut tmp, bytes).with_context(|| format!("writing {}", path.display()))?;
    tmp.as_file().sync_all().ok();
    set_readable(tmp.as_file())?;
    tmp.persist(path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// Temporary files are created private (0600); a finished file gets the usual 0644.
pub fn set_readable(file: &fs::File) -> Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        file.set_permissions(fs::Permissions::from_mode(0o644))?;
    }
    let _ = file;
    Ok(())
}

/// A path as the UTF-8 string TensorFlow's file ops take.
pub fn path_str(path: &Path) -> Result<&str> {
    path.to_str().with_context(|| format!("path {} is not valid UTF-8", path.display()))
}
