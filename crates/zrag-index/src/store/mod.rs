//! Where a collection lives: the embedded on-disk [`Collection`] or a PostgreSQL database with
//! pgvector ([`postgres`]). Everything above this crate (ingest, the retriever, the server, the
//! CLI) talks to a [`Store`], its [`StoreSnapshot`]s (one consistent committed state) and its
//! [`StoreWriter`] (buffered upserts and deletes, committed atomically).
//!
//! The set of stores is closed, so the three types are enums that dispatch by `match`; the
//! behaviour both must share (same top-k for exact search, filters, incremental upserts,
//! deletes) is pinned by one test suite run against both (`tests/store_suite.rs`).
//!
//! A hit is a [`ChunkHit`] in both stores. For the embedded store `(segment, row)` is a row of
//! a segment of the snapshot; for PostgreSQL it is the chunk's 64-bit key split in two halves
//! (`segment` = high 32 bits, `row` = low 32 bits), see [`ChunkKey`].

pub mod postgres;

use std::collections::HashMap;
use std::path::PathBuf;

use crate::collection::{
    ChunkHit, Collection, CommitStats, DocEntry, EmbeddingInfo, GraphProgress, NewChunk,
    NewDocument, RowFilter, SearchOptions, Snapshot, StoredChunk, VectorPrecision, Writer,
};
use crate::error::{IndexError, Result};
use crate::filter::Filter;

pub use postgres::{PgOptions, PgSnapshot, PgStore, PgWriter};

/// A chunk's identity inside one store, as carried by a [`ChunkHit`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkKey {
    pub segment: u32,
    pub row: u32,
}

impl ChunkKey {
    pub fn of(hit: &ChunkHit) -> Self {
        ChunkKey {
            segment: hit.segment,
            row: hit.row,
        }
    }

    /// The PostgreSQL chunk id this key stands for.
    pub fn to_u64(self) -> u64 {
        (u64::from(self.segment) << 32) | u64::from(self.row)
    }

    pub fn from_u64(id: u64) -> Self {
        ChunkKey {
            segment: (id >> 32) as u32,
            row: id as u32,
        }
    }
}

/// A hit read back: the chunk, its document's title and source, and its stored E_D vector.
#[derive(Clone, Debug, PartialEq)]
pub struct FetchedChunk {
    pub key: ChunkKey,
    pub chunk: StoredChunk,
    pub title: Option<String>,
    pub source: String,
    pub vector: Vec<f32>,
}

/// Where a collection lives, as the user wrote it (`--store`, `ZRAG_STORE`, or the older
/// `--collection DIR`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreLocation {
    /// A collection directory.
    Embedded(PathBuf),
    /// `postgres://` or `postgresql://` URL; `?schema=NAME` picks the PostgreSQL schema that
    /// holds the collection's tables (default `zrag`), so one database can hold several.
    Postgres(String),
}

impl StoreLocation {
    pub fn parse(spec: &str) -> StoreLocation {
        if spec.starts_with("postgres://") || spec.starts_with("postgresql://") {
            StoreLocation::Postgres(spec.to_string())
        } else {
            StoreLocation::Embedded(PathBuf::from(spec))
        }
    }

    /// For messages: the directory, or the URL without its password.
    pub fn describe(&self) -> String {
        match self {
            StoreLocation::Embedded(dir) => dir.display().to_string(),
            StoreLocation::Postgres(url) => postgres::redact(url),
        }
    }
}

/// A collection in one of the stores.
pub enum Store {
    Embedded(Collection),
    Postgres(PgStore),
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Store({})", self.describe())
    }
}

impl Store {
    /// Opens an existing collection; a PostgreSQL store is connected and its schema checked
    /// (and migrated if this zrag knows a newer version).
    pub fn open(location: &StoreLocation, options: &PgOptions) -> Result<Store> {
        match location {
            StoreLocation::Embedded(dir) => Ok(Store::Embedded(Collection::open(dir)?)),
            StoreLocation::Postgres(url) => Ok(Store::Postgres(PgStore::connect(url, options)?)),
        }
    }

