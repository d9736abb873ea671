//! Scale-out aggregation against a real Mosquitto over TLS (client certificates, the fleet ACL): one
//! coordinator and two workers, each a separate `microfed aggregate` process, share a round's
//! updates through the `$share/aggregators/…` subscription, or (sharded) each its shard of the
//! devices on a plain subscription. Test clients act as the devices and send
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

/// A broker, the aggregator processes (one, or a coordinator and workers) and `devices` test
/// devices connected and waiting for round 1, with their updates ready.
struct Fleet {
    broker: Mosquitto,
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    base: Vec<f32>,
    names: Vec<String>,
    worker_ids: Vec<String>,
    worker_cfgs: Vec<PathBuf>,
    workers: Vec<Proc>,
    coord_cfg: PathBuf,
    coord: Proc,
    rt: tokio::runtime::Runtime,
    clients: Vec<TestClient>,
    /// Each device's single-frame update message, and the FedAvg of them all (f64).
    messages: Vec<Vec<u8>>,
    expected: Vec<f64>,
}

impl Fleet {
    /// Workers on the share group.
    fn start(devices: usize, workers: usize) -> Self {
        Self::start_with(devices, workers, false)
    }

    /// `sharded`: each worker takes a shard of the devices (`shard = i`, `shards = workers`) on a
    /// plain subscription instead of the share group.
    fn start_with(devices: usize, workers: usize, sharded: bool) -> Self {
        let names: Vec<String> = (1..=devices).map(|i| format!("lab-{i}")).collect();
        let worker_ids: Vec<String> = (1..=workers).map(|i| format!("aggregator-{i}")).collect();
        let mut certs: Vec<&str> = names.iter().map(String::as_str).collect();
        certs.push("aggregator");
        certs.extend(worker_ids.iter().map(String::as_str));
        let broker = Mosquitto::start(&certs).expect("start mosquitto (tests/run.sh installs it)");
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_owned();
        let model = dir.join("model.onnx");
        write_test_model(&model, 2, 11);
        let proto = microfed::model::onnx::load(&model).unwrap();
        let base = microfed::model::onnx::load_params(&proto, &model)
            .unwrap()
            .decoder_flat();
        let version = microfed::model::manifest::sha256_file(&model).unwrap();

        // Workers first, so that the shared group exists before any update is sent.
        let mut procs = Vec::new();
        let mut worker_cfgs = Vec::new();
        for (i, w) in worker_ids.iter().enumerate() {
            let shard = if sharded {
                format!("shard = {i}\nshards = {workers}\n")
            } else {
                String::new()
            };
            let cfg = config(
                &broker,
                &dir,
                w,
                &model,
                &names,
                &format!("[scale_out]\nrole = \"worker\"\ncoordinator = \"aggregator\"\n{shard}"),
            );
            procs.push(start(&cfg, dir.join(format!("{w}.log"))));
            worker_cfgs.push(cfg);
        }
        for p in &procs {
            connected(p);
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
        let coord_cfg = config(&broker, &dir, "aggregator", &model, &names, &so);
        let coord = start(&coord_cfg, dir.join("aggregator.log"));

        let layout = compress::decoder_layout(2);
        let n = base.len();
        let mut expected = vec![0.0f64; n];
        let mut total_samples = 0u64;
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
        expected.iter_mut().for_each(|e| *e /= total_samples as f64);

        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let mut fleet = Self {
            broker,
            _tmp: tmp,
            dir,
            base,
            names,
            worker_ids,
            worker_cfgs,
            workers: procs,
            coord_cfg,
            coord,
            rt,
            clients: Vec::new(),
            messages,
            expected,
        };
        // Every device waits for the open round.
        let clients = fleet.rt.block_on(async {
            let mut clients = Vec::new();
            for name in &fleet.names {
                let mut c = TestClient::connect(tls_options(&fleet.broker, name))
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
                        .unwrap_or_else(|e| panic!("{e}\n{}", fleet.logs()));
                    let env = Envelope::from_bytes(&p.payload, 1 << 20).unwrap();
                    let a: RoundAnnouncement = env.body(Kind::RoundAnnouncement).unwrap();
                    if a.round == 1 && !a.closed {
                        assert_eq!(a.compression, compression());
                        break;
                    }
                }
            }
            clients
        });
        fleet.clients = clients;
        fleet
    }

    fn logs(&self) -> String {
        let mut s = format!("coordinator:\n{}", self.coord.log());
        for p in &self.workers {
            s += &format!("\n{}:\n{}", p.log.display(), p.log());
        }
        s
    }

    /// Devices `range` send their updates (each PUBACKed by the broker).
    fn publish(&mut self, range: std::ops::Range<usize>) {
        let Self {
            rt,
            clients,
            names,
            messages,
            ..
        } = self;
        rt.block_on(async {
            for i in range {
                clients[i]
                    .publish_acked(
                        &format!("microfed/scale/update/{}", names[i]),
                        false,
                        messages[i].clone(),
                    )
                    .await
                    .unwrap();
            }
        });
    }

