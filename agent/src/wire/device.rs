//! The device's one MQTT connection, shared by its tasks.
//!
//! The fleet's broker makes the client id the certificate's CN, so a device has exactly one
//! connection: a second one with the same certificate would take the first one's place. This module
//! owns it and hands each task what it needs:
//! - [`DeviceLink`]: the [`Link`] (for publishing), the fleet's [`Topics`], the device id, and the
//!   [`StatusBoard`] every task reports into;
//! - [`Routes`]: incoming messages split by topic: rounds, global decoders and style codes
//!   (`style/+`, every device's retained code, this device's own included) go to the
//!   federated-rounds task ([`crate::federated::edge::participant`]); model versions and commands to the fleet task.
//! - A status task publishes the board (retained) whenever it changes or the link comes back; the
//!   link's last will marks the device offline.
//! - [`MqttPublisher`]: the pipeline's [`Publisher`] that sends each segmented micrograph's figures
//!   (never the image) on `result/<device>`.
//! - [`LinkCounters`]: what the link sent, counted where it is sent; [`DeviceLink`] writes them,
//!   with the connection state and the outbox depth, as the agent's federation metrics.

use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, watch};

use crate::pipeline::publish::{PublishError, Publisher, SegmentedImage};
use crate::prometheus::{Collect, Counter, Exposition};
use crate::wire::link::{BrokerSettings, Link, LinkError, Message, offline_will};
use crate::wire::protocol::{Envelope, Header, Kind, ResultBody, StatusBody, Topics};

/// What the device says about itself on `status/<device>` (retained).
#[derive(Debug)]
pub struct StatusBoard {
    body: Mutex<StatusBody>,
    changed: watch::Sender<u64>,
}

