//! Run-time compilation of the `.cu` kernel sources with NVRTC, and the on-disk cache of the results.
//!
//! Map of this module:
//! - [`SOURCES`]: the compilation units: the kernel sources (`kernels/cuda/*.cu`, embedded with
//!   `include_str!`), each compiled with `common.cu` in front ([`KernelSource::full_text`]); `conv.cu`
//!   is compiled twice (fp32 and TF32 kernels) so that the two halves compile in parallel.
//! - [`nvrtc_present`], [`nvrtc_version`], [`supported_archs`]: what the NVRTC library found at run time
//!   can do. Probing never panics, even when no NVRTC library is installed.
//! - [`compile`]: one source for one architecture, to a CUBIN (`sm_XX`, the device's exact machine
//!   code) or to PTX (`compute_XX`, compiled by the driver at load time). Errors carry NVRTC's log.
//! - [`KernelCache`]: `<dir>/<source>-<target>-<sha256 prefix>.{cubin,ptx}`, the key covering the source
//!   text, the target, the NVRTC version and the options, so a second start does not recompile and a
//!   changed kernel or toolkit never loads stale code. The directory is `$MICROFED_KERNEL_CACHE`, else
//!   `$XDG_CACHE_HOME/microfed/kernels`, else `~/.cache/microfed/kernels`.
//!
//! Why CUBIN first: NVRTC from a newer toolkit emits PTX of a newer ISA version than an older driver
//! accepts (`CUDA_ERROR_UNSUPPORTED_PTX_VERSION`); machine code for the exact architecture sidesteps
//! the driver's PTX compiler. The backend falls back to PTX when a CUBIN does not load.

use std::ffi::{CStr, CString, c_char};
use std::path::{Path, PathBuf};

use cudarc::nvrtc::{result as nvrtc_result, sys as nvrtc_sys};
use sha2::{Digest, Sha256};

use crate::KernelError;

/// One compilation unit: a kernel source file plus the macros it is compiled with.
#[derive(Debug, Clone, Copy)]
pub struct KernelSource {
    /// Name of the unit, e.g. `conv_tf32` (names the cache file and the messages).
    pub name: &'static str,
    /// File name, e.g. `conv.cu` (NVRTC uses it in its diagnostics).
    pub file: &'static str,
    /// The file's text, without the common prelude.
    pub text: &'static str,
    /// `-D` options for this unit.
    pub defines: &'static [&'static str],
    /// Oldest architecture the unit is meant for (e.g. 80 for the TF32 tensor-core kernels).
    pub min_arch: u32,
}

impl KernelSource {
    /// The text NVRTC compiles: `common.cu`, then this file.
    pub fn full_text(&self) -> String {
        format!("{COMMON}\n#line 1 \"{}\"\n{}", self.file, self.text)
    }
}

/// Helpers every kernel source uses (prepended, since NVRTC is given no include files).
pub const COMMON: &str = include_str!("../../cuda/common.cu");
const CONV_TEXT: &str = include_str!("../../cuda/conv.cu");

/// The fp32 (FFMA) convolution kernels.
pub const CONV_FP32: KernelSource = KernelSource {
    name: "conv_fp32",
    file: "conv.cu",
    text: CONV_TEXT,
    defines: &["-DMF_CONV_FP32"],
    min_arch: 0,
};

/// The TF32 tensor-core convolution kernels (mma.sync needs sm_80).
pub const CONV_TF32: KernelSource = KernelSource {
    name: "conv_tf32",
    file: "conv.cu",
    text: CONV_TEXT,
    defines: &["-DMF_CONV_TF32"],
    min_arch: 80,
};

/// Every other op.
pub const OPS: KernelSource = KernelSource {
    name: "ops",
    file: "ops.cu",
    text: include_str!("../../cuda/ops.cu"),
    defines: &[],
    min_arch: 0,
};

/// All compilation units. They are independent, so callers compile them in parallel.
pub const SOURCES: [KernelSource; 3] = [CONV_FP32, CONV_TF32, OPS];

/// Options passed to NVRTC besides the architecture. Part of the cache key.
pub const OPTIONS: &[&str] = &["--std=c++17", "--fmad=true"];

/// What NVRTC produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Target {
    /// Machine code for exactly this architecture (`sm_XX`).
    Cubin(u32),
    /// PTX for this virtual architecture (`compute_XX`); the driver compiles it when loading.
    Ptx(u32),
}

impl Target {
    /// The value of NVRTC's `--gpu-architecture`.
    pub fn arch_option(&self) -> String {
        match self {
            Self::Cubin(a) => format!("sm_{a}"),
            Self::Ptx(a) => format!("compute_{a}"),
        }
    }
    fn extension(&self) -> &'static str {
        match self {
            Self::Cubin(_) => "cubin",
            Self::Ptx(_) => "ptx",
        }
    }
}

