//! Buffering changes and committing them atomically.

use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions, TryLockError};
use std::path::{Path, PathBuf};

use super::ann::{self, ANN_DIR};
use super::fsutil::{self, FileCheck};
use super::lexical;
use super::manifest::VectorPrecision;
use super::manifest::{AnnState, EmbeddingInfo, Manifest, NamedFile};
use super::segment::{quantized_file, write_quantized, write_segment, SegmentReader, StoredChunk};
use super::snapshot::{read_document_table, read_tombstones};
use super::{DocEntry, DOCS_DIR, LOCK_FILE, MANIFEST_FILE, SEGMENTS_DIR, TOMBSTONES_DIR};
use crate::error::{IndexError, Result};

/// A chunk to store, with its position in the document.
#[derive(Clone, Debug, PartialEq)]
pub struct NewChunk {
    pub chunk_id: String,
    pub ordinal: u32,
    pub text: String,
    pub start_byte: usize,
    pub end_byte: usize,
}

/// A document to insert or replace, with one vector per chunk (row-major, `dim` each).
#[derive(Clone, Debug, PartialEq)]
pub struct NewDocument {
    pub id: String,
    pub source: String,
    pub title: Option<String>,
    pub content_hash: String,
    pub metadata: serde_json::Map<String, serde_json::Value>,
    pub chunks: Vec<NewChunk>,
    pub vectors: Vec<f32>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct CommitStats {
    pub generation: u64,
    pub documents_written: usize,
    pub documents_deleted: usize,
    pub chunks_written: usize,
}

/// The single writer of a collection. Changes are invisible until [`Writer::commit`].
pub struct Writer {
    dir: PathBuf,
    _lock: File,
    manifest: Manifest,
    /// The document table as it will be after the next commit.
    documents: HashMap<String, DocEntry>,
    pending: Vec<NewDocument>,
    /// Index into `pending` by document id, so a re-upsert within a batch replaces.
    pending_index: HashMap<String, usize>,
    /// Newly deleted rows per segment id, not yet committed.
    deleted_rows: HashMap<String, Vec<u32>>,
    deleted_docs: usize,
    /// The embedding model was recorded but not committed yet.
    embedding_recorded: bool,
    /// The HNSW settings changed and are not committed yet.
    ann_changed: bool,
    /// Told (nodes inserted, nodes to insert) while a commit builds the HNSW graph.
    graph_progress: Option<GraphProgress>,
    /// The BM25 index, brought up to date on open and after every commit.
    bm25: crate::bm25::Bm25Index,
}

/// A callback for the graph-building part of a commit: (nodes done, nodes to insert).
pub type GraphProgress = Box<dyn Fn(usize, usize) + Send + Sync>;

impl Writer {
    pub(crate) fn open(dir: &Path) -> Result<Self> {
        let lock_path = dir.join(LOCK_FILE);
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| IndexError::io(&lock_path, e))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => return Err(IndexError::Locked { path: lock_path }),
            Err(TryLockError::Error(e)) => return Err(IndexError::io(&lock_path, e)),
        }
        let manifest = Manifest::read(dir)?;
        let documents = read_document_table(dir, &manifest)?;
        let bm25 = lexical::open_for_writer(dir, &manifest)?;
        let writer = Writer {
            dir: dir.to_path_buf(),
            _lock: lock,
            manifest,
            documents,
            pending: Vec::new(),
            pending_index: HashMap::new(),
            deleted_rows: HashMap::new(),
            deleted_docs: 0,
            embedding_recorded: false,
            ann_changed: false,
            graph_progress: None,
            bm25,
        };
        // Leftovers of a commit that crashed before its manifest landed.
        writer.collect_garbage()?;
        Ok(writer)
    }

    pub fn embedding(&self) -> Option<&EmbeddingInfo> {
        self.manifest.embedding.as_ref()
    }

    /// Records the embedding model of a new collection, or checks it against the stored one.
    pub fn ensure_embedding(&mut self, info: &EmbeddingInfo) -> Result<()> {
        match &self.manifest.embedding {
            None => {
                self.manifest.embedding = Some(info.clone());
                self.embedding_recorded = true;
                Ok(())
            }
            Some(stored) if stored == info => Ok(()),
            Some(stored) => Err(IndexError::ModelMismatch {
                path: self.dir.clone(),
                stored: stored.describe(),
                requested: info.describe(),
            }),
        }
    }

    /// The HNSW settings (as they will be after the next commit).
    pub fn ann_settings(&self) -> &AnnState {
        &self.manifest.ann
    }

    /// Changes the HNSW settings; the next commit builds, rebuilds or drops the graph to
    /// match. The current graph (if any) is kept in `state.graph`'s place.
    pub fn set_ann_settings(
        &mut self,
        enabled: bool,
        m: usize,
        ef_construction: usize,
        min_rows: u64,
    ) {
        let ann = &mut self.manifest.ann;
        if (ann.enabled, ann.m, ann.ef_construction, ann.min_rows)
            != (enabled, m, ef_construction, min_rows)
        {
            (ann.enabled, ann.m, ann.ef_construction, ann.min_rows) =
                (enabled, m, ef_construction, min_rows);
            self.ann_changed = true;
        }
    }

    /// The precision exact search scans at (as it will be after the next commit).
    pub fn precision(&self) -> VectorPrecision {
        self.manifest.precision
    }

    /// Sets the precision exact search scans at; the next commit writes the compact copy of
    /// every segment that lacks it.
    pub fn set_precision(&mut self, precision: VectorPrecision) {
        self.manifest.precision = precision;
    }

    /// Some segment lacks the compact copy that the precision setting asks for.
    fn precision_stale(&self) -> bool {
        quantized_file(self.manifest.precision).is_some_and(|name| {
            self.manifest
                .segments
                .iter()
                .any(|s| !s.files.contains_key(name))
        })
    }

    /// Reports progress of the graph build during [`Writer::commit`].
    pub fn set_graph_progress(&mut self, progress: Option<GraphProgress>) {
        self.graph_progress = progress;
    }

    /// The document as it will be after the next commit (`None` if absent or deleted).
    pub fn document(&self, id: &str) -> Option<&DocEntry> {
        self.documents.get(id)
    }

    pub fn documents(&self) -> impl Iterator<Item = &DocEntry> {
        self.documents.values()
    }

    /// Rows buffered for the next commit.
    pub fn pending_chunks(&self) -> usize {
        self.pending.iter().map(|d| d.chunks.len()).sum()
    }

    /// The generation of the last commit.
    pub fn generation(&self) -> u64 {
        self.manifest.generation
    }

    pub fn has_changes(&self) -> bool {
        !self.pending.is_empty()
            || !self.deleted_rows.is_empty()
            || self.deleted_docs > 0
            || self.embedding_recorded
            || self.ann_changed
            || self.graph_stale()
            || self.precision_stale()
    }

    /// The settings call for a graph over every segment but the committed graph (if any)
    /// does not cover them all: e.g. after commits that deferred the graph, or a collection
    /// written before graphs existed.
    pub fn graph_stale(&self) -> bool {
        let ann = &self.manifest.ann;
        let wanted = ann.enabled
            && self.manifest.live_chunks >= ann.min_rows
            && !self.manifest.segments.is_empty();
        let covered = ann.graph.as_ref().map_or(0, |g| g.segments.len());
        if wanted {
            covered < self.manifest.segments.len()
        } else {
            ann.graph.is_some()
        }
    }

    /// Inserts or replaces a document (visible after commit).
    pub fn upsert(&mut self, doc: NewDocument) -> Result<()> {
        let dim = self
            .manifest
            .embedding
            .as_ref()
            .map(|e| e.dim)
            .ok_or_else(|| IndexError::DimensionMismatch {
                doc_id: doc.id.clone(),
                expected: 0,
                found: doc.vectors.len() / doc.chunks.len().max(1),
            })?;
        if doc.vectors.len() != doc.chunks.len() * dim {
            return Err(
                if doc.chunks.is_empty() || !doc.vectors.len().is_multiple_of(dim) {
                    IndexError::DimensionMismatch {
                        doc_id: doc.id.clone(),
                        expected: dim,
                        found: doc.vectors.len() / doc.chunks.len().max(1),
                    }
                } else {
                    IndexError::ChunkVectorMismatch {
                        doc_id: doc.id.clone(),
                        n_chunks: doc.chunks.len(),
                        n_vectors: doc.vectors.len() / dim,
                    }
                },
            );
        }
        self.remove_committed_rows(&doc.id);
        let entry = DocEntry {
            id: doc.id.clone(),
            source: doc.source.clone(),
            title: doc.title.clone(),
            content_hash: doc.content_hash.clone(),
            metadata: doc.metadata.clone(),
            segment: None,
            first_row: 0,
            rows: doc.chunks.len() as u32,
        };
        self.documents.insert(doc.id.clone(), entry);
        match self.pending_index.get(&doc.id) {
            Some(&i) => self.pending[i] = doc,
            None => {
                self.pending_index
                    .insert(doc.id.clone(), self.pending.len());
                self.pending.push(doc);
            }
        }
        Ok(())
    }

    /// Deletes a document; returns whether it existed.
    pub fn delete(&mut self, id: &str) -> bool {
        self.remove_committed_rows(id);
        let existed = self.documents.remove(id).is_some();
        if let Some(i) = self.pending_index.remove(id) {
            // Keep indices stable: blank the slot, skipped at commit.
            self.pending[i].chunks.clear();
            self.pending[i].vectors.clear();
            self.pending[i].id.clear();
        }
        if existed {
            self.deleted_docs += 1;
        }
        existed
    }

    /// Tombstones the committed rows of `id` (if it has any in a segment).
    fn remove_committed_rows(&mut self, id: &str) {
        let Some(old) = self.documents.get(id) else {
            return;
        };
        if let Some(segment) = &old.segment {
            self.deleted_rows
                .entry(segment.clone())
                .or_default()
                .extend(old.first_row..old.first_row + old.rows);
        }
    }

    /// Makes every buffered change durable and visible, atomically.
    pub fn commit(&mut self) -> Result<CommitStats> {
        self.commit_with(true)
    }

    /// [`Writer::commit`], optionally leaving the HNSW graph as it is (`update_graph`
    /// false): the new rows are then searched exactly until a later commit extends the graph.
    /// Bulk ingestion commits often for durability and updates the graph once at the end,
    /// instead of rewriting the graph file at every commit.
    pub fn commit_with(&mut self, update_graph: bool) -> Result<CommitStats> {
        if !self.has_changes() && self.manifest.generation > 0 {
            return Ok(CommitStats {
                generation: self.manifest.generation,
                ..CommitStats::default()
            });
        }
        let mut next = self.manifest.clone();
        next.generation += 1;
        let generation = next.generation;
        let dim = next.embedding.as_ref().map_or(0, |e| e.dim);
        let segments_dir = self.dir.join(SEGMENTS_DIR);

        // 1. New segment with the pending documents' chunks.
        let pending: Vec<NewDocument> = std::mem::take(&mut self.pending)
            .into_iter()
            .filter(|d| !d.id.is_empty())
            .collect();
        self.pending_index.clear();
        let chunks_written: usize = pending.iter().map(|d| d.chunks.len()).sum();
        if chunks_written > 0 {
            let segment_id = format!("seg-{:08}", next.next_segment);
            next.next_segment += 1;
            let mut chunks = Vec::with_capacity(chunks_written);
            let mut vectors = Vec::with_capacity(chunks_written * dim);
            for doc in &pending {
                let entry = self
                    .documents
                    .get_mut(&doc.id)
                    .expect("pending documents are in the table");
                entry.first_row = chunks.len() as u32;
                entry.segment = (!doc.chunks.is_empty()).then(|| segment_id.clone());
                for chunk in &doc.chunks {
                    chunks.push(StoredChunk {
                        chunk_id: chunk.chunk_id.clone(),
                        doc_id: doc.id.clone(),
                        ordinal: chunk.ordinal,
                        text: chunk.text.clone(),
                        start_byte: chunk.start_byte,
                        end_byte: chunk.end_byte,
                    });
                }
                vectors.extend_from_slice(&doc.vectors);
            }
            let entry = write_segment(
                &segments_dir,
                &segment_id,
                dim,
                &chunks,
                &vectors,
                next.precision,
            )?;
            next.segments.push(entry);
        }
        // Segments written at another precision get their compact copy now.
        for entry in &mut next.segments {
            if quantized_file(next.precision).is_some_and(|name| !entry.files.contains_key(name)) {
                let reader =
                    SegmentReader::open(&segments_dir, entry, dim, &[], VectorPrecision::F32)?;
                let vectors = reader.vectors().to_vec();
                drop(reader);
                write_quantized(&segments_dir, entry, next.precision, dim, &vectors)?;
            }
        }

        // 2. Tombstones: the union of the old and new deleted rows, in a new file.
        let deleted_rows = std::mem::take(&mut self.deleted_rows);
        let tomb_dir = self.dir.join(TOMBSTONES_DIR);
        let mut fully_deleted = HashSet::new();
        for segment in &mut next.segments {
            let Some(new_rows) = deleted_rows.get(&segment.id) else {
                continue;
            };
            let mut rows: Vec<u32> = match &segment.tombstones {
                Some(file) => read_tombstones(&self.dir, file)?,
                None => Vec::new(),
            };
            rows.extend(new_rows);
            rows.sort_unstable();
            rows.dedup();
            if rows.len() as u32 >= segment.rows {
                fully_deleted.insert(segment.id.clone());
                continue;
            }
            let name = format!("{}-g{generation}.del", segment.id);
            let bytes: Vec<u8> = rows.iter().flat_map(|r| r.to_le_bytes()).collect();
            let check = fsutil::write_new_file(&tomb_dir.join(&name), &bytes)?;
            segment.tombstones = Some(NamedFile { name, check });
        }
        next.segments.retain(|s| !fully_deleted.contains(&s.id));
        fsutil::sync_dir(&tomb_dir)?;

        // 3. The document table, sorted for determinism.
        let mut ids: Vec<&String> = self.documents.keys().collect();
        ids.sort();
        let mut table = Vec::new();
        for id in ids {
            serde_json::to_writer(&mut table, &self.documents[id]).expect("doc entry serialises");
            table.push(b'\n');
        }
        let docs_dir = self.dir.join(DOCS_DIR);
        let name = format!("docs-g{generation}.jsonl");
        let check: FileCheck = fsutil::write_new_file(&docs_dir.join(&name), &table)?;
        fsutil::sync_dir(&docs_dir)?;
        next.documents = Some(NamedFile { name, check });
        next.live_documents = self.documents.len() as u64;
        next.live_chunks = self.documents.values().map(|d| u64::from(d.rows)).sum();

        // 4. The HNSW graph of the new state, extended or rebuilt (or, when deferred, kept
        // while it still covers a prefix of the segments).
        let previous_graph = next.ann.graph.take();
        next.ann.graph = if update_graph {
            ann::update_graph(
                &self.dir,
                &next,
                previous_graph.as_ref(),
                self.graph_progress
                    .as_deref()
                    .map(|p| p as &(dyn Fn(usize, usize) + Sync)),
            )?
        } else {
            previous_graph.filter(|g| ann::covers_prefix(g, &next))
        };

        // 5. The commit point.
        next.write(&self.dir)?;
        let previous = std::mem::replace(&mut self.manifest, next);
        self.embedding_recorded = false;
        self.ann_changed = false;
        let stats = CommitStats {
            generation,
            documents_written: pending.len(),
            documents_deleted: std::mem::take(&mut self.deleted_docs),
            chunks_written,
        };
        // 6. BM25 follows. If this fails the commit stands, and the next writer to open the
        // collection rebuilds BM25 from the segments (its generation will not match).
        lexical::apply_commit(
            &mut self.bm25,
            &self.dir,
            &previous,
            &self.manifest,
            &deleted_rows,
        )?;
        // 7. Files no manifest names any more. Failing here loses nothing committed.
        let _ = self.collect_garbage();
        Ok(stats)
    }

    /// Removes files and directories that the current manifest does not name.
    fn collect_garbage(&self) -> Result<()> {
        let keep_segments: HashSet<&str> = self
            .manifest
            .segments
            .iter()
            .map(|s| s.id.as_str())
            .collect();
        let keep_tombstones: HashSet<&str> = self
            .manifest
            .segments
            .iter()
            .filter_map(|s| s.tombstones.as_ref().map(|t| t.name.as_str()))
            .collect();
        let keep_docs: HashSet<&str> = self
            .manifest
            .documents
            .iter()
            .map(|d| d.name.as_str())
            .collect();
        let keep_graph: HashSet<&str> = self
            .manifest
            .ann
            .graph
            .iter()
            .map(|g| g.file.name.as_str())
            .collect();
        let sweep = |sub: &str, keep: &HashSet<&str>| -> Result<()> {
            let dir = self.dir.join(sub);
            let entries = match std::fs::read_dir(&dir) {
                Ok(entries) => entries,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    std::fs::create_dir_all(&dir).map_err(|e| IndexError::io(&dir, e))?;
                    return Ok(());
                }
                Err(e) => return Err(IndexError::io(&dir, e)),
            };
            for entry in entries {
                let entry = entry.map_err(|e| IndexError::io(&dir, e))?;
                let name = entry.file_name();
                if keep.contains(name.to_string_lossy().as_ref()) {
                    continue;
                }
                let path = entry.path();
                let removed = if path.is_dir() {
                    std::fs::remove_dir_all(&path)
                } else {
                    std::fs::remove_file(&path)
                };
                removed.map_err(|e| IndexError::io(&path, e))?;
            }
            Ok(())
        };
        sweep(SEGMENTS_DIR, &keep_segments)?;
        sweep(TOMBSTONES_DIR, &keep_tombstones)?;
        sweep(DOCS_DIR, &keep_docs)?;
        sweep(ANN_DIR, &keep_graph)?;
        let _ = std::fs::remove_file(self.dir.join(MANIFEST_FILE).with_extension("tmp"));
        Ok(())
    }
}

/// Counts of what a writer would keep; used by tests to check garbage collection.
#[cfg(test)]
pub(crate) fn files_under(dir: &Path) -> std::collections::BTreeMap<String, u64> {
    let mut out = std::collections::BTreeMap::new();
    for sub in [SEGMENTS_DIR, TOMBSTONES_DIR, DOCS_DIR, ANN_DIR] {
        let mut stack = vec![dir.join(sub)];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
                let p = e.path();
                if p.is_dir() {
                    stack.push(p);
                } else {
                    let rel = p.strip_prefix(dir).unwrap().to_string_lossy().into_owned();
                    out.insert(rel, e.metadata().map(|m| m.len()).unwrap_or(0));
                }
            }
        }
    }
    out
}
