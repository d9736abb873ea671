//! Secure aggregation against plain compressed rounds, over MQTT on loopback (docs/benchmarks.md).
//!
//! One process: the embedded broker (rumqttd), `n` devices each on its own MQTT connection, and the
//! aggregator's side. A **plain** round: every device compresses its update as a real round does
//! (top-10 % per tensor, int8, zstd, the demo's and the federation test's setting) and publishes it
//! chunked on `update/<device>`; the aggregator reassembles and decompresses all `n`. A **secure**
//! round: the aggregator's [`SecureRound`] (the state machine `microfed aggregate` runs) and `n`
//! [`SecAggClient`]s with enrolled, signed round keys ([`Trust`], as the agent runs them) exchange
//! the four steps as CBOR envelopes on `secagg/<device>` and `update/<device>`. With dropouts, the
//! first `round(p · n)` devices vanish right after sending their keys, so the shares step waits
//! `--step-timeout` for them and the server rebuilds nothing for them (they never shared); with
//! `--drop-after-shares` they vanish after their shares instead, and the server rebuilds their mask
//! keys and removes their pairwise masks (Bonawitz's expensive case).
//!
//! Traffic is the bytes of the MQTT payloads each device published and received (frames included,
//! MQTT headers not). Round time is the aggregator's wall clock from the round's first message to
//! the merged sum, on this machine's cores shared by every device, the broker and the aggregator.
//!
//! ```text
//! cargo run --release -p microfed --example secagg_bench -- --devices 5,20,100 --dropouts 0,0.1
//! ```

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;

use microfed::federated::compress::{self, CompressionConfig, Quantize};
use microfed::federated::secagg::{
    ClientMessage, SecAggClient, SecAggConfig, ServerMessage, Support, Trust, ring_bits_for,
    support_indices,
};
use microfed::federated::server::secure::{SecureAction, SecureEvent, SecureRound};
use microfed::fsio::now_unix;
use microfed::wire::link::{BrokerSettings, Link};
use microfed::wire::protocol::{
    CHUNK_BYTES, Envelope, Header, Kind, LocalMetrics, Reassembler, ReassemblyLimits, Topics,
    UpdateBody, split,
};
use microfed::wire::signing::SecretKey;

const MAX_MESSAGE: usize = 64 * 1024 * 1024;
const VALUE_CLIP: f32 = 0.05;

struct Args {
    devices: Vec<usize>,
    dropouts: Vec<f64>,
    classes: usize,
    step_timeout: f64,
    drop_after_shares: bool,
    /// Sparse secure rounds: this fraction of the coordinates, shared from a seed.
    support: Option<f64>,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut a = Args {
        devices: vec![5, 20, 100],
        dropouts: vec![0.0, 0.1],
        classes: 2,
        step_timeout: 3.0,
        drop_after_shares: false,
        support: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut v = || it.next().with_context(|| format!("{k} needs a value"));
        match k.as_str() {
            "--devices" => {
                a.devices = v()?
                    .split(',')
                    .map(|s| s.parse().context("--devices"))
                    .collect::<Result<_, _>>()?
            }
            "--dropouts" => {
                a.dropouts = v()?
                    .split(',')
                    .map(|s| s.parse().context("--dropouts"))
                    .collect::<Result<_, _>>()?
            }
            "--classes" => a.classes = v()?.parse().context("--classes")?,
            "--step-timeout" => a.step_timeout = v()?.parse().context("--step-timeout")?,
            "--drop-after-shares" => a.drop_after_shares = true,
            "--support" => a.support = Some(v()?.parse().context("--support")?),
            other => anyhow::bail!("unknown argument {other}"),
        }
    }
    anyhow::ensure!(
        a.devices.iter().all(|&n| (3..=1000).contains(&n)),
        "--devices: each in 3..=1000"
    );
    anyhow::ensure!(
        a.dropouts.iter().all(|p| (0.0..0.5).contains(p)),
        "--dropouts: each in [0, 0.5)"
    );
    Ok(a)
}

/// An update of a real decoder's size: small values, as local fine-tuning makes.
fn update(len: usize, seed: u64) -> Vec<f32> {
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    (0..len)
        .map(|_| rng.random_range(-1.0f32..1.0).powi(3) * 0.01)
        .collect()
}

fn envelope<T: serde::Serialize>(
    fleet: &str,
    sender: &str,
    round: u64,
    kind: Kind,
    body: &T,
) -> anyhow::Result<Vec<Vec<u8>>> {
    let header = Header {
        fleet,
        round,
        model_version: "bench",
        sender,
    };
    let env = Envelope::seal(kind, &header, body)?;
    Ok(split(&env.to_bytes()?, CHUNK_BYTES)?)
}

