//! Fleet installs and hard faults (issue 17), on Mosquitto over TLS with a real agent and the
//! `microfed fleet push` CLI:
//!
//! 1. The agent stops dead between a release's download and its swap (a debug build with
//!    `MICROFED_CRASH_AT=fleet-install` aborts there). It used to count the release as acted on
//!    before installing it, so after the restart the retained release was "issued before the last
//!    instruction" and dropped; now the restarted agent installs it.
//! 2. The running version's file is torn on disk while the agent is stopped: the agent starts on
//!    the previous version instead of failing, and says why.

use std::path::{Path, PathBuf};
use std::time::Duration;

use microfed::model::manifest::{ModelManifest, sha256_file};
use microfed_e2e::broker::Mosquitto;
use microfed_e2e::{AgentProcess, microfed, wait_until};

const FLEET: &str = "lab-test";

fn grains_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/grains")
}

/// A model folder: `onnx` as model.onnx with the grains manifest, its hash and `semver`.
fn model_dir(dir: &Path, onnx: &[u8], semver: &str) -> String {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("model.onnx"), onnx).unwrap();
    let mut m = ModelManifest::load(&grains_dir().join("manifest.toml")).unwrap();
    m.sha256 = sha256_file(&dir.join("model.onnx")).unwrap();
    m.version = semver.into();
    m.save(&dir.join("manifest.toml")).unwrap();
    m.sha256
}

/// The grains weights exported again under another name: a new file and version, the same masks.
fn grains_again(tag: &str) -> Vec<u8> {
    let path = grains_dir().join("model.onnx");
    let proto = microfed::model::onnx::load(&path).unwrap();
    let params = microfed::model::onnx::load_params(&proto, &path).unwrap();
    let m = microfed::model::onnx::export(&params, &vec![("name".into(), tag.into())]).unwrap();
    microfed::model::onnx::to_bytes(&m)
}

