//! Differential privacy for decoder updates and style codes: clipping, Gaussian noise, and a Rényi-DP
//! accountant that turns the noise of every round so far into an (ε, δ) guarantee.
//!
//! The mechanism is DP-FedAvg (McMahan et al. 2018, "Learning Differentially Private Recurrent
//! Language Models") at the level of a lab (user-level DP: the guarantee covers everything a lab
//! contributes in a round, all its images together):
//! 1. each lab scales its update down to L2 norm `C` ([`clip`]), so one lab moves the sum by at most
//!    `C` (the sensitivity);
//! 2. Gaussian noise of standard deviation `z · C` is added to the *sum* ([`DpConfig::noise_multiplier`]
//!    `z`). With secure aggregation no one holds the sum before it is noised, so each of the `n` labs
//!    adds its share `N(0, (z C)² / n)` ([`privatise_update`], distributed DP): the shares add up to
//!    `N(0, (z C)²)` provided the labs are honest; if only `k` of them add theirs, `z` shrinks by
//!    `sqrt(k / n)` (said in docs/privacy-secagg-dp.md). Without secure aggregation the aggregator
//!    adds it to the sum itself ([`noise_sum`]) — then the aggregator sees un-noised updates.
//! 3. the [`RdpAccountant`] composes the rounds: a round is the subsampled Gaussian mechanism with
//!    sampling rate `q` (the fraction of labs taking part; 1 = every lab every round) and noise
//!    multiplier `z`. RDP of integer orders α is computed exactly (Mironov, Talwar & Zhang 2019,
//!    "Rényi Differential Privacy of the Sampled Gaussian Mechanism", §3.3), summed over rounds, and
//!    converted to (ε, δ) with Balle et al. (2020, "Hypothesis testing interpretations and Rényi
//!    differential privacy", Thm. 21), taking the best order.
//!
//! Style codes use the same pieces ([`StyleNoise`]): clip the code to norm `C`, add `N(0, (z C)²)`,
//! and record one non-subsampled Gaussian step per published code in the lab's accountant.
//!
//! Map: [`DpConfig`], [`clip`], [`gaussian`], [`privatise_update`], [`noise_sum`], [`RdpAccountant`],
//! [`rdp_sampled_gaussian`], [`noise_multiplier_for`], [`PrivacyReport`], [`StyleNoise`], [`DpError`].

use rand::Rng;
use rand_distr::{Distribution, Normal};
use serde::{Deserialize, Serialize};

// Round summaries carry the privacy spent, so the wire schema owns the report; it is made here.
pub use crate::wire::protocol::PrivacyReport;

/// Why a DP setting or step was refused; every variant names the field or value.
#[derive(Debug, thiserror::Error)]
pub enum DpError {
    #[error("differential privacy: {field}: {problem}")]
    Config {
        field: &'static str,
        problem: String,
    },
    #[error("{what}: coordinate {index} is {value}, not a finite number")]
    NonFinite {
        what: &'static str,
        index: usize,
        value: f32,
    },
    #[error(
        "no noise multiplier in [{lo}, {hi}] reaches ε = {epsilon} at δ = {delta} after {steps} steps"
    )]
    Unreachable {
        epsilon: f64,
        delta: f64,
        steps: u64,
        lo: f64,
        hi: f64,
    },
}

fn config_err(field: &'static str, problem: String) -> DpError {
    DpError::Config { field, problem }
}

/// DP-FedAvg settings (the aggregator's; sent to devices with the round).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DpConfig {
    /// L2 bound `C` on one lab's update.
    pub clip_norm: f32,
    /// `z`: the noise on the sum has standard deviation `z · C`.
    pub noise_multiplier: f64,
    /// Fraction of labs that take part in a round, in (0, 1].
    #[serde(default = "one")]
    pub sampling_rate: f64,
    /// The δ that ε is reported for.
    #[serde(default = "default_delta")]
    pub delta: f64,
}

fn one() -> f64 {
    1.0
}
fn default_delta() -> f64 {
    1e-5
}

