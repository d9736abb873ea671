//! Property tests of every decoder that reads bytes from outside the process (issue 17): frames and
//! reassembly, envelopes and their bodies, update bodies and their decompression, style codes,
//! secure-aggregation messages, fleet packages, configurations and image headers.
//!
//! The generators build *structurally valid* messages with hostile fields (huge counts and lengths,
//! wrong digests, strings cut inside a character, NaN and infinities, forged senders), then also
//! flip and cut bytes of valid messages: random bytes alone rarely get past the first check.
//! Properties: nothing panics, nothing allocates from a count the sender claims, and what is
//! accepted satisfies the decoder's contract.
//!
//! Cost: 64 cases per property by default (a few seconds in all on the CI machine). For a release
//! run set `PROPTEST_CASES`, e.g. `PROPTEST_CASES=20000 cargo test -p microfed --test hostile_inputs
//! --release` (docs/reliability.md). A failure prints the minimal input: turn it into a unit test
//! beside the decoder it broke.

use std::time::Duration;

use microfed::federated::compress::{self, CompressionConfig, Quantize, decoder_layout};
use microfed::federated::edge::style::{StyleCode, StyleKind};
use microfed::federated::secagg::{
    ClientMessage, DeviceKeys, Sealed, SecAggClient, SecAggConfig, SecAggServer, ServerMessage,
    Share,
};
use microfed::federated::server::config::AggregatorConfig;
use microfed::fleet::package::{self, Signed};
use microfed::fleet::signing::{Purpose, SecretKey, TrustedKeys};
use microfed::micrograph::{Micrograph, Normalisation};
use microfed::wire::protocol::{
    self, Envelope, Frame, GlobalDecoder, Header, Kind, LocalMetrics, Reassembler,
    ReassemblyLimits, RoundAnnouncement, RoundSummary, SCHEMA_VERSION, StatusBody, UpdateBody,
};
use proptest::prelude::*;

/// Cases per property: `PROPTEST_CASES` when set, else `default`.
fn cases(default: u32) -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default);
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Counts as a sender would lie about them: small, near a power of two, or at the type's end.
fn hostile_u32() -> impl Strategy<Value = u32> {
    prop_oneof![
        0u32..8,
        Just(u32::MAX),
        Just(u32::MAX - 1),
        Just(1 << 31),
        Just(1 << 16),
        any::<u32>(),
    ]
}

fn hostile_u64() -> impl Strategy<Value = u64> {
    prop_oneof![
        0u64..8,
        Just(u64::MAX),
        Just(u64::MAX - 1),
        Just(1 << 62),
        Just(u64::from(u32::MAX)),
        any::<u64>(),
    ]
}

fn hostile_f32() -> impl Strategy<Value = f32> {
    prop_oneof![
        Just(f32::NAN),
        Just(f32::INFINITY),
        Just(f32::NEG_INFINITY),
        Just(f32::MAX),
        Just(-0.0f32),
        Just(f32::MIN_POSITIVE / 2.0),
        -10.0f32..10.0,
        any::<f32>(),
    ]
}

/// Strings a peer may send: ids, multi-byte characters (cut points inside them), separators, long.
fn hostile_string() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        Just("aaaaaaaaaaaé".to_owned()),
        Just("é".repeat(40)),
        Just("\u{1F600}".repeat(5)),
        Just("lab-a/../../etc".to_owned()),
        Just("+#\0$".to_owned()),
        Just("x".repeat(70_000)),
        "[a-z0-9-]{1,16}".prop_map(|s| s),
        any::<String>(),
    ]
}

fn header<'a>(sender: &'a str, model: &'a str) -> Header<'a> {
    Header {
        fleet: "f",
        round: 1,
        model_version: model,
        sender,
    }
}

// ---- frames and reassembly --------------------------------------------------------------------

fn hostile_frame() -> impl Strategy<Value = Frame> {
    (
        prop_oneof![Just(SCHEMA_VERSION), any::<u16>()],
        prop_oneof![
            Just(protocol::sha256_hex(b"m")),
            "[0-9a-f]{64}".prop_map(|s| s),
            hostile_string()
        ],
        hostile_u32(),
        hostile_u32(),
        hostile_u64(),
        prop::collection::vec(any::<u8>(), 0..600),
    )
        .prop_map(|(schema, digest, index, total, len, data)| Frame {
            schema,
            digest,
            index,
            total,
            len,
            data,
        })
}

