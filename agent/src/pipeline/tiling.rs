//! Images of any size through a network that takes tiles: reflect-pad to a multiple of 16, cut into
//! overlapping tiles, run them in batches, stitch the logits back without seams, crop.
//!
//! Map: [`TileGrid`] (where the tiles go and which pixels each one owns; pure arithmetic, tested on
//! its own) → [`segment_logits`] (runs a [`Segmenter`]) → [`Logits::to_mask`] (arg-max per pixel).
//!
//! Why the stitching is seamless: a U-Net's output near a tile edge sees zero padding instead of the
//! real neighbourhood, so it differs from what the whole image would give. Each output pixel is
//! therefore taken from the tile in which it lies farthest from an edge: along each axis the boundary
//! between two neighbouring tiles is the middle of their overlap, so every pixel is at least
//! `overlap / 2` from the edge of the tile that produced it. Tiles start on multiples of 16, so every
//! tile sees the same 2×2-pooling grid as the whole image: with enough overlap the stitched logits
//! equal the whole-image logits (the test measures how closely for the default overlap).

use tract_linalg::multithread::{Executor, multithread_tract_scope};

use crate::mask::Mask;
use crate::micrograph::Micrograph;
use crate::model::onnx::INPUT_MULTIPLE;
use crate::model::runtime::{RuntimeError, Segmenter};

/// Why a micrograph could not be segmented.
#[derive(Debug, thiserror::Error)]
pub enum TilingError {
    #[error(transparent)]
    Model(#[from] RuntimeError),
    #[error("the model returned {found} values for {tiles} tiles of {k}×{h}×{w}")]
    OutputSize {
        found: usize,
        tiles: usize,
        k: usize,
        h: usize,
        w: usize,
    },
    #[error("tile {tile} must be a positive multiple of {INPUT_MULTIPLE}")]
    Tile { tile: usize },
    #[error("the model produced a non-finite logit (NaN or infinity) at pixel ({x}, {y})")]
    NotFinite { x: usize, y: usize },
}

/// Tiles along one axis.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AxisTiles {
    /// Length of the axis after padding to a multiple of 16.
    pub padded: usize,
    /// Tile length along this axis (the tile size, or the padded length when that is smaller).
    pub tile: usize,
    /// Start of each tile, multiples of 16, increasing; the last tile ends at `padded`.
    pub starts: Vec<usize>,
    /// The half-open range of padded coordinates each tile owns; they partition `0..padded`.
    pub owned: Vec<(usize, usize)>,
}

impl AxisTiles {
    /// Tiles of length `tile` with at least `overlap` between neighbours over an axis of `len` pixels.
    pub fn new(len: usize, tile: usize, overlap: usize) -> Self {
        let padded = len.max(1).next_multiple_of(INPUT_MULTIPLE);
        if padded <= tile {
            return Self {
                padded,
                tile: padded,
                starts: vec![0],
                owned: vec![(0, padded)],
            };
        }
        // The stride is rounded down to a multiple of 16 (so the overlap only grows) but never below 16.
        let stride =
            (tile.saturating_sub(overlap) / INPUT_MULTIPLE * INPUT_MULTIPLE).max(INPUT_MULTIPLE);
        let mut starts: Vec<usize> = (0..)
            .map(|i| i * stride)
            .take_while(|&s| s + tile < padded)
            .collect();
        starts.push(padded - tile);
        starts.dedup();
        let mut owned = Vec::with_capacity(starts.len());
        let mut lo = 0;
        for i in 0..starts.len() {
            let hi = match starts.get(i + 1) {
                // Middle of the overlap of tile i (ends at starts[i] + tile) and tile i+1.
                Some(&next) => (next + starts[i] + tile) / 2,
                None => padded,
            };
            owned.push((lo, hi));
            lo = hi;
        }
        Self {
            padded,
            tile,
            starts,
            owned,
        }
    }

    /// The smallest distance from an owned pixel to the edge of its tile, excluding the image's own
    /// edges (where no tile has more context). Tests check it is at least `overlap / 2`.
    pub fn min_inner_margin(&self) -> Option<usize> {
        let n = self.starts.len();
        (0..n)
            .flat_map(|i| {
                let (lo, hi) = self.owned[i];
                let s = self.starts[i];
                let left = (i > 0).then(|| lo - s);
                let right = (i + 1 < n).then(|| s + self.tile - hi);
                [left, right]
            })
            .flatten()
            .min()
    }
}

