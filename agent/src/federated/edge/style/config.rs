//! `[federation.style]`: which code, how private, how much re-styling.

use super::*;

/// What a style code summarises.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StyleKind {
    /// Per encoder stage and channel: mean and standard deviation of the features.
    #[default]
    FeatureStats,
    /// Low-frequency amplitude spectrum of the images.
    Fourier,
}

impl std::fmt::Display for StyleKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            StyleKind::FeatureStats => "feature-stats",
            StyleKind::Fourier => "fourier",
        })
    }
}

/// What a lab is willing to publish.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrivacyKnobs {
    /// A code is made only from at least this many images: an average over few images says more
    /// about each one.
    #[serde(default = "default_min_images")]
    pub min_images: u32,
    /// Gaussian noise added to each number, in units of its own scale: a channel's mean and
    /// standard deviation get noise of `noise_sigma × σ_channel`, an amplitude `noise_sigma × A`.
    /// 0 = none.
    #[serde(default)]
    pub noise_sigma: f32,
}

pub(super) fn default_min_images() -> u32 {
    3
}

impl Default for PrivacyKnobs {
    fn default() -> Self {
        Self {
            min_images: default_min_images(),
            noise_sigma: 0.0,
        }
    }
}

impl PrivacyKnobs {
    pub fn validate(&self) -> Result<(), StyleError> {
        if self.min_images == 0 {
            return Err(StyleError::Knob {
                field: "min_images",
                rule: "at least 1",
                value: 0.0,
            });
        }
        if !(self.noise_sigma.is_finite() && self.noise_sigma >= 0.0) {
            return Err(StyleError::Knob {
                field: "noise_sigma",
                rule: "finite and ≥ 0",
                value: f64::from(self.noise_sigma),
            });
        }
        Ok(())
    }
}

/// How local training uses other labs' codes.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestyleConfig {
    /// Chance that a batch (feature-stats) or a crop (fourier) is re-styled with another lab's code
    /// (with `target = "balance"`, the most it may be).
    pub probability: f32,
    /// How far towards the other style: 0 = unchanged, 1 = entirely the other lab's statistics.
    pub mix: f32,
    /// Which other lab's code, and how often ([`RestyleTarget`]): `uniform` (default; FedST) or
    /// `balance` (every style about equally often in the federation's training, `probability` a cap).
    #[serde(default)]
    pub target: RestyleTarget,
}

impl Default for RestyleConfig {
    fn default() -> Self {
        Self {
            probability: 0.5,
            mix: 1.0,
            target: RestyleTarget::Uniform,
        }
    }
}

impl RestyleConfig {
    pub fn validate(&self) -> Result<(), StyleError> {
        for (field, v) in [("probability", self.probability), ("mix", self.mix)] {
            if !(0.0..=1.0).contains(&v) {
                return Err(StyleError::Knob {
                    field,
                    rule: "in [0, 1]",
                    value: f64::from(v),
                });
            }
        }
        Ok(())
    }
}

/// `[federation.style]` in agent.toml: this lab publishes its style code and re-styles its local
/// training with the other labs' codes. Absent: style codes are off (nothing published or used).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StyleSection {
    /// `feature-stats` (default) or `fourier`.
    #[serde(default)]
    pub kind: StyleKind,
    /// See [`PrivacyKnobs::min_images`]: with fewer training images, no code is published.
    #[serde(default = "default_min_images")]
    pub min_images: u32,
    /// See [`PrivacyKnobs::noise_sigma`].
    #[serde(default)]
    pub noise_sigma: f32,
    /// Fourier codes: the band radius in frequency bins of the 128 px window (1..=63, default
    /// [`super::FOURIER_BAND`]); a wider band carries blur and noise, and reveals more of the
    /// images. Ignored for feature-stats codes.
    #[serde(default)]
    pub band: Option<usize>,
    /// `[federation.style.restyle]`: how local training uses the other labs' codes.
    #[serde(default)]
    pub restyle: RestyleConfig,
}

impl Default for StyleSection {
    fn default() -> Self {
        let k = PrivacyKnobs::default();
        Self {
            kind: StyleKind::default(),
            min_images: k.min_images,
            noise_sigma: k.noise_sigma,
            band: None,
            restyle: RestyleConfig::default(),
        }
    }
}

impl StyleSection {
    /// The Fourier band radius to use.
    pub fn band(&self) -> usize {
        self.band.unwrap_or(super::FOURIER_BAND)
    }

    pub fn knobs(&self) -> PrivacyKnobs {
        PrivacyKnobs {
            min_images: self.min_images,
            noise_sigma: self.noise_sigma,
        }
    }

    /// Checks the knobs; errors name the field as written in `[federation.style]`.
    pub fn validate(&self) -> Result<(), StyleError> {
        self.knobs().validate()?;
        if let Some(band) = self.band
            && (band == 0 || band >= super::FOURIER_WINDOW / 2)
        {
            return Err(StyleError::Knob {
                field: "band",
                rule: "1 ≤ band < 64 (half the 128 px window)",
                value: band as f64,
            });
        }
        self.restyle.validate().map_err(|e| match e {
            StyleError::Knob { field, rule, value } => StyleError::Knob {
                field: match field {
                    "probability" => "restyle.probability",
                    "mix" => "restyle.mix",
                    other => other,
                },
                rule,
                value,
            },
            other => other,
        })
    }
}
