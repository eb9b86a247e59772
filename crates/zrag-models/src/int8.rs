//! int8 dense layers for the encoder's inference path ([`crate::EncoderPrecision::Int8`]).
//!
//! Weights are quantised once, symmetric per output channel (`w ≈ s_w[n]·q`, `q ∈ [-127, 127]`);
//! activations are quantised per row (token) at every call (`x ≈ s_x[m]·p`, `p ∈ [-127, 127]`).
//! The integer dot products are exact; the only error is the rounding of `x` and `w` to 8 bits,
//! measured against f32 in the tests here and on the real model in `tests/reference_minilm.rs`
//! and `BENCHMARKS.md`. Two integer kernels, each with its own packed weight layout:
//!
//! - AVX-512 VNNI: `vpdpbusd` multiplies unsigned by signed bytes, four products per 32-bit
//!   lane (64 multiply-adds per instruction where an f32 FMA does 16). Its left operand is
//!   unsigned, so activations are stored offset by 128 and the offset is taken back out with
//!   each weight column's sum: `Σ (p + 128)·q = Σ p·q + 128·Σ q`.
//! - AVX2: `vpmaddwd` on 16-bit copies of the same 8-bit values, two products per lane. The
//!   byte instruction `vpmaddubsw` would do twice as many, but its 16-bit pair sums saturate
//!   for 8-bit inputs on both sides; `vpmaddwd` is exact and still issues twice the
//!   multiply-adds per cycle of f32 FMA.
//!
//! Without either, the VNNI layout runs through a portable loop (correct, much slower).
//! No gradients: training always uses the f32 path.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};
use rayon::prelude::*;

/// The widest column block of any kernel; `sums` buffers are sized for it.
const MAX_BLOCK_COLS: usize = 32;
/// The most rows of any kernel's register tile.
const MAX_TILE_ROWS: usize = 8;
/// Rows and packed blocks per parallel task: the task's weight panel stays in L2 while its
/// activation rows stream past it.
const TASK_ROWS: usize = 64;
const TASK_BLOCKS: usize = 4;
/// The offset that makes a signed activation byte unsigned (VNNI layout).
const ACTIVATION_OFFSET: i32 = 128;

type TileSums = [[i32; MAX_BLOCK_COLS]; MAX_TILE_ROWS];

/// Which integer kernel runs, fixed when the layer is quantised (the weight layout follows it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kernel {
    /// AVX-512 VNNI over the byte layout.
    #[cfg(target_arch = "x86_64")]
    Vnni,
    /// AVX2 over the 16-bit layout.
    #[cfg(target_arch = "x86_64")]
    Avx2,
    /// Scalar loops over the byte layout.
    Portable,
}

impl Kernel {
    /// The fastest kernel this CPU has. `ZRAG_INT8_KERNEL=avx2|portable` forces a slower one
    /// (for comparisons and tests).
    fn detect() -> Kernel {
        let forced = std::env::var("ZRAG_INT8_KERNEL").ok();
        #[cfg(target_arch = "x86_64")]
        {
            let vnni = std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512bw")
                && std::arch::is_x86_feature_detected!("avx512vnni");
            let avx2 = std::arch::is_x86_feature_detected!("avx2");
            match forced.as_deref() {
                Some("portable") => return Kernel::Portable,
                Some("avx2") if avx2 => return Kernel::Avx2,
                _ if vnni => return Kernel::Vnni,
                _ if avx2 => return Kernel::Avx2,
                _ => {}
            }
        }
        let _ = forced;
        Kernel::Portable
    }

    fn layout(self) -> WeightLayout {
        match self {
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => WeightLayout::Words,
            _ => WeightLayout::Bytes,
        }
    }

