//! 3×3 "same" convolutions by Winograd's minimal filtering F(2×2, 3×3) (Lavin & Gray, "Fast
//! Algorithms for Convolutional Neural Networks", CVPR 2016): the forward pass of the wide layers.
//!
//! Each 2×2 block of output pixels ("tile") is computed from the 4×4 input patch around it. With the
//! 3×3 kernel `g` transformed once to `U = G·g·Gᵀ` (4×4) and each patch `d` to `V = Bᵀ·d·B`, the tile is
//! `Aᵀ·(U ⊙ V)·A`; summed over input channels, the 16 element-wise products become 16 independent
//! GEMMs `M[ξ] = U[ξ] (c_out × c_in) · V[ξ] (c_in × tiles)`. That is 16 multiply-adds per tile and
//! channel pair where im2col + GEMM does 36: 2.25× fewer flops in the GEMMs, which are most of a
//! U-Net's time, and a transformed input 4× the input's size instead of im2col's 9×. The transforms
//! only add and halve, so the result differs from the direct sum by rounding alone (within 1e-5 of
//! the largest output in this module's test; the kernels suite checks it against the f64 reference).
//!
//! Map of this module:
//! - [`applies`]: whether a layer is wide enough for the transforms to pay (and the method is not
//!   switched off with `MICROFED_CPU_CONV=im2col`, a benchmarking switch).
//! - [`forward`]: `y = conv(x, w) + b` (then ReLU), in bands of tile rows that fit in L2, each band
//!   transformed, multiplied and transformed back while it is in cache; threads take bands.
//! - `transform_weights`, `transform_input_row`, `inverse_row`: the three transforms.

use super::conv::{OutPtr, Plan};
use super::gemm::{MatRef, matmul, with_scratch, with_weight_scratch};
use crate::{Conv, Shape};
use gemm::Parallelism;
use rayon::prelude::*;

/// Transformed values per tile: the 4×4 patch.
const XI: usize = 16;

/// Target size of one band's transformed input and output together, in floats (1 MiB: half of
/// this machine's L2, leaving room for the GEMM's packed blocks).
const BAND_FLOATS: usize = 256 * 1024;

/// Floats between the end of one of the 16 transformed blocks and the start of the next (one cache
/// line).
const SKEW: usize = 16;

/// Fewest tiles per band: narrower GEMMs lose more to packing `U` than the cache saves.
const MIN_BAND_TILES: usize = 64;

/// Channels below which a layer stays on im2col: with few input channels the GEMMs are too thin to
/// pay for the transforms (the first layer reads one grey channel). Measured on the reference U-Net
/// at 512²: thresholds 8, 17 and 33 give the same time (the 16- and 32-channel layers cost about the
/// same either way: their transforms are memory-bound), 65 is 10 % slower.
const MIN_CHANNELS: usize = 8;

/// Whether [`forward`] should run this layer (otherwise im2col + GEMM does): a wide 3×3 layer, unless
/// the process was started with `MICROFED_CPU_CONV=im2col` (read once; for benchmarking the two
/// methods against each other in one build).
pub(crate) fn applies(xs: Shape, conv: Conv) -> bool {
    wide_enough(xs, conv) && enabled()
}

fn wide_enough(xs: Shape, conv: Conv) -> bool {
    conv.k == 3 && conv.c_in >= MIN_CHANNELS && conv.c_out >= MIN_CHANNELS && xs.h >= 2 && xs.w >= 2
}

fn enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("MICROFED_CPU_CONV").map_or(true, |v| v != "im2col"))
}

