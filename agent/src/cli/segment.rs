//! `microfed segment PATH...`: the agent's pipeline over a batch of files or folders, for users
//! without a microscope attached.
//!
//! ```text
//! microfed segment images/ extra.tif --model models/grains --out segmented/
//! ```
//! Folders are read one level deep (files with image extensions). Outputs are those of the agent
//! (`STEM.mask.png`, `STEM.overlay.png`, `STEM.features.json`, `features.csv`, `journal.jsonl` in
//! `--out`); files already in the journal are skipped, so an interrupted run can simply be repeated.
//! Files that cannot be segmented are left in place and listed; the command then fails.

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::{Context, bail};
use indicatif::ProgressBar;
use tokio::sync::mpsc;

use crate::classes::DatasetManifest;
use crate::micrograph::Normalisation;
use crate::model::manifest::ModelFiles;
use crate::model::runtime::Segmenter;
use crate::pipeline::capture::{Capture, CaptureFilter};
use crate::pipeline::config::{
    self, CaptureSection, FeatureChoice, ModelSection, QueueSection, TilingSection,
};
use crate::pipeline::publish::{PublishError, Publisher, SegmentedImage};
use crate::pipeline::{FailurePolicy, ModelInfo, ModelSlot, Pipeline, Settings, resolve_threads};

/// Segment micrograph files or folders with a model.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Micrograph files, or folders of them.
    #[arg(required = true, value_name = "PATH")]
    pub paths: Vec<PathBuf>,
    /// The model: its folder (manifest.toml gives the classes and normalisation) or an ONNX file.
    #[arg(long, value_name = "DIR|FILE")]
    pub model: PathBuf,
    /// Output folder.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Tile side in pixels (a multiple of 16).
    #[arg(long, default_value_t = 512)]
    pub tile: usize,
    /// Minimum overlap of neighbouring tiles in pixels.
    #[arg(long, default_value_t = 32)]
    pub overlap: usize,
    /// Tiles per network run.
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Threads for the network (0 = every core).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Where the network runs: auto (the GPU through tract-cuda when it can run, else the CPU), cpu,
    /// cuda (the GPU or an error).
    #[arg(long, value_enum, default_value_t = config::Device::Auto)]
    pub device: config::Device,
    /// What runs the network: auto (our kernels when the model passes the parity probe against
    /// tract, on the CPU), tract, kernels.
    #[arg(long, value_enum, default_value_t = config::Engine::Auto)]
    pub engine: config::Engine,
    /// The kernels engine's arithmetic on the GPU: fp32, or tf32 (tensor cores, sm_80 and newer).
    #[arg(long, value_enum, default_value_t = crate::model::runtime::Precision::Fp32)]
    pub precision: crate::model::runtime::Precision,
    /// Classes file (dataset.toml form) naming the model's classes.
    #[arg(long, value_name = "FILE")]
    pub classes: Option<PathBuf>,
    /// What to measure: grains, phases or auto.
    #[arg(long, value_enum, default_value_t = FeatureArg::Auto)]
    pub features: FeatureArg,
    /// Micrometres per pixel (overrides TIFF resolution tags).
    #[arg(long, value_name = "UM")]
    pub pixel_size: Option<f64>,
    /// Grains: split a region where two parts meet through a neck narrower than this fraction of
    /// the smaller one's largest inscribed radius (a gap in a predicted boundary); 0 = plain
    /// connected interiors.
    #[arg(long, value_name = "R", default_value_t = crate::features::DEFAULT_NECK_RATIO)]
    pub neck_ratio: f64,
    /// Normalisation mean (grey level in [0, 1]) the model was trained with (default: the model's
    /// manifest, else 0.5).
    #[arg(long)]
    pub norm_mean: Option<f32>,
    /// Normalisation standard deviation the model was trained with (default: the model's manifest,
    /// else 0.25).
    #[arg(long)]
    pub norm_std: Option<f32>,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum FeatureArg {
    Auto,
    Grains,
    Phases,
}

/// Advances the progress bar as results are written.
struct Progress(ProgressBar);

impl Publisher for Progress {
    async fn publish(&mut self, _: &SegmentedImage) -> Result<(), PublishError> {
        self.0.inc(1);
        Ok(())
    }
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let filter = CaptureFilter::new(&CaptureSection::default().extensions);
    let mut files = Vec::new();
    for p in &args.paths {
        if p.is_dir() {
            let mut found: Vec<PathBuf> = std::fs::read_dir(p)
                .with_context(|| format!("cannot list {}", p.display()))?
                .flatten()
                .map(|e| e.path())
                .filter(|f| f.is_file() && filter.accepts(f))
                .collect();
            found.sort();
            files.extend(found);
        } else {
            files.push(p.clone());
        }
    }
    if files.is_empty() {
        bail!("no micrographs found in the given paths");
    }
    let mut stems: HashMap<String, &PathBuf> = HashMap::new();
    for f in &files {
        let stem = f
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        if let Some(other) = stems.insert(stem.clone(), f) {
            bail!(
                "{} and {} would both write {stem}.mask.png: segment them into different --out folders",
                other.display(),
                f.display()
            );
        }
    }

