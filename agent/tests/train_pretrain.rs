//! Pretraining at toy sizes: augmentation keeps image and mask aligned, samples are reproducible,
//! checkpoints round-trip and refuse damage, resume is exact, early stopping triggers, the loss falls,
//! and the exported manifest matches its model file.

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use microfed::model::manifest::ModelManifest;
use microfed::synth::{OutputFormat, Structure, Style, SynthParams, write_dataset};
use microfed::train::{
    self, Augment, Checkpoint, CheckpointError, ClassWeights, EpochRecord, TrainConfig,
    TrainingImage, TrainingSet,
};
use microfed_kernels::cpu::CpuBackend;
use microfed_kernels::unet::Params;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// A polycrystal dataset of `count` 64×64 images with small grains.
fn dataset(dir: &Path, count: u64, seed: u64) -> PathBuf {
    let params = SynthParams::new(
        Structure::Polycrystal,
        Style::preset("sem-se").unwrap(),
        64,
        64,
        seed,
    )
    .unwrap()
    .with_feature_size(16.0)
    .unwrap();
    write_dataset(&params, count, OutputFormat::Png, dir, None).unwrap();
    dir.to_owned()
}

fn tiny_config(data: PathBuf, out: PathBuf) -> TrainConfig {
    let mut cfg = TrainConfig::new(vec![data], out);
    cfg.epochs = 2;
    cfg.batch = 2;
    cfg.crop = 32;
    cfg.steps_per_epoch = Some(4);
    cfg.val_fraction = 0.25;
    cfg.seed = 3;
    cfg
}

fn cpu() -> Arc<CpuBackend> {
    Arc::new(CpuBackend::new())
}

fn go(cfg: &TrainConfig) -> train::TrainOutcome {
    train::run(cpu(), cfg, &mut |_: &EpochRecord| ControlFlow::Continue(())).unwrap()
}

/// An image whose pixel values ARE its labels, so any misalignment shows.
fn label_image(w: usize, h: usize, seed: u64) -> TrainingImage {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let labels: Vec<u8> = (0..w * h).map(|_| rng.random_range(0..3u8)).collect();
    TrainingImage {
        dataset: 0,
        stem: "labels".into(),
        width: w,
        height: h,
        pixels: labels.iter().map(|&l| f32::from(l)).collect(),
        labels,
    }
}

#[test]
fn augmentation_keeps_image_and_mask_aligned_and_ignores_padding() {
    // 40×24 image, 32 crop: full width available, 8 rows of padding in every crop.
    let img = label_image(40, 24, 1);
    let crop = 32;
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    let geometric = Augment {
        brightness: 0.0,
        contrast: 0.0,
        ..Augment::default()
    };
    for _ in 0..50 {
        let mut x = vec![0.0; crop * crop];
        let mut l = vec![0u8; crop * crop];
        geometric.sample(&img, crop, &mut rng, &mut x, &mut l);
        let ignored = l.iter().filter(|&&v| v == 255).count();
        assert_eq!(
            ignored,
            8 * crop,
            "padding must be exactly 8 rows (or columns)"
        );
        for (xi, li) in x.iter().zip(&l) {
            if *li != 255 {
                assert_eq!(*xi, f32::from(*li));
            } else {
                // Reflected context: a real pixel value, not zero-filled garbage.
                assert!([0.0, 1.0, 2.0].contains(xi));
            }
        }
    }
    // With jitter the image is one affine map of the labels: c·label + b with the same c, b.
    let mut x = vec![0.0; crop * crop];
    let mut l = vec![0u8; crop * crop];
    Augment::default().sample(&img, crop, &mut rng, &mut x, &mut l);
    let at = |v: u8| {
        l.iter()
            .position(|&li| li == v)
            .map(|i| x[i])
            .expect("label present")
    };
    let (b, c) = (at(0), at(1) - at(0));
    assert!(c != 1.0 || b != 0.0, "jitter had no effect");
    for (xi, li) in x.iter().zip(&l) {
        if *li != 255 {
            assert!((xi - (c * f32::from(*li) + b)).abs() < 1e-5);
        }
    }
}

#[test]
fn samples_are_reproducible_for_a_seed_and_differ_between_epochs() {
    let tmp = tempfile::tempdir().unwrap();
    let data = dataset(&tmp.path().join("d"), 3, 1);
    let cfg = tiny_config(data.clone(), tmp.path().join("out"));
    let set = TrainingSet::load(
        &[data],
        None,
        None,
        &Default::default(),
        cfg.val_fraction,
        cfg.seed,
    )
    .unwrap();
    let n = 4 * 32 * 32;
    let batch = |epoch: usize, first: u64| {
        let mut x = vec![0.0; n];
        let mut l = vec![0u8; n];
        train::fill_batch(&set, &cfg, epoch, first, &mut x, &mut l);
        (x, l)
    };
    assert_eq!(batch(1, 0), batch(1, 0));
    assert_ne!(batch(1, 0).0, batch(2, 0).0);
    // Sample i does not depend on which batch asks for it.
    let (a, _) = batch(1, 0);
    let (b, _) = batch(1, 2);
    assert_eq!(a[2 * 1024..], b[..2 * 1024]);
}

