//! Style codes: what a lab shares about how its micrographs *look*, so that other labs can train on
//! their own labels rendered in that look (FedTransfer, arXiv 2111.07892; FedDG's amplitude swap).
//!
//! Labs image the same materials differently (instrument, etching, contrast, noise), so their data are
//! not identically distributed. A style code summarises the look of a lab's images; no image can be
//! rebuilt from it, but it is not content-free: measured (`attack_style`), one clear feature-stats code
//! gives a lab's grain size away about as well as its decoder update (docs/privacy.md).
//!
//! Map of this module:
//! - [`StyleKind`]: `feature-stats` (default) — per encoder stage and channel, the mean and standard
//!   deviation of the encoder features over the lab's training images (2 × 496 = 992 numbers for the
//!   reference U-Net); `fourier` — the low-frequency amplitude spectrum of the images.
//! - [`PrivacyKnobs`]: a code is made only from at least `min_images` images; optional Gaussian noise.
//! - [`StyleCode`]: the code itself (serde; [`StyleCode::to_cbor`] / [`StyleCode::from_cbor`] for the
//!   wire), made by [`StyleCode::from_cache`] from a lab's [`FeatureCache`].
//! - [`RestyleConfig`]: how often and how strongly local training re-styles a batch.
//! - [`StyleSection`]: `[federation.style]` in agent.toml (kind, privacy knobs, re-styling).
//! - [`StyleBook`]: the latest code of every other device as they arrive on `style/+` (an empty
//!   retained payload withdraws one); malformed, wrong-kind, forged-sender and invalid codes are
//!   refused ([`CodeRejected`]) and counted. [`seal_code`] makes the message a device publishes.
//! - [`restyle_image`]: the Fourier re-styling of one image (amplitude interpolation in the
//!   low-frequency band, phase kept), tile by tile with overlapping sin² windows so that images of any
//!   size work and no seams appear. Feature re-styling is the kernels crate's per-channel affine map
//!   ([`microfed_kernels::style::restyle_coefficients`]), applied by
//!   [`crate::federated::edge::local::LocalTrainer::train_round`].
//! - A small radix-2 FFT ([`fft2`]) for the Fourier codes (windows are powers of two).

use std::collections::BTreeMap;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};
use serde::{Deserialize, Serialize};

use microfed_kernels::unet::{CHANNELS, DEPTH};

use crate::augment::reflect;
use crate::federated::edge::cache::{CachedImage, FeatureCache};
use crate::wire::protocol::{Envelope, Header, Kind, MAX_PACKET_BYTES, ProtocolError, Topics};

/// Side of the square analysis window of Fourier codes, in pixels (a power of two).
pub const FOURIER_WINDOW: usize = 128;
/// Radius of the low-frequency band of Fourier codes, in frequency bins of [`FOURIER_WINDOW`]
/// (6/128 ≈ 0.05 of the sampling frequency, FedDG's β range is 0.01–0.1).
pub const FOURIER_BAND: usize = 6;

/// Numbers in a feature-stats code: mean and standard deviation of every encoder channel.
pub fn feature_stats_len() -> usize {
    2 * CHANNELS.iter().sum::<usize>()
}

/// Numbers in a Fourier code of band radius `band`.
pub fn fourier_len(band: usize) -> usize {
    (2 * band + 1) * (2 * band + 1)
}

/// Why a style code could not be made, read or used.
#[derive(Debug, thiserror::Error)]
pub enum StyleError {
    #[error(
        "style code of {device}: only {images} images, at least {min_images} needed (privacy knob min_images)"
    )]
    TooFewImages {
        device: String,
        images: usize,
        min_images: u32,
    },
    #[error("style code of {device}: {what} has {got} numbers, expected {expected}")]
    Length {
        device: String,
        what: &'static str,
        got: usize,
        expected: usize,
    },
    #[error("style code of {device}: {what} is not finite or out of range ({value})")]
    Value {
        device: String,
        what: &'static str,
        value: f32,
    },
    #[error("{field} must be {rule}, got {value}")]
    Knob {
        field: &'static str,
        rule: &'static str,
        value: f64,
    },
    #[error("image of {width}×{height} has {got} pixels")]
    Image {
        width: usize,
        height: usize,
        got: usize,
    },
    #[error("style code of {device} is {got:?}, expected {expected:?}")]
    Kind {
        device: String,
        got: StyleKind,
        expected: StyleKind,
    },
    #[error("style code CBOR: {0}")]
    Cbor(String),
}

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

fn default_min_images() -> u32 {
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
    /// Chance that a batch (feature-stats) or a crop (fourier) is re-styled with a randomly chosen
    /// other lab's code.
    pub probability: f32,
    /// How far towards the other style: 0 = unchanged, 1 = entirely the other lab's statistics.
    pub mix: f32,
}

