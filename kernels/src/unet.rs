//! The reference U-Net, written once against [`Backend`]: forward, full backward, and the
//! decoder-only fine-tuning mode that federated rounds use.
//!
//! Map of this module:
//! - Architecture constants ([`CHANNELS`], [`DEPTH`]) and the layer list ([`layer_specs`]).
//! - [`Params`] / [`ParamTensor`]: the weights on the host, named as the ONNX export names them, with
//!   PyTorch's default (Kaiming-uniform) initialisation and the flat decoder vector federated updates
//!   work on.
//! - [`Loss`], [`Optim`], [`OptimKind`], [`StepStats`]: what a training step minimises and how;
//!   [`OptimizerState`]: the optimiser's buffers on the host, for training checkpoints.
//! - [`UNet`]: device parameters, gradients, optimiser state and per-input-shape activation buffers
//!   (allocated once per shape and reused across steps).
//!
//! Architecture (input 1 channel, height and width multiples of 16):
//! - encoder stage `i` (channels `C[i]` = 16, 32, 64, 128, 256): stages 1..4 start with a 2×2 max-pool,
//!   then two 3×3 conv + ReLU; the stage outputs are the skip features `enc0..enc4`;
//! - decoder stage `j` = 3, 2, 1, 0: nearest ×2 upsampling of the previous output (first `enc4`),
//!   concatenated with `enc_j`, then two 3×3 conv + ReLU down to `C[j]` channels;
//! - head: a 1×1 conv to `K` logits.

use crate::{Backend, Conv, KernelError, OptimStep, Precision, Shape};
use rand::{Rng, SeedableRng};
use std::sync::Arc;

/// Channels of encoder stages 0..4 (and of the decoder stage with the same index).
pub const CHANNELS: [usize; DEPTH] = [16, 32, 64, 128, 256];
/// Number of encoder stages (resolution levels).
pub const DEPTH: usize = 5;
/// Height and width must be multiples of this (four 2×2 poolings).
pub const SIZE_MULTIPLE: usize = 1 << (DEPTH - 1);

/// Layer indices: encoder convs `0..10` (stage `i`, conv `c` ∈ {0, 1} at `2i + c`), decoder convs
/// `10..18` (stage `j` at `10 + 2j + c`), head at 18. Parameter tensors: weight `2·layer`, bias
/// `2·layer + 1`, so the decoder's tensors are the contiguous tail from [`FIRST_DECODER_TENSOR`].
const fn enc(i: usize, c: usize) -> usize {
    2 * i + c
}
const fn dec(j: usize, c: usize) -> usize {
    2 * DEPTH + 2 * j + c
}
const HEAD: usize = 2 * DEPTH + 2 * (DEPTH - 1);
const LAYERS: usize = HEAD + 1;
/// Index of the first decoder tensor in [`Params::tensors`].
pub const FIRST_DECODER_TENSOR: usize = 2 * dec(0, 0);

/// The network's convolutions in parameter order, with their parameter-name prefixes.
pub fn layer_specs(classes: usize) -> Vec<(String, Conv)> {
    let mut out = Vec::with_capacity(LAYERS);
    for (i, &c) in CHANNELS.iter().enumerate() {
        let c_in = if i == 0 { 1 } else { CHANNELS[i - 1] };
        out.push((format!("encoder.{i}.conv1"), Conv::new(c_in, c, 3)));
        out.push((format!("encoder.{i}.conv2"), Conv::new(c, c, 3)));
    }
    for j in 0..DEPTH - 1 {
        let c = CHANNELS[j];
        out.push((
            format!("decoder.{j}.conv1"),
            Conv::new(CHANNELS[j + 1] + c, c, 3),
        ));
        out.push((format!("decoder.{j}.conv2"), Conv::new(c, c, 3)));
    }
    out.push((
        "decoder.head".to_string(),
        Conv::new(CHANNELS[0], classes, 1),
    ));
    out
}

/// One named parameter tensor on the host.
#[derive(Debug, Clone, PartialEq)]
pub struct ParamTensor {
    /// e.g. `encoder.2.conv1.weight`, `decoder.head.bias`.
    pub name: String,
    /// `[c_out, c_in, k, k]` for weights, `[c_out]` for biases.
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// All weights of a U-Net on the host, in a fixed order: encoder stages 0..4 (conv1 weight, bias,
/// conv2 weight, bias), decoder stages 0..3 likewise, then the head's weight and bias.
#[derive(Debug, Clone, PartialEq)]
pub struct Params {
    pub classes: usize,
    pub tensors: Vec<ParamTensor>,
}

impl Params {
    /// PyTorch's `Conv2d` default initialisation (Kaiming-uniform with `a = √5`, i.e. weights and
    /// biases uniform in `±1/√fan_in`), reproducible from `seed`.
    pub fn init(classes: usize, seed: u64) -> Result<Self, KernelError> {
        check_classes(classes)?;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let mut tensors = Vec::with_capacity(2 * LAYERS);
        for (name, conv) in layer_specs(classes) {
            let bound = 1.0 / ((conv.c_in * conv.k * conv.k) as f32).sqrt();
            let mut draw = |len: usize| -> Vec<f32> {
                (0..len).map(|_| rng.random_range(-bound..bound)).collect()
            };
            tensors.push(ParamTensor {
                name: format!("{name}.weight"),
                shape: vec![conv.c_out, conv.c_in, conv.k, conv.k],
                data: draw(conv.weight_len()),
            });
            tensors.push(ParamTensor {
                name: format!("{name}.bias"),
                shape: vec![conv.c_out],
                data: draw(conv.c_out),
            });
        }
        Ok(Self { classes, tensors })
    }

    /// The same network for `classes` output classes: every tensor whose shape does not depend on
    /// the class count (the encoder, the decoder) is kept; the head is drawn afresh from `seed` as
    /// [`Params::init`] draws it. Fine-tuning a base model on data with other classes starts here.
    pub fn with_classes(&self, classes: usize, seed: u64) -> Result<Self, KernelError> {
        let mut fresh = Self::init(classes, seed)?;
        for t in &mut fresh.tensors {
            if let Some(old) = self.get(&t.name).filter(|o| o.shape == t.shape) {
                t.data.clone_from(&old.data);
            }
        }
        Ok(fresh)
    }

