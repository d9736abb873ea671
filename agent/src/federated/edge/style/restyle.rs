//! Re-styling an image with another lab's Fourier code: tiled amplitude spectra, low band swapped in, phase kept.

use super::*;

/// Starts of `size`-wide tiles over `0..len`, `hop` apart, from `first` on until the end is covered.
pub(super) fn tile_starts(len: usize, size: usize, hop: usize, first: isize) -> Vec<isize> {
    let mut out = vec![first];
    while out
        .last()
        .is_some_and(|&s| s + (size as isize) < len as isize)
    {
        let next = out.last().copied().unwrap_or(0) + hop as isize;
        out.push(next);
    }
    out
}

/// Cuts the `n × n` tile at (`y0`, `x0`) of the `w × h` image (row stride `stride`), reflecting at
/// the image's edges.
pub(super) fn cut_tile(
    pixels: &[f32],
    stride: usize,
    w: usize,
    h: usize,
    y0: isize,
    x0: isize,
    n: usize,
) -> Vec<f32> {
    let mut t = vec![0.0f32; n * n];
    for y in 0..n {
        let sy = reflect(y0 + y as isize, h);
        for x in 0..n {
            t[y * n + x] = pixels[sy * stride + reflect(x0 + x as isize, w)];
        }
    }
    t
}

/// Index of frequency (`ky`, `kx`) (each in −n/2..n/2) in an `n × n` unshifted spectrum.
/// The 2-D spectrum (real, imaginary) of the `n × n` tile at `(y0, x0)`.
fn tile_spectrum(
    pixels: &[f32],
    stride: usize,
    (w, h): (usize, usize),
    (y0, x0): (isize, isize),
    n: usize,
) -> (Vec<f64>, Vec<f64>) {
    let mut re: Vec<f64> = cut_tile(pixels, stride, w, h, y0, x0, n)
        .into_iter()
        .map(f64::from)
        .collect();
    let mut im = vec![0.0f64; n * n];
    fft2(&mut re, &mut im, n, false);
    (re, im)
}

pub(super) fn bin(k: isize, n: usize) -> usize {
    k.rem_euclid(n as isize) as usize
}

/// Adds the band's amplitudes of every non-overlapping `n × n` tile of the `w × h` image to `sum`
/// (DC: the signed mean); returns the number of tiles.
pub(super) fn accumulate_band(
    pixels: &[f32],
    stride: usize,
    w: usize,
    h: usize,
    n: usize,
    band: usize,
    sum: &mut [f64],
) -> usize {
    let ys = tile_starts(h, n, n, 0);
    let xs = tile_starts(w, n, n, 0);
    let norm = (n * n) as f64;
    let b = band as isize;
    for &y0 in &ys {
        for &x0 in &xs {
            // The last tile ends at the edge instead of reaching past it.
            let y0 = y0.min((h as isize - n as isize).max(0));
            let x0 = x0.min((w as isize - n as isize).max(0));
            let (re, im) = tile_spectrum(pixels, stride, (w, h), (y0, x0), n);
            let mut i = 0;
            for ky in -b..=b {
                for kx in -b..=b {
                    let at = bin(ky, n) * n + bin(kx, n);
                    sum[i] += if ky == 0 && kx == 0 {
                        re[at] / norm
                    } else {
                        re[at].hypot(im[at]) / norm
                    };
                    i += 1;
                }
            }
        }
    }
    ys.len() * xs.len()
}

/// Re-styles a `w × h` image (row stride `stride`, normalised pixels) towards a Fourier code:
/// in every window, the low-frequency amplitudes move `mix` of the way to the code's, the phase is
/// kept, and the windows (half-overlapping, sin²-weighted, which sum to one) are added back together.
/// Returns `w × h` pixels (row stride `w`).
pub fn restyle_image(
    pixels: &[f32],
    stride: usize,
    w: usize,
    h: usize,
    code: &StyleCode,
    mix: f32,
) -> Result<Vec<f32>, StyleError> {
    if code.kind != StyleKind::Fourier {
        return Err(StyleError::Kind {
            device: code.device.clone(),
            got: code.kind,
            expected: StyleKind::Fourier,
        });
    }
    code.validate()?;
    if w == 0 || h == 0 || stride < w || pixels.len() < stride * (h - 1) + w {
        return Err(StyleError::Image {
            width: w,
            height: h,
            got: pixels.len(),
        });
    }
    let n = code.window as usize;
    let b = code.band as isize;
    let hop = n / 2;
    let win: Vec<f64> = (0..n)
        .map(|i| {
            (std::f64::consts::PI * (i as f64 + 0.5) / n as f64)
                .sin()
                .powi(2)
        })
        .collect();
    let norm = (n * n) as f64;
    let mix = f64::from(mix);
    let mut acc = vec![0.0f64; w * h];
    let mut weight = vec![0.0f64; w * h];
    for &y0 in &tile_starts(h, n, hop, -(hop as isize)) {
        for &x0 in &tile_starts(w, n, hop, -(hop as isize)) {
            let (mut re, mut im) = tile_spectrum(pixels, stride, (w, h), (y0, x0), n);
            let mut i = 0;
            for ky in -b..=b {
                for kx in -b..=b {
                    let at = bin(ky, n) * n + bin(kx, n);
                    let target = f64::from(code.values[i]) * norm;
                    if ky == 0 && kx == 0 {
                        // DC is real and signed: interpolate the mean itself.
                        re[at] = (1.0 - mix) * re[at] + mix * target;
                        im[at] = 0.0;
                    } else {
                        let a = re[at].hypot(im[at]);
                        let a_new = (1.0 - mix) * a + mix * target;
                        if a > 1e-12 {
                            re[at] *= a_new / a;
                            im[at] *= a_new / a;
                        } else {
                            re[at] = a_new;
                            im[at] = 0.0;
                        }
                    }
                    i += 1;
                }
            }
            // The band is symmetric (−b..=b), so conjugate pairs stay conjugate and the result is real.
            fft2(&mut re, &mut im, n, true);
            for ty in 0..n {
                let y = y0 + ty as isize;
                if y < 0 || y >= h as isize {
                    continue;
                }
                for tx in 0..n {
                    let x = x0 + tx as isize;
                    if x < 0 || x >= w as isize {
                        continue;
                    }
                    let wt = win[ty] * win[tx];
                    let at = y as usize * w + x as usize;
                    acc[at] += wt * re[ty * n + tx];
                    weight[at] += wt;
                }
            }
        }
    }
    Ok(acc
        .iter()
        .zip(&weight)
        .map(|(a, wt)| if *wt > 0.0 { (a / wt) as f32 } else { 0.0 })
        .collect())
}
