//! The aggregator: runs rounds over MQTT and merges the labs' updates into the next global decoder.
//!
//! A round: publish the global decoder (retained, chunked) and the announcement (retained); collect
//! updates until a quorum (a count or a fraction of the known devices) or the deadline; merge them
//! ([`crate::federated::server::merge`]: FedAvg weighted by samples, streaming, or a robust rule, then
//! the server optimiser); publish the new version, the closed announcement and a [`RoundSummary`].
//! Devices that sent nothing by the deadline are stragglers, not waited for.
//!
//! Every update is checked before it counts ([`Rejection`]): malformed, wrong fleet, base model,
//! round or global version (a replay of an older round lands here), a sender that is not the topic's
//! device, an unknown device, a duplicate (counted once), values that are not finite, a norm above the
//! bound. Rejections are counted by reason in the summary.
//!
//! Crash safety: the round state is a JSON file written atomically after every change, and each
//! accepted update's raw message is written (atomically) before it is counted. A restarted
//! aggregator replays the accepted files of the open round into a fresh accumulator, so it finishes
//! the round with every update, none lost and none counted twice (a re-delivered message is a
//! duplicate). Globals are kept as `global-<version>.bin`.
//!
//! Differential privacy (optional `[dp]`, [`DpSection`]): server-side DP-FedAvg with a *trusted*
//! aggregator (central DP: it sees each update in the clear). Each accepted update is clipped to L2
//! norm `C` and enters the sum with weight 1 (so one lab moves the sum by at most `C`, whatever its
//! sample count); at round close `N(0, (zC)²)` is added to that sum before it is divided by the
//! count, and the [`RdpAccountant`] (kept in the crash-safe state, so a restart never resets ε) is
//! stepped. Every round summary carries the [`PrivacyReport`] so far; with `max_epsilon` no round is
//! opened that could exceed it: the aggregator logs why and stops.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::federated::compress::{self, TensorSpan};
use crate::federated::dp::{self, PrivacyReport, RdpAccountant};
use crate::federated::secagg::{ClientMessage, SecAggConfig, Support, ring_bits_for};
use crate::federated::server::config::Role;
pub use crate::federated::server::config::{
    AggregatorConfig, DP_MECHANISM, DP_MECHANISM_SECURE, DpSection, MAX_UPDATE_BYTES, RoundSection,
};
pub use crate::federated::server::error::AggregatorError;
use crate::federated::server::merge::{Accumulator, ServerOptimizer};
use crate::federated::server::secure::{SecureAction, SecureEvent, SecureRound, merged_mean};
use crate::fsio::now_unix;
use crate::fsio::write_atomic;
use crate::model::onnx;
use crate::prometheus::{
    Collect, Counter, Exposition, Gauge, Histogram, MetricType, ROUND_BUCKETS,
};
use crate::wire::link::{BrokerSettings, Link, Message};
use crate::wire::protocol::{
    self, CHUNK_BYTES, DeviceReport, Envelope, GlobalDecoder, Header, Kind, Reassembler,
    ReassemblyLimits, RoundAnnouncement, RoundSummary, Topics, UpdateBody,
};

/// Why an update was not counted (the summary's keys).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    Malformed,
    WrongFleet,
    WrongModel,
    WrongRound,
    WrongVersion,
    SpoofedSender,
    UnknownDevice,
    Duplicate,
    NotFinite,
    Norm,
    Oversized,
    /// More training samples claimed than `max_samples`.
    Samples,
    /// A secure-aggregation message the protocol refused (out of turn, malformed shares, …).
    SecAgg,
}

impl Rejection {
    /// Why a frame or message that would not decode is refused: too large, else malformed.
    fn of_frame_error(e: &protocol::ProtocolError) -> Self {
        if matches!(e, protocol::ProtocolError::Oversized { .. }) {
            Self::Oversized
        } else {
            Self::Malformed
        }
    }

    /// Every reason, in the order of the metrics' labels.
    pub const ALL: [Rejection; 13] = [
        Self::Malformed,
        Self::WrongFleet,
        Self::WrongModel,
        Self::WrongRound,
        Self::WrongVersion,
        Self::SpoofedSender,
        Self::UnknownDevice,
        Self::Duplicate,
        Self::NotFinite,
        Self::Norm,
        Self::Oversized,
        Self::Samples,
        Self::SecAgg,
    ];

    pub fn key(self) -> &'static str {
        match self {
            Self::Malformed => "malformed",
            Self::WrongFleet => "wrong_fleet",
            Self::WrongModel => "wrong_model",
            Self::WrongRound => "wrong_round",
            Self::WrongVersion => "wrong_version",
            Self::SpoofedSender => "spoofed_sender",
            Self::UnknownDevice => "unknown_device",
            Self::Duplicate => "duplicate",
            Self::NotFinite => "not_finite",
            Self::Norm => "norm",
            Self::Oversized => "oversized",
            Self::Samples => "samples",
            Self::SecAgg => "secagg_protocol",
        }
    }
}

/// The persisted round state.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RoundState {
    pub round: u64,
    pub global_version: u64,
    pub open: bool,
    pub deadline_unix: f64,
    pub started_unix: f64,
    /// Devices accepted in the open round, with their sample counts and message digests.
    pub accepted: BTreeMap<String, (u64, String)>,
    pub rejected: BTreeMap<String, u64>,
    pub update_bytes: u64,
    pub history: Vec<RoundSummary>,
    /// DP-FedAvg's privacy spent so far (saved with the rest, so a restart keeps ε).
    #[serde(default)]
    pub accountant: RdpAccountant,
    /// What each device accepted in the open round reported with its update (for the summary).
    #[serde(default)]
    pub reports: BTreeMap<String, DeviceReport>,
}

/// The aggregator's counters since the process started (`/metrics`); the round state on disk is
/// the record, these are for watching.
#[derive(Debug)]
pub struct AggregatorMetrics {
    pub updates_accepted: Counter,
    /// By [`Rejection::ALL`]'s order.
    pub rejected: [Counter; 13],
    /// Every update frame received, whatever became of it.
    pub frame_bytes: Counter,
    /// Compressed update bytes merged.
    pub accepted_bytes: Counter,
    pub rounds_closed: Counter,
    pub round_seconds: Histogram,
    /// Bytes held in incomplete chunked updates.
    pub reassembly_bytes: Gauge,
    pub round: Gauge,
    pub round_open: Gauge,
    pub global_version: Gauge,
}

impl Default for AggregatorMetrics {
    fn default() -> Self {
        Self {
            updates_accepted: Counter::default(),
            rejected: Default::default(),
            frame_bytes: Counter::default(),
            accepted_bytes: Counter::default(),
            rounds_closed: Counter::default(),
            round_seconds: Histogram::new(ROUND_BUCKETS),
            reassembly_bytes: Gauge::default(),
            round: Gauge::default(),
            round_open: Gauge::default(),
            global_version: Gauge::default(),
        }
    }
}

impl Collect for AggregatorMetrics {
    fn collect(&self, out: &mut Exposition) {
        out.counter(
            "microfed_aggregator_updates_accepted_total",
            "Device updates that passed every check and were merged into the round.",
            self.updates_accepted.get(),
        );
        let name = "microfed_aggregator_updates_rejected_total";
        out.family(
            name,
            MetricType::Counter,
            "Update messages refused, by reason (the round summary's keys).",
        );
        for (why, c) in Rejection::ALL.iter().zip(&self.rejected) {
            out.sample(name, &[("reason", why.key())], c.get() as f64);
        }
        out.counter(
            "microfed_aggregator_update_frame_bytes_total",
            "Bytes of update frames received, accepted or not.",
            self.frame_bytes.get(),
        );
        out.counter(
            "microfed_aggregator_accepted_update_bytes_total",
            "Compressed bytes of the accepted updates.",
            self.accepted_bytes.get(),
        );
        out.counter(
            "microfed_aggregator_rounds_closed_total",
            "Rounds closed (by quorum or deadline).",
            self.rounds_closed.get(),
        );
        out.histogram(
            "microfed_aggregator_round_duration_seconds",
            "Time from a round's opening to its close.",
            &self.round_seconds,
        );
        out.gauge(
            "microfed_aggregator_reassembly_bytes",
            "Bytes held in incomplete chunked updates (bounded by the reassembly limits).",
            self.reassembly_bytes.get(),
        );
        out.gauge(
            "microfed_aggregator_round",
            "The current (or last) round number.",
            self.round.get(),
        );
        out.gauge(
            "microfed_aggregator_round_open",
            "1 while a round is open.",
            self.round_open.get(),
        );
        out.gauge(
            "microfed_aggregator_global_version",
            "Version of the latest global decoder.",
            self.global_version.get(),
        );
    }
}

/// The running aggregator.
pub struct Aggregator {
    // `pub(super)`: the scale-out roles (federated::scaleout) drive the same state.
    pub(super) cfg: AggregatorConfig,
    pub(super) topics: Topics,
    pub(super) model_version: String,
    layout: Vec<TensorSpan>,
    classes: usize,
    pub(super) state: RoundState,
    global: Vec<f32>,
    pub(super) acc: Accumulator,
    server: ServerOptimizer,
    reassembler: Reassembler,
    /// Signs globals, announcements and summaries (`signing_key` in aggregator.toml).
    signing_key: Option<crate::wire::signing::SecretKey>,
    /// Shared with the `/metrics` listener.
    metrics: std::sync::Arc<AggregatorMetrics>,
    /// `[secure_aggregation]`: the open round's protocol (in memory only: a restart abandons it).
    secure: Option<SecureRound>,
    /// How the open secure round ends, once it has: its mean, or why nothing is merged.
    secure_close: Option<SecureClose>,
}

/// The end of a secure round.
#[derive(Debug)]
enum SecureClose {
    /// The mean of the contributors' quantised updates (what FedAvg with equal weights merges).
    Merge(Vec<f32>),
    /// Nothing merged, and why.
    Abandon(String),
}

impl std::fmt::Debug for Aggregator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Aggregator")
            .field("fleet", &self.cfg.fleet)
            .field("round", &self.state.round)
            .field("global_version", &self.state.global_version)
            .finish()
    }
}

