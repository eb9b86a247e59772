//! LoRA adapters for the generator: a differentiable llama forward to train them, and the
//! adapter file that is merged into the model for inference.
//!
//! SPEC §1 ("Dual training of the LM") trains the generator on L = −Σ_i Σ_j log p_LM(y_i |
//! c_ij ∘ x_i). That needs gradients of teacher-forced log-probabilities, and `llama.rs` has
//! none: it is the inference decoder, on plain f32 buffers and quantised kernels, with KV
//! caches and ragged batches. [`LoraModel`] therefore recomputes the same function (same
//! weights, same RoPE layout, same GQA, same f32 arithmetic up to rounding) on candle tensors
//! with autograd. Only low-rank adapters train (LoRA, Hu et al. 2021): an adapted projection
//! computes `W x + (alpha/r)·B(A x)` with `W` frozen, so the trainable state is a few MB,
//! and the result merges back into `W` for inference at no run-time cost
//! ([`Llama::apply_adapter`], `LocalGenerator::load_with_adapter`).
//!
//! Every op has a backward pass. candle-nn's fused softmax, RMSNorm and RoPE have none, and
//! composing them from primitive ops costs a pass over the activations per primitive in
//! backward, so, as in [`crate::ops`], the heavy steps are custom ops with hand-written
//! backward passes, each tested against its composition from primitive candle ops (values
//! and gradients), and the whole model against `Llama::score` and finite differences:
//! - projections: `x Wᵀ + b (+ (alpha/r)·(x Aᵀ) Bᵀ)`; the backward computes the input's and
//!   the adapter's gradients, never the frozen weight's (candle's matmul backward would: a
//!   third of the step). Frozen weights share the `Llama`'s f32 storage, no copy;
//! - attention: causal, grouped KV heads read in place (no repeated K/V), directly on the
//!   stacked token rows of all pairs, so there is no padding to mask; nothing of size
//!   tokens² is kept for backward, which recomputes the probabilities;
//! - RMSNorm, RoPE (either pair layout, partial `rope_dim`) and SwiGLU: one node each.
//!
//! All pairs of a call run as one batch: every matmul is one 2-D product over the tokens of
//! all pairs. The vocabulary projection, the largest matmul, runs only at the positions that
//! predict a target token. Parallel work runs on candle's CPU worker pool, the one candle's
//! own element-wise ops use, not on rayon: the two pools' spinning workers fought over the
//! cores and made a step about three times slower on two cores.
//!
//! Memory: backward keeps about 1.3 MB of activations per token for SmolLM2-135M (30 layers;
//! 1.0 GB for 786 tokens, measured), on top of the f32 model; callers bound the tokens per
//! step.
//!
//! The adapter file is safetensors: `layers.{l}.{target}.lora_a` `[r, in]` and `.lora_b`
//! `[out, r]` (f32), with the configuration and the base model's shape and weight
//! fingerprint in the header's `__metadata__`, so that an adapter is never merged into a
//! model it was not trained on (a GGUF llama stores Q/K rows permuted relative to the Hugging
//! Face checkpoint of the same model, so even equal shapes are not enough).

use std::collections::BTreeMap;
use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Device, Layout, Shape, Storage, Tensor,
    Var, D,
};
use sha2::{Digest, Sha256};

use super::llama::{Layer, Linear, Llama, LlamaConfig};
use crate::ModelError;

/// `(layer, projection)`: where one adapter sits.
pub(crate) type AdapterSlot = (usize, LoraTarget);

/// A projection of a llama layer that can carry an adapter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LoraTarget {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl LoraTarget {
    pub const ALL: [LoraTarget; 7] = [
        LoraTarget::Q,
        LoraTarget::K,
        LoraTarget::V,
        LoraTarget::O,
        LoraTarget::Gate,
        LoraTarget::Up,
        LoraTarget::Down,
    ];

    /// `q`, `k`, `v`, `o`, `gate`, `up` or `down` (also the name in adapter files).
    pub fn name(self) -> &'static str {
        match self {
            LoraTarget::Q => "q",
            LoraTarget::K => "k",
            LoraTarget::V => "v",
            LoraTarget::O => "o",
            LoraTarget::Gate => "gate",
            LoraTarget::Up => "up",
            LoraTarget::Down => "down",
        }
    }

    fn index(self) -> usize {
        self as usize
    }

    /// `(out, in)` of this projection in a model of shape `c`.
    fn dims(self, c: &BaseShape) -> (usize, usize) {
        let (q_dim, kv_dim) = (c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim);
        match self {
            LoraTarget::Q => (q_dim, c.hidden_size),
            LoraTarget::K | LoraTarget::V => (kv_dim, c.hidden_size),
            LoraTarget::O => (c.hidden_size, q_dim),
            LoraTarget::Gate | LoraTarget::Up => (c.intermediate_size, c.hidden_size),
            LoraTarget::Down => (c.hidden_size, c.intermediate_size),
        }
    }

    pub(crate) fn linear(self, layer: &Layer) -> &Linear {
        match self {
            LoraTarget::Q => &layer.q,
            LoraTarget::K => &layer.k,
            LoraTarget::V => &layer.v,
            LoraTarget::O => &layer.o,
            LoraTarget::Gate => &layer.gate,
            LoraTarget::Up => &layer.up,
            LoraTarget::Down => &layer.down,
        }
    }

    pub(crate) fn linear_mut(self, layer: &mut Layer) -> &mut Linear {
        match self {
            LoraTarget::Q => &mut layer.q,
            LoraTarget::K => &mut layer.k,
            LoraTarget::V => &mut layer.v,
            LoraTarget::O => &mut layer.o,
            LoraTarget::Gate => &mut layer.gate,
            LoraTarget::Up => &mut layer.up,
            LoraTarget::Down => &mut layer.down,
        }
    }
}

impl fmt::Display for LoraTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for LoraTarget {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        LoraTarget::ALL
            .into_iter()
            .find(|t| t.name() == s)
            .ok_or_else(|| {
                format!("unknown LoRA target `{s}` (expected one of q, k, v, o, gate, up, down)")
            })
    }
}

/// Which projections get adapters, and their rank and scale.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    /// r: the inner dimension of `B·A`.
    pub rank: usize,
    /// The update is scaled by `alpha / rank`, so that changing the rank does not change the
    /// effective learning rate much.
    pub alpha: f32,
    /// Adapted projections, in every layer.
    pub targets: Vec<LoraTarget>,
}

impl Default for LoraConfig {
    /// Rank 8, alpha 16, on the query and value projections (the LoRA paper's choice).
    fn default() -> Self {
        LoraConfig {
            rank: 8,
            alpha: 16.0,
            targets: vec![LoraTarget::Q, LoraTarget::V],
        }
    }
}

impl LoraConfig {
    /// `alpha / rank`.
    pub fn scale(&self) -> f32 {
        self.alpha / self.rank as f32
    }

    fn validate(&self) -> Result<(), String> {
        if self.rank == 0 {
            return Err("rank must be positive".into());
        }
        if !self.alpha.is_finite() || self.alpha == 0.0 {
            return Err(format!(
                "alpha must be finite and non-zero, not {}",
                self.alpha
            ));
        }
        if self.targets.is_empty() {
            return Err("no target projections".into());
        }
        let mut seen = self.targets.clone();
        seen.sort();
        seen.dedup();
        if seen.len() != self.targets.len() {
            return Err("a target projection is listed twice".into());
        }
        Ok(())
    }

    /// Targets in canonical order (the order of [`LoraTarget::ALL`]).
    fn sorted_targets(&self) -> Vec<LoraTarget> {
        let mut targets = self.targets.clone();
        targets.sort();
        targets
    }
}

/// The base model an adapter belongs to: the shape its tensors depend on, and a fingerprint
/// of the weights (the config and a strided sample of every weight tensor).
#[derive(Debug, Clone, PartialEq)]
struct BaseShape {
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_layers: usize,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
    rope_dim: usize,
    rope_interleaved: bool,
}

impl BaseShape {
    fn of(c: &LlamaConfig) -> Self {
        BaseShape {
            vocab_size: c.vocab_size,
            hidden_size: c.hidden_size,
            intermediate_size: c.intermediate_size,
            num_layers: c.num_layers,
            num_heads: c.num_heads,
            num_kv_heads: c.num_kv_heads,
            head_dim: c.head_dim,
            rope_dim: c.rope_dim,
            rope_interleaved: c.rope_interleaved,
        }
    }

    /// `(metadata key, value)` of every field, in file order.
    fn fields(&self) -> [(&'static str, String); 9] {
        [
            ("base.vocab_size", self.vocab_size.to_string()),
            ("base.hidden_size", self.hidden_size.to_string()),
            ("base.intermediate_size", self.intermediate_size.to_string()),
            ("base.num_layers", self.num_layers.to_string()),
            ("base.num_heads", self.num_heads.to_string()),
            ("base.num_kv_heads", self.num_kv_heads.to_string()),
            ("base.head_dim", self.head_dim.to_string()),
            ("base.rope_dim", self.rope_dim.to_string()),
            ("base.rope_interleaved", self.rope_interleaved.to_string()),
        ]
    }
}

/// Values hashed per tensor by [`fingerprint`]: enough to tell models apart, cheap for a
/// 500 MB model.
const FINGERPRINT_SAMPLES: usize = 4096;

/// SHA-256 (hex) over the config and a strided sample of every weight tensor of `base`.
/// Errors (as the storage type) if a weight matrix is quantised.
fn fingerprint(base: &Llama) -> Result<String, (String, String)> {
    let mut hasher = Sha256::new();
    let c = base.config();
    for v in [
        c.vocab_size,
        c.hidden_size,
        c.intermediate_size,
        c.num_layers,
        c.num_heads,
        c.num_kv_heads,
        c.head_dim,
        c.rope_dim,
        c.max_positions,
    ] {
        hasher.update((v as u64).to_le_bytes());
    }
    hasher.update(c.rope_theta.to_le_bytes());
    hasher.update(c.rms_norm_eps.to_le_bytes());
    hasher.update([c.rope_interleaved as u8]);
    let sample = |hasher: &mut Sha256, values: &[f32]| {
        let step = (values.len() / FINGERPRINT_SAMPLES).max(1);
        hasher.update((values.len() as u64).to_le_bytes());
        for v in values.iter().step_by(step) {
            hasher.update(v.to_le_bytes());
        }
    };
    let linear =
        |hasher: &mut Sha256, name: String, linear: &Linear| -> Result<(), (String, String)> {
            let weight = linear.f32_weight().map_err(|kind| (name.clone(), kind))?;
            with_f32_data(&weight, |values| sample(hasher, values))
                .map_err(|e| (name, e.to_string()))?;
            if let Some(bias) = linear.bias() {
                sample(hasher, bias);
            }
            Ok(())
        };
    sample(&mut hasher, base.embeddings());
    for (l, layer) in base.layers().iter().enumerate() {
        sample(&mut hasher, &layer.attn_norm);
        sample(&mut hasher, &layer.ffn_norm);
        for target in LoraTarget::ALL {
            linear(
                &mut hasher,
                format!("layer {l} `{target}`"),
                target.linear(layer),
            )?;
        }
    }
    sample(&mut hasher, base.final_norm());
    linear(&mut hasher, "the output layer".into(), base.lm_head())?;
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// The error for a base model whose weights are not f32.
fn quantised_error(path: &Path, (what, kind): (String, String)) -> ModelError {
    ModelError::Config {
        path: path.to_path_buf(),
        field: "base weights".into(),
        message: format!(
            "{what} of the generator is stored as {kind}; LoRA adapters need f32 weights (load \
             the generator with WeightPrecision::F32)"
        ),
    }
}

/// Read access to the data of a contiguous f32 CPU tensor (holds its storage's read lock).
struct F32View<'a> {
    storage: candle_core::StorageRef<'a>,
    start: usize,
    end: usize,
}

impl<'a> F32View<'a> {
    fn new(t: &'a Tensor) -> candle_core::Result<Self> {
        let (storage, layout) = t.storage_and_layout();
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("expected a contiguous tensor");
        };
        if !matches!(&*storage, Storage::Cpu(CpuStorage::F32(_))) {
            candle_core::bail!("expected an f32 CPU tensor");
        }
        Ok(F32View {
            storage,
            start,
            end,
        })
    }

    fn slice(&self) -> &[f32] {
        match &*self.storage {
            Storage::Cpu(CpuStorage::F32(data)) => &data[self.start..self.end],
            _ => unreachable!("checked in F32View::new"),
        }
    }
}

/// Calls `f` with the contiguous f32 data of a CPU tensor.
fn with_f32_data<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> candle_core::Result<R> {
    Ok(f(F32View::new(t)?.slice()))
}

/// The contiguous f32 data of a custom op's input.
fn op_input<'a>(
    storage: &'a CpuStorage,
    layout: &Layout,
    what: &str,
) -> candle_core::Result<&'a [f32]> {
    match (storage, layout.contiguous_offsets()) {
        (CpuStorage::F32(data), Some((start, end))) => Ok(&data[start..end]),
        _ => candle_core::bail!("{what}: expected a contiguous f32 tensor"),
    }
}

