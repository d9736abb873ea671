//! The reference U-Net as an ONNX file, written by our own code from the protobuf types that tract-onnx
//! generates with prost, and the contract any ONNX U-Net must meet to be used by microfed.
//!
//! Map of this module:
//! - [`export`]: parameters → `ModelProto` (opset 17): input `image` `[N,1,H,W]`, output `logits`
//!   `[N,K,H,W]`, the skip features named `enc0` … `enc4` (so tract can be asked for them as outputs),
//!   decoder weights named `decoder.*` (so an update can patch them in place), batch, H and W dynamic.
//! - [`check_contract`]: reads an ONNX file and explains every way it differs from the contract, so a user
//!   can bring a U-Net exported from PyTorch.
//! - [`patch_initializers`]: replaces named weights in a `ModelProto` (a new global decoder).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use prost::Message;
use tract_onnx::pb::{
    self, AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, TensorProto,
    TensorShapeProto, TypeProto, ValueInfoProto, attribute_proto::AttributeType,
    tensor_proto::DataType, tensor_shape_proto, type_proto,
};

use microfed_kernels::unet::{CHANNELS, Params, layer_specs};

/// The ONNX operator set our files use.
pub const OPSET: i64 = 17;
/// ONNX IR version that goes with opset 17.
const IR_VERSION: i64 = 8;
/// Name of the network's input.
pub const INPUT: &str = "image";
/// Name of the network's output.
pub const OUTPUT: &str = "logits";
/// H and W must be multiples of this (four 2× poolings).
pub const INPUT_MULTIPLE: usize = 16;

/// Errors of export, parsing and the contract; each names the file or tensor.
#[derive(Debug, thiserror::Error)]
pub enum OnnxError {
    #[error("{path}: cannot read: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: cannot write: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not an ONNX protobuf: {message}")]
    Decode { path: PathBuf, message: String },
    #[error("parameter {name}: {problem}")]
    Param { name: String, problem: String },
    #[error("{path}: does not meet the microfed U-Net contract:\n  - {}", problems.join("\n  - "))]
    Contract {
        path: PathBuf,
        problems: Vec<String>,
    },
}

/// Name of the tensor holding skip feature `i` (the output of encoder stage `i`).
pub fn skip_name(i: usize) -> String {
    format!("enc{i}")
}

fn attr_ints(name: &str, ints: &[i64]) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: AttributeType::Ints as i32,
        ints: ints.to_vec(),
        ..Default::default()
    }
}
fn attr_int(name: &str, i: i64) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: AttributeType::Int as i32,
        i,
        ..Default::default()
    }
}
fn attr_string(name: &str, s: &str) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: AttributeType::String as i32,
        s: s.as_bytes().to_vec(),
        ..Default::default()
    }
}

fn node(
    op: &str,
    name: &str,
    inputs: &[&str],
    outputs: &[&str],
    attribute: Vec<AttributeProto>,
) -> NodeProto {
    NodeProto {
        op_type: op.into(),
        name: name.into(),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: outputs.iter().map(|s| s.to_string()).collect(),
        attribute,
        ..Default::default()
    }
}

fn f32_tensor(name: &str, dims: &[usize], data: &[f32]) -> TensorProto {
    let mut raw = Vec::with_capacity(data.len() * 4);
    for v in data {
        raw.extend_from_slice(&v.to_le_bytes());
    }
    TensorProto {
        name: name.into(),
        dims: dims.iter().map(|&d| d as i64).collect(),
        data_type: DataType::Float as i32,
        raw_data: raw,
        ..Default::default()
    }
}

