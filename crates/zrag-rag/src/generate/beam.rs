//! The beam search engine shared by RAG-Token and RAG-Sequence.
//!
//! A search runs independent *groups* of hypotheses in one [`DecodeState`]. Every hypothesis
//! of a group owns `weights.len()` consecutive rows, and its next-token distribution is those
//! rows mixed with the group's log weights. RAG-Token is one group whose hypotheses own k rows
//! weighted by the prior (k × beam rows in all); RAG-Sequence is k groups (one per document)
//! whose hypotheses own one row each (all documents' beams in one batch).
//!
//! One step, per group: expand every hypothesis by every token, keep the `width` best
//! expansions (score desc, then parent, then token id, so ties are deterministic); those
//! ending in a stop token, or reaching `max_steps`, move to the group's finished list (best
//! `keep` kept), the rest form the next beam. Finished hypotheses thus use beam slots, which
//! makes width 1 exactly greedy decoding. A group stops when its beam is empty or when its
//! finished list is full and its best live hypothesis scores no higher than the list's worst:
//! scores only fall as hypotheses grow, so nothing still in the beam could enter the list.
//!
//! Rows of surviving hypotheses are gathered with one [`DecodeState::select`] (skipped when it
//! would be the identity) and advanced with one [`DecodeState::advance`] for all groups.
//! Hypotheses point into an arena of nodes (parent, token, per-row log-probs) instead of
//! carrying copies of their token lists, so the bookkeeping of a step does not grow with the
//! hypotheses' length.

use std::cmp::Ordering;

use zrag_models::DecodeState;

use super::{mix_rows, CancelFlag, Finish, StopSet};
use crate::RagError;

/// A group of hypotheses that compete with each other.
pub(crate) struct Group<'a> {
    /// Log weights of the rows each hypothesis owns (their count is the rows per hypothesis).
    pub weights: &'a [f64],
    /// First row of the group's initial hypothesis in the freshly started state.
    pub first_row: usize,
}

/// A finished hypothesis.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Hypothesis {
    pub tokens: Vec<u32>,
    pub finish: Finish,
    /// Σ over positions of the mixed log-probability: the hypothesis' log p.
    pub score: f64,
    /// Per position counted in `score` (the stop token included), the log-probability of that
    /// position's token under each of the hypothesis' rows.
    pub positions: Vec<Vec<f64>>,
}

/// Search parameters.
pub(crate) struct Params<'a> {
    pub vocab: usize,
    pub width: usize,
    /// Finished hypotheses kept per group (1 when only the best is wanted).
    pub keep: usize,
    pub max_steps: usize,
    pub stops: &'a StopSet,
    pub cancel: &'a CancelFlag,
}

struct Node {
    parent: Option<usize>,
    token: u32,
    lps: Vec<f64>,
}

#[derive(Clone, Copy)]
struct Live {
    node: Option<usize>,
    score: f64,
    /// First of its rows in the current state.
    row: usize,
}

#[derive(Clone, Copy)]
struct Done {
    node: usize,
    score: f64,
    finish: Finish,
}

#[derive(Clone, Copy)]
struct Candidate {
    score: f64,
    parent: usize,
    token: u32,
}

/// Best first: higher score, then lower parent index, then lower token id.
fn rank(a: &Candidate, b: &Candidate) -> Ordering {
    b.score
        .total_cmp(&a.score)
        .then(a.parent.cmp(&b.parent))
        .then(a.token.cmp(&b.token))
}

/// Keeps the `n` best candidates, sorted best first.
fn keep_best(cands: &mut Vec<Candidate>, n: usize) {
    if cands.len() > n {
        cands.select_nth_unstable_by(n - 1, rank);
        cands.truncate(n);
    }
    cands.sort_by(rank);
}

