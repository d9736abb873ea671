//! `microfed finetune --data DIR --from MODEL --out DIR`: a shipped model adapted to a lab's own
//! labelled micrographs in one command, with defaults chosen for a new material, and an honest
//! before/after.
//!
//! The run is `train::run` (the loop of `pretrain`) with fine-tuning settings decided here from the
//! data: a validation split by image (a fifth, at least one), decoder-only unless the set is large
//! enough to retrain the encoder (said, with the reason), class weights 1/√frequency (a class under
//! 1 % of the pixels weighs several times the matrix), soft Dice added to the cross-entropy (so a rare
//! class is not given up for pixel accuracy), a short warm-up + cosine schedule at a fine-tuning
//! learning rate, early stopping on the validation mean IoU. Then the base and the fine-tuned model
//! are both scored through tract (the agent's runtime) on the validation images, per class; when the
//! fine-tuned model is not better, the command says so and the model card recommends the base.
//!
//! Output: OUT/model.onnx, OUT/manifest.toml, OUT/training_log.csv, OUT/MODEL_CARD.md,
//! OUT/finetune.json (both models' scores), OUT/checkpoint/.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use microfed_kernels::Backend;

use crate::dataset::Dataset;
use crate::metrics::{Evaluation, Evaluator};
use crate::model::manifest::{ModelFiles, ModelManifest};
use crate::model::runtime::Segmenter;
use crate::train::backend::{OnBackend, on_backend};
use crate::train::{self, Augment, ClassWeights, OptimizerChoice, TrainConfig};

/// Fine-tune a model on your own labelled micrographs, with defaults for a new material.
#[derive(Debug, clap::Args)]
#[command(after_help = "\
Examples:
  microfed dataset import ~/lab/annotated --classes classes.toml --out data/ours
  microfed finetune --data data/ours --from models/precipitates --out models/ours
  microfed segment new-images/ --model models/ours --out segmented/

Output: OUT/model.onnx, OUT/manifest.toml, OUT/MODEL_CARD.md (before/after per class, the
recommendation), OUT/finetune.json, OUT/training_log.csv, OUT/checkpoint/.")]
pub struct Args {
    /// Dataset folders (as `dataset import` writes them, or any layout `dataset check` reads).
    #[arg(long, required = true, num_args = 1.., value_name = "DIR")]
    pub data: Vec<PathBuf>,
    /// The model to start from: its folder (with manifest.toml) or its ONNX file.
    #[arg(long, value_name = "MODEL")]
    pub from: PathBuf,
    /// Output folder.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Classes file for folders without dataset.toml.
    #[arg(long, value_name = "FILE")]
    pub classes: Option<PathBuf>,
    /// Use only the images whose stems this file lists (e.g. keep a test set out).
    #[arg(long, value_name = "LIST.txt")]
    pub images_from: Option<PathBuf>,
    /// What to train: auto (decided by the data and said), decoder (encoder frozen) or full.
    #[arg(long, value_enum, default_value_t = Mode::Auto)]
    pub mode: Mode,
    /// Most epochs (early stopping usually ends sooner).
    #[arg(long, default_value_t = 6)]
    pub epochs: usize,
    /// Optimiser steps per epoch.
    #[arg(long, default_value_t = 50)]
    pub steps_per_epoch: usize,
    /// Crop side in px (a multiple of 16).
    #[arg(long, default_value_t = 128)]
    pub crop: usize,
    /// Crops per step.
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// Peak learning rate (default 5e-4 decoder-only, 2e-4 full).
    #[arg(long)]
    pub lr: Option<f32>,
    /// Share of the images held out for validation (and for the before/after scores).
    #[arg(long, default_value_t = 0.2)]
    pub val_fraction: f64,
    /// Stop after this many epochs without a better validation mean IoU.
    #[arg(long, default_value_t = 3)]
    pub patience: usize,
    /// Compute device: auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Random seed: validation split and samples.
    #[arg(long, default_value_t = 3)]
    pub seed: u64,
    /// Ignore an existing checkpoint in OUT and start over.
    #[arg(long)]
    pub fresh: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    Auto,
    Decoder,
    Full,
}

/// Below this many training images (or labelled megapixels) the encoder stays frozen: too little
/// data to retrain it without forgetting what the base model learned.
const FULL_MIN_IMAGES: usize = 40;
const FULL_MIN_MEGAPIXELS: f64 = 40.0;