/// The digest of a spooled chunk's file name `<64 hex digits>-<index>.frame`.
fn spooled_digest(name: &str) -> Option<&str> {
    let (digest, rest) = name.split_once('-')?;
    let index = rest.strip_suffix(".frame")?;
    (digest.len() == 64
        && digest.bytes().all(|b| b.is_ascii_hexdigit())
        && !index.is_empty()
        && index.bytes().all(|b| b.is_ascii_digit()))
    .then_some(digest)
}

fn file_err(path: &Path, e: impl std::fmt::Display) -> AggregatorError {
    AggregatorError::File {
        path: path.to_owned(),
        message: e.to_string(),
    }
}

impl Aggregator {
    /// Loads the base model and the persisted state (a restart resumes the open round).
    pub fn open(cfg: AggregatorConfig) -> Result<Self, AggregatorError> {
        let topics = Topics::new(&cfg.fleet).map_err(|message| AggregatorError::Config {
            path: cfg.state.clone(),
            message,
        })?;
        std::fs::create_dir_all(&cfg.state).map_err(|e| file_err(&cfg.state, e))?;
        let model_version =
            crate::model::manifest::sha256_file(&cfg.model).map_err(|e| file_err(&cfg.model, e))?;
        let proto = onnx::load(&cfg.model).map_err(|e| file_err(&cfg.model, e))?;
        let params = onnx::load_params(&proto, &cfg.model).map_err(|e| file_err(&cfg.model, e))?;
        let classes = params.classes;
        let layout = compress::decoder_layout(classes);
        let state_path = cfg.state.join("aggregator.json");
        let state: RoundState = match std::fs::read(&state_path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| file_err(&state_path, e))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => RoundState::default(),
            Err(e) => return Err(file_err(&state_path, e)),
        };
        // A scale-out worker only sums updates: it never holds the global decoder's files.
        let worker = cfg
            .scale_out
            .as_ref()
            .is_some_and(|s| s.role == Role::Worker);
        let global = if state.global_version == 0 || worker {
            params.decoder_flat()
        } else {
            let p = cfg
                .state
                .join(format!("global-{}.bin", state.global_version));
            let b = std::fs::read(&p).map_err(|e| file_err(&p, e))?;
            protocol::bytes_f32(&b).ok_or_else(|| file_err(&p, "not f32 values"))?
        };
        let server_path = cfg.state.join("server-optimizer.cbor");
        let server = match std::fs::read(&server_path) {
            Ok(b) => ciborium::from_reader::<ServerOptimizer, _>(b.as_slice())
                .map_err(|e| file_err(&server_path, e))?,
            Err(_) => ServerOptimizer::new(global.len(), &cfg.aggregation.server)?,
        };
        let acc = Accumulator::new(global.len(), &cfg.aggregation)?;
        let signing_key = match &cfg.signing_key {
            Some(p) => Some(crate::wire::signing::SecretKey::load(p).map_err(|e| file_err(p, e))?),
            None => {
                tracing::warn!(
                    "no signing_key in aggregator.toml: globals and round announcements go unsigned, \
                     and any client of the broker can forge them"
                );
                None
            }
        };
        if cfg.devices.is_empty() && cfg.broker.is_some() {
            tracing::warn!(
                "any_device = true in aggregator.toml: updates are taken under any device id and a \
                 round closes on the first one, so only the broker's ACL decides who takes part"
            );
        }
        let mut me = Self {
            signing_key,
            topics,
            model_version,
            layout,
            classes,
            state,
            global,
            acc,
            server,
            reassembler: Reassembler::new(ReassemblyLimits {
                max_message: MAX_UPDATE_BYTES,
                ..ReassemblyLimits::default()
            }),
            cfg,
            metrics: Default::default(),
            secure: None,
            secure_close: None,
        };
        if me.state.open && me.cfg.secure_aggregation.is_some() {
            // The protocol's state (and every device's round keys) lived in the old process: the
            // round cannot be resumed. Nothing of it was counted; it closes as abandoned.
            let why = format!(
                "the aggregator restarted during round {}'s secure aggregation; the protocol's \
                 state died with the old process, so the round is abandoned and nothing of it is \
                 merged",
                me.state.round
            );
            tracing::warn!(round = me.state.round, "{why}");
            me.secure_close = Some(SecureClose::Abandon(why));
        } else if me.state.open {
            me.replay_open_round()?;
        }
        me.replay_spool()?;
        me.show_round();
        Ok(me)
    }

    pub fn state(&self) -> &RoundState {
        &self.state
    }

    /// The counters `/metrics` serves.
    pub fn metrics(&self) -> std::sync::Arc<AggregatorMetrics> {
        self.metrics.clone()
    }

    /// The round gauges, after the round state changed.
    fn show_round(&self) {
        let m = &self.metrics;
        m.round.set(self.state.round as f64);
        m.round_open.set(if self.state.open { 1.0 } else { 0.0 });
        m.global_version.set(self.state.global_version as f64);
    }

    pub fn global(&self) -> &[f32] {
        &self.global
    }

    pub fn model_version(&self) -> &str {
        &self.model_version
    }

    /// Updates held in memory (0 for streaming FedAvg: only the running sum is kept).
    pub fn retained_updates(&self) -> usize {
        self.acc.retained_updates()
    }

    pub(super) fn round_dir(&self, round: u64) -> PathBuf {
        self.cfg.state.join(format!("round-{round}"))
    }

    pub(super) fn replay_open_round(&mut self) -> Result<(), AggregatorError> {
        let dir = self.round_dir(self.state.round);
        let accepted = self.state.accepted.clone();
        for device in accepted.keys() {
            let path = dir.join(format!("{device}.msg"));
            let bytes = std::fs::read(&path).map_err(|e| file_err(&path, e))?;
            let env = Envelope::from_bytes(&bytes, usize::MAX)?;
            let body: UpdateBody = env.body(Kind::Update)?;
            let update = compress::decompress(&body.compressed, &self.layout)
                .map_err(|e| file_err(&path, e))?;
            self.accumulate(device, update, body.samples)?;
        }
        tracing::info!(
            round = self.state.round,
            replayed = self.state.accepted.len(),
            "resumed the open round from disk"
        );
        Ok(())
    }

    pub(super) fn save_state(&self) -> Result<(), AggregatorError> {
        let path = self.cfg.state.join("aggregator.json");
        let text = serde_json::to_vec_pretty(&self.state).map_err(|e| file_err(&path, e))?;
        write_atomic(&path, &text).map_err(|e| file_err(&path, e))
    }

    pub(super) fn header(&self) -> Header<'_> {
        Header {
            fleet: &self.cfg.fleet,
            round: self.state.round,
            model_version: &self.model_version,
            sender: &self.cfg.id,
        }
    }

    pub(super) fn announcement(&self) -> RoundAnnouncement {
        RoundAnnouncement {
            round: self.state.round,
            global_version: self.state.global_version,
            global_digest: protocol::sha256_hex(&protocol::f32_bytes(&self.global)),
            deadline_unix: self.state.deadline_unix,
            local_epochs: self.cfg.round.local_epochs,
            steps_per_epoch: self.cfg.round.steps_per_epoch,
            learning_rate: self
                .cfg
                .round
                .schedule(self.cfg.rounds)
                .rate(self.cfg.round.learning_rate, self.state.round),
            prox_mu: self.cfg.round.prox_mu,
            optimizer: self.cfg.round.optimizer,
            compression: self.cfg.compression.clone(),
            closed: !self.state.open,
        }
    }

    /// Opens the next round (state saved before anything is announced).
    pub fn open_round(&mut self) -> Result<(), AggregatorError> {
        if let Some(epsilon) = self.next_round_over_budget()? {
            return Err(AggregatorError::PrivacyBudget {
                round: self.state.round + 1,
                epsilon,
                max: self
                    .cfg
                    .dp
                    .as_ref()
                    .and_then(|d| d.max_epsilon)
                    .unwrap_or(0.0),
            });
        }
        self.state.round += 1;
        self.state.open = true;
        self.state.started_unix = now_unix();
        self.state.deadline_unix = self.state.started_unix + self.cfg.round.deadline_s;
        self.state.accepted.clear();
        self.state.rejected.clear();
        self.state.update_bytes = 0;
        self.state.reports.clear();
        self.acc = Accumulator::new(self.global.len(), &self.cfg.aggregation)?;
        self.secure = None;
        self.secure_close = None;
        self.save_state()?;
        self.show_round();
        tracing::info!(
            round = self.state.round,
            global_version = self.state.global_version,
            "round open"
        );
        Ok(())
    }

    pub(super) fn reject(&mut self, why: Rejection, detail: &str) {
        if let Some(i) = Rejection::ALL.iter().position(|r| *r == why) {
            self.metrics.rejected[i].inc();
        }
        *self
            .state
            .rejected
            .entry(why.key().to_string())
            .or_default() += 1;
        tracing::warn!(round = self.state.round, reason = why.key(), "{detail}");
    }

    /// Handles one frame from an update topic: counts, rejects or (once whole) accepts it.
    pub fn handle_update_frame(
        &mut self,
        topic: &str,
        payload: &[u8],
    ) -> Result<(), AggregatorError> {
        self.metrics.frame_bytes.add(payload.len() as u64);
        let r = self.handle_frame_inner(topic, payload);
        self.metrics
            .reassembly_bytes
            .set(self.reassembler.held() as f64);
        r
    }

    fn handle_frame_inner(&mut self, topic: &str, payload: &[u8]) -> Result<(), AggregatorError> {
        let Some(device) = self.topics.device_of("update", topic).map(str::to_owned) else {
            self.reject(
                Rejection::Malformed,
                &format!("update on unexpected topic {topic}"),
            );
            return Ok(());
        };
        // A sharded worker receives every update and keeps its shard's: another worker takes (and
        // counts) the rest.
        if let Some(so) = &self.cfg.scale_out
            && !so.takes(&device, &self.cfg.devices)
        {
            return Ok(());
        }
        // Before reassembly: frames from a device that may not take part hold no memory.
        if !self.cfg.devices.is_empty() && !self.cfg.devices.contains(&device) {
            self.reject(
                Rejection::UnknownDevice,
                &format!("update frame from unknown device {device}"),
            );
            return Ok(());
        }
        let whole = match self.reassembler.push(topic, payload) {
            Ok(Some(w)) => w,
            Ok(None) => {
                // One chunk of a dense update: on disk before the broker is told it arrived.
                self.spool_frame(&device, payload)?;
                self.prune_spool(&device);
                return Ok(());
            }
            Err(e) => {
                let why = Rejection::of_frame_error(&e);
                self.reject(why, &format!("{topic}: {e}"));
                self.prune_spool(&device);
                return Ok(());
            }
        };
        self.handle_update_message(&device, &whole)?;
        self.prune_spool(&device);
        Ok(())
    }

    /// `state/partial/<device, hex>/`: the chunks of `device`'s incomplete chunked updates. Each
    /// chunk is written here before it is acknowledged to the broker, so a crash in the middle of a
    /// dense (multi-chunk) update loses no chunk the broker has forgotten; a restart reads them
    /// back ([`Aggregator::replay_spool`]). The device id is hex-encoded: it comes from a topic.
    fn spool_dir(&self, device: &str) -> PathBuf {
        self.cfg.state.join("partial").join(hex::encode(device))
    }

    fn spool_frame(&self, device: &str, payload: &[u8]) -> Result<(), AggregatorError> {
        // The reassembler has just taken this frame: its header is valid (digest: 64 hex digits).
        let f: protocol::Frame = protocol::from_cbor("frame", payload)?;
        let dir = self.spool_dir(device);
        std::fs::create_dir_all(&dir).map_err(|e| file_err(&dir, e))?;
        let path = dir.join(format!("{}-{:010}.frame", f.digest, f.index));
        write_atomic(&path, payload).map_err(|e| file_err(&path, e))
    }

    /// Deletes the spooled chunks of `device`'s messages that the reassembler no longer holds
    /// (completed and handled, evicted, timed out): the spool never outgrows the reassembler's
    /// bounds. Only files named `<64 hex digits>-<index>.frame` are touched.
    fn prune_spool(&self, device: &str) {
        let dir = self.spool_dir(device);
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return;
        };
        let stream = self.topics.update(device);
        let mut left = 0;
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(digest) = spooled_digest(&name) else {
                left += 1;
                continue;
            };
            if self.reassembler.holds(&stream, digest) {
                left += 1;
            } else if let Err(e) = std::fs::remove_file(entry.path()) {
                tracing::warn!(path = %entry.path().display(), error = %e, "cannot delete a spooled chunk");
                left += 1;
            }
        }
        if left == 0 {
            let _ = std::fs::remove_dir(&dir);
        }
    }

    /// At start: the spooled chunks go back into the reassembler (a message they complete is
    /// handled as if it had just arrived: one counted before the crash is a duplicate).
    fn replay_spool(&mut self) -> Result<(), AggregatorError> {
        let root = self.cfg.state.join("partial");
        let Ok(devices) = std::fs::read_dir(&root) else {
            return Ok(());
        };
        let mut chunks = 0;
        for d in devices.flatten() {
            let Some(device) = hex::decode(d.file_name().to_string_lossy().as_bytes())
                .ok()
                .and_then(|b| String::from_utf8(b).ok())
            else {
                continue;
            };
            // A chunk being written when the process died was not acknowledged: the broker
            // delivers it again. Its temporary file goes.
            if let Err(e) = crate::fsio::remove_stale_temporaries(&d.path()) {
                tracing::warn!(error = %e, "cannot remove temporaries from the chunk spool");
            }
            let mut files: Vec<PathBuf> = std::fs::read_dir(d.path())
                .map_err(|e| file_err(&d.path(), e))?
                .flatten()
                .map(|e| e.path())
                .filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| spooled_digest(n).is_some())
                })
                .collect();
            files.sort();
            let topic = self.topics.update(&device);
            for path in files {
                // Bounded like any frame: the reassembler refuses one above the packet limit.
                let bytes = std::fs::read(&path).map_err(|e| file_err(&path, e))?;
                chunks += 1;
                match self.reassembler.push(&topic, &bytes) {
                    Ok(Some(whole)) => self.handle_update_message(&device, &whole)?,
                    Ok(None) => {}
                    Err(e) => {
                        tracing::warn!(path = %path.display(), error = %e, "dropping a spooled chunk")
                    }
                }
            }
            self.prune_spool(&device);
        }
        if chunks > 0 {
            tracing::info!(
                chunks,
                pending = self.reassembler.pending(),
                "read back the chunks of incomplete updates from disk"
            );
        }
        Ok(())
    }

    /// Checks and counts one whole update message from `device` (the topic's device).
    pub fn handle_update_message(
        &mut self,
        device: &str,
        bytes: &[u8],
    ) -> Result<(), AggregatorError> {
        let env = match Envelope::from_bytes(bytes, MAX_UPDATE_BYTES) {
            Ok(e) => e,
            Err(e) => {
                let why = Rejection::of_frame_error(&e);
                self.reject(why, &format!("update from {device}: {e}"));
                return Ok(());
            }
        };
        let body: UpdateBody = match env.body(Kind::Update) {
            Ok(b) => b,
            Err(e) => {
                self.reject(Rejection::Malformed, &format!("update from {device}: {e}"));
                return Ok(());
            }
        };
        if env.fleet != self.cfg.fleet {
            self.reject(
                Rejection::WrongFleet,
                &format!("update from {device} for fleet {}", env.fleet),
            );
            return Ok(());
        }
        if env.model_version != self.model_version {
            self.reject(
                Rejection::WrongModel,
                &format!("update from {device} for base model {}", env.model_version),
            );
            return Ok(());
        }
        if env.sender != device || body.device != device {
            self.reject(
                Rejection::SpoofedSender,
                &format!(
                    "update on {device}'s topic claims to be from {}",
                    env.sender
                ),
            );
            return Ok(());
        }
        if !self.cfg.devices.is_empty() && !self.cfg.devices.iter().any(|d| d == device) {
            self.reject(
                Rejection::UnknownDevice,
                &format!("update from unknown device {device}"),
            );
            return Ok(());
        }
        if !self.state.open || env.round != self.state.round {
            self.reject(
                Rejection::WrongRound,
                &format!(
                    "update from {device} for round {} (open round: {})",
                    env.round,
                    if self.state.open {
                        self.state.round.to_string()
                    } else {
                        "none".into()
                    }
                ),
            );
            return Ok(());
        }
        if body.global_version != self.state.global_version {
            self.reject(
                Rejection::WrongVersion,
                &format!(
                    "update from {device} trained from global version {}, the round's is {}",
                    body.global_version, self.state.global_version
                ),
            );
            return Ok(());
        }
        if self.state.accepted.contains_key(device) {
            self.reject(
                Rejection::Duplicate,
                &format!("second update from {device} this round"),
            );
            return Ok(());
        }
        if body.samples > self.cfg.max_samples {
            self.reject(
                Rejection::Samples,
                &format!(
                    "update from {device} claims {} training samples, above max_samples {}",
                    body.samples, self.cfg.max_samples
                ),
            );
            return Ok(());
        }
        let update = match compress::decompress(&body.compressed, &self.layout) {
            Ok(u) => u,
            Err(e) => {
                let why = if matches!(e, compress::CompressError::NonFinite { .. }) {
                    Rejection::NotFinite
                } else {
                    Rejection::Malformed
                };
                self.reject(why, &format!("update from {device}: {e}"));
                return Ok(());
            }
        };
        if update.iter().any(|v| !v.is_finite()) || body.samples == 0 {
            self.reject(
                Rejection::NotFinite,
                &format!("update from {device} is not finite or has no samples"),
            );
            return Ok(());
        }
        let norm = update
            .iter()
            .map(|v| f64::from(*v).powi(2))
            .sum::<f64>()
            .sqrt();
        if norm > f64::from(self.cfg.max_update_norm) {
            self.reject(
                Rejection::Norm,
                &format!(
                    "update from {device} has norm {norm:.3e} > {}",
                    self.cfg.max_update_norm
                ),
            );
            return Ok(());
        }
        // Durable before counted: a restart replays this file.
        let dir = self.round_dir(self.state.round);
        std::fs::create_dir_all(&dir).map_err(|e| file_err(&dir, e))?;
        let path = dir.join(format!("{device}.msg"));
        write_atomic(&path, bytes).map_err(|e| file_err(&path, e))?;
        if let Err(e) = self.accumulate(device, update, body.samples) {
            self.reject(Rejection::Malformed, &format!("update from {device}: {e}"));
            let _ = std::fs::remove_file(&path);
            return Ok(());
        }
        self.state
            .accepted
            .insert(device.to_owned(), (body.samples, env.digest.clone()));
        self.state.update_bytes += body.compressed.len() as u64;
        self.state.reports.insert(
            device.to_owned(),
            DeviceReport {
                bytes: body.compressed.len() as u64,
                samples: body.samples,
                train_loss: body.metrics.train_loss,
                holdout_iou: body.metrics.holdout_mean_iou,
                holdout_iou_before: body.metrics.holdout_mean_iou_before,
            },
        );
        self.save_state()?;
        self.metrics.updates_accepted.inc();
        self.metrics
            .accepted_bytes
            .add(body.compressed.len() as u64);
        tracing::info!(
            round = self.state.round,
            %device,
            samples = body.samples,
            bytes = body.compressed.len(),
            loss = body.metrics.train_loss,
            accepted = self.state.accepted.len(),
            "update accepted"
        );
        Ok(())
    }

    /// Adds an accepted update to the round's accumulator: as it is, weighted by its samples, or
    /// under DP clipped to `C` with weight 1 (DP-FedAvg's sensitivity bound).
    fn accumulate(
        &mut self,
        device: &str,
        mut update: Vec<f32>,
        samples: u64,
    ) -> Result<(), AggregatorError> {
        match &self.cfg.dp {
            None => self.acc.add(device, &update, samples)?,
            Some(d) => {
                dp::clip(&mut update, d.clip_norm)?;
                self.acc.add(device, &update, 1)?
            }
        };
        Ok(())
    }

    /// The accountant's sampling rate: the configured one, else 1. Amplification by sampling holds
    /// only for a random, undisclosed subset of labs; the labs of a round are the ones that chose
    /// to answer, and the summary names them, so the share of listed devices that took part is no
    /// sampling rate (it under-stated ε when it was the default).
    fn sampling_rate(&self) -> f64 {
        self.cfg
            .dp
            .as_ref()
            .and_then(|d| d.sampling_rate)
            .unwrap_or(1.0)
    }

    /// The name of the DP mechanism in the privacy reports.
    fn dp_mechanism(&self) -> &'static str {
        if self.cfg.secure_aggregation.is_some() {
            DP_MECHANISM_SECURE
        } else {
            DP_MECHANISM
        }
    }

    /// The privacy spent so far (none without `[dp]`).
    pub fn privacy(&self) -> Option<PrivacyReport> {
        let d = self.cfg.dp.as_ref()?;
        let q = self
            .state
            .history
            .iter()
            .rev()
            .find_map(|s| s.privacy.as_ref().map(|p| p.sampling_rate))
            .unwrap_or_else(|| d.worst_case_rate());
        Some(PrivacyReport::new(
            self.dp_mechanism(),
            &d.config(q),
            &self.state.accountant,
        ))
    }

    /// Checks the next round against `dp.max_epsilon`, assuming the worst-case sampling rate:
    /// `Ok(None)` when it stays within the budget (or no budget is set), `Ok(Some(ε))` with the ε it
    /// could reach when it would exceed it.
    pub fn next_round_over_budget(&self) -> Result<Option<f64>, AggregatorError> {
        let Some(d) = &self.cfg.dp else {
            return Ok(None);
        };
        let Some(max) = d.max_epsilon else {
            return Ok(None);
        };
        let mut next = self.state.accountant.clone();
        next.step(d.worst_case_rate(), d.noise_multiplier, 1)?;
        let eps = next.epsilon(d.delta).0;
        Ok((eps > max).then_some(eps))
    }

    /// True when the open round may close: quorum reached or deadline passed.
    pub fn round_due(&self) -> bool {
        if self.cfg.secure_aggregation.is_some() {
            // The protocol's own deadlines end a secure round.
            return self.state.open && self.secure_close.is_some();
        }
        self.state.open
            && (self.state.accepted.len() >= self.cfg.quorum()
                || now_unix() >= self.state.deadline_unix)
    }

    /// Merges the accepted updates into the next global version and closes the round.
    pub fn close_round(&mut self) -> Result<RoundSummary, AggregatorError> {
        // Chunks of messages given up (timed out) while their devices sent nothing more.
        if let Ok(devices) = std::fs::read_dir(self.cfg.state.join("partial")) {
            for d in devices.flatten() {
                if let Some(device) = hex::decode(d.file_name().to_string_lossy().as_bytes())
                    .ok()
                    .and_then(|b| String::from_utf8(b).ok())
                {
                    self.prune_spool(&device);
                }
            }
        }
        let accepted: Vec<String> = self.state.accepted.keys().cloned().collect();
        let samples: u64 = self.state.accepted.values().map(|(s, _)| s).sum();
        let mut privacy = None;
        let mut abandoned = None;
        let merged = match self.secure_close.take() {
            Some(SecureClose::Merge(mean)) => Some(mean),
            Some(SecureClose::Abandon(why)) => {
                abandoned = Some(why);
                None
            }
            None if accepted.is_empty() => None,
            None => Some(self.acc.finish()?),
        };
        self.secure = None;
        if let Some(mut update) = merged {
            if let Some(d) = &self.cfg.dp {
                // `update` is the sum of the clipped updates over n; N(0, (zC)²) on the sum is
                // N(0, (zC/n)²) on the mean. OS-seeded ChaCha20: DP noise must not be predictable.
                let q = self.sampling_rate();
                let cfg = d.config(q);
                let n = accepted.len() as f64;
                let mut rng = <rand_chacha::ChaCha20Rng as rand::SeedableRng>::from_os_rng();
                dp::gaussian(
                    &mut update,
                    d.noise_multiplier * f64::from(d.clip_norm) / n,
                    &mut rng,
                )?;
                self.state.accountant.step(q, d.noise_multiplier, 1)?;
                privacy = Some(PrivacyReport::new(
                    self.dp_mechanism(),
                    &cfg,
                    &self.state.accountant,
                ));
            }
            self.server.apply(&mut self.global, &update)?;
            let version = self.state.global_version + 1;
            let path = self.cfg.state.join(format!("global-{version}.bin"));
            write_atomic(&path, &protocol::f32_bytes(&self.global))
                .map_err(|e| file_err(&path, e))?;
            let sp = self.cfg.state.join("server-optimizer.cbor");
            let bytes = protocol::to_cbor("server optimizer", &self.server)?;
            write_atomic(&sp, &bytes).map_err(|e| file_err(&sp, e))?;
            self.state.global_version = version;
        }
        let expected: BTreeSet<&String> = self.cfg.devices.iter().collect();
        let stragglers: Vec<String> = expected
            .into_iter()
            .filter(|d| !self.state.accepted.contains_key(*d))
            .cloned()
            .collect();
        let summary = RoundSummary {
            round: self.state.round,
            global_version: self.state.global_version,
            accepted,
            stragglers,
            rejected: self.state.rejected.clone(),
            update_bytes: self.state.update_bytes,
            samples,
            seconds: now_unix() - self.state.started_unix,
            // A round that merged nothing released nothing new: the last report stands.
            privacy: privacy.or_else(|| self.privacy()),
            devices: self
                .state
                .reports
                .iter()
                .filter(|(d, _)| self.state.accepted.contains_key(*d))
                .map(|(d, r)| (d.clone(), r.clone()))
                .collect(),
            secure_aggregation: self.cfg.secure_aggregation.is_some(),
            abandoned,
        };
        self.state.open = false;
        self.state.history.push(summary.clone());
        self.save_state()?;
        self.prune_updates();
        self.metrics.rounds_closed.inc();
        self.metrics.round_seconds.observe(summary.seconds.max(0.0));
        self.show_round();
        tracing::info!(
            round = summary.round,
            global_version = summary.global_version,
            accepted = summary.accepted.len(),
            stragglers = ?summary.stragglers,
            rejected = ?summary.rejected,
            bytes = summary.update_bytes,
            "round closed"
        );
        Ok(summary)
    }

    /// Deletes the raw updates of closed rounds beyond the newest `keep_update_rounds` (all of
    /// them with 0). Only `round-N` folders are touched; a failure is logged, not fatal: the round
    /// is merged and saved already.
    fn prune_updates(&self) {
        let keep = self.cfg.keep_update_rounds;
        let Ok(entries) = std::fs::read_dir(&self.cfg.state) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(round) = name
                .to_str()
                .and_then(|n| n.strip_prefix("round-"))
                .and_then(|n| n.parse::<u64>().ok())
            else {
                continue;
            };
            if round.saturating_add(keep) <= self.state.round
                && entry.path().is_dir()
                && let Err(e) = std::fs::remove_dir_all(entry.path())
            {
                tracing::warn!(path = %entry.path().display(), error = %e, "cannot delete a merged round's updates");
            }
        }
    }

    /// Signed with the aggregator's key when `signing_key` is configured (agents with
    /// `aggregator_key` accept nothing else).
    fn signed(&self, env: Envelope) -> Result<Envelope, AggregatorError> {
        Ok(match &self.signing_key {
            Some(k) => env.sign(k)?,
            None => env,
        })
    }

    pub(super) async fn publish_global(&self, link: &Link) -> Result<(), AggregatorError> {
        let g = GlobalDecoder::new(
            self.state.global_version,
            self.state.round,
            self.classes,
            &self.global,
        );
        let env = self.signed(Envelope::seal(Kind::GlobalDecoder, &self.header(), &g)?)?;
        let frames = protocol::split(&env.to_bytes()?, CHUNK_BYTES)?;
        let topics = self.topics.clone();
        link.publish_frames(|i| topics.global_chunk(i as u32), frames, true)
            .await?;
        Ok(())
    }

    pub(super) async fn publish_announcement(&self, link: &Link) -> Result<(), AggregatorError> {
        let env = self.signed(Envelope::seal(
            Kind::RoundAnnouncement,
            &self.header(),
            &self.announcement(),
        )?)?;
        link.publish(&self.topics.round(), env.to_bytes()?, true)
            .await?;
        Ok(())
    }

    pub(super) async fn publish_summary(
        &self,
        link: &Link,
        s: &RoundSummary,
    ) -> Result<(), AggregatorError> {
        let env = self.signed(Envelope::seal(Kind::RoundSummary, &self.header(), s)?)?;
        link.publish(&self.topics.summary(), env.to_bytes()?, true)
            .await?;
        Ok(())
    }

    /// At start (or restart): waits for the broker, then publishes the current global (version 0 =
    /// the base model's decoder) and the open round's announcement, if a round is open.
    pub(super) async fn publish_current(
        &mut self,
        link: &Link,
        stop: &mut watch::Receiver<bool>,
    ) -> Result<(), AggregatorError> {
        link.wait_connected(Duration::from_secs(30)).await?;
        retry(|| self.publish_global(link), stop).await?;
        if self.state.open {
            retry(|| self.publish_announcement(link), stop).await?;
        }
        Ok(())
    }

    /// Runs rounds on `link` until the configured number is done or `stop` turns true. Publishing
    /// retries while the broker is away; updates keep arriving through `inbox`.
    pub async fn run(
        mut self,
        link: &Link,
        mut inbox: tokio::sync::mpsc::Receiver<Message>,
        mut stop: watch::Receiver<bool>,
    ) -> Result<RoundState, AggregatorError> {
        self.publish_current(link, &mut stop).await?;
        let mut held = Held::default();
        loop {
            if *stop.borrow() {
                break;
            }
            if !self.state.open && !self.open_next_round(link, &mut stop).await? {
                break;
            }
            tokio::select! {
                m = inbox.recv() => match m {
                    Some(m) if self.cfg.secure_aggregation.is_some() => {
                        let actions = self.take_secure_frame(&m.topic, &m.payload);
                        self.perform_secure(link, actions, &mut stop).await?;
                    }
                    Some(m) => self.take_or_hold(m, &mut held)?,
                    None => break,
                },
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                _ = stop.changed() => {}
            }
            if !held.0.is_empty() {
                self.retry_held(&mut held)?;
            }
            if let Some(r) = self.secure.as_mut() {
                let actions = r.handle(SecureEvent::Tick, now_unix());
                self.perform_secure(link, actions, &mut stop).await?;
            }
            // A round is not closed over updates that are waiting for the disk.
            if held.0.is_empty() && self.round_due() {
                let summary = self.close_round()?;
                retry(|| self.publish_global(link), &mut stop).await?;
                retry(|| self.publish_announcement(link), &mut stop).await?;
                retry(|| self.publish_summary(link, &summary), &mut stop).await?;
            }
        }
        Ok(self.state)
    }
}

