//! The privacy measurements of docs/privacy-secagg-dp.md, printed as Markdown tables.
//!
//! ```text
//! cargo run -p microfed --example privacy -- secagg        # secure-aggregation cost, n = 5, 100, 1024
//! cargo run -p microfed --example privacy -- secagg-large  # only the 1,024-lab rows
//! cargo run -p microfed --example privacy -- accountant    # ε per round for the noise levels used
//! cargo run -p microfed --example privacy -- attack        # property inference from one update
//! cargo run -p microfed --example privacy -- dp            # IoU cost of DP-FedAvg at ε = 1, 4, 8
//! cargo run -p microfed --example privacy -- style-attack  # grain size and style from one style code
//! ```
//! `attack`, `style-attack` and `dp` use models/grains/model.onnx and synthetic polycrystal labs (CPU backend).

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use rand::{Rng, SeedableRng};

use microfed::federated::dp::{self, DpConfig, RdpAccountant};
use microfed::federated::edge::local::{LocalOptimizer, RoundPlan};
use microfed::federated::edge::style::StyleKind;
use microfed::federated::secagg::{self, Dropouts};
use microfed::micrograph::Normalisation;
use microfed::model::runtime::Segmenter;
use microfed::model::{manifest, onnx};
use microfed::study::attack::{self, Condition, SyntheticLab};
use microfed::study::attack_style::{self, StyleDefence};
use microfed_kernels::cpu::CpuBackend;

fn inputs(n: usize, len: usize, seed: u64) -> Vec<Vec<f32>> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    (0..n)
        .map(|_| (0..len).map(|_| rng.random_range(-0.01f32..0.01)).collect())
        .collect()
}

fn secagg_costs(only_large: bool) -> anyhow::Result<()> {
    println!(
        "| devices | coordinates | ring bits | t | dropped | masked B | sent B / device | received B / device | plain int8 B | sent / plain | (sent + received) / plain | device s | server s |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for (n, len, drop) in [
        (5usize, 783_874usize, 0usize),
        (5, 100_000, 1),
        (100, 100_000, 0),
        (100, 100_000, 10),
        (1024, 1_000, 0),
        (1024, 1_000, 100),
    ] {
        if only_large && n < 1024 {
            continue;
        }
        let x = inputs(n, len, n as u64);
        // Half of the dropped vanish before their masked input, half after.
        let dropouts = Dropouts {
            before_masked: (0..drop / 2 + drop % 2).map(|i| 1 + 2 * i).collect(),
            after_masked: (0..drop / 2).map(|i| 2 + 2 * i).collect(),
        };
        let t0 = Instant::now();
        let r = secagg::simulate(&x, 0.01, None, &dropouts, 1)?;
        anyhow::ensure!(r.aggregate.codes == r.expected_codes, "wrong sum");
        println!(
            "| {n} | {len} | {} | {} | {drop} | {} | {:.0} | {:.0} | {} | {:.3} | {:.3} | {:.3} | {:.3} |",
            r.ring_bits,
            r.threshold,
            r.masked_bytes,
            r.device_sent,
            r.device_received,
            r.plain_int8_bytes,
            r.device_sent / r.plain_int8_bytes as f64,
            (r.device_sent + r.device_received) / r.plain_int8_bytes as f64,
            r.device_seconds,
            r.server_seconds
        );
        eprintln!(
            "n = {n}, len = {len}: {:.1} s wall",
            t0.elapsed().as_secs_f64()
        );
        if len < 100_000 {
            // The key and share messages do not depend on the length; the masked input grows as
            // ceil(len · b / 8). Extrapolate to Bonawitz et al.'s 100,000 coordinates.
            let fixed_sent = r.device_sent - r.masked_bytes as f64;
            let masked = (100_000 * r.ring_bits as usize).div_ceil(8) as f64;
            let plain = (r.plain_int8_bytes - len + 100_000) as f64;
            println!(
                "| {n} | 100000 (extrapolated) | {} | {} | {drop} | {masked:.0} | {:.0} | {:.0} | {plain:.0} | {:.3} | {:.3} | | |",
                r.ring_bits,
                r.threshold,
                fixed_sent + masked,
                r.device_received,
                (fixed_sent + masked) / plain,
                (fixed_sent + masked + r.device_received) / plain,
            );
        }
    }
    Ok(())
}

fn accountant() -> anyhow::Result<()> {
    println!(
        "| target ε (δ = 1e-5) | rounds | noise multiplier z | ε after round 1, 2, 5, 10, 20 |"
    );
    println!("|---|---|---|---|");
    for eps in [1.0, 4.0, 8.0] {
        for rounds in [5u64, 20] {
            let z = dp::noise_multiplier_for(eps, 1e-5, 1.0, rounds)?;
            let mut a = RdpAccountant::new();
            let mut per = Vec::new();
            for r in 1..=20u64 {
                a.step(1.0, z, 1)?;
                if [1, 2, 5, 10, 20].contains(&r) {
                    per.push(format!("{:.2}", a.epsilon(1e-5).0));
                }
            }
            println!("| {eps} | {rounds} | {z:.3} | {} |", per.join(", "));
        }
    }
    Ok(())
}