    /// Total number of scalars.
    pub fn len(&self) -> usize {
        self.tensors.iter().map(|t| t.data.len()).sum()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Scalars in the encoder (frozen during federated fine-tuning).
    pub fn encoder_len(&self) -> usize {
        self.tensors[..FIRST_DECODER_TENSOR.min(self.tensors.len())]
            .iter()
            .map(|t| t.data.len())
            .sum()
    }
    /// Scalars in the decoder and head (what federated rounds exchange).
    pub fn decoder_len(&self) -> usize {
        self.len() - self.encoder_len()
    }
    /// The tensor with this name.
    pub fn get(&self, name: &str) -> Option<&ParamTensor> {
        self.tensors.iter().find(|t| t.name == name)
    }
    /// Decoder and head tensors concatenated in parameter order.
    pub fn decoder_flat(&self) -> Vec<f32> {
        let mut v = Vec::with_capacity(self.decoder_len());
        for t in self.tensors.iter().skip(FIRST_DECODER_TENSOR) {
            v.extend_from_slice(&t.data);
        }
        v
    }
    /// Overwrites the decoder and head from a vector made by [`Params::decoder_flat`].
    pub fn set_decoder_flat(&mut self, flat: &[f32]) -> Result<(), KernelError> {
        if flat.len() != self.decoder_len() {
            return Err(KernelError::Params(format!(
                "flat decoder vector has {} values, the decoder of a {}-class U-Net has {}",
                flat.len(),
                self.classes,
                self.decoder_len()
            )));
        }
        let mut at = 0;
        for t in self.tensors.iter_mut().skip(FIRST_DECODER_TENSOR) {
            let n = t.data.len();
            t.data.copy_from_slice(&flat[at..at + n]);
            at += n;
        }
        Ok(())
    }
    /// Checks names, shapes and lengths against the architecture for `self.classes`.
    pub fn validate(&self) -> Result<(), KernelError> {
        check_classes(self.classes)?;
        let specs = layer_specs(self.classes);
        if self.tensors.len() != 2 * specs.len() {
            return Err(KernelError::Params(format!(
                "{} tensors, the U-Net has {}",
                self.tensors.len(),
                2 * specs.len()
            )));
        }
        for (l, (name, conv)) in specs.iter().enumerate() {
            let want = [
                (
                    format!("{name}.weight"),
                    vec![conv.c_out, conv.c_in, conv.k, conv.k],
                ),
                (format!("{name}.bias"), vec![conv.c_out]),
            ];
            for (t, (wname, wshape)) in self.tensors[2 * l..2 * l + 2].iter().zip(want) {
                let n: usize = wshape.iter().product();
                if t.name != wname || t.shape != wshape || t.data.len() != n {
                    return Err(KernelError::Params(format!(
                        "tensor {} {:?} ({} values) does not match {} {:?}",
                        t.name,
                        t.shape,
                        t.data.len(),
                        wname,
                        wshape
                    )));
                }
            }
        }
        Ok(())
    }
}

fn check_classes(classes: usize) -> Result<(), KernelError> {
    if classes == 0 || classes > crate::IGNORE_LABEL as usize {
        return Err(KernelError::Params(format!(
            "{classes} classes: a U-Net needs 1 to {} (labels are u8, {} means ignore)",
            crate::IGNORE_LABEL,
            crate::IGNORE_LABEL
        )));
    }
    Ok(())
}

/// What a training step minimises: `cross_entropy + dice_weight · dice`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Loss {
    /// Per-class weights of the cross-entropy (PyTorch's `weight=`), one per class.
    pub class_weights: Option<Vec<f32>>,
    /// Weight of the soft Dice term (0 = cross-entropy only).
    pub dice_weight: f32,
}

/// The optimiser family and its hyper-parameters (the step count is kept per parameter by [`UNet`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum OptimKind {
    Sgd {
        lr: f32,
        momentum: f32,
        weight_decay: f32,
    },
    AdamW {
        lr: f32,
        beta1: f32,
        beta2: f32,
        eps: f32,
        weight_decay: f32,
    },
}

/// An optimiser, plus FedProx's proximal term `prox_mu·(w − w_global)` added to the decoder's
/// gradients when [`UNet::set_global_decoder`] has set an anchor (0 turns it off).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Optim {
    pub kind: OptimKind,
    pub prox_mu: f32,
}

impl Optim {
    /// SGD with momentum, no weight decay, no proximal term.
    pub fn sgd(lr: f32, momentum: f32) -> Self {
        Self {
            kind: OptimKind::Sgd {
                lr,
                momentum,
                weight_decay: 0.0,
            },
            prox_mu: 0.0,
        }
    }
    /// AdamW with PyTorch's defaults (β = 0.9, 0.999; ε = 1e-8; weight decay 0.01).
    pub fn adamw(lr: f32) -> Self {
        Self {
            kind: OptimKind::AdamW {
                lr,
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                weight_decay: 0.01,
            },
            prox_mu: 0.0,
        }
    }
    fn state_buffers(&self) -> usize {
        self.at_step(1).state_buffers()
    }
    fn at_step(&self, step: u32) -> OptimStep {
        match self.kind {
            OptimKind::Sgd {
                lr,
                momentum,
                weight_decay,
            } => OptimStep::Sgd {
                lr,
                momentum,
                weight_decay,
            },
            OptimKind::AdamW {
                lr,
                beta1,
                beta2,
                eps,
                weight_decay,
            } => OptimStep::AdamW {
                lr,
                beta1,
                beta2,
                eps,
                weight_decay,
                step,
            },
        }
    }
}

/// The optimiser's per-tensor state on the host ([`UNet::optimizer_state`]): for each parameter
/// tensor, the steps taken and its buffers (none before the first step; SGD one, AdamW two).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct OptimizerState {
    pub steps: Vec<u32>,
    pub buffers: Vec<Vec<Vec<f32>>>,
}

impl OptimizerState {
    /// The weighted mean of several states of one U-Net and optimiser family (federated labs
    /// sharing their moments): buffers element by element, step counts the largest. A tensor
    /// no state has stepped stays unstepped; one some states have stepped and others not is an
    /// error, as are states of different shapes and weights that are negative or sum to zero.
    pub fn weighted_mean(states: &[(&OptimizerState, f64)]) -> Result<Self, KernelError> {
        let Some((first, _)) = states.first() else {
            return Err(KernelError::Params("no optimiser state to average".into()));
        };
        let total: f64 = states.iter().map(|(_, w)| w).sum();
        if states.iter().any(|(_, w)| !w.is_finite() || *w < 0.0) || total <= 0.0 {
            return Err(KernelError::Params(format!(
                "optimiser state weights must be finite, non-negative and not all zero: {:?}",
                states.iter().map(|(_, w)| w).collect::<Vec<_>>()
            )));
        }
        let n = first.steps.len();
        for (s, _) in states {
            if s.steps.len() != n || s.buffers.len() != n {
                return Err(KernelError::Params(format!(
                    "optimiser states of {n} and {} / {} tensors cannot be averaged",
                    s.steps.len(),
                    s.buffers.len()
                )));
            }
        }
        let mut out = OptimizerState {
            steps: vec![0; n],
            buffers: Vec::with_capacity(n),
        };
        for t in 0..n {
            out.steps[t] = states.iter().map(|(s, _)| s.steps[t]).max().unwrap_or(0);
            let shape: Vec<usize> = first.buffers[t].iter().map(Vec::len).collect();
            for (s, _) in states {
                let other: Vec<usize> = s.buffers[t].iter().map(Vec::len).collect();
                if other != shape {
                    return Err(KernelError::Params(format!(
                        "optimiser state of tensor {t}: buffers {shape:?} and {other:?} differ"
                    )));
                }
            }
            let mut bufs: Vec<Vec<f64>> = shape.iter().map(|&len| vec![0.0; len]).collect();
            for (s, w) in states {
                let w = w / total;
                for (acc, b) in bufs.iter_mut().zip(&s.buffers[t]) {
                    for (a, &v) in acc.iter_mut().zip(b) {
                        *a += w * f64::from(v);
                    }
                }
            }
            out.buffers.push(
                bufs.into_iter()
                    .map(|b| b.into_iter().map(|v| v as f32).collect())
                    .collect(),
            );
        }
        Ok(out)
    }

