//! A single hypothesis decoded greedily or by sampling: RAG-Token over k mixed rows, and
//! RAG-Sequence's sampled document (one row). Each chosen token is final when picked, which is
//! what makes streaming possible here and not in beam search.

use zrag_models::DecodeState;

use super::rng::{sample_index, SplitMix64};
use super::{logspace, mix_rows, DecodeOptions, Finish, Sampling, StopSet};
use crate::RagError;

/// How the next token is chosen from the mixed distribution.
pub(crate) enum Pick<'a> {
    /// The most probable token (the lowest id on ties).
    Greedy,
    Sample(Sampling, &'a mut SplitMix64),
}

/// The decoded path: tokens (without the stop token) and, for every position counted in the
/// log-probability (the stop token included), log p(token | row) for each of the rows.
pub(crate) struct Path {
    pub tokens: Vec<u32>,
    pub finish: Finish,
    pub positions: Vec<Vec<f64>>,
}

/// Decodes up to `max_steps` tokens from `state`, whose rows `0..weights.len()` are mixed
/// with `weights` (log) at every step; all rows are advanced with the chosen token.
/// `options` gives `max_steps` (its `max_new_tokens`) and the cancel flag.
pub(crate) fn run(
    state: &mut dyn DecodeState,
    weights: &[f64],
    vocab: usize,
    options: &DecodeOptions,
    stops: &StopSet,
    mut pick: Pick<'_>,
    on_token: &mut dyn FnMut(u32),
) -> Result<Path, RagError> {
    let (max_steps, cancel) = (options.max_new_tokens, &options.cancel);
    let rows = weights.len();
    let mut mixed = Vec::with_capacity(vocab);
    let mut path = Path {
        tokens: Vec::new(),
        finish: Finish::Length,
        positions: Vec::new(),
    };
    for step in 0..max_steps {
        cancel.check()?;
        mix_rows(state, 0, weights, vocab, &mut mixed)?;
        let chosen = match &mut pick {
            Pick::Greedy => {
                let (v, best) = logspace::argmax(&mixed);
                (best > f64::NEG_INFINITY).then_some(v)
            }
            Pick::Sample(s, rng) => sample_index(&mixed, s.temperature, s.top_p, rng),
        };
        let token = chosen
            .ok_or_else(|| RagError::GeneratorOutput("every next token has probability 0".into()))?
            as u32;
        let v = token as usize;
        path.positions.push(
            (0..rows)
                .map(|r| f64::from(state.log_probs(r)[v]))
                .collect(),
        );
        if stops.contains(token) {
            path.finish = Finish::Stop(token);
            break;
        }
        path.tokens.push(token);
        on_token(token);
        // The last step's token needs no forward pass: nothing will be read after it.
        if step + 1 < max_steps {
            state.advance(&vec![token; rows])?;
        }
    }
    Ok(path)
}