/// `U[ξ][co][ci] = (G·g·Gᵀ)[ξ]` for every kernel `g = w[co][ci]` (3×3), with
/// `G = [[1, 0, 0], [½, ½, ½], [½, −½, ½], [0, 0, 1]]`.
fn transform_weights(w: &[f32], conv: Conv, u: &mut [f32]) {
    let (ci_n, co_n) = (conv.c_in, conv.c_out);
    for co in 0..co_n {
        for ci in 0..ci_n {
            let g = &w[(co * ci_n + ci) * 9..][..9];
            // G·g: 4 rows of 3.
            let mut gg = [[0.0f32; 3]; 4];
            for c in 0..3 {
                let (g0, g1, g2) = (g[c], g[3 + c], g[6 + c]);
                gg[0][c] = g0;
                gg[1][c] = 0.5 * (g0 + g1 + g2);
                gg[2][c] = 0.5 * (g0 - g1 + g2);
                gg[3][c] = g2;
            }
            // (G·g)·Gᵀ: 4 × 4.
            for (a, r) in gg.iter().enumerate() {
                let t = [
                    r[0],
                    0.5 * (r[0] + r[1] + r[2]),
                    0.5 * (r[0] - r[1] + r[2]),
                    r[2],
                ];
                for (b, v) in t.into_iter().enumerate() {
                    u[((a * 4 + b) * co_n + co) * ci_n + ci] = v;
                }
            }
        }
    }
}

/// Per-thread buffers of one band: the four padded input rows of a tile row (even and odd columns),
/// their vertical transforms, and the two vertical sums of the inverse transform.
struct RowBuffers<'a> {
    pad: &'a mut [f32],
    hor: &'a mut [f32],
    sums: &'a mut [f32],
    line: &'a mut [f32],
}

/// `Bᵀ·d·B` of every tile in tile row `ty` of one input channel `plane` (`h × w`), written to
/// `v[ξ·stride + tx]` for `tx < tw`, with `Bᵀ = [[1, 0, −1, 0], [0, 1, 1, 0], [0, −1, 1, 0],
/// [0, 1, 0, −1]]`. Pixels outside the image are 0 (pad 1).
///
/// Every step runs over contiguous arrays so that it vectorises: the four input rows are first
/// split into their even and odd padded columns (`e[k]` = column 2k−1, `o[k]` = column 2k), the
/// vertical transform combines whole rows, and the horizontal one is then `e[t] − e[t+1]`,
/// `o[t] + e[t+1]`, `e[t+1] − o[t]`, `o[t] − o[t+1]`.
#[inline(always)]
fn transform_input_row(
    plane: &[f32],
    (h, w): (usize, usize),
    ty: usize,
    tw: usize,
    bufs: &mut RowBuffers<'_>,
    v: &mut [f32],
    stride: usize,
) {
    let n = tw + 1;
    for r in 0..4 {
        let (e, o) = bufs.pad[r * 2 * n..][..2 * n].split_at_mut(n);
        let iy = (2 * ty + r) as isize - 1;
        if iy < 0 || iy >= h as isize {
            e.fill(0.0);
            o.fill(0.0);
            continue;
        }
        let src = &plane[iy as usize * w..][..w];
        e[0] = 0.0;
        let pairs = w / 2;
        for ((pair, ok), ek) in src.chunks_exact(2).zip(o.iter_mut()).zip(e[1..].iter_mut()) {
            *ok = pair[0];
            *ek = pair[1];
        }
        let mut o_end = pairs;
        if w % 2 == 1 {
            o[pairs] = src[w - 1];
            o_end += 1;
        }
        o[o_end..].fill(0.0);
        e[pairs + 1..].fill(0.0);
    }
    // Vertical, on whole (even | odd) rows: hor[a] = (Bᵀ · rows)[a].
    {
        let row = |r: usize| &bufs.pad[r * 2 * n..][..2 * n];
        let (r0, r1, r2, r3) = (row(0), row(1), row(2), row(3));
        let hor = &mut bufs.hor[..8 * n];
        let (a0, rest) = hor.split_at_mut(2 * n);
        let (a1, rest) = rest.split_at_mut(2 * n);
        let (a2, a3) = rest.split_at_mut(2 * n);
        zip_with(a0, r0, r2, |x, y| x - y);
        zip_with(a1, r1, r2, |x, y| x + y);
        zip_with(a2, r2, r1, |x, y| x - y);
        zip_with(a3, r1, r3, |x, y| x - y);
    }
    // Horizontal, straight into V.
    for a in 0..4 {
        let (e, o) = bufs.hor[a * 2 * n..][..2 * n].split_at(n);
        let at = |c: usize| (a * 4 + c) * stride;
        zip_with(&mut v[at(0)..][..tw], &e[..tw], &e[1..], |x, y| x - y);
        zip_with(&mut v[at(1)..][..tw], &o[..tw], &e[1..], |x, y| x + y);
        zip_with(&mut v[at(2)..][..tw], &e[1..], &o[..tw], |x, y| x - y);
        zip_with(&mut v[at(3)..][..tw], &o[..tw], &o[1..], |x, y| x - y);
    }
}

