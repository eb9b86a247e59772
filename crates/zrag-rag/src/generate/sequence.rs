//! RAG-Sequence decoding (Lewis et al. 2020, §2.4): candidates come from per-document
//! searches, and the answer is the candidate with the highest p(y|x) = Σ_z p_η(z|x) p(y|x,z).
//!
//! Beam and greedy: every document's beam runs in one batch (one group per document in the
//! beam engine). A candidate y produced by document z's beam has its log p(y|x,z) from the
//! search itself; for the other documents, thorough decoding scores y with one batched
//! `score` call over all missing (document, candidate) pairs, and fast decoding takes
//! p(y|x,z) ≈ 0.
//!
//! Sampling is ancestral: z ~ p_η(z|x), then y ~ p_θ(·|x,z), which is an exact draw from the
//! RAG-Sequence model; only document z's prompt runs. The same thorough / fast rule then
//! decides whether y is scored under the other documents.

use std::collections::HashMap;

use zrag_models::CausalLm;

use super::beam::{self, Group, Params};
use super::path::{self, Pick};
use super::rng::{sample_index, SplitMix64};
use super::score::{score_pairs, sequence_score, sum_in_order};
use super::{DecodeOptions, Decoded, Finish, Sampling, Search, SequenceDecoding, StopSet};
use crate::RagError;

/// Mixed into the seed for the document draw, so that the token stream of a sampled answer
/// uses the seed unchanged (k = 1 sampling then equals plain sampling with the same seed).
const DOCUMENT_STREAM: u64 = 0xD1B5_4A32_D192_ED03;

pub(crate) fn decode(
    lm: &dyn CausalLm,
    prompts: &[Vec<u32>],
    prior: &[f64],
    mode: SequenceDecoding,
    options: &DecodeOptions,
    stops: &StopSet,
    on_token: &mut dyn FnMut(u32),
) -> Result<Decoded, RagError> {
    let (tokens, finish, known) = match options.search {
        Search::Sample(s) => sample(lm, prompts, prior, s, options, stops, on_token)?,
        Search::Greedy => beams(lm, prompts, prior, mode, 1, options, stops)?,
        Search::Beam { width } => beams(lm, prompts, prior, mode, width, options, stops)?,
    };
    if !matches!(options.search, Search::Sample(_)) {
        for &t in &tokens {
            on_token(t);
        }
    }
    let mut doc_lls = known;
    // Beam candidates arrive complete already (they had to be compared); a sampled answer
    // still needs its scores under the documents that did not produce it.
    if mode == SequenceDecoding::Thorough {
        fill_missing(
            lm,
            prompts,
            std::slice::from_ref(&(tokens.clone(), finish)),
            std::slice::from_mut(&mut doc_lls),
        )?;
    }
    let score = sequence_score(prior, as_log_likelihoods(&doc_lls));
    Ok(Decoded {
        tokens,
        finish,
        log_prob: score.log_prob,
        posterior: score.posterior,
        doc_log_likelihoods: doc_lls,
        token_posteriors: Vec::new(),
    })
}

type Candidate = (Vec<u32>, Finish);

/// The chosen answer: tokens, finish, and log p(y|x,z) per document where known.
type Chosen = (Vec<u32>, Finish, Vec<Option<f64>>);

