//! The CUDA backend: hand-written kernels (`kernels/cuda/*.cu`) compiled at run time by NVRTC for the
//! device's exact architecture and launched through cudarc.
//!
//! Map of this module:
//! - [`CudaBackend`]: opening a device ([`CudaBackend::new`]), buffers, and the [`Backend`] impl.
//! - [`compile`]: NVRTC compilation (CUBIN for `sm_XX`, PTX fallback) and the on-disk kernel cache.
//! - `conv`: tile-shape choice and launches of the implicit-GEMM convolutions.
//! - `ops`: launches of every other op.
//!
//! Its checks are the kernels' test suite (`tests/suite/`, the `cuda::` tests) and its benchmark the
//! `gpu-check` program.
//!
//! One CUDA stream carries all work, in order; so the buffers need no cross-stream events and
//! cudarc's per-buffer event tracking is switched off. Host values (losses, statistics) come back
//! through a synchronous copy. Every length is checked before a launch ([`KernelError::Shape`]), and
//! every element count must fit an `i32` (the kernels index with 32-bit integers, 64-bit for offsets).
//!
//! Precision: [`Precision::Tf32`] uses tensor cores on sm_80 and newer; on older chips (Xavier, sm_72)
//! it runs the fp32 kernels, which is within TF32's tolerance.

pub mod compile;
mod conv;
mod ops;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cudarc::driver::{CudaContext, CudaFunction, CudaSlice, CudaStream, DriverError};
use cudarc::nvrtc::Ptx;

use crate::KernelError;
use crate::backend::{Backend, Conv, OptimStep, Precision, Shape};
use compile::{KernelCache, KernelSource, Target};

/// Threads per block of the elementwise and reduction kernels (`REDUCE_THREADS` in ops.cu).
const THREADS: u32 = 256;

/// An NVIDIA GPU driven by microfed's own kernels.
pub struct CudaBackend {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    /// Compute capability as one number, e.g. 90 for sm_90.
    arch: u32,
    sm_count: u32,
    device_name: String,
    functions: HashMap<String, CudaFunction>,
    /// Scratch memory for split-K partial sums; grows on demand, reused across calls.
    workspace: Mutex<Option<CudaSlice<f32>>>,
}

impl std::fmt::Debug for CudaBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CudaBackend({})", self.name())
    }
}

pub(crate) fn driver_err(context: impl Into<String>) -> impl FnOnce(DriverError) -> KernelError {
    let context = context.into();
    move |e| KernelError::Cuda {
        context,
        message: format!("{e:?}"),
    }
}

impl CudaBackend {
    /// Opens CUDA device `ordinal`, compiles (or loads from the cache) every kernel for its
    /// architecture and loads them. Without a usable driver, NVRTC or device this returns
    /// [`KernelError::CudaUnavailable`] saying which; it never panics.
    pub fn new(ordinal: usize) -> Result<CudaBackend, KernelError> {
        crate::device::driver_present().map_err(KernelError::CudaUnavailable)?;
        compile::nvrtc_present().map_err(KernelError::CudaUnavailable)?;
        let ctx = std::panic::catch_unwind(|| CudaContext::new(ordinal))
            .map_err(|_| {
                KernelError::CudaUnavailable(
                    "the CUDA driver panicked during initialisation".into(),
                )
            })?
            .map_err(|e| {
                KernelError::CudaUnavailable(format!("cannot open CUDA device {ordinal}: {e:?}"))
            })?;
        // SAFETY: all work of this backend goes to the one stream created below, in order, so the
        // per-buffer events that cudarc records to order work across streams are not needed. No
        // buffer has been allocated on this context object yet.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream().map_err(driver_err("cuStreamCreate"))?;
        let (major, minor) = ctx
            .compute_capability()
            .map_err(driver_err("compute capability"))?;
        let arch = (major * 10 + minor) as u32;
        let sm_count = ctx
            .attribute(
                cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
            )
            .map_err(driver_err("multiprocessor count"))? as u32;
        let device_name = ctx.name().unwrap_or_else(|_| "unknown GPU".into());
        let functions = load_all(&ctx, arch)?;
        tracing::info!(
            "CUDA backend ready: {device_name} (sm_{arch}, {sm_count} SMs), {} kernels",
            functions.len()
        );
        Ok(CudaBackend {
            ctx,
            stream,
            arch,
            sm_count,
            device_name,
            functions,
            workspace: Mutex::new(None),
        })
    }

