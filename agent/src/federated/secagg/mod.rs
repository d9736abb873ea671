//! Secure aggregation: the aggregator learns the sum of a round's decoder updates, never one lab's.
//!
//! The protocol is the semi-honest variant of Bonawitz et al. (2017), "Practical Secure Aggregation
//! for Privacy-Preserving Machine Learning", written as two plain state machines that exchange serde
//! messages ([`ServerMessage`], [`ClientMessage`]); the transport (CBOR envelopes over MQTT, or a
//! function call in [`simulate`]) is the caller's. Four steps, each closed by the server when every
//! device has answered or its deadline has passed:
//!
//! 1. **Keys.** Each device makes two fresh x25519 key pairs for the round: a *cipher* pair (to encrypt
//!    what it relays through the server to another device) and a *mask* pair (for pairwise masks).
//!    The server broadcasts the roster U1 of devices and public keys.
//! 2. **Shares.** Each device draws a *self seed* `b_u` and splits both `b_u` and its mask secret key
//!    with Shamir's scheme over GF(2^61 − 1) into one share per roster member (threshold `t`), then
//!    seals each peer's pair of shares with ChaCha20-Poly1305 under a key derived (HKDF-SHA256) from
//!    the x25519 agreement of the two cipher keys. The server relays them; it cannot open them. U2 =
//!    devices whose shares came.
//! 3. **Masked input.** Each device quantises its update to int8 codes with the round's shared scale,
//!    lifts them into the ring Z_2^b, and adds `PRG(b_u)` plus, for each other member `v` of U2,
//!    `±PRG(s_uv)` where `s_uv` is the x25519 agreement of the mask keys of `u` and `v` (`+` when
//!    `u < v`, `−` otherwise): the pairwise masks cancel in the sum. The PRG is ChaCha20
//!    ([`rand_chacha::ChaCha20Rng`]) seeded through HKDF. U3 = devices whose masked input came.
//! 4. **Unmasking.** Given U3, each device sends its shares of `b_v` for every `v` in U3 and of the mask
//!    secret key of every `v` in U2 \ U3 (devices that vanished after step 2), never both for one `v`.
//!    From `t` shares each, the server rebuilds the self seeds of U3 (removes `PRG(b_v)`) and the mask
//!    keys of the vanished (removes the pairwise masks they left in the survivors' inputs). A device
//!    that vanishes after step 3 is still in the sum: its self seed comes from the others' shares.
//!
//! Why the ring is `2^b` with `b = bitlen(254 · n)`: the sum of `n` int8 codes lies in `[−127 n, 127 n]`,
//! which `b` bits hold without wrapping (decoded as two's complement), so the masked vector costs
//! `b / 8` bytes per coordinate (11 bits for 5 devices, 18 for 1,024) rather than 4.
//!
//! **Identity.** With a [`Trust`] (what the agent runs), each device signs its two public keys, the
//! round and its name with the Ed25519 device key enrolled with the fleet ([`keys_message`]), and
//! checks every roster entry against the enrolled keys before it seals a single share: a broker or
//! aggregator that substitutes a key (to open the shares sealed for it) or adds a device is refused,
//! as is a threshold below the device's configured minimum. Without a `Trust` ([`simulate`], the
//! studies) keys go unsigned.
//!
//! What the server can check: a rebuilt mask key must give the public key advertised in step 1, and a
//! rebuilt self seed must hash to the digest its owner sent in step 2; a mismatch is an error that
//! names the device. What it cannot stop: devices that lie about their input (that is what clipping
//! and robust aggregation are for) and a malicious server that lies about U3 to different devices
//! (Bonawitz's active-security version adds signatures and a consistency round; not done here).
//!
//! Map: [`SecAggConfig`], [`ring_bits_for`], messages ([`ServerMessage`], [`ClientMessage`],
//! [`DeviceKeys`], [`Sealed`], [`Share`]), [`SecAggClient`], [`SecAggServer`], [`Aggregate`], Shamir
//! ([`shamir_split`], [`shamir_join`]), ring packing ([`pack`], [`unpack`]), [`quantise`], and the
//! in-process [`simulate`] used for the measurements in docs/privacy-secagg-dp.md.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

use chacha20poly1305::aead::Aead;
use chacha20poly1305::{ChaCha20Poly1305, KeyInit, Nonce};
use hkdf::Hkdf;
use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use x25519_dalek::{PublicKey, StaticSecret};
use zeroize::Zeroizing;

use crate::wire::protocol::{from_cbor, to_cbor};

