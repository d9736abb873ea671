//! Without a GPU, choosing a device must fall back to the CPU and asking for CUDA explicitly must
//! return a typed error, never panic. With a GPU, the same calls must give a working backend.

use microfed_kernels::cuda::CudaBackend;
use microfed_kernels::device::{Device, cuda_status};
use microfed_kernels::{Backend, KernelError};

#[test]
fn auto_and_explicit_cuda_agree_with_the_probe() {
    match cuda_status(0) {
        Err(why) => {
            println!("no usable GPU here ({why}): checking the fallback");
            assert_eq!(Device::auto(), Device::Cpu);
            match CudaBackend::new(0) {
                Err(KernelError::CudaUnavailable(msg)) => {
                    assert!(!msg.is_empty());
                    println!("CudaBackend::new(0): {msg}");
                }
                Err(other) => panic!("expected CudaUnavailable, got {other}"),
                Ok(b) => panic!("the probe said no GPU but the backend opened: {}", b.name()),
            }
        }
        Ok(desc) => {
            println!("GPU present: {desc}");
            assert_eq!(Device::auto(), Device::Cuda(0));
            let b = CudaBackend::new(0).expect("the probe said CUDA device 0 works");
            assert!(b.name().contains("sm_"), "{}", b.name());
            let data: Vec<f32> = (0..1000).map(|i| i as f32 * 0.5 - 7.0).collect();
            let mut buf = b.upload(&data).unwrap();
            assert_eq!(b.download(&buf).unwrap(), data);
            b.fill(&mut buf, 3.25).unwrap();
            assert!(b.download(&buf).unwrap().iter().all(|&v| v == 3.25));
            // A device that does not exist is a typed error too.
            assert!(matches!(
                CudaBackend::new(4096),
                Err(KernelError::CudaUnavailable(_))
            ));
        }
    }
}

#[test]
fn device_names_parse() {
    assert_eq!(Device::parse("cpu").unwrap(), Device::Cpu);
    assert_eq!(Device::parse("CUDA").unwrap(), Device::Cuda(0));
    assert_eq!(Device::parse("cuda:1").unwrap(), Device::Cuda(1));
    assert_eq!("cuda:3".parse::<Device>().unwrap().to_string(), "cuda:3");
    assert!(Device::parse("cuda:x").is_err());
    assert!(Device::parse("tpu").is_err());
    let auto = Device::parse("auto").unwrap();
    assert_eq!(auto.is_cuda(), cuda_status(0).is_ok());
}
