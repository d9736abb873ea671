//! Merging the labs' decoder updates into the next global decoder.
//!
//! Map:
//! - [`AggregationConfig`]: the merge [`Rule`], optional L2 clipping of each update, and the server
//!   optimiser ([`ServerOpt`]).
//! - [`Accumulator`]: takes one update per device ([`Accumulator::add`]) and produces the merged
//!   update ([`Accumulator::finish`]). [`PartialSum`] ([`Accumulator::partial`] /
//!   [`Accumulator::merge`]) lets several aggregator processes each take a share of the devices and
//!   combine their results into what one process would have computed.
//! - [`ServerOptimizer`]: applies the merged update to the global decoder: plain FedAvg, FedAvgM
//!   (server momentum) or FedAdam; serialisable so that its state survives an aggregator restart.
//!
//! Why the rules differ in memory: FedAvg is a weighted mean, so it streams: one `f64` sum vector and
//! a sample count, whatever the number of labs. Trimmed mean and median are order statistics per
//! coordinate and must keep every update (as `f32`, one row per device) until [`Accumulator::finish`];
//! they buy robustness: one lab sending garbage (a diverged fine-tune, a bit flip, a poisoned update)
//! moves FedAvg arbitrarily far but a median not at all. Clipping bounds any one lab's influence on
//! FedAvg as well.

use std::collections::HashSet;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

/// How the updates of one round are merged, coordinate by coordinate.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Rule {
    /// Mean weighted by each device's number of training samples (McMahan et al. 2017). Streams.
    #[default]
    #[serde(rename = "fedavg")]
    FedAvg,
    /// Unweighted coordinate-wise mean after dropping the `floor(trim · n)` smallest and largest of the
    /// `n` values (Yin et al. 2018). `trim` in [0, 0.5). Keeps all updates in memory.
    TrimmedMean {
        /// Fraction dropped at each end.
        trim: f32,
    },
    /// Unweighted coordinate-wise median (the mean of the two middle values for an even count).
    /// Keeps all updates in memory.
    Median,
}

/// The server optimiser that turns the merged update into the next global decoder (Reddi et al.
/// 2021, "Adaptive Federated Optimization").
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum ServerOpt {
    /// `global += update` (plain FedAvg, server learning rate 1).
    #[default]
    None,
    /// FedAvgM (Hsu et al. 2019): `v = beta · v + update; global += lr · v`.
    Momentum {
        /// Server learning rate, > 0.
        lr: f32,
        /// Momentum, in [0, 1).
        beta: f32,
    },
    /// FedAdam: Adam on the pseudo-gradient `g = −update`, with Adam's bias correction:
    /// `m = β1 m + (1 − β1) g; v = β2 v + (1 − β2) g²;
    /// global −= lr · (m / (1 − β1^t)) / (sqrt(v / (1 − β2^t)) + eps)`.
    Adam {
        /// Server learning rate, > 0.
        lr: f32,
        /// First-moment decay, in [0, 1).
        beta1: f32,
        /// Second-moment decay, in [0, 1).
        beta2: f32,
        /// Added to the root of the second moment, > 0 (Reddi et al.'s τ; they suggest 1e-3).
        eps: f32,
    },
}

/// Aggregation settings. The default is plain FedAvg: weighted mean, no clipping, server step 1.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(default, deny_unknown_fields)]
pub struct AggregationConfig {
    /// How updates are merged.
    pub rule: Rule,
    /// Scale each update down to this L2 norm when it is longer (before merging); > 0.
    pub clip_norm: Option<f32>,
    /// How the merged update is applied to the global decoder.
    pub server: ServerOpt,
}

impl AggregationConfig {
    /// Checks every number's range; the error names the field.
    pub fn validate(&self) -> Result<(), AggregateError> {
        if let Rule::TrimmedMean { trim } = self.rule
            && !(trim.is_finite() && (0.0..0.5).contains(&trim))
        {
            return Err(config_err(
                "rule.trim",
                format!("{trim} is not in [0, 0.5)"),
            ));
        }
        if let Some(c) = self.clip_norm
            && !(c.is_finite() && c > 0.0)
        {
            return Err(config_err(
                "clip_norm",
                format!("{c} is not a positive number"),
            ));
        }
        self.server.validate()
    }
}

impl ServerOpt {
    /// Checks the learning rate, decays and epsilon; the error names the field.
    pub fn validate(&self) -> Result<(), AggregateError> {
        let positive = |field: &'static str, v: f32| {
            if v.is_finite() && v > 0.0 {
                Ok(())
            } else {
                Err(config_err(field, format!("{v} is not a positive number")))
            }
        };
        let decay = |field: &'static str, v: f32| {
            if v.is_finite() && (0.0..1.0).contains(&v) {
                Ok(())
            } else {
                Err(config_err(field, format!("{v} is not in [0, 1)")))
            }
        };
        match *self {
            ServerOpt::None => Ok(()),
            ServerOpt::Momentum { lr, beta } => {
                positive("server.lr", lr)?;
                decay("server.beta", beta)
            }
            ServerOpt::Adam {
                lr,
                beta1,
                beta2,
                eps,
            } => {
                positive("server.lr", lr)?;
                decay("server.beta1", beta1)?;
                decay("server.beta2", beta2)?;
                positive("server.eps", eps)
            }
        }
    }
}

