//! The server's side of secure aggregation: rosters, relayed shares, masked inputs, unmasking.

use super::*;

/// The server's steps, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Keys,
    Shares,
    Masked,
    Unmask,
    Done,
}

impl Step {
    fn name(self) -> &'static str {
        match self {
            Step::Keys => "keys",
            Step::Shares => "shares",
            Step::Masked => "masked",
            Step::Unmask => "unmask",
            Step::Done => "nothing (the round is done)",
        }
    }
}

/// The outcome of a round: the sum of the survivors' quantised updates, nothing per device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Aggregate {
    pub round: u64,
    /// Devices whose input is in the sum (U3), sorted.
    pub contributors: Vec<String>,
    /// Devices in the roster whose input is not in the sum, sorted.
    pub dropped: Vec<String>,
    /// Sum of the contributors' int8 codes, per coordinate.
    pub codes: Vec<i32>,
    /// The value of one code.
    pub scale: f32,
}

impl Aggregate {
    /// The sum of the contributors' (quantised) updates.
    pub fn sum(&self) -> Vec<f32> {
        self.codes.iter().map(|&c| c as f32 * self.scale).collect()
    }
    /// Their unweighted mean.
    pub fn mean(&self) -> Vec<f32> {
        let n = self.contributors.len().max(1) as f32;
        self.codes
            .iter()
            .map(|&c| c as f32 * self.scale / n)
            .collect()
    }
}

/// The aggregator's side of a round. It holds public keys, sealed shares it cannot open, masked
/// inputs, and — after step 4 — the self seeds of survivors and the mask keys of vanished devices:
/// never a device's update and never both secrets of one device ([`SecAggServer::audit`]).
pub struct SecAggServer {
    round: u64,
    config: SecAggConfig,
    expected: BTreeSet<String>,
    step: Step,
    keys: BTreeMap<String, DeviceKeys>,
    sealed: BTreeMap<String, Vec<Sealed>>,
    digests: BTreeMap<String, Vec<u8>>,
    masked: BTreeMap<String, Vec<u32>>,
    unmask: BTreeMap<String, (Vec<Share>, Vec<Share>)>,
    /// Step 4's rebuilt secrets, kept for the audit: owner → which secret.
    rebuilt_seeds: BTreeSet<String>,
    rebuilt_mask_keys: BTreeSet<String>,
    result: Option<Aggregate>,
    /// Seconds spent in the server's own computation (rebuilding and unmasking).
    pub compute_seconds: f64,
}

impl std::fmt::Debug for SecAggServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecAggServer")
            .field("round", &self.round)
            .field("step", &self.step)
            .field("expected", &self.expected.len())
            .finish()
    }
}

/// What the server holds, for checking that it never held a device's update.
#[derive(Debug)]
pub struct Audit<'a> {
    /// The masked inputs received (ring elements), by device.
    pub masked: &'a BTreeMap<String, Vec<u32>>,
    /// Devices whose self seed the server rebuilt.
    pub self_seeds: &'a BTreeSet<String>,
    /// Devices whose mask secret key the server rebuilt.
    pub mask_keys: &'a BTreeSet<String>,
}

impl SecAggServer {
    /// A round among `devices` (at least `config.threshold` of them).
    pub fn new(round: u64, config: SecAggConfig, devices: &[String]) -> Result<Self, SecAggError> {
        let expected: BTreeSet<String> = devices.iter().cloned().collect();
        config.validate(expected.len())?;
        if expected.len() < config.threshold {
            return Err(SecAggError::TooFew {
                step: "roster",
                have: expected.len(),
                need: config.threshold,
            });
        }
        Ok(Self {
            round,
            config,
            expected,
            step: Step::Keys,
            keys: BTreeMap::new(),
            sealed: BTreeMap::new(),
            digests: BTreeMap::new(),
            masked: BTreeMap::new(),
            unmask: BTreeMap::new(),
            rebuilt_seeds: BTreeSet::new(),
            rebuilt_mask_keys: BTreeSet::new(),
            result: None,
            compute_seconds: 0.0,
        })
    }

