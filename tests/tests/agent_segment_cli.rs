//! `microfed segment`: the agent's pipeline over files and folders, for users without a microscope.

use microfed_e2e::{journal_entries, microfed, synth_png, write_test_model};

#[test]
fn segment_writes_outputs_reports_bad_files_and_resumes_from_its_journal() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let model = root.join("model.onnx");
    write_test_model(&model, 2, 5);
    let images = root.join("images");
    std::fs::create_dir_all(&images).unwrap();
    for i in 0..3 {
        std::fs::write(
            images.join(format!("m{i}.png")),
            synth_png(64 + 16 * i as u32, 1, i),
        )
        .unwrap();
    }
    let extra = root.join("extra.png");
    std::fs::write(&extra, synth_png(100, 1, 9)).unwrap();
    let out = root.join("out");
    let args = |paths: &[&std::path::Path]| {
        let mut v: Vec<String> = vec!["segment".into()];
        v.extend(paths.iter().map(|p| p.display().to_string()));
        for a in [
            "--model",
            model.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ] {
            v.push(a.into());
        }
        v.extend(
            [
                "--tile",
                "64",
                "--overlap",
                "16",
                "--batch",
                "2",
                "--threads",
                "1",
            ]
            .map(String::from),
        );
        v
    };
    let run = |paths: &[&std::path::Path], ok: bool| {
        let a = args(paths);
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        microfed(&a, ok)
    };
    run(&[&images, &extra], true);
    for (stem, side) in [("m0", 64), ("m1", 80), ("m2", 96), ("extra", 100)] {
        let m = microfed::mask::Mask::load(&out.join(format!("{stem}.mask.png"))).unwrap();
        assert_eq!((m.width, m.height), (side, side), "{stem}");
        assert!(out.join(format!("{stem}.overlay.png")).exists());
        assert!(out.join(format!("{stem}.features.json")).exists());
    }
    assert_eq!(journal_entries(&out.join("journal.jsonl")).len(), 4);

    // A corrupt file fails the command, is named with its reason, and stays where it was; the files
    // already in the journal are skipped.
    let bad = images.join("bad.png");
    std::fs::write(&bad, b"garbage").unwrap();
    let o = run(&[&images], false);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("bad.png") && err.contains("1 of 4"), "{err}");
    assert!(bad.exists());
    assert_eq!(
        journal_entries(&out.join("journal.jsonl")).len(),
        4,
        "nothing redone"
    );
    let csv = std::fs::read_to_string(out.join("features.csv")).unwrap();
    assert_eq!(csv.lines().count(), 5, "{csv}");
}
