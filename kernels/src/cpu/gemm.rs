//! A safe, bounds-checked front to the `gemm` crate, plus the scratch memory the convolutions reuse.
//!
//! Map of this module:
//! - [`MatRef`]: a strided read-only matrix view over a slice.
//! - [`matmul`]: `dst (+)= lhs × rhs` for a dense row-major `dst`.
//! - [`with_scratch`] / [`with_weight_scratch`]: per-thread buffers that grow once and are then
//!   reused (im2col columns, Winograd bands; a layer's transformed weights).

use gemm::Parallelism;
use std::cell::RefCell;

/// A `rows × cols` matrix inside `data`: element `(i, j)` is `data[i·rs + j·cs]`.
#[derive(Clone, Copy)]
pub(crate) struct MatRef<'a> {
    pub data: &'a [f32],
    pub rs: usize,
    pub cs: usize,
}

impl<'a> MatRef<'a> {
    /// Row-major with `cols` columns.
    pub fn rows(data: &'a [f32], cols: usize) -> Self {
        Self {
            data,
            rs: cols,
            cs: 1,
        }
    }
    /// The transpose of a row-major matrix with `cols` columns (so the view has `cols` rows).
    pub fn transposed(data: &'a [f32], cols: usize) -> Self {
        Self {
            data,
            rs: 1,
            cs: cols,
        }
    }
    fn fits(&self, rows: usize, cols: usize) -> bool {
        rows == 0 || cols == 0 || (rows - 1) * self.rs + (cols - 1) * self.cs < self.data.len()
    }
}

/// `dst = lhs × rhs` (or `dst += lhs × rhs` when `accumulate`), `dst` row-major `m × n` with row
/// stride `dst_rs` (≥ n: a column block of a wider matrix), `lhs` is `m × k`, `rhs` is `k × n`.
///
/// Callers validate user-facing lengths first; the asserts here guard the `unsafe` call against
/// internal mistakes and cannot be reached from bad input.
#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    dst_rs: usize,
    accumulate: bool,
    lhs: MatRef<'_>,
    rhs: MatRef<'_>,
    parallelism: Parallelism,
) {
    assert!(
        dst_rs >= n && (m == 0 || n == 0 || (m - 1) * dst_rs + n <= dst.len()),
        "matmul: dst too short"
    );
    assert!(lhs.fits(m, k), "matmul: lhs too short");
    assert!(rhs.fits(k, n), "matmul: rhs too short");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            dst.chunks_mut(dst_rs)
                .take(m)
                .for_each(|row| row[..n].fill(0.0));
        }
        return;
    }
    // SAFETY: the asserts above prove that every index the GEMM touches — dst (i·dst_rs + j) for i < m,
    // j < n; lhs (i·rs + l·cs) for l < k; rhs (l·rs + j·cs) — lies inside its slice. `dst` is a unique
    // borrow, so it cannot alias `lhs` or `rhs`. With `read_dst` false gemm ignores alpha and never
    // reads dst (which may hold NaN poison).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            accumulate,
            lhs.data.as_ptr(),
            lhs.cs as isize,
            lhs.rs as isize,
            rhs.data.as_ptr(),
            rhs.cs as isize,
            rhs.rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
}

thread_local! {
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    static WEIGHT_SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` with a per-thread buffer of at least `len` elements (contents unspecified). The buffer
/// is taken out of the thread-local slot for the duration of `f`, so a re-entrant call (rayon may
/// run another task on this thread while `f` waits) gets a fresh buffer instead of a borrow panic.
pub(crate) fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    with_slot(&SCRATCH, len, f)
}

/// [`with_scratch`] from a second per-thread slot, for a layer's transformed weights: they stay
/// borrowed while the band tasks (which may run on this thread) take the first slot.
pub(crate) fn with_weight_scratch<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    with_slot(&WEIGHT_SCRATCH, len, f)
}

fn with_slot<R>(
    slot: &'static std::thread::LocalKey<RefCell<Vec<f32>>>,
    len: usize,
    f: impl FnOnce(&mut [f32]) -> R,
) -> R {
    let mut buf = slot.with(|s| std::mem::take(&mut *s.borrow_mut()));
    if buf.len() < len {
        buf.resize(len, 0.0);
    }
    let r = f(&mut buf[..len]);
    slot.with(|s| {
        let mut slot = s.borrow_mut();
        if slot.len() < buf.len() {
            *slot = buf;
        }
    });
    r
}
