//! The console's picture of the fleet: MQTT messages in, a bounded state out, no I/O.
//!
//! [`Fleet::ingest`] takes one message (topic, payload, arrival time) and updates the devices, the
//! rounds and the fleet's last command; [`Fleet::snapshot`] is what the page shows (JSON). Every
//! message comes from a peer, so nothing here trusts it: envelopes are checked (size, schema,
//! digest, and the aggregator's signature when its key is configured), a status or result must be
//! sent by the device its topic names, strings are clipped, and every collection is capped
//! ([`Limits`]): a flood of invented device ids or rounds cannot grow the console's memory.

use std::collections::{BTreeMap, VecDeque};

use serde::Serialize;

use crate::fleet::package;
use crate::telemetry::clip;
use crate::wire::protocol::{
    Envelope, Kind, ResultBody, RoundAnnouncement, RoundSummary, StatusBody, Topics,
};
use crate::wire::signing::PublicKey;

/// Largest message the console reads (statuses, summaries and commands are small; a round
/// summary of a large fleet is the biggest).
pub const MAX_MESSAGE: usize = 1024 * 1024;
/// Longest string kept from a peer (model versions are 64 hex digits; errors are cut).
const MAX_TEXT: usize = 200;
/// Latest per-image results kept per device, for its images per minute and latency percentiles.
const RESULTS_PER_DEVICE: usize = 256;

/// Caps on what the console holds.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Devices tracked; messages from more are counted and dropped.
    pub devices: usize,
    /// Closed rounds kept (the oldest go first).
    pub rounds: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            devices: 1000,
            rounds: 200,
        }
    }
}

/// One device as the console knows it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct DeviceView {
    pub online: bool,
    pub model_version: String,
    pub global_version: u64,
    /// The global segmenting now (it lags `global_version` while a new one is scored or when one
    /// was kept out), and whether it is the lab's own fine-tune of it.
    pub live_global_version: u64,
    pub live_personalised: bool,
    /// Its hold-out mean IoU on the lab's own images, as last scored there.
    pub live_holdout_iou: Option<f64>,
    pub last_round: Option<u64>,
    pub queue_depth: u64,
    pub last_error: Option<String>,
    /// Unix seconds of its last message of any kind.
    pub last_seen: f64,
    /// Whether it has a style code published (retained on `style/<device>`).
    pub style_code: bool,
    /// Other labs' codes it holds.
    pub style_codes_held: usize,
    pub images_per_minute: f64,
    pub latency_p50_ms: Option<f64>,
    pub latency_p99_ms: Option<f64>,
    pub images: u64,
    #[serde(skip)]
    results: VecDeque<(f64, f64)>,
}

/// One lab's part in a closed round.
#[derive(Debug, Clone, Serialize)]
pub struct LabInRound {
    pub bytes: u64,
    pub samples: u64,
    pub holdout_iou: Option<f32>,
    pub holdout_iou_before: Option<f32>,
}

/// A closed round.
#[derive(Debug, Clone, Serialize)]
pub struct RoundView {
    pub round: u64,
    pub global_version: u64,
    pub accepted: Vec<String>,
    pub stragglers: Vec<String>,
    pub rejected: BTreeMap<String, u64>,
    pub update_bytes: u64,
    pub samples: u64,
    pub seconds: f64,
    /// ε spent so far, when the fleet runs DP.
    pub epsilon: Option<f64>,
    pub delta: Option<f64>,
    /// The DP mechanism's name (says whether secure aggregation carried the noise).
    pub mechanism: Option<String>,
    pub secure_aggregation: bool,
    pub labs: BTreeMap<String, LabInRound>,
}

/// The round now announced.
#[derive(Debug, Clone, Serialize)]
pub struct Announced {
    pub round: u64,
    pub global_version: u64,
    pub closed: bool,
    pub deadline_unix: f64,
    pub local_epochs: u32,
    pub learning_rate: f32,
}

/// The fleet's last command (a rollback and whom it targets).
#[derive(Debug, Clone, Serialize)]
pub struct CommandView {
    pub order: String,
    pub target: String,
    pub issued_ms: u64,
}

/// Messages the console refused, by reason.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Refused {
    pub malformed: u64,
    pub forged_sender: u64,
    pub bad_signature: u64,
    pub too_many_devices: u64,
}

