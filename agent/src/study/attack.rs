//! What an honest-but-curious aggregator learns from one lab's decoder update, and what DP costs.
//!
//! The images never leave a lab, but the update is a function of them. The attack here is *property
//! inference* (Ganju et al. 2018; Melis et al. 2019): the aggregator wants a figure of a lab's
//! micrographs — the grain-boundary area fraction, i.e. the lab's grain size, which follows from its
//! alloy and heat treatment — from one update. It has the base model and can make micrographs of its
//! own, so it trains *shadow labs* of known grain size with the same local fine-tuning, and fits a
//! ridge regression from the update's segmentation head (the 2 × 16 weights and 2 biases, reduced to
//! the 17 class differences that the softmax sees) to the boundary fraction. Then it reads a target
//! lab's update. Conditions ([`Condition`]): the update in the clear; the update clipped and noised
//! with one lab's share of distributed DP noise; only the secure-aggregation sum of a group of labs;
//! and that sum with the full DP noise. The report gives the mean absolute error of the attacker's
//! estimate against the truth and against the blind guess (the shadow labs' mean).
//!
//! [`dp_fedavg`] is the other measurement: FedAvg rounds where each lab clips and noises its update
//! (distributed DP), quantises it as secure aggregation does, and the mean of the codes becomes the
//! next global decoder; the hold-out IoU per round shows what a given ε costs.
//!
//! Map: [`SyntheticLab`] / [`synthetic_grain_labs`] (labs made with `crate::synth`, features cached
//! as an agent does), [`head_features`], [`Ridge`], [`Condition`], [`property_inference`],
//! [`AttackRow`], [`dp_fedavg`], [`AttackError`].

use std::path::Path;
use std::sync::Arc;

use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;
use serde::{Deserialize, Serialize};

use microfed_kernels::Backend;
use microfed_kernels::unet::Params;

use crate::federated::compress;
use crate::federated::dp::{self, DpConfig};
use crate::federated::edge::local::{FeatureCache, LocalError, LocalTrainer, RoundPlan};
use crate::federated::secagg;
use crate::micrograph::Normalisation;
use crate::model::runtime::Segmenter;
use crate::synth::{self, Structure, Style, SynthParams};
use crate::train::data::{TrainingImage, TrainingSet};

