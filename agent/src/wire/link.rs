//! [`Link`]: one MQTT connection (rumqttc) that reconnects by itself and confirms publishes.
//!
//! - Settings: [`BrokerSettings`] (host, port, optional TLS with a client certificate whose CN is the
//!   device id, keep-alive, packet limit), from the agent's or the aggregator's TOML.
//! - Sessions are persistent (`clean_session = false`) with a stable client id, so the broker keeps
//!   the subscriptions and queues QoS 1 messages while the client is away.
//! - [`Link::publish`] returns only when the broker has acknowledged the message (PUBACK). rumqttc
//!   reports `Outgoing::Publish(pkid)` in the order publishes were requested, so the event task pairs
//!   each request with its packet id, then its PUBACK. On a lost connection every unconfirmed publish
//!   fails and rumqttc's own retransmission queue is cleared: the caller (the outbox) decides what to
//!   send again, and receivers drop duplicates by digest. One owner of retries, no hidden ones.
//! - Incoming publishes go to a bounded channel ([`Message`]); subscriptions are (re)made after every
//!   CONNACK.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rumqttc::{
    AsyncClient, ConnectionError, Event, EventLoop, LastWill, MqttOptions, Outgoing, Packet, QoS,
    TlsConfiguration, Transport,
};
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};

use crate::wire::protocol::MAX_PACKET_BYTES;

/// Where the broker is and how to talk to it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerSettings {
    #[serde(default = "default_host")]
    pub host: String,
    #[serde(default = "default_port")]
    pub port: u16,
    /// TLS with client certificates (a real broker); none = plain TCP (the embedded broker on
    /// loopback).
    #[serde(default)]
    pub tls: Option<TlsFiles>,
    /// Plain TCP to a broker off loopback: refused unless this is set. Without TLS, anyone on the
    /// path reads the updates and style codes and can inject messages under any device's name; set
    /// it only on a network that is itself protected (a VPN or an isolated lab segment).
    #[serde(default)]
    pub allow_plaintext: bool,
    #[serde(default = "default_keep_alive")]
    pub keep_alive_s: u64,
    /// Largest packet sent or accepted; brokers are configured with the same limit.
    #[serde(default = "default_max_packet")]
    pub max_packet_bytes: usize,
    /// How long a publish may wait for the broker's acknowledgement.
    #[serde(default = "default_ack_timeout")]
    pub ack_timeout_s: u64,
}

/// PEM files of a TLS client.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// The fleet's CA certificate (verifies the broker).
    pub ca: PathBuf,
    /// This client's certificate (CN = its id) and key.
    pub cert: PathBuf,
    pub key: PathBuf,
}

fn default_host() -> String {
    "127.0.0.1".into()
}
fn default_port() -> u16 {
    1883
}
fn default_keep_alive() -> u64 {
    10
}
fn default_max_packet() -> usize {
    MAX_PACKET_BYTES
}
fn default_ack_timeout() -> u64 {
    30
}

impl Default for BrokerSettings {
    fn default() -> Self {
        Self {
            host: default_host(),
            port: default_port(),
            tls: None,
            allow_plaintext: false,
            keep_alive_s: default_keep_alive(),
            max_packet_bytes: default_max_packet(),
            ack_timeout_s: default_ack_timeout(),
        }
    }
}

/// Why the link could not do something.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("{path}: {message}")]
    Tls { path: PathBuf, message: String },
    #[error(
        "broker {0}: plain TCP off loopback; give [broker] tls files (ca, cert, key), or set \
         allow_plaintext = true if the network itself is protected"
    )]
    Plaintext(String),
    #[error("not connected to the broker at {0}")]
    NotConnected(String),
    #[error("the connection to {broker} was lost before the broker acknowledged {topic}")]
    Lost { broker: String, topic: String },
    #[error("no acknowledgement for {topic} from {broker} within {seconds} s")]
    Timeout {
        broker: String,
        topic: String,
        seconds: u64,
    },
    #[error("the MQTT client stopped: {0}")]
    Closed(String),
}

/// One message received.
#[derive(Debug, Clone)]
pub struct Message {
    pub topic: String,
    pub payload: Vec<u8>,
    pub retain: bool,
    /// On a link started with [`Link::start_acking_when_done`]: the broker's acknowledgement (PUBACK),
    /// sent when the last clone of this message is dropped, i.e. when its consumer has finished with it.
    pub ack: Option<Arc<AckWhenDone>>,
}

/// Acknowledges one QoS 1 message to the broker when dropped. Until then the broker keeps the message
/// for this session and delivers it again after a reconnect, so a consumer that persists what it
/// received before dropping the message never loses one to a crash in between.
pub struct AckWhenDone {
    client: AsyncClient,
    publish: rumqttc::Publish,
    withheld: std::sync::atomic::AtomicBool,
}

