//! The federation's wire protocol: topics, CBOR messages, and chunked frames (docs/protocol.md).
//!
//! Map:
//! - [`Topics`]: every topic of one fleet (`microfed/<fleet>/…`), and parsing a device id out of one.
//! - [`Envelope`]: what every message is: schema version, [`Kind`], fleet, round, model version,
//!   sender, time, the sha256 of the body, and the body (CBOR of one of the body structs below).
//! - Bodies: [`RoundAnnouncement`], [`GlobalDecoder`], [`UpdateBody`], [`StatusBody`], [`ResultBody`],
//!   [`RoundSummary`].
//! - [`Frame`] / [`split`] / [`Reassembler`]: a message above the chunk size travels as several
//!   frames (index, total, digest of the whole); the reassembler holds partial messages with bounded
//!   memory and drops those that stay incomplete past a timeout.
//!
//! Why CBOR (ciborium) with byte strings: compact, self-describing, schema-evolvable, and tensors go
//! as one byte string rather than an array of floats (see docs/dependencies.md). Every decode path
//! returns a [`ProtocolError`] that says what was wrong; nothing here panics on arbitrary bytes.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize, de::DeserializeOwned};
use sha2::{Digest, Sha256};

/// Version of the envelope and bodies. A receiver rejects any other version with a logged reason.
pub const SCHEMA_VERSION: u16 = 1;

/// Largest frame payload the application makes (the chunk size). Brokers and clients allow packets
/// of [`MAX_PACKET_BYTES`]; the difference leaves room for the frame header and the topic.
pub const CHUNK_BYTES: usize = 256 * 1024;

/// The packet-size limit set on clients and brokers (broker-config/ sets the same).
pub const MAX_PACKET_BYTES: usize = 1024 * 1024;

/// Why a message was refused. The variants are the reasons counted by the aggregator.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("{what}: not valid CBOR for this message ({message})")]
    Malformed { what: &'static str, message: String },
    #[error("{what}: schema version {found}, this build speaks {SCHEMA_VERSION}")]
    Schema { what: &'static str, found: u16 },
    #[error("expected a {expected:?} message, got {found:?}")]
    Kind { expected: Kind, found: Kind },
    #[error("body digest mismatch: envelope says {expected}, body hashes to {found}")]
    Digest { expected: String, found: String },
    #[error("message of {len} bytes is above the limit of {limit} bytes")]
    Oversized { len: usize, limit: usize },
    #[error("frame {index}/{total} of message {digest}: {problem}")]
    Frame {
        digest: String,
        index: u32,
        total: u32,
        problem: String,
    },
    #[error("cannot encode {what}: {message}")]
    Encode { what: &'static str, message: String },
    #[error("{0}")]
    Signature(#[from] crate::wire::signing::SigningError),
}

/// What a message is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    RoundAnnouncement,
    GlobalDecoder,
    Update,
    StyleCode,
    Status,
    Result,
    RoundSummary,
    ModelVersion,
    Command,
    /// A secure-aggregation step ([`crate::federated::secagg`]): device → aggregator on `update/<device>`,
    /// aggregator → device on `secagg/<device>`.
    SecAgg,
    /// Scale-out aggregation ([`crate::federated::server::scaleout`]) on `partial/<aggregator id>`: a worker's
    /// progress and partial sum to the coordinator, the coordinator's close request to the workers.
    Partial,
}

/// Every topic of one fleet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topics {
    prefix: String,
}

impl Topics {
    /// Topics of `fleet`; a fleet name is one topic level (no `/`, `+`, `#`).
    pub fn new(fleet: &str) -> Result<Self, String> {
        if !valid_level(fleet) {
            return Err(format!(
                "fleet name {fleet:?} must be a non-empty MQTT topic level without '/', '+', '#'"
            ));
        }
        Ok(Self {
            prefix: format!("microfed/{fleet}"),
        })
    }
    pub fn round(&self) -> String {
        format!("{}/round", self.prefix)
    }
    pub fn summary(&self) -> String {
        format!("{}/summary", self.prefix)
    }
    /// One retained topic per chunk of the global decoder.
    pub fn global_chunk(&self, index: u32) -> String {
        format!("{}/global/{index}", self.prefix)
    }
    pub fn global_filter(&self) -> String {
        format!("{}/global/+", self.prefix)
    }
    pub fn update(&self, device: &str) -> String {
        format!("{}/update/{device}", self.prefix)
    }
    pub fn update_filter(&self) -> String {
        format!("{}/update/+", self.prefix)
    }
    /// The shared subscription that spreads updates over several aggregator processes.
    pub fn update_shared_filter(&self, group: &str) -> String {
        format!("$share/{group}/{}/update/+", self.prefix)
    }
    pub fn style(&self, device: &str) -> String {
        format!("{}/style/{device}", self.prefix)
    }
    pub fn status(&self, device: &str) -> String {
        format!("{}/status/{device}", self.prefix)
    }
    pub fn status_filter(&self) -> String {
        format!("{}/status/+", self.prefix)
    }
    pub fn result(&self, device: &str) -> String {
        format!("{}/result/{device}", self.prefix)
    }
    pub fn model_chunk(&self, index: u32) -> String {
        format!("{}/model/{index}", self.prefix)
    }
    /// Secure aggregation, aggregator → one device (sealed shares and rosters are per device).
    pub fn secagg(&self, device: &str) -> String {
        format!("{}/secagg/{device}", self.prefix)
    }
    /// Scale-out aggregation: what aggregator `id` says to the others (its own topic only, ACL).
    pub fn partial(&self, id: &str) -> String {
        format!("{}/partial/{id}", self.prefix)
    }
    pub fn partial_filter(&self) -> String {
        format!("{}/partial/+", self.prefix)
    }
    pub fn command(&self) -> String {
        format!("{}/command", self.prefix)
    }
    /// The device id in `microfed/<fleet>/<section>/<device>`, if `topic` is such a topic.
    pub fn device_of<'t>(&self, section: &str, topic: &'t str) -> Option<&'t str> {
        let rest = topic.strip_prefix(&self.prefix)?.strip_prefix('/')?;
        let rest = rest.strip_prefix(section)?.strip_prefix('/')?;
        (valid_level(rest)).then_some(rest)
    }
}

