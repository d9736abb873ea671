//! An in-process federation: the same local training, compression and aggregation code as the MQTT
//! path, without a broker, for experiments and benchmarks (`microfed experiment`).
//!
//! Each lab is a dataset folder; its labelled images are split into training and hold-out images, and
//! its encoder features cached exactly as an agent does ([`crate::federated::edge::local::FeatureCache`]). A run is a
//! [`Strategy`] plus compression and aggregation settings; every run starts from the same base model
//! and sees the same data and seeds, so runs differ only in what they are meant to compare. After
//! each round every lab's hold-out images are scored with the global decoder (for `local`, with the
//! lab's own), giving per-lab and mean IoU, Dice and boundary F1 per round, and the bytes each lab
//! sent.
//!
//! Style codes ([`crate::federated::edge::style`]): a FedAvg or FedProx run with a `style` section has every lab
//! publish its code once (subject to the privacy knobs; a lab with too few images publishes none),
//! and every lab trains with the others' codes, as the MQTT participant does with the retained codes.
//!
//! Reporting: [`summary_table`] (markdown, final round, mean ± standard deviation over seeds),
//! [`csv`] (every run, seed, round and lab) and [`learning_curves`] (a PNG chart per metric).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use microfed_kernels::Backend;
use microfed_kernels::unet::{OptimizerState, Params};

use crate::federated::compress::{self, CompressionConfig, Residual, TensorSpan};
use crate::federated::edge::cache::CachedImage;
use crate::federated::edge::local::Alignment;
pub use crate::federated::edge::local::distance;
use crate::federated::edge::local::{
    FeatureCache, HoldoutScores, LocalError, LocalOptimizer, LocalTrainer, LrSchedule, RoundPlan,
};
use crate::federated::edge::style::{
    PrivacyKnobs, RestyleConfig, RestyleTarget, StyleCode, StyleKind, seeded_rng,
};
use crate::federated::server::merge::{Accumulator, AggregationConfig, ServerOptimizer};
use crate::study::plot::{Chart, Panel, PlotError, Series};

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
    /// Style codes (FedAvg and FedProx only).
    #[serde(default)]
    pub style: Option<StyleSpec>,
    /// Feature alignment ([`LocalTrainer::set_alignment`]): every lab's batches and every scored
    /// image have their skip features moved onto one reference style: `"pooled"` (the labs' styles
    /// pooled, equal weight per lab, from their feature-stats codes) or a lab's name (that lab's
    /// style). Not with feature-stats style codes (alignment replaces their re-styling).
    #[serde(default)]
    pub align: Option<String>,
    /// Centralised only: what the pooled training matches of a federated round.
    #[serde(default)]
    pub matched: Matching,
    /// This run's own local training settings, in place of `[train]`'s (a sweep in one file).
    #[serde(default)]
    pub learning_rate: Option<f32>,
    #[serde(default)]
    pub optimizer: Option<LocalOptimizer>,
    #[serde(default)]
    pub steps_per_epoch: Option<u32>,
    #[serde(default)]
    pub schedule: Option<LrSchedule>,
    #[serde(default)]
    pub class_weighted: Option<bool>,
    #[serde(default)]
    pub keep_optimizer_state: Option<bool>,
    /// FedAvg and FedProx only: the labs share their optimiser's moments. After each round the
    /// labs' moments (AdamW's first and second, or SGD's velocity) are averaged like their
    /// decoders, weighted by samples, and every lab starts the next round from the mean (implies
    /// keeping the state across rounds). With AdamW every lab then scales its steps by one
    /// preconditioner, the pooled labs' gradient magnitudes, as centralised AdamW does; each lab's
    /// own second moment would give a lab with faint gradients full-size steps in its own
    /// direction.
    #[serde(default)]
    pub share_moments: bool,
    /// With `share_moments` and AdamW: false starts every lab's round from the shared second moment
    /// only, its first moment (the running mean of gradients, which carries the last round's
    /// direction into the next) set to zero. Default true (both moments).
    #[serde(default = "default_true")]
    pub share_first_moment: bool,
    /// What a lab would deploy (not for `local`): the global decoder fine-tuned on the lab's own
    /// training images for a few steps, kept only where the lab's validation score says it is
    /// better than the global; reported beside the global's own scores.
    #[serde(default)]
    pub personalise: Option<Personalise>,
}

/// The per-lab fine-tuning of a federated run's global decoder.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Personalise {
    /// Local steps (batches of `[train].batch`).
    pub steps: u32,
    /// Default: `[train].learning_rate` (the schedule's peak).
    #[serde(default)]
    pub learning_rate: Option<f32>,
    /// Default: the run's local optimiser. A lab may fine-tune with another one than the
    /// federation's (AdamW's per-coordinate steps where SGD's are too small on its style).
    #[serde(default)]
    pub optimizer: Option<LocalOptimizer>,
}

impl RunSpec {
    /// `[train]` with this run's own settings in place.
    pub fn train(&self, train: &TrainSpec) -> TrainSpec {
        TrainSpec {
            learning_rate: self.learning_rate.unwrap_or(train.learning_rate),
            optimizer: self.optimizer.unwrap_or(train.optimizer),
            steps_per_epoch: self.steps_per_epoch.unwrap_or(train.steps_per_epoch),
            schedule: self.schedule.unwrap_or(train.schedule),
            class_weighted: self.class_weighted.unwrap_or(train.class_weighted),
            keep_optimizer_state: self
                .keep_optimizer_state
                .unwrap_or(train.keep_optimizer_state),
            ..train.clone()
        }
    }
}

/// What centralised training matches of a federated round (both see as many samples).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Matching {
    /// As many steps as all labs together, each of one lab's batch size.
    #[default]
    Samples,
    /// As many steps as one lab, each batch as large as all labs' batches together: with one local
    /// step per round and plain SGD, FedAvg over equal labs is exactly this.
    Steps,
}

/// A run's use of style codes.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StyleSpec {
    #[serde(default)]
    pub kind: StyleKind,
    #[serde(default = "default_probability")]
    pub probability: f32,
    #[serde(default = "default_mix")]
    pub mix: f32,
    #[serde(default = "default_min_images")]
    pub min_images: u32,
    #[serde(default)]
    pub noise_sigma: f32,
    /// Fourier codes: the band radius in bins of the 128 px window (default
    /// [`crate::federated::edge::style::FOURIER_BAND`]); a wide band carries blur.
    #[serde(default)]
    pub band: Option<usize>,
    /// Which other lab's code and how often: `uniform` (default) or `balance` (see
    /// [`RestyleTarget`]).
    #[serde(default)]
    pub target: RestyleTarget,
}

fn default_true() -> bool {
    true
}
fn default_probability() -> f32 {
    RestyleConfig::default().probability
}
fn default_mix() -> f32 {
    RestyleConfig::default().mix
}
fn default_min_images() -> u32 {
    PrivacyKnobs::default().min_images
}