/// Per-document beams in one batch; returns the best candidate and its per-document
/// log-likelihoods (complete for thorough decoding, only the producing documents' for fast).
fn beams(
    lm: &dyn CausalLm,
    prompts: &[Vec<u32>],
    prior: &[f64],
    mode: SequenceDecoding,
    width: usize,
    options: &DecodeOptions,
    stops: &StopSet,
) -> Result<Chosen, RagError> {
    let k = prompts.len();
    let pools = {
        let refs: Vec<&[u32]> = prompts.iter().map(Vec::as_slice).collect();
        let mut state = lm.start(&refs)?;
        let own_weight = [0.0];
        let groups: Vec<Group<'_>> = (0..k)
            .map(|z| Group {
                weights: &own_weight,
                first_row: z,
            })
            .collect();
        let params = Params {
            vocab: lm.vocab_size(),
            width,
            keep: width,
            max_steps: options.max_new_tokens,
            stops,
            cancel: &options.cancel,
        };
        // The state (with its caches) is dropped here, before the scoring pass allocates.
        beam::search(state.as_mut(), &groups, &params)?
    };

    let mut candidates: Vec<Candidate> = Vec::new();
    let mut known: Vec<Vec<Option<f64>>> = Vec::new();
    let mut index: HashMap<Candidate, usize> = HashMap::new();
    for (z, pool) in pools.into_iter().enumerate() {
        for hyp in pool {
            let key = (hyp.tokens, hyp.finish);
            let i = *index.entry(key.clone()).or_insert_with(|| {
                candidates.push(key);
                known.push(vec![None; k]);
                candidates.len() - 1
            });
            known[i][z] = Some(hyp.score);
        }
    }
    if candidates.is_empty() {
        return Err(RagError::GeneratorOutput(
            "every next token has probability 0 under every document".into(),
        ));
    }
    if mode == SequenceDecoding::Thorough {
        fill_missing(lm, prompts, &candidates, &mut known)?;
    }
    // Candidates are in document order, then beam rank; the first of equal scores wins.
    let mut best = 0;
    let mut best_score = f64::NEG_INFINITY;
    for (i, lls) in known.iter().enumerate() {
        let s = sequence_score(prior, as_log_likelihoods(lls)).log_prob;
        if s > best_score {
            best = i;
            best_score = s;
        }
    }
    let (tokens, finish) = candidates.swap_remove(best);
    Ok((tokens, finish, known.swap_remove(best)))
}

/// Ancestral sampling: one document drawn from the prior, one answer drawn from it.
fn sample(
    lm: &dyn CausalLm,
    prompts: &[Vec<u32>],
    prior: &[f64],
    sampling: Sampling,
    options: &DecodeOptions,
    stops: &StopSet,
    on_token: &mut dyn FnMut(u32),
) -> Result<Chosen, RagError> {
    let k = prompts.len();
    let z = if k == 1 {
        0
    } else {
        let mut doc_rng = SplitMix64::new(sampling.seed ^ DOCUMENT_STREAM);
        sample_index(prior, 1.0, 1.0, &mut doc_rng).ok_or_else(|| {
            RagError::InvalidGenerationInput("the prior gives every document probability 0".into())
        })?
    };
    let mut rng = SplitMix64::new(sampling.seed);
    let drawn = {
        let mut state = lm.start(&[prompts[z].as_slice()])?;
        path::run(
            state.as_mut(),
            &[0.0],
            lm.vocab_size(),
            options,
            stops,
            Pick::Sample(sampling, &mut rng),
            on_token,
        )?
    };
    let own: Vec<f64> = drawn.positions.iter().map(|p| p[0]).collect();
    let mut known = vec![None; k];
    known[z] = Some(sum_in_order(&own));
    Ok((drawn.tokens, drawn.finish, known))
}

/// Scores every candidate under each document where its log-likelihood is still unknown, in
/// one batched [`CausalLm::score`] call.
fn fill_missing(
    lm: &dyn CausalLm,
    prompts: &[Vec<u32>],
    candidates: &[Candidate],
    known: &mut [Vec<Option<f64>>],
) -> Result<(), RagError> {
    let targets: Vec<Vec<u32>> = candidates.iter().map(scored_target).collect();
    let mut missing: Vec<(usize, usize)> = Vec::new();
    for (i, lls) in known.iter().enumerate() {
        for (z, ll) in lls.iter().enumerate() {
            if ll.is_none() {
                missing.push((i, z));
            }
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    let pairs: Vec<(&[u32], &[u32])> = missing
        .iter()
        .map(|&(i, z)| (prompts[z].as_slice(), targets[i].as_slice()))
        .collect();
    let scores = score_pairs(lm, &pairs)?;
    for (&(i, z), lps) in missing.iter().zip(scores) {
        known[i][z] = Some(sum_in_order(&lps));
    }
    Ok(())
}

/// What the probability of a candidate covers: its tokens, then its stop token if it has one.
fn scored_target((tokens, finish): &Candidate) -> Vec<u32> {
    let mut t = tokens.clone();
    if let Finish::Stop(s) = finish {
        t.push(*s);
    }
    t
}

fn as_log_likelihoods(known: &[Option<f64>]) -> Vec<f64> {
    known
        .iter()
        .map(|l| l.unwrap_or(f64::NEG_INFINITY))
        .collect()
}
