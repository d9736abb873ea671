//! The participant's round logic as a pure state machine: what the aggregator said (announcements,
//! global decoders), what the training thread finished, and the clock go in as [`Event`]s; what to
//! do comes out as [`Action`]s. No I/O, no time source of its own: the participant's loop
//! (`participant.rs`) owns the connection, the training thread, the outbox and the disk, and feeds
//! this machine. Tested on its own below.
//!
//! A round is trained once, when all of these hold: its announcement is open, it is newer than the
//! last round this device trained, the global decoder it starts from has arrived (same version and
//! digest as announced), its deadline has not passed, and nothing is training now.
//!
//! The hold-out gate: a new global is trained from at once, but it reaches production segmentation
//! (the running model) only after it has been scored on the lab's hold-out images beside the decoder
//! running now ([`Action::Score`] out, [`Event::Scored`] in): a global whose mean IoU is below the
//! running decoder's by more than the margin is kept out ([`Action::KeepLive`]). Without hold-out
//! images (no gate) a new global goes live when it arrives.
//!
//! Personalisation (`[federation.personalise]`): the score may come with the new global fine-tuned
//! on the lab's own images. Of the two, the one with the better hold-out score is the candidate
//! for production, gated as above; the federation trains from the global either way (a lab's
//! update is always a step from what the aggregator sent).

use crate::federated::edge::local::RoundPlan;
use crate::wire::protocol::{self, CompressionConfig, RoundAnnouncement};

/// What happened.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A round announcement (open or closed), already checked (fleet, base model).
    Announced(RoundAnnouncement),
    /// A global decoder, reassembled and checked (length).
    Global { version: u64, values: Vec<f32> },
    /// The training thread finished `round` (its update is handled, or it failed).
    Trained { round: u64 },
    /// The training thread scored global `version` ([`Action::Score`]) and the decoder running now on
    /// the hold-out images: mean IoU of each (None: nothing to score on), or why it could not.
    Scored {
        version: u64,
        result: Result<Scores, String>,
    },
    /// Time passed (deadlines).
    Tick,
}

/// What to do.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Updates of rounds up to this one can no longer count: drop them from the outbox.
    DropUpdatesUpTo(u64),
    /// A newer global decoder: show its version and, unless it is the base model's own (version
    /// 0), swap [`Rounds::live`] into the running model: the global itself, or its personalised
    /// fine-tune.
    Install {
        version: u64,
        swap: bool,
        personalised: bool,
    },
    /// Train this round from the current global decoder ([`Rounds::global`]).
    Train(TrainOrder),
    /// The global decoder's digest differs from the announcement's: wait for the right one.
    DigestMismatch { round: u64, version: u64 },
    /// Score global `version` ([`Rounds::global`]) and the running decoder ([`Rounds::live`]) on
    /// the hold-out images, and answer with [`Event::Scored`]. Training from it goes on meanwhile.
    Score { version: u64 },
    /// Global `version` is not swapped into production: the running decoder (`live_version`) stays.
    KeepLive {
        version: u64,
        live_version: u64,
        why: Refusal,
    },
}

/// Hold-out mean IoU of a candidate global and of the decoder running now, and the global's
/// personalised fine-tune when one was made.
#[derive(Debug, Clone, PartialEq)]
pub struct Scores {
    pub candidate: Option<f64>,
    pub live: Option<f64>,
    pub personalised: Option<Personalised>,
}

/// A global fine-tuned on the lab's own images, and its hold-out mean IoU.
#[derive(Debug, Clone, PartialEq)]
pub struct Personalised {
    pub values: Vec<f32>,
    pub score: Option<f64>,
}

impl Scores {
    /// Whether the personalised fine-tune is the better candidate: it has a finite score above
    /// the global's (or the global has none).
    pub fn prefers_personalised(&self) -> bool {
        let Some(p) = self.personalised.as_ref().and_then(|p| p.score) else {
            return false;
        };
        p.is_finite() && self.candidate.is_none_or(|c| !c.is_finite() || p > c)
    }

