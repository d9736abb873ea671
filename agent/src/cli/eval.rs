//! `microfed eval`: score predicted masks against the truth.
//!
//! ```text
//! microfed eval --pred runs/pred --truth data/nasa-super --classes nasa-classes.toml \
//!               --tolerance 2 --json eval.json
//! ```
//! Files are matched by stem (`a.png` in `--pred` with `a.png` or `a.tif` in `--truth`); what
//! `segment --out` writes is read as it is (`a.mask.png`, overlays skipped). A folder that
//! holds a `masks/` subfolder (a dataset folder) is read from there. Every truth mask needs a
//! prediction; extra predictions are reported and skipped. The classes come from `--classes`, else
//! the truth dataset's `dataset.toml`, else K = largest index seen + 1 (named `class i`).
//!
//! The table shows per-class IoU and Dice, mean IoU (over classes present in truth or prediction),
//! pixel accuracy and boundary F1 at a Euclidean tolerance in pixels; the definitions are in
//! `metrics.rs`. `--json` writes everything, including the confusion matrix and per-image scores.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use rayon::prelude::*;

use crate::classes::DatasetManifest;
use crate::dataset::{IGNORE, IMAGE_EXTENSIONS};
use crate::mask::Mask;
use crate::metrics::{Evaluation, Evaluator};

