//! zrag's llama-family decoder (Llama, SmolLM, Qwen2), over GGUF quantised or f32 weights.
//!
//! Why our own and not candle-transformers': teacher-forced scoring needs logits at every
//! position (candle's quantised llama returns only the last), RAG needs ragged batches (k
//! prompts of different lengths in one forward) and beam search needs cheap row forking.
//!
//! Layout choices:
//! - Activations are plain row-major `f32` buffers, one row per token. A batch is *ragged*:
//!   the tokens of all rows are stacked into one matrix, so every weight matmul runs once per
//!   step for the whole batch, with no padding and no attention mask. Only attention looks at
//!   which row a token belongs to.
//! - Weight matmuls go through candle's `QMatMul` (quantised blocks with Q8 activations, as
//!   llama.cpp does, or an f32 matmul for safetensors models).
//! - Each row's KV cache is a shared, frozen prefix (`Arc`, the prompt) plus a private
//!   suffix (generated tokens). Forking a row for beam search or for scoring many
//!   continuations of one prompt copies only the suffix.

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};
use rayon::prelude::*;

use super::lora::LoraAdapter;
use super::quant::{Q4_1Matrix, Q8_0Matrix};
use super::{CausalLm, DecodeState};
use crate::ModelError;

/// The shape of a llama-family decoder.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    /// Leading dimensions of each head that RoPE rotates (usually `head_dim`).
    pub rope_dim: usize,
    pub rope_theta: f32,
    pub rms_norm_eps: f32,
    /// GGUF files store Q/K rows permuted so that RoPE rotates adjacent pairs (x₀,x₁),
    /// (x₂,x₃), ...; Hugging Face checkpoints rotate the two halves of each head against each
    /// other. Same model, different weight layout.
    pub rope_interleaved: bool,
    pub max_positions: usize,
}

impl LlamaConfig {
    fn q_dim(&self) -> usize {
        self.num_heads * self.head_dim
    }

    fn kv_dim(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }

    /// Checks the relations the forward pass relies on; `describe` names the source.
    pub fn validate(&self) -> Result<(), String> {
        let positive = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_layers", self.num_layers),
            ("num_heads", self.num_heads),
            ("num_kv_heads", self.num_kv_heads),
            ("head_dim", self.head_dim),
        ];
        if let Some((name, _)) = positive.iter().find(|(_, v)| *v == 0) {
            return Err(format!("{name} must be positive"));
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return Err(format!(
                "num_heads ({}) is not a multiple of num_kv_heads ({})",
                self.num_heads, self.num_kv_heads
            ));
        }
        if self.rope_dim > self.head_dim || !self.rope_dim.is_multiple_of(2) {
            return Err(format!(
                "rope dimension {} must be even and at most head_dim {}",
                self.rope_dim, self.head_dim
            ));
        }
        Ok(())
    }
}

/// How a weight matrix is stored and multiplied.
pub(crate) enum Weight {
    /// Q4_1 blocks with zrag's own kernel (see `quant`).
    Q4_1(Q4_1Matrix),
    /// Q8_0 blocks with zrag's own kernel (see `quant`).
    Q8_0(Q8_0Matrix),
    /// Anything else candle can multiply: other quantisations, or f32.
    Candle(QMatMul),
}

impl Weight {
    /// Takes a tensor read from a GGUF file (`[out, in]`).
    pub(crate) fn from_qtensor(tensor: QTensor) -> Result<Self, ModelError> {
        match Self::own_kernel(&tensor)? {
            Some(weight) => Ok(weight),
            None => Ok(Weight::Candle(QMatMul::from_qtensor(tensor)?)),
        }
    }

    /// Like [`Weight::from_qtensor`] for a tensor that is shared (the tied embedding).
    pub(crate) fn from_arc(tensor: std::sync::Arc<QTensor>) -> Result<Self, ModelError> {
        match Self::own_kernel(&tensor)? {
            Some(weight) => Ok(weight),
            None => Ok(Weight::Candle(QMatMul::from_arc(tensor)?)),
        }
    }

    /// The tensor in a layout zrag multiplies itself (Q4_1, Q8_0), if it is one.
    fn own_kernel(tensor: &QTensor) -> Result<Option<Self>, ModelError> {
        let [rows, cols] = *tensor.shape().dims() else {
            return Ok(None);
        };
        Ok(match tensor.dtype() {
            GgmlDType::Q4_1 => {
                Q4_1Matrix::from_bytes(&tensor.data()?, rows, cols).map(Weight::Q4_1)
            }
            GgmlDType::Q8_0 => {
                Q8_0Matrix::from_bytes(&tensor.data()?, rows, cols).map(Weight::Q8_0)
            }
            _ => None,
        })
    }

    pub(crate) fn f32(tensor: Tensor) -> Self {
        Weight::Candle(QMatMul::Tensor(tensor))
    }
}

/// A weight matrix `[out, in]` (quantised or f32) with an optional bias.
pub(crate) struct Linear {
    weight: Weight,
    bias: Option<Vec<f32>>,
    in_dim: usize,
    out_dim: usize,
}

impl Linear {
    pub(crate) fn new(
        weight: Weight,
        bias: Option<Vec<f32>>,
        out_dim: usize,
        in_dim: usize,
    ) -> Self {
        Linear {
            weight,
            bias,
            in_dim,
            out_dim,
        }
    }

