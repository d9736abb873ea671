//! A labelled dataset on disk, validated file by file.
//!
//! Layout of a dataset folder:
//! ```text
//! DIR/dataset.toml        name, optional pixel size, and the [[classes]] (see `classes.rs`)
//! DIR/images/<stem>.png   micrographs (PNG, TIFF, JPEG or BMP)
//! DIR/masks/<stem>.png    class-index masks with the same stem (any lossless supported format)
//! ```
//! The classes may instead come from a separate file (`--classes FILE`), because shared datasets often
//! sit in read-only folders; a given file wins over `DIR/dataset.toml`.
//!
//! Map of the module:
//! - [`Dataset::check`] collects EVERY problem of a folder at once into a [`CheckReport`] (missing mask,
//!   mask without image, same stem twice, unreadable file, size mismatch, class index ≥ K other than
//!   255 = ignore), decoding the files in parallel with rayon.
//! - [`Dataset::open`] runs the same check and refuses a folder with any problem, then serves pairs
//!   lazily through [`Dataset::load_pair`] and [`Dataset::iter`].
//! - [`DatasetError`]: one problem, naming the file.
//!
//! A folder without `images/` is read as the lab left it ([`layout`]: `train/` + `train_annot/`,
//! `a.tif` + `a_mask.png`, …), and masks are read by [`crate::mask::labels`] (colour, RGBA and palette
//! masks through the classes' colours, 16-bit indices); `microfed dataset import` ([`import`]) writes
//! such a folder out in the layout above. A folder with `images/` that holds more pairs elsewhere
//! (a lab's `a.tif` + `a_mask.png` beside the folders, a `val/` + `val_annot/`) is a problem that
//! names them ([`DatasetError::PairsOutsideLayout`]): training would not see them.
//!
//! Files whose names start with `.` are skipped (editor and OS droppings); other files whose extension
//! is not an image extension are listed in [`CheckReport::skipped`] but are not problems.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rayon::prelude::*;

pub mod import;
pub mod layout;

pub use layout::{IMAGE_EXTENSIONS, Pair};

use crate::classes::{ClassesError, DatasetManifest};
use crate::mask::labels::{self, Encoding};
use crate::mask::{Mask, MaskError};
use crate::micrograph::{Micrograph, MicrographError, Normalisation};

/// Pixel value that marks "no label here": ignored by training, metrics and validation.
pub const IGNORE: u8 = 255;

/// One problem with a dataset folder; each names the file (or folder) concerned.
#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    #[error("{dir}: not a directory")]
    NotADirectory { dir: PathBuf },
    #[error("{dir}: cannot list: {source}")]
    ReadDir {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("{dir}: no dataset.toml; give the classes with --classes FILE")]
    NoClasses { dir: PathBuf },
    #[error(transparent)]
    Classes(#[from] ClassesError),
    #[error("{dir}: no image/mask pairs")]
    Empty { dir: PathBuf },
    #[error("{image}: no mask with this stem in {masks_dir}")]
    MissingMask { image: PathBuf, masks_dir: PathBuf },
    #[error("{mask}: no image with this stem in {images_dir}")]
    MaskWithoutImage { mask: PathBuf, images_dir: PathBuf },
    #[error("{second}: same stem as {first}; each stem must appear once")]
    DuplicateStem { first: PathBuf, second: PathBuf },
    #[error(transparent)]
    Micrograph(#[from] MicrographError),
    #[error(transparent)]
    Mask(#[from] MaskError),
    #[error("{mask}: mask is {mask_w}×{mask_h} but its image {image} is {image_w}×{image_h}")]
    SizeMismatch {
        image: PathBuf,
        mask: PathBuf,
        image_w: u32,
        image_h: u32,
        mask_w: u32,
        mask_h: u32,
    },
    #[error(
        "{mask}: class index {value} at (x={x}, y={y}) is out of range: {k} classes (0..={max}), 255 = ignore; {count} such pixels",
        max = k - 1
    )]
    ClassOutOfRange {
        mask: PathBuf,
        value: u8,
        x: u32,
        y: u32,
        k: usize,
        count: u64,
    },
    #[error(
        "{mask}: {} colour(s) match no class (within {tolerance} per channel): {}; add them to the \
         classes file (`color = [r, g, b]`)",
        colours.len(),
        colours.iter().take(6).map(|(c, n)| format!("{c:?} {n} px")).collect::<Vec<_>>().join(", ")
    )]
    UnmappedColours {
        mask: PathBuf,
        colours: Vec<([u8; 3], u64)>,
        tolerance: u8,
    },
    #[error(
        "{dir}: {count} more image/mask pair(s) outside images/ + masks/ (first: {example}), which \
         training would not see; gather them with `microfed dataset import {dir} --out NEW`"
    )]
    PairsOutsideLayout {
        dir: PathBuf,
        count: usize,
        example: PathBuf,
    },
    #[error("pair index {index} out of range: the dataset has {len} pairs")]
    NoSuchPair { index: usize, len: usize },
    #[error("{dir}: {count} problem(s); first: {first}")]
    Invalid {
        dir: PathBuf,
        count: usize,
        first: Box<DatasetError>,
    },
}