    fn tile_rows(self) -> usize {
        match self {
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => 6,
            _ => 8,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum WeightLayout {
    /// 32-column blocks; in each, for every group of 4 inputs, the 4 weights of column 0, then
    /// column 1, …: the byte order `vpdpbusd` wants. Activations: offset bytes.
    Bytes,
    /// 16-column blocks; in each, for every pair of inputs, the 2 weights of column 0, then
    /// column 1, … as `i16`: the order `vpmaddwd` wants. Activations: signed `i16`.
    Words,
}

impl WeightLayout {
    fn block_cols(self) -> usize {
        match self {
            WeightLayout::Bytes => 32,
            WeightLayout::Words => 16,
        }
    }

    /// Inputs per packed step (the products one lane sums).
    fn step(self) -> usize {
        match self {
            WeightLayout::Bytes => 4,
            WeightLayout::Words => 2,
        }
    }
}

enum PackedWeights {
    Bytes(Vec<i8>),
    Words(Vec<i16>),
}

/// A dense layer `y = x W^T + b` with int8 weights.
pub(crate) struct Int8Linear {
    in_dim: usize,
    out_dim: usize,
    kernel: Kernel,
    /// `in_dim` rounded up to the layout's step, in steps.
    steps: usize,
    packed: PackedWeights,
    /// Per output channel: `s_w[n]`.
    scales: Vec<f32>,
    /// Per output channel: the activation offset's contribution `128 · Σ_k q[n][k]` (byte
    /// layout), or 0.
    offset_sums: Vec<i32>,
    bias: Vec<f32>,
}

impl std::fmt::Debug for Int8Linear {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Int8Linear")
            .field("in_dim", &self.in_dim)
            .field("out_dim", &self.out_dim)
            .field("kernel", &self.kernel)
            .finish_non_exhaustive()
    }
}

/// Activations quantised per row, each row padded to `stride` elements with zeros.
enum QuantizedRows {
    /// `p + 128` (byte layout).
    Bytes { values: Vec<u8>, stride: usize },
    /// `p` (16-bit layout).
    Words { values: Vec<i16>, stride: usize },
}

impl Int8Linear {
    /// From the transposed weight `weight_t` (`(in_dim, out_dim)`, row-major, as the f32
    /// layer keeps it) and the bias, packed for the fastest kernel this CPU has.
    pub(crate) fn quantize(weight_t: &[f32], in_dim: usize, out_dim: usize, bias: &[f32]) -> Self {
        Self::quantize_for(weight_t, in_dim, out_dim, bias, Kernel::detect())
    }

    fn quantize_for(
        weight_t: &[f32],
        in_dim: usize,
        out_dim: usize,
        bias: &[f32],
        kernel: Kernel,
    ) -> Self {
        assert_eq!(weight_t.len(), in_dim * out_dim, "weight size");
        assert_eq!(bias.len(), out_dim, "bias size");
        let layout = kernel.layout();
        let (step, block_cols) = (layout.step(), layout.block_cols());
        let steps = in_dim.div_ceil(step);
        let blocks = out_dim.div_ceil(block_cols);
        let step_len = block_cols * step;
        let mut quantized = vec![0i8; blocks * steps * step_len];
        let mut scales = vec![0f32; out_dim];
        let mut offset_sums = vec![0i32; out_dim];
        for n in 0..out_dim {
            let column = (0..in_dim).map(|k| weight_t[k * out_dim + n]);
            let max_abs = column.clone().fold(0f32, |m, w| m.max(w.abs()));
            let scale = if max_abs > 0.0 { max_abs / 127.0 } else { 1.0 };
            scales[n] = scale;
            let (block, lane) = (n / block_cols, n % block_cols);
            let mut sum = 0i32;
            for (k, w) in column.enumerate() {
                let q = (w / scale).round().clamp(-127.0, 127.0) as i8;
                sum += q as i32;
                let (s, within) = (k / step, k % step);
                quantized[(block * steps + s) * step_len + lane * step + within] = q;
            }
            if layout == WeightLayout::Bytes {
                offset_sums[n] = ACTIVATION_OFFSET * sum;
            }
        }
        let packed = match layout {
            WeightLayout::Bytes => PackedWeights::Bytes(quantized),
            WeightLayout::Words => {
                PackedWeights::Words(quantized.into_iter().map(i16::from).collect())
            }
        };
        Self {
            in_dim,
            out_dim,
            kernel,
            steps,
            packed,
            scales,
            offset_sums,
            bias: bias.to_vec(),
        }
    }

    pub(crate) fn in_dim(&self) -> usize {
        self.in_dim
    }

    pub(crate) fn out_dim(&self) -> usize {
        self.out_dim
    }

    /// `x` is `(rows, in_dim)` row-major; returns `(rows, out_dim)`, with the exact GELU applied
    /// when `gelu` (fused, so the wide intermediate activation is written once).
    pub(crate) fn forward(&self, x: &[f32], rows: usize, gelu: bool) -> Vec<f32> {
        assert_eq!(x.len(), rows * self.in_dim, "input size");
        let layout = self.kernel.layout();
        let stride = self.steps * layout.step();
        let (activations, row_scales) = quantize_rows(x, rows, self.in_dim, stride, layout);
        let block_cols = layout.block_cols();
        let tile_rows = self.kernel.tile_rows();
        let mut out = vec![0f32; rows * self.out_dim];
        let out_ptr = SendPtr(out.as_mut_ptr());
        let blocks = self.out_dim.div_ceil(block_cols);
        let row_tasks = rows.div_ceil(TASK_ROWS);
        let block_tasks = blocks.div_ceil(TASK_BLOCKS);
        let run_task = |task: usize| {
            let (row_task, block_task) = (task / block_tasks, task % block_tasks);
            let row_end = ((row_task + 1) * TASK_ROWS).min(rows);
            let block_end = ((block_task + 1) * TASK_BLOCKS).min(blocks);
            let mut sums: TileSums = [[0; MAX_BLOCK_COLS]; MAX_TILE_ROWS];
            for block in block_task * TASK_BLOCKS..block_end {
                let mut row = row_task * TASK_ROWS;
                while row < row_end {
                    let n = (row_end - row).min(tile_rows);
                    self.tile(&activations, row, n, block, &mut sums);
                    // SAFETY: tasks own disjoint (rows, blocks) tiles of `out`, which has
                    // `rows * out_dim` elements; `epilogue` writes only inside this tile.
                    unsafe {
                        self.epilogue(
                            &sums[..n],
                            &row_scales[row..row + n],
                            row,
                            block * block_cols,
                            gelu,
                            out_ptr,
                        );
                    }
                    row += n;
                }
            }
        };
        // The caller already runs one batch per thread (see `ops::batch_parallel`); nested
        // splitting measured 1.8x slower on short queries.
        if crate::ops::in_batch_parallel_region() {
            (0..row_tasks * block_tasks).for_each(run_task);
        } else {
            (0..row_tasks * block_tasks)
                .into_par_iter()
                .for_each(run_task);
        }
        out
    }

    /// Integer sums of activation rows `row..row + rows` against packed column block `block`,
    /// into `sums[..rows][..block_cols]`.
    fn tile(
        &self,
        activations: &QuantizedRows,
        row: usize,
        rows: usize,
        block: usize,
        sums: &mut TileSums,
    ) {
        debug_assert!(rows >= 1 && rows <= self.kernel.tile_rows());
        let steps = self.steps;
        match (&self.packed, activations) {
            (PackedWeights::Bytes(packed), QuantizedRows::Bytes { values, stride }) => {
                let panel = &packed[block * steps * 128..][..steps * 128];
                let a = &values[row * stride..][..rows * stride];
                match self.kernel {
                    #[cfg(target_arch = "x86_64")]
                    Kernel::Vnni => {
                        // SAFETY: the CPU has the kernel's features (checked in `detect`); the
                        // slices cover every byte read: `rows` rows of `stride >= 4 * steps`.
                        unsafe { tile_vnni(a.as_ptr(), *stride, rows, panel.as_ptr(), steps, sums) }
                    }
                    _ => tile_portable(a, *stride, rows, panel, steps, sums),
                }
            }
            #[cfg(target_arch = "x86_64")]
            (PackedWeights::Words(packed), QuantizedRows::Words { values, stride }) => {
                let panel = &packed[block * steps * 32..][..steps * 32];
                let a = &values[row * stride..][..rows * stride];
                // SAFETY: the words layout is only chosen with AVX2 present; the slices cover
                // every element read: `rows` rows of `stride >= 2 * steps`.
                unsafe { tile_avx2(a.as_ptr(), *stride, rows, panel.as_ptr(), steps, sums) }
            }
            _ => unreachable!("activations are quantised for the layer's own layout"),
        }
    }

    /// Turns a tile's integer sums into `y = s_x·s_w·(sum − offset) + b` (and GELU).
    ///
    /// # Safety
    /// `out` must point at a `(rows, out_dim)` buffer that no other thread writes in rows
    /// `first_row..first_row + sums.len()`, columns `first_col..first_col + block_cols`.
    unsafe fn epilogue(
        &self,
        sums: &[[i32; MAX_BLOCK_COLS]],
        row_scales: &[f32],
        first_row: usize,
        first_col: usize,
        gelu: bool,
        out: SendPtr,
    ) {
        let cols = (self.out_dim - first_col).min(self.kernel.layout().block_cols());
        let scales = &self.scales[first_col..first_col + cols];
        let offsets = &self.offset_sums[first_col..first_col + cols];
        let bias = &self.bias[first_col..first_col + cols];
        for (r, (row_sums, &row_scale)) in sums.iter().zip(row_scales).enumerate() {
            let dst = std::slice::from_raw_parts_mut(
                out.0.add((first_row + r) * self.out_dim + first_col),
                cols,
            );
            for c in 0..cols {
                dst[c] = row_scale * scales[c] * (row_sums[c] - offsets[c]) as f32 + bias[c];
            }
            if gelu {
                crate::ops::gelu_erf_in_place(dst);
            }
        }
    }
}

/// `layer` applied to `x` `(rows, in_dim)` f32 on the CPU, as a candle op (forward only).
pub(crate) fn int8_linear(
    x: &Tensor,
    layer: &Arc<Int8Linear>,
    gelu: bool,
) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op1_no_bwd(&Int8LinearOp {
        layer: layer.clone(),
        gelu,
    })
}

struct Int8LinearOp {
    layer: Arc<Int8Linear>,
    gelu: bool,
}

impl CustomOp1 for Int8LinearOp {
    fn name(&self) -> &'static str {
        "zrag-int8-linear"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = match (storage, layout.contiguous_offsets()) {
            (CpuStorage::F32(data), Some((start, end))) => &data[start..end],
            _ => candle_core::bail!("int8 linear: expected a contiguous f32 input"),
        };
        let (rows, in_dim) = layout.shape().dims2()?;
        if in_dim != self.layer.in_dim() {
            candle_core::bail!(
                "int8 linear: input {:?} does not fit a layer of {} inputs",
                layout.shape(),
                self.layer.in_dim()
            );
        }
        let out = self.layer.forward(x, rows, self.gelu);
        Ok((
            CpuStorage::F32(out),
            Shape::from((rows, self.layer.out_dim())),
        ))
    }
}

