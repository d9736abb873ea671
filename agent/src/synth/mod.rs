//! The synthetic microscope: labelled micrographs whose truth is exact, in the imaging styles of
//! different labs. It is the project's benchmark and pretraining data.
//!
//! Map:
//! - [`Structure`]: what is on the specimen: a `polycrystal` (grains, twins, pores; classes grain
//!   interior / grain boundary) or `precipitates` (γ matrix, secondary γ′, tertiary γ′). Geometry lives in
//!   `polycrystal.rs` and `precipitates.rs`.
//! - [`Style`] (`style.rs`): how one lab's microscope shows it; presets and TOML files.
//! - `render.rs`: the microscope itself (scene → 16-bit intensities); `noise.rs`: noise fields, blur,
//!   component labelling.
//! - [`SynthParams`] → [`generate`] → [`Sample`] (image, mask, [`SynthTruth`]) in memory;
//!   [`write_dataset`] writes a dataset folder; [`contact_sheet`] (`sheet.rs`) shows every style ×
//!   structure.
//!
//! Determinism: image `index` of seed `seed` uses ChaCha8 generators seeded from `seed` with stream
//! `index`, so it does not depend on how many images are made or in which order. The geometry and the
//! rendering use separate generators, so one seed and index give the same specimen in every style: the
//! same truth seen by different labs.

mod noise;
mod polycrystal;
mod precipitates;
mod render;
mod sheet;
mod style;

use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use indicatif::ProgressBar;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::classes::{ClassDef, DatasetManifest};
use crate::mask::{Mask, MaskError};

pub use sheet::contact_sheet;
pub use style::{Boundary, BoundaryKind, Dust, Noise, Scan, Scratches, Style, Texture};

/// Smallest and largest image side in px.
pub const MIN_SIDE: u32 = 64;
pub const MAX_SIDE: u32 = 4096;

/// Errors of the synthetic microscope; each names the parameter, field or file.
#[derive(Debug, thiserror::Error)]
pub enum SynthError {
    #[error(
        "image size {width}×{height} px is out of range: each side must be {MIN_SIDE}..={MAX_SIDE} px"
    )]
    Size { width: u32, height: u32 },
    #[error("size {0:?} is not N or WxH (e.g. 512 or 640x480)")]
    SizeSyntax(String),
    #[error("boundary width {0} px is out of range 1..=5")]
    BoundaryWidth(u32),
    #[error("feature size {0} px is out of range 8..=1000 (mean grain diameter or γ′ spacing)")]
    FeatureSize(f32),
    #[error("count must be at least 1")]
    Count,
    #[error("unknown style `{name}`: give a preset ({presets}) or the path of a .toml style file")]
    UnknownStyle { name: String, presets: String },
    #[error("{origin}: invalid style: {message}")]
    StyleParse { origin: String, message: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: cannot encode image: {message}")]
    Encode { path: PathBuf, message: String },
    #[error(transparent)]
    Mask(#[from] MaskError),
}

/// What is on the specimen.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "kebab-case")]
#[value(rename_all = "kebab-case")]
pub enum Structure {
    /// Grains of a single-phase metal with annealing twins and pores: classes grain interior, grain
    /// boundary.
    Polycrystal,
    /// γ/γ′ nickel superalloy: γ matrix, large secondary γ′ (cuboidal, often merged), small round
    /// tertiary γ′.
    Precipitates,
}

impl Structure {
    pub const ALL: [Structure; 2] = [Structure::Polycrystal, Structure::Precipitates];

    /// Name used on the command line and in file stems.
    pub fn name(self) -> &'static str {
        match self {
            Structure::Polycrystal => "polycrystal",
            Structure::Precipitates => "precipitates",
        }
    }

    /// The classes of the masks, with display colours.
    pub fn classes(self) -> Vec<ClassDef> {
        let def = |index: u8, name: &str, color: [u8; 3]| ClassDef {
            index,
            name: name.into(),
            color,
        };
        match self {
            Structure::Polycrystal => vec![
                def(0, "grain interior", [70, 70, 70]),
                def(1, "grain boundary", [255, 214, 0]),
            ],
            Structure::Precipitates => vec![
                def(0, "gamma matrix", [40, 40, 40]),
                def(1, "secondary gamma prime", [240, 120, 30]),
                def(2, "tertiary gamma prime", [40, 200, 240]),
            ],
        }
    }

    /// Default mean grain diameter (polycrystal) or γ′ lattice spacing (precipitates), in px.
    pub fn default_feature_size(self) -> f32 {
        match self {
            Structure::Polycrystal => 40.0,
            Structure::Precipitates => 100.0,
        }
    }
}

