//! The journal: an append-only file of the micrographs already handled, one JSON object per line,
//! keyed by file name and the SHA-256 of the file's content.
//!
//! Why it makes processing exactly-once across crashes: an entry is appended (and flushed to disk)
//! only after every output of the file has been renamed into place. A crash before that leaves no
//! entry, so the restarted agent processes the file again and its renames replace whatever the first
//! attempt left; a crash after it leaves an entry, so the file is skipped. A crash in the middle of
//! appending leaves a line without its newline: [`Journal::open`] cuts it off (that file is then
//! processed again, which is safe for the same reason). A failed append (a full disk may write
//! part of the line) cuts the file back to its last whole line at once, so the next entry does not
//! land after a fragment and make a corrupt line that would stop the next start; if even that
//! fails, it is retried before the next append.
//!
//! Map: [`Entry`] (one line), [`Outcome`], [`Journal`] (open, `is_done`, `append`), [`JournalError`].

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Errors of the journal file; each names it.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("{path}: journal: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: journal line {line} is not a journal entry: {message}")]
    Parse {
        path: PathBuf,
        line: usize,
        message: String,
    },
}

/// What happened to a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// Mask, overlay and features written.
    Segmented,
    /// Moved to the quarantine folder with the reason beside it.
    Quarantined,
}

/// One line of the journal.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    /// File name in the watched folder (or the path given to `microfed segment`).
    pub file: String,
    /// SHA-256 of the file's bytes, hex.
    pub sha256: String,
    pub outcome: Outcome,
    /// Seconds since the Unix epoch when the entry was written.
    pub at: f64,
    /// The mask written (segmented files) or the quarantine reason.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mask: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The model that segmented it (path and swap generation).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Capture → outputs written, milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_ms: Option<f64>,
}

/// SHA-256 of bytes, lower-case hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// sha256 (hex) of a file, read as a stream (for files too large to hold).
pub fn sha256_file(path: &std::path::Path) -> std::io::Result<String> {
    let mut h = Sha256::new();
    std::io::copy(&mut std::fs::File::open(path)?, &mut h)?;
    Ok(hex::encode(h.finalize()))
}

/// The open journal: the set of finished (file, hash) pairs and the file to append to. One owner
/// (the write stage) appends; readers ask [`Journal::is_done`] through the pipeline's shared handle.
#[derive(Debug)]
pub struct Journal {
    path: PathBuf,
    file: File,
    done: HashSet<(String, String)>,
    entries: usize,
    /// Bytes of whole lines: the length the file is cut back to after a failed append.
    whole: u64,
    /// A failed append left bytes past `whole` that could not be cut off yet.
    torn: bool,
}

