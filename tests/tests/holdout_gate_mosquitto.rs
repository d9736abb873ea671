//! The hold-out gate (issue 17), end to end on Mosquitto over TLS: a real agent with labelled
//! images is sent, with the aggregator's certificate and signing key, a global decoder that is
//! signed, finite and within `max_global_step` of the running one, but whose class scores are
//! negated (it segments everything wrong). The agent scores it on its hold-out images beside the
//! running decoder, keeps it out of production segmentation and says so; the next global (as good
//! as the running one) is swapped in.

use std::path::Path;
use std::time::Duration;

use microfed::wire::protocol::{CHUNK_BYTES, Envelope, GlobalDecoder, Header, Kind, split};
use microfed_e2e::broker::{Mosquitto, TestClient, tls_options};
use microfed_e2e::{AgentProcess, microfed, wait_until};

#[test]
fn a_global_that_scores_worse_on_the_hold_out_is_kept_out_of_production() {
    let broker = Mosquitto::start(&["lab-a", "aggregator"])
        .expect("start mosquitto (tests/run.sh installs it)");
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/grains/model.onnx");
    let key = microfed::fleet::signing::SecretKey::generate();

    let data = dir.join("labelled");
    microfed(
        &[
            "synth",
            "--structure",
            "polycrystal",
            "--style",
            "optical-etched",
            "--count",
            "6",
            "--size",
            "128",
            "--seed",
            "7",
            "--out",
            data.to_str().unwrap(),
        ],
        true,
    );
    let (cert, pem_key) = broker.client_cert("lab-a");
    std::fs::write(
        dir.join("agent.toml"),
        format!(
            "[folders]\nwatch = \"in\"\noutput = \"out\"\nquarantine = \"q\"\n\
             [model]\npath = {model:?}\nthreads = 1\n\
             [tiling]\ntile = 64\noverlap = 16\n\
             [federation]\nfleet = \"lab-test\"\ndevice = \"lab-a\"\nlabelled = \"labelled\"\n\
             holdout_fraction = 0.34\nholdout_margin = 0.02\n\
             state = \"fed\"\ndevice_kind = \"cpu\"\nbatch = 2\ncrop = 64\n\
             aggregator_key = \"{}\"\n\
             [federation.broker]\nhost = \"127.0.0.1\"\nport = {}\nkeep_alive_s = 5\n\
             [federation.broker.tls]\nca = {:?}\ncert = {cert:?}\nkey = {pem_key:?}\n",
            key.public().to_hex(),
            broker.port(),
            broker.ca_pem(),
        ),
    )
    .unwrap();
    let mut agent = AgentProcess::start(&dir.join("agent.toml"), &dir.join("agent.log"));
    assert!(
        wait_until(Duration::from_secs(180), || {
            let log = agent.log();
            log.contains("encoder features ready") && log.contains("connected to the broker")
        }),
        "agent not ready:\n{}",
        agent.log()
    );

    let proto = microfed::model::onnx::load(&model).unwrap();
    let params = microfed::model::onnx::load_params(&proto, &model).unwrap();
    let base = params.decoder_flat();
    let layout = microfed::federated::compress::decoder_layout(params.classes);
    // The last tensors of the layout are the output convolution (weights, bias): negated, every
    // pixel's most likely class becomes its least likely.
    let out: usize = layout[layout.len() - 2..].iter().map(|t| t.len).sum();
    let mut harmful = base.clone();
    let n = harmful.len();
    harmful[n - out..].iter_mut().for_each(|v| *v = -*v);
    let step = harmful
        .iter()
        .zip(&base)
        .map(|(a, b)| f64::from(a - b).powi(2))
        .sum::<f64>()
        .sqrt();
    assert!(
        step < 100.0,
        "within max_global_step, so only the gate can stop it: {step}"
    );
    let version = microfed::model::manifest::sha256_file(&model).unwrap();
    let publish = |global_version: u64, values: &[f32]| {
        let env = Envelope::seal(
            Kind::GlobalDecoder,
            &Header {
                fleet: "lab-test",
                round: global_version,
                model_version: &version,
                sender: "aggregator",
            },
            &GlobalDecoder::new(global_version, global_version, params.classes, values),
        )
        .unwrap()
        .sign(&key)
        .unwrap();
        let frames = split(&env.to_bytes().unwrap(), CHUNK_BYTES).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let mut c = TestClient::connect(tls_options(&broker, "aggregator"))
                .await
                .unwrap();
            for (i, f) in frames.into_iter().enumerate() {
                c.publish_acked(&format!("microfed/lab-test/global/{i}"), true, f)
                    .await
                    .unwrap();
            }
        });
    };

    publish(1, &harmful);
    assert!(
        wait_until(Duration::from_secs(120), || agent
            .log()
            .contains("global decoder not swapped into production")),
        "the harmful global was not kept out:\n{}",
        agent.log()
    );
    let log = agent.log();
    assert!(
        log.contains("scoring the new global on the hold-out"),
        "{log}"
    );
    assert!(log.contains("below the running decoder's"), "{log}");
    assert!(
        !log.contains("global decoder swapped into the running model"),
        "{log}"
    );

    // As good as the running decoder (it is the same): swapped in.
    publish(2, &base);
    assert!(
        wait_until(Duration::from_secs(120), || agent
            .log()
            .contains("global decoder swapped into the running model")),
        "the next global was not swapped in:\n{}",
        agent.log()
    );
    agent.terminate();
    let st = agent.wait(Duration::from_secs(30));
    let log = agent.log();
    assert!(st.success(), "{log}");
    assert!(!log.contains("panicked"), "{log}");
}