impl StyleSpec {
    pub fn restyle(&self) -> RestyleConfig {
        RestyleConfig {
            probability: self.probability,
            mix: self.mix,
            target: self.target,
        }
    }
    pub fn knobs(&self) -> PrivacyKnobs {
        PrivacyKnobs {
            min_images: self.min_images,
            noise_sigma: self.noise_sigma,
        }
    }
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
    /// Soft-Dice weight of the local loss (see [`LocalTrainer::set_dice_weight`]).
    #[serde(default)]
    pub dice_weight: f32,
    /// Class-weighted cross-entropy (see [`LocalTrainer::set_class_weighting`]); default true.
    #[serde(default = "default_true")]
    pub class_weighted: bool,
    /// The rate across rounds (default: `learning_rate` in every round).
    #[serde(default)]
    pub schedule: LrSchedule,
    #[serde(default)]
    pub optimizer: LocalOptimizer,
    /// Each seed redraws which of a lab's labelled images train and which validate (same counts);
    /// default: one split for every seed.
    #[serde(default)]
    pub resplit: bool,
    /// Rounds between two checkpoints (default 1: every round): only a checkpoint's decoder can be
    /// a lab's best-validation pick, and test sets are scored only there (round 0 and the last
    /// round are always checkpoints). Scoring every test image every round is most of a round's
    /// time on a CPU.
    #[serde(default = "default_checkpoint_every")]
    pub checkpoint_every: u64,
    /// Each lab's (and the pooled trainer's) optimiser keeps its moments from round to round
    /// instead of starting afresh every round (see
    /// [`LocalTrainer::set_keep_optimizer_state`]); default false.
    #[serde(default)]
    pub keep_optimizer_state: bool,
}

fn default_checkpoint_every() -> u64 {
    1
}

/// IoU of one decoder on the test sets, from one lab's point of view: T1 its own style's test
/// images, T2 the mean over the other labs' styles, T3 the mean over styles nobody trained on.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct TestScores {
    pub t1: Option<f64>,
    pub t2: Option<f64>,
    pub t3: Option<f64>,
}

impl TestScores {
    pub fn get(&self, which: usize) -> Option<f64> {
        match which {
            0 => self.t1,
            1 => self.t2,
            _ => self.t3,
        }
    }
}

/// Which decoder of a run a lab's reported test scores belong to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Selection {
    /// The last round's.
    Final,
    /// The checkpoint with the lab's best validation IoU (earliest of ties).
    BestValidation,
    /// The last round's global, or its personalised fine-tune where validation prefers it.
    FinalPersonalised,
    /// The best-validation round's global, or its personalised fine-tune where validation
    /// prefers it.
    BestValidationPersonalised,
}

/// One lab's reported decoder of a run.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Pick {
    pub lab: usize,
    pub selection: Selection,
    pub round: u64,
    /// Validation IoU of the picked decoder.
    pub validation: Option<f64>,
    pub tests: TestScores,
    /// The personalised fine-tune won on validation (personalised selections only).
    #[serde(default)]
    pub personalised: bool,
}

/// One round's outcome in one run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoundRecord {
    pub round: u64,
    /// Mean IoU on each lab's hold-out images.
    pub lab_iou: Vec<Option<f64>>,
    /// Mean over labs.
    pub mean_iou: Option<f64>,
    /// Mean Dice (over classes) on each lab's hold-out images.
    #[serde(default)]
    pub lab_dice: Vec<Option<f64>>,
    /// Boundary F1 (2 px tolerance) on each lab's hold-out images.
    #[serde(default)]
    pub lab_boundary_f1: Vec<Option<f64>>,
    /// Bytes each lab sent this round (compressed update).
    pub bytes: Vec<usize>,
    pub train_loss: Vec<f32>,
    /// The round's local learning rate (after the schedule).
    #[serde(default)]
    pub learning_rate: f32,
    /// L2 norm of each lab's update (local − its start), before compression; centralised: the
    /// pooled update's, under every lab.
    #[serde(default)]
    pub update_norm: Vec<f32>,
    /// Per lab: IoU of each class, and the fractions of hold-out pixels predicted as / labelled
    /// with each class.
    #[serde(default)]
    pub lab_class_iou: Vec<Vec<Option<f64>>>,
    #[serde(default)]
    pub lab_pred_fraction: Vec<Vec<f64>>,
    #[serde(default)]
    pub lab_truth_fraction: Vec<Vec<f64>>,
    /// Per lab, its decoder's test scores; only where test sets are configured, and only in
    /// rounds that can be reported: round 0, the last round and checkpoints where the lab's
    /// validation IoU reached a new best (otherwise all None).
    #[serde(default)]
    pub lab_tests: Vec<TestScores>,
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
    /// Labs whose style code the others trained with (empty without style codes).
    #[serde(default)]
    pub style_codes: Vec<String>,
    /// Wall time of the run.
    #[serde(default)]
    pub seconds: f64,
    /// Per lab, the decoders reported on the test sets (empty without test sets).
    #[serde(default)]
    pub picks: Vec<Pick>,
}

impl RunResult {
    /// Lab `lab`'s pick of kind `selection`.
    pub fn pick(&self, lab: usize, selection: Selection) -> Option<&Pick> {
        self.picks
            .iter()
            .find(|p| p.lab == lab && p.selection == selection)
    }
}

impl RoundRecord {
    fn new(
        round: u64,
        scores: &[Option<HoldoutScores>],
        bytes: Vec<usize>,
        loss: Vec<f32>,
    ) -> Self {
        let pick = |f: fn(&HoldoutScores) -> Option<f64>| -> Vec<Option<f64>> {
            scores.iter().map(|s| s.as_ref().and_then(f)).collect()
        };
        let lab_iou = pick(|s| s.iou);
        let each = |f: fn(&HoldoutScores) -> Vec<f64>| -> Vec<Vec<f64>> {
            scores
                .iter()
                .map(|s| s.as_ref().map(f).unwrap_or_default())
                .collect()
        };
        Self {
            round,
            mean_iou: mean(&lab_iou),
            lab_iou,
            lab_dice: pick(|s| s.dice),
            lab_boundary_f1: pick(|s| s.boundary_f1),
            bytes,
            train_loss: loss,
            learning_rate: 0.0,
            update_norm: Vec::new(),
            lab_class_iou: scores
                .iter()
                .map(|s| s.as_ref().map(|s| s.class_iou.clone()).unwrap_or_default())
                .collect(),
            lab_pred_fraction: each(|s| s.pred_fraction.clone()),
            lab_truth_fraction: each(|s| s.truth_fraction.clone()),
            lab_tests: vec![TestScores::default(); scores.len()],
        }
    }
}

/// A lab in the experiment: its name, its cached features (training and validation images) and
/// its own style's test images (T1; never trained on, never used to pick a round).
#[derive(Debug, Clone)]
pub struct Lab {
    pub name: String,
    pub cache: FeatureCache,
    pub tests: Vec<CachedImage>,
}

/// Test images of a style no lab trains on (T3).
#[derive(Debug, Clone)]
pub struct TestSet {
    pub name: String,
    pub images: Vec<CachedImage>,
}

/// `labs` with each lab's training and validation images redrawn from `seed` (same counts).
fn resplit(labs: &[Lab], seed: u64) -> Vec<Lab> {
    use rand::SeedableRng;
    use rand::seq::SliceRandom;
    labs.iter()
        .enumerate()
        .map(|(i, lab)| {
            let mut all: Vec<CachedImage> = lab
                .cache
                .train
                .iter()
                .chain(&lab.cache.holdout)
                .cloned()
                .collect();
            // Sorted first: the draw depends on the seed only, not on the cache's order.
            all.sort_by(|a, b| a.stem.cmp(&b.stem));
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(
                seed.wrapping_mul(0x2545_f491_4f6c_dd1d) ^ i as u64,
            );
            all.shuffle(&mut rng);
            let holdout = all.split_off(lab.cache.train.len());
            Lab {
                cache: FeatureCache {
                    train: all,
                    holdout,
                    ..lab.cache.clone()
                },
                ..lab.clone()
            }
        })
        .collect()
}

