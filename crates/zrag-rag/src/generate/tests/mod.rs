//! Brute-force tests of RAG scoring and decoding against enumeration and naive references,
//! on the table LM of [`table_lm`]. Each test also checks that it *can* fail where that is not
//! obvious (a wrong variant of the computation must be told apart).

// The checks compare several per-document arrays at the same index; indexing reads clearer.
#![allow(clippy::needless_range_loop)]

mod reference;
mod table_lm;
mod tiny_llama;

use std::collections::HashSet;

use super::beam::{self, Group, Params};
use super::rng::SplitMix64;
use super::*;
use table_lm::TableLm;

fn random_prompts(k: usize, seed: u64, vocab: usize) -> Vec<Vec<u32>> {
    let mut rng = SplitMix64::new(seed.wrapping_mul(7919).wrapping_add(13));
    (0..k)
        .map(|_| {
            let len = 1 + (rng.next_u64() % 4) as usize;
            (0..len)
                .map(|_| (rng.next_u64() % vocab as u64) as u32)
                .collect()
        })
        .collect()
}

/// Unequal prior probabilities for k documents.
fn prior_probs(k: usize) -> Vec<f64> {
    match k {
        1 => vec![1.0],
        2 => vec![0.7, 0.3],
        3 => vec![0.5, 0.3, 0.2],
        _ => {
            let w: Vec<f64> = (0..k).map(|i| 1.0 / (i + 1) as f64).collect();
            let s: f64 = w.iter().sum();
            w.iter().map(|x| x / s).collect()
        }
    }
}

fn random_prior(k: usize, rng: &mut SplitMix64) -> Vec<f64> {
    let w: Vec<f64> = (0..k).map(|_| 0.05 + rng.next_f64()).collect();
    let s: f64 = w.iter().sum();
    w.iter().map(|x| x / s).collect()
}

fn logs(p: &[f64]) -> Vec<f64> {
    p.iter().map(|x| x.ln()).collect()
}

fn options(max_new_tokens: usize, search: Search) -> DecodeOptions {
    DecodeOptions {
        max_new_tokens,
        search,
        extra_stop_tokens: Vec::new(),
        cancel: Default::default(),
    }
}

fn run(
    lm: &TableLm,
    prompts: &[Vec<u32>],
    log_prior: &[f64],
    marginalize: Marginalize,
    opts: &DecodeOptions,
) -> Decoded {
    decode(lm, prompts, log_prior, marginalize, opts, None).unwrap()
}

const SEQ_THOROUGH: Marginalize = Marginalize::Sequence(SequenceDecoding::Thorough);
const SEQ_FAST: Marginalize = Marginalize::Sequence(SequenceDecoding::Fast);

fn assert_close(a: f64, b: f64, tol: f64, what: &str) {
    assert!(
        (a - b).abs() <= tol * (1.0 + b.abs()),
        "{what}: {a} vs {b} (diff {})",
        (a - b).abs()
    );
}

/// Index of the largest value; panics unless it beats the runner-up clearly, so that an
/// "argmax found" check is not decided by rounding.
fn unique_argmax(values: &[f64]) -> usize {
    let mut order: Vec<usize> = (0..values.len()).collect();
    order.sort_by(|&a, &b| values[b].total_cmp(&values[a]));
    assert!(
        values[order[0]] - values[order[1]] > 1e-9 * values[order[0]],
        "tie in the reference argmax"
    );
    order[0]
}

fn chi_square(counts: &[usize], probs: &[f64]) -> f64 {
    let n: usize = counts.iter().sum();
    counts
        .iter()
        .zip(probs)
        .map(|(&c, &p)| {
            let e = p * n as f64;
            if e == 0.0 {
                if c == 0 {
                    0.0
                } else {
                    f64::INFINITY
                }
            } else {
                (c as f64 - e).powi(2) / e
            }
        })
        .sum()
}

// ---------------------------------------------------------------------------------------------
// Scoring

#[test]
fn probabilities_of_all_outcomes_sum_to_one() {
    // (vocabulary, stop tokens, max steps): one stop token, and two of them.
    for (vocab, stops, max_steps) in [(4usize, vec![3u32], 4usize), (5, vec![0, 4], 3)] {
        for k in 1..=3 {
            let lm = TableLm::new(vocab, &stops, 11 + k as u64, 2.0);
            let prompts = random_prompts(k, k as u64, vocab);
            let pi = prior_probs(k);
            let lp = logs(&pi);
            let (mut seq_total, mut tok_total, mut without_stop) = (0.0, 0.0, 0.0);
            let mut max_model_gap: f64 = 0.0;
            let all = reference::outcomes(vocab, &stops, max_steps);
            for (y, finish) in &all {
                let t = reference::target(y, *finish);
                let s = score_sequence(&lm, &prompts, &lp, &t)
                    .unwrap()
                    .log_prob
                    .exp();
                let tk = score_token(&lm, &prompts, &lp, &t).unwrap().log_prob.exp();
                assert_close(
                    s,
                    reference::sequence_prob(&lm, &prompts, &pi, &t),
                    1e-12,
                    "seq",
                );
                assert_close(
                    tk,
                    reference::token_prob(&lm, &prompts, &pi, &t),
                    1e-12,
                    "tok",
                );
                seq_total += s;
                tok_total += tk;
                max_model_gap = max_model_gap.max((s - tk).abs());
                without_stop += score_sequence(&lm, &prompts, &lp, y)
                    .unwrap()
                    .log_prob
                    .exp();
            }
            // f32 log-probs normalise to about 1e-7 per step.
            assert!(
                (seq_total - 1.0).abs() < 1e-5,
                "RAG-Sequence total {seq_total}"
            );
            assert!(
                (tok_total - 1.0).abs() < 1e-5,
                "RAG-Token total {tok_total}"
            );
            // The check has teeth: dropping the stop token's probability breaks the sum, and
            // for k > 1 the two marginalisations are different distributions.
            assert!((without_stop - 1.0).abs() > 1e-2, "{without_stop}");
            if k > 1 {
                assert!(max_model_gap > 1e-3, "{max_model_gap}");
            }
        }
    }
}

