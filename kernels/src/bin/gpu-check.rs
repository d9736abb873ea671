//! `gpu-check`: the CUDA benchmark, run on a machine with an NVIDIA GPU. It times the step that
//! federated rounds run, [`UNet::decoder_train_step`] (encoder frozen; batch 16 × 256², 2 classes,
//! cross-entropy, SGD with momentum 0.9; the features are the encoder's own on a random batch), in
//! fp32 and TF32, then each convolution pass of the decoder on its own. Prints markdown tables and a
//! JSON report, also written to `--out PATH` (default `$OUT/gpu-check.json` when `OUT` is set).
//! Exit code 0: measured; 1: a benchmark failed; 2: no usable GPU.
//!
//! Correctness is the test suite's job (`tests/suite/`, whose `cuda::` tests hold every op and the
//! whole network to the CPU oracle); `kernels/gpu-check.sh run` runs that suite first, then this.
//! Timings synchronise the device and read the host clock around each repetition (median after
//! warm-up); a step is milliseconds long, so the microseconds of the synchronisation do not matter.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use microfed_kernels::cuda::CudaBackend;
use microfed_kernels::unet::{Loss, Optim, UNet};
use microfed_kernels::{Backend, Conv, KernelError, Precision, Shape};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// The benchmark's batch: 16 images of 256², two classes (as the PyTorch peer, `torch_unet.py`).
const BATCH: usize = 16;
const SIZE: usize = 256;
const CLASSES: usize = 2;

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let mut out = std::env::var_os("OUT").map(|d| PathBuf::from(d).join("gpu-check.json"));
    while let Some(a) = args.next() {
        match a.as_str() {
            "--out" => out = args.next().map(PathBuf::from),
            "-h" | "--help" => {
                println!("usage: gpu-check [--out PATH]   (MICROFED_SEED=N to repeat a run)");
                return ExitCode::SUCCESS;
            }
            other => {
                eprintln!("gpu-check: unknown argument {other:?} (try --help)");
                return ExitCode::from(2);
            }
        }
    }
    run(out)
}

/// Opens CUDA device 0, times the decoder step in both precisions, prints and writes the report.
fn run(out: Option<PathBuf>) -> ExitCode {
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
    let gpu = match CudaBackend::new(0) {
        Ok(g) => Arc::new(g),
        Err(e) => {
            eprintln!("gpu-check: {e}");
            write(&serde_json::json!({ "error": e.to_string(), "seed": seed }));
            return ExitCode::from(2);
        }
    };
    let startup_s = t0.elapsed().as_secs_f64();
    println!(
        "device: {} ({} SMs); kernels ready in {startup_s:.1} s (compile or cache)",
        gpu.name(),
        gpu.sm_count()
    );

    let mut bench = Vec::new();
    let mut failed = false;
    for precision in [Precision::Fp32, Precision::Tf32] {
        match decoder_step(&gpu, precision, seed) {
            Ok(v) => bench.push(v),
            Err(e) => {
                eprintln!("gpu-check: benchmark {precision:?} failed: {e}");
                failed = true;
                bench.push(serde_json::json!({ "precision": precision, "error": e.to_string() }));
            }
        }
    }
    write(&serde_json::json!({
        "device": gpu.name(),
        "seed": seed,
        "startup_s": startup_s,
        "decoder_step": bench,
    }));
    if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

/// Times `UNet::decoder_train_step` (3 warm-up steps, median of 20) and each decoder convolution
/// pass; prints the tables and returns the JSON entry.
fn decoder_step(
    gpu: &Arc<CudaBackend>,
    precision: Precision,
    seed: u64,
) -> Result<serde_json::Value, KernelError> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let xs = Shape::new(BATCH, 1, SIZE, SIZE);
    let mut net = UNet::init(gpu.clone(), CLASSES, seed)?;
    net.set_precision(precision);
    let x = gpu.upload(&random(&mut rng, xs.len(), -1.0, 1.0))?;
    let labels: Vec<u8> = (0..xs.len())
        .map(|_| rng.random_range(0..CLASSES as u8))
        .collect();
    let labels = gpu.upload_labels(&labels)?;
    let features = net.encode(&x, xs)?;
    let loss = Loss {
        class_weights: None,
        dice_weight: 0.0,
    };
    let optim = Optim::sgd(1e-3, 0.9);
    let mut step = || {
        net.decoder_train_step(&features, xs, &labels, &loss, &optim, None)
            .map(|s| s.loss)
    };
    let mut last = 0.0;
    for _ in 0..3 {
        last = step()?;
    }
    gpu.synchronize()?;
    let mut times = Vec::with_capacity(20);
    for _ in 0..20 {
        let t0 = Instant::now();
        last = step()?;
        gpu.synchronize()?;
        times.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    let ms = median(times);
    let gflop = net.decoder_step_flops(xs) as f64 / 1e9;
    let decoder: Vec<(String, Conv, Shape)> = net
        .conv_layers(xs)
        .into_iter()
        .filter(|(name, _, _)| name.starts_with("decoder."))
        .collect();
    let layers = time_conv_layers(&**gpu, &decoder, precision, 5)?;
    println!(
        "\n## Decoder step (UNet::decoder_train_step), batch {BATCH} × {SIZE}², {precision:?}: \
         {ms:.2} ms ({gflop:.0} GFLOP, {:.1} TFLOP/s), loss {last:.4}\n",
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
        "step": "UNet::decoder_train_step",
        "precision": precision,
        "batch": BATCH, "size": SIZE, "classes": CLASSES,
        "step_ms": ms,
        "gflop": gflop,
        "tflops": gflop / ms,
        "loss": last,
        "layers": layers,
    }))
}

