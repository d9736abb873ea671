//! The checks the `gpu-check` program runs on a GPU machine, written against the [`Backend`] trait
//! alone so that they compile (and can be exercised) without one.
//!
//! Map of this module:
//! - [`parity_suite`]: every op of a backend under test against a reference backend (the CPU oracle)
//!   on fresh random inputs of odd sizes, outputs poisoned with NaN before each run; relative error
//!   `‖test − ref‖ / ‖ref‖` against 1e-4 (fp32) or 3e-3 (TF32 convolutions).
//! - [`DecoderStep`]: the decoder fine-tune step of the reference U-Net (encoder frozen; for
//!   j = 3..0: upsample + concat, two 3×3 conv + ReLU to 128/64/32/16 channels; 1×1 head to k
//!   classes; cross-entropy; SGD with momentum), driven by trait ops; [`time_decoder_step`] times it.
//! - [`time_conv_layers`]: each convolution pass of the decoder on its own, with achieved TFLOP/s.
//!
//! Timings synchronise the backend and read the host clock around each repetition (median of
//! several, after warm-up); a step is milliseconds long, so the microseconds of the synchronisation
//! do not matter.

use std::time::Instant;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::KernelError;
use crate::backend::{Backend, Conv, IGNORE_LABEL, OptimStep, Precision, Shape};

/// The outcome of one parity comparison.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ParityCase {
    /// The op and operand, e.g. `conv2d_backward_weight dw`.
    pub op: String,
    /// Sizes and options.
    pub detail: String,
    pub rel_err: f64,
    pub tol: f64,
    pub ok: bool,
}

/// `‖got − want‖ / ‖want‖` in f64; infinite when either holds a non-finite value or the lengths
/// differ (so a NaN left by an unwritten output always fails).
pub fn rel_err(got: &[f32], want: &[f32]) -> f64 {
    if got.len() != want.len() {
        return f64::INFINITY;
    }
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (&g, &w) in got.iter().zip(want) {
        if !g.is_finite() || !w.is_finite() {
            return f64::INFINITY;
        }
        num += (g as f64 - w as f64).powi(2);
        den += (w as f64).powi(2);
    }
    if den == 0.0 {
        num.sqrt()
    } else {
        (num / den).sqrt()
    }
}

fn random(rng: &mut ChaCha8Rng, len: usize, lo: f32, hi: f32) -> Vec<f32> {
    (0..len).map(|_| rng.random_range(lo..hi)).collect()
}

/// Buffers of the same data on both backends.
struct Pair<R: Backend, T: Backend> {
    r: R::Buffer,
    t: T::Buffer,
}

struct Suite<'a, R: Backend, T: Backend> {
    reference: &'a R,
    test: &'a T,
    cases: Vec<ParityCase>,
}

impl<'a, R: Backend, T: Backend> Suite<'a, R, T> {
    fn pair(&self, data: &[f32]) -> Result<Pair<R, T>, KernelError> {
        Ok(Pair {
            r: self.reference.upload(data)?,
            t: self.test.upload(data)?,
        })
    }
    /// An output buffer on both sides, filled with NaN so an unwritten element fails the check.
    fn poisoned(&self, len: usize) -> Result<Pair<R, T>, KernelError> {
        let mut p = Pair {
            r: self.reference.zeros(len)?,
            t: self.test.zeros(len)?,
        };
        self.reference.fill(&mut p.r, f32::NAN)?;
        self.test.fill(&mut p.t, f32::NAN)?;
        Ok(p)
    }
    fn compare(
        &mut self,
        op: &str,
        detail: &str,
        p: &Pair<R, T>,
        tol: f64,
    ) -> Result<(), KernelError> {
        let want = self.reference.download(&p.r)?;
        let got = self.test.download(&p.t)?;
        self.record(op, detail, rel_err(&got, &want), tol);
        Ok(())
    }
    fn record(&mut self, op: &str, detail: &str, e: f64, tol: f64) {
        self.cases.push(ParityCase {
            op: op.to_string(),
            detail: detail.to_string(),
            rel_err: e,
            tol,
            ok: e <= tol,
        });
    }
}

/// Tolerances of the parity suite.
pub const FP32_TOL: f64 = 1e-4;
pub const TF32_TOL: f64 = 3e-3;