    /// `x` is `[rows, in]`; returns `[rows, out]`.
    fn forward(&self, x: &[f32], rows: usize) -> Result<Vec<f32>, ModelError> {
        debug_assert_eq!(x.len(), rows * self.in_dim);
        let mut out = match &self.weight {
            Weight::Q4_1(matrix) => matrix.matmul(x, rows),
            Weight::Q8_0(matrix) => matrix.matmul(x, rows),
            Weight::Candle(weight) => {
                let input = Tensor::from_slice(x, (rows, self.in_dim), &Device::Cpu)?;
                weight.forward(&input)?.flatten_all()?.to_vec1::<f32>()?
            }
        };
        if let Some(bias) = &self.bias {
            for row in out.chunks_exact_mut(self.out_dim) {
                for (o, b) in row.iter_mut().zip(bias) {
                    *o += b;
                }
            }
        }
        Ok(out)
    }

    pub(crate) fn bias(&self) -> Option<&[f32]> {
        self.bias.as_deref()
    }

    /// The weight `[out, in]` as an f32 tensor sharing the model's storage, or, when the
    /// weight is quantised, its storage type as the error (adapters train and merge only
    /// into f32 weights: merging into quantised blocks would re-quantise the sum).
    pub(crate) fn f32_weight(&self) -> Result<Tensor, String> {
        match &self.weight {
            Weight::Candle(QMatMul::Tensor(w)) if w.dtype() == candle_core::DType::F32 => {
                Ok(w.clone())
            }
            Weight::Candle(QMatMul::Tensor(w) | QMatMul::TensorF16(w)) => w
                .to_dtype(candle_core::DType::F32)
                .map_err(|e| e.to_string()),
            Weight::Candle(QMatMul::QTensor(q)) => Err(format!("{:?}", q.dtype())),
            Weight::Q4_1(_) => Err("Q4_1".into()),
            Weight::Q8_0(_) => Err("Q8_0".into()),
        }
    }

    /// Replaces the weight by an f32 `[out, in]` tensor (a merged adapter).
    pub(crate) fn set_f32_weight(&mut self, weight: Tensor) {
        debug_assert_eq!(weight.dims(), [self.out_dim, self.in_dim]);
        self.weight = Weight::f32(weight);
    }

    #[cfg(test)]
    pub(crate) fn set_bias(&mut self, bias: Option<Vec<f32>>) {
        self.bias = bias;
    }
}

pub(crate) struct Layer {
    pub(crate) attn_norm: Vec<f32>,
    pub(crate) q: Linear,
    pub(crate) k: Linear,
    pub(crate) v: Linear,
    pub(crate) o: Linear,
    pub(crate) ffn_norm: Vec<f32>,
    pub(crate) gate: Linear,
    pub(crate) up: Linear,
    pub(crate) down: Linear,
}

/// A loaded llama-family decoder.
pub struct Llama {
    config: LlamaConfig,
    /// `[vocab, hidden]`, f32 (de-quantised once at load).
    embeddings: Vec<f32>,
    layers: Vec<Layer>,
    final_norm: Vec<f32>,
    lm_head: Linear,
    /// θ^(−2i/d) for each rotated pair.
    inv_freq: Vec<f32>,
    stop_tokens: Vec<u32>,
    prompt_cache: std::sync::Mutex<PromptCache>,
}

/// KV caches of recently run prompts, so that the same k document prompts are not run again
/// when an answer is re-scored (thorough RAG-Sequence, the posterior of retrieve-then-read) or
/// answered in another mode. Bounded by a total token count; least recently used first out.
struct PromptCache {
    entries: Vec<CachedPrompt>,
    tokens: usize,
    budget: usize,
}

struct CachedPrompt {
    prompt: Vec<u32>,
    kv: Arc<KvBuffers>,
    last_logits: Vec<f32>,
}

impl PromptCache {
    fn new(budget: usize) -> Self {
        PromptCache {
            entries: Vec::new(),
            tokens: 0,
            budget,
        }
    }

    fn get(&self, prompt: &[u32]) -> Option<&CachedPrompt> {
        self.entries.iter().find(|e| e.prompt == prompt)
    }

    fn insert(&mut self, prompt: &[u32], kv: Arc<KvBuffers>, last_logits: Vec<f32>) {
        if prompt.len() > self.budget || self.get(prompt).is_some() {
            return;
        }
        while self.tokens + prompt.len() > self.budget && !self.entries.is_empty() {
            let old = self.entries.remove(0);
            self.tokens -= old.prompt.len();
        }
        self.tokens += prompt.len();
        self.entries.push(CachedPrompt {
            prompt: prompt.to_vec(),
            kv,
            last_logits,
        });
    }

    fn clear(&mut self) {
        self.entries.clear();
        self.tokens = 0;
    }
}

/// Memory for the prompt cache. A SmolLM2-135M prompt token costs 46 kB (30 layers × 2 ×
/// 192 floats), so this holds about 5,800 prompt tokens: the k prompts of a few questions.
const PROMPT_CACHE_BYTES: usize = 256 << 20;

/// Keys or values of one row: per layer, `[position][kv_dim]`.
#[derive(Clone, Default)]
struct KvBuffers {
    keys: Vec<Vec<f32>>,
    values: Vec<Vec<f32>>,
}

impl KvBuffers {
    fn new(layers: usize) -> Self {
        KvBuffers {
            keys: vec![Vec::new(); layers],
            values: vec![Vec::new(); layers],
        }
    }
}

/// One row's attention cache: a frozen prefix shared between forks, then the row's own
/// positions.
#[derive(Clone)]
struct RowCache {
    shared: Arc<KvBuffers>,
    shared_len: usize,
    own: KvBuffers,
    own_len: usize,
}

impl RowCache {
    fn new(layers: usize) -> Self {
        RowCache {
            shared: Arc::new(KvBuffers::new(layers)),
            shared_len: 0,
            own: KvBuffers::new(layers),
            own_len: 0,
        }
    }

    fn len(&self) -> usize {
        self.shared_len + self.own_len
    }