/// A matrix operand of [`par_gemm`]: element `(i, j)` at `ptr + i * rs + j * cs`.
#[derive(Clone, Copy)]
struct Mat {
    /// `*const f32` as an address, so that closures holding it can cross threads.
    ptr: usize,
    rs: isize,
    cs: isize,
}

impl Mat {
    /// Row-major with `row_stride` elements between rows.
    fn rows(data: *const f32, row_stride: usize) -> Self {
        Mat {
            ptr: data as usize,
            rs: row_stride as isize,
            cs: 1,
        }
    }

    /// The transpose of a row-major matrix with `row_stride` elements between rows, read in
    /// place.
    fn transposed(data: *const f32, row_stride: usize) -> Self {
        Mat {
            ptr: data as usize,
            rs: 1,
            cs: row_stride as isize,
        }
    }

    fn at(self, row: usize, col: usize) -> *const f32 {
        (self.ptr as *const f32).wrapping_offset(row as isize * self.rs + col as isize * self.cs)
    }

    /// The sub-matrix starting at `(row, col)`.
    fn offset(self, row: usize, col: usize) -> Self {
        Mat {
            ptr: self.at(row, col) as usize,
            ..self
        }
    }
}

/// `dst = beta · lhs · rhs` (`dst += ...` when `accumulate`), `lhs` m×k, `rhs` k×n, `dst` m×n
/// row-major with `dst_rs` elements between rows; single-threaded.
///
/// # Safety
/// Every element addressed through `dst`, `lhs` and `rhs` must be valid, and `dst` must not
/// overlap the operands.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_into(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_rs: usize,
    accumulate: bool,
    lhs: Mat,
    rhs: Mat,
    beta: f32,
) {
    if m == 0 || n == 0 {
        return;
    }
    // SAFETY: the caller's contract.
    unsafe {
        if k == 0 {
            if !accumulate {
                for r in 0..m {
                    std::ptr::write_bytes(dst.add(r * dst_rs), 0, n);
                }
            }
            return;
        }
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            dst_rs as isize,
            accumulate,
            lhs.at(0, 0),
            lhs.cs,
            lhs.rs,
            rhs.at(0, 0),
            rhs.cs,
            rhs.rs,
            1.0,
            beta,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// Output columns (or rows) per unit of work in [`par_gemm`]: wide enough that re-packing the
/// other operand per unit is noise.
const GEMM_BLOCK: usize = 64;

/// [`gemm_into`] on candle's CPU worker pool, in blocks of output columns (or rows, for
/// narrow outputs).
///
/// Not on rayon, as candle's own matmul is: candle's element-wise ops run on that pool, whose
/// workers spin between ops; alternating between the two pools put four busy threads on two
/// cores and made a training step three times slower.
///
/// # Safety
/// As for [`gemm_into`].
#[allow(clippy::too_many_arguments)]
unsafe fn par_gemm(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_rs: usize,
    accumulate: bool,
    lhs: Mat,
    rhs: Mat,
    beta: f32,
) {
    let dst = OutPtr(dst as usize);
    // SAFETY (every call): the caller's contract, restricted to a block of dst.
    let block = move |rows: std::ops::Range<usize>, cols: std::ops::Range<usize>| unsafe {
        gemm_into(
            rows.len(),
            cols.len(),
            k,
            dst.at(rows.start * dst_rs + cols.start),
            dst_rs,
            accumulate,
            lhs.offset(rows.start, 0),
            rhs.offset(0, cols.start),
            beta,
        )
    };
    let pool = candle_core::utils::barrier_pool();
    if n >= 2 * GEMM_BLOCK {
        pool.execute_chunked(n.div_ceil(GEMM_BLOCK), |units| {
            block(
                0..m,
                units.start * GEMM_BLOCK..(units.end * GEMM_BLOCK).min(n),
            )
        });
    } else if m >= 2 * GEMM_BLOCK {
        pool.execute_chunked(m.div_ceil(GEMM_BLOCK), |units| {
            block(
                units.start * GEMM_BLOCK..(units.end * GEMM_BLOCK).min(m),
                0..n,
            )
        });
    } else {
        block(0..m, 0..n);
    }
}

/// A frozen projection `x Wᵀ + b`, optionally with a LoRA update `s·(x Aᵀ) Bᵀ`, as one graph
/// node whose backward computes only what training needs: the input's gradient and the
/// adapter's, never the frozen weight's (candle's matmul backward would, at the cost of a
/// third of the whole step).
#[derive(Clone)]
struct Projection {
    /// `[out, in]`, f32, contiguous; shares the base model's storage.
    weight: Tensor,
    bias: Option<Tensor>,
}

/// [`Projection`] with an adapter: a custom op over `(x, A, B)`.
struct AdaptedProjection {
    projection: Projection,
    scale: f32,
}

impl Projection {
    fn new(weight: Tensor, bias: Option<&[f32]>) -> candle_core::Result<Self> {
        let weight = weight.contiguous()?;
        let bias = bias
            .map(|b| Tensor::from_slice(b, b.len(), &Device::Cpu))
            .transpose()?;
        Ok(Projection { weight, bias })
    }

    /// `x` `(rows, in)` → `(rows, out)`.
    fn forward(
        &self,
        x: &Tensor,
        adapter: Option<(&Var, &Var, f32)>,
    ) -> candle_core::Result<Tensor> {
        let x = x.contiguous()?;
        match adapter {
            None => x.apply_op1(self.clone()),
            Some((a, b, scale)) => x.apply_op3(
                a.as_tensor(),
                b.as_tensor(),
                AdaptedProjection {
                    projection: self.clone(),
                    scale,
                },
            ),
        }
    }

    /// `(out, in)`.
    fn dims(&self) -> candle_core::Result<(usize, usize)> {
        self.weight.dims2()
    }

    /// `x Wᵀ + b` (+ `scale · (x Aᵀ) Bᵀ` when `lora` is `(A, B, rank, scale)`).
    fn compute(
        &self,
        x: &[f32],
        rows: usize,
        lora: Option<(&[f32], &[f32], usize, f32)>,
    ) -> candle_core::Result<Vec<f32>> {
        let (out_dim, in_dim) = self.dims()?;
        if x.len() != rows * in_dim {
            candle_core::bail!(
                "projection: input of {} values, expected {rows} x {in_dim}",
                x.len()
            );
        }
        let weight = F32View::new(&self.weight)?;
        let mut out = vec![0f32; rows * out_dim];
        if let Some(bias) = &self.bias {
            let bias = F32View::new(bias)?;
            for row in out.chunks_exact_mut(out_dim) {
                row.copy_from_slice(bias.slice());
            }
        }
        // SAFETY: x is rows x in_dim, W out_dim x in_dim (read as Wᵀ), out rows x out_dim.
        unsafe {
            par_gemm(
                rows,
                out_dim,
                in_dim,
                out.as_mut_ptr(),
                out_dim,
                self.bias.is_some(),
                Mat::rows(x.as_ptr(), in_dim),
                Mat::transposed(weight.slice().as_ptr(), in_dim),
                1.0,
            );
        }
        if let Some((a, b, rank, scale)) = lora {
            let xa = lora_down(x, rows, in_dim, a, rank)?;
            // SAFETY: xa is rows x rank, B out_dim x rank (read as Bᵀ).
            unsafe {
                par_gemm(
                    rows,
                    out_dim,
                    rank,
                    out.as_mut_ptr(),
                    out_dim,
                    true,
                    Mat::rows(xa.as_ptr(), rank),
                    Mat::transposed(b.as_ptr(), rank),
                    scale,
                );
            }
        }
        Ok(out)
    }

    /// `grad W`: the input's gradient through the frozen weight.
    fn input_grad(&self, grad: &[f32], rows: usize) -> candle_core::Result<Vec<f32>> {
        let (out_dim, in_dim) = self.dims()?;
        let weight = F32View::new(&self.weight)?;
        let mut dx = vec![0f32; rows * in_dim];
        // SAFETY: grad is rows x out_dim, W out_dim x in_dim, dx rows x in_dim.
        unsafe {
            par_gemm(
                rows,
                in_dim,
                out_dim,
                dx.as_mut_ptr(),
                in_dim,
                false,
                Mat::rows(grad.as_ptr(), out_dim),
                Mat::rows(weight.slice().as_ptr(), in_dim),
                1.0,
            );
        }
        Ok(dx)
    }
}

/// `x Aᵀ`: `(rows, rank)`.
fn lora_down(
    x: &[f32],
    rows: usize,
    in_dim: usize,
    a: &[f32],
    rank: usize,
) -> candle_core::Result<Vec<f32>> {
    if a.len() != rank * in_dim {
        candle_core::bail!("LoRA A of {} values, expected {rank} x {in_dim}", a.len());
    }
    let mut xa = vec![0f32; rows * rank];
    // SAFETY: x is rows x in_dim, A rank x in_dim (read as Aᵀ), xa rows x rank.
    unsafe {
        par_gemm(
            rows,
            rank,
            in_dim,
            xa.as_mut_ptr(),
            rank,
            false,
            Mat::rows(x.as_ptr(), in_dim),
            Mat::transposed(a.as_ptr(), in_dim),
            1.0,
        );
    }
    Ok(xa)
}

impl CustomOp1 for Projection {
    fn name(&self) -> &'static str {
        "zrag-frozen-projection"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = op_input(storage, layout, "projection input")?;
        let (rows, _) = layout.shape().dims2()?;
        let out = self.compute(x, rows, None)?;
        Ok((CpuStorage::F32(out), Shape::from((rows, self.dims()?.0))))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let grad = grad.contiguous()?;
        let (rows, _) = x.dims2()?;
        let dx = self.input_grad(F32View::new(&grad)?.slice(), rows)?;
        Ok(Some(Tensor::from_vec(dx, x.shape(), &Device::Cpu)?))
    }
}

impl CustomOp3 for AdaptedProjection {
    fn name(&self) -> &'static str {
        "zrag-lora-projection"
    }

    fn cpu_fwd(
        &self,
        x_storage: &CpuStorage,
        x_layout: &Layout,
        a_storage: &CpuStorage,
        a_layout: &Layout,
        b_storage: &CpuStorage,
        b_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = op_input(x_storage, x_layout, "projection input")?;
        let a = op_input(a_storage, a_layout, "LoRA A")?;
        let b = op_input(b_storage, b_layout, "LoRA B")?;
        let (rows, _) = x_layout.shape().dims2()?;
        let (rank, _) = a_layout.shape().dims2()?;
        let (out_dim, b_rank) = b_layout.shape().dims2()?;
        if b_rank != rank || out_dim != self.projection.dims()?.0 {
            candle_core::bail!(
                "LoRA B {:?} does not fit A {:?} and the weight {:?}",
                b_layout.shape(),
                a_layout.shape(),
                self.projection.weight.shape()
            );
        }
        let out = self
            .projection
            .compute(x, rows, Some((a, b, rank, self.scale)))?;
        Ok((CpuStorage::F32(out), Shape::from((rows, out_dim))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (x, a, b, grad) = (
            x.contiguous()?,
            a.contiguous()?,
            b.contiguous()?,
            grad.contiguous()?,
        );
        let (xv, av, bv, gv) = (
            F32View::new(&x)?,
            F32View::new(&a)?,
            F32View::new(&b)?,
            F32View::new(&grad)?,
        );
        let (x_s, a_s, b_s, g_s) = (xv.slice(), av.slice(), bv.slice(), gv.slice());
        let (rows, in_dim) = x.dims2()?;
        let (out_dim, rank) = b.dims2()?;
        let s = self.scale;

        let mut dx = self.projection.input_grad(g_s, rows)?;
        // g B: (rows, rank), shared by the three adapter terms.
        let mut gb = vec![0f32; rows * rank];
        let xa = lora_down(x_s, rows, in_dim, a_s, rank)?;
        let mut da = vec![0f32; rank * in_dim];
        let mut db = vec![0f32; out_dim * rank];
        // SAFETY: every operand is a contiguous row-major buffer of the stated shape: g
        // rows x out, B out x rank, A rank x in, x rows x in, xa rows x rank.
        unsafe {
            par_gemm(
                rows,
                rank,
                out_dim,
                gb.as_mut_ptr(),
                rank,
                false,
                Mat::rows(g_s.as_ptr(), out_dim),
                Mat::rows(b_s.as_ptr(), rank),
                1.0,
            );
            // dx += s (g B) A
            par_gemm(
                rows,
                in_dim,
                rank,
                dx.as_mut_ptr(),
                in_dim,
                true,
                Mat::rows(gb.as_ptr(), rank),
                Mat::rows(a_s.as_ptr(), in_dim),
                s,
            );
            // dA = s (g B)ᵀ x
            par_gemm(
                rank,
                in_dim,
                rows,
                da.as_mut_ptr(),
                in_dim,
                false,
                Mat::transposed(gb.as_ptr(), rank),
                Mat::rows(x_s.as_ptr(), in_dim),
                s,
            );
            // dB = s gᵀ (x Aᵀ)
            par_gemm(
                out_dim,
                rank,
                rows,
                db.as_mut_ptr(),
                rank,
                false,
                Mat::transposed(g_s.as_ptr(), out_dim),
                Mat::rows(xa.as_ptr(), rank),
                s,
            );
        }
        let dev = &Device::Cpu;
        Ok((
            Some(Tensor::from_vec(dx, (rows, in_dim), dev)?),
            Some(Tensor::from_vec(da, (rank, in_dim), dev)?),
            Some(Tensor::from_vec(db, (out_dim, rank), dev)?),
        ))
    }
}

/// Causal multi-head attention with grouped KV heads over stacked, unpadded sequences, as one
/// graph node.
///
/// Inputs are the stacked rows of every sequence: `q` `(tokens, heads * hd)`, `k` and `v`
/// `(tokens, kv_heads * hd)` (RoPE applied); query head `h` reads KV head `h / (heads /
/// kv_heads)`, as in `Llama`. Each (sequence, head) is one task on candle's worker pool: its
/// scores, causal softmax and context, with single-threaded gemms reading the heads in place.
/// Nothing of size `tokens²` is kept for backward, which recomputes the probabilities (as
/// flash attention does) and runs one task per (sequence, KV head), so that the heads sharing
/// a KV head accumulate their key and value gradients without races.
struct CausalAttention {
    /// `(first row, length)` of each sequence.
    sequences: Arc<Vec<(usize, usize)>>,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
}

/// A raw pointer that tasks on other threads write disjoint blocks through.
#[derive(Clone, Copy)]
struct OutPtr(usize);

impl OutPtr {
    fn new(data: &mut [f32]) -> Self {
        OutPtr(data.as_mut_ptr() as usize)
    }

    fn at(self, offset: usize) -> *mut f32 {
        (self.0 as *mut f32).wrapping_add(offset)
    }
}

impl CausalAttention {
    fn scale(&self) -> f32 {
        1.0 / (self.head_dim as f32).sqrt()
    }

    /// Fills `probs` (len x len) with the causal softmax of `scale · Q_h K_gᵀ`, zero above the
    /// diagonal; `q` is the sequence's `Q_h` (len x hd), `k_t` its `K_gᵀ` (hd x len).
    ///
    /// # Safety
    /// `q` and `k_t` must address valid matrices of those shapes.
    unsafe fn probabilities(&self, probs: &mut [f32], len: usize, q: Mat, k_t: Mat) {
        // SAFETY: the caller's contract; probs is len x len.
        unsafe {
            gemm_into(
                len,
                len,
                self.head_dim,
                probs.as_mut_ptr(),
                len,
                false,
                q,
                k_t,
                1.0,
            );
        }
        let scale = self.scale();
        for (i, row) in probs.chunks_exact_mut(len).enumerate() {
            let (visible, hidden) = row.split_at_mut(i + 1);
            let max = visible
                .iter()
                .fold(f32::NEG_INFINITY, |m, &v| m.max(v * scale));
            let mut total = 0.0f32;
            for v in visible.iter_mut() {
                *v = (*v * scale - max).exp();
                total += *v;
            }
            let inv = 1.0 / total;
            for v in visible.iter_mut() {
                *v *= inv;
            }
            hidden.fill(0.0);
        }
    }

    fn check(&self, q: &Layout, k: &Layout, v: &Layout) -> candle_core::Result<usize> {
        let (tokens, q_width) = q.shape().dims2()?;
        let kv_width = self.kv_heads * self.head_dim;
        let total: usize = self.sequences.iter().map(|&(_, len)| len).sum();
        if q_width != self.heads * self.head_dim
            || k.shape().dims2()? != (tokens, kv_width)
            || v.shape().dims2()? != (tokens, kv_width)
            || total != tokens
            || !self.heads.is_multiple_of(self.kv_heads)
        {
            candle_core::bail!(
                "attention: q {:?}, k {:?}, v {:?} do not fit {} heads, {} KV heads of {} over \
                 {total} tokens",
                q.shape(),
                k.shape(),
                v.shape(),
                self.heads,
                self.kv_heads,
                self.head_dim
            );
        }
        Ok(tokens)
    }
}

impl CustomOp3 for CausalAttention {
    fn name(&self) -> &'static str {
        "zrag-causal-attention"
    }

    fn cpu_fwd(
        &self,
        q_storage: &CpuStorage,
        q_layout: &Layout,
        k_storage: &CpuStorage,
        k_layout: &Layout,
        v_storage: &CpuStorage,
        v_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let tokens = self.check(q_layout, k_layout, v_layout)?;
        let q = op_input(q_storage, q_layout, "attention q")?;
        let k = op_input(k_storage, k_layout, "attention k")?;
        let v = op_input(v_storage, v_layout, "attention v")?;
        let (hd, heads) = (self.head_dim, self.heads);
        let (q_row, kv_row) = (heads * hd, self.kv_heads * hd);
        let group = heads / self.kv_heads;
        let mut out = vec![0f32; tokens * q_row];
        let out_ptr = OutPtr::new(&mut out);
        let (q_addr, k_addr, v_addr) = (
            q.as_ptr() as usize,
            k.as_ptr() as usize,
            v.as_ptr() as usize,
        );
        let task = |t: usize| {
            let (start, len) = self.sequences[t / heads];
            let (h, g) = (t % heads, (t % heads) / group);
            let (q_offset, kv_offset) = (start * q_row + h * hd, start * kv_row + g * hd);
            let q = Mat::rows((q_addr as *const f32).wrapping_add(q_offset), q_row);
            let k_t = Mat::transposed((k_addr as *const f32).wrapping_add(kv_offset), kv_row);
            let v = Mat::rows((v_addr as *const f32).wrapping_add(kv_offset), kv_row);
            let mut probs = vec![0f32; len * len];
            // SAFETY: the sequence's rows lie inside q, k, v and out (checked: the lengths
            // sum to the row count); each task writes only its own (sequence, head) block.
            unsafe {
                self.probabilities(&mut probs, len, q, k_t);
                gemm_into(
                    len,
                    hd,
                    len,
                    out_ptr.at(q_offset),
                    q_row,
                    false,
                    Mat::rows(probs.as_ptr(), len),
                    v,
                    1.0,
                );
            }
        };
        candle_core::utils::barrier_pool()
            .execute_chunked(self.sequences.len() * heads, |tasks| tasks.for_each(task));
        Ok((CpuStorage::F32(out), Shape::from((tokens, q_row))))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (q, k, v, grad) = (
            q.contiguous()?,
            k.contiguous()?,
            v.contiguous()?,
            grad.contiguous()?,
        );
        let tokens = self.check(q.layout(), k.layout(), v.layout())?;
        let (qv, kv, vv, gv) = (
            F32View::new(&q)?,
            F32View::new(&k)?,
            F32View::new(&v)?,
            F32View::new(&grad)?,
        );
        let (hd, heads, kv_heads) = (self.head_dim, self.heads, self.kv_heads);
        let (q_row, kv_row) = (heads * hd, kv_heads * hd);
        let group = heads / kv_heads;
        let scale = self.scale();
        let mut dq = vec![0f32; tokens * q_row];
        let mut dk = vec![0f32; tokens * kv_row];
        let mut dv = vec![0f32; tokens * kv_row];
        let (dq_ptr, dk_ptr, dv_ptr) = (
            OutPtr::new(&mut dq),
            OutPtr::new(&mut dk),
            OutPtr::new(&mut dv),
        );
        let addr = |view: &F32View| view.slice().as_ptr() as usize;
        let (q_addr, k_addr, v_addr, g_addr) = (addr(&qv), addr(&kv), addr(&vv), addr(&gv));
        let task = |t: usize| {
            let (start, len) = self.sequences[t / kv_heads];
            let g = t % kv_heads;
            let kv_offset = start * kv_row + g * hd;
            let k = Mat::rows((k_addr as *const f32).wrapping_add(kv_offset), kv_row);
            let k_t = Mat::transposed((k_addr as *const f32).wrapping_add(kv_offset), kv_row);
            let v_t = Mat::transposed((v_addr as *const f32).wrapping_add(kv_offset), kv_row);
            let mut probs = vec![0f32; len * len];
            let mut dprobs = vec![0f32; len * len];
            for h in g * group..(g + 1) * group {
                let q_offset = start * q_row + h * hd;
                let q = Mat::rows((q_addr as *const f32).wrapping_add(q_offset), q_row);
                let dout = Mat::rows((g_addr as *const f32).wrapping_add(q_offset), q_row);
                // SAFETY: as in the forward pass; each task writes only the rows of its
                // sequence in the columns of its KV head (dk, dv) and of that KV head's query
                // heads (dq).
                unsafe {
                    self.probabilities(&mut probs, len, q, k_t);
                    // dV_g += Pᵀ dO_h
                    gemm_into(
                        len,
                        hd,
                        len,
                        dv_ptr.at(kv_offset),
                        kv_row,
                        true,
                        Mat::transposed(probs.as_ptr(), len),
                        dout,
                        1.0,
                    );
                    // dP = dO_h V_gᵀ
                    gemm_into(
                        len,
                        len,
                        hd,
                        dprobs.as_mut_ptr(),
                        len,
                        false,
                        dout,
                        v_t,
                        1.0,
                    );
                }
                // dS = scale · P ∘ (dP − rowsum(P ∘ dP)), zero above the diagonal.
                for (i, (p_row, d_row)) in probs
                    .chunks_exact(len)
                    .zip(dprobs.chunks_exact_mut(len))
                    .enumerate()
                {
                    let dot: f32 = p_row[..=i]
                        .iter()
                        .zip(&d_row[..=i])
                        .map(|(p, d)| p * d)
                        .sum();
                    for (d, &p) in d_row[..=i].iter_mut().zip(&p_row[..=i]) {
                        *d = scale * p * (*d - dot);
                    }
                    d_row[i + 1..].fill(0.0);
                }
                // SAFETY: as above.
                unsafe {
                    // dQ_h = dS K_g
                    gemm_into(
                        len,
                        hd,
                        len,
                        dq_ptr.at(q_offset),
                        q_row,
                        false,
                        Mat::rows(dprobs.as_ptr(), len),
                        k,
                        1.0,
                    );
                    // dK_g += dSᵀ Q_h
                    gemm_into(
                        len,
                        hd,
                        len,
                        dk_ptr.at(kv_offset),
                        kv_row,
                        true,
                        Mat::transposed(dprobs.as_ptr(), len),
                        q,
                        1.0,
                    );
                }
            }
        };
        candle_core::utils::barrier_pool()
            .execute_chunked(self.sequences.len() * kv_heads, |tasks| {
                tasks.for_each(task)
            });
        let dev = &Device::Cpu;
        Ok((
            Some(Tensor::from_vec(dq, (tokens, q_row), dev)?),
            Some(Tensor::from_vec(dk, (tokens, kv_row), dev)?),
            Some(Tensor::from_vec(dv, (tokens, kv_row), dev)?),
        ))
    }
}

/// Below this many values an element-wise kernel runs on the calling thread: waking candle's
/// pool costs more than it saves (candle uses the same threshold).
const PAR_MIN_VALUES: usize = 64 * 1024;

/// Calls `f(row, out_row)` for every `width`-long row of `out`, on candle's worker pool when
/// `out` is large.
fn par_rows(out: &mut [f32], width: usize, f: impl Fn(usize, &mut [f32]) + Sync) {
    let rows = out.len() / width.max(1);
    let ptr = OutPtr::new(out);
    let run = |range: std::ops::Range<usize>| {
        for r in range {
            // SAFETY: rows are disjoint `width`-long slices of `out`, which outlives the call.
            let row = unsafe { std::slice::from_raw_parts_mut(ptr.at(r * width), width) };
            f(r, row);
        }
    };
    if rows * width < PAR_MIN_VALUES {
        run(0..rows);
    } else {
        candle_core::utils::barrier_pool().execute_chunked(rows, run);
    }
}

/// RMSNorm with a frozen weight, `x / sqrt(mean(x²) + eps) * w` per row, as one graph node
/// (the mean of squares in f64, as `Llama` computes it).
#[derive(Clone)]
struct RmsNorm {
    weight: Arc<Vec<f32>>,
    eps: f32,
}

impl RmsNorm {
    /// 1 / sqrt(mean(x²) + eps).
    fn inv_rms(&self, x: &[f32]) -> f32 {
        let mean_square = x.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>() / x.len() as f64;
        (1.0 / (mean_square + self.eps as f64).sqrt()) as f32
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        x.contiguous()?.apply_op1(self.clone())
    }
}

impl CustomOp1 for RmsNorm {
    fn name(&self) -> &'static str {
        "zrag-rms-norm"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = op_input(storage, layout, "rms-norm input")?;
        let width = self.weight.len();
        if layout.shape().dims2()?.1 != width {
            candle_core::bail!("rms-norm: input {:?}, weight of {width}", layout.shape());
        }
        let mut out = vec![0f32; x.len()];
        par_rows(&mut out, width, |r, out| {
            let x = &x[r * width..(r + 1) * width];
            let inv = self.inv_rms(x);
            for ((o, &v), &w) in out.iter_mut().zip(x).zip(self.weight.iter()) {
                *o = v * inv * w;
            }
        });
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let (x, grad) = (x.contiguous()?, grad.contiguous()?);
        let (xv, gv) = (F32View::new(&x)?, F32View::new(&grad)?);
        let (x_s, g_s) = (xv.slice(), gv.slice());
        let width = self.weight.len();
        let mut dx = vec![0f32; x_s.len()];
        // y_i = x_i r w_i with r = (mean(x²) + eps)^(-1/2), so
        // dx_j = r w_j g_j − x_j r³ (Σ_i g_i w_i x_i) / width.
        par_rows(&mut dx, width, |r, dx| {
            let x = &x_s[r * width..(r + 1) * width];
            let g = &g_s[r * width..(r + 1) * width];
            let inv = self.inv_rms(x);
            let dot: f32 = g
                .iter()
                .zip(x)
                .zip(self.weight.iter())
                .map(|((g, x), w)| g * w * x)
                .sum();
            let c = inv * inv * inv * dot / width as f32;
            for (((d, &g), &x), &w) in dx.iter_mut().zip(g).zip(x).zip(self.weight.iter()) {
                *d = inv * w * g - x * c;
            }
        });
        Ok(Some(Tensor::from_vec(dx, x.shape(), &Device::Cpu)?))
    }
}

