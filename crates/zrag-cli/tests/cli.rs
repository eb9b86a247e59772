//! End-to-end tests of the `zrag` binary on the shipped sample corpus and the real encoder
//! (fetched by scripts/fetch-models.sh, as CI does).

mod common;

use std::process::Command;

use common::{json_ok, sample_copy, samples, zrag};
use serde_json::Value;

#[test]
fn index_search_and_incremental_reindex() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = sample_copy(tmp.path());
    let collection = tmp.path().join("c");
    let corpus_arg = corpus.to_str().unwrap();

    let report = json_ok(&zrag(&collection, &["index", corpus_arg]));
    assert_eq!(report["added"], 8, "{report}");
    assert_eq!(report["failures"].as_array().unwrap().len(), 0);

    let again = json_ok(&zrag(&collection, &["index", corpus_arg]));
    assert_eq!(again["unchanged"], 8, "{again}");
    assert_eq!(again["chunks_embedded"], 0);

    let result = json_ok(&zrag(
        &collection,
        &["search", "which planet is the hottest", "--k", "3"],
    ));
    let hits = result["hits"].as_array().unwrap();
    assert_eq!(hits.len(), 3);
    assert!(
        hits[0]["doc_id"]
            .as_str()
            .unwrap()
            .ends_with("solar-system.md"),
        "{result}"
    );
    let prob_sum: f64 = hits.iter().map(|h| h["prob"].as_f64().unwrap()).sum();
    assert!((prob_sum - 1.0).abs() < 1e-6);
    for (i, hit) in hits.iter().enumerate() {
        assert_eq!(hit["rank"], i + 1);
        for key in ["doc_id", "chunk_id", "score", "prob", "text", "source"] {
            assert!(!hit[key].is_null(), "hit lacks {key}: {hit}");
        }
    }
    // Scores are sorted and p(z|x) follows them.
    assert!(hits[0]["score"].as_f64() >= hits[1]["score"].as_f64());
    assert!(hits[0]["prob"].as_f64() >= hits[1]["prob"].as_f64());

    // Change one file, remove another: an update and (with --prune) a deletion.
    std::fs::write(
        corpus.join("coffee.txt"),
        "Coffee\n\nTea is not coffee. Green tea comes from Camellia sinensis leaves.",
    )
    .unwrap();
    std::fs::remove_file(corpus.join("honeybees.md")).unwrap();
    let without_prune = json_ok(&zrag(&collection, &["index", corpus_arg]));
    assert_eq!(without_prune["updated"], 1, "{without_prune}");
    assert_eq!(without_prune["pruned"], 0);
    let pruned = json_ok(&zrag(&collection, &["index", corpus_arg, "--prune"]));
    assert_eq!(pruned["pruned"], 1, "{pruned}");
    let status = json_ok(&zrag(&collection, &["status"]));
    assert_eq!(status["documents"], 7, "{status}");

    let bees = json_ok(&zrag(
        &collection,
        &["search", "waggle dance of bees", "--k", "7"],
    ));
    assert!(bees["hits"]
        .as_array()
        .unwrap()
        .iter()
        .all(|h| !h["doc_id"].as_str().unwrap().contains("honeybees")));
    let tea = json_ok(&zrag(
        &collection,
        &["search", "Camellia sinensis", "--k", "1"],
    ));
    assert!(tea["hits"][0]["text"]
        .as_str()
        .unwrap()
        .contains("Green tea"));
}

#[test]
fn bad_files_are_reported_by_name_and_the_rest_is_indexed() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = sample_copy(tmp.path());
    std::fs::write(corpus.join("broken.txt"), b"abc\0\x01\x02binary").unwrap();
    std::fs::write(
        corpus.join("broken.pdf"),
        b"%PDF-1.4 this is not really a pdf",
    )
    .unwrap();
    std::fs::write(
        corpus.join("bad.jsonl"),
        "{\"_id\": \"a\", \"text\": \"ok\"}\n{oops\n",
    )
    .unwrap();
    let collection = tmp.path().join("c");
    let output = zrag(&collection, &["index", corpus.to_str().unwrap()]);
    assert_eq!(
        output.status.code(),
        Some(2),
        "partial failure sets exit code 2"
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    for name in ["broken.txt", "broken.pdf", "bad.jsonl"] {
        assert!(
            stderr.contains(name),
            "stderr does not name {name}: {stderr}"
        );
    }
    let report: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(report["added"], 8, "{report}");
    assert_eq!(report["failures"].as_array().unwrap().len(), 3);
}

