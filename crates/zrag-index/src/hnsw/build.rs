//! Construction by parallel insertion, as hnswlib does it: each thread takes the next node
//! id and inserts it; a node's own list and each neighbour's list are changed under that
//! node's lock, while searches read lists without locks (atomic loads, so a reader may see
//! a list mid-update, but every id in it is a valid node). Only a node that raises the top
//! level holds the global entry lock for its whole insertion.

use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::Mutex;

use super::search::{greedy, search_layer, with_visited, LinkSource, Scored};
use super::{Hnsw, HnswParams, Vectors, NO_UPPER, SKIPPED};
use crate::exact::dot_fn;

struct Builder<'a, V> {
    params: HnswParams,
    vectors: &'a V,
    dot: fn(&[f32], &[f32]) -> f32,
    levels: Vec<u8>,
    layer0: Vec<AtomicU32>,
    upper_offset: Vec<u32>,
    upper: Vec<AtomicU32>,
    locks: Vec<Mutex<()>>,
    /// Entry point and its level.
    top: Mutex<(Option<u32>, u8)>,
}

impl<V: Vectors> LinkSource for Builder<'_, V> {
    #[inline]
    fn with_neighbors<R>(&self, node: u32, layer: usize, f: impl FnOnce(&[u32]) -> R) -> R {
        let list = self.list(node, layer);
        let count = (list[0].load(Ordering::Acquire) as usize).min(list.len() - 1);
        let mut buf = [0u32; 257];
        for (slot, id) in buf[..count].iter_mut().zip(&list[1..]) {
            *slot = id.load(Ordering::Relaxed);
        }
        f(&buf[..count])
    }
}

impl<V: Vectors> Builder<'_, V> {
    /// The count slot followed by the capacity of id slots.
    fn list(&self, node: u32, layer: usize) -> &[AtomicU32] {
        if layer == 0 {
            let width = 1 + self.params.m0();
            let base = node as usize * width;
            &self.layer0[base..base + width]
        } else {
            let width = 1 + self.params.m;
            let first = self.upper_offset[node as usize] as usize;
            let base = (first + layer - 1) * width;
            &self.upper[base..base + width]
        }
    }

    fn read_list(&self, node: u32, layer: usize) -> Vec<u32> {
        self.with_neighbors(node, layer, |ids| ids.to_vec())
    }

    /// Writes the ids before the count, so a reader that sees the count sees ids at least as
    /// new as the ones it covers.
    fn write_list(&self, node: u32, layer: usize, ids: &[u32]) {
        let list = self.list(node, layer);
        for (slot, &id) in list[1..].iter().zip(ids) {
            slot.store(id, Ordering::Relaxed);
        }
        list[0].store(ids.len() as u32, Ordering::Release);
    }

    fn vector(&self, node: u32) -> &[f32] {
        self.vectors.vector(node)
    }

    /// The paper's heuristic (Algorithm 4): take candidates best first, keeping one only if
    /// it is closer to the base than to every neighbour kept so far, so that links spread in
    /// different directions. Pruned candidates are not added back to fill the list (as in
    /// hnswlib; filling up measured 0.924 instead of 0.941 recall@10 at ef 64 on clustered
    /// test data). `candidates` must be sorted best first.
    fn select(&self, candidates: &[Scored], m: usize, exclude: u32) -> Vec<u32> {
        let mut kept: Vec<u32> = Vec::with_capacity(m);
        for c in candidates {
            if kept.len() == m {
                break;
            }
            if c.node == exclude || kept.contains(&c.node) {
                continue;
            }
            let v = self.vector(c.node);
            if kept
                .iter()
                .all(|&k| (self.dot)(v, self.vector(k)) < c.similarity)
            {
                kept.push(c.node);
            }
        }
        kept
    }

    /// Re-selects `node`'s list on `layer` from `ids` (scored against `node`).
    fn reselect(&self, node: u32, layer: usize, ids: impl IntoIterator<Item = u32>) -> Vec<u32> {
        let base = self.vector(node);
        let mut scored: Vec<Scored> = ids
            .into_iter()
            .map(|n| Scored {
                similarity: (self.dot)(base, self.vector(n)),
                node: n,
            })
            .collect();
        scored.sort_unstable_by(|a, b| b.cmp(a));
        scored.dedup_by_key(|s| s.node);
        self.select(&scored, self.params.capacity(layer), node)
    }

    fn lock(&self, node: u32) -> std::sync::MutexGuard<'_, ()> {
        // A poisoned lock only means another insert panicked; the list itself is always a
        // valid id list, so carry on.
        self.locks[node as usize]
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Sets a new node's list; another thread may already have linked back into it (it can
    /// reach the node from a layer above), so those links are merged, not overwritten.
    fn set_own(&self, node: u32, layer: usize, chosen: &[u32]) {
        let _guard = self.lock(node);
        let existing = self.read_list(node, layer);
        if existing.is_empty() {
            self.write_list(node, layer, chosen);
        } else {
            let merged = self.reselect(node, layer, chosen.iter().copied().chain(existing));
            self.write_list(node, layer, &merged);
        }
    }

    /// Adds the link `node → new` on `layer`, pruning with the heuristic when the list is full.
    fn link(&self, node: u32, new: u32, layer: usize) {
        let _guard = self.lock(node);
        let list = self.list(node, layer);
        let count = list[0].load(Ordering::Acquire) as usize;
        let current = self.read_list(node, layer);
        if current.contains(&new) {
            return;
        }
        if count < self.params.capacity(layer) {
            list[1 + count].store(new, Ordering::Relaxed);
            list[0].store(count as u32 + 1, Ordering::Release);
        } else {
            let kept = self.reselect(node, layer, current.into_iter().chain([new]));
            self.write_list(node, layer, &kept);
        }
    }

    fn insert(&self, node: u32) {
        let level = self.levels[node as usize];
        let query = self.vector(node);
        let mut top = self.top.lock().unwrap_or_else(|p| p.into_inner());
        let (entry, max_level) = *top;
        let Some(entry) = entry else {
            *top = (Some(node), level);
            return;
        };
        // Only a node that becomes the new entry keeps the lock: others may insert meanwhile
        // from the old entry, which stays valid.
        let raises = level > max_level;
        let mut held = if raises {
            Some(top)
        } else {
            drop(top);
            None
        };
        let mut current = Scored {
            similarity: (self.dot)(query, self.vector(entry)),
            node: entry,
        };
        for layer in (usize::from(level) + 1..=usize::from(max_level)).rev() {
            current = greedy(self, self.vectors, self.dot, query, current, layer);
        }
        let mut entry_points = vec![current];
        let n = self.levels.len();
        for layer in (0..=usize::from(level.min(max_level))).rev() {
            let candidates = with_visited(n, |visited| {
                search_layer(
                    self,
                    self.vectors,
                    self.dot,
                    query,
                    &entry_points,
                    self.params.ef_construction,
                    layer,
                    visited,
                    None,
                )
            });
            let chosen = self.select(&candidates, self.params.m, node);
            self.set_own(node, layer, &chosen);
            for &neighbour in &chosen {
                self.link(neighbour, node, layer);
            }
            if !candidates.is_empty() {
                entry_points = candidates;
            }
        }
        if let Some(top) = held.as_mut() {
            **top = (Some(node), level);
        }
    }
}

