//! Segmentation throughput: tract (ours) against onnxruntime (the peer) in the same run, and the
//! agent's capture → mask latency at steady arrival rates.
//!
//! ```text
//! MICROFED_PYTHON=.venv/bin/python cargo bench -p microfed --bench segment -- [--runs R] [--quick]
//!     [--engine tract|kernels|auto]
//! ```
//! `--engine` picks what runs the network in every section (default tract; `kernels` is our CPU
//! kernels engine on 2 threads, the arrivals table's, in every row whatever its threads column,
//! which is tract's; `tests/peers/cpu_rows.sh` has the per-thread rows): run it once per engine for
//! the per-engine latency table.
//! 1. The reference U-Net on one 512×512 image, 1 and 2 threads: tract vs onnxruntime
//!    (`tests/peers/ort.py bench`), median of R runs after warm-up, GFLOP/s from the U-Net's own count.
//! 2. A 2048×1536 image through the tiling path (512 tiles, 32 overlap; batch 1 and 4), against
//!    onnxruntime on the same image in one piece.
//! 3. The pipeline fed at steady arrival rates (fractions of its measured capacity): p50/p99 latency
//!    from capture to mask written, and whether the queue grows.
//!
//! Results are printed as Markdown rows for docs/benchmarks.md. Without Python and onnxruntime the peer
//! columns say so and the tract numbers are still printed.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use microfed::micrograph::{Micrograph, Normalisation};
use microfed::model::onnx;
use microfed::model::runtime::{EngineKind, Outputs, Segmenter, set_process_engine_kind};
use microfed::pipeline::capture::Capture;
use microfed::pipeline::config::QueueSection;
use microfed::pipeline::{
    FailurePolicy, LogPublisher, ModelInfo, ModelSlot, Pipeline, Settings, tiling,
};
use microfed_kernels::Shape;
use microfed_kernels::cpu::CpuBackend;
use microfed_kernels::unet::{Params, UNet};
use rand::{Rng, SeedableRng};
use tract_linalg::multithread::multithread_tract_scope;

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn python() -> PathBuf {
    std::env::var_os("MICROFED_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python"))
}

/// onnxruntime's median in ms, or why there is none.
fn ort_bench(
    model: &Path,
    n: usize,
    h: usize,
    w: usize,
    threads: usize,
    runs: usize,
) -> Result<f64, String> {
    let peer = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/peers/ort.py");
    let out = Command::new(python())
        .arg(&peer)
        .arg("bench")
        .arg(model)
        .args([n, h, w].map(|v| v.to_string()))
        .args([
            "--threads",
            &threads.to_string(),
            "--runs",
            &runs.to_string(),
        ])
        .output()
        .map_err(|e| format!("cannot run {}: {e}", python().display()))?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr)
            .lines()
            .last()
            .unwrap_or("")
            .to_owned());
    }
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).map_err(|e| format!("peer output: {e}"))?;
    v["median_ms"].as_f64().ok_or_else(|| "no median_ms".into())
}

fn random_image(w: u32, h: u32, seed: u64) -> Micrograph {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let unit: Vec<f32> = (0..w * h).map(|_| rng.random_range(0.0..1.0)).collect();
    Micrograph::from_unit(w, h, &unit, &Normalisation::default()).unwrap()
}

fn time_runs(runs: usize, mut f: impl FnMut()) -> f64 {
    f(); // warm-up (plan optimisation happens on first use)
    median(
        (0..runs)
            .map(|_| {
                let t = Instant::now();
                f();
                t.elapsed().as_secs_f64() * 1e3
            })
            .collect(),
    )
}

