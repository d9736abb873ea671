//! Secure aggregation over a real Mosquitto (TLS, client certificates, the fleet's ACL): five labs
//! and the aggregator run one round of `microfed::federated::secagg` with distributed DP-FedAvg noise.
//! Devices answer on their own `update/<lab>` topic (the only one the ACL lets them write); the
//! aggregator talks to each on `secagg/<lab>` (the only one of those a lab may read). `lab-5` vanishes
//! right after sending its masked update. The test checks that the aggregate is exactly the sum of
//! the five labs' quantised updates (so within one quantisation step per lab of the plain sum), that
//! the aggregator's state never held an unmasked update nor both secrets of any lab, and that the
//! round summary the labs receive reports ε.

use std::time::{Duration, Instant};

use anyhow::Context;
use rand::SeedableRng;

use microfed::federated::compress;
use microfed::federated::dp::{self, DpConfig, PrivacyReport, RdpAccountant};
use microfed::federated::secagg::{
    ClientMessage, SecAggClient, SecAggConfig, SecAggServer, ServerMessage, Step,
};
use microfed::wire::link::{BrokerSettings, Link, TlsFiles};
use microfed::wire::protocol::{
    CHUNK_BYTES, Envelope, Header, Kind, Reassembler, ReassemblyLimits, RoundSummary, Topics, split,
};
use microfed_e2e::broker::Mosquitto;

const FLEET: &str = "lab-test";
const LABS: [&str; 5] = ["lab-1", "lab-2", "lab-3", "lab-4", "lab-5"];
const VANISHES: &str = "lab-5";
const MAX_MESSAGE: usize = 64 * 1024 * 1024;