/// Everything the page shows.
#[derive(Debug)]
pub struct Fleet {
    fleet: String,
    topics: Topics,
    limits: Limits,
    aggregator_key: Option<PublicKey>,
    devices: BTreeMap<String, DeviceView>,
    rounds: VecDeque<RoundView>,
    announced: Option<Announced>,
    command: Option<CommandView>,
    refused: Refused,
    messages: u64,
    now: f64,
    /// Round summaries taken in so far (new or replacing): the page compares it with what it holds
    /// to tell whether an update's recent rounds are all it missed.
    rounds_seq: u64,
}

/// Closed rounds an update carries (the page holds the rest): the newest two, so that two rounds
/// closing between two updates still both arrive.
pub const UPDATE_ROUNDS: usize = 2;

#[derive(Serialize)]
struct Snapshot<'a> {
    fleet: &'a str,
    now: f64,
    devices: &'a BTreeMap<String, DeviceView>,
    rounds: Vec<&'a RoundView>,
    /// True in an update: `rounds` holds only the newest rounds, to be merged into the page's.
    partial: bool,
    rounds_seq: u64,
    /// How many rounds the page keeps.
    max_rounds: usize,
    announced: &'a Option<Announced>,
    command: &'a Option<CommandView>,
    /// Devices per model version.
    model_versions: BTreeMap<&'a str, usize>,
    refused: &'a Refused,
    messages: u64,
    signed: bool,
}

impl Fleet {
    pub fn new(
        fleet: &str,
        limits: Limits,
        aggregator_key: Option<PublicKey>,
    ) -> Result<Self, String> {
        Ok(Self {
            fleet: fleet.to_owned(),
            topics: Topics::new(fleet)?,
            limits,
            aggregator_key,
            devices: BTreeMap::new(),
            rounds: VecDeque::new(),
            announced: None,
            command: None,
            refused: Refused::default(),
            messages: 0,
            now: 0.0,
            rounds_seq: 0,
        })
    }

    /// The topic filters the console reads.
    pub fn subscriptions(&self) -> Vec<String> {
        let p = format!("microfed/{}", self.fleet);
        vec![
            format!("{p}/status/+"),
            format!("{p}/result/+"),
            format!("{p}/style/+"),
            self.topics.summary(),
            self.topics.round(),
            self.topics.command(),
        ]
    }

    pub fn devices(&self) -> &BTreeMap<String, DeviceView> {
        &self.devices
    }

    pub fn rounds(&self) -> &VecDeque<RoundView> {
        &self.rounds
    }

    pub fn refused(&self) -> &Refused {
        &self.refused
    }

    pub fn messages(&self) -> u64 {
        self.messages
    }