impl Message {
    /// The consumer failed to keep this message (a disk error, say) and is stopping: do not
    /// acknowledge it, so that the broker delivers it again to the next session.
    pub fn withhold_ack(&self) {
        if let Some(a) = &self.ack {
            a.withheld.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }
}

impl std::fmt::Debug for AckWhenDone {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AckWhenDone")
            .field("topic", &self.publish.topic)
            .field("pkid", &self.publish.pkid)
            .finish()
    }
}

impl Drop for AckWhenDone {
    fn drop(&mut self) {
        if self.withheld.load(std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        if self.client.try_ack(&self.publish).is_ok() {
            return;
        }
        // The request queue is full: acknowledge from a task instead of blocking the dropper.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let (client, publish) = (self.client.clone(), self.publish.clone());
            rt.spawn(async move {
                if let Err(e) = client.ack(&publish).await {
                    tracing::debug!(topic = %publish.topic, error = %e, "cannot acknowledge; the broker will deliver it again");
                }
            });
        }
    }
}

type Waiter = oneshot::Sender<Result<(), ()>>;

#[derive(Default)]
struct Acks {
    /// Publishes requested, not yet given a packet id, in request order.
    requested: VecDeque<Waiter>,
    by_pkid: HashMap<u16, Waiter>,
}

impl Acks {
    fn fail_all(&mut self) {
        for w in self.requested.drain(..) {
            let _ = w.send(Err(()));
        }
        for (_, w) in self.by_pkid.drain() {
            let _ = w.send(Err(()));
        }
    }
}

/// A running MQTT connection. Dropping it stops the event task.
pub struct Link {
    client: AsyncClient,
    acks: Arc<Mutex<Acks>>,
    send_lock: tokio::sync::Mutex<()>,
    connected: watch::Receiver<bool>,
    broker: String,
    ack_timeout: Duration,
    task: tokio::task::JoinHandle<()>,
    /// Publishes that failed (lost or timed out), for status lines.
    pub id: String,
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link")
            .field("id", &self.id)
            .field("broker", &self.broker)
            .field("connected", &*self.connected.borrow())
            .finish()
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Builds rumqttc options for `client_id` (TLS files read and checked here).
pub fn mqtt_options(
    settings: &BrokerSettings,
    client_id: &str,
    will: Option<LastWill>,
) -> Result<MqttOptions, LinkError> {
    if settings.tls.is_none() && !settings.allow_plaintext && !is_loopback_host(&settings.host) {
        return Err(LinkError::Plaintext(format!(
            "{}:{}",
            settings.host, settings.port
        )));
    }
    let mut o = MqttOptions::new(client_id, settings.host.clone(), settings.port);
    o.set_keep_alive(Duration::from_secs(settings.keep_alive_s.max(5)));
    o.set_clean_session(false);
    o.set_max_packet_size(settings.max_packet_bytes, settings.max_packet_bytes);
    o.set_inflight(32);
    if let Some(w) = will {
        o.set_last_will(w);
    }
    if let Some(tls) = &settings.tls {
        o.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
            Arc::new(rustls_config(tls)?),
        )));
    }
    Ok(o)
}

/// `localhost` or a loopback address (`127.0.0.0/8`, `::1`): traffic that never leaves the machine.
pub fn is_loopback_host(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// A rustls client configuration on the `ring` provider: the fleet CA as the only root, and this
/// client's certificate for mutual TLS.
pub fn rustls_config(tls: &TlsFiles) -> Result<rustls::ClientConfig, LinkError> {
    let read = |p: &PathBuf| {
        std::fs::read(p).map_err(|e| LinkError::Tls {
            path: p.clone(),
            message: e.to_string(),
        })
    };
    let bad = |p: &PathBuf, m: String| LinkError::Tls {
        path: p.clone(),
        message: m,
    };
    let mut roots = rustls::RootCertStore::empty();
    let ca = read(&tls.ca)?;
    let mut n = 0;
    // PEM parsing from rustls-pki-types (rustls-pemfile is unmaintained: RUSTSEC-2025-0134).
    for cert in CertificateDer::pem_slice_iter(&ca) {
        let cert = cert.map_err(|e| bad(&tls.ca, format!("not a PEM certificate: {e}")))?;
        roots
            .add(cert)
            .map_err(|e| bad(&tls.ca, format!("unusable CA certificate: {e}")))?;
        n += 1;
    }
    if n == 0 {
        return Err(bad(&tls.ca, "no certificate in the file".into()));
    }
    let cert_pem = read(&tls.cert)?;
    let chain: Vec<_> = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| bad(&tls.cert, format!("not a PEM certificate: {e}")))?;
    if chain.is_empty() {
        return Err(bad(&tls.cert, "no certificate in the file".into()));
    }
    let key_pem = read(&tls.key)?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| match e {
        pem::Error::NoItemsFound => bad(&tls.key, "no private key in the file".into()),
        e => bad(&tls.key, format!("not a PEM key: {e}")),
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(&tls.ca, e.to_string()))?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .map_err(|e| bad(&tls.key, format!("key does not fit the certificate: {e}")))
}

