//! Pretraining the reference U-Net on labelled dataset folders: the base models microfed ships.
//!
//! Map:
//! - [`data`]: the images in memory, the validation split, image lists, class weights.
//! - [`augment`]: random crops, the eight symmetries of the square, brightness/contrast jitter.
//! - [`validate`]: scoring whole validation images (per-class IoU, mean IoU, boundary F1).
//! - [`checkpoint`]: parameters + optimiser state + run state, written atomically every epoch.
//! - [`TrainConfig`] → [`run`] → [`TrainOutcome`]: the loop, resume, early stopping, and the export of
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

pub mod augment;
pub mod checkpoint;
pub mod data;
pub mod validate;

use std::collections::BTreeMap;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use microfed_kernels::unet::{Loss, Optim, OptimKind, Params, UNet};
use microfed_kernels::{Backend, KernelError, Shape};

pub use augment::Augment;
pub use checkpoint::{Checkpoint, CheckpointError, EpochRecord, TrainState};
pub use data::{TrainingImage, TrainingSet};

use crate::dataset::DatasetError;
use crate::metrics::MetricsError;
use crate::micrograph::Normalisation;
use crate::model::manifest::{
    ClassIou, ManifestError, ModelManifest, Recipe, TrainingData, Validation, sha256_file,
};
use crate::model::onnx::{self, INPUT_MULTIPLE, OPSET, OnnxError};

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
    /// Freeze the encoder; train the decoder and head only.
    pub decoder_only: bool,
    /// Ignore (and delete) an existing checkpoint.
    pub fresh: bool,
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
            decoder_only: false,
            fresh: false,
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

