//! Backend-generic check bodies: every op against a plain-loop f64 reference, every backward pass
//! against central finite differences of that reference, the optimisers against PyTorch's update
//! rules, and the whole U-Net's gradients. `main.rs` runs each body on the CPU and on CUDA.
//!
//! Map of this module:
//! - `check_*`: one body per op or property, `(backend, tolerance, seed)`.
//! - [`check_unet_gradients`], [`check_decoder_mode`]: whole-network checks.
//! - `reference`: the f64 reference ops (and reference U-Net loss) the checks compare against.
//!
//! Conventions: outputs are poisoned with NaN before each op (an unwritten element fails the
//! comparison); sizes are odd (`c_in` 3, `c_out` 5, 7×9 planes) so that no vector width divides them;
//! inputs are fresh random numbers from `seed`, and every failure message names the seed so it can be
//! replayed (`MICROFED_SEED`). Analytic gradients are computed by the backend in f32; the numeric ones
//! by central differences of the f64 reference (exact for the linear ops, `O(h²)` ≈ 1e-10 for the
//! others), so the tolerance only has to cover the backend's own rounding.
//!
//! A value `got` passes against `want` when `|got − want| ≤ tol·(|want| + rms(want))`.

use microfed_kernels::unet::{CHANNELS, DEPTH, Loss, Optim, OptimKind, Params, UNet};
use microfed_kernels::{
    Backend, Conv, DICE_EPS, IGNORE_LABEL, KernelError, OptimStep, Precision, Shape,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::sync::Arc;

/// Why a check failed.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    /// The backend returned an error.
    #[error("seed {seed}: backend error: {source}")]
    Kernel {
        seed: u64,
        #[source]
        source: KernelError,
    },
    /// A value disagrees with the reference.
    #[error("seed {seed}: {what}")]
    Mismatch { seed: u64, what: String },
}

// ---- helpers ------------------------------------------------------------------------------------

struct Ctx<'b, B: Backend> {
    b: &'b B,
    seed: u64,
    tol: f32,
    rng: ChaCha8Rng,
}

impl<'b, B: Backend> Ctx<'b, B> {
    fn new(b: &'b B, tol: f32, seed: u64) -> Self {
        Self {
            b,
            seed,
            tol,
            rng: ChaCha8Rng::seed_from_u64(seed),
        }
    }
    fn k<T>(&self, r: Result<T, KernelError>) -> Result<T, CheckError> {
        r.map_err(|source| CheckError::Kernel {
            seed: self.seed,
            source,
        })
    }
    fn fail(&self, what: String) -> CheckError {
        CheckError::Mismatch {
            seed: self.seed,
            what,
        }
    }
    fn uniform(&mut self, n: usize, lo: f32, hi: f32) -> Vec<f32> {
        (0..n).map(|_| self.rng.random_range(lo..hi)).collect()
    }
    fn up(&self, v: &[f32]) -> Result<B::Buffer, CheckError> {
        self.k(self.b.upload(v))
    }
    /// A device buffer full of NaN.
    fn poisoned(&self, n: usize) -> Result<B::Buffer, CheckError> {
        self.k(self.b.upload(&vec![f32::NAN; n]))
    }
    fn down(&self, buf: &B::Buffer) -> Result<Vec<f32>, CheckError> {
        self.k(self.b.download(buf))
    }
    fn labels(&mut self, n: usize, classes: usize, ignore_frac: f64) -> Vec<u8> {
        (0..n)
            .map(|_| {
                if self.rng.random_bool(ignore_frac) {
                    IGNORE_LABEL
                } else {
                    self.rng.random_range(0..classes) as u8
                }
            })
            .collect()
    }
    fn compare(&self, what: &str, got: &[f32], want: &[f64]) -> Result<(), CheckError> {
        compare(what, got, want, self.tol).map_err(|w| self.fail(w))
    }
    /// [`compare`], for two computations whose inputs differ by rounding and pass through ReLUs:
    /// where an input rounds to the other side of zero, the gradients downstream of that unit
    /// differ by more than rounding. At most `KINK_FRACTION` of the values may miss the tolerance,
    /// and those by no more than `KINK_RMS` of the values' rms (seed 1796639412131688525 flips
    /// one: 791 of 783874 gradients off, the worst by 1.3 % of the rms).
    fn compare_across_kinks(
        &self,
        what: &str,
        got: &[f32],
        want: &[f64],
    ) -> Result<(), CheckError> {
        const KINK_FRACTION: f64 = 0.005;
        const KINK_RMS: f64 = 0.05;
        let strict = compare(what, got, want, self.tol);
        if strict.is_ok() || got.len() != want.len() {
            return strict.map_err(|w| self.fail(w));
        }
        let rms = rms(want);
        let tol = f64::from(self.tol);
        let off = got
            .iter()
            .zip(want)
            .filter(|&(&g, &w)| {
                let err = (g as f64 - w).abs();
                err.is_nan() || err > tol * (w.abs() + rms)
            })
            .count();
        let worst = got
            .iter()
            .zip(want)
            .map(|(&g, &w)| (g as f64 - w).abs())
            .fold(
                0.0f64,
                |a, e| if e.is_nan() { f64::INFINITY } else { a.max(e) },
            );
        if off as f64 <= KINK_FRACTION * got.len() as f64 && worst <= KINK_RMS * rms {
            return Ok(());
        }
        Err(self.fail(format!(
            "{} (more than {KINK_FRACTION} of the values, or one by more than {KINK_RMS} of the \
             rms: not a ReLU flip)",
            strict.unwrap_err()
        )))
    }
}

/// `Ok` when every `got[i]` is within `tol·(|want[i]| + rms(want))`; otherwise a message with the
/// worst element and how many failed.
pub fn compare(what: &str, got: &[f32], want: &[f64], tol: f32) -> Result<(), String> {
    if got.len() != want.len() {
        return Err(format!(
            "{what}: {} values, expected {}",
            got.len(),
            want.len()
        ));
    }
    let rms = rms(want);
    let mut bad = 0;
    let mut worst: Option<(usize, f64)> = None;
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let err = (g as f64 - w).abs();
        let bound = tol as f64 * (w.abs() + rms) + f64::MIN_POSITIVE;
        let ratio = err / bound;
        // A NaN ratio (poison that was never overwritten) must fail too.
        if ratio.is_nan() || ratio > 1.0 {
            bad += 1;
            if worst.is_none_or(|(_, r)| ratio.is_nan() || ratio > r) {
                worst = Some((i, ratio));
            }
        }
    }
    match worst {
        None => Ok(()),
        Some((i, ratio)) => Err(format!(
            "{what}: {bad} of {} values off; worst at {i}: got {}, expected {} ({ratio:.1}× the \
             tolerance {tol:e}, rms {rms:e})",
            got.len(),
            got[i],
            want[i]
        )),
    }
}

/// Root mean square of `v` (0 for none).
fn rms(v: &[f64]) -> f64 {
    (v.iter().map(|w| w * w).sum::<f64>() / v.len().max(1) as f64).sqrt()
}

