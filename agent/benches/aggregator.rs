//! Aggregator throughput and memory: N simulated agents on loopback send compressed decoder updates
//! to a real `microfed aggregate` process through the embedded broker; reports updates merged per
//! second (end to end: broker, reassembly, checks, decompression, the durable write, the merge) and
//! the aggregator process's peak resident memory, for streaming FedAvg and for the median (which
//! must keep every update).
//!
//! ```text
//! cargo build --release -p microfed --bin microfed
//! cargo bench -p microfed --bench aggregator -- [--clients 100] [--rounds 3] [--top-k 0.05]
//! ```
//! Results are printed as Markdown rows for docs/benchmarks.md.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use microfed::federated::compress::{self, CompressionConfig, Quantize};
use microfed::wire::link::{BrokerSettings, Link};
use microfed::wire::protocol::{
    self, CHUNK_BYTES, Envelope, Header, Kind, LocalMetrics, RoundAnnouncement, Topics, UpdateBody,
};
use microfed_kernels::unet::Params;
use rand::SeedableRng;
use rand_distr::{Distribution, Normal};

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn microfed_bin() -> PathBuf {
    if let Ok(p) = std::env::var("MICROFED") {
        return p.into();
    }
    // target/<profile>/deps/aggregator-… → target/<profile>/microfed
    let exe = std::env::current_exe().expect("bench path");
    exe.parent()
        .and_then(Path::parent)
        .map(|d| d.join("microfed"))
        .expect("target folder")
}

/// Peak and current resident memory (VmHWM, VmRSS) of a process, in MiB.
fn memory_mib(pid: u32) -> Option<(f64, f64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| -> Option<f64> {
        s.lines()
            .find(|l| l.starts_with(name))?
            .split_whitespace()
            .nth(1)?
            .parse::<f64>()
            .ok()
            .map(|kb| kb / 1024.0)
    };
    Some((field("VmHWM:")?, field("VmRSS:")?))
}

struct Outcome {
    rule: String,
    clients: usize,
    update_bytes: usize,
    round_seconds: Vec<f64>,
    peak_mib: f64,
}

