//! RAG-Token decoding: the k documents' next-token distributions mixed with the prior at every
//! step, p(y_i|x,y_<i) = Σ_z p_η(z|x) p_θ(y_i|x,z,y_<i), over one batch of k rows per
//! hypothesis.

use zrag_models::CausalLm;

use super::beam::{self, Group, Params};
use super::path::{self, Pick};
use super::rng::SplitMix64;
use super::score::token_score;
use super::{DecodeOptions, Decoded, Finish, Search, StopSet};
use crate::RagError;

pub(crate) fn decode(
    lm: &dyn CausalLm,
    prompts: &[Vec<u32>],
    prior: &[f64],
    options: &DecodeOptions,
    stops: &StopSet,
    on_token: &mut dyn FnMut(u32),
) -> Result<Decoded, RagError> {
    let refs: Vec<&[u32]> = prompts.iter().map(Vec::as_slice).collect();
    let mut state = lm.start(&refs)?;
    let vocab = lm.vocab_size();
    let (tokens, finish, positions) = match options.search {
        Search::Greedy | Search::Sample(_) => {
            let mut rng;
            let pick = match options.search {
                Search::Sample(s) => {
                    rng = SplitMix64::new(s.seed);
                    Pick::Sample(s, &mut rng)
                }
                _ => Pick::Greedy,
            };
            let p = path::run(state.as_mut(), prior, vocab, options, stops, pick, on_token)?;
            (p.tokens, p.finish, p.positions)
        }
        Search::Beam { width } => {
            let groups = [Group {
                weights: prior,
                first_row: 0,
            }];
            let params = Params {
                vocab,
                width,
                keep: 1,
                max_steps: options.max_new_tokens,
                stops,
                cancel: &options.cancel,
            };
            let best = beam::search(state.as_mut(), &groups, &params)?
                .pop()
                .and_then(|mut list| (!list.is_empty()).then(|| list.swap_remove(0)))
                .ok_or_else(|| {
                    RagError::GeneratorOutput("every next token has probability 0".into())
                })?;
            for &t in &best.tokens {
                on_token(t);
            }
            (best.tokens, best.finish, best.positions)
        }
    };
    Ok(assemble(prior, tokens, finish, &positions))
}

fn assemble(prior: &[f64], tokens: Vec<u32>, finish: Finish, positions: &[Vec<f64>]) -> Decoded {
    let score = token_score(prior, positions);
    Decoded {
        tokens,
        finish,
        log_prob: score.log_prob,
        posterior: score.posterior,
        doc_log_likelihoods: score.doc_log_likelihoods.into_iter().map(Some).collect(),
        token_posteriors: score.token_posteriors,
    }
}
