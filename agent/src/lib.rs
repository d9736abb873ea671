//! microfed: federated segmentation of material micrographs.
//!
//! Map of the crate, in the order data flows:
//! - [`synth`]: the synthetic microscope: labelled micrographs of known truth in the styles of different
//!   labs (polycrystals, γ/γ′ precipitates).
//! - [`micrograph`]: decoding image files (PNG, TIFF 8/16-bit, JPEG, BMP) into normalised `f32` pixels.
//! - [`mask`], [`classes`]: class-index masks and the class definitions of a dataset or model.
//! - [`dataset`]: a folder of `images/`, `masks/` and `dataset.toml`, validated file by file.
//! - [`metrics`]: IoU, Dice, pixel accuracy and boundary F1 of predicted masks against the truth.
//! - [`features`]: microstructure figures from a mask: grain count and size, ASTM E112 number, phase
//!   fractions and particle statistics.
//! - [`model`]: the reference U-Net as ONNX (our own export, the contract check) and running it with tract.
//! - [`train`]: pretraining the U-Net on dataset folders (checkpoints, resume, export with a manifest).
//! - [`federated`]: update compression, aggregation and the outbox of federated decoder fine-tuning.
//! - [`fleet`]: signed base-model versions pushed to the agents, checked and swapped in, rolled back.
//! - [`demo`]: `microfed demo`, everything above in one process on synthetic labs.
//! - [`console`]: `microfed console`, the operator's live page of the fleet and its rounds.
//! - [`prometheus`]: counters, gauges, histograms and their text exposition; [`web`]: the read-only
//!   listener that serves `/metrics` and the console.
//! - [`cli`]: the `microfed` command line; [`telemetry`]: logs and progress bars.

pub mod augment;
pub mod classes;
pub mod cli;
pub mod console;
pub mod dataset;
pub mod demo;
pub mod features;
pub mod federated;
pub mod fleet;
pub mod fsio;
pub mod mask;
pub mod metrics;
pub mod micrograph;
pub mod model;
pub mod node;
pub mod pipeline;
pub mod prometheus;
pub mod study;
pub mod synth;
pub mod telemetry;
pub mod train;
pub mod web;
pub mod wire;
