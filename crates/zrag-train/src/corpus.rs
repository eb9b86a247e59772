//! The training corpus: every live chunk of a collection snapshot as a *slot* (0..n), with
//! its document, and the index the trainer retrieves from, either the collection itself
//! (E_D frozen: its stored vectors stay valid) or the latest re-indexed generation (E_D
//! training).

use std::collections::HashMap;
use std::sync::Arc;

use zrag_index::collection::{SearchOptions, Snapshot};
use zrag_rag::ingest::embedding_input;

use crate::error::Result;
use crate::generations::Generation;

pub struct TrainingCorpus {
    pub snapshot: Snapshot,
    /// `(segment, row)` of each slot.
    rows: Vec<(u32, u32)>,
    slot_of_row: HashMap<(u32, u32), usize>,
    /// Index into `doc_ids` of each slot.
    doc_of_slot: Vec<u32>,
    doc_ids: Vec<String>,
    doc_titles: Vec<Option<String>>,
    slots_of_doc: HashMap<String, Vec<usize>>,
}

/// A search hit in slot terms.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SlotHit {
    pub slot: usize,
    pub score: f32,
}

impl TrainingCorpus {
    pub fn new(snapshot: Snapshot) -> Self {
        let mut rows = Vec::new();
        let mut doc_of_slot = Vec::new();
        let mut doc_ids = Vec::new();
        let mut doc_titles = Vec::new();
        let mut slots_of_doc = HashMap::new();
        let mut documents: Vec<_> = snapshot.documents().collect();
        documents.sort_by(|a, b| a.id.cmp(&b.id));
        for doc in documents {
            let doc_rows = snapshot.document_rows(&doc.id);
            if doc_rows.is_empty() {
                continue;
            }
            let doc_index = doc_ids.len() as u32;
            let slots: Vec<usize> = (rows.len()..rows.len() + doc_rows.len()).collect();
            rows.extend(doc_rows);
            doc_of_slot.extend(std::iter::repeat_n(doc_index, slots.len()));
            slots_of_doc.insert(doc.id.clone(), slots);
            doc_ids.push(doc.id.clone());
            doc_titles.push(doc.title.clone());
        }
        let slot_of_row = rows.iter().enumerate().map(|(s, &r)| (r, s)).collect();
        TrainingCorpus {
            snapshot,
            rows,
            slot_of_row,
            doc_of_slot,
            doc_ids,
            doc_titles,
            slots_of_doc,
        }
    }

    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    pub fn dim(&self) -> usize {
        self.snapshot.embedding().map_or(0, |e| e.dim)
    }

    pub fn doc_id(&self, slot: usize) -> &str {
        &self.doc_ids[self.doc_of_slot[slot] as usize]
    }

    pub fn title(&self, slot: usize) -> Option<&str> {
        self.doc_titles[self.doc_of_slot[slot] as usize].as_deref()
    }

    pub fn slots_of(&self, doc_id: &str) -> &[usize] {
        self.slots_of_doc.get(doc_id).map_or(&[], Vec::as_slice)
    }

    /// The stored chunk text and id of a slot.
    pub fn chunk(&self, slot: usize) -> Result<(String, String)> {
        let (segment, row) = self.rows[slot];
        let chunk = self.snapshot.chunk(segment, row)?;
        Ok((chunk.chunk_id, chunk.text))
    }

    /// What E_D reads for a slot, exactly as `zrag index` embedded it.
    pub fn embedding_text(&self, slot: usize) -> Result<String> {
        let (_, text) = self.chunk(slot)?;
        Ok(embedding_input(self.title(slot), &text))
    }

    /// The vectors the collection stores, in slot order: generation 0 of a re-indexing run.
    pub fn stored_vectors(&self) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.len() * self.dim());
        for &(segment, row) in &self.rows {
            out.extend_from_slice(self.snapshot.vector(segment, row).unwrap_or(&[]));
        }
        out
    }

    /// BM25 top-`k` of a query, as slots.
    pub fn bm25(&self, query: &str, k: usize) -> Result<Vec<SlotHit>> {
        Ok(self
            .snapshot
            .bm25_search(query, k, None)?
            .into_iter()
            .filter_map(|hit| {
                self.slot_of_row
                    .get(&(hit.segment, hit.row))
                    .map(|&slot| SlotHit {
                        slot,
                        score: hit.score,
                    })
            })
            .collect())
    }
}

/// Where dense retrieval during training looks.
pub enum IndexView<'a> {
    /// The collection's stored E_D vectors (HNSW or exact, as `zrag search` would).
    Collection(&'a TrainingCorpus),
    /// A re-indexed generation (exact search).
    Generation(&'a TrainingCorpus, Arc<Generation>),
}

impl IndexView<'_> {
    /// The generation number (0 = the collection's own vectors).
    pub fn generation(&self) -> u64 {
        match self {
            IndexView::Collection(_) => 0,
            IndexView::Generation(_, g) => g.number,
        }
    }

    /// Top-`k` slots of each query (row-major `m × dim`).
    pub fn search(&self, queries: &[f32], k: usize) -> Result<Vec<Vec<SlotHit>>> {
        match self {
            IndexView::Collection(corpus) => Ok(corpus
                .snapshot
                .search_with(queries, k, SearchOptions::default())?
                .into_iter()
                .map(|hits| {
                    hits.into_iter()
                        .filter_map(|hit| {
                            corpus
                                .slot_of_row
                                .get(&(hit.segment, hit.row))
                                .map(|&slot| SlotHit {
                                    slot,
                                    score: hit.score,
                                })
                        })
                        .collect()
                })
                .collect()),
            IndexView::Generation(_, generation) => Ok(generation
                .search(queries, k)
                .into_iter()
                .map(|hits| {
                    hits.into_iter()
                        .map(|hit| SlotHit {
                            slot: hit.row as usize,
                            score: hit.score,
                        })
                        .collect()
                })
                .collect()),
        }
    }

    /// The index's vector of a slot.
    pub fn vector(&self, slot: usize) -> &[f32] {
        match self {
            IndexView::Collection(corpus) => {
                let (segment, row) = corpus.rows[slot];
                corpus.snapshot.vector(segment, row).unwrap_or(&[])
            }
            IndexView::Generation(_, generation) => generation.vector(slot),
        }
    }
}
