//! Store-and-forward for updates that could not be sent: the broker was down, the lab's link dropped,
//! the board rebooted mid-round. The round logic pushes an update here, sends what is pending when the
//! connection is back, and removes what was delivered or what belongs to a round that has closed.
//!
//! Map:
//! - [`Outbox`]: a directory, one file per [`OutboxItem`], named by a sequence number
//!   (`00000000000000000042.cbor`) so that the order survives a restart; an in-memory index of
//!   [`OutboxEntry`]s, oldest first, so that listing never reads payloads.
//! - Bounds: `max_items` and `max_bytes` (payload bytes); [`Outbox::push`] evicts and returns the
//!   oldest items when over either, so a lab offline for days keeps its newest updates, not its first.
//! - [`OutboxError`]: every error names the file.
//!
//! Durability: each item is written to a temporary name, flushed to disk, renamed into place, and the
//! directory is flushed, so after a crash an item is either whole or absent; [`Outbox::open`] deletes
//! leftover temporaries. Each file holds a SHA-256 of its payload: a file damaged on disk is moved to
//! `corrupt/` with a warning instead of being sent or crashing the agent. One process owns a
//! directory at a time (the agent); removals are not flushed, so a crash right after one can bring an
//! already-sent item back, which the round logic drops by its round number.

use std::fs::File;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::fsio::{FsError, remove_stale_temporaries, write_atomic};

/// An update waiting to be sent: the MQTT topic, the round it belongs to, the global model version it
/// was computed against, and the message bytes (e.g. a compressed update).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxItem {
    pub topic: String,
    pub round: u64,
    pub model_version: String,
    pub payload: Vec<u8>,
}

/// What [`Outbox::pending`] lists about an item, without its payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxEntry {
    /// Sequence number, increasing with every push; names the file.
    pub id: u64,
    pub topic: String,
    pub round: u64,
    pub model_version: String,
    /// Payload bytes.
    pub len: usize,
}