    /// Opens the collection, creating an empty one (directory, or schema and tables) if there
    /// is none.
    pub fn open_or_create(location: &StoreLocation, options: &PgOptions) -> Result<Store> {
        match location {
            StoreLocation::Embedded(dir) => Ok(Store::Embedded(Collection::open_or_create(dir)?)),
            StoreLocation::Postgres(url) => Ok(Store::Postgres(PgStore::connect(url, options)?)),
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Store::Embedded(c) => c.dir().display().to_string(),
            Store::Postgres(p) => p.describe().to_string(),
        }
    }

    /// The latest committed generation (cheap: a manifest read or one query).
    pub fn generation(&self) -> Result<u64> {
        match self {
            Store::Embedded(c) => Ok(c.manifest()?.generation),
            Store::Postgres(p) => p.generation(),
        }
    }

    /// The committed state as of now, unaffected by later commits.
    pub fn snapshot(&self) -> Result<StoreSnapshot> {
        match self {
            Store::Embedded(c) => Ok(StoreSnapshot::Embedded(c.snapshot()?)),
            Store::Postgres(p) => Ok(StoreSnapshot::Postgres(p.snapshot()?)),
        }
    }

    /// A writer. The embedded store allows one at a time (an OS lock); PostgreSQL allows
    /// several (commits are serialised by the database).
    pub fn writer(&self) -> Result<StoreWriter> {
        match self {
            Store::Embedded(c) => Ok(StoreWriter::Embedded(c.writer()?)),
            Store::Postgres(p) => Ok(StoreWriter::Postgres(p.writer()?)),
        }
    }

    pub fn as_embedded(&self) -> Option<&Collection> {
        match self {
            Store::Embedded(c) => Some(c),
            Store::Postgres(_) => None,
        }
    }
}

/// A filter resolved against one snapshot (rows of its segments, or SQL conditions).
#[derive(Clone, Debug)]
pub enum PreparedFilter {
    Embedded(RowFilter),
    Postgres(Filter),
}

/// How a dense search runs.
#[derive(Clone, Copy, Debug, Default)]
pub struct DenseSearch<'a> {
    /// Scan every row even where an approximate index exists.
    pub exact: bool,
    /// HNSW beam width (`None`: the store's default).
    pub ef: Option<usize>,
    pub filter: Option<&'a PreparedFilter>,
}

/// One committed state of a collection.
// Few and long-lived (one per request at most): the size difference costs nothing.
#[allow(clippy::large_enum_variant)]
pub enum StoreSnapshot {
    Embedded(Snapshot),
    Postgres(PgSnapshot),
}

impl std::fmt::Debug for StoreSnapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "StoreSnapshot({}, generation {})",
            self.describe(),
            self.generation()
        )
    }
}

impl StoreSnapshot {
    pub fn describe(&self) -> String {
        match self {
            StoreSnapshot::Embedded(s) => s.dir().display().to_string(),
            StoreSnapshot::Postgres(s) => s.describe().to_string(),
        }
    }

    pub fn generation(&self) -> u64 {
        match self {
            StoreSnapshot::Embedded(s) => s.generation(),
            StoreSnapshot::Postgres(s) => s.generation(),
        }
    }

    pub fn embedding(&self) -> Option<&EmbeddingInfo> {
        match self {
            StoreSnapshot::Embedded(s) => s.embedding(),
            StoreSnapshot::Postgres(s) => s.embedding(),
        }
    }

    pub fn num_documents(&self) -> u64 {
        match self {
            StoreSnapshot::Embedded(s) => s.num_documents() as u64,
            StoreSnapshot::Postgres(s) => s.num_documents(),
        }
    }

    pub fn num_live_chunks(&self) -> u64 {
        match self {
            StoreSnapshot::Embedded(s) => s.num_live_chunks(),
            StoreSnapshot::Postgres(s) => s.num_live_chunks(),
        }
    }

