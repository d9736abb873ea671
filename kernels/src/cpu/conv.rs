//! Convolutions on the CPU: im2col + GEMM (3×3, pad 1) or a plain GEMM (1×1).
//!
//! Map of this module:
//! - [`im2col3`] / [`col2im3_acc`]: the 3×3 "same" patch matrix of a band of output rows and its
//!   adjoint.
//! - [`forward`], [`backward_data`] (col2im, or a forward pass with the rotated kernel, by shape),
//!   [`backward_weight`]: the three convolution passes.
//!
//! Cache blocking: a whole image's patch matrix is `c_in·9·h·w` floats (28 MB for decoder stage 0 at
//! 128²), so building it and letting the GEMM stream it back is memory-bound for the thin layers
//! (16 or 32 output channels do only 32–64 flops per patch element). Each image is therefore cut
//! into bands of output rows whose patch matrix fits in L2 ([`TILE_FLOATS`]): im2col → GEMM (→ bias
//! and ReLU, or col2im) on one band while it is still in cache.
//!
//! Parallelism: with at least as many images as threads (and a multiple of them) each thread takes
//! whole images and runs single-threaded GEMMs — no synchronisation inside a layer, and the small deep
//! layers (8×8 planes) do not pay for splitting tiny matrices. Otherwise (a single image at inference)
//! the GEMMs themselves are split over the rayon pool.

use super::gemm::{MatRef, matmul, with_scratch};
use super::winograd;
use crate::{Conv, Shape};
use gemm::Parallelism;
use rayon::prelude::*;

/// Target size of one band's patch matrix, in floats (512 KiB: leaves room in a 1–2 MiB L2 for the
/// GEMM's packed blocks).
const TILE_FLOATS: usize = 128 * 1024;

/// How one layer is spread over the threads.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Plan {
    /// Images in parallel, each on one thread.
    Images,
    /// Images one after another, GEMMs split over `threads`.
    Inside(usize),
}

