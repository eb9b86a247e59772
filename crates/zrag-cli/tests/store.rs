//! The CLI on a PostgreSQL + pgvector store (`scripts/pg.sh`): two shards indexed at once by
//! two processes hold exactly what one embedded run holds and search the same; re-running a
//! shard resumes; `--prune` touches only the shard's own documents; status and delete work.

mod common;

use std::path::Path;
use std::process::Command;

use common::{json_ok, sample_copy, zrag};
use serde_json::Value;
use zrag_rag::Shard;

fn on_store(url: &str, args: &[&str]) -> Value {
    let mut all = vec!["--store", url];
    all.extend_from_slice(args);
    json_ok(&zrag(Path::new("unused-collection"), &all))
}

fn hits(result: &Value) -> Vec<(String, f64)> {
    result["hits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| {
            (
                h["chunk_id"].as_str().unwrap().to_string(),
                h["score"].as_f64().unwrap(),
            )
        })
        .collect()
}

#[test]
fn sharded_postgres_index_equals_one_embedded_run() {
    let Some(url) = zrag_index::testing::postgres_url("cli_shards") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let corpus = sample_copy(tmp.path());
    let corpus_arg = corpus.to_str().unwrap();

    // Two machines, one database: both shards at the same time.
    let shard = |spec: &str| {
        Command::new(env!("CARGO_BIN_EXE_zrag"))
            .args([
                "--json", "--store", &url, "index", corpus_arg, "--shard", spec,
            ])
            .output()
            .expect("run zrag")
    };
    let (first, second) = std::thread::scope(|s| {
        let a = s.spawn(|| shard("0/2"));
        let b = s.spawn(|| shard("1/2"));
        (json_ok(&a.join().unwrap()), json_ok(&b.join().unwrap()))
    });
    let added = first["added"].as_u64().unwrap() + second["added"].as_u64().unwrap();
    assert_eq!(added, 8, "{first}\n{second}");
    assert_eq!(first["other_shards"], second["added"], "{first}\n{second}");

    let embedded = tmp.path().join("embedded");
    json_ok(&zrag(&embedded, &["index", corpus_arg]));
    let pg_status = on_store(&url, &["status"]);
    let embedded_status = json_ok(&zrag(&embedded, &["status"]));
    assert_eq!(pg_status["store"], "postgres");
    assert_eq!(pg_status["documents"], embedded_status["documents"]);
    assert_eq!(pg_status["chunks"], embedded_status["chunks"]);
    assert_eq!(pg_status["embedding"], embedded_status["embedding"]);

    for query in [
        "how do plants make oxygen",
        "what do bees make",
        "moon tides",
    ] {
        let pg = on_store(&url, &["search", query, "--k", "5", "--exact"]);
        let emb = json_ok(&zrag(&embedded, &["search", query, "--k", "5", "--exact"]));
        let (pg, emb) = (hits(&pg), hits(&emb));
        assert_eq!(pg.len(), emb.len());
        for ((a, sa), (b, sb)) in pg.iter().zip(&emb) {
            assert_eq!(a, b, "{query}");
            assert!((sa - sb).abs() < 1e-5, "{query}: {sa} vs {sb}");
        }
        let bm25 = on_store(&url, &["search", query, "--k", "3", "--mode", "hybrid"]);
        assert!(!hits(&bm25).is_empty(), "{bm25}");
    }

    // `zrag copy` moves the embedded collection into another schema without re-encoding;
    // a second copy finds everything there.
    if let Some(copy_url) = zrag_index::testing::postgres_url("cli_copy") {
        let copied = json_ok(&zrag(&embedded, &["copy", "--to", &copy_url]));
        assert_eq!(copied["documents_copied"], 8, "{copied}");
        // --from names the source even when ZRAG_STORE names the target's database.
        let again = json_ok(
            &Command::new(env!("CARGO_BIN_EXE_zrag"))
                .args(["--json", "copy", "--from", embedded.to_str().unwrap()])
                .args(["--to", &copy_url])
                .env("ZRAG_STORE", &copy_url)
                .output()
                .unwrap(),
        );
        assert_eq!(again["documents_unchanged"], 8, "{again}");
        let copy_status = on_store(&copy_url, &["status"]);
        assert_eq!(copy_status["chunks"], embedded_status["chunks"]);
        let a = hits(&on_store(
            &copy_url,
            &["search", "bees", "--k", "3", "--exact"],
        ));
        let b = hits(&json_ok(&zrag(
            &embedded,
            &["search", "bees", "--k", "3", "--exact"],
        )));
        // Same chunks; scores within rounding, since pgvector sums the inner product in its
        // own order (exact equality held only by luck of the vectors' bits).
        assert_eq!(a.len(), b.len());
        for ((id_a, score_a), (id_b, score_b)) in a.iter().zip(&b) {
            assert_eq!(id_a, id_b);
            assert!((score_a - score_b).abs() < 1e-5, "{score_a} vs {score_b}");
        }
    }

    // ask: the same RAG-Sequence answer and posteriors from either store (greedy decoding over
    // the same retrieved chunks and priors).
    let question = "What do honey bees make from nectar?";
    let ask = ["ask", question, "--k", "2", "--max-tokens", "6"];
    let from_pg = on_store(&url, &ask);
    let from_embedded = json_ok(&zrag(&embedded, &ask));
    assert_eq!(from_pg["answer"], from_embedded["answer"], "{from_pg}");
    let doc_ids = |v: &Value| -> Vec<String> {
        v["sources"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["doc_id"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(doc_ids(&from_pg), doc_ids(&from_embedded));
    let (a, b) = (
        from_pg["log_prob"].as_f64().unwrap(),
        from_embedded["log_prob"].as_f64().unwrap(),
    );
    assert!((a - b).abs() < 1e-3, "log p(y|x): {a} vs {b}");

    // A crashed or repeated shard run resumes: nothing left to embed.
    let again = on_store(&url, &["index", corpus_arg, "--shard", "0/2"]);
    assert_eq!(again["added"], 0, "{again}");
    assert_eq!(again["chunks_embedded"], 0, "{again}");
    assert_eq!(again["unchanged"], first["added"], "{again}");

    // Remove one file: only its own shard prunes it.
    let victim = corpus.join("honeybees.md");
    let victim_id = victim.to_str().unwrap().to_string();
    std::fs::remove_file(&victim).unwrap();
    let owner = if Shard::parse("0/2").unwrap().contains(&victim_id) {
        ("0/2", "1/2")
    } else {
        ("1/2", "0/2")
    };
    let other = on_store(&url, &["index", corpus_arg, "--prune", "--shard", owner.1]);
    assert_eq!(other["pruned"], 0, "{other}");
    let mine = on_store(&url, &["index", corpus_arg, "--prune", "--shard", owner.0]);
    assert_eq!(mine["pruned"], 1, "{mine}");
    assert_eq!(on_store(&url, &["status"])["documents"], 7);

    let deleted = on_store(
        &url,
        &["delete", &corpus.join("the-moon.html").to_string_lossy()],
    );
    assert_eq!(deleted["deleted"], 1, "{deleted}");
    assert_eq!(on_store(&url, &["status"])["documents"], 6);

    // Errors name the store and never show the password.
    let out = Command::new(env!("CARGO_BIN_EXE_zrag"))
        .args([
            "--store",
            "postgres://someone:hunter2@127.0.0.1:1/nowhere",
            "status",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("127.0.0.1:1/nowhere"), "{stderr}");
    assert!(!stderr.contains("hunter2"), "{stderr}");
}
