//! Q4_1 weight matrices and their matmul kernel (AVX2 with a portable fallback).
//!
//! SmolLM2's GGUF stores almost every matrix as Q4_1: blocks of 32 weights `d·q + m` with
//! 4-bit `q` and f16 `d`, `m`. candle multiplies Q4_1 with a scalar loop (measured: 82 % of
//! decode time), so this module does it the way llama.cpp does: activations are quantised to
//! 8 bits per 32-block (`x ≈ d₈·q₈`, plus `s₈ = d₈·Σq₈`), and each block's dot product is
//!
//! ```text
//! Σ (d·q + m)·(d₈·q₈) = d·d₈·Σ q·q₈ + m·s₈
//! ```
//!
//! with the integer sum done 32 lanes at a time (`maddubs`). Rows of the weight matrix are
//! split across threads; each weight row is read once per call and reused for every
//! activation row, so a batch of k documents costs little more than one.

use half::f16;
use rayon::prelude::*;

/// Weights per quantisation block.
const BLOCK: usize = 32;

/// One Q4_1 block exactly as stored in GGUF: f16 scale, f16 minimum, 32 nibbles (weights
/// 0–15 in the low nibbles, 16–31 in the high ones).
#[derive(Clone, Copy)]
#[repr(C)]
struct BlockQ4_1 {
    d: u16,
    m: u16,
    qs: [u8; 16],
}

/// One activation block quantised to 8 bits: `x ≈ d·q`, and `s = d·Σq` for the Q4_1 minimum.
#[derive(Clone, Copy)]
#[repr(C)]
struct BlockQ8 {
    d: f32,
    s: f32,
    qs: [i8; 32],
}

/// A `[rows, cols]` Q4_1 matrix (`cols` a multiple of 32).
pub(crate) struct Q4_1Matrix {
    rows: usize,
    cols: usize,
    blocks: Vec<BlockQ4_1>,
}

impl Q4_1Matrix {
    /// From GGUF's raw bytes (20 bytes per block, row-major).
    pub(crate) fn from_bytes(bytes: &[u8], rows: usize, cols: usize) -> Option<Self> {
        if !cols.is_multiple_of(BLOCK) || bytes.len() != rows * cols / BLOCK * 20 {
            return None;
        }
        let blocks = bytes
            .chunks_exact(20)
            .map(|b| BlockQ4_1 {
                d: u16::from_le_bytes([b[0], b[1]]),
                m: u16::from_le_bytes([b[2], b[3]]),
                qs: b[4..20].try_into().expect("16 bytes"),
            })
            .collect();
        Some(Q4_1Matrix { rows, cols, blocks })
    }

    /// `x` is `[m, cols]`; returns `x · Wᵀ`, `[m, rows]`.
    pub(crate) fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        tiled_matmul(Kernel::detect(), &self.blocks, self.rows, self.cols, x, m)
    }
}

/// One Q8_0 block as stored in GGUF: f16 scale `d`, 32 signed bytes, weight = `d·q`.
#[derive(Clone, Copy)]
#[repr(C)]
struct BlockQ8_0 {
    d: u16,
    qs: [i8; 32],
}

/// A `[rows, cols]` Q8_0 matrix: SmolLM2's token embedding, which is also its (tied) output
/// layer, 21 % of a decode step's multiply-adds. candle's kernel for it runs on candle's own
/// thread pool beside rayon's; this one shares the Q4_1 driver and pool.
pub(crate) struct Q8_0Matrix {
    rows: usize,
    cols: usize,
    blocks: Vec<BlockQ8_0>,
}

impl Q8_0Matrix {
    /// From GGUF's raw bytes (34 bytes per block, row-major).
    pub(crate) fn from_bytes(bytes: &[u8], rows: usize, cols: usize) -> Option<Self> {
        if !cols.is_multiple_of(BLOCK) || bytes.len() != rows * cols / BLOCK * 34 {
            return None;
        }
        let blocks = bytes
            .chunks_exact(34)
            .map(|b| BlockQ8_0 {
                d: u16::from_le_bytes([b[0], b[1]]),
                qs: std::array::from_fn(|i| b[2 + i] as i8),
            })
            .collect();
        Some(Q8_0Matrix { rows, cols, blocks })
    }

