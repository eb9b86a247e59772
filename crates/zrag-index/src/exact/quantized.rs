//! Compact copies of the vectors for search: f16 (IEEE half, 2 bytes per value) and int8 (per-row
//! symmetric scalar quantisation, 1 byte per value plus 8 per row), scanned by SIMD kernels to
//! pick a shortlist per query that is then re-scored exactly from the f32 rows.
//!
//! Why: batch-1 search reads every vector, so its speed and a collection's resident memory are
//! set by the copy that is scanned; the f32 rows are only touched for the shortlist (a few dozen
//! rows per query), so they can stay on disk behind the memory map.
//!
//! The compact copies are byte images ([`F16Vectors::to_bytes`], [`Int8Vectors::to_bytes`]) that
//! a collection writes as files and maps; [`QuantizedView`] reads them in place, without copying.
//!
//! ```text
//! 0   magic "ZRAGQVEC", format version u32 (1), precision u32 (16 = f16, 8 = int8),
//!     dim u32, reserved u32 (0), rows u64, zeros up to byte 64        (all little-endian)
//! 64  f16:  rows × dim IEEE binary16
//!     int8: rows × dim codes (i8, in [-127, 127]), zeros up to a multiple of 64 bytes,
//!           rows × f32 scale, rows × f32 error bound β (as in `prefilter`)
//! ```
//!
//! An int8 row is `x ≈ scale · codes` with `scale = max |x_j| / 127`: this is
//! [`Int8Prefilter`]'s quantisation, reused as is (its bound β travels along, so the same file can
//! serve the rigorous prefilter). Per-row scaling beat per-dimension scaling on real MiniLM
//! vectors (rms score error 3.8e-4 vs 4.8e-4 for per-dimension min/max), see
//! `bench/exact/QUANTIZED.md`.
//!
//! Int8 codes are scored with integer dot products: the query is quantised to int8 as well, and
//! `vpdpbusd` (AVX-512 VNNI) or `vpmaddubsw` (AVX2) multiply 64 or 32 code pairs per
//! instruction. The f32 re-scoring makes the result independent of the (small) extra error.

use std::fmt;
use std::str::FromStr;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::kernels::{self, Isa};
use super::prefilter::Int8Prefilter;
use super::topk::TopK;
use super::{AlignedFloats, CacheLine, Hit, STREAM_BLOCK_BYTES, STREAM_QUERY_CHUNK};
use crate::error::{IndexError, Result};

// ---------------------------------------------------------------- precision

/// How a collection stores the vectors it scans.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VectorPrecision {
    /// The f32 rows themselves (exact search, no re-scoring).
    #[default]
    F32,
    /// IEEE half precision, 2 bytes per value.
    F16,
    /// Per-row symmetric int8 codes, 1 byte per value plus a scale and an error bound per row.
    Int8,
}

impl VectorPrecision {
    pub const ALL: [VectorPrecision; 3] = [
        VectorPrecision::F32,
        VectorPrecision::F16,
        VectorPrecision::Int8,
    ];

    /// The name used in flags, JSON and messages: `f32`, `f16` or `int8`.
    pub fn name(self) -> &'static str {
        match self {
            VectorPrecision::F32 => "f32",
            VectorPrecision::F16 => "f16",
            VectorPrecision::Int8 => "int8",
        }
    }

    /// Bytes per vector of `dim` values in the copy that is scanned (file headers excluded).
    pub fn bytes_per_vector(self, dim: usize) -> usize {
        match self {
            VectorPrecision::F32 => 4 * dim,
            VectorPrecision::F16 => 2 * dim,
            VectorPrecision::Int8 => dim + INT8_ROW_EXTRA_BYTES,
        }
    }
}

impl fmt::Display for VectorPrecision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A precision name that is not `f32`, `f16` or `int8`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnknownPrecision(pub String);

impl fmt::Display for UnknownPrecision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "unknown vector precision {:?} (expected f32, f16 or int8)",
            self.0
        )
    }
}

impl std::error::Error for UnknownPrecision {}

impl FromStr for VectorPrecision {
    type Err = UnknownPrecision;

    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        VectorPrecision::ALL
            .into_iter()
            .find(|p| s.trim().eq_ignore_ascii_case(p.name()))
            .ok_or_else(|| UnknownPrecision(s.to_string()))
    }
}

// ---------------------------------------------------------------- byte format

const MAGIC: [u8; 8] = *b"ZRAGQVEC";
const FORMAT_VERSION: u32 = 1;
/// The header is padded to a cache line so that the codes of a mapped file start on one.
const HEADER_BYTES: usize = 64;
const PRECISION_CODE_F16: u32 = 16;
const PRECISION_CODE_INT8: u32 = 8;
/// Per-row scale and error bound of an int8 row.
const INT8_ROW_EXTRA_BYTES: usize = 8;

fn malformed(reason: impl Into<String>) -> IndexError {
    IndexError::MalformedVectors {
        reason: reason.into(),
    }
}

fn header(precision: VectorPrecision, dim: usize, rows: usize) -> Vec<u8> {
    let code = match precision {
        VectorPrecision::F16 => PRECISION_CODE_F16,
        VectorPrecision::Int8 => PRECISION_CODE_INT8,
        VectorPrecision::F32 => unreachable!("f32 rows are not stored in this format"),
    };
    let dim = u32::try_from(dim).expect("quantised vectors: dim does not fit in u32");
    let mut out = Vec::with_capacity(HEADER_BYTES);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&code.to_le_bytes());
    out.extend_from_slice(&dim.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&(rows as u64).to_le_bytes());
    out.resize(HEADER_BYTES, 0);
    out
}

/// Shape of a byte image, checked against its length.
struct Layout {
    precision: VectorPrecision,
    dim: usize,
    rows: usize,
}

impl Layout {
    fn parse(bytes: &[u8]) -> Result<Layout> {
        if bytes.len() < HEADER_BYTES {
            return Err(malformed(format!(
                "{} bytes, shorter than the {HEADER_BYTES}-byte header",
                bytes.len()
            )));
        }
        if bytes[..8] != MAGIC {
            return Err(malformed("not a zrag quantised vector file (bad magic)"));
        }
        let u32_at = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap());
        let version = u32_at(8);
        if version != FORMAT_VERSION {
            return Err(malformed(format!(
                "format version {version} is not supported (this zrag reads version {FORMAT_VERSION})"
            )));
        }
        let precision = match u32_at(12) {
            PRECISION_CODE_F16 => VectorPrecision::F16,
            PRECISION_CODE_INT8 => VectorPrecision::Int8,
            other => return Err(malformed(format!("unknown precision code {other}"))),
        };
        let dim = u32_at(16) as usize;
        if dim == 0 {
            return Err(malformed("dimension 0"));
        }
        let rows = u64::from_le_bytes(bytes[24..32].try_into().unwrap());
        if rows > u32::MAX as u64 + 1 {
            return Err(malformed(format!("{rows} rows, more than 2^32")));
        }
        let layout = Layout {
            precision,
            dim,
            rows: rows as usize,
        };
        let expected = layout
            .total_len()
            .ok_or_else(|| malformed(format!("{rows} rows × {dim} dims overflow")))?;
        if bytes.len() as u128 != expected as u128 {
            return Err(malformed(format!(
                "{} bytes, but a {precision} file of {rows} rows × {dim} dims has {expected}",
                bytes.len()
            )));
        }
        Ok(layout)
    }

    /// Bytes of the codes (int8: without the padding before the scales).
    fn codes_len(&self) -> Option<usize> {
        let values = self.rows.checked_mul(self.dim)?;
        match self.precision {
            VectorPrecision::F16 => values.checked_mul(2),
            _ => Some(values),
        }
    }

    /// Offset of the int8 scales (the codes padded to a cache line).
    fn scales_offset(&self) -> Option<usize> {
        HEADER_BYTES.checked_add(self.codes_len()?.checked_next_multiple_of(64)?)
    }

    fn total_len(&self) -> Option<usize> {
        match self.precision {
            VectorPrecision::F16 => HEADER_BYTES.checked_add(self.codes_len()?),
            _ => self
                .scales_offset()?
                .checked_add(self.rows.checked_mul(INT8_ROW_EXTRA_BYTES)?),
        }
    }
}

fn check_rows(vectors: &[f32], dim: usize, what: &str) -> usize {
    assert!(dim > 0, "{what}: dim must be positive");
    assert_eq!(
        vectors.len() % dim,
        0,
        "{what}: vectors are not a whole number of rows"
    );
    let rows = vectors.len() / dim;
    assert!(rows <= u32::MAX as usize + 1, "{what}: more than 2^32 rows");
    rows
}

// ---------------------------------------------------------------- f16

/// An f16 copy of a row-major `n × dim` f32 matrix, as its byte image.
#[derive(Clone, Debug)]
pub struct F16Vectors {
    bytes: Vec<u8>,
}

