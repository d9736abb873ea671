//! The agent's side of federated rounds, running beside the segmentation pipeline.
//!
//! [`run`] uses the device's one connection ([`super::device`]), follows the retained global decoder
//! and round announcement, and for each open round it has not
//! yet trained: fine-tunes locally on the trainer thread ([`super::local`]), checks the update (finite,
//! norm within bounds), compresses it (error feedback kept on disk), and puts it in the outbox. The
//! outbox is flushed whenever the link is up; an update for a round that has closed is dropped with a
//! log line, not sent late. Each new global decoder is patched into the running model
//! ([`crate::pipeline::slot::ModelSlot::swap`]), so segmentation uses it from the next image on.
//!
//! Training runs on its own OS thread (it is seconds to minutes of CPU or GPU work) and talks to the
//! async task through channels; a failed round is reported on the status topic and the agent goes on.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};

use microfed_kernels::cpu::CpuBackend;
use microfed_kernels::cuda::CudaBackend;
use microfed_kernels::device::Device;

use super::compress::{self, Residual, TensorSpan};
use super::device::DeviceLink;
use super::link::{BrokerSettings, Message};
use super::local::{FeatureCache, LocalTrainer, RoundPlan};
use super::outbox::{Outbox, OutboxItem};
use super::protocol::{
    self, CHUNK_BYTES, Envelope, GlobalDecoder, Header, Kind, LocalMetrics, Reassembler,
    ReassemblyLimits, RoundAnnouncement, UpdateBody,
};
use crate::micrograph::Normalisation;
use crate::model::onnx;
use crate::model::runtime::{Outputs, Segmenter};
use crate::pipeline::journal::now_unix;
use crate::pipeline::slot::ModelSlot;
use crate::train::data::TrainingSet;

/// `[federation]` in agent.toml.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FederationSection {
    pub fleet: String,
    /// This device's id (MQTT client id; the CN of its certificate).
    pub device: String,
    /// The lab's labelled images (a dataset folder).
    pub labelled: PathBuf,
    /// Fraction of the labelled images kept aside to score each round locally.
    #[serde(default = "default_holdout")]
    pub holdout_fraction: f64,
    /// Feature cache, outbox, error-feedback residual, round state.
    pub state: PathBuf,
    #[serde(default)]
    pub broker: BrokerSettings,
    /// Where local training runs: auto, cpu, cuda.
    #[serde(default = "default_device")]
    pub device_kind: String,
    #[serde(default = "default_batch")]
    pub batch: usize,
    #[serde(default = "default_crop")]
    pub crop: usize,
    #[serde(default)]
    pub seed: u64,
    /// An update with a larger L2 norm is not sent (it would be rejected).
    #[serde(default = "default_max_norm")]
    pub max_update_norm: f32,
    #[serde(default = "default_outbox_items")]
    pub outbox_max_items: usize,
    #[serde(default = "default_outbox_bytes")]
    pub outbox_max_bytes: u64,
    /// Signed base-model versions from the fleet manager (`crate::fleet`); absent: the model changes
    /// only by hand.
    /// (`[federation.fleet_models]`; `fleet` is already the fleet's name.)
    #[serde(default)]
    pub fleet_models: Option<crate::fleet::FleetSection>,
}

fn default_holdout() -> f64 {
    0.2
}
fn default_device() -> String {
    "auto".into()
}
fn default_batch() -> usize {
    4
}
fn default_crop() -> usize {
    128
}
fn default_max_norm() -> f32 {
    1e3
}
fn default_outbox_items() -> usize {
    8
}
fn default_outbox_bytes() -> u64 {
    256 * 1024 * 1024
}

