//! Launches of the non-convolution kernels (`kernels/cuda/ops.cu`): shape checks, grid sizes, and the
//! host side of the reductions (losses and statistics come back as host values).
//!
//! Reductions are two-level and deterministic: a fixed number of blocks (a function of the shape
//! only) each write one partial sum, and `reduce_rows` adds the partials in a fixed order, or the host
//! adds them in f64 (channel statistics). The same inputs give bit-identical results on every run.

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};

use super::{CudaBackend, THREADS, as_i32, driver_err, expect_len};
use crate::KernelError;
use crate::backend::{Backend, IGNORE_LABEL, OptimStep, Shape};

/// Every `extern "C"` kernel of ops.cu.
pub(crate) const KERNELS: &[&str] = &[
    "fill_f32",
    "axpy_f32",
    "relu_backward_f32",
    "maxpool2_fwd",
    "maxpool2_bwd",
    "upcat_fwd",
    "upcat_bwd_low",
    "upcat_bwd_skip",
    "channel_affine",
    "channel_partial_sums",
    "reduce_rows",
    "splitk_reduce",
    "ce_partial",
    "ce_grad",
    "dice_partial",
    "dice_grad",
    "sgd_step",
    "adamw_step",
];

/// Number of partial sums for a reduction over `len` elements: about 16 per thread, at most 1024.
fn reduction_blocks(len: usize) -> usize {
    len.div_ceil(THREADS as usize * 16).clamp(1, 1024)
}

impl CudaBackend {
    pub(crate) fn launch_fill(
        &self,
        buf: &mut CudaSlice<f32>,
        value: f32,
    ) -> Result<(), KernelError> {
        let n = as_i32("fill", "length", buf.len())?;
        if n == 0 {
            return Ok(());
        }
        let cfg = self.grid_1d(buf.len());
        let mut l = self.stream.launch_builder(self.func("fill_f32")?);
        l.arg(&mut *buf).arg(&n).arg(&value);
        // SAFETY: fill_f32(float* y, int n, float v); writes y[i] for i < n = buf.len().
        unsafe { l.launch(cfg) }.map_err(driver_err("launch fill_f32"))?;
        Ok(())
    }

    pub(crate) fn launch_axpy(
        &self,
        alpha: f32,
        x: &CudaSlice<f32>,
        y: &mut CudaSlice<f32>,
    ) -> Result<(), KernelError> {
        expect_len("axpy", "y", y.len(), x.len())?;
        let n = as_i32("axpy", "length", x.len())?;
        if n == 0 {
            return Ok(());
        }
        let cfg = self.grid_1d(x.len());
        let mut l = self.stream.launch_builder(self.func("axpy_f32")?);
        l.arg(x).arg(&mut *y).arg(&n).arg(&alpha);
        // SAFETY: axpy_f32(const float* x, float* y, int n, float a); touches i < n, and both
        // buffers have n elements (checked).
        unsafe { l.launch(cfg) }.map_err(driver_err("launch axpy_f32"))?;
        Ok(())
    }

    pub(crate) fn launch_relu_backward(
        &self,
        y: &CudaSlice<f32>,
        dy: &mut CudaSlice<f32>,
    ) -> Result<(), KernelError> {
        expect_len("relu_backward", "dy", dy.len(), y.len())?;
        let n = as_i32("relu_backward", "length", y.len())?;
        if n == 0 {
            return Ok(());
        }
        let cfg = self.grid_1d(y.len());
        let mut l = self.stream.launch_builder(self.func("relu_backward_f32")?);
        l.arg(y).arg(&mut *dy).arg(&n);
        // SAFETY: relu_backward_f32(const float* y, float* dy, int n); i < n for both (checked).
        unsafe { l.launch(cfg) }.map_err(driver_err("launch relu_backward_f32"))?;
        Ok(())
    }

