//! Searching a graph: greedy descent through the upper layers, then a beam of width `ef` on
//! layer 0. The same routines serve queries (over a frozen [`GraphView`]) and construction
//! (over the builder's atomic link lists), through the [`LinkSource`] trait.

use std::cell::RefCell;
use std::cmp::Ordering;
use std::collections::BinaryHeap;

use super::{HnswParams, Vectors, NO_UPPER, SKIPPED};
use crate::exact::{dot_fn, Hit};

/// A candidate: a node and its similarity to the query.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Scored {
    pub similarity: f32,
    pub node: u32,
}

impl Eq for Scored {}

impl Ord for Scored {
    fn cmp(&self, other: &Self) -> Ordering {
        self.similarity
            .total_cmp(&other.similarity)
            .then_with(|| other.node.cmp(&self.node))
    }
}

impl PartialOrd for Scored {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// Read access to neighbour lists. `with_neighbors` lends the list to a closure so that a
/// frozen graph hands out its slice directly and the builder copies its atomics once.
pub(crate) trait LinkSource: Sync {
    fn with_neighbors<R>(&self, node: u32, layer: usize, f: impl FnOnce(&[u32]) -> R) -> R;
    /// Hints that `node`'s list on `layer` is read next.
    fn prefetch_links(&self, _node: u32, _layer: usize) {}
}

/// A borrowed graph in the flat layout shared by [`super::Hnsw`] and [`super::HnswFile`].
#[derive(Clone, Copy, Debug)]
pub struct GraphView<'a> {
    m: usize,
    m0: usize,
    levels: &'a [u8],
    layer0: &'a [u32],
    upper_offset: &'a [u32],
    upper: &'a [u32],
    entry: Option<u32>,
}

impl<'a> GraphView<'a> {
    pub(crate) fn new(
        params: HnswParams,
        levels: &'a [u8],
        layer0: &'a [u32],
        upper_offset: &'a [u32],
        upper: &'a [u32],
        entry: Option<u32>,
    ) -> Self {
        GraphView {
            m: params.m,
            m0: params.m0(),
            levels,
            layer0,
            upper_offset,
            upper,
            entry,
        }
    }

    /// Number of node ids.
    pub fn len(&self) -> usize {
        self.levels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.levels.is_empty()
    }

    /// Whether `node` is linked into the graph (rather than skipped at build time).
    pub fn is_linked(&self, node: u32) -> bool {
        self.levels
            .get(node as usize)
            .is_some_and(|&l| l != SKIPPED)
    }

    #[inline]
    fn neighbors(&self, node: u32, layer: usize) -> &'a [u32] {
        if layer == 0 {
            let base = node as usize * (1 + self.m0);
            let count = self.layer0[base] as usize;
            &self.layer0[base + 1..base + 1 + count]
        } else {
            let first = self.upper_offset[node as usize];
            debug_assert_ne!(first, NO_UPPER);
            let base = (first as usize + layer - 1) * (1 + self.m);
            let count = self.upper[base] as usize;
            &self.upper[base + 1..base + 1 + count]
        }
    }

    /// The (approximate) top `k` nodes by inner product with `query`, best first, among the
    /// nodes `allow` accepts (all when `None`). Rejected nodes are still walked through, so a
    /// filter or deletions do not disconnect the graph; `ef` (at least `k`) is the beam width.
    pub fn search<V: Vectors>(
        &self,
        vectors: &V,
        query: &[f32],
        k: usize,
        ef: usize,
        allow: Option<&(dyn Fn(u32) -> bool + Sync)>,
    ) -> Vec<Hit> {
        assert_eq!(query.len(), vectors.dim(), "HNSW search: wrong dimension");
        let Some(entry) = self.entry else {
            return Vec::new();
        };
        if k == 0 {
            return Vec::new();
        }
        let dot = dot_fn();
        let mut current = Scored {
            similarity: dot(query, vectors.vector(entry)),
            node: entry,
        };
        for layer in (1..=usize::from(self.levels[entry as usize])).rev() {
            current = greedy(self, vectors, dot, query, current, layer);
        }
        let found = with_visited(self.len(), |visited| {
            search_layer(
                self,
                vectors,
                dot,
                query,
                &[current],
                ef.max(k),
                0,
                visited,
                allow,
            )
        });
        found
            .into_iter()
            .take(k)
            .map(|s| Hit {
                row: s.node,
                score: s.similarity,
            })
            .collect()
    }
}

impl LinkSource for GraphView<'_> {
    #[inline]
    fn with_neighbors<R>(&self, node: u32, layer: usize, f: impl FnOnce(&[u32]) -> R) -> R {
        f(self.neighbors(node, layer))
    }

    #[inline]
    fn prefetch_links(&self, node: u32, layer: usize) {
        if layer == 0 {
            let base = node as usize * (1 + self.m0);
            prefetch(&self.layer0[base..base + 1 + self.m0]);
        }
    }
}

/// Visited marks by epoch: clearing is a counter increment, not a pass over n entries.
pub(crate) struct Visited {
    marks: Vec<u16>,
    epoch: u16,
}

impl Visited {
    fn reset(&mut self, n: usize) {
        if self.marks.len() < n {
            self.marks.resize(n, 0);
        }
        self.epoch = self.epoch.wrapping_add(1);
        if self.epoch == 0 {
            self.marks.fill(0);
            self.epoch = 1;
        }
    }

    /// Marks `node`; true if it was not marked yet.
    #[inline]
    fn insert(&mut self, node: u32) -> bool {
        let mark = &mut self.marks[node as usize];
        let fresh = *mark != self.epoch;
        *mark = self.epoch;
        fresh
    }
}

