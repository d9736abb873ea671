//! Reading the masks labs actually have: whatever their annotation tool wrote, turned into class
//! indices by the classes' colours.
//!
//! - 8-bit grey: the values are class indices (255 = ignore). A two-class set whose masks hold only
//!   0 and 255 (a binary mask) reads 255 as class 1.
//! - 16-bit grey: indices too; a mask whose values are all multiples of 257 (8-bit values scaled up)
//!   is scaled down first.
//! - RGB, RGBA, 8 or 16 bits, and palette PNGs (which the decoder expands to RGB): a grey-looking
//!   colour image (R = G = B everywhere) reads as grey; otherwise each pixel takes the class whose
//!   colour is nearest, if no channel differs by more than the tolerance. Fully transparent pixels are
//!   unlabelled (ignore). Colours matching no class become ignore and are counted, per colour, so the
//!   caller can say which colours are missing from the classes file.

use std::collections::BTreeMap;
use std::path::Path;

use image::{DynamicImage, ImageReader};

use super::{Mask, MaskError};
use crate::classes::ClassDef;

pub use crate::classes::DEFAULT_COLOR_TOLERANCE as DEFAULT_TOLERANCE;

/// Pixel value of unlabelled pixels (see `crate::dataset::IGNORE`, the same value).
const IGNORE: u8 = 255;

/// How a mask file encoded its classes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// 8-bit class indices.
    Index8,
    /// 16-bit class indices.
    Index16,
    /// 0/255 masks of a two-class set: 255 read as class 1.
    Binary,
    /// Colours (RGB, RGBA or palette) mapped through the class colours.
    Colour,
}

impl Encoding {
    pub fn describe(self) -> &'static str {
        match self {
            Encoding::Index8 => "8-bit class indices",
            Encoding::Index16 => "16-bit class indices",
            Encoding::Binary => "binary 0/255 (255 read as class 1)",
            Encoding::Colour => "colours mapped to classes",
        }
    }
}

/// A mask read from whatever its file held.
#[derive(Debug, Clone)]
pub struct LabelMask {
    pub mask: Mask,
    pub encoding: Encoding,
    /// Colours that matched no class (now ignore), with their pixel counts, most frequent first.
    pub unmapped: Vec<([u8; 3], u64)>,
    /// Fully transparent pixels (now ignore).
    pub transparent: u64,
}

/// Reads a mask file of any supported kind and maps it to class indices with `classes`.
pub fn read(path: &Path, classes: &[ClassDef], tolerance: u8) -> Result<LabelMask, MaskError> {
    let img = decode(path)?;
    Ok(from_image(img, classes, tolerance))
}

/// Decodes a mask file (PNG, TIFF, BMP, …) without interpreting it.
pub fn decode(path: &Path) -> Result<DynamicImage, MaskError> {
    let read_err = |message: String| MaskError::Read {
        path: path.to_owned(),
        message,
    };
    ImageReader::open(path)
        .map_err(|e| read_err(e.to_string()))?
        .with_guessed_format()
        .map_err(|e| read_err(e.to_string()))?
        .decode()
        .map_err(|e| read_err(e.to_string()))
}

/// The distinct colours of a decoded colour mask with their pixel counts (transparent pixels left
/// out), most frequent first; `None` for a grey mask. Used to make classes for a set that has none.
pub fn colours(img: &DynamicImage) -> Option<Vec<([u8; 3], u64)>> {
    let (rgba, _) = rgba8(img)?;
    let mut counts: BTreeMap<[u8; 3], u64> = BTreeMap::new();
    for p in rgba.chunks_exact(4) {
        if p[3] != 0 {
            *counts.entry([p[0], p[1], p[2]]).or_default() += 1;
        }
    }
    Some(sorted(counts))
}

fn sorted(counts: BTreeMap<[u8; 3], u64>) -> Vec<([u8; 3], u64)> {
    let mut v: Vec<_> = counts.into_iter().collect();
    v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    v
}