/// Test IoU of one decoder: per lab's own test set, and per unseen style.
type TestIous = (Vec<Option<f64>>, Vec<Option<f64>>);

/// IoU of `decoder` on each lab's test images and on each unseen style's.
fn test_ious<B: Backend>(
    scorer: &mut LocalTrainer<B>,
    decoder: &[f32],
    labs: &[Lab],
    unseen: &[TestSet],
) -> Result<TestIous, LocalError> {
    let mut one = |images: &[CachedImage]| -> Result<Option<f64>, LocalError> {
        Ok(scorer.scores_on(decoder, images)?.and_then(|s| s.iou))
    };
    let own = labs
        .iter()
        .map(|l| one(&l.tests))
        .collect::<Result<Vec<_>, _>>()?;
    let other = unseen
        .iter()
        .map(|u| one(&u.images))
        .collect::<Result<Vec<_>, _>>()?;
    Ok((own, other))
}

/// Lab `lab`'s T1/T2/T3 from [`test_ious`]'s figures.
fn lab_view(lab: usize, own: &[Option<f64>], unseen: &[Option<f64>]) -> TestScores {
    let others: Vec<Option<f64>> = own
        .iter()
        .enumerate()
        .filter(|&(j, _)| j != lab)
        .map(|(_, v)| *v)
        .collect();
    TestScores {
        t1: own.get(lab).copied().flatten(),
        t2: mean(&others),
        t3: mean(unseen),
    }
}

fn mean(v: &[Option<f64>]) -> Option<f64> {
    let s: Vec<f64> = v.iter().flatten().copied().collect();
    (!s.is_empty()).then(|| s.iter().sum::<f64>() / s.len() as f64)
}

/// The reference style of a run's feature alignment: `"pooled"` or a lab's name (see
/// [`RunSpec::align`]). Codes are exact (no noise) and made from every training image of a lab.
fn alignment_reference(labs: &[Lab], reference: &str) -> Result<Alignment, LocalError> {
    let knobs = PrivacyKnobs {
        min_images: 1,
        noise_sigma: 0.0,
    };
    let code = |lab: &Lab| -> Result<StyleCode, LocalError> {
        let mut rng = seeded_rng(0);
        Ok(StyleCode::from_cache_with_band(
            &lab.cache,
            StyleKind::FeatureStats,
            &knobs,
            &lab.name,
            &mut rng,
            crate::federated::edge::style::FOURIER_BAND,
        )?)
    };
    if reference == "pooled" {
        let codes = labs.iter().map(code).collect::<Result<Vec<_>, _>>()?;
        return Alignment::pooled(&codes);
    }
    let lab = labs.iter().find(|l| l.name == reference).ok_or_else(|| {
        LocalError::Data(format!(
            "align = {reference:?}: neither \"pooled\" nor a lab's name"
        ))
    })?;
    Alignment::from_code(&code(lab)?)
}

