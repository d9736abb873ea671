//! The agent's side of the fleet: receive signed model versions and commands, and change the model
//! the microscope's pipeline runs only when every check passes.
//!
//! Map:
//! - [`run`]: the async task on the device's one MQTT connection. It reassembles the chunked release
//!   on `model/<i>`, reads `command`, follows the slot's run-time health, and hands each event to
//!   the worker thread (checks and hold-out scoring are seconds of CPU and must not block the
//!   runtime).
//! - [`FleetDevice`]: the worker's state and the decisions, free of MQTT so tests drive it directly:
//!   - [`FleetDevice::handle_release`]: signature (trusted keys only) → sha256 of the ONNX file against
//!     the signed version and the manifest → newer than the last instruction acted on, and targeted at
//!     this device → written to the store → manifest and hash re-read from disk → the ONNX contract
//!     (`model check`), the agent's classes and normalisation → loads and prepares for the pipeline's
//!     batch and tile → mean IoU on the local labelled hold-out no more than `holdout_margin` below the
//!     running model's → swapped in ([`ModelSlot::swap`]: images in flight finish on the old model),
//!     made current in the store (the last N kept), its path sent to the federated-rounds task (which
//!     rebuilds its feature cache for the new base model), status updated. On any failure the running
//!     model stays and the status's `last_error` says why.
//!   - [`FleetDevice::handle_command`]: `rollback` to a held version (signed like releases).
//!   - [`FleetDevice::handle_health`]: a version swapped in by the fleet that fails
//!     `max_runtime_failures` images in a row returns to the previous version by itself, once.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};

use super::package::{self, FleetCommand, Order, PackageError, Release, Signed};
use super::signing::TrustedKeys;
use super::store::{Origin, Store, StoreError, StoredVersion, short};
use crate::classes::ClassDef;
use crate::mask::Mask;
use crate::metrics::ConfusionMatrix;
use crate::micrograph::Normalisation;
use crate::model::manifest::ModelManifest;
use crate::model::runtime::{Outputs, Segmenter};
use crate::pipeline::slot::{ModelSlot, RunHealth};
use crate::train::data::TrainingImage;
use crate::wire::device::{DeviceLink, StatusBoard};
use crate::wire::link::Message;
use crate::wire::protocol::{Kind, Reassembler, ReassemblyLimits};

/// Why a release or command was not applied (reported on the status topic).
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error(transparent)]
    Package(#[from] PackageError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("contract: {0}")]
    Contract(String),
    #[error(
        "worse on the hold-out: mean IoU {new:.4} on {images} local image(s), the running model has \
         {current:.4} (the margin allows {margin:.4} less)"
    )]
    Holdout {
        new: f64,
        current: f64,
        margin: f64,
        images: usize,
    },
    #[error("hold-out: {0}")]
    HoldoutUnavailable(String),
    #[error("cannot load: {0}")]
    Load(String),
    #[error("swap: {0}")]
    Swap(String),
    #[error(
        "{version}: its install was cut short {attempts} times (the agent stopped in the middle); \
         given up"
    )]
    Interrupted { version: String, attempts: u32 },
}

/// Where the fleet task reports the running version and its last error: the device's
/// [`StatusBoard`] (published retained on `status/<device>`), or a recorder in tests.
pub trait StatusSink: Send + Sync {
    /// `version`: the running model version (unchanged when `None`); `error`: the last error (`None`
    /// clears it).
    fn report(&self, version: Option<&str>, error: Option<String>);
}

impl StatusSink for StatusBoard {
    fn report(&self, version: Option<&str>, error: Option<String>) {
        self.update(|s| {
            if let Some(v) = version {
                s.model_version = v.to_owned();
            }
            s.last_error = error;
        });
    }
}

/// What the pipeline runs, which a new model must fit.
#[derive(Debug, Clone)]
pub struct PipelineShape {
    pub batch: usize,
    pub tile: usize,
    pub normalisation: Normalisation,
    pub classes: Vec<ClassDef>,
}

/// Settings of the device's fleet task (from `[federation.fleet_models]`).
#[derive(Debug, Clone)]
pub struct DeviceSettings {
    pub fleet: String,
    pub device: String,
    pub groups: Vec<String>,
    pub trusted: TrustedKeys,
    pub holdout_margin: f64,
    pub max_runtime_failures: u64,
}

/// What happened to an instruction that was not refused.
#[derive(Debug, Clone, PartialEq)]
pub enum Applied {
    /// The version now runs (slot generation given).
    Installed { version: String, generation: u64 },
    /// Not for this device, already acted on, or already running: nothing to do.
    Ignored(String),
}

