//! Class definitions of a segmentation task: the `[[classes]]` table of a `dataset.toml`, of a model's
//! manifest, or of a separate classes file for a read-only dataset folder.
//!
//! ```toml
//! name = "nasa-super"
//! [[classes]]
//! index = 0
//! name = "gamma matrix"
//! color = [40, 40, 40]
//! ```

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// One class of a mask: its index (the pixel value in a class-index PNG), a name and a display colour.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClassDef {
    pub index: u8,
    pub name: String,
    /// sRGB colour used for overlays and contact sheets.
    pub color: [u8; 3],
}

/// The classes of a dataset or model, with the fields of a `dataset.toml` that describe where the data
/// came from. Unknown keys are rejected so that a typo in a hand-written file is caught.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetManifest {
    /// Short name, e.g. `synthetic-polycrystal-sem-se`.
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Physical size of one pixel in micrometres, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pixel_size_um: Option<f64>,
    /// Where the images came from (generator command line, instrument, publication).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub license: Option<String>,
    pub classes: Vec<ClassDef>,
}

/// Errors reading or validating class definitions; each names the file.
#[derive(Debug, thiserror::Error)]
pub enum ClassesError {
    #[error("{path}: cannot read: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a valid dataset/classes TOML: {source}")]
    Parse {
        path: PathBuf,
        source: Box<toml::de::Error>,
    },
    #[error("{path}: {problem}")]
    Invalid { path: PathBuf, problem: String },
}

impl DatasetManifest {
    /// Reads and validates a `dataset.toml` (or a classes file of the same form).
    pub fn load(path: &Path) -> Result<Self, ClassesError> {
        let text = std::fs::read_to_string(path).map_err(|source| ClassesError::Read {
            path: path.to_owned(),
            source,
        })?;
        let manifest: Self = toml::from_str(&text).map_err(|source| ClassesError::Parse {
            path: path.to_owned(),
            source: Box::new(source),
        })?;
        manifest
            .validate()
            .map_err(|problem| ClassesError::Invalid {
                path: path.to_owned(),
                problem,
            })?;
        Ok(manifest)
    }

    /// Classes must be numbered 0, 1, …, K−1 in order, with distinct names, and 2 ≤ K ≤ 255 (255 is
    /// the ignore label).
    pub fn validate(&self) -> Result<(), String> {
        let k = self.classes.len();
        if !(2..=255).contains(&k) {
            return Err(format!(
                "`classes` must list between 2 and 255 classes, found {k}"
            ));
        }
        for (i, class) in self.classes.iter().enumerate() {
            if usize::from(class.index) != i {
                return Err(format!(
                    "classes[{i}] (\"{}\") has index {}: classes must be numbered 0..{} in order",
                    class.name,
                    class.index,
                    k - 1
                ));
            }
            if class.name.trim().is_empty() {
                return Err(format!("classes[{i}] has an empty name"));
            }
            if self.classes[..i].iter().any(|c| c.name == class.name) {
                return Err(format!(
                    "classes[{i}]: the name \"{}\" is used twice",
                    class.name
                ));
            }
        }
        if let Some(px) = self.pixel_size_um
            && !(px.is_finite() && px > 0.0)
        {
            return Err(format!(
                "pixel_size_um must be a positive number, found {px}"
            ));
        }
        Ok(())
    }

    /// Number of classes (K).
    pub fn num_classes(&self) -> usize {
        self.classes.len()
    }

    /// Writes the manifest as TOML.
    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        let text = toml::to_string_pretty(self).map_err(std::io::Error::other)?;
        std::fs::write(path, text)
    }
}
