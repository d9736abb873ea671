//! F(2×2, 3×3): 2×2 output tiles from 4×4 input patches, 16 GEMMs, 2.25× fewer multiplications
//! than the direct sum. Its transforms only add and halve (exact up to rounding).

use super::{Row, RowBuffers, Src, Variant, zip_with};

/// F(2×2, 3×3).
pub(super) struct F2;

impl Variant for F2 {
    const M: usize = 2;

    const G: &'static [[f32; 3]] = &[
        [1.0, 0.0, 0.0],
        [0.5, 0.5, 0.5],
        [0.5, -0.5, 0.5],
        [0.0, 0.0, 1.0],
    ];

    /// `Bᵀ·d·B` of every tile in tile row `ty` of one input channel `src` (`h × w`), written to
    /// `v[ξ·stride + tx]` for `tx < tw`, with `Bᵀ = [[1, 0, −1, 0], [0, 1, 1, 0], [0, −1, 1, 0],
    /// [0, 1, 0, −1]]`. Pixels outside the image are 0 (pad 1).
    ///
    /// Every step runs over contiguous arrays so that it vectorises: the four input rows are first
    /// split into their even and odd padded columns (`e[k]` = column 2k−1, `o[k]` = column 2k), the
    /// vertical transform combines whole rows, and the horizontal one is then `e[t] − e[t+1]`,
    /// `o[t] + e[t+1]`, `e[t+1] − o[t]`, `o[t] − o[t+1]`.
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
        for r in 0..4 {
            let (e, o) = bufs.pad[r * 2 * n..][..2 * n].split_at_mut(n);
            let iy = (2 * ty + r) as isize - 1;
            if iy < 0 || iy >= h as isize {
                e.fill(0.0);
                o.fill(0.0);
                continue;
            }
            e[0] = 0.0;
            let src = match src.row(iy as usize, w) {
                Row::Full(src) => src,
                Row::Doubled(low) => {
                    // Image columns 2k and 2k + 1 both hold low[k].
                    let wl = low.len();
                    o[..wl].copy_from_slice(low);
                    e[1..wl + 1].copy_from_slice(low);
                    o[wl..].fill(0.0);
                    e[wl + 1..].fill(0.0);
                    continue;
                }
            };
            let pairs = w / 2;
            // An index loop over exact slices: the compiler turns it into vector permutes.
            let src2 = &src[..2 * pairs];
            let (oq, eq) = (&mut o[..pairs], &mut e[1..pairs + 1]);
            for k in 0..pairs {
                oq[k] = src2[2 * k];
                eq[k] = src2[2 * k + 1];
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
}
