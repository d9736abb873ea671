//! `microfed experiment`: an in-process federation comparing strategies, compression and aggregation
//! settings on the same labs (see [`crate::study::experiment`]).

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;

use microfed_kernels::Backend;

use crate::federated::edge::local::CachedImage;
use crate::federated::edge::local::FeatureCache;
use crate::micrograph::Normalisation;
use crate::model::onnx;
use crate::model::runtime::Segmenter;
use crate::study::experiment::{self, ExperimentConfig, Lab, RunResult, TestSet};
use crate::train::backend::{OnBackend, on_backend};
use crate::train::data::{TrainingSet, read_image_list};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The experiment (TOML): base model, labs, training settings, runs to compare.
    #[arg(long, value_name = "FILE")]
    pub config: PathBuf,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let cfg = ExperimentConfig::load(&args.config).map_err(anyhow::Error::msg)?;
    let proto = onnx::load(&cfg.model)?;
    let params = onnx::load_params(&proto, &cfg.model)?;
    let model_version = crate::model::manifest::sha256_file(&cfg.model)?;
    let norm =
        crate::model::manifest::ModelManifest::load(&cfg.model.with_file_name("manifest.toml"))
            .map(|m| m.normalisation)
            .unwrap_or_else(|_| Normalisation::default());
    let segmenter = Segmenter::load(&cfg.model)?;
    let cache_dir = cfg
        .cache
        .clone()
        .unwrap_or_else(|| cfg.out.join("feature-cache"));
    // Test images: every labelled image of each folder, features cached per folder.
    let test_images = |folders: &[PathBuf],
                       classes: Option<&std::path::Path>,
                       cache: PathBuf,
                       what: &str|
     -> anyhow::Result<Vec<CachedImage>> {
        let mut images = Vec::new();
        for (i, folder) in folders.iter().enumerate() {
            let set = TrainingSet::load(std::slice::from_ref(folder), classes, None, &norm, 0.0, 7)
                .with_context(|| format!("{what}: test folder {}", folder.display()))?;
            anyhow::ensure!(
                set.classes.len() == params.classes,
                "{what}: {}: {} classes, the model predicts {}",
                folder.display(),
                set.classes.len(),
                params.classes
            );
            let c = FeatureCache::build(
                &segmenter,
                &set,
                &cache.join(format!("test-{i}")),
                &model_version,
            )?;
            images.extend(c.train);
        }
        Ok(images)
    };
    let mut unseen = Vec::new();
    for u in &cfg.unseen {
        let images = test_images(
            &u.data,
            cfg.labs.first().and_then(|l| l.classes.as_deref()),
            cache_dir.join("unseen").join(&u.name),
            &format!("unseen style {}", u.name),
        )?;
        tracing::info!(style = %u.name, test = images.len(), "unseen style ready");
        unseen.push(TestSet {
            name: u.name.clone(),
            images,
        });
    }
    let mut labs = Vec::new();
    for l in &cfg.labs {
        let list = l
            .images
            .as_ref()
            .map(|p| read_image_list(p).map(|s| (s, p.clone())))
            .transpose()?;
        let load = |list: Option<&(BTreeSet<String>, PathBuf)>, fraction: f64| {
            TrainingSet::load(
                std::slice::from_ref(&l.data),
                l.classes.as_deref(),
                list.map(|(s, p)| (s, p.as_path())),
                &norm,
                fraction,
                7,
            )
            .with_context(|| format!("lab {}", l.name))
        };
        let set = match &l.holdout {
            None => load(list.as_ref(), l.holdout_fraction)?,
            Some(path) => {
                let held = (read_image_list(path)?, path.clone());
                let mut set = load(list.as_ref(), 0.0)?;
                set.validation = load(Some(&held), 0.0)?.train;
                anyhow::ensure!(
                    set.train.iter().all(|t| !held.0.contains(&t.stem)),
                    "lab {}: {} lists training images as hold-out images",
                    l.name,
                    path.display()
                );
                set
            }
        };
        anyhow::ensure!(
            set.classes.len() == params.classes,
            "lab {}: {} classes, the model predicts {}",
            l.name,
            set.classes.len(),
            params.classes
        );
        let cache =
            FeatureCache::build(&segmenter, &set, &cache_dir.join(&l.name), &model_version)?;
        let tests = test_images(
            &l.tests,
            l.classes.as_deref(),
            cache_dir.join(&l.name),
            &format!("lab {}", l.name),
        )?;
        tracing::info!(lab = %l.name, train = cache.train.len(), holdout = cache.holdout.len(), test = tests.len(), "lab ready");
        labs.push(Lab {
            name: l.name.clone(),
            cache,
            tests,
        });
    }
    /// Every run of the configuration, each seed, on one backend.
    struct AllRuns<'a> {
        params: &'a microfed_kernels::unet::Params,
        labs: &'a [Lab],
        unseen: &'a [TestSet],
        cfg: &'a ExperimentConfig,
    }
    impl OnBackend for AllRuns<'_> {
        type Output = Result<Vec<Vec<RunResult>>, crate::federated::edge::local::LocalError>;
        fn run<B: Backend + 'static>(self, backend: Arc<B>) -> Self::Output {
            let mut results = Vec::new();
            for spec in &self.cfg.runs {
                let mut per_seed = Vec::new();
                for &seed in &self.cfg.seeds {
                    let t0 = std::time::Instant::now();
                    let r = experiment::run(
                        backend.clone(),
                        self.params,
                        self.labs,
                        self.unseen,
                        &self.cfg.train,
                        spec,
                        seed,
                    )?;
                    tracing::info!(run = %spec.name, seed, seconds = t0.elapsed().as_secs_f64(), final_mean_iou = ?r.rounds.last().and_then(|x| x.mean_iou), "run done");
                    per_seed.push(r);
                }
                results.push(per_seed);
                // The tables so far: a long grid that is stopped keeps every finished run.
                if let Err(e) = write_results(self.cfg, self.labs, &results) {
                    tracing::warn!(error = %e, "cannot write the results so far");
                }
            }
            Ok(results)
        }
    }
    let results = on_backend(
        &cfg.device,
        AllRuns {
            params: &params,
            labs: &labs,
            unseen: &unseen,
            cfg: &cfg,
        },
    )??;
    let table = write_results(&cfg, &labs, &results)?;
    println!("{table}");
    println!("results in {}", cfg.out.display());
    Ok(())
}

