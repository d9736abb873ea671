//! `microfed demo --quick`: the README's first command, in its CI size, end to end — embedded broker,
//! aggregator and agents in one process — leaves every output it promises and a table of rounds in
//! which the global model actually advanced.

use std::path::Path;

use microfed_e2e::microfed;

/// Files in `dir` ending with `suffix` (not hidden).
fn files(dir: &Path, suffix: &str) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(suffix) && !n.starts_with('.'))
        .collect();
    v.sort();
    v
}

#[test]
fn quick_demo_runs_rounds_and_segments_every_capture() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("demo-out");
    let t0 = std::time::Instant::now();
    let run = microfed(&["demo", "--quick", "--out", out.to_str().unwrap()], true);
    eprintln!("demo --quick took {:.1} s", t0.elapsed().as_secs_f64());
    let stdout = String::from_utf8_lossy(&run.stdout);
    eprintln!("{stdout}");

    // The round table, printed as rounds close.
    assert!(
        stdout.contains(
            "| round | lab-a (hazy) IoU global→local | lab-b (sem-bse) IoU global→local |"
        ),
        "no round table header:\n{stdout}"
    );
    for r in 1..=2 {
        assert!(
            stdout.lines().any(|l| l.starts_with(&format!("| {r} | "))),
            "round {r} not printed:\n{stdout}"
        );
    }
    assert!(
        stdout.contains(&format!("{}", out.display())),
        "output folder not named"
    );

    // Every capture of every lab has a mask, an overlay and a features row.
    let mut labs = vec!["lab-a", "lab-b"];
    if out.join("lab-sem-real").is_dir() {
        labs.push("lab-sem-real");
    }
    for lab in &labs {
        let seg = out.join(lab).join("segmented");
        let captured = files(&out.join(lab).join("incoming"), ".png");
        assert!(!captured.is_empty(), "{lab}: nothing captured");
        if lab.starts_with("lab-") && *lab != "lab-sem-real" {
            assert_eq!(captured.len(), 3, "{lab}: --quick captures 3 micrographs");
        }
        let csv = std::fs::read_to_string(seg.join("features.csv"))
            .unwrap_or_else(|e| panic!("{lab}: features.csv: {e}"));
        let rows: Vec<&str> = csv.lines().skip(1).collect();
        assert_eq!(
            rows.len(),
            captured.len(),
            "{lab}: one features row per capture"
        );
        for name in &captured {
            let stem = name.trim_end_matches(".png");
            for out_file in [format!("{stem}.mask.png"), format!("{stem}.overlay.png")] {
                assert!(seg.join(&out_file).is_file(), "{lab}: {out_file} missing");
            }
            assert!(
                rows.iter().any(|r| r.contains(name.as_str())),
                "{lab}: no features row for {name}"
            );
        }
    }

    // rounds.csv: one row per round, finite IoU for both labs, the global version advancing.
    let csv = std::fs::read_to_string(out.join("rounds.csv")).unwrap();
    let mut lines = csv.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    let rows: Vec<Vec<&str>> = lines.map(|l| l.split(',').collect()).collect();
    assert_eq!(rows.len(), 2, "{csv}");
    let col = |name: &str| {
        header
            .iter()
            .position(|h| *h == name)
            .unwrap_or_else(|| panic!("rounds.csv has no {name}: {header:?}"))
    };
    let mut last_version = 0;
    for (i, r) in rows.iter().enumerate() {
        assert_eq!(r[col("round")], (i + 1).to_string());
        for lab in ["lab-a", "lab-b"] {
            for m in ["iou_global", "iou_local"] {
                let v: f64 = r[col(&format!("{lab}_{m}"))].parse().unwrap_or(f64::NAN);
                assert!(
                    v.is_finite() && (0.0..=1.0).contains(&v),
                    "round {}: {lab} {m} = {v}",
                    i + 1
                );
            }
            let bytes: u64 = r[col(&format!("{lab}_update_bytes"))].parse().unwrap();
            assert!(bytes > 0, "{lab} sent nothing in round {}", i + 1);
        }
        let version: u64 = r[col("global_version")].parse().unwrap();
        assert!(
            version > last_version,
            "global version did not advance: {csv}"
        );
        last_version = version;
    }

    // The plot and the report.
    let png = image::open(out.join("iou-per-round.png")).expect("the IoU plot is a PNG");
    assert!(png.width() > 100 && png.height() > 100);
    let report = std::fs::read_to_string(out.join("report.md")).unwrap();
    for section in [
        "## Federated rounds",
        "## Captured micrographs",
        "## Features",
        "## Files",
    ] {
        assert!(report.contains(section), "report.md lacks {section}");
    }
}