/// The tiles of a whole image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TileGrid {
    pub width: usize,
    pub height: usize,
    pub x: AxisTiles,
    pub y: AxisTiles,
}

impl TileGrid {
    pub fn new(
        width: usize,
        height: usize,
        tile: usize,
        overlap: usize,
    ) -> Result<Self, TilingError> {
        if tile == 0 || !tile.is_multiple_of(INPUT_MULTIPLE) {
            return Err(TilingError::Tile { tile });
        }
        Ok(Self {
            width,
            height,
            x: AxisTiles::new(width, tile, overlap),
            y: AxisTiles::new(height, tile, overlap),
        })
    }

    /// Number of tiles.
    pub fn len(&self) -> usize {
        self.x.starts.len() * self.y.starts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// (row, column) of tile `i`, row-major.
    fn position(&self, i: usize) -> (usize, usize) {
        (i / self.x.starts.len(), i % self.x.starts.len())
    }
}

/// Index into `0..n` mirrored at the ends without repeating the edge pixel (`-1 → 1`, `n → n − 2`),
/// periodic for indices farther out, so any padding works even on tiny images.
fn reflect(i: usize, n: usize) -> usize {
    if n == 1 {
        return 0;
    }
    let period = 2 * (n - 1);
    let m = i % period;
    if m < n { m } else { period - m }
}

/// Per-pixel class scores `[K, H, W]`, row-major, for the original (uncropped) image size.
#[derive(Debug, Clone, PartialEq)]
pub struct Logits {
    pub classes: usize,
    pub width: usize,
    pub height: usize,
    pub data: Vec<f32>,
}

impl Logits {
    /// The class of highest score per pixel (the lowest index on a tie). Refuses NaN, which would
    /// otherwise silently become class 0.
    pub fn to_mask(&self) -> Result<Mask, TilingError> {
        let plane = self.width * self.height;
        let mut data = vec![0u8; plane];
        for (p, out) in data.iter_mut().enumerate() {
            let mut best = self.data[p];
            let mut arg = 0;
            for c in 1..self.classes {
                let v = self.data[c * plane + p];
                if v > best {
                    best = v;
                    arg = c;
                }
            }
            if !best.is_finite() || (0..self.classes).any(|c| self.data[c * plane + p].is_nan()) {
                return Err(TilingError::NotFinite {
                    x: p % self.width,
                    y: p / self.width,
                });
            }
            *out = arg as u8;
        }
        Ok(Mask {
            width: self.width as u32,
            height: self.height as u32,
            data,
        })
    }
}

/// A rayon pool of `threads` for tract's matrix products (`SingleThread` for 1), or `None` when the
/// pool cannot be built (then tract runs single-threaded; the caller logs it).
pub fn executor(threads: usize) -> Option<Executor> {
    if threads <= 1 {
        return Some(Executor::SingleThread);
    }
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("microfed-tract-{i}"))
        .build()
        .ok()
        .map(|pool| Executor::MultiThread(std::sync::Arc::new(pool)))
}