    fn from_prefix(shared: Arc<KvBuffers>, shared_len: usize, layers: usize) -> Self {
        RowCache {
            shared,
            shared_len,
            own: KvBuffers::new(layers),
            own_len: 0,
        }
    }

    /// Moves the row's own positions into the shared prefix, so that later forks share them.
    /// Only cheap (no copy) while the shared prefix is empty, which is when it is used: right
    /// after a prompt is run.
    fn freeze(&mut self) {
        if self.own_len == 0 {
            return;
        }
        if self.shared_len == 0 {
            let layers = self.own.keys.len();
            self.shared = Arc::new(std::mem::replace(&mut self.own, KvBuffers::new(layers)));
        } else {
            let mut merged = (*self.shared).clone();
            for (dst, src) in merged.keys.iter_mut().zip(&self.own.keys) {
                dst.extend_from_slice(src);
            }
            for (dst, src) in merged.values.iter_mut().zip(&self.own.values) {
                dst.extend_from_slice(src);
            }
            self.shared = Arc::new(merged);
            for buffer in self.own.keys.iter_mut().chain(self.own.values.iter_mut()) {
                buffer.clear();
            }
        }
        self.shared_len += self.own_len;
        self.own_len = 0;
    }
}

/// Upper bound on the tokens of one forward pass in [`Llama::score`]; bounds the activation
/// and cache memory of very large scoring batches.
const SCORE_TOKEN_BUDGET: usize = 4096;

impl Llama {
    pub(crate) fn from_parts(
        config: LlamaConfig,
        embeddings: Vec<f32>,
        layers: Vec<Layer>,
        final_norm: Vec<f32>,
        lm_head: Linear,
        stop_tokens: Vec<u32>,
    ) -> Self {
        let bytes_per_token = config.num_layers * 2 * config.num_kv_heads * config.head_dim * 4;
        let prompt_cache_tokens = PROMPT_CACHE_BYTES / bytes_per_token.max(1);
        let half = config.rope_dim / 2;
        let inv_freq = (0..half)
            .map(|i| {
                config
                    .rope_theta
                    .powf(-(2.0 * i as f32) / config.rope_dim as f32)
            })
            .collect();
        Llama {
            config,
            embeddings,
            layers,
            final_norm,
            lm_head,
            inv_freq,
            stop_tokens,
            prompt_cache: std::sync::Mutex::new(PromptCache::new(prompt_cache_tokens)),
        }
    }

    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    /// `[vocab, hidden]`, row-major.
    pub(crate) fn embeddings(&self) -> &[f32] {
        &self.embeddings
    }

    pub(crate) fn layers(&self) -> &[Layer] {
        &self.layers
    }

    #[cfg(test)]
    pub(crate) fn layers_mut(&mut self) -> &mut [Layer] {
        &mut self.layers
    }

    pub(crate) fn final_norm(&self) -> &[f32] {
        &self.final_norm
    }

    pub(crate) fn lm_head(&self) -> &Linear {
        &self.lm_head
    }

    /// RoPE frequencies θ^(−2i/d), one per rotated pair.
    pub(crate) fn inv_freq(&self) -> &[f32] {
        &self.inv_freq
    }

    /// Merges a LoRA adapter into the weights, `W += (alpha/r)·B·A` for every adapted
    /// projection, so the adapted model runs at the plain model's speed. Needs f32 weights
    /// (`WeightPrecision::F32`); the adapter must have been trained on this very base (same
    /// shape and weights), which also refuses applying the same adapter twice. On error the
    /// model is unchanged.
    pub fn apply_adapter(&mut self, adapter: &LoraAdapter) -> Result<(), ModelError> {
        let merged = adapter.merged_weights(self)?;
        for ((layer, target), weight) in merged {
            target
                .linear_mut(&mut self.layers[layer])
                .set_f32_weight(weight);
        }
        // Cached prompts were run with the old weights.
        self.clear_prompt_cache();
        Ok(())
    }

    /// Sets the tokens that end a generation (normally taken from the tokenizer).
    pub fn set_stop_tokens(&mut self, tokens: Vec<u32>) {
        self.stop_tokens = tokens;
    }

    /// A model with random weights (normal, std 1/√fan-in for matrices, 3/√fan-in for the
    /// output layer so that next-token distributions are peaked and unequal; norms 1), for
    /// tests of the machinery around it. `dtype` other than `F32` quantises the matrices, exercising the
    /// same code path as a GGUF file.
    pub fn random(config: LlamaConfig, seed: u64, dtype: GgmlDType) -> Result<Self, ModelError> {
        config.validate().map_err(|message| ModelError::Config {
            path: "<random>".into(),
            field: "config".into(),
            message,
        })?;
        let mut rng = crate::testing::Rng::new(seed);
        let mut matrix = |out_dim: usize, in_dim: usize, gain: f32| -> Result<Linear, ModelError> {
            let std = gain / (in_dim as f32).sqrt();
            let data: Vec<f32> = (0..out_dim * in_dim).map(|_| rng.normal(std)).collect();
            let tensor = Tensor::from_vec(data, (out_dim, in_dim), &Device::Cpu)?;
            let weight = if dtype == GgmlDType::F32 {
                Weight::f32(tensor)
            } else {
                Weight::from_qtensor(QTensor::quantize(&tensor, dtype)?)?
            };
            Ok(Linear::new(weight, None, out_dim, in_dim))
        };
        let c = &config;
        let mut layers = Vec::with_capacity(c.num_layers);
        for _ in 0..c.num_layers {
            layers.push(Layer {
                attn_norm: vec![1.0; c.hidden_size],
                q: matrix(c.q_dim(), c.hidden_size, 1.0)?,
                k: matrix(c.kv_dim(), c.hidden_size, 1.0)?,
                v: matrix(c.kv_dim(), c.hidden_size, 1.0)?,
                o: matrix(c.hidden_size, c.q_dim(), 1.0)?,
                ffn_norm: vec![1.0; c.hidden_size],
                gate: matrix(c.intermediate_size, c.hidden_size, 1.0)?,
                up: matrix(c.intermediate_size, c.hidden_size, 1.0)?,
                down: matrix(c.hidden_size, c.intermediate_size, 1.0)?,
            });
        }
        let lm_head = matrix(c.vocab_size, c.hidden_size, 3.0)?;
        let mut rng = crate::testing::Rng::new(seed ^ 0x5eed);
        let embeddings = (0..c.vocab_size * c.hidden_size)
            .map(|_| rng.normal(1.0))
            .collect();
        let stop = vec![0];
        Ok(Self::from_parts(
            config.clone(),
            embeddings,
            layers,
            vec![1.0; c.hidden_size],
            lm_head,
            stop,
        ))
    }

