//! Re-rankers for the retriever's top-n candidates, behind [`crate::retriever::Rerank`]: the
//! generator, as unsupervised passage re-ranking (UPR, Sachan et al. 2022: the score of z is
//! log p_LM(x | z), the likelihood of the query given a prompt made from the passage), and the
//! bi-encoder (E_Q(x) · E_D(z) over the stored vectors). [`rerank`] reorders chunk lists.

use std::sync::Arc;

use zrag_models::generator::{ChatMessage, GeneratorTokenizer, LocalGenerator};
use zrag_models::CausalLm;

use crate::generate::logspace;
use crate::retriever::{Rerank, RerankInput, RetrievedChunk};
use crate::RagError;

/// UPR's instruction, after the passage in the user turn.
pub const DEFAULT_RERANK_INSTRUCTION: &str = "Please write a question based on this passage.";

/// Parameters of the generator re-ranker.
#[derive(Clone, Debug)]
pub struct GeneratorRerankOptions {
    /// Upper bound on the tokens of one passage's text (the title is kept whole), so that one
    /// long chunk cannot dominate the cost of the batch.
    pub max_passage_tokens: usize,
    /// Passages per `CausalLm::score` call. Each call is one batch; the bound keeps the
    /// activations and KV caches of a very long candidate list from all being alive at once
    /// (zrag's `Llama` also splits a call into passes of at most 4096 tokens).
    pub batch_size: usize,
    /// Follows the passage in the user turn.
    pub instruction: String,
}

impl Default for GeneratorRerankOptions {
    fn default() -> Self {
        GeneratorRerankOptions {
            max_passage_tokens: 256,
            batch_size: 32,
            instruction: DEFAULT_RERANK_INSTRUCTION.to_string(),
        }
    }
}

/// The model behind a [`GeneratorReranker`], owned so that the re-ranker can live in a
/// `Retriever` (`Box<dyn Rerank>`).
enum Model {
    Local(Arc<LocalGenerator>),
    Parts {
        lm: Arc<dyn CausalLm>,
        tokenizer: Arc<GeneratorTokenizer>,
    },
}

/// UPR with zrag's generator: the score of passage z is log p_LM(x | z), the teacher-forced
/// log-likelihood of the query's tokens as the start of the assistant's reply to
///
/// ```text
/// user:      Passage: {title}\n{passage text, cut to max_passage_tokens}\n\n{instruction}
/// assistant: {query}
/// ```
///
/// rendered in the model's chat template (for SmolLM2, ChatML with its default system turn,
/// as [`crate::prompt`] renders answer prompts). The score is the *sum* over the query's
/// tokens, not the mean: the query is the same for every passage, so both give the same
/// order, and the sum is a log-probability, so a softmax over it is the posterior p(z | x)
/// under a uniform prior over the candidates. No end-of-turn token is scored: only the
/// question is evidence about the passage. All candidates go through one batched
/// `CausalLm::score` call (or one per `batch_size` candidates).
pub struct GeneratorReranker {
    model: Model,
    pub options: GeneratorRerankOptions,
}

impl GeneratorReranker {
    /// The loaded generator (share it with `answer` through the same `Arc`).
    pub fn new(generator: Arc<LocalGenerator>) -> Self {
        GeneratorReranker {
            model: Model::Local(generator),
            options: GeneratorRerankOptions::default(),
        }
    }

    /// Any causal LM with its tokenizer.
    pub fn from_parts(lm: Arc<dyn CausalLm>, tokenizer: Arc<GeneratorTokenizer>) -> Self {
        GeneratorReranker {
            model: Model::Parts { lm, tokenizer },
            options: GeneratorRerankOptions::default(),
        }
    }

    pub fn with_options(self, options: GeneratorRerankOptions) -> Self {
        GeneratorReranker { options, ..self }
    }

    fn lm(&self) -> &dyn CausalLm {
        match &self.model {
            Model::Local(generator) => generator.model(),
            Model::Parts { lm, .. } => lm.as_ref(),
        }
    }

    fn tokenizer(&self) -> &GeneratorTokenizer {
        match &self.model {
            Model::Local(generator) => generator.tokenizer(),
            Model::Parts { tokenizer, .. } => tokenizer,
        }
    }

    /// The prompt of one passage: the user turn and the opening of the assistant's turn.
    pub fn prompt(&self, title: Option<&str>, text: &str) -> Result<Vec<u32>, RagError> {
        let text = self.truncated(text)?;
        let passage = match title {
            // Chunk texts often start with their title already (as in `prompt`).
            Some(title) if !title.is_empty() && !text.starts_with(title) => {
                format!("{title}\n{text}")
            }
            _ => text,
        };
        let message = format!("Passage: {passage}\n\n{}", self.options.instruction);
        Ok(self
            .tokenizer()
            .chat_prompt(&[ChatMessage::new("user", message)])?)
    }

