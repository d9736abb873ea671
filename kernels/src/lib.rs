//! Tensor ops for training microfed's U-Net, on the CPU or on an NVIDIA GPU.
//!
//! Map of the crate:
//! - [`backend`]: the [`Backend`] trait (buffers and the ops the network needs) and its conventions.
//! - [`cpu`]: the reference backend: im2col + a well-kept GEMM crate (and Winograd F(4×4, 3×3) for the
//!   forward pass of the wide 3×3 layers), both cores through rayon. It is the oracle every other
//!   backend is checked against.
//! - [`cuda`]: hand-written `.cu` kernels (in `kernels/cuda/`), compiled at run time by NVRTC for the
//!   device's architecture and launched through cudarc. Builds on machines without any CUDA toolkit.
//! - [`device`]: [`Device::auto`] picks CUDA when a usable GPU is present and says why when it is not.
//! - [`unet`]: the reference U-Net (forward, backward, decoder-only mode), written once against the trait.
//! - [`style`]: helpers for style codes (per-channel statistics and re-styling coefficients).
//!
//! The tests live outside the library, in one suite (`tests/suite/`) whose bodies are generic over
//! [`Backend`] and run on the CPU and on CUDA.

pub mod backend;
pub mod cpu;
pub mod cuda;
pub mod device;
pub mod style;
pub mod unet;

pub use backend::{Backend, Conv, DICE_EPS, IGNORE_LABEL, OptimStep, Precision, Shape};

/// Everything that can go wrong in this crate. Nothing here panics on bad input.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// A length or shape that does not fit the op: names the op and the operand.
    #[error("{op}: {what}")]
    Shape { op: &'static str, what: String },
    /// No usable CUDA device: the driver library is missing, no device is visible, or it failed to start.
    #[error("CUDA is not available: {0}")]
    CudaUnavailable(String),
    /// A call into the CUDA driver failed.
    #[error("CUDA driver error in {context}: {message}")]
    Cuda { context: String, message: String },
    /// NVRTC rejected a kernel source; the log says where.
    #[error("NVRTC could not compile {source_name} for {arch}: {log}")]
    Compile {
        source_name: String,
        arch: String,
        log: String,
    },
    /// A parameter set that does not match the network (e.g. loading weights of another layout).
    #[error("parameters: {0}")]
    Params(String),
}

impl KernelError {
    pub(crate) fn shape(op: &'static str, what: impl Into<String>) -> Self {
        Self::Shape {
            op,
            what: what.into(),
        }
    }
}
