//! A lab's style code: computed from its feature cache (feature statistics or Fourier amplitudes), with optional noise, checked when received.

use super::*;

/// A lab's style, as published.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StyleCode {
    /// The publishing device.
    pub device: String,
    pub kind: StyleKind,
    /// sha256 (hex) of the base model whose encoder made the features (feature-stats codes of
    /// different base models are not comparable).
    pub model_version: String,
    /// Images the code was computed over.
    pub images: u32,
    /// The noise that was added (see [`PrivacyKnobs::noise_sigma`]).
    pub noise_sigma: f32,
    /// Fourier: the analysis window and band radius; 0 for feature-stats.
    pub window: u32,
    pub band: u32,
    /// feature-stats: for each stage `l`, `CHANNELS[l]` means then `CHANNELS[l]` standard deviations.
    /// fourier: mean amplitude |F(ky, kx)| / window² for ky, kx in −band..=band (row-major), except
    /// the centre (DC), which is the signed mean of the normalised pixels.
    pub values: Vec<f32>,
}

impl StyleCode {
    /// The code of a lab's training images (`cache.train`), by the model `cache.model_version`.
    /// Noise, when asked for, is drawn from the operating system's randomness.
    pub fn from_cache(
        cache: &FeatureCache,
        kind: StyleKind,
        knobs: &PrivacyKnobs,
        device: &str,
    ) -> Result<StyleCode, StyleError> {
        Self::from_cache_with_rng(cache, kind, knobs, device, &mut ChaCha8Rng::from_os_rng())
    }

    /// [`StyleCode::from_cache`] with the noise drawn from `rng` (reproducible experiments, tests).
    pub fn from_cache_with_rng(
        cache: &FeatureCache,
        kind: StyleKind,
        knobs: &PrivacyKnobs,
        device: &str,
        rng: &mut impl Rng,
    ) -> Result<StyleCode, StyleError> {
        Self::from_cache_with_band(cache, kind, knobs, device, rng, FOURIER_BAND)
    }

    /// [`StyleCode::from_cache_with_rng`] with a Fourier band radius of `band` bins (of
    /// [`FOURIER_WINDOW`]) instead of [`FOURIER_BAND`]: a wider band carries blur (the loss of high
    /// frequencies), and reveals more of the images. Unused for feature-stats codes.
    pub fn from_cache_with_band(
        cache: &FeatureCache,
        kind: StyleKind,
        knobs: &PrivacyKnobs,
        device: &str,
        rng: &mut impl Rng,
        band: usize,
    ) -> Result<StyleCode, StyleError> {
        knobs.validate()?;
        if kind == StyleKind::Fourier && (band == 0 || band >= FOURIER_WINDOW / 2) {
            return Err(StyleError::Knob {
                field: "band",
                rule: "1 ≤ band < window / 2",
                value: band as f64,
            });
        }
        let images = &cache.train;
        if images.len() < knobs.min_images as usize {
            return Err(StyleError::TooFewImages {
                device: device.to_owned(),
                images: images.len(),
                min_images: knobs.min_images,
            });
        }
        let (mut values, window, band) = match kind {
            StyleKind::FeatureStats => (feature_stats(images), 0, 0),
            StyleKind::Fourier => {
                let mut sum = vec![0.0f64; fourier_len(band)];
                let mut tiles = 0usize;
                for img in images {
                    if img.pixels.len() != img.pw * img.ph {
                        return Err(StyleError::Image {
                            width: img.pw,
                            height: img.ph,
                            got: img.pixels.len(),
                        });
                    }
                    tiles += accumulate_band(
                        &img.pixels,
                        img.pw,
                        img.width,
                        img.height,
                        FOURIER_WINDOW,
                        band,
                        &mut sum,
                    );
                }
                let v = sum.iter().map(|s| (s / tiles as f64) as f32).collect();
                (v, FOURIER_WINDOW as u32, band as u32)
            }
        };
        if knobs.noise_sigma > 0.0 {
            add_noise(kind, &mut values, knobs.noise_sigma, band as usize, rng);
        }
        let code = StyleCode {
            device: device.to_owned(),
            kind,
            model_version: cache.model_version.clone(),
            images: images.len() as u32,
            noise_sigma: knobs.noise_sigma,
            window,
            band,
            values,
        };
        code.validate()?;
        Ok(code)
    }

