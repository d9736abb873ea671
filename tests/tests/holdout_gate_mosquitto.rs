//! The hold-out gate (issue 17), end to end on Mosquitto over TLS: a real agent with labelled
//! images is sent, with the aggregator's certificate and signing key, a global decoder that is
//! signed, finite and within `max_global_step` of the running one, but whose class scores are
//! negated (it segments everything wrong). The agent scores it on its hold-out images beside the
//! running decoder, keeps it out of production segmentation and says so; the next global (as good
//! as the running one) is swapped in.
//!
//! Personalisation (issue 15): with `[federation.personalise]`, the agent fine-tunes each new
//! global on its own images, and what goes live is the one of the two its hold-out prefers, as
//! its log and its retained status say.

use std::path::{Path, PathBuf};
use std::time::Duration;

use microfed::wire::protocol::{
    CHUNK_BYTES, Envelope, GlobalDecoder, Header, Kind, MAX_PACKET_BYTES, StatusBody, split,
};
use microfed_e2e::broker::{Mosquitto, TestClient, tls_options};
use microfed_e2e::{AgentProcess, synth_labelled, wait_until};
use rumqttc::QoS;

/// A broker, an agent of lab-a with six labelled optical micrographs (two held out), and the
/// aggregator's signing key.
struct Lab {
    broker: Mosquitto,
    agent: AgentProcess,
    key: microfed::fleet::signing::SecretKey,
    model: PathBuf,
    _tmp: tempfile::TempDir,
}

impl Lab {
    /// Starts it; `extra` is appended to agent.toml.
    fn start(extra: &str) -> Self {
        let broker = Mosquitto::start(&["lab-a", "aggregator"])
            .expect("start mosquitto (tests/run.sh installs it)");
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/grains/model.onnx");
        let key = microfed::fleet::signing::SecretKey::generate();
        let data = dir.join("labelled");
        synth_labelled(&data, "polycrystal", "optical-etched", 6, 128, 7);
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
                 [federation.broker.tls]\nca = {:?}\ncert = {cert:?}\nkey = {pem_key:?}\n{extra}",
                key.public().to_hex(),
                broker.port(),
                broker.ca_pem(),
            ),
        )
        .unwrap();
        let agent = AgentProcess::start(&dir.join("agent.toml"), &dir.join("agent.log"));
        assert!(
            wait_until(Duration::from_secs(180), || {
                let log = agent.log();
                log.contains("encoder features ready") && log.contains("connected to the broker")
            }),
            "agent not ready:\n{}",
            agent.log()
        );
        Self {
            broker,
            agent,
            key,
            model,
            _tmp: tmp,
        }
    }

    /// The base model's parameters.
    fn params(&self) -> microfed_kernels::unet::Params {
        let proto = microfed::model::onnx::load(&self.model).unwrap();
        microfed::model::onnx::load_params(&proto, &self.model).unwrap()
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    /// Publishes global `global_version`, signed by the aggregator, retained, as the aggregator does.
    fn publish(&self, global_version: u64, values: &[f32]) {
        let classes = self.params().classes;
        let version = microfed::model::manifest::sha256_file(&self.model).unwrap();
        let env = Envelope::seal(
            Kind::GlobalDecoder,
            &Header {
                fleet: "lab-test",
                round: global_version,
                model_version: &version,
                sender: "aggregator",
            },
            &GlobalDecoder::new(global_version, global_version, classes, values),
        )
        .unwrap()
        .sign(&self.key)
        .unwrap();
        let frames = split(&env.to_bytes().unwrap(), CHUNK_BYTES).unwrap();
        Self::runtime().block_on(async {
            let mut c = TestClient::connect(tls_options(&self.broker, "aggregator"))
                .await
                .unwrap();
            for (i, f) in frames.into_iter().enumerate() {
                c.publish_acked(&format!("microfed/lab-test/global/{i}"), true, f)
                    .await
                    .unwrap();
            }
        });
    }

    /// The agent's retained status, as the broker holds it now.
    fn status(&self) -> StatusBody {
        Self::runtime().block_on(async {
            let mut c = TestClient::connect(tls_options(&self.broker, "aggregator"))
                .await
                .unwrap();
            c.subscribe("microfed/lab-test/status/lab-a", QoS::AtLeastOnce)
                .await
                .unwrap();
            let p = c
                .expect_publish("the retained status", Duration::from_secs(10))
                .await
                .unwrap();
            Envelope::from_bytes(&p.payload, MAX_PACKET_BYTES)
                .and_then(|e| e.body(Kind::Status))
                .unwrap()
        })
    }

    fn stop(mut self) -> String {
        self.agent.terminate();
        let st = self.agent.wait(Duration::from_secs(30));
        let log = self.agent.log();
        assert!(st.success(), "{log}");
        assert!(!log.contains("panicked"), "{log}");
        log
    }
}