    /// The candidate for production: the fine-tune where [`Scores::prefers_personalised`] (its
    /// score becomes the candidate's, its values come back), else the global itself.
    fn into_candidate(mut self) -> (Scores, Option<Vec<f32>>) {
        let prefer = self.prefers_personalised();
        match self.personalised.take() {
            Some(p) if prefer => (
                Scores {
                    candidate: p.score,
                    live: self.live,
                    personalised: None,
                },
                Some(p.values),
            ),
            _ => (self, None),
        }
    }
}

/// The decoder in production.
#[derive(Debug, Clone, PartialEq)]
struct Live {
    /// The global it is (0: the base model's own), or was fine-tuned from.
    version: u64,
    /// Fine-tuned on the lab's own images ([`Personalised`]).
    personalised: bool,
    /// Its hold-out mean IoU, when it was scored before going live.
    score: Option<f64>,
    values: Vec<f32>,
}

/// Why a global was kept out of production.
#[derive(Debug, Clone, PartialEq)]
pub enum Refusal {
    /// It scores worse than the running decoder by more than the margin (or not a finite score).
    Worse {
        candidate: f64,
        live: f64,
        margin: f64,
    },
    /// It could not be scored (the training thread failed): not verified, not swapped in.
    NotScored(String),
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Worse {
                candidate,
                live,
                margin,
            } => write!(
                f,
                "hold-out mean IoU {candidate:.4} is below the running decoder's {live:.4} by more \
                 than holdout_margin {margin}"
            ),
            Self::NotScored(why) => write!(f, "could not be scored on the hold-out: {why}"),
        }
    }
}

/// A round to train now.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainOrder {
    pub plan: RoundPlan,
    pub global_version: u64,
    pub compression: CompressionConfig,
}

/// The participant's view of the rounds. Announcements and the global decoder outlive a session
/// (retained messages arrive once per subscription); [`Rounds::new_base_model`] forgets them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Rounds {
    announced: Option<RoundAnnouncement>,
    global: Option<(u64, Vec<f32>)>,
    /// Last round trained (persisted by the loop in `participant.json`).
    last_trained: u64,
    /// The round being trained now.
    training: Option<u64>,
    /// (round, version) whose digest mismatch was reported already.
    mismatch_reported: Option<(u64, u64)>,
    /// The decoder in production.
    live: Option<Live>,
    /// The hold-out margin; None: no gate (no hold-out images), a new global goes live at once.
    gate: Option<f64>,
    /// The global version being scored now.
    scoring: Option<u64>,
    /// The last global version decided (swapped in or kept out).
    decided: Option<u64>,
    /// The last global scored on the hold-out: its version and its own mean IoU (not its
    /// personalised fine-tune's), whether or not it went live.
    global_score: Option<(u64, f64)>,
}

impl Rounds {
    /// A session's start: the last round trained on this base model (from disk), nothing training
    /// or being scored; `base` is the base model's own decoder (what runs until a global goes live);
    /// `gate` the hold-out margin (None: no hold-out images, no gate). A score asked for in the
    /// last session is asked for again.
    pub fn start_session(&mut self, last_trained: u64, base: &[f32], gate: Option<f64>) {
        self.last_trained = last_trained;
        self.training = None;
        self.mismatch_reported = None;
        self.scoring = None;
        self.gate = gate;
        if self.live.is_none() {
            self.live = Some(Live {
                version: 0,
                personalised: false,
                score: None,
                values: base.to_vec(),
            });
        }
    }

    /// A new base model: its rounds and decoders mean nothing on the old one, and vice versa.
    pub fn new_base_model(&mut self) {
        *self = Self::default();
    }

    /// The current global decoder (version, values).
    pub fn global(&self) -> Option<(u64, &[f32])> {
        self.global.as_ref().map(|(v, g)| (*v, g.as_slice()))
    }

