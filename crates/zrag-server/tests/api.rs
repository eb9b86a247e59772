//! zrag's own endpoints end to end over HTTP: documents, search, ask (JSON and SSE), health,
//! metrics, limits, access, and reads during writes.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{Options, TestServer, BEES, MOON, RUST};
use serde_json::{json, Value};
use zrag_index::store::{PgOptions, Store, StoreLocation};
use zrag_server::Limits;

fn assert_distribution(values: &[f64], what: &str) {
    let total: f64 = values.iter().sum();
    assert!((total - 1.0).abs() < 1e-6, "{what} sums to {total}");
    assert!(
        values.iter().all(|p| (0.0..=1.0).contains(p)),
        "{what}: {values:?}"
    );
}

fn error_message(body: &Value) -> String {
    body["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// A server over a fresh PostgreSQL schema (`None` without a test database).
fn postgres_server(schema: &str) -> Option<TestServer> {
    let url = zrag_index::testing::postgres_url(schema)?;
    Some(TestServer::start_store(
        postgres_store(&url),
        Options::without_generator(),
    ))
}

fn postgres_store(url: &str) -> Store {
    Store::open_or_create(
        &StoreLocation::Postgres(url.to_string()),
        &PgOptions::default(),
    )
    .unwrap()
}

#[test]
fn documents_search_and_delete_round_trip() {
    let tmp = tempfile::tempdir().unwrap();
    round_trip(&TestServer::start(tmp.path(), Options::without_generator()));
}

#[test]
fn documents_search_and_delete_round_trip_on_postgres() {
    if let Some(server) = postgres_server("srv_round_trip") {
        round_trip(&server);
    }
}

fn round_trip(server: &TestServer) {
    // Nothing committed yet: a clear conflict, not an empty 200 or a 500.
    let (status, body) = server.post("/v1/search", &json!({"query": "bees"}));
    assert_eq!(status, 409, "{body}");
    assert!(error_message(&body).contains("no documents"), "{body}");

    let report = server.upsert(&[("bees", BEES), ("moon", MOON), ("rust", RUST)]);
    assert_eq!(report["added"], 3, "{report}");
    let generation = report["generation"].as_u64().unwrap();
    // The same documents again: nothing is re-embedded, nothing committed.
    let again = server.upsert(&[("bees", BEES), ("moon", MOON)]);
    assert_eq!(again["unchanged"], 2, "{again}");
    assert_eq!(again["generation"].as_u64().unwrap(), generation);

    let (status, body) = server.post(
        "/v1/search",
        &json!({"query": "What do bees make?", "k": 3}),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["generation"].as_u64().unwrap(), generation);
    assert_eq!(body["documents"], 3);
    let hits = body["hits"].as_array().unwrap();
    assert_eq!(hits.len(), 3);
    assert_eq!(hits[0]["doc_id"], "bees", "{body}");
    let probs: Vec<f64> = hits.iter().map(|h| h["prob"].as_f64().unwrap()).collect();
    assert_distribution(&probs, "p(z|x)");

    // BM25 and hybrid see the same commit, and filters apply.
    for mode in ["bm25", "hybrid"] {
        let (status, body) = server.post(
            "/v1/search",
            &json!({"query": "ocean tides", "k": 2, "mode": mode}),
        );
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["hits"][0]["doc_id"], "moon", "{mode}: {body}");
    }
    let (_, body) = server.post(
        "/v1/search",
        &json!({"query": "bees", "k": 3, "filter": {"id": "r*"}}),
    );
    let ids: Vec<&str> = body["hits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["doc_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["rust"], "{body}");

    // Replace one document: the new text is what search finds.
    let report = server.upsert(&[("moon", "Mars has two small moons, Phobos and Deimos.")]);
    assert_eq!(report["updated"], 1, "{report}");
    let (_, body) = server.post(
        "/v1/search",
        &json!({"query": "Phobos Deimos", "k": 1, "mode": "bm25"}),
    );
    assert_eq!(body["hits"][0]["doc_id"], "moon");
    assert!(body["hits"][0]["text"].as_str().unwrap().contains("Phobos"));

    let (status, doc) = server.get_json("/v1/documents/bees");
    assert_eq!(status, 200, "{doc}");
    assert_eq!(doc["source"], "api");
    assert!(
        doc["chunks"][0]["text"]
            .as_str()
            .unwrap()
            .contains("nectar"),
        "{doc}"
    );

    let (status, body) = server.delete("/v1/documents/bees");
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["deleted"], 1);
    let (status, _) = server.delete("/v1/documents/bees");
    assert_eq!(status, 404);
    let (status, _) = server.get_json("/v1/documents/bees");
    assert_eq!(status, 404);
    // Deleted from the dense and the BM25 side alike.
    for mode in ["dense", "bm25"] {
        let (_, body) = server.post(
            "/v1/search",
            &json!({"query": "honey bees nectar", "k": 5, "mode": mode}),
        );
        let ids: Vec<&str> = body["hits"]
            .as_array()
            .unwrap()
            .iter()
            .map(|h| h["doc_id"].as_str().unwrap())
            .collect();
        assert!(!ids.contains(&"bees"), "{mode}: {body}");
        assert_eq!(body["documents"], 2);
    }

    let (status, health) = server.get_json("/healthz");
    assert_eq!(status, 200);
    assert_eq!(health["status"], "ok");
    assert_eq!(health["documents"], 2);

    let (status, metrics) = server.get("/metrics");
    assert_eq!(status, 200);
    assert!(
        metrics.contains(
            "zrag_http_requests_total{route=\"/v1/search\",method=\"POST\",status=\"200\"}"
        ),
        "{metrics}"
    );
    assert!(metrics.contains(
        "zrag_http_requests_total{route=\"/v1/search\",method=\"POST\",status=\"409\"} 1"
    ));
    assert!(metrics.contains("zrag_collection_documents 2"), "{metrics}");
    assert!(
        metrics.contains("zrag_documents_deleted_total 1"),
        "{metrics}"
    );
}

