//! The agent through the real binary: micrographs dropped into the watched folder, some corrupt, some
//! written slowly in pieces, while the agent runs; then SIGTERM.
//!
//! The model here has random weights (its masks are arbitrary but valid); the shipped `grains` model's
//! features are checked against the generator's truth in `agent_grains_model.rs`.

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use microfed_e2e::{AgentProcess, journal_entries, synth_png, wait_until, write_test_model};

/// A config for a test folder: small tiles so the CPU work stays small, a short settle time.
fn write_config(root: &Path, settle_ms: u64) -> std::path::PathBuf {
    write_test_model(&root.join("model.onnx"), 2, 7);
    let text = format!(
        "[folders]\nwatch = \"in\"\noutput = \"out\"\nquarantine = \"q\"\n\
         [model]\npath = \"model.onnx\"\nreload_on_change = false\nthreads = 1\n\
         [[model.classes]]\nindex = 0\nname = \"grain interior\"\ncolor = [70, 70, 70]\n\
         [[model.classes]]\nindex = 1\nname = \"grain boundary\"\ncolor = [255, 214, 0]\n\
         [tiling]\ntile = 64\noverlap = 16\n[capture]\nsettle_ms = {settle_ms}\n[status]\ninterval_s = 1\n"
    );
    let path = root.join("agent.toml");
    std::fs::write(&path, text).unwrap();
    std::fs::create_dir_all(root.join("in")).unwrap();
    path
}

fn files_with_suffix(dir: &Path, suffix: &str) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(suffix))
        .collect();
    v.sort();
    v
}

#[test]
fn twenty_captures_two_corrupt_two_slow_all_accounted_for() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let settle_ms = 600;
    let config = write_config(root, settle_ms);
    let inbox = root.join("in");
    let mut agent = AgentProcess::start(&config, &root.join("agent.log"));
    assert!(
        wait_until(Duration::from_secs(30), || agent
            .log()
            .contains("watching for micrographs")),
        "agent did not start:\n{}",
        agent.log()
    );

    // Two written slowly: 6 pieces, 150 ms apart (less than the settle time between pieces, more in
    // total), with sizes that differ from the others so their masks can be checked.
    let slow: Vec<_> = (0..2u64)
        .map(|i| {
            let path = inbox.join(format!("slow{i}.png"));
            let bytes = synth_png(80 + 16 * i as u32, 3, 100 + i);
            std::thread::spawn(move || {
                let mut f = std::fs::File::create(&path).unwrap();
                for chunk in bytes.chunks(bytes.len().div_ceil(6)) {
                    f.write_all(chunk).unwrap();
                    f.flush().unwrap();
                    std::thread::sleep(Duration::from_millis(150));
                }
            })
        })
        .collect();
    // Sixteen good micrographs.
    for i in 0..16 {
        std::fs::write(inbox.join(format!("img{i:02}.png")), synth_png(64, 3, i)).unwrap();
    }
    // Two corrupt: a truncated PNG and garbage with a .png name.
    let good = synth_png(64, 3, 50);
    std::fs::write(inbox.join("truncated.png"), &good[..good.len() / 2]).unwrap();
    std::fs::write(inbox.join("garbage.png"), b"this is not an image at all").unwrap();
    // Names that must be ignored.
    std::fs::write(inbox.join(".hidden.png"), &good).unwrap();
    std::fs::write(inbox.join("upload.png.part"), &good).unwrap();
    std::fs::write(inbox.join("notes.txt"), b"stage tilt 0").unwrap();
    for t in slow {
        t.join().unwrap();
    }

    let journal = root.join("out/journal.jsonl");
    let done = wait_until(Duration::from_secs(90), || {
        journal_entries(&journal).len() >= 20
    });
    // Let a status line and any (wrong) extra processing happen before stopping.
    std::thread::sleep(Duration::from_millis(1200));
    agent.terminate();
    let status = agent.wait(Duration::from_secs(30));
    let log = agent.log();
    assert!(done, "journal incomplete; log:\n{log}");
    assert!(status.success(), "exit status {status}; log:\n{log}");
    assert!(log.contains("status"), "no status line:\n{log}");

    // Journal: exactly one entry per file, 18 segmented, 2 quarantined.
    let entries = journal_entries(&journal);
    assert_eq!(entries.len(), 20, "{entries:#?}");
    let mut names: Vec<&str> = entries
        .iter()
        .map(|e| e["file"].as_str().unwrap())
        .collect();
    names.sort();
    names.dedup();
    assert_eq!(names.len(), 20, "a file was journalled twice");
    let outcome = |o: &str| entries.iter().filter(|e| e["outcome"] == o).count();
    assert_eq!((outcome("segmented"), outcome("quarantined")), (18, 2));

    // 18 masks, overlays and features; the masks decode at the image size.
    let out = root.join("out");
    let masks = files_with_suffix(&out, ".mask.png");
    assert_eq!(masks.len(), 18, "{masks:?}");
    assert_eq!(files_with_suffix(&out, ".overlay.png").len(), 18);
    assert_eq!(files_with_suffix(&out, ".features.json").len(), 18);
    for m in &masks {
        let mask = microfed::mask::Mask::load(&out.join(m)).unwrap();
        let side = match m.as_str() {
            "slow0.mask.png" => 80,
            "slow1.mask.png" => 96,
            _ => 64,
        };
        assert_eq!((mask.width, mask.height), (side, side), "{m}");
        assert!(mask.data.iter().all(|&v| v < 2), "{m}: class out of range");
        let stem = m.trim_end_matches(".mask.png");
        let json: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(out.join(format!("{stem}.features.json"))).unwrap(),
        )
        .unwrap();
        assert_eq!(json["kind"], "grains", "{stem}");
        assert_eq!(json["width"], side);
    }
    let csv = std::fs::read_to_string(out.join("features.csv")).unwrap();
    let lines: Vec<&str> = csv.lines().collect();
    assert!(lines[0].starts_with("source,kind,"), "{}", lines[0]);
    assert_eq!(lines.len(), 19, "header + 18 rows:\n{csv}");
    assert!(
        lines[1..].iter().all(|l| !l.starts_with("source,")),
        "header twice"
    );
    assert!(
        files_with_suffix(&out, ".tmp").is_empty(),
        "temporary files left behind"
    );

    // The two corrupt files are quarantined with their reasons; the ignored names are untouched.
    let q = root.join("q");
    assert_eq!(
        files_with_suffix(&q, ".png"),
        ["garbage.png", "truncated.png"]
    );
    let why = |n: &str| std::fs::read_to_string(q.join(format!("{n}.error.txt"))).unwrap();
    assert!(
        why("garbage.png").contains("Invalid PNG signature"),
        "{}",
        why("garbage.png")
    );
    assert!(
        why("truncated.png").contains("truncated or corrupt"),
        "{}",
        why("truncated.png")
    );
    for name in [".hidden.png", "upload.png.part", "notes.txt"] {
        assert!(inbox.join(name).exists(), "{name} was touched");
    }
    assert!(!out.join(".hidden.mask.png").exists() && !out.join("upload.mask.png").exists());
}
