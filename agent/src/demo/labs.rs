//! The demo's labs on disk: each synthetic lab's labelled set and its stream of "captures", and the
//! real-SEM lab's captures taken from nasa-super.
//!
//! - [`SyntheticLab`]: one imaging style. [`SyntheticLab::prepare`] writes its labelled dataset with
//!   [`crate::synth::write_dataset`] (what `microfed synth` writes) and generates its captures (another
//!   seed, so no capture is a labelled image), keeping each capture's truth mask beside the outputs.
//! - [`Capture`]: one file to hand to a lab's microscope folder; [`deliver`] writes it under a hidden
//!   name and renames it into the watched folder, the way a microscope finishes a file, so the agent
//!   never sees half an image.
//! - [`real_captures`]: the first N images of nasa-super (read from where they are, never copied
//!   into the repository), with their masks when present.

use std::path::{Path, PathBuf};

use crate::synth::{self, OutputFormat, Structure, Style, SynthParams};

use super::DemoError;

/// Lab names and imaging styles, in the order labs are added. The base model (models/grains) was
/// trained on optical-etched, sem-se, sem-bse and fast-scan; `hazy` is a style it never saw, so the
/// first lab is the one that needs federation most.
pub const LAB_STYLES: [(&str, &str); 5] = [
    ("lab-a", "hazy"),
    ("lab-b", "sem-bse"),
    ("lab-c", "optical-etched"),
    ("lab-d", "fast-scan"),
    ("lab-e", "sem-se"),
];

/// The name of the lab that segments real SEM images (no federation).
pub const REAL_LAB: &str = "lab-sem-real";

/// One micrograph to be "captured": its bytes come from `source` (a synthetic image written under
/// the lab's folder, or a nasa-super file), it arrives in the watched folder as `name`.
#[derive(Debug, Clone, PartialEq)]
pub struct Capture {
    pub source: PathBuf,
    pub name: String,
    /// The class-index truth mask, when known (synthetic truth, nasa-super's hand labels).
    pub truth: Option<PathBuf>,
    /// The grains on the specimen, when known (the synthetic generator counts them).
    pub truth_grains: Option<u32>,
}

/// One synthetic lab: its folders and data.
#[derive(Debug, Clone)]
pub struct SyntheticLab {
    pub name: String,
    pub style: String,
    pub dir: PathBuf,
    pub labelled: PathBuf,
    pub captures: Vec<Capture>,
}

impl SyntheticLab {
    /// Writes `labelled` labelled polycrystal micrographs of `size`² px in this lab's style into
    /// `dir/labelled`, and `captures` more (another seed) into `dir/microscope` with their truth masks
    /// in `dir/truth`. Blocking (image generation).
    pub fn prepare(
        name: &str,
        style: &str,
        dir: &Path,
        size: u32,
        labelled: u64,
        captures: usize,
        seed: u64,
    ) -> Result<Self, DemoError> {
        let lab_err = |message: String| DemoError::Lab {
            lab: name.to_owned(),
            part: "synthetic data",
            message,
        };
        let preset = Style::preset(style).map_err(|e| lab_err(e.to_string()))?;
        let params = SynthParams::new(Structure::Polycrystal, preset.clone(), size, size, seed)
            .map_err(|e| lab_err(e.to_string()))?;
        let labelled_dir = dir.join("labelled");
        synth::write_dataset(&params, labelled, OutputFormat::Png, &labelled_dir, None)
            .map_err(|e| lab_err(e.to_string()))?;
        // Captures: the same microscope (style), other specimens (seed), so none was labelled.
        let capture_params =
            SynthParams::new(Structure::Polycrystal, preset, size, size, seed + 10_000)
                .map_err(|e| lab_err(e.to_string()))?;
        let raw = dir.join("microscope");
        let truth = dir.join("truth");
        for d in [&raw, &truth] {
            std::fs::create_dir_all(d).map_err(|e| lab_err(format!("{}: {e}", d.display())))?;
        }
        let mut list = Vec::with_capacity(captures);
        for i in 0..captures as u64 {
            let sample = synth::generate(&capture_params, i);
            let stem = format!("{name}-capture-{i:03}");
            let source = raw.join(format!("{stem}.png"));
            let img = image::GrayImage::from_raw(size, size, sample.image_u8())
                .ok_or_else(|| lab_err(format!("{stem}: image buffer has the wrong size")))?;
            img.save_with_format(&source, image::ImageFormat::Png)
                .map_err(|e| lab_err(format!("{}: {e}", source.display())))?;
            let truth_path = truth.join(format!("{stem}.png"));
            sample
                .mask
                .save_png(&truth_path)
                .map_err(|e| lab_err(e.to_string()))?;
            list.push(Capture {
                source,
                name: format!("{stem}.png"),
                truth: Some(truth_path),
                truth_grains: sample.truth.grains,
            });
        }
        Ok(Self {
            name: name.to_owned(),
            style: style.to_owned(),
            dir: dir.to_owned(),
            labelled: labelled_dir,
            captures: list,
        })
    }
}

