//! The two stores on held-out benchmark data, with the real encoder: reverse-dictionary test
//! queries (SPEC §4) over a slice of its corpus, indexed once into the embedded collection by
//! `ingest` and copied row for row into PostgreSQL + pgvector (`copy_collection`) (`scripts/pg.sh`). Exact dense
//! search must return the same top-10 on both; HNSW recall@10 against exact must be at least
//! 0.95 on both; BM25 (tantivy vs PostgreSQL full-text search with the same formula) must
//! reach about the same recall against the qrels.

use std::collections::BTreeSet;
use std::io::Write;
use std::sync::Arc;

use zrag_eval::beir;
use zrag_eval::revdict::{self, RevdictConfig};
use zrag_index::collection::Collection;
use zrag_index::store::{copy_collection, ChunkKey, PgOptions, Store, StoreLocation};
use zrag_index::testing;
use zrag_models::BertEncoder;
use zrag_rag::{ingest, AnnSettings, IngestOptions, RetrievalMode, RetrievalSettings, Retriever};

const QUERIES: usize = 300;
const CORPUS: usize = 1200;

fn chunk_ids(hits: &[zrag_rag::RetrievedChunk]) -> Vec<(String, f32)> {
    hits.iter().map(|h| (h.chunk_id.clone(), h.score)).collect()
}

#[test]
fn both_stores_agree_on_held_out_reverse_dictionary_queries() {
    let Some(url) = testing::postgres_url("rag_heldout") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let bench = tmp.path().join("revdict");
    let config = RevdictConfig::from_zrag_home(&bench);
    assert!(
        config.missing_sources().is_empty(),
        "run scripts/fetch-revdict-data.sh first"
    );
    revdict::build(&config).unwrap();
    let queries = beir::load_queries(&bench.join("queries.jsonl")).unwrap();
    let qrels = beir::load_qrels(&bench.join("qrels/test.tsv")).unwrap();
    let corpus = beir::load_corpus(&bench.join("corpus.jsonl")).unwrap();

    // The first QUERIES test queries, their answers, and other entries up to CORPUS.
    let test: Vec<&beir::Query> = queries
        .iter()
        .filter(|q| qrels.contains_key(&q.id))
        .take(QUERIES)
        .collect();
    let relevant: BTreeSet<&str> = test
        .iter()
        .flat_map(|q| qrels[&q.id].keys().map(String::as_str))
        .collect();
    let mut slice: Vec<&beir::CorpusDoc> = corpus
        .iter()
        .filter(|d| relevant.contains(d.id.as_str()))
        .collect();
    slice.extend(
        corpus
            .iter()
            .filter(|d| !relevant.contains(d.id.as_str()))
            .take(CORPUS.saturating_sub(slice.len())),
    );
    let corpus_path = tmp.path().join("slice.jsonl");
    let mut file = std::fs::File::create(&corpus_path).unwrap();
    for doc in &slice {
        let line = serde_json::json!({"_id": doc.id, "title": doc.title, "text": doc.text});
        writeln!(file, "{line}").unwrap();
    }
    drop(file);

    let dir = zrag_models::default_encoder_dir().expect("run scripts/fetch-models.sh");
    let encoder = Arc::new(BertEncoder::load(&dir).unwrap());
    let embedded = Store::Embedded(Collection::open_or_create(tmp.path().join("c")).unwrap());
    let options = IngestOptions {
        ann: Some(AnnSettings {
            enabled: true,
            m: 16,
            ef_construction: 100,
            min_rows: 0,
        }),
        ..IngestOptions::default()
    };
    ingest(&embedded, &encoder, &[corpus_path], &options, &mut ()).unwrap();
    let postgres =
        Store::open_or_create(&StoreLocation::Postgres(url), &PgOptions::default()).unwrap();
    let source = embedded.snapshot().unwrap();
    let copied = copy_collection(
        source.as_embedded().unwrap(),
        &postgres,
        500,
        &mut |_, _| {},
    )
    .unwrap();
    assert_eq!(copied.documents_copied, slice.len());
    // Stored vectors come back bit for bit.
    let pg = postgres.snapshot().unwrap();
    let first = pg
        .search(
            &source.fetch(&[ChunkKey { segment: 0, row: 0 }]).unwrap()[0].vector,
            1,
            zrag_index::store::DenseSearch {
                exact: true,
                ..Default::default()
            },
        )
        .unwrap();
    let back = pg.fetch(&[ChunkKey::of(&first[0][0])]).unwrap();
    assert_eq!(
        back[0].vector,
        source.fetch(&[ChunkKey { segment: 0, row: 0 }]).unwrap()[0].vector
    );

    let texts: Vec<&str> = test.iter().map(|q| q.text.as_str()).collect();
    let mut exact_lists = Vec::new();
    let mut bm25_recall = Vec::new();
    for (label, store) in [("embedded", &embedded), ("postgres", &postgres)] {
        let snapshot = store.snapshot().unwrap();
        assert_eq!(snapshot.num_documents(), slice.len() as u64, "{label}");
        let retriever = |mode, exact| {
            Retriever::over(encoder.clone(), store.snapshot().unwrap())
                .unwrap()
                .with_settings(RetrievalSettings {
                    mode,
                    exact,
                    ..RetrievalSettings::default()
                })
        };
        let exact = retriever(RetrievalMode::Dense, true)
            .retrieve_batch(&texts, 10)
            .unwrap();
        let approximate = retriever(RetrievalMode::Dense, false)
            .retrieve_batch(&texts, 10)
            .unwrap();
        let mut found = 0;
        for (e, a) in exact.iter().zip(&approximate) {
            let want: BTreeSet<&str> = e.iter().map(|h| h.chunk_id.as_str()).collect();
            found += a
                .iter()
                .filter(|h| want.contains(h.chunk_id.as_str()))
                .count();
        }
        let recall = found as f64 / (10 * exact.len()) as f64;
        eprintln!("{label}: HNSW recall@10 against exact {recall:.4}");
        assert!(recall >= 0.95, "{label}: HNSW recall@10 {recall}");

        let bm25 = retriever(RetrievalMode::Bm25, false)
            .retrieve_batch(&texts, 10)
            .unwrap();
        let hits: usize = test
            .iter()
            .zip(&bm25)
            .filter(|(q, hits)| hits.iter().any(|h| qrels[&q.id].contains_key(&h.doc_id)))
            .count();
        let recall = hits as f64 / test.len() as f64;
        eprintln!("{label}: BM25 success@10 against the qrels {recall:.4}");
        bm25_recall.push(recall);
        exact_lists.push(exact);
    }
    let mut differing = 0;
    for (a, b) in exact_lists[0].iter().zip(&exact_lists[1]) {
        let (a, b) = (chunk_ids(a), chunk_ids(b));
        for ((ia, sa), (ib, sb)) in a.iter().zip(&b) {
            assert!((sa - sb).abs() < 1e-5, "scores {sa} vs {sb}");
            // Ids may only differ where two chunks tie to within f32 rounding.
            if ia != ib {
                differing += 1;
                assert!(
                    a.iter().any(|(id, s)| id == ib && (s - sb).abs() < 1e-5),
                    "{a:?}\n{b:?}"
                );
            }
        }
        assert_eq!(a.len(), b.len());
    }
    eprintln!("exact top-10: {differing} positions differ only by a tie");
    assert!(
        (bm25_recall[0] - bm25_recall[1]).abs() <= 0.05,
        "BM25 tantivy {} vs PostgreSQL {}",
        bm25_recall[0],
        bm25_recall[1]
    );
}
