//! The brute-force checks of the parent module, repeated on zrag's real llama decoder with
//! tiny random weights (vocabulary 5, Q4_1 and f32), so that the marginalisation math is
//! checked through the KV caches, ragged batches and row selection of the actual generator.
//! The naive references query the model by full history through `logits_all`, with no cache.

use zrag_models::generator::{GgmlDType, Llama};

use super::reference::{self, HistoryLm};
use super::*;

struct FromScratch<'a>(&'a Llama);

impl HistoryLm for FromScratch<'_> {
    fn vocab(&self) -> usize {
        self.0.config().vocab_size
    }

    fn log_dist(&self, history: &[u32]) -> Vec<f32> {
        let logits = self.0.logits_all(history).unwrap().pop().unwrap();
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let log_z = max
            + logits
                .iter()
                .map(|&v| (v as f64 - max).exp())
                .sum::<f64>()
                .ln();
        logits.iter().map(|&v| (v as f64 - log_z) as f32).collect()
    }
}

fn tiny(dtype: GgmlDType, seed: u64) -> Llama {
    let config = zrag_models::testing::tiny_llama_config(5);
    // Llama::random makes token 0 the stop token.
    Llama::random(config, seed, dtype).unwrap()
}

const STOPS: [u32; 1] = [0];
const PROMPTS: [&[u32]; 3] = [&[1, 2, 3, 4], &[4, 4, 1], &[2, 3]];

#[test]
fn tiny_llama_outcomes_sum_to_one_and_match_the_naive_products() {
    let max_steps = 3;
    let all = reference::outcomes(5, &STOPS, max_steps);
    for (dtype, seed) in [(GgmlDType::F32, 1u64), (GgmlDType::Q4_1, 2)] {
        let model = tiny(dtype, seed);
        let naive = FromScratch(&model);
        let prompts: Vec<Vec<u32>> = PROMPTS.iter().map(|p| p.to_vec()).collect();
        let pi = [0.6, 0.3, 0.1];
        let lp: Vec<f64> = pi.iter().map(|p: &f64| p.ln()).collect();
        let (mut seq_total, mut tok_total) = (0.0, 0.0);
        for (y, finish) in &all {
            let t = reference::target(y, *finish);
            let s = score_sequence(&model, &prompts, &lp, &t)
                .unwrap()
                .log_prob
                .exp();
            let k = score_token(&model, &prompts, &lp, &t)
                .unwrap()
                .log_prob
                .exp();
            // Cached, batched scoring vs from-scratch forward passes: f32 rounding only (the
            // matmuls run with other shapes, so the last bits of the logits differ).
            let (naive_s, naive_k) = (
                reference::sequence_prob(&naive, &prompts, &pi, &t),
                reference::token_prob(&naive, &prompts, &pi, &t),
            );
            assert!(
                (s / naive_s - 1.0).abs() < 1e-4,
                "{dtype:?} {t:?}: {s} vs {naive_s}"
            );
            assert!(
                (k / naive_k - 1.0).abs() < 1e-4,
                "{dtype:?} {t:?}: {k} vs {naive_k}"
            );
            seq_total += s;
            tok_total += k;
        }
        assert!(
            (seq_total - 1.0).abs() < 1e-5,
            "{dtype:?}: RAG-Sequence total {seq_total}"
        );
        assert!(
            (tok_total - 1.0).abs() < 1e-5,
            "{dtype:?}: RAG-Token total {tok_total}"
        );
    }
}

#[test]
fn tiny_llama_exhaustive_beam_finds_the_argmax() {
    let max_steps = 3;
    let all = reference::outcomes(5, &STOPS, max_steps);
    let model = tiny(GgmlDType::Q4_1, 3);
    let naive = FromScratch(&model);
    let prompts: Vec<Vec<u32>> = PROMPTS.iter().map(|p| p.to_vec()).collect();
    let pi = [0.5, 0.3, 0.2];
    let lp: Vec<f64> = pi.iter().map(|p: &f64| p.ln()).collect();
    let targets: Vec<Vec<u32>> = all.iter().map(|(y, f)| reference::target(y, *f)).collect();
    let options = DecodeOptions {
        max_new_tokens: max_steps,
        search: Search::Beam { width: all.len() },
        extra_stop_tokens: Vec::new(),
        cancel: Default::default(),
    };
    for marginalize in [
        Marginalize::Token,
        Marginalize::Sequence(SequenceDecoding::Thorough),
    ] {
        let probs: Vec<f64> = targets
            .iter()
            .map(|t| match marginalize {
                Marginalize::Token => reference::token_prob(&naive, &prompts, &pi, t),
                Marginalize::Sequence(_) => reference::sequence_prob(&naive, &prompts, &pi, t),
            })
            .collect();
        let best = (0..probs.len())
            .max_by(|&a, &b| probs[a].total_cmp(&probs[b]))
            .unwrap();
        let decoded = decode(&model, &prompts, &lp, marginalize, &options, None).unwrap();
        assert_eq!(
            (&decoded.tokens, decoded.finish),
            (&all[best].0, all[best].1),
            "{marginalize:?}"
        );
        assert!(
            (decoded.log_prob - probs[best].ln()).abs() < 1e-5,
            "{marginalize:?}"
        );
        let total: f64 = decoded.posterior.iter().sum();
        assert!((total - 1.0).abs() < 1e-9);
    }
}
