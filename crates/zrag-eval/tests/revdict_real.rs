//! Builds the reverse-dictionary benchmark from the real Debian sources (dict-gcide and
//! wordnet-base) and checks its invariants. The sources must be present: run
//! `scripts/fetch-revdict-data.sh` (CI does).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use zrag_eval::beir::{self, Qrels};
use zrag_eval::revdict::{self, normalize_term, RevdictConfig, SPLITS};

fn config(out: &Path) -> RevdictConfig {
    let cfg = RevdictConfig::from_zrag_home(out);
    let missing = cfg.missing_sources();
    assert!(
        missing.is_empty(),
        "reverse-dictionary sources missing: {missing:?}. Run scripts/fetch-revdict-data.sh \
         (it downloads Debian's dict-gcide and wordnet-base into ${{ZRAG_HOME:-~/.cache/zrag}}/data/debian)"
    );
    cfg
}

/// Lower-case alphanumeric tokens separated by single spaces, padded with spaces: an
/// implementation independent of the builder's, for the verbatim check.
fn norm(s: &str) -> String {
    let mapped: String = s
        .chars()
        .map(|c| if c.is_alphanumeric() { c } else { ' ' })
        .collect::<String>()
        .to_lowercase();
    format!(
        " {} ",
        mapped.split_whitespace().collect::<Vec<_>>().join(" ")
    )
}

struct Bench {
    corpus: Vec<beir::CorpusDoc>,
    queries: BTreeMap<String, String>,
    qa: Vec<beir::QaItem>,
    qrels: BTreeMap<String, Qrels>,
}

fn load(out: &Path) -> Bench {
    let corpus = beir::load_corpus(&out.join("corpus.jsonl")).unwrap();
    let queries = beir::load_queries(&out.join("queries.jsonl"))
        .unwrap()
        .into_iter()
        .map(|q| (q.id, q.text))
        .collect();
    let qa = beir::load_qa(&out.join("answers.jsonl")).unwrap();
    let qrels = SPLITS
        .iter()
        .map(|s| {
            let path = out.join("qrels").join(format!("{s}.tsv"));
            (s.to_string(), beir::load_qrels(&path).unwrap())
        })
        .collect();
    Bench {
        corpus,
        queries,
        qa,
        qrels,
    }
}

/// The invariants every build must satisfy.
fn check_invariants(b: &Bench) {
    let ids: BTreeSet<&str> = b.corpus.iter().map(|d| d.id.as_str()).collect();
    assert_eq!(ids.len(), b.corpus.len(), "duplicate document ids");
    for d in &b.corpus {
        assert!(!d.text.trim().is_empty(), "empty document {}", d.id);
        assert!(
            !d.text.contains("[WordNet") && !d.text.contains("WordNet 1.5"),
            "WordNet text left in {}",
            d.id
        );
    }
    assert_eq!(b.queries.len(), b.qa.len());
    let mut lemma_split: BTreeMap<String, &str> = BTreeMap::new();
    let mut doc_split: BTreeMap<&str, &str> = BTreeMap::new();
    let mut query_split: BTreeMap<&str, &str> = BTreeMap::new();
    for (split, qrels) in &b.qrels {
        assert!(!qrels.is_empty(), "split {split} is empty");
        for (qid, docs) in qrels {
            assert!(
                b.queries.contains_key(qid),
                "qrels query {qid} not in queries.jsonl"
            );
            assert!(
                query_split.insert(qid, split).is_none(),
                "{qid} in two splits"
            );
            assert!(!docs.is_empty());
            for (d, &rel) in docs {
                assert_eq!(rel, 1);
                assert!(ids.contains(d.as_str()), "qrels doc {d} not in the corpus");
                let prev = doc_split.insert(d, split);
                assert!(
                    prev.is_none_or(|p| p == split),
                    "doc {d} relevant in two splits"
                );
            }
        }
    }
    let titles_of: BTreeMap<&str, Vec<String>> = b
        .corpus
        .iter()
        .map(|d| {
            (
                d.id.as_str(),
                d.title.split(", ").map(normalize_term).collect(),
            )
        })
        .collect();
    let mut texts = BTreeSet::new();
    for item in &b.qa {
        let split = item
            .split
            .as_deref()
            .expect("answers.jsonl lines carry a split");
        assert_eq!(
            query_split.get(item.id.as_str()),
            Some(&split),
            "{}",
            item.id
        );
        assert_eq!(b.queries[&item.id], item.question);
        assert!(
            texts.insert(normalize_term(&item.question)),
            "duplicate gloss {:?}",
            item.question
        );
        assert!(!item.answers.is_empty());
        for a in &item.answers {
            let prev = lemma_split.insert(normalize_term(a), split);
            assert!(prev.is_none_or(|p| p == split), "lemma {a} in two splits");
        }
        // The answers are headwords of the relevant entries.
        let qrels = &b.qrels[split][&item.id];
        let titles: BTreeSet<&String> = qrels.keys().flat_map(|d| &titles_of[d.as_str()]).collect();
        for a in &item.answers {
            assert!(
                titles.contains(&normalize_term(a)),
                "{a} not a title of {qrels:?}"
            );
        }
    }
}

