//! A small state file the participant keeps in step with memory (the error-feedback residual, the
//! last trained round, this lab's style code) whose save may fail, on a full disk for instance.
//!
//! A failed save does not lose the state or stop the agent: the newest bytes wait in memory and are
//! written again at every [`Persisted::retry`] (before each outbox flush). The failure is logged at
//! error level and returned for the status board once when it begins, not at every retry, and
//! logged again when the file is current once more. Until then a restart starts from the file's
//! older contents, which each caller documents as safe.

use std::path::{Path, PathBuf};

use crate::fsio::write_atomic;

/// One state file and the bytes not on disk yet.
pub struct Persisted {
    /// What the file holds, in the operator's words ("error-feedback residual").
    what: &'static str,
    path: PathBuf,
    /// Bytes newer than the file; None: the file is current.
    pending: Option<Vec<u8>>,
    /// The last save failed (logged once, not at every retry).
    failing: bool,
}

impl Persisted {
    /// The file at `path`, taken as current.
    pub fn new(what: &'static str, path: PathBuf) -> Self {
        Self {
            what,
            path,
            pending: None,
            failing: false,
        }
    }

    /// Where the file is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether memory holds bytes the file does not (a save failed and waits for a retry).
    pub fn is_behind(&self) -> bool {
        self.pending.is_some()
    }

    /// Saves `bytes` now, replacing any older bytes still waiting. Returns the message for the
    /// status board when this save starts a run of failures.
    pub fn save(&mut self, bytes: Vec<u8>) -> Option<String> {
        self.pending = Some(bytes);
        self.retry()
    }

    /// Writes the waiting bytes, if any. Returns the message for the status board when this attempt
    /// starts a run of failures.
    pub fn retry(&mut self) -> Option<String> {
        let bytes = self.pending.as_ref()?;
        match write_atomic(&self.path, bytes) {
            Ok(()) => {
                self.pending = None;
                if std::mem::take(&mut self.failing) {
                    tracing::info!(path = %self.path.display(), "{} saved again", self.what);
                }
                None
            }
            Err(e) if !self.failing => {
                self.failing = true;
                tracing::error!(
                    path = %self.path.display(),
                    error = %e,
                    "cannot save the {}; keeping it in memory and retrying",
                    self.what
                );
                Some(format!("cannot save the {}: {e}", self.what))
            }
            Err(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_save_keeps_the_newest_bytes_and_reports_once_until_it_succeeds() {
        let dir = tempfile::tempdir().unwrap();
        // A folder where the file should be: every write fails, as on a full disk.
        let path = dir.path().join("state.json");
        std::fs::create_dir(&path).unwrap();
        let mut p = Persisted::new("participant state", path.clone());
        assert!(p.retry().is_none(), "nothing waits: nothing to write");
        let first = p
            .save(b"one".to_vec())
            .expect("the first failure is reported");
        assert!(
            first.starts_with("cannot save the participant state:"),
            "{first}"
        );
        assert!(p.is_behind());
        assert!(
            p.save(b"two".to_vec()).is_none(),
            "reported once, not at every save"
        );
        assert!(p.retry().is_none());
        std::fs::remove_dir(&path).unwrap();
        assert!(p.retry().is_none());
        assert!(!p.is_behind());
        assert_eq!(
            std::fs::read(&path).unwrap(),
            b"two",
            "the newest bytes are written"
        );
        // A new failure after a success is reported again.
        std::fs::remove_file(&path).unwrap();
        std::fs::create_dir(&path).unwrap();
        assert!(p.save(b"three".to_vec()).is_some());
    }
}
