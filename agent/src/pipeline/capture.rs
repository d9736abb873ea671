//! The capture stage: watches the microscope's output folder and hands on each file once it is
//! complete.
//!
//! A microscope writes a file over some time, so a file counts as captured only when
//! - its size and modification time have not changed for the settle time, or
//! - a rename into the folder finished it (the usual "write `x.tmp`, rename to `x.tif`" pattern; a
//!   rename is atomic, the file is whole when its final name appears).
//!
//! Files already in the folder at start are captured too (those not modified within the settle time
//! at once). Dotfiles, names ending in `~`, and extensions not in the configured list (`.part`,
//! `.tmp`, sidecar metadata) are ignored. The folder is watched with `notify` (inotify on Linux); a
//! periodic check of the files seen stands in for the events a writer does not send, and when the
//! kernel's event queue overflowed (notify's "rescan" flag) the folder is listed again.
//!
//! The stage never blocks on the pipeline: complete files wait in a queue of paths here (as many as
//! there are files on disk, a few bytes each) and are sent when the bounded channel has room.
//!
//! Map: [`Capture`] (what the stage emits), [`CaptureFilter`], [`watch_folder`], [`CaptureError`].

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

use notify::event::{AccessKind, AccessMode, ModifyKind, RenameMode};
use notify::{Event, EventKind, RecursiveMode, Watcher};
use tokio::sync::{mpsc, watch};

use crate::pipeline::stats::Stats;

/// Why the folder cannot be watched.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("{path}: cannot watch the folder: {message}")]
    Watch { path: PathBuf, message: String },
    #[error("{path}: cannot list the folder: {source}")]
    List {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// A complete micrograph file, ready for the pipeline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capture {
    pub path: PathBuf,
    /// Its key in the journal: the file name for the watched folder, the path for `microfed segment`.
    pub key: String,
    /// When it was found complete; latencies are measured from here.
    pub captured_at: Instant,
}

impl Capture {
    /// A capture keyed by its file name, captured now.
    pub fn by_name(path: PathBuf) -> Self {
        let key = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| path.display().to_string());
        Self {
            path,
            key,
            captured_at: Instant::now(),
        }
    }
}

/// Which files are micrographs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaptureFilter {
    /// Lower-case extensions without the dot.
    pub extensions: Vec<String>,
}

impl CaptureFilter {
    pub fn new(extensions: &[String]) -> Self {
        Self {
            extensions: extensions
                .iter()
                .map(|e| e.trim_start_matches('.').to_ascii_lowercase())
                .collect(),
        }
    }

    /// True for names that may be micrographs: not hidden, not a backup (`~`), a known extension.
    pub fn accepts(&self, path: &Path) -> bool {
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            return false;
        };
        if name.starts_with('.') || name.ends_with('~') {
            return false;
        }
        path.extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| self.extensions.contains(&e.to_ascii_lowercase()))
    }
}

/// Size and modification time: the file's "signature" while it is being written.
type Signature = (u64, Option<SystemTime>);

fn signature(path: &Path) -> Option<Signature> {
    let m = std::fs::metadata(path).ok()?;
    m.is_file().then(|| (m.len(), m.modified().ok()))
}

/// A file seen but not yet complete.
#[derive(Debug)]
struct Pending {
    signature: Signature,
    /// Since when the signature has not changed.
    stable_since: Instant,
}

/// State of the watcher, separate from I/O on events so the rules are easy to follow.
struct Folder {
    filter: CaptureFilter,
    settle: Duration,
    pending: HashMap<PathBuf, Pending>,
    ready: VecDeque<PathBuf>,
    /// Signature of each file already handed on, so an unchanged file is not captured twice.
    emitted: HashMap<PathBuf, Signature>,
    /// Files whose outputs could not be written, and when to capture each again.
    retries: Vec<(Instant, PathBuf)>,
}

