//! The fleet manager's side: publish signed releases and commands, and read the fleet's state.
//!
//! Map:
//! - [`Manager::connect`]: one MQTT connection as the `fleet-manager` identity (its certificate's CN),
//!   subscribed to `model/+`, `command` and `status/+`.
//! - [`Manager::observe`]: collects what the broker retains — the current release (reassembled from
//!   its chunks), the last command, every device's status — into a [`FleetView`].
//! - [`Manager::push`]: signs a release, publishes its chunks retained on `model/<i>` (a device that
//!   is offline gets it when it comes back), then clears chunk topics a longer earlier release left
//!   behind (an empty retained message deletes one).
//! - [`Manager::rollback`]: a signed, retained `rollback` command.
//! - [`status_table`] / [`list_table`]: what `microfed fleet status` and `fleet list` print.
//!
//! Every instruction carries an issue time later than any instruction the broker still holds, so
//! devices (which act only on newer instructions) take it even if this machine's clock is behind the
//! one that issued the previous instruction.

use std::collections::BTreeMap;
use std::time::Duration;

use tokio::sync::mpsc;

use super::package::{
    self, FleetCommand, Order, PackageError, Release, Signed, Target, encode_command,
    encode_release,
};
use super::signing::{Purpose, SecretKey};
use super::store::short;
use crate::wire::link::{BrokerSettings, Link, LinkError, Message};
use crate::wire::protocol::{
    self, CHUNK_BYTES, Envelope, Frame, Kind, Reassembler, ReassemblyLimits, StatusBody, Topics,
};

