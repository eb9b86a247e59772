//! The retriever: the top-k chunks of a query by dense inner product E_Q(x) · E_D(z), by BM25,
//! or by a fusion of both, optionally re-ranked, with p_η(z|x) as a softmax over the top-k.
//!
//! p_η is always a distribution over the returned chunks. Dense: softmax of the inner
//! products (Lewis et al.). Hybrid: the fusion picks the set, and p_η is still the softmax of
//! the bi-encoder's inner products over that set, so the RAG prior keeps its meaning. BM25
//! alone: softmax of the BM25 scores. Re-ranked: softmax of the re-ranker's scores (for the
//! generator re-ranker, log p(x|z), which makes p_η ∝ p(x|z), Bayes with a uniform prior).

use std::collections::HashSet;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use zrag_index::collection::{ChunkHit, Snapshot};
use zrag_index::filter::Filter;
use zrag_index::fusion;
use zrag_index::store::{ChunkKey, DenseSearch, FetchedChunk, PreparedFilter, StoreSnapshot};
use zrag_models::BertEncoder;

use crate::RagError;
/// One retrieved chunk with its retrieval score and probability.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RetrievedChunk {
    /// 1-based rank.
    pub rank: usize,
    pub doc_id: String,
    pub chunk_id: String,
    /// The score that ranked it: the inner product v_q · v_z (dense), BM25, the fused score
    /// (hybrid), or the re-ranker's score.
    pub score: f32,
    /// p_η(z|x) over the returned chunks.
    pub prob: f64,
    /// ln p_η(z|x), kept exactly (`prob` may underflow).
    #[serde(skip)]
    pub log_prob: f64,
    pub title: Option<String>,
    pub text: String,
    pub source: String,
}

/// A document-level result (chunks of one document folded into its best chunk), as
/// document-level benchmarks (BEIR qrels) need.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RetrievedDocument {
    pub doc_id: String,
    pub score: f32,
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Numerically stable softmax of `scores / temperature`, in f64.
///
/// Computed as exp(s_i/τ − logsumexp(s/τ)), so that scores far apart (or a tiny τ) neither
/// overflow nor produce NaN.
pub fn softmax(scores: &[f32], temperature: f64) -> Vec<f64> {
    if scores.is_empty() {
        return Vec::new();
    }
    let scaled: Vec<f64> = scores.iter().map(|&s| f64::from(s) / temperature).collect();
    let max = scaled.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let log_z = max + scaled.iter().map(|s| (s - max).exp()).sum::<f64>().ln();
    scaled.iter().map(|s| (s - log_z).exp()).collect()
}

/// Which scores pick the chunks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RetrievalMode {
    /// E_Q(x) · E_D(z), by HNSW when the collection has a graph, else exact.
    #[default]
    Dense,
    /// BM25 over the chunk text (tantivy).
    Bm25,
    /// Dense and BM25 candidates fused.
    Hybrid,
}

/// How hybrid search combines the two ranked lists.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FusionMethod {
    /// Reciprocal rank fusion, Σ 1/(60 + rank) (Cormack et al. 2009).
    #[default]
    Rrf,
    /// Convex combination of min-max normalised scores.
    Score,
}

/// Everything that shapes a search besides the query and k.
#[derive(Clone, Debug, PartialEq)]
pub struct RetrievalSettings {
    pub mode: RetrievalMode,
    pub fusion: FusionMethod,
    /// Candidates each side contributes to a hybrid fusion (at least k).
    pub hybrid_depth: usize,
    /// Weight of the dense list in score fusion (BM25 gets 1 − this).
    pub dense_weight: f64,
    /// Dense search scans every row even when an HNSW graph exists.
    pub exact: bool,
    /// HNSW beam width (`None`: the collection's default).
    pub ef: Option<usize>,
    /// Only chunks of documents passing this filter.
    pub filter: Option<Filter>,
}

impl Default for RetrievalSettings {
    fn default() -> Self {
        RetrievalSettings {
            mode: RetrievalMode::Dense,
            fusion: FusionMethod::Rrf,
            hybrid_depth: 100,
            dense_weight: 0.5,
            exact: false,
            ef: None,
            filter: None,
        }
    }
}