impl DpConfig {
    /// Checks every field; the error names it.
    pub fn validate(&self) -> Result<(), DpError> {
        if !(self.clip_norm.is_finite() && self.clip_norm > 0.0) {
            return Err(config_err(
                "clip_norm",
                format!("{} is not a positive number", self.clip_norm),
            ));
        }
        if !(self.noise_multiplier.is_finite() && self.noise_multiplier > 0.0) {
            return Err(config_err(
                "noise_multiplier",
                format!("{} is not a positive number", self.noise_multiplier),
            ));
        }
        if !(self.sampling_rate > 0.0 && self.sampling_rate <= 1.0) {
            return Err(config_err(
                "sampling_rate",
                format!("{} is not in (0, 1]", self.sampling_rate),
            ));
        }
        if !(self.delta > 0.0 && self.delta < 1.0) {
            return Err(config_err(
                "delta",
                format!("{} is not in (0, 1)", self.delta),
            ));
        }
        Ok(())
    }
}

fn check_finite(what: &'static str, v: &[f32]) -> Result<(), DpError> {
    match v.iter().position(|x| !x.is_finite()) {
        Some(index) => Err(DpError::NonFinite {
            what,
            index,
            value: v[index],
        }),
        None => Ok(()),
    }
}

/// Scales `v` down to L2 norm `bound` when it is longer; returns its norm before (computed in `f64`).
pub fn clip(v: &mut [f32], bound: f32) -> Result<f64, DpError> {
    check_finite("update", v)?;
    let norm = v
        .iter()
        .map(|&x| f64::from(x) * f64::from(x))
        .sum::<f64>()
        .sqrt();
    if norm > f64::from(bound) {
        let f = (f64::from(bound) / norm) as f32;
        v.iter_mut().for_each(|x| *x *= f);
    }
    Ok(norm)
}

/// Adds independent `N(0, std²)` noise to every value.
pub fn gaussian<R: Rng>(v: &mut [f32], std: f64, rng: &mut R) -> Result<(), DpError> {
    if std == 0.0 {
        return Ok(());
    }
    let normal = Normal::new(0.0, std)
        .map_err(|e| config_err("noise standard deviation", format!("{std}: {e}")))?;
    v.iter_mut().for_each(|x| *x += normal.sample(rng) as f32);
    Ok(())
}

/// A lab's side of distributed DP-FedAvg: clip `update` to `C`, then add this lab's share of the
/// noise, `N(0, (z C)² / labs)`, where `labs` is how many labs add theirs to the same (securely
/// aggregated) sum. Returns the norm before clipping.
pub fn privatise_update<R: Rng>(
    update: &mut [f32],
    cfg: &DpConfig,
    labs: usize,
    rng: &mut R,
) -> Result<f64, DpError> {
    cfg.validate()?;
    if labs == 0 {
        return Err(config_err("labs", "no lab shares the noise".into()));
    }
    let norm = clip(update, cfg.clip_norm)?;
    let std = cfg.noise_multiplier * f64::from(cfg.clip_norm) / (labs as f64).sqrt();
    gaussian(update, std, rng)?;
    Ok(norm)
}

/// Central DP-FedAvg: the aggregator adds `N(0, (z C)²)` to the sum of clipped updates.
pub fn noise_sum<R: Rng>(sum: &mut [f32], cfg: &DpConfig, rng: &mut R) -> Result<(), DpError> {
    cfg.validate()?;
    check_finite("sum", sum)?;
    gaussian(sum, cfg.noise_multiplier * f64::from(cfg.clip_norm), rng)
}

/// ln Γ(k + 1) for k = 0..=n, by summing logarithms (exact enough for the binomials below).
fn ln_factorials(n: usize) -> Vec<f64> {
    let mut out = Vec::with_capacity(n + 1);
    let mut acc = 0.0;
    out.push(0.0);
    for k in 1..=n {
        acc += (k as f64).ln();
        out.push(acc);
    }
    out
}

fn log_add(a: f64, b: f64) -> f64 {
    if a == f64::NEG_INFINITY {
        return b;
    }
    if b == f64::NEG_INFINITY {
        return a;
    }
    let (hi, lo) = if a > b { (a, b) } else { (b, a) };
    hi + (lo - hi).exp().ln_1p()
}

