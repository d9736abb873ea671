//! Federated decoder fine-tuning over MQTT (docs/protocol.md, docs/architecture.md).
//!
//! Map, from the wire inwards:
//! - [`protocol`]: topics, CBOR envelopes and bodies, chunked frames and their reassembly.
//! - [`link`]: one MQTT connection (rumqttc, TLS on rustls/ring) with confirmed QoS 1 publishes.
//! - [`embedded`]: the zero-setup broker (rumqttd) on loopback.
//! - [`compress`]: update compression (top-k with error feedback, int8/int4, zstd).
//! - [`aggregate`]: merging updates (streaming FedAvg, trimmed mean, median, clipping, server momentum).
//! - [`outbox`]: store-and-forward of updates that could not be sent.
//! - [`local`]: the encoder-feature cache and local decoder fine-tuning with the kernels crate.
//! - [`style`]: style codes (feature statistics, Fourier amplitudes) for training on non-IID labs.
//! - [`experiment`]: the same training, compression and aggregation in one process (no broker);
//!   [`plot`]: its learning curves as PNG.
//! - [`participant`]: the agent's side of rounds; [`aggregator`]: the aggregator's; [`scaleout`]:
//!   several aggregator processes (a coordinator and workers exchanging partial sums).
//! - [`secagg`]: secure aggregation (pairwise masks, Shamir dropout recovery); [`dp`]: clipping,
//!   Gaussian noise and the RDP accountant; [`attack`]: what an honest-but-curious aggregator learns
//!   from an update; [`attack_style`]: from a style code.

pub mod aggregate;
pub mod aggregator;
pub mod attack;
pub mod attack_style;
pub mod compress;
pub mod device;
pub mod dp;
pub mod embedded;
pub mod experiment;
pub mod link;
pub mod local;
pub mod outbox;
pub mod participant;
pub mod plot;
pub mod protocol;
pub mod scaleout;
pub mod secagg;
pub mod style;