/// Most update frames held, unacknowledged, while their writes fail; beyond it the aggregator stops
/// (the broker delivers them again to the next session).
const MAX_HELD: usize = 512;

/// Update frames whose handling failed on a write (a full disk, say), oldest first, kept
/// unacknowledged and handled again until writes work. `counted`: the update is in the round's sums
/// and in `accepted`, only `aggregator.json` could not be saved: it is acknowledged once the state
/// is saved, not handled again (that would count a spurious duplicate). Dropped with the
/// aggregator (stop or error), their acknowledgements are withheld.
#[derive(Default)]
struct Held(std::collections::VecDeque<(Message, bool)>);

impl Drop for Held {
    fn drop(&mut self) {
        for (m, _) in &self.0 {
            m.withhold_ack();
        }
    }
}

impl Aggregator {
    /// One update frame in the single aggregator's loop: handled, or, when a write failed, held
    /// (not acknowledged) to be handled again; the process goes on. Frames after a held one wait
    /// behind it, so a device's chunks stay in order.
    fn take_or_hold(&mut self, m: Message, held: &mut Held) -> Result<(), AggregatorError> {
        if !held.0.is_empty() {
            held.0.push_back((m, false));
        } else {
            let before = self.state.accepted.len();
            match self.handle_update_frame(&m.topic, &m.payload) {
                Ok(()) => return Ok(()),
                Err(e @ AggregatorError::File { .. }) => {
                    tracing::error!(
                        error = %e,
                        "cannot write an update to disk; holding it unacknowledged and retrying \
                         (the process goes on; free space on the disk)"
                    );
                    let counted = self.state.accepted.len() > before;
                    held.0.push_back((m, counted));
                }
                Err(e) => {
                    m.withhold_ack();
                    return Err(e);
                }
            }
        }
        if held.0.len() > MAX_HELD {
            return Err(AggregatorError::File {
                path: self.cfg.state.clone(),
                message: format!(
                    "more than {MAX_HELD} update frames wait for the disk; stopping (the broker \
                     delivers them again to the next session)"
                ),
            });
        }
        Ok(())
    }

