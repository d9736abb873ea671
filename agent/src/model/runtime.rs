//! Running an ONNX U-Net with tract: a model optimised for one input shape (a tile size and a batch),
//! asked for the logits and, when wanted, the skip features `enc0` … `enc4` as extra outputs.
//!
//! tract optimises a graph for concrete shapes, so a [`Segmenter`] holds one runnable plan per input shape
//! it has seen (tiles are all the same size, so in practice one or two plans), and with each plan the
//! states spawned from it, reused batch after batch (tract's `run` would spawn one per call: every op's
//! scratch again on the CPU, a new session on tract-cuda).
//!
//! Where the network runs ([`Engine`]): tract's CPU runtime, or tract's own CUDA runtime (`tract-cuda`:
//! cuDNN convolutions, cuBLAS matrix products, its own kernels for the rest) on a board with a GPU.
//! [`select_engine`] decides once at start from `[model] device` (auto, cpu, cuda) and says why; the
//! choice is made the process's ([`set_process_engine`]), so that every model loaded later — a new
//! global decoder, a fleet model version — runs where the first one did.
//!
//! Which implementation runs it ([`EngineKind`], `[model] engine`): tract, or our own kernels
//! (`microfed-kernels`' CPU backend, or its CUDA backend where tract would run tract-cuda;
//! inference-only network, see [`KernelsNet`]). tract always loads the file and stays the oracle:
//! the kernels engine takes the U-Net's parameters from the ONNX initializers by name and, at load,
//! runs a parity probe against tract's CPU runtime on a random input ([`PROBE_TOLERANCE`]); a model
//! whose graph computes something else (another padding, another resize), or a GPU our backend cannot
//! open, fails the probe and runs on tract, with the reason logged. `auto` uses the kernels when the
//! probe passes and the network runs on the CPU; on a GPU it keeps tract-cuda until the kernels
//! engine's GPU speed is measured (`kernels` asks for our CUDA kernels there).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use serde::{Deserialize, Serialize};
use tract_onnx::prelude::*;
use tract_onnx::tract_core::runtime::{Runnable, Runtime, State, runtime_for_name};

use microfed_kernels::cpu::CpuBackend;
use microfed_kernels::cuda::CudaBackend;
use microfed_kernels::unet::{Params, UNet};
use microfed_kernels::{Backend, KernelError, Shape};

use super::onnx::{self, INPUT_MULTIPLE, OUTPUT};
use crate::mask::Mask;

type Plan = Arc<PlanEntry>;

/// Most spawned states kept idle per plan: one per thread that segments at once (the pipeline runs
/// one batch at a time per model; tests and benches run a few), so their scratch memory is bounded.
const IDLE_STATES: usize = 4;

/// A runnable plan for one input shape and the states spawned from it, kept for the next batch.
///
/// tract's `Runnable::run` spawns a fresh state per call: on the CPU that allocates every op's
/// scratch again, and on tract-cuda it opens a session (descriptors, workspace) per image. A batch
/// takes an idle state (or spawns one), runs on it and gives it back; a state whose run failed is
/// dropped, so a later batch starts clean.
struct PlanEntry {
    runnable: Box<dyn Runnable>,
    idle: Mutex<Vec<Box<dyn State>>>,
}

impl PlanEntry {
    fn new(runnable: Box<dyn Runnable>) -> Self {
        Self {
            runnable,
            idle: Mutex::new(Vec::new()),
        }
    }

    fn run(&self, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let taken = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
        let mut state = match taken {
            Some(state) => state,
            None => self.runnable.spawn()?,
        };
        let out = state.run(inputs)?;
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < IDLE_STATES {
            idle.push(state);
        }
        Ok(out)
    }

    #[cfg(test)]
    fn idle_states(&self) -> usize {
        self.idle.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

/// Where inference should run, as configured (`[model] device`, `--device`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum InferenceDevice {
    /// The GPU through tract-cuda when its libraries load and a device answers, else the CPU.
    #[default]
    Auto,
    Cpu,
    /// The GPU or an error: for a board that must not silently fall back to its CPU.
    Cuda,
}

/// Where inference runs.
#[derive(Debug, Clone, Copy)]
pub enum Engine {
    /// tract's CPU runtime (multithreaded matrix products, see `model.threads`).
    Cpu,
    /// tract's CUDA runtime.
    Cuda(&'static dyn Runtime),
}

impl Engine {
    pub fn name(&self) -> &'static str {
        match self {
            Self::Cpu => "cpu",
            Self::Cuda(_) => "cuda",
        }
    }
}

/// An engine and the reason it was chosen (logged at start).
#[derive(Debug, Clone)]
pub struct EngineChoice {
    pub engine: Engine,
    pub reason: String,
}

/// tract-cuda's runtime when it can run here, or why not. tract-cuda loads libcuda, cudart, cuBLAS,
/// cuDNN and NVRTC at run time and checks the driver first, so this is safe on any machine; a panic
/// inside a probe (a library that loads but misbehaves) is caught and reported as a reason too.
pub fn cuda_runtime() -> Result<&'static dyn Runtime, String> {
    // A reference into the crate links it, and with it the runtime it registers with tract (an
    // unreferenced crate would be dropped by the linker, and "cuda" would silently not exist).
    std::hint::black_box(
        tract_cuda::utils::ensure_cuda_runtime_dependencies as fn(&'static str) -> TractResult<()>,
    );
    let probe = std::panic::catch_unwind(|| {
        // Registered and checked: the check loads the CUDA libraries and validates the driver.
        match runtime_for_name("cuda") {
            Ok(Some(rt)) => Ok(rt),
            Ok(None) => Err("tract-cuda's runtime is not registered in this build".to_string()),
            Err(e) => Err(format!("{e:#}")),
        }
    });
    probe.unwrap_or_else(|_| Err("tract-cuda panicked while probing the GPU".into()))
}

/// Decides where inference runs, once, at start.
pub fn select_engine(requested: InferenceDevice) -> Result<EngineChoice, RuntimeError> {
    match requested {
        InferenceDevice::Cpu => Ok(EngineChoice {
            engine: Engine::Cpu,
            reason: "the configuration asks for the CPU".into(),
        }),
        InferenceDevice::Cuda => match cuda_runtime() {
            Ok(rt) => Ok(EngineChoice {
                engine: Engine::Cuda(rt),
                reason: "the configuration asks for CUDA and tract-cuda found its libraries".into(),
            }),
            Err(why) => Err(RuntimeError::Engine(format!(
                "device = \"cuda\" but tract-cuda cannot run here: {why}"
            ))),
        },
        InferenceDevice::Auto => Ok(match cuda_runtime() {
            Ok(rt) => EngineChoice {
                engine: Engine::Cuda(rt),
                reason: "a CUDA driver, cuBLAS and cuDNN were found (tract-cuda)".into(),
            },
            Err(why) => EngineChoice {
                engine: Engine::Cpu,
                reason: format!("no usable GPU: {why}"),
            },
        }),
    }
}

/// Which implementation runs the reference U-Net (`[model] engine`, `--engine`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum EngineKind {
    /// Our kernels when the model passes the parity probe and the network runs on the CPU; else tract.
    #[default]
    Auto,
    /// tract (CPU or tract-cuda, by `device`).
    Tract,
    /// Our kernels whenever the model passes the parity probe — our CUDA kernels where tract would run
    /// tract-cuda, else the CPU ones; else tract.
    Kernels,
}