/// RGBA bytes of a colour image (16-bit channels reduced to 8), or `None` when the image is grey (one
/// channel, or R = G = B at every pixel). The flag says whether the image had 16-bit channels.
fn rgba8(img: &DynamicImage) -> Option<(Vec<u8>, bool)> {
    let wide = matches!(
        img,
        DynamicImage::ImageRgb16(_) | DynamicImage::ImageRgba16(_)
    );
    match img {
        DynamicImage::ImageLuma8(_)
        | DynamicImage::ImageLuma16(_)
        | DynamicImage::ImageLumaA8(_)
        | DynamicImage::ImageLumaA16(_) => None,
        other => {
            let rgba = other.to_rgba8().into_raw();
            let grey = rgba
                .chunks_exact(4)
                .all(|p| p[0] == p[1] && p[1] == p[2] && p[3] == 255);
            (!grey).then_some((rgba, wide))
        }
    }
}

/// Maps a decoded mask to class indices (see the module docs for the rules).
pub fn from_image(img: DynamicImage, classes: &[ClassDef], tolerance: u8) -> LabelMask {
    let (width, height) = (img.width(), img.height());
    let k = classes.len();
    if let Some((rgba, _)) = rgba8(&img) {
        let mut data = Vec::with_capacity(rgba.len() / 4);
        let mut unmapped: BTreeMap<[u8; 3], u64> = BTreeMap::new();
        let mut transparent = 0;
        // Colour → class, memoised: masks hold few distinct colours.
        let mut seen: BTreeMap<[u8; 3], u8> = BTreeMap::new();
        for p in rgba.chunks_exact(4) {
            if p[3] == 0 {
                transparent += 1;
                data.push(IGNORE);
                continue;
            }
            let c = [p[0], p[1], p[2]];
            let class = *seen
                .entry(c)
                .or_insert_with(|| nearest_class(c, classes, tolerance).unwrap_or(IGNORE));
            if class == IGNORE {
                *unmapped.entry(c).or_default() += 1;
            }
            data.push(class);
        }
        return LabelMask {
            mask: Mask::new(width, height, data),
            encoding: Encoding::Colour,
            unmapped: sorted(unmapped),
            transparent,
        };
    }
    // Grey: indices, 8 or 16 bits (the grey of a grey-looking colour image is its red channel).
    let (values, sixteen): (Vec<u16>, bool) = match img {
        DynamicImage::ImageLuma16(g) => (g.into_raw(), true),
        DynamicImage::ImageLumaA16(g) => {
            (g.into_raw().chunks_exact(2).map(|p| p[0]).collect(), true)
        }
        DynamicImage::ImageLuma8(g) => (g.into_raw().into_iter().map(u16::from).collect(), false),
        other => (
            other
                .to_luma8()
                .into_raw()
                .into_iter()
                .map(u16::from)
                .collect(),
            false,
        ),
    };
    let mut encoding = if sixteen {
        Encoding::Index16
    } else {
        Encoding::Index8
    };
    let values: Vec<u16> = if sixteen
        && values.iter().any(|&v| usize::from(v) >= k)
        && values.iter().all(|&v| v % 257 == 0)
    {
        values.into_iter().map(|v| v / 257).collect()
    } else {
        values
    };
    let binary = k == 2 && values.contains(&255) && values.iter().all(|&v| v == 0 || v == 255);
    if binary {
        encoding = Encoding::Binary;
    }
    let mut unmapped: BTreeMap<[u8; 3], u64> = BTreeMap::new();
    let data = values
        .into_iter()
        .map(|v| match v {
            255 if binary => 1,
            v if usize::from(v) < k || v == u16::from(IGNORE) => v as u8,
            // Out of range: counted, and kept (254 at most) so that a dataset check names the value.
            v => {
                let g = v.min(254) as u8;
                *unmapped.entry([g, g, g]).or_default() += 1;
                g
            }
        })
        .collect();
    LabelMask {
        mask: Mask::new(width, height, data),
        encoding,
        unmapped: sorted(unmapped),
        transparent: 0,
    }
}