impl F16Vectors {
    /// Converts `vectors` (row-major `n × dim`) to IEEE half precision (round to nearest even),
    /// in parallel on the current rayon pool. Finite values beyond the f16 range saturate to
    /// ±65504 rather than becoming infinite, so every finite row keeps a finite approximate score.
    ///
    /// # Panics
    /// If `dim` is 0 or `vectors` is not a whole number of rows.
    pub fn build(vectors: &[f32], dim: usize) -> Self {
        let rows = check_rows(vectors, dim, "f16 vectors");
        let mut bytes = header(VectorPrecision::F16, dim, rows);
        bytes.resize(HEADER_BYTES + rows * dim * 2, 0);
        bytes[HEADER_BYTES..]
            .par_chunks_mut(dim * 2)
            .zip(vectors.par_chunks(dim))
            .for_each(|(out, row)| {
                for (pair, &value) in out.chunks_exact_mut(2).zip(row) {
                    let value = if value.is_finite() {
                        value.clamp(-65504.0, 65504.0)
                    } else {
                        value
                    };
                    pair.copy_from_slice(&half::f16::from_f32(value).to_bits().to_le_bytes());
                }
            });
        F16Vectors { bytes }
    }

    /// The byte image (see the module documentation), ready to be written to a file.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.bytes.clone()
    }

    pub fn into_bytes(self) -> Vec<u8> {
        self.bytes
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    pub fn view(&self) -> F16View<'_> {
        F16View::from_bytes(&self.bytes).expect("an f16 image built here is well-formed")
    }
}

/// f16 vectors read in place from a byte image (a memory-mapped file or [`F16Vectors`]).
#[derive(Clone, Copy, Debug)]
pub struct F16View<'a> {
    dim: usize,
    rows: usize,
    /// `rows × dim` little-endian binary16 values.
    codes: &'a [u8],
}

impl<'a> F16View<'a> {
    /// Checks the header and the length; nothing is copied. Any alignment is accepted.
    pub fn from_bytes(bytes: &'a [u8]) -> Result<Self> {
        match QuantizedView::from_bytes(bytes)? {
            QuantizedView::F16(view) => Ok(view),
            QuantizedView::Int8(_) => Err(malformed("int8 vectors where f16 were expected")),
        }
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Row `row` widened to f32 (exactly: every f16 value is an f32 value).
    ///
    /// # Panics
    /// If `row` is out of range or `out` does not hold `dim` values.
    pub fn decode_row(&self, row: usize, out: &mut [f32]) {
        assert!(row < self.rows, "f16 view: row {row} out of range");
        assert_eq!(out.len(), self.dim, "f16 view: output length");
        let codes = &self.codes[row * self.dim * 2..(row + 1) * self.dim * 2];
        f16_widen(f16_level(kernels::active_isa()), codes, out);
    }
}

// ---------------------------------------------------------------- int8

/// A per-row int8 copy of a row-major `n × dim` f32 matrix, as its byte image.
#[derive(Clone, Debug)]
pub struct Int8Vectors {
    bytes: Vec<u8>,
}

impl Int8Vectors {
    /// Quantises `vectors` (row-major `n × dim`) with [`Int8Prefilter::build`] (in parallel on
    /// the current rayon pool).
    ///
    /// # Panics
    /// If `dim` is 0 or `vectors` is not a whole number of rows.
    pub fn build(vectors: &[f32], dim: usize) -> Self {
        check_rows(vectors, dim, "int8 vectors");
        Self::from_prefilter(&Int8Prefilter::build(vectors, dim))
    }

    /// The byte image of an existing prefilter's codes, scales and bounds.
    pub fn from_prefilter(prefilter: &Int8Prefilter) -> Self {
        let (dim, rows) = (prefilter.dim(), prefilter.rows());
        let layout = Layout {
            precision: VectorPrecision::Int8,
            dim,
            rows,
        };
        let mut bytes = header(VectorPrecision::Int8, dim, rows);
        bytes.reserve(layout.total_len().expect("int8 vectors: size overflow") - HEADER_BYTES);
        bytes.extend(prefilter.codes().iter().map(|&c| c as u8));
        bytes.resize(layout.scales_offset().unwrap(), 0);
        for values in [prefilter.scales(), prefilter.bounds()] {
            bytes.extend(values.iter().flat_map(|v| v.to_le_bytes()));
        }
        debug_assert_eq!(Some(bytes.len()), layout.total_len());
        Int8Vectors { bytes }
    }

    /// The byte image (see the module documentation), ready to be written to a file.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.bytes.clone()
    }

    pub fn into_bytes(self) -> Vec<u8> {
        self.bytes
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    pub fn view(&self) -> Int8View<'_> {
        Int8View::from_bytes(&self.bytes).expect("an int8 image built here is well-formed")
    }
}

/// int8 vectors read in place from a byte image (a memory-mapped file or [`Int8Vectors`]).
#[derive(Clone, Copy, Debug)]
pub struct Int8View<'a> {
    dim: usize,
    rows: usize,
    /// `rows × dim` codes (i8 bit patterns).
    codes: &'a [u8],
    /// `rows` little-endian f32 scales.
    scales: &'a [u8],
    /// `rows` little-endian f32 error bounds.
    bounds: &'a [u8],
}

impl<'a> Int8View<'a> {
    /// Checks the header and the length; nothing is copied. Any alignment is accepted.
    pub fn from_bytes(bytes: &'a [u8]) -> Result<Self> {
        match QuantizedView::from_bytes(bytes)? {
            QuantizedView::Int8(view) => Ok(view),
            QuantizedView::F16(_) => Err(malformed("f16 vectors where int8 were expected")),
        }
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    /// The codes of row `row`: the row is approximately `scale(row) · codes`.
    pub fn codes(&self, row: usize) -> &'a [i8] {
        let bytes = &self.codes[row * self.dim..(row + 1) * self.dim];
        // SAFETY: i8 and u8 have the same size and alignment, and every bit pattern is valid.
        unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast::<i8>(), bytes.len()) }
    }

    pub fn scale(&self, row: usize) -> f32 {
        read_f32(self.scales, row)
    }

    /// The row's error bound β of [`prefilter`](super::prefilter): `|q·x − scale·(q·codes)|` is at
    /// most `‖q‖·β` (including f32 rounding), for every query `q`.
    pub fn bound(&self, row: usize) -> f32 {
        read_f32(self.bounds, row)
    }
}

fn read_f32(bytes: &[u8], index: usize) -> f32 {
    f32::from_le_bytes(bytes[index * 4..index * 4 + 4].try_into().unwrap())
}

// ---------------------------------------------------------------- either

/// A compact copy of the vectors, read in place: what [`search_quantized`] scans.
#[derive(Clone, Copy, Debug)]
pub enum QuantizedView<'a> {
    F16(F16View<'a>),
    Int8(Int8View<'a>),
}

impl<'a> QuantizedView<'a> {
    /// Reads the header to find the precision, and checks the length against it.
    ///
    /// # Errors
    /// [`IndexError::MalformedVectors`] for a wrong magic number, an unknown version or
    /// precision, dimension 0, or a length that does not match the header.
    pub fn from_bytes(bytes: &'a [u8]) -> Result<Self> {
        let layout = Layout::parse(bytes)?;
        let (dim, rows) = (layout.dim, layout.rows);
        // Lengths were checked by `parse`, so the slicing below is in bounds.
        let codes_end = HEADER_BYTES + layout.codes_len().unwrap();
        let codes = &bytes[HEADER_BYTES..codes_end];
        Ok(match layout.precision {
            VectorPrecision::F16 => QuantizedView::F16(F16View { dim, rows, codes }),
            _ => {
                let scales_at = layout.scales_offset().unwrap();
                let bounds_at = scales_at + rows * 4;
                QuantizedView::Int8(Int8View {
                    dim,
                    rows,
                    codes,
                    scales: &bytes[scales_at..bounds_at],
                    bounds: &bytes[bounds_at..],
                })
            }
        })
    }

    pub fn precision(&self) -> VectorPrecision {
        match self {
            QuantizedView::F16(_) => VectorPrecision::F16,
            QuantizedView::Int8(_) => VectorPrecision::Int8,
        }
    }

    pub fn dim(&self) -> usize {
        match self {
            QuantizedView::F16(v) => v.dim,
            QuantizedView::Int8(v) => v.dim,
        }
    }

    pub fn rows(&self) -> usize {
        match self {
            QuantizedView::F16(v) => v.rows,
            QuantizedView::Int8(v) => v.rows,
        }
    }
}

impl<'a> From<F16View<'a>> for QuantizedView<'a> {
    fn from(view: F16View<'a>) -> Self {
        QuantizedView::F16(view)
    }
}

impl<'a> From<Int8View<'a>> for QuantizedView<'a> {
    fn from(view: Int8View<'a>) -> Self {
        QuantizedView::Int8(view)
    }
}

/// The byte image of `vectors` at `precision`; `None` for [`VectorPrecision::F32`] (the f32 rows
/// are their own storage).
pub fn encode(precision: VectorPrecision, vectors: &[f32], dim: usize) -> Option<Vec<u8>> {
    match precision {
        VectorPrecision::F32 => None,
        VectorPrecision::F16 => Some(F16Vectors::build(vectors, dim).into_bytes()),
        VectorPrecision::Int8 => Some(Int8Vectors::build(vectors, dim).into_bytes()),
    }
}

// ---------------------------------------------------------------- search

