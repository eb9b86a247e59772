//! `zrag search` in every mode on the sample corpus with the real encoder (and, for
//! `--rerank generator`, the real SmolLM2): BM25 follows re-indexing and pruning, hybrid
//! fusion, filters, re-ranking and the compact scan precisions.

mod common;

use std::path::Path;

use common::{json_ok, sample_copy, zrag};
use serde_json::Value;

fn hits(result: &Value) -> &Vec<Value> {
    result["hits"].as_array().expect("hits")
}

fn doc_ids(result: &Value) -> Vec<String> {
    hits(result)
        .iter()
        .map(|h| h["doc_id"].as_str().unwrap().to_string())
        .collect()
}

fn search(collection: &Path, args: &[&str]) -> Value {
    let mut all = vec!["search"];
    all.extend_from_slice(args);
    let result = json_ok(&zrag(collection, &all));
    let sum: f64 = hits(&result)
        .iter()
        .map(|h| h["prob"].as_f64().unwrap())
        .sum();
    assert!(
        hits(&result).is_empty() || (sum - 1.0).abs() < 1e-6,
        "p(z|x) sums to {sum}: {result}"
    );
    result
}

#[test]
fn bm25_and_hybrid_search_follow_the_collection() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = sample_copy(tmp.path());
    let collection = tmp.path().join("c");
    let corpus_arg = corpus.to_str().unwrap();
    json_ok(&zrag(&collection, &["index", corpus_arg]));

    let bees = search(&collection, &["waggle dance", "--mode", "bm25", "--k", "3"]);
    assert_eq!(bees["mode"], "bm25", "{bees}");
    assert!(doc_ids(&bees)[0].ends_with("honeybees.md"), "{bees}");
    // A term in no document: BM25 finds nothing rather than anything.
    let none = search(&collection, &["xylophonist", "--mode", "bm25"]);
    assert!(hits(&none).is_empty(), "{none}");

    for fusion in ["rrf", "score"] {
        let hybrid = search(
            &collection,
            &[
                "which planet is the hottest",
                "--mode",
                "hybrid",
                "--fusion",
                fusion,
                "--k",
                "4",
            ],
        );
        assert_eq!(hits(&hybrid).len(), 4, "{hybrid}");
        assert!(doc_ids(&hybrid)[0].ends_with("solar-system.md"), "{hybrid}");
    }

    // Re-indexing a changed file and pruning a removed one reach BM25 as well.
    std::fs::write(
        corpus.join("coffee.txt"),
        "Coffee\n\nTea is not coffee. Green tea comes from Camellia sinensis leaves.",
    )
    .unwrap();
    std::fs::remove_file(corpus.join("honeybees.md")).unwrap();
    json_ok(&zrag(&collection, &["index", corpus_arg, "--prune"]));
    let bees = search(&collection, &["waggle dance", "--mode", "bm25"]);
    assert!(
        doc_ids(&bees).iter().all(|d| !d.contains("honeybees")),
        "{bees}"
    );
    let tea = search(&collection, &["Camellia sinensis", "--mode", "bm25"]);
    assert_eq!(hits(&tea).len(), 1, "{tea}");
    assert!(tea["hits"][0]["text"]
        .as_str()
        .unwrap()
        .contains("Green tea"));
    let gone = search(
        &collection,
        &["roasted seeds Coffea arabica", "--mode", "bm25"],
    );
    for hit in hits(&gone) {
        assert!(
            !hit["text"].as_str().unwrap().contains("Coffea"),
            "old text of coffee.txt still found: {gone}"
        );
    }
}

#[test]
fn filters_reranking_and_precision() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = sample_copy(tmp.path());
    let collection = tmp.path().join("c");
    json_ok(&zrag(&collection, &["index", corpus.to_str().unwrap()]));

    // Filters apply in every mode.
    for mode in ["dense", "bm25", "hybrid"] {
        let result = search(
            &collection,
            &[
                "planets that orbit the Earth",
                "--mode",
                mode,
                "--filter",
                "source=*moon*",
                "--k",
                "5",
            ],
        );
        assert!(!hits(&result).is_empty(), "{mode}: {result}");
        assert!(
            doc_ids(&result).iter().all(|d| d.contains("the-moon")),
            "{mode}: {result}"
        );
    }
    let bad = zrag(&collection, &["search", "x", "--filter", "no-equals-sign"]);
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("no-equals-sign"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );

    // The bi-encoder re-ranks BM25's candidates into dense order: its top hit is dense's.
    let dense = search(&collection, &["how do plants make oxygen", "--k", "3"]);
    let reranked = search(
        &collection,
        &[
            "how do plants make oxygen",
            "--mode",
            "bm25",
            "--rerank",
            "bi-encoder",
            "--rerank-depth",
            "8",
            "--k",
            "3",
        ],
    );
    assert_eq!(doc_ids(&reranked)[0], doc_ids(&dense)[0], "{reranked}");

    // Candidates past the re-ranking depth are kept, after the re-ranked ones (a bug once
    // cut every list to the depth, which capped eval's recall@100 at the depth).
    let deep = search(
        &collection,
        &[
            "how do plants make oxygen",
            "--rerank",
            "bi-encoder",
            "--rerank-depth",
            "2",
            "--k",
            "6",
        ],
    );
    assert_eq!(hits(&deep).len(), 6, "{deep}");
    let scores: Vec<f64> = hits(&deep)
        .iter()
        .map(|h| h["score"].as_f64().unwrap())
        .collect();
    assert!(scores.windows(2).all(|w| w[0] >= w[1]), "{scores:?}");

    // The generator scores log p(query | chunk): the chunk the query was written from wins.
    let by_lm = search(
        &collection,
        &[
            "What do bees do to tell each other where flowers are?",
            "--rerank",
            "generator",
            "--rerank-depth",
            "4",
            "--k",
            "2",
        ],
    );
    assert_eq!(hits(&by_lm).len(), 2, "{by_lm}");
    assert!(doc_ids(&by_lm)[0].ends_with("honeybees.md"), "{by_lm}");

    // Compact scans re-score from f32: the same hits as f32.
    let f32_hits = doc_ids(&search(&collection, &["volcanic eruptions", "--k", "5"]));
    for precision in ["int8", "f16"] {
        json_ok(&zrag(
            &collection,
            &["index", corpus.to_str().unwrap(), "--precision", precision],
        ));
        let status = json_ok(&zrag(&collection, &["status"]));
        assert_eq!(status["precision"], precision, "{status}");
        let hits = doc_ids(&search(&collection, &["volcanic eruptions", "--k", "5"]));
        assert_eq!(hits, f32_hits, "{precision}");
    }
}
