//! The one trait every device implements: the ops the reference U-Net needs, forward and backward.
//!
//! Map of this module:
//! - [`Shape`]: an NCHW activation shape.
//! - [`Precision`]: strict fp32 or TF32 tensor-core arithmetic for the convolutions.
//! - [`Backend`]: buffers (upload, download) and ops. The network in [`crate::unet`] is written once
//!   against it; [`crate::cpu::CpuBackend`] is the oracle and [`crate::cuda::CudaBackend`] must agree with
//!   it on fresh random inputs (the same test bodies run on both).
//!
//! Conventions shared by every implementation:
//! - Activations are dense NCHW `f32`; weights are `[c_out, c_in, k, k]` (ONNX and PyTorch order), biases
//!   `[c_out]`.
//! - Ops that produce an output *overwrite* it completely (never accumulate), unless the name says `acc`.
//!   Tests poison outputs before each call so that an unwritten element shows.
//! - Labels are one `u8` class index per pixel, `[n, h, w]`; the value [`IGNORE_LABEL`] is skipped by the
//!   losses.
//! - Reductions that the host needs (a loss, channel statistics) come back as host values; everything else
//!   stays on the device.

use crate::KernelError;

/// Pixels with this label take no part in a loss (e.g. unlabelled regions of a micrograph).
pub const IGNORE_LABEL: u8 = 255;

/// The ε of [`Backend::soft_dice_acc`] (numerator and denominator): a class absent from both the
/// labels and the prediction scores a Dice of 1, and the gradient stays finite.
pub const DICE_EPS: f32 = 1.0;

/// Shape of an NCHW activation tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Shape {
    pub n: usize,
    pub c: usize,
    pub h: usize,
    pub w: usize,
}

impl Shape {
    pub const fn new(n: usize, c: usize, h: usize, w: usize) -> Self {
        Self { n, c, h, w }
    }
    /// Number of elements.
    pub const fn len(&self) -> usize {
        self.n * self.c * self.h * self.w
    }
    pub const fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The same shape with another channel count.
    pub const fn with_c(&self, c: usize) -> Self {
        Self { c, ..*self }
    }
    /// Pixels per image plane.
    pub const fn plane(&self) -> usize {
        self.h * self.w
    }
}

impl std::fmt::Display for Shape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "[{}, {}, {}, {}]", self.n, self.c, self.h, self.w)
    }
}

/// Arithmetic used by the convolutions. Everything else is always fp32.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// IEEE fp32 multiply-add: the reference.
    #[default]
    Fp32,
    /// Operands rounded to TF32 (10-bit mantissa) on tensor cores, fp32 accumulation. On the CPU this
    /// is the same as `Fp32`.
    Tf32,
}

/// A convolution's geometry: square kernel `k` (1 or 3), stride 1, padding `k / 2` ("same").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conv {
    pub c_in: usize,
    pub c_out: usize,
    pub k: usize,
}

impl Conv {
    pub const fn new(c_in: usize, c_out: usize, k: usize) -> Self {
        Self { c_in, c_out, k }
    }
    pub const fn weight_len(&self) -> usize {
        self.c_out * self.c_in * self.k * self.k
    }
    /// The geometry every backend supports: a 1×1 or 3×3 kernel over an input with `c_in` channels.
    pub(crate) fn check(&self, op: &'static str, xs: Shape) -> Result<(), KernelError> {
        if self.k != 1 && self.k != 3 {
            return Err(KernelError::shape(
                op,
                format!("kernel size {} is not supported (1 or 3)", self.k),
            ));
        }
        if xs.c != self.c_in {
            return Err(KernelError::shape(
                op,
                format!(
                    "input {xs} has {} channels, the convolution expects {}",
                    xs.c, self.c_in
                ),
            ));
        }
        Ok(())
    }

    /// Geometry and buffer lengths of [`Backend::conv2d_forward`] (lengths in elements).
    pub(crate) fn check_forward(
        &self,
        xs: Shape,
        x: usize,
        w: usize,
        b: usize,
        y: usize,
    ) -> Result<(), KernelError> {
        const OP: &str = "conv2d_forward";
        self.check(OP, xs)?;
        expect_len(OP, "x", x, xs.len())?;
        expect_len(OP, "w", w, self.weight_len())?;
        expect_len(OP, "b", b, self.c_out)?;
        expect_len(OP, "y", y, xs.with_c(self.c_out).len())
    }

