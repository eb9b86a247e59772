//! The collection's BM25 side: a tantivy index under `bm25/` over the same chunks as the
//! segments, kept in step by the writer.
//!
//! tantivy commits on its own, so BM25 cannot be inside our manifest's atomic rename. It is a
//! derived index instead: each tantivy commit carries the collection generation it reflects.
//! The writer applies every commit's changes right after the manifest lands, and when it
//! opens a collection whose BM25 generation differs (a crash between the two commits, or a
//! collection older than BM25) it rebuilds BM25 from the segments. Searches check every hit
//! against their snapshot (segment present, row live, filter), so a BM25 index that is ahead
//! or behind never returns a chunk the snapshot does not hold.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::manifest::Manifest;
use super::snapshot::{ChunkHit, RowFilter, Snapshot};
use crate::bm25::{Bm25Doc, Bm25Index, Bm25Reader, ChunkKey};
use crate::error::{IndexError, Result};

pub(crate) const BM25_DIR: &str = "bm25";

/// How long a snapshot's first BM25 search waits for BM25 to reach the snapshot's generation.
const BM25_CATCH_UP: std::time::Duration = std::time::Duration::from_secs(2);

pub(crate) fn bm25_dir(dir: &Path) -> PathBuf {
    dir.join(BM25_DIR)
}

/// Every live row of `snapshot` as a BM25 document.
fn all_documents(snapshot: &Snapshot) -> Result<Vec<Bm25Doc>> {
    let mut docs = Vec::with_capacity(snapshot.num_live_chunks() as usize);
    for (index, segment) in snapshot.segments().iter().enumerate() {
        for row in 0..segment.rows {
            if segment.is_live(row) {
                docs.push(document(snapshot, index, row)?);
            }
        }
    }
    Ok(docs)
}

fn document(snapshot: &Snapshot, segment: usize, row: u32) -> Result<Bm25Doc> {
    let chunk = snapshot.chunk(segment as u32, row)?;
    let title = snapshot
        .document(&chunk.doc_id)
        .and_then(|d| d.title.clone());
    Ok(Bm25Doc {
        key: ChunkKey {
            segment: snapshot.segments()[segment].id.clone(),
            row,
        },
        title,
        text: chunk.text,
    })
}

/// Opens the collection's BM25 index for writing and rebuilds it if it does not reflect
/// `manifest`.
pub(crate) fn open_for_writer(dir: &Path, manifest: &Manifest) -> Result<Bm25Index> {
    let mut index = Bm25Index::open_or_create(&bm25_dir(dir))?;
    if index.generation() != Some(manifest.generation) {
        let snapshot = Snapshot::open_manifest(dir, manifest.clone())?;
        index.rebuild(manifest.generation, all_documents(&snapshot)?)?;
    }
    Ok(index)
}

/// Applies one commit: rows deleted from surviving segments, segments that disappeared,
/// and the rows of segments that are new in `next`.
pub(crate) fn apply_commit(
    index: &mut Bm25Index,
    dir: &Path,
    previous: &Manifest,
    next: &Manifest,
    deleted_rows: &HashMap<String, Vec<u32>>,
) -> Result<()> {
    let old_ids: std::collections::HashSet<&str> =
        previous.segments.iter().map(|s| s.id.as_str()).collect();
    let new_ids: std::collections::HashSet<&str> =
        next.segments.iter().map(|s| s.id.as_str()).collect();
    let removed_segments: Vec<String> = old_ids
        .difference(&new_ids)
        .map(|s| s.to_string())
        .collect();
    let removed_keys: Vec<ChunkKey> = deleted_rows
        .iter()
        .filter(|(segment, _)| new_ids.contains(segment.as_str()))
        .flat_map(|(segment, rows)| {
            rows.iter().map(|&row| ChunkKey {
                segment: segment.clone(),
                row,
            })
        })
        .collect();
    let mut added = Vec::new();
    if next
        .segments
        .iter()
        .any(|s| !old_ids.contains(s.id.as_str()))
    {
        let snapshot = Snapshot::open_manifest(dir, next.clone())?;
        for (index, segment) in snapshot.segments().iter().enumerate() {
            if old_ids.contains(segment.id.as_str()) {
                continue;
            }
            for row in 0..segment.rows {
                if segment.is_live(row) {
                    added.push(document(&snapshot, index, row)?);
                }
            }
        }
    }
    index.apply(next.generation, &removed_keys, &removed_segments, added)
}

impl Snapshot {
    /// The top-`k` chunks of this snapshot by BM25 over their text, among the rows `filter`
    /// allows.
    pub fn bm25_search(
        &self,
        query: &str,
        k: usize,
        filter: Option<&RowFilter>,
    ) -> Result<Vec<ChunkHit>> {
        if k == 0 || self.segments().is_empty() {
            return Ok(Vec::new());
        }
        let reader = self.bm25_reader()?;
        let segment_index: HashMap<&str, usize> = self
            .segments()
            .iter()
            .enumerate()
            .map(|(i, s)| (s.id.as_str(), i))
            .collect();
        // Hits the snapshot cannot return (deleted, filtered, from a newer commit) are
        // skipped, so ask for more until k remain or BM25 has nothing more.
        let mut depth = (2 * k).max(k + 20);
        loop {
            let found = reader.search(query, depth)?;
            let exhausted = found.len() < depth;
            let hits: Vec<ChunkHit> = found
                .into_iter()
                .filter_map(|(key, score)| {
                    let &segment = segment_index.get(key.segment.as_str())?;
                    let reader = &self.segments()[segment];
                    let allowed = key.row < reader.rows
                        && reader.is_live(key.row)
                        && filter.is_none_or(|f| f.allows(segment, key.row));
                    allowed.then_some(ChunkHit {
                        segment: segment as u32,
                        row: key.row,
                        score,
                    })
                })
                .take(k)
                .collect();
            if hits.len() >= k || exhausted {
                return Ok(hits);
            }
            depth *= 4;
        }
    }

    fn bm25_reader(&self) -> Result<&Bm25Reader> {
        let slot = self.bm25.get_or_init(|| {
            let dir = bm25_dir(self.dir());
            if !dir.exists() {
                return Err(
                    "this collection has no BM25 index yet; run `zrag index` on it \
                            once (any path) to build it"
                        .to_string(),
                );
            }
            let mut reader = Bm25Reader::open(&dir).map_err(|e| e.to_string())?;
            // A snapshot opened between a commit's manifest rename and its BM25 commit (by
            // another process, or a server's watcher) would miss that commit's chunks: give
            // the writer a moment to catch up. A writer that died in between leaves BM25
            // behind until the next writer rebuilds it; hits stay checked against the snapshot.
            let deadline = std::time::Instant::now() + BM25_CATCH_UP;
            while reader.generation().is_none_or(|g| g < self.generation())
                && std::time::Instant::now() < deadline
            {
                std::thread::sleep(std::time::Duration::from_millis(5));
                reader.refresh().map_err(|e| e.to_string())?;
            }
            Ok(reader)
        });
        slot.as_ref().map_err(|message| IndexError::Bm25 {
            path: bm25_dir(self.dir()),
            message: message.clone(),
        })
    }
}