/// A topic level an id may be: non-empty, no separators or wildcards, at most 64 bytes.
pub fn valid_level(s: &str) -> bool {
    !s.is_empty() && s.len() <= 64 && !s.contains(['/', '+', '#', '\0']) && !s.starts_with('$')
}

/// Every message: a header that says what and for which round and model, and a CBOR body.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    pub schema: u16,
    pub kind: Kind,
    pub fleet: String,
    pub round: u64,
    /// The base model the message belongs to (sha256 of its ONNX file).
    pub model_version: String,
    /// Device id (or aggregator id) of the sender.
    pub sender: String,
    /// Seconds since the Unix epoch at the sender.
    pub sent_at: f64,
    /// sha256 (hex) of `body`.
    pub digest: String,
    #[serde(with = "serde_bytes")]
    pub body: Vec<u8>,
    /// The aggregator's Ed25519 signature of the header and the body's digest
    /// ([`Envelope::sign`]); absent on devices' messages. Older receivers ignore it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<serde_bytes::ByteBuf>,
}

/// The header fields of an envelope, for [`Envelope::seal`].
#[derive(Debug, Clone)]
pub struct Header<'a> {
    pub fleet: &'a str,
    pub round: u64,
    pub model_version: &'a str,
    pub sender: &'a str,
}

impl Envelope {
    /// Wraps a body: CBOR-encodes it and records its digest.
    pub fn seal<T: Serialize>(
        kind: Kind,
        header: &Header<'_>,
        body: &T,
    ) -> Result<Self, ProtocolError> {
        let body = to_cbor("message body", body)?;
        Ok(Self {
            schema: SCHEMA_VERSION,
            kind,
            fleet: header.fleet.to_owned(),
            round: header.round,
            model_version: header.model_version.to_owned(),
            sender: header.sender.to_owned(),
            sent_at: crate::fsio::now_unix(),
            digest: sha256_hex(&body),
            body,
            signature: None,
        })
    }

    /// What a signature covers: every header field and the body's digest (so the body too).
    fn signed_bytes(&self) -> Result<Vec<u8>, ProtocolError> {
        to_cbor(
            "signed header",
            &(
                self.schema,
                self.kind,
                &self.fleet,
                self.round,
                &self.model_version,
                &self.sender,
                self.sent_at.to_bits(),
                &self.digest,
            ),
        )
    }

    /// Signs the envelope as the aggregator (globals and round announcements).
    pub fn sign(mut self, key: &crate::wire::signing::SecretKey) -> Result<Self, ProtocolError> {
        use crate::wire::signing::Purpose;
        let sig = key.sign(Purpose::Aggregator, &self.signed_bytes()?);
        self.signature = Some(serde_bytes::ByteBuf::from(sig.to_vec()));
        Ok(self)
    }

    /// Checks the aggregator's signature: call it before reading the body. A missing, foreign or
    /// changed signature is an error naming why.
    pub fn verify(&self, key: &crate::wire::signing::PublicKey) -> Result<(), ProtocolError> {
        use crate::wire::signing::Purpose;
        key.verify(
            Purpose::Aggregator,
            &self.signed_bytes()?,
            self.signature.as_deref().map(|s| &s[..]),
        )?;
        Ok(())
    }

    pub fn to_bytes(&self) -> Result<Vec<u8>, ProtocolError> {
        to_cbor("envelope", self)
    }

    /// Decodes and checks an envelope: size, schema version, body digest.
    pub fn from_bytes(bytes: &[u8], limit: usize) -> Result<Self, ProtocolError> {
        if bytes.len() > limit {
            return Err(ProtocolError::Oversized {
                len: bytes.len(),
                limit,
            });
        }
        let env: Envelope = from_cbor("envelope", bytes)?;
        if env.schema != SCHEMA_VERSION {
            return Err(ProtocolError::Schema {
                what: "envelope",
                found: env.schema,
            });
        }
        let found = sha256_hex(&env.body);
        if found != env.digest {
            return Err(ProtocolError::Digest {
                expected: env.digest,
                found,
            });
        }
        Ok(env)
    }

    /// The body, if this is a `kind` message.
    pub fn body<T: DeserializeOwned>(&self, kind: Kind) -> Result<T, ProtocolError> {
        if self.kind != kind {
            return Err(ProtocolError::Kind {
                expected: kind,
                found: self.kind,
            });
        }
        from_cbor("message body", &self.body)
    }
}

