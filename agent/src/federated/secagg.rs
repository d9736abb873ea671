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

use super::protocol::{from_cbor, to_cbor};

/// The Shamir field: the Mersenne prime 2^61 − 1 (products fit in `u128`, reduction is cheap).
pub const PRIME: u64 = (1 << 61) - 1;
/// A 32-byte secret is shared as five field elements of at most 7 bytes (56 bits < 61).
const CHUNK_BYTES: usize = 7;
const SECRET_CHUNKS: usize = 32usize.div_ceil(CHUNK_BYTES);
/// Largest int8 code (symmetric, as in [`super::compress`]).
const LEVELS: f32 = 127.0;
const HKDF_SALT: &[u8] = b"microfed/secagg/v1";

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
    #[error(transparent)]
    Protocol(#[from] super::protocol::ProtocolError),
}

fn invalid(device: &str, field: &'static str, problem: impl Into<String>) -> SecAggError {
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
struct SharePair {
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
    fn name(&self) -> &'static str {
        match self {
            ServerMessage::Start { .. } => "start",
            ServerMessage::Roster { .. } => "roster",
            ServerMessage::Shares { .. } => "shares",
            ServerMessage::Survivors { .. } => "survivors",
        }
    }
    fn round(&self) -> u64 {
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

// ---- field arithmetic and Shamir ------------------------------------------------------------------

fn mul_mod(a: u64, b: u64) -> u64 {
    let p = u128::from(a) * u128::from(b);
    // 2^61 ≡ 1 (mod p): fold the high bits onto the low ones.
    let lo = (p as u64) & PRIME;
    let hi = (p >> 61) as u64;
    let s = lo + hi;
    let s = (s & PRIME) + (s >> 61);
    if s >= PRIME { s - PRIME } else { s }
}

fn add_mod(a: u64, b: u64) -> u64 {
    let s = a + b;
    if s >= PRIME { s - PRIME } else { s }
}

fn sub_mod(a: u64, b: u64) -> u64 {
    if a >= b { a - b } else { a + PRIME - b }
}

fn pow_mod(mut base: u64, mut exp: u64) -> u64 {
    let mut acc = 1;
    while exp > 0 {
        if exp & 1 == 1 {
            acc = mul_mod(acc, base);
        }
        base = mul_mod(base, base);
        exp >>= 1;
    }
    acc
}

fn inv_mod(a: u64) -> u64 {
    pow_mod(a, PRIME - 2)
}

fn secret_chunks(secret: &[u8; 32]) -> [u64; SECRET_CHUNKS] {
    let mut out = [0u64; SECRET_CHUNKS];
    for (i, chunk) in secret.chunks(CHUNK_BYTES).enumerate() {
        let mut b = [0u8; 8];
        b[..chunk.len()].copy_from_slice(chunk);
        out[i] = u64::from_le_bytes(b);
    }
    out
}

/// Splits a 32-byte secret into `n` shares at `x = 1..=n`, any `t` of which rebuild it and any
/// `t − 1` of which are independent of it (random polynomials of degree `t − 1`, one per chunk).
pub fn shamir_split<R: RngCore>(
    secret: &[u8; 32],
    n: usize,
    t: usize,
    rng: &mut R,
) -> Vec<Vec<u64>> {
    let chunks = secret_chunks(secret);
    // coeffs[c] = [secret chunk, random, …] for chunk c.
    let coeffs: Vec<Vec<u64>> = chunks
        .iter()
        .map(|&s| {
            let mut c = Zeroizing::new(Vec::with_capacity(t));
            c.push(s);
            c.extend((1..t).map(|_| rng.random_range(0..PRIME)));
            c.to_vec()
        })
        .collect();
    (1..=n as u64)
        .map(|x| {
            coeffs
                .iter()
                .map(|c| {
                    c.iter()
                        .rev()
                        .fold(0, |acc, &a| add_mod(mul_mod(acc, x), a))
                })
                .collect()
        })
        .collect()
}

/// Lagrange coefficients at 0 for the points `xs` (distinct, non-zero).
fn lagrange_at_zero(xs: &[u64]) -> Vec<u64> {
    xs.iter()
        .enumerate()
        .map(|(i, &xi)| {
            let (mut num, mut den) = (1u64, 1u64);
            for (j, &xj) in xs.iter().enumerate() {
                if i != j {
                    num = mul_mod(num, xj);
                    den = mul_mod(den, sub_mod(xj, xi));
                }
            }
            mul_mod(num, inv_mod(den))
        })
        .collect()
}

/// Rebuilds a 32-byte secret from shares `(x, y)`. The caller passes exactly `t` shares (more are
/// fine if they are consistent). Errors say what is wrong with the shares; wrong but well-formed
/// shares give a wrong secret, which the callers check against a public key or digest.
pub fn shamir_join(shares: &[(u64, &[u64])]) -> Result<[u8; 32], String> {
    LagrangeCache::default().join(shares)
}

/// The Lagrange coefficients of the last set of points: the server rebuilds every device's secrets
/// from the same responders, so it computes them once per round rather than once per secret
/// (O(t²) field operations and t inversions each time: 40 s for 1,024 devices without the cache).
#[derive(Default)]
struct LagrangeCache {
    xs: Vec<u64>,
    coeffs: Vec<u64>,
}

impl LagrangeCache {
    fn join(&mut self, shares: &[(u64, &[u64])]) -> Result<[u8; 32], String> {
        if shares.is_empty() {
            return Err("no shares".into());
        }
        if let Some((x, _)) = shares.iter().find(|(x, _)| *x == 0 || *x >= PRIME) {
            return Err(format!("share at x = {x} is outside 1..p"));
        }
        if let Some((_, y)) = shares.iter().find(|(_, y)| y.len() != SECRET_CHUNKS) {
            return Err(format!(
                "a share has {} values, expected {SECRET_CHUNKS}",
                y.len()
            ));
        }
        if shares.iter().any(|(_, y)| y.iter().any(|&v| v >= PRIME)) {
            return Err("a share value is not a field element".into());
        }
        let xs: Vec<u64> = shares.iter().map(|s| s.0).collect();
        if xs != self.xs {
            let mut sorted = xs.clone();
            sorted.sort_unstable();
            if sorted.windows(2).any(|w| w[0] == w[1]) {
                return Err("two shares at the same point".into());
            }
            self.coeffs = lagrange_at_zero(&xs);
            self.xs = xs;
        }
        let mut out = [0u8; 32];
        for c in 0..SECRET_CHUNKS {
            let v = shares
                .iter()
                .zip(&self.coeffs)
                .fold(0, |acc, ((_, y), &l)| add_mod(acc, mul_mod(y[c], l)));
            let bytes = v.to_le_bytes();
            let start = c * CHUNK_BYTES;
            let n = CHUNK_BYTES.min(32 - start);
            if bytes[n..].iter().any(|&b| b != 0) {
                return Err(format!(
                    "chunk {c} does not fit in {n} bytes: inconsistent shares"
                ));
            }
            out[start..start + n].copy_from_slice(&bytes[..n]);
        }
        Ok(out)
    }
}

// ---- keys, PRG, ring ------------------------------------------------------------------------------

fn hkdf32(ikm: &[u8], info: &[&[u8]]) -> Zeroizing<[u8; 32]> {
    let hk = Hkdf::<Sha256>::new(Some(HKDF_SALT), ikm);
    let info: Vec<u8> = info
        .iter()
        .flat_map(|p| {
            // Length-prefixed parts, so that ("ab","c") and ("a","bc") differ.
            (p.len() as u32)
                .to_le_bytes()
                .into_iter()
                .chain(p.iter().copied())
        })
        .collect();
    let mut okm = Zeroizing::new([0u8; 32]);
    // 32 bytes is far below HKDF-SHA256's limit of 255 · 32: this cannot fail.
    hk.expand(&info, okm.as_mut())
        .expect("32 bytes is a valid HKDF-SHA256 output length");
    okm
}

fn public_key(device: &str, field: &'static str, bytes: &[u8]) -> Result<PublicKey, SecAggError> {
    let b: [u8; 32] = bytes.try_into().map_err(|_| {
        invalid(
            device,
            field,
            format!("{} bytes, an x25519 key has 32", bytes.len()),
        )
    })?;
    Ok(PublicKey::from(b))
}

/// x25519 agreement, refusing low-order public keys (whose agreement is all zeros).
fn agree(
    secret: &StaticSecret,
    peer: &PublicKey,
    device: &str,
    field: &'static str,
) -> Result<Zeroizing<[u8; 32]>, SecAggError> {
    let shared = secret.diffie_hellman(peer);
    if !shared.was_contributory() {
        return Err(invalid(device, field, "a low-order public key"));
    }
    Ok(Zeroizing::new(shared.to_bytes()))
}

fn mask_seed(shared: &[u8; 32], round: u64, a: &str, b: &str) -> Zeroizing<[u8; 32]> {
    let (lo, hi) = if a < b { (a, b) } else { (b, a) };
    hkdf32(
        shared,
        &[
            b"pairwise mask",
            &round.to_le_bytes(),
            lo.as_bytes(),
            hi.as_bytes(),
        ],
    )
}

fn self_mask_seed(seed: &[u8; 32], round: u64, device: &str) -> Zeroizing<[u8; 32]> {
    hkdf32(
        seed,
        &[b"self mask", &round.to_le_bytes(), device.as_bytes()],
    )
}

fn seal_key(shared: &[u8; 32], round: u64, from: &str, to: &str) -> Zeroizing<[u8; 32]> {
    hkdf32(
        shared,
        &[
            b"share sealing",
            &round.to_le_bytes(),
            from.as_bytes(),
            to.as_bytes(),
        ],
    )
}

fn seed_digest(round: u64, device: &str, seed: &[u8; 32]) -> Vec<u8> {
    let mut h = Sha256::new();
    h.update(b"microfed/secagg/v1 self seed");
    h.update(round.to_le_bytes());
    h.update((device.len() as u32).to_le_bytes());
    h.update(device.as_bytes());
    h.update(seed);
    h.finalize().to_vec()
}

/// Adds (`sign > 0`) or subtracts ChaCha20's stream from `seed` to `acc`, one `u32` per coordinate
/// (wrapping: arithmetic mod 2^32 reduces to mod 2^b by masking at the end).
fn apply_mask(acc: &mut [u32], seed: &[u8; 32], add: bool) {
    let mut rng = ChaCha20Rng::from_seed(*seed);
    if add {
        acc.iter_mut()
            .for_each(|a| *a = a.wrapping_add(rng.next_u32()));
    } else {
        acc.iter_mut()
            .for_each(|a| *a = a.wrapping_sub(rng.next_u32()));
    }
}

/// Packs `values` (each `< 2^bits`) into `ceil(len · bits / 8)` bytes, least significant bit first.
pub fn pack(values: &[u32], bits: u32) -> Vec<u8> {
    let mut out = vec![0u8; (values.len() * bits as usize).div_ceil(8)];
    let (mut acc, mut have, mut at) = (0u64, 0u32, 0usize);
    for &v in values {
        acc |= u64::from(v) << have;
        have += bits;
        while have >= 8 {
            out[at] = acc as u8;
            at += 1;
            acc >>= 8;
            have -= 8;
        }
    }
    if have > 0 {
        out[at] = acc as u8;
    }
    out
}

/// Inverse of [`pack`]: `len` values of `bits` bits; the byte count must be exact and the unused
/// high bits of the last byte zero.
pub fn unpack(bytes: &[u8], bits: u32, len: usize) -> Result<Vec<u32>, SecAggError> {
    if !(1..=32).contains(&bits) {
        return Err(SecAggError::Ring(format!("{bits} bits per value")));
    }
    let expected = (len * bits as usize).div_ceil(8);
    if bytes.len() != expected {
        return Err(SecAggError::Ring(format!(
            "{} bytes, {len} values of {bits} bits take {expected}",
            bytes.len()
        )));
    }
    let mask = if bits == 32 {
        u64::from(u32::MAX)
    } else {
        (1u64 << bits) - 1
    };
    let mut out = Vec::with_capacity(len);
    let (mut acc, mut have) = (0u64, 0u32);
    let mut it = bytes.iter();
    for _ in 0..len {
        while have < bits {
            // The length check above guarantees enough bytes.
            let b = it.next().copied().unwrap_or(0);
            acc |= u64::from(b) << have;
            have += 8;
        }
        out.push((acc & mask) as u32);
        acc >>= bits;
        have -= bits;
    }
    if acc != 0 {
        return Err(SecAggError::Ring("non-zero padding bits".into()));
    }
    Ok(out)
}

/// int8 codes of `input` with the shared scale `clip / 127`: clamped to `[−clip, clip]`, then rounded
/// stochastically (up with probability equal to the fraction), so each code is unbiased:
/// `E[code · scale] = clamp(x)`. Non-finite values are an error naming the coordinate.
pub fn quantise<R: Rng>(input: &[f32], clip: f32, rng: &mut R) -> Result<Vec<i8>, SecAggError> {
    let scale = clip / LEVELS;
    input
        .iter()
        .enumerate()
        .map(|(i, &x)| {
            if !x.is_finite() {
                return Err(invalid("input", "update", format!("coordinate {i} is {x}")));
            }
            let v = (x.clamp(-clip, clip) / scale).clamp(-LEVELS, LEVELS);
            let lo = v.floor();
            let up = rng.random::<f32>() < v - lo;
            Ok((lo + if up { 1.0 } else { 0.0 }).clamp(-LEVELS, LEVELS) as i8)
        })
        .collect()
}

// ---- the device -----------------------------------------------------------------------------------

enum ClientState {
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

fn random_key(rng: &mut ChaCha20Rng) -> StaticSecret {
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
        }
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
        let cipher_sk = random_key(&mut self.rng);
        let mask_sk = random_key(&mut self.rng);
        let keys = DeviceKeys {
            device: self.device.clone(),
            cipher_pk: PublicKey::from(&cipher_sk).as_bytes().to_vec(),
            mask_pk: PublicKey::from(&mask_sk).as_bytes().to_vec(),
        };
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

// ---- the server -----------------------------------------------------------------------------------

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

// ---- in-process simulation (measurements, tests) --------------------------------------------------

/// Where devices vanish in [`simulate`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Dropouts {
    /// Devices (by index) that vanish after sending their shares, before their masked input.
    pub before_masked: Vec<usize>,
    /// Devices that vanish after sending their masked input (their input is still in the sum).
    pub after_masked: Vec<usize>,
}

/// What [`simulate`] measured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SimReport {
    pub devices: usize,
    pub len: usize,
    pub ring_bits: u32,
    pub threshold: usize,
    /// Mean bytes one device sent (CBOR messages), over devices that finished.
    pub device_sent: f64,
    /// Mean bytes one device received.
    pub device_received: f64,
    /// Bytes of the masked input alone (one device).
    pub masked_bytes: usize,
    /// Bytes of the same update sent in the clear as dense int8 through [`super::compress`].
    pub plain_int8_bytes: usize,
    /// Seconds of device-side computation, mean per device.
    pub device_seconds: f64,
    /// Seconds of server-side unmasking.
    pub server_seconds: f64,
    pub aggregate: Aggregate,
    /// The sum of the contributors' own int8 codes, added up from the devices' side (what the
    /// aggregate must equal; the server never sees these).
    pub expected_codes: Vec<i32>,
}

/// Runs a whole round in one process: `inputs[i]` is device `i`'s update; bytes are counted as the
/// CBOR encoding of each message (what an envelope body carries). Deterministic for a `seed`.
pub fn simulate(
    inputs: &[Vec<f32>],
    clip: f32,
    threshold: Option<usize>,
    dropouts: &Dropouts,
    seed: u64,
) -> Result<SimReport, SecAggError> {
    let n = inputs.len();
    let len = inputs.first().map_or(0, Vec::len);
    let mut config = SecAggConfig::new(n, len, clip);
    if let Some(t) = threshold {
        config.threshold = t;
    }
    let names: Vec<String> = (0..n).map(|i| format!("dev-{i:05}")).collect();
    let mut clients: Vec<SecAggClient> = names
        .iter()
        .zip(inputs)
        .enumerate()
        .map(|(i, (d, x))| {
            SecAggClient::with_rng(
                d,
                x.clone(),
                ChaCha20Rng::seed_from_u64(seed.wrapping_mul(1_000_003) + i as u64),
            )
        })
        .collect();
    let index: BTreeMap<String, usize> = names
        .iter()
        .cloned()
        .enumerate()
        .map(|(i, d)| (d, i))
        .collect();
    let mut server = SecAggServer::new(1, config, &names)?;
    let mut sent = vec![0usize; n];
    let mut received = vec![0usize; n];
    let mut seconds = vec![0f64; n];
    let mut gone = vec![false; n];
    let mut masked_bytes = 0;
    let mut outbox = server.start();
    let nobody = Vec::new();
    for step in 0..4 {
        // Devices work in parallel within a step, as they would in a fleet.
        let mut inbox: Vec<Option<ServerMessage>> = vec![None; n];
        for (to, msg) in outbox {
            let i = index[&to];
            if !gone[i] {
                inbox[i] = Some(msg);
            }
        }
        let answers = clients
            .par_iter_mut()
            .zip(inbox)
            .map(|(c, msg)| -> Result<_, SecAggError> {
                let Some(msg) = msg else { return Ok(None) };
                let bytes_in = to_cbor("server message", &msg)?.len();
                let started = Instant::now();
                let answer = c.handle(msg)?;
                let secs = started.elapsed().as_secs_f64();
                let bytes_out = match &answer {
                    Some(a) => to_cbor("device message", a)?.len(),
                    None => 0,
                };
                Ok(Some((answer, bytes_in, bytes_out, secs)))
            })
            .collect::<Result<Vec<_>, _>>()?;
        for (i, a) in answers.into_iter().enumerate() {
            let Some((answer, bytes_in, bytes_out, secs)) = a else {
                continue;
            };
            received[i] += bytes_in;
            sent[i] += bytes_out;
            seconds[i] += secs;
            if let Some(a) = answer {
                if let ClientMessage::Masked { values, .. } = &a {
                    masked_bytes = values.len();
                }
                server.receive(&names[i], a)?;
            }
        }
        // Vanish after this step's message: step 1 = shares sent, step 2 = masked input sent.
        let vanish = match step {
            1 => &dropouts.before_masked,
            2 => &dropouts.after_masked,
            _ => &nobody,
        };
        for &i in vanish {
            if let Some(g) = gone.get_mut(i) {
                *g = true;
            }
        }
        outbox = server.advance()?;
    }
    let aggregate = server
        .result()
        .cloned()
        .ok_or_else(|| invalid("server", "result", "no aggregate after step 4"))?;
    let finished: Vec<usize> = (0..n).filter(|&i| !gone[i]).collect();
    let mut expected_codes = vec![0i32; len];
    for c in &clients {
        if aggregate.contributors.iter().any(|d| d == c.device()) {
            expected_codes
                .iter_mut()
                .zip(c.codes())
                .for_each(|(e, &x)| *e += i32::from(x));
        }
    }
    let mean =
        |v: &[f64]| finished.iter().map(|&i| v[i]).sum::<f64>() / finished.len().max(1) as f64;
    let layout = [super::compress::TensorSpan {
        name: "update".into(),
        len,
    }];
    let plain = super::compress::compress(
        &inputs[0],
        &layout,
        &super::compress::CompressionConfig {
            quantize: super::compress::Quantize::Int8,
            ..Default::default()
        },
        None,
    )
    .map_err(|e| invalid("plain baseline", "compress", e.to_string()))?;
    Ok(SimReport {
        devices: n,
        len,
        ring_bits: server.config().ring_bits,
        threshold: server.config().threshold,
        device_sent: mean(&sent.iter().map(|&b| b as f64).collect::<Vec<_>>()),
        device_received: mean(&received.iter().map(|&b| b as f64).collect::<Vec<_>>()),
        masked_bytes,
        plain_int8_bytes: plain.len(),
        device_seconds: mean(&seconds),
        server_seconds: server.compute_seconds,
        aggregate,
        expected_codes,
    })
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
