//! The microscope: turns a [`Scene`] (what is on the specimen) into 16-bit intensities in a [`Style`].
//!
//! Order of operations follows the physics, specimen first, detector last:
//! 1. specimen contrast: phase levels × `contrast`, grain orientation tone × `grain_shading`;
//! 2. boundaries/interfaces: etched groove (darker) or secondary-electron edge (brighter), softened;
//! 3. pores and inclusions, polishing scratches, dust;
//! 4. surface texture (fractal value noise);
//! 5. illumination: linear gradient, vignetting, charging blotch;
//! 6. optics: Gaussian defocus blur;
//! 7. scan: per-line horizontal jitter and gain (SEM);
//! 8. detector: Poisson shot noise and Gaussian read noise; quantisation to 16 bits.

use rand::Rng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Poisson, StandardNormal};
use rayon::prelude::*;

use super::noise::{ValueNoise, gaussian_blur};
use super::style::{BoundaryKind, Style};

/// A dark blob on the specimen (pore, inclusion).
#[derive(Debug, Clone)]
pub(crate) struct Blob {
    pub x: f32,
    pub y: f32,
    pub r: f32,
    /// Relative darkness 0..1 (scaled by the style's `pore_darkness`).
    pub depth: f32,
}

/// What the microscope looks at, per pixel.
#[derive(Debug, Clone)]
pub(crate) struct Scene {
    pub width: usize,
    pub height: usize,
    /// Phase level, about −0.6..0.6 (0 for a single-phase polycrystal).
    pub phase: Vec<f32>,
    /// Orientation tone of the grain or particle, −1..1.
    pub orient: Vec<f32>,
    /// 1 on boundary/interface pixels, 0 elsewhere.
    pub edge: Vec<f32>,
    pub blobs: Vec<Blob>,
}

#[inline]
fn normal(rng: &mut ChaCha8Rng) -> f32 {
    rng.sample::<f32, _>(StandardNormal)
}

/// Mean count `mean` turned into an integer count: its floor plus one with probability of its fraction.
fn count_from_mean(rng: &mut ChaCha8Rng, mean: f32) -> usize {
    let mean = mean.max(0.0);
    mean.floor() as usize + usize::from(rng.random::<f32>() < mean.fract())
}

