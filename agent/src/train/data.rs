//! The training data in memory: every image of the given dataset folders decoded once into normalised
//! `f32` pixels with its mask, split by image into training and validation sets.
//!
//! Map:
//! - [`TrainingImage`]: one decoded micrograph and its labels.
//! - [`TrainingSet::load`]: opens the folders (same classes required), filters by an image list,
//!   decodes in parallel, splits.
//! - [`read_image_list`]: the `--images-from LIST.txt` file (one stem per line).
//! - [`auto_class_weights`]: inverse-square-root frequency weights, normalised to mean 1.
//!
//! The split is by image, never by crop, so no validation pixel is ever seen in training. It is drawn
//! per dataset from the seed: each dataset with ≥ 2 images gives at least one validation image and
//! keeps at least one for training, so every lab style is both learned and checked.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use super::TrainError;
use crate::classes::ClassDef;
use crate::dataset::{Dataset, IGNORE};
use crate::micrograph::Normalisation;
pub use crate::model::manifest::DatasetRecord;

pub use crate::dataset::TrainingImage;

/// Training and validation images of one or more datasets with the same classes.
#[derive(Debug, Clone)]
pub struct TrainingSet {
    pub classes: Vec<ClassDef>,
    pub datasets: Vec<DatasetRecord>,
    pub train: Vec<TrainingImage>,
    pub validation: Vec<TrainingImage>,
}

/// Reads an image list: one stem per line (a file name or path is reduced to its stem), blank lines
/// and `#` comments ignored.
pub fn read_image_list(path: &Path) -> Result<BTreeSet<String>, TrainError> {
    let text = std::fs::read_to_string(path).map_err(|source| TrainError::Io {
        path: path.to_owned(),
        source,
    })?;
    let stems: BTreeSet<String> = text
        .lines()
        .map(|l| l.split('#').next().unwrap_or("").trim())
        .filter(|l| !l.is_empty())
        .map(|l| {
            Path::new(l)
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| l.to_owned())
        })
        .collect();
    if stems.is_empty() {
        return Err(TrainError::Config(format!(
            "{}: the image list names no image",
            path.display()
        )));
    }
    Ok(stems)
}