mod client;
mod ring;
mod server;
mod shamir;
mod sim;

pub use client::*;
pub use ring::*;
pub use server::*;
pub use shamir::*;
pub use sim::*;

/// The Shamir field: the Mersenne prime 2^61 − 1 (products fit in `u128`, reduction is cheap).
pub const PRIME: u64 = (1 << 61) - 1;
/// A 32-byte secret is shared as five field elements of at most 7 bytes (56 bits < 61).
pub(super) const CHUNK_BYTES: usize = 7;
pub(super) const SECRET_CHUNKS: usize = 32usize.div_ceil(CHUNK_BYTES);
/// Largest int8 code (symmetric, as in [`crate::federated::compress`]).
pub(super) const LEVELS: f32 = 127.0;
pub(super) const HKDF_SALT: &[u8] = b"microfed/secagg/v1";

/// Why a secure-aggregation step failed. Every variant names the device or field concerned.
#[derive(Debug, thiserror::Error)]
pub enum SecAggError {
    #[error("secure aggregation config: {field}: {problem}")]
    Config {
        field: &'static str,
        problem: String,
    },
    #[error("{device}: a {got} message while waiting for {expected}")]
    Phase {
        device: String,
        expected: &'static str,
        got: &'static str,
    },
    #[error("{device}: message for round {found}, this is round {expected}")]
    Round {
        device: String,
        expected: u64,
        found: u64,
    },
    #[error("{0}: not a member of this round")]
    Unknown(String),
    #[error("{0}: already answered this step")]
    Duplicate(String),
    #[error("{step}: only {have} devices answered, the threshold is {need}")]
    TooFew {
        step: &'static str,
        have: usize,
        need: usize,
    },
    #[error("{device}: {field}: {problem}")]
    Invalid {
        device: String,
        field: &'static str,
        problem: String,
    },
    #[error("share from {from} to {to} does not open (wrong key or altered in transit)")]
    Decrypt { from: String, to: String },
    #[error("rebuilding the {what} of {device}: {problem}")]
    Reconstruction {
        device: String,
        what: &'static str,
        problem: String,
    },
    #[error("masked input: {0}")]
    Ring(String),
    #[error(
        "{device}: the round's threshold {threshold} is below this device's minimum {minimum}: not taking part"
    )]
    ThresholdBelowMinimum {
        device: String,
        threshold: usize,
        minimum: usize,
    },
    #[error("{device}: the roster's keys of {member} cannot be verified: {problem}; not sharing")]
    Unverified {
        device: String,
        member: String,
        problem: String,
    },
    #[error(transparent)]
    Protocol(#[from] crate::wire::protocol::ProtocolError),
}

pub(super) fn invalid(
    device: &str,
    field: &'static str,
    problem: impl Into<String>,
) -> SecAggError {
    SecAggError::Invalid {
        device: device.to_owned(),
        field,
        problem: problem.into(),
    }
}

/// Settings of one secure-aggregation round, chosen by the server and sent in [`ServerMessage::Start`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecAggConfig {
    /// Shamir threshold `t`: shares needed to rebuild a secret, and the fewest devices any step may
    /// close with. Fewer than `t` colluding parties (server included) learn nothing about a secret.
    pub threshold: usize,
    /// Values are clamped to `[−clip, clip]` and quantised with the shared scale `clip / 127`.
    pub clip: f32,
    /// Ring width `b` (the masked vector lives in Z_2^b), in `9..=32`.
    pub ring_bits: u32,
    /// Coordinates per update.
    pub len: usize,
    /// DP: each device clips its update to this L2 norm before quantising (the sum's sensitivity,
    /// which the aggregator's noise is calibrated to). None: no clipping beyond `clip`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub norm_clip: Option<f32>,
    /// Sparse rounds: the `len` coordinates masked are the ones [`support_indices`] draws from
    /// `seed` out of `dense` (the same for every device, so the masks cancel on the same
    /// coordinates). None: `len` is the whole update.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub support: Option<Support>,
}

/// A round's shared support: which coordinates of a `dense`-coordinate update are sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Support {
    pub seed: u64,
    pub dense: usize,
}

/// Largest update a round may describe (a decoder of 16 classes has under a million coordinates).
pub const MAX_DENSE: usize = 1 << 26;