fn main() {
    // `cargo bench` passes `--bench`; ignore everything that is not ours.
    let quick = std::env::args().any(|a| a == "--quick");
    let runs: usize = arg("--runs")
        .and_then(|r| r.parse().ok())
        .unwrap_or(if quick { 3 } else { 7 });
    let engine = arg("--engine").map_or(EngineKind::Tract, |e| {
        <EngineKind as clap::ValueEnum>::from_str(&e, true)
            .unwrap_or_else(|_| panic!("--engine {e:?}: auto, tract or kernels"))
    });
    set_process_engine_kind(engine, 2);
    let tmp = tempfile::tempdir().unwrap();
    let params = Params::init(3, 1).unwrap();
    let model_path = tmp.path().join("unet.onnx");
    onnx::save(&onnx::export(&params, &vec![]).unwrap(), &model_path).unwrap();
    let seg = Segmenter::load(&model_path).unwrap();
    let net = UNet::new(Arc::new(CpuBackend::new()), &params).unwrap();
    let gflop = net.forward_flops(Shape::new(1, 1, 512, 512)) as f64 / 1e9;
    let name = seg.engine_name();
    println!(
        "reference U-Net, 3 classes: {gflop:.1} GFLOP per 512×512 image; {runs} runs, median; \
         network: {name} ({})\n",
        seg.engine_reason()
    );

    if std::env::args().any(|a| a == "--profile") {
        profile(&model_path);
        return;
    }
    println!(
        "| case | threads | {name} ms | onnxruntime ms | {name} GFLOP/s | ort / {name} time |"
    );
    println!("|---|---|---|---|---|---|");
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    for (n, threads) in [(1, 1), (1, 2), (2, 2)] {
        let input: Vec<f32> = (0..n * 512 * 512)
            .map(|_| rng.random_range(-2.0..2.0))
            .collect();
        let exec = tiling::executor(threads).unwrap();
        seg.prepare(n, 512, 512, Outputs::Logits).unwrap();
        let tract = time_runs(runs, || {
            multithread_tract_scope(exec.clone(), || seg.logits(&input, n, 512, 512).unwrap());
        });
        let ort = ort_bench(&model_path, n, 512, 512, threads, runs);
        let ort_s = ort
            .as_ref()
            .map_or_else(|e| format!("n/a ({e})"), |m| format!("{m:.0}"));
        let ratio = ort
            .as_ref()
            .map_or("-".into(), |m| format!("{:.2}", m / tract));
        println!(
            "| {n}×512² | {threads} | {tract:.0} | {ort_s} | {:.1} | {ratio} |",
            n as f64 * gflop / (tract / 1e3)
        );
    }

    // The tiling path on a large image.
    let (w, h) = (2048u32, 1536u32);
    let img = random_image(w, h, 3);
    let grid = tiling::TileGrid::new(w as usize, h as usize, 512, 32).unwrap();
    for batch in [1, 4] {
        let exec = tiling::executor(2).unwrap();
        let big_runs = if quick { 1 } else { runs.min(3) };
        let tract = time_runs(big_runs, || {
            tiling::segment_logits(&seg, &img, 512, 32, batch, &exec).unwrap();
        });
        println!(
            "| 2048×1536 tiled ({} tiles of 512, batch {batch}) | 2 | {tract:.0} | | {:.1} | |",
            grid.len(),
            grid.len() as f64 * gflop / (tract / 1e3)
        );
    }
    let ort = ort_bench(&model_path, 1, h as usize, w as usize, 2, runs.min(3));
    println!(
        "| 2048×1536 whole image, onnxruntime | 2 | | {} | | |",
        ort.map_or_else(|e| format!("n/a ({e})"), |m| format!("{m:.0}"))
    );

    // Latency at steady arrival rates, through the whole pipeline (decode → segment → write).
    if std::env::args().any(|a| a == "--no-arrivals") {
        return;
    }
    println!("\ncapture → mask written, 512×512 PNGs, tile 512, 2 threads, {name}:\n");
    println!("| arrivals / s | of capacity | p50 ms | p99 ms | most in pipeline at an arrival |");
    println!("|---|---|---|---|---|");
    let inbox = tmp.path().join("arrivals");
    std::fs::create_dir_all(&inbox).unwrap();
    let count = if quick { 8 } else { 20 };
    let files: Vec<PathBuf> = (0..count)
        .map(|i| {
            let p = inbox.join(format!("a{i:03}.png"));
            let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(i as u64);
            let img = image::GrayImage::from_fn(512, 512, |_, _| image::Luma([r.random::<u8>()]));
            img.save(&p).unwrap();
            p
        })
        .collect();
    // Capacity: the service time of one image through the pipeline, measured back to back.
    let service = run_arrivals(
        &model_path,
        &files[..files.len().min(4)],
        None,
        tmp.path(),
        "cap",
    )
    .0;
    let capacity = 1.0 / service.as_secs_f64();
    for fraction in [0.5, 0.8, 0.95, 1.2] {
        let rate = capacity * fraction;
        let (_, p50, p99, queue) = {
            let (s, p50, p99, q) = run_arrivals(
                &model_path,
                &files,
                Some(Duration::from_secs_f64(1.0 / rate)),
                tmp.path(),
                &format!("r{fraction}"),
            );
            (s, p50, p99, q)
        };
        println!(
            "| {rate:.2} | {:.0}% | {:.0} | {:.0} | {queue} |",
            fraction * 100.0,
            p50.as_secs_f64() * 1e3,
            p99.as_secs_f64() * 1e3
        );
    }
    println!(
        "\ncapacity (back to back): {capacity:.2} images/s ({:.0} ms each)",
        service.as_secs_f64() * 1e3
    );
}

