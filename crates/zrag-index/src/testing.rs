//! For tests in this and later crates: a fresh PostgreSQL schema on the test database.
//!
//! `scripts/pg.sh start` runs a real PostgreSQL + pgvector on loopback and `scripts/pg.sh env`
//! prints the variables read here. Without `ZRAG_TEST_POSTGRES` a PostgreSQL test is skipped
//! with a message, unless `ZRAG_REQUIRE_POSTGRES=1` (CI sets it), where it fails instead: a
//! skipped store test must never pass silently in CI.

use postgres::NoTls;

/// `postgres://.../db?schema=NAME` for an empty schema `name` (dropped first if it exists),
/// or `None` when no test database is configured.
pub fn postgres_url(name: &str) -> Option<String> {
    let base = match std::env::var("ZRAG_TEST_POSTGRES") {
        Ok(url) if !url.is_empty() => url,
        _ => {
            if std::env::var("ZRAG_REQUIRE_POSTGRES").is_ok_and(|v| v == "1") {
                panic!(
                    "ZRAG_REQUIRE_POSTGRES=1 but ZRAG_TEST_POSTGRES is not set: start the test \
                     database with `bash scripts/pg.sh start` and `eval \"$(bash scripts/pg.sh env)\"`"
                );
            }
            eprintln!(
                "skipping the PostgreSQL part: ZRAG_TEST_POSTGRES is not set (scripts/pg.sh)"
            );
            return None;
        }
    };
    drop_schema(&base, name);
    Some(with_schema(&base, name))
}

/// `url` with `?schema=name` (or `&schema=name`) appended.
pub fn with_schema(url: &str, name: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}schema={name}")
}

/// Removes a schema and everything in it.
pub fn drop_schema(base_url: &str, name: &str) {
    let mut client = postgres::Client::connect(base_url, NoTls)
        .unwrap_or_else(|e| panic!("connecting to the test database {base_url}: {e}"));
    client
        .batch_execute(&format!("DROP SCHEMA IF EXISTS \"{name}\" CASCADE"))
        .unwrap_or_else(|e| panic!("dropping schema {name}: {e}"));
}

/// How to restart the test database's primary (`ZRAG_TEST_PG_RESTART`, a shell command).
pub fn restart_command() -> Option<String> {
    std::env::var("ZRAG_TEST_PG_RESTART")
        .ok()
        .filter(|c| !c.is_empty())
}

/// The streaming replica of the test database (`ZRAG_TEST_POSTGRES_REPLICA`).
pub fn replica_url(name: &str) -> Option<String> {
    std::env::var("ZRAG_TEST_POSTGRES_REPLICA")
        .ok()
        .filter(|u| !u.is_empty())
        .map(|u| with_schema(&u, name))
}