impl Default for RestyleConfig {
    fn default() -> Self {
        Self {
            probability: 0.5,
            mix: 1.0,
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
            restyle: RestyleConfig::default(),
        }
    }
}

impl StyleSection {
    pub fn knobs(&self) -> PrivacyKnobs {
        PrivacyKnobs {
            min_images: self.min_images,
            noise_sigma: self.noise_sigma,
        }
    }

    /// Checks the knobs; errors name the field as written in `[federation.style]`.
    pub fn validate(&self) -> Result<(), StyleError> {
        self.knobs().validate()?;
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

/// Why a message on `style/<device>` was dropped (each is counted on the status board).
#[derive(Debug, thiserror::Error)]
pub enum CodeRejected {
    #[error("{topic}: not a style topic of this fleet")]
    Topic { topic: String },
    #[error("{topic}: {source}")]
    Envelope {
        topic: String,
        source: ProtocolError,
    },
    #[error("{topic}: a message of fleet {found:?}, this device is in fleet {expected:?}")]
    Fleet {
        topic: String,
        found: String,
        expected: String,
    },
    #[error("{topic}: sent by {sender:?} for a code of {code_device:?} (forged sender)")]
    Sender {
        topic: String,
        sender: String,
        code_device: String,
    },
    #[error("{topic}: the code was made by base model {code}, the envelope says {envelope}")]
    ModelVersion {
        topic: String,
        code: String,
        envelope: String,
    },
    #[error("{topic}: {source}")]
    Code { topic: String, source: StyleError },
}

/// What a style message did to the [`StyleBook`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Received {
    /// Another device's code, new or replacing its previous one.
    Stored { device: String },
    /// An empty (retained) payload: that device withdrew its code.
    Removed { device: String },
    /// This device's own code, as the broker holds it (`empty`: none is held).
    Own { empty: bool },
}

/// The latest style code of every other device of the fleet, as they arrive on `style/+`.
///
/// Codes of every base model are kept (a device's retained code arrives once, maybe before this
/// device has moved to the same base model); [`StyleBook::codes_for`] hands out only those of one
/// base model, since features of another encoder are not comparable.
#[derive(Debug)]
pub struct StyleBook {
    topics: Topics,
    fleet: String,
    device: String,
    codes: BTreeMap<String, StyleCode>,
    rejected: u64,
    generation: u64,
}

impl StyleBook {
    /// The book of `device` in `fleet`.
    pub fn new(fleet: &str, device: &str) -> Result<Self, String> {
        Ok(Self {
            topics: Topics::new(fleet)?,
            fleet: fleet.to_owned(),
            device: device.to_owned(),
            codes: BTreeMap::new(),
            rejected: 0,
            generation: 0,
        })
    }

    /// Takes one message of `microfed/<fleet>/style/+`. A refused message is counted
    /// ([`StyleBook::rejected`]) and leaves the book as it was.
    pub fn receive(&mut self, topic: &str, payload: &[u8]) -> Result<Received, CodeRejected> {
        let r = self.check(topic, payload);
        match &r {
            Ok(Received::Stored { .. } | Received::Removed { .. }) => self.generation += 1,
            Ok(Received::Own { .. }) => {}
            Err(_) => self.rejected += 1,
        }
        r
    }

    fn check(&mut self, topic: &str, payload: &[u8]) -> Result<Received, CodeRejected> {
        let Some(device) = self.topics.device_of("style", topic) else {
            return Err(CodeRejected::Topic {
                topic: topic.to_owned(),
            });
        };
        if payload.is_empty() {
            if device == self.device {
                return Ok(Received::Own { empty: true });
            }
            self.codes.remove(device);
            return Ok(Received::Removed {
                device: device.to_owned(),
            });
        }
        let bad = |source| CodeRejected::Envelope {
            topic: topic.to_owned(),
            source,
        };
        let env = Envelope::from_bytes(payload, MAX_PACKET_BYTES).map_err(bad)?;
        if env.fleet != self.fleet {
            return Err(CodeRejected::Fleet {
                topic: topic.to_owned(),
                found: env.fleet,
                expected: self.fleet.clone(),
            });
        }
        let code: StyleCode = env.body(Kind::StyleCode).map_err(bad)?;
        // The ACL lets a device write only its own topic; the sender and the code must say the same
        // device, or one lab could pass its code off as another's.
        if env.sender != device || code.device != device {
            return Err(CodeRejected::Sender {
                topic: topic.to_owned(),
                sender: env.sender,
                code_device: code.device,
            });
        }
        if code.model_version != env.model_version {
            return Err(CodeRejected::ModelVersion {
                topic: topic.to_owned(),
                code: code.model_version,
                envelope: env.model_version,
            });
        }
        code.validate().map_err(|source| CodeRejected::Code {
            topic: topic.to_owned(),
            source,
        })?;
        if device == self.device {
            return Ok(Received::Own { empty: false });
        }
        self.codes.insert(device.to_owned(), code);
        Ok(Received::Stored {
            device: device.to_owned(),
        })
    }

