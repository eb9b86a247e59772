//! Tests against a brute-force reference: scalar sequential dot products and a full sort.

use super::kernels::{self, dot_scalar, Isa};
use super::*;

/// SplitMix64: a tiny seeded generator, so the tests need no extra dependency (shared with
/// the `quantized` tests).
pub(crate) struct Rng(pub(crate) u64);

impl Rng {
    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [-1, 1).
    pub(crate) fn uniform(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    pub(crate) fn floats(&mut self, len: usize) -> Vec<f32> {
        (0..len).map(|_| self.uniform()).collect()
    }
    /// Approximately normal (sum of four uniforms), enough for direction noise.
    pub(crate) fn normal(&mut self) -> f32 {
        (0..4).map(|_| self.uniform()).sum::<f32>() * 0.866
    }
    /// Small integers in [-4, 4]: every dot product below 2^24 is exact in f32 whatever the
    /// summation order, so results must match the reference bit for bit, ties included.
    fn small_ints(&mut self, len: usize) -> Vec<f32> {
        (0..len)
            .map(|_| (self.next_u64() % 9) as f32 - 4.0)
            .collect()
    }
    fn live_bits(&mut self, n: usize, live_percent: u64) -> Vec<u64> {
        let mut bits = vec![0u64; n.div_ceil(64)];
        for row in 0..n {
            if self.next_u64() % 100 < live_percent {
                bits[row / 64] |= 1 << (row % 64);
            }
        }
        bits
    }
}

fn naive_dot(a: &[f32], b: &[f32]) -> f32 {
    let mut sum = 0.0f32;
    for (x, y) in a.iter().zip(b) {
        sum += x * y;
    }
    sum
}

/// Scores every live row, sorts all of them, keeps `k`.
fn reference(
    vectors: &[f32],
    dim: usize,
    queries: &[f32],
    k: usize,
    live: Option<&[u64]>,
) -> Vec<Vec<Hit>> {
    queries
        .chunks_exact(dim)
        .map(|q| {
            let mut hits: Vec<Hit> = vectors
                .chunks_exact(dim)
                .enumerate()
                .filter(|(row, _)| live.is_none_or(|bits| bits[row / 64] >> (row % 64) & 1 == 1))
                .map(|(row, v)| Hit {
                    row: row as u32,
                    score: naive_dot(q, v),
                })
                .collect();
            hits.sort_by(|a, b| {
                b.score
                    .partial_cmp(&a.score)
                    .unwrap()
                    .then(a.row.cmp(&b.row))
            });
            hits.truncate(k);
            hits
        })
        .collect()
}

/// `got` must be the reference top-k up to float rounding: same length, scores within `tol`
/// rank by rank, and the same rows except where the reference itself has a near-tie (another
/// candidate within `tol`), in which case the returned row's true score must still be within
/// `tol` of the reference score at that rank.
fn assert_matches(got: &[Hit], want: &[Hit], true_score: impl Fn(u32) -> f32, tol: f32, ctx: &str) {
    assert_eq!(got.len(), want.len(), "{ctx}: length");
    for window in got.windows(2) {
        assert!(
            window[0].score > window[1].score
                || (window[0].score == window[1].score && window[0].row < window[1].row),
            "{ctx}: not sorted: {window:?}"
        );
    }
    for (rank, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g.score - w.score).abs() <= tol,
            "{ctx}: rank {rank}: score {g:?} vs {w:?}"
        );
        assert!(
            (true_score(g.row) - g.score).abs() <= tol,
            "{ctx}: rank {rank}: wrong score for {g:?}"
        );
        if g.row != w.row {
            let near_tie = want
                .iter()
                .any(|o| o.row != w.row && (o.score - w.score).abs() <= tol)
                || (want.len() == rank + 1 && (g.score - w.score).abs() <= tol);
            assert!(near_tie, "{ctx}: rank {rank}: row {g:?} instead of {w:?}");
        }
    }
}

