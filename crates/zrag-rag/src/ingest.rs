//! Ingestion: files → documents → chunks → E_D vectors → committed collection.
//!
//! Incremental: a document whose id and content hash are already committed (under the same
//! embedding model) is skipped; a changed one is replaced; with `prune`, documents that came
//! from the given paths but were not seen this time are deleted. Work is committed every
//! `commit_every_chunks` chunks, so an interrupted run keeps what it finished and the next run
//! resumes from there (unchanged documents are skipped).

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use serde::Serialize;
use zrag_index::collection::{EmbeddingInfo, NewChunk, NewDocument, VectorPrecision};
use zrag_index::store::{Store, StoreWriter};
use zrag_models::BertEncoder;
use zrag_text::{Chunker, ChunkerConfig, Document};

use crate::RagError;

#[derive(Clone, Debug)]
pub struct IngestOptions {
    pub chunker: ChunkerConfig,
    /// Commit after this many new chunks (bounds the work lost to a crash).
    pub commit_every_chunks: usize,
    /// Delete documents that came from the given paths but were not found this time.
    pub prune: bool,
    /// New HNSW settings for the collection (`None`: keep the stored ones).
    pub ann: Option<AnnSettings>,
    /// New scan precision for exact search (`None`: keep the stored one).
    pub precision: Option<VectorPrecision>,
    /// Only the documents of this shard (several indexers sharing one PostgreSQL store).
    pub shard: Option<Shard>,
}

/// Part `index` of `count` (0-based): the documents whose id hashes to it. The hash is
/// FNV-1a of the id, so every machine assigns every document the same part, whatever order
/// or subset of files it loads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shard {
    pub index: u32,
    pub count: u32,
}

impl Shard {
    /// Parses `i/n` with `0 <= i < n`.
    pub fn parse(spec: &str) -> Result<Shard, String> {
        let (i, n) = spec
            .split_once('/')
            .ok_or_else(|| format!("shard {spec:?}: expected i/n, for example 0/4"))?;
        let index: u32 = i
            .trim()
            .parse()
            .map_err(|_| format!("shard {spec:?}: {i:?} is not a number"))?;
        let count: u32 = n
            .trim()
            .parse()
            .map_err(|_| format!("shard {spec:?}: {n:?} is not a number"))?;
        if count == 0 || index >= count {
            return Err(format!("shard {spec:?}: need 0 <= i < n"));
        }
        Ok(Shard { index, count })
    }

    pub fn contains(&self, doc_id: &str) -> bool {
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        for byte in doc_id.bytes() {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
        hash % u64::from(self.count) == u64::from(self.index)
    }
}

/// HNSW settings of a collection (see `zrag_index::collection::AnnState`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AnnSettings {
    pub enabled: bool,
    pub m: usize,
    pub ef_construction: usize,
    /// No graph below this many chunks (exact search is fast enough there).
    pub min_rows: u64,
}

impl Default for IngestOptions {
    fn default() -> Self {
        IngestOptions {
            chunker: ChunkerConfig::default(),
            commit_every_chunks: 8192,
            prune: false,
            ann: None,
            precision: None,
            shard: None,
        }
    }
}

