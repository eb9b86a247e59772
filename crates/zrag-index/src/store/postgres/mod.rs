//! The PostgreSQL + pgvector store: many zrag processes (servers, sharded indexers) over one
//! database.
//!
//! Layout, in a schema of its own (`?schema=NAME` in the URL, default `zrag`):
//!
//! ```text
//! meta       key → jsonb: schema_version, embedding model (name, sha256, dim), ann settings
//! state      one row: generation, live documents, live chunks, total lexemes (BM25's avgdl)
//! documents  id, source, title, content_hash, metadata jsonb, num_chunks, generation
//! chunks     id bigserial, doc_id → documents ON DELETE CASCADE, ordinal, chunk_id, text,
//!            byte range, embedding vector(dim), lexemes tsvector + lexeme_count (generated)
//!            HNSW (vector_ip_ops) on embedding, GIN on lexemes
//! ```
//!
//! A commit is one transaction: it bumps `state.generation` first (the row lock serialises
//! concurrent writers' commits), replaces every upserted document (delete + insert, its chunks
//! by binary COPY), deletes the deleted ones, and updates the counters. So a reader sees a
//! document entirely or not at all, and a crash or a database restart mid-commit leaves the
//! previous state. A snapshot is a `REPEATABLE READ READ ONLY` transaction on a pooled
//! connection (on the read replica when one is given): every query of one request sees one
//! committed state.
//!
//! Exact search turns index scans off so the planner scans and sorts; approximate search is
//! pgvector's HNSW with `hnsw.ef_search` and, under a filter, its strict-order iterative scan.
//! BM25 is computed in SQL with the same formula as the embedded store (k1 1.2, b 0.75,
//! idf ln(1 + (N − df + 0.5)/(df + 0.5))) over PostgreSQL's `english` text search.

mod pool;
mod schema;
mod snapshot;
mod vector;
mod writer;

use std::sync::Arc;
use std::time::Duration;

pub use snapshot::PgSnapshot;
pub use writer::PgWriter;

use crate::error::{IndexError, Result};
use pool::Pool;

/// Connection settings of a PostgreSQL store.
#[derive(Clone, Debug)]
pub struct PgOptions {
    /// Read queries (snapshots) go here: a streaming replica of the same database.
    pub read_replica: Option<String>,
    /// Connections per pool (one pool for the primary, one for the replica).
    pub pool_size: usize,
    /// How long a request waits for a free pooled connection.
    pub acquire_timeout: Duration,
    /// How long connecting, and a commit that lost its connection, keep retrying while the
    /// database is unreachable (a restart, a fail-over).
    pub retry_for: Duration,
}

impl Default for PgOptions {
    fn default() -> Self {
        PgOptions {
            read_replica: None,
            pool_size: 8,
            acquire_timeout: Duration::from_secs(30),
            retry_for: Duration::from_secs(60),
        }
    }
}

/// A collection in PostgreSQL: pools for the primary and the optional replica.
pub struct PgStore {
    primary: Arc<Pool>,
    replica: Option<Arc<Pool>>,
    schema: String,
    retry_for: Duration,
}

const DEFAULT_SCHEMA: &str = "zrag";

impl PgStore {
    /// Connects, creates the schema if it does not exist, and migrates it to this zrag's
    /// version (refusing a database written by a newer zrag).
    pub fn connect(url: &str, options: &PgOptions) -> Result<PgStore> {
        let (config, schema) = parse_url(url)?;
        let primary = Self::pool(config, &schema, redact(url), options);
        let replica = match &options.read_replica {
            Some(replica_url) => {
                let (config, replica_schema) = parse_url(replica_url)?;
                if replica_schema != schema {
                    return Err(IndexError::Database {
                        database: redact(replica_url),
                        message: format!(
                            "the read replica names schema {replica_schema:?} but the primary {schema:?}"
                        ),
                    });
                }
                Some(Self::pool(config, &schema, redact(replica_url), options))
            }
            None => None,
        };
        let store = PgStore {
            primary,
            replica,
            schema,
            retry_for: options.retry_for,
        };
        let mut client = store.primary.get()?;
        let describe = client.describe().to_string();
        schema::migrate(&mut client, &describe, &store.schema)?;
        Ok(store)
    }

    fn pool(
        config: postgres::Config,
        schema: &str,
        describe: String,
        options: &PgOptions,
    ) -> Arc<Pool> {
        Pool::new(
            config,
            // The extension's types and operators live in `public`.
            format!("SET search_path TO \"{schema}\", public"),
            format!("{describe} (schema {schema})"),
            options.pool_size,
            options.acquire_timeout,
            options.retry_for,
        )
    }

    pub fn describe(&self) -> &str {
        self.primary.describe()
    }

    pub fn schema(&self) -> &str {
        &self.schema
    }

    /// The latest committed generation, read on the primary.
    pub fn generation(&self) -> Result<u64> {
        let mut client = self.primary.get()?;
        let row = client
            .query_one("SELECT generation FROM state", &[])
            .map_err(|e| pg_error(client.describe(), "reading the generation", e))?;
        Ok(row.get::<_, i64>(0) as u64)
    }

    /// A consistent read of the latest state (on the read replica when there is one).
    pub fn snapshot(&self) -> Result<PgSnapshot> {
        let pool = self.replica.as_ref().unwrap_or(&self.primary);
        PgSnapshot::open(pool)
    }