/// Errors merging updates or applying them.
#[derive(Debug, thiserror::Error)]
pub enum AggregateError {
    #[error("aggregation config: {field}: {problem}")]
    Config {
        field: &'static str,
        problem: String,
    },
    #[error("{what} has {got} values, expected {expected}")]
    Length {
        what: String,
        expected: usize,
        got: usize,
    },
    #[error("update of {device}: value {index} is {value}, not a finite number")]
    NonFinite {
        device: String,
        index: usize,
        value: f32,
    },
    #[error("update of {device} claims 0 training samples")]
    ZeroSamples { device: String },
    #[error("{device} already sent an update this round")]
    Duplicate { device: String },
    #[error("partial sum does not fit this accumulator: {0}")]
    Incompatible(String),
    #[error("invalid partial sum: {0}")]
    InvalidPartial(String),
    #[error("total sample count overflows 64 bits")]
    SampleOverflow,
    #[error("no update to aggregate")]
    Empty,
    #[error("server optimizer: {0}")]
    ServerState(String),
}

fn config_err(field: &'static str, problem: String) -> AggregateError {
    AggregateError::Config { field, problem }
}

/// What [`Accumulator::add`] did with an update.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AddOutcome {
    /// L2 norm of the update as received.
    pub norm: f64,
    /// Whether it was scaled down to `clip_norm`.
    pub clipped: bool,
}

/// The merge state of one round.
#[derive(Debug, Clone, PartialEq)]
enum State {
    /// FedAvg: `Σ samples · update` in `f64` (exact products, so only the additions round).
    Sum(Vec<f64>),
    /// Robust rules: the (clipped) updates, one row of `len` values per device, in `devices` order.
    Kept(Vec<f32>),
}

/// Collects one round's updates, one per device, and merges them by the configured [`Rule`].
///
/// For FedAvg the memory is one `f64` vector plus counters, independent of the number of devices;
/// trimmed mean and median keep every update as `f32` ([`Accumulator::retained_updates`]).
#[derive(Debug, Clone)]
pub struct Accumulator {
    len: usize,
    rule: Rule,
    clip_norm: Option<f32>,
    devices: Vec<String>,
    seen: HashSet<String>,
    samples: u64,
    state: State,
}

impl Accumulator {
    /// An empty accumulator for updates of `len` values (checks `cfg`).
    pub fn new(len: usize, cfg: &AggregationConfig) -> Result<Self, AggregateError> {
        cfg.validate()?;
        let state = match cfg.rule {
            Rule::FedAvg => State::Sum(vec![0.0; len]),
            _ => State::Kept(Vec::new()),
        };
        Ok(Self {
            len,
            rule: cfg.rule.clone(),
            clip_norm: cfg.clip_norm,
            devices: Vec::new(),
            seen: HashSet::new(),
            samples: 0,
            state,
        })
    }

    /// Adds `device`'s update, trained on `samples` samples (the FedAvg weight). Rejects, leaving the
    /// accumulator unchanged: a wrong length, a NaN/infinite value, zero samples, and a second update
    /// from the same device ([`AggregateError::Duplicate`], so the caller can count replays). The
    /// update is clipped to `clip_norm` first.
    pub fn add(
        &mut self,
        device: &str,
        update: &[f32],
        samples: u64,
    ) -> Result<AddOutcome, AggregateError> {
        if update.len() != self.len {
            return Err(AggregateError::Length {
                what: format!("update of {device}"),
                expected: self.len,
                got: update.len(),
            });
        }
        if samples == 0 {
            return Err(AggregateError::ZeroSamples {
                device: device.to_owned(),
            });
        }
        if self.seen.contains(device) {
            return Err(AggregateError::Duplicate {
                device: device.to_owned(),
            });
        }
        if let Some(i) = update.iter().position(|v| !v.is_finite()) {
            return Err(AggregateError::NonFinite {
                device: device.to_owned(),
                index: i,
                value: update[i],
            });
        }
        let total = self
            .samples
            .checked_add(samples)
            .ok_or(AggregateError::SampleOverflow)?;
        let norm = l2_norm(update);
        let (factor, clipped) = match self.clip_norm {
            Some(c) if norm > f64::from(c) => (f64::from(c) / norm, true),
            _ => (1.0, false),
        };
        match &mut self.state {
            State::Sum(sum) => {
                let w = samples as f64;
                if clipped {
                    for (s, &u) in sum.iter_mut().zip(update) {
                        *s += w * (f64::from(u) * factor);
                    }
                } else {
                    for (s, &u) in sum.iter_mut().zip(update) {
                        *s += w * f64::from(u);
                    }
                }
            }
            State::Kept(rows) if clipped => {
                rows.extend(update.iter().map(|&u| (f64::from(u) * factor) as f32));
            }
            State::Kept(rows) => rows.extend_from_slice(update),
        }
        self.samples = total;
        self.devices.push(device.to_owned());
        self.seen.insert(device.to_owned());
        Ok(AddOutcome { norm, clipped })
    }