    /// Devices accepted so far, per worker (from their state files).
    fn per_worker(&self) -> BTreeMap<String, Vec<String>> {
        self.worker_ids
            .iter()
            .map(|w| {
                let accepted = state(&self.dir, w)["accepted"]
                    .as_object()
                    .map(|o| o.keys().cloned().collect())
                    .unwrap_or_default();
                (w.clone(), accepted)
            })
            .collect()
    }

    /// Waits until the workers have accepted `n` updates between them.
    fn wait_accepted(&self, n: usize) {
        assert!(
            wait_until(Duration::from_secs(30), || self
                .per_worker()
                .values()
                .map(Vec::len)
                .sum::<usize>()
                == n),
            "{:?}\n{}",
            self.per_worker(),
            self.logs()
        );
    }

    /// Sends `signal` (`STOP`, `CONT`) to every worker process.
    fn signal_workers(&self, signal: &str) {
        for p in &self.workers {
            let ok = Command::new("kill")
                .args([&format!("-{signal}"), &p.child.id().to_string()])
                .status()
                .unwrap()
                .success();
            assert!(ok, "kill -{signal} {}", p.log.display());
        }
    }

    /// Devices `range` connect again (after a broker restart).
    fn reconnect(&mut self, range: std::ops::Range<usize>) {
        let Self {
            rt,
            clients,
            names,
            broker,
            ..
        } = self;
        rt.block_on(async {
            for i in range {
                clients[i] = TestClient::connect(tls_options(broker, &names[i]))
                    .await
                    .unwrap();
            }
        });
    }

    /// SIGKILLs worker `w` and starts it again on the same configuration and state.
    fn kill_and_restart_worker(&mut self, w: usize) {
        let p = &mut self.workers[w];
        p.child.kill().unwrap();
        p.child.wait().unwrap();
        let log = self
            .dir
            .join(format!("{}-restarted.log", self.worker_ids[w]));
        self.workers[w] = start(&self.worker_cfgs[w], log);
        connected(&self.workers[w]);
    }

    /// SIGKILLs the coordinator and starts it again on the same configuration and state.
    fn kill_and_restart_coordinator(&mut self) {
        self.coord.child.kill().unwrap();
        self.coord.child.wait().unwrap();
        self.coord = start(&self.coord_cfg, self.dir.join("aggregator-restarted.log"));
        connected(&self.coord);
    }

    /// Waits for round 1's summary, then for every process to exit cleanly; the result.
    fn finish(mut self, t0: Instant, publish_seconds: f64) -> Run {
        let done = wait_until(Duration::from_secs(90), || {
            state(&self.dir, "aggregator")["history"]
                .as_array()
                .is_some_and(|h| !h.is_empty())
        });
        assert!(done, "no round summary:\n{}", self.logs());
        let seconds = t0.elapsed().as_secs_f64();
        let logs = self.logs();
        for p in self.workers.iter_mut().chain([&mut self.coord]) {
            let exited = wait_until(Duration::from_secs(30), || {
                matches!(p.child.try_wait(), Ok(Some(_)))
            });
            assert!(exited, "{} did not exit:\n{logs}", p.log.display());
            assert!(p.child.wait().unwrap().success(), "{logs}");
            assert!(!p.log().contains("panicked"), "{logs}");
        }
        let summary = state(&self.dir, "aggregator")["history"][0].clone();
        let g = std::fs::read(self.dir.join("state-aggregator/global-1.bin"))
            .expect("global version 1");
        Run {
            seconds,
            publish_seconds,
            summary,
            per_worker: self.per_worker(),
            expected: std::mem::take(&mut self.expected),
            base: std::mem::take(&mut self.base),
            global: protocol::bytes_f32(&g).unwrap(),
        }
    }
}

/// Waits until an aggregator process says it is connected.
fn connected(p: &Proc) {
    assert!(
        wait_until(Duration::from_secs(30), || p
            .log()
            .contains("connected to the broker")),
        "{} not connected:\n{}",
        p.log.display(),
        p.log()
    );
}

/// Runs one round with `devices` test devices: one aggregator process, or a coordinator and
/// `workers` workers.
fn run_round(devices: usize, workers: usize) -> Run {
    let mut fleet = Fleet::start(devices, workers);
    let t0 = Instant::now();
    fleet.publish(0..devices);
    let published = t0.elapsed().as_secs_f64();
    fleet.finish(t0, published)
}

