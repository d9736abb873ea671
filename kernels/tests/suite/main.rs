//! Every CPU op against the f64 reference and finite differences (the bodies live in
//! `microfed_kernels::testing`, shared with the CUDA suite). Fresh random inputs each run; a failure
//! prints its seed.

use microfed_kernels::cpu::CpuBackend;
use microfed_kernels::testing::{self, fresh_seed};

/// f32 arithmetic against f64 references: sums of a few hundred terms stay far inside 1e-4.
const TOL: f32 = 1e-4;

macro_rules! op_test {
    ($name:ident) => {
        #[test]
        fn $name() {
            let b = CpuBackend::new();
            let check = testing::op_checks::<CpuBackend>()
                .into_iter()
                .chain(testing::tf32_checks::<CpuBackend>())
                .find(|(n, _)| *n == stringify!($name))
                .map(|(_, f)| f)
                .expect("check is listed in testing::op_checks");
            let seed = fresh_seed();
            if let Err(e) = check(&b, TOL, seed) {
                panic!("{}: {e}", stringify!($name));
            }
        }
    };
}

op_test!(conv_convention);
op_test!(conv3_forward);
op_test!(conv1_forward);
op_test!(conv3_backward);
op_test!(conv1_backward);
op_test!(conv3_forward_tf32);
op_test!(conv1_forward_tf32);
op_test!(conv3_backward_tf32);
op_test!(conv1_backward_tf32);
op_test!(conv_batch_one);
op_test!(conv_large);
op_test!(relu_backward);
op_test!(maxpool);
op_test!(upsample_concat);
op_test!(cross_entropy);
op_test!(cross_entropy_weighted);
op_test!(soft_dice);
op_test!(channel_affine);
op_test!(channel_stats);
op_test!(axpy);
op_test!(sgd);
op_test!(adamw);
op_test!(shape_errors);

/// The list above covers every check the shared module offers.
#[test]
fn every_shared_check_has_a_test() {
    assert_eq!(testing::op_checks::<CpuBackend>().len(), 19);
    assert_eq!(testing::tf32_checks::<CpuBackend>().len(), 4);
}

/// The runner the CUDA suite uses; TF32 is plain fp32 on the CPU, so the fp32 tolerance holds.
#[test]
fn run_all_with_fresh_seeds() {
    let b = CpuBackend::new();
    testing::run_checks(&b, &testing::op_checks::<CpuBackend>(), TOL).unwrap();
    testing::run_checks(&b, &testing::tf32_checks::<CpuBackend>(), TOL).unwrap();
}