    /// Runs `inputs[r]` appended to row `r` of `caches` (all rows in one pass) and returns the
    /// logits `[Σ wanted[r].len(), vocab]` at the input positions listed in `wanted[r]`, in
    /// row order.
    ///
    /// The pass runs on a rayon worker: the hundreds of parallel loops of one decoding step
    /// (matmuls, norms, attention, for every layer) then start from inside the pool, where a
    /// loop too small to split runs inline, instead of each being injected into the pool from
    /// outside and waited for.
    fn forward(
        &self,
        caches: &mut [RowCache],
        inputs: &[&[u32]],
        wanted: &[Vec<usize>],
    ) -> Result<Vec<f32>, ModelError> {
        if rayon::current_thread_index().is_some() {
            return self.forward_in_pool(caches, inputs, wanted);
        }
        rayon::scope(|_| self.forward_in_pool(caches, inputs, wanted))
    }

    fn forward_in_pool(
        &self,
        caches: &mut [RowCache],
        inputs: &[&[u32]],
        wanted: &[Vec<usize>],
    ) -> Result<Vec<f32>, ModelError> {
        let c = &self.config;
        let (hidden, q_dim, kv_dim) = (c.hidden_size, c.q_dim(), c.kv_dim());
        let n: usize = inputs.iter().map(|t| t.len()).sum();
        if n == 0 {
            return Ok(Vec::new());
        }
        // Which row and absolute position each stacked token has.
        let mut token_row = Vec::with_capacity(n);
        let mut positions = Vec::with_capacity(n);
        for (r, tokens) in inputs.iter().enumerate() {
            let start = caches[r].len();
            if start + tokens.len() > c.max_positions {
                return Err(ModelError::Config {
                    path: "<generator>".into(),
                    field: "context length".into(),
                    message: format!(
                        "sequence of {} tokens exceeds the model's {} positions",
                        start + tokens.len(),
                        c.max_positions
                    ),
                });
            }
            for j in 0..tokens.len() {
                token_row.push(r);
                positions.push(start + j);
            }
        }

        let mut x = Vec::with_capacity(n * hidden);
        for &token in inputs.iter().flat_map(|t| t.iter()) {
            let id = token as usize;
            if id >= c.vocab_size {
                return Err(ModelError::Config {
                    path: "<generator>".into(),
                    field: "token id".into(),
                    message: format!("token {id} is outside the vocabulary of {}", c.vocab_size),
                });
            }
            x.extend_from_slice(&self.embeddings[id * hidden..(id + 1) * hidden]);
        }
        let rope = self.rope_table(&positions);

        for (l, layer) in self.layers.iter().enumerate() {
            let h = rms_norm(&x, &layer.attn_norm, c.rms_norm_eps);
            let mut q = layer.q.forward(&h, n)?;
            let mut k = layer.k.forward(&h, n)?;
            let v = layer.v.forward(&h, n)?;
            self.apply_rope(&mut q, c.num_heads, &rope);
            self.apply_rope(&mut k, c.num_kv_heads, &rope);

            let mut offset = 0;
            for (r, tokens) in inputs.iter().enumerate() {
                let span = offset * kv_dim..(offset + tokens.len()) * kv_dim;
                caches[r].own.keys[l].extend_from_slice(&k[span.clone()]);
                caches[r].own.values[l].extend_from_slice(&v[span]);
                offset += tokens.len();
            }
            let attn = self.attention(&q, caches, &token_row, &positions, l);
            let o = layer.o.forward(&attn, n)?;
            add_assign(&mut x, &o);

            let h = rms_norm(&x, &layer.ffn_norm, c.rms_norm_eps);
            let mut gate = layer.gate.forward(&h, n)?;
            let up = layer.up.forward(&h, n)?;
            gate.par_chunks_mut(4096)
                .zip(up.par_chunks(4096))
                .for_each(|(g, u)| {
                    for (g, u) in g.iter_mut().zip(u) {
                        *g = *g / (1.0 + (-*g).exp()) * u;
                    }
                });
            let down = layer.down.forward(&gate, n)?;
            add_assign(&mut x, &down);
            debug_assert_eq!(q.len(), n * q_dim);
        }
        for (r, tokens) in inputs.iter().enumerate() {
            caches[r].own_len += tokens.len();
        }

        let mut selected = Vec::new();
        let mut offset = 0;
        for (r, tokens) in inputs.iter().enumerate() {
            for &j in &wanted[r] {
                debug_assert!(j < tokens.len());
                let t = offset + j;
                selected.extend_from_slice(&x[t * hidden..(t + 1) * hidden]);
            }
            offset += tokens.len();
        }
        let m = selected.len() / hidden;
        if m == 0 {
            return Ok(Vec::new());
        }
        let normed = rms_norm(&selected, &self.final_norm, c.rms_norm_eps);
        self.lm_head.forward(&normed, m)
    }

