//! The wire: everything that crosses the network, and the only module that touches MQTT (rumqttc,
//! rumqttd). The fleet and the federated rounds both build on it, never on each other.
//!
//! Map:
//! - [`protocol`]: topics, CBOR envelopes and bodies (the schema of every message), chunked frames and
//!   their reassembly.
//! - [`link`]: one MQTT connection (rumqttc, TLS on rustls/ring) with confirmed QoS 1 publishes.
//! - [`embedded`]: the zero-setup broker (rumqttd) on loopback.
//! - [`device`]: a device's single connection, shared by rounds, fleet, status and results.
//! - [`signing`]: Ed25519 keys and signatures: fleet releases and commands, and the aggregator's
//!   globals and round announcements.

pub mod device;
pub mod embedded;
pub mod link;
pub mod protocol;
pub mod signing;
