//! Runs the CUDA kernels' indexing checks without a GPU: `kernels/cuda/emu/test_kernels.cpp` compiles
//! the same `.cu` sources as plain C++20 against a small emulation of the CUDA execution model
//! (`emu.hpp`: threads, barriers, shared memory, warp-wide mma.sync) and compares every convolution
//! kernel (each tile shape, 1×1 and 3×3, fp32 and TF32, all three passes, split-K) with f64 loops,
//! outputs poisoned with NaN. Skips, saying why, when no C++20 compiler (`g++`, or `$CXX`) is found.

use std::path::Path;
use std::process::Command;

#[test]
fn kernels_run_correctly_under_the_cpu_emulation() {
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "g++".into());
    if Command::new(&cxx).arg("--version").output().is_err() {
        println!("skipped: no C++ compiler {cxx:?} to build the CUDA emulation");
        return;
    }
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("cuda/emu/test_kernels.cpp");
    let exe = std::env::temp_dir().join(format!("microfed-emu-{}", std::process::id()));
    let build = Command::new(&cxx)
        .args(["-std=c++20", "-O1", "-pthread", "-o"])
        .arg(&exe)
        .arg(&src)
        .output()
        .expect("running the C++ compiler");
    if !build.status.success() {
        let log = String::from_utf8_lossy(&build.stderr);
        if log.contains("c++20") || log.contains("barrier") {
            println!(
                "skipped: {cxx} lacks C++20 <barrier>: {}",
                log.lines().next().unwrap_or("")
            );
            return;
        }
        panic!("building the emulation failed:\n{log}");
    }
    let run = Command::new(&exe).output().expect("running the emulation");
    let _ = std::fs::remove_file(&exe);
    let out = String::from_utf8_lossy(&run.stdout);
    println!("{out}");
    assert!(
        run.status.success(),
        "emulated kernels disagree with the reference:\n{out}"
    );
    assert!(out.contains("passed: 0 failure(s)"));
}
