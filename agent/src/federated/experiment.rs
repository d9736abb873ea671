//! An in-process federation: the same local training, compression and aggregation code as the MQTT
//! path, without a broker, for experiments and benchmarks (`microfed experiment`).
//!
//! Each lab is a dataset folder; its labelled images are split into training and hold-out images, and
//! its encoder features cached exactly as an agent does ([`super::local::FeatureCache`]). A run is a
//! [`Strategy`] plus compression and aggregation settings; every run starts from the same base model
//! and sees the same data and seeds, so runs differ only in what they are meant to compare. After
//! each round every lab's hold-out images are scored with the global decoder (for `local`, with the
//! lab's own), giving per-lab and mean IoU per round, and the bytes each lab sent.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use microfed_kernels::Backend;
use microfed_kernels::unet::Params;

use super::aggregate::{Accumulator, AggregationConfig, ServerOptimizer};
use super::compress::{self, CompressionConfig, Residual, TensorSpan};
use super::local::{FeatureCache, LocalError, LocalTrainer, RoundPlan};

/// How labs learn together.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Strategy {
    /// Each lab fine-tunes alone (no communication).
    Local,
    /// Federated averaging of decoder updates.
    FedAvg,
    /// FedAvg with FedProx's proximal term (μ from the run).
    FedProx,
    /// All labs' training images pooled in one place (the upper bound).
    Centralised,
}

/// One configuration to compare.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunSpec {
    pub name: String,
    pub strategy: Strategy,
    #[serde(default)]
    pub compression: CompressionConfig,
    #[serde(default)]
    pub aggregation: AggregationConfig,
    #[serde(default)]
    pub prox_mu: f32,
}

/// Local training settings shared by every run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainSpec {
    pub rounds: u64,
    pub local_epochs: u32,
    pub steps_per_epoch: u32,
    pub learning_rate: f32,
    pub batch: usize,
    pub crop: usize,
}

/// One round's outcome in one run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoundRecord {
    pub round: u64,
    /// Mean IoU on each lab's hold-out images.
    pub lab_iou: Vec<Option<f64>>,
    /// Mean over labs.
    pub mean_iou: Option<f64>,
    /// Bytes each lab sent this round (compressed update).
    pub bytes: Vec<usize>,
    pub train_loss: Vec<f32>,
}

/// What a run produced.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunResult {
    pub name: String,
    pub strategy: Strategy,
    /// Round 0 = the base model, before any training.
    pub rounds: Vec<RoundRecord>,
    /// Bytes of one dense fp32 update (the baseline).
    pub dense_bytes: usize,
}

/// A lab in the experiment: its name and its cached features.
#[derive(Debug, Clone)]
pub struct Lab {
    pub name: String,
    pub cache: FeatureCache,
}

fn mean(v: &[Option<f64>]) -> Option<f64> {
    let s: Vec<f64> = v.iter().flatten().copied().collect();
    (!s.is_empty()).then(|| s.iter().sum::<f64>() / s.len() as f64)
}

