//! Pretraining the reference U-Net on labelled dataset folders: the base models microfed ships.
//!
//! Map:
//! - [`data`]: the images in memory, the validation split, image lists, class weights.
//! - [`crate::augment`]: random crops, the eight symmetries of the square, brightness/contrast jitter.
//! - [`validate`]: scoring whole validation images (per-class IoU, mean IoU, boundary F1).
//! - [`checkpoint`]: parameters + optimiser state + run state, written atomically every epoch.
//! - [`TrainConfig`] → [`run`] (in `run.rs`: prepare, resume, one epoch at a time, export) →
//!   [`TrainOutcome`]: the loop, resume, early stopping, and the export of
//!   the best epoch to `OUT/model.onnx` with `OUT/manifest.toml` ([`crate::model::manifest`]).
//!
//! Output folder:
//! ```text
//! OUT/checkpoint/last.ckpt   after every epoch: parameters, optimiser state, run state
//! OUT/checkpoint/best.ckpt   parameters of the best epoch so far (validation mean IoU)
//! OUT/training_log.csv       one row per epoch
//! OUT/model.onnx             the best epoch's parameters, at the end
//! OUT/manifest.toml          classes, normalisation, data, recipe, measured validation metrics
//! ```
//!
//! Reproducibility: the initial weights come from the seed; every training sample is drawn from a
//! ChaCha8 generator keyed by (seed, epoch) with the sample's index in the epoch as its stream, so an
//! epoch's batches do not depend on what ran before it, and a run resumed from a checkpoint (which
//! restores the optimiser's moments and step counts exactly) computes the same epochs as one that
//! never stopped.
//!
//! Learning rate: linear warm-up over the first 5 % of the steps (at most 200), then cosine decay
//! to 1 % of the peak at the last step of the last planned epoch. Resuming with a different
//! `--epochs` stretches the remaining cosine over the new total.

pub mod backend;
pub mod checkpoint;
pub mod data;
mod run;
pub mod validate;

pub use run::run;

use std::path::{Path, PathBuf};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use microfed_kernels::KernelError;
use microfed_kernels::unet::{Optim, OptimKind};

pub use crate::augment::Augment;
pub use checkpoint::{Checkpoint, CheckpointError, EpochRecord, TrainState};
pub use data::{TrainingImage, TrainingSet};

use crate::dataset::DatasetError;
use crate::metrics::MetricsError;
use crate::model::manifest::{ManifestError, ModelManifest};
use crate::model::onnx::{INPUT_MULTIPLE, OnnxError};

/// Everything that can stop a training run; each names the file, folder or option concerned.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Dataset(#[from] DatasetError),
    #[error(
        "{dir}: classes [{classes}] differ from those of {first} [{first_classes}]; all training \
         folders must have the same classes"
    )]
    ClassMismatch {
        dir: PathBuf,
        first: PathBuf,
        classes: String,
        first_classes: String,
    },
    #[error("{0}")]
    Config(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Kernel(#[from] KernelError),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error(transparent)]
    Onnx(#[from] OnnxError),
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error(transparent)]
    Metrics(#[from] MetricsError),
    #[error(
        "{path}: made with {field} = {checkpoint}, this run asks for {now}; continue with the same \
         settings or start over with --fresh"
    )]
    ResumeMismatch {
        path: PathBuf,
        field: String,
        checkpoint: String,
        now: String,
    },
    #[error("training diverged: the loss is {loss} at epoch {epoch}, step {step}; lower --lr")]
    Diverged {
        epoch: usize,
        step: usize,
        loss: f32,
    },
}

/// The optimiser family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OptimizerChoice {
    /// AdamW (β = 0.9, 0.999).
    Adamw,
    /// SGD with momentum 0.9.
    Sgd,
}

impl OptimizerChoice {
    pub fn name(self) -> &'static str {
        match self {
            OptimizerChoice::Adamw => "adamw",
            OptimizerChoice::Sgd => "sgd",
        }
    }
}

/// Cross-entropy class weights.
#[derive(Debug, Clone, PartialEq)]
pub enum ClassWeights {
    /// Inverse square root of the training pixel frequency, normalised to mean 1.
    Auto,
    /// All 1.
    None,
    /// One per class.
    Given(Vec<f32>),
}

impl std::str::FromStr for ClassWeights {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "auto" => Ok(ClassWeights::Auto),
            "none" => Ok(ClassWeights::None),
            list => list
                .split(',')
                .map(|w| {
                    w.trim()
                        .parse::<f32>()
                        .ok()
                        .filter(|v| v.is_finite() && *v >= 0.0)
                        .ok_or_else(|| {
                            format!("`{w}` is not a weight ≥ 0 (expected auto, none or w0,w1,...)")
                        })
                })
                .collect::<Result<_, _>>()
                .map(ClassWeights::Given),
        }
    }
}