/// The first `count` images of a nasa-super folder (`images/*.png`, sorted by name), with the
/// matching `masks/<name>` when it exists.
pub fn real_captures(root: &Path, count: usize) -> Result<Vec<Capture>, DemoError> {
    let err = |message: String| DemoError::Lab {
        lab: REAL_LAB.into(),
        part: "nasa-super images",
        message,
    };
    let images = root.join("images");
    let mut names: Vec<String> = std::fs::read_dir(&images)
        .map_err(|e| err(format!("{}: {e}", images.display())))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.to_ascii_lowercase().ends_with(".png") && !n.starts_with('.'))
        .collect();
    names.sort();
    if names.is_empty() {
        return Err(err(format!("{}: no PNG images", images.display())));
    }
    Ok(names
        .into_iter()
        .take(count)
        .map(|n| {
            let mask = root.join("masks").join(&n);
            Capture {
                source: images.join(&n),
                truth: mask.is_file().then_some(mask),
                truth_grains: None,
                name: n,
            }
        })
        .collect())
}

/// Puts `capture` into `watch` the way a microscope finishes a file: the bytes go to a hidden name
/// (the agent ignores dot files) and are renamed into place, which is atomic within a folder.
pub fn deliver(capture: &Capture, watch: &Path) -> std::io::Result<PathBuf> {
    let hidden = watch.join(format!(".{}.part", capture.name));
    std::fs::copy(&capture.source, &hidden)?;
    let target = watch.join(&capture.name);
    std::fs::rename(&hidden, &target)?;
    Ok(target)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_synthetic_lab_has_labelled_images_and_captures_with_truth() {
        let tmp = tempfile::tempdir().unwrap();
        let lab = SyntheticLab::prepare("lab-a", "hazy", tmp.path(), 64, 3, 2, 5).unwrap();
        let images = std::fs::read_dir(lab.labelled.join("images"))
            .unwrap()
            .count();
        assert_eq!(images, 3);
        assert!(lab.labelled.join("dataset.toml").is_file());
        assert_eq!(lab.captures.len(), 2);
        for c in &lab.captures {
            assert!(c.truth_grains.is_some_and(|g| g > 0), "{c:?}");
            let truth = crate::mask::Mask::load(c.truth.as_ref().unwrap()).unwrap();
            let img = image::open(&c.source).unwrap();
            assert_eq!((img.width(), img.height()), (truth.width, truth.height));
        }
        // Captures are other specimens than the labelled images.
        let first_labelled = std::fs::read(
            lab.labelled
                .join("images")
                .join("polycrystal-hazy-0000.png"),
        )
        .unwrap();
        assert_ne!(
            std::fs::read(&lab.captures[0].source).unwrap(),
            first_labelled
        );
    }

    #[test]
    fn delivery_is_a_rename_into_the_watched_folder() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("a.png");
        std::fs::write(&src, b"bytes").unwrap();
        let watch = tmp.path().join("watch");
        std::fs::create_dir(&watch).unwrap();
        let c = Capture {
            source: src,
            name: "x.png".into(),
            truth: None,
            truth_grains: None,
        };
        let p = deliver(&c, &watch).unwrap();
        assert_eq!(std::fs::read(p).unwrap(), b"bytes");
        let left: Vec<_> = std::fs::read_dir(&watch).unwrap().collect();
        assert_eq!(left.len(), 1, "no temporary left behind");
    }
}
