//! A model's `manifest.toml`: what the network segments, how its input must be prepared, how it was
//! made and how well it did, beside its `model.onnx`.
//!
//! Map:
//! - [`ModelManifest`]: the whole file; [`ModelManifest::load`] parses AND validates it (every error
//!   names the file and the field); [`ModelManifest::save`] writes it atomically.
//! - [`ModelManifest::verify_model`]: the SHA-256 of the ONNX file against the manifest.
//! - [`TrainingData`], [`DatasetRecord`], [`Recipe`], [`Validation`], [`ClassIou`]: the sections.
//!
//! ```toml
//! name = "grains"
//! version = "1.0.0"
//! model_file = "model.onnx"
//! sha256 = "…64 hex digits…"
//! opset = 17
//! input_multiple = 16
//! [normalisation]
//! mean = 0.5
//! std = 0.25
//! [[classes]]
//! index = 0
//! name = "grain interior"
//! color = [70, 70, 70]
//! [training] …   [recipe] …   [validation] …
//! ```

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::augment::Augment;
use crate::classes::{ClassDef, DatasetManifest};
use crate::micrograph::Normalisation;
use crate::model::onnx::{INPUT_MULTIPLE, OPSET};

/// Errors reading, validating or writing a manifest; each names the file (and the field).
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a valid model manifest: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}: field `{field}`: {problem}")]
    Invalid {
        path: PathBuf,
        field: String,
        problem: String,
    },
    #[error("{model}: SHA-256 is {found}, {manifest} says {expected}")]
    HashMismatch {
        model: PathBuf,
        manifest: PathBuf,
        expected: String,
        found: String,
    },
}

/// Everything `manifest.toml` says about a model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelManifest {
    pub name: String,
    /// `MAJOR.MINOR.PATCH`.
    pub version: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// The ONNX file, relative to the manifest's folder.
    pub model_file: String,
    /// SHA-256 of the ONNX file, lower-case hex.
    pub sha256: String,
    pub opset: i64,
    /// Input height and width must be multiples of this.
    pub input_multiple: u32,
    pub normalisation: Normalisation,
    pub classes: Vec<ClassDef>,
    pub training: TrainingData,
    pub recipe: Recipe,
    pub validation: Validation,
}

/// What the model was trained on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainingData {
    pub datasets: Vec<DatasetRecord>,
    /// The image list that restricted the data (`--images-from`), when one was used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub images_from: Option<PathBuf>,
    /// The model whose weights training started from (`--init`), when one was used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init: Option<PathBuf>,
    /// Whether only the decoder and head were trained (the encoder frozen).
    pub decoder_only: bool,
}

/// One dataset folder of the training data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetRecord {
    pub folder: PathBuf,
    pub name: String,
    /// Images used for training (after `--images-from`).
    pub train_images: usize,
    /// Images held out for validation, by stem.
    pub validation_images: Vec<String>,
    /// How the data were made (e.g. the `microfed synth` command line), from its dataset.toml.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
}

/// How the model was trained.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    pub epochs_planned: usize,
    pub epochs_run: usize,
    /// The epoch whose parameters were exported.
    pub best_epoch: usize,
    pub stopped_early: bool,
    pub steps_per_epoch: usize,
    pub batch: usize,
    pub crop: usize,
    /// `adamw` or `sgd`.
    pub optimizer: String,
    /// Peak learning rate.
    pub lr: f64,
    /// How the learning rate changes over the run, in words.
    pub lr_schedule: String,
    pub weight_decay: f64,
    pub seed: u64,
    /// Cross-entropy weight per class.
    pub class_weights: Vec<f32>,
    pub dice_weight: f32,
    pub augmentation: Augment,
    /// e.g. `cpu (2 threads)`, `cuda:0 (NVIDIA H100, sm_90)`.
    pub device: String,
    /// Wall time of the whole run (all sessions), seconds.
    pub wall_seconds: f64,
}

/// Measured on the validation images with the exported parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Validation {
    pub images: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mean_iou: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boundary_f1: Option<f64>,
    pub boundary_tolerance_px: f64,
    pub classes: Vec<ClassIou>,
}

/// IoU of one class (absent when the class is in neither truth nor prediction).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClassIou {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iou: Option<f64>,
}

/// SHA-256 of a file, lower-case hex.
pub fn sha256_file(path: &Path) -> Result<String, ManifestError> {
    let bytes = std::fs::read(path).map_err(|source| ManifestError::Io {
        path: path.to_owned(),
        source,
    })?;
    Ok(hex::encode(Sha256::digest(&bytes)))
}

/// A model given on the command line: a model folder (with `manifest.toml`), a manifest file, or an
/// ONNX file (with the manifest beside it when there is one).
#[derive(Debug, Clone)]
pub struct ModelFiles {
    pub onnx: PathBuf,
    /// The manifest and its path, when there is one.
    pub manifest: Option<(PathBuf, ModelManifest)>,
}

