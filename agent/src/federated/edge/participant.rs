//! The agent's side of federated rounds, running beside the segmentation pipeline.
//!
//! [`run`] uses the device's one connection ([`crate::wire::device`]), follows the retained global decoder
//! and round announcement, and for each open round it has not
//! yet trained: fine-tunes locally on the trainer thread ([`crate::federated::edge::local`]), checks the update (finite,
//! norm within bounds), compresses it (error feedback kept on disk), and puts it in the outbox. The
//! outbox is flushed whenever the link is up; an update for a round that has closed is dropped with a
//! log line, not sent late. Each new global decoder is patched into the running model
//! ([`crate::pipeline::slot::ModelSlot::swap`]), so segmentation uses it from the next image on.
//!
//! Training runs on its own OS thread (it is seconds to minutes of CPU or GPU work) and talks to the
//! async task through channels; a failed round is reported on the status topic and the agent goes on.
//!
//! Style codes (`[federation.style]`, [`crate::federated::edge::style`]): once the feature cache is built, the agent
//! computes its lab's code (nothing below `min_images` training images) and publishes it retained on
//! `style/<device>`, again only when the base model, the labelled data or the style settings
//! change. The labelled folder's fingerprint is checked at each round start and every
//! [`DATA_CHECK`]: a change reloads the data (a new session on the same base model, rounds and
//! global decoder carried over). Other devices' codes go into a [`StyleBook`]; refused ones are
//! counted on the status board. Before each round, the trainer gets the codes of the current base
//! model, so local batches are re-styled.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};

use crate::federated::compress::{self, Residual, TensorSpan};
use crate::federated::edge::cache::FeatureCache;
use crate::federated::edge::local::{LocalError, LocalOptimizer, RoundPlan};
use crate::federated::edge::outbox::{Outbox, OutboxItem};
use crate::federated::edge::persisted::Persisted;
use crate::federated::edge::round::{self, Action, Event, Rounds, TrainOrder};
pub use crate::federated::edge::secure::SecureAggSection;
use crate::federated::edge::secure::{SecureOut, SecureParticipant};
use crate::federated::edge::style::{
    Received, RestyleConfig, StyleBook, StyleCode, StyleError, StyleSection,
};
use crate::federated::edge::trainer::{
    ScoreOutcome, Trained, TrainerError, TrainerSetup, TrainingThread,
};
use crate::federated::secagg::ServerMessage;
use crate::fsio::now_unix;
use crate::micrograph::Normalisation;
use crate::model::onnx;
use crate::model::runtime::{Outputs, Segmenter};
use crate::pipeline::slot::ModelSlot;
use crate::train::data::TrainingSet;
use crate::wire::device::DeviceLink;
use crate::wire::link::{BrokerSettings, Message};
use crate::wire::protocol::{
    self, CHUNK_BYTES, Envelope, GlobalDecoder, Header, Kind, LocalMetrics, Reassembler,
    ReassemblyLimits, RoundAnnouncement, UpdateBody,
};

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
    /// Weight of the soft-Dice term of the local loss (0.5: the base models' objective, as
    /// `microfed experiment` trains; 0 = class-weighted cross-entropy alone).
    #[serde(default = "default_dice_weight")]
    pub dice_weight: f32,
    /// Class-weighted cross-entropy (inverse √frequency), as the base models were trained.
    #[serde(default = "default_class_weighted")]
    pub class_weighted: bool,
    #[serde(default)]
    pub seed: u64,
    /// An update with a larger L2 norm is not sent (it would be rejected).
    #[serde(default = "default_max_norm")]
    pub max_update_norm: f32,
    #[serde(default = "default_outbox_items")]
    pub outbox_max_items: usize,
    #[serde(default = "default_outbox_bytes")]
    pub outbox_max_bytes: u64,
    /// Style codes (`[federation.style]`); absent: none published, none used.
    #[serde(default)]
    pub style: Option<StyleSection>,
    /// The aggregator's Ed25519 public key (64 hex digits; its `signing_key`'s public half). When
    /// set, globals and round announcements are taken only with its signature, checked before
    /// their bodies are read. Unset: taken unsigned (a warning at start).
    #[serde(default)]
    pub aggregator_key: Option<String>,
    /// Largest L2 distance of a new global decoder from the current one; a global further away is
    /// not installed (it is a forgery or a broken aggregator). Default 100 (10 × the aggregator's
    /// default update bound).
    #[serde(default = "default_max_global_step")]
    pub max_global_step: f32,
    /// The hold-out gate: a new global whose hold-out mean IoU is below the running decoder's by
    /// more than this is not swapped into production segmentation (local training still starts
    /// from it). 0..=1; 1 turns the gate off. No hold-out images (`holdout_fraction` 0, or too few
    /// labelled images): no gate.
    #[serde(default = "default_holdout_margin")]
    pub holdout_margin: f64,
    /// `[federation.personalise]`: each new global is also fine-tuned on the lab's own images
    /// (what a lab would deploy); the better of the two on the hold-out is gated into production.
    /// Needs hold-out images. Absent: the global alone.
    #[serde(default)]
    pub personalise: Option<PersonaliseSection>,
    /// `[federation.secure_aggregation]`: take part only through secure aggregation (the update
    /// never leaves the lab in the clear; the aggregator must run `[secure_aggregation]` too).
    #[serde(default)]
    pub secure_aggregation: Option<SecureAggSection>,
}

impl FederationSection {
    /// Checks what can be checked without the disk (today: `[federation.style]`).
    pub fn validate(&self) -> Result<(), StyleError> {
        match &self.style {
            Some(s) => s.validate(),
            None => Ok(()),
        }
    }

    /// Checks `holdout_margin` (a fraction of IoU: 0..=1).
    pub fn validate_margin(&self) -> Result<(), String> {
        if !(0.0..=1.0).contains(&self.holdout_margin) {
            return Err(format!(
                "{} is not within 0..=1 (a fraction of mean IoU; 1 turns the gate off)",
                self.holdout_margin
            ));
        }
        Ok(())
    }

    /// Checks `[federation.personalise]`, when present.
    pub fn validate_personalise(&self) -> Result<(), String> {
        self.personalise.as_ref().map_or(Ok(()), |p| p.validate())
    }
}

/// `[federation.personalise]`: how a new global is fine-tuned on the lab's own images before it
/// may go live. The defaults are the recipe measured in docs/results.md ("What a lab would
/// deploy": 240 steps of AdamW at 1e-3 beat local-only training for every lab, 5 seeds).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PersonaliseSection {
    /// Batches of `batch` crops; at most [`PersonaliseSection::MAX_STEPS`].
    #[serde(default = "default_personalise_steps")]
    pub steps: u32,
    #[serde(default = "default_personalise_rate")]
    pub learning_rate: f32,
    #[serde(default = "default_personalise_optimizer")]
    pub optimizer: LocalOptimizer,
}

impl PersonaliseSection {
    pub const MAX_STEPS: u32 = 100_000;

    /// Checks the steps and the rate.
    pub fn validate(&self) -> Result<(), String> {
        if !(1..=Self::MAX_STEPS).contains(&self.steps) {
            return Err(format!(
                "steps = {} is not within 1..={}",
                self.steps,
                Self::MAX_STEPS
            ));
        }
        if !(self.learning_rate.is_finite()
            && self.learning_rate > 0.0
            && self.learning_rate <= 1.0)
        {
            return Err(format!(
                "learning_rate = {} is not within (0, 1]",
                self.learning_rate
            ));
        }
        Ok(())
    }

    /// The fine-tune of global `version` as a plan for the trainer (one epoch of `steps`; its
    /// crops are drawn from a stream of their own, not the rounds').
    pub fn plan(&self, version: u64) -> RoundPlan {
        RoundPlan {
            round: version | (1 << 63),
            epochs: 1,
            steps_per_epoch: self.steps,
            learning_rate: self.learning_rate,
            prox_mu: 0.0,
            optimizer: self.optimizer,
        }
    }
}

