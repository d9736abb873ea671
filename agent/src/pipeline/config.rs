//! The agent's configuration file (`agent.toml`): serde with `deny_unknown_fields`, every field
//! defaulted so that a file naming only the model works on one machine, and [`PipelineConfig::validate`]
//! run before anything starts.
//!
//! Map: [`PipelineConfig`] (the file) → sections [`Folders`], [`ModelSection`], [`TilingSection`],
//! [`CaptureSection`], [`QueueSection`], [`StatusSection`]; [`Device`] (which
//! processor runs the model, and why); [`ConfigError`].
//!
//! Seam for the model manifest: the classes and the normalisation come from `[model]` here. When a
//! `ModelManifest` ships beside the ONNX file, [`crate::pipeline::ModelInfo::resolve`] is the one place
//! that should prefer it over these defaults.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::classes::ClassDef;
use crate::features::FeatureKind;
use crate::micrograph::Normalisation;
use crate::model::onnx::INPUT_MULTIPLE;

/// Why a configuration cannot be used; each names the file or the field.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: cannot read the agent configuration: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a valid agent configuration: {source}")]
    Parse {
        path: PathBuf,
        source: Box<toml::de::Error>,
    },
    #[error("{field}: {problem}")]
    Invalid {
        field: &'static str,
        problem: String,
    },
}

pub(crate) fn invalid(field: &'static str, problem: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field,
        problem: problem.into(),
    }
}

/// The pipeline's sections of `agent.toml` (the whole file, federation included, is
/// `crate::node::PipelineConfig`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct PipelineConfig {
    #[serde(default)]
    pub folders: Folders,
    #[serde(default)]
    pub model: ModelSection,
    #[serde(default)]
    pub tiling: TilingSection,
    #[serde(default)]
    pub capture: CaptureSection,
    #[serde(default)]
    pub queues: QueueSection,
    #[serde(default)]
    pub status: StatusSection,
}

/// Where micrographs arrive and where everything the agent makes goes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Folders {
    /// The microscope's output folder (watched, not recursively).
    pub watch: PathBuf,
    /// Masks, overlays, features (JSON per image, one CSV for the folder).
    pub output: PathBuf,
    /// Files that could not be decoded or segmented, each with `NAME.error.txt` beside it.
    pub quarantine: PathBuf,
    /// Append-only record of processed files (JSON lines); default `OUTPUT/journal.jsonl`.
    #[serde(default)]
    pub journal: Option<PathBuf>,
}

impl Default for Folders {
    fn default() -> Self {
        Self {
            watch: "incoming".into(),
            output: "segmented".into(),
            quarantine: "quarantine".into(),
            journal: None,
        }
    }
}

impl Folders {
    /// The journal file (the default lives in the output folder).
    pub fn journal_path(&self) -> PathBuf {
        self.journal
            .clone()
            .unwrap_or_else(|| self.output.join("journal.jsonl"))
    }
}

/// Which processor runs the network: `auto` (the GPU through tract-cuda when it can run, else the CPU),
/// `cpu`, or `cuda` (the GPU or an error). Decided at start by [`crate::model::runtime::select_engine`].
pub use crate::model::runtime::InferenceDevice as Device;

/// What runs the network: `auto` (our kernels on the CPU when the model passes the parity probe
/// against tract, else tract), `tract`, or `kernels` (our CPU kernels even beside a GPU, when the
/// probe passes). Decided per model at load by [`crate::model::runtime::Segmenter`].
pub use crate::model::runtime::EngineKind as Engine;

