//! Bounded top-k selection and merging of sorted hit lists.
//!
//! Order used everywhere: higher score first; equal scores by lower row first. NaN scores
//! are never selected (they compare false against any threshold).

use std::cmp::Ordering;

use super::Hit;

/// `Less` when `a` ranks before `b` (higher score, then lower row).
#[inline]
pub(crate) fn rank_order(a: &Hit, b: &Hit) -> Ordering {
    // `==` first so that -0.0 and +0.0 tie (as they do for the heap's `<`); total_cmp only
    // decides between different values, which keeps the order total even with NaN.
    let by_score = if a.score == b.score {
        Ordering::Equal
    } else {
        b.score.total_cmp(&a.score)
    };
    by_score.then(a.row.cmp(&b.row))
}

/// `true` when `a` ranks strictly after (is worse than) `b`.
#[inline]
fn worse(a: &Hit, b: &Hit) -> bool {
    a.score < b.score || (a.score == b.score && a.row > b.row)
}

/// Scores are checked against the threshold in chunks this long: the chunk maximum is a
/// branch-free vector reduction, and only a chunk that beats the threshold is walked row by row.
const SCAN_CHUNK: usize = 16;

/// Keeps the best `k` hits seen so far in a binary min-heap whose root is the worst kept hit.
///
/// `threshold` is the root's score once the heap is full (`-inf` before), so the common case
/// (a score that cannot enter) costs one comparison; only scores strictly above the threshold
/// pay for the liveness check and the heap update. Scanning rows in increasing order makes the
/// strict comparison exact: a later row with a score equal to the worst kept one ranks after it.
#[derive(Clone, Debug)]
pub(crate) struct TopK {
    k: usize,
    heap: Vec<Hit>,
    threshold: f32,
}

impl TopK {
    pub(crate) fn new(k: usize) -> Self {
        TopK {
            k,
            heap: Vec::with_capacity(k),
            threshold: f32::NEG_INFINITY,
        }
    }

    /// Offers `scores[i]` for row `first_row + i`, in increasing row order. Rows whose bit in
    /// `live` is clear are skipped (checked only for scores that would enter the heap).
    #[inline]
    pub(crate) fn push_scores(&mut self, scores: &[f32], first_row: usize, live: Option<&[u64]>) {
        if self.k == 0 {
            return;
        }
        let mut chunks = scores.chunks_exact(SCAN_CHUNK);
        let mut row = first_row;
        for chunk in &mut chunks {
            // Written with `>` rather than f32::max so it vectorises (ignores NaN, as we want).
            let chunk_max = chunk
                .iter()
                .fold(f32::NEG_INFINITY, |m, &s| if s > m { s } else { m });
            if chunk_max > self.threshold {
                self.push_slow(chunk, row, live);
            }
            row += SCAN_CHUNK;
        }
        self.push_slow(chunks.remainder(), row, live);
    }

    #[inline(never)]
    fn push_slow(&mut self, scores: &[f32], first_row: usize, live: Option<&[u64]>) {
        for (i, &score) in scores.iter().enumerate() {
            if score > self.threshold {
                let row = first_row + i;
                if let Some(bits) = live {
                    if (bits[row >> 6] >> (row & 63)) & 1 == 0 {
                        continue;
                    }
                }
                self.insert(Hit {
                    row: row as u32,
                    score,
                });
            }
        }
    }

    /// Scores below this cannot enter: the worst kept score once `k` hits are kept, `-inf` before.
    pub(crate) fn threshold(&self) -> f32 {
        self.threshold
    }

    /// Offers one hit (in any row order; ties against the worst kept hit go to the lower row).
    pub(crate) fn offer(&mut self, hit: Hit) {
        if self.k > 0 {
            self.insert(hit);
        }
    }

    /// Inserts a hit if it ranks before the current worst (or into a not-yet-full heap).
    fn insert(&mut self, hit: Hit) {
        if self.heap.len() < self.k {
            self.heap.push(hit);
            self.sift_up(self.heap.len() - 1);
        } else if worse(&self.heap[0], &hit) {
            self.heap[0] = hit;
            self.sift_down(0);
        } else {
            return;
        }
        if self.heap.len() == self.k {
            self.threshold = self.heap[0].score;
        }
    }

    fn sift_up(&mut self, mut i: usize) {
        while i > 0 {
            let parent = (i - 1) / 2;
            if worse(&self.heap[i], &self.heap[parent]) {
                self.heap.swap(i, parent);
                i = parent;
            } else {
                break;
            }
        }
    }

    fn sift_down(&mut self, mut i: usize) {
        let len = self.heap.len();
        loop {
            let left = 2 * i + 1;
            if left >= len {
                break;
            }
            let right = left + 1;
            let worst_child = if right < len && worse(&self.heap[right], &self.heap[left]) {
                right
            } else {
                left
            };
            if worse(&self.heap[worst_child], &self.heap[i]) {
                self.heap.swap(i, worst_child);
                i = worst_child;
            } else {
                break;
            }
        }
    }

    /// Folds another partial top-k (over a disjoint row range) into this one.
    pub(crate) fn absorb(&mut self, other: TopK) {
        for hit in other.heap {
            self.insert(hit);
        }
    }

    /// The kept hits, best first.
    pub(crate) fn into_sorted(self) -> Vec<Hit> {
        let mut hits = self.heap;
        hits.sort_unstable_by(rank_order);
        hits
    }
}

/// Merges lists that are each sorted best first into the best `k` overall.
pub(crate) fn merge_sorted(lists: impl IntoIterator<Item = Vec<Hit>>, k: usize) -> Vec<Hit> {
    use std::collections::BinaryHeap;

    /// A list's current head; `Ord` is reversed rank order so the max-heap pops the best head.
    struct Head {
        hit: Hit,
        list: usize,
        pos: usize,
    }
    impl PartialEq for Head {
        fn eq(&self, other: &Self) -> bool {
            self.cmp(other) == Ordering::Equal
        }
    }
    impl Eq for Head {}
    impl PartialOrd for Head {
        fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
            Some(self.cmp(other))
        }
    }
    impl Ord for Head {
        fn cmp(&self, other: &Self) -> Ordering {
            // Equal hits come out in list order, so the merge is deterministic.
            rank_order(&other.hit, &self.hit).then(other.list.cmp(&self.list))
        }
    }

    let lists: Vec<Vec<Hit>> = lists.into_iter().filter(|l| !l.is_empty()).collect();
    if k == 0 {
        return Vec::new();
    }
    let mut heads: BinaryHeap<Head> = lists
        .iter()
        .enumerate()
        .map(|(list, l)| Head {
            hit: l[0],
            list,
            pos: 0,
        })
        .collect();
    let mut merged = Vec::with_capacity(k.min(lists.iter().map(Vec::len).sum()));
    while merged.len() < k {
        let Some(Head { hit, list, pos }) = heads.pop() else {
            break;
        };
        merged.push(hit);
        if let Some(&next) = lists[list].get(pos + 1) {
            heads.push(Head {
                hit: next,
                list,
                pos: pos + 1,
            });
        }
    }
    merged
}