/// Re-scores a query's candidate chunks; larger is better. Implemented by the re-rankers in
/// [`crate::rerank`].
pub trait Rerank: Send + Sync {
    /// One score per candidate, in order.
    fn scores(
        &self,
        query: &str,
        query_vector: &[f32],
        candidates: &[RerankInput<'_>],
    ) -> Result<Vec<f64>, RagError>;
}

/// What a re-ranker sees of a candidate chunk.
#[derive(Clone, Copy, Debug)]
pub struct RerankInput<'a> {
    pub title: Option<&'a str>,
    pub text: &'a str,
    /// The chunk's stored E_D vector.
    pub vector: &'a [f32],
}

/// E_Q plus a committed collection snapshot, searched as `settings` say.
pub struct Retriever {
    query_encoder: Arc<BertEncoder>,
    snapshot: Arc<StoreSnapshot>,
    settings: RetrievalSettings,
    row_filter: Option<PreparedFilter>,
    reranker: Option<Box<dyn Rerank>>,
    /// How many candidates the re-ranker sees (at least k).
    rerank_depth: usize,
    /// τ in p_η ∝ exp(score / τ). 1.0 is Lewis et al.'s definition.
    pub temperature: f64,
}

/// A candidate row with the score that ranked it.
#[derive(Clone, Copy, Debug)]
struct Ranked {
    hit: ChunkHit,
    /// The score that determines p_η (see the module doc).
    prior_score: f64,
}

impl Retriever {
    /// A dense retriever with default settings.
    pub fn new(query_encoder: Arc<BertEncoder>, snapshot: Snapshot) -> Result<Self, RagError> {
        Self::shared(query_encoder, Arc::new(StoreSnapshot::Embedded(snapshot)))
    }

    /// A dense retriever over a snapshot of any store.
    pub fn over(
        query_encoder: Arc<BertEncoder>,
        snapshot: StoreSnapshot,
    ) -> Result<Self, RagError> {
        Self::shared(query_encoder, Arc::new(snapshot))
    }

    /// A dense retriever over a snapshot that other retrievers may share (a server builds one
    /// per request, each with that request's settings, over the latest commit).
    pub fn shared(
        query_encoder: Arc<BertEncoder>,
        snapshot: Arc<StoreSnapshot>,
    ) -> Result<Self, RagError> {
        let index_dim = snapshot
            .embedding()
            .map(|e| e.dim)
            .ok_or(RagError::EmptyCollection)?;
        if query_encoder.dim() != index_dim {
            return Err(RagError::DimensionMismatch {
                query_dim: query_encoder.dim(),
                index_dim,
                model: snapshot
                    .embedding()
                    .map(|e| e.describe())
                    .unwrap_or_default(),
            });
        }
        Ok(Retriever {
            query_encoder,
            snapshot,
            settings: RetrievalSettings::default(),
            row_filter: None,
            reranker: None,
            rerank_depth: 0,
            temperature: 1.0,
        })
    }

    /// Sets how searches run; a filter is resolved to rows of this snapshot once, here.
    pub fn with_settings(mut self, settings: RetrievalSettings) -> Self {
        self.row_filter = settings
            .filter
            .as_ref()
            .filter(|f| !f.is_empty())
            .map(|f| self.snapshot.prepare_filter(f));
        self.settings = settings;
        self
    }

    /// Re-ranks the top `depth` candidates of every search with `reranker`.
    pub fn with_reranker(mut self, reranker: Box<dyn Rerank>, depth: usize) -> Self {
        self.reranker = Some(reranker);
        self.rerank_depth = depth;
        self
    }

    pub fn settings(&self) -> &RetrievalSettings {
        &self.settings
    }

    pub fn snapshot(&self) -> &StoreSnapshot {
        &self.snapshot
    }

    /// The top-`k` chunks for one query.
    pub fn retrieve(&self, query: &str, k: usize) -> Result<Vec<RetrievedChunk>, RagError> {
        Ok(self
            .retrieve_batch(&[query], k)?
            .pop()
            .expect("one result per query"))
    }

