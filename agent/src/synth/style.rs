//! Imaging styles: how one lab's microscope and preparation make a micrograph look.
//!
//! A [`Style`] is plain data (serde + TOML) so a user can describe a new lab in a file. Map:
//! - [`Style`] and its tables [`Boundary`], [`Noise`], [`Texture`], [`Scratches`], [`Dust`], [`Scan`];
//! - [`Style::PRESETS`] / [`Style::preset`]: the built-in labs;
//! - [`Style::from_toml_str`] / [`Style::from_toml_file`]: a file may start from a preset with
//!   `base = "sem-se"` and override only some keys; unknown keys and out-of-range values are errors that
//!   name the field.
//!
//! Intensities are on a 0..1 scale (0 black, 1 white) before 16-bit quantisation.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::SynthError;

/// How grain boundaries and phase interfaces are drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BoundaryKind {
    /// Etched groove: darker than the grains (optical bright field, BSE topography).
    Groove,
    /// Edge effect of secondary electrons: brighter than the grains.
    BrightEdge,
}

/// Boundary and interface rendering.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Boundary {
    pub kind: BoundaryKind,
    /// Intensity change at the centre of a boundary (0..1).
    pub strength: f32,
    /// Gaussian softening of the boundary profile in px, on top of the labelled width (0..5).
    pub softness_px: f32,
}

/// Detector noise.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Noise {
    /// Standard deviation of additive Gaussian (read-out) noise (0..0.5).
    pub gaussian_sigma: f32,
    /// Detected electrons/photons per pixel at full white; shot (Poisson) noise. 0 turns it off; small
    /// values (5–20) are a fast scan, large (500+) a slow one.
    pub poisson_counts: f32,
}

/// Surface texture: fractal value noise added to the intensity.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Texture {
    /// Amplitude (0..0.5).
    pub amplitude: f32,
    /// Size of the coarsest octave in px (1..2000).
    pub scale_px: f32,
    /// Number of octaves (1..8).
    pub octaves: u32,
}

/// Polishing scratches: long straight lines, mostly along one polishing direction.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Scratches {
    /// Mean number per 512×512 px (0..100).
    pub per_512px: f32,
    /// Intensity change at the centre of a scratch (−1..1; negative darkens).
    pub strength: f32,
}

/// Dust and debris: soft dark blobs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Dust {
    /// Mean number per 512×512 px (0..100).
    pub per_512px: f32,
    /// Darkening at the centre (0..1).
    pub strength: f32,
    /// Largest radius in px (1..100).
    pub max_radius_px: f32,
}

/// Raster-scan artefacts of an SEM.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Scan {
    /// Standard deviation of the horizontal shift of each scan line in px (0..5).
    pub line_jitter_px: f32,
    /// Standard deviation of the brightness offset of each scan line (0..0.2).
    pub line_gain: f32,
}

/// One lab's imaging style. See the module documentation for the file format.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Style {
    /// Name used in file stems (letters, digits and `-`).
    pub name: String,
    pub description: String,
    /// Mean intensity (0.05..0.95).
    pub brightness: f32,
    /// Scale of the intensity difference between phases (0..1.5).
    pub contrast: f32,
    /// Grain-to-grain (orientation) shading: standard deviation of a grain's tone (0..0.5).
    pub grain_shading: f32,
    /// Linear illumination gradient across the image, as a fraction of brightness (0..1).
    pub gradient: f32,
    /// Darkening of the corners relative to the centre (0..1).
    pub vignetting: f32,
    /// Amplitude of a broad bright charging blotch (0..1).
    pub charging: f32,
    /// Defocus: Gaussian blur sigma in px (0..20).
    pub blur_sigma: f32,
    /// Darkness of pores and inclusions (0..1).
    pub pore_darkness: f32,
    pub boundary: Boundary,
    pub noise: Noise,
    pub texture: Texture,
    pub scratches: Scratches,
    pub dust: Dust,
    pub scan: Scan,
}

impl Default for Boundary {
    fn default() -> Self {
        Self {
            kind: BoundaryKind::Groove,
            strength: 0.3,
            softness_px: 0.8,
        }
    }
}
impl Default for Noise {
    fn default() -> Self {
        Self {
            gaussian_sigma: 0.01,
            poisson_counts: 0.0,
        }
    }
}
impl Default for Texture {
    fn default() -> Self {
        Self {
            amplitude: 0.02,
            scale_px: 32.0,
            octaves: 4,
        }
    }
}
impl Default for Scratches {
    fn default() -> Self {
        Self {
            per_512px: 0.0,
            strength: -0.05,
        }
    }
}
impl Default for Dust {
    fn default() -> Self {
        Self {
            per_512px: 0.0,
            strength: 0.3,
            max_radius_px: 8.0,
        }
    }
}
impl Default for Scan {
    fn default() -> Self {
        Self {
            line_jitter_px: 0.0,
            line_gain: 0.0,
        }
    }
}