/// Runs every op on `test` and on `reference` with the same random inputs (from `seed`) and compares.
pub fn parity_suite<R: Backend, T: Backend>(
    reference: &R,
    test: &T,
    seed: u64,
) -> Result<Vec<ParityCase>, KernelError> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut s = Suite {
        reference,
        test,
        cases: Vec::new(),
    };

    // ---- convolutions: odd sizes, every tile height, both kernel sizes, both precisions -------
    let convs = [
        (Shape::new(2, 5, 13, 11), Conv::new(5, 7, 3)),
        (Shape::new(1, 3, 7, 5), Conv::new(3, 19, 3)),
        (Shape::new(2, 48, 17, 9), Conv::new(48, 16, 3)),
        (Shape::new(2, 33, 9, 15), Conv::new(33, 37, 3)),
        (Shape::new(1, 96, 11, 13), Conv::new(96, 64, 3)),
        (Shape::new(2, 70, 6, 10), Conv::new(70, 130, 3)),
        (Shape::new(3, 16, 19, 7), Conv::new(16, 2, 1)),
        (Shape::new(1, 40, 5, 9), Conv::new(40, 72, 1)),
    ];
    for (xs, conv) in convs {
        for precision in [Precision::Fp32, Precision::Tf32] {
            let tol = if precision == Precision::Tf32 {
                TF32_TOL
            } else {
                FP32_TOL
            };
            let ys = xs.with_c(conv.c_out);
            let detail = format!("x {xs} k{} c_out {} {precision:?}", conv.k, conv.c_out);
            let bound = (1.0 / (conv.c_in * conv.k * conv.k) as f32).sqrt();
            let x = s.pair(&random(&mut rng, xs.len(), -1.0, 1.0))?;
            let w = s.pair(&random(&mut rng, conv.weight_len(), -bound, bound))?;
            let b = s.pair(&random(&mut rng, conv.c_out, -0.5, 0.5))?;
            let dy = s.pair(&random(&mut rng, ys.len(), -1.0, 1.0))?;
            for relu in [false, true] {
                let mut y = s.poisoned(ys.len())?;
                reference.conv2d_forward(&x.r, xs, conv, &w.r, &b.r, relu, precision, &mut y.r)?;
                test.conv2d_forward(&x.t, xs, conv, &w.t, &b.t, relu, precision, &mut y.t)?;
                s.compare("conv2d_forward", &format!("{detail} relu {relu}"), &y, tol)?;
            }
            let mut dx = s.poisoned(xs.len())?;
            reference.conv2d_backward_data(&dy.r, xs, conv, &w.r, precision, &mut dx.r)?;
            test.conv2d_backward_data(&dy.t, xs, conv, &w.t, precision, &mut dx.t)?;
            s.compare("conv2d_backward_data", &detail, &dx, tol)?;
            let mut dw = s.poisoned(conv.weight_len())?;
            let mut db = s.poisoned(conv.c_out)?;
            reference
                .conv2d_backward_weight(&x.r, xs, conv, &dy.r, precision, &mut dw.r, &mut db.r)?;
            test.conv2d_backward_weight(&x.t, xs, conv, &dy.t, precision, &mut dw.t, &mut db.t)?;
            s.compare("conv2d_backward_weight dw", &detail, &dw, tol)?;
            s.compare("conv2d_backward_weight db", &detail, &db, FP32_TOL)?;
        }
    }

    // ---- elementwise and layout ---------------------------------------------------------------
    {
        let len = 3 * 7 * 11 * 13;
        let y = s.pair(&random(&mut rng, len, -1.0, 1.0))?;
        let mut dy = s.pair(&random(&mut rng, len, -1.0, 1.0))?;
        reference.relu_backward(&y.r, &mut dy.r)?;
        test.relu_backward(&y.t, &mut dy.t)?;
        s.compare("relu_backward", &format!("len {len}"), &dy, FP32_TOL)?;

        let x = s.pair(&random(&mut rng, len, -1.0, 1.0))?;
        let mut acc = s.pair(&random(&mut rng, len, -1.0, 1.0))?;
        reference.axpy(-0.37, &x.r, &mut acc.r)?;
        test.axpy(-0.37, &x.t, &mut acc.t)?;
        s.compare("axpy", &format!("len {len}"), &acc, FP32_TOL)?;

        let mut c = s.poisoned(len)?;
        reference.copy(&x.r, &mut c.r)?;
        test.copy(&x.t, &mut c.t)?;
        s.compare("copy", &format!("len {len}"), &c, 0.0)?;
        reference.fill(&mut c.r, 2.5)?;
        test.fill(&mut c.t, 2.5)?;
        s.compare("fill", &format!("len {len}"), &c, 0.0)?;
    }
    {
        let xs = Shape::new(2, 3, 10, 14);
        let os = Shape::new(2, 3, 5, 7);
        let x = s.pair(&random(&mut rng, xs.len(), -1.0, 1.0))?;
        let mut y = s.poisoned(os.len())?;
        reference.maxpool2_forward(&x.r, xs, &mut y.r)?;
        test.maxpool2_forward(&x.t, xs, &mut y.t)?;
        s.compare("maxpool2_forward", &format!("x {xs}"), &y, FP32_TOL)?;
        let dy = s.pair(&random(&mut rng, os.len(), -1.0, 1.0))?;
        let mut dx = s.poisoned(xs.len())?;
        reference.maxpool2_backward(&x.r, xs, &dy.r, &mut dx.r)?;
        test.maxpool2_backward(&x.t, xs, &dy.t, &mut dx.t)?;
        s.compare("maxpool2_backward", &format!("x {xs}"), &dx, FP32_TOL)?;
    }
    {
        let ls = Shape::new(2, 5, 7, 9);
        let c_skip = 3;
        let ss = Shape::new(2, c_skip, 14, 18);
        let ys = ss.with_c(ls.c + c_skip);
        let low = s.pair(&random(&mut rng, ls.len(), -1.0, 1.0))?;
        let skip = s.pair(&random(&mut rng, ss.len(), -1.0, 1.0))?;
        let mut y = s.poisoned(ys.len())?;
        reference.upsample2_concat_forward(&low.r, ls, &skip.r, c_skip, &mut y.r)?;
        test.upsample2_concat_forward(&low.t, ls, &skip.t, c_skip, &mut y.t)?;
        s.compare(
            "upsample2_concat_forward",
            &format!("low {ls}"),
            &y,
            FP32_TOL,
        )?;
        let dy = s.pair(&random(&mut rng, ys.len(), -1.0, 1.0))?;
        let mut dlow = s.poisoned(ls.len())?;
        let mut dskip = s.poisoned(ss.len())?;
        reference.upsample2_concat_backward(&dy.r, ls, c_skip, &mut dlow.r, Some(&mut dskip.r))?;
        test.upsample2_concat_backward(&dy.t, ls, c_skip, &mut dlow.t, Some(&mut dskip.t))?;
        s.compare(
            "upsample2_concat_backward dlow",
            &format!("low {ls}"),
            &dlow,
            FP32_TOL,
        )?;
        s.compare(
            "upsample2_concat_backward dskip",
            &format!("low {ls}"),
            &dskip,
            FP32_TOL,
        )?;
        let mut dlow2 = s.poisoned(ls.len())?;
        reference.upsample2_concat_backward(&dy.r, ls, c_skip, &mut dlow2.r, None)?;
        test.upsample2_concat_backward(&dy.t, ls, c_skip, &mut dlow2.t, None)?;
        s.compare(
            "upsample2_concat_backward no dskip",
            &format!("low {ls}"),
            &dlow2,
            FP32_TOL,
        )?;
    }
    {
        let xs = Shape::new(3, 6, 17, 13);
        let x = s.pair(&random(&mut rng, xs.len(), 4.0, 6.0))?;
        let scale = random(&mut rng, xs.c, 0.5, 2.0);
        let shift = random(&mut rng, xs.c, -1.0, 1.0);
        let mut y = s.poisoned(xs.len())?;
        reference.channel_affine(&x.r, xs, &scale, &shift, &mut y.r)?;
        test.channel_affine(&x.t, xs, &scale, &shift, &mut y.t)?;
        s.compare("channel_affine", &format!("x {xs}"), &y, FP32_TOL)?;
        let (mr, sr) = reference.channel_stats(&x.r, xs)?;
        let (mt, st) = test.channel_stats(&x.t, xs)?;
        s.record(
            "channel_stats mean",
            &format!("x {xs} (mean 5)"),
            rel_err(&mt, &mr),
            FP32_TOL,
        );
        s.record(
            "channel_stats std",
            &format!("x {xs} (mean 5)"),
            rel_err(&st, &sr),
            FP32_TOL,
        );
    }

    // ---- losses ---------------------------------------------------------------------------------
    for (ls, weights) in [
        (Shape::new(2, 3, 9, 11), None),
        (Shape::new(3, 2, 13, 7), Some(vec![0.3f32, 1.7])),
        (
            Shape::new(1, 5, 8, 9),
            Some(vec![1.0f32, 0.5, 2.0, 0.1, 1.3]),
        ),
    ] {
        let logits = s.pair(&random(&mut rng, ls.len(), -3.0, 3.0))?;
        let labels: Vec<u8> = (0..ls.n * ls.plane())
            .map(|_| {
                if rng.random_range(0.0..1.0f32) < 0.1 {
                    IGNORE_LABEL
                } else {
                    rng.random_range(0..ls.c as u8)
                }
            })
            .collect();
        let lr = reference.upload_labels(&labels)?;
        let lt = test.upload_labels(&labels)?;
        let detail = format!("logits {ls} weighted {}", weights.is_some());
        let mut d = s.poisoned(ls.len())?;
        let loss_r =
            reference.softmax_cross_entropy(&logits.r, ls, &lr, weights.as_deref(), &mut d.r)?;
        let loss_t =
            test.softmax_cross_entropy(&logits.t, ls, &lt, weights.as_deref(), &mut d.t)?;
        s.record(
            "softmax_cross_entropy loss",
            &detail,
            rel_err(&[loss_t], &[loss_r]),
            FP32_TOL,
        );
        s.compare("softmax_cross_entropy dlogits", &detail, &d, FP32_TOL)?;
        // Dice adds to what is there: start both from the same non-zero gradient.
        let start = random(&mut rng, ls.len(), -0.1, 0.1);
        let mut g = s.pair(&start)?;
        let dice_r = reference.soft_dice_acc(&logits.r, ls, &lr, 0.7, &mut g.r)?;
        let dice_t = test.soft_dice_acc(&logits.t, ls, &lt, 0.7, &mut g.t)?;
        s.record(
            "soft_dice_acc loss",
            &detail,
            rel_err(&[dice_t], &[dice_r]),
            FP32_TOL,
        );
        s.compare("soft_dice_acc dlogits", &detail, &g, FP32_TOL)?;
    }

    // ---- optimisers (three steps each) -----------------------------------------------------------
    let len = 1001;
    for step in [
        OptimStep::Sgd {
            lr: 0.05,
            momentum: 0.9,
            weight_decay: 1e-3,
        },
        OptimStep::AdamW {
            lr: 1e-2,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 1e-2,
            step: 1,
        },
    ] {
        let states = if matches!(step, OptimStep::Sgd { .. }) {
            1
        } else {
            2
        };
        let mut p = s.pair(&random(&mut rng, len, -1.0, 1.0))?;
        let mut st_r = Vec::new();
        let mut st_t = Vec::new();
        for _ in 0..states {
            st_r.push(reference.zeros(len)?);
            st_t.push(test.zeros(len)?);
        }
        for t in 1..=3u32 {
            let g = s.pair(&random(&mut rng, len, -1.0, 1.0))?;
            let step_t = match step {
                OptimStep::AdamW {
                    lr,
                    beta1,
                    beta2,
                    eps,
                    weight_decay,
                    ..
                } => OptimStep::AdamW {
                    lr,
                    beta1,
                    beta2,
                    eps,
                    weight_decay,
                    step: t,
                },
                other => other,
            };
            reference.optimizer_step(step_t, &mut p.r, &g.r, &mut st_r)?;
            test.optimizer_step(step_t, &mut p.t, &g.t, &mut st_t)?;
        }
        let name = if states == 1 { "sgd" } else { "adamw" };
        s.compare(
            &format!("optimizer_step {name} param"),
            "3 steps",
            &p,
            FP32_TOL,
        )?;
        for (i, (a, b)) in st_r.iter().zip(&st_t).enumerate() {
            let e = rel_err(&test.download(b)?, &reference.download(a)?);
            s.record(
                &format!("optimizer_step {name} state[{i}]"),
                "3 steps",
                e,
                FP32_TOL,
            );
        }
    }
    Ok(s.cases)
}