    /// Compute capability as one number (e.g. 90).
    pub fn arch(&self) -> u32 {
        self.arch
    }

    /// Number of streaming multiprocessors.
    pub fn sm_count(&self) -> u32 {
        self.sm_count
    }

    /// Whether [`Precision::Tf32`] really runs on tensor cores here (sm_80 and newer).
    pub fn has_tf32(&self) -> bool {
        self.arch >= 80
    }

    /// The stream all work goes to (for timing with events).
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The context (for events and device queries).
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    pub(crate) fn func(&self, name: &str) -> Result<&CudaFunction, KernelError> {
        self.functions.get(name).ok_or_else(|| KernelError::Cuda {
            context: "kernel lookup".into(),
            message: format!("no kernel named {name} for sm_{}", self.arch),
        })
    }
}

/// Which NVRTC target to build for a device of architecture `arch`: its own CUBIN when this NVRTC
/// knows the architecture; otherwise PTX for the newest architecture it knows below the device's,
/// which the driver then compiles (e.g. an older toolkit on a newer GPU).
fn pick_target(arch: u32) -> Result<Target, KernelError> {
    let supported = compile::supported_archs()?;
    if supported.contains(&arch) {
        return Ok(Target::Cubin(arch));
    }
    supported
        .iter()
        .copied()
        .filter(|&a| a <= arch)
        .max()
        .map(Target::Ptx)
        .ok_or_else(|| {
            KernelError::CudaUnavailable(format!(
                "this NVRTC cannot compile for sm_{arch} or any older architecture (it knows {supported:?})"
            ))
        })
}

/// Compiles (in parallel, one thread per unit) or loads from the cache every unit meant for `arch`,
/// loads the modules and looks up every function in them.
fn load_all(
    ctx: &Arc<CudaContext>,
    arch: u32,
) -> Result<HashMap<String, CudaFunction>, KernelError> {
    let target = pick_target(arch)?;
    let cache = KernelCache::from_env();
    let units: Vec<KernelSource> = compile::SOURCES
        .iter()
        .copied()
        .filter(|s| s.min_arch <= arch)
        .collect();
    let images: Vec<Result<(Vec<u8>, bool), KernelError>> = std::thread::scope(|scope| {
        let handles: Vec<_> = units
            .iter()
            .map(|unit| {
                let cache = &cache;
                scope.spawn(move || cache.get_or_compile(unit, target))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| {
                    Err(KernelError::Cuda {
                        context: "NVRTC".into(),
                        message: "a compile thread panicked".into(),
                    })
                })
            })
            .collect()
    });
    let mut functions = HashMap::new();
    for (unit, image) in units.iter().zip(images) {
        let (bytes, _cached) = image?;
        let module = match load_image(ctx, target, bytes) {
            Ok(m) => m,
            Err(e) if matches!(target, Target::Cubin(_)) => {
                // A CUBIN from a newer NVRTC than the driver can fail to load; PTX goes through the
                // driver's own compiler instead.
                tracing::warn!(
                    "loading the {} CUBIN failed ({e}); falling back to PTX",
                    unit.name
                );
                let (ptx, _) = cache.get_or_compile(unit, Target::Ptx(arch))?;
                load_image(ctx, Target::Ptx(arch), ptx)?
            }
            Err(e) => return Err(e),
        };
        for name in kernel_names(unit) {
            let f = module
                .load_function(&name)
                .map_err(driver_err(format!("cuModuleGetFunction({name})")))?;
            functions.insert(name, f);
        }
    }
    Ok(functions)
}