#[test]
fn checkpoint_round_trips_and_damage_is_reported_with_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("last.ckpt");
    let params = Params::init(3, 5).unwrap();
    let optimizer = microfed_kernels::unet::OptimizerState {
        steps: (0..params.tensors.len() as u32).collect(),
        buffers: params
            .tensors
            .iter()
            .enumerate()
            .map(|(i, t)| {
                if i % 3 == 0 {
                    vec![]
                } else {
                    vec![vec![i as f32; t.data.len()], vec![-0.5; t.data.len()]]
                }
            })
            .collect(),
    };
    let ck = Checkpoint {
        state: train::TrainState {
            epoch: 3,
            step: 120,
            best_mean_iou: Some(0.75),
            best_epoch: 2,
            epochs_without_improvement: 1,
            ..Default::default()
        },
        identity: [("seed".to_string(), "7".to_string())].into(),
        params,
        optimizer: Some(optimizer),
    };
    ck.save(&path).unwrap();
    assert_eq!(Checkpoint::load(&path).unwrap(), ck);
    assert!(!tmp.path().join("last.ckpt.tmp").exists());

    let bytes = std::fs::read(&path).unwrap();
    let check = |bytes: &[u8], want: &str| {
        std::fs::write(&path, bytes).unwrap();
        let err = Checkpoint::load(&path).unwrap_err();
        let text = err.to_string();
        assert!(text.contains(&path.display().to_string()), "{text}");
        assert!(text.contains(want), "{text}");
    };
    let mut flipped = bytes.clone();
    let last = flipped.len() - 10;
    flipped[last] ^= 0x40;
    check(&flipped, "SHA-256");
    check(&bytes[..bytes.len() - 4], "truncated");
    check(b"not a checkpoint at all", "magic");
    let mut v2 = bytes.clone();
    v2[8] = 2;
    std::fs::write(&path, &v2).unwrap();
    assert!(matches!(
        Checkpoint::load(&path),
        Err(CheckpointError::Version { found: 2, .. })
    ));
}

#[test]
fn loss_falls_and_the_manifest_matches_the_model() {
    let tmp = tempfile::tempdir().unwrap();
    let data = dataset(&tmp.path().join("d"), 4, 2);
    let out = tmp.path().join("grains");
    let mut cfg = tiny_config(data, out.clone());
    cfg.epochs = 5;
    cfg.steps_per_epoch = Some(10);
    cfg.batch = 4;
    cfg.lr = 3e-3;
    cfg.patience = None;
    let outcome = go(&cfg);
    let h = &outcome.state.history;
    assert_eq!(h.len(), 5);
    assert!(
        h[4].loss < 0.85 * h[0].loss,
        "loss did not fall: {:?}",
        h.iter().map(|r| r.loss).collect::<Vec<_>>()
    );

    let manifest_path = out.join("manifest.toml");
    let m = ModelManifest::load(&manifest_path).unwrap();
    assert_eq!(Some(&m), outcome.manifest.as_ref());
    m.verify_model(&manifest_path).unwrap();
    assert_eq!(m.name, "grains");
    assert_eq!(m.classes.len(), 2);
    assert_eq!(m.recipe.epochs_run, 5);
    assert_eq!(m.validation.images, 1);
    assert!(
        m.training.datasets[0]
            .source
            .as_deref()
            .unwrap()
            .contains("microfed synth")
    );
    let csv = std::fs::read_to_string(out.join("training_log.csv")).unwrap();
    assert_eq!(csv.lines().count(), 6, "{csv}");
    // The exported weights are the best epoch's.
    let onnx_params = microfed::model::onnx::load_params(
        &microfed::model::onnx::load(&out.join("model.onnx")).unwrap(),
        &out,
    )
    .unwrap();
    let best = Checkpoint::load(&out.join("checkpoint/best.ckpt")).unwrap();
    assert_eq!(onnx_params, best.params);
    assert_eq!(best.state.best_epoch, m.recipe.best_epoch);

    // A damaged model file or manifest field is caught, naming the file.
    std::fs::write(out.join("model.onnx"), b"tampered").unwrap();
    let err = m.verify_model(&manifest_path).unwrap_err().to_string();
    assert!(err.contains("model.onnx"), "{err}");
    let text = std::fs::read_to_string(&manifest_path)
        .unwrap()
        .replace("opset = 17", "opset = 11");
    std::fs::write(&manifest_path, text).unwrap();
    let err = ModelManifest::load(&manifest_path).unwrap_err().to_string();
    assert!(
        err.contains("manifest.toml") && err.contains("`opset`"),
        "{err}"
    );
}