/// The class whose colour is nearest to `c` (sum of squared differences), if no channel of it differs
/// by more than `tolerance`.
fn nearest_class(c: [u8; 3], classes: &[ClassDef], tolerance: u8) -> Option<u8> {
    classes
        .iter()
        .filter(|d| {
            d.color
                .iter()
                .zip(c)
                .all(|(&a, b)| a.abs_diff(b) <= tolerance)
        })
        .min_by_key(|d| {
            d.color
                .iter()
                .zip(c)
                .map(|(&a, b)| u32::from(a.abs_diff(b)).pow(2))
                .sum::<u32>()
        })
        .map(|d| d.index)
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{ImageBuffer, Luma, Rgb, Rgba};

    fn classes() -> Vec<ClassDef> {
        [[0, 0, 0], [255, 0, 0], [0, 0, 255]]
            .into_iter()
            .enumerate()
            .map(|(i, color)| ClassDef {
                index: i as u8,
                name: format!("c{i}"),
                color,
            })
            .collect()
    }

    #[test]
    fn rgb_maps_by_colour_within_the_tolerance() {
        let img = ImageBuffer::from_fn(4, 1, |x, _| {
            Rgb([[0, 0, 0], [250, 3, 0], [0, 10, 240], [0, 255, 0]][x as usize])
        });
        let l = from_image(DynamicImage::ImageRgb8(img), &classes(), DEFAULT_TOLERANCE);
        assert_eq!(l.encoding, Encoding::Colour);
        assert_eq!(l.mask.data, vec![0, 1, 2, IGNORE]);
        assert_eq!(l.unmapped, vec![([0, 255, 0], 1)]);
    }

    #[test]
    fn rgba16_reduces_to_8_bits_and_transparent_is_ignored() {
        let img = ImageBuffer::from_fn(3, 1, |x, _| {
            Rgba([[0u16, 0, 0, 65535], [65535, 0, 0, 65535], [65535, 0, 0, 0]][x as usize])
        });
        let l = from_image(DynamicImage::ImageRgba16(img), &classes(), 0);
        assert_eq!(l.mask.data, vec![0, 1, IGNORE]);
        assert_eq!(l.transparent, 1);
        assert!(l.unmapped.is_empty());
    }

    #[test]
    fn grey_masks_are_indices_binary_and_16_bit() {
        let two = &classes()[..2];
        let img = ImageBuffer::from_fn(3, 1, |x, _| Luma([[0u8, 255, 0][x as usize]]));
        let l = from_image(DynamicImage::ImageLuma8(img), two, 0);
        assert_eq!((l.encoding, l.mask.data), (Encoding::Binary, vec![0, 1, 0]));
        let img = ImageBuffer::from_fn(3, 1, |x, _| Luma([[0u16, 2, 1][x as usize]]));
        let l = from_image(DynamicImage::ImageLuma16(img), &classes(), 0);
        assert_eq!(
            (l.encoding, l.mask.data),
            (Encoding::Index16, vec![0, 2, 1])
        );
        let img = ImageBuffer::from_fn(2, 1, |x, _| Luma([[0u16, 2 * 257][x as usize]]));
        let l = from_image(DynamicImage::ImageLuma16(img), &classes(), 0);
        assert_eq!(l.mask.data, vec![0, 2]);
        let img = ImageBuffer::from_fn(2, 1, |x, _| Luma([[0u8, 7][x as usize]]));
        let l = from_image(DynamicImage::ImageLuma8(img), &classes(), 0);
        assert_eq!(l.mask.data, vec![0, 7]);
        assert_eq!(l.unmapped, vec![([7, 7, 7], 1)]);
    }
}
