//! Style codes between real agents over a real Mosquitto (TLS client certificates, the fleet's ACL).
//!
//! Three labs with different synthetic imaging styles run `microfed agent` with `[federation.style]`
//! (min_images = 3). An observer (CN `aggregator`, which may read `style/#` and `status/+`) follows the
//! retained codes and statuses. Checked:
//! - lab-a and lab-b publish their codes; lab-c, with one training image, publishes none;
//! - each agent's status lists the codes it holds: the other labs' only;
//! - from another device (lab-x): garbage and a code with a forged sender are counted and dropped by
//!   every agent; a valid lab-x code is taken, and its empty retained payload withdraws it;
//! - lab-c gets more labelled images: it publishes its code and every agent ends with the other two;
//! - lab-a's labelled data change: its retained code changes (one image more);
//! - one federated round (aggregator `aggregator-1`): with re-styling probability 1, every batch of
//!   every lab's local training is re-styled with one of the other labs' codes.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use microfed::federated::edge::style::{StyleCode, StyleKind, seal_code};
use microfed::wire::protocol::{Envelope, Kind, MAX_PACKET_BYTES, StatusBody};
use microfed_e2e::broker::{Mosquitto, TestClient, tls_options};
use microfed_e2e::{AgentProcess, microfed, wait_until};
use rumqttc::QoS;

const FLEET: &str = "style-test";
const LABS: [(&str, &str); 3] = [
    ("lab-a", "optical-etched"),
    ("lab-b", "sem-se"),
    ("lab-c", "sem-bse"),
];

/// Follows the retained `style/+` and `status/+` of the fleet.
struct Observer {
    rt: tokio::runtime::Runtime,
    client: TestClient,
    latest: HashMap<String, Vec<u8>>,
}

impl Observer {
    fn start(broker: &Mosquitto) -> Self {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let client = rt.block_on(async {
            let mut c = TestClient::connect(tls_options(broker, "aggregator"))
                .await
                .expect("observer connects");
            for filter in ["style/+", "status/+"] {
                c.subscribe(&format!("microfed/{FLEET}/{filter}"), QoS::AtLeastOnce)
                    .await
                    .unwrap();
            }
            c
        });
        Self {
            rt,
            client,
            latest: HashMap::new(),
        }
    }

    fn pump(&mut self) {
        for p in self
            .rt
            .block_on(self.client.drain(Duration::from_millis(100)))
        {
            self.latest.insert(p.topic.clone(), p.payload.to_vec());
        }
    }

    /// Pumps until `done` holds; panics with `what` and the agents' logs after `timeout`.
    fn wait(
        &mut self,
        timeout: Duration,
        what: &str,
        agents: &[AgentProcess],
        mut done: impl FnMut(&Self) -> bool,
    ) {
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            self.pump();
            if done(self) {
                return;
            }
        }
        let logs: Vec<String> = agents.iter().map(AgentProcess::log).collect();
        panic!("{what}: not within {timeout:?}\n{}", logs.join("\n-----\n"));
    }

    fn code(&self, device: &str) -> Option<StyleCode> {
        let bytes = self
            .latest
            .get(&format!("microfed/{FLEET}/style/{device}"))?;
        if bytes.is_empty() {
            return None;
        }
        let env = Envelope::from_bytes(bytes, MAX_PACKET_BYTES).expect("a style envelope");
        assert_eq!(env.sender, device);
        let code: StyleCode = env.body(Kind::StyleCode).expect("a style code");
        code.validate().unwrap();
        Some(code)
    }

    fn status(&self, device: &str) -> Option<StatusBody> {
        let bytes = self
            .latest
            .get(&format!("microfed/{FLEET}/status/{device}"))?;
        Envelope::from_bytes(bytes, MAX_PACKET_BYTES)
            .and_then(|e| e.body(Kind::Status))
            .ok()
    }

    fn holds(&self, device: &str, others: &[&str]) -> bool {
        self.status(device).is_some_and(|s| s.style_codes == others)
    }
}