    pub fn document(&self, id: &str) -> Result<Option<DocEntry>> {
        match self {
            StoreSnapshot::Embedded(s) => Ok(s.document(id).cloned()),
            StoreSnapshot::Postgres(s) => s.document(id),
        }
    }

    /// A document's chunks, in order (empty for an unknown id).
    pub fn document_chunks(&self, id: &str) -> Result<Vec<StoredChunk>> {
        match self {
            StoreSnapshot::Embedded(s) => s.document_chunks(id),
            StoreSnapshot::Postgres(s) => s.document_chunks(id),
        }
    }

    pub fn prepare_filter(&self, filter: &Filter) -> PreparedFilter {
        match self {
            StoreSnapshot::Embedded(s) => PreparedFilter::Embedded(s.filter_rows(filter)),
            StoreSnapshot::Postgres(_) => PreparedFilter::Postgres(filter.clone()),
        }
    }

    /// The top-`k` chunks by inner product for each query (`queries`: n × dim, row-major).
    pub fn search(
        &self,
        queries: &[f32],
        k: usize,
        options: DenseSearch<'_>,
    ) -> Result<Vec<Vec<ChunkHit>>> {
        match self {
            StoreSnapshot::Embedded(s) => {
                let filter = match options.filter {
                    Some(PreparedFilter::Embedded(rows)) => Some(rows),
                    Some(PreparedFilter::Postgres(_)) => return Err(wrong_filter()),
                    None => None,
                };
                s.search_with(
                    queries,
                    k,
                    SearchOptions {
                        exact: options.exact,
                        ef: options.ef,
                        filter,
                    },
                )
            }
            StoreSnapshot::Postgres(s) => {
                let filter = match options.filter {
                    Some(PreparedFilter::Postgres(f)) => Some(f),
                    Some(PreparedFilter::Embedded(_)) => return Err(wrong_filter()),
                    None => None,
                };
                s.search(queries, k, options.exact, options.ef, filter)
            }
        }
    }

    /// The top-`k` chunks by BM25 (tantivy in the embedded store, the same formula over
    /// PostgreSQL's full-text search in the database; see ARCHITECTURE.md).
    pub fn bm25_search(
        &self,
        query: &str,
        k: usize,
        filter: Option<&PreparedFilter>,
    ) -> Result<Vec<ChunkHit>> {
        match (self, filter) {
            (StoreSnapshot::Embedded(s), None) => s.bm25_search(query, k, None),
            (StoreSnapshot::Embedded(s), Some(PreparedFilter::Embedded(rows))) => {
                s.bm25_search(query, k, Some(rows))
            }
            (StoreSnapshot::Postgres(s), None) => s.bm25_search(query, k, None),
            (StoreSnapshot::Postgres(s), Some(PreparedFilter::Postgres(f))) => {
                s.bm25_search(query, k, Some(f))
            }
            _ => Err(wrong_filter()),
        }
    }

    /// Reads the chunks behind `keys` (one round trip in PostgreSQL), in the order given.
    pub fn fetch(&self, keys: &[ChunkKey]) -> Result<Vec<FetchedChunk>> {
        match self {
            StoreSnapshot::Embedded(s) => keys
                .iter()
                .map(|&key| {
                    let chunk = s.chunk(key.segment, key.row)?;
                    let vector = s
                        .vector(key.segment, key.row)
                        .ok_or_else(|| {
                            IndexError::corrupt(
                                s.dir(),
                                format!("no vector for segment {} row {}", key.segment, key.row),
                            )
                        })?
                        .to_vec();
                    let doc = s.document(&chunk.doc_id);
                    Ok(FetchedChunk {
                        key,
                        title: doc.and_then(|d| d.title.clone()),
                        source: doc.map(|d| d.source.clone()).unwrap_or_default(),
                        vector,
                        chunk,
                    })
                })
                .collect(),
            StoreSnapshot::Postgres(s) => s.fetch(keys),
        }
    }

    pub fn as_embedded(&self) -> Option<&Snapshot> {
        match self {
            StoreSnapshot::Embedded(s) => Some(s),
            StoreSnapshot::Postgres(_) => None,
        }
    }
}