/// The aggregator's call for a round (retained on `round`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoundAnnouncement {
    pub round: u64,
    /// The global decoder version the round starts from (published on `global/…`).
    pub global_version: u64,
    /// sha256 of that decoder's values (little-endian f32 bytes).
    pub global_digest: String,
    /// Updates arriving after this time (Unix seconds) are too late.
    pub deadline_unix: f64,
    /// Local epochs each device trains.
    pub local_epochs: u32,
    /// Local steps per epoch (batches); 0 = one pass over the device's images.
    pub steps_per_epoch: u32,
    /// This round's local learning rate (the aggregator's schedule already applied).
    pub learning_rate: f32,
    /// FedProx's μ (0 = plain FedAvg local training).
    pub prox_mu: f32,
    /// The local optimiser; absent in older aggregators' announcements (SGD with momentum 0.9,
    /// what devices did then). Older devices ignore it.
    #[serde(default)]
    pub optimizer: LocalOptimizer,
    /// How devices compress their updates.
    pub compression: CompressionConfig,
    /// The round is closed: no more updates accepted (sent again, retained, when it closes).
    pub closed: bool,
}

/// A global decoder version (retained, chunked, on `global/<i>`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GlobalDecoder {
    pub version: u64,
    /// The round that produced it (0 = the base model's own decoder).
    pub round: u64,
    pub classes: u32,
    /// `decoder_flat` values, little-endian f32.
    #[serde(with = "serde_bytes")]
    pub values: Vec<u8>,
}

impl GlobalDecoder {
    pub fn new(version: u64, round: u64, classes: usize, values: &[f32]) -> Self {
        Self {
            version,
            round,
            classes: classes as u32,
            values: f32_bytes(values),
        }
    }
    /// The values, checked for length `expected`.
    pub fn decoder(&self, expected: usize) -> Result<Vec<f32>, ProtocolError> {
        let v = bytes_f32(&self.values).ok_or_else(|| ProtocolError::Malformed {
            what: "global decoder",
            message: format!("{} bytes is not a whole number of f32", self.values.len()),
        })?;
        if v.len() != expected {
            return Err(ProtocolError::Malformed {
                what: "global decoder",
                message: format!("{} values, this model's decoder has {expected}", v.len()),
            });
        }
        Ok(v)
    }
    pub fn digest(&self) -> String {
        sha256_hex(&self.values)
    }
}

/// Local figures a device reports with its update.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LocalMetrics {
    /// Mean training loss of the last local epoch.
    pub train_loss: f32,
    /// Mean IoU of the local model on the device's own hold-out images, when it has any.
    pub holdout_mean_iou: Option<f32>,
    /// Mean IoU of the global model it started from, on the same images.
    pub holdout_mean_iou_before: Option<f32>,
    pub seconds: f32,
    /// Local batches re-styled with another lab's style code ([`crate::federated::edge::style`]); 0 when
    /// the device has no codes or style codes are off. Absent in older senders' updates.
    #[serde(default)]
    pub restyled_batches: u64,
}

/// A device's update for a round (on `update/<device>`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UpdateBody {
    pub device: String,
    /// The global decoder version it trained from.
    pub global_version: u64,
    /// Training samples (labelled images) behind it: FedAvg's weight.
    pub samples: u64,
    pub metrics: LocalMetrics,
    /// The update (local − global), compressed by [`crate::federated::compress`].
    #[serde(with = "serde_bytes")]
    pub compressed: Vec<u8>,
    /// L2 norm of the update before compression (checked by the sender against its bound).
    pub norm: f32,
}

/// Online/offline and what a device is doing (retained on `status/<device>`; the last will says
/// offline).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusBody {
    pub device: String,
    pub online: bool,
    pub model_version: String,
    pub global_version: u64,
    pub last_round: Option<u64>,
    /// Updates waiting in the outbox.
    pub queue_depth: u64,
    pub last_error: Option<String>,
    /// The other devices whose style codes this device holds for its base model (sorted); empty when
    /// style codes are off. Absent in older senders' status.
    #[serde(default)]
    pub style_codes: Vec<String>,
    /// Messages on `style/+` dropped since start: malformed, wrong kind, forged sender (the sender is
    /// not the topic's device), or an invalid code.
    #[serde(default)]
    pub style_rejected: u64,
    /// The global decoder segmenting now (0: the base model's own); it lags `global_version` while
    /// a new global is scored on the hold-out, or when one was kept out.
    #[serde(default)]
    pub live_global_version: u64,
    /// The decoder segmenting now is `live_global_version` fine-tuned on the lab's own images
    /// (`[federation.personalise]`).
    #[serde(default)]
    pub live_personalised: bool,
    /// Hold-out mean IoU of the decoder segmenting now, as last scored on this lab's hold-out
    /// images (None: not scored, e.g. no hold-out or the base model's own decoder).
    #[serde(default)]
    pub live_holdout_iou: Option<f64>,
    /// New globals kept out of production by the hold-out gate since start.
    #[serde(default)]
    pub globals_refused: u64,
    /// The last global decoder scored on this lab's hold-out (0: none yet) and its own mean IoU
    /// there (not its personalised fine-tune's), whether or not it went live: what the federation
    /// gives this lab.
    #[serde(default)]
    pub global_scored_version: u64,
    #[serde(default)]
    pub global_holdout_iou: Option<f64>,
}

/// One segmented micrograph (on `result/<device>`): the figures, never the image.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResultBody {
    pub device: String,
    pub file: String,
    pub sha256: String,
    pub model: String,
    pub latency_ms: f64,
    /// The micrograph's features as JSON text (grain or phase figures).
    pub features_json: String,
}