fn isas() -> Vec<Isa> {
    [Isa::Scalar, Isa::Avx2Fma, Isa::Avx512F]
        .into_iter()
        .filter(|&i| i <= Isa::detect())
        .collect()
}

#[test]
fn dot_matches_scalar_on_odd_lengths() {
    let mut rng = Rng(1);
    let lengths: Vec<usize> = (0..=70)
        .chain([127, 129, 383, 384, 385, 767, 768, 769, 1001])
        .collect();
    for isa in isas() {
        for &len in &lengths {
            let a = rng.floats(len);
            let b = rng.floats(len);
            let want = naive_dot(&a, &b);
            let got = kernels::dot_with(isa, &a, &b);
            assert!(
                (got - want).abs() <= 1e-4 * (1.0 + want.abs()),
                "{isa:?} len {len}: {got} vs {want}"
            );
            assert_eq!(
                dot_scalar(&a, &b).to_bits(),
                kernels::dot_with(Isa::Scalar, &a, &b).to_bits()
            );
        }
    }
    // The public entry point uses the active ISA.
    let a = rng.floats(385);
    let b = rng.floats(385);
    assert!((dot(&a, &b) - naive_dot(&a, &b)).abs() < 1e-4);
}

#[test]
#[should_panic(expected = "different lengths")]
fn dot_rejects_mismatched_lengths() {
    dot(&[1.0, 2.0], &[1.0]);
}

#[test]
fn score_rows_matches_scalar_for_every_tile_shape() {
    let mut rng = Rng(2);
    for isa in isas() {
        for dim in [1, 7, 8, 15, 16, 17, 33, 384] {
            for n_queries in 1..=9 {
                for n_rows in [0, 1, 3, 7, 8, 9, 17, 23] {
                    let queries = rng.floats(n_queries * dim);
                    let rows = rng.floats(n_rows * dim);
                    let mut out = vec![f32::NAN; n_queries * n_rows];
                    kernels::score_rows(isa, &queries, &rows, dim, &mut out);
                    for q in 0..n_queries {
                        for r in 0..n_rows {
                            let want =
                                naive_dot(&queries[q * dim..][..dim], &rows[r * dim..][..dim]);
                            let got = out[q * n_rows + r];
                            assert!(
                                (got - want).abs() <= 1e-4 * (1.0 + want.abs()),
                                "{isa:?} dim {dim} q {q}/{n_queries} r {r}/{n_rows}: {got} vs {want}"
                            );
                        }
                    }
                }
            }
        }
    }
}

/// Runs every strategy on the same data and compares each with the reference.
fn check_search(
    seed: u64,
    n: usize,
    dim: usize,
    n_queries: usize,
    k: usize,
    live_percent: Option<u64>,
) {
    let mut rng = Rng(seed);
    let vectors = rng.floats(n * dim);
    let queries = rng.floats(n_queries * dim);
    let live = live_percent.map(|p| rng.live_bits(n, p));
    let want = reference(&vectors, dim, &queries, k, live.as_deref());
    for strategy in [Strategy::Auto, Strategy::Streaming, Strategy::Gemm] {
        let got = search_with(&vectors, dim, &queries, k, live.as_deref(), strategy);
        assert_eq!(got.len(), n_queries);
        for (q, (g, w)) in got.iter().zip(&want).enumerate() {
            let query = &queries[q * dim..][..dim];
            let true_score = |row: u32| naive_dot(query, &vectors[row as usize * dim..][..dim]);
            let ctx = format!("{strategy:?} n {n} dim {dim} batch {n_queries} k {k} live {live_percent:?} query {q}");
            assert_matches(g, w, true_score, 1e-4, &ctx);
            if let Some(bits) = &live {
                assert!(
                    g.iter()
                        .all(|h| bits[h.row as usize / 64] >> (h.row % 64) & 1 == 1),
                    "{ctx}: dead row"
                );
            }
        }
    }
}

