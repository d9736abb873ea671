//! A lab's side of a round: the encoder-feature cache and local decoder fine-tuning.
//!
//! - The encoder features come from [`crate::federated::edge::cache`] ([`FeatureCache`]).
//! - [`LocalTrainer`]: the kernels crate's U-Net (CPU or CUDA backend) with a frozen encoder.
//!   [`LocalTrainer::train_round`] starts from the announced global decoder, trains E local epochs
//!   of random crops cut from the cached features (crops aligned to 16 pixels, so every level's crop
//!   is exact), optionally with FedProx, and returns the local decoder.
//!   [`LocalTrainer::holdout_scores`] scores a decoder on the lab's hold-out images (mean IoU, mean
//!   Dice, boundary F1); [`LocalTrainer::holdout_iou`] is its IoU.
//! - Style codes ([`crate::federated::edge::style`]): [`LocalTrainer::set_styles`] takes other labs' latest codes;
//!   `train_round` then re-styles, with a configured chance, a batch's skip features with a
//!   feature-stats code (one per-channel affine map per stage, on the device) or draws crops from
//!   the lab's images re-styled with a Fourier code (re-encoded once, when the codes are set).
//! - Feature alignment ([`LocalTrainer::set_alignment`]): every batch, and every image scored, has
//!   its skip features moved to one reference style (per stage and channel, the mean and standard
//!   deviation of its own features mapped onto the reference's) before the decoder sees them, so a
//!   low-contrast lab's features and gradients reach the decoder at the scale of the others'.
//!
//! No geometric augmentation here: flipping a feature map is not the features of a flipped image
//! (the filters are not symmetric). Crops from whole-image features carry the context the decoder
//! sees at inference.

use std::path::PathBuf;
use std::sync::Arc;

use half::f16;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use microfed_kernels::style::restyle_coefficients;
use microfed_kernels::unet::{
    CHANNELS, DEPTH, Loss, Optim, OptimizerState, Params, SIZE_MULTIPLE, UNet,
};
use microfed_kernels::{Backend, KernelError, Shape};

use crate::augment::reflect;
use crate::dataset::IGNORE;
pub use crate::federated::edge::cache::{CacheError, CachedImage, FeatureCache};
// The optimiser travels in round announcements (the wire schema owns it) and the rate schedule is
// shared by the aggregator, experiments and the demo; both are re-exported for local training.
use crate::federated::edge::style::{
    RestyleConfig, RestylePlan, RestyleTarget, StyleCode, StyleError, StyleKind, restyle_image,
};
pub use crate::federated::schedule::{Decay, LrSchedule};
use crate::mask::Mask;
use crate::metrics::Evaluator;
use crate::model::runtime::RuntimeError;
use crate::train::data::auto_class_weights;
pub use crate::wire::protocol::LocalOptimizer;

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
    #[error(transparent)]
    Style(#[from] StyleError),
    #[error(transparent)]
    Cache(#[from] CacheError),
    #[error("local training diverged in round {round} (loss {loss})")]
    Diverged { round: u64, loss: f32 },
}

/// How a round trains locally (from the round announcement).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RoundPlan {
    pub round: u64,
    pub epochs: u32,
    /// Batches per epoch; 0 = about one pass over the training pixels.
    pub steps_per_epoch: u32,
    /// This round's rate: the aggregator (or the experiment) applies the [`LrSchedule`] before
    /// announcing it, so a device uses what it is told.
    pub learning_rate: f32,
    pub prox_mu: f32,
    pub optimizer: LocalOptimizer,
}

impl LocalOptimizer {
    pub fn optim(self, lr: f32, prox_mu: f32) -> Optim {
        let mut o = match self {
            Self::Momentum => Optim::sgd(lr, 0.9),
            Self::Sgd => Optim::sgd(lr, 0.0),
            Self::Adam => Optim::adamw(lr),
        };
        o.prox_mu = prox_mu;
        o
    }
}

/// Per-channel `(scale, shift)` of one encoder stage (the kernels' re-styling argument).
type Restyle = (Vec<f32>, Vec<f32>);

/// Hold-out scores of a decoder (means over classes; boundary F1 at [`BOUNDARY_TOLERANCE_PX`]).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct HoldoutScores {
    pub iou: Option<f64>,
    pub dice: Option<f64>,
    pub boundary_f1: Option<f64>,
    /// IoU of each class.
    #[serde(default)]
    pub class_iou: Vec<Option<f64>>,
    /// Fraction of the hold-out pixels predicted as each class, and the truth's fractions: a
    /// decoder that stops finding the thin boundary class shows here before the means move.
    #[serde(default)]
    pub pred_fraction: Vec<f64>,
    #[serde(default)]
    pub truth_fraction: Vec<f64>,
}

/// Tolerance of the hold-out boundary F1, in pixels (as `microfed model score`).
pub const BOUNDARY_TOLERANCE_PX: f64 = 2.0;

/// A batch cut from the cache: the features of each stage, the labels, and how many of its crops
/// came from Fourier re-styled images.
type CachedBatch<B> = (Vec<<B as Backend>::Buffer>, <B as Backend>::Labels, usize);

/// The U-Net with a frozen encoder, training on cached features.
pub struct LocalTrainer<B: Backend> {
    backend: Arc<B>,
    net: UNet<B>,
    cache: FeatureCache,
    batch: usize,
    crop: usize,
    seed: u64,
    loss: Loss,
    /// Other labs' feature-stats codes: a batch's features are re-styled with one of them.
    feature_styles: Vec<StyleCode>,
    /// Per training image, its features re-styled with each other lab's Fourier code.
    fourier_variants: Vec<Vec<CachedImage>>,
    restyle: RestyleConfig,
    /// Which feature-stats code (in `feature_styles` order) re-styles a batch.
    feature_plan: RestylePlan,
    /// Which Fourier variant (in each `fourier_variants` entry's order) a crop comes from.
    fourier_plan: RestylePlan,
    /// Batches of the last `train_round` that were re-styled (features or at least one crop).
    restyled_batches: u64,
    /// The lab's inverse-√frequency class weights (used when weighting is on).
    auto_weights: Vec<f32>,
    /// Keep the optimiser's moments across rounds (see [`LocalTrainer::set_keep_optimizer_state`]).
    keep_optimizer_state: bool,
    /// The reference style every batch and scored image is aligned to (see
    /// [`LocalTrainer::set_alignment`]).
    align: Option<Alignment>,
}