fn default_personalise_steps() -> u32 {
    240
}
fn default_personalise_rate() -> f32 {
    1e-3
}
fn default_personalise_optimizer() -> LocalOptimizer {
    LocalOptimizer::Adam
}

/// How often the labelled folder's fingerprint is checked between rounds. A change must be seen
/// twice in a row (files may still be arriving) before the data are reloaded.
pub const DATA_CHECK: Duration = Duration::from_secs(3);

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
fn default_dice_weight() -> f32 {
    0.5
}
fn default_class_weighted() -> bool {
    true
}
fn default_max_norm() -> f32 {
    10.0
}
fn default_max_global_step() -> f32 {
    100.0
}
fn default_holdout_margin() -> f64 {
    0.02
}
fn default_outbox_items() -> usize {
    8
}
fn default_outbox_bytes() -> u64 {
    256 * 1024 * 1024
}

/// Why federation stopped or could not start; each names the file, setting or part concerned.
#[derive(Debug, thiserror::Error)]
pub enum ParticipantError {
    #[error("[federation.style]: {0}")]
    Style(#[from] StyleError),
    #[error("federation: fleet {0}")]
    FleetName(String),
    #[error("federation: device id {0:?} is not a valid MQTT topic level")]
    DeviceId(String),
    #[error("federation: aggregator_key: {0}")]
    AggregatorKey(crate::wire::signing::SigningError),
    #[error("federation: {0}")]
    SecureAggregation(String),
    #[error("federation: {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("federation: the base model: {0}")]
    Manifest(#[from] crate::model::manifest::ManifestError),
    #[error("federation: the base model: {0}")]
    Onnx(#[from] crate::model::onnx::OnnxError),
    #[error("federation: the base model: {0}")]
    Runtime(#[from] crate::model::runtime::RuntimeError),
    #[error("federation: the labelled images: {0}")]
    Labelled(#[from] crate::train::TrainError),
    #[error("federation: {labelled}: {classes} classes, the model {model} predicts {predicts}")]
    ClassCount {
        labelled: PathBuf,
        classes: usize,
        model: PathBuf,
        predicts: usize,
    },
    #[error("federation: the feature cache: {0}")]
    Cache(#[from] crate::federated::edge::cache::CacheError),
    #[error("federation: local training: {0}")]
    Trainer(#[from] TrainerError),
    #[error("federation: the outbox: {0}")]
    Outbox(#[from] crate::federated::edge::outbox::OutboxError),
    #[error("federation: the error-feedback residual: {0}")]
    Residual(#[from] compress::CompressError),
    #[error("federation: {0}")]
    Protocol(#[from] protocol::ProtocolError),
    #[error("federation: the training thread stopped")]
    TrainerStopped,
    #[error("federation: a blocking task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
    #[error(transparent)]
    Link(#[from] crate::wire::link::LinkError),
}

/// Why one round's update was not made (reported on the status board; the agent goes on).
#[derive(Debug, thiserror::Error)]
pub enum RoundError {
    #[error(transparent)]
    Local(#[from] LocalError),
    #[error("the local update is not finite; not sent")]
    NotFinite,
    #[error("the local update's norm {norm:.3e} is above max_update_norm {max}; not sent")]
    Norm { norm: f32, max: f32 },
    #[error(transparent)]
    Compress(#[from] compress::CompressError),
    #[error(transparent)]
    Protocol(#[from] protocol::ProtocolError),
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

impl AgentModel {
    /// What the participant needs from a running agent: its model file, normalisation, model slot and
    /// pipeline shape; `base` announces a new base model file (from the fleet task, if any).
    pub fn of(
        agent: &crate::pipeline::Agent,
        path: PathBuf,
        base: watch::Receiver<PathBuf>,
    ) -> Self {
        let settings = agent.settings();
        Self {
            path,
            normalisation: settings.info.normalisation,
            slot: agent.model_slot(),
            batch: settings.batch,
            tile: settings.tile,
            base,
        }
    }
}

/// Persisted between restarts.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
struct ParticipantState {
    model_version: String,
    last_trained_round: u64,
}

/// Why a session ended.
enum Next {
    /// A new base model (its path).
    Base(PathBuf),
    /// The labelled data changed: same base model, data reloaded.
    Data,
    Stop,
}

/// What outlives a session: retained messages arrive once per subscription, not once per session.
struct Carried {
    book: StyleBook,
    /// Key ([`style_key`]) of the code this process last published; None: none (or withdrawn).
    published: Option<String>,
    /// Announcements, the global decoder, the round in training.
    rounds: Rounds,
}

/// Takes part in rounds until `stop` turns true, starting again on each new base model and when the
/// labelled data change.
pub async fn run(
    cfg: FederationSection,
    mut model: AgentModel,
    device: DeviceLink,
    mut inbox: mpsc::Receiver<Message>,
    mut stop: watch::Receiver<bool>,
) -> Result<(), ParticipantError> {
    cfg.validate()?;
    let mut carried = Carried {
        book: StyleBook::new(&cfg.fleet, &cfg.device).map_err(ParticipantError::FleetName)?,
        published: None,
        rounds: Rounds::default(),
    };
    let mut reloading = false;
    loop {
        match session(&cfg, &model, &device, &mut inbox, &mut stop, &mut carried).await {
            Ok(Next::Base(path)) => {
                tracing::info!(model = %path.display(), "new base model: rebuilding the feature cache");
                model.path = path;
                carried.rounds.new_base_model();
                reloading = false;
            }
            Ok(Next::Data) => {
                tracing::info!(labelled = %cfg.labelled.display(), "labelled data changed: reloading them");
                reloading = true;
            }
            Ok(Next::Stop) => return Ok(()),
            // A folder being edited may be half-copied (an image without its mask): try again soon
            // rather than stop taking part.
            Err(e) if reloading => {
                tracing::error!(error = %e, "cannot reload the labelled data; trying again");
                tokio::select! {
                    _ = tokio::time::sleep(DATA_CHECK) => {}
                    r = stop.changed() => if r.is_err() || *stop.borrow() { return Ok(()) },
                }
            }
            Err(e) => return Err(e),
        }
    }
}

/// A round being trained on the training thread.
struct InTraining {
    order: TrainOrder,
    /// The decoder it started from (the update is local − this).
    global: Vec<f32>,
    reply: oneshot::Receiver<Result<Trained, LocalError>>,
}

/// A hold-out score asked of the training thread ([`Action::Score`]).
struct InScoring {
    version: u64,
    reply: oneshot::Receiver<Result<ScoreOutcome, LocalError>>,
}

/// Resolves when the training thread answers a score; pends forever when none is asked.
async fn scoring_done(t: &mut Option<InScoring>) -> Event {
    let Some(s) = t else {
        return std::future::pending().await;
    };
    let result = match (&mut s.reply).await {
        Ok(Ok(out)) => match out.scores[..] {
            [live, candidate] => {
                let personalised = out.personalised.map(|(p, seconds)| {
                    tracing::info!(
                        version = s.version,
                        global = ?candidate,
                        personalised = ?p.score,
                        live = ?live,
                        seconds,
                        "personalised the new global on the lab's images (hold-out mean IoU)"
                    );
                    p
                });
                Ok(round::Scores {
                    candidate,
                    live,
                    personalised,
                })
            }
            _ => Err(format!("{} scores for 2 decoders", out.scores.len())),
        },
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("the training thread stopped".into()),
    };
    Event::Scored {
        version: s.version,
        result,
    }
}

/// Resolves when the training thread answers; pends forever when nothing trains.
async fn training_done(
    t: &mut Option<InTraining>,
) -> Result<Result<Trained, LocalError>, oneshot::error::RecvError> {
    match t {
        Some(t) => (&mut t.reply).await,
        None => std::future::pending().await,
    }
}

/// One base model and one state of the labelled data: everything the loop below owns.
struct Session<'a> {
    cfg: &'a FederationSection,
    device: &'a DeviceLink,
    prepared: Prepared,
    /// The last trained round, saved after each round. Should a save fail (a full disk) and the
    /// agent restart before a retry succeeds, it may train that round again: the aggregator counts
    /// one update per device and round.
    state_file: Persisted,
    pstate: ParticipantState,
    outbox: Outbox,
    /// Updates the outbox could not store (a full disk): kept in memory, oldest first, and stored
    /// again before each flush; at most `outbox_max_items`.
    unstored: Vec<OutboxItem>,
    /// The last store failed (logged once, not at every retry).
    store_failing: bool,
    /// The error-feedback residual, saved after each update. Should a save fail and the agent
    /// restart before a retry succeeds, it starts from the last saved residual: no update is lost,
    /// only the mass carried since.
    residual_file: Persisted,
    residual: Residual,
    /// This lab's style code as computed (`style-code.json`), so a restart publishes the same code.
    /// Should its save fail, a restart computes a new one, which replaces this one everywhere.
    style_file: Persisted,
    pending_code: Option<PendingCode>,
    /// The style-book generation the trainer last got (None: give the codes again).
    styles_given: Option<u64>,
    /// Secure rounds (`[federation.secure_aggregation]`), and what they have to send.
    secure: Option<SecureParticipant>,
    secure_out: Vec<SecureOut>,
}

/// Rounds on one base model and one state of the labelled data: set up, then the I/O loop that feeds
/// [`Rounds`] and carries out its actions.
async fn session(
    cfg: &FederationSection,
    model: &AgentModel,
    device: &DeviceLink,
    inbox: &mut mpsc::Receiver<Message>,
    stop: &mut watch::Receiver<bool>,
    carried: &mut Carried,
) -> Result<Next, ParticipantError> {
    let mut base = model.base.clone();
    // A base model announced while the previous session was ending is not lost.
    let current = base.borrow_and_update().clone();
    if current != model.path {
        return Ok(Next::Base(current));
    }
    let aggregator_key = cfg
        .aggregator_key
        .as_deref()
        .map(crate::wire::signing::PublicKey::parse)
        .transpose()
        .map_err(ParticipantError::AggregatorKey)?;
    if aggregator_key.is_none() {
        tracing::warn!(
            "no [federation] aggregator_key: globals and round announcements are taken unsigned"
        );
    }
    let authentic = |e: Envelope| match &aggregator_key {
        Some(k) => e.verify(k).map(|()| e),
        None => Ok(e),
    };
    let mut s = Session::open(cfg, model, device, carried).await?;
    let topics = device.topics.clone();
    let mut reassembler = Reassembler::new(ReassemblyLimits::default());
    let style_prefix = format!("microfed/{}/style/", cfg.fleet);
    let secagg_topic = topics.secagg(&cfg.device);
    let mut data_check = tokio::time::interval(DATA_CHECK);
    data_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    data_check.reset();
    let mut changed_seen: Option<String> = None;
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    let decoder_len: usize = s.prepared.layout.iter().map(|t| t.len).sum();
    let mut training: Option<InTraining> = None;
    let mut scoring: Option<InScoring> = None;

    loop {
        let event = tokio::select! {
            _ = stop.changed() => { if *stop.borrow() { break; } None }
            r = base.changed() => {
                if r.is_ok() {
                    let next = base.borrow_and_update().clone();
                    if next != model.path {
                        return Ok(Next::Base(next));
                    }
                }
                None
            }
            _ = tick.tick() => Some(Event::Tick),
            _ = data_check.tick() => {
                match fingerprint_of(&cfg.labelled, &cfg.state).await {
                    Ok(now) if now != s.prepared.fingerprint => {
                        if changed_seen.as_deref() == Some(now.as_str()) && training.is_none() {
                            return Ok(Next::Data);
                        }
                        changed_seen = Some(now);
                    }
                    Ok(_) => changed_seen = None,
                    Err(e) => tracing::debug!(error = %e, "cannot fingerprint the labelled data"),
                }
                None
            }
            e = scoring_done(&mut scoring) => {
                scoring = None;
                Some(e)
            }
            r = training_done(&mut training) => {
                let t = training.take().expect("a reply comes only while training");
                let round = t.order.plan.round;
                let trained = r.map_err(|_| ParticipantError::TrainerStopped)?;
                s.finish_round(t, trained);
                Some(Event::Trained { round })
            }
            m = inbox.recv() => {
                let Some(Message { topic, payload, .. }) = m else { break };
                if topic == secagg_topic {
                    match reassembler.push(&topic, &payload) {
                        Ok(Some(whole)) => match Envelope::from_bytes(&whole, MAX_SECAGG_BYTES)
                            .and_then(authentic)
                            .and_then(|e| check_env(e, &cfg.fleet, &s.prepared.model_version))
                            .and_then(|e| e.body::<ServerMessage>(Kind::SecAgg))
                        {
                            Ok(msg) => s.on_secure_message(msg).await,
                            Err(e) => tracing::warn!(error = %e, "ignoring a secure-aggregation message"),
                        },
                        Ok(None) => {}
                        Err(e) => tracing::warn!(error = %e, "ignoring a secure-aggregation frame"),
                    }
                    None
                } else if topic.starts_with(&style_prefix) {
                    s.on_style_message(&topic, &payload, carried);
                    None
                } else if topic == topics.round() {
                    match Envelope::from_bytes(&payload, protocol::MAX_PACKET_BYTES)
                        .and_then(authentic)
                        .and_then(|e| check_env(e, &cfg.fleet, &s.prepared.model_version))
                        .and_then(|e| e.body::<RoundAnnouncement>(Kind::RoundAnnouncement))
                    {
                        Ok(a) => Some(Event::Announced(a)),
                        Err(e) => {
                            tracing::warn!(%topic, error = %e, "ignoring a round announcement");
                            None
                        }
                    }
                } else if topics.device_of("global", &topic).is_some() {
                    match reassembler.push("global", &payload) {
                        Ok(Some(whole)) => match Envelope::from_bytes(&whole, usize::MAX)
                            .and_then(authentic)
                            .and_then(|e| check_env(e, &cfg.fleet, &s.prepared.model_version))
                            .and_then(|e| e.body::<GlobalDecoder>(Kind::GlobalDecoder))
                            .and_then(|g| Ok((g.version, g.decoder(decoder_len)?)))
                        {
                            Ok((version, values)) => match crate::federated::edge::round::check_global(
                                &values,
                                carried.rounds.global().map(|(_, g)| g),
                                cfg.max_global_step,
                            ) {
                                Ok(()) => Some(Event::Global { version, values }),
                                Err(why) => {
                                    tracing::warn!(version, "refusing a global decoder: {why}");
                                    None
                                }
                            },
                            Err(e) => {
                                tracing::warn!(error = %e, "ignoring a global decoder");
                                None
                            }
                        },
                        Ok(None) => None,
                        Err(e) => {
                            tracing::warn!(%topic, error = %e, "ignoring a global decoder frame");
                            None
                        }
                    }
                } else {
                    None
                }
            }
        };
        if let Some(event) = event {
            for action in carried.rounds.handle(event, now_unix()) {
                match action {
                    Action::DropUpdatesUpTo(round) => {
                        s.drop_closed(round);
                        if let Some(sp) = s.secure.as_mut() {
                            sp.forget_up_to(round);
                        }
                    }
                    Action::Install {
                        version,
                        swap,
                        personalised,
                    } => {
                        if swap && let Some((_, values)) = carried.rounds.live() {
                            swap_in(
                                &s.prepared.proto,
                                &s.prepared.layout,
                                values,
                                (version, personalised),
                                model,
                            )
                            .await;
                        }
                        device.status.update(|st| {
                            st.global_version = version;
                            if swap {
                                st.live_global_version = version;
                                st.live_personalised = personalised;
                            }
                            show_scores(st, &carried.rounds);
                        });
                    }
                    Action::Score { version } => {
                        let (Some((live_version, live)), Some((_, candidate))) =
                            (carried.rounds.live(), carried.rounds.global())
                        else {
                            continue;
                        };
                        tracing::info!(
                            version,
                            live_version,
                            "scoring the new global on the hold-out before it goes live"
                        );
                        device.status.update(|st| st.global_version = version);
                        scoring = Some(InScoring {
                            version,
                            reply: s.prepared.trainer.score(
                                vec![live.to_vec(), candidate.to_vec()],
                                cfg.personalise.map(|p| p.plan(version)),
                            ),
                        });
                    }
                    Action::KeepLive {
                        version,
                        live_version,
                        why,
                    } => {
                        tracing::warn!(
                            version,
                            live_version,
                            "global decoder not swapped into production (training goes on from it): {why}"
                        );
                        device.status.update(|st| {
                            show_scores(st, &carried.rounds);
                            st.globals_refused += 1;
                            st.last_error =
                                Some(format!("global {version} kept out of production: {why}"));
                        });
                    }
                    Action::DigestMismatch { round, version } => tracing::warn!(
                        round,
                        version,
                        "global decoder digest differs from the announcement; waiting"
                    ),
                    Action::Train(order) => {
                        // Train on the data as they are now (and publish their style code).
                        if fingerprint_of(&cfg.labelled, &cfg.state)
                            .await
                            .is_ok_and(|now| now != s.prepared.fingerprint)
                        {
                            return Ok(Next::Data);
                        }
                        let global = carried
                            .rounds
                            .global()
                            .map(|(_, g)| g.to_vec())
                            .unwrap_or_default();
                        tracing::info!(
                            round = order.plan.round,
                            global_version = order.global_version,
                            learning_rate = order.plan.learning_rate,
                            optimizer = ?order.plan.optimizer,
                            "training locally"
                        );
                        let styles = s.styles_for(carried);
                        let reply = s
                            .prepared
                            .trainer
                            .submit(global.clone(), order.plan, styles);
                        training = Some(InTraining {
                            order,
                            global,
                            reply,
                        });
                    }
                }
            }
        }
        s.publish_code(carried).await;
        s.flush_outbox(carried.rounds.open_round()).await;
        s.flush_secure().await;
    }
    Ok(Next::Stop)
}

impl<'a> Session<'a> {
    /// Loads what the session needs (on a blocking thread: base model, labelled data, feature cache),
    /// starts the training thread, restores the participant's state, the outbox and the residual.
    async fn open(
        cfg: &'a FederationSection,
        model: &AgentModel,
        device: &'a DeviceLink,
        carried: &mut Carried,
    ) -> Result<Self, ParticipantError> {
        if !protocol::valid_level(&cfg.device) {
            return Err(ParticipantError::DeviceId(cfg.device.clone()));
        }
        std::fs::create_dir_all(&cfg.state).map_err(|source| ParticipantError::Io {
            path: cfg.state.clone(),
            source,
        })?;
        let (c2, m2) = (cfg.clone(), model.clone());
        let prepared = tokio::task::spawn_blocking(move || prepare(&c2, &m2)).await??;
        let state_path = cfg.state.join("participant.json");
        let mut pstate: ParticipantState = std::fs::read(&state_path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        let new_base = pstate.model_version != prepared.model_version;
        if new_base {
            // A new base model: rounds of the old one mean nothing.
            pstate = ParticipantState {
                model_version: prepared.model_version.clone(),
                last_trained_round: 0,
            };
        }
        // The gate needs hold-out images to score on.
        let gate = (prepared.holdout > 0).then_some(cfg.holdout_margin);
        if gate.is_none() && cfg.personalise.is_some() {
            tracing::warn!(
                labelled = %cfg.labelled.display(),
                "[federation.personalise] needs hold-out images to choose between the global and \
                 its fine-tune (holdout_fraction is 0, or too few labelled images): globals go \
                 live as they come"
            );
        }
        carried
            .rounds
            .start_session(pstate.last_trained_round, &prepared.base_decoder, gate);
        let outbox = Outbox::open(
            &cfg.state.join("outbox"),
            cfg.outbox_max_items,
            cfg.outbox_max_bytes,
        )?;
        let residual_path = cfg.state.join("residual.bin");
        let len = prepared.layout.iter().map(|t| t.len).sum();
        let residual = if new_base {
            // Error feedback of another decoder (maybe another class count) is meaningless here.
            Residual::new(len)
        } else {
            Residual::load(&residual_path, len)?
        };
        device.status.update(|st| {
            st.model_version = prepared.model_version.clone();
            st.last_round = (pstate.last_trained_round > 0).then_some(pstate.last_trained_round);
            st.queue_depth = outbox.len() as u64;
        });
        // This lab's code: publish it unless this process already did; withdraw one published
        // before when there is none now (too few images, codes turned off).
        let pending_code = match &prepared.own_code {
            Some((key, code)) if carried.published.as_ref() != Some(key) => {
                Some(PendingCode::Code {
                    key: key.clone(),
                    bytes: crate::federated::edge::style::seal_code(
                        &cfg.fleet,
                        pstate.last_trained_round,
                        code,
                    )?,
                })
            }
            Some(_) => None,
            None => carried.published.is_some().then_some(PendingCode::Withdraw),
        };
        show_styles(
            &device.status,
            &carried.book,
            &prepared.model_version,
            cfg.style.is_some(),
        );
        let secure = match &cfg.secure_aggregation {
            Some(sa) => {
                let trust = sa
                    .trust(&cfg.device)
                    .map_err(ParticipantError::SecureAggregation)?;
                tracing::info!(
                    enrolled = trust.enrolled.len(),
                    min_threshold = trust.min_threshold,
                    "secure aggregation on: updates leave this lab only masked"
                );
                Some(SecureParticipant::new(&cfg.device, trust))
            }
            None => None,
        };
        let mut style_file = Persisted::new("style code", cfg.state.join(STYLE_CODE_FILE));
        if let (true, Some((key, code))) = (prepared.own_code_fresh, &prepared.own_code) {
            let saved = SavedCode {
                key: key.clone(),
                code: code.clone(),
            };
            match serde_json::to_vec(&saved) {
                Ok(bytes) => {
                    if let Some(msg) = style_file.save(bytes) {
                        device.status.update(|st| st.last_error = Some(msg));
                    }
                }
                Err(e) => tracing::error!(error = %e, "cannot encode the style code"),
            }
        }
        Ok(Self {
            secure,
            secure_out: Vec::new(),
            cfg,
            device,
            prepared,
            state_file: Persisted::new("participant state", state_path),
            pstate,
            outbox,
            unstored: Vec::new(),
            store_failing: false,
            residual_file: Persisted::new("error-feedback residual", residual_path),
            residual,
            style_file,
            pending_code,
            styles_given: None,
        })
    }

    /// Other labs' codes for the trainer, when they changed since it last got them.
    fn styles_for(&mut self, carried: &Carried) -> Option<(Vec<StyleCode>, RestyleConfig)> {
        let s = self.cfg.style.as_ref()?;
        if self.styles_given == Some(carried.book.generation()) {
            return None;
        }
        self.styles_given = Some(carried.book.generation());
        let version = &self.prepared.model_version;
        tracing::info!(
            devices = ?carried.book.devices_for(version),
            "style codes for local training"
        );
        Some((carried.book.codes_for(version), s.restyle))
    }

    /// A style message: a code stored or withdrawn, ours, or refused.
    fn on_style_message(&mut self, topic: &str, payload: &[u8], carried: &mut Carried) {
        let topics = &self.device.topics;
        let version = &self.prepared.model_version;
        if self.cfg.style.is_none() {
            // Codes are off: only withdraw a code this device left on the broker.
            if topic == topics.style(&self.cfg.device) && !payload.is_empty() {
                self.pending_code = Some(PendingCode::Withdraw);
            }
            return;
        }
        match carried.book.receive(topic, payload) {
            Ok(Received::Stored { device }) => {
                tracing::info!(%device, "style code received");
                show_styles(&self.device.status, &carried.book, version, true);
            }
            Ok(Received::Removed { device }) => {
                tracing::info!(%device, "style code withdrawn");
                show_styles(&self.device.status, &carried.book, version, true);
            }
            // The broker still holds a code of ours that we no longer stand by.
            Ok(Received::Own { empty: false }) if self.prepared.own_code.is_none() => {
                self.pending_code = Some(PendingCode::Withdraw);
            }
            Ok(Received::Own { .. }) => {}
            Err(e) => {
                tracing::warn!(%topic, reason = %e, "style message dropped");
                show_styles(&self.device.status, &carried.book, version, true);
            }
        }
    }

    /// Updates of closed rounds can no longer count.
    fn drop_closed(&mut self, round: u64) {
        let dropped = self
            .outbox
            .drop_where(|e| e.round <= round)
            .unwrap_or_else(|e| {
                tracing::error!(error = %e, "cannot drop closed rounds from the outbox");
                Vec::new()
            });
        for d in dropped {
            tracing::warn!(
                round = d.round,
                "round closed before the update was delivered; dropping it"
            );
        }
    }

    /// The training thread answered: make the update (checked, compressed) and queue it, persist
    /// the round as trained, and report on the status board.
    fn finish_round(&mut self, t: InTraining, trained: Result<Trained, LocalError>) {
        let round = t.order.plan.round;
        if trained.is_err() {
            // The trainer may not hold the codes: give them again next round.
            self.styles_given = None;
        }
        self.pstate.last_trained_round = round;
        self.save_state();
        let header = Header {
            fleet: &self.cfg.fleet,
            round,
            model_version: &self.prepared.model_version,
            sender: &self.cfg.device,
        };
        // Secure mode is the configuration's, never the state machine's: an update of this agent
        // never goes out in the clear, whatever happened to the protocol.
        if self.cfg.secure_aggregation.is_some() {
            let made = trained
                .map_err(RoundError::from)
                .and_then(|tr| checked_update(self.cfg, &t.global, &tr).map(|(u, _)| u));
            let last_error = match made {
                Ok(update) => {
                    tracing::info!(
                        round,
                        "local round done; the update goes out only through secure aggregation"
                    );
                    match self.secure.as_mut() {
                        Some(sp) => {
                            let out = sp.on_update(round, update);
                            self.secure_out.extend(out);
                            None
                        }
                        None => Some(
                            "secure aggregation stopped (see the log): the update is not sent"
                                .to_owned(),
                        ),
                    }
                }
                Err(e) => {
                    tracing::error!(round, error = %e, "round failed locally");
                    Some(e.to_string())
                }
            };
            self.device.status.update(|st| {
                st.last_round = Some(round);
                if last_error.is_some() {
                    st.last_error = last_error;
                }
            });
            return;
        }
        let made = trained.map_err(RoundError::from).and_then(|tr| {
            make_update(
                self.cfg,
                &self.prepared.layout,
                &t.order.compression,
                &mut self.residual,
                &t.global,
                t.order.global_version,
                &tr,
                self.prepared.samples,
                &header,
            )
        });
        let last_error = match made {
            Ok(bytes) => {
                let failed = self.residual_file.save(self.residual.to_bytes());
                self.report_save_failure(failed);
                let item = OutboxItem {
                    topic: self.device.topics.update(&self.cfg.device),
                    round,
                    model_version: self.prepared.model_version.clone(),
                    payload: bytes,
                };
                self.unstored.push(item);
                self.store_unstored();
                None
            }
            Err(e) => {
                tracing::error!(round, error = %e, "round failed locally");
                Some(e.to_string())
            }
        };
        let q = self.outbox.len() as u64;
        self.device.status.update(|st| {
            st.last_round = Some(round);
            // Only a failure is reported: a good round must not erase a fleet refusal.
            if last_error.is_some() {
                st.last_error = last_error;
            }
            st.queue_depth = q;
        });
    }

    /// This lab's style code, retained (or its withdrawal: an empty retained message), once the
    /// link is up.
    async fn publish_code(&mut self, carried: &mut Carried) {
        let link = &self.device.link;
        if !link.is_connected() {
            return;
        }
        let Some(p) = self.pending_code.take() else {
            return;
        };
        let (bytes, key) = match &p {
            PendingCode::Code { key, bytes } => (bytes.clone(), Some(key.clone())),
            PendingCode::Withdraw => (Vec::new(), None),
        };
        match link
            .publish(&self.device.topics.style(&self.cfg.device), bytes, true)
            .await
        {
            Ok(()) => {
                match (&self.prepared.own_code, &key) {
                    (Some((_, code)), Some(_)) => tracing::info!(
                        kind = %code.kind,
                        images = code.images,
                        noise_sigma = code.noise_sigma,
                        "style code published"
                    ),
                    _ => tracing::info!("style code withdrawn from the broker"),
                }
                carried.published = key;
            }
            Err(e) => {
                tracing::warn!(error = %e, "style code not published yet; will retry");
                self.pending_code = Some(p);
            }
        }
    }

    /// Stores the updates waiting in memory in the outbox, oldest first. A write that fails (a full
    /// disk) keeps them in memory, to be tried again before the next flush, so the update is not
    /// lost while the process runs; beyond `outbox_max_items` of them, the oldest is dropped, as
    /// the outbox itself would.
    fn store_unstored(&mut self) {
        while !self.unstored.is_empty() {
            let item = self.unstored.remove(0);
            let round = item.round;
            match self.outbox.push(item.clone()) {
                Ok(evicted) => {
                    if self.unstored.is_empty() {
                        tracing::debug!(round, "update stored in the outbox");
                    }
                    for e in evicted {
                        tracing::warn!(round = e.round, "outbox full: dropped the oldest update");
                    }
                }
                Err(e) => {
                    if !self.store_failing {
                        tracing::error!(
                            round,
                            error = %e,
                            "cannot store the update in the outbox; keeping it in memory and retrying"
                        );
                        let msg = format!("cannot store the round {round} update: {e}");
                        self.device.status.update(|st| st.last_error = Some(msg));
                    }
                    self.store_failing = true;
                    self.unstored.insert(0, item);
                    if self.unstored.len() > self.cfg.outbox_max_items.max(1) {
                        let dropped = self.unstored.remove(0);
                        tracing::warn!(
                            round = dropped.round,
                            "outbox full (in memory): dropped the oldest update"
                        );
                    }
                    break;
                }
            }
        }
    }

    /// Sends what waits, oldest first, while the round it belongs to is open.
    /// One of the aggregator's secure-aggregation messages. The protocol's work (sealing shares,
    /// the pairwise masks: one PRG expansion of the whole update per peer) runs on a blocking
    /// thread, so the device's other tasks (status, results) go on meanwhile.
    async fn on_secure_message(&mut self, msg: ServerMessage) {
        if let Some(mut sp) = self.secure.take() {
            match tokio::task::spawn_blocking(move || {
                let out = sp.on_message(msg);
                (sp, out)
            })
            .await
            {
                Ok((sp, out)) => {
                    self.secure = Some(sp);
                    self.secure_out.extend(out);
                }
                Err(e) => {
                    // The state machine is lost with the task: secure rounds stop here, said loudly.
                    tracing::error!(error = %e, "secure aggregation: the protocol task failed; no further secure rounds until restart");
                    self.device.status.update(|st| {
                        st.last_error = Some(format!("secure aggregation stopped: {e}"))
                    });
                }
            }
        } else if self.cfg.secure_aggregation.is_none()
            && matches!(msg, ServerMessage::Start { .. })
        {
            tracing::warn!(
                "the aggregator runs secure aggregation but this agent has no \
                 [federation.secure_aggregation]: not taking part"
            );
        }
    }

    /// Publishes the secure round's answers (straight on the link: a protocol step cannot wait in
    /// the outbox; an answer that cannot be sent makes this device drop out of that round).
    async fn flush_secure(&mut self) {
        use crate::federated::secagg::ClientMessage;
        for out in std::mem::take(&mut self.secure_out) {
            match out {
                SecureOut::Send { round, msg } => {
                    let step = match &msg {
                        ClientMessage::Keys { .. } => "keys",
                        ClientMessage::Shares { .. } => "shares",
                        ClientMessage::Masked { .. } => "masked update",
                        ClientMessage::Unmask { .. } => "unmasking shares",
                    };
                    let header = Header {
                        fleet: &self.cfg.fleet,
                        round,
                        model_version: &self.prepared.model_version,
                        sender: &self.cfg.device,
                    };
                    let sent = async {
                        let env = Envelope::seal(Kind::SecAgg, &header, &msg)?;
                        let frames = protocol::split(&env.to_bytes()?, CHUNK_BYTES)?;
                        let topic = self.device.topics.update(&self.cfg.device);
                        self.device
                            .link
                            .publish_frames(|_| topic.clone(), frames, false)
                            .await?;
                        Ok::<(), ParticipantError>(())
                    }
                    .await;
                    match sent {
                        Ok(()) => tracing::info!(round, "secure aggregation: {step} sent"),
                        Err(e) => tracing::warn!(
                            round,
                            error = %e,
                            "secure aggregation: cannot send the {step}; this lab drops out of the round"
                        ),
                    }
                }
                SecureOut::Masked {
                    round,
                    codes,
                    scale,
                } => {
                    // This lab's own contribution, kept on its own disk (for its operator's audit;
                    // it never leaves the lab in the clear).
                    let path = self.cfg.state.join("secagg-contributed.i8");
                    let bytes: Vec<u8> = codes.iter().map(|&c| c as u8).collect();
                    if let Err(e) = crate::fsio::write_atomic(&path, &bytes) {
                        tracing::warn!(error = %e, "cannot keep the contributed codes");
                    }
                    tracing::info!(
                        round,
                        scale,
                        coordinates = codes.len(),
                        "secure aggregation: contributed int8 codes kept in secagg-contributed.i8"
                    );
                }
                SecureOut::Refused { round, why } => {
                    tracing::error!(round, "secure aggregation: refused: {why}");
                    self.device
                        .status
                        .update(|st| st.last_error = Some(format!("secure aggregation: {why}")));
                }
            }
        }
    }

    /// Saves the participant state (the last trained round).
    fn save_state(&mut self) {
        match serde_json::to_vec(&self.pstate) {
            Ok(bytes) => {
                let failed = self.state_file.save(bytes);
                self.report_save_failure(failed);
            }
            Err(e) => tracing::error!(error = %e, "cannot encode the participant state"),
        }
    }

    /// Writes the state files a full disk left behind memory (each logs its own recovery).
    fn retry_saves(&mut self) {
        let failed: Vec<String> = [
            &mut self.state_file,
            &mut self.residual_file,
            &mut self.style_file,
        ]
        .into_iter()
        .filter_map(Persisted::retry)
        .collect();
        for msg in failed {
            self.report_save_failure(Some(msg));
        }
    }

    /// Shows on the status board a save failure that just began ([`Persisted::save`]).
    fn report_save_failure(&self, failed: Option<String>) {
        if let Some(msg) = failed {
            self.device.status.update(|st| st.last_error = Some(msg));
        }
    }

    async fn flush_outbox(&mut self, open_round: Option<u64>) {
        self.retry_saves();
        if !self.unstored.is_empty() {
            let before = self.unstored.len();
            self.store_unstored();
            if self.unstored.is_empty() {
                self.store_failing = false;
                tracing::info!(
                    updates = before,
                    "writes work again: the updates kept in memory are in the outbox"
                );
            }
        }
        let link = &self.device.link;
        if !link.is_connected() || self.outbox.is_empty() {
            return;
        }
        let version = &self.prepared.model_version;
        let stale = self
            .outbox
            .drop_where(|e| &e.model_version != version || open_round.is_some_and(|r| e.round < r))
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
        let pending: Vec<_> = self.outbox.pending().to_vec();
        for entry in pending {
            let item = match self.outbox.load(entry.id) {
                Ok(i) => i,
                Err(e) => {
                    tracing::error!(error = %e, "unreadable outbox entry: dropping it");
                    self.outbox.remove(entry.id).ok();
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
                    self.device.counters.updates_sent.inc();
                    self.device.counters.update_bytes_sent.add(n as u64);
                    self.outbox.remove(entry.id).ok();
                    let q = self.outbox.len() as u64;
                    self.device.status.update(|st| st.queue_depth = q);
                }
                Err(e) => {
                    self.device.counters.update_send_failures.inc();
                    tracing::warn!(round = item.round, error = %e, "update not delivered; kept in the outbox");
                    break;
                }
            }
        }
    }
}

/// This lab's style code waiting for the link.
enum PendingCode {
    Code {
        key: String,
        bytes: Vec<u8>,
    },
    /// An empty retained message: the broker forgets the code.
    Withdraw,
}

/// The style figures of the status board.
/// The hold-out scores of a decision (a global swapped in or kept out) in the status: the running
/// decoder's, and the last scored global's own.
fn show_scores(st: &mut crate::wire::protocol::StatusBody, rounds: &Rounds) {
    st.live_holdout_iou = rounds.live_score();
    if let Some((v, iou)) = rounds.global_score() {
        (st.global_scored_version, st.global_holdout_iou) = (v, Some(iou));
    }
}

fn show_styles(
    board: &crate::wire::device::StatusBoard,
    book: &StyleBook,
    model_version: &str,
    on: bool,
) {
    let devices = if on {
        book.devices_for(model_version)
    } else {
        Vec::new()
    };
    let rejected = book.rejected();
    board.update(|st| {
        st.style_codes = devices;
        st.style_rejected = rejected;
    });
}

/// [`labelled_fingerprint`] on a blocking thread.
async fn fingerprint_of(dir: &Path, skip: &Path) -> Result<String, String> {
    let (dir, skip) = (dir.to_owned(), skip.to_owned());
    tokio::task::spawn_blocking(move || {
        labelled_fingerprint(&dir, &skip).map_err(|e| e.to_string())
    })
    .await
    .map_err(|e| e.to_string())?
}

/// A digest of the labelled folder: every file's relative path, size and modification time
/// (symbolic links followed, at most 8 folders deep). It changes when an image or mask is added,
/// removed or rewritten, without reading the images. Folder `skip` is left out: a federation state
/// folder inside the labelled one changes at every round.
pub fn labelled_fingerprint(dir: &Path, skip: &Path) -> std::io::Result<String> {
    let skip = std::fs::canonicalize(skip).ok();
    let mut files = Vec::new();
    let mut folders = vec![(dir.to_path_buf(), 0usize)];
    while let Some((folder, depth)) = folders.pop() {
        for entry in std::fs::read_dir(&folder)? {
            let path = entry?.path();
            // A file removed while we look is simply not there.
            let Ok(meta) = std::fs::metadata(&path) else {
                continue;
            };
            if meta.is_dir() {
                if depth < 8 && std::fs::canonicalize(&path).ok() != skip {
                    folders.push((path, depth + 1));
                }
                continue;
            }
            let mtime = meta
                .modified()
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_nanos());
            let rel = path.strip_prefix(dir).unwrap_or(&path);
            files.push(format!("{}\0{}\0{mtime}\n", rel.display(), meta.len()));
        }
    }
    files.sort();
    Ok(protocol::sha256_hex(files.concat().as_bytes()))
}

/// What identifies this lab's code: base model, labelled data and style settings. The same key
/// republishes the same code (the same noise draw: fresh noise on unchanged data would let anyone
/// average it away).
fn style_key(model_version: &str, fingerprint: &str, style: &StyleSection) -> String {
    protocol::sha256_hex(format!("{model_version}\n{fingerprint}\n{style:?}").as_bytes())
}

/// This lab's code as last computed, with its key (`state/style-code.json`).
#[derive(Debug, Serialize, Deserialize)]
struct SavedCode {
    key: String,
    code: StyleCode,
}

/// This lab's code, in the state folder.
const STYLE_CODE_FILE: &str = "style-code.json";

/// This lab's code for `key`: the saved one when the key matches, else computed (the session saves
/// it: [`Prepared::own_code_fresh`]). None, with a log line saying why, when no code may be published.
fn own_style_code(
    cfg: &FederationSection,
    style: &StyleSection,
    cache: &FeatureCache,
    key: String,
) -> Option<(String, StyleCode, bool)> {
    let path = cfg.state.join(STYLE_CODE_FILE);
    if let Some(saved) = std::fs::read(&path)
        .ok()
        .and_then(|b| serde_json::from_slice::<SavedCode>(&b).ok())
        .filter(|s| s.key == key && s.code.validate().is_ok())
    {
        return Some((key, saved.code, false));
    }
    match StyleCode::from_cache_with_band(
        cache,
        style.kind,
        &style.knobs(),
        &cfg.device,
        &mut <rand_chacha::ChaCha8Rng as rand::SeedableRng>::from_os_rng(),
        style.band(),
    ) {
        Ok(code) => Some((key, code, true)),
        Err(e @ StyleError::TooFewImages { .. }) => {
            tracing::info!(reason = %e, "style code not published");
            None
        }
        Err(e) => {
            tracing::warn!(error = %e, "style code not published");
            None
        }
    }
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
                crate::telemetry::clip(&e.model_version, 12),
                crate::telemetry::clip(model_version, 12)
            ),
        });
    }
    Ok(e)
}

/// Largest secure-aggregation message from the aggregator: a roster or the relayed shares of
/// thousands of devices fit many times over.
const MAX_SECAGG_BYTES: usize = 16 * 1024 * 1024;

/// The update of a round and its L2 norm: local − global, finite, within `max_update_norm` (for secure
/// aggregation the device's own check is the only one: the aggregator cannot check a masked one).
fn checked_update(
    cfg: &FederationSection,
    global: &[f32],
    t: &Trained,
) -> Result<(Vec<f32>, f32), RoundError> {
    let update: Vec<f32> = t.local.iter().zip(global).map(|(l, g)| l - g).collect();
    if update.iter().any(|v| !v.is_finite()) {
        return Err(RoundError::NotFinite);
    }
    let norm = update
        .iter()
        .map(|v| f64::from(*v).powi(2))
        .sum::<f64>()
        .sqrt() as f32;
    if norm > cfg.max_update_norm {
        return Err(RoundError::Norm {
            norm,
            max: cfg.max_update_norm,
        });
    }
    Ok((update, norm))
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
) -> Result<Vec<u8>, RoundError> {
    let (update, norm) = checked_update(cfg, global, t)?;
    let compressed = compress::compress(
        &update,
        layout,
        compression,
        compression.error_feedback.then_some(residual),
    )?;
    tracing::info!(
        round = header.round,
        loss = t.loss,
        holdout_iou_before = ?t.iou_before,
        holdout_iou_after = ?t.iou_after,
        seconds = t.seconds,
        restyled_batches = t.restyled_batches,
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
            restyled_batches: t.restyled_batches,
        },
        compressed,
        norm,
    };
    Ok(Envelope::seal(Kind::Update, header, &body).and_then(|e| e.to_bytes())?)
}

/// Patches the new global decoder into the base model and swaps it into the pipeline.
async fn swap_in(
    proto: &Arc<tract_onnx::pb::ModelProto>,
    layout: &[TensorSpan],
    values: &[f32],
    (version, personalised): (u64, bool),
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
        let label = model.path.with_extension(if personalised {
            format!("global-{version}-personalised.onnx")
        } else {
            format!("global-{version}.onnx")
        });
        let seg = Segmenter::from_proto(&p, &label).map_err(|e| e.to_string())?;
        seg.prepare(model.batch, model.tile, model.tile, Outputs::Logits)
            .map_err(|e| e.to_string())?;
        model.slot.swap(seg).map_err(|e| e.to_string())
    })
    .await;
    match r {
        Ok(Ok(generation)) => tracing::info!(
            version,
            personalised,
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
    trainer: TrainingThread,
    proto: Arc<tract_onnx::pb::ModelProto>,
    model_version: String,
    layout: Vec<TensorSpan>,
    samples: u64,
    /// [`labelled_fingerprint`] of the data loaded.
    fingerprint: String,
    /// This lab's style code and its [`style_key`] (None: codes off, or none may be published).
    own_code: Option<(String, StyleCode)>,
    /// `own_code` was computed now, not read from its file: the session saves it.
    own_code_fresh: bool,
    /// The base model's own decoder (what segments until a global goes live).
    base_decoder: Vec<f32>,
    /// Hold-out images (0: no hold-out gate).
    holdout: usize,
}

/// Loads the base model and the labelled data, builds the feature cache and this lab's style code,
/// and starts the training thread. Blocking.
fn prepare(cfg: &FederationSection, model: &AgentModel) -> Result<Prepared, ParticipantError> {
    let model_version = crate::model::manifest::sha256_file(&model.path)?;
    // Taken before reading: a change while loading shows at the next check.
    let fingerprint =
        labelled_fingerprint(&cfg.labelled, &cfg.state).map_err(|source| ParticipantError::Io {
            path: cfg.labelled.clone(),
            source,
        })?;
    let proto = onnx::load(&model.path)?;
    let params = onnx::load_params(&proto, &model.path)?;
    let layout = compress::decoder_layout(params.classes);
    let set = TrainingSet::load(
        std::slice::from_ref(&cfg.labelled),
        None,
        None,
        &model.normalisation,
        cfg.holdout_fraction,
        cfg.seed,
    )?;
    if set.classes.len() != params.classes {
        return Err(ParticipantError::ClassCount {
            labelled: cfg.labelled.clone(),
            classes: set.classes.len(),
            model: model.path.clone(),
            predicts: params.classes,
        });
    }
    let segmenter = Segmenter::load(&model.path)?;
    let t0 = std::time::Instant::now();
    let cache = FeatureCache::build(
        &segmenter,
        &set,
        &cfg.state.join("features"),
        &model_version,
    )?;
    tracing::info!(
        train = cache.train.len(),
        holdout = cache.holdout.len(),
        computed = cache.computed,
        seconds = t0.elapsed().as_secs_f64(),
        "encoder features ready"
    );
    let samples = cache.samples();
    let holdout = cache.holdout.len();
    let (own_code, own_code_fresh) = match cfg.style.as_ref().and_then(|style| {
        let key = style_key(&model_version, &fingerprint, style);
        own_style_code(cfg, style, &cache, key)
    }) {
        Some((key, code, fresh)) => (Some((key, code)), fresh),
        None => (None, false),
    };
    let trainer = TrainingThread::start(
        &cfg.device_kind,
        TrainerSetup {
            params: &params,
            cache,
            batch: cfg.batch,
            crop: cfg.crop,
            seed: cfg.seed,
            dice_weight: cfg.dice_weight,
            class_weighted: cfg.class_weighted,
        },
    )?;
    Ok(Prepared {
        trainer,
        proto: Arc::new(proto),
        model_version,
        layout,
        samples,
        fingerprint,
        own_code,
        own_code_fresh,
        base_decoder: params.decoder_flat(),
        holdout,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 17: an envelope for another base model was reported by cutting both versions at byte
    /// 12, which panics (and stops the participant) when byte 12 is inside a character.
    #[test]
    fn an_envelope_with_a_hostile_model_version_is_refused_without_panicking() {
        for forged in [
            "aaaaaaaaaaaé",
            "ééééééé",
            "\u{1F600}\u{1F600}\u{1F600}\u{1F600}",
        ] {
            let env = Envelope::seal(
                Kind::GlobalDecoder,
                &Header {
                    fleet: "f",
                    round: 1,
                    model_version: forged,
                    sender: "aggregator",
                },
                &"x",
            )
            .unwrap();
            let e = check_env(env, "f", "ababababababababab").unwrap_err();
            assert!(
                e.to_string().contains("aaaaaaaaaaaa") || e.to_string().contains("abababababab"),
                "{e}"
            );
        }
    }

    #[test]
    fn the_labelled_fingerprint_changes_with_the_files_and_only_then() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        std::fs::create_dir_all(dir.join("images")).unwrap();
        std::fs::write(dir.join("images/a.png"), b"aaaa").unwrap();
        std::fs::write(dir.join("dataset.toml"), b"name = 'x'").unwrap();
        let state = dir.join("no-such-state");
        let first = labelled_fingerprint(dir, &state).unwrap();
        assert_eq!(labelled_fingerprint(dir, &state).unwrap(), first);
        // A new file in a sub-folder.
        std::fs::write(dir.join("images/b.png"), b"bb").unwrap();
        let second = labelled_fingerprint(dir, &state).unwrap();
        assert_ne!(second, first);
        // A rewritten file of another size.
        std::fs::write(dir.join("images/b.png"), b"bbb").unwrap();
        let third = labelled_fingerprint(dir, &state).unwrap();
        assert_ne!(third, second);
        // Removed again: back to a listing like the first (the mtime of a.png is unchanged).
        std::fs::remove_file(dir.join("images/b.png")).unwrap();
        assert_eq!(labelled_fingerprint(dir, &state).unwrap(), first);
        assert!(labelled_fingerprint(&dir.join("missing"), &state).is_err());
        // The federation's state inside the labelled folder does not count.
        std::fs::create_dir_all(dir.join("fed")).unwrap();
        std::fs::write(dir.join("fed/participant.json"), b"{}").unwrap();
        assert_eq!(labelled_fingerprint(dir, &dir.join("fed")).unwrap(), first);
        assert_ne!(labelled_fingerprint(dir, &state).unwrap(), first);
    }

    #[test]
    fn the_example_style_section_parses_and_a_bad_one_is_refused_at_load() {
        // The commented [federation.style] of agent.example.toml, uncommented.
        let example = include_str!("../../../agent.example.toml");
        let start = example.find("# [federation.style]").unwrap();
        let text: String = example[start..]
            .lines()
            .map(|l| format!("{}\n", l.trim_start_matches("# ")))
            .collect();
        let table: toml::Table = toml::from_str(&text).unwrap();
        let style: StyleSection = table["federation"]["style"].clone().try_into().unwrap();
        // The example spells out the default band.
        assert_eq!(
            style.band,
            Some(crate::federated::edge::style::FOURIER_BAND)
        );
        assert_eq!(
            StyleSection {
                band: None,
                ..style
            },
            StyleSection::default()
        );
        // At config load, a bad knob names its field.
        let config = |style: &str| {
            format!(
                "[model]\npath = \"m.onnx\"\n[federation]\nfleet = \"f\"\ndevice = \"d\"\n\
                 labelled = \"l\"\nstate = \"s\"\n[federation.style]\n{style}"
            )
        };
        let ok: crate::node::AgentConfig = toml::from_str(&config("kind = \"fourier\"\n")).unwrap();
        ok.validate().unwrap();
        let bad: crate::node::AgentConfig = toml::from_str(&config("min_images = 0\n")).unwrap();
        let err = bad.validate().unwrap_err().to_string();
        assert!(
            err.contains("federation.style") && err.contains("min_images"),
            "{err}"
        );
        assert!(toml::from_str::<crate::node::AgentConfig>(&config("colour = 1\n")).is_err());
    }

    #[test]
    fn the_hold_out_margin_defaults_to_two_points_and_is_checked_at_load() {
        let config = |extra: &str| {
            format!(
                "[model]\npath = \"m.onnx\"\n[federation]\nfleet = \"f\"\ndevice = \"d\"\n\
                 labelled = \"l\"\nstate = \"s\"\n{extra}"
            )
        };
        let ok: crate::node::AgentConfig = toml::from_str(&config("")).unwrap();
        ok.validate().unwrap();
        assert_eq!(ok.participant().unwrap().holdout_margin, 0.02);
        for bad in [
            "holdout_margin = 1.5\n",
            "holdout_margin = -0.1\n",
            "holdout_margin = nan\n",
        ] {
            let c: crate::node::AgentConfig = toml::from_str(&config(bad)).unwrap();
            let err = c.validate().unwrap_err().to_string();
            assert!(err.contains("federation.holdout_margin"), "{err}");
        }
    }

    #[test]
    fn personalisation_defaults_to_the_measured_recipe_and_is_checked_at_load() {
        let config = |extra: &str| {
            format!(
                "[model]\npath = \"m.onnx\"\n[federation]\nfleet = \"f\"\ndevice = \"d\"\n\
                 labelled = \"l\"\nstate = \"s\"\n[federation.personalise]\n{extra}"
            )
        };
        let ok: crate::node::AgentConfig = toml::from_str(&config("")).unwrap();
        ok.validate().unwrap();
        let p = ok.participant().unwrap().personalise.unwrap();
        assert_eq!((p.steps, p.learning_rate), (240, 1e-3));
        assert_eq!(p.optimizer, LocalOptimizer::Adam);
        let plan = p.plan(7);
        assert_eq!((plan.epochs, plan.steps_per_epoch), (1, 240));
        assert_ne!(plan.round, 7, "its crops are not a round's");
        for bad in [
            "steps = 0\n",
            "steps = 100001\n",
            "learning_rate = 0.0\n",
            "learning_rate = nan\n",
            "learning_rate = 2.0\n",
        ] {
            let c: crate::node::AgentConfig = toml::from_str(&config(bad)).unwrap();
            let err = c.validate().unwrap_err().to_string();
            assert!(err.contains("federation.personalise"), "{bad}: {err}");
        }
        assert!(toml::from_str::<crate::node::AgentConfig>(&config("stepz = 3\n")).is_err());
        // The commented section of agent.example.toml, uncommented, spells out the defaults.
        let example = include_str!("../../../agent.example.toml");
        let start = example.find("# [federation.personalise]").unwrap();
        let text: String = example[start..]
            .lines()
            .take_while(|l| !l.starts_with("# Style codes"))
            .map(|l| format!("{}\n", l.trim_start_matches("# ")))
            .collect();
        let table: toml::Table = toml::from_str(&text).unwrap();
        let shown: PersonaliseSection = table["federation"]["personalise"]
            .clone()
            .try_into()
            .unwrap();
        assert_eq!(shown, p);
    }

    #[test]
    fn the_style_key_follows_model_data_and_settings() {
        let s = StyleSection::default();
        let k = style_key("m", "d", &s);
        assert_eq!(k, style_key("m", "d", &s));
        assert_ne!(k, style_key("m2", "d", &s));
        assert_ne!(k, style_key("m", "d2", &s));
        let noisy = StyleSection {
            noise_sigma: 0.1,
            ..s
        };
        assert_ne!(k, style_key("m", "d", &noisy));
        let wide = StyleSection {
            band: Some(32),
            ..s
        };
        assert_ne!(k, style_key("m", "d", &wide), "a new band makes a new code");
    }
}
