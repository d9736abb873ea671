//! Keys, the masks' PRG, and the ring Z_2^b the masked inputs live in (packing and int8 quantisation).

use super::*;

pub(super) fn hkdf32(ikm: &[u8], info: &[&[u8]]) -> Zeroizing<[u8; 32]> {
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

pub(super) fn public_key(
    device: &str,
    field: &'static str,
    bytes: &[u8],
) -> Result<PublicKey, SecAggError> {
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
pub(super) fn agree(
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

pub(super) fn mask_seed(shared: &[u8; 32], round: u64, a: &str, b: &str) -> Zeroizing<[u8; 32]> {
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

pub(super) fn self_mask_seed(seed: &[u8; 32], round: u64, device: &str) -> Zeroizing<[u8; 32]> {
    hkdf32(
        seed,
        &[b"self mask", &round.to_le_bytes(), device.as_bytes()],
    )
}

pub(super) fn seal_key(shared: &[u8; 32], round: u64, from: &str, to: &str) -> Zeroizing<[u8; 32]> {
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

pub(super) fn seed_digest(round: u64, device: &str, seed: &[u8; 32]) -> Vec<u8> {
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
pub(super) fn apply_mask(acc: &mut [u32], seed: &[u8; 32], add: bool) {
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
