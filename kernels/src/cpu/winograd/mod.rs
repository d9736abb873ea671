//! 3×3 "same" convolutions by Winograd's minimal filtering (Lavin & Gray, "Fast Algorithms for
//! Convolutional Neural Networks", CVPR 2016): the forward pass of the wide layers.
//!
//! Each m×m block of output pixels ("tile") is computed from the (m+2)×(m+2) input patch around it.
//! With the 3×3 kernel `g` transformed once to `U = G·g·Gᵀ` and each patch `d` to `V = Bᵀ·d·B`, the
//! tile is `Aᵀ·(U ⊙ V)·A`; summed over input channels, the (m+2)² element-wise products become
//! (m+2)² independent GEMMs `M[ξ] = U[ξ] (c_out × c_in) · V[ξ] (c_in × tiles)`. Two variants:
//! - [`f2`], F(2×2, 3×3): 16 multiply-adds per tile and channel pair where im2col + GEMM does 36
//!   (2.25× fewer), a transformed input 4× the input's size; exact up to rounding (1e-5 of the
//!   largest output in this module's test).
//! - [`f4`], F(4×4, 3×3): 36 per 16 outputs (4× fewer), transformed buffers 2.25× the planes; its
//!   larger factors cost precision (1e-4 of the largest output in the test, the engine's parity
//!   bound with tract).
//!
//! Map of this module:
//! - [`applies`]: whether a layer is wide enough for the transforms to pay (and the method is not
//!   switched with `MICROFED_CPU_CONV`, a benchmarking switch: `im2col`, `winograd2`, `winograd4`).
//! - [`forward`]: `y = conv(x, w) + b` (then ReLU), in bands of tile rows that fit in L2, each band
//!   transformed, multiplied and transformed back while it is in cache; threads take bands.
//! - [`Variant`]: one variant's tile size and its three transforms (weights, input rows, inverse).

mod f2;
mod f4;

use super::conv::{OutPtr, Plan};
use super::gemm::{MatRef, matmul, with_scratch, with_weight_scratch};
use crate::{Conv, Shape};
use f2::F2;
use f4::F4;
use gemm::Parallelism;
use rayon::prelude::*;

/// Target size of one band's transformed input and output together, in floats (1 MiB: half of
/// this machine's L2, leaving room for the GEMM's packed blocks).
const BAND_FLOATS: usize = 256 * 1024;

/// Floats between the end of one of the transformed blocks and the start of the next (one cache
/// line).
const SKEW: usize = 16;

/// Fewest tiles per band: narrower GEMMs lose more to packing `U` than the cache saves.
const MIN_BAND_TILES: usize = 64;

/// Channels below which a layer stays on im2col: with few input channels the GEMMs are too thin to
/// pay for the transforms (the first layer reads one grey channel). Measured on the reference U-Net
/// at 512² with F(2×2): thresholds 8, 17 and 33 give the same time, 65 is 10 % slower.
const MIN_CHANNELS: usize = 8;

/// How the wide 3×3 layers are computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Method {
    Im2col,
    F2,
    F4,
}

/// Whether [`forward`] should run this layer (otherwise im2col + GEMM does): a wide 3×3 layer, unless
/// the process was started with `MICROFED_CPU_CONV=im2col`.
pub(crate) fn applies(xs: Shape, conv: Conv) -> bool {
    wide_enough(xs, conv) && method() != Method::Im2col
}

fn wide_enough(xs: Shape, conv: Conv) -> bool {
    conv.k == 3 && conv.c_in >= MIN_CHANNELS && conv.c_out >= MIN_CHANNELS && xs.h >= 2 && xs.w >= 2
}

/// The method for wide layers: `MICROFED_CPU_CONV` (read once; for benchmarking the methods against
/// each other in one build), else F(4×4, 3×3).
fn method() -> Method {
    static METHOD: std::sync::OnceLock<Method> = std::sync::OnceLock::new();
    *METHOD.get_or_init(|| match std::env::var("MICROFED_CPU_CONV").as_deref() {
        Ok("im2col") => Method::Im2col,
        Ok("winograd2") => Method::F2,
        _ => Method::F4,
    })
}

/// One variant F(m×m, 3×3): its tile and its three transforms. Each transform works on whole rows
/// of tiles so that its loops run over contiguous arrays and vectorise.
trait Variant {
    /// Output tile side m.
    const M: usize;
    /// Input patch side m + 2.
    const A: usize = Self::M + 2;
    /// Transformed values per tile, (m + 2)².
    const XI: usize = Self::A * Self::A;

