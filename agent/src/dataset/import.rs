//! `microfed dataset import SRC --out DIR`: a lab's labelled folder, as its tools left it, written out
//! as a dataset folder (`images/`, `masks/` of class indices, `dataset.toml`).
//!
//! Pairs are found by [`super::layout`], masks read by [`crate::mask::labels`] through the classes'
//! colours. The classes come from `--classes FILE`, else `SRC/dataset.toml`, else from the masks
//! themselves: one class per colour for colour masks (most frequent first; colours under 0.05 % of
//! the pixels are taken for edge artefacts and left unmapped), `class 0..K-1` for index masks. Images
//! are copied as they are; masks are written as 8-bit class-index PNGs.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rayon::prelude::*;

use super::layout::{self, Pair};
use super::{DatasetError, IGNORE};
use crate::classes::{ClassDef, DatasetManifest, default_color};
use crate::mask::MaskError;
use crate::mask::labels;

/// What to import and how.
#[derive(Debug, Clone, Default)]
pub struct ImportOptions {
    /// Classes file (wins over `SRC/dataset.toml`).
    pub classes: Option<PathBuf>,
    /// Colour tolerance (per channel); default: the classes file's, else 24.
    pub tolerance: Option<u8>,
    /// Dataset name for `dataset.toml` (default: the source folder's name).
    pub name: Option<String>,
    /// Write pixels of unmapped colours as ignore (255) instead of refusing the import.
    pub ignore_unmapped: bool,
}

/// What an import found and wrote.
#[derive(Debug)]
pub struct ImportReport {
    pub manifest: DatasetManifest,
    /// Whether the classes were made from the masks (no classes file).
    pub classes_inferred: bool,
    pub pairs: Vec<Pair>,
    pub images_without_mask: Vec<PathBuf>,
    pub masks_without_image: Vec<PathBuf>,
    /// Masks per encoding.
    pub encodings: BTreeMap<&'static str, usize>,
    /// Unmapped colours over all masks with their pixel counts, most frequent first, and the masks
    /// that hold them.
    pub unmapped: Vec<([u8; 3], u64)>,
    pub unmapped_masks: Vec<PathBuf>,
    /// Fully transparent (now ignore) pixels over all masks.
    pub transparent: u64,
    /// Pixels per class 0..K over all written masks.
    pub class_pixels: Vec<u64>,
}

/// Errors of an import; each names the file or folder.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error(transparent)]
    Dataset(#[from] DatasetError),
    #[error(transparent)]
    Mask(#[from] MaskError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{src}: no image/mask pairs found (looked for images/ + masks/, train/ + train_annot/, NAME + NAME_mask)"
    )]
    NoPairs { src: PathBuf },
    #[error(
        "{src}: the masks hold {found} distinct class value(s) or colour(s), which cannot be the \
         classes (2 to 32); give the classes with --classes FILE (index, name, color)"
    )]
    TooManyColours { src: PathBuf, found: usize },
    #[error(
        "{count} mask(s) hold colours that match no class: {}; add classes with these colours to \
         the classes file, raise --tolerance, or pass --ignore-unmapped to write them as ignore (255)",
        colours.iter().take(8).map(|(c, n)| format!("{c:?} {n} px")).collect::<Vec<_>>().join(", ")
    )]
    Unmapped {
        count: usize,
        colours: Vec<([u8; 3], u64)>,
    },
    #[error("{mask}: mask is {mask_w}×{mask_h} but its image {image} is {image_w}×{image_h}")]
    SizeMismatch {
        image: PathBuf,
        mask: PathBuf,
        image_w: u32,
        image_h: u32,
        mask_w: u32,
        mask_h: u32,
    },
}

/// Colours under this share of all mask pixels are not made into classes (edge artefacts).
const MIN_COLOUR_SHARE: f64 = 5e-4;
/// More inferred classes than this means the masks are not class colours.
const MAX_INFERRED_CLASSES: usize = 32;