/// The `k` coordinates (sorted, distinct) of a `dense`-coordinate vector that a round with this
/// `seed` sends: a uniform sample, the same on every device and the aggregator.
pub fn support_indices(seed: u64, dense: usize, k: usize) -> Result<Vec<usize>, SecAggError> {
    if k == 0 || k > dense || dense > MAX_DENSE {
        return Err(SecAggError::Config {
            field: "support",
            problem: format!("{k} of {dense} coordinates (at most {MAX_DENSE})"),
        });
    }
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    let mut idx = rand::seq::index::sample(&mut rng, dense, k).into_vec();
    idx.sort_unstable();
    Ok(idx)
}

/// Smallest ring width that holds the sum of `devices` int8 codes: `bitlen(254 · devices)`, at least 9.
pub fn ring_bits_for(devices: usize) -> u32 {
    let span = 254u64.saturating_mul(devices.max(1) as u64);
    (64 - span.leading_zeros()).max(9)
}

impl SecAggConfig {
    /// A config for `devices` devices: threshold `⌊n/2⌋ + 1` (at least 2), the smallest ring.
    pub fn new(devices: usize, len: usize, clip: f32) -> Self {
        Self {
            threshold: (devices / 2 + 1).max(2),
            clip,
            ring_bits: ring_bits_for(devices),
            len,
            norm_clip: None,
            support: None,
        }
    }

    /// The value of one int8 code.
    pub fn scale(&self) -> f32 {
        self.clip / LEVELS
    }

    fn ring_mask(&self) -> u32 {
        if self.ring_bits >= 32 {
            u32::MAX
        } else {
            (1u32 << self.ring_bits) - 1
        }
    }

    /// Checks the fields for a roster of `devices`; the error names the field.
    pub fn validate(&self, devices: usize) -> Result<(), SecAggError> {
        let err = |field, problem: String| Err(SecAggError::Config { field, problem });
        if !(self.clip.is_finite() && self.clip > 0.0) {
            return err("clip", format!("{} is not a positive number", self.clip));
        }
        if !(9..=32).contains(&self.ring_bits) {
            return err("ring_bits", format!("{} is not in 9..=32", self.ring_bits));
        }
        if self.ring_bits < ring_bits_for(devices) {
            return err(
                "ring_bits",
                format!(
                    "{} bits cannot hold the sum of {devices} int8 codes (needs {})",
                    self.ring_bits,
                    ring_bits_for(devices)
                ),
            );
        }
        if self.threshold < 2 || self.threshold > devices.max(2) {
            return err(
                "threshold",
                format!("{} is not in 2..={devices}", self.threshold),
            );
        }
        if self.len == 0 {
            return err("len", "an update needs at least one coordinate".into());
        }
        if let Some(c) = self.norm_clip
            && !(c.is_finite() && c > 0.0)
        {
            return err("norm_clip", format!("{c} is not a positive number"));
        }
        if let Some(sp) = self.support
            && (sp.dense > MAX_DENSE || self.len > sp.dense)
        {
            return err(
                "support",
                format!(
                    "{} of {} coordinates (at most {MAX_DENSE})",
                    self.len, sp.dense
                ),
            );
        }
        Ok(())
    }
}

/// A device's public keys for one round.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceKeys {
    pub device: String,
    /// x25519 public key for sealing shares to this device.
    #[serde(with = "serde_bytes")]
    pub cipher_pk: Vec<u8>,
    /// x25519 public key for pairwise masks.
    #[serde(with = "serde_bytes")]
    pub mask_pk: Vec<u8>,
    /// Ed25519 signature of [`keys_message`] by the device's enrolled key (empty without a [`Trust`]).
    #[serde(with = "serde_bytes", default)]
    pub signature: Vec<u8>,
}

/// The bytes a device signs for its round keys: round, device and both public keys, each
/// length-prefixed (so no two different tuples give the same bytes).
pub fn keys_message(round: u64, device: &str, cipher_pk: &[u8], mask_pk: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(8 + 12 + device.len() + cipher_pk.len() + mask_pk.len());
    m.extend_from_slice(&round.to_le_bytes());
    for part in [device.as_bytes(), cipher_pk, mask_pk] {
        m.extend_from_slice(&(part.len() as u32).to_le_bytes());
        m.extend_from_slice(part);
    }
    m
}

/// What a device trusts in a round: its own enrolled signing key, the fleet's enrolled device keys
/// (the only devices it shares with), and the lowest threshold it accepts.
#[derive(Debug, Clone)]
pub struct Trust {
    pub signing: std::sync::Arc<crate::wire::signing::SecretKey>,
    pub enrolled: BTreeMap<String, crate::wire::signing::PublicKey>,
    pub min_threshold: usize,
}

