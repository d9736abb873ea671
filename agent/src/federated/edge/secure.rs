//! The lab's side of a secure round (`[federation.secure_aggregation]`, docs/privacy.md).
//!
//! [`SecureParticipant`] is a pure state machine between the participant's I/O loop and the
//! protocol's client ([`SecAggClient`]): the round's finished update and the aggregator's messages
//! in, the answers to publish on `update/<device>` out. The aggregator's start for a round comes
//! (retained) when the round opens, the update when local training ends; whichever comes second
//! starts the device's part, so the keys step is the training step. The device signs its round keys
//! with its enrolled key and takes part only with enrolled, verified devices and a threshold at or
//! above its minimum ([`Trust`]).

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::federated::secagg::{
    ClientMessage, SecAggClient, SecAggConfig, ServerMessage, Trust, support_indices,
};
use crate::wire::signing::{PublicKey, SecretKey};

/// `[federation.secure_aggregation]` in agent.toml: present = this device takes part in rounds
/// only through secure aggregation (its update is never sent in the clear).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecureAggSection {
    /// This device's Ed25519 key (PKCS#8 PEM, `microfed fleet keygen`); its public half is enrolled
    /// with the fleet (every other device lists it under `enrolled`).
    pub device_key: PathBuf,
    /// The fleet's enrolled devices: device id → Ed25519 public key (64 hex digits). A roster with
    /// any other device, or keys not signed by these, is refused before anything is shared.
    pub enrolled: BTreeMap<String, String>,
    /// The lowest Shamir threshold this device accepts (default: a majority of `enrolled`). Fewer
    /// than the threshold colluding with the aggregator learn nothing of this device's update.
    #[serde(default)]
    pub min_threshold: Option<usize>,
}

impl SecureAggSection {
    /// Loads the key and parses the enrolled keys; the error names the field.
    pub fn trust(&self, device: &str) -> Result<Trust, String> {
        let signing = SecretKey::load(&self.device_key)
            .map_err(|e| format!("secure_aggregation.device_key: {e}"))?;
        let mut enrolled = BTreeMap::new();
        for (d, hex) in &self.enrolled {
            let k = PublicKey::parse(hex)
                .map_err(|e| format!("secure_aggregation.enrolled.{d}: {e}"))?;
            enrolled.insert(d.clone(), k);
        }
        match enrolled.get(device) {
            Some(k) if *k == signing.public() => {}
            Some(_) => {
                return Err(format!(
                    "secure_aggregation.enrolled.{device}: not the public half of device_key"
                ));
            }
            None => {
                return Err(format!(
                    "secure_aggregation.enrolled: this device ({device}) is not listed"
                ));
            }
        }
        let min_threshold = self
            .min_threshold
            .unwrap_or((enrolled.len() / 2 + 1).max(2));
        if min_threshold < 2 {
            return Err("secure_aggregation.min_threshold: at least 2".into());
        }
        Ok(Trust {
            signing: std::sync::Arc::new(signing),
            enrolled,
            min_threshold,
        })
    }
}

/// What the I/O loop must do.
#[derive(Debug)]
pub enum SecureOut {
    /// Publish on `update/<device>` for `round`.
    Send { round: u64, msg: ClientMessage },
    /// The masked update of `round` went out: `codes` (this device's own int8 codes over the whole
    /// update, zero off a sparse round's support; never sent in the clear) at `scale` per code.
    Masked {
        round: u64,
        codes: Vec<i8>,
        scale: f32,
    },
    /// This device does not take part in `round`, and why (logged and shown on the status board).
    Refused { round: u64, why: String },
}

/// This device's secure rounds.
#[derive(Debug)]
pub struct SecureParticipant {
    device: String,
    trust: Trust,
    /// The latest start received: its round and settings.
    start: Option<(u64, SecAggConfig)>,
    /// The latest finished update, by round.
    update: Option<(u64, Vec<f32>)>,
    /// The running protocol.
    client: Option<(u64, SecAggClient)>,
    /// Error feedback for sparse rounds: what earlier rounds' supports left out, added to the next
    /// update (this device's own, never sent as such).
    residual: Option<Vec<f32>>,
}

impl SecureParticipant {
    pub fn new(device: &str, trust: Trust) -> Self {
        Self {
            device: device.to_owned(),
            trust,
            start: None,
            update: None,
            client: None,
            residual: None,
        }
    }

    /// Local training of `round` produced `update` (local − global, checked).
    pub fn on_update(&mut self, round: u64, update: Vec<f32>) -> Vec<SecureOut> {
        self.update = Some((round, update));
        self.begin()
    }

