//! Running an ONNX U-Net with tract: a model optimised for one input shape (a tile size and a batch),
//! asked for the logits and, when wanted, the skip features `enc0` … `enc4` as extra outputs.
//!
//! tract optimises a graph for concrete shapes, so a [`Segmenter`] holds one runnable plan per input shape
//! it has seen (tiles are all the same size, so in practice one or two plans).
//!
//! Where the network runs ([`Engine`]): tract's CPU runtime, or tract's own CUDA runtime (`tract-cuda`:
//! cuDNN convolutions, cuBLAS matrix products, its own kernels for the rest) on a board with a GPU.
//! [`select_engine`] decides once at start from `[model] device` (auto, cpu, cuda) and says why; the
//! choice is made the process's ([`set_process_engine`]), so that every model loaded later — a new
//! global decoder, a fleet model version — runs where the first one did.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use serde::{Deserialize, Serialize};
use tract_onnx::prelude::*;
use tract_onnx::tract_core::runtime::{Runnable, Runtime, runtime_for_name};

use super::onnx::{self, INPUT_MULTIPLE, OUTPUT};
use crate::mask::Mask;

type Plan = Arc<dyn Runnable>;

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
}

impl std::fmt::Debug for Segmenter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Segmenter")
            .field("path", &self.path)
            .field("classes", &self.classes)
            .field("engine", &self.engine.name())
            .finish()
    }
}

impl Segmenter {
    /// Loads the file and checks the microfed contract first, so that a wrong model is explained rather
    /// than failing inside tract.
    pub fn load(path: &Path) -> Result<Self, RuntimeError> {
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
        Ok(Self {
            path: path.to_owned(),
            model,
            plans: Mutex::new(HashMap::new()),
            classes: report.num_classes,
            engine: process_engine(),
        })
    }

    /// The same model on another engine (plans are made again, lazily).
    pub fn on_engine(mut self, engine: Engine) -> Self {
        self.engine = engine;
        self.plans = Mutex::new(HashMap::new());
        self
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
        Ok(Self {
            path: label.to_owned(),
            model,
            plans: Mutex::new(HashMap::new()),
            classes,
            engine: process_engine(),
        })
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
        let plan: Plan = match self.engine {
            Engine::Cpu => Arc::new(
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
                Arc::from(rt.prepare(typed).map_err(err)?)
            }
        };
        self.plans
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key, plan.clone());
        Ok(plan)
    }

    /// Prepares (optimises) the plan for a batch shape ahead of time, so the first image is not slow.
    pub fn prepare(
        &self,
        n: usize,
        h: usize,
        w: usize,
        outputs: Outputs,
    ) -> Result<(), RuntimeError> {
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