// ---- the decoder fine-tune step --------------------------------------------------------------------

/// Channels of the reference U-Net's stages (encoder 0..3, bottleneck 4).
pub const CHANNELS: [usize; 5] = [16, 32, 64, 128, 256];

/// One convolution layer's parameters and optimiser state.
struct Layer<B: Backend> {
    conv: Conv,
    w: B::Buffer,
    b: B::Buffer,
    dw: B::Buffer,
    db: B::Buffer,
    vw: B::Buffer,
    vb: B::Buffer,
}

impl<B: Backend> Layer<B> {
    fn new(be: &B, conv: Conv, rng: &mut ChaCha8Rng) -> Result<Self, KernelError> {
        let bound = (1.0 / (conv.c_in * conv.k * conv.k) as f32).sqrt();
        Ok(Self {
            conv,
            w: be.upload(&random(rng, conv.weight_len(), -bound, bound))?,
            b: be.upload(&random(rng, conv.c_out, -bound, bound))?,
            dw: be.zeros(conv.weight_len())?,
            db: be.zeros(conv.c_out)?,
            vw: be.zeros(conv.weight_len())?,
            vb: be.zeros(conv.c_out)?,
        })
    }
}

/// Activations of one decoder stage, kept for the backward pass.
struct Stage<B: Backend> {
    /// upsample(low) ++ skip, [n, c_low + c_skip, h, w]
    cat: B::Buffer,
    y1: B::Buffer,
    y2: B::Buffer,
    conv1: Layer<B>,
    conv2: Layer<B>,
    /// Shape of the stage's input `low` (the previous stage's output or the bottleneck).
    low_shape: Shape,
}