/// The network and how to read its inputs and outputs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// The ONNX U-Net (microfed contract: `image [N,1,H,W]` → `logits [N,K,H,W]`).
    pub path: PathBuf,
    /// Replace the running model when this file changes on disk (images in flight finish on the old).
    #[serde(default = "yes")]
    pub reload_on_change: bool,
    /// The classes the model predicts, numbered 0..K-1. Empty: K unnamed classes taken from the model.
    #[serde(default)]
    pub classes: Vec<ClassDef>,
    /// What to measure on each mask: "grains", "phases", or "auto" (from the class names).
    #[serde(default)]
    pub features: FeatureChoice,
    /// How grey levels become network inputs; must be what the model was trained with.
    #[serde(default)]
    pub normalisation: Normalisation,
    /// Micrometres per pixel. When set it wins over TIFF resolution tags (often a meaningless 72 dpi);
    /// when unset, the tags are used if the file has them, else lengths are in pixels.
    #[serde(default)]
    pub pixel_size_um: Option<f64>,
    /// Grains: a region of interior pixels is split where two parts meet through a neck narrower
    /// than this fraction of the smaller part's largest inscribed radius (a gap in a predicted
    /// boundary); 0 = grains are the plain connected interiors. 0..=1.
    #[serde(default = "default_neck_ratio")]
    pub grain_neck_ratio: f64,
    /// "auto", "cpu" or "cuda": where tract runs the network (see [`Device`]).
    #[serde(default)]
    pub device: Device,
    /// Threads for tract's matrix products and the kernels engine's convolutions; 0 = every core.
    #[serde(default)]
    pub threads: usize,
    /// "auto", "tract" or "kernels": what runs the network (see [`Engine`]). `auto` uses our own
    /// kernels on the CPU when the model passes the parity probe against tract at load; `kernels`
    /// also where tract would run tract-cuda (our CUDA kernels, not yet measured against it).
    #[serde(default)]
    pub engine: Engine,
    /// "fp32" or "tf32": the arithmetic of the kernels engine's convolutions on the GPU (TF32: the
    /// tensor cores of sm_80 and newer, inputs rounded to 11 significant bits, its parity probe's
    /// bound widened to match; older GPUs and the CPU compute in fp32 and say so at load).
    #[serde(default)]
    pub precision: crate::model::runtime::Precision,
}

fn yes() -> bool {
    true
}

fn default_neck_ratio() -> f64 {
    crate::features::DEFAULT_NECK_RATIO
}

impl Default for ModelSection {
    fn default() -> Self {
        Self {
            path: "models/grains/model.onnx".into(),
            reload_on_change: true,
            classes: Vec::new(),
            features: FeatureChoice::Auto,
            normalisation: Normalisation::default(),
            pixel_size_um: None,
            grain_neck_ratio: default_neck_ratio(),
            device: Device::Auto,
            threads: 0,
            engine: Engine::Auto,
            precision: crate::model::runtime::Precision::Fp32,
        }
    }
}

/// `features = "auto" | "grains" | "phases"`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FeatureChoice {
    #[default]
    Auto,
    Grains,
    Phases,
}

impl FeatureChoice {
    pub fn kind(self) -> Option<FeatureKind> {
        match self {
            FeatureChoice::Auto => None,
            FeatureChoice::Grains => Some(FeatureKind::Grains),
            FeatureChoice::Phases => Some(FeatureKind::Phases),
        }
    }
}

/// How images are cut into tiles for the network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TilingSection {
    /// Tile side in pixels, a multiple of 16.
    #[serde(default = "default_tile")]
    pub tile: usize,
    /// Minimum overlap of neighbouring tiles in pixels (rounded up so tiles start on multiples of 16).
    #[serde(default = "default_overlap")]
    pub overlap: usize,
    /// Tiles per network run.
    #[serde(default = "default_batch")]
    pub batch: usize,
}

fn default_tile() -> usize {
    512
}
fn default_overlap() -> usize {
    32
}
fn default_batch() -> usize {
    1
}

impl Default for TilingSection {
    fn default() -> Self {
        Self {
            tile: default_tile(),
            overlap: default_overlap(),
            batch: default_batch(),
        }
    }
}

impl TilingSection {
    /// Tile a multiple of 16, overlap below half a tile (else most of each tile is thrown away),
    /// batch at least 1.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.tile < INPUT_MULTIPLE || !self.tile.is_multiple_of(INPUT_MULTIPLE) {
            return Err(invalid(
                "tiling.tile",
                format!(
                    "must be a positive multiple of {INPUT_MULTIPLE}, found {}",
                    self.tile
                ),
            ));
        }
        if self.overlap * 2 >= self.tile {
            return Err(invalid(
                "tiling.overlap",
                format!(
                    "must be less than half the tile ({}), found {}",
                    self.tile / 2,
                    self.overlap
                ),
            ));
        }
        if !(1..=64).contains(&self.batch) {
            return Err(invalid(
                "tiling.batch",
                format!("must be 1..=64, found {}", self.batch),
            ));
        }
        Ok(())
    }
}