impl Folder {
    /// A file was created or written to (or found by a listing).
    fn touched(&mut self, path: &Path, now: Instant) {
        if !self.filter.accepts(path) || self.ready.iter().any(|p| p == path) {
            return;
        }
        let Some(sig) = signature(path) else { return };
        if self.emitted.get(path) == Some(&sig) {
            return;
        }
        match self.pending.get_mut(path) {
            Some(p) if p.signature == sig => {}
            Some(p) => {
                p.signature = sig;
                p.stable_since = now;
            }
            None => {
                // A file last modified longer ago than the settle time (e.g. there before the agent
                // started) is complete already.
                let age = sig
                    .1
                    .and_then(|m| SystemTime::now().duration_since(m).ok())
                    .unwrap_or_default();
                let stable_since = if age >= self.settle {
                    now.checked_sub(self.settle).unwrap_or(now)
                } else {
                    now
                };
                self.pending.insert(
                    path.to_owned(),
                    Pending {
                        signature: sig,
                        stable_since,
                    },
                );
            }
        }
    }

    /// A rename finished the file: complete now.
    fn renamed_in(&mut self, path: &Path) {
        if !self.filter.accepts(path) || self.ready.iter().any(|p| p == path) {
            return;
        }
        let Some(sig) = signature(path) else { return };
        if self.emitted.get(path) == Some(&sig) {
            return;
        }
        self.pending.remove(path);
        self.emitted.insert(path.to_owned(), sig);
        self.ready.push_back(path.to_owned());
    }

    fn removed(&mut self, path: &Path) {
        self.pending.remove(path);
        self.emitted.remove(path);
        self.ready.retain(|p| p != path);
        self.retries.retain(|(_, p)| p != path);
    }

    /// The pipeline could not write `path`'s outputs: capture it again at `at` (once per failure).
    fn retry(&mut self, path: PathBuf, at: Instant) {
        if !self.retries.iter().any(|(_, p)| *p == path) {
            self.retries.push((at, path));
        }
    }

    /// Re-reads the signature of every pending file and moves the settled ones to `ready`.
    fn check(&mut self, now: Instant) {
        let mut done = Vec::new();
        self.pending.retain(|path, p| match signature(path) {
            None => false,
            Some(sig) if sig != p.signature => {
                p.signature = sig;
                p.stable_since = now;
                true
            }
            Some(sig) => {
                if now.duration_since(p.stable_since) >= self.settle {
                    done.push((path.clone(), sig));
                    false
                } else {
                    true
                }
            }
        });
        done.sort();
        for (path, sig) in done {
            self.emitted.insert(path.clone(), sig);
            self.ready.push_back(path);
        }
        let (due, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.retries)
            .into_iter()
            .partition(|(at, _)| *at <= now);
        self.retries = later;
        for (_, path) in due {
            // Still there (and not already queued): captured again as it is now.
            if let Some(sig) = signature(&path)
                && !self.ready.contains(&path)
            {
                self.pending.remove(&path);
                self.emitted.insert(path.clone(), sig);
                self.ready.push_back(path);
            }
        }
    }

    fn list(&mut self, dir: &Path, now: Instant) -> Result<(), CaptureError> {
        let entries = std::fs::read_dir(dir).map_err(|source| CaptureError::List {
            path: dir.to_owned(),
            source,
        })?;
        let mut paths: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
        paths.sort();
        for p in paths {
            self.touched(&p, now);
        }
        Ok(())
    }

    fn event(&mut self, dir: &Path, event: Event, now: Instant) -> Result<(), CaptureError> {
        if event.need_rescan() {
            tracing::warn!(folder = %dir.display(), "file events were lost; listing the folder again");
            return self.list(dir, now);
        }
        match event.kind {
            EventKind::Remove(_) | EventKind::Modify(ModifyKind::Name(RenameMode::From)) => {
                for p in &event.paths {
                    self.removed(p);
                }
            }
            EventKind::Modify(ModifyKind::Name(RenameMode::To)) => {
                for p in &event.paths {
                    self.renamed_in(p);
                }
            }
            EventKind::Modify(ModifyKind::Name(RenameMode::Both)) => {
                if let [from, to] = event.paths.as_slice() {
                    self.removed(from);
                    self.renamed_in(to);
                }
            }
            // Opening and reading (our own decoding does both) says nothing about completeness.
            EventKind::Access(AccessKind::Close(AccessMode::Write))
            | EventKind::Create(_)
            | EventKind::Modify(_)
            | EventKind::Any
            | EventKind::Other => {
                for p in &event.paths {
                    self.touched(p, now);
                }
            }
            EventKind::Access(_) => {}
        }
        Ok(())
    }
}