/// What happened in a round (retained on `summary`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RoundSummary {
    pub round: u64,
    pub global_version: u64,
    /// Devices whose update was merged, sorted.
    pub accepted: Vec<String>,
    /// Devices that were expected but sent nothing before the deadline.
    pub stragglers: Vec<String>,
    /// Rejected messages by reason.
    pub rejected: std::collections::BTreeMap<String, u64>,
    /// Sum of the update payload bytes merged.
    pub update_bytes: u64,
    pub samples: u64,
    pub seconds: f64,
    /// The privacy spent so far (ε at δ) when the fleet runs DP-FedAvg (docs/privacy.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub privacy: Option<PrivacyReport>,
    /// Each accepted device's part, as its update reported it (the operator's console plots the
    /// hold-out IoU per lab and round from it). Empty from older aggregators and from a scale-out
    /// coordinator, which sees partial sums only.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub devices: std::collections::BTreeMap<String, DeviceReport>,
    /// The round ran secure aggregation: the aggregator merged the sum of the accepted devices'
    /// updates and never saw one of them (`accepted` are the devices in the sum).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub secure_aggregation: bool,
    /// Why the round ended without merging anything (a secure round that lost too many devices, or
    /// that an aggregator restart interrupted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub abandoned: Option<String>,
}

/// One accepted device's part in a round (in [`RoundSummary::devices`]).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DeviceReport {
    /// Size of its compressed update.
    pub bytes: u64,
    pub samples: u64,
    pub train_loss: f32,
    /// Mean IoU of its local model on its hold-out images ([`LocalMetrics::holdout_mean_iou`]).
    pub holdout_iou: Option<f32>,
    /// Mean IoU of the global decoder it started from, on the same images.
    pub holdout_iou_before: Option<f32>,
}

/// One MQTT payload: a whole message (`total == 1`) or one chunk of one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Frame {
    pub schema: u16,
    /// sha256 (hex) of the whole message.
    pub digest: String,
    pub index: u32,
    pub total: u32,
    /// Length of the whole message.
    pub len: u64,
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
}

/// Splits an encoded message into frames of at most `chunk` data bytes each.
pub fn split(message: &[u8], chunk: usize) -> Result<Vec<Vec<u8>>, ProtocolError> {
    let chunk = chunk.max(1);
    let digest = sha256_hex(message);
    let total = message.len().div_ceil(chunk).max(1);
    let total32 = u32::try_from(total).map_err(|_| ProtocolError::Oversized {
        len: message.len(),
        limit: chunk * u32::MAX as usize,
    })?;
    let mut frames = Vec::with_capacity(total);
    for i in 0..total {
        let data = &message[(i * chunk).min(message.len())..((i + 1) * chunk).min(message.len())];
        let f = Frame {
            schema: SCHEMA_VERSION,
            digest: digest.clone(),
            index: i as u32,
            total: total32,
            len: message.len() as u64,
            data: data.to_vec(),
        };
        frames.push(to_cbor("frame", &f)?);
    }
    Ok(frames)
}

/// Limits of a [`Reassembler`].
///
/// Every bound is checked from the frame's header before anything is allocated: a frame's `total`
/// and `len` are the sender's word, so they only ever size what the frames actually delivered.
#[derive(Debug, Clone, Copy)]
pub struct ReassemblyLimits {
    /// Largest whole message accepted.
    pub max_message: usize,
    /// Bytes held in incomplete messages, all together; beyond it the stream with the most
    /// incomplete messages (then the most bytes) is cut back first, so one sender flooding cannot
    /// evict the others' messages.
    pub max_pending: usize,
    /// An incomplete message older than this is dropped.
    pub timeout: Duration,
}

impl Default for ReassemblyLimits {
    fn default() -> Self {
        Self {
            max_message: 64 * 1024 * 1024,
            max_pending: 256 * 1024 * 1024,
            timeout: Duration::from_secs(120),
        }
    }
}

/// Incomplete messages one stream (one sender's topic) may have at once; a new one beyond it drops
/// that stream's oldest. An honest sender has one in flight (two across a retry).
pub const PARTIALS_PER_STREAM: usize = 4;

/// Bookkeeping bytes charged per held chunk on top of its data, so that a flood of tiny chunks is
/// bounded by `max_pending` too.
const CHUNK_OVERHEAD: usize = 64;

struct Partial {
    started: Instant,
    total: u32,
    len: usize,
    /// Only the chunks that arrived: nothing is sized from the sender's `total`.
    parts: std::collections::BTreeMap<u32, Vec<u8>>,
    /// Data bytes of the chunks that arrived.
    bytes: usize,
    held: usize,
}

/// One stream's incomplete messages, by digest.
#[derive(Default)]
struct Stream {
    partial: HashMap<String, Partial>,
    held: usize,
}

impl Stream {
    /// Drops the oldest incomplete message; returns the bytes freed.
    fn drop_oldest(&mut self) -> Option<usize> {
        let oldest = self
            .partial
            .iter()
            .min_by_key(|(_, p)| p.started)
            .map(|(k, _)| k.clone())?;
        let p = self.partial.remove(&oldest)?;
        self.held -= p.held;
        tracing::warn!(digest = %oldest, "dropped an incomplete chunked message: reassembly memory full");
        Some(p.held)
    }
}