/// When a file in the watched folder counts as captured.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaptureSection {
    /// A file is complete once its size and modification time have not changed for this long
    /// (milliseconds). A rename into the folder completes it at once.
    #[serde(default = "default_settle_ms")]
    pub settle_ms: u64,
    /// Extensions (case-insensitive) that are micrographs; other files are left alone.
    #[serde(default = "default_extensions")]
    pub extensions: Vec<String>,
    /// A micrograph whose outputs could not be written (a full disk, a removed output folder: not
    /// the file's fault) is captured again after this many seconds, while it is still in the
    /// folder; at least 1.
    #[serde(default = "default_retry_after_s")]
    pub retry_after_s: u64,
}

fn default_settle_ms() -> u64 {
    1000
}
fn default_retry_after_s() -> u64 {
    30
}
fn default_extensions() -> Vec<String> {
    ["png", "tif", "tiff", "jpg", "jpeg", "bmp"]
        .map(String::from)
        .into()
}

impl Default for CaptureSection {
    fn default() -> Self {
        Self {
            settle_ms: default_settle_ms(),
            extensions: default_extensions(),
            retry_after_s: default_retry_after_s(),
        }
    }
}

impl CaptureSection {
    /// How long a file whose outputs could not be written waits before it is captured again.
    pub fn retry_after(&self) -> Duration {
        Duration::from_secs(self.retry_after_s.max(1))
    }

    pub fn settle(&self) -> Duration {
        Duration::from_millis(self.settle_ms)
    }
}

/// Capacities of the bounded channels between stages. A full channel makes the stage before it wait
/// (backpressure): a burst of captures queues up as file names, never as decoded images in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueueSection {
    /// Captured files waiting to be decoded.
    #[serde(default = "default_queue")]
    pub captured: usize,
    /// Decoded micrographs waiting for the network (each holds W×H floats).
    #[serde(default = "default_small_queue")]
    pub decoded: usize,
    /// Masks waiting to be written.
    #[serde(default = "default_small_queue")]
    pub segmented: usize,
    /// Results waiting to be published.
    #[serde(default = "default_queue")]
    pub written: usize,
}

fn default_queue() -> usize {
    16
}
fn default_small_queue() -> usize {
    2
}

impl Default for QueueSection {
    fn default() -> Self {
        Self {
            captured: default_queue(),
            decoded: default_small_queue(),
            segmented: default_small_queue(),
            written: default_queue(),
        }
    }
}

/// The health line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatusSection {
    /// Seconds between status lines at info level; 0 turns them off.
    #[serde(default = "default_status")]
    pub interval_s: u64,
}

fn default_status() -> u64 {
    30
}

impl Default for StatusSection {
    fn default() -> Self {
        Self {
            interval_s: default_status(),
        }
    }
}

/// Reads and parses a TOML configuration file; the error names the file.
pub fn read_toml<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    toml::from_str(&text).map_err(|source| ConfigError::Parse {
        path: path.to_owned(),
        source: Box::new(source),
    })
}