thread_local! {
    static VISITED: RefCell<Visited> = const { RefCell::new(Visited { marks: Vec::new(), epoch: 0 }) };
}

/// Runs `f` with this thread's visited set, reset for `n` nodes.
pub(crate) fn with_visited<R>(n: usize, f: impl FnOnce(&mut Visited) -> R) -> R {
    VISITED.with(|cell| match cell.try_borrow_mut() {
        Ok(mut visited) => {
            visited.reset(n);
            f(&mut visited)
        }
        // Re-entered on this thread (a nested search): use a fresh set.
        Err(_) => {
            let mut visited = Visited {
                marks: Vec::new(),
                epoch: 0,
            };
            visited.reset(n);
            f(&mut visited)
        }
    })
}

/// Cache lines of a row prefetched ahead of its dot product: the start of the row (the
/// hardware prefetcher continues a row once it is being read; prefetching all 24 lines of a
/// 384-d row measured no better).
const PREFETCH_LINES: usize = 2;

#[inline]
fn prefetch<T>(data: &[T]) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: prefetching is a hint and never faults; the pointers are inside the slice.
    unsafe {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        let p = data.as_ptr() as *const i8;
        for line in 0..std::mem::size_of_val(data).div_ceil(64).min(PREFETCH_LINES) {
            _mm_prefetch::<_MM_HINT_T0>(p.add(64 * line));
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = data;
}

/// Hill-climbing on one layer: move to the best neighbour until none is better.
pub(crate) fn greedy<L: LinkSource, V: Vectors>(
    links: &L,
    vectors: &V,
    dot: fn(&[f32], &[f32]) -> f32,
    query: &[f32],
    mut current: Scored,
    layer: usize,
) -> Scored {
    loop {
        let best = links.with_neighbors(current.node, layer, |neighbors| {
            let mut best = current;
            for &n in neighbors {
                let similarity = dot(query, vectors.vector(n));
                if similarity > best.similarity {
                    best = Scored {
                        similarity,
                        node: n,
                    };
                }
            }
            best
        });
        if best.node == current.node {
            return current;
        }
        current = best;
    }
}

/// Beam search on one layer (Algorithm 2); returns up to `ef` accepted nodes, best first.
#[allow(clippy::too_many_arguments)]
pub(crate) fn search_layer<L: LinkSource, V: Vectors>(
    links: &L,
    vectors: &V,
    dot: fn(&[f32], &[f32]) -> f32,
    query: &[f32],
    entry_points: &[Scored],
    ef: usize,
    layer: usize,
    visited: &mut Visited,
    allow: Option<&(dyn Fn(u32) -> bool + Sync)>,
) -> Vec<Scored> {
    let accepts = |node: u32| allow.is_none_or(|allow| allow(node));
    // Max-heap of candidates to expand; min-heap (via Reverse) of the best `ef` accepted.
    // Each node enters each heap at most once, so the node count bounds the capacities too:
    // `ef` can be anything (a query's, or the `ef_construction` of a graph file), and
    // reserving `2 ef` entries for `ef` near 2^31 aborts on allocation failure.
    let nodes = vectors.len();
    let mut to_expand: BinaryHeap<Scored> =
        BinaryHeap::with_capacity(ef.saturating_mul(2).min(nodes));
    let mut best: BinaryHeap<std::cmp::Reverse<Scored>> =
        BinaryHeap::with_capacity(ef.min(nodes).saturating_add(1));
    for &e in entry_points {
        if visited.insert(e.node) {
            to_expand.push(e);
            if accepts(e.node) {
                best.push(std::cmp::Reverse(e));
                if best.len() > ef {
                    best.pop();
                }
            }
        }
    }
    let mut fresh = [0u32; 256];
    while let Some(c) = to_expand.pop() {
        let worst = best.peek().map_or(f32::NEG_INFINITY, |w| w.0.similarity);
        if best.len() >= ef && c.similarity < worst {
            break;
        }
        // The links live apart from the vectors (which belong to the segments), so fetch
        // the next candidate's list while this one is being expanded.
        if let Some(next) = to_expand.peek() {
            links.prefetch_links(next.node, layer);
        }
        // Mark and collect the unvisited neighbours first, prefetching their vectors, so
        // the memory loads overlap instead of each dot product waiting for its row.
        let n_fresh = links.with_neighbors(c.node, layer, |neighbors| {
            let mut n_fresh = 0;
            for &n in neighbors.iter().take(fresh.len()) {
                if visited.insert(n) {
                    prefetch(vectors.vector(n));
                    fresh[n_fresh] = n;
                    n_fresh += 1;
                }
            }
            n_fresh
        });
        for &n in &fresh[..n_fresh] {
            let similarity = dot(query, vectors.vector(n));
            let worst = best.peek().map_or(f32::NEG_INFINITY, |w| w.0.similarity);
            if best.len() < ef || similarity > worst {
                let s = Scored {
                    similarity,
                    node: n,
                };
                to_expand.push(s);
                if accepts(n) {
                    best.push(std::cmp::Reverse(s));
                    if best.len() > ef {
                        best.pop();
                    }
                }
            }
        }
    }
    let mut out: Vec<Scored> = best.into_iter().map(|r| r.0).collect();
    out.sort_unstable_by(|a, b| b.cmp(a));
    out
}

#[cfg(test)]
impl GraphView<'_> {
    pub(crate) fn neighbors_for_test(&self, node: u32, layer: usize) -> &[u32] {
        self.neighbors(node, layer)
    }
}