fn load_image(
    ctx: &Arc<CudaContext>,
    target: Target,
    bytes: Vec<u8>,
) -> Result<Arc<cudarc::driver::CudaModule>, KernelError> {
    let ptx = match target {
        Target::Cubin(_) => Ptx::from_binary(bytes),
        Target::Ptx(_) => Ptx::from_src(String::from_utf8_lossy(&bytes).into_owned()),
    };
    ctx.load_module(ptx).map_err(driver_err(format!(
        "cuModuleLoadData({})",
        target.arch_option()
    )))
}

/// Names of the `extern "C"` kernels in a unit (kept in step with the `.cu` files; the backend
/// looks every one up when it starts, so a mismatch shows at once).
pub fn kernel_names(unit: &KernelSource) -> Vec<String> {
    match unit.name {
        "conv_fp32" => conv::kernel_names(Precision::Fp32),
        "conv_tf32" => conv::kernel_names(Precision::Tf32),
        "ops" => ops::KERNELS.iter().map(|s| s.to_string()).collect(),
        _ => Vec::new(),
    }
}

pub(crate) use crate::backend::expect_len;

/// A count as the kernels' `int`, or a shape error when it does not fit.
pub(crate) fn as_i32(op: &'static str, what: &str, v: usize) -> Result<i32, KernelError> {
    i32::try_from(v).map_err(|_| {
        KernelError::shape(
            op,
            format!("{what} = {v} exceeds the kernels' 32-bit index range"),
        )
    })
}

impl Backend for CudaBackend {
    type Buffer = CudaSlice<f32>;
    type Labels = CudaSlice<u8>;

    fn name(&self) -> String {
        format!("cuda: {} (sm_{})", self.device_name, self.arch)
    }

    fn zeros(&self, len: usize) -> Result<Self::Buffer, KernelError> {
        as_i32("zeros", "length", len)?;
        if len == 0 {
            return self.stream.null().map_err(driver_err("alloc(0)"));
        }
        self.stream
            .alloc_zeros(len)
            .map_err(driver_err(format!("alloc_zeros({len})")))
    }

    fn upload(&self, data: &[f32]) -> Result<Self::Buffer, KernelError> {
        as_i32("upload", "length", data.len())?;
        if data.is_empty() {
            return self.stream.null().map_err(driver_err("alloc(0)"));
        }
        self.stream
            .clone_htod(data)
            .map_err(driver_err(format!("upload of {} floats", data.len())))
    }

    fn download(&self, buf: &Self::Buffer) -> Result<Vec<f32>, KernelError> {
        if buf.is_empty() {
            return Ok(Vec::new());
        }
        self.stream
            .clone_dtoh(buf)
            .map_err(driver_err(format!("download of {} floats", buf.len())))
    }

    fn upload_labels(&self, labels: &[u8]) -> Result<Self::Labels, KernelError> {
        as_i32("upload_labels", "length", labels.len())?;
        if labels.is_empty() {
            return self.stream.null().map_err(driver_err("alloc(0)"));
        }
        self.stream
            .clone_htod(labels)
            .map_err(driver_err(format!("upload of {} labels", labels.len())))
    }

    fn len(&self, buf: &Self::Buffer) -> usize {
        buf.len()
    }

    fn copy(&self, src: &Self::Buffer, dst: &mut Self::Buffer) -> Result<(), KernelError> {
        expect_len("copy", "dst", dst.len(), src.len())?;
        if src.is_empty() {
            return Ok(());
        }
        self.stream
            .memcpy_dtod(src, dst)
            .map_err(driver_err("copy (device to device)"))
    }

    fn fill(&self, buf: &mut Self::Buffer, value: f32) -> Result<(), KernelError> {
        self.launch_fill(buf, value)
    }

    fn synchronize(&self) -> Result<(), KernelError> {
        self.stream
            .synchronize()
            .map_err(driver_err("stream synchronize"))
    }

    fn conv2d_forward(
        &self,
        x: &Self::Buffer,
        xs: Shape,
        conv: Conv,
        w: &Self::Buffer,
        b: &Self::Buffer,
        relu: bool,
        precision: Precision,
        y: &mut Self::Buffer,
    ) -> Result<(), KernelError> {
        self.conv_forward(x, xs, conv, w, b, relu, precision, y)
    }

