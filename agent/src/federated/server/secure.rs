//! The aggregator's secure round: [`SecAggServer`] with the round's clock. A pure state machine —
//! client messages and clock ticks in ([`SecureEvent`]), messages to send and the outcome out
//! ([`SecureAction`]) — driven by the aggregator's I/O loop (`aggregator.rs`).
//!
//! The keys step is the training step: the devices answer the round's start with their keys once
//! their update is ready, so it closes like a plain round, at the quorum or the round's deadline
//! (devices without keys by then are stragglers). Every later step closes when each device of it has
//! answered or `step_timeout_s` after it opened (devices silent by then have dropped out, which the
//! protocol recovers from while at least `threshold` remain). Fewer than the threshold at any step:
//! the round fails with the reason, and nothing of it is merged.

use crate::federated::secagg::{
    Aggregate, ClientMessage, SecAggConfig, SecAggError, SecAggServer, ServerMessage, Step,
    support_indices,
};

/// The mean of a round's sum as a whole update of `dense` coordinates: as it is, or, in a sparse
/// round, put back on the round's support with zeros elsewhere. Errors name the mismatch.
pub fn merged_mean(
    config: &SecAggConfig,
    agg: &Aggregate,
    dense: usize,
) -> Result<Vec<f32>, String> {
    let mean = agg.mean();
    let merged = match config.support {
        None => mean,
        Some(s) => {
            if s.dense != dense {
                return Err(format!(
                    "the support is over {} coordinates, the decoder has {dense}",
                    s.dense
                ));
            }
            let idx = support_indices(s.seed, s.dense, config.len).map_err(|e| e.to_string())?;
            if idx.len() != mean.len() {
                return Err(format!(
                    "{} values for {} coordinates",
                    mean.len(),
                    idx.len()
                ));
            }
            let mut out = vec![0.0f32; dense];
            for (&i, v) in idx.iter().zip(mean) {
                out[i] = v;
            }
            out
        }
    };
    if merged.len() != dense {
        return Err(format!(
            "the sum has {} coordinates, the decoder {dense}",
            merged.len()
        ));
    }
    Ok(merged)
}

/// What the I/O loop feeds in.
#[derive(Debug)]
pub enum SecureEvent {
    /// A whole message from `device` (the topic's device: the broker let only its certificate write
    /// there).
    Message { device: String, msg: ClientMessage },
    /// The clock.
    Tick,
}

/// What the I/O loop must do.
#[derive(Debug, PartialEq)]
pub enum SecureAction {
    /// Publish `msg` on `secagg/<to>`; `retain` for the start (a device that connects late gets it).
    Send {
        to: String,
        msg: ServerMessage,
        retain: bool,
    },
    /// A message not taken (logged and counted as a rejection; the round goes on).
    Refused { device: String, reason: String },
    /// The round's sum: merge it.
    Finished(Aggregate),
    /// The round cannot finish (too few devices at some step, a reconstruction failed).
    Failed(String),
}

/// One secure round: the protocol's server and the deadlines of its steps.
#[derive(Debug)]
pub struct SecureRound {
    server: SecAggServer,
    /// Keys that close the first step early.
    quorum: usize,
    /// The round's deadline (unix seconds): the first step's.
    round_deadline: f64,
    step_timeout: f64,
    step_deadline: f64,
    over: bool,
}

impl SecureRound {
    /// Starts round `round` among `devices`; returns the start messages.
    pub fn start(
        round: u64,
        config: SecAggConfig,
        devices: &[String],
        quorum: usize,
        round_deadline: f64,
        step_timeout: f64,
    ) -> Result<(Self, Vec<SecureAction>), SecAggError> {
        let server = SecAggServer::new(round, config, devices)?;
        let out = server
            .start()
            .into_iter()
            .map(|(to, msg)| SecureAction::Send {
                to,
                msg,
                retain: true,
            })
            .collect();
        let me = Self {
            quorum: quorum.clamp(server.config().threshold, server.expected()),
            server,
            round_deadline,
            step_timeout,
            step_deadline: round_deadline,
            over: false,
        };
        Ok((me, out))
    }

    pub fn step(&self) -> Step {
        self.server.step()
    }

    pub fn config(&self) -> &SecAggConfig {
        self.server.config()
    }

    /// Whether the round has finished or failed (no further event changes anything).
    pub fn is_over(&self) -> bool {
        self.over
    }