/// L2 norm of `a − b` (a local update's length, summed in f64).
pub fn distance(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| f64::from(x - y).powi(2))
        .sum::<f64>()
        .sqrt() as f32
}

/// A reference style for feature alignment: per encoder stage, the per-channel means and standard
/// deviations the features are moved to.
#[derive(Debug, Clone, PartialEq)]
pub struct Alignment {
    stages: Vec<(Vec<f32>, Vec<f32>)>,
}

impl Alignment {
    /// Per stage `(means, standard deviations)`, one per channel of [`CHANNELS`]; every value finite,
    /// no deviation negative (a dead channel's is 0: aligned, it holds its reference mean).
    pub fn new(stages: Vec<(Vec<f32>, Vec<f32>)>) -> Result<Self, LocalError> {
        if stages.len() != DEPTH {
            return Err(LocalError::Data(format!(
                "alignment reference: {} stages, expected {DEPTH}",
                stages.len()
            )));
        }
        for (l, (mu, sd)) in stages.iter().enumerate() {
            if mu.len() != CHANNELS[l] || sd.len() != CHANNELS[l] {
                return Err(LocalError::Data(format!(
                    "alignment reference: stage {l} has {} means and {} deviations, expected {}",
                    mu.len(),
                    sd.len(),
                    CHANNELS[l]
                )));
            }
            if let Some(v) = mu.iter().chain(sd).find(|v| !v.is_finite()) {
                return Err(LocalError::Data(format!(
                    "alignment reference: stage {l} holds {v}"
                )));
            }
            if let Some(v) = sd.iter().find(|&&v| v < 0.0) {
                return Err(LocalError::Data(format!(
                    "alignment reference: stage {l} has a standard deviation of {v}"
                )));
            }
        }
        Ok(Self { stages })
    }

    /// The reference of one lab's feature-stats code.
    pub fn from_code(code: &StyleCode) -> Result<Self, LocalError> {
        if code.kind != StyleKind::FeatureStats {
            return Err(LocalError::Data(format!(
                "alignment reference: {}'s code is not a feature-stats code",
                code.device
            )));
        }
        code.validate()?;
        Self::new(
            (0..DEPTH)
                .map(|l| {
                    let (mu, sd) = code.stage(l);
                    (mu.to_vec(), sd.to_vec())
                })
                .collect(),
        )
    }

    /// The statistics of the labs' features pooled with equal weight per lab (a mixture of their
    /// styles): per channel, the mean of the means, and the deviation of the mixture,
    /// `sqrt(mean(σ² + μ²) − μ̄²)`.
    pub fn pooled(codes: &[StyleCode]) -> Result<Self, LocalError> {
        if codes.is_empty() {
            return Err(LocalError::Data(
                "alignment reference: no feature-stats code to pool".into(),
            ));
        }
        let refs = codes
            .iter()
            .map(Self::from_code)
            .collect::<Result<Vec<_>, _>>()?;
        let n = refs.len() as f64;
        let stages = (0..DEPTH)
            .map(|l| {
                let c = CHANNELS[l];
                let mut mu = vec![0.0f32; c];
                let mut sd = vec![0.0f32; c];
                for k in 0..c {
                    let m: f64 = refs
                        .iter()
                        .map(|r| f64::from(r.stages[l].0[k]))
                        .sum::<f64>()
                        / n;
                    let q: f64 = refs
                        .iter()
                        .map(|r| {
                            let (a, b) = (f64::from(r.stages[l].0[k]), f64::from(r.stages[l].1[k]));
                            a * a + b * b
                        })
                        .sum::<f64>()
                        / n;
                    mu[k] = m as f32;
                    sd[k] = (q - m * m).max(0.0).sqrt() as f32;
                }
                (mu, sd)
            })
            .collect();
        Self::new(stages)
    }

