//! Fused tensor operations that keep their gradients: [`linear`], [`attention`],
//! [`masked_softmax`], [`layer_norm`], [`gelu_erf`].
//!
//! candle-nn's fused `layer_norm` and `softmax_last_dim` are fast but have no backward pass,
//! so a model built on them cannot be trained (SPEC §2). The ops here have a fused, parallel
//! CPU forward for speed *and* a fused CPU backward ([`backward`]'s kernels; the dense layer's
//! weight gradients are candle matmuls), so gradients flow through them like through any other
//! op. The tests compare each with the same function built
//! from primitive ops (the `*_composed` twins; for GELU, candle's own `gelu_erf`), values and
//! gradients. Inputs the fast kernels do not handle (other dtypes or devices) fall back to
//! those.
//!
//! The per-row kernels are plain loops over slices, free of libm calls and branches, so the
//! compiler vectorises them; the `multiversion!` macro compiles each one a second time with
//! AVX2+FMA enabled and picks that version at run time when the CPU has them (the crate itself
//! is built for baseline x86-64, i.e. SSE2). The dense layer's forward matmul goes to
//! [`packed_gemm`] (blocked for the encoder's shapes; AVX2+FMA); the other matmuls go to the
//! `gemm` crate, as candle's do. GELU and the softmax's exponentials use [`simd`]'s intrinsics
//! on AVX2+FMA CPUs.
//!
//! Inference-only fusions ([`linear_gelu_erf`], [`linear_add_layer_norm`], [`add_layer_norm`],
//! [`embeddings_layer_norm`]) give the same bits as their separate ops in one pass, and step
//! aside for the separate ops whenever an input tracks gradients.

use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Device, Layout, Shape, Storage, Tensor, D,
};
use rayon::prelude::*;

mod backward;
mod packed_gemm;
mod simd;

/// Rows per rayon task: large enough that scheduling is noise next to the arithmetic.
const MIN_ROWS_PER_TASK: usize = 32;

/// Elements per rayon task for element-wise kernels.
const ELEMENTS_PER_TASK: usize = 16 * 1024;