    /// The decoder in production (version, values), as far as this machine knows.
    pub fn live(&self) -> Option<(u64, &[f32])> {
        self.live.as_ref().map(|l| (l.version, l.values.as_slice()))
    }

    /// Whether the decoder in production is a personalised fine-tune of its global (the loop
    /// learns it from [`Action::Install`]).
    #[cfg(test)]
    pub fn live_is_personalised(&self) -> bool {
        self.live.as_ref().is_some_and(|l| l.personalised)
    }

    /// The last global decoder scored on the hold-out and its own mean IoU (the federation's
    /// result for this lab, beside what went live).
    pub fn global_score(&self) -> Option<(u64, f64)> {
        self.global_score
    }

    /// The hold-out mean IoU of the decoder in production, when it was scored (the last scoring
    /// also refreshes the running decoder's own score).
    pub fn live_score(&self) -> Option<f64> {
        self.live.as_ref().and_then(|l| l.score)
    }

    /// The open round, if any (updates of older rounds are stale).
    pub fn open_round(&self) -> Option<u64> {
        self.announced
            .as_ref()
            .filter(|a| !a.closed)
            .map(|a| a.round)
    }

    pub fn last_trained(&self) -> u64 {
        self.last_trained
    }

    pub fn is_training(&self) -> bool {
        self.training.is_some()
    }

    /// Takes one event at `now_unix` (seconds) and returns what to do, in order.
    pub fn handle(&mut self, event: Event, now_unix: f64) -> Vec<Action> {
        let mut actions = Vec::new();
        match event {
            Event::Announced(a) => {
                if a.closed {
                    actions.push(Action::DropUpdatesUpTo(a.round));
                }
                self.announced = Some(a);
            }
            Event::Global { version, values } => {
                // Newer than the one held, or the very one the current announcement names (so a
                // forged high version held before cannot pin this device).
                let announced = self.announced.as_ref().is_some_and(|a| {
                    a.global_version == version
                        && self.global.as_ref().is_some_and(|(v, _)| *v != version)
                        && protocol::sha256_hex(&protocol::f32_bytes(&values)) == a.global_digest
                });
                if announced || self.global.as_ref().is_none_or(|(v, _)| version > *v) {
                    self.global = Some((version, values));
                }
            }
            Event::Scored { version, result } => {
                if self.scoring == Some(version) {
                    self.scoring = None;
                    // A newer global arrived meanwhile: it is scored next (below).
                    if let Some((gv, g)) = self.global.as_ref().filter(|(gv, _)| *gv == version) {
                        self.decided = Some(*gv);
                        if let Ok(Scores {
                            candidate: Some(own),
                            ..
                        }) = &result
                        {
                            self.global_score = Some((version, *own));
                        }
                        let margin = self.gate.unwrap_or(f64::INFINITY);
                        // The better of the global and its personalised fine-tune is the candidate.
                        let (result, tuned) = match result {
                            Ok(s) => {
                                let (s, tuned) = s.into_candidate();
                                (Ok(s), tuned)
                            }
                            Err(e) => (Err(e), None),
                        };
                        let scores = result.as_ref().ok().map(|s| (s.candidate, s.live));
                        match verdict(result, margin) {
                            Ok(()) => {
                                let personalised = tuned.is_some();
                                self.live = Some(Live {
                                    version: *gv,
                                    personalised,
                                    score: scores.and_then(|(c, _)| c),
                                    values: tuned.unwrap_or_else(|| g.clone()),
                                });
                                actions.push(Action::Install {
                                    version,
                                    swap: true,
                                    personalised,
                                });
                            }
                            Err(why) => {
                                if let (Some(l), Some((_, Some(score)))) =
                                    (self.live.as_mut(), scores)
                                {
                                    l.score = Some(score);
                                }
                                actions.push(Action::KeepLive {
                                    version,
                                    live_version: self.live.as_ref().map_or(0, |l| l.version),
                                    why,
                                })
                            }
                        }
                    }
                }
            }
            Event::Trained { round } => {
                if self.training == Some(round) {
                    self.training = None;
                }
                self.last_trained = self.last_trained.max(round);
            }
            Event::Tick => {}
        }
        actions.extend(self.go_live());
        actions.extend(self.next_round(now_unix));
        actions
    }