/// Runs one configuration over `labs`, from the base model `params`.
pub fn run<B: Backend>(
    backend: Arc<B>,
    params: &Params,
    labs: &[Lab],
    train: &TrainSpec,
    spec: &RunSpec,
    seed: u64,
) -> Result<RunResult, LocalError> {
    let layout: Vec<TensorSpan> = compress::decoder_layout(params.classes);
    let base = params.decoder_flat();
    let len = base.len();
    let err = |e: String| LocalError::Data(format!("run {}: {e}", spec.name));
    let mut trainers = labs
        .iter()
        .enumerate()
        .map(|(i, lab)| {
            LocalTrainer::new(
                backend.clone(),
                params,
                lab.cache.clone(),
                train.batch,
                train.crop,
                seed.wrapping_mul(1000) + i as u64,
            )
        })
        .collect::<Result<Vec<_>, _>>()?;
    // Centralised: one trainer on every lab's training images (hold-outs stay per lab).
    let mut pooled = if spec.strategy == Strategy::Centralised {
        let mut all = labs[0].cache.clone();
        all.train = labs.iter().flat_map(|l| l.cache.train.clone()).collect();
        all.holdout.clear();
        Some(LocalTrainer::new(
            backend.clone(),
            params,
            all,
            train.batch,
            train.crop,
            seed.wrapping_mul(1000) + 999,
        )?)
    } else {
        None
    };
    let mut residuals: Vec<Residual> = labs.iter().map(|_| Residual::new(len)).collect();
    let mut server =
        ServerOptimizer::new(len, &spec.aggregation.server).map_err(|e| err(e.to_string()))?;
    let mut global = base.clone();
    let mut own: Vec<Vec<f32>> = labs.iter().map(|_| base.clone()).collect();
    let mut rounds = Vec::new();
    let score = |trainers: &mut [LocalTrainer<B>],
                 decoders: &[&[f32]]|
     -> Result<Vec<Option<f64>>, LocalError> {
        trainers
            .iter_mut()
            .zip(decoders)
            .map(|(t, d)| t.holdout_iou(d))
            .collect()
    };
    let lab_iou = score(&mut trainers, &vec![global.as_slice(); labs.len()])?;
    rounds.push(RoundRecord {
        round: 0,
        mean_iou: mean(&lab_iou),
        lab_iou,
        bytes: vec![0; labs.len()],
        train_loss: vec![],
    });
    for round in 1..=train.rounds {
        let plan = RoundPlan {
            round,
            epochs: train.local_epochs,
            steps_per_epoch: train.steps_per_epoch,
            learning_rate: train.learning_rate,
            prox_mu: if spec.strategy == Strategy::FedProx {
                spec.prox_mu
            } else {
                0.0
            },
        };
        let mut bytes = vec![0; labs.len()];
        let mut losses = Vec::new();
        match spec.strategy {
            Strategy::Local => {
                for (i, t) in trainers.iter_mut().enumerate() {
                    let (local, loss) = t.train_round(&own[i], &plan)?;
                    own[i] = local;
                    losses.push(loss);
                }
            }
            Strategy::Centralised => {
                if let Some(p) = pooled.as_mut() {
                    // As many steps as all labs together take in a federated round.
                    let plan = RoundPlan {
                        steps_per_epoch: plan.steps_per_epoch * labs.len() as u32,
                        ..plan
                    };
                    let (local, loss) = p.train_round(&global, &plan)?;
                    global = local;
                    losses.push(loss);
                }
            }
            Strategy::FedAvg | Strategy::FedProx => {
                let mut acc =
                    Accumulator::new(len, &spec.aggregation).map_err(|e| err(e.to_string()))?;
                for (i, t) in trainers.iter_mut().enumerate() {
                    let (local, loss) = t.train_round(&global, &plan)?;
                    losses.push(loss);
                    let update: Vec<f32> = local.iter().zip(&global).map(|(l, g)| l - g).collect();
                    let packed = compress::compress(
                        &update,
                        &layout,
                        &spec.compression,
                        spec.compression.error_feedback.then_some(&mut residuals[i]),
                    )
                    .map_err(|e| err(e.to_string()))?;
                    bytes[i] = packed.len();
                    let received =
                        compress::decompress(&packed, &layout).map_err(|e| err(e.to_string()))?;
                    acc.add(&labs[i].name, &received, t.samples())
                        .map_err(|e| err(e.to_string()))?;
                }
                let merged = acc.finish().map_err(|e| err(e.to_string()))?;
                server
                    .apply(&mut global, &merged)
                    .map_err(|e| err(e.to_string()))?;
            }
        }
        let decoders: Vec<&[f32]> = if spec.strategy == Strategy::Local {
            own.iter().map(Vec::as_slice).collect()
        } else {
            vec![global.as_slice(); labs.len()]
        };
        let lab_iou = score(&mut trainers, &decoders)?;
        tracing::info!(
            run = %spec.name,
            round,
            mean_iou = ?mean(&lab_iou),
            bytes = ?bytes,
            "round"
        );
        rounds.push(RoundRecord {
            round,
            mean_iou: mean(&lab_iou),
            lab_iou,
            bytes,
            train_loss: losses,
        });
    }
    Ok(RunResult {
        name: spec.name.clone(),
        strategy: spec.strategy,
        rounds,
        dense_bytes: compress::dense_len(&layout),
    })
}

/// `microfed experiment --config FILE`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExperimentConfig {
    /// The base model (ONNX) every run starts from.
    pub model: PathBuf,
    /// Output folder: results.json, results.csv, results.md.
    pub out: PathBuf,
    /// Seeds; each run is repeated per seed (mean ± standard deviation reported).
    #[serde(default = "default_seeds")]
    pub seeds: Vec<u64>,
    /// Where features are cached.
    #[serde(default)]
    pub cache: Option<PathBuf>,
    /// Training device: auto, cpu, cuda.
    #[serde(default = "default_device")]
    pub device: String,
    pub labs: Vec<LabSpec>,
    pub train: TrainSpec,
    pub runs: Vec<RunSpec>,
}

