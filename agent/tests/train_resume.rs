//! A real interruption: `microfed pretrain` is killed with SIGKILL once its epoch-1 checkpoint exists,
//! started again with the same command, and must run epoch 2 only and finish the model.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use microfed::synth::{OutputFormat, Structure, Style, SynthParams, write_dataset};
use microfed::train::Checkpoint;

fn pretrain(data: &Path, out: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_microfed"));
    cmd.args(["--log-format", "json", "pretrain", "--data"])
        .arg(data)
        .arg("--out")
        .arg(out)
        .args([
            "--epochs",
            "2",
            "--batch",
            "4",
            "--crop",
            "64",
            "--steps-per-epoch",
            "10",
            "--device",
            "cpu",
            "--seed",
            "1",
        ])
        .env("RUST_LOG", "info");
    cmd
}

#[test]
fn killed_run_resumes_at_epoch_two() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let params = SynthParams::new(
        Structure::Polycrystal,
        Style::preset("sem-bse").unwrap(),
        64,
        64,
        2,
    )
    .unwrap()
    .with_feature_size(16.0)
    .unwrap();
    write_dataset(&params, 3, OutputFormat::Png, &data, None).unwrap();
    let out = tmp.path().join("model");
    let last = out.join("checkpoint/last.ckpt");

    let mut child = pretrain(&data, &out)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while !last.exists() {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "no checkpoint after 2 minutes"
        );
        if let Some(status) = child.try_wait().unwrap() {
            panic!("pretrain exited ({status}) before writing its first checkpoint");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    child.kill().unwrap(); // SIGKILL on Unix: no chance to clean up.
    child.wait().unwrap();
    let ck = Checkpoint::load(&last).unwrap();
    assert_eq!(
        ck.state.epoch, 1,
        "epoch 2 finished before the kill: the test did not interrupt anything"
    );
    assert!(!out.join("model.onnx").exists());

    let done = pretrain(&data, &out).output().unwrap();
    let log = String::from_utf8_lossy(&done.stderr);
    assert!(done.status.success(), "{log}");
    let events: Vec<serde_json::Value> = log
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let message = |e: &serde_json::Value| e["message"].as_str().unwrap_or("").to_string();
    let resumed = events
        .iter()
        .find(|e| message(e) == "resuming from the last checkpoint")
        .unwrap_or_else(|| panic!("no resume line in:\n{log}"));
    assert_eq!(resumed["epochs_done"], 1);
    let epochs: Vec<i64> = events
        .iter()
        .filter(|e| message(e) == "epoch done")
        .map(|e| e["epoch"].as_i64().unwrap())
        .collect();
    assert_eq!(epochs, vec![2], "{log}");
    assert!(out.join("model.onnx").is_file() && out.join("manifest.toml").is_file());
    let csv = std::fs::read_to_string(out.join("training_log.csv")).unwrap();
    let rows: Vec<&str> = csv.lines().skip(1).map(|l| &l[..2]).collect();
    assert_eq!(rows, vec!["1,", "2,"], "{csv}");
}