static PROCESS_ENGINE_KIND: OnceLock<(EngineKind, usize)> = OnceLock::new();

/// Makes `kind` the engine every later [`Segmenter::load`] of this process asks for, the kernels on
/// `threads` threads (0: rayon's global pool). The first call wins.
pub fn set_process_engine_kind(kind: EngineKind, threads: usize) -> bool {
    PROCESS_ENGINE_KIND.set((kind, threads)).is_ok()
}

/// The process's engine kind and kernel threads: [`EngineKind::Auto`] on rayon's global pool unless
/// [`set_process_engine_kind`] said otherwise.
pub fn process_engine_kind() -> (EngineKind, usize) {
    PROCESS_ENGINE_KIND.get().copied().unwrap_or_default()
}

/// The arithmetic of the kernels engine's convolutions on the GPU (`[model] precision`,
/// `--precision`): fp32, or TF32 on the tensor cores of sm_80 and newer (inputs rounded to a 10-bit
/// mantissa, sums in fp32; older chips run fp32). The CPU always computes in fp32.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    Fp32,
    Tf32,
}

impl Precision {
    pub fn name(self) -> &'static str {
        match self {
            Self::Fp32 => "fp32",
            Self::Tf32 => "tf32",
        }
    }

    /// The parity probe's bound for this precision (a fraction of tract's largest |logit|).
    pub fn probe_tolerance(self) -> f32 {
        match self {
            Self::Fp32 => PROBE_TOLERANCE,
            Self::Tf32 => PROBE_TOLERANCE_TF32,
        }
    }

    fn kernels(self) -> microfed_kernels::Precision {
        match self {
            Self::Fp32 => microfed_kernels::Precision::Fp32,
            Self::Tf32 => microfed_kernels::Precision::Tf32,
        }
    }
}

static PROCESS_PRECISION: OnceLock<Precision> = OnceLock::new();

/// Makes `precision` the one every later kernels engine on the GPU of this process computes in.
/// The first call wins.
pub fn set_process_precision(precision: Precision) -> bool {
    PROCESS_PRECISION.set(precision).is_ok()
}

/// The process's GPU precision: fp32 unless [`set_process_precision`] said otherwise.
pub fn process_precision() -> Precision {
    PROCESS_PRECISION.get().copied().unwrap_or_default()
}

/// The parity probe's bound: the kernels engine's logits must be within this fraction of tract's
/// largest |logit| everywhere.
pub const PROBE_TOLERANCE: f32 = 1e-4;
/// The probe's bound for TF32 on the GPU. TF32 rounds each operand to 11 significant bits (relative
/// error up to 2⁻¹¹ ≈ 4.9e-4); over the U-Net's 23 convolutions, sums of up to 3,456 products each,
/// the logits move by a few 1e-3 of the largest, as PyTorch's TF32 does against its fp32. The bound
/// still fails a model whose graph computes something else (another padding or resize moves the
/// logits by tens of per cent of the largest).
pub const PROBE_TOLERANCE_TF32: f32 = 2e-2;
/// The probe's input: one random image of this size (every level of the U-Net has at least 4×4).
const PROBE_SIZE: (usize, usize) = (64, 80);

/// The reference U-Net on `microfed-kernels`, built for inference only (no gradient or optimiser
/// buffers; the activation workspace of a shape is made once and reused): on the CPU backend, on its
/// own rayon pool when a thread count is given, or on the CUDA backend (our kernels: implicit-GEMM
/// convolutions with bias and ReLU fused, fp32 or TF32 by [`Precision`]). One call at a time (a
/// mutex): calls from several threads queue.
pub struct KernelsNet {
    on: KernelsDevice,
}

enum KernelsDevice {
    Cpu {
        net: Mutex<UNet<CpuBackend>>,
        pool: Option<rayon::ThreadPool>,
        threads: usize,
    },
    Cuda {
        net: Mutex<UNet<CudaBackend>>,
        /// The network's backend (for the transfers around a forward pass).
        cuda: Arc<CudaBackend>,
        ordinal: usize,
    },
}

impl std::fmt::Debug for KernelsNet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.on {
            KernelsDevice::Cpu { threads, .. } => f
                .debug_struct("KernelsNet")
                .field("threads", threads)
                .finish(),
            KernelsDevice::Cuda { ordinal, .. } => {
                f.debug_struct("KernelsNet").field("cuda", ordinal).finish()
            }
        }
    }
}

impl KernelsNet {
    /// Uploads `params`; with `threads` > 0 the network runs on a pool of that many threads, else on
    /// rayon's global pool (every core unless `RAYON_NUM_THREADS` says otherwise).
    pub fn new(params: &Params, threads: usize) -> Result<Self, String> {
        let pool = if threads > 0 && threads != rayon::current_num_threads() {
            Some(
                rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .thread_name(|i| format!("microfed-kernels-{i}"))
                    .build()
                    .map_err(|e| format!("cannot start {threads} kernel threads: {e}"))?,
            )
        } else {
            None
        };
        // The backend reads its thread count from the pool it is made in.
        let build = || {
            let cpu = Arc::new(CpuBackend::new());
            let threads = cpu.threads();
            UNet::for_inference(cpu, params).map(|net| (net, threads))
        };
        let (net, threads) = match &pool {
            Some(p) => p.install(build),
            None => build(),
        }
        .map_err(|e| e.to_string())?;
        Ok(Self {
            on: KernelsDevice::Cpu {
                net: Mutex::new(net),
                pool,
                threads,
            },
        })
    }

    /// Uploads `params` to CUDA device `ordinal` (our kernels compiled by NVRTC for it, or read from
    /// the kernel cache), its convolutions in `precision` (TF32 runs fp32 below sm_80). A driver or
    /// library that panics is reported as an error.
    pub fn on_cuda(params: &Params, ordinal: usize, precision: Precision) -> Result<Self, String> {
        let build = || -> Result<(UNet<CudaBackend>, Arc<CudaBackend>), String> {
            let cuda = Arc::new(CudaBackend::new(ordinal).map_err(|e| e.to_string())?);
            let mut net = UNet::for_inference(cuda.clone(), params).map_err(|e| e.to_string())?;
            net.set_precision(precision.kernels());
            Ok((net, cuda))
        };
        let (net, cuda) = std::panic::catch_unwind(build).map_err(|_| {
            format!("the CUDA backend panicked while loading on device {ordinal}")
        })??;
        Ok(Self {
            on: KernelsDevice::Cuda {
                net: Mutex::new(net),
                cuda,
                ordinal,
            },
        })
    }

    /// Threads the convolutions spread over (0 on the GPU).
    pub fn threads(&self) -> usize {
        match &self.on {
            KernelsDevice::Cpu { threads, .. } => *threads,
            KernelsDevice::Cuda { .. } => 0,
        }
    }

