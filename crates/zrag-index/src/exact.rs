//! Exact maximum-inner-product search (MIPS): the top-k rows of a row-major `n × dim` matrix
//! by dot product with each query, computed exhaustively.
//!
//! Two execution paths, chosen by batch size and CPU ([`Strategy::Auto`], [`gemm_min_queries`]):
//!
//! - **Streaming SIMD kernels** ([`kernels`]). Scoring one query reads every vector once and
//!   does one multiply-add per float read, so batch 1 is bound by memory bandwidth: the kernel
//!   streams rows eight at a time with software prefetch. Groups of four queries share each row
//!   load in 4×4 register tiles (AVX-512) over 16-row sub-blocks kept in L1, so small and medium
//!   batches cost one memory pass per batch and run compute-bound near the FMA units' speed.
//! - **Blocked matrix multiply.** Each worker takes a block of corpus rows and computes `Q · Bᵀ`
//!   with `gemm` into a per-worker scratch buffer. The default `gemm` build has AVX2 kernels
//!   only, so it wins over the streaming kernels for large batches on AVX2 machines and is never
//!   chosen on AVX-512 ones (measured; see [`gemm_min_queries`]).
//!
//! Either way the scores of a block land in a scratch buffer and a bounded min-heap per query
//! keeps the top k: a vectorised threshold test skips whole chunks of scores that cannot enter,
//! so only rows that beat the current k-th score pay for the heap (and for the liveness check).
//!
//! Both paths split the corpus into row ranges that run on the current rayon pool (the caller
//! chooses its size); each worker keeps its own top-k per query and the partial results are
//! merged at the end. Results are exact and deterministic: higher score first, equal scores by
//! lower row index, regardless of thread count. A row's score can differ in the last bits between
//! the two paths (different summation order), so a query's result may differ in near-ties
//! depending on the batch it was sent in.
//!
//! Batch 1 cannot beat the memory bandwidth over `n × dim × 4` bytes. [`Int8Prefilter`] with
//! [`search_prefiltered`] returns exactly the same results while reading about a quarter of the
//! bytes: an int8 copy with rigorous per-row error bounds screens the rows, and the few that may
//! be in the top k are rescored in f32 (see [`prefilter`]).
//!
//! Deleted rows are excluded with an optional liveness bitset that is consulted only for rows
//! that would enter a top-k, so a mostly-live corpus pays nothing for it.

pub mod kernels;
pub mod prefilter;
pub mod quantized;
mod topk;

#[cfg(test)]
mod tests;

use rayon::prelude::*;

pub use kernels::{dot, dot_fn, Isa};
pub use prefilter::{search_prefiltered, Int8Prefilter};
use topk::TopK;

/// One search result: a row of the searched matrix and its inner product with the query.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Hit {
    pub row: u32,
    pub score: f32,
}

/// Which execution path [`search_with`] uses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Strategy {
    /// Streaming below [`gemm_min_queries`] queries, blocked matrix multiply from there on.
    #[default]
    Auto,
    /// SIMD streaming kernels for any batch size.
    Streaming,
    /// Blocked `gemm` for any batch size.
    Gemm,
}

/// Batch size from which [`Strategy::Auto`] uses the blocked matrix multiply on this CPU.
///
/// Measured on 1M × 384 f32 with 2 threads (see `bench/exact/RESULTS.md`): with AVX-512 the
/// streaming kernels' 4×4 register tiles beat `gemm` (whose default build has AVX2 kernels only)
/// at every batch size up to 512, so gemm is never chosen; with AVX2 the streaming kernels win
/// up to about 96 queries and gemm from 128 on. Without AVX2 (not measurable on this machine),
/// gemm takes over from 8 queries: its SSE kernels are register-tiled, the portable loops not.
pub fn gemm_min_queries(isa: Isa) -> usize {
    match isa {
        Isa::Avx512F => usize::MAX,
        Isa::Avx2Fma => 128,
        Isa::Scalar => 8,
    }
}