impl Default for Style {
    /// A neutral, clean microscope; the presets change it.
    fn default() -> Self {
        Self {
            name: "custom".into(),
            description: String::new(),
            brightness: 0.5,
            contrast: 0.3,
            grain_shading: 0.15,
            gradient: 0.0,
            vignetting: 0.0,
            charging: 0.0,
            blur_sigma: 0.7,
            pore_darkness: 0.6,
            boundary: Boundary::default(),
            noise: Noise::default(),
            texture: Texture::default(),
            scratches: Scratches::default(),
            dust: Dust::default(),
            scan: Scan::default(),
        }
    }
}

impl Style {
    /// Names of the built-in styles.
    pub const PRESETS: &'static [&'static str] =
        &["optical-etched", "sem-se", "sem-bse", "hazy", "fast-scan"];

    /// A built-in style by name.
    pub fn preset(name: &str) -> Result<Style, SynthError> {
        let base = Style::default();
        let style = match name {
            "optical-etched" => Style {
                name: name.into(),
                description: "optical bright field of an etched section: dark grooves, strong \
                              grain-to-grain shading, polishing scratches, uneven lamp"
                    .into(),
                brightness: 0.60,
                contrast: 0.45,
                grain_shading: 0.28,
                gradient: 0.12,
                vignetting: 0.18,
                blur_sigma: 0.9,
                pore_darkness: 0.75,
                boundary: Boundary {
                    kind: BoundaryKind::Groove,
                    strength: 0.42,
                    softness_px: 0.9,
                },
                noise: Noise {
                    gaussian_sigma: 0.012,
                    poisson_counts: 0.0,
                },
                texture: Texture {
                    amplitude: 0.03,
                    scale_px: 40.0,
                    octaves: 5,
                },
                scratches: Scratches {
                    per_512px: 5.0,
                    strength: -0.07,
                },
                dust: Dust {
                    per_512px: 3.0,
                    strength: 0.35,
                    max_radius_px: 9.0,
                },
                ..base
            },
            "sem-se" => Style {
                name: name.into(),
                description: "secondary-electron SEM: bright edges, shot noise, scan-line jitter"
                    .into(),
                brightness: 0.50,
                contrast: 0.3,
                grain_shading: 0.08,
                gradient: 0.05,
                blur_sigma: 0.8,
                pore_darkness: 0.55,
                boundary: Boundary {
                    kind: BoundaryKind::BrightEdge,
                    strength: 0.22,
                    softness_px: 1.1,
                },
                noise: Noise {
                    gaussian_sigma: 0.008,
                    poisson_counts: 300.0,
                },
                texture: Texture {
                    amplitude: 0.025,
                    scale_px: 10.0,
                    octaves: 3,
                },
                scratches: Scratches {
                    per_512px: 1.0,
                    strength: 0.04,
                },
                scan: Scan {
                    line_jitter_px: 0.35,
                    line_gain: 0.008,
                },
                ..base
            },
            "sem-bse" => Style {
                name: name.into(),
                description: "backscattered-electron SEM: low phase contrast, channelling \
                              contrast between grains, charging gradient"
                    .into(),
                brightness: 0.46,
                contrast: 0.16,
                grain_shading: 0.22,
                gradient: 0.10,
                charging: 0.16,
                blur_sigma: 1.0,
                pore_darkness: 0.5,
                boundary: Boundary {
                    kind: BoundaryKind::Groove,
                    strength: 0.07,
                    softness_px: 1.0,
                },
                noise: Noise {
                    gaussian_sigma: 0.008,
                    poisson_counts: 250.0,
                },
                texture: Texture {
                    amplitude: 0.015,
                    scale_px: 80.0,
                    octaves: 3,
                },
                scan: Scan {
                    line_jitter_px: 0.15,
                    line_gain: 0.004,
                },
                ..base
            },
            "hazy" => Style {
                name: name.into(),
                description: "poorly focused, low-contrast image with strong vignetting".into(),
                brightness: 0.55,
                contrast: 0.18,
                grain_shading: 0.12,
                gradient: 0.08,
                vignetting: 0.40,
                blur_sigma: 2.2,
                pore_darkness: 0.45,
                boundary: Boundary {
                    kind: BoundaryKind::Groove,
                    strength: 0.18,
                    softness_px: 1.2,
                },
                noise: Noise {
                    gaussian_sigma: 0.01,
                    poisson_counts: 0.0,
                },
                texture: Texture {
                    amplitude: 0.03,
                    scale_px: 120.0,
                    octaves: 3,
                },
                dust: Dust {
                    per_512px: 2.0,
                    strength: 0.2,
                    max_radius_px: 14.0,
                },
                ..base
            },
            "fast-scan" => Style {
                name: name.into(),
                description: "SEM at a fast scan rate: heavy shot noise, line jitter and line gain"
                    .into(),
                brightness: 0.48,
                contrast: 0.38,
                grain_shading: 0.08,
                gradient: 0.04,
                blur_sigma: 0.6,
                pore_darkness: 0.5,
                boundary: Boundary {
                    kind: BoundaryKind::BrightEdge,
                    strength: 0.22,
                    softness_px: 1.0,
                },
                noise: Noise {
                    gaussian_sigma: 0.03,
                    poisson_counts: 10.0,
                },
                texture: Texture {
                    amplitude: 0.02,
                    scale_px: 10.0,
                    octaves: 3,
                },
                scan: Scan {
                    line_jitter_px: 0.9,
                    line_gain: 0.03,
                },
                ..base
            },
            _ => {
                return Err(SynthError::UnknownStyle {
                    name: name.into(),
                    presets: Self::PRESETS.join(", "),
                });
            }
        };
        Ok(style)
    }

    /// Reads a style from TOML text; `origin` names the file in errors. A top-level `base = "<preset>"`
    /// starts from that preset (else from [`Style::default`]); the other keys override it. When the file
    /// gives no `name`, `default_name` is used.
    pub fn from_toml_str(
        text: &str,
        origin: &str,
        default_name: &str,
    ) -> Result<Style, SynthError> {
        let parse_err = |message: String| SynthError::StyleParse {
            origin: origin.to_owned(),
            message,
        };
        let mut table: toml::Table = toml::from_str(text).map_err(|e| parse_err(e.to_string()))?;
        let base = match table.remove("base") {
            None => Style::default(),
            Some(toml::Value::String(name)) => Style::preset(&name)?,
            Some(other) => {
                return Err(parse_err(format!(
                    "`base` must be the name of a preset ({}), found {other}",
                    Self::PRESETS.join(", ")
                )));
            }
        };
        let has_name = table.contains_key("name");
        let mut merged = toml::Table::try_from(&base).map_err(|e| parse_err(e.to_string()))?;
        merge_tables(&mut merged, table);
        let mut style: Style = toml::Value::Table(merged)
            .try_into()
            .map_err(|e: toml::de::Error| parse_err(e.message().to_owned()))?;
        if !has_name {
            style.name = default_name.to_owned();
        }
        style.validate().map_err(parse_err)?;
        Ok(style)
    }

    /// Reads a style file (see [`Style::from_toml_str`]); the default name is the file stem.
    pub fn from_toml_file(path: &Path) -> Result<Style, SynthError> {
        let text = std::fs::read_to_string(path).map_err(|source| SynthError::Io {
            path: path.to_owned(),
            source,
        })?;
        let stem = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "custom".into());
        Self::from_toml_str(&text, &path.display().to_string(), &stem)
    }

    /// A preset name, or else the path of a TOML style file.
    pub fn from_name_or_path(spec: &str) -> Result<Style, SynthError> {
        if Self::PRESETS.contains(&spec) {
            return Self::preset(spec);
        }
        let path = Path::new(spec);
        if path.extension().is_some_and(|e| e == "toml") || path.exists() {
            return Self::from_toml_file(path);
        }
        Self::preset(spec)
    }

    /// The style as TOML (all keys), e.g. to keep beside a generated dataset.
    pub fn to_toml_string(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_default()
    }

    /// Checks every number against its documented range; the message names the field.
    pub fn validate(&self) -> Result<(), String> {
        fn check(field: &str, v: f32, lo: f32, hi: f32) -> Result<(), String> {
            if v.is_finite() && (lo..=hi).contains(&v) {
                Ok(())
            } else {
                Err(format!("`{field}` = {v} is out of range {lo}..={hi}"))
            }
        }
        if self.name.is_empty()
            || !self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(format!(
                "`name` = {:?} must be non-empty letters, digits, `-` or `_` (it goes into file names)",
                self.name
            ));
        }
        check("brightness", self.brightness, 0.05, 0.95)?;
        check("contrast", self.contrast, 0.0, 1.5)?;
        check("grain_shading", self.grain_shading, 0.0, 0.5)?;
        check("gradient", self.gradient, 0.0, 1.0)?;
        check("vignetting", self.vignetting, 0.0, 1.0)?;
        check("charging", self.charging, 0.0, 1.0)?;
        check("blur_sigma", self.blur_sigma, 0.0, 20.0)?;
        check("pore_darkness", self.pore_darkness, 0.0, 1.0)?;
        check("boundary.strength", self.boundary.strength, 0.0, 1.0)?;
        check("boundary.softness_px", self.boundary.softness_px, 0.0, 5.0)?;
        check("noise.gaussian_sigma", self.noise.gaussian_sigma, 0.0, 0.5)?;
        check("noise.poisson_counts", self.noise.poisson_counts, 0.0, 1e6)?;
        check("texture.amplitude", self.texture.amplitude, 0.0, 0.5)?;
        check("texture.scale_px", self.texture.scale_px, 1.0, 2000.0)?;
        check("texture.octaves", self.texture.octaves as f32, 1.0, 8.0)?;
        check("scratches.per_512px", self.scratches.per_512px, 0.0, 100.0)?;
        check("scratches.strength", self.scratches.strength, -1.0, 1.0)?;
        check("dust.per_512px", self.dust.per_512px, 0.0, 100.0)?;
        check("dust.strength", self.dust.strength, 0.0, 1.0)?;
        check("dust.max_radius_px", self.dust.max_radius_px, 1.0, 100.0)?;
        check("scan.line_jitter_px", self.scan.line_jitter_px, 0.0, 5.0)?;
        check("scan.line_gain", self.scan.line_gain, 0.0, 0.2)?;
        Ok(())
    }
}

