//! Training samples: a random square crop of a micrograph and its mask, seen through one of the
//! eight symmetries of the square, with brightness and contrast jitter.
//!
//! Map:
//! - [`Augment`]: what may vary (flips, 90° rotations, jitter ranges); serde, so the manifest records it.
//! - [`Augment::sample`]: one (image, labels) crop from a [`TrainingImage`], drawn from an RNG.
//! - [`reflect`]: mirror indexing for images smaller than the crop.
//!
//! Conventions:
//! - Micrographs have no preferred orientation (a specimen may sit in the microscope any way round),
//!   so all eight dihedral transforms are label-preserving. The transform is applied to the *sampling
//!   coordinates*, so the image and mask are read through exactly the same map: they cannot drift apart.
//! - An image smaller than the crop along a side is padded by reflection (the pattern continues, which
//!   keeps the statistics of the convolutions' inputs), and the padded pixels get label 255 (ignore):
//!   the network sees plausible context there but is never taught a made-up answer.
//! - Jitter acts on the normalised values: `v' = c·v + b` with `c` uniform in `1 ± contrast` and `b`
//!   uniform in `± brightness` (normalised units, i.e. multiples of the normalisation's std). Microscope
//!   brightness and contrast settings differ between sessions and labs; this teaches the network not
//!   to rely on absolute grey levels.

use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::dataset::IGNORE;
use crate::dataset::TrainingImage;

/// What varies between training samples.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Augment {
    /// Random horizontal and vertical flips.
    pub flips: bool,
    /// Random rotations by multiples of 90°.
    pub rotations: bool,
    /// Half-width of the uniform additive jitter, in normalised units.
    pub brightness: f32,
    /// Half-width of the uniform multiplicative jitter around 1.
    pub contrast: f32,
}

impl Default for Augment {
    fn default() -> Self {
        Self {
            flips: true,
            rotations: true,
            brightness: 0.2,
            contrast: 0.2,
        }
    }
}

impl Augment {
    /// No augmentation at all (a plain random crop).
    pub fn none() -> Self {
        Self {
            flips: false,
            rotations: false,
            brightness: 0.0,
            contrast: 0.0,
        }
    }

    /// Draws one `crop × crop` sample of `image`: pixels into `x` and labels into `labels` (both of
    /// length `crop²`, row-major). The RNG is consumed in a fixed order, so a seeded RNG gives the
    /// same sample every time.
    pub fn sample<R: Rng>(
        &self,
        image: &TrainingImage,
        crop: usize,
        rng: &mut R,
        x: &mut [f32],
        labels: &mut [u8],
    ) {
        let (w, h) = (image.width, image.height);
        // Origin of the crop in image coordinates; negative (or past the end) only when the image is
        // smaller than the crop, in which case the image lies at a random place inside the crop.
        let mut origin = |side: usize| -> isize {
            let slack = side as i64 - crop as i64;
            (if slack >= 0 {
                rng.random_range(0..=slack)
            } else {
                rng.random_range(slack..=0)
            }) as isize
        };
        let ox = origin(w);
        let oy = origin(h);
        let rot = if self.rotations {
            rng.random_range(0..4u8)
        } else {
            0
        };
        let flip_x = self.flips && rng.random_bool(0.5);
        let flip_y = self.flips && rng.random_bool(0.5);
        let contrast = 1.0 + jitter(rng, self.contrast);
        let brightness = jitter(rng, self.brightness);

        let s = crop;
        for i in 0..s {
            for j in 0..s {
                let (si, sj) = dihedral(rot, flip_x, flip_y, i, j, s);
                let (iy, ix) = (oy + si as isize, ox + sj as isize);
                let inside = (0..h as isize).contains(&iy) && (0..w as isize).contains(&ix);
                let (ry, rx) = (reflect(iy, h), reflect(ix, w));
                let at = ry * w + rx;
                x[i * s + j] = contrast * image.pixels[at] + brightness;
                labels[i * s + j] = if inside { image.labels[at] } else { IGNORE };
            }
        }
    }
}

fn jitter<R: Rng>(rng: &mut R, half_width: f32) -> f32 {
    if half_width > 0.0 {
        rng.random_range(-half_width..=half_width)
    } else {
        0.0
    }
}

/// Source position in the untransformed `s × s` crop of output position `(i, j)` (row, column):
/// rotation by `rot`·90° and then the flips. All eight maps are bijections of the square.
#[inline]
pub fn dihedral(
    rot: u8,
    flip_x: bool,
    flip_y: bool,
    i: usize,
    j: usize,
    s: usize,
) -> (usize, usize) {
    let (i, j) = (
        if flip_y { s - 1 - i } else { i },
        if flip_x { s - 1 - j } else { j },
    );
    match rot & 3 {
        0 => (i, j),
        1 => (j, s - 1 - i),
        2 => (s - 1 - i, s - 1 - j),
        _ => (s - 1 - j, i),
    }
}

/// Mirror index into `0..n` for any integer: `…, 2, 1, 0, 1, 2, …, n−1, n−2, …` (the edge pixel is not
/// repeated, like NumPy's `reflect` mode), periodic with period `2(n − 1)`.
#[inline]
pub fn reflect(i: isize, n: usize) -> usize {
    if n <= 1 {
        return 0;
    }
    let period = 2 * (n as isize - 1);
    let m = i.rem_euclid(period);
    (if m < n as isize { m } else { period - m }) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reflect_mirrors_without_repeating_the_edge() {
        let got: Vec<usize> = (-4..9).map(|i| reflect(i, 4)).collect();
        assert_eq!(got, vec![2, 3, 2, 1, 0, 1, 2, 3, 2, 1, 0, 1, 2]);
        assert_eq!(reflect(-7, 1), 0);
    }

    #[test]
    fn dihedral_maps_are_bijections_and_distinct() {
        let s = 5;
        let mut seen = Vec::new();
        for rot in 0..4 {
            for fx in [false, true] {
                for fy in [false, true] {
                    let map: Vec<(usize, usize)> = (0..s * s)
                        .map(|k| dihedral(rot, fx, fy, k / s, k % s, s))
                        .collect();
                    let mut sorted = map.clone();
                    sorted.sort();
                    sorted.dedup();
                    assert_eq!(sorted.len(), s * s);
                    seen.push(map);
                }
            }
        }
        // 16 combinations cover the 8 elements of the group, each twice.
        seen.sort();
        seen.dedup();
        assert_eq!(seen.len(), 8);
    }
}