/// Queries scored per streaming pass over the corpus: bounds the per-worker scratch; past a few
/// queries the pass is compute-bound, so splitting a large batch into passes costs little.
const STREAM_QUERY_CHUNK: usize = 64;
/// Queries per gemm pass: bounds the per-thread scratch (`queries × rows` scores) while keeping
/// the matrix multiply wide enough to run near its peak.
const GEMM_QUERY_CHUNK: usize = 256;
/// Rows per rayon task on the streaming path: enough work (~0.5 ms at 384 dims) that scheduling
/// is negligible, small enough that two threads stay balanced.
const STREAM_TASK_ROWS: usize = 8192;
/// Bytes of corpus rows per streaming kernel call: small enough to stay in L2 while every group
/// of four queries re-reads it.
const STREAM_BLOCK_BYTES: usize = 192 * 1024;
/// Corpus rows per gemm call (one rayon task each).
const GEMM_BLOCK_ROWS: usize = 4096;

/// Exact top-`k` rows of `vectors` (row-major `n × dim`) by inner product with each query of
/// `queries` (row-major `m × dim`).
///
/// Returns `m` lists, each sorted by score descending (equal scores: lower row first), of
/// length `min(k, number of live rows)`. With `live` given, row `i` is searched only if bit
/// `i % 64` of `live[i / 64]` is set. Rows whose score is NaN or `-inf` are never returned.
/// Runs on the current rayon pool.
///
/// # Panics
/// If `dim` is 0, if `vectors` or `queries` is not a whole number of `dim`-float rows, if there
/// are more than 2³² rows, or if `live` has fewer than `n` bits.
pub fn search(
    vectors: &[f32],
    dim: usize,
    queries: &[f32],
    k: usize,
    live: Option<&[u64]>,
) -> Vec<Vec<Hit>> {
    search_with(vectors, dim, queries, k, live, Strategy::Auto)
}

/// [`search`] with an explicit execution path (for benchmarks and for measuring the crossover).
pub fn search_with(
    vectors: &[f32],
    dim: usize,
    queries: &[f32],
    k: usize,
    live: Option<&[u64]>,
    strategy: Strategy,
) -> Vec<Vec<Hit>> {
    assert!(dim > 0, "exact search: dim must be positive");
    assert_eq!(
        vectors.len() % dim,
        0,
        "exact search: vectors are not a whole number of rows"
    );
    assert_eq!(
        queries.len() % dim,
        0,
        "exact search: queries are not a whole number of rows"
    );
    let n_rows = vectors.len() / dim;
    let n_queries = queries.len() / dim;
    assert!(
        n_rows <= u32::MAX as usize + 1,
        "exact search: more than 2^32 rows"
    );
    if let Some(bits) = live {
        assert!(
            bits.len() >= n_rows.div_ceil(64),
            "exact search: liveness bitset shorter than the rows"
        );
    }
    if k == 0 || n_rows == 0 {
        return vec![Vec::new(); n_queries];
    }
    let k = k.min(n_rows);

    let use_gemm = match strategy {
        Strategy::Auto => n_queries >= gemm_min_queries(kernels::active_isa()),
        Strategy::Streaming => false,
        Strategy::Gemm => true,
    };
    let query_chunk = if use_gemm {
        GEMM_QUERY_CHUNK
    } else {
        STREAM_QUERY_CHUNK
    };
    let corpus = Corpus {
        vectors,
        dim,
        n_rows,
        live,
    };
    let mut results = Vec::with_capacity(n_queries);
    for chunk in queries.chunks(query_chunk * dim) {
        let per_query = if use_gemm {
            corpus.top_k(chunk, k, GEMM_BLOCK_ROWS, GEMM_BLOCK_ROWS, gemm_scores)
        } else {
            let isa = kernels::active_isa();
            let block_rows = (STREAM_BLOCK_BYTES / (dim * 4)).clamp(8, STREAM_TASK_ROWS);
            // The kernels re-read the queries for every row tile: unaligned 64-byte loads that
            // straddle cache lines cost about a quarter of the multi-query throughput.
            let aligned = AlignedFloats::copy_of(chunk);
            corpus.top_k(
                aligned.as_slice(),
                k,
                STREAM_TASK_ROWS,
                block_rows,
                |q, rows, d, out| kernels::score_rows(isa, q, rows, d, out),
            )
        };
        results.extend(per_query.into_iter().map(TopK::into_sorted));
    }
    results
}

/// Merges lists that are each already sorted best first (score descending, equal scores by lower
/// row) into the best `k` overall, in the same order. Rows are whatever ids the caller uses;
/// duplicates are kept.
pub fn merge_top_k(lists: impl IntoIterator<Item = Vec<Hit>>, k: usize) -> Vec<Hit> {
    topk::merge_sorted(lists, k)
}

