//! The manifest: the one file that says what a collection contains.
//!
//! It is JSON (small, human-inspectable, diffable) and names every other file of the committed
//! state together with its length and CRC-32, so that truncation or corruption of any file is
//! detected when the collection is opened. Format changes bump [`FORMAT_VERSION`]; a reader
//! refuses a version it does not know rather than misreading it.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

pub use crate::exact::quantized::VectorPrecision;

use super::fsutil::{self, FileCheck};
use crate::error::{IndexError, Result};

pub const MANIFEST_FILE: &str = "MANIFEST";
pub const FORMAT_NAME: &str = "zrag-collection";
pub const FORMAT_VERSION: u32 = 1;

/// Which embedding model produced the stored vectors (E_D). Queries must be encoded by a
/// compatible E_Q, and new documents by the same E_D, or scores mean nothing.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EmbeddingInfo {
    pub name: String,
    /// Fingerprint of the weights (hex sha256 of the safetensors file).
    pub sha256: String,
    pub dim: usize,
}

impl EmbeddingInfo {
    pub fn describe(&self) -> String {
        // By characters: a corrupt manifest may hold anything here, and a byte slice could
        // cut a character in two.
        let short: String = self.sha256.chars().take(12).collect();
        format!("{}@{} ({} dims)", self.name, short, self.dim)
    }
}

/// One immutable segment: `rows` chunks with their vectors.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SegmentEntry {
    /// Directory name under `segments/`.
    pub id: String,
    pub rows: u32,
    /// File name (inside the segment directory) → check.
    pub files: BTreeMap<String, FileCheck>,
    /// Tombstone file (under `tombstones/`) listing deleted rows, if any row is deleted.
    pub tombstones: Option<NamedFile>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NamedFile {
    pub name: String,
    pub check: FileCheck,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub version: u32,
    /// Incremented by every commit.
    pub generation: u64,
    /// Source of the next segment id; never reused, so a crashed commit's leftovers cannot
    /// collide with a later segment.
    pub next_segment: u64,
    pub embedding: Option<EmbeddingInfo>,
    pub segments: Vec<SegmentEntry>,
    /// The document table (under `docs/`), absent while the collection is empty.
    pub documents: Option<NamedFile>,
    pub live_documents: u64,
    pub live_chunks: u64,
    /// The approximate-search index over the segments' vectors (absent in collections
    /// written before it existed, which then get the defaults).
    #[serde(default)]
    pub ann: AnnState,
    /// The precision exact search scans at: f32, or a compact f16 / int8 copy per segment
    /// whose shortlist is re-scored from the f32 rows.
    #[serde(default)]
    pub precision: VectorPrecision,
}

/// Settings and current graph of the HNSW index.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AnnState {
    /// Whether commits maintain a graph at all.
    pub enabled: bool,
    /// HNSW M (links per node; 2M on layer 0).
    pub m: usize,
    pub ef_construction: usize,
    /// Below this many live chunks exact search is fast enough and no graph is kept.
    pub min_rows: u64,
    /// The graph of the committed state, if one is kept.
    #[serde(default)]
    pub graph: Option<GraphFile>,
}

impl Default for AnnState {
    fn default() -> Self {
        AnnState {
            enabled: true,
            m: 16,
            ef_construction: 100,
            min_rows: 20_000,
            graph: None,
        }
    }
}

/// A graph file (under `ann/`) and the segments it covers: node ids number the rows of these
/// segments in this order, so segment `i`'s row `r` is node `sum(rows before i) + r`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GraphFile {
    pub file: NamedFile,
    pub segments: Vec<CoveredSegment>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CoveredSegment {
    pub id: String,
    pub rows: u32,
}

impl Manifest {
    pub fn empty() -> Self {
        Manifest {
            format: FORMAT_NAME.to_string(),
            version: FORMAT_VERSION,
            generation: 0,
            next_segment: 1,
            embedding: None,
            segments: Vec::new(),
            documents: None,
            live_documents: 0,
            live_chunks: 0,
            ann: AnnState::default(),
            precision: VectorPrecision::default(),
        }
    }