/// A 4-D float value with symbolic batch, height and width (and a fixed channel count).
fn value_info(name: &str, channels: usize) -> ValueInfoProto {
    let dim = |v: tensor_shape_proto::dimension::Value| tensor_shape_proto::Dimension {
        value: Some(v),
        ..Default::default()
    };
    use tensor_shape_proto::dimension::Value::{DimParam, DimValue};
    let shape = TensorShapeProto {
        dim: vec![
            dim(DimParam("N".into())),
            dim(DimValue(channels as i64)),
            dim(DimParam("H".into())),
            dim(DimParam("W".into())),
        ],
    };
    ValueInfoProto {
        name: name.into(),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: DataType::Float as i32,
                shape: Some(shape),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Metadata stored in the ONNX file (`metadata_props`), e.g. model name and version.
pub type Metadata = Vec<(String, String)>;

/// Accumulates nodes and initializers while the graph is written in topological order.
struct GraphBuilder<'a> {
    params: &'a Params,
    nodes: Vec<NodeProto>,
    initializers: Vec<TensorProto>,
}

impl GraphBuilder<'_> {
    fn weight(&mut self, name: String) -> Result<String, OnnxError> {
        let t = self.params.get(&name).ok_or_else(|| OnnxError::Param {
            name: name.clone(),
            problem: "missing from the parameter set".into(),
        })?;
        self.initializers.push(f32_tensor(&name, &t.shape, &t.data));
        Ok(name)
    }

    /// A convolution (3×3 pad 1, or 1×1) named after its parameter prefix, then ReLU when asked.
    fn conv(
        &mut self,
        prefix: &str,
        input: &str,
        output: &str,
        kernel: i64,
        relu: bool,
    ) -> Result<(), OnnxError> {
        let w = self.weight(format!("{prefix}.weight"))?;
        let b = self.weight(format!("{prefix}.bias"))?;
        let pad = kernel / 2;
        let conv_out = if relu {
            format!("{prefix}.out")
        } else {
            output.to_string()
        };
        self.nodes.push(node(
            "Conv",
            prefix,
            &[input, &w, &b],
            &[&conv_out],
            vec![
                attr_ints("kernel_shape", &[kernel, kernel]),
                attr_ints("pads", &[pad, pad, pad, pad]),
                attr_ints("strides", &[1, 1]),
            ],
        ));
        if relu {
            self.nodes.push(node(
                "Relu",
                &format!("{prefix}.relu"),
                &[&conv_out],
                &[output],
                vec![],
            ));
        }
        Ok(())
    }

    /// Two 3×3 conv + ReLU, the body of every encoder and decoder stage.
    fn stage(&mut self, prefix: &str, input: &str, output: &str) -> Result<(), OnnxError> {
        let mid = format!("{prefix}.conv1.act");
        self.conv(&format!("{prefix}.conv1"), input, &mid, 3, true)?;
        self.conv(&format!("{prefix}.conv2"), &mid, output, 3, true)
    }
}