    /// The top-`k` chunks for each query; the queries are encoded and searched as one batch.
    pub fn retrieve_batch(
        &self,
        queries: &[&str],
        k: usize,
    ) -> Result<Vec<Vec<RetrievedChunk>>, RagError> {
        let vectors = self.encode(queries)?;
        let dim = self.query_encoder.dim();
        let depth = if self.reranker.is_some() {
            k.max(self.rerank_depth)
        } else {
            k
        };
        let ranked = self.ranked(queries, &vectors, depth)?;
        queries
            .iter()
            .zip(vectors.chunks(dim))
            .zip(ranked)
            .map(|((query, vector), ranked)| {
                let ranked = self.rerank(query, vector, ranked)?;
                self.materialise(&ranked[..ranked.len().min(k)])
            })
            .collect()
    }

    /// The top-`n_docs` documents for each query, a document scoring as its best chunk.
    ///
    /// Fetches more chunks than documents (a document may own several of the top chunks) and
    /// widens the search until `n_docs` distinct documents are found or the collection is
    /// exhausted.
    pub fn retrieve_documents(
        &self,
        queries: &[&str],
        n_docs: usize,
    ) -> Result<Vec<Vec<RetrievedDocument>>, RagError> {
        let vectors = self.encode(queries)?;
        let dim = self.query_encoder.dim();
        let total = self.snapshot.num_live_chunks() as usize;
        let first_depth = (n_docs * 2).max(n_docs + 10).max(self.rerank_depth);
        // One batched search for all queries; only a query whose top chunks collapse into too
        // few documents is searched again, deeper, on its own.
        let first_pass = self.ranked(queries, &vectors, first_depth)?;
        let mut out = Vec::with_capacity(queries.len());
        for ((query, vector), ranked) in queries.iter().zip(vectors.chunks(dim)).zip(first_pass) {
            let mut depth = first_depth;
            let mut ranked = ranked;
            loop {
                let exhausted = ranked.len() < depth || depth >= total;
                let reranked = self.rerank(query, vector, ranked.clone())?;
                let docs = self.fold_into_documents(&reranked, n_docs)?;
                if docs.len() >= n_docs || exhausted {
                    out.push(docs);
                    break;
                }
                depth *= 4;
                ranked = self
                    .ranked(&[query], vector, depth)?
                    .pop()
                    .unwrap_or_default();
            }
        }
        Ok(out)
    }

    /// The candidates of each query, best first, by the configured mode.
    fn ranked(
        &self,
        queries: &[&str],
        vectors: &[f32],
        depth: usize,
    ) -> Result<Vec<Vec<Ranked>>, RagError> {
        let options = DenseSearch {
            exact: self.settings.exact,
            ef: self.settings.ef,
            filter: self.row_filter.as_ref(),
        };
        let dense_ranked = |hits: Vec<ChunkHit>| -> Vec<Ranked> {
            hits.into_iter()
                .map(|hit| Ranked {
                    hit,
                    prior_score: f64::from(hit.score),
                })
                .collect()
        };
        match self.settings.mode {
            RetrievalMode::Dense => Ok(self
                .snapshot
                .search(vectors, depth, options)?
                .into_iter()
                .map(dense_ranked)
                .collect()),
            RetrievalMode::Bm25 => queries
                .iter()
                .map(|q| {
                    Ok(self
                        .snapshot
                        .bm25_search(q, depth, self.row_filter.as_ref())?
                        .into_iter()
                        .map(|hit| Ranked {
                            hit,
                            prior_score: f64::from(hit.score),
                        })
                        .collect())
                })
                .collect(),
            RetrievalMode::Hybrid => {
                let side = depth.max(self.settings.hybrid_depth);
                let dense = self.snapshot.search(vectors, side, options)?;
                let dim = self.query_encoder.dim();
                queries
                    .iter()
                    .zip(dense)
                    .zip(vectors.chunks(dim))
                    .map(|((q, dense), vector)| {
                        let lexical =
                            self.snapshot
                                .bm25_search(q, side, self.row_filter.as_ref())?;
                        self.fuse(vector, &dense, &lexical, depth)
                    })
                    .collect()
            }
        }
    }

