//! The device's side of secure aggregation: a state machine driven by the server's messages.

use super::*;

pub(super) enum ClientState {
    Idle,
    KeysSent {
        round: u64,
        config: SecAggConfig,
        cipher_sk: StaticSecret,
        mask_sk: StaticSecret,
    },
    SharesSent {
        round: u64,
        config: SecAggConfig,
        cipher_sk: StaticSecret,
        mask_sk: StaticSecret,
        roster: Vec<DeviceKeys>,
        self_seed: Zeroizing<[u8; 32]>,
        own: Box<(Share, Share)>,
    },
    MaskedSent {
        round: u64,
        u2: BTreeSet<String>,
        /// The shares this device holds: owner → (mask key share, self seed share).
        held: BTreeMap<String, (Share, Share)>,
    },
    Done,
}

/// One device's side of a round. Feed it every [`ServerMessage`] addressed to it; it answers with
/// the next [`ClientMessage`].
pub struct SecAggClient {
    device: String,
    input: Vec<f32>,
    codes: Vec<i8>,
    rng: ChaCha20Rng,
    state: ClientState,
    trust: Option<Trust>,
}

impl std::fmt::Debug for SecAggClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never prints keys, seeds or the input.
        f.debug_struct("SecAggClient")
            .field("device", &self.device)
            .field("len", &self.input.len())
            .finish()
    }
}

pub(super) fn random_key(rng: &mut ChaCha20Rng) -> StaticSecret {
    let mut b = Zeroizing::new([0u8; 32]);
    rng.fill_bytes(b.as_mut());
    StaticSecret::from(*b)
}

impl SecAggClient {
    /// A device with its update for this round; keys and seeds come from a ChaCha20 CSPRNG seeded by
    /// the operating system.
    pub fn new(device: &str, input: Vec<f32>) -> Self {
        Self::with_rng(device, input, ChaCha20Rng::from_os_rng())
    }

    /// The same with a given generator (reproducible simulations; never in production).
    pub fn with_rng(device: &str, input: Vec<f32>, rng: ChaCha20Rng) -> Self {
        Self {
            device: device.to_owned(),
            input,
            codes: Vec::new(),
            rng,
            state: ClientState::Idle,
            trust: None,
        }
    }

    /// Signs this device's round keys and verifies the roster's, and refuses a threshold below
    /// `trust.min_threshold` (what the agent runs).
    pub fn with_trust(mut self, trust: Trust) -> Self {
        self.trust = Some(trust);
        self
    }

    pub fn device(&self) -> &str {
        &self.device
    }

    /// The int8 codes this device masked (its own data, kept for checks; never sent in the clear).
    pub fn codes(&self) -> &[i8] {
        &self.codes
    }