    /// Whether the network runs on the GPU.
    pub fn on_gpu(&self) -> bool {
        matches!(self.on, KernelsDevice::Cuda { .. })
    }

    /// The precision the convolutions really run in: fp32 on the CPU and on GPUs without TF32
    /// tensor cores.
    pub fn precision(&self) -> Precision {
        match &self.on {
            KernelsDevice::Cpu { .. } => Precision::Fp32,
            KernelsDevice::Cuda { net, cuda, .. } => {
                let asked = net.lock().unwrap_or_else(|e| e.into_inner()).precision();
                if asked == microfed_kernels::Precision::Tf32 && cuda.has_tf32() {
                    Precision::Tf32
                } else {
                    Precision::Fp32
                }
            }
        }
    }

    /// The precision for the engine's reason, with why it differs from the process's setting.
    fn precision_note(&self) -> String {
        let runs = self.precision();
        if runs == process_precision() {
            runs.name().to_string()
        } else if self.on_gpu() {
            format!("{}: this GPU has no TF32 tensor cores", runs.name())
        } else {
            format!("{}: the CPU computes in fp32", runs.name())
        }
    }

    /// Logits `[n, K, h, w]` of a batch `[n, 1, h, w]`.
    pub fn logits(&self, input: &[f32], n: usize, h: usize, w: usize) -> Result<Vec<f32>, String> {
        let xs = Shape::new(n, 1, h, w);
        match &self.on {
            KernelsDevice::Cpu { net, pool, .. } => {
                let run = || {
                    let mut net = net.lock().unwrap_or_else(|e| e.into_inner());
                    let x = input.to_vec();
                    net.forward(&x, xs).cloned()
                };
                match pool {
                    Some(p) => p.install(run),
                    None => run(),
                }
                .map_err(|e| e.to_string())
            }
            KernelsDevice::Cuda { net, cuda, .. } => {
                let mut net = net.lock().unwrap_or_else(|e| e.into_inner());
                let mut run = || -> Result<Vec<f32>, KernelError> {
                    let x = cuda.upload(input)?;
                    let logits = net.forward(&x, xs)?;
                    cuda.download(logits)
                };
                run().map_err(|e| e.to_string())
            }
        }
    }

    /// Bytes the network holds (parameters and every workspace made so far; on the GPU, device
    /// memory).
    pub fn memory_bytes(&self) -> usize {
        match &self.on {
            KernelsDevice::Cpu { net, .. } => {
                net.lock().unwrap_or_else(|e| e.into_inner()).device_bytes()
            }
            KernelsDevice::Cuda { net, .. } => {
                net.lock().unwrap_or_else(|e| e.into_inner()).device_bytes()
            }
        }
    }
}

static PROCESS_ENGINE: OnceLock<Engine> = OnceLock::new();

/// Makes `engine` the one every [`Segmenter::load`] of this process uses. The first call wins (the
/// engine is a property of the machine, decided once); later calls return false.
pub fn set_process_engine(engine: Engine) -> bool {
    PROCESS_ENGINE.set(engine).is_ok()
}

/// The process's engine: the CPU unless [`set_process_engine`] said otherwise.
pub fn process_engine() -> Engine {
    PROCESS_ENGINE.get().copied().unwrap_or(Engine::Cpu)
}

/// Rewrites every 2×2, stride-2, unpadded NCHW max-pool of a shape-specialised graph as a reshape
/// `[N, C, H, W] → [N, C, H/2, 2, W/2, 2]`, a max-reduction over the two new axes and a reshape back:
/// the same numbers (max is exact), in ops that tract-cuda runs on the GPU. tract-cuda 0.23.9 has no
/// pooling kernel, so a `MaxPool` left as is runs on the CPU with its input copied device → host and
/// its output back, at each of the U-Net's four levels. Returns how many pools were rewritten; any
/// other pool is left alone.
pub fn max_pools_as_reductions(model: &mut TypedModel) -> TractResult<usize> {
    use tract_onnx::tract_core::internal::{AxisOp, TypedModelPatch};
    use tract_onnx::tract_core::ops::cnn::{MaxPool, PaddingSpec};
    use tract_onnx::tract_core::ops::nn::{DataFormat, Reduce, Reducer};
    let mut rewritten = 0;
    let ids: Vec<usize> = model.eval_order()?;
    for id in ids {
        let node = model.node(id);
        let Some(pool) = node.op_as::<MaxPool>() else {
            continue;
        };
        let spec = &pool.pool_spec;
        let unpadded = match &spec.padding {
            PaddingSpec::Valid => true,
            PaddingSpec::Explicit(b, a) | PaddingSpec::ExplicitOnnxPool(b, a, _) => {
                b.iter().chain(a.iter()).all(|&p| p == 0)
            }
            _ => false,
        };
        let shape = model
            .outlet_fact(node.inputs[0])?
            .shape
            .as_concrete()
            .map(<[usize]>::to_vec);
        let Some(shape) = shape else { continue };
        if pool.with_index_outputs.is_some()
            || spec.data_format != DataFormat::NCHW
            || spec.kernel_shape.as_slice() != [2, 2]
            || spec.strides.as_deref().unwrap_or(&[1, 1]) != [2, 2]
            || spec
                .dilations
                .as_deref()
                .is_some_and(|d| d.iter().any(|&x| x != 1))
            || !unpadded
            || shape.len() != 4
            || shape[2] % 2 != 0
            || shape[3] % 2 != 0
        {
            continue;
        }
        let (h, w) = (shape[2], shape[3]);
        let name = node.name.clone();
        let mut patch = TypedModelPatch::default();
        let x = patch.tap_model(model, node.inputs[0])?;
        let split = patch.wire_node(
            format!("{name}.split"),
            AxisOp::Reshape(
                2,
                tvec![h.into(), w.into()],
                tvec![(h / 2).into(), 2.into(), (w / 2).into(), 2.into()],
            ),
            &[x],
        )?;
        let max = patch.wire_node(
            format!("{name}.max"),
            Reduce {
                axes: tvec![3, 5],
                reducer: Reducer::Max,
            },
            &split,
        )?;
        let merged = patch.wire_node(
            format!("{name}.merge"),
            AxisOp::Reshape(
                2,
                tvec![(h / 2).into(), 1.into(), (w / 2).into(), 1.into()],
                tvec![(h / 2).into(), (w / 2).into()],
            ),
            &max,
        )?;
        patch.shunt_outside(model, id.into(), merged[0])?;
        patch.apply(model)?;
        rewritten += 1;
    }
    Ok(rewritten)
}

/// One output of a run: its shape and its values, flattened row-major.
pub type NamedOutput = (Vec<usize>, Vec<f32>);

/// Errors of loading or running a model; each names the file.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("{path}: {message}")]
    Load { path: PathBuf, message: String },
    #[error("{path}: input [{n}, 1, {h}, {w}]: {message}")]
    Run {
        path: PathBuf,
        n: usize,
        h: usize,
        w: usize,
        message: String,
    },
    #[error("input [{n}, 1, {h}, {w}]: H and W must be positive multiples of {INPUT_MULTIPLE}")]
    Shape { n: usize, h: usize, w: usize },
    #[error("inference engine: {0}")]
    Engine(String),
}