/// What a training epoch costs beyond its optimiser steps (crops read and augmented, validation),
/// measured on the project's 2-core machine (nasa-super, decoder only, release): two timed steps
/// said 0.46 s each, and the 6 epochs of 50 steps took 29 s each with validation (174 s for 138 s
/// of steps: 1.26).
const EPOCH_OVERHEAD: f64 = 1.26;

/// Times two optimiser steps of the network this fine-tune will train (same classes, batch, crop,
/// decoder-only or full) on `backend`, after one warm-up step: the up-front time estimate measures
/// this machine as it is now (its cores, its load, CPU or GPU) instead of assuming one.
fn seconds_per_step<B: Backend>(
    backend: &Arc<B>,
    classes: usize,
    batch: usize,
    crop: usize,
    full: bool,
) -> Result<f64, microfed_kernels::KernelError> {
    use microfed_kernels::Shape;
    use microfed_kernels::unet::{Loss, Optim, UNet};
    let xs = Shape::new(batch, 1, crop, crop);
    let mut net = UNet::init(backend.clone(), classes.max(2), 0)?;
    let pixels: Vec<f32> = (0..xs.len())
        .map(|i| ((i % 251) as f32 / 125.0) - 1.0)
        .collect();
    let labels: Vec<u8> = (0..xs.len())
        .map(|i| ((i / 7) % classes.max(2)) as u8)
        .collect();
    let x = backend.upload(&pixels)?;
    let labels = backend.upload_labels(&labels)?;
    let loss = Loss {
        class_weights: None,
        dice_weight: 0.5,
    };
    let optim = Optim::adamw(1e-4);
    let features = if full {
        Vec::new()
    } else {
        net.encode(&x, xs)?
    };
    let step = |net: &mut UNet<B>| {
        if full {
            net.train_step(&x, xs, &labels, &loss, &optim).map(|_| ())
        } else {
            net.decoder_train_step(&features, xs, &labels, &loss, &optim, None)
                .map(|_| ())
        }
    };
    step(&mut net)?;
    backend.synchronize()?;
    let t = Instant::now();
    for _ in 0..2 {
        step(&mut net)?;
    }
    backend.synchronize()?;
    Ok(t.elapsed().as_secs_f64() / 2.0)
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let base = ModelFiles::resolve(&args.from)?;
    if base.manifest.is_none() {
        tracing::warn!(model = %args.from.display(), "no manifest beside the model: default normalisation (0.5, 0.25)");
    }

    // Look at the data first: how much there is decides what to train.
    let only = match &args.images_from {
        Some(p) => Some(train::data::read_image_list(p)?),
        None => None,
    };
    let (n_images, megapixels, shares) =
        survey(&args.data, args.classes.as_deref(), only.as_ref())?;
    let n_val = train::data::validation_count(n_images, args.val_fraction);
    let n_train = n_images - n_val;
    let full = match args.mode {
        Mode::Full => true,
        Mode::Decoder => false,
        Mode::Auto => n_train >= FULL_MIN_IMAGES || megapixels >= FULL_MIN_MEGAPIXELS,
    };
    let why = match (args.mode, full) {
        (Mode::Auto, false) => format!(
            "decoder only: {n_train} training images ({megapixels:.1} Mpx) are too few to retrain \
             the encoder (full fine-tuning from {FULL_MIN_IMAGES} images or {FULL_MIN_MEGAPIXELS} \
             Mpx); the encoder stays as in the base model"
        ),
        (Mode::Auto, true) => format!(
            "full fine-tuning: {n_train} training images ({megapixels:.1} Mpx) are enough to adapt \
             the encoder too"
        ),
        (_, true) => "full fine-tuning (asked for)".into(),
        (_, false) => "decoder only (asked for)".into(),
    };
    println!("{why}");
    println!(
        "{n_images} image(s): {n_train} to train on, {n_val} held out for validation and the before/after scores"
    );
    for (c, share) in &shares {
        let note = if *share < 0.01 {
            "  rare: weighted up (1/√frequency) and Dice in the loss"
        } else {
            ""
        };
        println!("  {c:<32} {:>6.2} % of pixels{note}", share * 100.0);
    }
    if n_val == 0 {
        println!(
            "only one image: nothing to validate on, so no early stopping and no before/after score"
        );
    }

    let mut cfg = TrainConfig::new(args.data.clone(), args.out.clone());
    cfg.classes = args.classes.clone();
    cfg.images_from = args.images_from.clone();
    cfg.epochs = args.epochs;
    cfg.steps_per_epoch = Some(args.steps_per_epoch);
    cfg.crop = args.crop;
    cfg.batch = args.batch;
    cfg.optimizer = OptimizerChoice::Adamw;
    cfg.lr = args.lr.unwrap_or(if full { 2e-4 } else { 5e-4 });
    cfg.class_weights = ClassWeights::Auto;
    cfg.dice_weight = 0.5;
    cfg.val_fraction = args.val_fraction;
    cfg.patience = (args.patience > 0).then_some(args.patience);
    cfg.seed = args.seed;
    cfg.augment = Augment {
        flips: true,
        rotations: true,
        brightness: 0.2,
        contrast: 0.2,
    };
    cfg.init = Some(base.onnx.clone());
    cfg.decoder_only = !full;
    cfg.fresh = args.fresh;
    // Another set of classes than the base model's: a new head on its encoder and decoder.
    let base_classes =
        crate::model::onnx::load_params(&crate::model::onnx::load(&base.onnx)?, &base.onnx)?
            .classes;
    cfg.new_head = base_classes != shares.len();
    if cfg.new_head {
        println!(
            "new head: the base model predicts {base_classes} classes, the data has {}; its output \
             layer is trained afresh on top of the base model's encoder and decoder (so no \
             before/after comparison: the base cannot predict these classes)",
            shares.len()
        );
    }

    println!(
        "plan: at most {} epochs of {} steps ({} crops of {}²), lr {:.0e} warm-up + cosine, early stop after {} epoch(s) without a better validation mean IoU",
        args.epochs, args.steps_per_epoch, args.batch, args.crop, cfg.lr, args.patience
    );

    struct Finetune<'a>(&'a TrainConfig, usize);
    impl OnBackend for Finetune<'_> {
        type Output = Result<train::TrainOutcome, train::TrainError>;
        fn run<B: Backend + 'static>(self, backend: Arc<B>) -> Self::Output {
            let (cfg, classes) = (self.0, self.1);
            let steps = cfg.epochs * cfg.steps_per_epoch.unwrap_or(0);
            match seconds_per_step(&backend, classes, cfg.batch, cfg.crop, !cfg.decoder_only) {
                Ok(per_step) => println!(
                    "estimate: one step takes {per_step:.2} s on this machine now ({}), so about \
                     {:.0} min at most; updated after each epoch",
                    backend.name(),
                    steps as f64 * per_step * EPOCH_OVERHEAD / 60.0
                ),
                Err(e) => tracing::warn!(error = %e, "could not time a step for the estimate"),
            }
            let started = Instant::now();
            let mut on_epoch = |r: &train::EpochRecord| {
                let per_epoch = started.elapsed().as_secs_f64() / r.epoch as f64;
                let left = cfg.epochs.saturating_sub(r.epoch) as f64 * per_epoch;
                let iou = r
                    .val_mean_iou
                    .map(|v| format!("{v:.3}"))
                    .unwrap_or("-".into());
                println!(
                    "epoch {}/{}: loss {:.3}, validation mean IoU {iou}, {:.0} s; at most {:.1} min left",
                    r.epoch,
                    cfg.epochs,
                    r.loss,
                    r.seconds,
                    left / 60.0
                );
                ControlFlow::Continue(())
            };
            train::run(backend, cfg, &mut on_epoch)
        }
    }
    let wall = Instant::now();
    let outcome = on_backend(&args.device, Finetune(&cfg, shares.len()))??;
    let manifest = outcome
        .manifest
        .context("training stopped before the export")?;
    let train_seconds = wall.elapsed().as_secs_f64();
    if outcome.state.stopped_early {
        println!(
            "stopped early after epoch {}: the best was epoch {}",
            outcome.state.epoch, outcome.state.best_epoch
        );
    }

    // Before and after, on the validation images, through the agent's runtime.
    let val: BTreeSet<String> = manifest
        .training
        .datasets
        .iter()
        .flat_map(|d| d.validation_images.iter().cloned())
        .collect();
    let tuned_onnx = args.out.join("model.onnx");
    let scores = if val.is_empty() || cfg.new_head {
        None
    } else {
        let before = score(
            &base.onnx,
            &args.data,
            args.classes.as_deref(),
            &val,
            &manifest,
        )?;
        let after = score(
            &tuned_onnx,
            &args.data,
            args.classes.as_deref(),
            &val,
            &manifest,
        )?;
        Some((before, after))
    };
    let better = scores
        .as_ref()
        .map(|(b, a)| a.mean_iou.unwrap_or(0.0) > b.mean_iou.unwrap_or(0.0));
    if let Some((before, after)) = &scores {
        println!("\n{}", table(before, after, val.len()));
    }
    let verdict = match better {
        Some(true) => format!(
            "the fine-tuned model is better on the validation images: use {}",
            args.out.display()
        ),
        Some(false) => format!(
            "the fine-tuned model is NOT better than the base on the validation images: keep using \
             the base model {} (label more images, or more varied ones, and fine-tune again)",
            args.from.display()
        ),
        None if cfg.new_head => format!(
            "a new head: the base model predicts other classes, so there is no before/after \
             comparison; validation mean IoU of the fine-tuned model {} (training_log.csv): use {} \
             if that is good enough",
            outcome
                .state
                .best_mean_iou
                .map_or("–".to_string(), |v| format!("{v:.3}")),
            args.out.display()
        ),
        None => {
            "no validation images: the fine-tuned model could not be compared with the base".into()
        }
    };
    println!("{verdict}");
    let card = model_card(
        &args,
        &manifest,
        &why,
        scores.as_ref(),
        &verdict,
        train_seconds,
    );
    std::fs::write(args.out.join("MODEL_CARD.md"), card)
        .with_context(|| format!("cannot write {}", args.out.join("MODEL_CARD.md").display()))?;
    let json = serde_json::json!({
        "base": args.from.display().to_string(),
        "mode": if full { "full" } else { "decoder" },
        "validation_images": val,
        "before": scores.as_ref().map(|s| &s.0),
        "after": scores.as_ref().map(|s| &s.1),
        "better_than_base": better,
        "recommended": if better == Some(false) { args.from.display().to_string() } else { args.out.display().to_string() },
        "train_seconds": train_seconds,
    });
    std::fs::write(
        args.out.join("finetune.json"),
        serde_json::to_string_pretty(&json)? + "\n",
    )?;
    println!(
        "wrote {} (model.onnx, manifest.toml, MODEL_CARD.md, finetune.json) in {:.1} min",
        args.out.display(),
        train_seconds / 60.0
    );
    Ok(())
}

