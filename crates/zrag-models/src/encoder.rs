//! Text in, unit vectors out: [`BertEncoder`] (tokenizer + [`BertModel`] + pooling) and the
//! retriever's two encoders as a [`BiEncoder`].
//!
//! Throughput comes from length bucketing: texts are sorted by token count and cut into
//! batches, so each batch pads to nearly its own length and little compute is spent on padding.
//! Results are put back in input order. Within a batch the matmuls and fused ops use candle's
//! thread pool (all cores, or `RAYON_NUM_THREADS`).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use tokenizers::{Tokenizer, TruncationDirection, TruncationParams, TruncationStrategy};

use rayon::prelude::*;

use crate::bert::{l2_normalize, pool, BertModel, OpSet};
use crate::config::{max_seq_length, BertConfig, Pooling};
use crate::identity::{weights_sha256, ModelIdentity};
use crate::ModelError;

/// Texts per forward pass unless [`BertEncoder::set_batch_size`] says otherwise.
pub const DEFAULT_BATCH_SIZE: usize = 32;

/// Upper bound on padded tokens (texts × longest length) in one forward pass. Batches of long
/// texts are split below it so the largest activation (tokens × intermediate size × 4 bytes,
/// 24 MiB for MiniLM) stays under glibc's 32 MiB mmap threshold and mostly in L3: a 32 × 256
/// batch otherwise maps, page-faults and zeroes a fresh 48 MiB buffer per layer.
pub const MAX_TOKENS_PER_FORWARD: usize = 4096;

/// Arithmetic of the encoder's dense layers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum EncoderPrecision {
    /// f32 throughout: embeddings equal the reference implementation (cosine ≥ 0.9999).
    #[default]
    F32,
    /// int8 dense layers (per-channel weights, per-token activations; AVX-512 VNNI or AVX2
    /// kernels); embeddings within the bound `BENCHMARKS.md` states (measured min cosine to f32
    /// 0.995 on 1,792 benchmark texts, 0.992 on a two-word text). Vectors
    /// made this way can be searched with f32 queries and vice versa.
    Int8,
}

impl EncoderPrecision {
    pub fn as_str(self) -> &'static str {
        match self {
            EncoderPrecision::F32 => "f32",
            EncoderPrecision::Int8 => "int8",
        }
    }
}

impl std::str::FromStr for EncoderPrecision {
    type Err = String;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        match value {
            "f32" => Ok(EncoderPrecision::F32),
            "int8" => Ok(EncoderPrecision::Int8),
            other => Err(format!("unknown encoder precision {other:?} (f32 or int8)")),
        }
    }
}

impl std::fmt::Display for EncoderPrecision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Texts tokenised at a time: bounds the memory held by the tokenizer's rich `Encoding`s
/// (offsets, strings) before they are reduced to plain ids.
const TOKENIZE_CHUNK: usize = 2048;

/// A sentence encoder: a BERT model with its tokenizer and pooling, producing L2-normalised
/// embeddings.
pub struct BertEncoder {
    model: BertModel,
    /// Adds `[CLS]`/`[SEP]` and truncates to `max_seq_len`; never pads (batches pad themselves).
    tokenizer: Tokenizer,
    /// The same tokenizer without truncation, for [`BertEncoder::count_tokens`].
    counting_tokenizer: Tokenizer,
    tokenizer_path: PathBuf,
    pooling: Pooling,
    /// Longest input the model reads, `[CLS]` and `[SEP]` included.
    max_seq_len: usize,
    pad_id: u32,
    batch_size: usize,
    precision: EncoderPrecision,
    identity: ModelIdentity,
    device: Device,
}

impl std::fmt::Debug for BertEncoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BertEncoder")
            .field("identity", &self.identity)
            .field("pooling", &self.pooling)
            .field("max_seq_len", &self.max_seq_len)
            .field("batch_size", &self.batch_size)
            .field("precision", &self.precision)
            .finish_non_exhaustive()
    }
}

impl BertEncoder {
    /// Loads a Hugging Face-format BERT directory: `config.json`, `model.safetensors`,
    /// `tokenizer.json`, and optionally `1_Pooling/config.json` (default: mean pooling) and
    /// `sentence_bert_config.json` (default sequence length 256).
    pub fn load(dir: &Path) -> Result<Self, ModelError> {
        Self::load_impl(dir, None)
    }

