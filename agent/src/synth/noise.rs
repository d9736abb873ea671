//! Deterministic noise fields and filters shared by the geometry and the renderer.
//!
//! - [`ValueNoise`]: lattice value noise with smooth interpolation, and its fractal sum (`fbm`), used for
//!   curved grain boundaries (domain warping), surface texture, charging blotches and particle clustering.
//!   It is a pure function of (seed, x, y), so a field never depends on evaluation order or threads.
//! - [`gaussian_blur`]: separable Gaussian blur with clamped edges (defocus, groove profiles).
//! - [`label_components`]: flood-fill labelling of pixels that share an id (grains, twin lamellae).

/// Integer hash of a lattice point; a few multiply-xorshift rounds are enough for visual noise.
#[inline]
fn hash2(x: i32, y: i32, seed: u32) -> u32 {
    let mut h = (x as u32).wrapping_mul(0x27d4_eb2d)
        ^ (y as u32).wrapping_mul(0x1656_67b1)
        ^ seed.wrapping_mul(0x9e37_79b9);
    h ^= h >> 15;
    h = h.wrapping_mul(0x2c1b_3c6d);
    h ^= h >> 12;
    h = h.wrapping_mul(0x297a_2d39);
    h ^= h >> 15;
    h
}

/// Lattice value in [-1, 1].
#[inline]
fn lattice(x: i32, y: i32, seed: u32) -> f32 {
    (hash2(x, y, seed) >> 8) as f32 * (2.0 / 16_777_216.0) - 1.0
}

/// Value noise: random values on the integer lattice, blended with a C¹ smoothstep.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ValueNoise {
    seed: u32,
}

impl ValueNoise {
    pub(crate) fn new(seed: u32) -> Self {
        Self { seed }
    }

    /// Noise at (x, y) in lattice units, in [-1, 1].
    #[inline]
    pub(crate) fn value(&self, x: f32, y: f32) -> f32 {
        let (fx, fy) = (x.floor(), y.floor());
        let (ix, iy) = (fx as i32, fy as i32);
        let (tx, ty) = (x - fx, y - fy);
        let (sx, sy) = (tx * tx * (3.0 - 2.0 * tx), ty * ty * (3.0 - 2.0 * ty));
        let a = lattice(ix, iy, self.seed);
        let b = lattice(ix + 1, iy, self.seed);
        let c = lattice(ix, iy + 1, self.seed);
        let d = lattice(ix + 1, iy + 1, self.seed);
        let top = a + (b - a) * sx;
        let bottom = c + (d - c) * sx;
        top + (bottom - top) * sy
    }

    /// Fractal sum of `octaves` octaves (each twice the frequency, half the amplitude), normalised so the
    /// result stays in [-1, 1]. Each octave uses a different seed so octaves do not align.
    #[inline]
    pub(crate) fn fbm(&self, x: f32, y: f32, octaves: u32) -> f32 {
        let (mut sum, mut amp, mut norm, mut f) = (0.0, 1.0, 0.0, 1.0);
        for o in 0..octaves.max(1) {
            let n = ValueNoise::new(self.seed.wrapping_add(o.wrapping_mul(0x68e3_1da4)));
            // The offset keeps octaves from sharing the lattice origin.
            sum += amp * n.value(x * f + 17.31 * o as f32, y * f - 9.17 * o as f32);
            norm += amp;
            amp *= 0.5;
            f *= 2.0;
        }
        sum / norm
    }
}