/// Images, labelled megapixels, and each class's share of the pixels.
type Survey = (usize, f64, Vec<(String, f64)>);

/// Images (after the image list), labelled megapixels and the share of each class, from a check of
/// every folder (which also stops a broken folder before any training).
fn survey(
    dirs: &[PathBuf],
    classes: Option<&Path>,
    only: Option<&BTreeSet<String>>,
) -> anyhow::Result<Survey> {
    let mut n = 0;
    let mut pixels = 0u64;
    let mut counts: Vec<u64> = Vec::new();
    let mut names = Vec::new();
    for dir in dirs {
        let ds = Dataset::open(dir, classes)?;
        names = ds.manifest.classes.iter().map(|c| c.name.clone()).collect();
        counts.resize(names.len(), 0);
        for (i, pair) in ds.pairs().iter().enumerate() {
            if only.is_some_and(|o| !o.contains(&pair.stem)) {
                continue;
            }
            let (_, mask) = ds.load_pair(i)?;
            n += 1;
            pixels += mask.data.len() as u64;
            let h = mask.histogram();
            for (c, acc) in counts.iter_mut().enumerate() {
                *acc += h[c];
            }
        }
    }
    let labelled: u64 = counts.iter().sum::<u64>().max(1);
    let shares = names
        .into_iter()
        .zip(counts)
        .map(|(name, c)| (name, c as f64 / labelled as f64))
        .collect();
    Ok((n, pixels as f64 / 1e6, shares))
}