    /// Number of values per update.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no update has been added (or merged) yet.
    pub fn is_empty(&self) -> bool {
        self.devices.is_empty()
    }

    /// Number of updates added or merged.
    pub fn count(&self) -> usize {
        self.devices.len()
    }

    /// The devices whose updates are in, in the order they were added or merged.
    pub fn devices(&self) -> &[String] {
        &self.devices
    }

    /// Total training samples of the updates in.
    pub fn total_samples(&self) -> u64 {
        self.samples
    }

    /// Number of whole updates held in memory: 0 for FedAvg (it streams), [`Self::count`] for
    /// trimmed mean and median.
    pub fn retained_updates(&self) -> usize {
        match &self.state {
            State::Sum(_) => 0,
            State::Kept(rows) => rows.len().checked_div(self.len).unwrap_or(self.count()),
        }
    }

    /// This accumulator's contribution, to be [`Accumulator::merge`]d into another one (e.g. sent from
    /// one aggregator process to the one that finishes the round).
    pub fn partial(&self) -> PartialSum {
        PartialSum {
            len: self.len as u64,
            rule: self.rule.clone(),
            clip_norm: self.clip_norm,
            devices: self.devices.clone(),
            samples: self.samples,
            body: match &self.state {
                State::Sum(s) => PartialBody::Sum { sum: s.clone() },
                State::Kept(r) => PartialBody::Updates { rows: r.clone() },
            },
        }
    }

    /// Adds another process's [`PartialSum`]. It must come from an accumulator with the same length,
    /// rule and clipping, and share no device with this one ([`AggregateError::Duplicate`]). The
    /// partial is checked in full before anything changes.
    pub fn merge(&mut self, other: PartialSum) -> Result<(), AggregateError> {
        if other.len != self.len as u64 {
            return Err(AggregateError::Incompatible(format!(
                "updates of {} values, this round has {}",
                other.len, self.len
            )));
        }
        if other.rule != self.rule || other.clip_norm != self.clip_norm {
            return Err(AggregateError::Incompatible(format!(
                "rule {:?} with clip_norm {:?}, this round uses {:?} with {:?}",
                other.rule, other.clip_norm, self.rule, self.clip_norm
            )));
        }
        other.check()?;
        if let Some(d) = other.devices.iter().find(|d| self.seen.contains(*d)) {
            return Err(AggregateError::Duplicate { device: d.clone() });
        }
        let total = self
            .samples
            .checked_add(other.samples)
            .ok_or(AggregateError::SampleOverflow)?;
        match (&mut self.state, other.body) {
            (State::Sum(sum), PartialBody::Sum { sum: theirs }) => {
                sum.iter_mut().zip(theirs).for_each(|(a, b)| *a += b);
            }
            (State::Kept(rows), PartialBody::Updates { rows: theirs }) => rows.extend(theirs),
            _ => {
                return Err(AggregateError::Incompatible(
                    "its body does not match its rule".into(),
                ));
            }
        }
        self.samples = total;
        self.seen.extend(other.devices.iter().cloned());
        self.devices.extend(other.devices);
        Ok(())
    }

    /// The merged update (an error when nothing was added).
    pub fn finish(&self) -> Result<Vec<f32>, AggregateError> {
        let n = self.count();
        if n == 0 {
            return Err(AggregateError::Empty);
        }
        match (&self.state, &self.rule) {
            (State::Sum(sum), _) => {
                let w = self.samples as f64;
                Ok(sum.iter().map(|s| (s / w) as f32).collect())
            }
            (State::Kept(rows), Rule::TrimmedMean { trim }) => {
                let drop = trimmed_count(n, *trim);
                Ok(self.per_coordinate(rows, |col| {
                    col.sort_unstable_by(f32::total_cmp);
                    let kept = &col[drop..n - drop];
                    kept.iter().map(|&v| f64::from(v)).sum::<f64>() / kept.len() as f64
                }))
            }
            (State::Kept(rows), _) => Ok(self.per_coordinate(rows, |col| {
                let mid = n / 2;
                let (below, m, _) = col.select_nth_unstable_by(mid, f32::total_cmp);
                let m = f64::from(*m);
                if n % 2 == 1 {
                    m
                } else {
                    // The other middle value is the largest of the lower half.
                    let lower = below.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    (f64::from(lower) + m) / 2.0
                }
            })),
        }
    }

    /// Applies `reduce` to each coordinate's column of kept values, in parallel over blocks of
    /// coordinates (each block gathers its columns into one scratch buffer).
    fn per_coordinate(&self, rows: &[f32], reduce: impl Fn(&mut [f32]) -> f64 + Sync) -> Vec<f32> {
        const BLOCK: usize = 4096;
        let (n, len) = (self.count(), self.len);
        let mut out = vec![0.0f32; len];
        out.par_chunks_mut(BLOCK)
            .enumerate()
            .for_each(|(b, chunk)| {
                let mut col = vec![0.0f32; n];
                for (k, o) in chunk.iter_mut().enumerate() {
                    let j = b * BLOCK + k;
                    for (i, c) in col.iter_mut().enumerate() {
                        *c = rows[i * len + j];
                    }
                    *o = reduce(&mut col) as f32;
                }
            });
        out
    }
}