/// The round's summary accepts every device once, with no straggler or rejection, and the global
/// decoder is base + the FedAvg computed here (f64 sums, f32 result).
fn check_fedavg_of_every_update_once(run: &Run, devices: usize) {
    let s = &run.summary;
    let accepted: Vec<&str> = s["accepted"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    let names: Vec<String> = (1..=devices).map(|i| format!("lab-{i}")).collect();
    assert_eq!(accepted, names, "{s:#}");
    assert_eq!(s["stragglers"], serde_json::json!([]), "{s:#}");
    assert_eq!(s["samples"], (1..=devices as u64).sum::<u64>(), "{s:#}");
    assert_eq!(s["global_version"], 1);
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
fn coordinator_and_two_workers_compute_the_fedavg_of_every_update_once() {
    let devices = 6;
    let run = run_round(devices, 2);
    eprintln!(
        "summary: {:#}\nper worker: {:?}",
        run.summary, run.per_worker
    );
    check_fedavg_of_every_update_once(&run, devices);
    assert_eq!(run.summary["rejected"], serde_json::json!({}));
    // Each update counted exactly once across the workers, and each worker took a share.
    let names: Vec<String> = (1..=devices).map(|i| format!("lab-{i}")).collect();
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
}

/// Issue 17: a worker SIGKILLed in the middle of a round (it holds accepted updates) and started
/// again: it replays what it had accepted from disk, the broker delivers what it had not
/// acknowledged, and the round's global is still the FedAvg of every update, each counted once.
#[test]
fn a_worker_killed_mid_round_and_restarted_loses_and_doubles_nothing() {
    let devices = 6;
    let mut fleet = Fleet::start(devices, 2);
    let t0 = Instant::now();
    fleet.publish(0..3);
    assert!(
        wait_until(Duration::from_secs(30), || {
            let w = fleet.per_worker();
            w.values().map(Vec::len).sum::<usize>() == 3 && !w["aggregator-1"].is_empty()
        }),
        "aggregator-1 holds none of the first three updates: {:?}\n{}",
        fleet.per_worker(),
        fleet.logs()
    );
    let held = fleet.per_worker()["aggregator-1"].clone();
    fleet.kill_and_restart_worker(0);
    fleet.publish(3..devices);
    let run = fleet.finish(t0, 0.0);
    eprintln!(
        "aggregator-1 held {held:?} when killed; summary: {:#}\nper worker: {:?}",
        run.summary, run.per_worker
    );
    check_fedavg_of_every_update_once(&run, devices);
    for d in &held {
        assert!(
            run.per_worker["aggregator-1"].contains(d),
            "{d} lost by the restart"
        );
    }
}

/// Issue 17: the coordinator SIGKILLed in the middle of a round and started again: it resumes the
/// open round from its state, hears the workers' tallies again, and closes the round with the
/// FedAvg of every update, each counted once.
#[test]
fn a_coordinator_killed_mid_round_and_restarted_closes_the_round_with_every_update() {
    let devices = 6;
    let mut fleet = Fleet::start(devices, 2);
    let t0 = Instant::now();
    fleet.publish(0..3);
    fleet.wait_accepted(3);
    fleet.kill_and_restart_coordinator();
    fleet.publish(3..devices);
    let run = fleet.finish(t0, 0.0);
    eprintln!(
        "summary: {:#}\nper worker: {:?}",
        run.summary, run.per_worker
    );
    check_fedavg_of_every_update_once(&run, devices);
}

/// Issue 17: the broker restarts in the middle of a round and devices send their updates before
/// the workers are back (they are paused, SIGSTOP, so this is not a race). Sharded workers hold
/// plain subscriptions in persistent sessions, which Mosquitto restores from its database: the
/// updates wait for them, and the round's global is the FedAvg of every update, each counted once
/// by the worker of its shard. (On the share group the same run loses those updates: Mosquitto
/// does not restore shared subscriptions, and the round ends at its deadline with stragglers.)
#[test]
fn sharded_workers_lose_nothing_sent_while_the_broker_restarts() {
    let devices = 6;
    let mut fleet = Fleet::start_with(devices, 2, true);
    let t0 = Instant::now();
    fleet.publish(0..3);
    fleet.wait_accepted(3);
    fleet.signal_workers("STOP");
    fleet.broker.restart().unwrap();
    fleet.reconnect(3..devices);
    fleet.publish(3..devices);
    fleet.signal_workers("CONT");
    let run = fleet.finish(t0, 0.0);
    eprintln!(
        "summary: {:#}\nper worker: {:?}",
        run.summary, run.per_worker
    );
    check_fedavg_of_every_update_once(&run, devices);
    // Each worker took exactly its shard: lab-1..lab-6 sorted, alternately.
    assert_eq!(
        run.per_worker["aggregator-1"],
        ["lab-1", "lab-3", "lab-5"],
        "{:?}",
        run.per_worker
    );
    assert_eq!(
        run.per_worker["aggregator-2"],
        ["lab-2", "lab-4", "lab-6"],
        "{:?}",
        run.per_worker
    );
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
