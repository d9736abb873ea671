//! `microfed synth`: writes a labelled synthetic dataset (or a contact sheet of all styles).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;

use crate::synth::{self, OutputFormat, Structure, Style, SynthParams};
use crate::telemetry;

/// Make labelled synthetic micrographs whose truth is exact, in the imaging style of a lab.
///
/// Each image comes with a class-index mask and a JSON file of what the generator knows (grain count,
/// phase fractions, ...). The same seed always gives the same bytes, and image i does not depend on
/// --count, so datasets can be extended.
#[derive(Debug, clap::Args)]
#[command(after_help = "\
Examples:
  microfed synth --structure polycrystal --style sem-se --count 100 --size 512 --out data/poly-se
  microfed synth --structure precipitates --style my-lab.toml --size 640x480 --format tiff16 --out data/lab
  microfed synth --contact-sheet docs/images/contact-sheet.png

Output: OUT/images/<stem>.png|.tif, OUT/masks/<stem>.png (class indices), OUT/truth/<stem>.json,
OUT/dataset.toml (classes and the command line), OUT/style.toml (the full style, to reproduce it).

A style file may start from a preset and change a few keys:
  base = \"sem-se\"
  name = \"lab-b\"
  blur_sigma = 1.5
  [noise]
  poisson_counts = 20")]
pub struct Args {
    /// What is on the specimen: grains (classes interior/boundary) or γ/γ′ precipitates (matrix,
    /// secondary γ′, tertiary γ′).
    #[arg(long, value_enum, default_value_t = Structure::Polycrystal)]
    pub structure: Structure,

    /// Imaging style: a preset (optical-etched, sem-se, sem-bse, hazy, fast-scan) or the path of a
    /// TOML style file.
    #[arg(long, default_value = "sem-se", value_name = "NAME|PATH.toml")]
    pub style: String,

    /// Number of images.
    #[arg(long, default_value_t = 16)]
    pub count: u64,

    /// Image size: N for N×N, or WxH; each side 64..=4096 px.
    #[arg(long, default_value = "512", value_name = "N|WxH")]
    pub size: String,

    /// Random seed; image i of a seed is always the same.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,

    /// Width of the labelled grain boundary in px (1..=5; polycrystal).
    #[arg(long, default_value_t = 2)]
    pub boundary_width: u32,

    /// Mean grain diameter (polycrystal, default 40) or γ′ spacing (precipitates, default 100), in px.
    #[arg(long, value_name = "PX")]
    pub feature_size: Option<f32>,

    /// Image format: 8-bit PNG or 16-bit TIFF.
    #[arg(long, value_enum, default_value_t = OutputFormat::Png)]
    pub format: OutputFormat,

    /// Output folder (created if missing).
    #[arg(long, value_name = "DIR", required_unless_present = "contact_sheet")]
    pub out: Option<PathBuf>,

    /// Write a contact sheet of every style × structure to this PNG instead of a dataset.
    #[arg(long, value_name = "PATH.png")]
    pub contact_sheet: Option<PathBuf>,

    /// Tile size of the contact sheet in px.
    #[arg(long, default_value_t = 192, requires = "contact_sheet")]
    pub tile: u32,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let start = Instant::now();
    if let Some(path) = &args.contact_sheet {
        let sheet = synth::contact_sheet(args.tile, args.seed);
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).with_context(|| format!("{}", dir.display()))?;
        }
        sheet
            .save_with_format(path, image::ImageFormat::Png)
            .with_context(|| format!("{}: cannot write contact sheet", path.display()))?;
        tracing::info!(
            path = %path.display(),
            width = sheet.width(),
            height = sheet.height(),
            seconds = start.elapsed().as_secs_f64(),
            "wrote contact sheet"
        );
        return Ok(());
    }
    let out = args
        .out
        .as_ref()
        .context("--out DIR is required (or --contact-sheet PATH.png)")?;
    let style = Style::from_name_or_path(&args.style)?;
    let (width, height) = synth::parse_size(&args.size)?;
    let mut params = SynthParams::new(args.structure, style, width, height, args.seed)?
        .with_boundary_width(args.boundary_width)?;
    if let Some(px) = args.feature_size {
        params = params.with_feature_size(px)?;
    }
    let bar = telemetry::progress_bar(args.count, "synth");
    let summary = synth::write_dataset(&params, args.count, args.format, out, Some(&bar))?;
    bar.finish_and_clear();
    let seconds = start.elapsed().as_secs_f64();
    tracing::info!(
        out = %summary.out_dir.display(),
        images = summary.count,
        structure = %params.structure(),
        style = %params.style().name,
        size = %format!("{width}x{height}"),
        mean_grains = ?summary.mean_grains,
        mean_phase_fractions = ?summary.mean_phase_fractions,
        seconds,
        "wrote synthetic dataset"
    );
    Ok(())
}