    /// `x` is `[m, cols]`; returns `x · Wᵀ`, `[m, rows]`.
    pub(crate) fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        tiled_matmul(Q8Kernel::detect(), &self.blocks, self.rows, self.cols, x, m)
    }
}

/// Dot products of weight rows (blocks of one quantisation type) with 8-bit activation rows.
trait RowKernel: Copy + Sync {
    type Block: Sync;
    fn dot(self, weights: &[Self::Block], act: &[BlockQ8]) -> f32;
    fn dot4(self, weights: &[Self::Block], acts: [&[BlockQ8]; 4]) -> [f32; 4] {
        acts.map(|a| self.dot(weights, a))
    }
    /// Two weight rows against four activation rows: `[row][activation]`.
    fn dot2x4(self, weights: [&[Self::Block]; 2], acts: [&[BlockQ8]; 4]) -> [[f32; 4]; 2] {
        weights.map(|w| self.dot4(w, acts))
    }
}

/// `x · Wᵀ` for `W` `[rows, cols]` stored as `blocks` (row-major, `cols / 32` per row).
fn tiled_matmul<K: RowKernel>(
    kernel: K,
    blocks: &[K::Block],
    rows: usize,
    cols: usize,
    x: &[f32],
    m: usize,
) -> Vec<f32> {
    let blocks_per_row = cols / BLOCK;
    let activations = quantize_rows(x, m, cols);
    let weight_row = |row: usize| &blocks[row * blocks_per_row..(row + 1) * blocks_per_row];
    if m == 1 {
        // Decoding one sequence: no tiles to assemble, and runs big enough that a step's
        // ~200 matmuls are not dominated by task hand-offs.
        let run = (rows / (8 * rayon::current_num_threads().max(1))).max(16);
        let mut out = vec![0.0f32; rows];
        out.par_chunks_mut(run).enumerate().for_each(|(t, chunk)| {
            for (j, value) in chunk.iter_mut().enumerate() {
                *value = kernel.dot(weight_row(t * run + j), &activations);
            }
        });
        return out;
    }
    // Work items are runs of weight rows; each produces its own [m, run] tile.
    let run = 16usize;
    let tiles: Vec<Vec<f32>> = (0..rows.div_ceil(run))
        .into_par_iter()
        .map(|t| {
            let first = t * run;
            let last = (first + run).min(rows);
            let mut tile = vec![0.0f32; m * (last - first)];
            let width = last - first;
            let act = |i: usize| &activations[i * blocks_per_row..(i + 1) * blocks_per_row];
            // Register tiles: two weight rows share each activation load, four activation
            // rows share each unpacked weight block.
            let mut j = 0;
            while j < width {
                let pair = j + 1 < width;
                let mut i = 0;
                while i + 4 <= m {
                    let acts = [act(i), act(i + 1), act(i + 2), act(i + 3)];
                    if pair {
                        let rows = [weight_row(first + j), weight_row(first + j + 1)];
                        for (r, dots) in kernel.dot2x4(rows, acts).iter().enumerate() {
                            for (lane, value) in dots.iter().enumerate() {
                                tile[(i + lane) * width + j + r] = *value;
                            }
                        }
                    } else {
                        let dots = kernel.dot4(weight_row(first + j), acts);
                        for (lane, value) in dots.into_iter().enumerate() {
                            tile[(i + lane) * width + j] = value;
                        }
                    }
                    i += 4;
                }
                for i in i..m {
                    tile[i * width + j] = kernel.dot(weight_row(first + j), act(i));
                    if pair {
                        tile[i * width + j + 1] = kernel.dot(weight_row(first + j + 1), act(i));
                    }
                }
                j += if pair { 2 } else { 1 };
            }
            tile
        })
        .collect();
    let mut out = vec![0.0f32; m * rows];
    for (t, tile) in tiles.iter().enumerate() {
        let first = t * run;
        let width = tile.len() / m.max(1);
        for i in 0..m {
            out[i * rows + first..i * rows + first + width]
                .copy_from_slice(&tile[i * width..(i + 1) * width]);
        }
    }
    out
}

