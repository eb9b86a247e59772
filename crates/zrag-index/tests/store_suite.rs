//! One behaviour, two stores: every test here runs the same operations on the embedded
//! collection and on PostgreSQL + pgvector (a real server, `scripts/pg.sh`), and checks both
//! against brute force and against each other. Vectors are synthetic (no model needed).

use std::collections::{BTreeSet, HashMap};

use zrag_index::collection::{Collection, EmbeddingInfo, NewDocument};
use zrag_index::filter::Filter;
use zrag_index::store::{
    ChunkKey, DenseSearch, PgOptions, Store, StoreLocation, StoreSnapshot, StoreWriter,
};
use zrag_index::testing;

mod common;

use common::{document, model, Rng, DIM};

/// The stores a test runs on; the temporary directory lives as long as this.
struct Stores {
    _dir: tempfile::TempDir,
    stores: Vec<(&'static str, Store)>,
}

fn stores(name: &str) -> Stores {
    let dir = tempfile::tempdir().unwrap();
    let mut stores = vec![(
        "embedded",
        Store::Embedded(Collection::open_or_create(dir.path().join("c")).unwrap()),
    )];
    if let Some(url) = testing::postgres_url(&format!("suite_{name}")) {
        stores.push((
            "postgres",
            Store::open_or_create(&StoreLocation::Postgres(url), &PgOptions::default()).unwrap(),
        ));
    }
    Stores { _dir: dir, stores }
}

fn writer(store: &Store) -> StoreWriter {
    let mut writer = store.writer().unwrap();
    writer.set_ann_settings(true, 16, 100, 0);
    writer.ensure_embedding(&model()).unwrap();
    writer
}

/// Loads `n` documents of 1–3 chunks; returns them (the same on every store: same seed).
fn load(store: &Store, n: usize, seed: u64) -> Vec<NewDocument> {
    let mut rng = Rng(seed);
    let docs: Vec<NewDocument> = (0..n).map(|i| document(i, 1 + i % 3, &mut rng)).collect();
    let mut writer = writer(store);
    for chunk in docs.chunks(200) {
        for doc in chunk {
            writer.upsert(doc.clone()).unwrap();
        }
        writer.commit().unwrap();
    }
    docs
}

/// Brute-force top-k chunk ids (with scores) over the documents passing `allow`.
fn brute_force(
    docs: &[NewDocument],
    query: &[f32],
    k: usize,
    allow: impl Fn(&NewDocument) -> bool,
) -> Vec<(String, f32)> {
    let mut all: Vec<(String, f32)> = docs
        .iter()
        .filter(|d| allow(d))
        .flat_map(|d| {
            d.chunks.iter().zip(d.vectors.chunks(DIM)).map(|(c, v)| {
                let score: f32 = v.iter().zip(query).map(|(a, b)| a * b).sum();
                (c.chunk_id.clone(), score)
            })
        })
        .collect();
    all.sort_by(|a, b| b.1.total_cmp(&a.1));
    all.truncate(k);
    all
}

/// Search results as (chunk id, score).
fn named(
    snapshot: &StoreSnapshot,
    hits: &[zrag_index::collection::ChunkHit],
) -> Vec<(String, f32)> {
    let keys: Vec<ChunkKey> = hits.iter().map(ChunkKey::of).collect();
    snapshot
        .fetch(&keys)
        .unwrap()
        .into_iter()
        .zip(hits)
        .map(|(f, h)| (f.chunk.chunk_id, h.score))
        .collect()
}

/// Same ids in the same order, except that chunks whose scores tie within `eps` may swap.
fn assert_same_ranking(label: &str, got: &[(String, f32)], want: &[(String, f32)], eps: f32) {
    assert_eq!(got.len(), want.len(), "{label}: {got:?} vs {want:?}");
    for (i, ((g, gs), (w, ws))) in got.iter().zip(want).enumerate() {
        assert!((gs - ws).abs() <= eps, "{label}: score {i}: {gs} vs {ws}");
        if g != w {
            // A swap is only allowed between near-equal scores.
            let tied: BTreeSet<&str> = want
                .iter()
                .filter(|(_, s)| (s - ws).abs() <= eps)
                .map(|(id, _)| id.as_str())
                .collect();
            assert!(
                tied.contains(g.as_str()),
                "{label}: rank {i}: {g} vs {w}\n{got:?}\n{want:?}"
            );
        }
    }
}

#[test]
fn documents_round_trip_replace_and_delete() {
    let stores = stores("round_trip");
    for (label, store) in &stores.stores {
        let docs = load(store, 40, 7);
        let chunks: usize = docs.iter().map(|d| d.chunks.len()).sum();
        let before = store.snapshot().unwrap();
        assert_eq!(before.num_documents(), 40, "{label}");
        assert_eq!(before.num_live_chunks(), chunks as u64, "{label}");
        assert_eq!(before.embedding(), Some(&model()), "{label}");

        let entry = before.document("doc-5").unwrap().expect("doc-5");
        assert_eq!(entry.source, "docs/5.txt", "{label}");
        assert_eq!(entry.title.as_deref(), Some("Doc 5"), "{label}");
        assert_eq!(entry.metadata["lang"], "en", "{label}");
        assert_eq!(entry.metadata["year"], 1905, "{label}");
        let stored = before.document_chunks("doc-5").unwrap();
        let texts: Vec<&str> = stored.iter().map(|c| c.text.as_str()).collect();
        let want: Vec<&str> = docs[5].chunks.iter().map(|c| c.text.as_str()).collect();
        assert_eq!(texts, want, "{label}");
        assert!(before.document("nope").unwrap().is_none(), "{label}");

        // Replace doc-5 (3 chunks → 1), delete doc-6 and an unknown id.
        let mut rng = Rng(99);
        let mut replacement = document(5, 1, &mut rng);
        replacement.chunks[0].text = "a replacement about lanterns".into();
        let mut w = writer(store);
        let known = w.known_documents(&["doc-5", "doc-6", "nope"]).unwrap();
        assert_eq!(known.len(), 2, "{label}");
        assert_eq!(known["doc-5"].content_hash, docs[5].content_hash, "{label}");
        w.upsert(replacement).unwrap();
        assert!(w.delete("doc-6").unwrap(), "{label}");
        assert!(!w.delete("nope").unwrap(), "{label}");
        let stats = w.commit().unwrap();
        assert_eq!(stats.documents_written, 1, "{label}");
        assert_eq!(stats.documents_deleted, 1, "{label}");
        drop(w);

        let after = store.snapshot().unwrap();
        assert!(after.generation() > before.generation(), "{label}");
        assert_eq!(after.num_documents(), 39, "{label}");
        let expected_chunks = chunks - docs[5].chunks.len() + 1 - docs[6].chunks.len();
        assert_eq!(after.num_live_chunks(), expected_chunks as u64, "{label}");
        assert_eq!(
            after.document_chunks("doc-5").unwrap()[0].text,
            "a replacement about lanterns",
            "{label}"
        );
        assert!(after.document("doc-6").unwrap().is_none(), "{label}");
        assert!(
            after.document_chunks("doc-6").unwrap().is_empty(),
            "{label}"
        );

        // The snapshot taken before the commit still reads the old state.
        assert_eq!(before.num_documents(), 40, "{label}");
        assert!(before.document("doc-6").unwrap().is_some(), "{label}");
        assert_eq!(
            before.document_chunks("doc-5").unwrap().len(),
            docs[5].chunks.len(),
            "{label}"
        );

        // Nothing to commit: the generation stays.
        let mut w = writer(store);
        assert!(!w.has_changes());
        assert_eq!(
            w.commit().unwrap().generation,
            after.generation(),
            "{label}"
        );
    }
}

#[test]
fn exact_search_equals_brute_force_on_both_stores() {
    let stores = stores("exact");
    let mut results: HashMap<&str, Vec<Vec<(String, f32)>>> = HashMap::new();
    for (label, store) in &stores.stores {
        let docs = load(store, 600, 11);
        let snapshot = store.snapshot().unwrap();
        let mut rng = Rng(1234);
        let queries: Vec<Vec<f32>> = (0..25).map(|_| rng.vector()).collect();
        let flat: Vec<f32> = queries.concat();
        let hits = snapshot
            .search(
                &flat,
                10,
                DenseSearch {
                    exact: true,
                    ..DenseSearch::default()
                },
            )
            .unwrap();
        let mut per_store = Vec::new();
        for (query, hits) in queries.iter().zip(&hits) {
            let got = named(&snapshot, hits);
            let want = brute_force(&docs, query, 10, |_| true);
            assert_same_ranking(label, &got, &want, 1e-5);
            per_store.push(got);
        }
        results.insert(label, per_store);
    }
    if let (Some(a), Some(b)) = (results.get("embedded"), results.get("postgres")) {
        for (x, y) in a.iter().zip(b) {
            assert_same_ranking("embedded vs postgres", x, y, 1e-5);
        }
    }
}

#[test]
fn hnsw_recall_at_10_is_at_least_095_of_exact() {
    let stores = stores("hnsw");
    for (label, store) in &stores.stores {
        let docs = load(store, 1500, 21);
        let snapshot = store.snapshot().unwrap();
        let mut rng = Rng(77);
        let queries: Vec<Vec<f32>> = (0..50).map(|_| rng.vector()).collect();
        let hits = snapshot
            .search(&queries.concat(), 10, DenseSearch::default())
            .unwrap();
        let mut found = 0;
        for (query, hits) in queries.iter().zip(&hits) {
            let want: BTreeSet<String> = brute_force(&docs, query, 10, |_| true)
                .into_iter()
                .map(|(id, _)| id)
                .collect();
            found += named(&snapshot, hits)
                .iter()
                .filter(|(id, _)| want.contains(id))
                .count();
        }
        let recall = found as f64 / (10.0 * queries.len() as f64);
        eprintln!("{label}: HNSW recall@10 {recall:.3}");
        assert!(recall >= 0.95, "{label}: recall@10 {recall}");
    }
}

/// Which documents a filter should let through.
type Allow = Box<dyn Fn(&NewDocument) -> bool>;

#[test]
fn filters_restrict_results_the_same_way() {
    let stores = stores("filters");
    for (label, store) in &stores.stores {
        let docs = load(store, 300, 5);
        let snapshot = store.snapshot().unwrap();
        let mut rng = Rng(3);
        let query = rng.vector();
        let cases: Vec<(Vec<&str>, Allow)> = vec![
            (vec!["source=*.md"], Box::new(|d| d.source.ends_with(".md"))),
            (vec!["lang=fr"], Box::new(|d| d.metadata["lang"] == "fr")),
            (
                vec!["title=Doc 1?", "lang=en"],
                Box::new(|d| {
                    d.title
                        .as_deref()
                        .is_some_and(|t| t.len() == 6 && t.starts_with("Doc 1"))
                        && d.metadata["lang"] == "en"
                }),
            ),
            (
                vec!["year=190*"],
                Box::new(|d| d.metadata["year"].to_string().starts_with("190")),
            ),
            (vec!["source=nothing*"], Box::new(|_| false)),
        ];
        for (specs, allow) in &cases {
            let filter = snapshot.prepare_filter(&Filter::parse(specs).unwrap());
            for exact in [true, false] {
                let hits = snapshot
                    .search(
                        &query,
                        10,
                        DenseSearch {
                            exact,
                            ef: Some(200),
                            filter: Some(&filter),
                        },
                    )
                    .unwrap();
                let got = named(&snapshot, &hits[0]);
                let want = brute_force(&docs, &query, 10, allow);
                let case = format!("{label} {specs:?} exact={exact}");
                if exact {
                    assert_same_ranking(&case, &got, &want, 1e-5);
                } else {
                    // Approximate: every hit passes the filter, and nearly all are the true ones.
                    let want_ids: BTreeSet<&str> = want.iter().map(|(id, _)| id.as_str()).collect();
                    let overlap = got
                        .iter()
                        .filter(|(id, _)| want_ids.contains(id.as_str()))
                        .count();
                    assert!(overlap + 1 >= want.len(), "{case}: {got:?} vs {want:?}");
                    assert_eq!(got.len(), want.len(), "{case}");
                }
            }
        }
    }
}

#[test]
fn bm25_ranks_the_rare_word_first_and_honours_filters() {
    let stores = stores("bm25");
    for (label, store) in &stores.stores {
        load(store, 120, 17);
        let mut rng = Rng(5);
        let mut special = document(500, 1, &mut rng);
        special.chunks[0].text = "The xylophonist played river songs by the harbour".into();
        special.source = "docs/special.txt".into();
        let mut w = writer(store);
        w.upsert(special).unwrap();
        w.commit().unwrap();
        let snapshot = store.snapshot().unwrap();
        let hits = snapshot.bm25_search("xylophonist river", 5, None).unwrap();
        let named = named(&snapshot, &hits);
        assert_eq!(named[0].0, "doc-500#0", "{label}: {named:?}");
        assert!(
            named[0].1 > named[1].1,
            "{label}: the rare word dominates: {named:?}"
        );
        assert!(
            named.windows(2).all(|w| w[0].1 >= w[1].1),
            "{label}: {named:?}"
        );
        // Stemming on both sides: "xylophonists" finds "xylophonist".
        let plural = snapshot.bm25_search("xylophonists", 5, None).unwrap();
        assert_eq!(plural.len(), 1, "{label}");
        assert!(
            snapshot
                .bm25_search("zzzunknownword", 5, None)
                .unwrap()
                .is_empty(),
            "{label}"
        );
        let filter = snapshot.prepare_filter(&Filter::parse(&["source=*.md"]).unwrap());
        let filtered = snapshot
            .bm25_search("xylophonist river", 5, Some(&filter))
            .unwrap();
        let filtered = self::named(&snapshot, &filtered);
        assert!(!filtered.is_empty(), "{label}");
        assert!(
            filtered.iter().all(|(id, _)| id != "doc-500#0"),
            "{label}: {filtered:?}"
        );
    }
}

#[test]
fn a_different_embedding_model_is_refused() {
    let stores = stores("mismatch");
    for (label, store) in &stores.stores {
        load(store, 3, 1);
        let mut w = store.writer().unwrap();
        let other = EmbeddingInfo {
            name: "another-model".into(),
            ..model()
        };
        let err = w.ensure_embedding(&other).unwrap_err().to_string();
        assert!(
            err.contains("another-model") && err.contains("synthetic"),
            "{label}: {err}"
        );
    }
}