#[test]
fn bad_requests_get_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let limits = Limits {
        max_body_bytes: 64 << 10,
        max_k: 20,
        max_tokens: 32,
        max_batch: 4,
        ..Limits::default()
    };
    let server = TestServer::start(
        tmp.path(),
        Options {
            limits,
            ..Options::default()
        },
    );
    server.upsert(&[("bees", BEES), ("moon", MOON)]);

    let cases: Vec<(&str, Value, u16, &str)> = vec![
        (
            "/v1/search",
            json!({"query": "x", "k": 21}),
            400,
            "k: must be between 1 and 20",
        ),
        (
            "/v1/search",
            json!({"query": "x", "k": 0}),
            400,
            "k: must be between 1 and 20",
        ),
        (
            "/v1/search",
            json!({"query": "x", "mode": "fuzzy"}),
            400,
            "mode",
        ),
        (
            "/v1/search",
            json!({"query": "x", "filter": {"": "a"}}),
            400,
            "filter",
        ),
        ("/v1/search", json!({"k": 3}), 400, "query"),
        (
            "/v1/search",
            json!({"query": "x", "path": "/etc/passwd"}),
            400,
            "unknown field",
        ),
        (
            "/v1/ask",
            json!({"question": "x", "max_tokens": 33}),
            400,
            "max_tokens: must be between 1 and 32",
        ),
        (
            "/v1/ask",
            json!({"question": "x", "marginalize": "magic"}),
            400,
            "marginalize",
        ),
        (
            "/v1/ask",
            json!({"question": "x", "temperature": -1}),
            400,
            "temperature",
        ),
        (
            "/v1/documents",
            json!({"documents": []}),
            400,
            "between 1 and 4",
        ),
        (
            "/v1/documents",
            json!({"documents": [{"id": "", "text": "t"}]}),
            400,
            "documents[0].id",
        ),
        (
            "/v1/documents",
            json!({"documents": [{"id": "a", "text": "t"}, {"id": "a", "text": "u"}]}),
            400,
            "more than once",
        ),
        // Documents are data, never paths: a request cannot name a file to read.
        (
            "/v1/documents",
            json!({"documents": [{"id": "a", "path": "/etc/passwd"}]}),
            400,
            "unknown field",
        ),
        (
            "/v1/documents",
            json!({"documents": [{"id": "a", "text": "t", "source": "../x"}]}),
            400,
            "unknown field",
        ),
    ];
    for (path, body, status, message) in cases {
        let (got, answer) = server.post(path, &body);
        assert_eq!(got, status, "{path} {body}: {answer}");
        assert!(
            error_message(&answer).contains(message),
            "{path} {body}: {answer}"
        );
        assert_eq!(answer["error"]["code"], status);
    }
    let (status, body) = server.post_raw("/v1/search", "{not json");
    assert_eq!(status, 400, "{body}");
    assert!(!error_message(&body).is_empty());

    // Over the body limit: 413, and the server goes on serving.
    let big = "x".repeat(100 << 10);
    let (status, body) = server.post(
        "/v1/documents",
        &json!({"documents": [{"id": "big", "text": big}]}),
    );
    assert_eq!(status, 413, "{body}");
    assert!(error_message(&body).contains("too large"), "{body}");
    let (status, _) = server.post("/v1/search", &json!({"query": "bees"}));
    assert_eq!(status, 200);

    let (status, body) = server.get_json("/v1/nothing-here");
    assert_eq!(status, 404, "{body}");
}

