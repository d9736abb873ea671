//! Running an ONNX U-Net with tract: a model optimised for one input shape (a tile size and a batch),
//! asked for the logits and, when wanted, the skip features `enc0` … `enc4` as extra outputs.
//!
//! tract optimises a graph for concrete shapes, so a [`Segmenter`] holds one runnable plan per input shape
//! it has seen (tiles are all the same size, so in practice one or two plans).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tract_onnx::prelude::*;

use super::onnx::{self, INPUT_MULTIPLE, OUTPUT};
use crate::mask::Mask;

type Plan = Arc<TypedRunnableModel>;

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
}

impl std::fmt::Debug for Segmenter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Segmenter")
            .field("path", &self.path)
            .field("classes", &self.classes)
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
        })
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
        let plan = self
            .model
            .clone()
            .with_input_fact(0, f32::fact([n, 1, h, w]).into())
            .and_then(|m| m.with_outputs_by_name(names.iter().map(String::as_str)))
            .and_then(|m| m.into_optimized())
            .and_then(|m| m.into_runnable())
            .map_err(err)?;
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
            let sy = crate::train::augment::reflect(y as isize, height);
            for xx in 0..pw {
                x[y * pw + xx] =
                    pixels[sy * width + crate::train::augment::reflect(xx as isize, width)];
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
