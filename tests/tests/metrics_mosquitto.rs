//! Prometheus metrics during a real round on Mosquitto over TLS: one agent (`[metrics]` on
//! loopback) segments two micrographs and sends its update; the aggregator (`[metrics]` on
//! 0.0.0.0, so with a bearer token and TLS) closes the round. Both expositions are scraped while
//! the aggregator pauses before its next round, parsed by a strict parser written here (not the
//! library's writer), and their counters checked against what happened: images, updates, bytes,
//! rounds, rejections. The off-loopback listener refuses a request without the token (401) and a
//! wrong one, and serves the right one.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use microfed_e2e::broker::Mosquitto;
use microfed_e2e::{AgentProcess, microfed_bin, synth_labelled, synth_png, wait_until};

/// One sample: name, labels, value.
type Sample = (String, BTreeMap<String, String>, f64);

/// A strict reader of the text exposition 0.0.4: every sample belongs to the family announced by
/// the `# TYPE` line just before it (with `# HELP` first), names and labels are well formed,
/// counters end in `_total`, histograms have ascending `le` buckets ending at `+Inf` whose last
/// count equals `_count`, and no family appears twice.
fn parse(text: &str) -> Result<Vec<Sample>, String> {
    fn name_ok(s: &str) -> bool {
        let mut c = s.chars();
        c.next()
            .is_some_and(|f| f.is_ascii_alphabetic() || f == '_' || f == ':')
            && c.all(|x| x.is_ascii_alphanumeric() || x == '_' || x == ':')
    }
    fn value(s: &str) -> Result<f64, String> {
        match s {
            "+Inf" => Ok(f64::INFINITY),
            "-Inf" => Ok(f64::NEG_INFINITY),
            "NaN" => Ok(f64::NAN),
            _ => s.parse::<f64>().map_err(|e| format!("value {s:?}: {e}")),
        }
    }
    if !text.ends_with('\n') {
        return Err("the exposition must end with a newline".into());
    }
    let mut out = Vec::new();
    let mut families: BTreeMap<String, String> = BTreeMap::new();
    let mut current: Option<(String, String)> = None;
    let mut helped: Option<String> = None;
    let mut buckets: Vec<(f64, f64)> = Vec::new();
    let check_histogram =
        |fam: &str, buckets: &[(f64, f64)], out: &[Sample]| -> Result<(), String> {
            if buckets.last().is_none_or(|b| b.0 != f64::INFINITY) {
                return Err(format!("{fam}: no +Inf bucket"));
            }
            if buckets
                .windows(2)
                .any(|w| w[0].0 >= w[1].0 || w[0].1 > w[1].1)
            {
                return Err(format!("{fam}: buckets not ascending and cumulative"));
            }
            let count = out
                .iter()
                .find(|s| s.0 == format!("{fam}_count"))
                .ok_or(format!("{fam}: no _count"))?;
            if count.2 != buckets.last().unwrap().1 {
                return Err(format!("{fam}: +Inf bucket differs from _count"));
            }
            if !out.iter().any(|s| s.0 == format!("{fam}_sum")) {
                return Err(format!("{fam}: no _sum"));
            }
            Ok(())
        };
    for (n, line) in text.lines().enumerate() {
        let err = |m: String| format!("line {}: {m}: {line:?}", n + 1);
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let name = rest.split(' ').next().unwrap_or("");
            if !name_ok(name) {
                return Err(err("bad name".into()));
            }
            helped = Some(name.to_owned());
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            if let Some((fam, kind)) = current.take()
                && kind == "histogram"
            {
                check_histogram(&fam, &buckets, &out).map_err(err)?;
            }
            let (name, kind) = rest.split_once(' ').ok_or_else(|| err("no type".into()))?;
            if helped.as_deref() != Some(name) {
                return Err(err("TYPE without its HELP".into()));
            }
            if !["counter", "gauge", "histogram"].contains(&kind) {
                return Err(err(format!("type {kind}")));
            }
            if (kind == "counter") != name.ends_with("_total") {
                return Err(err("counters (only) end in _total".into()));
            }
            if families.insert(name.to_owned(), kind.to_owned()).is_some() {
                return Err(err("family twice".into()));
            }
            current = Some((name.to_owned(), kind.to_owned()));
            buckets.clear();
            continue;
        }
        if line.starts_with('#') || line.is_empty() {
            return Err(err("unexpected line".into()));
        }
        let (fam, kind) = current
            .clone()
            .ok_or_else(|| err("sample outside a family".into()))?;
        let (series, v) = line
            .rsplit_once(' ')
            .ok_or_else(|| err("no value".into()))?;
        let v = value(v).map_err(err)?;
        let (name, labels) = match series.split_once('{') {
            None => (series, BTreeMap::new()),
            Some((name, rest)) => {
                let body = rest
                    .strip_suffix('}')
                    .ok_or_else(|| err("unclosed labels".into()))?;
                let mut labels = BTreeMap::new();
                let mut chars = body.chars().peekable();
                while chars.peek().is_some() {
                    let key: String = chars.by_ref().take_while(|&c| c != '=').collect();
                    if !name_ok(&key) || chars.next() != Some('"') {
                        return Err(err("bad label".into()));
                    }
                    let mut val = String::new();
                    loop {
                        match chars.next() {
                            Some('\\') => match chars.next() {
                                Some('n') => val.push('\n'),
                                Some(c @ ('\\' | '"')) => val.push(c),
                                _ => return Err(err("bad escape".into())),
                            },
                            Some('"') => break,
                            Some(c) => val.push(c),
                            None => return Err(err("unterminated label value".into())),
                        }
                    }
                    labels.insert(key, val);
                    match chars.next() {
                        Some(',') | None => {}
                        _ => return Err(err("junk after a label".into())),
                    }
                }
                (name, labels)
            }
        };
        let ok = match kind.as_str() {
            "histogram" => [
                format!("{fam}_bucket"),
                format!("{fam}_sum"),
                format!("{fam}_count"),
            ]
            .contains(&name.to_owned()),
            _ => name == fam,
        };
        if !ok {
            return Err(err(format!("sample of another family than {fam}")));
        }
        if name.ends_with("_bucket") {
            let le = labels
                .get("le")
                .ok_or_else(|| err("bucket without le".into()))?;
            buckets.push((value(le).map_err(err)?, v));
        }
        if kind == "counter" && (v.is_nan() || v < 0.0) {
            return Err(err("negative counter".into()));
        }
        out.push((name.to_owned(), labels, v));
    }
    if let Some((fam, kind)) = current
        && kind == "histogram"
    {
        check_histogram(&fam, &buckets, &out)?;
    }
    Ok(out)
}

