//! SIMD inner-product kernels with runtime CPU-feature dispatch.
//!
//! Two shapes of work:
//! - [`dot`]: one pair of vectors, for callers that score a handful of pairs.
//! - [`score_rows`]: a small group of queries against a block of contiguous rows (row-major,
//!   `dim` floats each), writing one score per (query, row). This is the batch-1 hot loop: each
//!   row is loaded from memory once and multiplied against every query of the group while it
//!   sits in registers, so a small batch costs about as much memory traffic as a single query.
//!
//! Every kernel keeps several independent accumulators: a single FMA chain would be limited by
//! the FMA latency (4 cycles) rather than by memory bandwidth.
//!
//! The instruction set is chosen once per process ([`active_isa`]): AVX-512F, else AVX2+FMA,
//! else portable scalar code. `ZRAG_EXACT_ISA=scalar|avx2|avx512` may force a lower level (for
//! benchmarks and tests); it can never select an instruction set the CPU lacks.

use std::sync::OnceLock;

/// An instruction-set level the kernels can run at.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Isa {
    /// Portable code (the compiler may still auto-vectorise it with the baseline SSE2).
    Scalar,
    /// 256-bit AVX2 with fused multiply-add.
    Avx2Fma,
    /// 512-bit AVX-512 Foundation.
    Avx512F,
}

impl Isa {
    /// The best level this CPU supports, ignoring any override.
    pub fn detect() -> Isa {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                return Isa::Avx512F;
            }
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                return Isa::Avx2Fma;
            }
        }
        Isa::Scalar
    }

    /// Parses the names accepted by `ZRAG_EXACT_ISA`.
    pub fn from_name(name: &str) -> Option<Isa> {
        match name.trim().to_ascii_lowercase().as_str() {
            "scalar" => Some(Isa::Scalar),
            "avx2" | "avx2fma" => Some(Isa::Avx2Fma),
            "avx512" | "avx512f" => Some(Isa::Avx512F),
            _ => None,
        }
    }
}

/// The instruction set all kernels use in this process: the detected one, lowered by
/// `ZRAG_EXACT_ISA` if that names a lower level. Resolved once.
pub fn active_isa() -> Isa {
    static ACTIVE: OnceLock<Isa> = OnceLock::new();
    *ACTIVE.get_or_init(|| {
        let detected = Isa::detect();
        match std::env::var("ZRAG_EXACT_ISA")
            .ok()
            .as_deref()
            .and_then(Isa::from_name)
        {
            Some(requested) => requested.min(detected),
            None => detected,
        }
    })
}

/// Inner product of two equal-length vectors.
///
/// # Panics
/// If the lengths differ.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    dot_with(active_isa(), a, b)
}

/// [`dot`] at a given instruction-set level (which must be supported by this CPU; levels above
/// [`Isa::detect`] fall back to the detected one).
pub fn dot_with(isa: Isa, a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "dot: vectors of different lengths");
    match isa.min(Isa::detect()) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU supports AVX-512F (checked by `detect`), and both slices have equal length.
        Isa::Avx512F => unsafe { x86::dot_avx512(a, b) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU supports AVX2 and FMA, and both slices have equal length.
        Isa::Avx2Fma => unsafe { x86::dot_avx2(a, b) },
        _ => dot_scalar(a, b),
    }
}

/// The dot product for this process's instruction set, resolved once, as a plain function
/// pointer: for callers in a tight loop (HNSW) that cannot afford a dispatch per call.
pub fn dot_fn() -> fn(&[f32], &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    fn avx512(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len(), "dot: vectors of different lengths");
        // SAFETY: only returned when `active_isa` (which never exceeds `Isa::detect`) says
        // AVX-512F is present; the lengths are equal.
        unsafe { x86::dot_avx512(a, b) }
    }
    #[cfg(target_arch = "x86_64")]
    fn avx2(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len(), "dot: vectors of different lengths");
        // SAFETY: only returned when AVX2 and FMA are present; the lengths are equal.
        unsafe { x86::dot_avx2(a, b) }
    }
    match active_isa() {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512F => avx512,
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2Fma => avx2,
        _ => dot_scalar,
    }
}