/// Whether an NVRTC shared library can be loaded, and if not, why. Never panics.
pub fn nvrtc_present() -> Result<(), String> {
    // SAFETY: `is_culib_present` only tries `dlopen` on a list of library names and drops what it
    // opened; it has no preconditions. The catch_unwind is a guard in case a future version panics.
    match std::panic::catch_unwind(|| unsafe { nvrtc_sys::is_culib_present() }) {
        Ok(true) => Ok(()),
        Ok(false) => Err(format!(
            "no NVRTC library found (tried {:?}; set LD_LIBRARY_PATH to the directory holding libnvrtc)",
            nvrtc_candidates()
        )),
        Err(_) => Err("probing for the NVRTC library panicked".into()),
    }
}

/// File names cudarc's loader tries for NVRTC, in order.
pub fn nvrtc_candidates() -> Vec<String> {
    cudarc::get_lib_name_candidates("nvrtc")
}

/// NVRTC's (major, minor) version. Call [`nvrtc_present`] first.
pub fn nvrtc_version() -> Result<(i32, i32), KernelError> {
    nvrtc_present().map_err(KernelError::CudaUnavailable)?;
    let (mut major, mut minor) = (0, 0);
    // SAFETY: the library is present (checked above), and both pointers are valid for one write.
    let rc = unsafe { nvrtc_sys::nvrtcVersion(&mut major, &mut minor) };
    nvrtc_check(rc, "nvrtcVersion")?;
    Ok((major, minor))
}

/// The real architectures (e.g. 75, 80, 86, 87, 89, 90) this NVRTC can compile for.
pub fn supported_archs() -> Result<Vec<u32>, KernelError> {
    nvrtc_present().map_err(KernelError::CudaUnavailable)?;
    let mut n: std::ffi::c_int = 0;
    // SAFETY: the library is present; `n` is valid for one write.
    nvrtc_check(
        unsafe { nvrtc_sys::nvrtcGetNumSupportedArchs(&mut n) },
        "nvrtcGetNumSupportedArchs",
    )?;
    let mut archs = vec![0 as std::ffi::c_int; n.max(0) as usize];
    // SAFETY: `archs` holds exactly the number of entries NVRTC just reported.
    nvrtc_check(
        unsafe { nvrtc_sys::nvrtcGetSupportedArchs(archs.as_mut_ptr()) },
        "nvrtcGetSupportedArchs",
    )?;
    Ok(archs.into_iter().map(|a| a as u32).collect())
}

fn nvrtc_check(rc: nvrtc_sys::nvrtcResult, what: &str) -> Result<(), KernelError> {
    rc.result().map_err(|e| KernelError::Cuda {
        context: what.to_string(),
        message: format!("{e:?}"),
    })
}

/// Compiles `source` for `target`. Returns the CUBIN bytes or the NUL-free PTX text as bytes.
pub fn compile(source: &KernelSource, target: Target) -> Result<Vec<u8>, KernelError> {
    nvrtc_present().map_err(KernelError::CudaUnavailable)?;
    let text = CString::new(source.full_text()).map_err(|_| KernelError::Compile {
        source_name: source.name.into(),
        arch: target.arch_option(),
        log: "source contains a NUL byte".into(),
    })?;
    let name = CString::new(source.file).expect("file names are literals without NUL");
    let prog = nvrtc_result::create_program(&text, Some(&name)).map_err(|e| KernelError::Cuda {
        context: format!("nvrtcCreateProgram({})", source.name),
        message: format!("{e:?}"),
    })?;
    let mut options: Vec<String> = vec![format!("--gpu-architecture={}", target.arch_option())];
    options.extend(OPTIONS.iter().map(|s| s.to_string()));
    options.extend(source.defines.iter().map(|s| s.to_string()));
    // SAFETY: `prog` was just created and is destroyed only below; `text` and `name` outlive it.
    let compiled = unsafe { nvrtc_result::compile_program(prog, &options) };
    let result = match compiled {
        Err(e) => {
            // SAFETY: `prog` is alive; the log is a NUL-terminated string NVRTC wrote.
            let log = unsafe { nvrtc_result::get_program_log(prog) }
                .map(|raw| c_chars_to_string(&raw))
                .unwrap_or_else(|le| format!("(no log: {le:?})"));
            Err(KernelError::Compile {
                source_name: source.name.into(),
                arch: target.arch_option(),
                log: format!("{e:?}: {log}"),
            })
        }
        Ok(()) => match target {
            // SAFETY: `prog` compiled successfully and is alive.
            Target::Cubin(_) => unsafe { get_cubin(prog) },
            // SAFETY: as above.
            Target::Ptx(_) => unsafe { nvrtc_result::get_ptx(prog) }
                .map(|raw| c_chars_to_string(&raw).into_bytes())
                .map_err(|e| KernelError::Cuda {
                    context: format!("nvrtcGetPTX({})", source.name),
                    message: format!("{e:?}"),
                }),
        },
    };
    // SAFETY: `prog` is alive and not used after this.
    if let Err(e) = unsafe { nvrtc_result::destroy_program(prog) } {
        tracing::warn!("nvrtcDestroyProgram failed: {e:?}");
    }
    result
}

