//! A full disk on a lab's board (issue 17), end to end on Mosquitto over TLS: a real agent trains a
//! round while every write into its outbox fails with ENOSPC (injected: `MICROFED_FAIL_WRITES`,
//! debug builds). The update used to be logged and lost; it is kept in memory, the agent goes on
//! running and says why, and once the disk has room the update is stored, delivered and counted by
//! the real aggregator. The error-feedback residual, the participant state (the last trained round)
//! and the lab's style code, whose saves fail too, are kept in memory, each failure is logged once,
//! and each file is written once there is room.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use microfed_e2e::broker::Mosquitto;
use microfed_e2e::{AgentProcess, microfed_bin, synth_labelled, wait_until};

#[test]
fn an_update_the_outbox_cannot_store_is_kept_and_delivered_once_the_disk_has_room() {
    let broker = Mosquitto::start(&["lab-a", "aggregator"])
        .expect("start mosquitto (tests/run.sh installs it)");
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/grains/model.onnx");
    let key_path = dir.join("aggregator.key");
    let key = microfed::fleet::signing::SecretKey::generate();
    key.save(&key_path).unwrap();

    let data = dir.join("labelled");
    synth_labelled(&data, "polycrystal", "sem-se", 5, 128, 3);
    let (cert, pem_key) = broker.client_cert("lab-a");
    std::fs::write(
        dir.join("agent.toml"),
        format!(
            "[folders]\nwatch = \"in\"\noutput = \"out\"\nquarantine = \"q\"\n\
             [model]\npath = {model:?}\nthreads = 1\n\
             [tiling]\ntile = 64\noverlap = 16\n\
             [federation]\nfleet = \"lab-test\"\ndevice = \"lab-a\"\nlabelled = \"labelled\"\n\
             state = \"fed\"\ndevice_kind = \"cpu\"\nbatch = 2\ncrop = 64\n\
             aggregator_key = \"{}\"\n\
             [federation.style]\nkind = \"feature-stats\"\nmin_images = 3\n\
             [federation.broker]\nhost = \"127.0.0.1\"\nport = {}\nkeep_alive_s = 5\n\
             [federation.broker.tls]\nca = {:?}\ncert = {cert:?}\nkey = {pem_key:?}\n",
            key.public().to_hex(),
            broker.port(),
            broker.ca_pem(),
        ),
    )
    .unwrap();
    // The disk is full for the outbox and the error-feedback residual from the start.
    let full = dir.join("disk-full");
    std::fs::write(
        &full,
        "fed/outbox\nfed/residual\nfed/participant\nfed/style-code\n",
    )
    .unwrap();
    let mut agent = AgentProcess::start_with_env(
        &dir.join("agent.toml"),
        &dir.join("agent.log"),
        &[(microfed::fsio::FAIL_WRITES_ENV, &full)],
    );
    assert!(
        wait_until(Duration::from_secs(180), || {
            let log = agent.log();
            log.contains("encoder features ready") && log.contains("connected to the broker")
        }),
        "agent not ready:\n{}",
        agent.log()
    );

    let agg_dir = dir.join("aggregator");
    std::fs::create_dir_all(&agg_dir).unwrap();
    let (acert, akey) = broker.client_cert("aggregator");
    let agg_toml = agg_dir.join("aggregator.toml");
    std::fs::write(
        &agg_toml,
        format!(
            "id = \"aggregator\"\nfleet = \"lab-test\"\nmodel = {model:?}\nstate = {:?}\nrounds = 1\n\
             signing_key = {key_path:?}\ndevices = [\"lab-a\"]\n\
             [round]\ndeadline_s = 120.0\nquorum = 1\nlocal_epochs = 1\nsteps_per_epoch = 2\n\
             learning_rate = 0.01\nprox_mu = 0.0\npause_s = 0.0\n\
             [broker]\nhost = \"127.0.0.1\"\nport = {}\nkeep_alive_s = 5\n\
             [broker.tls]\nca = {:?}\ncert = {acert:?}\nkey = {akey:?}\n",
            agg_dir.join("state"),
            broker.port(),
            broker.ca_pem(),
        ),
    )
    .unwrap();
    let agg_log = agg_dir.join("aggregator.log");
    let mut agg = Command::new(microfed_bin())
        .args(["aggregate", "--config"])
        .arg(&agg_toml)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&agg_log).unwrap())
        .spawn()
        .expect("start microfed aggregate");
    let agg_text = || std::fs::read_to_string(&agg_log).unwrap_or_default();

    assert!(
        wait_until(Duration::from_secs(120), || agent
            .log()
            .contains("cannot store the update in the outbox")),
        "the failed store was not reported:\n{}\naggregator:\n{}",
        agent.log(),
        agg_text()
    );
    let log = agent.log();
    assert!(log.contains("No space left on device"), "{log}");
    assert!(log.contains("keeping it in memory"), "{log}");
    for what in ["error-feedback residual", "participant state", "style code"] {
        assert!(
            log.contains(&format!(
                "cannot save the {what}; keeping it in memory and retrying"
            )),
            "{what}: {log}"
        );
    }
    for file in ["residual.bin", "participant.json", "style-code.json"] {
        assert!(!dir.join("fed").join(file).exists(), "{file}");
    }
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        matches!(agent.child.try_wait(), Ok(None)),
        "the agent stopped:\n{}",
        agent.log()
    );
    assert!(
        !agg_text().contains("update accepted"),
        "delivered without being stored: {}",
        agg_text()
    );

    // Room on the disk again: stored, delivered, counted.
    std::fs::remove_file(&full).unwrap();
    let done = wait_until(Duration::from_secs(90), || {
        matches!(agg.try_wait(), Ok(Some(_)))
    });
    if !done {
        let _ = agg.kill();
    }
    assert!(
        done,
        "the round did not complete:\n{}\nagent:\n{}",
        agg_text(),
        agent.log()
    );
    assert!(agg.wait().unwrap().success(), "{}", agg_text());
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(agg_dir.join("state/aggregator.json")).unwrap())
            .unwrap();
    assert_eq!(
        state["history"][0]["accepted"],
        serde_json::json!(["lab-a"]),
        "{state:#}"
    );
    let log = agent.log();
    assert!(log.contains("writes work again"), "{log}");
    assert!(log.contains("update delivered"), "{log}");
    for what in ["error-feedback residual", "participant state", "style code"] {
        assert!(
            log.contains(&format!("{what} saved again")),
            "{what}: {log}"
        );
        // Logged once, not at every retry.
        assert_eq!(
            log.matches(&format!("cannot save the {what}")).count(),
            1,
            "{what}: {log}"
        );
    }
    for file in ["residual.bin", "participant.json", "style-code.json"] {
        assert!(dir.join("fed").join(file).is_file(), "{file}");
    }
    let saved: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("fed/participant.json")).unwrap()).unwrap();
    assert_eq!(saved["last_trained_round"], 1, "{saved}");
    agent.terminate();
    assert!(
        agent.wait(Duration::from_secs(30)).success(),
        "{}",
        agent.log()
    );
}
