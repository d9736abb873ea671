//! `aggregator.toml`: the aggregator's configuration, validated before anything starts.
//!
//! Map: [`AggregatorConfig`] (the file) → [`RoundSection`], [`DpSection`], [`ScaleOutSection`]
//! ([`Role`]: coordinator or worker), with the fleet's compression and merge rule.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::federated::compress::{CompressionConfig, decoder_layout, single_frame_bound};
use crate::federated::dp::DpConfig;
use crate::federated::schedule::{Decay, LrSchedule};
use crate::federated::server::error::AggregatorError;
use crate::federated::server::merge::AggregationConfig;
use crate::wire::link::BrokerSettings;
use crate::wire::protocol::LocalOptimizer;
use crate::wire::protocol::{self, CHUNK_BYTES, Topics};

/// Largest update message accepted (a dense fp32 decoder of 2 classes is 3.1 MB; 16 classes barely
/// more): anything bigger is not an update of this model.
pub const MAX_UPDATE_BYTES: usize = 16 * 1024 * 1024;

/// `aggregator.toml`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AggregatorConfig {
    /// Client id (and certificate CN): `aggregator`, `aggregator-1`, …
    #[serde(default = "default_id")]
    pub id: String,
    pub fleet: String,
    /// The base model (ONNX): its decoder is global version 0, its sha256 the model version.
    pub model: PathBuf,
    /// Round state, globals and accepted updates.
    pub state: PathBuf,
    /// Rounds to run (0 = until stopped).
    #[serde(default)]
    pub rounds: u64,
    /// Devices allowed to take part. Empty takes updates under any device id and closes a round
    /// on the first update (quorum 1): allowed with the embedded broker (loopback), and with an
    /// external broker only when `any_device = true` says so.
    #[serde(default)]
    pub devices: Vec<String>,
    /// With an external broker and `devices = []`: take updates under any id the broker lets
    /// through (its ACL is then the only check on who takes part). Default false: such a
    /// configuration is refused at start.
    #[serde(default)]
    pub any_device: bool,
    #[serde(default)]
    pub round: RoundSection,
    #[serde(default)]
    pub compression: CompressionConfig,
    #[serde(default)]
    pub aggregation: AggregationConfig,
    /// The broker; none = start the embedded one on loopback.
    #[serde(default)]
    pub broker: Option<BrokerSettings>,
    /// Largest accepted L2 norm of one update (after decompression). The default, 10, is about
    /// 100 × the measured median update norm (0.088 for 8 local SGD steps, docs/privacy.md): room
    /// for longer local training, but a poisoned update cannot outweigh the rest by orders of
    /// magnitude. Raise it only with measured norms of your own fleet.
    #[serde(default = "default_max_norm")]
    pub max_update_norm: f32,
    /// Largest training-sample count one update may claim (its FedAvg weight, self-reported). An
    /// update above it is refused (`samples`), so no lab buys the round's weight and the round's
    /// total cannot overflow.
    #[serde(default = "default_max_samples")]
    pub max_samples: u64,
    /// How many closed rounds keep their devices' raw updates (`STATE/round-N/*.msg`, kept so a
    /// restart replays an open round and an operator can audit the last merge). Older ones are
    /// deleted when a round closes: a lab's raw update says more about its images than the merged
    /// global does. 0 = delete a round's updates as soon as it is merged.
    #[serde(default = "default_keep_update_rounds")]
    pub keep_update_rounds: u64,
    /// Server-side DP-FedAvg; none = plain aggregation.
    #[serde(default)]
    pub dp: Option<DpSection>,
    /// Several aggregator processes sharing the update stream; none = this one does everything.
    #[serde(default)]
    pub scale_out: Option<ScaleOutSection>,
    /// Ed25519 key (PKCS#8 PEM, `microfed fleet keygen`) that signs the globals, round
    /// announcements and summaries; agents list its public key as `[federation] aggregator_key`.
    /// None = unsigned (a warning at start): any client of the broker could forge them.
    #[serde(default)]
    pub signing_key: Option<PathBuf>,
    /// `[metrics]`: Prometheus `/metrics` on this address (off when absent; docs/console.md).
    #[serde(default)]
    pub metrics: Option<crate::web::ListenSection>,
    /// `[secure_aggregation]`: rounds run secure aggregation (the aggregator learns the sum of the
    /// round's updates, never one lab's); none = plain rounds.
    #[serde(default)]
    pub secure_aggregation: Option<SecureSection>,
}

