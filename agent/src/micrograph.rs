//! Decoding micrograph files into normalised `f32` pixels.
//!
//! Map of the module:
//! - [`Normalisation`]: the ONE place that says how stored grey levels become network inputs
//!   (divide by the format's full scale, then `(v − mean) / std`); serde, so a model manifest carries it.
//! - [`Micrograph`]: a decoded single-channel image with its bit depth, its pixel size when the file
//!   states one, and the file it came from.
//! - [`MicrographError`]: why a file could not be used, always naming the file.
//!
//! Formats: PNG, TIFF (8/16-bit integer or 32-bit float, gray or RGB; only the first page of a
//! multi-page file), JPEG and BMP, all through the `image` crate. 16-bit data is converted straight to
//! `f32` so that none of its 65 536 levels are lost (SEM and EBSD detectors often deliver 12–16 bits).
//! Colour images become luminance with the Rec. 709 weights applied to the stored (gamma-encoded)
//! values, as the `image` crate and most viewers do; alpha is dropped.
//!
//! Pixel size: TIFF files may carry `XResolution` + `ResolutionUnit` (pixels per inch or per cm), which
//! become micrometres per pixel. When the unit is "none", an ImageJ description (`unit=micron`, `um`,
//! `nm`, `mm`) gives the unit instead, since ImageJ/Fiji store calibrated SEM images that way.

use std::io::Cursor;
use std::path::{Path, PathBuf};

use image::{DynamicImage, ImageDecoder, ImageError, ImageFormat, ImageReader};
use serde::{Deserialize, Serialize};

/// How stored grey levels become the numbers fed to a network.
///
/// Every pixel `raw` is first divided by the full scale of its storage type (255 for 8-bit, 65 535 for
/// 16-bit, 1 for float), giving `u ∈ [0, 1]`, and then standardised: `(u − mean) / std`. The defaults
/// (mean 0.5, std 0.25) map the full grey range to [−2, 2]. A model is trained with one normalisation
/// and must be fed with the same one, so its manifest stores these numbers.
///
/// With `per_image = true` each image is standardised by its own mean and standard deviation instead
/// (`mean` and `std` are then not used): two microscopes, or two sessions of one, that set brightness
/// and contrast differently give the network the same numbers for the same microstructure. A
/// low-contrast image (a hazy SEM style spans a fifth of the grey range) otherwise reaches the network
/// as values five times smaller than those it was trained on. A flat image's deviation is floored at
/// [`MIN_IMAGE_STD`] so noise is not blown up to full scale.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Normalisation {
    /// Subtracted from the [0, 1] value.
    pub mean: f32,
    /// Divides the centred value; must be positive and finite.
    pub std: f32,
    /// Standardise every image by its own statistics instead of `mean` and `std`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub per_image: bool,
}

/// The smallest standard deviation (of grey levels in [0, 1]) a per-image normalisation divides by:
/// a quarter of an 8-bit level.
pub const MIN_IMAGE_STD: f32 = 1.0 / 1024.0;

impl Default for Normalisation {
    fn default() -> Self {
        Self {
            mean: 0.5,
            std: 0.25,
            per_image: false,
        }
    }
}

impl Normalisation {
    /// Checks that `std` is positive and both numbers are finite.
    pub fn validate(&self) -> Result<(), MicrographError> {
        if self.mean.is_finite() && self.std.is_finite() && self.std > 0.0 {
            Ok(())
        } else {
            Err(MicrographError::BadNormalisation {
                mean: self.mean,
                std: self.std,
            })
        }
    }

    /// Standardisation by each image's own statistics (see the type's docs).
    pub fn per_image() -> Self {
        Self {
            per_image: true,
            ..Self::default()
        }
    }