    /// Takes one server message; returns the answer to send (none once the round is done).
    pub fn handle(&mut self, msg: ServerMessage) -> Result<Option<ClientMessage>, SecAggError> {
        let state = std::mem::replace(&mut self.state, ClientState::Idle);
        let phase_err = |expected: &'static str| SecAggError::Phase {
            device: self.device.clone(),
            expected,
            got: msg.name(),
        };
        let check_round = |expected: u64| {
            if msg.round() == expected {
                Ok(())
            } else {
                Err(SecAggError::Round {
                    device: self.device.clone(),
                    expected,
                    found: msg.round(),
                })
            }
        };
        match (state, &msg) {
            // A new Start restarts the device whatever it was doing (a new round).
            (_, ServerMessage::Start { round, config }) => self.on_start(*round, config.clone()),
            (
                ClientState::KeysSent {
                    round,
                    config,
                    cipher_sk,
                    mask_sk,
                },
                ServerMessage::Roster { keys, .. },
            ) => {
                check_round(round)?;
                self.on_roster(round, config, cipher_sk, mask_sk, keys)
            }
            (
                ClientState::SharesSent {
                    round,
                    config,
                    cipher_sk,
                    mask_sk,
                    roster,
                    self_seed,
                    own,
                },
                ServerMessage::Shares { shares, .. },
            ) => {
                check_round(round)?;
                self.on_shares(
                    round, config, cipher_sk, mask_sk, roster, self_seed, *own, shares,
                )
            }
            (
                ClientState::MaskedSent { round, u2, held },
                ServerMessage::Survivors { survivors, .. },
            ) => {
                check_round(round)?;
                self.on_survivors(round, u2, held, survivors)
            }
            (ClientState::Idle | ClientState::Done, _) => Err(phase_err("start")),
            (ClientState::KeysSent { .. }, _) => Err(phase_err("roster")),
            (ClientState::SharesSent { .. }, _) => Err(phase_err("shares")),
            (ClientState::MaskedSent { .. }, _) => Err(phase_err("survivors")),
        }
    }

    fn on_start(
        &mut self,
        round: u64,
        config: SecAggConfig,
    ) -> Result<Option<ClientMessage>, SecAggError> {
        if config.len != self.input.len() {
            return Err(invalid(
                &self.device,
                "config.len",
                format!(
                    "the round wants {} coordinates, this update has {}",
                    config.len,
                    self.input.len()
                ),
            ));
        }
        config.validate(config.threshold)?;
        if let Some(t) = &self.trust
            && config.threshold < t.min_threshold
        {
            return Err(SecAggError::ThresholdBelowMinimum {
                device: self.device.clone(),
                threshold: config.threshold,
                minimum: t.min_threshold,
            });
        }
        let cipher_sk = random_key(&mut self.rng);
        let mask_sk = random_key(&mut self.rng);
        let mut keys = DeviceKeys {
            device: self.device.clone(),
            cipher_pk: PublicKey::from(&cipher_sk).as_bytes().to_vec(),
            mask_pk: PublicKey::from(&mask_sk).as_bytes().to_vec(),
            signature: Vec::new(),
        };
        if let Some(t) = &self.trust {
            keys.signature = t
                .signing
                .sign(
                    crate::wire::signing::Purpose::SecAggKeys,
                    &keys_message(round, &keys.device, &keys.cipher_pk, &keys.mask_pk),
                )
                .to_vec();
        }
        self.state = ClientState::KeysSent {
            round,
            config,
            cipher_sk,
            mask_sk,
        };
        Ok(Some(ClientMessage::Keys { round, keys }))
    }

    fn on_roster(
        &mut self,
        round: u64,
        config: SecAggConfig,
        cipher_sk: StaticSecret,
        mask_sk: StaticSecret,
        keys: &[DeviceKeys],
    ) -> Result<Option<ClientMessage>, SecAggError> {
        let me = self.device.clone();
        config.validate(keys.len())?;
        if keys.len() < config.threshold {
            return Err(SecAggError::TooFew {
                step: "roster",
                have: keys.len(),
                need: config.threshold,
            });
        }
        if keys.windows(2).any(|w| w[0].device >= w[1].device) {
            return Err(invalid(
                &me,
                "roster",
                "not sorted by device, or a device twice",
            ));
        }
        let pos = keys
            .iter()
            .position(|k| k.device == me)
            .ok_or_else(|| invalid(&me, "roster", "this device is not in it"))?;
        if keys[pos].cipher_pk != PublicKey::from(&cipher_sk).as_bytes()
            || keys[pos].mask_pk != PublicKey::from(&mask_sk).as_bytes()
        {
            return Err(invalid(&me, "roster", "lists other keys for this device"));
        }
        // Every member's keys signed by its enrolled device key, before anything is shared.
        if let Some(t) = &self.trust {
            for k in keys {
                t.verify(&me, round, k)?;
            }
        }
        let mut self_seed = Zeroizing::new([0u8; 32]);
        self.rng.fill_bytes(self_seed.as_mut());
        let n = keys.len();
        let t = config.threshold;
        let mask_bytes = Zeroizing::new(mask_sk.to_bytes());
        let mask_shares = shamir_split(&mask_bytes, n, t, &mut self.rng);
        let seed_shares = shamir_split(&self_seed, n, t, &mut self.rng);
        let mut sealed = Vec::with_capacity(n - 1);
        let mut own = None;
        for (i, (peer, (ms, ss))) in keys
            .iter()
            .zip(mask_shares.into_iter().zip(seed_shares))
            .enumerate()
        {
            let x = i as u64 + 1;
            let pair = SharePair {
                from: me.clone(),
                to: peer.device.clone(),
                mask_key: Share {
                    owner: me.clone(),
                    x,
                    y: ms,
                },
                self_seed: Share {
                    owner: me.clone(),
                    x,
                    y: ss,
                },
            };
            if i == pos {
                own = Some(Box::new((pair.mask_key, pair.self_seed)));
                continue;
            }
            let pk = public_key(&peer.device, "cipher_pk", &peer.cipher_pk)?;
            let shared = agree(&cipher_sk, &pk, &peer.device, "cipher_pk")?;
            let key = seal_key(&shared, round, &me, &peer.device);
            let plain = Zeroizing::new(to_cbor("sealed share", &pair)?);
            let ciphertext = ChaCha20Poly1305::new(key.as_ref().into())
                // Each key seals exactly one message (it depends on round, sender and recipient),
                // so the fixed nonce is never reused under one key.
                .encrypt(&Nonce::default(), plain.as_slice())
                .map_err(|_| invalid(&me, "shares", "ChaCha20-Poly1305 refused to seal"))?;
            sealed.push(Sealed {
                from: me.clone(),
                to: peer.device.clone(),
                ciphertext,
            });
        }
        let own = own.ok_or_else(|| invalid(&me, "roster", "this device is not in it"))?;
        let self_seed_digest = seed_digest(round, &me, &self_seed);
        self.state = ClientState::SharesSent {
            round,
            config,
            cipher_sk,
            mask_sk,
            roster: keys.to_vec(),
            self_seed,
            own,
        };
        Ok(Some(ClientMessage::Shares {
            round,
            shares: sealed,
            self_seed_digest,
        }))
    }

    #[allow(clippy::too_many_arguments)]
    fn on_shares(
        &mut self,
        round: u64,
        config: SecAggConfig,
        cipher_sk: StaticSecret,
        mask_sk: StaticSecret,
        roster: Vec<DeviceKeys>,
        self_seed: Zeroizing<[u8; 32]>,
        own: (Share, Share),
        shares: &[Sealed],
    ) -> Result<Option<ClientMessage>, SecAggError> {
        let me = self.device.clone();
        let by_device: BTreeMap<&str, &DeviceKeys> =
            roster.iter().map(|k| (k.device.as_str(), k)).collect();
        let mut held = BTreeMap::new();
        held.insert(me.clone(), own);
        for s in shares {
            if s.to != me {
                return Err(invalid(
                    &me,
                    "shares",
                    format!("a share for {} was relayed here", s.to),
                ));
            }
            let peer = by_device
                .get(s.from.as_str())
                .ok_or_else(|| SecAggError::Unknown(s.from.clone()))?;
            if held.contains_key(&s.from) {
                return Err(SecAggError::Duplicate(s.from.clone()));
            }
            let pk = public_key(&s.from, "cipher_pk", &peer.cipher_pk)?;
            let shared = agree(&cipher_sk, &pk, &s.from, "cipher_pk")?;
            let key = seal_key(&shared, round, &s.from, &me);
            let decrypt = || SecAggError::Decrypt {
                from: s.from.clone(),
                to: me.clone(),
            };
            let plain = Zeroizing::new(
                ChaCha20Poly1305::new(key.as_ref().into())
                    .decrypt(&Nonce::default(), s.ciphertext.as_slice())
                    .map_err(|_| decrypt())?,
            );
            let pair: SharePair = from_cbor("sealed share", &plain)?;
            if pair.from != s.from
                || pair.to != me
                || pair.mask_key.owner != s.from
                || pair.self_seed.owner != s.from
            {
                return Err(decrypt());
            }
            held.insert(s.from.clone(), (pair.mask_key, pair.self_seed));
        }
        if held.len() < config.threshold {
            return Err(SecAggError::TooFew {
                step: "shares",
                have: held.len(),
                need: config.threshold,
            });
        }
        let u2: BTreeSet<String> = held.keys().cloned().collect();
        let mut rng = ChaCha20Rng::from_seed(self.rng.random());
        if let Some(c) = config.norm_clip {
            crate::federated::dp::clip(&mut self.input, c)
                .map_err(|e| invalid(&me, "input", e.to_string()))?;
        }
        self.codes = quantise(&self.input, config.clip, &mut rng)?;
        let mut acc: Vec<u32> = self.codes.iter().map(|&c| i32::from(c) as u32).collect();
        apply_mask(&mut acc, &self_mask_seed(&self_seed, round, &me), true);
        for v in &u2 {
            if *v == me {
                continue;
            }
            let peer = by_device[v.as_str()];
            let pk = public_key(v, "mask_pk", &peer.mask_pk)?;
            let shared = agree(&mask_sk, &pk, v, "mask_pk")?;
            apply_mask(&mut acc, &mask_seed(&shared, round, &me, v), me < *v);
        }
        let mask = config.ring_mask();
        acc.iter_mut().for_each(|a| *a &= mask);
        let values = pack(&acc, config.ring_bits);
        self.state = ClientState::MaskedSent { round, u2, held };
        Ok(Some(ClientMessage::Masked { round, values }))
    }

    fn on_survivors(
        &mut self,
        round: u64,
        u2: BTreeSet<String>,
        held: BTreeMap<String, (Share, Share)>,
        survivors: &[String],
    ) -> Result<Option<ClientMessage>, SecAggError> {
        let me = self.device.clone();
        let u3: BTreeSet<&String> = survivors.iter().collect();
        if u3.len() != survivors.len() {
            return Err(invalid(&me, "survivors", "a device listed twice"));
        }
        if let Some(x) = u3.iter().find(|d| !u2.contains(**d)) {
            return Err(invalid(
                &me,
                "survivors",
                format!("{x} sent no shares, it cannot be a survivor"),
            ));
        }
        if !u3.contains(&me) {
            return Err(invalid(
                &me,
                "survivors",
                "this device's masked input is missing: abort",
            ));
        }
        // Each survivor's self seed, each vanished device's mask key: never both for one device,
        // which is what keeps a survivor's input hidden (its self mask or its pairwise masks stay).
        let mut self_seeds = Vec::new();
        let mut mask_keys = Vec::new();
        for (owner, (mk, ss)) in held {
            if u3.contains(&owner) {
                self_seeds.push(ss);
            } else {
                mask_keys.push(mk);
            }
        }
        self.state = ClientState::Done;
        Ok(Some(ClientMessage::Unmask {
            round,
            self_seeds,
            mask_keys,
        }))
    }
}