/// The device's store (`fed/models/fleet.json`).
fn store(lab: &Path) -> serde_json::Value {
    std::fs::read(lab.join("fed/models/fleet.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or(serde_json::Value::Null)
}

fn current(lab: &Path) -> String {
    store(lab)["versions"]
        .as_array()
        .and_then(|v| v.last())
        .and_then(|v| v["version"].as_str())
        .unwrap_or_default()
        .to_owned()
}

#[test]
fn a_release_cut_short_by_a_crash_installs_after_the_restart_and_a_torn_version_falls_back() {
    let broker = Mosquitto::start(&["lab-a", "fleet-manager"])
        .expect("start mosquitto (tests/run.sh installs it)");
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let v0_dir = root.join("models/v0");
    let v0 = model_dir(
        &v0_dir,
        &std::fs::read(grains_dir().join("model.onnx")).unwrap(),
        "1.0.0",
    );
    let v1_dir = root.join("models/v1");
    let v1 = model_dir(&v1_dir, &grains_again("grains-v1"), "1.1.0");
    let key_path = root.join("fleet.key");
    let out = microfed(
        &["fleet", "keygen", "--out", key_path.to_str().unwrap()],
        true,
    );
    let public = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    let (cert, mkey) = broker.client_cert("fleet-manager");
    let fleet_toml = root.join("fleet.toml");
    std::fs::write(
        &fleet_toml,
        format!(
            "fleet = \"{FLEET}\"\n[broker]\nhost = \"127.0.0.1\"\nport = {}\nkeep_alive_s = 5\n\
             [broker.tls]\nca = {:?}\ncert = {cert:?}\nkey = {mkey:?}\n",
            broker.port(),
            broker.ca_pem()
        ),
    )
    .unwrap();

    let lab = root.join("lab-a");
    microfed(
        &[
            "synth",
            "--structure",
            "polycrystal",
            "--style",
            "sem-se",
            "--count",
            "3",
            "--size",
            "64",
            "--feature-size",
            "16",
            "--seed",
            "50",
            "--out",
            lab.join("labelled").to_str().unwrap(),
        ],
        true,
    );
    let (cert, key) = broker.client_cert("lab-a");
    std::fs::create_dir_all(lab.join("in")).unwrap();
    let config = lab.join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "[folders]\nwatch = \"in\"\noutput = \"out\"\nquarantine = \"q\"\n\
             [model]\npath = {:?}\nthreads = 1\n\
             [tiling]\ntile = 64\noverlap = 16\n\
             [federation]\nfleet = \"{FLEET}\"\ndevice = \"lab-a\"\nlabelled = \"labelled\"\n\
             state = \"fed\"\ndevice_kind = \"cpu\"\nbatch = 2\ncrop = 64\n\
             [federation.broker]\nhost = \"127.0.0.1\"\nport = {}\nkeep_alive_s = 5\nack_timeout_s = 10\n\
             [federation.broker.tls]\nca = {:?}\ncert = {cert:?}\nkey = {key:?}\n\
             [federation.fleet_models]\ntrusted_keys = [\"{public}\"]\nkeep_versions = 3\n\
             holdout_margin = 0.02\n",
            v0_dir.join("model.onnx"),
            broker.port(),
            broker.ca_pem()
        ),
    )
    .unwrap();
    // A debug build stops dead at the named crash point.
    let mut agent = AgentProcess::start_with_env(
        &config,
        &lab.join("agent-1.log"),
        &[(microfed::fsio::CRASH_AT_ENV, Path::new("fleet-install"))],
    );
    assert!(
        wait_until(Duration::from_secs(120), || agent
            .log()
            .contains("connected to the broker")
            && current(&lab) == v0),
        "agent not ready:\n{}",
        agent.log()
    );

    // Push v1: the agent downloads it and dies before the swap.
    let out = microfed(
        &[
            "fleet",
            "push",
            v1_dir.to_str().unwrap(),
            "--to",
            "all",
            "--key",
            key_path.to_str().unwrap(),
            "--config",
            fleet_toml.to_str().unwrap(),
            "--quiet-s",
            "0.3",
        ],
        true,
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains(&v1));
    let died = wait_until(Duration::from_secs(60), || {
        matches!(agent.child.try_wait(), Ok(Some(_)))
    });
    assert!(died, "the crash point was not reached:\n{}", agent.log());
    assert!(
        agent.log().contains("stopping dead here"),
        "{}",
        agent.log()
    );
    let s = store(&lab);
    assert_eq!(current(&lab), v0, "not swapped before the crash: {s:#}");
    assert_eq!(s["installing"]["attempts"], 1, "{s:#}");

    // The restart: the retained release comes again and is installed.
    let log2 = lab.join("agent-2.log");
    let mut agent = AgentProcess::start(&config, &log2);
    assert!(
        // Swapped in (activated), then noted as acted on: two saves of fleet.json.
        wait_until(Duration::from_secs(120), || current(&lab) == v1
            && store(&lab)["installing"].is_null()),
        "the release was dropped after the crash: {:#}\n{}",
        store(&lab),
        agent.log()
    );
    assert!(
        agent
            .log()
            .contains("installing again a release whose install was cut short"),
        "{}",
        agent.log()
    );
    agent.terminate();
    assert!(
        agent.wait(Duration::from_secs(30)).success(),
        "{}",
        agent.log()
    );

    // The running version's file is torn while the agent is stopped.
    let v1_file = lab.join(format!("fed/models/versions/{v1}/model.onnx"));
    let bytes = std::fs::read(&v1_file).unwrap();
    std::fs::write(&v1_file, &bytes[..bytes.len() / 2]).unwrap();
    let log3 = lab.join("agent-3.log");
    let mut agent = AgentProcess::start(&config, &log3);
    assert!(
        wait_until(Duration::from_secs(120), || agent
            .log()
            .contains("connected to the broker")),
        "the agent did not start on the previous version:\n{}",
        agent.log()
    );
    let log = agent.log();
    assert!(
        log.contains("the current model version cannot run"),
        "{log}"
    );
    let s = store(&lab);
    assert_eq!(current(&lab), v0, "{s:#}");
    assert!(
        s["failed"]
            .as_array()
            .is_some_and(|f| f.iter().any(|v| v == v1.as_str())),
        "{s:#}"
    );
    // Still the previous version after the retained v1 release is seen again (acted on already).
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(current(&lab), v0, "{:#}", store(&lab));
    agent.terminate();
    assert!(
        agent.wait(Duration::from_secs(30)).success(),
        "{}",
        agent.log()
    );
}