/// One training run, as the `pretrain` command line describes it.
#[derive(Debug, Clone)]
pub struct TrainConfig {
    pub data: Vec<PathBuf>,
    /// Classes file for folders without dataset.toml.
    pub classes: Option<PathBuf>,
    /// Only the images whose stems this file lists.
    pub images_from: Option<PathBuf>,
    pub out: PathBuf,
    pub name: String,
    pub version: String,
    pub epochs: usize,
    pub batch: usize,
    pub crop: usize,
    /// `None`: enough steps to see about every training pixel once per epoch.
    pub steps_per_epoch: Option<usize>,
    pub optimizer: OptimizerChoice,
    pub lr: f32,
    /// `None`: 0.01 for AdamW, 0 for SGD.
    pub weight_decay: Option<f32>,
    pub class_weights: ClassWeights,
    pub dice_weight: f32,
    pub val_fraction: f64,
    /// Stop after this many epochs without a better validation mean IoU (`None`: never).
    pub patience: Option<usize>,
    pub seed: u64,
    pub augment: Augment,
    /// Start from this model's weights (and its manifest's normalisation when one lies beside it).
    pub init: Option<PathBuf>,
    /// Standardise every image by its own statistics (`Normalisation::per_image`), on top of
    /// the initial model's normalisation when there is one.
    pub per_image_normalisation: bool,
    /// Freeze the encoder; train the decoder and head only.
    pub decoder_only: bool,
    /// Ignore (and delete) an existing checkpoint.
    pub fresh: bool,
    /// When the initial model predicts another number of classes than the data has: train a new
    /// head (the output layer, drawn afresh) on top of its encoder and decoder instead of refusing.
    pub new_head: bool,
}

impl TrainConfig {
    /// Defaults for everything but the data and the output folder.
    pub fn new(data: Vec<PathBuf>, out: PathBuf) -> Self {
        let name = out
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "model".into());
        Self {
            data,
            classes: None,
            images_from: None,
            out,
            name,
            version: "1.0.0".into(),
            epochs: 40,
            batch: 8,
            crop: 256,
            steps_per_epoch: None,
            optimizer: OptimizerChoice::Adamw,
            lr: 2e-3,
            weight_decay: None,
            class_weights: ClassWeights::Auto,
            dice_weight: 0.0,
            val_fraction: 0.15,
            patience: Some(8),
            seed: 0,
            augment: Augment::default(),
            init: None,
            per_image_normalisation: false,
            decoder_only: false,
            fresh: false,
            new_head: false,
        }
    }

    fn check(&self) -> Result<(), TrainError> {
        let bad = |m: String| Err(TrainError::Config(m));
        if self.crop == 0 || !self.crop.is_multiple_of(INPUT_MULTIPLE) {
            return bad(format!(
                "--crop {} must be a positive multiple of {INPUT_MULTIPLE}",
                self.crop
            ));
        }
        if self.batch == 0 || self.epochs == 0 || self.steps_per_epoch == Some(0) {
            return bad("--batch, --epochs and --steps-per-epoch must be at least 1".into());
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return bad(format!("--lr {} must be a positive number", self.lr));
        }
        if !(self.dice_weight.is_finite() && self.dice_weight >= 0.0) {
            return bad(format!("--dice-weight {} must be ≥ 0", self.dice_weight));
        }
        if self
            .weight_decay
            .is_some_and(|w| !(w.is_finite() && w >= 0.0))
        {
            return bad("--weight-decay must be ≥ 0".into());
        }
        if self.decoder_only && self.init.is_none() {
            return bad(
                "--decoder-only needs --init MODEL.onnx (a trained encoder to freeze)".into(),
            );
        }
        if self.patience == Some(0) {
            return bad("--patience must be at least 1".into());
        }
        Ok(())
    }

    fn weight_decay(&self) -> f32 {
        self.weight_decay.unwrap_or(match self.optimizer {
            OptimizerChoice::Adamw => 0.01,
            OptimizerChoice::Sgd => 0.0,
        })
    }

    /// The optimiser at learning rate `lr`.
    fn optim(&self, lr: f32) -> Optim {
        let wd = self.weight_decay();
        let mut o = match self.optimizer {
            OptimizerChoice::Adamw => Optim::adamw(lr),
            OptimizerChoice::Sgd => Optim::sgd(lr, 0.9),
        };
        match &mut o.kind {
            OptimKind::AdamW { weight_decay, .. } | OptimKind::Sgd { weight_decay, .. } => {
                *weight_decay = wd
            }
        }
        o
    }
}

/// Learning rate at optimiser step `step` (0-based) of `total`: see the module docs.
pub fn learning_rate(peak: f32, step: u64, total: u64) -> f32 {
    let total = total.max(1);
    let warmup = (total / 20).min(200);
    if step < warmup {
        return peak * (step + 1) as f32 / warmup as f32;
    }
    let span = (total - warmup).max(1) as f64;
    let t = ((step - warmup) as f64 / span).min(1.0);
    let floor = 0.01;
    (f64::from(peak) * (floor + (1.0 - floor) * 0.5 * (1.0 + (std::f64::consts::PI * t).cos())))
        as f32
}

