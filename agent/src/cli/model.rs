//! `microfed model check FILE.onnx`: does an ONNX file meet the microfed U-Net contract?
//!
//! Prints what it found (classes, parameter counts, opset) or every mismatch at once, so that a user who
//! exports a U-Net from PyTorch can fix all of them in one go (see `models/README.md`). With
//! `--run`, it also runs the model once through tract on a blank 64×64 image, which catches graphs that
//! parse but cannot execute.
//!
//! `microfed model bench FILE`: inference time per batch on this machine, on the CPU or the GPU
//! (tract-cuda), with the GPU's logits checked against the CPU's on the same input.

use std::path::PathBuf;

use anyhow::Context;

use crate::dataset::Dataset;
use crate::metrics::Evaluator;
use crate::model::manifest::ModelFiles;
use crate::model::{onnx, runtime::Segmenter};

/// Inspect segmentation models.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    pub command: ModelCommand,
}

#[derive(Debug, clap::Subcommand)]
pub enum ModelCommand {
    /// Check an ONNX file against the contract: input `image` [N,1,H,W], output `logits` [N,K,H,W], skip
    /// features `enc0`…`enc4`, decoder weights `decoder.*` with the reference shapes.
    #[command(after_help = "Example:\n  microfed model check models/grains/model.onnx --run")]
    Check(CheckArgs),
    /// Score a model on labelled datasets through the runtime the agent uses (tract): per-class IoU
    /// and Dice, mean IoU, pixel accuracy and boundary F1, per dataset and over all of them.
    #[command(
        after_help = "Example:\n  microfed model score models/grains --data data/test/hazy data/test/sem-se --json grains.json"
    )]
    Score(ScoreArgs),
    /// Time inference (logits of a batch) through tract on the CPU or the GPU: median and p90 over
    /// repeated runs after a warm-up, per input shape; with a GPU, the logits are also compared with
    /// the CPU's on the first shape.
    #[command(
        after_help = "Example:\n  microfed model bench models/grains/model.onnx --device cuda --shape 1x512x512 --shape 1x2048x2048 --json bench.json"
    )]
    Bench(BenchArgs),
}

#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// The model folder or ONNX file.
    pub file: PathBuf,
    /// Where the network runs.
    #[arg(long, value_enum, default_value_t = crate::model::runtime::InferenceDevice::Auto)]
    pub device: crate::model::runtime::InferenceDevice,
    /// What runs the network: auto (our kernels when the parity probe passes, on the CPU), tract,
    /// kernels.
    #[arg(long, value_enum, default_value_t = crate::model::runtime::EngineKind::Auto)]
    pub engine: crate::model::runtime::EngineKind,
    /// The kernels engine's arithmetic on the GPU: fp32, or tf32 (tensor cores, sm_80 and newer).
    #[arg(long, value_enum, default_value_t = crate::model::runtime::Precision::Fp32)]
    pub precision: crate::model::runtime::Precision,
    /// Input shapes as NxHxW (batch, height, width; H and W multiples of 16). Repeatable.
    #[arg(long = "shape", value_name = "NxHxW", default_values_t = vec!["1x512x512".to_string()])]
    pub shapes: Vec<String>,
    /// Timed runs per shape (after the warm-up).
    #[arg(long, default_value_t = 20)]
    pub runs: usize,
    /// Untimed runs first (plan building, GPU kernel compilation, caches).
    #[arg(long, default_value_t = 3)]
    pub warmup: usize,
    /// CPU threads for tract's matrix products (0 = every core).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Skip the CPU comparison of the GPU's logits.
    #[arg(long)]
    pub no_check: bool,
    /// Segment each shape's H×W image as the agent does: cut into tiles of this side (a multiple
    /// of 16) overlapping by `--overlap`, `--tile-batch` tiles per network run, stitched back;
    /// the time is the whole image's. N is the number of such images run one after the other.
    #[arg(long, value_name = "PX")]
    pub tile: Option<usize>,
    /// Overlap between neighbouring tiles (with `--tile`; the agent's default).
    #[arg(long, default_value_t = 32)]
    pub overlap: usize,
    /// Tiles per network run (with `--tile`; the agent's `[model] batch`).
    #[arg(long, default_value_t = 1)]
    pub tile_batch: usize,
    /// Also write the results as JSON.
    #[arg(long, value_name = "OUT.json")]
    pub json: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
