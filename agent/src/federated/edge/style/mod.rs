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
//! - [`RestyleConfig`]: how often and how strongly local training re-styles a batch;
//!   [`RestylePlan`]: one lab's draws of which other lab's code ([`RestyleTarget`]: `uniform`, or
//!   `balance` so the federation trains on every style about equally often).
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

mod book;
mod code;
mod config;
mod fft;
mod plan;
mod restyle;

pub use book::*;
pub use code::*;
pub use config::*;
pub use fft::*;
pub use plan::*;
pub use restyle::*;

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
            ..RestyleConfig::default()
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
             [restyle]\nprobability = 0.25\nmix = 0.5\ntarget = \"balance\"\n",
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
                mix: 0.5,
                target: RestyleTarget::Balance,
            }
        );
        s.validate().unwrap();
        assert!(toml::from_str::<StyleSection>("min_image = 3").is_err());
        assert!(toml::from_str::<StyleSection>("kind = \"histogram\"").is_err());
        let bad = StyleSection {
            restyle: RestyleConfig {
                probability: 0.5,
                mix: 2.0,
                ..RestyleConfig::default()
            },
            ..s
        };
        let err = bad.validate().unwrap_err().to_string();
        assert!(err.contains("restyle.mix"), "{err}");
        for band in [0, 64] {
            let err = StyleSection {
                band: Some(band),
                ..s
            }
            .validate()
            .unwrap_err()
            .to_string();
            assert!(err.contains("band"), "{err}");
        }
        let wide: StyleSection = toml::from_str("kind = \"fourier\"\nband = 32").unwrap();
        wide.validate().unwrap();
        assert_eq!(wide.band(), 32);
        assert_eq!(StyleSection::default().band(), FOURIER_BAND);
        let bad = StyleSection { min_images: 0, ..s };
        assert!(
            bad.validate()
                .unwrap_err()
                .to_string()
                .contains("min_images")
        );
    }
}