/// Runs (or resumes) training and, unless `on_epoch` breaks off, exports the best epoch.
/// `on_epoch` sees every finished epoch after its checkpoint is written.
pub fn run<B: Backend>(
    backend: Arc<B>,
    cfg: &TrainConfig,
    on_epoch: &mut dyn FnMut(&EpochRecord) -> ControlFlow<()>,
) -> Result<TrainOutcome, TrainError> {
    let wall = Instant::now();
    cfg.check()?;

    // A model to start from fixes the normalisation (through its manifest) and the classes.
    let mut normalisation = Normalisation::default();
    let mut init_params = None;
    if let Some(path) = &cfg.init {
        let params = onnx::load_params(&onnx::load(path)?, path)?;
        let manifest_path = path.with_file_name("manifest.toml");
        if manifest_path.is_file() {
            normalisation = ModelManifest::load(&manifest_path)?.normalisation;
            tracing::info!(manifest = %manifest_path.display(), ?normalisation, "normalisation from the initial model");
        }
        init_params = Some(params);
    }

    let list = match &cfg.images_from {
        Some(p) => Some((data::read_image_list(p)?, p.clone())),
        None => None,
    };
    let set = TrainingSet::load(
        &cfg.data,
        cfg.classes.as_deref(),
        list.as_ref().map(|(l, p)| (l, p.as_path())),
        &normalisation,
        cfg.val_fraction,
        cfg.seed,
    )?;
    let k = set.num_classes();
    let class_names: Vec<String> = set.classes.iter().map(|c| c.name.clone()).collect();
    if let Some(p) = &init_params
        && p.classes != k
    {
        return Err(TrainError::Config(format!(
            "{}: the model has {} classes, the data {k}",
            cfg.init.as_deref().unwrap_or(Path::new("")).display(),
            p.classes
        )));
    }
    let class_weights = match &cfg.class_weights {
        ClassWeights::Auto => data::auto_class_weights(&set.class_pixels()),
        ClassWeights::None => vec![1.0; k],
        ClassWeights::Given(w) if w.len() == k => w.clone(),
        ClassWeights::Given(w) => {
            return Err(TrainError::Config(format!(
                "--class-weights gives {} weights for {k} classes ({})",
                w.len(),
                class_names.join(", ")
            )));
        }
    };
    let train_pixels: usize = set.train.iter().map(|i| i.width * i.height).sum();
    let steps_per_epoch = cfg.steps_per_epoch.unwrap_or_else(|| {
        train_pixels
            .div_ceil(cfg.crop * cfg.crop)
            .div_ceil(cfg.batch)
            .max(1)
    });
    tracing::info!(
        train_images = set.train.len(),
        validation_images = set.validation.len(),
        classes = %class_names.join(", "),
        class_weights = ?class_weights,
        steps_per_epoch,
        device = %backend.name(),
        "training data loaded"
    );

    let identity: BTreeMap<String, String> = [
        ("classes", class_names.join(", ")),
        ("data", format!("{:?}", cfg.data)),
        ("images_from", format!("{:?}", cfg.images_from)),
        ("init", format!("{:?}", cfg.init)),
        ("decoder_only", cfg.decoder_only.to_string()),
        ("crop", cfg.crop.to_string()),
        ("batch", cfg.batch.to_string()),
        ("steps_per_epoch", steps_per_epoch.to_string()),
        ("optimizer", cfg.optimizer.name().into()),
        ("lr", cfg.lr.to_string()),
        ("weight_decay", cfg.weight_decay().to_string()),
        ("class_weights", format!("{class_weights:?}")),
        ("dice_weight", cfg.dice_weight.to_string()),
        ("val_fraction", cfg.val_fraction.to_string()),
        ("seed", cfg.seed.to_string()),
        ("augment", format!("{:?}", cfg.augment)),
        ("normalisation", format!("{normalisation:?}")),
    ]
    .into_iter()
    .map(|(a, b)| (a.to_string(), b))
    .collect();

    let ckpt_dir = checkpoint_dir(&cfg.out);
    let last_path = ckpt_dir.join("last.ckpt");
    let best_path = ckpt_dir.join("best.ckpt");
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| TrainError::Io { path, source }
    };
    if cfg.fresh && ckpt_dir.exists() {
        std::fs::remove_dir_all(&ckpt_dir).map_err(io(&ckpt_dir))?;
    }
    std::fs::create_dir_all(&ckpt_dir).map_err(io(&ckpt_dir))?;

    let mut net = UNet::new(
        backend.clone(),
        &match init_params {
            Some(p) => p,
            None => Params::init(k, cfg.seed)?,
        },
    )?;
    let mut state = TrainState::default();
    if last_path.is_file() {
        let ck = Checkpoint::load(&last_path)?;
        for (field, now) in &identity {
            let was = ck.identity.get(field).cloned().unwrap_or_default();
            if &was != now {
                return Err(TrainError::ResumeMismatch {
                    path: last_path,
                    field: field.clone(),
                    checkpoint: was,
                    now: now.clone(),
                });
            }
        }
        net.from_host(&ck.params)?;
        if let Some(opt) = &ck.optimizer {
            net.set_optimizer_state(&cfg.optim(cfg.lr), opt)?;
        }
        state = ck.state;
        tracing::info!(
            checkpoint = %last_path.display(),
            epochs_done = state.epoch,
            best_epoch = state.best_epoch,
            "resuming from the last checkpoint"
        );
    }

    let loss = Loss {
        class_weights: Some(class_weights.clone()),
        dice_weight: cfg.dice_weight,
    };
    let total_steps = (cfg.epochs * steps_per_epoch) as u64;
    let batch_shape = Shape::new(cfg.batch, 1, cfg.crop, cfg.crop);
    let mut x = vec![0.0f32; batch_shape.len()];
    let mut labels = vec![0u8; batch_shape.len()];

    while state.epoch < cfg.epochs && !state.stopped_early {
        let epoch = state.epoch + 1;
        let started = Instant::now();
        let bar = crate::telemetry::progress_bar(steps_per_epoch as u64, &format!("epoch {epoch}"));
        let (mut sum_loss, mut sum_ce, mut sum_dice) = (0.0f64, 0.0f64, 0.0f64);
        let mut lr = cfg.lr;
        for step in 0..steps_per_epoch {
            fill_batch(
                &set,
                cfg,
                epoch,
                (step * cfg.batch) as u64,
                &mut x,
                &mut labels,
            );
            let xb = backend.upload(&x)?;
            let lb = backend.upload_labels(&labels)?;
            lr = learning_rate(cfg.lr, state.step, total_steps);
            let optim = cfg.optim(lr);
            let stats = if cfg.decoder_only {
                let feats = net.encode(&xb, batch_shape)?;
                net.decoder_train_step(&feats, batch_shape, &lb, &loss, &optim, None)?
            } else {
                net.train_step(&xb, batch_shape, &lb, &loss, &optim)?
            };
            if !stats.loss.is_finite() {
                return Err(TrainError::Diverged {
                    epoch,
                    step: step + 1,
                    loss: stats.loss,
                });
            }
            state.step += 1;
            sum_loss += f64::from(stats.loss);
            sum_ce += f64::from(stats.cross_entropy);
            sum_dice += f64::from(stats.dice);
            bar.inc(1);
        }
        bar.finish_and_clear();
        let n = steps_per_epoch as f64;
        let eval = if set.validation.is_empty() {
            None
        } else {
            Some(validate::evaluate(
                &*backend,
                &mut net,
                &set.validation,
                &class_names,
            )?)
        };
        let record = EpochRecord {
            epoch,
            loss: sum_loss / n,
            cross_entropy: sum_ce / n,
            dice: sum_dice / n,
            lr: f64::from(lr),
            val_mean_iou: eval.as_ref().and_then(|e| e.mean_iou),
            val_class_iou: eval
                .as_ref()
                .map(|e| e.classes.iter().map(|c| c.iou).collect())
                .unwrap_or_default(),
            val_boundary_f1: eval.as_ref().and_then(|e| e.boundary.f1),
            seconds: started.elapsed().as_secs_f64(),
        };
        // Without validation images every epoch is "the best": the last one is exported.
        let improved = match (record.val_mean_iou, state.best_mean_iou) {
            (_, None) => true,
            (Some(now), Some(best)) => now > best,
            (None, Some(_)) => false,
        } || set.validation.is_empty();
        let params = net.to_host()?;
        if improved {
            state.best_mean_iou = record.val_mean_iou;
            state.best_epoch = epoch;
            state.epochs_without_improvement = 0;
            Checkpoint {
                state: state.clone(),
                identity: identity.clone(),
                params: params.clone(),
                optimizer: None,
            }
            .save(&best_path)?;
        } else {
            state.epochs_without_improvement += 1;
        }
        state.epoch = epoch;
        state.seconds += started.elapsed().as_secs_f64();
        state.history.push(record.clone());
        if cfg
            .patience
            .is_some_and(|p| !set.validation.is_empty() && state.epochs_without_improvement >= p)
        {
            state.stopped_early = true;
        }
        Checkpoint {
            state: state.clone(),
            identity: identity.clone(),
            params,
            optimizer: Some(net.optimizer_state()?),
        }
        .save(&last_path)?;
        write_log(
            &cfg.out.join("training_log.csv"),
            &state.history,
            &class_names,
        )?;
        tracing::info!(
            epoch,
            of = cfg.epochs,
            loss = format!("{:.4}", record.loss),
            val_miou = record
                .val_mean_iou
                .map(|v| format!("{v:.4}"))
                .unwrap_or("-".into()),
            val_bf1 = record
                .val_boundary_f1
                .map(|v| format!("{v:.4}"))
                .unwrap_or("-".into()),
            lr = format!("{lr:.2e}"),
            seconds = format!("{:.1}", record.seconds),
            "epoch done"
        );
        if state.stopped_early {
            tracing::info!(
                epoch,
                best_epoch = state.best_epoch,
                patience = cfg.patience,
                "early stopping: no better validation mean IoU"
            );
        }
        if on_epoch(&record).is_break() {
            return Ok(TrainOutcome {
                state,
                manifest: None,
            });
        }
    }

    // Export the best epoch.
    let best = Checkpoint::load(&best_path)?;
    let best_record = state
        .history
        .iter()
        .find(|r| r.epoch == state.best_epoch)
        .cloned();
    let metadata = vec![
        ("name".to_string(), cfg.name.clone()),
        ("version".to_string(), cfg.version.clone()),
        ("classes".to_string(), class_names.join(", ")),
    ];
    let model = onnx::export(&best.params, &metadata)?;
    let model_path = cfg.out.join("model.onnx");
    onnx::save(&model, &model_path)?;
    let wall_seconds = state.seconds.max(wall.elapsed().as_secs_f64());
    let manifest = ModelManifest {
        name: cfg.name.clone(),
        version: cfg.version.clone(),
        description: None,
        model_file: "model.onnx".into(),
        sha256: sha256_file(&model_path)?,
        opset: OPSET,
        input_multiple: INPUT_MULTIPLE as u32,
        normalisation,
        classes: set.classes.clone(),
        training: TrainingData {
            datasets: set.datasets.clone(),
            images_from: cfg.images_from.clone(),
            init: cfg.init.clone(),
            decoder_only: cfg.decoder_only,
        },
        recipe: Recipe {
            epochs_planned: cfg.epochs,
            epochs_run: state.epoch,
            best_epoch: state.best_epoch,
            stopped_early: state.stopped_early,
            steps_per_epoch,
            batch: cfg.batch,
            crop: cfg.crop,
            optimizer: cfg.optimizer.name().into(),
            lr: shortest_f64(cfg.lr),
            lr_schedule:
                "linear warm-up over 5 % of the steps (at most 200), then cosine to 1 % of \
                          the peak"
                    .into(),
            weight_decay: shortest_f64(cfg.weight_decay()),
            seed: cfg.seed,
            class_weights,
            dice_weight: cfg.dice_weight,
            augmentation: cfg.augment,
            device: backend.name(),
            wall_seconds,
        },
        validation: Validation {
            images: set.validation.len(),
            mean_iou: best_record.as_ref().and_then(|r| r.val_mean_iou),
            boundary_f1: best_record.as_ref().and_then(|r| r.val_boundary_f1),
            boundary_tolerance_px: validate::BOUNDARY_TOLERANCE_PX,
            classes: class_names
                .iter()
                .enumerate()
                .map(|(c, name)| ClassIou {
                    name: name.clone(),
                    iou: best_record
                        .as_ref()
                        .and_then(|r| r.val_class_iou.get(c).copied().flatten()),
                })
                .collect(),
        },
    };
    manifest.save(&cfg.out.join("manifest.toml"))?;
    tracing::info!(
        model = %model_path.display(),
        best_epoch = state.best_epoch,
        val_miou = ?manifest.validation.mean_iou,
        "exported the best epoch"
    );
    Ok(TrainOutcome {
        state,
        manifest: Some(manifest),
    })
}

/// An `f32` setting as the `f64` with the same shortest decimal form (2e-3, not 0.0020000000949949026).
fn shortest_f64(v: f32) -> f64 {
    v.to_string().parse().unwrap_or(f64::from(v))
}

/// Rewrites `training_log.csv` from the history (so a resumed run's log has each epoch once).
fn write_log(
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