    /// Fuses a dense and a BM25 list into the top `depth`; the prior score of each fused row
    /// is its inner product with the query (read from the stored vector when BM25 found it).
    fn fuse(
        &self,
        query_vector: &[f32],
        dense: &[ChunkHit],
        lexical: &[ChunkHit],
        depth: usize,
    ) -> Result<Vec<Ranked>, RagError> {
        let key = |h: &ChunkHit| (h.segment, h.row);
        let fused: Vec<((u32, u32), f64)> = match self.settings.fusion {
            FusionMethod::Rrf => fusion::reciprocal_rank_fusion(
                &[
                    dense.iter().map(key).collect(),
                    lexical.iter().map(key).collect(),
                ],
                fusion::RRF_K,
                depth,
            ),
            FusionMethod::Score => fusion::score_fusion(
                &[
                    dense.iter().map(|h| (key(h), h.score)).collect(),
                    lexical.iter().map(|h| (key(h), h.score)).collect(),
                ],
                &[self.settings.dense_weight, 1.0 - self.settings.dense_weight],
                fusion::Normalization::MinMax,
                depth,
            ),
        };
        let keys: Vec<ChunkKey> = fused
            .iter()
            .map(|&((segment, row), _)| ChunkKey { segment, row })
            .collect();
        // Only the rows BM25 alone found need their vectors read back.
        let dense_scores: std::collections::HashMap<(u32, u32), f32> =
            dense.iter().map(|h| (key(h), h.score)).collect();
        let missing: Vec<ChunkKey> = keys
            .iter()
            .filter(|k| !dense_scores.contains_key(&(k.segment, k.row)))
            .copied()
            .collect();
        let fetched = self.snapshot.fetch(&missing)?;
        let lexical_inner: std::collections::HashMap<ChunkKey, f32> = fetched
            .iter()
            .map(|f| (f.key, dot(&f.vector, query_vector)))
            .collect();
        Ok(fused
            .into_iter()
            .map(|((segment, row), score)| {
                let inner = dense_scores
                    .get(&(segment, row))
                    .or_else(|| lexical_inner.get(&ChunkKey { segment, row }))
                    .copied()
                    .unwrap_or(f32::NEG_INFINITY);
                Ranked {
                    hit: ChunkHit {
                        segment,
                        row,
                        score: score as f32,
                    },
                    prior_score: f64::from(inner),
                }
            })
            .collect())
    }

    /// Re-orders candidates by the re-ranker's scores (which then also set p_η).
    fn rerank(
        &self,
        query: &str,
        query_vector: &[f32],
        ranked: Vec<Ranked>,
    ) -> Result<Vec<Ranked>, RagError> {
        let Some(reranker) = &self.reranker else {
            return Ok(ranked);
        };
        let take = ranked.len().min(self.rerank_depth.max(1));
        let fetched = self.fetch(&ranked[..take])?;
        let inputs: Vec<RerankInput<'_>> = fetched
            .iter()
            .map(|f| RerankInput {
                title: f.title.as_deref(),
                text: &f.chunk.text,
                vector: &f.vector,
            })
            .collect();
        let scores = reranker.scores(query, query_vector, &inputs)?;
        if scores.len() != take {
            return Err(RagError::GeneratorOutput(format!(
                "re-ranker returned {} scores for {take} candidates",
                scores.len()
            )));
        }
        let mut reranked: Vec<Ranked> = ranked[..take]
            .iter()
            .zip(scores)
            .map(|(r, score)| Ranked {
                hit: ChunkHit {
                    score: score as f32,
                    ..r.hit
                },
                prior_score: score,
            })
            .collect();
        // Stable: ties keep the first-stage order.
        reranked.sort_by(|a, b| b.prior_score.total_cmp(&a.prior_score));
        // Candidates past the re-ranking depth follow in first-stage order, each scored one
        // unit below the one before, so that scores stay sorted and on the re-ranker's scale.
        let floor = reranked.last().map_or(0.0, |r| r.prior_score);
        reranked.extend(ranked[take..].iter().enumerate().map(|(i, r)| {
            let score = floor - (i + 1) as f64;
            Ranked {
                hit: ChunkHit {
                    score: score as f32,
                    ..r.hit
                },
                prior_score: score,
            }
        }));
        Ok(reranked)
    }