impl DatasetError {
    /// The file (or folder) the problem is about, when it is about one; for a size mismatch, the mask.
    pub fn path(&self) -> Option<&Path> {
        use DatasetError::*;
        match self {
            NotADirectory { dir }
            | ReadDir { dir, .. }
            | NoClasses { dir }
            | Empty { dir }
            | PairsOutsideLayout { dir, .. } => Some(dir),
            Classes(ClassesError::Read { path, .. })
            | Classes(ClassesError::Parse { path, .. })
            | Classes(ClassesError::Invalid { path, .. }) => Some(path),
            MissingMask { image, .. } => Some(image),
            MaskWithoutImage { mask, .. } => Some(mask),
            DuplicateStem { second, .. } => Some(second),
            Micrograph(e) => e.path(),
            Mask(MaskError::Read { path, .. })
            | Mask(MaskError::NotIndexed { path, .. })
            | Mask(MaskError::Write { path, .. }) => Some(path),
            SizeMismatch { mask, .. }
            | ClassOutOfRange { mask, .. }
            | UnmappedColours { mask, .. } => Some(mask),
            NoSuchPair { .. } => None,
            Invalid { first, .. } => first.path(),
        }
    }
}

/// Everything [`Dataset::check`] found. `problems` is empty for a usable dataset.
#[derive(Debug, Default)]
pub struct CheckReport {
    pub dir: PathBuf,
    /// The classes, when they could be read.
    pub manifest: Option<DatasetManifest>,
    /// Pairs found (matched by stem), whether or not their files are valid.
    pub pairs: Vec<Pair>,
    /// Every problem, in a stable order (listing problems first, then per pair in stem order).
    pub problems: Vec<DatasetError>,
    /// Files that are not images (by extension) and were not considered.
    pub skipped: Vec<PathBuf>,
    /// Pixel count of each class value 0..=255 over all masks that could be read.
    pub class_pixels: Vec<u64>,
}

impl CheckReport {
    pub fn is_ok(&self) -> bool {
        self.problems.is_empty()
    }

    /// Share of labelled (non-ignore) pixels for each class 0..K, when the classes are known.
    pub fn class_shares(&self) -> Option<Vec<f64>> {
        let k = self.manifest.as_ref()?.num_classes();
        let labelled: u64 = self.class_pixels[..k].iter().sum();
        if labelled == 0 {
            return None;
        }
        Some(
            self.class_pixels[..k]
                .iter()
                .map(|&c| c as f64 / labelled as f64)
                .collect(),
        )
    }
}

/// A validated dataset: the pairs are indexed at open time and decoded on demand.
#[derive(Debug, Clone)]
pub struct Dataset {
    pub dir: PathBuf,
    pub manifest: DatasetManifest,
    pairs: Vec<Pair>,
    normalisation: Normalisation,
}