    fn pool_check(op: &'static str, xs: Shape) -> Result<(), KernelError> {
        if !xs.h.is_multiple_of(2) || !xs.w.is_multiple_of(2) {
            return Err(KernelError::shape(
                op,
                format!("input {xs} must have even height and width"),
            ));
        }
        as_i32(op, "input length", xs.len())?;
        Ok(())
    }

    pub(crate) fn launch_maxpool_forward(
        &self,
        x: &CudaSlice<f32>,
        xs: Shape,
        y: &mut CudaSlice<f32>,
    ) -> Result<(), KernelError> {
        const OP: &str = "maxpool2_forward";
        Self::pool_check(OP, xs)?;
        expect_len(OP, "x", x.len(), xs.len())?;
        let out = Shape::new(xs.n, xs.c, xs.h / 2, xs.w / 2);
        expect_len(OP, "y", y.len(), out.len())?;
        if out.is_empty() {
            return Ok(());
        }
        let (planes, h, w) = ((xs.n * xs.c) as i32, xs.h as i32, xs.w as i32);
        let cfg = self.grid_1d(out.len());
        let mut l = self.stream.launch_builder(self.func("maxpool2_fwd")?);
        l.arg(x).arg(&mut *y).arg(&planes).arg(&h).arg(&w);
        // SAFETY: maxpool2_fwd(const float* x, float* y, int planes, int h, int w); reads
        // x[planes·h·w] (= x's checked length; h, w even), writes y[planes·(h/2)·(w/2)] (checked).
        unsafe { l.launch(cfg) }.map_err(driver_err("launch maxpool2_fwd"))?;
        Ok(())
    }

    pub(crate) fn launch_maxpool_backward(
        &self,
        x: &CudaSlice<f32>,
        xs: Shape,
        dy: &CudaSlice<f32>,
        dx: &mut CudaSlice<f32>,
    ) -> Result<(), KernelError> {
        const OP: &str = "maxpool2_backward";
        Self::pool_check(OP, xs)?;
        expect_len(OP, "x", x.len(), xs.len())?;
        expect_len(OP, "dx", dx.len(), xs.len())?;
        let out = Shape::new(xs.n, xs.c, xs.h / 2, xs.w / 2);
        expect_len(OP, "dy", dy.len(), out.len())?;
        if xs.is_empty() {
            return Ok(());
        }
        let (planes, h, w) = ((xs.n * xs.c) as i32, xs.h as i32, xs.w as i32);
        let cfg = self.grid_1d(out.len());
        let mut l = self.stream.launch_builder(self.func("maxpool2_bwd")?);
        l.arg(x).arg(dy).arg(&mut *dx).arg(&planes).arg(&h).arg(&w);
        // SAFETY: maxpool2_bwd(const float* x, const float* dy, float* dx, int planes, int h, int w);
        // each window writes its four dx elements, so dx (planes·h·w, checked) is fully written.
        unsafe { l.launch(cfg) }.map_err(driver_err("launch maxpool2_bwd"))?;
        Ok(())
    }

    pub(crate) fn launch_upcat_forward(
        &self,
        low: &CudaSlice<f32>,
        ls: Shape,
        skip: &CudaSlice<f32>,
        c_skip: usize,
        y: &mut CudaSlice<f32>,
    ) -> Result<(), KernelError> {
        const OP: &str = "upsample2_concat_forward";
        let skip_shape = Shape::new(ls.n, c_skip, 2 * ls.h, 2 * ls.w);
        let out = skip_shape.with_c(ls.c + c_skip);
        expect_len(OP, "low", low.len(), ls.len())?;
        expect_len(OP, "skip", skip.len(), skip_shape.len())?;
        expect_len(OP, "y", y.len(), out.len())?;
        as_i32(OP, "output length", out.len())?;
        if out.is_empty() {
            return Ok(());
        }
        let (n, cl, cs, h, w) = (
            ls.n as i32,
            ls.c as i32,
            c_skip as i32,
            ls.h as i32,
            ls.w as i32,
        );
        let cfg = self.grid_1d(out.len());
        let mut l = self.stream.launch_builder(self.func("upcat_fwd")?);
        l.arg(low)
            .arg(skip)
            .arg(&mut *y)
            .arg(&n)
            .arg(&cl)
            .arg(&cs)
            .arg(&h)
            .arg(&w);
        // SAFETY: upcat_fwd(const float* low, const float* skip, float* y, int n, int c_low,
        // int c_skip, int h, int w); writes y[n·(c_low+c_skip)·4hw], reads low[n·c_low·hw] and
        // skip[n·c_skip·4hw], all three lengths checked above.
        unsafe { l.launch(cfg) }.map_err(driver_err("launch upcat_fwd"))?;
        Ok(())
    }

