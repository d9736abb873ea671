//! Fleet model versions against a real Mosquitto over TLS (client certificates, the fleet ACL): two
//! agents segment micrographs while the fleet manager pushes signed versions, forgeries are sent
//! through the same path, a worse model is pushed, and the fleet is rolled back.
//!
//! Checked: a good version reaches every device; a device that was offline during a push gets it when
//! it comes back (the release is retained); tampered, unsigned and wrong-key releases are refused
//! with the reason on the status topic; a model worse on the local hold-out is refused; rollback
//! returns every device to the named version; segmentation goes on without a single failure through
//! all the swaps; `fleet status` prints the fleet.

use std::path::{Path, PathBuf};
use std::time::Duration;

use microfed::fleet::manager::{FleetView, Manager};
use microfed::fleet::package::{Release, Signed, Target};
use microfed::fleet::signing::{Purpose, SecretKey};
use microfed::model::manifest::{ModelManifest, sha256_file};
use microfed::wire::link::{BrokerSettings, TlsFiles};
use microfed_e2e::broker::Mosquitto;
use microfed_e2e::{AgentProcess, journal_entries, microfed, synth_png, wait_until};

const FLEET: &str = "lab-test";
const LABS: [&str; 2] = ["lab-a", "lab-b"];

fn grains_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/grains")
}

/// A model folder: `onnx` written as model.onnx with the grains manifest, its hash and `semver`.
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

fn random_model(seed: u64) -> Vec<u8> {
    let params = microfed_kernels::unet::Params::init(2, seed).unwrap();
    let m =
        microfed::model::onnx::export(&params, &vec![("name".into(), "random".into())]).unwrap();
    microfed::model::onnx::to_bytes(&m)
}

fn manager_settings(broker: &Mosquitto) -> BrokerSettings {
    let (cert, key) = broker.client_cert("fleet-manager");
    BrokerSettings {
        host: "127.0.0.1".into(),
        port: broker.port(),
        tls: Some(TlsFiles {
            ca: broker.ca_pem(),
            cert,
            key,
        }),
        keep_alive_s: 5,
        ack_timeout_s: 10,
        ..BrokerSettings::default()
    }
}

/// What the broker holds now, read as the fleet manager.
fn view(rt: &tokio::runtime::Runtime, broker: &Mosquitto) -> FleetView {
    rt.block_on(async {
        let mut m = Manager::connect(
            &manager_settings(broker),
            FLEET,
            "fleet-manager",
            Duration::from_secs(10),
        )
        .await
        .expect("fleet manager connects");
        let v = m
            .observe(Duration::from_millis(300), Duration::from_secs(30))
            .await;
        m.close().await;
        v
    })
}

/// Waits until every listed device's status satisfies `ok`; panics with the statuses and logs if not.
fn wait_status(
    rt: &tokio::runtime::Runtime,
    broker: &Mosquitto,
    devices: &[&str],
    what: &str,
    agents: &[Option<AgentProcess>],
    ok: impl Fn(&microfed::wire::protocol::StatusBody) -> bool,
) {
    let mut last = FleetView::default();
    let done = wait_until(Duration::from_secs(60), || {
        last = view(rt, broker);
        devices
            .iter()
            .all(|d| last.devices.get(*d).is_some_and(&ok))
    });
    if !done {
        let logs: Vec<String> = agents.iter().flatten().map(|a| a.log()).collect();
        panic!(
            "{what}: statuses {:#?}\nlogs:\n{}",
            last.devices,
            logs.join("\n-----\n")
        );
    }
}