/// How many values trimmed mean drops at each end of `n`: `floor(trim · n)` (with a hair of slack for
/// `f32` fractions like 0.1 that are stored a little off), leaving at least one value.
fn trimmed_count(n: usize, trim: f32) -> usize {
    let d = (f64::from(trim) * n as f64 + 1e-6).floor() as usize;
    d.min((n - 1) / 2)
}

fn l2_norm(v: &[f32]) -> f64 {
    v.iter()
        .map(|&x| f64::from(x) * f64::from(x))
        .sum::<f64>()
        .sqrt()
}

/// One aggregator process's share of a round, to combine with [`Accumulator::merge`].
///
/// Serialisable (CBOR, JSON); the big vectors are byte strings of little-endian numbers (8 bytes per
/// value for FedAvg's `f64` sums, 4 per value for kept `f32` updates), not arrays of tagged floats.
/// [`Accumulator::merge`] checks a received partial in full.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct PartialSum {
    len: u64,
    rule: Rule,
    clip_norm: Option<f32>,
    devices: Vec<String>,
    samples: u64,
    body: PartialBody,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "snake_case")]
enum PartialBody {
    Sum {
        #[serde(with = "le_f64")]
        sum: Vec<f64>,
    },
    Updates {
        #[serde(with = "le_f32")]
        rows: Vec<f32>,
    },
}

impl PartialSum {
    /// The devices whose updates it holds.
    pub fn devices(&self) -> &[String] {
        &self.devices
    }

    /// Total training samples of those updates.
    pub fn total_samples(&self) -> u64 {
        self.samples
    }

    /// Internal consistency of a partial that came over the wire.
    fn check(&self) -> Result<(), AggregateError> {
        let bad = |m: String| Err(AggregateError::InvalidPartial(m));
        let mut names = HashSet::new();
        if let Some(d) = self.devices.iter().find(|d| !names.insert(d.as_str())) {
            return bad(format!("device {d} appears twice"));
        }
        let n = self.devices.len() as u64;
        if (n == 0) != (self.samples == 0) || self.samples < n {
            return bad(format!("{} samples for {n} devices", self.samples));
        }
        match &self.body {
            PartialBody::Sum { sum } => {
                if sum.len() as u64 != self.len {
                    return bad(format!(
                        "sum of {} values for updates of {}",
                        sum.len(),
                        self.len
                    ));
                }
                if let Some(i) = sum.iter().position(|v| !v.is_finite()) {
                    return bad(format!("sum value {i} is {}", sum[i]));
                }
            }
            PartialBody::Updates { rows } => {
                if Some(rows.len() as u64) != n.checked_mul(self.len) {
                    return bad(format!(
                        "{} kept values for {n} devices × {}",
                        rows.len(),
                        self.len
                    ));
                }
                if let Some(i) = rows.iter().position(|v| !v.is_finite()) {
                    return bad(format!("kept value {i} is {}", rows[i]));
                }
            }
        }
        Ok(())
    }
}

/// Serde for numeric vectors as one byte string of little-endian values (compact in CBOR: 4 or 8
/// bytes a value instead of a tagged float each, and the same bytes on every platform).
macro_rules! le_bytes_serde {
    ($module:ident, $t:ty, $size:expr) => {
        mod $module {
            use serde::de::Error as _;
            use serde::{Deserializer, Serializer};

            pub fn serialize<S: Serializer>(v: &[$t], s: S) -> Result<S::Ok, S::Error> {
                let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                serde_bytes::serialize(&bytes, s)
            }

            pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<$t>, D::Error> {
                let bytes: serde_bytes::ByteBuf = serde_bytes::deserialize(d)?;
                if bytes.len() % $size != 0 {
                    return Err(D::Error::custom(format!(
                        "{} bytes is not a whole number of {}-byte values",
                        bytes.len(),
                        $size
                    )));
                }
                Ok(bytes
                    .chunks_exact($size)
                    .map(|c| <$t>::from_le_bytes(c.try_into().expect("chunk size")))
                    .collect())
            }
        }
    };
}
le_bytes_serde!(le_f64, f64, 8);
le_bytes_serde!(le_f32, f32, 4);

/// The server side of the optimisation: applies each round's merged update to the global decoder.
/// Holds FedAvgM's velocity or FedAdam's moments; serialise it (CBOR) with the global model so that a
/// restarted aggregator continues with the same state.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct ServerOptimizer {
    opt: ServerOpt,
    len: u64,
    /// Rounds applied so far (Adam's `t`).
    steps: u64,
    /// FedAvgM's velocity or Adam's first moment (empty for plain FedAvg).
    #[serde(with = "le_f32")]
    m: Vec<f32>,
    /// Adam's second moment (empty otherwise).
    #[serde(with = "le_f32")]
    v: Vec<f32>,
}

