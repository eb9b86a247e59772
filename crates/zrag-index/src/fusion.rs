//! Rank fusion: merge ranked lists from different retrievers (dense, BM25) into one list,
//! either by reciprocal rank (scale-free) or by a weighted sum of normalised scores.
//!
//! Both are pure and deterministic: equal fused scores keep the order in which items first
//! appear (lists in the order given, each best first), so results never depend on hashing.

use std::collections::HashMap;
use std::hash::Hash;

/// The RRF constant of Cormack, Clarke & Büttcher (2009), used by most hybrid-search systems.
pub const RRF_K: f64 = 60.0;

/// Reciprocal rank fusion: an item scores Σ 1 / (`k_rrf` + rank) over the lists it appears in
/// (rank 1-based), and the best `top` items are returned, best first.
///
/// An item listed twice in one list counts once, at its better rank.
pub fn reciprocal_rank_fusion<K: Eq + Hash + Clone>(
    lists: &[Vec<K>],
    k_rrf: f64,
    top: usize,
) -> Vec<(K, f64)> {
    let mut fused = Accumulator::default();
    for list in lists {
        let mut seen = HashMap::with_capacity(list.len());
        for (index, key) in list.iter().enumerate() {
            if seen.insert(key, ()).is_none() {
                fused.add(key, 1.0 / (k_rrf + (index + 1) as f64));
            }
        }
    }
    fused.top(top)
}

/// How [`score_fusion`] puts each list's scores on a common scale.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Normalization {
    /// (s − min) / (max − min) over the list: the list's best item gets 1, its worst 0. A list
    /// whose scores are all equal (one item, say) gives all its items 1.
    #[default]
    MinMax,
    /// (s − mean) / standard deviation over the list. A list whose scores are all equal gives
    /// all its items 0.
    ZScore,
}

/// Normalised score fusion: each list's scores are normalised ([`Normalization`]), and an item
/// scores Σ weightᵢ · normᵢ, a convex combination when the weights are non-negative and sum to
/// 1 (they are used as given). The best `top` items are returned, best first.
///
/// An item missing from a list gets that list's lowest normalised score (0 under min-max):
/// the list did rank it below everything it returned, and giving it less would let one
/// retriever's short list veto the other's. Candidates come only from lists with a non-zero
/// weight, so weights (1, 0) reproduce the first list. Non-finite scores are ignored, as if
/// the item were absent from that list; an item listed twice in one list counts once, at its
/// first entry.
///
/// # Panics
/// If `weights` and `lists` differ in length.
pub fn score_fusion<K: Eq + Hash + Clone>(
    lists: &[Vec<(K, f32)>],
    weights: &[f64],
    normalization: Normalization,
    top: usize,
) -> Vec<(K, f64)> {
    assert_eq!(
        lists.len(),
        weights.len(),
        "score_fusion needs one weight per list"
    );
    let mut fused = Accumulator::default();
    for (list, &weight) in lists.iter().zip(weights) {
        if weight == 0.0 {
            continue;
        }
        let mut seen = HashMap::with_capacity(list.len());
        let entries: Vec<(&K, f64)> = list
            .iter()
            .filter(|(_, s)| s.is_finite())
            .filter(|(key, _)| seen.insert(key, ()).is_none())
            .map(|(key, s)| (key, f64::from(*s)))
            .collect();
        let Some(normalize) = Normalizer::fit(normalization, entries.iter().map(|e| e.1)) else {
            continue;
        };
        // Every list's floor is added to every candidate at the end, so that an item another
        // list found, and this one did not, still gets this list's minimum.
        let floor = weight * normalize.floor;
        fused.base += floor;
        for (key, score) in entries {
            fused.add(key, weight * normalize.apply(score) - floor);
        }
    }
    fused.top(top)
}

/// Normalises the scores of one list.
struct Normalizer {
    shift: f64,
    scale: f64,
    /// The lowest normalised score of the list.
    floor: f64,
    /// Every score of the list equal: each maps to this.
    constant: Option<f64>,
}

impl Normalizer {
    fn fit(kind: Normalization, scores: impl Iterator<Item = f64> + Clone) -> Option<Normalizer> {
        let n = scores.clone().count();
        if n == 0 {
            return None;
        }
        let min = scores.clone().fold(f64::INFINITY, f64::min);
        let max = scores.clone().fold(f64::NEG_INFINITY, f64::max);
        let (shift, scale, constant) = match kind {
            Normalization::MinMax => (min, max - min, (max == min).then_some(1.0)),
            Normalization::ZScore => {
                let mean = scores.clone().sum::<f64>() / n as f64;
                let variance = scores.map(|s| (s - mean) * (s - mean)).sum::<f64>() / n as f64;
                let std = variance.sqrt();
                // Scores equal up to rounding: treat as constant rather than divide noise by
                // noise.
                let constant = (std <= f64::EPSILON * mean.abs().max(1.0)).then_some(0.0);
                (mean, std, constant)
            }
        };
        let mut normalizer = Normalizer {
            shift,
            scale,
            floor: 0.0,
            constant,
        };
        // A constant list still says which items it found: those get `constant`, the others
        // 0 (min-max maps a list's minimum to 0 as well).
        normalizer.floor = match constant {
            Some(_) => 0.0,
            None => normalizer.apply(min),
        };
        Some(normalizer)
    }

