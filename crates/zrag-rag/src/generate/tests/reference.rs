//! Naive reference computations for the tests: probability-space products and sums straight
//! from the definitions, outcome enumeration, and a beam search that recomputes every
//! hypothesis from its full history (no decode state, no row bookkeeping).

use super::table_lm::TableLm;
use crate::generate::{logspace, Finish};

/// A language model the references can query by full history, from scratch every time.
pub trait HistoryLm {
    fn vocab(&self) -> usize;
    /// log p(next token | history), one entry per vocabulary id.
    fn log_dist(&self, history: &[u32]) -> Vec<f32>;
}

impl HistoryLm for TableLm {
    fn vocab(&self) -> usize {
        self.vocab
    }

    fn log_dist(&self, history: &[u32]) -> Vec<f32> {
        TableLm::log_dist(self, history)
    }
}

/// p_θ(y_i | prompt, y_<i) for every i, in probability space.
pub fn token_probs(lm: &dyn HistoryLm, prompt: &[u32], y: &[u32]) -> Vec<f64> {
    let mut history = prompt.to_vec();
    y.iter()
        .map(|&t| {
            let p = f64::from(lm.log_dist(&history)[t as usize]).exp();
            history.push(t);
            p
        })
        .collect()
}

/// Σ_z π_z Π_i p_θ(y_i | z, y_<i).
pub fn sequence_prob(lm: &dyn HistoryLm, prompts: &[Vec<u32>], prior: &[f64], y: &[u32]) -> f64 {
    prompts
        .iter()
        .zip(prior)
        .map(|(p, pi)| pi * token_probs(lm, p, y).iter().product::<f64>())
        .sum()
}

/// Π_i Σ_z π_z p_θ(y_i | z, y_<i).
pub fn token_prob(lm: &dyn HistoryLm, prompts: &[Vec<u32>], prior: &[f64], y: &[u32]) -> f64 {
    mixed_token_probs(lm, prompts, prior, y).iter().product()
}

/// Σ_z π_z p_θ(y_i | z, y_<i) for every i.
pub fn mixed_token_probs(
    lm: &dyn HistoryLm,
    prompts: &[Vec<u32>],
    prior: &[f64],
    y: &[u32],
) -> Vec<f64> {
    let per_doc: Vec<Vec<f64>> = prompts.iter().map(|p| token_probs(lm, p, y)).collect();
    (0..y.len())
        .map(|i| per_doc.iter().zip(prior).map(|(d, pi)| pi * d[i]).sum())
        .collect()
}

/// Bayes: π_z p(y|z) / Σ_z' π_z' p(y|z').
pub fn sequence_posterior(
    lm: &dyn HistoryLm,
    prompts: &[Vec<u32>],
    prior: &[f64],
    y: &[u32],
) -> Vec<f64> {
    let joint: Vec<f64> = prompts
        .iter()
        .zip(prior)
        .map(|(p, pi)| pi * token_probs(lm, p, y).iter().product::<f64>())
        .collect();
    let total: f64 = joint.iter().sum();
    joint.iter().map(|j| j / total).collect()
}

/// π_z p(y_i|z, y_<i) / Σ_z' π_z' p(y_i|z', y_<i) for every i.
pub fn token_posteriors(
    lm: &dyn HistoryLm,
    prompts: &[Vec<u32>],
    prior: &[f64],
    y: &[u32],
) -> Vec<Vec<f64>> {
    let per_doc: Vec<Vec<f64>> = prompts.iter().map(|p| token_probs(lm, p, y)).collect();
    (0..y.len())
        .map(|i| {
            let joint: Vec<f64> = per_doc.iter().zip(prior).map(|(d, pi)| pi * d[i]).collect();
            let total: f64 = joint.iter().sum();
            joint.iter().map(|j| j / total).collect()
        })
        .collect()
}