#[test]
fn embed_prints_unit_vectors_of_the_model_dimension() {
    let tmp = tempfile::tempdir().unwrap();
    let out = json_ok(&zrag(
        tmp.path(),
        &["embed", "a query", "another one", "--as", "document"],
    ));
    assert_eq!(out["dim"], 384);
    assert_eq!(out["model"], "all-MiniLM-L6-v2");
    let embeddings = out["embeddings"].as_array().unwrap();
    assert_eq!(embeddings.len(), 2);
    for e in embeddings {
        let v: Vec<f64> = e
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        assert_eq!(v.len(), 384);
        let norm: f64 = v.iter().map(|x| x * x).sum::<f64>().sqrt();
        assert!((norm - 1.0).abs() < 1e-4);
    }
}

#[test]
fn eval_retrieval_on_a_tiny_beir_set() {
    let tmp = tempfile::tempdir().unwrap();
    let collection = tmp.path().join("c");
    json_ok(&zrag(&collection, &["index", samples().to_str().unwrap()]));
    let queries = tmp.path().join("queries.jsonl");
    std::fs::write(
        &queries,
        concat!(
            "{\"_id\": \"q1\", \"text\": \"how do plants turn light into sugar\"}\n",
            "{\"_id\": \"q2\", \"text\": \"who first walked on the moon\"}\n",
            "{\"_id\": 3, \"text\": \"what is the borrow checker\"}\n",
            "{\"_id\": \"unjudged\", \"text\": \"ignored\"}\n"
        ),
    )
    .unwrap();
    let qrels = tmp.path().join("qrels.tsv");
    let root = samples();
    let root = root.to_str().unwrap();
    std::fs::write(
        &qrels,
        format!(
            "query-id\tcorpus-id\tscore\nq1\t{root}/photosynthesis.txt\t1\nq2\t{root}/the-moon.html\t1\n3\t{root}/rust-ownership.md\t1\n"
        ),
    )
    .unwrap();
    let report_dir = tmp.path().join("report");
    let metrics = json_ok(&zrag(
        &collection,
        &[
            "eval",
            "retrieval",
            "--queries",
            queries.to_str().unwrap(),
            "--qrels",
            qrels.to_str().unwrap(),
            "--report",
            report_dir.to_str().unwrap(),
        ],
    ));
    assert_eq!(metrics["num_queries"], 3, "{metrics}");
    assert_eq!(metrics["recall@1"], 1.0, "{metrics}");
    assert_eq!(metrics["ndcg@10"], 1.0);
    assert_eq!(metrics["mrr@10"], 1.0);
    assert!(report_dir.join("report.md").exists());
    assert!(report_dir.join("metrics.json").exists());
}

#[test]
fn missing_model_and_missing_collection_give_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_zrag"))
        .args(["--collection"])
        .arg(tmp.path().join("c"))
        .args(["embed", "x"])
        .env("ZRAG_HOME", tmp.path().join("empty-home"))
        .env_remove("ZRAG_ENCODER")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("fetch-models"), "{stderr}");

    let output = zrag(&tmp.path().join("nothing-here"), &["search", "x"]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("nothing-here") && stderr.contains("zrag index"),
        "{stderr}"
    );
}

#[test]
fn serve_refuses_to_listen_beyond_loopback_without_a_key() {
    let tmp = tempfile::tempdir().unwrap();
    let out = zrag(
        &tmp.path().join("c"),
        &["serve", "--addr", "0.0.0.0:0", "--no-generator"],
    );
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("refusing to listen on 0.0.0.0:0 without an API key"),
        "{stderr}"
    );
    // Nothing was created: the check runs before the collection is opened.
    assert!(!tmp.path().join("c").exists());
}
