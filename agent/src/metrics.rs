//! How good a predicted mask is against the truth.
//!
//! Map of the module:
//! - [`ConfusionMatrix`]: pixel counts (truth row, prediction column) accumulated over many images,
//!   giving per-class IoU and Dice, mean IoU and pixel accuracy.
//! - [`boundary_pixels`], [`squared_distance_transform`], [`BoundaryCounts`]: boundary F1 with a
//!   distance tolerance.
//! - [`Evaluator`]: feeds pairs of masks to both and produces an [`Evaluation`] (serde, for JSON).
//!
//! Conventions (the numbers mean exactly this):
//! - Pixels whose TRUTH is 255 (ignore) count nowhere: not in the matrix, not as boundary pixels.
//!   A prediction must only hold classes 0..K; 255 in a prediction is an error.
//! - IoU_c = TP/(TP+FP+FN), Dice_c = 2TP/(2TP+FP+FN). A class with TP+FP+FN = 0 (absent from the truth
//!   AND the prediction) has no IoU/Dice (`None`): it is neither perfect nor wrong.
//! - Mean IoU (and mean Dice) average over the classes present in the truth or the prediction, i.e.
//!   those with an IoU. Counts are pooled over all images before dividing (dataset-level IoU), so a
//!   small image does not weigh as much as a large one.
//! - Pixel accuracy = trace / total of the matrix. With rare classes (e.g. tertiary γ′ at 2.5 %) it is
//!   dominated by the large classes: read per-class IoU.
//! - Boundary pixels of a mask: pixels with a 4-neighbour (inside the image, not ignored in the truth)
//!   of another class. A predicted boundary pixel is matched when a true boundary pixel lies within
//!   the tolerance in EUCLIDEAN distance (d ≤ tol, in pixels); precision = matched predicted / all
//!   predicted, recall = matched true / all true, F1 = 2PR/(P+R). The distance comes from an exact
//!   Euclidean distance transform (Felzenszwalb & Huttenlocher 2012), O(pixels), not O(n²). Counts are
//!   pooled over images like the matrix. Boundary F1 is class-agnostic: it scores where the edges are.

use serde::{Deserialize, Serialize};

use crate::mask::Mask;

/// Pixel value that marks "no label here" in a truth mask.
pub const IGNORE: u8 = 255;

/// Errors comparing masks.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("prediction is {pred_w}×{pred_h} but the truth is {truth_w}×{truth_h}")]
    SizeMismatch {
        truth_w: u32,
        truth_h: u32,
        pred_w: u32,
        pred_h: u32,
    },
    #[error(
        "{which} holds class index {value} at (x={x}, y={y}) but there are {k} classes{}",
        if *which == "truth" { " (255 = ignore)" } else { "" }
    )]
    ClassOutOfRange {
        which: &'static str,
        value: u8,
        x: u32,
        y: u32,
        k: usize,
    },
    #[error("number of classes must be between 1 and 255, got {0}")]
    ClassCount(usize),
    #[error("boundary tolerance must be a finite number ≥ 0 pixels, got {0}")]
    Tolerance(f64),
}

/// Pixel counts: `get(t, p)` = pixels of true class `t` predicted as `p`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfusionMatrix {
    k: usize,
    /// Row-major K×K, row = truth.
    counts: Vec<u64>,
}

impl ConfusionMatrix {
    pub fn new(k: usize) -> Result<Self, MetricsError> {
        if !(1..=255).contains(&k) {
            return Err(MetricsError::ClassCount(k));
        }
        Ok(Self {
            k,
            counts: vec![0; k * k],
        })
    }

    pub fn num_classes(&self) -> usize {
        self.k
    }

    /// Adds one image. Nothing is added when it fails.
    pub fn add(&mut self, truth: &Mask, pred: &Mask) -> Result<(), MetricsError> {
        check_pair(truth, pred, self.k)?;
        for (&t, &p) in truth.data.iter().zip(&pred.data) {
            if t != IGNORE {
                self.counts[usize::from(t) * self.k + usize::from(p)] += 1;
            }
        }
        Ok(())
    }