/// Rotary position embedding of `(tokens, heads * head_dim)` rows, as one graph node:
/// rotates the first `rope_dim` dimensions of each head by each token's angles, pairing
/// adjacent dimensions when `interleaved` (GGUF llama) and the two halves otherwise, exactly
/// as `Llama` does. Its backward is the inverse rotation.
#[derive(Clone)]
struct Rope {
    /// `[token][pair]`.
    cos: Arc<Vec<f32>>,
    sin: Arc<Vec<f32>>,
    head_dim: usize,
    rope_dim: usize,
    interleaved: bool,
}

impl Rope {
    /// Rotates every head of `x` into `out` by the angles of its row (by minus the angles
    /// when `inverse`).
    fn rotate(&self, x: &[f32], out: &mut [f32], width: usize, inverse: bool) {
        let half = self.rope_dim / 2;
        let sign = if inverse { -1.0 } else { 1.0 };
        par_rows(out, width, |t, out| {
            let x = &x[t * width..(t + 1) * width];
            out.copy_from_slice(x);
            let (cos, sin) = (
                &self.cos[t * half..(t + 1) * half],
                &self.sin[t * half..(t + 1) * half],
            );
            for (out, x) in out
                .chunks_exact_mut(self.head_dim)
                .zip(x.chunks_exact(self.head_dim))
            {
                for i in 0..half {
                    let (a, b) = if self.interleaved {
                        (2 * i, 2 * i + 1)
                    } else {
                        (i, i + half)
                    };
                    let (c, s) = (cos[i], sign * sin[i]);
                    out[a] = x[a] * c - x[b] * s;
                    out[b] = x[a] * s + x[b] * c;
                }
            }
        });
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        x.contiguous()?.apply_op1(self.clone())
    }
}