impl StatusBoard {
    fn new(body: StatusBody) -> Self {
        Self {
            body: Mutex::new(body),
            changed: watch::channel(0).0,
        }
    }
    /// Changes the status; the status task publishes it.
    pub fn update(&self, f: impl FnOnce(&mut StatusBody)) {
        f(&mut self.body.lock().unwrap_or_else(|e| e.into_inner()));
        self.changed.send_modify(|n| *n += 1);
    }
    pub fn get(&self) -> StatusBody {
        self.body.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// The device's connection and identity, cloned into each task.
#[derive(Debug, Clone)]
pub struct DeviceLink {
    pub link: Arc<Link>,
    pub topics: Topics,
    pub fleet: String,
    pub device: String,
    pub status: Arc<StatusBoard>,
    /// Shared by every task that sends on the link.
    pub counters: Arc<LinkCounters>,
}

/// What the device sent, for `/metrics`.
#[derive(Debug, Default)]
pub struct LinkCounters {
    /// Updates the broker acknowledged (every frame), from the outbox.
    pub updates_sent: Counter,
    /// Their encoded size (envelope and compressed body, before framing).
    pub update_bytes_sent: Counter,
    /// Attempts that failed (link lost, no acknowledgement): the update stays in the outbox.
    pub update_send_failures: Counter,
    /// Per-image results acknowledged by the broker.
    pub results_sent: Counter,
}

impl Collect for DeviceLink {
    fn collect(&self, out: &mut Exposition) {
        let c = &self.counters;
        out.counter(
            "microfed_updates_sent_total",
            "Decoder updates delivered to the broker (acknowledged).",
            c.updates_sent.get(),
        );
        out.counter(
            "microfed_update_sent_bytes_total",
            "Bytes of the decoder updates delivered (encoded messages, before framing).",
            c.update_bytes_sent.get(),
        );
        out.counter(
            "microfed_update_send_failures_total",
            "Update deliveries that failed and were left in the outbox for a retry.",
            c.update_send_failures.get(),
        );
        out.counter(
            "microfed_results_sent_total",
            "Per-image results (figures, never pixels) acknowledged by the broker.",
            c.results_sent.get(),
        );
        let st = self.status.get();
        out.gauge(
            "microfed_outbox_updates",
            "Updates waiting in the outbox.",
            st.queue_depth as f64,
        );
        out.gauge(
            "microfed_global_version",
            "Version of the global decoder installed.",
            st.global_version as f64,
        );
        out.gauge(
            "microfed_broker_connected",
            "1 while the MQTT connection is up.",
            if self.link.is_connected() { 1.0 } else { 0.0 },
        );
    }
}

/// Incoming messages by purpose.
#[derive(Debug)]
pub struct Routes {
    /// `round`, `global/+`, `style/+`.
    pub rounds: mpsc::Receiver<Message>,
    /// `model/+`, `command`.
    pub fleet: mpsc::Receiver<Message>,
}

impl DeviceLink {
    /// Connects (in the background: publishing waits for the link) and starts the router and the
    /// status task. Must run inside a tokio runtime.
    pub fn connect(
        broker: &BrokerSettings,
        fleet: &str,
        device: &str,
        model_version: &str,
    ) -> Result<(Self, Routes), LinkError> {
        let topics = Topics::new(fleet).map_err(LinkError::Closed)?;
        let status = StatusBody {
            device: device.to_owned(),
            online: true,
            model_version: model_version.to_owned(),
            global_version: 0,
            last_round: None,
            queue_depth: 0,
            last_error: None,
            style_codes: Vec::new(),
            style_rejected: 0,
            live_global_version: 0,
            live_personalised: false,
            live_holdout_iou: None,
            globals_refused: 0,
            global_scored_version: 0,
            global_holdout_iou: None,
        };
        let offline = seal_status(
            fleet,
            device,
            &StatusBody {
                online: false,
                ..status.clone()
            },
        )?;
        let (link, mut inbox) = Link::start(
            broker,
            device,
            vec![
                topics.round(),
                topics.global_filter(),
                format!("microfed/{fleet}/style/+"),
                format!("microfed/{fleet}/model/+"),
                topics.command(),
                // Secure aggregation: the aggregator's messages to this device alone.
                topics.secagg(device),
            ],
            Some(offline_will(topics.status(device), offline)),
        )?;
        let link = Arc::new(link);
        let (rounds_tx, rounds) = mpsc::channel(512);
        let (fleet_tx, fleet_rx) = mpsc::channel(512);
        let prefix = format!("microfed/{fleet}/");
        tokio::spawn(async move {
            while let Some(m) = inbox.recv().await {
                let section = m
                    .topic
                    .strip_prefix(&prefix)
                    .and_then(|r| r.split('/').next())
                    .unwrap_or("");
                let to = match section {
                    "round" | "global" | "style" | "secagg" => &rounds_tx,
                    "model" | "command" => &fleet_tx,
                    _ => {
                        tracing::debug!(topic = %m.topic, "message on a topic no task reads");
                        continue;
                    }
                };
                // A task that has stopped no longer reads its messages; the others go on.
                let _ = to.send(m).await;
            }
        });
        let board = Arc::new(StatusBoard::new(status));
        tokio::spawn(publish_status(
            link.clone(),
            board.clone(),
            topics.clone(),
            fleet.to_owned(),
        ));
        Ok((
            Self {
                link,
                topics,
                fleet: fleet.to_owned(),
                device: device.to_owned(),
                status: board,
                counters: Arc::default(),
            },
            Routes {
                rounds,
                fleet: fleet_rx,
            },
        ))
    }

    /// Publishes "offline" (retained) and disconnects cleanly (no last will).
    pub async fn close(&self) {
        self.status.update(|s| s.online = false);
        let body = self.status.get();
        if let Ok(bytes) = seal_status(&self.fleet, &self.device, &body) {
            let _ = self
                .link
                .publish(&self.topics.status(&self.device), bytes, true)
                .await;
        }
        self.link.disconnect().await;
    }
}

fn seal_status(fleet: &str, device: &str, body: &StatusBody) -> Result<Vec<u8>, LinkError> {
    let h = Header {
        fleet,
        round: body.last_round.unwrap_or(0),
        model_version: &body.model_version,
        sender: device,
    };
    Envelope::seal(Kind::Status, &h, body)
        .and_then(|e| e.to_bytes())
        .map_err(|e| LinkError::Closed(e.to_string()))
}

/// Publishes the status board whenever it changes or the link (re)connects.
async fn publish_status(link: Arc<Link>, board: Arc<StatusBoard>, topics: Topics, fleet: String) {
    let mut changed = board.changed.subscribe();
    let mut conn = link.connection();
    loop {
        if link.is_connected() {
            let body = board.get();
            if body.online {
                match seal_status(&fleet, &body.device, &body) {
                    Ok(bytes) => {
                        if let Err(e) = link
                            .publish(&topics.status(&body.device), bytes, true)
                            .await
                        {
                            tracing::debug!(error = %e, "status not published; will retry");
                            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                            continue;
                        }
                    }
                    Err(e) => tracing::error!(error = %e, "cannot encode the status"),
                }
            }
        }
        tokio::select! {
            r = changed.changed() => if r.is_err() { break },
            r = conn.changed() => if r.is_err() { break },
        }
    }
}

/// Sends each segmented micrograph's figures on `result/<device>`. A result that cannot be sent
/// (link down) is counted by the pipeline and not retried: the outputs and the journal on disk are
/// the record; MQTT results are a live feed.
#[derive(Debug, Clone)]
pub struct MqttPublisher {
    pub device: DeviceLink,
}

impl Publisher for MqttPublisher {
    async fn publish(&mut self, r: &SegmentedImage) -> Result<(), PublishError> {
        let d = &self.device;
        let err = |message: String| PublishError {
            key: r.key.clone(),
            message,
        };
        let body = ResultBody {
            device: d.device.clone(),
            file: r.key.clone(),
            sha256: r.sha256.clone(),
            model: r.model.clone(),
            latency_ms: r.latency.as_secs_f64() * 1e3,
            features_json: serde_json::to_string(&r.features).map_err(|e| err(e.to_string()))?,
        };
        let status = d.status.get();
        let h = Header {
            fleet: &d.fleet,
            round: status.last_round.unwrap_or(0),
            model_version: &status.model_version,
            sender: &d.device,
        };
        let bytes = Envelope::seal(Kind::Result, &h, &body)
            .and_then(|e| e.to_bytes())
            .map_err(|e| err(e.to_string()))?;
        d.link
            .publish(&d.topics.result(&d.device), bytes, false)
            .await
            .map_err(|e| err(e.to_string()))?;
        d.counters.results_sent.inc();
        Ok(())
    }
}