    /// cos and sin of every position's rotation angles: `[token][pair]` each.
    fn rope_table(&self, positions: &[usize]) -> (Vec<f32>, Vec<f32>) {
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(positions.len() * half);
        let mut sin = Vec::with_capacity(positions.len() * half);
        for &p in positions {
            for &f in &self.inv_freq {
                // f64 angle: at position 8000 an f32 product would lose the low bits.
                let angle = p as f64 * f as f64;
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
        (cos, sin)
    }

    fn apply_rope(&self, x: &mut [f32], heads: usize, (cos, sin): &(Vec<f32>, Vec<f32>)) {
        let c = &self.config;
        let half = c.rope_dim / 2;
        let row_len = heads * c.head_dim;
        let interleaved = c.rope_interleaved;
        x.par_chunks_mut(row_len).enumerate().for_each(|(t, row)| {
            let (cos, sin) = (
                &cos[t * half..(t + 1) * half],
                &sin[t * half..(t + 1) * half],
            );
            for head in row.chunks_exact_mut(c.head_dim) {
                for i in 0..half {
                    let (a, b) = if interleaved {
                        (2 * i, 2 * i + 1)
                    } else {
                        (i, i + half)
                    };
                    let (x0, x1) = (head[a], head[b]);
                    head[a] = x0 * cos[i] - x1 * sin[i];
                    head[b] = x0 * sin[i] + x1 * cos[i];
                }
            }
        });
    }

    /// Causal attention of every stacked token over its own row's cache.
    fn attention(
        &self,
        q: &[f32],
        caches: &[RowCache],
        token_row: &[usize],
        positions: &[usize],
        layer: usize,
    ) -> Vec<f32> {
        let c = &self.config;
        let (hd, kv_dim) = (c.head_dim, c.kv_dim());
        let group = c.num_heads / c.num_kv_heads;
        let scale = 1.0 / (hd as f32).sqrt();
        let mut out = vec![0.0f32; q.len()];
        out.par_chunks_mut(hd)
            .enumerate()
            .for_each_init(Vec::new, |scores, (item, out)| {
                let (t, head) = (item / c.num_heads, item % c.num_heads);
                let cache = &caches[token_row[t]];
                let kv_offset = (head / group) * hd;
                let query = &q[item * hd..(item + 1) * hd];
                let visible = positions[t] + 1;
                let shared_visible = visible.min(cache.shared_len);
                let segments = [
                    (
                        &cache.shared.keys[layer],
                        &cache.shared.values[layer],
                        shared_visible,
                    ),
                    (
                        &cache.own.keys[layer],
                        &cache.own.values[layer],
                        visible - shared_visible,
                    ),
                ];
                attend_head(query, segments, kv_dim, kv_offset, scale, scores, out);
            });
        out
    }

    fn log_softmax_rows(&self, logits: Vec<f32>) -> Vec<Vec<f32>> {
        logits
            .par_chunks(self.config.vocab_size)
            .map(|row| {
                let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let sum: f64 = row.iter().map(|&v| ((v - max) as f64).exp()).sum();
                let log_z = max as f64 + sum.ln();
                row.iter().map(|&v| (v as f64 - log_z) as f32).collect()
            })
            .collect()
    }

    /// Runs prompts and returns, per prompt, a cache positioned after it (the prompt frozen as
    /// a shared prefix) and the logits of its last position `[prompts, vocab]`. Prompts seen
    /// recently come from the prompt cache; the others run as one batch and are added to it.
    fn prefill(&self, prompts: &[&[u32]]) -> Result<(Vec<RowCache>, Vec<f32>), ModelError> {
        let vocab = self.config.vocab_size;
        let layers = self.config.num_layers;
        let mut caches: Vec<Option<RowCache>> = vec![None; prompts.len()];
        let mut logits = vec![0.0f32; prompts.len() * vocab];
        let mut misses = Vec::new();
        {
            let cache = self.prompt_cache.lock().unwrap_or_else(|e| e.into_inner());
            for (r, prompt) in prompts.iter().enumerate() {
                match cache.get(prompt) {
                    Some(entry) => {
                        caches[r] = Some(RowCache::from_prefix(
                            entry.kv.clone(),
                            prompt.len(),
                            layers,
                        ));
                        logits[r * vocab..(r + 1) * vocab].copy_from_slice(&entry.last_logits);
                    }
                    None => misses.push(r),
                }
            }
        }
        if !misses.is_empty() {
            let miss_prompts: Vec<&[u32]> = misses.iter().map(|&r| prompts[r]).collect();
            let mut fresh: Vec<RowCache> = misses.iter().map(|_| RowCache::new(layers)).collect();
            let wanted: Vec<Vec<usize>> = miss_prompts.iter().map(|p| vec![p.len() - 1]).collect();
            let fresh_logits = self.forward(&mut fresh, &miss_prompts, &wanted)?;
            let mut cache = self.prompt_cache.lock().unwrap_or_else(|e| e.into_inner());
            for (i, (&r, mut row)) in misses.iter().zip(fresh).enumerate() {
                row.freeze();
                let last = &fresh_logits[i * vocab..(i + 1) * vocab];
                logits[r * vocab..(r + 1) * vocab].copy_from_slice(last);
                cache.insert(prompts[r], row.shared.clone(), last.to_vec());
                caches[r] = Some(row);
            }
        }
        let caches = caches
            .into_iter()
            .map(|c| c.expect("every prompt was filled"))
            .collect();
        Ok((caches, logits))
    }

    /// Forgets every cached prompt (e.g. before timing cold runs).
    pub fn clear_prompt_cache(&self) {
        self.prompt_cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }

    /// Raw logits at every position of `tokens` (a single fresh sequence); for tests against
    /// reference implementations.
    pub fn logits_all(&self, tokens: &[u32]) -> Result<Vec<Vec<f32>>, ModelError> {
        let mut caches = vec![RowCache::new(self.config.num_layers)];
        let wanted = vec![(0..tokens.len()).collect()];
        let logits = self.forward(&mut caches, &[tokens], &wanted)?;
        Ok(logits
            .chunks(self.config.vocab_size)
            .map(<[f32]>::to_vec)
            .collect())
    }
}

impl CausalLm for Llama {
    fn vocab_size(&self) -> usize {
        self.config.vocab_size
    }

    fn stop_tokens(&self) -> &[u32] {
        &self.stop_tokens
    }

    fn start(&self, prompts: &[&[u32]]) -> Result<Box<dyn DecodeState + '_>, ModelError> {
        if let Some(r) = prompts.iter().position(|p| p.is_empty()) {
            return Err(empty_prompt(r));
        }
        let (caches, logits) = self.prefill(prompts)?;
        Ok(Box::new(LlamaDecode {
            model: self,
            log_probs: self.log_softmax_rows(logits),
            caches,
        }))
    }

    fn score(&self, prompts: &[&[u32]], targets: &[&[u32]]) -> Result<Vec<Vec<f32>>, ModelError> {
        if prompts.len() != targets.len() {
            return Err(ModelError::Config {
                path: "<generator>".into(),
                field: "score".into(),
                message: format!("{} prompts but {} targets", prompts.len(), targets.len()),
            });
        }
        if let Some(r) = prompts.iter().position(|p| p.is_empty()) {
            return Err(empty_prompt(r));
        }
        // Rows that share a prompt (RAG-Sequence scores many candidates under one document)
        // run that prompt once and fork its cache.
        let mut unique: Vec<&[u32]> = Vec::new();
        let mut prompt_of_row = Vec::with_capacity(prompts.len());
        {
            let mut seen = std::collections::HashMap::new();
            for p in prompts {
                let index = *seen.entry(*p).or_insert_with(|| {
                    unique.push(*p);
                    unique.len() - 1
                });
                prompt_of_row.push(index);
            }
        }
        let mut results: Vec<Vec<f32>> = vec![Vec::new(); prompts.len()];
        let vocab = self.config.vocab_size;

        for group in budget_groups(&unique.iter().map(|p| p.len()).collect::<Vec<_>>()) {
            let group_prompts: Vec<&[u32]> = group.iter().map(|&u| unique[u]).collect();
            let (caches, last_logits) = self.prefill(&group_prompts)?;
            let first_token_log_probs = self.log_softmax_rows(last_logits);

            let rows: Vec<usize> = (0..prompts.len())
                .filter(|&r| group.contains(&prompt_of_row[r]))
                .collect();
            for r in &rows {
                if let Some(&first) = targets[*r].first() {
                    let slot = group
                        .iter()
                        .position(|&u| u == prompt_of_row[*r])
                        .expect("row's prompt is in its group");
                    let lp = first_token_log_probs[slot]
                        .get(first as usize)
                        .copied()
                        .ok_or_else(|| out_of_vocab(first, vocab))?;
                    results[*r].push(lp);
                }
            }
            // The rest of each target: feed target[..len-1] on a fork of its prompt's cache.
            let continuation_lengths: Vec<usize> = rows
                .iter()
                .map(|&r| targets[r].len().saturating_sub(1))
                .collect();
            for batch in budget_groups(&continuation_lengths) {
                let batch_rows: Vec<usize> = batch
                    .iter()
                    .map(|&i| rows[i])
                    .filter(|&r| targets[r].len() > 1)
                    .collect();
                if batch_rows.is_empty() {
                    continue;
                }
                let mut forks: Vec<RowCache> = batch_rows
                    .iter()
                    .map(|&r| {
                        let slot = group
                            .iter()
                            .position(|&u| u == prompt_of_row[r])
                            .expect("row's prompt is in its group");
                        caches[slot].clone()
                    })
                    .collect();
                let inputs: Vec<&[u32]> = batch_rows
                    .iter()
                    .map(|&r| &targets[r][..targets[r].len() - 1])
                    .collect();
                let wanted: Vec<Vec<usize>> =
                    inputs.iter().map(|t| (0..t.len()).collect()).collect();
                let logits = self.forward(&mut forks, &inputs, &wanted)?;
                let log_probs = self.log_softmax_rows(logits);
                let mut next = 0;
                for &r in &batch_rows {
                    for &token in &targets[r][1..] {
                        let lp = log_probs[next]
                            .get(token as usize)
                            .copied()
                            .ok_or_else(|| out_of_vocab(token, vocab))?;
                        results[r].push(lp);
                        next += 1;
                    }
                }
            }
        }
        Ok(results)
    }
}

/// Splits items with the given token counts into consecutive groups of at most
/// [`SCORE_TOKEN_BUDGET`] tokens (an item larger than the budget gets a group of its own).
fn budget_groups(lengths: &[usize]) -> Vec<Vec<usize>> {
    let mut groups = Vec::new();
    let mut current = Vec::new();
    let mut tokens = 0;
    for (i, &len) in lengths.iter().enumerate() {
        if !current.is_empty() && tokens + len > SCORE_TOKEN_BUDGET {
            groups.push(std::mem::take(&mut current));
            tokens = 0;
        }
        current.push(i);
        tokens += len;
    }
    if !current.is_empty() {
        groups.push(current);
    }
    groups
}

fn empty_prompt(row: usize) -> ModelError {
    ModelError::Config {
        path: "<generator>".into(),
        field: "prompt".into(),
        message: format!("prompt {row} is empty"),
    }
}

fn out_of_vocab(token: u32, vocab: usize) -> ModelError {
    ModelError::Config {
        path: "<generator>".into(),
        field: "token id".into(),
        message: format!("token {token} is outside the vocabulary of {vocab}"),
    }
}

struct LlamaDecode<'a> {
    model: &'a Llama,
    caches: Vec<RowCache>,
    log_probs: Vec<Vec<f32>>,
}