#[test]
fn demo_refuses_a_folder_that_is_not_its_own() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("thesis.tex"), b"precious").unwrap();
    let run = microfed(
        &[
            "demo",
            "--quick",
            "--no-real",
            "--out",
            tmp.path().to_str().unwrap(),
        ],
        false,
    );
    assert!(!run.status.success());
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(stderr.contains("not a previous demo's output"), "{stderr}");
    assert_eq!(
        std::fs::read(tmp.path().join("thesis.tex")).unwrap(),
        b"precious"
    );
}

/// `microfed demo --quick --secure` (issue 18): every round is merged by secure aggregation, the
/// report says so, and the aggregator's folder holds no lab's update message.
#[test]
fn quick_demo_with_secure_aggregation_completes_its_rounds() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("demo-secure");
    let t0 = std::time::Instant::now();
    let run = microfed(
        &[
            "demo",
            "--quick",
            "--secure",
            "--no-real",
            "--no-console",
            "--out",
            out.to_str().unwrap(),
        ],
        true,
    );
    eprintln!(
        "demo --quick --secure took {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    let stdout = String::from_utf8_lossy(&run.stdout);
    for r in 1..=2 {
        assert!(
            stdout.lines().any(|l| l.starts_with(&format!("| {r} | "))),
            "round {r} not printed:\n{stdout}"
        );
    }
    let report = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(
        report.contains("- secure aggregation: on:"),
        "configuration does not say secure aggregation was on:\n{report}"
    );
    assert!(
        report.contains("Secure aggregation was on: 2 of 2 rounds were merged"),
        "{report}"
    );
    let state: serde_json::Value = serde_json::from_slice(
        &std::fs::read(out.join("aggregator").join("aggregator.json")).unwrap(),
    )
    .unwrap();
    let history = state["history"].as_array().unwrap();
    assert_eq!(history.len(), 2, "{state:#}");
    for h in history {
        assert_eq!(h["secure_aggregation"], true, "{h:#}");
        assert_eq!(
            h["accepted"],
            serde_json::json!(["lab-a", "lab-b"]),
            "{h:#}"
        );
    }
    assert_eq!(state["global_version"], 2);
    for r in 1..=2 {
        assert!(!out.join("aggregator").join(format!("round-{r}")).exists());
    }
    // Round 2 merged the two labs' contributed codes (kept on their own disks, over the whole
    // update: zero off the round's shared 10 % support), and nothing else; the aggregator applied
    // their mean with the server rate the report names (1 when it names none).
    let server_rate: f32 = report
        .lines()
        .find(|l| l.starts_with("- aggregation:"))
        .and_then(|l| l.split("server rate of ").nth(1))
        .map_or(1.0, |r| r.trim().parse().expect("server rate"));
    let global = |v: u32| -> Vec<f32> {
        std::fs::read(out.join("aggregator").join(format!("global-{v}.bin")))
            .unwrap()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect()
    };
    let (g1, g2) = (global(1), global(2));
    let codes: Vec<Vec<i8>> = ["lab-a", "lab-b"]
        .iter()
        .map(|lab| {
            std::fs::read(
                out.join(lab)
                    .join("federation")
                    .join("secagg-contributed.i8"),
            )
            .unwrap()
            .into_iter()
            .map(|b| b as i8)
            .collect()
        })
        .collect();
    assert_eq!(codes[0].len(), g1.len());
    let step = 0.05f32 / 127.0;
    let mut moved = 0;
    for j in 0..g1.len() {
        let mean = (i32::from(codes[0][j]) + i32::from(codes[1][j])) as f32 * step / 2.0;
        let got = g2[j] - g1[j];
        assert!(
            (got - server_rate * mean).abs() < 1e-5,
            "coordinate {j}: {got} vs {server_rate} × {mean}"
        );
        moved += usize::from(got != 0.0);
    }
    assert!(
        moved > 0 && moved <= g1.len().div_ceil(10),
        "{moved} of {} coordinates moved: not the round's 10 % support",
        g1.len()
    );
}
