//! Launches of the implicit-GEMM convolution kernels (`kernels/cuda/conv.cu`): shape checks, the tile
//! shape for each layer, split-K for the weight gradient.
//!
//! Tile choice. Every kernel computes a BM x 128 block of the GEMM's output, BM in {128, 64, 32, 16}
//! (1x1 kernels: 64 or 16), where M is the output-channel count of the pass (c_out forward and for the
//! weight gradient, c_in for the data gradient). A block's arithmetic intensity grows with
//! BM·BN/(BM+BN), but rows past M are wasted, so the score is that intensity times the useful
//! fraction M / (BM·⌈M/BM⌉). E.g. the decoder's 16- and 32-channel layers get 16- and 32-row tiles,
//! 64 and 128 channels 64- and 128-row tiles, the 48-channel data gradient a 64-row tile (25% of its
//! rows idle, still ahead of a 32-row tile on intensity). When the
//! best tile gives fewer than two blocks per SM, the next smaller tile is taken (small images), except
//! for the weight gradient: its split-K (below) makes as many blocks as the chip needs, and with a
//! smaller tile each gathered x column would serve fewer output channels.
//!
//! Split-K for the weight gradient: the reduction runs over all n·h·w pixels, far more than the M x N
//! output tiles need; the pixel range is cut into `splits` chunks (a multiple of BK = 16 pixels each)
//! so that about four blocks per SM run, each writes its own partial slab into the workspace, and
//! `splitk_reduce` adds the slabs in a fixed order (deterministic, no atomics). The bias gradient is a
//! two-level per-channel sum of dy (`channel_partial_sums` + `reduce_rows`).

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};

use super::{CudaBackend, THREADS, as_i32, driver_err};
use crate::KernelError;
use crate::backend::{Conv, Precision, Shape};

/// One block shape of conv.cu.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Tile {
    pub name: &'static str,
    pub bm: usize,
    pub bn: usize,
    pub threads: u32,
}

const BK: usize = 16;
const T128: Tile = Tile {
    name: "t128x128",
    bm: 128,
    bn: 128,
    threads: 256,
};
const T64: Tile = Tile {
    name: "t64x128",
    bm: 64,
    bn: 128,
    threads: 128,
};
const T32: Tile = Tile {
    name: "t32x128",
    bm: 32,
    bn: 128,
    threads: 128,
};
const T16: Tile = Tile {
    name: "t16x128",
    bm: 16,
    bn: 128,
    threads: 128,
};
/// Tiles compiled for 3x3 kernels, largest first.
const TILES_K3: [Tile; 4] = [T128, T64, T32, T16];
/// Tiles compiled for 1x1 kernels, largest first.
const TILES_K1: [Tile; 2] = [T64, T16];

const MODES: [&str; 3] = ["fwd", "bwd_data", "bwd_weight"];

fn prec_name(p: Precision) -> &'static str {
    match p {
        Precision::Fp32 => "fp32",
        Precision::Tf32 => "tf32",
    }
}

/// Every conv kernel name of one precision (must match the MF_CONV_* macros of conv.cu).
pub(crate) fn kernel_names(p: Precision) -> Vec<String> {
    let mut names = Vec::new();
    for mode in MODES {
        for (k, tiles) in [(3, &TILES_K3[..]), (1, &TILES_K1[..])] {
            for t in tiles {
                names.push(format!("conv_{mode}_{}_k{k}_{}", t.name, prec_name(p)));
            }
        }
    }
    names
}

