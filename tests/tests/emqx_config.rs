//! The shipped EMQX configuration (`broker-config/emqx/emqx.conf`), read the way EMQX nests its
//! HOCON blocks: EMQX is not packaged in Debian, so the cluster is not run here, but what issue 17
//! found in it is checked on every run — its dashboard (and the management API behind it) was open on
//! 0.0.0.0 over plain HTTP with the default password, which lets anyone who reaches the port change
//! the ACL or kick devices. Also held: no plain-TCP or WebSocket MQTT listener, mutual TLS on the
//! MQTT one with the client id taken from the certificate, and an ACL that denies what it does not
//! name.

use std::collections::BTreeMap;
use std::path::Path;

/// `a.b.c` → value for every `key = value` line, with `key { … }` blocks opening a prefix (comments,
/// lists and their items are skipped).
fn settings(text: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut prefix: Vec<String> = Vec::new();
    let mut in_list = 0usize;
    for raw in text.lines() {
        let line = raw.split("##").next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        if in_list > 0 {
            in_list += line.matches('[').count();
            in_list -= line.matches(']').count().min(in_list);
            continue;
        }
        if line == "}" {
            prefix.pop();
            continue;
        }
        if let Some(block) = line.strip_suffix('{') {
            prefix.push(block.trim().to_owned());
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        let value = value.trim();
        if value.starts_with('[') && !value.ends_with(']') {
            in_list = 1;
            continue;
        }
        let mut full = prefix.clone();
        full.push(key.trim().to_owned());
        out.insert(full.join("."), value.trim_matches('"').to_owned());
    }
    out
}

#[test]
fn the_shipped_emqx_config_keeps_its_dashboard_on_loopback_https_and_mqtt_on_mutual_tls() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../broker-config/emqx/emqx.conf");
    let text = std::fs::read_to_string(&path).unwrap();
    let s = settings(&text);
    let get = |k: &str| {
        s.get(k)
            .map(String::as_str)
            .unwrap_or_else(|| panic!("{}: no {k}", path.display()))
    };
    // The dashboard: plain HTTP off, HTTPS on loopback only, never the default password.
    assert_eq!(get("dashboard.listeners.http.bind"), "0");
    assert!(
        get("dashboard.listeners.https.bind").starts_with("127.0.0.1:"),
        "{}",
        get("dashboard.listeners.https.bind")
    );
    assert_ne!(get("dashboard.default_password"), "public");
    assert_eq!(get("dashboard.swagger_support"), "false");
    // MQTT: only the TLS listener, client certificates required, identity from the certificate.
    for plain in ["tcp", "ws", "wss"] {
        assert_eq!(get(&format!("listeners.{plain}.default.enable")), "false");
    }
    assert_eq!(
        get("listeners.ssl.default.ssl_options.verify"),
        "verify_peer"
    );
    assert_eq!(
        get("listeners.ssl.default.ssl_options.fail_if_no_peer_cert"),
        "true"
    );
    assert_eq!(get("mqtt.peer_cert_as_clientid"), "cn");
    assert_eq!(get("mqtt.peer_cert_as_username"), "cn");
    // What the ACL file does not name is denied; packets stay within the protocol's frame bound.
    assert_eq!(get("authorization.no_match"), "deny");
    assert_eq!(get("mqtt.max_packet_size"), "1MB");
}

#[test]
fn the_reader_follows_nested_blocks_and_skips_lists() {
    let s = settings(
        "a {\n  b.c = 1 ## note\n  d {\n    e = \"x\"\n  }\n  l = [\n    { f = 2 }\n  ]\n}\ng = [1, 2]\nh = 3\n",
    );
    assert_eq!(s.get("a.b.c").map(String::as_str), Some("1"));
    assert_eq!(s.get("a.d.e").map(String::as_str), Some("x"));
    assert_eq!(s.get("h").map(String::as_str), Some("3"));
    assert!(!s.contains_key("a.l.f") && !s.contains_key("f"));
}