proptest! {
    #![proptest_config(cases(64))]

    /// Hostile frames on several streams never panic, never hold more than the budget, and never
    /// stop an honest message on another stream from completing.
    #[test]
    fn reassembly_of_hostile_frames_is_bounded_and_honest_messages_complete(
        frames in prop::collection::vec((0usize..3, hostile_frame()), 1..40),
        honest_len in 1usize..5000,
        // Real senders use 256 KiB chunks; at 64 bytes the per-chunk bookkeeping already doubles
        // what a message costs.
        chunk in 64usize..1500,
        seed in any::<u64>(),
    ) {
        let limits = ReassemblyLimits {
            max_message: 64 * 1024,
            // Room for the honest message and what 40 hostile frames can hold: the property is
            // that no hostile frame takes the honest one's place, not that a budget too small for
            // all of them is enough.
            max_pending: 48 * 1024,
            timeout: Duration::from_secs(60),
        };
        let mut r = Reassembler::new(limits);
        let honest: Vec<u8> = (0..honest_len).map(|i| (i as u64 ^ seed) as u8).collect();
        let mut good = protocol::split(&honest, chunk).unwrap();
        // Interleave: the honest frames in a seeded order among the hostile ones.
        let rot = (seed as usize) % good.len();
        good.rotate_left(rot);
        let mut done = None;
        let mut hostile = frames.into_iter();
        for g in &good {
            for (stream, f) in hostile.by_ref().take(2) {
                let bytes = protocol::to_cbor("frame", &f).unwrap();
                let _ = r.push(&format!("update/evil-{stream}"), &bytes);
                prop_assert!(r.held() <= limits.max_pending, "held {}", r.held());
            }
            if let Some(m) = r.push("update/honest", g).unwrap() {
                done = Some(m);
            }
        }
        prop_assert_eq!(done, Some(honest));
    }

    /// Any bytes, and valid frames with bytes flipped or cut, are refused or decoded: no panic.
    #[test]
    fn frames_from_flipped_bytes_never_panic(
        msg in prop::collection::vec(any::<u8>(), 0..3000),
        flips in prop::collection::vec((any::<usize>(), any::<u8>()), 0..6),
        cut in any::<usize>(),
    ) {
        let mut r = Reassembler::new(ReassemblyLimits::default());
        for mut f in protocol::split(&msg, 700).unwrap() {
            for &(at, v) in &flips {
                let i = at % f.len();
                f[i] = v;
            }
            f.truncate(f.len() - cut % (f.len() / 2 + 1));
            let _ = r.push("s", &f);
        }
        prop_assert!(r.held() <= ReassemblyLimits::default().max_pending);
    }
}

// ---- envelopes and bodies ---------------------------------------------------------------------

proptest! {
    #![proptest_config(cases(64))]

    /// Envelopes with hostile header fields and a body of any type: every body decoder refuses or
    /// decodes, and a decoded global has exactly the length asked for.
    #[test]
    fn envelopes_and_bodies_with_hostile_fields_never_panic(
        sender in hostile_string(),
        model in hostile_string(),
        round in hostile_u64(),
        version in hostile_u64(),
        samples in hostile_u64(),
        values in prop::collection::vec(hostile_f32(), 0..64),
        ragged in 0usize..4,
        norm in hostile_f32(),
        kind in prop_oneof![Just(Kind::GlobalDecoder), Just(Kind::Update), Just(Kind::RoundAnnouncement), Just(Kind::Status)],
        tamper in any::<bool>(),
    ) {
        let mut g = GlobalDecoder::new(version, round, 2, &values);
        g.values.truncate(g.values.len().saturating_sub(ragged));
        let u = UpdateBody {
            device: sender.clone(),
            global_version: version,
            samples,
            metrics: LocalMetrics { train_loss: norm, holdout_mean_iou: Some(norm), ..LocalMetrics::default() },
            compressed: g.values.clone(),
            norm,
        };
        let h = Header { round, ..header(&sender, &model) };
        let mut env = match kind {
            Kind::GlobalDecoder => Envelope::seal(kind, &h, &g).unwrap(),
            Kind::Update => Envelope::seal(kind, &h, &u).unwrap(),
            _ => Envelope::seal(kind, &h, &(round, version, sender.clone())).unwrap(),
        };
        if tamper && !env.body.is_empty() {
            env.body[0] ^= 0x40;
        }
        let bytes = env.to_bytes().unwrap();
        if let Ok(e) = Envelope::from_bytes(&bytes, 1 << 20) {
            if let Ok(g) = e.body::<GlobalDecoder>(Kind::GlobalDecoder)
                && let Ok(v) = g.decoder(values.len())
            {
                prop_assert_eq!(v.len(), values.len());
            }
            let _ = e.body::<UpdateBody>(Kind::Update);
            let _ = e.body::<RoundAnnouncement>(Kind::RoundAnnouncement);
            let _ = e.body::<StatusBody>(Kind::Status);
            let _ = e.body::<RoundSummary>(Kind::RoundSummary);
        }
        let _ = Envelope::from_bytes(&bytes[..bytes.len() / 2], 1 << 20);
    }
}

