//! The graph on disk: a 64-byte header and the flat arrays of [`Hnsw`], little-endian, each
//! array 4-byte aligned so that a memory map can be searched in place.
//!
//! ```text
//! 0   magic "ZRAGHNSW"          8   version u32         12  m u32
//! 16  m0 u32                    20  ef_construction u32  24  nodes u64
//! 32  upper lists u64           40  entry u32 (MAX: none) 44 entry level u32
//! 48  seed u64                  56  reserved
//! 64  levels: nodes × u8, zero-padded to a multiple of 4
//!     layer0: nodes × (1 + m0) u32      upper_offset: nodes × u32
//!     upper: lists × (1 + m) u32
//! ```
//!
//! Opening checks the structure completely (sizes, counts within capacity, every id below
//! the node count, upper lists in range), so a damaged file is an error naming it, never an
//! out-of-bounds read later.

use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use super::search::GraphView;
use super::{Hnsw, HnswParams, NO_UPPER, SKIPPED};
use crate::error::{IndexError, Result};

const MAGIC: &[u8; 8] = b"ZRAGHNSW";
const VERSION: u32 = 1;
const HEADER: usize = 64;
const NO_ENTRY: u32 = u32::MAX;

fn padded(len: usize) -> usize {
    len.div_ceil(4) * 4
}

impl Hnsw {
    /// The file image of this graph.
    pub fn to_bytes(&self) -> Vec<u8> {
        let p = &self.params;
        let n = self.levels.len();
        let lists = self.upper.len() / (1 + p.m);
        let mut out =
            Vec::with_capacity(HEADER + padded(n) + 4 * (self.layer0.len() + n + self.upper.len()));
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&(p.m as u32).to_le_bytes());
        out.extend_from_slice(&(p.m0() as u32).to_le_bytes());
        out.extend_from_slice(&(p.ef_construction as u32).to_le_bytes());
        out.extend_from_slice(&(n as u64).to_le_bytes());
        out.extend_from_slice(&(lists as u64).to_le_bytes());
        out.extend_from_slice(&self.entry.unwrap_or(NO_ENTRY).to_le_bytes());
        let entry_level = self.entry.map_or(0, |e| u32::from(self.levels[e as usize]));
        out.extend_from_slice(&entry_level.to_le_bytes());
        out.extend_from_slice(&p.seed.to_le_bytes());
        out.resize(HEADER, 0);
        out.extend_from_slice(&self.levels);
        out.resize(HEADER + padded(n), 0);
        for array in [&self.layer0, &self.upper_offset, &self.upper] {
            for v in array.iter() {
                out.extend_from_slice(&v.to_le_bytes());
            }
        }
        out
    }

    /// Reads a file image (copying it into memory, e.g. to extend the graph).
    pub fn from_bytes(bytes: &[u8], path: &Path) -> Result<Hnsw> {
        // The arrays are read as u32 in place, which needs 4-byte alignment: copy into a
        // buffer that has it.
        let mut aligned = vec![0u32; bytes.len().div_ceil(4)];
        // SAFETY: the u32 buffer is at least `bytes.len()` bytes long and any bytes are valid.
        let buffer: &mut [u8] = unsafe {
            std::slice::from_raw_parts_mut(aligned.as_mut_ptr().cast::<u8>(), bytes.len())
        };
        buffer.copy_from_slice(bytes);
        let bytes: &[u8] = buffer;
        let layout = Layout::parse(bytes, path)?;
        let words = |r: std::ops::Range<usize>| -> Vec<u32> {
            bytes[r]
                .chunks_exact(4)
                .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")))
                .collect()
        };
        Ok(Hnsw {
            params: layout.params,
            levels: bytes[layout.levels.clone()].to_vec(),
            layer0: words(layout.layer0.clone()),
            upper_offset: words(layout.upper_offset.clone()),
            upper: words(layout.upper.clone()),
            entry: layout.entry,
        })
    }
}

