//! Whole-network checks on the CPU: U-Net gradients against central differences of the f64
//! reference network, and the decoder-only mode against the full backward.

use microfed_kernels::cpu::CpuBackend;
use microfed_kernels::testing::{self, fresh_seed};
use std::sync::Arc;

#[test]
fn unet_gradients_match_finite_differences() {
    let seed = fresh_seed();
    // Twenty layers of f32 sums and the f32 rounding of the perturbed parameter: 1e-3 relative.
    testing::check_unet_gradients(Arc::new(CpuBackend::new()), 1e-3, seed).unwrap();
}

#[test]
fn decoder_mode_matches_full_backward_and_fedprox() {
    let seed = fresh_seed();
    testing::check_decoder_mode(Arc::new(CpuBackend::new()), 1e-4, seed).unwrap();
}
