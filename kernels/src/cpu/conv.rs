//! Convolutions on the CPU: im2col + GEMM (3×3, pad 1) or a plain GEMM (1×1).
//!
//! Map of this module:
//! - [`im2col3`] / [`col2im3`]: the 3×3 "same" patch matrix `[c_in·9, h·w]` and its adjoint.
//! - [`forward`], [`backward_data`], [`backward_weight`]: the three convolution passes.
//!
//! Parallelism: with at least as many images as threads (and a multiple of them) each thread takes
//! whole images and runs single-threaded GEMMs — no synchronisation inside a layer, and the small deep
//! layers (8×8 planes) do not pay for splitting tiny matrices. Otherwise (a single image at inference)
//! the GEMM itself is split over the rayon pool.

use super::gemm::{MatRef, matmul, with_scratch};
use crate::{Conv, Shape};
use gemm::Parallelism;
use rayon::prelude::*;

/// How one layer is spread over the threads.
#[derive(Clone, Copy)]
pub(crate) enum Plan {
    /// Images in parallel, each on one thread.
    Images,
    /// Images one after another, GEMMs (and im2col) split over `threads`.
    Inside(usize),
}

impl Plan {
    pub fn new(n: usize, threads: usize) -> Self {
        if threads > 1 && n >= threads && n % threads == 0 {
            Plan::Images
        } else {
            Plan::Inside(threads)
        }
    }
    fn gemm_par(self) -> Parallelism {
        match self {
            Plan::Images | Plan::Inside(1) => Parallelism::None,
            Plan::Inside(t) => Parallelism::Rayon(t),
        }
    }
    fn split_rows(self) -> bool {
        matches!(self, Plan::Inside(t) if t > 1)
    }
}

/// Writes the 3×3 pad-1 patch matrix of one image `x` (`[c, h, w]`) into `col` (`[c·9, h·w]`,
/// row `(ci·3 + ky)·3 + kx`, column `oy·w + ox` holding `x[ci, oy+ky−1, ox+kx−1]` or 0).
pub(crate) fn im2col3(x: &[f32], c: usize, h: usize, w: usize, col: &mut [f32], parallel: bool) {
    let hw = h * w;
    let fill_row = |r: usize, row: &mut [f32]| {
        let ci = r / 9;
        let ky = (r / 3) % 3;
        let kx = r % 3;
        let plane = &x[ci * hw..(ci + 1) * hw];
        for (oy, out) in row.chunks_exact_mut(w).enumerate() {
            let iy = oy as isize + ky as isize - 1;
            if iy < 0 || iy >= h as isize {
                out.fill(0.0);
                continue;
            }
            let src = &plane[iy as usize * w..(iy as usize + 1) * w];
            match kx {
                0 => {
                    out[0] = 0.0;
                    out[1..].copy_from_slice(&src[..w - 1]);
                }
                1 => out.copy_from_slice(src),
                _ => {
                    out[..w - 1].copy_from_slice(&src[1..]);
                    out[w - 1] = 0.0;
                }
            }
        }
    };
    let col = &mut col[..c * 9 * hw];
    if parallel {
        col.par_chunks_mut(hw)
            .enumerate()
            .for_each(|(r, row)| fill_row(r, row));
    } else {
        col.chunks_mut(hw)
            .enumerate()
            .for_each(|(r, row)| fill_row(r, row));
    }
}

