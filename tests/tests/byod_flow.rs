//! Bring your own data, the whole flow through the real binary: a lab's folder with colour masks
//! (`train/` + `train_annot/`) → `dataset import` → `dataset check` → `finetune` (tiny) from the
//! shipped precipitates model folder → `segment --model FOLDER` → `eval --pred` on what segment wrote.

use std::path::{Path, PathBuf};

use microfed_e2e::{microfed, synth_labelled};

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// `microfed synth` of a precipitates dataset into `out`.
fn synth_precipitates(out: &Path, style: &str, count: u32, size: u32, seed: u64) {
    synth_labelled(out, "precipitates", style, count, size, seed);
}

#[test]
fn import_check_finetune_segment_eval() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let s = |p: &Path| p.display().to_string();

    // A lab's folder: synthetic precipitates, masks saved as colour overlays in train_annot/.
    let synth = root.join("synth");
    synth_precipitates(&synth, "sem-bse", 4, 96, 11);
    let lab = root.join("lab");
    std::fs::create_dir_all(lab.join("train")).unwrap();
    std::fs::create_dir_all(lab.join("train_annot")).unwrap();
    let classes = microfed::classes::DatasetManifest::load(&synth.join("dataset.toml")).unwrap();
    for entry in std::fs::read_dir(synth.join("masks")).unwrap() {
        let mask_path = entry.unwrap().path();
        let name = mask_path.file_name().unwrap().to_owned();
        let mask = microfed::mask::Mask::load(&mask_path).unwrap();
        mask.to_color(&classes.classes)
            .save(lab.join("train_annot").join(&name))
            .unwrap();
        std::fs::copy(
            synth.join("images").join(&name),
            lab.join("train").join(&name),
        )
        .unwrap();
    }
    let classes_file = root.join("classes.toml");
    classes.save(&classes_file).unwrap();

    let data = root.join("data");
    let o = microfed(
        &[
            "dataset",
            "import",
            &s(&lab),
            "--classes",
            &s(&classes_file),
            "--out",
            &s(&data),
        ],
        true,
    );
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("4 image/mask pair(s) imported"), "{out}");
    assert!(out.contains("colours mapped to classes"), "{out}");
    microfed(&["dataset", "check", &s(&data)], true);

    let model = root.join("model");
    let base = repo_root().join("models/precipitates");
    let o = microfed(
        &[
            "finetune",
            "--data",
            &s(&data),
            "--from",
            &s(&base),
            "--out",
            &s(&model),
            "--epochs",
            "1",
            "--steps-per-epoch",
            "2",
            "--crop",
            "64",
            "--batch",
            "2",
            "--val-fraction",
            "0.25",
        ],
        true,
    );
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("decoder only"), "{out}");
    assert!(
        out.contains("| base |") && out.contains("| fine-tuned |"),
        "{out}"
    );
    for f in [
        "model.onnx",
        "manifest.toml",
        "MODEL_CARD.md",
        "finetune.json",
    ] {
        assert!(model.join(f).is_file(), "{f}");
    }
    let card = std::fs::read_to_string(model.join("MODEL_CARD.md")).unwrap();
    assert!(card.contains("Recommendation"), "{card}");

    let seg = root.join("segmented");
    microfed(
        &[
            "segment",
            &s(&data.join("images")),
            "--model",
            &s(&model),
            "--out",
            &s(&seg),
            "--tile",
            "96",
            "--threads",
            "1",
        ],
        true,
    );
    let o = microfed(&["eval", "--pred", &s(&seg), "--truth", &s(&data)], true);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("4 image(s)") && out.contains("mean IoU"),
        "{out}"
    );
}

/// A fine-tune that makes the model worse (one AdamW step at a rate of 0.5 scrambles the decoder)
/// is not passed off as an improvement: the command says so, finetune.json recommends the base
/// model and says `better_than_base: false`, and the model card says to keep the base.
#[test]
fn a_finetune_that_does_not_help_says_so_and_recommends_the_base() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let s = |p: &Path| p.display().to_string();
    let data = root.join("data");
    synth_precipitates(&data, "sem-bse", 4, 96, 12);
    let base = repo_root().join("models/precipitates");
    let model = root.join("model");
    let o = microfed(
        &[
            "finetune",
            "--data",
            &s(&data),
            "--from",
            &s(&base),
            "--out",
            &s(&model),
            "--epochs",
            "1",
            "--steps-per-epoch",
            "1",
            "--crop",
            "64",
            "--batch",
            "2",
            "--lr",
            "0.5",
            "--val-fraction",
            "0.5",
        ],
        true,
    );
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("NOT better than the base"), "{out}");
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(model.join("finetune.json")).unwrap()).unwrap();
    assert_eq!(json["better_than_base"], false, "{json}");
    assert_eq!(json["recommended"], s(&base), "{json}");
    let card = std::fs::read_to_string(model.join("MODEL_CARD.md")).unwrap();
    assert!(card.contains("NOT better"), "{card}");
}

/// A lab whose classes differ from the base model's (three precipitate classes on the two-class
/// grains model): finetune trains a new head on the base model's encoder and decoder, says so,
/// makes no before/after claim, and the model it writes segments into the lab's three classes.
#[test]
fn finetune_on_other_classes_trains_a_new_head() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let s = |p: &Path| p.display().to_string();
    let data = root.join("data");
    synth_precipitates(&data, "sem-se", 3, 96, 13);
    let model = root.join("model");
    let o = microfed(
        &[
            "finetune",
            "--data",
            &s(&data),
            "--from",
            &s(&repo_root().join("models/grains")),
            "--out",
            &s(&model),
            "--epochs",
            "1",
            "--steps-per-epoch",
            "1",
            "--crop",
            "64",
            "--batch",
            "2",
        ],
        true,
    );
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("new head: the base model predicts 2 classes, the data has 3"),
        "{out}"
    );
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(model.join("finetune.json")).unwrap()).unwrap();
    assert!(json["better_than_base"].is_null(), "{json}");
    let manifest =
        microfed::model::manifest::ModelManifest::load(&model.join("manifest.toml")).unwrap();
    assert_eq!(manifest.classes.len(), 3);
    let seg = root.join("segmented");
    microfed(
        &[
            "segment",
            &s(&data.join("images")),
            "--model",
            &s(&model),
            "--out",
            &s(&seg),
            "--threads",
            "1",
        ],
        true,
    );
    let o = microfed(&["eval", "--pred", &s(&seg), "--truth", &s(&data)], true);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("3 image(s)"), "{out}");
}