impl Plan {
    pub fn new(n: usize, threads: usize) -> Self {
        if threads > 1 && n >= threads && n.is_multiple_of(threads) {
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
}

/// Fewest output pixels per band: narrower GEMMs lose more to packing and edge kernels than the
/// cache saves.
const MIN_BAND_PIXELS: usize = 256;

/// Output rows per band for a patch matrix with `kk` rows and planes `w` wide.
fn band_rows(kk: usize, h: usize, w: usize) -> usize {
    let w = w.max(1);
    (TILE_FLOATS / (kk * w).max(1))
        .max(MIN_BAND_PIXELS.div_ceil(w))
        .clamp(1, h.max(1))
}

/// Writes the 3×3 pad-1 patch matrix of output rows `oy0..oy1` of one image `x` (`[c, h, w]`) into
/// `col` (`[c·9, (oy1−oy0)·w]`): row `(ci·3 + ky)·3 + kx`, column `(oy−oy0)·w + ox` holds
/// `x[ci, oy+ky−1, ox+kx−1]`, or 0 outside the image.
pub(crate) fn im2col3(
    x: &[f32],
    c: usize,
    h: usize,
    w: usize,
    (oy0, oy1): (usize, usize),
    col: &mut [f32],
) {
    let hw = h * w;
    let band = (oy1 - oy0) * w;
    for (r, row) in col[..c * 9 * band].chunks_exact_mut(band).enumerate() {
        let ci = r / 9;
        let ky = (r / 3) % 3;
        let kx = r % 3;
        let plane = &x[ci * hw..(ci + 1) * hw];
        for (out, oy) in row.chunks_exact_mut(w).zip(oy0..oy1) {
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
    }
}

/// Runs `one(image index, that image's block of out)` over the batch: in parallel for
/// [`Plan::Images`], else in order.
fn per_image(
    out: &mut [f32],
    image_len: usize,
    plan: Plan,
    one: impl Fn(usize, &mut [f32]) + Send + Sync,
) {
    match plan {
        Plan::Images => out
            .par_chunks_exact_mut(image_len)
            .enumerate()
            .for_each(|(i, o)| one(i, o)),
        Plan::Inside(_) => out
            .chunks_exact_mut(image_len)
            .enumerate()
            .for_each(|(i, o)| one(i, o)),
    }
}

/// `y = conv(x, w) + b` (then ReLU); lengths already checked.
///
/// With several threads and fewer images than threads ([`Plan::Inside`]: a single image at
/// inference), the threads take whole bands of output rows — im2col, a single-threaded GEMM and the
/// fused bias + ReLU epilogue, all in that thread's cache — instead of splitting each band's small
/// GEMM over the pool (a fork-join per band, and thin slices of matrices that are already small).
#[allow(clippy::too_many_arguments)]
pub(crate) fn forward(
    x: &[f32],
    xs: Shape,
    conv: Conv,
    w: &[f32],
    b: Option<&[f32]>,
    relu: bool,
    y: &mut [f32],
    plan: Plan,
) {
    if winograd::applies(xs, conv) {
        winograd::forward(winograd::Input::Planes(x), xs, conv, w, b, relu, y, plan);
        return;
    }
    if let Plan::Inside(threads) = plan
        && threads > 1
    {
        forward_bands_parallel(x, xs, conv, w, b, relu, y, threads);
        return;
    }
    let (h, wd) = (xs.h, xs.w);
    let hw = h * wd;
    let kk = conv.c_in * conv.k * conv.k;
    let rows = if conv.k == 1 { h } else { band_rows(kk, h, wd) };
    per_image(y, conv.c_out * hw, plan, |i, yi| {
        let xi = &x[i * conv.c_in * hw..(i + 1) * conv.c_in * hw];
        let lhs = MatRef::rows(w, kk);
        with_scratch(if conv.k == 1 { 0 } else { kk * rows * wd }, |col| {
            for oy0 in (0..h).step_by(rows) {
                let oy1 = (oy0 + rows).min(h);
                let band = (oy1 - oy0) * wd;
                let dst = &mut yi[oy0 * wd..];
                if conv.k == 1 {
                    let rhs = MatRef {
                        data: &xi[oy0 * wd..],
                        rs: hw,
                        cs: 1,
                    };
                    matmul(
                        conv.c_out,
                        band,
                        kk,
                        dst,
                        hw,
                        false,
                        lhs,
                        rhs,
                        Parallelism::None,
                    );
                } else {
                    im2col3(xi, conv.c_in, h, wd, (oy0, oy1), col);
                    let rhs = MatRef::rows(&col[..kk * band], band);
                    matmul(
                        conv.c_out,
                        band,
                        kk,
                        dst,
                        hw,
                        false,
                        lhs,
                        rhs,
                        Parallelism::None,
                    );
                }
                // Bias and ReLU on the band while it is still in cache.
                for co in 0..conv.c_out {
                    let bias = b.map_or(0.0, |b| b[co]);
                    let seg = &mut yi[co * hw + oy0 * wd..][..band];
                    epilogue(seg, bias, relu);
                }
            }
        });
    });
}

/// `v = max(v + bias, 0)` (or `v + bias`) over a band of one output channel.
#[inline]
fn epilogue(seg: &mut [f32], bias: f32, relu: bool) {
    if relu {
        seg.iter_mut().for_each(|v| *v = (*v + bias).max(0.0));
    } else if bias != 0.0 {
        seg.iter_mut().for_each(|v| *v += bias);
    }
}

/// The output's base pointer, shared by the band tasks of [`forward_bands_parallel`] and
/// `winograd::forward`.
#[derive(Clone, Copy)]
pub(crate) struct OutPtr(*mut f32);
// SAFETY: only used by band tasks that write pairwise disjoint ranges of one exclusively borrowed
// slice that outlives them (rayon's parallel loop joins before the borrow ends).
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    pub fn new(y: &mut [f32]) -> Self {
        Self(y.as_mut_ptr())
    }
    /// Copies `src` to `y[at..at + src.len()]`.
    ///
    /// # Safety
    /// The range lies inside the slice given to [`OutPtr::new`], that slice is still exclusively
    /// borrowed by the caller, and no other task writes or reads the range meanwhile.
    pub unsafe fn write(self, at: usize, src: &[f32]) {
        // SAFETY: the caller's contract; `src` is the task's own scratch, so it cannot overlap.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), self.0.add(at), src.len()) }
    }
}

/// [`forward`] for [`Plan::Inside`] with `threads > 1`: every (image, band of output rows) pair is
/// one rayon task. A band's GEMM writes into the task's own scratch (`c_out × band`, contiguous), and
/// the epilogue (bias, ReLU) copies it into `y`'s rows `oy0..oy1` of each channel.
#[allow(clippy::too_many_arguments)]
fn forward_bands_parallel(
    x: &[f32],
    xs: Shape,
    conv: Conv,
    w: &[f32],
    b: Option<&[f32]>,
    relu: bool,
    y: &mut [f32],
    threads: usize,
) {
    let (h, wd) = (xs.h, xs.w);
    let hw = h * wd;
    let kk = conv.c_in * conv.k * conv.k;
    let cache_rows = if conv.k == 1 { h } else { band_rows(kk, h, wd) };
    // At least four bands per thread over the batch, so a busy core does not hold up the layer;
    // never narrower than MIN_BAND_PIXELS unless the plane is.
    let want_bands = (4 * threads).div_ceil(xs.n.max(1));
    let rows = cache_rows
        .min(h.div_ceil(want_bands))
        .max(MIN_BAND_PIXELS.div_ceil(wd.max(1)))
        .clamp(1, h.max(1));
    let bands = h.div_ceil(rows);
    assert!(
        y.len() >= xs.n * conv.c_out * hw && x.len() >= xs.n * conv.c_in * hw,
        "conv forward: buffers too short"
    );
    let out = OutPtr::new(y);
    let lhs = MatRef::rows(w, kk);
    (0..xs.n * bands).into_par_iter().for_each(|task| {
        let (i, band_index) = (task / bands, task % bands);
        let oy0 = band_index * rows;
        let oy1 = (oy0 + rows).min(h);
        let band = (oy1 - oy0) * wd;
        let xi = &x[i * conv.c_in * hw..(i + 1) * conv.c_in * hw];
        let col_len = if conv.k == 1 { 0 } else { kk * band };
        with_scratch(col_len + conv.c_out * band, |scratch| {
            let (col, acc) = scratch.split_at_mut(col_len);
            if conv.k == 1 {
                let rhs = MatRef {
                    data: &xi[oy0 * wd..],
                    rs: hw,
                    cs: 1,
                };
                matmul(
                    conv.c_out,
                    band,
                    kk,
                    acc,
                    band,
                    false,
                    lhs,
                    rhs,
                    Parallelism::None,
                );
            } else {
                im2col3(xi, conv.c_in, h, wd, (oy0, oy1), col);
                let rhs = MatRef::rows(&col[..kk * band], band);
                matmul(
                    conv.c_out,
                    band,
                    kk,
                    acc,
                    band,
                    false,
                    lhs,
                    rhs,
                    Parallelism::None,
                );
            }
            for (co, seg) in acc.chunks_exact_mut(band).enumerate() {
                epilogue(seg, b.map_or(0.0, |b| b[co]), relu);
                let at = (i * conv.c_out + co) * hw + oy0 * wd;
                // SAFETY: `at + band ≤ (i·c_out + co + 1)·hw ≤ y.len()` (asserted above), and the
                // range [at, at + band) — image i, channel co, rows oy0..oy1 — belongs to this task
                // alone: tasks differ in image or in their row band. `seg` is task-local scratch, so
                // the two ranges cannot overlap. `y` stays exclusively borrowed for the whole
                // parallel loop, which returns only after every task has finished.
                unsafe { out.write(at, seg) };
            }
        });
    });
}

/// `dx = conv_transpose(dy, w)`; lengths already checked.
///
/// Two formulations, picked by shape. The textbook one, `dcol = Wᵀ·dy` then col2im, runs a GEMM
/// with `m = 9·c_in`, `k = c_out`. For a 3×3 "same" convolution the transpose is also a 3×3 "same"
/// convolution of `dy` with the kernel rotated by 180° and the channels swapped: im2col of `dy`, a
/// GEMM with `m = c_in`, `k = 9·c_out`, and no scatter pass. A GEMM is slow along a thin `m` or `k`,
/// so the rotated form is used unless `c_in < c_out` (the encoder's conv1 layers, where `c_in` is
/// the thin side; the image's own 1-channel layer most of all).
pub(crate) fn backward_data(
    dy: &[f32],
    xs: Shape,
    conv: Conv,
    w: &[f32],
    dx: &mut [f32],
    plan: Plan,
) {
    if conv.k == 3 && conv.c_in >= conv.c_out {
        backward_data_rotated(dy, xs, conv, w, dx, plan);
    } else {
        backward_data_col2im(dy, xs, conv, w, dx, plan);
    }
}

/// `dx` as a forward convolution of `dy` with the rotated, channel-swapped 3×3 kernel.
fn backward_data_rotated(dy: &[f32], xs: Shape, conv: Conv, w: &[f32], dx: &mut [f32], plan: Plan) {
    // w_t[ci, co, ky, kx] = w[co, ci, 2 − ky, 2 − kx].
    let mut w_t = vec![0.0f32; w.len()];
    for co in 0..conv.c_out {
        for ci in 0..conv.c_in {
            let src = &w[(co * conv.c_in + ci) * 9..][..9];
            let dst = &mut w_t[(ci * conv.c_out + co) * 9..][..9];
            for (d, s) in dst.iter_mut().zip(src.iter().rev()) {
                *d = *s;
            }
        }
    }
    let transposed = Conv::new(conv.c_out, conv.c_in, 3);
    forward(
        dy,
        xs.with_c(conv.c_out),
        transposed,
        &w_t,
        None,
        false,
        dx,
        plan,
    );
}

/// One image's `dw (+)= dy·colᵀ`, `db (+)= Σ dy` (overwrites when `first`).
#[allow(clippy::too_many_arguments)]
fn weight_grad_image(
    xi: &[f32],
    dyi: &[f32],
    xs: Shape,
    conv: Conv,
    dw: &mut [f32],
    db: &mut [f32],
    first: bool,
    par: Parallelism,
) {
    let (h, wd) = (xs.h, xs.w);
    let hw = h * wd;
    let kk = conv.c_in * conv.k * conv.k;
    let rows = if conv.k == 1 { h } else { band_rows(kk, h, wd) };
    with_scratch(if conv.k == 1 { 0 } else { kk * rows * wd }, |col| {
        for oy0 in (0..h).step_by(rows) {
            let oy1 = (oy0 + rows).min(h);
            let band = (oy1 - oy0) * wd;
            let lhs = MatRef {
                data: &dyi[oy0 * wd..],
                rs: hw,
                cs: 1,
            };
            let acc = !(first && oy0 == 0);
            if conv.k == 1 {
                let rhs = MatRef {
                    data: &xi[oy0 * wd..],
                    rs: 1,
                    cs: hw,
                };
                matmul(conv.c_out, kk, band, dw, kk, acc, lhs, rhs, par);
            } else {
                im2col3(xi, conv.c_in, h, wd, (oy0, oy1), col);
                let rhs = MatRef::transposed(&col[..kk * band], band);
                matmul(conv.c_out, kk, band, dw, kk, acc, lhs, rhs, par);
            }
        }
    });
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
    let image = |i: usize| {
        (
            &x[i * x_img..(i + 1) * x_img],
            &dy[i * dy_img..(i + 1) * dy_img],
        )
    };
    match plan {
        Plan::Inside(_) => {
            for i in 0..xs.n {
                let (xi, dyi) = image(i);
                weight_grad_image(xi, dyi, xs, conv, dw, db, i == 0, plan.gemm_par());
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
                    let (xi, dyi) = image(i);
                    weight_grad_image(xi, dyi, xs, conv, dwp, dbp, j == 0, Parallelism::None);
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

/// The adjoint of [`im2col3`] for one band: adds `col`'s entries back onto the input pixels they were
/// copied from (`x` must be zeroed before the first band; bands overlap by a row at their edges).
pub(crate) fn col2im3_acc(
    col: &[f32],
    c: usize,
    h: usize,
    w: usize,
    (oy0, oy1): (usize, usize),
    x: &mut [f32],
) {
    let hw = h * w;
    let band = (oy1 - oy0) * w;
    for (ci, plane) in x[..c * hw].chunks_exact_mut(hw).enumerate() {
        for k in 0..9 {
            let (ky, kx) = (k / 3, k % 3);
            let row = &col[(ci * 9 + k) * band..][..band];
            for (src, oy) in row.chunks_exact(w).zip(oy0..oy1) {
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
}

/// `dx = Wᵀ·dy`, then for 3×3 col2im in row bands onto the zeroed `dx` (1×1 needs no col2im).
fn backward_data_col2im(dy: &[f32], xs: Shape, conv: Conv, w: &[f32], dx: &mut [f32], plan: Plan) {
    let (h, wd) = (xs.h, xs.w);
    let hw = h * wd;
    let kk = conv.c_in * conv.k * conv.k;
    per_image(dx, conv.c_in * hw, plan, |i, dxi| {
        let dyi = &dy[i * conv.c_out * hw..(i + 1) * conv.c_out * hw];
        let lhs = MatRef::transposed(w, kk);
        if conv.k == 1 {
            let rhs = MatRef::rows(dyi, hw);
            matmul(
                kk,
                hw,
                conv.c_out,
                dxi,
                hw,
                false,
                lhs,
                rhs,
                plan.gemm_par(),
            );
            return;
        }
        let rows = band_rows(kk, h, wd);
        dxi.fill(0.0);
        with_scratch(kk * rows * wd, |dcol| {
            for oy0 in (0..h).step_by(rows) {
                let oy1 = (oy0 + rows).min(h);
                let band = (oy1 - oy0) * wd;
                let rhs = MatRef {
                    data: &dyi[oy0 * wd..],
                    rs: hw,
                    cs: 1,
                };
                matmul(
                    kk,
                    band,
                    conv.c_out,
                    dcol,
                    band,
                    false,
                    lhs,
                    rhs,
                    plan.gemm_par(),
                );
                col2im3_acc(dcol, conv.c_in, h, wd, (oy0, oy1), dxi);
            }
        });
    });
}