#[test]
fn search_matches_reference_batch_1() {
    // Row counts straddle SIMD widths, kernel tiles, streaming blocks and rayon tasks.
    for (i, &(n, dim)) in [(1, 1), (20_011, 1), (9_001, 7), (8_197, 384), (3_001, 768)]
        .iter()
        .enumerate()
    {
        for live in [None, Some(70)] {
            check_search(100 + i as u64, n, dim, 1, 10, live);
        }
    }
}

#[test]
fn search_matches_reference_batch_64() {
    for (i, &(n, dim)) in [(4_099, 1), (5_003, 7), (4_097, 384), (1_237, 768)]
        .iter()
        .enumerate()
    {
        for live in [None, Some(70)] {
            check_search(200 + i as u64, n, dim, 64, 10, live);
        }
    }
}

#[test]
fn search_matches_reference_odd_batches() {
    // 5 queries: one group of four plus a single query on the streaming path.
    check_search(300, 2_053, 384, 5, 10, None);
    check_search(301, 2_053, 7, 3, 10, Some(50));
    // More queries than one gemm pass takes at once.
    check_search(302, 1_000, 16, 300, 10, Some(90));
}

#[test]
fn k_larger_than_n_and_k_zero() {
    check_search(400, 7, 7, 3, 20, None);
    check_search(401, 37, 384, 9, 100, Some(60));
    let mut rng = Rng(402);
    let vectors = rng.floats(50 * 7);
    let queries = rng.floats(2 * 7);
    for strategy in [Strategy::Streaming, Strategy::Gemm] {
        let none = search_with(&vectors, 7, &queries, 0, None, strategy);
        assert_eq!(none, vec![Vec::<Hit>::new(); 2]);
    }
    // Empty corpus and empty batch.
    assert_eq!(
        search(&[], 7, &queries, 5, None),
        vec![Vec::<Hit>::new(); 2]
    );
    assert!(search(&vectors, 7, &[], 5, None).is_empty());
}

#[test]
fn all_rows_deleted_gives_empty_lists() {
    let mut rng = Rng(500);
    let vectors = rng.floats(300 * 7);
    let queries = rng.floats(10 * 7);
    let dead = vec![0u64; 5];
    for strategy in [Strategy::Streaming, Strategy::Gemm] {
        let hits = search_with(&vectors, 7, &queries, 10, Some(&dead), strategy);
        assert!(hits.iter().all(Vec::is_empty));
    }
}

#[test]
fn exact_ties_break_by_lower_row_on_every_path() {
    // Integer-valued data: scores are exact, so ties are real and frequent, and the result must
    // equal the reference exactly.
    let mut rng = Rng(600);
    for &(n, dim, n_queries) in &[(10_007, 3, 1), (10_007, 3, 64), (5_000, 17, 7)] {
        let vectors = rng.small_ints(n * dim);
        let queries = rng.small_ints(n_queries * dim);
        let live = rng.live_bits(n, 80);
        for live in [None, Some(live.as_slice())] {
            let want = reference(&vectors, dim, &queries, 25, live);
            for strategy in [Strategy::Auto, Strategy::Streaming, Strategy::Gemm] {
                let got = search_with(&vectors, dim, &queries, 25, live, strategy);
                assert_eq!(got, want, "{strategy:?} n {n} dim {dim} batch {n_queries}");
            }
        }
    }
}

#[test]
fn results_do_not_depend_on_thread_count() {
    let mut rng = Rng(700);
    let (n, dim) = (30_011, 33);
    let vectors = rng.floats(n * dim);
    let queries = rng.floats(16 * dim);
    let run = |threads: usize, strategy: Strategy| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| search_with(&vectors, dim, &queries, 10, None, strategy))
    };
    for strategy in [Strategy::Streaming, Strategy::Gemm] {
        let one = run(1, strategy);
        assert_eq!(one, run(2, strategy), "{strategy:?}");
        assert_eq!(one, run(3, strategy), "{strategy:?}");
    }
}