    /// Geometry and buffer lengths of [`Backend::conv2d_backward_data`].
    pub(crate) fn check_backward_data(
        &self,
        xs: Shape,
        dy: usize,
        w: usize,
        dx: usize,
    ) -> Result<(), KernelError> {
        const OP: &str = "conv2d_backward_data";
        self.check(OP, xs)?;
        expect_len(OP, "dy", dy, xs.with_c(self.c_out).len())?;
        expect_len(OP, "w", w, self.weight_len())?;
        expect_len(OP, "dx", dx, xs.len())
    }

    /// Geometry and buffer lengths of [`Backend::conv2d_backward_weight`].
    pub(crate) fn check_backward_weight(
        &self,
        xs: Shape,
        x: usize,
        dy: usize,
        dw: usize,
        db: usize,
    ) -> Result<(), KernelError> {
        const OP: &str = "conv2d_backward_weight";
        self.check(OP, xs)?;
        expect_len(OP, "x", x, xs.len())?;
        expect_len(OP, "dy", dy, xs.with_c(self.c_out).len())?;
        expect_len(OP, "dw", dw, self.weight_len())?;
        expect_len(OP, "db", db, self.c_out)
    }

    /// Multiply-adds times two for one forward pass over `x`.
    pub const fn forward_flops(&self, x: Shape) -> u64 {
        2 * (self.weight_len() * x.n * x.h * x.w) as u64
    }
}

/// Fails with a [`KernelError::Shape`] naming `op` and `operand` unless `len == want`: every backend
/// checks each buffer with it before touching memory.
pub(crate) fn expect_len(
    op: &'static str,
    operand: &str,
    len: usize,
    want: usize,
) -> Result<(), KernelError> {
    if len == want {
        Ok(())
    } else {
        Err(KernelError::shape(
            op,
            format!("{operand} has {len} elements, expected {want}"),
        ))
    }
}

/// Hyper-parameters of one optimiser step; `step` counts from 1 (AdamW's bias correction).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum OptimStep {
    /// `v = momentum·v + (g + wd·p)`, `p -= lr·v` (PyTorch's SGD with momentum, dampening 0).
    Sgd {
        lr: f32,
        momentum: f32,
        weight_decay: f32,
    },
    /// Decoupled weight decay (Loshchilov and Hutter): `p -= lr·wd·p`, then Adam with bias correction.
    AdamW {
        lr: f32,
        beta1: f32,
        beta2: f32,
        eps: f32,
        weight_decay: f32,
        step: u32,
    },
}

impl OptimStep {
    /// How many state buffers the step keeps per parameter: SGD one (velocity), AdamW two (moments).
    pub const fn state_buffers(&self) -> usize {
        match self {
            OptimStep::Sgd { .. } => 1,
            OptimStep::AdamW { .. } => 2,
        }
    }

    /// The same hyper-parameters at AdamW step `step` (SGD keeps no step count).
    pub const fn at_step(self, step: u32) -> Self {
        match self {
            OptimStep::AdamW {
                lr,
                beta1,
                beta2,
                eps,
                weight_decay,
                ..
            } => OptimStep::AdamW {
                lr,
                beta1,
                beta2,
                eps,
                weight_decay,
                step,
            },
            sgd => sgd,
        }
    }

    /// The contract of [`Backend::optimizer_step`], checked by every backend before it touches
    /// memory: `grad` and each state buffer have the parameter's length, there are
    /// [`OptimStep::state_buffers`] of them, and AdamW's `step` counts from 1 (its bias correction
    /// `1 − βᵗ` is 0 at `t = 0`, so step 0 is an error, never silently taken as 1).
    pub(crate) fn check(
        &self,
        param: usize,
        grad: usize,
        state: &[usize],
    ) -> Result<(), KernelError> {
        const OP: &str = "optimizer_step";
        if let OptimStep::AdamW { step: 0, .. } = self {
            return Err(KernelError::shape(OP, "AdamW's step counts from 1, got 0"));
        }
        let want = self.state_buffers();
        if state.len() != want {
            return Err(KernelError::shape(
                OP,
                format!("{self:?} needs {want} state buffers, got {}", state.len()),
            ));
        }
        expect_len(OP, "grad", grad, param)?;
        for (i, &s) in state.iter().enumerate() {
            expect_len(OP, &format!("state[{i}]"), s, param)?;
        }
        Ok(())
    }
}

