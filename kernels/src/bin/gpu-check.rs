//! `gpu-check`: run on a machine with an NVIDIA GPU. Checks every CUDA op against the CPU backend on
//! fresh random inputs (seed printed; `MICROFED_SEED` repeats a run), then times the U-Net decoder
//! fine-tune step (batch 16 × 256², fp32 and TF32) and each of its convolution passes. Prints markdown
//! tables and a JSON report, also written to `--out PATH` (default `$OUT/gpu-check.json` when `OUT` is
//! set). Exit code 0: all parity checks passed; 1: a check failed; 2: no usable GPU.
//! Built and run by `kernels/gpu-check.sh`; the work itself is [`microfed_kernels::cuda::check`].

use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let mut out = std::env::var_os("OUT").map(|d| PathBuf::from(d).join("gpu-check.json"));
    while let Some(a) = args.next() {
        match a.as_str() {
            "--out" => out = args.next().map(PathBuf::from),
            "-h" | "--help" => {
                println!("usage: gpu-check [--out PATH]   (MICROFED_SEED=N to repeat a run)");
                return ExitCode::SUCCESS;
            }
            other => {
                eprintln!("gpu-check: unknown argument {other:?} (try --help)");
                return ExitCode::from(2);
            }
        }
    }
    let reference = microfed_kernels::cpu::CpuBackend::new();
    microfed_kernels::cuda::check::gpu_check_main(reference, out)
}
