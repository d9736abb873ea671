//! The device's model store: the last N base-model versions on disk and which one runs.
//!
//! Layout under the store folder (`<federation.state>/models`):
//! - `versions/<sha256>/` — the ONNX file under the name its manifest gives (`model.onnx` when there
//!   is no manifest), `manifest.toml` when the version came with one, and `release.cbor` (the signed
//!   release as received: the record of who signed what this device runs).
//! - `fleet.json` — [`StoreState`]: the versions in the order they last ran (the running one last),
//!   the last signed instruction acted on, and the versions that failed at run time. Written
//!   atomically (temporary file + rename), so a crash leaves the old state or the new one.
//!
//! A version is written to `versions/<sha256>.partial/` and renamed into place once complete, so a
//! folder under `versions/` always holds a whole version. The model the agent was configured with is
//! adopted as the first version ([`Store::adopt`]) so that the fleet can always return to it.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::fsio::now_unix;
use crate::model::manifest::sha256_file;

/// Why the store could not be read or written; each names the path.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    State { path: PathBuf, message: String },
    #[error("version `{query}`: {problem}")]
    Version { query: String, problem: String },
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Where a version came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Origin {
    /// The model of the agent's configuration, adopted at first start.
    Config,
    /// A signed release from the fleet manager.
    Release,
}

/// One version on disk.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredVersion {
    /// SHA-256 of the ONNX file.
    pub version: String,
    /// `name version` from the manifest, when there is one.
    pub label: Option<String>,
    /// The ONNX file's name in the version's folder.
    pub model_file: String,
    pub origin: Origin,
    /// When it last became the running version (Unix seconds).
    pub activated_at: f64,
}

/// `fleet.json`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StoreState {
    /// Versions on disk, in the order they last ran; the running one is last.
    pub versions: Vec<StoredVersion>,
    /// `issued_ms` of the newest signed instruction acted on (0: none).
    pub last_instruction_ms: u64,
    /// Versions that failed at run time: never returned to automatically.
    pub failed: Vec<String>,
    /// A release being installed: a crash in the middle leaves it here, and the retained release,
    /// delivered again after the restart, is installed again (at most [`MAX_INSTALL_ATTEMPTS`]
    /// times: one that keeps stopping the agent is given up).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub installing: Option<Installing>,
}

/// A release install begun and not finished ([`StoreState::installing`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Installing {
    pub issued_ms: u64,
    /// Installs of it begun (1: the first).
    pub attempts: u32,
}

/// Installs of one release begun (and cut short by the process stopping) before it is given up.
pub const MAX_INSTALL_ATTEMPTS: u32 = 2;

/// The on-device store of model versions.
#[derive(Debug)]
pub struct Store {
    dir: PathBuf,
    keep: usize,
    state: StoreState,
    /// Tests: how many more saves succeed before each one fails as on a full disk (None: all do).
    #[cfg(test)]
    saves_before_full: Option<usize>,
}

