//! The CPU backend: the reference every other backend is checked against, and the training path on
//! machines without a GPU.
//!
//! Map of this module:
//! - [`CpuBackend`]: buffers are `Vec<f32>`, labels `Vec<u8>`; every op validates its operands and
//!   then calls one of the submodules.
//! - `gemm`: a bounds-checked front to the `gemm` crate and per-thread scratch memory.
//! - `conv`: im2col (3×3) + GEMM convolutions in cache-sized row bands, forward and both backward
//!   passes.
//! - `winograd`: the forward pass of the wide 3×3 layers by Winograd's F(4×4, 3×3) (4× fewer
//!   flops in the GEMMs; F(2×2, 3×3), 2.25×, on request).
//! - `ops`: ReLU backward, max-pooling, upsample + concat, channel affine/statistics, axpy.
//! - `loss`: softmax cross-entropy and soft Dice.
//! - `optim`: SGD with momentum and AdamW.
//!
//! All parallelism goes through rayon's global pool. [`Precision::Tf32`] computes exactly like
//! [`Precision::Fp32`]: CPUs have no TF32 units, and the reference should stay exact.

mod conv;
mod gemm;
mod loss;
mod ops;
mod optim;
mod winograd;

use crate::backend::expect_len;
use crate::{Backend, Conv, IGNORE_LABEL, KernelError, OptimStep, Precision, Shape};

/// Tensor ops on the host's cores (rayon's global pool).
#[derive(Debug, Clone)]
pub struct CpuBackend {
    threads: usize,
}

impl Default for CpuBackend {
    fn default() -> Self {
        Self::new()
    }
}

impl CpuBackend {
    /// A backend on rayon's global thread pool (all cores unless `RAYON_NUM_THREADS` says otherwise).
    pub fn new() -> Self {
        Self {
            threads: rayon::current_num_threads().max(1),
        }
    }

    /// Worker threads the ops spread over.
    pub fn threads(&self) -> usize {
        self.threads
    }

    fn plan(&self, n: usize) -> conv::Plan {
        conv::Plan::new(n, self.threads)
    }
}

fn check_labels(op: &'static str, labels: &[u8], ls: Shape) -> Result<(), KernelError> {
    expect_len(op, "labels", labels.len(), ls.n * ls.h * ls.w)?;
    if let Some(&bad) = labels
        .iter()
        .find(|&&l| l != IGNORE_LABEL && l as usize >= ls.c)
    {
        return Err(KernelError::shape(
            op,
            format!(
                "label {bad} is outside the {} classes of logits {ls} (and not the ignore label {IGNORE_LABEL})",
                ls.c
            ),
        ));
    }
    Ok(())
}

fn check_even(op: &'static str, s: Shape) -> Result<(), KernelError> {
    if !s.h.is_multiple_of(2) || !s.w.is_multiple_of(2) {
        return Err(KernelError::shape(
            op,
            format!("input {s} needs an even height and width"),
        ));
    }
    Ok(())
}

impl Backend for CpuBackend {
    type Buffer = Vec<f32>;
    type Labels = Vec<u8>;

    fn name(&self) -> String {
        format!("cpu ({} threads)", self.threads)
    }

    fn zeros(&self, len: usize) -> Result<Vec<f32>, KernelError> {
        Ok(vec![0.0; len])
    }
    fn upload(&self, data: &[f32]) -> Result<Vec<f32>, KernelError> {
        Ok(data.to_vec())
    }
    fn download(&self, buf: &Vec<f32>) -> Result<Vec<f32>, KernelError> {
        Ok(buf.clone())
    }
    fn upload_labels(&self, labels: &[u8]) -> Result<Vec<u8>, KernelError> {
        Ok(labels.to_vec())
    }
    fn len(&self, buf: &Vec<f32>) -> usize {
        buf.len()
    }
    fn copy(&self, src: &Vec<f32>, dst: &mut Vec<f32>) -> Result<(), KernelError> {
        expect_len("copy", "dst", dst.len(), src.len())?;
        dst.copy_from_slice(src);
        Ok(())
    }
    fn fill(&self, buf: &mut Vec<f32>, value: f32) -> Result<(), KernelError> {
        buf.fill(value);
        Ok(())
    }
    fn synchronize(&self) -> Result<(), KernelError> {
        Ok(())
    }

