//! Fused CPU backward passes for the ops in [`super`]: one parallel pass over plain slices per
//! op instead of a dozen candle ops, each allocating and filling a fresh activation-sized tensor
//! (SPEC §2's training step spent more time in those than in its matmuls).
//!
//! The results are plain (non-differentiable) tensors, which is all `backward()` needs: zrag
//! never differentiates a gradient. Reductions over rows (the bias, gamma and beta gradients)
//! sum fixed blocks of rows in parallel and then the block sums in order, so the result does not
//! depend on the thread count or on rayon's work stealing. The tests in [`super`] check every
//! kernel against the same gradient built from candle's primitive ops.

use candle_core::{Device, Tensor};
use rayon::prelude::*;

use super::{
    attention_probs, fast_exp, gemm_into, lane_dot, lane_sum, normal_cdf, with_cpu_f32, SendPtr,
    ELEMENTS_PER_TASK, LANES,
};

/// Rows per block of a row reduction (and per rayon task of a row-wise kernel).
const ROWS_PER_BLOCK: usize = 64;

/// Sums `blocks` (each `width` long) in order.
fn sum_in_order(blocks: Vec<Vec<f32>>, width: usize) -> Vec<f32> {
    let mut total = vec![0f32; width];
    for block in blocks {
        for (t, v) in total.iter_mut().zip(block) {
            *t += v;
        }
    }
    total
}

multiversion! {
    fn add_assign(acc: &mut [f32], row: &[f32]) {
        for (a, &v) in acc.iter_mut().zip(row) {
            *a += v;
        }
    }
}

/// Column sums of a row-major `(rows, width)` matrix: a bias's gradient.
fn column_sums(values: &[f32], width: usize) -> Vec<f32> {
    let blocks = values
        .par_chunks(ROWS_PER_BLOCK * width)
        .map(|block| {
            let mut acc = vec![0f32; width];
            for row in block.chunks_exact(width) {
                add_assign(&mut acc, row);
            }
            acc
        })
        .collect();
    sum_in_order(blocks, width)
}

/// `Σ_rows grad` for `grad` `(rows, out)`: the gradient of a dense layer's bias.
pub(super) fn bias_grad(grad: &Tensor) -> candle_core::Result<Tensor> {
    let width = grad.dim(candle_core::D::Minus1)?;
    let sums = with_cpu_f32(grad, "linear bias gradient", |g| Ok(column_sums(g, width)))?;
    Tensor::from_vec(sums, width, &Device::Cpu)
}

multiversion! {
    /// One row of the layer-norm backward: writes `grad_x` and adds this row's terms to the
    /// gamma and beta gradients.
    fn layer_norm_backward_row(
        x: &[f32],
        grad: &[f32],
        gamma: &[f32],
        eps: f32,
        grad_x: &mut [f32],
        grad_gamma: &mut [f32],
        grad_beta: &mut [f32],
    ) {
        let width = x.len() as f32;
        // The forward's statistics, recomputed the same way (two passes) rather than stored.
        let mean = lane_sum(x, |v| v) / width;
        let variance = lane_sum(x, |v| (v - mean) * (v - mean)) / width;
        let inv_std = 1.0 / (variance + eps).sqrt();
        // With x̂ = (x - mean) inv_std and ĝ = grad * gamma:
        // grad_x = inv_std (ĝ - mean(ĝ) - x̂ mean(ĝ x̂)).
        let mut sum_g = [0f32; LANES];
        let mut sum_gx = [0f32; LANES];
        let lanes = x.len() / LANES * LANES;
        for start in (0..lanes).step_by(LANES) {
            for l in 0..LANES {
                let i = start + l;
                let g_hat = grad[i] * gamma[i];
                sum_g[l] += g_hat;
                sum_gx[l] += g_hat * (x[i] - mean) * inv_std;
            }
        }
        let mut mean_g: f32 = sum_g.iter().sum();
        let mut mean_gx: f32 = sum_gx.iter().sum();
        for i in lanes..x.len() {
            let g_hat = grad[i] * gamma[i];
            mean_g += g_hat;
            mean_gx += g_hat * (x[i] - mean) * inv_std;
        }
        mean_g /= width;
        mean_gx /= width;
        for i in 0..x.len() {
            let x_hat = (x[i] - mean) * inv_std;
            grad_x[i] = (grad[i] * gamma[i] - mean_g - x_hat * mean_gx) * inv_std;
            grad_gamma[i] += grad[i] * x_hat;
            grad_beta[i] += grad[i];
        }
    }
}