    pub(crate) fn launch_upcat_backward(
        &self,
        dy: &CudaSlice<f32>,
        ls: Shape,
        c_skip: usize,
        dlow: &mut CudaSlice<f32>,
        dskip: Option<&mut CudaSlice<f32>>,
    ) -> Result<(), KernelError> {
        const OP: &str = "upsample2_concat_backward";
        let skip_shape = Shape::new(ls.n, c_skip, 2 * ls.h, 2 * ls.w);
        let all = skip_shape.with_c(ls.c + c_skip);
        expect_len(OP, "dy", dy.len(), all.len())?;
        expect_len(OP, "dlow", dlow.len(), ls.len())?;
        as_i32(OP, "dy length", all.len())?;
        let (n, cl, cs, h, w) = (
            ls.n as i32,
            ls.c as i32,
            c_skip as i32,
            ls.h as i32,
            ls.w as i32,
        );
        if !ls.is_empty() {
            let cfg = self.grid_1d(ls.len());
            let mut l = self.stream.launch_builder(self.func("upcat_bwd_low")?);
            l.arg(dy)
                .arg(&mut *dlow)
                .arg(&n)
                .arg(&cl)
                .arg(&cs)
                .arg(&h)
                .arg(&w);
            // SAFETY: upcat_bwd_low(const float* dy, float* dlow, int n, int c_low, int c_skip,
            // int h, int w); writes dlow[n·c_low·hw] and reads the first c_low channels of
            // dy[n·(c_low+c_skip)·4hw]; both lengths checked.
            unsafe { l.launch(cfg) }.map_err(driver_err("launch upcat_bwd_low"))?;
        }
        if let Some(dskip) = dskip {
            expect_len(OP, "dskip", dskip.len(), skip_shape.len())?;
            if !skip_shape.is_empty() {
                let cfg = self.grid_1d(skip_shape.len());
                let mut l = self.stream.launch_builder(self.func("upcat_bwd_skip")?);
                l.arg(dy)
                    .arg(&mut *dskip)
                    .arg(&n)
                    .arg(&cl)
                    .arg(&cs)
                    .arg(&h)
                    .arg(&w);
                // SAFETY: upcat_bwd_skip has upcat_bwd_low's signature; writes
                // dskip[n·c_skip·4hw] (checked) from the last c_skip channels of dy (checked).
                unsafe { l.launch(cfg) }.map_err(driver_err("launch upcat_bwd_skip"))?;
            }
        }
        Ok(())
    }

    pub(crate) fn launch_channel_affine(
        &self,
        x: &CudaSlice<f32>,
        xs: Shape,
        scale: &[f32],
        shift: &[f32],
        y: &mut CudaSlice<f32>,
    ) -> Result<(), KernelError> {
        const OP: &str = "channel_affine";
        expect_len(OP, "x", x.len(), xs.len())?;
        expect_len(OP, "y", y.len(), xs.len())?;
        expect_len(OP, "scale", scale.len(), xs.c)?;
        expect_len(OP, "shift", shift.len(), xs.c)?;
        as_i32(OP, "length", xs.len())?;
        if xs.is_empty() {
            return Ok(());
        }
        let scale_d = self
            .stream
            .clone_htod(scale)
            .map_err(driver_err("upload scale"))?;
        let shift_d = self
            .stream
            .clone_htod(shift)
            .map_err(driver_err("upload shift"))?;
        let (n, c, hw) = (xs.n as i32, xs.c as i32, xs.plane() as i32);
        let cfg = self.grid_1d(xs.len());
        let mut l = self.stream.launch_builder(self.func("channel_affine")?);
        l.arg(x)
            .arg(&mut *y)
            .arg(&scale_d)
            .arg(&shift_d)
            .arg(&n)
            .arg(&c)
            .arg(&hw);
        // SAFETY: channel_affine(const float* x, float* y, const float* scale, const float* shift,
        // int n, int c, int hw); x and y hold n·c·hw elements, scale and shift c (all checked).
        unsafe { l.launch(cfg) }.map_err(driver_err("launch channel_affine"))?;
        Ok(())
    }

