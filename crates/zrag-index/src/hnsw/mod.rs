//! HNSW (Malkov & Yashunin 2018) for maximum inner product over L2-normalised vectors: a
//! layered proximity graph searched greedily from the top layer down.
//!
//! The graph holds links only; vectors come from a [`Vectors`] source (a flat array, or the
//! rows of a collection's memory-mapped segments), so persisting the graph costs 4 bytes per
//! link rather than a second copy of every vector. It is built by many threads at once
//! ([`Hnsw::build`]), grown in place by later inserts ([`Hnsw::extend`]), written as flat
//! arrays ([`Hnsw::to_bytes`]) and searched straight from a memory map ([`HnswFile`]).
//! Deleted rows stay in the graph as waypoints and are kept out of results by the `allow`
//! predicate of [`GraphView::search`], as hnswlib's `markDelete` does; the collection rebuilds
//! the graph when too many rows are dead.
//!
//! Similarity is the inner product (what zrag's normalised embeddings are compared by), so
//! "closer" means a larger dot product throughout.

mod build;
mod file;
mod search;

pub use file::HnswFile;
pub use search::GraphView;

use crate::exact::Hit;

/// Construction parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HnswParams {
    /// Links chosen per node and the cap on upper layers (twice this on layer 0).
    pub m: usize,
    /// Candidate list size while inserting.
    pub ef_construction: usize,
    /// Seed of the level draws. A node's level depends only on the seed and its id, so a
    /// one-thread build is fully deterministic.
    pub seed: u64,
}

impl Default for HnswParams {
    fn default() -> Self {
        HnswParams {
            m: 16,
            ef_construction: 100,
            seed: 0x5eed,
        }
    }
}

impl HnswParams {
    /// Link capacity on layer 0.
    pub fn m0(&self) -> usize {
        2 * self.m
    }

    /// Links capacity on `layer`.
    pub fn capacity(&self, layer: usize) -> usize {
        if layer == 0 {
            self.m0()
        } else {
            self.m
        }
    }

    /// Level of `node`: floor(−ln U / ln m), the paper's exponential decay, with U drawn by
    /// hashing (seed, node) so that the draw does not depend on insertion order or threads.
    pub(crate) fn level_of(&self, node: u32) -> u8 {
        let mut z = self.seed ^ u64::from(node).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        let uniform = ((z >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
        let level = (-uniform.ln() / (self.m as f64).ln()).floor();
        level.min(f64::from(MAX_LEVEL)) as u8
    }
}

/// Levels are capped so that a level fits a byte; with m ≥ 2 the chance of reaching it is
/// 2^-32 per node.
const MAX_LEVEL: u8 = 32;

/// Vector access by node id.
pub trait Vectors: Sync {
    fn dim(&self) -> usize;
    /// Number of nodes that have a vector.
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    fn vector(&self, node: u32) -> &[f32];
}

/// Row-major vectors in one slice; node `i` is row `i`.
#[derive(Clone, Copy, Debug)]
pub struct FlatVectors<'a> {
    data: &'a [f32],
    dim: usize,
}

impl<'a> FlatVectors<'a> {
    /// # Panics
    /// If `dim` is zero or does not divide `data.len()`.
    pub fn new(data: &'a [f32], dim: usize) -> Self {
        assert!(
            dim > 0 && data.len().is_multiple_of(dim),
            "FlatVectors: bad shape"
        );
        FlatVectors { data, dim }
    }
}

impl Vectors for FlatVectors<'_> {
    fn dim(&self) -> usize {
        self.dim
    }
    fn len(&self) -> usize {
        self.data.len() / self.dim
    }
    #[inline]
    fn vector(&self, node: u32) -> &[f32] {
        let start = node as usize * self.dim;
        &self.data[start..start + self.dim]
    }
}

/// One slice per node, e.g. rows gathered from several memory-mapped segments.
#[derive(Clone, Debug, Default)]
pub struct RowVectors<'a> {
    rows: Vec<&'a [f32]>,
    dim: usize,
}

impl<'a> RowVectors<'a> {
    pub fn new(dim: usize) -> Self {
        RowVectors {
            rows: Vec::new(),
            dim,
        }
    }