/// Where each array sits in a validated file image.
#[derive(Clone, Debug)]
struct Layout {
    params: HnswParams,
    entry: Option<u32>,
    levels: std::ops::Range<usize>,
    layer0: std::ops::Range<usize>,
    upper_offset: std::ops::Range<usize>,
    upper: std::ops::Range<usize>,
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"))
}

/// Reinterprets 4-byte-aligned little-endian bytes as `u32`s without copying.
fn as_words(bytes: &[u8]) -> &[u32] {
    // SAFETY: u32 has no invalid bit patterns; `align_to` only yields the aligned middle,
    // and the callers' ranges are multiples of 4 starting at 4-aligned offsets of a
    // page-aligned map or a `Vec<u8>` checked below.
    let (head, words, tail) = unsafe { bytes.align_to::<u32>() };
    assert!(
        head.is_empty() && tail.is_empty(),
        "HNSW arrays must be 4-byte aligned"
    );
    words
}

impl Layout {
    fn parse(bytes: &[u8], path: &Path) -> Result<Layout> {
        let corrupt = |what: String| IndexError::corrupt(path, what);
        if bytes.len() < HEADER || &bytes[..8] != MAGIC {
            return Err(corrupt(
                "not a zrag HNSW file (bad magic or too short)".into(),
            ));
        }
        let version = u32_at(bytes, 8);
        if version != VERSION {
            return Err(corrupt(format!(
                "HNSW file version {version}, this build reads version {VERSION}"
            )));
        }
        let m = u32_at(bytes, 12) as usize;
        let m0 = u32_at(bytes, 16) as usize;
        let ef_construction = u32_at(bytes, 20) as usize;
        let n = u64_at(bytes, 24);
        let lists = u64_at(bytes, 32);
        let entry = u32_at(bytes, 40);
        let entry_level = u32_at(bytes, 44);
        let seed = u64_at(bytes, 48);
        if !(2..=128).contains(&m) || m0 != 2 * m || ef_construction == 0 {
            return Err(corrupt(format!(
                "bad parameters m {m}, m0 {m0}, ef_construction {ef_construction}"
            )));
        }
        if n >= u64::from(u32::MAX) || lists > (1 << 40) {
            return Err(corrupt(format!(
                "implausible sizes: {n} nodes, {lists} lists"
            )));
        }
        let (n, lists) = (n as usize, lists as usize);
        let levels = HEADER..HEADER + n;
        let layer0 = HEADER + padded(n)..HEADER + padded(n) + 4 * n * (1 + m0);
        let upper_offset = layer0.end..layer0.end + 4 * n;
        let upper = upper_offset.end..upper_offset.end + 4 * lists * (1 + m);
        if bytes.len() != upper.end {
            return Err(corrupt(format!(
                "length is {} bytes, the header implies {} (truncated or damaged)",
                bytes.len(),
                upper.end
            )));
        }
        let entry = (entry != NO_ENTRY).then_some(entry);
        let layout = Layout {
            params: HnswParams {
                m,
                ef_construction,
                seed,
            },
            entry,
            levels,
            layer0,
            upper_offset,
            upper,
        };
        layout.validate(bytes, entry_level, path)?;
        Ok(layout)
    }