/// Builds the ONNX model of the reference U-Net with the given parameters.
pub fn export(params: &Params, metadata: &Metadata) -> Result<ModelProto, OnnxError> {
    params.validate().map_err(|e| OnnxError::Param {
        name: "parameters".into(),
        problem: e.to_string(),
    })?;
    let k = params.classes;
    let mut g = GraphBuilder {
        params,
        nodes: Vec::new(),
        initializers: Vec::new(),
    };

    // Encoder: stage i (after a 2×2 max-pool for i > 0) produces the skip feature `enc{i}`.
    let mut x = INPUT.to_string();
    for i in 0..CHANNELS.len() {
        if i > 0 {
            let pooled = format!("encoder.{i}.pool");
            g.nodes.push(node(
                "MaxPool",
                &pooled,
                &[&x],
                &[&pooled],
                vec![
                    attr_ints("kernel_shape", &[2, 2]),
                    attr_ints("strides", &[2, 2]),
                ],
            ));
            x = pooled;
        }
        g.stage(&format!("encoder.{i}"), &x, &skip_name(i))?;
        x = skip_name(i);
    }

    // Decoder: nearest ×2 (asymmetric + floor is exactly pixel replication), concat with the skip.
    g.initializers.push(f32_tensor(
        "const.upsample_scales",
        &[4],
        &[1.0, 1.0, 2.0, 2.0],
    ));
    for j in (0..CHANNELS.len() - 1).rev() {
        let up = format!("decoder.{j}.up");
        g.nodes.push(node(
            "Resize",
            &up,
            &[&x, "", "const.upsample_scales"],
            &[&up],
            vec![
                attr_string("mode", "nearest"),
                attr_string("coordinate_transformation_mode", "asymmetric"),
                attr_string("nearest_mode", "floor"),
            ],
        ));
        let cat = format!("decoder.{j}.concat");
        g.nodes.push(node(
            "Concat",
            &cat,
            &[&up, &skip_name(j)],
            &[&cat],
            vec![attr_int("axis", 1)],
        ));
        let out = format!("dec{j}");
        g.stage(&format!("decoder.{j}"), &cat, &out)?;
        x = out;
    }
    g.conv("decoder.head", &x, OUTPUT, 1, false)?;
    let GraphBuilder {
        nodes,
        initializers,
        ..
    } = g;

    let graph = GraphProto {
        name: "microfed-unet".into(),
        node: nodes,
        initializer: initializers,
        input: vec![value_info(INPUT, 1)],
        output: vec![value_info(OUTPUT, k)],
        doc_string: "Reference U-Net of microfed: encoder 16/32/64/128/256, nearest x2 + concat decoder, 1x1 head. \
                     Input normalised as the manifest says; H and W multiples of 16."
            .into(),
        ..Default::default()
    };
    Ok(ModelProto {
        ir_version: IR_VERSION,
        opset_import: vec![OperatorSetIdProto {
            domain: String::new(),
            version: OPSET,
        }],
        producer_name: "microfed".into(),
        producer_version: env!("CARGO_PKG_VERSION").into(),
        graph: Some(graph),
        metadata_props: metadata
            .iter()
            .map(|(key, value)| pb::StringStringEntryProto {
                key: key.clone(),
                value: value.clone(),
            })
            .collect(),
        ..Default::default()
    })
}

/// Serialises a model to bytes.
pub fn to_bytes(model: &ModelProto) -> Vec<u8> {
    model.encode_to_vec()
}

/// Writes a model to `path` atomically (temporary file, then rename).
pub fn save(model: &ModelProto, path: &Path) -> Result<(), OnnxError> {
    let tmp = path.with_extension("onnx.tmp");
    std::fs::write(&tmp, to_bytes(model))
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|source| OnnxError::Write {
            path: path.to_owned(),
            source,
        })
}

/// Reads an ONNX file into its protobuf form.
pub fn load(path: &Path) -> Result<ModelProto, OnnxError> {
    let bytes = std::fs::read(path).map_err(|source| OnnxError::Read {
        path: path.to_owned(),
        source,
    })?;
    ModelProto::decode(bytes.as_slice()).map_err(|e| OnnxError::Decode {
        path: path.to_owned(),
        message: e.to_string(),
    })
}

/// Reads an initializer as `f32`s (raw little-endian or `float_data`).
pub fn initializer_f32(t: &TensorProto) -> Option<Vec<f32>> {
    if t.data_type != DataType::Float as i32 {
        return None;
    }
    if !t.raw_data.is_empty() {
        if !t.raw_data.len().is_multiple_of(4) {
            return None;
        }
        return Some(
            t.raw_data
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
        );
    }
    Some(t.float_data.clone())
}

/// Reads the U-Net's parameters back from a model that meets the contract (e.g. to fine-tune a
/// shipped model's decoder).
pub fn load_params(model: &ModelProto, label: &Path) -> Result<Params, OnnxError> {
    let graph = model.graph.as_ref().ok_or_else(|| OnnxError::Param {
        name: label.display().to_string(),
        problem: "no graph".into(),
    })?;
    let k = graph
        .initializer
        .iter()
        .find(|t| t.name == "decoder.head.bias")
        .and_then(|t| t.dims.first())
        .map(|&d| d as usize)
        .ok_or_else(|| OnnxError::Param {
            name: "decoder.head.bias".into(),
            problem: format!("missing from {}", label.display()),
        })?;
    let mut tensors = Vec::new();
    for (name, shape) in reference_layout(k) {
        let t = graph
            .initializer
            .iter()
            .find(|t| t.name == name)
            .ok_or_else(|| OnnxError::Param {
                name: name.clone(),
                problem: format!("missing from {}", label.display()),
            })?;
        let data = initializer_f32(t).ok_or_else(|| OnnxError::Param {
            name: name.clone(),
            problem: "not a float32 tensor".into(),
        })?;
        if data.len() != shape.iter().product::<usize>() {
            return Err(OnnxError::Param {
                name,
                problem: format!("has {} values, expected shape {shape:?}", data.len()),
            });
        }
        tensors.push(microfed_kernels::unet::ParamTensor { name, shape, data });
    }
    let params = Params {
        classes: k,
        tensors,
    };
    params.validate().map_err(|e| OnnxError::Param {
        name: label.display().to_string(),
        problem: e.to_string(),
    })?;
    Ok(params)
}