    /// One message; returns whether the state changed.
    pub fn ingest(&mut self, topic: &str, payload: &[u8], now: f64) -> bool {
        self.now = now;
        self.messages += 1;
        let section_device = |section: &str| self.topics.device_of(section, topic);
        if let Some(device) = section_device("style") {
            // Presence only: an empty retained message withdraws the code.
            let device = device.to_owned();
            let present = !payload.is_empty();
            return self.with_device(&device, now, |d| d.style_code = present);
        }
        if payload.is_empty() {
            return false;
        }
        let env = match Envelope::from_bytes(payload, MAX_MESSAGE) {
            Ok(e) => e,
            Err(_) => {
                self.refused.malformed += 1;
                return false;
            }
        };
        if let Some(device) = section_device("status") {
            let device = device.to_owned();
            return match env.body::<StatusBody>(Kind::Status) {
                Ok(b) if b.device == device && env.sender == device => {
                    self.with_device(&device, now, |d| {
                        d.online = b.online;
                        d.model_version = clip(&b.model_version, MAX_TEXT).to_owned();
                        d.global_version = b.global_version;
                        d.live_global_version = b.live_global_version;
                        d.live_personalised = b.live_personalised;
                        d.live_holdout_iou = b.live_holdout_iou.filter(|v| v.is_finite());
                        d.last_round = b.last_round;
                        d.queue_depth = b.queue_depth;
                        d.last_error = b
                            .last_error
                            .as_deref()
                            .map(|e| clip(e, MAX_TEXT).to_owned());
                        d.style_codes_held = b.style_codes.len();
                    })
                }
                Ok(_) => {
                    self.refused.forged_sender += 1;
                    false
                }
                Err(_) => {
                    self.refused.malformed += 1;
                    false
                }
            };
        }
        if let Some(device) = section_device("result") {
            let device = device.to_owned();
            return match env.body::<ResultBody>(Kind::Result) {
                Ok(b) if b.device == device && env.sender == device => {
                    let latency = if b.latency_ms.is_finite() && b.latency_ms >= 0.0 {
                        b.latency_ms
                    } else {
                        0.0
                    };
                    self.with_device(&device, now, |d| {
                        d.images += 1;
                        if d.results.len() == RESULTS_PER_DEVICE {
                            d.results.pop_front();
                        }
                        d.results.push_back((now, latency));
                        d.refresh_rates(now);
                    })
                }
                Ok(_) => {
                    self.refused.forged_sender += 1;
                    false
                }
                Err(_) => {
                    self.refused.malformed += 1;
                    false
                }
            };
        }
        if topic == self.topics.summary() || topic == self.topics.round() {
            if let Some(k) = &self.aggregator_key
                && env.verify(k).is_err()
            {
                self.refused.bad_signature += 1;
                return false;
            }
            if topic == self.topics.round() {
                return match env.body::<RoundAnnouncement>(Kind::RoundAnnouncement) {
                    Ok(a) => {
                        self.announced = Some(Announced {
                            round: a.round,
                            global_version: a.global_version,
                            closed: a.closed,
                            deadline_unix: a.deadline_unix,
                            local_epochs: a.local_epochs,
                            learning_rate: a.learning_rate,
                        });
                        true
                    }
                    Err(_) => {
                        self.refused.malformed += 1;
                        false
                    }
                };
            }
            return match env.body::<RoundSummary>(Kind::RoundSummary) {
                Ok(s) => {
                    self.add_round(s);
                    true
                }
                Err(_) => {
                    self.refused.malformed += 1;
                    false
                }
            };
        }
        if topic == self.topics.command() {
            // A command is the fleet manager's; the devices check its signature before acting.
            // The console shows it as the manager sent it.
            return match package::decode(payload, &self.fleet).and_then(|(_, s)| s.peek_command()) {
                Ok(c) => {
                    let package::Order::Rollback { version } = &c.order;
                    self.command = Some(CommandView {
                        order: format!("rollback to {}", clip(version, 16)),
                        target: clip(&format!("{:?}", c.target), MAX_TEXT).to_owned(),
                        issued_ms: c.issued_ms,
                    });
                    true
                }
                Err(_) => {
                    self.refused.malformed += 1;
                    false
                }
            };
        }
        false
    }

    /// Applies `f` to `device`'s view, creating it within the cap.
    fn with_device(&mut self, device: &str, now: f64, f: impl FnOnce(&mut DeviceView)) -> bool {
        if !self.devices.contains_key(device) && self.devices.len() >= self.limits.devices {
            self.refused.too_many_devices += 1;
            return false;
        }
        let d = self.devices.entry(device.to_owned()).or_default();
        d.last_seen = now;
        f(d);
        true
    }

    fn add_round(&mut self, s: RoundSummary) {
        let cap = self.limits.devices;
        let names = |v: Vec<String>| -> Vec<String> { v.into_iter().take(cap).collect() };
        let view = RoundView {
            round: s.round,
            global_version: s.global_version,
            accepted: names(s.accepted),
            stragglers: names(s.stragglers),
            rejected: s
                .rejected
                .into_iter()
                .take(32)
                .map(|(k, v)| (clip(&k, 32).to_owned(), v))
                .collect(),
            update_bytes: s.update_bytes,
            samples: s.samples,
            seconds: s.seconds,
            epsilon: s.privacy.as_ref().map(|p| p.epsilon),
            delta: s.privacy.as_ref().map(|p| p.delta),
            secure_aggregation: s.secure_aggregation
                || s.privacy
                    .as_ref()
                    .is_some_and(|p| p.mechanism.contains("secure aggregation")),
            mechanism: s.privacy.map(|p| clip(&p.mechanism, MAX_TEXT).to_owned()),
            labs: s
                .devices
                .into_iter()
                .take(cap)
                .map(|(d, r)| {
                    (
                        d,
                        LabInRound {
                            bytes: r.bytes,
                            samples: r.samples,
                            holdout_iou: r.holdout_iou.filter(|v| v.is_finite()),
                            holdout_iou_before: r.holdout_iou_before.filter(|v| v.is_finite()),
                        },
                    )
                })
                .collect(),
        };
        self.rounds_seq += 1;
        // The retained summary comes again on every reconnect: replace, never duplicate.
        if let Some(r) = self.rounds.iter_mut().find(|r| r.round == view.round) {
            *r = view;
        } else {
            let at = self.rounds.partition_point(|r| r.round < view.round);
            self.rounds.insert(at, view);
            while self.rounds.len() > self.limits.rounds {
                self.rounds.pop_front();
            }
        }
    }

