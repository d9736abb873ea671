//! Scale-out aggregation: several `microfed aggregate` processes share one fleet's update stream.
//!
//! Roles (`[scale_out]` in aggregator.toml, [`ScaleOutSection`]; absent = the one-process aggregator):
//! - **workers** take their share of the updates through the MQTT shared subscription
//!   `$share/aggregators/microfed/<fleet>/update/+` (the broker deals each message to one member),
//!   check and accumulate them exactly as the one-process aggregator does (same rejections, same
//!   crash-safe state and replay, same DP clipping), and report their tally to the coordinator after
//!   every accepted update and every 2 s ([`ScaleOutMessage::Progress`]). On the coordinator's
//!   [`ScaleOutMessage::Close`] they send their [`PartialSum`] ([`ScaleOutMessage::Final`], chunked).
//! - the **coordinator** owns the round: it announces it and publishes the global decoder, decides
//!   the close by quorum (over the devices the workers report) or deadline, asks the workers for
//!   their partial sums, merges them ([`Accumulator::merge`]), and finishes with the same DP noise,
//!   server optimiser, global, announcement and summary as the one-process aggregator
//!   ([`Aggregator::close_round`]). A worker that does not answer within `partial_timeout_s` is
//!   logged and its updates are not merged: their devices are stragglers of the round.
//!
//! All of it travels as [`Kind::Partial`] envelopes on `microfed/<fleet>/partial/<sender id>`: each
//! aggregator writes only its own topic (broker ACL); the coordinator reads its workers' topics, a
//! worker reads the coordinator's.
//!
//! Duplicates across workers: a device whose message is delivered twice (QoS 1 redelivery, its
//! outbox retrying) may reach two workers, each of which accepts it once. The coordinator sees that
//! in the progress reports (or, late, in the finals) and names the device in the close request of
//! every worker but the first (by id); those workers drop it (counted as `duplicate`) and rebuild
//! their sum from their accepted files before sending it. So every update counts exactly once.
//!
//! Limitation: the shared subscription deals out MQTT *messages*, so the frames of a chunked update
//! could go to different workers. Scale-out therefore requires a compression whose largest update fits
//! one frame ([`single_frame_bound`], checked when the configuration is loaded): top-k with int8 does
//! for the 2-class decoder (≈ 0.14 MB at `top_k = 0.05`), dense fp32 (3.1 MB) does not.
//!
//! Map: [`Role`], [`ScaleOutSection`], [`ScaleOutMessage`], [`WorkerTally`], [`single_frame_bound`],
//! [`run_coordinator`], [`run_worker`].

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};

pub use crate::federated::compress::single_frame_bound;
use crate::federated::server::aggregator::{Aggregator, AggregatorError, RoundState, retry};
pub use crate::federated::server::config::{Role, ScaleOutSection};
use crate::federated::server::merge::{Accumulator, PartialSum};
use crate::fsio::now_unix;
use crate::wire::link::{Link, Message};
use crate::wire::protocol::{
    self, CHUNK_BYTES, Envelope, Kind, Reassembler, ReassemblyLimits, RoundAnnouncement,
};

/// Largest partial-sum message the coordinator reassembles: FedAvg's is 8 bytes per decoder value
/// (6.3 MB for 2 classes); the robust rules carry every update (3.1 MB each).
pub const MAX_PARTIAL_BYTES: usize = 256 * 1024 * 1024;

/// How often an open round's worker repeats its tally (a restarted coordinator learns it again).
const PROGRESS_EVERY: Duration = Duration::from_secs(2);

/// One worker's account of the open round.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct WorkerTally {
    pub round: u64,
    pub global_version: u64,
    /// Accepted devices with their sample counts and message digests.
    pub accepted: BTreeMap<String, (u64, String)>,
    /// Rejected messages by reason.
    pub rejected: BTreeMap<String, u64>,
    pub update_bytes: u64,
    /// The worker's `(shard, shards)` when it takes a shard of the devices (none: the share group).
    #[serde(default)]
    pub shard: Option<(u32, u32)>,
}

/// The body of a [`Kind::Partial`] message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScaleOutMessage {
    /// Worker → coordinator while the round is open.
    Progress(WorkerTally),
    /// Worker → coordinator when asked: its tally and its sum (none when it accepted nothing).
    Final {
        tally: WorkerTally,
        partial: Option<PartialSum>,
        /// The worker's DP clipping bound: must be the coordinator's.
        dp_clip_norm: Option<f32>,
    },
    /// Coordinator → workers: close `round`; each worker first drops the devices listed under its
    /// id (accepted by another worker too).
    Close {
        round: u64,
        drop: BTreeMap<String, Vec<String>>,
    },
}