pub struct ScoreArgs {
    /// The model folder (with `manifest.toml` and the ONNX file it names), or its ONNX file.
    pub model: PathBuf,
    /// Dataset folders (`images/`, `masks/`, `dataset.toml`).
    #[arg(long, required = true, num_args = 1.., value_name = "DIR")]
    pub data: Vec<PathBuf>,
    /// Classes file for datasets without a `dataset.toml` (e.g. a read-only folder).
    #[arg(long, value_name = "FILE")]
    pub classes: Option<PathBuf>,
    /// Score only the images whose stems are listed in this file (one per line).
    #[arg(long, value_name = "LIST.txt")]
    pub images_from: Option<PathBuf>,
    /// Boundary F1 tolerance in pixels.
    #[arg(long, default_value_t = 2.0, value_name = "PX")]
    pub tolerance: f64,
    /// Write every evaluation as JSON (dataset folder → evaluation, plus "all").
    #[arg(long, value_name = "OUT.json")]
    pub json: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
pub struct CheckArgs {
    /// The model folder or ONNX file.
    pub file: PathBuf,
    /// Also run the model once with tract on a 64×64 input.
    #[arg(long)]
    pub run: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    match args.command {
        ModelCommand::Check(a) => check(a),
        ModelCommand::Score(a) => score(a),
        ModelCommand::Bench(a) => bench(a),
    }
}

fn check(mut args: CheckArgs) -> anyhow::Result<()> {
    args.file = ModelFiles::resolve(&args.file)?.onnx;
    let report = onnx::check_contract(&args.file)?;
    println!("{}: meets the microfed U-Net contract", args.file.display());
    println!("  classes (K)          {}", report.num_classes);
    println!("  encoder parameters   {}", report.encoder_parameters);
    println!("  decoder parameters   {}", report.decoder_parameters);
    println!("  opset                {}", report.opset);
    if args.run {
        let seg = Segmenter::load(&args.file)?;
        let logits = seg
            .logits(&vec![0.0; 64 * 64], 1, 64, 64)
            .with_context(|| format!("running {} with tract", args.file.display()))?;
        anyhow::ensure!(
            logits.iter().all(|v| v.is_finite()),
            "{}: tract produced non-finite logits",
            args.file.display()
        );
        println!(
            "  tract run            ok ([1, {}, 64, 64] logits, all finite)",
            seg.classes()
        );
    }
    Ok(())
}

fn score(args: ScoreArgs) -> anyhow::Result<()> {
    let files = ModelFiles::resolve(&args.model)?;
    let Some((_, manifest)) = files.manifest else {
        anyhow::bail!(
            "{}: no manifest.toml beside it; `model score` needs the model's classes and normalisation",
            args.model.display()
        );
    };
    let seg = Segmenter::load(&files.onnx)?;
    let names: Vec<String> = manifest.classes.iter().map(|c| c.name.clone()).collect();
    let only = match &args.images_from {
        Some(list) => Some(crate::train::data::read_image_list(list)?),
        None => None,
    };
    let mut all = Evaluator::new(names.len(), args.tolerance)?;
    let mut report = serde_json::Map::new();
    for dir in &args.data {
        let ds =
            Dataset::open(dir, args.classes.as_deref())?.with_normalisation(manifest.normalisation);
        anyhow::ensure!(
            ds.manifest.num_classes() == names.len(),
            "{}: {} classes, the model has {}",
            dir.display(),
            ds.manifest.num_classes(),
            names.len()
        );
        let mut ev = Evaluator::new(names.len(), args.tolerance)?;
        for (i, pair) in ds.pairs().iter().enumerate() {
            if only.as_ref().is_some_and(|o| !o.contains(&pair.stem)) {
                continue;
            }
            let (image, truth) = ds.load_pair(i)?;
            let pred = seg
                .predict_mask(&image.pixels, image.width as usize, image.height as usize)
                .with_context(|| format!("segmenting {}", image.path.display()))?;
            ev.add(&pair.stem, &truth, &pred)?;
            all.add(&pair.stem, &truth, &pred)?;
        }
        let e = ev.finish(&names);
        println!("== {}", dir.display());
        crate::cli::eval::print_table(&e);
        report.insert(dir.display().to_string(), serde_json::to_value(&e)?);
    }
    let e = all.finish(&names);
    if args.data.len() > 1 {
        println!("== all datasets");
        crate::cli::eval::print_table(&e);
    }
    report.insert("all".into(), serde_json::to_value(&e)?);
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)? + "\n")
            .with_context(|| format!("cannot write {}", path.display()))?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