impl Dataset {
    /// Opens and fully validates a dataset folder (every file is decoded once, in parallel).
    /// `classes` overrides `dir/dataset.toml`. Any problem makes this fail with
    /// [`DatasetError::Invalid`] (or the problem itself when there is only one), naming the file.
    pub fn open(dir: &Path, classes: Option<&Path>) -> Result<Self, DatasetError> {
        let report = Self::check(dir, classes);
        let CheckReport {
            manifest,
            pairs,
            mut problems,
            ..
        } = report;
        if problems.len() == 1 {
            return Err(problems.remove(0));
        }
        if !problems.is_empty() {
            return Err(DatasetError::Invalid {
                dir: dir.to_owned(),
                count: problems.len(),
                first: Box::new(problems.remove(0)),
            });
        }
        let manifest = manifest.ok_or_else(|| DatasetError::NoClasses {
            dir: dir.to_owned(),
        })?;
        Ok(Self {
            dir: dir.to_owned(),
            manifest,
            pairs,
            normalisation: Normalisation::default(),
        })
    }

    /// Uses `norm` for the micrographs served from now on (a model's normalisation).
    pub fn with_normalisation(mut self, norm: Normalisation) -> Self {
        self.normalisation = norm;
        self
    }

    /// Lists every problem of a folder at once. Never fails: an unusable folder is a report with
    /// problems.
    pub fn check(dir: &Path, classes: Option<&Path>) -> CheckReport {
        let mut report = CheckReport {
            dir: dir.to_owned(),
            class_pixels: vec![0; 256],
            ..CheckReport::default()
        };
        if !dir.is_dir() {
            report.problems.push(DatasetError::NotADirectory {
                dir: dir.to_owned(),
            });
            return report;
        }
        let manifest_path = match classes {
            Some(p) => Some(p.to_owned()),
            None => Some(dir.join("dataset.toml")).filter(|p| p.is_file()),
        };
        match manifest_path {
            Some(p) => match DatasetManifest::load(&p) {
                Ok(m) => report.manifest = Some(m),
                Err(e) => report.problems.push(e.into()),
            },
            None => report.problems.push(DatasetError::NoClasses {
                dir: dir.to_owned(),
            }),
        }

        if dir.join("images").is_dir() {
            list_pairs(dir, &mut report);
            stray_pairs(dir, &mut report);
        } else {
            find_pairs(dir, &mut report);
        }
        let manifest = report.manifest.clone();
        let per_pair: Vec<(Vec<DatasetError>, Option<[u64; 256]>)> = report
            .pairs
            .par_iter()
            .map(|p| check_pair(p, manifest.as_ref()))
            .collect();
        for (problems, hist) in per_pair {
            report.problems.extend(problems);
            if let Some(h) = hist {
                for (acc, v) in report.class_pixels.iter_mut().zip(h) {
                    *acc += v;
                }
            }
        }
        report
    }

    pub fn len(&self) -> usize {
        self.pairs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pairs.is_empty()
    }

    /// The image/mask pairs, in stem order.
    pub fn pairs(&self) -> &[Pair] {
        &self.pairs
    }

    /// Decodes pair `i`. The micrograph takes the dataset's pixel size when its file has none.
    /// Checks again (files may have changed since `open`), so this can fail, naming the file.
    pub fn load_pair(&self, i: usize) -> Result<(Micrograph, Mask), DatasetError> {
        let pair = self.pairs.get(i).ok_or(DatasetError::NoSuchPair {
            index: i,
            len: self.pairs.len(),
        })?;
        let mut image = Micrograph::load_with(&pair.image, &self.normalisation)?;
        let mask = read_mask(pair, Some(&self.manifest)).map_err(|mut p| p.remove(0))?;
        if let Some(e) = size_problem(pair, &image, &mask) {
            return Err(e);
        }
        if let Some(e) = range_problem(pair, &mask, self.manifest.num_classes()) {
            return Err(e);
        }
        if image.pixel_size_um.is_none() {
            image.pixel_size_um = self.manifest.pixel_size_um;
        }
        Ok((image, mask))
    }