/// Why an attack experiment could not run.
#[derive(Debug, thiserror::Error)]
pub enum AttackError {
    #[error("synthetic lab {lab}: {message}")]
    Synth { lab: String, message: String },
    #[error(transparent)]
    Local(#[from] LocalError),
    #[error(transparent)]
    Cache(#[from] crate::federated::edge::cache::CacheError),
    #[error(transparent)]
    Dp(#[from] dp::DpError),
    #[error(transparent)]
    SecAgg(#[from] secagg::SecAggError),
    #[error(transparent)]
    Style(#[from] crate::federated::edge::style::StyleError),
    #[error("{0}")]
    Setup(String),
}

/// A lab made of synthetic polycrystal micrographs of one grain size.
#[derive(Debug, Clone)]
pub struct SyntheticLab {
    pub name: String,
    pub grain_size_px: f32,
    /// The `synth` imaging-style preset its micrographs were rendered in (what a style code is meant
    /// to reveal; [`crate::study::attack_style`] tries to read it back).
    pub style: String,
    /// Grain-boundary pixels / all pixels of its training images: the secret property.
    pub boundary_fraction: f64,
    pub cache: FeatureCache,
}

/// Labs of `images` training micrographs (plus `holdout` more) each, `side` px square, one per entry
/// of `grain_sizes`, cycling through three imaging styles; features computed with `segmenter` into
/// `cache_dir`.
#[allow(clippy::too_many_arguments)]
pub fn synthetic_grain_labs(
    segmenter: &Segmenter,
    norm: &Normalisation,
    model_version: &str,
    cache_dir: &Path,
    grain_sizes: &[f32],
    images: usize,
    holdout: usize,
    side: u32,
    seed: u64,
) -> Result<Vec<SyntheticLab>, AttackError> {
    const STYLES: [&str; 3] = ["optical-etched", "sem-se", "sem-bse"];
    grain_sizes
        .iter()
        .enumerate()
        .map(|(i, &g)| {
            let name = format!("lab-{i:02}");
            let err = |m: String| AttackError::Synth {
                lab: name.clone(),
                message: m,
            };
            let style = Style::preset(STYLES[i % STYLES.len()]).map_err(|e| err(e.to_string()))?;
            let params = SynthParams::new(
                Structure::Polycrystal,
                style,
                side,
                side,
                seed.wrapping_add(1000 * i as u64),
            )
            .and_then(|p| p.with_feature_size(g))
            .map_err(|e| err(e.to_string()))?;
            let make = |k: usize| {
                let s = synth::generate(&params, k as u64);
                TrainingImage {
                    dataset: 0,
                    stem: format!("{name}-{k}"),
                    width: side as usize,
                    height: side as usize,
                    pixels: norm
                        .inputs(s.image.iter().map(|&v| f32::from(v)).collect(), 65535.0)
                        .0,
                    labels: s.mask.data,
                }
            };
            let train: Vec<TrainingImage> = (0..images).map(make).collect();
            let validation: Vec<TrainingImage> = (images..images + holdout).map(make).collect();
            let boundary = train
                .iter()
                .flat_map(|t| &t.labels)
                .filter(|&&l| l == 1)
                .count();
            let total: usize = train.iter().map(|t| t.labels.len()).sum();
            let set = TrainingSet {
                classes: Structure::Polycrystal.classes(),
                datasets: Vec::new(),
                train,
                validation,
            };
            let cache =
                FeatureCache::build(segmenter, &set, &cache_dir.join(&name), model_version)?;
            Ok(SyntheticLab {
                name,
                grain_size_px: g,
                style: STYLES[i % STYLES.len()].to_owned(),
                boundary_fraction: boundary as f64 / total.max(1) as f64,
                cache,
            })
        })
        .collect()
}

/// The attacker's view of an update: the 2-class head's differences `w₁ − w₀` (16) and `b₁ − b₀`,
/// which is all the softmax sees of the head.
pub fn head_features(update: &[f32], classes: usize) -> Result<Vec<f64>, AttackError> {
    let layout = compress::decoder_layout(classes);
    let n = layout.len();
    if n < 2 || classes != 2 {
        return Err(AttackError::Setup(format!(
            "the attack reads a 2-class head, this model has {classes} classes"
        )));
    }
    let (w, b) = (&layout[n - 2], &layout[n - 1]);
    let total: usize = layout.iter().map(|t| t.len).sum();
    if update.len() != total {
        return Err(AttackError::Setup(format!(
            "update of {} values, the decoder has {total}",
            update.len()
        )));
    }
    let w_at = total - b.len - w.len;
    let per = w.len / 2;
    let mut f: Vec<f64> = (0..per)
        .map(|c| f64::from(update[w_at + per + c] - update[w_at + c]))
        .collect();
    f.push(f64::from(update[total - 1] - update[total - 2]));
    Ok(f)
}

/// Ridge regression on standardised features, with an intercept.
#[derive(Debug, Clone, PartialEq)]
pub struct Ridge {
    mean: Vec<f64>,
    std: Vec<f64>,
    weights: Vec<f64>,
    intercept: f64,
}

impl Ridge {
    /// Fits `y ≈ w · standardise(x) + c` minimising squared error + `lambda · |w|²`.
    pub fn fit(x: &[Vec<f64>], y: &[f64], lambda: f64) -> Result<Self, AttackError> {
        let n = x.len();
        let d = x.first().map_or(0, Vec::len);
        if n == 0 || n != y.len() || x.iter().any(|r| r.len() != d) {
            return Err(AttackError::Setup(
                "ridge: rows of different lengths or no rows".into(),
            ));
        }
        let mean: Vec<f64> = (0..d)
            .map(|j| x.iter().map(|r| r[j]).sum::<f64>() / n as f64)
            .collect();
        let std: Vec<f64> = (0..d)
            .map(|j| {
                let v = x.iter().map(|r| (r[j] - mean[j]).powi(2)).sum::<f64>() / n as f64;
                if v > 0.0 { v.sqrt() } else { 1.0 }
            })
            .collect();
        let z: Vec<Vec<f64>> = x
            .iter()
            .map(|r| (0..d).map(|j| (r[j] - mean[j]) / std[j]).collect())
            .collect();
        let ym = y.iter().sum::<f64>() / n as f64;
        // Normal equations (ZᵀZ + λI) w = Zᵀ(y − ȳ), solved by Gaussian elimination with pivoting.
        let mut a = vec![vec![0.0; d + 1]; d];
        for (i, row) in a.iter_mut().enumerate() {
            for j in 0..d {
                row[j] =
                    z.iter().map(|r| r[i] * r[j]).sum::<f64>() + if i == j { lambda } else { 0.0 };
            }
            row[d] = z.iter().zip(y).map(|(r, &t)| r[i] * (t - ym)).sum();
        }
        for c in 0..d {
            let p = (c..d)
                .max_by(|&i, &j| a[i][c].abs().total_cmp(&a[j][c].abs()))
                .unwrap_or(c);
            a.swap(c, p);
            if a[c][c].abs() < 1e-300 {
                return Err(AttackError::Setup(
                    "ridge: singular system (lambda = 0?)".into(),
                ));
            }
            let pivot = a[c].clone();
            for (r, row) in a.iter_mut().enumerate() {
                if r != c {
                    let f = row[c] / pivot[c];
                    row.iter_mut()
                        .zip(&pivot)
                        .skip(c)
                        .for_each(|(x, &p)| *x -= f * p);
                }
            }
        }
        let weights = (0..d).map(|i| a[i][d] / a[i][i]).collect();
        Ok(Self {
            mean,
            std,
            weights,
            intercept: ym,
        })
    }

    pub fn predict(&self, x: &[f64]) -> f64 {
        self.intercept
            + x.iter()
                .zip(&self.mean)
                .zip(&self.std)
                .zip(&self.weights)
                .map(|(((v, m), s), w)| w * (v - m) / s)
                .sum::<f64>()
    }
}

/// What the aggregator sees of a target lab.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Condition {
    /// The lab's update in the clear (plain FedAvg; also central DP, where the aggregator noises the
    /// sum only after seeing each update).
    Plain,
    /// The update clipped to `C` with this lab's share of distributed DP noise, `N(0, (zC)²/n)`,
    /// without secure aggregation.
    DpShare { noise_multiplier: f64, labs: usize },
    /// Only the sum over a group of `labs` labs (secure aggregation).
    SecAgg { labs: usize },
    /// That sum, of clipped updates carrying the whole `N(0, (zC)²)` between them.
    SecAggDp { noise_multiplier: f64, labs: usize },
}

/// One row of the attack report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AttackRow {
    pub condition: Condition,
    /// Mean absolute error of the estimated boundary fraction, in percentage points.
    pub mae_pp: f64,
    /// The same for the blind guess (mean of the shadow labs).
    pub blind_mae_pp: f64,
    /// Correlation of estimate and truth over the targets.
    pub correlation: f64,
}

/// Pearson correlation; 0 when either side is constant.
pub(crate) fn correlation(a: &[f64], b: &[f64]) -> f64 {
    let n = a.len() as f64;
    let (ma, mb) = (a.iter().sum::<f64>() / n, b.iter().sum::<f64>() / n);
    let cov: f64 = a.iter().zip(b).map(|(x, y)| (x - ma) * (y - mb)).sum();
    let va: f64 = a.iter().map(|x| (x - ma).powi(2)).sum();
    let vb: f64 = b.iter().map(|y| (y - mb).powi(2)).sum();
    if va > 0.0 && vb > 0.0 {
        cov / (va * vb).sqrt()
    } else {
        0.0
    }
}

/// One round of local fine-tuning of every lab from `global`; returns the updates (local − global).
pub fn updates<B: Backend>(
    backend: Arc<B>,
    params: &Params,
    labs: &[SyntheticLab],
    plan: &RoundPlan,
    batch: usize,
    crop: usize,
    seed: u64,
) -> Result<Vec<Vec<f32>>, AttackError> {
    let global = params.decoder_flat();
    labs.iter()
        .enumerate()
        .map(|(i, lab)| {
            let mut t = LocalTrainer::new(
                backend.clone(),
                params,
                lab.cache.clone(),
                batch,
                crop,
                seed + i as u64,
            )?;
            let (local, _) = t.train_round(&global, plan)?;
            Ok(local.iter().zip(&global).map(|(l, g)| l - g).collect())
        })
        .collect()
}

/// Runs the attack for every condition: the first `shadows` labs train the regression (their updates
/// passed through the same condition, so the attacker knows the mechanism), the rest are targets.
/// `clip_norm` is the DP clip bound `C`.
pub fn property_inference(
    labs: &[SyntheticLab],
    updates: &[Vec<f32>],
    shadows: usize,
    clip_norm: f32,
    conditions: &[Condition],
    seed: u64,
) -> Result<Vec<AttackRow>, AttackError> {
    if shadows < 3 || shadows >= labs.len() || updates.len() != labs.len() {
        return Err(AttackError::Setup(format!(
            "{shadows} shadow labs of {} (updates: {})",
            labs.len(),
            updates.len()
        )));
    }
    let truth: Vec<f64> = labs.iter().map(|l| 100.0 * l.boundary_fraction).collect();
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    let mut rows = Vec::new();
    for cond in conditions {
        // What the attacker observes of each lab (for SecAgg: of each lab's group sum, divided by the
        // group size, so the regression sees the same scale).
        let mut view =
            |idx: &[usize], noise: Option<(f64, usize)>| -> Result<Vec<f64>, AttackError> {
                let mut sum = vec![0.0f32; updates[0].len()];
                for &i in idx {
                    let mut u = updates[i].clone();
                    if let Some((z, n)) = noise {
                        let cfg = DpConfig {
                            clip_norm,
                            noise_multiplier: z,
                            sampling_rate: 1.0,
                            delta: 1e-5,
                        };
                        dp::privatise_update(&mut u, &cfg, n, &mut rng)?;
                    }
                    sum.iter_mut().zip(&u).for_each(|(s, &v)| *s += v);
                }
                let k = idx.len() as f32;
                sum.iter_mut().for_each(|s| *s /= k);
                head_features(&sum, 2)
            };
        let group = |i: usize, n: usize, lo: usize, hi: usize| -> Vec<usize> {
            // A group of n consecutive labs of [lo, hi) containing i (wrapping).
            let span = hi - lo;
            let start = lo + ((i - lo) / n * n).min(span.saturating_sub(n));
            (0..n).map(|k| lo + (start - lo + k) % span).collect()
        };
        let shadow_range = 0..shadows;
        let mut xs = Vec::new();
        let mut est = Vec::new();
        for i in 0..labs.len() {
            let (lo, hi) = if shadow_range.contains(&i) {
                (0, shadows)
            } else {
                (shadows, labs.len())
            };
            let x = match *cond {
                Condition::Plain => view(&[i], None)?,
                Condition::DpShare {
                    noise_multiplier,
                    labs: n,
                } => view(&[i], Some((noise_multiplier, n)))?,
                Condition::SecAgg { labs: n } => view(&group(i, n.min(hi - lo), lo, hi), None)?,
                Condition::SecAggDp {
                    noise_multiplier,
                    labs: n,
                } => {
                    let g = group(i, n.min(hi - lo), lo, hi);
                    let m = g.len();
                    view(&g, Some((noise_multiplier, m)))?
                }
            };
            xs.push(x);
        }
        let model = Ridge::fit(&xs[..shadows], &truth[..shadows], 1.0)?;
        for x in &xs[shadows..] {
            est.push(model.predict(x));
        }
        let targets = &truth[shadows..];
        let blind = truth[..shadows].iter().sum::<f64>() / shadows as f64;
        let mae = est
            .iter()
            .zip(targets)
            .map(|(e, t)| (e - t).abs())
            .sum::<f64>()
            / targets.len() as f64;
        let blind_mae =
            targets.iter().map(|t| (blind - t).abs()).sum::<f64>() / targets.len() as f64;
        rows.push(AttackRow {
            condition: cond.clone(),
            mae_pp: mae,
            blind_mae_pp: blind_mae,
            correlation: correlation(&est, targets),
        });
    }
    Ok(rows)
}

/// What [`dp_fedavg`] measured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DpRun {
    /// Hold-out mean IoU after each round (round 0 = the base model).
    pub iou: Vec<f64>,
    /// The round in which a lab's local training diverged on the noised global decoder (the run
    /// stops there).
    pub diverged_in: Option<u64>,
}

/// Hold-out mean IoU after each round of distributed DP-FedAvg with secure-aggregation quantisation.
/// `dp = None` runs the same rounds without clipping or noise (quantisation only, `quant_clip` wide);
/// round 0 is the base model.
#[allow(clippy::too_many_arguments)]
pub fn dp_fedavg<B: Backend>(
    backend: Arc<B>,
    params: &Params,
    labs: &[SyntheticLab],
    rounds: u64,
    plan: &RoundPlan,
    batch: usize,
    crop: usize,
    dp_cfg: Option<&DpConfig>,
    seed: u64,
) -> Result<DpRun, AttackError> {
    let mut trainers = labs
        .iter()
        .enumerate()
        .map(|(i, l)| {
            LocalTrainer::new(
                backend.clone(),
                params,
                l.cache.clone(),
                batch,
                crop,
                seed + i as u64,
            )
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut global = params.decoder_flat();
    let mut rng = ChaCha20Rng::seed_from_u64(seed ^ 0xd1ff);
    let n = labs.len();
    let score = |trainers: &mut [LocalTrainer<B>], g: &[f32]| -> Result<f64, AttackError> {
        let v: Vec<f64> = trainers
            .iter_mut()
            .map(|t| t.holdout_iou(g))
            .collect::<Result<Vec<_>, _>>()?
            .into_iter()
            .flatten()
            .collect();
        Ok(v.iter().sum::<f64>() / v.len().max(1) as f64)
    };
    let mut out = vec![score(&mut trainers, &global)?];
    for round in 1..=rounds {
        let plan = RoundPlan { round, ..*plan };
        let mut updates = Vec::with_capacity(n);
        for t in trainers.iter_mut() {
            let (local, _) = match t.train_round(&global, &plan) {
                Ok(x) => x,
                Err(LocalError::Diverged { round, .. }) => {
                    return Ok(DpRun {
                        iou: out,
                        diverged_in: Some(round),
                    });
                }
                Err(e) => return Err(e.into()),
            };
            let mut u: Vec<f32> = local.iter().zip(&global).map(|(l, g)| l - g).collect();
            if let Some(cfg) = dp_cfg {
                dp::privatise_update(&mut u, cfg, n, &mut rng)?;
            }
            updates.push(u);
        }
        // The shared quantisation range secure aggregation needs: from the noise when there is
        // some (4 standard deviations of one lab's share), else from the largest value.
        let quant_clip = match dp_cfg {
            Some(cfg) => {
                (4.0 * cfg.noise_multiplier * f64::from(cfg.clip_norm) / (n as f64).sqrt()) as f32
            }
            None => updates
                .iter()
                .flatten()
                .fold(0f32, |m, v| m.max(v.abs()))
                .max(1e-12),
        };
        let mut sum = vec![0i32; global.len()];
        for u in &updates {
            let codes = secagg::quantise(u, quant_clip, &mut rng)?;
            sum.iter_mut()
                .zip(codes)
                .for_each(|(s, c)| *s += i32::from(c));
        }
        let scale = quant_clip / 127.0 / n as f32;
        global
            .iter_mut()
            .zip(&sum)
            .for_each(|(g, &s)| *g += s as f32 * scale);
        out.push(score(&mut trainers, &global)?);
        tracing::info!(round, mean_iou = out[out.len() - 1], "dp-fedavg round");
    }
    Ok(DpRun {
        iou: out,
        diverged_in: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ridge_recovers_a_linear_relation() {
        // y = 3 x0 − 2 x1 + 5, no noise: a small λ recovers it closely.
        let x: Vec<Vec<f64>> = (0..40)
            .map(|i| vec![(i as f64 * 0.37).sin(), (i as f64 * 0.11).cos()])
            .collect();
        let y: Vec<f64> = x.iter().map(|r| 3.0 * r[0] - 2.0 * r[1] + 5.0).collect();
        let m = Ridge::fit(&x, &y, 1e-9).unwrap();
        for (r, t) in x.iter().zip(&y) {
            assert!((m.predict(r) - t).abs() < 1e-6);
        }
        assert!((m.predict(&[0.0, 0.0]) - 5.0).abs() < 1e-6);
        assert!(Ridge::fit(&[], &[], 1.0).is_err());
    }

    #[test]
    fn head_features_are_the_class_differences_of_the_head() {
        let layout = compress::decoder_layout(2);
        let total: usize = layout.iter().map(|t| t.len).sum();
        let mut u = vec![0.0f32; total];
        // head.weight is [2, 16, 1, 1] then head.bias [2].
        u[total - 2] = 1.0;
        u[total - 1] = 4.0;
        u[total - 2 - 32 + 16 + 5] = 2.0; // w[1][5]
        let f = head_features(&u, 2).unwrap();
        assert_eq!(f.len(), 17);
        assert_eq!(f[5], 2.0);
        assert_eq!(f[16], 3.0);
        assert!(head_features(&u[1..], 2).is_err());
    }
}