    fn conv2d_forward(
        &self,
        x: &Vec<f32>,
        xs: Shape,
        conv: Conv,
        w: &Vec<f32>,
        b: &Vec<f32>,
        relu: bool,
        _precision: Precision,
        y: &mut Vec<f32>,
    ) -> Result<(), KernelError> {
        conv.check_forward(xs, x.len(), w.len(), b.len(), y.len())?;
        if y.is_empty() {
            return Ok(());
        }
        if xs.plane() == 0 || conv.c_in == 0 {
            // No input terms: the output is the bias.
            ops::for_chunks(y, xs.plane().max(1), |p, out| {
                let v = b[p % conv.c_out];
                out.fill(if relu { v.max(0.0) } else { v });
            });
            return Ok(());
        }
        conv::forward(x, xs, conv, w, Some(b), relu, y, self.plan(xs.n));
        Ok(())
    }

    fn conv2d_backward_data(
        &self,
        dy: &Vec<f32>,
        xs: Shape,
        conv: Conv,
        w: &Vec<f32>,
        _precision: Precision,
        dx: &mut Vec<f32>,
    ) -> Result<(), KernelError> {
        conv.check_backward_data(xs, dy.len(), w.len(), dx.len())?;
        if dx.is_empty() {
            return Ok(());
        }
        conv::backward_data(dy, xs, conv, w, dx, self.plan(xs.n));
        Ok(())
    }

    fn conv2d_backward_weight(
        &self,
        x: &Vec<f32>,
        xs: Shape,
        conv: Conv,
        dy: &Vec<f32>,
        _precision: Precision,
        dw: &mut Vec<f32>,
        db: &mut Vec<f32>,
    ) -> Result<(), KernelError> {
        conv.check_backward_weight(xs, x.len(), dy.len(), dw.len(), db.len())?;
        if xs.plane() == 0 || xs.n == 0 {
            dw.fill(0.0);
            db.fill(0.0);
            return Ok(());
        }
        conv::backward_weight(x, xs, conv, dy, dw, db, self.plan(xs.n), self.threads);
        Ok(())
    }

    fn relu_backward(&self, y: &Vec<f32>, dy: &mut Vec<f32>) -> Result<(), KernelError> {
        expect_len("relu_backward", "dy", dy.len(), y.len())?;
        ops::relu_backward(y, dy);
        Ok(())
    }

    fn maxpool2_forward(
        &self,
        x: &Vec<f32>,
        xs: Shape,
        y: &mut Vec<f32>,
    ) -> Result<(), KernelError> {
        const OP: &str = "maxpool2_forward";
        check_even(OP, xs)?;
        expect_len(OP, "x", x.len(), xs.len())?;
        expect_len(OP, "y", y.len(), xs.len() / 4)?;
        ops::maxpool2_forward(x, xs, y);
        Ok(())
    }

    fn maxpool2_backward(
        &self,
        x: &Vec<f32>,
        xs: Shape,
        dy: &Vec<f32>,
        dx: &mut Vec<f32>,
    ) -> Result<(), KernelError> {
        const OP: &str = "maxpool2_backward";
        check_even(OP, xs)?;
        expect_len(OP, "x", x.len(), xs.len())?;
        expect_len(OP, "dy", dy.len(), xs.len() / 4)?;
        expect_len(OP, "dx", dx.len(), xs.len())?;
        ops::maxpool2_backward(x, xs, dy, dx);
        Ok(())
    }

    fn upsample2_concat_forward(
        &self,
        low: &Vec<f32>,
        low_shape: Shape,
        skip: &Vec<f32>,
        c_skip: usize,
        y: &mut Vec<f32>,
    ) -> Result<(), KernelError> {
        const OP: &str = "upsample2_concat_forward";
        let up = Shape::new(low_shape.n, c_skip, 2 * low_shape.h, 2 * low_shape.w);
        expect_len(OP, "low", low.len(), low_shape.len())?;
        expect_len(OP, "skip", skip.len(), up.len())?;
        expect_len(OP, "y", y.len(), up.with_c(low_shape.c + c_skip).len())?;
        ops::upsample2_concat_forward(low, low_shape, skip, c_skip, y);
        Ok(())
    }

    fn upsample2_concat_conv2d_forward(
        &self,
        (low, low_shape): (&Vec<f32>, Shape),
        (skip, c_skip): (&Vec<f32>, usize),
        cat: &mut Vec<f32>,
        keep_concat: bool,
        (conv, w, b): (Conv, &Vec<f32>, &Vec<f32>),
        relu: bool,
        precision: Precision,
        y: &mut Vec<f32>,
    ) -> Result<(), KernelError> {
        const OP: &str = "upsample2_concat_conv2d_forward";
        let cs = Shape::new(
            low_shape.n,
            low_shape.c + c_skip,
            2 * low_shape.h,
            2 * low_shape.w,
        );
        if keep_concat || cs.plane() == 0 || !winograd::applies(cs, conv) {
            self.upsample2_concat_forward(low, low_shape, skip, c_skip, cat)?;
            return self.conv2d_forward(cat, cs, conv, w, b, relu, precision, y);
        }
        expect_len(OP, "low", low.len(), low_shape.len())?;
        expect_len(OP, "skip", skip.len(), cs.with_c(c_skip).len())?;
        conv.check_forward(cs, cs.len(), w.len(), b.len(), y.len())?;
        let x = winograd::Input::Up2Concat {
            low,
            c_low: low_shape.c,
            skip,
        };
        winograd::forward(x, cs, conv, w, Some(b), relu, y, self.plan(cs.n));
        Ok(())
    }