fn get(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .find(|(n, l, _)| {
            n == name
                && labels.len() == l.len()
                && labels
                    .iter()
                    .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|s| s.2)
        .unwrap_or_else(|| panic!("no sample {name} {labels:?}"))
}

/// The status line and body of `GET /metrics`, over a stream.
fn request(stream: &mut dyn ReadWrite, auth: Option<&str>) -> (String, String) {
    let auth = auth
        .map(|a| format!("Authorization: {a}\r\n"))
        .unwrap_or_default();
    // A server that refuses the request (plain HTTP to a TLS port) may close before it is all
    // written: a broken pipe is an answer with nothing in it.
    if let Err(e) = write!(stream, "GET /metrics HTTP/1.1\r\nHost: x\r\n{auth}\r\n") {
        assert!(
            matches!(
                e.kind(),
                std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
            ),
            "writing the request: {e}"
        );
        return (String::new(), String::new());
    }
    let mut raw = Vec::new();
    // A TLS peer may end without close_notify; what arrived is the answer.
    let _ = stream.read_to_end(&mut raw);
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    (
        head.lines().next().unwrap_or("").to_owned(),
        body.to_owned(),
    )
}

trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}

fn plain(addr: &str, auth: Option<&str>) -> (String, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    request(&mut s, auth)
}

