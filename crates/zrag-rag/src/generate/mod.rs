//! RAG generation: marginalising a causal LM over the k retrieved documents (Lewis et al.
//! 2020, §2.1–2.4), in log space, with the k documents always run as one batch.
//!
//! # Inputs
//!
//! Every entry point takes the generator (`&dyn CausalLm`), the k tokenised prompts z∘x (one
//! per retrieved document, in retrieval order) and `prior`, the k values log p_η(z|x) (natural
//! logs, normalised: log-sum-exp 0 within 1e-6; [`logspace::log_softmax`] computes it from
//! retrieval scores without underflow). Plain single-context generation (closed-book, or
//! retrieve-then-read with the documents concatenated into one prompt) is the k = 1 case with
//! `prior = [0.0]`; [`generate`] is that shortcut.
//!
//! # Scoring (teacher forcing, one batched `score` call over the k documents)
//!
//! - [`score_sequence`]: RAG-Sequence, log p(y|x) = logsumexp_z(log p_η(z|x) + Σ_i log
//!   p_θ(y_i|x,z,y_<i)), with the per-document log-likelihoods and the posterior
//!   p(z|x,y) ∝ p_η(z|x) p_θ(y|x,z).
//! - [`score_token`]: RAG-Token, log p(y|x) = Σ_i logsumexp_z(log p_η(z|x) + log
//!   p_θ(y_i|x,z,y_<i)), with the per-token posteriors p(z|x,y_i,y_<i) and their mean as the
//!   sequence-level summary (see [`TokenScore::posterior`] for why the mean).
//!
//! The target is scored exactly as given: to score a complete answer, append its stop token.
//!
//! # Decoding ([`decode`])
//!
//! [`Marginalize::Token`] mixes the k next-token distributions with the prior at every step
//! and decodes greedily, by sampling, or by beam search, with one [`DecodeState`] holding k
//! rows per hypothesis (k × beam rows, reordered with `select` when beams change).
//!
//! [`Marginalize::Sequence`] runs a beam search per document, all k documents' beams in one
//! `DecodeState`, and picks the candidate with the highest p(y|x) = Σ_z p_η(z|x) p(y|x,z):
//! [`SequenceDecoding::Thorough`] scores every candidate under the documents whose beam did
//! not produce it (one extra batched `score` call); [`SequenceDecoding::Fast`] takes
//! p(y|x,z) ≈ 0 there instead. Greedy is the beam of width 1 per document. Sampling is exact
//! ancestral sampling of the RAG-Sequence model: z ~ p_η(z|x), then y ~ p_θ(·|x,z) (only that
//! document's prompt runs); thorough mode then scores y under the other documents.
//!
//! Conventions, the same for every mode:
//! - **Stop tokens** are the model's [`CausalLm::stop_tokens`] plus
//!   [`DecodeOptions::extra_stop_tokens`]. A generation that ends at a stop token does not
//!   return it in [`Decoded::tokens`] (it is in [`Decoded::finish`]), but its probability
//!   *is* counted in [`Decoded::log_prob`]: log p(y|x) is the probability of the complete
//!   answer "tokens, then stop", so the probabilities of all complete answers (plus the prefix
//!   mass of unfinished ones) sum to 1. A generation cut at `max_new_tokens` has no stop term:
//!   its `log_prob` is that of the prefix.
//! - **`max_new_tokens`** bounds the decoding steps, a final stop token included (as in
//!   Hugging Face's `max_new_tokens`).
//! - **Beam scores** are plain log p(y|x), no length normalisation (as Lewis et al.), so a
//!   beam wide enough to hold every answer returns the exact argmax. A beam step keeps the
//!   `width` best expansions; expansions that end in a stop token leave the beam for the
//!   finished list (so width 1 is exactly greedy), and the search ends once no hypothesis still
//!   in the beam can beat what is needed from the finished list.
//! - **Sampling** draws from p^(1/T) restricted to the top-p nucleus, from a SplitMix64 stream
//!   seeded with [`Sampling::seed`] (deterministic given the seed). Temperature and top-p shape
//!   the draw only; `log_prob` always reports the model's untempered probability.
//! - **Streaming**: the `on_token` callback receives each output token as soon as it is fixed:
//!   during decoding for greedy and sampling, and (since a beam may still replace its leader)
//!   all at once after the search for beam modes, including RAG-Sequence greedy, which is a
//!   beam search over the documents. Stop tokens are never passed to it.
//!
//! # Files
//!
//! - `mod.rs`: the public types and the entry points [`decode`], [`generate`]; input checks.
//! - [`logspace`]: log-sum-exp and normalisation that tolerate −∞.
//! - `score.rs`: [`score_sequence`], [`score_token`] and the posterior arithmetic that the
//!   decoders share with them (so a decoded answer's numbers equal its re-scored ones).
//! - `path.rs`: one hypothesis, greedy or sampled, over mixed rows (RAG-Token, RAG-Sequence
//!   sampling).
//! - `beam.rs`: the beam search engine: groups of hypotheses, each hypothesis owning a fixed
//!   number of rows mixed with fixed weights (RAG-Token: one group, k rows weighted by the
//!   prior; RAG-Sequence: k groups of one row), a node arena instead of copied token lists.
//! - `token.rs`, `sequence.rs`: the two marginalisations on top of those.
//! - `rng.rs`: SplitMix64 and the temperature / top-p sampler.
//! - `tests/`: a table LM (next-token distribution = hash of the full history) and brute-force
//!   checks against enumeration and naive probability-space references.