    /// Handles held frames again, oldest first, while writes work.
    fn retry_held(&mut self, held: &mut Held) -> Result<(), AggregatorError> {
        if held.0.iter().any(|(_, counted)| *counted)
            && let Err(e) = self.save_state()
        {
            tracing::debug!(error = %e, "still cannot save the state");
            return Ok(());
        }
        let waiting = held.0.len();
        while let Some((m, counted)) = held.0.front_mut() {
            if *counted {
                // The state with it is saved now: acknowledged as it drops.
                held.0.pop_front();
                continue;
            }
            let before = self.state.accepted.len();
            match self.handle_update_frame(&m.topic, &m.payload) {
                Ok(()) => {
                    held.0.pop_front();
                }
                Err(e @ AggregatorError::File { .. }) => {
                    tracing::debug!(error = %e, "still cannot write");
                    *counted = self.state.accepted.len() > before;
                    return Ok(());
                }
                Err(e) => {
                    m.withhold_ack();
                    return Err(e);
                }
            }
        }
        tracing::info!(
            frames = waiting,
            "writes work again: every held update frame is handled"
        );
        Ok(())
    }

    /// One received update frame, for the single process and a scale-out worker alike: handled, and
    /// acknowledged to the broker when the message is dropped; on an error (a failed write) its
    /// acknowledgement is withheld, so the broker delivers it again to the next session.
    pub(super) fn take_update_frame(&mut self, m: &Message) -> Result<(), AggregatorError> {
        self.handle_update_frame(&m.topic, &m.payload)
            .inspect_err(|_| m.withhold_ack())
    }