/// Replaces the named initializers (e.g. every `decoder.*` weight of a new global decoder). Each replacement
/// must keep the initializer's element count.
pub fn patch_initializers(
    model: &mut ModelProto,
    weights: &[(String, Vec<f32>)],
) -> Result<(), OnnxError> {
    let graph = model.graph.as_mut().ok_or_else(|| OnnxError::Param {
        name: "graph".into(),
        problem: "model has no graph".into(),
    })?;
    let mut index: HashMap<&str, usize> = HashMap::new();
    for (i, t) in graph.initializer.iter().enumerate() {
        index.insert(t.name.as_str(), i);
    }
    let mut updates = Vec::with_capacity(weights.len());
    for (name, data) in weights {
        let &i = index.get(name.as_str()).ok_or_else(|| OnnxError::Param {
            name: name.clone(),
            problem: "no initializer of that name".into(),
        })?;
        let expected: i64 = graph.initializer[i].dims.iter().product();
        if expected as usize != data.len() {
            return Err(OnnxError::Param {
                name: name.clone(),
                problem: format!("has {expected} elements, the update has {}", data.len()),
            });
        }
        updates.push((i, data));
    }
    for (i, data) in updates {
        let t = &mut graph.initializer[i];
        let dims: Vec<usize> = t.dims.iter().map(|&d| d as usize).collect();
        *t = f32_tensor(&t.name.clone(), &dims, data);
    }
    Ok(())
}

/// Every parameter of the reference U-Net with `k` classes: name and shape, in parameter order.
pub fn reference_layout(k: usize) -> Vec<(String, Vec<usize>)> {
    layer_specs(k)
        .into_iter()
        .flat_map(|(name, conv)| {
            [
                (
                    format!("{name}.weight"),
                    vec![conv.c_out, conv.c_in, conv.k, conv.k],
                ),
                (format!("{name}.bias"), vec![conv.c_out]),
            ]
        })
        .collect()
}

/// What the contract check learned about a model that passed.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ContractReport {
    pub num_classes: usize,
    pub decoder_parameters: usize,
    pub encoder_parameters: usize,
    pub opset: i64,
}

