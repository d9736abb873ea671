//! Shamir's secret sharing over GF(2^61 − 1), for the self seeds and mask keys of secure aggregation.

use super::*;

pub(super) fn mul_mod(a: u64, b: u64) -> u64 {
    let p = u128::from(a) * u128::from(b);
    // 2^61 ≡ 1 (mod p): fold the high bits onto the low ones.
    let lo = (p as u64) & PRIME;
    let hi = (p >> 61) as u64;
    let s = lo + hi;
    let s = (s & PRIME) + (s >> 61);
    if s >= PRIME { s - PRIME } else { s }
}

pub(super) fn add_mod(a: u64, b: u64) -> u64 {
    let s = a + b;
    if s >= PRIME { s - PRIME } else { s }
}

pub(super) fn sub_mod(a: u64, b: u64) -> u64 {
    if a >= b { a - b } else { a + PRIME - b }
}

pub(super) fn pow_mod(mut base: u64, mut exp: u64) -> u64 {
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

pub(super) fn inv_mod(a: u64) -> u64 {
    pow_mod(a, PRIME - 2)
}

pub(super) fn secret_chunks(secret: &[u8; 32]) -> [u64; SECRET_CHUNKS] {
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
pub(super) fn lagrange_at_zero(xs: &[u64]) -> Vec<u64> {
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
pub(super) struct LagrangeCache {
    xs: Vec<u64>,
    coeffs: Vec<u64>,
}

impl LagrangeCache {
    pub(super) fn join(&mut self, shares: &[(u64, &[u64])]) -> Result<[u8; 32], String> {
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