    /// The fixed normalisation to apply to one image whose grey levels (in [0, 1]) are `unit`: itself,
    /// or with `per_image`, the image's own mean and (floored) standard deviation. Accumulates in f64
    /// so a 16-megapixel image's statistics are exact to f32.
    pub fn for_image(&self, unit: &[f32]) -> Self {
        if !self.per_image || unit.is_empty() {
            return Self {
                per_image: false,
                ..*self
            };
        }
        let n = unit.len() as f64;
        let mean = unit.iter().map(|&u| f64::from(u)).sum::<f64>() / n;
        let var = unit
            .iter()
            .map(|&u| (f64::from(u) - mean).powi(2))
            .sum::<f64>()
            / n;
        Self {
            mean: mean as f32,
            std: (var.sqrt() as f32).max(MIN_IMAGE_STD),
            per_image: false,
        }
    }

    /// Network input for a value already scaled to [0, 1] (with `per_image`, call
    /// [`Normalisation::for_image`] first: this applies `mean` and `std` as they are).
    #[inline]
    pub fn apply(&self, unit: f32) -> f32 {
        (unit - self.mean) / self.std
    }

    /// Network inputs for one image's stored values `raw` (row-major) of a format whose full scale
    /// is `full_scale`, in place of `raw`, and the fixed normalisation that was applied (with
    /// `per_image`, the image's own statistics). The one path from grey levels to inputs, so a
    /// per-image model is fed the same way by every caller.
    pub fn inputs(&self, mut raw: Vec<f32>, full_scale: f32) -> (Vec<f32>, Self) {
        for v in &mut raw {
            *v /= full_scale;
        }
        let applied = self.for_image(&raw);
        for v in &mut raw {
            *v = applied.apply(*v);
        }
        (raw, applied)
    }

    /// Back from a network input to the [0, 1] grey level (for display and contact sheets).
    #[inline]
    pub fn invert(&self, value: f32) -> f32 {
        value * self.std + self.mean
    }
}

/// Why a micrograph could not be read; every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum MicrographError {
    #[error("{path}: cannot read micrograph: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: unsupported image format ({detail}); use PNG, TIFF, JPEG or BMP")]
    UnsupportedFormat { path: PathBuf, detail: String },
    #[error("{path}: unsupported colour type {colour}")]
    UnsupportedColour { path: PathBuf, colour: String },
    #[error("{path}: image has zero size ({width}×{height})")]
    ZeroSize {
        path: PathBuf,
        width: u32,
        height: u32,
    },
    #[error("{path}: truncated or corrupt image: {message}")]
    Corrupt { path: PathBuf, message: String },
    /// Refused before decoding: the file, or the image its header announces, is above the limits
    /// ([`MAX_FILE_BYTES`], [`MAX_SIDE`], [`MAX_PIXELS`], [`MAX_DECODE_BYTES`]).
    #[error("{path}: image too large: {what}")]
    TooLarge { path: PathBuf, what: String },
    #[error(
        "normalisation must have a finite mean and a positive finite std, found mean {mean}, std {std}"
    )]
    BadNormalisation { mean: f32, std: f32 },
    #[error("{path}: pixel buffer of {len} values does not match {width}×{height}")]
    BufferSize {
        path: PathBuf,
        width: u32,
        height: u32,
        len: usize,
    },
}

impl MicrographError {
    /// The file the error is about (`None` for a bad normalisation or an in-memory image).
    pub fn path(&self) -> Option<&Path> {
        use MicrographError::*;
        match self {
            Read { path, .. }
            | UnsupportedFormat { path, .. }
            | UnsupportedColour { path, .. }
            | ZeroSize { path, .. }
            | Corrupt { path, .. }
            | TooLarge { path, .. }
            | BufferSize { path, .. } => Some(path.as_path()).filter(|p| !p.as_os_str().is_empty()),
            BadNormalisation { .. } => None,
        }
    }
}

/// A decoded single-channel micrograph: normalised pixels, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct Micrograph {
    pub width: u32,
    pub height: u32,
    /// Row-major, `width × height` values after [`Normalisation`].
    pub pixels: Vec<f32>,
    /// Bits per sample of the stored data: 8, 16 or 32 (float).
    pub bit_depth: u8,
    /// Micrometres per pixel, when the file (or the dataset) states it.
    pub pixel_size_um: Option<f64>,
    /// The file it came from (empty for images made in memory).
    pub path: PathBuf,
    /// The normalisation that produced `pixels`, so they can be turned back into grey levels (for a
    /// per-image normalisation: the image's own mean and std, as applied).
    pub normalisation: Normalisation,
}

