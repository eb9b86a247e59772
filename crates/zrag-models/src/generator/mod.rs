//! Causal language models: the generator p_θ(y_i | x, z, y_<i) of RAG.
//!
//! The RAG layer needs three things from a generator, and [`CausalLm`] is exactly those:
//! - next-token log-probabilities for a *batch* of prompts, advanced one token per row at a
//!   time ([`DecodeState`]), so that the k retrieved documents of one question decode as one
//!   batch rather than k sequential generations;
//! - row selection on that state ([`DecodeState::select`]), which is what beam search needs
//!   (drop, keep or duplicate rows together with their KV caches);
//! - teacher-forced scoring ([`CausalLm::score`]): log p(y_i | prompt, y_<i) at every position
//!   of a given continuation, for many (prompt, continuation) pairs in one pass.
//!
//! Everything is in token ids; text enters and leaves through the model's tokenizer.
//! Log-probabilities are natural logs, normalised over the full vocabulary.
//!
//! [`lora`] trains LoRA adapters of a [`Llama`] (a differentiable forward over its f32
//! weights) and saves them; [`Llama::apply_adapter`] merges one into the model.

use crate::ModelError;

/// One batch of sequences being decoded together. Row `r` is prompt `r` of
/// [`CausalLm::start`] followed by every token given to [`DecodeState::advance`] for that row.
pub trait DecodeState {
    /// Number of rows (sequences) in the batch.
    fn rows(&self) -> usize;

    /// log p(next token | row so far) for row `row`: one entry per vocabulary id, natural log,
    /// log-sum-exp = 0.
    fn log_probs(&self, row: usize) -> &[f32];

    /// Appends `tokens[r]` to row `r` for every row (one forward step for the whole batch) and
    /// recomputes [`DecodeState::log_probs`].
    fn advance(&mut self, tokens: &[u32]) -> Result<(), ModelError>;

    /// Keeps rows `rows[0], rows[1], ...` in that order (indices into the current rows; a row
    /// may repeat, which duplicates it with its cache). Afterwards the batch has `rows.len()`
    /// rows.
    fn select(&mut self, rows: &[usize]) -> Result<(), ModelError>;
}

/// A causal language model over token ids.
pub trait CausalLm: Send + Sync {
    /// Size of the vocabulary; the length of every log-probability row.
    fn vocab_size(&self) -> usize;

    /// Tokens that end a generation (end-of-sequence, end-of-turn).
    fn stop_tokens(&self) -> &[u32];

    /// Runs every prompt (non-empty) as one batch and returns the decoding state positioned
    /// after each prompt.
    fn start(&self, prompts: &[&[u32]]) -> Result<Box<dyn DecodeState + '_>, ModelError>;

    /// Teacher-forced scoring: for each pair `(prompts[r], targets[r])`, returns
    /// `log p(targets[r][i] | prompts[r], targets[r][..i])` for every `i`, computed in one
    /// batched forward pass (no sampling, no cache kept).
    fn score(&self, prompts: &[&[u32]], targets: &[&[u32]]) -> Result<Vec<Vec<f32>>, ModelError>;
}

pub mod gguf;
pub mod llama;
mod load;
pub mod lora;
mod quant;
pub mod tokenizer;

pub use candle_core::quantized::GgmlDType;
pub use llama::{Llama, LlamaConfig};
pub use load::{default_generator_path, LocalGenerator, WeightPrecision, DEFAULT_GENERATOR_FILE};
pub use lora::{LoraAdapter, LoraConfig, LoraModel, LoraTarget};
pub use tokenizer::{ChatMessage, ChatTemplate, GeneratorTokenizer, Segment, TextStream};