/// A file that could not be ingested, and why.
#[derive(Clone, Debug, Serialize)]
pub struct IngestFailure {
    pub path: String,
    pub error: String,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct IngestReport {
    pub files_seen: usize,
    pub documents_seen: usize,
    pub added: usize,
    pub updated: usize,
    pub unchanged: usize,
    pub pruned: usize,
    pub chunks_embedded: usize,
    /// Documents left to the other shards (`--shard`).
    pub other_shards: usize,
    pub generation: u64,
    pub failures: Vec<IngestFailure>,
}

/// Callbacks for showing progress; every method has a silent default.
pub trait IngestProgress {
    /// Loading finished: `documents` documents, of which `to_embed_chunks` chunks need vectors.
    fn planned(&mut self, _documents: usize, _to_embed_chunks: usize) {}
    /// `n` more chunks were embedded.
    fn embedded(&mut self, _n: usize) {}
    fn committed(&mut self, _generation: u64) {}
    /// A callback for the HNSW graph build of the final commit: (nodes done, nodes to insert).
    fn graph_progress(&mut self) -> Option<zrag_index::collection::GraphProgress> {
        None
    }
}

impl IngestProgress for () {}

fn embedding_info(encoder: &BertEncoder) -> EmbeddingInfo {
    let identity = encoder.identity();
    EmbeddingInfo {
        name: identity.name.clone(),
        sha256: identity.sha256.clone(),
        dim: identity.dim,
    }
}

/// A path as a '/'-separated string without `./` noise, for comparing sources with the
/// paths a user passed.
fn normalised(path: &str) -> String {
    Path::new(path)
        .components()
        .filter(|c| !matches!(c, std::path::Component::CurDir))
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join("/")
        .replace("//", "/")
}

fn is_under(source: &str, root: &str) -> bool {
    let (source, root) = (normalised(source), normalised(root));
    source == root
        || root.is_empty()
        || source
            .strip_prefix(&root)
            .is_some_and(|rest| rest.starts_with('/'))
}

struct Planned {
    doc: Document,
    chunks: Vec<zrag_text::Chunk>,
    replaces: bool,
}

/// Ingests `paths` into `store`, embedding chunks with `encoder` (E_D).
pub fn ingest(
    store: &Store,
    encoder: &BertEncoder,
    paths: &[PathBuf],
    options: &IngestOptions,
    progress: &mut dyn IngestProgress,
) -> Result<IngestReport, RagError> {
    let mut writer = store.writer()?;
    // The store's HNSW settings first: PostgreSQL creates its index with the chunks table.
    if let Some(ann) = &options.ann {
        writer.set_ann_settings(ann.enabled, ann.m, ann.ef_construction, ann.min_rows);
    }
    writer.ensure_embedding(&embedding_info(encoder))?;
    if let Some(precision) = options.precision {
        writer.set_precision(precision)?;
    }
    writer.set_graph_progress(progress.graph_progress());

    let mut loaded = zrag_text::load_paths(paths);
    let mut other_shards = 0;
    if let Some(shard) = options.shard {
        loaded.documents.retain(|d| {
            let mine = shard.contains(&d.id);
            other_shards += usize::from(!mine);
            mine
        });
    }
    let mut report = IngestReport {
        other_shards,
        files_seen: loaded.files_seen,
        documents_seen: loaded.documents.len(),
        failures: loaded
            .failures
            .iter()
            .map(|f| IngestFailure {
                path: f.path.display().to_string(),
                error: f.error.to_string(),
            })
            .collect(),
        ..IngestReport::default()
    };

    let chunker = Chunker::new(encoder, options.chunker);
    let mut seen_ids = HashSet::new();
    for doc in &loaded.documents {
        // Ids are unique here: the loader keeps the first document of an id and reports the
        // later ones as failures.
        seen_ids.insert(doc.id.clone());
    }
    let plan = plan_documents(&mut writer, &chunker, loaded.documents, &mut report)?;
    let to_embed: usize = plan.iter().map(|p| p.chunks.len()).sum();
    progress.planned(report.documents_seen, to_embed);
    embed_plan(
        encoder,
        &mut writer,
        plan,
        options.commit_every_chunks,
        &mut report,
        progress,
    )?;

    if options.prune {
        let failed: HashSet<String> = report
            .failures
            .iter()
            .map(|f| normalised(&f.path))
            .collect();
        let roots: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
        let doomed: Vec<String> = writer
            .all_documents()?
            .into_iter()
            .filter(|d| !seen_ids.contains(&d.id))
            // Another shard's documents are not this run's to prune.
            .filter(|d| options.shard.is_none_or(|s| s.contains(&d.id)))
            .filter(|d| roots.iter().any(|r| is_under(&d.source, r)))
            // A file that failed to load this time is not gone: keep what it had.
            .filter(|d| !failed.contains(&normalised(&d.source)))
            .map(|d| d.id)
            .collect();
        for id in &doomed {
            writer.delete(id)?;
        }
        report.pruned = doomed.len();
    }
    let stats = writer.commit()?;
    report.generation = stats.generation;
    progress.committed(stats.generation);
    Ok(report)
}

/// Splits `documents` into the unchanged ones (counted in `report`) and the ones to (re)embed.
fn plan_documents(
    writer: &mut StoreWriter,
    chunker: &Chunker<'_>,
    documents: Vec<Document>,
    report: &mut IngestReport,
) -> Result<Vec<Planned>, RagError> {
    let ids: Vec<&str> = documents.iter().map(|d| d.id.as_str()).collect();
    let known = writer.known_documents(&ids)?;
    let mut plan = Vec::new();
    for doc in documents {
        let existing = known.get(&doc.id);
        if existing.is_some_and(|e| e.content_hash == doc.content_hash) {
            report.unchanged += 1;
            continue;
        }
        let chunks = chunker.chunk(&doc);
        plan.push(Planned {
            replaces: existing.is_some(),
            doc,
            chunks,
        });
    }
    Ok(plan)
}

/// Embeds the planned documents in groups of whole documents (about one encoder call's worth,
/// so progress moves) and buffers them in the writer, committing every `commit_every_chunks`
/// chunks (durability; `usize::MAX`: leave every commit to the caller).
fn embed_plan(
    encoder: &BertEncoder,
    writer: &mut StoreWriter,
    plan: Vec<Planned>,
    commit_every_chunks: usize,
    report: &mut IngestReport,
    progress: &mut dyn IngestProgress,
) -> Result<(), RagError> {
    const EMBED_GROUP_CHUNKS: usize = 512;
    let mut group: Vec<Planned> = Vec::new();
    let mut group_chunks = 0;
    let mut since_commit = 0;
    let mut plan = plan.into_iter().peekable();
    while let Some(planned) = plan.next() {
        group_chunks += planned.chunks.len();
        group.push(planned);
        let last = plan.peek().is_none();
        if group_chunks < EMBED_GROUP_CHUNKS && !last {
            continue;
        }
        embed_and_upsert(encoder, &mut group, writer, report, progress)?;
        since_commit += group_chunks;
        group_chunks = 0;
        if since_commit >= commit_every_chunks {
            since_commit = 0;
            // The graph is brought up to date once, by the final commit.
            let stats = writer.commit_with(false)?;
            progress.committed(stats.generation);
        }
    }
    Ok(())
}

/// Documents given directly (an HTTP upsert, say) rather than as files.
#[derive(Clone, Debug, Default, Serialize)]
pub struct DocumentChanges {
    pub added: usize,
    pub updated: usize,
    pub unchanged: usize,
    pub deleted: usize,
    /// Ids asked to be deleted that the collection does not hold.
    pub not_found: Vec<String>,
    pub chunks_embedded: usize,
    /// The generation that holds the change (the current one when nothing changed).
    pub generation: u64,
}

/// Upserts `documents` and deletes `delete_ids` in one commit: readers see all of it or none.
/// An unchanged document (same id and content hash) is not re-embedded. Ids must be unique
/// across `documents`.
pub fn apply_documents(
    store: &Store,
    encoder: &BertEncoder,
    documents: Vec<Document>,
    delete_ids: &[String],
    chunker: ChunkerConfig,
) -> Result<DocumentChanges, RagError> {
    let mut ids = HashSet::new();
    for doc in &documents {
        if !ids.insert(doc.id.as_str()) {
            return Err(RagError::DuplicateDocument(doc.id.clone()));
        }
    }
    let mut writer = store.writer()?;
    writer.ensure_embedding(&embedding_info(encoder))?;
    let mut report = IngestReport {
        documents_seen: documents.len(),
        ..IngestReport::default()
    };
    let chunker = Chunker::new(encoder, chunker);
    let plan = plan_documents(&mut writer, &chunker, documents, &mut report)?;
    embed_plan(encoder, &mut writer, plan, usize::MAX, &mut report, &mut ())?;
    let mut changes = DocumentChanges::default();
    for id in delete_ids {
        if writer.delete(id)? {
            changes.deleted += 1;
        } else {
            changes.not_found.push(id.clone());
        }
    }
    changes.generation = if writer.has_changes() {
        writer.commit()?.generation
    } else {
        writer.generation()?
    };
    changes.added = report.added;
    changes.updated = report.updated;
    changes.unchanged = report.unchanged;
    changes.chunks_embedded = report.chunks_embedded;
    Ok(changes)
}

/// What E_D sees for a chunk: the document title, then the chunk (the BEIR convention), unless
/// the chunk already starts with the title (a Markdown heading, say).
pub fn embedding_input(title: Option<&str>, chunk_text: &str) -> String {
    match title.map(str::trim).filter(|t| !t.is_empty()) {
        Some(title)
            if !chunk_text
                .trim_start()
                .trim_start_matches('#')
                .trim_start()
                .starts_with(title) =>
        {
            format!("{title}\n{chunk_text}")
        }
        _ => chunk_text.to_string(),
    }
}

/// Embeds the chunks of `group` with E_D and buffers the documents in the writer.
fn embed_and_upsert(
    encoder: &BertEncoder,
    group: &mut Vec<Planned>,
    writer: &mut StoreWriter,
    report: &mut IngestReport,
    progress: &mut dyn IngestProgress,
) -> Result<(), RagError> {
    let owned: Vec<String> = group
        .iter()
        .flat_map(|p| {
            p.chunks
                .iter()
                .map(|c| embedding_input(p.doc.title.as_deref(), &c.text))
        })
        .collect();
    let texts: Vec<&str> = owned.iter().map(String::as_str).collect();
    let mut reported = 0;
    let mut vectors = encoder
        .embed_with_progress(&texts, &mut |done| {
            progress.embedded(done - reported);
            reported = done;
        })?
        .into_iter();
    progress.embedded(texts.len() - reported);
    report.chunks_embedded += texts.len();
    for planned in group.drain(..) {
        let n = planned.chunks.len();
        let doc_vectors: Vec<f32> = vectors.by_ref().take(n).flatten().collect();
        if planned.replaces {
            report.updated += 1;
        } else {
            report.added += 1;
        }
        writer.upsert(to_new_document(planned.doc, planned.chunks, doc_vectors))?;
    }
    Ok(())
}

fn to_new_document(doc: Document, chunks: Vec<zrag_text::Chunk>, vectors: Vec<f32>) -> NewDocument {
    NewDocument {
        id: doc.id,
        source: doc.source,
        title: doc.title,
        content_hash: doc.content_hash,
        metadata: doc.metadata,
        chunks: chunks
            .into_iter()
            .map(|c| NewChunk {
                chunk_id: c.id,
                ordinal: c.ordinal,
                text: c.text,
                start_byte: c.start_byte,
                end_byte: c.end_byte,
            })
            .collect(),
        vectors,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn title_is_prepended_once() {
        assert_eq!(
            embedding_input(Some("The Moon"), "The Moon is"),
            "The Moon is"
        );
        assert_eq!(embedding_input(Some("Moon"), "# Moon\nis"), "# Moon\nis");
        assert_eq!(
            embedding_input(Some("abacus"), "A frame"),
            "abacus\nA frame"
        );
        assert_eq!(embedding_input(Some("  "), "x"), "x");
        assert_eq!(embedding_input(None, "x"), "x");
    }

    #[test]
    fn sources_under_roots() {
        assert!(is_under("docs/a.txt", "docs"));
        assert!(is_under("./docs/a.txt", "docs/"));
        assert!(is_under("docs/a.txt", "docs/a.txt"));
        assert!(!is_under("docs2/a.txt", "docs"));
        assert!(!is_under("other/a.txt", "docs"));
    }
}