/// The worker's state: the store, the slot, the hold-out, and where to report.
pub struct FleetDevice {
    settings: DeviceSettings,
    store: Store,
    slot: ModelSlot,
    shape: PipelineShape,
    holdout: Vec<TrainingImage>,
    status: Arc<dyn StatusSink>,
    base: watch::Sender<PathBuf>,
    /// Slot generation at which the fleet last installed a version in this run (0: none), for the
    /// automatic return; cleared once it has returned.
    armed: Option<u64>,
}

impl std::fmt::Debug for FleetDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FleetDevice")
            .field("device", &self.settings.device)
            .field("store", &self.store)
            .field("holdout", &self.holdout.len())
            .finish()
    }
}

impl FleetDevice {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        settings: DeviceSettings,
        store: Store,
        slot: ModelSlot,
        shape: PipelineShape,
        holdout: Vec<TrainingImage>,
        status: Arc<dyn StatusSink>,
        base: watch::Sender<PathBuf>,
    ) -> Self {
        Self {
            settings,
            store,
            slot,
            shape,
            holdout,
            status,
            base,
            armed: None,
        }
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    fn report(&self, error: Option<String>) {
        let version = self.store.current().map(|v| v.version.clone());
        self.status.report(version.as_deref(), error);
    }

    /// A whole message from `model/<i>` (after reassembly) or `command`.
    pub fn handle_message(&mut self, on_command_topic: bool, bytes: &[u8]) {
        let result =
            package::decode(bytes, &self.settings.fleet).and_then(|(kind, signed)| {
                match (kind, on_command_topic) {
                    (Kind::ModelVersion, false) => Ok((true, signed)),
                    (Kind::Command, true) => Ok((false, signed)),
                    (k, _) => Err(PackageError::Malformed {
                        what: "fleet message",
                        message: format!("a {k:?} message on the wrong topic"),
                    }),
                }
            });
        let outcome = match result {
            Ok((true, signed)) => self.handle_release(&signed),
            Ok((false, signed)) => self.handle_command(&signed),
            Err(e) => Err(e.into()),
        };
        let what = if on_command_topic {
            "command"
        } else {
            "model version"
        };
        match outcome {
            Ok(Applied::Installed {
                version,
                generation,
            }) => {
                tracing::info!(version = %short(&version), generation, "fleet: {what} applied; the model runs");
                self.report(None);
            }
            Ok(Applied::Ignored(why)) => tracing::info!("fleet: {what} ignored: {why}"),
            Err(e) => {
                let reason = format!("fleet: {what} refused: {e}");
                tracing::error!("{reason}; keeping the running model");
                self.report(Some(reason));
            }
        }
    }

    /// Checks a signed release and, when everything passes, makes it the running model.
    pub fn handle_release(&mut self, signed: &Signed) -> Result<Applied, InstallError> {
        let (release, manifest, key) =
            signed.open_release(&self.settings.fleet, &self.settings.trusted)?;
        let version = release.version.clone();
        if !release
            .target
            .includes(&self.settings.device, &self.settings.groups)
        {
            return Ok(Applied::Ignored(format!(
                "{} is for {}",
                short(&version),
                release.target
            )));
        }
        if release.issued_ms <= self.store.state().last_instruction_ms {
            return Ok(Applied::Ignored(format!(
                "{} was issued before the last instruction acted on",
                short(&version)
            )));
        }
        if self.store.current().is_some_and(|c| c.version == version) {
            self.store.note_instruction(release.issued_ms)?;
            return Ok(Applied::Ignored(format!(
                "{} already runs",
                short(&version)
            )));
        }
        // Issue 17: the instruction used to count as acted on before the install, so a crash in
        // the middle dropped the release (delivered again, it was "issued before the last
        // instruction"). The install is recorded as begun instead; delivered again after a
        // restart, it is installed again, up to MAX_INSTALL_ATTEMPTS times.
        let attempts = self.store.begin_install(release.issued_ms)?;
        if attempts > crate::fleet::store::MAX_INSTALL_ATTEMPTS {
            self.store.note_instruction(release.issued_ms)?;
            self.store.discard(&version);
            return Err(InstallError::Interrupted {
                version: short(&version).to_owned(),
                attempts: attempts - 1,
            });
        }
        if attempts > 1 {
            tracing::warn!(version = %short(&version), attempts, "fleet: installing again a release whose install was cut short");
        }
        tracing::info!(version = %short(&version), name = %manifest.name, semver = %manifest.version, signer = %key, "fleet: checking a new model version");
        let held = self.store.get(&version).is_some();
        let result = self.install_release(signed, &release, &manifest);
        if result.is_err() && !held {
            self.store.discard(&version);
        }
        // Acted on, whatever the outcome: a retained release delivered again after a reconnect is
        // not checked again.
        self.store.note_instruction(release.issued_ms)?;
        result
    }

    fn install_release(
        &mut self,
        signed: &Signed,
        release: &Release,
        manifest: &ModelManifest,
    ) -> Result<Applied, InstallError> {
        let version = &release.version;
        let record =
            crate::wire::protocol::to_cbor("signed release", signed).map_err(PackageError::from)?;
        let folder = self.store.write_version(
            version,
            &[
                (manifest.model_file.clone(), release.onnx.clone()),
                (
                    "manifest.toml".into(),
                    release.manifest.clone().into_bytes(),
                ),
                ("release.cbor".into(), record),
            ],
        )?;
        // Downloaded and on disk, not swapped in yet (the fault tests stop dead here).
        crate::fsio::crash_point("fleet-install");
        // Read back from disk: what runs is what was checked.
        let manifest_path = folder.join("manifest.toml");
        let on_disk = ModelManifest::load(&manifest_path)
            .map_err(|e| InstallError::Contract(e.to_string()))?;
        on_disk
            .verify_model(&manifest_path)
            .map_err(|e| InstallError::Contract(e.to_string()))?;
        let model_path = on_disk.model_path(&manifest_path);
        self.check_fit(&on_disk)?;
        let segmenter = self.load(&model_path)?;
        self.validate_on_holdout(&segmenter)?;
        let generation = self.swap_in(
            segmenter,
            StoredVersion {
                version: version.clone(),
                label: Some(format!("{} {}", on_disk.name, on_disk.version)),
                model_file: on_disk.model_file.clone(),
                origin: Origin::Release,
                activated_at: 0.0,
            },
        )?;
        self.armed = Some(generation);
        Ok(Applied::Installed {
            version: version.clone(),
            generation,
        })
    }

    /// The model predicts the agent's classes and expects the agent's normalisation.
    fn check_fit(&self, m: &ModelManifest) -> Result<(), InstallError> {
        let names = |c: &[ClassDef]| c.iter().map(|c| c.name.clone()).collect::<Vec<_>>();
        if m.classes.len() != self.slot.classes() {
            return Err(InstallError::Contract(format!(
                "the manifest lists {} classes, the agent segments into {} (a model with other \
                 classes needs a new agent configuration)",
                m.classes.len(),
                self.slot.classes()
            )));
        }
        // Configured class names are compared when the agent has real ones (not "class N").
        let configured = names(&self.shape.classes);
        if !configured.is_empty()
            && !configured.iter().all(|n| n.starts_with("class "))
            && configured != names(&m.classes)
        {
            return Err(InstallError::Contract(format!(
                "classes {:?}, the agent segments into {:?}",
                names(&m.classes),
                configured
            )));
        }
        if m.normalisation != self.shape.normalisation {
            return Err(InstallError::Contract(format!(
                "normalisation mean {} std {}, the pipeline feeds mean {} std {}",
                m.normalisation.mean,
                m.normalisation.std,
                self.shape.normalisation.mean,
                self.shape.normalisation.std
            )));
        }
        Ok(())
    }

    /// Loads (contract check included) and prepares the plan the pipeline will use.
    fn load(&self, path: &std::path::Path) -> Result<Segmenter, InstallError> {
        crate::model::onnx::check_contract(path)
            .map_err(|e| InstallError::Contract(e.to_string()))?;
        let s = Segmenter::load(path).map_err(|e| InstallError::Load(e.to_string()))?;
        if s.classes() != self.slot.classes() {
            return Err(InstallError::Contract(format!(
                "the network predicts {} classes, the agent segments into {}",
                s.classes(),
                self.slot.classes()
            )));
        }
        s.prepare(
            self.shape.batch,
            self.shape.tile,
            self.shape.tile,
            Outputs::Logits,
        )
        .map_err(|e| InstallError::Load(e.to_string()))?;
        Ok(s)
    }

    /// Mean IoU of `s` on the hold-out, against the running model's.
    fn validate_on_holdout(&self, s: &Segmenter) -> Result<(), InstallError> {
        if self.holdout.is_empty() {
            return Err(InstallError::HoldoutUnavailable(
                "no labelled hold-out images on this device to validate a new model on".into(),
            ));
        }
        let running = self.slot.current();
        let new = holdout_mean_iou(s, &self.holdout)?;
        let current = holdout_mean_iou(&running.segmenter, &self.holdout)?;
        let margin = self.settings.holdout_margin;
        tracing::info!(
            new,
            current,
            margin,
            images = self.holdout.len(),
            "fleet: hold-out mean IoU"
        );
        if new < current - margin {
            return Err(InstallError::Holdout {
                new,
                current,
                margin,
                images: self.holdout.len(),
            });
        }
        Ok(())
    }

    /// Records `v` as running, then swaps it in. The store goes first: when its state cannot be
    /// written (a full disk) nothing has changed, the running model stays and the refusal is true;
    /// swapped first, the new model would run while a restart brought back the old one.
    fn swap_in(&mut self, s: Segmenter, v: StoredVersion) -> Result<u64, InstallError> {
        let path = self.store.folder(&v.version).join(&v.model_file);
        let before = self.store.current().cloned();
        let removed = self.store.activate(v)?;
        let generation = match self.slot.swap(s) {
            Ok(g) => g,
            Err(e) => {
                // Not reached in practice (`load` checked the classes); the store follows the slot.
                if let Some(b) = before
                    && let Err(e) = self.store.activate(b)
                {
                    tracing::error!(error = %e, "fleet: cannot record the running version again");
                }
                return Err(InstallError::Swap(e.to_string()));
            }
        };
        for r in removed {
            tracing::info!(version = %short(&r), "fleet: old version removed from the store");
        }
        // The federated-rounds task follows the base model (rounds of another base are ignored, and
        // its feature cache is rebuilt for the new encoder).
        self.base.send_replace(path);
        Ok(generation)
    }

    /// Checks a signed command and carries it out.
    pub fn handle_command(&mut self, signed: &Signed) -> Result<Applied, InstallError> {
        let (cmd, _key): (FleetCommand, _) =
            signed.open_command(&self.settings.fleet, &self.settings.trusted)?;
        if !cmd
            .target
            .includes(&self.settings.device, &self.settings.groups)
        {
            return Ok(Applied::Ignored(format!("command for {}", cmd.target)));
        }
        if cmd.issued_ms <= self.store.state().last_instruction_ms {
            return Ok(Applied::Ignored(
                "command issued before the last instruction acted on".into(),
            ));
        }
        self.store.note_instruction(cmd.issued_ms)?;
        match cmd.order {
            Order::Rollback { version } => {
                self.return_to(&version)
                    .map(|generation| Applied::Installed {
                        version,
                        generation,
                    })
            }
        }
    }

    /// Makes a held version the running one again (no hold-out check: an operator's order, or the
    /// way back from a failing model).
    fn return_to(&mut self, query: &str) -> Result<u64, InstallError> {
        let v = self.store.resolve(query)?.clone();
        if self.store.current().is_some_and(|c| c.version == v.version) {
            return Ok(self.slot.current().generation);
        }
        let segmenter = self.load(&self.store.model_path(&v))?;
        let generation = self.swap_in(segmenter, v)?;
        // A version returned to is not new: no automatic return from it.
        self.armed = None;
        Ok(generation)
    }

    /// Returns to the previous version when the one the fleet installed keeps failing.
    pub fn handle_health(&mut self, h: &RunHealth) {
        let Some(armed) = self.armed else { return };
        if h.generation < armed
            || h.consecutive_failures < self.settings.max_runtime_failures.max(1)
        {
            return;
        }
        let Some(failing) = self.store.current().cloned() else {
            return;
        };
        let Some(previous) = self.store.previous().cloned() else {
            tracing::error!(version = %short(&failing.version), "fleet: the model keeps failing and no earlier version is held");
            self.armed = None;
            return;
        };
        if let Err(e) = self.store.mark_failed(&failing.version) {
            tracing::error!(error = %e, "fleet: cannot record the failed version");
        }
        let why = h.last_error.clone().unwrap_or_default();
        let reason = match self.return_to(&previous.version) {
            Ok(_) => format!(
                "fleet: model {} failed {} images in a row at run time ({why}); returned to {}",
                short(&failing.version),
                h.consecutive_failures,
                short(&previous.version)
            ),
            Err(e) => format!(
                "fleet: model {} fails at run time ({why}) and returning to {} failed: {e}",
                short(&failing.version),
                short(&previous.version)
            ),
        };
        tracing::error!("{reason}");
        self.armed = None;
        self.report(Some(reason));
    }
}