/// Gradients of [`super::layer_norm`] with respect to `x`, `gamma` and `beta`.
pub(super) fn layer_norm_backward(
    x: &Tensor,
    gamma: &Tensor,
    grad: &Tensor,
    eps: f32,
) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
    let width = x.dim(candle_core::D::Minus1)?;
    let (grad_x, grad_gamma, grad_beta) = with_cpu_f32(x, "layer-norm input", |x| {
        with_cpu_f32(gamma, "layer-norm gamma", |gamma| {
            with_cpu_f32(grad, "layer-norm gradient", |grad| {
                if gamma.len() != width || grad.len() != x.len() {
                    candle_core::bail!("layer-norm backward: shapes do not match");
                }
                let mut grad_x = vec![0f32; x.len()];
                let block = ROWS_PER_BLOCK * width;
                let partials: Vec<(Vec<f32>, Vec<f32>)> = grad_x
                    .par_chunks_mut(block)
                    .zip(x.par_chunks(block).zip(grad.par_chunks(block)))
                    .map(|(grad_x, (x, grad))| {
                        let mut grad_gamma = vec![0f32; width];
                        let mut grad_beta = vec![0f32; width];
                        for ((gx, x), g) in grad_x
                            .chunks_exact_mut(width)
                            .zip(x.chunks_exact(width))
                            .zip(grad.chunks_exact(width))
                        {
                            layer_norm_backward_row(
                                x,
                                g,
                                gamma,
                                eps,
                                gx,
                                &mut grad_gamma,
                                &mut grad_beta,
                            );
                        }
                        (grad_gamma, grad_beta)
                    })
                    .collect();
                let (gammas, betas): (Vec<_>, Vec<_>) = partials.into_iter().unzip();
                Ok((
                    grad_x,
                    sum_in_order(gammas, width),
                    sum_in_order(betas, width),
                ))
            })
        })
    })?;
    Ok((
        Tensor::from_vec(grad_x, x.shape(), &Device::Cpu)?,
        Tensor::from_vec(grad_gamma, width, &Device::Cpu)?,
        Tensor::from_vec(grad_beta, width, &Device::Cpu)?,
    ))
}

multiversion! {
    /// `out = grad * (Φ(x) + x φ(x))`, the derivative of `x Φ(x)`.
    fn gelu_erf_backward_slice(x: &[f32], grad: &[f32], out: &mut [f32]) {
        // 1 / sqrt(2π)
        const INV_SQRT_2PI: f32 = 0.398_942_3;
        for ((o, &x), &g) in out.iter_mut().zip(x).zip(grad) {
            let pdf = INV_SQRT_2PI * fast_exp(-0.5 * x * x);
            *o = g * (normal_cdf(x) + x * pdf);
        }
    }
}

/// Gradient of [`super::gelu_erf`] with respect to its input.
pub(super) fn gelu_erf_backward(x: &Tensor, grad: &Tensor) -> candle_core::Result<Tensor> {
    let out = with_cpu_f32(x, "gelu input", |x| {
        with_cpu_f32(grad, "gelu gradient", |grad| {
            if grad.len() != x.len() {
                candle_core::bail!("gelu backward: gradient and input sizes differ");
            }
            let mut out = vec![0f32; x.len()];
            out.par_chunks_mut(ELEMENTS_PER_TASK)
                .zip(x.par_chunks(ELEMENTS_PER_TASK))
                .zip(grad.par_chunks(ELEMENTS_PER_TASK))
                .for_each(|((out, x), grad)| gelu_erf_backward_slice(x, grad, out));
            Ok(out)
        })
    })?;
    Tensor::from_vec(out, x.shape(), &Device::Cpu)
}

multiversion! {
    /// `grad_probs <- probs * (grad_probs - <grad_probs, probs>) * scale`: the softmax's
    /// backward, row by row, in place.
    fn softmax_backward_rows(probs: &[f32], grad_probs: &mut [f32], width: usize, scale: f32) {
        for (p, g) in probs.chunks_exact(width).zip(grad_probs.chunks_exact_mut(width)) {
            let dot = lane_dot(p, g);
            for (g, &p) in g.iter_mut().zip(p) {
                *g = p * (*g - dot) * scale;
            }
        }
    }
}