/// Writes results.md, results.csv, results.json and the learning curves of `results` (the runs
/// finished so far); returns the markdown tables.
fn write_results(
    cfg: &ExperimentConfig,
    labs: &[Lab],
    results: &[Vec<RunResult>],
) -> anyhow::Result<String> {
    std::fs::create_dir_all(&cfg.out).with_context(|| cfg.out.display().to_string())?;
    let names: Vec<String> = labs.iter().map(|l| l.name.clone()).collect();
    let mut table = experiment::summary_table(&names, results);
    let reference = match &cfg.reference {
        Some(r) => Some(
            cfg.runs
                .iter()
                .position(|s| &s.name == r)
                .with_context(|| format!("reference {r:?} is not a run of the experiment"))?,
        ),
        None => None,
    };
    if let Some(i) = reference {
        table += "\n";
        table += &experiment::paired_table(&names, results, i);
    }
    table += &experiment::test_tables(&names, results, reference);
    std::fs::write(cfg.out.join("results.md"), &table)?;
    std::fs::write(
        cfg.out.join("results.csv"),
        experiment::csv(&names, results, &cfg.seeds),
    )?;
    std::fs::write(
        cfg.out.join("results.json"),
        serde_json::to_vec_pretty(results)?,
    )?;
    let plots = cfg.plots.clone().unwrap_or_else(|| cfg.out.clone());
    std::fs::create_dir_all(&plots).with_context(|| plots.display().to_string())?;
    for path in experiment::write_learning_curves(
        &plots,
        &format!("results-{}", cfg.name),
        &cfg.name,
        &names,
        results,
    )? {
        tracing::info!(plot = %path.display(), "wrote learning curves");
    }
    Ok(table)
}