/// Separable Gaussian blur in place, edges clamped. Sigma below 0.2 px is a no-op.
pub(crate) fn gaussian_blur(data: &mut [f32], width: usize, height: usize, sigma: f32) {
    if sigma < 0.2 || width == 0 || height == 0 {
        return;
    }
    let radius = (3.0 * sigma).ceil() as usize;
    let kernel: Vec<f32> = {
        let k: Vec<f32> = (0..=2 * radius)
            .map(|i| {
                let d = i as f32 - radius as f32;
                (-d * d / (2.0 * sigma * sigma)).exp()
            })
            .collect();
        let s: f32 = k.iter().sum();
        k.into_iter().map(|v| v / s).collect()
    };
    let r = radius as isize;
    let mut line = vec![0.0f32; width.max(height)];
    // Rows.
    for y in 0..height {
        let row = &mut data[y * width..(y + 1) * width];
        line[..width].copy_from_slice(row);
        for (x, out) in row.iter_mut().enumerate() {
            let mut acc = 0.0;
            for (k, w) in kernel.iter().enumerate() {
                let xi = (x as isize + k as isize - r).clamp(0, width as isize - 1) as usize;
                acc += w * line[xi];
            }
            *out = acc;
        }
    }
    // Columns.
    for x in 0..width {
        for y in 0..height {
            line[y] = data[y * width + x];
        }
        for y in 0..height {
            let mut acc = 0.0;
            for (k, w) in kernel.iter().enumerate() {
                let yi = (y as isize + k as isize - r).clamp(0, height as isize - 1) as usize;
                acc += w * line[yi];
            }
            data[y * width + x] = acc;
        }
    }
}

/// Sentinel for pixels that take part in no component.
pub(crate) const NO_LABEL: u32 = u32::MAX;

/// Labels the connected components of pixels with equal `ids`, among the pixels where `include` is true.
/// `eight` selects 8-connectivity (else 4). Returns the label per pixel ([`NO_LABEL`] where excluded) and
/// the number of components; labels are numbered in raster order of each component's first pixel, so
/// the result is deterministic.
pub(crate) fn label_components(
    ids: &[u32],
    width: usize,
    height: usize,
    include: impl Fn(usize) -> bool,
    eight: bool,
) -> (Vec<u32>, u32) {
    let mut labels = vec![NO_LABEL; ids.len()];
    let mut next = 0u32;
    let mut stack: Vec<usize> = Vec::new();
    for start in 0..ids.len() {
        if labels[start] != NO_LABEL || !include(start) {
            continue;
        }
        let id = ids[start];
        labels[start] = next;
        stack.push(start);
        while let Some(p) = stack.pop() {
            let (x, y) = ((p % width) as isize, (p / width) as isize);
            for dy in -1isize..=1 {
                for dx in -1isize..=1 {
                    if (dx == 0 && dy == 0) || (!eight && dx != 0 && dy != 0) {
                        continue;
                    }
                    let (nx, ny) = (x + dx, y + dy);
                    if nx < 0 || ny < 0 || nx >= width as isize || ny >= height as isize {
                        continue;
                    }
                    let q = ny as usize * width + nx as usize;
                    if labels[q] == NO_LABEL && ids[q] == id && include(q) {
                        labels[q] = next;
                        stack.push(q);
                    }
                }
            }
        }
        next += 1;
    }
    (labels, next)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn value_noise_is_continuous_and_bounded() {
        let n = ValueNoise::new(7);
        for i in 0..1000 {
            let x = i as f32 * 0.013;
            let v = n.fbm(x, 3.3 - x, 4);
            assert!((-1.0..=1.0).contains(&v));
            // Lipschitz: a tiny step changes the value a little.
            assert!((n.value(x + 1e-3, 0.5) - n.value(x, 0.5)).abs() < 0.01);
        }
        // Lattice points take the lattice values exactly.
        assert_eq!(n.value(3.0, 4.0), lattice(3, 4, 7));
    }

    #[test]
    fn blur_preserves_mean_and_spreads_a_spike() {
        let (w, h) = (21, 15);
        let mut d = vec![0.0f32; w * h];
        d[7 * w + 10] = 1.0;
        gaussian_blur(&mut d, w, h, 1.5);
        let sum: f32 = d.iter().sum();
        assert!((sum - 1.0).abs() < 1e-4, "mass {sum}");
        assert!(d[7 * w + 10] < 0.1 && d[7 * w + 11] > 0.0);
        assert!((d[7 * w + 9] - d[7 * w + 11]).abs() < 1e-6, "symmetric");
    }

    #[test]
    fn components_four_versus_eight() {
        // Two pixels of id 1 touching only at a corner.
        let ids = [1, 0, 0, 1];
        let (_, n4) = label_components(&ids, 2, 2, |p| ids[p] == 1, false);
        let (_, n8) = label_components(&ids, 2, 2, |p| ids[p] == 1, true);
        assert_eq!((n4, n8), (2, 1));
    }
}
