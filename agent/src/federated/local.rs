//! A lab's side of a round: the encoder-feature cache and local decoder fine-tuning.
//!
//! - [`FeatureCache::build`]: runs the base model's encoder (tract, the same runtime that segments)
//!   once over every labelled image, padded by reflection to a multiple of 16, and keeps the skip
//!   features `enc0`…`enc4` as float16, in memory and on disk under `CACHE/<model version>/`. A round
//!   then runs only the decoder. The cache is keyed by the base model's sha256 and each image's pixel
//!   hash: a new base model or a changed image rebuilds it.
//! - [`LocalTrainer`]: the kernels crate's U-Net (CPU or CUDA backend) with a frozen encoder.
//!   [`LocalTrainer::train_round`] starts from the announced global decoder, trains E local epochs
//!   of random crops cut from the cached features (crops aligned to 16 pixels, so every level's crop
//!   is exact), optionally with FedProx, and returns the local decoder.
//!   [`LocalTrainer::holdout_iou`] scores a decoder on the lab's hold-out images.
//!
//! No geometric augmentation here: flipping a feature map is not the features of a flipped image
//! (the filters are not symmetric). Crops from whole-image features carry the context the decoder
//! sees at inference.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use half::f16;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use microfed_kernels::unet::{CHANNELS, DEPTH, Loss, Optim, Params, SIZE_MULTIPLE, UNet};
use microfed_kernels::{Backend, KernelError, Shape};

use crate::dataset::IGNORE;
use crate::mask::Mask;
use crate::metrics::ConfusionMatrix;
use crate::model::runtime::{Outputs, RuntimeError, Segmenter};
use crate::train::augment::reflect;
use crate::train::data::{TrainingImage, TrainingSet, auto_class_weights};

/// Why local training could not run.
#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error(transparent)]
    Kernel(#[from] KernelError),
    #[error("{0}")]
    Data(String),
    #[error("local training diverged in round {round} (loss {loss})")]
    Diverged { round: u64, loss: f32 },
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
}

impl CachedImage {
    fn level(&self, l: usize) -> (usize, usize, usize) {
        (CHANNELS[l], self.ph >> l, self.pw >> l)
    }
}

