//! Every CUDA op against the CPU oracle on fresh random inputs (odd sizes, NaN-poisoned outputs):
//! fp32 within 1e-4 relative error, TF32 convolutions within 3e-3. Skips, saying why, without a GPU.

use microfed_kernels::Backend;
use microfed_kernels::cpu::CpuBackend;
use microfed_kernels::cuda::CudaBackend;
use microfed_kernels::cuda::check::parity_suite;

#[test]
fn cuda_matches_the_cpu_backend() {
    let gpu = match CudaBackend::new(0) {
        Ok(g) => g,
        Err(e) => {
            println!("skipped: {e}");
            return;
        }
    };
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1);
    println!("{} vs cpu, seed {seed}", gpu.name());
    let cases = parity_suite(&CpuBackend::new(), &gpu, seed).expect("parity suite ran");
    let failed: Vec<_> = cases.iter().filter(|c| !c.ok).collect();
    for c in &failed {
        println!(
            "FAIL {} [{}]: {:.2e} > {:.0e}",
            c.op, c.detail, c.rel_err, c.tol
        );
    }
    assert!(
        failed.is_empty(),
        "{} of {} parity checks failed (seed {seed})",
        failed.len(),
        cases.len()
    );
}