/// Collects frames into whole messages. Each stream (the topic, or topic family, of one sender)
/// has its own pool, so frames of different senders never mix, and a sender that starts many
/// messages evicts its own before anyone else's.
#[derive(Default)]
pub struct Reassembler {
    limits: ReassemblyLimits,
    streams: HashMap<String, Stream>,
    held: usize,
    /// Messages given up (timeout or memory bound), for the counters.
    pub dropped: u64,
}

impl std::fmt::Debug for Reassembler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reassembler")
            .field("pending", &self.pending())
            .field("held", &self.held)
            .field("dropped", &self.dropped)
            .finish()
    }
}

impl Reassembler {
    pub fn new(limits: ReassemblyLimits) -> Self {
        Self {
            limits,
            ..Self::default()
        }
    }

    /// Bytes held in incomplete messages (chunk data plus a fixed overhead per chunk).
    pub fn held(&self) -> usize {
        self.held
    }

    /// Incomplete messages held, over all streams.
    pub fn pending(&self) -> usize {
        self.streams.values().map(|s| s.partial.len()).sum()
    }

    /// Bytes `stream` holds in incomplete messages.
    pub fn held_by(&self, stream: &str) -> usize {
        self.streams.get(stream).map_or(0, |s| s.held)
    }

    /// Whether `stream` holds an incomplete message of this digest.
    pub fn holds(&self, stream: &str, digest: &str) -> bool {
        self.streams
            .get(stream)
            .is_some_and(|s| s.partial.contains_key(digest))
    }

    /// Adds one frame; returns the whole message when it is complete (and its digest checks).
    pub fn push(&mut self, stream: &str, bytes: &[u8]) -> Result<Option<Vec<u8>>, ProtocolError> {
        self.expire();
        if bytes.len() > MAX_PACKET_BYTES {
            return Err(ProtocolError::Oversized {
                len: bytes.len(),
                limit: MAX_PACKET_BYTES,
            });
        }
        let f: Frame = from_cbor("frame", bytes)?;
        if f.schema != SCHEMA_VERSION {
            return Err(ProtocolError::Schema {
                what: "frame",
                found: f.schema,
            });
        }
        let frame_err = |problem: String| ProtocolError::Frame {
            digest: f.digest.clone(),
            index: f.index,
            total: f.total,
            problem,
        };
        if f.total == 0 || f.index >= f.total {
            return Err(frame_err("index out of range".into()));
        }
        let len = usize::try_from(f.len).unwrap_or(usize::MAX);
        if len > self.limits.max_message {
            return Err(ProtocolError::Oversized {
                len,
                limit: self.limits.max_message,
            });
        }
        if f.data.len() > len {
            return Err(frame_err("chunk longer than the whole message".into()));
        }
        if f.total == 1 {
            if f.data.len() != len {
                return Err(frame_err("length does not match".into()));
            }
            return check_digest(f.data, &f.digest).map(Some);
        }
        // Every chunk of a split message carries at least one byte, so a message of `len` bytes
        // has at most `len` chunks: this bounds `total` by `max_message` before anything is held.
        if f.data.is_empty() || u64::from(f.total) > f.len {
            return Err(frame_err(format!(
                "{} chunks cannot make a message of {len} bytes",
                f.total
            )));
        }
        if f.digest.len() != 64 || !f.digest.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(frame_err("digest is not a sha256 in hex".into()));
        }
        let cost = f.data.len() + CHUNK_OVERHEAD;
        let s = self.streams.entry(stream.to_owned()).or_default();
        if !s.partial.contains_key(&f.digest) {
            // A new message on this stream: make room among its own first.
            while s.partial.len() >= PARTIALS_PER_STREAM {
                let Some(freed) = s.drop_oldest() else { break };
                self.held -= freed;
                self.dropped += 1;
            }
        }
        let entry = s
            .partial
            .entry(f.digest.clone())
            .or_insert_with(|| Partial {
                started: Instant::now(),
                total: f.total,
                len,
                parts: std::collections::BTreeMap::new(),
                bytes: 0,
                held: 0,
            });
        if entry.total != f.total || entry.len != len {
            return Err(frame_err(format!(
                "disagrees with earlier frames ({} frames, {} bytes)",
                entry.total, entry.len
            )));
        }
        if !entry.parts.contains_key(&f.index) {
            if entry.bytes + f.data.len() > len {
                return Err(frame_err(format!(
                    "chunks add up to more than the message's {len} bytes"
                )));
            }
            entry.bytes += f.data.len();
            entry.held += cost;
            s.held += cost;
            self.held += cost;
            entry.parts.insert(f.index, f.data);
        }
        if entry.parts.len() == entry.total as usize {
            let Some(p) = s.partial.remove(&f.digest) else {
                return Ok(None);
            };
            s.held -= p.held;
            self.held -= p.held;
            if s.partial.is_empty() {
                self.streams.remove(stream);
            }
            let mut whole = Vec::with_capacity(p.len);
            for part in p.parts.into_values() {
                whole.extend_from_slice(&part);
            }
            if whole.len() != p.len {
                return Err(ProtocolError::Frame {
                    digest: f.digest,
                    index: 0,
                    total: p.total,
                    problem: format!("chunks add up to {} bytes, expected {}", whole.len(), p.len),
                });
            }
            return check_digest(whole, &f.digest).map(Some);
        }
        self.enforce_memory();
        Ok(None)
    }

    fn expire(&mut self) {
        let timeout = self.limits.timeout;
        let mut gone = 0u64;
        let mut freed = 0;
        for s in self.streams.values_mut() {
            s.partial.retain(|_, p| {
                let keep = p.started.elapsed() < timeout;
                if !keep {
                    freed += p.held;
                    s.held -= p.held;
                    gone += 1;
                }
                keep
            });
        }
        self.streams.retain(|_, s| !s.partial.is_empty());
        self.held -= freed;
        if gone > 0 {
            tracing::warn!(
                messages = gone,
                "dropped incomplete chunked messages (timed out)"
            );
            self.dropped += gone;
        }
    }

    /// Over the byte budget: cut back the stream with the most incomplete messages (an honest
    /// sender has one), then the one holding the most bytes; its oldest message goes first.
    fn enforce_memory(&mut self) {
        while self.held > self.limits.max_pending {
            let Some(biggest) = self
                .streams
                .iter()
                .max_by_key(|(_, s)| (s.partial.len(), s.held))
                .map(|(k, _)| k.clone())
            else {
                break;
            };
            let Some(s) = self.streams.get_mut(&biggest) else {
                break;
            };
            match s.drop_oldest() {
                Some(freed) => {
                    self.held -= freed;
                    self.dropped += 1;
                }
                None => {
                    self.streams.remove(&biggest);
                }
            }
            if self
                .streams
                .get(&biggest)
                .is_some_and(|s| s.partial.is_empty())
            {
                self.streams.remove(&biggest);
            }
        }
    }
}