impl PipelineConfig {
    /// Reads, parses and validates a configuration file. Relative paths in it are resolved against
    /// the file's folder, so a config can travel with its folders.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let mut config: Self = read_toml(path)?;
        let base = path.parent().unwrap_or(Path::new(""));
        config.resolve_paths(base);
        config.validate()?;
        Ok(config)
    }

    /// Makes relative paths relative to `base` (the configuration file's folder).
    pub fn resolve_paths(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        fix(&mut self.folders.watch);
        fix(&mut self.folders.output);
        fix(&mut self.folders.quarantine);
        if let Some(j) = &mut self.folders.journal {
            fix(j);
        }
        fix(&mut self.model.path);
    }

    /// Checks every field that can be checked without touching the disk.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let f = &self.folders;
        if f.watch == f.output || f.watch == f.quarantine {
            return Err(invalid(
                "folders",
                "output and quarantine must differ from the watched folder \
                 (the agent would capture its own outputs)",
            ));
        }
        self.tiling.validate()?;
        self.model
            .normalisation
            .validate()
            .map_err(|e| invalid("model.normalisation", e.to_string()))?;
        if let Some(px) = self.model.pixel_size_um
            && !(px.is_finite() && px > 0.0)
        {
            return Err(invalid(
                "model.pixel_size_um",
                format!("must be a positive number of micrometres, found {px}"),
            ));
        }
        crate::features::check_neck_ratio(self.model.grain_neck_ratio)
            .map_err(|e| invalid("model.grain_neck_ratio", e.to_string()))?;
        if !self.model.classes.is_empty() {
            let m = crate::classes::DatasetManifest {
                name: "agent".into(),
                description: None,
                pixel_size_um: None,
                source: None,
                license: None,
                color_tolerance: None,
                classes: self.model.classes.clone(),
            };
            m.validate().map_err(|p| invalid("model.classes", p))?;
        }
        if self.capture.settle_ms > 600_000 {
            return Err(invalid(
                "capture.settle_ms",
                format!("at most 600000 (10 min), found {}", self.capture.settle_ms),
            ));
        }
        if self.capture.extensions.is_empty() {
            return Err(invalid("capture.extensions", "list at least one extension"));
        }
        let q = &self.queues;
        if [q.captured, q.decoded, q.segmented, q.written].contains(&0) {
            return Err(invalid("queues", "every capacity must be at least 1"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_config_parses_and_validates() {
        let text = include_str!("../../agent.example.toml");
        let c: PipelineConfig = toml::from_str(text).unwrap();
        c.validate().unwrap();
        assert_eq!(c.tiling.tile, 512);
        assert_eq!(c.tiling.overlap, 32);
        assert_eq!(c.model.engine, Engine::Auto);
        assert_eq!(c.model.precision, crate::model::runtime::Precision::Fp32);
    }

    #[test]
    fn precision_is_fp32_or_tf32_and_a_wrong_one_is_named() {
        use crate::model::runtime::Precision;
        let c: PipelineConfig =
            toml::from_str("[model]\npath = \"m.onnx\"\nprecision = \"tf32\"\n").unwrap();
        assert_eq!(c.model.precision, Precision::Tf32);
        assert!(Precision::Tf32.probe_tolerance() > Precision::Fp32.probe_tolerance());
        let err =
            toml::from_str::<PipelineConfig>("[model]\npath = \"m.onnx\"\nprecision = \"fp16\"\n")
                .unwrap_err()
                .to_string();
        assert!(err.contains("fp16") && err.contains("tf32"), "{err}");
    }

    #[test]
    fn defaults_work_and_typos_are_refused() {
        let c: PipelineConfig = toml::from_str("[model]\npath = \"m.onnx\"\n").unwrap();
        c.validate().unwrap();
        assert_eq!(c.capture.settle(), Duration::from_secs(1));
        assert_eq!(
            c.folders.journal_path(),
            Path::new("segmented/journal.jsonl")
        );
        let err = toml::from_str::<PipelineConfig>("[tiling]\ntiles = 256\n").unwrap_err();
        assert!(err.to_string().contains("tiles"), "{err}");
    }

    #[test]
    fn bad_values_name_their_field() {
        let bad = |text: &str, field: &str| {
            let c: PipelineConfig = toml::from_str(text).unwrap();
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains(field), "{text}: {e}");
        };
        bad("[tiling]\ntile = 500\n", "tiling.tile");
        bad("[tiling]\noverlap = 256\n", "tiling.overlap");
        bad("[tiling]\nbatch = 0\n", "tiling.batch");
        bad(
            "[model]\npath = \"m\"\ngrain_neck_ratio = 1.5\n",
            "model.grain_neck_ratio",
        );
        bad(
            "[model]\npath = \"m\"\ngrain_neck_ratio = nan\n",
            "model.grain_neck_ratio",
        );
        bad(
            "[model]\npath = \"m\"\npixel_size_um = -1\n",
            "model.pixel_size_um",
        );
        bad("[queues]\ndecoded = 0\n", "queues");
        bad(
            "[folders]\nwatch = \"a\"\noutput = \"a\"\nquarantine = \"q\"\n",
            "folders",
        );
        bad(
            "[model]\npath = \"m\"\nnormalisation = { mean = 0.5, std = 0.0 }\n",
            "model.normalisation",
        );
    }

    #[test]
    fn relative_paths_follow_the_config_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("agent.toml");
        std::fs::write(
            &p,
            "[folders]\nwatch = \"in\"\noutput = \"out\"\nquarantine = \"q\"\n",
        )
        .unwrap();
        let c = PipelineConfig::load(&p).unwrap();
        assert_eq!(c.folders.watch, dir.path().join("in"));
        assert_eq!(
            c.folders.journal_path(),
            dir.path().join("out/journal.jsonl")
        );
    }
}