/// Gradient of [`super::masked_softmax`] with respect to its scores, from its output `probs`
/// and the output's gradient `grad` (same shape; rows along the last dimension).
pub(super) fn softmax_backward(
    probs: &Tensor,
    grad: &Tensor,
    scale: f32,
) -> candle_core::Result<Tensor> {
    let width = probs.dim(candle_core::D::Minus1)?;
    let mut out = with_cpu_f32(grad, "softmax gradient", |grad| Ok(grad.to_vec()))?;
    with_cpu_f32(probs, "softmax output", |probs| {
        if probs.len() != out.len() {
            candle_core::bail!("softmax backward: gradient and output sizes differ");
        }
        let block = ROWS_PER_BLOCK * width;
        out.par_chunks_mut(block)
            .zip(probs.par_chunks(block))
            .for_each(|(g, p)| softmax_backward_rows(p, g, width, scale));
        Ok(())
    })?;
    Tensor::from_vec(out, probs.shape(), &Device::Cpu)
}

/// Gradient of [`super::attention`] with respect to `qkv` `(batch * seq, 3 * hidden)`, for the
/// context's gradient `grad` `(batch * seq, hidden)`.
///
/// One (sequence, head) pair per task, like the forward: recompute the probabilities
/// `P = softmax(scale q kᵀ + bias)`, then `dV = Pᵀ dO`, `dP = dO Vᵀ`,
/// `dS = scale P ∘ (dP - rowsum(dP ∘ P))`, `dQ = dS K`, `dK = dSᵀ Q`, each written straight into
/// its head's columns of the result.
pub(super) fn attention_backward(
    qkv: &Tensor,
    key_bias: &Tensor,
    grad: &Tensor,
    batch: usize,
    heads: usize,
) -> candle_core::Result<Tensor> {
    let (rows, width) = qkv.dims2()?;
    let (seq, hidden) = (rows / batch, width / 3);
    let head_dim = hidden / heads;
    let scale = 1.0 / (head_dim as f32).sqrt();
    if grad.dims2()? != (rows, hidden) || key_bias.dims2()? != (batch, seq) {
        candle_core::bail!(
            "attention backward: gradient {:?} / bias {:?} do not fit qkv {:?}",
            grad.shape(),
            key_bias.shape(),
            qkv.shape()
        );
    }
    let grad_qkv = with_cpu_f32(qkv, "attention qkv", |qkv| {
        with_cpu_f32(key_bias, "attention bias", |bias| {
            with_cpu_f32(grad, "attention gradient", |grad| {
                let mut grad_qkv = vec![0f32; rows * width];
                let out = SendPtr(grad_qkv.as_mut_ptr());
                (0..batch * heads).into_par_iter().for_each_init(
                    || (vec![0f32; seq * seq], vec![0f32; seq * seq]),
                    |(probs, grad_probs), task| {
                        let (b, head) = (task / heads, task % heads);
                        let base = b * seq * width + head * head_dim;
                        let q = qkv[base..].as_ptr();
                        let k = qkv[base + hidden..].as_ptr();
                        let v = qkv[base + 2 * hidden..].as_ptr();
                        let d_out = grad[b * seq * hidden + head * head_dim..].as_ptr();
                        // The whole `SendPtr` into the closure, not its raw field.
                        let block = out;
                        let (w, h, s) = (width as isize, hidden as isize, seq as isize);
                        // SAFETY: as in the forward kernel, every operand addresses rows < seq
                        // and columns < head_dim of this (b, head) block of its buffer; the
                        // three blocks of `grad_qkv` written here belong to this task alone.
                        unsafe {
                            // P = softmax(scale q kᵀ + bias), as in the forward.
                            attention_probs(
                                q,
                                k,
                                &bias[b * seq..(b + 1) * seq],
                                (seq, head_dim, width),
                                probs,
                            );
                            // dV = Pᵀ dO.
                            gemm_into(
                                (seq, head_dim, seq),
                                (block.0.add(base + 2 * hidden), 1, w),
                                (probs.as_ptr(), s, 1),
                                (d_out, 1, h),
                            );
                            // dP = dO Vᵀ, then dS in place.
                            gemm_into(
                                (seq, seq, head_dim),
                                (grad_probs.as_mut_ptr(), 1, s),
                                (d_out, 1, h),
                                (v, w, 1),
                            );
                            softmax_backward_rows(probs, grad_probs, seq, scale);
                            // dQ = dS K.
                            gemm_into(
                                (seq, head_dim, seq),
                                (block.0.add(base), 1, w),
                                (grad_probs.as_ptr(), 1, s),
                                (k, 1, w),
                            );
                            // dK = dSᵀ Q.
                            gemm_into(
                                (seq, head_dim, seq),
                                (block.0.add(base + hidden), 1, w),
                                (grad_probs.as_ptr(), s, 1),
                                (q, 1, w),
                            );
                        }
                    },
                );
                Ok(grad_qkv)
            })
        })
    })?;
    Tensor::from_vec(grad_qkv, (rows, width), &Device::Cpu)
}
