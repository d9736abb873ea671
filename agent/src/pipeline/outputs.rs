//! What the agent leaves on disk for each micrograph, written so that no crash leaves half a file.
//!
//! Map:
//! - [`OutputNames`]: `STEM.mask.png` (class indices), `STEM.overlay.png` (the image blended with the
//!   class colours, for people), `STEM.features.json`, and `features.csv` for the whole folder.
//! - Every file is written with [`crate::fsio::write_atomic`] (temporary name, flush, rename, folder
//!   flush), and what a crash left under temporary names is swept at start.
//! - [`FeatureTable`]: the CSV, header once; [`FeatureTable::open`] drops rows that the journal does not
//!   vouch for (written just before a crash, so their file will be processed and written again).
//! - [`overlay`]: the colour overlay. [`quarantine`]: move a bad file aside with its reason.

use std::collections::HashSet;
use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};

use image::{Rgb, RgbImage};

use crate::classes::ClassDef;
use crate::fsio::{FsError, write_atomic};
use crate::mask::Mask;

/// Errors writing outputs; each names the file.
#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: cannot encode: {message}")]
    Encode { path: PathBuf, message: String },
    #[error(transparent)]
    Fs(#[from] FsError),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> OutputError + '_ {
    move |source| OutputError::Io {
        path: path.to_owned(),
        source,
    }
}

/// The output files of one micrograph.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputNames {
    pub mask: PathBuf,
    pub overlay: PathBuf,
    pub features: PathBuf,
}

impl OutputNames {
    /// Outputs of `source` in `dir`, named after its file stem (`a.png` → `a.mask.png`), or after
    /// its whole file name (`a.tif` → `a.tif.mask.png`) when its folder holds another image of the
    /// same stem (a microscope that saves `a.tif` and a preview `a.png`): the two never overwrite
    /// each other's outputs. Whichever of the two arrives alone keeps the short name.
    pub fn for_source(dir: &Path, source: &Path) -> Self {
        let base = if has_namesake(source) {
            source.file_name()
        } else {
            source.file_stem()
        };
        let stem = base.map_or_else(|| "image".into(), |s| s.to_string_lossy().into_owned());
        Self {
            mask: dir.join(format!("{stem}.mask.png")),
            overlay: dir.join(format!("{stem}.overlay.png")),
            features: dir.join(format!("{stem}.features.json")),
        }
    }
}

/// Does `source`'s folder hold another image file with the same stem (`a.png` beside `a.tif`)?
fn has_namesake(source: &Path) -> bool {
    let (Some(stem), Some(name)) = (source.file_stem(), source.file_name()) else {
        return false;
    };
    let folder = match source.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    // Lower and upper case extensions: some microscopes write `.TIF`.
    crate::dataset::IMAGE_EXTENSIONS
        .iter()
        .flat_map(|ext| [ext.to_string(), ext.to_ascii_uppercase()])
        .any(|ext| {
            let other = folder.join(Path::new(stem).with_extension(ext));
            other.file_name() != Some(name) && other.is_file()
        })
}