/// A raw output pointer shared by tasks that write disjoint tiles.
#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: only used for disjoint writes (see `Int8Linear::forward`).
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

/// Per-row symmetric quantisation of `x` `(rows, cols)` for `layout`, rows padded to
/// `stride`; returns the values and each row's scale.
fn quantize_rows(
    x: &[f32],
    rows: usize,
    cols: usize,
    stride: usize,
    layout: WeightLayout,
) -> (QuantizedRows, Vec<f32>) {
    let mut scales = vec![0f32; rows];
    let quantized = match layout {
        WeightLayout::Bytes => {
            let mut values = vec![ACTIVATION_OFFSET as u8; rows * stride];
            values
                .par_chunks_mut(stride)
                .zip(scales.par_iter_mut())
                .zip(x.par_chunks(cols))
                .with_min_len(16)
                .for_each(|((dst, scale), src)| {
                    *scale = quantize_row(src, &mut dst[..cols], |q| (q + ACTIVATION_OFFSET) as u8)
                });
            QuantizedRows::Bytes { values, stride }
        }
        WeightLayout::Words => {
            let mut values = vec![0i16; rows * stride];
            values
                .par_chunks_mut(stride)
                .zip(scales.par_iter_mut())
                .zip(x.par_chunks(cols))
                .with_min_len(16)
                .for_each(|((dst, scale), src)| {
                    *scale = quantize_row(src, &mut dst[..cols], |q| q as i16)
                });
            QuantizedRows::Words { values, stride }
        }
    };
    (quantized, scales)
}