    /// All pairs in order, each decoded when reached.
    pub fn iter(&self) -> impl Iterator<Item = Result<(Micrograph, Mask), DatasetError>> + '_ {
        (0..self.len()).map(|i| self.load_pair(i))
    }
}

/// The pairs of the `images/` + `masks/` layout, with every listing problem.
fn list_pairs(dir: &Path, report: &mut CheckReport) {
    let images_dir = dir.join("images");
    let masks_dir = dir.join("masks");
    let images = list_images(&images_dir, report);
    let masks = list_images(&masks_dir, report);
    let (Some(images), Some(masks)) = (images, masks) else {
        return;
    };
    for (stem, image) in &images {
        match masks.get(stem) {
            Some(mask) => report.pairs.push(Pair {
                stem: stem.clone(),
                image: image.clone(),
                mask: mask.clone(),
            }),
            None => report.problems.push(DatasetError::MissingMask {
                image: image.clone(),
                masks_dir: masks_dir.clone(),
            }),
        }
    }
    for (stem, mask) in &masks {
        if !images.contains_key(stem) {
            report.problems.push(DatasetError::MaskWithoutImage {
                mask: mask.clone(),
                images_dir: images_dir.clone(),
            });
        }
    }
    if images.is_empty() && masks.is_empty() {
        report.problems.push(DatasetError::Empty {
            dir: dir.to_owned(),
        });
    }
}

/// A dataset folder (`images/` + `masks/`) with more pairs elsewhere in it (a lab's tools left
/// `a.tif` + `a_mask.png` beside the folders, or a `val/` + `val_annot/`): one problem naming how
/// many and the first, since training reads only `images/` + `masks/`.
fn stray_pairs(dir: &Path, report: &mut CheckReport) {
    let Ok(found) = layout::find(dir) else {
        return; // the listing problems are reported by list_pairs
    };
    let (images, masks) = (dir.join("images"), dir.join("masks"));
    let listed: std::collections::BTreeSet<&str> =
        report.pairs.iter().map(|p| p.stem.as_str()).collect();
    // Stems the layout already pairs are not stray, wherever another copy of them lies.
    let stray: Vec<&layout::Pair> = found
        .pairs
        .iter()
        .filter(|p| !listed.contains(p.stem.as_str()))
        .filter(|p| !(p.image.starts_with(&images) && p.mask.starts_with(&masks)))
        .collect();
    if let Some(first) = stray.first() {
        report.problems.push(DatasetError::PairsOutsideLayout {
            dir: dir.to_owned(),
            count: stray.len(),
            example: first.image.clone(),
        });
    }
}

/// The pairs of any other layout ([`layout::find`]), with every listing problem.
fn find_pairs(dir: &Path, report: &mut CheckReport) {
    let found = match layout::find(dir) {
        Ok(f) => f,
        Err(source) => {
            report.problems.push(DatasetError::ReadDir {
                dir: dir.to_owned(),
                source,
            });
            return;
        }
    };
    for image in found.images_without_mask {
        report.problems.push(DatasetError::MissingMask {
            image,
            masks_dir: dir.to_owned(),
        });
    }
    for mask in found.masks_without_image {
        report.problems.push(DatasetError::MaskWithoutImage {
            mask,
            images_dir: dir.to_owned(),
        });
    }
    for (first, second) in found.duplicates {
        report
            .problems
            .push(DatasetError::DuplicateStem { first, second });
    }
    if found.pairs.is_empty() {
        report.problems.push(DatasetError::Empty {
            dir: dir.to_owned(),
        });
    }
    report.pairs = found.pairs;
    report.skipped = found.skipped;
}

/// Reads a pair's mask: through the classes' colours when the classes are known (a colour matching no
/// class is a problem), as class indices otherwise.
fn read_mask(pair: &Pair, manifest: Option<&DatasetManifest>) -> Result<Mask, Vec<DatasetError>> {
    let Some(m) = manifest else {
        return Mask::load(&pair.mask).map_err(|e| vec![e.into()]);
    };
    let read =
        labels::read(&pair.mask, &m.classes, m.color_tolerance()).map_err(|e| vec![e.into()])?;
    if read.encoding == Encoding::Colour && !read.unmapped.is_empty() {
        return Err(vec![DatasetError::UnmappedColours {
            mask: pair.mask.clone(),
            colours: read.unmapped,
            tolerance: m.color_tolerance(),
        }]);
    }
    Ok(read.mask)
}