/// Copies image `stem` and its mask from a `microfed synth` folder (the mask first: an image is
/// complete when it appears).
fn copy_pair(from: &Path, to: &Path, image: &Path) {
    let stem = image.file_stem().unwrap().to_str().unwrap();
    std::fs::create_dir_all(to.join("masks")).unwrap();
    std::fs::create_dir_all(to.join("images")).unwrap();
    let mask = format!("masks/{stem}.png");
    std::fs::copy(from.join(&mask), to.join(&mask)).unwrap();
    let name = image.file_name().unwrap();
    std::fs::copy(image, to.join("images").join(name)).unwrap();
}

fn images_of(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir.join("images"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    v.sort();
    v
}

#[test]
fn labs_exchange_style_codes_drop_forged_ones_and_republish_when_their_data_change() {
    let broker = Mosquitto::start(&[
        "lab-a",
        "lab-b",
        "lab-c",
        "lab-x",
        "aggregator",
        "aggregator-1",
    ])
    .expect("start mosquitto (tests/run.sh installs it)");
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/grains/model.onnx");
    let mut observer = Observer::start(&broker);

    // Each lab's micrographs are made in a staging folder; the labelled folder gets some of them:
    // lab-a 5 of 6 (4 training images after the 20 % hold-out), lab-b 5, lab-c 2 (1 training image,
    // below min_images).
    let mut agents = Vec::new();
    let mut staged = Vec::new();
    for (i, (lab, style)) in LABS.iter().enumerate() {
        let dir = root.join(lab);
        let staging = dir.join("staging");
        microfed(
            &[
                "synth",
                "--structure",
                "polycrystal",
                "--style",
                style,
                "--count",
                "6",
                "--size",
                "96",
                "--seed",
                &(70 + i).to_string(),
                "--out",
                staging.to_str().unwrap(),
            ],
            true,
        );
        let labelled = dir.join("labelled");
        std::fs::create_dir_all(&labelled).unwrap();
        std::fs::copy(staging.join("dataset.toml"), labelled.join("dataset.toml")).unwrap();
        let images = images_of(&staging);
        assert_eq!(images.len(), 6);
        let first = if *lab == "lab-c" { 2 } else { 5 };
        for img in &images[..first] {
            copy_pair(&staging, &labelled, img);
        }
        staged.push((staging, labelled, images[first..].to_vec()));

        let (cert, key) = broker.client_cert(lab);
        let toml = format!(
            "[folders]\nwatch = \"in\"\noutput = \"out\"\nquarantine = \"q\"\n\
             [model]\npath = {model:?}\nthreads = 1\n\
             [tiling]\ntile = 64\noverlap = 16\n\
             [federation]\nfleet = \"{FLEET}\"\ndevice = \"{lab}\"\nlabelled = \"labelled\"\n\
             state = \"fed\"\ndevice_kind = \"cpu\"\nbatch = 2\ncrop = 64\nseed = {i}\n\
             [federation.broker]\nhost = \"127.0.0.1\"\nport = {}\nkeep_alive_s = 5\n\
             ack_timeout_s = 5\n\
             [federation.broker.tls]\nca = {:?}\ncert = {cert:?}\nkey = {key:?}\n\
             [federation.style]\nkind = \"feature-stats\"\nmin_images = 3\n\
             [federation.style.restyle]\nprobability = 1.0\nmix = 1.0\n",
            broker.port(),
            broker.ca_pem(),
        );
        std::fs::write(dir.join("agent.toml"), toml).unwrap();
        agents.push(AgentProcess::start(
            &dir.join("agent.toml"),
            &dir.join("agent.log"),
        ));
    }
    let t0 = Instant::now();

    // lab-a and lab-b publish; each holds the other's code, lab-c holds both and publishes none.
    observer.wait(
        Duration::from_secs(90),
        "codes of lab-a and lab-b",
        &agents,
        |o| {
            o.holds("lab-a", &["lab-b"])
                && o.holds("lab-b", &["lab-a"])
                && o.holds("lab-c", &["lab-a", "lab-b"])
        },
    );
    eprintln!("first codes exchanged after {:?}", t0.elapsed());
    let code_a = observer.code("lab-a").expect("lab-a's retained code");
    let code_b = observer.code("lab-b").expect("lab-b's retained code");
    let model_version = microfed::model::manifest::sha256_file(&model).unwrap();
    for (c, lab) in [(&code_a, "lab-a"), (&code_b, "lab-b")] {
        assert_eq!(
            (c.device.as_str(), c.kind, c.images),
            (lab, StyleKind::FeatureStats, 4)
        );
        assert_eq!(c.model_version, model_version);
    }
    // Different imaging styles: the encoder's first-stage channel means differ between the labs.
    let (mu_a, _) = code_a.stage(0);
    let (mu_b, _) = code_b.stage(0);
    let gap: f32 = mu_a.iter().zip(mu_b).map(|(a, b)| (a - b).abs()).sum();
    assert!(gap > 1e-2, "{gap}");
    assert!(
        wait_until(Duration::from_secs(10), || agents[2]
            .log()
            .contains("style code not published")),
        "{}",
        agents[2].log()
    );
    assert!(
        agents[2].log().contains("min_images"),
        "{}",
        agents[2].log()
    );
    assert!(observer.code("lab-c").is_none(), "lab-c published a code");

    // lab-x: garbage, lab-a's code under lab-x's topic (forged sender), then a code of its own.
    let topic_x = format!("microfed/{FLEET}/style/lab-x");
    let forged = seal_code(FLEET, 0, &code_a).unwrap();
    let own_x = seal_code(
        FLEET,
        0,
        &StyleCode {
            device: "lab-x".into(),
            ..code_b.clone()
        },
    )
    .unwrap();
    let mut lab_x = observer
        .rt
        .block_on(TestClient::connect(tls_options(&broker, "lab-x")))
        .expect("lab-x connects");
    observer.rt.block_on(async {
        lab_x
            .publish_acked(&topic_x, false, b"not cbor".to_vec())
            .await
            .unwrap();
        lab_x.publish_acked(&topic_x, false, forged).await.unwrap();
        lab_x.publish_acked(&topic_x, true, own_x).await.unwrap();
    });
    observer.wait(
        Duration::from_secs(20),
        "two rejections and lab-x's code at every lab",
        &agents,
        |o| {
            LABS.iter().all(|(lab, _)| {
                o.status(lab).is_some_and(|s| {
                    s.style_rejected == 2 && s.style_codes.iter().any(|d| d == "lab-x")
                })
            })
        },
    );
    for a in &agents {
        let log = a.log();
        assert!(log.contains("style message dropped"), "{log}");
        assert!(log.contains("forged sender"), "{log}");
        assert!(log.contains(&topic_x), "{log}");
    }
    // The empty retained payload withdraws lab-x's code everywhere.
    observer.rt.block_on(async {
        lab_x
            .publish_acked(&topic_x, true, Vec::new())
            .await
            .unwrap();
    });
    observer.wait(
        Duration::from_secs(20),
        "lab-x's code withdrawn",
        &agents,
        |o| {
            o.holds("lab-a", &["lab-b"])
                && o.holds("lab-b", &["lab-a"])
                && o.holds("lab-c", &["lab-a", "lab-b"])
        },
    );

    // lab-c gets 3 more images (4 training images): it publishes, and everyone holds the other two.
    let (staging_c, labelled_c, rest_c) = &staged[2];
    for img in &rest_c[..3] {
        copy_pair(staging_c, labelled_c, img);
    }
    let t1 = Instant::now();
    observer.wait(
        Duration::from_secs(60),
        "lab-c's code after its data grew",
        &agents,
        |o| {
            o.code("lab-c").is_some_and(|c| c.images == 4)
                && o.holds("lab-a", &["lab-b", "lab-c"])
                && o.holds("lab-b", &["lab-a", "lab-c"])
                && o.holds("lab-c", &["lab-a", "lab-b"])
        },
    );
    eprintln!("lab-c's code out {:?} after its data changed", t1.elapsed());

    // lab-a's data change: its retained code changes (5 training images now).
    let (staging_a, labelled_a, rest_a) = &staged[0];
    copy_pair(staging_a, labelled_a, &rest_a[0]);
    observer.wait(Duration::from_secs(60), "lab-a's new code", &agents, |o| {
        o.code("lab-a").is_some_and(|c| c.images == 5)
    });
    let new_a = observer.code("lab-a").unwrap();
    assert_ne!(new_a.values, code_a.values);
    // The others keep receiving it: still exactly the other labs, nothing more rejected.
    for (lab, _) in LABS {
        let s = observer.status(lab).unwrap();
        assert_eq!(s.style_rejected, 2, "{lab}: {s:?}");
        assert_eq!(s.style_codes.len(), 2, "{lab}: {s:?}");
    }
    assert_eq!(
        agents[0].log().matches("style code published").count(),
        2,
        "{}",
        agents[0].log()
    );

    // One round: local training really uses the codes (probability 1: both batches re-styled).
    let agg_dir = root.join("aggregator");
    std::fs::create_dir_all(&agg_dir).unwrap();
    let (cert, key) = broker.client_cert("aggregator-1");
    let agg_toml = agg_dir.join("aggregator.toml");
    std::fs::write(
        &agg_toml,
        format!(
            "id = \"aggregator-1\"\nfleet = \"{FLEET}\"\nmodel = {model:?}\nstate = {:?}\nrounds = 1\n\
             devices = [\"lab-a\", \"lab-b\", \"lab-c\"]\n\
             [round]\ndeadline_s = 60.0\nquorum = 3\nlocal_epochs = 1\nsteps_per_epoch = 2\n\
             learning_rate = 0.01\nprox_mu = 0.0\npause_s = 0.0\n\
             [broker]\nhost = \"127.0.0.1\"\nport = {}\nkeep_alive_s = 5\n\
             [broker.tls]\nca = {:?}\ncert = {cert:?}\nkey = {key:?}\n",
            agg_dir.join("state"),
            broker.port(),
            broker.ca_pem(),
        ),
    )
    .unwrap();
    let t2 = Instant::now();
    let agg = std::process::Command::new(microfed_e2e::microfed_bin())
        .args(["aggregate", "--config"])
        .arg(&agg_toml)
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(agg_dir.join("aggregator.log")).unwrap())
        .spawn()
        .expect("start microfed aggregate");
    let mut agg = KillOnDrop(agg);
    let agg_log = || std::fs::read_to_string(agg_dir.join("aggregator.log")).unwrap_or_default();
    assert!(
        wait_until(Duration::from_secs(120), || matches!(
            agg.0.try_wait(),
            Ok(Some(_))
        )),
        "the round did not finish:\n{}",
        agg_log()
    );
    assert!(agg.0.wait().unwrap().success(), "{}", agg_log());
    eprintln!("one round in {:?}", t2.elapsed());
    for a in &agents {
        let log = a.log();
        let done = log
            .lines()
            .find(|l| l.contains("local round done"))
            .unwrap_or_else(|| panic!("no local round:\n{log}"));
        assert!(plain(done).contains("restyled_batches=2"), "{done}");
        assert!(log.contains("style codes for local training"), "{log}");
    }

    for a in &agents {
        a.terminate();
    }
    for a in &mut agents {
        let st = a.wait(Duration::from_secs(30));
        let log = a.log();
        assert!(st.success(), "{log}");
        assert!(!log.contains("panicked"), "{log}");
    }
    eprintln!("whole test {:?}", t0.elapsed());
}

/// A child process killed when the test fails before it ends.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// A log line without its terminal colour codes (ESC [ … m).
fn plain(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for d in chars.by_ref() {
                if d == 'm' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}