impl Link {
    /// Starts the connection task. Returns at once; [`Link::wait_connected`] waits for the broker.
    /// `subscriptions` are made after every CONNACK.
    pub fn start(
        settings: &BrokerSettings,
        client_id: &str,
        subscriptions: Vec<String>,
        will: Option<LastWill>,
    ) -> Result<(Self, mpsc::Receiver<Message>), LinkError> {
        Self::start_with(settings, client_id, subscriptions, will, false)
    }

    /// [`Link::start`], but a received message is acknowledged to the broker only when its consumer
    /// drops it ([`Message::ack`]), not on arrival: for the aggregator, which must have an update on
    /// disk before the broker may forget it.
    pub fn start_acking_when_done(
        settings: &BrokerSettings,
        client_id: &str,
        subscriptions: Vec<String>,
        will: Option<LastWill>,
    ) -> Result<(Self, mpsc::Receiver<Message>), LinkError> {
        Self::start_with(settings, client_id, subscriptions, will, true)
    }

    fn start_with(
        settings: &BrokerSettings,
        client_id: &str,
        subscriptions: Vec<String>,
        will: Option<LastWill>,
        ack_when_done: bool,
    ) -> Result<(Self, mpsc::Receiver<Message>), LinkError> {
        let mut options = mqtt_options(settings, client_id, will)?;
        options.set_manual_acks(ack_when_done);
        let (client, eventloop) = AsyncClient::new(options, 256);
        let (tx, rx) = mpsc::channel(1024);
        let (conn_tx, conn_rx) = watch::channel(false);
        let acks = Arc::new(Mutex::new(Acks::default()));
        let broker = format!("{}:{}", settings.host, settings.port);
        let task = tokio::spawn(drive(
            eventloop,
            client.clone(),
            subscriptions,
            tx,
            conn_tx,
            acks.clone(),
            broker.clone(),
            client_id.to_owned(),
            ack_when_done,
        ));
        Ok((
            Self {
                client,
                acks,
                send_lock: tokio::sync::Mutex::new(()),
                connected: conn_rx,
                broker,
                ack_timeout: Duration::from_secs(settings.ack_timeout_s.max(1)),
                task,
                id: client_id.to_owned(),
            },
            rx,
        ))
    }

    pub fn broker(&self) -> &str {
        &self.broker
    }

    pub fn is_connected(&self) -> bool {
        *self.connected.borrow()
    }

    /// Follows the connection state.
    pub fn connection(&self) -> watch::Receiver<bool> {
        self.connected.clone()
    }

    /// Waits until connected, at most `timeout`.
    pub async fn wait_connected(&self, timeout: Duration) -> Result<(), LinkError> {
        let mut rx = self.connected.clone();
        let ok = tokio::time::timeout(timeout, rx.wait_for(|c| *c)).await;
        match ok {
            Ok(Ok(_)) => Ok(()),
            _ => Err(LinkError::NotConnected(self.broker.clone())),
        }
    }

    /// Publishes with QoS 1 and waits for the broker's PUBACK.
    pub async fn publish(
        &self,
        topic: &str,
        payload: Vec<u8>,
        retain: bool,
    ) -> Result<(), LinkError> {
        if !self.is_connected() {
            return Err(LinkError::NotConnected(self.broker.clone()));
        }
        let (tx, rx) = oneshot::channel();
        {
            let _order = self.send_lock.lock().await;
            self.acks
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .requested
                .push_back(tx);
            if let Err(e) = self
                .client
                .publish(topic, QoS::AtLeastOnce, retain, payload)
                .await
            {
                self.acks
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .requested
                    .pop_back();
                return Err(LinkError::Closed(e.to_string()));
            }
        }
        match tokio::time::timeout(self.ack_timeout, rx).await {
            Ok(Ok(Ok(()))) => Ok(()),
            Ok(_) => Err(LinkError::Lost {
                broker: self.broker.clone(),
                topic: topic.to_owned(),
            }),
            Err(_) => Err(LinkError::Timeout {
                broker: self.broker.clone(),
                topic: topic.to_owned(),
                seconds: self.ack_timeout.as_secs(),
            }),
        }
    }

    /// Publishes every frame of one message, in order; fails at the first frame not acknowledged.
    pub async fn publish_frames(
        &self,
        topic_of: impl Fn(usize) -> String,
        frames: Vec<Vec<u8>>,
        retain: bool,
    ) -> Result<(), LinkError> {
        for (i, f) in frames.into_iter().enumerate() {
            self.publish(&topic_of(i), f, retain).await?;
        }
        Ok(())
    }