fn settings(broker: &Mosquitto, name: &str) -> BrokerSettings {
    let (cert, key) = broker.client_cert(name);
    BrokerSettings {
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

fn seal<T: serde::Serialize>(sender: &str, round: u64, body: &T) -> anyhow::Result<Vec<Vec<u8>>> {
    let header = Header {
        fleet: FLEET,
        round,
        model_version: "secagg-test",
        sender,
    };
    let env = Envelope::seal(Kind::SecAgg, &header, body)?;
    Ok(split(&env.to_bytes()?, CHUNK_BYTES)?)
}

/// What a lab ends with: its own quantised update, the input it masked, and the summary it read.
struct LabOutcome {
    name: String,
    codes: Vec<i8>,
    input: Vec<f32>,
    summary: Option<RoundSummary>,
}

async fn lab(
    settings: BrokerSettings,
    name: &'static str,
    input: Vec<f32>,
) -> anyhow::Result<LabOutcome> {
    let topics = Topics::new(FLEET).map_err(anyhow::Error::msg)?;
    let (link, mut rx) = Link::start(
        &settings,
        name,
        vec![topics.secagg(name), topics.summary()],
        None,
    )?;
    link.wait_connected(Duration::from_secs(20)).await?;
    let mut client = SecAggClient::new(name, input.clone());
    let mut reassembler = Reassembler::new(ReassemblyLimits::default());
    let mut summary = None;
    let mut finished = false;
    while !finished || summary.is_none() {
        let msg = tokio::time::timeout(Duration::from_secs(60), rx.recv())
            .await
            .with_context(|| format!("{name}: nothing from the aggregator for 60 s"))?
            .context("link closed")?;
        if msg.topic == topics.summary() {
            let env = Envelope::from_bytes(&msg.payload, MAX_MESSAGE)?;
            summary = Some(env.body::<RoundSummary>(Kind::RoundSummary)?);
            continue;
        }
        let Some(bytes) = reassembler.push(&msg.topic, &msg.payload)? else {
            continue;
        };
        let env = Envelope::from_bytes(&bytes, MAX_MESSAGE)?;
        anyhow::ensure!(env.sender == "aggregator", "{name}: from {}", env.sender);
        let server_msg: ServerMessage = env.body(Kind::SecAgg)?;
        let Some(answer) = client.handle(server_msg)? else {
            continue;
        };
        let masked = matches!(answer, ClientMessage::Masked { .. });
        finished = matches!(answer, ClientMessage::Unmask { .. });
        let topic = topics.update(name);
        link.publish_frames(|_| topic.clone(), seal(name, env.round, &answer)?, false)
            .await?;
        if masked && name == VANISHES {
            // Gone for good right after its masked update: no DISCONNECT, no further answer.
            drop(link);
            return Ok(LabOutcome {
                name: name.into(),
                codes: client.codes().to_vec(),
                input,
                summary: None,
            });
        }
    }
    link.disconnect().await;
    Ok(LabOutcome {
        name: name.into(),
        codes: client.codes().to_vec(),
        input,
        summary,
    })
}

async fn send_all(
    link: &Link,
    topics: &Topics,
    round: u64,
    out: Vec<(String, ServerMessage)>,
    retain: bool,
) -> anyhow::Result<()> {
    for (to, msg) in out {
        let topic = topics.secagg(&to);
        link.publish_frames(|_| topic.clone(), seal("aggregator", round, &msg)?, retain)
            .await?;
    }
    Ok(())
}

/// The aggregator: runs the four steps; a step closes when every device of it answered or after
/// `deadline` (only the unmasking step has to wait for the vanished lab).
async fn aggregator(
    settings: BrokerSettings,
    config: SecAggConfig,
    dp_cfg: DpConfig,
) -> anyhow::Result<(SecAggServer, PrivacyReport, usize)> {
    let topics = Topics::new(FLEET).map_err(anyhow::Error::msg)?;
    let (link, mut rx) = Link::start(&settings, "aggregator", vec![topics.update_filter()], None)?;
    link.wait_connected(Duration::from_secs(20)).await?;
    let names: Vec<String> = LABS.iter().map(|s| s.to_string()).collect();
    let round = 1;
    let mut server = SecAggServer::new(round, config, &names)?;
    // The start is retained, so a lab that subscribes late still gets it.
    send_all(&link, &topics, round, server.start(), true).await?;
    let mut reassembler = Reassembler::new(ReassemblyLimits::default());
    let mut received_bytes = 0;
    while server.step() != Step::Done {
        let deadline = Instant::now()
            + if server.step() == Step::Unmask {
                Duration::from_secs(4)
            } else {
                Duration::from_secs(60)
            };
        while !server.waiting_for().is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            let Ok(msg) = tokio::time::timeout(left, rx.recv()).await else {
                break;
            };
            let msg = msg.context("aggregator link closed")?;
            // The sender is the topic's device: the broker lets only that certificate write it.
            let device = topics
                .device_of("update", &msg.topic)
                .with_context(|| format!("unexpected topic {}", msg.topic))?
                .to_owned();
            received_bytes += msg.payload.len();
            let Some(bytes) = reassembler.push(&msg.topic, &msg.payload)? else {
                continue;
            };
            let env = Envelope::from_bytes(&bytes, MAX_MESSAGE)?;
            server.receive(&device, env.body::<ClientMessage>(Kind::SecAgg)?)?;
        }
        let out = server.advance()?;
        send_all(&link, &topics, round, out, false).await?;
    }
    // Distributed DP: each lab added its share of N(0, (zC)²); one round of the Gaussian mechanism.
    let mut accountant = RdpAccountant::new();
    accountant.step(dp_cfg.sampling_rate, dp_cfg.noise_multiplier, 1)?;
    let report = PrivacyReport::new(
        "dp-fedavg (distributed, secure aggregation)",
        &dp_cfg,
        &accountant,
    );
    let agg = server.result().context("no aggregate")?;
    let summary = RoundSummary {
        round,
        accepted: agg.contributors.clone(),
        stragglers: agg.dropped.clone(),
        update_bytes: received_bytes as u64,
        privacy: Some(report.clone()),
        ..RoundSummary::default()
    };
    let env = Envelope::seal(
        Kind::RoundSummary,
        &Header {
            fleet: FLEET,
            round,
            model_version: "secagg-test",
            sender: "aggregator",
        },
        &summary,
    )?;
    link.publish(&topics.summary(), env.to_bytes()?, true)
        .await?;
    link.disconnect().await;
    Ok((server, report, received_bytes))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn five_labs_aggregate_securely_over_mosquitto_when_one_vanishes_after_sending() {
    let mut names: Vec<&str> = LABS.to_vec();
    names.push("aggregator");
    let broker = Mosquitto::start(&names).expect("start mosquitto (tests/run.sh installs it)");

    // A real decoder's worth of coordinates (2 classes: 783,874), each lab's update clipped to
    // C = 1 and noised with its share of the noise for ε = 8 at δ = 1e-5 over this one round.
    let len = compress::dense_len(&compress::decoder_layout(2)) / 4;
    let z = dp::noise_multiplier_for(8.0, 1e-5, 1.0, 1).unwrap();
    let dp_cfg = DpConfig {
        clip_norm: 1.0,
        noise_multiplier: z,
        sampling_rate: 1.0,
        delta: 1e-5,
    };
    let per_lab_std = z / (LABS.len() as f64).sqrt();
    // The shared quantisation range: four standard deviations of one lab's noise.
    let config = SecAggConfig::new(LABS.len(), len, (4.0 * per_lab_std) as f32);

    let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(11);
    let mut tasks = Vec::new();
    for (i, name) in LABS.iter().enumerate() {
        // A lab's update: a smooth pattern of norm well above C, so clipping matters.
        let mut update: Vec<f32> = (0..len)
            .map(|j| 0.01 * ((j as f32) * 0.001 * (i + 1) as f32).sin())
            .collect();
        let norm = dp::privatise_update(&mut update, &dp_cfg, LABS.len(), &mut rng).unwrap();
        assert!(norm > 1.0, "{name}: norm {norm}");
        tasks.push(tokio::spawn(lab(settings(&broker, name), name, update)));
    }
    let (server, report, received) = aggregator(settings(&broker, "aggregator"), config, dp_cfg)
        .await
        .unwrap();
    let mut labs = Vec::new();
    for t in tasks {
        labs.push(t.await.unwrap().unwrap());
    }

    let agg = server.result().unwrap();
    // lab-5's masked update arrived before it vanished: it is in the sum, and nobody is missing.
    assert_eq!(agg.contributors, LABS.to_vec());
    assert!(agg.dropped.is_empty());
    // Exactly the sum of the labs' own int8 codes...
    let codes: Vec<i32> = (0..len)
        .map(|j| labs.iter().map(|l| i32::from(l.codes[j])).sum())
        .collect();
    assert_eq!(agg.codes, codes);
    // ...so within one quantisation step per lab of the plain sum of what they masked.
    let sum = agg.sum();
    let step = config_scale(&server);
    let mut worst = 0f32;
    for (j, s) in sum.iter().enumerate() {
        let plain: f32 = labs
            .iter()
            .map(|l| l.input[j].clamp(-127.0 * step, 127.0 * step))
            .sum();
        worst = worst.max((s - plain).abs());
    }
    assert!(
        worst <= 5.0 * step * 1.001,
        "worst error {worst}, step {step}"
    );

    // The aggregator's state: masked vectors that do not match any lab's update, lab-5's self seed
    // rebuilt (from the others' shares), no mask key rebuilt, never both secrets of one lab.
    let audit = server.audit();
    assert_eq!(audit.self_seeds.len(), 5);
    assert!(audit.self_seeds.contains(VANISHES));
    assert!(audit.mask_keys.is_empty());
    let mask = (1u32 << server.config().ring_bits) - 1;
    for l in &labs {
        let held = &audit.masked[&l.name];
        let lifted = l.codes.iter().map(|&c| (i32::from(c) as u32) & mask);
        let equal = held.iter().zip(lifted).filter(|(a, b)| **a == *b).count();
        // Uniform over 2^11 values: about len / 2048 ≈ 383 equal by chance.
        assert!(
            (equal as f64) < 2.0 * len as f64 / 2048.0,
            "{}: {equal} coordinates of the held vector equal its update",
            l.name
        );
    }

    // ε per round in the summary, as every remaining lab received it.
    assert!(
        report.epsilon <= 8.0 && report.epsilon > 7.9,
        "ε = {}",
        report.epsilon
    );
    for l in labs.iter().filter(|l| l.name != VANISHES) {
        let s = l.summary.as_ref().expect("summary");
        let p = s.privacy.as_ref().expect("privacy report");
        assert_eq!(p.epsilon, report.epsilon);
        assert_eq!(p.steps, 1);
        assert_eq!(s.accepted, LABS.to_vec());
    }
    eprintln!(
        "secagg over Mosquitto: {len} coordinates, ring {} bits, {received} bytes received by the \
         aggregator, ε = {:.3} (z = {z:.3})",
        server.config().ring_bits,
        report.epsilon
    );
}

fn config_scale(server: &SecAggServer) -> f32 {
    server.config().scale()
}