#[test]
fn scoring_matches_naive_probability_space() {
    let mut rng = SplitMix64::new(99);
    for trial in 0..60u64 {
        let k = 1 + (trial % 4) as usize;
        let vocab = 5;
        let lm = TableLm::new(vocab, &[4], 1000 + trial, 1.5);
        let prompts = random_prompts(k, trial, vocab);
        let pi = random_prior(k, &mut rng);
        let lp = logs(&pi);
        let len = (rng.next_u64() % 10) as usize;
        let y: Vec<u32> = (0..len)
            .map(|_| (rng.next_u64() % vocab as u64) as u32)
            .collect();

        let seq = score_sequence(&lm, &prompts, &lp, &y).unwrap();
        let tok = score_token(&lm, &prompts, &lp, &y).unwrap();

        let naive_seq = reference::sequence_prob(&lm, &prompts, &pi, &y);
        let naive_tok = reference::token_prob(&lm, &prompts, &pi, &y);
        assert_close(seq.log_prob, naive_seq.ln(), 1e-10, "seq log p");
        assert_close(tok.log_prob, naive_tok.ln(), 1e-10, "tok log p");
        for z in 0..k {
            let p_z: f64 = reference::token_probs(&lm, &prompts[z], &y)
                .iter()
                .product();
            assert_close(seq.doc_log_likelihoods[z], p_z.ln(), 1e-10, "doc ll");
            assert_eq!(seq.doc_log_likelihoods[z], tok.doc_log_likelihoods[z]);
        }
        let mixed = reference::mixed_token_probs(&lm, &prompts, &pi, &y);
        assert_eq!(tok.token_log_probs.len(), y.len());
        for (ours, naive) in tok.token_log_probs.iter().zip(&mixed) {
            assert_close(*ours, naive.ln(), 1e-10, "token log p");
        }

        // Posteriors: sum to 1 and equal Bayes' rule computed directly.
        let naive_post = reference::sequence_posterior(&lm, &prompts, &pi, &y);
        assert!((seq.posterior.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        for z in 0..k {
            assert_close(seq.posterior[z], naive_post[z], 1e-10, "seq posterior");
            assert_close(
                seq.log_posterior[z],
                naive_post[z].ln(),
                1e-10,
                "log posterior",
            );
        }
        let naive_tp = reference::token_posteriors(&lm, &prompts, &pi, &y);
        for (ours, naive) in tok.token_posteriors.iter().zip(&naive_tp) {
            assert!((ours.iter().sum::<f64>() - 1.0).abs() < 1e-12);
            for z in 0..k {
                assert_close(ours[z], naive[z], 1e-10, "token posterior");
            }
        }
        assert!((tok.posterior.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        for z in 0..k {
            let mean = if y.is_empty() {
                pi[z]
            } else {
                naive_tp.iter().map(|p| p[z]).sum::<f64>() / y.len() as f64
            };
            assert_close(tok.posterior[z], mean, 1e-10, "token summary posterior");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Search against enumeration

#[test]
fn exhaustive_beam_returns_the_true_argmax() {
    let (vocab, stops, max_steps) = (4usize, [3u32], 4usize);
    let all = reference::outcomes(vocab, &stops, max_steps);
    assert_eq!(all.len(), 1 + 3 + 9 + 27 + 81);
    let width = all.len();
    for seed in 0..5u64 {
        for k in 1..=3 {
            let lm = TableLm::new(vocab, &stops, 200 + seed, 2.0);
            let prompts = random_prompts(k, seed + 50, vocab);
            let pi = prior_probs(k);
            let lp = logs(&pi);
            let targets: Vec<Vec<u32>> =
                all.iter().map(|(y, f)| reference::target(y, *f)).collect();
            let tok_probs: Vec<f64> = targets
                .iter()
                .map(|t| reference::token_prob(&lm, &prompts, &pi, t))
                .collect();
            let seq_probs: Vec<f64> = targets
                .iter()
                .map(|t| reference::sequence_prob(&lm, &prompts, &pi, t))
                .collect();
            let opts = options(max_steps, Search::Beam { width });

            let best = unique_argmax(&tok_probs);
            let d = run(&lm, &prompts, &lp, Marginalize::Token, &opts);
            assert_eq!((&d.tokens, d.finish), (&all[best].0, all[best].1));
            assert_close(d.log_prob, tok_probs[best].ln(), 1e-10, "RAG-Token argmax");

            let best = unique_argmax(&seq_probs);
            for m in [SEQ_THOROUGH, SEQ_FAST] {
                let d = run(&lm, &prompts, &lp, m, &opts);
                assert_eq!((&d.tokens, d.finish), (&all[best].0, all[best].1), "{m:?}");
                assert_close(
                    d.log_prob,
                    seq_probs[best].ln(),
                    1e-10,
                    "RAG-Sequence argmax",
                );
                // Every document's beam held every outcome, so fast lacks nothing here.
                assert!(d.doc_log_likelihoods.iter().all(Option::is_some));
            }

            // The engine's full finished list is the whole outcome space, best first, with
            // the right probabilities and per-position values.
            let mut state = lm
                .start(&prompts.iter().map(Vec::as_slice).collect::<Vec<_>>())
                .unwrap();
            let stop_set = StopSet::new(&stops, &[]);
            let params = Params {
                vocab,
                width,
                keep: width,
                max_steps,
                stops: &stop_set,
                cancel: &CancelFlag::default(),
            };
            let groups = [Group {
                weights: &lp,
                first_row: 0,
            }];
            let list = beam::search(state.as_mut(), &groups, &params)
                .unwrap()
                .remove(0);
            assert_eq!(list.len(), all.len());
            let mut seen = HashSet::new();
            for pair in list.windows(2) {
                assert!(pair[0].score >= pair[1].score);
            }
            for h in &list {
                let t = reference::target(&h.tokens, h.finish);
                assert!(seen.insert(t.clone()));
                assert_close(
                    h.score,
                    reference::token_prob(&lm, &prompts, &pi, &t).ln(),
                    1e-10,
                    "n-best score",
                );
                let rescored = score_token(&lm, &prompts, &lp, &t).unwrap();
                assert_eq!(h.score, rescored.log_prob);
                assert_eq!(h.positions.len(), t.len());
            }
        }
    }
}

#[test]
fn greedy_is_stepwise_argmax() {
    let (vocab, stops, max_steps) = (6usize, [5u32], 12usize);
    for seed in 0..12u64 {
        for k in 1..=3 {
            let lm = TableLm::new(vocab, &stops, 300 + seed, 1.0);
            let prompts = random_prompts(k, seed + 77, vocab);
            let pi = prior_probs(k);
            let lp = logs(&pi);
            let (y, finish, log_p) = reference::greedy(&lm, &prompts, &pi, max_steps, &stops);
            let d = run(
                &lm,
                &prompts,
                &lp,
                Marginalize::Token,
                &options(max_steps, Search::Greedy),
            );
            assert_eq!((&d.tokens, d.finish), (&y, finish));
            assert_close(d.log_prob, log_p, 1e-10, "greedy log p");
            // Beam width 1 is greedy (finished hypotheses take beam slots).
            let b = run(
                &lm,
                &prompts,
                &lp,
                Marginalize::Token,
                &options(max_steps, Search::Beam { width: 1 }),
            );
            assert_eq!(b, d);

            // RAG-Sequence greedy: per-document greedy candidates, best p(y|x) among them.
            let candidates: Vec<(Vec<u32>, Finish)> = prompts
                .iter()
                .map(|p| {
                    let (y, f, _) =
                        reference::greedy(&lm, std::slice::from_ref(p), &[1.0], max_steps, &stops);
                    (y, f)
                })
                .collect();
            let probs: Vec<f64> = candidates
                .iter()
                .map(|(y, f)| {
                    reference::sequence_prob(&lm, &prompts, &pi, &reference::target(y, *f))
                })
                .collect();
            let s = run(
                &lm,
                &prompts,
                &lp,
                SEQ_THOROUGH,
                &options(max_steps, Search::Greedy),
            );
            let best = (0..k).fold(0, |b, i| if probs[i] > probs[b] { i } else { b });
            assert_eq!(
                (&s.tokens, s.finish),
                (&candidates[best].0, candidates[best].1)
            );
            assert_close(s.log_prob, probs[best].ln(), 1e-10, "RAG-Sequence greedy");
        }
    }
}

#[test]
fn thorough_never_scores_below_fast() {
    let (vocab, stops) = (5usize, [4u32]);
    let mut strict = 0;
    for seed in 0..40u64 {
        let k = 3;
        let lm = TableLm::new(vocab, &stops, 400 + seed, 1.0);
        let prompts = random_prompts(k, seed + 5, vocab);
        let lp = logs(&prior_probs(k));
        let opts = options(6, Search::Beam { width: 2 });
        let thorough = run(&lm, &prompts, &lp, SEQ_THOROUGH, &opts);
        let fast = run(&lm, &prompts, &lp, SEQ_FAST, &opts);
        assert!(thorough.log_prob >= fast.log_prob, "{seed}");
        if thorough.log_prob > fast.log_prob + 1e-9 {
            strict += 1;
        }
        // Fast's answer: its thorough score is at least its fast score, the documents fast
        // did score are exact, and the rest were treated as probability 0.
        let t = reference::target(&fast.tokens, fast.finish);
        let exact = score_sequence(&lm, &prompts, &lp, &t).unwrap();
        assert!(exact.log_prob >= fast.log_prob);
        let mut terms = Vec::new();
        for z in 0..k {
            if let Some(ll) = fast.doc_log_likelihoods[z] {
                assert_eq!(ll, exact.doc_log_likelihoods[z]);
                terms.push(lp[z] + ll);
            }
        }
        assert!(!terms.is_empty());
        assert_eq!(fast.log_prob, logspace::logsumexp(&terms));
        // Thorough: everything scored, and equal to re-scoring.
        let t = reference::target(&thorough.tokens, thorough.finish);
        let exact = score_sequence(&lm, &prompts, &lp, &t).unwrap();
        assert_eq!(thorough.log_prob, exact.log_prob);
        assert_eq!(thorough.posterior, exact.posterior);
        let lls: Vec<f64> = thorough
            .doc_log_likelihoods
            .iter()
            .map(|l| l.unwrap())
            .collect();
        assert_eq!(lls, exact.doc_log_likelihoods);
    }
    // Fast is an approximation that shows: it must lose somewhere.
    assert!(strict > 0);
}

// ---------------------------------------------------------------------------------------------
// Numerical stability

#[test]
fn long_outputs_stay_finite_and_exact() {
    // 50 tokens with flat logits: every p is about 0.02, so p(y) for 2000 tokens is about
    // e^-7800, far below the smallest f64.
    let vocab = 50;
    let lm = TableLm::new(vocab, &[], 5, 0.5);
    let prompts = random_prompts(3, 9, vocab);
    let lp = vec![-1000.0, 0.25f64.ln(), 0.75f64.ln()];
    let pi: Vec<f64> = lp.iter().map(|l: &f64| l.exp()).collect();
    assert_eq!(
        pi[0], 0.0,
        "the prior itself underflows in probability space"
    );
    let n = 2000;

    let d = run(
        &lm,
        &prompts,
        &lp,
        Marginalize::Token,
        &options(n, Search::Greedy),
    );
    assert_eq!(d.tokens.len(), n);
    assert_eq!(d.finish, Finish::Length);
    assert!(
        d.log_prob.is_finite() && d.log_prob < -5000.0,
        "{}",
        d.log_prob
    );
    let mixed = reference::mixed_token_probs(&lm, &prompts, &pi, &d.tokens);
    let sum_of_logs: f64 = mixed.iter().map(|q| q.ln()).sum();
    assert_close(d.log_prob, sum_of_logs, 1e-12, "2000-token log p");
    assert_eq!(
        mixed.iter().product::<f64>(),
        0.0,
        "the naive product underflows"
    );
    let rescored = score_token(&lm, &prompts, &lp, &d.tokens).unwrap();
    assert_eq!(rescored.log_prob, d.log_prob);

    let seq = score_sequence(&lm, &prompts, &lp, &d.tokens).unwrap();
    assert!(seq.log_prob.is_finite());
    for z in 0..3 {
        let naive_ll: f64 = reference::token_probs(&lm, &prompts[z], &d.tokens)
            .iter()
            .map(|p| p.ln())
            .sum();
        assert_close(seq.doc_log_likelihoods[z], naive_ll, 1e-12, "doc ll");
        assert!(seq.log_posterior[z].is_finite());
        assert_close(
            seq.log_posterior[z],
            lp[z] + seq.doc_log_likelihoods[z] - seq.log_prob,
            1e-12,
            "log posterior",
        );
    }
    assert!((seq.posterior.iter().sum::<f64>() - 1.0).abs() < 1e-12);
    let naive = reference::sequence_posterior(&lm, &prompts, &pi, &d.tokens);
    assert!(
        naive.iter().all(|p| p.is_nan()),
        "probability space gives 0/0"
    );

    // RAG-Sequence decoding of the same length: finite and equal to re-scoring.
    let s = run(
        &lm,
        &prompts,
        &lp,
        SEQ_THOROUGH,
        &options(n, Search::Greedy),
    );
    assert_eq!(s.tokens.len(), n);
    let rescored = score_sequence(&lm, &prompts, &lp, &s.tokens).unwrap();
    assert!(s.log_prob.is_finite());
    assert_eq!(s.log_prob, rescored.log_prob);
}

#[test]
fn very_unequal_priors() {
    let (vocab, stops) = (5usize, [4u32]);
    for seed in 0..6u64 {
        let lm = TableLm::new(vocab, &stops, 500 + seed, 2.0);
        let prompts = random_prompts(2, seed + 1, vocab);
        // Normalised: log(e^-1000 + e^0) is 0 in f64.
        let lp = [-1000.0, 0.0];
        let alone = &prompts[1..];
        for search in [Search::Greedy, Search::Beam { width: 4 }] {
            let opts = options(8, search);
            let single = generate(&lm, &prompts[1], &opts, None).unwrap();
            for m in [Marginalize::Token, SEQ_THOROUGH, SEQ_FAST] {
                let d = run(&lm, &prompts, &lp, m, &opts);
                assert!(d.log_prob.is_finite());
                assert_eq!(d.posterior[0], 0.0);
                assert!((d.posterior[1] - 1.0).abs() < 1e-15);
                if m == SEQ_THOROUGH {
                    // Thorough may also pick a candidate from the negligible document's beam
                    // that document 1 likes better than its own beam's best.
                    assert!(d.log_prob >= single.log_prob - 1e-12);
                    let t = reference::target(&d.tokens, d.finish);
                    let alone = score_sequence(&lm, &prompts[1..], &[0.0], &t).unwrap();
                    assert_close(d.log_prob, alone.log_prob, 1e-12, "thorough");
                } else {
                    assert_eq!(
                        (&d.tokens, d.finish),
                        (&single.tokens, single.finish),
                        "{m:?} {search:?}"
                    );
                    assert_close(d.log_prob, single.log_prob, 1e-12, "negligible document");
                }
            }
            let y = reference::target(&single.tokens, single.finish);
            let s = score_sequence(&lm, &prompts, &lp, &y).unwrap();
            let s1 = score_sequence(&lm, alone, &[0.0], &y).unwrap();
            assert_close(s.log_prob, s1.log_prob, 1e-12, "score");
            // The posterior of the negligible document underflows as a probability but its
            // log stays exact.
            assert_eq!(s.posterior[0], 0.0);
            let expected = -1000.0 + s.doc_log_likelihoods[0] - s.log_prob;
            assert!(s.log_posterior[0].is_finite());
            assert_close(s.log_posterior[0], expected, 1e-12, "log posterior");
        }
        // A document with prior probability exactly 0 (log −∞) changes nothing either.
        let zero = [0.0, f64::NEG_INFINITY];
        let reversed = vec![prompts[1].clone(), prompts[0].clone()];
        let opts = options(8, Search::Beam { width: 3 });
        let single = generate(&lm, &prompts[1], &opts, None).unwrap();
        for m in [Marginalize::Token, SEQ_FAST] {
            let d = run(&lm, &reversed, &zero, m, &opts);
            assert_eq!(d.tokens, single.tokens);
            assert_eq!(d.log_prob, single.log_prob);
            assert_eq!(d.posterior, vec![1.0, 0.0]);
        }
        let d = run(&lm, &reversed, &zero, SEQ_THOROUGH, &opts);
        assert!(d.log_prob >= single.log_prob);
        assert_eq!(d.posterior, vec![1.0, 0.0]);
    }
}

// ---------------------------------------------------------------------------------------------
// Batching and row bookkeeping

#[test]
fn batched_scoring_equals_one_document_at_a_time() {
    let vocab = 6;
    let mut rng = SplitMix64::new(3);
    for seed in 0..10u64 {
        let lm = TableLm::new(vocab, &[5], 600 + seed, 2.0);
        let k = 4;
        let prompts = random_prompts(k, seed, vocab);
        let lp = logs(&random_prior(k, &mut rng));
        let y: Vec<u32> = (0..7).map(|_| (rng.next_u64() % 6) as u32).collect();
        let before = TableLm::count(&lm.score_calls);
        let batched = score_sequence(&lm, &prompts, &lp, &y).unwrap();
        let tok = score_token(&lm, &prompts, &lp, &y).unwrap();
        assert_eq!(
            TableLm::count(&lm.score_calls) - before,
            2,
            "one call per scoring"
        );
        for z in 0..k {
            let one = score_sequence(&lm, &prompts[z..z + 1], &[0.0], &y).unwrap();
            assert_eq!(one.doc_log_likelihoods[0], batched.doc_log_likelihoods[z]);
            assert_eq!(one.doc_log_likelihoods[0], tok.doc_log_likelihoods[z]);
        }
    }
}

#[test]
fn beams_match_a_reference_without_row_bookkeeping() {
    // Without stop tokens every hypothesis runs the full length, so every step's row
    // reordering shows in the result; with one, finishing hypotheses leave the beam.
    let (vocab, max_steps) = (5usize, 7usize);
    for (seed, stops) in (0..12u64).flat_map(|s| [(s, vec![4u32]), (s, vec![])]) {
        for (k, width) in [(1, 3), (2, 2), (3, 3), (3, 5)] {
            let lm = TableLm::new(vocab, &stops, 700 + seed, 1.0);
            let prompts = random_prompts(k, seed + 31, vocab);
            let lp = logs(&prior_probs(k));
            let opts = options(max_steps, Search::Beam { width });

            // RAG-Token: one group of k rows per hypothesis.
            let d = run(&lm, &prompts, &lp, Marginalize::Token, &opts);
            let r = reference::beam(&lm, &prompts, &lp, width, 1, max_steps, &stops);
            assert_eq!(
                (&d.tokens, d.finish),
                (&r[0].0, r[0].1),
                "seed {seed} k {k}"
            );
            assert_eq!(d.log_prob, r[0].2);

            // RAG-Sequence: k groups in one state = each document's beam on its own = the
            // reference beam per document.
            let stop_set = StopSet::new(&stops, &[]);
            let params = Params {
                vocab,
                width,
                keep: width,
                max_steps,
                stops: &stop_set,
                cancel: &CancelFlag::default(),
            };
            let refs: Vec<&[u32]> = prompts.iter().map(Vec::as_slice).collect();
            let mut state = lm.start(&refs).unwrap();
            let own = [0.0];
            let groups: Vec<Group<'_>> = (0..k)
                .map(|z| Group {
                    weights: &own,
                    first_row: z,
                })
                .collect();
            let together = beam::search(state.as_mut(), &groups, &params).unwrap();
            for z in 0..k {
                let mut alone_state = lm.start(&refs[z..z + 1]).unwrap();
                let alone = beam::search(
                    alone_state.as_mut(),
                    &[Group {
                        weights: &own,
                        first_row: 0,
                    }],
                    &params,
                )
                .unwrap()
                .remove(0);
                assert_eq!(together[z], alone);
                let r = reference::beam(
                    &lm,
                    &prompts[z..z + 1],
                    &own,
                    width,
                    width,
                    max_steps,
                    &stops,
                );
                let ours: Vec<(Vec<u32>, Finish, f64)> = alone
                    .iter()
                    .map(|h| (h.tokens.clone(), h.finish, h.score))
                    .collect();
                assert_eq!(ours, r);
            }
        }
    }
}

#[test]
fn a_broken_select_is_caught() {
    // No stop tokens: answers use every step, so a wrong row order cannot hide behind a short
    // answer found before the first reordering.
    let (vocab, stops, max_steps) = (5usize, [], 7usize);
    let (mut token_caught, mut sequence_caught) = (false, false);
    for seed in 0..12u64 {
        let k = 3;
        let width = 3;
        let lm = TableLm::new(vocab, &stops, 700 + seed, 1.0).with_broken_select();
        let prompts = random_prompts(k, seed + 31, vocab);
        let lp = logs(&prior_probs(k));
        let opts = options(max_steps, Search::Beam { width });
        let d = run(&lm, &prompts, &lp, Marginalize::Token, &opts);
        let r = reference::beam(&lm, &prompts, &lp, width, 1, max_steps, &stops);
        token_caught |= (&d.tokens, d.finish, d.log_prob) != (&r[0].0, r[0].1, r[0].2);
        let s = run(&lm, &prompts, &lp, SEQ_THOROUGH, &opts);
        let t = reference::target(&s.tokens, s.finish);
        let exact = score_sequence(&lm, &prompts, &lp, &t).unwrap();
        let from_beam: Vec<f64> = s.doc_log_likelihoods.iter().map(|l| l.unwrap()).collect();
        sequence_caught |= from_beam != exact.doc_log_likelihoods;
    }
    assert!(
        token_caught && sequence_caught,
        "{token_caught} {sequence_caught}"
    );
}

#[test]
fn the_k_documents_run_as_one_batch() {
    let (vocab, stops) = (6usize, [5u32]);
    let k = 3;
    let prompts = random_prompts(k, 4, vocab);
    let lp = logs(&prior_probs(k));
    for search in [
        Search::Greedy,
        Search::Sample(Sampling {
            seed: 3,
            ..Sampling::default()
        }),
        Search::Beam { width: 4 },
    ] {
        for m in [Marginalize::Token, SEQ_THOROUGH, SEQ_FAST] {
            let lm = TableLm::new(vocab, &stops, 9, 1.0);
            let max = 10;
            let d = run(&lm, &prompts, &lp, m, &options(max, search));
            assert_eq!(TableLm::count(&lm.starts), 1, "{m:?} {search:?}");
            let ancestral = matches!((m, search), (Marginalize::Sequence(_), Search::Sample(_)));
            let rows = if ancestral { 1 } else { k };
            assert_eq!(TableLm::count(&lm.started_rows), rows);
            // One forward step per decoding step, never one per document; the last step's token
            // needs none.
            let advances = TableLm::count(&lm.advances);
            assert!(advances < max);
            let single_path = matches!(search, Search::Sample(_))
                || (search == Search::Greedy && m == Marginalize::Token);
            if single_path {
                let expected = match d.finish {
                    Finish::Stop(_) => d.tokens.len(),
                    Finish::Length => max - 1,
                };
                assert_eq!(advances, expected);
            }
            let score_calls = TableLm::count(&lm.score_calls);
            match m {
                Marginalize::Token | SEQ_FAST => assert_eq!(score_calls, 0),
                _ => assert!(score_calls <= 1),
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Sampling

fn one_step_counts(
    lm: &TableLm,
    prompts: &[Vec<u32>],
    lp: &[f64],
    m: Marginalize,
    temperature: f64,
    draws: u64,
) -> Vec<usize> {
    let mut counts = vec![0usize; lm.vocab];
    for seed in 0..draws {
        let opts = options(
            1,
            Search::Sample(Sampling {
                temperature,
                top_p: 1.0,
                seed,
            }),
        );
        let d = run(lm, prompts, lp, m, &opts);
        let v = match d.finish {
            Finish::Stop(s) => s,
            Finish::Length => d.tokens[0],
        };
        counts[v as usize] += 1;
    }
    counts
}

#[test]
fn sampling_follows_the_mixed_distribution() {
    let (vocab, stops) = (5usize, [4u32]);
    let lm = TableLm::new(vocab, &stops, 17, 2.5);
    let prompts = random_prompts(3, 8, vocab);
    let pi = prior_probs(3);
    let lp = logs(&pi);
    let next =
        |p: &Vec<u32>| -> Vec<f64> { lm.log_dist(p).iter().map(|l| f64::from(*l).exp()).collect() };
    let per_doc: Vec<Vec<f64>> = prompts.iter().map(next).collect();
    let mixture: Vec<f64> = (0..vocab)
        .map(|v| (0..3).map(|z| pi[z] * per_doc[z][v]).sum())
        .collect();
    let equal_weights: Vec<f64> = (0..vocab)
        .map(|v| (0..3).map(|z| per_doc[z][v] / 3.0).sum())
        .collect();
    let draws = 20_000;
    // chi-square with 4 degrees of freedom: P(> 30) ≈ 5e-6.
    for m in [Marginalize::Token, SEQ_THOROUGH] {
        let counts = one_step_counts(&lm, &prompts, &lp, m, 1.0, draws);
        let good = chi_square(&counts, &mixture);
        assert!(good < 30.0, "{m:?}: chi2 {good} {counts:?} {mixture:?}");
        // Sampling from one document, or ignoring the prior, would be rejected.
        assert!(chi_square(&counts, &per_doc[0]) > 200.0);
        assert!(chi_square(&counts, &equal_weights) > 200.0);
    }
    // Temperature 0.5 draws from the mixture squared (renormalised).
    let sq: Vec<f64> = mixture.iter().map(|q| q * q).collect();
    let total: f64 = sq.iter().sum();
    let tempered: Vec<f64> = sq.iter().map(|q| q / total).collect();
    let counts = one_step_counts(&lm, &prompts, &lp, Marginalize::Token, 0.5, draws);
    assert!(chi_square(&counts, &tempered) < 30.0);
    assert!(chi_square(&counts, &mixture) > 200.0);
}

#[test]
fn sampling_draws_from_each_marginalisations_own_sequence_distribution() {
    // Two steps, where RAG-Sequence (one document for the whole answer) and RAG-Token (a
    // document per token) are different distributions over answers.
    let (vocab, stops, max_steps) = (5usize, [4u32], 2usize);
    let lm = TableLm::new(vocab, &stops, 23, 3.0);
    let prompts = random_prompts(2, 12, vocab);
    let pi = vec![0.5, 0.5];
    let lp = logs(&pi);
    let all = reference::outcomes(vocab, &stops, max_steps);
    let targets: Vec<Vec<u32>> = all.iter().map(|(y, f)| reference::target(y, *f)).collect();
    let seq: Vec<f64> = targets
        .iter()
        .map(|t| reference::sequence_prob(&lm, &prompts, &pi, t))
        .collect();
    let tok: Vec<f64> = targets
        .iter()
        .map(|t| reference::token_prob(&lm, &prompts, &pi, t))
        .collect();
    let draws = 40_000u64;
    for (m, own, other) in [(Marginalize::Token, &tok, &seq), (SEQ_THOROUGH, &seq, &tok)] {
        let mut counts = vec![0usize; all.len()];
        for seed in 0..draws {
            let opts = options(
                max_steps,
                Search::Sample(Sampling {
                    seed,
                    ..Sampling::default()
                }),
            );
            let d = run(&lm, &prompts, &lp, m, &opts);
            let i = all
                .iter()
                .position(|(y, f)| *y == d.tokens && *f == d.finish)
                .unwrap();
            counts[i] += 1;
        }
        // 20 degrees of freedom: P(> 70) ≈ 1e-7.
        let good = chi_square(&counts, own);
        let bad = chi_square(&counts, other);
        assert!(good < 70.0, "{m:?}: {good}");
        assert!(bad > 300.0, "{m:?}: {bad}");
    }
}

#[test]
fn sampling_is_reproducible_from_the_seed() {
    let (vocab, stops) = (6usize, [5u32]);
    let lm = TableLm::new(vocab, &stops, 31, 1.0);
    let prompts = random_prompts(3, 2, vocab);
    let lp = logs(&prior_probs(3));
    for m in [Marginalize::Token, SEQ_THOROUGH, SEQ_FAST] {
        let mut distinct = HashSet::new();
        for seed in 0..30 {
            let opts = options(
                10,
                Search::Sample(Sampling {
                    temperature: 0.9,
                    top_p: 0.95,
                    seed,
                }),
            );
            let a = run(&lm, &prompts, &lp, m, &opts);
            let b = run(&lm, &prompts, &lp, m, &opts);
            assert_eq!(a, b);
            distinct.insert(a.tokens);
        }
        assert!(distinct.len() > 5, "{m:?}: {}", distinct.len());
    }
}

// ---------------------------------------------------------------------------------------------
// Conventions

#[test]
fn plain_generation_is_the_k1_case() {
    let (vocab, stops) = (6usize, [5u32]);
    for seed in 0..8u64 {
        let lm = TableLm::new(vocab, &stops, 800 + seed, 1.5);
        let prompt = random_prompts(1, seed, vocab);
        for search in [
            Search::Greedy,
            Search::Beam { width: 3 },
            Search::Sample(Sampling {
                temperature: 0.8,
                top_p: 0.9,
                seed,
            }),
        ] {
            let opts = options(9, search);
            let plain = generate(&lm, &prompt[0], &opts, None).unwrap();
            let y = reference::target(&plain.tokens, plain.finish);
            let direct: f64 = reference::token_probs(&lm, &prompt[0], &y)
                .iter()
                .map(|p| p.ln())
                .sum();
            assert_close(plain.log_prob, direct, 1e-12, "plain log p");
            assert_eq!(plain.posterior, vec![1.0]);
            for m in [Marginalize::Token, SEQ_THOROUGH, SEQ_FAST] {
                let d = run(&lm, &prompt, &[0.0], m, &opts);
                assert_eq!((&d.tokens, d.finish), (&plain.tokens, plain.finish));
                assert_eq!(d.log_prob, plain.log_prob);
                assert_eq!(d.doc_log_likelihoods, vec![Some(plain.log_prob)]);
            }
        }
    }
}

#[test]
fn stop_tokens_end_the_answer_and_count_in_its_probability() {
    let (vocab, stops) = (6usize, [5u32]);
    let (mut stopped, mut cut, mut extra_stopped) = (0, 0, 0);
    for seed in 0..30u64 {
        let lm = TableLm::new(vocab, &stops, 900 + seed, 1.5);
        let prompts = random_prompts(2, seed, vocab);
        let lp = logs(&prior_probs(2));
        for extra in [vec![], vec![2u32]] {
            for search in [Search::Greedy, Search::Beam { width: 3 }] {
                for m in [Marginalize::Token, SEQ_THOROUGH] {
                    let max = 5;
                    let opts = DecodeOptions {
                        max_new_tokens: max,
                        search,
                        extra_stop_tokens: extra.clone(),
                        cancel: Default::default(),
                    };
                    let d = run(&lm, &prompts, &lp, m, &opts);
                    assert!(!d.tokens.contains(&5) && !d.tokens.iter().any(|t| extra.contains(t)));
                    let t = reference::target(&d.tokens, d.finish);
                    match d.finish {
                        Finish::Stop(s) => {
                            assert!(s == 5 || extra.contains(&s));
                            assert!(d.tokens.len() < max, "the stop token uses a step");
                            stopped += 1;
                            if s == 2 {
                                extra_stopped += 1;
                            }
                        }
                        Finish::Length => {
                            assert_eq!(d.tokens.len(), max);
                            cut += 1;
                        }
                    }
                    let rescored = match m {
                        Marginalize::Token => score_token(&lm, &prompts, &lp, &t).unwrap().log_prob,
                        _ => score_sequence(&lm, &prompts, &lp, &t).unwrap().log_prob,
                    };
                    assert_eq!(d.log_prob, rescored);
                    if let Finish::Stop(_) = d.finish {
                        // Leaving the stop token out would give a different (larger) number.
                        let without = score_token(&lm, &prompts, &lp, &d.tokens).unwrap().log_prob;
                        assert!(without > d.log_prob);
                    }
                    if m == Marginalize::Token {
                        assert_eq!(d.token_posteriors.len(), t.len());
                    }
                }
            }
        }
    }
    assert!(
        stopped > 0 && cut > 0 && extra_stopped > 0,
        "{stopped} {cut} {extra_stopped}"
    );
}

#[test]
fn decoded_posteriors_are_the_rescored_ones() {
    let (vocab, stops) = (6usize, [5u32]);
    for seed in 0..10u64 {
        let lm = TableLm::new(vocab, &stops, 1100 + seed, 1.5);
        let k = 3;
        let prompts = random_prompts(k, seed, vocab);
        let pi = prior_probs(k);
        let lp = logs(&pi);
        let opts = options(8, Search::Beam { width: 2 });
        let d = run(&lm, &prompts, &lp, Marginalize::Token, &opts);
        let t = reference::target(&d.tokens, d.finish);
        let s = score_token(&lm, &prompts, &lp, &t).unwrap();
        assert_eq!(d.posterior, s.posterior);
        assert_eq!(d.token_posteriors, s.token_posteriors);
        assert!((d.posterior.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        let naive = reference::token_posteriors(&lm, &prompts, &pi, &t);
        for (a, b) in d.token_posteriors.iter().zip(&naive) {
            for z in 0..k {
                assert_close(a[z], b[z], 1e-10, "token posterior");
            }
        }

        let d = run(&lm, &prompts, &lp, SEQ_THOROUGH, &opts);
        let t = reference::target(&d.tokens, d.finish);
        let naive = reference::sequence_posterior(&lm, &prompts, &pi, &t);
        assert!((d.posterior.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        for z in 0..k {
            assert_close(d.posterior[z], naive[z], 1e-10, "sequence posterior");
        }
        assert!(d.token_posteriors.is_empty());
    }
}

#[test]
fn streaming_delivers_each_token_once_and_in_time() {
    let (vocab, stops) = (6usize, [5u32]);
    let prompts = random_prompts(3, 6, vocab);
    let lp = logs(&prior_probs(3));
    for search in [
        Search::Greedy,
        Search::Sample(Sampling {
            seed: 5,
            ..Sampling::default()
        }),
        Search::Beam { width: 3 },
    ] {
        for m in [Marginalize::Token, SEQ_THOROUGH] {
            let lm = TableLm::new(vocab, &stops, 41, 0.5);
            let mut got: Vec<(u32, usize)> = Vec::new();
            let mut sink = |t: u32| got.push((t, TableLm::count(&lm.advances)));
            let d = decode(&lm, &prompts, &lp, m, &options(12, search), Some(&mut sink)).unwrap();
            let tokens: Vec<u32> = got.iter().map(|g| g.0).collect();
            assert_eq!(tokens, d.tokens);
            let single_path = matches!(search, Search::Sample(_))
                || (matches!(search, Search::Greedy) && m == Marginalize::Token);
            let total = TableLm::count(&lm.advances);
            for (i, &(_, advances)) in got.iter().enumerate() {
                if single_path {
                    // Token i is delivered before the forward step that consumes it.
                    assert_eq!(advances, i, "{m:?} {search:?}");
                } else {
                    assert_eq!(advances, total, "{m:?} {search:?}");
                }
            }
        }
    }
}

#[test]
fn bad_inputs_are_errors() {
    let lm = TableLm::new(4, &[3], 1, 1.0);
    let prompts = vec![vec![0u32], vec![1]];
    let lp = logs(&[0.5, 0.5]);
    let opts = DecodeOptions::default();
    let bad = |r: Result<Decoded, RagError>| {
        assert!(
            matches!(r, Err(RagError::InvalidGenerationInput(_))),
            "{r:?}"
        )
    };
    bad(decode(
        &lm,
        &prompts,
        &[0.0],
        Marginalize::Token,
        &opts,
        None,
    ));
    bad(decode(&lm, &[], &[], Marginalize::Token, &opts, None));
    bad(decode(
        &lm,
        &[vec![], vec![1]],
        &lp,
        Marginalize::Token,
        &opts,
        None,
    ));
    bad(decode(
        &lm,
        &prompts,
        &[0.0, 0.0],
        Marginalize::Token,
        &opts,
        None,
    ));
    bad(decode(
        &lm,
        &prompts,
        &[f64::NAN, 0.0],
        Marginalize::Token,
        &opts,
        None,
    ));
    bad(decode(
        &lm,
        &prompts,
        &lp,
        Marginalize::Token,
        &options(4, Search::Beam { width: 0 }),
        None,
    ));
    for (temperature, top_p) in [(0.0, 1.0), (f64::INFINITY, 1.0), (1.0, 0.0), (1.0, 1.5)] {
        let s = Search::Sample(Sampling {
            temperature,
            top_p,
            seed: 0,
        });
        bad(decode(
            &lm,
            &prompts,
            &lp,
            SEQ_THOROUGH,
            &options(4, s),
            None,
        ));
    }
    assert!(matches!(
        score_sequence(&lm, &prompts, &[1.0, 1.0], &[0]),
        Err(RagError::InvalidGenerationInput(_))
    ));
}

#[test]
fn zero_new_tokens_is_the_empty_prefix() {
    let lm = TableLm::new(4, &[3], 1, 1.0);
    let prompts = vec![vec![0u32], vec![1]];
    let pi = [0.25, 0.75];
    for m in [Marginalize::Token, SEQ_THOROUGH] {
        let d = run(&lm, &prompts, &logs(&pi), m, &options(0, Search::Greedy));
        assert!(d.tokens.is_empty());
        assert_eq!(d.finish, Finish::Length);
        assert_eq!(d.log_prob, 0.0);
        assert_close(d.posterior[0], 0.25, 1e-15, "prior");
    }
    assert_eq!(TableLm::count(&lm.starts), 0);
}

/// A cancelled flag stops every decoding mode at its next step with `RagError::Cancelled`;
/// a flag set mid-way (from the token callback, as a server does when its client leaves)
/// stops it after the token that set it.
#[test]
fn cancel_flag_stops_every_mode() {
    // No stop token, so only max_new_tokens or the flag can end a decoding.
    let lm = TableLm::new(9, &[], 5, 1.0);
    let prompts = random_prompts(3, 5, 9);
    let prior = logs(&prior_probs(3));
    let searches = [
        Search::Greedy,
        Search::Beam { width: 3 },
        Search::Sample(Sampling {
            temperature: 1.0,
            top_p: 1.0,
            seed: 1,
        }),
    ];
    for marginalize in [SEQ_THOROUGH, SEQ_FAST, Marginalize::Token] {
        for search in &searches {
            let opts = options(20, *search);
            let done = decode(&lm, &prompts, &prior, marginalize, &opts, None).unwrap();
            assert_eq!(
                done.tokens.len(),
                20,
                "{marginalize:?} {search:?}: runs to the end"
            );

            let cancelled = options(20, *search);
            cancelled.cancel.cancel();
            let err = decode(&lm, &prompts, &prior, marginalize, &cancelled, None).unwrap_err();
            assert!(matches!(err, RagError::Cancelled), "{err}");

            // Beam search, and RAG-Sequence's greedy decoding (a beam of 1 per document),
            // stream their tokens only once the answer is chosen; a flag set then is too late
            // to matter, and they are stopped from outside (checked above).
            let streams_while_decoding = matches!(search, Search::Sample(_))
                || (marginalize == Marginalize::Token && matches!(search, Search::Greedy));
            if !streams_while_decoding {
                continue;
            }
            let midway = options(20, *search);
            let flag = midway.cancel.clone();
            let mut seen = 0;
            let mut on_token = |_t: u32| {
                seen += 1;
                if seen == 3 {
                    flag.cancel();
                }
            };
            let err = decode(
                &lm,
                &prompts,
                &prior,
                marginalize,
                &midway,
                Some(&mut on_token),
            )
            .unwrap_err();
            assert!(matches!(err, RagError::Cancelled), "{err}");
            assert_eq!(seen, 3, "{marginalize:?} {search:?}");
        }
    }
}