/// What a run produced.
#[derive(Debug, Clone)]
pub struct TrainOutcome {
    pub state: TrainState,
    /// The written manifest; `None` when the epoch callback stopped the run before the end.
    pub manifest: Option<ModelManifest>,
}

/// The checkpoint folder of an output folder.
pub fn checkpoint_dir(out: &Path) -> PathBuf {
    out.join("checkpoint")
}

/// The generator for sample `index` of `epoch` (1-based) of a run with `seed`.
fn sample_rng(seed: u64, epoch: usize, index: u64) -> ChaCha8Rng {
    let mut z = seed ^ (epoch as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x7261_696e;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    let mut rng = ChaCha8Rng::seed_from_u64(z ^ (z >> 31));
    rng.set_stream(index);
    rng
}

/// Fills one batch: sample `first + i` goes to slot `i`. Images are drawn in proportion to their
/// area, so a pixel of a large image is as likely to be seen as one of a small image.
pub fn fill_batch(
    set: &TrainingSet,
    cfg: &TrainConfig,
    epoch: usize,
    first: u64,
    x: &mut [f32],
    labels: &mut [u8],
) {
    let crop = cfg.crop;
    let areas: Vec<u64> = set
        .train
        .iter()
        .scan(0u64, |acc, img| {
            *acc += (img.width * img.height) as u64;
            Some(*acc)
        })
        .collect();
    let total = *areas.last().unwrap_or(&1);
    let plane = crop * crop;
    x.par_chunks_mut(plane)
        .zip(labels.par_chunks_mut(plane))
        .enumerate()
        .for_each(|(i, (xi, li))| {
            let mut rng = sample_rng(cfg.seed, epoch, first + i as u64);
            let u = rng.random_range(0..total);
            let img = areas.partition_point(|&a| a <= u);
            cfg.augment.sample(&set.train[img], crop, &mut rng, xi, li);
        });
}

/// An `f32` setting as the `f64` with the same shortest decimal form (2e-3, not 0.0020000000949949026).
pub(crate) fn shortest_f64(v: f32) -> f64 {
    v.to_string().parse().unwrap_or(f64::from(v))
}

/// Rewrites `training_log.csv` from the history (so a resumed run's log has each epoch once).
pub(crate) fn write_log(
    path: &Path,
    history: &[EpochRecord],
    class_names: &[String],
) -> Result<(), TrainError> {
    let opt = |v: Option<f64>| v.map(|v| format!("{v:.6}")).unwrap_or_default();
    let mut text = String::from("epoch,loss,cross_entropy,dice,lr,val_mean_iou,val_boundary_f1");
    for name in class_names {
        let col: String = name
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        text.push_str(&format!(",val_iou_{col}"));
    }
    text.push_str(",seconds\n");
    for r in history {
        text.push_str(&format!(
            "{},{:.6},{:.6},{:.6},{:.3e},{},{}",
            r.epoch,
            r.loss,
            r.cross_entropy,
            r.dice,
            r.lr,
            opt(r.val_mean_iou),
            opt(r.val_boundary_f1)
        ));
        for c in 0..class_names.len() {
            text.push_str(&format!(
                ",{}",
                opt(r.val_class_iou.get(c).copied().flatten())
            ));
        }
        text.push_str(&format!(",{:.2}\n", r.seconds));
    }
    let tmp = path.with_extension("csv.tmp");
    std::fs::write(&tmp, text)
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|source| TrainError::Io {
            path: path.to_owned(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn learning_rate_warms_up_then_decays_to_one_percent() {
        let total = 1000;
        // warm-up: 50 steps.
        assert!((learning_rate(1.0, 0, total) - 1.0 / 50.0).abs() < 1e-6);
        assert!((learning_rate(1.0, 49, total) - 1.0).abs() < 1e-6);
        assert!((learning_rate(1.0, 50, total) - 1.0).abs() < 1e-6);
        // half-way through the cosine: (1 + 0.01) / 2.
        assert!((learning_rate(1.0, 50 + 475, total) - 0.505).abs() < 1e-4);
        assert!((learning_rate(1.0, 1000, total) - 0.01).abs() < 1e-6);
    }

    #[test]
    fn class_weights_parse() {
        assert_eq!("auto".parse::<ClassWeights>(), Ok(ClassWeights::Auto));
        assert_eq!(
            "1, 2.5".parse::<ClassWeights>(),
            Ok(ClassWeights::Given(vec![1.0, 2.5]))
        );
        assert!("1,-2".parse::<ClassWeights>().is_err());
        assert!("x".parse::<ClassWeights>().is_err());
    }
}
