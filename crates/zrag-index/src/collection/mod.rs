//! The on-disk collection: a manifest plus immutable segments, committed atomically.
//!
//! Layout of a collection directory (default `./.zrag`):
//!
//! ```text
//! MANIFEST                     JSON: format version, generation, embedding model, segments,
//!                              document table, and the length + CRC-32 of every file below
//! LOCK                         held (flock) by the one writer
//! segments/seg-00000001/       immutable: vectors.f32, chunks.jsonl, chunks.offsets
//! tombstones/<seg>-g<gen>.del  deleted rows of a segment (u32 LE), replaced on each change
//! docs/docs-g<gen>.jsonl       the document table: id → source, title, hash, metadata, rows
//! ann/hnsw-g<gen>.graph        the HNSW graph over the segments' rows (see `ann`)
//! ```
//!
//! Readers open a [`Snapshot`]: the state named by one manifest. Writers ([`Writer`]) buffer
//! upserts and deletes and [`Writer::commit`] them: new files are written and fsynced, then the
//! manifest is replaced by rename. A crash at any moment leaves the previous commit intact; the
//! leftovers of an interrupted commit are removed the next time a writer opens.

mod ann;
mod fsutil;
mod lexical;
mod manifest;
mod segment;
mod snapshot;
mod writer;

pub use ann::REBUILD_DEAD_FRACTION;
pub use fsutil::FileCheck;
pub use manifest::{
    AnnState, EmbeddingInfo, Manifest, VectorPrecision, FORMAT_VERSION, MANIFEST_FILE,
};
pub use segment::StoredChunk;
pub use snapshot::{ChunkHit, RowFilter, SearchOptions, Snapshot, DEFAULT_EF, FILTER_EXACT_BELOW};
pub use writer::{CommitStats, GraphProgress, NewChunk, NewDocument, Writer};

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{IndexError, Result};

pub(crate) const SEGMENTS_DIR: &str = "segments";
pub(crate) const TOMBSTONES_DIR: &str = "tombstones";
pub(crate) const DOCS_DIR: &str = "docs";
pub(crate) const LOCK_FILE: &str = "LOCK";

/// One row of the document table.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DocEntry {
    pub id: String,
    pub source: String,
    pub title: Option<String>,
    /// Hash of the document's content as loaded: unchanged hash = nothing to re-index.
    pub content_hash: String,
    #[serde(default)]
    pub metadata: serde_json::Map<String, serde_json::Value>,
    /// Where its chunks live; `None` for a document with no text (kept so that it is not
    /// re-processed on every run).
    pub segment: Option<String>,
    pub first_row: u32,
    pub rows: u32,
}

/// A collection directory. Cheap to construct; all state is on disk.
#[derive(Clone, Debug)]
pub struct Collection {
    dir: PathBuf,
}

impl Collection {
    /// A handle to an existing collection (checked by reading its manifest).
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self> {
        let dir = dir.into();
        Manifest::read(&dir)?;
        Ok(Collection { dir })
    }

    /// Opens the collection in `dir`, creating an empty one if the directory has no manifest.
    pub fn open_or_create(dir: impl Into<PathBuf>) -> Result<Self> {
        let dir = dir.into();
        if !dir.join(MANIFEST_FILE).exists() {
            std::fs::create_dir_all(&dir).map_err(|e| IndexError::io(&dir, e))?;
            for sub in [SEGMENTS_DIR, TOMBSTONES_DIR, DOCS_DIR] {
                let p = dir.join(sub);
                std::fs::create_dir_all(&p).map_err(|e| IndexError::io(&p, e))?;
            }
            // Two creators racing: the rename makes one of the empty manifests win, both valid.
            Manifest::empty().write(&dir)?;
        }
        Self::open(dir)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn manifest(&self) -> Result<Manifest> {
        Manifest::read(&self.dir)
    }

    /// The committed state as of now; unaffected by later commits.
    pub fn snapshot(&self) -> Result<Snapshot> {
        Snapshot::open(&self.dir)
    }

    /// Takes the writer lock (fails at once if another process holds it).
    pub fn writer(&self) -> Result<Writer> {
        Writer::open(&self.dir)
    }
}

#[cfg(test)]
mod ann_tests;
#[cfg(test)]
mod lexical_tests;
#[cfg(test)]
mod tests;