mod beam;
pub mod logspace;
mod path;
mod rng;
mod score;
mod sequence;
mod token;

#[cfg(test)]
mod tests;

use serde::Serialize;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use zrag_models::{CausalLm, DecodeState};

use crate::RagError;

pub use score::{score_sequence, score_token, SequenceScore, TokenScore};

/// How the k documents are combined.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Marginalize {
    /// RAG-Token: p(y|x) = Π_i Σ_z p_η(z|x) p_θ(y_i|x,z,y_<i).
    Token,
    /// RAG-Sequence: p(y|x) = Σ_z p_η(z|x) Π_i p_θ(y_i|x,z,y_<i).
    Sequence(SequenceDecoding),
}

/// The two RAG-Sequence decoders of Lewis et al. 2020, §2.4.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SequenceDecoding {
    /// Score each candidate under every document (one extra batched `score` pass).
    #[default]
    Thorough,
    /// p(y|x,z) ≈ 0 for a candidate that document z's beam did not produce (no extra pass).
    Fast,
}

/// Temperature / top-p sampling parameters.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Sampling {
    /// T > 0: draws from p^(1/T); 1 is the model's distribution.
    pub temperature: f64,
    /// 0 < top_p ≤ 1: keep the most probable tokens whose mass first reaches top_p.
    pub top_p: f64,
    /// Seed of the SplitMix64 stream; the same seed gives the same output.
    pub seed: u64,
}

impl Default for Sampling {
    fn default() -> Self {
        Sampling {
            temperature: 1.0,
            top_p: 1.0,
            seed: 0,
        }
    }
}

/// The search strategy.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Search {
    Greedy,
    Sample(Sampling),
    Beam { width: usize },
}

/// A flag another thread sets to stop a decoding at its next step (a client that went away,
/// a request past its time limit). Clones share the flag.
#[derive(Clone, Debug, Default)]
pub struct CancelFlag(Arc<AtomicBool>);

impl CancelFlag {
    pub fn cancel(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }

    /// `Err(RagError::Cancelled)` once cancelled: the check at the top of each decoding step.
    pub(crate) fn check(&self) -> Result<(), RagError> {
        if self.is_cancelled() {
            return Err(RagError::Cancelled);
        }
        Ok(())
    }
}

/// Options are equal whatever their flags: a flag is a handle, not a setting.
impl PartialEq for CancelFlag {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

/// Decoding options (see the module documentation for the conventions).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct DecodeOptions {
    /// Maximum decoding steps, a final stop token included.
    pub max_new_tokens: usize,
    pub search: Search,
    /// Stop tokens in addition to the model's own.
    pub extra_stop_tokens: Vec<u32>,
    /// Checked before every decoding step.
    #[serde(skip)]
    pub cancel: CancelFlag,
}

