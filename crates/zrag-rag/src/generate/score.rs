//! Teacher-forced scoring of a given answer under RAG-Sequence and RAG-Token, and the
//! posterior arithmetic the decoders reuse (so that decoding an answer and re-scoring it give
//! the same numbers).

use serde::Serialize;
use zrag_models::CausalLm;

use super::{check_inputs, logspace};
use crate::RagError;

/// RAG-Sequence score of one answer.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SequenceScore {
    /// log p(y|x) = logsumexp_z(log p_η(z|x) + log p_θ(y|x,z)).
    pub log_prob: f64,
    /// log p_θ(y|x,z) = Σ_i log p_θ(y_i|x,z,y_<i), one per document.
    pub doc_log_likelihoods: Vec<f64>,
    /// log p(z|x,y) = log p_η(z|x) + log p_θ(y|x,z) − log p(y|x). Stays finite (and exact)
    /// where [`SequenceScore::posterior`] underflows to 0.
    pub log_posterior: Vec<f64>,
    /// p(z|x,y), summing to 1. If p(y|x) = 0 the posterior is undefined and the prior is
    /// returned (no evidence either way).
    pub posterior: Vec<f64>,
}

/// RAG-Token score of one answer.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TokenScore {
    /// log p(y|x) = Σ_i logsumexp_z(log p_η(z|x) + log p_θ(y_i|x,z,y_<i)).
    pub log_prob: f64,
    /// log p(y_i|x,y_<i), one per target position (they sum to `log_prob`).
    pub token_log_probs: Vec<f64>,
    /// log p_θ(y|x,z) per document. RAG-Token's p(y|x) does not use it; it comes free with
    /// the per-token values and tells how well each document alone explains y.
    pub doc_log_likelihoods: Vec<f64>,
    /// p(z|x,y_i,y_<i) ∝ p_η(z|x) p_θ(y_i|x,z,y_<i), one distribution per position.
    pub token_posteriors: Vec<Vec<f64>>,
    /// The citation summary: the mean of `token_posteriors` over positions (the prior for an
    /// empty target).
    ///
    /// Why the mean: RAG-Token's generative story draws a document z_i ~ p_η(z|x)
    /// independently for every token, so given the whole answer the posterior of z_i is exactly
    /// p(z|x,y_i,y_<i), and the mean over positions is the expected fraction of the answer's
    /// tokens that came from z. The sequence-level Bayes posterior p_η(z|x) p_θ(y|x,z) would
    /// instead be RAG-Sequence's (one document for the whole answer), which is not this model.
    pub posterior: Vec<f64>,
}

/// RAG-Sequence log p(y|x) of `target` (append the stop token to score a complete answer),
/// with one batched [`CausalLm::score`] call over the k documents.
pub fn score_sequence(
    lm: &dyn CausalLm,
    prompts: &[Vec<u32>],
    prior: &[f64],
    target: &[u32],
) -> Result<SequenceScore, RagError> {
    check_inputs(prompts, prior)?;
    let per_doc = score_under_every_document(lm, prompts, target)?;
    let doc_lls = per_doc.iter().map(|lps| sum_in_order(lps)).collect();
    Ok(sequence_score(prior, doc_lls))
}

/// RAG-Token log p(y|x) of `target` (append the stop token to score a complete answer), with
/// one batched [`CausalLm::score`] call over the k documents.
pub fn score_token(
    lm: &dyn CausalLm,
    prompts: &[Vec<u32>],
    prior: &[f64],
    target: &[u32],
) -> Result<TokenScore, RagError> {
    check_inputs(prompts, prior)?;
    let per_doc = score_under_every_document(lm, prompts, target)?;
    let positions: Vec<Vec<f64>> = (0..target.len())
        .map(|i| per_doc.iter().map(|lps| lps[i]).collect())
        .collect();
    Ok(token_score(prior, &positions))
}

/// log p_θ(target_i | prompt_z, target_<i) for every document z and position i.
fn score_under_every_document(
    lm: &dyn CausalLm,
    prompts: &[Vec<u32>],
    target: &[u32],
) -> Result<Vec<Vec<f64>>, RagError> {
    let pairs: Vec<(&[u32], &[u32])> = prompts.iter().map(|p| (p.as_slice(), target)).collect();
    score_pairs(lm, &pairs)
}