impl DecodeState for LlamaDecode<'_> {
    fn rows(&self) -> usize {
        self.caches.len()
    }

    fn log_probs(&self, row: usize) -> &[f32] {
        &self.log_probs[row]
    }

    fn advance(&mut self, tokens: &[u32]) -> Result<(), ModelError> {
        if tokens.len() != self.caches.len() {
            return Err(ModelError::Config {
                path: "<generator>".into(),
                field: "advance".into(),
                message: format!("{} tokens for {} rows", tokens.len(), self.caches.len()),
            });
        }
        let inputs: Vec<&[u32]> = tokens.iter().map(std::slice::from_ref).collect();
        let wanted = vec![vec![0]; tokens.len()];
        let logits = self.model.forward(&mut self.caches, &inputs, &wanted)?;
        self.log_probs = self.model.log_softmax_rows(logits);
        Ok(())
    }

    fn select(&mut self, rows: &[usize]) -> Result<(), ModelError> {
        if let Some(&bad) = rows.iter().find(|&&r| r >= self.caches.len()) {
            return Err(ModelError::Config {
                path: "<generator>".into(),
                field: "select".into(),
                message: format!("row {bad} of {}", self.caches.len()),
            });
        }
        // A row kept once is moved, not copied; only duplicates pay for a copy of their
        // (private) suffix.
        let mut uses = vec![0usize; self.caches.len()];
        for &r in rows {
            uses[r] += 1;
        }
        let mut old_caches: Vec<Option<RowCache>> = std::mem::take(&mut self.caches)
            .into_iter()
            .map(Some)
            .collect();
        let mut old_probs: Vec<Option<Vec<f32>>> = std::mem::take(&mut self.log_probs)
            .into_iter()
            .map(Some)
            .collect();
        for &r in rows {
            uses[r] -= 1;
            if uses[r] == 0 {
                self.caches
                    .push(old_caches[r].take().expect("each row is moved once"));
                self.log_probs
                    .push(old_probs[r].take().expect("each row is moved once"));
            } else {
                self.caches
                    .push(old_caches[r].clone().expect("row still present"));
                self.log_probs
                    .push(old_probs[r].clone().expect("row still present"));
            }
        }
        Ok(())
    }
}