/// Imports `src` into `out` (created; files of the same names are overwritten).
pub fn import(src: &Path, out: &Path, opts: &ImportOptions) -> Result<ImportReport, ImportError> {
    let found = layout::find(src).map_err(|source| ImportError::Io {
        path: src.to_owned(),
        source,
    })?;
    if let Some((first, second)) = found.duplicates.first() {
        return Err(DatasetError::DuplicateStem {
            first: first.clone(),
            second: second.clone(),
        }
        .into());
    }
    if found.pairs.is_empty() {
        return Err(ImportError::NoPairs {
            src: src.to_owned(),
        });
    }
    let given = opts
        .classes
        .clone()
        .or_else(|| Some(src.join("dataset.toml")).filter(|p| p.is_file()));
    let (mut manifest, classes_inferred) = match given {
        Some(p) => (
            DatasetManifest::load(&p).map_err(DatasetError::from)?,
            false,
        ),
        None => (infer_classes(src, &found.pairs)?, true),
    };
    if let Some(t) = opts.tolerance {
        manifest.color_tolerance = Some(t);
    }
    manifest.name = opts.name.clone().unwrap_or_else(|| {
        src.canonicalize()
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_else(|| "imported".into())
    });
    manifest.source = Some(format!("microfed dataset import {}", src.display()));
    let tolerance = manifest.color_tolerance();

    let (images_dir, masks_dir) = (out.join("images"), out.join("masks"));
    for d in [&images_dir, &masks_dir] {
        std::fs::create_dir_all(d).map_err(|source| ImportError::Io {
            path: d.clone(),
            source,
        })?;
    }
    let read: Vec<labels::LabelMask> = found
        .pairs
        .par_iter()
        .map(|pair| -> Result<labels::LabelMask, ImportError> {
            let l = labels::read(&pair.mask, &manifest.classes, tolerance)?;
            let (w, h) = image::image_dimensions(&pair.image).map_err(|e| MaskError::Read {
                path: pair.image.clone(),
                message: e.to_string(),
            })?;
            if (w, h) != (l.mask.width, l.mask.height) {
                return Err(ImportError::SizeMismatch {
                    image: pair.image.clone(),
                    mask: pair.mask.clone(),
                    image_w: w,
                    image_h: h,
                    mask_w: l.mask.width,
                    mask_h: l.mask.height,
                });
            }
            Ok(l)
        })
        .collect::<Result<_, _>>()?;

    let k = manifest.num_classes();
    let mut report = ImportReport {
        classes_inferred,
        pairs: found.pairs.clone(),
        images_without_mask: found.images_without_mask,
        masks_without_image: found.masks_without_image,
        encodings: BTreeMap::new(),
        unmapped: Vec::new(),
        unmapped_masks: Vec::new(),
        transparent: 0,
        class_pixels: vec![0; k],
        manifest,
    };
    let mut unmapped: BTreeMap<[u8; 3], u64> = BTreeMap::new();
    for (pair, l) in found.pairs.iter().zip(&read) {
        *report.encodings.entry(l.encoding.describe()).or_default() += 1;
        report.transparent += l.transparent;
        if !l.unmapped.is_empty() {
            report.unmapped_masks.push(pair.mask.clone());
            for (c, n) in &l.unmapped {
                *unmapped.entry(*c).or_default() += n;
            }
        }
        for &v in &l.mask.data {
            if usize::from(v) < k {
                report.class_pixels[usize::from(v)] += 1;
            }
        }
    }
    let mut unmapped: Vec<_> = unmapped.into_iter().collect();
    unmapped.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    report.unmapped = unmapped;
    if !report.unmapped.is_empty() && !opts.ignore_unmapped {
        return Err(ImportError::Unmapped {
            count: report.unmapped_masks.len(),
            colours: report.unmapped,
        });
    }

    found
        .pairs
        .par_iter()
        .zip(read)
        .map(|(pair, mut l)| -> Result<(), ImportError> {
            // Grey values out of range were kept to be named; written out, they are unlabelled.
            for v in &mut l.mask.data {
                if usize::from(*v) >= k {
                    *v = IGNORE;
                }
            }
            let ext = pair
                .image
                .extension()
                .map(|e| e.to_string_lossy().to_lowercase())
                .unwrap_or_else(|| "png".into());
            let image_out = images_dir.join(format!("{}.{ext}", pair.stem));
            std::fs::copy(&pair.image, &image_out).map_err(|source| ImportError::Io {
                path: image_out.clone(),
                source,
            })?;
            l.mask
                .save_png(&masks_dir.join(format!("{}.png", pair.stem)))?;
            Ok(())
        })
        .collect::<Result<(), _>>()?;
    let toml_path = out.join("dataset.toml");
    report
        .manifest
        .save(&toml_path)
        .map_err(|source| ImportError::Io {
            path: toml_path,
            source,
        })?;
    Ok(report)
}

