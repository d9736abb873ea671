//! A full disk under the agent's journal, and under its outputs (issue 17), with the debug build's injected ENOSPC
//! (`MICROFED_FAIL_WRITES`): the append writes part of its line, then fails. The micrograph stays
//! in the watched folder (not its fault: not quarantined, not journalled), the journal is cut back
//! to its last whole line, and the agent goes on; once there is room again the watcher captures
//! the file again by itself and it is journalled, and a restarted agent opens the journal. Before
//! the fix, the next entry landed after the fragment and the corrupt line stopped the agent at its
//! next start, and the file waited for that start.

use std::time::Duration;

use microfed_e2e::{AgentProcess, journal_entries, synth_png, wait_until, write_test_model};

/// An agent's folder: a test model, agent.toml (retry after 1 s), the watched folder, and the
/// full-disk trigger file for writes to paths containing `fragment`; returns the config and the
/// trigger paths.
fn agent_root(root: &std::path::Path, fragment: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    let trigger = root.join("disk-full");
    std::fs::write(&trigger, format!("{fragment}\n")).unwrap();
    write_test_model(&root.join("model.onnx"), 2, 9);
    let cfg = root.join("agent.toml");
    std::fs::write(
        &cfg,
        "[folders]\nwatch = \"in\"\noutput = \"out\"\nquarantine = \"q\"\n\
         [model]\npath = \"model.onnx\"\nreload_on_change = false\nthreads = 1\n\
         [tiling]\ntile = 64\noverlap = 16\n[capture]\nsettle_ms = 100\nretry_after_s = 1\n",
    )
    .unwrap();
    std::fs::create_dir_all(root.join("in")).unwrap();
    (cfg, trigger)
}

fn files(journal: &std::path::Path) -> Vec<String> {
    journal_entries(journal)
        .iter()
        .map(|e| e["file"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn a_full_disk_under_the_journal_loses_nothing_and_the_agent_starts_again() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let (cfg, trigger) = agent_root(root, "journal.jsonl");
    let inbox = root.join("in");
    let journal = root.join("out/journal.jsonl");
    let env = [(microfed::fsio::FAIL_WRITES_ENV, trigger.as_path())];

    let mut agent = AgentProcess::start_with_env(&cfg, &root.join("first.log"), &env);
    std::fs::write(inbox.join("first.png"), synth_png(128, 4, 1)).unwrap();
    assert!(
        wait_until(Duration::from_secs(60), || agent
            .log()
            .matches("cannot write the outputs")
            .count()
            >= 2),
        "the write did not fail, or was not tried again:\n{}",
        agent.log()
    );
    let log = agent.log();
    assert!(log.contains("No space left on device"), "{log}");
    assert!(log.contains("tried again later"), "{log}");
    assert!(inbox.join("first.png").exists(), "left in the folder");
    assert!(!root.join("q/first.png").exists(), "not the file's fault");
    assert!(journal_entries(&journal).is_empty());

    // Room again: the same file is journalled without a restart, after no fragment.
    std::fs::remove_file(&trigger).unwrap();
    assert!(
        wait_until(Duration::from_secs(60), || files(&journal) == ["first.png"]),
        "{}",
        agent.log()
    );
    std::fs::write(inbox.join("second.png"), synth_png(128, 4, 2)).unwrap();
    assert!(
        wait_until(Duration::from_secs(60), || files(&journal).len() == 2),
        "{}",
        agent.log()
    );
    agent.terminate();
    let st = agent.wait(Duration::from_secs(30));
    assert!(st.success(), "{}", agent.log());
    let text = std::fs::read_to_string(&journal).unwrap();
    assert!(
        text.lines()
            .all(|l| serde_json::from_str::<serde_json::Value>(l).is_ok()),
        "every journal line is whole:\n{text}"
    );

    // The agent starts again on that journal and goes on; nothing is segmented twice.
    let mut again = AgentProcess::start(&cfg, &root.join("second.log"));
    std::fs::write(inbox.join("third.png"), synth_png(128, 4, 3)).unwrap();
    assert!(
        wait_until(Duration::from_secs(60), || files(&journal).len() == 3),
        "{}",
        again.log()
    );
    std::thread::sleep(Duration::from_millis(500));
    again.terminate();
    let st = again.wait(Duration::from_secs(30));
    let log = again.log();
    assert!(st.success(), "{log}");
    assert!(
        !log.contains("panicked") && !log.contains("not a journal entry"),
        "{log}"
    );
    assert_eq!(files(&journal), ["first.png", "second.png", "third.png"]);
}

/// The mask, overlay and features of one micrograph cannot be written (ENOSPC on every path of
/// its outputs): the file stays in the folder, is tried again, and once there is room it is
/// segmented and journalled once; the other micrographs go on meanwhile.
#[test]
fn a_full_disk_under_the_outputs_loses_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let (cfg, trigger) = agent_root(root, "out/blocked.");
    let inbox = root.join("in");
    let journal = root.join("out/journal.jsonl");
    let env = [(microfed::fsio::FAIL_WRITES_ENV, trigger.as_path())];
    let mut agent = AgentProcess::start_with_env(&cfg, &root.join("agent.log"), &env);
    std::fs::write(inbox.join("blocked.png"), synth_png(128, 4, 1)).unwrap();
    std::fs::write(inbox.join("other.png"), synth_png(128, 4, 2)).unwrap();
    assert!(
        wait_until(Duration::from_secs(60), || files(&journal) == ["other.png"]
            && agent.log().matches("cannot write the outputs").count() >= 2),
        "{}",
        agent.log()
    );
    assert!(inbox.join("blocked.png").exists());
    assert!(!root.join("q/blocked.png").exists(), "not the file's fault");
    std::fs::remove_file(&trigger).unwrap();
    assert!(
        wait_until(Duration::from_secs(60), || files(&journal).len() == 2),
        "{}",
        agent.log()
    );
    agent.terminate();
    let st = agent.wait(Duration::from_secs(30));
    let log = agent.log();
    assert!(st.success(), "{log}");
    assert_eq!(files(&journal), ["other.png", "blocked.png"]);
    assert!(root.join("out/blocked.mask.png").exists(), "{log}");
    let rows = std::fs::read_to_string(root.join("out/features.csv")).unwrap();
    assert_eq!(rows.matches("blocked.png").count(), 1, "{rows}");
}
