//! The training run, in its phases: [`prepare`] (initial model, data, class weights, epoch length),
//! [`Checkpoints::resume`] (or a fresh start), one [`train_epoch`] and [`Run::close_epoch`] at a time
//! (validation, best/last checkpoints, log, early stopping), and [`export`] of the best epoch.

use std::collections::BTreeMap;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use microfed_kernels::unet::{Loss, Params, UNet};
use microfed_kernels::{Backend, Shape};

use super::checkpoint::{Checkpoint, EpochRecord, TrainState};
use super::data::{self, TrainingSet};
use super::validate;
use super::{
    ClassWeights, TrainConfig, TrainError, TrainOutcome, checkpoint_dir, fill_batch, learning_rate,
    shortest_f64, write_log,
};
use crate::micrograph::Normalisation;
use crate::model::manifest::{
    ClassIou, ModelManifest, Recipe, TrainingData, Validation, sha256_file,
};
use crate::model::onnx::{self, INPUT_MULTIPLE, OPSET};

/// What a run trains on, decided before the first step.
struct Prepared {
    normalisation: Normalisation,
    init_params: Option<Params>,
    set: TrainingSet,
    class_names: Vec<String>,
    class_weights: Vec<f32>,
    steps_per_epoch: usize,
}

/// Loads the initial model (which fixes the normalisation, through its manifest, and the classes),
/// the data, and settles the class weights and the epoch length.
fn prepare(cfg: &TrainConfig) -> Result<Prepared, TrainError> {
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
    if cfg.per_image_normalisation && !normalisation.per_image {
        if cfg.init.is_some() {
            tracing::warn!(
                "per-image normalisation on top of an initial model trained with a fixed one: its \
                 inputs change, so expect its first epochs to relearn them"
            );
        }
        normalisation.per_image = true;
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
    if let Some(p) = init_params.as_mut()
        && p.classes != k
    {
        let model = cfg.init.as_deref().unwrap_or(Path::new("")).display();
        if !cfg.new_head {
            return Err(TrainError::Config(format!(
                "{model}: the model has {} classes, the data {k} (a new head for the data's classes: \
                 `microfed finetune` makes one)",
                p.classes
            )));
        }
        tracing::info!(model = %model, from = p.classes, to = k, "a new head for the data's classes; encoder and decoder start from the model");
        *p = p.with_classes(k, cfg.seed)?;
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
    Ok(Prepared {
        normalisation,
        init_params,
        set,
        class_names,
        class_weights,
        steps_per_epoch,
    })
}

/// The settings a checkpoint must share with the run that resumes it.
fn identity(cfg: &TrainConfig, p: &Prepared) -> BTreeMap<String, String> {
    [
        ("classes", p.class_names.join(", ")),
        ("data", format!("{:?}", cfg.data)),
        ("images_from", format!("{:?}", cfg.images_from)),
        ("init", format!("{:?}", cfg.init)),
        ("decoder_only", cfg.decoder_only.to_string()),
        ("crop", cfg.crop.to_string()),
        ("batch", cfg.batch.to_string()),
        ("steps_per_epoch", p.steps_per_epoch.to_string()),
        ("optimizer", cfg.optimizer.name().into()),
        ("lr", cfg.lr.to_string()),
        ("weight_decay", cfg.weight_decay().to_string()),
        ("class_weights", format!("{:?}", p.class_weights)),
        ("dice_weight", cfg.dice_weight.to_string()),
        ("val_fraction", cfg.val_fraction.to_string()),
        ("seed", cfg.seed.to_string()),
        ("augment", format!("{:?}", cfg.augment)),
        ("normalisation", format!("{:?}", p.normalisation)),
    ]
    .into_iter()
    .map(|(a, b)| (a.to_string(), b))
    .collect()
}

/// `OUT/checkpoint/`: the last epoch (to resume) and the best one (to export).
struct Checkpoints {
    last: PathBuf,
    best: PathBuf,
}

impl Checkpoints {
    /// Creates the folder (emptied first with `--fresh`).
    fn open(cfg: &TrainConfig) -> Result<Self, TrainError> {
        let dir = checkpoint_dir(&cfg.out);
        let io = |source| TrainError::Io {
            path: dir.clone(),
            source,
        };
        if cfg.fresh && dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(io)?;
        }
        std::fs::create_dir_all(&dir).map_err(io)?;
        Ok(Self {
            last: dir.join("last.ckpt"),
            best: dir.join("best.ckpt"),
        })
    }

    /// Restores parameters, optimiser state and run state from the last checkpoint, if any, after
    /// checking that it was written by a run with the same settings.
    fn resume<B: Backend>(
        &self,
        net: &mut UNet<B>,
        identity: &BTreeMap<String, String>,
        cfg: &TrainConfig,
    ) -> Result<TrainState, TrainError> {
        if !self.last.is_file() {
            return Ok(TrainState::default());
        }
        let ck = Checkpoint::load(&self.last)?;
        for (field, now) in identity {
            let was = ck.identity.get(field).cloned().unwrap_or_default();
            if &was != now {
                return Err(TrainError::ResumeMismatch {
                    path: self.last.clone(),
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
        tracing::info!(
            checkpoint = %self.last.display(),
            epochs_done = ck.state.epoch,
            best_epoch = ck.state.best_epoch,
            "resuming from the last checkpoint"
        );
        Ok(ck.state)
    }
}

/// Means over one epoch's steps, and the learning rate of its last step.
struct EpochSums {
    loss: f64,
    cross_entropy: f64,
    dice: f64,
    lr: f32,
}

/// Everything the epochs share.
struct Run<'a, B: Backend> {
    backend: Arc<B>,
    cfg: &'a TrainConfig,
    p: Prepared,
    identity: BTreeMap<String, String>,
    checkpoints: Checkpoints,
    net: UNet<B>,
    loss: Loss,
    batch_shape: Shape,
    total_steps: u64,
}

/// One epoch of `steps_per_epoch` optimiser steps.
fn train_epoch<B: Backend>(
    run: &mut Run<'_, B>,
    state: &mut TrainState,
    epoch: usize,
) -> Result<EpochSums, TrainError> {
    let cfg = run.cfg;
    let steps = run.p.steps_per_epoch;
    let bar = crate::telemetry::progress_bar(steps as u64, &format!("epoch {epoch}"));
    let (mut sum_loss, mut sum_ce, mut sum_dice) = (0.0f64, 0.0f64, 0.0f64);
    let mut x = vec![0.0f32; run.batch_shape.len()];
    let mut labels = vec![0u8; run.batch_shape.len()];
    let mut lr = cfg.lr;
    for step in 0..steps {
        fill_batch(
            &run.p.set,
            cfg,
            epoch,
            (step * cfg.batch) as u64,
            &mut x,
            &mut labels,
        );
        let xb = run.backend.upload(&x)?;
        let lb = run.backend.upload_labels(&labels)?;
        lr = learning_rate(cfg.lr, state.step, run.total_steps);
        let optim = cfg.optim(lr);
        let stats = if cfg.decoder_only {
            let feats = run.net.encode(&xb, run.batch_shape)?;
            run.net
                .decoder_train_step(&feats, run.batch_shape, &lb, &run.loss, &optim, None)?
        } else {
            run.net
                .train_step(&xb, run.batch_shape, &lb, &run.loss, &optim)?
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
    let n = steps as f64;
    Ok(EpochSums {
        loss: sum_loss / n,
        cross_entropy: sum_ce / n,
        dice: sum_dice / n,
        lr,
    })
}

impl<B: Backend> Run<'_, B> {
    /// Validates the epoch's network, keeps the best and the last checkpoint, rewrites the log and
    /// decides on early stopping; returns the epoch's record.
    fn close_epoch(
        &mut self,
        state: &mut TrainState,
        epoch: usize,
        sums: EpochSums,
        started: Instant,
    ) -> Result<EpochRecord, TrainError> {
        let set = &self.p.set;
        let eval = if set.validation.is_empty() {
            None
        } else {
            Some(validate::evaluate(
                &*self.backend,
                &mut self.net,
                &set.validation,
                &self.p.class_names,
            )?)
        };
        let record = EpochRecord {
            epoch,
            loss: sums.loss,
            cross_entropy: sums.cross_entropy,
            dice: sums.dice,
            lr: f64::from(sums.lr),
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
        let params = self.net.to_host()?;
        if improved {
            state.best_mean_iou = record.val_mean_iou;
            state.best_epoch = epoch;
            state.epochs_without_improvement = 0;
            Checkpoint {
                state: state.clone(),
                identity: self.identity.clone(),
                params: params.clone(),
                optimizer: None,
            }
            .save(&self.checkpoints.best)?;
        } else {
            state.epochs_without_improvement += 1;
        }
        state.epoch = epoch;
        state.seconds += started.elapsed().as_secs_f64();
        state.history.push(record.clone());
        if self
            .cfg
            .patience
            .is_some_and(|p| !set.validation.is_empty() && state.epochs_without_improvement >= p)
        {
            state.stopped_early = true;
        }
        Checkpoint {
            state: state.clone(),
            identity: self.identity.clone(),
            params,
            optimizer: Some(self.net.optimizer_state()?),
        }
        .save(&self.checkpoints.last)?;
        write_log(
            &self.cfg.out.join("training_log.csv"),
            &state.history,
            &self.p.class_names,
        )?;
        let fmt = |v: Option<f64>| v.map(|v| format!("{v:.4}")).unwrap_or("-".into());
        tracing::info!(
            epoch,
            of = self.cfg.epochs,
            loss = format!("{:.4}", record.loss),
            val_miou = fmt(record.val_mean_iou),
            val_bf1 = fmt(record.val_boundary_f1),
            lr = format!("{:.2e}", sums.lr),
            seconds = format!("{:.1}", record.seconds),
            "epoch done"
        );
        if state.stopped_early {
            tracing::info!(
                epoch,
                best_epoch = state.best_epoch,
                patience = self.cfg.patience,
                "early stopping: no better validation mean IoU"
            );
        }
        Ok(record)
    }
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
    let mut p = prepare(cfg)?;
    tracing::info!(
        train_images = p.set.train.len(),
        validation_images = p.set.validation.len(),
        classes = %p.class_names.join(", "),
        class_weights = ?p.class_weights,
        steps_per_epoch = p.steps_per_epoch,
        device = %backend.name(),
        "training data loaded"
    );
    let identity = identity(cfg, &p);
    let checkpoints = Checkpoints::open(cfg)?;
    let start = match p.init_params.take() {
        Some(params) => params,
        None => Params::init(p.set.num_classes(), cfg.seed)?,
    };
    let mut net = UNet::new(backend.clone(), &start)?;
    let mut state = checkpoints.resume(&mut net, &identity, cfg)?;
    let mut run = Run {
        loss: Loss {
            class_weights: Some(p.class_weights.clone()),
            dice_weight: cfg.dice_weight,
        },
        batch_shape: Shape::new(cfg.batch, 1, cfg.crop, cfg.crop),
        total_steps: (cfg.epochs * p.steps_per_epoch) as u64,
        backend,
        cfg,
        p,
        identity,
        checkpoints,
        net,
    };
    while state.epoch < cfg.epochs && !state.stopped_early {
        let epoch = state.epoch + 1;
        let started = Instant::now();
        let sums = train_epoch(&mut run, &mut state, epoch)?;
        let record = run.close_epoch(&mut state, epoch, sums, started)?;
        if on_epoch(&record).is_break() {
            return Ok(TrainOutcome {
                state,
                manifest: None,
            });
        }
    }
    let wall_seconds = state.seconds.max(wall.elapsed().as_secs_f64());
    let manifest = export(&run, &state, wall_seconds)?;
    Ok(TrainOutcome {
        state,
        manifest: Some(manifest),
    })
}

/// Writes the best epoch as `OUT/model.onnx` and its `OUT/manifest.toml`.
fn export<B: Backend>(
    run: &Run<'_, B>,
    state: &TrainState,
    wall_seconds: f64,
) -> Result<ModelManifest, TrainError> {
    let (cfg, p) = (run.cfg, &run.p);
    let best = Checkpoint::load(&run.checkpoints.best)?;
    let best_record = state
        .history
        .iter()
        .find(|r| r.epoch == state.best_epoch)
        .cloned();
    let metadata = vec![
        ("name".to_string(), cfg.name.clone()),
        ("version".to_string(), cfg.version.clone()),
        ("classes".to_string(), p.class_names.join(", ")),
    ];
    let model = onnx::export(&best.params, &metadata)?;
    let model_path = cfg.out.join("model.onnx");
    onnx::save(&model, &model_path)?;
    let manifest = ModelManifest {
        name: cfg.name.clone(),
        version: cfg.version.clone(),
        description: None,
        model_file: "model.onnx".into(),
        sha256: sha256_file(&model_path)?,
        opset: OPSET,
        input_multiple: INPUT_MULTIPLE as u32,
        normalisation: p.normalisation,
        classes: p.set.classes.clone(),
        training: TrainingData {
            datasets: p.set.datasets.clone(),
            images_from: cfg.images_from.clone(),
            init: cfg.init.clone(),
            decoder_only: cfg.decoder_only,
        },
        recipe: Recipe {
            epochs_planned: cfg.epochs,
            epochs_run: state.epoch,
            best_epoch: state.best_epoch,
            stopped_early: state.stopped_early,
            steps_per_epoch: p.steps_per_epoch,
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
            class_weights: p.class_weights.clone(),
            dice_weight: cfg.dice_weight,
            augmentation: cfg.augment,
            device: run.backend.name(),
            wall_seconds,
        },
        validation: Validation {
            images: p.set.validation.len(),
            mean_iou: best_record.as_ref().and_then(|r| r.val_mean_iou),
            boundary_f1: best_record.as_ref().and_then(|r| r.val_boundary_f1),
            boundary_tolerance_px: validate::BOUNDARY_TOLERANCE_PX,
            classes: p
                .class_names
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
    Ok(manifest)
}