    /// Zeroes every tensor's first moment, buffer 0 (SGD's velocity, AdamW's running mean of
    /// gradients), and keeps the rest: AdamW's second moment and the step counts. A lab handed
    /// this state starts its round without the last round's direction but with its step scale.
    pub fn clear_first_moment(&mut self) {
        for bufs in &mut self.buffers {
            if let Some(first) = bufs.first_mut() {
                first.fill(0.0);
            }
        }
    }
}

/// The loss of one step (before the update), and its parts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepStats {
    /// `cross_entropy + dice_weight · dice`.
    pub loss: f32,
    pub cross_entropy: f32,
    /// Soft Dice loss (reported even when its weight is 0).
    pub dice: f32,
}

/// Activations and their gradients for one input shape.
struct Workspace<B: Backend> {
    xs: Shape,
    /// Encoder: `pool[l]` (input of stage l ≥ 1; `pool[0]` unused, empty), conv1 outputs `a`, stage
    /// outputs `e` (the skip features), and their gradients; `tmp[l]` receives the max-pool's
    /// backward before it is added to `ge[l]`.
    pool: Vec<B::Buffer>,
    a: Vec<B::Buffer>,
    e: Vec<B::Buffer>,
    gpool: Vec<B::Buffer>,
    ga: Vec<B::Buffer>,
    ge: Vec<B::Buffer>,
    tmp: Vec<B::Buffer>,
    /// Decoder stage j: concatenated input, conv1 and conv2 outputs, and their gradients.
    cat: Vec<B::Buffer>,
    d1: Vec<B::Buffer>,
    d2: Vec<B::Buffer>,
    gcat: Vec<B::Buffer>,
    gd1: Vec<B::Buffer>,
    gd2: Vec<B::Buffer>,
    logits: B::Buffer,
    dlogits: B::Buffer,
    /// Re-styled copies of the features (decoder mode with a style), made on first use.
    restyled: Option<Vec<B::Buffer>>,
}

/// Shape of level `l` (resolution `h/2^l`) with `c` channels.
fn level(xs: Shape, l: usize, c: usize) -> Shape {
    Shape::new(xs.n, c, xs.h >> l, xs.w >> l)
}

impl<B: Backend> Workspace<B> {
    /// Buffers for shape `xs`; without `gradients` (inference) the gradient buffers stay empty,
    /// which is about half the memory.
    fn new(b: &B, xs: Shape, classes: usize, gradients: bool) -> Result<Self, KernelError> {
        let z = |s: Shape| b.zeros(s.len());
        let g = |s: Shape| b.zeros(if gradients { s.len() } else { 0 });
        let per_level = |f: &dyn Fn(usize) -> Shape| -> Result<Vec<B::Buffer>, KernelError> {
            (0..DEPTH).map(|l| z(f(l))).collect()
        };
        let per_stage = |f: &dyn Fn(usize) -> Shape| -> Result<Vec<B::Buffer>, KernelError> {
            (0..DEPTH - 1).map(|j| z(f(j))).collect()
        };
        let grad_level = |f: &dyn Fn(usize) -> Shape| -> Result<Vec<B::Buffer>, KernelError> {
            (0..DEPTH).map(|l| g(f(l))).collect()
        };
        let grad_stage = |f: &dyn Fn(usize) -> Shape| -> Result<Vec<B::Buffer>, KernelError> {
            (0..DEPTH - 1).map(|j| g(f(j))).collect()
        };
        let pool_shape = |l: usize| {
            if l == 0 {
                Shape::new(0, 0, 0, 0)
            } else {
                level(xs, l, CHANNELS[l - 1])
            }
        };
        let lv = |l: usize| level(xs, l, CHANNELS[l]);
        let cat = |j: usize| level(xs, j, CHANNELS[j] + CHANNELS[j + 1]);
        let logits = Shape::new(xs.n, classes, xs.h, xs.w);
        Ok(Self {
            xs,
            pool: per_level(&pool_shape)?,
            a: per_level(&lv)?,
            e: per_level(&lv)?,
            gpool: grad_level(&pool_shape)?,
            ga: grad_level(&lv)?,
            ge: grad_level(&lv)?,
            tmp: grad_level(&lv)?,
            cat: per_stage(&cat)?,
            d1: per_stage(&lv)?,
            d2: per_stage(&lv)?,
            gcat: grad_stage(&cat)?,
            gd1: grad_stage(&lv)?,
            gd2: grad_stage(&lv)?,
            logits: z(logits)?,
            dlogits: g(logits)?,
            restyled: None,
        })
    }
}

/// What the decoder reads its skip features from.
#[derive(Clone, Copy)]
enum Features<'a, B: Backend> {
    /// The encoder's outputs in the workspace.
    Own,
    /// Given by the caller (the encoder is frozen and was run earlier).
    Given(&'a [B::Buffer]),
    /// The workspace's re-styled copies.
    Restyled,
}

/// Read-only view of the network used while a workspace is borrowed mutably.
struct Net<'a, B: Backend> {
    b: &'a B,
    layers: &'a [Conv],
    params: &'a [B::Buffer],
    precision: Precision,
}

