//! `microfed console`: the operator's live page of the fleet and its rounds.
//!
//! ```text
//!  broker ──status/+ result/+ style/+ summary round command──▶ Link (subscribe only)
//!                                                                │ one task owns the state
//!                                                     state::Fleet::ingest (pure, bounded)
//!                                              │ snapshot and update (JSON), ≤ 4 per second
//!                                                         watch channels
//!                        web::start ◀── ConsoleSite: /  /console.js  /console.css
//!                                                    /state.json  /events (SSE)  /metrics
//! ```
//! The page and `/state.json` carry the whole snapshot; each event on `/events` is an update: the
//! devices and the newest closed rounds only ([`state::Fleet::update`]), which the page merges into
//! the rounds it holds (and reloads `/state.json` when it has missed more, or reconnects).
//! Map:
//! - [`ConsoleConfig`]: `console.toml` (fleet, client id, broker, `[web]` listener, caps).
//! - [`state`]: the pure model, messages in, snapshot out.
//! - [`start`]: connects, serves, and runs the I/O loop until `stop`.
//!
//! The console publishes nothing: it has no last will, and its broker role (broker-config/, user
//! `console`) may only read. The page and its script and style are compiled into the binary
//! (`include_str!`): labs run offline, and the page loads nothing from elsewhere (its
//! Content-Security-Policy says so to the browser).

pub mod state;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::prometheus::{Collect, Exposition, MetricType};
use crate::web::{ListenSection, Reply, Site, WebError};
use crate::wire::link::{BrokerSettings, Link, LinkError};
use crate::wire::signing::PublicKey;
use state::{Fleet, Limits};

const INDEX_HTML: &str = include_str!("page/index.html");
const CONSOLE_JS: &str = include_str!("page/console.js");
const CONSOLE_CSS: &str = include_str!("page/console.css");

/// Shortest interval between two snapshots: a burst of messages (a round closing on 100 devices)
/// is shown once.
const SNAPSHOT_INTERVAL: Duration = Duration::from_millis(250);
/// Rates and "last seen" ages move even when nothing arrives.
const TICK: Duration = Duration::from_secs(2);

/// `console.toml`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsoleConfig {
    pub fleet: String,
    /// MQTT client id; with the fleet's broker, the certificate's CN (`console`).
    #[serde(default = "default_id")]
    pub id: String,
    /// The aggregator's public key (hex): round announcements and summaries not signed by it are
    /// refused. None: shown as sent (a warning at start).
    #[serde(default)]
    pub aggregator_key: Option<String>,
    #[serde(default)]
    pub broker: BrokerSettings,
    /// Where the page is served (loopback unless configured).
    #[serde(default = "default_web")]
    pub web: ListenSection,
    /// Devices tracked at most.
    #[serde(default = "default_max_devices")]
    pub max_devices: usize,
    /// Closed rounds kept at most.
    #[serde(default = "default_max_rounds")]
    pub max_rounds: usize,
}

fn default_id() -> String {
    "console".into()
}
fn default_web() -> ListenSection {
    ListenSection::loopback(9470)
}
fn default_max_devices() -> usize {
    Limits::default().devices
}
fn default_max_rounds() -> usize {
    Limits::default().rounds
}

/// The commented example (`microfed console --example-config`).
pub const EXAMPLE_CONFIG: &str = include_str!("../../console.example.toml");