impl TrainingSet {
    /// Opens every folder (classes from `classes` when given, else each folder's dataset.toml), keeps
    /// the images whose stem is in `only` (when given; `only_label` names the list in errors),
    /// decodes them with `norm`, and splits each dataset with `val_fraction` of its images (rounded,
    /// at least 1 when it has ≥ 2 and the fraction is > 0) drawn from `seed`.
    pub fn load(
        dirs: &[PathBuf],
        classes: Option<&Path>,
        only: Option<(&BTreeSet<String>, &Path)>,
        norm: &Normalisation,
        val_fraction: f64,
        seed: u64,
    ) -> Result<Self, TrainError> {
        if dirs.is_empty() {
            return Err(TrainError::Config(
                "no dataset folder given (--data DIR)".into(),
            ));
        }
        if !(0.0..1.0).contains(&val_fraction) {
            return Err(TrainError::Config(format!(
                "--val-fraction must be in [0, 1), got {val_fraction}"
            )));
        }
        let mut set = TrainingSet {
            classes: Vec::new(),
            datasets: Vec::new(),
            train: Vec::new(),
            validation: Vec::new(),
        };
        let mut found = BTreeSet::new();
        for (d, dir) in dirs.iter().enumerate() {
            let ds = Dataset::open(dir, classes)?.with_normalisation(*norm);
            if d == 0 {
                set.classes = ds.manifest.classes.clone();
            } else if ds.manifest.classes != set.classes {
                return Err(TrainError::ClassMismatch {
                    dir: dir.clone(),
                    first: dirs[0].clone(),
                    classes: names(&ds.manifest.classes),
                    first_classes: names(&set.classes),
                });
            }
            let keep: Vec<usize> = (0..ds.len())
                .filter(|&i| only.is_none_or(|(list, _)| list.contains(&ds.pairs()[i].stem)))
                .collect();
            found.extend(keep.iter().map(|&i| ds.pairs()[i].stem.clone()));
            let mut images: Vec<TrainingImage> = keep
                .par_iter()
                .map(|&i| {
                    let (m, mask) = ds.load_pair(i)?;
                    Ok(TrainingImage {
                        dataset: d,
                        stem: ds.pairs()[i].stem.clone(),
                        width: m.width as usize,
                        height: m.height as usize,
                        pixels: m.pixels,
                        labels: mask.data,
                    })
                })
                .collect::<Result<_, TrainError>>()?;
            let n_val = validation_count(images.len(), val_fraction);
            let mut order: Vec<usize> = (0..images.len()).collect();
            order.shuffle(&mut ChaCha8Rng::seed_from_u64(
                seed ^ (0x5eed_0000 + d as u64),
            ));
            let val: BTreeSet<usize> = order[..n_val].iter().copied().collect();
            let mut validation_images = Vec::new();
            for (i, img) in images.drain(..).enumerate() {
                if val.contains(&i) {
                    validation_images.push(img.stem.clone());
                    set.validation.push(img);
                } else {
                    set.train.push(img);
                }
            }
            set.datasets.push(DatasetRecord {
                folder: dir.clone(),
                name: ds.manifest.name.clone(),
                train_images: keep.len() - n_val,
                validation_images,
                source: ds.manifest.source.clone(),
            });
        }
        if let Some((list, path)) = only
            && let Some(missing) = list.iter().find(|s| !found.contains(*s))
        {
            return Err(TrainError::Config(format!(
                "{}: image `{missing}` is in no dataset folder given",
                path.display()
            )));
        }
        if set.train.is_empty() {
            return Err(TrainError::Config(format!(
                "no training images left in {}",
                dirs.iter()
                    .map(|d| d.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        Ok(set)
    }

    pub fn num_classes(&self) -> usize {
        self.classes.len()
    }

    /// Labelled pixels of each class over the training images (ignore excluded).
    pub fn class_pixels(&self) -> Vec<u64> {
        let k = self.num_classes();
        let mut counts = vec![0u64; k];
        for img in &self.train {
            for &v in &img.labels {
                if v != IGNORE && usize::from(v) < k {
                    counts[usize::from(v)] += 1;
                }
            }
        }
        counts
    }
}

fn names(classes: &[ClassDef]) -> String {
    classes
        .iter()
        .map(|c| c.name.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Validation images out of `n`: `round(n·fraction)`, at least 1 when `n ≥ 2` and the fraction is
/// positive, and never all of them.
pub fn validation_count(n: usize, fraction: f64) -> usize {
    if n < 2 || fraction <= 0.0 {
        return 0;
    }
    ((n as f64 * fraction).round() as usize).clamp(1, n - 1)
}

/// Cross-entropy weights from class pixel counts: `1/√frequency`, normalised to mean 1 over the
/// classes. A class absent from the training data gets the mean weight of the others (it is never a
/// target, but keeps the normalisation meaningful). Square root rather than plain inverse frequency:
/// a class at 2 % would otherwise weigh 25× the matrix and the network would over-predict it.
pub fn auto_class_weights(counts: &[u64]) -> Vec<f32> {
    let total: u64 = counts.iter().sum();
    if total == 0 {
        return vec![1.0; counts.len()];
    }
    let raw: Vec<Option<f64>> = counts
        .iter()
        .map(|&c| (c > 0).then(|| (total as f64 / c as f64).sqrt()))
        .collect();
    let present: Vec<f64> = raw.iter().flatten().copied().collect();
    let fill = present.iter().sum::<f64>() / present.len() as f64;
    let w: Vec<f64> = raw.iter().map(|r| r.unwrap_or(fill)).collect();
    let mean = w.iter().sum::<f64>() / w.len() as f64;
    w.iter().map(|v| (v / mean) as f32).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_weights_are_inverse_sqrt_frequency_with_mean_one() {
        // Shares 0.64, 0.32, 0.04: raw 1/√f = 1.25, 1.7678, 5.0; mean 2.6726.
        let w = auto_class_weights(&[64, 32, 4]);
        let raw = [1.25f64, 1.767_766_95, 5.0];
        let mean = raw.iter().sum::<f64>() / 3.0;
        for (got, r) in w.iter().zip(raw) {
            assert!((f64::from(*got) - r / mean).abs() < 1e-6, "{w:?}");
        }
        assert!((w.iter().sum::<f32>() / 3.0 - 1.0).abs() < 1e-6);
        // An absent class takes the mean of the present ones before normalising.
        let w = auto_class_weights(&[50, 50, 0]);
        assert!(w.iter().all(|v| (v - 1.0).abs() < 1e-6), "{w:?}");
    }

    #[test]
    fn validation_count_keeps_one_each_side() {
        assert_eq!(validation_count(1, 0.15), 0);
        assert_eq!(validation_count(2, 0.15), 1);
        assert_eq!(validation_count(2, 0.9), 1);
        assert_eq!(validation_count(20, 0.15), 3);
        assert_eq!(validation_count(20, 0.0), 0);
    }
}