    /// The server, for audits (what it holds: masked vectors, rebuilt secrets).
    pub fn server(&self) -> &SecAggServer {
        &self.server
    }

    /// Takes one event at time `now` (unix seconds).
    pub fn handle(&mut self, event: SecureEvent, now: f64) -> Vec<SecureAction> {
        let mut out = Vec::new();
        if self.over {
            if let SecureEvent::Message { device, .. } = event {
                out.push(SecureAction::Refused {
                    device,
                    reason: "the secure round is over".into(),
                });
            }
            return out;
        }
        if let SecureEvent::Message { device, msg } = event
            && let Err(e) = self.server.receive(&device, msg)
        {
            out.push(SecureAction::Refused {
                device,
                reason: e.to_string(),
            });
        }
        // Close as many steps as are due (a step whose every device already answered closes at
        // once; the next then waits).
        while !self.over && self.due(now) {
            match self.server.advance() {
                Ok(sends) => {
                    self.step_deadline = now + self.step_timeout;
                    out.extend(sends.into_iter().map(|(to, msg)| SecureAction::Send {
                        to,
                        msg,
                        retain: false,
                    }));
                    if self.server.step() == Step::Done {
                        self.over = true;
                        match self.server.result() {
                            Some(a) => out.push(SecureAction::Finished(a.clone())),
                            None => out.push(SecureAction::Failed(
                                "the protocol finished without a sum".into(),
                            )),
                        }
                    }
                }
                Err(e) => {
                    self.over = true;
                    out.push(SecureAction::Failed(e.to_string()));
                }
            }
            // After a step closed, the next one waits for its answers (sends were just queued).
            if !out.iter().any(|a| matches!(a, SecureAction::Send { .. })) {
                break;
            }
            if !self.server.waiting_for().is_empty() {
                break;
            }
        }
        out
    }