// ---- update bodies and decompression ----------------------------------------------------------

fn small_layout() -> Vec<compress::TensorSpan> {
    // The real decoder layout (what the aggregator decodes against).
    decoder_layout(2)
}

proptest! {
    #![proptest_config(cases(48))]

    /// A valid compressed update with bytes flipped, cut or appended (in the header: counts,
    /// indices, scales, flags) decodes to the layout's length or is refused, never panics, and
    /// zstd bodies cannot inflate past the layout's bound.
    #[test]
    fn decompress_of_mutated_updates_is_refused_or_exact(
        top_k in prop_oneof![Just(None), Just(Some(0.01f32)), Just(Some(0.5f32))],
        quantize in prop_oneof![Just(Quantize::None), Just(Quantize::Int8), Just(Quantize::Int4)],
        zstd in prop_oneof![Just(None), Just(Some(1))],
        flips in prop::collection::vec((0usize..64, any::<u8>()), 0..4),
        tail_flip in prop::option::of((any::<usize>(), any::<u8>())),
        cut in 0usize..3,
        extra in prop::collection::vec(any::<u8>(), 0..3),
    ) {
        let layout = small_layout();
        let n: usize = layout.iter().map(|t| t.len).sum();
        let values: Vec<f32> = (0..n).map(|i| ((i % 13) as f32 - 6.0) * 1e-3).collect();
        let cfg = CompressionConfig { top_k, error_feedback: false, quantize, zstd_level: zstd };
        let mut b = compress::compress(&values, &layout, &cfg, None).unwrap();
        for &(at, v) in &flips {
            let i = at % b.len();
            b[i] = v;
        }
        if let Some((at, v)) = tail_flip {
            let i = at % b.len();
            b[i] ^= v;
        }
        b.truncate(b.len() - cut.min(b.len()));
        b.extend_from_slice(&extra);
        if let Ok(d) = compress::decompress(&b, &layout) {
            prop_assert_eq!(d.len(), n);
        }
    }

    /// A valid header followed by any bytes (a zstd flag with a hostile frame included).
    #[test]
    fn decompress_of_a_valid_header_and_hostile_rest_never_panics(
        flags in any::<u8>(),
        rest in prop::collection::vec(any::<u8>(), 0..2000),
    ) {
        let layout = small_layout();
        let n: usize = layout.iter().map(|t| t.len).sum();
        let good = compress::compress(&vec![0.0; n], &layout, &CompressionConfig::default(), None).unwrap();
        // magic (4), version (1), flags (1), tensor count (1-byte varint).
        let mut b = good[..7].to_vec();
        b[5] = flags;
        b.extend_from_slice(&rest);
        if let Ok(d) = compress::decompress(&b, &layout) {
            prop_assert_eq!(d.len(), n);
        }
    }
}

// ---- style codes ------------------------------------------------------------------------------

proptest! {
    #![proptest_config(cases(64))]

    #[test]
    fn style_codes_with_hostile_fields_are_refused_or_valid(
        device in hostile_string(),
        model in hostile_string(),
        fourier in any::<bool>(),
        images in hostile_u32(),
        noise in hostile_f32(),
        window in hostile_u32(),
        band in hostile_u32(),
        values in prop::collection::vec(hostile_f32(), 0..400),
    ) {
        let code = StyleCode {
            device,
            kind: if fourier { StyleKind::Fourier } else { StyleKind::FeatureStats },
            model_version: model,
            images,
            noise_sigma: noise,
            window,
            band,
            values,
        };
        let bytes = code.to_cbor().unwrap();
        if let Ok(c) = StyleCode::from_cbor(&bytes) {
            prop_assert!(c.values.iter().all(|v| v.is_finite()));
        }
        let _ = StyleCode::from_cbor(&bytes[..bytes.len() / 2]);
    }
}