    /// The scored tokens: the query as plain text (control-token strings stay text).
    /// Surrounding whitespace is dropped, since a leading space would change the first token.
    pub fn target(&self, query: &str) -> Result<Vec<u32>, RagError> {
        Ok(self.tokenizer().encode(query.trim())?)
    }

    /// log p(x | z) for every candidate, in order: the [`Rerank`] scores.
    pub fn log_likelihoods(
        &self,
        query: &str,
        candidates: &[RerankInput<'_>],
    ) -> Result<Vec<f64>, RagError> {
        if candidates.is_empty() {
            return Ok(Vec::new());
        }
        let target = self.target(query)?;
        let prompts = candidates
            .iter()
            .map(|c| self.prompt(c.title, c.text))
            .collect::<Result<Vec<_>, _>>()?;
        let mut scores = Vec::with_capacity(candidates.len());
        for batch in prompts.chunks(self.options.batch_size.max(1)) {
            let batch_prompts: Vec<&[u32]> = batch.iter().map(Vec::as_slice).collect();
            let targets = vec![target.as_slice(); batch.len()];
            let rows = self.lm().score(&batch_prompts, &targets)?;
            if rows.len() != batch.len() {
                return Err(RagError::GeneratorOutput(format!(
                    "{} score rows for {} prompts",
                    rows.len(),
                    batch.len()
                )));
            }
            for row in rows {
                if row.len() != target.len() {
                    return Err(RagError::GeneratorOutput(format!(
                        "{} log-probabilities for a target of {} tokens",
                        row.len(),
                        target.len()
                    )));
                }
                // f64 accumulation, so that a long query's sum keeps the small differences
                // between passages.
                let sum: f64 = row.iter().map(|&lp| f64::from(lp)).sum();
                if sum.is_nan() || sum > 0.0 {
                    return Err(RagError::GeneratorOutput(format!(
                        "log p(x|z) = {sum} is not a log-probability"
                    )));
                }
                scores.push(sum);
            }
        }
        Ok(scores)
    }

    /// The passage text cut to `max_passage_tokens` tokens. A cut inside a multi-byte
    /// character decodes to U+FFFD, which is dropped rather than shown to the model.
    fn truncated(&self, text: &str) -> Result<String, RagError> {
        let tokenizer = self.tokenizer();
        let ids = tokenizer.encode(text)?;
        if ids.len() <= self.options.max_passage_tokens {
            return Ok(text.to_string());
        }
        let cut = tokenizer.decode(&ids[..self.options.max_passage_tokens])?;
        Ok(cut.trim_end_matches('\u{FFFD}').to_string())
    }
}

impl Rerank for GeneratorReranker {
    fn scores(
        &self,
        query: &str,
        _query_vector: &[f32],
        candidates: &[RerankInput<'_>],
    ) -> Result<Vec<f64>, RagError> {
        self.log_likelihoods(query, candidates)
    }
}

/// The bi-encoder's own score, E_Q(x) · E_D(z), recomputed from the query vector and the
/// candidates' stored rows: puts candidates that did not come from one exact search (hybrid
/// fusion, BM25, an approximate index) on the bi-encoder's scale.
#[derive(Clone, Copy, Debug, Default)]
pub struct BiEncoderReranker;

impl Rerank for BiEncoderReranker {
    fn scores(
        &self,
        _query: &str,
        query_vector: &[f32],
        candidates: &[RerankInput<'_>],
    ) -> Result<Vec<f64>, RagError> {
        let rows: Vec<&[f32]> = candidates.iter().map(|c| c.vector).collect();
        dot_scores(query_vector, &rows)
    }
}

/// q · row for every row, accumulated in f64 (so the result does not depend on the order of
/// a SIMD reduction; it may differ from the index's f32 score in the last bits). A row of
/// another length (a missing vector is empty) is an error, not a zero score.
pub fn dot_scores(query: &[f32], rows: &[&[f32]]) -> Result<Vec<f64>, RagError> {
    rows.iter()
        .enumerate()
        .map(|(i, row)| {
            if row.len() != query.len() || query.is_empty() {
                return Err(RagError::InvalidRerankInput(format!(
                    "candidate {i} has a {}-dimensional vector, the query {}",
                    row.len(),
                    query.len()
                )));
            }
            Ok(query
                .iter()
                .zip(*row)
                .map(|(&a, &b)| f64::from(a) * f64::from(b))
                .sum())
        })
        .collect()
}

/// The candidates' indices from best to worst score. Ties keep their given (first-stage)
/// order; NaN ranks last.
pub fn rerank_order(scores: &[f64]) -> Vec<usize> {
    let key = |i: usize| {
        let s = scores[i];
        if s.is_nan() {
            f64::NEG_INFINITY
        } else {
            s
        }
    };
    let mut order: Vec<usize> = (0..scores.len()).collect();
    // Stable, so equal scores keep the first-stage order.
    order.sort_by(|&a, &b| key(b).total_cmp(&key(a)));
    order
}

/// Reorders retrieved chunks by re-ranker scores (one per chunk, in the chunks' order), for
/// callers holding a chunk list rather than a `Retriever` with a re-ranker.
///
/// Each chunk's `rank` becomes its new 1-based rank, its `score` the re-ranker's score (as
/// f32; for the generator, log p(x|z)), and `prob` / `log_prob` the softmax of the re-ranker's
/// scores over these chunks (temperature 1; for the generator, p(z|x) under a uniform prior).
/// The score is replaced, not kept beside the new one, so that `prob` stays the softmax of
/// `score` as the retriever defines it (and as `Retriever` does when it re-ranks). A caller who
/// also wants the first-stage scores keeps the original list, or uses [`rerank_order`].
///
/// NaN scores count as −∞ (last, probability 0); if every score is −∞ the probabilities are
/// uniform.
///
/// # Panics
/// If `scores` and `hits` differ in length.
pub fn rerank(hits: Vec<RetrievedChunk>, scores: &[f64]) -> Vec<RetrievedChunk> {
    assert_eq!(
        hits.len(),
        scores.len(),
        "rerank: one score per retrieved chunk"
    );
    let clean: Vec<f64> = scores
        .iter()
        .map(|&s| if s.is_nan() { f64::NEG_INFINITY } else { s })
        .collect();
    let log_probs = if clean.iter().all(|&s| s == f64::NEG_INFINITY) {
        vec![-(clean.len() as f64).ln(); clean.len()]
    } else {
        logspace::log_softmax(&clean, 1.0)
    };
    let order = rerank_order(&clean);
    let mut slots: Vec<Option<RetrievedChunk>> = hits.into_iter().map(Some).collect();
    order
        .into_iter()
        .enumerate()
        .map(|(new_rank, i)| {
            let mut chunk = slots[i].take().expect("each index once");
            chunk.rank = new_rank + 1;
            chunk.score = clean[i] as f32;
            chunk.log_prob = log_probs[i];
            chunk.prob = log_probs[i].exp();
            chunk
        })
        .collect()
}

/// Scores `hits` with `reranker` and reorders them ([`rerank`]). `vectors` are the chunks'
/// E_D rows in the same order (what the bi-encoder re-ranker reads; the generator ignores
/// them, so `None` will do for it).
pub fn rerank_chunks(
    reranker: &dyn Rerank,
    query: &str,
    query_vector: &[f32],
    hits: Vec<RetrievedChunk>,
    vectors: Option<&[&[f32]]>,
) -> Result<Vec<RetrievedChunk>, RagError> {
    if let Some(vectors) = vectors {
        if vectors.len() != hits.len() {
            return Err(RagError::InvalidRerankInput(format!(
                "{} vectors for {} chunks",
                vectors.len(),
                hits.len()
            )));
        }
    }
    let inputs: Vec<RerankInput<'_>> = hits
        .iter()
        .enumerate()
        .map(|(i, chunk)| RerankInput {
            title: chunk.title.as_deref(),
            text: &chunk.text,
            vector: vectors.map_or(&[][..], |v| v[i]),
        })
        .collect();
    let scores = reranker.scores(query, query_vector, &inputs)?;
    if scores.len() != hits.len() {
        return Err(RagError::InvalidRerankInput(format!(
            "the re-ranker returned {} scores for {} chunks",
            scores.len(),
            hits.len()
        )));
    }
    Ok(rerank(hits, &scores))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(id: &str, score: f32) -> RetrievedChunk {
        RetrievedChunk {
            rank: 0,
            doc_id: format!("doc-{id}"),
            chunk_id: id.to_string(),
            score,
            prob: 0.0,
            log_prob: 0.0,
            title: None,
            text: format!("text of {id}"),
            source: String::new(),
        }
    }

    fn ids(chunks: &[RetrievedChunk]) -> Vec<&str> {
        chunks.iter().map(|c| c.chunk_id.as_str()).collect()
    }

    fn input(vector: &[f32]) -> RerankInput<'_> {
        RerankInput {
            title: None,
            text: "unused",
            vector,
        }
    }

