//! Segmentation models: the reference U-Net as ONNX (export, contract check, weight patching) and
//! running it with tract.
//!
//! - [`onnx`]: our own ONNX writer and the contract a U-Net must meet.
//! - [`runtime`]: [`runtime::Segmenter`], a tract plan per input shape.

pub mod onnx;
pub mod runtime;
