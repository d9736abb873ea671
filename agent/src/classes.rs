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
/// `color` may be left out of a file: the class then takes [`default_color`] of its index.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "ClassDefFile")]
pub struct ClassDef {
    pub index: u8,
    pub name: String,
    /// sRGB colour used for overlays and contact sheets, and to read colour masks.
    pub color: [u8; 3],
}

/// A class as written in a file, where the colour is optional.
#[derive(Deserialize)]
struct ClassDefFile {
    index: u8,
    name: String,
    #[serde(default)]
    color: Option<[u8; 3]>,
}

impl From<ClassDefFile> for ClassDef {
    fn from(c: ClassDefFile) -> Self {
        Self {
            color: c.color.unwrap_or_else(|| default_color(c.index)),
            index: c.index,
            name: c.name,
        }
    }
}

/// The colour of class `index` when its file gives none: dark grey for class 0 (usually the matrix or
/// background), then ten well-separated hues, repeated.
pub fn default_color(index: u8) -> [u8; 3] {
    const PALETTE: [[u8; 3]; 10] = [
        [230, 25, 75],
        [60, 180, 75],
        [0, 130, 200],
        [255, 225, 25],
        [245, 130, 48],
        [145, 30, 180],
        [70, 240, 240],
        [240, 50, 230],
        [210, 245, 60],
        [250, 190, 212],
    ];
    if index == 0 {
        [40, 40, 40]
    } else {
        PALETTE[(usize::from(index) - 1) % PALETTE.len()]
    }
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
    /// Largest per-channel difference between a colour mask's pixel and its class colour (default
    /// [`DEFAULT_COLOR_TOLERANCE`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub color_tolerance: Option<u8>,
    pub classes: Vec<ClassDef>,
}

/// Default largest per-channel difference between a colour mask's pixel and its class colour:
/// anti-aliased edges and lossy re-saves stay within it, distinct class colours do not.
pub const DEFAULT_COLOR_TOLERANCE: u8 = 24;

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

    /// The colour tolerance for reading colour masks.
    pub fn color_tolerance(&self) -> u8 {
        self.color_tolerance.unwrap_or(DEFAULT_COLOR_TOLERANCE)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn color_is_optional_and_defaults_by_index() {
        let m: DatasetManifest = toml::from_str(
            "name = \"x\"\n[[classes]]\nindex = 0\nname = \"a\"\n\
             [[classes]]\nindex = 1\nname = \"b\"\ncolor = [1, 2, 3]\n\
             [[classes]]\nindex = 2\nname = \"c\"\n",
        )
        .unwrap();
        assert_eq!(m.classes[0].color, default_color(0));
        assert_eq!(m.classes[1].color, [1, 2, 3]);
        assert_eq!(m.classes[2].color, default_color(2));
        assert_ne!(default_color(1), default_color(2));
    }
}