// ---- secure aggregation -----------------------------------------------------------------------

fn hostile_keys(device: String) -> impl Strategy<Value = DeviceKeys> {
    (
        prop::collection::vec(any::<u8>(), 0..40),
        prop::collection::vec(any::<u8>(), 0..40),
        prop::collection::vec(any::<u8>(), 0..70),
    )
        .prop_map(move |(cipher_pk, mask_pk, signature)| DeviceKeys {
            device: device.clone(),
            cipher_pk,
            mask_pk,
            signature,
        })
}

fn hostile_share() -> impl Strategy<Value = Share> {
    (
        hostile_string(),
        hostile_u64(),
        prop::collection::vec(any::<u64>(), 0..6),
    )
        .prop_map(|(owner, x, y)| Share { owner, x, y })
}

fn hostile_client_message() -> impl Strategy<Value = ClientMessage> {
    let round = prop_oneof![Just(1u64), hostile_u64()];
    prop_oneof![
        (round.clone(), hostile_string().prop_flat_map(hostile_keys))
            .prop_map(|(round, keys)| ClientMessage::Keys { round, keys }),
        (
            round.clone(),
            prop::collection::vec(
                (
                    hostile_string(),
                    hostile_string(),
                    prop::collection::vec(any::<u8>(), 0..80)
                )
                    .prop_map(|(from, to, ciphertext)| Sealed {
                        from,
                        to,
                        ciphertext
                    }),
                0..4
            ),
            prop::collection::vec(any::<u8>(), 0..40)
        )
            .prop_map(|(round, shares, self_seed_digest)| ClientMessage::Shares {
                round,
                shares,
                self_seed_digest
            }),
        (round.clone(), prop::collection::vec(any::<u8>(), 0..64))
            .prop_map(|(round, values)| ClientMessage::Masked { round, values }),
        (
            round,
            prop::collection::vec(hostile_share(), 0..4),
            prop::collection::vec(hostile_share(), 0..4)
        )
            .prop_map(|(round, self_seeds, mask_keys)| ClientMessage::Unmask {
                round,
                self_seeds,
                mask_keys
            }),
    ]
}

proptest! {
    #![proptest_config(cases(48))]

    /// A round of three honest devices and one hostile one: the hostile messages (at every step,
    /// under its own name or another's) are refused or absorbed, never a panic, and the server
    /// either finishes or reports why not.
    #[test]
    fn secagg_server_survives_hostile_client_messages(
        hostile in prop::collection::vec(hostile_client_message(), 1..8),
        claim in prop_oneof![Just("d".to_owned()), Just("a".to_owned()), hostile_string()],
    ) {
        let devices: Vec<String> = ["a", "b", "c", "d"].iter().map(|s| s.to_string()).collect();
        let len = 8;
        let mut server = SecAggServer::new(1, SecAggConfig::new(4, len, 1.0), &devices).unwrap();
        let mut clients: Vec<SecAggClient> = devices[..3]
            .iter()
            .map(|d| SecAggClient::new(d, vec![0.1; len]))
            .collect();
        let mut outbox = server.start();
        let mut hostile = hostile.into_iter();
        for _ in 0..5 {
            for (to, msg) in std::mem::take(&mut outbox) {
                if let Some(c) = clients.iter_mut().find(|c| c.device() == to)
                    && let Ok(Some(reply)) = c.handle(msg)
                {
                    let _ = server.receive(&to, reply);
                }
            }
            if let Some(m) = hostile.next() {
                // Also as bytes through CBOR, as the wire carries it.
                let bytes = protocol::to_cbor("secagg", &m).unwrap();
                if let Ok(m) = protocol::from_cbor::<ClientMessage>("secagg", &bytes) {
                    let _ = server.receive(&claim, m);
                }
            }
            match server.advance() {
                Ok(next) => outbox = next,
                Err(_) => break,
            }
        }
    }

    /// A device facing a hostile aggregator: any server message is refused or handled.
    #[test]
    fn secagg_client_survives_hostile_server_messages(
        round in hostile_u64(),
        threshold in 0usize..6,
        ring_bits in hostile_u32(),
        len in prop_oneof![0usize..16, Just(usize::MAX), Just(1usize << 40)],
        clip in hostile_f32(),
        keys in prop::collection::vec(hostile_string().prop_flat_map(hostile_keys), 0..5),
        survivors in prop::collection::vec(hostile_string(), 0..5),
        norm_clip in prop::option::of(hostile_f32()),
        trusted in any::<bool>(),
    ) {
        let mut c = SecAggClient::new("a", vec![0.1; 8]);
        if trusted {
            // As the agent runs it: signed keys, an enrolled roster, a minimum threshold.
            let key = std::sync::Arc::new(SecretKey::from_seed([9; 32]));
            let enrolled = [("a".to_owned(), key.public())].into_iter().collect();
            c = c.with_trust(microfed::federated::secagg::Trust {
                signing: key,
                enrolled,
                min_threshold: 2,
            });
        }
        let config = SecAggConfig { threshold, clip, ring_bits, len, norm_clip, support: None };
        let _ = c.handle(ServerMessage::Start { round, config });
        let _ = c.handle(ServerMessage::Roster { round, keys });
        let _ = c.handle(ServerMessage::Shares { round, shares: vec![] });
        let _ = c.handle(ServerMessage::Survivors { round, survivors });
    }
}