    /// A message of the aggregator's (its signature already checked).
    pub fn on_message(&mut self, msg: ServerMessage) -> Vec<SecureOut> {
        let round = msg.round();
        if let ServerMessage::Start { config, .. } = &msg {
            if self.start.as_ref().is_some_and(|(r, _)| *r > round) {
                return Vec::new(); // an older round's start, retained or delayed
            }
            self.start = Some((round, config.clone()));
            return self.begin();
        }
        let Some((r, client)) = self.client.as_mut() else {
            return Vec::new(); // not taking part (refused, no update, or already finished)
        };
        if *r != round {
            return Vec::new();
        }
        match client.handle(msg) {
            Ok(Some(answer)) => {
                let mut out = Vec::new();
                if matches!(answer, ClientMessage::Masked { .. }) {
                    let config = self.start.as_ref().map(|(_, c)| c);
                    // Over the whole update: a sparse round's codes on their coordinates.
                    let codes = match config.and_then(|c| c.support.map(|s| (s, c.len))) {
                        Some((s, k)) => match support_indices(s.seed, s.dense, k) {
                            Ok(idx) => {
                                let mut dense = vec![0i8; s.dense];
                                for (&i, &c) in idx.iter().zip(client.codes()) {
                                    dense[i] = c;
                                }
                                dense
                            }
                            Err(_) => client.codes().to_vec(),
                        },
                        None => client.codes().to_vec(),
                    };
                    out.push(SecureOut::Masked {
                        round,
                        codes,
                        scale: config.map_or(0.0, |c| c.scale()),
                    });
                }
                let done = matches!(answer, ClientMessage::Unmask { .. });
                out.insert(0, SecureOut::Send { round, msg: answer });
                if done {
                    self.client = None;
                }
                out
            }
            Ok(None) => Vec::new(),
            Err(e) => {
                self.client = None;
                vec![SecureOut::Refused {
                    round,
                    why: e.to_string(),
                }]
            }
        }
    }

    /// Rounds up to `round` have closed: their start, update and protocol go.
    pub fn forget_up_to(&mut self, round: u64) {
        if self.update.as_ref().is_some_and(|(r, _)| *r <= round) {
            self.update = None;
        }
        if self.client.as_ref().is_some_and(|(r, _)| *r <= round) {
            self.client = None;
        }
    }

    /// What this round masks: the update plus the residual of earlier sparse rounds, whole or on
    /// the round's shared support (the rest becomes the new residual).
    fn input(&mut self, config: &SecAggConfig, update: Vec<f32>) -> Result<Vec<f32>, String> {
        let mut full = update;
        if let Some(r) = self.residual.take()
            && r.len() == full.len()
        {
            full.iter_mut().zip(&r).for_each(|(f, r)| *f += r);
        }
        let Some(support) = config.support else {
            return Ok(full);
        };
        if support.dense != full.len() {
            return Err(format!(
                "the round's support is over {} coordinates, this update has {}",
                support.dense,
                full.len()
            ));
        }
        let idx =
            support_indices(support.seed, support.dense, config.len).map_err(|e| e.to_string())?;
        let input: Vec<f32> = idx.iter().map(|&i| full[i]).collect();
        for &i in &idx {
            full[i] = 0.0;
        }
        self.residual = Some(full);
        Ok(input)
    }