    /// A consistent read on the primary, whatever the replica setting.
    pub fn primary_snapshot(&self) -> Result<PgSnapshot> {
        PgSnapshot::open(&self.primary)
    }

    pub fn writer(&self) -> Result<PgWriter> {
        PgWriter::open(self.primary.clone(), self.retry_for)
    }

    /// Waits until the read replica has replayed everything committed on the primary so far
    /// (read-your-writes after an upsert); returns at once without a replica. Gives up after
    /// `timeout` with an error that says how far behind the replica is.
    pub fn wait_for_replica(&self, timeout: Duration) -> Result<()> {
        let Some(replica) = &self.replica else {
            return Ok(());
        };
        let target: String = {
            let mut client = self.primary.get()?;
            client
                .query_one("SELECT pg_current_wal_lsn()::text", &[])
                .map_err(|e| pg_error(client.describe(), "reading the WAL position", e))?
                .get(0)
        };
        let started = std::time::Instant::now();
        let mut client = replica.get()?;
        loop {
            let caught_up: Option<bool> = client
                .query_one(
                    "SELECT pg_last_wal_replay_lsn() >= $1::text::pg_lsn",
                    &[&target],
                )
                .map_err(|e| pg_error(client.describe(), "reading the replay position", e))?
                .get(0);
            // NULL: not a standby at all, so it is the primary itself (or a copy of it).
            if caught_up.unwrap_or(true) {
                return Ok(());
            }
            if started.elapsed() >= timeout {
                return Err(IndexError::Database {
                    database: client.describe().to_string(),
                    message: format!(
                        "the read replica has not replayed WAL {target} after {timeout:?}"
                    ),
                });
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// Splits zrag's own `schema` parameter off the URL and parses the rest.
fn parse_url(url: &str) -> Result<(postgres::Config, String)> {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, query),
        None => (url, ""),
    };
    let mut schema = DEFAULT_SCHEMA.to_string();
    let mut rest = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("schema", value)) => schema = value.to_string(),
            _ => rest.push(pair),
        }
    }
    let valid = !schema.is_empty()
        && schema.len() <= 63
        // PostgreSQL reserves the pg_ prefix for system schemas.
        && !schema.starts_with("pg_")
        && schema.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
        && schema
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if !valid {
        return Err(IndexError::Database {
            database: redact(url),
            message: format!(
                "schema {schema:?}: use lower-case letters, digits and '_' (at most 63, not starting with a digit or pg_)"
            ),
        });
    }
    let stripped = if rest.is_empty() {
        base.to_string()
    } else {
        format!("{base}?{}", rest.join("&"))
    };
    let mut config: postgres::Config = stripped.parse().map_err(|e| IndexError::Postgres {
        database: redact(url),
        context: "parsing the connection URL".into(),
        source: e,
    })?;
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(Duration::from_secs(10));
    }
    config.application_name("zrag");
    Ok((config, schema))
}

/// The URL without its password, for messages and logs.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let (authority, tail) = match rest.find(['/', '?']) {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split(':').next().unwrap_or("");
            if userinfo.contains(':') {
                format!("{scheme}://{user}:***@{host}{tail}")
            } else {
                format!("{scheme}://{user}@{host}{tail}")
            }
        }
        None => url.to_string(),
    }
}

/// The server is gone or going (restart, shutdown, network): worth retrying on a new
/// connection, unlike a constraint violation or a syntax error.
pub(crate) fn is_connection_error(e: &postgres::Error) -> bool {
    if e.is_closed() {
        return true;
    }
    match e.code() {
        // Class 08 (connection exception), 57P01 admin_shutdown, 57P02 crash_shutdown,
        // 57P03 cannot_connect_now (starting up), 40001 would not apply to our reads.
        Some(code) => {
            let code = code.code();
            code.starts_with("08") || matches!(code, "57P01" | "57P02" | "57P03")
        }
        // No SQLSTATE: an I/O or protocol-level failure.
        None => {
            let text = e.to_string();
            !text.contains("db error")
        }
    }
}

pub(crate) fn pg_error(database: &str, context: &str, source: postgres::Error) -> IndexError {
    IndexError::Postgres {
        database: database.to_string(),
        context: context.to_string(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_redacted_and_schema_split_off() {
        assert_eq!(
            redact("postgres://me:secret@db.example:5432/rag?schema=a"),
            "postgres://me:***@db.example:5432/rag?schema=a"
        );
        assert_eq!(redact("postgres://me@h/d"), "postgres://me@h/d");
        assert_eq!(redact("postgres://h/d"), "postgres://h/d");
        let (config, schema) =
            parse_url("postgres://me@127.0.0.1:5/d?schema=team_a&sslmode=disable").unwrap();
        assert_eq!(schema, "team_a");
        assert_eq!(config.get_dbname(), Some("d"));
        assert_eq!(parse_url("postgres://h/d").unwrap().1, "zrag");
        for bad in ["Upper", "1x", "a-b", "x;drop", "pg_x"] {
            let err = parse_url(&format!("postgres://h/d?schema={bad}")).unwrap_err();
            assert!(err.to_string().contains("schema"), "{err}");
        }
    }
}