/// Quantises one row to `p ∈ [-127, 127]`, stores `encode(p)` in `dst`, returns the scale.
#[inline(always)]
fn quantize_row<T>(src: &[f32], dst: &mut [T], encode: impl Fn(i32) -> T) -> f32 {
    let max_abs = src.iter().fold(0f32, |m, v| m.max(v.abs()));
    let scale = if max_abs > 0.0 { max_abs / 127.0 } else { 1.0 };
    let inverse = 1.0 / scale;
    // 1.5 · 2^23: adding it rounds to the nearest integer (ties to even) in the low mantissa
    // bits; branch-free and libm-free, so the loop vectorises.
    const ROUND_MAGIC: f32 = 12_582_912.0;
    for (d, &v) in dst.iter_mut().zip(src) {
        let rounded = (v * inverse).clamp(-127.0, 127.0) + ROUND_MAGIC;
        *d = encode(rounded.to_bits().wrapping_sub(ROUND_MAGIC.to_bits()) as i32);
    }
    scale
}

/// The byte layout's sums, one product at a time (reference for the SIMD kernels and the
/// fallback without them).
fn tile_portable(
    a: &[u8],
    stride: usize,
    rows: usize,
    panel: &[i8],
    groups: usize,
    sums: &mut TileSums,
) {
    for (r, row_sums) in sums.iter_mut().enumerate().take(rows) {
        let row = &a[r * stride..];
        row_sums.fill(0);
        for g in 0..groups {
            let weights = &panel[g * 128..(g + 1) * 128];
            let acts = &row[g * 4..g * 4 + 4];
            for (c, sum) in row_sums.iter_mut().enumerate() {
                for j in 0..4 {
                    *sum += acts[j] as i32 * weights[c * 4 + j] as i32;
                }
            }
        }
    }
}