pub(super) fn extend<V: Vectors>(
    graph: &mut Hnsw,
    vectors: &V,
    threads: usize,
    skip: &(dyn Fn(u32) -> bool + Sync),
    progress: Option<&(dyn Fn(usize) + Sync)>,
) {
    let params = graph.params;
    let old_n = graph.len();
    let n = vectors.len();
    if n <= old_n {
        return;
    }
    assert!(n < u32::MAX as usize, "HNSW holds fewer than 2^32 nodes");
    let (m, m0) = (params.m, params.m0());
    let mut levels = std::mem::take(&mut graph.levels);
    let mut upper_offset = std::mem::take(&mut graph.upper_offset);
    let mut upper_lists = graph.upper.len() / (1 + m);
    for node in old_n as u32..n as u32 {
        if skip(node) {
            levels.push(SKIPPED);
            upper_offset.push(NO_UPPER);
            continue;
        }
        let level = params.level_of(node);
        levels.push(level);
        if level > 0 {
            upper_offset.push(upper_lists as u32);
            upper_lists += usize::from(level);
        } else {
            upper_offset.push(NO_UPPER);
        }
    }
    let grow = |flat: Vec<u32>, len: usize| -> Vec<AtomicU32> {
        let mut out: Vec<AtomicU32> = flat.into_iter().map(AtomicU32::new).collect();
        out.resize_with(len, || AtomicU32::new(0));
        out
    };
    let entry_level = graph.entry.map_or(0, |e| levels[e as usize]);
    let builder = Builder {
        params,
        vectors,
        dot: dot_fn(),
        layer0: grow(std::mem::take(&mut graph.layer0), n * (1 + m0)),
        upper: grow(std::mem::take(&mut graph.upper), upper_lists * (1 + m)),
        levels,
        upper_offset,
        locks: (0..n).map(|_| Mutex::new(())).collect(),
        top: Mutex::new((graph.entry, entry_level)),
    };

    let threads = match threads {
        0 => std::thread::available_parallelism().map_or(1, |p| p.get()),
        t => t,
    }
    .min(n - old_n)
    .max(1);
    let next = AtomicUsize::new(old_n);
    let done = AtomicUsize::new(0);
    let work = || loop {
        let node = next.fetch_add(1, Ordering::Relaxed);
        if node >= n {
            break;
        }
        if builder.levels[node] != SKIPPED {
            builder.insert(node as u32);
        }
        let finished = done.fetch_add(1, Ordering::Relaxed) + 1;
        if let Some(progress) = progress {
            if finished.is_multiple_of(4096) || finished == n - old_n {
                progress(finished);
            }
        }
    };
    if threads == 1 {
        work();
    } else {
        std::thread::scope(|scope| {
            for _ in 0..threads {
                scope.spawn(work);
            }
        });
    }

    let (entry, _) = builder.top.into_inner().unwrap_or_else(|p| p.into_inner());
    graph.levels = builder.levels;
    graph.upper_offset = builder.upper_offset;
    graph.layer0 = builder
        .layer0
        .into_iter()
        .map(AtomicU32::into_inner)
        .collect();
    graph.upper = builder
        .upper
        .into_iter()
        .map(AtomicU32::into_inner)
        .collect();
    graph.entry = entry;
}