/// Largest micrograph file read (an uncompressed 16-bit RGB TIFF of [`MAX_PIXELS`] is 384 MiB).
pub const MAX_FILE_BYTES: u64 = 512 * 1024 * 1024;
/// Largest width or height.
pub const MAX_SIDE: u32 = 65_536;
/// Largest number of pixels (8192 × 8192): the decoded image and its f32 copies stay near 1 GB. A
/// small compressed file can announce far more (an image bomb); it is refused from its header.
pub const MAX_PIXELS: u64 = 1 << 26;
/// Largest buffer the image decoder may allocate.
pub const MAX_DECODE_BYTES: u64 = 512 * 1024 * 1024;

/// Reads a micrograph file, refusing one above [`MAX_FILE_BYTES`] without reading it whole.
pub fn read_file(path: &Path) -> Result<Vec<u8>, MicrographError> {
    use std::io::Read;
    let read_err = |source| MicrographError::Read {
        path: path.to_owned(),
        source,
    };
    let file = std::fs::File::open(path).map_err(read_err)?;
    let mut bytes = Vec::new();
    file.take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(read_err)?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(MicrographError::TooLarge {
            path: path.to_owned(),
            what: format!("file above the limit of {MAX_FILE_BYTES} bytes"),
        });
    }
    Ok(bytes)
}

/// Rec. 709 luma weights, applied to the stored values.
const LUMA: [f32; 3] = [0.2126, 0.7152, 0.0722];

impl Micrograph {
    /// Reads a file with the default [`Normalisation`].
    pub fn load(path: &Path) -> Result<Self, MicrographError> {
        Self::load_with(path, &Normalisation::default())
    }

    /// Reads a file with the given normalisation.
    pub fn load_with(path: &Path, norm: &Normalisation) -> Result<Self, MicrographError> {
        let bytes = read_file(path)?;
        Self::decode(&bytes, path, norm)
    }

    /// Decodes an in-memory file; `path` is used for format hints by extension and in errors.
    pub fn decode(
        bytes: &[u8],
        path: &Path,
        norm: &Normalisation,
    ) -> Result<Self, MicrographError> {
        norm.validate()?;
        let corrupt = |message: String| MicrographError::Corrupt {
            path: path.to_owned(),
            message,
        };
        // Content first (magic bytes), extension only as a fallback: files are often misnamed.
        let format = image::guess_format(bytes)
            .ok()
            .or_else(|| ImageFormat::from_path(path).ok());
        let Some(format) = format else {
            return Err(MicrographError::UnsupportedFormat {
                path: path.to_owned(),
                detail: "content not recognised as an image".into(),
            });
        };
        if !matches!(
            format,
            ImageFormat::Png | ImageFormat::Tiff | ImageFormat::Jpeg | ImageFormat::Bmp
        ) {
            return Err(MicrographError::UnsupportedFormat {
                path: path.to_owned(),
                detail: format!("{format:?}"),
            });
        }
        let too_large = |what: String| MicrographError::TooLarge {
            path: path.to_owned(),
            what,
        };
        let image_err = |e: ImageError| match e {
            ImageError::Limits(l) => too_large(format!("{l} (decoder limits)")),
            ImageError::Unsupported(u) => MicrographError::UnsupportedColour {
                path: path.to_owned(),
                colour: u.to_string(),
            },
            ImageError::IoError(io) => corrupt(format!("{io} (file truncated?)")),
            other => corrupt(other.to_string()),
        };
        if bytes.len() as u64 > MAX_FILE_BYTES {
            return Err(too_large(format!(
                "{} bytes, above the limit of {MAX_FILE_BYTES}",
                bytes.len()
            )));
        }
        let mut reader = ImageReader::new(Cursor::new(bytes));
        reader.set_format(format);
        let mut limits = image::Limits::default();
        limits.max_image_width = Some(MAX_SIDE);
        limits.max_image_height = Some(MAX_SIDE);
        limits.max_alloc = Some(MAX_DECODE_BYTES);
        reader.limits(limits);
        // The header first: the size it announces is checked before any pixel is decoded.
        let decoder = reader.into_decoder().map_err(image_err)?;
        let (w, h) = decoder.dimensions();
        if w > MAX_SIDE || h > MAX_SIDE || u64::from(w) * u64::from(h) > MAX_PIXELS {
            return Err(too_large(format!(
                "{w} × {h} pixels, above the limit of {MAX_PIXELS} pixels or {MAX_SIDE} a side"
            )));
        }
        let img = DynamicImage::from_decoder(decoder).map_err(image_err)?;
        let (width, height) = (img.width(), img.height());
        if width == 0 || height == 0 {
            return Err(MicrographError::ZeroSize {
                path: path.to_owned(),
                width,
                height,
            });
        }
        let (raw, full_scale, bit_depth) =
            luminance(img).ok_or_else(|| MicrographError::UnsupportedColour {
                path: path.to_owned(),
                colour: "an unknown colour type".into(),
            })?;
        let (pixels, applied) = norm.inputs(raw, full_scale);
        let pixel_size_um = if format == ImageFormat::Tiff {
            tiff_pixel_size_um(bytes, path)
        } else {
            None
        };
        Ok(Self {
            width,
            height,
            pixels,
            bit_depth,
            pixel_size_um,
            path: path.to_owned(),
            normalisation: applied,
        })
    }