// ---- fleet packages ---------------------------------------------------------------------------

proptest! {
    #![proptest_config(cases(64))]

    /// Signed packages with hostile keys, signatures and bytes: only a true signature by a trusted
    /// key opens, and decoding never panics.
    #[test]
    fn fleet_packages_with_hostile_fields_are_refused(
        bytes in prop::collection::vec(any::<u8>(), 0..300),
        key in prop::option::of(prop::collection::vec(any::<u8>(), 0..40)),
        sig in prop::option::of(prop::collection::vec(any::<u8>(), 0..70)),
        fleet in prop_oneof![Just("f".to_owned()), hostile_string()],
        release in any::<bool>(),
    ) {
        let trusted_key = SecretKey::from_seed([7; 32]);
        let trusted = TrustedKeys::parse(&[trusted_key.public().to_hex()]).unwrap();
        let signed = Signed {
            bytes: bytes.clone(),
            key: key.map(serde_bytes::ByteBuf::from),
            signature: sig.map(serde_bytes::ByteBuf::from),
        };
        let env = if release {
            package::encode_release(&fleet, "v", &signed)
        } else {
            package::encode_command(&fleet, &signed)
        };
        if let Ok(env) = env
            && let Ok((_, s)) = package::decode(&env, "f")
        {
            prop_assert!(s.open_release("f", &trusted).is_err());
            prop_assert!(s.open_command("f", &trusted).is_err());
        }
        // The right key over other bytes still fails.
        let real = trusted_key.sign(Purpose::Command, b"something else");
        let forged = Signed {
            bytes,
            key: Some(serde_bytes::ByteBuf::from(trusted_key.public().0.to_vec())),
            signature: Some(serde_bytes::ByteBuf::from(real.to_vec())),
        };
        prop_assert!(forged.open_command("f", &trusted).is_err());
    }
}

// ---- configurations ---------------------------------------------------------------------------

fn toml_number(v: f64) -> String {
    if v.is_nan() {
        "nan".into()
    } else if v.is_infinite() {
        if v > 0.0 { "inf".into() } else { "-inf".into() }
    } else {
        format!("{v:?}")
    }
}