    /// Between rounds, for the single process and the scale-out coordinator alike: false when it is
    /// time to stop (every configured round has run, or the next one could overspend the privacy
    /// budget); otherwise waits the configured pause, opens the next round and announces it.
    pub(super) async fn open_next_round(
        &mut self,
        link: &Link,
        stop: &mut watch::Receiver<bool>,
    ) -> Result<bool, AggregatorError> {
        if self.cfg.rounds > 0 && self.state.round >= self.cfg.rounds {
            return Ok(false);
        }
        if let Some(epsilon) = self.next_round_over_budget()? {
            tracing::warn!(
                round = self.state.round + 1,
                epsilon,
                max_epsilon = ?self.cfg.dp.as_ref().and_then(|d| d.max_epsilon),
                "privacy budget spent: not opening the next round; stopping"
            );
            return Ok(false);
        }
        if self.state.round > 0 && self.cfg.round.pause_s > 0.0 {
            tokio::time::sleep(Duration::from_secs_f64(self.cfg.round.pause_s)).await;
        }
        self.open_round()?;
        retry(|| self.publish_announcement(link), stop).await?;
        if self.cfg.secure_aggregation.is_some() {
            let actions = self.start_secure();
            self.perform_secure(link, actions, stop).await?;
        }
        Ok(true)
    }

    /// The open round's secure aggregation: its start messages (or, when it cannot start, its end).
    fn start_secure(&mut self) -> Vec<SecureAction> {
        let Some(sa) = &self.cfg.secure_aggregation else {
            return Vec::new();
        };
        let n = self.cfg.devices.len();
        let dense = self.global.len();
        let support = sa.support_fraction.map(|_| Support {
            seed: rand::Rng::random(
                &mut <rand_chacha::ChaCha20Rng as rand::SeedableRng>::from_os_rng(),
            ),
            dense,
        });
        let len = sa.support_fraction.map_or(dense, |f| {
            ((f * dense as f64).ceil() as usize).clamp(1, dense)
        });
        let config = SecAggConfig {
            threshold: sa.threshold_for(n),
            clip: sa.value_clip,
            ring_bits: ring_bits_for(n),
            len,
            norm_clip: self.cfg.dp.as_ref().map(|d| d.clip_norm),
            support,
        };
        match SecureRound::start(
            self.state.round,
            config,
            &self.cfg.devices,
            self.cfg.quorum(),
            self.state.deadline_unix,
            sa.step_timeout_s,
        ) {
            Ok((r, actions)) => {
                tracing::info!(
                    round = self.state.round,
                    threshold = r.config().threshold,
                    ring_bits = r.config().ring_bits,
                    "secure aggregation: round started"
                );
                self.secure = Some(r);
                actions
            }
            Err(e) => vec![SecureAction::Failed(e.to_string())],
        }
    }

    /// One frame on `update/<device>` in a secure round: reassembled, checked like an update's
    /// envelope, and given to the protocol. Nothing is written to disk: a restart abandons the
    /// round.
    fn take_secure_frame(&mut self, topic: &str, payload: &[u8]) -> Vec<SecureAction> {
        self.metrics.frame_bytes.add(payload.len() as u64);
        let Some(device) = self.topics.device_of("update", topic).map(str::to_owned) else {
            self.reject(
                Rejection::Malformed,
                &format!("message on unexpected topic {topic}"),
            );
            return Vec::new();
        };
        if !self.cfg.devices.contains(&device) {
            self.reject(
                Rejection::UnknownDevice,
                &format!("secure-aggregation frame from unknown device {device}"),
            );
            return Vec::new();
        }
        let whole = match self.reassembler.push(topic, payload) {
            Ok(Some(w)) => w,
            Ok(None) => return Vec::new(),
            Err(e) => {
                let why = Rejection::of_frame_error(&e);
                self.reject(why, &format!("{topic}: {e}"));
                return Vec::new();
            }
        };
        self.metrics
            .reassembly_bytes
            .set(self.reassembler.held() as f64);
        let env = match Envelope::from_bytes(&whole, MAX_UPDATE_BYTES) {
            Ok(e) => e,
            Err(e) => {
                self.reject(Rejection::Malformed, &format!("from {device}: {e}"));
                return Vec::new();
            }
        };
        if env.kind == Kind::Update {
            // A device without [federation.secure_aggregation] sent its update in the clear: it is
            // discarded unread (not decoded, not stored, not counted).
            self.reject(
                Rejection::Malformed,
                &format!(
                    "a plain update from {device} in a secure round: discarded unread (the device \
                     needs [federation.secure_aggregation])"
                ),
            );
            return Vec::new();
        }
        if env.fleet != self.cfg.fleet {
            self.reject(
                Rejection::WrongFleet,
                &format!("from {device} for fleet {}", env.fleet),
            );
            return Vec::new();
        }
        if env.model_version != self.model_version {
            self.reject(
                Rejection::WrongModel,
                &format!("from {device} for another base model"),
            );
            return Vec::new();
        }
        if env.sender != device {
            self.reject(
                Rejection::SpoofedSender,
                &format!("on {device}'s topic, claims to be from {}", env.sender),
            );
            return Vec::new();
        }
        if !self.state.open || env.round != self.state.round {
            self.reject(
                Rejection::WrongRound,
                &format!(
                    "secure-aggregation message from {device} for round {}",
                    env.round
                ),
            );
            return Vec::new();
        }
        let msg: ClientMessage = match env.body(Kind::SecAgg) {
            Ok(m) => m,
            Err(e) => {
                self.reject(Rejection::Malformed, &format!("from {device}: {e}"));
                return Vec::new();
            }
        };
        self.state.update_bytes += whole.len() as u64;
        match self.secure.as_mut() {
            Some(r) => r.handle(SecureEvent::Message { device, msg }, now_unix()),
            None => {
                self.reject(
                    Rejection::WrongRound,
                    &format!(
                        "secure-aggregation message from {device}: no secure round is running"
                    ),
                );
                Vec::new()
            }
        }
    }