    /// Builds a micrograph from grey levels already in [0, 1] (e.g. a synthetic image), row-major.
    pub fn from_unit(
        width: u32,
        height: u32,
        unit: &[f32],
        norm: &Normalisation,
    ) -> Result<Self, MicrographError> {
        norm.validate()?;
        if unit.len() != width as usize * height as usize {
            return Err(MicrographError::BufferSize {
                path: PathBuf::new(),
                width,
                height,
                len: unit.len(),
            });
        }
        if width == 0 || height == 0 {
            return Err(MicrographError::ZeroSize {
                path: PathBuf::new(),
                width,
                height,
            });
        }
        let (pixels, applied) = norm.inputs(unit.to_vec(), 1.0);
        Ok(Self {
            width,
            height,
            pixels,
            bit_depth: 32,
            pixel_size_um: None,
            path: PathBuf::new(),
            normalisation: applied,
        })
    }

    /// Normalised value at (x, y).
    #[inline]
    pub fn get(&self, x: u32, y: u32) -> f32 {
        self.pixels[y as usize * self.width as usize + x as usize]
    }

    /// Grey levels back in [0, 1] (inverse of the normalisation), for display.
    pub fn unit_pixels(&self) -> Vec<f32> {
        self.pixels
            .iter()
            .map(|&v| self.normalisation.invert(v))
            .collect()
    }
}