    fn due(&self, now: f64) -> bool {
        let waiting = self.server.waiting_for().len();
        match self.server.step() {
            Step::Keys => {
                let have = self.server.expected() - waiting;
                waiting == 0 || have >= self.quorum || now >= self.round_deadline
            }
            Step::Done => false,
            _ => waiting == 0 || now >= self.step_deadline,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::federated::secagg::SecAggClient;
    use rand::SeedableRng;

    fn clients(n: usize, len: usize) -> Vec<SecAggClient> {
        (0..n)
            .map(|i| {
                let v: Vec<f32> = (0..len).map(|j| ((i * 7 + j) % 13) as f32 * 1e-3).collect();
                SecAggClient::with_rng(
                    &format!("lab-{i}"),
                    v,
                    rand_chacha::ChaCha20Rng::seed_from_u64(i as u64),
                )
            })
            .collect()
    }

    /// Delivers `Send`s to the clients except `gone`, feeding their answers back; returns the
    /// other actions.
    fn pump(
        round: &mut SecureRound,
        clients: &mut [SecAggClient],
        mut actions: Vec<SecureAction>,
        gone: &[&str],
        now: f64,
    ) -> Vec<SecureAction> {
        let mut rest = Vec::new();
        while !actions.is_empty() {
            let mut next = Vec::new();
            for a in actions {
                match a {
                    SecureAction::Send { to, msg, .. } => {
                        if gone.contains(&to.as_str()) {
                            continue;
                        }
                        let c = clients.iter_mut().find(|c| c.device() == to).unwrap();
                        if let Some(answer) = c.handle(msg).unwrap() {
                            next.extend(round.handle(
                                SecureEvent::Message {
                                    device: to,
                                    msg: answer,
                                },
                                now,
                            ));
                        }
                    }
                    other => rest.push(other),
                }
            }
            actions = next;
        }
        rest
    }

    #[test]
    fn steps_close_when_everyone_answered_and_the_sum_comes_out() {
        let mut c = clients(4, 30);
        let names: Vec<String> = c.iter().map(|c| c.device().to_owned()).collect();
        let (mut r, out) =
            SecureRound::start(1, SecAggConfig::new(4, 30, 0.05), &names, 4, 100.0, 10.0).unwrap();
        let rest = pump(&mut r, &mut c, out, &[], 0.0);
        let [SecureAction::Finished(a)] = &rest[..] else {
            panic!("{rest:?}")
        };
        assert_eq!(a.contributors, names);
        let want: Vec<i32> = (0..30)
            .map(|j| c.iter().map(|c| i32::from(c.codes()[j])).sum())
            .collect();
        assert_eq!(a.codes, want);
        assert!(r.is_over());
    }

    #[test]
    fn a_device_silent_after_its_keys_drops_out_at_the_step_timeout() {
        let mut c = clients(5, 40);
        let names: Vec<String> = c.iter().map(|c| c.device().to_owned()).collect();
        let (mut r, out) =
            SecureRound::start(2, SecAggConfig::new(5, 40, 0.05), &names, 5, 100.0, 10.0).unwrap();
        // Everyone sends keys; lab-4 then vanishes: the shares step waits for it...
        let mut actions = Vec::new();
        for a in out {
            let SecureAction::Send { to, msg, .. } = a else {
                unreachable!()
            };
            let answer = c
                .iter_mut()
                .find(|c| c.device() == to)
                .unwrap()
                .handle(msg)
                .unwrap()
                .unwrap();
            actions.extend(r.handle(
                SecureEvent::Message {
                    device: to,
                    msg: answer,
                },
                1.0,
            ));
        }
        let rest = pump(&mut r, &mut c, actions, &["lab-4"], 2.0);
        assert!(rest.is_empty(), "{rest:?}");
        assert_eq!(r.step(), Step::Shares);
        assert!(r.handle(SecureEvent::Tick, 5.0).is_empty(), "not yet due");
        // ...until its timeout; then the others finish without it.
        let out = r.handle(SecureEvent::Tick, 12.5);
        let rest = pump(&mut r, &mut c, out, &["lab-4"], 13.0);
        let [SecureAction::Finished(a)] = &rest[..] else {
            panic!("{rest:?}")
        };
        assert_eq!(a.dropped, vec!["lab-4"]);
        let want: Vec<i32> = (0..40)
            .map(|j| c[..4].iter().map(|c| i32::from(c.codes()[j])).sum())
            .collect();
        assert_eq!(a.codes, want);
    }

    #[test]
    fn a_sparse_rounds_mean_goes_back_to_its_support() {
        use crate::federated::secagg::Support;
        let mut config = SecAggConfig::new(2, 3, 0.05);
        config.support = Some(Support { seed: 4, dense: 8 });
        let agg = Aggregate {
            round: 1,
            contributors: vec!["a".into(), "b".into()],
            dropped: vec![],
            codes: vec![2, -4, 6],
            scale: 0.5,
        };
        let m = merged_mean(&config, &agg, 8).unwrap();
        let idx = support_indices(4, 8, 3).unwrap();
        for (i, v) in m.iter().enumerate() {
            let want = idx
                .iter()
                .position(|&j| j == i)
                .map_or(0.0, |p| agg.mean()[p]);
            assert_eq!(*v, want, "coordinate {i}");
        }
        assert_eq!(m.iter().filter(|v| **v != 0.0).count(), 3);
        assert!(merged_mean(&config, &agg, 9).is_err());
        config.support = None;
        assert!(
            merged_mean(&config, &agg, 8).is_err(),
            "3 values are no update of 8"
        );
        assert_eq!(merged_mean(&config, &agg, 3).unwrap(), agg.mean());
    }

    #[test]
    fn the_keys_step_closes_at_the_quorum_or_deadline_and_too_few_fail_the_round() {
        let mut c = clients(4, 10);
        let names: Vec<String> = c.iter().map(|c| c.device().to_owned()).collect();
        let (mut r, out) =
            SecureRound::start(3, SecAggConfig::new(4, 10, 0.05), &names, 3, 50.0, 10.0).unwrap();
        // Only lab-0 answers before the deadline: threshold 3 not reached, the round fails.
        let SecureAction::Send { to, msg, .. } = &out[0] else {
            unreachable!()
        };
        let answer = c[0].handle(msg.clone()).unwrap().unwrap();
        let acts = r.handle(
            SecureEvent::Message {
                device: to.clone(),
                msg: answer,
            },
            1.0,
        );
        assert!(acts.is_empty(), "{acts:?}");
        let acts = r.handle(SecureEvent::Tick, 51.0);
        assert!(
            matches!(&acts[..], [SecureAction::Failed(why)] if why.contains("threshold")),
            "{acts:?}"
        );
        // A message after the end is refused, not a panic.
        let late = r.handle(
            SecureEvent::Message {
                device: "lab-1".into(),
                msg: ClientMessage::Masked {
                    round: 3,
                    values: vec![],
                },
            },
            52.0,
        );
        assert!(matches!(&late[..], [SecureAction::Refused { .. }]));
    }
}
