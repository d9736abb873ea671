//! The aggregator's side of federated rounds.
//!
//! Map:
//! - [`config`]: `aggregator.toml`; [`error`]: the aggregator's typed error.
//! - [`aggregator`]: rounds (announce, collect, check, merge, publish) with crash-safe state.
//! - [`merge`]: merge rules (streaming FedAvg, trimmed mean, median, clipping, server momentum).
//! - [`secure`]: a secure-aggregation round (`[secure_aggregation]`): the protocol's server with
//!   the round's deadlines, a pure state machine.
//! - [`scaleout`]: several aggregator processes, a coordinator and workers exchanging partial sums.

pub mod aggregator;
pub mod config;
pub mod error;
pub mod merge;
pub mod scaleout;
pub mod secure;
