//! The operator's console, seen by a real browser: `microfed demo --quick` runs with its console,
//! and headless Chromium (Debian's package, installed by tests/run.sh) loads the page once every
//! round has closed. From the rendered DOM: every lab is listed online, the round table and the
//! IoU plot show the closed rounds. Then a real `microfed agent` joins the demo's broker, shows up
//! online, is killed (SIGKILL: no goodbye, so the broker publishes its last will) and the page
//! shows it offline. A screenshot of the page goes to docs/images/console.png.
//!
//! Without Chromium the test passes as skipped and says so, unless MICROFED_REQUIRE_CHROMIUM is set.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use microfed_e2e::{AgentProcess, microfed_bin, synth_labelled, wait_until};

fn chromium() -> Option<PathBuf> {
    ["chromium", "chromium-browser", "google-chrome"]
        .iter()
        .find_map(|name| {
            let ok = Command::new(name)
                .arg("--version")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            ok.then(|| PathBuf::from(name))
        })
}

/// Chromium's flags for a container: no sandbox (root), no GPU.
fn headless(bin: &Path) -> Command {
    let mut c = Command::new(bin);
    c.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
    ]);
    c.stderr(Stdio::null());
    c
}

/// The page as Chromium rendered it (after its script ran).
fn dom(bin: &Path, url: &str) -> String {
    let out = headless(bin)
        .args(["--dump-dom", url])
        .output()
        .expect("run chromium");
    assert!(out.status.success(), "chromium --dump-dom failed");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// GET over plain HTTP on loopback (the console's snapshot, to wait on without a browser).
fn http_get(addr: &str, path: &str) -> Option<String> {
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    out.split_once("\r\n\r\n").map(|(_, b)| b.to_owned())
}

fn state(addr: &str) -> serde_json::Value {
    http_get(addr, "/state.json")
        .and_then(|b| serde_json::from_str(&b).ok())
        .unwrap_or(serde_json::Value::Null)
}

/// The demo, its stdout collected line by line.
struct Demo {
    child: Child,
    out: Arc<Mutex<String>>,
}

impl Demo {
    fn start(out_dir: &Path) -> Self {
        let mut child = Command::new(microfed_bin())
            .args(["demo", "--quick", "--no-real", "--hold", "240", "--out"])
            .arg(out_dir)
            .args(["--console", "127.0.0.1:0"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start microfed demo");
        let out = Arc::new(Mutex::new(String::new()));
        let (o, stdout) = (out.clone(), child.stdout.take().expect("stdout"));
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let mut o = o.lock().unwrap();
                o.push_str(&line);
                o.push('\n');
            }
        });
        Self { child, out }
    }
    fn stdout(&self) -> String {
        self.out.lock().unwrap().clone()
    }
    /// The `host:port` after `prefix` in a printed line.
    fn address(&self, prefix: &str) -> Option<String> {
        let out = self.stdout();
        let rest = &out[out.find(prefix)? + prefix.len()..];
        let addr: String = rest
            .chars()
            .take_while(|c| c.is_ascii_digit() || *c == '.' || *c == ':')
            .collect();
        (!addr.is_empty()).then_some(addr)
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn the_console_shows_labs_rounds_the_iou_plot_and_a_killed_agent_going_offline() {
    let Some(browser) = chromium() else {
        assert!(
            std::env::var_os("MICROFED_REQUIRE_CHROMIUM").is_none(),
            "MICROFED_REQUIRE_CHROMIUM is set but no chromium is installed (tests/run.sh installs it)"
        );
        eprintln!(
            "SKIPPED: chromium is not installed (apt-get install chromium; tests/run.sh does)"
        );
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let demo = Demo::start(&tmp.path().join("demo-out"));
    assert!(
        wait_until(Duration::from_secs(600), || demo
            .stdout()
            .contains("every round closed; holding")),
        "the demo did not close its rounds:\n{}",
        demo.stdout()
    );
    let console = demo.address("console: http://").expect("console address");
    let broker = demo
        .address("embedded broker (rumqttd) on ")
        .expect("broker address");
    let url = format!("http://{console}/");

    // The snapshot reaches the page within a few hundred milliseconds of the last summary.
    assert!(wait_until(Duration::from_secs(20), || {
        state(&console)["rounds"].as_array().map_or(0, Vec::len) == 2
    }));
    let page = dom(&browser, &url);
    for lab in ["lab-a", "lab-b"] {
        assert!(
            page.contains(&format!("<tr data-device=\"{lab}\" data-online=\"true\">")),
            "{lab} not listed online:\n{page}"
        );
    }
    for round in [1, 2] {
        assert!(
            page.contains(&format!("<tr data-round=\"{round}\">")),
            "round {round} not in the round table:\n{page}"
        );
        for lab in ["lab-a", "lab-b"] {
            assert!(
                page.contains(&format!("data-round=\"{round}\" data-lab=\"{lab}\"")),
                "no IoU point for {lab} in round {round}:\n{page}"
            );
        }
    }
    assert!(page.contains("id=\"iou-plot\""), "no plot:\n{page}");

    // The screenshot of the docs.
    let shot = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/images/console.png");
    std::fs::create_dir_all(shot.parent().unwrap()).unwrap();
    let ok = headless(&browser)
        .args(["--window-size=1280,1000"])
        .arg(format!("--screenshot={}", shot.display()))
        .arg(&url)
        .stdout(Stdio::null())
        .status()
        .expect("chromium --screenshot");
    assert!(ok.success() && shot.is_file(), "no screenshot");

    // A real agent joins the demo's fleet on its broker, then dies without a word.
    let lab = tmp.path().join("lab-x");
    synth_labelled(
        &lab.join("labelled"),
        "polycrystal",
        "optical-etched",
        4,
        64,
        5,
    );
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/grains/model.onnx");
    let port = broker.rsplit(':').next().unwrap();
    std::fs::write(
        lab.join("agent.toml"),
        format!(
            "[folders]\nwatch = \"in\"\noutput = \"out\"\nquarantine = \"q\"\n\
             [model]\npath = {model:?}\nthreads = 1\n[tiling]\ntile = 64\noverlap = 16\n\
             [federation]\nfleet = \"demo\"\ndevice = \"lab-x\"\nlabelled = \"labelled\"\n\
             state = \"fed\"\ndevice_kind = \"cpu\"\nbatch = 2\ncrop = 64\n\
             [federation.broker]\nhost = \"127.0.0.1\"\nport = {port}\nkeep_alive_s = 5\n"
        ),
    )
    .unwrap();
    let mut agent = AgentProcess::start(&lab.join("agent.toml"), &lab.join("agent.log"));
    assert!(
        wait_until(
            Duration::from_secs(120),
            || state(&console)["devices"]["lab-x"]["online"] == true
        ),
        "lab-x never showed online; agent log:\n{}",
        agent.log()
    );
    assert!(dom(&browser, &url).contains("<tr data-device=\"lab-x\" data-online=\"true\">"));
    agent.child.kill().unwrap();
    agent.child.wait().unwrap();
    assert!(
        wait_until(
            Duration::from_secs(60),
            || state(&console)["devices"]["lab-x"]["online"] == false
        ),
        "lab-x still online after it was killed: {}",
        state(&console)["devices"]["lab-x"]
    );
    let page = dom(&browser, &url);
    assert!(
        page.contains("<tr data-device=\"lab-x\" data-online=\"false\">"),
        "lab-x not shown offline:\n{page}"
    );
    // The demo's labs are untouched.
    assert!(page.contains("<tr data-device=\"lab-a\" data-online=\"true\">"));
}
