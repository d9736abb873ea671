//! Replacing the model file while micrographs stream in: the agent swaps the new model in without an
//! error, every micrograph gets a mask, and the journal shows both models at work.

use std::time::Duration;

use microfed_e2e::{AgentProcess, journal_entries, synth_png, wait_until, write_test_model};

#[test]
fn replacing_the_model_file_mid_stream_swaps_without_losing_an_image() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    write_test_model(&root.join("model.onnx"), 2, 21);
    std::fs::write(
        root.join("agent.toml"),
        "[folders]\nwatch = \"in\"\noutput = \"out\"\nquarantine = \"q\"\n\
         [model]\npath = \"model.onnx\"\nthreads = 1\n\
         [tiling]\ntile = 64\noverlap = 16\n[capture]\nsettle_ms = 150\n",
    )
    .unwrap();
    let inbox = root.join("in");
    std::fs::create_dir_all(&inbox).unwrap();
    let mut agent = AgentProcess::start(&root.join("agent.toml"), &root.join("agent.log"));
    assert!(wait_until(Duration::from_secs(30), || agent
        .log()
        .contains("watching for micrographs")));

    let journal = root.join("out/journal.jsonl");
    let drop_image = |i: u64| {
        let part = inbox.join(format!("img{i:02}.png.part"));
        std::fs::write(&part, synth_png(64, 8, i)).unwrap();
        std::fs::rename(&part, inbox.join(format!("img{i:02}.png"))).unwrap();
    };
    for i in 0..6 {
        drop_image(i);
        std::thread::sleep(Duration::from_millis(50));
    }
    // The new model is written beside the old one and renamed over it: an atomic replacement.
    write_test_model(&root.join("model.onnx.new"), 2, 22);
    std::fs::rename(root.join("model.onnx.new"), root.join("model.onnx")).unwrap();
    assert!(
        wait_until(Duration::from_secs(60), || agent
            .log()
            .contains("model swapped in")),
        "no swap:\n{}",
        agent.log()
    );
    for i in 6..12 {
        drop_image(i);
        std::thread::sleep(Duration::from_millis(50));
    }
    let done = wait_until(Duration::from_secs(60), || {
        journal_entries(&journal).len() >= 12
    });
    agent.terminate();
    let status = agent.wait(Duration::from_secs(30));
    let log = agent.log();
    assert!(done && status.success(), "{status}:\n{log}");
    assert!(!log.contains("ERROR"), "{log}");

    let entries = journal_entries(&journal);
    assert_eq!(entries.len(), 12);
    assert!(
        entries.iter().all(|e| e["outcome"] == "segmented"),
        "{entries:#?}"
    );
    let generation =
        |e: &serde_json::Value| e["model"].as_str().unwrap().ends_with("(generation 1)");
    // Everything dropped after the swap was logged ran on the new model.
    for e in &entries {
        let i: u64 = e["file"].as_str().unwrap()[3..5].parse().unwrap();
        if i >= 6 {
            assert!(generation(e), "{e}");
        }
    }
    for i in 0..12 {
        let m = microfed::mask::Mask::load(&root.join(format!("out/img{i:02}.mask.png"))).unwrap();
        assert_eq!((m.width, m.height), (64, 64));
    }
}