    pub fn round(&self) -> u64 {
        self.round
    }
    pub fn config(&self) -> &SecAggConfig {
        &self.config
    }
    pub fn step(&self) -> Step {
        self.step
    }
    /// Devices the round started with (the expected set).
    pub fn expected(&self) -> usize {
        self.expected.len()
    }
    pub fn result(&self) -> Option<&Aggregate> {
        self.result.as_ref()
    }
    pub fn audit(&self) -> Audit<'_> {
        Audit {
            masked: &self.masked,
            self_seeds: &self.rebuilt_seeds,
            mask_keys: &self.rebuilt_mask_keys,
        }
    }

    /// The first messages: [`ServerMessage::Start`] to every expected device.
    pub fn start(&self) -> Vec<(String, ServerMessage)> {
        self.expected
            .iter()
            .map(|d| {
                (
                    d.clone(),
                    ServerMessage::Start {
                        round: self.round,
                        config: self.config.clone(),
                    },
                )
            })
            .collect()
    }

    /// Devices of the current step's set that have not answered yet.
    pub fn waiting_for(&self) -> Vec<String> {
        fn missing<'a, V>(
            members: impl Iterator<Item = &'a String>,
            answered: &BTreeMap<String, V>,
        ) -> Vec<String> {
            members
                .filter(|d| !answered.contains_key(*d))
                .cloned()
                .collect()
        }
        match self.step {
            Step::Keys => missing(self.expected.iter(), &self.keys),
            Step::Shares => missing(self.keys.keys(), &self.sealed),
            Step::Masked => missing(self.sealed.keys(), &self.masked),
            Step::Unmask => missing(self.masked.keys(), &self.unmask),
            Step::Done => Vec::new(),
        }
    }

    /// Takes a message from `device` (the sender as the broker authenticated it: the topic's device).
    pub fn receive(&mut self, device: &str, msg: ClientMessage) -> Result<(), SecAggError> {
        if msg.round() != self.round {
            return Err(SecAggError::Round {
                device: device.to_owned(),
                expected: self.round,
                found: msg.round(),
            });
        }
        let got = msg.name();
        let phase = |expected: Step| SecAggError::Phase {
            device: device.to_owned(),
            expected: expected.name(),
            got,
        };
        match (self.step, msg) {
            (Step::Keys, ClientMessage::Keys { keys, .. }) => {
                if !self.expected.contains(device) {
                    return Err(SecAggError::Unknown(device.to_owned()));
                }
                if keys.device != device {
                    return Err(invalid(
                        device,
                        "keys.device",
                        format!("says {}", keys.device),
                    ));
                }
                public_key(device, "cipher_pk", &keys.cipher_pk)?;
                public_key(device, "mask_pk", &keys.mask_pk)?;
                if keys.cipher_pk == keys.mask_pk {
                    return Err(invalid(
                        device,
                        "keys",
                        "the cipher and mask keys are the same",
                    ));
                }
                if self.keys.contains_key(device) {
                    return Err(SecAggError::Duplicate(device.to_owned()));
                }
                self.keys.insert(device.to_owned(), keys);
            }
            (
                Step::Shares,
                ClientMessage::Shares {
                    shares,
                    self_seed_digest,
                    ..
                },
            ) => {
                if !self.keys.contains_key(device) {
                    return Err(SecAggError::Unknown(device.to_owned()));
                }
                if self.sealed.contains_key(device) {
                    return Err(SecAggError::Duplicate(device.to_owned()));
                }
                let mut to: BTreeSet<&str> = BTreeSet::new();
                for s in &shares {
                    if s.from != device
                        || !self.keys.contains_key(&s.to)
                        || s.to == device
                        || !to.insert(&s.to)
                    {
                        return Err(invalid(
                            device,
                            "shares",
                            format!("a share from {} to {}", s.from, s.to),
                        ));
                    }
                }
                if to.len() != self.keys.len() - 1 {
                    return Err(invalid(
                        device,
                        "shares",
                        format!("{} shares for a roster of {}", to.len(), self.keys.len()),
                    ));
                }
                if self_seed_digest.len() != 32 {
                    return Err(invalid(
                        device,
                        "self_seed_digest",
                        format!("{} bytes", self_seed_digest.len()),
                    ));
                }
                self.digests.insert(device.to_owned(), self_seed_digest);
                self.sealed.insert(device.to_owned(), shares);
            }
            (Step::Masked, ClientMessage::Masked { values, .. }) => {
                if !self.sealed.contains_key(device) {
                    return Err(SecAggError::Unknown(device.to_owned()));
                }
                if self.masked.contains_key(device) {
                    return Err(SecAggError::Duplicate(device.to_owned()));
                }
                let v = unpack(&values, self.config.ring_bits, self.config.len)
                    .map_err(|e| invalid(device, "values", e.to_string()))?;
                self.masked.insert(device.to_owned(), v);
            }
            (
                Step::Unmask,
                ClientMessage::Unmask {
                    self_seeds,
                    mask_keys,
                    ..
                },
            ) => {
                if !self.masked.contains_key(device) {
                    return Err(SecAggError::Unknown(device.to_owned()));
                }
                if self.unmask.contains_key(device) {
                    return Err(SecAggError::Duplicate(device.to_owned()));
                }
                let x = self
                    .keys
                    .keys()
                    .position(|d| d == device)
                    .map(|p| p as u64 + 1);
                let want_seeds: BTreeSet<&String> = self.masked.keys().collect();
                let want_keys: BTreeSet<&String> = self
                    .sealed
                    .keys()
                    .filter(|d| !self.masked.contains_key(*d))
                    .collect();
                let seeds_of: BTreeSet<&String> = self_seeds.iter().map(|s| &s.owner).collect();
                let keys_of: BTreeSet<&String> = mask_keys.iter().map(|s| &s.owner).collect();
                if seeds_of != want_seeds
                    || keys_of != want_keys
                    || seeds_of.len() != self_seeds.len()
                    || keys_of.len() != mask_keys.len()
                {
                    return Err(invalid(
                        device,
                        "unmask",
                        "shares for other devices than U3 and U2 \\ U3",
                    ));
                }
                if self_seeds.iter().chain(&mask_keys).any(|s| Some(s.x) != x) {
                    return Err(invalid(
                        device,
                        "unmask",
                        "a share at another device's point",
                    ));
                }
                self.unmask
                    .insert(device.to_owned(), (self_seeds, mask_keys));
            }
            (Step::Done, _) => return Err(phase(Step::Done)),
            (step, _) => return Err(phase(step)),
        }
        Ok(())
    }

    /// Closes the current step (everyone answered, or its deadline passed) and returns the messages
    /// for the next; after step 4 it unmasks the sum ([`SecAggServer::result`]) and returns none.
    /// Fewer answers than the threshold is [`SecAggError::TooFew`]: the round is lost.
    pub fn advance(&mut self) -> Result<Vec<(String, ServerMessage)>, SecAggError> {
        let t = self.config.threshold;
        let need = |step: &'static str, have: usize| {
            if have < t {
                Err(SecAggError::TooFew {
                    step,
                    have,
                    need: t,
                })
            } else {
                Ok(())
            }
        };
        match self.step {
            Step::Keys => {
                need("keys", self.keys.len())?;
                let keys: Vec<DeviceKeys> = self.keys.values().cloned().collect();
                self.step = Step::Shares;
                Ok(self
                    .keys
                    .keys()
                    .map(|d| {
                        (
                            d.clone(),
                            ServerMessage::Roster {
                                round: self.round,
                                keys: keys.clone(),
                            },
                        )
                    })
                    .collect())
            }
            Step::Shares => {
                need("shares", self.sealed.len())?;
                let mut inbox: BTreeMap<String, Vec<Sealed>> = self
                    .sealed
                    .keys()
                    .map(|d| (d.clone(), Vec::new()))
                    .collect();
                for shares in self.sealed.values() {
                    for s in shares {
                        // Shares for devices that sent none themselves are not relayed (they left).
                        if let Some(b) = inbox.get_mut(&s.to) {
                            b.push(s.clone());
                        }
                    }
                }
                self.step = Step::Masked;
                Ok(inbox
                    .into_iter()
                    .map(|(d, shares)| {
                        (
                            d,
                            ServerMessage::Shares {
                                round: self.round,
                                shares,
                            },
                        )
                    })
                    .collect())
            }
            Step::Masked => {
                need("masked", self.masked.len())?;
                let survivors: Vec<String> = self.masked.keys().cloned().collect();
                self.step = Step::Unmask;
                Ok(survivors
                    .iter()
                    .map(|d| {
                        (
                            d.clone(),
                            ServerMessage::Survivors {
                                round: self.round,
                                survivors: survivors.clone(),
                            },
                        )
                    })
                    .collect())
            }
            Step::Unmask => {
                need("unmask", self.unmask.len())?;
                let started = Instant::now();
                let agg = self.unmask_sum()?;
                self.compute_seconds += started.elapsed().as_secs_f64();
                self.result = Some(agg);
                self.step = Step::Done;
                Ok(Vec::new())
            }
            Step::Done => Err(SecAggError::Phase {
                device: "server".into(),
                expected: "nothing",
                got: "advance",
            }),
        }
    }

    fn unmask_sum(&mut self) -> Result<Aggregate, SecAggError> {
        let t = self.config.threshold;
        let len = self.config.len;
        let round = self.round;
        // The first t responders; the Lagrange coefficients are the same for every owner.
        let responders: Vec<&String> = self.unmask.keys().take(t).collect();
        let index_of = |d: &String| {
            self.keys
                .keys()
                .position(|k| k == d)
                .map(|p| p as u64 + 1)
                .unwrap_or(0)
        };
        let xs: Vec<u64> = responders.iter().map(|d| index_of(d)).collect();
        let mut lagrange = LagrangeCache::default();
        let share_of = |owner: &String, seeds: bool| -> Vec<(u64, &[u64])> {
            responders
                .iter()
                .filter_map(|r| {
                    let (s, k) = &self.unmask[*r];
                    let list = if seeds { s } else { k };
                    list.iter()
                        .find(|x| &x.owner == owner)
                        .map(|x| (x.x, x.y.as_slice()))
                })
                .collect()
        };
        debug_assert!(xs.iter().all(|&x| x > 0));
        let mut acc = vec![0u32; len];
        for v in self.masked.values() {
            acc.iter_mut()
                .zip(v)
                .for_each(|(a, &b)| *a = a.wrapping_add(b));
        }
        let mut seeds_done = BTreeSet::new();
        for owner in self.masked.keys() {
            let shares = share_of(owner, true);
            let seed = Zeroizing::new(lagrange.join(&shares).map_err(|problem| {
                SecAggError::Reconstruction {
                    device: owner.clone(),
                    what: "self seed",
                    problem,
                }
            })?);
            if seed_digest(round, owner, &seed) != self.digests[owner] {
                return Err(SecAggError::Reconstruction {
                    device: owner.clone(),
                    what: "self seed",
                    problem: "does not match the digest it sent in step 2 (bad shares)".into(),
                });
            }
            apply_mask(&mut acc, &self_mask_seed(&seed, round, owner), false);
            seeds_done.insert(owner.clone());
        }
        let mut keys_done = BTreeSet::new();
        let vanished: Vec<String> = self
            .sealed
            .keys()
            .filter(|d| !self.masked.contains_key(*d))
            .cloned()
            .collect();
        for u in &vanished {
            let shares = share_of(u, false);
            let sk_bytes = Zeroizing::new(lagrange.join(&shares).map_err(|problem| {
                SecAggError::Reconstruction {
                    device: u.clone(),
                    what: "mask key",
                    problem,
                }
            })?);
            let sk = StaticSecret::from(*sk_bytes);
            if PublicKey::from(&sk).as_bytes() != self.keys[u].mask_pk.as_slice() {
                return Err(SecAggError::Reconstruction {
                    device: u.clone(),
                    what: "mask key",
                    problem: "does not give the public key it advertised (bad shares)".into(),
                });
            }
            for v in self.masked.keys() {
                let pk = public_key(v, "mask_pk", &self.keys[v].mask_pk)?;
                let shared = agree(&sk, &pk, v, "mask_pk")?;
                // v added +PRG when v < u, −PRG otherwise: take it back.
                apply_mask(&mut acc, &mask_seed(&shared, round, v, u), v >= u);
            }
            keys_done.insert(u.clone());
        }
        self.rebuilt_seeds = seeds_done;
        self.rebuilt_mask_keys = keys_done;
        let bits = self.config.ring_bits;
        let mask = self.config.ring_mask();
        let codes: Vec<i32> = acc
            .into_iter()
            .map(|a| {
                let a = a & mask;
                // Two's complement in b bits.
                if bits < 32 && a >= 1 << (bits - 1) {
                    a as i64 - (1i64 << bits)
                } else {
                    i64::from(a as i32)
                }
            } as i32)
            .collect();
        Ok(Aggregate {
            round,
            contributors: self.masked.keys().cloned().collect(),
            dropped: self
                .expected
                .iter()
                .filter(|d| !self.masked.contains_key(*d))
                .cloned()
                .collect(),
            codes,
            scale: self.config.scale(),
        })
    }
}