/// Every outcome of decoding at most `max_steps` tokens: each content sequence shorter than
/// `max_steps` followed by each stop token, and each content sequence of exactly `max_steps`
/// tokens cut by the length limit.
pub fn outcomes(vocab: usize, stops: &[u32], max_steps: usize) -> Vec<(Vec<u32>, Finish)> {
    let content: Vec<u32> = (0..vocab as u32).filter(|t| !stops.contains(t)).collect();
    let mut out = Vec::new();
    let mut prefixes: Vec<Vec<u32>> = vec![Vec::new()];
    for len in 0..=max_steps {
        for p in &prefixes {
            if len < max_steps {
                for &s in stops {
                    out.push((p.clone(), Finish::Stop(s)));
                }
            } else {
                out.push((p.clone(), Finish::Length));
            }
        }
        prefixes = prefixes
            .iter()
            .flat_map(|p| {
                content.iter().map(move |&t| {
                    let mut q = p.clone();
                    q.push(t);
                    q
                })
            })
            .collect();
    }
    out
}

/// The tokens whose probability an outcome's log p covers.
pub fn target(tokens: &[u32], finish: Finish) -> Vec<u32> {
    let mut t = tokens.to_vec();
    if let Finish::Stop(s) = finish {
        t.push(s);
    }
    t
}

/// Step-wise argmax of the mixed next-token probability; returns the tokens, the finish, and
/// Σ_i ln q(y_i) (each step's q in probability space; the sum in logs).
pub fn greedy(
    lm: &dyn HistoryLm,
    prompts: &[Vec<u32>],
    prior: &[f64],
    max_steps: usize,
    stops: &[u32],
) -> (Vec<u32>, Finish, f64) {
    let mut y: Vec<u32> = Vec::new();
    let mut log_p = 0.0;
    for _ in 0..max_steps {
        let mut q = vec![0.0; lm.vocab()];
        for (p, pi) in prompts.iter().zip(prior) {
            let mut history = p.clone();
            history.extend(&y);
            for (v, lp) in lm.log_dist(&history).iter().enumerate() {
                q[v] += pi * f64::from(*lp).exp();
            }
        }
        let mut best = 0;
        for v in 1..q.len() {
            if q[v] > q[best] {
                best = v;
            }
        }
        log_p += q[best].ln();
        if stops.contains(&(best as u32)) {
            return (y, Finish::Stop(best as u32), log_p);
        }
        y.push(best as u32);
    }
    (y, Finish::Length, log_p)
}

/// The beam search of `beam.rs` re-implemented from its description, one group, every
/// hypothesis recomputed from its full history: the width best expansions (score desc, then
/// parent, then token), stop / length expansions to the finished list (best `keep`, earlier
/// first on ties), stop once the best live hypothesis cannot enter a full finished list.
/// Returns the finished list as (tokens, finish, log p).
pub fn beam(
    lm: &dyn HistoryLm,
    prompts: &[Vec<u32>],
    log_prior: &[f64],
    width: usize,
    keep: usize,
    max_steps: usize,
    stops: &[u32],
) -> Vec<(Vec<u32>, Finish, f64)> {
    let mut live: Vec<(Vec<u32>, f64)> = vec![(Vec::new(), 0.0)];
    let mut done: Vec<(Vec<u32>, Finish, f64)> = Vec::new();
    for step in 0..max_steps {
        let mut cands: Vec<(f64, usize, u32)> = Vec::new();
        for (parent, (y, score)) in live.iter().enumerate() {
            let dists: Vec<Vec<f32>> = prompts
                .iter()
                .map(|p| {
                    let mut h = p.clone();
                    h.extend(y);
                    lm.log_dist(&h)
                })
                .collect();
            for v in 0..lm.vocab() {
                let terms: Vec<f64> = dists
                    .iter()
                    .zip(log_prior)
                    .map(|(d, w)| w + f64::from(d[v]))
                    .collect();
                let m = logspace::logsumexp(&terms);
                if m > f64::NEG_INFINITY {
                    cands.push((score + m, parent, v as u32));
                }
            }
        }
        cands.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
        cands.truncate(width);
        let mut next = Vec::new();
        for (score, parent, v) in cands {
            let y = live[parent].0.clone();
            if stops.contains(&v) {
                done.push((y, Finish::Stop(v), score));
            } else {
                let mut y = y;
                y.push(v);
                if step + 1 == max_steps {
                    done.push((y, Finish::Length, score));
                } else {
                    next.push((y, score));
                }
            }
        }
        done.sort_by(|a, b| b.2.total_cmp(&a.2));
        done.truncate(keep);
        if done.len() >= keep && next.first().is_some_and(|n| n.1 <= done[keep - 1].2) {
            next.clear();
        }
        live = next;
        if live.is_empty() {
            break;
        }
    }
    done
}