fn check_digest(whole: Vec<u8>, digest: &str) -> Result<Vec<u8>, ProtocolError> {
    let found = sha256_hex(&whole);
    if found != digest {
        return Err(ProtocolError::Digest {
            expected: digest.to_owned(),
            found,
        });
    }
    Ok(whole)
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Little-endian bytes of `values`.
pub fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// Values from little-endian bytes, or `None` when the length is not a multiple of 4.
pub fn bytes_f32(bytes: &[u8]) -> Option<Vec<f32>> {
    bytes.len().is_multiple_of(4).then(|| {
        bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    })
}

pub fn to_cbor<T: Serialize>(what: &'static str, value: &T) -> Result<Vec<u8>, ProtocolError> {
    let mut out = Vec::new();
    ciborium::into_writer(value, &mut out).map_err(|e| ProtocolError::Encode {
        what,
        message: e.to_string(),
    })?;
    Ok(out)
}

pub fn from_cbor<T: DeserializeOwned>(
    what: &'static str,
    bytes: &[u8],
) -> Result<T, ProtocolError> {
    ciborium::from_reader(bytes).map_err(|e| ProtocolError::Malformed {
        what,
        message: e.to_string(),
    })
}

// ---- settings and reports that travel in announcements and summaries ----------------------------
// Their checks and their use live with the codec (`crate::federated::compress`) and DP
// (`crate::federated::dp`).

/// Quantization of the values that are sent.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Quantize {
    /// Plain `f32` (exact).
    #[default]
    None,
    /// One signed byte per value, symmetric per-tensor scale `max|v| / 127`.
    Int8,
    /// Half a byte per value, symmetric per-tensor scale `max|v| / 7`.
    Int4,
}

/// Which compression stages run. The default is dense fp32: exact, no residual, no zstd.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(default, deny_unknown_fields)]
pub struct CompressionConfig {
    /// Fraction of coordinates kept per tensor, in (0, 1]; `None` sends every coordinate.
    pub top_k: Option<f32>,
    /// Carry what compression dropped or rounded into the next round (needs a residual (`crate::federated::compress::Residual`)).
    pub error_feedback: bool,
    /// Quantization of the sent values.
    pub quantize: Quantize,
    /// zstd level over the body (zstd's range, e.g. 1..=22; 0 = zstd's default); `None` = no zstd.
    pub zstd_level: Option<i32>,
}

/// The privacy spent so far, for the round summary.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PrivacyReport {
    /// "dp-fedavg (distributed, secure aggregation)", "dp-fedavg (central)", "style-code gaussian".
    pub mechanism: String,
    pub clip_norm: f32,
    pub noise_multiplier: f64,
    pub sampling_rate: f64,
    /// Rounds (or codes) accounted.
    pub steps: u64,
    pub epsilon: f64,
    pub delta: f64,
    /// The Rényi order that gave ε.
    pub order: u32,
}