/// Mean IoU over the hold-out images (one confusion matrix over all their pixels).
pub fn holdout_mean_iou(s: &Segmenter, images: &[TrainingImage]) -> Result<f64, InstallError> {
    let mut cm = ConfusionMatrix::new(s.classes())
        .map_err(|e| InstallError::HoldoutUnavailable(e.to_string()))?;
    for img in images {
        let pred = s
            .predict_mask(&img.pixels, img.width, img.height)
            .map_err(|e| InstallError::Load(format!("on hold-out image {}: {e}", img.stem)))?;
        let truth = Mask {
            width: img.width as u32,
            height: img.height as u32,
            data: img.labels.clone(),
        };
        cm.add(&truth, &pred)
            .map_err(|e| InstallError::HoldoutUnavailable(format!("{}: {e}", img.stem)))?;
    }
    cm.mean_iou().ok_or_else(|| {
        InstallError::HoldoutUnavailable("the hold-out images have no labelled pixels".into())
    })
}

enum Event {
    Message { command: bool, bytes: Vec<u8> },
    Health(RunHealth),
}

/// Runs the device's fleet task until `stop` turns true or the link's router stops: reassembles
/// releases from `model/<i>`, reads `command`, follows the slot's health, and applies them on a worker
/// thread that owns `fleet`.
pub async fn run(
    fleet: FleetDevice,
    device: DeviceLink,
    mut inbox: mpsc::Receiver<Message>,
    mut stop: watch::Receiver<bool>,
) {
    let mut health = fleet.slot.health();
    let (tx, rx) = std::sync::mpsc::channel::<Event>();
    let worker = std::thread::Builder::new()
        .name("fleet".into())
        .spawn(move || {
            let mut fleet = fleet;
            while let Ok(ev) = rx.recv() {
                match ev {
                    Event::Message { command, bytes } => fleet.handle_message(command, &bytes),
                    Event::Health(h) => fleet.handle_health(&h),
                }
            }
        });
    if let Err(e) = worker {
        tracing::error!(error = %e, "fleet: cannot start the worker thread; model versions are not received");
        return;
    }
    let command_topic = device.topics.command();
    // One release at a time is being reassembled; a U-Net's ONNX file is tens of MB, so 256 MiB
    // bounds the memory a board spends on it with room to spare.
    let mut reassembler = Reassembler::new(ReassemblyLimits {
        max_message: 256 << 20,
        max_pending: 256 << 20,
        timeout: Duration::from_secs(600),
    });
    loop {
        let ev = tokio::select! {
            _ = stop.changed() => if *stop.borrow() { break } else { continue },
            r = health.changed() => {
                if r.is_err() { break }
                // Clone out of the watch before anything else: its read guard must not be held
                // while the worker swaps (which writes the slot's health).
                let h = health.borrow_and_update().clone();
                Event::Health(h)
            }
            m = inbox.recv() => {
                let Some(Message { topic, payload, .. }) = m else { break };
                // An empty retained payload is the manager clearing a topic.
                if payload.is_empty() {
                    continue;
                }
                if topic == command_topic {
                    Event::Message { command: true, bytes: payload }
                } else if device.topics.device_of("model", &topic).is_some() {
                    match reassembler.push("model", &payload) {
                        Ok(Some(whole)) => Event::Message { command: false, bytes: whole },
                        Ok(None) => continue,
                        Err(e) => {
                            tracing::warn!(%topic, error = %e, "fleet: ignoring a model frame");
                            continue;
                        }
                    }
                } else {
                    continue;
                }
            }
        };
        if tx.send(ev).is_err() {
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::sync::Mutex;

    use super::*;
    use crate::fleet::package::{Target, now_ms};
    use crate::fleet::signing::{Purpose, SecretKey};
    use crate::synth::{OutputFormat, Structure, Style, SynthParams, write_dataset};
    use crate::train::data::TrainingSet;
    use crate::wire::protocol::sha256_hex;

    /// Records every report.
    #[derive(Default)]
    struct Recorder(Mutex<Vec<(Option<String>, Option<String>)>>);
    impl StatusSink for Recorder {
        fn report(&self, version: Option<&str>, error: Option<String>) {
            self.0
                .lock()
                .unwrap()
                .push((version.map(str::to_owned), error));
        }
    }
    impl Recorder {
        fn last_error(&self) -> Option<String> {
            self.0.lock().unwrap().last().and_then(|r| r.1.clone())
        }
    }

    fn grains() -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/grains/model.onnx")
    }

    /// The grains model's weights under another name: a different file (and version), the same
    /// predictions.
    fn grains_reexport(tag: &str) -> Vec<u8> {
        let proto = crate::model::onnx::load(&grains()).unwrap();
        let params = crate::model::onnx::load_params(&proto, &grains()).unwrap();
        let m = crate::model::onnx::export(&params, &vec![("name".into(), tag.into())]).unwrap();
        crate::model::onnx::to_bytes(&m)
    }

    fn random_model(classes: usize, seed: u64) -> Vec<u8> {
        let params = microfed_kernels::unet::Params::init(classes, seed).unwrap();
        let m =
            crate::model::onnx::export(&params, &vec![("name".into(), "random".into())]).unwrap();
        crate::model::onnx::to_bytes(&m)
    }

    fn release(onnx: Vec<u8>, target: Target) -> Release {
        Release {
            fleet: "f".into(),
            version: sha256_hex(&onnx),
            issued_ms: now_ms(),
            target,
            manifest: crate::fleet::package::tests::manifest_for(&onnx),
            onnx,
        }
    }

    struct Rig {
        _dir: tempfile::TempDir,
        fleet: FleetDevice,
        slot: ModelSlot,
        status: Arc<Recorder>,
        base: watch::Receiver<PathBuf>,
        key: SecretKey,
        v0: String,
    }

    fn rig() -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("labelled");
        let params = SynthParams::new(
            Structure::Polycrystal,
            Style::preset("sem-se").unwrap(),
            64,
            64,
            3,
        )
        .unwrap()
        .with_feature_size(16.0)
        .unwrap();
        write_dataset(&params, 4, OutputFormat::Png, &data, None).unwrap();
        let norm = Normalisation::default();
        let set = TrainingSet::load(&[data], None, None, &norm, 0.5, 1).unwrap();
        assert_eq!(set.validation.len(), 2);
        let mut store = Store::open(&dir.path().join("store"), 3).unwrap();
        let v0 = store.adopt(&grains()).unwrap().version.clone();
        let running = store.model_path(store.current().unwrap());
        let slot = ModelSlot::new(Segmenter::load(&running).unwrap());
        let status = Arc::new(Recorder::default());
        let (base_tx, base) = watch::channel(running);
        let key = SecretKey::from_seed([3; 32]);
        let fleet = FleetDevice::new(
            DeviceSettings {
                fleet: "f".into(),
                device: "lab-a".into(),
                groups: vec!["sem".into()],
                trusted: TrustedKeys::parse(&[key.public().to_hex()]).unwrap(),
                holdout_margin: 0.02,
                max_runtime_failures: 3,
            },
            store,
            slot.clone(),
            PipelineShape {
                batch: 1,
                tile: 64,
                normalisation: norm,
                classes: crate::synth::Structure::Polycrystal.classes(),
            },
            set.validation,
            status.clone(),
            base_tx,
        );
        Rig {
            _dir: dir,
            fleet,
            slot,
            status,
            base,
            key,
            v0,
        }
    }

    fn signed(r: &Release, key: &SecretKey) -> Signed {
        Signed::sign(r, Purpose::Release, key).unwrap()
    }

    /// Issue 17: the release counted as acted on before its install, so a crash between download
    /// and swap dropped it (delivered again after the restart, it was "issued before the last
    /// instruction"). Now it is installed again; one that keeps stopping the agent is given up.
    #[test]
    fn a_release_whose_install_was_cut_short_is_installed_after_the_restart() {
        let mut rig = rig();
        let v1 = release(grains_reexport("grains-v1"), Target::All);
        // The first attempt: begun (on disk), then the process dies before the swap.
        rig.fleet.store.begin_install(v1.issued_ms).unwrap();
        let dir = rig._dir.path().join("store");
        let reopened = Store::open(&dir, 3).unwrap();
        assert_eq!(
            reopened.state().installing.map(|i| i.attempts),
            Some(1),
            "the begun install is on disk"
        );
        assert_eq!(reopened.state().last_instruction_ms, 0);
        // After the restart the retained release arrives again: installed.
        match rig.fleet.handle_release(&signed(&v1, &rig.key)).unwrap() {
            Applied::Installed { version, .. } => assert_eq!(version, v1.version),
            other => panic!("expected an install, got {other:?}"),
        }
        assert_eq!(rig.fleet.store().current().unwrap().version, v1.version);
        assert_eq!(rig.fleet.store().state().installing, None);
        assert_eq!(rig.fleet.store().state().last_instruction_ms, v1.issued_ms);
        // Delivered once more: acted on already.
        assert!(matches!(
            rig.fleet.handle_release(&signed(&v1, &rig.key)).unwrap(),
            Applied::Ignored(_)
        ));

        // A release whose install was cut short twice is given up, not tried a third time.
        let v2 = release(grains_reexport("grains-v2"), Target::All);
        rig.fleet.store.begin_install(v2.issued_ms).unwrap();
        rig.fleet.store.begin_install(v2.issued_ms).unwrap();
        let e = rig
            .fleet
            .handle_release(&signed(&v2, &rig.key))
            .unwrap_err();
        assert!(
            matches!(e, InstallError::Interrupted { attempts: 2, .. }),
            "{e}"
        );
        assert_eq!(rig.fleet.store().current().unwrap().version, v1.version);
        assert_eq!(rig.fleet.store().state().installing, None);
        assert!(!rig.fleet.store().folder(&v2.version).exists());
    }

    /// Issue 17: a full disk when the new version is recorded as running. The model used to be
    /// swapped in first: it ran while `fleet.json` still named the old one (a restart brought that
    /// back) and the refusal said "keeping the running model". Now nothing changes, and the release,
    /// delivered again once there is room, is installed.
    #[test]
    fn a_release_that_cannot_be_recorded_leaves_the_running_model_and_installs_once_there_is_room()
    {
        let mut rig = rig();
        let v1 = release(grains_reexport("grains-v1"), Target::All);
        // The install's start is recorded; recording the new version as running fails.
        rig.fleet.store.fill_disk_after(Some(1));
        let e = rig
            .fleet
            .handle_release(&signed(&v1, &rig.key))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("fleet.json") && e.contains("No space left"),
            "{e}"
        );
        assert_eq!(rig.slot.current().generation, 0, "the running model stays");
        assert_eq!(rig.fleet.store().current().unwrap().version, rig.v0);
        assert!(rig.base.borrow().ends_with("model.onnx"));
        assert!(
            !rig.base.has_changed().unwrap(),
            "the rounds follow no new base"
        );
        let on_disk = Store::open(&rig._dir.path().join("store"), 3).unwrap();
        assert_eq!(on_disk.current().unwrap().version, rig.v0);

        // Room again: the retained release, delivered again, is installed.
        rig.fleet.store.fill_disk_after(None);
        match rig.fleet.handle_release(&signed(&v1, &rig.key)).unwrap() {
            Applied::Installed { version, .. } => assert_eq!(version, v1.version),
            other => panic!("expected an install, got {other:?}"),
        }
        assert_eq!(rig.slot.current().generation, 1);
        let on_disk = Store::open(&rig._dir.path().join("store"), 3).unwrap();
        assert_eq!(on_disk.current().unwrap().version, v1.version);
    }

    #[test]
    fn forged_and_worse_models_are_refused_a_good_one_runs_and_rollback_returns() {
        let mut rig = rig();
        let v1 = release(grains_reexport("grains-v1"), Target::All);

        // Forgeries: nothing changes, and the refusal says why.
        let mut tampered = signed(&v1, &rig.key);
        let n = tampered.bytes.len();
        tampered.bytes[n / 2] ^= 0x40;
        let e = rig.fleet.handle_release(&tampered).unwrap_err();
        assert!(e.to_string().contains("bad signature"), "{e}");
        let e = rig
            .fleet
            .handle_release(&Signed::unsigned(&v1).unwrap())
            .unwrap_err();
        assert!(e.to_string().starts_with("unsigned"), "{e}");
        let e = rig
            .fleet
            .handle_release(&signed(&v1, &SecretKey::from_seed([4; 32])))
            .unwrap_err();
        assert!(e.to_string().contains("does not trust"), "{e}");
        assert_eq!(rig.slot.current().generation, 0);
        assert_eq!(rig.fleet.store().state().last_instruction_ms, 0);

        // A random network: far worse on the hold-out than the trained grains model.
        let worse = release(random_model(2, 9), Target::All);
        let e = rig
            .fleet
            .handle_release(&signed(&worse, &rig.key))
            .unwrap_err();
        match &e {
            InstallError::Holdout { new, current, .. } => {
                eprintln!("{e}");
                assert!(
                    *current > 0.5,
                    "grains model on its own kind of image: {current}"
                );
                assert!(new < &(current - 0.02), "{new} vs {current}");
            }
            other => panic!("expected a hold-out refusal, got {other}"),
        }
        assert!(rig.fleet.store().get(&worse.version).is_none());
        assert!(!rig.fleet.store().folder(&worse.version).exists());
        assert_eq!(rig.slot.current().generation, 0);

        // Three classes where the agent segments two: the contract refuses it.
        let three = release(random_model(3, 1), Target::All);
        let e = rig
            .fleet
            .handle_release(&signed(&three, &rig.key))
            .unwrap_err();
        assert!(matches!(e, InstallError::Contract(_)), "{e}");

        // For another device or group: ignored.
        let elsewhere = release(grains_reexport("x"), Target::Group("tem".into()));
        assert!(matches!(
            rig.fleet
                .handle_release(&signed(&elsewhere, &rig.key))
                .unwrap(),
            Applied::Ignored(_)
        ));

        // The same weights under a new version: as good, so it runs.
        let mut v1 = v1;
        v1.issued_ms = now_ms() + 10;
        let s1 = signed(&v1, &rig.key);
        assert_eq!(
            rig.fleet.handle_release(&s1).unwrap(),
            Applied::Installed {
                version: v1.version.clone(),
                generation: 1
            }
        );
        assert_eq!(rig.fleet.store().current().unwrap().version, v1.version);
        assert_eq!(rig.slot.current().generation, 1);
        assert!(rig.base.has_changed().unwrap());
        let base = rig.base.borrow_and_update().clone();
        assert_eq!(sha256_hex(&std::fs::read(&base).unwrap()), v1.version);
        // Delivered again (a reconnect): not acted on twice.
        assert!(matches!(
            rig.fleet.handle_release(&s1).unwrap(),
            Applied::Ignored(_)
        ));

        // Rollback to the configured model by a hash prefix.
        let cmd = FleetCommand {
            fleet: "f".into(),
            issued_ms: v1.issued_ms + 1,
            target: Target::Device("lab-a".into()),
            order: Order::Rollback {
                version: rig.v0[..10].to_owned(),
            },
        };
        let sc = Signed::sign(&cmd, Purpose::Command, &rig.key).unwrap();
        assert!(matches!(
            rig.fleet.handle_command(&sc).unwrap(),
            Applied::Installed { generation: 2, .. }
        ));
        assert_eq!(rig.fleet.store().current().unwrap().version, rig.v0);
        // A release signed as a command is refused; a stale command is ignored.
        assert!(rig.fleet.handle_command(&s1).is_err());
        assert!(matches!(
            rig.fleet.handle_command(&sc).unwrap(),
            Applied::Ignored(_)
        ));
        // Rollback to a version the device does not hold.
        let cmd = FleetCommand {
            fleet: "f".into(),
            issued_ms: cmd.issued_ms + 1,
            target: Target::All,
            order: Order::Rollback {
                version: worse.version.clone(),
            },
        };
        let e = rig
            .fleet
            .handle_command(&Signed::sign(&cmd, Purpose::Command, &rig.key).unwrap())
            .unwrap_err();
        assert!(e.to_string().contains("not held"), "{e}");
        assert_eq!(rig.fleet.store().current().unwrap().version, rig.v0);
    }

    #[test]
    fn a_new_model_that_fails_at_run_time_returns_to_the_previous_one() {
        let mut rig = rig();
        let v1 = release(grains_reexport("grains-v1"), Target::Group("sem".into()));
        let Applied::Installed { generation, .. } =
            rig.fleet.handle_release(&signed(&v1, &rig.key)).unwrap()
        else {
            panic!("not installed")
        };
        let mut health = rig.slot.health();
        // Two failures, a success, two failures: never three in a row.
        for outcome in [Err("x"), Err("x"), Ok(()), Err("x"), Err("x")] {
            rig.slot.record_outcome(generation, outcome);
            let h = health.borrow_and_update().clone();
            rig.fleet.handle_health(&h);
        }
        assert_eq!(rig.fleet.store().current().unwrap().version, v1.version);
        // Failures of the old generation (images in flight during the swap) do not count.
        rig.slot.record_outcome(generation - 1, Err("old"));
        assert_eq!(health.borrow().consecutive_failures, 2);
        rig.slot
            .record_outcome(generation, Err("tract: shape mismatch"));
        let h = health.borrow_and_update().clone();
        rig.fleet.handle_health(&h);
        assert_eq!(rig.fleet.store().current().unwrap().version, rig.v0);
        assert_eq!(rig.fleet.store().state().failed, vec![v1.version.clone()]);
        assert_eq!(rig.slot.current().generation, generation + 1);
        let err = rig.status.last_error().unwrap();
        assert!(
            err.contains("failed 3 images in a row") && err.contains("tract: shape mismatch"),
            "{err}"
        );
        // The model returned to is not armed: its failures do not cause another return.
        for _ in 0..5 {
            rig.slot.record_outcome(generation + 1, Err("y"));
            let h = health.borrow_and_update().clone();
            rig.fleet.handle_health(&h);
        }
        assert_eq!(rig.fleet.store().current().unwrap().version, rig.v0);
    }

    #[test]
    fn messages_are_decoded_from_their_topics_and_refusals_reported() {
        let mut rig = rig();
        let v1 = release(random_model(2, 5), Target::All);
        let bytes =
            package::encode_release("f", &v1.version, &Signed::unsigned(&v1).unwrap()).unwrap();
        rig.fleet.handle_message(false, &bytes);
        let e = rig.status.last_error().unwrap();
        assert!(
            e.starts_with("fleet: model version refused: unsigned"),
            "{e}"
        );
        // A release on the command topic, and garbage.
        rig.fleet.handle_message(true, &bytes);
        assert!(rig.status.last_error().unwrap().contains("wrong topic"));
        rig.fleet.handle_message(false, b"garbage");
        assert!(rig.status.last_error().unwrap().contains("refused"));
        assert_eq!(rig.slot.current().generation, 0);
    }
}