/// The shortlist [`search_quantized`] re-scores by default for a top-`k`: `2k + 10`.
///
/// Measured recall@10 (`bench/exact/QUANTIZED.md`): on real MiniLM vectors (130k rows) every
/// exact top-10 was inside the int8 top-14 and the f16 top-11; on 1M random unit vectors, where
/// the top scores are far denser, the default gives recall ≥ 0.999. Re-scoring 30 rows reads
/// 46 KB of f32 per query, negligible next to the scan.
pub fn default_shortlist(k: usize) -> usize {
    k.saturating_mul(2).saturating_add(10)
}

/// How [`search_quantized_with`] scores the compact codes while scanning.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ScanKernel {
    /// The measured best: f16 [`Direct`](ScanKernel::Direct) for a single query and
    /// [`Widen`](ScanKernel::Widen) for batches; int8 [`Direct`](ScanKernel::Direct) always.
    #[default]
    Auto,
    /// Widen a block of codes to f32 in a cache-resident buffer and score it with the exact
    /// search's f32 kernels (which share each row load among four queries).
    Widen,
    /// Score the codes in place: f16 with `vcvtph2ps` + FMA, row by row for each query; int8
    /// with integer dot products against the query quantised to int8 (`vpdpbusd` /
    /// `vpmaddubsw`), four queries sharing each row load.
    Direct,
}

/// Top-`k` rows by inner product with each query, scanning `view` (a compact copy of `f32_rows`)
/// for the `shortlist` best approximate scores per query and re-scoring those exactly from
/// `f32_rows`.
///
/// `f32_rows` is row-major `n × dim`, the matrix `view` was built from; only the shortlisted rows
/// are read. Results are as [`search`](super::search)'s: sorted by exact f32 score descending
/// (equal scores: lower row first), `min(k, live rows)` long, the same bits as `search` computes
/// for a batch below [`gemm_min_queries`](super::gemm_min_queries). A row is missed only if its
/// approximate score is not among the `shortlist` best (`shortlist` is raised to `k` if lower;
/// `shortlist ≥ n` gives exactly `search`'s result). With `live` given, row `i` is searched only
/// if bit `i % 64` of `live[i / 64]` is set. A query with NaN or infinite values returns no hits.
/// Runs on the current rayon pool.
///
/// # Panics
/// If `dim` differs from the view's, if `f32_rows` does not hold the view's rows, if `queries` is
/// not a whole number of rows, or if `live` has fewer bits than rows.
pub fn search_quantized(
    view: QuantizedView<'_>,
    f32_rows: &[f32],
    dim: usize,
    queries: &[f32],
    k: usize,
    shortlist: usize,
    live: Option<&[u64]>,
) -> Vec<Vec<Hit>> {
    search_quantized_with(
        view,
        f32_rows,
        dim,
        queries,
        k,
        shortlist,
        live,
        ScanKernel::Auto,
    )
}

/// [`search_quantized`] with an explicit scan kernel (for benchmarks and tests).
#[allow(clippy::too_many_arguments)]
pub fn search_quantized_with(
    view: QuantizedView<'_>,
    f32_rows: &[f32],
    dim: usize,
    queries: &[f32],
    k: usize,
    shortlist: usize,
    live: Option<&[u64]>,
    kernel: ScanKernel,
) -> Vec<Vec<Hit>> {
    assert_eq!(
        dim,
        view.dim(),
        "quantised search: dim differs from the view's"
    );
    let n_rows = view.rows();
    assert_eq!(
        f32_rows.len(),
        n_rows * dim,
        "quantised search: the f32 rows do not match the view"
    );
    assert_eq!(
        queries.len() % dim,
        0,
        "quantised search: queries are not a whole number of rows"
    );
    if let Some(bits) = live {
        assert!(
            bits.len() >= n_rows.div_ceil(64),
            "quantised search: liveness bitset shorter than the rows"
        );
    }
    let n_queries = queries.len() / dim;
    if k == 0 || n_rows == 0 {
        return vec![Vec::new(); n_queries];
    }
    let k = k.min(n_rows);
    let shortlist = shortlist.clamp(k, n_rows);
    let isa = kernels::active_isa();

    let mut results = Vec::with_capacity(n_queries);
    for chunk in queries.chunks(STREAM_QUERY_CHUNK * dim) {
        // Aligned like `search` does: the f32 kernels re-read the queries for every row tile.
        let aligned = AlignedFloats::copy_of(chunk);
        let queries = aligned.as_slice();
        let candidates = match view {
            QuantizedView::F16(view) => scan_f16(view, queries, shortlist, live, kernel, isa),
            QuantizedView::Int8(view) => scan_int8(view, queries, shortlist, live, kernel, isa),
        };
        let rescored: Vec<Vec<Hit>> = candidates
            .into_par_iter()
            .zip(queries.par_chunks(dim))
            .map(|(candidates, query)| rescore(f32_rows, dim, query, candidates, k, isa))
            .collect();
        results.extend(rescored);
    }
    results
}

/// Rows per rayon task of the scan (6 MiB of f16 codes at 384 dims): enough work that
/// scheduling is negligible, small enough that two threads stay balanced.
const SCAN_TASK_ROWS: usize = 8192;
/// Rows per direct-kernel call: the approximate scores of a block stay in L1.
const DIRECT_BLOCK_ROWS: usize = 256;

/// Per-worker buffers of the scan.
#[derive(Default)]
struct Scratch {
    /// Widened codes (64-byte aligned, for the f32 kernels).
    floats: Vec<CacheLine>,
    /// Integer dot products.
    ints: Vec<i32>,
}

impl Scratch {
    fn floats(&mut self, len: usize) -> &mut [f32] {
        let lines = len.div_ceil(16);
        if self.floats.len() < lines {
            self.floats.resize(lines, CacheLine([0.0; 16]));
        }
        // SAFETY: `CacheLine` is `repr(C)` around 16 f32s, so the first `lines` lines are
        // `16 * lines >= len` contiguous initialised floats, borrowed mutably with `self`.
        unsafe { std::slice::from_raw_parts_mut(self.floats.as_mut_ptr().cast::<f32>(), len) }
    }
}