/// Errors of the outbox; each names the file or directory.
#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    #[error("outbox: {0}")]
    Config(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Write(#[from] FsError),
    #[error("{path}: corrupt outbox item: {problem}")]
    Corrupt { path: PathBuf, problem: String },
    #[error("{dir}: no outbox item {id}")]
    UnknownId { dir: PathBuf, id: u64 },
    #[error("{dir}: an item of {len} bytes exceeds the outbox bound of {max_bytes} bytes")]
    TooLarge {
        dir: PathBuf,
        len: usize,
        max_bytes: u64,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> OutboxError + '_ {
    move |source| OutboxError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Format version of the item files.
const FORMAT: u8 = 1;
const EXTENSION: &str = "cbor";
/// Where damaged items go, inside the outbox directory.
const CORRUPT_DIR: &str = "corrupt";

/// One item file, as written.
#[derive(Serialize)]
struct StoredRef<'a> {
    format: u8,
    topic: &'a str,
    round: u64,
    model_version: &'a str,
    #[serde(with = "serde_bytes")]
    payload: &'a [u8],
    #[serde(with = "serde_bytes")]
    sha256: &'a [u8],
}

/// One item file, as read back.
#[derive(Deserialize)]
struct Stored {
    format: u8,
    topic: String,
    round: u64,
    model_version: String,
    #[serde(with = "serde_bytes")]
    payload: Vec<u8>,
    #[serde(with = "serde_bytes")]
    sha256: Vec<u8>,
}

/// A bounded, persistent queue of [`OutboxItem`]s in a directory.
#[derive(Debug)]
pub struct Outbox {
    dir: PathBuf,
    max_items: usize,
    max_bytes: u64,
    entries: Vec<OutboxEntry>,
    bytes: u64,
    next_id: u64,
}

impl Outbox {
    /// Opens (creating it if needed) the outbox in `dir`, holding at most `max_items` items and
    /// `max_bytes` payload bytes. Loads the items that survived a restart in their original order,
    /// deletes half-written temporary files, and moves damaged items to `dir/corrupt/` with a warning.
    /// The bounds are enforced at the next [`Outbox::push`] (a lowered bound does not drop items on
    /// open).
    pub fn open(dir: &Path, max_items: usize, max_bytes: u64) -> Result<Self, OutboxError> {
        if max_items == 0 || max_bytes == 0 {
            return Err(OutboxError::Config(format!(
                "{}: max_items ({max_items}) and max_bytes ({max_bytes}) must be at least 1",
                dir.display()
            )));
        }
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        let swept = remove_stale_temporaries(dir)?;
        if swept > 0 {
            tracing::warn!(
                dir = %dir.display(),
                swept,
                "outbox: removed half-written items left by a crash"
            );
        }
        let mut files = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(io_err(dir))? {
            let entry = entry.map_err(io_err(dir))?;
            let path = entry.path();
            match item_id(&path) {
                Some(id) if path.is_file() => files.push((id, path)),
                _ => {}
            }
        }
        files.sort_unstable_by_key(|(id, _)| *id);
        let next_id = files.last().map_or(1, |(id, _)| id.saturating_add(1));
        let mut outbox = Self {
            dir: dir.to_owned(),
            max_items,
            max_bytes,
            entries: Vec::with_capacity(files.len()),
            bytes: 0,
            next_id,
        };
        for (id, path) in files {
            match read_item(&path) {
                Ok(item) => {
                    outbox.bytes += item.payload.len() as u64;
                    outbox.entries.push(entry_of(id, &item));
                }
                Err(e) => outbox.move_aside(&path, &e),
            }
        }
        Ok(outbox)
    }

    /// Stores `item` durably and returns the oldest items it pushed out to stay within the bounds
    /// (the new item is never among them). An item whose payload alone exceeds `max_bytes` is refused.
    pub fn push(&mut self, item: OutboxItem) -> Result<Vec<OutboxItem>, OutboxError> {
        if item.payload.len() as u64 > self.max_bytes {
            return Err(OutboxError::TooLarge {
                dir: self.dir.clone(),
                len: item.payload.len(),
                max_bytes: self.max_bytes,
            });
        }
        let id = self.next_id;
        let path = self.path_of(id);
        let digest = Sha256::digest(&item.payload);
        let stored = StoredRef {
            format: FORMAT,
            topic: &item.topic,
            round: item.round,
            model_version: &item.model_version,
            payload: &item.payload,
            sha256: &digest,
        };
        let mut bytes = Vec::with_capacity(item.payload.len() + 128);
        ciborium::into_writer(&stored, &mut bytes).map_err(|e| OutboxError::Corrupt {
            path: path.clone(),
            problem: format!("cannot encode: {e}"),
        })?;
        write_atomic(&path, &bytes)?;
        // The rename is durable only once the directory itself is flushed.
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err(&self.dir))?;
        self.next_id += 1;
        self.bytes += item.payload.len() as u64;
        self.entries.push(entry_of(id, &item));

        let mut evicted = Vec::new();
        while self.entries.len() > self.max_items || self.bytes > self.max_bytes {
            let oldest = self.entries[0].id;
            match self.load(oldest) {
                Ok(item) => evicted.push(item),
                Err(OutboxError::Corrupt { path, problem }) => {
                    self.move_aside(&path, &problem);
                    self.forget(0);
                    continue;
                }
                Err(e) => return Err(e),
            }
            self.remove(oldest)?;
        }
        if !evicted.is_empty() {
            tracing::warn!(
                dir = %self.dir.display(),
                evicted = evicted.len(),
                "outbox full: dropped the oldest unsent updates"
            );
        }
        Ok(evicted)
    }

    /// The items waiting, oldest first.
    pub fn pending(&self) -> &[OutboxEntry] {
        &self.entries
    }

    /// Reads item `id` back from disk, checking its checksum. A damaged file is
    /// [`OutboxError::Corrupt`]; [`Outbox::remove`] it.
    pub fn load(&self, id: u64) -> Result<OutboxItem, OutboxError> {
        if !self.entries.iter().any(|e| e.id == id) {
            return Err(OutboxError::UnknownId {
                dir: self.dir.clone(),
                id,
            });
        }
        read_item(&self.path_of(id)).map_err(|problem| OutboxError::Corrupt {
            path: self.path_of(id),
            problem,
        })
    }

    /// Deletes item `id` (sent, or no longer wanted) and returns its entry; `None` if there is no such
    /// item (e.g. it was evicted meanwhile).
    pub fn remove(&mut self, id: u64) -> Result<Option<OutboxEntry>, OutboxError> {
        let Some(pos) = self.entries.iter().position(|e| e.id == id) else {
            return Ok(None);
        };
        let path = self.path_of(id);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(&path)(e)),
        }
        Ok(Some(self.forget(pos)))
    }

    /// Deletes every item for which `f` is true (e.g. updates of rounds that have closed) and returns
    /// their entries, oldest first. On an I/O error the items before the failing one are gone, the rest
    /// stay.
    pub fn drop_where(
        &mut self,
        f: impl Fn(&OutboxEntry) -> bool,
    ) -> Result<Vec<OutboxEntry>, OutboxError> {
        let ids: Vec<u64> = self.entries.iter().filter(|e| f(e)).map(|e| e.id).collect();
        let mut dropped = Vec::with_capacity(ids.len());
        for id in ids {
            dropped.extend(self.remove(id)?);
        }
        Ok(dropped)
    }

    /// Number of items waiting.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether nothing is waiting.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Payload bytes waiting (the quantity `max_bytes` bounds; each file adds ~100 bytes of framing).
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// The outbox directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path_of(&self, id: u64) -> PathBuf {
        self.dir.join(format!("{id:020}.{EXTENSION}"))
    }

    /// Drops entry `pos` from the index.
    fn forget(&mut self, pos: usize) -> OutboxEntry {
        let e = self.entries.remove(pos);
        self.bytes -= e.len as u64;
        e
    }

    /// Moves a damaged file to `corrupt/` (a new name if one is taken), logging why. Never fails: if
    /// even the move fails the file stays where it is, unlisted, and the warning says so.
    fn move_aside(&self, path: &Path, problem: &str) {
        let corrupt = self.dir.join(CORRUPT_DIR);
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut target = corrupt.join(&name);
        let mut n = 1;
        while target.exists() {
            target = corrupt.join(format!("{name}.{n}"));
            n += 1;
        }
        let moved = std::fs::create_dir_all(&corrupt).and_then(|()| std::fs::rename(path, &target));
        match moved {
            Ok(()) => tracing::warn!(
                file = %path.display(),
                moved_to = %target.display(),
                problem,
                "outbox: corrupt item moved aside"
            ),
            Err(e) => tracing::warn!(
                file = %path.display(),
                problem,
                error = %e,
                "outbox: corrupt item could not be moved aside; ignoring it"
            ),
        }
    }
}

