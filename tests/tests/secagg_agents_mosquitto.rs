//! Secure aggregation as a mode of `microfed aggregate` and `microfed agent` (issue 18), on a real
//! Mosquitto over TLS with client certificates and the fleet's ACL: five agents, each with a device
//! key enrolled with the fleet, and the aggregator with `[secure_aggregation]`, two rounds.
//!
//! Round 1: `lab-5` is killed (SIGKILL) as soon as it has sent its signed round keys. The round still
//! finishes: the other four are in the sum, `lab-5` is a straggler, and the new global decoder is the
//! base decoder plus exactly the mean of the four survivors' contributed int8 codes (what plain FedAvg
//! with equal weights merges, within one quantisation step of their updates). None of the
//! aggregator's stored files holds a single lab's update. Round 2: the aggregator is killed while the
//! protocol runs and started again: the round is abandoned, its summary says why, and nothing of it
//! is merged (the global version stays 1).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use microfed_e2e::broker::Mosquitto;
use microfed_e2e::{AgentProcess, microfed, microfed_bin, wait_until};

const LABS: [&str; 5] = ["lab-1", "lab-2", "lab-3", "lab-4", "lab-5"];
const DROPS: &str = "lab-5";
const VALUE_CLIP: f32 = 0.05;

fn grains_model() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/grains/model.onnx")
}

fn start_aggregator(config: &Path, log: &Path) -> Child {
    Command::new(microfed_bin())
        .args(["aggregate", "--config"])
        .arg(config)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .expect("start microfed aggregate")
}

fn state(dir: &Path) -> serde_json::Value {
    std::fs::read(dir.join("aggregator.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or(serde_json::Value::Null)
}

/// Every file under `dir`, recursively.
fn all_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            all_files(&p, out);
        } else {
            out.push(p);
        }
    }
}

