//! Federated decoder fine-tuning over MQTT (docs/protocol.md, docs/architecture.md).
//!
//! Map, by side:
//! - [`compress`]: update compression (top-k with error feedback, int8/int4, zstd), shared by both
//!   sides; [`dp`]: clipping, Gaussian noise and the RDP accountant; [`schedule`]: the local
//!   learning rate across rounds; [`secagg`]: secure aggregation's two state machines (Bonawitz et
//!   al.: pairwise masks, Shamir dropout recovery, round keys signed by the devices' enrolled keys).
//! - [`edge`]: the lab's side: the round participant, local decoder training on cached encoder
//!   features, the outbox, style codes.
//! - [`server`]: the aggregator's side: round logic and crash-safe state, merge rules, scale-out.
//!
//! The messages themselves and the MQTT connection are in [`crate::wire`]; in-process studies of the
//! same code (experiment, attacks) in [`crate::study`].

pub mod compress;
pub mod dp;
pub mod edge;
pub mod schedule;
pub mod secagg;
pub mod server;