/// Image files of a folder by stem, recording listing problems; `None` when the folder is unusable.
fn list_images(dir: &Path, report: &mut CheckReport) -> Option<BTreeMap<String, PathBuf>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(source) => {
            report.problems.push(DatasetError::ReadDir {
                dir: dir.to_owned(),
                source,
            });
            return None;
        }
    };
    let mut paths = Vec::new();
    for entry in entries {
        match entry {
            Ok(e) => paths.push(e.path()),
            Err(source) => {
                report.problems.push(DatasetError::ReadDir {
                    dir: dir.to_owned(),
                    source,
                });
                return None;
            }
        }
    }
    paths.sort();
    let mut out: BTreeMap<String, PathBuf> = BTreeMap::new();
    for path in paths {
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
        if name.as_deref().is_none_or(|n| n.starts_with('.')) || path.is_dir() {
            continue;
        }
        let ext = path
            .extension()
            .map(|e| e.to_string_lossy().to_lowercase())
            .unwrap_or_default();
        if !IMAGE_EXTENSIONS.contains(&ext.as_str()) {
            report.skipped.push(path);
            continue;
        }
        let stem = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        if let Some(first) = out.get(&stem) {
            report.problems.push(DatasetError::DuplicateStem {
                first: first.clone(),
                second: path,
            });
        } else {
            out.insert(stem, path);
        }
    }
    Some(out)
}

/// Decodes one pair and lists its problems; also returns the mask histogram when the mask was read.
fn check_pair(
    pair: &Pair,
    manifest: Option<&DatasetManifest>,
) -> (Vec<DatasetError>, Option<[u64; 256]>) {
    let k = manifest.map(DatasetManifest::num_classes);
    let mut problems = Vec::new();
    let image = Micrograph::load(&pair.image)
        .map_err(|e| problems.push(e.into()))
        .ok();
    let mask = read_mask(pair, manifest)
        .map_err(|e| problems.extend(e))
        .ok();
    if let (Some(image), Some(mask)) = (&image, &mask)
        && let Some(e) = size_problem(pair, image, mask)
    {
        problems.push(e);
    }
    if let (Some(mask), Some(k)) = (&mask, k)
        && let Some(e) = range_problem(pair, mask, k)
    {
        problems.push(e);
    }
    (problems, mask.map(|m| m.histogram()))
}

fn size_problem(pair: &Pair, image: &Micrograph, mask: &Mask) -> Option<DatasetError> {
    ((image.width, image.height) != (mask.width, mask.height)).then(|| DatasetError::SizeMismatch {
        image: pair.image.clone(),
        mask: pair.mask.clone(),
        image_w: image.width,
        image_h: image.height,
        mask_w: mask.width,
        mask_h: mask.height,
    })
}

/// The first out-of-range value (row-major) with its position and how many pixels are out of range.
fn range_problem(pair: &Pair, mask: &Mask, k: usize) -> Option<DatasetError> {
    let bad = |v: u8| usize::from(v) >= k && v != IGNORE;
    let first = mask.data.iter().position(|&v| bad(v))?;
    let count = mask.data.iter().filter(|&&v| bad(v)).count() as u64;
    let w = mask.width as usize;
    Some(DatasetError::ClassOutOfRange {
        mask: pair.mask.clone(),
        value: mask.data[first],
        x: (first % w) as u32,
        y: (first / w) as u32,
        k,
        count,
    })
}

/// One decoded micrograph and its mask, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainingImage {
    /// Index of its dataset in `TrainingSet::datasets` (`crate::train::data`).
    pub dataset: usize,
    pub stem: String,
    pub width: usize,
    pub height: usize,
    /// Normalised pixels.
    pub pixels: Vec<f32>,
    /// Class index per pixel, 255 = ignore.
    pub labels: Vec<u8>,
}
