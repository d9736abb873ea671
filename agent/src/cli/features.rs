//! `microfed features`: microstructure figures from class-index masks.
//!
//! ```text
//! microfed features masks/*.png --pixel-size 0.05 --kind grains --csv grains.csv
//! microfed features pred/super_spot1_0d_0.png --classes nasa-classes.toml     # JSON to stdout
//! ```
//! Grains (polycrystals): grain count, grains cut by the edge, mean grain area and equivalent circle
//! diameter (px, or µm with `--pixel-size`), the Jeffries planimetric count and, with a pixel size,
//! the ASTM E112 grain size number G. Phases: area fraction, particle count and size distribution of
//! every class. Definitions are in `features.rs`.
//!
//! The kind defaults from the class names (a class named like "grain boundary" → grains; two classes
//! without a classes file → grains; otherwise phases). Without `--classes`, K is the largest index in
//! the masks + 1. The pixel size defaults to the classes file's `pixel_size_um`.
//!
//! Output: a JSON array (one object per mask, in the order given) to stdout, unless `--json` or
//! `--csv` say where to write instead. CSV has one header line and one row per mask.

use std::path::PathBuf;

use anyhow::{Context, bail};
use rayon::prelude::*;

use crate::classes::{ClassDef, DatasetManifest};
use crate::features::{
    FeatureKind, FeatureOptions, Features, GrainClasses, grain_features, phase_features,
};
use crate::mask::Mask;

/// Measure grains or phases on class-index masks.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Class-index masks (PNG, TIFF, BMP).
    #[arg(required = true, value_name = "MASK")]
    pub masks: Vec<PathBuf>,
    /// Micrometres per pixel; lengths are then in µm, areas in µm², and ASTM G is reported.
    #[arg(long, value_name = "UM")]
    pub pixel_size: Option<f64>,
    /// What to measure: `grains` or `phases` (default: from the class names).
    #[arg(long, value_name = "grains|phases")]
    pub kind: Option<FeatureKind>,
    /// Classes file (dataset.toml form) naming the classes.
    #[arg(long, value_name = "FILE")]
    pub classes: Option<PathBuf>,
    /// Bins of the diameter histograms.
    #[arg(long, default_value_t = 10)]
    pub bins: usize,
    /// Grains: split a region where two parts meet through a neck narrower than this fraction of
    /// the smaller one's largest inscribed radius (a gap in a predicted boundary); 0 = plain
    /// connected interiors.
    #[arg(long, value_name = "R", default_value_t = crate::features::DEFAULT_NECK_RATIO)]
    pub neck_ratio: f64,
    /// Write the JSON array here instead of stdout.
    #[arg(long, value_name = "OUT")]
    pub json: Option<PathBuf>,
    /// Write one CSV row per mask here.
    #[arg(long, value_name = "OUT")]
    pub csv: Option<PathBuf>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let masks: Vec<(String, Mask)> = args
        .masks
        .par_iter()
        .map(|p| -> anyhow::Result<(String, Mask)> {
            Ok((p.display().to_string(), Mask::load(p)?))
        })
        .collect::<anyhow::Result<_>>()?;

    let manifest = args
        .classes
        .as_deref()
        .map(DatasetManifest::load)
        .transpose()?;
    let classes: Vec<ClassDef> = match &manifest {
        Some(m) => m.classes.clone(),
        None => {
            let max = masks
                .iter()
                .filter_map(|(_, m)| {
                    let h = m.histogram();
                    (0..255u8).rev().find(|&v| h[usize::from(v)] > 0)
                })
                .max()
                .unwrap_or(0);
            let k = (usize::from(max) + 1).max(2);
            (0..k)
                .map(|c| ClassDef {
                    index: c as u8,
                    name: format!("class {c}"),
                    color: [0; 3],
                })
                .collect()
        }
    };
    let kind = args
        .kind
        .unwrap_or_else(|| FeatureKind::guess(&classes, manifest.is_some()));
    let opts = FeatureOptions {
        pixel_size_um: args
            .pixel_size
            .or(manifest.as_ref().and_then(|m| m.pixel_size_um)),
        histogram_bins: args.bins,
        neck_ratio: args.neck_ratio,
    };
    let grain_classes = GrainClasses::from_classes(&classes);
    let names: Vec<String> = classes.iter().map(|c| c.name.clone()).collect();
    tracing::info!(?kind, k = classes.len(), masks = masks.len(), "measuring");

    let features: Vec<Features> = masks
        .par_iter()
        .map(|(source, m)| -> anyhow::Result<Features> {
            let f = match kind {
                FeatureKind::Grains => {
                    grain_features(source, m, classes.len(), grain_classes, &opts)
                }
                FeatureKind::Phases => phase_features(source, m, &names, &opts),
            };
            f.with_context(|| source.clone())
        })
        .collect::<anyhow::Result<_>>()?;

    let json = serde_json::to_string_pretty(&features)? + "\n";
    if let Some(path) = &args.json {
        std::fs::write(path, &json).with_context(|| format!("cannot write {}", path.display()))?;
    }
    if let Some(path) = &args.csv {
        let header = features[0].csv_header();
        let mut text = header.clone() + "\n";
        for f in &features {
            if f.csv_header() != header {
                bail!("{}: its columns differ from the first mask's", f.source);
            }
            text += &f.to_csv_row();
            text.push('\n');
        }
        std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))?;
    }
    if args.json.is_none() && args.csv.is_none() {
        print!("{json}");
    }
    Ok(())
}