fn to64(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

/// Central differences of `f` at `x` for every coordinate: `(f(x + h·e_i) − f(x − h·e_i)) / 2h`.
fn finite_diff(x: &[f64], h: f64, f: impl Fn(&[f64]) -> f64) -> Vec<f64> {
    let mut xp = x.to_vec();
    (0..x.len())
        .map(|i| {
            xp[i] = x[i] + h;
            let fp = f(&xp);
            xp[i] = x[i] - h;
            let fm = f(&xp);
            xp[i] = x[i];
            (fp - fm) / (2.0 * h)
        })
        .collect()
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

// ---- reference ops (f64, plain loops) -----------------------------------------------------------

/// Plain-loop f64 versions of the backend ops: the oracle.
pub mod reference {
    use super::*;

    /// Cross-correlation with "same" zero padding (PyTorch's `Conv2d`), plus bias, optional ReLU.
    pub fn conv(x: &[f64], xs: Shape, conv: Conv, w: &[f64], b: &[f64], relu: bool) -> Vec<f64> {
        let (h, wd, k) = (xs.h, xs.w, conv.k);
        let pad = k / 2;
        let hw = h * wd;
        let mut y = vec![0.0; xs.n * conv.c_out * hw];
        for n in 0..xs.n {
            for co in 0..conv.c_out {
                let out = &mut y[(n * conv.c_out + co) * hw..][..hw];
                out.fill(b[co]);
                for ci in 0..conv.c_in {
                    let plane = &x[(n * xs.c + ci) * hw..][..hw];
                    for ky in 0..k {
                        for kx in 0..k {
                            let wv = w[((co * conv.c_in + ci) * k + ky) * k + kx];
                            // y[oy, ox] += w·x[oy + ky − pad, ox + kx − pad] where that is inside.
                            for oy in pad.saturating_sub(ky)..(h + pad).saturating_sub(ky).min(h) {
                                let iy = oy + ky - pad;
                                for ox in
                                    pad.saturating_sub(kx)..(wd + pad).saturating_sub(kx).min(wd)
                                {
                                    out[oy * wd + ox] += wv * plane[iy * wd + ox + kx - pad];
                                }
                            }
                        }
                    }
                }
                if relu {
                    out.iter_mut().for_each(|v| *v = v.max(0.0));
                }
            }
        }
        y
    }

    /// Gradients of `Σ g ⊙ conv(x)` (no ReLU) with respect to `x`, `w` and `b`: the same loops as
    /// [`conv`], scattering instead of gathering. Checked against finite differences in
    /// [`super::check_conv3_backward`], then used where finite differences would be too slow.
    pub fn conv_backward(
        x: &[f64],
        xs: Shape,
        conv: Conv,
        w: &[f64],
        g: &[f64],
    ) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
        let (h, wd, k) = (xs.h, xs.w, conv.k);
        let pad = k / 2;
        let hw = h * wd;
        let mut dx = vec![0.0; x.len()];
        let mut dw = vec![0.0; w.len()];
        let mut db = vec![0.0; conv.c_out];
        for n in 0..xs.n {
            for co in 0..conv.c_out {
                let gp = &g[(n * conv.c_out + co) * hw..][..hw];
                db[co] += gp.iter().sum::<f64>();
                for ci in 0..conv.c_in {
                    let base = (n * xs.c + ci) * hw;
                    for ky in 0..k {
                        for kx in 0..k {
                            let wi = ((co * conv.c_in + ci) * k + ky) * k + kx;
                            let mut acc = 0.0;
                            for oy in pad.saturating_sub(ky)..(h + pad).saturating_sub(ky).min(h) {
                                let iy = oy + ky - pad;
                                for ox in
                                    pad.saturating_sub(kx)..(wd + pad).saturating_sub(kx).min(wd)
                                {
                                    let xi = base + iy * wd + ox + kx - pad;
                                    let gv = gp[oy * wd + ox];
                                    dx[xi] += w[wi] * gv;
                                    acc += x[xi] * gv;
                                }
                            }
                            dw[wi] += acc;
                        }
                    }
                }
            }
        }
        (dx, dw, db)
    }

    pub fn maxpool2(x: &[f64], xs: Shape) -> Vec<f64> {
        let (ho, wo) = (xs.h / 2, xs.w / 2);
        let mut y = vec![0.0; xs.n * xs.c * ho * wo];
        for p in 0..xs.n * xs.c {
            for oy in 0..ho {
                for ox in 0..wo {
                    let at =
                        |dy: usize, dx: usize| x[(p * xs.h + 2 * oy + dy) * xs.w + 2 * ox + dx];
                    y[(p * ho + oy) * wo + ox] = at(0, 0).max(at(0, 1)).max(at(1, 0)).max(at(1, 1));
                }
            }
        }
        y
    }

    pub fn upsample2_concat(low: &[f64], ls: Shape, skip: &[f64], c_skip: usize) -> Vec<f64> {
        let (h2, w2) = (2 * ls.h, 2 * ls.w);
        let c = ls.c + c_skip;
        let mut y = vec![0.0; ls.n * c * h2 * w2];
        for n in 0..ls.n {
            for ch in 0..c {
                for yy in 0..h2 {
                    for xx in 0..w2 {
                        y[((n * c + ch) * h2 + yy) * w2 + xx] = if ch < ls.c {
                            low[((n * ls.c + ch) * ls.h + yy / 2) * ls.w + xx / 2]
                        } else {
                            skip[((n * c_skip + ch - ls.c) * h2 + yy) * w2 + xx]
                        };
                    }
                }
            }
        }
        y
    }

    fn softmax_at(logits: &[f64], ls: Shape, n: usize, px: usize) -> Vec<f64> {
        let hw = ls.h * ls.w;
        let z: Vec<f64> = (0..ls.c)
            .map(|j| logits[(n * ls.c + j) * hw + px])
            .collect();
        let m = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = z.iter().map(|v| (v - m).exp()).collect();
        let s: f64 = e.iter().sum();
        e.iter().map(|v| v / s).collect()
    }

    /// Weighted mean cross-entropy over labelled pixels (PyTorch's `weight=` semantics).
    pub fn cross_entropy(logits: &[f64], ls: Shape, labels: &[u8], cw: Option<&[f32]>) -> f64 {
        let hw = ls.h * ls.w;
        let (mut num, mut den) = (0.0, 0.0);
        for n in 0..ls.n {
            for px in 0..hw {
                let l = labels[n * hw + px];
                if l == IGNORE_LABEL {
                    continue;
                }
                let p = softmax_at(logits, ls, n, px);
                let w = cw.map_or(1.0, |c| c[l as usize] as f64);
                num -= w * p[l as usize].ln();
                den += w;
            }
        }
        if den > 0.0 { num / den } else { 0.0 }
    }

    /// `1 − mean_k (2·Σ p·t + ε) / (Σ p + Σ t + ε)` over labelled pixels of the whole batch.
    pub fn soft_dice(logits: &[f64], ls: Shape, labels: &[u8]) -> f64 {
        let hw = ls.h * ls.w;
        let eps = DICE_EPS as f64;
        let mut acc = vec![[0.0f64; 3]; ls.c];
        for n in 0..ls.n {
            for px in 0..hw {
                let l = labels[n * hw + px];
                if l == IGNORE_LABEL {
                    continue;
                }
                let p = softmax_at(logits, ls, n, px);
                for j in 0..ls.c {
                    let t = if j == l as usize { 1.0 } else { 0.0 };
                    acc[j][0] += p[j] * t;
                    acc[j][1] += p[j];
                    acc[j][2] += t;
                }
            }
        }
        1.0 - acc
            .iter()
            .map(|a| (2.0 * a[0] + eps) / (a[1] + a[2] + eps))
            .sum::<f64>()
            / ls.c as f64
    }

    pub fn channel_affine(x: &[f64], xs: Shape, scale: &[f32], shift: &[f32]) -> Vec<f64> {
        let hw = xs.h * xs.w;
        x.iter()
            .enumerate()
            .map(|(i, v)| {
                let c = (i / hw) % xs.c;
                v * scale[c] as f64 + shift[c] as f64
            })
            .collect()
    }

    /// The U-Net's logits, in f64, from host parameters (same layer order as `microfed_kernels::unet`).
    pub fn unet_logits(p: &Params, x: &[f64], xs: Shape) -> Vec<f64> {
        let t: Vec<Vec<f64>> = p.tensors.iter().map(|t| to64(&t.data)).collect();
        let specs = microfed_kernels::unet::layer_specs(p.classes);
        let lv = |l: usize, c: usize| Shape::new(xs.n, c, xs.h >> l, xs.w >> l);
        let layer = |i: usize, x: &[f64], s: Shape, relu: bool| {
            conv(x, s, specs[i].1, &t[2 * i], &t[2 * i + 1], relu)
        };
        let mut enc = Vec::new();
        let mut cur = x.to_vec();
        let mut cs = xs;
        for l in 0..DEPTH {
            if l > 0 {
                cur = maxpool2(&cur, cs);
                cs = lv(l, CHANNELS[l - 1]);
            }
            let a = layer(2 * l, &cur, cs, true);
            cur = layer(2 * l + 1, &a, cs.with_c(CHANNELS[l]), true);
            cs = cs.with_c(CHANNELS[l]);
            enc.push(cur.clone());
        }
        for j in (0..DEPTH - 1).rev() {
            let cat = upsample2_concat(&cur, lv(j + 1, CHANNELS[j + 1]), &enc[j], CHANNELS[j]);
            let s = lv(j, CHANNELS[j] + CHANNELS[j + 1]);
            let d1 = layer(2 * DEPTH + 2 * j, &cat, s, true);
            cur = layer(2 * DEPTH + 2 * j + 1, &d1, s.with_c(CHANNELS[j]), true);
        }
        layer(2 * DEPTH + 2 * (DEPTH - 1), &cur, lv(0, CHANNELS[0]), false)
    }
}

use reference as r;

// ---- convolution --------------------------------------------------------------------------------

/// Pins the convention: a kernel with a single 1 at (ky, kx) = (0, 0) shifts the image down-right
/// (cross-correlation as in PyTorch, not a flipped convolution), with zeros entering at the border.
pub fn check_conv_convention<B: Backend>(b: &B, tol: f32, seed: u64) -> Result<(), CheckError> {
    let mut cx = Ctx::new(b, tol, seed);
    let xs = Shape::new(1, 1, 3, 4);
    let x = cx.uniform(xs.len(), -1.0, 1.0);
    let conv = Conv::new(1, 1, 3);
    let mut w = vec![0.0; 9];
    w[0] = 1.0;
    let mut y = cx.poisoned(xs.len())?;
    cx.k(b.conv2d_forward(
        &cx.up(&x)?,
        xs,
        conv,
        &cx.up(&w)?,
        &cx.up(&[0.5])?,
        false,
        Precision::Fp32,
        &mut y,
    ))?;
    let want: Vec<f64> = (0..12)
        .map(|i| {
            let (oy, ox) = (i / 4, i % 4);
            0.5 + if oy > 0 && ox > 0 {
                x[(oy - 1) * 4 + ox - 1] as f64
            } else {
                0.0
            }
        })
        .collect();
    cx.compare("shifted image", &cx.down(&y)?, &want)
}

fn conv_forward_case<B: Backend>(
    cx: &mut Ctx<'_, B>,
    xs: Shape,
    conv: Conv,
    relu: bool,
    precision: Precision,
) -> Result<(), CheckError> {
    let x = cx.uniform(xs.len(), -1.0, 1.0);
    let w = cx.uniform(conv.weight_len(), -0.5, 0.5);
    let bias = cx.uniform(conv.c_out, -0.5, 0.5);
    let ys = xs.with_c(conv.c_out);
    let mut y = cx.poisoned(ys.len())?;
    cx.k(cx.b.conv2d_forward(
        &cx.up(&x)?,
        xs,
        conv,
        &cx.up(&w)?,
        &cx.up(&bias)?,
        relu,
        precision,
        &mut y,
    ))?;
    let want = r::conv(&to64(&x), xs, conv, &to64(&w), &to64(&bias), relu);
    cx.compare(
        &format!("conv forward {conv:?} on {xs}, relu {relu}, {precision:?}"),
        &cx.down(&y)?,
        &want,
    )
}

/// 3×3 forward with and without ReLU, odd sizes, in fp32.
pub fn check_conv3_forward<B: Backend>(b: &B, tol: f32, seed: u64) -> Result<(), CheckError> {
    conv3_forward_at(b, Precision::Fp32, tol, seed)
}

/// [`check_conv3_forward`] in TF32 (give it a TF32 tolerance).
pub fn check_conv3_forward_tf32<B: Backend>(b: &B, tol: f32, seed: u64) -> Result<(), CheckError> {
    conv3_forward_at(b, Precision::Tf32, tol, seed)
}

fn conv3_forward_at<B: Backend>(
    b: &B,
    p: Precision,
    tol: f32,
    seed: u64,
) -> Result<(), CheckError> {
    let mut cx = Ctx::new(b, tol, seed);
    {
        conv_forward_case(
            &mut cx,
            Shape::new(2, 3, 7, 9),
            Conv::new(3, 5, 3),
            false,
            p,
        )?;
        conv_forward_case(&mut cx, Shape::new(3, 5, 9, 7), Conv::new(5, 3, 3), true, p)?;
        // Wide enough for the CPU's Winograd path (≥ 8 channels in and out), odd sizes.
        conv_forward_case(
            &mut cx,
            Shape::new(2, 12, 11, 9),
            Conv::new(12, 10, 3),
            true,
            p,
        )?;
        // A deeper reduction (c_in·9 = 306) and 1-pixel-wide planes.
        conv_forward_case(
            &mut cx,
            Shape::new(1, 34, 5, 1),
            Conv::new(34, 7, 3),
            true,
            p,
        )?;
    }
    Ok(())
}

/// 1×1 forward (the head), in fp32.
pub fn check_conv1_forward<B: Backend>(b: &B, tol: f32, seed: u64) -> Result<(), CheckError> {
    conv1_forward_at(b, Precision::Fp32, tol, seed)
}

/// [`check_conv1_forward`] in TF32.
pub fn check_conv1_forward_tf32<B: Backend>(b: &B, tol: f32, seed: u64) -> Result<(), CheckError> {
    conv1_forward_at(b, Precision::Tf32, tol, seed)
}

fn conv1_forward_at<B: Backend>(
    b: &B,
    p: Precision,
    tol: f32,
    seed: u64,
) -> Result<(), CheckError> {
    let mut cx = Ctx::new(b, tol, seed);
    {
        conv_forward_case(
            &mut cx,
            Shape::new(2, 3, 7, 9),
            Conv::new(3, 5, 1),
            false,
            p,
        )?;
        conv_forward_case(
            &mut cx,
            Shape::new(1, 16, 5, 3),
            Conv::new(16, 3, 1),
            true,
            p,
        )?;
    }
    Ok(())
}

/// Backward data, weight and bias of `L = Σ g ⊙ conv(x)` against finite differences.
fn conv_backward_case<B: Backend>(
    cx: &mut Ctx<'_, B>,
    xs: Shape,
    conv: Conv,
    precision: Precision,
) -> Result<(), CheckError> {
    let x = cx.uniform(xs.len(), -1.0, 1.0);
    let w = cx.uniform(conv.weight_len(), -0.5, 0.5);
    let bias = cx.uniform(conv.c_out, -0.5, 0.5);
    let ys = xs.with_c(conv.c_out);
    let g = cx.uniform(ys.len(), -1.0, 1.0);
    let (x64, w64, b64, g64) = (to64(&x), to64(&w), to64(&bias), to64(&g));
    let b = cx.b;

    let mut dx = cx.poisoned(xs.len())?;
    cx.k(b.conv2d_backward_data(&cx.up(&g)?, xs, conv, &cx.up(&w)?, precision, &mut dx))?;
    let mut dw = cx.poisoned(conv.weight_len())?;
    let mut db = cx.poisoned(conv.c_out)?;
    cx.k(b.conv2d_backward_weight(
        &cx.up(&x)?,
        xs,
        conv,
        &cx.up(&g)?,
        precision,
        &mut dw,
        &mut db,
    ))?;

    let h = 1e-3; // L is linear in each of x, w, b: central differences are exact up to rounding.
    let fd_x = finite_diff(&x64, h, |xp| {
        dot(&g64, &r::conv(xp, xs, conv, &w64, &b64, false))
    });
    let fd_w = finite_diff(&w64, h, |wp| {
        dot(&g64, &r::conv(&x64, xs, conv, wp, &b64, false))
    });
    let fd_b = finite_diff(&b64, h, |bp| {
        dot(&g64, &r::conv(&x64, xs, conv, &w64, bp, false))
    });
    let tag = format!("{conv:?} on {xs}, {precision:?}");
    // The reference backward (used by the large case) must agree with the differences too.
    let (rx, rw, rb) = r::conv_backward(&x64, xs, conv, &w64, &g64);
    for (name, a, b) in [("dx", &rx, &fd_x), ("dw", &rw, &fd_w), ("db", &rb, &fd_b)] {
        let a32: Vec<f32> = a.iter().map(|&v| v as f32).collect();
        compare(&format!("reference conv {name} {tag}"), &a32, b, 1e-6).map_err(|e| cx.fail(e))?;
    }
    cx.compare(&format!("conv dx {tag}"), &cx.down(&dx)?, &fd_x)?;
    cx.compare(&format!("conv dw {tag}"), &cx.down(&dw)?, &fd_w)?;
    cx.compare(&format!("conv db {tag}"), &cx.down(&db)?, &fd_b)
}

/// 3×3 backward data, weight and bias against finite differences, in fp32.
pub fn check_conv3_backward<B: Backend>(b: &B, tol: f32, seed: u64) -> Result<(), CheckError> {
    conv3_backward_at(b, Precision::Fp32, tol, seed)
}

/// [`check_conv3_backward`] in TF32.
pub fn check_conv3_backward_tf32<B: Backend>(b: &B, tol: f32, seed: u64) -> Result<(), CheckError> {
    conv3_backward_at(b, Precision::Tf32, tol, seed)
}

fn conv3_backward_at<B: Backend>(
    b: &B,
    p: Precision,
    tol: f32,
    seed: u64,
) -> Result<(), CheckError> {
    let mut cx = Ctx::new(b, tol, seed);
    {
        conv_backward_case(&mut cx, Shape::new(2, 3, 7, 9), Conv::new(3, 5, 3), p)?;
        conv_backward_case(&mut cx, Shape::new(3, 2, 5, 3), Conv::new(2, 4, 3), p)?;
        // More inputs than outputs (the CPU computes dx by another formulation then).
        conv_backward_case(&mut cx, Shape::new(2, 5, 7, 9), Conv::new(5, 3, 3), p)?;
    }
    Ok(())
}

/// 1×1 backward against finite differences, in fp32.
pub fn check_conv1_backward<B: Backend>(b: &B, tol: f32, seed: u64) -> Result<(), CheckError> {
    conv1_backward_at(b, Precision::Fp32, tol, seed)
}

/// [`check_conv1_backward`] in TF32.
pub fn check_conv1_backward_tf32<B: Backend>(b: &B, tol: f32, seed: u64) -> Result<(), CheckError> {
    conv1_backward_at(b, Precision::Tf32, tol, seed)
}

fn conv1_backward_at<B: Backend>(
    b: &B,
    p: Precision,
    tol: f32,
    seed: u64,
) -> Result<(), CheckError> {
    let mut cx = Ctx::new(b, tol, seed);
    {
        conv_backward_case(&mut cx, Shape::new(2, 3, 7, 9), Conv::new(3, 5, 1), p)?;
    }
    Ok(())
}

/// A single image and a batch the thread count does not divide (other parallel paths).
pub fn check_conv_batch_one<B: Backend>(b: &B, tol: f32, seed: u64) -> Result<(), CheckError> {
    let mut cx = Ctx::new(b, tol, seed);
    conv_forward_case(
        &mut cx,
        Shape::new(1, 4, 11, 13),
        Conv::new(4, 6, 3),
        true,
        Precision::Fp32,
    )?;
    conv_backward_case(
        &mut cx,
        Shape::new(1, 3, 6, 5),
        Conv::new(3, 2, 3),
        Precision::Fp32,
    )?;
    conv_backward_case(
        &mut cx,
        Shape::new(5, 2, 4, 3),
        Conv::new(2, 3, 3),
        Precision::Fp32,
    )
}

/// Layers big enough that the CPU cuts each image into several row bands (and a GPU into many
/// blocks): forward against the reference, both backward passes against the reference backward.
pub fn check_conv_large<B: Backend>(b: &B, tol: f32, seed: u64) -> Result<(), CheckError> {
    let mut cx = Ctx::new(b, tol, seed);
    for (xs, conv) in [
        (Shape::new(2, 40, 12, 48), Conv::new(40, 24, 3)),
        (Shape::new(2, 48, 11, 64), Conv::new(48, 7, 3)),
        (Shape::new(2, 24, 16, 64), Conv::new(24, 40, 3)),
        (Shape::new(3, 64, 9, 33), Conv::new(64, 5, 1)),
    ] {
        let x = cx.uniform(xs.len(), -1.0, 1.0);
        let w = cx.uniform(conv.weight_len(), -0.2, 0.2);
        let bias = cx.uniform(conv.c_out, -0.5, 0.5);
        let ys = xs.with_c(conv.c_out);
        let g = cx.uniform(ys.len(), -1.0, 1.0);
        let (x64, w64, g64) = (to64(&x), to64(&w), to64(&g));
        let (xb, wb, gb) = (cx.up(&x)?, cx.up(&w)?, cx.up(&g)?);
        let tag = format!("{conv:?} on {xs}");
        let mut y = cx.poisoned(ys.len())?;
        cx.k(b.conv2d_forward(
            &xb,
            xs,
            conv,
            &wb,
            &cx.up(&bias)?,
            true,
            Precision::Fp32,
            &mut y,
        ))?;
        let want = r::conv(&x64, xs, conv, &w64, &to64(&bias), true);
        cx.compare(&format!("conv forward {tag}"), &cx.down(&y)?, &want)?;
        let (rx, rw, rb) = r::conv_backward(&x64, xs, conv, &w64, &g64);
        let mut dx = cx.poisoned(xs.len())?;
        cx.k(b.conv2d_backward_data(&gb, xs, conv, &wb, Precision::Fp32, &mut dx))?;
        cx.compare(&format!("conv dx {tag}"), &cx.down(&dx)?, &rx)?;
        let mut dw = cx.poisoned(conv.weight_len())?;
        let mut db = cx.poisoned(conv.c_out)?;
        cx.k(b.conv2d_backward_weight(&xb, xs, conv, &gb, Precision::Fp32, &mut dw, &mut db))?;
        cx.compare(&format!("conv dw {tag}"), &cx.down(&dw)?, &rw)?;
        cx.compare(&format!("conv db {tag}"), &cx.down(&db)?, &rb)?;
    }
    Ok(())
}

// ---- elementwise and layout ---------------------------------------------------------------------

/// `relu_backward` against finite differences of `Σ g ⊙ relu(x)` (inputs kept away from the kink).
pub fn check_relu_backward<B: Backend>(b: &B, tol: f32, seed: u64) -> Result<(), CheckError> {
    let mut cx = Ctx::new(b, tol, seed);
    let n = 3 * 7 * 9 + 5;
    let x: Vec<f32> = cx
        .uniform(n, 0.1, 1.0)
        .into_iter()
        .map(|v| if cx.rng.random_bool(0.5) { -v } else { v })
        .collect();
    let y: Vec<f32> = x.iter().map(|v| v.max(0.0)).collect();
    let g = cx.uniform(n, -1.0, 1.0);
    let mut dy = cx.up(&g)?;
    cx.k(b.relu_backward(&cx.up(&y)?, &mut dy))?;
    let g64 = to64(&g);
    let fd = finite_diff(&to64(&x), 1e-3, |xp| {
        xp.iter().zip(&g64).map(|(x, g)| x.max(0.0) * g).sum()
    });
    cx.compare("relu backward", &cx.down(&dy)?, &fd)
}

/// Max-pool forward against the reference; backward against finite differences (continuous random
/// inputs have no ties; `h` is far below their gaps).
pub fn check_maxpool<B: Backend>(b: &B, tol: f32, seed: u64) -> Result<(), CheckError> {
    let mut cx = Ctx::new(b, tol, seed);
    let xs = Shape::new(2, 3, 6, 10);
    let x = cx.uniform(xs.len(), -1.0, 1.0);
    let ys = Shape::new(2, 3, 3, 5);
    let mut y = cx.poisoned(ys.len())?;
    let xb = cx.up(&x)?;
    cx.k(b.maxpool2_forward(&xb, xs, &mut y))?;
    let x64 = to64(&x);
    cx.compare("maxpool forward", &cx.down(&y)?, &r::maxpool2(&x64, xs))?;
    let g = cx.uniform(ys.len(), -1.0, 1.0);
    let mut dx = cx.poisoned(xs.len())?;
    cx.k(b.maxpool2_backward(&xb, xs, &cx.up(&g)?, &mut dx))?;
    let g64 = to64(&g);
    let fd = finite_diff(&x64, 1e-7, |xp| dot(&g64, &r::maxpool2(xp, xs)));
    cx.compare("maxpool backward", &cx.down(&dx)?, &fd)?;
    // Ties: the first maximum in row-major order takes the gradient.
    let tie_shape = Shape::new(1, 1, 2, 2);
    let mut dx = cx.poisoned(4)?;
    cx.k(b.maxpool2_backward(
        &cx.up(&[0.0, 1.0, 1.0, 1.0])?,
        tie_shape,
        &cx.up(&[2.0])?,
        &mut dx,
    ))?;
    cx.compare("maxpool tie", &cx.down(&dx)?, &[0.0, 2.0, 0.0, 0.0])
}

/// Upsample + concat forward against the reference; backward (both halves, and without the skip
/// gradient) against finite differences.
pub fn check_upsample_concat<B: Backend>(b: &B, tol: f32, seed: u64) -> Result<(), CheckError> {
    let mut cx = Ctx::new(b, tol, seed);
    let ls = Shape::new(2, 3, 3, 5);
    let c_skip = 4;
    let ss = Shape::new(2, c_skip, 6, 10);
    let ys = ss.with_c(3 + c_skip);
    let low = cx.uniform(ls.len(), -1.0, 1.0);
    let skip = cx.uniform(ss.len(), -1.0, 1.0);
    let mut y = cx.poisoned(ys.len())?;
    cx.k(b.upsample2_concat_forward(&cx.up(&low)?, ls, &cx.up(&skip)?, c_skip, &mut y))?;
    let (l64, s64) = (to64(&low), to64(&skip));
    cx.compare(
        "upsample+concat forward",
        &cx.down(&y)?,
        &r::upsample2_concat(&l64, ls, &s64, c_skip),
    )?;
    let g = cx.uniform(ys.len(), -1.0, 1.0);
    let g64 = to64(&g);
    let gb = cx.up(&g)?;
    let mut dlow = cx.poisoned(ls.len())?;
    let mut dskip = cx.poisoned(ss.len())?;
    cx.k(b.upsample2_concat_backward(&gb, ls, c_skip, &mut dlow, Some(&mut dskip)))?;
    let fd_low = finite_diff(&l64, 1e-3, |lp| {
        dot(&g64, &r::upsample2_concat(lp, ls, &s64, c_skip))
    });
    let fd_skip = finite_diff(&s64, 1e-3, |sp| {
        dot(&g64, &r::upsample2_concat(&l64, ls, sp, c_skip))
    });
    cx.compare("upsample+concat dlow", &cx.down(&dlow)?, &fd_low)?;
    cx.compare("upsample+concat dskip (split)", &cx.down(&dskip)?, &fd_skip)?;
    let mut dlow = cx.poisoned(ls.len())?;
    cx.k(b.upsample2_concat_backward(&gb, ls, c_skip, &mut dlow, None))?;
    cx.compare("upsample+concat dlow alone", &cx.down(&dlow)?, &fd_low)
}

/// The decoder's fused step, `conv(upsample2_concat(low, skip))` + bias + ReLU, against the
/// reference, keeping the concatenation and not (the CPU backend then reads `low` and `skip` in its
/// Winograd transform and leaves `cat` alone); odd low-resolution sizes and two images.
pub fn check_upsample_concat_conv<B: Backend>(
    b: &B,
    tol: f32,
    seed: u64,
) -> Result<(), CheckError> {
    let mut cx = Ctx::new(b, tol, seed);
    for (n, c_low, c_skip, h, w, c_out) in [(2, 9, 8, 5, 7, 10), (1, 16, 12, 6, 3, 8)] {
        let ls = Shape::new(n, c_low, h, w);
        let cs = Shape::new(n, c_low + c_skip, 2 * h, 2 * w);
        let conv = Conv::new(c_low + c_skip, c_out, 3);
        let low = cx.uniform(ls.len(), -1.0, 1.0);
        let skip = cx.uniform(cs.with_c(c_skip).len(), -1.0, 1.0);
        let wt = cx.uniform(conv.weight_len(), -0.3, 0.3);
        let bias = cx.uniform(c_out, -0.2, 0.2);
        let (l64, s64) = (to64(&low), to64(&skip));
        let cat64 = r::upsample2_concat(&l64, ls, &s64, c_skip);
        let want = r::conv(&cat64, cs, conv, &to64(&wt), &to64(&bias), true);
        let (lb, sb, wb, bb) = (cx.up(&low)?, cx.up(&skip)?, cx.up(&wt)?, cx.up(&bias)?);
        for keep in [true, false] {
            let mut cat = cx.poisoned(cs.len())?;
            let mut y = cx.poisoned(cs.with_c(c_out).len())?;
            cx.k(b.upsample2_concat_conv2d_forward(
                (&lb, ls),
                (&sb, c_skip),
                &mut cat,
                keep,
                (conv, &wb, &bb),
                true,
                Precision::Fp32,
                &mut y,
            ))?;
            cx.compare(
                &format!("upsample+concat+conv {cs} keep {keep}"),
                &cx.down(&y)?,
                &want,
            )?;
            if keep {
                cx.compare("upsample+concat+conv: cat kept", &cx.down(&cat)?, &cat64)?;
            }
        }
    }
    Ok(())
}

// ---- losses -------------------------------------------------------------------------------------

fn cross_entropy_case<B: Backend>(
    cx: &mut Ctx<'_, B>,
    weights: Option<Vec<f32>>,
) -> Result<(), CheckError> {
    let ls = Shape::new(2, 4, 5, 7);
    let logits = cx.uniform(ls.len(), -3.0, 3.0);
    let labels = cx.labels(ls.n * ls.plane(), ls.c, 0.2);
    let mut dl = cx.poisoned(ls.len())?;
    let loss = cx.k(cx.b.softmax_cross_entropy(
        &cx.up(&logits)?,
        ls,
        &cx.k(cx.b.upload_labels(&labels))?,
        weights.as_deref(),
        &mut dl,
    ))?;
    let l64 = to64(&logits);
    let cw = weights.as_deref();
    let want = r::cross_entropy(&l64, ls, &labels, cw);
    cx.compare("cross-entropy value", &[loss], &[want])?;
    let fd = finite_diff(&l64, 1e-5, |lp| r::cross_entropy(lp, ls, &labels, cw));
    cx.compare(
        &format!("cross-entropy gradient (weights {cw:?})"),
        &cx.down(&dl)?,
        &fd,
    )
}

/// Softmax cross-entropy with ignored pixels, value and gradient.
pub fn check_cross_entropy<B: Backend>(b: &B, tol: f32, seed: u64) -> Result<(), CheckError> {
    let mut cx = Ctx::new(b, tol, seed);
    cross_entropy_case(&mut cx, None)?;
    // Every pixel ignored: loss 0 and no gradient (not NaN).
    let ls = Shape::new(1, 3, 2, 3);
    let mut dl = cx.poisoned(ls.len())?;
    let z = cx.uniform(ls.len(), -1.0, 1.0);
    let loss = cx.k(b.softmax_cross_entropy(
        &cx.up(&z)?,
        ls,
        &cx.k(b.upload_labels(&[IGNORE_LABEL; 6]))?,
        None,
        &mut dl,
    ))?;
    cx.compare("all-ignored loss", &[loss], &[0.0])?;
    cx.compare("all-ignored gradient", &cx.down(&dl)?, &[0.0; 18])
}

/// Cross-entropy with class weights (PyTorch's `weight=`: the mean divides by the weight sum).
pub fn check_cross_entropy_weighted<B: Backend>(
    b: &B,
    tol: f32,
    seed: u64,
) -> Result<(), CheckError> {
    let mut cx = Ctx::new(b, tol, seed);
    let w = cx.uniform(4, 0.2, 3.0);
    cross_entropy_case(&mut cx, Some(w))
}

/// Soft Dice: value, and that it *adds* `weight ×` its gradient to what `dlogits` held.
pub fn check_soft_dice<B: Backend>(b: &B, tol: f32, seed: u64) -> Result<(), CheckError> {
    let mut cx = Ctx::new(b, tol, seed);
    let ls = Shape::new(2, 3, 5, 7);
    let logits = cx.uniform(ls.len(), -3.0, 3.0);
    let labels = cx.labels(ls.n * ls.plane(), ls.c, 0.2);
    // Prior contents of the same magnitude as the Dice gradient, so the sum still tests it finely.
    let prior = cx.uniform(ls.len(), -1e-2, 1e-2);
    let weight = 2.5f32;
    let mut dl = cx.up(&prior)?;
    let loss = cx.k(b.soft_dice_acc(
        &cx.up(&logits)?,
        ls,
        &cx.k(b.upload_labels(&labels))?,
        weight,
        &mut dl,
    ))?;
    let l64 = to64(&logits);
    cx.compare(
        "soft Dice value",
        &[loss],
        &[r::soft_dice(&l64, ls, &labels)],
    )?;
    let fd = finite_diff(&l64, 1e-5, |lp| r::soft_dice(lp, ls, &labels));
    let want: Vec<f64> = prior
        .iter()
        .zip(&fd)
        .map(|(&p, g)| p as f64 + weight as f64 * g)
        .collect();
    cx.compare("soft Dice accumulated gradient", &cx.down(&dl)?, &want)
}

// ---- style and vector ops -----------------------------------------------------------------------

pub fn check_channel_affine<B: Backend>(b: &B, tol: f32, seed: u64) -> Result<(), CheckError> {
    let mut cx = Ctx::new(b, tol, seed);
    let xs = Shape::new(3, 5, 7, 9);
    let x = cx.uniform(xs.len(), -2.0, 2.0);
    let scale = cx.uniform(5, -2.0, 2.0);
    let shift = cx.uniform(5, -1.0, 1.0);
    let mut y = cx.poisoned(xs.len())?;
    cx.k(b.channel_affine(&cx.up(&x)?, xs, &scale, &shift, &mut y))?;
    cx.compare(
        "channel affine",
        &cx.down(&y)?,
        &r::channel_affine(&to64(&x), xs, &scale, &shift),
    )
}

/// Mean and population standard deviation per channel, with a large common offset (a one-pass
/// `E[x²] − E[x]²` in f32 would fail it).
pub fn check_channel_stats<B: Backend>(b: &B, tol: f32, seed: u64) -> Result<(), CheckError> {
    let mut cx = Ctx::new(b, tol, seed);
    let xs = Shape::new(3, 5, 17, 9);
    let hw = xs.plane();
    let offsets = cx.uniform(5, -50.0, 50.0);
    let spreads = cx.uniform(5, 0.1, 3.0);
    let x: Vec<f32> = (0..xs.len())
        .map(|i| {
            let c = (i / hw) % xs.c;
            offsets[c] + spreads[c] * cx.rng.random_range(-1.0f32..1.0)
        })
        .collect();
    let (mean, std) = cx.k(b.channel_stats(&cx.up(&x)?, xs))?;
    let mut want_m = [0.0f64; 5];
    let mut want_s = [0.0f64; 5];
    let count = (xs.n * hw) as f64;
    for (i, &v) in x.iter().enumerate() {
        want_m[(i / hw) % xs.c] += v as f64 / count;
    }
    for (i, &v) in x.iter().enumerate() {
        let c = (i / hw) % xs.c;
        want_s[c] += (v as f64 - want_m[c]).powi(2) / count;
    }
    want_s.iter_mut().for_each(|s| *s = s.sqrt());
    // Means are compared relative to their own size; the std to its own (not the offsets').
    for c in 0..5 {
        cx.compare(
            &format!("channel {c} mean"),
            &mean[c..c + 1],
            &want_m[c..c + 1],
        )?;
        cx.compare(
            &format!("channel {c} std"),
            &std[c..c + 1],
            &want_s[c..c + 1],
        )?;
    }
    Ok(())
}

pub fn check_axpy<B: Backend>(b: &B, tol: f32, seed: u64) -> Result<(), CheckError> {
    let mut cx = Ctx::new(b, tol, seed);
    let n = 100_003; // above the CPU's parallel threshold, and odd
    let x = cx.uniform(n, -1.0, 1.0);
    let y0 = cx.uniform(n, -1.0, 1.0);
    let alpha = -0.37f32;
    let mut y = cx.up(&y0)?;
    cx.k(b.axpy(alpha, &cx.up(&x)?, &mut y))?;
    let want: Vec<f64> = x
        .iter()
        .zip(&y0)
        .map(|(&x, &y)| y as f64 + alpha as f64 * x as f64)
        .collect();
    cx.compare("axpy", &cx.down(&y)?, &want)
}

// ---- optimisers ---------------------------------------------------------------------------------

/// Three SGD steps (momentum, weight decay) against `torch.optim.SGD`'s rule in f64:
/// `b = μ·b + (g + λ·p)` (b₁ = g + λ·p), `p −= lr·b`.
pub fn check_sgd<B: Backend>(b: &B, tol: f32, seed: u64) -> Result<(), CheckError> {
    let mut cx = Ctx::new(b, tol, seed);
    let n = 70_001;
    let (lr, momentum, wd) = (0.05f32, 0.9f32, 0.01f32);
    let p0 = cx.uniform(n, -1.0, 1.0);
    let mut p = cx.up(&p0)?;
    let mut state = vec![cx.k(b.zeros(n))?];
    let mut p64 = to64(&p0);
    let mut v64 = vec![0.0f64; n];
    for step in 1..=3 {
        let g = cx.uniform(n, -1.0, 1.0);
        let s = OptimStep::Sgd {
            lr,
            momentum,
            weight_decay: wd,
        };
        cx.k(b.optimizer_step(s, &mut p, &cx.up(&g)?, &mut state))?;
        for i in 0..n {
            let gi = g[i] as f64 + wd as f64 * p64[i];
            v64[i] = if step == 1 {
                gi
            } else {
                momentum as f64 * v64[i] + gi
            };
            p64[i] -= lr as f64 * v64[i];
        }
        cx.compare(
            &format!("SGD parameters after step {step}"),
            &cx.down(&p)?,
            &p64,
        )?;
        cx.compare(
            &format!("SGD velocity after step {step}"),
            &cx.down(&state[0])?,
            &v64,
        )?;
    }
    Ok(())
}

/// Three AdamW steps against `torch.optim.AdamW`'s rule in f64: `p −= lr·λ·p`;
/// `m = β₁m + (1−β₁)g`; `v = β₂v + (1−β₂)g²`; `p −= lr·(m/(1−β₁ᵗ)) / (√(v/(1−β₂ᵗ)) + ε)`.
pub fn check_adamw<B: Backend>(b: &B, tol: f32, seed: u64) -> Result<(), CheckError> {
    let mut cx = Ctx::new(b, tol, seed);
    let n = 70_001;
    let (lr, b1, b2, eps, wd) = (1e-2f32, 0.9f32, 0.999f32, 1e-8f32, 0.05f32);
    let p0 = cx.uniform(n, -1.0, 1.0);
    let mut p = cx.up(&p0)?;
    let mut state = vec![cx.k(b.zeros(n))?, cx.k(b.zeros(n))?];
    let mut p64 = to64(&p0);
    let (mut m64, mut v64) = (vec![0.0f64; n], vec![0.0f64; n]);
    let (b1d, b2d) = (b1 as f64, b2 as f64);
    for step in 1..=3u32 {
        let g = cx.uniform(n, -1.0, 1.0);
        let s = OptimStep::AdamW {
            lr,
            beta1: b1,
            beta2: b2,
            eps,
            weight_decay: wd,
            step,
        };
        cx.k(b.optimizer_step(s, &mut p, &cx.up(&g)?, &mut state))?;
        let t = step as i32;
        for i in 0..n {
            let gi = g[i] as f64;
            p64[i] *= 1.0 - lr as f64 * wd as f64;
            m64[i] = b1d * m64[i] + (1.0 - b1d) * gi;
            v64[i] = b2d * v64[i] + (1.0 - b2d) * gi * gi;
            let mh = m64[i] / (1.0 - b1d.powi(t));
            let vh = v64[i] / (1.0 - b2d.powi(t));
            p64[i] -= lr as f64 * mh / (vh.sqrt() + eps as f64);
        }
        cx.compare(
            &format!("AdamW parameters after step {step}"),
            &cx.down(&p)?,
            &p64,
        )?;
        cx.compare(
            &format!("AdamW m after step {step}"),
            &cx.down(&state[0])?,
            &m64,
        )?;
        cx.compare(
            &format!("AdamW v after step {step}"),
            &cx.down(&state[1])?,
            &v64,
        )?;
    }
    Ok(())
}

/// The optimiser's step contract, the same on every backend: AdamW's `step` counts from 1, and step 0
/// is a [`KernelError::Shape`] that leaves the parameter and its state untouched (never silently
/// taken as step 1); a wrong number of state buffers is refused the same way.
pub fn check_step_zero<B: Backend>(b: &B, tol: f32, seed: u64) -> Result<(), CheckError> {
    let mut cx = Ctx::new(b, tol, seed);
    let n = 1001;
    let p0 = cx.uniform(n, -1.0, 1.0);
    let mut p = cx.up(&p0)?;
    let g = cx.uniform(n, -1.0, 1.0);
    let g = cx.up(&g)?;
    let m0 = cx.uniform(n, -0.1, 0.1);
    let mut state = vec![cx.up(&m0)?, cx.k(b.zeros(n))?];
    let at = |step| OptimStep::AdamW {
        lr: 1e-2,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.01,
        step,
    };
    match b.optimizer_step(at(0), &mut p, &g, &mut state) {
        Err(KernelError::Shape { op, what })
            if op == "optimizer_step" && what.contains("from 1") => {}
        other => {
            return Err(cx.fail(format!(
                "AdamW step 0: expected a shape error, got {other:?}"
            )));
        }
    }
    cx.compare("parameters after a refused step", &cx.down(&p)?, &to64(&p0))?;
    cx.compare(
        "AdamW m after a refused step",
        &cx.down(&state[0])?,
        &to64(&m0),
    )?;
    let sgd = OptimStep::Sgd {
        lr: 0.1,
        momentum: 0.9,
        weight_decay: 0.0,
    };
    match b.optimizer_step(sgd, &mut p, &g, &mut state) {
        Err(KernelError::Shape { .. }) => {}
        other => {
            return Err(cx.fail(format!(
                "SGD with two state buffers: expected a shape error, got {other:?}"
            )));
        }
    }
    // Step 1 is the first step: it runs.
    cx.k(b.optimizer_step(at(1), &mut p, &g, &mut state))
}

/// Bad operands come back as [`KernelError::Shape`] naming the op, never as a panic.
pub fn check_shape_errors<B: Backend>(b: &B, tol: f32, seed: u64) -> Result<(), CheckError> {
    let cx = Ctx::new(b, tol, seed);
    let xs = Shape::new(1, 3, 4, 4);
    let x = cx.up(&[0.0; 48])?;
    let w = cx.up(&[0.0; 5 * 3 * 9])?;
    let bias = cx.up(&[0.0; 5])?;
    let mut short = cx.up(&[0.0; 7])?;
    let expect_shape_err = |r: Result<(), KernelError>, what: &str| match r {
        Err(KernelError::Shape { .. }) => Ok(()),
        other => Err(cx.fail(format!("{what}: expected a shape error, got {other:?}"))),
    };
    expect_shape_err(
        b.conv2d_forward(
            &x,
            xs,
            Conv::new(3, 5, 3),
            &w,
            &bias,
            true,
            Precision::Fp32,
            &mut short,
        ),
        "conv with a short output",
    )?;
    let mut y = cx.up(&[0.0; 80])?;
    expect_shape_err(
        b.conv2d_forward(
            &x,
            xs,
            Conv::new(4, 5, 3),
            &w,
            &bias,
            true,
            Precision::Fp32,
            &mut y,
        ),
        "conv with mismatched channels",
    )?;
    expect_shape_err(
        b.maxpool2_forward(&x, Shape::new(1, 3, 4, 4), &mut short),
        "maxpool with a short output",
    )?;
    expect_shape_err(b.axpy(1.0, &x, &mut short), "axpy of unequal lengths")?;
    let mut dl = cx.up(&[0.0; 48])?;
    let labels = cx.k(b.upload_labels(&[7u8; 16]))?;
    match b.softmax_cross_entropy(&x, xs, &labels, None, &mut dl) {
        Err(KernelError::Shape { .. }) => Ok(()),
        other => Err(cx.fail(format!(
            "labels beyond the class count: expected a shape error, got {other:?}"
        ))),
    }
}

// ---- whole network ------------------------------------------------------------------------------

/// The U-Net's loss and gradients on a tiny input (`1×1×16×16`, 3 classes, class weights, Dice,
/// ignored pixels) against the f64 reference network: the loss, the logits, and central differences
/// for sampled scalars of every parameter tensor (every bias twice).
pub fn check_unet_gradients<B: Backend>(b: Arc<B>, tol: f32, seed: u64) -> Result<(), CheckError> {
    let mut cx = Ctx::new(&*b, tol, seed);
    let classes = 3;
    let xs = Shape::new(1, 1, 16, 16);
    let params = cx.k(Params::init(classes, seed))?;
    let mut net = cx.k(UNet::new(b.clone(), &params))?;
    let x = cx.uniform(xs.len(), -1.0, 1.0);
    let labels = cx.labels(xs.len(), classes, 0.1);
    let loss = Loss {
        class_weights: Some(vec![0.5, 1.0, 2.0]),
        dice_weight: 0.7,
    };
    let xb = cx.up(&x)?;
    let lb = cx.k(b.upload_labels(&labels))?;
    let logits = {
        let l = cx.k(net.forward(&xb, xs))?;
        cx.down(l)?
    };
    let x64 = to64(&x);
    let ls = xs.with_c(classes);
    let ref_loss = |p: &Params| {
        let z = r::unet_logits(p, &x64, xs);
        r::cross_entropy(&z, ls, &labels, loss.class_weights.as_deref())
            + loss.dice_weight as f64 * r::soft_dice(&z, ls, &labels)
    };
    cx.compare("U-Net logits", &logits, &r::unet_logits(&params, &x64, xs))?;
    let stats = cx.k(net.loss_and_gradients(&xb, xs, &lb, &loss))?;
    cx.compare("U-Net loss", &[stats.loss], &[ref_loss(&params)])?;
    let grads = cx.k(net.gradients())?;
    let (mut got, mut want, mut names) = (Vec::new(), Vec::new(), Vec::new());
    let mut p64 = params.clone();
    // Small steps: a bias moves every pixel of its channel, and a step that carries some
    // pre-activation across ReLU's kink spoils the difference. The reference is f64, so the
    // quotient stays accurate at this size (a loss change of ~1e-10 against f64's 1e-16).
    let h = 1e-6f64;
    let f0 = ref_loss(&params);
    // The scale a kink is judged against: the rms of all analytic gradients, a scale like the one
    // `compare` allows errors on (the rms of the sampled ones), so a kink that would spoil the
    // comparison is seen as one. An absolute threshold let kinks through on the small gradients
    // of the first layers' biases.
    let scale = {
        let all: Vec<f64> = grads
            .tensors
            .iter()
            .flat_map(|t| t.data.iter().map(|&g| g as f64))
            .collect();
        rms(&all)
    };
    const KINK_RETRIES: usize = 8;
    for t in 0..params.tensors.len() {
        // Biases are cheap to get wrong in bulk (a missing batch or pixel sum): sample them twice.
        let samples = if params.tensors[t].shape.len() == 1 {
            2
        } else {
            1
        };
        for _ in 0..samples {
            // A coordinate whose ±h step carries some pre-activation across ReLU's kink has no
            // derivative the quotient can find (the one-sided slopes differ): draw another one.
            // Where every draw sits on a kink the last one is compared anyway.
            let mut picked = None;
            for attempt in 0..KINK_RETRIES {
                let i = cx.rng.random_range(0..params.tensors[t].data.len());
                // Params holds f32, so p ± h is rounded to f32; the quotients use the steps taken.
                let base = params.tensors[t].data[i];
                let mut eval = |delta: f64| {
                    p64.tensors[t].data[i] = (base as f64 + delta) as f32;
                    let v = ref_loss(&p64);
                    p64.tensors[t].data[i] = base;
                    v
                };
                let (fp, fm) = (eval(h), eval(-h));
                let up = (base as f64 + h) as f32 as f64 - base as f64;
                let down = base as f64 - (base as f64 - h) as f32 as f64;
                let (fwd, bwd) = ((fp - f0) / up, (f0 - fm) / down);
                let central = (fp - fm) / (up + down);
                let smooth = (fwd - bwd).abs() <= 0.1 * tol as f64 * (central.abs() + scale);
                picked = Some((i, central));
                if smooth || attempt + 1 == KINK_RETRIES {
                    break;
                }
            }
            let (i, central) = picked.expect("at least one draw");
            want.push(central);
            got.push(grads.tensors[t].data[i]);
            names.push(format!("{}[{i}]", params.tensors[t].name));
        }
    }
    compare("U-Net sampled gradients", &got, &want, tol).map_err(|e| {
        let detail: Vec<String> = names
            .iter()
            .zip(got.iter().zip(&want))
            .map(|(n, (g, w))| format!("{n}: {g} vs {w:.6e}"))
            .collect();
        cx.fail(format!("{e}\n{}", detail.join("\n")))
    })
}

/// Decoder-only mode: from the encoder's own features it gives the same decoder gradients as the
/// full backward (and leaves the encoder alone); re-styling on the device equals re-styling the
/// features on the host; a decoder step moves only decoder parameters and adds FedProx's term.
pub fn check_decoder_mode<B: Backend>(b: Arc<B>, tol: f32, seed: u64) -> Result<(), CheckError> {
    let mut cx = Ctx::new(&*b, tol, seed);
    let classes = 2;
    let xs = Shape::new(2, 1, 32, 16);
    let params = cx.k(Params::init(classes, seed))?;
    let mut net = cx.k(UNet::new(b.clone(), &params))?;
    let x = cx.uniform(xs.len(), -1.0, 1.0);
    let labels = cx.labels(xs.len(), classes, 0.05);
    let loss = Loss {
        class_weights: None,
        dice_weight: 0.5,
    };
    let xb = cx.up(&x)?;
    let lb = cx.k(b.upload_labels(&labels))?;
    let full = cx.k(net.loss_and_gradients(&xb, xs, &lb, &loss))?;
    let full_grads = cx.k(net.gradients())?;
    let feats = cx.k(net.encode(&xb, xs))?;
    let dec = cx.k(net.decoder_loss_and_gradients(&feats, xs, &lb, &loss, None))?;
    cx.compare("decoder-mode loss", &[dec.loss], &[full.loss as f64])?;
    let dec_grads = cx.k(net.gradients())?;
    let first = microfed_kernels::unet::FIRST_DECODER_TENSOR;
    let flat = |p: &Params, from: usize| -> Vec<f32> {
        p.tensors[from..]
            .iter()
            .flat_map(|t| t.data.iter().copied())
            .collect()
    };
    cx.compare(
        "decoder-mode gradients vs full backward",
        &flat(&dec_grads, first),
        &to64(&flat(&full_grads, first)),
    )?;

    // Re-styling: device affine inside the step == host affine on the features.
    let shapes = UNet::<B>::feature_shapes(xs);
    let styles: Vec<(Vec<f32>, Vec<f32>)> = shapes
        .iter()
        .map(|s| (cx.uniform(s.c, 0.5, 1.5), cx.uniform(s.c, -0.2, 0.2)))
        .collect();
    let restyled_loss =
        cx.k(net.decoder_loss_and_gradients(&feats, xs, &lb, &loss, Some(&styles)))?;
    let restyled_grads = flat(&cx.k(net.gradients())?, first);
    let host_feats: Vec<B::Buffer> = feats
        .iter()
        .zip(&shapes)
        .zip(&styles)
        .map(|((f, s), (scale, shift))| {
            let v = to64(&cx.down(f)?);
            let y: Vec<f32> = r::channel_affine(&v, *s, scale, shift)
                .iter()
                .map(|&v| v as f32)
                .collect();
            cx.up(&y)
        })
        .collect::<Result<_, _>>()?;
    let host_loss = cx.k(net.decoder_loss_and_gradients(&host_feats, xs, &lb, &loss, None))?;
    cx.compare(
        "re-styled loss",
        &[restyled_loss.loss],
        &[host_loss.loss as f64],
    )?;
    cx.compare_across_kinks(
        "re-styled gradients",
        &restyled_grads,
        &to64(&flat(&cx.k(net.gradients())?, first)),
    )?;

    // A decoder step with plain SGD and FedProx: w' = w − lr·(g + μ·(w − w_global)); encoder fixed.
    let (lr, mu) = (0.1f32, 0.5f32);
    let before = cx.k(net.to_host())?;
    let w0 = before.decoder_flat();
    let global: Vec<f32> = w0.iter().map(|v| v + 0.01).collect();
    cx.k(net.set_global_decoder(Some(&global)))?;
    let optim = Optim {
        kind: OptimKind::Sgd {
            lr,
            momentum: 0.0,
            weight_decay: 0.0,
        },
        prox_mu: mu,
    };
    cx.k(net.decoder_train_step(&feats, xs, &lb, &loss, &optim, None))?;
    let g = flat(&cx.k(net.gradients())?, first);
    let after = cx.k(net.to_host())?;
    // `g` (the gradient buffer after the step) already includes the proximal term.
    let want: Vec<f64> = w0
        .iter()
        .zip(&g)
        .map(|(&w, &g)| w as f64 - lr as f64 * g as f64)
        .collect();
    cx.compare("decoder step", &after.decoder_flat(), &want)?;
    let prox: Vec<f64> = dec_grads.tensors[first..]
        .iter()
        .flat_map(|t| t.data.iter().map(|&v| v as f64))
        .zip(w0.iter().zip(&global))
        .map(|(g, (&w, &wg))| g + mu as f64 * (w as f64 - wg as f64))
        .collect();
    cx.compare("FedProx gradient", &g, &prox)?;
    if after.tensors[..first] != before.tensors[..first] {
        return Err(cx.fail("a decoder step changed the encoder".into()));
    }
    Ok(())
}

/// The inference-only network ([`UNet::for_inference`]) gives the training network's logits and
/// skip features, holds less memory for the same shape, reuses its workspace across calls, and
/// refuses every training call.
pub fn check_inference_only<B: Backend>(b: Arc<B>, tol: f32, seed: u64) -> Result<(), CheckError> {
    let mut cx = Ctx::new(&*b, tol, seed);
    let classes = 3;
    let params = cx.k(Params::init(classes, seed))?;
    let mut train = cx.k(UNet::new(b.clone(), &params))?;
    let mut infer = cx.k(UNet::for_inference(b.clone(), &params))?;
    if !infer.is_inference_only() || train.is_inference_only() {
        return Err(cx.fail("is_inference_only does not say how the network was built".into()));
    }
    for xs in [Shape::new(1, 1, 64, 48), Shape::new(3, 1, 32, 16)] {
        let x = cx.uniform(xs.len(), -2.0, 2.0);
        let xb = cx.up(&x)?;
        let want = {
            let l = cx.k(train.forward(&xb, xs))?;
            cx.down(l)?
        };
        for pass in 0..2 {
            let got = {
                let l = cx.k(infer.forward(&xb, xs))?;
                cx.down(l)?
            };
            cx.compare(
                &format!("inference-only logits {xs} (pass {pass})"),
                &got,
                &to64(&want),
            )?;
        }
        let before = infer.device_bytes();
        cx.k(infer.forward(&xb, xs))?;
        if infer.device_bytes() != before {
            return Err(cx.fail(format!("{xs}: a second forward allocated memory")));
        }
        let feats_train = cx.k(train.encode(&xb, xs))?;
        let feats_infer = cx.k(infer.encode(&xb, xs))?;
        for (l, (a, c)) in feats_train.iter().zip(&feats_infer).enumerate() {
            cx.compare(
                &format!("inference-only enc{l} {xs}"),
                &cx.down(c)?,
                &to64(&cx.down(a)?),
            )?;
        }
        let labels = cx.labels(xs.len(), classes, 0.0);
        let lb = cx.k(b.upload_labels(&labels))?;
        let loss = Loss {
            class_weights: None,
            dice_weight: 0.0,
        };
        if infer.loss_and_gradients(&xb, xs, &lb, &loss).is_ok()
            || infer
                .train_step(&xb, xs, &lb, &loss, &Optim::sgd(0.1, 0.9))
                .is_ok()
            || infer
                .decoder_train_step(&feats_infer, xs, &lb, &loss, &Optim::adamw(1e-3), None)
                .is_ok()
            || infer.gradients().is_ok()
        {
            return Err(cx.fail("an inference-only network accepted a training call".into()));
        }
    }
    let (t, i) = (train.device_bytes(), infer.device_bytes());
    if i * 10 > t * 6 {
        return Err(cx.fail(format!(
            "inference-only network holds {i} bytes, the training network {t}: expected ≤ 60 %"
        )));
    }
    Ok(())
}