    fn conv2d_backward_data(
        &self,
        dy: &Self::Buffer,
        xs: Shape,
        conv: Conv,
        w: &Self::Buffer,
        precision: Precision,
        dx: &mut Self::Buffer,
    ) -> Result<(), KernelError> {
        self.conv_backward_data(dy, xs, conv, w, precision, dx)
    }

    fn conv2d_backward_weight(
        &self,
        x: &Self::Buffer,
        xs: Shape,
        conv: Conv,
        dy: &Self::Buffer,
        precision: Precision,
        dw: &mut Self::Buffer,
        db: &mut Self::Buffer,
    ) -> Result<(), KernelError> {
        self.conv_backward_weight(x, xs, conv, dy, precision, dw, db)
    }

    fn relu_backward(&self, y: &Self::Buffer, dy: &mut Self::Buffer) -> Result<(), KernelError> {
        self.launch_relu_backward(y, dy)
    }

    fn maxpool2_forward(
        &self,
        x: &Self::Buffer,
        xs: Shape,
        y: &mut Self::Buffer,
    ) -> Result<(), KernelError> {
        self.launch_maxpool_forward(x, xs, y)
    }

    fn maxpool2_backward(
        &self,
        x: &Self::Buffer,
        xs: Shape,
        dy: &Self::Buffer,
        dx: &mut Self::Buffer,
    ) -> Result<(), KernelError> {
        self.launch_maxpool_backward(x, xs, dy, dx)
    }

    fn upsample2_concat_forward(
        &self,
        low: &Self::Buffer,
        low_shape: Shape,
        skip: &Self::Buffer,
        c_skip: usize,
        y: &mut Self::Buffer,
    ) -> Result<(), KernelError> {
        self.launch_upcat_forward(low, low_shape, skip, c_skip, y)
    }

    fn upsample2_concat_backward(
        &self,
        dy: &Self::Buffer,
        low_shape: Shape,
        c_skip: usize,
        dlow: &mut Self::Buffer,
        dskip: Option<&mut Self::Buffer>,
    ) -> Result<(), KernelError> {
        self.launch_upcat_backward(dy, low_shape, c_skip, dlow, dskip)
    }

    fn channel_affine(
        &self,
        x: &Self::Buffer,
        xs: Shape,
        scale: &[f32],
        shift: &[f32],
        y: &mut Self::Buffer,
    ) -> Result<(), KernelError> {
        self.launch_channel_affine(x, xs, scale, shift, y)
    }

    fn channel_stats(
        &self,
        x: &Self::Buffer,
        xs: Shape,
    ) -> Result<(Vec<f32>, Vec<f32>), KernelError> {
        self.run_channel_stats(x, xs)
    }

    fn axpy(&self, alpha: f32, x: &Self::Buffer, y: &mut Self::Buffer) -> Result<(), KernelError> {
        self.launch_axpy(alpha, x, y)
    }

    fn softmax_cross_entropy(
        &self,
        logits: &Self::Buffer,
        ls: Shape,
        labels: &Self::Labels,
        class_weights: Option<&[f32]>,
        dlogits: &mut Self::Buffer,
    ) -> Result<f32, KernelError> {
        self.run_cross_entropy(logits, ls, labels, class_weights, dlogits)
    }

    fn soft_dice_acc(
        &self,
        logits: &Self::Buffer,
        ls: Shape,
        labels: &Self::Labels,
        weight: f32,
        dlogits: &mut Self::Buffer,
    ) -> Result<f32, KernelError> {
        self.run_soft_dice(logits, ls, labels, weight, dlogits)
    }

    fn optimizer_step(
        &self,
        step: OptimStep,
        param: &mut Self::Buffer,
        grad: &Self::Buffer,
        state: &mut [Self::Buffer],
    ) -> Result<(), KernelError> {
        self.launch_optimizer_step(step, param, grad, state)
    }
}