    /// Loads the model with every weight held as a trainable variable in the returned
    /// [`VarMap`] (named as in the file). Gradients of [`BertEncoder::embed_token_batch`]
    /// reach those variables; after an optimiser changes them, call
    /// [`BertEncoder::refresh_weights`] before the next forward pass.
    pub fn load_trainable(dir: &Path) -> Result<(Self, VarMap), ModelError> {
        let varmap = VarMap::new();
        let encoder = Self::load_impl(dir, Some(&varmap))?;
        Ok((encoder, varmap))
    }

    /// Rebuilds the forward pass from the current values of `varmap` (the one
    /// [`BertEncoder::load_trainable`] returned, or a copy of it). The model keeps stacked and
    /// transposed copies of some weights for speed; this re-derives them (milliseconds).
    pub fn refresh_weights(&mut self, varmap: &VarMap) -> Result<(), ModelError> {
        self.model = self.model_from(varmap)?;
        Ok(())
    }

    /// A second encoder with this one's tokenizer and settings and the weights in `varmap`
    /// (e.g. a frozen copy of E_D taken during training, for re-encoding the corpus).
    pub fn with_weights(&self, varmap: &VarMap) -> Result<Self, ModelError> {
        Ok(Self {
            model: self.model_from(varmap)?,
            tokenizer: self.tokenizer.clone(),
            counting_tokenizer: self.counting_tokenizer.clone(),
            tokenizer_path: self.tokenizer_path.clone(),
            pooling: self.pooling,
            max_seq_len: self.max_seq_len,
            pad_id: self.pad_id,
            batch_size: self.batch_size,
            precision: self.precision,
            identity: self.identity.clone(),
            device: self.device.clone(),
        })
    }

    fn model_from(&self, varmap: &VarMap) -> Result<BertModel, ModelError> {
        let config = self.model.config().clone();
        let vb = VarBuilder::from_varmap(varmap, DType::F32, &self.device);
        let model = BertModel::load(vb, &config, Path::new(&self.identity.name))?
            .with_ops(self.model.ops());
        match self.precision {
            EncoderPrecision::F32 => Ok(model),
            EncoderPrecision::Int8 => Ok(model.with_int8_dense(true)?),
        }
    }

    /// Switches the dense layers between f32 and int8 (quantising takes milliseconds). int8
    /// has no gradients: a trainer must keep f32.
    pub fn set_precision(&mut self, precision: EncoderPrecision) -> Result<(), ModelError> {
        if precision != self.precision {
            self.model = self
                .model
                .with_int8_dense(precision == EncoderPrecision::Int8)?;
            self.precision = precision;
        }
        Ok(())
    }

    pub fn precision(&self) -> EncoderPrecision {
        self.precision
    }

    /// Runs the model on zrag's fused kernels (the default) or on candle's primitive ops
    /// (the reference for gradient checks and speed comparisons).
    pub fn set_ops(&mut self, ops: OpSet) {
        self.model = self.model.with_ops(ops);
    }

    fn load_impl(dir: &Path, trainable: Option<&VarMap>) -> Result<Self, ModelError> {
        if !dir.is_dir() {
            return Err(ModelError::MissingFile {
                path: dir.to_path_buf(),
                hint: "expected a model directory with config.json, model.safetensors and \
                       tokenizer.json"
                    .into(),
            });
        }
        let config_path = required_file(dir, "config.json")?;
        let weights_path = required_file(dir, "model.safetensors")?;
        let tokenizer_path = required_file(dir, "tokenizer.json")?;

        let config = BertConfig::from_file(&config_path)?;
        let pooling = Pooling::from_model_dir(dir)?;
        let max_seq_len = max_seq_length(dir, &config)?;

        let (tokenizer, counting_tokenizer) =
            load_tokenizers(&tokenizer_path, max_seq_len, &config)?;
        // Padded positions are masked out, so the id only has to be a valid row.
        let pad_id = tokenizer.token_to_id("[PAD]").unwrap_or(0);

        let device = Device::Cpu;
        let bytes = std::fs::read(&weights_path).map_err(|source| ModelError::Io {
            path: weights_path.clone(),
            source,
        })?;
        let sha256 = weights_sha256(&weights_path, &bytes)?;
        let vb = match trainable {
            None => VarBuilder::from_slice_safetensors(&bytes, DType::F32, &device),
            Some(varmap) => {
                fill_varmap(varmap, &bytes, &device).map_err(|err| ModelError::Weights {
                    path: weights_path.clone(),
                    tensor: "(header)".into(),
                    message: err.to_string(),
                })?;
                Ok(VarBuilder::from_varmap(varmap, DType::F32, &device))
            }
        }
        .map_err(|err| ModelError::Weights {
            path: weights_path.clone(),
            tensor: "(header)".into(),
            message: err.to_string(),
        })?;
        let stored = trainable.map(|v| v.all_vars().len());
        let model = BertModel::load(vb, &config, &weights_path)?;
        // A VarMap creates any variable it is asked for: a tensor missing from the file must
        // still be an error, as it is for the read-only load.
        if let (Some(varmap), Some(stored)) = (trainable, stored) {
            if varmap.all_vars().len() != stored {
                return Err(ModelError::Weights {
                    path: weights_path.clone(),
                    tensor: "(model)".into(),
                    message: "the file lacks tensors the model needs".into(),
                });
            }
        }

        let name = std::fs::canonicalize(dir)
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_else(|| dir.display().to_string());
        Ok(Self {
            identity: ModelIdentity {
                name,
                sha256,
                dim: config.hidden_size,
            },
            model,
            tokenizer,
            counting_tokenizer,
            tokenizer_path,
            pooling,
            max_seq_len,
            pad_id,
            batch_size: DEFAULT_BATCH_SIZE,
            precision: EncoderPrecision::F32,
            device,
        })
    }