fn wrong_filter() -> IndexError {
    IndexError::Database {
        database: String::new(),
        message: "a filter prepared for another store was passed to this snapshot".into(),
    }
}

/// What a writer knows of a committed document, for incremental indexing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KnownDocument {
    pub id: String,
    pub source: String,
    pub content_hash: String,
}

/// Buffered upserts and deletes against a store, committed atomically.
#[allow(clippy::large_enum_variant)]
pub enum StoreWriter {
    Embedded(Writer),
    Postgres(PgWriter),
}

impl StoreWriter {
    pub fn embedding(&self) -> Option<&EmbeddingInfo> {
        match self {
            StoreWriter::Embedded(w) => w.embedding(),
            StoreWriter::Postgres(w) => w.embedding(),
        }
    }

    /// Records the embedding model of a new collection, or checks that it matches.
    pub fn ensure_embedding(&mut self, info: &EmbeddingInfo) -> Result<()> {
        match self {
            StoreWriter::Embedded(w) => w.ensure_embedding(info),
            StoreWriter::Postgres(w) => w.ensure_embedding(info),
        }
    }

    /// HNSW settings. Embedded: the graph the collection keeps. PostgreSQL: the pgvector
    /// HNSW index (`m`, `ef_construction`) created with the chunks table; `enabled = false`
    /// creates none (every search is exact); `min_rows` does not apply (the planner decides).
    /// Settings that differ from an existing PostgreSQL index make `ensure_embedding` fail.
    pub fn set_ann_settings(
        &mut self,
        enabled: bool,
        m: usize,
        ef_construction: usize,
        min_rows: u64,
    ) {
        match self {
            StoreWriter::Embedded(w) => w.set_ann_settings(enabled, m, ef_construction, min_rows),
            StoreWriter::Postgres(w) => w.set_ann_settings(enabled, m, ef_construction),
        }
    }

    /// The embedded store can keep f16 / int8 copies for exact search; PostgreSQL stores
    /// `vector(dim)` (f32) only and refuses anything else.
    pub fn set_precision(&mut self, precision: VectorPrecision) -> Result<()> {
        match self {
            StoreWriter::Embedded(w) => {
                w.set_precision(precision);
                Ok(())
            }
            StoreWriter::Postgres(w) => w.check_precision(precision),
        }
    }

    pub fn set_graph_progress(&mut self, progress: Option<GraphProgress>) {
        if let StoreWriter::Embedded(w) = self {
            w.set_graph_progress(progress);
        }
    }

    /// The committed (or buffered) documents among `ids`, by id.
    pub fn known_documents(&mut self, ids: &[&str]) -> Result<HashMap<String, KnownDocument>> {
        match self {
            StoreWriter::Embedded(w) => Ok(ids
                .iter()
                .filter_map(|id| w.document(id))
                .map(|d| (d.id.clone(), known(d)))
                .collect()),
            StoreWriter::Postgres(w) => w.known_documents(ids),
        }
    }

    /// Every committed document (id, source, hash): what `--prune` compares against.
    pub fn all_documents(&mut self) -> Result<Vec<KnownDocument>> {
        match self {
            StoreWriter::Embedded(w) => Ok(w.documents().map(known).collect()),
            StoreWriter::Postgres(w) => w.all_documents(),
        }
    }

    pub fn upsert(&mut self, doc: NewDocument) -> Result<()> {
        match self {
            StoreWriter::Embedded(w) => w.upsert(doc),
            StoreWriter::Postgres(w) => w.upsert(doc),
        }
    }

    /// Deletes a document; `false` if the store does not hold it.
    pub fn delete(&mut self, id: &str) -> Result<bool> {
        match self {
            StoreWriter::Embedded(w) => Ok(w.delete(id)),
            StoreWriter::Postgres(w) => w.delete(id),
        }
    }

    pub fn has_changes(&self) -> bool {
        match self {
            StoreWriter::Embedded(w) => w.has_changes(),
            StoreWriter::Postgres(w) => w.has_changes(),
        }
    }