#[test]
fn nan_scores_are_never_returned() {
    let dim = 4;
    let mut vectors = vec![1.0f32; 10 * dim];
    vectors[3 * dim] = f32::NAN;
    let hits = search(&vectors, dim, &[1.0; 4], 20, None);
    assert_eq!(hits[0].len(), 9);
    assert!(hits[0].iter().all(|h| h.row != 3 && h.score == 4.0));
    // Ties everywhere: rows in increasing order.
    assert_eq!(
        hits[0].iter().map(|h| h.row).collect::<Vec<_>>(),
        vec![0, 1, 2, 4, 5, 6, 7, 8, 9]
    );
}

#[test]
#[should_panic(expected = "liveness bitset shorter")]
fn short_liveness_bitset_is_rejected() {
    search(&[0.0; 65], 1, &[1.0], 1, Some(&[u64::MAX]));
}

#[test]
fn merge_top_k_merges_sorted_lists() {
    let h = |row, score| Hit { row, score };
    let a = vec![h(1, 0.9), h(7, 0.5), h(3, 0.1)];
    let b = vec![h(2, 0.9), h(0, 0.5)];
    let c = vec![];
    let d = vec![h(9, 0.95)];
    let merged = merge_top_k([a.clone(), b.clone(), c, d], 4);
    assert_eq!(merged, vec![h(9, 0.95), h(1, 0.9), h(2, 0.9), h(0, 0.5)]);
    assert!(merge_top_k([a.clone(), b.clone()], 0).is_empty());
    assert_eq!(merge_top_k([a.clone(), b.clone()], 100).len(), 5);
    assert!(merge_top_k(Vec::<Vec<Hit>>::new(), 3).is_empty());

    // Agrees with searching the concatenation.
    let mut rng = Rng(800);
    let dim = 9;
    let vectors = rng.floats(3_000 * dim);
    let query = rng.floats(dim);
    let whole = search(&vectors, dim, &query, 15, None).remove(0);
    let parts = vectors
        .chunks(1_000 * dim)
        .enumerate()
        .map(|(part, slice)| {
            let mut hits = search(slice, dim, &query, 15, None).remove(0);
            hits.iter_mut()
                .for_each(|hit| hit.row += (part * 1_000) as u32);
            hits
        });
    assert_eq!(merge_top_k(parts, 15), whole);
}

// ------------------------------------------------------------------ int8 prefilter

/// The prefiltered search must return exactly what `search` returns.
fn check_prefiltered(
    vectors: &[f32],
    dim: usize,
    queries: &[f32],
    k: usize,
    live: Option<&[u64]>,
    ctx: &str,
) {
    let prefilter = Int8Prefilter::build(vectors, dim);
    assert_eq!(prefilter.rows(), vectors.len() / dim);
    let got = search_prefiltered(vectors, &prefilter, queries, k, live);
    let want = search(vectors, dim, queries, k, live);
    assert_eq!(got, want, "{ctx}");
}

#[test]
fn prefiltered_search_equals_search() {
    let mut rng = Rng(900);
    for &(n, dim) in &[
        (1, 1),
        (20_011, 1),
        (9_001, 7),
        (33_000, 16),
        (8_197, 384),
        (3_001, 768),
    ] {
        let vectors = rng.floats(n * dim);
        let live = rng.live_bits(n, 70);
        for n_queries in [1, 2, 3, 5] {
            let queries = rng.floats(n_queries * dim);
            for k in [0, 1, 10, n + 3] {
                for live in [None, Some(live.as_slice())] {
                    let ctx = format!(
                        "n {n} dim {dim} batch {n_queries} k {k} live {}",
                        live.is_some()
                    );
                    check_prefiltered(&vectors, dim, &queries, k, live, &ctx);
                }
            }
        }
    }
}