fn quantize_rows(x: &[f32], m: usize, cols: usize) -> Vec<BlockQ8> {
    let blocks_per_row = cols / BLOCK;
    let mut out = vec![
        BlockQ8 {
            d: 0.0,
            s: 0.0,
            qs: [0; 32]
        };
        m * blocks_per_row
    ];
    out.par_chunks_mut(blocks_per_row)
        .zip(x.par_chunks(cols))
        .for_each(|(blocks, row)| quantize_row(row, blocks));
    out
}

multiversion! {
    /// One row of activations into 8-bit blocks (vectorised `round` under AVX2, not a libm
    /// call per value).
    fn quantize_row(row: &[f32], blocks: &mut [BlockQ8]) {
        for (block, values) in blocks.iter_mut().zip(row.chunks_exact(BLOCK)) {
            let amax = values.iter().fold(0.0f32, |a, v| a.max(v.abs()));
            let d = amax / 127.0;
            let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
            let mut sum = 0i32;
            for (q, v) in block.qs.iter_mut().zip(values) {
                let r = (v * inv).round() as i32;
                *q = r as i8;
                sum += r;
            }
            block.d = d;
            block.s = d * sum as f32;
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kernel {
    /// AVX-512 VNNI on 256-bit vectors: one `vpdpbusd` per 32 products.
    #[cfg(target_arch = "x86_64")]
    Vnni,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    Portable,
}

impl Kernel {
    fn detect() -> Kernel {
        #[cfg(target_arch = "x86_64")]
        {
            if has_avx2_fma_f16c() {
                if std::arch::is_x86_feature_detected!("avx512vnni")
                    && std::arch::is_x86_feature_detected!("avx512vl")
                    && std::env::var_os("ZRAG_NO_VNNI").is_none()
                {
                    return Kernel::Vnni;
                }
                return Kernel::Avx2;
            }
        }
        Kernel::Portable
    }
}

impl RowKernel for Kernel {
    type Block = BlockQ4_1;

    #[inline]
    fn dot(self, weights: &[BlockQ4_1], act: &[BlockQ8]) -> f32 {
        match self {
            // SAFETY: detect() checked the CPU features this function is compiled for.
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 | Kernel::Vnni => unsafe { dot_avx2(weights, act) },
            Kernel::Portable => dot_portable(weights, act),
        }
    }

    #[inline]
    fn dot4(self, weights: &[BlockQ4_1], acts: [&[BlockQ8]; 4]) -> [f32; 4] {
        match self {
            // SAFETY: detect() checked the CPU features this function is compiled for.
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 | Kernel::Vnni => unsafe { dot4_avx2(weights, acts) },
            Kernel::Portable => acts.map(|a| dot_portable(weights, a)),
        }
    }

    /// Two weight rows against four activation rows: `[row][activation]`.
    #[inline]
    fn dot2x4(self, weights: [&[BlockQ4_1]; 2], acts: [&[BlockQ8]; 4]) -> [[f32; 4]; 2] {
        match self {
            // SAFETY: detect() checked the CPU features this function is compiled for.
            #[cfg(target_arch = "x86_64")]
            Kernel::Vnni => unsafe { dot2x4_vnni(weights, acts) },
            _ => weights.map(|w| self.dot4(w, acts)),
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Q8Kernel {
    #[cfg(target_arch = "x86_64")]
    Avx2,
    Portable,
}

impl Q8Kernel {
    fn detect() -> Q8Kernel {
        #[cfg(target_arch = "x86_64")]
        if has_avx2_fma_f16c() {
            return Q8Kernel::Avx2;
        }
        Q8Kernel::Portable
    }
}

/// What the AVX2 kernels of this module are compiled for.
#[cfg(target_arch = "x86_64")]
fn has_avx2_fma_f16c() -> bool {
    std::arch::is_x86_feature_detected!("avx2")
        && std::arch::is_x86_feature_detected!("fma")
        && std::arch::is_x86_feature_detected!("f16c")
}

impl RowKernel for Q8Kernel {
    type Block = BlockQ8_0;

    #[inline]
    fn dot(self, weights: &[BlockQ8_0], act: &[BlockQ8]) -> f32 {
        match self {
            // SAFETY: detect() checked the CPU features this function is compiled for.
            #[cfg(target_arch = "x86_64")]
            Q8Kernel::Avx2 => unsafe { dot_q8_0_avx2(weights, act) },
            Q8Kernel::Portable => dot_q8_0_portable(weights, act),
        }
    }
}

fn dot_q8_0_portable(weights: &[BlockQ8_0], act: &[BlockQ8]) -> f32 {
    let mut sum = 0.0f32;
    for (w, a) in weights.iter().zip(act) {
        let int_sum: i32 =
            w.qs.iter()
                .zip(&a.qs)
                .map(|(&x, &y)| x as i32 * y as i32)
                .sum();
        sum += f16::from_bits(w.d).to_f32() * a.d * int_sum as f32;
    }
    sum
}

/// `maddubs` multiplies unsigned by signed bytes, so the weight's sign moves onto the
/// activation: |w|·(sign(w)·a) = w·a (as llama.cpp does). Neither side is ever -128.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_q8_0_avx2(weights: &[BlockQ8_0], act: &[BlockQ8]) -> f32 {
    use std::arch::x86_64::*;
    let ones = _mm256_set1_epi16(1);
    let mut acc = _mm256_setzero_ps();
    for (w, a) in weights.iter().zip(act) {
        let qw = _mm256_loadu_si256(w.qs.as_ptr() as *const __m256i);
        let qa = _mm256_loadu_si256(a.qs.as_ptr() as *const __m256i);
        let pairs = _mm256_maddubs_epi16(_mm256_sign_epi8(qw, qw), _mm256_sign_epi8(qa, qw));
        let sums = _mm256_madd_epi16(pairs, ones);
        let d = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(w.d as i32)));
        acc = _mm256_fmadd_ps(_mm256_set1_ps(d * a.d), _mm256_cvtepi32_ps(sums), acc);
    }
    horizontal_sum(acc)
}

fn dot_portable(weights: &[BlockQ4_1], act: &[BlockQ8]) -> f32 {
    let mut sum = 0.0f32;
    for (w, a) in weights.iter().zip(act) {
        let mut int_sum = 0i32;
        for j in 0..16 {
            int_sum += (w.qs[j] & 0x0F) as i32 * a.qs[j] as i32;
            int_sum += (w.qs[j] >> 4) as i32 * a.qs[j + 16] as i32;
        }
        let (d, m) = (f16::from_bits(w.d).to_f32(), f16::from_bits(w.m).to_f32());
        sum += d * a.d * int_sum as f32 + m * a.s;
    }
    sum
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_avx2(weights: &[BlockQ4_1], act: &[BlockQ8]) -> f32 {
    use std::arch::x86_64::*;
    let low_mask = _mm256_set1_epi8(0x0F);
    let ones = _mm256_set1_epi16(1);
    let mut acc = _mm256_setzero_ps();
    let mut min_sum = 0.0f32;
    for (w, a) in weights.iter().zip(act) {
        let packed = _mm_loadu_si128(w.qs.as_ptr() as *const __m128i);
        // [low nibbles | high nibbles] = weights 0..15 then 16..31, the order of a.qs.
        let nibbles = _mm256_set_m128i(_mm_srli_epi16(packed, 4), packed);
        let q4 = _mm256_and_si256(nibbles, low_mask);
        let q8 = _mm256_loadu_si256(a.qs.as_ptr() as *const __m256i);
        let pairs = _mm256_maddubs_epi16(q4, q8);
        let sums = _mm256_madd_epi16(pairs, ones);
        let scales = _mm_cvtph_ps(_mm_cvtsi32_si128((w.d as i32) | ((w.m as i32) << 16)));
        let d = _mm_cvtss_f32(scales);
        let m = _mm_cvtss_f32(_mm_shuffle_ps(scales, scales, 1));
        acc = _mm256_fmadd_ps(_mm256_set1_ps(d * a.d), _mm256_cvtepi32_ps(sums), acc);
        min_sum += m * a.s;
    }
    horizontal_sum(acc) + min_sum
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot4_avx2(weights: &[BlockQ4_1], acts: [&[BlockQ8]; 4]) -> [f32; 4] {
    use std::arch::x86_64::*;
    let low_mask = _mm256_set1_epi8(0x0F);
    let ones = _mm256_set1_epi16(1);
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut min_sum = [0.0f32; 4];
    for (b, w) in weights.iter().enumerate() {
        let packed = _mm_loadu_si128(w.qs.as_ptr() as *const __m128i);
        let q4 = _mm256_and_si256(
            _mm256_set_m128i(_mm_srli_epi16(packed, 4), packed),
            low_mask,
        );
        let scales = _mm_cvtph_ps(_mm_cvtsi32_si128((w.d as i32) | ((w.m as i32) << 16)));
        let d = _mm_cvtss_f32(scales);
        let m = _mm_cvtss_f32(_mm_shuffle_ps(scales, scales, 1));
        for lane in 0..4 {
            let a = acts[lane].get_unchecked(b);
            let q8 = _mm256_loadu_si256(a.qs.as_ptr() as *const __m256i);
            let sums = _mm256_madd_epi16(_mm256_maddubs_epi16(q4, q8), ones);
            acc[lane] =
                _mm256_fmadd_ps(_mm256_set1_ps(d * a.d), _mm256_cvtepi32_ps(sums), acc[lane]);
            min_sum[lane] += m * a.s;
        }
    }
    let mut out = [0.0f32; 4];
    for lane in 0..4 {
        out[lane] = horizontal_sum(acc[lane]) + min_sum[lane];
    }
    out
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c,avx512vnni,avx512vl")]
unsafe fn dot2x4_vnni(weights: [&[BlockQ4_1]; 2], acts: [&[BlockQ8]; 4]) -> [[f32; 4]; 2] {
    use std::arch::x86_64::*;
    let low_mask = _mm256_set1_epi8(0x0F);
    let zero = _mm256_setzero_si256();
    let mut acc = [[_mm256_setzero_ps(); 4]; 2];
    let mut min_sum = [[0.0f32; 4]; 2];
    for b in 0..weights[0].len() {
        let mut q4 = [zero; 2];
        let mut d = [0.0f32; 2];
        let mut m = [0.0f32; 2];
        for r in 0..2 {
            let w = weights[r].get_unchecked(b);
            let packed = _mm_loadu_si128(w.qs.as_ptr() as *const __m128i);
            q4[r] = _mm256_and_si256(
                _mm256_set_m128i(_mm_srli_epi16(packed, 4), packed),
                low_mask,
            );
            let scales = _mm_cvtph_ps(_mm_cvtsi32_si128((w.d as i32) | ((w.m as i32) << 16)));
            d[r] = _mm_cvtss_f32(scales);
            m[r] = _mm_cvtss_f32(_mm_shuffle_ps(scales, scales, 1));
        }
        for lane in 0..4 {
            let a = acts[lane].get_unchecked(b);
            let q8 = _mm256_loadu_si256(a.qs.as_ptr() as *const __m256i);
            for r in 0..2 {
                let sums = _mm256_dpbusd_epi32(zero, q4[r], q8);
                acc[r][lane] = _mm256_fmadd_ps(
                    _mm256_set1_ps(d[r] * a.d),
                    _mm256_cvtepi32_ps(sums),
                    acc[r][lane],
                );
                min_sum[r][lane] += m[r] * a.s;
            }
        }
    }
    let mut out = [[0.0f32; 4]; 2];
    for r in 0..2 {
        for lane in 0..4 {
            out[r][lane] = horizontal_sum(acc[r][lane]) + min_sum[r][lane];
        }
    }
    out
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn horizontal_sum(v: std::arch::x86_64::__m256) -> f32 {
    use std::arch::x86_64::*;
    let s = _mm_add_ps(_mm256_extractf128_ps(v, 1), _mm256_castps256_ps128(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn random_matrix(rows: usize, cols: usize, seed: u64) -> (Vec<u8>, Vec<f32>) {
        // Random blocks, and their exact de-quantised values.
        let mut state = seed;
        let mut next = || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 33) as u32
        };
        let mut bytes = Vec::new();
        let mut values = Vec::new();
        for _ in 0..rows * cols / BLOCK {
            let d = f16::from_f32((next() % 1000) as f32 / 20000.0);
            let m = f16::from_f32(-((next() % 1000) as f32) / 5000.0);
            let qs: Vec<u8> = (0..16).map(|_| next() as u8).collect();
            bytes.extend_from_slice(&d.to_bits().to_le_bytes());
            bytes.extend_from_slice(&m.to_bits().to_le_bytes());
            bytes.extend_from_slice(&qs);
            let mut block = [0.0f32; 32];
            for j in 0..16 {
                block[j] = d.to_f32() * (qs[j] & 0x0F) as f32 + m.to_f32();
                block[j + 16] = d.to_f32() * (qs[j] >> 4) as f32 + m.to_f32();
            }
            values.extend_from_slice(&block);
        }
        (bytes, values)
    }

    #[test]
    fn matmul_matches_dequantised_product_within_activation_rounding() {
        let (rows, cols, m) = (37, 96, 5);
        let (bytes, weights) = random_matrix(rows, cols, 7);
        let matrix = Q4_1Matrix::from_bytes(&bytes, rows, cols).unwrap();
        let x: Vec<f32> = (0..m * cols)
            .map(|i| ((i * 7919) % 201) as f32 / 100.0 - 1.0)
            .collect();
        let out = matrix.matmul(&x, m);
        for i in 0..m {
            for r in 0..rows {
                let exact: f64 = (0..cols)
                    .map(|c| x[i * cols + c] as f64 * weights[r * cols + c] as f64)
                    .sum();
                // 8-bit activations: each term is off by at most d₈/2 · |w|.
                let bound: f64 = (0..cols)
                    .map(|c| {
                        let block =
                            &x[i * cols + c / BLOCK * BLOCK..i * cols + c / BLOCK * BLOCK + BLOCK];
                        let amax = block.iter().fold(0.0f32, |a, v| a.max(v.abs())) as f64;
                        amax / 127.0 / 2.0 * weights[r * cols + c].abs() as f64
                    })
                    .sum::<f64>()
                    + 1e-4;
                let got = out[i * rows + r] as f64;
                assert!(
                    (got - exact).abs() <= bound,
                    "({i},{r}): {got} vs {exact}, bound {bound}"
                );
            }
        }
    }

    /// Q8_0 bytes from candle's quantiser (an independent reader of the GGUF layout) and
    /// candle's de-quantised weights.
    fn candle_q8_0(rows: usize, cols: usize) -> (Vec<u8>, Vec<f32>) {
        use candle_core::quantized::{GgmlDType, QTensor};
        use candle_core::{Device, Tensor};
        let values: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 2654435761usize) % 1000) as f32 / 500.0 - 1.0)
            .collect();
        let tensor = Tensor::from_vec(values, (rows, cols), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&tensor, GgmlDType::Q8_0).unwrap();
        let dequantised = q.dequantize(&Device::Cpu).unwrap();
        let weights = dequantised.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        (q.data().unwrap().to_vec(), weights)
    }

    #[test]
    fn q8_0_matmul_matches_candles_dequantised_weights() {
        let (rows, cols, m) = (19, 128, 6);
        let (bytes, weights) = candle_q8_0(rows, cols);
        let matrix = Q8_0Matrix::from_bytes(&bytes, rows, cols).unwrap();
        let x: Vec<f32> = (0..m * cols).map(|i| (i as f32 * 0.61).cos()).collect();
        let out = matrix.matmul(&x, m);
        for i in 0..m {
            for r in 0..rows {
                let exact: f64 = (0..cols)
                    .map(|c| x[i * cols + c] as f64 * weights[r * cols + c] as f64)
                    .sum();
                // 8-bit activations: each term is off by at most d₈/2 · |w|.
                let bound: f64 = (0..cols)
                    .map(|c| {
                        let start = i * cols + c / BLOCK * BLOCK;
                        let amax = x[start..start + BLOCK]
                            .iter()
                            .fold(0.0f32, |a, v| a.max(v.abs()))
                            as f64;
                        amax / 127.0 / 2.0 * weights[r * cols + c].abs() as f64
                    })
                    .sum::<f64>()
                    + 1e-4;
                let got = out[i * rows + r] as f64;
                assert!((got - exact).abs() <= bound, "({i},{r}): {got} vs {exact}");
            }
        }
        assert!(Q8_0Matrix::from_bytes(&bytes[1..], rows, cols).is_none());
    }

    #[test]
    fn q8_0_simd_and_portable_kernels_agree() {
        let (rows, cols) = (8, 256);
        let (bytes, _) = candle_q8_0(rows, cols);
        let matrix = Q8_0Matrix::from_bytes(&bytes, rows, cols).unwrap();
        let x: Vec<f32> = (0..cols).map(|i| (i as f32 * 0.37).sin()).collect();
        let act = quantize_rows(&x, 1, cols);
        for r in 0..rows {
            let w = &matrix.blocks[r * cols / BLOCK..(r + 1) * cols / BLOCK];
            let portable = dot_q8_0_portable(w, &act);
            let detected = Q8Kernel::detect().dot(w, &act);
            assert!(
                (portable - detected).abs() <= 1e-5 * portable.abs().max(1.0),
                "{portable} vs {detected}"
            );
        }
    }

    #[test]
    fn simd_and_portable_kernels_agree() {
        let (rows, cols) = (8, 256);
        let (bytes, _) = random_matrix(rows, cols, 11);
        let matrix = Q4_1Matrix::from_bytes(&bytes, rows, cols).unwrap();
        let x: Vec<f32> = (0..cols).map(|i| (i as f32 * 0.37).sin()).collect();
        let act = quantize_rows(&x, 1, cols);
        for r in 0..rows {
            let w = &matrix.blocks[r * cols / BLOCK..(r + 1) * cols / BLOCK];
            let portable = dot_portable(w, &act);
            let detected = Kernel::detect().dot(w, &act);
            assert!(
                (portable - detected).abs() <= 1e-4 * portable.abs().max(1.0),
                "{portable} vs {detected}"
            );
            for four in Kernel::detect().dot4(w, [&act, &act, &act, &act]) {
                assert!(
                    (portable - four).abs() <= 1e-4 * portable.abs().max(1.0),
                    "{portable} vs {four}"
                );
            }
        }
    }

    #[test]
    fn rejects_wrong_sizes() {
        assert!(Q4_1Matrix::from_bytes(&[0; 20], 1, 31).is_none());
        assert!(Q4_1Matrix::from_bytes(&[0; 19], 1, 32).is_none());
    }
}