/// A copy of some floats starting on a 64-byte boundary.
struct AlignedFloats {
    lines: Vec<CacheLine>,
    len: usize,
}

#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct CacheLine([f32; 16]);

impl AlignedFloats {
    fn copy_of(src: &[f32]) -> Self {
        let mut lines = vec![CacheLine([0.0; 16]); src.len().div_ceil(16)];
        for (line, chunk) in lines.iter_mut().zip(src.chunks(16)) {
            line.0[..chunk.len()].copy_from_slice(chunk);
        }
        AlignedFloats {
            lines,
            len: src.len(),
        }
    }

    fn as_slice(&self) -> &[f32] {
        // SAFETY: `CacheLine` is `repr(C)` around 16 f32s, so the lines are `16 * lines.len() >= len`
        // contiguous, initialised floats.
        unsafe { std::slice::from_raw_parts(self.lines.as_ptr().cast::<f32>(), self.len) }
    }
}

/// The searched matrix and its liveness filter.
struct Corpus<'a> {
    vectors: &'a [f32],
    dim: usize,
    n_rows: usize,
    live: Option<&'a [u64]>,
}

impl Corpus<'_> {
    /// Per-query top-k over all rows. Rows are split into tasks of `task_rows` that run in
    /// parallel; each task scores `block_rows` rows at a time with `score_block(queries, rows,
    /// dim, out)` (which fills `out[q * rows + r]`) into a per-worker scratch buffer.
    fn top_k(
        &self,
        queries: &[f32],
        k: usize,
        task_rows: usize,
        block_rows: usize,
        score_block: impl Fn(&[f32], &[f32], usize, &mut [f32]) + Sync,
    ) -> Vec<TopK> {
        let dim = self.dim;
        let n_queries = queries.len() / dim;
        let n_tasks = self.n_rows.div_ceil(task_rows);
        // One worker state per rayon fold split: it walks its tasks in increasing row order,
        // which the top-k threshold test relies on for tie-breaking.
        struct Worker {
            top: Vec<TopK>,
            scratch: Vec<f32>,
        }
        let new_worker = || Worker {
            top: vec![TopK::new(k); n_queries],
            scratch: Vec::new(),
        };
        (0..n_tasks)
            .into_par_iter()
            .fold(new_worker, |mut worker, task| {
                let task_end = ((task + 1) * task_rows).min(self.n_rows);
                let mut start = task * task_rows;
                while start < task_end {
                    let end = (start + block_rows).min(task_end);
                    let rows = &self.vectors[start * dim..end * dim];
                    let n_block = end - start;
                    worker.scratch.resize(n_queries * n_block, 0.0);
                    let scores = &mut worker.scratch[..n_queries * n_block];
                    score_block(queries, rows, dim, scores);
                    for (top, query_scores) in
                        worker.top.iter_mut().zip(scores.chunks_exact(n_block))
                    {
                        top.push_scores(query_scores, start, self.live);
                    }
                    start = end;
                }
                worker
            })
            .map(|worker| worker.top)
            .reduce_with(|mut a, b| {
                for (top_a, top_b) in a.iter_mut().zip(b) {
                    top_a.absorb(top_b);
                }
                a
            })
            .unwrap_or_else(|| vec![TopK::new(k); n_queries])
    }
}

/// `out[q * rows + r] = queries[q] · rows[r]` through `gemm` (single-threaded: the parallelism is
/// across corpus blocks, one per rayon task).
fn gemm_scores(queries: &[f32], rows: &[f32], dim: usize, out: &mut [f32]) {
    let n_queries = queries.len() / dim;
    let n_rows = rows.len() / dim;
    assert_eq!(out.len(), n_queries * n_rows);
    // dst (n_queries × n_rows, row-major) = lhs (queries, n_queries × dim, row-major)
    //                                     · rhs (rowsᵀ, dim × n_rows: element (i, j) = rows[j * dim + i]).
    // SAFETY: every pointer covers the extent implied by its dimensions and strides (checked
    // above and by the callers' slicing); `read_dst = false` means `out` is only written.
    unsafe {
        gemm::gemm(
            n_queries,
            n_rows,
            dim,
            out.as_mut_ptr(),
            1,
            n_rows as isize,
            false,
            queries.as_ptr(),
            1,
            dim as isize,
            rows.as_ptr(),
            dim as isize,
            1,
            0.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}
