//! The foundation's acceptance, through the real binary: deterministic synthesis, dataset checks on real
//! and broken data, and features and eval on what synth wrote.

use std::collections::BTreeMap;
use std::path::Path;

use microfed_e2e::{NASA_SUPER_CLASSES, microfed, nasa_super, synth_labelled};

/// Every file under `dir`, relative path → bytes.
fn tree(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, Vec<u8>>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let p = entry.unwrap().path();
            if p.is_dir() {
                walk(root, &p, out);
            } else {
                out.insert(
                    p.strip_prefix(root).unwrap().display().to_string(),
                    std::fs::read(&p).unwrap(),
                );
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

#[test]
fn synth_is_byte_identical_for_a_seed() {
    let tmp = tempfile::tempdir().unwrap();
    let run = |name: &str, seed: &str| {
        let out = tmp.path().join(name);
        microfed(
            &[
                "synth",
                "--structure",
                "polycrystal",
                "--style",
                "sem-se",
                "--count",
                "8",
                "--size",
                "512",
                "--seed",
                seed,
                "--out",
                out.to_str().unwrap(),
            ],
            true,
        );
        tree(&out)
    };
    let a = run("a", "1");
    let b = run("b", "1");
    let images = a.keys().filter(|k| k.starts_with("images/")).count();
    let masks = a.keys().filter(|k| k.starts_with("masks/")).count();
    assert_eq!(
        (images, masks),
        (8, 8),
        "8 image/mask pairs expected, files: {:?}",
        a.keys().collect::<Vec<_>>()
    );
    assert!(a.contains_key("dataset.toml"));
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    for (k, v) in &a {
        assert!(
            v == &b[k],
            "{k} differs between two runs with the same seed"
        );
    }
    // A different seed gives different images.
    let c = run("c", "2");
    let first = a.keys().find(|k| k.starts_with("images/")).unwrap();
    assert_ne!(a[first], c[first], "seed 2 drew the same image as seed 1");

    // What synth wrote is a valid dataset, and features run on its masks.
    let dir = tmp.path().join("a");
    microfed(&["dataset", "check", dir.to_str().unwrap()], true);
    let mask = dir
        .join("masks")
        .join(first.trim_start_matches("images/"))
        .with_extension("png");
    let out = microfed(
        &["features", mask.to_str().unwrap(), "--pixel-size", "0.5"],
        true,
    );
    let json: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("features prints JSON");
    assert!(
        json.to_string().contains("grains"),
        "no grain figures in {json}"
    );
}

#[test]
fn dataset_check_passes_nasa_super_and_names_a_planted_bad_mask() {
    let Some(nasa) = nasa_super() else {
        eprintln!("skipped: ../shared/data/nasa-super is absent on this machine");
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let classes = tmp.path().join("nasa-classes.toml");
    std::fs::write(&classes, NASA_SUPER_CLASSES).unwrap();
    let ok = microfed(
        &[
            "dataset",
            "check",
            nasa.to_str().unwrap(),
            "--classes",
            classes.to_str().unwrap(),
        ],
        true,
    );
    let text =
        String::from_utf8_lossy(&ok.stdout).to_string() + &String::from_utf8_lossy(&ok.stderr);
    assert!(
        text.contains("18"),
        "the check should report 18 pairs:\n{text}"
    );

    // A copy with one mask holding a class index that does not exist.
    let copy = tmp.path().join("copy");
    for sub in ["images", "masks"] {
        std::fs::create_dir_all(copy.join(sub)).unwrap();
        for e in std::fs::read_dir(nasa.join(sub)).unwrap() {
            let p = e.unwrap().path();
            std::fs::copy(&p, copy.join(sub).join(p.file_name().unwrap())).unwrap();
        }
    }
    let bad = copy.join("masks/super_spot3_0d_3.png");
    let mut mask = image::open(&bad).unwrap().to_luma8();
    mask.put_pixel(10, 20, image::Luma([7]));
    mask.save(&bad).unwrap();
    let out = microfed(
        &[
            "dataset",
            "check",
            copy.to_str().unwrap(),
            "--classes",
            classes.to_str().unwrap(),
        ],
        false,
    );
    assert!(!out.status.success(), "the check must fail on a bad mask");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        text.contains("super_spot3_0d_3.png"),
        "the failure must name the bad mask:\n{text}"
    );
    assert!(
        !text.contains("super_spot1_0d_0.png"),
        "only the bad file is a problem:\n{text}"
    );
}

#[test]
fn eval_scores_a_mask_set_against_itself_perfectly() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("d");
    synth_labelled(&out, "precipitates", "hazy", 3, 128, 4);
    let masks = out.join("masks");
    let json = tmp.path().join("eval.json");
    microfed(
        &[
            "eval",
            "--pred",
            masks.to_str().unwrap(),
            "--truth",
            masks.to_str().unwrap(),
            "--json",
            json.to_str().unwrap(),
        ],
        true,
    );
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let text = v.to_string();
    assert!(
        text.contains("mean_iou"),
        "eval JSON lacks mean_iou: {text}"
    );
    let mean_iou = v
        .pointer("/mean_iou")
        .and_then(|x| x.as_f64())
        .expect("top-level mean_iou");
    assert!(
        (mean_iou - 1.0).abs() < 1e-12,
        "identical masks must score 1, got {mean_iou}"
    );
}