impl Trust {
    /// Checks one roster entry: an enrolled device, its signature over this round's keys.
    pub fn verify(&self, me: &str, round: u64, k: &DeviceKeys) -> Result<(), SecAggError> {
        let unverified = |problem: String| SecAggError::Unverified {
            device: me.to_owned(),
            member: k.device.clone(),
            problem,
        };
        let key = self
            .enrolled
            .get(&k.device)
            .ok_or_else(|| unverified("not an enrolled device of this fleet".into()))?;
        key.verify(
            crate::wire::signing::Purpose::SecAggKeys,
            &keys_message(round, &k.device, &k.cipher_pk, &k.mask_pk),
            (!k.signature.is_empty()).then_some(k.signature.as_slice()),
        )
        .map_err(|e| unverified(e.to_string()))
    }
}

/// Shares sealed by `from` for `to`, relayed by the server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sealed {
    pub from: String,
    pub to: String,
    #[serde(with = "serde_bytes")]
    pub ciphertext: Vec<u8>,
}

/// One Shamir share of one device's 32-byte secret: the polynomial's values at `x` (one per chunk).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Share {
    /// Whose secret this is a share of.
    pub owner: String,
    /// Evaluation point (the holder's 1-based position in the roster).
    pub x: u64,
    pub y: Vec<u64>,
}

/// What a sealed share carries (the plaintext of [`Sealed::ciphertext`]).
#[derive(Serialize, Deserialize)]
pub(super) struct SharePair {
    from: String,
    to: String,
    mask_key: Share,
    self_seed: Share,
}

/// Server → device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ServerMessage {
    /// Step 1: a round starts; make keys.
    Start { round: u64, config: SecAggConfig },
    /// Step 2: the roster U1 and its public keys, sorted by device.
    Roster { round: u64, keys: Vec<DeviceKeys> },
    /// Step 3: the sealed shares addressed to this device (their senders, with it, are U2).
    Shares { round: u64, shares: Vec<Sealed> },
    /// Step 4: the devices whose masked input arrived (U3), sorted.
    Survivors { round: u64, survivors: Vec<String> },
}

/// Device → server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClientMessage {
    Keys {
        round: u64,
        keys: DeviceKeys,
    },
    Shares {
        round: u64,
        shares: Vec<Sealed>,
        /// sha256 of (round, device, self seed): lets the server check the seed it rebuilds.
        #[serde(with = "serde_bytes")]
        self_seed_digest: Vec<u8>,
    },
    Masked {
        round: u64,
        /// `len` ring elements of `ring_bits` bits, packed LSB first ([`pack`]).
        #[serde(with = "serde_bytes")]
        values: Vec<u8>,
    },
    Unmask {
        round: u64,
        /// Shares of the self seeds of U3.
        self_seeds: Vec<Share>,
        /// Shares of the mask keys of U2 \ U3.
        mask_keys: Vec<Share>,
    },
}

impl ServerMessage {
    pub fn name(&self) -> &'static str {
        match self {
            ServerMessage::Start { .. } => "start",
            ServerMessage::Roster { .. } => "roster",
            ServerMessage::Shares { .. } => "shares",
            ServerMessage::Survivors { .. } => "survivors",
        }
    }
    /// The round the message belongs to.
    pub fn round(&self) -> u64 {
        match self {
            ServerMessage::Start { round, .. }
            | ServerMessage::Roster { round, .. }
            | ServerMessage::Shares { round, .. }
            | ServerMessage::Survivors { round, .. } => *round,
        }
    }
}

