//! Retrieval metrics: recall@k, MRR@10 and nDCG@10 over a run and BEIR qrels.
//!
//! Conventions (those of BEIR, which computes with pytrec_eval / trec_eval):
//!
//! - A **run** maps a query id to its ranked list of `(doc id, score)`, best first. The order of
//!   the list is the ranking; scores are not re-sorted. A doc id repeated further down the list
//!   is ignored (later documents move up one rank).
//! - A document is **relevant** when its qrels grade is > 0. The evaluated queries are those of
//!   the qrels with at least one relevant document; a query of the qrels that is missing from
//!   the run scores 0 on every metric, and queries of the run absent from the qrels are ignored.
//! - **recall@k** = |relevant ∩ top k| / |relevant|.
//! - **MRR@10** = 1 / rank of the first relevant document if it is within the top 10, else 0.
//! - **nDCG@10** uses *linear* gains, as trec_eval's `ndcg_cut` does (so BEIR's numbers):
//!   DCG@10 = Σ_{i≤10} g(d_i) / log2(i + 1) with g = max(grade, 0) (unjudged documents gain 0),
//!   divided by the DCG of the ideal ranking of all judged documents (grades sorted decreasing).
//!
//! Every metric is the mean over the evaluated queries (0 when there are none).

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::beir::Qrels;

/// Ranked results: query id → `(doc id, score)`, best first.
pub type Run = BTreeMap<String, Vec<(String, f32)>>;

/// The recall cut-offs always reported.
pub const DEFAULT_KS: [usize; 3] = [1, 10, 100];

/// Per-query key: the 1-based rank of the first relevant document in the (de-duplicated) run,
/// or 0 when no relevant document was retrieved. Diagnostic, not averaged into `metrics`.
pub const FIRST_RELEVANT_RANK: &str = "first_relevant_rank";
/// Per-query key: the number of relevant documents in the qrels. Not averaged.
pub const NUM_RELEVANT: &str = "num_relevant";

/// The result of [`evaluate_retrieval`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RetrievalReport {
    /// Mean over the evaluated queries: `recall@k` for every k of [`Self::ks`], `mrr@10`, `ndcg@10`.
    pub metrics: BTreeMap<String, f64>,
    /// Query id → the same metric keys for that query, plus [`FIRST_RELEVANT_RANK`] and
    /// [`NUM_RELEVANT`].
    pub per_query: BTreeMap<String, BTreeMap<String, f64>>,
    /// Number of evaluated queries (queries of the qrels with at least one relevant document).
    pub num_queries: usize,
    /// The recall cut-offs evaluated, increasing: 1, 10, 100 and those asked for.
    pub ks: Vec<usize>,
}

fn recall_key(k: usize) -> String {
    format!("recall@{k}")
}

/// Evaluates a run against qrels; `ks` adds recall cut-offs to 1, 10 and 100 (0 is ignored).
pub fn evaluate_retrieval(run: &Run, qrels: &Qrels, ks: &[usize]) -> RetrievalReport {
    let ks: Vec<usize> = DEFAULT_KS
        .iter()
        .chain(ks)
        .copied()
        .filter(|&k| k > 0)
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let metric_keys: Vec<String> = ks
        .iter()
        .map(|&k| recall_key(k))
        .chain(["mrr@10".to_string(), "ndcg@10".to_string()])
        .collect();

    let empty = Vec::new();
    let mut per_query = BTreeMap::new();
    for (qid, judged) in qrels {
        let num_relevant = judged.values().filter(|&&g| g > 0).count();
        if num_relevant == 0 {
            continue;
        }
        let ranked = dedup(run.get(qid).unwrap_or(&empty));
        let mut m = BTreeMap::new();
        for &k in &ks {
            let found = ranked
                .iter()
                .take(k)
                .filter(|d| judged.get(**d).is_some_and(|&g| g > 0))
                .count();
            m.insert(recall_key(k), found as f64 / num_relevant as f64);
        }
        let first = ranked
            .iter()
            .position(|d| judged.get(*d).is_some_and(|&g| g > 0))
            .map(|i| i + 1);
        let rr10 = match first {
            Some(r) if r <= 10 => 1.0 / r as f64,
            _ => 0.0,
        };
        m.insert("mrr@10".to_string(), rr10);
        m.insert("ndcg@10".to_string(), ndcg_at(&ranked, judged, 10));
        m.insert(FIRST_RELEVANT_RANK.to_string(), first.unwrap_or(0) as f64);
        m.insert(NUM_RELEVANT.to_string(), num_relevant as f64);
        per_query.insert(qid.clone(), m);
    }

    let n = per_query.len();
    let metrics = metric_keys
        .into_iter()
        .map(|key| {
            let sum: f64 = per_query.values().map(|m| m[&key]).sum();
            let mean = if n == 0 { 0.0 } else { sum / n as f64 };
            (key, mean)
        })
        .collect();
    RetrievalReport {
        metrics,
        per_query,
        num_queries: n,
        ks,
    }
}