/// The features of a lab's labelled images for one base model.
#[derive(Debug, Clone)]
pub struct FeatureCache {
    pub classes: usize,
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
    ) -> Result<Self, LocalError> {
        let dir = dir.join(&model_version[..model_version.len().min(16)]);
        std::fs::create_dir_all(&dir).map_err(|source| LocalError::Io {
            path: dir.clone(),
            source,
        })?;
        let mut computed = 0;
        let mut one = |img: &TrainingImage| -> Result<CachedImage, LocalError> {
            let (pw, ph, x, labels) = pad(img);
            let sha = super::protocol::sha256_hex(&super::protocol::f32_bytes(&img.pixels));
            let path = dir.join(format!("{}.feat", img.stem));
            if let Ok(bytes) = std::fs::read(&path) {
                match ciborium::from_reader::<CachedImage, _>(bytes.as_slice()) {
                    Ok(c) if c.pixels_sha256 == sha && c.pw == pw && c.ph == ph => {
                        return Ok(CachedImage { labels, ..c });
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
                return Err(LocalError::Data(format!(
                    "{}: the model gave {} feature maps, expected {DEPTH}",
                    segmenter.path().display(),
                    outs.len()
                )));
            }
            let mut levels = Vec::with_capacity(DEPTH);
            for (l, (shape, data)) in outs.into_iter().enumerate() {
                let want = [1, CHANNELS[l], ph >> l, pw >> l];
                if shape != want {
                    return Err(LocalError::Data(format!(
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
            };
            let mut bytes = Vec::new();
            ciborium::into_writer(&c, &mut bytes)
                .map_err(|e| LocalError::Data(format!("encoding the feature cache: {e}")))?;
            crate::pipeline::outputs::write_atomic(&path, &bytes)
                .map_err(|e| LocalError::Data(e.to_string()))?;
            computed += 1;
            Ok(CachedImage { labels, ..c })
        };
        let train = set.train.iter().map(&mut one).collect::<Result<_, _>>()?;
        let holdout = set
            .validation
            .iter()
            .map(&mut one)
            .collect::<Result<_, _>>()?;
        Ok(Self {
            classes: set.classes.len(),
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

/// How a round trains locally (from the round announcement).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RoundPlan {
    pub round: u64,
    pub epochs: u32,
    /// Batches per epoch; 0 = about one pass over the training pixels.
    pub steps_per_epoch: u32,
    pub learning_rate: f32,
    pub prox_mu: f32,
}

/// The U-Net with a frozen encoder, training on cached features.
pub struct LocalTrainer<B: Backend> {
    backend: Arc<B>,
    net: UNet<B>,
    cache: FeatureCache,
    batch: usize,
    crop: usize,
    seed: u64,
    loss: Loss,
}

impl<B: Backend> std::fmt::Debug for LocalTrainer<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalTrainer")
            .field("train", &self.cache.train.len())
            .field("holdout", &self.cache.holdout.len())
            .field("batch", &self.batch)
            .field("crop", &self.crop)
            .finish()
    }
}

impl<B: Backend> LocalTrainer<B> {
    /// `params` are the base model's (the encoder part is unused: features come from the cache).
    pub fn new(
        backend: Arc<B>,
        params: &Params,
        cache: FeatureCache,
        batch: usize,
        crop: usize,
        seed: u64,
    ) -> Result<Self, LocalError> {
        if cache.train.is_empty() {
            return Err(LocalError::Data("no labelled training images".into()));
        }
        let smallest = cache
            .train
            .iter()
            .map(|c| c.pw.min(c.ph))
            .min()
            .unwrap_or(SIZE_MULTIPLE);
        let crop = (crop.min(smallest) / SIZE_MULTIPLE).max(1) * SIZE_MULTIPLE;
        let mut counts = vec![0u64; cache.classes];
        for img in &cache.train {
            for &l in &img.labels {
                if let Some(c) = counts.get_mut(usize::from(l)) {
                    *c += 1;
                }
            }
        }
        let net = UNet::new(backend.clone(), params)?;
        Ok(Self {
            backend,
            net,
            batch: batch.max(1),
            crop,
            seed,
            loss: Loss {
                class_weights: Some(auto_class_weights(&counts)),
                dice_weight: 0.0,
            },
            cache,
        })
    }

    pub fn samples(&self) -> u64 {
        self.cache.samples()
    }

    pub fn has_holdout(&self) -> bool {
        !self.cache.holdout.is_empty()
    }

    /// Trains from `global` as the round says; returns the local decoder and the mean loss of the
    /// last epoch.
    pub fn train_round(
        &mut self,
        global: &[f32],
        plan: &RoundPlan,
    ) -> Result<(Vec<f32>, f32), LocalError> {
        self.net.set_decoder_flat(global)?;
        self.net.reset_optimizer();
        self.net
            .set_global_decoder((plan.prox_mu > 0.0).then_some(global))?;
        let mut optim = Optim::sgd(plan.learning_rate, 0.9);
        optim.prox_mu = plan.prox_mu;
        let (b, c) = (self.batch, self.crop);
        let xs = Shape::new(b, 1, c, c);
        let pixels: usize = self.cache.train.iter().map(|i| i.width * i.height).sum();
        let steps = if plan.steps_per_epoch > 0 {
            plan.steps_per_epoch as usize
        } else {
            pixels.div_ceil(b * c * c).max(1)
        };
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed ^ plan.round.wrapping_mul(0x9e37_79b9));
        let mut last = 0.0f32;
        for _ in 0..plan.epochs.max(1) {
            let mut sum = 0.0f64;
            for _ in 0..steps {
                let (feats, labels) = self.batch_from_cache(&mut rng)?;
                let stats = self
                    .net
                    .decoder_train_step(&feats, xs, &labels, &self.loss, &optim, None)?;
                if !stats.loss.is_finite() {
                    return Err(LocalError::Diverged {
                        round: plan.round,
                        loss: stats.loss,
                    });
                }
                sum += f64::from(stats.loss);
            }
            last = (sum / steps as f64) as f32;
        }
        self.net.set_global_decoder(None)?;
        Ok((self.net.decoder_flat()?, last))
    }

    fn batch_from_cache(
        &self,
        rng: &mut ChaCha8Rng,
    ) -> Result<(Vec<B::Buffer>, B::Labels), LocalError> {
        let (b, c) = (self.batch, self.crop);
        let mut levels: Vec<Vec<f32>> = (0..DEPTH)
            .map(|l| vec![0.0f32; b * CHANNELS[l] * (c >> l) * (c >> l)])
            .collect();
        let mut labels = vec![IGNORE; b * c * c];
        let total: usize = self.cache.train.iter().map(|i| i.pw * i.ph).sum();
        for s in 0..b {
            // Images drawn in proportion to their area.
            let mut u = rng.random_range(0..total);
            let img = self
                .cache
                .train
                .iter()
                .find(|i| {
                    let a = i.pw * i.ph;
                    if u < a {
                        true
                    } else {
                        u -= a;
                        false
                    }
                })
                .unwrap_or(&self.cache.train[0]);
            let y0 = rng.random_range(0..=(img.ph - c) / SIZE_MULTIPLE) * SIZE_MULTIPLE;
            let x0 = rng.random_range(0..=(img.pw - c) / SIZE_MULTIPLE) * SIZE_MULTIPLE;
            for (l, out) in levels.iter_mut().enumerate() {
                let (ch, lh, lw) = img.level(l);
                let cl = c >> l;
                let (ly, lx) = (y0 >> l, x0 >> l);
                let src = &img.levels[l];
                for k in 0..ch {
                    for y in 0..cl {
                        let from = (k * lh + ly + y) * lw + lx;
                        let to = ((s * ch + k) * cl + y) * cl;
                        for (d, &v) in out[to..to + cl].iter_mut().zip(&src[from..from + cl]) {
                            *d = f16::from_bits(v).to_f32();
                        }
                    }
                }
            }
            for y in 0..c {
                let from = (y0 + y) * img.pw + x0;
                labels[(s * c + y) * c..(s * c + y + 1) * c]
                    .copy_from_slice(&img.labels[from..from + c]);
            }
        }
        let feats = levels
            .iter()
            .map(|v| self.backend.upload(v))
            .collect::<Result<Vec<_>, _>>()?;
        Ok((feats, self.backend.upload_labels(&labels)?))
    }

    /// Mean IoU of `decoder` on the hold-out images (None without hold-out images).
    pub fn holdout_iou(&mut self, decoder: &[f32]) -> Result<Option<f64>, LocalError> {
        if self.cache.holdout.is_empty() {
            return Ok(None);
        }
        self.net.set_decoder_flat(decoder)?;
        let k = self.cache.classes;
        let mut cm = ConfusionMatrix::new(k).map_err(|e| LocalError::Data(e.to_string()))?;
        for i in 0..self.cache.holdout.len() {
            let img = &self.cache.holdout[i];
            let (pw, ph, w, h) = (img.pw, img.ph, img.width, img.height);
            let feats = (0..DEPTH)
                .map(|l| {
                    let v: Vec<f32> = img.levels[l]
                        .iter()
                        .map(|&b| f16::from_bits(b).to_f32())
                        .collect();
                    self.backend.upload(&v)
                })
                .collect::<Result<Vec<_>, _>>()?;
            let truth: Vec<u8> = (0..h)
                .flat_map(|y| img.labels[y * pw..y * pw + w].iter().copied())
                .collect();
            let logits = {
                let out = self.net.decode(&feats, Shape::new(1, 1, ph, pw), None)?;
                self.backend.download(out)?
            };
            let plane = pw * ph;
            let mut pred = vec![0u8; w * h];
            for y in 0..h {
                for x in 0..w {
                    let at = y * pw + x;
                    let mut best = 0;
                    for c in 1..k {
                        if logits[c * plane + at] > logits[best * plane + at] {
                            best = c;
                        }
                    }
                    pred[y * w + x] = best as u8;
                }
            }
            cm.add(
                &Mask::new(w as u32, h as u32, truth),
                &Mask::new(w as u32, h as u32, pred),
            )
            .map_err(|e| LocalError::Data(e.to_string()))?;
        }
        Ok(cm.mean_iou())
    }
}