impl Journal {
    /// Opens (creating) the journal, reads every entry and cuts off a torn last line.
    pub fn open(path: &Path) -> Result<Self, JournalError> {
        let io = |source| JournalError::Io {
            path: path.to_owned(),
            source,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(path)
            .map_err(io)?;
        let mut text = String::new();
        file.read_to_string(&mut text).map_err(io)?;
        let complete = text.rfind('\n').map_or(0, |i| i + 1);
        if complete < text.len() {
            tracing::warn!(
                path = %path.display(),
                bytes = text.len() - complete,
                "journal ends in a torn line (a crash while appending); cutting it off"
            );
            file.set_len(complete as u64).map_err(io)?;
            file.seek(SeekFrom::End(0)).map_err(io)?;
        }
        let mut done = HashSet::new();
        let mut entries = 0;
        for (i, line) in text[..complete].lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let e: Entry = serde_json::from_str(line).map_err(|e| JournalError::Parse {
                path: path.to_owned(),
                line: i + 1,
                message: e.to_string(),
            })?;
            done.insert((e.file, e.sha256));
            entries += 1;
        }
        Ok(Self {
            path: path.to_owned(),
            file,
            done,
            entries,
            whole: complete as u64,
            torn: false,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Entries read or written so far.
    pub fn len(&self) -> usize {
        self.entries
    }

    pub fn is_empty(&self) -> bool {
        self.entries == 0
    }

    /// Was this content under this name already handled?
    pub fn is_done(&self, file: &str, sha256: &str) -> bool {
        self.done.contains(&(file.to_owned(), sha256.to_owned()))
    }

    /// File names handled so far (for reconciling the features CSV).
    pub fn files(&self) -> HashSet<&str> {
        self.done.iter().map(|(f, _)| f.as_str()).collect()
    }

    /// Appends one entry as a single write of a whole line and waits until it is on disk. On
    /// failure the file is cut back to its last whole line.
    pub fn append(&mut self, entry: &Entry) -> Result<(), JournalError> {
        let path = self.path.clone();
        self.append_with(entry, |file, line| {
            // The fault tests' full disk: part of the line reaches the file, then ENOSPC.
            if let Some(e) = crate::fsio::injected_failure(&path) {
                file.write_all(&line[..line.len() / 2])?;
                return Err(e);
            }
            file.write_all(line)
        })
    }

    /// [`Journal::append`] with the write itself given (tests inject a partial write).
    fn append_with(
        &mut self,
        entry: &Entry,
        write: impl FnOnce(&mut File, &[u8]) -> std::io::Result<()>,
    ) -> Result<(), JournalError> {
        let path = self.path.clone();
        let io = |source| JournalError::Io {
            path: path.clone(),
            source,
        };
        let mut line = serde_json::to_string(entry).map_err(|e| io(std::io::Error::other(e)))?;
        line.push('\n');
        if self.torn {
            self.cut_back().map_err(io)?;
        }
        let written = write(&mut self.file, line.as_bytes()).and_then(|()| self.file.sync_data());
        if let Err(e) = written {
            if let Err(cut) = self.cut_back() {
                tracing::error!(
                    path = %self.path.display(),
                    error = %cut,
                    "cannot cut a failed journal append back to its last whole line; retrying \
                     before the next append"
                );
            }
            return Err(io(e));
        }
        self.whole += line.len() as u64;
        self.done.insert((entry.file.clone(), entry.sha256.clone()));
        self.entries += 1;
        Ok(())
    }

    /// Cuts the file back to its whole lines (after a failed append).
    fn cut_back(&mut self) -> std::io::Result<()> {
        self.torn = true;
        self.file.set_len(self.whole)?;
        self.file.sync_data()?;
        self.torn = false;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(file: &str, sha: &str) -> Entry {
        Entry {
            file: file.into(),
            sha256: sha.into(),
            outcome: Outcome::Segmented,
            at: 1.0,
            mask: Some(format!("{file}.mask.png")),
            reason: None,
            model: None,
            latency_ms: Some(3.0),
        }
    }

    #[test]
    fn entries_survive_reopening_and_a_torn_line_is_cut() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("j/journal.jsonl");
        {
            let mut j = Journal::open(&p).unwrap();
            assert!(j.is_empty());
            j.append(&entry("a.png", "11")).unwrap();
            j.append(&entry("b.png", "22")).unwrap();
        }
        // A crash in the middle of the third append.
        let mut f = OpenOptions::new().append(true).open(&p).unwrap();
        f.write_all(b"{\"file\":\"c.png\",\"sha").unwrap();
        drop(f);
        let mut j = Journal::open(&p).unwrap();
        assert_eq!(j.len(), 2);
        assert!(j.is_done("a.png", "11"));
        assert!(
            !j.is_done("a.png", "99"),
            "same name, new content is not done"
        );
        assert!(!j.is_done("c.png", "33"));
        j.append(&entry("c.png", "33")).unwrap();
        drop(j);
        let text = std::fs::read_to_string(&p).unwrap();
        assert_eq!(text.lines().count(), 3, "{text}");
        assert!(
            text.lines()
                .all(|l| serde_json::from_str::<Entry>(l).is_ok())
        );
    }

    /// Issue 17: a full disk wrote part of a line; the next append (after space was freed) went
    /// after the fragment, making a corrupt complete line that stopped the agent's next start.
    #[test]
    fn a_failed_partial_append_is_cut_back_and_the_journal_still_opens() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("journal.jsonl");
        let mut j = Journal::open(&p).unwrap();
        j.append(&entry("a.png", "11")).unwrap();
        let full = |f: &mut File, line: &[u8]| -> std::io::Result<()> {
            f.write_all(&line[..line.len() / 2])?;
            Err(std::io::Error::from_raw_os_error(28))
        };
        let e = j.append_with(&entry("b.png", "22"), full).unwrap_err();
        assert!(e.to_string().contains("journal.jsonl"), "{e}");
        assert!(!j.is_done("b.png", "22"));
        // Space again: the next entries are whole lines.
        j.append(&entry("c.png", "33")).unwrap();
        drop(j);
        let j = Journal::open(&p).unwrap();
        assert_eq!(j.len(), 2);
        assert!(j.is_done("a.png", "11") && j.is_done("c.png", "33"));
        assert!(!j.is_done("b.png", "22"));
    }

    #[test]
    fn a_corrupt_complete_line_is_an_error_naming_the_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("journal.jsonl");
        std::fs::write(&p, "not json\n").unwrap();
        let e = Journal::open(&p).unwrap_err();
        assert!(e.to_string().contains("line 1"), "{e}");
    }

    #[test]
    fn sha256_of_abc() {
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
