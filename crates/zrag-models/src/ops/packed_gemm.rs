//! The f32 dense layer's product `lhs · rhs + bias` as an AVX2+FMA kernel over a packed
//! right-hand side (the layer's weight).
//!
//! Why not the `gemm` crate (which the rest of the crate still uses): on this class of CPU
//! (Zen 3, AVX2, 2 cores) the encoder spends ~3/4 of its time in dense layers whose shapes are
//! fixed, `(rows, 384) · (384, 384 | 1152 | 1536)` and `(rows, 1536) · (1536, 384)`, and on a
//! batch's worth of rows a blocking chosen for those shapes beats gemm's general one
//! (1.14–1.16× at 4,096 rows, not below 1,024: [`MIN_ROWS`]; BENCHMARKS.md, "Issue 8").
//! The layout is the textbook (BLIS) one:
//!
//! - the weight is packed once per call into 16-column panels, each `k × 16` contiguous, so the
//!   micro-kernel reads it as one stream (unpacked, its rows are `n` floats apart and a `k`
//!   loop over them lands in two L1 sets);
//! - the rows are cut into blocks of [`ROW_BLOCK`] rows; for each block and each slice of
//!   [`DEPTH_BLOCK`] inner-dimension values, the block's slice of `lhs` is packed as
//!   `depth × 6` panels, and the 6 × 16 micro-kernel sweeps every weight panel over it. The
//!   output block (`ROW_BLOCK × n`) stays in L2 while the depth slices accumulate into it; the
//!   first slice starts from the bias, so the output is never zeroed or pre-filled.
//!
//! Every output value is summed in the same order, `k` ascending within a depth slice and the
//! slices in order, whatever the row count, the row's place in the block or the thread count,
//! so the product does not depend on how many threads ran it (gemm's does).

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use std::mem::MaybeUninit;

use rayon::prelude::*;

/// Columns per weight panel: two 8-lane AVX registers.
const PANEL_COLUMNS: usize = 16;
/// Rows per micro-kernel call: 6 × 2 accumulators + 2 weight registers + 1 broadcast fit the
/// 16 AVX registers.
const KERNEL_ROWS: usize = 6;
/// Rows per block: its output (`24 × 1536` floats at most here, 144 KiB) stays in L2.
pub(crate) const ROW_BLOCK: usize = 24;
/// Inner-dimension values per slice: one weight panel slice is `512 × 16` floats (32 KiB).
const DEPTH_BLOCK: usize = 512;

/// Fewer rows than this go to `gemm`. Measured one thread, the packed kernel (weight packing
/// included) against gemm: 0.50–0.94× at 8–32 rows, 0.92–0.99× at 128–512, 0.97–1.20× at
/// 1,024 and 1.14–1.16× at 4,096 (an encoder batch): it wins where gemm's blocking lets the
/// output fall out of cache.
pub(crate) const MIN_ROWS: usize = 1024;