/// `[secure_aggregation]` (docs/privacy.md): the settings of each round's protocol.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecureSection {
    /// Shamir threshold `t`: devices needed at every step, and the fewest that must collude (with
    /// the aggregator) to open one device's secrets. Default: a majority of `devices`.
    #[serde(default)]
    pub threshold: Option<usize>,
    /// Seconds each step after the keys waits for the devices still in the round; a device silent
    /// by then has dropped out.
    #[serde(default = "default_step_timeout")]
    pub step_timeout_s: f64,
    /// Each coordinate of an update is clamped to ±`value_clip` and quantised to int8 with the
    /// shared step `value_clip / 127` before it is masked (in the ring of `bitlen(254 n)` bits).
    #[serde(default = "default_value_clip")]
    pub value_clip: f32,
    /// Sparse rounds: each round masks this fraction of the coordinates, the same for every device
    /// (drawn from a seed the round's start carries, so the masks cancel); each device keeps what
    /// was not sent and adds it to its next update (error feedback). None: every coordinate.
    #[serde(default)]
    pub support_fraction: Option<f64>,
}

fn default_step_timeout() -> f64 {
    30.0
}
fn default_value_clip() -> f32 {
    0.05
}

impl SecureSection {
    /// The threshold for `devices` listed devices.
    pub fn threshold_for(&self, devices: usize) -> usize {
        self.threshold.unwrap_or((devices / 2 + 1).max(2))
    }
}

/// `[dp]`: central DP-FedAvg in the aggregator (see the module doc and docs/privacy.md).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DpSection {
    /// L2 bound `C` on one lab's update (each accepted update is clipped to it).
    pub clip_norm: f32,
    /// `z`: the noise on the round's sum has standard deviation `z · C`.
    pub noise_multiplier: f64,
    /// The δ that ε is reported for.
    #[serde(default = "default_delta")]
    pub delta: f64,
    /// The sampling rate `q` the accountant uses; default 1 (no amplification). Amplification by
    /// sampling assumes a random, undisclosed subset of labs; devices here select themselves and
    /// the summary names them, so set a rate below 1 only where labs really are drawn at random.
    #[serde(default)]
    pub sampling_rate: Option<f64>,
    /// Stop before opening a round that could take ε (at δ) above this.
    #[serde(default)]
    pub max_epsilon: Option<f64>,
}

fn default_delta() -> f64 {
    1e-5
}

/// The name of the mechanism in [`PrivacyReport::mechanism`].
pub const DP_MECHANISM: &str = "dp-fedavg (central, trusted aggregator)";
/// The same with `[secure_aggregation]`: the devices clip, the aggregator noises the unmasked sum.
pub const DP_MECHANISM_SECURE: &str =
    "dp-fedavg (devices clip; noise added by the aggregator to the secure aggregation's sum)";

impl DpSection {
    /// The [`DpConfig`] of a round with sampling rate `q`.
    pub fn config(&self, q: f64) -> DpConfig {
        DpConfig {
            clip_norm: self.clip_norm,
            noise_multiplier: self.noise_multiplier,
            sampling_rate: q,
            delta: self.delta,
        }
    }

    /// The largest `q` a round can be accounted with: the fixed rate, else 1 (every device).
    pub(crate) fn worst_case_rate(&self) -> f64 {
        self.sampling_rate.unwrap_or(1.0)
    }

    fn validate(&self) -> Result<(), String> {
        self.config(self.worst_case_rate())
            .validate()
            .map_err(|e| format!("dp: {e}"))?;
        if let Some(e) = self.max_epsilon
            && !(e.is_finite() && e > 0.0)
        {
            return Err(format!("dp.max_epsilon: {e} is not a positive number"));
        }
        Ok(())
    }
}