    /// Rates age with time even without messages.
    pub fn tick(&mut self, now: f64) {
        self.now = now;
        for d in self.devices.values_mut() {
            d.refresh_rates(now);
        }
    }

    /// The page's JSON: everything (the page at load, `/state.json`).
    pub fn snapshot(&self) -> String {
        self.json(self.rounds.len(), false)
    }

    /// An update for a page that holds a snapshot: everything but the closed rounds, of which only
    /// the newest [`UPDATE_ROUNDS`] (the page merges them by round number). At 100 devices and 50
    /// rounds the snapshot is ~0.5 MB, almost all of it per-lab round figures the page already has.
    pub fn update(&self) -> String {
        self.json(UPDATE_ROUNDS, true)
    }

    fn json(&self, rounds: usize, partial: bool) -> String {
        let mut model_versions: BTreeMap<&str, usize> = BTreeMap::new();
        for d in self.devices.values() {
            *model_versions.entry(d.model_version.as_str()).or_default() += 1;
        }
        let skip = self.rounds.len().saturating_sub(rounds);
        serde_json::to_string(&Snapshot {
            fleet: &self.fleet,
            now: self.now,
            devices: &self.devices,
            rounds: self.rounds.iter().skip(skip).collect(),
            partial,
            rounds_seq: self.rounds_seq,
            max_rounds: self.limits.rounds,
            announced: &self.announced,
            command: &self.command,
            model_versions,
            refused: &self.refused,
            messages: self.messages,
            signed: self.aggregator_key.is_some(),
        })
        .unwrap_or_else(|e| format!("{{\"error\":{:?}}}", e.to_string()))
    }
}