/// The adjoint of [`im2col3`]: `x[ci, iy, ix] = Σ_{ky,kx} col[(ci·3+ky)·3+kx, (iy−ky+1)·w + ix−kx+1]`
/// (overwrites `x`).
pub(crate) fn col2im3(col: &[f32], c: usize, h: usize, w: usize, x: &mut [f32], parallel: bool) {
    let hw = h * w;
    let one_plane = |ci: usize, plane: &mut [f32]| {
        plane.fill(0.0);
        for ky in 0..3 {
            for kx in 0..3 {
                let row = &col[((ci * 3 + ky) * 3 + kx) * hw..][..hw];
                for (oy, src) in row.chunks_exact(w).enumerate() {
                    let iy = oy as isize + ky as isize - 1;
                    if iy < 0 || iy >= h as isize {
                        continue;
                    }
                    let dst = &mut plane[iy as usize * w..(iy as usize + 1) * w];
                    let (d, s) = match kx {
                        0 => (&mut dst[..w - 1], &src[1..]),
                        1 => (&mut dst[..], src),
                        _ => (&mut dst[1..], &src[..w - 1]),
                    };
                    d.iter_mut().zip(s).for_each(|(d, s)| *d += *s);
                }
            }
        }
    };
    let x = &mut x[..c * hw];
    if parallel {
        x.par_chunks_mut(hw)
            .enumerate()
            .for_each(|(ci, p)| one_plane(ci, p));
    } else {
        x.chunks_mut(hw)
            .enumerate()
            .for_each(|(ci, p)| one_plane(ci, p));
    }
}

/// Adds the bias to each output plane and applies ReLU, in one pass over the GEMM's output.
fn bias_relu(y: &mut [f32], b: &[f32], hw: usize, relu: bool) {
    for (plane, &bias) in y.chunks_exact_mut(hw).zip(b) {
        if relu {
            plane.iter_mut().for_each(|v| *v = (*v + bias).max(0.0));
        } else {
            plane.iter_mut().for_each(|v| *v += bias);
        }
    }
}

/// `y = conv(x, w) + b` (then ReLU); lengths already checked.
#[allow(clippy::too_many_arguments)]
pub(crate) fn forward(
    x: &[f32],
    xs: Shape,
    conv: Conv,
    w: &[f32],
    b: &[f32],
    relu: bool,
    y: &mut [f32],
    plan: Plan,
) {
    let hw = xs.plane();
    let kk = conv.c_in * conv.k * conv.k;
    let one = |xi: &[f32], yi: &mut [f32]| {
        let lhs = MatRef::rows(w, kk);
        if conv.k == 1 {
            matmul(
                conv.c_out,
                hw,
                kk,
                yi,
                false,
                lhs,
                MatRef::rows(xi, hw),
                plan.gemm_par(),
            );
        } else {
            with_scratch(kk * hw, |col| {
                im2col3(xi, conv.c_in, xs.h, xs.w, col, plan.split_rows());
                matmul(
                    conv.c_out,
                    hw,
                    kk,
                    yi,
                    false,
                    lhs,
                    MatRef::rows(col, hw),
                    plan.gemm_par(),
                );
            });
        }
        bias_relu(yi, b, hw, relu);
    };
    match plan {
        Plan::Images => x
            .par_chunks_exact(conv.c_in * hw)
            .zip(y.par_chunks_exact_mut(conv.c_out * hw))
            .for_each(|(xi, yi)| one(xi, yi)),
        Plan::Inside(_) => x
            .chunks_exact(conv.c_in * hw)
            .zip(y.chunks_exact_mut(conv.c_out * hw))
            .for_each(|(xi, yi)| one(xi, yi)),
    }
}

/// `dx = Wᵀ·dy` then col2im (3×3) or directly (1×1); lengths already checked.
pub(crate) fn backward_data(
    dy: &[f32],
    xs: Shape,
    conv: Conv,
    w: &[f32],
    dx: &mut [f32],
    plan: Plan,
) {
    let hw = xs.plane();
    let kk = conv.c_in * conv.k * conv.k;
    let one = |dyi: &[f32], dxi: &mut [f32]| {
        let lhs = MatRef::transposed(w, kk);
        let rhs = MatRef::rows(dyi, hw);
        if conv.k == 1 {
            matmul(kk, hw, conv.c_out, dxi, false, lhs, rhs, plan.gemm_par());
        } else {
            with_scratch(kk * hw, |dcol| {
                matmul(kk, hw, conv.c_out, dcol, false, lhs, rhs, plan.gemm_par());
                col2im3(dcol, conv.c_in, xs.h, xs.w, dxi, plan.split_rows());
            });
        }
    };
    match plan {
        Plan::Images => dy
            .par_chunks_exact(conv.c_out * hw)
            .zip(dx.par_chunks_exact_mut(conv.c_in * hw))
            .for_each(|(a, b)| one(a, b)),
        Plan::Inside(_) => dy
            .chunks_exact(conv.c_out * hw)
            .zip(dx.chunks_exact_mut(conv.c_in * hw))
            .for_each(|(a, b)| one(a, b)),
    }
}