/// Stored values as `f32` (not yet scaled), the format's full scale and the bit depth.
/// `None` for a colour type this version does not know (`DynamicImage` is non-exhaustive).
fn luminance(img: DynamicImage) -> Option<(Vec<f32>, f32, u8)> {
    fn luma3(p: [f32; 3]) -> f32 {
        LUMA[0] * p[0] + LUMA[1] * p[1] + LUMA[2] * p[2]
    }
    let out = match img {
        DynamicImage::ImageLuma8(i) => {
            (i.into_raw().into_iter().map(f32::from).collect(), 255.0, 8)
        }
        DynamicImage::ImageLumaA8(i) => (i.pixels().map(|p| f32::from(p[0])).collect(), 255.0, 8),
        DynamicImage::ImageRgb8(i) => (
            i.pixels().map(|p| luma3(p.0.map(f32::from))).collect(),
            255.0,
            8,
        ),
        DynamicImage::ImageRgba8(i) => (
            i.pixels()
                .map(|p| luma3([p[0], p[1], p[2]].map(f32::from)))
                .collect(),
            255.0,
            8,
        ),
        DynamicImage::ImageLuma16(i) => (
            i.into_raw().into_iter().map(f32::from).collect(),
            65535.0,
            16,
        ),
        DynamicImage::ImageLumaA16(i) => {
            (i.pixels().map(|p| f32::from(p[0])).collect(), 65535.0, 16)
        }
        DynamicImage::ImageRgb16(i) => (
            i.pixels().map(|p| luma3(p.0.map(f32::from))).collect(),
            65535.0,
            16,
        ),
        DynamicImage::ImageRgba16(i) => (
            i.pixels()
                .map(|p| luma3([p[0], p[1], p[2]].map(f32::from)))
                .collect(),
            65535.0,
            16,
        ),
        DynamicImage::ImageRgb32F(i) => (i.pixels().map(|p| luma3(p.0)).collect(), 1.0, 32),
        DynamicImage::ImageRgba32F(i) => (
            i.pixels().map(|p| luma3([p[0], p[1], p[2]])).collect(),
            1.0,
            32,
        ),
        _ => return None,
    };
    Some(out)
}

/// Micrometres per pixel from the first page's resolution tags, or `None` when absent or meaningless.
/// A tag that cannot be parsed is not an error: the pixels are fine, only the calibration is missing.
fn tiff_pixel_size_um(bytes: &[u8], path: &Path) -> Option<f64> {
    use tiff::decoder::{Decoder, ifd::Value};
    use tiff::tags::Tag;

    let mut dec = match Decoder::new(Cursor::new(bytes)) {
        Ok(d) => d,
        Err(e) => {
            tracing::debug!(path = %path.display(), error = %e, "no TIFF tags read");
            return None;
        }
    };
    let per_unit = match dec.find_tag(Tag::XResolution).ok().flatten()? {
        Value::Rational(n, d) if d != 0 => f64::from(n) / f64::from(d),
        Value::Rational(..) => return None,
        other => other.into_f64().ok()?,
    };
    if !(per_unit.is_finite() && per_unit > 0.0) {
        return None;
    }
    // TIFF 6.0: ResolutionUnit defaults to 2 (inch) when absent.
    let unit = dec
        .find_tag_unsigned::<u16>(Tag::ResolutionUnit)
        .ok()
        .flatten()
        .unwrap_or(2);
    let unit_um = match unit {
        2 => 25_400.0,
        3 => 10_000.0,
        _ => {
            let desc = dec
                .find_tag(Tag::ImageDescription)
                .ok()
                .flatten()
                .and_then(|v| v.into_string().ok())?;
            imagej_unit_um(&desc)?
        }
    };
    Some(unit_um / per_unit)
}

