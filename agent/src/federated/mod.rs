//! Federated fine-tuning of the decoder: the pure pieces the round logic calls.
//!
//! Map:
//! - [`compress`]: an update (local − global decoder, flat `f32`) to compact self-describing bytes and
//!   back: top-k, int8/int4, zstd, and error feedback so that nothing dropped is lost for good.
//! - [`aggregate`]: merging the labs' updates (FedAvg, trimmed mean, median, with norm clipping),
//!   partial sums that several aggregator processes can combine, and the server optimiser (FedAvgM,
//!   FedAdam) that applies the merged update to the global decoder.
//! - [`outbox`]: store-and-forward on disk for updates that could not be sent yet (broker down, link
//!   lost), bounded, surviving restarts.

pub mod aggregate;
pub mod compress;
pub mod outbox;