    /// Embedding dimension.
    pub fn dim(&self) -> usize {
        self.model.config().hidden_size
    }

    /// The most text tokens, as counted by [`BertEncoder::count_tokens`], that the encoder
    /// reads; longer texts are truncated. This is the sequence length minus `[CLS]` and `[SEP]`
    /// (254 for all-MiniLM-L6-v2, whose sequence length is 256), so a chunker can compare
    /// `count_tokens(chunk) <= max_tokens()` directly.
    pub fn max_tokens(&self) -> usize {
        self.max_seq_len - 2
    }

    pub fn identity(&self) -> &ModelIdentity {
        &self.identity
    }

    /// Texts per forward pass (at least 1).
    pub fn set_batch_size(&mut self, n: usize) {
        self.batch_size = n.max(1);
    }

    pub fn batch_size(&self) -> usize {
        self.batch_size
    }

    pub fn pooling(&self) -> Pooling {
        self.pooling
    }

    /// The underlying transformer, for training code that drives the forward pass itself.
    pub fn model(&self) -> &BertModel {
        &self.model
    }

    /// L2-normalised embeddings of `texts`, in input order.
    pub fn embed(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>, ModelError> {
        self.embed_with_progress(texts, &mut |_| {})
    }

    /// Like [`BertEncoder::embed`], calling `on_progress(texts_done)` after every batch.
    pub fn embed_with_progress(
        &self,
        texts: &[&str],
        on_progress: &mut dyn FnMut(usize),
    ) -> Result<Vec<Vec<f32>>, ModelError> {
        let token_ids = self.tokenize(texts)?;
        // Length bucketing: neighbours in this order have (nearly) equal lengths. The sort is
        // stable, so equal-length texts keep their relative order and results are
        // deterministic.
        let mut order: Vec<usize> = (0..texts.len()).collect();
        order.sort_by_key(|&i| token_ids[i].len());

        let mut embeddings = vec![Vec::new(); texts.len()];
        let mut done = 0;
        let batches = token_budget_batches(&order, &token_ids, self.batch_size);
        let embed_batch = |batch: &[usize]| -> Result<Vec<Vec<f32>>, ModelError> {
            let sequences: Vec<&[u32]> = batch.iter().map(|&i| token_ids[i].as_slice()).collect();
            Ok(self.embed_token_batch(&sequences)?.to_vec2::<f32>()?)
        };
        // Data parallelism: one batch per thread, each with single-threaded matmuls, scales
        // better than splitting every matmul across threads (measured 1.25x on 2 cores: gemm
        // reaches 70 GFLOP/s on one thread but 112 on two). A lone batch keeps the
        // multi-threaded matmuls.
        let workers = rayon::current_num_threads().max(1);
        for group in batches.chunks(workers) {
            let vectors: Vec<Vec<Vec<f32>>> = if group.len() == 1 {
                vec![embed_batch(group[0])?]
            } else {
                group
                    .par_iter()
                    .map(|batch| crate::ops::batch_parallel(|| embed_batch(batch)))
                    .collect::<Result<_, _>>()?
            };
            for (batch, vectors) in group.iter().zip(vectors) {
                for (&index, vector) in batch.iter().zip(vectors) {
                    embeddings[index] = vector;
                }
                done += batch.len();
                on_progress(done);
            }
        }
        Ok(embeddings)
    }

    /// Token ids of each text, with `[CLS]`/`[SEP]` and truncated to the model's sequence length.
    pub fn tokenize(&self, texts: &[&str]) -> Result<Vec<Vec<u32>>, ModelError> {
        let mut ids = Vec::with_capacity(texts.len());
        for chunk in texts.chunks(TOKENIZE_CHUNK) {
            let encodings = self
                .tokenizer
                .encode_batch_fast(chunk.to_vec(), true)
                .map_err(|err| self.tokenizer_error(err))?;
            ids.extend(encodings.into_iter().map(|e| e.get_ids().to_vec()));
        }
        Ok(ids)
    }

    /// Embeddings `(batch, dim)` of already tokenised sequences (each with its special
    /// tokens), padded to the longest in the batch. Differentiable when the model's weights
    /// are variables.
    pub fn embed_token_batch(&self, sequences: &[&[u32]]) -> Result<Tensor, ModelError> {
        let batch = sequences.len();
        let seq_len = sequences.iter().map(|s| s.len()).max().unwrap_or(0);
        if batch == 0 || seq_len == 0 {
            return Ok(Tensor::zeros(
                (batch, self.dim()),
                DType::F32,
                &self.device,
            )?);
        }
        let mut ids = vec![self.pad_id; batch * seq_len];
        let mut mask = vec![0f32; batch * seq_len];
        for (row, sequence) in sequences.iter().enumerate() {
            let start = row * seq_len;
            ids[start..start + sequence.len()].copy_from_slice(sequence);
            mask[start..start + sequence.len()].fill(1.0);
        }
        let ids = Tensor::from_vec(ids, (batch, seq_len), &self.device)?;
        // Single-sentence inputs: every token is segment 0.
        let token_types = ids.zeros_like()?;
        let mask = Tensor::from_vec(mask, (batch, seq_len), &self.device)?;
        let states = self.model.forward(&ids, &token_types, &mask)?;
        Ok(l2_normalize(&pool(self.pooling, &states, &mask)?)?)
    }

    /// Number of tokens in `text`, without `[CLS]`/`[SEP]` and without truncation.
    pub fn count_tokens(&self, text: &str) -> usize {
        match self.counting_tokenizer.encode_fast(text, false) {
            Ok(encoding) => encoding.len(),
            // WordPiece does not fail on text; should a custom tokenizer do so, a word count
            // is a sane lower-bound estimate for a chunker.
            Err(_) => text.split_whitespace().count(),
        }
    }

    fn tokenizer_error(&self, err: tokenizers::Error) -> ModelError {
        ModelError::Tokenizer {
            path: self.tokenizer_path.clone(),
            message: err.to_string(),
        }
    }
}

impl zrag_text::TokenCounter for BertEncoder {
    fn count_tokens(&self, text: &str) -> usize {
        BertEncoder::count_tokens(self, text)
    }
}

/// The retriever's query encoder E_Q and document encoder E_D (SPEC §1). They start from the
/// same checkpoint and may diverge after training.
#[derive(Clone, Debug)]
pub struct BiEncoder {
    pub query: Arc<BertEncoder>,
    pub document: Arc<BertEncoder>,
}

impl BiEncoder {
    /// One model serving as both E_Q and E_D (loaded once).
    pub fn load_shared(dir: &Path) -> Result<Self, ModelError> {
        let encoder = Arc::new(BertEncoder::load(dir)?);
        Ok(Self {
            query: encoder.clone(),
            document: encoder,
        })
    }

