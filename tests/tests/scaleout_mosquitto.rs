//! Scale-out aggregation against a real Mosquitto over TLS (client certificates, the fleet ACL): one
//! coordinator and two workers, each a separate `microfed aggregate` process, share a round's
//! updates through the `$share/aggregators/…` subscription. Test clients act as the devices and send
//! real compressed updates (top-k 5 %, int8, zstd). Checked: the global decoder equals the FedAvg of
//! all updates computed here, every update is counted exactly once across the workers (each got a
//! share), and the summary's counts are right.
//!
//! `scale_out_throughput` (ignored; `cargo test -p microfed-e2e --test scaleout_mosquitto --
//! --ignored --nocapture`) measures updates merged per second, one process against 1 + 2.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use microfed::federated::compress::{self, CompressionConfig, Quantize};
use microfed::wire::protocol::{
    self, CHUNK_BYTES, Envelope, Header, Kind, LocalMetrics, RoundAnnouncement, UpdateBody,
};
use microfed_e2e::broker::{Mosquitto, TestClient, tls_options};
use microfed_e2e::{microfed_bin, wait_until, write_test_model};

/// One aggregator process, killed if the test fails before it exits.
struct Proc {
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn compression() -> CompressionConfig {
    CompressionConfig {
        top_k: Some(0.05),
        error_feedback: false,
        quantize: Quantize::Int8,
        zstd_level: Some(3),
    }
}

/// aggregator.toml for `id`; `scale_out` is the `[scale_out]` section or empty.
fn config(
    broker: &Mosquitto,
    dir: &Path,
    id: &str,
    model: &Path,
    devices: &[String],
    scale_out: &str,
) -> PathBuf {
    let (cert, key) = broker.client_cert(id);
    let list: Vec<String> = devices.iter().map(|d| format!("{d:?}")).collect();
    let path = dir.join(format!("{id}.toml"));
    std::fs::write(
        &path,
        format!(
            "id = {id:?}\nfleet = \"scale\"\nmodel = {model:?}\nstate = {:?}\nrounds = 1\n\
             devices = [{}]\n\
             [round]\ndeadline_s = 60.0\nquorum = {}\nlocal_epochs = 1\nsteps_per_epoch = 1\n\
             learning_rate = 0.01\nprox_mu = 0.0\npause_s = 0.0\n\
             [compression]\ntop_k = 0.05\nerror_feedback = false\nquantize = \"int8\"\nzstd_level = 3\n\
             {scale_out}\
             [broker]\nhost = \"127.0.0.1\"\nport = {}\nkeep_alive_s = 5\n\
             [broker.tls]\nca = {:?}\ncert = {cert:?}\nkey = {key:?}\n",
            dir.join(format!("state-{id}")),
            list.join(", "),
            devices.len(),
            broker.port(),
            broker.ca_pem(),
        ),
    )
    .unwrap();
    path
}

fn start(config: &Path, log: PathBuf) -> Proc {
    let child = Command::new(microfed_bin())
        .args(["aggregate", "--config"])
        .arg(config)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("start microfed aggregate");
    Proc { child, log }
}

fn state(dir: &Path, id: &str) -> serde_json::Value {
    std::fs::read(dir.join(format!("state-{id}/aggregator.json")))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or(serde_json::Value::Null)
}

/// Device `i`'s update: a smooth pattern of its own, so that top-k keeps different coordinates.
fn update_values(i: usize, n: usize) -> Vec<f32> {
    (0..n)
        .map(|j| 1e-3 * ((j as f32 * 0.001 * (i + 1) as f32).sin() + 0.1 * i as f32))
        .collect()
}

struct Run {
    /// From the first update published to the summary on disk.
    seconds: f64,
    /// Of which the test's devices took to publish (one after the other, each PUBACKed).
    publish_seconds: f64,
    summary: serde_json::Value,
    /// Accepted devices per worker (empty for the one-process run).
    per_worker: BTreeMap<String, Vec<String>>,
    expected: Vec<f64>,
    base: Vec<f32>,
    global: Vec<f32>,
}

/// Runs one round with `devices` test devices: one aggregator process, or a coordinator and
/// `workers` workers.
fn run_round(devices: usize, workers: usize) -> Run {
    let names: Vec<String> = (1..=devices).map(|i| format!("lab-{i}")).collect();
    let worker_ids: Vec<String> = (1..=workers).map(|i| format!("aggregator-{i}")).collect();
    let mut certs: Vec<&str> = names.iter().map(String::as_str).collect();
    certs.push("aggregator");
    certs.extend(worker_ids.iter().map(String::as_str));
    let broker = Mosquitto::start(&certs).expect("start mosquitto (tests/run.sh installs it)");
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let model = dir.join("model.onnx");
    write_test_model(&model, 2, 11);
    let proto = microfed::model::onnx::load(&model).unwrap();
    let base = microfed::model::onnx::load_params(&proto, &model)
        .unwrap()
        .decoder_flat();
    let version = microfed::model::manifest::sha256_file(&model).unwrap();

    // Workers first, so that the shared group exists before any update is sent.
    let mut procs = Vec::new();
    for w in &worker_ids {
        let cfg = config(
            &broker,
            dir,
            w,
            &model,
            &names,
            "[scale_out]\nrole = \"worker\"\ncoordinator = \"aggregator\"\n",
        );
        procs.push(start(&cfg, dir.join(format!("{w}.log"))));
    }
    for p in &procs {
        assert!(
            wait_until(Duration::from_secs(30), || p
                .log()
                .contains("connected to the broker")),
            "worker not connected:\n{}",
            p.log()
        );
    }
    let so = if workers > 0 {
        let list: Vec<String> = worker_ids.iter().map(|w| format!("{w:?}")).collect();
        format!(
            "[scale_out]\nrole = \"coordinator\"\nworkers = [{}]\npartial_timeout_s = 20.0\n",
            list.join(", ")
        )
    } else {
        String::new()
    };
    let coord_cfg = config(&broker, dir, "aggregator", &model, &names, &so);
    let coord = start(&coord_cfg, dir.join("aggregator.log"));
    let logs = |procs: &[Proc], coord: &Proc| {
        let mut s = format!("coordinator:\n{}", coord.log());
        for p in procs {
            s += &format!("\n{}:\n{}", p.log.display(), p.log());
        }
        s
    };

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let layout = compress::decoder_layout(2);
    let n = base.len();
    let mut expected = vec![0.0f64; n];
    let mut total_samples = 0u64;
    let (seconds, publish_seconds) = rt.block_on(async {
        // Every device waits for the open round, then all send their update.
        let mut clients = Vec::new();
        for name in &names {
            let mut c = TestClient::connect(tls_options(&broker, name))
                .await
                .unwrap();
            c.subscribe("microfed/scale/round", rumqttc::QoS::AtLeastOnce)
                .await
                .unwrap();
            clients.push(c);
        }
        for c in &mut clients {
            loop {
                let p = c
                    .expect_publish("the round announcement", Duration::from_secs(30))
                    .await
                    .unwrap_or_else(|e| panic!("{e}\n{}", logs(&procs, &coord)));
                let env = Envelope::from_bytes(&p.payload, 1 << 20).unwrap();
                let a: RoundAnnouncement = env.body(Kind::RoundAnnouncement).unwrap();
                if a.round == 1 && !a.closed {
                    assert_eq!(a.compression, compression());
                    break;
                }
            }
        }
        let mut messages = Vec::new();
        for (i, name) in names.iter().enumerate() {
            let values = update_values(i, n);
            let compressed = compress::compress(&values, &layout, &compression(), None).unwrap();
            // What the aggregator will see: the decompressed update, weighted by its samples.
            let seen = compress::decompress(&compressed, &layout).unwrap();
            let samples = (i + 1) as u64;
            total_samples += samples;
            for (e, v) in expected.iter_mut().zip(&seen) {
                *e += samples as f64 * f64::from(*v);
            }
            let body = UpdateBody {
                device: name.clone(),
                global_version: 0,
                samples,
                metrics: LocalMetrics::default(),
                compressed,
                norm: 0.0,
            };
            let h = Header {
                fleet: "scale",
                round: 1,
                model_version: &version,
                sender: name,
            };
            let bytes = Envelope::seal(Kind::Update, &h, &body)
                .unwrap()
                .to_bytes()
                .unwrap();
            let frames = protocol::split(&bytes, CHUNK_BYTES).unwrap();
            assert_eq!(frames.len(), 1, "one frame per update under scale-out");
            messages.push(frames.into_iter().next().unwrap());
        }
        let t0 = Instant::now();
        for ((c, name), m) in clients.iter_mut().zip(&names).zip(messages) {
            c.publish_acked(&format!("microfed/scale/update/{name}"), false, m)
                .await
                .unwrap();
        }
        let published = t0.elapsed().as_secs_f64();
        let done = wait_until(Duration::from_secs(60), || {
            state(dir, "aggregator")["history"]
                .as_array()
                .is_some_and(|h| !h.is_empty())
        });
        assert!(done, "no round summary:\n{}", logs(&procs, &coord));
        (t0.elapsed().as_secs_f64(), published)
    });
    expected.iter_mut().for_each(|e| *e /= total_samples as f64);

    // Every process finishes its one round and exits cleanly.
    let mut all = procs;
    all.push(coord);
    for p in &mut all {
        let exited = wait_until(Duration::from_secs(30), || {
            matches!(p.child.try_wait(), Ok(Some(_)))
        });
        let log = p.log();
        assert!(exited, "{} did not exit:\n{log}", p.log.display());
        assert!(p.child.wait().unwrap().success(), "{log}");
        assert!(!log.contains("panicked"), "{log}");
    }
    let s = state(dir, "aggregator");
    let summary = s["history"][0].clone();
    let mut per_worker = BTreeMap::new();
    for w in &worker_ids {
        let ws = state(dir, w);
        let accepted: Vec<String> = ws["accepted"]
            .as_object()
            .map(|o| o.keys().cloned().collect())
            .unwrap_or_default();
        per_worker.insert(w.clone(), accepted);
    }
    let g = std::fs::read(dir.join("state-aggregator/global-1.bin")).expect("global version 1");
    let global = protocol::bytes_f32(&g).unwrap();
    Run {
        seconds,
        publish_seconds,
        summary,
        per_worker,
        expected,
        base,
        global,
    }
}

#[test]
fn coordinator_and_two_workers_compute_the_fedavg_of_every_update_once() {
    let devices = 6;
    let run = run_round(devices, 2);
    let s = &run.summary;
    eprintln!("summary: {s:#}\nper worker: {:?}", run.per_worker);

    // The summary: all six, no straggler, no rejection, every sample counted.
    let accepted: Vec<&str> = s["accepted"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    let names: Vec<String> = (1..=devices).map(|i| format!("lab-{i}")).collect();
    assert_eq!(accepted, names, "{s:#}");
    assert_eq!(s["stragglers"], serde_json::json!([]), "{s:#}");
    assert_eq!(s["rejected"], serde_json::json!({}), "{s:#}");
    assert_eq!(s["samples"], (1..=devices as u64).sum::<u64>(), "{s:#}");
    assert_eq!(s["global_version"], 1);

    // Each update counted exactly once across the workers, and each worker took a share.
    let mut union: Vec<String> = run.per_worker.values().flatten().cloned().collect();
    union.sort();
    assert_eq!(
        union, names,
        "an update counted twice or lost: {:?}",
        run.per_worker
    );
    for (w, got) in &run.per_worker {
        assert!(!got.is_empty(), "{w} got no update: {:?}", run.per_worker);
    }

    // The global decoder is base + the FedAvg computed here (f64 sums, f32 result).
    let mut worst = 0.0f64;
    for ((g, b), e) in run.global.iter().zip(&run.base).zip(&run.expected) {
        let err = (f64::from(*g) - (f64::from(*b) + e)).abs();
        worst = worst.max(err / (1e-6 + f64::from(*b).abs()));
    }
    assert!(
        worst < 1e-5,
        "global differs from the FedAvg: worst relative error {worst}"
    );
    // And the updates moved it: not a vacuous comparison.
    let moved = run.expected.iter().filter(|e| e.abs() > 1e-6).count();
    assert!(moved > 1000, "{moved}");
}

#[test]
#[ignore = "benchmark: cargo test -p microfed-e2e --test scaleout_mosquitto -- --ignored --nocapture"]
fn scale_out_throughput() {
    let devices: usize = std::env::var("MICROFED_BENCH_DEVICES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(24);
    let one = run_round(devices, 0);
    let two = run_round(devices, 2);
    for (what, r) in [("1 process", &one), ("coordinator + 2 workers", &two)] {
        assert_eq!(r.summary["accepted"].as_array().unwrap().len(), devices);
        println!(
            "{what}: {devices} updates merged in {:.3} s = {:.1} updates/s (devices publishing: \
             {:.3} s; shares {:?})",
            r.seconds,
            devices as f64 / r.seconds,
            r.publish_seconds,
            r.per_worker.values().map(Vec::len).collect::<Vec<_>>()
        );
    }
}