/// # Safety
/// AVX-512 F/BW/VNNI present; `a` covers `rows` rows of `stride >= 4 * groups` bytes, `panel`
/// covers `groups * 128` bytes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn tile_vnni(
    a: *const u8,
    stride: usize,
    rows: usize,
    panel: *const i8,
    groups: usize,
    sums: &mut TileSums,
) {
    match rows {
        8 => tile_vnni_rows::<8>(a, stride, panel, groups, sums),
        7 => tile_vnni_rows::<7>(a, stride, panel, groups, sums),
        6 => tile_vnni_rows::<6>(a, stride, panel, groups, sums),
        5 => tile_vnni_rows::<5>(a, stride, panel, groups, sums),
        4 => tile_vnni_rows::<4>(a, stride, panel, groups, sums),
        3 => tile_vnni_rows::<3>(a, stride, panel, groups, sums),
        2 => tile_vnni_rows::<2>(a, stride, panel, groups, sums),
        _ => tile_vnni_rows::<1>(a, stride, panel, groups, sums),
    }
}

/// `ROWS` rows × 2 vectors of 16 lanes: 16 accumulators of the 32 registers.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn tile_vnni_rows<const ROWS: usize>(
    a: *const u8,
    stride: usize,
    panel: *const i8,
    groups: usize,
    sums: &mut TileSums,
) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_si512(); 2]; ROWS];
    for g in 0..groups {
        let weights = panel.add(g * 128);
        let low = _mm512_loadu_si512(weights as *const _);
        let high = _mm512_loadu_si512(weights.add(64) as *const _);
        for (r, acc_row) in acc.iter_mut().enumerate() {
            let four = (a.add(r * stride + g * 4) as *const i32).read_unaligned();
            let broadcast = _mm512_set1_epi32(four);
            acc_row[0] = _mm512_dpbusd_epi32(acc_row[0], broadcast, low);
            acc_row[1] = _mm512_dpbusd_epi32(acc_row[1], broadcast, high);
        }
    }
    for (acc_row, row_sums) in acc.iter().zip(sums.iter_mut()) {
        _mm512_storeu_si512(row_sums.as_mut_ptr() as *mut _, acc_row[0]);
        _mm512_storeu_si512(row_sums.as_mut_ptr().add(16) as *mut _, acc_row[1]);
    }
}