    /// Adds the counts of another matrix with the same K (e.g. from another thread).
    pub fn merge(&mut self, other: &ConfusionMatrix) -> Result<(), MetricsError> {
        if other.k != self.k {
            return Err(MetricsError::ClassCount(other.k));
        }
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        Ok(())
    }

    #[inline]
    pub fn get(&self, truth: usize, pred: usize) -> u64 {
        self.counts[truth * self.k + pred]
    }

    /// Pixels counted (truth not ignored).
    pub fn total(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// (TP, FP, FN) of class `c`.
    pub fn tp_fp_fn(&self, c: usize) -> (u64, u64, u64) {
        let tp = self.get(c, c);
        let pred_c: u64 = (0..self.k).map(|t| self.get(t, c)).sum();
        let truth_c: u64 = (0..self.k).map(|p| self.get(c, p)).sum();
        (tp, pred_c - tp, truth_c - tp)
    }

    /// TP/(TP+FP+FN); `None` when the class is in neither truth nor prediction.
    pub fn iou(&self, c: usize) -> Option<f64> {
        let (tp, fp, fn_) = self.tp_fp_fn(c);
        let d = tp + fp + fn_;
        (d > 0).then(|| tp as f64 / d as f64)
    }

    /// 2TP/(2TP+FP+FN); `None` when the class is in neither truth nor prediction.
    pub fn dice(&self, c: usize) -> Option<f64> {
        let (tp, fp, fn_) = self.tp_fp_fn(c);
        let d = 2 * tp + fp + fn_;
        (d > 0).then(|| 2.0 * tp as f64 / d as f64)
    }

    /// Mean IoU over the classes present in truth or prediction; `None` for an empty matrix.
    pub fn mean_iou(&self) -> Option<f64> {
        mean((0..self.k).filter_map(|c| self.iou(c)))
    }

    /// Mean Dice with the same convention as [`Self::mean_iou`].
    pub fn mean_dice(&self) -> Option<f64> {
        mean((0..self.k).filter_map(|c| self.dice(c)))
    }

    /// Correct pixels / counted pixels; `None` for an empty matrix.
    pub fn pixel_accuracy(&self) -> Option<f64> {
        let total = self.total();
        let diag: u64 = (0..self.k).map(|c| self.get(c, c)).sum();
        (total > 0).then(|| diag as f64 / total as f64)
    }

    /// Rows of the matrix (truth), for reports.
    pub fn rows(&self) -> Vec<Vec<u64>> {
        self.counts.chunks(self.k).map(<[u64]>::to_vec).collect()
    }
}

fn mean(values: impl Iterator<Item = f64>) -> Option<f64> {
    let (sum, n) = values.fold((0.0, 0usize), |(s, n), v| (s + v, n + 1));
    (n > 0).then(|| sum / n as f64)
}

fn check_pair(truth: &Mask, pred: &Mask, k: usize) -> Result<(), MetricsError> {
    if (truth.width, truth.height) != (pred.width, pred.height) {
        return Err(MetricsError::SizeMismatch {
            truth_w: truth.width,
            truth_h: truth.height,
            pred_w: pred.width,
            pred_h: pred.height,
        });
    }
    let w = truth.width as usize;
    let at = |i: usize| ((i % w) as u32, (i / w) as u32);
    if let Some(i) = truth
        .data
        .iter()
        .position(|&v| usize::from(v) >= k && v != IGNORE)
    {
        let (x, y) = at(i);
        return Err(MetricsError::ClassOutOfRange {
            which: "truth",
            value: truth.data[i],
            x,
            y,
            k,
        });
    }
    if let Some(i) = pred.data.iter().position(|&v| usize::from(v) >= k) {
        let (x, y) = at(i);
        return Err(MetricsError::ClassOutOfRange {
            which: "prediction",
            value: pred.data[i],
            x,
            y,
            k,
        });
    }
    Ok(())
}

/// Boundary pixels of `mask`: a pixel whose 4-neighbour (inside the image) has another class.
/// Where `ignore` is given (the truth), pixels ignored there are never boundary pixels and ignored
/// neighbours do not make a boundary (the edge of an unlabelled region is not a material boundary).
pub fn boundary_pixels(mask: &Mask, ignore: Option<&Mask>) -> Vec<bool> {
    let (w, h) = (mask.width as usize, mask.height as usize);
    let ignored = |i: usize| ignore.is_some_and(|m| m.data[i] == IGNORE);
    let mut out = vec![false; w * h];
    for y in 0..h {
        for x in 0..w {
            let i = y * w + x;
            if ignored(i) {
                continue;
            }
            let v = mask.data[i];
            let differs = |j: usize| !ignored(j) && mask.data[j] != v;
            out[i] = (x > 0 && differs(i - 1))
                || (x + 1 < w && differs(i + 1))
                || (y > 0 && differs(i - w))
                || (y + 1 < h && differs(i + w));
        }
    }
    out
}

/// Squared Euclidean distance from each pixel to the nearest `true` pixel of `seeds` (row-major,
/// `width × height`); `f64::INFINITY` everywhere when there is no seed. Exact, separable, O(pixels):
/// the lower envelope of parabolas of Felzenszwalb & Huttenlocher (Theory of Computing 8, 2012).
pub fn squared_distance_transform(seeds: &[bool], width: usize, height: usize) -> Vec<f64> {
    assert_eq!(seeds.len(), width * height, "seeds do not match the size");
    // A finite stand-in for infinity keeps the parabola intersections finite; larger than any real
    // squared distance in an image (≤ 2·65 535²·…) yet far from overflow.
    const FAR: f64 = 1e30;
    let mut d: Vec<f64> = seeds.iter().map(|&s| if s { 0.0 } else { FAR }).collect();
    let n = width.max(height);
    let mut f = vec![0.0; n];
    let mut out = vec![0.0; n];
    let mut v = vec![0usize; n];
    let mut z = vec![0.0; n + 1];
    for x in 0..width {
        for y in 0..height {
            f[y] = d[y * width + x];
        }
        dt_1d(&f[..height], &mut out[..height], &mut v, &mut z);
        for y in 0..height {
            d[y * width + x] = out[y];
        }
    }
    for y in 0..height {
        let row = &mut d[y * width..(y + 1) * width];
        f[..width].copy_from_slice(row);
        dt_1d(&f[..width], &mut out[..width], &mut v, &mut z);
        row.copy_from_slice(&out[..width]);
    }
    for x in &mut d {
        if *x >= FAR / 2.0 {
            *x = f64::INFINITY;
        }
    }
    d
}

/// 1-D squared distance transform of a sampled function `f` into `out`.
fn dt_1d(f: &[f64], out: &mut [f64], v: &mut [usize], z: &mut [f64]) {
    let n = f.len();
    if n == 0 {
        return;
    }
    let mut k = 0usize;
    v[0] = 0;
    z[0] = f64::NEG_INFINITY;
    z[1] = f64::INFINITY;
    for q in 1..n {
        let qf = q as f64;
        loop {
            let p = v[k];
            let pf = p as f64;
            let s = ((f[q] + qf * qf) - (f[p] + pf * pf)) / (2.0 * (qf - pf));
            if s <= z[k] && k > 0 {
                k -= 1;
            } else {
                k += 1;
                v[k] = q;
                z[k] = s;
                z[k + 1] = f64::INFINITY;
                break;
            }
        }
    }
    k = 0;
    for (q, o) in out.iter_mut().enumerate() {
        let qf = q as f64;
        while z[k + 1] < qf {
            k += 1;
        }
        let p = v[k] as f64;
        *o = (qf - p) * (qf - p) + f[v[k]];
    }
}

/// Boundary pixel counts of one or more images, pooled.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BoundaryCounts {
    pub pred_total: u64,
    pub pred_matched: u64,
    pub truth_total: u64,
    pub truth_matched: u64,
}

