//! "The CUDA code compiles": every kernel unit through NVRTC for Jetson Xavier (sm_72), Jetson Orin
//! (sm_87) and Hopper (sm_90), to machine code (CUBIN), so that ptxas also checks the inline PTX
//! (mma.sync, cp.async). Needs only the NVRTC shared library, no GPU and no driver.
//!
//! Skips (saying why) when no libnvrtc can be loaded. CUDA 13's NVRTC no longer targets sm_72, and
//! CUDA 12's does; the test compiles for each of the three architectures the loaded NVRTC knows and
//! reports the others. `MICROFED_REQUIRE_ARCHS=72` (or `87,90`) compiles exactly those and turns a
//! missing one into a failure, so CI can run it once per NVRTC: see `tests/run.sh`.

use std::time::Instant;

use microfed_kernels::cuda::compile::{
    self, KernelCache, SOURCES, Target, nvrtc_present, nvrtc_version, supported_archs,
};
use microfed_kernels::cuda::kernel_names;

const ARCHS: [u32; 3] = [72, 87, 90];

fn required_archs() -> Vec<u32> {
    std::env::var("MICROFED_REQUIRE_ARCHS")
        .ok()
        .map(|s| {
            s.split(',')
                .filter_map(|a| a.trim().trim_start_matches("sm_").parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn every_kernel_compiles_for_xavier_orin_and_hopper() {
    if let Err(why) = nvrtc_present() {
        println!("skipped: {why}");
        assert!(
            required_archs().is_empty(),
            "MICROFED_REQUIRE_ARCHS is set but NVRTC cannot be loaded: {why}"
        );
        return;
    }
    let version = nvrtc_version().expect("nvrtcVersion");
    let supported = supported_archs().expect("nvrtcGetSupportedArchs");
    println!("NVRTC {}.{} supports {supported:?}", version.0, version.1);
    for a in required_archs() {
        assert!(
            supported.contains(&a),
            "sm_{a} is required (MICROFED_REQUIRE_ARCHS) but NVRTC {}.{} cannot target it",
            version.0,
            version.1
        );
    }
    // With MICROFED_REQUIRE_ARCHS set, exactly those; otherwise every one of ARCHS NVRTC knows.
    let required = required_archs();
    let archs: Vec<u32> = if required.is_empty() {
        ARCHS.to_vec()
    } else {
        required
    };
    let jobs: Vec<_> = archs
        .iter()
        .filter(|a| {
            let ok = supported.contains(a);
            if !ok {
                println!(
                    "sm_{a}: not checked, NVRTC {}.{} does not target it",
                    version.0, version.1
                );
            }
            ok
        })
        .flat_map(|&a| {
            SOURCES
                .iter()
                .filter(move |s| s.min_arch <= a)
                .map(move |s| (*s, a))
        })
        .collect();
    assert!(!jobs.is_empty(), "no architecture left to check");
    // Compile in parallel: the units are independent and NVRTC is thread-safe.
    let results: Vec<_> = std::thread::scope(|scope| {
        let handles: Vec<_> = jobs
            .iter()
            .map(|&(unit, arch)| {
                scope.spawn(move || {
                    let t0 = Instant::now();
                    let r = compile::compile(&unit, Target::Cubin(arch));
                    (unit, arch, r, t0.elapsed())
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut failures = Vec::new();
    for (unit, arch, result, took) in results {
        match result {
            Ok(cubin) => {
                // The ELF symbol table names every kernel the backend will look up.
                let missing: Vec<String> = kernel_names(&unit)
                    .into_iter()
                    .filter(|name| {
                        !cubin
                            .windows(name.len() + 1)
                            .any(|w| &w[..name.len()] == name.as_bytes() && w[name.len()] == 0)
                    })
                    .collect();
                println!(
                    "{} sm_{arch}: {} bytes in {:.1} s",
                    unit.name,
                    cubin.len(),
                    took.as_secs_f64()
                );
                if !missing.is_empty() {
                    failures.push(format!(
                        "{} sm_{arch}: kernels missing: {missing:?}",
                        unit.name
                    ));
                }
            }
            Err(e) => failures.push(format!("{} sm_{arch}: {e}", unit.name)),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn a_second_start_reads_the_kernel_cache() {
    if let Err(why) = nvrtc_present() {
        println!("skipped: {why}");
        return;
    }
    let supported = supported_archs().expect("nvrtcGetSupportedArchs");
    let arch = *supported
        .iter()
        .max()
        .expect("NVRTC supports some architecture");
    let dir = std::env::temp_dir().join(format!("microfed-kernel-cache-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let cache = KernelCache {
        dir: Some(dir.clone()),
    };
    let ops = SOURCES.iter().find(|s| s.name == "ops").unwrap();
    let (first, cached1) = cache.get_or_compile(ops, Target::Cubin(arch)).unwrap();
    let (second, cached2) = cache.get_or_compile(ops, Target::Cubin(arch)).unwrap();
    assert!(
        !cached1 && cached2,
        "first compiles, second reads the cache"
    );
    assert_eq!(first, second);
    // A different target has a different key.
    let version = nvrtc_version().unwrap();
    assert_ne!(
        cache.path_for(ops, Target::Cubin(arch), version),
        cache.path_for(ops, Target::Ptx(arch), version)
    );
    let _ = std::fs::remove_dir_all(&dir);
}