/// The decoder of the reference U-Net on frozen encoder features, with everything it needs for a
/// training step preallocated, driven by [`Backend`] ops only.
pub struct DecoderStep<B: Backend> {
    enc: Vec<B::Buffer>,
    enc_shapes: Vec<Shape>,
    stages: Vec<Stage<B>>, // index j = 0..3
    head: Layer<B>,
    logits: B::Buffer,
    dlogits: B::Buffer,
    labels: B::Labels,
    /// Gradient scratch: one buffer per stage for d(y2) and d(y1), one for d(cat).
    g2: Vec<B::Buffer>,
    g1: Vec<B::Buffer>,
    gcat: Vec<B::Buffer>,
    pub classes: usize,
    pub precision: Precision,
}

impl<B: Backend> DecoderStep<B> {
    /// Random encoder features for a batch of `n` images of `size`², random labels in `0..classes`.
    pub fn new(
        be: &B,
        n: usize,
        size: usize,
        classes: usize,
        precision: Precision,
        seed: u64,
    ) -> Result<Self, KernelError> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let enc_shapes: Vec<Shape> = (0..5)
            .map(|i| Shape::new(n, CHANNELS[i], size >> i, size >> i))
            .collect();
        let enc = enc_shapes
            .iter()
            .map(|s| be.upload(&random(&mut rng, s.len(), 0.0, 1.0)))
            .collect::<Result<Vec<_>, _>>()?;
        let mut stages = Vec::new();
        for j in 0..4 {
            let low_shape = enc_shapes[j + 1];
            let c_cat = CHANNELS[j + 1] + CHANNELS[j];
            let out = enc_shapes[j];
            stages.push(Stage {
                cat: be.zeros(out.with_c(c_cat).len())?,
                y1: be.zeros(out.len())?,
                y2: be.zeros(out.len())?,
                conv1: Layer::new(be, Conv::new(c_cat, CHANNELS[j], 3), &mut rng)?,
                conv2: Layer::new(be, Conv::new(CHANNELS[j], CHANNELS[j], 3), &mut rng)?,
                low_shape,
            });
        }
        let head = Layer::new(be, Conv::new(CHANNELS[0], classes, 1), &mut rng)?;
        let ls = enc_shapes[0].with_c(classes);
        let labels: Vec<u8> = (0..n * size * size)
            .map(|_| rng.random_range(0..classes as u8))
            .collect();
        let mut g2 = Vec::new();
        let mut g1 = Vec::new();
        let mut gcat = Vec::new();
        for j in 0..4 {
            g2.push(be.zeros(enc_shapes[j].len())?);
            g1.push(be.zeros(enc_shapes[j].len())?);
            gcat.push(be.zeros(enc_shapes[j].with_c(CHANNELS[j + 1] + CHANNELS[j]).len())?);
        }
        Ok(Self {
            enc,
            enc_shapes,
            stages,
            head,
            logits: be.zeros(ls.len())?,
            dlogits: be.zeros(ls.len())?,
            labels: be.upload_labels(&labels)?,
            g2,
            g1,
            gcat,
            classes,
            precision,
        })
    }

    /// Floating-point operations of one step: every convolution forward, every weight gradient, and
    /// every data gradient except the first convolution of the deepest stage (its input, the
    /// bottleneck features and a skip, is frozen, so nothing needs that gradient).
    pub fn flops(&self) -> u64 {
        let mut total = 0;
        for (j, st) in self.stages.iter().enumerate() {
            let xs = self.enc_shapes[j];
            let f1 = st.conv1.conv.forward_flops(xs.with_c(st.conv1.conv.c_in));
            let f2 = st.conv2.conv.forward_flops(xs);
            total += 2 * f1 + 3 * f2 + if j == 3 { 0 } else { f1 };
        }
        total + 3 * self.head.conv.forward_flops(self.enc_shapes[0])
    }

    /// Forward, loss, backward and an SGD-momentum step. Returns the loss.
    pub fn step(&mut self, be: &B) -> Result<f32, KernelError> {
        let p = self.precision;
        // forward, deepest stage first
        for j in (0..4).rev() {
            let out = self.enc_shapes[j];
            let (lower, upper) = self.stages.split_at_mut(j + 1);
            let st = &mut lower[j];
            let low: &B::Buffer = if j == 3 { &self.enc[4] } else { &upper[0].y2 };
            be.upsample2_concat_forward(low, st.low_shape, &self.enc[j], CHANNELS[j], &mut st.cat)?;
            let c = st.conv1.conv;
            be.conv2d_forward(
                &st.cat,
                out.with_c(c.c_in),
                c,
                &st.conv1.w,
                &st.conv1.b,
                true,
                p,
                &mut st.y1,
            )?;
            let c = st.conv2.conv;
            be.conv2d_forward(
                &st.y1,
                out,
                c,
                &st.conv2.w,
                &st.conv2.b,
                true,
                p,
                &mut st.y2,
            )?;
        }
        let hs = self.enc_shapes[0];
        let hc = self.head.conv;
        be.conv2d_forward(
            &self.stages[0].y2,
            hs,
            hc,
            &self.head.w,
            &self.head.b,
            false,
            p,
            &mut self.logits,
        )?;
        let loss = be.softmax_cross_entropy(
            &self.logits,
            hs.with_c(self.classes),
            &self.labels,
            None,
            &mut self.dlogits,
        )?;
        // backward, stage 0 first
        be.conv2d_backward_weight(
            &self.stages[0].y2,
            hs,
            hc,
            &self.dlogits,
            p,
            &mut self.head.dw,
            &mut self.head.db,
        )?;
        be.conv2d_backward_data(&self.dlogits, hs, hc, &self.head.w, p, &mut self.g2[0])?;
        for j in 0..4 {
            let out = self.enc_shapes[j];
            if j > 0 {
                // d(y2 of stage j) = the upsampled part of stage j-1's d(cat), summed back down
                let below = self.stages[j - 1].low_shape;
                be.upsample2_concat_backward(
                    &self.gcat[j - 1],
                    below,
                    CHANNELS[j - 1],
                    &mut self.g2[j],
                    None,
                )?;
            }
            let st = &mut self.stages[j];
            be.relu_backward(&st.y2, &mut self.g2[j])?;
            let c2 = st.conv2.conv;
            be.conv2d_backward_weight(
                &st.y1,
                out,
                c2,
                &self.g2[j],
                p,
                &mut st.conv2.dw,
                &mut st.conv2.db,
            )?;
            be.conv2d_backward_data(&self.g2[j], out, c2, &st.conv2.w, p, &mut self.g1[j])?;
            be.relu_backward(&st.y1, &mut self.g1[j])?;
            let c1 = st.conv1.conv;
            let cs = out.with_c(c1.c_in);
            be.conv2d_backward_weight(
                &st.cat,
                cs,
                c1,
                &self.g1[j],
                p,
                &mut st.conv1.dw,
                &mut st.conv1.db,
            )?;
            if j < 3 {
                be.conv2d_backward_data(&self.g1[j], cs, c1, &st.conv1.w, p, &mut self.gcat[j])?;
            }
        }
        // SGD with momentum on every decoder parameter
        let sgd = OptimStep::Sgd {
            lr: 1e-3,
            momentum: 0.9,
            weight_decay: 0.0,
        };
        let layers = self
            .stages
            .iter_mut()
            .flat_map(|st| [&mut st.conv1, &mut st.conv2])
            .chain(std::iter::once(&mut self.head));
        for layer in layers {
            be.optimizer_step(
                sgd,
                &mut layer.w,
                &layer.dw,
                std::slice::from_mut(&mut layer.vw),
            )?;
            be.optimizer_step(
                sgd,
                &mut layer.b,
                &layer.db,
                std::slice::from_mut(&mut layer.vb),
            )?;
        }
        Ok(loss)
    }

    /// Every convolution pass of a step as (label, conv, input shape, pass), for per-layer timing.
    fn conv_passes(&self) -> Vec<(String, Conv, Shape)> {
        let mut v = Vec::new();
        for j in (0..4).rev() {
            let out = self.enc_shapes[j];
            let st = &self.stages[j];
            v.push((
                format!("dec{j}.conv1"),
                st.conv1.conv,
                out.with_c(st.conv1.conv.c_in),
            ));
            v.push((format!("dec{j}.conv2"), st.conv2.conv, out));
        }
        v.push(("head".into(), self.head.conv, self.enc_shapes[0]));
        v
    }
}