    /// The global held, when not decided yet: swapped in (no gate, or the base model's own), or
    /// scored first.
    fn go_live(&mut self) -> Option<Action> {
        let (gv, g) = self.global.as_ref()?;
        let gv = *gv;
        if self.decided == Some(gv) || self.scoring.is_some() {
            return None;
        }
        if gv == 0 || self.gate.is_none() {
            self.decided = Some(gv);
            if gv > 0 {
                self.live = Some(Live {
                    version: gv,
                    personalised: false,
                    score: None,
                    values: g.clone(),
                });
            }
            return Some(Action::Install {
                version: gv,
                swap: gv > 0,
                personalised: false,
            });
        }
        self.scoring = Some(gv);
        Some(Action::Score { version: gv })
    }

    /// The round to train now, if any.
    fn next_round(&mut self, now_unix: f64) -> Option<Action> {
        let (a, (gv, g)) = (self.announced.as_ref()?, self.global.as_ref()?);
        if self.training.is_some()
            || a.closed
            || a.round <= self.last_trained
            || a.global_version != *gv
            || now_unix >= a.deadline_unix
        {
            return None;
        }
        if protocol::sha256_hex(&protocol::f32_bytes(g)) != a.global_digest {
            let key = (a.round, *gv);
            if self.mismatch_reported == Some(key) {
                return None;
            }
            self.mismatch_reported = Some(key);
            return Some(Action::DigestMismatch {
                round: a.round,
                version: *gv,
            });
        }
        self.training = Some(a.round);
        Some(Action::Train(TrainOrder {
            plan: RoundPlan {
                round: a.round,
                epochs: a.local_epochs,
                steps_per_epoch: a.steps_per_epoch,
                learning_rate: a.learning_rate,
                prox_mu: a.prox_mu,
                optimizer: a.optimizer,
            },
            global_version: *gv,
            compression: a.compression.clone(),
        }))
    }
}

/// Whether a scored global may go live: not when it could not be scored, nor when its hold-out
/// mean IoU is not finite or below the running decoder's by more than `margin`. Nothing to score
/// on (no score either side) lets it through: there is nothing to compare.
pub fn verdict(result: Result<Scores, String>, margin: f64) -> Result<(), Refusal> {
    let s = result.map_err(Refusal::NotScored)?;
    match (s.candidate, s.live) {
        (Some(candidate), Some(live)) if !candidate.is_finite() || candidate < live - margin => {
            Err(Refusal::Worse {
                candidate,
                live,
                margin,
            })
        }
        _ => Ok(()),
    }
}

