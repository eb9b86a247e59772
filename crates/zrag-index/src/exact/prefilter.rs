//! Exact search that reads a quarter of the bytes: an int8 copy of the matrix with a per-row
//! error bound screens the rows, and only the few rows that might be in the top k are scored
//! in f32.
//!
//! Batch-1 exact search is bound by memory bandwidth: every query reads all `n × dim × 4` bytes.
//! [`Int8Prefilter`] keeps, per row, int8 codes `c` and a scale `s` (so `x ≈ s·c`), plus a bound
//! `β` such that, for every query `q`, the f32 score the exact kernels compute and the
//! approximate score `A = s·(q·c)` differ by at most `‖q‖·β`:
//!
//! `β = ‖x − s·c‖ + γ·(‖x‖ + ‖s·c‖)`, by Cauchy–Schwarz for the quantisation error, with
//! `γ = (2·dim + 64)·2⁻²⁴` covering the f32 rounding of both dot products, the scale multiply and
//! the bound arithmetic (each is at most about `dim·2⁻²⁴` relative to `‖q‖·‖x‖`; the factor two is
//! margin).
//!
//! One pass over the codes (`dim + 8` bytes per row instead of `4·dim`) keeps the k largest lower
//! bounds `A − ‖q‖β`; their minimum `τ` only grows. A row whose upper bound `A + ‖q‖β` is below
//! the running `τ` cannot be in the top k (k rows already score at least `τ`), so only rows at
//! or above it are kept as candidates, then filtered against the final `τ` and rescored with
//! the same f32 kernel as [`search`](super::search). The result is identical to `search`: same
//! rows, same scores, same tie order. On random unit vectors of 384 dims a query leaves a few
//! dozen candidates out of a million.

use rayon::prelude::*;

use super::kernels::{self, Isa};
use super::topk::TopK;
use super::{AlignedFloats, Hit};

/// Rows per rayon task while screening (about 12 MiB of codes at 384 dims).
const SCREEN_TASK_ROWS: usize = 32768;
/// Rows per screening kernel call: the approximate scores and bounds of a block stay in L1.
const SCREEN_BLOCK_ROWS: usize = 256;
/// Batches smaller than this run query by query through the prefilter; larger ones are
/// compute-bound and go to [`search`](super::search), whose multi-query kernels read each f32
/// row once per batch anyway.
pub const PREFILTER_MAX_BATCH: usize = 3;

/// An int8 copy of a row-major `n × dim` f32 matrix, with per-row scales and error bounds.
#[derive(Clone, Debug)]
pub struct Int8Prefilter {
    dim: usize,
    n_rows: usize,
    codes: Vec<CodeLine>,
    scales: Vec<f32>,
    bounds: Vec<f32>,
}

/// 64 bytes of codes on a cache-line boundary (rows of `dim` codes are stored back to back).
#[derive(Clone, Copy, Debug)]
#[repr(C, align(64))]
struct CodeLine([i8; 64]);