/// What to ask the network for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outputs {
    /// The logits only (segmentation).
    Logits,
    /// The skip features `enc0` … `enc4` only (the encoder, for the feature cache of federated rounds).
    Features,
}

/// A loaded ONNX U-Net, ready to run on batches of normalised images.
pub struct Segmenter {
    path: PathBuf,
    /// The parsed, not yet shape-specialised model; cloned for each new input shape.
    model: InferenceModel,
    plans: Mutex<HashMap<(usize, usize, usize, Outputs), Plan>>,
    classes: usize,
    engine: Engine,
    /// The U-Net's parameters as read from the initializers (None: not the reference U-Net).
    params: Option<Arc<Params>>,
    /// Our kernels, when they run the logits (the probe passed and the engine kind asks for them).
    kernels: Option<KernelsNet>,
    /// Why the logits run where they do (logged at load, shown by `model bench`).
    engine_reason: String,
}

impl std::fmt::Debug for Segmenter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Segmenter")
            .field("path", &self.path)
            .field("classes", &self.classes)
            .field("engine", &self.engine_name())
            .finish()
    }
}

impl Segmenter {
    /// Loads the file and checks the microfed contract first, so that a wrong model is explained rather
    /// than failing inside tract.
    pub fn load(path: &Path) -> Result<Self, RuntimeError> {
        Self::load_with_kind(path, process_engine_kind())
    }

    /// [`Segmenter::load`] with the engine `kind` (and the kernels' thread count) given instead of
    /// the process's: the parity probe runs only when the kind may use the kernels engine.
    pub fn load_with_kind(
        path: &Path,
        (kind, threads): (EngineKind, usize),
    ) -> Result<Self, RuntimeError> {
        let report = onnx::check_contract(path).map_err(|e| RuntimeError::Load {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        let model = tract_onnx::onnx()
            .model_for_path(path)
            .map_err(|e| RuntimeError::Load {
                path: path.to_owned(),
                message: format!("tract cannot parse it: {e:#}"),
            })?;
        let params = onnx::load(path)
            .map_err(|e| e.to_string())
            .and_then(|proto| onnx::load_params(&proto, path).map_err(|e| e.to_string()));
        Ok(Self {
            path: path.to_owned(),
            model,
            plans: Mutex::new(HashMap::new()),
            classes: report.num_classes,
            engine: process_engine(),
            params: None,
            kernels: None,
            engine_reason: String::new(),
        }
        .with_kernels(params, (kind, threads)))
    }

    /// The same model on another engine (plans are made again, lazily); a kernels engine on the CPU
    /// stays, one on the GPU does not move to the CPU with it (tract runs the model there: the
    /// CPU reference of `model bench` is then tract's).
    pub fn on_engine(mut self, engine: Engine) -> Self {
        if matches!(engine, Engine::Cpu) && self.kernels.as_ref().is_some_and(KernelsNet::on_gpu) {
            self.kernels = None;
            self.engine_reason = "moved to the CPU: tract runs the model".into();
        }
        self.engine = engine;
        self.plans = Mutex::new(HashMap::new());
        self
    }

    /// The same model with the engine `kind` chosen again (the probe runs again when the kernels
    /// may be used), the kernels on `threads` threads (0: rayon's global pool).
    pub fn with_engine_kind(mut self, kind: EngineKind, threads: usize) -> Self {
        let params = self
            .params
            .clone()
            .map(|p| (*p).clone())
            .ok_or_else(|| "the model is not the reference U-Net".to_string());
        self.kernels = None;
        self.with_kernels(params, (kind, threads))
    }

    /// Attaches the kernels engine when `kind` asks for it and the probe passes; records why.
    fn with_kernels(
        mut self,
        params: Result<Params, String>,
        (kind, threads): (EngineKind, usize),
    ) -> Self {
        let params = match params {
            Ok(p) => {
                let p = Arc::new(p);
                self.params = Some(p.clone());
                Ok(p)
            }
            Err(e) => Err(e),
        };
        self.engine_reason = match (kind, self.engine, params) {
            (EngineKind::Tract, _, _) => "the configuration asks for tract".into(),
            (EngineKind::Auto, Engine::Cuda(_), _) => {
                "a GPU runs tract-cuda under `auto` (the kernels engine's GPU speed is not measured \
                 yet; `engine = \"kernels\"` runs our CUDA kernels)"
                    .into()
            }
            (_, _, Err(why)) => {
                let why = format!("kernels engine not used, tract runs the model: {why}");
                tracing::warn!(model = %self.path.display(), "{why}");
                why
            }
            (_, engine, Ok(params)) => match self.probe(|| match engine {
                Engine::Cpu => KernelsNet::new(&params, threads),
                // tract-cuda's device: the first one the process sees.
                Engine::Cuda(_) => KernelsNet::on_cuda(&params, 0, process_precision()),
            }) {
                Ok((net, worst, scale)) => {
                    let tolerance = net.precision().probe_tolerance();
                    let reason = format!(
                        "parity probe passed (max |Δ| {worst:.2e} ≤ {tolerance:.0e} × {scale:.3}, {})",
                        net.precision_note()
                    );
                    self.kernels = Some(net);
                    reason
                }
                Err(why) => {
                    let why = format!(
                        "kernels engine not used, tract runs the model: probe failed: {why}"
                    );
                    tracing::warn!(model = %self.path.display(), "{why}");
                    why
                }
            },
        };
        tracing::debug!(model = %self.path.display(), engine = self.engine_name(), reason = %self.engine_reason, "engine");
        self
    }

    /// Builds the kernels network (`make`) and compares its logits with tract's (on the CPU) on one
    /// random image: max |Δ| must be ≤ [`PROBE_TOLERANCE`] × the largest |logit| of tract.
    fn probe(
        &self,
        make: impl FnOnce() -> Result<KernelsNet, String>,
    ) -> Result<(KernelsNet, f32, f32), String> {
        use rand::{Rng, SeedableRng};
        let net = make()?;
        let (h, w) = PROBE_SIZE;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0x5eed);
        let x: Vec<f32> = (0..h * w).map(|_| rng.random_range(-2.0f32..2.0)).collect();
        let want = self
            .tract_cpu_logits(&x, 1, h, w)
            .map_err(|e| format!("tract: {e}"))?;
        let got = net.logits(&x, 1, h, w)?;
        if got.len() != want.len() {
            return Err(format!("{} logits, tract gives {}", got.len(), want.len()));
        }
        let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let worst = got
            .iter()
            .zip(&want)
            .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
        let tolerance = net.precision().probe_tolerance();
        // Negated on purpose: a NaN difference must fail the probe.
        #[allow(clippy::neg_cmp_op_on_partial_ord)]
        if !(worst <= tolerance * scale) {
            return Err(format!(
                "on a random {h}×{w} image the logits ({}) differ from tract's by up to {worst:.3e}, more than {tolerance:.0e} of the largest ({scale:.3e})",
                net.precision_note()
            ));
        }
        Ok((net, worst, scale))
    }

    /// tract's logits on the CPU, from a plan made for this call only (the probe's oracle).
    fn tract_cpu_logits(
        &self,
        input: &[f32],
        n: usize,
        h: usize,
        w: usize,
    ) -> TractResult<Vec<f32>> {
        let plan = self
            .model
            .clone()
            .with_input_fact(0, f32::fact([n, 1, h, w]).into())?
            .with_outputs_by_name([OUTPUT])?
            .into_optimized()?
            .into_runnable()?;
        let tensor = Tensor::from_shape(&[n, 1, h, w], input)?;
        let out = plan.run(tvec!(tensor.into_tvalue()))?;
        Ok(out[0]
            .to_plain_array_view::<f32>()?
            .iter()
            .copied()
            .collect())
    }

    /// Where the logits run: `kernels-cpu`, `kernels-cuda`, `tract-cpu` or `tract-cuda`.
    pub fn engine_name(&self) -> &'static str {
        match (&self.kernels, self.engine) {
            (Some(k), _) if k.on_gpu() => "kernels-cuda",
            (Some(_), _) => "kernels-cpu",
            (None, Engine::Cpu) => "tract-cpu",
            (None, Engine::Cuda(_)) => "tract-cuda",
        }
    }