/// # Safety
/// `prog` must be a live program that compiled successfully for a real (`sm_XX`) architecture.
unsafe fn get_cubin(prog: nvrtc_sys::nvrtcProgram) -> Result<Vec<u8>, KernelError> {
    let mut size = 0usize;
    // SAFETY: guaranteed by the caller; `size` is valid for one write.
    nvrtc_check(
        unsafe { nvrtc_sys::nvrtcGetCUBINSize(prog, &mut size) },
        "nvrtcGetCUBINSize",
    )?;
    let mut bytes = vec![0u8; size];
    // SAFETY: `bytes` holds exactly the size NVRTC reported.
    nvrtc_check(
        unsafe { nvrtc_sys::nvrtcGetCUBIN(prog, bytes.as_mut_ptr() as *mut c_char) },
        "nvrtcGetCUBIN",
    )?;
    if bytes.is_empty() {
        return Err(KernelError::Cuda {
            context: "nvrtcGetCUBIN".into(),
            message: "NVRTC returned an empty CUBIN".into(),
        });
    }
    Ok(bytes)
}

fn c_chars_to_string(raw: &[c_char]) -> String {
    let bytes: Vec<u8> = raw.iter().map(|&c| c as u8).collect();
    match CStr::from_bytes_until_nul(&bytes) {
        Ok(s) => s.to_string_lossy().into_owned(),
        Err(_) => String::from_utf8_lossy(&bytes).into_owned(),
    }
}

/// The on-disk cache of compiled kernels. `dir == None` disables it (nothing is read or written).
#[derive(Debug, Clone)]
pub struct KernelCache {
    pub dir: Option<PathBuf>,
}

impl KernelCache {
    /// The cache at its default place (see the module docs).
    pub fn from_env() -> Self {
        let dir = std::env::var_os("MICROFED_KERNEL_CACHE")
            .map(PathBuf::from)
            .or_else(|| {
                std::env::var_os("XDG_CACHE_HOME")
                    .map(|d| PathBuf::from(d).join("microfed").join("kernels"))
            })
            .or_else(|| {
                std::env::var_os("HOME").map(|h| {
                    PathBuf::from(h)
                        .join(".cache")
                        .join("microfed")
                        .join("kernels")
                })
            });
        Self { dir }
    }

    /// Where `source` compiled for `target` by NVRTC `version` is (or would be) stored.
    pub fn path_for(
        &self,
        source: &KernelSource,
        target: Target,
        version: (i32, i32),
    ) -> Option<PathBuf> {
        let dir = self.dir.as_ref()?;
        let mut h = Sha256::new();
        h.update(source.full_text().as_bytes());
        h.update(b"\0");
        h.update(target.arch_option().as_bytes());
        h.update(format!("\0nvrtc {}.{}\0", version.0, version.1).as_bytes());
        for o in OPTIONS.iter().chain(source.defines) {
            h.update(o.as_bytes());
            h.update(b"\0");
        }
        let digest = hex::encode(h.finalize());
        Some(dir.join(format!(
            "{}-{}-{}.{}",
            source.name,
            target.arch_option(),
            &digest[..24],
            target.extension()
        )))
    }

    /// The cached image, or a fresh compile (then stored). Returns the bytes and whether they came
    /// from the cache. A cache that cannot be read or written only costs a recompile (logged).
    pub fn get_or_compile(
        &self,
        source: &KernelSource,
        target: Target,
    ) -> Result<(Vec<u8>, bool), KernelError> {
        let version = nvrtc_version()?;
        let path = self.path_for(source, target, version);
        if let Some(p) = &path
            && let Ok(bytes) = std::fs::read(p)
            && !bytes.is_empty()
        {
            tracing::debug!("kernel cache hit: {}", p.display());
            return Ok((bytes, true));
        }
        let started = std::time::Instant::now();
        let bytes = compile(source, target)?;
        tracing::info!(
            "compiled {} for {} with NVRTC {}.{} in {:.2} s",
            source.name,
            target.arch_option(),
            version.0,
            version.1,
            started.elapsed().as_secs_f64()
        );
        if let Some(p) = &path
            && let Err(e) = store(p, &bytes)
        {
            tracing::warn!("could not write the kernel cache {}: {e}", p.display());
        }
        Ok((bytes, false))
    }
}

/// Writes `bytes` to `path` atomically (a temporary file in the same directory, then a rename), so a
/// concurrent reader never sees half a file.
fn store(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        path.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        std::process::id()
    ));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}