fn default_id() -> String {
    "aggregator".into()
}
fn default_max_norm() -> f32 {
    10.0
}
fn default_max_samples() -> u64 {
    10_000
}
fn default_keep_update_rounds() -> u64 {
    1
}

/// How rounds run. Every field is optional: a missing one takes the default below, which is the
/// recipe measured in docs/results.md (AdamW at 1e-3, one warm-up round, then a cosine decay over
/// the run's `rounds` to 5 %), not the plain SGD an announcement without an optimiser means.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RoundSection {
    pub deadline_s: f64,
    /// Close early once this many updates are in (default: every known device, else 1).
    pub quorum: Option<usize>,
    /// … or this fraction of the known devices.
    pub quorum_fraction: Option<f64>,
    pub local_epochs: u32,
    pub steps_per_epoch: u32,
    /// The base local learning rate; round r announces `schedule.rate(learning_rate, r)`.
    pub learning_rate: f32,
    /// The rate across rounds (default: one warm-up round, then a cosine to 5 % at the run's last
    /// round; a cosine with `rounds = 0` means "over the aggregator's `rounds`", and with no
    /// planned end (`rounds = 0` there too) the rate stays at the base after the warm-up).
    pub schedule: LrSchedule,
    /// The optimiser devices train with (default: `adam`, AdamW).
    pub optimizer: LocalOptimizer,
    pub prox_mu: f32,
    /// Pause between rounds.
    pub pause_s: f64,
}

impl Default for RoundSection {
    fn default() -> Self {
        Self {
            deadline_s: 300.0,
            quorum: None,
            quorum_fraction: None,
            local_epochs: 1,
            steps_per_epoch: 0,
            learning_rate: 0.001,
            schedule: LrSchedule {
                warmup_rounds: 1,
                decay: Decay::Cosine,
                rounds: 0,
                floor: 0.05,
                ..LrSchedule::default()
            },
            optimizer: LocalOptimizer::Adam,
            prox_mu: 0.0,
            pause_s: 0.0,
        }
    }
}

impl RoundSection {
    /// The schedule for a run of `planned` rounds (0 = until stopped): a cosine without its own
    /// `rounds` decays over the planned rounds, or not at all when none are planned.
    pub fn schedule(&self, planned: u64) -> LrSchedule {
        let mut s = self.schedule;
        if s.decay == Decay::Cosine && s.rounds == 0 {
            if planned == 0 {
                s.decay = Decay::Constant;
            } else {
                s.rounds = planned.max(s.warmup_rounds + 1);
            }
        }
        s
    }
}

