//! Elementwise and layout ops on the CPU: ReLU backward, 2×2 max-pooling, nearest ×2 upsampling with
//! concatenation, per-channel affine maps and statistics, axpy.
//!
//! Each op works plane by plane (one `h·w` image channel); planes go to rayon when the tensor is big
//! enough to pay for it ([`PAR_MIN`] elements), otherwise they run on the calling thread.

use crate::Shape;
use rayon::prelude::*;

/// Below this many elements an op runs on one thread: spreading a few kilobytes over the pool costs
/// more than it saves.
pub(crate) const PAR_MIN: usize = 1 << 15;

/// Runs `f(index, chunk)` over `chunk`-sized pieces of `data`, in parallel when `data` is large.
pub(crate) fn for_chunks(
    data: &mut [f32],
    chunk: usize,
    f: impl Fn(usize, &mut [f32]) + Send + Sync,
) {
    if chunk == 0 {
        return;
    }
    if data.len() >= PAR_MIN {
        data.par_chunks_mut(chunk)
            .enumerate()
            .for_each(|(i, c)| f(i, c));
    } else {
        data.chunks_mut(chunk)
            .enumerate()
            .for_each(|(i, c)| f(i, c));
    }
}

pub(crate) fn relu_backward(y: &[f32], dy: &mut [f32]) {
    const CHUNK: usize = 1 << 14;
    for_chunks(dy, CHUNK, |i, d| {
        let y = &y[i * CHUNK..i * CHUNK + d.len()];
        d.iter_mut().zip(y).for_each(|(d, &y)| {
            if y <= 0.0 {
                *d = 0.0;
            }
        });
    });
}

pub(crate) fn maxpool2_forward(x: &[f32], xs: Shape, y: &mut [f32]) {
    let (h, w) = (xs.h, xs.w);
    let (ho, wo) = (h / 2, w / 2);
    for_chunks(y, ho * wo, |p, out| {
        let plane = &x[p * h * w..(p + 1) * h * w];
        for oy in 0..ho {
            let r0 = &plane[2 * oy * w..2 * oy * w + w];
            let r1 = &plane[(2 * oy + 1) * w..(2 * oy + 2) * w];
            for ox in 0..wo {
                let m = r0[2 * ox]
                    .max(r0[2 * ox + 1])
                    .max(r1[2 * ox])
                    .max(r1[2 * ox + 1]);
                out[oy * wo + ox] = m;
            }
        }
    });
}

pub(crate) fn maxpool2_backward(x: &[f32], xs: Shape, dy: &[f32], dx: &mut [f32]) {
    let (h, w) = (xs.h, xs.w);
    let (ho, wo) = (h / 2, w / 2);
    for_chunks(dx, h * w, |p, dplane| {
        dplane.fill(0.0);
        let plane = &x[p * h * w..(p + 1) * h * w];
        let g = &dy[p * ho * wo..(p + 1) * ho * wo];
        for oy in 0..ho {
            for ox in 0..wo {
                // The first maximum in row-major order inside the window wins (strict `>`).
                let mut best = (2 * oy) * w + 2 * ox;
                for idx in [
                    (2 * oy) * w + 2 * ox + 1,
                    (2 * oy + 1) * w + 2 * ox,
                    (2 * oy + 1) * w + 2 * ox + 1,
                ] {
                    if plane[idx] > plane[best] {
                        best = idx;
                    }
                }
                dplane[best] = g[oy * wo + ox];
            }
        }
    });
}

