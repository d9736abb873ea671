//! Federated rounds against a real Mosquitto over TLS (client certificates, ACLs): three agents with
//! different synthetic imaging styles and the aggregator run four rounds. On the way, one lab's link
//! is cut for a round (its update waits in the outbox and is delivered when the link returns), the
//! aggregator is killed in the middle of a round and restarted (the round completes with every update,
//! none counted twice), and garbage is published on a device's update topic (rejected and counted).
//! The aggregator runs central DP-FedAvg (`[dp]`): every summary reports ε, which grows each round as
//! an independent accountant's does, across the restart.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use microfed_e2e::broker::Mosquitto;
use microfed_e2e::{AgentProcess, microfed, microfed_bin, wait_until};

const LABS: [(&str, &str); 3] = [
    ("lab-a", "optical-etched"),
    ("lab-b", "sem-se"),
    ("lab-c", "sem-bse"),
];

/// A TCP forwarder whose link the test can cut and restore (a lab's network going away).
struct Proxy {
    port: u16,
    cut: Arc<AtomicBool>,
    open: Arc<Mutex<Vec<TcpStream>>>,
}

impl Proxy {
    fn start(target: u16) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let cut = Arc::new(AtomicBool::new(false));
        let open: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let (c, o) = (cut.clone(), open.clone());
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                if c.load(Ordering::SeqCst) {
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                }
                let Ok(server) = TcpStream::connect(("127.0.0.1", target)) else {
                    continue;
                };
                {
                    let mut o = o.lock().unwrap();
                    o.push(client.try_clone().unwrap());
                    o.push(server.try_clone().unwrap());
                }
                for (mut from, mut to) in [
                    (client.try_clone().unwrap(), server.try_clone().unwrap()),
                    (server, client),
                ] {
                    std::thread::spawn(move || {
                        let mut buf = [0u8; 16384];
                        while let Ok(n) = from.read(&mut buf) {
                            if n == 0 || to.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                        let _ = to.shutdown(Shutdown::Both);
                    });
                }
            }
        });
        Self { port, cut, open }
    }
    fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        for s in self.open.lock().unwrap().drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
    fn restore(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}

fn grains_model() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/grains/model.onnx")
}