    /// Checks the numbers against the kind (a code from the wire may be anything).
    pub fn validate(&self) -> Result<(), StyleError> {
        let expected = match self.kind {
            StyleKind::FeatureStats => feature_stats_len(),
            StyleKind::Fourier => {
                if self.window as usize != FOURIER_WINDOW {
                    return Err(StyleError::Length {
                        device: self.device.clone(),
                        what: "the Fourier window",
                        got: self.window as usize,
                        expected: FOURIER_WINDOW,
                    });
                }
                if self.band as usize >= FOURIER_WINDOW / 2 {
                    return Err(StyleError::Length {
                        device: self.device.clone(),
                        what: "the Fourier band radius",
                        got: self.band as usize,
                        expected: FOURIER_BAND,
                    });
                }
                fourier_len(self.band as usize)
            }
        };
        if self.values.len() != expected {
            return Err(StyleError::Length {
                device: self.device.clone(),
                what: "values",
                got: self.values.len(),
                expected,
            });
        }
        if let Some(&v) = self.values.iter().find(|v| !v.is_finite()) {
            return Err(StyleError::Value {
                device: self.device.clone(),
                what: "a value",
                value: v,
            });
        }
        let negative = match self.kind {
            // Standard deviations are the second half of each stage.
            StyleKind::FeatureStats => (0..DEPTH)
                .flat_map(|l| self.stage(l).1.iter().copied())
                .find(|&s| s < 0.0),
            StyleKind::Fourier => {
                let centre = self.values.len() / 2;
                self.values
                    .iter()
                    .enumerate()
                    .find(|&(i, &a)| i != centre && a < 0.0)
                    .map(|(_, &a)| a)
            }
        };
        if let Some(v) = negative {
            return Err(StyleError::Value {
                device: self.device.clone(),
                what: "a standard deviation or amplitude",
                value: v,
            });
        }
        Ok(())
    }

    /// Means and standard deviations of encoder stage `l` (feature-stats codes; `l < DEPTH`).
    pub fn stage(&self, l: usize) -> (&[f32], &[f32]) {
        let start: usize = 2 * CHANNELS[..l].iter().sum::<usize>();
        let c = CHANNELS[l];
        let s = &self.values[start..start + 2 * c];
        s.split_at(c)
    }

    /// The code as CBOR (what goes on the wire).
    pub fn to_cbor(&self) -> Result<Vec<u8>, StyleError> {
        let mut out = Vec::new();
        ciborium::into_writer(self, &mut out).map_err(|e| StyleError::Cbor(e.to_string()))?;
        Ok(out)
    }

    /// Reads and validates a code.
    pub fn from_cbor(bytes: &[u8]) -> Result<StyleCode, StyleError> {
        let code: StyleCode =
            ciborium::from_reader(bytes).map_err(|e| StyleError::Cbor(e.to_string()))?;
        code.validate()?;
        Ok(code)
    }
}

/// Per stage and channel, mean and population standard deviation of the features over the original
/// (unpadded) area of `images`.
pub(super) fn feature_stats(images: &[CachedImage]) -> Vec<f32> {
    let mut out = Vec::with_capacity(feature_stats_len());
    for (l, &ch) in CHANNELS.iter().enumerate() {
        let mut sum = vec![0.0f64; ch];
        let mut sq = vec![0.0f64; ch];
        let mut n = 0usize;
        for img in images {
            let (lh, lw) = (img.ph >> l, img.pw >> l);
            // The padding is a reflection of the image; leave it out (ceil: a half-covered cell
            // still holds image content).
            let (h, w) = (img.height.div_ceil(1 << l), img.width.div_ceil(1 << l));
            let src = &img.levels[l];
            for k in 0..ch {
                let (mut s, mut q) = (0.0f64, 0.0f64);
                for y in 0..h.min(lh) {
                    for &b in &src[(k * lh + y) * lw..(k * lh + y) * lw + w.min(lw)] {
                        let v = f64::from(half::f16::from_bits(b).to_f32());
                        s += v;
                        q += v * v;
                    }
                }
                sum[k] += s;
                sq[k] += q;
            }
            n += h.min(lh) * w.min(lw);
        }
        let n = n.max(1) as f64;
        let means: Vec<f32> = sum.iter().map(|s| (s / n) as f32).collect();
        let sds: Vec<f32> = sum
            .iter()
            .zip(&sq)
            .map(|(s, q)| {
                let m = s / n;
                ((q / n - m * m).max(0.0)).sqrt() as f32
            })
            .collect();
        out.extend(means);
        out.extend(sds);
    }
    out
}

pub(super) fn add_noise(
    kind: StyleKind,
    values: &mut [f32],
    sigma: f32,
    band: usize,
    rng: &mut impl Rng,
) {
    let mut z = || -> f32 { StandardNormal.sample(&mut *rng) };
    match kind {
        StyleKind::FeatureStats => {
            let mut start = 0;
            for &c in &CHANNELS {
                let (means, sds) = values[start..start + 2 * c].split_at_mut(c);
                for (m, s) in means.iter_mut().zip(sds.iter_mut()) {
                    let scale = *s;
                    *m += sigma * scale * z();
                    *s = (scale + sigma * scale * z()).max(0.0);
                }
                start += 2 * c;
            }
        }
        StyleKind::Fourier => {
            let centre = fourier_len(band) / 2;
            for (i, a) in values.iter_mut().enumerate() {
                let noisy = *a + sigma * a.abs() * z();
                *a = if i == centre { noisy } else { noisy.max(0.0) };
            }
        }
    }
}
