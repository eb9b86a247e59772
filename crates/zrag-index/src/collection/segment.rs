//! One immutable segment: the chunks of a batch of documents and their vectors.
//!
//! Files inside `segments/<id>/`:
//! - `vectors.f32`: `rows × dim` little-endian f32, row-major; memory-mapped for search.
//! - `chunks.jsonl`: one [`StoredChunk`] per row, in row order.
//! - `chunks.offsets`: `rows + 1` little-endian u64 byte offsets into `chunks.jsonl`, so a
//!   hit's text is read without scanning.
//! - `vectors.f16` or `vectors.i8` (only when the collection's scan precision asks for it): the
//!   compact copy of the vectors that exact search scans before re-scoring a shortlist from
//!   `vectors.f32` (format in [`crate::exact::quantized`]).

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use serde::{Deserialize, Serialize};

use super::fsutil::{self, FileCheck};
use super::manifest::SegmentEntry;
use crate::error::{IndexError, Result};
use crate::exact::quantized::{self, QuantizedView, VectorPrecision};

#[cfg(not(target_endian = "little"))]
compile_error!("zrag's collection format stores little-endian f32 and is read by mmap; big-endian hosts are not supported");

pub const VECTORS_FILE: &str = "vectors.f32";
pub const CHUNKS_FILE: &str = "chunks.jsonl";
pub const OFFSETS_FILE: &str = "chunks.offsets";

/// The file holding a segment's vectors at `precision`, when that is not the f32 rows.
pub fn quantized_file(precision: VectorPrecision) -> Option<&'static str> {
    match precision {
        VectorPrecision::F32 => None,
        VectorPrecision::F16 => Some("vectors.f16"),
        VectorPrecision::Int8 => Some("vectors.i8"),
    }
}

/// Writes the compact copy of a segment's vectors that `precision` scans (nothing for f32)
/// and lists it in `entry`. A stale unlisted file of that name (from an earlier precision
/// change) is replaced: no manifest names it, so no snapshot reads it through the manifest.
pub fn write_quantized(
    segments_dir: &Path,
    entry: &mut SegmentEntry,
    precision: VectorPrecision,
    dim: usize,
    vectors: &[f32],
) -> Result<()> {
    let (Some(name), Some(bytes)) = (
        quantized_file(precision),
        quantized::encode(precision, vectors, dim),
    ) else {
        return Ok(());
    };
    let dir = segments_dir.join(&entry.id);
    let path = dir.join(name);
    if path.exists() {
        std::fs::remove_file(&path).map_err(|e| IndexError::io(&path, e))?;
    }
    let check = fsutil::write_new_file(&path, &bytes)?;
    fsutil::sync_dir(&dir)?;
    entry.files.insert(name.to_string(), check);
    Ok(())
}

/// A chunk as stored: its text and where it sits in its document.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredChunk {
    pub chunk_id: String,
    pub doc_id: String,
    pub ordinal: u32,
    pub text: String,
    pub start_byte: usize,
    pub end_byte: usize,
}

/// Writes a new segment directory and returns its manifest entry. Every file is fsynced, and
/// so is the directory, before this returns.
pub fn write_segment(
    segments_dir: &Path,
    id: &str,
    dim: usize,
    chunks: &[StoredChunk],
    vectors: &[f32],
    precision: VectorPrecision,
) -> Result<SegmentEntry> {
    debug_assert_eq!(chunks.len() * dim, vectors.len());
    let dir = segments_dir.join(id);
    std::fs::create_dir(&dir).map_err(|e| IndexError::io(&dir, e))?;

    let mut files = BTreeMap::new();
    let vector_bytes: Vec<u8> = vectors.iter().flat_map(|v| v.to_le_bytes()).collect();
    files.insert(
        VECTORS_FILE.to_string(),
        fsutil::write_new_file(&dir.join(VECTORS_FILE), &vector_bytes)?,
    );

    let mut jsonl = Vec::new();
    let mut offsets = Vec::with_capacity((chunks.len() + 1) * 8);
    for chunk in chunks {
        offsets.extend_from_slice(&(jsonl.len() as u64).to_le_bytes());
        serde_json::to_writer(&mut jsonl, chunk).expect("chunk serialises");
        jsonl.push(b'\n');
    }
    offsets.extend_from_slice(&(jsonl.len() as u64).to_le_bytes());
    files.insert(
        CHUNKS_FILE.to_string(),
        fsutil::write_new_file(&dir.join(CHUNKS_FILE), &jsonl)?,
    );
    files.insert(
        OFFSETS_FILE.to_string(),
        fsutil::write_new_file(&dir.join(OFFSETS_FILE), &offsets)?,
    );
    fsutil::sync_dir(&dir)?;
    let mut entry = SegmentEntry {
        id: id.to_string(),
        rows: chunks.len() as u32,
        files,
        tombstones: None,
    };
    write_quantized(segments_dir, &mut entry, precision, dim, vectors)?;
    fsutil::sync_dir(segments_dir)?;
    Ok(entry)
}