/// Portable dot product with eight independent partial sums (so the compiler can keep them in
/// vector lanes, and so a single long dependency chain does not bound the speed).
pub fn dot_scalar(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "dot: vectors of different lengths");
    const LANES: usize = 8;
    let mut partial = [0.0f32; LANES];
    let mut a_chunks = a.chunks_exact(LANES);
    let mut b_chunks = b.chunks_exact(LANES);
    for (ca, cb) in (&mut a_chunks).zip(&mut b_chunks) {
        for lane in 0..LANES {
            partial[lane] += ca[lane] * cb[lane];
        }
    }
    let mut tail = 0.0f32;
    for (x, y) in a_chunks.remainder().iter().zip(b_chunks.remainder()) {
        tail += x * y;
    }
    partial.iter().sum::<f32>() + tail
}

/// Scores every query of a small group against every row of a block.
///
/// `queries` is `g × dim`, `rows` is `n × dim`, both row-major; `out` must hold `g × n` floats and
/// receives `out[q * n + r] = queries[q] · rows[r]`.
///
/// # Panics
/// If the slice lengths do not match that shape.
pub fn score_rows(isa: Isa, queries: &[f32], rows: &[f32], dim: usize, out: &mut [f32]) {
    assert!(dim > 0, "score_rows: dim must be positive");
    assert_eq!(
        queries.len() % dim,
        0,
        "score_rows: queries not a multiple of dim"
    );
    assert_eq!(
        rows.len() % dim,
        0,
        "score_rows: rows not a multiple of dim"
    );
    let n_queries = queries.len() / dim;
    let n_rows = rows.len() / dim;
    assert_eq!(
        out.len(),
        n_queries * n_rows,
        "score_rows: output has the wrong length"
    );
    match isa.min(Isa::detect()) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: AVX-512F is available and the shapes were checked above.
        Isa::Avx512F => unsafe { x86::score_rows_avx512(queries, rows, dim, out) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: AVX2 and FMA are available and the shapes were checked above.
        Isa::Avx2Fma => unsafe { x86::score_rows_avx2(queries, rows, dim, out) },
        _ => score_rows_scalar(queries, rows, dim, out),
    }
}