/// RDP of order `alpha` (integer ≥ 2) of one step of the Gaussian mechanism with noise multiplier
/// `sigma`, applied to a Poisson sample with rate `q`:
/// `ln( Σ_k C(α,k) (1−q)^(α−k) q^k exp((k² − k) / (2σ²)) ) / (α − 1)`, summed in log space.
/// For `q = 1` this is `α / (2σ²)`.
pub fn rdp_sampled_gaussian(q: f64, sigma: f64, alpha: u32) -> f64 {
    let a = alpha as usize;
    if q >= 1.0 {
        return f64::from(alpha) / (2.0 * sigma * sigma);
    }
    if q <= 0.0 {
        return 0.0;
    }
    let lf = ln_factorials(a);
    let (lq, l1q) = (q.ln(), (-q).ln_1p());
    let mut log_a = f64::NEG_INFINITY;
    for k in 0..=a {
        let kf = k as f64;
        let term = lf[a] - lf[k] - lf[a - k]
            + (a - k) as f64 * l1q
            + kf * lq
            + (kf * kf - kf) / (2.0 * sigma * sigma);
        log_a = log_add(log_a, term);
    }
    (log_a / (f64::from(alpha) - 1.0)).max(0.0)
}

/// The orders the accountant tracks: 2..=64 every integer, then a few larger ones (small ε and
/// many rounds favour large orders).
fn default_orders() -> Vec<u32> {
    (2..=64).chain([80, 96, 128, 192, 256, 384, 512]).collect()
}

/// Rényi-DP accountant: the RDP of every tracked order, summed over the steps so far. Serialisable,
/// so it is saved with the aggregator's state and survives restarts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RdpAccountant {
    orders: Vec<u32>,
    rdp: Vec<f64>,
    /// Steps recorded (rounds, or published style codes).
    pub steps: u64,
}

impl Default for RdpAccountant {
    fn default() -> Self {
        Self::new()
    }
}

impl RdpAccountant {
    pub fn new() -> Self {
        let orders = default_orders();
        Self {
            rdp: vec![0.0; orders.len()],
            orders,
            steps: 0,
        }
    }

    /// Records `count` steps of the sampled Gaussian mechanism.
    pub fn step(&mut self, q: f64, noise_multiplier: f64, count: u64) -> Result<(), DpError> {
        if !(q > 0.0 && q <= 1.0) {
            return Err(config_err("sampling_rate", format!("{q} is not in (0, 1]")));
        }
        if !(noise_multiplier.is_finite() && noise_multiplier > 0.0) {
            return Err(config_err(
                "noise_multiplier",
                format!("{noise_multiplier} is not a positive number"),
            ));
        }
        for (r, &a) in self.rdp.iter_mut().zip(&self.orders) {
            *r += count as f64 * rdp_sampled_gaussian(q, noise_multiplier, a);
        }
        self.steps += count;
        Ok(())
    }

    /// The smallest ε over the tracked orders for `delta`, and the order that gives it:
    /// `ε = rdp(α) + ln((α − 1)/α) − (ln δ + ln α) / (α − 1)` (Balle et al. 2020), at least 0.
    pub fn epsilon(&self, delta: f64) -> (f64, u32) {
        if self.steps == 0 {
            return (0.0, self.orders[0]);
        }
        self.orders
            .iter()
            .zip(&self.rdp)
            .map(|(&a, &r)| {
                let af = f64::from(a);
                let eps = r + ((af - 1.0) / af).ln() - (delta.ln() + af.ln()) / (af - 1.0);
                (eps.max(0.0), a)
            })
            .fold(
                (f64::INFINITY, 0),
                |best, x| if x.0 < best.0 { x } else { best },
            )
    }
}

