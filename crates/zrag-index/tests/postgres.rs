//! What only the PostgreSQL store has: several writers at once, schema versions, a read
//! replica, the connection pool's limit. Real PostgreSQL + pgvector (`scripts/pg.sh`).

mod common;

use std::time::Duration;

use common::{document, model, Rng};
use zrag_index::store::{DenseSearch, PgOptions, Store, StoreLocation};
use zrag_index::testing;

fn open(url: &str, options: &PgOptions) -> Store {
    Store::open_or_create(&StoreLocation::Postgres(url.to_string()), options).unwrap()
}

#[test]
fn concurrent_writers_commit_everything_once() {
    let Some(url) = testing::postgres_url("pgt_concurrent") else {
        return;
    };
    let store = open(&url, &PgOptions::default());
    store.writer().unwrap().ensure_embedding(&model()).unwrap();
    // Four writers (four indexing machines), disjoint documents, many small commits each.
    std::thread::scope(|scope| {
        for w in 0..4 {
            let store = &store;
            scope.spawn(move || {
                let mut rng = Rng(100 + w);
                let mut writer = store.writer().unwrap();
                for batch in 0..10 {
                    for i in 0..10 {
                        let n = (w as usize * 1000) + batch * 10 + i;
                        writer.upsert(document(n, 2, &mut rng)).unwrap();
                    }
                    writer.commit().unwrap();
                }
            });
        }
    });
    let snapshot = store.snapshot().unwrap();
    assert_eq!(snapshot.num_documents(), 400);
    assert_eq!(snapshot.num_live_chunks(), 800);
    assert_eq!(snapshot.generation(), 40, "one generation per commit");
    for w in 0..4 {
        let chunks = snapshot
            .document_chunks(&format!("doc-{}", w * 1000 + 55))
            .unwrap();
        assert_eq!(chunks.len(), 2);
    }
}

#[test]
fn a_schema_from_a_newer_zrag_is_refused() {
    let Some(url) = testing::postgres_url("pgt_newer") else {
        return;
    };
    drop(open(&url, &PgOptions::default()));
    let base = std::env::var("ZRAG_TEST_POSTGRES").unwrap();
    let mut client = postgres::Client::connect(&base, postgres::NoTls).unwrap();
    client
        .batch_execute("UPDATE pgt_newer.meta SET value = '99' WHERE key = 'schema_version'")
        .unwrap();
    let err = Store::open(&StoreLocation::Postgres(url), &PgOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("version 99") && err.contains("newer zrag"),
        "{err}"
    );
}

#[test]
fn the_pool_limits_connections_and_says_so() {
    let Some(url) = testing::postgres_url("pgt_pool") else {
        return;
    };
    let options = PgOptions {
        pool_size: 2,
        acquire_timeout: Duration::from_millis(300),
        ..PgOptions::default()
    };
    let store = open(&url, &options);
    // A snapshot holds its connection for its lifetime.
    let a = store.snapshot().unwrap();
    let b = store.snapshot().unwrap();
    let err = store.snapshot().unwrap_err().to_string();
    assert!(err.contains("2 pooled connections"), "{err}");
    drop(a);
    // A freed connection comes back (its read transaction rolled back first).
    let c = store.snapshot().unwrap();
    assert_eq!(c.generation(), b.generation());
}

#[test]
fn reads_go_to_the_replica_and_see_committed_writes() {
    let Some(url) = testing::postgres_url("pgt_replica") else {
        return;
    };
    let Some(replica) = testing::replica_url("pgt_replica") else {
        if std::env::var("ZRAG_REQUIRE_POSTGRES").is_ok_and(|v| v == "1") {
            panic!("ZRAG_TEST_POSTGRES_REPLICA is not set: `bash scripts/pg.sh start-replica`");
        }
        eprintln!("skipping: no ZRAG_TEST_POSTGRES_REPLICA");
        return;
    };
    let options = PgOptions {
        read_replica: Some(replica.clone()),
        ..PgOptions::default()
    };
    let store = open(&url, &options);
    let Store::Postgres(pg) = &store else {
        unreachable!()
    };
    let mut writer = store.writer().unwrap();
    writer.ensure_embedding(&model()).unwrap();
    let mut rng = Rng(9);
    for round in 0..5 {
        for i in 0..20 {
            writer
                .upsert(document(round * 20 + i, 1, &mut rng))
                .unwrap();
        }
        let generation = writer.commit().unwrap().generation;
        pg.wait_for_replica(Duration::from_secs(30)).unwrap();
        let snapshot = store.snapshot().unwrap();
        assert!(
            snapshot.describe().contains("55433")
                || snapshot.describe().contains(&redacted_host(&replica))
        );
        assert_eq!(snapshot.generation(), generation);
        assert_eq!(snapshot.num_documents(), (round as u64 + 1) * 20);
        let query = rng.vector();
        let hits = snapshot.search(&query, 5, DenseSearch::default()).unwrap();
        assert_eq!(hits[0].len(), 5);
    }
    // The replica is read-only: a snapshot there really is on the standby.
    let base = std::env::var("ZRAG_TEST_POSTGRES_REPLICA").unwrap();
    let mut client = postgres::Client::connect(&base, postgres::NoTls).unwrap();
    let in_recovery: bool = client
        .query_one("SELECT pg_is_in_recovery()", &[])
        .unwrap()
        .get(0);
    assert!(in_recovery, "the replica test needs a standby");
}

fn redacted_host(url: &str) -> String {
    zrag_index::store::postgres::redact(url)
}

#[test]
fn hnsw_settings_are_fixed_when_the_table_is_created() {
    let Some(url) = testing::postgres_url("pgt_ann") else {
        return;
    };
    let store = open(&url, &PgOptions::default());
    let mut writer = store.writer().unwrap();
    writer.set_ann_settings(true, 24, 80, 0);
    writer.ensure_embedding(&model()).unwrap();
    // Not asking for settings: whatever is there is used.
    store.writer().unwrap().ensure_embedding(&model()).unwrap();
    let mut other = store.writer().unwrap();
    other.set_ann_settings(true, 16, 100, 0);
    let err = other.ensure_embedding(&model()).unwrap_err().to_string();
    assert!(err.contains("m: 24") && err.contains("new schema"), "{err}");
}