#[test]
fn prefiltered_search_matches_brute_force() {
    let mut rng = Rng(901);
    let (n, dim) = (12_345, 384);
    let vectors = rng.floats(n * dim);
    let query = rng.floats(dim);
    let live = rng.live_bits(n, 90);
    let prefilter = Int8Prefilter::build(&vectors, dim);
    for live in [None, Some(live.as_slice())] {
        let got = search_prefiltered(&vectors, &prefilter, &query, 10, live).remove(0);
        let want = reference(&vectors, dim, &query, 10, live).remove(0);
        let true_score = |row: u32| naive_dot(&query, &vectors[row as usize * dim..][..dim]);
        assert_matches(&got, &want, true_score, 1e-4, "prefiltered vs brute force");
    }
}

#[test]
fn prefiltered_search_handles_ties_duplicates_and_odd_values() {
    let mut rng = Rng(902);
    // Integer data: exact scores, many ties.
    let (n, dim) = (10_007, 5);
    let vectors = rng.small_ints(n * dim);
    let query = rng.small_ints(dim);
    check_prefiltered(&vectors, dim, &query, 25, None, "integer ties");
    let want = reference(&vectors, dim, &query, 25, None);
    let prefilter = Int8Prefilter::build(&vectors, dim);
    assert_eq!(
        search_prefiltered(&vectors, &prefilter, &query, 25, None),
        want
    );

    // Every row identical: every row is a candidate, ties resolve to the lowest rows.
    let row = rng.floats(64);
    let same: Vec<f32> = row.iter().copied().cycle().take(3_000 * 64).collect();
    check_prefiltered(&same, 64, &rng.floats(64), 7, None, "identical rows");

    // Zero query, zero rows, and rows with NaN or infinity.
    let mut odd = rng.floats(500 * 16);
    odd[16 * 3..16 * 4].fill(0.0);
    odd[16 * 10 + 2] = f32::NAN;
    odd[16 * 20 + 5] = f32::INFINITY;
    odd[16 * 30 + 7] = f32::NEG_INFINITY;
    check_prefiltered(&odd, 16, &[0.0; 16], 10, None, "zero query");
    check_prefiltered(&odd, 16, &rng.floats(16), 10, None, "non-finite rows");
    let mut big_query = rng.floats(16);
    big_query[0] = 1e30;
    check_prefiltered(&odd, 16, &big_query, 10, None, "huge query");
    big_query[0] = f32::INFINITY;
    check_prefiltered(&odd, 16, &big_query, 10, None, "infinite query");
}

#[test]
fn prefilter_bounds_hold() {
    // |f32 score − approximate score| ≤ ‖q‖·β for every row, including extreme magnitudes.
    let mut rng = Rng(903);
    for dim in [1, 7, 384, 768] {
        let mut vectors = rng.floats(200 * dim);
        for (i, v) in vectors.iter_mut().enumerate() {
            *v *= [1e-20f32, 1.0, 1e15][i / dim % 3];
        }
        let prefilter = Int8Prefilter::build(&vectors, dim);
        let query = rng.floats(dim);
        let query_norm = query
            .iter()
            .map(|&v| v as f64 * v as f64)
            .sum::<f64>()
            .sqrt();
        for (row, x) in vectors.chunks_exact(dim).enumerate() {
            let codes = &prefilter.codes()[row * dim..(row + 1) * dim];
            let approx: f64 = prefilter.scales()[row] as f64
                * codes
                    .iter()
                    .zip(&query)
                    .map(|(&c, &q)| c as f64 * q as f64)
                    .sum::<f64>();
            let exact = naive_dot(&query, x) as f64;
            let bound = query_norm * prefilter.bounds()[row] as f64;
            assert!(
                (exact - approx).abs() <= bound,
                "dim {dim} row {row}: {exact} vs {approx}, bound {bound}"
            );
        }
    }
}