fn random(rng: &mut ChaCha8Rng, len: usize, lo: f32, hi: f32) -> Vec<f32> {
    (0..len).map(|_| rng.random_range(lo..hi)).collect()
}

/// Median of a list of timings (milliseconds).
fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// One convolution pass timed on its own.
#[derive(Debug, Clone, serde::Serialize)]
struct LayerTiming {
    layer: String,
    pass: &'static str,
    shape: String,
    ms: f64,
    tflops: f64,
}

/// Times the forward, backward-data and backward-weight pass of each `(name, conv, input shape)` on
/// random data (median of `reps` after two untimed runs).
fn time_conv_layers<B: Backend>(
    be: &B,
    layers: &[(String, Conv, Shape)],
    p: Precision,
    reps: usize,
) -> Result<Vec<LayerTiming>, KernelError> {
    let mut out = Vec::new();
    for (label, conv, xs) in layers {
        let (conv, xs) = (*conv, *xs);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_takes_the_middle() {
        assert_eq!(median(vec![5.0, 1.0, 3.0]), 3.0);
    }

    /// The benchmark's layer list is the decoder of the real network: eight 3×3 convolutions and the
    /// 1×1 head, at the resolutions the step runs them.
    #[test]
    fn the_timed_layers_are_the_decoders() {
        let cpu = Arc::new(microfed_kernels::cpu::CpuBackend::new());
        let net = UNet::init(cpu, CLASSES, 1).unwrap();
        let xs = Shape::new(BATCH, 1, SIZE, SIZE);
        let decoder: Vec<_> = net
            .conv_layers(xs)
            .into_iter()
            .filter(|(name, _, _)| name.starts_with("decoder."))
            .collect();
        assert_eq!(decoder.len(), 9);
        let (name, conv, input) = &decoder[6];
        assert_eq!(name, "decoder.3.conv1");
        assert_eq!(*conv, Conv::new(384, 128, 3));
        assert_eq!(*input, Shape::new(BATCH, 384, 32, 32));
        let (name, conv, input) = &decoder[8];
        assert_eq!(name, "decoder.head");
        assert_eq!(*conv, Conv::new(16, CLASSES, 1));
        assert_eq!(*input, Shape::new(BATCH, 16, SIZE, SIZE));
        // The step's FLOPs are the sum of those layers' passes (stage 3 skips backward-data).
        let passes: u64 = decoder
            .iter()
            .map(|(name, conv, input)| {
                let f = conv.forward_flops(*input);
                if name == "decoder.3.conv1" {
                    2 * f
                } else {
                    3 * f
                }
            })
            .sum();
        assert_eq!(passes, net.decoder_step_flops(xs));
    }
}