/// Scores `model` on the images named in `stems` through tract.
fn score(
    model: &Path,
    dirs: &[PathBuf],
    classes: Option<&Path>,
    stems: &BTreeSet<String>,
    manifest: &ModelManifest,
) -> anyhow::Result<Evaluation> {
    let seg = Segmenter::load(model)?;
    let names: Vec<String> = manifest.classes.iter().map(|c| c.name.clone()).collect();
    let mut ev = Evaluator::new(names.len(), 2.0)?;
    for dir in dirs {
        let ds = Dataset::open(dir, classes)?.with_normalisation(manifest.normalisation);
        for (i, pair) in ds.pairs().iter().enumerate() {
            if !stems.contains(&pair.stem) {
                continue;
            }
            let (image, truth) = ds.load_pair(i)?;
            let pred = seg
                .predict_mask(&image.pixels, image.width as usize, image.height as usize)
                .with_context(|| format!("segmenting {}", image.path.display()))?;
            ev.add(&pair.stem, &truth, &pred)?;
        }
    }
    Ok(ev.finish(&names))
}

fn f(v: Option<f64>) -> String {
    v.map(|v| format!("{v:.3}")).unwrap_or_else(|| "—".into())
}

/// The before/after table (Markdown, also readable in a terminal).
fn table(before: &Evaluation, after: &Evaluation, images: usize) -> String {
    let mut t = format!("Scores on the {images} validation image(s):\n\n| model |");
    for c in &before.classes {
        let _ = write!(t, " IoU {} |", c.name);
    }
    t.push_str(" mean IoU | pixel acc. | boundary F1 |\n|---|");
    for _ in &before.classes {
        t.push_str("---|");
    }
    t.push_str("---|---|---|\n");
    for (name, e) in [("base", before), ("fine-tuned", after)] {
        let _ = write!(t, "| {name} |");
        for c in &e.classes {
            let _ = write!(t, " {} |", f(c.iou));
        }
        let _ = writeln!(
            t,
            " {} | {} | {} |",
            f(e.mean_iou),
            f(e.pixel_accuracy),
            f(e.boundary.f1)
        );
    }
    t
}