    fn upsample2_concat_backward(
        &self,
        dy: &Vec<f32>,
        low_shape: Shape,
        c_skip: usize,
        dlow: &mut Vec<f32>,
        dskip: Option<&mut Vec<f32>>,
    ) -> Result<(), KernelError> {
        const OP: &str = "upsample2_concat_backward";
        let up = Shape::new(low_shape.n, c_skip, 2 * low_shape.h, 2 * low_shape.w);
        expect_len(OP, "dy", dy.len(), up.with_c(low_shape.c + c_skip).len())?;
        expect_len(OP, "dlow", dlow.len(), low_shape.len())?;
        if let Some(ds) = &dskip {
            expect_len(OP, "dskip", ds.len(), up.len())?;
        }
        ops::upsample2_concat_backward(dy, low_shape, c_skip, dlow, dskip.map(|d| &mut d[..]));
        Ok(())
    }

    fn channel_affine(
        &self,
        x: &Vec<f32>,
        xs: Shape,
        scale: &[f32],
        shift: &[f32],
        y: &mut Vec<f32>,
    ) -> Result<(), KernelError> {
        const OP: &str = "channel_affine";
        expect_len(OP, "x", x.len(), xs.len())?;
        expect_len(OP, "scale", scale.len(), xs.c)?;
        expect_len(OP, "shift", shift.len(), xs.c)?;
        expect_len(OP, "y", y.len(), xs.len())?;
        ops::channel_affine(x, xs, scale, shift, y);
        Ok(())
    }

    fn channel_stats(&self, x: &Vec<f32>, xs: Shape) -> Result<(Vec<f32>, Vec<f32>), KernelError> {
        expect_len("channel_stats", "x", x.len(), xs.len())?;
        Ok(ops::channel_stats(x, xs))
    }

    fn axpy(&self, alpha: f32, x: &Vec<f32>, y: &mut Vec<f32>) -> Result<(), KernelError> {
        expect_len("axpy", "y", y.len(), x.len())?;
        ops::axpy(alpha, x, y);
        Ok(())
    }

    fn softmax_cross_entropy(
        &self,
        logits: &Vec<f32>,
        ls: Shape,
        labels: &Vec<u8>,
        class_weights: Option<&[f32]>,
        dlogits: &mut Vec<f32>,
    ) -> Result<f32, KernelError> {
        const OP: &str = "softmax_cross_entropy";
        expect_len(OP, "logits", logits.len(), ls.len())?;
        expect_len(OP, "dlogits", dlogits.len(), ls.len())?;
        check_labels(OP, labels, ls)?;
        if let Some(cw) = class_weights {
            expect_len(OP, "class_weights", cw.len(), ls.c)?;
        }
        Ok(loss::softmax_cross_entropy(
            logits,
            ls,
            labels,
            class_weights,
            dlogits,
        ))
    }

    fn soft_dice_acc(
        &self,
        logits: &Vec<f32>,
        ls: Shape,
        labels: &Vec<u8>,
        weight: f32,
        dlogits: &mut Vec<f32>,
    ) -> Result<f32, KernelError> {
        const OP: &str = "soft_dice_acc";
        expect_len(OP, "logits", logits.len(), ls.len())?;
        expect_len(OP, "dlogits", dlogits.len(), ls.len())?;
        check_labels(OP, labels, ls)?;
        Ok(loss::soft_dice_acc(logits, ls, labels, weight, dlogits))
    }

    fn optimizer_step(
        &self,
        step: OptimStep,
        param: &mut Vec<f32>,
        grad: &Vec<f32>,
        state: &mut [Vec<f32>],
    ) -> Result<(), KernelError> {
        let lens: Vec<usize> = state.iter().map(Vec::len).collect();
        step.check(param.len(), grad.len(), &lens)?;
        let mut views: Vec<&mut [f32]> = state.iter_mut().map(|s| &mut s[..]).collect();
        optim::step(step, param, grad, &mut views);
        Ok(())
    }
}
