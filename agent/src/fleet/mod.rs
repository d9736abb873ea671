//! Fleet model versions: signed push, verification on the device, staged swap, rollback and device
//! status (docs/fleet.md).
//!
//! Map:
//! - [`signing`]: Ed25519 keys (PKCS#8 PEM secret, hex public) and the trusted-key check.
//! - [`package`]: the signed release (manifest + ONNX + sha256 + target + issue time) and commands,
//!   and their envelopes on `model/<i>` (chunked, retained) and `command` (retained).
//! - [`store`]: the device's last N versions on disk and which one runs.
//! - [`device`]: the agent's fleet task: verify → contract → hold-out → swap, rollback, automatic
//!   return from a model that fails at run time, reasons on the status topic.
//! - [`manager`]: the fleet manager's side (`microfed fleet push|rollback|list|status`).
//! - Here: [`FleetSection`] (`[federation.fleet_models]` in agent.toml) and the start-up helpers the agent
//!   calls before its pipeline loads a model ([`open_store`]) and before the fleet task starts
//!   ([`load_holdout`]).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::micrograph::Normalisation;
use crate::train::data::{TrainingImage, TrainingSet};

pub mod device;
pub mod manager;
pub mod package;
/// Ed25519 keys and signatures live with the wire (the aggregator signs its globals with them too).
pub use crate::wire::signing;
pub mod store;

/// `[federation.fleet_models]` in agent.toml: who may change this device's model, and how carefully.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetSection {
    /// Ed25519 public keys (64 hex digits each, `microfed fleet keygen` prints them) whose signed
    /// model versions and commands this device accepts. No other key is trusted.
    pub trusted_keys: Vec<String>,
    /// Groups this device belongs to (`fleet push --to group:NAME`).
    #[serde(default)]
    pub groups: Vec<String>,
    /// Model versions kept on disk, the running one included (at least 2).
    #[serde(default = "default_keep")]
    pub keep_versions: usize,
    /// A new model is refused when its mean IoU on the local hold-out is more than this below the
    /// running model's.
    #[serde(default = "default_margin")]
    pub holdout_margin: f64,
    /// A version installed by the fleet that fails this many images in a row returns to the previous
    /// version by itself.
    #[serde(default = "default_failures")]
    pub max_runtime_failures: u64,
}

fn default_keep() -> usize {
    3
}
fn default_margin() -> f64 {
    0.02
}
fn default_failures() -> u64 {
    3
}

/// Why the fleet task could not start.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error(transparent)]
    Signing(#[from] signing::SigningError),
    #[error("[federation.fleet_models]: {0}")]
    Config(String),
    #[error("the fleet's hold-out ({path}): {message}")]
    Holdout { path: PathBuf, message: String },
}

/// The store's folder for a device's state folder (`[federation] state`).
pub fn store_dir(state: &Path) -> PathBuf {
    state.join("models")
}

/// Opens the device's store (adopting `configured`, the model of the agent's configuration, as its
/// first version) and returns it with the model the agent must run: the store's current version, so
/// that a restart keeps what the fleet installed. A current version whose file is not what was
/// installed (its SHA-256 differs: a torn or corrupted file, a disk error) is marked failed and the
/// previous good version runs instead, said in an error line; with none left, the error names the
/// file.
pub fn open_store(
    state: &Path,
    fleet: &FleetSection,
    configured: &Path,
) -> Result<(store::Store, PathBuf), FleetError> {
    if fleet.holdout_margin.is_nan() || fleet.holdout_margin < 0.0 {
        return Err(FleetError::Config(format!(
            "holdout_margin must be ≥ 0, got {}",
            fleet.holdout_margin
        )));
    }
    if let Some(g) = fleet
        .groups
        .iter()
        .find(|g| !crate::wire::protocol::valid_level(g))
    {
        return Err(FleetError::Config(format!(
            "group {g:?} must be a non-empty name without '/', '+', '#'"
        )));
    }
    signing::TrustedKeys::parse(&fleet.trusted_keys)?;
    let mut s = store::Store::open(&store_dir(state), fleet.keep_versions)?;
    s.adopt(configured)?;
    while let Some(cur) = s.current().cloned() {
        let path = s.model_path(&cur);
        let why = match crate::model::manifest::sha256_file(&path) {
            Ok(found) if found == cur.version => break,
            Ok(found) => format!("it hashes to {}", store::short(&found)),
            Err(e) => e.to_string(),
        };
        tracing::error!(
            version = %store::short(&cur.version),
            path = %path.display(),
            "fleet: the current model version cannot run ({why}); returning to the previous one"
        );
        s.mark_failed(&cur.version)?;
        let Some(previous) = s.previous().cloned() else {
            return Err(FleetError::Config(format!(
                "{}: the current model version cannot run ({why}) and no earlier version is left",
                path.display()
            )));
        };
        s.activate(previous)?;
    }
    let current = s
        .current()
        .map(|v| s.model_path(v))
        .unwrap_or_else(|| configured.to_owned());
    Ok((s, current))
}

