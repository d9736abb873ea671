//! The lab's side of federated rounds.
//!
//! Map:
//! - [`participant`]: takes part in rounds: waits for an announcement, trains, sends the update,
//!   installs each new global decoder.
//! - [`cache`]: the encoder features of the lab's labelled images, computed once per base model.
//! - [`local`]: local decoder fine-tuning with the kernels crate on cached encoder features.
//! - [`outbox`]: store-and-forward of updates that could not be sent yet.
//! - [`style`]: style codes (feature statistics, Fourier amplitudes) shared between labs, and
//!   re-styling local training with them.

pub mod cache;
pub mod local;
pub mod outbox;
pub mod participant;
pub mod style;