    /// Does what the secure round asks: sends (signed, chunked), counts refusals, ends the round.
    async fn perform_secure(
        &mut self,
        link: &Link,
        actions: Vec<SecureAction>,
        stop: &mut watch::Receiver<bool>,
    ) -> Result<(), AggregatorError> {
        for a in actions {
            match a {
                SecureAction::Send { to, msg, retain } => {
                    let env = self.signed(Envelope::seal(Kind::SecAgg, &self.header(), &msg)?)?;
                    let frames = protocol::split(&env.to_bytes()?, CHUNK_BYTES)?;
                    let topic = self.topics.secagg(&to);
                    retry(
                        || async {
                            link.publish_frames(|_| topic.clone(), frames.clone(), retain)
                                .await
                                .map_err(AggregatorError::from)
                        },
                        stop,
                    )
                    .await?;
                }
                SecureAction::Refused { device, reason } => {
                    self.reject(Rejection::SecAgg, &format!("secure aggregation: {reason}"));
                    tracing::debug!(%device, "secure-aggregation message refused");
                }
                SecureAction::Finished(agg) => {
                    tracing::info!(
                        round = agg.round,
                        contributors = ?agg.contributors,
                        dropped = ?agg.dropped,
                        "secure aggregation: the sum is unmasked"
                    );
                    let merged = match self.secure.as_ref() {
                        Some(r) => merged_mean(r.config(), &agg, self.global.len()),
                        None => Err("no secure round".into()),
                    };
                    match merged {
                        Ok(m) => {
                            for d in &agg.contributors {
                                self.state
                                    .accepted
                                    .insert(d.clone(), (1, "secure-aggregation".into()));
                            }
                            self.secure_close = Some(SecureClose::Merge(m));
                        }
                        Err(e) => {
                            self.secure_close =
                                Some(SecureClose::Abandon(format!("the secure sum: {e}")))
                        }
                    }
                }
                SecureAction::Failed(why) => {
                    tracing::warn!(round = self.state.round, "secure aggregation failed: {why}");
                    self.secure_close = Some(SecureClose::Abandon(format!(
                        "secure aggregation failed: {why}"
                    )));
                }
            }
        }
        Ok(())
    }
}

/// Retries a publish until it succeeds or `stop` turns true (the broker may be restarting).
pub(super) async fn retry<'a, F, Fut>(
    mut f: F,
    stop: &mut watch::Receiver<bool>,
) -> Result<(), AggregatorError>
where
    F: FnMut() -> Fut + 'a,
    Fut: std::future::Future<Output = Result<(), AggregatorError>> + 'a,
{
    let mut wait = Duration::from_millis(200);
    loop {
        match f().await {
            Ok(()) => return Ok(()),
            Err(AggregatorError::Link(e)) => {
                tracing::warn!(error = %e, "publish failed; retrying");
                if *stop.borrow() {
                    return Err(AggregatorError::Link(e));
                }
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(5));
            }
            Err(e) => return Err(e),
        }
    }
}

