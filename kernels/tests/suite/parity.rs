//! The backend under test against the CPU oracle, op by op, on the same random inputs: odd sizes,
//! every convolution tile height the CUDA kernels pick (`c_out` 7 to 130, 1×1 and 3×3), outputs
//! poisoned with NaN before each run; relative error `‖test − ref‖ / ‖ref‖` against 1e-4 (fp32) or
//! 3e-3 (TF32 convolutions). On the CPU it compares the oracle with itself, which still catches an
//! unwritten (NaN) output or a non-deterministic op; on CUDA it is the parity check `gpu-check` used
//! to run.
//!
//! Map of this module: [`parity_suite`] (any two backends) and [`rel_err`].

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use microfed_kernels::cpu::CpuBackend;
use microfed_kernels::{Backend, Conv, IGNORE_LABEL, KernelError, OptimStep, Precision, Shape};

/// The outcome of one parity comparison.
#[derive(Debug, Clone)]
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
            let step_t = step.at_step(t);
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

/// Every op of `b` against the CPU oracle on inputs drawn from `seed`; the table of cases is printed
/// (see it with `--nocapture`), and the error lists each case out of tolerance.
pub fn matches_the_cpu_oracle<B: Backend>(b: &B, seed: u64) -> Result<(), String> {
    let cpu = CpuBackend::new();
    let cases = parity_suite(&cpu, b, seed).map_err(|e| format!("seed {seed}: {e}"))?;
    println!("\n## Parity: {} vs {}, seed {seed}\n", b.name(), cpu.name());
    println!("| op | detail | rel err | tol | |\n|---|---|---|---|---|");
    for c in &cases {
        let verdict = if c.ok { "ok" } else { "**FAIL**" };
        println!(
            "| {} | {} | {:.2e} | {:.0e} | {verdict} |",
            c.op, c.detail, c.rel_err, c.tol
        );
    }
    let failed: Vec<String> = cases
        .iter()
        .filter(|c| !c.ok)
        .map(|c| format!("{} [{}]: {:.2e} > {:.0e}", c.op, c.detail, c.rel_err, c.tol))
        .collect();
    println!("\nparity: {} checks, {} failed", cases.len(), failed.len());
    if failed.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "seed {seed}: {} of {} parity checks failed:\n{}",
            failed.len(),
            cases.len(),
            failed.join("\n")
        ))
    }
}

#[test]
fn rel_err_is_zero_for_equal_and_infinite_for_nan() {
    assert_eq!(rel_err(&[1.0, 2.0], &[1.0, 2.0]), 0.0);
    assert!(rel_err(&[f32::NAN, 2.0], &[1.0, 2.0]).is_infinite());
    assert!(rel_err(&[1.0], &[1.0, 2.0]).is_infinite());
    let e = rel_err(&[3.0, 4.0], &[3.0, 4.5]);
    assert!((e - 0.5 / (9.0f64 + 20.25).sqrt()).abs() < 1e-12);
}

/// Batch 1 on several threads runs each convolution's row bands in parallel; on one thread the bands
/// run in order. The whole U-Net must give the same logits both ways (within 1e-5 of the largest:
/// the GEMM may block a narrower band differently), on planes whose band count does not divide evenly, and for a batch of
/// three on two threads (not a multiple: bands again) and on three (whole images per thread).
#[test]
fn cpu_band_parallel_forward_matches_one_thread() {
    use microfed_kernels::unet::{Params, UNet};
    use std::sync::Arc;
    let params = Params::init(2, 11).unwrap();
    let logits = |threads: usize, xs: Shape| -> Vec<f32> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            let cpu = Arc::new(CpuBackend::new());
            assert_eq!(cpu.threads(), threads);
            let mut net = UNet::for_inference(cpu.clone(), &params).unwrap();
            let x: Vec<f32> = (0..xs.len())
                .map(|i| ((i * 7919) % 1000) as f32 / 250.0 - 2.0)
                .collect();
            let xb = cpu.upload(&x).unwrap();
            cpu.download(net.forward(&xb, xs).unwrap()).unwrap()
        })
    };
    for xs in [Shape::new(1, 1, 80, 48), Shape::new(3, 1, 48, 32)] {
        let one = logits(1, xs);
        for threads in [2, 3] {
            let got = logits(threads, xs);
            let scale = one.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let worst = got
                .iter()
                .zip(&one)
                .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(
                got.len() == one.len() && worst <= 1e-5 * scale,
                "{xs} on {threads} threads: max |diff| {worst} (largest logit {scale})"
            );
        }
    }
}
