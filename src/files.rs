//! File helpers shared by every writer: atomic writes (a temporary name, then a rename),
//! permissions of finished files, and paths as the UTF-8 strings TensorFlow's ops take.

use std::fs;
use std::path::Path;

use anyhow::{Context, Result};

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