fn parse_shape(text: &str) -> anyhow::Result<(usize, usize, usize)> {
    let parts: Vec<&str> = text.split('x').collect();
    let bad = || anyhow::anyhow!("--shape {text:?}: expected NxHxW, e.g. 1x512x512");
    if parts.len() != 3 {
        return Err(bad());
    }
    let v: Vec<usize> = parts
        .iter()
        .map(|p| p.trim().parse::<usize>().map_err(|_| bad()))
        .collect::<Result<_, _>>()?;
    anyhow::ensure!(
        v[0] > 0
            && v[1] > 0
            && v[2] > 0
            && v[1].is_multiple_of(onnx::INPUT_MULTIPLE)
            && v[2].is_multiple_of(onnx::INPUT_MULTIPLE),
        "--shape {text:?}: N positive, H and W positive multiples of {}",
        onnx::INPUT_MULTIPLE
    );
    Ok((v[0], v[1], v[2]))
}

/// A reproducible input: smooth blobs plus noise, in the normalised range of a micrograph.
fn bench_input(n: usize, h: usize, w: usize) -> Vec<f32> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let mut x = Vec::with_capacity(n * h * w);
    for b in 0..n {
        for y in 0..h {
            for xx in 0..w {
                let s = ((y as f32 * 0.05 + b as f32).sin() * (xx as f32 * 0.037).cos()) * 1.5;
                x.push(s + rng.random_range(-0.3f32..0.3));
            }
        }
    }
    x
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn bench(args: BenchArgs) -> anyhow::Result<()> {
    use crate::model::runtime::{Engine, Outputs, select_engine};
    use std::time::Instant;
    let mut args = args;
    args.file = ModelFiles::resolve(&args.file)?.onnx;
    anyhow::ensure!(args.runs > 0, "--runs must be at least 1");
    let shapes: Vec<_> = args
        .shapes
        .iter()
        .map(|s| parse_shape(s))
        .collect::<anyhow::Result<_>>()?;
    let choice = select_engine(args.device)?;
    println!("engine: {} ({})", choice.engine.name(), choice.reason);
    let threads = crate::pipeline::resolve_threads(args.threads);
    let executor = crate::pipeline::tiling::executor(threads)
        .unwrap_or(tract_linalg::multithread::Executor::SingleThread);
    crate::model::runtime::set_process_engine(choice.engine);
    crate::model::runtime::set_process_engine_kind(args.engine, threads);
    crate::model::runtime::set_process_precision(args.precision);
    let seg = Segmenter::load(&args.file)?.on_engine(choice.engine);
    println!(
        "network: {} ({}), {threads} threads",
        seg.engine_name(),
        seg.engine_reason()
    );
    let mut rows = Vec::new();
    println!("| shape | prepare ms | median ms | p90 ms | images/s |");
    println!("|---|---|---|---|---|");
    for (i, &(n, h, w)) in shapes.iter().enumerate() {
        let input = bench_input(n, h, w);
        let t0 = Instant::now();
        let tiled = match args.tile {
            None => {
                seg.prepare(n, h, w, Outputs::Logits)
                    .with_context(|| format!("preparing {n}x{h}x{w}"))?;
                None
            }
            Some(tile) => {
                let grid = crate::pipeline::tiling::TileGrid::new(w, h, tile, args.overlap)?;
                let batch = args.tile_batch.max(1).min(grid.len());
                seg.prepare(batch, grid.y.tile, grid.x.tile, Outputs::Logits)
                    .with_context(|| format!("preparing {batch} tiles of {tile}"))?;
                let images: Vec<crate::micrograph::Micrograph> = input
                    .chunks(h * w)
                    .map(|pixels| crate::micrograph::Micrograph {
                        width: w as u32,
                        height: h as u32,
                        pixels: pixels.to_vec(),
                        bit_depth: 32,
                        pixel_size_um: None,
                        path: PathBuf::new(),
                        normalisation: Default::default(),
                    })
                    .collect();
                Some((tile, batch, grid.len(), images))
            }
        };
        let prepare_ms = t0.elapsed().as_secs_f64() * 1e3;
        let run = || -> anyhow::Result<Vec<f32>> {
            match &tiled {
                None => Ok(tract_linalg::multithread::multithread_tract_scope(
                    executor.clone(),
                    || seg.logits(&input, n, h, w),
                )?),
                Some((tile, batch, _, images)) => {
                    let mut all = Vec::new();
                    for image in images {
                        let l = crate::pipeline::tiling::segment_logits(
                            &seg,
                            image,
                            *tile,
                            args.overlap,
                            *batch,
                            &executor,
                        )?;
                        all.extend(l.data);
                    }
                    Ok(all)
                }
            }
        };
        let mut logits = Vec::new();
        for _ in 0..args.warmup {
            logits = run().with_context(|| format!("running {n}x{h}x{w}"))?;
        }
        let mut ms = Vec::with_capacity(args.runs);
        for _ in 0..args.runs {
            let t = Instant::now();
            logits = run().with_context(|| format!("running {n}x{h}x{w}"))?;
            ms.push(t.elapsed().as_secs_f64() * 1e3);
        }
        anyhow::ensure!(
            logits.iter().all(|v| v.is_finite()),
            "{}: non-finite logits for {n}x{h}x{w}",
            args.file.display()
        );
        ms.sort_by(f64::total_cmp);
        let median = percentile(&ms, 0.5);
        let p90 = percentile(&ms, 0.9);
        println!(
            "| {n}x{h}x{w} | {prepare_ms:.0} | {median:.2} | {p90:.2} | {:.1} |",
            n as f64 * 1e3 / median
        );
        let mut row = serde_json::json!({
            "shape": [n, h, w], "prepare_ms": prepare_ms, "median_ms": median, "p90_ms": p90,
            "runs": args.runs, "engine": choice.engine.name(), "threads": threads,
            "network": seg.engine_name(),
        });
        if let Some(net) = seg.kernels() {
            row["kernels_memory_bytes"] = serde_json::json!(net.memory_bytes());
        }
        if let Some((tile, batch, tiles, _)) = &tiled {
            row["tile"] = serde_json::json!(tile);
            row["overlap"] = serde_json::json!(args.overlap);
            row["tile_batch"] = serde_json::json!(batch);
            row["tiles"] = serde_json::json!(tiles);
        }
        // The GPU's answer against the CPU's, on the first shape: tract-cuda may use TF32 or other
        // reduced-precision paths, so say how far the logits move and whether the classes change.
        if i == 0 && !args.no_check && matches!(choice.engine, Engine::Cuda(_)) {
            let cpu = Segmenter::load(&args.file)?.on_engine(Engine::Cpu);
            let reference =
                tract_linalg::multithread::multithread_tract_scope(executor.clone(), || {
                    cpu.logits(&input, n, h, w)
                })?;
            let max_abs = reference
                .iter()
                .zip(&logits)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max);
            let k = seg.classes();
            let plane = h * w;
            let mut same = 0usize;
            for b in 0..n {
                for p in 0..plane {
                    let arg = |v: &[f32]| {
                        (0..k)
                            .max_by(|&c, &d| {
                                v[(b * k + c) * plane + p].total_cmp(&v[(b * k + d) * plane + p])
                            })
                            .unwrap_or(0)
                    };
                    same += usize::from(arg(&reference) == arg(&logits));
                }
            }
            let agree = same as f64 / (n * plane) as f64;
            println!(
                "GPU vs CPU logits on {n}x{h}x{w}: max |diff| {max_abs:.3e}, same class for {:.4}% of pixels",
                agree * 100.0
            );
            row["gpu_vs_cpu_max_abs"] = serde_json::json!(max_abs);
            row["gpu_vs_cpu_class_agreement"] = serde_json::json!(agree);
        }
        rows.push(row);
    }
    if let Some(path) = &args.json {
        let doc = serde_json::json!({
            "model": args.file.display().to_string(),
            "engine": choice.engine.name(),
            "reason": choice.reason,
            "results": rows,
        });
        std::fs::write(path, serde_json::to_string_pretty(&doc)? + "\n")
            .with_context(|| format!("cannot write {}", path.display()))?;
        println!("wrote {}", path.display());
    }
    Ok(())
}
