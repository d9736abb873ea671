//! Segmentation models: the reference U-Net as ONNX (export, contract check, weight patching) and
//! running it with tract.
//!
//! - [`onnx`]: our own ONNX writer and the contract a U-Net must meet.
//! - [`manifest`]: a model's `manifest.toml` (classes, normalisation, recipe, measured metrics).
//! - [`runtime`]: [`runtime::Segmenter`], a tract plan per input shape.

pub mod manifest;
pub mod onnx;
pub mod runtime;