    /// Per-stage `(scale, shift)` that move features of statistics `own` onto the reference.
    fn coefficients(&self, own: &[(Vec<f32>, Vec<f32>)]) -> Result<Vec<Restyle>, LocalError> {
        own.iter()
            .zip(&self.stages)
            .map(|((mu, sd), (mu_r, sd_r))| {
                Ok(restyle_coefficients(mu, sd, mu_r, sd_r, 1.0, 1e-5)?)
            })
            .collect()
    }
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
            auto_weights: auto_class_weights(&counts),
            cache,
            feature_styles: Vec::new(),
            fourier_variants: Vec::new(),
            restyle: RestyleConfig::default(),
            feature_plan: RestylePlan::default(),
            fourier_plan: RestylePlan::default(),
            restyled_batches: 0,
            keep_optimizer_state: false,
            align: None,
        })
    }

    /// Other labs' latest style codes (replacing any given before) and how to use them.
    ///
    /// Feature-stats codes re-style, with chance `probability`, a whole batch's skip features
    /// (per-channel affine map from the batch's statistics towards the code's, `mix` of the way).
    /// Fourier codes re-style each training image once here (its low-frequency amplitudes moved
    /// `mix` of the way to the code's) and run it through the frozen encoder; a crop then comes from
    /// a re-styled version with chance `probability`. Which code, and how often, follows
    /// `config.target` ([`RestylePlan`]: any other lab's code each as likely, or balanced by the
    /// labs' image counts). Codes of another base model are skipped (their feature statistics are
    /// not comparable); an invalid code is an error.
    pub fn set_styles(
        &mut self,
        codes: Vec<StyleCode>,
        config: RestyleConfig,
    ) -> Result<(), LocalError> {
        config.validate()?;
        let mut feature = Vec::new();
        let mut fourier = Vec::new();
        for code in codes {
            code.validate()?;
            if code.model_version != self.cache.model_version {
                tracing::warn!(
                    device = %code.device,
                    code_model = %code.model_version,
                    "style code of another base model: skipped"
                );
                continue;
            }
            match code.kind {
                StyleKind::FeatureStats => feature.push(code),
                StyleKind::Fourier => fourier.push(code),
            }
        }
        let mut variants = Vec::with_capacity(self.cache.train.len());
        if !fourier.is_empty() {
            for i in 0..self.cache.train.len() {
                let mut per_code = Vec::with_capacity(fourier.len());
                for code in &fourier {
                    per_code.push(self.restyled_features(i, code, config.mix)?);
                }
                variants.push(per_code);
            }
        }
        let own = self.cache.train.len();
        self.feature_plan = RestylePlan::new(own, &feature, &config);
        self.fourier_plan = RestylePlan::new(own, &fourier, &config);
        if config.target == RestyleTarget::Balance {
            tracing::debug!(
                own_images = own,
                feature_chance = self.feature_plan.chance(),
                fourier_chance = self.fourier_plan.chance(),
                "style codes: balanced re-styling"
            );
        }
        self.feature_styles = feature;
        self.fourier_variants = variants;
        self.restyle = config;
        Ok(())
    }

    /// Aligns every training batch and every scored image to `reference` (None: off).
    ///
    /// Per encoder stage and channel, the features' own mean and standard deviation (of the batch
    /// in training, of the image when scoring: what a deployed model can compute per capture) are
    /// mapped onto the reference's before the decoder runs. This replaces re-styling with other
    /// labs' feature-stats codes (an aligned batch ends at the reference whatever it started from);
    /// crops re-styled with Fourier codes are aligned like the others.
    pub fn set_alignment(&mut self, reference: Option<Alignment>) {
        self.align = reference;
    }

    /// Per-stage statistics of feature maps `feats` of input shape `xs`, moved onto the alignment
    /// reference (None when alignment is off).
    fn alignment(
        &self,
        feats: &[B::Buffer],
        xs: Shape,
    ) -> Result<Option<Vec<Restyle>>, LocalError> {
        let Some(align) = &self.align else {
            return Ok(None);
        };
        let shapes = UNet::<B>::feature_shapes(xs);
        let own = (0..DEPTH)
            .map(|l| self.backend.channel_stats(&feats[l], shapes[l]))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Some(align.coefficients(&own)?))
    }

    /// Training image `i` re-styled with a Fourier code, through the (frozen) encoder.
    fn restyled_features(
        &mut self,
        i: usize,
        code: &StyleCode,
        mix: f32,
    ) -> Result<CachedImage, LocalError> {
        let img = &self.cache.train[i];
        let (w, h, pw, ph) = (img.width, img.height, img.pw, img.ph);
        if img.pixels.len() != pw * ph {
            return Err(LocalError::Data(format!(
                "{}: no pixels in the feature cache for Fourier re-styling",
                img.stem
            )));
        }
        let styled = restyle_image(&img.pixels, pw, w, h, code, mix)?;
        // Padded by reflection exactly as the cache pads the original.
        let mut x = vec![0.0f32; pw * ph];
        for y in 0..ph {
            let sy = reflect(y as isize, h);
            for xx in 0..pw {
                x[y * pw + xx] = styled[sy * w + reflect(xx as isize, w)];
            }
        }
        let input = self.backend.upload(&x)?;
        let feats = self.net.encode(&input, Shape::new(1, 1, ph, pw))?;
        let levels = feats
            .iter()
            .map(|f| {
                self.backend
                    .download(f)
                    .map(|v| v.iter().map(|&v| f16::from_f32(v).to_bits()).collect())
            })
            .collect::<Result<Vec<Vec<u16>>, _>>()?;
        let img = &self.cache.train[i];
        Ok(CachedImage {
            stem: format!("{}@{}", img.stem, code.device),
            width: w,
            height: h,
            pw,
            ph,
            pixels_sha256: String::new(),
            levels,
            labels: Vec::new(),
            pixels: Vec::new(),
        })
    }

    /// Per-stage `(scale, shift)` moving this batch's feature statistics towards `code`'s.
    fn feature_restyle(
        &self,
        feats: &[B::Buffer],
        xs: Shape,
        code: &StyleCode,
        mix: f32,
    ) -> Result<Vec<Restyle>, LocalError> {
        let shapes = UNet::<B>::feature_shapes(xs);
        (0..DEPTH)
            .map(|l| {
                let (mu, sd) = self.backend.channel_stats(&feats[l], shapes[l])?;
                let (mu_o, sd_o) = code.stage(l);
                Ok(restyle_coefficients(&mu, &sd, mu_o, sd_o, mix, 1e-5)?)
            })
            .collect()
    }

    pub fn samples(&self) -> u64 {
        self.cache.samples()
    }

    /// Batches of the last [`LocalTrainer::train_round`] that were re-styled with another lab's code
    /// (a feature-stats map, or at least one crop from a Fourier re-styled image).
    pub fn restyled_batches(&self) -> u64 {
        self.restyled_batches
    }

    /// Weight of the soft-Dice term added to the (class-weighted) cross-entropy; 0 by default. The
    /// base models were trained with 0.5: fine-tuning with the same objective keeps their
    /// calibration of the thin boundary class.
    pub fn set_dice_weight(&mut self, weight: f32) {
        self.loss.dice_weight = weight;
    }

    /// Whether the cross-entropy weighs classes by the lab's inverse √frequency (the default, as
    /// the base models were trained) or all alike. Weighting moves the decision threshold towards
    /// the thin boundary class: the decoder over-predicts it (measured in docs/results.md), and each
    /// lab's own weights pull a shared decoder's boundary threshold its own way.
    pub fn set_class_weighting(&mut self, weighted: bool) {
        self.loss.class_weights = weighted.then(|| self.auto_weights.clone());
    }

    /// Whether [`LocalTrainer::train_round`] keeps the optimiser's moments (momentum, Adam's first
    /// and second moments and step count) from the lab's previous round instead of starting them
    /// afresh (the default). A lab that takes part in every round can keep them: freshly reset,
    /// Adam's first steps are sign steps of the full rate on every weight, whatever the gradient's
    /// size, so the small, noisy gradients of a lab the model already serves move the weights as
    /// far as the large ones of a lab it does not, and averaging such steps across labs drifts
    /// (measured in docs/results.md). Kept, the second moment scales each weight's step by what
    /// that lab has seen of its gradient.
    pub fn set_keep_optimizer_state(&mut self, keep: bool) {
        self.keep_optimizer_state = keep;
    }

    /// The optimiser's moments and step counts as the last round left them.
    pub fn optimizer_state(&self) -> Result<OptimizerState, LocalError> {
        Ok(self.net.optimizer_state()?)
    }

    /// Starts the next round from `state` (of `optimizer`'s family) instead of this lab's own
    /// moments: the labs of a federation that share their moments all precondition their steps
    /// alike. Takes effect with [`LocalTrainer::set_keep_optimizer_state`] on (otherwise the round
    /// starts afresh).
    pub fn set_optimizer_state(
        &mut self,
        optimizer: LocalOptimizer,
        state: &OptimizerState,
    ) -> Result<(), LocalError> {
        Ok(self
            .net
            .set_optimizer_state(&optimizer.optim(0.0, 0.0), state)?)
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
        if !self.keep_optimizer_state {
            self.net.reset_optimizer();
        }
        self.net
            .set_global_decoder((plan.prox_mu > 0.0).then_some(global))?;
        let optim = plan.optimizer.optim(plan.learning_rate, plan.prox_mu);
        let (b, c) = (self.batch, self.crop);
        let xs = Shape::new(b, 1, c, c);
        let pixels: usize = self.cache.train.iter().map(|i| i.width * i.height).sum();
        let steps = if plan.steps_per_epoch > 0 {
            plan.steps_per_epoch as usize
        } else {
            pixels.div_ceil(b * c * c).max(1)
        };
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed ^ plan.round.wrapping_mul(0x9e37_79b9));
        // Re-styling decisions come from their own stream: a run with style codes sees exactly the
        // crops of the same run without them (a paired comparison).
        let mut style_rng = ChaCha8Rng::seed_from_u64(
            (self.seed ^ plan.round.wrapping_mul(0x9e37_79b9)) ^ 0x5157_1e00_c0de_0001,
        );
        let mut last = 0.0f32;
        self.restyled_batches = 0;
        for _ in 0..plan.epochs.max(1) {
            let mut sum = 0.0f64;
            for _ in 0..steps {
                let (feats, labels, fourier_crops) =
                    self.batch_from_cache(&mut rng, &mut style_rng)?;
                // Alignment, when on, maps every batch; otherwise another lab's feature-stats code
                // may re-style it (counted as re-styled).
                let aligned = self.alignment(&feats, xs)?;
                let pick = if aligned.is_none() {
                    self.feature_plan
                        .pick(&mut style_rng, self.restyle.probability)
                } else {
                    None
                };
                let by_code = pick.is_some();
                let restyle = if aligned.is_some() {
                    aligned
                } else if let Some(code) = pick.and_then(|i| self.feature_styles.get(i)) {
                    Some(self.feature_restyle(&feats, xs, code, self.restyle.mix)?)
                } else {
                    None
                };
                if by_code || fourier_crops > 0 {
                    self.restyled_batches += 1;
                }
                let stats = self.net.decoder_train_step(
                    &feats,
                    xs,
                    &labels,
                    &self.loss,
                    &optim,
                    restyle.as_deref(),
                )?;
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

    /// What the lab would deploy: `global` fine-tuned on the lab's own training images as `plan`
    /// says, in the lab's own style only (no re-styling with other labs' codes: the point is to
    /// specialise), with the optimiser's moments started afresh. The federation's training is not
    /// affected: the next [`LocalTrainer::train_round`] starts from the global it is given.
    pub fn personalise(
        &mut self,
        global: &[f32],
        plan: &RoundPlan,
    ) -> Result<Vec<f32>, LocalError> {
        let restyle = self.restyle;
        let keep = self.keep_optimizer_state;
        self.restyle.probability = 0.0;
        self.keep_optimizer_state = false;
        let plan = RoundPlan {
            prox_mu: 0.0,
            ..*plan
        };
        let tuned = self.train_round(global, &plan);
        self.restyle = restyle;
        self.keep_optimizer_state = keep;
        self.restyled_batches = 0;
        Ok(tuned?.0)
    }

    /// A batch of random crops (positions from `rng`; which crops come from Fourier re-styled
    /// images from `style_rng`).
    fn batch_from_cache(
        &self,
        rng: &mut ChaCha8Rng,
        style_rng: &mut ChaCha8Rng,
    ) -> Result<CachedBatch<B>, LocalError> {
        let (b, c) = (self.batch, self.crop);
        let mut levels: Vec<Vec<f32>> = (0..DEPTH)
            .map(|l| vec![0.0f32; b * CHANNELS[l] * (c >> l) * (c >> l)])
            .collect();
        let mut labels = vec![IGNORE; b * c * c];
        let total: usize = self.cache.train.iter().map(|i| i.pw * i.ph).sum();
        let mut restyled = 0;
        for s in 0..b {
            // Images drawn in proportion to their area.
            let mut u = rng.random_range(0..total);
            let index = self
                .cache
                .train
                .iter()
                .position(|i| {
                    let a = i.pw * i.ph;
                    if u < a {
                        true
                    } else {
                        u -= a;
                        false
                    }
                })
                .unwrap_or(0);
            let img = &self.cache.train[index];
            let y0 = rng.random_range(0..=(img.ph - c) / SIZE_MULTIPLE) * SIZE_MULTIPLE;
            let x0 = rng.random_range(0..=(img.pw - c) / SIZE_MULTIPLE) * SIZE_MULTIPLE;
            // Fourier re-styling: the same crop from a re-styled version of the image.
            let source = match self.fourier_variants.get(index) {
                Some(v) if !v.is_empty() => {
                    match self
                        .fourier_plan
                        .pick(style_rng, self.restyle.probability)
                        .and_then(|k| v.get(k))
                    {
                        Some(styled) => {
                            restyled += 1;
                            styled
                        }
                        None => img,
                    }
                }
                _ => img,
            };
            for (l, out) in levels.iter_mut().enumerate() {
                let (ch, lh, lw) = img.level(l);
                let cl = c >> l;
                let (ly, lx) = (y0 >> l, x0 >> l);
                let src = &source.levels[l];
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
        Ok((feats, self.backend.upload_labels(&labels)?, restyled))
    }

    /// Mean IoU of `decoder` on the hold-out images (None without hold-out images).
    pub fn holdout_iou(&mut self, decoder: &[f32]) -> Result<Option<f64>, LocalError> {
        Ok(self.holdout_scores(decoder)?.and_then(|s| s.iou))
    }

    /// Mean IoU, mean Dice and boundary F1 of `decoder` on the hold-out images, pooled over them
    /// (None without hold-out images).
    pub fn holdout_scores(&mut self, decoder: &[f32]) -> Result<Option<HoldoutScores>, LocalError> {
        let holdout = std::mem::take(&mut self.cache.holdout);
        let scores = self.scores_on(decoder, &holdout);
        self.cache.holdout = holdout;
        scores
    }

    /// The same scores of `decoder` on other images of the same base model (a test set held
    /// apart from the lab's own hold-out); None for no images.
    pub fn scores_on(
        &mut self,
        decoder: &[f32],
        images: &[CachedImage],
    ) -> Result<Option<HoldoutScores>, LocalError> {
        if images.is_empty() {
            return Ok(None);
        }
        self.net.set_decoder_flat(decoder)?;
        let k = self.cache.classes;
        let mut ev = Evaluator::new(k, BOUNDARY_TOLERANCE_PX)
            .map_err(|e| LocalError::Data(e.to_string()))?;
        for img in images {
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
            let xs = Shape::new(1, 1, ph, pw);
            let aligned = self.alignment(&feats, xs)?;
            let logits = {
                let out = self.net.decode(&feats, xs, aligned.as_deref())?;
                self.backend.download(out)?
            };
            let pred = crate::train::validate::argmax_crop(&logits, k, pw, ph, w, h);
            ev.add(
                &img.stem,
                &Mask::new(w as u32, h as u32, truth),
                &Mask::new(w as u32, h as u32, pred),
            )
            .map_err(|e| LocalError::Data(format!("{}: {e}", img.stem)))?;
        }
        let m = ev.matrix();
        let boundary = ev.finish(&[]).boundary;
        let total = m.total().max(1) as f64;
        Ok(Some(HoldoutScores {
            iou: m.mean_iou(),
            dice: m.mean_dice(),
            boundary_f1: boundary.f1,
            class_iou: (0..k).map(|c| m.iou(c)).collect(),
            pred_fraction: (0..k)
                .map(|c| (0..k).map(|t| m.get(t, c)).sum::<u64>() as f64 / total)
                .collect(),
            truth_fraction: (0..k)
                .map(|c| (0..k).map(|p| m.get(c, p)).sum::<u64>() as f64 / total)
                .collect(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::federated::edge::style::{PrivacyKnobs, seeded_rng};
    use microfed_kernels::cpu::CpuBackend;

    const SIDE: usize = 32;

    /// Two 32×32 images whose features are the kernels encoder's own (as tract's would be), with
    /// left-half/right-half labels.
    fn setup(classes: usize) -> (Arc<CpuBackend>, Params, FeatureCache) {
        let backend = Arc::new(CpuBackend::new());
        let params = Params::init(classes, 11).unwrap();
        let mut net = UNet::new(backend.clone(), &params).unwrap();
        let mut rng = seeded_rng(5);
        let mut make = |stem: &str| -> CachedImage {
            let pixels: Vec<f32> = (0..SIDE * SIDE)
                .map(|i| ((i % SIDE) as f32 * 0.3).sin() + rng.random::<f32>() * 0.2)
                .collect();
            let x = backend.upload(&pixels).unwrap();
            let feats = net.encode(&x, Shape::new(1, 1, SIDE, SIDE)).unwrap();
            CachedImage {
                stem: stem.into(),
                width: SIDE,
                height: SIDE,
                pw: SIDE,
                ph: SIDE,
                pixels_sha256: String::new(),
                levels: feats
                    .iter()
                    .map(|f| {
                        backend
                            .download(f)
                            .unwrap()
                            .iter()
                            .map(|&v| f16::from_f32(v).to_bits())
                            .collect()
                    })
                    .collect(),
                labels: (0..SIDE * SIDE)
                    .map(|i| u8::from(i % SIDE >= SIDE / 2))
                    .collect(),
                pixels,
            }
        };
        let cache = FeatureCache {
            classes,
            model_version: "v1".into(),
            train: vec![make("a"), make("b")],
            holdout: vec![make("c")],
            computed: 3,
        };
        (backend, params, cache)
    }

    fn plan() -> RoundPlan {
        RoundPlan {
            round: 1,
            epochs: 1,
            steps_per_epoch: 2,
            learning_rate: 0.01,
            prox_mu: 0.0,
            optimizer: LocalOptimizer::Momentum,
        }
    }

    fn code_of(cache: &FeatureCache, kind: StyleKind, device: &str) -> StyleCode {
        let knobs = PrivacyKnobs {
            min_images: 1,
            noise_sigma: 0.0,
        };
        StyleCode::from_cache(cache, kind, &knobs, device).unwrap()
    }

    #[test]
    fn feature_restyle_gives_the_batch_the_codes_statistics() {
        let (backend, params, cache) = setup(2);
        let mut t = LocalTrainer::new(backend.clone(), &params, cache.clone(), 2, 32, 1).unwrap();
        let mut other = code_of(&cache, StyleKind::FeatureStats, "other");
        // Another lab: shifted means, doubled spreads.
        let mut start = 0;
        for &c in &CHANNELS {
            for k in 0..c {
                other.values[start + k] += 0.5;
                other.values[start + c + k] = 2.0 * other.values[start + c + k] + 0.1;
            }
            start += 2 * c;
        }
        let (feats, _, _) = t
            .batch_from_cache(
                &mut ChaCha8Rng::seed_from_u64(1),
                &mut ChaCha8Rng::seed_from_u64(2),
            )
            .unwrap();
        let xs = Shape::new(2, 1, 32, 32);
        let shapes = UNet::<CpuBackend>::feature_shapes(xs);
        let coeffs = t.feature_restyle(&feats, xs, &other, 1.0).unwrap();
        for l in 0..DEPTH {
            let mut y = backend.zeros(shapes[l].len()).unwrap();
            backend
                .channel_affine(&feats[l], shapes[l], &coeffs[l].0, &coeffs[l].1, &mut y)
                .unwrap();
            let (mu, sd) = backend.channel_stats(&y, shapes[l]).unwrap();
            let (mu_o, sd_o) = other.stage(l);
            for k in 0..CHANNELS[l] {
                // Channels the ReLU left dead (σ = 0) cannot take a spread: only their mean moves.
                let (_, sd_b) = backend.channel_stats(&feats[l], shapes[l]).unwrap();
                if sd_b[k] > 1e-3 {
                    assert!(
                        (sd[k] - sd_o[k]).abs() < 1e-2 * sd_o[k].max(1.0),
                        "stage {l} ch {k}"
                    );
                }
                assert!(
                    (mu[k] - mu_o[k]).abs() < 1e-2 * mu_o[k].abs().max(1.0),
                    "stage {l} ch {k}"
                );
            }
        }
        // Styles change training; codes of another base model are skipped; bad codes refused.
        let (base, _) = t.train_round(&params.decoder_flat(), &plan()).unwrap();
        assert_eq!(t.restyled_batches(), 0, "no codes: nothing re-styled");
        let mut stale = other.clone();
        stale.model_version = "v0".into();
        t.set_styles(
            vec![other.clone(), stale],
            RestyleConfig {
                probability: 1.0,
                mix: 1.0,
                ..RestyleConfig::default()
            },
        )
        .unwrap();
        assert_eq!(t.feature_styles.len(), 1);
        let (styled, loss) = t.train_round(&params.decoder_flat(), &plan()).unwrap();
        assert!(loss.is_finite());
        assert_ne!(base, styled);
        // Probability 1: each of the plan's 1 × 2 batches was re-styled.
        assert_eq!(t.restyled_batches(), 2);
        let mut bad = other;
        bad.values.pop();
        assert!(matches!(
            t.set_styles(vec![bad], RestyleConfig::default()),
            Err(LocalError::Style(_))
        ));
    }

    #[test]
    fn balanced_restyling_leaves_a_short_style_alone_and_restyles_a_large_one() {
        // Two training images here; another lab's code made from many more: this lab's style is
        // short of an equal share, so it keeps it and trains exactly as without codes. Made from
        // none (this lab holds all the images), this lab re-styles its excess towards the other.
        let (backend, params, cache) = setup(2);
        let global = params.decoder_flat();
        let balance = RestyleConfig {
            probability: 1.0,
            mix: 1.0,
            target: RestyleTarget::Balance,
        };
        let mut plain =
            LocalTrainer::new(backend.clone(), &params, cache.clone(), 2, 16, 3).unwrap();
        let (a, _) = plain.train_round(&global, &plan()).unwrap();
        for kind in [StyleKind::FeatureStats, StyleKind::Fourier] {
            let mut code = code_of(&cache, kind, "other");
            code.values.iter_mut().for_each(|v| *v = *v * 2.0 + 0.25);
            code.images = 50;
            let mut short =
                LocalTrainer::new(backend.clone(), &params, cache.clone(), 2, 16, 3).unwrap();
            short.set_styles(vec![code.clone()], balance).unwrap();
            let (b, _) = short.train_round(&global, &plan()).unwrap();
            assert_eq!(short.restyled_batches(), 0, "{kind}");
            assert_eq!(a, b, "{kind}: a short style trains as without codes");
            code.images = 0;
            let mut large =
                LocalTrainer::new(backend.clone(), &params, cache.clone(), 2, 16, 3).unwrap();
            large.set_styles(vec![code], balance).unwrap();
            // Half its crops (own share 1 against an equal 1/2): 16 batches, some re-styled.
            let longer = RoundPlan {
                steps_per_epoch: 16,
                ..plan()
            };
            large.train_round(&global, &longer).unwrap();
            assert!(
                (1..16).contains(&large.restyled_batches()),
                "{kind}: {}",
                large.restyled_batches()
            );
        }
    }

    #[test]
    fn style_draws_leave_the_crops_alone() {
        // Re-styling at mix 0 is the identity map: with its draws on their own random stream the
        // run trains on exactly the crops of the run without codes, so the decoders agree.
        let (backend, params, cache) = setup(2);
        let code = code_of(&cache, StyleKind::FeatureStats, "other");
        let global = params.decoder_flat();
        let mut plain =
            LocalTrainer::new(backend.clone(), &params, cache.clone(), 2, 16, 3).unwrap();
        let (a, _) = plain.train_round(&global, &plan()).unwrap();
        let mut styled = LocalTrainer::new(backend, &params, cache, 2, 16, 3).unwrap();
        styled
            .set_styles(
                vec![code],
                RestyleConfig {
                    probability: 0.5,
                    mix: 0.0,
                    ..RestyleConfig::default()
                },
            )
            .unwrap();
        let (b, _) = styled.train_round(&global, &plan()).unwrap();
        let worst = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0f32, f32::max);
        assert!(worst < 1e-6, "{worst}");
    }

    #[test]
    fn fourier_variants_at_mix_zero_are_the_cached_features() {
        let (backend, params, cache) = setup(2);
        let code = code_of(&cache, StyleKind::Fourier, "other");
        let mut t = LocalTrainer::new(backend, &params, cache.clone(), 2, 32, 1).unwrap();
        t.set_styles(
            vec![code.clone()],
            RestyleConfig {
                probability: 1.0,
                mix: 0.0,
                ..RestyleConfig::default()
            },
        )
        .unwrap();
        assert_eq!(t.fourier_variants.len(), 2);
        for (variants, img) in t.fourier_variants.iter().zip(&cache.train) {
            for (a, b) in variants[0].levels.iter().zip(&img.levels) {
                let worst = a
                    .iter()
                    .zip(b)
                    .map(|(&x, &y)| (f16::from_bits(x).to_f32() - f16::from_bits(y).to_f32()).abs())
                    .fold(0.0f32, f32::max);
                assert!(worst < 2e-2, "{worst}");
            }
        }
        // At mix 1 the features change.
        t.set_styles(
            vec![StyleCode {
                values: code.values.iter().map(|v| v * 3.0 + 0.5).collect(),
                ..code
            }],
            RestyleConfig {
                probability: 1.0,
                mix: 1.0,
                ..RestyleConfig::default()
            },
        )
        .unwrap();
        assert_ne!(t.fourier_variants[0][0].levels, cache.train[0].levels);
    }

    #[test]
    fn schedules_warm_up_then_decay_as_configured() {
        let constant = LrSchedule::default();
        assert_eq!(constant.rate(0.01, 1), 0.01);
        assert_eq!(constant.rate(0.01, 50), 0.01);
        let step = LrSchedule {
            warmup_rounds: 1,
            decay: Decay::Step,
            ..LrSchedule::default()
        };
        // Round 1 warms up at half the rate; rounds 2, 3 full; 4, 5 × 0.927; 6 × 0.927².
        let f: Vec<f32> = (1..=6).map(|r| step.factor(r)).collect();
        let want = [0.5, 1.0, 1.0, 0.927, 0.927, 0.927 * 0.927];
        for (a, b) in f.iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{f:?}");
        }
        let cosine = LrSchedule {
            warmup_rounds: 2,
            decay: Decay::Cosine,
            rounds: 12,
            floor: 0.1,
            ..LrSchedule::default()
        };
        assert!((cosine.factor(1) - 1.0 / 3.0).abs() < 1e-6);
        assert!((cosine.factor(3) - 1.0).abs() < 1e-6);
        // Half-way through the 9 decaying steps after round 3: (1 + 0.1) / 2.
        assert!((cosine.factor(3 + 9 / 2) - 0.55).abs() < 0.1);
        assert!((cosine.factor(12) - 0.1).abs() < 1e-6);
        assert!((cosine.factor(40) - 0.1).abs() < 1e-6);
        let rates: Vec<f32> = (3..=12).map(|r| cosine.factor(r)).collect();
        assert!(rates.windows(2).all(|w| w[1] < w[0]), "{rates:?}");
        assert!(
            LrSchedule {
                rounds: 2,
                ..cosine
            }
            .validate()
            .is_err()
        );
        assert!(LrSchedule { every: 0, ..step }.validate().is_err());
    }

    #[test]
    fn the_optimiser_changes_the_local_update() {
        let (backend, params, cache) = setup(2);
        let mut t = LocalTrainer::new(backend, &params, cache, 2, 32, 1).unwrap();
        let global = params.decoder_flat();
        let mut out = Vec::new();
        for optimizer in [
            LocalOptimizer::Momentum,
            LocalOptimizer::Sgd,
            LocalOptimizer::Adam,
        ] {
            let (local, loss) = t
                .train_round(
                    &global,
                    &RoundPlan {
                        optimizer,
                        ..plan()
                    },
                )
                .unwrap();
            assert!(loss.is_finite());
            out.push(local);
        }
        // The first step of SGD with momentum is plain SGD's; the second is not.
        assert_ne!(out[0], out[1]);
        assert_ne!(out[1], out[2]);
        // Class weighting off and on again: the loss loses and regains the lab's weights (here
        // [1, 1]: the test labels are half of each class).
        t.set_class_weighting(false);
        assert_eq!(t.loss.class_weights, None);
        t.set_class_weighting(true);
        assert_eq!(t.loss.class_weights.as_deref(), Some(&[1.0f32, 1.0][..]));
    }

    #[test]
    fn kept_optimiser_state_carries_adams_moments_into_the_next_round() {
        let (backend, params, cache) = setup(2);
        let global = params.decoder_flat();
        let adam = RoundPlan {
            optimizer: LocalOptimizer::Adam,
            ..plan()
        };
        // Two rounds from the same global: reset (the default) repeats round 1's update exactly
        // when the round number (and so the batches) is the same; kept, round 2's steps are
        // scaled by round 1's moments.
        let mut reset =
            LocalTrainer::new(backend.clone(), &params, cache.clone(), 2, 32, 1).unwrap();
        let (a1, _) = reset.train_round(&global, &adam).unwrap();
        let (a2, _) = reset.train_round(&global, &adam).unwrap();
        assert_eq!(a1, a2);
        let mut kept = LocalTrainer::new(backend, &params, cache, 2, 32, 1).unwrap();
        kept.set_keep_optimizer_state(true);
        let (k1, _) = kept.train_round(&global, &adam).unwrap();
        let (k2, _) = kept.train_round(&global, &adam).unwrap();
        assert_eq!(
            k1, a1,
            "the first round starts from fresh moments either way"
        );
        assert_ne!(
            k2, k1,
            "the second round's steps must use the first round's moments"
        );
    }

    /// A lab started from moments given to it (a federation's shared ones) continues from them,
    /// not from its own: a lab handed its own moments back repeats what keeping them does, and one
    /// handed a second moment 10⁶ times as large (a preconditioner set by labs with larger
    /// gradients) takes steps about a thousandth as long.
    #[test]
    fn given_moments_precondition_the_next_round() {
        let (backend, params, cache) = setup(2);
        let global = params.decoder_flat();
        let adam = RoundPlan {
            optimizer: LocalOptimizer::Adam,
            steps_per_epoch: 1,
            ..plan()
        };
        let mut own = LocalTrainer::new(backend.clone(), &params, cache.clone(), 2, 32, 1).unwrap();
        own.set_keep_optimizer_state(true);
        own.train_round(&global, &adam).unwrap();
        let state = own.optimizer_state().unwrap();
        assert!(
            state.buffers.iter().any(|b| b.len() == 2),
            "AdamW keeps two moments"
        );
        let (kept, _) = own.train_round(&global, &adam).unwrap();

        let mut given = LocalTrainer::new(backend, &params, cache, 2, 32, 1).unwrap();
        given.set_keep_optimizer_state(true);
        given
            .set_optimizer_state(LocalOptimizer::Adam, &state)
            .unwrap();
        let (same, _) = given.train_round(&global, &adam).unwrap();
        assert_eq!(same, kept);

        let mut large = state.clone();
        for bufs in &mut large.buffers {
            if let [m, v] = bufs.as_mut_slice() {
                m.fill(0.0);
                v.iter_mut().for_each(|v| *v = v.max(1e-12) * 1e6);
            }
        }
        given
            .set_optimizer_state(LocalOptimizer::Adam, &large)
            .unwrap();
        let (damped, _) = given.train_round(&global, &adam).unwrap();
        let (d_kept, d_damped) = (distance(&kept, &global), distance(&damped, &global));
        assert!(
            d_damped < 0.01 * d_kept,
            "steps {d_damped} with a 10⁶ larger second moment, {d_kept} with the lab's own"
        );
        assert!(
            given
                .set_optimizer_state(LocalOptimizer::Momentum, &state)
                .is_err(),
            "AdamW's two moments are not SGD's one velocity"
        );
    }

    /// A lab whose features are all a quarter as strong (a low-contrast microscope) is scored, and
    /// trains, as the original once both are aligned to one reference; without alignment it is not.
    #[test]
    fn aligned_features_do_not_see_a_lab_wide_change_of_contrast() {
        let (backend, params, cache) = setup(2);
        let reference =
            Alignment::from_code(&code_of(&cache, StyleKind::FeatureStats, "ref")).unwrap();
        let faint = |img: &CachedImage| CachedImage {
            levels: img
                .levels
                .iter()
                .map(|l| {
                    l.iter()
                        .map(|&b| f16::from_f32(f16::from_bits(b).to_f32() * 0.25).to_bits())
                        .collect()
                })
                .collect(),
            ..img.clone()
        };
        let mut dim = cache.clone();
        dim.train = cache.train.iter().map(faint).collect();
        dim.holdout = cache.holdout.iter().map(faint).collect();
        let d = params.decoder_flat();
        let run = |cache: FeatureCache, align: bool| {
            let mut t = LocalTrainer::new(backend.clone(), &params, cache, 2, 32, 1).unwrap();
            t.set_alignment(align.then(|| reference.clone()));
            let before = t.holdout_scores(&d).unwrap().unwrap();
            let (trained, _) = t.train_round(&d, &plan()).unwrap();
            (before, trained, t.restyled_batches())
        };
        let (s, w, restyled) = run(cache.clone(), true);
        let (s_dim, w_dim, _) = run(dim.clone(), true);
        assert_eq!(
            restyled, 0,
            "alignment is not re-styling with another lab's code"
        );
        assert_eq!(s.pred_fraction, s_dim.pred_fraction);
        assert_eq!(s.iou, s_dim.iou);
        // Training: the same steps up to f16 rounding of the stored features.
        let gap = distance(&w, &w_dim) / distance(&w, &d);
        assert!(
            gap < 0.01,
            "aligned updates differ by {gap} of their length"
        );
        let (_, w_plain, _) = run(cache, false);
        let (_, w_plain_dim, _) = run(dim, false);
        let gap = distance(&w_plain, &w_plain_dim) / distance(&w_plain, &d);
        assert!(
            gap > 0.1,
            "unaligned updates differ by only {gap} of their length"
        );
    }

    #[test]
    fn an_alignment_reference_is_checked_and_pools_labs_as_a_mixture() {
        let ok = |mu: f32, sd: f32| -> Vec<(Vec<f32>, Vec<f32>)> {
            CHANNELS
                .iter()
                .map(|&c| (vec![mu; c], vec![sd; c]))
                .collect()
        };
        assert!(Alignment::new(ok(0.5, 1.0)).is_ok());
        assert!(Alignment::new(ok(0.5, 0.0)).is_ok(), "a dead channel");
        assert!(
            Alignment::new(ok(0.5, -1.0)).is_err(),
            "a negative deviation"
        );
        assert!(Alignment::new(ok(f32::NAN, 1.0)).is_err());
        assert!(Alignment::new(ok(0.5, 1.0)[..DEPTH - 1].to_vec()).is_err());
        let mut short = ok(0.5, 1.0);
        short[2].0.pop();
        assert!(Alignment::new(short).is_err());
        // Two labs, means 0 and 2, deviations 1 and 1: the mixture has mean 1 and variance
        // (1 + 0 + 1 + 4) / 2 − 1 = 2.
        let (_, _, cache) = setup(2);
        let code = |mu: f32, sd: f32, device: &str| {
            let mut c = code_of(&cache, StyleKind::FeatureStats, device);
            let mut values = Vec::new();
            for &ch in &CHANNELS {
                values.extend(std::iter::repeat_n(mu, ch));
                values.extend(std::iter::repeat_n(sd, ch));
            }
            c.values = values;
            c
        };
        let pooled = Alignment::pooled(&[code(0.0, 1.0, "a"), code(2.0, 1.0, "b")]).unwrap();
        for (mu, sd) in &pooled.stages {
            assert!(mu.iter().all(|&m| (m - 1.0).abs() < 1e-6));
            assert!(sd.iter().all(|&s| (s - 2.0f32.sqrt()).abs() < 1e-6));
        }
        assert!(Alignment::pooled(&[]).is_err());
        let fourier = code_of(&cache, StyleKind::Fourier, "f");
        assert!(Alignment::from_code(&fourier).is_err());
    }

    #[test]
    fn holdout_scores_agree_with_the_iou_and_are_fractions() {
        let (backend, params, cache) = setup(2);
        let mut t = LocalTrainer::new(backend, &params, cache, 2, 32, 1).unwrap();
        let d = params.decoder_flat();
        let s = t.holdout_scores(&d).unwrap().unwrap();
        assert_eq!(s.iou, t.holdout_iou(&d).unwrap());
        for v in [s.iou, s.dice, s.boundary_f1].into_iter().flatten() {
            assert!((0.0..=1.0).contains(&v), "{v}");
        }
        // Dice ≥ IoU for every class, so for their means.
        assert!(s.dice.unwrap() >= s.iou.unwrap());
        // Per class: the mean of the class IoUs, and pixel fractions that sum to 1.
        let present: Vec<f64> = s.class_iou.iter().flatten().copied().collect();
        let m = present.iter().sum::<f64>() / present.len() as f64;
        assert!((m - s.iou.unwrap()).abs() < 1e-12);
        for f in [&s.pred_fraction, &s.truth_fraction] {
            assert_eq!(f.len(), 2);
            assert!((f.iter().sum::<f64>() - 1.0).abs() < 1e-9, "{f:?}");
        }
        // The test images' labels are half class 1.
        assert!((s.truth_fraction[1] - 0.5).abs() < 1e-9);
    }
}
