//! F(4×4, 3×3): 4×4 output tiles from 6×6 input patches, 36 GEMMs, 4× fewer multiplications than
//! the direct sum (F(2×2, 3×3): 2.25×), and transformed buffers 2.25× the planes' size instead of 4×:
//! less memory traffic for the thin full-resolution layers, which are memory-bound. The transforms
//! use the interpolation points 0, ±1, ±2 (Lavin & Gray's matrices), whose factors up to 8 cost
//! some precision: the test bound is 1e-4 of the largest output instead of F(2×2)'s 1e-5.
//!
//! `Bᵀ = [[4, 0, −5, 0, 1, 0], [0, −4, −4, 1, 1, 0], [0, 4, −4, −1, 1, 0], [0, −2, −1, 2, 1, 0],
//! [0, 2, −1, −2, 1, 0], [0, 4, 0, −5, 0, 1]]`,
//! `G = [[¼, 0, 0], [−⅙, −⅙, −⅙], [−⅙, ⅙, −⅙], [1⁄24, 1⁄12, ⅙], [1⁄24, −1⁄12, ⅙], [0, 0, 1]]`,
//! `Aᵀ = [[1, 1, 1, 1, 1, 0], [0, 1, −1, 2, −2, 0], [0, 1, 1, 4, 4, 0], [0, 1, −1, 8, −8, 1]]`.

use super::{Row, RowBuffers, Src, Variant};

/// F(4×4, 3×3).
pub(super) struct F4;

/// `Bᵀ·d` for one column `d` of a 6×6 patch.
#[inline(always)]
fn bt(d: [f32; 6]) -> [f32; 6] {
    let [d0, d1, d2, d3, d4, d5] = d;
    [
        4.0 * d0 - 5.0 * d2 + d4,
        (d3 + d4) - 4.0 * (d1 + d2),
        (d4 - d3) + 4.0 * (d1 - d2),
        (d4 - d2) + 2.0 * (d3 - d1),
        (d4 - d2) - 2.0 * (d3 - d1),
        4.0 * d1 - 5.0 * d3 + d5,
    ]
}

/// `Aᵀ·m` for one column `m` of a 6×6 product.
#[inline(always)]
fn at(m: [f32; 6]) -> [f32; 4] {
    let [m0, m1, m2, m3, m4, m5] = m;
    let (s12, d12, s34, d34) = (m1 + m2, m1 - m2, m3 + m4, m3 - m4);
    [
        m0 + s12 + s34,
        d12 + 2.0 * d34,
        s12 + 4.0 * s34,
        d12 + 8.0 * d34 + m5,
    ]
}

// The loops below are functions of their slices, not loops over local slices: a reference passed as
// an argument tells the compiler it aliases nothing else (kept when inlined), so it vectorises them
// without run-time overlap checks, which for six inputs and six outputs it would not emit.

/// `q1[k], q2[k], q3[k], q0[k] = src[4k..4k + 4]` for `k < q0.len()`.
#[inline(always)]
fn split4(src: &[f32], q0: &mut [f32], q1: &mut [f32], q2: &mut [f32], q3: &mut [f32]) {
    let n = q0.len();
    let (src, q1, q2, q3) = (&src[..4 * n], &mut q1[..n], &mut q2[..n], &mut q3[..n]);
    for k in 0..n {
        q1[k] = src[4 * k];
        q2[k] = src[4 * k + 1];
        q3[k] = src[4 * k + 2];
        q0[k] = src[4 * k + 3];
    }
}

/// [`split4`] of a row that is `low` with each pixel doubled: `q1[k], q2[k], q3[k], q0[k] =
/// low[2k], low[2k], low[2k + 1], low[2k + 1]`.
#[inline(always)]
fn split4_doubled(low: &[f32], q0: &mut [f32], q1: &mut [f32], q2: &mut [f32], q3: &mut [f32]) {
    let n = q0.len();
    let (low, q1, q2, q3) = (&low[..2 * n], &mut q1[..n], &mut q2[..n], &mut q3[..n]);
    for k in 0..n {
        let (a, b) = (low[2 * k], low[2 * k + 1]);
        q1[k] = a;
        q2[k] = a;
        q3[k] = b;
        q0[k] = b;
    }
}

/// `o[·][k] = Bᵀ·d[·][k]` for `k < o0.len()`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn bt_rows(
    d: [&[f32]; 6],
    o0: &mut [f32],
    o1: &mut [f32],
    o2: &mut [f32],
    o3: &mut [f32],
    o4: &mut [f32],
    o5: &mut [f32],
) {
    let n = o0.len();
    let [d0, d1, d2, d3, d4, d5] = d.map(|r| &r[..n]);
    let (o1, o2, o3, o4, o5) = (
        &mut o1[..n],
        &mut o2[..n],
        &mut o3[..n],
        &mut o4[..n],
        &mut o5[..n],
    );
    for k in 0..n {
        let r = bt([d0[k], d1[k], d2[k], d3[k], d4[k], d5[k]]);
        (o0[k], o1[k], o2[k], o3[k], o4[k], o5[k]) = (r[0], r[1], r[2], r[3], r[4], r[5]);
    }
}