/// One batched [`CausalLm::score`] call over (prompt, target) pairs, checked and widened to
/// f64. Pairs with an empty target need no model call and score as empty.
pub(crate) fn score_pairs(
    lm: &dyn CausalLm,
    pairs: &[(&[u32], &[u32])],
) -> Result<Vec<Vec<f64>>, RagError> {
    let wanted: Vec<usize> = (0..pairs.len())
        .filter(|&i| !pairs[i].1.is_empty())
        .collect();
    let mut out = vec![Vec::new(); pairs.len()];
    if wanted.is_empty() {
        return Ok(out);
    }
    let prompts: Vec<&[u32]> = wanted.iter().map(|&i| pairs[i].0).collect();
    let targets: Vec<&[u32]> = wanted.iter().map(|&i| pairs[i].1).collect();
    let scores = lm.score(&prompts, &targets)?;
    if scores.len() != wanted.len() {
        return Err(RagError::GeneratorOutput(format!(
            "score returned {} rows for {} (prompt, target) pairs",
            scores.len(),
            wanted.len()
        )));
    }
    for (&i, lps) in wanted.iter().zip(scores) {
        if lps.len() != pairs[i].1.len() {
            return Err(RagError::GeneratorOutput(format!(
                "score returned {} log-probabilities for a target of {} tokens",
                lps.len(),
                pairs[i].1.len()
            )));
        }
        if lps.iter().any(|l| l.is_nan()) {
            return Err(RagError::GeneratorOutput(
                "score returned a NaN log-probability".into(),
            ));
        }
        out[i] = lps.into_iter().map(f64::from).collect();
    }
    Ok(out)
}

/// Σ of log-probabilities left to right, starting from 0.0 — the order in which the decoders
/// accumulate, so both give identical bits.
pub(crate) fn sum_in_order(lps: &[f64]) -> f64 {
    lps.iter().fold(0.0, |acc, &l| acc + l)
}

/// RAG-Sequence numbers from the per-document log-likelihoods (−∞ for "probability 0", as
/// fast decoding assumes for documents whose beam missed the answer).
pub(crate) fn sequence_score(prior: &[f64], doc_lls: Vec<f64>) -> SequenceScore {
    let joint: Vec<f64> = prior.iter().zip(&doc_lls).map(|(p, l)| p + l).collect();
    let log_prob = logspace::logsumexp(&joint);
    let log_posterior = if log_prob == f64::NEG_INFINITY {
        prior.to_vec()
    } else {
        joint.iter().map(|j| j - log_prob).collect()
    };
    let posterior = logspace::exp_all(&log_posterior);
    SequenceScore {
        log_prob,
        doc_log_likelihoods: doc_lls,
        log_posterior,
        posterior,
    }
}

/// RAG-Token numbers from `positions[i][z]` = log p_θ(y_i|x,z,y_<i).
pub(crate) fn token_score(prior: &[f64], positions: &[Vec<f64>]) -> TokenScore {
    let k = prior.len();
    let mut token_log_probs = Vec::with_capacity(positions.len());
    let mut token_posteriors = Vec::with_capacity(positions.len());
    let mut doc_lls = vec![0.0; k];
    let mut terms = vec![0.0; k];
    for lps in positions {
        for z in 0..k {
            terms[z] = prior[z] + lps[z];
            doc_lls[z] += lps[z];
        }
        let mixed = logspace::logsumexp(&terms);
        token_log_probs.push(mixed);
        token_posteriors.push(if mixed == f64::NEG_INFINITY {
            logspace::exp_all(prior)
        } else {
            terms.iter().map(|t| (t - mixed).exp()).collect()
        });
    }
    let posterior = if positions.is_empty() {
        logspace::exp_all(prior)
    } else {
        let n = positions.len() as f64;
        (0..k)
            .map(|z| token_posteriors.iter().map(|p| p[z]).sum::<f64>() / n)
            .collect()
    };
    TokenScore {
        log_prob: sum_in_order(&token_log_probs),
        token_log_probs,
        doc_log_likelihoods: doc_lls,
        token_posteriors,
        posterior,
    }
}