impl<B: Backend> Net<'_, B> {
    fn conv(
        &self,
        layer: usize,
        x: &B::Buffer,
        xs: Shape,
        relu: bool,
        y: &mut B::Buffer,
    ) -> Result<(), KernelError> {
        let (conv, w, b) = self.layer(layer);
        self.b
            .conv2d_forward(x, xs, conv, w, b, relu, self.precision, y)
    }

    /// Layer `layer`'s shape, weights and bias.
    fn layer(&self, layer: usize) -> (Conv, &B::Buffer, &B::Buffer) {
        (
            self.layers[layer],
            &self.params[2 * layer],
            &self.params[2 * layer + 1],
        )
    }

    /// Weight and bias gradients of `layer` into `grads`, and the input gradient into `dx` if asked.
    fn conv_backward(
        &self,
        layer: usize,
        x: &B::Buffer,
        xs: Shape,
        dy: &B::Buffer,
        grads: &mut [B::Buffer],
        dx: Option<&mut B::Buffer>,
    ) -> Result<(), KernelError> {
        let conv = self.layers[layer];
        let (gw, gb) = grads[2 * layer..2 * layer + 2].split_at_mut(1);
        self.b
            .conv2d_backward_weight(x, xs, conv, dy, self.precision, &mut gw[0], &mut gb[0])?;
        if let Some(dx) = dx {
            self.b.conv2d_backward_data(
                dy,
                xs,
                conv,
                &self.params[2 * layer],
                self.precision,
                dx,
            )?;
        }
        Ok(())
    }

    fn encoder_forward(&self, x: &B::Buffer, ws: &mut Workspace<B>) -> Result<(), KernelError> {
        let xs = ws.xs;
        for l in 0..DEPTH {
            let ins = if l == 0 {
                xs
            } else {
                let prev = level(xs, l - 1, CHANNELS[l - 1]);
                self.b
                    .maxpool2_forward(&ws.e[l - 1], prev, &mut ws.pool[l])?;
                level(xs, l, CHANNELS[l - 1])
            };
            let input = if l == 0 { x } else { &ws.pool[l] };
            self.conv(enc(l, 0), input, ins, true, &mut ws.a[l])?;
            self.conv(
                enc(l, 1),
                &ws.a[l],
                ins.with_c(CHANNELS[l]),
                true,
                &mut ws.e[l],
            )?;
        }
        Ok(())
    }

    fn decoder_forward(
        &self,
        feats: Features<'_, B>,
        ws: &mut Workspace<B>,
    ) -> Result<(), KernelError> {
        let xs = ws.xs;
        let Workspace {
            e,
            restyled,
            cat,
            gcat,
            d1,
            d2,
            logits,
            ..
        } = ws;
        let f: &[B::Buffer] = match feats {
            Features::Own => e,
            Features::Given(g) => g,
            Features::Restyled => restyled.as_deref().unwrap_or(&[]),
        };
        if f.len() != DEPTH {
            return Err(KernelError::shape(
                "decoder",
                format!("{} feature maps given, expected {DEPTH}", f.len()),
            ));
        }
        for j in (0..DEPTH - 1).rev() {
            let low = if j == DEPTH - 2 {
                &f[DEPTH - 1]
            } else {
                &d2[j + 1]
            };
            let low_shape = level(xs, j + 1, CHANNELS[j + 1]);
            let cs = level(xs, j, CHANNELS[j] + CHANNELS[j + 1]);
            // Without gradient buffers (inference) nothing reads the concatenation afterwards.
            let keep_concat = self.b.len(&gcat[j]) > 0;
            self.b.upsample2_concat_conv2d_forward(
                (low, low_shape),
                (&f[j], CHANNELS[j]),
                &mut cat[j],
                keep_concat,
                self.layer(dec(j, 0)),
                true,
                self.precision,
                &mut d1[j],
            )?;
            self.conv(dec(j, 1), &d1[j], cs.with_c(CHANNELS[j]), true, &mut d2[j])?;
        }
        self.conv(HEAD, &d2[0], level(xs, 0, CHANNELS[0]), false, logits)
    }

    /// Backward through the head and decoder; with `into_encoder`, also writes the gradients of the
    /// skip features and of `enc4` into `ws.ge` (otherwise stage 3's input gradient is not computed:
    /// frozen features need none).
    fn decoder_backward(
        &self,
        ws: &mut Workspace<B>,
        grads: &mut [B::Buffer],
        into_encoder: bool,
    ) -> Result<(), KernelError> {
        let xs = ws.xs;
        let Workspace {
            cat,
            d1,
            d2,
            gcat,
            gd1,
            gd2,
            ge,
            dlogits,
            ..
        } = ws;
        let s0 = level(xs, 0, CHANNELS[0]);
        self.conv_backward(HEAD, &d2[0], s0, dlogits, grads, Some(&mut gd2[0]))?;
        for j in 0..DEPTH - 1 {
            let c = CHANNELS[j];
            let s = level(xs, j, c);
            let deepest = j == DEPTH - 2;
            self.b.relu_backward(&d2[j], &mut gd2[j])?;
            self.conv_backward(dec(j, 1), &d1[j], s, &gd2[j], grads, Some(&mut gd1[j]))?;
            self.b.relu_backward(&d1[j], &mut gd1[j])?;
            let cs = level(xs, j, c + CHANNELS[j + 1]);
            let dcat = (!deepest || into_encoder).then_some(&mut gcat[j]);
            self.conv_backward(dec(j, 0), &cat[j], cs, &gd1[j], grads, dcat)?;
            let low_shape = level(xs, j + 1, CHANNELS[j + 1]);
            // The upsampled half goes to the stage below (or to enc4), the skip half to enc_j.
            let (ge_lo, ge_hi) = ge.split_at_mut(DEPTH - 1);
            let dskip = into_encoder.then_some(&mut ge_lo[j]);
            if !deepest {
                self.b
                    .upsample2_concat_backward(&gcat[j], low_shape, c, &mut gd2[j + 1], dskip)?;
            } else if into_encoder {
                self.b
                    .upsample2_concat_backward(&gcat[j], low_shape, c, &mut ge_hi[0], dskip)?;
            }
        }
        Ok(())
    }

    /// Backward through the encoder; `ws.ge` already holds the decoder's share of each stage's
    /// output gradient.
    fn encoder_backward(
        &self,
        x: &B::Buffer,
        ws: &mut Workspace<B>,
        grads: &mut [B::Buffer],
    ) -> Result<(), KernelError> {
        let xs = ws.xs;
        for l in (0..DEPTH).rev() {
            let c = CHANNELS[l];
            let s = level(xs, l, c);
            self.b.relu_backward(&ws.e[l], &mut ws.ge[l])?;
            self.conv_backward(
                enc(l, 1),
                &ws.a[l],
                s,
                &ws.ge[l],
                grads,
                Some(&mut ws.ga[l]),
            )?;
            self.b.relu_backward(&ws.a[l], &mut ws.ga[l])?;
            if l == 0 {
                // The image needs no gradient: skip conv1's backward-data pass.
                self.conv_backward(enc(0, 0), x, xs, &ws.ga[0], grads, None)?;
            } else {
                let ins = level(xs, l, CHANNELS[l - 1]);
                self.conv_backward(
                    enc(l, 0),
                    &ws.pool[l],
                    ins,
                    &ws.ga[l],
                    grads,
                    Some(&mut ws.gpool[l]),
                )?;
                let prev = level(xs, l - 1, CHANNELS[l - 1]);
                self.b
                    .maxpool2_backward(&ws.e[l - 1], prev, &ws.gpool[l], &mut ws.tmp[l - 1])?;
                self.b.axpy(1.0, &ws.tmp[l - 1], &mut ws.ge[l - 1])?;
            }
        }
        Ok(())
    }
}

/// Which parameters an optimiser step updates.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Part {
    All,
    Decoder,
}

/// How many activation workspaces (input shapes) are kept at once.
const MAX_WORKSPACES: usize = 3;

/// A U-Net on a backend: parameters, gradients, optimiser state and activation buffers.
pub struct UNet<B: Backend> {
    backend: Arc<B>,
    classes: usize,
    names: Vec<String>,
    shapes: Vec<Vec<usize>>,
    layers: Vec<Conv>,
    params: Vec<B::Buffer>,
    grads: Vec<B::Buffer>,
    /// Per tensor: optimiser buffers (empty until the first step) and the number of steps taken.
    opt_state: Vec<Vec<B::Buffer>>,
    opt_steps: Vec<u32>,
    opt_kind: Option<std::mem::Discriminant<OptimKind>>,
    /// FedProx anchor: the global decoder tensors.
    global_decoder: Option<Vec<B::Buffer>>,
    precision: Precision,
    works: Vec<Workspace<B>>,
    /// Built by [`UNet::for_inference`]: no gradient or optimiser buffers, training is an error.
    inference_only: bool,
}

impl<B: Backend> UNet<B> {
    /// Uploads `params` (checked against the architecture).
    pub fn new(backend: Arc<B>, params: &Params) -> Result<Self, KernelError> {
        params.validate()?;
        let specs = layer_specs(params.classes);
        let b = &*backend;
        let dev: Vec<B::Buffer> = params
            .tensors
            .iter()
            .map(|t| b.upload(&t.data))
            .collect::<Result<_, _>>()?;
        let grads = params
            .tensors
            .iter()
            .map(|t| b.zeros(t.data.len()))
            .collect::<Result<_, _>>()?;
        let n = params.tensors.len();
        Ok(Self {
            classes: params.classes,
            names: params.tensors.iter().map(|t| t.name.clone()).collect(),
            shapes: params.tensors.iter().map(|t| t.shape.clone()).collect(),
            layers: specs.into_iter().map(|(_, c)| c).collect(),
            params: dev,
            grads,
            opt_state: (0..n).map(|_| Vec::new()).collect(),
            opt_steps: vec![0; n],
            opt_kind: None,
            global_decoder: None,
            precision: Precision::Fp32,
            works: Vec::new(),
            inference_only: false,
            backend,
        })
    }