impl CustomOp1 for Rope {
    fn name(&self) -> &'static str {
        "zrag-rope"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = op_input(storage, layout, "rope input")?;
        let (tokens, width) = layout.shape().dims2()?;
        if width % self.head_dim != 0 || self.cos.len() != tokens * (self.rope_dim / 2) {
            candle_core::bail!("rope: input {:?} does not fit the tables", layout.shape());
        }
        let mut out = vec![0f32; x.len()];
        self.rotate(x, &mut out, width, false);
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let grad = grad.contiguous()?;
        let (_, width) = x.dims2()?;
        let mut dx = vec![0f32; x.elem_count()];
        self.rotate(F32View::new(&grad)?.slice(), &mut dx, width, true);
        Ok(Some(Tensor::from_vec(dx, x.shape(), &Device::Cpu)?))
    }
}

/// The SwiGLU gate `silu(g) · u` as one graph node.
struct SwiGlu;

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "zrag-swiglu"
    }

    fn cpu_fwd(
        &self,
        g_storage: &CpuStorage,
        g_layout: &Layout,
        u_storage: &CpuStorage,
        u_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = op_input(g_storage, g_layout, "swiglu gate")?;
        let u = op_input(u_storage, u_layout, "swiglu up")?;
        if g_layout.shape() != u_layout.shape() {
            candle_core::bail!("swiglu: {:?} vs {:?}", g_layout.shape(), u_layout.shape());
        }
        let width = g_layout.shape().dims().last().copied().unwrap_or(1);
        let mut out = vec![0f32; g.len()];
        par_rows(&mut out, width, |r, out| {
            let span = r * width..(r + 1) * width;
            for ((o, &g), &u) in out.iter_mut().zip(&g[span.clone()]).zip(&u[span]) {
                *o = g * sigmoid(g) * u;
            }
        });
        Ok((CpuStorage::F32(out), g_layout.shape().clone()))
    }

    fn bwd(
        &self,
        g: &Tensor,
        u: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (g, u, grad) = (g.contiguous()?, u.contiguous()?, grad.contiguous()?);
        let (gv, uv, dv) = (F32View::new(&g)?, F32View::new(&u)?, F32View::new(&grad)?);
        let (g_s, u_s, d_s) = (gv.slice(), uv.slice(), dv.slice());
        let width = g.dims().last().copied().unwrap_or(1);
        // Both gradients in one buffer, rows [dg | du], so one parallel pass fills them.
        let mut both = vec![0f32; 2 * g_s.len()];
        par_rows(&mut both, 2 * width, |r, out| {
            let span = r * width..(r + 1) * width;
            let (dg, du) = out.split_at_mut(width);
            for ((((dg, du), &g), &u), &d) in dg
                .iter_mut()
                .zip(du.iter_mut())
                .zip(&g_s[span.clone()])
                .zip(&u_s[span.clone()])
                .zip(&d_s[span])
            {
                let s = sigmoid(g);
                *dg = d * u * s * (1.0 + g * (1.0 - s));
                *du = d * g * s;
            }
        });
        let rows = g_s.len() / width.max(1);
        let both = Tensor::from_vec(both, (rows, 2 * width), &Device::Cpu)?;
        Ok((
            Some(both.narrow(1, 0, width)?.reshape(g.shape())?),
            Some(both.narrow(1, width, width)?.reshape(u.shape())?),
        ))
    }
}

struct FrozenLayer {
    attn_norm: RmsNorm,
    ffn_norm: RmsNorm,
    /// Indexed by [`LoraTarget::index`].
    projections: Vec<Projection>,
}

/// One adapted projection's trainable pair.
struct AdapterPair {
    /// `[r, in]`.
    a: Var,
    /// `[out, r]`.
    b: Var,
}

/// A frozen f32 copy of a llama model plus trainable LoRA adapters, with a differentiable
/// teacher-forced forward pass.
pub struct LoraModel {
    base_config: LlamaConfig,
    shape: BaseShape,
    fingerprint: String,
    lora: LoraConfig,
    /// `[vocab, hidden]`; the output layer's tensor itself when the model ties them.
    embeddings: Tensor,
    layers: Vec<FrozenLayer>,
    final_norm: RmsNorm,
    lm_head: Projection,
    inv_freq: Vec<f32>,
    /// Per layer, indexed by [`LoraTarget::index`].
    adapters: Vec<Vec<Option<AdapterPair>>>,
}

/// SplitMix64, for reproducible adapter initialisation.
struct SplitMix(u64);

impl SplitMix {
    fn next_f32(&mut self) -> f32 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 40) as f32 / (1u64 << 24) as f32
    }
}

/// Where errors about the model's inputs point.
const LORA_SOURCE: &str = "<lora model>";

fn input_error(field: &str, message: String) -> ModelError {
    ModelError::Config {
        path: LORA_SOURCE.into(),
        field: field.into(),
        message,
    }
}

impl LoraModel {
    /// Adapters of `config` on every layer of `base` (which must have f32 weights), `A`
    /// uniform in ±1/√in (PEFT's Kaiming-uniform default) from `seed`, `B = 0`, so the model
    /// starts out computing exactly the base model.
    pub fn new(base: &Llama, config: LoraConfig, seed: u64) -> Result<Self, ModelError> {
        config
            .validate()
            .map_err(|message| input_error("lora config", message))?;
        let shape = BaseShape::of(base.config());
        let mut rng = SplitMix(seed);
        let rank = config.rank;
        let mut pairs = BTreeMap::new();
        for l in 0..shape.num_layers {
            for target in config.sorted_targets() {
                let (out_dim, in_dim) = target.dims(&shape);
                let bound = 1.0 / (in_dim as f32).sqrt();
                let a: Vec<f32> = (0..rank * in_dim)
                    .map(|_| (2.0 * rng.next_f32() - 1.0) * bound)
                    .collect();
                let a = Tensor::from_vec(a, (rank, in_dim), &Device::Cpu)?;
                let b = Tensor::zeros((out_dim, rank), DType::F32, &Device::Cpu)?;
                pairs.insert((l, target), (a, b));
            }
        }
        Self::build(base, config, &pairs, Path::new(LORA_SOURCE))
    }

    /// Resumes training from an adapter file saved by [`LoraModel::save_adapter`]; `base`
    /// must be the model it was trained on.
    pub fn from_adapter(base: &Llama, adapter: &Path) -> Result<Self, ModelError> {
        let adapter = LoraAdapter::load(adapter)?;
        adapter.check_base(base)?;
        Self::build(
            base,
            adapter.config.clone(),
            &adapter.weights,
            &adapter.source,
        )
    }

    fn build(
        base: &Llama,
        lora: LoraConfig,
        pairs: &BTreeMap<AdapterSlot, (Tensor, Tensor)>,
        source: &Path,
    ) -> Result<Self, ModelError> {
        let base_config = base.config().clone();
        let shape = BaseShape::of(&base_config);
        let fingerprint = fingerprint(base).map_err(|e| quantised_error(source, e))?;
        let frozen = |linear: &Linear| -> Result<Projection, ModelError> {
            // fingerprint() already refused quantised weights.
            let weight = linear
                .f32_weight()
                .map_err(|kind| quantised_error(source, ("a weight".into(), kind)))?;
            Ok(Projection::new(weight, linear.bias())?)
        };
        let norm = |weight: &[f32]| RmsNorm {
            weight: Arc::new(weight.to_vec()),
            eps: base_config.rms_norm_eps,
        };
        let mut layers = Vec::with_capacity(base.layers().len());
        for layer in base.layers() {
            layers.push(FrozenLayer {
                attn_norm: norm(&layer.attn_norm),
                ffn_norm: norm(&layer.ffn_norm),
                projections: LoraTarget::ALL
                    .iter()
                    .map(|t| frozen(t.linear(layer)))
                    .collect::<Result<_, _>>()?,
            });
        }
        let lm_head = frozen(base.lm_head())?;
        // A model with tied embeddings holds the same table twice in `Llama`; share the
        // output layer's tensor rather than make a third copy.
        let tied = with_f32_data(&lm_head.weight, |w| w == base.embeddings())?;
        let embeddings = if tied && lm_head.bias.is_none() {
            lm_head.weight.clone()
        } else {
            Tensor::from_slice(
                base.embeddings(),
                (base_config.vocab_size, base_config.hidden_size),
                &Device::Cpu,
            )?
        };
        let mut adapters: Vec<Vec<Option<AdapterPair>>> = (0..base_config.num_layers)
            .map(|_| (0..LoraTarget::ALL.len()).map(|_| None).collect())
            .collect();
        for (&(l, target), (a, b)) in pairs {
            adapters[l][target.index()] = Some(AdapterPair {
                a: Var::from_tensor(a)?,
                b: Var::from_tensor(b)?,
            });
        }
        Ok(LoraModel {
            shape,
            fingerprint,
            lora,
            embeddings,
            layers,
            final_norm: norm(base.final_norm()),
            lm_head,
            inv_freq: base.inv_freq().to_vec(),
            adapters,
            base_config,
        })
    }

    pub fn config(&self) -> &LoraConfig {
        &self.lora
    }

    pub fn base_config(&self) -> &LlamaConfig {
        &self.base_config
    }

    /// The trainable parameters (every adapter's `A` then `B`, by layer and target); nothing
    /// of the base model. Updating them (e.g. with an optimiser) updates the model.
    pub fn vars(&self) -> Vec<Var> {
        self.pairs()
            .flat_map(|(_, _, pair)| [pair.a.clone(), pair.b.clone()])
            .collect()
    }

    fn pairs(&self) -> impl Iterator<Item = (usize, LoraTarget, &AdapterPair)> {
        self.adapters.iter().enumerate().flat_map(|(l, layer)| {
            LoraTarget::ALL
                .iter()
                .filter_map(move |&t| layer[t.index()].as_ref().map(|p| (l, t, p)))
        })
    }

    /// A snapshot of the current adapters (copied: later training does not change it).
    pub fn adapter(&self) -> Result<LoraAdapter, ModelError> {
        let mut weights = BTreeMap::new();
        for (l, target, pair) in self.pairs() {
            weights.insert(
                (l, target),
                (pair.a.as_tensor().copy()?, pair.b.as_tensor().copy()?),
            );
        }
        Ok(LoraAdapter {
            config: self.lora.clone(),
            shape: self.shape.clone(),
            fingerprint: self.fingerprint.clone(),
            weights,
            source: PathBuf::from("<in-memory adapter>"),
        })
    }

    /// Writes the adapters to `path` (see [`LoraAdapter::save`]).
    pub fn save_adapter(&self, path: &Path) -> Result<(), ModelError> {
        self.adapter()?.save(path)
    }