/// Runs the search; returns each group's finished hypotheses, best first.
pub(crate) fn search(
    state: &mut dyn DecodeState,
    groups: &[Group<'_>],
    params: &Params<'_>,
) -> Result<Vec<Vec<Hypothesis>>, RagError> {
    let mut arena: Vec<Node> = Vec::new();
    let mut live: Vec<Vec<Live>> = groups
        .iter()
        .map(|g| {
            vec![Live {
                node: None,
                score: 0.0,
                row: g.first_row,
            }]
        })
        .collect();
    let mut done: Vec<Vec<Done>> = vec![Vec::new(); groups.len()];
    let mut mixed = Vec::with_capacity(params.vocab);

    for step in 0..params.max_steps {
        params.cancel.check()?;
        let last_step = step + 1 == params.max_steps;
        let mut next_live: Vec<Vec<Live>> = vec![Vec::new(); groups.len()];
        let mut gather: Vec<usize> = Vec::new();
        let mut tokens: Vec<u32> = Vec::new();
        for (g, group) in groups.iter().enumerate() {
            if live[g].is_empty() {
                continue;
            }
            let rows_per_hyp = group.weights.len();
            let mut cands: Vec<Candidate> = Vec::new();
            for (parent, hyp) in live[g].iter().enumerate() {
                mix_rows(state, hyp.row, group.weights, params.vocab, &mut mixed)?;
                // Only a hypothesis' own `width` best expansions can make the group's top
                // `width`, so each contributes at most that many.
                let mut own: Vec<Candidate> = mixed
                    .iter()
                    .enumerate()
                    .filter(|(_, m)| **m > f64::NEG_INFINITY)
                    .map(|(v, m)| Candidate {
                        score: hyp.score + m,
                        parent,
                        token: v as u32,
                    })
                    .collect();
                keep_best(&mut own, params.width);
                cands.extend(own);
            }
            keep_best(&mut cands, params.width);
            for c in cands {
                let parent = live[g][c.parent];
                let v = c.token as usize;
                let node = arena.len();
                arena.push(Node {
                    parent: parent.node,
                    token: c.token,
                    lps: (parent.row..parent.row + rows_per_hyp)
                        .map(|r| f64::from(state.log_probs(r)[v]))
                        .collect(),
                });
                let finish = if params.stops.contains(c.token) {
                    Some(Finish::Stop(c.token))
                } else if last_step {
                    Some(Finish::Length)
                } else {
                    None
                };
                match finish {
                    Some(finish) => done[g].push(Done {
                        node,
                        score: c.score,
                        finish,
                    }),
                    None => next_live[g].push(Live {
                        node: Some(node),
                        score: c.score,
                        row: parent.row,
                    }),
                }
            }
            // Stable: among equal scores the hypothesis found first stays ahead.
            done[g].sort_by(|a, b| b.score.total_cmp(&a.score));
            done[g].truncate(params.keep);
            let full = done[g].len() >= params.keep;
            if let Some(best_live) = next_live[g].first() {
                if full && best_live.score <= done[g][params.keep - 1].score {
                    next_live[g].clear();
                }
            }
            for hyp in &mut next_live[g] {
                let old_row = hyp.row;
                hyp.row = gather.len();
                gather.extend(old_row..old_row + rows_per_hyp);
                let token = arena[hyp.node.expect("expanded hypotheses have a node")].token;
                tokens.extend(std::iter::repeat_n(token, rows_per_hyp));
            }
        }
        live = next_live;
        if gather.is_empty() {
            break;
        }
        let identity =
            gather.len() == state.rows() && gather.iter().enumerate().all(|(i, &r)| i == r);
        if !identity {
            state.select(&gather)?;
        }
        state.advance(&tokens)?;
    }

    Ok(done
        .into_iter()
        .map(|list| list.into_iter().map(|d| backtrack(&arena, d)).collect())
        .collect())
}

fn backtrack(arena: &[Node], done: Done) -> Hypothesis {
    let mut positions = Vec::new();
    let mut tokens = Vec::new();
    let mut at = Some(done.node);
    while let Some(i) = at {
        tokens.push(arena[i].token);
        positions.push(arena[i].lps.clone());
        at = arena[i].parent;
    }
    tokens.reverse();
    positions.reverse();
    if matches!(done.finish, Finish::Stop(_)) {
        tokens.pop();
    }
    Hypothesis {
        tokens,
        finish: done.finish,
        score: done.score,
        positions,
    }
}