/// Accumulates one image's `dw += dy·colᵀ` and `db += Σ dy` (or overwrites when `first`).
#[allow(clippy::too_many_arguments)]
fn weight_grad_image(
    xi: &[f32],
    dyi: &[f32],
    xs: Shape,
    conv: Conv,
    dw: &mut [f32],
    db: &mut [f32],
    first: bool,
    plan: Plan,
) {
    let hw = xs.plane();
    let kk = conv.c_in * conv.k * conv.k;
    let lhs = MatRef::rows(dyi, hw);
    if conv.k == 1 {
        let rhs = MatRef::transposed(xi, hw);
        matmul(conv.c_out, kk, hw, dw, !first, lhs, rhs, plan.gemm_par());
    } else {
        with_scratch(kk * hw, |col| {
            im2col3(xi, conv.c_in, xs.h, xs.w, col, plan.split_rows());
            let rhs = MatRef::transposed(col, hw);
            matmul(conv.c_out, kk, hw, dw, !first, lhs, rhs, plan.gemm_par());
        });
    }
    for (d, plane) in db.iter_mut().zip(dyi.chunks_exact(hw)) {
        let s: f32 = plane.iter().sum();
        if first {
            *d = s;
        } else {
            *d += s;
        }
    }
}

/// `dw = Σ_n dy_n·col_nᵀ`, `db = Σ dy`; lengths already checked.
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward_weight(
    x: &[f32],
    xs: Shape,
    conv: Conv,
    dy: &[f32],
    dw: &mut [f32],
    db: &mut [f32],
    plan: Plan,
    threads: usize,
) {
    let hw = xs.plane();
    let x_img = conv.c_in * hw;
    let dy_img = conv.c_out * hw;
    if xs.n == 0 {
        dw.fill(0.0);
        db.fill(0.0);
        return;
    }
    match plan {
        Plan::Inside(_) => {
            for i in 0..xs.n {
                let xi = &x[i * x_img..(i + 1) * x_img];
                let dyi = &dy[i * dy_img..(i + 1) * dy_img];
                weight_grad_image(xi, dyi, xs, conv, dw, db, i == 0, plan);
            }
        }
        Plan::Images => {
            // Each thread sums its share of the batch into its own partial gradient (the first
            // share straight into `dw`/`db`), then the partials are added: no locks in the GEMMs.
            let per = xs.n.div_ceil(threads);
            let groups = xs.n.div_ceil(per);
            let mut partials: Vec<(Vec<f32>, Vec<f32>)> = (1..groups)
                .map(|_| (vec![0.0; dw.len()], vec![0.0; db.len()]))
                .collect();
            let run_group = |g: usize, dwp: &mut [f32], dbp: &mut [f32]| {
                for (j, i) in (g * per..((g + 1) * per).min(xs.n)).enumerate() {
                    let xi = &x[i * x_img..(i + 1) * x_img];
                    let dyi = &dy[i * dy_img..(i + 1) * dy_img];
                    weight_grad_image(xi, dyi, xs, conv, dwp, dbp, j == 0, Plan::Images);
                }
            };
            rayon::scope(|s| {
                for (g, (dwp, dbp)) in partials.iter_mut().enumerate() {
                    let run_group = &run_group;
                    s.spawn(move |_| run_group(g + 1, dwp, dbp));
                }
                run_group(0, dw, db);
            });
            for (dwp, dbp) in &partials {
                dw.iter_mut().zip(dwp).for_each(|(a, b)| *a += *b);
                db.iter_mut().zip(dbp).for_each(|(a, b)| *a += *b);
            }
        }
    }
}