#[test]
fn five_agents_aggregate_securely_one_drops_after_its_keys_and_a_restart_abandons_a_round() {
    let mut names: Vec<&str> = LABS.to_vec();
    names.push("aggregator");
    let broker = Mosquitto::start(&names).expect("start mosquitto (tests/run.sh installs it)");
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let model = grains_model();

    let agg_key_path = root.join("aggregator.key");
    let agg_key = microfed::fleet::signing::SecretKey::generate();
    agg_key.save(&agg_key_path).unwrap();
    let agg_public = agg_key.public().to_hex();

    // The fleet's enrolment: one device key per lab; every lab lists every public key.
    let mut enrolled = String::new();
    for lab in LABS {
        let dir = root.join(lab);
        std::fs::create_dir_all(&dir).unwrap();
        let k = microfed::fleet::signing::SecretKey::generate();
        k.save(&dir.join("device.key")).unwrap();
        enrolled.push_str(&format!("\"{lab}\" = \"{}\"\n", k.public().to_hex()));
    }

    let mut agents = Vec::new();
    for (i, lab) in LABS.iter().enumerate() {
        let dir = root.join(lab);
        microfed(
            &[
                "synth",
                "--structure",
                "polycrystal",
                "--count",
                "4",
                "--size",
                "96",
                "--seed",
                &(60 + i).to_string(),
                "--out",
                dir.join("labelled").to_str().unwrap(),
            ],
            true,
        );
        let (cert, key) = broker.client_cert(lab);
        let toml = format!(
            "[folders]\nwatch = \"in\"\noutput = \"out\"\nquarantine = \"q\"\n\
             [model]\npath = {model:?}\nthreads = 1\n\
             [tiling]\ntile = 64\noverlap = 16\n\
             [federation]\nfleet = \"lab-test\"\ndevice = \"{lab}\"\nlabelled = \"labelled\"\n\
             state = \"fed\"\ndevice_kind = \"cpu\"\nbatch = 2\ncrop = 64\nseed = {i}\n\
             aggregator_key = \"{agg_public}\"\n\
             [federation.broker]\nhost = \"127.0.0.1\"\nport = {}\nkeep_alive_s = 5\n\
             ack_timeout_s = 10\n\
             [federation.broker.tls]\nca = {:?}\ncert = {cert:?}\nkey = {key:?}\n\
             [federation.secure_aggregation]\ndevice_key = \"device.key\"\nmin_threshold = 3\n\
             [federation.secure_aggregation.enrolled]\n{enrolled}",
            broker.port(),
            broker.ca_pem(),
        );
        std::fs::write(dir.join("agent.toml"), toml).unwrap();
        agents.push(AgentProcess::start(
            &dir.join("agent.toml"),
            &dir.join("agent.log"),
        ));
    }
    for a in &agents {
        assert!(
            wait_until(Duration::from_secs(180), || a
                .log()
                .contains("encoder features ready")
                && a.log().contains("secure aggregation on")
                && a.log().contains("connected to the broker")),
            "agent not ready:\n{}",
            a.log()
        );
    }

    let agg_dir = root.join("aggregator");
    std::fs::create_dir_all(&agg_dir).unwrap();
    let state_dir = agg_dir.join("state");
    let (cert, key) = broker.client_cert("aggregator");
    let agg_toml = agg_dir.join("aggregator.toml");
    std::fs::write(
        &agg_toml,
        format!(
            "id = \"aggregator\"\nfleet = \"lab-test\"\nmodel = {model:?}\nstate = {state_dir:?}\n\
             rounds = 2\nsigning_key = {agg_key_path:?}\n\
             devices = [\"lab-1\", \"lab-2\", \"lab-3\", \"lab-4\", \"lab-5\"]\n\
             [round]\ndeadline_s = 150.0\nlocal_epochs = 1\nsteps_per_epoch = 2\n\
             learning_rate = 0.003\n\
             [secure_aggregation]\nthreshold = 3\nstep_timeout_s = 10.0\nvalue_clip = {VALUE_CLIP}\n\
             [broker]\nhost = \"127.0.0.1\"\nport = {}\nkeep_alive_s = 5\n\
             [broker.tls]\nca = {:?}\ncert = {cert:?}\nkey = {key:?}\n",
            broker.port(),
            broker.ca_pem(),
        ),
    )
    .unwrap();
    let log1 = agg_dir.join("aggregator-1.log");
    let log2 = agg_dir.join("aggregator-2.log");
    let agg_log = || {
        std::fs::read_to_string(&log1).unwrap_or_default()
            + &std::fs::read_to_string(&log2).unwrap_or_default()
    };
    let mut agg = start_aggregator(&agg_toml, &log1);

    // lab-5 goes the moment its signed round keys are out (before its shares and masked update).
    let dropper = &mut agents[4];
    assert!(
        wait_until(Duration::from_secs(240), || dropper
            .log()
            .contains("secure aggregation: keys sent")),
        "lab-5 never sent its keys:\n{}\n{}",
        dropper.log(),
        agg_log()
    );
    dropper.child.kill().unwrap();
    dropper.child.wait().unwrap();

    // Round 1 closes without it.
    assert!(
        wait_until(Duration::from_secs(240), || state(&state_dir)["history"]
            .as_array()
            .is_some_and(|h| !h.is_empty())),
        "round 1 never closed:\n{}",
        agg_log()
    );
    let s = state(&state_dir);
    let r1 = &s["history"][0];
    assert_eq!(r1["secure_aggregation"], true, "{r1:#}");
    assert_eq!(
        r1["accepted"],
        serde_json::json!(["lab-1", "lab-2", "lab-3", "lab-4"]),
        "{r1:#}\n{}",
        agg_log()
    );
    assert_eq!(r1["stragglers"], serde_json::json!([DROPS]), "{r1:#}");
    assert_eq!(r1["global_version"], 1, "{r1:#}");
    assert!(r1.get("abandoned").is_none(), "{r1:#}");
    assert!(
        agg_log().contains("secure aggregation: the sum is unmasked"),
        "{}",
        agg_log()
    );

    // The global: the base decoder plus the mean of the survivors' contributed codes.
    let proto = microfed::model::onnx::load(&model).unwrap();
    let base = microfed::model::onnx::load_params(&proto, &model)
        .unwrap()
        .decoder_flat();
    let global1: Vec<f32> = std::fs::read(state_dir.join("global-1.bin"))
        .unwrap()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    assert_eq!(global1.len(), base.len());
    let step = VALUE_CLIP / 127.0;
    let survivors = &LABS[..4];
    let codes: Vec<Vec<i8>> = survivors
        .iter()
        .map(|lab| {
            let path = root.join(lab).join("fed").join("secagg-contributed.i8");
            std::fs::read(&path)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
                .into_iter()
                .map(|b| b as i8)
                .collect()
        })
        .collect();
    let mut worst = 0f32;
    let mut moved = 0usize;
    for j in 0..base.len() {
        let sum: i32 = codes.iter().map(|c| i32::from(c[j])).sum();
        let mean = sum as f32 * step / 4.0;
        let got = global1[j] - base[j];
        worst = worst.max((got - mean).abs());
        moved += usize::from(sum != 0);
    }
    // f32 rounding only (the decoder's weights are O(1), their ulp about 1e-7).
    assert!(
        worst < 1e-5,
        "global − base differs from the survivors' mean by {worst}"
    );
    assert!(
        moved > base.len() / 100,
        "only {moved} coordinates moved: no training signal"
    );

    eprintln!(
        "round 1: {} coordinates, {moved} moved, worst difference from the survivors' mean {worst:e}; \
         {} bytes of protocol messages in {:.1} s",
        base.len(),
        r1["update_bytes"],
        r1["seconds"].as_f64().unwrap_or(0.0)
    );

    // The aggregator's files: no lab's codes nor its dequantised update, anywhere.
    let mut files = Vec::new();
    all_files(&state_dir, &mut files);
    assert!(
        !state_dir.join("round-1").exists(),
        "a secure round stores no updates"
    );
    let contents: Vec<(PathBuf, Vec<u8>)> = files
        .iter()
        .map(|f| (f.clone(), std::fs::read(f).unwrap()))
        .collect();
    for (lab, c) in survivors.iter().zip(&codes) {
        // 48 consecutive codes with real content, as bytes and as the f32 values they stand for.
        let at = (0..c.len() - 48)
            .find(|&i| c[i..i + 48].iter().filter(|&&v| v != 0).count() > 24)
            .unwrap_or_else(|| panic!("{lab}: no window of non-zero codes"));
        let as_bytes: Vec<u8> = c[at..at + 48].iter().map(|&v| v as u8).collect();
        let as_f32: Vec<u8> = c[at..at + 48]
            .iter()
            .flat_map(|&v| (f32::from(v) * step).to_le_bytes())
            .collect();
        for (path, bytes) in &contents {
            for needle in [&as_bytes, &as_f32] {
                assert!(
                    !bytes.windows(needle.len()).any(|w| w == needle.as_slice()),
                    "{}: holds {lab}'s update",
                    path.display()
                );
            }
        }
    }

    // Round 2: kill the aggregator while the protocol runs, start it again.
    assert!(
        wait_until(Duration::from_secs(120), || agg_log()
            .matches("secure aggregation: round started")
            .count()
            >= 2),
        "round 2 never started:\n{}",
        agg_log()
    );
    std::thread::sleep(Duration::from_millis(500));
    agg.kill().unwrap();
    agg.wait().unwrap();
    let mut agg = start_aggregator(&agg_toml, &log2);
    let finished = wait_until(Duration::from_secs(120), || {
        matches!(agg.try_wait(), Ok(Some(_)))
    });
    let log = agg_log();
    assert!(finished, "the restarted aggregator did not finish:\n{log}");
    assert!(agg.wait().unwrap().success(), "{log}");
    assert!(
        log.contains("restarted during round 2's secure aggregation"),
        "{log}"
    );
    let s = state(&state_dir);
    let history = s["history"].as_array().unwrap();
    assert_eq!(history.len(), 2, "{s:#}");
    let r2 = &history[1];
    assert_eq!(r2["round"], 2);
    assert!(
        r2["abandoned"]
            .as_str()
            .is_some_and(|a| a.contains("restarted")),
        "{r2:#}"
    );
    assert_eq!(
        r2["accepted"],
        serde_json::json!([]),
        "nothing counted: {r2:#}"
    );
    assert_eq!(r2["global_version"], 1, "nothing merged: {r2:#}");
    assert!(!state_dir.join("global-2.bin").exists());
    eprintln!("round 2: {}", r2["abandoned"]);
    for a in &agents[..4] {
        assert!(
            !a.log().contains("panicked"),
            "an agent panicked:\n{}",
            a.log()
        );
    }
}