impl std::fmt::Display for Structure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Everything that decides a generated image, validated on construction so [`generate`] cannot fail.
#[derive(Debug, Clone, PartialEq)]
pub struct SynthParams {
    structure: Structure,
    style: Style,
    width: u32,
    height: u32,
    seed: u64,
    boundary_width: u32,
    feature_size_px: f32,
}

impl SynthParams {
    /// Parameters with the default boundary width (2 px) and feature size of the structure.
    pub fn new(
        structure: Structure,
        style: Style,
        width: u32,
        height: u32,
        seed: u64,
    ) -> Result<Self, SynthError> {
        if !(MIN_SIDE..=MAX_SIDE).contains(&width) || !(MIN_SIDE..=MAX_SIDE).contains(&height) {
            return Err(SynthError::Size { width, height });
        }
        style.validate().map_err(|message| SynthError::StyleParse {
            origin: format!("style `{}`", style.name),
            message,
        })?;
        Ok(Self {
            structure,
            style,
            width,
            height,
            seed,
            boundary_width: 2,
            feature_size_px: structure.default_feature_size(),
        })
    }

    /// Width of the labelled grain boundary, 1..=5 px (polycrystal only).
    pub fn with_boundary_width(mut self, px: u32) -> Result<Self, SynthError> {
        if !(1..=5).contains(&px) {
            return Err(SynthError::BoundaryWidth(px));
        }
        self.boundary_width = px;
        Ok(self)
    }

    /// Mean grain diameter (polycrystal) or γ′ lattice spacing (precipitates), 8..=1000 px.
    pub fn with_feature_size(mut self, px: f32) -> Result<Self, SynthError> {
        if !(px.is_finite() && (8.0..=1000.0).contains(&px)) {
            return Err(SynthError::FeatureSize(px));
        }
        self.feature_size_px = px;
        Ok(self)
    }

    pub fn with_seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    pub fn structure(&self) -> Structure {
        self.structure
    }
    pub fn style(&self) -> &Style {
        &self.style
    }
    pub fn width(&self) -> u32 {
        self.width
    }
    pub fn height(&self) -> u32 {
        self.height
    }
    pub fn seed(&self) -> u64 {
        self.seed
    }
    pub fn boundary_width(&self) -> u32 {
        self.boundary_width
    }
    pub fn feature_size_px(&self) -> f32 {
        self.feature_size_px
    }

    /// File stem of image `index`, e.g. `polycrystal-sem-se-0007`.
    pub fn stem(&self, index: u64) -> String {
        format!("{}-{}-{index:04}", self.structure, self.style.name)
    }

    /// The `microfed synth` command line that makes this dataset (the style as the `style.toml` that
    /// [`write_dataset`] writes beside it, unless it is a preset).
    pub fn command_line(&self, count: u64, format: OutputFormat) -> String {
        let style = if Style::preset(&self.style.name).is_ok_and(|p| p == self.style) {
            self.style.name.clone()
        } else {
            "style.toml".into()
        };
        format!(
            "microfed synth --structure {} --style {style} --count {count} --size {}x{} --seed {} \
             --boundary-width {} --feature-size {} --format {}",
            self.structure,
            self.width,
            self.height,
            self.seed,
            self.boundary_width,
            self.feature_size_px,
            format.name()
        )
    }
}