/// Overlays `over` onto `base`, descending into tables so `[noise] poisson_counts = 5` keeps the other
/// noise keys of the base.
fn merge_tables(base: &mut toml::Table, over: toml::Table) {
    for (key, value) in over {
        match (base.get_mut(&key), value) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge_tables(b, o),
            (_, value) => {
                base.insert(key, value);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_are_valid_and_round_trip_through_toml() {
        for name in Style::PRESETS {
            let style = Style::preset(name).unwrap();
            style.validate().unwrap();
            let text = style.to_toml_string();
            let back = Style::from_toml_str(&text, "round-trip", "x").unwrap();
            assert_eq!(back, style, "{name}");
        }
    }

    #[test]
    fn base_preset_with_overrides() {
        let text = "base = \"sem-se\"\nname = \"lab-b\"\n[noise]\npoisson_counts = 7.5\n";
        let s = Style::from_toml_str(text, "lab-b.toml", "ignored").unwrap();
        let se = Style::preset("sem-se").unwrap();
        assert_eq!(s.name, "lab-b");
        assert_eq!(s.noise.poisson_counts, 7.5);
        // Keys not overridden keep the base's values, inside the table too.
        assert_eq!(s.noise.gaussian_sigma, se.noise.gaussian_sigma);
        assert_eq!(s.boundary, se.boundary);
    }

    #[test]
    fn bad_style_files_name_the_field() {
        let err = Style::from_toml_str("contrst = 0.3\n", "lab.toml", "lab")
            .unwrap_err()
            .to_string();
        assert!(err.contains("lab.toml") && err.contains("contrst"), "{err}");
        let err = Style::from_toml_str("[noise]\ngaussian_sigma = 2.0\n", "lab.toml", "lab")
            .unwrap_err()
            .to_string();
        assert!(err.contains("noise.gaussian_sigma"), "{err}");
        let err = Style::from_toml_str("[boundary]\nkind = \"wavy\"\n", "lab.toml", "lab")
            .unwrap_err()
            .to_string();
        assert!(err.contains("kind") || err.contains("wavy"), "{err}");
        let err = Style::from_toml_str("base = \"tem\"\n", "lab.toml", "lab")
            .unwrap_err()
            .to_string();
        assert!(err.contains("tem") && err.contains("sem-se"), "{err}");
        assert!(Style::preset("nope").is_err());
    }
}