/// Checks a new global decoder before it goes near the running model: every value finite, and
/// at most `max_step` (L2) from the current one, when there is one. A global is a step of the
/// server's optimiser from the last; one far away is a forgery or a broken aggregator.
pub fn check_global(new: &[f32], current: Option<&[f32]>, max_step: f32) -> Result<(), String> {
    if let Some(i) = new.iter().position(|v| !v.is_finite()) {
        return Err(format!("value {i} is {}", new[i]));
    }
    if let Some(cur) = current
        && cur.len() == new.len()
    {
        let step = new
            .iter()
            .zip(cur)
            .map(|(a, b)| (f64::from(*a) - f64::from(*b)).powi(2))
            .sum::<f64>()
            .sqrt();
        if step > f64::from(max_step) {
            return Err(format!(
                "{step:.3e} (L2) from the current decoder, above max_global_step {max_step}"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn announce(round: u64, version: u64, global: &[f32], deadline: f64) -> RoundAnnouncement {
        RoundAnnouncement {
            round,
            global_version: version,
            global_digest: protocol::sha256_hex(&protocol::f32_bytes(global)),
            deadline_unix: deadline,
            local_epochs: 1,
            steps_per_epoch: 4,
            learning_rate: 0.01,
            prox_mu: 0.0,
            optimizer: Default::default(),
            compression: CompressionConfig::default(),
            closed: false,
        }
    }

    fn trains(actions: &[Action]) -> Option<u64> {
        actions.iter().find_map(|a| match a {
            Action::Train(o) => Some(o.plan.round),
            _ => None,
        })
    }

    #[test]
    fn a_round_trains_once_its_announcement_and_global_are_both_there() {
        let g = vec![1.0, 2.0];
        let mut r = Rounds::default();
        let a = r.handle(Event::Announced(announce(1, 0, &g, 100.0)), 0.0);
        assert_eq!(trains(&a), None, "no global yet");
        let a = r.handle(
            Event::Global {
                version: 0,
                values: g.clone(),
            },
            0.0,
        );
        assert_eq!(
            a[0],
            Action::Install {
                version: 0,
                swap: false,
                personalised: false
            }
        );
        assert_eq!(trains(&a), Some(1));
        assert!(r.is_training());
        // Nothing else starts while it trains, and the same round is never trained twice.
        assert_eq!(trains(&r.handle(Event::Tick, 1.0)), None);
        assert_eq!(trains(&r.handle(Event::Trained { round: 1 }, 2.0)), None);
        assert_eq!(r.last_trained(), 1);
        assert!(!r.is_training());
    }

    #[test]
    fn late_closed_old_or_mismatched_rounds_do_not_train() {
        let g = vec![1.0, 2.0];
        let global = |v| Event::Global {
            version: v,
            values: vec![1.0, 2.0],
        };
        // Past the deadline.
        let mut r = Rounds::default();
        r.handle(global(0), 0.0);
        assert_eq!(
            trains(&r.handle(Event::Announced(announce(1, 0, &g, 10.0)), 10.0)),
            None
        );
        // Closed: stale updates are dropped, nothing trains.
        let mut closed = announce(2, 0, &g, 100.0);
        closed.closed = true;
        let a = r.handle(Event::Announced(closed), 0.0);
        assert_eq!(a, vec![Action::DropUpdatesUpTo(2)]);
        // Already trained (a restart keeps the last round).
        let mut r = Rounds::default();
        r.start_session(3, &[0.0, 0.0], None);
        r.handle(global(0), 0.0);
        assert_eq!(
            trains(&r.handle(Event::Announced(announce(3, 0, &g, 100.0)), 0.0)),
            None
        );
        // Another global version than announced: wait for it.
        assert_eq!(
            trains(&r.handle(Event::Announced(announce(4, 1, &g, 100.0)), 0.0)),
            None
        );
        // Right version, wrong values: reported once, not trained.
        let a = r.handle(
            Event::Global {
                version: 1,
                values: vec![9.0, 9.0],
            },
            0.0,
        );
        assert!(a.contains(&Action::DigestMismatch {
            round: 4,
            version: 1
        }));
        assert!(
            !r.handle(Event::Tick, 1.0)
                .iter()
                .any(|a| matches!(a, Action::DigestMismatch { .. }))
        );
    }

    #[test]
    fn older_globals_are_ignored_and_a_new_base_model_forgets_everything() {
        let mut r = Rounds::default();
        let g = |v, x| Event::Global {
            version: v,
            values: vec![x],
        };
        assert_eq!(
            r.handle(g(2, 2.0), 0.0),
            vec![Action::Install {
                version: 2,
                swap: true,
                personalised: false
            }]
        );
        assert!(r.handle(g(1, 1.0), 0.0).is_empty());
        assert_eq!(r.global(), Some((2, &[2.0f32][..])));
        r.new_base_model();
        assert_eq!(r.global(), None);
        assert_eq!(r.open_round(), None);
    }

    /// Issue 17: a forged global of version u64::MAX pinned a device on it (no version is higher).
    /// The global the current announcement names, by version and digest, is taken again.
    #[test]
    fn a_forged_maximal_global_version_does_not_pin_the_device() {
        let mut r = Rounds::default();
        let forged = vec![9.0f32, 9.0];
        r.handle(
            Event::Global {
                version: u64::MAX,
                values: forged,
            },
            0.0,
        );
        assert_eq!(r.global().unwrap().0, u64::MAX);
        let g = vec![1.0f32, 2.0];
        r.handle(Event::Announced(announce(6, 5, &g, 100.0)), 0.0);
        let a = r.handle(
            Event::Global {
                version: 5,
                values: g.clone(),
            },
            0.0,
        );
        assert!(
            a.contains(&Action::Install {
                version: 5,
                swap: true,
                personalised: false
            }),
            "{a:?}"
        );
        assert_eq!(trains(&a), Some(6));
        // An older global the announcement does not name is still ignored.
        let a = r.handle(
            Event::Global {
                version: 4,
                values: vec![0.0, 0.0],
            },
            0.0,
        );
        assert!(a.is_empty(), "{a:?}");
        assert_eq!(r.global().unwrap().0, 5);
    }

    /// Issue 17: a new global was swapped into production with only a length check.
    #[test]
    fn globals_that_are_not_finite_or_far_from_the_current_are_refused() {
        let cur = [1.0f32, 2.0];
        assert!(check_global(&[1.1, 2.0], Some(&cur), 1.0).is_ok());
        assert!(check_global(&[f32::NAN, 2.0], Some(&cur), 1.0).is_err());
        assert!(check_global(&[1.0, f32::INFINITY], None, 1.0).is_err());
        assert!(check_global(&[100.0, 2.0], Some(&cur), 1.0).is_err());
        assert!(check_global(&[100.0, 2.0], None, 1.0).is_ok());
    }

    fn scored(version: u64, candidate: f64, live: f64) -> Event {
        Event::Scored {
            version,
            result: Ok(Scores {
                candidate: Some(candidate),
                live: Some(live),
                personalised: None,
            }),
        }
    }

    /// Issue 17: a new global went into production segmentation with no hold-out check. With a
    /// hold-out, it is scored first; one worse than the running decoder by more than the margin
    /// stays out, while the round still trains from it.
    #[test]
    fn a_global_worse_on_the_hold_out_is_kept_out_of_production_but_trained_from() {
        let base = vec![0.0f32, 0.0];
        let bad = vec![5.0f32, 5.0];
        let mut r = Rounds::default();
        r.start_session(0, &base, Some(0.02));
        r.handle(Event::Announced(announce(1, 1, &bad, 100.0)), 0.0);
        let a = r.handle(
            Event::Global {
                version: 1,
                values: bad.clone(),
            },
            0.0,
        );
        assert_eq!(a[0], Action::Score { version: 1 }, "{a:?}");
        assert!(
            !a.iter().any(|a| matches!(a, Action::Install { .. })),
            "not live before it is scored: {a:?}"
        );
        assert_eq!(trains(&a), Some(1), "training starts from it at once");
        assert_eq!(r.global(), Some((1, &bad[..])));
        // Asked once, even as ticks go by.
        assert!(r.handle(Event::Tick, 1.0).is_empty());
        // Worse by 0.1 IoU: kept out, the base decoder stays live.
        let a = r.handle(scored(1, 0.60, 0.70), 1.0);
        assert_eq!(
            a,
            vec![Action::KeepLive {
                version: 1,
                live_version: 0,
                why: Refusal::Worse {
                    candidate: 0.60,
                    live: 0.70,
                    margin: 0.02
                }
            }]
        );
        assert_eq!(r.live(), Some((0, &base[..])));
        assert!(r.handle(Event::Tick, 2.0).is_empty(), "decided once");
        // The next global, within the margin: swapped in.
        let good = vec![0.1f32, 0.0];
        let a = r.handle(
            Event::Global {
                version: 2,
                values: good.clone(),
            },
            2.0,
        );
        assert_eq!(a, vec![Action::Score { version: 2 }]);
        let a = r.handle(scored(2, 0.69, 0.70), 3.0);
        assert_eq!(
            a,
            vec![Action::Install {
                version: 2,
                swap: true,
                personalised: false
            }]
        );
        assert_eq!(r.live(), Some((2, &good[..])));
    }

    #[test]
    fn unscorable_or_non_finite_globals_stay_out_and_no_hold_out_lets_them_through() {
        let m = 0.02;
        let s = |c, l| {
            Ok(Scores {
                candidate: c,
                live: l,
                personalised: None,
            })
        };
        assert!(verdict(s(Some(0.5), Some(0.5)), m).is_ok());
        assert!(
            verdict(s(Some(0.49), Some(0.5)), m).is_ok(),
            "within the margin"
        );
        assert!(verdict(s(Some(0.47), Some(0.5)), m).is_err());
        assert!(verdict(s(Some(f64::NAN), Some(0.5)), m).is_err());
        assert!(verdict(s(None, None), m).is_ok(), "nothing to compare");
        assert!(matches!(
            verdict(Err("kernel".into()), m),
            Err(Refusal::NotScored(_))
        ));
        // No hold-out images: no gate, a global goes live when it arrives.
        let mut r = Rounds::default();
        r.start_session(0, &[0.0], None);
        let a = r.handle(
            Event::Global {
                version: 1,
                values: vec![1.0],
            },
            0.0,
        );
        assert_eq!(
            a,
            vec![Action::Install {
                version: 1,
                swap: true,
                personalised: false
            }]
        );
    }

    #[test]
    fn a_score_overtaken_by_a_newer_global_or_a_new_session_is_asked_again() {
        let mut r = Rounds::default();
        r.start_session(0, &[0.0], Some(0.02));
        let g = |v, x| Event::Global {
            version: v,
            values: vec![x],
        };
        assert_eq!(r.handle(g(1, 1.0), 0.0), vec![Action::Score { version: 1 }]);
        // Version 2 arrives while 1 is scored: nothing new is asked until 1 answers ...
        assert!(r.handle(g(2, 2.0), 0.0).is_empty());
        // ... and 1's answer decides nothing (it is no longer the global): 2 is scored.
        assert_eq!(
            r.handle(scored(1, 0.9, 0.1), 0.0),
            vec![Action::Score { version: 2 }]
        );
        assert_eq!(r.live().unwrap().0, 0);
        // The session ends before 2 is answered: the next session asks again.
        r.start_session(0, &[0.0], Some(0.02));
        assert_eq!(
            r.handle(Event::Tick, 1.0),
            vec![Action::Score { version: 2 }]
        );
        // A late answer for another version is ignored.
        assert_eq!(r.handle(scored(7, 0.0, 1.0), 1.0), vec![]);
        assert_eq!(
            r.handle(scored(2, 0.5, 0.5), 1.0),
            vec![Action::Install {
                version: 2,
                swap: true,
                personalised: false
            }]
        );
        // A new base model forgets what ran: its own decoder is live at the next session.
        r.new_base_model();
        r.start_session(0, &[3.0], Some(0.02));
        assert_eq!(r.live(), Some((0, &[3.0f32][..])));
    }

    fn scored_with(version: u64, candidate: f64, live: f64, tuned: (f32, f64)) -> Event {
        Event::Scored {
            version,
            result: Ok(Scores {
                candidate: Some(candidate),
                live: Some(live),
                personalised: Some(Personalised {
                    values: vec![tuned.0],
                    score: Some(tuned.1),
                }),
            }),
        }
    }

    /// Issue 15: what a lab deploys is the global fine-tuned on its own images, where its hold-out
    /// prefers it; the federation goes on training from the global itself.
    #[test]
    fn the_better_of_the_global_and_its_personalised_fine_tune_goes_live() {
        let mut r = Rounds::default();
        r.start_session(0, &[0.0], Some(0.02));
        let g = |v, x| Event::Global {
            version: v,
            values: vec![x],
        };
        assert_eq!(r.handle(g(1, 1.0), 0.0), vec![Action::Score { version: 1 }]);
        // The global alone is worse than the base decoder; its fine-tune is better than both.
        let a = r.handle(scored_with(1, 0.60, 0.70, (1.5, 0.75)), 1.0);
        assert_eq!(
            a,
            vec![Action::Install {
                version: 1,
                swap: true,
                personalised: true
            }]
        );
        assert_eq!(r.live(), Some((1, &[1.5f32][..])));
        assert!(r.live_is_personalised());
        assert_eq!(r.live_score(), Some(0.75));
        assert_eq!(
            r.global_score(),
            Some((1, 0.60)),
            "the global's own score, not the fine-tune's"
        );
        assert_eq!(
            r.global(),
            Some((1, &[1.0f32][..])),
            "training starts from the global"
        );
        // Next: the fine-tune scores below the global (within the margin of the live one): the
        // global itself goes live.
        assert_eq!(r.handle(g(2, 2.0), 2.0), vec![Action::Score { version: 2 }]);
        let a = r.handle(scored_with(2, 0.74, 0.75, (2.5, 0.70)), 3.0);
        assert_eq!(
            a,
            vec![Action::Install {
                version: 2,
                swap: true,
                personalised: false
            }]
        );
        assert_eq!(r.live(), Some((2, &[2.0f32][..])));
        assert!(!r.live_is_personalised());
        assert_eq!(r.live_score(), Some(0.74));
        // Both worse than the live decoder by more than the margin: kept out, the refusal names
        // the better of the two.
        assert_eq!(r.handle(g(3, 3.0), 4.0), vec![Action::Score { version: 3 }]);
        let a = r.handle(scored_with(3, 0.50, 0.74, (3.5, 0.60)), 5.0);
        assert_eq!(r.global_score(), Some((3, 0.50)), "kept out, still scored");
        assert_eq!(
            a,
            vec![Action::KeepLive {
                version: 3,
                live_version: 2,
                why: Refusal::Worse {
                    candidate: 0.60,
                    live: 0.74,
                    margin: 0.02
                }
            }]
        );
        assert_eq!(r.live(), Some((2, &[2.0f32][..])));
        assert_eq!(
            r.live_score(),
            Some(0.74),
            "as scored again beside global 3"
        );
    }

    #[test]
    fn a_fine_tune_without_a_finite_score_is_never_preferred() {
        let s = |c: Option<f64>, p: Option<f64>| Scores {
            candidate: c,
            live: Some(0.5),
            personalised: Some(Personalised {
                values: vec![0.0],
                score: p,
            }),
        };
        assert!(s(Some(0.5), Some(0.6)).prefers_personalised());
        assert!(
            !s(Some(0.5), Some(0.5)).prefers_personalised(),
            "ties keep the global"
        );
        assert!(!s(Some(0.5), None).prefers_personalised());
        assert!(!s(Some(0.5), Some(f64::NAN)).prefers_personalised());
        assert!(s(Some(f64::NAN), Some(0.1)).prefers_personalised());
        assert!(s(None, Some(0.1)).prefers_personalised());
        let none = Scores {
            personalised: None,
            ..s(Some(0.1), None)
        };
        assert!(!none.prefers_personalised());
    }
}