struct Setup {
    params: microfed_kernels::unet::Params,
    segmenter: Segmenter,
    norm: Normalisation,
    version: String,
}

fn setup() -> anyhow::Result<Setup> {
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/grains/model.onnx");
    let proto = onnx::load(&model)?;
    let params = onnx::load_params(&proto, &model)?;
    let norm = manifest::ModelManifest::load(&model.with_file_name("manifest.toml"))
        .map(|m| m.normalisation)
        .unwrap_or_default();
    Ok(Setup {
        params,
        segmenter: Segmenter::load(&model)?,
        norm,
        version: manifest::sha256_file(&model)?,
    })
}

fn labs(
    s: &Setup,
    sizes: &[f32],
    holdout: usize,
    dir: &Path,
    seed: u64,
) -> anyhow::Result<Vec<SyntheticLab>> {
    Ok(attack::synthetic_grain_labs(
        &s.segmenter,
        &s.norm,
        &s.version,
        dir,
        sizes,
        4,
        holdout,
        64,
        seed,
    )?)
}

const PLAN: RoundPlan = RoundPlan {
    round: 1,
    epochs: 1,
    steps_per_epoch: 8,
    learning_rate: 0.01,
    prox_mu: 0.0,
    optimizer: LocalOptimizer::Momentum,
};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The attack's labs: 30 shadows then 15 targets, grain sizes uniform in 10–48 px.
fn attack_labs(s: &Setup, dir: &Path) -> anyhow::Result<(Vec<SyntheticLab>, usize)> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
    let (shadows, targets) = (30, 15);
    let sizes: Vec<f32> = (0..shadows + targets)
        .map(|_| rng.random_range(10.0f32..48.0))
        .collect();
    Ok((labs(s, &sizes, 0, dir, 77)?, shadows))
}

fn attack_run() -> anyhow::Result<()> {
    let s = setup()?;
    let tmp = tempfile::tempdir()?;
    let t0 = Instant::now();
    let (labs, shadows) = attack_labs(&s, tmp.path())?;
    let targets = labs.len() - shadows;
    let backend = Arc::new(CpuBackend::new());
    let ups = attack::updates(backend, &s.params, &labs, &PLAN, 2, 64, 9)?;
    eprintln!(
        "{} labs trained in {:.1} s",
        labs.len(),
        t0.elapsed().as_secs_f64()
    );
    let norms: Vec<f64> = ups
        .iter()
        .map(|u| u.iter().map(|&v| f64::from(v).powi(2)).sum::<f64>().sqrt())
        .collect();
    let c = median(norms.clone()) as f32;
    let fr: Vec<f64> = labs.iter().map(|l| 100.0 * l.boundary_fraction).collect();
    println!(
        "{} shadow + {} target labs; boundary fraction {:.1}–{:.1} %; update norms {:.4}–{:.4}, C = median = {c:.4}\n",
        shadows,
        targets,
        fr.iter().copied().fold(f64::INFINITY, f64::min),
        fr.iter().copied().fold(0.0, f64::max),
        norms.iter().copied().fold(f64::INFINITY, f64::min),
        norms.iter().copied().fold(0.0, f64::max),
    );
    let z = |eps: f64| dp::noise_multiplier_for(eps, 1e-5, 1.0, 1);
    let conditions = vec![
        Condition::Plain,
        Condition::DpShare {
            noise_multiplier: z(8.0)?,
            labs: 5,
        },
        Condition::DpShare {
            noise_multiplier: z(1.0)?,
            labs: 5,
        },
        Condition::SecAgg { labs: 5 },
        Condition::SecAggDp {
            noise_multiplier: z(8.0)?,
            labs: 5,
        },
        Condition::SecAggDp {
            noise_multiplier: z(1.0)?,
            labs: 5,
        },
    ];
    let rows = attack::property_inference(&labs, &ups, shadows, c, &conditions, 3)?;
    println!(
        "| what the aggregator sees | error of its estimate (pp) | blind guess (pp) | correlation |"
    );
    println!("|---|---|---|---|");
    for r in rows {
        println!(
            "| {:?} | {:.2} | {:.2} | {:.2} |",
            r.condition, r.mae_pp, r.blind_mae_pp, r.correlation
        );
    }
    Ok(())
}

