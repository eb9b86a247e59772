//! The dense retriever: p_η(z|x) = softmax over the top-k of E_Q(x) · E_D(z).

use std::collections::HashSet;
use std::sync::Arc;

use serde::Serialize;
use zrag_index::collection::Snapshot;
use zrag_models::BertEncoder;

use crate::RagError;

/// One retrieved chunk with its retrieval score and probability.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RetrievedChunk {
    /// 1-based rank.
    pub rank: usize,
    pub doc_id: String,
    pub chunk_id: String,
    /// Inner product v_q · v_z.
    pub score: f32,
    /// p_η(z|x) over the returned chunks.
    pub prob: f64,
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

/// E_Q plus a committed collection snapshot.
pub struct DenseRetriever {
    query_encoder: Arc<BertEncoder>,
    snapshot: Snapshot,
    /// τ in p_η ∝ exp(score / τ). 1.0 is Lewis et al.'s definition.
    pub temperature: f64,
}

impl DenseRetriever {
    pub fn new(query_encoder: Arc<BertEncoder>, snapshot: Snapshot) -> Result<Self, RagError> {
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
        Ok(DenseRetriever {
            query_encoder,
            snapshot,
            temperature: 1.0,
        })
    }

    pub fn snapshot(&self) -> &Snapshot {
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
        let hits = self.snapshot.search(&vectors, k)?;
        hits.into_iter()
            .map(|hits| {
                let scores: Vec<f32> = hits.iter().map(|h| h.score).collect();
                let probs = softmax(&scores, self.temperature);
                hits.iter()
                    .zip(probs)
                    .enumerate()
                    .map(|(i, (hit, prob))| {
                        let chunk = self.snapshot.chunk(hit.segment, hit.row)?;
                        let doc = self.snapshot.document(&chunk.doc_id);
                        Ok(RetrievedChunk {
                            rank: i + 1,
                            score: hit.score,
                            prob,
                            title: doc.and_then(|d| d.title.clone()),
                            source: doc.map(|d| d.source.clone()).unwrap_or_default(),
                            doc_id: chunk.doc_id,
                            chunk_id: chunk.chunk_id,
                            text: chunk.text,
                        })
                    })
                    .collect()
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
        let first_depth = (n_docs * 2).max(n_docs + 10);
        // One batched search for all queries; only a query whose top chunks collapse into too
        // few documents is searched again, deeper, on its own.
        let first_pass = self.snapshot.search(&vectors, first_depth)?;
        let mut out = Vec::with_capacity(queries.len());
        for (query, hits) in vectors.chunks(dim).zip(first_pass) {
            let mut depth = first_depth;
            let mut hits = hits;
            loop {
                let exhausted = hits.len() < depth || depth >= total;
                let docs = self.fold_into_documents(&hits, n_docs)?;
                if docs.len() >= n_docs || exhausted {
                    out.push(docs);
                    break;
                }
                depth *= 4;
                hits = self
                    .snapshot
                    .search(query, depth)?
                    .pop()
                    .unwrap_or_default();
            }
        }
        Ok(out)
    }

    /// The first `n_docs` distinct documents of a ranked chunk list, each at its best score.
    fn fold_into_documents(
        &self,
        hits: &[zrag_index::collection::ChunkHit],
        n_docs: usize,
    ) -> Result<Vec<RetrievedDocument>, RagError> {
        let mut seen = HashSet::new();
        let mut docs = Vec::new();
        for hit in hits {
            if docs.len() == n_docs {
                break;
            }
            let chunk = self.snapshot.chunk(hit.segment, hit.row)?;
            if seen.insert(chunk.doc_id.clone()) {
                docs.push(RetrievedDocument {
                    doc_id: chunk.doc_id,
                    score: hit.score,
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
