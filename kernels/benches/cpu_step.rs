//! CPU training throughput against the GEMM crate's own rate, in one run:
//! (a) `gemm`'s f32 rate on a square 1024³ product and on each conv layer's forward GEMM shape,
//!     both cores; (b) a decoder-only step and (c) a full training step at batch 4 × 128², in GFLOP/s
//!     (convolution FLOPs only) and as a percentage of (a)'s square rate.
//!
//! `cargo bench -p microfed-kernels --bench cpu_step` (environment: `BENCH_SIZE`, `BENCH_BATCH`).

use gemm::Parallelism;
use microfed_kernels::cpu::CpuBackend;
use microfed_kernels::unet::{Loss, Optim, UNet, layer_specs};
use microfed_kernels::{Backend, Shape};
use rand::{Rng, SeedableRng};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Runs `f` until `budget` has passed (at least `min_reps` times) after one warm-up; returns the
/// fastest repetition, the least disturbed by the other processes sharing the machine.
fn best_time(budget: Duration, min_reps: usize, mut f: impl FnMut()) -> Duration {
    f();
    let start = Instant::now();
    let mut best = Duration::MAX;
    let mut reps = 0;
    while reps < min_reps || start.elapsed() < budget {
        let t = Instant::now();
        f();
        best = best.min(t.elapsed());
        reps += 1;
    }
    best
}

fn gflops(flops: f64, t: Duration) -> f64 {
    flops / t.as_secs_f64() / 1e9
}

/// `c = a·b`, all row-major (`c` with row stride `c_rs`), with the given parallelism.
#[allow(clippy::too_many_arguments)]
fn gemm_f32(
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    b: &[f32],
    c: &mut [f32],
    c_rs: usize,
    par: Parallelism,
) {
    assert!(a.len() >= m * k && b.len() >= k * n && c_rs >= n && c.len() >= (m - 1) * c_rs + n);
    // SAFETY: the assert above keeps every index inside the three slices (row-major with row
    // strides k, n, c_rs); `c` is a unique borrow and does not alias `a` or `b`.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            c_rs as isize,
            false,
            a.as_ptr(),
            1,
            k as isize,
            b.as_ptr(),
            1,
            n as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            par,
        );
    }
}