/// The same labs as `attack`, read through one published style code each.
fn style_attack_run() -> anyhow::Result<()> {
    let s = setup()?;
    let tmp = tempfile::tempdir()?;
    let t0 = Instant::now();
    let (labs, shadows) = attack_labs(&s, tmp.path())?;
    eprintln!(
        "{} labs' features in {:.1} s",
        labs.len(),
        t0.elapsed().as_secs_f64()
    );
    let fr: Vec<f64> = labs.iter().map(|l| 100.0 * l.boundary_fraction).collect();
    println!(
        "{shadows} shadow + {} target labs; boundary fraction {:.1}–{:.1} %; styles cycle optical-etched, sem-se, sem-bse\n",
        labs.len() - shadows,
        fr.iter().copied().fold(f64::INFINITY, f64::min),
        fr.iter().copied().fold(0.0, f64::max),
    );
    // One publication of one code: z for the target ε after a single Gaussian step.
    let z = |eps: f64| dp::noise_multiplier_for(eps, attack_style::DELTA, 1.0, 1);
    println!(
        "| code | what the lab publishes | ε (δ = 1e-5) | grain: error of the estimate (pp) | blind guess (pp) | correlation | λ / d | style: accuracy | blind guess |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for kind in [StyleKind::FeatureStats, StyleKind::Fourier] {
        let c = attack_style::median_code_norm(&labs, kind)?;
        let defences = [
            StyleDefence::Clear,
            StyleDefence::RelativeNoise { sigma: 0.1 },
            StyleDefence::RelativeNoise { sigma: 0.5 },
            StyleDefence::Dp {
                noise_multiplier: z(8.0)?,
                clip_norm: c,
            },
            StyleDefence::Dp {
                noise_multiplier: z(1.0)?,
                clip_norm: c,
            },
        ];
        let rows = attack_style::style_inference(&labs, kind, shadows, &defences, 3)?;
        let d = match kind {
            StyleKind::FeatureStats => microfed::federated::edge::style::feature_stats_len(),
            StyleKind::Fourier => microfed::federated::edge::style::fourier_len(
                microfed::federated::edge::style::FOURIER_BAND,
            ),
        } as f64;
        for r in rows {
            let what = match r.defence {
                StyleDefence::Clear => "the code in the clear".to_owned(),
                StyleDefence::RelativeNoise { sigma } => format!("noise_sigma = {sigma}"),
                StyleDefence::Dp {
                    noise_multiplier,
                    clip_norm,
                } => format!("dp::StyleNoise z = {noise_multiplier:.3}, C = {clip_norm:.3}"),
            };
            println!(
                "| {kind} | {what} | {} | {:.2} | {:.2} | {:.2} | {:.0e} | {:.0} % | {:.0} % |",
                r.epsilon.map_or("–".into(), |e| format!("{e:.2}")),
                r.mae_pp,
                r.blind_mae_pp,
                r.correlation,
                r.lambda / d,
                100.0 * r.style_accuracy,
                100.0 * r.style_blind_accuracy
            );
        }
    }
    eprintln!("style attack {:.1} s in all", t0.elapsed().as_secs_f64());
    Ok(())
}

fn dp_run() -> anyhow::Result<()> {
    let s = setup()?;
    let tmp = tempfile::tempdir()?;
    let sizes = [14.0f32, 20.0, 26.0, 32.0, 40.0];
    let labs = labs(&s, &sizes, 2, tmp.path(), 31)?;
    let backend = Arc::new(CpuBackend::new());
    let rounds = 5;
    let ups = attack::updates(backend.clone(), &s.params, &labs, &PLAN, 2, 64, 9)?;
    let c = median(
        ups.iter()
            .map(|u| u.iter().map(|&v| f64::from(v).powi(2)).sum::<f64>().sqrt())
            .collect(),
    ) as f32;
    println!("5 labs, {rounds} rounds, C = {c:.4} (median round-1 update norm), δ = 1e-5\n");
    println!("| run | z | mean IoU after round 0, 1, …, {rounds} |");
    println!("|---|---|---|");
    let t0 = Instant::now();
    let plain = attack::dp_fedavg(
        backend.clone(),
        &s.params,
        &labs,
        rounds,
        &PLAN,
        2,
        64,
        None,
        1,
    )?;
    eprintln!("plain run {:.1} s", t0.elapsed().as_secs_f64());
    let fmt = |v: &[f64]| {
        v.iter()
            .map(|x| format!("{:.2}", 100.0 * x))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let note = |r: &attack::DpRun| match r.diverged_in {
        Some(k) => format!(" (local training diverged in round {k} on the noised decoder)"),
        None => String::new(),
    };
    println!(
        "| secure aggregation, no DP | – | {}{} |",
        fmt(&plain.iou),
        note(&plain)
    );
    for eps in [8.0, 4.0, 1.0] {
        let z = dp::noise_multiplier_for(eps, 1e-5, 1.0, rounds)?;
        let cfg = DpConfig {
            clip_norm: c,
            noise_multiplier: z,
            sampling_rate: 1.0,
            delta: 1e-5,
        };
        let r = attack::dp_fedavg(
            backend.clone(),
            &s.params,
            &labs,
            rounds,
            &PLAN,
            2,
            64,
            Some(&cfg),
            1,
        )?;
        println!("| ε = {eps} | {z:.3} | {}{} |", fmt(&r.iou), note(&r));
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let what = std::env::args().nth(1).unwrap_or_else(|| "all".into());
    let all = what == "all";
    if all || what == "secagg" || what == "secagg-large" {
        secagg_costs(what == "secagg-large").context("secagg")?;
        println!();
    }
    if all || what == "accountant" {
        accountant()?;
        println!();
    }
    if all || what == "attack" {
        attack_run().context("attack")?;
        println!();
    }
    if all || what == "style-attack" {
        style_attack_run().context("style attack")?;
        println!();
    }
    if all || what == "dp" {
        dp_run().context("dp")?;
    }
    Ok(())
}