/// One mask's colours with their pixel counts (colour masks), its largest index and its pixels.
type MaskSurvey = (Option<Vec<([u8; 3], u64)>>, u16, u64);

/// Classes made from the masks: one per colour (colour masks) or `class 0..K-1` (index masks).
fn infer_classes(src: &Path, pairs: &[Pair]) -> Result<DatasetManifest, ImportError> {
    let per_mask: Vec<MaskSurvey> = pairs
        .par_iter()
        .map(|p| -> Result<_, ImportError> {
            let img = labels::decode(&p.mask)?;
            let pixels = u64::from(img.width()) * u64::from(img.height());
            let colours = labels::colours(&img);
            let max = if colours.is_none() {
                let l = labels::from_image(img, &[], 0);
                // With no classes every value is "unmapped": the largest is the largest index.
                l.unmapped
                    .iter()
                    .map(|(c, _)| u16::from(c[0]))
                    .filter(|&v| v != u16::from(IGNORE))
                    .max()
                    .unwrap_or(0)
            } else {
                0
            };
            Ok((colours, max, pixels))
        })
        .collect::<Result<_, _>>()?;
    let total: u64 = per_mask.iter().map(|m| m.2).sum();
    let mut counts: BTreeMap<[u8; 3], u64> = BTreeMap::new();
    let mut any_colour = false;
    let mut max_index = 1u16;
    for (colours, max, _) in &per_mask {
        match colours {
            Some(cs) => {
                any_colour = true;
                for (c, n) in cs {
                    *counts.entry(*c).or_default() += n;
                }
            }
            None => max_index = max_index.max(*max),
        }
    }
    let classes: Vec<ClassDef> = if any_colour {
        let mut colours: Vec<([u8; 3], u64)> = counts
            .into_iter()
            .filter(|(_, n)| *n as f64 >= MIN_COLOUR_SHARE * total as f64)
            .collect();
        if colours.len() > MAX_INFERRED_CLASSES {
            return Err(ImportError::TooManyColours {
                src: src.to_owned(),
                found: colours.len(),
            });
        }
        colours.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        colours
            .iter()
            .enumerate()
            .map(|(i, (c, _))| ClassDef {
                index: i as u8,
                name: format!("class {i} #{:02x}{:02x}{:02x}", c[0], c[1], c[2]),
                color: *c,
            })
            .collect()
    } else {
        (0..=max_index.min(254) as u8)
            .map(|i| ClassDef {
                index: i,
                name: format!("class {i}"),
                color: default_color(i),
            })
            .collect()
    };
    let manifest = DatasetManifest {
        name: String::new(),
        description: None,
        pixel_size_um: None,
        source: None,
        license: None,
        color_tolerance: None,
        classes,
    };
    if manifest.classes.len() < 2 {
        return Err(ImportError::TooManyColours {
            src: src.to_owned(),
            found: manifest.classes.len(),
        });
    }
    Ok(manifest)
}