    /// Separate E_Q and E_D. If both paths name the same directory the model is loaded once.
    pub fn load(query_dir: &Path, doc_dir: &Path) -> Result<Self, ModelError> {
        let same = match (
            std::fs::canonicalize(query_dir),
            std::fs::canonicalize(doc_dir),
        ) {
            (Ok(q), Ok(d)) => q == d,
            _ => false,
        };
        if same {
            return Self::load_shared(query_dir);
        }
        Ok(Self {
            query: Arc::new(BertEncoder::load(query_dir)?),
            document: Arc::new(BertEncoder::load(doc_dir)?),
        })
    }
}

/// Consecutive runs of `order` (sorted by ascending length) with at most `batch_size` texts and
/// at most [`MAX_TOKENS_PER_FORWARD`] padded tokens (a single text may exceed it alone).
fn token_budget_batches<'a>(
    order: &'a [usize],
    token_ids: &[Vec<u32>],
    batch_size: usize,
) -> Vec<&'a [usize]> {
    let mut batches = Vec::new();
    let mut start = 0;
    while start < order.len() {
        let mut end = start + 1;
        // Sorted ascending, so the text at `end` is the longest of start..=end.
        while end < order.len()
            && end - start < batch_size
            && (end - start + 1) * token_ids[order[end]].len() <= MAX_TOKENS_PER_FORWARD
        {
            end += 1;
        }
        batches.push(&order[start..end]);
        start = end;
    }
    batches
}