thread_local! {
    static BATCH_PARALLEL: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` with every matmul on the current thread: for callers that already run one batch
/// per thread (`BertEncoder::embed_with_progress`), where a second level of threads would only
/// contend. An explicit flag rather than "am I on a rayon worker?": the same text must embed
/// to the same bits whether or not its caller happens to run on the pool (gemm's blocking, and
/// so its rounding, depends on its thread count).
pub(crate) fn batch_parallel<T>(f: impl FnOnce() -> T) -> T {
    /// Restores the flag even if `f` panics, so the pool thread is not left single-threaded.
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            BATCH_PARALLEL.with(|flag| flag.set(self.0));
        }
    }
    let _restore = Restore(BATCH_PARALLEL.with(|flag| flag.replace(true)));
    f()
}

/// Whether the current thread is inside [`batch_parallel`].
pub(crate) fn in_batch_parallel_region() -> bool {
    BATCH_PARALLEL.with(|flag| flag.get())
}

/// Layer normalisation over the last dimension: `(x - mean) / sqrt(var + eps) * gamma + beta`.
pub fn layer_norm(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f64,
) -> candle_core::Result<Tensor> {
    let fast = x.dtype() == DType::F32
        && gamma.dtype() == DType::F32
        && beta.dtype() == DType::F32
        && matches!(x.device(), Device::Cpu);
    if !fast {
        return layer_norm_composed(x, gamma, beta, eps);
    }
    x.contiguous()?.apply_op3(
        &gamma.contiguous()?,
        &beta.contiguous()?,
        LayerNormOp { eps: eps as f32 },
    )
}

/// The same layer norm from primitive ops: the reference for tests and the non-CPU fallback.
pub fn layer_norm_composed(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f64,
) -> candle_core::Result<Tensor> {
    let centred = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?;
    let variance = centred.sqr()?.mean_keepdim(D::Minus1)?;
    let normalised = centred.broadcast_div(&(variance + eps)?.sqrt()?)?;
    normalised.broadcast_mul(gamma)?.broadcast_add(beta)
}

struct LayerNormOp {
    eps: f32,
}

multiversion! {
    fn layer_norm_row(x: &[f32], gamma: &[f32], beta: &[f32], eps: f32, out: &mut [f32]) {
        let width = x.len() as f32;
        // Two passes (mean, then variance of the centred row) as PyTorch does; the row is in
        // L1 either way.
        let mean = lane_sum(x, |v| v) / width;
        let variance = lane_sum(x, |v| (v - mean) * (v - mean)) / width;
        let inv_std = 1.0 / (variance + eps).sqrt();
        for (((o, &v), &g), &b) in out.iter_mut().zip(x).zip(gamma).zip(beta) {
            *o = (v - mean) * inv_std * g + b;
        }
    }
}

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "zrag-layer-norm"
    }

    fn cpu_fwd(
        &self,
        x_storage: &CpuStorage,
        x_layout: &Layout,
        gamma_storage: &CpuStorage,
        gamma_layout: &Layout,
        beta_storage: &CpuStorage,
        beta_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(x_storage, x_layout, "layer-norm input")?;
        let gamma = contiguous_f32(gamma_storage, gamma_layout, "layer-norm gamma")?;
        let beta = contiguous_f32(beta_storage, beta_layout, "layer-norm beta")?;
        let width = x_layout.dims().last().copied().unwrap_or(0);
        if width == 0 || gamma.len() != width || beta.len() != width {
            candle_core::bail!(
                "layer-norm: input {:?} does not match gamma {:?} / beta {:?}",
                x_layout.shape(),
                gamma_layout.shape(),
                beta_layout.shape()
            );
        }
        let eps = self.eps;
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(width)
            .zip(x.par_chunks(width))
            .with_min_len(MIN_ROWS_PER_TASK)
            .for_each(|(out_row, x_row)| layer_norm_row(x_row, gamma, beta, eps, out_row));
        Ok((CpuStorage::F32(out), x_layout.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        _beta: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (grad_x, grad_gamma, grad_beta) =
            backward::layer_norm_backward(x, gamma, grad, self.eps)?;
        Ok((Some(grad_x), Some(grad_gamma), Some(grad_beta)))
    }
}

/// Attention probabilities: `softmax(scale * scores + key_bias)` over the last dimension.
///
/// `scores` is `(batch, heads, queries, keys)`; `key_bias` is `(batch, keys)`, 0 for a real
/// token and a large negative number for padding, so padded keys get (exactly) zero weight.
/// The bias is a constant mask: it receives no gradient.
pub fn masked_softmax(
    scores: &Tensor,
    key_bias: &Tensor,
    scale: f64,
) -> candle_core::Result<Tensor> {
    let (batch, _heads, _queries, keys) = scores.dims4()?;
    key_bias.dims2().and_then(|dims| {
        if dims == (batch, keys) {
            Ok(())
        } else {
            candle_core::bail!(
                "masked-softmax: bias {dims:?} does not match scores {:?}",
                scores.shape()
            )
        }
    })?;
    let fast = scores.dtype() == DType::F32
        && key_bias.dtype() == DType::F32
        && matches!(scores.device(), Device::Cpu);
    if !fast {
        return masked_softmax_composed(scores, key_bias, scale);
    }
    scores.contiguous()?.apply_op2(
        &key_bias.contiguous()?,
        MaskedSoftmaxOp {
            scale: scale as f32,
        },
    )
}

/// The same masked softmax from primitive ops (reference and fallback).
pub fn masked_softmax_composed(
    scores: &Tensor,
    key_bias: &Tensor,
    scale: f64,
) -> candle_core::Result<Tensor> {
    let (batch, keys) = key_bias.dims2()?;
    let logits = (scores * scale)?.broadcast_add(&key_bias.reshape((batch, 1, 1, keys))?)?;
    let max = logits.max_keepdim(D::Minus1)?;
    let exp = logits.broadcast_sub(&max)?.exp()?;
    exp.broadcast_div(&exp.sum_keepdim(D::Minus1)?)
}

struct MaskedSoftmaxOp {
    scale: f32,
}

multiversion! {
    /// `row <- softmax(scale * row + bias)`.
    fn softmax_in_place(row: &mut [f32], bias: &[f32], scale: f32) {
        for (x, &b) in row.iter_mut().zip(bias) {
            *x = *x * scale + b;
        }
        let max = lane_max(row);
        let sum = if simd::available() {
            // SAFETY: the CPU has AVX2 and FMA.
            unsafe { simd::exp_shifted_sum(row, max) }
        } else {
            for x in row.iter_mut() {
                *x = fast_exp(*x - max);
            }
            lane_sum(row, |v| v)
        };
        let inv_sum = 1.0 / sum;
        for x in row.iter_mut() {
            *x *= inv_sum;
        }
    }
}

/// Accumulator lanes for reductions: one AVX2 register.
const LANES: usize = 8;

/// `Σ f(x)` over `xs`, accumulated in [`LANES`] independent partial sums. Float addition is
/// not associative, so the compiler never vectorises a plain running sum; with explicit lanes
/// it can.
#[inline(always)]
fn lane_sum(xs: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut acc = [0f32; LANES];
    let chunks = xs.chunks_exact(LANES);
    let tail = chunks.remainder();
    for chunk in chunks {
        for (a, &v) in acc.iter_mut().zip(chunk) {
            *a += f(v);
        }
    }
    acc.iter().sum::<f32>() + tail.iter().map(|&v| f(v)).sum::<f32>()
}

/// `Σ a_i b_i` over the common length, in [`LANES`] lanes like [`lane_sum`].
#[inline(always)]
fn lane_dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let (a_chunks, b_chunks) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let (a_tail, b_tail) = (a_chunks.remainder(), b_chunks.remainder());
    for (ca, cb) in a_chunks.zip(b_chunks) {
        for ((acc, &x), &y) in acc.iter_mut().zip(ca).zip(cb) {
            *acc += x * y;
        }
    }
    a_tail
        .iter()
        .zip(b_tail)
        .fold(acc.iter().sum::<f32>(), |dot, (&x, &y)| dot + x * y)
}

/// The maximum of `xs` (`-inf` if empty), in [`LANES`] lanes like [`lane_sum`].
#[inline(always)]
fn lane_max(xs: &[f32]) -> f32 {
    // `if a > b` rather than `f32::max`: no NaN special case, so it maps to one max instruction.
    let greater = |a: f32, b: f32| if a > b { a } else { b };
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = xs.chunks_exact(LANES);
    let tail = chunks.remainder();
    for chunk in chunks {
        for (a, &v) in acc.iter_mut().zip(chunk) {
            *a = greater(*a, v);
        }
    }
    acc.iter()
        .chain(tail)
        .fold(f32::NEG_INFINITY, |m, &v| greater(m, v))
}

impl CustomOp2 for MaskedSoftmaxOp {
    fn name(&self) -> &'static str {
        "zrag-masked-softmax"
    }

    fn cpu_fwd(
        &self,
        scores_storage: &CpuStorage,
        scores_layout: &Layout,
        bias_storage: &CpuStorage,
        bias_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let scores = contiguous_f32(scores_storage, scores_layout, "masked-softmax scores")?;
        let bias = contiguous_f32(bias_storage, bias_layout, "masked-softmax bias")?;
        let dims = scores_layout.dims();
        let keys = dims[3];
        let rows_per_batch = dims[1] * dims[2];
        let scale = self.scale;
        let mut out = vec![0f32; scores.len()];
        out.par_chunks_mut(keys)
            .zip(scores.par_chunks(keys))
            .enumerate()
            .with_min_len(MIN_ROWS_PER_TASK)
            .for_each(|(row, (out_row, score_row))| {
                let batch = row / rows_per_batch;
                out_row.copy_from_slice(score_row);
                softmax_in_place(out_row, &bias[batch * keys..(batch + 1) * keys], scale);
            });
        Ok((CpuStorage::F32(out), scores_layout.shape().clone()))
    }

    fn bwd(
        &self,
        _scores: &Tensor,
        _bias: &Tensor,
        probs: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let grad_scores = backward::softmax_backward(probs, grad, self.scale)?;
        Ok((Some(grad_scores), None))
    }
}

/// A dense layer `x W + b` for `x` `(rows, in)`, `weight_t` `(in, out)` and `bias` `(out)`.
///
/// The weight is taken transposed from Hugging Face's `(out, in)` layout, i.e. `W^T` stored
/// row-major: gemm then streams it without repacking, which for short inputs (a query of a
/// few tokens) halves the time of the layer. The output starts as the broadcast bias and the
/// matmul accumulates into it: one pass over the output instead of candle's matmul + add.
pub fn linear(x: &Tensor, weight_t: &Tensor, bias: &Tensor) -> candle_core::Result<Tensor> {
    let fast = x.dtype() == DType::F32
        && weight_t.dtype() == DType::F32
        && bias.dtype() == DType::F32
        && matches!(x.device(), Device::Cpu);
    if !fast {
        return linear_composed(x, weight_t, bias);
    }
    x.contiguous()?
        .apply_op3(&weight_t.contiguous()?, &bias.contiguous()?, LinearOp)
}

/// The same dense layer from primitive ops (reference and fallback).
pub fn linear_composed(
    x: &Tensor,
    weight_t: &Tensor,
    bias: &Tensor,
) -> candle_core::Result<Tensor> {
    x.matmul(weight_t)?.broadcast_add(bias)
}

struct LinearOp;

impl CustomOp3 for LinearOp {
    fn name(&self) -> &'static str {
        "zrag-linear"
    }

    fn cpu_fwd(
        &self,
        x_storage: &CpuStorage,
        x_layout: &Layout,
        weight_storage: &CpuStorage,
        weight_layout: &Layout,
        bias_storage: &CpuStorage,
        bias_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(x_storage, x_layout, "linear input")?;
        let weight_t = contiguous_f32(weight_storage, weight_layout, "linear weight")?;
        let bias = contiguous_f32(bias_storage, bias_layout, "linear bias")?;
        let (rows, in_dim) = x_layout.shape().dims2()?;
        let (weight_in, out_dim) = weight_layout.shape().dims2()?;
        if weight_in != in_dim || bias.len() != out_dim {
            candle_core::bail!(
                "linear: input {:?}, weight {:?} and bias {:?} do not fit",
                x_layout.shape(),
                weight_layout.shape(),
                bias_layout.shape()
            );
        }
        let threads = matmul_threads();
        if rows >= packed_gemm::MIN_ROWS && packed_gemm::available() {
            let packed = packed_gemm::PackedRhs::pack(weight_t, in_dim, out_dim);
            let out = packed_gemm::matmul_bias(x, &packed, bias, threads);
            return Ok((CpuStorage::F32(out), Shape::from((rows, out_dim))));
        }
        let out = gemm_linear(x, weight_t, bias, (rows, in_dim), threads);
        Ok((CpuStorage::F32(out), Shape::from((rows, out_dim))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight_t: &Tensor,
        _bias: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad_x = grad.matmul(&weight_t.t()?)?;
        let grad_weight_t = x.t()?.matmul(grad)?;
        let grad_bias = backward::bias_grad(grad)?;
        Ok((Some(grad_x), Some(grad_weight_t), Some(grad_bias)))
    }
}

/// `x · weight_t + bias` on the `gemm` crate (`x` `(rows, in)`, `weight_t` `(in, out)`, both
/// row-major): the output starts as the broadcast bias and the matmul accumulates into it.
fn gemm_linear(
    x: &[f32],
    weight_t: &[f32],
    bias: &[f32],
    (rows, in_dim): (usize, usize),
    threads: usize,
) -> Vec<f32> {
    let out_dim = bias.len();
    assert_eq!(x.len(), rows * in_dim, "linear: input is not rows x in");
    assert_eq!(
        weight_t.len(),
        in_dim * out_dim,
        "linear: weight is not in x out"
    );
    let mut out = Vec::with_capacity(rows * out_dim);
    for _ in 0..rows {
        out.extend_from_slice(bias);
    }
    let parallelism = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: dst (rows x out_dim), lhs (rows x in_dim) and rhs (in_dim x out_dim) are
    // row-major buffers of exactly those sizes (asserted above).
    unsafe {
        gemm::gemm(
            rows,
            out_dim,
            in_dim,
            out.as_mut_ptr(),
            1,
            out_dim as isize,
            true,
            x.as_ptr(),
            1,
            in_dim as isize,
            weight_t.as_ptr(),
            1,
            out_dim as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
    out
}

/// Threads for one matmul: one inside [`batch_parallel`], else candle's count.
fn matmul_threads() -> usize {
    if in_batch_parallel_region() {
        1
    } else {
        candle_core::utils::get_num_threads()
    }
}

/// `gelu_erf(linear(x, weight_t, bias))`: the feed-forward block's first half.
///
/// At inference (no input tracks gradients) the GELU runs on each block of rows of the product
/// (on the packed gemm, as soon as the block is finished and still in L2) instead of as a
/// second op over the whole `(rows, out)` output; same values, bit for bit. Training keeps the
/// two ops, whose backward needs the pre-activation.
pub fn linear_gelu_erf(
    x: &Tensor,
    weight_t: &Tensor,
    bias: &Tensor,
) -> candle_core::Result<Tensor> {
    let fused =
        fused_dense_inference(x, weight_t, &[bias], |_, _, block| gelu_erf_in_place(block))?;
    match fused {
        Some(out) => Ok(out),
        None => gelu_erf(&linear(x, weight_t, bias)?),
    }
}

/// `layer_norm(linear(x, weight_t, bias) + residual)`: BERT's dense-residual-norm step.
///
/// At inference the residual sum and the layer norm run on each block of rows of the product
/// (on the packed gemm, while the block is in L2; same values, bit for bit, as the three ops),
/// so neither makes its own pass over memory nor runs on candle's element-wise thread pool.
/// Training keeps the separate ops.
pub fn linear_add_layer_norm(
    x: &Tensor,
    weight_t: &Tensor,
    bias: &Tensor,
    residual: &Tensor,
    (gamma, beta): (&Tensor, &Tensor),
    eps: f64,
) -> candle_core::Result<Tensor> {
    let width = bias.elem_count();
    let norm_fits = residual.dims2().ok() == Some((x.dim(0)?, width))
        && gamma.elem_count() == width
        && beta.elem_count() == width;
    let fused = if norm_fits {
        let eps = eps as f32;
        fused_dense_inference(
            x,
            weight_t,
            &[bias, residual, gamma, beta],
            |slices, first, block| {
                let residual = &slices[1][first * width..][..block.len()];
                add_layer_norm_rows(block, residual, (slices[2], slices[3]), eps);
            },
        )?
    } else {
        None
    };
    match fused {
        Some(out) => Ok(out),
        None => layer_norm(&(linear(x, weight_t, bias)? + residual)?, gamma, beta, eps),
    }
}

/// `rows[r] = layer_norm(rows[r] + residual[r])` for consecutive rows of `gamma.len()` values,
/// the sum rounded to f32 before the norm exactly as `layer_norm(&(a + b)?)` would.
fn add_layer_norm_rows(
    rows: &mut [f32],
    residual: &[f32],
    (gamma, beta): (&[f32], &[f32]),
    eps: f32,
) {
    let width = gamma.len();
    let mut sum = vec![0f32; width];
    for (row, residual_row) in rows
        .chunks_exact_mut(width)
        .zip(residual.chunks_exact(width))
    {
        for ((s, &value), &r) in sum.iter_mut().zip(row.iter()).zip(residual_row) {
            *s = value + r;
        }
        layer_norm_row(&sum, gamma, beta, eps, row);
    }
}

/// `layer_norm(x + residual)`. At inference (nothing tracks gradients, f32 on the CPU) in one
/// pass over the rows, off candle's element-wise thread pool (same bits); otherwise the two
/// ops. For the int8 dense layers, whose product comes from their own kernel.
pub fn add_layer_norm(
    x: &Tensor,
    residual: &Tensor,
    (gamma, beta): (&Tensor, &Tensor),
    eps: f64,
) -> candle_core::Result<Tensor> {
    let tensors = [x, residual, gamma, beta];
    let fits = x.dims2().is_ok()
        && x.dims() == residual.dims()
        && gamma.elem_count() == x.dim(D::Minus1)?
        && beta.elem_count() == gamma.elem_count()
        && gamma.elem_count() > 0
        && inference_f32_cpu(&tensors);
    if !fits {
        return layer_norm(&(x + residual)?, gamma, beta, eps);
    }
    let width = gamma.elem_count();
    let eps = eps as f32;
    let mut out = x.flatten_all()?.to_vec1::<f32>()?;
    with_cpu_f32_all(&[residual, gamma, beta], "add + layer norm", |slices| {
        let (residual, gamma, beta) = (slices[0], slices[1], slices[2]);
        let block = MIN_ROWS_PER_TASK * width;
        out.par_chunks_mut(block)
            .zip(residual.par_chunks(block))
            .for_each(|(rows, residual)| add_layer_norm_rows(rows, residual, (gamma, beta), eps));
        Ok(())
    })?;
    Tensor::from_vec(out, x.shape(), x.device())
}

/// BERT's embedding layer at inference: `layer_norm(word[id] + type[type_id] + position[p])`
/// for `input_ids` / `token_type_ids` `(batch, seq)` u32, as `(batch * seq, hidden)`, row by
/// row in one pass (same bits as candle's gathers, two adds and [`layer_norm`]). `None` when a
/// table tracks gradients, is not f32 on the CPU, or an id is out of range: the caller then
/// runs the separate ops (which report a bad id).
pub fn embeddings_layer_norm(
    [word_table, type_table, position_table]: [&Tensor; 3],
    (input_ids, token_type_ids): (&Tensor, &Tensor),
    (gamma, beta): (&Tensor, &Tensor),
    eps: f64,
) -> candle_core::Result<Option<Tensor>> {
    let tables = [word_table, type_table, position_table, gamma, beta];
    let applies = inference_f32_cpu(&tables)
        && input_ids.dtype() == DType::U32
        && token_type_ids.dtype() == DType::U32
        && input_ids.dims() == token_type_ids.dims();
    if !applies {
        return Ok(None);
    }
    let (batch, seq) = input_ids.dims2()?;
    let hidden = word_table.dim(1)?;
    if type_table.dim(1)? != hidden
        || position_table.dim(1)? != hidden
        || position_table.dim(0)? < seq
        || gamma.elem_count() != hidden
        || beta.elem_count() != hidden
    {
        return Ok(None);
    }
    let ids = input_ids.flatten_all()?.to_vec1::<u32>()?;
    let type_ids = token_type_ids.flatten_all()?.to_vec1::<u32>()?;
    let (words, types) = (word_table.dim(0)?, type_table.dim(0)?);
    if ids.iter().any(|&id| id as usize >= words) || type_ids.iter().any(|&id| id as usize >= types)
    {
        return Ok(None);
    }
    let eps = eps as f32;
    let out = with_cpu_f32_all(&tables, "embeddings", |slices| {
        let (word_table, type_table, position_table) = (slices[0], slices[1], slices[2]);
        let (gamma, beta) = (slices[3], slices[4]);
        let mut out = vec![0f32; batch * seq * hidden];
        out.par_chunks_mut(hidden)
            .enumerate()
            .with_min_len(MIN_ROWS_PER_TASK)
            .for_each_init(
                || vec![0f32; hidden],
                |sum, (row, out_row)| {
                    let word = &word_table[ids[row] as usize * hidden..][..hidden];
                    let kind = &type_table[type_ids[row] as usize * hidden..][..hidden];
                    let position = &position_table[(row % seq) * hidden..][..hidden];
                    for (((s, &w), &t), &p) in sum.iter_mut().zip(word).zip(kind).zip(position) {
                        *s = (w + t) + p;
                    }
                    layer_norm_row(sum, gamma, beta, eps, out_row);
                },
            );
        Ok(out)
    })?;
    Tensor::from_vec(out, (batch * seq, hidden), word_table.device()).map(Some)
}

/// The inference-only fused path of a dense layer: when no tensor tracks gradients, all are
/// f32 on the CPU and the shapes fit (`x` `(rows, in)`, `weight_t` `(in, out)`, `others[0]` the
/// bias of `out` values), computes `x · weight_t + bias` and calls
/// `finish(others_slices, first_row, block)` on each block of its rows (on the packed gemm, as
/// soon as the block is done and in L2; on `gemm` for inputs below its threshold, block by block
/// afterwards), returning the result as a tensor. `None` means "take the unfused path".
///
/// Below the packed gemm's threshold the epilogue still replaces candle's element-wise ops,
/// which run on candle's own thread pool and would spin against ours.
fn fused_dense_inference(
    x: &Tensor,
    weight_t: &Tensor,
    others: &[&Tensor],
    finish: impl Fn(&[&[f32]], usize, &mut [f32]) + Sync,
) -> candle_core::Result<Option<Tensor>> {
    let (Ok((rows, in_dim)), Ok((weight_in, out_dim))) = (x.dims2(), weight_t.dims2()) else {
        return Ok(None);
    };
    let tensors: Vec<&Tensor> = [x, weight_t]
        .into_iter()
        .chain(others.iter().copied())
        .collect();
    let applies = weight_in == in_dim
        && out_dim > 0
        && others
            .first()
            .is_some_and(|bias| bias.elem_count() == out_dim)
        && inference_f32_cpu(&tensors);
    if !applies {
        return Ok(None);
    }
    let out = with_cpu_f32_all(&tensors, "dense layer", |slices| {
        let (x_values, weight_values, other_values) = (slices[0], slices[1], &slices[2..]);
        let bias = other_values[0];
        let threads = matmul_threads();
        if rows >= packed_gemm::MIN_ROWS && packed_gemm::available() {
            let packed = packed_gemm::PackedRhs::pack(weight_values, in_dim, out_dim);
            return Ok(packed_gemm::matmul_bias_then(
                x_values,
                &packed,
                bias,
                threads,
                |first, block| finish(other_values, first, block),
            ));
        }
        let mut out = gemm_linear(x_values, weight_values, bias, (rows, in_dim), threads);
        let block_values = packed_gemm::ROW_BLOCK * out_dim;
        if threads > 1 {
            out.par_chunks_mut(block_values)
                .enumerate()
                .for_each(|(index, block)| {
                    finish(other_values, index * packed_gemm::ROW_BLOCK, block)
                });
        } else {
            for (index, block) in out.chunks_mut(block_values).enumerate() {
                finish(other_values, index * packed_gemm::ROW_BLOCK, block);
            }
        }
        Ok(out)
    })?;
    Tensor::from_vec(out, (rows, out_dim), x.device()).map(Some)
}

/// Multi-head self-attention over a fused QKV projection.
///
/// `qkv` is `(batch * seq, 3 * hidden)`: each row holds the token's query, key and value, each
/// split into `heads` heads. `key_bias` is `(batch, seq)` as for [`masked_softmax`]. Returns
/// the attention context `(batch * seq, hidden)` with heads concatenated per row, ready for the
/// output projection.
///
/// The CPU kernel runs one (sequence, head) pair per task across all cores, reading q/k/v
/// straight out of `qkv` with strided matmuls and writing the context in place, so there is no
/// head-split copy, no `(batch, heads, seq, seq)` tensor in memory, and no single-threaded loop
/// of small matmuls. The backward kernel recomputes the probabilities the same way, per
/// (sequence, head), rather than keeping them from the forward.
pub fn attention(
    qkv: &Tensor,
    key_bias: &Tensor,
    batch: usize,
    heads: usize,
) -> candle_core::Result<Tensor> {
    let (rows, width) = qkv.dims2()?;
    let (bias_batch, seq) = key_bias.dims2()?;
    if bias_batch != batch || rows != batch * seq || width % (3 * heads) != 0 {
        candle_core::bail!(
            "attention: qkv {:?} does not fit bias {:?} with {heads} heads",
            qkv.shape(),
            key_bias.shape()
        );
    }
    let fast = qkv.dtype() == DType::F32
        && key_bias.dtype() == DType::F32
        && matches!(qkv.device(), Device::Cpu);
    if !fast {
        return attention_composed(qkv, key_bias, batch, heads);
    }
    qkv.contiguous()?
        .apply_op2(&key_bias.contiguous()?, AttentionOp { batch, heads })
}

/// The same attention from primitive ops (reference for tests and non-CPU fallback).
pub fn attention_composed(
    qkv: &Tensor,
    key_bias: &Tensor,
    batch: usize,
    heads: usize,
) -> candle_core::Result<Tensor> {
    let (query, key, value) = split_heads(qkv, batch, heads)?;
    let head_dim = query.dim(3)?;
    let scores = query.matmul(&key.t()?)?;
    let probs = masked_softmax_composed(&scores, key_bias, 1.0 / (head_dim as f64).sqrt())?;
    merge_heads(&probs.matmul(&value)?)
}

/// `(batch * seq, 3 * hidden)` -> three contiguous `(batch, heads, seq, head_dim)` tensors.
fn split_heads(
    qkv: &Tensor,
    batch: usize,
    heads: usize,
) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
    let (rows, width) = qkv.dims2()?;
    let (seq, head_dim) = (rows / batch, width / (3 * heads));
    let stacked = qkv
        .reshape((batch, seq, 3, heads, head_dim))?
        .permute((2, 0, 3, 1, 4))?
        .contiguous()?;
    Ok((stacked.get(0)?, stacked.get(1)?, stacked.get(2)?))
}

/// `(batch, heads, seq, head_dim)` -> `(batch * seq, heads * head_dim)`.
fn merge_heads(x: &Tensor) -> candle_core::Result<Tensor> {
    let (batch, heads, seq, head_dim) = x.dims4()?;
    x.transpose(1, 2)?
        .contiguous()?
        .reshape((batch * seq, heads * head_dim))
}

struct AttentionOp {
    batch: usize,
    heads: usize,
}

/// A raw pointer that may cross threads: each attention task writes a disjoint block of the
/// output through it.
#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: used only to write disjoint (sequence, head) blocks from different tasks.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

/// `dst = lhs · rhs` (overwritten) for strided row-major operands: `(m, k) · (k, n)`, each
/// given as (pointer, column stride, row stride), on the calling thread.
///
/// # Safety
/// Every addressed element must lie inside its buffer, and `dst` must not overlap the inputs.
unsafe fn gemm_into(
    (m, n, k): (usize, usize, usize),
    dst: (*mut f32, isize, isize),
    lhs: (*const f32, isize, isize),
    rhs: (*const f32, isize, isize),
) {
    gemm::gemm(
        m,
        n,
        k,
        dst.0,
        dst.1,
        dst.2,
        false,
        lhs.0,
        lhs.1,
        lhs.2,
        rhs.0,
        rhs.1,
        rhs.2,
        0.0,
        1.0,
        false,
        false,
        false,
        gemm::Parallelism::None,
    );
}

/// One (sequence, head)'s attention probabilities `softmax(q kᵀ / sqrt(head_dim) + bias)` into
/// `probs` `(seq, seq)`; `q` and `k` point at the head's first query / key in the packed QKV
/// matrix, whose rows are `width` apart. Shared by the forward and the backward kernel, so the
/// backward recomputes exactly the forward's probabilities.
///
/// # Safety
/// `q` and `k` must address `seq` rows of `head_dim` values each, `width` apart.
unsafe fn attention_probs(
    q: *const f32,
    k: *const f32,
    bias_row: &[f32],
    (seq, head_dim, width): (usize, usize, usize),
    probs: &mut [f32],
) {
    let width = width as isize;
    // scores = q kᵀ: (seq x head_dim) (head_dim x seq).
    gemm_into(
        (seq, seq, head_dim),
        (probs.as_mut_ptr(), 1, seq as isize),
        (q, 1, width),
        (k, width, 1),
    );
    let scale = 1.0 / (head_dim as f32).sqrt();
    for row in probs.chunks_exact_mut(seq) {
        softmax_in_place(row, bias_row, scale);
    }
}

impl CustomOp2 for AttentionOp {
    fn name(&self) -> &'static str {
        "zrag-attention"
    }

    fn cpu_fwd(
        &self,
        qkv_storage: &CpuStorage,
        qkv_layout: &Layout,
        bias_storage: &CpuStorage,
        bias_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let qkv = contiguous_f32(qkv_storage, qkv_layout, "attention qkv")?;
        let bias = contiguous_f32(bias_storage, bias_layout, "attention bias")?;
        let (batch, heads) = (self.batch, self.heads);
        let (rows, width) = qkv_layout.shape().dims2()?;
        let (seq, hidden) = (rows / batch, width / 3);
        let head_dim = hidden / heads;

        let mut out = vec![0f32; rows * hidden];
        let out_ptr = SendPtr(out.as_mut_ptr());
        (0..batch * heads).into_par_iter().for_each_init(
            || vec![0f32; seq * seq],
            |scores, task| {
                let (b, head) = (task / heads, task % heads);
                // Row r of this sequence's q / k / v for this head starts at
                // (b * seq + r) * width + {0, hidden, 2 * hidden} + head * head_dim.
                let base = b * seq * width + head * head_dim;
                let q = qkv[base..].as_ptr();
                let k = qkv[base + hidden..].as_ptr();
                let v = qkv[base + 2 * hidden..].as_ptr();
                let bias_row = &bias[b * seq..(b + 1) * seq];
                let out_block = out_ptr;
                // SAFETY: every operand stays inside `qkv` / `scores` / `out` (rows < seq,
                // columns < head_dim within this head's slice), and each task writes only its
                // own (b, head) block of `out`, which starts at row b * seq, column
                // head * head_dim.
                unsafe {
                    attention_probs(q, k, bias_row, (seq, head_dim, width), scores);
                    // context = probs v: (seq x seq) (seq x head_dim).
                    gemm_into(
                        (seq, head_dim, seq),
                        (
                            out_block.0.add(b * seq * hidden + head * head_dim),
                            1,
                            hidden as isize,
                        ),
                        (scores.as_ptr(), 1, seq as isize),
                        (v, 1, width as isize),
                    );
                }
            },
        );
        Ok((CpuStorage::F32(out), Shape::from((rows, hidden))))
    }

    fn bwd(
        &self,
        qkv: &Tensor,
        key_bias: &Tensor,
        _context: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let grad_qkv = backward::attention_backward(qkv, key_bias, grad, self.batch, self.heads)?;
        Ok((Some(grad_qkv), None))
    }
}

/// GELU with the exact (erf) form, `x * Φ(x)`, as BERT uses it.
pub fn gelu_erf(x: &Tensor) -> candle_core::Result<Tensor> {
    if x.dtype() != DType::F32 || !matches!(x.device(), Device::Cpu) {
        return x.gelu_erf();
    }
    x.contiguous()?.apply_op1(GeluErfOp)
}

struct GeluErfOp;

fn gelu_erf_slice(src: &[f32], dst: &mut [f32]) {
    if simd::available() {
        // SAFETY: the CPU has AVX2 and FMA.
        unsafe { simd::gelu_erf(src, dst) }
    } else {
        for (d, &x) in dst.iter_mut().zip(src) {
            *d = x * normal_cdf(x);
        }
    }
}

/// The same GELU over a buffer in place (the fused epilogues of the f32 and int8 layers).
pub(crate) fn gelu_erf_in_place(values: &mut [f32]) {
    if simd::available() {
        // SAFETY: the CPU has AVX2 and FMA.
        unsafe { simd::gelu_erf_in_place(values) }
    } else {
        for v in values.iter_mut() {
            *v *= normal_cdf(*v);
        }
    }
}

impl CustomOp1 for GeluErfOp {
    fn name(&self) -> &'static str {
        "zrag-gelu-erf"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let src = contiguous_f32(storage, layout, "gelu input")?;
        let mut out = vec![0f32; src.len()];
        out.par_chunks_mut(ELEMENTS_PER_TASK)
            .zip(src.par_chunks(ELEMENTS_PER_TASK))
            .for_each(|(dst, src)| gelu_erf_slice(src, dst));
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(backward::gelu_erf_backward(x, grad)?))
    }
}

/// The standard normal CDF Φ(x), absolute error below 1e-7.
///
/// Abramowitz & Stegun 7.1.26 for erfc(|x|/√2), then reflected; branch-free so it vectorises.
/// Computing erfc rather than erf keeps Φ accurate in the left tail, where 1 + erf cancels.
#[inline(always)]
fn normal_cdf(x: f32) -> f32 {
    const P: f32 = 0.327_591_1;
    const A1: f32 = 0.254_829_6;
    const A2: f32 = -0.284_496_74;
    const A3: f32 = 1.421_413_8;
    const A4: f32 = -1.453_152_1;
    const A5: f32 = 1.061_405_4;
    let z = x.abs() * std::f32::consts::FRAC_1_SQRT_2;
    let t = 1.0 / (1.0 + P * z);
    let poly = t * (A1 + t * (A2 + t * (A3 + t * (A4 + t * A5))));
    let half_erfc = 0.5 * poly * fast_exp(-z * z);
    if x >= 0.0 {
        1.0 - half_erfc
    } else {
        half_erfc
    }
}

/// `exp(x)`, relative error about 1 ulp on [-87, 88]; exactly 0 below -87 (so masked
/// attention keys get exactly zero weight); saturates at `exp(88)` above.
///
/// Branch-free and libm-free (range reduction `x = n ln2 + r`, a degree-6 polynomial for
/// `exp(r)`, `2^n` built in the exponent bits), so loops over it vectorise; `f32::exp` is a
/// library call per element.
#[inline(always)]
fn fast_exp(x: f32) -> f32 {
    // 1.5 * 2^23: adding it rounds to an integer and leaves that integer in the low mantissa
    // bits, without a (non-SSE2) rounding instruction.
    const ROUND_MAGIC: f32 = 12_582_912.0;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    let clamped = x.clamp(-87.0, 88.0);
    let shifted = clamped * std::f32::consts::LOG2_E + ROUND_MAGIC;
    let n = shifted - ROUND_MAGIC;
    let r = clamped - n * LN2_HI - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (0.166_666_67
                    + r * (0.041_666_668 + r * (0.008_333_334 + r * 0.001_388_889)))));
    let n_int = shifted.to_bits().wrapping_sub(ROUND_MAGIC.to_bits()) as i32;
    let two_to_n = f32::from_bits((n_int.wrapping_add(127) as u32) << 23);
    if x < -87.0 {
        0.0
    } else {
        p * two_to_n
    }
}

/// Runs `f` on the f32 contents of a CPU tensor (made contiguous first if it is not), without
/// copying them out: for kernels that read a tensor as a plain slice. `what` names the tensor
/// in the error if it is not an f32 CPU tensor. The storage's read lock is held while `f` runs,
/// so `f` must not `set` a `Var` that shares it.
pub fn with_cpu_f32<R>(
    tensor: &Tensor,
    what: &str,
    f: impl FnOnce(&[f32]) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    with_cpu_f32_all(&[tensor], what, |slices| f(slices[0]))
}

/// [`with_cpu_f32`] for several tensors at once: `f` gets their f32 contents in order.
pub(crate) fn with_cpu_f32_all<R>(
    tensors: &[&Tensor],
    what: &str,
    f: impl FnOnce(&[&[f32]]) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    let contiguous = tensors
        .iter()
        .map(|t| t.contiguous())
        .collect::<candle_core::Result<Vec<_>>>()?;
    let guards: Vec<_> = contiguous.iter().map(|t| t.storage_and_layout()).collect();
    let mut slices = Vec::with_capacity(guards.len());
    for (storage, layout) in &guards {
        let Storage::Cpu(cpu) = &**storage else {
            candle_core::bail!("{what}: expected a CPU tensor");
        };
        slices.push(contiguous_f32(cpu, layout, what)?);
    }
    f(&slices)
}

/// Whether the inference-only fused paths apply to `tensors`: all f32 on the CPU and none
/// tracking gradients.
fn inference_f32_cpu(tensors: &[&Tensor]) -> bool {
    tensors
        .iter()
        .all(|t| t.dtype() == DType::F32 && matches!(t.device(), Device::Cpu) && !t.track_op())
}

fn contiguous_f32<'a>(
    storage: &'a CpuStorage,
    layout: &Layout,
    what: &str,
) -> candle_core::Result<&'a [f32]> {
    let data = match storage {
        CpuStorage::F32(data) => data.as_slice(),
        other => candle_core::bail!("{what}: expected f32, got {:?}", other.dtype()),
    };
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("{what}: expected a contiguous tensor"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Var;

    /// Gradients of ⟨output, upstream⟩: backpropagates an arbitrary upstream gradient.
    fn backward_against(output: &Tensor, upstream: &Tensor) -> candle_core::backprop::GradStore {
        (output * upstream)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap()
    }

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    #[test]
    fn fast_exp_matches_std_exp() {
        let mut worst = 0f32;
        // Below -87 the function flushes to 0 (checked separately).
        for i in -86_000..88_000 {
            let x = i as f32 * 1e-3;
            let rel = (fast_exp(x) - x.exp()).abs() / x.exp().max(f32::MIN_POSITIVE);
            worst = worst.max(rel);
        }
        assert!(worst < 1e-6, "worst relative error {worst}");
        assert_eq!(fast_exp(-1e9), 0.0);
        assert_eq!(fast_exp(-87.5), 0.0);
        assert_eq!(fast_exp(0.0), 1.0);
    }

    #[test]
    fn gelu_matches_candle_gelu_erf_with_gradients() {
        let dev = Device::Cpu;
        let x = Var::from_vec(
            (-2000..2000).map(|i| i as f32 * 5e-3).collect::<Vec<_>>(),
            4000,
            &dev,
        )
        .unwrap();
        let ours = gelu_erf(&x).unwrap();
        let candle = x.gelu_erf().unwrap();
        assert!(max_abs_diff(&ours, &candle) < 2e-6);
        let grads_ours = ours.sum_all().unwrap().backward().unwrap();
        let grads_candle = candle.sum_all().unwrap().backward().unwrap();
        let a = grads_ours.get(&x).unwrap();
        let b = grads_candle.get(&x).unwrap();
        assert!(max_abs_diff(a, b) < 1e-5);
    }

    #[test]
    fn attention_forward_and_gradients_match_composed_ops() {
        let dev = Device::Cpu;
        // 11 keys: the softmax backward's row dot runs one full 8-lane chunk and a tail.
        let (batch, seq, heads, head_dim) = (3, 11, 2, 5);
        let hidden = heads * head_dim;
        let qkv = Var::randn(0f32, 1.0, (batch * seq, 3 * hidden), &dev).unwrap();
        // The second sequence has two padded positions.
        let mut bias = vec![0f32; batch * seq];
        bias[seq + 9] = -1e9;
        bias[seq + 10] = -1e9;
        let bias = Tensor::from_vec(bias, (batch, seq), &dev).unwrap();
        let upstream = Tensor::randn(0f32, 1.0, (batch * seq, hidden), &dev).unwrap();

        let fused = attention(&qkv, &bias, batch, heads).unwrap();
        let composed = attention_composed(&qkv, &bias, batch, heads).unwrap();
        assert_eq!(fused.dims(), &[batch * seq, hidden]);
        assert!(max_abs_diff(&fused, &composed) < 1e-5);

        let grads_fused = backward_against(&fused, &upstream);
        let grads_composed = backward_against(&composed, &upstream);
        let a = grads_fused.get(&qkv).unwrap();
        let b = grads_composed.get(&qkv).unwrap();
        assert!(max_abs_diff(a, b) < 1e-4);
    }

    #[test]
    fn linear_forward_and_gradients_match_composed_ops() {
        // 150 rows: the bias gradient sums several blocks of rows (forward on gemm).
        check_linear_against_composed((150, 5, 3), 1e-5);
    }

    #[test]
    fn linear_on_the_packed_gemm_matches_composed_ops() {
        // Enough rows for `packed_gemm` (on AVX2 CPUs); 19 outputs leave a narrow last panel.
        // The weight gradient sums 1,031 products per value (f32 rounding: 3.6e-5 measured).
        check_linear_against_composed((packed_gemm::MIN_ROWS + 7, 40, 19), 2e-4);
    }

    /// `linear` against `linear_composed` on `(rows, in, out)`, values and gradients within
    /// `tolerance`.
    fn check_linear_against_composed(
        (rows, in_dim, out_dim): (usize, usize, usize),
        tolerance: f32,
    ) {
        let dev = Device::Cpu;
        let x = Var::randn(0f32, 1.0, (rows, in_dim), &dev).unwrap();
        let weight = Var::randn(0f32, 1.0, (in_dim, out_dim), &dev).unwrap();
        let bias = Var::randn(0f32, 1.0, out_dim, &dev).unwrap();
        let upstream = Tensor::randn(0f32, 1.0, (rows, out_dim), &dev).unwrap();
        let fused = linear(&x, &weight, &bias).unwrap();
        let composed = linear_composed(&x, &weight, &bias).unwrap();
        assert!(max_abs_diff(&fused, &composed) < tolerance);
        let grads_fused = backward_against(&fused, &upstream);
        let grads_composed = backward_against(&composed, &upstream);
        for var in [&x, &weight, &bias] {
            let a = grads_fused.get(var).unwrap();
            let b = grads_composed.get(var).unwrap();
            assert!(max_abs_diff(a, b) < tolerance);
        }
    }

    #[test]
    fn fused_epilogues_give_the_separate_ops_bits_at_inference_and_step_aside_for_training() {
        // Few rows (gemm, then the epilogue block by block) and enough rows for the packed gemm
        // (with a partial last row block).
        for rows in [50, packed_gemm::MIN_ROWS + 7] {
            check_fused_epilogues(rows);
        }
    }

    fn check_fused_epilogues(rows: usize) {
        let dev = Device::Cpu;
        // 19 outputs leave a narrow last panel.
        let (in_dim, out_dim) = (40, 19);
        let x = Tensor::randn(0f32, 1.0, (rows, in_dim), &dev).unwrap();
        let weight = Tensor::randn(0f32, 0.3, (in_dim, out_dim), &dev).unwrap();
        let bias = Tensor::randn(0f32, 1.0, out_dim, &dev).unwrap();
        let residual = Tensor::randn(0f32, 1.0, (rows, out_dim), &dev).unwrap();
        let gamma = Tensor::randn(1f32, 0.5, out_dim, &dev).unwrap();
        let beta = Tensor::randn(0f32, 0.5, out_dim, &dev).unwrap();

        let separate_gelu = gelu_erf(&linear(&x, &weight, &bias).unwrap()).unwrap();
        let fused_gelu = linear_gelu_erf(&x, &weight, &bias).unwrap();
        assert_eq!(max_abs_diff(&separate_gelu, &fused_gelu), 0.0);
        let separate_norm = layer_norm(
            &(linear(&x, &weight, &bias).unwrap() + &residual).unwrap(),
            &gamma,
            &beta,
            1e-12,
        )
        .unwrap();
        let fused_norm =
            linear_add_layer_norm(&x, &weight, &bias, &residual, (&gamma, &beta), 1e-12).unwrap();
        assert_eq!(max_abs_diff(&separate_norm, &fused_norm), 0.0);

        // With a variable among the inputs the separate ops run, so gradients reach it.
        let weight_var = Var::from_tensor(&weight).unwrap();
        let upstream = Tensor::randn(0f32, 1.0, (rows, out_dim), &dev).unwrap();
        let trained =
            linear_add_layer_norm(&x, &weight_var, &bias, &residual, (&gamma, &beta), 1e-12)
                .unwrap();
        assert_eq!(max_abs_diff(&trained, &separate_norm), 0.0);
        let composed = layer_norm_composed(
            &(linear_composed(&x, &weight_var, &bias).unwrap() + &residual).unwrap(),
            &gamma,
            &beta,
            1e-12,
        )
        .unwrap();
        let a = backward_against(&trained, &upstream);
        let b = backward_against(&composed, &upstream);
        assert!(max_abs_diff(a.get(&weight_var).unwrap(), b.get(&weight_var).unwrap()) < 2e-3);
        let trained_gelu = linear_gelu_erf(&x, &weight_var, &bias).unwrap();
        let grads = backward_against(&trained_gelu, &upstream);
        assert!(grads.get(&weight_var).is_some());
    }

    #[test]
    fn add_layer_norm_gives_the_separate_ops_bits() {
        let dev = Device::Cpu;
        // 70 rows: two full row blocks of the parallel split and a partial one.
        let x = Tensor::randn(0f32, 1.0, (70, 19), &dev).unwrap();
        let residual = Tensor::randn(0f32, 1.0, (70, 19), &dev).unwrap();
        let gamma = Tensor::randn(1f32, 0.5, 19, &dev).unwrap();
        let beta = Tensor::randn(0f32, 0.5, 19, &dev).unwrap();
        let separate = layer_norm(&(&x + &residual).unwrap(), &gamma, &beta, 1e-12).unwrap();
        let fused = add_layer_norm(&x, &residual, (&gamma, &beta), 1e-12).unwrap();
        assert_eq!(max_abs_diff(&separate, &fused), 0.0);
        // A variable among the inputs: the separate ops, with gradients.
        let x_var = Var::from_tensor(&x).unwrap();
        let trained = add_layer_norm(&x_var, &residual, (&gamma, &beta), 1e-12).unwrap();
        assert_eq!(max_abs_diff(&separate, &trained), 0.0);
        let grads = trained.sum_all().unwrap().backward().unwrap();
        assert!(grads.get(&x_var).is_some());
    }

    #[test]
    fn layer_norm_forward_and_gradients_match_composed_ops() {
        let dev = Device::Cpu;
        // 150 rows span three blocks of the backward's row reduction; a width of 19 is not a
        // multiple of the accumulator lanes.
        let x = Var::randn(0f32, 2.0, (3, 50, 19), &dev).unwrap();
        let gamma = Var::randn(1f32, 0.5, 19, &dev).unwrap();
        let beta = Var::randn(0f32, 0.5, 19, &dev).unwrap();
        let upstream = Tensor::randn(0f32, 1.0, (3, 50, 19), &dev).unwrap();

        let fused = layer_norm(&x, &gamma, &beta, 1e-5).unwrap();
        let composed = layer_norm_composed(&x, &gamma, &beta, 1e-5).unwrap();
        assert!(max_abs_diff(&fused, &composed) < 1e-5);

        let grads_fused = backward_against(&fused, &upstream);
        let grads_composed = backward_against(&composed, &upstream);
        for var in [&x, &gamma, &beta] {
            let a = grads_fused.get(var).expect("fused gradient");
            let b = grads_composed.get(var).expect("composed gradient");
            assert!(max_abs_diff(a, b) < 1e-4, "gradient mismatch");
        }
    }

    #[test]
    fn masked_softmax_forward_and_gradients_match_composed_ops() {
        let dev = Device::Cpu;
        // 240 rows: several blocks of the fused backward; 11 keys: one full 8-lane chunk and a
        // tail in its row dot product.
        let scores = Var::randn(0f32, 3.0, (2, 3, 40, 11), &dev).unwrap();
        let mut bias = [[0f32; 11]; 2];
        bias[0][9] = -1e9;
        bias[0][10] = -1e9;
        let bias = Tensor::new(&bias, &dev).unwrap();
        let upstream = Tensor::randn(0f32, 1.0, (2, 3, 40, 11), &dev).unwrap();

        let fused = masked_softmax(&scores, &bias, 0.25).unwrap();
        let composed = masked_softmax_composed(&scores, &bias, 0.25).unwrap();
        assert!(max_abs_diff(&fused, &composed) < 1e-6);
        // Padded keys get exactly zero weight.
        let first = fused.get(0).unwrap().flatten_to(1).unwrap();
        let first = first.to_vec2::<f32>().unwrap();
        assert!(first.iter().all(|row| row[9] == 0.0 && row[10] == 0.0));

        let grads_fused = backward_against(&fused, &upstream);
        let grads_composed = backward_against(&composed, &upstream);
        let a = grads_fused.get(&scores).unwrap();
        let b = grads_composed.get(&scores).unwrap();
        assert!(max_abs_diff(a, b) < 1e-5);
    }
}