/// The doc ids of a ranked list, keeping the first occurrence of each.
fn dedup(list: &[(String, f32)]) -> Vec<&str> {
    let mut seen = BTreeSet::new();
    list.iter()
        .map(|(d, _)| d.as_str())
        .filter(|d| seen.insert(*d))
        .collect()
}

fn discount(rank0: usize) -> f64 {
    1.0 / ((rank0 + 2) as f64).log2()
}

/// nDCG@k with linear gains (see the module doc).
fn ndcg_at(ranked: &[&str], judged: &BTreeMap<String, i32>, k: usize) -> f64 {
    let gain = |g: i32| g.max(0) as f64;
    let dcg: f64 = ranked
        .iter()
        .take(k)
        .enumerate()
        .map(|(i, d)| judged.get(*d).map_or(0.0, |&g| gain(g)) * discount(i))
        .sum();
    let mut ideal: Vec<i32> = judged.values().copied().filter(|&g| g > 0).collect();
    ideal.sort_unstable_by(|a, b| b.cmp(a));
    let idcg: f64 = ideal
        .iter()
        .take(k)
        .enumerate()
        .map(|(i, &g)| gain(g) * discount(i))
        .sum();
    if idcg > 0.0 {
        dcg / idcg
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_of(lists: &[(&str, &[&str])]) -> Run {
        lists
            .iter()
            .map(|(q, docs)| {
                let n = docs.len();
                (
                    q.to_string(),
                    docs.iter()
                        .enumerate()
                        .map(|(i, d)| (d.to_string(), (n - i) as f32))
                        .collect(),
                )
            })
            .collect()
    }

    fn qrels_of(items: &[(&str, &str, i32)]) -> Qrels {
        let mut q = Qrels::new();
        for (qid, did, g) in items {
            q.entry(qid.to_string())
                .or_default()
                .insert(did.to_string(), *g);
        }
        q
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    /// Worked by hand: q1 has relevant {a (grade 2), c (grade 1)}; run q1 = [x, a, y, c].
    /// q2 has relevant {z}; run q2 = [p, q] (not found). q3 is in the qrels but not the run.
    #[test]
    fn hand_computed_example() {
        let run = run_of(&[("q1", &["x", "a", "y", "c"]), ("q2", &["p", "q"])]);
        let qrels = qrels_of(&[
            ("q1", "a", 2),
            ("q1", "c", 1),
            ("q1", "x", 0),
            ("q2", "z", 1),
            ("q3", "m", 1),
            ("q4", "n", 0), // no relevant document: not evaluated
        ]);
        let r = evaluate_retrieval(&run, &qrels, &[3]);
        assert_eq!(r.num_queries, 3);
        assert_eq!(r.ks, vec![1, 3, 10, 100]);
        let q1 = &r.per_query["q1"];
        // recall@1: x is not relevant → 0; recall@3: a found → 1/2; recall@10: a, c → 1.
        assert!(close(q1["recall@1"], 0.0));
        assert!(close(q1["recall@3"], 0.5));
        assert!(close(q1["recall@10"], 1.0));
        // first relevant at rank 2 → RR = 0.5.
        assert!(close(q1["mrr@10"], 0.5));
        assert_eq!(q1[FIRST_RELEVANT_RANK], 2.0);
        // DCG = 2/log2(3) + 1/log2(5) = 1.261859507 + 0.430676558 = 1.692536065
        // IDCG = 2/log2(2) + 1/log2(3) = 2 + 0.630929754 = 2.630929754
        // nDCG = 0.6433224
        assert!(
            close(q1["ndcg@10"], 1.692536065 / 2.630929754),
            "{}",
            q1["ndcg@10"]
        );
        assert!((q1["ndcg@10"] - 0.6433224).abs() < 1e-6);
        for q in ["q2", "q3"] {
            for key in ["recall@1", "recall@10", "mrr@10", "ndcg@10"] {
                assert_eq!(r.per_query[q][key], 0.0);
            }
            assert_eq!(r.per_query[q][FIRST_RELEVANT_RANK], 0.0);
        }
        assert!(!r.per_query.contains_key("q4"));
        assert!(close(r.metrics["recall@10"], 1.0 / 3.0));
        assert!(close(r.metrics["recall@3"], 0.5 / 3.0));
        assert!(close(r.metrics["mrr@10"], 0.5 / 3.0));
        assert!((r.metrics["ndcg@10"] - 0.6433224 / 3.0).abs() < 1e-6);
    }

    /// Worked by hand: duplicates are dropped, relevant beyond rank 10 count for recall@100
    /// but not for MRR@10 or nDCG@10.
    #[test]
    fn duplicates_and_cutoffs() {
        // Ranked: d0 d0 d1 ... with the relevant doc "r" at raw position 12 (0-based), which is
        // rank 12 (1-based) after removing the duplicate d0.
        let mut docs: Vec<String> = vec!["d0".into(), "d0".into()];
        docs.extend((1..11).map(|i| format!("d{i}")));
        docs.push("r".into());
        docs.push("r".into());
        let refs: Vec<&str> = docs.iter().map(String::as_str).collect();
        let run = run_of(&[("q", &refs)]);
        let qrels = qrels_of(&[("q", "r", 1), ("q", "s", 1)]);
        let r = evaluate_retrieval(&run, &qrels, &[11, 12]);
        let q = &r.per_query["q"];
        assert_eq!(q[FIRST_RELEVANT_RANK], 12.0);
        assert_eq!(q["recall@11"], 0.0);
        assert_eq!(q["recall@12"], 0.5);
        assert_eq!(q["recall@100"], 0.5);
        assert_eq!(q["mrr@10"], 0.0);
        assert_eq!(q["ndcg@10"], 0.0);
        // Perfect ranking: nDCG 1.
        let run = run_of(&[("q", &["s", "r", "x"])]);
        let r = evaluate_retrieval(&run, &qrels, &[]);
        assert!(close(r.metrics["ndcg@10"], 1.0));
        assert!(close(r.metrics["mrr@10"], 1.0));
        assert!(close(r.metrics["recall@1"], 0.5));
        // Empty qrels: zeros, no NaN.
        let r = evaluate_retrieval(&run, &Qrels::new(), &[]);
        assert_eq!(r.num_queries, 0);
        assert!(r.metrics.values().all(|&v| v == 0.0));
    }

    /// A tiny deterministic generator for the randomised comparison.
    struct Lcg(u64);
    impl Lcg {
        fn next(&mut self) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            self.0 >> 33
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    /// Naive reference formulas, written independently of the implementation: scan the raw
    /// list, skip ids already seen, use powf for the discount.
    fn reference(list: &[String], judged: &[(String, i32)], k: usize) -> (f64, f64, f64) {
        let grade_of = |d: &str| -> i32 {
            let mut g = 0;
            for (j, gr) in judged {
                if j == d {
                    g = *gr;
                }
            }
            g
        };
        let mut ranked: Vec<&String> = Vec::new();
        for d in list {
            let mut dup = false;
            for r in &ranked {
                if *r == d {
                    dup = true;
                }
            }
            if !dup {
                ranked.push(d);
            }
        }
        let n_rel = judged.iter().filter(|(_, g)| *g > 0).count() as f64;
        let mut hits = 0.0;
        for d in ranked.iter().take(k) {
            if grade_of(d) > 0 {
                hits += 1.0;
            }
        }
        let mut rr = 0.0;
        for (i, d) in ranked.iter().enumerate() {
            if i >= 10 {
                break;
            }
            if grade_of(d) > 0 {
                rr = 1.0 / (i as f64 + 1.0);
                break;
            }
        }
        let mut dcg = 0.0;
        for (i, d) in ranked.iter().enumerate().take(10) {
            let g = grade_of(d);
            if g > 0 {
                dcg += g as f64 * (1.0 / (i as f64 + 2.0).ln() * 2f64.ln());
            }
        }
        let mut grades: Vec<i32> = judged.iter().map(|(_, g)| *g).filter(|g| *g > 0).collect();
        grades.sort();
        grades.reverse();
        let mut idcg = 0.0;
        for (i, g) in grades.iter().enumerate().take(10) {
            idcg += *g as f64 * (1.0 / (i as f64 + 2.0).ln() * 2f64.ln());
        }
        (hits / n_rel, rr, dcg / idcg)
    }

    #[test]
    fn matches_naive_reference_on_random_runs() {
        let mut rng = Lcg(7);
        for _case in 0..50 {
            let mut run = Run::new();
            let mut qrels = Qrels::new();
            // query id → (ranked list as the run has it, judgements)
            type Raw = BTreeMap<String, (Vec<String>, Vec<(String, i32)>)>;
            let mut raw = Raw::new();
            let nq = 1 + rng.below(8);
            for q in 0..nq {
                let qid = format!("q{q}");
                let ndocs = 30;
                let len = rng.below(40) as usize;
                let list: Vec<String> =
                    (0..len).map(|_| format!("d{}", rng.below(ndocs))).collect();
                let mut judged = Vec::new();
                let mut used = BTreeSet::new();
                for _ in 0..rng.below(6) {
                    let d = format!("d{}", rng.below(ndocs));
                    if used.insert(d.clone()) {
                        judged.push((d, rng.below(4) as i32)); // grades 0..=3
                    }
                }
                if judged.iter().all(|(_, g)| *g == 0) {
                    judged.push((format!("d{}", ndocs + 1), 1)); // never retrieved
                }
                for (d, g) in &judged {
                    qrels.entry(qid.clone()).or_default().insert(d.clone(), *g);
                }
                if rng.below(5) != 0 {
                    run.insert(
                        qid.clone(),
                        list.iter().map(|d| (d.clone(), 0.0f32)).collect(),
                    );
                } else {
                    // missing from the run: the reference sees an empty list
                }
                let seen = if run.contains_key(&qid) {
                    list
                } else {
                    Vec::new()
                };
                raw.insert(qid, (seen, judged));
            }
            let k = 1 + rng.below(20) as usize;
            let report = evaluate_retrieval(&run, &qrels, &[k]);
            assert_eq!(report.num_queries, raw.len());
            let mut sums = (0.0, 0.0, 0.0);
            for (qid, (list, judged)) in &raw {
                let (rec, rr, ndcg) = reference(list, judged, k);
                let m = &report.per_query[qid];
                assert!(close(m[&format!("recall@{k}")], rec), "{qid} recall");
                assert!(close(m["mrr@10"], rr), "{qid} rr");
                assert!(close(m["ndcg@10"], ndcg), "{qid} ndcg");
                sums.0 += rec;
                sums.1 += rr;
                sums.2 += ndcg;
            }
            let n = raw.len() as f64;
            assert!(close(report.metrics[&format!("recall@{k}")], sums.0 / n));
            assert!(close(report.metrics["mrr@10"], sums.1 / n));
            assert!(close(report.metrics["ndcg@10"], sums.2 / n));
        }
    }
}
