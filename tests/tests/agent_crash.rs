//! The agent killed with SIGKILL in the middle of a batch, then restarted: every micrograph is
//! processed exactly once (one journal entry each, one CSV row each), and no crash leaves a partial
//! output (every visible mask decodes, temporaries are swept).

use std::path::Path;
use std::time::Duration;

use microfed_e2e::{AgentProcess, journal_entries, synth_png, wait_until, write_test_model};

fn config(root: &Path) -> std::path::PathBuf {
    write_test_model(&root.join("model.onnx"), 2, 9);
    let text = "[folders]\nwatch = \"in\"\noutput = \"out\"\nquarantine = \"q\"\n\
                [model]\npath = \"model.onnx\"\nreload_on_change = false\nthreads = 1\n\
                [tiling]\ntile = 64\noverlap = 16\n[capture]\nsettle_ms = 100\n";
    let path = root.join("agent.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn check_visible_masks(out: &Path) -> usize {
    let mut n = 0;
    for e in std::fs::read_dir(out).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.ends_with(".mask.png") && !name.starts_with('.') {
            let m = microfed::mask::Mask::load(&e.path())
                .unwrap_or_else(|err| panic!("{name} is not a whole mask: {err}"));
            assert_eq!((m.width, m.height), (192, 192), "{name}");
            n += 1;
        }
    }
    n
}

#[test]
fn sigkill_mid_batch_then_restart_processes_every_file_exactly_once() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let cfg = config(root);
    let inbox = root.join("in");
    std::fs::create_dir_all(&inbox).unwrap();
    let n = 20;
    for i in 0..n {
        std::fs::write(inbox.join(format!("img{i:02}.png")), synth_png(192, 4, i)).unwrap();
    }
    let journal = root.join("out/journal.jsonl");

    let mut first = AgentProcess::start(&cfg, &root.join("first.log"));
    let started = wait_until(Duration::from_secs(60), || {
        journal_entries(&journal).len() >= 3
    });
    first.child.kill().unwrap(); // SIGKILL
    first.child.wait().unwrap();
    assert!(started, "no progress before the kill:\n{}", first.log());
    let before = journal_entries(&journal).len();
    assert!(
        before < n as usize,
        "all done before the kill: the test proves nothing"
    );
    // Whatever the kill interrupted, no visible output is partial.
    check_visible_masks(&root.join("out"));

    let mut second = AgentProcess::start(&cfg, &root.join("second.log"));
    let done = wait_until(Duration::from_secs(120), || {
        journal_entries(&journal).len() >= n as usize
    });
    std::thread::sleep(Duration::from_millis(500));
    second.terminate();
    let status = second.wait(Duration::from_secs(30));
    assert!(done, "not finished after restart:\n{}", second.log());
    assert!(status.success(), "{status}:\n{}", second.log());

    let entries = journal_entries(&journal);
    let mut files: Vec<&str> = entries
        .iter()
        .map(|e| e["file"].as_str().unwrap())
        .collect();
    assert_eq!(files.len(), n as usize, "{files:?}");
    files.sort();
    files.dedup();
    assert_eq!(files.len(), n as usize, "a file was processed twice");
    assert!(entries.iter().all(|e| e["outcome"] == "segmented"));
    let out = root.join("out");
    assert_eq!(check_visible_masks(&out), n as usize);
    let leftovers: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    // The CSV has one row per file: rows written before the kill but not journalled were dropped.
    let csv = std::fs::read_to_string(out.join("features.csv")).unwrap();
    let mut rows: Vec<&str> = csv
        .lines()
        .skip(1)
        .map(|l| l.split(',').next().unwrap())
        .collect();
    assert_eq!(rows.len(), n as usize, "{csv}");
    rows.sort();
    rows.dedup();
    assert_eq!(rows.len(), n as usize);
    eprintln!("killed after {before} of {n}; the restart did the rest exactly once");
}