    /// Per-channel partial sums of `x` (or of squared deviations from `center` when given):
    /// returns the `[c][chunks]` partials on the device and `chunks`.
    fn channel_partials(
        &self,
        x: &CudaSlice<f32>,
        xs: Shape,
        center: Option<&CudaSlice<f32>>,
    ) -> Result<(CudaSlice<f32>, usize), KernelError> {
        let chunks = reduction_blocks(xs.n * xs.plane());
        if xs.c > 65_535 {
            return Err(KernelError::shape(
                "channel sums",
                format!("{} channels exceed the grid limit 65535", xs.c),
            ));
        }
        // SAFETY: every one of the c·chunks partials is written by exactly one block below.
        let mut partial = unsafe { self.stream.alloc::<f32>(xs.c * chunks) }
            .map_err(driver_err("alloc partial sums"))?;
        let (n, c, hw) = (xs.n as i32, xs.c as i32, xs.plane() as i32);
        let centered = center.is_some() as i32;
        let cfg = LaunchConfig {
            grid_dim: (chunks as u32, xs.c as u32, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut l = self
            .stream
            .launch_builder(self.func("channel_partial_sums")?);
        l.arg(x)
            .arg(&n)
            .arg(&c)
            .arg(&hw)
            .arg(center.unwrap_or(x))
            .arg(&centered)
            .arg(&mut partial);
        // SAFETY: channel_partial_sums(const float* x, int n, int c, int hw, const float* center,
        // int centered, float* partial), launched with 256 threads (REDUCE_THREADS) and grid
        // (chunks, c): block (k, ch) reads channel ch of x[n·c·hw] (x's length, checked by callers),
        // center[ch] only when centered (then center has c elements), and writes partial[ch·chunks + k].
        unsafe { l.launch(cfg) }.map_err(driver_err("launch channel_partial_sums"))?;
        Ok((partial, chunks))
    }

    /// out[ch] = Σ over n, h, w of x (bias gradient), deterministic.
    pub(crate) fn channel_sums(
        &self,
        x: &CudaSlice<f32>,
        xs: Shape,
        out: &mut CudaSlice<f32>,
    ) -> Result<(), KernelError> {
        expect_len("channel sums", "output", out.len(), xs.c)?;
        if xs.c == 0 {
            return Ok(());
        }
        let (partial, chunks) = self.channel_partials(x, xs, None)?;
        self.reduce_rows(&partial, xs.c, chunks, out)
    }

    /// out[r] = Σ_c partial[r·cols + c] for r < rows, in a fixed order.
    fn reduce_rows(
        &self,
        partial: &CudaSlice<f32>,
        rows: usize,
        cols: usize,
        out: &mut CudaSlice<f32>,
    ) -> Result<(), KernelError> {
        debug_assert!(partial.len() >= rows * cols && out.len() >= rows);
        let cols_i = cols as i32;
        let cfg = LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut l = self.stream.launch_builder(self.func("reduce_rows")?);
        l.arg(partial).arg(&cols_i).arg(&mut *out);
        // SAFETY: reduce_rows(const float* partial, int cols, float* out), 256 threads, one block per
        // row: reads partial[r·cols .. (r+1)·cols) and writes out[r] for r < rows; the callers size
        // partial as rows·cols and out as at least rows.
        unsafe { l.launch(cfg) }.map_err(driver_err("launch reduce_rows"))?;
        Ok(())
    }

    pub(crate) fn run_channel_stats(
        &self,
        x: &CudaSlice<f32>,
        xs: Shape,
    ) -> Result<(Vec<f32>, Vec<f32>), KernelError> {
        const OP: &str = "channel_stats";
        expect_len(OP, "x", x.len(), xs.len())?;
        as_i32(OP, "length", xs.len())?;
        let count = xs.n * xs.plane();
        if xs.c == 0 {
            return Ok((Vec::new(), Vec::new()));
        }
        if count == 0 {
            return Err(KernelError::shape(
                OP,
                format!("{xs} has no pixels to take statistics over"),
            ));
        }
        // Pass 1: means (partials added on the host in f64).
        let (partial, chunks) = self.channel_partials(x, xs, None)?;
        let sums = self.download(&partial)?;
        let means: Vec<f32> = sums
            .chunks(chunks)
            .map(|row| (row.iter().map(|&v| v as f64).sum::<f64>() / count as f64) as f32)
            .collect();
        // Pass 2: squared deviations from the mean (two-pass variance: no cancellation).
        let mean_d = self
            .stream
            .clone_htod(&means)
            .map_err(driver_err("upload means"))?;
        let (partial2, _) = self.channel_partials(x, xs, Some(&mean_d))?;
        let sq = self.download(&partial2)?;
        let stds: Vec<f32> = sq
            .chunks(chunks)
            .map(|row| (row.iter().map(|&v| v as f64).sum::<f64>() / count as f64).sqrt() as f32)
            .collect();
        Ok((means, stds))
    }

    fn loss_checks(
        op: &'static str,
        logits: &CudaSlice<f32>,
        ls: Shape,
        labels: &CudaSlice<u8>,
        dlogits: &CudaSlice<f32>,
    ) -> Result<(), KernelError> {
        expect_len(op, "logits", logits.len(), ls.len())?;
        expect_len(op, "dlogits", dlogits.len(), ls.len())?;
        expect_len(op, "labels", labels.len(), ls.n * ls.plane())?;
        if ls.c == 0 || ls.c > IGNORE_LABEL as usize {
            return Err(KernelError::shape(
                op,
                format!("{} classes (need 1 to {})", ls.c, IGNORE_LABEL),
            ));
        }
        as_i32(op, "logits length", ls.len())?;
        Ok(())
    }

    pub(crate) fn run_cross_entropy(
        &self,
        logits: &CudaSlice<f32>,
        ls: Shape,
        labels: &CudaSlice<u8>,
        class_weights: Option<&[f32]>,
        dlogits: &mut CudaSlice<f32>,
    ) -> Result<f32, KernelError> {
        const OP: &str = "softmax_cross_entropy";
        Self::loss_checks(OP, logits, ls, labels, dlogits)?;
        if let Some(cw) = class_weights {
            expect_len(OP, "class_weights", cw.len(), ls.c)?;
        }
        let pixels = ls.n * ls.plane();
        if pixels == 0 {
            return Ok(0.0);
        }
        let blocks = reduction_blocks(pixels);
        let weighted = class_weights.is_some() as i32;
        let cw_d = match class_weights {
            Some(cw) => Some(
                self.stream
                    .clone_htod(cw)
                    .map_err(driver_err("upload class weights"))?,
            ),
            None => None,
        };
        let cw_arg = cw_d.as_ref().unwrap_or(logits);
        // SAFETY: ce_partial writes all 3·blocks slots (one per block and quantity).
        let mut partial = unsafe { self.stream.alloc::<f32>(3 * blocks) }
            .map_err(driver_err("alloc loss partials"))?;
        // SAFETY: reduce_rows writes all 3 totals.
        let mut totals =
            unsafe { self.stream.alloc::<f32>(3) }.map_err(driver_err("alloc loss totals"))?;
        let (n, k, hw) = (ls.n as i32, ls.c as i32, ls.plane() as i32);
        let cfg = LaunchConfig {
            grid_dim: (blocks as u32, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut l = self.stream.launch_builder(self.func("ce_partial")?);
        l.arg(logits)
            .arg(labels)
            .arg(cw_arg)
            .arg(&weighted)
            .arg(&n)
            .arg(&k)
            .arg(&hw)
            .arg(&mut partial);
        // SAFETY: ce_partial(const float* logits, const unsigned char* labels, const float* cw,
        // int weighted, int n, int k, int hw, float* partial), 256 threads, `blocks` blocks: reads
        // labels[n·hw] and logits[n·k·hw] (checked), cw[label] only when weighted and label < k
        // (cw has k elements), writes partial[q·blocks + b] for q < 3, b < blocks.
        unsafe { l.launch(cfg) }.map_err(driver_err("launch ce_partial"))?;
        self.reduce_rows(&partial, 3, blocks, &mut totals)?;
        let gcfg = self.grid_1d(pixels);
        let mut g = self.stream.launch_builder(self.func("ce_grad")?);
        g.arg(logits)
            .arg(labels)
            .arg(cw_arg)
            .arg(&weighted)
            .arg(&totals)
            .arg(&n)
            .arg(&k)
            .arg(&hw)
            .arg(&mut *dlogits);
        // SAFETY: ce_grad(const float* logits, const unsigned char* labels, const float* cw,
        // int weighted, const float* totals, int n, int k, int hw, float* dlogits): same reads as
        // ce_partial plus totals[1] (3 elements), writes every element of dlogits[n·k·hw] (checked).
        unsafe { g.launch(gcfg) }.map_err(driver_err("launch ce_grad"))?;
        let t = self.download(&totals)?;
        if t[2] > 0.0 {
            return Err(KernelError::shape(
                OP,
                format!(
                    "{} labels are >= the class count {} (and not the ignore label {})",
                    t[2], ls.c, IGNORE_LABEL
                ),
            ));
        }
        Ok(if t[1] > 0.0 { t[0] / t[1] } else { 0.0 })
    }

    pub(crate) fn run_soft_dice(
        &self,
        logits: &CudaSlice<f32>,
        ls: Shape,
        labels: &CudaSlice<u8>,
        weight: f32,
        dlogits: &mut CudaSlice<f32>,
    ) -> Result<f32, KernelError> {
        const OP: &str = "soft_dice_acc";
        Self::loss_checks(OP, logits, ls, labels, dlogits)?;
        let pixels = ls.n * ls.plane();
        let k = ls.c;
        let blocks = reduction_blocks(pixels);
        // SAFETY: dice_partial writes all 4·k·blocks slots.
        let mut partial = unsafe { self.stream.alloc::<f32>(4 * k * blocks) }
            .map_err(driver_err("alloc dice partials"))?;
        // SAFETY: reduce_rows writes all 4·k sums.
        let mut sums =
            unsafe { self.stream.alloc::<f32>(4 * k) }.map_err(driver_err("alloc dice sums"))?;
        let (n, k_i, hw) = (ls.n as i32, k as i32, ls.plane() as i32);
        let cfg = LaunchConfig {
            grid_dim: (blocks as u32, k as u32, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut l = self.stream.launch_builder(self.func("dice_partial")?);
        l.arg(logits)
            .arg(labels)
            .arg(&n)
            .arg(&k_i)
            .arg(&hw)
            .arg(&mut partial);
        // SAFETY: dice_partial(const float* logits, const unsigned char* labels, int n, int k,
        // int hw, float* partial), 256 threads, grid (blocks, k): reads labels[n·hw] and
        // logits[n·k·hw] (checked), writes partial[(cls·4 + q)·blocks + b], q < 4: 4·k·blocks.
        unsafe { l.launch(cfg) }.map_err(driver_err("launch dice_partial"))?;
        self.reduce_rows(&partial, 4 * k, blocks, &mut sums)?;
        let eps = crate::DICE_EPS;
        if pixels > 0 && weight != 0.0 {
            let gcfg = self.grid_1d(pixels);
            let mut g = self.stream.launch_builder(self.func("dice_grad")?);
            g.arg(logits)
                .arg(labels)
                .arg(&sums)
                .arg(&n)
                .arg(&k_i)
                .arg(&hw)
                .arg(&weight)
                .arg(&eps)
                .arg(&mut *dlogits);
            // SAFETY: dice_grad(const float* logits, const unsigned char* labels, const float* sums,
            // int n, int k, int hw, float weight, float eps, float* dlogits): reads sums[4k] and the
            // checked logits/labels, adds into dlogits[n·k·hw] (checked) at labelled pixels.
            unsafe { g.launch(gcfg) }.map_err(driver_err("launch dice_grad"))?;
        }
        let s = self.download(&sums)?;
        let bad = s.get(3).copied().unwrap_or(0.0);
        if bad > 0.0 {
            return Err(KernelError::shape(
                OP,
                format!(
                    "{bad} labels are >= the class count {k} (and not the ignore label {IGNORE_LABEL})"
                ),
            ));
        }
        let eps = eps as f64;
        let mean_dice = (0..k)
            .map(|c| {
                let (i, p, t) = (s[c * 4] as f64, s[c * 4 + 1] as f64, s[c * 4 + 2] as f64);
                (2.0 * i + eps) / (p + t + eps)
            })
            .sum::<f64>()
            / k as f64;
        Ok((1.0 - mean_dice) as f32)
    }

    pub(crate) fn launch_optimizer_step(
        &self,
        step: OptimStep,
        param: &mut CudaSlice<f32>,
        grad: &CudaSlice<f32>,
        state: &mut [CudaSlice<f32>],
    ) -> Result<(), KernelError> {
        const OP: &str = "optimizer_step";
        let lens: Vec<usize> = state.iter().map(|s| s.len()).collect();
        step.check(param.len(), grad.len(), &lens)?;
        let n = as_i32(OP, "length", param.len())?;
        if n == 0 {
            return Ok(());
        }
        let cfg = self.grid_1d(param.len());
        match step {
            OptimStep::Sgd {
                lr,
                momentum,
                weight_decay,
            } => {
                let mut l = self.stream.launch_builder(self.func("sgd_step")?);
                l.arg(&mut *param)
                    .arg(grad)
                    .arg(&mut state[0])
                    .arg(&n)
                    .arg(&lr)
                    .arg(&momentum)
                    .arg(&weight_decay);
                // SAFETY: sgd_step(float* p, const float* g, float* v, int n, float lr,
                // float momentum, float wd); p, g and v all hold n elements (checked).
                unsafe { l.launch(cfg) }.map_err(driver_err("launch sgd_step"))?;
            }
            OptimStep::AdamW {
                lr,
                beta1,
                beta2,
                eps,
                weight_decay,
                step,
            } => {
                let bc1 = (1.0 - (beta1 as f64).powi(step as i32)) as f32;
                let bc2 = (1.0 - (beta2 as f64).powi(step as i32)) as f32;
                let (m, v) = state.split_at_mut(1);
                let mut l = self.stream.launch_builder(self.func("adamw_step")?);
                l.arg(&mut *param)
                    .arg(grad)
                    .arg(&mut m[0])
                    .arg(&mut v[0])
                    .arg(&n)
                    .arg(&lr)
                    .arg(&beta1)
                    .arg(&beta2)
                    .arg(&eps)
                    .arg(&weight_decay)
                    .arg(&bc1)
                    .arg(&bc2);
                // SAFETY: adamw_step(float* p, const float* g, float* m, float* v, int n, float lr,
                // float b1, float b2, float eps, float wd, float bc1, float bc2); p, g, m and v all
                // hold n elements (checked).
                unsafe { l.launch(cfg) }.map_err(driver_err("launch adamw_step"))?;
            }
        }
        Ok(())
    }
}