fn default_seeds() -> Vec<u64> {
    vec![1]
}
fn default_device() -> String {
    "auto".into()
}

/// A lab of the experiment: a dataset folder, optionally limited to its first N labelled images.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LabSpec {
    pub name: String,
    pub data: PathBuf,
    /// Only these image stems (a file with one per line), e.g. one sample spot of nasa-super.
    #[serde(default)]
    pub images: Option<PathBuf>,
    #[serde(default = "default_holdout")]
    pub holdout_fraction: f64,
}

fn default_holdout() -> f64 {
    0.3
}

impl ExperimentConfig {
    /// Reads the file; relative paths are resolved against its folder.
    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let mut c: Self = toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        let base = path.parent().unwrap_or(Path::new("")).to_owned();
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        fix(&mut c.model);
        fix(&mut c.out);
        if let Some(cache) = &mut c.cache {
            fix(cache);
        }
        for l in &mut c.labs {
            fix(&mut l.data);
            if let Some(i) = &mut l.images {
                fix(i);
            }
        }
        if c.labs.is_empty() || c.runs.is_empty() || c.seeds.is_empty() {
            return Err(format!(
                "{}: needs at least one lab, one run and one seed",
                path.display()
            ));
        }
        for r in &c.runs {
            r.compression
                .validate()
                .map_err(|e| format!("{}: run {}: {e}", path.display(), r.name))?;
        }
        Ok(c)
    }
}

/// Markdown table of the final round: per-lab IoU, mean, and bytes per round per device, with mean ±
/// standard deviation over seeds.
pub fn summary_table(labs: &[String], results: &[Vec<RunResult>]) -> String {
    let mut out = String::from("| run | ");
    for l in labs {
        out += &format!("{l} IoU | ");
    }
    out += "mean IoU | bytes / round / device | vs dense fp32 |\n|---|";
    out += &"---|".repeat(labs.len() + 3);
    out.push('\n');
    let ms = |v: &[f64]| -> String {
        if v.is_empty() {
            return "–".into();
        }
        let m = v.iter().sum::<f64>() / v.len() as f64;
        if v.len() < 2 {
            return format!("{:.2}", 100.0 * m);
        }
        let sd = (v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (v.len() - 1) as f64).sqrt();
        format!("{:.2} ± {:.2}", 100.0 * m, 100.0 * sd)
    };
    for seeds in results {
        let Some(first) = seeds.first() else { continue };
        out += &format!("| {} | ", first.name);
        for l in 0..labs.len() {
            let v: Vec<f64> = seeds
                .iter()
                .filter_map(|r| {
                    r.rounds
                        .last()
                        .and_then(|x| x.lab_iou.get(l).copied().flatten())
                })
                .collect();
            out += &format!("{} | ", ms(&v));
        }
        let v: Vec<f64> = seeds
            .iter()
            .filter_map(|r| r.rounds.last().and_then(|x| x.mean_iou))
            .collect();
        out += &format!("{} | ", ms(&v));
        let sent: Vec<usize> = seeds
            .iter()
            .flat_map(|r| {
                r.rounds
                    .iter()
                    .skip(1)
                    .flat_map(|x| x.bytes.iter().copied())
            })
            .filter(|&b| b > 0)
            .collect();
        if sent.is_empty() {
            out += "0 | – |\n";
        } else {
            let avg = sent.iter().sum::<usize>() as f64 / sent.len() as f64;
            out += &format!(
                "{:.0} | {:.1}× smaller |\n",
                avg,
                first.dense_bytes as f64 / avg
            );
        }
    }
    out
}

/// One CSV row per run, seed, round and lab.
pub fn csv(labs: &[String], results: &[Vec<RunResult>], seeds: &[u64]) -> String {
    let mut out = String::from("run,strategy,seed,round,lab,iou,bytes\n");
    for runs in results {
        for (r, seed) in runs.iter().zip(seeds) {
            for rec in &r.rounds {
                for (l, name) in labs.iter().enumerate() {
                    out += &format!(
                        "{},{:?},{},{},{},{},{}\n",
                        r.name,
                        r.strategy,
                        seed,
                        rec.round,
                        name,
                        rec.lab_iou
                            .get(l)
                            .copied()
                            .flatten()
                            .map(|v| format!("{v:.5}"))
                            .unwrap_or_default(),
                        rec.bytes.get(l).copied().unwrap_or(0)
                    );
                }
            }
        }
    }
    out
}
