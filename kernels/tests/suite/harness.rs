//! How the suite runs one body on every backend, the way candle's `test_device!` and burn's
//! backend-tests do: [`backend_tests!`] writes each body once and instantiates it as `cpu::NAME` and
//! `cuda::NAME`.
//!
//! Map of this module:
//! - [`backend_tests!`]: the macro; a body sees `b: &Arc<B>` (the backend under test) and `tol:`
//!   [`Tol`] (its tolerances), and returns a `Result` whose error says what disagreed and the seed.
//! - [`cpu`] and [`cuda`]: the backends. `cuda()` opens device 0 once per process; where no usable GPU
//!   is found it returns `None` and the test passes as skipped, the reason printed once on stderr (and
//!   per test with `--nocapture`). `MICROFED_REQUIRE_CUDA=1` turns a missing GPU into a failure
//!   instead, for the GPU machine.
//! - [`seed`]: fresh inputs per run, `MICROFED_SEED` to replay one.

use std::io::Write;
use std::sync::{Arc, OnceLock};

use microfed_kernels::Backend;
use microfed_kernels::cpu::CpuBackend;
use microfed_kernels::cuda::CudaBackend;

/// Tolerances of one backend, relative as in [`crate::checks::compare`].
#[derive(Debug, Clone, Copy)]
pub struct Tol {
    /// fp32 arithmetic against an f64 reference: sums of a few hundred terms stay far inside 1e-4.
    pub fp32: f32,
    /// Convolutions in [`microfed_kernels::Precision::Tf32`]: fp32 on the CPU (so fp32's tolerance);
    /// on tensor cores the operands keep 10 mantissa bits (rounding 2⁻¹¹ ≈ 5e-4 each), and the
    /// worst of a few hundred elements lands a few times above that.
    pub tf32: f32,
}

impl Tol {
    pub const CPU: Tol = Tol {
        fp32: 1e-4,
        tf32: 1e-4,
    };
    pub const CUDA: Tol = Tol {
        fp32: 1e-4,
        tf32: 1e-2,
    };
}

/// The reference backend.
pub fn cpu() -> Arc<CpuBackend> {
    Arc::new(CpuBackend::new())
}

/// CUDA device 0, opened once and shared by every `cuda::` test (its kernels compile or load from
/// the cache once); `None`, with the reason printed, where no usable GPU is present.
pub fn cuda() -> Option<&'static Arc<CudaBackend>> {
    static GPU: OnceLock<Result<Arc<CudaBackend>, String>> = OnceLock::new();
    let gpu = GPU.get_or_init(|| {
        let opened = CudaBackend::new(0).map(Arc::new).map_err(|e| e.to_string());
        // Straight to stderr, past the test harness's capture: said once per run, not per test.
        let _ = match &opened {
            Ok(g) => writeln!(std::io::stderr(), "cuda:: tests run on {}", g.name()),
            Err(why) => writeln!(std::io::stderr(), "cuda:: tests skipped: {why}"),
        };
        opened
    });
    match gpu {
        Ok(g) => Some(g),
        Err(why) if std::env::var_os("MICROFED_REQUIRE_CUDA").is_some() => {
            panic!("MICROFED_REQUIRE_CUDA is set, but CUDA device 0 is not usable: {why}")
        }
        Err(why) => {
            println!("skipped: {why}");
            None
        }
    }
}

/// A seed from `MICROFED_SEED`, else from the clock, so each run draws fresh inputs (failures name
/// the seed for replay).
pub fn seed() -> u64 {
    if let Some(s) = std::env::var("MICROFED_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        return s;
    }
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0x5eed)
}

/// Fails the test with the body's error, prefixed by the backend's name.
pub fn pass<B: Backend, E: std::fmt::Display>(b: &B, outcome: Result<(), E>) {
    if let Err(e) = outcome {
        panic!("on {}: {e}", b.name());
    }
}

/// `backend_tests! { fn NAME(b, tol) { BODY } ... }` writes `cpu::NAME` and `cuda::NAME`, each a
/// `#[test]` running `BODY` with `b: &Arc<B>` bound to that backend and `tol` to its [`Tol`].
macro_rules! backend_tests {
    ($(fn $name:ident($b:ident, $tol:ident) $body:block)*) => {
        mod cpu {
            #[allow(unused_imports)]
            use super::*;
            $(
                #[test]
                #[allow(unused_variables)]
                fn $name() {
                    let $b = &$crate::harness::cpu();
                    let $tol = $crate::harness::Tol::CPU;
                    $crate::harness::pass(&**$b, $body);
                }
            )*
        }
        mod cuda {
            #[allow(unused_imports)]
            use super::*;
            $(
                #[test]
                #[allow(unused_variables)]
                fn $name() {
                    let Some($b) = $crate::harness::cuda() else {
                        return;
                    };
                    let $tol = $crate::harness::Tol::CUDA;
                    $crate::harness::pass(&**$b, $body);
                }
            )*
        }
    };
}