/// What one run measured.
struct Measured {
    /// Mean bytes a device that finished published / received.
    sent: f64,
    received: f64,
    seconds: f64,
    server_seconds: f64,
    in_sum: usize,
}

async fn plain_round(
    settings: &BrokerSettings,
    fleet: &str,
    n: usize,
    classes: usize,
) -> anyhow::Result<Measured> {
    let topics = Topics::new(fleet).map_err(anyhow::Error::msg)?;
    let layout = compress::decoder_layout(classes);
    let len: usize = layout.iter().map(|t| t.len).sum();
    let (server, mut rx) = Link::start(
        settings,
        "bench-aggregator",
        vec![topics.update_filter()],
        None,
    )?;
    server.wait_connected(Duration::from_secs(20)).await?;
    let mut links = Vec::new();
    for i in 0..n {
        let name = format!("dev-{i:04}");
        let (link, _rx) = Link::start(settings, &name, vec![], None)?;
        link.wait_connected(Duration::from_secs(20)).await?;
        links.push((name, link, _rx));
    }
    let cfg = CompressionConfig {
        top_k: Some(0.1),
        quantize: Quantize::Int8,
        zstd_level: Some(3),
        ..CompressionConfig::default()
    };
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (i, (name, link, rx)) in links.into_iter().enumerate() {
        let (cfg, layout, fleet, topic) = (
            cfg.clone(),
            layout.clone(),
            fleet.to_owned(),
            topics.update(&name),
        );
        tasks.push(tokio::spawn(async move {
            let u = update(len, i as u64);
            let compressed =
                tokio::task::spawn_blocking(move || compress::compress(&u, &layout, &cfg, None))
                    .await??;
            let body = UpdateBody {
                device: name.clone(),
                global_version: 0,
                samples: 10,
                metrics: LocalMetrics::default(),
                compressed,
                norm: 0.0,
            };
            let frames = envelope(&fleet, &name, 1, Kind::Update, &body)?;
            let bytes: usize = frames.iter().map(Vec::len).sum();
            link.publish_frames(|_| topic.clone(), frames, false)
                .await?;
            drop(rx);
            Ok::<(usize, Link), anyhow::Error>((bytes, link))
        }));
    }
    let mut reassembler = Reassembler::new(ReassemblyLimits::default());
    let mut got = 0;
    let mut server_seconds = 0.0;
    while got < n {
        let Ok(m) = tokio::time::timeout(Duration::from_secs(30), rx.recv()).await else {
            for t in tasks.iter_mut().filter(|t| t.is_finished()) {
                t.await??;
            }
            anyhow::bail!("plain round: no update for 30 s");
        };
        let m = m.context("link closed")?;
        if let Some(whole) = reassembler.push(&m.topic, &m.payload)? {
            let t = Instant::now();
            let env = Envelope::from_bytes(&whole, MAX_MESSAGE)?;
            let body: UpdateBody = env.body(Kind::Update)?;
            compress::decompress(&body.compressed, &layout)?;
            server_seconds += t.elapsed().as_secs_f64();
            got += 1;
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    let mut sent = 0;
    for t in tasks {
        let (b, link) = t.await??;
        sent += b;
        link.disconnect().await;
    }
    server.disconnect().await;
    Ok(Measured {
        sent: sent as f64 / n as f64,
        received: 0.0,
        seconds,
        server_seconds,
        in_sum: n,
    })
}

#[allow(clippy::too_many_arguments)]
async fn secure_round(
    settings: &BrokerSettings,
    fleet: &str,
    n: usize,
    drops: usize,
    classes: usize,
    step_timeout: f64,
    drop_after_shares: bool,
    support: Option<f64>,
) -> anyhow::Result<Measured> {
    let topics = Topics::new(fleet).map_err(anyhow::Error::msg)?;
    let len: usize = compress::decoder_layout(classes)
        .iter()
        .map(|t| t.len)
        .sum();
    let names: Vec<String> = (0..n).map(|i| format!("dev-{i:04}")).collect();
    let keys: Vec<Arc<SecretKey>> = (0..n)
        .map(|i| {
            let mut seed = [7u8; 32];
            seed[..8].copy_from_slice(&(i as u64 + 1).to_le_bytes());
            Arc::new(SecretKey::from_seed(seed))
        })
        .collect();
    let enrolled: BTreeMap<_, _> = names
        .iter()
        .zip(&keys)
        .map(|(d, k)| (d.clone(), k.public()))
        .collect();
    let threshold = n / 2 + 1;
    // Sparse rounds: every device masks the same coordinates, drawn from the round's seed.
    let sparse = support.map(|f| {
        let k = ((f * len as f64).ceil() as usize).clamp(1, len);
        (
            Support {
                seed: 42,
                dense: len,
            },
            k,
        )
    });
    let idx = match sparse {
        Some((s, k)) => Some(Arc::new(support_indices(s.seed, s.dense, k)?)),
        None => None,
    };
    let (server_link, mut rx) = Link::start(
        settings,
        "bench-aggregator",
        vec![topics.update_filter()],
        None,
    )?;
    server_link.wait_connected(Duration::from_secs(20)).await?;
    let mut tasks = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let (link, mut inbox) = Link::start(settings, name, vec![topics.secagg(name)], None)?;
        link.wait_connected(Duration::from_secs(20)).await?;
        let trust = Trust {
            signing: keys[i].clone(),
            enrolled: enrolled.clone(),
            min_threshold: threshold,
        };
        let (name, fleet, topic) = (name.clone(), fleet.to_owned(), topics.update(name));
        let idx = idx.clone();
        let vanish_after: Option<&'static str> =
            (i < drops).then_some(if drop_after_shares { "shares" } else { "keys" });
        tasks.push(tokio::spawn(async move {
            let full = update(len, i as u64);
            let input = match &idx {
                Some(idx) => idx.iter().map(|&j| full[j]).collect(),
                None => full,
            };
            let mut client = Some(SecAggClient::new(&name, input).with_trust(trust));
            let mut reassembler = Reassembler::new(ReassemblyLimits {
                max_message: MAX_MESSAGE,
                ..ReassemblyLimits::default()
            });
            let (mut sent, mut received) = (0usize, 0usize);
            loop {
                let Ok(Some(m)) =
                    tokio::time::timeout(Duration::from_secs(300), inbox.recv()).await
                else {
                    anyhow::bail!("{name}: nothing from the aggregator for 300 s");
                };
                received += m.payload.len();
                let Some(whole) = reassembler.push(&m.topic, &m.payload)? else {
                    continue;
                };
                let msg: ServerMessage =
                    Envelope::from_bytes(&whole, MAX_MESSAGE)?.body(Kind::SecAgg)?;
                let mut c = client.take().context("the client")?;
                let (answer, c) = tokio::task::spawn_blocking(move || {
                    let a = c.handle(msg);
                    (a, c)
                })
                .await?;
                client = Some(c);
                let Some(answer) = answer? else { continue };
                let step = match answer {
                    ClientMessage::Keys { .. } => "keys",
                    ClientMessage::Shares { .. } => "shares",
                    ClientMessage::Masked { .. } => "masked",
                    ClientMessage::Unmask { .. } => "unmask",
                };
                let frames = envelope(&fleet, &name, 1, Kind::SecAgg, &answer)?;
                sent += frames.iter().map(Vec::len).sum::<usize>();
                link.publish_frames(|_| topic.clone(), frames, false)
                    .await?;
                if vanish_after == Some(step) {
                    // Gone: the connection dropped without a DISCONNECT, nothing more read.
                    drop(link);
                    return Ok::<_, anyhow::Error>((false, sent, received, None));
                }
                if step == "unmask" {
                    return Ok((true, sent, received, Some(link)));
                }
            }
        }));
    }
    let config = SecAggConfig {
        threshold,
        clip: VALUE_CLIP,
        ring_bits: ring_bits_for(n),
        len: sparse.map_or(len, |(_, k)| k),
        norm_clip: None,
        support: sparse.map(|(s, _)| s),
    };
    let started = Instant::now();
    let (mut round, actions) =
        SecureRound::start(1, config, &names, n, now_unix() + 600.0, step_timeout)?;
    let mut pending = actions;
    let mut reassembler = Reassembler::new(ReassemblyLimits {
        max_message: MAX_MESSAGE,
        ..ReassemblyLimits::default()
    });
    let mut result = None;
    while result.is_none() {
        for a in std::mem::take(&mut pending) {
            match a {
                SecureAction::Send { to, msg, .. } => {
                    let frames = envelope(fleet, "bench-aggregator", 1, Kind::SecAgg, &msg)?;
                    let topic = topics.secagg(&to);
                    server_link
                        .publish_frames(|_| topic.clone(), frames, false)
                        .await?;
                }
                SecureAction::Refused { device, reason } => {
                    anyhow::bail!("{device}: refused: {reason}")
                }
                SecureAction::Finished(agg) => result = Some(agg),
                SecureAction::Failed(why) => anyhow::bail!("secure round failed: {why}"),
            }
        }
        if result.is_some() {
            break;
        }
        let event = match tokio::time::timeout(Duration::from_millis(100), rx.recv()).await {
            Ok(Some(m)) => {
                let Some(device) = topics.device_of("update", &m.topic).map(str::to_owned) else {
                    continue;
                };
                let Some(whole) = reassembler.push(&m.topic, &m.payload)? else {
                    continue;
                };
                let msg: ClientMessage =
                    Envelope::from_bytes(&whole, MAX_MESSAGE)?.body(Kind::SecAgg)?;
                SecureEvent::Message { device, msg }
            }
            Ok(None) => anyhow::bail!("aggregator link closed"),
            Err(_) => SecureEvent::Tick,
        };
        // The unmasking (server-side compute) runs inside `handle`: on a blocking thread.
        let (r, acts) = tokio::task::spawn_blocking(move || {
            let acts = round.handle(event, now_unix());
            (round, acts)
        })
        .await?;
        round = r;
        pending = acts;
    }
    let seconds = started.elapsed().as_secs_f64();
    let agg = result.context("no sum")?;
    let (mut sent, mut received, mut finished) = (0usize, 0usize, 0usize);
    for t in tasks {
        let (done, s, r, link) = t.await??;
        if done {
            finished += 1;
            sent += s;
            received += r;
        }
        if let Some(link) = link {
            link.disconnect().await;
        }
    }
    server_link.disconnect().await;
    Ok(Measured {
        sent: sent as f64 / finished.max(1) as f64,
        received: received as f64 / finished.max(1) as f64,
        seconds,
        server_seconds: round.server().compute_seconds,
        in_sum: agg.contributors.len(),
    })
}

fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let broker = microfed::wire::embedded::start(0)?;
        let settings = BrokerSettings {
            port: broker.addr.port(),
            ack_timeout_s: 120,
            ..BrokerSettings::default()
        };
        let len: usize = compress::decoder_layout(args.classes)
            .iter()
            .map(|t| t.len)
            .sum();
        println!(
            "decoder of {} classes: {len} coordinates; value clip ±{VALUE_CLIP}; step timeout {} s; \
             dropouts vanish after their {}",
            args.classes,
            args.step_timeout,
            if args.drop_after_shares { "shares" } else { "keys" }
        );
        // The same update sent dense as int8 (no top-k, no zstd): what the masked ring replaces.
        let layout = compress::decoder_layout(args.classes);
        let dense_cfg = CompressionConfig {
            quantize: Quantize::Int8,
            ..CompressionConfig::default()
        };
        let dense = compress::compress(&update(len, 0), &layout, &dense_cfg, None)?.len() as f64;
        println!("dense int8 update: {:.1} kB", dense / 1e3);
        println!(
            "| devices | round | dropped | in sum | sent per device (kB) | received per device (kB) | \
             × plain sent | × dense int8 | round time (s) | server compute (s) |"
        );
        println!("|---|---|---|---|---|---|---|---|---|---|");
        for &n in &args.devices {
            let plain = plain_round(&settings, &format!("plain{n}"), n, args.classes).await?;
            println!(
                "| {n} | plain (top-10 %, int8, zstd) | 0 | {} | {:.1} | – | 1.00 | {:.2} | {:.2} | {:.2} |",
                plain.in_sum,
                plain.sent / 1e3,
                plain.sent / dense,
                plain.seconds,
                plain.server_seconds
            );
            for &p in &args.dropouts {
                let drops = (p * n as f64).round() as usize;
                let m = secure_round(
                    &settings,
                    &format!("secure{n}x{drops}"),
                    n,
                    drops,
                    args.classes,
                    args.step_timeout,
                    args.drop_after_shares,
                    args.support,
                )
                .await?;
                let label = match args.support {
                    Some(f) => format!("secure, support {:.0} %", f * 100.0),
                    None => "secure".to_string(),
                };
                println!(
                    "| {n} | {label} | {drops} | {} | {:.1} | {:.1} | {:.2} | {:.2} | {:.2} | {:.2} |",
                    m.in_sum,
                    m.sent / 1e3,
                    m.received / 1e3,
                    m.sent / plain.sent,
                    m.sent / dense,
                    m.seconds,
                    m.server_seconds
                );
            }
        }
        Ok(())
    })
}