    /// The kernel transform's matrix `G` ((m + 2) × 3): `U = G·g·Gᵀ`.
    const G: &'static [[f32; 3]];

    /// `Bᵀ·d·B` of every tile in tile row `ty` of one input channel `src` (`h × w`), written to
    /// `v[ξ·stride + tx]` for `tx < tw`; pixels outside the image are 0 (pad 1).
    fn transform_input_row(
        src: Src<'_>,
        hw: (usize, usize),
        ty: usize,
        tw: usize,
        bufs: &mut RowBuffers<'_>,
        v: &mut [f32],
        stride: usize,
    );

    /// `Aᵀ·m·A` of every tile in one tile row of one output channel, `m[ξ·stride + tx]`, plus the
    /// bias (then ReLU); hands each of the `rows` (≤ m) output rows inside the image, `w` pixels, to
    /// `emit(row index within the tile row, pixels)`.
    #[allow(clippy::too_many_arguments)]
    fn inverse_row(
        m: &[f32],
        stride: usize,
        tw: usize,
        w_rows: (usize, usize),
        bias_relu: (f32, bool),
        bufs: &mut RowBuffers<'_>,
        emit: impl FnMut(usize, &[f32]),
    );

    /// Floats of [`RowBuffers`] for planes `tw` tiles wide.
    fn row_floats(tw: usize) -> usize {
        let split = Self::A * Self::M * (tw + 1);
        2 * split + Self::M * Self::A * tw + Self::M * tw
    }
}

/// Per-thread buffers of one band ([`Variant::row_floats`]): the m + 2 input rows of a tile row split
/// into m column phases (`pad`), their vertical transforms (`hor`, reused for the inverse's output
/// phases), the m vertical sums of the inverse transform (`sums`) and one output row (`line`).
struct RowBuffers<'a> {
    pad: &'a mut [f32],
    hor: &'a mut [f32],
    sums: &'a mut [f32],
    line: &'a mut [f32],
}

/// `out[t] = f(x[t], y[t])` over the shortest of the three (generic, so each call site inlines
/// its arithmetic and vectorises without bounds checks).
#[inline(always)]
fn zip_with(out: &mut [f32], x: &[f32], y: &[f32], f: impl Fn(f32, f32) -> f32) {
    for ((o, &a), &b) in out.iter_mut().zip(x).zip(y) {
        *o = f(a, b);
    }
}

/// A layer's input.
#[derive(Clone, Copy)]
pub(crate) enum Input<'a> {
    /// `[n, c_in, h, w]`.
    Planes(&'a [f32]),
    /// The decoder's concatenation, never written out: `low` (`[n, c_low, h/2, w/2]`) upsampled 2×
    /// (nearest), then `skip` (`[n, c_in − c_low, h, w]`).
    Up2Concat {
        low: &'a [f32],
        c_low: usize,
        skip: &'a [f32],
    },
}

impl<'a> Input<'a> {
    /// Whether its buffers hold `n` images of `c_in` channels of `h × w` (`h`, `w` even for
    /// [`Input::Up2Concat`]).
    fn fits(&self, n: usize, c_in: usize, h: usize, w: usize) -> bool {
        match *self {
            Input::Planes(x) => x.len() >= n * c_in * h * w,
            Input::Up2Concat { low, c_low, skip } => {
                h.is_multiple_of(2)
                    && w.is_multiple_of(2)
                    && c_low <= c_in
                    && low.len() >= n * c_low * (h / 2) * (w / 2)
                    && skip.len() >= n * (c_in - c_low) * h * w
            }
        }
    }

    /// Image `i` alone.
    fn image(self, i: usize, c_in: usize, hw: usize) -> Input<'a> {
        match self {
            Input::Planes(x) => Input::Planes(&x[i * c_in * hw..][..c_in * hw]),
            Input::Up2Concat { low, c_low, skip } => {
                let c_skip = c_in - c_low;
                Input::Up2Concat {
                    low: &low[i * c_low * hw / 4..][..c_low * hw / 4],
                    c_low,
                    skip: &skip[i * c_skip * hw..][..c_skip * hw],
                }
            }
        }
    }

    /// Channel `ci` of a single image ([`Input::image`]) of `h × w`.
    fn channel(self, ci: usize, h: usize, w: usize) -> Src<'a> {
        match self {
            Input::Planes(x) => Src::Plane(&x[ci * h * w..][..h * w]),
            Input::Up2Concat { low, c_low, .. } if ci < c_low => {
                let hw = (h / 2) * (w / 2);
                Src::Doubled(&low[ci * hw..][..hw])
            }
            Input::Up2Concat { c_low, skip, .. } => {
                Src::Plane(&skip[(ci - c_low) * h * w..][..h * w])
            }
        }
    }
}

