//! Reading a committed state: the document table, the segments, and exact search over them.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use rayon::prelude::*;

use super::ann::AnnIndex;
use super::fsutil;
use super::manifest::{EmbeddingInfo, Manifest, NamedFile};
use super::segment::{SegmentReader, StoredChunk};
use super::{DocEntry, DOCS_DIR, SEGMENTS_DIR, TOMBSTONES_DIR};
use crate::error::{IndexError, Result};
use crate::exact;
use crate::filter::Filter;

/// A search result: a row of a segment of this snapshot.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ChunkHit {
    pub segment: u32,
    pub row: u32,
    pub score: f32,
}

/// The state named by one manifest, with every file verified (length and CRC-32).
pub struct Snapshot {
    dir: PathBuf,
    manifest: Manifest,
    segments: Vec<SegmentReader>,
    documents: HashMap<String, DocEntry>,
    ann: Option<AnnIndex>,
    /// Opened on the first BM25 search.
    pub(crate) bm25: std::sync::OnceLock<std::result::Result<crate::bm25::Bm25Reader, String>>,
}

/// How [`Snapshot::search_with`] searches.
#[derive(Clone, Copy, Debug, Default)]
pub struct SearchOptions<'a> {
    /// Scan every row even when an HNSW graph exists.
    pub exact: bool,
    /// HNSW beam width; `None` = [`DEFAULT_EF`] (at least 2k).
    pub ef: Option<usize>,
    /// Only rows of documents passing this filter.
    pub filter: Option<&'a RowFilter>,
}

/// HNSW beam width used unless a search asks for another (recall@10 ≈ 0.98 on real MiniLM
/// vectors, see BENCHMARKS.md).
pub const DEFAULT_EF: usize = 128;

/// Below this share of allowed rows a filtered search scans the allowed rows exactly: the
/// graph walk would visit mostly rejected nodes and lose recall.
pub const FILTER_EXACT_BELOW: f64 = 0.05;

/// The rows of a snapshot that pass a [`Filter`], per segment (bit set = allowed).
#[derive(Clone, Debug, PartialEq)]
pub struct RowFilter {
    allowed: Vec<Vec<u64>>,
    allowed_rows: u64,
}

impl RowFilter {
    pub fn allowed_rows(&self) -> u64 {
        self.allowed_rows
    }

    #[inline]
    pub fn allows(&self, segment: usize, row: u32) -> bool {
        self.allowed[segment]
            .get(row as usize / 64)
            .is_some_and(|w| w >> (row % 64) & 1 == 1)
    }
}

impl std::fmt::Debug for Snapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Snapshot")
            .field("dir", &self.dir)
            .field("generation", &self.manifest.generation)
            .field("segments", &self.segments.len())
            .field("documents", &self.documents.len())
            .finish()
    }
}

pub(crate) fn read_tombstones(dir: &Path, file: &NamedFile) -> Result<Vec<u32>> {
    let path = dir.join(TOMBSTONES_DIR).join(&file.name);
    let bytes = fsutil::read_file(&path)?;
    file.check.verify(&path, &bytes)?;
    if !bytes.len().is_multiple_of(4) {
        return Err(IndexError::corrupt(&path, "length is not a multiple of 4"));
    }
    Ok(bytes
        .chunks_exact(4)
        .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")))
        .collect())
}

pub(crate) fn read_document_table(
    dir: &Path,
    manifest: &Manifest,
) -> Result<HashMap<String, DocEntry>> {
    let Some(file) = &manifest.documents else {
        return Ok(HashMap::new());
    };
    let path = dir.join(DOCS_DIR).join(&file.name);
    let bytes = fsutil::read_file(&path)?;
    file.check.verify(&path, &bytes)?;
    let mut table = HashMap::new();
    for (i, line) in bytes.split(|&b| b == b'\n').enumerate() {
        if line.is_empty() {
            continue;
        }
        let entry: DocEntry = serde_json::from_slice(line)
            .map_err(|e| IndexError::corrupt(&path, format!("line {}: {e}", i + 1)))?;
        table.insert(entry.id.clone(), entry);
    }
    Ok(table)
}

