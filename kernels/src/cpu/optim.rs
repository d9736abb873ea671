//! Optimiser steps on the CPU, following PyTorch's documented update rules (`torch.optim.SGD` with
//! dampening 0 and `torch.optim.AdamW`). The caller checked the step against
//! `OptimStep::check` (lengths, and AdamW's step counting from 1).

use crate::OptimStep;
use rayon::prelude::*;

const CHUNK: usize = 1 << 14;

pub(crate) fn step(step: OptimStep, p: &mut [f32], g: &[f32], state: &mut [&mut [f32]]) {
    match step {
        OptimStep::Sgd {
            lr,
            momentum,
            weight_decay,
        } => {
            let v = &mut *state[0];
            let body = |(p, g, v): (&mut [f32], &[f32], &mut [f32])| {
                for ((p, &g), v) in p.iter_mut().zip(g).zip(v.iter_mut()) {
                    // Zero-initialised velocity makes the first step v = g, as PyTorch does.
                    *v = momentum * *v + (g + weight_decay * *p);
                    *p -= lr * *v;
                }
            };
            if p.len() >= super::ops::PAR_MIN {
                p.par_chunks_mut(CHUNK)
                    .zip(g.par_chunks(CHUNK))
                    .zip(v.par_chunks_mut(CHUNK))
                    .for_each(|((p, g), v)| body((p, g, v)));
            } else {
                body((p, g, v));
            }
        }
        OptimStep::AdamW {
            lr,
            beta1,
            beta2,
            eps,
            weight_decay,
            step,
        } => {
            let t = step as i32;
            let bc1 = 1.0 - (beta1 as f64).powi(t);
            let bc2 = 1.0 - (beta2 as f64).powi(t);
            // p −= lr·m̂/(√v̂ + ε) with m̂ = m/bc1, v̂ = v/bc2.
            let step_size = (lr as f64 / bc1) as f32;
            let inv_sqrt_bc2 = (1.0 / bc2.sqrt()) as f32;
            let decay = 1.0 - lr * weight_decay;
            let (m, v) = state.split_at_mut(1);
            let (m, v) = (&mut *m[0], &mut *v[0]);
            let body = |(p, g, m, v): (&mut [f32], &[f32], &mut [f32], &mut [f32])| {
                for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
                    *p *= decay;
                    *m = beta1 * *m + (1.0 - beta1) * g;
                    *v = beta2 * *v + (1.0 - beta2) * g * g;
                    *p -= step_size * *m / (v.sqrt() * inv_sqrt_bc2 + eps);
                }
            };
            if p.len() >= super::ops::PAR_MIN {
                p.par_chunks_mut(CHUNK)
                    .zip(g.par_chunks(CHUNK))
                    .zip(m.par_chunks_mut(CHUNK))
                    .zip(v.par_chunks_mut(CHUNK))
                    .for_each(|(((p, g), m), v)| body((p, g, m, v)));
            } else {
                body((p, g, m, v));
            }
        }
    }
}