/// A segment opened for reading. The maps stay valid even if a later commit deletes the
/// files (Unix keeps unlinked, mapped files alive), which is what makes snapshots stable.
pub struct SegmentReader {
    pub id: String,
    pub rows: u32,
    dim: usize,
    dir: PathBuf,
    vectors: Option<Mmap>,
    /// The compact copy that exact search scans, at the collection's precision.
    quantized: Option<Mmap>,
    chunks: Option<Mmap>,
    offsets: Vec<u64>,
    /// Bit i set = row i is live. `None` = every row is live.
    pub live: Option<Vec<u64>>,
    pub live_rows: u32,
}

fn map_file(path: &Path, check: &FileCheck) -> Result<Option<Mmap>> {
    let file = File::open(path).map_err(|e| IndexError::io(path, e))?;
    let len = file.metadata().map_err(|e| IndexError::io(path, e))?.len();
    if len != check.len {
        return Err(IndexError::corrupt(
            path,
            format!(
                "length is {len} bytes, the manifest recorded {} (truncated or overwritten)",
                check.len
            ),
        ));
    }
    if len == 0 {
        // mmap of an empty file fails on some platforms; an empty segment file needs no map.
        check.verify(path, &[])?;
        return Ok(None);
    }
    // SAFETY: committed segment files are never modified in place (only created, then
    // unlinked), so the mapping cannot change under us.
    let map = unsafe { Mmap::map(&file) }.map_err(|e| IndexError::io(path, e))?;
    check.verify(path, &map)?;
    Ok(Some(map))
}