    #[test]
    fn rerank_reorders_renumbers_and_renormalises() {
        let hits = vec![chunk("a", 0.9), chunk("b", 0.8), chunk("c", 0.7)];
        let scores = [-12.0, -3.0, -5.5];
        let out = rerank(hits, &scores);
        assert_eq!(ids(&out), ["b", "c", "a"]);
        assert_eq!(out.iter().map(|c| c.rank).collect::<Vec<_>>(), [1, 2, 3]);
        assert_eq!(
            out.iter().map(|c| c.score).collect::<Vec<_>>(),
            [-3.0, -5.5, -12.0]
        );
        let z: f64 = scores.iter().map(|s| s.exp()).sum();
        for (c, s) in out.iter().zip([-3.0f64, -5.5, -12.0]) {
            assert!((c.prob - s.exp() / z).abs() < 1e-12, "{c:?}");
            assert!((c.log_prob - (s - z.ln())).abs() < 1e-12, "{c:?}");
        }
        assert!((out.iter().map(|c| c.prob).sum::<f64>() - 1.0).abs() < 1e-12);
        // Everything else travels with its chunk.
        assert_eq!(out[0].doc_id, "doc-b");
        assert_eq!(out[0].text, "text of b");
    }

    #[test]
    fn rerank_keeps_first_stage_order_on_ties_and_puts_nan_last() {
        let hits = vec![
            chunk("a", 0.9),
            chunk("b", 0.8),
            chunk("c", 0.7),
            chunk("d", 0.6),
        ];
        let out = rerank(hits, &[f64::NAN, -1.0, -2.0, -1.0]);
        assert_eq!(ids(&out), ["b", "d", "c", "a"]);
        assert_eq!(out[3].prob, 0.0);
        assert_eq!(out[3].score, f32::NEG_INFINITY);
        assert!((out[0].prob - out[1].prob).abs() < 1e-15);

        // Far-apart log-likelihoods (hundreds of nats) neither overflow nor give NaN, and
        // log_prob keeps what prob underflows.
        let out = rerank(vec![chunk("a", 0.0), chunk("b", 0.0)], &[-2000.0, -1000.0]);
        assert_eq!(ids(&out), ["b", "a"]);
        assert_eq!(out[0].prob, 1.0);
        assert_eq!(out[1].prob, 0.0);
        assert!((out[1].log_prob + 1000.0).abs() < 1e-9);

        // No information at all: uniform rather than NaN.
        let out = rerank(
            vec![chunk("a", 0.0), chunk("b", 0.0)],
            &[f64::NAN, f64::NAN],
        );
        assert_eq!(ids(&out), ["a", "b"]);
        assert!(out.iter().all(|c| c.prob == 0.5));

        assert!(rerank(Vec::new(), &[]).is_empty());
        assert!(rerank_order(&[]).is_empty());
    }