/// What the generator knows about one image. Polycrystal fields are `None` for precipitates and the
/// other way round.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SynthTruth {
    pub structure: Structure,
    pub style: String,
    pub seed: u64,
    pub index: u64,
    pub width: u32,
    pub height: u32,
    pub boundary_width: u32,
    pub feature_size_px: f32,
    /// Distinct grain-interior regions in the image (grains and twin lamellae with ≥ 1 interior pixel),
    /// from the generator's region map. Each is one connected component of class 0 in the mask under
    /// 4- and 8-connectivity alike.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grains: Option<u32>,
    /// Of those, the ones with an interior pixel on the image border.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grains_touching_edge: Option<u32>,
    /// Mean interior (class 0) area per grain in px.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mean_grain_area_px: Option<f64>,
    /// Twin lamellae among the grains.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub twin_lamellae: Option<u32>,
    /// Pores and inclusions drawn (image only: the mask keeps the grain classes under them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pores: Option<u32>,
    /// Area fraction per class, from the particle shapes (4×4 supersampled coverage), not the mask.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase_fractions: Option<Vec<f64>>,
    /// Particles per class with ≥ 1 mask pixel (index 0, the matrix, is 0); touching particles once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub particle_counts: Option<Vec<u32>>,
    /// Mean covered area per particle of each class in px (index 0 is 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mean_particle_area_px: Option<Vec<f64>>,
}

/// One generated micrograph.
#[derive(Debug, Clone)]
pub struct Sample {
    /// 16-bit intensities, row-major.
    pub image: Vec<u16>,
    pub mask: Mask,
    pub truth: SynthTruth,
}

impl Sample {
    /// The image as 8-bit: v >> 8 with rounding.
    pub fn image_u8(&self) -> Vec<u8> {
        self.image.iter().map(|&v| to_u8(v)).collect()
    }
}

#[inline]
fn to_u8(v: u16) -> u8 {
    ((u32::from(v) + 128) >> 8).min(255) as u8
}

/// Generator for one purpose (`tag`) of image `index`: ChaCha8 seeded from (seed, tag), stream `index`.
fn rng_for(seed: u64, tag: u64, index: u64) -> ChaCha8Rng {
    // SplitMix64 finaliser, so nearby seeds give unrelated keys.
    let mut z = seed ^ tag.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    let mut rng = ChaCha8Rng::seed_from_u64(z);
    rng.set_stream(index);
    rng
}

const TAG_GEOMETRY: u64 = 1;
const TAG_RENDER: u64 = 2;

/// Generates image `index` of the series described by `params`. Pure: same inputs, same bytes.
pub fn generate(params: &SynthParams, index: u64) -> Sample {
    let (w, h) = (params.width as usize, params.height as usize);
    let mut geo_rng = rng_for(params.seed, TAG_GEOMETRY, index);
    let mut render_rng = rng_for(params.seed, TAG_RENDER, index);
    let mut truth = SynthTruth {
        structure: params.structure,
        style: params.style.name.clone(),
        seed: params.seed,
        index,
        width: params.width,
        height: params.height,
        boundary_width: params.boundary_width,
        feature_size_px: params.feature_size_px,
        grains: None,
        grains_touching_edge: None,
        mean_grain_area_px: None,
        twin_lamellae: None,
        pores: None,
        phase_fractions: None,
        particle_counts: None,
        mean_particle_area_px: None,
    };
    let (scene, mask) = match params.structure {
        Structure::Polycrystal => {
            let p = polycrystal::PolyParams {
                grain_size_px: params.feature_size_px,
                size_spread: 0.35,
                twin_probability: 0.22,
                boundary_width: params.boundary_width,
                pores_per_512px: 6.0,
            };
            let out = polycrystal::generate(w, h, &p, &mut geo_rng);
            truth.grains = Some(out.stats.grains);
            truth.grains_touching_edge = Some(out.stats.touching_edge);
            truth.mean_grain_area_px = Some(out.stats.mean_area_px);
            truth.twin_lamellae = Some(out.stats.twin_lamellae);
            truth.pores = Some(out.stats.pores);
            (out.scene, out.mask)
        }
        Structure::Precipitates => {
            let p = precipitates::PrecipParams {
                spacing_px: params.feature_size_px,
                merge_probability: 0.3,
                tertiary_fraction: 0.02,
            };
            let out = precipitates::generate(w, h, &p, &mut geo_rng);
            truth.phase_fractions = Some(out.phase_fractions.to_vec());
            truth.particle_counts = Some(out.particle_counts.to_vec());
            truth.mean_particle_area_px = Some(out.mean_particle_area_px.to_vec());
            (out.scene, out.mask)
        }
    };
    let image = render::render(&scene, &params.style, &mut render_rng);
    Sample {
        image,
        mask: Mask::new(params.width, params.height, mask),
        truth,
    }
}