multiversion! {
    /// One query head against its key/value segments (shared prefix, then the row's own
    /// suffix): softmax(q·k·scale) · v accumulated into `out`. `scores` is scratch.
    fn attend_head(
        query: &[f32],
        segments: [(&Vec<f32>, &Vec<f32>, usize); 2],
        kv_dim: usize,
        kv_offset: usize,
        scale: f32,
        scores: &mut Vec<f32>,
        out: &mut [f32],
    ) {
        let hd = query.len();
        scores.clear();
        let mut max = f32::NEG_INFINITY;
        for (keys, _, count) in segments {
            for s in 0..count {
                let key = &keys[s * kv_dim + kv_offset..s * kv_dim + kv_offset + hd];
                let score = dot(query, key) * scale;
                max = max.max(score);
                scores.push(score);
            }
        }
        let mut total = 0.0f32;
        for s in scores.iter_mut() {
            *s = (*s - max).exp();
            total += *s;
        }
        let inv = 1.0 / total;
        let mut s_index = 0;
        for (_, values, count) in segments {
            for s in 0..count {
                let weight = scores[s_index] * inv;
                s_index += 1;
                let value = &values[s * kv_dim + kv_offset..s * kv_dim + kv_offset + hd];
                for (o, v) in out.iter_mut().zip(value) {
                    *o += weight * v;
                }
            }
        }
    }
}

fn rms_norm(x: &[f32], weight: &[f32], eps: f32) -> Vec<f32> {
    let dim = weight.len();
    let mut out = vec![0.0; x.len()];
    out.par_chunks_mut(dim)
        .zip(x.par_chunks(dim))
        .for_each(|(o, x)| {
            let mean_square = x.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>() / dim as f64;
            let inv = (1.0 / (mean_square + eps as f64).sqrt()) as f32;
            for ((o, &v), &w) in o.iter_mut().zip(x).zip(weight) {
                *o = v * inv * w;
            }
        });
    out
}

