//! A "table LM" for tests: a tiny vocabulary whose next-token distribution is a deterministic
//! pseudo-random function (a hash) of the entire token history, prompt included.
//!
//! Because every history gets its own distribution, a decoder that feeds a token to the wrong
//! row, reorders rows wrongly in `select`, or forgets part of a history gets different numbers,
//! and tests see it. The decode state genuinely keeps one history per row; `score` recomputes
//! from scratch, so state and scoring are two independent paths to the same values.
//! [`TableLm::log_dist`] is the reference the naive implementations use.
//!
//! The model also counts its calls, so tests can check that the k documents ran as one batch,
//! and can be built with a deliberately broken `select` to show that the tests notice.

use std::sync::atomic::{AtomicUsize, Ordering};

use zrag_models::{CausalLm, DecodeState, ModelError};

pub(crate) struct TableLm {
    pub vocab: usize,
    pub stops: Vec<u32>,
    seed: u64,
    /// Logits are uniform in [−scale, scale]: larger means peakier distributions.
    scale: f64,
    broken_select: bool,
    pub starts: AtomicUsize,
    pub started_rows: AtomicUsize,
    pub advances: AtomicUsize,
    pub selects: AtomicUsize,
    pub score_calls: AtomicUsize,
    pub scored_pairs: AtomicUsize,
}

fn mix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl TableLm {
    pub fn new(vocab: usize, stops: &[u32], seed: u64, scale: f64) -> Self {
        TableLm {
            vocab,
            stops: stops.to_vec(),
            seed,
            scale,
            broken_select: false,
            starts: AtomicUsize::new(0),
            started_rows: AtomicUsize::new(0),
            advances: AtomicUsize::new(0),
            selects: AtomicUsize::new(0),
            score_calls: AtomicUsize::new(0),
            scored_pairs: AtomicUsize::new(0),
        }
    }

    /// The same model with a `select` that ignores the requested order (keeps rows cyclically
    /// from the start): what a row-bookkeeping bug looks like.
    pub fn with_broken_select(mut self) -> Self {
        self.broken_select = true;
        self
    }

    /// log p(next | history) as the model reports it (f32, like a real generator).
    pub fn log_dist(&self, history: &[u32]) -> Vec<f32> {
        let mut h = mix64(self.seed);
        for &t in history {
            h = mix64(h ^ (u64::from(t) + 1).wrapping_mul(0xD6E8_FEB8_6659_FD93));
        }
        let logits: Vec<f64> = (0..self.vocab as u64)
            .map(|v| {
                let u = (mix64(h ^ (v + 1).wrapping_mul(0xA076_1D64_78BD_642F)) >> 11) as f64
                    / (1u64 << 53) as f64;
                self.scale * (2.0 * u - 1.0)
            })
            .collect();
        let max = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let log_z = max + logits.iter().map(|l| (l - max).exp()).sum::<f64>().ln();
        logits.iter().map(|l| (l - log_z) as f32).collect()
    }

    pub fn count(counter: &AtomicUsize) -> usize {
        counter.load(Ordering::SeqCst)
    }
}

struct Row {
    history: Vec<u32>,
    log_probs: Vec<f32>,
}

struct TableState<'a> {
    lm: &'a TableLm,
    rows: Vec<Row>,
}

impl DecodeState for TableState<'_> {
    fn rows(&self) -> usize {
        self.rows.len()
    }

    fn log_probs(&self, row: usize) -> &[f32] {
        &self.rows[row].log_probs
    }

    fn advance(&mut self, tokens: &[u32]) -> Result<(), ModelError> {
        assert_eq!(tokens.len(), self.rows.len(), "one token per row");
        self.lm.advances.fetch_add(1, Ordering::SeqCst);
        for (row, &t) in self.rows.iter_mut().zip(tokens) {
            assert!((t as usize) < self.lm.vocab);
            row.history.push(t);
            row.log_probs = self.lm.log_dist(&row.history);
        }
        Ok(())
    }

    fn select(&mut self, rows: &[usize]) -> Result<(), ModelError> {
        self.lm.selects.fetch_add(1, Ordering::SeqCst);
        let n = self.rows.len();
        let picked: Vec<usize> = if self.lm.broken_select {
            (0..rows.len()).map(|i| i % n).collect()
        } else {
            rows.to_vec()
        };
        self.rows = picked
            .iter()
            .map(|&r| Row {
                history: self.rows[r].history.clone(),
                log_probs: self.rows[r].log_probs.clone(),
            })
            .collect();
        Ok(())
    }
}

impl CausalLm for TableLm {
    fn vocab_size(&self) -> usize {
        self.vocab
    }

    fn stop_tokens(&self) -> &[u32] {
        &self.stops
    }

    fn start(&self, prompts: &[&[u32]]) -> Result<Box<dyn DecodeState + '_>, ModelError> {
        self.starts.fetch_add(1, Ordering::SeqCst);
        self.started_rows.fetch_add(prompts.len(), Ordering::SeqCst);
        assert!(prompts.iter().all(|p| !p.is_empty()));
        Ok(Box::new(TableState {
            lm: self,
            rows: prompts
                .iter()
                .map(|p| Row {
                    history: p.to_vec(),
                    log_probs: self.log_dist(p),
                })
                .collect(),
        }))
    }

    fn score(&self, prompts: &[&[u32]], targets: &[&[u32]]) -> Result<Vec<Vec<f32>>, ModelError> {
        assert_eq!(prompts.len(), targets.len());
        self.score_calls.fetch_add(1, Ordering::SeqCst);
        self.scored_pairs.fetch_add(prompts.len(), Ordering::SeqCst);
        Ok(prompts
            .iter()
            .zip(targets)
            .map(|(p, t)| {
                let mut history = p.to_vec();
                t.iter()
                    .map(|&tok| {
                        let lp = self.log_dist(&history)[tok as usize];
                        history.push(tok);
                        lp
                    })
                    .collect()
            })
            .collect())
    }
}