/// Every tensor of a safetensors buffer as an f32 variable in `varmap`.
fn fill_varmap(varmap: &VarMap, bytes: &[u8], device: &Device) -> candle_core::Result<()> {
    let tensors = candle_core::safetensors::load_buffer(bytes, device)?;
    let mut data = varmap.data().lock().unwrap_or_else(|e| e.into_inner());
    for (name, tensor) in tensors {
        let var = candle_core::Var::from_tensor(&tensor.to_dtype(DType::F32)?)?;
        data.insert(name, var);
    }
    Ok(())
}

fn required_file(dir: &Path, name: &str) -> Result<PathBuf, ModelError> {
    let path = dir.join(name);
    if path.is_file() {
        Ok(path)
    } else {
        Err(ModelError::MissingFile {
            path,
            hint: format!("a BERT model directory needs {name}"),
        })
    }
}

/// The embedding tokenizer (truncating, no padding) and the counting one (no truncation).
fn load_tokenizers(
    path: &Path,
    max_seq_len: usize,
    config: &BertConfig,
) -> Result<(Tokenizer, Tokenizer), ModelError> {
    let error = |message: String| ModelError::Tokenizer {
        path: path.to_path_buf(),
        message,
    };
    let mut tokenizer = Tokenizer::from_file(path).map_err(|err| error(err.to_string()))?;
    let vocab = tokenizer.get_vocab_size(true);
    if vocab > config.vocab_size {
        return Err(error(format!(
            "has {vocab} tokens but config.json's vocab_size is {}",
            config.vocab_size
        )));
    }
    // tokenizer.json files often carry the settings of their last use (all-MiniLM-L6-v2's pads
    // to a fixed 128 and truncates at 128); the encoder decides both itself.
    tokenizer.with_padding(None);
    let mut counting = tokenizer.clone();
    counting
        .with_truncation(None)
        .map_err(|err| error(err.to_string()))?;
    tokenizer
        .with_truncation(Some(TruncationParams {
            direction: TruncationDirection::Right,
            max_length: max_seq_len,
            strategy: TruncationStrategy::LongestFirst,
            stride: 0,
        }))
        .map_err(|err| error(err.to_string()))?;
    Ok((tokenizer, counting))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_budget_batches_respect_count_and_padded_tokens() {
        let lengths = [10usize, 20, 100, 200, 256, 256, 256, 5000];
        let token_ids: Vec<Vec<u32>> = lengths.iter().map(|&n| vec![0; n]).collect();
        let order: Vec<usize> = (0..lengths.len()).collect();
        let batches = token_budget_batches(&order, &token_ids, 3);
        let flat: Vec<usize> = batches.iter().flat_map(|b| b.iter().copied()).collect();
        assert_eq!(flat, order, "every text exactly once, in order");
        for batch in &batches {
            let longest = batch.iter().map(|&i| lengths[i]).max().unwrap();
            assert!(batch.len() <= 3);
            assert!(batch.len() == 1 || batch.len() * longest <= MAX_TOKENS_PER_FORWARD);
        }
        // 16 texts of 256 tokens fill the budget exactly; the 17th starts a new batch.
        let long = vec![vec![0u32; 256]; 17];
        let order: Vec<usize> = (0..17).collect();
        let sizes: Vec<usize> = token_budget_batches(&order, &long, 32)
            .iter()
            .map(|b| b.len())
            .collect();
        assert_eq!(sizes, vec![16, 1]);
    }
}