fn tls_section(broker: &Mosquitto, name: &str, port: u16) -> String {
    let (cert, key) = broker.client_cert(name);
    format!(
        "host = \"127.0.0.1\"\nport = {port}\nkeep_alive_s = 5\nack_timeout_s = 5\n\
         [federation.broker.tls]\nca = {:?}\ncert = {cert:?}\nkey = {key:?}\n",
        broker.ca_pem()
    )
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

#[test]
fn three_labs_four_rounds_survive_a_cut_link_an_aggregator_crash_and_garbage() {
    let broker = Mosquitto::start(&["lab-a", "lab-b", "lab-c", "lab-d", "aggregator"])
        .expect("start mosquitto (tests/run.sh installs it)");
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let model = grains_model();

    // The aggregator signs globals and announcements; the agents take only those (issue 17).
    let agg_key_path = root.join("aggregator.key");
    let agg_key = microfed::fleet::signing::SecretKey::generate();
    agg_key.save(&agg_key_path).unwrap();
    let agg_public = agg_key.public().to_hex();

    // Three labs, each with its own imaging style and a few labelled micrographs.
    let proxy = Proxy::start(broker.port());
    let mut agents = Vec::new();
    for (i, (lab, style)) in LABS.iter().enumerate() {
        let dir = root.join(lab);
        let data = dir.join("labelled");
        microfed(
            &[
                "synth",
                "--structure",
                "polycrystal",
                "--style",
                style,
                "--count",
                "5",
                "--size",
                "128",
                "--seed",
                &(40 + i).to_string(),
                "--out",
                data.to_str().unwrap(),
            ],
            true,
        );
        // lab-c reaches the broker through the proxy, so the test can cut its link.
        let port = if *lab == "lab-c" {
            proxy.port
        } else {
            broker.port()
        };
        let toml = format!(
            "[folders]\nwatch = \"in\"\noutput = \"out\"\nquarantine = \"q\"\n\
             [model]\npath = {model:?}\nthreads = 1\n\
             [tiling]\ntile = 64\noverlap = 16\n\
             [federation]\nfleet = \"lab-test\"\ndevice = \"{lab}\"\nlabelled = \"labelled\"\n\
             state = \"fed\"\ndevice_kind = \"cpu\"\nbatch = 2\ncrop = 64\nseed = {i}\n\
             aggregator_key = \"{agg_public}\"\n\
             [federation.broker]\n{}",
            tls_section(&broker, lab, port)
        );
        std::fs::write(dir.join("agent.toml"), toml).unwrap();
        let log = dir.join("agent.log");
        agents.push(AgentProcess::start(&dir.join("agent.toml"), &log));
    }
    for a in &agents {
        assert!(
            wait_until(Duration::from_secs(120), || a
                .log()
                .contains("encoder features ready")
                && a.log().contains("connected to the broker")),
            "agent not ready:\n{}",
            a.log()
        );
    }

    // The aggregator.
    let agg_dir = root.join("aggregator");
    std::fs::create_dir_all(&agg_dir).unwrap();
    let (cert, key) = broker.client_cert("aggregator");
    let agg_toml = agg_dir.join("aggregator.toml");
    std::fs::write(
        &agg_toml,
        format!(
            "id = \"aggregator\"\nfleet = \"lab-test\"\nmodel = {model:?}\nstate = {:?}\nrounds = 4\n\
             signing_key = {agg_key_path:?}\n\
             devices = [\"lab-a\", \"lab-b\", \"lab-c\", \"lab-d\"]\n\
             [round]\ndeadline_s = 40.0\nquorum = 3\nlocal_epochs = 1\nsteps_per_epoch = 3\n\
             learning_rate = 0.01\nprox_mu = 0.0\npause_s = 0.0\n\
             [compression]\ntop_k = 0.05\nerror_feedback = true\nquantize = \"int8\"\nzstd_level = 3\n\
             [dp]\nclip_norm = 0.005\nnoise_multiplier = 0.5\ndelta = 1e-5\n\
             [broker]\nhost = \"127.0.0.1\"\nport = {}\nkeep_alive_s = 5\n\
             [broker.tls]\nca = {:?}\ncert = {cert:?}\nkey = {key:?}\n",
            agg_dir.join("state"),
            broker.port(),
            broker.ca_pem(),
        ),
    )
    .unwrap();
    let state_dir = agg_dir.join("state");
    let mut agg = start_aggregator(&agg_toml, &agg_dir.join("aggregator-1.log"));
    let agg_log = || {
        std::fs::read_to_string(agg_dir.join("aggregator-1.log")).unwrap_or_default()
            + &std::fs::read_to_string(agg_dir.join("aggregator-2.log")).unwrap_or_default()
    };

    // Round 2: cut lab-c's link as soon as the round opens, restore it a few seconds later.
    assert!(
        wait_until(Duration::from_secs(120), || state(&state_dir)["round"] == 2),
        "round 2 never opened:\n{}",
        agg_log()
    );
    proxy.cut();
    assert!(wait_until(Duration::from_secs(60), || agents[2]
        .log()
        .contains("kept in the outbox")
        || agents[2].log().contains("lost the broker")));
    std::thread::sleep(Duration::from_secs(3));
    proxy.restore();

    // Round 3: kill the aggregator once an update is in, then start it again.
    assert!(
        wait_until(Duration::from_secs(120), || {
            let s = state(&state_dir);
            s["round"] == 3 && s["accepted"].as_object().is_some_and(|a| !a.is_empty())
        }),
        "round 3 never got an update:\n{}",
        agg_log()
    );
    agg.kill().unwrap();
    agg.wait().unwrap();

    // Garbage from lab-d (a listed device with no agent) while the aggregator is down: it is queued
    // for the aggregator's persistent session and must be rejected, not crash it.
    {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let opts = microfed_e2e::broker::tls_options(&broker, "lab-d");
            let (client, mut ev) = rumqttc::AsyncClient::new(opts, 10);
            client
                .publish(
                    "microfed/lab-test/update/lab-d",
                    rumqttc::QoS::AtLeastOnce,
                    false,
                    b"not cbor".to_vec(),
                )
                .await
                .unwrap();
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            while tokio::time::Instant::now() < deadline {
                if let Ok(Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_)))) =
                    tokio::time::timeout(Duration::from_secs(1), ev.poll()).await
                {
                    break;
                }
            }
        });
    }
    let mut agg = start_aggregator(&agg_toml, &agg_dir.join("aggregator-2.log"));
    let finished = wait_until(Duration::from_secs(240), || {
        matches!(agg.try_wait(), Ok(Some(_)))
    });
    let log = agg_log();
    assert!(finished, "aggregator did not finish 4 rounds:\n{log}");
    assert!(agg.wait().unwrap().success(), "{log}");
    assert!(log.contains("resumed the open round from disk"), "{log}");

    let s = state(&state_dir);
    eprintln!("aggregator state: {s:#}");
    let history = s["history"].as_array().expect("history");
    assert_eq!(history.len(), 4, "{s:#}");
    let mut malformed = 0;
    // DP: q = 1 in every round (no sampling rate configured: the labs that answered are not a
    // random sample, so no amplification is claimed); the restart in round 3 must not reset ε.
    let mut accountant = microfed::federated::dp::RdpAccountant::new();
    let mut last_epsilon = 0.0;
    for (r, h) in history.iter().enumerate() {
        let q = 1.0;
        assert_eq!(h["privacy"]["sampling_rate"].as_f64(), Some(q), "{h:#}");
        accountant.step(q, 0.5, 1).unwrap();
        let p = &h["privacy"];
        assert_eq!(p["steps"], r as u64 + 1, "{h:#}");
        let eps = p["epsilon"].as_f64().expect("ε in the summary");
        let want = accountant.epsilon(1e-5).0;
        assert!(
            (eps - want).abs() <= 1e-9 * want,
            "round {}: ε {eps}, want {want}",
            r + 1
        );
        assert!(eps > last_epsilon, "ε grows: {last_epsilon} then {eps}");
        last_epsilon = eps;
        assert_eq!(h["round"], r as u64 + 1);
        assert_eq!(
            h["global_version"],
            r as u64 + 1,
            "the version advances each round"
        );
        let accepted: Vec<&str> = h["accepted"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert_eq!(
            accepted,
            ["lab-a", "lab-b", "lab-c"],
            "round {}: {h:#}",
            r + 1
        );
        // lab-d never trains: a straggler every round, not waited for (the quorum is 3).
        assert_eq!(h["stragglers"], serde_json::json!(["lab-d"]), "{h:#}");
        malformed += h["rejected"]["malformed"].as_u64().unwrap_or(0);
    }
    assert!(malformed >= 1, "the garbage message was not counted: {s:#}");
    // lab-c's round-2 update went through the outbox.
    assert!(
        agents[2].log().contains("update delivered"),
        "{}",
        agents[2].log()
    );

    // Every agent decided on each new global decoder: swapped into its running model, or kept out
    // by the hold-out gate (scored worse than the running one by more than holdout_margin); all of
    // them signed by the aggregator's key and checked before their bodies were read.
    for a in &agents {
        assert!(
            wait_until(Duration::from_secs(30), || {
                let log = a.log();
                log.matches("global decoder swapped into the running model")
                    .count()
                    + log
                        .matches("global decoder not swapped into production")
                        .count()
                    >= 4
            }),
            "{}",
            a.log()
        );
        let log = a.log();
        assert!(
            !log.contains("unsigned")
                && !log.contains("bad signature")
                && !log.contains("refusing a global"),
            "{log}"
        );
    }
    // Forgeries (issue 17): with the aggregator's own certificate (so the broker's ACL lets them
    // through), a retained global of version u64::MAX signed by another key, and an unsigned
    // round announcement for round u64::MAX. Every agent refuses both before reading them.
    {
        let version = microfed::model::manifest::sha256_file(&model).unwrap();
        let h = microfed::wire::protocol::Header {
            fleet: "lab-test",
            round: u64::MAX,
            model_version: &version,
            sender: "aggregator",
        };
        use microfed::wire::protocol::{Envelope, GlobalDecoder, Kind, RoundAnnouncement};
        let global = Envelope::seal(
            Kind::GlobalDecoder,
            &h,
            &GlobalDecoder::new(u64::MAX, u64::MAX, 2, &[0.0; 16]),
        )
        .unwrap()
        .sign(&microfed::fleet::signing::SecretKey::generate())
        .unwrap();
        let frame = microfed::wire::protocol::split(&global.to_bytes().unwrap(), 1 << 18)
            .unwrap()
            .remove(0);
        let round = Envelope::seal(
            Kind::RoundAnnouncement,
            &h,
            &RoundAnnouncement {
                round: u64::MAX,
                global_version: u64::MAX,
                global_digest: global.digest.clone(),
                deadline_unix: f64::MAX,
                local_epochs: 1,
                steps_per_epoch: 1,
                learning_rate: 0.01,
                prox_mu: 0.0,
                optimizer: Default::default(),
                compression: Default::default(),
                closed: false,
            },
        )
        .unwrap()
        .to_bytes()
        .unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let opts = microfed_e2e::broker::tls_options(&broker, "aggregator");
            let (client, mut ev) = rumqttc::AsyncClient::new(opts, 10);
            for (topic, payload) in [
                ("microfed/lab-test/global/0", frame),
                ("microfed/lab-test/round", round),
            ] {
                client
                    .publish(topic, rumqttc::QoS::AtLeastOnce, true, payload)
                    .await
                    .unwrap();
            }
            let mut acks = 0;
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            while acks < 2 && tokio::time::Instant::now() < deadline {
                if let Ok(Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_)))) =
                    tokio::time::timeout(Duration::from_secs(1), ev.poll()).await
                {
                    acks += 1;
                }
            }
            assert_eq!(acks, 2, "the broker did not take the forgeries");
        });
        for a in &agents {
            assert!(
                wait_until(Duration::from_secs(30), || {
                    let log = a.log();
                    log.contains("bad signature: the aggregator message")
                        && log.contains("carries no signature")
                }),
                "{}",
                a.log()
            );
            assert!(!a.log().contains("18446744073709551615"), "{}", a.log());
        }
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
}