/// No test-split gloss (a sample of up to `limit`) occurs verbatim in the corpus.
fn check_no_verbatim_test_gloss(b: &Bench, limit: usize) -> usize {
    // All titles and texts in one string, separated by a character `norm` never produces.
    let mut corpus = String::new();
    let mut starts = Vec::new();
    for d in &b.corpus {
        starts.push(corpus.len());
        corpus.push_str(&norm(&d.title));
        corpus.push('|');
        corpus.push_str(&norm(&d.text));
        corpus.push('|');
    }
    let test: Vec<&beir::QaItem> =
        b.qa.iter()
            .filter(|q| q.split.as_deref() == Some("test"))
            .collect();
    let step = (test.len() / limit.max(1)).max(1);
    let mut checked = 0;
    for q in test.iter().step_by(step).take(limit) {
        let g = norm(&q.question);
        if let Some(at) = corpus.find(&g) {
            let doc = starts.partition_point(|&s| s <= at) - 1;
            panic!(
                "test gloss {:?} ({}) occurs verbatim in document {}",
                q.question, q.id, b.corpus[doc].id
            );
        }
        checked += 1;
    }
    checked
}

#[test]
fn sampled_build_from_debian_data() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(&dir.path().join("a"));
    cfg.max_docs = Some(2000);
    let stats = revdict::build(&cfg).unwrap();
    eprintln!("{}", serde_json::to_string_pretty(&stats).unwrap());
    assert_eq!(stats.docs, 2000);
    assert!(
        stats.full_corpus_docs > 100_000,
        "{}",
        stats.full_corpus_docs
    );
    let b = load(&cfg.out_dir);
    assert_eq!(b.corpus.len(), 2000);
    check_invariants(&b);
    for s in SPLITS {
        assert!(stats.splits[s].queries > 0, "no {s} queries");
    }
    let total: usize = stats.splits.values().map(|s| s.queries).sum();
    assert_eq!(total, stats.queries);
    assert!(stats.queries > 300, "{}", stats.queries);
    assert!(check_no_verbatim_test_gloss(&b, 1000) > 10);

    // Deterministic: the same seed gives the same files.
    cfg.out_dir = dir.path().join("b");
    let again = revdict::build(&cfg).unwrap();
    assert_eq!(again.splits, stats.splits);
    for f in ["corpus.jsonl", "answers.jsonl", "qrels/test.tsv"] {
        let a = std::fs::read(dir.path().join("a").join(f)).unwrap();
        let b = std::fs::read(dir.path().join("b").join(f)).unwrap();
        assert!(a == b, "{f} differs between two builds with the same seed");
    }
}

#[test]
fn full_build_from_debian_data() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let stats = revdict::build(&cfg).unwrap();
    eprintln!("{}", serde_json::to_string_pretty(&stats).unwrap());
    let b = load(&cfg.out_dir);
    assert_eq!(b.corpus.len(), stats.docs);
    assert!(stats.docs > 100_000);
    assert!(stats.splits["test"].queries > 1000);
    check_invariants(&b);
    // A sample of the test glosses against the whole corpus.
    assert_eq!(check_no_verbatim_test_gloss(&b, 200), 200);
    // The dog: its gloss is a query and both Webster `Dog` entries are relevant.
    let dog =
        b.qa.iter()
            .find(|q| q.id == "n02084071")
            .expect("the dog synset is a query");
    assert_eq!(dog.answers[0], "dog");
    let split = dog.split.as_deref().unwrap();
    let judged = &b.qrels[split][&dog.id];
    assert!(
        judged.contains_key("dog") && judged.contains_key("dog~2"),
        "{judged:?}"
    );
}