/// Starts the link the aggregator listens on: the configured broker, or the embedded one.
pub fn connect(
    cfg: &AggregatorConfig,
) -> Result<(Link, tokio::sync::mpsc::Receiver<Message>, BrokerSettings), AggregatorError> {
    let settings = match &cfg.broker {
        Some(b) => b.clone(),
        None => {
            let b = crate::wire::embedded::start(0).map_err(|e| AggregatorError::Config {
                path: cfg.state.clone(),
                message: e.to_string(),
            })?;
            BrokerSettings {
                port: b.addr.port(),
                ..BrokerSettings::default()
            }
        }
    };
    let topics = Topics::new(&cfg.fleet).map_err(|message| AggregatorError::Config {
        path: cfg.state.clone(),
        message,
    })?;
    // A single aggregator subscribes to the updates directly, not through the share group: Mosquitto
    // (2.0.11) does not bring a persistent session's shared subscriptions back from its database
    // after a restart, so updates published between the broker's restart and the aggregator's
    // resubscription were acknowledged to the devices and dropped (faults_mosquitto.rs); a plain
    // subscription is restored and they wait for the aggregator. (It also keeps devices, which
    // Mosquitto lets join any share group, from taking turns of the single aggregator's updates.)
    // A coordinator takes no updates (it would take a share); it hears its workers. A worker hears
    // its share of the updates, the coordinator's announcements and its close requests. A sharded
    // worker subscribes to every update plainly (restored after a broker restart, like the single
    // aggregator's) and keeps its shard's; an unsharded one takes turns through the share group.
    let subscriptions = match &cfg.scale_out {
        None => vec![topics.update_filter()],
        Some(so) => match so.role {
            Role::Coordinator => vec![topics.partial_filter()],
            Role::Worker => {
                let updates = match so.sharding() {
                    Some(_) => topics.update_filter(),
                    None => {
                        tracing::warn!(
                            "scale-out worker on the shared subscription: updates sent between a \
                             broker restart and this worker's resubscription are lost (Mosquitto \
                             does not restore shared subscriptions), and a device may join the \
                             group; set [scale_out] shard and shards to take a shard of the \
                             devices on a plain subscription instead"
                        );
                        topics.update_shared_filter("aggregators")
                    }
                };
                vec![
                    updates,
                    topics.round(),
                    topics.partial(so.coordinator.as_deref().unwrap_or_default()),
                ]
            }
        },
    };
    // Updates are acknowledged to the broker only once handled (on disk, or rejected): a crash in
    // between makes the broker deliver them again instead of losing them.
    let (link, inbox) = Link::start_acking_when_done(&settings, &cfg.id, subscriptions, None)?;
    Ok((link, inbox, settings))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::federated::compress::CompressionConfig;
    use crate::wire::protocol::LocalMetrics;
    use microfed_kernels::unet::Params;

    struct Setup {
        _dir: tempfile::TempDir,
        cfg: AggregatorConfig,
        layout: Vec<TensorSpan>,
        version: String,
    }

    fn setup(rule: &str) -> Setup {
        setup_with(rule, 3, "")
    }

    /// A fleet of devices a, b, c; `extra` is appended to aggregator.toml (e.g. a `[dp]` section).
    fn setup_with(rule: &str, quorum: usize, extra: &str) -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let model = dir.path().join("model.onnx");
        let params = Params::init(2, 5).unwrap();
        onnx::save(&onnx::export(&params, &vec![]).unwrap(), &model).unwrap();
        let cfg: AggregatorConfig = toml::from_str(&format!(
            "fleet = \"f\"\nmodel = {model:?}\nstate = {:?}\ndevices = [\"a\", \"b\", \"c\"]\n\
             max_update_norm = 100.0\n\
             [round]\ndeadline_s = 60.0\nquorum = {quorum}\nlocal_epochs = 1\nsteps_per_epoch = 1\n\
             learning_rate = 0.01\nprox_mu = 0.0\npause_s = 0.0\n\
             [aggregation]\nrule = {rule}\n{extra}",
            dir.path().join("state")
        ))
        .unwrap();
        let version = crate::model::manifest::sha256_file(&model).unwrap();
        Setup {
            _dir: dir,
            cfg,
            layout: compress::decoder_layout(2),
            version,
        }
    }

    fn update(
        s: &Setup,
        device: &str,
        round: u64,
        gv: u64,
        values: &[f32],
        samples: u64,
    ) -> Vec<u8> {
        let compressed =
            compress::compress(values, &s.layout, &CompressionConfig::default(), None).unwrap();
        update_raw(s, device, device, round, gv, compressed, samples)
    }

    fn update_raw(
        s: &Setup,
        sender: &str,
        device: &str,
        round: u64,
        gv: u64,
        compressed: Vec<u8>,
        samples: u64,
    ) -> Vec<u8> {
        let body = UpdateBody {
            device: device.into(),
            global_version: gv,
            samples,
            metrics: LocalMetrics::default(),
            compressed,
            norm: 0.0,
        };
        let h = Header {
            fleet: "f",
            round,
            model_version: &s.version,
            sender,
        };
        Envelope::seal(Kind::Update, &h, &body)
            .unwrap()
            .to_bytes()
            .unwrap()
    }

    fn filled(n: usize, v: f32) -> Vec<f32> {
        vec![v; n]
    }

    #[test]
    fn weighted_round_with_every_rejection_counted_and_a_restart_in_the_middle() {
        let s = setup("{ kind = \"fedavg\" }");
        let n: usize = s.layout.iter().map(|t| t.len).sum();
        let mut agg = Aggregator::open(s.cfg.clone()).unwrap();
        let base = agg.global().to_vec();
        agg.open_round().unwrap();
        assert_eq!(agg.state().round, 1);

        // a: 1 sample of +0.01; b: 3 samples of -0.01.
        agg.handle_update_message("a", &update(&s, "a", 1, 0, &filled(n, 0.01), 1))
            .unwrap();
        // Rejections, each by its reason:
        agg.handle_update_message("a", &update(&s, "a", 1, 0, &filled(n, 0.5), 1))
            .unwrap(); // duplicate
        agg.handle_update_message("b", b"\xa1garbage").unwrap(); // malformed
        agg.handle_update_message("b", &update(&s, "b", 0, 0, &filled(n, 0.5), 1))
            .unwrap(); // replay of round 0
        agg.handle_update_message("b", &update(&s, "b", 1, 7, &filled(n, 0.5), 1))
            .unwrap(); // wrong version
        agg.handle_update_message("b", &update(&s, "c", 1, 0, &filled(n, 0.5), 1))
            .unwrap(); // spoofed
        agg.handle_update_message("z", &update(&s, "z", 1, 0, &filled(n, 0.5), 1))
            .unwrap(); // unknown
        agg.handle_update_message("b", &update(&s, "b", 1, 0, &filled(n, 5.0), 1))
            .unwrap(); // norm
        // Our own compressor refuses NaN; a hostile sender can still send one (the dense format's last
        // four bytes are the head's last bias): the aggregator must catch it.
        let mut bad = compress::compress(
            &filled(n, 0.0),
            &s.layout,
            &CompressionConfig::default(),
            None,
        )
        .unwrap();
        let end = bad.len();
        bad[end - 4..].copy_from_slice(&f32::NAN.to_le_bytes());
        agg.handle_update_message("b", &update_raw(&s, "b", "b", 1, 0, bad, 1))
            .unwrap();
        // A chunked message announcing more than MAX_UPDATE_BYTES is refused at its first frame.
        let huge = vec![7u8; MAX_UPDATE_BYTES + 1];
        let first = protocol::split(&huge, CHUNK_BYTES).unwrap().remove(0);
        agg.handle_update_frame("microfed/f/update/b", &first)
            .unwrap();
        assert_eq!(agg.state().accepted.len(), 1);

        agg.handle_update_message("b", &update(&s, "b", 1, 0, &filled(n, -0.01), 3))
            .unwrap();
        assert_eq!(agg.state().accepted.len(), 2);
        drop(agg);

        // Killed here; a new process resumes the round from disk.
        let mut agg = Aggregator::open(s.cfg.clone()).unwrap();
        assert!(agg.state().open);
        assert_eq!(agg.state().accepted.len(), 2);
        // The same message delivered again after the restart counts once.
        agg.handle_update_message("b", &update(&s, "b", 1, 0, &filled(n, -0.01), 3))
            .unwrap();
        assert!(!agg.round_due());
        agg.handle_update_message("c", &update(&s, "c", 1, 0, &filled(n, 0.02), 2))
            .unwrap();
        assert!(agg.round_due());
        let summary = agg.close_round().unwrap();
        assert_eq!(summary.accepted, ["a", "b", "c"]);
        assert_eq!(summary.global_version, 1);
        assert_eq!(summary.samples, 6);
        let r = &summary.rejected;
        assert_eq!(r["duplicate"], 2, "{r:?}");
        assert_eq!(r["malformed"], 1, "{r:?}");
        assert_eq!(r["wrong_round"], 1, "{r:?}");
        assert_eq!(r["wrong_version"], 1, "{r:?}");
        assert_eq!(r["spoofed_sender"], 1, "{r:?}");
        assert_eq!(r["unknown_device"], 1, "{r:?}");
        assert_eq!(r["norm"], 1, "{r:?}");
        assert_eq!(r["not_finite"], 1, "{r:?}");
        assert_eq!(r.get("oversized"), Some(&1), "{r:?}");
        // (1·0.01 + 3·(−0.01) + 2·0.02) / 6 = 0.02 / 6
        let expect = 0.02f64 / 6.0;
        for (g, b) in agg.global().iter().zip(&base).take(1000) {
            assert!((f64::from(g - b) - expect).abs() < 1e-6, "{g} {b}");
        }
        // Streaming FedAvg keeps no update in memory.
        assert_eq!(agg.retained_updates(), 0);
        // Version 1 survives a restart.
        let again = Aggregator::open(s.cfg.clone()).unwrap();
        assert_eq!(again.state().global_version, 1);
        assert_eq!(again.global(), agg.global());
    }

    /// Issue 17: self-reported `samples` were unbounded FedAvg weights: 2^62 took all the weight,
    /// and near u64::MAX every later lab's `checked_add` failed and its update was lost as malformed.
    #[test]
    fn inflated_sample_counts_are_refused_and_later_labs_still_count() {
        let s = setup("{ kind = \"fedavg\" }");
        let n: usize = s.layout.iter().map(|t| t.len).sum();
        let mut agg = Aggregator::open(s.cfg.clone()).unwrap();
        agg.open_round().unwrap();
        agg.handle_update_message("a", &update(&s, "a", 1, 0, &filled(n, 0.001), u64::MAX - 1))
            .unwrap();
        agg.handle_update_message("a", &update(&s, "a", 1, 0, &filled(n, 0.001), 1 << 62))
            .unwrap();
        agg.handle_update_message("b", &update(&s, "b", 1, 0, &filled(n, -0.001), 3))
            .unwrap();
        agg.handle_update_message("c", &update(&s, "c", 1, 0, &filled(n, 0.002), 2))
            .unwrap();
        let st = agg.state();
        assert_eq!(
            st.accepted.keys().collect::<Vec<_>>(),
            ["b", "c"],
            "{:?}",
            st.rejected
        );
        assert_eq!(st.rejected.get("samples"), Some(&2), "{:?}", st.rejected);
        assert_eq!(st.rejected.get("malformed"), None, "{:?}", st.rejected);
    }

    /// Issue 17: the default `max_update_norm` (1e3) was ~10⁴ × the measured median update norm
    /// (0.088, docs/privacy.md): it stopped nothing a poisoning lab would send.
    #[test]
    fn the_default_norm_bound_is_within_a_few_hundred_times_the_measured_median() {
        let dir = tempfile::tempdir().unwrap();
        let cfg: AggregatorConfig = toml::from_str(&format!(
            "fleet = \"f\"\nmodel = \"m.onnx\"\nstate = {:?}\n",
            dir.path()
        ))
        .unwrap();
        let measured_median = 0.0879f32;
        assert!(
            cfg.max_update_norm <= 300.0 * measured_median,
            "default max_update_norm {}",
            cfg.max_update_norm
        );
        assert!(cfg.max_update_norm >= 20.0 * measured_median);
    }

    /// Issue 17: the chunks of a dense update were acknowledged to the broker frame by frame while
    /// the whole lived only in memory: a crash in the middle lost an update the device's outbox had
    /// already deleted. Now each chunk is on disk before it is acknowledged, and read back at start.
    #[test]
    fn a_dense_update_cut_by_a_crash_completes_after_the_restart_and_counts_once() {
        let s = setup("{ kind = \"fedavg\" }");
        let n: usize = s.layout.iter().map(|t| t.len).sum();
        let mut agg = Aggregator::open(s.cfg.clone()).unwrap();
        agg.open_round().unwrap();
        let dense = CompressionConfig {
            top_k: None,
            error_feedback: false,
            quantize: compress::Quantize::None,
            zstd_level: None,
        };
        let values: Vec<f32> = (0..n).map(|i| 1e-4 * (i % 7) as f32).collect();
        let compressed = compress::compress(&values, &s.layout, &dense, None).unwrap();
        let bytes = update_raw(&s, "a", "a", 1, 0, compressed, 4);
        let frames = protocol::split(&bytes, 4096).unwrap();
        assert!(frames.len() >= 3, "{} frames", frames.len());
        let topic = "microfed/f/update/a";
        let (last, first) = frames.split_last().unwrap();
        for f in first {
            agg.handle_update_frame(topic, f).unwrap();
        }
        let spool = s.cfg.state.join("partial").join(hex::encode("a"));
        assert_eq!(std::fs::read_dir(&spool).unwrap().count(), first.len());
        // SIGKILL: the memory is gone; the broker has forgotten the acknowledged chunks.
        drop(agg);
        let mut agg = Aggregator::open(s.cfg.clone()).unwrap();
        assert_eq!(agg.reassembler.pending(), 1, "the chunks were read back");
        agg.handle_update_frame(topic, last).unwrap();
        assert_eq!(agg.state().accepted.len(), 1, "{:?}", agg.state());
        assert!(
            !spool.exists(),
            "the spool is emptied once the update is on disk"
        );
        // The device sends it all again (its outbox kept it): a duplicate, not counted twice.
        for f in &frames {
            agg.handle_update_frame(topic, f).unwrap();
        }
        assert_eq!(agg.state().accepted.len(), 1);
        assert_eq!(agg.state().rejected.get("duplicate"), Some(&1));
        assert!(!spool.exists());
        // A restart with nothing spooled replays nothing twice.
        drop(agg);
        let agg = Aggregator::open(s.cfg.clone()).unwrap();
        assert_eq!(agg.state().accepted.len(), 1);
        assert_eq!(agg.reassembler.pending(), 0);
    }

    /// The spool is bounded by the reassembler: chunks of messages a device's own new ones evict
    /// are deleted, and stray files (not `<digest>-<index>.frame`) are never touched.
    #[test]
    fn the_chunk_spool_follows_the_reassemblers_evictions() {
        let s = setup("{ kind = \"fedavg\" }");
        let mut agg = Aggregator::open(s.cfg.clone()).unwrap();
        agg.open_round().unwrap();
        let spool = s.cfg.state.join("partial").join(hex::encode("b"));
        std::fs::create_dir_all(&spool).unwrap();
        std::fs::write(spool.join("notes.txt"), b"keep").unwrap();
        for i in 0..(protocol::PARTIALS_PER_STREAM + 3) {
            let msg = vec![i as u8; 3 * 1024];
            let frames = protocol::split(&msg, 1024).unwrap();
            agg.handle_update_frame("microfed/f/update/b", &frames[0])
                .unwrap();
        }
        let frames = std::fs::read_dir(&spool)
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .ends_with(".frame")
            })
            .count();
        assert_eq!(frames, protocol::PARTIALS_PER_STREAM);
        assert!(spool.join("notes.txt").exists());
        assert_eq!(spooled_digest("../aggregator.json"), None);
        assert!(spooled_digest(&format!("{}-1.frame", "a".repeat(64))).is_some());
    }

    /// Issue 17: frames were reassembled before the sender was checked against the device list,
    /// so any client could fill the reassembly memory. Now refused before reassembly.
    #[test]
    fn frames_from_unlisted_devices_hold_no_reassembly_memory() {
        let s = setup("{ kind = \"fedavg\" }");
        let mut agg = Aggregator::open(s.cfg.clone()).unwrap();
        agg.open_round().unwrap();
        let big = vec![5u8; 3 * CHUNK_BYTES];
        let frames = protocol::split(&big, CHUNK_BYTES).unwrap();
        agg.handle_update_frame("microfed/f/update/z", &frames[0])
            .unwrap();
        assert_eq!(agg.reassembler.held(), 0);
        assert_eq!(agg.state().rejected.get("unknown_device"), Some(&1));
        // A listed device's frame is held until its message completes.
        agg.handle_update_frame("microfed/f/update/a", &frames[0])
            .unwrap();
        assert!(agg.reassembler.held() >= CHUNK_BYTES);
    }

    #[test]
    fn median_resists_a_poisoned_lab() {
        let mut s = setup("{ kind = \"median\" }");
        // The norm bound alone would stop this poisoned lab; here the median must.
        s.cfg.max_update_norm = 1e4;
        let n: usize = s.layout.iter().map(|t| t.len).sum();
        let mut agg = Aggregator::open(s.cfg.clone()).unwrap();
        let base = agg.global().to_vec();
        agg.open_round().unwrap();
        agg.handle_update_message("a", &update(&s, "a", 1, 0, &filled(n, 0.01), 1))
            .unwrap();
        agg.handle_update_message("b", &update(&s, "b", 1, 0, &filled(n, 0.012), 1))
            .unwrap();
        agg.handle_update_message("c", &update(&s, "c", 1, 0, &filled(n, -0.9), 1))
            .unwrap();
        agg.close_round().unwrap();
        for (g, b) in agg.global().iter().zip(&base).take(100) {
            assert!((g - b - 0.01).abs() < 1e-6);
        }
    }

    const FEDAVG: &str = "{ kind = \"fedavg\" }";

    #[test]
    fn dp_round_clips_adds_calibrated_noise_and_its_epsilon_survives_a_restart() {
        // C = 1, z = 0.002; quorum 2 of the 3 listed devices. Without a configured rate round 1 is
        // accounted with q = 1, not 2/3: the two labs that answered were not drawn at random.
        let (c, z) = (1.0f64, 0.002f64);
        let s = setup_with(
            FEDAVG,
            2,
            "[dp]\nclip_norm = 1.0\nnoise_multiplier = 0.002\ndelta = 1e-5\n",
        );
        let n: usize = s.layout.iter().map(|t| t.len).sum();
        let mut agg = Aggregator::open(s.cfg.clone()).unwrap();
        let base = agg.global().to_vec();
        agg.open_round().unwrap();
        // a: norm 0.01·sqrt(n) ≈ 8.9, clipped to 1 (each value becomes 1/sqrt(n)); b: norm ≈ 0.44, kept.
        // Sample counts do not weight under DP (weight 1 each).
        agg.handle_update_message("a", &update(&s, "a", 1, 0, &filled(n, 0.01), 50))
            .unwrap();
        agg.handle_update_message("b", &update(&s, "b", 1, 0, &filled(n, -0.0005), 1))
            .unwrap();
        assert!(agg.round_due());
        let s1 = agg.close_round().unwrap();
        let p1 = s1.privacy.clone().expect("privacy report");
        let mut independent = RdpAccountant::new();
        independent.step(1.0, z, 1).unwrap();
        assert_eq!(p1.steps, 1);
        assert_eq!(p1.sampling_rate, 1.0);
        assert_eq!(p1.epsilon, independent.epsilon(1e-5).0);
        assert_eq!(p1.mechanism, DP_MECHANISM);

        // The plain mean of the clipped updates, and what the noise must look like around it:
        // N(0, (zC)²) on the sum of 2 is N(0, (zC/2)²) on each coordinate of the mean.
        let mean = (1.0 / (n as f64).sqrt() - 0.0005) / 2.0;
        let resid: Vec<f64> = agg
            .global()
            .iter()
            .zip(&base)
            .map(|(g, b)| f64::from(*g) - f64::from(*b) - mean)
            .collect();
        let m = resid.iter().sum::<f64>() / n as f64;
        let std = (resid.iter().map(|r| (r - m).powi(2)).sum::<f64>() / n as f64).sqrt();
        let want = z * c / 2.0;
        // n ≈ 784k coordinates: the std estimate is good to ~0.1 %; its mean to ~want/885.
        assert!(
            (std / want - 1.0).abs() < 0.01,
            "noise std {std}, want {want}"
        );
        assert!(m.abs() < 5.0 * want / (n as f64).sqrt(), "noise mean {m}");
        drop(agg);

        // Restart: ε is where it was, and round 2 (all three devices) adds to it.
        let mut agg = Aggregator::open(s.cfg.clone()).unwrap();
        assert_eq!(agg.state().accountant.steps, 1);
        assert_eq!(agg.privacy().unwrap().epsilon, p1.epsilon);
        agg.open_round().unwrap();
        for d in ["a", "b", "c"] {
            agg.handle_update_message(d, &update(&s, d, 2, 1, &filled(n, 0.0001), 1))
                .unwrap();
        }
        let s2 = agg.close_round().unwrap();
        let p2 = s2.privacy.expect("privacy report");
        independent.step(1.0, z, 1).unwrap();
        assert_eq!(p2.steps, 2);
        assert_eq!(p2.epsilon, independent.epsilon(1e-5).0);
        assert!(
            p2.epsilon > p1.epsilon,
            "ε grows: {} then {}",
            p1.epsilon,
            p2.epsilon
        );
        // A round in which nothing arrived releases nothing: ε stays.
        agg.open_round().unwrap();
        agg.state.deadline_unix = 0.0;
        assert!(agg.round_due());
        let s3 = agg.close_round().unwrap();
        assert_eq!(s3.privacy.unwrap().epsilon, p2.epsilon);
        assert_eq!(agg.state().global_version, 2);
    }

    #[test]
    fn raw_updates_of_merged_rounds_are_deleted_beyond_the_kept_ones() {
        let kept = |s: &Setup| -> Vec<u64> {
            let mut r: Vec<u64> = std::fs::read_dir(&s.cfg.state)
                .unwrap()
                .flatten()
                .filter_map(|e| e.file_name().to_str()?.strip_prefix("round-")?.parse().ok())
                .collect();
            r.sort();
            r
        };
        for (keep, want) in [
            (0u64, vec![]),
            (1, vec![3]),
            (2, vec![2, 3]),
            (u64::MAX, vec![1, 2, 3]),
        ] {
            let mut s = setup_with(FEDAVG, 1, "");
            s.cfg.keep_update_rounds = keep;
            let n: usize = s.layout.iter().map(|t| t.len).sum();
            let mut agg = Aggregator::open(s.cfg.clone()).unwrap();
            for round in 1..=3u64 {
                agg.open_round().unwrap();
                agg.handle_update_message(
                    "a",
                    &update(&s, "a", round, round - 1, &filled(n, 1e-4), 5),
                )
                .unwrap();
                assert!(
                    s.cfg
                        .state
                        .join(format!("round-{round}"))
                        .join("a.msg")
                        .is_file()
                );
                agg.close_round().unwrap();
            }
            assert_eq!(kept(&s), want, "keep_update_rounds = {keep}");
            // What a restart needs is not in those folders: it opens at the merged global.
            drop(agg);
            let agg = Aggregator::open(s.cfg.clone()).unwrap();
            assert_eq!(agg.state().global_version, 3);
        }
    }

    #[test]
    fn dp_budget_stops_before_the_round_that_would_exceed_it() {
        // z = 5, q fixed at 1: budget = ε after exactly 2 rounds.
        let mut two = RdpAccountant::new();
        two.step(1.0, 5.0, 1).unwrap();
        two.step(1.0, 5.0, 1).unwrap();
        let budget = two.epsilon(1e-5).0;
        let s = setup_with(
            FEDAVG,
            1,
            &format!(
                "[dp]\nclip_norm = 0.5\nnoise_multiplier = 5.0\nsampling_rate = 1.0\n\
                 max_epsilon = {budget}\n"
            ),
        );
        let n: usize = s.layout.iter().map(|t| t.len).sum();
        let mut agg = Aggregator::open(s.cfg.clone()).unwrap();
        for round in 1..=2 {
            assert_eq!(agg.next_round_over_budget().unwrap(), None);
            agg.open_round().unwrap();
            agg.handle_update_message("a", &update(&s, "a", round, round - 1, &filled(n, 0.0), 1))
                .unwrap();
            let p = agg.close_round().unwrap().privacy.unwrap();
            assert!(p.epsilon <= budget);
        }
        let over = agg.next_round_over_budget().unwrap().expect("over budget");
        assert!(over > budget);
        assert!(matches!(
            agg.open_round(),
            Err(AggregatorError::PrivacyBudget { round: 3, .. })
        ));
        assert_eq!(agg.state().round, 2);
        assert!(!agg.state().open);
    }

    #[test]
    fn dp_config_is_checked() {
        let bad = |rule: &str, extra: &str| {
            let s = setup_with(rule, 1, extra);
            s.cfg.validate().unwrap_err()
        };
        let e = bad(
            "{ kind = \"median\" }",
            "[dp]\nclip_norm = 1.0\nnoise_multiplier = 1.0\n",
        );
        assert!(e.contains("fedavg"), "{e}");
        let e = bad(FEDAVG, "[dp]\nclip_norm = -1.0\nnoise_multiplier = 1.0\n");
        assert!(e.contains("clip_norm"), "{e}");
        let e = bad(
            FEDAVG,
            "[dp]\nclip_norm = 1.0\nnoise_multiplier = 1.0\nmax_epsilon = 0.0\n",
        );
        assert!(e.contains("max_epsilon"), "{e}");
        let e = bad(
            FEDAVG,
            "[dp]\nclip_norm = 1.0\nnoise_multiplier = 1.0\nsampling_rate = 1.5\n",
        );
        assert!(e.contains("sampling_rate"), "{e}");
    }

    #[test]
    fn the_example_configuration_parses_with_its_optional_sections_switched_on() {
        let text = include_str!("../../../aggregator.example.toml");
        let plain: AggregatorConfig = toml::from_str(text).unwrap();
        plain.validate().unwrap();
        assert!(plain.dp.is_none() && plain.scale_out.is_none());
        // Uncomment the [dp] block and the coordinator's [scale_out] lines.
        let mut on = String::new();
        let mut active = false;
        for line in text.lines() {
            if line == "# [dp]" || line == "# [scale_out]" {
                active = true;
            }
            if line.is_empty() || line.starts_with("# (on a worker") {
                active = false;
            }
            let line = match line.strip_prefix("# ") {
                Some(rest) if active => rest,
                _ => line,
            };
            on.push_str(line);
            on.push('\n');
        }
        let cfg: AggregatorConfig = toml::from_str(&on).unwrap_or_else(|e| panic!("{e}\n{on}"));
        cfg.validate().unwrap();
        let dp = cfg.dp.expect("[dp]");
        assert_eq!((dp.clip_norm, dp.max_epsilon), (0.1, Some(8.0)));
        let so = cfg.scale_out.expect("[scale_out]");
        assert_eq!(so.role, Role::Coordinator);
        assert_eq!(so.workers, ["aggregator-1", "aggregator-2"]);
    }
}