/// Median of a list of timings (milliseconds).
pub fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Times `reps` decoder steps after `warmup` untimed ones; returns (median ms, last loss).
pub fn time_decoder_step<B: Backend>(
    be: &B,
    step: &mut DecoderStep<B>,
    warmup: usize,
    reps: usize,
) -> Result<(f64, f32), KernelError> {
    let mut loss = 0.0;
    for _ in 0..warmup {
        loss = step.step(be)?;
    }
    be.synchronize()?;
    let mut times = Vec::with_capacity(reps);
    for _ in 0..reps {
        let t0 = Instant::now();
        loss = step.step(be)?;
        be.synchronize()?;
        times.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    Ok((median(times), loss))
}

/// One convolution pass timed on its own.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LayerTiming {
    pub layer: String,
    pub pass: &'static str,
    pub shape: String,
    pub ms: f64,
    pub tflops: f64,
}

/// Times every convolution pass of the decoder step separately (median of `reps`).
pub fn time_conv_layers<B: Backend>(
    be: &B,
    step: &DecoderStep<B>,
    reps: usize,
) -> Result<Vec<LayerTiming>, KernelError> {
    let mut out = Vec::new();
    let p = step.precision;
    for (label, conv, xs) in step.conv_passes() {
        let ys = xs.with_c(conv.c_out);
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let x = be.upload(&random(&mut rng, xs.len(), -1.0, 1.0))?;
        let w = be.upload(&random(&mut rng, conv.weight_len(), -0.1, 0.1))?;
        let b = be.upload(&random(&mut rng, conv.c_out, -0.1, 0.1))?;
        let dy = be.upload(&random(&mut rng, ys.len(), -1.0, 1.0))?;
        let mut y = be.zeros(ys.len())?;
        let mut dx = be.zeros(xs.len())?;
        let mut dw = be.zeros(conv.weight_len())?;
        let mut db = be.zeros(conv.c_out)?;
        let flops = conv.forward_flops(xs) as f64;
        for pass in ["forward", "backward_data", "backward_weight"] {
            let mut times = Vec::new();
            for rep in 0..reps + 2 {
                be.synchronize()?;
                let t0 = Instant::now();
                match pass {
                    "forward" => be.conv2d_forward(&x, xs, conv, &w, &b, true, p, &mut y)?,
                    "backward_data" => be.conv2d_backward_data(&dy, xs, conv, &w, p, &mut dx)?,
                    _ => be.conv2d_backward_weight(&x, xs, conv, &dy, p, &mut dw, &mut db)?,
                }
                be.synchronize()?;
                if rep >= 2 {
                    times.push(t0.elapsed().as_secs_f64() * 1e3);
                }
            }
            let ms = median(times);
            out.push(LayerTiming {
                layer: label.clone(),
                pass,
                shape: format!("x {xs} -> {} ch, k{}", conv.c_out, conv.k),
                ms,
                tflops: flops / (ms * 1e-3) / 1e12,
            });
        }
    }
    Ok(out)
}