    /// Why the logits run where they do.
    pub fn engine_reason(&self) -> &str {
        &self.engine_reason
    }

    /// The kernels engine, when it runs the logits.
    pub fn kernels(&self) -> Option<&KernelsNet> {
        self.kernels.as_ref()
    }

    pub fn engine(&self) -> Engine {
        self.engine
    }

    /// Builds from an in-memory protobuf (e.g. after patching a new global decoder in).
    pub fn from_proto(
        proto: &tract_onnx::pb::ModelProto,
        label: &Path,
    ) -> Result<Self, RuntimeError> {
        let model = tract_onnx::onnx()
            .model_for_proto_model(proto)
            .map_err(|e| RuntimeError::Load {
                path: label.to_owned(),
                message: format!("tract cannot parse it: {e:#}"),
            })?;
        let classes = proto
            .graph
            .as_ref()
            .and_then(|g| g.initializer.iter().find(|t| t.name == "decoder.head.bias"))
            .and_then(|t| t.dims.first())
            .map(|&d| d as usize)
            .ok_or_else(|| RuntimeError::Load {
                path: label.to_owned(),
                message: "no decoder.head.bias".into(),
            })?;
        let params = onnx::load_params(proto, label).map_err(|e| e.to_string());
        Ok(Self {
            path: label.to_owned(),
            model,
            plans: Mutex::new(HashMap::new()),
            classes,
            engine: process_engine(),
            params: None,
            kernels: None,
            engine_reason: String::new(),
        }
        .with_kernels(params, process_engine_kind()))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Number of classes K.
    pub fn classes(&self) -> usize {
        self.classes
    }

    fn plan(&self, n: usize, h: usize, w: usize, outputs: Outputs) -> Result<Plan, RuntimeError> {
        if h == 0
            || w == 0
            || n == 0
            || !h.is_multiple_of(INPUT_MULTIPLE)
            || !w.is_multiple_of(INPUT_MULTIPLE)
        {
            return Err(RuntimeError::Shape { n, h, w });
        }
        let key = (n, h, w, outputs);
        if let Some(p) = self
            .plans
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
        {
            return Ok(p.clone());
        }
        let err = |e: TractError| RuntimeError::Run {
            path: self.path.clone(),
            n,
            h,
            w,
            message: format!("{e:#}"),
        };
        let names: Vec<String> = match outputs {
            Outputs::Logits => vec![OUTPUT.to_string()],
            Outputs::Features => (0..5).map(onnx::skip_name).collect(),
        };
        let model = self
            .model
            .clone()
            .with_input_fact(0, f32::fact([n, 1, h, w]).into())
            .and_then(|m| m.with_outputs_by_name(names.iter().map(String::as_str)))
            .map_err(err)?;
        let runnable: Box<dyn Runnable> = match self.engine {
            Engine::Cpu => Box::new(
                model
                    .into_optimized()
                    .and_then(|m| m.into_runnable())
                    .map_err(err)?,
            ),
            // tract-cuda translates the decluttered graph to its GPU ops and optimises it itself.
            Engine::Cuda(rt) => {
                let mut typed = model
                    .into_typed()
                    .and_then(|m| m.into_decluttered())
                    .map_err(err)?;
                // MICROFED_GPU_KEEP_MAXPOOL=1 leaves the pools to tract-cuda's CPU fallback: for
                // the benchmark that measures what the rewrite buys (bench/gpu-inference.sh).
                if std::env::var_os("MICROFED_GPU_KEEP_MAXPOOL").is_none() {
                    let pools = max_pools_as_reductions(&mut typed).map_err(err)?;
                    tracing::debug!(pools, "2x2 max-pools rewritten for the GPU");
                }
                rt.prepare(typed).map_err(err)?
            }
        };
        let plan: Plan = Arc::new(PlanEntry::new(runnable));
        self.plans
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key, plan.clone());
        Ok(plan)
    }

    /// Prepares (optimises) the plan for a batch shape ahead of time, so the first image is not slow.
    /// (The kernels engine needs no plan: its workspace is made on the first batch of a shape.)
    pub fn prepare(
        &self,
        n: usize,
        h: usize,
        w: usize,
        outputs: Outputs,
    ) -> Result<(), RuntimeError> {
        if outputs == Outputs::Logits && self.kernels.is_some() {
            return Ok(());
        }
        self.plan(n, h, w, outputs).map(|_| ())
    }

    /// Runs a batch of normalised images `[n, 1, h, w]` (row-major) and returns the requested outputs,
    /// each flattened NCHW with its shape.
    pub fn run(
        &self,
        input: &[f32],
        n: usize,
        h: usize,
        w: usize,
        outputs: Outputs,
    ) -> Result<Vec<NamedOutput>, RuntimeError> {
        if input.len() != n * h * w {
            return Err(RuntimeError::Run {
                path: self.path.clone(),
                n,
                h,
                w,
                message: format!("input has {} values, expected {}", input.len(), n * h * w),
            });
        }
        if outputs == Outputs::Logits
            && let Some(net) = &self.kernels
        {
            if h == 0
                || w == 0
                || n == 0
                || !h.is_multiple_of(INPUT_MULTIPLE)
                || !w.is_multiple_of(INPUT_MULTIPLE)
            {
                return Err(RuntimeError::Shape { n, h, w });
            }
            let logits = net
                .logits(input, n, h, w)
                .map_err(|message| RuntimeError::Run {
                    path: self.path.clone(),
                    n,
                    h,
                    w,
                    message,
                })?;
            return Ok(vec![(vec![n, self.classes, h, w], logits)]);
        }
        let plan = self.plan(n, h, w, outputs)?;
        let err = |e: TractError| RuntimeError::Run {
            path: self.path.clone(),
            n,
            h,
            w,
            message: format!("{e:#}"),
        };
        let tensor = Tensor::from_shape(&[n, 1, h, w], input).map_err(err)?;
        let result = plan.run(tvec!(tensor.into_tvalue())).map_err(err)?;
        result
            .iter()
            .map(|v| {
                let view = v.to_plain_array_view::<f32>().map_err(err)?;
                Ok((view.shape().to_vec(), view.iter().copied().collect()))
            })
            .collect()
    }