impl BoundaryCounts {
    /// Counts for one pair at Euclidean tolerance `tolerance_px` (sizes and classes are not checked
    /// here; [`Evaluator::add`] does that).
    pub fn of(truth: &Mask, pred: &Mask, tolerance_px: f64) -> Self {
        let (w, h) = (truth.width as usize, truth.height as usize);
        let tb = boundary_pixels(truth, Some(truth));
        let pb = boundary_pixels(pred, Some(truth));
        let tol2 = tolerance_px * tolerance_px;
        let dt_truth = squared_distance_transform(&tb, w, h);
        let dt_pred = squared_distance_transform(&pb, w, h);
        let mut c = Self::default();
        for i in 0..w * h {
            if pb[i] {
                c.pred_total += 1;
                c.pred_matched += u64::from(dt_truth[i] <= tol2);
            }
            if tb[i] {
                c.truth_total += 1;
                c.truth_matched += u64::from(dt_pred[i] <= tol2);
            }
        }
        c
    }

    pub fn add(&mut self, other: &BoundaryCounts) {
        self.pred_total += other.pred_total;
        self.pred_matched += other.pred_matched;
        self.truth_total += other.truth_total;
        self.truth_matched += other.truth_matched;
    }

    /// Matched predicted / predicted; `None` without predicted boundary.
    pub fn precision(&self) -> Option<f64> {
        (self.pred_total > 0).then(|| self.pred_matched as f64 / self.pred_total as f64)
    }