    let model = ModelFiles::resolve(&args.model)?;
    let norm = model.normalisation();
    let model_section = ModelSection {
        path: model.onnx.clone(),
        reload_on_change: false,
        classes: match (&args.classes, &model.manifest) {
            (Some(c), _) => DatasetManifest::load(c)?.classes,
            (None, Some((_, m))) => m.classes.clone(),
            (None, None) => Vec::new(),
        },
        features: match args.features {
            FeatureArg::Auto => FeatureChoice::Auto,
            FeatureArg::Grains => FeatureChoice::Grains,
            FeatureArg::Phases => FeatureChoice::Phases,
        },
        normalisation: Normalisation {
            mean: args.norm_mean.unwrap_or(norm.mean),
            std: args.norm_std.unwrap_or(norm.std),
            // An explicit mean or std is a fixed normalisation.
            per_image: norm.per_image && args.norm_mean.is_none() && args.norm_std.is_none(),
        },
        pixel_size_um: args.pixel_size,
        grain_neck_ratio: args.neck_ratio,
        device: args.device,
        threads: args.threads,
        engine: args.engine,
        precision: args.precision,
    };
    let tiling = TilingSection {
        tile: args.tile,
        overlap: args.overlap,
        batch: args.batch,
    };
    tiling.validate()?;
    let cfg = config::PipelineConfig {
        model: model_section.clone(),
        tiling,
        ..Default::default()
    };
    // Field checks shared with the agent (normalisation, pixel size, classes).
    cfg.model.normalisation.validate()?;
    crate::features::check_neck_ratio(args.neck_ratio).context("--neck-ratio")?;
    if let Some(px) = args.pixel_size
        && !(px.is_finite() && px > 0.0)
    {
        bail!("--pixel-size must be a positive number of micrometres, found {px}");
    }
    let choice = crate::model::runtime::select_engine(args.device)?;
    crate::model::runtime::set_process_engine(choice.engine);
    crate::model::runtime::set_process_engine_kind(args.engine, resolve_threads(args.threads));
    crate::model::runtime::set_process_precision(args.precision);
    let segmenter = Segmenter::load(&model.onnx)?;
    tracing::info!(
        device = segmenter.engine().name(),
        engine = segmenter.engine_name(),
        engine_reason = segmenter.engine_reason(),
        reason = %choice.reason,
        "inference engine"
    );
    let settings = Settings {
        output: args.out.clone(),
        journal: args.out.join("journal.jsonl"),
        failures: FailurePolicy::Report,
        info: ModelInfo::resolve(&model_section, &segmenter)?,
        pixel_size_um: args.pixel_size,
        neck_ratio: args.neck_ratio,
        tile: args.tile,
        overlap: args.overlap,
        batch: args.batch,
        threads: resolve_threads(args.threads),
        queues: QueueSection::default(),
    };
    tracing::info!(
        files = files.len(),
        model = %args.model.display(),
        threads = settings.threads,
        features = ?settings.info.feature_kind,
        "segmenting on the CPU with tract"
    );
    let pipeline = Pipeline::new(settings, ModelSlot::new(segmenter))?;
    let stats = pipeline.stats();
    let bar = crate::telemetry::progress_bar(files.len() as u64, "segmenting");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let summary = runtime.block_on(async {
        let (tx, rx) = mpsc::channel(QueueSection::default().captured);
        let counted = stats.clone();
        let feeder = tokio::spawn(async move {
            for f in files {
                let capture = Capture {
                    key: f.display().to_string(),
                    path: f,
                    captured_at: std::time::Instant::now(),
                };
                counted
                    .captured
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if tx.send(capture).await.is_err() {
                    break;
                }
            }
        });
        let summary = pipeline.run(rx, Progress(bar.clone())).await;
        let _ = feeder.await;
        summary
    })?;
    bar.finish_and_clear();
    let status = stats.status();
    tracing::info!(
        segmented = summary.segmented,
        skipped = summary.skipped,
        failed = summary.failed,
        p50_ms = status.p50.map(|d| d.as_secs_f64() * 1e3),
        "done"
    );
    if !summary.failures.is_empty() {
        for (file, reason) in &summary.failures {
            if reason.contains(file.as_str()) {
                eprintln!("{reason}");
            } else {
                eprintln!("{file}: {reason}");
            }
        }
        bail!(
            "{} of {} micrographs could not be segmented",
            summary.failed,
            summary.failed + summary.segmented + summary.skipped
        );
    }
    Ok(())
}