/// Feeds `files` into a fresh pipeline, every `gap` (or all at once), and returns the mean service
/// time (wall time / files), p50, p99 and the largest number in the pipeline seen at an arrival.
fn run_arrivals(
    model: &Path,
    files: &[PathBuf],
    gap: Option<Duration>,
    root: &Path,
    tag: &str,
) -> (Duration, Duration, Duration, u64) {
    let seg = Segmenter::load(model).unwrap();
    let info = ModelInfo::resolve(&Default::default(), &seg).unwrap();
    let out = root.join(format!("out-{tag}"));
    let settings = Settings {
        journal: out.join("journal.jsonl"),
        output: out,
        failures: FailurePolicy::Report,
        info,
        pixel_size_um: None,
        neck_ratio: microfed::features::DEFAULT_NECK_RATIO,
        tile: 512,
        overlap: 32,
        batch: 1,
        threads: 2,
        queues: QueueSection::default(),
    };
    seg.prepare(1, 512, 512, Outputs::Logits).unwrap();
    let pipeline = Pipeline::new(settings, ModelSlot::new(seg)).unwrap();
    let stats = pipeline.stats();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let files = files.to_vec();
    let n = files.len();
    let t0 = Instant::now();
    let max_queue = rt.block_on(async move {
        let (tx, rx) = tokio::sync::mpsc::channel(1024);
        let stats2 = stats.clone();
        let feeder = tokio::spawn(async move {
            let mut max_q = 0;
            let start = tokio::time::Instant::now();
            for (i, f) in files.into_iter().enumerate() {
                if let Some(g) = gap {
                    tokio::time::sleep_until(start + g * i as u32).await;
                }
                stats2
                    .captured
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                max_q = max_q.max(stats2.status().in_pipeline);
                tx.send(Capture::by_name(f)).await.unwrap();
            }
            max_q
        });
        pipeline.run(rx, LogPublisher).await.unwrap();
        let q = feeder.await.unwrap();
        let lat = stats.latencies();
        (q, lat)
    });
    let (q, mut lat) = max_queue;
    lat.sort();
    let p = |x: f64| microfed::pipeline::stats::percentile(&lat, x).unwrap_or_default();
    (t0.elapsed() / n as u32, p(0.5), p(0.99), q)
}

/// Time per operator kind of one 512×512 run through tract's optimised plan (single thread): where
/// the time goes.
fn profile(model: &Path) {
    use std::collections::HashMap;
    use tract_onnx::prelude::*;
    let plan = tract_onnx::onnx()
        .model_for_path(model)
        .unwrap()
        .with_input_fact(0, f32::fact([1, 1, 512, 512]).into())
        .unwrap()
        .into_optimized()
        .unwrap()
        .into_runnable()
        .unwrap();
    let input = Tensor::zero::<f32>(&[1, 1, 512, 512]).unwrap();
    for round in 0..2 {
        let mut state = tract_onnx::tract_core::plan::SimpleState::new(&plan).unwrap();
        let mut times: HashMap<String, (Duration, usize)> = HashMap::new();
        state
            .run_plan_with_eval(
                tvec!(input.clone().into_tvalue()),
                |ctx, op_state, node, inputs| {
                    let t = Instant::now();
                    let r = tract_onnx::tract_core::plan::eval(ctx, op_state, node, inputs);
                    let e = times.entry(node.op().name().to_string()).or_default();
                    e.0 += t.elapsed();
                    e.1 += 1;
                    r
                },
            )
            .unwrap();
        if round == 1 {
            let mut v: Vec<_> = times.into_iter().collect();
            v.sort_by_key(|(_, (d, _))| std::cmp::Reverse(*d));
            for (op, (d, n)) in v {
                println!("{op:>24}: {:8.1} ms over {n} nodes", d.as_secs_f64() * 1e3);
            }
        }
    }
}