    /// Class per pixel of one whole normalised image of any size: padded on the right and bottom by
    /// reflection to a multiple of 16, run once, cropped back. (Large images go through the agent's
    /// tiling instead.)
    pub fn predict_mask(
        &self,
        pixels: &[f32],
        width: usize,
        height: usize,
    ) -> Result<Mask, RuntimeError> {
        let pw = width.div_ceil(INPUT_MULTIPLE) * INPUT_MULTIPLE;
        let ph = height.div_ceil(INPUT_MULTIPLE) * INPUT_MULTIPLE;
        if pixels.len() != width * height || width == 0 || height == 0 {
            return Err(RuntimeError::Shape {
                n: 1,
                h: height,
                w: width,
            });
        }
        let mut x = vec![0.0f32; pw * ph];
        for y in 0..ph {
            let sy = crate::augment::reflect(y as isize, height);
            for xx in 0..pw {
                x[y * pw + xx] = pixels[sy * width + crate::augment::reflect(xx as isize, width)];
            }
        }
        let logits = self.logits(&x, 1, ph, pw)?;
        let plane = pw * ph;
        let mut labels = Vec::with_capacity(width * height);
        for y in 0..height {
            for xx in 0..width {
                let at = y * pw + xx;
                let mut best = 0;
                for c in 1..self.classes {
                    if logits[c * plane + at] > logits[best * plane + at] {
                        best = c;
                    }
                }
                labels.push(best as u8);
            }
        }
        Ok(Mask::new(width as u32, height as u32, labels))
    }

    /// Logits of a batch, `[n, K, h, w]` flattened.
    pub fn logits(
        &self,
        input: &[f32],
        n: usize,
        h: usize,
        w: usize,
    ) -> Result<Vec<f32>, RuntimeError> {
        let mut out = self.run(input, n, h, w, Outputs::Logits)?;
        Ok(out.remove(0).1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On a machine where tract-cuda cannot run (no driver: this CI), `auto` falls back to the CPU and
    /// says why, and `cuda` is refused with the same reason; where it can run, both pick CUDA. Either
    /// way tract-cuda's runtime must be registered in this build (a probe that reports "not
    /// registered" would mean the GPU path silently vanished from the binary).
    /// The GPU-friendly max-pool is the same function: on the CPU, the rewritten reference U-Net gives
    /// the same logits and skip features (within 1e-5: the optimiser may fuse what follows a pool
    /// differently), and all four pools were rewritten.
    #[test]
    fn max_pools_rewritten_as_reductions_compute_the_same() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/grains/model.onnx");
        let (n, h, w) = (2, 64, 96);
        let names: Vec<String> = std::iter::once(OUTPUT.to_string())
            .chain((0..5).map(onnx::skip_name))
            .collect();
        let typed = tract_onnx::onnx()
            .model_for_path(&path)
            .unwrap()
            .with_input_fact(0, f32::fact([n, 1, h, w]).into())
            .unwrap()
            .with_outputs_by_name(names.iter().map(String::as_str))
            .unwrap()
            .into_typed()
            .unwrap()
            .into_decluttered()
            .unwrap();
        let mut rewritten = typed.clone();
        assert_eq!(max_pools_as_reductions(&mut rewritten).unwrap(), 4);
        assert!(
            rewritten
                .nodes()
                .iter()
                .all(|node| !node.op().name().contains("MaxPool"))
        );
        let input: Vec<f32> = (0..n * h * w)
            .map(|i| ((i * 7919) % 1000) as f32 / 250.0 - 2.0)
            .collect();
        let run = |m: TypedModel| {
            let plan = m.into_optimized().unwrap().into_runnable().unwrap();
            let t = Tensor::from_shape(&[n, 1, h, w], &input).unwrap();
            plan.run(tvec!(t.into_tvalue()))
                .unwrap()
                .iter()
                .map(|v| {
                    v.to_plain_array_view::<f32>()
                        .unwrap()
                        .iter()
                        .copied()
                        .collect::<Vec<f32>>()
                })
                .collect::<Vec<_>>()
        };
        let (a, b) = (run(typed), run(rewritten));
        assert_eq!(a.len(), 6);
        for (i, (x, y)) in a.iter().zip(&b).enumerate() {
            assert_eq!(x.len(), y.len(), "output {i}");
            let worst = x
                .iter()
                .zip(y)
                .map(|(p, q)| (p - q).abs())
                .fold(0.0f32, f32::max);
            assert!(
                worst <= 1e-5,
                "output {i} ({}) differs by {worst}",
                names[i]
            );
        }
    }

    fn repo_root() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
    }