proptest! {
    #![proptest_config(cases(64))]

    /// aggregator.toml with hostile numbers: parsed and validated, or refused with a message.
    #[test]
    fn aggregator_configs_with_hostile_numbers_are_refused_or_sane(
        deadline in prop_oneof![Just(f64::NAN), Just(f64::INFINITY), Just(-1.0), Just(0.0), 0.1f64..1e6],
        norm in prop_oneof![Just(f64::NAN), Just(f64::INFINITY), Just(-1.0), Just(0.0), 0.001f64..1e4],
        samples in hostile_u64(),
        quorum_fraction in prop_oneof![Just(f64::NAN), Just(-0.5), Just(0.0), Just(2.0), 0.01f64..1.0],
        lr in prop_oneof![Just(f64::NAN), Just(-1.0), Just(0.0), 1e-6f64..1.0],
        fleet in prop_oneof![Just("f".to_owned()), hostile_string()],
    ) {
        let text = format!(
            "fleet = {fleet:?}\nmodel = \"m.onnx\"\nstate = \"s\"\ndevices = [\"a\"]\n\
             max_update_norm = {}\nmax_samples = {}\n[round]\ndeadline_s = {}\nquorum_fraction = {}\n\
             local_epochs = 1\nsteps_per_epoch = 1\nlearning_rate = {}\nprox_mu = 0.0\npause_s = 0.0\n",
            toml_number(norm),
            samples.min(i64::MAX as u64),
            toml_number(deadline),
            toml_number(quorum_fraction),
            toml_number(lr),
        );
        if let Ok(cfg) = toml::from_str::<AggregatorConfig>(&text)
            && cfg.validate().is_ok()
        {
            prop_assert!(cfg.max_update_norm.is_finite() && cfg.max_update_norm > 0.0);
            prop_assert!(cfg.max_samples > 0 && cfg.max_samples.checked_mul(1_000_000).is_some());
            prop_assert!(cfg.round.deadline_s > 0.0);
            prop_assert!(cfg.round.learning_rate > 0.0);
            prop_assert!(cfg.quorum() >= 1);
        }
    }

    /// agent.toml with hostile text around a valid file: refused with a message or loaded.
    #[test]
    fn agent_configs_with_hostile_text_never_panic(
        extra in prop_oneof![
            Just("[federation]\nfleet = \"é\"\n".to_owned()),
            Just("[pipeline]\nworkers = -1\n".to_owned()),
            Just("[federation]\nmax_update_norm = nan\n".to_owned()),
            any::<String>(),
        ],
    ) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("agent.toml");
        std::fs::write(&p, extra).unwrap();
        let _ = microfed::node::config::AgentConfig::load(&p);
    }
}

// ---- image headers ----------------------------------------------------------------------------

/// A PNG of one IHDR (with the given fields), one IDAT of `data`, and IEND.
fn png(width: u32, height: u32, depth: u8, colour: u8, data: &[u8]) -> Vec<u8> {
    fn crc32(bytes: &[u8]) -> u32 {
        let mut c = !0u32;
        for &b in bytes {
            c ^= u32::from(b);
            for _ in 0..8 {
                c = if c & 1 == 1 {
                    0xEDB8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
            }
        }
        !c
    }
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut chunk = |kind: &[u8], d: &[u8]| {
        out.extend_from_slice(&(d.len() as u32).to_be_bytes());
        let mut body = kind.to_vec();
        body.extend_from_slice(d);
        out.extend_from_slice(&body);
        out.extend_from_slice(&crc32(&body).to_be_bytes());
    };
    let mut ihdr = width.to_be_bytes().to_vec();
    ihdr.extend_from_slice(&height.to_be_bytes());
    ihdr.extend_from_slice(&[depth, colour, 0, 0, 0]);
    chunk(b"IHDR", &ihdr);
    chunk(b"IDAT", data);
    chunk(b"IEND", &[]);
    out
}

proptest! {
    #![proptest_config(cases(64))]

    /// PNG headers announcing any size and colour type: refused (too large, corrupt, unsupported)
    /// or decoded to exactly the announced size within the limits; no bomb gets decoded.
    #[test]
    fn image_headers_with_hostile_sizes_are_refused_or_within_limits(
        width in hostile_u32(),
        height in hostile_u32(),
        depth in prop_oneof![Just(1u8), Just(8), Just(16), any::<u8>()],
        colour in prop_oneof![Just(0u8), Just(2), Just(4), Just(6), any::<u8>()],
        data in prop::collection::vec(any::<u8>(), 0..64),
        tiff in any::<bool>(),
    ) {
        let bytes = if tiff {
            // A little-endian TIFF header pointing at hostile bytes.
            let mut b = b"II*\0\x08\0\0\0".to_vec();
            b.extend_from_slice(&(width as u16).to_le_bytes());
            b.extend_from_slice(&data);
            b
        } else {
            png(width, height, depth, colour, &data)
        };
        let p = std::path::Path::new("hostile.png");
        match Micrograph::decode(&bytes, p, &Normalisation::default()) {
            Ok(m) => {
                prop_assert!(u64::from(m.width) * u64::from(m.height) <= microfed::micrograph::MAX_PIXELS);
                prop_assert_eq!(m.pixels.len(), m.width as usize * m.height as usize);
            }
            Err(e) => prop_assert!(e.to_string().contains("hostile.png"), "{}", e),
        }
    }
}