/// Whether this CPU should run the kernel: AVX2 and FMA, and no AVX-512, where gemm's 512-bit
/// kernels (`x86-v4`) have twice this 256-bit kernel's peak (not measured here: this machine
/// has no AVX-512). Callers use `gemm` otherwise.
pub(crate) fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *AVAILABLE.get_or_init(|| {
            std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
                && !std::arch::is_x86_feature_detected!("avx512f")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// A `(depth, columns)` row-major matrix rearranged into 16-column panels, each `depth × 16`
/// contiguous; the last panel is padded with zeros.
pub(crate) struct PackedRhs {
    data: Vec<f32>,
    depth: usize,
    columns: usize,
}

impl PackedRhs {
    pub(crate) fn pack(rhs: &[f32], depth: usize, columns: usize) -> Self {
        assert_eq!(rhs.len(), depth * columns, "rhs is not depth x columns");
        let panels = columns.div_ceil(PANEL_COLUMNS);
        let mut data = vec![0f32; panels * depth * PANEL_COLUMNS];
        for (panel, packed) in data.chunks_exact_mut(depth * PANEL_COLUMNS).enumerate() {
            let first = panel * PANEL_COLUMNS;
            let width = PANEL_COLUMNS.min(columns - first);
            for (row, packed_row) in packed.chunks_exact_mut(PANEL_COLUMNS).enumerate() {
                let start = row * columns + first;
                packed_row[..width].copy_from_slice(&rhs[start..start + width]);
            }
        }
        Self {
            data,
            depth,
            columns,
        }
    }

    fn panels(&self) -> usize {
        self.columns.div_ceil(PANEL_COLUMNS)
    }

    /// Panel `panel`'s rows `from..` (each 16 floats).
    fn panel_from(&self, panel: usize, from: usize) -> &[f32] {
        let start = (panel * self.depth + from) * PANEL_COLUMNS;
        &self.data[start..(panel + 1) * self.depth * PANEL_COLUMNS]
    }
}

/// `lhs · rhs + bias` for `lhs` `(rows, depth)` row-major and `bias` `(columns)`, as a
/// row-major `(rows, columns)` vector, on up to `threads` threads (row blocks are the unit of
/// work, so the result does not depend on it).
///
/// The first depth slice starts its accumulators from the bias and stores without reading, so
/// the output is written once per slice and never zeroed or pre-filled: for the encoder's
/// widest layer that saves a pass over 24 MiB per batch.
///
/// # Panics
/// If [`available`] is false or the slices do not match the shapes (callers check both).
pub(crate) fn matmul_bias(lhs: &[f32], rhs: &PackedRhs, bias: &[f32], threads: usize) -> Vec<f32> {
    matmul_bias_then(lhs, rhs, bias, threads, |_, _| {})
}

/// [`matmul_bias`], then `finish(first_row, block)` on every finished block of at most
/// [`ROW_BLOCK`] output rows (`block` holds rows `first_row..`, `columns` values each), on the
/// thread that computed it: an element-wise epilogue (activation, residual, layer norm) there
/// reads the block from L2 instead of making another pass over the whole output from memory.
pub(crate) fn matmul_bias_then(
    lhs: &[f32],
    rhs: &PackedRhs,
    bias: &[f32],
    threads: usize,
    finish: impl Fn(usize, &mut [f32]) + Sync,
) -> Vec<f32> {
    assert!(available(), "packed gemm needs AVX2 and FMA");
    let (depth, columns) = (rhs.depth, rhs.columns);
    assert!(depth > 0 && columns > 0, "empty rhs");
    let rows = lhs.len() / depth;
    assert_eq!(lhs.len(), rows * depth, "lhs is not rows x depth");
    assert_eq!(bias.len(), columns, "bias is not columns long");
    // Padded to whole panels, so the kernel can load 16 bias values for the narrow last one.
    let mut padded_bias = bias.to_vec();
    padded_bias.resize(rhs.panels() * PANEL_COLUMNS, 0.0);
    let mut out = Vec::with_capacity(rows * columns);
    let uninit = &mut out.spare_capacity_mut()[..rows * columns];
    let block = |index: usize,
                 (out_block, lhs_block): (&mut [MaybeUninit<f32>], &[f32]),
                 lhs_panels: &mut Vec<f32>| {
        row_block(lhs_block, rhs, &padded_bias, out_block, lhs_panels);
        // SAFETY: `row_block` wrote every value of the block (see `set_len` below), and
        // `MaybeUninit<f32>` has `f32`'s layout.
        let written = unsafe {
            std::slice::from_raw_parts_mut(out_block.as_mut_ptr().cast::<f32>(), out_block.len())
        };
        finish(index * ROW_BLOCK, written);
    };
    if threads > 1 && rows > ROW_BLOCK {
        uninit
            .par_chunks_mut(ROW_BLOCK * columns)
            .zip(lhs.par_chunks(ROW_BLOCK * depth))
            .enumerate()
            .for_each_init(Vec::new, |lhs_panels, (index, item)| {
                block(index, item, lhs_panels)
            });
    } else {
        let mut lhs_panels = Vec::new();
        for (index, item) in uninit
            .chunks_mut(ROW_BLOCK * columns)
            .zip(lhs.chunks(ROW_BLOCK * depth))
            .enumerate()
        {
            block(index, item, &mut lhs_panels);
        }
    }
    // SAFETY: every row block wrote all of its `rows × columns` values (the first depth slice
    // stores each tile whole, the narrow last panel's real columns included).
    unsafe { out.set_len(rows * columns) };
    out
}

/// One block of at most [`ROW_BLOCK`] rows into `out` (written by the first depth slice, then
/// accumulated); `lhs_panels` is scratch for the packed `lhs`.
fn row_block(
    lhs: &[f32],
    rhs: &PackedRhs,
    padded_bias: &[f32],
    out: &mut [MaybeUninit<f32>],
    lhs_panels: &mut Vec<f32>,
) {
    let (depth, columns) = (rhs.depth, rhs.columns);
    let rows = lhs.len() / depth;
    let kernel_calls = rows.div_ceil(KERNEL_ROWS);
    let out = out.as_mut_ptr().cast::<f32>();
    for from in (0..depth).step_by(DEPTH_BLOCK) {
        let slice = DEPTH_BLOCK.min(depth - from);
        pack_lhs(lhs, depth, from, slice, lhs_panels);
        for panel in 0..rhs.panels() {
            let first_column = panel * PANEL_COLUMNS;
            let width = PANEL_COLUMNS.min(columns - first_column);
            let rhs_panel = rhs.panel_from(panel, from);
            let start = (from == 0).then(|| &padded_bias[first_column..][..PANEL_COLUMNS]);
            for call in 0..kernel_calls {
                let first_row = call * KERNEL_ROWS;
                let kernel_rows = KERNEL_ROWS.min(rows - first_row);
                let lhs_panel = &lhs_panels[call * slice * KERNEL_ROWS..][..slice * KERNEL_ROWS];
                // SAFETY: `available()` was checked by `matmul_bias`; `out`
                // holds this block's `rows × columns` values, so the tile's `kernel_rows` rows
                // from `first_row`, `first_column` lie inside it; values are read only after
                // the first slice (`start` is None) has written them.
                let tile = unsafe { out.add(first_row * columns + first_column) };
                // A narrow last panel runs on a full-width copy; only its real columns go back.
                let narrow = width < PANEL_COLUMNS;
                let mut local = [0f32; KERNEL_ROWS * PANEL_COLUMNS];
                let (target, stride) = if narrow {
                    (local.as_mut_ptr(), PANEL_COLUMNS)
                } else {
                    (tile, columns)
                };
                unsafe {
                    if narrow && start.is_none() {
                        copy_rows((tile, columns), (target, stride), kernel_rows, width);
                    }
                    kernel(
                        kernel_rows,
                        slice,
                        lhs_panel,
                        rhs_panel,
                        start,
                        target,
                        stride,
                    );
                    if narrow {
                        copy_rows((target, stride), (tile, columns), kernel_rows, width);
                    }
                }
            }
        }
    }
}

/// Copies `rows` rows of `width` values between strided row-major buffers.
///
/// # Safety
/// Both must address `rows` rows of `width` values at their strides, without overlapping.
unsafe fn copy_rows(
    (from, from_stride): (*const f32, usize),
    (to, to_stride): (*mut f32, usize),
    rows: usize,
    width: usize,
) {
    for row in 0..rows {
        std::ptr::copy_nonoverlapping(from.add(row * from_stride), to.add(row * to_stride), width);
    }
}

/// Packs `lhs[.., from..from + slice]` as consecutive `slice × 6` panels (row-interleaved, the
/// rows past the end zero), one per micro-kernel call.
fn pack_lhs(lhs: &[f32], depth: usize, from: usize, slice: usize, panels: &mut Vec<f32>) {
    let rows = lhs.len() / depth;
    let calls = rows.div_ceil(KERNEL_ROWS);
    // Every value is written below, so the scratch is only resized, never cleared.
    panels.resize(calls * slice * KERNEL_ROWS, 0.0);
    for (call, panel) in panels.chunks_exact_mut(slice * KERNEL_ROWS).enumerate() {
        let first = call * KERNEL_ROWS;
        let lanes = KERNEL_ROWS.min(rows - first);
        let row = |lane: usize| &lhs[(first + lane) * depth + from..][..slice];
        if lanes == KERNEL_ROWS {
            // Six input streams, one sequential output stream.
            let rows = [row(0), row(1), row(2), row(3), row(4), row(5)];
            for (step, packed) in panel.chunks_exact_mut(KERNEL_ROWS).enumerate() {
                for (value, row) in packed.iter_mut().zip(rows) {
                    *value = row[step];
                }
            }
        } else {
            for (step, packed) in panel.chunks_exact_mut(KERNEL_ROWS).enumerate() {
                for (lane, value) in packed.iter_mut().enumerate() {
                    *value = if lane < lanes { row(lane)[step] } else { 0.0 };
                }
            }
        }
    }
}

/// `tile[r][0..16] = start + Σ_k lhs_panel[k][r] · rhs_panel[k][0..16]` for `r < rows`,
/// `start` being `start_from` (16 values, the same for every row) when given and the tile's
/// own values otherwise.
///
/// # Safety
/// The CPU must have AVX2 and FMA; `lhs_panel` must hold `depth × 6` and `rhs_panel` at least
/// `depth × 16` values; `tile` must address `rows` rows of 16 values, `stride` apart, readable
/// unless `start_from` is given.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn kernel(
    rows: usize,
    depth: usize,
    lhs_panel: &[f32],
    rhs_panel: &[f32],
    start_from: Option<&[f32]>,
    tile: *mut f32,
    stride: usize,
) {
    debug_assert!(lhs_panel.len() >= depth * KERNEL_ROWS);
    debug_assert!(rhs_panel.len() >= depth * PANEL_COLUMNS);
    debug_assert!(start_from.is_none_or(|start| start.len() >= PANEL_COLUMNS));
    let (lhs, rhs) = (lhs_panel.as_ptr(), rhs_panel.as_ptr());
    let start = start_from.map(|start| start.as_ptr());
    // One monomorphised loop per row count, so the accumulators stay in registers.
    match rows {
        6 => kernel_rows::<6>(depth, lhs, rhs, start, tile, stride),
        5 => kernel_rows::<5>(depth, lhs, rhs, start, tile, stride),
        4 => kernel_rows::<4>(depth, lhs, rhs, start, tile, stride),
        3 => kernel_rows::<3>(depth, lhs, rhs, start, tile, stride),
        2 => kernel_rows::<2>(depth, lhs, rhs, start, tile, stride),
        _ => kernel_rows::<1>(depth, lhs, rhs, start, tile, stride),
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn kernel(
    _: usize,
    _: usize,
    _: &[f32],
    _: &[f32],
    _: Option<&[f32]>,
    _: *mut f32,
    _: usize,
) {
    unreachable!("available() is false off x86-64");
}

/// # Safety
/// As [`kernel`]; inlined into it, so it is compiled with AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn kernel_rows<const ROWS: usize>(
    depth: usize,
    lhs: *const f32,
    rhs: *const f32,
    start: Option<*const f32>,
    out: *mut f32,
    stride: usize,
) {
    let mut low = [_mm256_setzero_ps(); KERNEL_ROWS];
    let mut high = [_mm256_setzero_ps(); KERNEL_ROWS];
    for row in 0..ROWS {
        let from = match start {
            Some(start) => start,
            None => out.add(row * stride).cast_const(),
        };
        low[row] = _mm256_loadu_ps(from);
        high[row] = _mm256_loadu_ps(from.add(8));
    }
    for step in 0..depth {
        let rhs_low = _mm256_loadu_ps(rhs.add(step * PANEL_COLUMNS));
        let rhs_high = _mm256_loadu_ps(rhs.add(step * PANEL_COLUMNS + 8));
        for row in 0..ROWS {
            let value = _mm256_broadcast_ss(&*lhs.add(step * KERNEL_ROWS + row));
            low[row] = _mm256_fmadd_ps(value, rhs_low, low[row]);
            high[row] = _mm256_fmadd_ps(value, rhs_high, high[row]);
        }
    }
    for row in 0..ROWS {
        _mm256_storeu_ps(out.add(row * stride), low[row]);
        _mm256_storeu_ps(out.add(row * stride + 8), high[row]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(count: usize, seed: usize) -> Vec<f32> {
        (0..count)
            .map(|i| ((i * 7919 + seed * 104_729) % 2003) as f32 / 1001.0 - 1.0)
            .collect()
    }

    /// `lhs · rhs + bias` in f64, the reference.
    fn brute_force(lhs: &[f32], rhs: &[f32], bias: &[f32], depth: usize) -> Vec<f64> {
        let (rows, columns) = (lhs.len() / depth, bias.len());
        let mut expected = Vec::with_capacity(rows * columns);
        for row in 0..rows {
            for column in 0..columns {
                let mut sum = bias[column] as f64;
                for step in 0..depth {
                    sum += lhs[row * depth + step] as f64 * rhs[step * columns + column] as f64;
                }
                expected.push(sum);
            }
        }
        expected
    }

    #[test]
    fn matches_brute_force_on_ragged_shapes() {
        if !available() {
            eprintln!("skipped: no AVX2+FMA");
            return;
        }
        // Rows below, at and past a kernel call and a row block; columns with and without a
        // narrow last panel; depths within one slice and across three.
        for rows in [1, 5, 6, 7, 24, 31, 50] {
            for columns in [1, 15, 16, 17, 40] {
                for depth in [1, 9, 512, 1100] {
                    let lhs = values(rows * depth, 1);
                    let rhs = values(depth * columns, 2);
                    let bias = values(columns, 3);
                    let expected = brute_force(&lhs, &rhs, &bias, depth);
                    let packed = PackedRhs::pack(&rhs, depth, columns);
                    let got = matmul_bias(&lhs, &packed, &bias, 2);
                    assert_eq!(got.len(), expected.len());
                    let tolerance = 1e-5 * depth as f64;
                    for (got, want) in got.iter().zip(&expected) {
                        assert!(
                            (*got as f64 - want).abs() <= tolerance,
                            "{rows}x{depth}x{columns}: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn a_row_sums_to_the_same_bits_alone_in_a_batch_and_on_any_thread_count() {
        if !available() {
            return;
        }
        let (rows, depth, columns) = (53, 1100, 40);
        let lhs = values(rows * depth, 4);
        let packed = PackedRhs::pack(&values(depth * columns, 5), depth, columns);
        let bias = values(columns, 6);
        let batch_one_thread = matmul_bias(&lhs, &packed, &bias, 1);
        let batch_two_threads = matmul_bias(&lhs, &packed, &bias, 2);
        assert_eq!(batch_one_thread, batch_two_threads);
        for row in [0, 29, 52] {
            let alone = matmul_bias(&lhs[row * depth..][..depth], &packed, &bias, 1);
            assert_eq!(alone, batch_one_thread[row * columns..][..columns]);
        }
    }
}