    #[test]
    #[should_panic(expected = "one score per retrieved chunk")]
    fn rerank_refuses_a_score_count_mismatch() {
        rerank(vec![chunk("a", 0.0)], &[1.0, 2.0]);
    }

    #[test]
    fn bi_encoder_scores_are_the_dot_products() {
        let q = [0.5f32, -1.0, 2.0];
        let rows: [&[f32]; 3] = [&[1.0, 1.0, 1.0], &[0.0, -2.0, 0.25], &[-4.0, 0.0, 0.0]];
        let inputs: Vec<RerankInput<'_>> = rows.iter().map(|r| input(r)).collect();
        let scores = BiEncoderReranker.scores("unused", &q, &inputs).unwrap();
        assert_eq!(scores, [1.5, 2.5, -2.0]);
        assert_eq!(dot_scores(&q, &rows).unwrap(), scores);
        assert!(BiEncoderReranker.scores("q", &q, &[]).unwrap().is_empty());

        // A missing (empty) or mismatched vector is an error, not a zero score.
        for bad in [&[][..], &[1.0, 2.0][..]] {
            let result = BiEncoderReranker.scores("q", &q, &[inputs[0], input(bad)]);
            assert!(
                matches!(result, Err(RagError::InvalidRerankInput(_))),
                "{bad:?}"
            );
        }
        assert!(BiEncoderReranker.scores("q", &[], &[input(&[])]).is_err());
    }

    #[test]
    fn rerank_chunks_with_the_bi_encoder_orders_by_dot_product() {
        let q = [1.0f32, 0.0];
        let hits = vec![chunk("a", 0.1), chunk("b", 0.2), chunk("c", 0.3)];
        let rows: [&[f32]; 3] = [&[0.2, 5.0], &[0.9, 0.0], &[-1.0, 1.0]];
        let out = rerank_chunks(&BiEncoderReranker, "q", &q, hits.clone(), Some(&rows)).unwrap();
        assert_eq!(ids(&out), ["b", "a", "c"]);
        assert!((out[0].score - 0.9).abs() < 1e-7);
        assert!(
            rerank_chunks(&BiEncoderReranker, "q", &q, hits.clone(), Some(&rows[..2])).is_err()
        );
        // Without vectors the bi-encoder has nothing to score.
        assert!(rerank_chunks(&BiEncoderReranker, "q", &q, hits, None).is_err());
    }
}