/// `s[·][k] = Aᵀ·m[·][k]` (+ `bias`, then ReLU when `relu`) for `k < s0.len()`.
#[inline(always)]
fn at_rows(
    m: [&[f32]; 6],
    s0: &mut [f32],
    s1: &mut [f32],
    s2: &mut [f32],
    s3: &mut [f32],
    bias: f32,
    relu: bool,
) {
    // Two loops rather than a test inside one: the test would keep it from vectorising.
    if relu {
        at_rows_then::<true>(m, s0, s1, s2, s3, bias);
    } else {
        at_rows_then::<false>(m, s0, s1, s2, s3, bias);
    }
}

#[inline(always)]
fn at_rows_then<const RELU: bool>(
    m: [&[f32]; 6],
    s0: &mut [f32],
    s1: &mut [f32],
    s2: &mut [f32],
    s3: &mut [f32],
    bias: f32,
) {
    let n = s0.len();
    let [m0, m1, m2, m3, m4, m5] = m.map(|r| &r[..n]);
    let (s1, s2, s3) = (&mut s1[..n], &mut s2[..n], &mut s3[..n]);
    for k in 0..n {
        let o = at([m0[k], m1[k], m2[k], m3[k], m4[k], m5[k]]);
        let f = |v: f32| {
            let v = v + bias;
            // `if v > 0 { v } else { 0 }` rather than `max`: one vector max, no NaN blend.
            if !RELU || v > 0.0 { v } else { 0.0 }
        };
        s0[k] = f(o[0]);
        s1[k] = f(o[1]);
        s2[k] = f(o[2]);
        s3[k] = f(o[3]);
    }
}

/// `line[4k + j] = q_j[k]` for `k < q0.len()`.
#[inline(always)]
fn interleave4(q0: &[f32], q1: &[f32], q2: &[f32], q3: &[f32], line: &mut [f32]) {
    let n = q0.len();
    let (q1, q2, q3, line) = (&q1[..n], &q2[..n], &q3[..n], &mut line[..4 * n]);
    for k in 0..n {
        line[4 * k] = q0[k];
        line[4 * k + 1] = q1[k];
        line[4 * k + 2] = q2[k];
        line[4 * k + 3] = q3[k];
    }
}

impl Variant for F4 {
    const M: usize = 4;