pub(crate) fn upsample2_concat_forward(
    low: &[f32],
    ls: Shape,
    skip: &[f32],
    c_skip: usize,
    y: &mut [f32],
) {
    let (h, w) = (ls.h, ls.w);
    let (h2, w2) = (2 * h, 2 * w);
    let c_out = ls.c + c_skip;
    for_chunks(y, h2 * w2, |p, out| {
        let (n, c) = (p / c_out, p % c_out);
        if c < ls.c {
            let src = &low[(n * ls.c + c) * h * w..][..h * w];
            for (oy, row) in out.chunks_exact_mut(w2).enumerate() {
                let s = &src[(oy / 2) * w..(oy / 2 + 1) * w];
                for (pair, &v) in row.chunks_exact_mut(2).zip(s) {
                    pair[0] = v;
                    pair[1] = v;
                }
            }
        } else {
            let cs = c - ls.c;
            out.copy_from_slice(&skip[(n * c_skip + cs) * h2 * w2..][..h2 * w2]);
        }
    });
}

pub(crate) fn upsample2_concat_backward(
    dy: &[f32],
    ls: Shape,
    c_skip: usize,
    dlow: &mut [f32],
    dskip: Option<&mut [f32]>,
) {
    let (h, w) = (ls.h, ls.w);
    let (h2, w2) = (2 * h, 2 * w);
    let c_in = ls.c + c_skip;
    for_chunks(dlow, h * w, |p, out| {
        let (n, c) = (p / ls.c, p % ls.c);
        let g = &dy[(n * c_in + c) * h2 * w2..][..h2 * w2];
        for (oy, row) in out.chunks_exact_mut(w).enumerate() {
            let r0 = &g[2 * oy * w2..(2 * oy + 1) * w2];
            let r1 = &g[(2 * oy + 1) * w2..(2 * oy + 2) * w2];
            for (ox, v) in row.iter_mut().enumerate() {
                *v = (r0[2 * ox] + r0[2 * ox + 1]) + (r1[2 * ox] + r1[2 * ox + 1]);
            }
        }
    });
    if let Some(dskip) = dskip {
        for_chunks(dskip, h2 * w2, |p, out| {
            let (n, c) = (p / c_skip, p % c_skip);
            out.copy_from_slice(&dy[(n * c_in + ls.c + c) * h2 * w2..][..h2 * w2]);
        });
    }
}

pub(crate) fn channel_affine(x: &[f32], xs: Shape, scale: &[f32], shift: &[f32], y: &mut [f32]) {
    let hw = xs.plane();
    for_chunks(y, hw, |p, out| {
        let c = p % xs.c;
        let (a, b) = (scale[c], shift[c]);
        out.iter_mut()
            .zip(&x[p * hw..(p + 1) * hw])
            .for_each(|(o, &v)| *o = v * a + b);
    });
}

/// Mean and population standard deviation per channel, accumulated in f64 in two passes (the
/// one-pass `E[x²] − E[x]²` loses the variance of large-mean activations in f32).
pub(crate) fn channel_stats(x: &[f32], xs: Shape) -> (Vec<f32>, Vec<f32>) {
    let hw = xs.plane();
    let count = (xs.n * hw) as f64;
    let stats = |c: usize| {
        let planes = || (0..xs.n).map(move |n| &x[(n * xs.c + c) * hw..][..hw]);
        let sum: f64 = planes()
            .map(|p| p.iter().map(|&v| v as f64).sum::<f64>())
            .sum();
        let mean = if count > 0.0 { sum / count } else { 0.0 };
        let ss: f64 = planes()
            .map(|p| p.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>())
            .sum();
        let var = if count > 0.0 { ss / count } else { 0.0 };
        (mean as f32, var.sqrt() as f32)
    };
    let pairs: Vec<(f32, f32)> = if x.len() >= PAR_MIN {
        (0..xs.c).into_par_iter().map(stats).collect()
    } else {
        (0..xs.c).map(stats).collect()
    };
    pairs.into_iter().unzip()
}

pub(crate) fn axpy(alpha: f32, x: &[f32], y: &mut [f32]) {
    const CHUNK: usize = 1 << 14;
    for_chunks(y, CHUNK, |i, ys| {
        ys.iter_mut()
            .zip(&x[i * CHUNK..])
            .for_each(|(y, &x)| *y += alpha * x);
    });
}
