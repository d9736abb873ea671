//! The aggregator's typed error, shared by its configuration, its rounds and the scale-out roles.

use std::path::PathBuf;

use crate::wire::protocol;

/// Why the aggregator stopped.
#[derive(Debug, thiserror::Error)]
pub enum AggregatorError {
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("{path}: invalid configuration: {message}")]
    Config { path: PathBuf, message: String },
    #[error(transparent)]
    Link(#[from] crate::wire::link::LinkError),
    #[error(transparent)]
    Protocol(#[from] protocol::ProtocolError),
    #[error("aggregation: {0}")]
    Merge(#[from] crate::federated::server::merge::AggregateError),
    #[error("differential privacy: {0}")]
    Dp(#[from] crate::federated::dp::DpError),
    #[error("round {round} could take ε to {epsilon:.3}, above dp.max_epsilon = {max}")]
    PrivacyBudget { round: u64, epsilon: f64, max: f64 },
}