/// Why a fleet operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ManagerError {
    #[error(transparent)]
    Link(#[from] LinkError),
    #[error(transparent)]
    Package(#[from] PackageError),
    #[error("fleet name: {0}")]
    Fleet(String),
}

/// What the broker holds about the fleet.
#[derive(Debug, Clone, Default)]
pub struct FleetView {
    /// The retained release (not verified: this is the manager's own listing).
    pub release: Option<Release>,
    /// The signer's public key of that release, hex.
    pub release_key: Option<String>,
    /// Chunk topics that hold a retained frame (highest index + 1).
    pub chunk_topics: u32,
    /// The retained command.
    pub command: Option<FleetCommand>,
    /// Each device's last status.
    pub devices: BTreeMap<String, StatusBody>,
}

impl FleetView {
    /// Latest issue time of the instructions the broker holds.
    pub fn last_issued_ms(&self) -> u64 {
        let r = self.release.as_ref().map_or(0, |r| r.issued_ms);
        let c = self.command.as_ref().map_or(0, |c| c.issued_ms);
        r.max(c)
    }
}

/// The fleet manager's connection.
#[derive(Debug)]
pub struct Manager {
    link: Link,
    inbox: mpsc::Receiver<Message>,
    topics: Topics,
    fleet: String,
}

impl Manager {
    /// Connects as `client_id` (must be the certificate's CN with a TLS broker) and waits for the
    /// broker, at most `timeout`.
    pub async fn connect(
        broker: &BrokerSettings,
        fleet: &str,
        client_id: &str,
        timeout: Duration,
    ) -> Result<Self, ManagerError> {
        let topics = Topics::new(fleet).map_err(ManagerError::Fleet)?;
        let (link, inbox) = Link::start(
            broker,
            client_id,
            vec![
                format!("microfed/{fleet}/model/+"),
                topics.command(),
                topics.status_filter(),
            ],
            None,
        )?;
        link.wait_connected(timeout).await?;
        Ok(Self {
            link,
            inbox,
            topics,
            fleet: fleet.to_owned(),
        })
    }

    /// Collects retained (and live) messages until none has come for `quiet`, at most `limit`.
    pub async fn observe(&mut self, quiet: Duration, limit: Duration) -> FleetView {
        let mut view = FleetView::default();
        let mut reassembler = Reassembler::new(ReassemblyLimits {
            max_message: 1 << 30,
            max_pending: 1 << 30,
            timeout: limit + Duration::from_secs(60),
        });
        let end = tokio::time::Instant::now() + limit;
        // The subscriptions are made after CONNACK: give them a moment before "quiet" counts.
        let mut wait = quiet.max(Duration::from_millis(800));
        loop {
            let now = tokio::time::Instant::now();
            if now >= end {
                break;
            }
            let m = match tokio::time::timeout(wait.min(end - now), self.inbox.recv()).await {
                Ok(Some(m)) => m,
                Ok(None) | Err(_) => break,
            };
            wait = quiet;
            self.take(&mut view, &mut reassembler, m);
        }
        view
    }

    fn take(&self, view: &mut FleetView, reassembler: &mut Reassembler, m: Message) {
        if m.payload.is_empty() {
            return;
        }
        if let Some(device) = self.topics.device_of("status", &m.topic) {
            match Envelope::from_bytes(&m.payload, protocol::MAX_PACKET_BYTES)
                .and_then(|e| e.body::<StatusBody>(Kind::Status))
            {
                Ok(s) => {
                    view.devices.insert(device.to_owned(), s);
                }
                Err(e) => tracing::warn!(topic = %m.topic, error = %e, "unreadable status"),
            }
        } else if m.topic == self.topics.command() {
            match package::decode(&m.payload, &self.fleet).and_then(|(_, s)| s.peek_command()) {
                Ok(c) => view.command = Some(c),
                Err(e) => tracing::warn!(error = %e, "unreadable retained command"),
            }
        } else if let Some(i) = self.topics.device_of("model", &m.topic) {
            if let Ok(i) = i.parse::<u32>() {
                view.chunk_topics = view.chunk_topics.max(i + 1);
            }
            if let Ok(f) = protocol::from_cbor::<Frame>("frame", &m.payload) {
                view.chunk_topics = view.chunk_topics.max(f.total);
            }
            match reassembler.push("model", &m.payload) {
                Ok(Some(whole)) => match package::decode(&whole, &self.fleet) {
                    Ok((_, signed)) => match signed.peek_release() {
                        Ok(r) => {
                            view.release_key = signed.key.as_ref().map(|k| hex::encode(&k[..]));
                            view.release = Some(r);
                        }
                        Err(e) => tracing::warn!(error = %e, "unreadable retained release"),
                    },
                    Err(e) => tracing::warn!(error = %e, "unreadable retained release"),
                },
                Ok(None) => {}
                Err(e) => tracing::warn!(topic = %m.topic, error = %e, "unreadable model frame"),
            }
        }
    }

    /// Signs `release` (its issue time made later than every instruction in `view`) and publishes it
    /// retained on `model/<i>`; clears chunk topics beyond its own. Returns the chunks published.
    pub async fn push(
        &mut self,
        mut release: Release,
        key: &SecretKey,
        view: &FleetView,
    ) -> Result<u32, ManagerError> {
        release.issued_ms = release.issued_ms.max(view.last_issued_ms() + 1);
        release.fleet = self.fleet.clone();
        let signed = Signed::sign(&release, Purpose::Release, key)?;
        self.publish_release(&release.version, &signed, view).await
    }

    /// Publishes an already signed (or deliberately unsigned or altered) release: what `push` does
    /// after signing. Tests use it to send forgeries through the real path.
    pub async fn publish_release(
        &mut self,
        version: &str,
        signed: &Signed,
        view: &FleetView,
    ) -> Result<u32, ManagerError> {
        let bytes = encode_release(&self.fleet, version, signed)?;
        let frames = protocol::split(&bytes, CHUNK_BYTES).map_err(PackageError::from)?;
        let n = frames.len() as u32;
        let topics = self.topics.clone();
        self.link
            .publish_frames(|i| topics.model_chunk(i as u32), frames, true)
            .await?;
        for i in n..view.chunk_topics {
            self.link
                .publish(&self.topics.model_chunk(i), Vec::new(), true)
                .await?;
        }
        tracing::info!(version = %short(version), chunks = n, bytes = bytes.len(), "release published (retained)");
        Ok(n)
    }

    /// Orders the targeted devices back to `version` (a hash, unique prefix or label they hold).
    pub async fn rollback(
        &mut self,
        version: &str,
        target: Target,
        key: &SecretKey,
        view: &FleetView,
    ) -> Result<FleetCommand, ManagerError> {
        let cmd = FleetCommand {
            fleet: self.fleet.clone(),
            issued_ms: package::now_ms().max(view.last_issued_ms() + 1),
            target,
            order: Order::Rollback {
                version: version.to_owned(),
            },
        };
        let signed = Signed::sign(&cmd, Purpose::Command, key)?;
        self.publish_command(&signed).await?;
        Ok(cmd)
    }

    /// Publishes a signed command, retained.
    pub async fn publish_command(&mut self, signed: &Signed) -> Result<(), ManagerError> {
        let bytes = encode_command(&self.fleet, signed)?;
        self.link
            .publish(&self.topics.command(), bytes, true)
            .await?;
        Ok(())
    }

    /// Disconnects cleanly.
    pub async fn close(self) {
        self.link.disconnect().await;
    }
}

/// `fleet status`: one row per device.
pub fn status_table(view: &FleetView) -> String {
    let label = |v: &str| match &view.release {
        Some(r) if r.version == v => r
            .manifest()
            .map(|m| format!("{} ({} {})", short(v), m.name, m.version))
            .unwrap_or_else(|_| short(v).to_owned()),
        _ => short(v).to_owned(),
    };
    let mut rows = vec![[
        "DEVICE".to_owned(),
        "STATE".into(),
        "MODEL".into(),
        "GLOBAL".into(),
        "SEGMENTING".into(),
        "LAST ROUND".into(),
        "QUEUE".into(),
        "LAST ERROR".into(),
    ]];
    for (id, s) in &view.devices {
        rows.push([
            id.clone(),
            if s.online { "online" } else { "offline" }.into(),
            label(&s.model_version),
            s.global_version.to_string(),
            segmenting(s),
            s.last_round.map_or("-".into(), |r| r.to_string()),
            s.queue_depth.to_string(),
            s.last_error.clone().unwrap_or_else(|| "-".into()),
        ]);
    }
    table(&rows)
}

/// What segments on a device: the global it runs (0: the base model's own decoder), "+own" when it
/// is the lab's fine-tune of that global, and its hold-out mean IoU when it was scored there.
fn segmenting(s: &StatusBody) -> String {
    let own = if s.live_personalised { "+own" } else { "" };
    match s.live_holdout_iou.filter(|v| v.is_finite()) {
        Some(iou) => format!("{}{own} ({iou:.3})", s.live_global_version),
        None => format!("{}{own}", s.live_global_version),
    }
}

/// `fleet list`: the retained release and command, and which devices run which version.
pub fn list_table(view: &FleetView) -> String {
    let mut out = String::new();
    match &view.release {
        Some(r) => {
            let m = r.manifest().ok();
            out += &format!(
                "release on the broker: {} {} for {} issued {} ms, signed by {}\n  version {}\n",
                m.as_ref().map_or("?", |m| m.name.as_str()),
                m.as_ref().map_or("?", |m| m.version.as_str()),
                r.target,
                r.issued_ms,
                view.release_key.as_deref().unwrap_or("nobody (unsigned)"),
                r.version
            );
        }
        None => out += "release on the broker: none\n",
    }
    if let Some(c) = &view.command {
        let Order::Rollback { version } = &c.order;
        out += &format!(
            "command on the broker: rollback to {version} for {} issued {} ms\n",
            c.target, c.issued_ms
        );
    }
    let mut by_version: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (id, s) in &view.devices {
        by_version
            .entry(s.model_version.as_str())
            .or_default()
            .push(id.as_str());
    }
    let mut rows = vec![["VERSION".to_owned(), "DEVICES".into(), "RUNNING ON".into()]];
    for (v, ids) in by_version {
        rows.push([v.to_owned(), ids.len().to_string(), ids.join(", ")]);
    }
    out + &table(&rows)
}

fn table<const N: usize>(rows: &[[String; N]]) -> String {
    let mut widths = [0usize; N];
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out += line.join("  ").trim_end();
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(device: &str, online: bool, version: &str, err: Option<&str>) -> StatusBody {
        StatusBody {
            device: device.into(),
            online,
            model_version: version.into(),
            global_version: 2,
            last_round: Some(4),
            queue_depth: 1,
            last_error: err.map(str::to_owned),
            style_codes: Vec::new(),
            style_rejected: 0,
            live_global_version: 0,
            live_personalised: false,
            live_holdout_iou: None,
            globals_refused: 0,
            global_scored_version: 0,
            global_holdout_iou: None,
        }
    }

    /// Issue 17: `fleet status` cut a device's model version at byte 12, which panics when byte 12
    /// is inside a character; the version is whatever the device's status message says.
    #[test]
    fn status_table_survives_a_hostile_model_version() {
        let mut view = FleetView::default();
        for (i, v) in [
            "aaaaaaaaaaaé-forged",
            "ééééééééééééé",
            "\u{1F600}\u{1F600}\u{1F600}x",
            "",
        ]
        .iter()
        .enumerate()
        {
            let id = format!("lab-{i}");
            view.devices.insert(
                id.clone(),
                status(&id, true, v, Some("ö".repeat(300).as_str())),
            );
        }
        let t = status_table(&view);
        assert_eq!(t.lines().count(), 5, "{t}");
        assert!(t.contains("aaaaaaaaaaa"), "{t}");
        let _ = list_table(&view);
    }

    #[test]
    fn status_table_has_one_aligned_row_per_device() {
        let mut view = FleetView::default();
        let v = "ab".repeat(32);
        view.devices
            .insert("lab-b".into(), status("lab-b", false, &v, Some("boom")));
        view.devices
            .insert("lab-a".into(), status("lab-a", true, &v, None));
        view.devices.get_mut("lab-a").unwrap().live_global_version = 2;
        view.devices.get_mut("lab-a").unwrap().live_personalised = true;
        view.devices.get_mut("lab-a").unwrap().live_holdout_iou = Some(0.61234);
        let t = status_table(&view);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 3, "{t}");
        assert!(
            t.contains("SEGMENTING") && t.contains("2+own (0.612)"),
            "{t}"
        );
        assert!(lines[0].starts_with("DEVICE  STATE    MODEL"), "{t}");
        assert!(
            lines[1].starts_with("lab-a   online   abababababab  2"),
            "{t}"
        );
        assert!(
            lines[2].starts_with("lab-b   offline  abababababab  2"),
            "{t}"
        );
        assert!(lines[2].ends_with("boom"), "{t}");
        let l = list_table(&view);
        assert!(l.contains("release on the broker: none"), "{l}");
        assert!(l.contains(&format!("{v}  2        lab-a, lab-b")), "{l}");
    }
}
