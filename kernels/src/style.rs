//! Style codes: re-styling encoder features with another lab's per-channel statistics.
//!
//! A lab's "style" is the per-channel mean and standard deviation of its encoder features
//! ([`crate::Backend::channel_stats`]). Moving features part of the way towards another lab's style
//! (AdaIN-like) is one per-channel affine map, so the GPU runs it as a single
//! [`crate::Backend::channel_affine`]:
//!
//! `x' = (1 − mix)·x + mix·((x − μ_own)/(σ_own + eps)·σ_other + μ_other) = scale·x + shift`.

use crate::KernelError;

/// Folds the blend above into per-channel `(scale, shift)`.
///
/// `mix = 0` keeps the features, `mix = 1` gives them the other style entirely. `eps` keeps a dead
/// channel (σ_own = 0) from blowing up. The four slices must have one entry per channel.
pub fn restyle_coefficients(
    mu_own: &[f32],
    sigma_own: &[f32],
    mu_other: &[f32],
    sigma_other: &[f32],
    mix: f32,
    eps: f32,
) -> Result<(Vec<f32>, Vec<f32>), KernelError> {
    let c = mu_own.len();
    for (name, len) in [
        ("sigma_own", sigma_own.len()),
        ("mu_other", mu_other.len()),
        ("sigma_other", sigma_other.len()),
    ] {
        if len != c {
            return Err(KernelError::shape(
                "restyle_coefficients",
                format!("{name} has {len} channels but mu_own has {c}"),
            ));
        }
    }
    let mut scale = Vec::with_capacity(c);
    let mut shift = Vec::with_capacity(c);
    for i in 0..c {
        let ratio = sigma_other[i] / (sigma_own[i] + eps);
        scale.push((1.0 - mix) + mix * ratio);
        shift.push(mix * (mu_other[i] - mu_own[i] * ratio));
    }
    Ok((scale, shift))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mix_zero_is_identity_and_mix_one_matches_target_stats() {
        let (s, b) = restyle_coefficients(&[2.0], &[4.0], &[-1.0], &[0.5], 0.0, 0.0).unwrap();
        assert_eq!((s[0], b[0]), (1.0, 0.0));
        // Own feature values with mean 2 and std 4: {-2, 6}. After full restyle: mean −1, std 0.5.
        let (s, b) = restyle_coefficients(&[2.0], &[4.0], &[-1.0], &[0.5], 1.0, 0.0).unwrap();
        let y: Vec<f32> = [-2.0f32, 6.0].iter().map(|x| x * s[0] + b[0]).collect();
        assert!(
            (y[0] - -1.5).abs() < 1e-6 && (y[1] - -0.5).abs() < 1e-6,
            "{y:?}"
        );
    }

    #[test]
    fn half_mix_is_the_average_of_both_maps() {
        let (mu, sd, mu2, sd2) = ([0.3f32, -1.0], [2.0f32, 0.1], [1.0f32, 4.0], [0.5f32, 3.0]);
        let (s, b) = restyle_coefficients(&mu, &sd, &mu2, &sd2, 0.5, 1e-5).unwrap();
        for c in 0..2 {
            let x = 0.7f32;
            let full = (x - mu[c]) / (sd[c] + 1e-5) * sd2[c] + mu2[c];
            let want = 0.5 * x + 0.5 * full;
            assert!((x * s[c] + b[c] - want).abs() < 1e-5);
        }
    }

    #[test]
    fn mismatched_lengths_name_the_operand() {
        let err = restyle_coefficients(&[0.0; 3], &[1.0; 3], &[0.0; 2], &[1.0; 3], 0.5, 1e-5)
            .unwrap_err();
        assert!(err.to_string().contains("mu_other"), "{err}");
    }

    #[test]
    fn dead_channel_stays_finite() {
        let (s, b) = restyle_coefficients(&[1.0], &[0.0], &[2.0], &[1.0], 1.0, 1e-3).unwrap();
        assert!(s[0].is_finite() && b[0].is_finite());
    }
}