/// One device's buffers and ops. All lengths are in elements; every op checks them and returns
/// [`KernelError::Shape`] rather than reading out of bounds.
pub trait Backend: Send + Sync + 'static {
    /// Device memory holding `f32`s.
    type Buffer: Send + Sync;
    /// Device memory holding per-pixel class labels.
    type Labels: Send + Sync;

    /// Human-readable name, e.g. `cpu (2 threads)` or `cuda: NVIDIA H100 80GB HBM3 (sm_90)`.
    fn name(&self) -> String;

    // ---- memory -------------------------------------------------------------------------------
    fn zeros(&self, len: usize) -> Result<Self::Buffer, KernelError>;
    fn upload(&self, data: &[f32]) -> Result<Self::Buffer, KernelError>;
    fn download(&self, buf: &Self::Buffer) -> Result<Vec<f32>, KernelError>;
    fn upload_labels(&self, labels: &[u8]) -> Result<Self::Labels, KernelError>;
    fn len(&self, buf: &Self::Buffer) -> usize;
    /// Overwrite `dst` with `src` (same length).
    fn copy(&self, src: &Self::Buffer, dst: &mut Self::Buffer) -> Result<(), KernelError>;
    /// Overwrite every element with `value`.
    fn fill(&self, buf: &mut Self::Buffer, value: f32) -> Result<(), KernelError>;
    /// Wait until all queued work has finished (a no-op on the CPU). Timing code calls this.
    fn synchronize(&self) -> Result<(), KernelError>;

    // ---- convolution --------------------------------------------------------------------------
    /// `y = conv(x, w) + b`, then ReLU when `relu` is set. `y` has shape `x.with_c(conv.c_out)`.
    #[allow(clippy::too_many_arguments)]
    fn conv2d_forward(
        &self,
        x: &Self::Buffer,
        xs: Shape,
        conv: Conv,
        w: &Self::Buffer,
        b: &Self::Buffer,
        relu: bool,
        precision: Precision,
        y: &mut Self::Buffer,
    ) -> Result<(), KernelError>;

    /// Gradient with respect to the input: `dx = conv_transpose(dy, w)`. `dy` has shape
    /// `xs.with_c(conv.c_out)`; any ReLU has already been folded into `dy` by [`Backend::relu_backward`].
    #[allow(clippy::too_many_arguments)]
    fn conv2d_backward_data(
        &self,
        dy: &Self::Buffer,
        xs: Shape,
        conv: Conv,
        w: &Self::Buffer,
        precision: Precision,
        dx: &mut Self::Buffer,
    ) -> Result<(), KernelError>;

    /// Gradients with respect to weight and bias, summed over the batch: `dw = Σ dy ⊗ x`, `db = Σ dy`.
    #[allow(clippy::too_many_arguments)]
    fn conv2d_backward_weight(
        &self,
        x: &Self::Buffer,
        xs: Shape,
        conv: Conv,
        dy: &Self::Buffer,
        precision: Precision,
        dw: &mut Self::Buffer,
        db: &mut Self::Buffer,
    ) -> Result<(), KernelError>;

    // ---- elementwise and layout ---------------------------------------------------------------
    /// In place: `dy[i] = 0` wherever `y[i] <= 0` (`y` is the ReLU's output).
    fn relu_backward(&self, y: &Self::Buffer, dy: &mut Self::Buffer) -> Result<(), KernelError>;

    /// 2×2 max-pooling, stride 2; `xs.h` and `xs.w` are even. `y` is `[n, c, h/2, w/2]`.
    fn maxpool2_forward(
        &self,
        x: &Self::Buffer,
        xs: Shape,
        y: &mut Self::Buffer,
    ) -> Result<(), KernelError>;

    /// Routes each `dy` to the first maximum (row-major within the window) of its 2×2 window of `x`;
    /// the rest of `dx` is zero.
    fn maxpool2_backward(
        &self,
        x: &Self::Buffer,
        xs: Shape,
        dy: &Self::Buffer,
        dx: &mut Self::Buffer,
    ) -> Result<(), KernelError>;

    /// Nearest ×2 upsampling of `low` (`[n, c_low, h, w]`) concatenated along channels with `skip`
    /// (`[n, c_skip, 2h, 2w]`): `y = cat([up(low), skip])`, shape `[n, c_low + c_skip, 2h, 2w]`.
    fn upsample2_concat_forward(
        &self,
        low: &Self::Buffer,
        low_shape: Shape,
        skip: &Self::Buffer,
        c_skip: usize,
        y: &mut Self::Buffer,
    ) -> Result<(), KernelError>;

    /// `y = conv(upsample2_concat(low, skip), w) + b`, then ReLU when `relu` is set: the decoder's
    /// first convolution of a stage. By default [`Backend::upsample2_concat_forward`] into `cat`
    /// (shape `[n, low_shape.c + c_skip, 2h, 2w]`), then [`Backend::conv2d_forward`] on it. With
    /// `keep_concat` `cat` holds the concatenation afterwards (training's backward pass reads it);
    /// without, a backend may compute `y` without writing `cat` (the CPU backend does so for the
    /// layers it runs by Winograd, saving a write and a read of the largest tensor of the pass).
    #[allow(clippy::too_many_arguments)]
    fn upsample2_concat_conv2d_forward(
        &self,
        (low, low_shape): (&Self::Buffer, Shape),
        (skip, c_skip): (&Self::Buffer, usize),
        cat: &mut Self::Buffer,
        keep_concat: bool,
        (conv, w, b): (Conv, &Self::Buffer, &Self::Buffer),
        relu: bool,
        precision: Precision,
        y: &mut Self::Buffer,
    ) -> Result<(), KernelError> {
        let _ = keep_concat;
        self.upsample2_concat_forward(low, low_shape, skip, c_skip, cat)?;
        let cs = Shape::new(
            low_shape.n,
            low_shape.c + c_skip,
            2 * low_shape.h,
            2 * low_shape.w,
        );
        self.conv2d_forward(cat, cs, conv, w, b, relu, precision, y)
    }

    /// Backward of [`Backend::upsample2_concat_forward`]: `dlow` sums each 2×2 block of the first
    /// `c_low` channels of `dy`; `dskip`, when asked for, is the rest (the channel split).
    fn upsample2_concat_backward(
        &self,
        dy: &Self::Buffer,
        low_shape: Shape,
        c_skip: usize,
        dlow: &mut Self::Buffer,
        dskip: Option<&mut Self::Buffer>,
    ) -> Result<(), KernelError>;

    /// Per-channel affine map `y = x·scale[c] + shift[c]`, used to re-style features with another
    /// lab's statistics: `scale = σ_other/σ_own`, `shift = μ_other − μ_own·scale` (see
    /// [`crate::style::restyle_coefficients`]).
    fn channel_affine(
        &self,
        x: &Self::Buffer,
        xs: Shape,
        scale: &[f32],
        shift: &[f32],
        y: &mut Self::Buffer,
    ) -> Result<(), KernelError>;

    /// Per-channel mean and (population) standard deviation over n, h and w.
    fn channel_stats(
        &self,
        x: &Self::Buffer,
        xs: Shape,
    ) -> Result<(Vec<f32>, Vec<f32>), KernelError>;

    /// `y += alpha·x` (gradient accumulation, FedProx's proximal term, update deltas).
    fn axpy(&self, alpha: f32, x: &Self::Buffer, y: &mut Self::Buffer) -> Result<(), KernelError>;

    // ---- losses -------------------------------------------------------------------------------
    /// Softmax cross-entropy over the class axis of `logits` (`[n, k, h, w]`), mean over labelled
    /// pixels, each pixel weighted by `class_weights[label]` when given (PyTorch's `weight=`
    /// semantics: the mean divides by the sum of the weights). Writes `dlogits` (overwrites) and returns
    /// the loss.
    fn softmax_cross_entropy(
        &self,
        logits: &Self::Buffer,
        ls: Shape,
        labels: &Self::Labels,
        class_weights: Option<&[f32]>,
        dlogits: &mut Self::Buffer,
    ) -> Result<f32, KernelError>;

    /// Soft Dice loss on softmax probabilities, `1 − mean_k (2·Σ p·t + ε) / (Σ p + Σ t + ε)` over the
    /// batch (sums over every labelled pixel of every image; `ε` is [`DICE_EPS`]), ignoring [`IGNORE_LABEL`] pixels. *Adds* `weight ×` its gradient to `dlogits` and returns
    /// the loss (unweighted).
    fn soft_dice_acc(
        &self,
        logits: &Self::Buffer,
        ls: Shape,
        labels: &Self::Labels,
        weight: f32,
        dlogits: &mut Self::Buffer,
    ) -> Result<f32, KernelError>;

    // ---- optimisers ---------------------------------------------------------------------------
    /// One optimiser step on a parameter. `state` holds the optimiser's per-parameter buffers: one
    /// (velocity) for SGD, two (first and second moments) for AdamW, each of the parameter's length.
    /// AdamW's `step` counts from 1; step 0 is a [`KernelError::Shape`] on every backend.
    fn optimizer_step(
        &self,
        step: OptimStep,
        param: &mut Self::Buffer,
        grad: &Self::Buffer,
        state: &mut [Self::Buffer],
    ) -> Result<(), KernelError>;
}