/// PNG bytes of an image.
fn png_bytes<P, C>(img: &image::ImageBuffer<P, C>, path: &Path) -> Result<Vec<u8>, OutputError>
where
    P: image::PixelWithColorType,
    [P::Subpixel]: image::EncodableLayout,
    C: std::ops::Deref<Target = [P::Subpixel]>,
{
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png)
        .map_err(|e| OutputError::Encode {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
    Ok(out.into_inner())
}

/// The class-index mask as PNG bytes (8-bit grey, values = class indices).
pub fn mask_png(mask: &Mask, path: &Path) -> Result<Vec<u8>, OutputError> {
    let img = image::GrayImage::from_raw(mask.width, mask.height, mask.data.clone()).ok_or_else(
        || OutputError::Encode {
            path: path.to_owned(),
            message: "mask size does not match its data".into(),
        },
    )?;
    png_bytes(&img, path)
}

/// Share of the class colour in the overlay: enough to read the classes, little enough to still see
/// the micrograph under them.
pub const OVERLAY_ALPHA: f32 = 0.4;

/// The micrograph (grey levels in [0, 1]) blended with the class colours.
pub fn overlay(unit_grey: &[f32], mask: &Mask, classes: &[ClassDef]) -> RgbImage {
    RgbImage::from_fn(mask.width, mask.height, |x, y| {
        let i = y as usize * mask.width as usize + x as usize;
        let g = unit_grey.get(i).copied().unwrap_or(0.0).clamp(0.0, 1.0) * 255.0;
        let c = classes
            .get(usize::from(mask.data[i]))
            .map_or([255, 0, 255], |d| d.color);
        Rgb(c.map(|v| ((1.0 - OVERLAY_ALPHA) * g + OVERLAY_ALPHA * f32::from(v)).round() as u8))
    })
}

/// PNG bytes of an RGB image.
pub fn rgb_png(img: &RgbImage, path: &Path) -> Result<Vec<u8>, OutputError> {
    png_bytes(img, path)
}

/// The folder's features CSV: one header line, then one row per segmented micrograph.
#[derive(Debug)]
pub struct FeatureTable {
    path: PathBuf,
    header: Option<String>,
}

impl FeatureTable {
    /// Opens `path`, keeping only the header and the rows whose source (first field) is in `journalled`,
    /// once each. Rows beyond that were appended just before a crash, before their journal entry: their
    /// file will be processed again and will append its row again.
    pub fn open(path: &Path, journalled: &HashSet<&str>) -> Result<Self, OutputError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(Self {
                    path: path.to_owned(),
                    header: None,
                });
            }
            Err(e) => return Err(io_err(path)(e)),
        };
        // Only complete lines count; a torn last line is dropped with the rest.
        let complete = &text[..text.rfind('\n').map_or(0, |i| i + 1)];
        let mut lines = complete.lines();
        let header = lines.next().map(str::to_owned);
        let mut seen = HashSet::new();
        let mut kept = Vec::new();
        for line in lines {
            let source = csv_first_field(line);
            if journalled.contains(source.as_str()) && seen.insert(source) {
                kept.push(line);
            }
        }
        let dropped = complete.lines().count().saturating_sub(1) - kept.len();
        if dropped > 0 || complete.len() < text.len() {
            tracing::info!(
                path = %path.display(),
                dropped,
                "features CSV: dropping rows without a journal entry (they will be written again)"
            );
            let mut out = String::new();
            if let Some(h) = &header {
                out.push_str(h);
                out.push('\n');
            }
            for l in kept {
                out.push_str(l);
                out.push('\n');
            }
            write_atomic(path, out.as_bytes())?;
        }
        Ok(Self {
            path: path.to_owned(),
            header,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends a row (and the header first, for a new file). A row whose columns differ from the
    /// file's header (another feature kind or other classes after a model swap) goes to a sibling
    /// file named after the kind of its header, so no CSV mixes columns.
    pub fn append(&mut self, header: &str, row: &str) -> Result<PathBuf, OutputError> {
        let target = match &self.header {
            Some(h) if h != header => {
                let digest = crate::pipeline::journal::sha256_hex(header.as_bytes());
                self.path
                    .with_file_name(format!("features-{}.csv", &digest[..8]))
            }
            _ => self.path.clone(),
        };
        let new = !target.exists() || std::fs::metadata(&target).is_ok_and(|m| m.len() == 0);
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&target)
            .map_err(io_err(&target))?;
        let mut text = String::new();
        if new {
            text.push_str(header);
            text.push('\n');
        }
        text.push_str(row);
        text.push('\n');
        f.write_all(text.as_bytes()).map_err(io_err(&target))?;
        f.sync_data().map_err(io_err(&target))?;
        if target == self.path && self.header.is_none() {
            self.header = Some(header.to_owned());
        }
        Ok(target)
    }
}

/// The first field of a CSV line, unquoted (the features module quotes fields with commas or quotes).
fn csv_first_field(line: &str) -> String {
    if let Some(rest) = line.strip_prefix('"') {
        let mut out = String::new();
        let mut chars = rest.chars().peekable();
        while let Some(c) = chars.next() {
            if c == '"' {
                if chars.peek() == Some(&'"') {
                    out.push('"');
                    chars.next();
                } else {
                    break;
                }
            } else {
                out.push(c);
            }
        }
        out
    } else {
        line.split(',').next().unwrap_or("").to_owned()
    }
}