/// Checks that `path` holds a U-Net microfed can use, and explains every mismatch at once.
///
/// The contract: one input `image` of rank 4 with 1 channel; one output `logits` of rank 4; tensors named
/// `enc0` … `enc4` produced by some node; float initializers for every parameter of the reference U-Net
/// (`encoder.*`, `decoder.*`) with the reference shapes; opset ≥ 13 (Resize with scales).
pub fn check_contract(path: &Path) -> Result<ContractReport, OnnxError> {
    let model = load(path)?;
    let mut problems = Vec::new();
    let opset = model
        .opset_import
        .iter()
        .filter(|o| o.domain.is_empty() || o.domain == "ai.onnx")
        .map(|o| o.version)
        .max();
    match opset {
        Some(v) if v >= 13 => {}
        Some(v) => problems.push(format!(
            "opset {v} is too old: 13 or newer is needed (we export {OPSET})"
        )),
        None => problems.push("no default-domain opset_import".into()),
    }
    let Some(graph) = model.graph.as_ref() else {
        return Err(OnnxError::Contract {
            path: path.to_owned(),
            problems: vec!["the file has no graph".into()],
        });
    };
    let initializer_names: std::collections::HashSet<&str> =
        graph.initializer.iter().map(|t| t.name.as_str()).collect();
    let real_inputs: Vec<&ValueInfoProto> = graph
        .input
        .iter()
        .filter(|i| !initializer_names.contains(i.name.as_str()))
        .collect();
    let dims_of = |v: &ValueInfoProto| -> Option<Vec<Option<i64>>> {
        match v.r#type.as_ref()?.value.as_ref()? {
            type_proto::Value::TensorType(t) => Some(
                t.shape
                    .as_ref()?
                    .dim
                    .iter()
                    .map(|d| match d.value {
                        Some(tensor_shape_proto::dimension::Value::DimValue(v)) => Some(v),
                        _ => None,
                    })
                    .collect(),
            ),
        }
    };
    match real_inputs.as_slice() {
        [one] if one.name == INPUT => match dims_of(one) {
            Some(d) if d.len() == 4 && d[1] == Some(1) => {}
            Some(d) if d.len() == 4 => problems.push(format!(
                "input `{INPUT}` must have 1 channel, found {:?}",
                d[1]
            )),
            Some(d) => problems.push(format!(
                "input `{INPUT}` must be rank 4 [N,1,H,W], found rank {}",
                d.len()
            )),
            None => problems.push(format!("input `{INPUT}` has no tensor shape")),
        },
        [one] => problems.push(format!(
            "the input must be named `{INPUT}`, found `{}`",
            one.name
        )),
        many => problems.push(format!(
            "exactly one input `{INPUT}` is expected, found {}",
            many.len()
        )),
    }
    let mut k = None;
    match graph.output.iter().find(|o| o.name == OUTPUT) {
        Some(o) => match dims_of(o) {
            Some(d) if d.len() == 4 => k = d[1].map(|c| c as usize),
            _ => problems.push(format!("output `{OUTPUT}` must be rank 4 [N,K,H,W]")),
        },
        None => problems.push(format!(
            "no output named `{OUTPUT}` (outputs: {})",
            graph
                .output
                .iter()
                .map(|o| o.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
    let produced: std::collections::HashSet<&str> = graph
        .node
        .iter()
        .flat_map(|n| n.output.iter().map(String::as_str))
        .collect();
    for i in 0..CHANNELS.len() {
        if !produced.contains(skip_name(i).as_str()) {
            problems.push(format!(
                "no node produces the skip feature `{}` (output of encoder stage {i})",
                skip_name(i)
            ));
        }
    }
    // Parameter layout: take K from the head when the output did not give it.
    let head = graph
        .initializer
        .iter()
        .find(|t| t.name == "decoder.head.weight");
    if k.is_none() {
        k = head.and_then(|t| t.dims.first()).map(|&d| d as usize);
    }
    let k = k.unwrap_or(0);
    let expected = reference_layout(k.max(1));
    let mut decoder_parameters = 0;
    let mut encoder_parameters = 0;
    for (name, shape) in &expected {
        match graph.initializer.iter().find(|t| &t.name == name) {
            None => problems.push(format!("missing weight `{name}` of shape {shape:?}")),
            Some(t) => {
                let dims: Vec<usize> = t.dims.iter().map(|&d| d as usize).collect();
                if &dims != shape {
                    problems.push(format!(
                        "weight `{name}` has shape {dims:?}, expected {shape:?}"
                    ));
                } else if t.data_type != DataType::Float as i32 {
                    problems.push(format!("weight `{name}` must be float32"));
                }
                let n: usize = shape.iter().product();
                if name.starts_with("decoder.") {
                    decoder_parameters += n;
                } else {
                    encoder_parameters += n;
                }
            }
        }
    }
    if k < 2 {
        problems.push("cannot tell the number of classes K (from `logits` or `decoder.head.weight`); K ≥ 2 is needed".into());
    }
    if problems.is_empty() {
        Ok(ContractReport {
            num_classes: k,
            decoder_parameters,
            encoder_parameters,
            opset: opset.unwrap_or_default(),
        })
    } else {
        Err(OnnxError::Contract {
            path: path.to_owned(),
            problems,
        })
    }
}