fn add_assign(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

/// Dot product with eight independent accumulators, so the compiler can vectorise it.
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let chunks = a.len() / 8;
    for i in 0..chunks {
        for lane in 0..8 {
            acc[lane] += a[i * 8 + lane] * b[i * 8 + lane];
        }
    }
    let mut sum: f32 = acc.iter().sum();
    for i in chunks * 8..a.len() {
        sum += a[i] * b[i];
    }
    sum
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny_config() -> LlamaConfig {
        crate::testing::tiny_llama_config(11)
    }

    fn models() -> Vec<Llama> {
        [GgmlDType::F32, GgmlDType::Q4_1, GgmlDType::Q8_0]
            .into_iter()
            .map(|dtype| Llama::random(tiny_config(), 3, dtype).unwrap())
            .collect()
    }

    fn close(a: &[f32], b: &[f32], tolerance: f32) -> bool {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() <= tolerance)
    }

    const PROMPTS: [&[u32]; 3] = [&[1, 2, 3], &[4, 5, 6, 7, 8, 9, 10], &[2]];
    const TARGETS: [&[u32]; 3] = [&[5, 6, 0], &[1], &[3, 3, 3, 3, 9]];

    #[test]
    fn incremental_decoding_equals_teacher_forcing_and_batching_changes_nothing() {
        for model in models() {
            let scored = model.score(&PROMPTS, &TARGETS).unwrap();
            // One row at a time, through start/advance.
            for r in 0..PROMPTS.len() {
                let mut state = model.start(&[PROMPTS[r]]).unwrap();
                for (i, &token) in TARGETS[r].iter().enumerate() {
                    let lp = state.log_probs(0)[token as usize];
                    assert!(
                        (lp - scored[r][i]).abs() < 1e-4,
                        "row {r} token {i}: {lp} vs {}",
                        scored[r][i]
                    );
                    state.advance(&[token]).unwrap();
                }
            }
            // Each row scored alone.
            for r in 0..PROMPTS.len() {
                let alone = model.score(&[PROMPTS[r]], &[TARGETS[r]]).unwrap();
                assert!(close(&alone[0], &scored[r], 1e-5));
            }
            // And against the full causal forward of prompt ∘ target.
            for r in 0..PROMPTS.len() {
                let sequence: Vec<u32> = PROMPTS[r].iter().chain(TARGETS[r]).copied().collect();
                let logits = model.logits_all(&sequence).unwrap();
                for (i, &token) in TARGETS[r].iter().enumerate() {
                    let row = &logits[PROMPTS[r].len() - 1 + i];
                    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let log_z = max + row.iter().map(|v| (v - max).exp()).sum::<f32>().ln();
                    assert!((row[token as usize] - log_z - scored[r][i]).abs() < 1e-4);
                }
            }
        }
    }

    #[test]
    fn log_probs_are_normalised() {
        let model = Llama::random(tiny_config(), 9, GgmlDType::F32).unwrap();
        let state = model.start(&PROMPTS).unwrap();
        for r in 0..state.rows() {
            let total: f64 = state.log_probs(r).iter().map(|&v| (v as f64).exp()).sum();
            assert!((total - 1.0).abs() < 1e-5, "{total}");
        }
    }

    #[test]
    fn select_reorders_and_duplicates_rows_with_their_caches() {
        let model = Llama::random(tiny_config(), 5, GgmlDType::Q4_1).unwrap();
        let mut state = model.start(&PROMPTS).unwrap();
        state.advance(&[7, 8, 9]).unwrap();
        state.select(&[2, 0, 2]).unwrap();
        assert_eq!(state.rows(), 3);
        state.advance(&[1, 2, 3]).unwrap();
        let expect = |prompt: &[u32], tokens: &[u32]| {
            let mut fresh = model.start(&[prompt]).unwrap();
            for &t in tokens {
                fresh.advance(&[t]).unwrap();
            }
            fresh.log_probs(0).to_vec()
        };
        assert!(close(
            state.log_probs(0),
            &expect(PROMPTS[2], &[9, 1]),
            1e-5
        ));
        assert!(close(
            state.log_probs(1),
            &expect(PROMPTS[0], &[7, 2]),
            1e-5
        ));
        assert!(close(
            state.log_probs(2),
            &expect(PROMPTS[2], &[9, 3]),
            1e-5
        ));
        assert!(state.select(&[3]).is_err());
    }

    #[test]
    fn shared_prompts_are_scored_like_separate_ones() {
        let model = Llama::random(tiny_config(), 4, GgmlDType::F32).unwrap();
        let prompts: [&[u32]; 4] = [&[1, 2], &[1, 2], &[3], &[1, 2]];
        let targets: [&[u32]; 4] = [&[4, 5], &[6], &[7, 8, 9], &[]];
        let together = model.score(&prompts, &targets).unwrap();
        for r in 0..4 {
            let alone = model.score(&[prompts[r]], &[targets[r]]).unwrap();
            assert!(close(&alone[0], &together[r], 1e-5));
        }
        assert!(together[3].is_empty());
    }

    #[test]
    fn cached_prompts_give_the_same_results_as_fresh_ones() {
        let model = Llama::random(tiny_config(), 8, GgmlDType::Q4_1).unwrap();
        model.clear_prompt_cache();
        let fresh = model.score(&PROMPTS, &TARGETS).unwrap();
        let cached = model.score(&PROMPTS, &TARGETS).unwrap();
        assert_eq!(fresh, cached);
        let state = model.start(&PROMPTS).unwrap();
        for r in 0..PROMPTS.len() {
            let first = TARGETS[r][0] as usize;
            assert_eq!(state.log_probs(r)[first], fresh[r][0]);
        }
        // A tiny budget evicts the oldest prompt first.
        let mut cache = PromptCache::new(5);
        let kv = Arc::new(KvBuffers::new(1));
        cache.insert(&[1, 2, 3], kv.clone(), vec![]);
        cache.insert(&[4, 5], kv.clone(), vec![]);
        cache.insert(&[6], kv.clone(), vec![]);
        assert!(
            cache.get(&[1, 2, 3]).is_none()
                && cache.get(&[4, 5]).is_some()
                && cache.get(&[6]).is_some()
        );
        cache.insert(&[7; 9], kv, vec![]);
        assert!(cache.get(&[7; 9]).is_none(), "larger than the budget");
    }

    #[test]
    fn bad_input_is_an_error_not_a_panic() {
        let model = Llama::random(tiny_config(), 1, GgmlDType::F32).unwrap();
        assert!(model.start(&[&[]]).is_err());
        assert!(model.start(&[&[11]]).is_err());
        assert!(model.score(&[&[1]], &[&[11]]).is_err());
        assert!(model.score(&[&[1]], &[]).is_err());
        let long = vec![1u32; 65];
        assert!(model.start(&[&long]).is_err());
    }
}