impl Snapshot {
    /// Opens the current committed state of the collection in `dir`.
    pub fn open(dir: &Path) -> Result<Self> {
        // A commit may remove the files of the manifest we just read before we open them
        // (its garbage collection runs after the rename). That shows up as a missing file
        // under a manifest that has since changed: read the new one and try again.
        let mut attempts = 0;
        loop {
            let manifest = Manifest::read(dir)?;
            match Self::open_manifest(dir, manifest.clone()) {
                Ok(snapshot) => return Ok(snapshot),
                Err(IndexError::Io { source, .. })
                    if source.kind() == std::io::ErrorKind::NotFound
                        && attempts < 8
                        && Manifest::read(dir)
                            .map(|now| now.generation != manifest.generation)
                            .unwrap_or(false) =>
                {
                    attempts += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    pub(crate) fn open_manifest(dir: &Path, manifest: Manifest) -> Result<Self> {
        let documents = read_document_table(dir, &manifest)?;
        let dim = manifest.embedding.as_ref().map_or(0, |e| e.dim);
        let segments_dir = dir.join(SEGMENTS_DIR);
        let mut segments = Vec::with_capacity(manifest.segments.len());
        for entry in &manifest.segments {
            let deleted = match &entry.tombstones {
                Some(file) => read_tombstones(dir, file)?,
                None => Vec::new(),
            };
            segments.push(SegmentReader::open(
                &segments_dir,
                entry,
                dim,
                &deleted,
                manifest.precision,
            )?);
        }
        let ann = match &manifest.ann.graph {
            Some(graph) => Some(AnnIndex::open(dir, graph, &segments)?),
            None => None,
        };
        Ok(Snapshot {
            dir: dir.to_path_buf(),
            manifest,
            segments,
            documents,
            ann,
            bm25: std::sync::OnceLock::new(),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn generation(&self) -> u64 {
        self.manifest.generation
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    pub fn embedding(&self) -> Option<&EmbeddingInfo> {
        self.manifest.embedding.as_ref()
    }

    pub fn document(&self, id: &str) -> Option<&DocEntry> {
        self.documents.get(id)
    }

    pub fn documents(&self) -> impl Iterator<Item = &DocEntry> {
        self.documents.values()
    }

    pub fn num_documents(&self) -> usize {
        self.documents.len()
    }

    /// Chunks that can be returned by a search (deleted rows excluded).
    pub fn num_live_chunks(&self) -> u64 {
        self.segments.iter().map(|s| u64::from(s.live_rows)).sum()
    }

    pub fn segments(&self) -> &[SegmentReader] {
        &self.segments
    }

    /// Whether searches can use an HNSW graph, and over how many rows.
    pub fn ann_rows(&self) -> Option<usize> {
        self.ann.as_ref().map(|a| a.nodes.len())
    }

    /// The rows of documents that pass `filter`.
    pub fn filter_rows(&self, filter: &Filter) -> RowFilter {
        let index: HashMap<&str, usize> = self
            .segments
            .iter()
            .enumerate()
            .map(|(i, s)| (s.id.as_str(), i))
            .collect();
        let mut allowed: Vec<Vec<u64>> = self
            .segments
            .iter()
            .map(|s| vec![0u64; (s.rows as usize).div_ceil(64)])
            .collect();
        let mut allowed_rows = 0;
        for doc in self.documents.values() {
            let Some(&seg) = doc.segment.as_deref().and_then(|id| index.get(id)) else {
                continue;
            };
            if !filter.matches(doc) {
                continue;
            }
            for row in doc.first_row..doc.first_row + doc.rows {
                if self.segments[seg].is_live(row) {
                    allowed[seg][row as usize / 64] |= 1 << (row % 64);
                    allowed_rows += 1;
                }
            }
        }
        RowFilter {
            allowed,
            allowed_rows,
        }
    }

    /// Top-`k` by inner product for each query (`queries` is row-major, `dim` per row): by
    /// the HNSW graph where there is one, exactly otherwise.
    pub fn search(&self, queries: &[f32], k: usize) -> Result<Vec<Vec<ChunkHit>>> {
        self.search_with(queries, k, SearchOptions::default())
    }

    /// [`Snapshot::search`] with options: exact or approximate, beam width, a filter.
    pub fn search_with(
        &self,
        queries: &[f32],
        k: usize,
        options: SearchOptions<'_>,
    ) -> Result<Vec<Vec<ChunkHit>>> {
        let dim = self.embedding().map_or(0, |e| e.dim);
        if dim == 0 {
            return Ok(vec![Vec::new(); usize::from(!queries.is_empty())]);
        }
        if !queries.len().is_multiple_of(dim) {
            return Err(IndexError::DimensionMismatch {
                doc_id: "<query>".into(),
                expected: dim,
                found: queries.len(),
            });
        }
        let n_queries = queries.len() / dim;
        let live_rows = self.num_live_chunks().max(1) as f64;
        let selective = options
            .filter
            .is_some_and(|f| (f.allowed_rows as f64) / live_rows < FILTER_EXACT_BELOW);
        let graph = self.ann.as_ref().filter(|_| !options.exact && !selective);
        let exact_from = graph.map_or(0, |g| g.covered);

        let mut merged: Vec<Vec<ChunkHit>> = vec![Vec::new(); n_queries];
        if let Some(ann) = graph {
            let vectors = ann.nodes.vectors(&self.segments, dim);
            let view = ann.file.view();
            let ef = options.ef.unwrap_or(DEFAULT_EF).max(2 * k);
            let allow = |node: u32| {
                let (segment, row) = vectors.locate(node);
                self.segments[segment].is_live(row)
                    && options.filter.is_none_or(|f| f.allows(segment, row))
            };
            let per_query: Vec<Vec<ChunkHit>> = queries
                .par_chunks_exact(dim)
                .map(|query| {
                    view.search(&vectors, query, k, ef, Some(&allow))
                        .into_iter()
                        .map(|hit| {
                            let (segment, row) = vectors.locate(hit.row);
                            ChunkHit {
                                segment: segment as u32,
                                row,
                                score: hit.score,
                            }
                        })
                        .collect()
                })
                .collect();
            merged = per_query;
        }
        for (seg_index, segment) in self.segments.iter().enumerate().skip(exact_from) {
            if segment.live_rows == 0 {
                continue;
            }
            let restricted: Option<Vec<u64>> = options.filter.map(|f| {
                let allowed = &f.allowed[seg_index];
                match &segment.live {
                    Some(live) => live.iter().zip(allowed).map(|(a, b)| a & b).collect(),
                    None => allowed.clone(),
                }
            });
            let live = restricted.as_deref().or(segment.live.as_deref());
            // At f16 / int8 the compact copy is scanned and its shortlist re-scored from the
            // f32 rows, so the scores stay exact.
            let per_query = match segment.quantized() {
                Some(view) => exact::quantized::search_quantized(
                    view,
                    segment.vectors(),
                    dim,
                    queries,
                    k,
                    exact::quantized::default_shortlist(k),
                    live,
                ),
                None => exact::search(segment.vectors(), dim, queries, k, live),
            };
            for (hits, out) in per_query.into_iter().zip(merged.iter_mut()) {
                out.extend(hits.into_iter().map(|h| ChunkHit {
                    segment: seg_index as u32,
                    row: h.row,
                    score: h.score,
                }));
            }
        }
        for hits in &mut merged {
            hits.sort_by(|a, b| {
                b.score
                    .total_cmp(&a.score)
                    .then(a.segment.cmp(&b.segment))
                    .then(a.row.cmp(&b.row))
            });
            hits.truncate(k);
        }
        Ok(merged)
    }

    /// The stored vector of a row (E_D of its chunk).
    pub fn vector(&self, segment: u32, row: u32) -> Option<&[f32]> {
        let dim = self.embedding()?.dim;
        let reader = self.segments.get(segment as usize)?;
        let start = row as usize * dim;
        reader.vectors().get(start..start + dim)
    }

    /// The stored chunk behind a hit.
    pub fn chunk(&self, segment: u32, row: u32) -> Result<StoredChunk> {
        let reader = self.segments.get(segment as usize).ok_or_else(|| {
            IndexError::corrupt(&self.dir, format!("no segment number {segment}"))
        })?;
        reader.chunk(row)
    }

    /// The live rows `(segment, row)` of a document's chunks, in order; empty for an unknown
    /// id.
    pub fn document_rows(&self, id: &str) -> Vec<(u32, u32)> {
        let Some(doc) = self.documents.get(id) else {
            return Vec::new();
        };
        let Some(seg_id) = &doc.segment else {
            return Vec::new();
        };
        let Some((index, reader)) = self
            .segments
            .iter()
            .enumerate()
            .find(|(_, s)| &s.id == seg_id)
        else {
            return Vec::new();
        };
        (doc.first_row..doc.first_row + doc.rows)
            .filter(|&row| reader.is_live(row))
            .map(|row| (index as u32, row))
            .collect()
    }

    /// Every live row `(segment, row)`, in segment order.
    pub fn live_rows(&self) -> Vec<(u32, u32)> {
        let mut rows = Vec::with_capacity(self.num_live_chunks() as usize);
        for (index, reader) in self.segments.iter().enumerate() {
            rows.extend(
                (0..reader.rows)
                    .filter(|&r| reader.is_live(r))
                    .map(|r| (index as u32, r)),
            );
        }
        rows
    }

    /// All live chunks of a document, in order.
    pub fn document_chunks(&self, id: &str) -> Result<Vec<StoredChunk>> {
        let Some(doc) = self.documents.get(id) else {
            return Ok(Vec::new());
        };
        let Some(seg_id) = &doc.segment else {
            return Ok(Vec::new());
        };
        let (index, reader) = self
            .segments
            .iter()
            .enumerate()
            .find(|(_, s)| &s.id == seg_id)
            .ok_or_else(|| {
                IndexError::corrupt(
                    &self.dir,
                    format!("document {id} points at missing segment {seg_id}"),
                )
            })?;
        (doc.first_row..doc.first_row + doc.rows)
            .filter(|&row| reader.is_live(row))
            .map(|row| self.chunk(index as u32, row))
            .collect()
    }
}