    /// Sends DISCONNECT (no last will) and stops.
    pub async fn disconnect(&self) {
        let _ = self.client.disconnect().await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        self.task.abort();
    }
}

#[allow(clippy::too_many_arguments)]
async fn drive(
    mut eventloop: EventLoop,
    client: AsyncClient,
    subscriptions: Vec<String>,
    tx: mpsc::Sender<Message>,
    connected: watch::Sender<bool>,
    acks: Arc<Mutex<Acks>>,
    broker: String,
    id: String,
    ack_when_done: bool,
) {
    let mut backoff = Duration::from_millis(200);
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                tracing::info!(client = %id, %broker, session_present = ack.session_present, "connected to the broker");
                backoff = Duration::from_millis(200);
                // Subscribe from another task: the request channel is drained by this one.
                let (c, subs) = (client.clone(), subscriptions.clone());
                tokio::spawn(async move {
                    for s in subs {
                        if let Err(e) = c.subscribe(s.clone(), QoS::AtLeastOnce).await {
                            tracing::warn!(filter = %s, error = %e, "cannot subscribe");
                        }
                    }
                });
                let _ = connected.send(true);
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                let m = Message {
                    topic: p.topic.clone(),
                    payload: p.payload.to_vec(),
                    retain: p.retain,
                    // QoS 0 has nothing to acknowledge.
                    ack: (ack_when_done && p.qos != QoS::AtMostOnce).then(|| {
                        Arc::new(AckWhenDone {
                            client: client.clone(),
                            publish: p.clone(),
                            withheld: false.into(),
                        })
                    }),
                };
                if tx.send(m).await.is_err() {
                    break;
                }
            }
            Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                let mut a = acks.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(w) = a.requested.pop_front() {
                    a.by_pkid.insert(pkid, w);
                }
            }
            Ok(Event::Incoming(Packet::PubAck(ack))) => {
                let w = acks
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .by_pkid
                    .remove(&ack.pkid);
                if let Some(w) = w {
                    let _ = w.send(Ok(()));
                }
            }
            Ok(Event::Incoming(Packet::SubAck(s))) => {
                tracing::debug!(client = %id, ?s.return_codes, "subscribed");
            }
            Ok(Event::Outgoing(Outgoing::Disconnect)) => {
                let _ = connected.send(false);
                acks.lock().unwrap_or_else(|e| e.into_inner()).fail_all();
            }
            Ok(_) => {}
            Err(e) => {
                if *connected.borrow() {
                    tracing::warn!(client = %id, %broker, error = %e, "lost the broker; reconnecting");
                } else {
                    tracing::debug!(client = %id, %broker, error = %e, "cannot reach the broker");
                }
                let _ = connected.send(false);
                // The outbox owns retries: drop rumqttc's replay queue and fail the waiters.
                eventloop.pending.clear();
                acks.lock().unwrap_or_else(|e| e.into_inner()).fail_all();
                if let ConnectionError::ConnectionRefused(code) = &e {
                    tracing::error!(client = %id, ?code, "the broker refused the connection");
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// A last will that marks `device` offline on its status topic (retained).
pub fn offline_will(topic: String, payload: Vec<u8>) -> LastWill {
    LastWill::new(topic, payload, QoS::AtLeastOnce, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_tcp_off_loopback_is_refused_unless_allowed() {
        for host in [
            "127.0.0.1",
            "127.3.4.5",
            "localhost",
            "LocalHost",
            "::1",
            "[::1]",
        ] {
            assert!(is_loopback_host(host), "{host}");
            let s = BrokerSettings {
                host: host.into(),
                ..BrokerSettings::default()
            };
            mqtt_options(&s, "dev-a", None).unwrap();
        }
        for host in [
            "10.0.0.7",
            "broker.lab",
            "0.0.0.0",
            "localhost.evil",
            "::ffff:10.0.0.7",
        ] {
            assert!(!is_loopback_host(host), "{host}");
            let mut s = BrokerSettings {
                host: host.into(),
                port: 1884,
                ..BrokerSettings::default()
            };
            let err = mqtt_options(&s, "dev-a", None).unwrap_err().to_string();
            assert!(
                err.contains(&format!("{host}:1884")) && err.contains("allow_plaintext"),
                "{err}"
            );
            s.allow_plaintext = true;
            mqtt_options(&s, "dev-a", None).unwrap();
        }
        // The flag is read from TOML and defaults to off.
        let s: BrokerSettings = toml::from_str("host = \"10.0.0.7\"\n").unwrap();
        assert!(!s.allow_plaintext);
        let s: BrokerSettings =
            toml::from_str("host = \"10.0.0.7\"\nallow_plaintext = true\n").unwrap();
        assert!(s.allow_plaintext);
    }
}