/// Why federation stopped or could not start.
#[derive(Debug, thiserror::Error)]
pub enum ParticipantError {
    #[error("federation: {0}")]
    Setup(String),
    #[error(transparent)]
    Link(#[from] super::link::LinkError),
}

fn setup(e: impl std::fmt::Display) -> ParticipantError {
    ParticipantError::Setup(e.to_string())
}

/// What the trainer thread reports for one round.
struct Trained {
    local: Vec<f32>,
    loss: f32,
    iou_before: Option<f64>,
    iou_after: Option<f64>,
    seconds: f32,
}

struct Job {
    global: Vec<f32>,
    plan: RoundPlan,
    reply: oneshot::Sender<Result<Trained, String>>,
}

enum AnyTrainer {
    Cpu(LocalTrainer<CpuBackend>),
    Cuda(LocalTrainer<CudaBackend>),
}

impl AnyTrainer {
    fn train(&mut self, job: &Job) -> Result<Trained, String> {
        let t0 = std::time::Instant::now();
        macro_rules! go {
            ($t:expr) => {{
                let iou_before = $t.holdout_iou(&job.global).map_err(|e| e.to_string())?;
                let (local, loss) = $t
                    .train_round(&job.global, &job.plan)
                    .map_err(|e| e.to_string())?;
                let iou_after = $t.holdout_iou(&local).map_err(|e| e.to_string())?;
                Ok(Trained {
                    local,
                    loss,
                    iou_before,
                    iou_after,
                    seconds: t0.elapsed().as_secs_f32(),
                })
            }};
        }
        match self {
            Self::Cpu(t) => go!(t),
            Self::Cuda(t) => go!(t),
        }
    }
    fn samples(&self) -> u64 {
        match self {
            Self::Cpu(t) => t.samples(),
            Self::Cuda(t) => t.samples(),
        }
    }
}

/// What the participant needs from the agent.
#[derive(Debug, Clone)]
pub struct AgentModel {
    pub path: PathBuf,
    pub normalisation: Normalisation,
    pub slot: ModelSlot,
    /// Batch and tile of the running pipeline (to prepare a swapped-in model).
    pub batch: usize,
    pub tile: usize,
    /// The base model's file: a new path (a fleet model version swapped in) restarts the participant
    /// on it, with a new feature cache and the rounds of that base model only.
    pub base: watch::Receiver<PathBuf>,
}

/// Persisted between restarts.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
struct ParticipantState {
    model_version: String,
    last_trained_round: u64,
}

/// Takes part in rounds until `stop` turns true, starting again on each new base model.
pub async fn run(
    cfg: FederationSection,
    mut model: AgentModel,
    device: DeviceLink,
    mut inbox: mpsc::Receiver<Message>,
    mut stop: watch::Receiver<bool>,
) -> Result<(), ParticipantError> {
    loop {
        match session(&cfg, &model, &device, &mut inbox, &mut stop).await? {
            Some(path) => {
                tracing::info!(model = %path.display(), "new base model: rebuilding the feature cache");
                model.path = path;
            }
            None => return Ok(()),
        }
    }
}

/// Rounds on one base model; returns the next base model's path when it changes, None on stop.
async fn session(
    cfg: &FederationSection,
    model: &AgentModel,
    device: &DeviceLink,
    inbox: &mut mpsc::Receiver<Message>,
    stop: &mut watch::Receiver<bool>,
) -> Result<Option<PathBuf>, ParticipantError> {
    let mut base = model.base.clone();
    base.mark_unchanged();
    let topics = device.topics.clone();
    if !protocol::valid_level(&cfg.device) {
        return Err(setup(format!(
            "device id {:?} is not a valid MQTT topic level",
            cfg.device
        )));
    }
    std::fs::create_dir_all(&cfg.state)
        .map_err(|e| setup(format!("{}: {e}", cfg.state.display())))?;

    // Load everything heavy on a blocking thread: base model, labelled data, feature cache.
    let (c2, m2) = (cfg.clone(), model.clone());
    let prepared = tokio::task::spawn_blocking(move || prepare(&c2, &m2))
        .await
        .map_err(setup)??;
    let Prepared {
        trainer,
        proto,
        model_version,
        layout,
        samples,
    } = prepared;
    let (job_tx, job_rx) = std::sync::mpsc::channel::<Job>();
    std::thread::Builder::new()
        .name("local-training".into())
        .spawn(move || {
            let mut trainer = trainer;
            while let Ok(job) = job_rx.recv() {
                let r = trainer.train(&job);
                let _ = job.reply.send(r);
            }
        })
        .map_err(setup)?;

    let state_path = cfg.state.join("participant.json");
    let mut pstate: ParticipantState = std::fs::read(&state_path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    let new_base = pstate.model_version != model_version;
    if new_base {
        // A new base model: rounds of the old one mean nothing.
        pstate = ParticipantState {
            model_version: model_version.clone(),
            last_trained_round: 0,
        };
    }
    let mut outbox = Outbox::open(
        &cfg.state.join("outbox"),
        cfg.outbox_max_items,
        cfg.outbox_max_bytes,
    )
    .map_err(setup)?;
    let residual_path = cfg.state.join("residual.bin");
    let mut residual = if new_base {
        // Error feedback of another decoder (maybe another class count) is meaningless here.
        Residual::new(layout.iter().map(|t| t.len).sum())
    } else {
        Residual::load(&residual_path, layout.iter().map(|t| t.len).sum()).map_err(setup)?
    };

    let link = device.link.clone();
    let board = device.status.clone();
    board.update(|st| {
        st.model_version = model_version.clone();
        st.last_round = (pstate.last_trained_round > 0).then_some(pstate.last_trained_round);
        st.queue_depth = outbox.len() as u64;
    });
    let mut reassembler = Reassembler::new(ReassemblyLimits::default());
    let mut global: Option<(u64, Vec<f32>)> = None;
    let mut announced: Option<RoundAnnouncement> = None;
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    let decoder_len: usize = layout.iter().map(|t| t.len).sum();
    let header = |round: u64| Header {
        fleet: &cfg.fleet,
        round,
        model_version: &model_version,
        sender: &cfg.device,
    };

    loop {
        tokio::select! {
            _ = stop.changed() => { if *stop.borrow() { break; } }
            r = base.changed() => {
                if r.is_ok() {
                    let next = base.borrow_and_update().clone();
                    if next != model.path {
                        return Ok(Some(next));
                    }
                }
            }
            _ = tick.tick() => {}
            m = inbox.recv() => {
                let Some(Message { topic, payload, .. }) = m else { break };
                if topic == topics.round() {
                    match Envelope::from_bytes(&payload, protocol::MAX_PACKET_BYTES)
                        .and_then(|e| check_env(e, &cfg.fleet, &model_version))
                        .and_then(|e| e.body::<RoundAnnouncement>(Kind::RoundAnnouncement))
                    {
                        Ok(a) => {
                            if a.closed {
                                let dropped = outbox.drop_where(|e| e.round <= a.round).unwrap_or_else(|e| {
                                    tracing::error!(error = %e, "cannot drop closed rounds from the outbox");
                                    Vec::new()
                                });
                                for d in dropped {
                                    tracing::warn!(round = d.round, "round closed before the update was delivered; dropping it");
                                }
                            }
                            announced = Some(a);
                        }
                        Err(e) => tracing::warn!(%topic, error = %e, "ignoring a round announcement"),
                    }
                } else if topics.device_of("global", &topic).is_some() {
                    match reassembler.push("global", &payload) {
                        Ok(Some(whole)) => match Envelope::from_bytes(&whole, usize::MAX)
                            .and_then(|e| check_env(e, &cfg.fleet, &model_version))
                            .and_then(|e| e.body::<GlobalDecoder>(Kind::GlobalDecoder))
                            .and_then(|g| Ok((g.version, g.decoder(decoder_len)?)))
                        {
                            Ok((version, values)) => {
                                if global.as_ref().is_none_or(|(v, _)| version > *v) {
                                    if version > 0 {
                                        swap_in(&proto, &layout, &values, version, model).await;
                                    }
                                    board.update(|st| st.global_version = version);
                                    global = Some((version, values));
                                }
                            }
                            Err(e) => tracing::warn!(error = %e, "ignoring a global decoder"),
                        },
                        Ok(None) => {}
                        Err(e) => tracing::warn!(%topic, error = %e, "ignoring a global decoder frame"),
                    }
                }
            }
        }

        // A round to train?
        if let (Some(a), Some((gv, g))) = (&announced, &global)
            && !a.closed
            && a.round > pstate.last_trained_round
            && a.global_version == *gv
            && now_unix() < a.deadline_unix
        {
            if protocol::sha256_hex(&protocol::f32_bytes(g)) != a.global_digest {
                tracing::warn!(
                    round = a.round,
                    "global decoder digest differs from the announcement; waiting"
                );
            } else {
                let plan = RoundPlan {
                    round: a.round,
                    epochs: a.local_epochs,
                    steps_per_epoch: a.steps_per_epoch,
                    learning_rate: a.learning_rate,
                    prox_mu: a.prox_mu,
                };
                tracing::info!(round = a.round, global_version = gv, "training locally");
                let (tx, rx) = oneshot::channel();
                let _ = job_tx.send(Job {
                    global: g.clone(),
                    plan,
                    reply: tx,
                });
                let trained = rx.await.map_err(|_| setup("the training thread stopped"))?;
                pstate.last_trained_round = a.round;
                save_state(&state_path, &pstate);
                let last_error = match trained.and_then(|t| {
                    make_update(
                        cfg,
                        &layout,
                        &a.compression,
                        &mut residual,
                        g,
                        *gv,
                        &t,
                        samples,
                        &header(a.round),
                    )
                }) {
                    Ok(bytes) => {
                        if let Err(e) = residual.save(&residual_path) {
                            tracing::warn!(error = %e, "cannot save the error-feedback residual");
                        }
                        let item = OutboxItem {
                            topic: topics.update(&cfg.device),
                            round: a.round,
                            model_version: model_version.clone(),
                            payload: bytes,
                        };
                        match outbox.push(item) {
                            Ok(evicted) => {
                                for e in evicted {
                                    tracing::warn!(
                                        round = e.round,
                                        "outbox full: dropped the oldest update"
                                    );
                                }
                            }
                            Err(e) => {
                                tracing::error!(error = %e, "cannot store the update in the outbox")
                            }
                        }
                        None
                    }
                    Err(e) => {
                        tracing::error!(round = a.round, error = %e, "round failed locally");
                        Some(e)
                    }
                };
                let (lr, le, q) = (pstate.last_trained_round, last_error, outbox.len() as u64);
                board.update(|st| {
                    st.last_round = Some(lr);
                    // Only a failure is reported: a good round must not erase a fleet refusal.
                    if le.is_some() {
                        st.last_error = le;
                    }
                    st.queue_depth = q;
                });
            }
        }

        // Send what waits, oldest first, while the round it belongs to is open.
        if link.is_connected() && !outbox.is_empty() {
            let open_round = announced.as_ref().filter(|a| !a.closed).map(|a| a.round);
            let stale = outbox
                .drop_where(|e| {
                    e.model_version != model_version || open_round.is_some_and(|r| e.round < r)
                })
                .unwrap_or_else(|e| {
                    tracing::error!(error = %e, "cannot drop stale updates from the outbox");
                    Vec::new()
                });
            for e in stale {
                tracing::warn!(
                    round = e.round,
                    "update for a closed round or an old model: dropped, not sent late"
                );
            }
            let pending: Vec<_> = outbox.pending().to_vec();
            for entry in pending {
                let item = match outbox.load(entry.id) {
                    Ok(i) => i,
                    Err(e) => {
                        tracing::error!(error = %e, "unreadable outbox entry: dropping it");
                        outbox.remove(entry.id).ok();
                        continue;
                    }
                };
                let frames = match protocol::split(&item.payload, CHUNK_BYTES) {
                    Ok(f) => f,
                    Err(e) => {
                        tracing::error!(error = %e, "cannot frame an update");
                        continue;
                    }
                };
                let n = item.payload.len();
                match link
                    .publish_frames(|_| item.topic.clone(), frames, false)
                    .await
                {
                    Ok(()) => {
                        tracing::info!(round = item.round, bytes = n, "update delivered");
                        outbox.remove(entry.id).ok();
                        let q = outbox.len() as u64;
                        board.update(|st| st.queue_depth = q);
                    }
                    Err(e) => {
                        tracing::warn!(round = item.round, error = %e, "update not delivered; kept in the outbox");
                        break;
                    }
                }
            }
        }
    }
    Ok(None)
}

fn check_env(
    e: Envelope,
    fleet: &str,
    model_version: &str,
) -> Result<Envelope, protocol::ProtocolError> {
    if e.fleet != fleet || e.model_version != model_version {
        return Err(protocol::ProtocolError::Malformed {
            what: "envelope",
            message: format!(
                "for fleet {} and base model {}, this agent runs fleet {fleet} with base model {}",
                e.fleet,
                &e.model_version[..e.model_version.len().min(12)],
                &model_version[..model_version.len().min(12)]
            ),
        });
    }
    Ok(e)
}

fn save_state(path: &std::path::Path, s: &ParticipantState) {
    if let Ok(b) = serde_json::to_vec(s)
        && let Err(e) = crate::pipeline::outputs::write_atomic(path, &b)
    {
        tracing::warn!(error = %e, "cannot save the participant state");
    }
}

#[allow(clippy::too_many_arguments)]
fn make_update(
    cfg: &FederationSection,
    layout: &[TensorSpan],
    compression: &compress::CompressionConfig,
    residual: &mut Residual,
    global: &[f32],
    global_version: u64,
    t: &Trained,
    samples: u64,
    header: &Header<'_>,
) -> Result<Vec<u8>, String> {
    let update: Vec<f32> = t.local.iter().zip(global).map(|(l, g)| l - g).collect();
    if update.iter().any(|v| !v.is_finite()) {
        return Err("the local update is not finite; not sent".into());
    }
    let norm = update
        .iter()
        .map(|v| f64::from(*v).powi(2))
        .sum::<f64>()
        .sqrt() as f32;
    if norm > cfg.max_update_norm {
        return Err(format!(
            "the local update's norm {norm:.3e} is above max_update_norm {}; not sent",
            cfg.max_update_norm
        ));
    }
    let compressed = compress::compress(
        &update,
        layout,
        compression,
        compression.error_feedback.then_some(residual),
    )
    .map_err(|e| e.to_string())?;
    tracing::info!(
        round = header.round,
        loss = t.loss,
        holdout_iou_before = ?t.iou_before,
        holdout_iou_after = ?t.iou_after,
        seconds = t.seconds,
        bytes = compressed.len(),
        dense_bytes = compress::dense_len(layout),
        "local round done"
    );
    let body = UpdateBody {
        device: cfg.device.clone(),
        global_version,
        samples,
        metrics: LocalMetrics {
            train_loss: t.loss,
            holdout_mean_iou: t.iou_after.map(|v| v as f32),
            holdout_mean_iou_before: t.iou_before.map(|v| v as f32),
            seconds: t.seconds,
        },
        compressed,
        norm,
    };
    Envelope::seal(Kind::Update, header, &body)
        .and_then(|e| e.to_bytes())
        .map_err(|e| e.to_string())
}

/// Patches the new global decoder into the base model and swaps it into the pipeline.
async fn swap_in(
    proto: &Arc<tract_onnx::pb::ModelProto>,
    layout: &[TensorSpan],
    values: &[f32],
    version: u64,
    model: &AgentModel,
) {
    let (proto, layout, values, model) = (
        proto.clone(),
        layout.to_vec(),
        values.to_vec(),
        model.clone(),
    );
    let r = tokio::task::spawn_blocking(move || -> Result<u64, String> {
        let mut p = (*proto).clone();
        let mut at = 0;
        let weights: Vec<(String, Vec<f32>)> = layout
            .iter()
            .map(|t| {
                let v = values[at..at + t.len].to_vec();
                at += t.len;
                (t.name.clone(), v)
            })
            .collect();
        onnx::patch_initializers(&mut p, &weights).map_err(|e| e.to_string())?;
        let label = model.path.with_extension(format!("global-{version}.onnx"));
        let seg = Segmenter::from_proto(&p, &label).map_err(|e| e.to_string())?;
        seg.prepare(model.batch, model.tile, model.tile, Outputs::Logits)
            .map_err(|e| e.to_string())?;
        model.slot.swap(seg).map_err(|e| e.to_string())
    })
    .await;
    match r {
        Ok(Ok(generation)) => tracing::info!(
            version,
            generation,
            "global decoder swapped into the running model"
        ),
        Ok(Err(e)) => {
            tracing::error!(version, error = %e, "cannot swap the global decoder in; keeping the running model")
        }
        Err(_) => tracing::error!("the swap task stopped"),
    }
}

struct Prepared {
    trainer: AnyTrainer,
    proto: Arc<tract_onnx::pb::ModelProto>,
    model_version: String,
    layout: Vec<TensorSpan>,
    samples: u64,
}

fn prepare(cfg: &FederationSection, model: &AgentModel) -> Result<Prepared, ParticipantError> {
    let model_version = crate::model::manifest::sha256_file(&model.path).map_err(setup)?;
    let proto = onnx::load(&model.path).map_err(setup)?;
    let params = onnx::load_params(&proto, &model.path).map_err(setup)?;
    let layout = compress::decoder_layout(params.classes);
    let set = TrainingSet::load(
        std::slice::from_ref(&cfg.labelled),
        None,
        None,
        &model.normalisation,
        cfg.holdout_fraction,
        cfg.seed,
    )
    .map_err(setup)?;
    if set.classes.len() != params.classes {
        return Err(setup(format!(
            "{}: {} classes, the model {} predicts {}",
            cfg.labelled.display(),
            set.classes.len(),
            model.path.display(),
            params.classes
        )));
    }
    let segmenter = Segmenter::load(&model.path).map_err(setup)?;
    let t0 = std::time::Instant::now();
    let cache = FeatureCache::build(
        &segmenter,
        &set,
        &cfg.state.join("features"),
        &model_version,
    )
    .map_err(setup)?;
    tracing::info!(
        train = cache.train.len(),
        holdout = cache.holdout.len(),
        computed = cache.computed,
        seconds = t0.elapsed().as_secs_f64(),
        "encoder features ready"
    );
    let samples = cache.samples();
    let device = Device::parse(&cfg.device_kind).map_err(setup)?;
    let trainer = match device {
        Device::Cpu => AnyTrainer::Cpu(
            LocalTrainer::new(
                Arc::new(CpuBackend::new()),
                &params,
                cache,
                cfg.batch,
                cfg.crop,
                cfg.seed,
            )
            .map_err(setup)?,
        ),
        Device::Cuda(n) => AnyTrainer::Cuda(
            LocalTrainer::new(
                Arc::new(CudaBackend::new(n).map_err(setup)?),
                &params,
                cache,
                cfg.batch,
                cfg.crop,
                cfg.seed,
            )
            .map_err(setup)?,
        ),
    };
    let _ = trainer.samples();
    Ok(Prepared {
        trainer,
        proto: Arc::new(proto),
        model_version,
        layout,
        samples,
    })
}