impl Aggregator {
    fn tally(&self) -> WorkerTally {
        WorkerTally {
            round: self.state.round,
            global_version: self.state.global_version,
            accepted: self.state.accepted.clone(),
            rejected: self.state.rejected.clone(),
            update_bytes: self.state.update_bytes,
            shard: self.cfg.scale_out.as_ref().and_then(|so| so.sharding()),
        }
    }

    /// `m` as the frames of one [`Kind::Partial`] envelope (every message on `partial/` is framed,
    /// small ones in one frame).
    fn partial_frames(
        &self,
        round: u64,
        m: &ScaleOutMessage,
    ) -> Result<(usize, Vec<Vec<u8>>), AggregatorError> {
        let mut h = self.header();
        h.round = round;
        let bytes = Envelope::seal(Kind::Partial, &h, m)?.to_bytes()?;
        Ok((bytes.len(), protocol::split(&bytes, CHUNK_BYTES)?))
    }

    /// Worker: follows the coordinator's announcement. A later round starts afresh; the same round
    /// announced open again (a restarted coordinator) reopens it with what was accepted.
    fn follow(&mut self, a: &RoundAnnouncement) -> Result<(), AggregatorError> {
        if a.round > self.state.round && !a.closed {
            self.state.round = a.round;
            self.state.global_version = a.global_version;
            self.state.open = true;
            self.state.started_unix = now_unix();
            self.state.deadline_unix = a.deadline_unix;
            self.state.accepted.clear();
            self.state.rejected.clear();
            self.state.update_bytes = 0;
            self.acc = Accumulator::new(self.acc.len(), &self.cfg.aggregation)?;
            self.save_state()?;
            tracing::info!(
                round = a.round,
                global_version = a.global_version,
                "worker: round open"
            );
        } else if a.round == self.state.round && a.closed == self.state.open {
            self.state.open = !a.closed;
            self.save_state()?;
        }
        Ok(())
    }

    /// Worker: closes the round on the coordinator's request; returns the final message.
    fn worker_final(&mut self, drop: &[String]) -> Result<ScaleOutMessage, AggregatorError> {
        let dups: Vec<String> = drop
            .iter()
            .filter(|d| self.state.accepted.contains_key(*d))
            .cloned()
            .collect();
        if !dups.is_empty() {
            for d in &dups {
                self.state.accepted.remove(d);
                *self.state.rejected.entry("duplicate".into()).or_default() += 1;
                tracing::warn!(round = self.state.round, device = %d, "worker: another worker has this device's update too; dropped here");
            }
            self.acc = Accumulator::new(self.acc.len(), &self.cfg.aggregation)?;
            self.replay_open_round()?;
        }
        self.state.open = false;
        self.save_state()?;
        Ok(ScaleOutMessage::Final {
            tally: self.tally(),
            partial: (!self.acc.is_empty()).then(|| self.acc.partial()),
            dp_clip_norm: self.cfg.dp.as_ref().map(|d| d.clip_norm),
        })
    }

    /// The envelope on `topic` from `from`, checked for this fleet and base model.
    fn open_envelope(&self, bytes: &[u8], limit: usize) -> Result<Envelope, String> {
        let env = Envelope::from_bytes(bytes, limit).map_err(|e| e.to_string())?;
        if env.fleet != self.cfg.fleet || env.model_version != self.model_version {
            return Err(format!(
                "for fleet {} and base model {}",
                env.fleet, env.model_version
            ));
        }
        Ok(env)
    }
}

