//! Which backend trains: the one choice, from `auto`, `cpu`, `cuda` or `cuda:N`, for every command
//! that trains (pretraining, the federated participant, experiments).
//!
//! Training code is generic over [`Backend`]; a caller wraps its work in an [`OnBackend`] job and
//! [`on_backend`] runs it on the backend the name picks (`auto`: CUDA device 0 when usable, else the
//! CPU, with the reason logged by [`Device::auto`]).

use std::sync::Arc;

use microfed_kernels::cpu::CpuBackend;
use microfed_kernels::cuda::CudaBackend;
use microfed_kernels::device::{Device, DeviceParseError};
use microfed_kernels::{Backend, KernelError};

/// Work to run on whichever backend was chosen.
pub trait OnBackend {
    type Output;
    fn run<B: Backend + 'static>(self, backend: Arc<B>) -> Self::Output;
}

/// Why no backend could be opened.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error(transparent)]
    Name(#[from] DeviceParseError),
    #[error("opening CUDA device {device}: {source}")]
    Cuda {
        device: usize,
        #[source]
        source: KernelError,
    },
}

/// Opens the backend `device` names and runs `job` on it.
pub fn on_backend<J: OnBackend>(device: &str, job: J) -> Result<J::Output, BackendError> {
    match Device::parse(device)? {
        Device::Cpu => Ok(job.run(Arc::new(CpuBackend::new()))),
        Device::Cuda(n) => {
            let backend =
                CudaBackend::new(n).map_err(|source| BackendError::Cuda { device: n, source })?;
            Ok(job.run(Arc::new(backend)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Name;
    impl OnBackend for Name {
        type Output = &'static str;
        fn run<B: Backend + 'static>(self, _: Arc<B>) -> &'static str {
            std::any::type_name::<B>()
        }
    }

    #[test]
    fn cpu_runs_on_the_cpu_backend_and_bad_names_are_refused() {
        assert!(on_backend("cpu", Name).unwrap().contains("CpuBackend"));
        let e = on_backend("tpu", Name).unwrap_err();
        assert!(e.to_string().contains("tpu"), "{e}");
    }
}