fn model_card(
    args: &Args,
    m: &ModelManifest,
    why: &str,
    scores: Option<&(Evaluation, Evaluation)>,
    verdict: &str,
    seconds: f64,
) -> String {
    let mut s = format!(
        "# {} {} — fine-tuned from {}\n\n",
        m.name,
        m.version,
        args.from.display()
    );
    let _ = writeln!(
        s,
        "**Recommendation:** {verdict}.\n\nClasses: {}. Normalisation: mean {}, std {} (from the base \
         model). `model.onnx` sha256 `{}`.\n",
        m.classes
            .iter()
            .map(|c| format!("{} {}", c.index, c.name))
            .collect::<Vec<_>>()
            .join(", "),
        m.normalisation.mean,
        m.normalisation.std,
        m.sha256
    );
    let _ = writeln!(s, "## Data\n");
    for d in &m.training.datasets {
        let _ = writeln!(
            s,
            "- `{}` ({}): {} training image(s); validation: {}",
            d.folder.display(),
            d.name,
            d.train_images,
            d.validation_images.join(", ")
        );
    }
    if let Some(list) = &args.images_from {
        let _ = writeln!(s, "- only the images listed in `{}`", list.display());
    }
    let r = &m.recipe;
    let _ = writeln!(
        s,
        "\n## Recipe (`microfed finetune` defaults)\n\n- {why}.\n- {} of at most {} epochs run (best: \
         epoch {}{}), {} steps of {} crops of {}², AdamW lr {} ({}), weight decay {}.\n- class \
         weights {:?} (1/√frequency, mean 1), cross-entropy + {} × soft Dice; flips, rotations, \
         brightness/contrast jitter.\n- device {}, {:.1} min.\n",
        r.epochs_run,
        r.epochs_planned,
        r.best_epoch,
        if r.stopped_early {
            ", stopped early"
        } else {
            ""
        },
        r.steps_per_epoch,
        r.batch,
        r.crop,
        r.lr,
        r.lr_schedule,
        r.weight_decay,
        r.class_weights,
        r.dice_weight,
        r.device,
        seconds / 60.0
    );
    let _ = writeln!(s, "## Before and after\n");
    match scores {
        Some((b, a)) => {
            let _ = writeln!(
                s,
                "{}\nScored through tract (the agent's runtime) on images held out from training. \
                 So few images give a rough figure: check on a test set of your own with \
                 `microfed model score`.",
                table(b, a, m.validation.images)
            );
        }
        None => {
            let _ = writeln!(s, "No validation images: not compared with the base model.");
        }
    }
    s
}