fn score_rows_scalar(queries: &[f32], rows: &[f32], dim: usize, out: &mut [f32]) {
    let n_rows = rows.len() / dim;
    // Row-outer order: each row is fetched from memory once for the whole query group.
    for (r, row) in rows.chunks_exact(dim).enumerate() {
        for (q, query) in queries.chunks_exact(dim).enumerate() {
            out[q * n_rows + r] = dot_scalar(query, row);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    //! The AVX2 and AVX-512 kernels. Shapes (`ROWS × QUERIES` accumulators) are const generics so
    //! that the accumulator arrays are fully unrolled into registers: AVX-512 has 32 vector
    //! registers, AVX2 only 16, hence the smaller AVX2 tiles.

    use std::arch::x86_64::*;

    // ---------------------------------------------------------------- AVX-512

    /// Four accumulators over 64 floats per step, then 16-float steps, then one masked tail.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn dot_avx512(a: &[f32], b: &[f32]) -> f32 {
        let len = a.len();
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        let mut acc = [_mm512_setzero_ps(); 4];
        let mut i = 0;
        while i + 64 <= len {
            for (j, slot) in acc.iter_mut().enumerate() {
                let x = _mm512_loadu_ps(pa.add(i + 16 * j));
                let y = _mm512_loadu_ps(pb.add(i + 16 * j));
                *slot = _mm512_fmadd_ps(x, y, *slot);
            }
            i += 64;
        }
        while i + 16 <= len {
            let x = _mm512_loadu_ps(pa.add(i));
            let y = _mm512_loadu_ps(pb.add(i));
            acc[0] = _mm512_fmadd_ps(x, y, acc[0]);
            i += 16;
        }
        if i < len {
            let mask = tail_mask_512(len - i);
            let x = _mm512_maskz_loadu_ps(mask, pa.add(i));
            let y = _mm512_maskz_loadu_ps(mask, pb.add(i));
            acc[1] = _mm512_fmadd_ps(x, y, acc[1]);
        }
        let sum = _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));
        _mm512_reduce_add_ps(sum)
    }

    #[inline(always)]
    fn tail_mask_512(remaining: usize) -> __mmask16 {
        debug_assert!(remaining > 0 && remaining < 16);
        ((1u32 << remaining) - 1) as __mmask16
    }

    /// `ROWS` rows against `QUERIES` queries: `ROWS × QUERIES` independent FMA chains, each row
    /// vector loaded once and reused for every query.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn tile_avx512<const ROWS: usize, const QUERIES: usize>(
        query_ptrs: [*const f32; QUERIES],
        row_ptrs: [*const f32; ROWS],
        dim: usize,
        prefetch_ahead: usize,
    ) -> [[f32; QUERIES]; ROWS] {
        let mut acc = [[_mm512_setzero_ps(); QUERIES]; ROWS];
        let mut i = 0;
        while i + 16 <= dim {
            if prefetch_ahead > 0 {
                for row in row_ptrs {
                    _mm_prefetch::<_MM_HINT_T0>(row.wrapping_add(i + prefetch_ahead) as *const i8);
                }
            }
            let mut qv = [_mm512_setzero_ps(); QUERIES];
            for q in 0..QUERIES {
                qv[q] = _mm512_loadu_ps(query_ptrs[q].add(i));
            }
            for r in 0..ROWS {
                let x = _mm512_loadu_ps(row_ptrs[r].add(i));
                for q in 0..QUERIES {
                    acc[r][q] = _mm512_fmadd_ps(x, qv[q], acc[r][q]);
                }
            }
            i += 16;
        }
        if i < dim {
            let mask = tail_mask_512(dim - i);
            let mut qv = [_mm512_setzero_ps(); QUERIES];
            for q in 0..QUERIES {
                qv[q] = _mm512_maskz_loadu_ps(mask, query_ptrs[q].add(i));
            }
            for r in 0..ROWS {
                let x = _mm512_maskz_loadu_ps(mask, row_ptrs[r].add(i));
                for q in 0..QUERIES {
                    acc[r][q] = _mm512_fmadd_ps(x, qv[q], acc[r][q]);
                }
            }
        }
        let mut sums = [[0.0f32; QUERIES]; ROWS];
        for r in 0..ROWS {
            for q in 0..QUERIES {
                sums[r][q] = _mm512_reduce_add_ps(acc[r][q]);
            }
        }
        sums
    }

    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn score_rows_avx512(
        queries: &[f32],
        rows: &[f32],
        dim: usize,
        out: &mut [f32],
    ) {
        // One query: 8 rows in flight (8 chains hide the FMA latency and keep 8 cache-line
        // streams open). Groups of 4 queries: 4×4 tiles (16 accumulators + 4 query registers;
        // larger tiles spill or wait on loads and measured slower).
        let ahead = prefetch_distance(dim, 8);
        score_rows_tiled::<8, 4>(
            queries,
            rows,
            dim,
            out,
            |q, r| tile_avx512::<8, 1>(q, r, dim, ahead),
            |q, r| tile_avx512::<4, 4>(q, r, dim, 0),
            |q, r| tile_avx512::<1, 1>(q, r, dim, 0),
            |q, r| tile_avx512::<1, 4>(q, r, dim, 0),
        )
    }

    // ---------------------------------------------------------------- AVX2

    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn hsum256(v: __m256) -> f32 {
        let lo = _mm256_castps256_ps128(v);
        let hi = _mm256_extractf128_ps(v, 1);
        let s = _mm_add_ps(lo, hi);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 0b01));
        _mm_cvtss_f32(s)
    }

    /// Lane mask for `_mm256_maskload_ps`: the first `remaining` lanes set.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn tail_mask_256(remaining: usize) -> __m256i {
        debug_assert!(remaining > 0 && remaining < 8);
        let lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        _mm256_cmpgt_epi32(_mm256_set1_epi32(remaining as i32), lanes)
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
        let len = a.len();
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut i = 0;
        while i + 32 <= len {
            for (j, slot) in acc.iter_mut().enumerate() {
                let x = _mm256_loadu_ps(pa.add(i + 8 * j));
                let y = _mm256_loadu_ps(pb.add(i + 8 * j));
                *slot = _mm256_fmadd_ps(x, y, *slot);
            }
            i += 32;
        }
        while i + 8 <= len {
            let x = _mm256_loadu_ps(pa.add(i));
            let y = _mm256_loadu_ps(pb.add(i));
            acc[0] = _mm256_fmadd_ps(x, y, acc[0]);
            i += 8;
        }
        if i < len {
            let mask = tail_mask_256(len - i);
            let x = _mm256_maskload_ps(pa.add(i), mask);
            let y = _mm256_maskload_ps(pb.add(i), mask);
            acc[1] = _mm256_fmadd_ps(x, y, acc[1]);
        }
        let sum = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
        hsum256(sum)
    }

    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn tile_avx2<const ROWS: usize, const QUERIES: usize>(
        query_ptrs: [*const f32; QUERIES],
        row_ptrs: [*const f32; ROWS],
        dim: usize,
        prefetch_ahead: usize,
    ) -> [[f32; QUERIES]; ROWS] {
        let mut acc = [[_mm256_setzero_ps(); QUERIES]; ROWS];
        let mut i = 0;
        while i + 8 <= dim {
            // One prefetch per 64-byte line, i.e. every other 8-float step.
            if prefetch_ahead > 0 && i % 16 == 0 {
                for row in row_ptrs {
                    _mm_prefetch::<_MM_HINT_T0>(row.wrapping_add(i + prefetch_ahead) as *const i8);
                }
            }
            let mut qv = [_mm256_setzero_ps(); QUERIES];
            for q in 0..QUERIES {
                qv[q] = _mm256_loadu_ps(query_ptrs[q].add(i));
            }
            for r in 0..ROWS {
                let x = _mm256_loadu_ps(row_ptrs[r].add(i));
                for q in 0..QUERIES {
                    acc[r][q] = _mm256_fmadd_ps(x, qv[q], acc[r][q]);
                }
            }
            i += 8;
        }
        if i < dim {
            let mask = tail_mask_256(dim - i);
            let mut qv = [_mm256_setzero_ps(); QUERIES];
            for q in 0..QUERIES {
                qv[q] = _mm256_maskload_ps(query_ptrs[q].add(i), mask);
            }
            for r in 0..ROWS {
                let x = _mm256_maskload_ps(row_ptrs[r].add(i), mask);
                for q in 0..QUERIES {
                    acc[r][q] = _mm256_fmadd_ps(x, qv[q], acc[r][q]);
                }
            }
        }
        let mut sums = [[0.0f32; QUERIES]; ROWS];
        for r in 0..ROWS {
            for q in 0..QUERIES {
                sums[r][q] = hsum256(acc[r][q]);
            }
        }
        sums
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn score_rows_avx2(
        queries: &[f32],
        rows: &[f32],
        dim: usize,
        out: &mut [f32],
    ) {
        // 16 ymm registers: 8 rows × 1 query, or 2 rows × 4 queries (8 accumulators + 4 queries).
        let ahead = prefetch_distance(dim, 8);
        score_rows_tiled::<8, 2>(
            queries,
            rows,
            dim,
            out,
            |q, r| tile_avx2::<8, 1>(q, r, dim, ahead),
            |q, r| tile_avx2::<2, 4>(q, r, dim, 0),
            |q, r| tile_avx2::<1, 1>(q, r, dim, 0),
            |q, r| tile_avx2::<1, 4>(q, r, dim, 0),
        )
    }

    /// How far ahead (in floats) the single-query tile prefetches: the same offset in the next
    /// tile of `tile_rows` rows, i.e. one tile (12 KiB at 384 dims) ahead of the loads. The
    /// hardware streamers stop at 4 KiB page boundaries; the software prefetch keeps the memory
    /// pipeline full across them. Rows shorter than a cache line are left to the hardware.
    fn prefetch_distance(dim: usize, tile_rows: usize) -> usize {
        if dim >= 16 {
            dim * tile_rows
        } else {
            0
        }
    }

    // ---------------------------------------------------------------- tiling driver

    /// Rows per sub-block on the multi-query path: the sub-block (24 KiB at 384 dims) stays in
    /// L1 while every group of four queries passes over it, so each row is fetched from L2 once
    /// per sub-block rather than once per query group.
    const SUB_BLOCK_ROWS: usize = 16;

    /// Walks the (query group × row) space with the given tiles: groups of four queries use the
    /// `R4 × 4` tile, single queries the `R1 × 1` tile, and leftover rows the one-row tiles.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn score_rows_tiled<const R1: usize, const R4: usize>(
        queries: &[f32],
        rows: &[f32],
        dim: usize,
        out: &mut [f32],
        tile_1q: impl Fn([*const f32; 1], [*const f32; R1]) -> [[f32; 1]; R1],
        tile_4q: impl Fn([*const f32; 4], [*const f32; R4]) -> [[f32; 4]; R4],
        row_1q: impl Fn([*const f32; 1], [*const f32; 1]) -> [[f32; 1]; 1],
        row_4q: impl Fn([*const f32; 4], [*const f32; 1]) -> [[f32; 4]; 1],
    ) {
        let n_queries = queries.len() / dim;
        let n_rows = rows.len() / dim;
        let n_grouped = n_queries / 4 * 4;
        let qp = queries.as_ptr();
        let rp = rows.as_ptr();
        let op = out.as_mut_ptr();
        let row_ptr = |r: usize| rp.add(r * dim);

        // Groups of four queries: each row load feeds four dot products.
        let mut sub_start = 0;
        while n_grouped > 0 && sub_start < n_rows {
            let sub_end = (sub_start + SUB_BLOCK_ROWS).min(n_rows);
            for q0 in (0..n_grouped).step_by(4) {
                let group: [*const f32; 4] = std::array::from_fn(|j| qp.add((q0 + j) * dim));
                let mut r0 = sub_start;
                while r0 + R4 <= sub_end {
                    let tile = tile_4q(group, std::array::from_fn(|j| row_ptr(r0 + j)));
                    for (j, row_scores) in tile.iter().enumerate() {
                        for (g, &score) in row_scores.iter().enumerate() {
                            *op.add((q0 + g) * n_rows + r0 + j) = score;
                        }
                    }
                    r0 += R4;
                }
                for r in r0..sub_end {
                    let [row_scores] = row_4q(group, [row_ptr(r)]);
                    for (g, &score) in row_scores.iter().enumerate() {
                        *op.add((q0 + g) * n_rows + r) = score;
                    }
                }
            }
            sub_start = sub_end;
        }

        // Remaining queries one at a time (the batch-1 path): a straight stream over the rows.
        for q in n_grouped..n_queries {
            let query = [qp.add(q * dim)];
            let out_q = op.add(q * n_rows);
            let mut r0 = 0;
            while r0 + R1 <= n_rows {
                let tile = tile_1q(query, std::array::from_fn(|j| row_ptr(r0 + j)));
                for (j, [score]) in tile.iter().enumerate() {
                    *out_q.add(r0 + j) = *score;
                }
                r0 += R1;
            }
            for r in r0..n_rows {
                let [[score]] = row_1q(query, [row_ptr(r)]);
                *out_q.add(r) = score;
            }
        }
    }
}