    /// For each pair `(prompts[r], targets[r])`: Σ_i log p(targets[r][i] | prompts[r],
    /// targets[r][..i]), shape `(pairs,)`, differentiable with respect to [`Self::vars`]. All
    /// pairs run as one batch; an empty target gives 0.
    pub fn sequence_log_probs(
        &self,
        prompts: &[&[u32]],
        targets: &[&[u32]],
    ) -> Result<Tensor, ModelError> {
        let (token_lp, row_of_token) = self.forward(prompts, targets)?;
        let sums = Tensor::zeros(prompts.len(), DType::F32, &Device::Cpu)?;
        if row_of_token.is_empty() {
            return Ok(sums);
        }
        let rows = Tensor::new(row_of_token.as_slice(), &Device::Cpu)?;
        Ok(sums.index_add(&rows, &token_lp, 0)?)
    }

    /// log p(targets[r][i] | prompts[r], targets[r][..i]) for every target token, pairs in
    /// order, shape `(Σ_r targets[r].len(),)`; what [`crate::CausalLm::score`] returns,
    /// flattened and differentiable.
    pub fn token_log_probs(
        &self,
        prompts: &[&[u32]],
        targets: &[&[u32]],
    ) -> Result<Tensor, ModelError> {
        Ok(self.forward(prompts, targets)?.0)
    }

    /// The log-probability of every target token and the pair it belongs to.
    fn forward(
        &self,
        prompts: &[&[u32]],
        targets: &[&[u32]],
    ) -> Result<(Tensor, Vec<u32>), ModelError> {
        let batch = Batch::new(&self.base_config, prompts, targets)?;
        if batch.target_ids.is_empty() {
            return Ok((Tensor::zeros(0, DType::F32, &Device::Cpu)?, Vec::new()));
        }
        let c = &self.base_config;
        let dev = &Device::Cpu;
        let tokens = Tensor::new(batch.tokens.as_slice(), dev)?;
        let mut x = self.embeddings.index_select(&tokens, 0)?;
        let rope = self.rope(&batch.positions);
        let sequences = Arc::new(batch.sequences.clone());

        for (l, layer) in self.layers.iter().enumerate() {
            let h = layer.attn_norm.forward(&x)?;
            let q = self.project(&h, l, LoraTarget::Q)?;
            let k = self.project(&h, l, LoraTarget::K)?;
            let v = self.project(&h, l, LoraTarget::V)?;
            let (q, k) = (rope.forward(&q)?, rope.forward(&k)?);
            let context = q.apply_op3(
                &k,
                &v,
                CausalAttention {
                    sequences: sequences.clone(),
                    heads: c.num_heads,
                    kv_heads: c.num_kv_heads,
                    head_dim: c.head_dim,
                },
            )?;
            x = (x + self.project(&context, l, LoraTarget::O)?)?;

            let h = layer.ffn_norm.forward(&x)?;
            let gate = self.project(&h, l, LoraTarget::Gate)?;
            let up = self.project(&h, l, LoraTarget::Up)?;
            let down = self.project(&gate.apply_op2(&up, SwiGlu)?, l, LoraTarget::Down)?;
            x = (x + down)?;
        }

        let predicting = Tensor::new(batch.predicting.as_slice(), dev)?;
        let h = self.final_norm.forward(&x.index_select(&predicting, 0)?)?;
        let logits = self.lm_head.forward(&h, None)?;
        // log-softmax at the target ids only; the max is a constant shift (no gradient).
        let max = logits.max_keepdim(D::Minus1)?.detach();
        let shifted = logits.broadcast_sub(&max)?;
        let log_z = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
        let ids = Tensor::new(batch.target_ids.as_slice(), dev)?.unsqueeze(1)?;
        let token_lp = (shifted.gather(&ids, 1)? - log_z)?.squeeze(1)?;
        Ok((token_lp, batch.row_of_target))
    }

    /// `x Wᵀ + b`, plus `(alpha/r)·(x Aᵀ) Bᵀ` when the projection is adapted.
    fn project(&self, x: &Tensor, layer: usize, target: LoraTarget) -> Result<Tensor, ModelError> {
        let adapter = self.adapters[layer][target.index()]
            .as_ref()
            .map(|pair| (&pair.a, &pair.b, self.lora.scale()));
        Ok(self.layers[layer].projections[target.index()].forward(x, adapter)?)
    }