#[test]
fn resume_continues_after_the_last_epoch_and_matches_an_unbroken_run() {
    let tmp = tempfile::tempdir().unwrap();
    let data = dataset(&tmp.path().join("d"), 3, 4);

    // Unbroken: 2 epochs.
    let straight = tiny_config(data.clone(), tmp.path().join("a"));
    go(&straight);

    // Broken off after epoch 1 (as if killed), then started again.
    let cfg = tiny_config(data.clone(), tmp.path().join("b"));
    let first = train::run(cpu(), &cfg, &mut |_: &EpochRecord| ControlFlow::Break(())).unwrap();
    assert_eq!(first.state.epoch, 1);
    assert!(first.manifest.is_none());
    let mut epochs_seen = Vec::new();
    let second = train::run(cpu(), &cfg, &mut |r: &EpochRecord| {
        epochs_seen.push(r.epoch);
        ControlFlow::Continue(())
    })
    .unwrap();
    assert_eq!(epochs_seen, vec![2], "a resumed run must not redo epoch 1");
    assert_eq!(second.state.history.len(), 2);
    let a = Checkpoint::load(&tmp.path().join("a/checkpoint/last.ckpt")).unwrap();
    let b = Checkpoint::load(&tmp.path().join("b/checkpoint/last.ckpt")).unwrap();
    assert_eq!(
        a.params, b.params,
        "resumed weights differ from the unbroken run"
    );
    assert_eq!(a.optimizer, b.optimizer);

    // 1 epoch, then the same folder with --epochs 2: only epoch 2 runs.
    let mut one = tiny_config(data.clone(), tmp.path().join("c"));
    one.epochs = 1;
    assert!(go(&one).manifest.is_some());
    one.epochs = 2;
    let mut seen = Vec::new();
    train::run(cpu(), &one, &mut |r: &EpochRecord| {
        seen.push(r.epoch);
        ControlFlow::Continue(())
    })
    .unwrap();
    assert_eq!(seen, vec![2]);

    // Other settings are refused; --fresh starts over.
    one.batch = 4;
    let err = train::run(
        cpu(),
        &one,
        &mut |_: &EpochRecord| ControlFlow::Continue(()),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("batch") && err.contains("--fresh"), "{err}");
    one.fresh = true;
    one.epochs = 1;
    assert_eq!(go(&one).state.history.len(), 1);
}

#[test]
fn early_stopping_ends_a_run_that_no_longer_improves() {
    let tmp = tempfile::tempdir().unwrap();
    let data = dataset(&tmp.path().join("d"), 3, 5);
    let mut cfg = tiny_config(data, tmp.path().join("out"));
    // A learning rate this small leaves every prediction unchanged: no epoch beats the first.
    cfg.lr = 1e-12;
    cfg.epochs = 6;
    cfg.patience = Some(2);
    cfg.class_weights = ClassWeights::None;
    let outcome = go(&cfg);
    assert!(outcome.state.stopped_early);
    assert_eq!(outcome.state.epoch, 3);
    let m = outcome.manifest.unwrap();
    assert_eq!(m.recipe.best_epoch, 1);
    assert_eq!(m.recipe.epochs_run, 3);
    assert!(m.recipe.stopped_early);
}

#[test]
fn bad_settings_are_refused_with_the_option_named() {
    let tmp = tempfile::tempdir().unwrap();
    let data = dataset(&tmp.path().join("d"), 2, 6);
    let mut cfg = tiny_config(data.clone(), tmp.path().join("out"));
    cfg.crop = 40;
    let err = train::run(
        cpu(),
        &cfg,
        &mut |_: &EpochRecord| ControlFlow::Continue(()),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("--crop 40"), "{err}");

    // Folders with different classes.
    let other = tmp.path().join("p");
    let params = SynthParams::new(
        Structure::Precipitates,
        Style::preset("sem-se").unwrap(),
        64,
        64,
        1,
    )
    .unwrap();
    write_dataset(&params, 2, OutputFormat::Png, &other, None).unwrap();
    let mut cfg = tiny_config(data, tmp.path().join("out2"));
    cfg.data.push(other.clone());
    let err = train::run(
        cpu(),
        &cfg,
        &mut |_: &EpochRecord| ControlFlow::Continue(()),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains(&other.display().to_string()) && err.contains("same classes"),
        "{err}"
    );
}