/// Segments a micrograph of any size through the tile grid, `batch` tiles per network run, on the
/// given tract executor, and returns the stitched logits.
pub fn segment_logits(
    model: &Segmenter,
    image: &Micrograph,
    tile: usize,
    overlap: usize,
    batch: usize,
    executor: &Executor,
) -> Result<Logits, TilingError> {
    let (w, h) = (image.width as usize, image.height as usize);
    let grid = TileGrid::new(w, h, tile, overlap)?;
    let (th, tw) = (grid.y.tile, grid.x.tile);
    let k = model.classes();
    let plane = w * h;
    let mut out = vec![0f32; k * plane];
    let batch = batch.max(1);
    let mut input = Vec::with_capacity(batch * th * tw);
    let tiles: Vec<usize> = (0..grid.len()).collect();
    for chunk in tiles.chunks(batch) {
        input.clear();
        for &t in chunk {
            let (r, c) = grid.position(t);
            let (y0, x0) = (grid.y.starts[r], grid.x.starts[c]);
            for ty in 0..th {
                let row = reflect(y0 + ty, h) * w;
                input.extend((0..tw).map(|tx| image.pixels[row + reflect(x0 + tx, w)]));
            }
        }
        let n = chunk.len();
        let logits = multithread_tract_scope(executor.clone(), || model.logits(&input, n, th, tw))?;
        if logits.len() != n * k * th * tw {
            return Err(TilingError::OutputSize {
                found: logits.len(),
                tiles: n,
                k,
                h: th,
                w: tw,
            });
        }
        for (j, &t) in chunk.iter().enumerate() {
            let (r, c) = grid.position(t);
            let (y0, x0) = (grid.y.starts[r], grid.x.starts[c]);
            let (ylo, yhi) = grid.y.owned[r];
            let (xlo, xhi) = grid.x.owned[c];
            // Crop the padding away: only pixels inside the original image are kept.
            let (yhi, xhi) = (yhi.min(h), xhi.min(w));
            for class in 0..k {
                let src = &logits[(j * k + class) * th * tw..][..th * tw];
                let dst = &mut out[class * plane..][..plane];
                for y in ylo..yhi {
                    let s = (y - y0) * tw;
                    dst[y * w + xlo..y * w + xhi].copy_from_slice(&src[s + xlo - x0..s + xhi - x0]);
                }
            }
        }
    }
    Ok(Logits {
        classes: k,
        width: w,
        height: h,
        data: out,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reflect_mirrors_without_repeating_the_edge() {
        let got: Vec<usize> = (0..10).map(|i| reflect(i, 4)).collect();
        assert_eq!(got, [0, 1, 2, 3, 2, 1, 0, 1, 2, 3]);
        assert_eq!(reflect(5, 1), 0);
    }

    #[test]
    fn small_axes_are_one_padded_tile() {
        let a = AxisTiles::new(100, 512, 32);
        assert_eq!(a.padded, 112);
        assert_eq!(a.tile, 112);
        assert_eq!(a.starts, vec![0]);
        assert_eq!(a.owned, vec![(0, 112)]);
        assert_eq!(a.min_inner_margin(), None);
    }

    #[test]
    fn tiles_partition_the_axis_and_keep_half_the_overlap_as_margin() {
        for len in [513, 1000, 1536, 2048, 2049, 4000] {
            for (tile, overlap) in [(512, 32), (256, 64), (128, 48), (64, 16)] {
                let a = AxisTiles::new(len, tile, overlap);
                assert_eq!(a.padded % 16, 0);
                assert!(a.padded >= len && a.padded < len + 16);
                assert_eq!(*a.starts.last().unwrap() + tile, a.padded);
                assert!(a.starts.iter().all(|s| s % 16 == 0), "{a:?}");
                assert!(a.starts.windows(2).all(|w| w[0] < w[1]));
                // Owned ranges partition 0..padded and lie inside their tile.
                assert_eq!(a.owned[0].0, 0);
                assert_eq!(a.owned.last().unwrap().1, a.padded);
                for (i, &(lo, hi)) in a.owned.iter().enumerate() {
                    assert!(lo < hi);
                    assert!(lo >= a.starts[i] && hi <= a.starts[i] + tile);
                    if i > 0 {
                        assert_eq!(a.owned[i - 1].1, lo);
                    }
                }
                let m = a.min_inner_margin().unwrap();
                assert!(
                    m >= overlap / 2,
                    "len {len} tile {tile} overlap {overlap}: {m}"
                );
            }
        }
        // 1536 with 512/32: stride 480 → starts 0, 480, 960, then 1024 (end-aligned).
        let a = AxisTiles::new(1536, 512, 32);
        assert_eq!(a.starts, vec![0, 480, 960, 1024]);
        // Boundaries in the middle of each overlap: (480+512)/2 = 496, (960+992)/2 = 976,
        // (1024+1472)/2 = 1248.
        assert_eq!(
            a.owned,
            vec![(0, 496), (496, 976), (976, 1248), (1248, 1536)]
        );
    }

    #[test]
    fn argmax_takes_the_highest_class_and_refuses_nan() {
        let l = Logits {
            classes: 3,
            width: 2,
            height: 1,
            data: vec![0.0, 5.0, 1.0, 5.0, 2.0, 5.0],
        };
        assert_eq!(l.to_mask().unwrap().data, vec![2, 0]);
        let bad = Logits {
            data: vec![0.0, f32::NAN, 1.0, 0.0, 2.0, 0.0],
            ..l
        };
        assert!(matches!(
            bad.to_mask(),
            Err(TilingError::NotFinite { x: 1, y: 0 })
        ));
    }

    #[test]
    fn grid_rejects_a_tile_that_is_not_a_multiple_of_16() {
        assert!(matches!(
            TileGrid::new(100, 100, 100, 10),
            Err(TilingError::Tile { tile: 100 })
        ));
    }
}