#[test]
fn a_global_that_scores_worse_on_the_hold_out_is_kept_out_of_production() {
    let lab = Lab::start("");
    let params = lab.params();
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

    lab.publish(1, &harmful);
    assert!(
        wait_until(Duration::from_secs(120), || lab
            .agent
            .log()
            .contains("global decoder not swapped into production")),
        "the harmful global was not kept out:\n{}",
        lab.agent.log()
    );
    let log = lab.agent.log();
    assert!(
        log.contains("scoring the new global on the hold-out"),
        "{log}"
    );
    assert!(log.contains("below the running decoder's"), "{log}");
    assert!(
        !log.contains("global decoder swapped into the running model"),
        "{log}"
    );
    assert!(
        !log.contains("personalised the new global"),
        "not asked: {log}"
    );

    // As good as the running decoder (it is the same): swapped in.
    lab.publish(2, &base);
    assert!(
        wait_until(Duration::from_secs(120), || lab
            .agent
            .log()
            .contains("global decoder swapped into the running model")),
        "the next global was not swapped in:\n{}",
        lab.agent.log()
    );
    lab.stop();
}

/// The value of `field=` in a tracing log line (`Some(0.71)`, `true`, ...).
fn field<'a>(line: &'a str, field: &str) -> &'a str {
    let at = line
        .find(&format!(" {field}="))
        .unwrap_or_else(|| panic!("no {field} in {line}"));
    let rest = &line[at + field.len() + 2..];
    rest.split_whitespace().next().unwrap()
}

fn score(s: &str) -> f64 {
    s.trim_start_matches("Some(")
        .trim_end_matches(')')
        .parse()
        .unwrap_or_else(|_| panic!("not a score: {s}"))
}

#[test]
fn with_personalisation_the_better_of_the_global_and_its_fine_tune_goes_live() {
    let lab = Lab::start("[federation.personalise]\nsteps = 30\n");
    let base = lab.params().decoder_flat();
    lab.publish(1, &base);
    assert!(
        wait_until(Duration::from_secs(240), || lab
            .agent
            .log()
            .contains("global decoder swapped into the running model")),
        "global 1 (the base decoder, as good as the running one) did not go live:\n{}",
        lab.agent.log()
    );
    let log = lab.agent.log();
    let tuned_line = log
        .lines()
        .find(|l| l.contains("personalised the new global"))
        .unwrap_or_else(|| panic!("no fine-tune:\n{log}"));
    let (global, tuned) = (
        score(field(tuned_line, "global")),
        score(field(tuned_line, "personalised")),
    );
    let swapped = log
        .lines()
        .find(|l| l.contains("global decoder swapped into the running model"))
        .unwrap();
    let expect = tuned > global;
    assert_eq!(
        field(swapped, "personalised"),
        expect.to_string(),
        "global {global}, fine-tune {tuned}:\n{log}"
    );
    // The retained status says what segments, and how it scored.
    let status_ok = || {
        let s = lab.status();
        s.live_global_version == 1
            && s.live_personalised == expect
            && s.live_holdout_iou == Some(global.max(tuned))
    };
    assert!(
        wait_until(Duration::from_secs(30), status_ok),
        "{:?}",
        lab.status()
    );
    eprintln!("hold-out mean IoU: global {global}, fine-tune {tuned}; live: fine-tune {expect}");
    lab.stop();
}