impl SegmentReader {
    /// Opens and verifies (length and CRC-32 of every file) a segment, with the compact copy
    /// of its vectors at `precision` when the segment has one.
    pub fn open(
        segments_dir: &Path,
        entry: &SegmentEntry,
        dim: usize,
        deleted_rows: &[u32],
        precision: VectorPrecision,
    ) -> Result<Self> {
        let dir = segments_dir.join(&entry.id);
        let check = |name: &str| {
            entry.files.get(name).ok_or_else(|| {
                IndexError::corrupt(
                    dir.join(name),
                    format!("segment {} lists no {name}", entry.id),
                )
            })
        };
        let vectors_path = dir.join(VECTORS_FILE);
        let vectors = map_file(&vectors_path, check(VECTORS_FILE)?)?;
        let expected = entry.rows as u64 * dim as u64 * 4;
        if check(VECTORS_FILE)?.len != expected {
            return Err(IndexError::corrupt(
                &vectors_path,
                format!(
                    "expected {} rows × {dim} f32 = {expected} bytes",
                    entry.rows
                ),
            ));
        }
        let quantized = match quantized_file(precision) {
            Some(name) if entry.files.contains_key(name) => {
                let path = dir.join(name);
                let map = map_file(&path, check(name)?)?;
                let view = map
                    .as_deref()
                    .map(QuantizedView::from_bytes)
                    .transpose()
                    .map_err(|e| IndexError::corrupt(&path, e.to_string()))?;
                if view.is_none_or(|v| v.rows() != entry.rows as usize || v.dim() != dim) {
                    return Err(IndexError::corrupt(
                        &path,
                        format!("does not hold {} rows × {dim}", entry.rows),
                    ));
                }
                map
            }
            _ => None,
        };
        let chunks_path = dir.join(CHUNKS_FILE);
        let chunks = map_file(&chunks_path, check(CHUNKS_FILE)?)?;
        let offsets_path = dir.join(OFFSETS_FILE);
        let offset_bytes = fsutil::read_file(&offsets_path)?;
        check(OFFSETS_FILE)?.verify(&offsets_path, &offset_bytes)?;
        if offset_bytes.len() != (entry.rows as usize + 1) * 8 {
            return Err(IndexError::corrupt(
                &offsets_path,
                format!("expected {} offsets", entry.rows + 1),
            ));
        }
        let offsets: Vec<u64> = offset_bytes
            .chunks_exact(8)
            .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
            .collect();
        let chunks_len = chunks.as_ref().map_or(0, |m| m.len() as u64);
        if offsets.windows(2).any(|w| w[0] > w[1]) || offsets.last() != Some(&chunks_len) {
            return Err(IndexError::corrupt(
                &offsets_path,
                "offsets are not increasing or do not end at the chunk file's length",
            ));
        }

        let (live, live_rows) = if deleted_rows.is_empty() {
            (None, entry.rows)
        } else {
            let mut bits = vec![u64::MAX; (entry.rows as usize).div_ceil(64)];
            if !entry.rows.is_multiple_of(64) {
                *bits.last_mut().expect("rows > 0") = (1u64 << (entry.rows % 64)) - 1;
            }
            let mut dead = 0;
            for &row in deleted_rows {
                if row >= entry.rows {
                    return Err(IndexError::corrupt(
                        &dir,
                        format!("tombstone for row {row} but the segment has {}", entry.rows),
                    ));
                }
                let (word, bit) = (row as usize / 64, row % 64);
                if bits[word] & (1 << bit) != 0 {
                    bits[word] &= !(1 << bit);
                    dead += 1;
                }
            }
            (Some(bits), entry.rows - dead)
        };
        Ok(SegmentReader {
            id: entry.id.clone(),
            rows: entry.rows,
            dim,
            dir,
            vectors,
            quantized,
            chunks,
            offsets,
            live,
            live_rows,
        })
    }

    /// The compact copy of the vectors, if the collection scans at f16 or int8.
    pub fn quantized(&self) -> Option<QuantizedView<'_>> {
        let map = self.quantized.as_ref()?;
        Some(QuantizedView::from_bytes(map).expect("validated on open"))
    }

    /// Row-major `rows × dim` vectors.
    pub fn vectors(&self) -> &[f32] {
        match &self.vectors {
            None => &[],
            Some(map) => {
                // SAFETY: the length was checked to be rows·dim·4 on open; mmap returns
                // page-aligned memory, so the f32 alignment holds; the format is little-endian
                // and so is the host (compile-time check above).
                unsafe {
                    std::slice::from_raw_parts(
                        map.as_ptr() as *const f32,
                        self.rows as usize * self.dim,
                    )
                }
            }
        }
    }

    pub fn is_live(&self, row: u32) -> bool {
        match &self.live {
            None => row < self.rows,
            Some(bits) => bits
                .get(row as usize / 64)
                .is_some_and(|w| w & (1 << (row % 64)) != 0),
        }
    }

    /// Reads one chunk record.
    pub fn chunk(&self, row: u32) -> Result<StoredChunk> {
        let path = self.dir.join(CHUNKS_FILE);
        let (start, end) = match (
            self.offsets.get(row as usize),
            self.offsets.get(row as usize + 1),
        ) {
            (Some(&s), Some(&e)) => (s as usize, e as usize),
            _ => {
                return Err(IndexError::corrupt(
                    &path,
                    format!("row {row} out of range ({} rows)", self.rows),
                ))
            }
        };
        let bytes = self.chunks.as_ref().map_or(&[][..], |m| &m[..]);
        serde_json::from_slice(&bytes[start..end])
            .map_err(|e| IndexError::corrupt(&path, format!("row {row}: {e}")))
    }
}
