//! `microfed pretrain`: trains the reference U-Net on labelled dataset folders and exports the best
//! epoch as `OUT/model.onnx` with `OUT/manifest.toml` (see [`crate::train`]).

use std::ops::ControlFlow;
use std::path::PathBuf;
use std::sync::Arc;

use microfed_kernels::Backend;

use crate::train::backend::{OnBackend, on_backend};
use crate::train::{self, Augment, ClassWeights, OptimizerChoice, TrainConfig};

/// Train the reference U-Net (a base model) on labelled dataset folders.
///
/// Training samples are random crops with flips, 90° rotations and brightness/contrast jitter; an
/// image smaller than the crop is padded by reflection and its padding is ignored by the loss. A
/// share of each folder's images (by image) is held out and scored every epoch on whole images
/// (per-class IoU, mean IoU, boundary F1 at 2 px). A checkpoint is written after every epoch;
/// started again with the same --out, the run continues where it stopped.
#[derive(Debug, clap::Args)]
#[command(after_help = "\
Examples:
  microfed pretrain --data data/poly-se data/poly-bse --epochs 40 --out models/grains
  microfed pretrain --data ../shared/data/nasa-super --classes models/nasa-super-classes.toml \\
      --images-from models/nasa-super-train.txt --init models/precipitates/model.onnx \\
      --decoder-only --epochs 20 --lr 5e-4 --out models/precipitates-nasa

Output: OUT/model.onnx, OUT/manifest.toml, OUT/training_log.csv, OUT/checkpoint/ (last.ckpt, best.ckpt).
Learning rate: linear warm-up over 5 % of the steps (at most 200), then cosine decay to 1 % of --lr.")]
pub struct Args {
    /// Dataset folders (images/, masks/, dataset.toml); all must have the same classes.
    #[arg(long, required = true, num_args = 1.., value_name = "DIR")]
    pub data: Vec<PathBuf>,

    /// Classes file for folders without dataset.toml (wins over dataset.toml).
    #[arg(long, value_name = "FILE")]
    pub classes: Option<PathBuf>,

    /// Use only the images whose stems this file lists (one per line, `#` comments), e.g. one half of
    /// a real dataset, keeping the other half for testing.
    #[arg(long, value_name = "LIST.txt")]
    pub images_from: Option<PathBuf>,

    /// Output folder.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,

    /// Model name for the manifest (default: the output folder's name).
    #[arg(long)]
    pub name: Option<String>,

    /// Model version for the manifest (MAJOR.MINOR.PATCH).
    #[arg(long, default_value = "1.0.0")]
    pub model_version: String,

    /// Epochs to train (in total, counting those of a resumed run).
    #[arg(long, default_value_t = 40)]
    pub epochs: usize,

    /// Crops per optimiser step.
    #[arg(long, default_value_t = 8)]
    pub batch: usize,

    /// Crop side in px (a multiple of 16).
    #[arg(long, default_value_t = 256)]
    pub crop: usize,

    /// Optimiser steps per epoch (default: enough to see about every training pixel once).
    #[arg(long)]
    pub steps_per_epoch: Option<usize>,

    /// Compute device: auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: String,

    /// Optimiser.
    #[arg(long, value_enum, default_value_t = OptimizerChoice::Adamw)]
    pub optimizer: OptimizerChoice,

    /// Peak learning rate.
    #[arg(long, default_value_t = 2e-3)]
    pub lr: f32,

    /// Weight decay (default 0.01 for AdamW, 0 for SGD).
    #[arg(long)]
    pub weight_decay: Option<f32>,

    /// Cross-entropy class weights: auto (1/√frequency, mean 1), none, or w0,w1,...
    #[arg(long, default_value = "auto")]
    pub class_weights: ClassWeights,

    /// Weight of the soft Dice loss added to the cross-entropy.
    #[arg(long, default_value_t = 0.0)]
    pub dice_weight: f32,

    /// Share of each folder's images held out for validation.
    #[arg(long, default_value_t = 0.15)]
    pub val_fraction: f64,

    /// Stop after this many epochs without a better validation mean IoU (0 = never stop early).
    #[arg(long, default_value_t = 8)]
    pub patience: usize,

    /// Random seed: initial weights, validation split, samples.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,

    /// Half-width of the brightness jitter, in normalised units (0 = off).
    #[arg(long, default_value_t = 0.2)]
    pub brightness: f32,

    /// Half-width of the contrast jitter around 1 (0 = off).
    #[arg(long, default_value_t = 0.2)]
    pub contrast: f32,

    /// No flips or 90° rotations.
    #[arg(long)]
    pub no_flips: bool,

    /// Standardise each image by its own mean and standard deviation (written to the manifest, so
    /// the agent feeds the model the same way): for data whose brightness and contrast vary between
    /// microscopes or sessions. Default: the fixed normalisation (mean 0.5, std 0.25), or --init's.
    #[arg(long)]
    pub per_image_normalisation: bool,

    /// Start from this model's weights: its folder or ONNX file (the manifest gives the normalisation).
    #[arg(long, value_name = "MODEL")]
    pub init: Option<PathBuf>,

    /// Freeze the encoder and train only the decoder and head (needs --init).
    #[arg(long, requires = "init")]
    pub decoder_only: bool,

    /// Ignore an existing checkpoint in OUT and start over.
    #[arg(long)]
    pub fresh: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let mut cfg = TrainConfig::new(args.data, args.out);
    if let Some(name) = args.name {
        cfg.name = name;
    }
    cfg.classes = args.classes;
    cfg.images_from = args.images_from;
    cfg.version = args.model_version;
    cfg.epochs = args.epochs;
    cfg.batch = args.batch;
    cfg.crop = args.crop;
    cfg.steps_per_epoch = args.steps_per_epoch;
    cfg.optimizer = args.optimizer;
    cfg.lr = args.lr;
    cfg.weight_decay = args.weight_decay;
    cfg.class_weights = args.class_weights;
    cfg.dice_weight = args.dice_weight;
    cfg.val_fraction = args.val_fraction;
    cfg.patience = (args.patience > 0).then_some(args.patience);
    cfg.seed = args.seed;
    cfg.augment = Augment {
        flips: !args.no_flips,
        rotations: !args.no_flips,
        brightness: args.brightness,
        contrast: args.contrast,
    };
    cfg.init = match args.init {
        Some(p) => Some(crate::model::manifest::ModelFiles::resolve(&p)?.onnx),
        None => None,
    };
    cfg.decoder_only = args.decoder_only;
    cfg.fresh = args.fresh;
    cfg.per_image_normalisation = args.per_image_normalisation;

    /// `train::run` with the command's configuration, on the chosen backend.
    struct Pretrain<'a>(&'a TrainConfig);
    impl OnBackend for Pretrain<'_> {
        type Output = Result<train::TrainOutcome, train::TrainError>;
        fn run<B: Backend + 'static>(self, backend: Arc<B>) -> Self::Output {
            let mut keep_going = |_: &train::EpochRecord| ControlFlow::Continue(());
            train::run(backend, self.0, &mut keep_going)
        }
    }
    let outcome = on_backend(&args.device, Pretrain(&cfg))??;
    if let Some(m) = outcome.manifest {
        tracing::info!(
            out = %cfg.out.display(),
            epochs = outcome.state.epoch,
            best_epoch = outcome.state.best_epoch,
            val_mean_iou = ?m.validation.mean_iou,
            val_boundary_f1 = ?m.validation.boundary_f1,
            "wrote model.onnx and manifest.toml"
        );
    }
    Ok(())
}