    /// Every invariant the search relies on, checked once so that searching cannot index
    /// out of bounds.
    fn validate(&self, bytes: &[u8], entry_level: u32, path: &Path) -> Result<()> {
        let corrupt = |what: String| Err(IndexError::corrupt(path, what));
        let (m, m0) = (self.params.m, self.params.m0());
        let levels = &bytes[self.levels.clone()];
        let layer0 = as_words(&bytes[self.layer0.clone()]);
        let offsets = as_words(&bytes[self.upper_offset.clone()]);
        let upper = as_words(&bytes[self.upper.clone()]);
        let n = levels.len();
        let lists = upper.len() / (1 + m);
        match self.entry {
            // A skipped entry point has no lists: the search would descend from level 255.
            Some(e)
                if (e as usize) >= n
                    || levels[e as usize] == SKIPPED
                    || u32::from(levels[e as usize]) != entry_level =>
            {
                return corrupt(format!(
                    "entry point {e} out of range, not linked, or at the wrong level"
                ));
            }
            None if n > 0 && levels.iter().any(|&l| l != SKIPPED) => {
                return corrupt("linked nodes but no entry point".into());
            }
            _ => {}
        }
        let check_list = |list: &[u32], cap: usize, what: &str| -> Result<()> {
            let count = list[0] as usize;
            if count > cap || list[1..1 + count].iter().any(|&id| id as usize >= n) {
                return Err(IndexError::corrupt(
                    path,
                    format!("{what}: link count or id out of range"),
                ));
            }
            Ok(())
        };
        for (node, list) in layer0.chunks_exact(1 + m0).enumerate() {
            check_list(list, m0, &format!("node {node} layer 0"))?;
        }
        // The writer gives each node its own upper lists, in node order; shared lists would
        // pass the checks below but break the graph when it is extended (a link added to one
        // node's layer-L list would appear in another node's list of a different layer).
        let mut next_list = 0usize;
        for (node, (&level, &first)) in levels.iter().zip(offsets).enumerate() {
            let upper_layers = if level == SKIPPED { 0 } else { level as usize };
            if upper_layers == 0 {
                if first != NO_UPPER {
                    return corrupt(format!("node {node} has upper lists but level 0"));
                }
                continue;
            }
            if first == NO_UPPER
                || first as usize != next_list
                || first as usize + upper_layers > lists
            {
                return corrupt(format!(
                    "node {node}: upper lists out of range or not in node order"
                ));
            }
            next_list += upper_layers;
            for layer in 1..=upper_layers {
                let base = (first as usize + layer - 1) * (1 + m);
                let list = &upper[base..base + 1 + m];
                check_list(list, m, &format!("node {node} layer {layer}"))?;
                // Searching layer L follows links into the targets' layer-L lists.
                let count = list[0] as usize;
                if list[1..1 + count].iter().any(|&id| {
                    let l = levels[id as usize];
                    l == SKIPPED || (l as usize) < layer
                }) {
                    return corrupt(format!(
                        "node {node} layer {layer}: link to a node without that layer"
                    ));
                }
            }
        }
        Ok(())
    }

    fn view<'a>(&self, bytes: &'a [u8]) -> GraphView<'a> {
        GraphView::new(
            self.params,
            &bytes[self.levels.clone()],
            as_words(&bytes[self.layer0.clone()]),
            as_words(&bytes[self.upper_offset.clone()]),
            as_words(&bytes[self.upper.clone()]),
            self.entry,
        )
    }
}

/// A graph file, memory-mapped and validated; searched in place through [`HnswFile::view`].
pub struct HnswFile {
    path: PathBuf,
    map: Mmap,
    layout: Layout,
}

impl std::fmt::Debug for HnswFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HnswFile")
            .field("path", &self.path)
            .field("nodes", &self.layout.levels.len())
            .finish()
    }
}

impl HnswFile {
    /// Maps and validates `path`. `verify` is run on the mapped bytes first (the collection
    /// checks length and CRC-32 there).
    pub fn open(path: &Path, verify: impl FnOnce(&[u8]) -> Result<()>) -> Result<HnswFile> {
        let file = File::open(path).map_err(|e| IndexError::io(path, e))?;
        // SAFETY: graph files are written once under a new name and never modified in place
        // (the collection's commit protocol), so the mapping cannot change under us.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| IndexError::io(path, e))?;
        verify(&map)?;
        let layout = Layout::parse(&map, path)?;
        Ok(HnswFile {
            path: path.to_path_buf(),
            map,
            layout,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn params(&self) -> HnswParams {
        self.layout.params
    }

    pub fn view(&self) -> GraphView<'_> {
        self.layout.view(&self.map)
    }

    /// Number of node ids in the graph.
    pub fn len(&self) -> usize {
        self.layout.levels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.layout.levels.is_empty()
    }

    /// An in-memory copy, to extend with new nodes.
    pub fn to_graph(&self) -> Result<Hnsw> {
        Hnsw::from_bytes(&self.map, &self.path)
    }

    /// Bytes of the file.
    pub fn size_bytes(&self) -> usize {
        self.map.len()
    }
}