    /// RoPE for tokens at `positions`, with cos and sin tables computed as `Llama` does (f64
    /// angles).
    fn rope(&self, positions: &[usize]) -> Rope {
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(positions.len() * half);
        let mut sin = Vec::with_capacity(positions.len() * half);
        for &p in positions {
            for &f in &self.inv_freq {
                let angle = p as f64 * f as f64;
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
        let c = &self.base_config;
        Rope {
            cos: Arc::new(cos),
            sin: Arc::new(sin),
            head_dim: c.head_dim,
            rope_dim: c.rope_dim,
            interleaved: c.rope_interleaved,
        }
    }
}

/// The pairs of one forward pass, as stacked token rows: each pair runs `prompt ∘
/// target[..len-1]` (its last target token is never an input).
struct Batch {
    /// Input tokens of all sequences, stacked.
    tokens: Vec<u32>,
    /// Position of each stacked token within its sequence.
    positions: Vec<usize>,
    /// `(first stacked row, length)` of each sequence (pairs with an empty target have none).
    sequences: Vec<(usize, usize)>,
    /// Stacked rows whose next-token distribution scores a target token, in pair order.
    predicting: Vec<u32>,
    target_ids: Vec<u32>,
    /// The pair of each target token.
    row_of_target: Vec<u32>,
}

impl Batch {
    fn new(c: &LlamaConfig, prompts: &[&[u32]], targets: &[&[u32]]) -> Result<Self, ModelError> {
        if prompts.len() != targets.len() {
            return Err(input_error(
                "pairs",
                format!("{} prompts but {} targets", prompts.len(), targets.len()),
            ));
        }
        let mut batch = Batch {
            tokens: Vec::new(),
            positions: Vec::new(),
            sequences: Vec::new(),
            predicting: Vec::new(),
            target_ids: Vec::new(),
            row_of_target: Vec::new(),
        };
        for (r, (prompt, target)) in prompts.iter().zip(targets).enumerate() {
            if prompt.is_empty() {
                return Err(input_error("prompt", format!("prompt {r} is empty")));
            }
            if let Some(&bad) = prompt
                .iter()
                .chain(target.iter())
                .find(|&&t| t as usize >= c.vocab_size)
            {
                return Err(input_error(
                    "token id",
                    format!(
                        "token {bad} (pair {r}) is outside the vocabulary of {}",
                        c.vocab_size
                    ),
                ));
            }
            if target.is_empty() {
                continue;
            }
            let length = prompt.len() + target.len() - 1;
            if length > c.max_positions {
                return Err(input_error(
                    "context length",
                    format!(
                        "pair {r} needs {length} positions; the model has {}",
                        c.max_positions
                    ),
                ));
            }
            let start = batch.tokens.len();
            batch.tokens.extend_from_slice(prompt);
            batch.tokens.extend_from_slice(&target[..target.len() - 1]);
            batch.positions.extend(0..length);
            batch.sequences.push((start, length));
            for (i, &id) in target.iter().enumerate() {
                batch.predicting.push((start + prompt.len() - 1 + i) as u32);
                batch.target_ids.push(id);
                batch.row_of_target.push(r as u32);
            }
        }
        Ok(batch)
    }
}

/// Trained LoRA adapters, as saved to or loaded from a file, ready to be merged into their
/// base model ([`Llama::apply_adapter`]) or trained further ([`LoraModel::from_adapter`]).
pub struct LoraAdapter {
    config: LoraConfig,
    shape: BaseShape,
    fingerprint: String,
    /// `(layer, target)` → (`A` `[r, in]`, `B` `[out, r]`), f32.
    weights: BTreeMap<AdapterSlot, (Tensor, Tensor)>,
    /// The file it came from (for error messages).
    source: PathBuf,
}

/// `format` in the metadata of adapter files.
const FORMAT: &str = "zrag-lora";
const FORMAT_VERSION: &str = "1";

impl LoraAdapter {
    pub fn config(&self) -> &LoraConfig {
        &self.config
    }

    /// The file the adapter was loaded from (`<in-memory adapter>` for a snapshot).
    pub fn path(&self) -> &Path {
        &self.source
    }

    /// Reads an adapter file and checks it completely: format, metadata, every tensor's
    /// presence, type, shape and finiteness. Errors name the file (and the tensor or field).
    pub fn load(path: &Path) -> Result<Self, ModelError> {
        let bytes = std::fs::read(path).map_err(|source| ModelError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let file_error = |message: String| ModelError::Weights {
            path: path.to_path_buf(),
            tensor: "*".into(),
            message,
        };
        let metadata = read_metadata(&bytes).map_err(file_error)?;
        let meta = |key: &str| -> Result<&str, ModelError> {
            metadata
                .get(key)
                .map(String::as_str)
                .ok_or_else(|| ModelError::Config {
                    path: path.to_path_buf(),
                    field: key.into(),
                    message: "missing from the adapter's metadata".into(),
                })
        };
        let bad = |key: &str, message: String| ModelError::Config {
            path: path.to_path_buf(),
            field: key.into(),
            message,
        };
        if meta("format")? != FORMAT {
            return Err(bad("format", "not a zrag LoRA adapter".into()));
        }
        let version = meta("format_version")?;
        if version != FORMAT_VERSION {
            return Err(bad(
                "format_version",
                format!("version {version} is not supported (this zrag reads {FORMAT_VERSION})"),
            ));
        }
        fn parse<T: FromStr>(
            value: &str,
            key: &str,
            bad: &dyn Fn(&str, String) -> ModelError,
        ) -> Result<T, ModelError> {
            value
                .parse()
                .map_err(|_| bad(key, format!("`{value}` is not a valid value")))
        }
        let targets = meta("targets")?
            .split(',')
            .map(|t| t.parse::<LoraTarget>().map_err(|m| bad("targets", m)))
            .collect::<Result<Vec<_>, _>>()?;
        let config = LoraConfig {
            rank: parse(meta("rank")?, "rank", &bad)?,
            alpha: parse(meta("alpha")?, "alpha", &bad)?,
            targets,
        };
        config.validate().map_err(|m| bad("config", m))?;
        let field = |key: &str| -> Result<usize, ModelError> { parse(meta(key)?, key, &bad) };
        let shape = BaseShape {
            vocab_size: field("base.vocab_size")?,
            hidden_size: field("base.hidden_size")?,
            intermediate_size: field("base.intermediate_size")?,
            num_layers: field("base.num_layers")?,
            num_heads: field("base.num_heads")?,
            num_kv_heads: field("base.num_kv_heads")?,
            head_dim: field("base.head_dim")?,
            rope_dim: field("base.rope_dim")?,
            rope_interleaved: parse(
                meta("base.rope_interleaved")?,
                "base.rope_interleaved",
                &bad,
            )?,
        };
        let fingerprint = meta("base.fingerprint")?.to_string();

        let mut tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)
            .map_err(|e| file_error(format!("not a valid safetensors file: {e}")))?;
        let mut weights = BTreeMap::new();
        for l in 0..shape.num_layers {
            for target in config.sorted_targets() {
                let (out_dim, in_dim) = target.dims(&shape);
                let mut take = |suffix: &str, dims: [usize; 2]| -> Result<Tensor, ModelError> {
                    let name = tensor_name(l, target, suffix);
                    let tensor_error = |message: String| ModelError::Weights {
                        path: path.to_path_buf(),
                        tensor: name.clone(),
                        message,
                    };
                    let tensor = tensors
                        .remove(&name)
                        .ok_or_else(|| tensor_error("missing tensor".into()))?;
                    if tensor.dtype() != DType::F32 {
                        return Err(tensor_error(format!("{:?}, expected F32", tensor.dtype())));
                    }
                    if tensor.dims() != dims {
                        return Err(tensor_error(format!(
                            "shape {:?}, expected {dims:?}",
                            tensor.dims()
                        )));
                    }
                    let finite = with_f32_data(&tensor, |v| v.iter().all(|x| x.is_finite()))?;
                    if !finite {
                        return Err(tensor_error("contains NaN or infinite values".into()));
                    }
                    Ok(tensor)
                };
                let a = take("lora_a", [config.rank, in_dim])?;
                let b = take("lora_b", [out_dim, config.rank])?;
                weights.insert((l, target), (a, b));
            }
        }
        if let Some(extra) = tensors.keys().min() {
            return Err(ModelError::Weights {
                path: path.to_path_buf(),
                tensor: extra.clone(),
                message: "unexpected tensor (not one of the adapter's layers and targets)".into(),
            });
        }
        Ok(LoraAdapter {
            config,
            shape,
            fingerprint,
            weights,
            source: path.to_path_buf(),
        })
    }

    /// Writes the adapter as safetensors with its metadata, atomically (a temporary file
    /// renamed over `path`), so an interrupted save never leaves a half-written adapter.
    pub fn save(&self, path: &Path) -> Result<(), ModelError> {
        let mut metadata = serde_json::Map::new();
        let mut put = |key: &str, value: String| {
            metadata.insert(key.into(), serde_json::Value::String(value));
        };
        put("format", FORMAT.into());
        put("format_version", FORMAT_VERSION.into());
        put("rank", self.config.rank.to_string());
        put("alpha", self.config.alpha.to_string());
        put(
            "targets",
            self.config
                .sorted_targets()
                .iter()
                .map(|t| t.name())
                .collect::<Vec<_>>()
                .join(","),
        );
        for (key, value) in self.shape.fields() {
            put(key, value);
        }
        put("base.fingerprint", self.fingerprint.clone());

        let mut header = serde_json::Map::new();
        header.insert("__metadata__".into(), serde_json::Value::Object(metadata));
        let mut data = Vec::new();
        for (&(l, target), (a, b)) in &self.weights {
            for (suffix, tensor) in [("lora_a", a), ("lora_b", b)] {
                let start = data.len();
                for v in tensor.flatten_all()?.to_vec1::<f32>()? {
                    data.extend_from_slice(&v.to_le_bytes());
                }
                header.insert(
                    tensor_name(l, target, suffix),
                    serde_json::json!({
                        "dtype": "F32",
                        "shape": tensor.dims(),
                        "data_offsets": [start, data.len()],
                    }),
                );
            }
        }
        let mut header =
            serde_json::to_vec(&serde_json::Value::Object(header)).map_err(|source| {
                ModelError::Json {
                    path: path.to_path_buf(),
                    source,
                }
            })?;
        // The format lets the header be padded with spaces; 8-byte alignment of the data
        // is what readers that map the file in place want.
        while header.len() % 8 != 0 {
            header.push(b' ');
        }
        let mut file = Vec::with_capacity(8 + header.len() + data.len());
        file.extend_from_slice(&(header.len() as u64).to_le_bytes());
        file.extend_from_slice(&header);
        file.extend_from_slice(&data);
        write_atomically(path, &file)
    }

    /// Errors unless `base` is the model the adapter was trained on.
    fn check_base(&self, base: &Llama) -> Result<(), ModelError> {
        let theirs = BaseShape::of(base.config());
        for ((key, ours), (_, actual)) in self.shape.fields().into_iter().zip(theirs.fields()) {
            if ours != actual {
                return Err(ModelError::Config {
                    path: self.source.clone(),
                    field: key.into(),
                    message: format!(
                        "the adapter was trained on a model with {key} = {ours}; this model \
                         has {actual}"
                    ),
                });
            }
        }
        let actual = fingerprint(base).map_err(|e| quantised_error(&self.source, e))?;
        if actual != self.fingerprint {
            return Err(ModelError::Config {
                path: self.source.clone(),
                field: "base.fingerprint".into(),
                message: "the adapter was trained on different base weights (another model of \
                          the same shape, another file of the same model, or this adapter is \
                          already merged into it)"
                    .into(),
            });
        }
        Ok(())
    }

    /// The new weights `W + (alpha/r)·B·A` of every adapted projection of `base`, after
    /// checking that the adapter belongs to it.
    pub(crate) fn merged_weights(
        &self,
        base: &Llama,
    ) -> Result<Vec<(AdapterSlot, Tensor)>, ModelError> {
        self.check_base(base)?;
        let scale = self.config.scale() as f64;
        let mut merged = Vec::with_capacity(self.weights.len());
        for (&(l, target), (a, b)) in &self.weights {
            let linear = target.linear(&base.layers()[l]);
            let weight = linear.f32_weight().map_err(|kind| {
                quantised_error(&self.source, (format!("layer {l} `{target}`"), kind))
            })?;
            let delta = (b.matmul(a)? * scale)?;
            if delta.dims() != weight.dims() {
                return Err(ModelError::Weights {
                    path: self.source.clone(),
                    tensor: tensor_name(l, target, "lora_b"),
                    message: format!(
                        "update {:?} does not fit the weight {:?}",
                        delta.dims(),
                        weight.dims()
                    ),
                });
            }
            merged.push(((l, target), (weight + delta)?));
        }
        Ok(merged)
    }
}

fn tensor_name(layer: usize, target: LoraTarget, suffix: &str) -> String {
    format!("layers.{layer}.{target}.{suffix}")
}

/// The `__metadata__` map of a safetensors file (the tensors are read by candle).
fn read_metadata(bytes: &[u8]) -> Result<BTreeMap<String, String>, String> {
    let length: [u8; 8] = bytes
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| format!("truncated: {} bytes, no safetensors header", bytes.len()))?;
    let length = u64::from_le_bytes(length);
    let header = usize::try_from(length)
        .ok()
        .and_then(|n| bytes.get(8..8usize.checked_add(n)?))
        .ok_or_else(|| {
            format!(
                "truncated or not safetensors: header of {length} bytes in a file of {}",
                bytes.len()
            )
        })?;
    let header: serde_json::Value = serde_json::from_slice(header)
        .map_err(|e| format!("not a valid safetensors header: {e}"))?;
    let metadata = header
        .get("__metadata__")
        .and_then(|m| m.as_object())
        .ok_or("no `__metadata__` in the header (not a zrag LoRA adapter)")?;
    metadata
        .iter()
        .map(|(k, v)| {
            v.as_str()
                .map(|s| (k.clone(), s.to_string()))
                .ok_or_else(|| format!("metadata `{k}` is not a string"))
        })
        .collect()
}

/// Writes `bytes` to a temporary file beside `path`, syncs it, renames it over `path` and
/// syncs the directory: readers see the old file or the new one, never a partial one.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), ModelError> {
    let file_name = path
        .file_name()
        .ok_or_else(|| ModelError::Config {
            path: path.to_path_buf(),
            field: "path".into(),
            message: "not a file path".into(),
        })?
        .to_string_lossy()
        .into_owned();
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let temp = dir.join(format!(".{file_name}.tmp-{}", std::process::id()));
    let io = |p: &Path| {
        let p = p.to_path_buf();
        move |source| ModelError::Io { path: p, source }
    };
    let write = || -> Result<(), ModelError> {
        let mut file = std::fs::File::create(&temp).map_err(io(&temp))?;
        file.write_all(bytes).map_err(io(&temp))?;
        file.sync_all().map_err(io(&temp))?;
        std::fs::rename(&temp, path).map_err(io(path))?;
        Ok(())
    };
    if let Err(e) = write() {
        let _ = std::fs::remove_file(&temp);
        return Err(e);
    }
    // Make the rename durable; a directory that cannot be opened for syncing (some
    // filesystems) does not make the adapter any less written.
    if let Ok(d) = std::fs::File::open(&dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::generator::{CausalLm, GgmlDType};
    use crate::testing::tiny_llama_config;

    const VOCAB: usize = 37;

    /// Ragged pairs: different prompt and target lengths, a one-token prompt, an empty
    /// target, a repeated prompt.
    const PROMPTS: [&[u32]; 5] = [
        &[1, 2, 3],
        &[4, 5, 6, 7, 8, 9, 10, 11],
        &[2],
        &[30, 31, 5, 5],
        &[1, 2, 3],
    ];
    const TARGETS: [&[u32]; 5] = [&[5, 6, 0], &[1], &[3, 3, 3, 3, 9, 36], &[], &[7, 8]];

    /// GGUF llama layout: adjacent-pair RoPE over the whole head, no biases.
    fn llama_base(seed: u64) -> Llama {
        Llama::random(tiny_llama_config(VOCAB), seed, GgmlDType::F32).unwrap()
    }

    /// Qwen2 layout: half-split RoPE over part of each head, and q/k/v biases.
    fn qwen_base(seed: u64) -> Llama {
        let mut config = tiny_llama_config(VOCAB);
        config.rope_interleaved = false;
        config.rope_dim = 8;
        let mut model = Llama::random(config, seed, GgmlDType::F32).unwrap();
        let mut rng = SplitMix(seed ^ 0xb1a5);
        for layer in model.layers_mut() {
            for target in [LoraTarget::Q, LoraTarget::K, LoraTarget::V] {
                let linear = target.linear_mut(layer);
                let out = linear.f32_weight().unwrap().dim(0).unwrap();
                linear.set_bias(Some((0..out).map(|_| rng.next_f32() - 0.5).collect()));
            }
        }
        model
    }

    fn bases(seed: u64) -> [Llama; 2] {
        [llama_base(seed), qwen_base(seed)]
    }

    fn every_target(rank: usize) -> LoraConfig {
        LoraConfig {
            rank,
            alpha: 2.0 * rank as f32,
            targets: LoraTarget::ALL.to_vec(),
        }
    }

    /// Sets every B to uniform noise in ±`bound` (B = 0 would make the adapters a no-op).
    fn randomise_b(model: &LoraModel, seed: u64, bound: f32) {
        let mut rng = SplitMix(seed);
        for (_, _, pair) in model.pairs() {
            let dims = pair.b.dims().to_vec();
            let n = dims.iter().product();
            let data: Vec<f32> = (0..n)
                .map(|_| (2.0 * rng.next_f32() - 1.0) * bound)
                .collect();
            pair.b
                .set(&Tensor::from_vec(data, dims, &Device::Cpu).unwrap())
                .unwrap();
        }
    }

    fn sgd_step(model: &LoraModel, prompts: &[&[u32]], targets: &[&[u32]], lr: f64) {
        let loss = model
            .sequence_log_probs(prompts, targets)
            .unwrap()
            .sum_all()
            .unwrap()
            .neg()
            .unwrap();
        let grads = loss.backward().unwrap();
        for var in model.vars() {
            if let Some(g) = grads.get(&var) {
                var.set(&(var.as_tensor() - (g * lr).unwrap()).unwrap())
                    .unwrap();
            }
        }
    }

    fn flat(tensor: &Tensor) -> Vec<f32> {
        tensor.to_vec1::<f32>().unwrap()
    }

    fn max_diff(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    }

    fn random_tensor(rng: &mut SplitMix, dims: &[usize]) -> Tensor {
        let n = dims.iter().product();
        let data: Vec<f32> = (0..n).map(|_| 2.0 * rng.next_f32() - 1.0).collect();
        Tensor::from_vec(data, dims, &Device::Cpu).unwrap()
    }

    fn assert_close(a: &Tensor, b: &Tensor, tolerance: f32, what: &str) {
        assert_eq!(a.dims(), b.dims(), "{what}: shapes");
        let a = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let b = b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let diff = max_diff(&a, &b);
        assert!(diff <= tolerance, "{what}: max |Δ| {diff}");
    }

    /// Causal GQA attention from primitive candle ops, one sequence at a time: the reference
    /// for [`CausalAttention`].
    fn attention_composed(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        sequences: &[(usize, usize)],
        heads: usize,
        kv_heads: usize,
        hd: usize,
    ) -> Tensor {
        let group = heads / kv_heads;
        let kv_of_head: Vec<u32> = (0..heads).map(|h| (h / group) as u32).collect();
        let kv_of_head = Tensor::new(kv_of_head.as_slice(), &Device::Cpu).unwrap();
        let mut contexts = Vec::new();
        for &(start, len) in sequences {
            let split = |t: &Tensor, n: usize| {
                t.narrow(0, start, len)
                    .unwrap()
                    .reshape((len, n, hd))
                    .unwrap()
                    .transpose(0, 1)
                    .unwrap()
                    .contiguous()
                    .unwrap()
            };
            let q = split(q, heads);
            let k = split(k, kv_heads).index_select(&kv_of_head, 0).unwrap();
            let v = split(v, kv_heads).index_select(&kv_of_head, 0).unwrap();
            let mask: Vec<f32> = (0..len * len)
                .map(|i| if i % len <= i / len { 0.0 } else { -1e9 })
                .collect();
            let mask = Tensor::from_vec(mask, (1, len, len), &Device::Cpu).unwrap();
            let scores = ((q.matmul(&k.t().unwrap()).unwrap() / (hd as f64).sqrt()).unwrap())
                .broadcast_add(&mask)
                .unwrap();
            let max = scores.max_keepdim(D::Minus1).unwrap().detach();
            let exp = scores.broadcast_sub(&max).unwrap().exp().unwrap();
            let probs = exp
                .broadcast_div(&exp.sum_keepdim(D::Minus1).unwrap())
                .unwrap();
            contexts.push(
                probs
                    .matmul(&v)
                    .unwrap()
                    .transpose(0, 1)
                    .unwrap()
                    .reshape((len, heads * hd))
                    .unwrap(),
            );
        }
        Tensor::cat(&contexts, 0).unwrap()
    }

    /// RMSNorm from primitive ops: the reference for [`RmsNorm`].
    fn rms_norm_composed(x: &Tensor, weight: &Tensor, eps: f64) -> Tensor {
        let inv_rms = (x.sqr().unwrap().mean_keepdim(D::Minus1).unwrap() + eps)
            .unwrap()
            .sqrt()
            .unwrap()
            .recip()
            .unwrap();
        x.broadcast_mul(&inv_rms)
            .unwrap()
            .broadcast_mul(weight)
            .unwrap()
    }

    /// RoPE from narrow / cat / mul: the reference for [`Rope`].
    fn rope_composed(x: &Tensor, rope: &Rope, heads: usize) -> Tensor {
        let (hd, rd) = (rope.head_dim, rope.rope_dim);
        let half = rd / 2;
        let n = x.dim(0).unwrap();
        let cos = Tensor::from_slice(&rope.cos, (n, half), &Device::Cpu).unwrap();
        let sin = Tensor::from_slice(&rope.sin, (n, half), &Device::Cpu).unwrap();
        let x = x.reshape((n, heads, hd)).unwrap();
        let rot = x.narrow(2, 0, rd).unwrap();
        let rotate = |x0: &Tensor, x1: &Tensor, cos: &Tensor, sin: &Tensor| {
            let a = (x0.broadcast_mul(cos).unwrap() - x1.broadcast_mul(sin).unwrap()).unwrap();
            let b = (x0.broadcast_mul(sin).unwrap() + x1.broadcast_mul(cos).unwrap()).unwrap();
            (a, b)
        };
        let rotated = if rope.interleaved {
            let pairs = rot.reshape((n, heads, half, 2)).unwrap();
            let (a, b) = rotate(
                &pairs.narrow(3, 0, 1).unwrap(),
                &pairs.narrow(3, 1, 1).unwrap(),
                &cos.reshape((n, 1, half, 1)).unwrap(),
                &sin.reshape((n, 1, half, 1)).unwrap(),
            );
            Tensor::cat(&[a, b], 3)
                .unwrap()
                .reshape((n, heads, rd))
                .unwrap()
        } else {
            let (a, b) = rotate(
                &rot.narrow(2, 0, half).unwrap(),
                &rot.narrow(2, half, half).unwrap(),
                &cos.reshape((n, 1, half)).unwrap(),
                &sin.reshape((n, 1, half)).unwrap(),
            );
            Tensor::cat(&[a, b], 2).unwrap()
        };
        let out = if rd < hd {
            Tensor::cat(&[rotated, x.narrow(2, rd, hd - rd).unwrap()], 2).unwrap()
        } else {
            rotated
        };
        out.reshape((n, heads * hd)).unwrap()
    }

    /// Checks a fused op against its composition from primitive ops: values, and the
    /// gradients of a random linear functional of the output w.r.t. every input.
    fn check_against_composed(
        inputs: &[Var],
        fused: impl Fn(&[Tensor]) -> Tensor,
        composed: impl Fn(&[Tensor]) -> Tensor,
        tolerance: f32,
        what: &str,
    ) {
        let tensors: Vec<Tensor> = inputs.iter().map(|v| v.as_tensor().clone()).collect();
        let (f, c) = (fused(&tensors), composed(&tensors));
        assert_close(&f, &c, tolerance, &format!("{what}: output"));
        let mut rng = SplitMix(99);
        let weights = random_tensor(&mut rng, f.dims());
        let gf = (f * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let gc = (c * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for (i, var) in inputs.iter().enumerate() {
            assert_close(
                gf.get(var).unwrap(),
                gc.get(var).unwrap(),
                tolerance,
                &format!("{what}: gradient of input {i}"),
            );
        }
    }

    #[test]
    fn fused_norm_rope_and_swiglu_equal_their_compositions() {
        let mut rng = SplitMix(23);
        // Large enough to run on the worker pool, and small.
        for rows in [3, 1200] {
            let x = Var::from_tensor(&random_tensor(&mut rng, &[rows, 64])).unwrap();
            let weight: Vec<f32> = (0..64).map(|_| 0.5 + rng.next_f32()).collect();
            let norm = RmsNorm {
                weight: Arc::new(weight.clone()),
                eps: 1e-5,
            };
            let weight = Tensor::new(weight.as_slice(), &Device::Cpu).unwrap();
            check_against_composed(
                std::slice::from_ref(&x),
                |t| norm.forward(&t[0]).unwrap(),
                |t| rms_norm_composed(&t[0], &weight, 1e-5),
                1e-5,
                "rms-norm",
            );

            let g =
                Var::from_tensor(&(random_tensor(&mut rng, &[rows, 96]) * 4.0).unwrap()).unwrap();
            let u = Var::from_tensor(&random_tensor(&mut rng, &[rows, 96])).unwrap();
            check_against_composed(
                &[g, u],
                |t| t[0].apply_op2(&t[1], SwiGlu).unwrap(),
                |t| (t[0].silu().unwrap() * &t[1]).unwrap(),
                1e-5,
                "swiglu",
            );

            for (interleaved, rope_dim) in [(true, 16), (false, 16), (true, 8), (false, 6)] {
                let (heads, head_dim) = (3, 16);
                let half = rope_dim / 2;
                let angles: Vec<f64> = (0..rows * half)
                    .map(|i| (i / half) as f64 * 10f64.powf(-((i % half) as f64) / half as f64))
                    .collect();
                let rope = Rope {
                    cos: Arc::new(angles.iter().map(|a| a.cos() as f32).collect()),
                    sin: Arc::new(angles.iter().map(|a| a.sin() as f32).collect()),
                    head_dim,
                    rope_dim,
                    interleaved,
                };
                let x =
                    Var::from_tensor(&random_tensor(&mut rng, &[rows, heads * head_dim])).unwrap();
                check_against_composed(
                    std::slice::from_ref(&x),
                    |t| rope.forward(&t[0]).unwrap(),
                    |t| rope_composed(&t[0], &rope, heads),
                    1e-5,
                    &format!("rope interleaved={interleaved} dim={rope_dim}"),
                );
            }
        }
    }

    #[test]
    fn fused_attention_equals_composed_attention_in_values_and_gradients() {
        let mut rng = SplitMix(21);
        let (heads, kv_heads, hd) = (6, 2, 8);
        let sequences = vec![(0, 5), (5, 1), (6, 9), (15, 3)];
        let tokens = 18;
        let q = Var::from_tensor(&random_tensor(&mut rng, &[tokens, heads * hd])).unwrap();
        let k = Var::from_tensor(&random_tensor(&mut rng, &[tokens, kv_heads * hd])).unwrap();
        let v = Var::from_tensor(&random_tensor(&mut rng, &[tokens, kv_heads * hd])).unwrap();
        // A random linear functional of the output, so that every output element matters.
        let weights = random_tensor(&mut rng, &[tokens, heads * hd]);
        let fused = q
            .as_tensor()
            .apply_op3(
                k.as_tensor(),
                v.as_tensor(),
                CausalAttention {
                    sequences: Arc::new(sequences.clone()),
                    heads,
                    kv_heads,
                    head_dim: hd,
                },
            )
            .unwrap();
        let composed = attention_composed(&q, &k, &v, &sequences, heads, kv_heads, hd);
        assert_close(&fused, &composed, 1e-5, "attention output");
        let grads_fused = (fused * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let grads_composed = (composed * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for (name, var) in [("q", &q), ("k", &k), ("v", &v)] {
            assert_close(
                grads_fused.get(var).unwrap(),
                grads_composed.get(var).unwrap(),
                1e-5,
                &format!("gradient of {name}"),
            );
        }
    }

    #[test]
    fn fused_projection_equals_composed_matmuls_in_values_and_gradients() {
        let mut rng = SplitMix(22);
        // Small; wide enough to split by columns; tall and narrow, split by rows.
        for (rows, in_dim, out_dim, rank) in [(5, 12, 7, 3), (150, 40, 130, 4), (300, 24, 20, 2)] {
            let x = Var::from_tensor(&random_tensor(&mut rng, &[rows, in_dim])).unwrap();
            let weight = random_tensor(&mut rng, &[out_dim, in_dim]);
            let bias: Vec<f32> = (0..out_dim).map(|_| rng.next_f32()).collect();
            let a = Var::from_tensor(&random_tensor(&mut rng, &[rank, in_dim])).unwrap();
            let b = Var::from_tensor(&random_tensor(&mut rng, &[out_dim, rank])).unwrap();
            let scale = 1.5f32;
            let weights = random_tensor(&mut rng, &[rows, out_dim]);
            let projection = Projection::new(weight.clone(), Some(&bias)).unwrap();
            let bias = Tensor::new(bias.as_slice(), &Device::Cpu).unwrap();
            let base = x
                .matmul(&weight.t().unwrap())
                .unwrap()
                .broadcast_add(&bias)
                .unwrap();
            let update = (x
                .matmul(&a.t().unwrap())
                .unwrap()
                .matmul(&b.t().unwrap())
                .unwrap()
                * scale as f64)
                .unwrap();
            let what = format!("{rows}x{in_dim} -> {out_dim}");

            let frozen = projection.forward(&x, None).unwrap();
            assert_close(&frozen, &base, 1e-5, &format!("{what}: frozen output"));
            let g1 = (frozen * &weights)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let g2 = (&base * &weights)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            assert_close(g1.get(&x).unwrap(), g2.get(&x).unwrap(), 1e-5, &what);

            let adapted = projection.forward(&x, Some((&a, &b, scale))).unwrap();
            let composed = (base + update).unwrap();
            assert_close(
                &adapted,
                &composed,
                1e-5,
                &format!("{what}: adapted output"),
            );
            let g1 = (adapted * &weights)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let g2 = (composed * &weights)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            for (name, var) in [("x", &x), ("A", &a), ("B", &b)] {
                assert_close(
                    g1.get(var).unwrap(),
                    g2.get(var).unwrap(),
                    1e-4,
                    &format!("{what}: gradient of {name}"),
                );
            }
        }
    }

    #[test]
    fn lora_forward_with_zero_b_equals_llama_score_batched_or_alone() {
        for base in bases(3) {
            let lora = LoraModel::new(&base, every_target(3), 1).unwrap();
            let expected: Vec<Vec<f32>> = base.score(&PROMPTS, &TARGETS).unwrap();
            let got = flat(&lora.token_log_probs(&PROMPTS, &TARGETS).unwrap());
            let expected_flat: Vec<f32> = expected.iter().flatten().copied().collect();
            let diff = max_diff(&got, &expected_flat);
            assert!(diff < 1e-4, "batched LoRA forward vs Llama::score: {diff}");

            let sums = flat(&lora.sequence_log_probs(&PROMPTS, &TARGETS).unwrap());
            for (r, row) in expected.iter().enumerate() {
                let want: f32 = row.iter().sum();
                assert!(
                    (sums[r] - want).abs() < 1e-4,
                    "pair {r}: {} vs {want}",
                    sums[r]
                );
            }
            assert_eq!(sums[3], 0.0, "an empty target has log-probability 0");

            // Padding in the batch must not change any pair's result.
            let mut offset = 0;
            for r in 0..PROMPTS.len() {
                let alone = flat(&lora.token_log_probs(&[PROMPTS[r]], &[TARGETS[r]]).unwrap());
                let batched = &got[offset..offset + TARGETS[r].len()];
                assert!(
                    max_diff(&alone, batched) < 1e-5,
                    "pair {r} alone vs batched"
                );
                offset += TARGETS[r].len();
            }
        }
    }

    #[test]
    fn gradients_match_central_finite_differences() {
        let prompts = &PROMPTS[..3];
        let targets = &TARGETS[..3];
        for (m, base) in bases(5).iter().enumerate() {
            let lora = LoraModel::new(base, every_target(2), 2).unwrap();
            randomise_b(&lora, 9, 0.3);
            let loss = |lora: &LoraModel| -> f64 {
                let lp = lora.sequence_log_probs(prompts, targets).unwrap();
                flat(&lp).iter().map(|&v| v as f64).sum()
            };
            let grads = lora
                .sequence_log_probs(prompts, targets)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let mut rng = SplitMix(17 + m as u64);
            let mut largest: f32 = 0.0;
            // Every adapter of the first layer (all seven targets, A and B), and some of
            // the last; two random entries each.
            let vars = lora.vars();
            for (v, var) in vars.iter().enumerate() {
                if v >= 14 && v % 3 != 0 {
                    continue;
                }
                let analytic = grads
                    .get(var)
                    .map(|g| g.flatten_all().unwrap().to_vec1::<f32>().unwrap())
                    .expect("every adapter parameter gets a gradient");
                let original = var.as_tensor().copy().unwrap();
                let values = original.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                for _ in 0..2 {
                    let i = (rng.next_f32() * values.len() as f32) as usize % values.len();
                    let eps = 1e-2f32;
                    let at = |delta: f32| {
                        let mut changed = values.clone();
                        changed[i] += delta;
                        var.set(&Tensor::from_vec(changed, original.dims(), &Device::Cpu).unwrap())
                            .unwrap();
                        loss(&lora)
                    };
                    let numeric = ((at(eps) - at(-eps)) / (2.0 * eps as f64)) as f32;
                    var.set(&original).unwrap();
                    let a = analytic[i];
                    largest = largest.max(a.abs());
                    assert!(
                        (numeric - a).abs() <= 2e-3 + 2e-2 * a.abs().max(numeric.abs()),
                        "model {m}, var {v}, entry {i}: analytic {a}, numeric {numeric}"
                    );
                }
            }
            assert!(
                largest > 1e-2,
                "gradients are all ~0 ({largest}): test is vacuous"
            );
        }
    }

    #[test]
    fn saved_adapter_merged_into_a_fresh_base_scores_like_the_lora_forward() {
        let dir = tempfile::tempdir().unwrap();
        for (m, base) in bases(6).iter().enumerate() {
            let config = LoraConfig {
                rank: 4,
                alpha: 8.0,
                targets: vec![
                    LoraTarget::V,
                    LoraTarget::Q,
                    LoraTarget::O,
                    LoraTarget::Down,
                ],
            };
            let lora = LoraModel::new(base, config.clone(), 3).unwrap();
            for _ in 0..3 {
                sgd_step(&lora, &PROMPTS[..2], &TARGETS[..2], 0.5);
            }
            let trained = flat(&lora.token_log_probs(&PROMPTS, &TARGETS).unwrap());
            let path = dir.path().join(format!("adapter-{m}.safetensors"));
            lora.save_adapter(&path).unwrap();

            let adapter = LoraAdapter::load(&path).unwrap();
            assert_eq!(adapter.config().rank, 4);
            assert_eq!(adapter.config().alpha, 8.0);
            assert_eq!(adapter.config().sorted_targets(), config.sorted_targets());
            assert_eq!(adapter.path(), path);

            let mut fresh = if m == 0 { llama_base(6) } else { qwen_base(6) };
            let before: Vec<f32> = fresh.score(&PROMPTS, &TARGETS).unwrap().concat();
            fresh.apply_adapter(&adapter).unwrap();
            let merged: Vec<f32> = fresh.score(&PROMPTS, &TARGETS).unwrap().concat();
            let diff = max_diff(&merged, &trained);
            assert!(
                diff < 1e-4,
                "model {m}: merged adapter vs LoRA forward: {diff}"
            );
            assert!(
                max_diff(&before, &merged) > 1e-2,
                "training changed nothing: the comparison is vacuous"
            );

            // Resuming from the file gives the same model.
            let resumed = LoraModel::from_adapter(base, &path).unwrap();
            let again = flat(&resumed.token_log_probs(&PROMPTS, &TARGETS).unwrap());
            assert!(max_diff(&again, &trained) < 1e-6);
            assert_eq!(resumed.vars().len(), lora.vars().len());

            // Merging twice would apply the update twice: refused, and the model unchanged.
            let err = fresh.apply_adapter(&adapter).unwrap_err().to_string();
            assert!(err.contains(&path.display().to_string()), "{err}");
            let unchanged: Vec<f32> = fresh.score(&PROMPTS, &TARGETS).unwrap().concat();
            assert_eq!(unchanged, merged);
        }
    }

    #[test]
    fn a_few_gradient_steps_raise_the_target_log_probability() {
        let base = llama_base(7);
        let lora = LoraModel::new(&base, LoraConfig::default(), 4).unwrap();
        let prompt: &[u32] = &[1, 5, 9, 13, 2, 6];
        let target: &[u32] = &[20, 4, 33, 4];
        let log_prob =
            |lora: &LoraModel| flat(&lora.sequence_log_probs(&[prompt], &[target]).unwrap())[0];
        let start = log_prob(&lora);
        let mut previous = start;
        for step in 0..8 {
            sgd_step(&lora, &[prompt], &[target], 0.05);
            let now = log_prob(&lora);
            assert!(now > previous, "step {step}: {previous} -> {now}");
            previous = now;
        }
        assert!(
            previous > start + 2.0,
            "log p(target) only went from {start} to {previous}"
        );
    }

    #[test]
    fn damaged_or_mismatched_adapter_files_are_errors_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let base = llama_base(8);
        let lora = LoraModel::new(&base, LoraConfig::default(), 5).unwrap();
        randomise_b(&lora, 3, 0.1);
        let good = dir.path().join("good.safetensors");
        lora.save_adapter(&good).unwrap();
        let bytes = std::fs::read(&good).unwrap();
        let names_file = |result: Result<LoraAdapter, ModelError>, path: &Path, what: &str| {
            let err = match result {
                Ok(_) => panic!("{what}: loaded without error"),
                Err(e) => e.to_string(),
            };
            assert!(
                err.contains(&path.display().to_string()),
                "{what}: error does not name the file: {err}"
            );
            err
        };

        let missing = dir.path().join("missing.safetensors");
        names_file(LoraAdapter::load(&missing), &missing, "missing file");

        let damaged = [
            ("empty", Vec::new()),
            ("truncated header", bytes[..20].to_vec()),
            ("truncated data", bytes[..bytes.len() - 10].to_vec()),
            (
                "garbage",
                b"definitely not a safetensors file at all".to_vec(),
            ),
            ("huge header length", {
                let mut b = bytes.clone();
                b[..8].copy_from_slice(&u64::MAX.to_le_bytes());
                b
            }),
        ];
        for (what, content) in damaged {
            let path = dir
                .path()
                .join(format!("{}.safetensors", what.replace(' ', "-")));
            std::fs::write(&path, content).unwrap();
            names_file(LoraAdapter::load(&path), &path, what);
            assert!(LoraModel::from_adapter(&base, &path).is_err());
        }

        // A tensor of the wrong shape, and one with NaN.
        let mut adapter = LoraAdapter::load(&good).unwrap();
        let (_, b) = adapter.weights.get(&(1, LoraTarget::V)).unwrap().clone();
        let wrong_a = Tensor::zeros((9, 64), DType::F32, &Device::Cpu).unwrap();
        adapter
            .weights
            .insert((1, LoraTarget::V), (wrong_a, b.clone()));
        let wrong_shape = dir.path().join("wrong-shape.safetensors");
        adapter.save(&wrong_shape).unwrap();
        let err = names_file(LoraAdapter::load(&wrong_shape), &wrong_shape, "wrong shape");
        assert!(err.contains("layers.1.v.lora_a"), "{err}");

        let mut adapter = LoraAdapter::load(&good).unwrap();
        let (a, _) = adapter.weights.get(&(0, LoraTarget::Q)).unwrap().clone();
        let nan_b = Tensor::full(f32::NAN, (64, 8), &Device::Cpu).unwrap();
        adapter.weights.insert((0, LoraTarget::Q), (a, nan_b));
        let with_nan = dir.path().join("nan.safetensors");
        adapter.save(&with_nan).unwrap();
        let err = names_file(LoraAdapter::load(&with_nan), &with_nan, "NaN");
        assert!(
            err.contains("layers.0.q.lora_b") && err.contains("NaN"),
            "{err}"
        );

        // A valid file for another model: another shape, or the same shape with other
        // weights. Refused by apply_adapter and from_adapter; the model is left unchanged.
        let adapter = LoraAdapter::load(&good).unwrap();
        let mut other_config = tiny_llama_config(VOCAB);
        other_config.intermediate_size = 80;
        let mut other_shape = Llama::random(other_config, 8, GgmlDType::F32).unwrap();
        let err = other_shape.apply_adapter(&adapter).unwrap_err().to_string();
        assert!(err.contains(&good.display().to_string()) && err.contains("intermediate_size"));
        assert!(LoraModel::from_adapter(&other_shape, &good).is_err());
        let mut other_weights = llama_base(9);
        let before = other_weights.score(&PROMPTS, &TARGETS).unwrap();
        let err = other_weights
            .apply_adapter(&adapter)
            .unwrap_err()
            .to_string();
        assert!(err.contains(&good.display().to_string()) && err.contains("fingerprint"));
        assert_eq!(other_weights.score(&PROMPTS, &TARGETS).unwrap(), before);

        // Quantised weights cannot take an adapter.
        let mut quantised = Llama::random(tiny_llama_config(VOCAB), 8, GgmlDType::Q8_0).unwrap();
        let err = quantised.apply_adapter(&adapter).unwrap_err().to_string();
        assert!(
            err.contains(&good.display().to_string()) && err.contains("F32"),
            "{err}"
        );

        // The good file still loads and merges.
        let mut same = llama_base(8);
        same.apply_adapter(&adapter).unwrap();
    }

    #[test]
    fn bad_inputs_and_configs_are_errors_not_panics() {
        let base = llama_base(10);
        let lora = LoraModel::new(&base, LoraConfig::default(), 1).unwrap();
        assert!(lora.sequence_log_probs(&[&[1]], &[]).is_err());
        assert!(lora.sequence_log_probs(&[&[]], &[&[1]]).is_err());
        assert!(lora
            .sequence_log_probs(&[&[1]], &[&[VOCAB as u32]])
            .is_err());
        assert!(lora.sequence_log_probs(&[&[VOCAB as u32]], &[&[]]).is_err());
        let long = vec![1u32; 60];
        assert!(lora.sequence_log_probs(&[&long], &[&[1; 5]]).is_ok());
        assert!(lora.sequence_log_probs(&[&long], &[&[1; 6]]).is_err());
        // No targets at all: zeros, no graph.
        let none = lora.sequence_log_probs(&[&[1], &[2]], &[&[], &[]]).unwrap();
        assert_eq!(flat(&none), vec![0.0, 0.0]);

        for config in [
            LoraConfig {
                rank: 0,
                ..LoraConfig::default()
            },
            LoraConfig {
                alpha: f32::NAN,
                ..LoraConfig::default()
            },
            LoraConfig {
                targets: vec![],
                ..LoraConfig::default()
            },
            LoraConfig {
                targets: vec![LoraTarget::Q, LoraTarget::Q],
                ..LoraConfig::default()
            },
        ] {
            assert!(LoraModel::new(&base, config, 1).is_err());
        }
        let quantised = Llama::random(tiny_llama_config(VOCAB), 1, GgmlDType::Q4_1).unwrap();
        let err = LoraModel::new(&quantised, LoraConfig::default(), 1)
            .err()
            .expect("quantised base refused")
            .to_string();
        assert!(err.contains("WeightPrecision::F32"), "{err}");

        for target in LoraTarget::ALL {
            assert_eq!(target.name().parse::<LoraTarget>(), Ok(target));
        }
        assert!("qkv".parse::<LoraTarget>().is_err());
    }

    /// Timing on the real generator (not a test): `cargo test --release -p zrag-models
    /// lora::tests::bench -- --ignored --nocapture`. Also checks, on real weights, that a
    /// trained adapter merged by `LocalGenerator::load_with_adapter` scores like the LoRA
    /// forward.
    #[test]
    #[ignore]
    fn bench_real_model_forward_backward() {
        use crate::generator::{default_generator_path, LocalGenerator, WeightPrecision};
        use std::time::Instant;
        let path = default_generator_path().expect("run scripts/fetch-models.sh first");
        let generator = LocalGenerator::load_with(&path, WeightPrecision::F32).unwrap();
        let base = generator.model();
        let vocab = base.config().vocab_size;
        let mut rng = SplitMix(1);
        let mut random_tokens = |n: usize| -> Vec<u32> {
            (0..n)
                .map(|_| (rng.next_f32() * vocab as f32) as u32 % vocab as u32)
                .collect()
        };
        let prompts: Vec<Vec<u32>> = [150, 142, 157, 149, 153]
            .iter()
            .map(|&n| random_tokens(n))
            .collect();
        let targets: Vec<Vec<u32>> = [8, 7, 8, 9, 8].iter().map(|&n| random_tokens(n)).collect();
        let prompts: Vec<&[u32]> = prompts.iter().map(Vec::as_slice).collect();
        let targets: Vec<&[u32]> = targets.iter().map(Vec::as_slice).collect();

        let peak_memory = || {
            std::fs::read_to_string("/proc/self/status")
                .ok()
                .and_then(|s| {
                    s.lines()
                        .find(|l| l.starts_with("VmHWM"))
                        .map(str::to_string)
                })
                .unwrap_or_default()
        };
        println!("after loading: {}", peak_memory());
        let start = Instant::now();
        let lora = LoraModel::new(base, LoraConfig::default(), 1).unwrap();
        println!("LoraModel::new: {:.2?}", start.elapsed());
        for run in 0..4 {
            let start = Instant::now();
            let lp = lora.sequence_log_probs(&prompts, &targets).unwrap();
            let loss = lp.sum_all().unwrap().neg().unwrap();
            let forward = start.elapsed();
            let start = Instant::now();
            let grads = loss.backward().unwrap();
            let backward = start.elapsed();
            assert!(grads.get(&lora.vars()[0]).is_some());
            println!(
                "run {run}: forward {forward:.2?}, backward {backward:.2?}, total {:.2?}",
                forward + backward
            );
        }
        println!("after training steps: {}", peak_memory());
        base.clear_prompt_cache();
        let start = Instant::now();
        base.score(&prompts, &targets).unwrap();
        println!(
            "Llama::score (f32, no grad) on the same pairs: {:.2?}",
            start.elapsed()
        );

        // One SGD step, then save and merge through load_with_adapter.
        sgd_step(&lora, &prompts, &targets, 1e-3);
        let trained = flat(&lora.token_log_probs(&prompts, &targets).unwrap());
        let dir = tempfile::tempdir().unwrap();
        let adapter_path = dir.path().join("smollm2.safetensors");
        lora.save_adapter(&adapter_path).unwrap();
        let merged = LocalGenerator::load_with_adapter(&path, &adapter_path).unwrap();
        let merged_lp: Vec<f32> = merged.model().score(&prompts, &targets).unwrap().concat();
        let untrained: Vec<f32> = base.score(&prompts, &targets).unwrap().concat();
        println!(
            "{}: merged vs LoRA forward max |Δ| {:.2e}; training moved log-probs by up to {:.2e}",
            merged.name(),
            max_diff(&merged_lp, &trained),
            max_diff(&untrained, &trained)
        );
        assert!(max_diff(&merged_lp, &trained) < 1e-3);
    }
}