fn main() {
    let env = |k: &str, d: usize| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let size = env("BENCH_SIZE", 128);
    let batch = env("BENCH_BATCH", 4);
    let threads = rayon::current_num_threads();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
    let mut rand_vec =
        |n: usize| -> Vec<f32> { (0..n).map(|_| rng.random_range(-1.0..1.0)).collect() };

    // (a) The GEMM crate alone.
    let n = 1024;
    let (a, b) = (rand_vec(n * n), rand_vec(n * n));
    let mut c = vec![0.0f32; n * n];
    let t = best_time(Duration::from_secs(3), 3, || {
        gemm_f32(n, n, n, &a, &b, &mut c, n, Parallelism::Rayon(threads))
    });
    let peak = gflops(2.0 * (n * n * n) as f64, t);
    println!("cpu: {threads} threads");
    println!("(a) gemm f32 {n}x{n}x{n}, Rayon({threads}): {peak:.1} GFLOP/s");

    // The forward GEMM of every distinct conv shape, as the backend runs it at this batch: one
    // single-threaded GEMM per image, images spread over the threads; once over the whole plane
    // (the patch matrix streamed from memory) and once in the backend's L2-sized row bands.
    println!(
        "    conv forward GEMMs (m = c_out, n = h·w, k = c_in·k²), batch {batch}, images in parallel:"
    );
    println!(
        "    {:<18} {:>4} {:>6} {:>5} {:>9} {:>14}",
        "layer", "m", "n", "k", "whole", "banded (rows)"
    );
    let xs = Shape::new(batch, 1, size, size);
    let mut seen = std::collections::HashSet::new();
    for (l, (name, conv)) in layer_specs(2).iter().enumerate() {
        let lvl = if l < 10 {
            l / 2
        } else if l < 18 {
            (l - 10) / 2
        } else {
            0
        };
        let (h, wd) = (size >> lvl, size >> lvl);
        let hw = h * wd;
        let (m, nn, k) = (conv.c_out, hw, conv.c_in * conv.k * conv.k);
        if !seen.insert((m, nn, k)) {
            continue;
        }
        // Same band height rule as the backend (128 Ki floats of patch matrix, ≥ 256 pixels).
        let rows = if conv.k == 1 {
            h
        } else {
            ((128 * 1024) / (k * wd))
                .max(256usize.div_ceil(wd))
                .clamp(1, h)
        };
        let w = rand_vec(m * k);
        let cols: Vec<Vec<f32>> = (0..batch).map(|_| rand_vec(k * nn)).collect();
        let mut outs: Vec<Vec<f32>> = (0..batch).map(|_| vec![0.0; m * nn]).collect();
        let flops = 2.0 * (m * nn * k * batch) as f64;
        let whole = best_time(Duration::from_millis(300), 3, || {
            use rayon::prelude::*;
            outs.par_iter_mut()
                .zip(&cols)
                .for_each(|(o, col)| gemm_f32(m, nn, k, &w, col, o, nn, Parallelism::None));
        });
        let banded = best_time(Duration::from_millis(300), 3, || {
            use rayon::prelude::*;
            outs.par_iter_mut().zip(&cols).for_each(|(o, col)| {
                for oy0 in (0..h).step_by(rows) {
                    let band = (rows.min(h - oy0)) * wd;
                    // The band's patch matrix is contiguous in the backend; here a slice of the
                    // same size stands in for it.
                    let c = &col[..k * band];
                    gemm_f32(m, band, k, &w, c, &mut o[oy0 * wd..], nn, Parallelism::None);
                }
            });
        });
        let (rw, rb) = (gflops(flops, whole), gflops(flops, banded));
        println!(
            "    {name:<18} {m:>4} {nn:>6} {k:>5} {rw:>6.1} GF/s {rb:>6.1} GF/s ({rows:>3}) = {:.0}% of square",
            100.0 * rb / peak
        );
    }

    // Each conv layer's three passes through the backend (best of repeated runs).
    let be = Arc::new(CpuBackend::new());
    println!(
        "    backend conv passes per layer, batch {batch} (GFLOP/s: forward, backward-data, backward-weight):"
    );
    for (l, (name, conv)) in layer_specs(2).iter().enumerate() {
        let lvl = if l < 10 {
            l / 2
        } else if l < 18 {
            (l - 10) / 2
        } else {
            0
        };
        let s = Shape::new(batch, conv.c_in, size >> lvl, size >> lvl);
        let ys = s.with_c(conv.c_out);
        let x = be.upload(&rand_vec(s.len())).unwrap();
        let w = be.upload(&rand_vec(conv.weight_len())).unwrap();
        let bias = be.upload(&rand_vec(conv.c_out)).unwrap();
        let mut y = be.zeros(ys.len()).unwrap();
        let mut dx = be.zeros(s.len()).unwrap();
        let (mut dw, mut db) = (
            be.zeros(conv.weight_len()).unwrap(),
            be.zeros(conv.c_out).unwrap(),
        );
        let p = microfed_kernels::Precision::Fp32;
        let budget = Duration::from_millis(200);
        let tf = best_time(budget, 3, || {
            be.conv2d_forward(&x, s, *conv, &w, &bias, true, p, &mut y)
                .unwrap()
        });
        let td = best_time(budget, 3, || {
            be.conv2d_backward_data(&y, s, *conv, &w, p, &mut dx)
                .unwrap()
        });
        let tw = best_time(budget, 3, || {
            be.conv2d_backward_weight(&x, s, *conv, &y, p, &mut dw, &mut db)
                .unwrap()
        });
        let f = conv.forward_flops(s) as f64;
        println!(
            "    {name:<18} {:6.1} {:6.1} {:6.1}",
            gflops(f, tf),
            gflops(f, td),
            gflops(f, tw)
        );
    }

    // (b), (c) Training steps.
    let mut net = UNet::init(be.clone(), 2, 3).unwrap();
    let x = be.upload(&rand_vec(xs.len())).unwrap();
    let labels: Vec<u8> = (0..batch * size * size)
        .map(|i| ((i / 7) % 2) as u8)
        .collect();
    let lb = be.upload_labels(&labels).unwrap();
    let loss = Loss {
        class_weights: None,
        dice_weight: 0.5,
    };
    let optim = Optim::adamw(1e-3);
    let feats = net.encode(&x, xs).unwrap();

    let t = best_time(Duration::from_secs(5), 3, || {
        net.decoder_train_step(&feats, xs, &lb, &loss, &optim, None)
            .unwrap();
    });
    let f = net.decoder_step_flops(xs) as f64;
    let r = gflops(f, t);
    println!(
        "(b) decoder step {xs}: {:.1} ms, {:.2} GFLOP, {r:.1} GFLOP/s = {:.0}% of gemm",
        t.as_secs_f64() * 1e3,
        f / 1e9,
        100.0 * r / peak
    );

    let t = best_time(Duration::from_secs(8), 3, || {
        net.train_step(&x, xs, &lb, &loss, &optim).unwrap();
    });
    let f = net.full_step_flops(xs) as f64;
    let r = gflops(f, t);
    println!(
        "(c) full step    {xs}: {:.1} ms, {:.2} GFLOP, {r:.1} GFLOP/s = {:.0}% of gemm",
        t.as_secs_f64() * 1e3,
        f / 1e9,
        100.0 * r / peak
    );

    let t = best_time(Duration::from_secs(3), 3, || {
        net.forward(&x, xs).unwrap();
    });
    let f = net.forward_flops(xs) as f64;
    let r = gflops(f, t);
    println!(
        "    inference    {xs}: {:.1} ms, {:.2} GFLOP, {r:.1} GFLOP/s = {:.0}% of gemm",
        t.as_secs_f64() * 1e3,
        f / 1e9,
        100.0 * r / peak
    );
}
