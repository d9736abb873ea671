//! Losses on the CPU: softmax cross-entropy and soft Dice over `[n, k, h, w]` logits.
//!
//! Both work image by image (rayon over the batch) and accumulate sums in f64, so the loss of a
//! large batch does not drift with the summation order. Labels were range-checked by the caller.

use crate::{DICE_EPS, IGNORE_LABEL, Shape};
use rayon::prelude::*;

/// Softmax of one pixel's `k` logits (strided by `hw` in `logits`) into `p`.
fn softmax_at(logits: &[f32], hw: usize, px: usize, p: &mut [f32]) {
    let mut m = f32::NEG_INFINITY;
    for (j, pj) in p.iter_mut().enumerate() {
        *pj = logits[j * hw + px];
        m = m.max(*pj);
    }
    let mut s = 0.0f32;
    for pj in p.iter_mut() {
        *pj = (*pj - m).exp();
        s += *pj;
    }
    let inv = 1.0 / s;
    p.iter_mut().for_each(|pj| *pj *= inv);
}

/// Returns the mean loss; writes `dlogits`. `class_weights` (length `k`) follow PyTorch's `weight=`.
pub(crate) fn softmax_cross_entropy(
    logits: &[f32],
    ls: Shape,
    labels: &[u8],
    class_weights: Option<&[f32]>,
    dlogits: &mut [f32],
) -> f32 {
    let (k, hw) = (ls.c, ls.plane());
    if k == 0 || hw == 0 || ls.n == 0 {
        dlogits.fill(0.0);
        return 0.0;
    }
    // Per image: (Σ w·(−log p_label), Σ w), gradients unnormalised.
    let sums: Vec<(f64, f64)> = dlogits
        .par_chunks_mut(k * hw)
        .zip(logits.par_chunks(k * hw))
        .zip(labels.par_chunks(hw))
        .map(|((dl, lg), lab)| {
            let mut p = vec![0.0f32; k];
            let (mut loss, mut wsum) = (0.0f64, 0.0f64);
            for (px, &l) in lab.iter().enumerate() {
                if l == IGNORE_LABEL {
                    (0..k).for_each(|j| dl[j * hw + px] = 0.0);
                    continue;
                }
                let l = l as usize;
                let wgt = class_weights.map_or(1.0, |cw| cw[l]);
                softmax_at(lg, hw, px, &mut p);
                // log p_l computed from the logits (log-sum-exp) rather than ln(p_l), which
                // underflows for confident wrong predictions.
                let m = (0..k)
                    .map(|j| lg[j * hw + px])
                    .fold(f32::NEG_INFINITY, f32::max);
                let lse = m as f64
                    + (0..k)
                        .map(|j| ((lg[j * hw + px] - m) as f64).exp())
                        .sum::<f64>()
                        .ln();
                loss += wgt as f64 * (lse - lg[l * hw + px] as f64);
                wsum += wgt as f64;
                for (j, &pj) in p.iter().enumerate() {
                    let t = if j == l { 1.0 } else { 0.0 };
                    dl[j * hw + px] = wgt * (pj - t);
                }
            }
            (loss, wsum)
        })
        .collect();
    let (loss, wsum) = sums
        .iter()
        .fold((0.0, 0.0), |(a, b), (c, d)| (a + c, b + d));
    if wsum <= 0.0 {
        dlogits.fill(0.0);
        return 0.0;
    }
    let inv = (1.0 / wsum) as f32;
    super::ops::for_chunks(dlogits, 1 << 14, |_, c| {
        c.iter_mut().for_each(|v| *v *= inv)
    });
    (loss / wsum) as f32
}

/// Returns the soft Dice loss; adds `weight ×` its gradient to `dlogits`.
pub(crate) fn soft_dice_acc(
    logits: &[f32],
    ls: Shape,
    labels: &[u8],
    weight: f32,
    dlogits: &mut [f32],
) -> f32 {
    let (k, hw) = (ls.c, ls.plane());
    if k == 0 {
        return 0.0;
    }
    let eps = DICE_EPS as f64;
    // Pass 1: per class Σ p·t, Σ p, Σ t over every labelled pixel of the batch.
    let per_image: Vec<Vec<[f64; 3]>> = if hw == 0 {
        Vec::new()
    } else {
        logits
            .par_chunks(k * hw)
            .zip(labels.par_chunks(hw))
            .map(|(lg, lab)| {
                let mut acc = vec![[0.0f64; 3]; k];
                let mut p = vec![0.0f32; k];
                for (px, &l) in lab.iter().enumerate() {
                    if l == IGNORE_LABEL {
                        continue;
                    }
                    softmax_at(lg, hw, px, &mut p);
                    for (j, &pj) in p.iter().enumerate() {
                        acc[j][1] += pj as f64;
                    }
                    acc[l as usize][0] += p[l as usize] as f64;
                    acc[l as usize][2] += 1.0;
                }
                acc
            })
            .collect()
    };
    let mut sums = vec![[0.0f64; 3]; k];
    for img in &per_image {
        for (s, a) in sums.iter_mut().zip(img) {
            (0..3).for_each(|i| s[i] += a[i]);
        }
    }
    let denom: Vec<f64> = sums.iter().map(|s| s[1] + s[2] + eps).collect();
    let dice: Vec<f64> = sums
        .iter()
        .zip(&denom)
        .map(|(s, d)| (2.0 * s[0] + eps) / d)
        .collect();
    let loss = 1.0 - dice.iter().sum::<f64>() / k as f64;
    if weight == 0.0 || hw == 0 {
        return loss as f32;
    }
    // ∂L/∂p_j = −(1/k)·(2·t_j/S_j − (2·I_j + ε)/S_j²): a per-class constant `b_j` plus `a_j` on the
    // labelled class.
    let a: Vec<f32> = denom
        .iter()
        .map(|d| (-2.0 / (k as f64 * d)) as f32)
        .collect();
    let b: Vec<f32> = dice
        .iter()
        .zip(&denom)
        .map(|(dc, d)| (dc / (k as f64 * d)) as f32)
        .collect();
    // Pass 2: through the softmax, dz_j = p_j·(g_j − Σ_i p_i·g_i).
    dlogits
        .par_chunks_mut(k * hw)
        .zip(logits.par_chunks(k * hw))
        .zip(labels.par_chunks(hw))
        .for_each(|((dl, lg), lab)| {
            let mut p = vec![0.0f32; k];
            for (px, &l) in lab.iter().enumerate() {
                if l == IGNORE_LABEL {
                    continue;
                }
                let l = l as usize;
                softmax_at(lg, hw, px, &mut p);
                let g = |j: usize| b[j] + if j == l { a[j] } else { 0.0 };
                let dot: f32 = p.iter().enumerate().map(|(j, &pj)| pj * g(j)).sum();
                for (j, &pj) in p.iter().enumerate() {
                    dl[j * hw + px] += weight * pj * (g(j) - dot);
                }
            }
        });
    loss as f32
}
