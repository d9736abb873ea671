//! The kernels' one test suite: every body is written once, generic over [`Backend`], and run on the
//! CPU (`cpu::NAME`) and on CUDA (`cuda::NAME`, skipped with the reason printed where no GPU is
//! usable). Fresh random inputs each run; a failure prints its seed (`MICROFED_SEED` replays it).
//!
//! Map of the suite:
//! - `harness`: the [`backend_tests!`] macro, the two backends, tolerances and seeds.
//! - `checks`: each op against an f64 reference and finite differences, the optimisers against
//!   PyTorch's rules and their step contract, the whole U-Net's gradients and decoder-only mode.
//! - `parity`: every op against the CPU oracle on shapes that hit each CUDA tile (the old
//!   `gpu-check` parity suite).
//! - `learn`: the whole U-Net learns a small synthetic segmentation task.
//!
//! On a GPU machine without Rust, run the prebuilt binary: `kernels/gpu-check.sh build` here, then
//! `kernels/gpu-check.sh run` there (it runs this suite with `MICROFED_REQUIRE_CUDA=1`, then the
//! benchmark).

#[macro_use]
mod harness;
mod checks;
mod learn;
mod parity;

use checks::*;
use harness::seed;

backend_tests! {
    fn conv_convention(b, tol) { check_conv_convention(&**b, tol.fp32, seed()) }
    fn conv3_forward(b, tol) { check_conv3_forward(&**b, tol.fp32, seed()) }
    fn conv1_forward(b, tol) { check_conv1_forward(&**b, tol.fp32, seed()) }
    fn conv3_backward(b, tol) { check_conv3_backward(&**b, tol.fp32, seed()) }
    fn conv1_backward(b, tol) { check_conv1_backward(&**b, tol.fp32, seed()) }
    fn conv3_forward_tf32(b, tol) { check_conv3_forward_tf32(&**b, tol.tf32, seed()) }
    fn conv1_forward_tf32(b, tol) { check_conv1_forward_tf32(&**b, tol.tf32, seed()) }
    fn conv3_backward_tf32(b, tol) { check_conv3_backward_tf32(&**b, tol.tf32, seed()) }
    fn conv1_backward_tf32(b, tol) { check_conv1_backward_tf32(&**b, tol.tf32, seed()) }
    fn conv_batch_one(b, tol) { check_conv_batch_one(&**b, tol.fp32, seed()) }
    fn conv_large(b, tol) { check_conv_large(&**b, tol.fp32, seed()) }
    fn relu_backward(b, tol) { check_relu_backward(&**b, tol.fp32, seed()) }
    fn maxpool(b, tol) { check_maxpool(&**b, tol.fp32, seed()) }
    fn upsample_concat(b, tol) { check_upsample_concat(&**b, tol.fp32, seed()) }
    fn upsample_concat_conv(b, tol) { check_upsample_concat_conv(&**b, tol.fp32, seed()) }
    fn cross_entropy(b, tol) { check_cross_entropy(&**b, tol.fp32, seed()) }
    fn cross_entropy_weighted(b, tol) { check_cross_entropy_weighted(&**b, tol.fp32, seed()) }
    fn soft_dice(b, tol) { check_soft_dice(&**b, tol.fp32, seed()) }
    fn channel_affine(b, tol) { check_channel_affine(&**b, tol.fp32, seed()) }
    fn channel_stats(b, tol) { check_channel_stats(&**b, tol.fp32, seed()) }
    fn axpy(b, tol) { check_axpy(&**b, tol.fp32, seed()) }
    fn sgd(b, tol) { check_sgd(&**b, tol.fp32, seed()) }
    fn adamw(b, tol) { check_adamw(&**b, tol.fp32, seed()) }
    fn optimizer_step_counts_from_one(b, tol) { check_step_zero(&**b, tol.fp32, seed()) }
    fn shape_errors(b, tol) { check_shape_errors(&**b, tol.fp32, seed()) }

    // Whole network. Twenty layers of f32 sums and the f32 rounding of the perturbed parameter: 1e-3
    // relative for the sampled gradients (the networks run in fp32 on every backend).
    fn unet_gradients_match_finite_differences(b, tol) {
        check_unet_gradients(b.clone(), 1e-3, seed())
    }
    fn decoder_mode_matches_full_backward_and_fedprox(b, tol) {
        check_decoder_mode(b.clone(), tol.fp32, seed())
    }
    fn inference_only_network_matches_and_is_smaller(b, tol) {
        check_inference_only(b.clone(), tol.fp32, seed())
    }
    fn unet_learns_synthetic_micrographs(b, tol) {
        learn::unet_learns_synthetic_micrographs(b.clone())
    }

    // Every op against the CPU oracle, on shapes that hit each CUDA tile.
    fn matches_the_cpu_oracle(b, tol) { parity::matches_the_cpu_oracle(&**b, seed()) }
}