/// `out[t] = f(x[t], y[t])` over the shortest of the three (generic, so each call site inlines
/// its arithmetic and vectorises without bounds checks).
#[inline(always)]
fn zip_with(out: &mut [f32], x: &[f32], y: &[f32], f: impl Fn(f32, f32) -> f32) {
    for ((o, &a), &b) in out.iter_mut().zip(x).zip(y) {
        *o = f(a, b);
    }
}

/// `Aᵀ·m·A` of every tile in one tile row of one output channel, `m[ξ·stride + tx]`, with
/// `Aᵀ = [[1, 1, 1, 0], [0, 1, −1, −1]]`, plus `bias` (then ReLU); hands each of the (at most two)
/// output rows inside the image to `emit(row index within the tile row, pixels)`.
#[inline(always)]
fn inverse_row(
    m: &[f32],
    stride: usize,
    tw: usize,
    (w, rows): (usize, usize),
    (bias, relu): (f32, bool),
    bufs: &mut RowBuffers<'_>,
    mut emit: impl FnMut(usize, &[f32]),
) {
    // Vertical: sums[(i·4 + c)·tw + tx] = (Aᵀ · m[·][c])[i].
    for c in 0..4 {
        let r = |a: usize| &m[(a * 4 + c) * stride..][..tw];
        let (m0, m1, m2, m3) = (r(0), r(1), r(2), r(3));
        let (s0, s1) = bufs.sums.split_at_mut(4 * tw);
        let s0 = &mut s0[c * tw..][..tw];
        let s1 = &mut s1[c * tw..][..tw];
        for ((((a, b), &x0), &x1), (&x2, &x3)) in s0
            .iter_mut()
            .zip(s1.iter_mut())
            .zip(m0)
            .zip(m1)
            .zip(m2.iter().zip(m3))
        {
            *a = x0 + x1 + x2;
            *b = x1 - x2 - x3;
        }
    }
    // Horizontal, bias and ReLU, into one output row at a time.
    for i in 0..rows {
        let s = &bufs.sums[i * 4 * tw..][..4 * tw];
        let (c0, rest) = s.split_at(tw);
        let (c1, rest) = rest.split_at(tw);
        let (c2, c3) = rest.split_at(tw);
        // Even and odd output columns apart (contiguous, so they vectorise), then interleaved.
        let (even, odd) = bufs.hor[..2 * tw].split_at_mut(tw);
        for (((e, o), (&x0, &x1)), (&x2, &x3)) in even
            .iter_mut()
            .zip(odd.iter_mut())
            .zip(c0.iter().zip(c1))
            .zip(c2.iter().zip(c3))
        {
            *e = x0 + x1 + x2 + bias;
            *o = x1 - x2 - x3 + bias;
        }
        if relu {
            // `if v > 0 { v } else { 0 }` rather than `max`: one vector max, no NaN blend.
            for v in even.iter_mut().chain(odd.iter_mut()) {
                *v = if *v > 0.0 { *v } else { 0.0 };
            }
        }
        let line = &mut bufs.line[..2 * tw];
        for (px, (&e, &o)) in line.chunks_exact_mut(2).zip(even.iter().zip(odd.iter())) {
            px[0] = e;
            px[1] = o;
        }
        emit(i, &line[..w]);
    }
}