impl ClientMessage {
    fn name(&self) -> &'static str {
        match self {
            ClientMessage::Keys { .. } => "keys",
            ClientMessage::Shares { .. } => "shares",
            ClientMessage::Masked { .. } => "masked",
            ClientMessage::Unmask { .. } => "unmask",
        }
    }
    fn round(&self) -> u64 {
        match self {
            ClientMessage::Keys { round, .. }
            | ClientMessage::Shares { round, .. }
            | ClientMessage::Masked { round, .. }
            | ClientMessage::Unmask { round, .. } => *round,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inputs(n: usize, len: usize, seed: u64) -> Vec<Vec<f32>> {
        let mut rng = ChaCha20Rng::seed_from_u64(seed);
        (0..n)
            .map(|_| (0..len).map(|_| rng.random_range(-0.01f32..0.01)).collect())
            .collect()
    }

    #[test]
    fn shamir_rebuilds_from_any_t_shares_and_not_from_fewer() {
        let mut rng = ChaCha20Rng::seed_from_u64(1);
        let mut secret = [0u8; 32];
        rng.fill_bytes(&mut secret);
        secret[31] = 0xff; // the short last chunk at its largest
        let shares = shamir_split(&secret, 7, 4, &mut rng);
        for pick in [[0usize, 1, 2, 3], [6, 2, 4, 0], [3, 4, 5, 6]] {
            let sel: Vec<(u64, &[u64])> = pick
                .iter()
                .map(|&i| (i as u64 + 1, shares[i].as_slice()))
                .collect();
            assert_eq!(shamir_join(&sel).unwrap(), secret);
        }
        // All seven agree too.
        let all: Vec<(u64, &[u64])> = shares
            .iter()
            .enumerate()
            .map(|(i, s)| (i as u64 + 1, s.as_slice()))
            .collect();
        assert_eq!(shamir_join(&all).unwrap(), secret);
        // Three shares of a degree-3 polynomial: not the secret (an error or other bytes).
        let few: Vec<(u64, &[u64])> = all[..3].to_vec();
        assert_ne!(shamir_join(&few).ok(), Some(secret));
        // Bad input is an error, not a panic.
        assert!(shamir_join(&[(1, &shares[0]), (1, &shares[0])]).is_err());
        assert!(shamir_join(&[(0, &shares[0])]).is_err());
        assert!(shamir_join(&[(1, &[1, 2][..])]).is_err());
        assert!(shamir_join(&[]).is_err());
    }

    #[test]
    fn field_arithmetic_by_hand() {
        assert_eq!(mul_mod(PRIME - 1, PRIME - 1), 1); // (−1)² = 1
        assert_eq!(mul_mod(1 << 60, 4), 2); // 2^62 = 2 · 2^61 ≡ 2
        assert_eq!(mul_mod(inv_mod(12345), 12345), 1);
        assert_eq!(sub_mod(3, 5), PRIME - 2);
    }

    #[test]
    fn ring_packing_round_trips_and_refuses_bad_lengths() {
        let mut rng = ChaCha20Rng::seed_from_u64(2);
        for bits in [9u32, 11, 16, 18, 31, 32] {
            let mask = if bits == 32 {
                u32::MAX
            } else {
                (1 << bits) - 1
            };
            let v: Vec<u32> = (0..101).map(|_| rng.next_u32() & mask).collect();
            let p = pack(&v, bits);
            assert_eq!(p.len(), (101 * bits as usize).div_ceil(8));
            assert_eq!(unpack(&p, bits, 101).unwrap(), v);
            assert!(unpack(&p[1..], bits, 101).is_err());
        }
        // 3 values of 11 bits = 33 bits: the last byte has 7 unused bits, which must be zero.
        let mut p = pack(&[1, 2, 3], 11);
        *p.last_mut().unwrap() |= 0x80;
        assert!(unpack(&p, 11, 3).is_err());
        assert_eq!(ring_bits_for(5), 11);
        assert_eq!(ring_bits_for(1024), 18);
        assert_eq!(ring_bits_for(1), 9);
    }

    #[test]
    fn stochastic_rounding_is_unbiased_and_clamped() {
        let mut rng = ChaCha20Rng::seed_from_u64(3);
        let x = vec![0.3f32 / 127.0; 20_000];
        let codes = quantise(&x, 1.0, &mut rng).unwrap();
        let mean = codes.iter().map(|&c| f64::from(c)).sum::<f64>() / codes.len() as f64;
        assert!((mean - 0.3).abs() < 0.02, "mean code {mean}");
        assert!(codes.iter().all(|&c| c == 0 || c == 1));
        assert_eq!(
            quantise(&[5.0, -5.0], 1.0, &mut rng).unwrap(),
            vec![127, -127]
        );
        assert!(quantise(&[f32::NAN], 1.0, &mut rng).is_err());
    }

    #[test]
    fn five_devices_sum_exactly_and_survive_two_kinds_of_dropout() {
        let x = inputs(5, 3000, 4);
        let plain: Vec<f32> = (0..3000).map(|j| x.iter().map(|v| v[j]).sum()).collect();
        let r = simulate(&x, 0.01, None, &Dropouts::default(), 9).unwrap();
        assert_eq!(r.aggregate.codes, r.expected_codes);
        assert_eq!(r.aggregate.contributors.len(), 5);
        let scale = r.aggregate.scale;
        for (a, p) in r.aggregate.sum().iter().zip(&plain) {
            // Each of 5 codes is within one step of its value.
            assert!((a - p).abs() <= 5.0 * scale * 1.0001, "{a} vs {p}");
        }
        // dev-00001 vanishes before its masked input (its pairwise masks are rebuilt away);
        // dev-00003 after it (its input stays in the sum, its self mask is rebuilt away).
        let drop = Dropouts {
            before_masked: vec![1],
            after_masked: vec![3],
        };
        let r = simulate(&x, 0.01, None, &drop, 9).unwrap();
        assert_eq!(
            r.aggregate.contributors,
            vec!["dev-00000", "dev-00002", "dev-00003", "dev-00004"]
        );
        assert_eq!(r.aggregate.dropped, vec!["dev-00001"]);
        assert_eq!(r.aggregate.codes, r.expected_codes);
        // Too many gone for t = 3: the round fails with a reason, it does not return garbage.
        let drop = Dropouts {
            before_masked: vec![0, 1, 2],
            after_masked: vec![],
        };
        assert!(matches!(
            simulate(&x, 0.01, None, &drop, 9),
            Err(SecAggError::TooFew { step: "masked", .. })
        ));
    }

    /// Drives a round by hand to inspect the server and to tamper with messages.
    fn round_by_hand(n: usize, len: usize) -> (SecAggServer, Vec<SecAggClient>) {
        let x = inputs(n, len, 5);
        let names: Vec<String> = (0..n).map(|i| format!("lab-{i}")).collect();
        let clients = names
            .iter()
            .zip(x)
            .enumerate()
            .map(|(i, (d, v))| {
                SecAggClient::with_rng(d, v, ChaCha20Rng::seed_from_u64(100 + i as u64))
            })
            .collect();
        let server = SecAggServer::new(7, SecAggConfig::new(n, len, 0.01), &names).unwrap();
        (server, clients)
    }

    fn deliver(
        server: &mut SecAggServer,
        clients: &mut [SecAggClient],
        out: Vec<(String, ServerMessage)>,
    ) {
        for (to, msg) in out {
            let c = clients.iter_mut().find(|c| c.device() == to).unwrap();
            if let Some(a) = c.handle(msg).unwrap() {
                server.receive(&to, a).unwrap();
            }
        }
    }

    #[test]
    fn the_server_never_holds_an_update_nor_both_secrets_of_a_device() {
        let (mut server, mut clients) = round_by_hand(4, 4000);
        let out = server.start();
        deliver(&mut server, &mut clients, out);
        for _ in 0..3 {
            let out = server.advance().unwrap();
            deliver(&mut server, &mut clients, out);
        }
        server.advance().unwrap();
        let audit = server.audit();
        assert!(
            audit
                .self_seeds
                .intersection(audit.mask_keys)
                .next()
                .is_none()
        );
        for c in &clients {
            let masked = &audit.masked[c.device()];
            // 4 devices: Z_2^10. Uniform whatever the input: about 1/1024 coordinates equal by chance.
            assert_eq!(server.config().ring_bits, 10);
            let lifted: Vec<u32> = c
                .codes()
                .iter()
                .map(|&v| (i32::from(v) as u32) & 0x3ff)
                .collect();
            let equal = masked.iter().zip(&lifted).filter(|(a, b)| a == b).count();
            assert!(
                equal < 20,
                "{}: {equal} of 4000 coordinates unmasked",
                c.device()
            );
            let mean = masked.iter().map(|&v| f64::from(v)).sum::<f64>() / 4000.0;
            assert!((mean / 1024.0 - 0.5).abs() < 0.03, "masked mean {mean}");
        }
        let sum: Vec<i32> = (0..4000)
            .map(|j| clients.iter().map(|c| i32::from(c.codes()[j])).sum())
            .collect();
        assert_eq!(server.result().unwrap().codes, sum);
    }

    #[test]
    fn a_share_altered_in_transit_is_refused_and_messages_out_of_turn_too() {
        let (mut server, mut clients) = round_by_hand(3, 10);
        let out = server.start();
        deliver(&mut server, &mut clients, out);
        let out = server.advance().unwrap();
        deliver(&mut server, &mut clients, out);
        let mut out = server.advance().unwrap();
        if let ServerMessage::Shares { shares, .. } = &mut out[0].1 {
            shares[0].ciphertext[3] ^= 1;
        }
        let (to, msg) = out.remove(0);
        let c = clients.iter_mut().find(|c| c.device() == to).unwrap();
        assert!(matches!(c.handle(msg), Err(SecAggError::Decrypt { .. })));
        // The server refuses a second start-step message and a message of another round.
        let keys = ClientMessage::Keys {
            round: 7,
            keys: DeviceKeys {
                device: "lab-1".into(),
                cipher_pk: vec![9; 32],
                mask_pk: vec![8; 32],
                signature: vec![],
            },
        };
        assert!(matches!(
            server.receive("lab-1", keys),
            Err(SecAggError::Phase { .. })
        ));
        let masked = ClientMessage::Masked {
            round: 8,
            values: vec![],
        };
        assert!(matches!(
            server.receive("lab-1", masked),
            Err(SecAggError::Round { .. })
        ));
        let masked = ClientMessage::Masked {
            round: 7,
            values: vec![0; 3],
        };
        assert!(matches!(
            server.receive("lab-1", masked),
            Err(SecAggError::Invalid { .. })
        ));
        assert!(matches!(
            server.receive(
                "stranger",
                ClientMessage::Masked {
                    round: 7,
                    values: vec![]
                }
            ),
            Err(SecAggError::Unknown(_))
        ));
    }

    /// Devices with enrolled Ed25519 keys (`Trust`), each accepting thresholds from `min`.
    fn trusted(n: usize, len: usize, min: usize) -> (Vec<String>, Vec<SecAggClient>) {
        use crate::wire::signing::SecretKey;
        let names: Vec<String> = (0..n).map(|i| format!("lab-{i}")).collect();
        let keys: Vec<std::sync::Arc<SecretKey>> = (0..n)
            .map(|i| std::sync::Arc::new(SecretKey::from_seed([i as u8 + 1; 32])))
            .collect();
        let enrolled: BTreeMap<String, crate::wire::signing::PublicKey> = names
            .iter()
            .zip(&keys)
            .map(|(d, k)| (d.clone(), k.public()))
            .collect();
        let clients = names
            .iter()
            .zip(inputs(n, len, 12))
            .zip(&keys)
            .enumerate()
            .map(|(i, ((d, v), k))| {
                SecAggClient::with_rng(d, v, ChaCha20Rng::seed_from_u64(200 + i as u64)).with_trust(
                    Trust {
                        signing: k.clone(),
                        enrolled: enrolled.clone(),
                        min_threshold: min,
                    },
                )
            })
            .collect();
        (names, clients)
    }

    #[test]
    fn the_rounds_norm_clip_bounds_each_devices_contribution() {
        // DP with secure aggregation: the aggregator cannot clip, so the devices clip to the
        // round's norm_clip before quantising; what each contributes is within C plus rounding.
        let n = 3;
        let len = 2000;
        let names: Vec<String> = (0..n).map(|i| format!("lab-{i}")).collect();
        let mut clients: Vec<SecAggClient> = names
            .iter()
            .zip(inputs(n, len, 21))
            .enumerate()
            .map(|(i, (d, v))| {
                SecAggClient::with_rng(d, v, ChaCha20Rng::seed_from_u64(300 + i as u64))
            })
            .collect();
        let mut config = SecAggConfig::new(n, len, 0.01);
        config.norm_clip = Some(0.05);
        let scale = config.scale();
        let mut server = SecAggServer::new(5, config, &names).unwrap();
        let out = server.start();
        deliver(&mut server, &mut clients, out);
        for _ in 0..3 {
            let out = server.advance().unwrap();
            deliver(&mut server, &mut clients, out);
        }
        server.advance().unwrap();
        let rounding = scale * (len as f32).sqrt();
        for c in &clients {
            let norm = c
                .codes()
                .iter()
                .map(|&v| (f32::from(v) * scale).powi(2))
                .sum::<f32>()
                .sqrt();
            // Inputs of norm ≈ 0.26 come out near 0.05, never above it by more than the rounding.
            assert!(norm <= 0.05 + rounding, "{}: {norm}", c.device());
            assert!(norm < 0.1, "{}: {norm}: not clipped", c.device());
        }
        let bad = SecAggConfig {
            norm_clip: Some(f32::NAN),
            ..SecAggConfig::new(n, len, 0.01)
        };
        assert!(matches!(
            bad.validate(n),
            Err(SecAggError::Config {
                field: "norm_clip",
                ..
            })
        ));
    }

    #[test]
    fn signed_round_keys_give_the_exact_sum() {
        let (names, mut clients) = trusted(4, 500, 3);
        let mut server = SecAggServer::new(3, SecAggConfig::new(4, 500, 0.01), &names).unwrap();
        let out = server.start();
        deliver(&mut server, &mut clients, out);
        for _ in 0..3 {
            let out = server.advance().unwrap();
            deliver(&mut server, &mut clients, out);
        }
        server.advance().unwrap();
        let sum: Vec<i32> = (0..500)
            .map(|j| clients.iter().map(|c| i32::from(c.codes()[j])).sum())
            .collect();
        assert_eq!(server.result().unwrap().codes, sum);
    }

    #[test]
    fn a_substituted_or_unenrolled_key_in_the_roster_is_refused_before_sharing() {
        let (names, mut clients) = trusted(3, 50, 2);
        let mut server = SecAggServer::new(4, SecAggConfig::new(3, 50, 0.01), &names).unwrap();
        let out = server.start();
        deliver(&mut server, &mut clients, out);
        let roster = server.advance().unwrap();
        // The relay swaps lab-1's cipher key for its own (to open the shares sealed for lab-1),
        // keeping lab-1's signature, then signing with a key of its own: both refused by lab-0.
        let attacker = crate::wire::signing::SecretKey::from_seed([99; 32]);
        let evil = PublicKey::from(&random_key(&mut ChaCha20Rng::seed_from_u64(7)))
            .as_bytes()
            .to_vec();
        let for_lab0 = |tamper: &dyn Fn(&mut DeviceKeys)| {
            let (_, mut msg) = roster.iter().find(|(to, _)| to == "lab-0").unwrap().clone();
            if let ServerMessage::Roster { keys, .. } = &mut msg {
                tamper(keys.iter_mut().find(|k| k.device == "lab-1").unwrap());
            }
            msg
        };
        let kept_signature = for_lab0(&|k| k.cipher_pk = evil.clone());
        let resigned = for_lab0(&|k| {
            k.cipher_pk = evil.clone();
            k.signature = attacker
                .sign(
                    crate::wire::signing::Purpose::SecAggKeys,
                    &keys_message(4, &k.device, &k.cipher_pk, &k.mask_pk),
                )
                .to_vec();
        });
        let unsigned = for_lab0(&|k| k.signature.clear());
        for msg in [kept_signature, resigned, unsigned] {
            // A fresh lab-0 waiting for its roster (the same seeds: the same keys as above).
            let (names2, mut fresh) = trusted(3, 50, 2);
            let mut s2 = SecAggServer::new(4, SecAggConfig::new(3, 50, 0.01), &names2).unwrap();
            let out = s2.start();
            deliver(&mut s2, &mut fresh, out);
            let err = fresh[0].handle(msg).unwrap_err();
            assert!(
                matches!(&err, SecAggError::Unverified { member, .. } if member == "lab-1"),
                "{err}"
            );
        }
        // A device that is not enrolled, added to the roster by the relay: refused too.
        let (_, mut msg) = roster.into_iter().find(|(to, _)| to == "lab-0").unwrap();
        if let ServerMessage::Roster { keys, .. } = &mut msg {
            let mut extra = keys[1].clone();
            extra.device = "lab-9".into();
            keys.push(extra);
        }
        let err = clients[0].handle(msg).unwrap_err();
        assert!(
            matches!(&err, SecAggError::Unverified { member, .. } if member == "lab-9"),
            "{err}"
        );
    }

    #[test]
    fn a_threshold_below_the_devices_minimum_is_refused() {
        let (_, mut clients) = trusted(5, 20, 3);
        let mut config = SecAggConfig::new(5, 20, 0.01);
        config.threshold = 2;
        let err = clients[0]
            .handle(ServerMessage::Start {
                round: 1,
                config: config.clone(),
            })
            .unwrap_err();
        assert!(
            matches!(
                err,
                SecAggError::ThresholdBelowMinimum {
                    threshold: 2,
                    minimum: 3,
                    ..
                }
            ),
            "{err}"
        );
        config.threshold = 3;
        let keys = clients[0]
            .handle(ServerMessage::Start { round: 1, config })
            .unwrap();
        assert!(matches!(keys, Some(ClientMessage::Keys { .. })));
    }

    #[test]
    fn the_communication_overhead_is_small_for_a_real_decoder() {
        // The measurement behind docs/privacy-secagg-dp.md, small enough for a unit test: 5 devices,
        // 20,000 coordinates. The masked vector is 11/8 of int8, plus about 1.6 kB of keys and
        // shares.
        let x = inputs(5, 20_000, 6);
        let r = simulate(&x, 0.01, None, &Dropouts::default(), 1).unwrap();
        assert_eq!(r.masked_bytes, 20_000 * 11 / 8);
        let ratio = r.device_sent / r.plain_int8_bytes as f64;
        assert!(
            ratio > 1.375 && ratio < 1.5,
            "sent {} vs {} plain: {ratio}",
            r.device_sent,
            r.plain_int8_bytes
        );
    }
}
