//! The dataset writer behind `microfed synth`: a dataset folder with images, masks, truth and
//! dataset.toml, byte-identical when made twice with the same arguments.

use std::path::Path;

use microfed::classes::DatasetManifest;
use microfed::mask::Mask;
use microfed::synth::{OutputFormat, Structure, Style, SynthParams, SynthTruth, write_dataset};

fn files(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn write_dataset_twice_gives_identical_bytes() {
    let params = SynthParams::new(
        Structure::Polycrystal,
        Style::preset("sem-se").unwrap(),
        512,
        512,
        1,
    )
    .unwrap();
    let runs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    for run in &runs {
        let summary = write_dataset(&params, 8, OutputFormat::Png, run.path(), None).unwrap();
        assert_eq!(summary.count, 8);
        assert_eq!(summary.stems.len(), 8);
    }
    let (a, b) = (runs[0].path(), runs[1].path());
    let stems: Vec<String> = (0..8)
        .map(|i| format!("polycrystal-sem-se-{i:04}"))
        .collect();
    assert_eq!(
        files(&a.join("images")),
        stems.iter().map(|s| format!("{s}.png")).collect::<Vec<_>>()
    );
    assert_eq!(files(&a.join("masks")), files(&a.join("images")));
    assert_eq!(
        files(&a.join("truth")),
        stems
            .iter()
            .map(|s| format!("{s}.json"))
            .collect::<Vec<_>>()
    );
    for sub in ["images", "masks", "truth"] {
        for name in files(&a.join(sub)) {
            let (x, y) = (
                std::fs::read(a.join(sub).join(&name)).unwrap(),
                std::fs::read(b.join(sub).join(&name)).unwrap(),
            );
            assert!(x == y, "{sub}/{name} differs between runs");
        }
    }
    for name in ["dataset.toml", "style.toml"] {
        assert_eq!(
            std::fs::read(a.join(name)).unwrap(),
            std::fs::read(b.join(name)).unwrap()
        );
    }

    // Each pair is a 512×512 image with a class-index mask of the dataset's classes, and its truth.
    let manifest = DatasetManifest::load(&a.join("dataset.toml")).unwrap();
    assert_eq!(manifest.num_classes(), 2);
    assert!(
        manifest
            .source
            .as_deref()
            .unwrap()
            .starts_with("microfed synth")
    );
    for stem in &stems {
        let img = image::open(a.join("images").join(format!("{stem}.png"))).unwrap();
        assert_eq!((img.width(), img.height()), (512, 512));
        assert!(matches!(img, image::DynamicImage::ImageLuma8(_)));
        let mask = Mask::load(&a.join("masks").join(format!("{stem}.png"))).unwrap();
        assert!(mask.histogram()[2..].iter().all(|&n| n == 0));
        let truth: SynthTruth = serde_json::from_str(
            &std::fs::read_to_string(a.join("truth").join(format!("{stem}.json"))).unwrap(),
        )
        .unwrap();
        assert_eq!((truth.width, truth.height, truth.seed), (512, 512, 1));
        assert!(truth.grains.unwrap() > 50);
    }

    // A style read back from the dataset's style.toml makes the same dataset.
    let style = Style::from_toml_file(&a.join("style.toml")).unwrap();
    assert_eq!(&style, params.style());
}