    /// Matched true / true; `None` without true boundary.
    pub fn recall(&self) -> Option<f64> {
        (self.truth_total > 0).then(|| self.truth_matched as f64 / self.truth_total as f64)
    }

    /// 2PR/(P+R). `None` when neither mask has a boundary (nothing to score); 0 when only one has.
    pub fn f1(&self) -> Option<f64> {
        match (self.precision(), self.recall()) {
            (None, None) => None,
            (Some(p), Some(r)) if p + r > 0.0 => Some(2.0 * p * r / (p + r)),
            _ => Some(0.0),
        }
    }
}

/// Scores of one image (for per-image tables).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageScore {
    pub name: String,
    pub pixel_accuracy: Option<f64>,
    pub mean_iou: Option<f64>,
    pub boundary_f1: Option<f64>,
}

/// Scores of one class over all images.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassScore {
    pub index: u8,
    pub name: String,
    pub iou: Option<f64>,
    pub dice: Option<f64>,
    /// Pixels of this class in the truth and in the prediction (truth-ignored pixels excluded).
    pub truth_pixels: u64,
    pub pred_pixels: u64,
}

/// Boundary F1 summary.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BoundaryScore {
    /// Euclidean tolerance in pixels.
    pub tolerance_px: f64,
    pub precision: Option<f64>,
    pub recall: Option<f64>,
    pub f1: Option<f64>,
    pub counts: BoundaryCounts,
}

/// Everything an evaluation reports (written as JSON by `microfed eval`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Evaluation {
    pub images: usize,
    pub pixels: u64,
    pub classes: Vec<ClassScore>,
    pub mean_iou: Option<f64>,
    pub mean_dice: Option<f64>,
    pub pixel_accuracy: Option<f64>,
    pub boundary: BoundaryScore,
    /// Rows = truth class, columns = predicted class.
    pub confusion: Vec<Vec<u64>>,
    pub per_image: Vec<ImageScore>,
}

/// Accumulates the confusion matrix and boundary counts over many pairs.
#[derive(Debug, Clone)]
pub struct Evaluator {
    matrix: ConfusionMatrix,
    boundary: BoundaryCounts,
    tolerance_px: f64,
    per_image: Vec<ImageScore>,
}