// ---- the gpu-check program ---------------------------------------------------------------------

/// Everything `gpu-check` measured, as JSON.
fn report_json(
    gpu: &super::CudaBackend,
    reference_name: &str,
    seed: u64,
    startup_s: f64,
    cases: &[ParityCase],
    bench: &[serde_json::Value],
) -> serde_json::Value {
    serde_json::json!({
        "device": gpu.name(),
        "reference": reference_name,
        "seed": seed,
        "startup_s": startup_s,
        "parity_ok": cases.iter().all(|c| c.ok),
        "parity": cases,
        "decoder_step": bench,
    })
}

/// The body of the `gpu-check` program: opens CUDA device 0, runs [`parity_suite`] against
/// `reference`, then times the decoder step (batch 16 × 256², fp32 and TF32) and each of its
/// convolution passes. Prints markdown tables and the JSON report, and writes the JSON to `out`.
/// Returns the process exit code: 0 when every parity check passed, 1 when one failed, 2 when the
/// GPU could not be used.
pub fn gpu_check_main<R: Backend>(
    reference: R,
    out: Option<std::path::PathBuf>,
) -> std::process::ExitCode {
    let seed = std::env::var("MICROFED_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
        });
    println!("gpu-check: seed {seed} (set MICROFED_SEED to repeat)");
    let write = |v: &serde_json::Value| {
        let text = serde_json::to_string_pretty(v).unwrap_or_default();
        println!("{text}");
        if let Some(path) = &out
            && let Err(e) = std::fs::write(path, &text)
        {
            eprintln!("gpu-check: cannot write {}: {e}", path.display());
        }
    };
    let t0 = Instant::now();
    let gpu = match super::CudaBackend::new(0) {
        Ok(g) => g,
        Err(e) => {
            eprintln!("gpu-check: {e}");
            write(&serde_json::json!({ "error": e.to_string(), "seed": seed }));
            return std::process::ExitCode::from(2);
        }
    };
    let startup_s = t0.elapsed().as_secs_f64();
    println!(
        "device: {} ({} SMs); kernels ready in {startup_s:.1} s (compile or cache)",
        gpu.name(),
        gpu.sm_count()
    );

    // (a) parity
    let cases = match parity_suite(&reference, &gpu, seed) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("gpu-check: parity suite stopped: {e}");
            write(
                &serde_json::json!({ "error": e.to_string(), "seed": seed, "device": gpu.name() }),
            );
            return std::process::ExitCode::from(1);
        }
    };
    println!("\n## Parity: {} vs {}\n", gpu.name(), reference.name());
    println!("| op | detail | rel err | tol | |\n|---|---|---|---|---|");
    for c in &cases {
        println!(
            "| {} | {} | {:.2e} | {:.0e} | {} |",
            c.op,
            c.detail,
            c.rel_err,
            c.tol,
            if c.ok { "ok" } else { "**FAIL**" }
        );
    }
    let failed = cases.iter().filter(|c| !c.ok).count();
    println!("\nparity: {} checks, {failed} failed", cases.len());

    // (b) benchmark
    let mut bench = Vec::new();
    for precision in [Precision::Fp32, Precision::Tf32] {
        let result = (|| -> Result<serde_json::Value, KernelError> {
            let mut step = DecoderStep::new(&gpu, 16, 256, 2, precision, seed)?;
            let (ms, loss) = time_decoder_step(&gpu, &mut step, 3, 20)?;
            let gflop = step.flops() as f64 / 1e9;
            let layers = time_conv_layers(&gpu, &step, 5)?;
            println!(
                "\n## Decoder step, batch 16 × 256², {precision:?}: {ms:.2} ms ({gflop:.0} GFLOP, {:.1} TFLOP/s), loss {loss:.4}\n",
                gflop / ms
            );
            println!("| layer | pass | shape | ms | TFLOP/s |\n|---|---|---|---|---|");
            for l in &layers {
                println!(
                    "| {} | {} | {} | {:.3} | {:.1} |",
                    l.layer, l.pass, l.shape, l.ms, l.tflops
                );
            }
            Ok(serde_json::json!({
                "precision": precision,
                "batch": 16, "size": 256,
                "step_ms": ms,
                "gflop": gflop,
                "tflops": gflop / ms,
                "loss": loss,
                "layers": layers,
            }))
        })();
        match result {
            Ok(v) => bench.push(v),
            Err(e) => {
                eprintln!("gpu-check: benchmark {precision:?} failed: {e}");
                bench.push(serde_json::json!({ "precision": precision, "error": e.to_string() }));
            }
        }
    }
    write(&report_json(
        &gpu,
        &reference.name(),
        seed,
        startup_s,
        &cases,
        &bench,
    ));
    if failed == 0 {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::from(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rel_err_is_zero_for_equal_and_infinite_for_nan() {
        assert_eq!(rel_err(&[1.0, 2.0], &[1.0, 2.0]), 0.0);
        assert!(rel_err(&[f32::NAN, 2.0], &[1.0, 2.0]).is_infinite());
        assert!(rel_err(&[1.0], &[1.0, 2.0]).is_infinite());
        let e = rel_err(&[3.0, 4.0], &[3.0, 4.5]);
        assert!((e - 0.5 / (9.0f64 + 20.25).sqrt()).abs() < 1e-12);
    }

    #[test]
    fn median_takes_the_middle() {
        assert_eq!(median(vec![5.0, 1.0, 3.0]), 3.0);
    }
}