impl ServerOptimizer {
    /// Fresh state (zero velocity/moments) for a decoder of `len` values.
    pub fn new(len: usize, opt: &ServerOpt) -> Result<Self, AggregateError> {
        opt.validate()?;
        let (m, v) = match opt {
            ServerOpt::None => (0, 0),
            ServerOpt::Momentum { .. } => (len, 0),
            ServerOpt::Adam { .. } => (len, len),
        };
        Ok(Self {
            opt: opt.clone(),
            len: len as u64,
            steps: 0,
            m: vec![0.0; m],
            v: vec![0.0; v],
        })
    }

    /// The optimiser this state belongs to.
    pub fn opt(&self) -> &ServerOpt {
        &self.opt
    }

    /// Rounds applied so far.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// Moves `global` by the merged update. Nothing changes on error: wrong lengths, a non-finite
    /// update, a state that does not fit (e.g. deserialised from another model), or a step that would
    /// overflow the global decoder.
    pub fn apply(&mut self, global: &mut [f32], update: &[f32]) -> Result<(), AggregateError> {
        let len = self.len as usize;
        for (what, got) in [("global decoder", global.len()), ("update", update.len())] {
            if got != len {
                return Err(AggregateError::Length {
                    what: what.into(),
                    expected: len,
                    got,
                });
            }
        }
        if let Some(i) = update.iter().position(|v| !v.is_finite()) {
            return Err(AggregateError::NonFinite {
                device: "merged update".into(),
                index: i,
                value: update[i],
            });
        }
        let expected = match self.opt {
            ServerOpt::None => (0, 0),
            ServerOpt::Momentum { .. } => (len, 0),
            ServerOpt::Adam { .. } => (len, len),
        };
        if (self.m.len(), self.v.len()) != expected {
            return Err(AggregateError::ServerState(format!(
                "buffers of {} and {} values do not fit {:?} on {len} values",
                self.m.len(),
                self.v.len(),
                self.opt
            )));
        }
        self.opt.validate()?;
        let t = self.steps + 1;
        // Compute into new buffers, commit only when all is finite.
        let mut new_global = global.to_vec();
        let mut new_m = self.m.clone();
        let mut new_v = self.v.clone();
        match self.opt {
            ServerOpt::None => {
                for (x, &d) in new_global.iter_mut().zip(update) {
                    *x = (f64::from(*x) + f64::from(d)) as f32;
                }
            }
            ServerOpt::Momentum { lr, beta } => {
                let (lr, beta) = (f64::from(lr), f64::from(beta));
                for ((x, m), &d) in new_global.iter_mut().zip(&mut new_m).zip(update) {
                    let vel = beta * f64::from(*m) + f64::from(d);
                    *m = vel as f32;
                    *x = (f64::from(*x) + lr * vel) as f32;
                }
            }
            ServerOpt::Adam {
                lr,
                beta1,
                beta2,
                eps,
            } => {
                let (lr, b1, b2, eps) = (
                    f64::from(lr),
                    f64::from(beta1),
                    f64::from(beta2),
                    f64::from(eps),
                );
                let exp = i32::try_from(t).unwrap_or(i32::MAX);
                let (c1, c2) = (1.0 - b1.powi(exp), 1.0 - b2.powi(exp));
                for (((x, m), v), &d) in new_global
                    .iter_mut()
                    .zip(&mut new_m)
                    .zip(&mut new_v)
                    .zip(update)
                {
                    let g = -f64::from(d);
                    let m1 = b1 * f64::from(*m) + (1.0 - b1) * g;
                    let v1 = b2 * f64::from(*v) + (1.0 - b2) * g * g;
                    *m = m1 as f32;
                    *v = v1 as f32;
                    *x = (f64::from(*x) - lr * (m1 / c1) / ((v1 / c2).sqrt() + eps)) as f32;
                }
            }
        }
        let finite = |b: &[f32]| b.iter().all(|v| v.is_finite());
        if !(finite(&new_global) && finite(&new_m) && finite(&new_v)) {
            return Err(AggregateError::ServerState(
                "the step overflows f32; global decoder left unchanged".into(),
            ));
        }
        global.copy_from_slice(&new_global);
        self.m = new_m;
        self.v = new_v;
        self.steps = t;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;
    use rand_distr::{Distribution, Normal};

    fn acc(len: usize, rule: Rule, clip: Option<f32>) -> Accumulator {
        Accumulator::new(
            len,
            &AggregationConfig {
                rule,
                clip_norm: clip,
                server: ServerOpt::None,
            },
        )
        .unwrap()
    }

    fn close(a: &[f32], b: &[f32], tol: f32) {
        assert_eq!(a.len(), b.len());
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!((x - y).abs() <= tol * (1.0 + y.abs()), "[{i}] {x} vs {y}");
        }
    }