    /// Uploads `params` for inference only: no gradient, optimiser or backward buffers (the
    /// activation workspace of a shape is about half that of a training network, and it is reused
    /// across calls with that shape). [`UNet::forward`], [`UNet::encode`] and [`UNet::decode`] work;
    /// every training call is an error.
    pub fn for_inference(backend: Arc<B>, params: &Params) -> Result<Self, KernelError> {
        params.validate()?;
        let specs = layer_specs(params.classes);
        let dev: Vec<B::Buffer> = params
            .tensors
            .iter()
            .map(|t| backend.upload(&t.data))
            .collect::<Result<_, _>>()?;
        let n = params.tensors.len();
        Ok(Self {
            classes: params.classes,
            names: params.tensors.iter().map(|t| t.name.clone()).collect(),
            shapes: params.tensors.iter().map(|t| t.shape.clone()).collect(),
            layers: specs.into_iter().map(|(_, c)| c).collect(),
            params: dev,
            grads: Vec::new(),
            opt_state: (0..n).map(|_| Vec::new()).collect(),
            opt_steps: vec![0; n],
            opt_kind: None,
            global_decoder: None,
            precision: Precision::Fp32,
            works: Vec::new(),
            inference_only: true,
            backend,
        })
    }

    /// Whether this network was built by [`UNet::for_inference`].
    pub fn is_inference_only(&self) -> bool {
        self.inference_only
    }

    fn require_training(&self) -> Result<(), KernelError> {
        if self.inference_only {
            return Err(KernelError::Params(
                "this U-Net was built for inference only: it has no gradient or optimiser buffers"
                    .into(),
            ));
        }
        Ok(())
    }

    /// Bytes held on the backend: parameters, gradients, optimiser state and every activation
    /// workspace made so far (what [`UNet::for_inference`] saves is measured with this).
    pub fn device_bytes(&self) -> usize {
        let b = &*self.backend;
        let sum = |bufs: &[B::Buffer]| bufs.iter().map(|x| b.len(x)).sum::<usize>();
        let mut floats = sum(&self.params) + sum(&self.grads);
        floats += self.opt_state.iter().map(|v| sum(v)).sum::<usize>();
        for w in &self.works {
            for set in [
                &w.pool, &w.a, &w.e, &w.gpool, &w.ga, &w.ge, &w.tmp, &w.cat, &w.d1, &w.d2, &w.gcat,
                &w.gd1, &w.gd2,
            ] {
                floats += sum(set);
            }
            floats += b.len(&w.logits) + b.len(&w.dlogits);
            floats += w.restyled.as_deref().map_or(0, sum);
        }
        floats * std::mem::size_of::<f32>()
    }

    /// A freshly initialised network ([`Params::init`]).
    pub fn init(backend: Arc<B>, classes: usize, seed: u64) -> Result<Self, KernelError> {
        Self::new(backend, &Params::init(classes, seed)?)
    }

    pub fn backend(&self) -> &B {
        &self.backend
    }
    pub fn classes(&self) -> usize {
        self.classes
    }
    pub fn precision(&self) -> Precision {
        self.precision
    }
    /// Arithmetic of the convolutions from now on.
    pub fn set_precision(&mut self, precision: Precision) {
        self.precision = precision;
    }

    /// Downloads the parameters.
    pub fn to_host(&self) -> Result<Params, KernelError> {
        self.download_set(&self.params)
    }
    /// The gradients of the last backward pass (zeros for tensors it did not reach).
    pub fn gradients(&self) -> Result<Params, KernelError> {
        self.require_training()?;
        self.download_set(&self.grads)
    }
    fn download_set(&self, bufs: &[B::Buffer]) -> Result<Params, KernelError> {
        let tensors = bufs
            .iter()
            .zip(self.names.iter().zip(&self.shapes))
            .map(|(buf, (name, shape))| {
                Ok(ParamTensor {
                    name: name.clone(),
                    shape: shape.clone(),
                    data: self.backend.download(buf)?,
                })
            })
            .collect::<Result<_, KernelError>>()?;
        Ok(Params {
            classes: self.classes,
            tensors,
        })
    }

    /// Replaces every parameter (same class count); optimiser state is kept.
    pub fn from_host(&mut self, params: &Params) -> Result<(), KernelError> {
        params.validate()?;
        if params.classes != self.classes {
            return Err(KernelError::Params(format!(
                "parameters for {} classes, this U-Net has {}",
                params.classes, self.classes
            )));
        }
        for (dst, t) in self.params.iter_mut().zip(&params.tensors) {
            *dst = self.backend.upload(&t.data)?;
        }
        Ok(())
    }

    /// The decoder and head as one flat vector ([`Params::decoder_flat`] order).
    pub fn decoder_flat(&self) -> Result<Vec<f32>, KernelError> {
        let mut v = Vec::new();
        for p in &self.params[FIRST_DECODER_TENSOR..] {
            v.extend(self.backend.download(p)?);
        }
        Ok(v)
    }

    /// Overwrites the decoder and head from a flat vector.
    pub fn set_decoder_flat(&mut self, flat: &[f32]) -> Result<(), KernelError> {
        let bufs = self.split_decoder(flat)?;
        for (dst, src) in self.params[FIRST_DECODER_TENSOR..].iter_mut().zip(bufs) {
            *dst = src;
        }
        Ok(())
    }

    /// Sets (or clears) FedProx's anchor `w_global`, a flat decoder vector.
    pub fn set_global_decoder(&mut self, global: Option<&[f32]>) -> Result<(), KernelError> {
        self.global_decoder = match global {
            Some(g) => Some(self.split_decoder(g)?),
            None => None,
        };
        Ok(())
    }

    fn split_decoder(&self, flat: &[f32]) -> Result<Vec<B::Buffer>, KernelError> {
        let lens: Vec<usize> = self.params[FIRST_DECODER_TENSOR..]
            .iter()
            .map(|p| self.backend.len(p))
            .collect();
        let total: usize = lens.iter().sum();
        if flat.len() != total {
            return Err(KernelError::Params(format!(
                "flat decoder vector has {} values, this decoder has {total}",
                flat.len()
            )));
        }
        let mut at = 0;
        lens.iter()
            .map(|&n| {
                let b = self.backend.upload(&flat[at..at + n]);
                at += n;
                b
            })
            .collect()
    }

    /// Forgets momentum / moment estimates and step counts (e.g. after a federated round replaced
    /// the weights).
    pub fn reset_optimizer(&mut self) {
        self.opt_state.iter_mut().for_each(Vec::clear);
        self.opt_steps.iter_mut().for_each(|s| *s = 0);
        self.opt_kind = None;
    }

    /// The optimiser's state on the host (momentum or moment estimates and step counts per tensor),
    /// so a training checkpoint can resume exactly where it stopped.
    pub fn optimizer_state(&self) -> Result<OptimizerState, KernelError> {
        Ok(OptimizerState {
            steps: self.opt_steps.clone(),
            buffers: self
                .opt_state
                .iter()
                .map(|bufs| bufs.iter().map(|b| self.backend.download(b)).collect())
                .collect::<Result<_, _>>()?,
        })
    }