    fn apply(&self, score: f64) -> f64 {
        match self.constant {
            Some(value) => value,
            None => (score - self.shift) / self.scale,
        }
    }
}

/// Fused scores in order of first appearance.
struct Accumulator<K> {
    order: HashMap<K, usize>,
    items: Vec<(K, f64)>,
    /// Added to every item at the end.
    base: f64,
}

impl<K> Default for Accumulator<K> {
    fn default() -> Self {
        Accumulator {
            order: HashMap::new(),
            items: Vec::new(),
            base: 0.0,
        }
    }
}

impl<K: Eq + Hash + Clone> Accumulator<K> {
    fn add(&mut self, key: &K, score: f64) {
        match self.order.get(key) {
            Some(&i) => self.items[i].1 += score,
            None => {
                self.order.insert(key.clone(), self.items.len());
                self.items.push((key.clone(), score));
            }
        }
    }

    fn top(self, top: usize) -> Vec<(K, f64)> {
        let base = self.base;
        let mut items: Vec<(K, f64)> = self
            .items
            .into_iter()
            .map(|(key, score)| (key, score + base))
            .collect();
        // Stable: equal scores keep first-appearance order.
        items.sort_by(|a, b| b.1.total_cmp(&a.1));
        items.truncate(top);
        items
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(fused: &[(&'static str, f64)]) -> Vec<&'static str> {
        fused.iter().map(|(k, _)| *k).collect()
    }

    #[test]
    fn rrf_matches_hand_computation() {
        // a: ranks 1 and 3 → 1/61 + 1/63; b: ranks 2 and 1 → 1/62 + 1/61;
        // c: rank 3 → 1/63; d: rank 2 → 1/62.
        let lists = vec![vec!["a", "b", "c"], vec!["b", "d", "a"]];
        let fused = reciprocal_rank_fusion(&lists, RRF_K, 10);
        let expect = [
            ("b", 1.0 / 62.0 + 1.0 / 61.0),
            ("a", 1.0 / 61.0 + 1.0 / 63.0),
            ("d", 1.0 / 62.0),
            ("c", 1.0 / 63.0),
        ];
        assert_eq!(fused.len(), expect.len());
        for ((key, score), (want_key, want)) in fused.iter().zip(expect) {
            assert_eq!(*key, want_key);
            assert!((score - want).abs() < 1e-15, "{key}: {score} vs {want}");
        }
        assert_eq!(keys(&reciprocal_rank_fusion(&lists, RRF_K, 2)), ["b", "a"]);
    }

    #[test]
    fn rrf_ties_follow_first_appearance_and_duplicates_count_once() {
        // x and y both only at rank 1 of one list: x's list comes first.
        let fused = reciprocal_rank_fusion(&[vec!["x"], vec!["y"]], RRF_K, 10);
        assert_eq!(keys(&fused), ["x", "y"]);
        assert_eq!(fused[0].1, fused[1].1);
        let fused = reciprocal_rank_fusion(&[vec!["y"], vec!["x"]], RRF_K, 10);
        assert_eq!(keys(&fused), ["y", "x"]);
        let fused = reciprocal_rank_fusion(&[vec!["a", "a", "b"]], RRF_K, 10);
        assert_eq!(keys(&fused), ["a", "b"]);
        assert!((fused[0].1 - 1.0 / 61.0).abs() < 1e-15);
        assert!((fused[1].1 - 1.0 / 63.0).abs() < 1e-15);
        assert!(reciprocal_rank_fusion::<u32>(&[], RRF_K, 10).is_empty());
        assert!(reciprocal_rank_fusion(&[vec![1u32]], RRF_K, 0).is_empty());
    }

    fn scored(items: &[(&'static str, f32)]) -> Vec<(&'static str, f32)> {
        items.to_vec()
    }

    #[test]
    fn one_list_keeps_its_order() {
        let list = scored(&[("a", 9.0), ("b", 7.5), ("c", 7.5), ("d", -2.0)]);
        for normalization in [Normalization::MinMax, Normalization::ZScore] {
            let fused = score_fusion(std::slice::from_ref(&list), &[1.0], normalization, 10);
            assert_eq!(keys(&fused), ["a", "b", "c", "d"], "{normalization:?}");
        }
        let fused = reciprocal_rank_fusion(&[list.iter().map(|e| e.0).collect()], RRF_K, 10);
        assert_eq!(keys(&fused), ["a", "b", "c", "d"]);
        let fused = score_fusion(&[list], &[1.0], Normalization::MinMax, 10);
        let expect = [1.0, 9.5 / 11.0, 9.5 / 11.0, 0.0];
        for ((_, s), want) in fused.iter().zip(expect) {
            assert!((s - want).abs() < 1e-12);
        }
    }

    #[test]
    fn weights_one_and_zero_reproduce_a_list() {
        let dense = scored(&[("a", 0.9), ("b", 0.8), ("c", 0.1)]);
        let bm25 = scored(&[("c", 14.0), ("x", 11.0), ("a", 3.0)]);
        for normalization in [Normalization::MinMax, Normalization::ZScore] {
            let lists = [dense.clone(), bm25.clone()];
            let only_dense = score_fusion(&lists, &[1.0, 0.0], normalization, 10);
            assert_eq!(keys(&only_dense), ["a", "b", "c"]);
            let only_bm25 = score_fusion(&lists, &[0.0, 1.0], normalization, 10);
            assert_eq!(keys(&only_bm25), ["c", "x", "a"]);
        }
    }

    #[test]
    fn missing_items_get_the_list_minimum() {
        let dense = scored(&[("a", 1.0), ("b", 0.5), ("c", 0.0)]);
        let bm25 = scored(&[("x", 10.0), ("a", 5.0), ("y", 0.0)]);
        let fused = score_fusion(&[dense, bm25], &[0.5, 0.5], Normalization::MinMax, 10);
        // a: .5·1 + .5·.5; x: .5·0 + .5·1; b: .5·.5 + 0; c, y: 0.
        let expect = [("a", 0.75), ("x", 0.5), ("b", 0.25), ("c", 0.0), ("y", 0.0)];
        assert_eq!(keys(&fused), expect.map(|e| e.0));
        for ((_, s), (_, want)) in fused.iter().zip(expect) {
            assert!((s - want).abs() < 1e-12);
        }
        // Under z-scores the floor is negative, and absent items get it too.
        let dense = scored(&[("a", 3.0), ("b", 1.0)]);
        let bm25 = scored(&[("c", 2.0), ("d", 0.0)]);
        let fused = score_fusion(&[dense, bm25], &[0.5, 0.5], Normalization::ZScore, 10);
        // Each list normalises to (1, −1); a: .5·1 + .5·(−1) = 0, likewise c; b, d: −1.
        assert_eq!(keys(&fused), ["a", "c", "b", "d"]);
        let expect = [0.0, 0.0, -1.0, -1.0];
        for ((_, s), want) in fused.iter().zip(expect) {
            assert!((s - want).abs() < 1e-12, "{fused:?}");
        }
    }

    #[test]
    fn constant_and_degenerate_lists_give_no_nan() {
        let cases: Vec<Vec<Vec<(&str, f32)>>> = vec![
            vec![scored(&[("a", 2.0), ("b", 2.0)]), scored(&[("b", 1.0)])],
            vec![scored(&[("a", 0.0)]), scored(&[])],
            vec![scored(&[("a", 1e-30), ("b", 1e-30)]), scored(&[("c", 5.0)])],
            vec![scored(&[("a", f32::NAN), ("b", 1.0), ("c", f32::INFINITY)])],
            vec![scored(&[]), scored(&[])],
        ];
        for lists in cases {
            let weights = vec![1.0 / lists.len() as f64; lists.len()];
            for normalization in [Normalization::MinMax, Normalization::ZScore] {
                let fused = score_fusion(&lists, &weights, normalization, 10);
                assert!(
                    fused.iter().all(|(_, s)| s.is_finite()),
                    "{lists:?} {normalization:?}: {fused:?}"
                );
            }
        }
        let fused = score_fusion(
            &[scored(&[("a", 2.0), ("b", 2.0)]), scored(&[("b", 1.0)])],
            &[0.5, 0.5],
            Normalization::MinMax,
            10,
        );
        // Constant min-max lists give their items 1: b is in both lists.
        assert_eq!(fused, vec![("b", 1.0), ("a", 0.5)]);
    }

    #[test]
    fn fusion_is_deterministic() {
        // Many ties, keys hashed through a randomly seeded HashMap inside: the output must
        // still be one fixed order.
        let dense: Vec<(u32, f32)> = (0..200).map(|i| (i, (i % 7) as f32)).collect();
        let bm25: Vec<(u32, f32)> = (100..300).rev().map(|i| (i, (i % 5) as f32)).collect();
        let ranked: Vec<Vec<u32>> = vec![
            dense.iter().map(|e| e.0).collect(),
            bm25.iter().map(|e| e.0).collect(),
        ];
        let first_rrf = reciprocal_rank_fusion(&ranked, RRF_K, 50);
        let first_score = score_fusion(
            &[dense.clone(), bm25.clone()],
            &[0.3, 0.7],
            Normalization::ZScore,
            50,
        );
        for _ in 0..20 {
            assert_eq!(reciprocal_rank_fusion(&ranked, RRF_K, 50), first_rrf);
            assert_eq!(
                score_fusion(
                    &[dense.clone(), bm25.clone()],
                    &[0.3, 0.7],
                    Normalization::ZScore,
                    50
                ),
                first_score
            );
        }
        // Equal scores come out in order of first appearance.
        let tied = score_fusion(
            &[vec![(5u32, 1.0f32), (3, 1.0), (9, 1.0)]],
            &[1.0],
            Normalization::MinMax,
            10,
        );
        assert_eq!(tied, vec![(5, 1.0), (3, 1.0), (9, 1.0)]);
    }
}