/// The tile for a GEMM with `m` rows and `n` columns (see the module docs). `n = None` for the
/// weight gradient, whose split-K fills the chip whatever the tile, so no smaller tile is taken.
pub(crate) fn pick_tile(k: usize, m: usize, n: Option<usize>, sm_count: u32) -> Tile {
    let tiles: &[Tile] = if k == 1 { &TILES_K1 } else { &TILES_K3 };
    let score = |t: &Tile| {
        let intensity = (t.bm * t.bn) as f64 / (t.bm + t.bn) as f64;
        let padded = m.div_ceil(t.bm) * t.bm;
        intensity * m as f64 / padded as f64
    };
    let mut best = 0;
    for (i, t) in tiles.iter().enumerate() {
        if score(t) > score(&tiles[best]) {
            best = i;
        }
    }
    // Too few blocks to fill the chip: step down to smaller tiles while that helps.
    if let Some(n) = n {
        let blocks = |t: &Tile| m.div_ceil(t.bm) * n.div_ceil(t.bn);
        while best + 1 < tiles.len() && blocks(&tiles[best]) < 2 * sm_count as usize {
            best += 1;
        }
    }
    tiles[best]
}

/// Every index of a convolution over `xs` must fit the kernels' 32-bit arithmetic (the geometry and
/// buffer lengths are checked by the shared `Conv::check_*`).
fn check_index_range(op: &'static str, xs: Shape, conv: Conv) -> Result<(), KernelError> {
    as_i32(op, "input length", xs.len())?;
    as_i32(op, "output length", xs.with_c(conv.c_out).len())?;
    as_i32(op, "weight length", conv.weight_len())?;
    Ok(())
}

impl CudaBackend {
    /// The precision that actually runs: TF32 falls back to fp32 below sm_80.
    fn effective(&self, p: Precision) -> Precision {
        if p == Precision::Tf32 && !self.has_tf32() {
            Precision::Fp32
        } else {
            p
        }
    }

    /// The tile a pass of `conv` over `xs` uses: `mode` is "fwd", "bwd_data" or "bwd_weight".
    pub(crate) fn conv_tile(&self, mode: &str, xs: Shape, conv: Conv) -> Tile {
        let p = xs.n * xs.h * xs.w;
        match mode {
            "fwd" => pick_tile(conv.k, conv.c_out, Some(p), self.sm_count),
            "bwd_data" => pick_tile(conv.k, conv.c_in, Some(p), self.sm_count),
            _ => pick_tile(conv.k, conv.c_out, None, self.sm_count),
        }
    }