/// Runs a worker until `rounds` rounds have closed (0 = until stopped) or `stop` turns true.
pub async fn run_worker(
    mut agg: Aggregator,
    link: &Link,
    mut inbox: mpsc::Receiver<Message>,
    mut stop: watch::Receiver<bool>,
) -> Result<RoundState, AggregatorError> {
    let coordinator = agg
        .cfg
        .scale_out
        .as_ref()
        .and_then(|s| s.coordinator.clone())
        .unwrap_or_default();
    let (round_topic, close_topic) = (agg.topics.round(), agg.topics.partial(&coordinator));
    let my_topic = agg.topics.partial(&agg.cfg.id);
    link.wait_connected(Duration::from_secs(30)).await?;
    let mut last_sent: Option<(WorkerTally, Instant)> = None;
    let mut close_frames = Reassembler::new(ReassemblyLimits {
        max_message: 1 << 20,
        ..ReassemblyLimits::default()
    });
    let mut finals_sent: u64 = 0;
    loop {
        if *stop.borrow() {
            break;
        }
        tokio::select! {
            m = inbox.recv() => match m {
                Some(m) if m.topic == round_topic => {
                    match agg.open_envelope(&m.payload, 1 << 20).and_then(|e| {
                        if e.sender != coordinator { return Err(format!("from {}, not the coordinator", e.sender)); }
                        e.body::<RoundAnnouncement>(Kind::RoundAnnouncement).map_err(|e| e.to_string())
                    }) {
                        Ok(a) => {
                            agg.follow(&a)?;
                            let rounds = agg.cfg.rounds;
                            if a.closed && rounds > 0 && a.round >= rounds && finals_sent > 0 {
                                break;
                            }
                        }
                        Err(e) => tracing::warn!("worker: ignored an announcement: {e}"),
                    }
                }
                Some(m) if m.topic == close_topic => {
                    let close = match close_frames.push(&m.topic, &m.payload) {
                        Ok(None) => continue,
                        Ok(Some(whole)) => agg.open_envelope(&whole, 1 << 20).and_then(|e| {
                            e.body::<ScaleOutMessage>(Kind::Partial).map_err(|e| e.to_string())
                        }),
                        Err(e) => Err(e.to_string()),
                    };
                    match close {
                        Ok(ScaleOutMessage::Close { round, drop }) if round >= agg.state.round => {
                            let fin = if round == agg.state.round {
                                let mine = drop.get(&agg.cfg.id).cloned().unwrap_or_default();
                                agg.worker_final(&mine)?
                            } else {
                                // A round this worker never saw open: it has nothing for it.
                                ScaleOutMessage::Final {
                                    tally: WorkerTally {
                                        round,
                                        shard: agg.cfg.scale_out.as_ref().and_then(|so| so.sharding()),
                                        ..WorkerTally::default()
                                    },
                                    partial: None,
                                    dp_clip_norm: agg.cfg.dp.as_ref().map(|d| d.clip_norm),
                                }
                            };
                            let (bytes, frames) = agg.partial_frames(round, &fin)?;
                            let n = frames.len();
                            let (t, f) = (&my_topic, &frames);
                            retry(move || async move {
                                link.publish_frames(|_| t.clone(), f.clone(), false)
                                    .await
                                    .map_err(AggregatorError::from)
                            }, &mut stop).await?;
                            finals_sent += 1;
                            tracing::info!(round, frames = n, bytes,
                                accepted = agg.state.accepted.len(), "worker: partial sum sent");
                        }
                        Ok(_) => {}
                        Err(e) => tracing::warn!("worker: ignored a coordinator message: {e}"),
                    }
                }
                Some(m) => agg.take_update_frame(&m)?,
                None => break,
            },
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            _ = stop.changed() => {}
        }
        // Progress: at once when the tally changed, else every PROGRESS_EVERY while open.
        if agg.state.open && agg.state.round > 0 {
            let tally = agg.tally();
            let due = match &last_sent {
                Some((t, at)) => *t != tally || at.elapsed() >= PROGRESS_EVERY,
                None => true,
            };
            if due {
                let (_, frames) =
                    agg.partial_frames(tally.round, &ScaleOutMessage::Progress(tally.clone()))?;
                match link
                    .publish_frames(|_| my_topic.clone(), frames, false)
                    .await
                {
                    Ok(()) => last_sent = Some((tally, Instant::now())),
                    Err(e) => tracing::warn!(error = %e, "worker: progress not sent; retrying"),
                }
            }
        }
    }
    Ok(agg.state)
}

/// The coordinator's view of the round being closed.
struct Collecting {
    asked: Instant,
    drop: BTreeMap<String, Vec<String>>,
    finals: BTreeMap<String, (WorkerTally, Option<PartialSum>)>,
}

/// Devices accepted by more than one of `tallies` (in worker order): each goes to the drop list of
/// every worker but the first that has it.
fn duplicates<'a>(
    tallies: impl Iterator<Item = (&'a String, &'a BTreeMap<String, (u64, String)>)>,
    drop: &mut BTreeMap<String, Vec<String>>,
) -> bool {
    let mut owner: BTreeMap<&str, &str> = BTreeMap::new();
    let mut added = false;
    for (w, accepted) in tallies {
        for d in accepted.keys() {
            if drop.get(w).is_some_and(|l| l.contains(d)) {
                continue;
            }
            if owner.contains_key(d.as_str()) {
                drop.entry(w.clone()).or_default().push(d.clone());
                added = true;
            } else {
                owner.insert(d, w);
            }
        }
    }
    added
}