impl DeviceView {
    fn refresh_rates(&mut self, now: f64) {
        let minute: Vec<f64> = self
            .results
            .iter()
            .filter(|(t, _)| now - t <= 60.0)
            .map(|&(_, l)| l)
            .collect();
        self.images_per_minute = minute.len() as f64;
        let mut all: Vec<f64> = self.results.iter().map(|&(_, l)| l).collect();
        all.sort_by(f64::total_cmp);
        let pct = |q: f64| -> Option<f64> {
            if all.is_empty() {
                return None;
            }
            let rank = (q * all.len() as f64).ceil() as usize;
            Some(all[rank.clamp(1, all.len()) - 1])
        };
        self.latency_p50_ms = pct(0.5);
        self.latency_p99_ms = pct(0.99);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::protocol::{DeviceReport, Header};

    fn sealed<T: Serialize>(kind: Kind, sender: &str, body: &T) -> Vec<u8> {
        let h = Header {
            fleet: "f",
            round: 1,
            model_version: "m",
            sender,
        };
        Envelope::seal(kind, &h, body).unwrap().to_bytes().unwrap()
    }

    fn status(device: &str, online: bool) -> StatusBody {
        StatusBody {
            device: device.into(),
            online,
            model_version: "abc".into(),
            global_version: 3,
            last_round: Some(2),
            queue_depth: 1,
            last_error: Some("é".repeat(300)),
            style_codes: vec!["x".into()],
            style_rejected: 0,
            live_global_version: 3,
            live_personalised: false,
            live_holdout_iou: None,
            globals_refused: 0,
            global_scored_version: 0,
            global_holdout_iou: None,
        }
    }

    #[test]
    fn statuses_last_wills_results_and_summaries_make_the_picture() {
        let mut f = Fleet::new("f", Limits::default(), None).unwrap();
        let t = "microfed/f/status/lab-a";
        assert!(f.ingest(
            t,
            &sealed(Kind::Status, "lab-a", &status("lab-a", true)),
            10.0
        ));
        let d = &f.devices()["lab-a"];
        assert!(d.online && d.global_version == 3 && d.style_codes_held == 1);
        assert!(d.last_error.as_ref().unwrap().len() <= MAX_TEXT);
        // The last will: the same status, offline.
        f.ingest(
            t,
            &sealed(Kind::Status, "lab-a", &status("lab-a", false)),
            20.0,
        );
        assert!(!f.devices()["lab-a"].online);
        assert_eq!(f.devices()["lab-a"].last_seen, 20.0);
        // Results: rate and latency.
        for (i, ms) in [10.0, 20.0, 30.0].iter().enumerate() {
            let r = ResultBody {
                device: "lab-a".into(),
                file: "x.png".into(),
                sha256: String::new(),
                model: "m".into(),
                latency_ms: *ms,
                features_json: "{}".into(),
            };
            f.ingest(
                "microfed/f/result/lab-a",
                &sealed(Kind::Result, "lab-a", &r),
                21.0 + i as f64,
            );
        }
        let d = &f.devices()["lab-a"];
        assert_eq!((d.images, d.images_per_minute), (3, 3.0));
        assert_eq!(
            (d.latency_p50_ms, d.latency_p99_ms),
            (Some(20.0), Some(30.0))
        );
        f.tick(200.0);
        assert_eq!(f.devices()["lab-a"].images_per_minute, 0.0);
        // A summary, twice (retained again on reconnect): one row, with the lab's IoU.
        let mut s = RoundSummary {
            round: 1,
            global_version: 1,
            accepted: vec!["lab-a".into()],
            ..RoundSummary::default()
        };
        s.devices.insert(
            "lab-a".into(),
            DeviceReport {
                bytes: 10,
                samples: 4,
                train_loss: 0.5,
                holdout_iou: Some(0.7),
                holdout_iou_before: Some(0.6),
            },
        );
        let bytes = sealed(Kind::RoundSummary, "aggregator", &s);
        f.ingest("microfed/f/summary", &bytes, 30.0);
        f.ingest("microfed/f/summary", &bytes, 31.0);
        assert_eq!(f.rounds().len(), 1);
        assert_eq!(f.rounds()[0].labs["lab-a"].holdout_iou, Some(0.7));
        let snap: serde_json::Value = serde_json::from_str(&f.snapshot()).unwrap();
        assert_eq!(snap["rounds"][0]["round"], 1);
        assert_eq!(snap["model_versions"]["abc"], 1);
        assert_eq!(
            (snap["partial"].clone(), snap["rounds_seq"].clone()),
            (false.into(), 2.into())
        );
        // Updates carry the newest rounds only, and count every summary taken in.
        for round in 2..=4 {
            let s = RoundSummary {
                round,
                global_version: round,
                ..s.clone()
            };
            f.ingest(
                "microfed/f/summary",
                &sealed(Kind::RoundSummary, "aggregator", &s),
                32.0,
            );
        }
        let full: serde_json::Value = serde_json::from_str(&f.snapshot()).unwrap();
        let update: serde_json::Value = serde_json::from_str(&f.update()).unwrap();
        let rounds = |v: &serde_json::Value| -> Vec<u64> {
            v["rounds"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| r["round"].as_u64().unwrap())
                .collect()
        };
        assert_eq!(rounds(&full), [1, 2, 3, 4]);
        assert_eq!(rounds(&update), [3, 4]);
        assert_eq!(update["partial"], true);
        assert_eq!(update["rounds_seq"], 5);
        assert_eq!(update["devices"], full["devices"]);
        assert_eq!(update["max_rounds"], Limits::default().rounds);
        // Style code presence, and its withdrawal.
        f.ingest("microfed/f/style/lab-a", b"x", 40.0);
        assert!(f.devices()["lab-a"].style_code);
        f.ingest("microfed/f/style/lab-a", b"", 41.0);
        assert!(!f.devices()["lab-a"].style_code);
    }

    /// The size of what the page carries at 100 devices and 50 rounds of 100 participants each
    /// (docs/benchmarks.md): `cargo test -p microfed --lib page_weight -- --ignored --nocapture`.
    #[test]
    #[ignore = "a measurement, not a check"]
    fn page_weight_at_a_hundred_devices() {
        let mut f = Fleet::new("f", Limits::default(), None).unwrap();
        let names: Vec<String> = (0..100).map(|i| format!("lab-{i:03}")).collect();
        let t0 = std::time::Instant::now();
        for (i, d) in names.iter().enumerate() {
            let mut st = status(d, true);
            st.model_version = format!("{:064x}", i % 3);
            st.last_error = None;
            f.ingest(
                &format!("microfed/f/status/{d}"),
                &sealed(Kind::Status, d, &st),
                1.0,
            );
            for k in 0..100 {
                let r = ResultBody {
                    device: d.clone(),
                    file: format!("{k}.png"),
                    sha256: String::new(),
                    model: "m".into(),
                    latency_ms: 40.0 + k as f64,
                    features_json: "{}".into(),
                };
                f.ingest(
                    &format!("microfed/f/result/{d}"),
                    &sealed(Kind::Result, d, &r),
                    2.0,
                );
            }
        }
        for round in 1..=50 {
            let mut s = RoundSummary {
                round,
                global_version: round,
                accepted: names.clone(),
                ..RoundSummary::default()
            };
            for d in &names {
                s.devices.insert(
                    d.clone(),
                    DeviceReport {
                        bytes: 27_000,
                        samples: 40,
                        train_loss: 0.3,
                        holdout_iou: Some(0.71),
                        holdout_iou_before: Some(0.69),
                    },
                );
            }
            f.ingest(
                "microfed/f/summary",
                &sealed(Kind::RoundSummary, "aggregator", &s),
                3.0,
            );
        }
        let ingest = t0.elapsed();
        let t1 = std::time::Instant::now();
        let snap = f.snapshot();
        let one = t1.elapsed();
        let t2 = std::time::Instant::now();
        let update = f.update();
        let two = t2.elapsed();
        println!(
            "100 devices (10,000 results) + 50 rounds x 100 labs ingested in {:.1} ms; snapshot \
             {} bytes, serialised in {:.2} ms; update {} bytes, serialised in {:.2} ms",
            ingest.as_secs_f64() * 1e3,
            snap.len(),
            one.as_secs_f64() * 1e3,
            update.len(),
            two.as_secs_f64() * 1e3
        );
    }

    #[test]
    fn forged_garbage_unsigned_and_too_many_are_refused() {
        let key = crate::wire::signing::SecretKey::generate();
        let limits = Limits {
            devices: 2,
            rounds: 2,
        };
        let mut f = Fleet::new("f", limits, Some(key.public())).unwrap();
        // lab-b's status sent on lab-a's topic.
        assert!(!f.ingest(
            "microfed/f/status/lab-a",
            &sealed(Kind::Status, "lab-b", &status("lab-b", true)),
            1.0
        ));
        assert!(!f.ingest("microfed/f/status/lab-a", b"\xff\x00garbage", 1.0));
        // An unsigned summary when the aggregator's key is known.
        let s = RoundSummary::default();
        assert!(!f.ingest(
            "microfed/f/summary",
            &sealed(Kind::RoundSummary, "aggregator", &s),
            1.0
        ));
        let h = Header {
            fleet: "f",
            round: 1,
            model_version: "m",
            sender: "aggregator",
        };
        for round in 1..=5 {
            let s = RoundSummary {
                round,
                secure_aggregation: round == 5,
                ..RoundSummary::default()
            };
            let signed = Envelope::seal(Kind::RoundSummary, &h, &s)
                .unwrap()
                .sign(&key)
                .unwrap()
                .to_bytes()
                .unwrap();
            assert!(f.ingest("microfed/f/summary", &signed, 2.0));
        }
        assert_eq!(
            f.rounds().iter().map(|r| r.round).collect::<Vec<_>>(),
            [4, 5],
            "only the latest rounds are kept"
        );
        // The summary's own flag (a secure round without DP has no mechanism to name it).
        assert_eq!(
            f.rounds()
                .iter()
                .map(|r| r.secure_aggregation)
                .collect::<Vec<_>>(),
            [false, true]
        );
        for i in 0..5 {
            let d = format!("lab-{i}");
            f.ingest(
                &format!("microfed/f/status/{d}"),
                &sealed(Kind::Status, &d, &status(&d, true)),
                3.0,
            );
        }
        assert_eq!(f.devices().len(), 2);
        let r = f.refused();
        assert_eq!(
            (
                r.forged_sender,
                r.malformed,
                r.bad_signature,
                r.too_many_devices
            ),
            (1, 1, 1, 3)
        );
    }
}