/// Score predicted masks against true masks.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Folder of predicted class-index masks (or a dataset folder with `masks/`).
    #[arg(long, value_name = "DIR")]
    pub pred: PathBuf,
    /// Folder of true masks (or a dataset folder with `masks/` and `dataset.toml`).
    #[arg(long, value_name = "DIR")]
    pub truth: PathBuf,
    /// Classes file (dataset.toml form); default: the truth dataset's `dataset.toml`.
    #[arg(long, value_name = "FILE")]
    pub classes: Option<PathBuf>,
    /// Boundary F1 tolerance in pixels (Euclidean distance).
    #[arg(long, default_value_t = 2.0, value_name = "PX")]
    pub tolerance: f64,
    /// Write the full evaluation as JSON here.
    #[arg(long, value_name = "OUT.json")]
    pub json: Option<PathBuf>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let truth_dir = masks_dir(&args.truth);
    let pred_dir = masks_dir(&args.pred);
    let truth = list_by_stem(&truth_dir)?;
    let pred = list_by_stem(&pred_dir)?;
    if truth.is_empty() {
        bail!("no masks in {}", truth_dir.display());
    }
    let missing: Vec<&String> = truth.keys().filter(|s| !pred.contains_key(*s)).collect();
    if !missing.is_empty() {
        bail!(
            "{} truth mask(s) have no prediction in {}: {}",
            missing.len(),
            pred_dir.display(),
            missing
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    for (stem, p) in &pred {
        if !truth.contains_key(stem) {
            tracing::warn!(file = %p.display(), "prediction without truth mask, skipped");
        }
    }
    let pairs: Vec<(&String, &PathBuf, &PathBuf)> =
        truth.iter().map(|(s, t)| (s, t, &pred[s])).collect();

    let manifest = load_classes(args.classes.as_deref(), &args.truth)?;
    let (k, names) = match &manifest {
        Some(m) => (
            m.num_classes(),
            m.classes.iter().map(|c| c.name.clone()).collect::<Vec<_>>(),
        ),
        None => {
            let k = infer_k(&pairs)?;
            tracing::warn!(
                k,
                "no classes file: K inferred from the largest class index"
            );
            (k, (0..k).map(|c| format!("class {c}")).collect())
        }
    };

    let empty = Evaluator::new(k, args.tolerance)?;
    let evaluator = pairs
        .par_iter()
        .try_fold(
            || empty.clone(),
            |mut e, (stem, t, p)| -> anyhow::Result<Evaluator> {
                let truth = Mask::load(t)?;
                let pred = Mask::load(p)?;
                e.add(stem, &truth, &pred)
                    .with_context(|| format!("{} against {}", p.display(), t.display()))?;
                Ok(e)
            },
        )
        .try_reduce(
            || empty.clone(),
            |mut a, b| {
                a.merge(b)?;
                Ok(a)
            },
        );
    let evaluation = evaluator?.finish(&names);
    print_table(&evaluation);
    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(&evaluation)?;
        std::fs::write(path, text + "\n")
            .with_context(|| format!("cannot write {}", path.display()))?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

/// `DIR/masks` when it exists, else `DIR`.
fn masks_dir(dir: &Path) -> PathBuf {
    let m = dir.join("masks");
    if m.is_dir() { m } else { dir.to_owned() }
}

fn list_by_stem(dir: &Path) -> anyhow::Result<BTreeMap<String, PathBuf>> {
    let mut out = BTreeMap::new();
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot list {}", dir.display()))?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()
        .with_context(|| format!("cannot list {}", dir.display()))?;
    paths.sort();
    for p in paths {
        let ext = p
            .extension()
            .map(|e| e.to_string_lossy().to_lowercase())
            .unwrap_or_default();
        let hidden = p
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with('.'));
        if hidden || !p.is_file() || !IMAGE_EXTENSIONS.contains(&ext.as_str()) {
            continue;
        }
        let stem = p
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        // `segment --out` writes STEM.mask.png beside STEM.overlay.png: the mask is the prediction.
        if stem.ends_with(".overlay") {
            continue;
        }
        let stem = stem
            .strip_suffix(".mask")
            .map(str::to_owned)
            .unwrap_or(stem);
        if let Some(first) = out.insert(stem, p.clone()) {
            bail!(
                "{} and {} have the same stem; keep one",
                first.display(),
                p.display()
            );
        }
    }
    Ok(out)
}

fn load_classes(classes: Option<&Path>, truth: &Path) -> anyhow::Result<Option<DatasetManifest>> {
    if let Some(p) = classes {
        return Ok(Some(DatasetManifest::load(p)?));
    }
    for candidate in [truth.join("dataset.toml"), truth.join("../dataset.toml")] {
        if candidate.is_file() {
            return Ok(Some(DatasetManifest::load(&candidate)?));
        }
    }
    Ok(None)
}

/// Largest class index (other than 255) in any mask, plus one; at least 2.
fn infer_k(pairs: &[(&String, &PathBuf, &PathBuf)]) -> anyhow::Result<usize> {
    let max = pairs
        .par_iter()
        .map(|(_, t, p)| -> anyhow::Result<u8> {
            let mut m = 0;
            for path in [t, p] {
                let mask = Mask::load(path)?;
                let h = mask.histogram();
                if let Some(v) = (0..IGNORE).rev().find(|&v| h[usize::from(v)] > 0) {
                    m = m.max(v);
                }
            }
            Ok(m)
        })
        .try_reduce(|| 0, |a, b| Ok(a.max(b)))?;
    Ok((usize::from(max) + 1).max(2))
}

fn fmt(v: Option<f64>) -> String {
    v.map(|x| format!("{x:.4}")).unwrap_or_else(|| "—".into())
}

pub(crate) fn print_table(e: &Evaluation) {
    println!("{} image(s), {} labelled pixel(s)", e.images, e.pixels);
    println!(
        "{:>3}  {:<28} {:>8} {:>8} {:>12} {:>12}",
        "#", "class", "IoU", "Dice", "truth px", "pred px"
    );
    for c in &e.classes {
        println!(
            "{:>3}  {:<28} {:>8} {:>8} {:>12} {:>12}",
            c.index,
            c.name,
            fmt(c.iou),
            fmt(c.dice),
            c.truth_pixels,
            c.pred_pixels
        );
    }
    println!("mean IoU        {}", fmt(e.mean_iou));
    println!("mean Dice       {}", fmt(e.mean_dice));
    println!("pixel accuracy  {}", fmt(e.pixel_accuracy));
    println!(
        "boundary F1     {}  (precision {}, recall {}, tolerance {} px)",
        fmt(e.boundary.f1),
        fmt(e.boundary.precision),
        fmt(e.boundary.recall),
        e.boundary.tolerance_px
    );
}
