//! The database schema, created and migrated by zrag: numbered migrations recorded in
//! `meta.schema_version`, applied in one transaction under an advisory lock so that servers
//! starting together migrate once. A database written by a newer zrag is refused, never
//! guessed at.
//!
//! The chunks table is not a migration: its `vector(dim)` column needs the embedding model's
//! dimension, so the first writer creates it (`create_chunks_table`) together with the model's
//! identity in `meta`.

use postgres::Client;

use super::pg_error;
use crate::collection::EmbeddingInfo;
use crate::error::{IndexError, Result};

/// The schema version this zrag writes and reads.
pub const SCHEMA_VERSION: i64 = 1;

/// Migration `i` takes the schema from version `i` to `i + 1`.
const MIGRATIONS: &[&str] = &[
    // 0 → 1
    r#"
    CREATE TABLE meta (key text PRIMARY KEY, value jsonb NOT NULL);
    CREATE TABLE state (
        singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
        generation bigint NOT NULL,
        live_documents bigint NOT NULL,
        live_chunks bigint NOT NULL,
        total_lexemes bigint NOT NULL
    );
    INSERT INTO state VALUES (true, 0, 0, 0, 0);
    CREATE TABLE documents (
        id text PRIMARY KEY,
        source text NOT NULL,
        title text,
        content_hash text NOT NULL,
        metadata jsonb NOT NULL DEFAULT '{}',
        num_chunks integer NOT NULL,
        generation bigint NOT NULL
    );
    CREATE INDEX documents_source ON documents (source);
    -- BM25's document length: tokens (with repeats) after the english configuration.
    CREATE FUNCTION lexeme_count(tsvector) RETURNS integer
        LANGUAGE sql IMMUTABLE PARALLEL SAFE STRICT
        AS $$ SELECT coalesce(sum(coalesce(array_length(positions, 1), 1)), 0)::integer
              FROM unnest($1) $$;
    "#,
];

/// Key of the advisory lock that serialises migrations and table creation.
const LOCK_KEY: i64 = 0x7a72_6167; // "zrag"

pub(crate) fn migrate(client: &mut Client, describe: &str, schema: &str) -> Result<()> {
    let db = describe.to_string();
    let mut tx = client
        .transaction()
        .map_err(|e| pg_error(&db, "starting the migration", e))?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&LOCK_KEY])
        .map_err(|e| pg_error(&db, "taking the migration lock", e))?;
    let has_vector = tx
        .query_opt("SELECT 1 FROM pg_extension WHERE extname = 'vector'", &[])
        .map_err(|e| pg_error(&db, "looking for pgvector", e))?
        .is_some();
    if !has_vector {
        tx.batch_execute("CREATE EXTENSION IF NOT EXISTS vector SCHEMA public")
            .map_err(|e| IndexError::Database {
                database: db.clone(),
                message: format!(
                    "the pgvector extension is not installed in this database and could not be \
                     created ({}); install pgvector and run CREATE EXTENSION vector as a superuser",
                    e.as_db_error()
                        .map_or(e.to_string(), |d| d.message().to_string())
                ),
            })?;
    }
    tx.batch_execute(&format!("CREATE SCHEMA IF NOT EXISTS \"{schema}\""))
        .map_err(|e| pg_error(&db, "creating the schema", e))?;
    let has_meta = tx
        .query_opt(
            "SELECT 1 FROM pg_tables WHERE schemaname = $1 AND tablename = 'meta'",
            &[&schema],
        )
        .map_err(|e| pg_error(&db, "reading the schema", e))?
        .is_some();
    let version: i64 = if has_meta {
        tx.query_opt(
            "SELECT (value #>> '{}')::bigint FROM meta WHERE key = 'schema_version'",
            &[],
        )
        .map_err(|e| pg_error(&db, "reading the schema version", e))?
        .map_or(0, |row| row.get(0))
    } else {
        0
    };
    if version > SCHEMA_VERSION {
        return Err(IndexError::Database {
            database: db,
            message: format!(
                "schema {schema} is at version {version}, written by a newer zrag; this zrag reads \
                 version {SCHEMA_VERSION}"
            ),
        });
    }
    for (from, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        tx.batch_execute(sql).map_err(|e| {
            pg_error(
                &db,
                &format!("migrating schema {schema} from version {from}"),
                e,
            )
        })?;
    }
    if version < SCHEMA_VERSION {
        tx.execute(
            "INSERT INTO meta VALUES ('schema_version', to_jsonb($1::bigint))
             ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            &[&SCHEMA_VERSION],
        )
        .map_err(|e| pg_error(&db, "recording the schema version", e))?;
    }
    tx.commit()
        .map_err(|e| pg_error(&db, "committing the migration", e))
}