    fn conv_kernel_name(&self, mode: &str, tile: Tile, k: usize, p: Precision) -> String {
        format!(
            "conv_{mode}_{}_k{k}_{}",
            tile.name,
            prec_name(self.effective(p))
        )
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn conv_forward(
        &self,
        x: &CudaSlice<f32>,
        xs: Shape,
        conv: Conv,
        w: &CudaSlice<f32>,
        b: &CudaSlice<f32>,
        relu: bool,
        precision: Precision,
        y: &mut CudaSlice<f32>,
    ) -> Result<(), KernelError> {
        conv.check_forward(xs, x.len(), w.len(), b.len(), y.len())?;
        const OP: &str = "conv2d_forward";
        check_index_range(OP, xs, conv)?;
        if y.is_empty() {
            return Ok(());
        }
        let tile = self.conv_tile("fwd", xs, conv);
        let f = self.func(&self.conv_kernel_name("fwd", tile, conv.k, precision))?;
        let p = xs.n * xs.h * xs.w;
        let cfg = LaunchConfig {
            grid_dim: (
                p.div_ceil(tile.bn) as u32,
                conv.c_out.div_ceil(tile.bm) as u32,
                1,
            ),
            block_dim: (tile.threads, 1, 1),
            shared_mem_bytes: 0,
        };
        let (n, ci, co, h, wd) = (
            xs.n as i32,
            conv.c_in as i32,
            conv.c_out as i32,
            xs.h as i32,
            xs.w as i32,
        );
        let relu_flag = relu as i32;
        let k_chunk = 0i32;
        let mut l = self.stream.launch_builder(f);
        l.arg(w)
            .arg(x)
            .arg(b)
            .arg(y)
            .arg(&n)
            .arg(&ci)
            .arg(&co)
            .arg(&h)
            .arg(&wd)
            .arg(&relu_flag)
            .arg(&k_chunk);
        // SAFETY: conv_fwd_* takes (const float* w, const float* x, const float* bias, float* y, int n,
        // int c_src = c_in, int c_dst = c_out, int h, int w, int relu, int k_chunk), pushed in that
        // order with matching types. Lengths were checked above: w = c_out·c_in·k², x = n·c_in·h·w,
        // bias = c_out, y = n·c_out·h·w, and the kernel bounds-checks every row (< c_out) and pixel
        // (< n·h·w) of the grid, which covers exactly those ranges. Every count fits an i32.
        unsafe { l.launch(cfg) }.map_err(driver_err(format!("launch conv_fwd {}", tile.name)))?;
        Ok(())
    }

    pub(crate) fn conv_backward_data(
        &self,
        dy: &CudaSlice<f32>,
        xs: Shape,
        conv: Conv,
        w: &CudaSlice<f32>,
        precision: Precision,
        dx: &mut CudaSlice<f32>,
    ) -> Result<(), KernelError> {
        conv.check_backward_data(xs, dy.len(), w.len(), dx.len())?;
        const OP: &str = "conv2d_backward_data";
        check_index_range(OP, xs, conv)?;
        if dx.is_empty() {
            return Ok(());
        }
        if dy.is_empty() {
            // No output channels: the gradient is zero.
            return self.launch_fill(dx, 0.0);
        }
        let tile = self.conv_tile("bwd_data", xs, conv);
        let f = self.func(&self.conv_kernel_name("bwd_data", tile, conv.k, precision))?;
        let p = xs.n * xs.h * xs.w;
        let cfg = LaunchConfig {
            grid_dim: (
                p.div_ceil(tile.bn) as u32,
                conv.c_in.div_ceil(tile.bm) as u32,
                1,
            ),
            block_dim: (tile.threads, 1, 1),
            shared_mem_bytes: 0,
        };
        let (n, c_src, c_dst, h, wd) = (
            xs.n as i32,
            conv.c_out as i32,
            conv.c_in as i32,
            xs.h as i32,
            xs.w as i32,
        );
        let (relu_flag, k_chunk) = (0i32, 0i32);
        let mut l = self.stream.launch_builder(f);
        l.arg(w)
            .arg(dy)
            .arg(w) // bias slot: not read in this mode, any valid pointer
            .arg(dx)
            .arg(&n)
            .arg(&c_src)
            .arg(&c_dst)
            .arg(&h)
            .arg(&wd)
            .arg(&relu_flag)
            .arg(&k_chunk);
        // SAFETY: conv_bwd_data_* takes (const float* w, const float* dy, const float* unused,
        // float* dx, int n, int c_src = c_out, int c_dst = c_in, int h, int w, int relu, int k_chunk),
        // pushed in that order with matching types. Lengths checked above: w = c_out·c_in·k²,
        // dy = n·c_out·h·w, dx = n·c_in·h·w; the kernel bounds-checks rows (< c_in) and pixels.
        unsafe { l.launch(cfg) }
            .map_err(driver_err(format!("launch conv_bwd_data {}", tile.name)))?;
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn conv_backward_weight(
        &self,
        x: &CudaSlice<f32>,
        xs: Shape,
        conv: Conv,
        dy: &CudaSlice<f32>,
        precision: Precision,
        dw: &mut CudaSlice<f32>,
        db: &mut CudaSlice<f32>,
    ) -> Result<(), KernelError> {
        conv.check_backward_weight(xs, x.len(), dy.len(), dw.len(), db.len())?;
        const OP: &str = "conv2d_backward_weight";
        check_index_range(OP, xs, conv)?;
        let pixels = xs.n * xs.h * xs.w;
        if dw.is_empty() && db.is_empty() {
            return Ok(());
        }
        if pixels == 0 {
            // An empty batch contributes nothing.
            self.launch_fill(dw, 0.0)?;
            return self.launch_fill(db, 0.0);
        }
        if !dw.is_empty() {
            let m = conv.c_out;
            let ncols = conv.c_in * conv.k * conv.k;
            let tile = self.conv_tile("bwd_weight", xs, conv);
            let tiles = m.div_ceil(tile.bm) * ncols.div_ceil(tile.bn);
            // About four blocks per SM in all, each split covering at least 8 k-tiles of pixels.
            let want = (4 * self.sm_count as usize).div_ceil(tiles).max(1);
            let max_splits = pixels.div_ceil(8 * BK).max(1);
            let splits0 = want.min(max_splits).min(65_535);
            let chunk = pixels.div_ceil(splits0).div_ceil(BK) * BK;
            let splits = pixels.div_ceil(chunk);
            let f = self.func(&self.conv_kernel_name("bwd_weight", tile, conv.k, precision))?;
            let cfg = LaunchConfig {
                grid_dim: (
                    ncols.div_ceil(tile.bn) as u32,
                    m.div_ceil(tile.bm) as u32,
                    splits as u32,
                ),
                block_dim: (tile.threads, 1, 1),
                shared_mem_bytes: 0,
            };
            let (n, c_src, c_dst, h, wd) = (
                xs.n as i32,
                conv.c_in as i32,
                conv.c_out as i32,
                xs.h as i32,
                xs.w as i32,
            );
            let relu_flag = 0i32;
            let k_chunk = as_i32(OP, "pixels per split", chunk)?;
            let slab = m * ncols;
            if splits == 1 {
                let mut l = self.stream.launch_builder(f);
                l.arg(dy)
                    .arg(x)
                    .arg(dy)
                    .arg(&mut *dw)
                    .arg(&n)
                    .arg(&c_src)
                    .arg(&c_dst)
                    .arg(&h)
                    .arg(&wd)
                    .arg(&relu_flag)
                    .arg(&k_chunk);
                // SAFETY: conv_bwd_weight_* takes (const float* dy, const float* x, const float*
                // unused, float* out, int n, int c_src = c_in, int c_dst = c_out, int h, int w,
                // int relu, int k_chunk), pushed in that order with matching types. dy and x lengths
                // were checked; with one split (gridDim.z = 1) the kernel writes out[m·N + j] for
                // m < c_out, j < c_in·k², exactly dw's checked length.
                unsafe { l.launch(cfg) }
                    .map_err(driver_err(format!("launch conv_bwd_weight {}", tile.name)))?;
            } else {
                let need = as_i32(OP, "split-K workspace", splits * slab)? as usize;
                let mut guard = self.workspace.lock().map_err(|_| KernelError::Cuda {
                    context: OP.into(),
                    message: "workspace lock poisoned".into(),
                })?;
                if guard.as_ref().is_none_or(|ws| ws.len() < need) {
                    *guard = None; // free the old one first
                    // SAFETY: the workspace is only ever read where a kernel wrote it first: each
                    // split writes every element of its slab before splitk_reduce reads it.
                    let ws = unsafe { self.stream.alloc::<f32>(need) }
                        .map_err(driver_err(format!("workspace alloc of {need} floats")))?;
                    *guard = Some(ws);
                }
                let ws = guard.as_mut().expect("workspace allocated just above");
                let mut l = self.stream.launch_builder(f);
                l.arg(dy)
                    .arg(x)
                    .arg(dy)
                    .arg(&mut *ws)
                    .arg(&n)
                    .arg(&c_src)
                    .arg(&c_dst)
                    .arg(&h)
                    .arg(&wd)
                    .arg(&relu_flag)
                    .arg(&k_chunk);
                // SAFETY: same signature as above. Split z writes out[z·slab + m·N + j] for
                // z < splits, m < c_out, j < c_in·k²: at most splits·slab = `need` elements, and the
                // workspace holds at least `need`. Its pixel range [z·chunk, min((z+1)·chunk, n·h·w))
                // stays inside dy and x.
                unsafe { l.launch(cfg) }
                    .map_err(driver_err(format!("launch conv_bwd_weight {}", tile.name)))?;
                let reduce = self.func("splitk_reduce")?;
                let (splits_i, len_i) = (splits as i32, slab as i32);
                let mut r = self.stream.launch_builder(reduce);
                r.arg(&*ws).arg(&splits_i).arg(&len_i).arg(&mut *dw);
                // SAFETY: splitk_reduce(const float* ws, int splits, int len, float* dw) reads
                // ws[s·len + i] for s < splits, i < len (all written by the launch above) and writes
                // dw[i], i < len = dw's checked length.
                unsafe { r.launch(self.grid_1d(slab)) }
                    .map_err(driver_err("launch splitk_reduce"))?;
            }
        }
        if !db.is_empty() {
            self.channel_sums(dy, xs.with_c(conv.c_out), db)?;
        }
        Ok(())
    }

    /// Grid for a grid-stride loop over `len` elements, THREADS per block.
    pub(crate) fn grid_1d(&self, len: usize) -> LaunchConfig {
        let max_blocks = (self.sm_count as usize * 32).max(1);
        LaunchConfig {
            grid_dim: (
                len.div_ceil(THREADS as usize).clamp(1, max_blocks) as u32,
                1,
                1,
            ),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiles_follow_the_channel_count() {
        let big = Some(16 * 256 * 256);
        assert_eq!(pick_tile(3, 16, big, 132).bm, 16);
        assert_eq!(pick_tile(3, 32, big, 132).bm, 32);
        assert_eq!(pick_tile(3, 64, big, 132).bm, 64);
        assert_eq!(pick_tile(3, 128, big, 132).bm, 128);
        assert_eq!(pick_tile(3, 48, big, 132).bm, 64);
        assert_eq!(pick_tile(3, 384, big, 132).bm, 128);
        assert_eq!(pick_tile(1, 2, big, 132).bm, 16);
        // 128 channels on a 16x16 image: the 128-row tile would leave SMs idle
        assert!(pick_tile(3, 128, Some(256), 132).bm < 128);
    }

    #[test]
    fn the_weight_gradient_keeps_its_tile_and_splits_instead() {
        // dec3.conv1's weight gradient (128 x 3456 GEMM) has only 27 column tiles of 128-row blocks,
        // yet takes the 128-row tile: split-K supplies the blocks. Before, it stepped down to 16 rows,
        // so every x column was gathered 8 times per pixel instead of once.
        assert_eq!(pick_tile(3, 128, None, 132).bm, 128);
        assert_eq!(pick_tile(3, 64, None, 132).bm, 64);
        assert_eq!(pick_tile(3, 32, None, 132).bm, 32);
        assert_eq!(pick_tile(3, 16, None, 132).bm, 16);
        assert_eq!(pick_tile(1, 2, None, 132).bm, 16);
        assert_eq!(pick_tile(3, 128, Some(27 * 128), 132).bm, 16);
    }

    #[test]
    fn kernel_names_match_the_macros() {
        let names = kernel_names(Precision::Tf32);
        assert_eq!(names.len(), 3 * (4 + 2));
        assert!(names.contains(&"conv_bwd_weight_t128x128_k3_tf32".to_string()));
        assert!(names.contains(&"conv_fwd_t16x128_k1_tf32".to_string()));
        // every name appears in the source text (conv.cu builds them with the same pattern)
        let src = super::super::compile::CONV_FP32.text;
        for t in TILES_K3.iter().chain(TILES_K1.iter()) {
            assert!(src.contains(&format!("conv_##MODE_NAME##_{}_k", t.name)));
        }
    }
}