impl Int8Prefilter {
    /// Quantises `vectors` (row-major `n × dim`), in parallel on the current rayon pool.
    ///
    /// Each row gets its own scale (`max |x_j| / 127`), so a row's error is relative to its own
    /// magnitude. A row with a non-finite value gets an infinite bound and is always rescored.
    ///
    /// # Panics
    /// If `dim` is 0 or `vectors` is not a whole number of rows.
    pub fn build(vectors: &[f32], dim: usize) -> Self {
        assert!(dim > 0, "prefilter: dim must be positive");
        assert_eq!(
            vectors.len() % dim,
            0,
            "prefilter: vectors are not a whole number of rows"
        );
        let n_rows = vectors.len() / dim;
        let mut codes = vec![CodeLine([0; 64]); (n_rows * dim).div_ceil(64)];
        let mut scales = vec![0.0f32; n_rows];
        let mut bounds = vec![0.0f32; n_rows];
        let gamma = rounding_allowance(dim);
        // SAFETY: `CodeLine` is `repr(C)` around 64 i8s, so the lines are one contiguous run of
        // at least `n_rows * dim` initialised bytes, borrowed mutably only here.
        let flat_codes = unsafe {
            std::slice::from_raw_parts_mut(codes.as_mut_ptr().cast::<i8>(), n_rows * dim)
        };
        flat_codes
            .par_chunks_mut(dim)
            .zip(scales.par_iter_mut())
            .zip(bounds.par_iter_mut())
            .zip(vectors.par_chunks(dim))
            .for_each(|(((row_codes, scale), bound), row)| {
                (*scale, *bound) = quantize_row(row, row_codes, gamma);
            });
        Int8Prefilter {
            dim,
            n_rows,
            codes,
            scales,
            bounds,
        }
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    pub fn rows(&self) -> usize {
        self.n_rows
    }

    /// The codes, row-major `n × dim`.
    pub fn codes(&self) -> &[i8] {
        // SAFETY: see `build`: at least `n_rows * dim` contiguous initialised bytes.
        unsafe {
            std::slice::from_raw_parts(self.codes.as_ptr().cast::<i8>(), self.n_rows * self.dim)
        }
    }

    /// Per-row scales: row `i` is approximately `scales[i] * codes[i]`.
    pub fn scales(&self) -> &[f32] {
        &self.scales
    }

    /// Per-row error bounds `β` (see the module documentation).
    pub fn bounds(&self) -> &[f32] {
        &self.bounds
    }
}

/// `γ` of the module documentation.
fn rounding_allowance(dim: usize) -> f64 {
    (2 * dim + 64) as f64 * (-24f64).exp2()
}

/// Quantises one row into `codes`; returns its scale and error bound `β`.
fn quantize_row(row: &[f32], codes: &mut [i8], gamma: f64) -> (f32, f32) {
    if row.iter().any(|v| !v.is_finite()) {
        codes.fill(0);
        return (0.0, f32::INFINITY);
    }
    let max_abs = row.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let scale = max_abs / 127.0;
    let (mut err_sq, mut norm_sq, mut approx_norm_sq) = (0.0f64, 0.0f64, 0.0f64);
    for (code, &value) in codes.iter_mut().zip(row) {
        *code = if scale > 0.0 {
            // Round half away from zero by truncation (f32::round is a libm call on baseline
            // x86-64); the bound below is computed from whatever code results.
            ((value / scale + 0.5f32.copysign(value)) as i32).clamp(-127, 127) as i8
        } else {
            0
        };
        // The approximate kernel multiplies by the f32 scale, so the reconstruction is exactly
        // `scale * code` in real arithmetic; the error is measured against that.
        let approx = scale as f64 * *code as f64;
        err_sq += (value as f64 - approx).powi(2);
        norm_sq += (value as f64).powi(2);
        approx_norm_sq += approx * approx;
    }
    let beta = err_sq.sqrt() + gamma * (norm_sq.sqrt() + approx_norm_sq.sqrt());
    // Round the bound up: f64 → f32 conversion rounds to nearest, 1e-6 relative covers it.
    (scale, (beta * (1.0 + 1e-6)) as f32)
}

/// Exact top-`k` search like [`search`](super::search), screening the rows with `prefilter`
/// (built from the same `vectors`) so that a single query reads about a quarter of the bytes.
/// Returns exactly what `search` returns.
///
/// # Panics
/// As `search`, and if `prefilter` does not match `vectors` in shape.
pub fn search_prefiltered(
    vectors: &[f32],
    prefilter: &Int8Prefilter,
    queries: &[f32],
    k: usize,
    live: Option<&[u64]>,
) -> Vec<Vec<Hit>> {
    let dim = prefilter.dim;
    assert_eq!(
        vectors.len(),
        prefilter.n_rows * dim,
        "prefilter built from a different matrix"
    );
    assert_eq!(
        queries.len() % dim,
        0,
        "exact search: queries are not a whole number of rows"
    );
    if queries.len() / dim > PREFILTER_MAX_BATCH || k == 0 || prefilter.n_rows == 0 {
        return super::search(vectors, dim, queries, k, live);
    }
    if let Some(bits) = live {
        assert!(
            bits.len() >= prefilter.n_rows.div_ceil(64),
            "exact search: liveness bitset shorter than the rows"
        );
    }
    let k = k.min(prefilter.n_rows);
    let isa = kernels::active_isa();
    queries
        .chunks_exact(dim)
        .map(|query| {
            search_one(
                vectors,
                prefilter,
                &AlignedFloats::copy_of(query),
                k,
                live,
                isa,
            )
        })
        .collect()
}

/// A row that may be in the top k: its index and upper bound.
#[derive(Clone, Copy)]
struct Candidate {
    row: u32,
    upper: f32,
}

fn search_one(
    vectors: &[f32],
    prefilter: &Int8Prefilter,
    query: &AlignedFloats,
    k: usize,
    live: Option<&[u64]>,
    isa: Isa,
) -> Vec<Hit> {
    let dim = prefilter.dim;
    let query = query.as_slice();
    let query_norm = query
        .iter()
        .map(|&v| v as f64 * v as f64)
        .sum::<f64>()
        .sqrt();
    // Rounded up, like the bounds.
    let query_norm = (query_norm * (1.0 + 1e-6)) as f32;
    let codes = prefilter.codes();
    let n_tasks = prefilter.n_rows.div_ceil(SCREEN_TASK_ROWS);

    // Screening: each worker keeps the top-k lower bounds (their minimum is its τ) and the rows
    // whose upper bound reached its τ at the time they were seen.
    struct Screen {
        lower: TopK,
        candidates: Vec<Candidate>,
        approx: Vec<f32>,
    }
    let screened = (0..n_tasks)
        .into_par_iter()
        .fold(
            || Screen {
                lower: TopK::new(k),
                candidates: Vec::new(),
                approx: vec![0.0; SCREEN_BLOCK_ROWS],
            },
            |mut screen, task| {
                let task_end = ((task + 1) * SCREEN_TASK_ROWS).min(prefilter.n_rows);
                let mut start = task * SCREEN_TASK_ROWS;
                while start < task_end {
                    let end = (start + SCREEN_BLOCK_ROWS).min(task_end);
                    let approx = &mut screen.approx[..end - start];
                    approx_scores(
                        isa,
                        query,
                        &codes[start * dim..end * dim],
                        &prefilter.scales[start..end],
                        dim,
                        approx,
                    );
                    screen_block(
                        &mut screen.lower,
                        &mut screen.candidates,
                        approx,
                        &prefilter.bounds[start..end],
                        query_norm,
                        start,
                        live,
                    );
                    start = end;
                }
                screen
            },
        )
        .reduce_with(|mut a, b| {
            a.lower.absorb(b.lower);
            a.candidates.extend(b.candidates);
            a
        });
    let Some(Screen {
        lower,
        mut candidates,
        ..
    }) = screened
    else {
        return Vec::new();
    };
    let tau = lower.threshold();
    candidates.retain(|c| c.upper >= tau);
    candidates.sort_unstable_by_key(|c| c.row);

    // Rescoring in f32 with the streaming kernel (bit-identical to `search`), in row order so the
    // top-k's tie-breaking holds.
    candidates
        .par_chunks(1024)
        .fold(
            || TopK::new(k),
            |mut top, chunk| {
                let mut score = [0.0f32];
                for c in chunk {
                    let row = c.row as usize;
                    kernels::score_rows(
                        isa,
                        query,
                        &vectors[row * dim..(row + 1) * dim],
                        dim,
                        &mut score,
                    );
                    top.push_scores(&score, row, None);
                }
                top
            },
        )
        .reduce_with(|mut a, b| {
            a.absorb(b);
            a
        })
        .map(TopK::into_sorted)
        .unwrap_or_default()
}

/// Keeps the candidates of one block: rows whose upper bound reaches the current τ.
#[inline]
fn screen_block(
    lower: &mut TopK,
    candidates: &mut Vec<Candidate>,
    approx: &[f32],
    bounds: &[f32],
    query_norm: f32,
    first_row: usize,
    live: Option<&[u64]>,
) {
    const CHUNK: usize = 16;
    // A NaN bound (a row or query with non-finite values) counts as +inf: such rows are always
    // rescored, and the exact kernel decides what they score.
    let upper_bound = |a: f32, b: f32| {
        let upper = a + query_norm * b;
        if upper.is_nan() {
            f32::INFINITY
        } else {
            upper
        }
    };
    let mut offset = 0;
    for (approx_chunk, bound_chunk) in approx.chunks(CHUNK).zip(bounds.chunks(CHUNK)) {
        // Vectorised test of the whole chunk first: almost every chunk is entirely below τ.
        let max_upper = approx_chunk
            .iter()
            .zip(bound_chunk)
            .map(|(&a, &b)| upper_bound(a, b))
            .fold(f32::NEG_INFINITY, |m, u| if u > m { u } else { m });
        if max_upper >= lower.threshold() {
            for (i, (&a, &b)) in approx_chunk.iter().zip(bound_chunk).enumerate() {
                let upper = upper_bound(a, b);
                if upper < lower.threshold() {
                    continue;
                }
                let row = first_row + offset + i;
                if let Some(bits) = live {
                    if (bits[row >> 6] >> (row & 63)) & 1 == 0 {
                        continue;
                    }
                }
                let lower_bound = a - query_norm * b;
                let lower_bound = if lower_bound.is_nan() {
                    f32::NEG_INFINITY
                } else {
                    lower_bound
                };
                candidates.push(Candidate {
                    row: row as u32,
                    upper,
                });
                lower.offer(Hit {
                    row: row as u32,
                    score: lower_bound,
                });
            }
        }
        offset += approx_chunk.len();
    }
}

/// `out[r] = scales[r] * (query · codes[r])`.
fn approx_scores(
    isa: Isa,
    query: &[f32],
    codes: &[i8],
    scales: &[f32],
    dim: usize,
    out: &mut [f32],
) {
    debug_assert_eq!(codes.len(), out.len() * dim);
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `active_isa` only reports levels the CPU supports; shapes checked by callers.
        Isa::Avx512F => unsafe { x86::approx_scores_avx512(query, codes, scales, dim, out) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Isa::Avx2Fma => unsafe { x86::approx_scores_avx2(query, codes, scales, dim, out) },
        _ => {
            for ((row, &scale), slot) in codes.chunks_exact(dim).zip(scales).zip(out) {
                *slot = scale
                    * row
                        .iter()
                        .zip(query)
                        .map(|(&c, &q)| c as f32 * q)
                        .sum::<f32>();
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    //! int8 → f32 widening dot products. Eight rows in flight hide the FMA latency; widening
    //! costs two extra instructions per vector of codes, which keeps the kernel below the memory
    //! time. Accumulator counts are const generics so the accumulators stay in registers.

    use std::arch::x86_64::*;

    /// Rows per tile.
    const ROWS: usize = 8;
    /// Software prefetch distance in tiles (2 tiles = 6 KiB of codes at 384 dims). Each step
    /// reads 16 bytes from each of 8 rows, so every load touches a different line, and measured
    /// without prefetch the kernel stalled on those loads at about 60% of the memory bandwidth.
    const PREFETCH_TILES: usize = 2;

    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn tile_avx512<const R: usize>(
        query: &[f32],
        codes: [*const i8; R],
        dim: usize,
    ) -> [f32; R] {
        let q = query.as_ptr();
        let vector_end = dim / 16 * 16;
        let mut acc = [_mm512_setzero_ps(); R];
        let mut i = 0;
        while i < vector_end {
            if i % 64 == 0 {
                for row in codes {
                    _mm_prefetch::<_MM_HINT_T0>(row.wrapping_add(i + PREFETCH_TILES * ROWS * dim));
                }
            }
            let qv = _mm512_loadu_ps(q.add(i));
            for r in 0..R {
                let packed = _mm_loadu_si128(codes[r].add(i).cast());
                let widened = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(packed));
                acc[r] = _mm512_fmadd_ps(widened, qv, acc[r]);
            }
            i += 16;
        }
        let mut sums = [0.0f32; R];
        for r in 0..R {
            let mut tail = 0.0f32;
            for (j, &q) in query.iter().enumerate().skip(vector_end) {
                tail += *codes[r].add(j) as f32 * q;
            }
            sums[r] = _mm512_reduce_add_ps(acc[r]) + tail;
        }
        sums
    }

    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn approx_scores_avx512(
        query: &[f32],
        codes: &[i8],
        scales: &[f32],
        dim: usize,
        out: &mut [f32],
    ) {
        let n_rows = out.len();
        let row = |r: usize| codes.as_ptr().add(r * dim);
        let mut r0 = 0;
        while r0 + ROWS <= n_rows {
            let sums = tile_avx512::<ROWS>(query, std::array::from_fn(|j| row(r0 + j)), dim);
            for (j, sum) in sums.into_iter().enumerate() {
                out[r0 + j] = scales[r0 + j] * sum;
            }
            r0 += ROWS;
        }
        for r in r0..n_rows {
            let [sum] = tile_avx512::<1>(query, [row(r)], dim);
            out[r] = scales[r] * sum;
        }
    }

    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn tile_avx2<const R: usize>(
        query: &[f32],
        codes: [*const i8; R],
        dim: usize,
    ) -> [f32; R] {
        let q = query.as_ptr();
        let vector_end = dim / 8 * 8;
        let mut acc = [_mm256_setzero_ps(); R];
        let mut i = 0;
        while i < vector_end {
            if i % 64 == 0 {
                for row in codes {
                    _mm_prefetch::<_MM_HINT_T0>(row.wrapping_add(i + PREFETCH_TILES * ROWS * dim));
                }
            }
            let qv = _mm256_loadu_ps(q.add(i));
            for r in 0..R {
                let packed = _mm_loadl_epi64(codes[r].add(i).cast());
                let widened = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(packed));
                acc[r] = _mm256_fmadd_ps(widened, qv, acc[r]);
            }
            i += 8;
        }
        let mut sums = [0.0f32; R];
        for r in 0..R {
            let mut tail = 0.0f32;
            for (j, &q) in query.iter().enumerate().skip(vector_end) {
                tail += *codes[r].add(j) as f32 * q;
            }
            let v = acc[r];
            let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 0b01));
            sums[r] = _mm_cvtss_f32(s) + tail;
        }
        sums
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn approx_scores_avx2(
        query: &[f32],
        codes: &[i8],
        scales: &[f32],
        dim: usize,
        out: &mut [f32],
    ) {
        let n_rows = out.len();
        let row = |r: usize| codes.as_ptr().add(r * dim);
        let mut r0 = 0;
        while r0 + ROWS <= n_rows {
            let sums = tile_avx2::<ROWS>(query, std::array::from_fn(|j| row(r0 + j)), dim);
            for (j, sum) in sums.into_iter().enumerate() {
                out[r0 + j] = scales[r0 + j] * sum;
            }
            r0 += ROWS;
        }
        for r in r0..n_rows {
            let [sum] = tile_avx2::<1>(query, [row(r)], dim);
            out[r] = scales[r] * sum;
        }
    }
}