/// Files the pipeline could not write, sent back to the watcher ([`watch_folder`]) to be captured
/// again after `after`.
#[derive(Debug)]
pub struct Retries {
    pub paths: mpsc::UnboundedReceiver<PathBuf>,
    pub after: Duration,
}

/// Watches `dir` until `stop` turns true and sends each complete micrograph to `tx`; a path that
/// comes back on `retries` is sent again later. Returns when stopped (dropping `tx`, which lets the
/// pipeline drain) or when the folder cannot be watched.
pub async fn watch_folder(
    dir: PathBuf,
    filter: CaptureFilter,
    settle: Duration,
    tx: mpsc::Sender<Capture>,
    mut stop: watch::Receiver<bool>,
    stats: Arc<Stats>,
    mut retries: Retries,
) -> Result<(), CaptureError> {
    let watch_err = |e: notify::Error| CaptureError::Watch {
        path: dir.clone(),
        message: e.to_string(),
    };
    // notify calls back on its own thread (not a runtime thread), where a blocking send is allowed;
    // this loop drains the channel without ever waiting on the pipeline, so it does not fill up.
    let (event_tx, mut events) = mpsc::channel::<notify::Result<Event>>(4096);
    let mut watcher = notify::recommended_watcher(move |res| {
        let _ = event_tx.blocking_send(res);
    })
    .map_err(watch_err)?;
    watcher
        .watch(&dir, RecursiveMode::NonRecursive)
        .map_err(watch_err)?;

    let mut folder = Folder {
        filter,
        settle,
        pending: HashMap::new(),
        ready: VecDeque::new(),
        emitted: HashMap::new(),
        retries: Vec::new(),
    };
    // Listing after the watch is set up: a file created in between is seen twice, never missed.
    folder.list(&dir, Instant::now())?;
    tracing::info!(
        folder = %dir.display(),
        existing = folder.pending.len(),
        settle_ms = settle.as_millis() as u64,
        "watching for micrographs"
    );
    let tick = (settle / 4).clamp(Duration::from_millis(10), Duration::from_millis(250));
    let mut ticker = tokio::time::interval(tick);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        stats.waiting.store(
            (folder.pending.len() + folder.ready.len()) as u64,
            Ordering::Relaxed,
        );
        tokio::select! {
            biased;
            _ = stop.changed() => break,
            ev = events.recv() => match ev {
                Some(Ok(event)) => folder.event(&dir, event, Instant::now())?,
                Some(Err(e)) => tracing::warn!(folder = %dir.display(), error = %e, "file watcher error"),
                None => return Err(CaptureError::Watch {
                    path: dir.clone(),
                    message: "the watcher stopped".into(),
                }),
            },
            _ = ticker.tick() => folder.check(Instant::now()),
            Some(path) = retries.paths.recv() => {
                tracing::info!(
                    file = %path.display(),
                    after_s = retries.after.as_secs(),
                    "outputs not written: capturing it again later"
                );
                folder.retry(path, Instant::now() + retries.after);
            }
            permit = tx.reserve(), if !folder.ready.is_empty() => {
                let Ok(permit) = permit else { break };
                if let Some(path) = folder.ready.pop_front() {
                    tracing::debug!(file = %path.display(), "captured");
                    stats.captured.fetch_add(1, Ordering::Relaxed);
                    permit.send(Capture::by_name(path));
                }
            }
        }
        if *stop.borrow() {
            break;
        }
    }
    let left = folder.pending.len() + folder.ready.len() + folder.retries.len();
    if left > 0 {
        tracing::info!(
            files = left,
            "stopping: files not yet handed on stay in the folder for the next start"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn folder(settle_ms: u64) -> Folder {
        Folder {
            filter: CaptureFilter::new(&["png".into(), "TIF".into()]),
            settle: Duration::from_millis(settle_ms),
            pending: HashMap::new(),
            ready: VecDeque::new(),
            emitted: HashMap::new(),
            retries: Vec::new(),
        }
    }

    /// Issue 17: a file whose outputs could not be written (a full disk) was left in the folder
    /// until the agent's next start.
    #[test]
    fn a_file_sent_back_is_captured_again_when_due_unless_it_was_removed() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.png");
        std::fs::write(&p, b"data").unwrap();
        let mut f = folder(100);
        f.renamed_in(&p);
        f.ready.clear();
        let t0 = Instant::now();
        f.retry(p.clone(), t0 + Duration::from_secs(30));
        f.retry(p.clone(), t0 + Duration::from_secs(31));
        assert_eq!(f.retries.len(), 1, "once per failure");
        f.check(t0 + Duration::from_secs(29));
        assert!(f.ready.is_empty(), "not before it is due");
        f.check(t0 + Duration::from_secs(30));
        assert_eq!(f.ready, std::slice::from_ref(&p));
        assert!(f.retries.is_empty());
        // Removed meanwhile: forgotten.
        f.ready.clear();
        f.retry(p.clone(), t0);
        f.removed(&p);
        f.check(t0 + Duration::from_secs(60));
        assert!(f.ready.is_empty() && f.retries.is_empty());
        // Gone from the disk when due: not captured.
        f.retry(p.clone(), t0);
        std::fs::remove_file(&p).unwrap();
        f.check(t0 + Duration::from_secs(60));
        assert!(f.ready.is_empty() && f.retries.is_empty());
    }

    #[test]
    fn filter_ignores_temporary_and_hidden_names() {
        let f = CaptureFilter::new(&[".png".into(), "TIF".into()]);
        assert!(f.accepts(Path::new("/a/x.png")));
        assert!(f.accepts(Path::new("/a/x.PNG")));
        assert!(f.accepts(Path::new("/a/x.tif")));
        for bad in [
            "/a/.x.png",
            "/a/x.png~",
            "/a/x.png.part",
            "/a/x.tmp",
            "/a/x",
            "/a/x.txt",
        ] {
            assert!(!f.accepts(Path::new(bad)), "{bad}");
        }
    }

    #[test]
    fn a_file_is_ready_only_after_its_size_settles() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.png");
        let mut f = folder(1000);
        std::fs::write(&p, b"12").unwrap();
        let t0 = Instant::now();
        f.touched(&p, t0);
        f.check(t0 + Duration::from_millis(900));
        assert!(f.ready.is_empty());
        std::fs::write(&p, b"1234").unwrap(); // still being written: the clock restarts
        f.check(t0 + Duration::from_millis(950));
        f.check(t0 + Duration::from_millis(1900));
        assert!(f.ready.is_empty());
        f.check(t0 + Duration::from_millis(1950));
        assert_eq!(f.ready, std::slice::from_ref(&p));
        // Touched again without a change: not captured twice.
        f.ready.clear();
        f.touched(&p, t0 + Duration::from_secs(5));
        f.check(t0 + Duration::from_secs(10));
        assert!(f.ready.is_empty() && f.pending.is_empty());
    }

    #[test]
    fn a_rename_completes_a_file_at_once_and_a_removal_forgets_it() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("b.tif");
        std::fs::write(&p, b"data").unwrap();
        let mut f = folder(60_000);
        f.renamed_in(&p);
        assert_eq!(f.ready, std::slice::from_ref(&p));
        f.renamed_in(&p);
        assert_eq!(f.ready.len(), 1);
        f.removed(&p);
        assert!(f.ready.is_empty() && f.emitted.is_empty());
        // Hidden temporary names never count.
        let tmp = dir.path().join(".b.tif.part");
        std::fs::write(&tmp, b"x").unwrap();
        f.renamed_in(&tmp);
        f.touched(&tmp, Instant::now());
        assert!(f.ready.is_empty() && f.pending.is_empty());
    }
}