/// The length of ImageJ's `unit=` in micrometres, from an ImageJ `ImageDescription`.
fn imagej_unit_um(description: &str) -> Option<f64> {
    if !description.starts_with("ImageJ=") {
        return None;
    }
    let unit = description
        .lines()
        .find_map(|l| l.strip_prefix("unit="))?
        .trim();
    match unit {
        "micron" | "microns" | "um" | "µm" | "\\u00B5m" => Some(1.0),
        "nm" | "nanometer" | "nanometers" => Some(1e-3),
        "mm" | "millimeter" | "millimeters" => Some(1e3),
        "cm" => Some(1e4),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{GrayImage, ImageBuffer, Luma, Rgb, RgbImage};
    use tiff::encoder::{Rational, TiffEncoder, colortype};
    use tiff::tags::ResolutionUnit;

    fn close(a: f32, b: f32, tol: f32) -> bool {
        (a - b).abs() <= tol
    }

    #[test]
    fn png_8bit_is_scaled_and_standardised() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.png");
        GrayImage::from_raw(3, 1, vec![0, 128, 255])
            .unwrap()
            .save(&p)
            .unwrap();
        let m = Micrograph::load(&p).unwrap();
        assert_eq!((m.width, m.height, m.bit_depth), (3, 1, 8));
        // (0/255 − 0.5)/0.25 = −2; (128/255 − 0.5)/0.25 = 0.007843; (1 − 0.5)/0.25 = 2.
        assert!(close(m.pixels[0], -2.0, 1e-6));
        assert!(close(m.pixels[1], 0.007_843_1, 1e-5));
        assert!(close(m.pixels[2], 2.0, 1e-6));
        assert_eq!(m.pixel_size_um, None);
        let back = m.unit_pixels();
        assert!(close(back[1], 128.0 / 255.0, 1e-6));
    }

    #[test]
    fn per_image_normalisation_gives_one_pattern_the_same_inputs_at_any_brightness_and_contrast() {
        let dir = tempfile::tempdir().unwrap();
        let pattern = [0u8, 1, 2, 3, 2, 1, 0, 3];
        let norm = Normalisation::per_image();
        let mut seen = Vec::new();
        // Full contrast, and a hazy copy: a fifth of the range, shifted up.
        for (name, scale, offset) in [("full.png", 80u8, 0u8), ("hazy.png", 16, 150)] {
            let p = dir.path().join(name);
            let raw: Vec<u8> = pattern.iter().map(|&v| offset + v * scale).collect();
            GrayImage::from_raw(4, 2, raw.clone())
                .unwrap()
                .save(&p)
                .unwrap();
            let m = Micrograph::load_with(&p, &norm).unwrap();
            let mean = m.pixels.iter().sum::<f32>() / 8.0;
            let var = m.pixels.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / 8.0;
            assert!(
                close(mean, 0.0, 1e-5) && close(var, 1.0, 1e-4),
                "{mean} {var}"
            );
            // The stored normalisation is the one applied: grey levels come back.
            let back = m.unit_pixels();
            assert!(close(back[3], f32::from(raw[3]) / 255.0, 1e-5));
            assert!(!m.normalisation.per_image);
            seen.push(m.pixels);
        }
        for (a, b) in seen[0].iter().zip(&seen[1]) {
            assert!(close(*a, *b, 1e-4), "{a} vs {b}");
        }
        // A flat image: its deviation is floored, so it becomes zeros instead of NaN or noise × 1e6.
        let flat = Micrograph::from_unit(2, 2, &[0.3; 4], &norm).unwrap();
        assert!(flat.pixels.iter().all(|&v| v == 0.0));
        // The manifest form: absent means false; true is written out.
        let fixed: Normalisation = toml::from_str("mean = 0.5\nstd = 0.25\n").unwrap();
        assert_eq!(fixed, Normalisation::default());
        let text = toml::to_string(&norm).unwrap();
        assert!(text.contains("per_image = true"), "{text}");
        assert_eq!(toml::from_str::<Normalisation>(&text).unwrap(), norm);
    }

    #[test]
    fn custom_normalisation_and_bad_std() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.png");
        GrayImage::from_raw(1, 1, vec![51])
            .unwrap()
            .save(&p)
            .unwrap();
        let n = Normalisation {
            mean: 0.0,
            std: 1.0,
            per_image: false,
        };
        let m = Micrograph::load_with(&p, &n).unwrap();
        assert!(close(m.pixels[0], 0.2, 1e-6)); // 51/255 = 0.2
        let bad = Normalisation {
            mean: 0.0,
            std: 0.0,
            per_image: false,
        };
        assert!(matches!(
            Micrograph::load_with(&p, &bad),
            Err(MicrographError::BadNormalisation { .. })
        ));
        let toml_text = "mean = 0.45\nstd = 0.2\n";
        let parsed: Normalisation = toml::from_str(toml_text).unwrap();
        assert_eq!(
            parsed,
            Normalisation {
                mean: 0.45,
                std: 0.2,
                per_image: false,
            }
        );
    }

    #[test]
    fn tiff_16bit_keeps_levels_that_8bit_would_lose() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("deep.tif");
        // 1000 and 1001 are different 16-bit levels but the same 8-bit level (1000/257 ≈ 3.89 → 4).
        let data: Vec<u16> = vec![1000, 1001, 65535, 0];
        ImageBuffer::<Luma<u16>, _>::from_raw(2, 2, data)
            .unwrap()
            .save(&p)
            .unwrap();
        let m = Micrograph::load(&p).unwrap();
        assert_eq!(m.bit_depth, 16);
        let u = m.unit_pixels();
        assert!(close(u[0], 1000.0 / 65535.0, 1e-6));
        assert!(close(u[1], 1001.0 / 65535.0, 1e-6));
        assert!(u[1] > u[0]);
        assert!(close(u[2], 1.0, 1e-6));
    }

    #[test]
    fn tiff_resolution_tags_give_pixel_size_and_first_page_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("two_pages.tif");
        {
            let file = std::fs::File::create(&p).unwrap();
            let mut enc = TiffEncoder::new(file).unwrap();
            // Page 1: 2×1, 16-bit, 20 000 pixels per cm → 10 000 µm / 20 000 = 0.5 µm per pixel.
            let mut img = enc.new_image::<colortype::Gray16>(2, 1).unwrap();
            img.resolution(ResolutionUnit::Centimeter, Rational { n: 20_000, d: 1 });
            img.write_data(&[300, 40_000]).unwrap();
            // Page 2: different size and content; must be ignored.
            enc.write_image::<colortype::Gray16>(3, 1, &[1, 2, 3])
                .unwrap();
        }
        let m = Micrograph::load(&p).unwrap();
        assert_eq!((m.width, m.height), (2, 1));
        let u = m.unit_pixels();
        assert!(close(u[0], 300.0 / 65535.0, 1e-6));
        let px = m.pixel_size_um.unwrap();
        assert!((px - 0.5).abs() < 1e-12, "{px}");

        // Inches: 25 400 px per inch → 1 µm per pixel.
        let p2 = dir.path().join("inch.tif");
        {
            let file = std::fs::File::create(&p2).unwrap();
            let mut enc = TiffEncoder::new(file).unwrap();
            let mut img = enc.new_image::<colortype::Gray8>(1, 1).unwrap();
            img.resolution(ResolutionUnit::Inch, Rational { n: 25_400, d: 1 });
            img.write_data(&[7]).unwrap();
        }
        let m2 = Micrograph::load(&p2).unwrap();
        assert!((m2.pixel_size_um.unwrap() - 1.0).abs() < 1e-12);
        assert_eq!(m2.bit_depth, 8);
    }

    #[test]
    fn tiff_without_unit_has_no_pixel_size_unless_imagej_says() {
        assert_eq!(imagej_unit_um("ImageJ=1.53t\nunit=micron\n"), Some(1.0));
        assert_eq!(imagej_unit_um("ImageJ=1.53t\nunit=nm\n"), Some(1e-3));
        assert_eq!(imagej_unit_um("unit=micron\n"), None);
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("plain.tif");
        {
            let file = std::fs::File::create(&p).unwrap();
            let mut enc = TiffEncoder::new(file).unwrap();
            // The encoder writes XResolution 1/1 with ResolutionUnit "none" by default.
            enc.write_image::<colortype::Gray8>(1, 1, &[7]).unwrap();
        }
        assert_eq!(Micrograph::load(&p).unwrap().pixel_size_um, None);
    }

    #[test]
    fn rgb_jpeg_becomes_luminance() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.jpg");
        // A flat colour survives JPEG almost exactly (one 8×8 block, DC only).
        let img = RgbImage::from_pixel(8, 8, Rgb([200, 100, 50]));
        img.save(&p).unwrap();
        let m = Micrograph::load(&p).unwrap();
        assert_eq!((m.width, m.height, m.bit_depth), (8, 8, 8));
        // 0.2126·200 + 0.7152·100 + 0.0722·50 = 42.52 + 71.52 + 3.61 = 117.65 → /255 = 0.4614.
        let u = m.unit_pixels();
        for v in u {
            assert!(close(v, 117.65 / 255.0, 4.0 / 255.0), "{v}");
        }
    }

    #[test]
    fn bmp_reads() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("b.bmp");
        RgbImage::from_pixel(2, 2, Rgb([10, 10, 10]))
            .save(&p)
            .unwrap();
        let m = Micrograph::load(&p).unwrap();
        assert_eq!((m.width, m.height), (2, 2));
        assert!(close(m.unit_pixels()[3], 10.0 / 255.0, 1e-5));
    }

    #[test]
    fn truncated_png_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("cut.png");
        GrayImage::from_fn(64, 64, |x, y| Luma([(x * 7 + y * 13) as u8]))
            .save(&p)
            .unwrap();
        let bytes = std::fs::read(&p).unwrap();
        std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
        let err = Micrograph::load(&p).unwrap_err();
        assert!(matches!(err, MicrographError::Corrupt { .. }), "{err:?}");
        assert!(err.to_string().contains("cut.png"), "{err}");
    }

    /// A PNG that is all header: `width × height` 8-bit grey, and no pixel data to speak of.
    fn png_header(width: u32, height: u32) -> Vec<u8> {
        fn crc32(bytes: &[u8]) -> u32 {
            let mut c = !0u32;
            for &b in bytes {
                c ^= u32::from(b);
                for _ in 0..8 {
                    c = if c & 1 == 1 {
                        0xEDB8_8320 ^ (c >> 1)
                    } else {
                        c >> 1
                    };
                }
            }
            !c
        }
        let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
        let mut chunk = |kind: &[u8], data: &[u8]| {
            out.extend_from_slice(&(data.len() as u32).to_be_bytes());
            let mut body = kind.to_vec();
            body.extend_from_slice(data);
            out.extend_from_slice(&body);
            out.extend_from_slice(&crc32(&body).to_be_bytes());
        };
        let mut ihdr = Vec::new();
        ihdr.extend_from_slice(&width.to_be_bytes());
        ihdr.extend_from_slice(&height.to_be_bytes());
        ihdr.extend_from_slice(&[8, 0, 0, 0, 0]);
        chunk(b"IHDR", &ihdr);
        // An empty zlib stream: a decoder that reads on gets too little data, not a bomb.
        chunk(b"IDAT", &[0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01]);
        chunk(b"IEND", &[]);
        out
    }

    /// Issue 17: an image bomb (a small PNG whose header claims 20000 × 20000 pixels: 400 MB of
    /// grey levels, then several f32 copies, > 8 GB) was decoded with the image crate's default
    /// limits. It must be refused from its header, with an error naming the file.
    #[test]
    fn an_image_bomb_is_refused_from_its_header_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bomb.png");
        std::fs::write(&p, png_header(20_000, 20_000)).unwrap();
        let err = Micrograph::load(&p).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("bomb.png") && text.contains("too large"),
            "{text}"
        );
        assert_eq!(err.path(), Some(p.as_path()));
        // A narrow but very long strip is refused too.
        let err = Micrograph::decode(&png_header(1, 4_000_000), &p, &Normalisation::default())
            .unwrap_err();
        assert!(err.to_string().contains("too large"), "{err}");
    }

    #[test]
    fn missing_and_non_image_files_are_errors_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.png");
        let err = Micrograph::load(&missing).unwrap_err();
        assert!(matches!(err, MicrographError::Read { .. }));
        assert!(err.to_string().contains("nope.png"));
        let text = dir.path().join("notes.txt");
        std::fs::write(&text, "not an image").unwrap();
        let err = Micrograph::load(&text).unwrap_err();
        assert!(
            matches!(err, MicrographError::UnsupportedFormat { .. }),
            "{err:?}"
        );
        assert!(err.to_string().contains("notes.txt"));
    }

    #[test]
    fn from_unit_checks_the_buffer() {
        let n = Normalisation::default();
        assert!(Micrograph::from_unit(2, 2, &[0.0; 3], &n).is_err());
        let m = Micrograph::from_unit(2, 1, &[0.5, 1.0], &n).unwrap();
        assert_eq!(m.pixels, vec![0.0, 2.0]);
    }
}