fn run(rule: &str, clients: usize, rounds: u64, top_k: f32) -> Outcome {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = dir.path().join("model.onnx");
    let params = Params::init(2, 1).expect("params");
    microfed::model::onnx::save(
        &microfed::model::onnx::export(&params, &vec![]).expect("export"),
        &model,
    )
    .expect("save");
    let version = microfed::model::manifest::sha256_file(&model).expect("sha");
    let layout = compress::decoder_layout(2);
    let n: usize = layout.iter().map(|t| t.len).sum();
    let cfg = CompressionConfig {
        top_k: Some(top_k),
        error_feedback: false,
        quantize: Quantize::Int8,
        zstd_level: Some(3),
    };
    // One realistic update per client (Gaussian, σ = 1e-3), compressed once.
    let updates: Vec<Vec<u8>> = (0..clients)
        .map(|i| {
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(i as u64);
            let d = Normal::new(0.0f32, 1e-3).expect("normal");
            let u: Vec<f32> = (0..n).map(|_| d.sample(&mut rng)).collect();
            compress::compress(&u, &layout, &cfg, None).expect("compress")
        })
        .collect();
    let update_bytes = updates.iter().map(Vec::len).sum::<usize>() / clients;

    let broker = microfed::wire::embedded::start(0).expect("embedded broker");
    let devices: Vec<String> = (0..clients).map(|i| format!("sim-{i:04}")).collect();
    let state = dir.path().join("state");
    let toml = format!(
        "id = \"aggregator\"\nfleet = \"bench\"\nmodel = {model:?}\nstate = {state:?}\nrounds = {rounds}\n\
         devices = {devices:?}\nmax_update_norm = 1000.0\n\
         [round]\ndeadline_s = 600.0\nquorum = {clients}\nlocal_epochs = 1\nsteps_per_epoch = 1\n\
         learning_rate = 0.01\nprox_mu = 0.0\npause_s = 0.0\n\
         [aggregation]\nrule = {{ kind = \"{rule}\" }}\n\
         [broker]\nhost = \"127.0.0.1\"\nport = {}\n",
        broker.addr.port()
    );
    let config = dir.path().join("aggregator.toml");
    std::fs::write(&config, toml).expect("config");
    let mut child = Command::new(microfed_bin())
        .args(["aggregate", "--config"])
        .arg(&config)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start microfed aggregate (build it: cargo build --release -p microfed)");
    let pid = child.id();

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let settings = BrokerSettings {
        port: broker.addr.port(),
        ack_timeout_s: 120,
        ..BrokerSettings::default()
    };
    let topics = Topics::new("bench").expect("topics");
    let mut peak = 0.0f64;
    rt.block_on(async {
        let mut tasks = Vec::new();
        for (i, d) in devices.iter().enumerate() {
            let (link, mut rx) =
                Link::start(&settings, d, vec![topics.round()], None).expect("link");
            let (t, d, v, payload) = (
                topics.clone(),
                d.clone(),
                version.clone(),
                updates[i].clone(),
            );
            tasks.push(tokio::spawn(async move {
                let mut sent = 0u64;
                while let Some(m) = rx.recv().await {
                    let Ok(env) = Envelope::from_bytes(&m.payload, 1 << 20) else {
                        continue;
                    };
                    let Ok(a) = env.body::<RoundAnnouncement>(Kind::RoundAnnouncement) else {
                        continue;
                    };
                    if a.closed || a.round <= sent {
                        if a.closed && a.round >= rounds {
                            break;
                        }
                        continue;
                    }
                    let body = UpdateBody {
                        device: d.clone(),
                        global_version: a.global_version,
                        samples: 10,
                        metrics: LocalMetrics::default(),
                        compressed: payload.clone(),
                        norm: 0.0,
                    };
                    let h = Header {
                        fleet: "bench",
                        round: a.round,
                        model_version: &v,
                        sender: &d,
                    };
                    let bytes = Envelope::seal(Kind::Update, &h, &body)
                        .and_then(|e| e.to_bytes())
                        .expect("seal");
                    let frames = protocol::split(&bytes, CHUNK_BYTES).expect("split");
                    if link
                        .publish_frames(|_| t.update(&d), frames, false)
                        .await
                        .is_ok()
                    {
                        sent = a.round;
                    }
                }
                link.disconnect().await;
            }));
        }
        let started = Instant::now();
        loop {
            if let Some((hwm, _)) = memory_mib(pid) {
                peak = peak.max(hwm);
            }
            if matches!(child.try_wait(), Ok(Some(_)))
                || started.elapsed() > Duration::from_secs(1200)
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        for t in tasks {
            t.abort();
        }
    });
    let _ = child.kill();
    let s: serde_json::Value =
        serde_json::from_slice(&std::fs::read(state.join("aggregator.json")).expect("state"))
            .expect("state json");
    let round_seconds = s["history"]
        .as_array()
        .map(|h| {
            h.iter()
                .filter(|r| r["accepted"].as_array().map(Vec::len) == Some(clients))
                .filter_map(|r| r["seconds"].as_f64())
                .collect()
        })
        .unwrap_or_default();
    Outcome {
        rule: rule.into(),
        clients,
        update_bytes,
        round_seconds,
        peak_mib: peak,
    }
}

fn main() {
    let clients: usize = arg("--clients").and_then(|v| v.parse().ok()).unwrap_or(100);
    let rounds: u64 = arg("--rounds").and_then(|v| v.parse().ok()).unwrap_or(3);
    let top_k: f32 = arg("--top-k").and_then(|v| v.parse().ok()).unwrap_or(0.05);
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "aggregator bench: {clients} simulated agents, {rounds} rounds, updates top-{:.0}% + int8 + zstd, {cpus} CPUs",
        top_k * 100.0
    );
    println!(
        "\n| rule | agents | update bytes | s per round (each) | updates merged / s (median round) | aggregator peak RSS |"
    );
    println!("|---|---|---|---|---|---|");
    for rule in ["fedavg", "median"] {
        let o = run(rule, clients, rounds, top_k);
        let mut s = o.round_seconds.clone();
        s.sort_by(f64::total_cmp);
        let med = s.get(s.len() / 2).copied().unwrap_or(f64::NAN);
        println!(
            "| {} | {} | {} | {} | {:.0} | {:.0} MiB |",
            o.rule,
            o.clients,
            o.update_bytes,
            o.round_seconds
                .iter()
                .map(|v| format!("{v:.2}"))
                .collect::<Vec<_>>()
                .join(", "),
            o.clients as f64 / med,
            o.peak_mib
        );
    }
}