/// The sequence number of an item file name (`<20 digits>.cbor`), `None` for anything else.
fn item_id(path: &Path) -> Option<u64> {
    let name = path.file_name()?.to_str()?;
    let stem = name.strip_suffix(EXTENSION)?.strip_suffix('.')?;
    if stem.len() == 20 && stem.bytes().all(|b| b.is_ascii_digit()) {
        stem.parse().ok()
    } else {
        None
    }
}

/// Reads and checks one item file; the error is the problem, for [`OutboxError::Corrupt`] or a
/// warning.
fn read_item(path: &Path) -> Result<OutboxItem, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read: {e}"))?;
    let s: Stored =
        ciborium::from_reader(&bytes[..]).map_err(|e| format!("not a CBOR item: {e}"))?;
    if s.format != FORMAT {
        return Err(format!("format {}, this build reads {FORMAT}", s.format));
    }
    if Sha256::digest(&s.payload)[..] != s.sha256[..] {
        return Err("payload does not match its SHA-256".into());
    }
    Ok(OutboxItem {
        topic: s.topic,
        round: s.round,
        model_version: s.model_version,
        payload: s.payload,
    })
}

fn entry_of(id: u64, item: &OutboxItem) -> OutboxEntry {
    OutboxEntry {
        id,
        topic: item.topic.clone(),
        round: item.round,
        model_version: item.model_version.clone(),
        len: item.payload.len(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(round: u64, len: usize) -> OutboxItem {
        OutboxItem {
            topic: format!("microfed/grains/round/{round}/update"),
            round,
            model_version: format!("v{round}"),
            payload: (0..len).map(|i| (i * 31 + round as usize) as u8).collect(),
        }
    }

    fn file_names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn items_survive_a_reopen_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let items: Vec<OutboxItem> = (1..=3).map(|r| item(r, 100 * r as usize)).collect();
        {
            let mut ob = Outbox::open(dir.path(), 10, 1 << 20).unwrap();
            for it in &items {
                assert!(ob.push(it.clone()).unwrap().is_empty());
            }
            assert_eq!(ob.bytes(), 600);
        }
        let mut ob = Outbox::open(dir.path(), 10, 1 << 20).unwrap();
        assert_eq!(ob.len(), 3);
        assert_eq!(ob.bytes(), 600);
        let ids: Vec<u64> = ob.pending().iter().map(|e| e.id).collect();
        assert_eq!(ids, vec![1, 2, 3]);
        for (e, it) in ob.pending().iter().zip(&items) {
            assert_eq!((e.round, e.len), (it.round, it.payload.len()));
            assert_eq!(&ob.load(e.id).unwrap(), it);
        }
        // Numbering continues after the survivors.
        ob.push(item(4, 10)).unwrap();
        assert_eq!(ob.pending().last().unwrap().id, 4);
        assert_eq!(ob.remove(2).unwrap().unwrap().round, 2);
        assert_eq!(ob.remove(2).unwrap(), None);
        assert!(matches!(
            ob.load(2),
            Err(OutboxError::UnknownId { id: 2, .. })
        ));
        let ob = Outbox::open(dir.path(), 10, 1 << 20).unwrap();
        let rounds: Vec<u64> = ob.pending().iter().map(|e| e.round).collect();
        assert_eq!(rounds, vec![1, 3, 4]);
    }

    #[test]
    fn bounds_evict_the_oldest() {
        // Item bound.
        let dir = tempfile::tempdir().unwrap();
        let mut ob = Outbox::open(dir.path(), 2, 1 << 20).unwrap();
        ob.push(item(1, 10)).unwrap();
        ob.push(item(2, 10)).unwrap();
        assert_eq!(ob.push(item(3, 10)).unwrap(), vec![item(1, 10)]);
        assert_eq!(
            ob.pending().iter().map(|e| e.round).collect::<Vec<_>>(),
            vec![2, 3]
        );
        assert_eq!(file_names(dir.path()).len(), 2);

        // Byte bound: 10 + 10 + 980 = 1000 fits exactly. Then 15 more: evicting the oldest is not
        // enough (10 + 980 + 15 > 1000), evicting the two oldest is (980 + 15).
        let dir = tempfile::tempdir().unwrap();
        let mut ob = Outbox::open(dir.path(), 100, 1000).unwrap();
        ob.push(item(1, 10)).unwrap();
        ob.push(item(2, 10)).unwrap();
        assert!(ob.push(item(3, 980)).unwrap().is_empty());
        assert_eq!(ob.bytes(), 1000);
        let evicted = ob.push(item(4, 15)).unwrap();
        assert_eq!(evicted, vec![item(1, 10), item(2, 10)]);
        assert_eq!((ob.len(), ob.bytes()), (2, 995));
        assert_eq!(
            file_names(dir.path()),
            [3, 4].map(|id| format!("{id:020}.cbor"))
        );
        // An item that can never fit is refused and changes nothing.
        assert!(matches!(
            ob.push(item(5, 1001)),
            Err(OutboxError::TooLarge { len: 1001, .. })
        ));
        assert_eq!(ob.len(), 2);
        assert!(Outbox::open(dir.path(), 0, 10).is_err());
    }

    #[test]
    fn drop_where_removes_closed_rounds() {
        let dir = tempfile::tempdir().unwrap();
        let mut ob = Outbox::open(dir.path(), 10, 1 << 20).unwrap();
        for r in [1, 2, 3, 1] {
            ob.push(item(r, 5)).unwrap();
        }
        let dropped = ob.drop_where(|e| e.round < 3).unwrap();
        assert_eq!(
            dropped.iter().map(|e| (e.id, e.round)).collect::<Vec<_>>(),
            [(1, 1), (2, 2), (4, 1)]
        );
        assert_eq!(ob.len(), 1);
        assert_eq!(ob.bytes(), 5);
        let ob = Outbox::open(dir.path(), 10, 1 << 20).unwrap();
        assert_eq!(
            ob.pending().iter().map(|e| e.round).collect::<Vec<_>>(),
            vec![3]
        );
    }

    #[test]
    fn corrupt_items_are_moved_aside_not_loaded() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut ob = Outbox::open(dir.path(), 10, 1 << 20).unwrap();
            for r in 1..=4 {
                ob.push(item(r, 64)).unwrap();
            }
        }
        let path = |id: u64| dir.path().join(format!("{id:020}.cbor"));
        // 2: truncated; 3: a flipped payload byte (valid CBOR, wrong checksum); 4: not CBOR at all.
        let b = std::fs::read(path(2)).unwrap();
        std::fs::write(path(2), &b[..b.len() / 2]).unwrap();
        let mut b = std::fs::read(path(3)).unwrap();
        // The file ends with the digest: key "sha256" (7 bytes), a 2-byte header and 32 bytes.
        let at = b.len() - 41 - 10;
        b[at] ^= 0x10;
        std::fs::write(path(3), &b).unwrap();
        std::fs::write(path(4), b"hello").unwrap();
        assert!(read_item(&path(2)).unwrap_err().contains("CBOR"));
        assert!(read_item(&path(3)).unwrap_err().contains("SHA-256"));
        let mut ob = Outbox::open(dir.path(), 10, 1 << 20).unwrap();
        assert_eq!(
            ob.pending().iter().map(|e| e.id).collect::<Vec<_>>(),
            vec![1]
        );
        assert_eq!(
            file_names(&dir.path().join("corrupt")),
            [2, 3, 4].map(|id| format!("{id:020}.cbor"))
        );
        // New items do not reuse the ids of the damaged ones.
        ob.push(item(5, 1)).unwrap();
        assert_eq!(ob.pending().last().unwrap().id, 5);
        // Damage after opening shows up on load as a typed error.
        std::fs::write(path(1), b"junk").unwrap();
        assert!(matches!(ob.load(1), Err(OutboxError::Corrupt { .. })));
    }

    #[test]
    fn temporaries_are_removed_and_strangers_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut ob = Outbox::open(dir.path(), 10, 1 << 20).unwrap();
            ob.push(item(1, 8)).unwrap();
        }
        // What a crash between write and rename leaves, and a file the outbox did not write.
        let tmp = format!(".microfed-{:020}.cbor.4242.tmp", 2);
        std::fs::write(dir.path().join(&tmp), b"half an it").unwrap();
        std::fs::write(dir.path().join("notes.txt"), b"x").unwrap();
        let ob = Outbox::open(dir.path(), 10, 1 << 20).unwrap();
        assert_eq!(ob.len(), 1);
        assert_eq!(
            file_names(dir.path()),
            vec![format!("{:020}.cbor", 1), "notes.txt".to_string()]
        );
        assert_eq!(item_id(Path::new("00000000000000000007.cbor")), Some(7));
        assert_eq!(item_id(Path::new("7.cbor")), None);
        assert_eq!(item_id(Path::new("00000000000000000007.cbor.tmp")), None);
    }
}