impl AggregatorConfig {
    pub fn load(path: &Path) -> Result<Self, AggregatorError> {
        let text = std::fs::read_to_string(path).map_err(|e| AggregatorError::File {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        let mut cfg: Self = toml::from_str(&text).map_err(|e| AggregatorError::Config {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        // Relative paths are resolved against the file's folder, as in agent.toml.
        let base = path.parent().unwrap_or(Path::new(""));
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        fix(&mut cfg.model);
        fix(&mut cfg.state);
        if let Some(k) = cfg.signing_key.as_mut() {
            fix(k);
        }
        if let Some(m) = cfg.metrics.as_mut() {
            m.resolve_paths(base);
        }
        if let Some(t) = cfg.broker.as_mut().and_then(|b| b.tls.as_mut()) {
            fix(&mut t.ca);
            fix(&mut t.cert);
            fix(&mut t.key);
        }
        cfg.validate().map_err(|message| AggregatorError::Config {
            path: path.to_owned(),
            message,
        })?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<(), String> {
        Topics::new(&self.fleet)?;
        if let Some(m) = &self.metrics {
            m.validate("metrics").map_err(|e| e.to_string())?;
        }
        if !protocol::valid_level(&self.id) {
            return Err(format!("id {:?} is not a valid client id", self.id));
        }
        if let Some(d) = self.devices.iter().find(|d| !protocol::valid_level(d)) {
            return Err(format!("devices: {d:?} is not a valid device id"));
        }
        // A device listed twice would count twice towards the quorum and the DP sampling rate.
        let mut seen = BTreeSet::new();
        if let Some(d) = self.devices.iter().find(|d| !seen.insert(d.as_str())) {
            return Err(format!("devices: {d:?} is listed twice"));
        }
        if self.devices.is_empty() && self.broker.is_some() && !self.any_device {
            return Err(
                "devices = [] with an external broker would take updates under any device id and \
                 close each round on the first one: list the fleet's device ids, or set \
                 any_device = true to accept any id the broker's ACL lets through"
                    .into(),
            );
        }
        if self.any_device && !self.devices.is_empty() {
            return Err("any_device = true contradicts the list of devices: drop one".into());
        }
        if self.round.deadline_s.is_nan() || self.round.deadline_s <= 0.0 {
            return Err("round.deadline_s must be > 0".into());
        }
        if let Some(f) = self.round.quorum_fraction
            && !(f > 0.0 && f <= 1.0)
        {
            return Err("round.quorum_fraction must be in (0, 1]".into());
        }
        if self.round.quorum_fraction.is_some() && self.devices.is_empty() {
            return Err("round.quorum_fraction needs the list of devices".into());
        }
        if !(self.max_update_norm.is_finite() && self.max_update_norm > 0.0) {
            return Err("max_update_norm must be a positive number".into());
        }
        if self.max_samples == 0 || self.max_samples > u64::MAX / 1_000_000 {
            return Err(format!(
                "max_samples must be in 1..={} (the sum over a round must not overflow)",
                u64::MAX / 1_000_000
            ));
        }
        if self.round.learning_rate.is_nan() || self.round.learning_rate <= 0.0 {
            return Err("round.learning_rate must be > 0".into());
        }
        self.round
            .schedule(self.rounds)
            .validate()
            .map_err(|e| format!("round.{e}"))?;
        self.compression
            .validate()
            .map_err(|e| format!("compression: {e}"))?;
        if let Some(d) = &self.dp {
            d.validate()?;
            // The noise is calibrated to the sum's sensitivity C: a median or trimmed mean has
            // another sensitivity, and a second clipping bound would be misleading.
            if self.aggregation.rule != crate::federated::server::merge::Rule::FedAvg {
                return Err("dp needs aggregation.rule = \"fedavg\"".into());
            }
            if self.aggregation.clip_norm.is_some() {
                return Err("dp: use dp.clip_norm, not aggregation.clip_norm".into());
            }
        }
        if let Some(so) = &self.scale_out {
            so.validate(&self.id, &self.compression)?;
        }
        if let Some(sa) = &self.secure_aggregation {
            self.validate_secure(sa)?;
        }
        Ok(())
    }

    /// What secure aggregation needs and what it cannot be combined with; the error says why.
    fn validate_secure(&self, sa: &SecureSection) -> Result<(), String> {
        use crate::federated::server::merge::Rule;
        match self.aggregation.rule {
            Rule::FedAvg => {}
            Rule::Median => {
                return Err(
                    "secure_aggregation cannot run with aggregation.rule kind = \"median\": a \
                            median needs every single update, which secure aggregation hides from \
                            the aggregator (use \"fedavg\", and clip on the devices with [dp])"
                        .into(),
                );
            }
            Rule::TrimmedMean { .. } => {
                return Err(
                    "secure_aggregation cannot run with aggregation.rule kind = \
                            \"trimmed_mean\": trimming needs every single update, which secure \
                            aggregation hides from the aggregator (use \"fedavg\", and clip on the \
                            devices with [dp])"
                        .into(),
                );
            }
        }
        if self.aggregation.clip_norm.is_some() {
            return Err(
                "secure_aggregation: aggregation.clip_norm clips single updates, which the \
                        aggregator no longer sees; use dp.clip_norm (the devices clip)"
                    .into(),
            );
        }
        if self.scale_out.is_some() {
            return Err(
                "secure_aggregation cannot run with [scale_out]: one process holds the \
                        protocol's state"
                    .into(),
            );
        }
        let n = self.devices.len();
        if n < 2 {
            return Err(
                "secure_aggregation needs the list of devices (at least 2): the round \
                        starts with a message to each"
                    .into(),
            );
        }
        let t = sa.threshold_for(n);
        if t < 2 || t > n {
            return Err(format!(
                "secure_aggregation.threshold: {t} is not in 2..={n} (the listed devices)"
            ));
        }
        if !(sa.step_timeout_s.is_finite() && sa.step_timeout_s > 0.0) {
            return Err("secure_aggregation.step_timeout_s must be > 0".into());
        }
        if !(sa.value_clip.is_finite() && sa.value_clip > 0.0) {
            return Err("secure_aggregation.value_clip must be a positive number".into());
        }
        if let Some(f) = sa.support_fraction
            && !(f > 0.0 && f <= 1.0)
        {
            return Err(format!(
                "secure_aggregation.support_fraction: {f} is not in (0, 1]"
            ));
        }
        if self.quorum() < t {
            return Err(format!(
                "secure_aggregation: the round's quorum {} is below the threshold {t}: a round \
                 that closes with fewer devices cannot be unmasked",
                self.quorum()
            ));
        }
        Ok(())
    }

    /// Updates that close a round early.
    pub fn quorum(&self) -> usize {
        if let Some(q) = self.round.quorum {
            return q.max(1);
        }
        if let Some(f) = self.round.quorum_fraction {
            return ((f * self.devices.len() as f64).ceil() as usize).max(1);
        }
        self.devices.len().max(1)
    }
}

/// What this aggregator process does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Coordinator,
    Worker,
}

/// `[scale_out]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScaleOutSection {
    pub role: Role,
    /// Coordinator: its workers' ids (their certificate CNs).
    #[serde(default)]
    pub workers: Vec<String>,
    /// Worker: the coordinator's id.
    #[serde(default)]
    pub coordinator: Option<String>,
    /// Coordinator: how long it waits for the partial sums after asking.
    #[serde(default = "default_partial_timeout")]
    pub partial_timeout_s: f64,
    /// Worker: its shard (0-based) of `shards`. It then takes the devices that fall in that shard
    /// ([`shard_of`]: by rank in `devices`) through a plain subscription to every update, which the broker keeps in
    /// the worker's persistent session across its own restarts, so nothing sent meanwhile is lost.
    /// Absent (both): the shared subscription `$share/aggregators/…`, which needs no numbering but
    /// loses the updates sent between a broker restart and the workers' resubscription (Mosquitto
    /// does not restore shared subscriptions), and lets a device join the group (broker-config/).
    #[serde(default)]
    pub shard: Option<u32>,
    /// Worker: how many shards (workers) the fleet's devices are split over; with `shard`.
    #[serde(default)]
    pub shards: Option<u32>,
}

/// Most shards a fleet's devices are split over (each worker receives every update frame and keeps
/// its shard's: more than this many workers is not what sharding is for).
pub const MAX_SHARDS: u32 = 256;

/// The shard of `device` among `shards` (> 0). A device of the fleet's `devices` list goes by its
/// rank in that list sorted (rank modulo `shards`: the shards differ by one device at most, which a
/// hash would not promise for a handful of labs); any other id by the first 8 bytes of the SHA-256
/// of the id, big endian, modulo `shards`. Every process has the same list, so every worker
/// computes the same.
pub fn shard_of(device: &str, shards: u32, devices: &[String]) -> u32 {
    use sha2::{Digest, Sha256};
    let shards = u64::from(shards.max(1));
    // Called for every update frame: a count, no allocation (ids are distinct, checked at load;
    // were one listed twice, every worker would still count it the same way).
    let rank = if devices.iter().any(|d| d == device) {
        devices.iter().filter(|d| d.as_str() < device).count() as u64
    } else {
        let digest = Sha256::digest(device.as_bytes());
        let mut first = [0u8; 8];
        first.copy_from_slice(&digest[..8]);
        u64::from_be_bytes(first)
    };
    (rank % shards) as u32
}

fn default_partial_timeout() -> f64 {
    30.0
}

impl ScaleOutSection {
    /// A worker's `(shard, shards)`, when it takes a shard of the devices.
    pub fn sharding(&self) -> Option<(u32, u32)> {
        match (self.role, self.shard, self.shards) {
            (Role::Worker, Some(shard), Some(shards)) => Some((shard, shards)),
            _ => None,
        }
    }

    /// Whether this process takes `device`'s updates (`devices`: the fleet's list): a sharded
    /// worker only its shard's.
    pub fn takes(&self, device: &str, devices: &[String]) -> bool {
        self.sharding()
            .is_none_or(|(shard, shards)| shard_of(device, shards, devices) == shard)
    }

    /// Checks the section against the aggregator's id and the fleet's compression.
    pub fn validate(&self, id: &str, compression: &CompressionConfig) -> Result<(), String> {
        match (self.role, self.shard, self.shards) {
            (Role::Coordinator, None, None) | (Role::Worker, None, None) => {}
            (Role::Coordinator, _, _) => {
                return Err(
                    "scale_out.shard and scale_out.shards are a worker's settings, not the coordinator's"
                        .into(),
                );
            }
            (Role::Worker, Some(shard), Some(shards)) => {
                if !(1..=MAX_SHARDS).contains(&shards) || shard >= shards {
                    return Err(format!(
                        "scale_out.shard = {shard} of shards = {shards}: shards must be 1..={MAX_SHARDS} \
                         and shard one of 0..shards"
                    ));
                }
            }
            (Role::Worker, _, _) => {
                return Err(
                    "scale_out: a sharded worker needs both shard and shards (or neither, for the \
                     shared subscription)"
                        .into(),
                );
            }
        }
        match self.role {
            Role::Coordinator => {
                if self.workers.is_empty() {
                    return Err("scale_out.workers: a coordinator needs at least one worker".into());
                }
                let mut seen = BTreeSet::new();
                for w in &self.workers {
                    if !protocol::valid_level(w) || w == id || !seen.insert(w) {
                        return Err(format!(
                            "scale_out.workers: {w:?} is not a valid, distinct worker id"
                        ));
                    }
                }
            }
            Role::Worker => match &self.coordinator {
                Some(c) if protocol::valid_level(c) && c != id => {}
                other => {
                    return Err(format!(
                        "scale_out.coordinator: a worker needs the coordinator's id (got {other:?})"
                    ));
                }
            },
        }
        if !(self.partial_timeout_s.is_finite() && self.partial_timeout_s > 0.0) {
            return Err("scale_out.partial_timeout_s must be > 0".into());
        }
        // Any decoder: the head's size barely depends on the classes; 16 is the largest we ship.
        let bound = single_frame_bound(&decoder_layout(16), compression);
        if bound > CHUNK_BYTES {
            return Err(format!(
                "scale_out: an update under this [compression] may take {bound} bytes, more than \
                 one frame ({CHUNK_BYTES}); the shared subscription would split its frames between \
                 workers. Use top_k (e.g. 0.05) with quantize = \"int8\""
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> AggregatorConfig {
        let cfg: AggregatorConfig = toml::from_str(text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        cfg.validate().unwrap_or_else(|e| panic!("{e}\n{text}"));
        cfg
    }

    fn raw(text: &str) -> AggregatorConfig {
        toml::from_str(text).unwrap_or_else(|e| panic!("{e}\n{text}"))
    }

    const REQUIRED: &str = "fleet = \"f\"\nmodel = \"m.onnx\"\nstate = \"s\"\n";

    #[test]
    fn a_sharded_worker_needs_both_numbers_in_range_and_the_coordinator_none() {
        let compression = "[compression]\ntop_k = 0.05\nquantize = \"int8\"\n";
        let worker = |extra: &str| {
            format!(
                "id = \"aggregator-1\"\n{REQUIRED}{compression}[scale_out]\nrole = \"worker\"\n\
                 coordinator = \"aggregator\"\n{extra}"
            )
        };
        let so = parse(&worker("shard = 1\nshards = 3\n")).scale_out.unwrap();
        assert_eq!(so.sharding(), Some((1, 3)));
        assert_eq!(parse(&worker("")).scale_out.unwrap().sharding(), None);
        for (extra, says) in [
            ("shard = 1\n", "both"),
            ("shards = 2\n", "both"),
            ("shard = 2\nshards = 2\n", "shard one of 0..shards"),
            ("shard = 0\nshards = 0\n", "shards must be"),
            ("shard = 0\nshards = 100000\n", "shards must be"),
        ] {
            let err = raw(&worker(extra)).validate().unwrap_err();
            assert!(err.contains(says), "{extra}: {err}");
        }
        let coordinator = format!(
            "{REQUIRED}{compression}[scale_out]\nrole = \"coordinator\"\nworkers = [\"aggregator-1\"]\n\
             shard = 0\nshards = 1\n"
        );
        assert!(
            raw(&coordinator)
                .validate()
                .unwrap_err()
                .contains("worker's settings")
        );
    }

    #[test]
    fn a_device_listed_twice_is_refused() {
        let err = raw(&format!(
            "{REQUIRED}devices = [\"lab-1\", \"lab-2\", \"lab-1\"]\n"
        ))
        .validate()
        .unwrap_err();
        assert!(err.contains("\"lab-1\" is listed twice"), "{err}");
    }

    #[test]
    fn shards_are_stable_and_split_devices_evenly() {
        // A listed device goes by its rank in the sorted list: 7 labs over 3 shards are 3 + 2 + 2,
        // whatever order the list is written in.
        let labs: Vec<String> = [
            "lab-g", "lab-a", "lab-c", "lab-b", "lab-e", "lab-d", "lab-f",
        ]
        .map(String::from)
        .to_vec();
        let shards: Vec<u32> = [
            "lab-a", "lab-b", "lab-c", "lab-d", "lab-e", "lab-f", "lab-g",
        ]
        .iter()
        .map(|d| shard_of(d, 3, &labs))
        .collect();
        assert_eq!(shards, [0, 1, 2, 0, 1, 2, 0]);
        // Any other id by its hash, which is part of the deployment: workers of different versions
        // must agree on it. (Python: int.from_bytes(hashlib.sha256(b"lab-1").digest()[:8], "big")
        // % 1000 == 770.)
        assert_eq!(
            [
                shard_of("lab-1", 1000, &[]),
                shard_of("lab-2", 1000, &labs),
                shard_of("lab-3", 1000, &[])
            ],
            [770, 244, 384]
        );
        assert_eq!(shard_of("anything", 1, &[]), 0);
        let mut counts = [0u32; 4];
        for i in 0..4000 {
            counts[shard_of(&format!("lab-{i}"), 4, &[]) as usize] += 1;
        }
        assert!(
            counts.iter().all(|&c| (900..1100).contains(&c)),
            "{counts:?}"
        );
        let so = |shard| ScaleOutSection {
            role: Role::Worker,
            workers: vec![],
            coordinator: Some("aggregator".into()),
            partial_timeout_s: 30.0,
            shard: Some(shard),
            shards: Some(3),
        };
        for d in labs
            .iter()
            .cloned()
            .chain((0..50).map(|i| format!("stranger-{i}")))
        {
            let takers = (0..3).filter(|&s| so(s).takes(&d, &labs)).count();
            assert_eq!(takers, 1, "{d}");
        }
    }

    #[test]
    fn secure_aggregation_refuses_robust_rules_and_needs_the_devices() {
        let devices = "devices = [\"a\", \"b\", \"c\"]\n";
        let ok = parse(&format!("{REQUIRED}{devices}[secure_aggregation]\n"));
        let sa = ok.secure_aggregation.as_ref().unwrap();
        assert_eq!(sa.threshold_for(3), 2);
        assert_eq!(sa.step_timeout_s, 30.0);
        let refused = |extra: &str| {
            let cfg: AggregatorConfig = toml::from_str(&format!("{REQUIRED}{extra}")).unwrap();
            cfg.validate().unwrap_err()
        };
        let e = refused(&format!(
            "{devices}[secure_aggregation]\n[aggregation.rule]\nkind = \"median\"\n"
        ));
        assert!(e.contains("median") && e.contains("hides"), "{e}");
        let e = refused(&format!(
            "{devices}[secure_aggregation]\n[aggregation.rule]\nkind = \"trimmed_mean\"\ntrim = 0.2\n"
        ));
        assert!(e.contains("trimmed_mean"), "{e}");
        let e = refused("[secure_aggregation]\n");
        assert!(e.contains("list of devices"), "{e}");
        let e = refused(&format!("{devices}[secure_aggregation]\nthreshold = 4\n"));
        assert!(e.contains("threshold"), "{e}");
        let e = refused(&format!(
            "{devices}[round]\nquorum = 1\n[secure_aggregation]\nthreshold = 3\n"
        ));
        assert!(e.contains("quorum"), "{e}");
    }

    #[test]
    fn only_the_required_fields_give_the_documented_defaults() {
        let cfg = parse(REQUIRED);
        assert_eq!(cfg.id, "aggregator");
        assert_eq!((cfg.rounds, cfg.devices.len()), (0, 0));
        assert_eq!((cfg.max_update_norm, cfg.max_samples), (10.0, 10_000));
        assert!(cfg.dp.is_none() && cfg.scale_out.is_none() && cfg.signing_key.is_none());
        let r = &cfg.round;
        assert_eq!(r, &RoundSection::default());
        assert_eq!(
            (
                r.deadline_s,
                r.local_epochs,
                r.steps_per_epoch,
                r.learning_rate
            ),
            (300.0, 1, 0, 0.001)
        );
        assert_eq!(r.optimizer, LocalOptimizer::Adam);
        // Until stopped: one warm-up round, then the base rate.
        let s = r.schedule(cfg.rounds);
        assert_eq!(s.decay, Decay::Constant);
        assert_eq!(s.rate(0.001, 1), 0.0005);
        assert_eq!(s.rate(0.001, 50), 0.001);
    }

    #[test]
    fn a_cosine_without_its_own_rounds_decays_over_the_planned_rounds() {
        let cfg = parse(&format!("{REQUIRED}rounds = 10\n"));
        let s = cfg.round.schedule(cfg.rounds);
        assert_eq!((s.decay, s.rounds, s.warmup_rounds), (Decay::Cosine, 10, 1));
        assert!((s.factor(10) - 0.05).abs() < 1e-6);
        assert!(s.factor(2) > s.factor(6) && s.factor(6) > s.factor(10));
        // One planned round is still a valid schedule (the warm-up fits).
        let one = parse(&format!("{REQUIRED}rounds = 1\n"));
        one.round.schedule(1).validate().unwrap();
        // An explicit schedule wins.
        let own = parse(&format!(
            "{REQUIRED}rounds = 10\n[round.schedule]\ndecay = \"step\"\n"
        ));
        assert_eq!(own.round.schedule(10).decay, Decay::Step);
    }

    #[test]
    fn every_field_of_round_is_optional_and_unknown_ones_are_refused() {
        let cfg = parse(&format!("{REQUIRED}[round]\nquorum = 2\n"));
        assert_eq!(cfg.round.quorum, Some(2));
        assert_eq!(cfg.round.learning_rate, 0.001);
        let cfg = parse(&format!(
            "{REQUIRED}[round]\noptimizer = \"momentum\"\nlearning_rate = 0.01\n"
        ));
        assert_eq!(cfg.round.optimizer, LocalOptimizer::Momentum);
        let err = toml::from_str::<AggregatorConfig>(&format!("{REQUIRED}[round]\nquorom = 2\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("quorom"), "{err}");
    }

    /// Issue 17: `devices = []` took updates under any id (and closed rounds on the first one)
    /// with nothing but a start-up warning, on a broker any device can publish to.
    #[test]
    fn an_empty_device_list_needs_the_embedded_broker_or_an_explicit_any_device() {
        let broker = "[broker]\nhost = \"127.0.0.1\"\nport = 1883\n";
        assert!(raw(REQUIRED).validate().is_ok(), "embedded broker");
        let e = raw(&format!("{REQUIRED}{broker}")).validate().unwrap_err();
        assert!(
            e.contains("devices = []") && e.contains("any_device"),
            "{e}"
        );
        assert!(
            raw(&format!("{REQUIRED}any_device = true\n{broker}"))
                .validate()
                .is_ok()
        );
        assert!(
            raw(&format!("{REQUIRED}devices = [\"a\"]\n{broker}"))
                .validate()
                .is_ok()
        );
        let e = raw(&format!("{REQUIRED}devices = [\"a\"]\nany_device = true\n"))
            .validate()
            .unwrap_err();
        assert!(e.contains("contradicts"), "{e}");
    }
}