    pub fn commit(&mut self) -> Result<CommitStats> {
        self.commit_with(true)
    }

    /// Commits; `update_graph = false` defers the embedded store's graph update (bulk
    /// ingestion). PostgreSQL maintains its index on every insert.
    pub fn commit_with(&mut self, update_graph: bool) -> Result<CommitStats> {
        match self {
            StoreWriter::Embedded(w) => w.commit_with(update_graph),
            StoreWriter::Postgres(w) => w.commit(),
        }
    }

    /// The latest committed generation.
    pub fn generation(&mut self) -> Result<u64> {
        match self {
            StoreWriter::Embedded(w) => Ok(w.generation()),
            StoreWriter::Postgres(w) => w.generation(),
        }
    }
}

/// What [`copy_collection`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct CopyStats {
    pub documents_copied: usize,
    pub documents_unchanged: usize,
    pub chunks_copied: usize,
    pub generation: u64,
}

/// Copies an embedded collection into another store (moving to PostgreSQL without
/// re-encoding): documents, metadata, content hashes, chunks with their E_D vectors, and the
/// embedding model's identity. Commits every `batch_chunks` chunks; documents the target
/// already holds with the same content hash are skipped, so an interrupted copy resumes.
/// `progress(chunks done, chunks in all)` is called after every commit.
pub fn copy_collection(
    source: &Snapshot,
    target: &Store,
    batch_chunks: usize,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<CopyStats> {
    let Some(model) = source.embedding() else {
        return Ok(CopyStats::default());
    };
    let mut writer = target.writer()?;
    let ann = &source.manifest().ann;
    writer.set_ann_settings(ann.enabled, ann.m, ann.ef_construction, ann.min_rows);
    writer.ensure_embedding(model)?;
    let total = source.num_live_chunks() as usize;
    let mut stats = CopyStats::default();
    let mut documents: Vec<&DocEntry> = source.documents().collect();
    documents.sort_by(|a, b| a.id.cmp(&b.id));
    let (mut pending, mut done) = (0, 0);
    for group in documents.chunks(1024) {
        let ids: Vec<&str> = group.iter().map(|d| d.id.as_str()).collect();
        let known = writer.known_documents(&ids)?;
        for entry in group {
            let rows = source.document_rows(&entry.id);
            if known
                .get(&entry.id)
                .is_some_and(|k| k.content_hash == entry.content_hash)
            {
                stats.documents_unchanged += 1;
                done += rows.len();
                continue;
            }
            let mut chunks = Vec::with_capacity(rows.len());
            let mut vectors = Vec::with_capacity(rows.len() * model.dim);
            for &(segment, row) in &rows {
                let chunk = source.chunk(segment, row)?;
                vectors.extend_from_slice(source.vector(segment, row).ok_or_else(|| {
                    IndexError::corrupt(
                        source.dir(),
                        format!("no vector for segment {segment} row {row}"),
                    )
                })?);
                chunks.push(NewChunk {
                    chunk_id: chunk.chunk_id,
                    ordinal: chunk.ordinal,
                    text: chunk.text,
                    start_byte: chunk.start_byte,
                    end_byte: chunk.end_byte,
                });
            }
            pending += chunks.len();
            stats.chunks_copied += chunks.len();
            stats.documents_copied += 1;
            writer.upsert(NewDocument {
                id: entry.id.clone(),
                source: entry.source.clone(),
                title: entry.title.clone(),
                content_hash: entry.content_hash.clone(),
                metadata: entry.metadata.clone(),
                chunks,
                vectors,
            })?;
            if pending >= batch_chunks.max(1) {
                writer.commit_with(false)?;
                done += pending;
                pending = 0;
                progress(done, total);
            }
        }
    }
    stats.generation = writer.commit()?.generation;
    progress(total, total);
    Ok(stats)
}

fn known(d: &DocEntry) -> KnownDocument {
    KnownDocument {
        id: d.id.clone(),
        source: d.source.clone(),
        content_hash: d.content_hash.clone(),
    }
}
