//! The database restarts while a writer commits and a reader searches: every commit the
//! writer was told succeeded is there exactly once, nothing is half-written, the counters
//! match the rows, and reads fail with a clear error (or succeed) rather than panic.
//!
//! Its own test binary: restarting the server would break the other tests' connections, and
//! cargo runs test binaries one at a time.

mod common;

use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use common::{document, model, Rng};
use zrag_index::store::{DenseSearch, PgOptions, Store, StoreLocation};
use zrag_index::testing;

const BATCHES: usize = 40;
const DOCS_PER_BATCH: usize = 50;

#[test]
fn restarting_postgres_mid_index_loses_and_duplicates_nothing() {
    let Some(url) = testing::postgres_url("pgt_restart") else {
        return;
    };
    let Some(restart) = testing::restart_command() else {
        if std::env::var("ZRAG_REQUIRE_POSTGRES").is_ok_and(|v| v == "1") {
            panic!("ZRAG_TEST_PG_RESTART is not set (scripts/pg.sh env)");
        }
        eprintln!("skipping: no ZRAG_TEST_PG_RESTART");
        return;
    };
    let store = Store::open_or_create(&StoreLocation::Postgres(url.clone()), &PgOptions::default())
        .unwrap();
    store.writer().unwrap().ensure_embedding(&model()).unwrap();

    let committed = AtomicUsize::new(0);
    let done = AtomicBool::new(false);
    let read_errors = AtomicUsize::new(0);
    let reads = AtomicUsize::new(0);
    std::thread::scope(|scope| {
        let writer = scope.spawn(|| {
            let mut writer = store.writer().unwrap();
            let mut rng = Rng(42);
            for batch in 0..BATCHES {
                for i in 0..DOCS_PER_BATCH {
                    writer
                        .upsert(document(batch * DOCS_PER_BATCH + i, 3, &mut rng))
                        .unwrap();
                }
                // Retries across the restart; an error here fails the test.
                writer.commit().unwrap();
                committed.fetch_add(1, Ordering::SeqCst);
            }
            done.store(true, Ordering::SeqCst);
            match &writer {
                zrag_index::store::StoreWriter::Postgres(w) => w.retried_commits(),
                _ => unreachable!(),
            }
        });
        scope.spawn(|| {
            let mut rng = Rng(7);
            while !done.load(Ordering::SeqCst) {
                let result = store.snapshot().and_then(|s| {
                    s.search(&rng.vector(), 5, DenseSearch::default())
                        .map(|_| s.num_documents())
                });
                reads.fetch_add(1, Ordering::SeqCst);
                if let Err(e) = result {
                    let message = e.to_string();
                    assert!(
                        message.contains("pgt_restart"),
                        "the error names the store: {message}"
                    );
                    read_errors.fetch_add(1, Ordering::SeqCst);
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        });
        // Two restarts while commits are in flight.
        for at in [8, 24] {
            while committed.load(Ordering::SeqCst) < at {
                std::thread::sleep(Duration::from_millis(5));
            }
            let status = Command::new("sh").arg("-c").arg(&restart).status().unwrap();
            assert!(status.success(), "{restart} failed");
        }
        let retried = writer.join().unwrap();
        eprintln!("{retried} commit attempts retried after a lost connection");
    });
    eprintln!(
        "{} reads, {} failed during the restarts",
        reads.load(Ordering::SeqCst),
        read_errors.load(Ordering::SeqCst)
    );

    let snapshot = store.snapshot().unwrap();
    let docs = BATCHES * DOCS_PER_BATCH;
    assert_eq!(snapshot.num_documents(), docs as u64);
    assert_eq!(snapshot.num_live_chunks(), 3 * docs as u64);
    // The counters against the rows themselves, and every document whole.
    let base = std::env::var("ZRAG_TEST_POSTGRES").unwrap();
    let mut client = postgres::Client::connect(&base, postgres::NoTls).unwrap();
    let row = client
        .query_one(
            "SELECT (SELECT count(*) FROM pgt_restart.documents),
                    (SELECT count(*) FROM pgt_restart.chunks),
                    (SELECT count(DISTINCT chunk_id) FROM pgt_restart.chunks),
                    (SELECT coalesce(sum(lexeme_count), 0)::bigint FROM pgt_restart.chunks),
                    (SELECT total_lexemes FROM pgt_restart.state),
                    (SELECT count(*) FROM (SELECT doc_id FROM pgt_restart.chunks GROUP BY doc_id
                                           HAVING count(*) <> 3) partial)",
            &[],
        )
        .unwrap();
    let (documents, chunks, distinct, lexemes, counted_lexemes, partial): (
        i64,
        i64,
        i64,
        i64,
        i64,
        i64,
    ) = (
        row.get(0),
        row.get(1),
        row.get(2),
        row.get(3),
        row.get(4),
        row.get(5),
    );
    assert_eq!(documents, docs as i64);
    assert_eq!(chunks, 3 * docs as i64);
    assert_eq!(distinct, chunks, "no chunk twice");
    assert_eq!(partial, 0, "no document with a partial set of chunks");
    assert_eq!(lexemes, counted_lexemes, "BM25 statistics match the rows");
}
