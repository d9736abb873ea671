//! Which device trains the network: the CPU, or an NVIDIA GPU through the CUDA driver.
//!
//! Map of this module:
//! - [`Device`]: `Cpu` or `Cuda(ordinal)`; [`Device::parse`] reads `auto`, `cpu`, `cuda`, `cuda:N`.
//! - [`Device::auto`]: CUDA device 0 when it is usable, else the CPU, logging (info) why not.
//! - [`cuda_status`]: the probe behind it, returning the reason as text.
//!
//! cudarc loads `libcuda` and `libnvrtc` lazily and *panics* inside its first call when a library is
//! missing, so the probe asks `is_culib_present()` first (it only tries `dlopen`), and wraps the first
//! real driver call in `catch_unwind` as a second guard. After that, a missing or broken device comes
//! back as an ordinary driver error.

use std::fmt;
use std::str::FromStr;

/// A compute device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Device {
    /// The CPU backend (always available).
    Cpu,
    /// The CUDA device with this ordinal.
    Cuda(usize),
}

/// A device name that is none of `auto`, `cpu`, `cuda`, `cuda:N`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown device {0:?}: expected auto, cpu, cuda or cuda:N (N = 0, 1, ...)")]
pub struct DeviceParseError(pub String);

impl Device {
    /// CUDA device 0 if a driver, NVRTC and a device are all usable; otherwise the CPU. Says why at
    /// info level either way.
    pub fn auto() -> Device {
        match cuda_status(0) {
            Ok(desc) => {
                tracing::info!("device: using CUDA device 0 ({desc})");
                Device::Cuda(0)
            }
            Err(why) => {
                tracing::info!("device: using the CPU because CUDA is not usable: {why}");
                Device::Cpu
            }
        }
    }

    /// Parses `auto` (resolved now with [`Device::auto`]), `cpu`, `cuda` (device 0) or `cuda:N`.
    /// Asking for CUDA explicitly does not probe it: opening the backend reports what is missing.
    pub fn parse(s: &str) -> Result<Device, DeviceParseError> {
        let t = s.trim().to_ascii_lowercase();
        match t.as_str() {
            "auto" => Ok(Device::auto()),
            "cpu" => Ok(Device::Cpu),
            "cuda" | "gpu" => Ok(Device::Cuda(0)),
            _ => t
                .strip_prefix("cuda:")
                .and_then(|n| n.parse::<usize>().ok())
                .map(Device::Cuda)
                .ok_or_else(|| DeviceParseError(s.to_string())),
        }
    }

    pub fn is_cuda(&self) -> bool {
        matches!(self, Device::Cuda(_))
    }
}

impl FromStr for Device {
    type Err = DeviceParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Device::parse(s)
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => write!(f, "cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// Whether the CUDA driver library can be loaded, and if not, why. Never panics.
pub fn driver_present() -> Result<(), String> {
    // SAFETY: `is_culib_present` only tries `dlopen` on cudarc's list of library names and drops
    // what it opened; it has no preconditions. catch_unwind guards against a panic inside it.
    match std::panic::catch_unwind(|| unsafe { cudarc::driver::sys::is_culib_present() }) {
        Ok(true) => Ok(()),
        Ok(false) => Err(format!(
            "the CUDA driver library is not installed or not on the loader path (tried {:?})",
            cudarc::get_lib_name_candidates("cuda")
        )),
        Err(_) => Err("probing for the CUDA driver library panicked".into()),
    }
}

/// Probes CUDA device `ordinal`: driver library, NVRTC library, device count, context creation.
/// Returns a short description of the device (name and architecture) or the reason it is unusable.
pub fn cuda_status(ordinal: usize) -> Result<String, String> {
    driver_present()?;
    crate::cuda::compile::nvrtc_present()?;
    let probe = std::panic::catch_unwind(|| -> Result<String, String> {
        let count = cudarc::driver::CudaContext::device_count()
            .map_err(|e| format!("the CUDA driver failed to initialise: {e:?}"))?;
        if count <= 0 {
            return Err("the CUDA driver sees no device".into());
        }
        if ordinal >= count as usize {
            return Err(format!(
                "CUDA device {ordinal} does not exist ({count} visible)"
            ));
        }
        let ctx = cudarc::driver::CudaContext::new(ordinal)
            .map_err(|e| format!("cannot open CUDA device {ordinal}: {e:?}"))?;
        let name = ctx.name().unwrap_or_else(|_| "unknown GPU".into());
        let (major, minor) = ctx
            .compute_capability()
            .map_err(|e| format!("cannot read the compute capability: {e:?}"))?;
        Ok(format!("{name}, sm_{major}{minor}"))
    });
    match probe {
        Ok(r) => r,
        Err(_) => Err("the CUDA driver panicked during initialisation".into()),
    }
}