impl ModelFiles {
    /// Finds the ONNX file and manifest of `path` (see the type's docs); a manifest is checked
    /// against its ONNX file's SHA-256.
    pub fn resolve(path: &Path) -> Result<Self, ManifestError> {
        let manifest_path = if path.is_dir() {
            Some(path.join("manifest.toml"))
        } else if path.extension().is_some_and(|e| e == "toml") {
            Some(path.to_owned())
        } else {
            Some(path.with_file_name("manifest.toml")).filter(|p| p.is_file())
        };
        match manifest_path {
            Some(mp) => {
                let m = ModelManifest::load(&mp)?;
                let onnx = m.model_path(&mp);
                if path.is_dir() || path == mp {
                    m.verify_model(&mp)?;
                } else if onnx != path {
                    // An ONNX file beside another model's manifest: the manifest is not its.
                    return Ok(Self {
                        onnx: path.to_owned(),
                        manifest: None,
                    });
                }
                Ok(Self {
                    onnx,
                    manifest: Some((mp, m)),
                })
            }
            None => Ok(Self {
                onnx: path.to_owned(),
                manifest: None,
            }),
        }
    }

    /// The model's normalisation (the default without a manifest).
    pub fn normalisation(&self) -> Normalisation {
        self.manifest
            .as_ref()
            .map(|(_, m)| m.normalisation)
            .unwrap_or_default()
    }
}

impl ModelManifest {
    /// Reads and validates a manifest.
    pub fn load(path: &Path) -> Result<Self, ManifestError> {
        let text = std::fs::read_to_string(path).map_err(|source| ManifestError::Io {
            path: path.to_owned(),
            source,
        })?;
        let m: Self = toml::from_str(&text).map_err(|e| ManifestError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        m.validate()
            .map_err(|(field, problem)| ManifestError::Invalid {
                path: path.to_owned(),
                field: field.to_owned(),
                problem,
            })?;
        Ok(m)
    }

    /// Writes the manifest as TOML, atomically.
    pub fn save(&self, path: &Path) -> Result<(), ManifestError> {
        let io = |source| ManifestError::Io {
            path: path.to_owned(),
            source,
        };
        let text = toml::to_string_pretty(self).map_err(|e| io(std::io::Error::other(e)))?;
        let tmp = path.with_extension("toml.tmp");
        std::fs::write(&tmp, text)
            .and_then(|()| std::fs::rename(&tmp, path))
            .map_err(io)
    }

    /// The ONNX file's path, for a manifest at `manifest_path`.
    pub fn model_path(&self, manifest_path: &Path) -> PathBuf {
        manifest_path
            .parent()
            .unwrap_or(Path::new("."))
            .join(&self.model_file)
    }

    /// Checks the ONNX file's SHA-256 against the manifest.
    pub fn verify_model(&self, manifest_path: &Path) -> Result<(), ManifestError> {
        let model = self.model_path(manifest_path);
        let found = sha256_file(&model)?;
        if found != self.sha256 {
            return Err(ManifestError::HashMismatch {
                model,
                manifest: manifest_path.to_owned(),
                expected: self.sha256.clone(),
                found,
            });
        }
        Ok(())
    }

    /// The field that is wrong and why.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if self.name.trim().is_empty() {
            return Err(("name", "must not be empty".into()));
        }
        let parts: Vec<&str> = self.version.split('.').collect();
        if parts.len() != 3
            || parts
                .iter()
                .any(|p| p.is_empty() || p.parse::<u64>().is_err())
        {
            return Err((
                "version",
                format!("`{}` is not MAJOR.MINOR.PATCH", self.version),
            ));
        }
        let file = Path::new(&self.model_file);
        if self.model_file.is_empty() || file.is_absolute() || file.components().count() != 1 {
            return Err((
                "model_file",
                format!(
                    "`{}` must be a file name beside the manifest",
                    self.model_file
                ),
            ));
        }
        if self.sha256.len() != 64
            || !self
                .sha256
                .chars()
                .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c))
        {
            return Err(("sha256", "must be 64 lower-case hex digits".into()));
        }
        if self.opset != OPSET {
            return Err((
                "opset",
                format!("{} (microfed models use opset {OPSET})", self.opset),
            ));
        }
        if self.input_multiple as usize != INPUT_MULTIPLE {
            return Err((
                "input_multiple",
                format!(
                    "{} (the reference U-Net needs {INPUT_MULTIPLE})",
                    self.input_multiple
                ),
            ));
        }
        self.normalisation
            .validate()
            .map_err(|e| ("normalisation", e.to_string()))?;
        DatasetManifest {
            name: self.name.clone(),
            description: None,
            pixel_size_um: None,
            source: None,
            license: None,
            color_tolerance: None,
            classes: self.classes.clone(),
        }
        .validate()
        .map_err(|e| ("classes", e))?;
        let v = &self.validation;
        if v.classes.len() != self.classes.len() {
            return Err((
                "validation.classes",
                format!(
                    "{} entries for {} classes",
                    v.classes.len(),
                    self.classes.len()
                ),
            ));
        }
        let unit = |x: Option<f64>| x.is_none_or(|x| (0.0..=1.0).contains(&x));
        if !unit(v.mean_iou) || !unit(v.boundary_f1) || !v.classes.iter().all(|c| unit(c.iou)) {
            return Err(("validation", "metrics must lie in [0, 1]".into()));
        }
        if self.recipe.class_weights.len() != self.classes.len()
            || self
                .recipe
                .class_weights
                .iter()
                .any(|w| !(w.is_finite() && *w >= 0.0))
        {
            return Err((
                "recipe.class_weights",
                "one finite weight ≥ 0 per class".into(),
            ));
        }
        Ok(())
    }
}