/// Why the console could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    #[error("{path}: {message}")]
    Config { path: PathBuf, message: String },
    #[error("the broker connection: {0}")]
    Link(#[from] LinkError),
    #[error("the web listener: {0}")]
    Web(#[from] WebError),
}

impl ConsoleConfig {
    /// Reads and checks a file; relative paths are taken from its folder.
    pub fn load(path: &Path) -> Result<Self, ConsoleError> {
        let err = |message: String| ConsoleError::Config {
            path: path.to_owned(),
            message,
        };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        let mut cfg: Self = toml::from_str(&text).map_err(|e| err(e.to_string()))?;
        let base = path.parent().unwrap_or(Path::new(""));
        cfg.web.resolve_paths(base);
        if let Some(t) = cfg.broker.tls.as_mut() {
            for p in [&mut t.ca, &mut t.cert, &mut t.key] {
                if p.is_relative() {
                    *p = base.join(&*p);
                }
            }
        }
        cfg.validate().map_err(err)?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<(), String> {
        crate::wire::protocol::Topics::new(&self.fleet)?;
        if !crate::wire::protocol::valid_level(&self.id) {
            return Err(format!("id {:?} is not a valid client id", self.id));
        }
        if self.max_devices == 0 || self.max_devices > 100_000 {
            return Err("max_devices must be 1..=100000".into());
        }
        if self.max_rounds == 0 || self.max_rounds > 100_000 {
            return Err("max_rounds must be 1..=100000".into());
        }
        self.key().map_err(|e| format!("aggregator_key: {e}"))?;
        self.web.validate("web").map_err(|e| e.to_string())
    }

    fn key(&self) -> Result<Option<PublicKey>, String> {
        self.aggregator_key
            .as_deref()
            .map(|k| PublicKey::parse(k).map_err(|e| e.to_string()))
            .transpose()
    }
}

/// What `/metrics` of the console says, refreshed with each snapshot.
#[derive(Debug, Default)]
struct ConsoleFigures {
    messages: u64,
    refused: state::Refused,
    devices: usize,
    online: usize,
    rounds: usize,
}

impl Collect for Mutex<ConsoleFigures> {
    fn collect(&self, out: &mut Exposition) {
        let f = self.lock().unwrap_or_else(|e| e.into_inner());
        out.counter(
            "microfed_console_messages_total",
            "MQTT messages the console received.",
            f.messages,
        );
        let name = "microfed_console_messages_refused_total";
        out.family(
            name,
            MetricType::Counter,
            "Messages the console refused, by reason.",
        );
        for (why, n) in [
            ("malformed", f.refused.malformed),
            ("forged_sender", f.refused.forged_sender),
            ("bad_signature", f.refused.bad_signature),
            ("too_many_devices", f.refused.too_many_devices),
        ] {
            out.sample(name, &[("reason", why)], n as f64);
        }
        out.gauge(
            "microfed_console_devices",
            "Devices the console tracks.",
            f.devices as f64,
        );
        out.gauge(
            "microfed_console_devices_online",
            "Devices whose last status says online.",
            f.online as f64,
        );
        out.gauge(
            "microfed_console_rounds",
            "Closed rounds the console holds.",
            f.rounds as f64,
        );
    }
}

/// The console's web site: the page, its assets, the snapshot and its stream, its metrics.
struct ConsoleSite {
    snapshots: watch::Receiver<Arc<str>>,
    updates: watch::Receiver<Arc<str>>,
    figures: Arc<Mutex<ConsoleFigures>>,
}

/// The snapshot inside a `<script type="application/json">`: `<` escaped so that no string in it
/// can close the element.
fn embeddable(json: &str) -> String {
    json.replace('<', "\\u003c")
        .replace('>', "\\u003e")
        .replace('&', "\\u0026")
}

impl Site for ConsoleSite {
    fn get(&self, path: &str) -> Reply {
        let body = |content_type: &'static str, body: Vec<u8>| Reply::Body {
            status: 200,
            content_type,
            body,
        };
        match path {
            "/" | "/index.html" => {
                // The current state is in the page itself: it renders at load, before the event
                // stream opens (and in a browser without JavaScript's EventSource, once).
                let snap = self.snapshots.borrow().clone();
                let html = INDEX_HTML.replace("__SNAPSHOT__", &embeddable(&snap));
                body("text/html; charset=utf-8", html.into_bytes())
            }
            "/console.js" => body(
                "text/javascript; charset=utf-8",
                CONSOLE_JS.as_bytes().to_vec(),
            ),
            "/console.css" => body("text/css; charset=utf-8", CONSOLE_CSS.as_bytes().to_vec()),
            "/state.json" => body(
                "application/json",
                self.snapshots.borrow().as_bytes().to_vec(),
            ),
            "/events" => Reply::Events(self.updates.clone()),
            "/metrics" => body(
                crate::prometheus::CONTENT_TYPE,
                Exposition::of(&[self.figures.as_ref()]).into_bytes(),
            ),
            _ => Reply::not_found(),
        }
    }
}

/// Connects to the broker (in the background), binds the page's listener and starts the I/O loop.
/// Returns the page's address and the loop's task, which ends when `stop` turns true.
pub async fn start(
    cfg: &ConsoleConfig,
    stop: watch::Receiver<bool>,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>), ConsoleError> {
    cfg.validate().map_err(|message| ConsoleError::Config {
        path: PathBuf::from("console.toml"),
        message,
    })?;
    let key = cfg.key().unwrap_or(None);
    if key.is_none() {
        tracing::warn!("no aggregator_key in console.toml: round summaries are shown unverified");
    }
    let mut fleet = Fleet::new(
        &cfg.fleet,
        Limits {
            devices: cfg.max_devices,
            rounds: cfg.max_rounds,
        },
        key,
    )
    .map_err(|message| ConsoleError::Config {
        path: PathBuf::from("console.toml"),
        message,
    })?;
    let (tx, rx) = watch::channel::<Arc<str>>(Arc::from(fleet.snapshot()));
    let (updates_tx, updates) = watch::channel::<Arc<str>>(Arc::from(fleet.update()));
    let figures = Arc::new(Mutex::new(ConsoleFigures::default()));
    let site = Arc::new(ConsoleSite {
        snapshots: rx,
        updates,
        figures: figures.clone(),
    });
    let (addr, _web) = crate::web::start("web", &cfg.web, site, stop.clone()).await?;
    // No last will: the console is not a device, and it publishes nothing.
    let (link, mut inbox) = Link::start(&cfg.broker, &cfg.id, fleet.subscriptions(), None)?;
    let mut stop = stop;
    let task = tokio::spawn(async move {
        let mut dirty = false;
        let mut shown = Instant::now();
        let mut tick = tokio::time::interval(TICK);
        loop {
            tokio::select! {
                m = inbox.recv() => match m {
                    Some(m) => dirty |= fleet.ingest(&m.topic, &m.payload, crate::fsio::now_unix()),
                    None => break,
                },
                _ = tick.tick() => {
                    fleet.tick(crate::fsio::now_unix());
                    dirty = true;
                }
                r = stop.changed() => if r.is_err() || *stop.borrow() { break },
            }
            if dirty && shown.elapsed() >= SNAPSHOT_INTERVAL {
                let _ = tx.send(Arc::from(fleet.snapshot()));
                let _ = updates_tx.send(Arc::from(fleet.update()));
                {
                    let mut f = figures.lock().unwrap_or_else(|e| e.into_inner());
                    f.messages = fleet.messages();
                    f.refused = fleet.refused().clone();
                    f.devices = fleet.devices().len();
                    f.online = fleet.devices().values().filter(|d| d.online).count();
                    f.rounds = fleet.rounds().len();
                }
                dirty = false;
                shown = Instant::now();
            }
        }
        link.disconnect().await;
    });
    Ok((addr, task))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_config_parses_and_the_page_embeds_the_snapshot_safely() {
        let c: ConsoleConfig = toml::from_str(EXAMPLE_CONFIG).unwrap();
        c.validate().unwrap();
        assert!(c.web.listen.ip().is_loopback());
        let e = toml::from_str::<ConsoleConfig>("fleet = \"f\"\n[web]\nlisten = \"0.0.0.0:80\"\n")
            .unwrap()
            .validate()
            .unwrap_err();
        assert!(e.contains("token_file"), "{e}");
        let s = embeddable("{\"e\":\"</script><b>&\"}");
        assert!(
            !s.contains('<') && !s.contains('>') && !s.contains('&'),
            "{s}"
        );
        assert!(INDEX_HTML.contains("__SNAPSHOT__"));
        for page in [INDEX_HTML, CONSOLE_JS, CONSOLE_CSS] {
            for outside in [
                "src=\"http",
                "href=\"http",
                "url(",
                "@import",
                "fetch(\"http",
            ] {
                assert!(!page.contains(outside), "an outside asset: {outside}");
            }
        }
    }
}
