//! The encoder-feature cache of a lab's labelled images: the base model's encoder (tract, the same
//! runtime that segments) runs once over every labelled image, padded by reflection to a multiple of
//! 16, and the skip features `enc0`…`enc4` are kept as float16, in memory and on disk under
//! `CACHE/<model version>/`. A round then runs only the decoder. The cache is keyed by the base
//! model's sha256 and each image's pixel hash: a new base model or a changed image rebuilds it.

use std::path::{Path, PathBuf};

use half::f16;
use serde::{Deserialize, Serialize};

use microfed_kernels::unet::{CHANNELS, DEPTH, SIZE_MULTIPLE};

use crate::augment::reflect;
use crate::dataset::IGNORE;
use crate::model::runtime::{Outputs, RuntimeError, Segmenter};
use crate::train::data::{TrainingImage, TrainingSet};

/// Why the feature cache could not be built.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error("{0}")]
    Data(String),
}

/// One labelled image's encoder features (float16) and labels, padded to multiples of 16.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CachedImage {
    pub stem: String,
    /// Original size.
    pub width: usize,
    pub height: usize,
    /// Padded size (multiples of 16).
    pub pw: usize,
    pub ph: usize,
    /// sha256 of the normalised pixels (little-endian f32): a changed image invalidates its entry.
    pub pixels_sha256: String,
    /// `enc_l` as `[CHANNELS[l], ph >> l, pw >> l]` float16 bits.
    pub levels: Vec<Vec<u16>>,
    /// Class per padded pixel; the padding is IGNORE.
    #[serde(with = "serde_bytes")]
    pub labels: Vec<u8>,
    /// The normalised pixels, padded like the features (`ph × pw`), for Fourier style codes and
    /// re-styling. Kept in memory only: the image is at hand whenever the cache is built.
    #[serde(skip, default)]
    pub pixels: Vec<f32>,
}

impl CachedImage {
    pub(crate) fn level(&self, l: usize) -> (usize, usize, usize) {
        (CHANNELS[l], self.ph >> l, self.pw >> l)
    }
}

/// The features of a lab's labelled images for one base model.
#[derive(Debug, Clone)]
pub struct FeatureCache {
    pub classes: usize,
    /// sha256 of the base model that made the features.
    pub model_version: String,
    pub train: Vec<CachedImage>,
    pub holdout: Vec<CachedImage>,
    /// Images whose features were computed now (the rest came from disk).
    pub computed: usize,
}

fn pad(img: &TrainingImage) -> (usize, usize, Vec<f32>, Vec<u8>) {
    let (w, h) = (img.width, img.height);
    let pw = w.div_ceil(SIZE_MULTIPLE) * SIZE_MULTIPLE;
    let ph = h.div_ceil(SIZE_MULTIPLE) * SIZE_MULTIPLE;
    let mut x = vec![0.0f32; pw * ph];
    let mut labels = vec![IGNORE; pw * ph];
    for y in 0..ph {
        let sy = reflect(y as isize, h);
        for xx in 0..pw {
            x[y * pw + xx] = img.pixels[sy * w + reflect(xx as isize, w)];
            if y < h && xx < w {
                labels[y * pw + xx] = img.labels[y * w + xx];
            }
        }
    }
    (pw, ph, x, labels)
}

impl FeatureCache {
    /// Features of every image of `set` under `dir/<model_version>/`, computing those missing.
    pub fn build(
        segmenter: &Segmenter,
        set: &TrainingSet,
        dir: &Path,
        model_version: &str,
    ) -> Result<Self, CacheError> {
        let dir = dir.join(crate::telemetry::clip(model_version, 16));
        std::fs::create_dir_all(&dir).map_err(|source| CacheError::Io {
            path: dir.clone(),
            source,
        })?;
        let mut computed = 0;
        let mut one = |img: &TrainingImage| -> Result<CachedImage, CacheError> {
            let (pw, ph, x, labels) = pad(img);
            let sha =
                crate::wire::protocol::sha256_hex(&crate::wire::protocol::f32_bytes(&img.pixels));
            let path = dir.join(format!("{}.feat", img.stem));
            if let Ok(bytes) = std::fs::read(&path) {
                match ciborium::from_reader::<CachedImage, _>(bytes.as_slice()) {
                    Ok(c) if c.pixels_sha256 == sha && c.pw == pw && c.ph == ph => {
                        return Ok(CachedImage {
                            labels,
                            pixels: x,
                            ..c
                        });
                    }
                    Ok(_) => {
                        tracing::info!(file = %path.display(), "image changed: recomputing its features")
                    }
                    Err(e) => {
                        tracing::warn!(file = %path.display(), error = %e, "unreadable feature cache entry: recomputing")
                    }
                }
            }
            let outs = segmenter.run(&x, 1, ph, pw, Outputs::Features)?;
            if outs.len() != DEPTH {
                return Err(CacheError::Data(format!(
                    "{}: the model gave {} feature maps, expected {DEPTH}",
                    segmenter.path().display(),
                    outs.len()
                )));
            }
            let mut levels = Vec::with_capacity(DEPTH);
            for (l, (shape, data)) in outs.into_iter().enumerate() {
                let want = [1, CHANNELS[l], ph >> l, pw >> l];
                if shape != want {
                    return Err(CacheError::Data(format!(
                        "{}: enc{l} has shape {shape:?}, expected {want:?}",
                        segmenter.path().display()
                    )));
                }
                levels.push(data.iter().map(|&v| f16::from_f32(v).to_bits()).collect());
            }
            let c = CachedImage {
                stem: img.stem.clone(),
                width: img.width,
                height: img.height,
                pw,
                ph,
                pixels_sha256: sha,
                levels,
                labels: Vec::new(),
                pixels: Vec::new(),
            };
            let mut bytes = Vec::new();
            ciborium::into_writer(&c, &mut bytes)
                .map_err(|e| CacheError::Data(format!("encoding the feature cache: {e}")))?;
            crate::fsio::write_atomic(&path, &bytes)
                .map_err(|e| CacheError::Data(e.to_string()))?;
            computed += 1;
            Ok(CachedImage {
                labels,
                pixels: x,
                ..c
            })
        };
        let train = set.train.iter().map(&mut one).collect::<Result<_, _>>()?;
        let holdout = set
            .validation
            .iter()
            .map(&mut one)
            .collect::<Result<_, _>>()?;
        Ok(Self {
            classes: set.classes.len(),
            model_version: model_version.to_owned(),
            train,
            holdout,
            computed,
        })
    }

    /// Training images (FedAvg's sample count).
    pub fn samples(&self) -> u64 {
        self.train.len() as u64
    }
}