    fn gaussian(len: usize, mean: f32, sigma: f32, seed: u64) -> Vec<f32> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let n = Normal::new(mean, sigma).unwrap();
        (0..len).map(|_| n.sample(&mut rng)).collect()
    }

    #[test]
    fn fedavg_is_the_sample_weighted_mean() {
        let mut a = acc(2, Rule::FedAvg, None);
        a.add("lab-a", &[1.0, 2.0], 1).unwrap();
        a.add("lab-b", &[3.0, 6.0], 3).unwrap();
        // (1·1 + 3·3) / 4 = 2.5, (1·2 + 3·6) / 4 = 5.
        assert_eq!(a.finish().unwrap(), vec![2.5, 5.0]);
        assert_eq!(a.total_samples(), 4);
        assert_eq!(a.devices(), ["lab-a", "lab-b"]);
    }

    #[test]
    fn trimmed_mean_drops_the_extremes_unweighted() {
        let mut a = acc(2, Rule::TrimmedMean { trim: 0.2 }, None);
        let cols = [
            [1.0, -50.0],
            [100.0, 0.0],
            [3.0, 1.0],
            [2.0, 3.0],
            [4.0, 2.0],
        ];
        for (i, c) in cols.iter().enumerate() {
            // Weights are ignored by the robust rules.
            a.add(&format!("d{i}"), c, 1 + 100 * i as u64).unwrap();
        }
        // floor(0.2 · 5) = 1 dropped each end: mean(2, 3, 4) = 3 and mean(0, 1, 2) = 1.
        assert_eq!(a.finish().unwrap(), vec![3.0, 1.0]);
        assert_eq!(trimmed_count(10, 0.1), 1);
        assert_eq!(trimmed_count(2, 0.49), 0);
        assert_eq!(trimmed_count(3, 0.49), 1);
        // trim 0 is the plain unweighted mean.
        let mut a = acc(1, Rule::TrimmedMean { trim: 0.0 }, None);
        a.add("x", &[1.0], 5).unwrap();
        a.add("y", &[2.0], 1).unwrap();
        assert_eq!(a.finish().unwrap(), vec![1.5]);
    }

    #[test]
    fn median_of_odd_and_even_counts() {
        let mut a = acc(2, Rule::Median, None);
        for (i, v) in [[5.0, -1.0], [1.0, 7.0], [3.0, 2.0]].iter().enumerate() {
            a.add(&format!("d{i}"), v, 1).unwrap();
        }
        assert_eq!(a.finish().unwrap(), vec![3.0, 2.0]);
        a.add("d3", &[2.0, 4.0], 1).unwrap();
        // [1, 2, 3, 5] → 2.5; [-1, 2, 4, 7] → 3.
        assert_eq!(a.finish().unwrap(), vec![2.5, 3.0]);
    }

    #[test]
    fn clipping_scales_long_updates_to_the_norm() {
        for rule in [Rule::FedAvg, Rule::Median] {
            let mut a = acc(2, rule, Some(1.0));
            let out = a.add("long", &[3.0, 4.0], 1).unwrap();
            assert_eq!(
                out,
                AddOutcome {
                    norm: 5.0,
                    clipped: true
                }
            );
            assert_eq!(a.finish().unwrap(), vec![0.6, 0.8]);
            let out = a.add("short", &[0.3, -0.4], 1).unwrap();
            assert!(!out.clipped);
            assert!((out.norm - 0.5).abs() < 1e-7);
            // Mean (FedAvg, equal weights) and median of two agree: (0.6 + 0.3)/2, (0.8 − 0.4)/2.
            close(&a.finish().unwrap(), &[0.45, 0.2], 1e-6);
        }
    }

    #[test]
    fn one_poisoned_update_ruins_fedavg_but_not_median_or_trimmed_mean() {
        let len = 100;
        let mut results = Vec::new();
        for rule in [Rule::FedAvg, Rule::Median, Rule::TrimmedMean { trim: 0.1 }] {
            let mut a = acc(len, rule.clone(), None);
            for d in 0..9 {
                a.add(&format!("lab{d}"), &gaussian(len, 1.0, 0.05, d), 100)
                    .unwrap();
            }
            a.add("poisoned", &vec![1e6; len], 100).unwrap();
            let out = a.finish().unwrap();
            let worst = out.iter().map(|v| (v - 1.0).abs()).fold(0.0f32, f32::max);
            results.push((rule, worst));
        }
        println!("largest deviation from the honest 1.0 with one poisoned lab of 10: {results:?}");
        assert!(results[0].1 > 1e4);
        assert!(results[1].1 < 0.2);
        assert!(results[2].1 < 0.2);
    }

    #[test]
    fn bad_updates_are_rejected_and_leave_the_round_unchanged() {
        let mut a = acc(3, Rule::FedAvg, None);
        a.add("a", &[1.0, 1.0, 1.0], 2).unwrap();
        assert!(matches!(
            a.add("b", &[1.0, 1.0], 1),
            Err(AggregateError::Length { .. })
        ));
        assert!(matches!(
            a.add("b", &[1.0, f32::NAN, 1.0], 1),
            Err(AggregateError::NonFinite { index: 1, .. })
        ));
        assert!(matches!(
            a.add("b", &[1.0, 1.0, 1.0], 0),
            Err(AggregateError::ZeroSamples { .. })
        ));
        match a.add("a", &[9.0, 9.0, 9.0], 1) {
            Err(AggregateError::Duplicate { device }) => assert_eq!(device, "a"),
            other => panic!("{other:?}"),
        }
        assert_eq!(a.count(), 1);
        assert_eq!(a.finish().unwrap(), vec![1.0, 1.0, 1.0]);
        assert!(matches!(
            acc(3, Rule::Median, None).finish(),
            Err(AggregateError::Empty)
        ));
        let bad = AggregationConfig {
            rule: Rule::TrimmedMean { trim: 0.5 },
            ..Default::default()
        };
        assert!(Accumulator::new(3, &bad).is_err());
    }

    #[test]
    fn two_processes_give_what_one_process_gives() {
        let len = 1000;
        let ups: Vec<Vec<f32>> = (0..6).map(|d| gaussian(len, 0.0, 0.01, 100 + d)).collect();
        for rule in [Rule::FedAvg, Rule::TrimmedMean { trim: 0.2 }, Rule::Median] {
            let mut one = acc(len, rule.clone(), Some(0.3));
            let (mut p1, mut p2) = (
                acc(len, rule.clone(), Some(0.3)),
                acc(len, rule.clone(), Some(0.3)),
            );
            for (d, u) in ups.iter().enumerate() {
                let name = format!("lab{d}");
                one.add(&name, u, 10 + d as u64).unwrap();
                let process = if d % 2 == 0 { &mut p1 } else { &mut p2 };
                process.add(&name, u, 10 + d as u64).unwrap();
            }
            // Through CBOR, as between processes.
            let mut wire = Vec::new();
            ciborium::into_writer(&p2.partial(), &mut wire).unwrap();
            // Byte strings: 8 bytes a value for FedAvg's sum, 4 per kept value (3 devices) otherwise.
            let payload = if rule == Rule::FedAvg {
                8 * len
            } else {
                4 * 3 * len
            };
            assert!(wire.len() < payload + 200, "{} bytes", wire.len());
            let received: PartialSum = ciborium::from_reader(&wire[..]).unwrap();
            assert_eq!(received, p2.partial());
            p1.merge(received).unwrap();
            assert_eq!(p1.count(), 6);
            assert_eq!(p1.total_samples(), one.total_samples());
            let (a, b) = (p1.finish().unwrap(), one.finish().unwrap());
            if rule == Rule::FedAvg {
                close(&a, &b, 1e-6);
            } else {
                // Order statistics do not depend on the order the updates came in.
                assert_eq!(a, b);
            }
        }
        // FedAvg partials of one device each, merged in the add order: the same operations as one
        // process, so the same bits.
        let mut one = acc(len, Rule::FedAvg, None);
        let mut merged = acc(len, Rule::FedAvg, None);
        for (d, u) in ups.iter().enumerate() {
            one.add(&format!("lab{d}"), u, 3 + d as u64).unwrap();
            let mut p = acc(len, Rule::FedAvg, None);
            p.add(&format!("lab{d}"), u, 3 + d as u64).unwrap();
            merged.merge(p.partial()).unwrap();
        }
        assert_eq!(one.finish().unwrap(), merged.finish().unwrap());
    }

    #[test]
    fn merging_rejects_shared_devices_and_mismatched_partials() {
        let mut a = acc(2, Rule::FedAvg, None);
        a.add("lab1", &[1.0, 1.0], 1).unwrap();
        let mut b = acc(2, Rule::FedAvg, None);
        b.add("lab2", &[2.0, 2.0], 1).unwrap();
        b.add("lab1", &[3.0, 3.0], 1).unwrap();
        match a.merge(b.partial()) {
            Err(AggregateError::Duplicate { device }) => assert_eq!(device, "lab1"),
            other => panic!("{other:?}"),
        }
        assert_eq!(a.count(), 1);
        assert!(matches!(
            a.merge(acc(2, Rule::Median, None).partial()),
            Err(AggregateError::Incompatible(_))
        ));
        assert!(matches!(
            a.merge(acc(3, Rule::FedAvg, None).partial()),
            Err(AggregateError::Incompatible(_))
        ));
        // A partial tampered with on the wire.
        let mut p = b.partial();
        p.devices = vec!["x".into(), "x".into()];
        assert!(matches!(a.merge(p), Err(AggregateError::InvalidPartial(_))));
        let mut p = b.partial();
        p.body = PartialBody::Sum { sum: vec![1.0] };
        assert!(matches!(a.merge(p), Err(AggregateError::InvalidPartial(_))));
        // An empty partial is a no-op.
        a.merge(acc(2, Rule::FedAvg, None).partial()).unwrap();
        assert_eq!(a.finish().unwrap(), vec![1.0, 1.0]);
    }

    #[test]
    fn fedavg_streams_a_thousand_updates_without_keeping_them() {
        let len = 1000;
        let mut a = acc(len, Rule::FedAvg, None);
        let mut m = acc(len, Rule::Median, None);
        let mut expected = vec![0.0f64; len];
        for d in 0..1000u64 {
            let u: Vec<f32> = (0..len)
                .map(|j| ((d * 7 + j as u64) % 13) as f32 - 6.0)
                .collect();
            for (e, &v) in expected.iter_mut().zip(&u) {
                *e += f64::from(v) / 1000.0;
            }
            a.add(&format!("lab{d}"), &u, 1).unwrap();
            if d < 50 {
                m.add(&format!("lab{d}"), &u, 1).unwrap();
            }
        }
        assert_eq!(a.retained_updates(), 0);
        assert_eq!(a.count(), 1000);
        assert_eq!(m.retained_updates(), 50);
        let e: Vec<f32> = expected.iter().map(|&v| v as f32).collect();
        close(&a.finish().unwrap(), &e, 1e-6);
    }

    #[test]
    fn server_none_momentum_and_adam_two_steps_by_hand() {
        let mut x = vec![1.0f32, 2.0];
        let mut s = ServerOptimizer::new(2, &ServerOpt::None).unwrap();
        s.apply(&mut x, &[0.5, -1.0]).unwrap();
        assert_eq!(x, vec![1.5, 1.0]);

        // FedAvgM, lr 0.5, beta 0.9: v = [0.2, −0.4], x = [1.1, 1.8]; then
        // v = 0.9·[0.2, −0.4] + [0.2, 0.4] = [0.38, 0.04], x = [1.1 + 0.19, 1.8 + 0.02].
        let mut x = vec![1.0f32, 2.0];
        let mut s = ServerOptimizer::new(2, &ServerOpt::Momentum { lr: 0.5, beta: 0.9 }).unwrap();
        s.apply(&mut x, &[0.2, -0.4]).unwrap();
        close(&x, &[1.1, 1.8], 1e-6);
        s.apply(&mut x, &[0.2, 0.4]).unwrap();
        close(&x, &[1.29, 1.82], 1e-6);

        // FedAdam, lr 0.1, β1 0.9, β2 0.99, eps 1e-8, g = −update.
        // Step 1: g = [−0.5, 1]; bias-corrected m̂ = g, v̂ = g², so x += 0.1·[1, −1] → [1.1, 1.9].
        // Step 2: g = [−0.5, −1]; m = 0.9·[−0.05, 0.1] + 0.1·g = [−0.095, −0.01],
        // v = 0.99·[0.0025, 0.01] + 0.01·g² = [0.004975, 0.0199]; m̂ = m / 0.19 = [−0.5, −0.0526316],
        // v̂ = v / 0.0199 = [0.25, 1]; x −= 0.1·m̂/√v̂ → [1.2, 1.9052632].
        let adam = ServerOpt::Adam {
            lr: 0.1,
            beta1: 0.9,
            beta2: 0.99,
            eps: 1e-8,
        };
        let mut x = vec![1.0f32, 2.0];
        let mut s = ServerOptimizer::new(2, &adam).unwrap();
        s.apply(&mut x, &[0.5, -1.0]).unwrap();
        close(&x, &[1.1, 1.9], 1e-6);
        // The state survives a restart (CBOR) and continues identically.
        let mut wire = Vec::new();
        ciborium::into_writer(&s, &mut wire).unwrap();
        let mut restored: ServerOptimizer = ciborium::from_reader(&wire[..]).unwrap();
        assert_eq!(restored, s);
        let mut y = x.clone();
        s.apply(&mut x, &[0.5, 1.0]).unwrap();
        restored.apply(&mut y, &[0.5, 1.0]).unwrap();
        close(&x, &[1.2, 1.905_263_2], 1e-6);
        assert_eq!(x, y);
        assert_eq!(s.steps(), 2);

        // Errors change nothing.
        assert!(s.apply(&mut x, &[1.0]).is_err());
        assert!(s.apply(&mut x, &[f32::INFINITY, 0.0]).is_err());
        let mut huge = vec![f32::MAX, 0.0];
        let mut plain = ServerOptimizer::new(2, &ServerOpt::None).unwrap();
        assert!(plain.apply(&mut huge, &[f32::MAX, 0.0]).is_err());
        assert_eq!(huge, vec![f32::MAX, 0.0]);
        assert_eq!(plain.steps(), 0);
    }

    #[test]
    fn config_reads_from_toml_and_json_in_the_documented_names() {
        let c: AggregationConfig = toml::from_str(
            "clip_norm = 5.0\n[rule]\nkind = \"trimmed_mean\"\ntrim = 0.1\n\
             [server]\nkind = \"adam\"\nlr = 0.01\nbeta1 = 0.9\nbeta2 = 0.99\neps = 0.001\n",
        )
        .unwrap();
        assert_eq!(c.rule, Rule::TrimmedMean { trim: 0.1 });
        assert_eq!(c.clip_norm, Some(5.0));
        c.validate().unwrap();
        let c: AggregationConfig = serde_json::from_str(r#"{"rule":{"kind":"fedavg"}}"#).unwrap();
        assert_eq!(c, AggregationConfig::default());
        assert!(serde_json::from_str::<AggregationConfig>(r#"{"rule":{"kind":"mean"}}"#).is_err());
        let bad = AggregationConfig {
            server: ServerOpt::Momentum { lr: 1.0, beta: 1.0 },
            ..Default::default()
        };
        assert!(
            bad.validate()
                .unwrap_err()
                .to_string()
                .contains("server.beta")
        );
    }
}