#[test]
fn ids_never_become_paths() {
    let tmp = tempfile::tempdir().unwrap();
    let collection = tmp.path().join("collection");
    let server = TestServer::start(&collection, Options::without_generator());
    let ids = [
        "../../escape",
        "/etc/zrag-escape",
        "..\\escape",
        "a/../../b",
    ];
    let docs: Vec<(&str, &str)> = ids.iter().map(|id| (*id, BEES)).collect();
    assert_eq!(server.upsert(&docs)["added"], 4);
    // Nothing was written beside the collection.
    let outside: Vec<String> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(outside, ["collection"]);
    assert!(!std::path::Path::new("/etc/zrag-escape").exists());
    for id in ids {
        let encoded: String = id
            .bytes()
            .map(|b| match b {
                b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'.' | b'_' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect();
        let (status, doc) = server.get_json(&format!("/v1/documents/{encoded}"));
        assert_eq!(status, 200, "{id}: {doc}");
        assert_eq!(doc["id"], id);
        let (status, _) = server.delete(&format!("/v1/documents/{encoded}"));
        assert_eq!(status, 200, "{id}");
    }
}

#[test]
fn api_key_is_required_when_set() {
    let tmp = tempfile::tempdir().unwrap();
    let mut server = TestServer::start(
        tmp.path(),
        Options {
            api_key: Some("s3cret".into()),
            generator: false,
            ..Options::default()
        },
    );
    server.upsert(&[("bees", BEES)]);
    let (status, _) = server.post("/v1/search", &json!({"query": "bees"}));
    assert_eq!(status, 200);
    server.api_key = None;
    for path in [
        "/v1/search",
        "/v1/documents",
        "/v1/embeddings",
        "/v1/chat/completions",
    ] {
        let (status, body) = server.post(path, &json!({"query": "bees"}));
        assert_eq!(status, 401, "{path}: {body}");
        assert!(error_message(&body).contains("bearer token"));
    }
    let (status, _) = server.get("/metrics");
    assert_eq!(status, 401);
    server.api_key = Some("s3cre".into());
    let (status, _) = server.post("/v1/search", &json!({"query": "bees"}));
    assert_eq!(status, 401);
    // Load balancers probe health without credentials.
    server.api_key = None;
    let (status, _) = server.get("/healthz");
    assert_eq!(status, 200);
}

#[test]
fn ask_answers_with_posteriors_and_streams_in_order() {
    let tmp = tempfile::tempdir().unwrap();
    let server = TestServer::start(tmp.path(), Options::default());
    server.upsert(&[("bees", BEES), ("moon", MOON), ("rust", RUST)]);
    let question = "What do honey bees make from nectar?";
    for mode in ["sequence", "token", "none", "closed-book"] {
        let (status, answer) = server.post(
            "/v1/ask",
            &json!({"question": question, "k": 2, "max_tokens": 6, "marginalize": mode}),
        );
        assert_eq!(status, 200, "{mode}: {answer}");
        assert_eq!(answer["marginalize"], mode);
        assert!(!answer["answer"].as_str().unwrap().is_empty(), "{answer}");
        assert!(answer["log_prob"].as_f64().unwrap() < 0.0);
        let sources = answer["sources"].as_array().unwrap();
        if mode == "closed-book" {
            assert!(sources.is_empty());
            continue;
        }
        assert_eq!(sources.len(), 2);
        let retrieval: Vec<f64> = sources
            .iter()
            .map(|s| s["retrieval_prob"].as_f64().unwrap())
            .collect();
        let posterior: Vec<f64> = sources
            .iter()
            .map(|s| s["posterior"].as_f64().unwrap())
            .collect();
        assert_distribution(&retrieval, "retrieval");
        assert_distribution(&posterior, "posterior");
        assert_eq!(sources[0]["doc_id"], "bees");
    }

    // Streaming: sources (retrieval probabilities) first, then tokens, then the answer whose
    // text the tokens spell out.
    let events = server.sse(
        "/v1/ask",
        &json!({"question": question, "k": 2, "max_tokens": 8, "stream": true}),
        &mut |_, _| {},
    );
    let names: Vec<&str> = events.iter().map(|(e, _)| e.as_str()).collect();
    assert_eq!(names.first(), Some(&"sources"), "{names:?}");
    assert_eq!(names.last(), Some(&"answer"), "{names:?}");
    assert!(
        names[1..names.len() - 1].iter().all(|n| *n == "token"),
        "{names:?}"
    );
    assert!(names.len() > 2, "{names:?}");
    let sources: Value = serde_json::from_str(&events[0].1).unwrap();
    let first: Vec<f64> = sources["sources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["posterior"].as_f64().unwrap())
        .collect();
    assert_distribution(&first, "sources event");
    let streamed: String = events[1..events.len() - 1]
        .iter()
        .map(|(_, data)| {
            serde_json::from_str::<Value>(data).unwrap()["text"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    let answer: Value = serde_json::from_str(&events.last().unwrap().1).unwrap();
    assert_eq!(streamed.trim(), answer["answer"].as_str().unwrap());
    let posterior: Vec<f64> = answer["sources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["posterior"].as_f64().unwrap())
        .collect();
    assert_distribution(&posterior, "answer event");
}

#[test]
fn generation_slots_and_time_limit_answer_503_and_504() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Arc::new(TestServer::start(tmp.path(), Options::default()));
    server.upsert(&[("bees", BEES), ("moon", MOON)]);

    // One generation slot: while a stream holds it, another ask is turned away at once.
    let (started_tx, started_rx) = std::sync::mpsc::channel();
    let streaming = {
        let server = server.clone();
        std::thread::spawn(move || {
            let mut started = Some(started_tx);
            server.sse(
                "/v1/ask",
                &json!({"question": "Tell me about bees and the moon.", "max_tokens": 48, "stream": true}),
                &mut |event, _| {
                    if event == "sources" {
                        if let Some(tx) = started.take() {
                            let _ = tx.send(());
                        }
                    }
                },
            )
        })
    };
    started_rx.recv_timeout(Duration::from_secs(60)).unwrap();
    let (status, body) = server.post("/v1/ask", &json!({"question": "bees?", "max_tokens": 2}));
    assert_eq!(status, 503, "{body}");
    assert!(error_message(&body).contains("busy"), "{body}");
    // Retrieval has its own slots and still answers.
    let (status, _) = server.post("/v1/search", &json!({"query": "bees"}));
    assert_eq!(status, 200);
    let events = streaming.join().unwrap();
    assert_eq!(events.last().unwrap().0, "answer");
    // The slot is free again, and a client asking back to back never meets its own previous
    // request still holding it.
    for _ in 0..5 {
        let (status, body) = server.post("/v1/ask", &json!({"question": "bees?", "max_tokens": 2}));
        assert_eq!(status, 200, "{body}");
    }

    let (_, metrics) = server.get("/metrics");
    assert!(metrics.contains("zrag_rejected_busy_total 1"), "{metrics}");

    // A time limit far below one generation: 504, with a message that says why.
    let tmp2 = tempfile::tempdir().unwrap();
    let limits = Limits {
        request_timeout: Duration::from_millis(20),
        ..Limits::default()
    };
    let slow = TestServer::start(
        tmp2.path(),
        Options {
            limits,
            ..Options::default()
        },
    );
    slow.upsert(&[("bees", BEES)]);
    let (status, body) = slow.post("/v1/ask", &json!({"question": "bees?", "max_tokens": 64}));
    assert_eq!(status, 504, "{body}");
    assert!(
        error_message(&body).contains("longer than the limit"),
        "{body}"
    );
    // The abandoned generation is cancelled, not run to its 64 tokens: the slot comes back
    // and the metrics say why it ended.
    let mut metrics = String::new();
    for _ in 0..600 {
        metrics = slow.get("/metrics").1;
        if metrics.contains("zrag_generations_in_flight 0") {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        metrics.contains("zrag_generations_in_flight 0"),
        "{metrics}"
    );
    assert!(
        metrics.contains("zrag_generations_cancelled_total 1"),
        "{metrics}"
    );
}

/// What one search saw: its generation, that generation's document count, the documents hit.
type Observation = (u64, usize, BTreeSet<String>);

/// Readers hammer the server while a writer commits batches: every search must describe
/// exactly one committed state (the documents of all batches up to some commit, no more, no
/// fewer, and the document count of that commit).
#[test]
fn searches_during_upserts_see_only_committed_states() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Arc::new(TestServer::start(tmp.path(), Options::without_generator()));
    upserts_under_reads(server.clone(), vec![server.clone(), server]);
}

/// Two servers over one PostgreSQL database: one takes the writes, both answer searches,
/// and every answer is one committed state, whichever server gave it.
#[test]
fn two_servers_over_one_database_see_only_committed_states() {
    let Some(url) = zrag_index::testing::postgres_url("srv_two_servers") else {
        return;
    };
    let writer = Arc::new(TestServer::start_store(
        postgres_store(&url),
        Options::without_generator(),
    ));
    let other = Arc::new(TestServer::start_store(
        postgres_store(&url),
        Options::without_generator(),
    ));
    upserts_under_reads(writer.clone(), vec![writer, other]);
}

fn upserts_under_reads(server: Arc<TestServer>, readers: Vec<Arc<TestServer>>) {
    const BATCHES: usize = 12;
    const PER_BATCH: usize = 4;
    // Generation 0 is the empty collection (PostgreSQL records the embedding model before
    // the first commit, so a search may answer, with nothing, before it).
    let committed: Arc<Mutex<BTreeMap<u64, usize>>> =
        Arc::new(Mutex::new(BTreeMap::from([(0, 0)])));
    let observed: Arc<Mutex<Vec<Observation>>> = Arc::default();
    let done = Arc::new(AtomicBool::new(false));

    let readers: Vec<_> = readers
        .into_iter()
        .map(|server| {
            let (observed, done) = (observed.clone(), done.clone());
            std::thread::spawn(move || {
                while !done.load(Ordering::Relaxed) {
                    let (status, body) = server.post(
                        "/v1/search",
                        &json!({"query": "zebrafinch", "k": 50, "mode": "bm25"}),
                    );
                    if status == 409 {
                        continue; // nothing committed yet
                    }
                    assert_eq!(status, 200, "{body}");
                    let ids = body["hits"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|h| h["doc_id"].as_str().unwrap().to_string())
                        .collect();
                    observed.lock().unwrap().push((
                        body["generation"].as_u64().unwrap(),
                        body["documents"].as_u64().unwrap() as usize,
                        ids,
                    ));
                }
            })
        })
        .collect();
    for batch in 0..BATCHES {
        let docs: Vec<(String, String)> = (0..PER_BATCH)
            .map(|i| {
                (
                    format!("b{batch:02}-d{i}"),
                    format!("zebrafinch song number {i} of batch {batch}"),
                )
            })
            .collect();
        let refs: Vec<(&str, &str)> = docs.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
        let report = server.upsert(&refs);
        committed
            .lock()
            .unwrap()
            .insert(report["generation"].as_u64().unwrap(), batch + 1);
    }
    std::thread::sleep(Duration::from_millis(200));
    done.store(true, Ordering::Relaxed);
    for reader in readers {
        reader.join().unwrap();
    }
    let committed = committed.lock().unwrap();
    let observed = observed.lock().unwrap();
    assert!(
        observed.len() > BATCHES,
        "only {} searches ran",
        observed.len()
    );
    let mut generations_seen = BTreeSet::new();
    for (generation, documents, ids) in observed.iter() {
        let batches = *committed
            .get(generation)
            .unwrap_or_else(|| panic!("generation {generation} was never committed by a batch"));
        let expected: BTreeSet<String> = (0..batches)
            .flat_map(|b| (0..PER_BATCH).map(move |i| format!("b{b:02}-d{i}")))
            .collect();
        assert_eq!(*documents, batches * PER_BATCH, "generation {generation}");
        assert_eq!(ids, &expected, "generation {generation}");
        generations_seen.insert(*generation);
    }
    assert!(
        generations_seen.len() > 1,
        "the readers saw only {generations_seen:?}"
    );
}