/// Moves `source` into `dir` (renaming to `NAME.1`, `NAME.2`, … when the name is taken) and writes the
/// reason to `NAME.error.txt` beside it. Returns where the file went.
pub fn quarantine(source: &Path, dir: &Path, reason: &str) -> Result<PathBuf, OutputError> {
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    let name = source
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "unnamed".into());
    let mut target = dir.join(&name);
    let mut n = 0;
    while target.exists() {
        n += 1;
        target = dir.join(format!("{name}.{n}"));
    }
    let target_name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let text = format!(
        "{}\nfile: {}\nreason: {reason}\n",
        "microfed could not segment this micrograph.",
        source.display()
    );
    // The reason first: a crash between the two leaves a reason without its file, never a file
    // without its reason.
    write_atomic(
        &dir.join(format!("{target_name}.error.txt")),
        text.as_bytes(),
    )?;
    if std::fs::rename(source, &target).is_err() {
        // Another file system: copy, then remove.
        std::fs::copy(source, &target).map_err(io_err(&target))?;
        std::fs::remove_file(source).map_err(io_err(source))?;
    }
    Ok(target)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_namesake_in_another_format_gets_its_own_outputs() {
        let dir = tempfile::tempdir().unwrap();
        let (src, out) = (dir.path().join("in"), dir.path().join("out"));
        std::fs::create_dir_all(&src).unwrap();
        std::fs::write(src.join("a.tif"), b"x").unwrap();
        std::fs::write(src.join("b.png"), b"x").unwrap();
        // Alone: the short name, as `eval --pred` expects.
        let a = OutputNames::for_source(&out, &src.join("a.tif"));
        assert_eq!(a.mask, out.join("a.mask.png"));
        assert_eq!(
            OutputNames::for_source(&out, &src.join("b.png")).features,
            out.join("b.features.json")
        );
        // A preview a.PNG beside a.tif: each keeps apart from the other.
        std::fs::write(src.join("a.PNG"), b"x").unwrap();
        let tif = OutputNames::for_source(&out, &src.join("a.tif"));
        let png = OutputNames::for_source(&out, &src.join("a.PNG"));
        assert_eq!(tif.mask, out.join("a.tif.mask.png"));
        assert_eq!(png.overlay, out.join("a.PNG.overlay.png"));
        assert_ne!(tif.features, png.features);
    }

    #[test]
    fn overlay_blends_grey_and_class_colour() {
        let mask = Mask::new(2, 1, vec![0, 1]);
        let classes = vec![
            ClassDef {
                index: 0,
                name: "a".into(),
                color: [0, 0, 0],
            },
            ClassDef {
                index: 1,
                name: "b".into(),
                color: [255, 0, 100],
            },
        ];
        let img = overlay(&[1.0, 0.5], &mask, &classes);
        // 0.6·255 + 0.4·0 = 153; 0.6·127.5 + 0.4·255 = 178.5 → 179 (round half away), 0.6·127.5 = 76.5
        // → 77, 76.5 + 40 = 116.5 → 117.
        assert_eq!(img.get_pixel(0, 0).0, [153, 153, 153]);
        assert_eq!(img.get_pixel(1, 0).0, [179, 77, 117]);
    }

    #[test]
    fn csv_keeps_journalled_rows_once_and_writes_the_header_once() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("features.csv");
        std::fs::write(
            &p,
            "source,x\na.png,1\n\"b,1.png\",2\nc.png,3\na.png,1\nd.pn",
        )
        .unwrap();
        let journalled: HashSet<&str> = ["a.png", "b,1.png"].into();
        let mut t = FeatureTable::open(&p, &journalled).unwrap();
        assert_eq!(
            std::fs::read_to_string(&p).unwrap(),
            "source,x\na.png,1\n\"b,1.png\",2\n"
        );
        t.append("source,x", "c.png,3").unwrap();
        let other = t.append("source,y", "e.png,5").unwrap();
        assert_ne!(other, p);
        assert_eq!(
            std::fs::read_to_string(&p).unwrap(),
            "source,x\na.png,1\n\"b,1.png\",2\nc.png,3\n"
        );
        assert_eq!(
            std::fs::read_to_string(other).unwrap(),
            "source,y\ne.png,5\n"
        );

        let fresh = dir.path().join("new.csv");
        let mut t = FeatureTable::open(&fresh, &HashSet::new()).unwrap();
        t.append("h", "r1").unwrap();
        t.append("h", "r2").unwrap();
        assert_eq!(std::fs::read_to_string(&fresh).unwrap(), "h\nr1\nr2\n");
    }

    #[test]
    fn quarantine_moves_the_file_and_explains_why() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("bad.png");
        let q = dir.path().join("q");
        std::fs::write(&src, b"junk").unwrap();
        let to = quarantine(&src, &q, "not an image").unwrap();
        assert!(!src.exists());
        assert_eq!(std::fs::read(&to).unwrap(), b"junk");
        let why = std::fs::read_to_string(q.join("bad.png.error.txt")).unwrap();
        assert!(why.contains("not an image"), "{why}");
        std::fs::write(&src, b"junk2").unwrap();
        let to2 = quarantine(&src, &q, "again").unwrap();
        assert_eq!(to2, q.join("bad.png.1"));
        assert!(q.join("bad.png.1.error.txt").exists());
    }
}