    /// Appends the rows of a row-major block as the next nodes.
    ///
    /// # Panics
    /// If `block.len()` is not a multiple of the dimension.
    pub fn extend_from_block(&mut self, block: &'a [f32]) {
        assert!(
            block.len().is_multiple_of(self.dim),
            "RowVectors: bad block"
        );
        self.rows.extend(block.chunks_exact(self.dim));
    }
}

impl Vectors for RowVectors<'_> {
    fn dim(&self) -> usize {
        self.dim
    }
    fn len(&self) -> usize {
        self.rows.len()
    }
    #[inline]
    fn vector(&self, node: u32) -> &[f32] {
        self.rows[node as usize]
    }
}

/// An HNSW graph in memory, as flat arrays (the same layout as the file).
#[derive(Clone, Debug, PartialEq)]
pub struct Hnsw {
    params: HnswParams,
    /// Level of each node; `u8::MAX` marks a node that was skipped (never linked).
    levels: Vec<u8>,
    /// `n × (1 + m0)`: a count, then that many neighbour ids.
    layer0: Vec<u32>,
    /// Per node, the index of its layer-1 list in `upper` (lists of `1 + m`), or `NO_UPPER`.
    upper_offset: Vec<u32>,
    upper: Vec<u32>,
    entry: Option<u32>,
}

/// `upper_offset` of a node with no upper layers.
pub(crate) const NO_UPPER: u32 = u32::MAX;
/// `levels` value of a node that is not in the graph (a row dead when the graph was built).
pub(crate) const SKIPPED: u8 = u8::MAX;

impl Hnsw {
    /// An empty graph.
    pub fn new(params: HnswParams) -> Self {
        assert!((2..=128).contains(&params.m), "HNSW needs 2 <= m <= 128");
        assert!(
            params.ef_construction >= 1,
            "HNSW needs ef_construction >= 1"
        );
        Hnsw {
            params,
            levels: Vec::new(),
            layer0: Vec::new(),
            upper_offset: Vec::new(),
            upper: Vec::new(),
            entry: None,
        }
    }

    /// Builds the graph over every vector, inserting with `threads` threads (0 = all cores).
    pub fn build<V: Vectors>(vectors: &V, params: HnswParams, threads: usize) -> Self {
        let mut graph = Hnsw::new(params);
        graph.extend(vectors, threads, &|_| false, None);
        graph
    }

    /// Inserts the nodes `self.len()..vectors.len()`, leaving out those for which `skip`
    /// holds (they keep an id but no links, so that ids stay row numbers). `progress` is
    /// called with the number of nodes inserted so far, from time to time.
    pub fn extend<V: Vectors>(
        &mut self,
        vectors: &V,
        threads: usize,
        skip: &(dyn Fn(u32) -> bool + Sync),
        progress: Option<&(dyn Fn(usize) + Sync)>,
    ) {
        build::extend(self, vectors, threads, skip, progress);
    }

    pub fn params(&self) -> &HnswParams {
        &self.params
    }

    /// Number of node ids (linked or skipped).
    pub fn len(&self) -> usize {
        self.levels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.levels.is_empty()
    }

    /// Nodes that are linked into the graph.
    pub fn linked(&self) -> usize {
        self.levels.iter().filter(|&&l| l != SKIPPED).count()
    }

    pub fn view(&self) -> GraphView<'_> {
        GraphView::new(
            self.params,
            &self.levels,
            &self.layer0,
            &self.upper_offset,
            &self.upper,
            self.entry,
        )
    }

    /// The (approximate) top `k` nodes by inner product with `query`, best first; `ef` (at
    /// least `k` is used) trades speed for recall.
    pub fn search<V: Vectors>(&self, vectors: &V, query: &[f32], k: usize, ef: usize) -> Vec<Hit> {
        self.view().search(vectors, query, k, ef, None)
    }

    /// Bytes of the in-memory graph (links and per-node bookkeeping; vectors excluded).
    pub fn memory_bytes(&self) -> usize {
        self.levels.len() + 4 * (self.layer0.len() + self.upper_offset.len() + self.upper.len())
    }
}

#[cfg(test)]
mod tests;