    /// Starts the protocol when the start and the update of one round are both here.
    fn begin(&mut self) -> Vec<SecureOut> {
        let (Some((sr, config)), Some((ur, _))) = (&self.start, &self.update) else {
            return Vec::new();
        };
        if sr != ur || self.client.as_ref().is_some_and(|(r, _)| r == sr) {
            return Vec::new();
        }
        let (round, config) = (*sr, config.clone());
        let Some((_, update)) = self.update.take() else {
            return Vec::new();
        };
        let input = match self.input(&config, update) {
            Ok(v) => v,
            Err(why) => return vec![SecureOut::Refused { round, why }],
        };
        let mut client = SecAggClient::new(&self.device, input).with_trust(self.trust.clone());
        match client.handle(ServerMessage::Start { round, config }) {
            Ok(Some(msg)) => {
                self.client = Some((round, client));
                vec![SecureOut::Send { round, msg }]
            }
            Ok(None) => Vec::new(),
            Err(e) => vec![SecureOut::Refused {
                round,
                why: e.to_string(),
            }],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn participant(min: usize) -> SecureParticipant {
        let key = SecretKey::from_seed([3; 32]);
        let mut enrolled = BTreeMap::new();
        enrolled.insert("lab-1".to_owned(), key.public());
        enrolled.insert("lab-2".to_owned(), SecretKey::from_seed([4; 32]).public());
        SecureParticipant::new(
            "lab-1",
            Trust {
                signing: std::sync::Arc::new(key),
                enrolled,
                min_threshold: min,
            },
        )
    }

    #[test]
    fn keys_go_out_when_both_the_start_and_the_update_are_here_in_either_order() {
        let config = SecAggConfig::new(2, 3, 0.05);
        let mut p = participant(2);
        assert!(p.on_update(4, vec![0.01, 0.0, -0.01]).is_empty());
        let out = p.on_message(ServerMessage::Start {
            round: 4,
            config: config.clone(),
        });
        assert!(matches!(
            &out[..],
            [SecureOut::Send {
                round: 4,
                msg: ClientMessage::Keys { .. }
            }]
        ));
        let mut p = participant(2);
        assert!(
            p.on_message(ServerMessage::Start {
                round: 5,
                config: config.clone()
            })
            .is_empty()
        );
        // An update of another round does not start round 5.
        assert!(p.on_update(4, vec![0.0; 3]).is_empty());
        let out = p.on_update(5, vec![0.0; 3]);
        let [SecureOut::Send { msg, .. }] = &out[..] else {
            panic!("{out:?}")
        };
        let ClientMessage::Keys { keys, .. } = msg else {
            panic!("{msg:?}")
        };
        assert_eq!(keys.signature.len(), 64, "the round keys are signed");
    }

    #[test]
    fn a_sparse_round_masks_the_shared_support_and_keeps_the_rest_for_the_next() {
        use crate::federated::secagg::Support;
        let mut config = SecAggConfig::new(2, 4, 0.05);
        config.support = Some(Support { seed: 9, dense: 10 });
        let idx = support_indices(9, 10, 4).unwrap();
        let update: Vec<f32> = (0..10).map(|i| i as f32 * 1e-3).collect();
        let mut p = participant(2);
        let input = p.input(&config, update.clone()).unwrap();
        assert_eq!(input, idx.iter().map(|&i| update[i]).collect::<Vec<_>>());
        // The rest waits for the next round, added to its update.
        let input2 = p
            .input(&SecAggConfig::new(2, 10, 0.05), update.clone())
            .unwrap();
        for (i, v) in input2.iter().enumerate() {
            let want = if idx.contains(&i) {
                update[i]
            } else {
                2.0 * update[i]
            };
            assert!((v - want).abs() < 1e-9, "{i}: {v} vs {want}");
        }
        // The same indices everywhere, sorted and distinct; bad sizes are errors, not panics.
        assert_eq!(support_indices(9, 10, 4).unwrap(), idx);
        assert!(idx.windows(2).all(|w| w[0] < w[1]) && idx[3] < 10);
        assert!(support_indices(9, 10, 11).is_err());
        assert!(support_indices(9, usize::MAX, 1).is_err());
        config.support = Some(Support { seed: 9, dense: 11 });
        assert!(
            p.input(&config, update)
                .unwrap_err()
                .contains("11 coordinates")
        );
    }

    #[test]
    fn a_start_with_a_threshold_below_the_minimum_is_refused() {
        let mut config = SecAggConfig::new(2, 3, 0.05);
        config.threshold = 2;
        let mut p = participant(3);
        p.on_update(1, vec![0.0; 3]);
        let out = p.on_message(ServerMessage::Start { round: 1, config });
        let [SecureOut::Refused { why, .. }] = &out[..] else {
            panic!("{out:?}")
        };
        assert!(why.contains("below this device's minimum 3"), "{why}");
    }

    #[test]
    fn the_section_refuses_a_device_key_that_is_not_enrolled() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("device.key");
        SecretKey::from_seed([5; 32]).save(&path).unwrap();
        let mut s = SecureAggSection {
            device_key: path,
            enrolled: BTreeMap::from([(
                "lab-1".to_owned(),
                SecretKey::from_seed([6; 32]).public().to_hex(),
            )]),
            min_threshold: None,
        };
        let e = s.trust("lab-1").unwrap_err();
        assert!(e.contains("not the public half"), "{e}");
        s.enrolled.insert(
            "lab-1".into(),
            SecretKey::from_seed([5; 32]).public().to_hex(),
        );
        s.enrolled.insert(
            "lab-2".into(),
            SecretKey::from_seed([7; 32]).public().to_hex(),
        );
        let t = s.trust("lab-1").unwrap();
        assert_eq!(t.min_threshold, 2);
        assert!(s.trust("lab-3").unwrap_err().contains("not listed"));
    }
}