/// # Safety
/// AVX2 present; `a` covers `rows` rows of `stride >= 2 * pairs` values, `panel` covers
/// `pairs * 32` values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn tile_avx2(
    a: *const i16,
    stride: usize,
    rows: usize,
    panel: *const i16,
    pairs: usize,
    sums: &mut TileSums,
) {
    match rows {
        6 => tile_avx2_rows::<6>(a, stride, panel, pairs, sums),
        5 => tile_avx2_rows::<5>(a, stride, panel, pairs, sums),
        4 => tile_avx2_rows::<4>(a, stride, panel, pairs, sums),
        3 => tile_avx2_rows::<3>(a, stride, panel, pairs, sums),
        2 => tile_avx2_rows::<2>(a, stride, panel, pairs, sums),
        _ => tile_avx2_rows::<1>(a, stride, panel, pairs, sums),
    }
}

/// `ROWS` rows × 2 vectors of 8 lanes: 12 accumulators, 2 weight vectors and a broadcast fill
/// 15 of the 16 registers.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn tile_avx2_rows<const ROWS: usize>(
    a: *const i16,
    stride: usize,
    panel: *const i16,
    pairs: usize,
    sums: &mut TileSums,
) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm256_setzero_si256(); 2]; ROWS];
    for p in 0..pairs {
        let weights = panel.add(p * 32);
        let low = _mm256_loadu_si256(weights as *const __m256i);
        let high = _mm256_loadu_si256(weights.add(16) as *const __m256i);
        for (r, acc_row) in acc.iter_mut().enumerate() {
            let two = (a.add(r * stride + p * 2) as *const i32).read_unaligned();
            let broadcast = _mm256_set1_epi32(two);
            acc_row[0] = _mm256_add_epi32(acc_row[0], _mm256_madd_epi16(broadcast, low));
            acc_row[1] = _mm256_add_epi32(acc_row[1], _mm256_madd_epi16(broadcast, high));
        }
    }
    for (acc_row, row_sums) in acc.iter().zip(sums.iter_mut()) {
        _mm256_storeu_si256(row_sums.as_mut_ptr() as *mut __m256i, acc_row[0]);
        _mm256_storeu_si256(row_sums.as_mut_ptr().add(8) as *mut __m256i, acc_row[1]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::Rng;

    fn random(n: usize, seed: u64, std: f32) -> Vec<f32> {
        let mut rng = Rng::new(seed);
        (0..n).map(|_| rng.normal(std)).collect()
    }

    fn reference(x: &[f32], weight_t: &[f32], bias: &[f32], rows: usize, k: usize) -> Vec<f32> {
        let n = bias.len();
        let mut out = vec![0f32; rows * n];
        for r in 0..rows {
            for c in 0..n {
                let mut sum = 0f64;
                for i in 0..k {
                    sum += x[r * k + i] as f64 * weight_t[i * n + c] as f64;
                }
                out[r * n + c] = sum as f32 + bias[c];
            }
        }
        out
    }

    /// The SIMD kernels this CPU can run.
    fn simd_kernels() -> Vec<Kernel> {
        #[allow(unused_mut)]
        let mut kernels = Vec::new();
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512bw")
                && std::arch::is_x86_feature_detected!("avx512vnni")
            {
                kernels.push(Kernel::Vnni);
            }
            if std::arch::is_x86_feature_detected!("avx2") {
                kernels.push(Kernel::Avx2);
            }
        }
        kernels
    }

    #[test]
    fn simd_and_portable_kernels_agree_exactly() {
        let kernels = simd_kernels();
        if kernels.is_empty() {
            eprintln!("no AVX2 or AVX-512 VNNI on this CPU: only the portable kernel runs");
        }
        // Odd sizes: partial row tiles, a partial column block, in_dim not a multiple of 4.
        for &(rows, k, n) in &[(1, 7, 5), (13, 30, 70), (70, 64, 33), (129, 384, 100)] {
            let x = random(rows * k, 1, 1.0);
            let w = random(k * n, 2, 0.1);
            let b = random(n, 3, 0.1);
            let slow = Int8Linear::quantize_for(&w, k, n, &b, Kernel::Portable);
            for &kernel in &kernels {
                let fast = Int8Linear::quantize_for(&w, k, n, &b, kernel);
                for gelu in [false, true] {
                    assert_eq!(
                        fast.forward(&x, rows, gelu),
                        slow.forward(&x, rows, gelu),
                        "{kernel:?}: rows {rows} k {k} n {n} gelu {gelu}"
                    );
                }
            }
        }
    }

    #[test]
    fn matches_f32_within_the_quantisation_error() {
        let (rows, k, n) = (40, 384, 96);
        let x = random(rows * k, 4, 1.0);
        let w = random(k * n, 5, 0.05);
        let b = random(n, 6, 0.1);
        let exact = reference(&x, &w, &b, rows, k);
        let layer = Int8Linear::quantize(&w, k, n, &b);
        let approx = layer.forward(&x, rows, false);
        // Each of x and w is rounded to 1/254 of its row's / column's range: the relative
        // error of a dot product of k Gaussian terms is a few tenths of a percent of its norm.
        let (mut err, mut norm) = (0f64, 0f64);
        for (a, e) in approx.iter().zip(&exact) {
            err += ((a - e) as f64).powi(2);
            norm += (*e as f64).powi(2);
        }
        let relative = (err / norm).sqrt();
        assert!(relative < 0.01, "relative error {relative}");
        assert!(relative > 0.0, "int8 cannot be exact on random data");
    }

    #[test]
    fn fused_gelu_equals_gelu_after_the_layer() {
        let (rows, k, n) = (9, 16, 40);
        let x = random(rows * k, 7, 1.0);
        let w = random(k * n, 8, 0.3);
        let b = random(n, 9, 0.1);
        let layer = Int8Linear::quantize(&w, k, n, &b);
        let mut plain = layer.forward(&x, rows, false);
        crate::ops::gelu_erf_in_place(&mut plain);
        assert_eq!(layer.forward(&x, rows, true), plain);
    }

    #[test]
    fn zero_rows_and_columns_stay_finite() {
        let (rows, k, n) = (3, 8, 4);
        let x = vec![0f32; rows * k];
        let w = vec![0f32; k * n];
        let b = vec![0.5f32; n];
        let layer = Int8Linear::quantize(&w, k, n, &b);
        assert_eq!(layer.forward(&x, rows, false), vec![0.5f32; rows * n]);
    }
}