fn tls(addr: &str, ca: &Path, auth: Option<&str>) -> (String, String) {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let conn =
        rustls::ClientConnection::new(Arc::new(cfg), "127.0.0.1".try_into().unwrap()).unwrap();
    let sock = TcpStream::connect(addr).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    request(&mut rustls::StreamOwned::new(conn, sock), auth)
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The port in `… addr=HOST:PORT` (agent log) or `…://HOST:PORT/metrics` (aggregator stdout).
fn port_after(text: &str, marker: &str) -> Option<u16> {
    let text = strip_ansi(text);
    let line = text.lines().find(|l| l.contains(marker))?;
    let digits: String = line[line.find(marker)? + marker.len()..]
        .chars()
        .skip_while(|c| *c != ':')
        .skip(1)
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

#[test]
fn agent_and_aggregator_metrics_count_a_real_round_and_refuse_a_request_without_the_token() {
    let broker = Mosquitto::start(&["lab-a", "aggregator"])
        .expect("start mosquitto (tests/run.sh installs it)");
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/grains/model.onnx");

    let lab = root.join("lab-a");
    synth_labelled(&lab.join("labelled"), "polycrystal", "sem-se", 4, 64, 3);
    let (cert, key) = broker.client_cert("lab-a");
    std::fs::write(
        lab.join("agent.toml"),
        format!(
            "[folders]\nwatch = \"in\"\noutput = \"out\"\nquarantine = \"q\"\n\
             [model]\npath = {model:?}\nthreads = 1\n[tiling]\ntile = 64\noverlap = 16\n\
             [metrics]\nlisten = \"127.0.0.1:0\"\n\
             [federation]\nfleet = \"metrics-test\"\ndevice = \"lab-a\"\nlabelled = \"labelled\"\n\
             state = \"fed\"\ndevice_kind = \"cpu\"\nbatch = 2\ncrop = 64\n\
             [federation.broker]\nhost = \"127.0.0.1\"\nport = {}\nkeep_alive_s = 5\n\
             [federation.broker.tls]\nca = {:?}\ncert = {cert:?}\nkey = {key:?}\n",
            broker.port(),
            broker.ca_pem()
        ),
    )
    .unwrap();
    let agent = AgentProcess::start(&lab.join("agent.toml"), &lab.join("agent.log"));
    assert!(
        wait_until(Duration::from_secs(120), || agent
            .log()
            .contains("encoder features ready")
            && agent.log().contains("connected to the broker")),
        "agent not ready:\n{}",
        agent.log()
    );
    let agent_port = port_after(&agent.log(), "serving /metrics").expect("agent metrics port");
    let agent_addr = format!("127.0.0.1:{agent_port}");

    // The aggregator listens on every interface: a token and TLS are required.
    let agg = root.join("aggregator");
    std::fs::create_dir_all(&agg).unwrap();
    let token = "metrics-token-0123456789abcdef";
    std::fs::write(agg.join("token"), format!("{token}\n")).unwrap();
    let (cert, key) = broker.client_cert("aggregator");
    let certs = broker.dir().join("certs");
    std::fs::write(
        agg.join("aggregator.toml"),
        format!(
            "id = \"aggregator\"\nfleet = \"metrics-test\"\nmodel = {model:?}\nstate = \"state\"\n\
             devices = [\"lab-a\"]\n\
             [round]\ndeadline_s = 120.0\nquorum = 1\nlocal_epochs = 1\nsteps_per_epoch = 2\n\
             learning_rate = 0.01\nprox_mu = 0.0\npause_s = 120.0\n\
             [compression]\ntop_k = 0.05\nquantize = \"int8\"\n\
             [metrics]\nlisten = \"0.0.0.0:0\"\ntoken_file = \"token\"\n\
             [metrics.tls]\ncert = {:?}\nkey = {:?}\n\
             [broker]\nhost = \"127.0.0.1\"\nport = {}\nkeep_alive_s = 5\n\
             [broker.tls]\nca = {:?}\ncert = {cert:?}\nkey = {key:?}\n",
            certs.join("server.crt"),
            certs.join("server.key"),
            broker.port(),
            broker.ca_pem(),
        ),
    )
    .unwrap();
    let mut aggregator = Command::new(microfed_bin())
        .args(["aggregate", "--config"])
        .arg(agg.join("aggregator.toml"))
        .env("RUST_LOG", "info")
        .stdout(std::fs::File::create(agg.join("stdout")).unwrap())
        .stderr(std::fs::File::create(agg.join("log")).unwrap())
        .spawn()
        .expect("start microfed aggregate");
    let agg_out = || std::fs::read_to_string(agg.join("stdout")).unwrap_or_default();
    let agg_log = || std::fs::read_to_string(agg.join("log")).unwrap_or_default();
    assert!(
        wait_until(Duration::from_secs(60), || agg_out()
            .contains("metrics on https://")),
        "no metrics address:\n{}\n{}",
        agg_out(),
        agg_log()
    );
    let agg_addr = format!(
        "127.0.0.1:{}",
        port_after(&agg_out(), "metrics on https://").unwrap()
    );

    // Two micrographs captured.
    std::fs::create_dir_all(lab.join("in")).unwrap();
    for i in 0..2 {
        std::fs::write(lab.join(format!("in/m{i}.png")), synth_png(64, 9, i)).unwrap();
    }

    // Round 1 closes; the aggregator then pauses 120 s before round 2: scrape in between.
    let state = || -> serde_json::Value {
        std::fs::read(agg.join("state/aggregator.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or(serde_json::Value::Null)
    };
    assert!(
        wait_until(Duration::from_secs(240), || state()["history"]
            .as_array()
            .is_some_and(|h| h.len() == 1)),
        "round 1 did not close:\n{}\nagent:\n{}",
        agg_log(),
        agent.log()
    );
    let agent_metrics = || {
        let (status, body) = plain(&agent_addr, None);
        assert!(status.contains(" 200 "), "{status}");
        parse(&body).unwrap_or_else(|e| panic!("agent exposition: {e}\n{body}"))
    };
    assert!(
        wait_until(Duration::from_secs(120), || get(
            &agent_metrics(),
            "microfed_images_segmented_total",
            &[]
        ) == 2.0),
        "the agent did not segment both micrographs:\n{}",
        agent.log()
    );
    let a = agent_metrics();
    assert_eq!(get(&a, "microfed_capture_to_mask_seconds_count", &[]), 2.0);
    assert_eq!(
        get(
            &a,
            "microfed_capture_to_mask_seconds_bucket",
            &[("le", "+Inf")]
        ),
        2.0
    );
    assert!(get(&a, "microfed_capture_to_mask_seconds_sum", &[]) > 0.0);
    assert_eq!(get(&a, "microfed_images_failed_total", &[]), 0.0);
    assert_eq!(get(&a, "microfed_images_quarantined_total", &[]), 0.0);
    assert_eq!(get(&a, "microfed_updates_sent_total", &[]), 1.0);
    let sent = get(&a, "microfed_update_sent_bytes_total", &[]);
    assert!(sent > 0.0);
    assert_eq!(get(&a, "microfed_broker_connected", &[]), 1.0);
    // The round closed on the aggregator; the agent installs the global it published a moment
    // later.
    assert!(
        wait_until(Duration::from_secs(60), || get(
            &agent_metrics(),
            "microfed_global_version",
            &[]
        ) == 1.0),
        "the agent did not install global version 1:\n{}",
        agent.log()
    );

    // The aggregator, over TLS: refused without the token or with a wrong one.
    let ca = broker.ca_pem();
    let (status, body) = tls(&agg_addr, &ca, None);
    assert!(status.starts_with("HTTP/1.1 401 "), "{status}");
    assert!(!body.contains("microfed_"), "{body}");
    let (status, _) = tls(&agg_addr, &ca, Some("Bearer not-the-token-at-all"));
    assert!(status.starts_with("HTTP/1.1 401 "), "{status}");
    // Plain HTTP to the TLS port gets no metrics.
    let mut s = TcpStream::connect(&agg_addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let (_, body) = request(&mut s, Some(&format!("Bearer {token}")));
    assert!(!body.contains("microfed_"), "served without TLS: {body}");
    let (status, body) = tls(&agg_addr, &ca, Some(&format!("Bearer {token}")));
    assert!(status.starts_with("HTTP/1.1 200 "), "{status}");
    let g = parse(&body).unwrap_or_else(|e| panic!("aggregator exposition: {e}\n{body}"));
    let summary = &state()["history"][0];
    assert_eq!(summary["accepted"], serde_json::json!(["lab-a"]));
    assert_eq!(
        get(&g, "microfed_aggregator_updates_accepted_total", &[]),
        1.0
    );
    assert_eq!(get(&g, "microfed_aggregator_rounds_closed_total", &[]), 1.0);
    assert_eq!(
        get(&g, "microfed_aggregator_round_duration_seconds_count", &[]),
        1.0
    );
    for reason in [
        "malformed",
        "unknown_device",
        "duplicate",
        "norm",
        "wrong_round",
    ] {
        assert_eq!(
            get(
                &g,
                "microfed_aggregator_updates_rejected_total",
                &[("reason", reason)]
            ),
            0.0,
            "{reason}"
        );
    }
    let accepted = get(&g, "microfed_aggregator_accepted_update_bytes_total", &[]);
    assert_eq!(accepted, summary["update_bytes"].as_f64().unwrap());
    // What the agent sent (the encoded message) arrived in frames (with their headers).
    assert!(get(&g, "microfed_aggregator_update_frame_bytes_total", &[]) >= sent);
    assert!(
        sent > accepted,
        "the message holds the compressed update and more"
    );
    assert_eq!(get(&g, "microfed_aggregator_reassembly_bytes", &[]), 0.0);
    assert_eq!(get(&g, "microfed_aggregator_round", &[]), 1.0);
    assert_eq!(get(&g, "microfed_aggregator_round_open", &[]), 0.0);
    assert_eq!(get(&g, "microfed_aggregator_global_version", &[]), 1.0);

    let _ = aggregator.kill();
    let _ = aggregator.wait();
}

#[test]
fn the_strict_parser_refuses_what_prometheus_would() {
    let good = "# HELP a_total A.\n# TYPE a_total counter\na_total{reason=\"x\\\"y\"} 3\n\
                # HELP h H.\n# TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_bucket{le=\"+Inf\"} 2\n\
                h_sum 3.5\nh_count 2\n";
    assert_eq!(parse(good).unwrap().len(), 5);
    for bad in [
        "# HELP a A.\n# TYPE a counter\na 1\n",
        "# TYPE a_total counter\na_total 1\n",
        "# HELP a_total A.\n# TYPE a_total counter\nb_total 1\n",
        "# HELP h H.\n# TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_sum 1\nh_count 1\n",
        "# HELP g G.\n# TYPE g gauge\ng{a=\"x} 1\n",
        "# HELP g G.\n# TYPE g gauge\ng 1",
    ] {
        assert!(parse(bad).is_err(), "{bad}");
    }
}