    /// Restores a state made by [`UNet::optimizer_state`] for the optimiser family of `optim`.
    /// Each tensor must hold no buffers (not stepped yet) or exactly as many as the family uses,
    /// each of the tensor's length.
    pub fn set_optimizer_state(
        &mut self,
        optim: &Optim,
        state: &OptimizerState,
    ) -> Result<(), KernelError> {
        self.require_training()?;
        let n = self.params.len();
        if state.steps.len() != n || state.buffers.len() != n {
            return Err(KernelError::Params(format!(
                "optimiser state for {} / {} tensors, this U-Net has {n}",
                state.steps.len(),
                state.buffers.len()
            )));
        }
        let want = optim.state_buffers();
        let mut dev = Vec::with_capacity(n);
        for (i, bufs) in state.buffers.iter().enumerate() {
            let len = self.backend.len(&self.params[i]);
            if !bufs.is_empty() && bufs.len() != want {
                return Err(KernelError::Params(format!(
                    "optimiser state of {}: {} buffers, this optimiser keeps {want}",
                    self.names[i],
                    bufs.len()
                )));
            }
            if let Some(b) = bufs.iter().find(|b| b.len() != len) {
                return Err(KernelError::Params(format!(
                    "optimiser state of {}: a buffer of {} values, the tensor has {len}",
                    self.names[i],
                    b.len()
                )));
            }
            dev.push(
                bufs.iter()
                    .map(|b| self.backend.upload(b))
                    .collect::<Result<Vec<_>, _>>()?,
            );
        }
        self.opt_state = dev;
        self.opt_steps = state.steps.clone();
        self.opt_kind = Some(std::mem::discriminant(&optim.kind));
        Ok(())
    }

    /// Shapes of the skip features `enc0..enc4` for an input of shape `xs`.
    pub fn feature_shapes(xs: Shape) -> [Shape; DEPTH] {
        std::array::from_fn(|l| level(xs, l, CHANNELS[l]))
    }

    /// Shape of the logits for an input of shape `xs`.
    pub fn logits_shape(&self, xs: Shape) -> Shape {
        xs.with_c(self.classes)
    }

    fn check_input(xs: Shape) -> Result<(), KernelError> {
        if xs.c != 1 || xs.n == 0 || xs.h == 0 || xs.w == 0 {
            return Err(KernelError::shape(
                "unet",
                format!("input {xs}: expected a non-empty batch of 1-channel images"),
            ));
        }
        if !xs.h.is_multiple_of(SIZE_MULTIPLE) || !xs.w.is_multiple_of(SIZE_MULTIPLE) {
            return Err(KernelError::shape(
                "unet",
                format!("input {xs}: height and width must be multiples of {SIZE_MULTIPLE}"),
            ));
        }
        Ok(())
    }

    /// Index of the workspace for `xs`, creating it (and dropping the oldest) if needed.
    fn workspace(&mut self, xs: Shape) -> Result<usize, KernelError> {
        Self::check_input(xs)?;
        if let Some(i) = self.works.iter().position(|w| w.xs == xs) {
            return Ok(i);
        }
        if self.works.len() >= MAX_WORKSPACES {
            self.works.remove(0);
        }
        self.works.push(Workspace::new(
            &*self.backend,
            xs,
            self.classes,
            !self.inference_only,
        )?);
        Ok(self.works.len() - 1)
    }

    /// Splits `self` into the read-only network, the gradients and one workspace.
    fn parts(&mut self, wi: usize) -> (Net<'_, B>, &mut [B::Buffer], &mut Workspace<B>) {
        (
            Net {
                b: &*self.backend,
                layers: &self.layers,
                params: &self.params,
                precision: self.precision,
            },
            &mut self.grads,
            &mut self.works[wi],
        )
    }

    /// Logits (`[n, K, h, w]`) for an image batch `x` of shape `xs` (`[n, 1, h, w]`).
    pub fn forward(&mut self, x: &B::Buffer, xs: Shape) -> Result<&B::Buffer, KernelError> {
        let wi = self.workspace(xs)?;
        let (net, _, ws) = self.parts(wi);
        net.encoder_forward(x, ws)?;
        net.decoder_forward(Features::Own, ws)?;
        Ok(&self.works[wi].logits)
    }

    /// The encoder's skip features `enc0..enc4` for `x` (fresh buffers the caller keeps).
    pub fn encode(&mut self, x: &B::Buffer, xs: Shape) -> Result<Vec<B::Buffer>, KernelError> {
        let wi = self.workspace(xs)?;
        let (net, _, ws) = self.parts(wi);
        net.encoder_forward(x, ws)?;
        let b = &*self.backend;
        self.works[wi]
            .e
            .iter()
            .map(|e| {
                let mut out = b.zeros(b.len(e))?;
                b.copy(e, &mut out)?;
                Ok(out)
            })
            .collect()
    }

    /// Logits from given features (see [`UNet::encode`]), optionally re-styled first.
    pub fn decode(
        &mut self,
        features: &[B::Buffer],
        xs: Shape,
        restyle: Option<&[(Vec<f32>, Vec<f32>)]>,
    ) -> Result<&B::Buffer, KernelError> {
        let wi = self.workspace(xs)?;
        let feats = self.prepare_features(wi, features, restyle)?;
        let (net, _, ws) = self.parts(wi);
        net.decoder_forward(feats, ws)?;
        Ok(&self.works[wi].logits)
    }