pub(crate) fn render(scene: &Scene, style: &Style, rng: &mut ChaCha8Rng) -> Vec<u16> {
    let (w, h) = (scene.width, scene.height);
    let n = w * h;
    let (wf, hf) = (w as f32, h as f32);
    let area_scale = (wf * hf) / (512.0 * 512.0);

    // 2. Boundary profile: a 1-px line blurred by the softness keeps a peak of about 1.
    let mut edge = scene.edge.clone();
    let soft = style.boundary.softness_px;
    if soft >= 0.2 {
        gaussian_blur(&mut edge, w, h, soft);
        let gain = (2.0 * std::f32::consts::PI).sqrt() * soft.max(0.4);
        for e in &mut edge {
            *e = (*e * gain).min(1.0);
        }
    }

    // 1 + 2. Specimen contrast and boundaries.
    let mut img = vec![0.0f32; n];
    for q in 0..n {
        let base = style.brightness
            + style.contrast * scene.phase[q]
            + style.grain_shading * scene.orient[q];
        let e = edge[q] * style.boundary.strength;
        img[q] = match style.boundary.kind {
            BoundaryKind::Groove => base * (1.0 - e),
            BoundaryKind::BrightEdge => base + e,
        };
    }

    // 3. Pores and inclusions: soft-edged dark discs.
    for b in &scene.blobs {
        let reach = b.r + 1.5;
        let (x0, x1) = (
            (b.x - reach).floor().max(0.0) as usize,
            ((b.x + reach).ceil() as usize).min(w),
        );
        let (y0, y1) = (
            (b.y - reach).floor().max(0.0) as usize,
            ((b.y + reach).ceil() as usize).min(h),
        );
        for y in y0..y1 {
            for x in x0..x1 {
                let d = ((x as f32 + 0.5 - b.x).powi(2) + (y as f32 + 0.5 - b.y).powi(2)).sqrt();
                let t = (b.r + 0.7 - d).clamp(0.0, 1.4) / 1.4;
                img[y * w + x] *= 1.0 - style.pore_darkness * b.depth * t;
            }
        }
    }

    // Scratches: long thin lines, most along one polishing direction, fading out at their ends.
    let scratches = count_from_mean(rng, style.scratches.per_512px * area_scale.sqrt());
    let polish: f32 = rng.random_range(0.0..std::f32::consts::PI);
    for _ in 0..scratches {
        let theta = if rng.random::<f32>() < 0.75 {
            polish + 0.08 * normal(rng)
        } else {
            rng.random_range(0.0..std::f32::consts::PI)
        };
        let (dx, dy) = (theta.cos(), theta.sin());
        let (px, py) = (rng.random_range(0.0..wf), rng.random_range(0.0..hf));
        let half_len = rng.random_range(0.2..0.9) * (wf + hf);
        let sigma = rng.random_range(0.45f32..1.1);
        let amp = style.scratches.strength * rng.random_range(0.4f32..1.0);
        let m = 3.5 * sigma;
        for y in 0..h {
            let ry = y as f32 + 0.5 - py;
            // across(x) = k − x·dy; only the columns with |across| ≤ m are touched.
            let k = ry * dx + (px - 0.5) * dy;
            let (xa, xb) = if dy.abs() < 1e-4 {
                if k.abs() > m { continue } else { (0.0, wf) }
            } else {
                let (a, b) = ((k - m) / dy, (k + m) / dy);
                (a.min(b).floor(), a.max(b).ceil() + 1.0)
            };
            for x in (xa.max(0.0) as usize)..(xb.clamp(0.0, wf) as usize) {
                let rx = x as f32 + 0.5 - px;
                let across = rx * -dy + ry * dx;
                let along = (rx * dx + ry * dy).abs();
                let fade = ((half_len - along) / (0.2 * half_len)).clamp(0.0, 1.0);
                img[y * w + x] += amp * fade * (-across * across / (2.0 * sigma * sigma)).exp();
            }
        }
    }

    // Dust: soft Gaussian dark spots.
    let dust = count_from_mean(rng, style.dust.per_512px * area_scale);
    for _ in 0..dust {
        let (bx, by) = (rng.random_range(0.0..wf), rng.random_range(0.0..hf));
        let r = rng.random_range(2.0..style.dust.max_radius_px.max(2.5));
        let s = style.dust.strength * rng.random_range(0.5f32..1.0);
        let reach = 2.5 * r;
        let (x0, x1) = (
            (bx - reach).max(0.0) as usize,
            ((bx + reach) as usize + 1).min(w),
        );
        let (y0, y1) = (
            (by - reach).max(0.0) as usize,
            ((by + reach) as usize + 1).min(h),
        );
        for y in y0..y1 {
            for x in x0..x1 {
                let d2 = (x as f32 + 0.5 - bx).powi(2) + (y as f32 + 0.5 - by).powi(2);
                img[y * w + x] *= 1.0 - s * (-d2 / (r * r)).exp();
            }
        }
    }

    // 4. Texture, 5. illumination.
    let texture = ValueNoise::new(rng.random());
    let tex_scale = 1.0 / style.texture.scale_px;
    let g_angle: f32 = rng.random_range(0.0..std::f32::consts::TAU);
    let (gx, gy) = (g_angle.cos(), g_angle.sin());
    let half_diag = 0.5 * (wf * wf + hf * hf).sqrt();
    let (cx, cy) = (0.5 * wf, 0.5 * hf);
    let (qx, qy) = (
        rng.random_range(-0.2..1.2) * wf,
        rng.random_range(-0.2..1.2) * hf,
    );
    let charge_r2 = 2.0 * (0.45 * half_diag).powi(2);
    img.par_chunks_mut(w).enumerate().for_each(|(y, row)| {
        for (x, px) in row.iter_mut().enumerate() {
            let (fx, fy) = (x as f32 + 0.5, y as f32 + 0.5);
            let mut v = *px;
            if style.texture.amplitude > 0.0 {
                v += style.texture.amplitude
                    * texture.fbm(fx * tex_scale, fy * tex_scale, style.texture.octaves);
            }
            let (rx, ry) = (fx - cx, fy - cy);
            let along = (rx * gx + ry * gy) / half_diag;
            let r2 = (rx * rx + ry * ry) / (half_diag * half_diag);
            v *= (1.0 + style.gradient * along) * (1.0 - style.vignetting * r2);
            if style.charging > 0.0 {
                let d2 = (fx - qx).powi(2) + (fy - qy).powi(2);
                v += style.charging * (-d2 / charge_r2).exp();
            }
            *px = v;
        }
    });

    // 6. Defocus.
    gaussian_blur(&mut img, w, h, style.blur_sigma);

    // 7. Scan lines: a smoothly wandering horizontal offset and a gain per line.
    if style.scan.line_jitter_px > 0.0 || style.scan.line_gain > 0.0 {
        let mut shift = 0.0f32;
        let mut row = vec![0.0f32; w];
        for y in 0..h {
            shift = 0.6 * shift + 0.8 * style.scan.line_jitter_px * normal(rng);
            let gain = style.scan.line_gain * normal(rng);
            row.copy_from_slice(&img[y * w..(y + 1) * w]);
            for x in 0..w {
                let sx = (x as f32 + shift).clamp(0.0, wf - 1.0);
                let i0 = sx.floor() as usize;
                let i1 = (i0 + 1).min(w - 1);
                let t = sx - i0 as f32;
                img[y * w + x] = row[i0] * (1.0 - t) + row[i1] * t + gain;
            }
        }
    }

    // 8. Detector.
    let counts = style.noise.poisson_counts;
    let sigma = style.noise.gaussian_sigma;
    img.iter()
        .map(|&v| {
            let mut v = v.clamp(0.0, 1.0);
            if counts > 0.0 {
                let lambda = v * counts;
                let k = if lambda < 30.0 {
                    match Poisson::new(lambda.max(1e-6)) {
                        Ok(p) => p.sample(rng),
                        Err(_) => 0.0,
                    }
                } else {
                    lambda + lambda.sqrt() * normal(rng)
                };
                v = k / counts;
            }
            if sigma > 0.0 {
                v += sigma * normal(rng);
            }
            (v.clamp(0.0, 1.0) * 65535.0).round() as u16
        })
        .collect()
}