impl Store {
    /// Opens (creating) the store in `dir`, keeping at most `keep` versions (at least 2: the running
    /// one and the one to return to). Entries whose folder has gone are forgotten.
    pub fn open(dir: &Path, keep: usize) -> Result<Self, StoreError> {
        let versions = dir.join("versions");
        std::fs::create_dir_all(&versions).map_err(io(&versions))?;
        let path = dir.join("fleet.json");
        let mut state: StoreState = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| StoreError::State {
                path: path.clone(),
                message: e.to_string(),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => StoreState::default(),
            Err(e) => return Err(io(&path)(e)),
        };
        state
            .versions
            .retain(|v| versions.join(&v.version).join(&v.model_file).is_file());
        // Leftovers of an interrupted write.
        if let Ok(entries) = std::fs::read_dir(&versions) {
            for e in entries.flatten() {
                if e.file_name().to_string_lossy().ends_with(".partial") {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
        Ok(Self {
            dir: dir.to_owned(),
            keep: keep.max(2),
            state,
            #[cfg(test)]
            saves_before_full: None,
        })
    }

    pub fn state(&self) -> &StoreState {
        &self.state
    }

    /// The running version.
    pub fn current(&self) -> Option<&StoredVersion> {
        self.state.versions.last()
    }

    /// The version to return to when the running one fails: the most recent other one that has not
    /// failed at run time.
    pub fn previous(&self) -> Option<&StoredVersion> {
        let n = self.state.versions.len();
        self.state.versions[..n.saturating_sub(1)]
            .iter()
            .rev()
            .find(|v| !self.state.failed.contains(&v.version))
    }

    pub fn get(&self, version: &str) -> Option<&StoredVersion> {
        self.state.versions.iter().find(|v| v.version == version)
    }

    /// Folder of a version.
    pub fn folder(&self, version: &str) -> PathBuf {
        self.dir.join("versions").join(version)
    }

    /// The ONNX file of a stored version.
    pub fn model_path(&self, v: &StoredVersion) -> PathBuf {
        self.folder(&v.version).join(&v.model_file)
    }

    /// A stored version by full hash, unique hash prefix (at least 6 digits), or label
    /// (`name version`, or the version number alone when only one stored version has it).
    pub fn resolve(&self, query: &str) -> Result<&StoredVersion, StoreError> {
        let q = query.trim();
        let err = |problem: String| StoreError::Version {
            query: q.to_owned(),
            problem,
        };
        let matches: Vec<&StoredVersion> =
            if q.len() >= 6 && q.bytes().all(|b| b.is_ascii_hexdigit()) {
                let lower = q.to_ascii_lowercase();
                self.state
                    .versions
                    .iter()
                    .filter(|v| v.version.starts_with(&lower))
                    .collect()
            } else {
                self.state
                    .versions
                    .iter()
                    .filter(|v| {
                        v.label.as_deref().is_some_and(|l| {
                            l == q || l.rsplit_once(' ').is_some_and(|(_, semver)| semver == q)
                        })
                    })
                    .collect()
            };
        match matches.as_slice() {
            [one] => Ok(one),
            [] => Err(err(format!(
                "not held by this device (it holds {})",
                self.state
                    .versions
                    .iter()
                    .map(|v| short(&v.version))
                    .collect::<Vec<_>>()
                    .join(", ")
            ))),
            many => Err(err(format!(
                "matches {} versions; give more digits",
                many.len()
            ))),
        }
    }

    /// Makes the agent's configured model the first version, when the store has none yet. Copies the
    /// ONNX file (and a `manifest.toml` beside it whose hash matches).
    pub fn adopt(&mut self, model: &Path) -> Result<&StoredVersion, StoreError> {
        if self.state.versions.is_empty() {
            let version = sha256_file(model).map_err(|e| StoreError::State {
                path: model.to_owned(),
                message: e.to_string(),
            })?;
            let manifest_path = model.with_file_name("manifest.toml");
            let manifest = crate::model::manifest::ModelManifest::load(&manifest_path)
                .ok()
                .filter(|m| {
                    m.sha256 == version
                        && Some(m.model_file.as_str()) == model.file_name().and_then(|n| n.to_str())
                });
            let model_file = manifest
                .as_ref()
                .map_or_else(|| "model.onnx".to_owned(), |m| m.model_file.clone());
            let mut files = vec![(model_file.clone(), read(model)?)];
            if manifest.is_some() {
                files.push(("manifest.toml".to_owned(), read(&manifest_path)?));
            }
            self.write_version(&version, &files)?;
            let adopted = StoredVersion {
                version,
                label: manifest.map(|m| format!("{} {}", m.name, m.version)),
                model_file,
                origin: Origin::Config,
                activated_at: now_unix(),
            };
            self.change(|s| s.versions.push(adopted))?;
        }
        self.state.versions.last().ok_or_else(|| StoreError::State {
            path: self.dir.join("fleet.json"),
            message: "no version after adopting the configured model".into(),
        })
    }

    /// Writes a version's files (name, bytes) into its folder, atomically as a whole. An existing
    /// folder for the same hash is replaced.
    pub fn write_version(
        &self,
        version: &str,
        files: &[(String, Vec<u8>)],
    ) -> Result<PathBuf, StoreError> {
        let folder = self.folder(version);
        let partial = self.dir.join("versions").join(format!("{version}.partial"));
        let _ = std::fs::remove_dir_all(&partial);
        std::fs::create_dir_all(&partial).map_err(io(&partial))?;
        for (name, bytes) in files {
            let p = partial.join(name);
            std::fs::write(&p, bytes).map_err(io(&p))?;
            let f = std::fs::File::open(&p).map_err(io(&p))?;
            f.sync_all().map_err(io(&p))?;
        }
        if folder.exists() {
            std::fs::remove_dir_all(&folder).map_err(io(&folder))?;
        }
        std::fs::rename(&partial, &folder).map_err(io(&folder))?;
        Ok(folder)
    }

    /// Removes a version's folder that never became part of the store (a rejected release).
    pub fn discard(&self, version: &str) {
        if self.get(version).is_none() {
            let _ = std::fs::remove_dir_all(self.folder(version));
        }
    }

    /// Records `v` as the running version (its folder must be written) and removes the oldest
    /// versions beyond `keep`. Returns the versions removed; their folders are deleted only once
    /// the new state is on disk.
    pub fn activate(&mut self, mut v: StoredVersion) -> Result<Vec<String>, StoreError> {
        let keep = self.keep;
        let removed = self.change(|s| {
            s.versions.retain(|x| x.version != v.version);
            v.activated_at = now_unix();
            s.versions.push(v);
            let excess = s.versions.len().saturating_sub(keep);
            let removed: Vec<String> = s.versions.drain(..excess).map(|o| o.version).collect();
            let versions = &s.versions;
            s.failed
                .retain(|f| versions.iter().any(|v| &v.version == f));
            removed
        })?;
        for old in &removed {
            let _ = std::fs::remove_dir_all(self.folder(old));
        }
        Ok(removed)
    }

    /// Remembers that `version` failed at run time.
    pub fn mark_failed(&mut self, version: &str) -> Result<(), StoreError> {
        self.change(|s| {
            if !s.failed.iter().any(|f| f == version) {
                s.failed.push(version.to_owned());
            }
        })
    }

    /// Records the newest signed instruction acted on (an install of it, or of an older one, is
    /// finished).
    pub fn note_instruction(&mut self, issued_ms: u64) -> Result<(), StoreError> {
        self.change(|s| {
            s.last_instruction_ms = s.last_instruction_ms.max(issued_ms);
            if s.installing
                .is_some_and(|i| i.issued_ms <= s.last_instruction_ms)
            {
                s.installing = None;
            }
        })
    }

    /// Records that the install of release `issued_ms` begins (durably, before anything of it is
    /// written); returns how many installs of it have begun, this one included.
    pub fn begin_install(&mut self, issued_ms: u64) -> Result<u32, StoreError> {
        self.change(|s| {
            let attempts = match s.installing {
                Some(i) if i.issued_ms == issued_ms => i.attempts.saturating_add(1),
                _ => 1,
            };
            s.installing = Some(Installing {
                issued_ms,
                attempts,
            });
            attempts
        })
    }

    /// Applies `edit` to the state and writes `fleet.json`. When the write fails (a full disk) the
    /// state in memory is put back as it was, so memory never runs ahead of the file: the caller
    /// refuses what it was doing, and the instruction, delivered again, is handled afresh.
    fn change<T>(&mut self, edit: impl FnOnce(&mut StoreState) -> T) -> Result<T, StoreError> {
        #[cfg(test)]
        if let Some(n) = self.saves_before_full.as_mut() {
            if *n == 0 {
                return Err(StoreError::State {
                    path: self.dir.join("fleet.json"),
                    message: std::io::Error::from_raw_os_error(28).to_string(),
                });
            }
            *n -= 1;
        }
        let before = self.state.clone();
        let out = edit(&mut self.state);
        if let Err(e) = self.save() {
            self.state = before;
            return Err(e);
        }
        Ok(out)
    }

    /// Tests: the disk fills up after `saves` more saves of the state (None: room again).
    #[cfg(test)]
    pub(crate) fn fill_disk_after(&mut self, saves: Option<usize>) {
        self.saves_before_full = saves;
    }

    fn save(&self) -> Result<(), StoreError> {
        let path = self.dir.join("fleet.json");
        let bytes = serde_json::to_vec_pretty(&self.state).map_err(|e| StoreError::State {
            path: path.clone(),
            message: e.to_string(),
        })?;
        crate::fsio::write_atomic(&path, &bytes).map_err(|e| StoreError::State {
            path,
            message: e.to_string(),
        })
    }
}

fn read(path: &Path) -> Result<Vec<u8>, StoreError> {
    std::fs::read(path).map_err(io(path))
}

/// The first 12 digits of a version hash, for people.
pub fn short(version: &str) -> &str {
    crate::telemetry::clip(version, 12)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(store: &mut Store, bytes: &[u8], label: &str) -> String {
        let version = crate::wire::protocol::sha256_hex(bytes);
        store
            .write_version(&version, &[("model.onnx".into(), bytes.to_vec())])
            .unwrap();
        store
            .activate(StoredVersion {
                version: version.clone(),
                label: Some(label.into()),
                model_file: "model.onnx".into(),
                origin: Origin::Release,
                activated_at: 0.0,
            })
            .unwrap();
        version
    }

    #[test]
    fn keeps_the_last_n_and_survives_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let config_model = dir.path().join("configured.onnx");
        std::fs::write(&config_model, b"v0").unwrap();
        let mut s = Store::open(&dir.path().join("store"), 3).unwrap();
        let v0 = s.adopt(&config_model).unwrap().version.clone();
        assert_eq!(v0, crate::wire::protocol::sha256_hex(b"v0"));
        // Adopting again changes nothing.
        s.adopt(&config_model).unwrap();
        assert_eq!(s.state().versions.len(), 1);
        let v1 = put(&mut s, b"v1", "m 1.0.0");
        let v2 = put(&mut s, b"v2", "m 2.0.0");
        assert_eq!(s.previous().unwrap().version, v1);
        let v3 = put(&mut s, b"v3", "m 3.0.0");
        // v0 is the oldest: removed with its folder.
        let held: Vec<_> = s
            .state()
            .versions
            .iter()
            .map(|v| v.version.clone())
            .collect();
        assert_eq!(held, vec![v1.clone(), v2.clone(), v3.clone()]);
        assert!(!s.folder(&v0).exists());
        // Going back to v1 makes it the newest; v2 is the one to return to.
        let one = s.get(&v1).unwrap().clone();
        s.activate(one).unwrap();
        assert_eq!(s.current().unwrap().version, v1);
        assert_eq!(s.previous().unwrap().version, v3);
        s.mark_failed(&v3).unwrap();
        assert_eq!(s.previous().unwrap().version, v2);
        s.note_instruction(42).unwrap();
        s.note_instruction(7).unwrap();

        let again = Store::open(&dir.path().join("store"), 3).unwrap();
        assert_eq!(again.state(), s.state());
        assert_eq!(again.state().last_instruction_ms, 42);
        assert_eq!(
            std::fs::read(again.model_path(again.current().unwrap())).unwrap(),
            b"v1"
        );
    }

    #[test]
    fn resolves_by_hash_prefix_or_label() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(dir.path(), 5).unwrap();
        let v1 = put(&mut s, b"v1", "grains 1.0.0");
        let v2 = put(&mut s, b"v2", "grains 1.1.0");
        assert_eq!(s.resolve(&v1).unwrap().version, v1);
        assert_eq!(s.resolve(&v2[..8]).unwrap().version, v2);
        assert_eq!(s.resolve(&v2[..8].to_uppercase()).unwrap().version, v2);
        assert_eq!(s.resolve("grains 1.0.0").unwrap().version, v1);
        assert_eq!(s.resolve("1.1.0").unwrap().version, v2);
        let e = s.resolve("2.0.0").unwrap_err().to_string();
        assert!(e.contains("not held") && e.contains(short(&v1)), "{e}");
        assert!(s.resolve("").is_err());
    }

    /// Issue 17: a full disk under `fleet.json`. The state in memory used to run ahead of the file
    /// (the new version listed as running, the oldest folder already deleted); now a failed save
    /// changes nothing, and the same change succeeds once there is room.
    #[test]
    fn a_state_that_cannot_be_written_is_not_changed_in_memory() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(dir.path(), 2).unwrap();
        let v1 = put(&mut s, b"v1", "m 1.0.0");
        let v2 = put(&mut s, b"v2", "m 2.0.0");
        let before = s.state().clone();
        // A real write failure: a folder where the state file goes.
        let state = dir.path().join("fleet.json");
        std::fs::remove_file(&state).unwrap();
        std::fs::create_dir(&state).unwrap();
        let e = s.begin_install(7).unwrap_err().to_string();
        assert!(e.contains("fleet.json"), "{e}");
        assert!(s.note_instruction(7).is_err());
        assert!(s.mark_failed(&v2).is_err());
        let v3 = StoredVersion {
            version: "c".repeat(64),
            label: None,
            model_file: "model.onnx".into(),
            origin: Origin::Release,
            activated_at: 0.0,
        };
        s.write_version(&v3.version, &[("model.onnx".into(), b"v3".to_vec())])
            .unwrap();
        assert!(s.activate(v3.clone()).is_err());
        assert_eq!(s.state(), &before, "memory is what the file says");
        assert!(
            s.folder(&v1).is_dir(),
            "no folder deleted for a change not saved"
        );

        std::fs::remove_dir(&state).unwrap();
        assert_eq!(s.activate(v3.clone()).unwrap(), vec![v1.clone()]);
        assert!(!s.folder(&v1).exists());
        let reopened = Store::open(dir.path(), 2).unwrap();
        assert_eq!(reopened.current().unwrap().version, v3.version);
        assert_eq!(reopened.previous().unwrap().version, v2);
    }

    #[test]
    fn an_interrupted_write_is_cleaned_up_and_a_lost_folder_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(dir.path(), 3).unwrap();
        let v1 = put(&mut s, b"v1", "m 1.0.0");
        let v2 = put(&mut s, b"v2", "m 2.0.0");
        std::fs::create_dir_all(dir.path().join("versions/abc.partial")).unwrap();
        std::fs::remove_dir_all(s.folder(&v1)).unwrap();
        let s = Store::open(dir.path(), 3).unwrap();
        assert!(!dir.path().join("versions/abc.partial").exists());
        assert_eq!(s.state().versions.len(), 1);
        assert_eq!(s.current().unwrap().version, v2);
        assert!(s.previous().is_none());
    }
}