    /// Checks the given features and applies the re-styling into the workspace.
    fn prepare_features<'f>(
        &mut self,
        wi: usize,
        features: &'f [B::Buffer],
        restyle: Option<&[(Vec<f32>, Vec<f32>)]>,
    ) -> Result<Features<'f, B>, KernelError> {
        let xs = self.works[wi].xs;
        let shapes = Self::feature_shapes(xs);
        if features.len() != DEPTH {
            return Err(KernelError::shape(
                "decoder",
                format!("{} feature maps given, expected {DEPTH}", features.len()),
            ));
        }
        for (l, (f, s)) in features.iter().zip(shapes).enumerate() {
            if self.backend.len(f) != s.len() {
                return Err(KernelError::shape(
                    "decoder",
                    format!(
                        "feature enc{l} has {} values, expected {s} for input {xs}",
                        self.backend.len(f)
                    ),
                ));
            }
        }
        let Some(styles) = restyle else {
            return Ok(Features::Given(features));
        };
        if styles.len() != DEPTH {
            return Err(KernelError::shape(
                "decoder",
                format!("{} re-styling stages given, expected {DEPTH}", styles.len()),
            ));
        }
        let b = &*self.backend;
        let ws = &mut self.works[wi];
        if ws.restyled.is_none() {
            ws.restyled = Some(
                shapes
                    .iter()
                    .map(|s| b.zeros(s.len()))
                    .collect::<Result<_, _>>()?,
            );
        }
        let Some(out) = ws.restyled.as_mut() else {
            return Err(KernelError::shape(
                "decoder",
                "re-styling buffers were not allocated",
            ));
        };
        for l in 0..DEPTH {
            let (scale, shift) = &styles[l];
            b.channel_affine(&features[l], shapes[l], scale, shift, &mut out[l])?;
        }
        Ok(Features::Restyled)
    }

    /// The loss and its gradients, writing `dlogits` in workspace `wi`.
    fn loss(
        &mut self,
        wi: usize,
        labels: &B::Labels,
        loss: &Loss,
    ) -> Result<StepStats, KernelError> {
        let b = &*self.backend;
        let ws = &mut self.works[wi];
        let ls = ws.xs.with_c(self.classes);
        let ce = b.softmax_cross_entropy(
            &ws.logits,
            ls,
            labels,
            loss.class_weights.as_deref(),
            &mut ws.dlogits,
        )?;
        let dice = b.soft_dice_acc(&ws.logits, ls, labels, loss.dice_weight, &mut ws.dlogits)?;
        Ok(StepStats {
            loss: ce + loss.dice_weight * dice,
            cross_entropy: ce,
            dice,
        })
    }

    /// Forward, loss and backward through the whole network; gradients land in [`UNet::gradients`].
    pub fn loss_and_gradients(
        &mut self,
        x: &B::Buffer,
        xs: Shape,
        labels: &B::Labels,
        loss: &Loss,
    ) -> Result<StepStats, KernelError> {
        self.require_training()?;
        let wi = self.workspace(xs)?;
        {
            let (net, _, ws) = self.parts(wi);
            net.encoder_forward(x, ws)?;
            net.decoder_forward(Features::Own, ws)?;
        }
        let stats = self.loss(wi, labels, loss)?;
        let (net, grads, ws) = self.parts(wi);
        net.decoder_backward(ws, grads, true)?;
        net.encoder_backward(x, ws, grads)?;
        Ok(stats)
    }

    /// One full training step: forward, loss, backward through decoder and encoder, and an optimiser
    /// step on every parameter. Returns the loss before the update.
    pub fn train_step(
        &mut self,
        x: &B::Buffer,
        xs: Shape,
        labels: &B::Labels,
        loss: &Loss,
        optim: &Optim,
    ) -> Result<StepStats, KernelError> {
        let stats = self.loss_and_gradients(x, xs, labels, loss)?;
        self.optimizer_step(optim, Part::All)?;
        Ok(stats)
    }

    /// Forward, loss and backward through the decoder and head only, from given (frozen-encoder)
    /// features, optionally re-styled per stage by `(scale, shift)` ([`crate::style`]).
    pub fn decoder_loss_and_gradients(
        &mut self,
        features: &[B::Buffer],
        xs: Shape,
        labels: &B::Labels,
        loss: &Loss,
        restyle: Option<&[(Vec<f32>, Vec<f32>)]>,
    ) -> Result<StepStats, KernelError> {
        self.require_training()?;
        let wi = self.workspace(xs)?;
        let feats = self.prepare_features(wi, features, restyle)?;
        {
            let (net, _, ws) = self.parts(wi);
            net.decoder_forward(feats, ws)?;
        }
        let stats = self.loss(wi, labels, loss)?;
        let (net, grads, ws) = self.parts(wi);
        net.decoder_backward(ws, grads, false)?;
        Ok(stats)
    }

    /// One decoder-only training step (the encoder is frozen): updates the decoder and head.
    pub fn decoder_train_step(
        &mut self,
        features: &[B::Buffer],
        xs: Shape,
        labels: &B::Labels,
        loss: &Loss,
        optim: &Optim,
        restyle: Option<&[(Vec<f32>, Vec<f32>)]>,
    ) -> Result<StepStats, KernelError> {
        let stats = self.decoder_loss_and_gradients(features, xs, labels, loss, restyle)?;
        self.optimizer_step(optim, Part::Decoder)?;
        Ok(stats)
    }

    fn optimizer_step(&mut self, optim: &Optim, part: Part) -> Result<(), KernelError> {
        self.require_training()?;
        let kind = std::mem::discriminant(&optim.kind);
        if self.opt_kind != Some(kind) {
            // Another optimiser family: its state means nothing to this one.
            self.reset_optimizer();
            self.opt_kind = Some(kind);
        }
        let first = match part {
            Part::All => 0,
            Part::Decoder => FIRST_DECODER_TENSOR,
        };
        let b = &*self.backend;
        for i in first..self.params.len() {
            if optim.prox_mu != 0.0
                && i >= FIRST_DECODER_TENSOR
                && let Some(global) = &self.global_decoder
            {
                // FedProx: g += μ·(w − w_global).
                b.axpy(optim.prox_mu, &self.params[i], &mut self.grads[i])?;
                b.axpy(
                    -optim.prox_mu,
                    &global[i - FIRST_DECODER_TENSOR],
                    &mut self.grads[i],
                )?;
            }
            if self.opt_state[i].is_empty() {
                let n = b.len(&self.params[i]);
                self.opt_state[i] = (0..optim.state_buffers())
                    .map(|_| b.zeros(n))
                    .collect::<Result<_, _>>()?;
            }
            self.opt_steps[i] += 1;
            b.optimizer_step(
                optim.at_step(self.opt_steps[i]),
                &mut self.params[i],
                &self.grads[i],
                &mut self.opt_state[i],
            )?;
        }
        Ok(())
    }

    /// Input shape of each layer for an input batch of shape `xs`.
    fn layer_inputs(&self, xs: Shape) -> Vec<Shape> {
        (0..LAYERS)
            .map(|layer| {
                let c_in = self.layers[layer].c_in;
                let l = if layer < dec(0, 0) {
                    layer / 2
                } else if layer < HEAD {
                    (layer - dec(0, 0)) / 2
                } else {
                    0
                };
                level(xs, l, c_in)
            })
            .collect()
    }

    /// Every convolution in parameter order, as (parameter-name prefix, geometry, input shape) for
    /// an input batch of shape `xs`: what a per-layer benchmark times.
    pub fn conv_layers(&self, xs: Shape) -> Vec<(String, Conv, Shape)> {
        layer_specs(self.classes())
            .into_iter()
            .zip(self.layer_inputs(xs))
            .map(|((name, conv), input)| (name, conv, input))
            .collect()
    }

    /// Floating-point operations of one inference pass (convolutions only).
    pub fn forward_flops(&self, xs: Shape) -> u64 {
        self.layer_inputs(xs)
            .iter()
            .zip(&self.layers)
            .map(|(s, c)| c.forward_flops(*s))
            .sum()
    }

    /// Floating-point operations of [`UNet::decoder_train_step`]: forward, backward-data and
    /// backward-weight of every decoder conv and the head (stage 3's backward-data is skipped, as
    /// the frozen features need no gradient and nothing lies below it).
    pub fn decoder_step_flops(&self, xs: Shape) -> u64 {
        let ins = self.layer_inputs(xs);
        (dec(0, 0)..LAYERS)
            .map(|l| {
                let f = self.layers[l].forward_flops(ins[l]);
                if l == dec(DEPTH - 2, 0) { 2 * f } else { 3 * f }
            })
            .sum()
    }

    /// Floating-point operations of [`UNet::train_step`]: forward, backward-data (except into the
    /// image) and backward-weight of every conv.
    pub fn full_step_flops(&self, xs: Shape) -> u64 {
        let ins = self.layer_inputs(xs);
        (0..LAYERS)
            .map(|l| {
                let f = self.layers[l].forward_flops(ins[l]);
                if l == enc(0, 0) { 2 * f } else { 3 * f }
            })
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn with_classes_keeps_every_tensor_but_the_head() {
        let base = Params::init(2, 1).unwrap();
        let three = base.with_classes(3, 9).unwrap();
        assert_eq!(three.classes, 3);
        assert_eq!(three.tensors.len(), base.tensors.len());
        let mut redrawn = Vec::new();
        for (a, b) in base.tensors.iter().zip(&three.tensors) {
            assert_eq!(a.name, b.name);
            if a.shape == b.shape {
                assert_eq!(a.data, b.data, "{} kept", a.name);
            } else {
                redrawn.push(b.name.clone());
            }
        }
        // Only the head's weight and bias depend on the class count.
        assert_eq!(redrawn.len(), 2, "{redrawn:?}");
        assert_eq!(
            three,
            Params::init(2, 1).unwrap().with_classes(3, 9).unwrap()
        );
        assert!(base.with_classes(0, 0).is_err());
    }

    #[test]
    fn parameter_counts_match_the_architecture() {
        let p = Params::init(2, 1).unwrap();
        assert_eq!(p.encoder_len(), 1_178_480);
        assert_eq!(p.decoder_len(), 783_874);
        assert_eq!(p.decoder_flat().len(), 783_874);
        assert_eq!(p.tensors.len(), 38);
        assert!(p.get("decoder.3.conv1.weight").is_some());
        assert_eq!(
            p.get("decoder.3.conv1.weight").unwrap().shape,
            vec![128, 384, 3, 3]
        );
        assert_eq!(
            p.get("decoder.head.weight").unwrap().shape,
            vec![2, 16, 1, 1]
        );
        p.validate().unwrap();
    }

    #[test]
    fn init_is_seeded_and_bounded_like_pytorch() {
        let a = Params::init(3, 7).unwrap();
        assert_eq!(a, Params::init(3, 7).unwrap());
        assert_ne!(a, Params::init(3, 8).unwrap());
        let w = a.get("encoder.1.conv1.weight").unwrap();
        let bound = 1.0 / (16.0f32 * 9.0).sqrt();
        assert!(w.data.iter().all(|v| v.abs() <= bound));
        // Uniform in ±b has variance b²/3.
        let var = w.data.iter().map(|v| v * v).sum::<f32>() / w.data.len() as f32;
        assert!((var / (bound * bound / 3.0) - 1.0).abs() < 0.1, "{var}");
    }

    #[test]
    fn flat_decoder_round_trips_and_rejects_wrong_length() {
        let mut p = Params::init(2, 3).unwrap();
        let mut flat = p.decoder_flat();
        flat.iter_mut().for_each(|v| *v += 1.0);
        p.set_decoder_flat(&flat).unwrap();
        assert_eq!(p.decoder_flat(), flat);
        assert!(p.set_decoder_flat(&flat[1..]).is_err());
    }

    #[test]
    fn bad_inputs_are_errors_and_flops_add_up() {
        let b = Arc::new(crate::cpu::CpuBackend::new());
        let mut net = UNet::init(b.clone(), 2, 1).unwrap();
        let x = b.upload(&vec![0.0; 24 * 24]).unwrap();
        let err = net.forward(&x, Shape::new(1, 1, 24, 24)).unwrap_err();
        assert!(err.to_string().contains("multiples of 16"), "{err}");
        let x = b.upload(&[0.0; 10]).unwrap();
        assert!(net.forward(&x, Shape::new(1, 1, 16, 16)).is_err());
        let feats = vec![b.upload(&[0.0]).unwrap()];
        let labels = b.upload_labels(&[0; 256]).unwrap();
        let optim = Optim::sgd(0.1, 0.0);
        let xs = Shape::new(1, 1, 16, 16);
        assert!(
            net.decoder_train_step(&feats, xs, &labels, &Loss::default(), &optim, None)
                .is_err()
        );

        let xs = Shape::new(4, 1, 128, 128);
        let fwd = net.forward_flops(xs);
        // encoder.0.conv1: 2·16·9 flops per pixel; its backward-data pass is skipped.
        let first = 2 * 16 * 9 * 4 * 128 * 128;
        assert_eq!(net.full_step_flops(xs), 3 * fwd - first);
        assert!(net.decoder_step_flops(xs) < net.full_step_flops(xs));
    }

    #[test]
    fn optimizer_states_average_by_weight_and_refuse_mismatches() {
        let a = OptimizerState {
            steps: vec![0, 8],
            buffers: vec![vec![], vec![vec![1.0, 2.0], vec![4.0, 0.0]]],
        };
        let b = OptimizerState {
            steps: vec![0, 8],
            buffers: vec![vec![], vec![vec![3.0, 6.0], vec![0.0, 8.0]]],
        };
        let m = OptimizerState::weighted_mean(&[(&a, 3.0), (&b, 1.0)]).unwrap();
        assert_eq!(m.steps, vec![0, 8]);
        assert!(m.buffers[0].is_empty());
        assert_eq!(m.buffers[1], vec![vec![1.5, 3.0], vec![3.0, 2.0]]);

        let unstepped = OptimizerState {
            steps: vec![0, 0],
            buffers: vec![vec![], vec![]],
        };
        let err = OptimizerState::weighted_mean(&[(&a, 1.0), (&unstepped, 1.0)]).unwrap_err();
        assert!(err.to_string().contains("tensor 1"), "{err}");
        let short = OptimizerState {
            steps: vec![0],
            buffers: vec![vec![]],
        };
        assert!(OptimizerState::weighted_mean(&[(&a, 1.0), (&short, 1.0)]).is_err());
        assert!(OptimizerState::weighted_mean(&[(&a, 0.0), (&b, 0.0)]).is_err());
        assert!(OptimizerState::weighted_mean(&[(&a, -1.0), (&b, 2.0)]).is_err());
        assert!(OptimizerState::weighted_mean(&[]).is_err());
    }

    #[test]
    fn clearing_the_first_moment_keeps_adamw_second_moment_and_steps() {
        let b = Arc::new(crate::cpu::CpuBackend::new());
        let mut net = UNet::init(b.clone(), 2, 1).unwrap();
        let xs = Shape::new(1, 1, 16, 16);
        let pixels: Vec<f32> = (0..256).map(|i| (i % 7) as f32 / 7.0).collect();
        let x = b.upload(&pixels).unwrap();
        let labels: Vec<u8> = (0..256).map(|i| u8::from(i % 5 == 0)).collect();
        let l = b.upload_labels(&labels).unwrap();
        net.train_step(&x, xs, &l, &Loss::default(), &Optim::adamw(1e-3))
            .unwrap();
        let before = net.optimizer_state().unwrap();
        // After AdamW's first step m = (1 − β1)·g and v = (1 − β2)·g², so v = 0.1·m²: buffer 0
        // is the first moment, the one cleared.
        let head = before.buffers.last().unwrap();
        assert!(head[0].iter().any(|&m| m != 0.0));
        for (&m, &v) in head[0].iter().zip(&head[1]) {
            assert!(
                (v - 0.1 * m * m).abs() <= 1e-3 * v.abs() + 1e-12,
                "m {m}, v {v}"
            );
        }
        let mut cleared = before.clone();
        cleared.clear_first_moment();
        assert_eq!(cleared.steps, before.steps);
        for (c, o) in cleared.buffers.iter().zip(&before.buffers) {
            assert_eq!(c.len(), o.len());
            if let [first, second] = c.as_slice() {
                assert!(first.iter().all(|&m| m == 0.0));
                assert_eq!(second, &o[1]);
            }
        }
        net.set_optimizer_state(&Optim::adamw(1e-3), &cleared)
            .unwrap();
        assert_eq!(net.optimizer_state().unwrap(), cleared);
    }
}