/// Image file format of a dataset.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum OutputFormat {
    /// 8-bit grayscale PNG.
    #[default]
    Png,
    /// 16-bit grayscale TIFF (uncompressed), the full dynamic range of the detector model.
    #[value(name = "tiff16")]
    #[serde(rename = "tiff16")]
    Tiff16,
}

impl OutputFormat {
    pub fn name(self) -> &'static str {
        match self {
            OutputFormat::Png => "png",
            OutputFormat::Tiff16 => "tiff16",
        }
    }
    pub fn extension(self) -> &'static str {
        match self {
            OutputFormat::Png => "png",
            OutputFormat::Tiff16 => "tif",
        }
    }
}

/// What [`write_dataset`] wrote.
#[derive(Debug, Clone)]
pub struct DatasetSummary {
    pub out_dir: PathBuf,
    pub count: u64,
    /// File stems in index order.
    pub stems: Vec<String>,
    pub manifest: PathBuf,
    /// Mean `grains` over the images (polycrystal).
    pub mean_grains: Option<f64>,
    /// Mean phase fractions over the images (precipitates).
    pub mean_phase_fractions: Option<Vec<f64>>,
}

/// The `dataset.toml` of a generated dataset.
pub fn manifest(params: &SynthParams, count: u64, format: OutputFormat) -> DatasetManifest {
    DatasetManifest {
        name: format!("synthetic-{}-{}", params.structure, params.style.name),
        description: Some(format!(
            "Synthetic {} micrographs in the `{}` style ({}), made by the microfed synthetic \
             microscope; truth per image in truth/<stem>.json.",
            params.structure, params.style.name, params.style.description
        )),
        pixel_size_um: None,
        source: Some(params.command_line(count, format)),
        license: None,
        color_tolerance: None,
        classes: params.structure.classes(),
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> SynthError + '_ {
    move |source| SynthError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Writes the micrograph in `format`; both encoders write no timestamps, so output is byte-identical.
fn write_image(path: &Path, sample: &Sample, format: OutputFormat) -> Result<(), SynthError> {
    let (w, h) = (sample.truth.width, sample.truth.height);
    let enc_err = |message: String| SynthError::Encode {
        path: path.to_owned(),
        message,
    };
    match format {
        OutputFormat::Png => {
            let img = image::GrayImage::from_raw(w, h, sample.image_u8())
                .ok_or_else(|| enc_err("size does not match data".into()))?;
            img.save_with_format(path, image::ImageFormat::Png)
                .map_err(|e| enc_err(e.to_string()))
        }
        OutputFormat::Tiff16 => {
            let file = std::fs::File::create(path).map_err(io_err(path))?;
            let mut out = BufWriter::new(file);
            let mut enc =
                tiff::encoder::TiffEncoder::new(&mut out).map_err(|e| enc_err(e.to_string()))?;
            enc.write_image::<tiff::encoder::colortype::Gray16>(w, h, &sample.image)
                .map_err(|e| enc_err(e.to_string()))?;
            out.flush().map_err(io_err(path))
        }
    }
}

/// Generates `count` images in parallel and writes `OUT/images/<stem>.{png,tif}`,
/// `OUT/masks/<stem>.png`, `OUT/truth/<stem>.json`, `OUT/dataset.toml` and `OUT/style.toml`.
pub fn write_dataset(
    params: &SynthParams,
    count: u64,
    format: OutputFormat,
    out_dir: &Path,
    progress: Option<&ProgressBar>,
) -> Result<DatasetSummary, SynthError> {
    if count == 0 {
        return Err(SynthError::Count);
    }
    let dirs = [
        out_dir.join("images"),
        out_dir.join("masks"),
        out_dir.join("truth"),
    ];
    for d in &dirs {
        std::fs::create_dir_all(d).map_err(io_err(d))?;
    }
    let truths: Vec<SynthTruth> = (0..count)
        .into_par_iter()
        .map(|index| {
            let sample = generate(params, index);
            let stem = params.stem(index);
            write_image(
                &dirs[0].join(format!("{stem}.{}", format.extension())),
                &sample,
                format,
            )?;
            sample.mask.save_png(&dirs[1].join(format!("{stem}.png")))?;
            let truth_path = dirs[2].join(format!("{stem}.json"));
            let json = serde_json::to_string_pretty(&sample.truth).map_err(|e| SynthError::Io {
                path: truth_path.clone(),
                source: std::io::Error::other(e),
            })?;
            std::fs::write(&truth_path, json + "\n").map_err(io_err(&truth_path))?;
            if let Some(bar) = progress {
                bar.inc(1);
            }
            Ok(sample.truth)
        })
        .collect::<Result<_, SynthError>>()?;

    let manifest_path = out_dir.join("dataset.toml");
    manifest(params, count, format)
        .save(&manifest_path)
        .map_err(io_err(&manifest_path))?;
    let style_path = out_dir.join("style.toml");
    std::fs::write(&style_path, params.style.to_toml_string()).map_err(io_err(&style_path))?;

    let n = truths.len() as f64;
    let mean_grains = match params.structure {
        Structure::Polycrystal => Some(
            truths
                .iter()
                .map(|t| t.grains.unwrap_or(0) as f64)
                .sum::<f64>()
                / n,
        ),
        Structure::Precipitates => None,
    };
    let mean_phase_fractions = match params.structure {
        Structure::Precipitates => {
            let mut acc = vec![0.0; 3];
            for t in &truths {
                for (a, f) in acc.iter_mut().zip(t.phase_fractions.iter().flatten()) {
                    *a += f / n;
                }
            }
            Some(acc)
        }
        Structure::Polycrystal => None,
    };
    Ok(DatasetSummary {
        out_dir: out_dir.to_owned(),
        count,
        stems: (0..count).map(|i| params.stem(i)).collect(),
        manifest: manifest_path,
        mean_grains,
        mean_phase_fractions,
    })
}

/// Parses `N` or `WxH` (also `W×H`) into a validated size.
pub fn parse_size(text: &str) -> Result<(u32, u32), SynthError> {
    let bad = || SynthError::SizeSyntax(text.to_owned());
    let t = text.trim().to_ascii_lowercase().replace('×', "x");
    let (w, h) = match t.split_once('x') {
        Some((w, h)) => (
            w.trim().parse().map_err(|_| bad())?,
            h.trim().parse().map_err(|_| bad())?,
        ),
        None => {
            let n = t.parse().map_err(|_| bad())?;
            (n, n)
        }
    };
    if !(MIN_SIDE..=MAX_SIDE).contains(&w) || !(MIN_SIDE..=MAX_SIDE).contains(&h) {
        return Err(SynthError::Size {
            width: w,
            height: h,
        });
    }
    Ok((w, h))
}

#[cfg(test)]
mod tests;