/// What is wrong with how the workers split the devices, once every worker has reported: a mix of
/// sharded and share-group workers, shard counts that differ, a shard taken twice (its devices'
/// updates are accepted by both and the duplicates dropped), or a shard nobody takes (its devices'
/// updates are ignored by every worker: they can never count). None when all is well or some worker
/// has not reported yet.
fn shard_problem(workers: &[String], tallies: &BTreeMap<String, WorkerTally>) -> Option<String> {
    let shards: Vec<(&String, Option<(u32, u32)>)> = workers
        .iter()
        .map(|w| tallies.get(w).map(|t| (w, t.shard)))
        .collect::<Option<_>>()?;
    let sharded: Vec<(&String, (u32, u32))> = shards
        .iter()
        .filter_map(|(w, s)| s.map(|s| (*w, s)))
        .collect();
    if sharded.is_empty() {
        return None;
    }
    if sharded.len() < shards.len() {
        let shared: Vec<&str> = shards
            .iter()
            .filter(|(_, s)| s.is_none())
            .map(|(w, _)| w.as_str())
            .collect();
        return Some(format!(
            "workers {shared:?} take turns of the share group while the others take shards: give \
             every worker shard and shards, or none"
        ));
    }
    let n = sharded[0].1.1;
    if let Some((w, (_, m))) = sharded.iter().find(|(_, (_, m))| *m != n) {
        return Some(format!(
            "{} says shards = {n}, {w} says shards = {m}: every worker needs the same count",
            sharded[0].0
        ));
    }
    let mut owner: BTreeMap<u32, &String> = BTreeMap::new();
    for (w, (k, _)) in &sharded {
        if let Some(other) = owner.insert(*k, w) {
            return Some(format!(
                "{other} and {w} both take shard {k} of {n}: their devices' updates count once \
                 (the second is dropped as a duplicate), but another shard may be left to nobody"
            ));
        }
    }
    let missing: Vec<u32> = (0..n).filter(|k| !owner.contains_key(k)).collect();
    (!missing.is_empty()).then(|| {
        format!(
            "no worker takes shard(s) {missing:?} of {n}: the updates of their devices are \
             ignored by every worker and those devices will be stragglers of every round"
        )
    })
}