/// The labelled hold-out images new models are scored on: the same split as federated rounds use
/// (`holdout_fraction`, `seed`), so they are images local training never saw.
pub fn load_holdout(
    labelled: &Path,
    holdout_fraction: f64,
    seed: u64,
    normalisation: &Normalisation,
) -> Result<Vec<TrainingImage>, FleetError> {
    let set = TrainingSet::load(
        &[labelled.to_owned()],
        None,
        None,
        normalisation,
        holdout_fraction,
        seed,
    )
    .map_err(|e| FleetError::Holdout {
        path: labelled.to_owned(),
        message: e.to_string(),
    })?;
    Ok(set.validation)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn section() -> FleetSection {
        FleetSection {
            trusted_keys: vec![signing::SecretKey::from_seed([1; 32]).public().to_hex()],
            groups: Vec::new(),
            keep_versions: 3,
            holdout_margin: 0.02,
            max_runtime_failures: 3,
        }
    }

    /// Issue 17: a start with a broken current version (a torn or corrupted file) stopped the agent
    /// for good. It returns to the previous version, marks the broken one failed, and says so.
    #[test]
    fn a_start_with_a_broken_current_version_returns_to_the_previous_one() {
        let tmp = tempfile::tempdir().unwrap();
        let configured = tmp.path().join("configured.onnx");
        std::fs::write(&configured, b"the configured model").unwrap();
        let state = tmp.path().join("state");
        let (mut s, running) = open_store(&state, &section(), &configured).unwrap();
        let v0 = s.current().unwrap().clone();
        assert_eq!(running, s.model_path(&v0));
        // A release installed over it.
        let bytes = b"release one".to_vec();
        let v1 = crate::wire::protocol::sha256_hex(&bytes);
        s.write_version(&v1, &[("model.onnx".into(), bytes)])
            .unwrap();
        s.activate(store::StoredVersion {
            version: v1.clone(),
            label: None,
            model_file: "model.onnx".into(),
            origin: store::Origin::Release,
            activated_at: 0.0,
        })
        .unwrap();
        let v1_path = s.model_path(s.current().unwrap());
        drop(s);
        let (s, running) = open_store(&state, &section(), &configured).unwrap();
        assert_eq!(running, v1_path, "a good current version runs");
        drop(s);
        // The disk tears it.
        std::fs::write(&v1_path, b"release o").unwrap();
        let (s, running) = open_store(&state, &section(), &configured).unwrap();
        assert_eq!(running, s.model_path(&v0), "back to the previous version");
        assert_eq!(s.current().unwrap().version, v0.version);
        assert!(s.state().failed.contains(&v1));
        drop(s);
        // And it stays there (the broken one is never returned to automatically).
        let (_, again) = open_store(&state, &section(), &configured).unwrap();
        assert_eq!(again, running);
    }

    #[test]
    fn a_broken_only_version_is_an_error_naming_the_file() {
        let tmp = tempfile::tempdir().unwrap();
        let configured = tmp.path().join("configured.onnx");
        std::fs::write(&configured, b"the configured model").unwrap();
        let state = tmp.path().join("state");
        let (s, running) = open_store(&state, &section(), &configured).unwrap();
        drop(s);
        std::fs::write(&running, b"torn").unwrap();
        let e = open_store(&state, &section(), &configured)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(&running.display().to_string()) && e.contains("no earlier version"),
            "{e}"
        );
    }
}