    const G: &'static [[f32; 3]] = &[
        [0.25, 0.0, 0.0],
        [-1.0 / 6.0, -1.0 / 6.0, -1.0 / 6.0],
        [-1.0 / 6.0, 1.0 / 6.0, -1.0 / 6.0],
        [1.0 / 24.0, 1.0 / 12.0, 1.0 / 6.0],
        [1.0 / 24.0, -1.0 / 12.0, 1.0 / 6.0],
        [0.0, 0.0, 1.0],
    ];

    /// `Bᵀ·d·B` of every tile in tile row `ty` of one input channel `src` (`h × w`), written to
    /// `v[ξ·stride + tx]` for `tx < tw`; pixels outside the image are 0 (pad 1).
    ///
    /// As in F(2×2), every step runs over contiguous arrays so that it vectorises: each of the six
    /// input rows is split into four phases (`p[j][k]` = padded column 4k + j, i.e. image column
    /// 4k + j − 1), so that tile `t` reads `p0[t], p1[t], p2[t], p3[t], p0[t+1], p1[t+1]`; the
    /// vertical transform combines whole split rows, the horizontal one those six shifted arrays.
    #[inline(always)]
    fn transform_input_row(
        src: Src<'_>,
        (h, w): (usize, usize),
        ty: usize,
        tw: usize,
        bufs: &mut RowBuffers<'_>,
        v: &mut [f32],
        stride: usize,
    ) {
        let n = tw + 1;
        for r in 0..6 {
            let ph = &mut bufs.pad[r * 4 * n..][..4 * n];
            let iy = (4 * ty + r) as isize - 1;
            if iy < 0 || iy >= h as isize {
                ph.fill(0.0);
                continue;
            }
            let (p0, rest) = ph.split_at_mut(n);
            let (p1, rest) = rest.split_at_mut(n);
            let (p2, p3) = rest.split_at_mut(n);
            p0[0] = 0.0;
            let quads = w / 4;
            // The last w mod 4 pixels, which fill no quad.
            let mut tail = [0.0f32; 3];
            match src.row(iy as usize, w) {
                Row::Full(src) => {
                    split4(src, &mut p0[1..quads + 1], p1, p2, p3);
                    for (t, &x) in tail.iter_mut().zip(&src[4 * quads..]) {
                        *t = x;
                    }
                }
                Row::Doubled(low) => {
                    split4_doubled(low, &mut p0[1..quads + 1], p1, p2, p3);
                    // w is even: a tail of 2 is image columns 4q and 4q + 1, both low[2q].
                    tail = [low[(2 * quads).min(low.len() - 1)]; 3];
                }
            }
            let mut ends = [quads; 3];
            for (i, &x) in tail.iter().take(w % 4).enumerate() {
                [&mut *p1, &mut *p2, &mut *p3][i][quads] = x;
                ends[i] += 1;
            }
            p1[ends[0]..].fill(0.0);
            p2[ends[1]..].fill(0.0);
            p3[ends[2]..].fill(0.0);
            p0[quads + 1..].fill(0.0);
        }
        // Vertical, on whole split rows: hor[a] = (Bᵀ · rows)[a].
        {
            let len = 4 * n;
            let (pad, hor) = (&bufs.pad[..6 * len], &mut bufs.hor[..6 * len]);
            let (d0, rest) = pad.split_at(len);
            let (d1, rest) = rest.split_at(len);
            let (d2, rest) = rest.split_at(len);
            let (d3, rest) = rest.split_at(len);
            let (d4, d5) = rest.split_at(len);
            let (o0, rest) = hor.split_at_mut(len);
            let (o1, rest) = rest.split_at_mut(len);
            let (o2, rest) = rest.split_at_mut(len);
            let (o3, rest) = rest.split_at_mut(len);
            let (o4, o5) = rest.split_at_mut(len);
            bt_rows([d0, d1, d2, d3, d4, d5], o0, o1, o2, o3, o4, o5);
        }
        // Horizontal, straight into V: row a, column b of tile t at v[(6a + b)·stride + t].
        for a in 0..6 {
            let row = &bufs.hor[a * 4 * n..][..4 * n];
            let (e0, e1, e2, e3) = (
                &row[..tw],
                &row[n..][..tw],
                &row[2 * n..][..tw],
                &row[3 * n..][..tw],
            );
            let (e4, e5) = (&row[1..][..tw], &row[n + 1..][..tw]);
            let (va, _) = v[a * 6 * stride..].split_at_mut(5 * stride + tw);
            let (v0, rest) = va.split_at_mut(stride);
            let (v1, rest) = rest.split_at_mut(stride);
            let (v2, rest) = rest.split_at_mut(stride);
            let (v3, rest) = rest.split_at_mut(stride);
            let (v4, v5) = rest.split_at_mut(stride);
            let (v0, v1, v2, v3, v4, v5) = (
                &mut v0[..tw],
                &mut v1[..tw],
                &mut v2[..tw],
                &mut v3[..tw],
                &mut v4[..tw],
                &mut v5[..tw],
            );
            bt_rows([e0, e1, e2, e3, e4, e5], v0, v1, v2, v3, v4, v5);
        }
    }

    /// `Aᵀ·m·A` of every tile in one tile row of one output channel, `m[ξ·stride + tx]`, plus `bias`
    /// (then ReLU); hands each of the (at most four) output rows inside the image to
    /// `emit(row index within the tile row, pixels)`.
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
        // Vertical: sums[(i·6 + b)·tw + tx] = (Aᵀ · m[·][b])[i].
        for b in 0..6 {
            let r = |a: usize| &m[(a * 6 + b) * stride..][..tw];
            let sums = &mut bufs.sums[..24 * tw];
            let (s0, rest) = sums.split_at_mut(6 * tw);
            let (s1, rest) = rest.split_at_mut(6 * tw);
            let (s2, s3) = rest.split_at_mut(6 * tw);
            at_rows(
                [r(0), r(1), r(2), r(3), r(4), r(5)],
                &mut s0[b * tw..][..tw],
                &mut s1[b * tw..][..tw],
                &mut s2[b * tw..][..tw],
                &mut s3[b * tw..][..tw],
                0.0,
                false,
            );
        }
        // Horizontal, bias and ReLU, into one output row at a time: the four output phases apart
        // (contiguous, so they vectorise), then interleaved.
        for i in 0..rows {
            let s = &bufs.sums[i * 6 * tw..][..6 * tw];
            let c = |b: usize| &s[b * tw..][..tw];
            let ph = &mut bufs.hor[..4 * tw];
            let (q0, rest) = ph.split_at_mut(tw);
            let (q1, rest) = rest.split_at_mut(tw);
            let (q2, q3) = rest.split_at_mut(tw);
            at_rows(
                [c(0), c(1), c(2), c(3), c(4), c(5)],
                q0,
                q1,
                q2,
                q3,
                bias,
                relu,
            );
            interleave4(q0, q1, q2, q3, bufs.line);
            emit(i, &bufs.line[..w]);
        }
    }
}