/// The optimiser of local training. Its state is reset at the start of every round (a device
/// starts each round from a new global decoder).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LocalOptimizer {
    /// SGD with momentum 0.9 (what devices did before the announcement named an optimiser).
    #[default]
    Momentum,
    /// Plain SGD (FedAvg's analysis; FedST's choice).
    Sgd,
    /// AdamW (β 0.9 / 0.999, weight decay 0.01), its moments reset every round.
    Adam,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The announcement as aggregators sent it before it named the optimiser.
    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct AnnouncementV1 {
        round: u64,
        global_version: u64,
        global_digest: String,
        deadline_unix: f64,
        local_epochs: u32,
        steps_per_epoch: u32,
        learning_rate: f32,
        prox_mu: f32,
        compression: crate::federated::compress::CompressionConfig,
        closed: bool,
    }

    #[test]
    fn announcements_without_an_optimiser_still_decode_both_ways() {
        let old = AnnouncementV1 {
            round: 4,
            global_version: 3,
            global_digest: "d".into(),
            deadline_unix: 1.0,
            local_epochs: 1,
            steps_per_epoch: 8,
            learning_rate: 0.005,
            prox_mu: 0.0,
            compression: Default::default(),
            closed: false,
        };
        let new: RoundAnnouncement =
            from_cbor("announcement", &to_cbor("announcement", &old).unwrap()).unwrap();
        assert_eq!(new.optimizer, LocalOptimizer::Momentum);
        assert_eq!((new.round, new.learning_rate), (4, 0.005));
        let adam = RoundAnnouncement {
            optimizer: LocalOptimizer::Adam,
            ..new
        };
        let back: AnnouncementV1 =
            from_cbor("announcement", &to_cbor("announcement", &adam).unwrap()).unwrap();
        assert_eq!(back, old);
    }

    fn header() -> Header<'static> {
        Header {
            fleet: "lab-test",
            round: 3,
            model_version: "abc",
            sender: "dev-1",
        }
    }

    #[test]
    fn envelope_round_trip_and_checks() {
        let g = GlobalDecoder::new(4, 3, 2, &[1.0, -2.5, 3.25]);
        let env = Envelope::seal(Kind::GlobalDecoder, &header(), &g).unwrap();
        let bytes = env.to_bytes().unwrap();
        let back = Envelope::from_bytes(&bytes, 1 << 20).unwrap();
        assert_eq!(back, env);
        let g2: GlobalDecoder = back.body(Kind::GlobalDecoder).unwrap();
        assert_eq!(g2.decoder(3).unwrap(), vec![1.0, -2.5, 3.25]);
        assert!(matches!(
            g2.decoder(4),
            Err(ProtocolError::Malformed { .. })
        ));
        assert!(matches!(
            back.body::<UpdateBody>(Kind::Update),
            Err(ProtocolError::Kind { .. })
        ));
        // Tampered body: digest mismatch.
        let mut t = env.clone();
        t.body[0] ^= 1;
        assert!(matches!(
            Envelope::from_bytes(&t.to_bytes().unwrap(), 1 << 20),
            Err(ProtocolError::Digest { .. })
        ));
        // Future schema.
        let mut s = env.clone();
        s.schema = 99;
        let e = Envelope::from_bytes(&s.to_bytes().unwrap(), 1 << 20).unwrap_err();
        assert!(e.to_string().contains("schema version 99"), "{e}");
        // Oversized.
        assert!(matches!(
            Envelope::from_bytes(&bytes, 10),
            Err(ProtocolError::Oversized { .. })
        ));
    }

    /// Issue 17: globals and round announcements were not authenticated: a forged retained global
    /// of version u64::MAX pinned an agent. Signed by the aggregator's key, checked before the body.
    #[test]
    fn aggregator_signatures_cover_header_and_body_and_refuse_forgeries() {
        use crate::wire::signing::SecretKey;
        let key = SecretKey::from_seed([3; 32]);
        let other = SecretKey::from_seed([4; 32]);
        let g = GlobalDecoder::new(u64::MAX, 1, 2, &[1.0]);
        let env = Envelope::seal(Kind::GlobalDecoder, &header(), &g)
            .unwrap()
            .sign(&key)
            .unwrap();
        let back = Envelope::from_bytes(&env.to_bytes().unwrap(), 1 << 20).unwrap();
        back.verify(&key.public()).unwrap();
        // Unsigned, signed by another key, or any header field or the body changed: refused.
        let mut unsigned = back.clone();
        unsigned.signature = None;
        assert!(unsigned.verify(&key.public()).is_err());
        let foreign = Envelope::seal(Kind::GlobalDecoder, &header(), &g)
            .unwrap()
            .sign(&other)
            .unwrap();
        assert!(foreign.verify(&key.public()).is_err());
        let mut t = back.clone();
        t.round += 1;
        assert!(t.verify(&key.public()).is_err());
        let mut t = back.clone();
        t.kind = Kind::RoundAnnouncement;
        assert!(t.verify(&key.public()).is_err());
        let mut t = back.clone();
        t.fleet = "other-fleet".into();
        assert!(t.verify(&key.public()).is_err());
        let mut t = back.clone();
        t.body = to_cbor("b", &GlobalDecoder::new(7, 1, 2, &[1.0])).unwrap();
        t.digest = sha256_hex(&t.body);
        assert!(t.verify(&key.public()).is_err());
        // An unsigned envelope still decodes for receivers without a key (old configurations).
        let plain = Envelope::seal(Kind::Status, &header(), &"x").unwrap();
        assert!(plain.to_bytes().unwrap().len() < env.to_bytes().unwrap().len());
    }

    #[test]
    fn garbage_never_panics() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let good = Envelope::seal(Kind::Status, &header(), &"x")
            .unwrap()
            .to_bytes()
            .unwrap();
        let mut r = Reassembler::new(ReassemblyLimits::default());
        for i in 0..2000 {
            let mut b: Vec<u8> = if i % 2 == 0 {
                (0..rng.random_range(0..200))
                    .map(|_| rng.random())
                    .collect()
            } else {
                let mut g = good.clone();
                let at = rng.random_range(0..g.len());
                g[at] = rng.random();
                g.truncate(rng.random_range(0..=g.len()));
                g
            };
            let _ = Envelope::from_bytes(&b, 1 << 20);
            let _ = r.push("s", &b);
            b.reverse();
            let _ = Envelope::from_bytes(&b, 1 << 20);
        }
    }

    #[test]
    fn chunks_reassemble_in_any_order_and_bad_ones_are_refused() {
        let msg: Vec<u8> = (0..10_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let mut frames = split(&msg, 1000).unwrap();
        assert_eq!(frames.len(), 10);
        frames.reverse();
        let mut r = Reassembler::new(ReassemblyLimits::default());
        let mut out = None;
        for (i, f) in frames.iter().enumerate() {
            let got = r.push("update/dev-1", f).unwrap();
            if i < 9 {
                assert!(got.is_none());
                // A duplicate chunk changes nothing.
                assert!(r.push("update/dev-1", f).unwrap().is_none());
            } else {
                out = got;
            }
        }
        assert_eq!(out.unwrap(), msg);
        assert_eq!(r.held(), 0);

        // A chunk with changed data: the digest of the whole fails.
        let mut frames = split(&msg, 1000).unwrap();
        let mut f: Frame = from_cbor("frame", &frames[3]).unwrap();
        f.data[0] ^= 0xff;
        frames[3] = to_cbor("frame", &f).unwrap();
        let mut last = Ok(None);
        for f in &frames {
            last = r.push("s", f);
        }
        assert!(matches!(last, Err(ProtocolError::Digest { .. })));

        // Whole message above the limit is refused at its first frame.
        let mut small = Reassembler::new(ReassemblyLimits {
            max_message: 5000,
            ..ReassemblyLimits::default()
        });
        assert!(matches!(
            small.push("s", &split(&msg, 1000).unwrap()[0]),
            Err(ProtocolError::Oversized { .. })
        ));
    }

    #[test]
    fn reassembly_memory_is_bounded_and_incomplete_messages_time_out() {
        let mut r = Reassembler::new(ReassemblyLimits {
            max_message: 1 << 20,
            max_pending: 3000,
            timeout: Duration::from_millis(50),
        });
        for m in 0..5u8 {
            let msg = vec![m; 4000];
            let frames = split(&msg, 1000).unwrap();
            // Only the first two chunks of each message arrive.
            r.push(&format!("s{m}"), &frames[0]).unwrap();
            r.push(&format!("s{m}"), &frames[1]).unwrap();
            assert!(r.held() <= 3000, "held {}", r.held());
        }
        assert!(r.dropped >= 3);
        std::thread::sleep(Duration::from_millis(60));
        let one = split(b"hello", 1000).unwrap();
        assert_eq!(r.push("x", &one[0]).unwrap().unwrap(), b"hello");
        assert_eq!(r.held(), 0);
    }

    /// Issue 17: one ~100-byte frame claiming 4294967295 chunks made the reassembler allocate
    /// ~100 GB (`vec![None; total]`) and killed `microfed aggregate`. Nothing may be sized from it.
    #[test]
    fn a_frame_claiming_four_billion_chunks_is_refused_without_allocating() {
        let mut r = Reassembler::new(ReassemblyLimits::default());
        let hostile = |total: u32, len: u64, data: Vec<u8>| {
            to_cbor(
                "frame",
                &Frame {
                    schema: SCHEMA_VERSION,
                    digest: sha256_hex(b"whatever"),
                    index: 0,
                    total,
                    len,
                    data,
                },
            )
            .unwrap()
        };
        // More chunks than bytes: no split makes that.
        assert!(
            r.push("update/x", &hostile(u32::MAX, 100, vec![1; 10]))
                .is_err()
        );
        // Even when `len` is large enough, nothing is allocated up front for the missing chunks.
        let _ = r.push(
            "update/x",
            &hostile(u32::MAX, u64::from(u32::MAX), vec![1; 10]),
        );
        assert!(r.held() < 4096, "held {}", r.held());
        // An empty chunk of a multi-chunk message is not a chunk.
        assert!(r.push("update/x", &hostile(3, 100, vec![])).is_err());
    }

    /// Issue 17: one shared pool let one device evict everyone's in-flight updates.
    #[test]
    fn one_stream_flooding_cannot_evict_another_streams_message() {
        let mut r = Reassembler::new(ReassemblyLimits {
            max_message: 4000,
            max_pending: 6000,
            timeout: Duration::from_secs(60),
        });
        let honest: Vec<u8> = (0..4000u32).map(|i| (i % 251) as u8).collect();
        let frames = split(&honest, 1000).unwrap();
        for f in &frames[..3] {
            assert!(r.push("update/a", f).unwrap().is_none());
        }
        // The flooder starts many messages on its own topic, each newer than the honest one.
        for m in 0..50u32 {
            let junk = vec![(m % 256) as u8; 4000];
            let _ = r.push("update/evil", &split(&junk, 1000).unwrap()[0]);
            assert!(r.held() <= 6000, "held {}", r.held());
        }
        assert_eq!(r.push("update/a", &frames[3]).unwrap().unwrap(), honest);
    }

    #[test]
    fn topics() {
        let t = Topics::new("lab-test").unwrap();
        assert_eq!(t.update("dev-1"), "microfed/lab-test/update/dev-1");
        assert_eq!(
            t.update_shared_filter("aggregators"),
            "$share/aggregators/microfed/lab-test/update/+"
        );
        assert_eq!(t.device_of("update", &t.update("dev-1")), Some("dev-1"));
        assert_eq!(t.device_of("update", "microfed/lab-test/update/a/b"), None);
        assert_eq!(t.device_of("status", &t.update("dev-1")), None);
        assert!(Topics::new("a/b").is_err());
        assert!(Topics::new("").is_err());
    }
}