/// HNSW settings of the chunks table's index (`enabled = false`: no index, exact only).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct AnnSettings {
    pub enabled: bool,
    pub m: usize,
    pub ef_construction: usize,
}

impl Default for AnnSettings {
    fn default() -> Self {
        AnnSettings {
            enabled: true,
            m: 16,
            ef_construction: 100,
        }
    }
}

/// Records the embedding model and creates the chunks table for its dimension, or checks
/// that the stored model is this one. Returns the stored model.
pub(crate) fn ensure_chunks_table(
    client: &mut Client,
    describe: &str,
    info: &EmbeddingInfo,
    ann: AnnSettings,
    ann_requested: bool,
) -> Result<EmbeddingInfo> {
    let mut tx = client
        .transaction()
        .map_err(|e| pg_error(describe, "starting a transaction", e))?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&LOCK_KEY])
        .map_err(|e| pg_error(describe, "taking the schema lock", e))?;
    if let Some(stored) = read_embedding(&mut tx, describe)? {
        let stored_ann: Option<AnnSettings> = tx
            .query_opt("SELECT value FROM meta WHERE key = 'ann'", &[])
            .map_err(|e| pg_error(describe, "reading the HNSW settings", e))?
            .and_then(|row| serde_json::from_value(row.get::<_, serde_json::Value>(0)).ok());
        tx.commit()
            .map_err(|e| pg_error(describe, "ending a transaction", e))?;
        if let Some(stored_ann) = stored_ann.filter(|s| ann_requested && *s != ann) {
            return Err(IndexError::Database {
                database: describe.to_string(),
                message: format!(
                    "the HNSW index was created with {stored_ann:?}; {ann:?} was requested. \
                     pgvector's index settings are fixed when the chunks table is created: \
                     copy into a new schema to change them"
                ),
            });
        }
        if stored.name != info.name || stored.sha256 != info.sha256 || stored.dim != info.dim {
            return Err(IndexError::ModelMismatch {
                path: describe.into(),
                stored: stored.describe(),
                requested: info.describe(),
            });
        }
        return Ok(stored);
    }
    let dim = info.dim;
    let mut sql = format!(
        "CREATE TABLE chunks (
            id bigserial PRIMARY KEY,
            doc_id text NOT NULL REFERENCES documents (id) ON DELETE CASCADE,
            ordinal integer NOT NULL,
            chunk_id text NOT NULL,
            text text NOT NULL,
            start_byte bigint NOT NULL,
            end_byte bigint NOT NULL,
            embedding vector({dim}) NOT NULL,
            lexemes tsvector GENERATED ALWAYS AS (to_tsvector('english'::regconfig, text)) STORED,
            lexeme_count integer GENERATED ALWAYS AS
                (lexeme_count(to_tsvector('english'::regconfig, text))) STORED,
            UNIQUE (doc_id, ordinal)
        );
        CREATE INDEX chunks_lexemes ON chunks USING gin (lexemes);"
    );
    if ann.enabled {
        sql.push_str(&format!(
            "CREATE INDEX chunks_embedding ON chunks USING hnsw (embedding vector_ip_ops)
             WITH (m = {}, ef_construction = {});",
            ann.m, ann.ef_construction
        ));
    }
    tx.batch_execute(&sql)
        .map_err(|e| pg_error(describe, "creating the chunks table", e))?;
    let value = serde_json::to_value(info).expect("embedding info serialises");
    let ann_value = serde_json::to_value(ann).expect("ann settings serialise");
    tx.execute(
        "INSERT INTO meta VALUES ('embedding', $1), ('ann', $2)",
        &[&value, &ann_value],
    )
    .map_err(|e| pg_error(describe, "recording the embedding model", e))?;
    tx.commit()
        .map_err(|e| pg_error(describe, "committing the chunks table", e))?;
    Ok(info.clone())
}

pub(crate) fn read_embedding(
    client: &mut impl postgres::GenericClient,
    describe: &str,
) -> Result<Option<EmbeddingInfo>> {
    let row = client
        .query_opt("SELECT value FROM meta WHERE key = 'embedding'", &[])
        .map_err(|e| pg_error(describe, "reading the embedding model", e))?;
    row.map(|row| {
        let value: serde_json::Value = row.get(0);
        serde_json::from_value(value).map_err(|e| IndexError::Database {
            database: describe.to_string(),
            message: format!("meta.embedding is not an embedding model description: {e}"),
        })
    })
    .transpose()
}
