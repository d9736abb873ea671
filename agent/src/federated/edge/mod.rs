//! The lab's side of federated rounds.
//!
//! Map:
//! - [`participant`]: takes part in rounds: the I/O loop around [`round`] (the pure round state
//!   machine: messages and ticks in, actions out) and the [`trainer`] thread; sends updates, installs
//!   each new global decoder.
//! - [`cache`]: the encoder features of the lab's labelled images, computed once per base model.
//! - [`local`]: local decoder fine-tuning with the kernels crate on cached encoder features.
//! - [`outbox`]: store-and-forward of updates that could not be sent yet.
//! - [`persisted`]: the participant's small state files, kept in memory and retried when a save
//!   fails (a full disk).
//! - [`secure`]: the device's part in secure rounds (`[federation.secure_aggregation]`): start and
//!   update in, signed round keys and masked update out (a pure state machine).
//! - [`style`]: style codes (feature statistics, Fourier amplitudes) shared between labs, and
//!   re-styling local training with them.

pub mod cache;
pub mod local;
pub mod outbox;
pub mod participant;
pub mod persisted;
pub mod round;
pub mod secure;
pub mod style;
pub mod trainer;