    /// The other devices' codes made by base model `model_version`, by device id.
    pub fn codes_for(&self, model_version: &str) -> Vec<StyleCode> {
        self.codes
            .values()
            .filter(|c| c.model_version == model_version)
            .cloned()
            .collect()
    }

    /// The devices whose codes [`StyleBook::codes_for`] returns (sorted).
    pub fn devices_for(&self, model_version: &str) -> Vec<String> {
        self.codes
            .values()
            .filter(|c| c.model_version == model_version)
            .map(|c| c.device.clone())
            .collect()
    }

    /// Messages refused so far.
    pub fn rejected(&self) -> u64 {
        self.rejected
    }

    /// Changes with every stored or removed code: the trainer needs the codes again.
    pub fn generation(&self) -> u64 {
        self.generation
    }
}

/// A code as it goes on `style/<device>`: an envelope of kind `style_code` from `code.device`.
pub fn seal_code(fleet: &str, round: u64, code: &StyleCode) -> Result<Vec<u8>, ProtocolError> {
    let header = Header {
        fleet,
        round,
        model_version: &code.model_version,
        sender: &code.device,
    };
    Envelope::seal(Kind::StyleCode, &header, code)?.to_bytes()
}

/// Per stage and channel, mean and population standard deviation of the features over the original
/// (unpadded) area of `images`.
fn feature_stats(images: &[CachedImage]) -> Vec<f32> {
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

fn add_noise(kind: StyleKind, values: &mut [f32], sigma: f32, band: usize, rng: &mut impl Rng) {
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

/// Starts of `size`-wide tiles over `0..len`, `hop` apart, from `first` on until the end is covered.
fn tile_starts(len: usize, size: usize, hop: usize, first: isize) -> Vec<isize> {
    let mut out = vec![first];
    while out
        .last()
        .is_some_and(|&s| s + (size as isize) < len as isize)
    {
        let next = out.last().copied().unwrap_or(0) + hop as isize;
        out.push(next);
    }
    out
}

/// Cuts the `n × n` tile at (`y0`, `x0`) of the `w × h` image (row stride `stride`), reflecting at
/// the image's edges.
fn cut_tile(
    pixels: &[f32],
    stride: usize,
    w: usize,
    h: usize,
    y0: isize,
    x0: isize,
    n: usize,
) -> Vec<f32> {
    let mut t = vec![0.0f32; n * n];
    for y in 0..n {
        let sy = reflect(y0 + y as isize, h);
        for x in 0..n {
            t[y * n + x] = pixels[sy * stride + reflect(x0 + x as isize, w)];
        }
    }
    t
}

/// Index of frequency (`ky`, `kx`) (each in −n/2..n/2) in an `n × n` unshifted spectrum.
fn bin(k: isize, n: usize) -> usize {
    k.rem_euclid(n as isize) as usize
}

/// Adds the band's amplitudes of every non-overlapping `n × n` tile of the `w × h` image to `sum`
/// (DC: the signed mean); returns the number of tiles.
fn accumulate_band(
    pixels: &[f32],
    stride: usize,
    w: usize,
    h: usize,
    n: usize,
    band: usize,
    sum: &mut [f64],
) -> usize {
    let ys = tile_starts(h, n, n, 0);
    let xs = tile_starts(w, n, n, 0);
    let norm = (n * n) as f64;
    let b = band as isize;
    for &y0 in &ys {
        for &x0 in &xs {
            // The last tile ends at the edge instead of reaching past it.
            let y0 = y0.min((h as isize - n as isize).max(0));
            let x0 = x0.min((w as isize - n as isize).max(0));
            let mut re: Vec<f64> = cut_tile(pixels, stride, w, h, y0, x0, n)
                .into_iter()
                .map(f64::from)
                .collect();
            let mut im = vec![0.0f64; n * n];
            fft2(&mut re, &mut im, n, false);
            let mut i = 0;
            for ky in -b..=b {
                for kx in -b..=b {
                    let at = bin(ky, n) * n + bin(kx, n);
                    sum[i] += if ky == 0 && kx == 0 {
                        re[at] / norm
                    } else {
                        re[at].hypot(im[at]) / norm
                    };
                    i += 1;
                }
            }
        }
    }
    ys.len() * xs.len()
}

/// Re-styles a `w × h` image (row stride `stride`, normalised pixels) towards a Fourier code:
/// in every window, the low-frequency amplitudes move `mix` of the way to the code's, the phase is
/// kept, and the windows (half-overlapping, sin²-weighted, which sum to one) are added back together.
/// Returns `w × h` pixels (row stride `w`).
pub fn restyle_image(
    pixels: &[f32],
    stride: usize,
    w: usize,
    h: usize,
    code: &StyleCode,
    mix: f32,
) -> Result<Vec<f32>, StyleError> {
    if code.kind != StyleKind::Fourier {
        return Err(StyleError::Kind {
            device: code.device.clone(),
            got: code.kind,
            expected: StyleKind::Fourier,
        });
    }
    code.validate()?;
    if w == 0 || h == 0 || stride < w || pixels.len() < stride * (h - 1) + w {
        return Err(StyleError::Image {
            width: w,
            height: h,
            got: pixels.len(),
        });
    }
    let n = code.window as usize;
    let b = code.band as isize;
    let hop = n / 2;
    let win: Vec<f64> = (0..n)
        .map(|i| {
            (std::f64::consts::PI * (i as f64 + 0.5) / n as f64)
                .sin()
                .powi(2)
        })
        .collect();
    let norm = (n * n) as f64;
    let mix = f64::from(mix);
    let mut acc = vec![0.0f64; w * h];
    let mut weight = vec![0.0f64; w * h];
    for &y0 in &tile_starts(h, n, hop, -(hop as isize)) {
        for &x0 in &tile_starts(w, n, hop, -(hop as isize)) {
            let mut re: Vec<f64> = cut_tile(pixels, stride, w, h, y0, x0, n)
                .into_iter()
                .map(f64::from)
                .collect();
            let mut im = vec![0.0f64; n * n];
            fft2(&mut re, &mut im, n, false);
            let mut i = 0;
            for ky in -b..=b {
                for kx in -b..=b {
                    let at = bin(ky, n) * n + bin(kx, n);
                    let target = f64::from(code.values[i]) * norm;
                    if ky == 0 && kx == 0 {
                        // DC is real and signed: interpolate the mean itself.
                        re[at] = (1.0 - mix) * re[at] + mix * target;
                        im[at] = 0.0;
                    } else {
                        let a = re[at].hypot(im[at]);
                        let a_new = (1.0 - mix) * a + mix * target;
                        if a > 1e-12 {
                            re[at] *= a_new / a;
                            im[at] *= a_new / a;
                        } else {
                            re[at] = a_new;
                            im[at] = 0.0;
                        }
                    }
                    i += 1;
                }
            }
            // The band is symmetric (−b..=b), so conjugate pairs stay conjugate and the result is real.
            fft2(&mut re, &mut im, n, true);
            for ty in 0..n {
                let y = y0 + ty as isize;
                if y < 0 || y >= h as isize {
                    continue;
                }
                for tx in 0..n {
                    let x = x0 + tx as isize;
                    if x < 0 || x >= w as isize {
                        continue;
                    }
                    let wt = win[ty] * win[tx];
                    let at = y as usize * w + x as usize;
                    acc[at] += wt * re[ty * n + tx];
                    weight[at] += wt;
                }
            }
        }
    }
    Ok(acc
        .iter()
        .zip(&weight)
        .map(|(a, wt)| if *wt > 0.0 { (a / wt) as f32 } else { 0.0 })
        .collect())
}

/// In-place radix-2 FFT of length `re.len()` (a power of two); `inverse` divides by the length.
fn fft(re: &mut [f64], im: &mut [f64], inverse: bool) {
    let n = re.len();
    if n <= 1 {
        return;
    }
    let bits = n.trailing_zeros();
    for i in 0..n {
        let j = i.reverse_bits() >> (usize::BITS - bits);
        if j > i {
            re.swap(i, j);
            im.swap(i, j);
        }
    }
    let sign = if inverse { 1.0 } else { -1.0 };
    let mut len = 2;
    while len <= n {
        let ang = sign * 2.0 * std::f64::consts::PI / len as f64;
        let (wr, wi) = (ang.cos(), ang.sin());
        for start in (0..n).step_by(len) {
            let (mut cr, mut ci) = (1.0f64, 0.0f64);
            for k in 0..len / 2 {
                let (a, b) = (start + k, start + k + len / 2);
                let tr = re[b] * cr - im[b] * ci;
                let ti = re[b] * ci + im[b] * cr;
                re[b] = re[a] - tr;
                im[b] = im[a] - ti;
                re[a] += tr;
                im[a] += ti;
                (cr, ci) = (cr * wr - ci * wi, cr * wi + ci * wr);
            }
        }
        len <<= 1;
    }
    if inverse {
        let s = 1.0 / n as f64;
        re.iter_mut().for_each(|v| *v *= s);
        im.iter_mut().for_each(|v| *v *= s);
    }
}

/// 2-D FFT of an `n × n` row-major array (`n` a power of two): rows, then columns.
pub fn fft2(re: &mut [f64], im: &mut [f64], n: usize, inverse: bool) {
    for y in 0..n {
        fft(
            &mut re[y * n..(y + 1) * n],
            &mut im[y * n..(y + 1) * n],
            inverse,
        );
    }
    let (mut cr, mut ci) = (vec![0.0f64; n], vec![0.0f64; n]);
    for x in 0..n {
        for y in 0..n {
            cr[y] = re[y * n + x];
            ci[y] = im[y * n + x];
        }
        fft(&mut cr, &mut ci, inverse);
        for y in 0..n {
            re[y * n + x] = cr[y];
            im[y * n + x] = ci[y];
        }
    }
}

/// A seeded generator for reproducible noise (experiments).
pub fn seeded_rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::f16;

    fn image(
        stem: &str,
        w: usize,
        h: usize,
        f: impl Fn(usize, usize, usize, usize) -> f32,
    ) -> CachedImage {
        // Feature value of stage l, channel k at (y, x) = f(l, k, y, x); pixels = f(0, 0, y, x).
        let (pw, ph) = (w.div_ceil(16) * 16, h.div_ceil(16) * 16);
        let levels = (0..DEPTH)
            .map(|l| {
                let (lh, lw) = (ph >> l, pw >> l);
                let mut v = Vec::with_capacity(CHANNELS[l] * lh * lw);
                for k in 0..CHANNELS[l] {
                    for y in 0..lh {
                        for x in 0..lw {
                            v.push(f16::from_f32(f(l, k, y, x)).to_bits());
                        }
                    }
                }
                v
            })
            .collect();
        CachedImage {
            stem: stem.into(),
            width: w,
            height: h,
            pw,
            ph,
            pixels_sha256: String::new(),
            levels,
            labels: vec![0; pw * ph],
            pixels: (0..ph)
                .flat_map(|y| (0..pw).map(move |x| (y, x)))
                .map(|(y, x)| f(0, 0, y, x))
                .collect(),
        }
    }

    fn cache(train: Vec<CachedImage>) -> FeatureCache {
        FeatureCache {
            classes: 2,
            model_version: "m".into(),
            train,
            holdout: vec![],
            computed: 0,
        }
    }

    #[test]
    fn fft_matches_the_direct_dft_and_inverts() {
        let n = 8;
        let mut rng = seeded_rng(3);
        let x: Vec<f64> = (0..n * n).map(|_| rng.random::<f64>() - 0.5).collect();
        let (mut re, mut im) = (x.clone(), vec![0.0; n * n]);
        fft2(&mut re, &mut im, n, false);
        for (ky, kx) in [(0, 0), (1, 2), (3, 7), (5, 5)] {
            let (mut sr, mut si) = (0.0, 0.0);
            for y in 0..n {
                for xx in 0..n {
                    let a = -2.0 * std::f64::consts::PI * ((ky * y + kx * xx) as f64) / n as f64;
                    sr += x[y * n + xx] * a.cos();
                    si += x[y * n + xx] * a.sin();
                }
            }
            assert!((re[ky * n + kx] - sr).abs() < 1e-9 && (im[ky * n + kx] - si).abs() < 1e-9);
        }
        fft2(&mut re, &mut im, n, true);
        for (a, b) in re.iter().zip(&x) {
            assert!((a - b).abs() < 1e-12);
        }
        assert!(im.iter().all(|v| v.abs() < 1e-12));
    }

    #[test]
    fn feature_stats_are_the_mean_and_std_of_each_channel_without_padding() {
        // Stage l, channel k: columns alternate k and k + 2 (mean k + 1, std 1) inside the image;
        // the padding (x ≥ 8 at stage 0) holds 100s that must not count.
        let img = image("a", 8, 16, |l, k, _y, x| {
            if x >= 8usize.div_ceil(1 << l) {
                100.0
            } else {
                k as f32 + if x % 2 == 0 { 0.0 } else { 2.0 }
            }
        });
        let code = StyleCode::from_cache(
            &cache(vec![img.clone(), img]),
            StyleKind::FeatureStats,
            &PrivacyKnobs {
                min_images: 2,
                noise_sigma: 0.0,
            },
            "lab-a",
        )
        .unwrap();
        assert_eq!(code.values.len(), 992);
        assert_eq!((code.images, code.model_version.as_str()), (2, "m"));
        for (l, &channels) in CHANNELS.iter().enumerate().take(3) {
            let (mu, sd) = code.stage(l);
            for k in [0, 5, channels - 1] {
                assert!(
                    (mu[k] - (k as f32 + 1.0)).abs() < 1e-2,
                    "stage {l} ch {k}: {}",
                    mu[k]
                );
                assert!((sd[k] - 1.0).abs() < 1e-3, "stage {l} ch {k}: {}", sd[k]);
            }
        }
        // Stages 3 and 4 are one column wide (8 px / 8 and / 16, rounded up): x = 0 only, std 0.
        for l in [3, 4] {
            let (mu, sd) = code.stage(l);
            assert!(
                (mu[3] - 3.0).abs() < 1e-2 && sd[3].abs() < 1e-6,
                "stage {l}"
            );
        }
    }

    #[test]
    fn too_few_images_publish_nothing_and_noise_is_seeded() {
        let img = image("a", 16, 16, |_, k, y, x| (k + y * x) as f32 * 0.01);
        let c = cache(vec![img.clone(), img]);
        let err = StyleCode::from_cache(&c, StyleKind::FeatureStats, &PrivacyKnobs::default(), "d")
            .unwrap_err();
        assert!(err.to_string().contains("min_images"), "{err}");
        let knobs = PrivacyKnobs {
            min_images: 1,
            noise_sigma: 0.1,
        };
        let exact = StyleCode::from_cache(
            &c,
            StyleKind::FeatureStats,
            &PrivacyKnobs {
                noise_sigma: 0.0,
                ..knobs
            },
            "d",
        )
        .unwrap();
        let a = StyleCode::from_cache_with_rng(
            &c,
            StyleKind::FeatureStats,
            &knobs,
            "d",
            &mut seeded_rng(1),
        )
        .unwrap();
        let b = StyleCode::from_cache_with_rng(
            &c,
            StyleKind::FeatureStats,
            &knobs,
            "d",
            &mut seeded_rng(1),
        )
        .unwrap();
        assert_eq!(a, b);
        assert_ne!(a.values, exact.values);
        // Noise is relative to each channel's spread: the mean moves by about 0.1 σ on average.
        let (mu, sd) = exact.stage(1);
        let (mu_n, sd_n) = a.stage(1);
        let moved: f32 = mu
            .iter()
            .zip(mu_n)
            .zip(sd)
            .map(|((m, n), s)| (m - n).abs() / s)
            .sum::<f32>()
            / mu.len() as f32;
        assert!((0.03..0.2).contains(&moved), "{moved}");
        assert!(sd_n.iter().all(|&s| s >= 0.0));
        assert!(
            PrivacyKnobs {
                min_images: 0,
                noise_sigma: 0.0
            }
            .validate()
            .is_err()
        );
    }

    #[test]
    fn cbor_round_trip_and_a_truncated_code_is_refused() {
        let img = image("a", 16, 16, |l, k, y, x| {
            ((l + k + y) % 3) as f32 - x as f32 * 0.1
        });
        let code = StyleCode::from_cache(
            &cache(vec![img]),
            StyleKind::FeatureStats,
            &PrivacyKnobs {
                min_images: 1,
                noise_sigma: 0.0,
            },
            "lab-b",
        )
        .unwrap();
        let back = StyleCode::from_cbor(&code.to_cbor().unwrap()).unwrap();
        assert_eq!(back, code);
        let mut bad = code.clone();
        bad.values.truncate(10);
        let err = StyleCode::from_cbor(&bad.to_cbor().unwrap()).unwrap_err();
        assert!(
            err.to_string()
                .contains("values has 10 numbers, expected 992"),
            "{err}"
        );
        let mut neg = code;
        neg.values[CHANNELS[0]] = -1.0; // the first standard deviation
        assert!(neg.validate().is_err());
    }

    fn texture(w: usize, h: usize, contrast: f32, offset: f32, seed: u64) -> Vec<f32> {
        let mut rng = seeded_rng(seed);
        let phase: f32 = rng.random::<f32>() * 6.0;
        (0..h)
            .flat_map(|y| (0..w).map(move |x| (y, x)))
            .map(|(y, x)| {
                let v = (x as f32 * 0.21 + phase).sin() * (y as f32 * 0.13).cos()
                    + 0.5 * (x as f32 * 0.05 + y as f32 * 0.03).sin();
                offset + contrast * v
            })
            .collect()
    }

    fn fourier_code(pixels: &[f32], w: usize, h: usize) -> StyleCode {
        let img = CachedImage {
            pixels: pixels.to_vec(),
            ..image("f", w, h, |_, _, _, _| 0.0)
        };
        StyleCode::from_cache(
            &cache(vec![img]),
            StyleKind::Fourier,
            &PrivacyKnobs {
                min_images: 1,
                noise_sigma: 0.0,
            },
            "lab-f",
        )
        .unwrap()
    }

    #[test]
    fn fourier_restyle_keeps_the_image_at_mix_zero_and_takes_the_code_at_mix_one() {
        let (w, h) = (160, 144);
        let a = texture(w, h, 1.0, 0.0, 1);
        let b = texture(w, h, 0.3, 1.5, 2);
        let code_b = fourier_code(&b, w, h);
        assert_eq!(code_b.values.len(), fourier_len(FOURIER_BAND));
        // The DC entry is the signed mean.
        let dc = code_b.values[code_b.values.len() / 2];
        let mean_b = b.iter().sum::<f32>() / b.len() as f32;
        assert!((dc - mean_b).abs() < 0.05, "{dc} vs {mean_b}");
        // mix 0: the overlapping sin² windows sum to one, so the image comes back unchanged.
        let same = restyle_image(&a, w, w, h, &code_b, 0.0).unwrap();
        let worst = same
            .iter()
            .zip(&a)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max);
        assert!(worst < 1e-4, "{worst}");
        // mix 1: the re-styled image's low band is much closer to B's than A's was.
        let styled = restyle_image(&a, w, w, h, &code_b, 1.0).unwrap();
        let code_a = fourier_code(&a, w, h);
        let code_s = fourier_code(&styled, w, h);
        let dist = |x: &StyleCode| -> f32 {
            x.values
                .iter()
                .zip(&code_b.values)
                .map(|(p, q)| (p - q).powi(2))
                .sum::<f32>()
                .sqrt()
        };
        assert!(
            dist(&code_s) < 0.2 * dist(&code_a),
            "{} vs {}",
            dist(&code_s),
            dist(&code_a)
        );
        let mean_s = styled.iter().sum::<f32>() / styled.len() as f32;
        assert!((mean_s - mean_b).abs() < 0.05, "{mean_s} vs {mean_b}");
        // A feature-stats code cannot re-style pixels.
        let fs = StyleCode {
            kind: StyleKind::FeatureStats,
            values: vec![0.0; feature_stats_len()],
            window: 0,
            band: 0,
            ..code_b
        };
        assert!(matches!(
            restyle_image(&a, w, w, h, &fs, 1.0),
            Err(StyleError::Kind { .. })
        ));
    }

    #[test]
    fn restyle_config_ranges_are_checked() {
        assert!(RestyleConfig::default().validate().is_ok());
        let err = RestyleConfig {
            probability: 1.5,
            mix: 0.5,
        }
        .validate()
        .unwrap_err();
        assert!(err.to_string().contains("probability"), "{err}");
    }

    fn wire_code(device: &str, model: &str, value: f32) -> StyleCode {
        StyleCode {
            device: device.into(),
            kind: StyleKind::FeatureStats,
            model_version: model.into(),
            images: 4,
            noise_sigma: 0.0,
            window: 0,
            band: 0,
            values: vec![value; feature_stats_len()],
        }
    }

    const TOPIC: &str = "microfed/f/style/";

    #[test]
    fn the_style_book_keeps_the_latest_code_per_device_and_hands_out_the_current_models() {
        let mut book = StyleBook::new("f", "me").unwrap();
        let seal = |c: &StyleCode| seal_code("f", 0, c).unwrap();
        let a1 = wire_code("lab-a", "m1", 1.0);
        let a2 = wire_code("lab-a", "m1", 2.0);
        let b0 = wire_code("lab-b", "m0", 3.0);
        assert_eq!(
            book.receive(&format!("{TOPIC}lab-a"), &seal(&a1)).unwrap(),
            Received::Stored {
                device: "lab-a".into()
            }
        );
        book.receive(&format!("{TOPIC}lab-a"), &seal(&a2)).unwrap();
        book.receive(&format!("{TOPIC}lab-b"), &seal(&b0)).unwrap();
        assert_eq!(book.generation(), 3);
        // Latest per device; only the codes of the asked base model.
        assert_eq!(book.codes_for("m1"), vec![a2.clone()]);
        assert_eq!(book.devices_for("m0"), ["lab-b"]);
        assert!(book.codes_for("m2").is_empty());
        // This device's own code is not kept (it does not re-style towards itself).
        let own = wire_code("me", "m1", 5.0);
        assert_eq!(
            book.receive(&format!("{TOPIC}me"), &seal(&own)).unwrap(),
            Received::Own { empty: false }
        );
        assert_eq!(book.devices_for("m1"), ["lab-a"]);
        assert_eq!(book.generation(), 3);
        // An empty retained payload withdraws the device's code.
        assert_eq!(
            book.receive(&format!("{TOPIC}lab-a"), b"").unwrap(),
            Received::Removed {
                device: "lab-a".into()
            }
        );
        assert!(book.codes_for("m1").is_empty());
        assert_eq!(book.devices_for("m0"), ["lab-b"]);
        assert_eq!(
            book.receive(&format!("{TOPIC}me"), b"").unwrap(),
            Received::Own { empty: true }
        );
        assert_eq!((book.generation(), book.rejected()), (4, 0));
    }

    #[test]
    fn the_style_book_counts_and_drops_bad_messages_without_changing() {
        let mut book = StyleBook::new("f", "me").unwrap();
        let good = wire_code("lab-a", "m1", 1.0);
        book.receive(&format!("{TOPIC}lab-a"), &seal_code("f", 0, &good).unwrap())
            .unwrap();
        let topic_x = format!("{TOPIC}lab-x");
        // lab-x passes lab-a's code off as its own: envelope sender, or the code's device, differs.
        let forged_sender = seal_code("f", 0, &good).unwrap();
        let mut renamed = good.clone();
        renamed.values[0] = 9.0;
        let header = |sender: &'static str, model: &'static str| Header {
            fleet: "f",
            round: 0,
            model_version: model,
            sender,
        };
        let forged_code = Envelope::seal(Kind::StyleCode, &header("lab-x", "m1"), &renamed)
            .and_then(|e| e.to_bytes())
            .unwrap();
        let wrong_kind = Envelope::seal(Kind::Status, &header("lab-x", "m1"), &good)
            .and_then(|e| e.to_bytes())
            .unwrap();
        let mut short = wire_code("lab-x", "m1", 1.0);
        short.values.truncate(10);
        let invalid = seal_code("f", 0, &short).unwrap();
        let other_fleet = seal_code("g", 0, &wire_code("lab-x", "m1", 1.0)).unwrap();
        let model_mismatch = Envelope::seal(
            Kind::StyleCode,
            &header("lab-x", "m0"),
            &wire_code("lab-x", "m1", 1.0),
        )
        .and_then(|e| e.to_bytes())
        .unwrap();
        let cases: [(&str, &[u8], &str); 8] = [
            (&topic_x, b"not cbor", "not valid CBOR"),
            (&topic_x, &forged_sender, "forged sender"),
            (&topic_x, &forged_code, "forged sender"),
            (&topic_x, &wrong_kind, "expected a StyleCode message"),
            (&topic_x, &invalid, "values has 10 numbers"),
            (&topic_x, &other_fleet, "fleet \"g\""),
            (&topic_x, &model_mismatch, "base model m1"),
            ("microfed/g/style/lab-x", &invalid, "not a style topic"),
        ];
        for (i, (topic, payload, why)) in cases.iter().enumerate() {
            let err = book.receive(topic, payload).unwrap_err();
            assert!(err.to_string().contains(why), "{err}");
            assert!(err.to_string().contains(topic), "{err}");
            assert_eq!(book.rejected(), i as u64 + 1);
        }
        assert_eq!(book.codes_for("m1"), vec![good]);
        assert_eq!(book.generation(), 1);
    }

    #[test]
    fn the_style_section_parses_with_defaults_and_names_bad_fields() {
        let s: StyleSection = toml::from_str("").unwrap();
        assert_eq!(s, StyleSection::default());
        assert_eq!(
            (s.kind, s.min_images, s.restyle.mix),
            (StyleKind::FeatureStats, 3, 1.0)
        );
        let s: StyleSection = toml::from_str(
            "kind = \"fourier\"\nmin_images = 8\nnoise_sigma = 0.05\n\
             [restyle]\nprobability = 0.25\nmix = 0.5\n",
        )
        .unwrap();
        assert_eq!(s.kind, StyleKind::Fourier);
        assert_eq!(
            s.knobs(),
            PrivacyKnobs {
                min_images: 8,
                noise_sigma: 0.05
            }
        );
        assert_eq!(
            s.restyle,
            RestyleConfig {
                probability: 0.25,
                mix: 0.5
            }
        );
        s.validate().unwrap();
        assert!(toml::from_str::<StyleSection>("min_image = 3").is_err());
        assert!(toml::from_str::<StyleSection>("kind = \"histogram\"").is_err());
        let bad = StyleSection {
            restyle: RestyleConfig {
                probability: 0.5,
                mix: 2.0,
            },
            ..s
        };
        let err = bad.validate().unwrap_err().to_string();
        assert!(err.contains("restyle.mix"), "{err}");
        let bad = StyleSection { min_images: 0, ..s };
        assert!(
            bad.validate()
                .unwrap_err()
                .to_string()
                .contains("min_images")
        );
    }
}
