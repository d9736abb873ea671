//! `microfed model check FILE.onnx`: does an ONNX file meet the microfed U-Net contract?
//!
//! Prints what it found (classes, parameter counts, opset) or every mismatch at once, so that a user who
//! exports a U-Net from PyTorch can fix all of them in one go (see `models/README.md`). With
//! `--run`, it also runs the model once through tract on a blank 64×64 image, which catches graphs that
//! parse but cannot execute.

use std::path::PathBuf;

use anyhow::Context;

use crate::dataset::Dataset;
use crate::metrics::Evaluator;
use crate::model::manifest::ModelManifest;
use crate::model::{onnx, runtime::Segmenter};

/// Inspect segmentation models.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    pub command: ModelCommand,
}

#[derive(Debug, clap::Subcommand)]
pub enum ModelCommand {
    /// Check an ONNX file against the contract: input `image` [N,1,H,W], output `logits` [N,K,H,W], skip
    /// features `enc0`…`enc4`, decoder weights `decoder.*` with the reference shapes.
    #[command(after_help = "Example:\n  microfed model check models/grains/model.onnx --run")]
    Check(CheckArgs),
    /// Score a model on labelled datasets through the runtime the agent uses (tract): per-class IoU
    /// and Dice, mean IoU, pixel accuracy and boundary F1, per dataset and over all of them.
    #[command(
        after_help = "Example:\n  microfed model score models/grains --data data/test/hazy data/test/sem-se --json grains.json"
    )]
    Score(ScoreArgs),
}

#[derive(Debug, clap::Args)]
pub struct ScoreArgs {
    /// The model folder (with `manifest.toml` and the ONNX file it names).
    pub model: PathBuf,
    /// Dataset folders (`images/`, `masks/`, `dataset.toml`).
    #[arg(long, required = true, num_args = 1.., value_name = "DIR")]
    pub data: Vec<PathBuf>,
    /// Classes file for datasets without a `dataset.toml` (e.g. a read-only folder).
    #[arg(long, value_name = "FILE")]
    pub classes: Option<PathBuf>,
    /// Score only the images whose stems are listed in this file (one per line).
    #[arg(long, value_name = "LIST.txt")]
    pub images_from: Option<PathBuf>,
    /// Boundary F1 tolerance in pixels.
    #[arg(long, default_value_t = 2.0, value_name = "PX")]
    pub tolerance: f64,
    /// Write every evaluation as JSON (dataset folder → evaluation, plus "all").
    #[arg(long, value_name = "OUT.json")]
    pub json: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
pub struct CheckArgs {
    /// The ONNX file.
    pub file: PathBuf,
    /// Also run the model once with tract on a 64×64 input.
    #[arg(long)]
    pub run: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    match args.command {
        ModelCommand::Check(a) => check(a),
        ModelCommand::Score(a) => score(a),
    }
}

fn check(args: CheckArgs) -> anyhow::Result<()> {
    let report = onnx::check_contract(&args.file)?;
    println!("{}: meets the microfed U-Net contract", args.file.display());
    println!("  classes (K)          {}", report.num_classes);
    println!("  encoder parameters   {}", report.encoder_parameters);
    println!("  decoder parameters   {}", report.decoder_parameters);
    println!("  opset                {}", report.opset);
    if args.run {
        let seg = Segmenter::load(&args.file)?;
        let logits = seg
            .logits(&vec![0.0; 64 * 64], 1, 64, 64)
            .with_context(|| format!("running {} with tract", args.file.display()))?;
        anyhow::ensure!(
            logits.iter().all(|v| v.is_finite()),
            "{}: tract produced non-finite logits",
            args.file.display()
        );
        println!(
            "  tract run            ok ([1, {}, 64, 64] logits, all finite)",
            seg.classes()
        );
    }
    Ok(())
}

fn score(args: ScoreArgs) -> anyhow::Result<()> {
    let manifest_path = args.model.join("manifest.toml");
    let manifest = ModelManifest::load(&manifest_path)?;
    manifest.verify_model(&manifest_path)?;
    let seg = Segmenter::load(&manifest.model_path(&manifest_path))?;
    let names: Vec<String> = manifest.classes.iter().map(|c| c.name.clone()).collect();
    let only = match &args.images_from {
        Some(list) => Some(crate::train::data::read_image_list(list)?),
        None => None,
    };
    let mut all = Evaluator::new(names.len(), args.tolerance)?;
    let mut report = serde_json::Map::new();
    for dir in &args.data {
        let ds =
            Dataset::open(dir, args.classes.as_deref())?.with_normalisation(manifest.normalisation);
        anyhow::ensure!(
            ds.manifest.num_classes() == names.len(),
            "{}: {} classes, the model has {}",
            dir.display(),
            ds.manifest.num_classes(),
            names.len()
        );
        let mut ev = Evaluator::new(names.len(), args.tolerance)?;
        for (i, pair) in ds.pairs().iter().enumerate() {
            if only.as_ref().is_some_and(|o| !o.contains(&pair.stem)) {
                continue;
            }
            let (image, truth) = ds.load_pair(i)?;
            let pred = seg
                .predict_mask(&image.pixels, image.width as usize, image.height as usize)
                .with_context(|| format!("segmenting {}", image.path.display()))?;
            ev.add(&pair.stem, &truth, &pred)?;
            all.add(&pair.stem, &truth, &pred)?;
        }
        let e = ev.finish(&names);
        println!("== {}", dir.display());
        crate::cli::eval::print_table(&e);
        report.insert(dir.display().to_string(), serde_json::to_value(&e)?);
    }
    let e = all.finish(&names);
    if args.data.len() > 1 {
        println!("== all datasets");
        crate::cli::eval::print_table(&e);
    }
    report.insert("all".into(), serde_json::to_value(&e)?);
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)? + "\n")
            .with_context(|| format!("cannot write {}", path.display()))?;
        println!("wrote {}", path.display());
    }
    Ok(())
}