/// The smallest noise multiplier (to 0.1 %) whose `steps` rounds at rate `q` stay within `epsilon`
/// at `delta`, by bisection (ε falls as the noise grows).
pub fn noise_multiplier_for(epsilon: f64, delta: f64, q: f64, steps: u64) -> Result<f64, DpError> {
    let eps_of = |z: f64| -> Result<f64, DpError> {
        let mut a = RdpAccountant::new();
        a.step(q, z, steps)?;
        Ok(a.epsilon(delta).0)
    };
    let (mut lo, mut hi) = (0.05, 500.0);
    if epsilon.is_nan() || epsilon <= 0.0 || eps_of(hi)? > epsilon {
        return Err(DpError::Unreachable {
            epsilon,
            delta,
            steps,
            lo,
            hi,
        });
    }
    if eps_of(lo)? <= epsilon {
        return Ok(lo);
    }
    while hi / lo > 1.001 {
        let mid = (lo * hi).sqrt();
        if eps_of(mid)? > epsilon {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    Ok(hi)
}

impl PrivacyReport {
    pub fn new(mechanism: &str, cfg: &DpConfig, accountant: &RdpAccountant) -> Self {
        let (epsilon, order) = accountant.epsilon(cfg.delta);
        Self {
            mechanism: mechanism.to_owned(),
            clip_norm: cfg.clip_norm,
            noise_multiplier: cfg.noise_multiplier,
            sampling_rate: cfg.sampling_rate,
            steps: accountant.steps,
            epsilon,
            delta: cfg.delta,
            order,
        }
    }
}

/// Noise for a lab's style code before it is published: clip to `clip_norm`, add `N(0, (z C)²)`,
/// and account one Gaussian step (every lab sees every code: no subsampling).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StyleNoise {
    pub clip_norm: f32,
    pub noise_multiplier: f64,
}

impl StyleNoise {
    /// Noises `code` in place and records the step in `accountant`.
    pub fn apply<R: Rng>(
        &self,
        code: &mut [f32],
        accountant: &mut RdpAccountant,
        rng: &mut R,
    ) -> Result<(), DpError> {
        let cfg = DpConfig {
            clip_norm: self.clip_norm,
            noise_multiplier: self.noise_multiplier,
            sampling_rate: 1.0,
            delta: default_delta(),
        };
        cfg.validate()?;
        clip(code, self.clip_norm)?;
        gaussian(code, self.noise_multiplier * f64::from(self.clip_norm), rng)?;
        accountant.step(1.0, self.noise_multiplier, 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn clipping_bounds_the_norm_and_leaves_short_vectors_alone() {
        let mut v = vec![3.0f32, 4.0];
        assert_eq!(clip(&mut v, 1.0).unwrap(), 5.0);
        assert!((v[0] - 0.6).abs() < 1e-6 && (v[1] - 0.8).abs() < 1e-6);
        let mut w = vec![0.3f32, 0.4];
        clip(&mut w, 1.0).unwrap();
        assert_eq!(w, vec![0.3, 0.4]);
        assert!(matches!(
            clip(&mut [f32::NAN], 1.0),
            Err(DpError::NonFinite { index: 0, .. })
        ));
    }

    #[test]
    fn distributed_noise_adds_up_to_the_central_noise() {
        // 8 labs each adding N(0, (zC)²/8) to zero updates: the sum's variance is (zC)².
        let cfg = DpConfig {
            clip_norm: 2.0,
            noise_multiplier: 1.5,
            sampling_rate: 1.0,
            delta: 1e-5,
        };
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let n = 20_000;
        let mut sum = vec![0.0f64; n];
        for _ in 0..8 {
            let mut u = vec![0.0f32; n];
            privatise_update(&mut u, &cfg, 8, &mut rng).unwrap();
            sum.iter_mut()
                .zip(&u)
                .for_each(|(s, &x)| *s += f64::from(x));
        }
        let var = sum.iter().map(|x| x * x).sum::<f64>() / n as f64;
        let want = (1.5f64 * 2.0).powi(2);
        // Standard error of a variance estimate: want · sqrt(2/n) ≈ 1 %.
        assert!(
            (var / want - 1.0).abs() < 0.05,
            "variance {var}, want {want}"
        );
    }

    #[test]
    fn rdp_matches_closed_forms() {
        // q = 1: α / (2σ²).
        assert!((rdp_sampled_gaussian(1.0, 2.0, 8) - 1.0).abs() < 1e-12);
        // α = 2: A₂ = 1 + q² (e^{1/σ²} − 1), hand-expanded from the binomial sum.
        let (q, s) = (0.1f64, 1.3f64);
        let want = (1.0 + q * q * ((1.0 / (s * s)).exp() - 1.0)).ln();
        assert!((rdp_sampled_gaussian(q, s, 2) - want).abs() < 1e-12);
        // α = 3: A₃ = (1−q)³ + 3q(1−q)² + 3q²(1−q)e^{1/σ²} + q³e^{3/σ²}; RDP = ln A₃ / 2.
        let e1 = (1.0 / (s * s)).exp();
        let e3 = (3.0 / (s * s)).exp();
        let a3 = (1.0 - q).powi(3)
            + 3.0 * q * (1.0 - q).powi(2)
            + 3.0 * q * q * (1.0 - q) * e1
            + q.powi(3) * e3;
        assert!((rdp_sampled_gaussian(q, s, 3) - a3.ln() / 2.0).abs() < 1e-12);
        // Subsampling helps a lot for small q at small orders (about q² there).
        assert!(rdp_sampled_gaussian(0.01, 1.0, 4) < 0.01 * rdp_sampled_gaussian(1.0, 1.0, 4));
        assert!(rdp_sampled_gaussian(0.5, 1.0, 16) <= rdp_sampled_gaussian(1.0, 1.0, 16));
    }

    #[test]
    fn epsilon_of_the_plain_gaussian_mechanism_by_hand() {
        // One step, q = 1, σ = 1, δ = 1e-5: ε = min over α of α/2 + ln((α−1)/α) − (ln δ + ln α)/(α−1).
        let mut a = RdpAccountant::new();
        a.step(1.0, 1.0, 1).unwrap();
        let (eps, order) = a.epsilon(1e-5);
        let by_hand = (2..=64)
            .map(|al: u32| {
                let af = f64::from(al);
                af / 2.0 + ((af - 1.0) / af).ln() - ((1e-5f64).ln() + af.ln()) / (af - 1.0)
            })
            .fold(f64::INFINITY, f64::min);
        assert!((eps - by_hand).abs() < 1e-12, "{eps} vs {by_hand}");
        assert_eq!(order, 5);
        // 4.7527 by hand; the exact ε of this Gaussian mechanism is 4.378 (Balle & Wang 2018's
        // formula): the RDP bound is an upper bound and close.
        assert!((eps - 4.7527).abs() < 1e-3, "ε = {eps}");
        // 100 rounds: the best order drops to 2 and ε = 100 + ln(1/2) + ln(1e5) − ln 2 ≈ 110.127.
        let mut b = RdpAccountant::new();
        b.step(1.0, 1.0, 100).unwrap();
        let (e100, o100) = b.epsilon(1e-5);
        assert_eq!(o100, 2);
        assert!((e100 - 110.1266).abs() < 1e-3, "ε after 100 = {e100}");
    }

    #[test]
    fn noise_for_a_target_epsilon_reaches_it() {
        for target in [1.0, 4.0, 8.0] {
            let z = noise_multiplier_for(target, 1e-5, 1.0, 20).unwrap();
            let mut a = RdpAccountant::new();
            a.step(1.0, z, 20).unwrap();
            let eps = a.epsilon(1e-5).0;
            assert!(
                eps <= target && eps > 0.99 * target,
                "z {z} gives ε {eps} for {target}"
            );
        }
        assert!(matches!(
            noise_multiplier_for(1e-9, 1e-5, 1.0, 10),
            Err(DpError::Unreachable { .. })
        ));
    }

    #[test]
    fn style_noise_is_accounted() {
        let s = StyleNoise {
            clip_norm: 1.0,
            noise_multiplier: 2.0,
        };
        let mut acc = RdpAccountant::new();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let mut code = vec![10.0f32, 0.0, 0.0];
        s.apply(&mut code, &mut acc, &mut rng).unwrap();
        assert_eq!(acc.steps, 1);
        assert!(code.iter().all(|x| x.is_finite()));
        let mut plain = RdpAccountant::new();
        plain.step(1.0, 2.0, 1).unwrap();
        assert_eq!(acc, plain);
    }
}