/// The `shortlist` best rows per query by approximate score. Rows are split into tasks that run
/// on the rayon pool; `score_block(scratch, start, end, out)` fills `out[q * (end - start) + r]`
/// with query `q`'s approximate score of row `start + r`. Each worker keeps its own heaps (and
/// walks its tasks in increasing row order, as `TopK` wants); they are merged at the end.
fn scan(
    n_rows: usize,
    n_queries: usize,
    shortlist: usize,
    live: Option<&[u64]>,
    block_rows: usize,
    score_block: impl Fn(&mut Scratch, usize, usize, &mut [f32]) + Sync,
) -> Vec<TopK> {
    struct Worker {
        top: Vec<TopK>,
        scores: Vec<f32>,
        scratch: Scratch,
    }
    let new_worker = || Worker {
        top: vec![TopK::new(shortlist); n_queries],
        scores: Vec::new(),
        scratch: Scratch::default(),
    };
    (0..n_rows.div_ceil(SCAN_TASK_ROWS))
        .into_par_iter()
        .fold(new_worker, |mut worker, task| {
            let task_end = ((task + 1) * SCAN_TASK_ROWS).min(n_rows);
            let mut start = task * SCAN_TASK_ROWS;
            while start < task_end {
                let end = (start + block_rows).min(task_end);
                let n_block = end - start;
                worker.scores.resize(n_queries * n_block, 0.0);
                let scores = &mut worker.scores[..n_queries * n_block];
                score_block(&mut worker.scratch, start, end, scores);
                for (top, query_scores) in worker.top.iter_mut().zip(scores.chunks_exact(n_block)) {
                    top.push_scores(query_scores, start, live);
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
        .unwrap_or_else(|| vec![TopK::new(shortlist); n_queries])
}

/// Rows per widening block: the widened f32 block fits in L2 while every group of four queries
/// passes over it (as the exact search's streaming blocks do).
fn widen_block_rows(dim: usize) -> usize {
    (STREAM_BLOCK_BYTES / (dim * 4)).clamp(8, SCAN_TASK_ROWS)
}

fn scan_f16(
    view: F16View<'_>,
    queries: &[f32],
    shortlist: usize,
    live: Option<&[u64]>,
    kernel: ScanKernel,
    isa: Isa,
) -> Vec<TopK> {
    let dim = view.dim;
    let n_queries = queries.len() / dim;
    let level = f16_level(isa);
    let codes_of = |start: usize, end: usize| &view.codes[start * dim * 2..end * dim * 2];
    let direct = match kernel {
        ScanKernel::Auto => n_queries == 1,
        ScanKernel::Direct => true,
        ScanKernel::Widen => false,
    };
    if direct {
        scan(
            view.rows,
            n_queries,
            shortlist,
            live,
            DIRECT_BLOCK_ROWS,
            |scratch, start, end, out| {
                let n_block = end - start;
                for (query, out) in queries.chunks_exact(dim).zip(out.chunks_exact_mut(n_block)) {
                    f16_scores(level, query, codes_of(start, end), dim, out, scratch);
                }
            },
        )
    } else {
        scan(
            view.rows,
            n_queries,
            shortlist,
            live,
            widen_block_rows(dim),
            |scratch, start, end, out| {
                let widened = scratch.floats((end - start) * dim);
                f16_widen(level, codes_of(start, end), widened);
                kernels::score_rows(isa, queries, widened, dim, out);
            },
        )
    }
}

fn scan_int8(
    view: Int8View<'_>,
    queries: &[f32],
    shortlist: usize,
    live: Option<&[u64]>,
    kernel: ScanKernel,
    isa: Isa,
) -> Vec<TopK> {
    let dim = view.dim;
    let n_queries = queries.len() / dim;
    let level = int8_level(isa);
    let codes_of = |start: usize, end: usize| &view.codes[start * dim..end * dim];
    match kernel {
        ScanKernel::Auto | ScanKernel::Direct => {
            let quantized = QueryCodes::new(queries, dim);
            scan(
                view.rows,
                n_queries,
                shortlist,
                live,
                DIRECT_BLOCK_ROWS,
                |scratch, start, end, out| {
                    let n_block = end - start;
                    scratch.ints.resize(n_queries * n_block, 0);
                    let dots = &mut scratch.ints[..n_queries * n_block];
                    int8_dots(level, &quantized, codes_of(start, end), dim, dots);
                    // The block's row scales, decoded once so that the loop below vectorises.
                    let mut scales = [0.0f32; DIRECT_BLOCK_ROWS];
                    let scales = &mut scales[..n_block];
                    for (scale, bytes) in scales
                        .iter_mut()
                        .zip(view.scales[start * 4..end * 4].chunks_exact(4))
                    {
                        *scale = f32::from_le_bytes(bytes.try_into().unwrap());
                    }
                    for ((out, dots), &query_scale) in out
                        .chunks_exact_mut(n_block)
                        .zip(dots.chunks_exact(n_block))
                        .zip(&quantized.scales)
                    {
                        for ((slot, &dot), &scale) in out.iter_mut().zip(dots).zip(&*scales) {
                            *slot = query_scale * scale * dot as f32;
                        }
                    }
                },
            )
        }
        ScanKernel::Widen => scan(
            view.rows,
            n_queries,
            shortlist,
            live,
            widen_block_rows(dim),
            |scratch, start, end, out| {
                let n_block = end - start;
                let widened = scratch.floats(n_block * dim);
                int8_widen(level, codes_of(start, end), widened);
                kernels::score_rows(isa, queries, widened, dim, out);
                for out in out.chunks_exact_mut(n_block) {
                    for (r, slot) in out.iter_mut().enumerate() {
                        *slot *= view.scale(start + r);
                    }
                }
            },
        ),
    }
}

/// Exact top-`k` of one query's shortlist, scored with the same f32 kernel (and so the same bits)
/// as the exact search's streaming path, in row order so that the top-k's tie-breaking holds.
fn rescore(
    f32_rows: &[f32],
    dim: usize,
    query: &[f32],
    candidates: TopK,
    k: usize,
    isa: Isa,
) -> Vec<Hit> {
    let mut rows: Vec<u32> = candidates.into_sorted().iter().map(|h| h.row).collect();
    rows.sort_unstable();
    let mut top = TopK::new(k);
    let mut score = [0.0f32];
    for row in rows {
        let row = row as usize;
        kernels::score_rows(
            isa,
            query,
            &f32_rows[row * dim..(row + 1) * dim],
            dim,
            &mut score,
        );
        top.push_scores(&score, row, None);
    }
    top.into_sorted()
}

// ---------------------------------------------------------------- query quantisation

/// Queries quantised to int8 for the integer kernels: `q ≈ scale · codes`, each query's codes
/// zero-padded to a multiple of 64 so that the kernels load whole vectors without masks.
struct QueryCodes {
    stride: usize,
    codes: Vec<CodeLine>,
    scales: Vec<f32>,
    /// Sum of each query's codes (the VNNI kernel's offset correction).
    sums: Vec<i32>,
}

#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct CodeLine([i8; 64]);

impl QueryCodes {
    fn new(queries: &[f32], dim: usize) -> QueryCodes {
        let stride = dim.next_multiple_of(64);
        let n_queries = queries.len() / dim;
        let mut codes = vec![CodeLine([0; 64]); n_queries * stride / 64];
        let mut scales = Vec::with_capacity(n_queries);
        let mut sums = Vec::with_capacity(n_queries);
        for (lines, query) in codes
            .chunks_exact_mut(stride / 64)
            .zip(queries.chunks_exact(dim))
        {
            let max_abs = query.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            // A query with non-finite values gets a NaN scale: every approximate score is NaN,
            // nothing enters the shortlist, and the query returns no hits.
            let scale = if query.iter().all(|v| v.is_finite()) {
                max_abs / 127.0
            } else {
                f32::NAN
            };
            let mut sum = 0i32;
            for (j, &value) in query.iter().enumerate() {
                let code = if scale > 0.0 {
                    // Round half away from zero, as `Int8Prefilter` does for the rows.
                    ((value / scale + 0.5f32.copysign(value)) as i32).clamp(-127, 127) as i8
                } else {
                    0
                };
                lines[j / 64].0[j % 64] = code;
                sum += code as i32;
            }
            scales.push(scale);
            sums.push(sum);
        }
        QueryCodes {
            stride,
            codes,
            scales,
            sums,
        }
    }

    fn n_queries(&self) -> usize {
        self.scales.len()
    }

    /// All queries' codes, `n_queries × stride`.
    fn flat(&self) -> &[i8] {
        // SAFETY: `CodeLine` is `repr(C)` around 64 i8s: the lines are contiguous initialised bytes.
        unsafe {
            std::slice::from_raw_parts(self.codes.as_ptr().cast::<i8>(), self.codes.len() * 64)
        }
    }
}

// ---------------------------------------------------------------- kernels

/// Instruction-set level of the quantised kernels, derived from [`kernels::active_isa`] (so
/// `ZRAG_EXACT_ISA` lowers it too) and the extra features each kernel family needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Level {
    Scalar,
    /// f16: AVX2 + FMA + F16C; int8: AVX2.
    Avx2,
    /// f16: AVX-512F; int8: AVX-512F + BW + VNNI.
    Avx512,
}

#[cfg(target_arch = "x86_64")]
fn has_avx2_fma() -> bool {
    is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
}

/// The f16 kernel level for `isa` (never above what the CPU has).
fn f16_level(isa: Isa) -> Level {
    #[cfg(target_arch = "x86_64")]
    {
        match isa.min(Isa::detect()) {
            Isa::Avx512F => return Level::Avx512,
            Isa::Avx2Fma if has_avx2_fma() && is_x86_feature_detected!("f16c") => {
                return Level::Avx2
            }
            _ => {}
        }
    }
    let _ = isa;
    Level::Scalar
}

/// The int8 kernel level for `isa` (never above what the CPU has). A CPU with AVX-512F but
/// without VNNI runs the AVX2 kernels.
fn int8_level(isa: Isa) -> Level {
    #[cfg(target_arch = "x86_64")]
    {
        let isa = isa.min(Isa::detect());
        if isa == Isa::Avx512F
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vnni")
        {
            return Level::Avx512;
        }
        if isa >= Isa::Avx2Fma && has_avx2_fma() {
            return Level::Avx2;
        }
    }
    let _ = isa;
    Level::Scalar
}

fn f16_to_f32(bytes: &[u8]) -> f32 {
    half::f16::from_bits(u16::from_le_bytes([bytes[0], bytes[1]])).to_f32()
}

/// `out[i]` = the f16 value at `codes[2i..2i+2]`, widened (exactly).
fn f16_widen(level: Level, codes: &[u8], out: &mut [f32]) {
    assert_eq!(codes.len(), out.len() * 2, "f16 widen: lengths");
    let level = level.min(f16_level(Isa::detect()));
    match level {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the level is supported by this CPU (clamped above); lengths checked.
        Level::Avx512 => unsafe { x86::f16_widen_avx512(codes, out) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Level::Avx2 => unsafe { x86::f16_widen_avx2(codes, out) },
        _ => {
            for (slot, pair) in out.iter_mut().zip(codes.chunks_exact(2)) {
                *slot = f16_to_f32(pair);
            }
        }
    }
}

/// `out[r] = query · row r` for f16 rows `codes` (`out.len() × dim` values). The portable level
/// widens the block into `scratch` and uses the portable f32 kernel.
fn f16_scores(
    level: Level,
    query: &[f32],
    codes: &[u8],
    dim: usize,
    out: &mut [f32],
    scratch: &mut Scratch,
) {
    assert_eq!(query.len(), dim, "f16 scores: query length");
    assert_eq!(codes.len(), out.len() * dim * 2, "f16 scores: lengths");
    let level = level.min(f16_level(Isa::detect()));
    match level {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the level is supported by this CPU (clamped above); lengths checked.
        Level::Avx512 => unsafe { x86::f16_scores_avx512(query, codes, dim, out) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Level::Avx2 => unsafe { x86::f16_scores_avx2(query, codes, dim, out) },
        _ => {
            let widened = scratch.floats(out.len() * dim);
            f16_widen(Level::Scalar, codes, widened);
            kernels::score_rows(Isa::Scalar, query, widened, dim, out);
        }
    }
}

/// `out[i] = codes[i]` as i8, widened to f32 (exactly).
fn int8_widen(level: Level, codes: &[u8], out: &mut [f32]) {
    assert_eq!(codes.len(), out.len(), "int8 widen: lengths");
    let level = level.min(int8_level(Isa::detect()));
    match level {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the level is supported by this CPU (clamped above); lengths checked.
        Level::Avx512 => unsafe { x86::int8_widen_avx512(codes, out) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Level::Avx2 => unsafe { x86::int8_widen_avx2(codes, out) },
        _ => {
            for (slot, &code) in out.iter_mut().zip(codes) {
                *slot = code as i8 as f32;
            }
        }
    }
}

/// `out[q * n + r] = Σ_j queries.code(q, j) · codes[r * dim + j]` (exact integers) for the
/// `n = codes.len() / dim` rows of `codes`.
fn int8_dots(level: Level, queries: &QueryCodes, codes: &[u8], dim: usize, out: &mut [i32]) {
    assert_eq!(codes.len() % dim, 0, "int8 dots: codes not whole rows");
    let n_rows = codes.len() / dim;
    assert_eq!(
        out.len(),
        queries.n_queries() * n_rows,
        "int8 dots: output length"
    );
    assert_eq!(
        queries.stride,
        dim.next_multiple_of(64),
        "int8 dots: stride"
    );
    let level = level.min(int8_level(Isa::detect()));
    match level {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the level is supported by this CPU (clamped above); shapes checked.
        Level::Avx512 => unsafe { x86::int8_dots_vnni(queries, codes, dim, out) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Level::Avx2 => unsafe { x86::int8_dots_avx2(queries, codes, dim, out) },
        _ => int8_dots_scalar(queries, codes, dim, out),
    }
}

fn int8_dots_scalar(queries: &QueryCodes, codes: &[u8], dim: usize, out: &mut [i32]) {
    let n_rows = codes.len() / dim;
    // Row-outer: each row is fetched once for all queries.
    for (r, row) in codes.chunks_exact(dim).enumerate() {
        for (q, query) in queries.flat().chunks_exact(queries.stride).enumerate() {
            out[q * n_rows + r] = query
                .iter()
                .zip(row)
                .map(|(&a, &b)| a as i32 * b as i8 as i32)
                .sum();
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    //! The AVX2 and AVX-512 kernels. Tile shapes are const generics so that the accumulator
    //! arrays unroll into registers (AVX-512 has 32 vector registers, AVX2 16). Rows are passed
    //! as byte pointers: a mapped file guarantees no alignment beyond the page, and every load is
    //! unaligned.

    use std::arch::x86_64::*;

    use super::QueryCodes;

    /// Rows per single-query tile: eight independent chains hide the FMA latency and keep eight
    /// cache-line streams open.
    const ROWS_1Q: usize = 8;
    /// Software prefetch distance in single-query tiles (as `prefilter`'s kernel: without it the
    /// row streams stall at page boundaries).
    const PREFETCH_TILES: usize = 2;

    /// Runs a single-query row tile over all rows, then one-row tiles over the rest.
    #[inline(always)]
    unsafe fn rows_1q<const R: usize>(
        out: &mut [f32],
        row: impl Fn(usize) -> *const u8,
        tile: impl Fn([*const u8; R]) -> [f32; R],
        one: impl Fn([*const u8; 1]) -> [f32; 1],
    ) {
        let n_rows = out.len();
        let mut r0 = 0;
        while r0 + R <= n_rows {
            let sums = tile(std::array::from_fn(|j| row(r0 + j)));
            out[r0..r0 + R].copy_from_slice(&sums);
            r0 += R;
        }
        for (r, slot) in out.iter_mut().enumerate().skip(r0) {
            let [sum] = one([row(r)]);
            *slot = sum;
        }
    }

    // ------------------------------------------------------------ f16, AVX-512

    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn f16_tile_avx512<const R: usize>(
        query: &[f32],
        rows: [*const u8; R],
        dim: usize,
        prefetch: usize,
    ) -> [f32; R] {
        let q = query.as_ptr();
        let vector_end = dim / 16 * 16;
        let mut acc = [_mm512_setzero_ps(); R];
        let mut i = 0;
        while i < vector_end {
            // 16 values = 32 bytes: one prefetch per 64-byte line.
            if prefetch > 0 && i % 32 == 0 {
                for row in rows {
                    _mm_prefetch::<_MM_HINT_T0>(row.wrapping_add(2 * i + prefetch).cast());
                }
            }
            let qv = _mm512_loadu_ps(q.add(i));
            for r in 0..R {
                let x = _mm512_cvtph_ps(_mm256_loadu_si256(rows[r].add(2 * i).cast()));
                acc[r] = _mm512_fmadd_ps(x, qv, acc[r]);
            }
            i += 16;
        }
        if i < dim {
            let mask = ((1u32 << (dim - i)) - 1) as __mmask16;
            let qv = _mm512_maskz_loadu_ps(mask, q.add(i));
            for r in 0..R {
                let mut tail = [0u8; 32];
                std::ptr::copy_nonoverlapping(rows[r].add(2 * i), tail.as_mut_ptr(), 2 * (dim - i));
                let x = _mm512_cvtph_ps(_mm256_loadu_si256(tail.as_ptr().cast()));
                acc[r] = _mm512_fmadd_ps(x, qv, acc[r]);
            }
        }
        let mut sums = [0.0f32; R];
        for r in 0..R {
            sums[r] = _mm512_reduce_add_ps(acc[r]);
        }
        sums
    }

    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn f16_scores_avx512(
        query: &[f32],
        codes: &[u8],
        dim: usize,
        out: &mut [f32],
    ) {
        let ahead = PREFETCH_TILES * ROWS_1Q * dim * 2;
        let row = |r: usize| codes.as_ptr().add(r * dim * 2);
        rows_1q::<ROWS_1Q>(
            out,
            row,
            |rows| f16_tile_avx512::<ROWS_1Q>(query, rows, dim, ahead),
            |rows| f16_tile_avx512::<1>(query, rows, dim, 0),
        )
    }

    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn f16_widen_avx512(codes: &[u8], out: &mut [f32]) {
        let n = out.len();
        let mut i = 0;
        while i + 16 <= n {
            let x = _mm512_cvtph_ps(_mm256_loadu_si256(codes.as_ptr().add(2 * i).cast()));
            _mm512_storeu_ps(out.as_mut_ptr().add(i), x);
            i += 16;
        }
        for j in i..n {
            out[j] = super::f16_to_f32(&codes[2 * j..]);
        }
    }

    // ------------------------------------------------------------ f16, AVX2 + F16C

    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn hsum256(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 0b01));
        _mm_cvtss_f32(s)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn f16_tile_avx2<const R: usize>(
        query: &[f32],
        rows: [*const u8; R],
        dim: usize,
        prefetch: usize,
    ) -> [f32; R] {
        let q = query.as_ptr();
        let vector_end = dim / 8 * 8;
        let mut acc = [_mm256_setzero_ps(); R];
        let mut i = 0;
        while i < vector_end {
            if prefetch > 0 && i % 32 == 0 {
                for row in rows {
                    _mm_prefetch::<_MM_HINT_T0>(row.wrapping_add(2 * i + prefetch).cast());
                }
            }
            let qv = _mm256_loadu_ps(q.add(i));
            for r in 0..R {
                let x = _mm256_cvtph_ps(_mm_loadu_si128(rows[r].add(2 * i).cast()));
                acc[r] = _mm256_fmadd_ps(x, qv, acc[r]);
            }
            i += 8;
        }
        let mut sums = [0.0f32; R];
        for r in 0..R {
            let mut tail = 0.0f32;
            for (j, &q) in query.iter().enumerate().take(dim).skip(vector_end) {
                tail += super::f16_to_f32(std::slice::from_raw_parts(rows[r].add(2 * j), 2)) * q;
            }
            sums[r] = hsum256(acc[r]) + tail;
        }
        sums
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn f16_scores_avx2(query: &[f32], codes: &[u8], dim: usize, out: &mut [f32]) {
        let ahead = PREFETCH_TILES * ROWS_1Q * dim * 2;
        let row = |r: usize| codes.as_ptr().add(r * dim * 2);
        rows_1q::<ROWS_1Q>(
            out,
            row,
            |rows| f16_tile_avx2::<ROWS_1Q>(query, rows, dim, ahead),
            |rows| f16_tile_avx2::<1>(query, rows, dim, 0),
        )
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn f16_widen_avx2(codes: &[u8], out: &mut [f32]) {
        let n = out.len();
        let mut i = 0;
        while i + 8 <= n {
            let x = _mm256_cvtph_ps(_mm_loadu_si128(codes.as_ptr().add(2 * i).cast()));
            _mm256_storeu_ps(out.as_mut_ptr().add(i), x);
            i += 8;
        }
        for j in i..n {
            out[j] = super::f16_to_f32(&codes[2 * j..]);
        }
    }

    // ------------------------------------------------------------ int8 widening

    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn int8_widen_avx512(codes: &[u8], out: &mut [f32]) {
        let n = out.len();
        let mut i = 0;
        while i + 16 <= n {
            let x = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(
                codes.as_ptr().add(i).cast(),
            )));
            _mm512_storeu_ps(out.as_mut_ptr().add(i), x);
            i += 16;
        }
        for j in i..n {
            out[j] = codes[j] as i8 as f32;
        }
    }

    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn int8_widen_avx2(codes: &[u8], out: &mut [f32]) {
        let n = out.len();
        let mut i = 0;
        while i + 8 <= n {
            let x = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(
                codes.as_ptr().add(i).cast(),
            )));
            _mm256_storeu_ps(out.as_mut_ptr().add(i), x);
            i += 8;
        }
        for j in i..n {
            out[j] = codes[j] as i8 as f32;
        }
    }

    // ------------------------------------------------------------ int8 integer dot products

    /// Walks (query group × row) space: groups of `G` queries with `RG × G` tiles over 16-row
    /// sub-blocks (which stay in L1 while every group passes over them), then the remaining
    /// queries one by one with `R1 × 1` tiles streaming all rows (the batch-1 path).
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn int8_dots_tiled<const R1: usize, const RG: usize, const G: usize>(
        queries: &QueryCodes,
        codes: &[u8],
        dim: usize,
        out: &mut [i32],
        tile_1: impl Fn([*const i8; 1], [*const u8; R1]) -> [[i32; 1]; R1],
        tile_g: impl Fn([*const i8; G], [*const u8; RG]) -> [[i32; G]; RG],
        row_1: impl Fn([*const i8; 1], [*const u8; 1]) -> [[i32; 1]; 1],
        row_g: impl Fn([*const i8; G], [*const u8; 1]) -> [[i32; G]; 1],
    ) {
        const SUB_BLOCK_ROWS: usize = 16;
        let n_queries = queries.n_queries();
        let n_rows = codes.len() / dim;
        let n_grouped = n_queries / G * G;
        let qp = queries.flat().as_ptr();
        let query = |q: usize| qp.add(q * queries.stride);
        let row = |r: usize| codes.as_ptr().add(r * dim);
        let op = out.as_mut_ptr();

        let mut sub_start = 0;
        while n_grouped > 0 && sub_start < n_rows {
            let sub_end = (sub_start + SUB_BLOCK_ROWS).min(n_rows);
            for q0 in (0..n_grouped).step_by(G) {
                let group: [*const i8; G] = std::array::from_fn(|j| query(q0 + j));
                let mut r0 = sub_start;
                while r0 + RG <= sub_end {
                    let tile = tile_g(group, std::array::from_fn(|j| row(r0 + j)));
                    for (j, sums) in tile.iter().enumerate() {
                        for (g, &sum) in sums.iter().enumerate() {
                            *op.add((q0 + g) * n_rows + r0 + j) = sum;
                        }
                    }
                    r0 += RG;
                }
                for r in r0..sub_end {
                    let [sums] = row_g(group, [row(r)]);
                    for (g, &sum) in sums.iter().enumerate() {
                        *op.add((q0 + g) * n_rows + r) = sum;
                    }
                }
            }
            sub_start = sub_end;
        }

        for q in n_grouped..n_queries {
            let out_q = op.add(q * n_rows);
            let mut r0 = 0;
            while r0 + R1 <= n_rows {
                let tile = tile_1([query(q)], std::array::from_fn(|j| row(r0 + j)));
                for (j, [sum]) in tile.iter().enumerate() {
                    *out_q.add(r0 + j) = *sum;
                }
                r0 += R1;
            }
            for r in r0..n_rows {
                let [[sum]] = row_1([query(q)], [row(r)]);
                *out_q.add(r) = sum;
            }
        }
    }

    /// `vpdpbusd` multiplies unsigned by signed bytes, so the row codes are flipped to
    /// `c + 128` (xor 0x80) and the sums carry `128 · Σ q` extra, removed by the caller.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    #[inline]
    unsafe fn int8_tile_vnni<const R: usize, const Q: usize>(
        queries: [*const i8; Q],
        rows: [*const u8; R],
        dim: usize,
        prefetch: usize,
    ) -> [[i32; Q]; R] {
        let flip = _mm512_set1_epi8(i8::MIN);
        let mut acc = [[_mm512_setzero_si512(); Q]; R];
        let mut i = 0;
        while i < dim {
            // The last step loads only the row's remaining bytes (zero, flipped to 128, meet
            // the query's zero padding).
            let mask: __mmask64 = if dim - i >= 64 {
                !0
            } else {
                (1u64 << (dim - i)) - 1
            };
            if prefetch > 0 {
                for row in rows {
                    _mm_prefetch::<_MM_HINT_T0>(row.wrapping_add(i + prefetch).cast());
                }
            }
            let mut qv = [_mm512_setzero_si512(); Q];
            for q in 0..Q {
                qv[q] = _mm512_loadu_si512(queries[q].add(i).cast());
            }
            for r in 0..R {
                let x =
                    _mm512_xor_si512(_mm512_maskz_loadu_epi8(mask, rows[r].add(i).cast()), flip);
                for q in 0..Q {
                    acc[r][q] = _mm512_dpbusd_epi32(acc[r][q], x, qv[q]);
                }
            }
            i += 64;
        }
        // Horizontal sums four accumulators at a time (a shuffle tree costs about a third of
        // four separate reductions; with 6 dot-product steps per row at 384 dims, separate
        // reductions would cost more than the dot products).
        let mut sums = [[0i32; Q]; R];
        let at = |i: usize| acc[i / Q][i % Q];
        let mut i = 0;
        while i + 4 <= R * Q {
            let four = reduce4_vnni(at(i), at(i + 1), at(i + 2), at(i + 3));
            for (j, sum) in four.into_iter().enumerate() {
                sums[(i + j) / Q][(i + j) % Q] = sum;
            }
            i += 4;
        }
        while i < R * Q {
            sums[i / Q][i % Q] = _mm512_reduce_add_epi32(at(i));
            i += 1;
        }
        sums
    }

    /// The horizontal sums of four vectors.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn reduce4_vnni(a: __m512i, b: __m512i, c: __m512i, d: __m512i) -> [i32; 4] {
        // Per 128-bit block: [a0+a2, b0+b2, a1+a3, b1+b3] and the same for c, d ...
        let ab = _mm512_add_epi32(_mm512_unpacklo_epi32(a, b), _mm512_unpackhi_epi32(a, b));
        let cd = _mm512_add_epi32(_mm512_unpacklo_epi32(c, d), _mm512_unpackhi_epi32(c, d));
        // ... then [Σa, Σb, Σc, Σd] of each block, and the four blocks added.
        let abcd = _mm512_add_epi32(_mm512_unpacklo_epi64(ab, cd), _mm512_unpackhi_epi64(ab, cd));
        let half = _mm256_add_epi32(
            _mm512_castsi512_si256(abcd),
            _mm512_extracti64x4_epi64::<1>(abcd),
        );
        let quarter = _mm_add_epi32(
            _mm256_castsi256_si128(half),
            _mm256_extracti128_si256::<1>(half),
        );
        let mut out = [0i32; 4];
        _mm_storeu_si128(out.as_mut_ptr().cast(), quarter);
        out
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub(super) unsafe fn int8_dots_vnni(
        queries: &QueryCodes,
        codes: &[u8],
        dim: usize,
        out: &mut [i32],
    ) {
        // Single query: 8 rows in flight. Groups of 4 queries: 4×4 tiles (16 accumulators,
        // 4 query and 4 row registers of 32).
        let ahead = PREFETCH_TILES * ROWS_1Q * dim;
        int8_dots_tiled::<ROWS_1Q, 4, 4>(
            queries,
            codes,
            dim,
            out,
            |q, r| int8_tile_vnni::<ROWS_1Q, 1>(q, r, dim, ahead),
            |q, r| int8_tile_vnni::<4, 4>(q, r, dim, 0),
            |q, r| int8_tile_vnni::<1, 1>(q, r, dim, 0),
            |q, r| int8_tile_vnni::<1, 4>(q, r, dim, 0),
        );
        let n_rows = codes.len() / dim;
        for (out, &sum) in out.chunks_exact_mut(n_rows).zip(&queries.sums) {
            let offset = 128 * sum;
            for slot in out {
                *slot -= offset;
            }
        }
    }

    /// One 32-byte step of [`int8_tile_avx2`]: `acc[r][q] += Σ rows[r] · queries[q][i..i + 32]`.
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn int8_step_avx2<const R: usize, const Q: usize>(
        acc: &mut [[__m256i; Q]; R],
        queries: [*const i8; Q],
        i: usize,
        rows: [__m256i; R],
    ) {
        let ones = _mm256_set1_epi16(1);
        for q in 0..Q {
            let qv = _mm256_loadu_si256(queries[q].add(i).cast());
            let qa = _mm256_abs_epi8(qv);
            for r in 0..R {
                let products = _mm256_maddubs_epi16(qa, _mm256_sign_epi8(rows[r], qv));
                acc[r][q] = _mm256_add_epi32(acc[r][q], _mm256_madd_epi16(products, ones));
            }
        }
    }

    /// `vpmaddubsw` multiplies unsigned by signed bytes and saturates pairs to i16, so it gets
    /// `|q|` and `sign(q) · c` (`vpsignb`): each pair sums to at most 2·127·127 < 2¹⁵, exact.
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn int8_tile_avx2<const R: usize, const Q: usize>(
        queries: [*const i8; Q],
        rows: [*const u8; R],
        dim: usize,
        prefetch: usize,
    ) -> [[i32; Q]; R] {
        let mut acc = [[_mm256_setzero_si256(); Q]; R];
        let vector_end = dim / 32 * 32;
        let mut i = 0;
        while i < vector_end {
            if prefetch > 0 && i % 64 == 0 {
                for row in rows {
                    _mm_prefetch::<_MM_HINT_T0>(row.wrapping_add(i + prefetch).cast());
                }
            }
            let row_vectors = std::array::from_fn(|r| _mm256_loadu_si256(rows[r].add(i).cast()));
            int8_step_avx2(&mut acc, queries, i, row_vectors);
            i += 32;
        }
        if i < dim {
            // No byte-masked loads in AVX2: copy the rows' tails into zeroed buffers.
            let mut tails = [[0u8; 32]; R];
            for r in 0..R {
                std::ptr::copy_nonoverlapping(rows[r].add(i), tails[r].as_mut_ptr(), dim - i);
            }
            let row_vectors = std::array::from_fn(|r| _mm256_loadu_si256(tails[r].as_ptr().cast()));
            int8_step_avx2(&mut acc, queries, i, row_vectors);
        }
        let mut sums = [[0i32; Q]; R];
        for r in 0..R {
            for q in 0..Q {
                let v = acc[r][q];
                let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
                let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b01_00_11_10));
                let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b10_11_00_01));
                sums[r][q] = _mm_cvtsi128_si32(s);
            }
        }
        sums
    }

    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn int8_dots_avx2(
        queries: &QueryCodes,
        codes: &[u8],
        dim: usize,
        out: &mut [i32],
    ) {
        // 16 ymm registers: 4 rows × 1 query, or 2 rows × 2 queries (4 accumulators, and a query
        // needs two registers: q and |q|).
        let ahead = PREFETCH_TILES * 4 * dim;
        int8_dots_tiled::<4, 2, 2>(
            queries,
            codes,
            dim,
            out,
            |q, r| int8_tile_avx2::<4, 1>(q, r, dim, ahead),
            |q, r| int8_tile_avx2::<2, 2>(q, r, dim, 0),
            |q, r| int8_tile_avx2::<1, 1>(q, r, dim, 0),
            |q, r| int8_tile_avx2::<1, 2>(q, r, dim, 0),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exact::{search_with, Strategy};

    use crate::exact::tests::Rng;

    fn normalize(row: &mut [f32]) {
        let norm = row.iter().map(|v| v * v).sum::<f32>().sqrt();
        row.iter_mut().for_each(|v| *v /= norm);
    }

    /// Unit vectors scattered around `clusters` random unit centres (the shape of real
    /// embeddings: many near neighbours with close scores).
    fn clustered(rng: &mut Rng, n: usize, dim: usize, clusters: usize, spread: f32) -> Vec<f32> {
        let centres: Vec<f32> = (0..clusters * dim).map(|_| rng.normal()).collect();
        let mut rows = Vec::with_capacity(n * dim);
        for _ in 0..n {
            let c = (rng.next_u64() % clusters as u64) as usize;
            let start = rows.len();
            for j in 0..dim {
                let centre = centres[c * dim + j] / (dim as f32).sqrt();
                rows.push(centre + spread * rng.normal() / (dim as f32).sqrt());
            }
            normalize(&mut rows[start..]);
        }
        rows
    }

    fn f16_levels() -> Vec<Level> {
        let top = f16_level(Isa::detect());
        [Level::Scalar, Level::Avx2, Level::Avx512]
            .into_iter()
            .filter(|&l| l <= top)
            .collect()
    }

    fn int8_levels() -> Vec<Level> {
        let top = int8_level(Isa::detect());
        [Level::Scalar, Level::Avx2, Level::Avx512]
            .into_iter()
            .filter(|&l| l <= top)
            .collect()
    }

    const DIMS: [usize; 14] = [1, 7, 8, 15, 16, 17, 31, 32, 33, 63, 64, 65, 100, 384];

    #[test]
    fn precision_names_parse_and_serialize() {
        for p in VectorPrecision::ALL {
            assert_eq!(p.name().parse::<VectorPrecision>(), Ok(p));
            assert_eq!(p.to_string(), p.name());
            let json = serde_json::to_string(&p).unwrap();
            assert_eq!(json, format!("\"{}\"", p.name()));
            assert_eq!(serde_json::from_str::<VectorPrecision>(&json).unwrap(), p);
        }
        assert_eq!("INT8".parse::<VectorPrecision>(), Ok(VectorPrecision::Int8));
        let err = "fp8".parse::<VectorPrecision>().unwrap_err();
        assert!(err.to_string().contains("fp8"), "{err}");
        assert!(serde_json::from_str::<VectorPrecision>("\"i8\"").is_err());
        assert_eq!(VectorPrecision::Int8.bytes_per_vector(384), 392);
        assert_eq!(VectorPrecision::F16.bytes_per_vector(384), 768);
    }

    #[test]
    fn f16_kernels_match_scalar_reference() {
        let mut rng = Rng(1);
        for dim in DIMS {
            let n = 21; // two 8-row tiles and five single rows
            let rows = rng.floats(n * dim);
            let query = rng.floats(dim);
            let image = F16Vectors::build(&rows, dim);
            let view = image.view();
            let widened: Vec<f32> = view.codes.chunks_exact(2).map(f16_to_f32).collect();
            for (w, &x) in widened.iter().zip(&rows) {
                assert_eq!(*w, half::f16::from_f32(x).to_f32());
            }
            for level in f16_levels() {
                let mut got = vec![0.0; n * dim];
                f16_widen(level, view.codes, &mut got);
                assert_eq!(got, widened, "widen, {level:?}, dim {dim}");
                let mut scores = vec![0.0; n];
                f16_scores(
                    level,
                    &query,
                    view.codes,
                    dim,
                    &mut scores,
                    &mut Scratch::default(),
                );
                for (r, &score) in scores.iter().enumerate() {
                    let row = &widened[r * dim..(r + 1) * dim];
                    let exact: f64 = row
                        .iter()
                        .zip(&query)
                        .map(|(&a, &b)| a as f64 * b as f64)
                        .sum();
                    let magnitude: f64 = row
                        .iter()
                        .zip(&query)
                        .map(|(&a, &b)| (a as f64 * b as f64).abs())
                        .sum();
                    assert!(
                        (score as f64 - exact).abs() <= 1e-6 * (magnitude + 1.0),
                        "{level:?}, dim {dim}, row {r}: {score} vs {exact}"
                    );
                }
            }
        }
    }

    #[test]
    fn int8_kernels_match_scalar_reference() {
        let mut rng = Rng(2);
        for dim in DIMS {
            let n = 37; // every tile shape plus leftovers (tiles of 8, 4, 2 rows; 16-row sub-blocks)
            let mut rows = rng.floats(n * dim);
            // One row at the extremes: codes ±127 everywhere, the AVX2 saturation edge.
            for (j, v) in rows[..dim].iter_mut().enumerate() {
                *v = if j % 3 == 0 { -1.0 } else { 1.0 };
            }
            let image = Int8Vectors::build(&rows, dim);
            let view = image.view();
            for n_queries in [1, 2, 3, 4, 5, 7, 8, 9] {
                let mut queries = rng.floats(n_queries * dim);
                queries[..dim]
                    .iter_mut()
                    .enumerate()
                    .for_each(|(j, v)| *v = if j % 2 == 0 { 1.0 } else { -1.0 });
                let quantized = QueryCodes::new(&queries, dim);
                let mut want = vec![0; n_queries * n];
                for q in 0..n_queries {
                    for r in 0..n {
                        let query = &quantized.flat()[q * quantized.stride..][..dim];
                        want[q * n + r] = query
                            .iter()
                            .zip(view.codes(r))
                            .map(|(&a, &b)| a as i32 * b as i32)
                            .sum();
                    }
                }
                for level in int8_levels() {
                    let mut got = vec![0; n_queries * n];
                    int8_dots(level, &quantized, view.codes, dim, &mut got);
                    assert_eq!(got, want, "{level:?}, dim {dim}, {n_queries} queries");
                }
            }
            let want: Vec<f32> = view.codes.iter().map(|&c| c as i8 as f32).collect();
            for level in int8_levels() {
                let mut got = vec![0.0; n * dim];
                int8_widen(level, view.codes, &mut got);
                assert_eq!(got, want, "widen, {level:?}, dim {dim}");
            }
        }
    }

    fn kernels_to_test() -> [ScanKernel; 3] {
        [ScanKernel::Auto, ScanKernel::Widen, ScanKernel::Direct]
    }

    #[test]
    fn full_shortlist_equals_exact_search() {
        let mut rng = Rng(3);
        for (dim, n) in [(384, 3000), (33, 20_000), (5, 700)] {
            let rows = rng.floats(n * dim);
            let live: Vec<u64> = (0..n.div_ceil(64)).map(|_| rng.next_u64()).collect();
            let f16 = F16Vectors::build(&rows, dim);
            let int8 = Int8Vectors::build(&rows, dim);
            for n_queries in [1, 5, 66] {
                let queries = rng.floats(n_queries * dim);
                for live in [None, Some(&live[..])] {
                    let want = search_with(&rows, dim, &queries, 10, live, Strategy::Streaming);
                    for view in [QuantizedView::from(f16.view()), int8.view().into()] {
                        for kernel in kernels_to_test() {
                            let got = search_quantized_with(
                                view, &rows, dim, &queries, 10, n, live, kernel,
                            );
                            assert_eq!(
                                got,
                                want,
                                "{} {kernel:?}, dim {dim}, {n_queries} queries, live {}",
                                view.precision(),
                                live.is_some()
                            );
                        }
                    }
                }
            }
        }
    }

    fn recall(got: &[Vec<Hit>], want: &[Vec<Hit>]) -> f64 {
        let found: usize = got
            .iter()
            .zip(want)
            .map(|(g, w)| {
                g.iter()
                    .filter(|h| w.iter().any(|x| x.row == h.row))
                    .count()
            })
            .sum();
        found as f64 / want.iter().map(Vec::len).sum::<usize>() as f64
    }

    #[test]
    fn recall_at_default_shortlist_on_clustered_unit_vectors() {
        let mut rng = Rng(4);
        let (dim, n, k) = (384, 20_000, 10);
        let rows = clustered(&mut rng, n, dim, 200, 1.0);
        let queries = clustered(&mut rng, 200, dim, 200, 1.0);
        let want = search_with(&rows, dim, &queries, k, None, Strategy::Streaming);
        let f16 = F16Vectors::build(&rows, dim);
        let int8 = Int8Vectors::build(&rows, dim);
        for view in [QuantizedView::from(f16.view()), int8.view().into()] {
            for kernel in kernels_to_test() {
                let got = search_quantized_with(
                    view,
                    &rows,
                    dim,
                    &queries,
                    k,
                    default_shortlist(k),
                    None,
                    kernel,
                );
                let r = recall(&got, &want);
                assert!(r >= 0.99, "{} {kernel:?}: recall@10 {r}", view.precision());
                // Whatever was found carries its exact f32 score.
                for (g, w) in got.iter().zip(&want) {
                    for h in g {
                        if let Some(x) = w.iter().find(|x| x.row == h.row) {
                            assert_eq!(h.score, x.score);
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn live_bitset_is_respected() {
        let mut rng = Rng(5);
        let (dim, n) = (64, 5000);
        let rows = clustered(&mut rng, n, dim, 20, 0.5);
        let queries = clustered(&mut rng, 9, dim, 20, 0.5);
        let live: Vec<u64> = (0..n.div_ceil(64))
            .map(|_| rng.next_u64() & rng.next_u64())
            .collect();
        let is_live = |row: u32| live[row as usize / 64] >> (row % 64) & 1 == 1;
        let f16 = F16Vectors::build(&rows, dim);
        let int8 = Int8Vectors::build(&rows, dim);
        let none = vec![0u64; n.div_ceil(64)];
        for view in [QuantizedView::from(f16.view()), int8.view().into()] {
            for kernel in kernels_to_test() {
                let got =
                    search_quantized_with(view, &rows, dim, &queries, 10, 30, Some(&live), kernel);
                for hits in &got {
                    assert_eq!(hits.len(), 10);
                    assert!(
                        hits.iter().all(|h| is_live(h.row)),
                        "a deleted row was returned"
                    );
                }
                let nothing =
                    search_quantized_with(view, &rows, dim, &queries, 10, 30, Some(&none), kernel);
                assert!(nothing.iter().all(Vec::is_empty));
            }
        }
    }

    #[test]
    fn k_zero_empty_views_and_nonfinite_queries() {
        let dim = 8;
        let rows: Vec<f32> = (0..80).map(|i| i as f32 / 80.0).collect();
        let int8 = Int8Vectors::build(&rows, dim);
        let empty = F16Vectors::build(&[], dim);
        let query = vec![0.5; dim];
        assert_eq!(
            search_quantized(int8.view().into(), &rows, dim, &query, 0, 5, None),
            vec![Vec::<Hit>::new()]
        );
        assert_eq!(
            search_quantized(empty.view().into(), &[], dim, &query, 3, 5, None),
            vec![Vec::<Hit>::new()]
        );
        // k above n, shortlist below k: all rows, exact order.
        let all = search_quantized(int8.view().into(), &rows, dim, &query, 50, 1, None);
        assert_eq!(
            all,
            search_with(&rows, dim, &query, 50, None, Strategy::Streaming)
        );
        let mut bad = query.clone();
        bad[3] = f32::NAN;
        for view in [
            QuantizedView::from(int8.view()),
            F16Vectors::build(&rows, dim).view().into(),
        ] {
            assert_eq!(
                search_quantized(view, &rows, dim, &bad, 3, 5, None),
                vec![Vec::<Hit>::new()]
            );
        }
    }

    #[test]
    fn f16_saturates_instead_of_overflowing() {
        let rows = [1e6f32, -1e6, 1.0, f32::INFINITY];
        let image = F16Vectors::build(&rows, 4);
        let mut out = [0.0; 4];
        image.view().decode_row(0, &mut out);
        assert_eq!(out, [65504.0, -65504.0, 1.0, f32::INFINITY]);
    }

    #[test]
    fn round_trip_through_bytes_in_place() {
        let mut rng = Rng(6);
        let (dim, n) = (37, 300);
        let rows = rng.floats(n * dim);
        let queries = rng.floats(3 * dim);
        let f16 = F16Vectors::build(&rows, dim);
        let int8 = Int8Vectors::build(&rows, dim);
        let prefilter = Int8Prefilter::build(&rows, dim);
        for (image, precision) in [
            (f16.to_bytes(), VectorPrecision::F16),
            (int8.to_bytes(), VectorPrecision::Int8),
        ] {
            assert_eq!(Some(image.clone()), encode(precision, &rows, dim));
            // At an odd address, as a file mapped at an offset could be.
            let mut shifted = vec![0u8; image.len() + 1];
            shifted[1..].copy_from_slice(&image);
            let view = QuantizedView::from_bytes(&shifted[1..]).unwrap();
            assert_eq!(
                (view.precision(), view.dim(), view.rows()),
                (precision, dim, n)
            );
            match view {
                QuantizedView::F16(v) => {
                    let mut row = vec![0.0; dim];
                    for r in 0..n {
                        v.decode_row(r, &mut row);
                        for (a, &b) in row.iter().zip(&rows[r * dim..]) {
                            assert_eq!(*a, half::f16::from_f32(b).to_f32());
                        }
                    }
                }
                QuantizedView::Int8(v) => {
                    for r in 0..n {
                        assert_eq!(v.codes(r), &prefilter.codes()[r * dim..(r + 1) * dim]);
                        assert_eq!(v.scale(r), prefilter.scales()[r]);
                        assert_eq!(v.bound(r), prefilter.bounds()[r]);
                    }
                }
            }
            let aligned = QuantizedView::from_bytes(&image).unwrap();
            assert_eq!(
                search_quantized(view, &rows, dim, &queries, 5, 20, None),
                search_quantized(aligned, &rows, dim, &queries, 5, 20, None)
            );
        }
        assert!(F16View::from_bytes(int8.as_bytes()).is_err());
        assert!(Int8View::from_bytes(f16.as_bytes()).is_err());
        assert_eq!(encode(VectorPrecision::F32, &rows, dim), None);
    }

    #[test]
    fn malformed_images_are_errors_not_panics() {
        let mut rng = Rng(7);
        let rows = rng.floats(5 * 9);
        for image in [
            F16Vectors::build(&rows, 9).into_bytes(),
            Int8Vectors::build(&rows, 9).into_bytes(),
        ] {
            for len in 0..image.len() {
                let err = QuantizedView::from_bytes(&image[..len]).unwrap_err();
                assert!(matches!(err, IndexError::MalformedVectors { .. }), "{err}");
            }
            let mut longer = image.clone();
            longer.push(0);
            assert!(QuantizedView::from_bytes(&longer).is_err());
            let corrupt = |at: usize, bytes: &[u8]| {
                let mut c = image.clone();
                c[at..at + bytes.len()].copy_from_slice(bytes);
                QuantizedView::from_bytes(&c).unwrap_err().to_string()
            };
            assert!(corrupt(0, b"X").contains("magic"));
            assert!(corrupt(8, &2u32.to_le_bytes()).contains("version 2"));
            assert!(corrupt(12, &32u32.to_le_bytes()).contains("precision code 32"));
            assert!(corrupt(16, &0u32.to_le_bytes()).contains("dimension 0"));
            assert!(corrupt(16, &30u32.to_le_bytes()).contains("bytes"));
            assert!(corrupt(24, &6u64.to_le_bytes()).contains("bytes"));
            assert!(corrupt(24, &(u32::MAX as u64 + 2).to_le_bytes()).contains("2^32"));
            assert!(corrupt(16, &u32::MAX.to_le_bytes()).contains("bytes"));
        }
    }
}