    /// Reads and validates `dir/MANIFEST`.
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join(MANIFEST_FILE);
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(IndexError::NotACollection {
                    path: dir.to_path_buf(),
                    reason: "no MANIFEST file (run `zrag index` to create one)".into(),
                })
            }
            Err(e) => return Err(IndexError::io(&path, e)),
        };
        Self::parse(&path, &bytes)
    }

    /// Parses manifest bytes; `path` only names the file in errors. Never panics on bad input.
    pub fn parse(path: &Path, bytes: &[u8]) -> Result<Self> {
        // Check the format marker and version before the full schema, so that a future version
        // gets a version error rather than a confusing field error.
        let value: serde_json::Value = serde_json::from_slice(bytes)
            .map_err(|e| IndexError::corrupt(path, format!("manifest is not valid JSON: {e}")))?;
        let format = value.get("format").and_then(|f| f.as_str());
        if format != Some(FORMAT_NAME) {
            return Err(IndexError::NotACollection {
                path: path.to_path_buf(),
                reason: format!("format field is {format:?}, expected {FORMAT_NAME:?}"),
            });
        }
        let version = value
            .get("version")
            .and_then(|v| v.as_u64())
            .ok_or_else(|| IndexError::corrupt(path, "manifest has no numeric version"))?;
        if version != u64::from(FORMAT_VERSION) {
            return Err(IndexError::UnsupportedVersion {
                path: path.to_path_buf(),
                found: version.min(u64::from(u32::MAX)) as u32,
                supported: FORMAT_VERSION,
            });
        }
        let manifest: Manifest = serde_json::from_value(value)
            .map_err(|e| IndexError::corrupt(path, format!("manifest schema: {e}")))?;
        manifest.validate(path)?;
        Ok(manifest)
    }

    /// Structural checks that do not need the other files.
    fn validate(&self, path: &Path) -> Result<()> {
        let safe_name = |name: &str| {
            !name.is_empty()
                && !name.contains('/')
                && !name.contains('\\')
                && name != "."
                && name != ".."
        };
        let mut seen = std::collections::HashSet::new();
        for segment in &self.segments {
            if !safe_name(&segment.id) || !seen.insert(segment.id.as_str()) {
                return Err(IndexError::corrupt(
                    path,
                    format!("invalid or duplicate segment id {:?}", segment.id),
                ));
            }
            for name in segment.files.keys() {
                if !safe_name(name) {
                    return Err(IndexError::corrupt(
                        path,
                        format!("invalid file name {name:?} in segment {}", segment.id),
                    ));
                }
            }
            if let Some(t) = &segment.tombstones {
                if !safe_name(&t.name) {
                    return Err(IndexError::corrupt(
                        path,
                        format!("invalid tombstone file name {:?}", t.name),
                    ));
                }
            }
        }
        if let Some(g) = &self.ann.graph {
            if !safe_name(&g.file.name) {
                return Err(IndexError::corrupt(
                    path,
                    format!("invalid graph file name {:?}", g.file.name),
                ));
            }
            let covered = g.segments.iter().map(|c| (c.id.as_str(), c.rows));
            let present = self.segments.iter().map(|s| (s.id.as_str(), s.rows));
            if g.segments.len() > self.segments.len() || !covered.eq(present.take(g.segments.len()))
            {
                return Err(IndexError::corrupt(
                    path,
                    "the HNSW graph covers segments that are not the manifest's first segments",
                ));
            }
        }
        if let Some(d) = &self.documents {
            if !safe_name(&d.name) {
                return Err(IndexError::corrupt(
                    path,
                    format!("invalid document table name {:?}", d.name),
                ));
            }
        }
        if let Some(e) = &self.embedding {
            if e.dim == 0 {
                return Err(IndexError::corrupt(path, "embedding dimension is 0"));
            }
        }
        Ok(())
    }

    /// Atomically replaces the manifest in `dir`: the commit point of every write.
    pub fn write(&self, dir: &Path) -> Result<()> {
        let bytes = serde_json::to_vec_pretty(self).expect("manifest serialises");
        fsutil::replace_file_atomically(&dir.join(MANIFEST_FILE), &bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn describe_does_not_split_a_character() {
        // A corrupt manifest may hold a multi-byte character across byte 12 of the hash.
        let info = EmbeddingInfo {
            name: "m".into(),
            sha256: "abcdefghijk\u{e9}xyz".into(),
            dim: 3,
        };
        assert_eq!(info.describe(), "m@abcdefghijk\u{e9} (3 dims)");
    }

    #[test]
    fn round_trips_and_rejects_other_versions() {
        let dir = tempfile::tempdir().unwrap();
        let mut m = Manifest::empty();
        m.embedding = Some(EmbeddingInfo {
            name: "mini".into(),
            sha256: "ab".repeat(32),
            dim: 4,
        });
        m.write(dir.path()).unwrap();
        assert_eq!(Manifest::read(dir.path()).unwrap(), m);

        let path = dir.path().join(MANIFEST_FILE);
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, text.replace("\"version\": 1", "\"version\": 7")).unwrap();
        match Manifest::read(dir.path()) {
            Err(IndexError::UnsupportedVersion { found: 7, .. }) => {}
            other => panic!("expected a version error, got {other:?}"),
        }
    }

    #[test]
    fn garbage_is_an_error_naming_the_file() {
        let path = Path::new("/x/MANIFEST");
        for bytes in [
            &b""[..],
            b"{",
            b"[]",
            b"{\"format\":\"zrag-collection\"}",
            b"\xff\xfe",
        ] {
            let err = Manifest::parse(path, bytes).unwrap_err();
            assert!(err.to_string().contains("/x/MANIFEST"), "{err}");
        }
    }

    #[test]
    fn path_traversal_in_names_is_rejected() {
        let mut m = Manifest::empty();
        m.segments.push(SegmentEntry {
            id: "../etc".into(),
            rows: 0,
            files: BTreeMap::new(),
            tombstones: None,
        });
        let bytes = serde_json::to_vec(&m).unwrap();
        assert!(Manifest::parse(Path::new("M"), &bytes).is_err());
    }
}