/// One band's work: tile rows `ty0..ty1` of one image `xi` (`[c_in, h, w]`).
#[derive(Clone, Copy)]
struct BandJob<'a> {
    xi: &'a [f32],
    h: usize,
    w: usize,
    conv: Conv,
    u: &'a [f32],
    b: Option<&'a [f32]>,
    relu: bool,
    ty0: usize,
    ty1: usize,
}

/// [`band_generic`] compiled for the widest vectors this CPU has (the transforms are plain loops
/// that the compiler vectorises; the crate itself is built for the baseline x86-64). The GEMMs pick
/// their kernel at run time on their own.
fn band(job: BandJob<'_>, emit: impl FnMut(usize, usize, &[f32])) {
    let tw = job.w.div_ceil(2);
    let tiles = (job.ty1 - job.ty0) * tw;
    let row_len = 4 * (2 * tw + 2) + XI * tw + 8 * tw + 2 * tw;
    let len = XI * (job.conv.c_in * tiles + SKEW + job.conv.c_out * tiles + SKEW) + row_len;
    with_scratch(len, |scratch| {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                // SAFETY: the CPU has AVX-512F, checked just above.
                return unsafe { band_avx512(job, scratch, emit) };
            }
            if std::arch::is_x86_feature_detected!("avx2") {
                // SAFETY: the CPU has AVX2, checked just above.
                return unsafe { band_avx2(job, scratch, emit) };
            }
        }
        band_generic(job, scratch, emit)
    })
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn band_avx512(job: BandJob<'_>, scratch: &mut [f32], emit: impl FnMut(usize, usize, &[f32])) {
    band_generic(job, scratch, emit)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn band_avx2(job: BandJob<'_>, scratch: &mut [f32], emit: impl FnMut(usize, usize, &[f32])) {
    band_generic(job, scratch, emit)
}

/// Input transform, 16 GEMMs and inverse transform of one band in `scratch` (sized by [`band`]);
/// `emit(co, oy, pixels)` receives each finished output row. No closures inside: a closure would be
/// compiled apart from the vector features of the function it is written in.
#[inline(always)]
fn band_generic(job: BandJob<'_>, scratch: &mut [f32], mut emit: impl FnMut(usize, usize, &[f32])) {
    let BandJob {
        xi,
        h,
        w,
        conv,
        u,
        b,
        relu,
        ty0,
        ty1,
    } = job;
    let (ci_n, co_n) = (conv.c_in, conv.c_out);
    let tw = w.div_ceil(2);
    let tiles = (ty1 - ty0) * tw;
    // The 16 blocks of V (and of M) are one cache line further apart than their size: with sizes
    // that are multiples of 4 KiB the 16 streams a transform writes (or reads) would otherwise all
    // map to the same L1 set.
    let (vs, ms) = (ci_n * tiles + SKEW, co_n * tiles + SKEW);
    {
        let (v, rest) = scratch.split_at_mut(XI * vs);
        let (m, rest) = rest.split_at_mut(XI * ms);
        let (pad, rest) = rest.split_at_mut(4 * (2 * tw + 2));
        let (hor, rest) = rest.split_at_mut(XI * tw);
        let (sums, line) = rest.split_at_mut(8 * tw);
        let mut bufs = RowBuffers {
            pad,
            hor,
            sums,
            line,
        };
        // V[ξ][ci][tile], tile = (ty − ty0)·tw + tx.
        for ci in 0..ci_n {
            let plane = &xi[ci * h * w..][..h * w];
            for ty in ty0..ty1 {
                let at = ci * tiles + (ty - ty0) * tw;
                transform_input_row(plane, (h, w), ty, tw, &mut bufs, &mut v[at..], vs);
            }
        }
        // M[ξ] = U[ξ] · V[ξ].
        for xi_ in 0..XI {
            matmul(
                co_n,
                tiles,
                ci_n,
                &mut m[xi_ * ms..][..co_n * tiles],
                tiles,
                false,
                MatRef::rows(&u[xi_ * co_n * ci_n..][..co_n * ci_n], ci_n),
                MatRef::rows(&v[xi_ * vs..][..ci_n * tiles], tiles),
                Parallelism::None,
            );
        }
        for co in 0..co_n {
            let bias = b.map_or(0.0, |b| b[co]);
            for ty in ty0..ty1 {
                let at = co * tiles + (ty - ty0) * tw;
                let rows = (h - 2 * ty).min(2);
                inverse_row(
                    &m[at..],
                    ms,
                    tw,
                    (w, rows),
                    (bias, relu),
                    &mut bufs,
                    |i, px| emit(co, 2 * ty + i, px),
                );
            }
        }
    }
}

/// Tile rows per band for planes `tw` tiles wide.
fn band_tile_rows(conv: Conv, th: usize, tw: usize) -> usize {
    let tiles = (BAND_FLOATS / (XI * (conv.c_in + conv.c_out))).max(MIN_BAND_TILES);
    tiles.div_ceil(tw.max(1)).clamp(1, th.max(1))
}

/// `y = conv(x, w) + b` (then ReLU) for a 3×3 pad-1 layer that [`applies`]; lengths already checked.
///
/// With [`Plan::Images`] each thread takes whole images; otherwise every (image, band) pair is one
/// rayon task (at least two bands per thread, so a busy core does not hold up the layer).
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
    let (h, wd) = (xs.h, xs.w);
    let hw = h * wd;
    let (th, tw) = (h.div_ceil(2), wd.div_ceil(2));
    let cache_rows = band_tile_rows(conv, th, tw);
    assert!(
        y.len() >= xs.n * conv.c_out * hw && x.len() >= xs.n * conv.c_in * hw,
        "winograd forward: buffers too short"
    );
    with_weight_scratch(XI * conv.c_out * conv.c_in, |u| {
        transform_weights(w, conv, u);
        let u = &*u;
        let job = |i: usize, ty0: usize, ty1: usize| BandJob {
            xi: &x[i * conv.c_in * hw..][..conv.c_in * hw],
            h,
            w: wd,
            conv,
            u,
            b,
            relu,
            ty0,
            ty1,
        };
        match plan {
            Plan::Images | Plan::Inside(1) => {
                let per_image = |(i, yi): (usize, &mut [f32])| {
                    for ty0 in (0..th).step_by(cache_rows) {
                        let ty1 = (ty0 + cache_rows).min(th);
                        band(job(i, ty0, ty1), |co, oy, px| {
                            yi[co * hw + oy * wd..][..wd].copy_from_slice(px);
                        });
                    }
                };
                let y = &mut y[..xs.n * conv.c_out * hw];
                if matches!(plan, Plan::Images) {
                    y.par_chunks_exact_mut(conv.c_out * hw)
                        .enumerate()
                        .for_each(per_image);
                } else {
                    y.chunks_exact_mut(conv.c_out * hw)
                        .enumerate()
                        .for_each(per_image);
                }
            }
            Plan::Inside(threads) => {
                let want_bands = (2 * threads).div_ceil(xs.n.max(1));
                let rows = cache_rows
                    .min(th.div_ceil(want_bands))
                    .max(MIN_BAND_TILES.div_ceil(tw.max(1)))
                    .clamp(1, th.max(1));
                let bands = th.div_ceil(rows);
                let out = OutPtr::new(y);
                (0..xs.n * bands).into_par_iter().for_each(|task| {
                    let (i, band_index) = (task / bands, task % bands);
                    let ty0 = band_index * rows;
                    let ty1 = (ty0 + rows).min(th);
                    band(job(i, ty0, ty1), |co, oy, px| {
                        let at = (i * conv.c_out + co) * hw + oy * wd;
                        // SAFETY: `at + wd ≤ (i·c_out + co + 1)·hw ≤ y.len()` (asserted above);
                        // row oy of channel co of image i lies in tile rows ty0..ty1 of this task
                        // alone (tasks differ in image or band), and `px` is task-local scratch.
                        unsafe { out.write(at, px) };
                    });
                });
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The direct 3×3 pad-1 sum in f64.
    fn direct(x: &[f32], xs: Shape, conv: Conv, w: &[f32], b: &[f32], relu: bool) -> Vec<f64> {
        let (h, wd) = (xs.h, xs.w);
        let mut y = vec![0.0f64; xs.n * conv.c_out * h * wd];
        for n in 0..xs.n {
            for co in 0..conv.c_out {
                for oy in 0..h {
                    for ox in 0..wd {
                        let mut s = b[co] as f64;
                        for ci in 0..conv.c_in {
                            for ky in 0..3 {
                                for kx in 0..3 {
                                    let (iy, ix) = (oy + ky, ox + kx);
                                    if iy == 0 || ix == 0 || iy > h || ix > wd {
                                        continue;
                                    }
                                    let xv = x[((n * conv.c_in + ci) * h + iy - 1) * wd + ix - 1];
                                    let wv = w[((co * conv.c_in + ci) * 3 + ky) * 3 + kx];
                                    s += xv as f64 * wv as f64;
                                }
                            }
                        }
                        y[((n * conv.c_out + co) * h + oy) * wd + ox] =
                            if relu { s.max(0.0) } else { s };
                    }
                }
            }
        }
        y
    }

    fn values(len: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..len)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    /// Odd and even sizes, one and several bands, every plan: within rounding of the direct sum.
    #[test]
    fn matches_the_direct_sum_on_odd_sizes_and_every_plan() {
        for (n, ci, co, h, w) in [
            (1, 8, 8, 2, 2),
            (2, 9, 11, 7, 5),
            (1, 16, 12, 33, 3),
            (3, 12, 8, 40, 41),
        ] {
            let xs = Shape::new(n, ci, h, w);
            let conv = Conv::new(ci, co, 3);
            assert!(wide_enough(xs, conv));
            let x = values(n * ci * h * w, 1);
            let wt = values(co * ci * 9, 2);
            let b = values(co, 3);
            for relu in [false, true] {
                let want = direct(&x, xs, conv, &wt, &b, relu);
                let scale = want.iter().fold(1.0f64, |a, v| a.max(v.abs()));
                for plan in [Plan::Images, Plan::Inside(1), Plan::Inside(3)] {
                    let mut y = vec![f32::NAN; want.len()];
                    forward(&x, xs, conv, &wt, Some(&b), relu, &mut y, plan);
                    let worst = y
                        .iter()
                        .zip(&want)
                        .map(|(&a, &b)| (a as f64 - b).abs())
                        .fold(0.0, f64::max);
                    assert!(
                        worst <= 1e-5 * scale,
                        "{xs} {conv:?} relu {relu}: off by {worst} of {scale}"
                    );
                }
            }
        }
    }

    #[test]
    fn thin_layers_stay_on_im2col() {
        assert!(!wide_enough(Shape::new(1, 1, 64, 64), Conv::new(1, 16, 3)));
        assert!(!wide_enough(Shape::new(1, 16, 64, 64), Conv::new(16, 2, 3)));
        assert!(!wide_enough(
            Shape::new(1, 16, 64, 64),
            Conv::new(16, 16, 1)
        ));
        assert!(!wide_enough(Shape::new(1, 16, 1, 64), Conv::new(16, 16, 3)));
        assert!(wide_enough(Shape::new(1, 16, 2, 2), Conv::new(16, 16, 3)));
    }
}