impl Default for DecodeOptions {
    fn default() -> Self {
        DecodeOptions {
            max_new_tokens: 128,
            search: Search::Greedy,
            extra_stop_tokens: Vec::new(),
            cancel: CancelFlag::default(),
        }
    }
}

/// Why a generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Finish {
    /// At this stop token (not included in [`Decoded::tokens`], counted in the log-prob).
    Stop(u32),
    /// After `max_new_tokens` steps without a stop token.
    Length,
}

/// A decoded answer with its probabilities.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Decoded {
    /// Output token ids, without the stop token.
    pub tokens: Vec<u32>,
    pub finish: Finish,
    /// log p(y|x) under the chosen marginalisation, y = tokens followed by the stop token if
    /// [`Finish::Stop`].
    pub log_prob: f64,
    /// Document posterior for citations, one per document, summing to 1: p(z|x,y) for
    /// RAG-Sequence, the mean per-token posterior for RAG-Token ([`TokenScore::posterior`]).
    pub posterior: Vec<f64>,
    /// log p_θ(y|x,z) per document; `None` where it was not computed (RAG-Sequence fast
    /// decoding, for documents whose beam did not produce y, which it treats as probability 0).
    pub doc_log_likelihoods: Vec<Option<f64>>,
    /// RAG-Token only (empty otherwise): p(z|x,y_i,y_<i) for each position counted in
    /// `log_prob` (the tokens, then the stop token if there is one).
    pub token_posteriors: Vec<Vec<f64>>,
}

/// Decodes an answer from the k prompts z∘x and the log prior log p_η(z|x).
///
/// `on_token` receives each output token as it is fixed (see "Streaming" in the module
/// documentation). All k documents run in one batch: one [`CausalLm::start`] over the k
/// prompts (RAG-Sequence sampling starts only the sampled document), and for thorough
/// RAG-Sequence one extra [`CausalLm::score`] call.
pub fn decode(
    lm: &dyn CausalLm,
    prompts: &[Vec<u32>],
    prior: &[f64],
    marginalize: Marginalize,
    options: &DecodeOptions,
    on_token: Option<&mut dyn FnMut(u32)>,
) -> Result<Decoded, RagError> {
    check_inputs(prompts, prior)?;
    check_options(options)?;
    let stops = StopSet::new(lm.stop_tokens(), &options.extra_stop_tokens);
    let mut ignore = |_: u32| {};
    let on_token: &mut dyn FnMut(u32) = match on_token {
        Some(f) => f,
        None => &mut ignore,
    };
    if options.max_new_tokens == 0 {
        return Ok(Decoded {
            tokens: Vec::new(),
            finish: Finish::Length,
            log_prob: 0.0,
            posterior: logspace::exp_all(prior),
            doc_log_likelihoods: vec![Some(0.0); prior.len()],
            token_posteriors: Vec::new(),
        });
    }
    match marginalize {
        Marginalize::Token => token::decode(lm, prompts, prior, options, &stops, on_token),
        Marginalize::Sequence(mode) => {
            sequence::decode(lm, prompts, prior, mode, options, &stops, on_token)
        }
    }
}

/// Plain single-context generation: [`decode`] with one prompt and prior `[0.0]`.
pub fn generate(
    lm: &dyn CausalLm,
    prompt: &[u32],
    options: &DecodeOptions,
    on_token: Option<&mut dyn FnMut(u32)>,
) -> Result<Decoded, RagError> {
    decode(
        lm,
        &[prompt.to_vec()],
        &[0.0],
        Marginalize::Token,
        options,
        on_token,
    )
}

/// Tolerance on log-sum-exp(prior) = 0: loose enough for a prior computed in f32 and
/// converted, tight enough to catch unnormalised scores passed by mistake.
const PRIOR_TOLERANCE: f64 = 1e-6;