    /// Reads the chunks of the final list and sets rank and p_η.
    fn materialise(&self, ranked: &[Ranked]) -> Result<Vec<RetrievedChunk>, RagError> {
        let scores: Vec<f64> = ranked.iter().map(|r| r.prior_score).collect();
        let log_probs = log_softmax(&scores, self.temperature);
        let fetched = self.fetch(ranked)?;
        Ok(ranked
            .iter()
            .zip(log_probs)
            .zip(fetched)
            .enumerate()
            .map(|(i, ((r, log_prob), f))| RetrievedChunk {
                rank: i + 1,
                score: r.hit.score,
                prob: log_prob.exp(),
                log_prob,
                title: f.title,
                source: f.source,
                doc_id: f.chunk.doc_id,
                chunk_id: f.chunk.chunk_id,
                text: f.chunk.text,
            })
            .collect())
    }

    fn fetch(&self, ranked: &[Ranked]) -> Result<Vec<FetchedChunk>, RagError> {
        let keys: Vec<ChunkKey> = ranked.iter().map(|r| ChunkKey::of(&r.hit)).collect();
        Ok(self.snapshot.fetch(&keys)?)
    }

    /// The first `n_docs` distinct documents of a ranked chunk list, each at its best score.
    fn fold_into_documents(
        &self,
        ranked: &[Ranked],
        n_docs: usize,
    ) -> Result<Vec<RetrievedDocument>, RagError> {
        let mut seen = HashSet::new();
        let mut docs = Vec::new();
        for (r, fetched) in ranked.iter().zip(self.fetch(ranked)?) {
            if docs.len() == n_docs {
                break;
            }
            if seen.insert(fetched.chunk.doc_id.clone()) {
                docs.push(RetrievedDocument {
                    doc_id: fetched.chunk.doc_id,
                    score: r.hit.score,
                });
            }
        }
        Ok(docs)
    }

    fn encode(&self, queries: &[&str]) -> Result<Vec<f32>, RagError> {
        Ok(self
            .query_encoder
            .embed(queries)?
            .into_iter()
            .flatten()
            .collect())
    }
}

/// log softmax(scores / τ) in f64.
fn log_softmax(scores: &[f64], temperature: f64) -> Vec<f64> {
    if scores.is_empty() {
        return Vec::new();
    }
    let scaled: Vec<f64> = scores.iter().map(|s| s / temperature).collect();
    let max = scaled.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let log_z = max + scaled.iter().map(|s| (s - max).exp()).sum::<f64>().ln();
    scaled.iter().map(|s| s - log_z).collect()
}

#[cfg(test)]
mod tests {
    use super::softmax;

    #[test]
    fn softmax_matches_the_definition_and_survives_extremes() {
        let p = softmax(&[1.0, 2.0, 3.0], 1.0);
        let z: f64 = [1.0f64, 2.0, 3.0].iter().map(|s| s.exp()).sum();
        for (pi, s) in p.iter().zip([1.0f64, 2.0, 3.0]) {
            assert!((pi - s.exp() / z).abs() < 1e-12);
        }
        // τ = 0.001 on scores 1 apart: exp(1000) overflows naively.
        let p = softmax(&[0.5, 1.5], 0.001);
        assert!(p.iter().all(|x| x.is_finite()));
        assert!((p[1] - 1.0).abs() < 1e-12 && p[0] < 1e-300);
        assert!((softmax(&[-3e4, -3e4], 1.0)[0] - 0.5).abs() < 1e-12);
        assert!(softmax(&[], 1.0).is_empty());
    }
}
