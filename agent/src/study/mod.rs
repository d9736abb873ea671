//! Studies of the federation that neither the agent nor the aggregator runs: the same code, in one
//! process, to compare strategies and to measure what an adversary learns.
//!
//! Map:
//! - [`experiment`]: local training, compression and aggregation of several labs in one process;
//!   [`plot`]: its learning curves as PNG.
//! - [`attack`]: what an honest-but-curious aggregator learns from a decoder update;
//!   [`attack_style`]: from a style code.
//!
//! Secure aggregation, which the agent and the aggregator run, is [`crate::federated::secagg`].

pub mod attack;
pub mod attack_style;
pub mod experiment;
pub mod plot;