/// Runs the coordinator: rounds as in [`Aggregator::run`], with the updates summed by the workers.
pub async fn run_coordinator(
    mut agg: Aggregator,
    link: &Link,
    mut inbox: mpsc::Receiver<Message>,
    mut stop: watch::Receiver<bool>,
) -> Result<RoundState, AggregatorError> {
    let so = agg
        .cfg
        .scale_out
        .clone()
        .ok_or_else(|| AggregatorError::Config {
            path: agg.cfg.state.clone(),
            message: "no [scale_out] section".into(),
        })?;
    let timeout = Duration::from_secs_f64(so.partial_timeout_s);
    let mut reassembler = Reassembler::new(ReassemblyLimits {
        max_message: MAX_PARTIAL_BYTES,
        max_pending: 2 * MAX_PARTIAL_BYTES,
        timeout: Duration::from_secs(120),
    });
    let close_topic = agg.topics.partial(&agg.cfg.id);
    let mut progress: BTreeMap<String, WorkerTally> = BTreeMap::new();
    let mut collecting: Option<Collecting> = None;
    let mut shard_warning: Option<String> = None;
    agg.publish_current(link, &mut stop).await?;
    loop {
        if *stop.borrow() {
            break;
        }
        if !agg.state.open {
            if !agg.open_next_round(link, &mut stop).await? {
                break;
            }
            // Tallies of the round just closed mean nothing for the new one.
            progress.clear();
        }
        tokio::select! {
            m = inbox.recv() => match m {
                Some(m) => {
                    if m.topic != close_topic
                        && let Some((worker, msg)) = coordinator_message(&agg, &so, &mut reassembler, &m)
                    {
                        match msg {
                            ScaleOutMessage::Progress(t) if t.round == agg.state.round => {
                                progress.insert(worker, t);
                                let problem = shard_problem(&so.workers, &progress);
                                if problem.is_some() && problem != shard_warning {
                                    tracing::error!("scale-out shards: {}", problem.as_deref().unwrap_or_default());
                                }
                                if problem.is_some() {
                                    shard_warning = problem;
                                }
                            }
                            ScaleOutMessage::Final { tally, partial, dp_clip_norm } => {
                                let ours = agg.cfg.dp.as_ref().map(|d| d.clip_norm);
                                if let Some(c) = collecting.as_mut()
                                    && tally.round == agg.state.round
                                {
                                    if dp_clip_norm != ours {
                                        tracing::error!(%worker, ?dp_clip_norm, ?ours,
                                            "partial sum clipped with another dp.clip_norm: not merged");
                                    } else {
                                        c.finals.insert(worker, (tally, partial));
                                    }
                                }
                            }
                            _ => {}
                        }
                    }
                }
                None => break,
            },
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            _ = stop.changed() => {}
        }
        if !agg.state.open {
            continue;
        }
        // Open: close by quorum over the reported devices, or by the deadline.
        if collecting.is_none() {
            let reported: BTreeSet<&String> = progress
                .values()
                .filter(|t| t.round == agg.state.round)
                .flat_map(|t| t.accepted.keys())
                .collect();
            if reported.len() >= agg.cfg.quorum() || now_unix() >= agg.state.deadline_unix {
                let mut drop = BTreeMap::new();
                duplicates(
                    so.workers
                        .iter()
                        .filter_map(|w| progress.get(w).map(|t| (w, &t.accepted))),
                    &mut drop,
                );
                let c = Collecting {
                    asked: Instant::now(),
                    drop,
                    finals: BTreeMap::new(),
                };
                send_close(&agg, link, &close_topic, &c.drop, &mut stop).await?;
                tracing::info!(
                    round = agg.state.round,
                    reported = reported.len(),
                    "asking the workers for their partial sums"
                );
                collecting = Some(c);
            }
            continue;
        }
        let Some(c) = collecting.as_mut() else {
            continue;
        };
        let all_in = so.workers.iter().all(|w| c.finals.contains_key(w));
        if !all_in && c.asked.elapsed() < timeout {
            continue;
        }
        // Duplicates that only showed in the finals: ask those workers again.
        if duplicates(
            so.workers
                .iter()
                .filter_map(|w| c.finals.get(w).map(|(t, _)| (w, &t.accepted))),
            &mut c.drop,
        ) {
            for w in c.drop.keys() {
                c.finals.remove(w);
            }
            c.asked = Instant::now();
            send_close(&agg, link, &close_topic, &c.drop, &mut stop).await?;
            continue;
        }
        let Some(c) = collecting.take() else {
            continue;
        };
        merge_finals(&mut agg, &so.workers, c.finals, &progress)?;
        let summary = agg.close_round()?;
        retry(|| agg.publish_global(link), &mut stop).await?;
        retry(|| agg.publish_announcement(link), &mut stop).await?;
        retry(|| agg.publish_summary(link, &summary), &mut stop).await?;
    }
    Ok(agg.state)
}

async fn send_close(
    agg: &Aggregator,
    link: &Link,
    topic: &str,
    drop: &BTreeMap<String, Vec<String>>,
    stop: &mut watch::Receiver<bool>,
) -> Result<(), AggregatorError> {
    let msg = ScaleOutMessage::Close {
        round: agg.state.round,
        drop: drop.clone(),
    };
    let (_, frames) = agg.partial_frames(agg.state.round, &msg)?;
    let f = &frames;
    retry(
        move || async move {
            link.publish_frames(|_| topic.to_owned(), f.clone(), false)
                .await
                .map_err(AggregatorError::from)
        },
        stop,
    )
    .await
}

/// One whole message from a worker's topic, checked: a listed worker on its own topic, this fleet
/// and model, a [`Kind::Partial`] body. Anything else is logged and dropped.
fn coordinator_message(
    agg: &Aggregator,
    so: &ScaleOutSection,
    reassembler: &mut Reassembler,
    m: &Message,
) -> Option<(String, ScaleOutMessage)> {
    let worker = agg.topics.device_of("partial", &m.topic)?.to_owned();
    if !so.workers.contains(&worker) {
        tracing::warn!(%worker, "message on the partial topic of an aggregator that is not a worker");
        return None;
    }
    let whole = match reassembler.push(&m.topic, &m.payload) {
        Ok(Some(w)) => w,
        Ok(None) => return None,
        Err(e) => {
            tracing::warn!(%worker, "partial sum frame: {e}");
            return None;
        }
    };
    let msg = agg
        .open_envelope(&whole, MAX_PARTIAL_BYTES)
        .and_then(|env| {
            if env.sender != worker {
                return Err(format!("sender {} on {worker}'s topic", env.sender));
            }
            env.body::<ScaleOutMessage>(Kind::Partial)
                .map_err(|e| e.to_string())
        });
    match msg {
        Ok(m) => Some((worker, m)),
        Err(e) => {
            tracing::warn!(%worker, "message from a worker: {e}");
            None
        }
    }
}