/// One input channel of `h × w`.
#[derive(Clone, Copy)]
pub(super) enum Src<'a> {
    /// The plane itself.
    Plane(&'a [f32]),
    /// A plane of `h/2 × w/2` whose pixels each stand for a 2×2 block.
    Doubled(&'a [f32]),
}

/// One row of a [`Src`].
pub(super) enum Row<'a> {
    /// All `w` pixels.
    Full(&'a [f32]),
    /// `w/2` pixels, each standing for two.
    Doubled(&'a [f32]),
}

impl<'a> Src<'a> {
    /// Row `iy` of a channel `w` pixels wide.
    #[inline(always)]
    fn row(self, iy: usize, w: usize) -> Row<'a> {
        match self {
            Src::Plane(p) => Row::Full(&p[iy * w..][..w]),
            Src::Doubled(p) => Row::Doubled(&p[(iy / 2) * (w / 2)..][..w / 2]),
        }
    }
}

/// One band's work: tile rows `ty0..ty1` of output channels `co0..co1` of one image `xi` (`c_in`
/// channels of `h × w`).
#[derive(Clone, Copy)]
struct BandJob<'a> {
    xi: Input<'a>,
    co0: usize,
    co1: usize,
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
fn band<V: Variant>(job: BandJob<'_>, emit: impl FnMut(usize, usize, &[f32])) {
    let tw = job.w.div_ceil(V::M);
    let tiles = (job.ty1 - job.ty0) * tw;
    let len = V::XI * (job.conv.c_in * tiles + SKEW + (job.co1 - job.co0) * tiles + SKEW)
        + V::row_floats(tw);
    with_scratch(len, |scratch| {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                // SAFETY: the CPU has AVX-512F, checked just above.
                return unsafe { band_avx512::<V>(job, scratch, emit) };
            }
            if std::arch::is_x86_feature_detected!("avx2") {
                // SAFETY: the CPU has AVX2, checked just above.
                return unsafe { band_avx2::<V>(job, scratch, emit) };
            }
        }
        band_generic::<V>(job, scratch, emit)
    })
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn band_avx512<V: Variant>(
    job: BandJob<'_>,
    scratch: &mut [f32],
    emit: impl FnMut(usize, usize, &[f32]),
) {
    band_generic::<V>(job, scratch, emit)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn band_avx2<V: Variant>(
    job: BandJob<'_>,
    scratch: &mut [f32],
    emit: impl FnMut(usize, usize, &[f32]),
) {
    band_generic::<V>(job, scratch, emit)
}

/// Input transform, GEMMs and inverse transform of one band in `scratch` (sized by [`band`]);
/// `emit(co, oy, pixels)` receives each finished output row. The transforms are `inline(always)`, so
/// they are compiled with the vector features of the function this is inlined into.
#[inline(always)]
fn band_generic<V: Variant>(
    job: BandJob<'_>,
    scratch: &mut [f32],
    mut emit: impl FnMut(usize, usize, &[f32]),
) {
    let BandJob {
        xi,
        co0,
        co1,
        h,
        w,
        conv,
        u,
        b,
        relu,
        ty0,
        ty1,
    } = job;
    let (ci_n, co_n, parts) = (conv.c_in, conv.c_out, co1 - co0);
    let tw = w.div_ceil(V::M);
    let tiles = (ty1 - ty0) * tw;
    // The transformed blocks of V (and of M) are one cache line further apart than their size: with
    // sizes that are multiples of 4 KiB the streams a transform writes (or reads) would otherwise
    // all map to the same L1 set.
    let (vs, ms) = (ci_n * tiles + SKEW, parts * tiles + SKEW);
    let (v, rest) = scratch.split_at_mut(V::XI * vs);
    let (m, rest) = rest.split_at_mut(V::XI * ms);
    let split = V::A * V::M * (tw + 1);
    let (pad, rest) = rest.split_at_mut(split);
    let (hor, rest) = rest.split_at_mut(split);
    let (sums, line) = rest.split_at_mut(V::M * V::A * tw);
    let mut bufs = RowBuffers {
        pad,
        hor,
        sums,
        line,
    };
    // V[ξ][ci][tile], tile = (ty − ty0)·tw + tx.
    for ci in 0..ci_n {
        let src = xi.channel(ci, h, w);
        for ty in ty0..ty1 {
            let at = ci * tiles + (ty - ty0) * tw;
            V::transform_input_row(src, (h, w), ty, tw, &mut bufs, &mut v[at..], vs);
        }
    }
    // M[ξ] = U[ξ] · V[ξ].
    for x in 0..V::XI {
        matmul(
            parts,
            tiles,
            ci_n,
            &mut m[x * ms..][..parts * tiles],
            tiles,
            false,
            MatRef::rows(&u[(x * co_n + co0) * ci_n..][..parts * ci_n], ci_n),
            MatRef::rows(&v[x * vs..][..ci_n * tiles], tiles),
            Parallelism::None,
        );
    }
    for co in co0..co1 {
        let bias = b.map_or(0.0, |b| b[co]);
        for ty in ty0..ty1 {
            let at = (co - co0) * tiles + (ty - ty0) * tw;
            let rows = (h - V::M * ty).min(V::M);
            V::inverse_row(
                &m[at..],
                ms,
                tw,
                (w, rows),
                (bias, relu),
                &mut bufs,
                |i, px| emit(co, V::M * ty + i, px),
            );
        }
    }
}

/// `u[(ξ·c_out + co)·c_in + ci] = (G·w[co][ci]·Gᵀ)[ξ]` for every 3×3 kernel, vectorised over `ci`.
///
/// Done once per call, before the layer's bands: on several threads the output channels are split
/// over the pool (done serially, it was 2.7 % of a 2-thread 512² run's samples, all on one thread;
/// the end-to-end gain measured within noise: docs/benchmarks.md).
fn transform_weights<V: Variant>(w: &[f32], conv: Conv, u: &mut [f32], threads: usize) {
    let co_n = conv.c_out;
    if threads <= 1 || co_n < 2 {
        transform_channels::<V>(w, conv, 0..co_n, |at, v| {
            u[at..][..v.len()].copy_from_slice(v)
        });
        return;
    }
    let step = co_n.div_ceil(2 * threads);
    let out = OutPtr::new(u);
    (0..co_n.div_ceil(step)).into_par_iter().for_each(|k| {
        let cos = k * step..((k + 1) * step).min(co_n);
        // SAFETY: output channel co writes only u[((r·a + b)·c_out + co)·c_in..][..c_in] for each
        // (r, b), which lie inside u (length ξ·c_out·c_in, checked by the caller's slot) and differ
        // between channels, so tasks (disjoint channel ranges) never write the same element; u stays
        // exclusively borrowed until the parallel loop has joined.
        transform_channels::<V>(w, conv, cos, |at, v| unsafe { out.write(at, v) });
    });
}

/// [`transform_weights`] for the output channels `cos`: each channel's kernels are first transposed
/// to `g[k][ci]`; `put(at, values)` stores `c_in` values at `u[at..]`.
fn transform_channels<V: Variant>(
    w: &[f32],
    conv: Conv,
    cos: std::ops::Range<usize>,
    mut put: impl FnMut(usize, &[f32]),
) {
    let (ci_n, co_n, a) = (conv.c_in, conv.c_out, V::A);
    let mut g = vec![0.0f32; 9 * ci_n];
    // (G·g)[r][c] at gg[(3r + c)·c_in..].
    let mut gg = vec![0.0f32; 3 * a * ci_n];
    let mut ub = vec![0.0f32; ci_n];
    let combine = |out: &mut [f32], [x0, x1, x2]: [&[f32]; 3], [k0, k1, k2]: [f32; 3]| {
        for (((o, &y0), &y1), &y2) in out.iter_mut().zip(x0).zip(x1).zip(x2) {
            *o = k0 * y0 + k1 * y1 + k2 * y2;
        }
    };
    fn row(m: &[f32], i: usize, n: usize) -> &[f32] {
        &m[i * n..][..n]
    }
    for co in cos {
        for (ci, k9) in w[co * ci_n * 9..][..ci_n * 9].chunks_exact(9).enumerate() {
            for (k, &v) in k9.iter().enumerate() {
                g[k * ci_n + ci] = v;
            }
        }
        for (r, gr) in V::G.iter().enumerate() {
            for c in 0..3 {
                let out = &mut gg[(3 * r + c) * ci_n..][..ci_n];
                combine(
                    out,
                    [row(&g, c, ci_n), row(&g, 3 + c, ci_n), row(&g, 6 + c, ci_n)],
                    *gr,
                );
            }
        }
        for r in 0..a {
            let x = [
                row(&gg, 3 * r, ci_n),
                row(&gg, 3 * r + 1, ci_n),
                row(&gg, 3 * r + 2, ci_n),
            ];
            for (b, gb) in V::G.iter().enumerate() {
                combine(&mut ub, x, *gb);
                put(((r * a + b) * co_n + co) * ci_n, &ub);
            }
        }
    }
}

/// Tile rows per band for planes `tw` tiles wide.
fn band_tile_rows<V: Variant>(conv: Conv, th: usize, tw: usize) -> usize {
    let tiles = (BAND_FLOATS / (V::XI * (conv.c_in + conv.c_out))).max(MIN_BAND_TILES);
    tiles.div_ceil(tw.max(1)).clamp(1, th.max(1))
}

/// `y = conv(x, w) + b` (then ReLU) for a 3×3 pad-1 layer that [`applies`]; lengths already checked.
/// `xs` is the shape of the layer's input (for [`Input::Up2Concat`], of the concatenation).
#[allow(clippy::too_many_arguments)]
pub(crate) fn forward(
    x: Input<'_>,
    xs: Shape,
    conv: Conv,
    w: &[f32],
    b: Option<&[f32]>,
    relu: bool,
    y: &mut [f32],
    plan: Plan,
) {
    match method() {
        Method::F2 => forward_with::<F2>(x, xs, conv, w, b, relu, y, plan),
        // Im2col is not reached: `applies` said no.
        Method::F4 | Method::Im2col => forward_with::<F4>(x, xs, conv, w, b, relu, y, plan),
    }
}

/// [`forward`] by one variant.
///
/// With [`Plan::Images`] each thread takes whole images; otherwise every (image, band) pair is one
/// rayon task (at least two bands per thread, so a busy core does not hold up the layer).
#[allow(clippy::too_many_arguments)]
fn forward_with<V: Variant>(
    x: Input<'_>,
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
    let (th, tw) = (h.div_ceil(V::M), wd.div_ceil(V::M));
    let cache_rows = band_tile_rows::<V>(conv, th, tw);
    assert!(
        y.len() >= xs.n * conv.c_out * hw && x.fits(xs.n, conv.c_in, h, wd),
        "winograd forward: buffers too short"
    );
    with_weight_scratch(V::XI * conv.c_out * conv.c_in, |u| {
        let threads = match plan {
            Plan::Images => rayon::current_num_threads(),
            Plan::Inside(t) => t,
        };
        transform_weights::<V>(w, conv, u, threads);
        let u = &*u;
        let job = |i: usize, (ty0, ty1): (usize, usize), (co0, co1): (usize, usize)| BandJob {
            xi: x.image(i, conv.c_in, hw),
            co0,
            co1,
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
                        band::<V>(job(i, (ty0, ty1), (0, conv.c_out)), |co, oy, px| {
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
                let n = xs.n.max(1);
                // Deep layers on small planes (as many output channels as half the tiles, or
                // more): every band packs all of `U` for its GEMMs again, so one band per thread;
                // and with fewer bands than threads (a plane of a few tile rows) the threads split
                // the output channels instead, each transforming the band's input itself (cheap
                // next to its GEMMs at these sizes).
                let heavy_weights = 2 * conv.c_out >= th * tw;
                let want_bands = if heavy_weights { threads } else { 2 * threads }.div_ceil(n);
                let rows = cache_rows
                    .min(th.div_ceil(want_bands))
                    .max(MIN_BAND_TILES.div_ceil(tw.max(1)))
                    .clamp(1, th.max(1));
                let bands = th.div_ceil(rows);
                let parts = if heavy_weights && n * bands < threads {
                    threads.div_ceil(n * bands)
                } else {
                    1
                };
                // Parts of whole vectors (16 lanes), so the GEMMs keep full tiles.
                let co_step = conv
                    .c_out
                    .div_ceil(parts)
                    .next_multiple_of(16)
                    .min(conv.c_out);
                let parts = conv.c_out.div_ceil(co_step);
                let out = OutPtr::new(y);
                (0..n * bands * parts).into_par_iter().for_each(|task| {
                    let (i, band_index, part) =
                        (task / (bands * parts), task / parts % bands, task % parts);
                    let ty0 = band_index * rows;
                    let ty1 = (ty0 + rows).min(th);
                    let co0 = part * co_step;
                    let co1 = (co0 + co_step).min(conv.c_out);
                    band::<V>(job(i, (ty0, ty1), (co0, co1)), |co, oy, px| {
                        let at = (i * conv.c_out + co) * hw + oy * wd;
                        // SAFETY: `at + wd ≤ (i·c_out + co + 1)·hw ≤ y.len()` (asserted above);
                        // row oy of channel co of image i lies in tile rows ty0..ty1 and channels
                        // co0..co1 of this task alone (tasks differ in image, band or part), and
                        // `px` is task-local scratch.
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

    /// Odd and even sizes, one and several bands, every plan, both variants: within rounding of the
    /// direct sum.
    #[test]
    fn matches_the_direct_sum_on_odd_sizes_and_every_plan() {
        type Run = fn(Input<'_>, Shape, Conv, &[f32], Option<&[f32]>, bool, &mut [f32], Plan);
        let variants: [(&str, Run, f64); 2] = [
            ("F(2×2)", forward_with::<F2>, 1e-5),
            ("F(4×4)", forward_with::<F4>, 1e-4),
        ];
        for (n, ci, co, h, w) in [
            (1, 8, 8, 2, 2),
            (2, 9, 11, 7, 5),
            (1, 16, 12, 33, 3),
            (3, 12, 8, 40, 41),
            (1, 8, 9, 6, 13),
            (1, 10, 8, 17, 18),
            // Small planes with many output channels: on several threads, split by channels.
            (1, 8, 40, 6, 6),
            (2, 12, 33, 5, 9),
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
                for (name, run, bound) in variants {
                    for plan in [Plan::Images, Plan::Inside(1), Plan::Inside(3)] {
                        let mut y = vec![f32::NAN; want.len()];
                        run(
                            Input::Planes(&x),
                            xs,
                            conv,
                            &wt,
                            Some(&b),
                            relu,
                            &mut y,
                            plan,
                        );
                        let worst = y
                            .iter()
                            .zip(&want)
                            .map(|(&a, &b)| (a as f64 - b).abs())
                            .fold(0.0, f64::max);
                        assert!(
                            worst <= bound * scale,
                            "{name} {xs} {conv:?} relu {relu}: off by {worst} of {scale}"
                        );
                    }
                }
            }
        }
    }

    /// The decoder's concatenation read in place (never written out) gives what the written-out
    /// one gives, bit for bit: odd low-resolution sizes, several images, every plan, both variants.
    #[test]
    fn an_upsampled_concatenation_read_in_place_equals_the_written_one() {
        type Run = fn(Input<'_>, Shape, Conv, &[f32], Option<&[f32]>, bool, &mut [f32], Plan);
        let variants: [Run; 2] = [forward_with::<F2>, forward_with::<F4>];
        for (n, c_low, c_skip, h, w, co) in
            [(1, 8, 8, 3, 5, 9), (2, 5, 7, 4, 4, 8), (1, 16, 4, 1, 7, 8)]
        {
            let (h2, w2) = (2 * h, 2 * w);
            let ci = c_low + c_skip;
            let xs = Shape::new(n, ci, h2, w2);
            let conv = Conv::new(ci, co, 3);
            let low = values(n * c_low * h * w, 4);
            let skip = values(n * c_skip * h2 * w2, 5);
            let mut cat = vec![0.0f32; xs.len()];
            crate::cpu::ops::upsample2_concat_forward(
                &low,
                Shape::new(n, c_low, h, w),
                &skip,
                c_skip,
                &mut cat,
            );
            let wt = values(co * ci * 9, 6);
            let b = values(co, 7);
            for run in variants {
                for plan in [Plan::Images, Plan::Inside(1), Plan::Inside(3)] {
                    let mut want = vec![f32::NAN; n * co * h2 * w2];
                    run(
                        Input::Planes(&cat),
                        xs,
                        conv,
                        &wt,
                        Some(&b),
                        true,
                        &mut want,
                        plan,
                    );
                    let mut got = vec![f32::NAN; want.len()];
                    let x = Input::Up2Concat {
                        low: &low,
                        c_low,
                        skip: &skip,
                    };
                    run(x, xs, conv, &wt, Some(&b), true, &mut got, plan);
                    assert!(
                        got.iter()
                            .zip(&want)
                            .all(|(a, b)| a.to_bits() == b.to_bits()),
                        "{xs} {conv:?} {plan:?}"
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
