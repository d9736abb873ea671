//! Files that no crash leaves half-written, and the wall clock: the bottom layer every other module
//! may use (it imports nothing of the crate).
//!
//! Map:
//! - [`write_atomic`]: write to a hidden temporary name in the same folder, flush the file, rename, then
//!   flush the folder. A rename within one folder is atomic, so a reader sees the old file or the new
//!   one, never a part; the folder flush makes the rename itself survive a power cut.
//! - [`remove_stale_temporaries`]: delete what a crash left under temporary names.
//! - [`sync_dir`]: flush a folder's entries (after a create, rename or delete).
//! - [`now_unix`]: seconds since the Unix epoch.
//! - [`injected_failure`]: the fault tests' full disk (debug builds only, `MICROFED_FAIL_WRITES`).
//! - [`crash_point`]: the fault tests' SIGKILL at a named point (debug builds only,
//!   `MICROFED_CRASH_AT`).

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

/// A file-system operation that failed, with the path it failed on.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {source}")]
pub struct FsError {
    pub path: PathBuf,
    #[source]
    pub source: std::io::Error,
}

/// `map_err` helper: the error of an operation on `path`.
pub fn at(path: &Path) -> impl FnOnce(std::io::Error) -> FsError + '_ {
    move |source| FsError {
        path: path.to_owned(),
        source,
    }
}

/// Prefix and suffix of temporary files: hidden (a dot name) so that nothing globbing `*.png` sees
/// them, and recognisable so they can be swept after a crash.
const TMP_PREFIX: &str = ".microfed-";
const TMP_SUFFIX: &str = ".tmp";

/// The temporary name `write_atomic` uses for `path` (same folder, this process's id).
pub fn temporary_for(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(
        "{TMP_PREFIX}{name}.{}{TMP_SUFFIX}",
        std::process::id()
    ))
}

/// Whether a file name is one of our temporaries.
pub fn is_temporary(name: &str) -> bool {
    name.starts_with(TMP_PREFIX) && name.ends_with(TMP_SUFFIX)
}

/// Writes `bytes` to `path` through a temporary file in the same folder and a rename, and flushes the
/// folder so the rename is durable.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), FsError> {
    let tmp = temporary_for(path);
    if let Some(e) = injected_failure(path) {
        return Err(at(&tmp)(e));
    }
    let result = (|| {
        let mut f = File::create(&tmp).map_err(at(&tmp))?;
        f.write_all(bytes).map_err(at(&tmp))?;
        f.sync_data().map_err(at(&tmp))?;
        std::fs::rename(&tmp, path).map_err(at(path))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
        return result;
    }
    sync_dir(parent_of(path))
}

fn parent_of(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Flushes a folder's entries to disk (Unix: `fsync` on the folder). Elsewhere a no-op.
pub fn sync_dir(dir: &Path) -> Result<(), FsError> {
    #[cfg(unix)]
    {
        File::open(dir).and_then(|d| d.sync_all()).map_err(at(dir))
    }
    #[cfg(not(unix))]
    {
        let _ = dir;
        Ok(())
    }
}

/// Deletes temporary files a crash left in `dir`; returns how many.
pub fn remove_stale_temporaries(dir: &Path) -> Result<usize, FsError> {
    let mut removed = 0;
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(at(dir)(e)),
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if is_temporary(&name) {
            std::fs::remove_file(entry.path()).map_err(at(&entry.path()))?;
            removed += 1;
        }
    }
    Ok(removed)
}

/// Environment variable of the fault tests' write failures (debug builds only).
pub const FAIL_WRITES_ENV: &str = "MICROFED_FAIL_WRITES";

/// A full disk, injected for the fault tests: in a debug build, when `MICROFED_FAIL_WRITES` names
/// a file that exists, every write whose path contains one of that file's lines (non-empty) fails
/// with "No space left on device" (ENOSPC). The test creates the file to fill the disk and deletes
/// it to free it, while the process runs. Release builds never look.
pub fn injected_failure(path: &Path) -> Option<std::io::Error> {
    if !cfg!(debug_assertions) {
        return None;
    }
    let trigger = std::env::var_os(FAIL_WRITES_ENV)?;
    let fragments = std::fs::read_to_string(trigger).ok()?;
    let path = path.to_string_lossy();
    fragments
        .lines()
        .map(str::trim)
        .any(|f| !f.is_empty() && path.contains(f))
        .then(|| std::io::Error::from_raw_os_error(28))
}

/// Environment variable naming the [`crash_point`] at which a debug build stops dead.
pub const CRASH_AT_ENV: &str = "MICROFED_CRASH_AT";

/// A crash injected for the fault tests: in a debug build whose `MICROFED_CRASH_AT` is `point`, the
/// process aborts here (no unwinding, no destructors, no flush: as a SIGKILL or a power cut would
/// leave it). Release builds never look.
pub fn crash_point(point: &str) {
    if cfg!(debug_assertions) && std::env::var(CRASH_AT_ENV).is_ok_and(|v| v == point) {
        eprintln!("{CRASH_AT_ENV}={point}: stopping dead here");
        std::process::abort();
    }
}

/// Seconds since the Unix epoch, now.
pub fn now_unix() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_atomic_replaces_whole_file_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("state.json");
        write_atomic(&p, b"first").unwrap();
        write_atomic(&p, b"second").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"second");
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");
    }

    #[test]
    fn stale_temporaries_are_swept_and_others_kept() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.png");
        std::fs::write(temporary_for(&p), b"half").unwrap();
        std::fs::write(&p, b"whole").unwrap();
        assert_eq!(remove_stale_temporaries(dir.path()).unwrap(), 1);
        assert!(p.exists());
        assert_eq!(
            remove_stale_temporaries(&dir.path().join("none")).unwrap(),
            0
        );
    }

    #[test]
    fn write_into_missing_folder_names_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("missing").join("x");
        let e = write_atomic(&p, b"x").unwrap_err();
        assert!(e.to_string().contains("missing"), "{e}");
    }
}