/// Merges the workers' finals into the coordinator's accumulator and tally. A worker with no final
/// (timed out) or an unusable one is logged; its devices become stragglers.
fn merge_finals(
    agg: &mut Aggregator,
    workers: &[String],
    mut finals: BTreeMap<String, (WorkerTally, Option<PartialSum>)>,
    progress: &BTreeMap<String, WorkerTally>,
) -> Result<(), AggregatorError> {
    agg.acc = Accumulator::new(agg.acc.len(), &agg.cfg.aggregation)?;
    for w in workers {
        let Some((tally, partial)) = finals.remove(w) else {
            let lost: Vec<&String> = progress
                .get(w)
                .map(|t| t.accepted.keys().collect())
                .unwrap_or_default();
            tracing::warn!(round = agg.state.round, worker = %w, ?lost,
                "worker sent no partial sum in time: its updates count as stragglers");
            continue;
        };
        let listed: BTreeSet<&String> = tally.accepted.keys().collect();
        let updates = listed.len();
        let merged = match partial {
            None if listed.is_empty() => Ok(()),
            None => Err("no partial sum for its accepted updates".to_string()),
            Some(p) => {
                let devices: BTreeSet<&String> = p.devices().iter().collect();
                if devices != listed {
                    Err(format!(
                        "its partial sum holds {devices:?}, its tally {listed:?}"
                    ))
                } else {
                    agg.acc.merge(p).map_err(|e| e.to_string())
                }
            }
        };
        if let Err(e) = merged {
            tracing::error!(round = agg.state.round, worker = %w, "partial sum not merged: {e}");
            continue;
        }
        for (k, v) in &tally.rejected {
            *agg.state.rejected.entry(k.clone()).or_default() += v;
        }
        agg.state.update_bytes += tally.update_bytes;
        agg.state.accepted.extend(tally.accepted);
        tracing::info!(round = agg.state.round, worker = %w, updates, "partial sum merged");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::federated::compress::{CompressionConfig, Quantize, decoder_layout};

    #[test]
    fn the_coordinator_names_what_is_wrong_with_the_workers_shards() {
        let workers: Vec<String> = ["w0", "w1", "w2"].map(String::from).to_vec();
        let tallies = |shards: [Option<(u32, u32)>; 3]| -> BTreeMap<String, WorkerTally> {
            workers
                .iter()
                .zip(shards)
                .map(|(w, shard)| {
                    let t = WorkerTally {
                        shard,
                        ..WorkerTally::default()
                    };
                    (w.clone(), t)
                })
                .collect()
        };
        let problem = |shards| shard_problem(&workers, &tallies(shards));
        assert_eq!(problem([None, None, None]), None, "the share group");
        assert_eq!(
            problem([Some((0, 3)), Some((1, 3)), Some((2, 3))]),
            None,
            "a partition"
        );
        let says = |shards, what: &str| {
            let p = problem(shards).unwrap_or_default();
            assert!(p.contains(what), "{shards:?}: {p:?}");
        };
        says(
            [Some((0, 3)), None, Some((2, 3))],
            "take turns of the share group",
        );
        says([Some((0, 3)), Some((1, 2)), Some((2, 3))], "the same count");
        says(
            [Some((0, 3)), Some((0, 3)), Some((2, 3))],
            "both take shard 0",
        );
        says(
            [Some((0, 4)), Some((1, 4)), Some((2, 4))],
            "shard(s) [3] of 4",
        );
        // Until every worker has reported, nothing is judged.
        let mut partial = tallies([Some((0, 4)), None, None]);
        partial.remove("w1");
        assert_eq!(shard_problem(&workers, &partial), None);
    }

    #[test]
    fn one_frame_bound_admits_top_k_int8_and_refuses_dense() {
        let layout = decoder_layout(2);
        let dense = CompressionConfig::default();
        assert!(single_frame_bound(&layout, &dense) > 4 * 783_874);
        let sparse = CompressionConfig {
            top_k: Some(0.05),
            error_feedback: false,
            quantize: Quantize::Int8,
            zstd_level: Some(3),
        };
        let b = single_frame_bound(&layout, &sparse);
        assert!(b < CHUNK_BYTES, "{b}");
        // The bound really bounds a real compressed update (scattered kept indices, varied values).
        let values: Vec<f32> = (0..783_874usize)
            .map(|i| ((i * 7919) % 1013) as f32 - 506.0)
            .collect();
        let bytes = crate::federated::compress::compress(&values, &layout, &sparse, None).unwrap();
        assert!(bytes.len() + 2048 <= b, "{} vs {b}", bytes.len());
        let so = ScaleOutSection {
            role: Role::Worker,
            workers: vec![],
            coordinator: Some("aggregator".into()),
            partial_timeout_s: 5.0,
            shard: None,
            shards: None,
        };
        assert!(so.validate("aggregator-1", &sparse).is_ok());
        assert!(
            so.validate("aggregator-1", &dense)
                .unwrap_err()
                .contains("frame")
        );
        assert!(so.validate("aggregator", &sparse).is_err());
    }

    #[test]
    fn duplicates_go_to_the_later_worker_once() {
        let t = |ds: &[&str]| -> BTreeMap<String, (u64, String)> {
            ds.iter()
                .map(|d| (d.to_string(), (1, String::new())))
                .collect()
        };
        let (w1, w2) = ("aggregator-1".to_string(), "aggregator-2".to_string());
        let (a, b) = (t(&["lab-a", "lab-b"]), t(&["lab-b", "lab-c"]));
        let mut drop = BTreeMap::new();
        assert!(duplicates([(&w1, &a), (&w2, &b)].into_iter(), &mut drop));
        assert_eq!(drop[&w2], ["lab-b"]);
        assert!(!drop.contains_key(&w1));
        // Asked again with the same tallies: nothing new.
        assert!(!duplicates([(&w1, &a), (&w2, &b)].into_iter(), &mut drop));
    }

    /// A coordinator and two workers in one process (no broker): the message handlers the MQTT
    /// loops call, in the order the loops call them.
    mod in_process {
        use super::*;
        use crate::federated::server::aggregator::AggregatorConfig;
        use crate::model::onnx;
        use crate::wire::protocol::{Header, LocalMetrics, UpdateBody};
        use microfed_kernels::unet::Params;

        struct Fleet {
            _dir: tempfile::TempDir,
            coordinator: Aggregator,
            workers: Vec<Aggregator>,
            version: String,
        }

        fn fleet() -> Fleet {
            let dir = tempfile::tempdir().unwrap();
            let model = dir.path().join("model.onnx");
            let params = Params::init(2, 5).unwrap();
            onnx::save(&onnx::export(&params, &vec![]).unwrap(), &model).unwrap();
            let cfg = |id: &str, so: &str| -> AggregatorConfig {
                let c: AggregatorConfig = toml::from_str(&format!(
                    "id = {id:?}\nfleet = \"f\"\nmodel = {model:?}\nstate = {:?}\n\
                     devices = [\"a\", \"b\", \"c\", \"d\"]\n\
                     [round]\ndeadline_s = 60.0\nlocal_epochs = 1\nsteps_per_epoch = 1\n\
                     learning_rate = 0.01\nprox_mu = 0.0\npause_s = 0.0\n\
                     [compression]\ntop_k = 0.05\nquantize = \"int8\"\n[scale_out]\n{so}",
                    dir.path().join(id)
                ))
                .unwrap();
                c.validate().unwrap();
                c
            };
            let coordinator = Aggregator::open(cfg(
                "aggregator",
                "role = \"coordinator\"\nworkers = [\"aggregator-1\", \"aggregator-2\"]\n",
            ))
            .unwrap();
            let workers = ["aggregator-1", "aggregator-2"]
                .iter()
                .map(|w| {
                    Aggregator::open(cfg(w, "role = \"worker\"\ncoordinator = \"aggregator\"\n"))
                        .unwrap()
                })
                .collect();
            let version = crate::model::manifest::sha256_file(&model).unwrap();
            Fleet {
                _dir: dir,
                coordinator,
                workers,
                version,
            }
        }

        /// Device `d`'s update message and what the aggregator will decompress from it.
        fn update(f: &Fleet, d: &str, scale: f32, samples: u64) -> (Vec<u8>, Vec<f32>) {
            let layout = decoder_layout(2);
            let n: usize = layout.iter().map(|t| t.len).sum();
            let values: Vec<f32> = (0..n).map(|j| scale * ((j % 97) as f32 - 48.0)).collect();
            let cfg = f.coordinator.cfg.compression.clone();
            let compressed =
                crate::federated::compress::compress(&values, &layout, &cfg, None).unwrap();
            let seen = crate::federated::compress::decompress(&compressed, &layout).unwrap();
            let body = UpdateBody {
                device: d.into(),
                global_version: 0,
                samples,
                metrics: LocalMetrics::default(),
                compressed,
                norm: 0.0,
            };
            let h = Header {
                fleet: "f",
                round: 1,
                model_version: &f.version,
                sender: d,
            };
            let bytes = Envelope::seal(Kind::Update, &h, &body)
                .unwrap()
                .to_bytes()
                .unwrap();
            (bytes, seen)
        }

        #[test]
        fn a_device_seen_by_both_workers_counts_once_and_a_silent_worker_leaves_stragglers() {
            let mut f = fleet();
            let base = f.coordinator.global().to_vec();
            f.coordinator.open_round().unwrap();
            let a = f.coordinator.announcement();
            for w in &mut f.workers {
                w.follow(&a).unwrap();
                assert!(w.state.open && w.state.round == 1);
            }
            let (ma, ua) = update(&f, "a", 1e-4, 1);
            let (mb, ub) = update(&f, "b", -2e-4, 3);
            let (mc, uc) = update(&f, "c", 3e-4, 2);
            // Worker 1: a and b; worker 2: b again (a redelivery) and c.
            f.workers[0].handle_update_message("a", &ma).unwrap();
            f.workers[0].handle_update_message("b", &mb).unwrap();
            f.workers[1].handle_update_message("b", &mb).unwrap();
            f.workers[1].handle_update_message("c", &mc).unwrap();
            let tallies: BTreeMap<String, WorkerTally> = f
                .workers
                .iter()
                .map(|w| (w.cfg.id.clone(), w.tally()))
                .collect();
            let mut drop = BTreeMap::new();
            assert!(duplicates(
                tallies.iter().map(|(w, t)| (w, &t.accepted)),
                &mut drop
            ));
            assert_eq!(drop["aggregator-2"], ["b"]);
            let mut finals = BTreeMap::new();
            for w in &mut f.workers {
                let mine = drop.get(&w.cfg.id).cloned().unwrap_or_default();
                match w.worker_final(&mine).unwrap() {
                    ScaleOutMessage::Final { tally, partial, .. } => {
                        finals.insert(w.cfg.id.clone(), (tally, partial));
                    }
                    other => panic!("{other:?}"),
                }
            }
            assert_eq!(finals["aggregator-2"].0.rejected["duplicate"], 1);
            merge_finals(
                &mut f.coordinator,
                &["aggregator-1".into(), "aggregator-2".into()],
                finals.clone(),
                &tallies,
            )
            .unwrap();
            let s = f.coordinator.close_round().unwrap();
            assert_eq!(s.accepted, ["a", "b", "c"]);
            assert_eq!(s.stragglers, ["d"]);
            assert_eq!(s.samples, 6);
            assert_eq!(s.rejected["duplicate"], 1);
            // FedAvg by samples of a, b, c, each once.
            for (j, (g, b)) in f.coordinator.global().iter().zip(&base).enumerate() {
                let want =
                    (f64::from(ua[j]) + 3.0 * f64::from(ub[j]) + 2.0 * f64::from(uc[j])) / 6.0;
                assert!(
                    (f64::from(g - b) - want).abs() < 1e-6,
                    "{j}: {g} {b} {want}"
                );
            }

            // A second fleet: worker 2 never sends its final, so its device c is a straggler.
            let mut g = fleet();
            g.coordinator.open_round().unwrap();
            let a = g.coordinator.announcement();
            for w in &mut g.workers {
                w.follow(&a).unwrap();
            }
            let (ma, _) = update(&g, "a", 1e-4, 1);
            let (mc, _) = update(&g, "c", 3e-4, 2);
            g.workers[0].handle_update_message("a", &ma).unwrap();
            g.workers[1].handle_update_message("c", &mc).unwrap();
            let progress: BTreeMap<String, WorkerTally> = g
                .workers
                .iter()
                .map(|w| (w.cfg.id.clone(), w.tally()))
                .collect();
            let mut finals = BTreeMap::new();
            if let ScaleOutMessage::Final { tally, partial, .. } =
                g.workers[0].worker_final(&[]).unwrap()
            {
                finals.insert("aggregator-1".to_string(), (tally, partial));
            }
            merge_finals(
                &mut g.coordinator,
                &["aggregator-1".into(), "aggregator-2".into()],
                finals,
                &progress,
            )
            .unwrap();
            let s = g.coordinator.close_round().unwrap();
            assert_eq!(s.accepted, ["a"]);
            assert_eq!(s.stragglers, ["b", "c", "d"]);
            assert_eq!(s.samples, 1);
        }
    }
}