/// Runs one configuration over `labs`, from the base model `params`; `unseen` are test sets of
/// styles no lab trains on.
pub fn run<B: Backend>(
    backend: Arc<B>,
    params: &Params,
    labs: &[Lab],
    unseen: &[TestSet],
    train: &TrainSpec,
    spec: &RunSpec,
    seed: u64,
) -> Result<RunResult, LocalError> {
    let train = &spec.train(train);
    let redrawn;
    let labs = if train.resplit {
        redrawn = resplit(labs, seed);
        redrawn.as_slice()
    } else {
        labs
    };
    let has_tests = !unseen.is_empty() || labs.iter().any(|l| !l.tests.is_empty());
    let layout: Vec<TensorSpan> = compress::decoder_layout(params.classes);
    let base = params.decoder_flat();
    let len = base.len();
    let started = std::time::Instant::now();
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
    for t in &mut trainers {
        t.set_dice_weight(train.dice_weight);
        t.set_class_weighting(train.class_weighted);
        t.set_keep_optimizer_state(train.keep_optimizer_state || spec.share_moments);
    }
    // The labs' mean optimiser state after the last round (share_moments).
    let mut shared_moments: Option<OptimizerState> = None;
    let mut style_codes = Vec::new();
    if let Some(style) = spec
        .style
        .as_ref()
        .filter(|_| matches!(spec.strategy, Strategy::FedAvg | Strategy::FedProx))
    {
        // Each lab publishes once; the noise is seeded so that runs are reproducible.
        let mut codes = Vec::new();
        for (i, lab) in labs.iter().enumerate() {
            let mut rng = seeded_rng(seed.wrapping_mul(7919) + i as u64);
            match StyleCode::from_cache_with_band(
                &lab.cache,
                style.kind,
                &style.knobs(),
                &lab.name,
                &mut rng,
                style
                    .band
                    .unwrap_or(crate::federated::edge::style::FOURIER_BAND),
            ) {
                Ok(code) => codes.push(code),
                Err(e) => tracing::warn!(lab = %lab.name, error = %e, "no style code published"),
            }
        }
        style_codes = codes.iter().map(|c| c.device.clone()).collect();
        for (t, lab) in trainers.iter_mut().zip(labs) {
            let others: Vec<StyleCode> = codes
                .iter()
                .filter(|c| c.device != lab.name)
                .cloned()
                .collect();
            t.set_styles(others, style.restyle())?;
        }
    }
    let alignment = spec
        .align
        .as_deref()
        .map(|reference| alignment_reference(labs, reference))
        .transpose()
        .map_err(|e| err(e.to_string()))?;
    for t in &mut trainers {
        t.set_alignment(alignment.clone());
    }
    // Centralised: one trainer on every lab's training images (hold-outs stay per lab).
    let mut pooled = if spec.strategy == Strategy::Centralised {
        let mut all = labs[0].cache.clone();
        all.train = labs.iter().flat_map(|l| l.cache.train.clone()).collect();
        all.holdout.clear();
        let batch = match spec.matched {
            Matching::Samples => train.batch,
            Matching::Steps => train.batch * labs.len(),
        };
        Some(
            LocalTrainer::new(
                backend.clone(),
                params,
                all,
                batch,
                train.crop,
                seed.wrapping_mul(1000) + 999,
            )
            .map(|mut t| {
                t.set_dice_weight(train.dice_weight);
                t.set_class_weighting(train.class_weighted);
                t.set_keep_optimizer_state(train.keep_optimizer_state);
                t.set_alignment(alignment.clone());
                t
            })?,
        )
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
     -> Result<Vec<Option<HoldoutScores>>, LocalError> {
        trainers
            .iter_mut()
            .zip(decoders)
            .map(|(t, d)| t.holdout_scores(d))
            .collect()
    };
    // Per lab: the best validation IoU so far, its round and (for personalisation) its decoder.
    let mut best: Vec<Option<(u64, f64)>> = vec![None; labs.len()];
    let mut best_decoder: Vec<Vec<f32>> = vec![base.clone(); labs.len()];
    let keep_best = spec.personalise.is_some() && spec.strategy != Strategy::Local;
    // Test scores of the round's decoders where a lab's validation reached a new best (and in
    // round 0 and the last round): the only rounds a report can pick.
    let mut tests = |trainers: &mut [LocalTrainer<B>],
                     record: &mut RoundRecord,
                     decoders: &[&[f32]],
                     last: bool|
     -> Result<(), LocalError> {
        let checkpoint =
            record.round == 0 || last || record.round.is_multiple_of(train.checkpoint_every.max(1));
        if !checkpoint {
            return Ok(());
        }
        let improved: Vec<bool> = (0..labs.len())
            .map(|l| {
                let v = record.lab_iou[l];
                let better = match (v, best[l]) {
                    (Some(v), Some((_, b))) => v > b,
                    (Some(_), None) => true,
                    (None, _) => false,
                };
                if let (true, Some(v)) = (better, v) {
                    best[l] = Some((record.round, v));
                    if keep_best {
                        best_decoder[l] = decoders[l].to_vec();
                    }
                }
                better || record.round == 0 || last
            })
            .collect();
        if !has_tests {
            return Ok(());
        }
        if spec.strategy == Strategy::Local {
            for (l, t) in trainers.iter_mut().enumerate() {
                if improved[l] {
                    let (own, other) = test_ious(t, decoders[l], labs, unseen)?;
                    record.lab_tests[l] = lab_view(l, &own, &other);
                }
            }
        } else if improved.iter().any(|&b| b) {
            let (own, other) = test_ious(&mut trainers[0], decoders[0], labs, unseen)?;
            for l in 0..labs.len() {
                record.lab_tests[l] = lab_view(l, &own, &other);
            }
        }
        Ok(())
    };
    let decoders0 = vec![global.as_slice(); labs.len()];
    let scores = score(&mut trainers, &decoders0)?;
    let mut record = RoundRecord::new(0, &scores, vec![0; labs.len()], vec![]);
    tests(&mut trainers, &mut record, &decoders0, train.rounds == 0)?;
    rounds.push(record);
    for round in 1..=train.rounds {
        let plan = RoundPlan {
            round,
            epochs: train.local_epochs,
            steps_per_epoch: train.steps_per_epoch,
            learning_rate: train.schedule.rate(train.learning_rate, round),
            prox_mu: if spec.strategy == Strategy::FedProx {
                spec.prox_mu
            } else {
                0.0
            },
            optimizer: train.optimizer,
        };
        let mut bytes = vec![0; labs.len()];
        let mut losses = Vec::new();
        let mut norms = vec![0.0f32; labs.len()];
        match spec.strategy {
            Strategy::Local => {
                for (i, t) in trainers.iter_mut().enumerate() {
                    let (local, loss) = t.train_round(&own[i], &plan)?;
                    norms[i] = distance(&local, &own[i]);
                    own[i] = local;
                    losses.push(loss);
                }
            }
            Strategy::Centralised => {
                if let Some(p) = pooled.as_mut() {
                    let plan = match spec.matched {
                        // As many steps as all labs together take in a federated round.
                        Matching::Samples => RoundPlan {
                            steps_per_epoch: plan.steps_per_epoch * labs.len() as u32,
                            ..plan
                        },
                        // One lab's steps, of all labs' batches at once.
                        Matching::Steps => plan,
                    };
                    let (local, loss) = p.train_round(&global, &plan)?;
                    norms.fill(distance(&local, &global));
                    global = local;
                    losses.push(loss);
                }
            }
            Strategy::FedAvg | Strategy::FedProx => {
                let mut acc =
                    Accumulator::new(len, &spec.aggregation).map_err(|e| err(e.to_string()))?;
                let mut moments = Vec::new();
                for (i, t) in trainers.iter_mut().enumerate() {
                    if let Some(state) = &shared_moments {
                        t.set_optimizer_state(plan.optimizer, state)?;
                    }
                    let (local, loss) = t.train_round(&global, &plan)?;
                    if spec.share_moments {
                        moments.push((t.optimizer_state()?, t.samples() as f64));
                    }
                    losses.push(loss);
                    norms[i] = distance(&local, &global);
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
                if spec.share_moments {
                    let weighted: Vec<(&OptimizerState, f64)> =
                        moments.iter().map(|(m, w)| (m, *w)).collect();
                    let mut mean = OptimizerState::weighted_mean(&weighted)?;
                    if !spec.share_first_moment {
                        mean.clear_first_moment();
                    }
                    shared_moments = Some(mean);
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
        let scores = score(&mut trainers, &decoders)?;
        let mut record = RoundRecord::new(round, &scores, bytes, losses);
        record.learning_rate = plan.learning_rate;
        record.update_norm = norms;
        tests(&mut trainers, &mut record, &decoders, round == train.rounds)?;
        tracing::info!(
            run = %spec.name,
            round,
            lr = plan.learning_rate,
            mean_iou = ?record.mean_iou,
            lab_iou = ?record.lab_iou,
            update_norm = ?record.update_norm,
            "round"
        );
        rounds.push(record);
    }
    let mut picks = Vec::new();
    if has_tests {
        let last = rounds.last().map_or(0, |r| r.round);
        for l in 0..labs.len() {
            let at = |round: u64, selection: Selection| {
                let r = &rounds[round as usize];
                Pick {
                    lab: l,
                    selection,
                    round,
                    validation: r.lab_iou[l],
                    tests: r.lab_tests[l],
                    personalised: false,
                }
            };
            let best_round = best[l].map_or(last, |(r, _)| r);
            picks.push(at(last, Selection::Final));
            picks.push(at(best_round, Selection::BestValidation));
            if let Some(p) = spec
                .personalise
                .filter(|_| spec.strategy != Strategy::Local)
            {
                let finals = [
                    (Selection::FinalPersonalised, last, global.clone()),
                    (
                        Selection::BestValidationPersonalised,
                        best_round,
                        best_decoder[l].clone(),
                    ),
                ];
                for (selection, round, decoder) in finals {
                    let plan = RoundPlan {
                        round: train.rounds + 1,
                        epochs: 1,
                        steps_per_epoch: p.steps,
                        learning_rate: p.learning_rate.unwrap_or(train.learning_rate),
                        prox_mu: 0.0,
                        optimizer: p.optimizer.unwrap_or(train.optimizer),
                    };
                    let t = &mut trainers[l];
                    let (tuned, _) = t.train_round(&decoder, &plan)?;
                    let global_val = t.holdout_iou(&decoder)?;
                    let tuned_val = t.holdout_iou(&tuned)?;
                    let take = matches!((tuned_val, global_val), (Some(a), Some(b)) if a > b);
                    let (chosen, validation) = if take {
                        (&tuned, tuned_val)
                    } else {
                        (&decoder, global_val)
                    };
                    let (own, other) = test_ious(t, chosen, labs, unseen)?;
                    picks.push(Pick {
                        lab: l,
                        selection,
                        round,
                        validation,
                        tests: lab_view(l, &own, &other),
                        personalised: take,
                    });
                }
            }
        }
    }
    Ok(RunResult {
        name: spec.name.clone(),
        strategy: spec.strategy,
        rounds,
        dense_bytes: compress::dense_len(&layout),
        style_codes,
        seconds: started.elapsed().as_secs_f64(),
        picks,
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
    /// Name of the federation: chart titles and plot files `results-<name>-<metric>.png`.
    #[serde(default = "default_name")]
    pub name: String,
    /// Folder of the plots (default: `out`).
    #[serde(default)]
    pub plots: Option<PathBuf>,
    /// Seeds; each run is repeated per seed (mean ± standard deviation reported).
    #[serde(default = "default_seeds")]
    pub seeds: Vec<u64>,
    /// A run's name: results.md adds every other run's final-round IoU minus this one's, paired
    /// by seed, with 95 % intervals.
    #[serde(default)]
    pub reference: Option<String>,
    /// Where features are cached.
    #[serde(default)]
    pub cache: Option<PathBuf>,
    /// Training device: auto, cpu, cuda.
    #[serde(default = "default_device")]
    pub device: String,
    pub labs: Vec<LabSpec>,
    /// Test sets of styles no lab trains on (T3).
    #[serde(default)]
    pub unseen: Vec<UnseenSpec>,
    pub train: TrainSpec,
    pub runs: Vec<RunSpec>,
}

/// A style nobody trains on: dataset folders whose labelled images are all test images.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UnseenSpec {
    pub name: String,
    pub data: Vec<PathBuf>,
}

fn default_name() -> String {
    "experiment".into()
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
    /// Classes (a dataset.toml) for a folder without its own, e.g. nasa-super.
    #[serde(default)]
    pub classes: Option<PathBuf>,
    /// Only these image stems (a file with one per line), e.g. one sample spot of nasa-super.
    #[serde(default)]
    pub images: Option<PathBuf>,
    /// The hold-out images (an image list); when given, `images` are all training images and
    /// `holdout_fraction` is unused (e.g. a whole sample spot held out: the 0° and 180° images of
    /// one spot are too alike to test on each other).
    #[serde(default)]
    pub holdout: Option<PathBuf>,
    #[serde(default = "default_holdout")]
    pub holdout_fraction: f64,
    /// Test images of the lab's own style (T1): dataset folders whose labelled images are all
    /// scored, never trained on and never used to pick a round. With tests, the hold-out images
    /// above are the lab's validation images.
    #[serde(default)]
    pub tests: Vec<PathBuf>,
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
        if let Some(p) = &mut c.plots {
            fix(p);
        }
        if let Some(cache) = &mut c.cache {
            fix(cache);
        }
        for l in &mut c.labs {
            fix(&mut l.data);
            if let Some(classes) = &mut l.classes {
                fix(classes);
            }
            if let Some(i) = &mut l.images {
                fix(i);
            }
            if let Some(h) = &mut l.holdout {
                fix(h);
            }
            l.tests.iter_mut().for_each(fix);
        }
        for u in &mut c.unseen {
            u.data.iter_mut().for_each(fix);
        }
        if c.labs.is_empty() || c.runs.is_empty() || c.seeds.is_empty() {
            return Err(format!(
                "{}: needs at least one lab, one run and one seed",
                path.display()
            ));
        }
        if let Some(r) = &c.reference
            && !c.runs.iter().any(|s| &s.name == r)
        {
            return Err(format!(
                "{}: reference {r:?} is not a run of the experiment",
                path.display()
            ));
        }
        c.train
            .schedule
            .validate()
            .map_err(|e| format!("{}: train.{e}", path.display()))?;
        for r in &c.runs {
            if let Some(s) = &r.schedule {
                s.validate()
                    .map_err(|e| format!("{}: run {}: {e}", path.display(), r.name))?;
            }
            r.compression
                .validate()
                .map_err(|e| format!("{}: run {}: {e}", path.display(), r.name))?;
            if let Some(p) = &r.personalise {
                if r.strategy == Strategy::Local {
                    return Err(format!(
                        "{}: run {}: personalise needs a global decoder (not strategy local)",
                        path.display(),
                        r.name
                    ));
                }
                if p.steps == 0
                    || p.learning_rate
                        .is_some_and(|lr| !(lr > 0.0 && lr.is_finite()))
                {
                    return Err(format!(
                        "{}: run {}: personalise needs steps > 0 and a positive learning_rate",
                        path.display(),
                        r.name
                    ));
                }
            }
            if let Some(style) = &r.style {
                if !matches!(r.strategy, Strategy::FedAvg | Strategy::FedProx) {
                    return Err(format!(
                        "{}: run {}: style codes need strategy fedavg or fedprox, not {:?}",
                        path.display(),
                        r.name,
                        r.strategy
                    ));
                }
                style
                    .restyle()
                    .validate()
                    .and_then(|()| style.knobs().validate())
                    .map_err(|e| format!("{}: run {}: style: {e}", path.display(), r.name))?;
            }
            if r.share_moments && !matches!(r.strategy, Strategy::FedAvg | Strategy::FedProx) {
                return Err(format!(
                    "{}: run {}: share_moments needs strategy fedavg or fedprox, not {:?}",
                    path.display(),
                    r.name,
                    r.strategy
                ));
            }
            if !r.share_first_moment
                && (!r.share_moments || r.train(&c.train).optimizer != LocalOptimizer::Adam)
            {
                return Err(format!(
                    "{}: run {}: share_first_moment = false needs share_moments and optimizer adam",
                    path.display(),
                    r.name
                ));
            }
            if let Some(reference) = &r.align {
                if reference != "pooled" && !c.labs.iter().any(|l| &l.name == reference) {
                    return Err(format!(
                        "{}: run {}: align = {reference:?}: neither \"pooled\" nor a lab's name",
                        path.display(),
                        r.name
                    ));
                }
                if r.style.is_some_and(|s| s.kind == StyleKind::FeatureStats) {
                    return Err(format!(
                        "{}: run {}: align replaces feature-stats style codes; use one of them",
                        path.display(),
                        r.name
                    ));
                }
            }
        }
        Ok(c)
    }
}

/// A hold-out score reported per lab and round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Metric {
    Iou,
    Dice,
    BoundaryF1,
}

impl Metric {
    pub const ALL: [Metric; 3] = [Metric::Iou, Metric::Dice, Metric::BoundaryF1];

    pub fn name(self) -> &'static str {
        match self {
            Metric::Iou => "IoU",
            Metric::Dice => "Dice",
            Metric::BoundaryF1 => "boundary F1",
        }
    }

    /// File-name part (`results-<federation>-<slug>.png`).
    pub fn slug(self) -> &'static str {
        match self {
            Metric::Iou => "iou",
            Metric::Dice => "dice",
            Metric::BoundaryF1 => "boundary-f1",
        }
    }

    /// Lab `lab`'s value in a round.
    pub fn of(self, r: &RoundRecord, lab: usize) -> Option<f64> {
        let v = match self {
            Metric::Iou => &r.lab_iou,
            Metric::Dice => &r.lab_dice,
            Metric::BoundaryF1 => &r.lab_boundary_f1,
        };
        v.get(lab).copied().flatten()
    }

    /// Mean over the labs that have a value.
    pub fn mean(self, r: &RoundRecord, labs: usize) -> Option<f64> {
        mean(&(0..labs).map(|l| self.of(r, l)).collect::<Vec<_>>())
    }
}

/// Mean and sample standard deviation (None when empty; sd 0 for one value).
pub fn mean_sd(v: &[f64]) -> Option<(f64, f64)> {
    if v.is_empty() {
        return None;
    }
    let m = v.iter().sum::<f64>() / v.len() as f64;
    let sd = if v.len() < 2 {
        0.0
    } else {
        (v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (v.len() - 1) as f64).sqrt()
    };
    Some((m, sd))
}

/// "m ± sd" in percent (points), "–" without values.
fn pm(v: &[f64]) -> String {
    match mean_sd(v) {
        None => "–".into(),
        Some((m, _)) if v.len() < 2 => format!("{:.1}", 100.0 * m),
        Some((m, sd)) => format!("{:.1} ± {:.1}", 100.0 * m, 100.0 * sd),
    }
}

/// Final-round values of lab `lab` (None = mean over labs) over the seeds of one run.
pub fn final_values(
    seeds: &[RunResult],
    metric: Metric,
    lab: Option<usize>,
    labs: usize,
) -> Vec<f64> {
    seeds
        .iter()
        .filter_map(|r| {
            let last = r.rounds.last()?;
            match lab {
                Some(l) => metric.of(last, l),
                None => metric.mean(last, labs),
            }
        })
        .collect()
}

/// Markdown tables of the final round, in points (×100), mean ± standard deviation over seeds:
/// per-lab IoU with the means of IoU, Dice and boundary F1 and the bytes sent, then per-lab Dice and
/// per-lab boundary F1.
pub fn summary_table(labs: &[String], results: &[Vec<RunResult>]) -> String {
    let n = labs.len();
    let mut out = String::from("| run | ");
    for l in labs {
        out += &format!("{l} IoU | ");
    }
    out +=
        "mean IoU | mean Dice | mean boundary F1 | bytes / round / device | vs dense fp32 |\n|---|";
    out += &"---|".repeat(n + 5);
    out.push('\n');
    for seeds in results {
        let Some(first) = seeds.first() else { continue };
        out += &format!("| {} | ", first.name);
        for l in 0..n {
            out += &format!("{} | ", pm(&final_values(seeds, Metric::Iou, Some(l), n)));
        }
        for m in Metric::ALL {
            out += &format!("{} | ", pm(&final_values(seeds, m, None, n)));
        }
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
    for m in [Metric::Dice, Metric::BoundaryF1] {
        out += &format!("\n{} per lab:\n\n| run | ", m.name());
        for l in labs {
            out += &format!("{l} | ");
        }
        out += "mean |\n|---|";
        out += &"---|".repeat(n + 1);
        out.push('\n');
        for seeds in results {
            let Some(first) = seeds.first() else { continue };
            out += &format!("| {} | ", first.name);
            for l in 0..n {
                out += &format!("{} | ", pm(&final_values(seeds, m, Some(l), n)));
            }
            out += &format!("{} |\n", pm(&final_values(seeds, m, None, n)));
        }
    }
    out
}

/// Two-sided 95 % quantile of Student's t with `df` degrees of freedom.
pub fn t95(df: usize) -> f64 {
    const T: [f64; 30] = [
        12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160,
        2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056,
        2.052, 2.048, 2.045, 2.042,
    ];
    match df {
        0 => f64::NAN,
        1..=30 => T[df - 1],
        _ => 1.96,
    }
}

/// Mean of paired differences and the half-width of its 95 % t interval (None: fewer than 2).
pub fn paired_interval(d: &[f64]) -> Option<(f64, Option<f64>)> {
    let (m, sd) = mean_sd(d)?;
    let half = (d.len() >= 2).then(|| t95(d.len() - 1) * sd / (d.len() as f64).sqrt());
    Some((m, half))
}

/// Paired differences in points: "mean [low, high]" with the 95 % t interval ("–" without any).
fn paired_cell(d: &[f64]) -> String {
    match paired_interval(d) {
        None => "–".to_string(),
        Some((m, None)) => format!("{:+.1}", 100.0 * m),
        Some((m, Some(h))) => format!(
            "{:+.1} [{:+.1}, {:+.1}]",
            100.0 * m,
            100.0 * (m - h),
            100.0 * (m + h)
        ),
    }
}

/// Final-round differences of every run against run `reference`, paired by seed (the runs list
/// their seeds in the same order), in points: per lab IoU and the mean IoU over labs, as
/// "mean [low, high]" with the 95 % t interval.
pub fn paired_table(labs: &[String], results: &[Vec<RunResult>], reference: usize) -> String {
    let n = labs.len();
    let Some(base) = results.get(reference).and_then(|r| r.first()) else {
        return String::new();
    };
    let mut out = format!(
        "Final-round IoU minus {}'s, paired by seed, in points: mean [95 % interval].\n\n| run | ",
        base.name
    );
    for l in labs {
        out += &format!("{l} | ");
    }
    out += "mean IoU |\n|---|";
    out += &"---|".repeat(n + 1);
    out.push('\n');
    for (i, seeds) in results.iter().enumerate() {
        let Some(first) = seeds.first() else { continue };
        if i == reference {
            continue;
        }
        out += &format!("| {} | ", first.name);
        for lab in (0..n).map(Some).chain([None]) {
            let a = final_values(seeds, Metric::Iou, lab, n);
            let b = final_values(&results[reference], Metric::Iou, lab, n);
            let d: Vec<f64> = a.iter().zip(&b).map(|(x, y)| x - y).collect();
            out += &format!("{} | ", paired_cell(&d));
        }
        out.truncate(out.trim_end().len());
        out.push('\n');
    }
    out
}

/// The rows of the test tables: a run's global (or own, for local) decoder, then the personalised
/// decoders where the run has them.
const ROWS: [(Selection, Selection, &str); 2] = [
    (Selection::Final, Selection::BestValidation, ""),
    (
        Selection::FinalPersonalised,
        Selection::BestValidationPersonalised,
        " → personalised",
    ),
];

/// Lab `lab`'s test IoU `which` (0 T1, 1 T2, 2 T3) of `selection` over the seeds of one run.
fn pick_values(seeds: &[RunResult], lab: usize, selection: Selection, which: usize) -> Vec<f64> {
    seeds
        .iter()
        .filter_map(|r| r.pick(lab, selection)?.tests.get(which))
        .collect()
}

/// Markdown tables of the test sets, per lab, in points: T1 (own style), T2 (the other labs'
/// styles, mean), T3 (styles nobody trained on, mean), for the last round and for the round of
/// the lab's best validation IoU, mean ± standard deviation over seeds; with `reference`, every
/// row minus the reference run's, paired by seed, with 95 % intervals. Empty without test sets.
pub fn test_tables(
    labs: &[String],
    results: &[Vec<RunResult>],
    reference: Option<usize>,
) -> String {
    let mut out = String::new();
    if !results.iter().flatten().any(|r| !r.picks.is_empty()) {
        return out;
    }
    let head = "| run | T1 final | T2 final | T3 final | T1 best-val | T2 best-val | T3 best-val |";
    for (l, name) in labs.iter().enumerate() {
        out += &format!(
            "\n#### {name}: test IoU in points (T1 own style, T2 other labs' styles, T3 unseen styles)\n\n\
             {head} best round | personalised kept |\n|---|---|---|---|---|---|---|---|---|\n"
        );
        for seeds in results {
            let Some(first) = seeds.first() else { continue };
            for (fin, bv, suffix) in ROWS {
                if first.pick(l, fin).is_none() {
                    continue;
                }
                out += &format!("| {}{suffix} | ", first.name);
                for sel in [fin, bv] {
                    for which in 0..3 {
                        out += &format!("{} | ", pm(&pick_values(seeds, l, sel, which)));
                    }
                }
                let rounds: Vec<f64> = seeds
                    .iter()
                    .filter_map(|r| r.pick(l, bv).map(|p| p.round as f64))
                    .collect();
                let kept = seeds
                    .iter()
                    .filter(|r| r.pick(l, bv).is_some_and(|p| p.personalised))
                    .count();
                out += &format!(
                    "{} | {} |\n",
                    mean_sd(&rounds).map_or("–".into(), |(m, _)| format!("{m:.1}")),
                    if suffix.is_empty() {
                        "–".to_string()
                    } else {
                        format!("{kept} of {}", seeds.len())
                    }
                );
            }
        }
        let Some(reference) = reference.and_then(|i| results.get(i)) else {
            continue;
        };
        let Some(base) = reference.first() else {
            continue;
        };
        out += &format!(
            "\n{name}: minus {}'s, paired by seed, in points: mean [95 % interval].\n\n{head}\n\
             |---|---|---|---|---|---|---|\n",
            base.name
        );
        for seeds in results {
            let Some(first) = seeds.first() else { continue };
            for (fin, bv, suffix) in ROWS {
                if first.pick(l, fin).is_none()
                    || (std::ptr::eq(seeds, reference) && suffix.is_empty())
                {
                    continue;
                }
                out += &format!("| {}{suffix} | ", first.name);
                for (sel, plain) in [(fin, Selection::Final), (bv, Selection::BestValidation)] {
                    for which in 0..3 {
                        let a = pick_values(seeds, l, sel, which);
                        let b = pick_values(reference, l, plain, which);
                        let d: Vec<f64> = a.iter().zip(&b).map(|(x, y)| x - y).collect();
                        out += &format!("{} | ", paired_cell(&d));
                    }
                }
                out.truncate(out.trim_end().len());
                out.push('\n');
            }
        }
    }
    out
}

/// One CSV row per run, seed, round and lab: the scores, the bytes sent, the round's learning rate,
/// the lab's update norm, the IoU of each class (`;`-separated) and the fraction of hold-out pixels
/// predicted as / labelled with the last class (the boundary class of the reference models).
/// A CSV field (RFC 4180): quoted, with quotes doubled, where it holds a comma, a quote or a line
/// break (run and lab names are free text: "FedAvg, momentum SGD 0.01").
fn csv_field(s: &str) -> std::borrow::Cow<'_, str> {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\"")).into()
    } else {
        s.into()
    }
}

pub fn csv(labs: &[String], results: &[Vec<RunResult>], seeds: &[u64]) -> String {
    let mut out = String::from(
        "run,strategy,seed,round,lab,iou,dice,boundary_f1,bytes,learning_rate,update_norm,\
         class_iou,last_class_pred_fraction,last_class_truth_fraction,test_t1,test_t2,test_t3\n",
    );
    let f = |v: Option<f64>| v.map(|v| format!("{v:.5}")).unwrap_or_default();
    for runs in results {
        for (r, seed) in runs.iter().zip(seeds) {
            for rec in &r.rounds {
                for (l, name) in labs.iter().enumerate() {
                    let classes = rec
                        .lab_class_iou
                        .get(l)
                        .map(|v| v.iter().map(|&x| f(x)).collect::<Vec<_>>().join(";"))
                        .unwrap_or_default();
                    let last = |v: &[Vec<f64>]| f(v.get(l).and_then(|x| x.last()).copied());
                    let t = rec.lab_tests.get(l).copied().unwrap_or_default();
                    out += &format!(
                        "{},{:?},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{}\n",
                        csv_field(&r.name),
                        r.strategy,
                        seed,
                        rec.round,
                        csv_field(name),
                        f(Metric::Iou.of(rec, l)),
                        f(Metric::Dice.of(rec, l)),
                        f(Metric::BoundaryF1.of(rec, l)),
                        rec.bytes.get(l).copied().unwrap_or(0),
                        rec.learning_rate,
                        f(rec.update_norm.get(l).map(|&x| f64::from(x))),
                        classes,
                        last(&rec.lab_pred_fraction),
                        last(&rec.lab_truth_fraction),
                        f(t.t1),
                        f(t.t2),
                        f(t.t3),
                    );
                }
            }
        }
    }
    out
}

/// Learning curves of one metric: a panel for the mean over labs and one per lab, one line per run
/// (mean over seeds, in points), x = round (0 = the base model).
pub fn learning_curves(
    title: &str,
    labs: &[String],
    results: &[Vec<RunResult>],
    metric: Metric,
) -> Chart {
    let n = labs.len();
    let curve = |seeds: &[RunResult], lab: Option<usize>| -> Vec<(f64, f64)> {
        let rounds = seeds.iter().map(|r| r.rounds.len()).min().unwrap_or(0);
        (0..rounds)
            .filter_map(|i| {
                let v: Vec<f64> = seeds
                    .iter()
                    .filter_map(|r| {
                        let rec = &r.rounds[i];
                        match lab {
                            Some(l) => metric.of(rec, l),
                            None => metric.mean(rec, n),
                        }
                    })
                    .collect();
                mean_sd(&v).map(|(m, _)| (seeds[0].rounds[i].round as f64, 100.0 * m))
            })
            .collect()
    };
    let panel = |name: String, lab: Option<usize>| Panel {
        title: name,
        series: results
            .iter()
            .filter(|s| !s.is_empty())
            .map(|seeds| Series {
                label: seeds[0].name.clone(),
                points: curve(seeds, lab),
            })
            .collect(),
    };
    let mut panels = vec![panel("mean over labs".into(), None)];
    panels.extend(
        labs.iter()
            .enumerate()
            .map(|(l, name)| panel(name.clone(), Some(l))),
    );
    Chart {
        title: format!(
            "{title}: hold-out {} per round (mean over seeds)",
            metric.name()
        ),
        x_label: "round".into(),
        y_label: format!("{} (%)", metric.name()),
        panels,
    }
}

/// Writes the learning curves of every metric as `dir/<prefix>-<metric>.png`; returns the paths.
pub fn write_learning_curves(
    dir: &Path,
    prefix: &str,
    title: &str,
    labs: &[String],
    results: &[Vec<RunResult>],
) -> Result<Vec<PathBuf>, PlotError> {
    let mut out = Vec::new();
    for m in Metric::ALL {
        let path = dir.join(format!("{prefix}-{}.png", m.slug()));
        learning_curves(title, labs, results, m).save(&path)?;
        out.push(path);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(round: u64, iou: [f64; 2]) -> RoundRecord {
        let s = |v: f64| {
            Some(HoldoutScores {
                iou: Some(v),
                dice: Some(v + 0.1),
                boundary_f1: None,
                ..HoldoutScores::default()
            })
        };
        RoundRecord::new(round, &[s(iou[0]), s(iou[1])], vec![0, 0], vec![])
    }

    fn result(name: &str, last: [f64; 2]) -> RunResult {
        RunResult {
            name: name.into(),
            strategy: Strategy::FedAvg,
            rounds: vec![record(0, [0.5, 0.5]), record(1, last)],
            dense_bytes: 100,
            style_codes: vec![],
            seconds: 1.0,
            picks: vec![],
        }
    }

    #[test]
    fn tables_give_mean_and_sample_sd_over_seeds_in_points() {
        let labs = vec!["a".to_string(), "b".to_string()];
        // Lab a over three seeds: 0.6, 0.7, 0.8 → 70.0 ± 10.0; means over labs 0.5, 0.6, 0.7.
        let seeds = vec![
            result("x", [0.6, 0.4]),
            result("x", [0.7, 0.5]),
            result("x", [0.8, 0.6]),
        ];
        let table = summary_table(&labs, std::slice::from_ref(&seeds));
        assert!(
            table.contains("| x | 70.0 ± 10.0 | 50.0 ± 10.0 | 60.0 ± 10.0 | 70.0 ± 10.0 | – |"),
            "{table}"
        );
        let csv = csv(&labs, std::slice::from_ref(&seeds), &[1, 2, 3]);
        assert!(csv.starts_with("run,strategy,seed,round,lab,iou,dice,boundary_f1,bytes,"));
        assert!(
            csv.contains("x,FedAvg,3,1,b,0.60000,0.70000,,0,0,,,,,,,\n"),
            "{csv}"
        );
        // Free-text names are quoted: every row keeps the header's 17 columns.
        let named = vec![result("FedAvg, \"fast\" SGD", [0.6, 0.4])];
        let labs_named = vec!["hazy, target".to_string(), "b".to_string()];
        let quoted = super::csv(&labs_named, std::slice::from_ref(&named), &[1]);
        assert!(
            quoted.contains("\"FedAvg, \"\"fast\"\" SGD\",FedAvg,1,1,\"hazy, target\",0.60000,"),
            "{quoted}"
        );
        let chart = learning_curves("t", &labs, &[seeds], Metric::Iou);
        assert_eq!(chart.panels.len(), 3);
        let mean = &chart.panels[0].series[0].points;
        assert_eq!(mean.len(), 2);
        assert!((mean[0].1 - 50.0).abs() < 1e-9 && (mean[1].1 - 60.0).abs() < 1e-9);
    }

    #[test]
    fn paired_differences_have_t_intervals() {
        let labs = vec!["a".to_string(), "b".to_string()];
        let reference = vec![result("r", [0.5, 0.5]), result("r", [0.6, 0.6])];
        // Lab a: differences 0.1 and 0.3 → mean 0.2, sd 0.1414, half-width 12.706 · 0.1 = 1.2706.
        let other = vec![result("x", [0.6, 0.5]), result("x", [0.9, 0.6])];
        let (m, h) = paired_interval(&[0.1, 0.3]).unwrap();
        assert!((m - 0.2).abs() < 1e-12);
        assert!((h.unwrap() - 12.706 * 0.1).abs() < 1e-9);
        let table = paired_table(&labs, &[reference, other], 0);
        assert!(table.contains("minus r's"), "{table}");
        assert!(
            table.contains("| x | +20.0 [-107.1, +147.1] | +0.0 [+0.0, +0.0] | +10.0"),
            "{table}"
        );
        assert!((t95(4) - 2.776).abs() < 1e-9 && t95(100) == 1.96);
    }

    #[test]
    fn style_codes_need_a_federated_strategy() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("e.toml");
        let text = |strategy: &str, mix: f32| {
            format!(
                "model = \"m.onnx\"\nout = \"o\"\n[train]\nrounds = 1\nlocal_epochs = 1\n\
                 steps_per_epoch = 1\nlearning_rate = 0.01\nbatch = 1\ncrop = 16\n\
                 [[labs]]\nname = \"a\"\ndata = \"d\"\n[[runs]]\nname = \"r\"\n\
                 strategy = \"{strategy}\"\n[runs.style]\nkind = \"fourier\"\nmix = {mix}\n"
            )
        };
        std::fs::write(&path, text("fedavg", 0.5)).unwrap();
        let c = ExperimentConfig::load(&path).unwrap();
        let style = c.runs[0].style.unwrap();
        assert_eq!(
            (style.kind, style.probability, style.min_images),
            (StyleKind::Fourier, 0.5, 3)
        );
        assert_eq!(c.model, dir.path().join("m.onnx"));
        std::fs::write(&path, text("local", 0.5)).unwrap();
        let err = ExperimentConfig::load(&path).unwrap_err();
        assert!(
            err.contains("run r: style codes need strategy fedavg"),
            "{err}"
        );
        std::fs::write(&path, text("fedprox", 2.0)).unwrap();
        let err = ExperimentConfig::load(&path).unwrap_err();
        assert!(err.contains("mix"), "{err}");
    }

    /// An experiment file of one lab `a` and one run `r` whose settings are `run`.
    fn one_lab_config(run: &str) -> String {
        format!(
            "model = \"m.onnx\"\nout = \"o\"\n[train]\nrounds = 1\nlocal_epochs = 1\n\
             steps_per_epoch = 1\nlearning_rate = 0.01\nbatch = 1\ncrop = 16\n\
             [[labs]]\nname = \"a\"\ndata = \"d\"\n[[runs]]\nname = \"r\"\n{run}"
        )
    }

    #[test]
    fn an_alignment_names_pooled_or_a_lab_and_replaces_feature_codes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("e.toml");
        let text = |align: &str, style: &str| {
            one_lab_config(&format!(
                "strategy = \"local\"\nalign = \"{align}\"\n{style}"
            ))
        };
        for ok in ["pooled", "a"] {
            std::fs::write(&path, text(ok, "")).unwrap();
            let c = ExperimentConfig::load(&path).unwrap();
            assert_eq!(c.runs[0].align.as_deref(), Some(ok));
        }
        std::fs::write(&path, text("b", "")).unwrap();
        let err = ExperimentConfig::load(&path).unwrap_err();
        assert!(
            err.contains("run r: align = \"b\": neither \"pooled\" nor a lab's name"),
            "{err}"
        );
        let fed = |kind: &str| {
            text("pooled", &format!("[runs.style]\nkind = \"{kind}\"\n"))
                .replace("strategy = \"local\"", "strategy = \"fedavg\"")
        };
        std::fs::write(&path, fed("feature-stats")).unwrap();
        let err = ExperimentConfig::load(&path).unwrap_err();
        assert!(err.contains("align replaces feature-stats"), "{err}");
        std::fs::write(&path, fed("fourier")).unwrap();
        assert!(ExperimentConfig::load(&path).is_ok());
    }

    #[test]
    fn shared_moments_need_a_federated_strategy() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("e.toml");
        let text = |strategy: &str| {
            one_lab_config(&format!(
                "strategy = \"{strategy}\"\nshare_moments = true\n"
            ))
        };
        for ok in ["fedavg", "fedprox"] {
            std::fs::write(&path, text(ok)).unwrap();
            assert!(ExperimentConfig::load(&path).unwrap().runs[0].share_moments);
        }
        for bad in ["local", "centralised"] {
            std::fs::write(&path, text(bad)).unwrap();
            let err = ExperimentConfig::load(&path).unwrap_err();
            assert!(
                err.contains("run r: share_moments needs strategy fedavg or fedprox"),
                "{err}"
            );
        }
        // Only AdamW has a first moment apart from its second.
        let first = |optimizer: &str| {
            text("fedavg").replace(
                "batch = 1\n",
                &format!("batch = 1\noptimizer = \"{optimizer}\"\n"),
            ) + "share_first_moment = false\n"
        };
        std::fs::write(&path, first("adam")).unwrap();
        assert!(!ExperimentConfig::load(&path).unwrap().runs[0].share_first_moment);
        std::fs::write(&path, first("momentum")).unwrap();
        let err = ExperimentConfig::load(&path).unwrap_err();
        assert!(err.contains("share_first_moment = false needs"), "{err}");
    }
}