impl Evaluator {
    pub fn new(k: usize, tolerance_px: f64) -> Result<Self, MetricsError> {
        if !(tolerance_px.is_finite() && tolerance_px >= 0.0) {
            return Err(MetricsError::Tolerance(tolerance_px));
        }
        Ok(Self {
            matrix: ConfusionMatrix::new(k)?,
            boundary: BoundaryCounts::default(),
            tolerance_px,
            per_image: Vec::new(),
        })
    }

    /// Adds one pair, returning its own scores. Nothing is added when it fails.
    pub fn add(
        &mut self,
        name: &str,
        truth: &Mask,
        pred: &Mask,
    ) -> Result<ImageScore, MetricsError> {
        let mut one = ConfusionMatrix::new(self.matrix.k)?;
        one.add(truth, pred)?;
        let b = BoundaryCounts::of(truth, pred, self.tolerance_px);
        self.matrix.merge(&one)?;
        self.boundary.add(&b);
        let score = ImageScore {
            name: name.to_owned(),
            pixel_accuracy: one.pixel_accuracy(),
            mean_iou: one.mean_iou(),
            boundary_f1: b.f1(),
        };
        self.per_image.push(score.clone());
        Ok(score)
    }

    /// Adds everything another evaluator gathered (same K and tolerance), e.g. from another thread.
    pub fn merge(&mut self, other: Evaluator) -> Result<(), MetricsError> {
        if other.tolerance_px != self.tolerance_px {
            return Err(MetricsError::Tolerance(other.tolerance_px));
        }
        self.matrix.merge(&other.matrix)?;
        self.boundary.add(&other.boundary);
        self.per_image.extend(other.per_image);
        Ok(())
    }

    pub fn matrix(&self) -> &ConfusionMatrix {
        &self.matrix
    }

    /// The pooled result; `class_names[c]` names class c (missing names become `class c`).
    /// Per-image scores are sorted by name, so the result does not depend on the order of adding.
    pub fn finish(&self, class_names: &[String]) -> Evaluation {
        let m = &self.matrix;
        let classes = (0..m.k)
            .map(|c| ClassScore {
                index: c as u8,
                name: class_names
                    .get(c)
                    .cloned()
                    .unwrap_or_else(|| format!("class {c}")),
                iou: m.iou(c),
                dice: m.dice(c),
                truth_pixels: (0..m.k).map(|p| m.get(c, p)).sum(),
                pred_pixels: (0..m.k).map(|t| m.get(t, c)).sum(),
            })
            .collect();
        Evaluation {
            images: self.per_image.len(),
            pixels: m.total(),
            classes,
            mean_iou: m.mean_iou(),
            mean_dice: m.mean_dice(),
            pixel_accuracy: m.pixel_accuracy(),
            boundary: BoundaryScore {
                tolerance_px: self.tolerance_px,
                precision: self.boundary.precision(),
                recall: self.boundary.recall(),
                f1: self.boundary.f1(),
                counts: self.boundary,
            },
            confusion: m.rows(),
            per_image: {
                let mut v = self.per_image.clone();
                v.sort_by(|a, b| a.name.cmp(&b.name));
                v
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// The transform agrees with brute force on random seeds, including rows/columns without seeds.
    #[test]
    fn distance_transform_matches_brute_force() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        for (w, h, p) in [(17, 11, 0.05), (1, 9, 0.3), (9, 1, 0.3), (23, 19, 0.01)] {
            let seeds: Vec<bool> = (0..w * h).map(|_| rng.random_bool(p)).collect();
            let dt = squared_distance_transform(&seeds, w, h);
            for y in 0..h {
                for x in 0..w {
                    let mut best = f64::INFINITY;
                    for j in 0..h {
                        for i in 0..w {
                            if seeds[j * w + i] {
                                let d =
                                    (i as f64 - x as f64).powi(2) + (j as f64 - y as f64).powi(2);
                                best = best.min(d);
                            }
                        }
                    }
                    assert_eq!(dt[y * w + x], best, "({x},{y}) in {w}×{h}");
                }
            }
        }
        assert!(
            squared_distance_transform(&[false; 6], 3, 2)
                .iter()
                .all(|d| d.is_infinite())
        );
    }
}