    /// Every shipped model (`models/*/model.onnx`) with its normalisation.
    fn shipped_models() -> Vec<(PathBuf, crate::micrograph::Normalisation)> {
        let mut out = Vec::new();
        let mut dirs: Vec<PathBuf> = std::fs::read_dir(repo_root().join("models"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.join("model.onnx").is_file())
            .collect();
        dirs.sort();
        for d in dirs {
            let manifest =
                crate::model::manifest::ModelManifest::load(&d.join("manifest.toml")).unwrap();
            out.push((d.join("model.onnx"), manifest.normalisation));
        }
        assert!(out.len() >= 3, "shipped models: {out:?}");
        out
    }

    /// nasa-super's folder: MICROFED_NASA_SUPER, else ../shared/data/nasa-super beside the repository.
    fn nasa_super() -> Option<PathBuf> {
        let dir = std::env::var_os("MICROFED_NASA_SUPER")
            .map(PathBuf::from)
            .unwrap_or_else(|| repo_root().join("../shared/data/nasa-super"));
        dir.join("images").is_dir().then_some(dir)
    }

    /// Masks and logits of the two engines on one image, accumulated over a model's images.
    #[derive(Default)]
    struct Agreement {
        pixels: usize,
        same: usize,
        worst_rel: f32,
    }

    impl Agreement {
        fn add(
            &mut self,
            kernels: &Segmenter,
            tract: &Segmenter,
            pixels: &[f32],
            w: usize,
            h: usize,
        ) {
            let a = kernels.predict_mask(pixels, w, h).unwrap();
            let b = tract.predict_mask(pixels, w, h).unwrap();
            self.pixels += w * h;
            self.same += a.data.iter().zip(&b.data).filter(|(x, y)| x == y).count();
            let (pw, ph) = (
                w / INPUT_MULTIPLE * INPUT_MULTIPLE,
                h / INPUT_MULTIPLE * INPUT_MULTIPLE,
            );
            let crop: Vec<f32> = (0..ph)
                .flat_map(|y| pixels[y * w..y * w + pw].iter().copied())
                .collect();
            let la = kernels.logits(&crop, 1, ph, pw).unwrap();
            let lb = tract.logits(&crop, 1, ph, pw).unwrap();
            let scale = lb.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let worst = la
                .iter()
                .zip(&lb)
                .fold(0.0f32, |m, (x, y)| m.max((x - y).abs()));
            self.worst_rel = self.worst_rel.max(worst / scale);
        }
    }

    /// The acceptance test of the kernels engine: for every shipped model, on synthetic images of
    /// every style (the model's own structure) and on nasa-super (a window of each image; skipped,
    /// with the reason printed, when the data set is absent), the masks equal tract's on ≥ 99.99 %
    /// of pixels and the logits are within 1e-4 of the largest. Small images keep it to seconds (it
    /// also runs under qemu for aarch64).
    #[test]
    fn kernels_engine_matches_tract_on_the_first_shipped_model() {
        check_engine_parity(&shipped_models()[..1]);
    }

    /// The other shipped models, one test each (the last takes the rest), so that they run in
    /// parallel: under qemu in cross/check.sh this check is most of the unit tests' time (about
    /// 110 s per model there, one model per test thread).
    #[test]
    fn kernels_engine_matches_tract_on_the_second_shipped_model() {
        check_engine_parity(&shipped_models()[1..2]);
    }

    #[test]
    fn kernels_engine_matches_tract_on_every_later_shipped_model() {
        check_engine_parity(&shipped_models()[2..]);
    }

    fn check_engine_parity(models: &[(PathBuf, crate::micrograph::Normalisation)]) {
        use crate::synth::{Structure, Style, SynthParams, generate};
        let under_qemu = std::env::var_os("MICROFED_UNDER_QEMU").is_some();
        // Every image (synthetic, and the window of each nasa-super one) at this size, a multiple
        // of the model's 16, so the masks and the logits take one tract plan. Under qemu one
        // 128×112 image took 16 s through both engines (NEON emulated): 64×64 there (the generator's
        // smallest), still 4×4 at the deepest level.
        let (win_w, win_h) = if under_qemu { (64, 64) } else { (128, 112) };
        let nasa = nasa_super();
        let nasa_images: Vec<PathBuf> = match &nasa {
            Some(dir) => {
                let mut v: Vec<PathBuf> = std::fs::read_dir(dir.join("images"))
                    .unwrap()
                    .map(|e| e.unwrap().path())
                    .collect();
                v.sort();
                // Under qemu (cross/check.sh) arithmetic is 5-20x slower: 2 images per model keep
                // the aarch64 parity check to minutes.
                if under_qemu {
                    v.truncate(2);
                }
                v
            }
            None => {
                println!(
                    "nasa-super not found (MICROFED_NASA_SUPER or ../shared/data/nasa-super): \
                     its part of the engine parity test is skipped"
                );
                Vec::new()
            }
        };
        for (path, norm) in models {
            // Each engine loaded once with its kind, so the probe (a tract plan of its own) runs
            // once, and every image is one size (below), so tract makes one plan: under qemu
            // making a plan is most of this test's time.
            let kernels = Segmenter::load_with_kind(path, (EngineKind::Kernels, 0))
                .unwrap()
                .on_engine(Engine::Cpu);
            assert_eq!(
                kernels.engine_name(),
                "kernels-cpu",
                "{}: {}",
                path.display(),
                kernels.engine_reason()
            );
            let tract = Segmenter::load_with_kind(path, (EngineKind::Tract, 0))
                .unwrap()
                .on_engine(Engine::Cpu);
            assert_eq!(tract.engine_name(), "tract-cpu");
            let structure = if path.to_string_lossy().contains("precipitates") {
                Structure::Precipitates
            } else {
                Structure::Polycrystal
            };
            let mut synthetic = Agreement::default();
            let styles = if under_qemu { 2 } else { Style::PRESETS.len() };
            for (i, name) in Style::PRESETS.iter().take(styles).enumerate() {
                let params = SynthParams::new(
                    structure,
                    Style::preset(name).unwrap(),
                    win_w as u32,
                    win_h as u32,
                    5,
                )
                .unwrap();
                let sample = generate(&params, i as u64);
                let raw = sample.image.iter().map(|&v| f32::from(v)).collect();
                let (pixels, _) = norm.inputs(raw, 65535.0);
                synthetic.add(&kernels, &tract, &pixels, win_w, win_h);
            }
            let mut real = Agreement::default();
            for img in &nasa_images {
                let m = crate::micrograph::Micrograph::load_with(img, norm).unwrap();
                let (w, h) = (m.width as usize, m.height as usize);
                let (cw, ch) = (w.min(win_w), h.min(win_h));
                let (x0, y0) = ((w - cw) / 2, (h - ch) / 2);
                let window: Vec<f32> = (y0..y0 + ch)
                    .flat_map(|y| m.pixels[y * w + x0..y * w + x0 + cw].iter().copied())
                    .collect();
                real.add(&kernels, &tract, &window, cw, ch);
            }
            for (what, a) in [("synthetic", &synthetic), ("nasa-super", &real)] {
                if a.pixels == 0 {
                    continue;
                }
                let agree = a.same as f64 / a.pixels as f64;
                println!(
                    "{} on {what}: masks agree on {:.4} % of {} pixels, logits within {:.2e} of the largest",
                    path.display(),
                    agree * 100.0,
                    a.pixels,
                    a.worst_rel
                );
                assert!(agree >= 0.9999, "{} on {what}: {agree}", path.display());
                assert!(
                    a.worst_rel <= PROBE_TOLERANCE,
                    "{} on {what}: {}",
                    path.display(),
                    a.worst_rel
                );
            }
        }
    }

    /// The kernels engine on CUDA: without a usable GPU (this machine, CI) opening it is an error that
    /// says why, never a panic; on a machine with one (the device runs) its logits equal the CPU
    /// kernels' within the probe's bound of each precision (fp32, and TF32, which runs fp32 below
    /// sm_80), on an odd-sized batch of two.
    #[test]
    fn the_cuda_kernels_engine_is_an_error_without_a_gpu_and_matches_the_cpu_with_one() {
        let path = repo_root().join("models/grains/model.onnx");
        let proto = onnx::load(&path).unwrap();
        let params = onnx::load_params(&proto, &path).unwrap();
        for precision in [Precision::Fp32, Precision::Tf32] {
            let Some(worst) = cuda_against_cpu(&params, precision) else {
                return;
            };
            println!(
                "{}: max |Δ| {worst:.2e} of the largest logit",
                precision.name()
            );
            assert!(
                worst <= precision.probe_tolerance(),
                "{}: {worst}",
                precision.name()
            );
        }
    }

    /// The largest difference between the CUDA and the CPU kernels' logits, as a fraction of the
    /// largest CPU logit; None (after checking the error says why) where no GPU answers.
    fn cuda_against_cpu(params: &Params, precision: Precision) -> Option<f32> {
        use rand::{Rng, SeedableRng};
        let gpu = match KernelsNet::on_cuda(params, 0, precision) {
            Err(why) => {
                assert!(!why.is_empty());
                println!("no GPU here, as expected on a CPU machine: {why}");
                return None;
            }
            Ok(net) => net,
        };
        assert!(gpu.on_gpu());
        let cpu = KernelsNet::new(params, 0).unwrap();
        let (n, h, w) = (2, 48, 80);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let x: Vec<f32> = (0..n * h * w)
            .map(|_| rng.random_range(-2.0f32..2.0))
            .collect();
        let want = cpu.logits(&x, n, h, w).unwrap();
        let got = gpu.logits(&x, n, h, w).unwrap();
        assert_eq!(got.len(), want.len());
        let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let worst = got
            .iter()
            .zip(&want)
            .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
        Some(worst / scale)
    }

    /// A model whose export differs from the reference U-Net — the first convolution pads by
    /// reflection (an explicit `Pad` node, the conv unpadded) instead of with zeros — keeps the
    /// contract and the initializer names, so the kernels engine could be built; the probe sees the
    /// border differ, and the model runs on tract with the reason recorded, whatever the kind asks.
    #[test]
    fn a_model_that_pads_differently_fails_the_probe_and_stays_on_tract() {
        use tract_onnx::pb::{
            AttributeProto, NodeProto, TensorProto, attribute_proto::AttributeType,
            tensor_proto::DataType,
        };
        let path = repo_root().join("models/grains/model.onnx");
        let mut proto = onnx::load(&path).unwrap();
        let graph = proto.graph.as_mut().unwrap();
        let conv = graph
            .node
            .iter_mut()
            .find(|n| n.name == "encoder.0.conv1")
            .unwrap();
        assert_eq!(conv.input[0], onnx::INPUT);
        conv.input[0] = "image.reflected".into();
        for a in conv.attribute.iter_mut().filter(|a| a.name == "pads") {
            a.ints = vec![0, 0, 0, 0];
        }
        graph.initializer.push(TensorProto {
            name: "const.reflect_pads".into(),
            dims: vec![8],
            data_type: DataType::Int64 as i32,
            int64_data: vec![0, 0, 1, 1, 0, 0, 1, 1],
            ..Default::default()
        });
        graph.node.insert(
            0,
            NodeProto {
                op_type: "Pad".into(),
                name: "image.reflect".into(),
                input: vec![onnx::INPUT.into(), "const.reflect_pads".into()],
                output: vec!["image.reflected".into()],
                attribute: vec![AttributeProto {
                    name: "mode".into(),
                    r#type: AttributeType::String as i32,
                    s: b"reflect".to_vec(),
                    ..Default::default()
                }],
                ..Default::default()
            },
        );
        let dir = tempfile::tempdir().unwrap();
        let odd = dir.path().join("reflect-padded.onnx");
        onnx::save(&proto, &odd).unwrap();
        for kind in [EngineKind::Auto, EngineKind::Kernels] {
            let seg = Segmenter::load(&odd)
                .unwrap()
                .on_engine(Engine::Cpu)
                .with_engine_kind(kind, 0);
            assert_eq!(seg.engine_name(), "tract-cpu", "{kind:?}");
            assert!(seg.kernels().is_none());
            let why = seg.engine_reason();
            assert!(
                why.contains("probe failed") && why.contains("differ from tract"),
                "{kind:?}: {why}"
            );
            // tract runs it: the logits have the right shape and are finite.
            let logits = seg.logits(&vec![0.25; 32 * 48], 1, 32, 48).unwrap();
            assert_eq!(logits.len(), seg.classes() * 32 * 48);
            assert!(logits.iter().all(|v| v.is_finite()));
        }
        // The unchanged model passes the same probe under `auto` (on the CPU).
        let same = Segmenter::load(&path)
            .unwrap()
            .on_engine(Engine::Cpu)
            .with_engine_kind(EngineKind::Auto, 0);
        assert_eq!(
            same.engine_name(),
            "kernels-cpu",
            "{}",
            same.engine_reason()
        );
        assert!(same.engine_reason().contains("parity probe passed"));
    }

    /// tract's plan keeps the states it spawned and runs the next batch on one of them: the logits are
    /// those of a freshly spawned state (tract's own `Runnable::run`) for every batch, in order and
    /// from several threads at once, and the idle states stay bounded.
    #[test]
    fn a_reused_tract_state_gives_what_a_fresh_one_gives() {
        let path = repo_root().join("models/grains/model.onnx");
        let seg = Segmenter::load_with_kind(&path, (EngineKind::Tract, 1))
            .unwrap()
            .on_engine(Engine::Cpu);
        assert_eq!(seg.engine_name(), "tract-cpu");
        let (h, w) = (48, 64);
        let images: Vec<Vec<f32>> = (0..3)
            .map(|k| {
                (0..h * w)
                    .map(|i| ((i * (7 + k) % 23) as f32 / 23.0 - 0.5) * (1.0 + k as f32))
                    .collect()
            })
            .collect();
        let plan = seg.plan(1, h, w, Outputs::Logits).unwrap();
        let fresh = |img: &[f32]| -> Vec<f32> {
            let t = Tensor::from_shape(&[1, 1, h, w], img).unwrap();
            let out = plan.runnable.run(tvec!(t.into_tvalue())).unwrap();
            out[0]
                .to_plain_array_view::<f32>()
                .unwrap()
                .iter()
                .copied()
                .collect()
        };
        let want: Vec<Vec<f32>> = images.iter().map(|i| fresh(i)).collect();
        for round in 0..2 {
            for (img, want) in images.iter().zip(&want) {
                assert_eq!(&seg.logits(img, 1, h, w).unwrap(), want, "round {round}");
            }
        }
        assert_eq!(plan.idle_states(), 1, "sequential batches share one state");
        std::thread::scope(|scope| {
            let runs: Vec<_> = (0..6)
                .map(|t| {
                    let (seg, images) = (&seg, &images);
                    scope.spawn(move || (t % 3, seg.logits(&images[t % 3], 1, h, w).unwrap()))
                })
                .collect();
            for run in runs {
                let (k, got) = run.join().unwrap();
                assert_eq!(got, want[k], "image {k} from a thread");
            }
        });
        assert!((1..=IDLE_STATES).contains(&plan.idle_states()));
    }

    #[test]
    fn engine_choice_follows_what_the_machine_has() {
        match cuda_runtime() {
            Ok(rt) => {
                assert_eq!(rt.name(), "cuda");
                assert!(matches!(
                    select_engine(InferenceDevice::Auto).unwrap().engine,
                    Engine::Cuda(_)
                ));
                assert!(select_engine(InferenceDevice::Cuda).is_ok());
            }
            Err(why) => {
                assert!(!why.contains("not registered"), "{why}");
                let auto = select_engine(InferenceDevice::Auto).unwrap();
                assert!(matches!(auto.engine, Engine::Cpu));
                assert!(auto.reason.contains(&why), "{}", auto.reason);
                let e = select_engine(InferenceDevice::Cuda)
                    .unwrap_err()
                    .to_string();
                assert!(e.contains("device = \"cuda\"") && e.contains(&why), "{e}");
            }
        }
        assert!(matches!(
            select_engine(InferenceDevice::Cpu).unwrap().engine,
            Engine::Cpu
        ));
    }
}