pub(crate) fn check_inputs(prompts: &[Vec<u32>], prior: &[f64]) -> Result<(), RagError> {
    if prompts.is_empty() {
        return Err(RagError::InvalidGenerationInput(
            "no documents: RAG needs at least one prompt (use k = 1 with prior [0.0] for plain generation)"
                .into(),
        ));
    }
    if prompts.len() != prior.len() {
        return Err(RagError::InvalidGenerationInput(format!(
            "{} prompts but {} prior log-probabilities",
            prompts.len(),
            prior.len()
        )));
    }
    if let Some(z) = prompts.iter().position(|p| p.is_empty()) {
        return Err(RagError::InvalidGenerationInput(format!(
            "the prompt of document {z} is empty"
        )));
    }
    if let Some(z) = prior.iter().position(|p| p.is_nan() || *p == f64::INFINITY) {
        return Err(RagError::InvalidGenerationInput(format!(
            "log prior of document {z} is {}",
            prior[z]
        )));
    }
    let total = logspace::logsumexp(prior);
    if total.is_nan() || total.abs() > PRIOR_TOLERANCE {
        return Err(RagError::InvalidGenerationInput(format!(
            "the log prior is not normalised (log-sum-exp = {total}); pass log p_eta(z|x), e.g. from logspace::log_softmax"
        )));
    }
    Ok(())
}

fn check_options(options: &DecodeOptions) -> Result<(), RagError> {
    match options.search {
        Search::Beam { width: 0 } => Err(RagError::InvalidGenerationInput(
            "beam width must be at least 1".into(),
        )),
        Search::Sample(s) if !(s.temperature > 0.0 && s.temperature.is_finite()) => {
            Err(RagError::InvalidGenerationInput(format!(
                "sampling temperature must be positive and finite, got {}",
                s.temperature
            )))
        }
        Search::Sample(s) if !(s.top_p > 0.0 && s.top_p <= 1.0) => Err(
            RagError::InvalidGenerationInput(format!("top_p must be in (0, 1], got {}", s.top_p)),
        ),
        _ => Ok(()),
    }
}

/// The model's stop tokens plus the caller's extra ones.
pub(crate) struct StopSet(Vec<u32>);

impl StopSet {
    pub(crate) fn new(model: &[u32], extra: &[u32]) -> Self {
        let mut all: Vec<u32> = model.iter().chain(extra).copied().collect();
        all.sort_unstable();
        all.dedup();
        StopSet(all)
    }

    pub(crate) fn contains(&self, token: u32) -> bool {
        self.0.binary_search(&token).is_ok()
    }
}

/// Writes log Σ_r exp(weights[r] + log p(v | row first + r)) for every v into `out`: the
/// next-token distribution of one hypothesis whose rows are mixed with the given weights
/// (RAG-Token: k rows weighted by the prior; one row with weight 0 is the row itself).
///
/// Uses [`logspace::logsumexp`] over the rows in document order, the same arithmetic as
/// [`score_token`], so that a decoded answer and its re-scoring agree to the last bit.
pub(crate) fn mix_rows(
    state: &dyn DecodeState,
    first: usize,
    weights: &[f64],
    vocab: usize,
    out: &mut Vec<f64>,
) -> Result<(), RagError> {
    let rows: Vec<&[f32]> = (first..first + weights.len())
        .map(|r| state.log_probs(r))
        .collect();
    if let Some(bad) = rows.iter().find(|r| r.len() != vocab) {
        return Err(RagError::GeneratorOutput(format!(
            "a log-probability row has {} entries but the vocabulary has {vocab}",
            bad.len()
        )));
    }
    out.clear();
    out.reserve(vocab);
    let mut terms = vec![0.0; weights.len()];
    for v in 0..vocab {
        for (t, (row, w)) in terms.iter_mut().zip(rows.iter().zip(weights)) {
            *t = w + f64::from(row[v]);
        }
        let mixed = logspace::logsumexp(&terms);
        if mixed.is_nan() {
            return Err(RagError::GeneratorOutput(format!(
                "NaN log-probability for token {v}"
            )));
        }
        out.push(mixed);
    }
    Ok(())
}
