//! The zero-setup broker: rumqttd in this process, on loopback.
//!
//! With no broker configured, `microfed aggregate` (and `microfed demo`) start one so that a single
//! machine works with no set-up. It listens on 127.0.0.1 only, without TLS or authentication: it is
//! for one machine, never for a fleet (broker-config/ has the real brokers). Its packet limit is the
//! protocol's [`MAX_PACKET_BYTES`]. rumqttd's `Broker::start` blocks and has no shutdown call, so it
//! runs on its own thread for the life of the process.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use rumqttd::{Broker, Config, ConnectionSettings, RouterConfig, ServerSettings};

use crate::wire::protocol::MAX_PACKET_BYTES;

/// Why the embedded broker did not start.
#[derive(Debug, thiserror::Error)]
pub enum EmbeddedError {
    #[error("no free loopback port for the embedded broker: {0}")]
    Port(std::io::Error),
    #[error("the embedded broker did not start listening on {addr} within {seconds} s")]
    NotListening { addr: SocketAddr, seconds: u64 },
}

/// A running embedded broker (it lives until the process ends).
#[derive(Debug, Clone, Copy)]
pub struct EmbeddedBroker {
    pub addr: SocketAddr,
}

/// A free TCP port on loopback (rumqttd cannot listen on port 0 and report the port).
pub fn free_port() -> Result<u16, EmbeddedError> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(EmbeddedError::Port)?;
    Ok(l.local_addr().map_err(EmbeddedError::Port)?.port())
}

/// Starts rumqttd on `127.0.0.1:port` (0 = a free port) and waits until it accepts connections.
pub fn start(port: u16) -> Result<EmbeddedBroker, EmbeddedError> {
    let port = if port == 0 { free_port()? } else { port };
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let server = ServerSettings {
        name: "microfed-embedded".into(),
        listen: addr,
        tls: None,
        next_connection_delay_ms: 1,
        connections: ConnectionSettings {
            connection_timeout_ms: 60_000,
            max_payload_size: MAX_PACKET_BYTES,
            max_inflight_count: 200,
            auth: None,
            external_auth: None,
            dynamic_filters: true,
        },
    };
    let config = Config {
        id: 0,
        router: RouterConfig {
            max_connections: 10_010,
            max_outgoing_packet_count: 200,
            max_segment_size: 256 * 1024 * 1024,
            max_segment_count: 10,
            custom_segment: None,
            initialized_filters: None,
            shared_subscriptions_strategy: Default::default(),
        },
        v4: Some(HashMap::from([("v4".to_string(), server)])),
        ..Config::default()
    };
    std::thread::Builder::new()
        .name("embedded-broker".into())
        .spawn(move || {
            let mut broker = Broker::new(config);
            if let Err(e) = broker.start() {
                tracing::error!(error = %e, "the embedded broker stopped");
            }
        })
        .map_err(EmbeddedError::Port)?;
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(10) {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            tracing::info!(%addr, "embedded broker (rumqttd) listening on loopback");
            return Ok(EmbeddedBroker { addr });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(EmbeddedError::NotListening { addr, seconds: 10 })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::link::{BrokerSettings, Link};
    use crate::wire::protocol::{self, Reassembler, ReassemblyLimits, Topics};

    /// The embedded broker carries a chunked 3 MB message (a dense decoder) between two links, with
    /// every frame confirmed, through the aggregators' shared subscription; a retained message
    /// reaches a late subscriber.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn embedded_broker_carries_chunked_confirmed_and_retained_messages() {
        let b = start(0).unwrap();
        let settings = BrokerSettings {
            port: b.addr.port(),
            ack_timeout_s: 10,
            ..BrokerSettings::default()
        };
        let t = Topics::new("t").unwrap();
        let (agg, mut inbox) = Link::start(
            &settings,
            "aggregator",
            vec![t.update_shared_filter("aggregators")],
            None,
        )
        .unwrap();
        let (dev, _rx) = Link::start(&settings, "dev-1", vec![], None).unwrap();
        agg.wait_connected(Duration::from_secs(10)).await.unwrap();
        dev.wait_connected(Duration::from_secs(10)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await; // the subscription lands

        let message: Vec<u8> = (0..3_000_000u32).map(|i| (i % 253) as u8).collect();
        let frames = protocol::split(&message, protocol::CHUNK_BYTES).unwrap();
        assert_eq!(frames.len(), 12);
        dev.publish_frames(|_| t.update("dev-1"), frames, false)
            .await
            .unwrap();
        let mut r = Reassembler::new(ReassemblyLimits::default());
        let whole = tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                let m = inbox.recv().await.unwrap();
                assert_eq!(m.topic, t.update("dev-1"));
                if let Some(w) = r.push(&m.topic, &m.payload).unwrap() {
                    return w;
                }
            }
        })
        .await
        .expect("the chunked message arrives");
        assert_eq!(whole, message);

        // Retained: published before anyone subscribes, delivered on subscription.
        agg.publish(&t.round(), b"round 1".to_vec(), true)
            .await
            .unwrap();
        let (late, mut late_rx) = Link::start(&settings, "dev-2", vec![t.round()], None).unwrap();
        late.wait_connected(Duration::from_secs(10)).await.unwrap();
        let m = tokio::time::timeout(Duration::from_secs(10), late_rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(m.payload, b"round 1");
        assert!(m.retain);
    }
}
