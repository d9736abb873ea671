//! The shipped `grains` model, run by `microfed segment` on synthetic micrographs of a training style
//! (sem-se) that it never saw (another seed), gives grain counts close to what the generator drew.
//!
//! Tolerances: the target of issue 15 (grain counts within 10 % of the generator's truth), per image
//! and over all images. Measured on these 4 images of 512² (seed 77) with models/grains 1.1.0:
//! - what the agent reports (the default neck rule, 0.5, which splits regions at boundary gaps):
//!   +2.8, +1.5, +3.6, +3.3 % per image (+2.7 % over all);
//! - the mask's plain 4-connected interiors (`features --neck-ratio 0`): +2.8, +0.8, +1.8, +2.9 %.
//!   Checked: never above the truth by more than 5 % (spurious boundaries in the mask would split
//!   grains).
//!
//! 1.0.0 (500 training steps) needed 30 % per image and 20 % over all: plain interiors −3 to −14 %
//! (missed boundary segments merged grains), the neck rule +6 to +19 %.

use microfed_e2e::{microfed, synth_labelled};

#[test]
fn grain_counts_from_the_shipped_model_agree_with_the_generator() {
    let model =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/grains/model.onnx");
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let out = tmp.path().join("out");
    synth_labelled(&data, "polycrystal", "sem-se", 4, 512, 77);
    microfed(
        &[
            "segment",
            "--model",
            model.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            data.join("images").to_str().unwrap(),
        ],
        true,
    );
    // The masks' plain interiors, for the spurious-boundary check.
    let plain = tmp.path().join("plain.json");
    let masks: Vec<String> = (0..4)
        .map(|i| {
            out.join(format!("polycrystal-sem-se-{i:04}.mask.png"))
                .display()
                .to_string()
        })
        .collect();
    let mut args = vec![
        "features",
        "--kind",
        "grains",
        "--neck-ratio",
        "0",
        "--json",
        plain.to_str().unwrap(),
    ];
    args.extend(masks.iter().map(String::as_str));
    microfed(&args, true);
    let plain: Vec<serde_json::Value> =
        serde_json::from_slice(&std::fs::read(&plain).unwrap()).unwrap();
    let (mut truth_total, mut measured_total) = (0i64, 0i64);
    for (i, plain) in plain.iter().enumerate() {
        let stem = format!("polycrystal-sem-se-{i:04}");
        let truth: serde_json::Value = serde_json::from_slice(
            &std::fs::read(data.join("truth").join(format!("{stem}.json"))).unwrap(),
        )
        .unwrap();
        let features: serde_json::Value = serde_json::from_slice(
            &std::fs::read(out.join(format!("{stem}.features.json"))).unwrap(),
        )
        .unwrap();
        let t = truth["grains"].as_i64().expect("truth grains");
        let m = features["grains"].as_i64().expect("measured grains");
        let p = plain["grains"].as_i64().expect("plain grains");
        let err = (m - t) as f64 / t as f64;
        let plain_err = (p - t) as f64 / t as f64;
        eprintln!(
            "{stem}: {m} grains reported ({:+.1}%), {p} plain interiors ({:+.1}%), {t} drawn",
            err * 100.0,
            plain_err * 100.0
        );
        assert!(err.abs() <= 0.10, "{stem}: {m} grains measured, {t} drawn");
        assert!(
            plain_err <= 0.05,
            "{stem}: {p} plain interiors in the mask, {t} grains drawn: spurious boundaries"
        );
        truth_total += t;
        measured_total += m;
    }
    let err = (measured_total - truth_total) as f64 / truth_total as f64;
    eprintln!(
        "all: {measured_total} measured, {truth_total} drawn ({:+.1}%)",
        err * 100.0
    );
    assert!(
        err.abs() <= 0.10,
        "over all images: {measured_total} grains measured, {truth_total} drawn"
    );
}
