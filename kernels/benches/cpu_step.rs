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

/// `c = a·b`, all row-major, with the given parallelism.
fn gemm_f32(m: usize, n: usize, k: usize, a: &[f32], b: &[f32], c: &mut [f32], par: Parallelism) {
    assert!(a.len() >= m * k && b.len() >= k * n && c.len() >= m * n);
    // SAFETY: the assert above keeps every index inside the three slices (dense row-major with
    // row strides k, n, n); `c` is a unique borrow and does not alias `a` or `b`.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n as isize,
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
    let env = |k: &str, d: usize| std::env::var(k).ok().and_then(|v| v.parse().ok()).unwrap_or(d);
    let size = env("BENCH_SIZE", 128);
    let batch = env("BENCH_BATCH", 4);
    let threads = rayon::current_num_threads();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
    let mut rand_vec = |n: usize| -> Vec<f32> { (0..n).map(|_| rng.random_range(-1.0..1.0)).collect() };

    // (a) The GEMM crate alone.
    let n = 1024;
    let (a, b) = (rand_vec(n * n), rand_vec(n * n));
    let mut c = vec![0.0f32; n * n];
    let t = best_time(Duration::from_secs(3), 3, || {
        gemm_f32(n, n, n, &a, &b, &mut c, Parallelism::Rayon(threads))
    });
    let peak = gflops(2.0 * (n * n * n) as f64, t);
    println!("cpu: {threads} threads");
    println!("(a) gemm f32 {n}x{n}x{n}, Rayon({threads}): {peak:.1} GFLOP/s");

    // The forward GEMM of every distinct conv shape, as the backend runs it at this batch: one
    // single-threaded GEMM per image, images spread over the threads.
    println!("    conv forward GEMM shapes (m = c_out, n = h·w, k = c_in·k²), batch {batch}, images in parallel:");
    let xs = Shape::new(batch, 1, size, size);
    let mut seen = std::collections::HashSet::new();
    for (l, (name, conv)) in layer_specs(2).iter().enumerate() {
        let lvl = if l < 10 { l / 2 } else if l < 18 { (l - 10) / 2 } else { 0 };
        let hw = (size >> lvl) * (size >> lvl);
        let (m, nn, k) = (conv.c_out, hw, conv.c_in * conv.k * conv.k);
        if !seen.insert((m, nn, k)) {
            continue;
        }
        let w = rand_vec(m * k);
        let cols: Vec<Vec<f32>> = (0..batch).map(|_| rand_vec(k * nn)).collect();
        let mut outs: Vec<Vec<f32>> = (0..batch).map(|_| vec![0.0; m * nn]).collect();
        let t = best_time(Duration::from_millis(300), 3, || {
            use rayon::prelude::*;
            outs.par_iter_mut()
                .zip(&cols)
                .for_each(|(o, col)| gemm_f32(m, nn, k, &w, col, o, Parallelism::None));
        });
        let r = gflops(2.0 * (m * nn * k * batch) as f64, t);
        println!("    {name:<18} m {m:>4} n {nn:>6} k {k:>5}: {r:6.1} GFLOP/s ({:.0}% of square)", 100.0 * r / peak);
    }

    // (b), (c) Training steps.
    let be = Arc::new(CpuBackend::new());
    let mut net = UNet::init(be.clone(), 2, 3).unwrap();
    let x = be.upload(&rand_vec(xs.len())).unwrap();
    let labels: Vec<u8> = (0..batch * size * size).map(|i| ((i / 7) % 2) as u8).collect();
    let lb = be.upload_labels(&labels).unwrap();
    let loss = Loss { class_weights: None, dice_weight: 0.5 };
    let optim = Optim::adamw(1e-3);
    let feats = net.encode(&x, xs).unwrap();

    let t = best_time(Duration::from_secs(5), 3, || {
        net.decoder_train_step(&feats, xs, &lb, &loss, &optim, None).unwrap();
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