#[test]
fn signed_versions_reach_the_fleet_forgeries_and_worse_models_are_refused_and_rollback_works() {
    let broker = Mosquitto::start(&["lab-a", "lab-b", "fleet-manager"])
        .expect("start mosquitto (tests/run.sh installs it)");
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();

    // Versions: v0 (the agents' configured model), v1 and v2 (same weights, new files), a worse one.
    let v0_dir = root.join("models/v0");
    let v0 = model_dir(
        &v0_dir,
        &std::fs::read(grains_dir().join("model.onnx")).unwrap(),
        "1.0.0",
    );
    let v1_dir = root.join("models/v1");
    let v1 = model_dir(&v1_dir, &grains_again("grains-v1"), "1.1.0");
    let v2_dir = root.join("models/v2");
    let v2 = model_dir(&v2_dir, &grains_again("grains-v2"), "1.2.0");
    let worse_dir = root.join("models/worse");
    let worse = model_dir(&worse_dir, &random_model(11), "2.0.0");

    // The manager's key (CLI) and a key nobody trusts.
    let key_path = root.join("fleet.key");
    let out = microfed(
        &["fleet", "keygen", "--out", key_path.to_str().unwrap()],
        true,
    );
    let public = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    assert_eq!(public.len(), 64, "{public}");
    let key = SecretKey::load(&key_path).unwrap();
    assert_eq!(key.public().to_hex(), public);
    let rogue = SecretKey::generate();

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
    let cli = |args: &[&str]| {
        let mut a: Vec<&str> = vec!["fleet"];
        a.extend_from_slice(args);
        a.extend_from_slice(&["--config", fleet_toml.to_str().unwrap(), "--quiet-s", "0.3"]);
        let out = microfed(&a, true);
        String::from_utf8(out.stdout).unwrap()
    };

    // Two labs, each with a few labelled micrographs (the hold-out) and a folder the microscope fills.
    let mut agents: Vec<Option<AgentProcess>> = Vec::new();
    let mut configs = Vec::new();
    for (i, lab) in LABS.iter().enumerate() {
        let dir = root.join(lab);
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
                &(50 + i).to_string(),
                "--out",
                dir.join("labelled").to_str().unwrap(),
            ],
            true,
        );
        let (cert, key) = broker.client_cert(lab);
        let toml = format!(
            "[folders]\nwatch = \"in\"\noutput = \"out\"\nquarantine = \"q\"\n\
             [model]\npath = {:?}\nthreads = 1\n\
             [tiling]\ntile = 64\noverlap = 16\n\
             [capture]\nsettle_ms = 100\n\
             [federation]\nfleet = \"{FLEET}\"\ndevice = \"{lab}\"\nlabelled = \"labelled\"\n\
             state = \"fed\"\ndevice_kind = \"cpu\"\nbatch = 2\ncrop = 64\nseed = {i}\n\
             [federation.broker]\nhost = \"127.0.0.1\"\nport = {}\nkeep_alive_s = 5\nack_timeout_s = 10\n\
             [federation.broker.tls]\nca = {:?}\ncert = {cert:?}\nkey = {key:?}\n\
             [federation.fleet_models]\ntrusted_keys = [\"{public}\"]\ngroups = [\"sem\"]\n\
             keep_versions = 3\nholdout_margin = 0.02\n",
            v0_dir.join("model.onnx"),
            broker.port(),
            broker.ca_pem()
        );
        std::fs::create_dir_all(dir.join("in")).unwrap();
        std::fs::write(dir.join("agent.toml"), toml).unwrap();
        configs.push(dir.join("agent.toml"));
        agents.push(Some(AgentProcess::start(
            &dir.join("agent.toml"),
            &dir.join("agent.log"),
        )));
    }
    // Micrographs keep arriving at lab-a through every swap below.
    let feed_dir = root.join("lab-a/in");
    let mut fed = 0u64;
    let mut feed = |n: u64| {
        for _ in 0..n {
            let tmp = root.join(format!("lab-a/m{fed:03}.png.part"));
            std::fs::write(&tmp, synth_png(64, 77, fed)).unwrap();
            std::fs::rename(&tmp, feed_dir.join(format!("m{fed:03}.png"))).unwrap();
            fed += 1;
        }
    };
    feed(2);
    wait_status(&rt, &broker, &LABS, "agents online", &agents, |s| {
        s.online && s.model_version == v0
    });

    // Push v1 to everyone (the CLI).
    let out = cli(&[
        "push",
        v1_dir.to_str().unwrap(),
        "--to",
        "all",
        "--key",
        key_path.to_str().unwrap(),
    ]);
    assert!(out.contains(&v1), "{out}");
    feed(2);
    wait_status(&rt, &broker, &LABS, "v1 everywhere", &agents, |s| {
        s.model_version == v1 && s.last_error.is_none()
    });

    // lab-b goes offline (cleanly: its status says so), v2 is pushed, lab-a takes it.
    let mut b = agents[1].take().unwrap();
    b.terminate();
    assert!(b.wait(Duration::from_secs(30)).success(), "{}", b.log());
    drop(b);
    wait_status(&rt, &broker, &["lab-b"], "lab-b offline", &agents, |s| {
        !s.online
    });
    cli(&[
        "push",
        v2_dir.to_str().unwrap(),
        "--to",
        "group:sem",
        "--key",
        key_path.to_str().unwrap(),
    ]);
    feed(2);
    wait_status(&rt, &broker, &["lab-a"], "v2 on lab-a", &agents, |s| {
        s.model_version == v2
    });
    let st = view(&rt, &broker);
    assert_eq!(st.devices["lab-b"].model_version, v1, "lab-b was offline");
    // lab-b comes back and gets v2 from the retained release.
    agents[1] = Some(AgentProcess::start(
        &configs[1],
        &root.join("lab-b/agent-2.log"),
    ));
    wait_status(&rt, &broker, &LABS, "v2 everywhere", &agents, |s| {
        s.online && s.model_version == v2 && s.last_error.is_none()
    });

    // Forgeries through the real path: tampered after signing, unsigned, signed by an unknown key.
    let release = Release::from_model_dir(&v1_dir, Target::All).unwrap();
    let mut tampered = Signed::sign(&release, Purpose::Release, &key).unwrap();
    let at = tampered.bytes.len() - 1000;
    tampered.bytes[at] ^= 0x01;
    let forgeries = [
        (tampered, "bad signature"),
        (Signed::unsigned(&release).unwrap(), "unsigned"),
        (
            Signed::sign(&release, Purpose::Release, &rogue).unwrap(),
            "does not trust",
        ),
        // Signed by the fleet's own key, for another fleet that trusts it too: a replay.
        (
            Signed::sign(
                &Release {
                    fleet: "another-fleet".into(),
                    ..release.clone()
                },
                Purpose::Release,
                &key,
            )
            .unwrap(),
            "signed for fleet \"another-fleet\"",
        ),
    ];
    for (signed, reason) in forgeries {
        rt.block_on(async {
            let mut m = Manager::connect(
                &manager_settings(&broker),
                FLEET,
                "fleet-manager",
                Duration::from_secs(10),
            )
            .await
            .unwrap();
            let view = m
                .observe(Duration::from_millis(300), Duration::from_secs(30))
                .await;
            m.publish_release(&release.version, &signed, &view)
                .await
                .unwrap();
            m.close().await;
        });
        feed(1);
        wait_status(&rt, &broker, &LABS, reason, &agents, |s| {
            s.model_version == v2 && s.last_error.as_deref().is_some_and(|e| e.contains(reason))
        });
    }

    // A correctly signed model that is worse on the labs' hold-out.
    cli(&[
        "push",
        worse_dir.to_str().unwrap(),
        "--to",
        "all",
        "--key",
        key_path.to_str().unwrap(),
    ]);
    wait_status(&rt, &broker, &LABS, "worse model refused", &agents, |s| {
        s.model_version == v2
            && s.last_error
                .as_deref()
                .is_some_and(|e| e.contains("worse on the hold-out"))
    });

    // Roll every device back to v1, named by a hash prefix.
    let out = cli(&[
        "rollback",
        "--to",
        &v1[..12],
        "--key",
        key_path.to_str().unwrap(),
    ]);
    assert!(out.contains("rollback"), "{out}");
    feed(2);
    wait_status(&rt, &broker, &LABS, "rolled back to v1", &agents, |s| {
        s.model_version == v1 && s.last_error.is_none()
    });

    let table = cli(&["status"]);
    eprintln!("{table}");
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 3, "{table}");
    for (line, lab) in lines[1..].iter().zip(LABS) {
        assert!(line.starts_with(lab), "{table}");
        assert!(
            line.contains("online") && line.contains(&v1[..12]),
            "{table}"
        );
    }
    let list = cli(&["list"]);
    assert!(
        list.contains(&worse),
        "the worse release is what the broker retains: {list}"
    );
    assert!(list.contains("lab-a, lab-b"), "{list}");

    // Segmentation went on through every swap: every micrograph segmented, none failed.
    let journal = root.join("lab-a/out/journal.jsonl");
    assert!(
        wait_until(Duration::from_secs(60), || journal_entries(&journal).len()
            as u64
            == fed),
        "{} of {fed} journalled:\n{}",
        journal_entries(&journal).len(),
        agents[0].as_ref().unwrap().log()
    );
    for e in journal_entries(&journal) {
        assert_eq!(e["outcome"], "segmented", "{e}");
    }
    for a in agents.iter_mut().flatten() {
        a.terminate();
        let st = a.wait(Duration::from_secs(30));
        let log = a.log();
        assert!(st.success(), "{log}");
        assert!(!log.contains("panicked"), "{log}");
        assert!(!log.contains("segmentation failed"), "{log}");
    }
}
