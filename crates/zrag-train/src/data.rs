//! Training examples for the retriever: a query, the documents that answer it (BEIR qrels)
//! and/or its answers (question/answer pairs, for LSR and for DPR's answer-matching
//! positives).

use std::collections::HashMap;
use std::path::Path;

use zrag_eval::beir;

use crate::error::{Result, TrainError};

#[derive(Clone, Debug, PartialEq)]
pub struct Example {
    pub id: String,
    pub query: String,
    /// Relevant document ids (empty for question/answer pairs without judgements).
    pub positive_docs: Vec<String>,
    /// Gold answers (empty when only qrels are known).
    pub answers: Vec<String>,
}

/// Queries that have judgements in `qrels` (relevance > 0), with answers from `answers`
/// (a `zrag eval qa` file) when given.
pub fn from_beir(queries: &Path, qrels: &Path, answers: Option<&Path>) -> Result<Vec<Example>> {
    let queries = beir::load_queries(queries)?;
    let judged = beir::load_qrels(qrels)?;
    let answer_map: HashMap<String, Vec<String>> = match answers {
        Some(path) => beir::load_qa(path)?
            .into_iter()
            .map(|item| (item.id, item.answers))
            .collect(),
        None => HashMap::new(),
    };
    let examples: Vec<Example> = queries
        .into_iter()
        .filter_map(|q| {
            let docs: Vec<String> = judged
                .get(&q.id)?
                .iter()
                .filter(|(_, &grade)| grade > 0)
                .map(|(doc, _)| doc.clone())
                .collect();
            if docs.is_empty() {
                return None;
            }
            Some(Example {
                answers: answer_map.get(&q.id).cloned().unwrap_or_default(),
                id: q.id,
                query: q.text,
                positive_docs: docs,
            })
        })
        .collect();
    if examples.is_empty() {
        return Err(TrainError::Data {
            path: qrels.to_path_buf(),
            message: "no query in the queries file has a positive judgement here".into(),
        });
    }
    Ok(examples)
}

/// Question/answer pairs (`{"_id", "question", "answers", "split"}` lines), keeping `split`
/// when given.
pub fn from_qa(path: &Path, split: Option<&str>) -> Result<Vec<Example>> {
    let examples: Vec<Example> = beir::load_qa(path)?
        .into_iter()
        .filter(|item| split.is_none() || item.split.as_deref() == split)
        .filter(|item| !item.answers.is_empty())
        .map(|item| Example {
            id: item.id,
            query: item.question,
            positive_docs: Vec::new(),
            answers: item.answers,
        })
        .collect();
    if examples.is_empty() {
        return Err(TrainError::Data {
            path: path.to_path_buf(),
            message: match split {
                Some(split) => format!("no question with answers in split `{split}`"),
                None => "no question with answers".into(),
            },
        });
    }
    Ok(examples)
}

/// True if `text` contains one of `answers` as a whole phrase (case- and
/// punctuation-insensitive), DPR's rule for a passage that answers a question.
pub fn contains_answer(text: &str, answers: &[String]) -> bool {
    let haystack = format!(" {} ", zrag_eval::answers::normalize_answer(text));
    answers.iter().any(|answer| {
        let needle = zrag_eval::answers::normalize_answer(answer);
        !needle.is_empty() && haystack.contains(&format!(" {needle} "))
    })
}

/// A deterministic shuffle (splitmix64-driven Fisher–Yates), so a seed reproduces a run.
pub fn shuffle<T>(items: &mut [T], seed: u64) {
    let mut state = seed;
    for i in (1..items.len()).rev() {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        items.swap(i, (z % (i as u64 + 1)) as usize);
    }
}

/// Indices of a training set in epochs: each epoch a fresh seeded permutation, so every
/// example is seen once per epoch and a seed reproduces the whole order.
#[derive(Debug, Clone)]
pub struct EpochSampler {
    order: Vec<usize>,
    cursor: usize,
    epoch: u64,
    seed: u64,
}

impl EpochSampler {
    pub fn new(len: usize, seed: u64) -> Self {
        let mut order: Vec<usize> = (0..len).collect();
        shuffle(&mut order, seed);
        EpochSampler {
            order,
            cursor: 0,
            epoch: 0,
            seed,
        }
    }

    /// The next `n` indices, crossing into a newly shuffled epoch when one ends. Empty when
    /// the set is.
    pub fn next_batch(&mut self, n: usize) -> Vec<usize> {
        if self.order.is_empty() {
            return Vec::new();
        }
        let mut batch = Vec::with_capacity(n);
        while batch.len() < n {
            if self.cursor == self.order.len() {
                self.epoch += 1;
                shuffle(&mut self.order, self.seed.wrapping_add(self.epoch));
                self.cursor = 0;
            }
            batch.push(self.order[self.cursor]);
            self.cursor += 1;
        }
        batch
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answer_matching_is_whole_phrase() {
        let answers = vec!["New York".to_string()];
        assert!(contains_answer("He moved to new york, in 1990.", &answers));
        assert!(!contains_answer("The New Yorker magazine", &answers));
    }

    #[test]
    fn shuffle_is_a_seeded_permutation() {
        let mut a: Vec<u32> = (0..50).collect();
        let mut b = a.clone();
        shuffle(&mut a, 7);
        shuffle(&mut b, 7);
        assert_eq!(a, b);
        assert_ne!(a, (0..50).collect::<Vec<_>>());
        let mut sorted = a.clone();
        sorted.sort();
        assert_eq!(sorted, (0..50).collect::<Vec<_>>());
    }

    #[test]
    fn sampler_covers_each_epoch_exactly_once() {
        let mut sampler = EpochSampler::new(7, 3);
        let drawn: Vec<usize> = (0..7).flat_map(|_| sampler.next_batch(3)).collect();
        assert_eq!(drawn.len(), 21);
        for epoch in drawn.chunks(7) {
            let mut seen = epoch.to_vec();
            seen.sort();
            assert_eq!(seen, (0..7).collect::<Vec<_>>());
        }
        assert_ne!(drawn[..7], drawn[7..14], "each epoch is reshuffled");
        assert!(EpochSampler::new(0, 3).next_batch(4).is_empty());
    }
}
