//! A consistent read of a PostgreSQL store: one `REPEATABLE READ READ ONLY` transaction on a
//! pooled connection, held until the snapshot is dropped.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use postgres::types::ToSql;

use super::pool::{Pool, PooledClient};
use super::vector::{PgVector, PgVectorRef};
use super::{pg_error, schema};
use crate::collection::{ChunkHit, DocEntry, EmbeddingInfo, StoredChunk, DEFAULT_EF};
use crate::error::{IndexError, Result};
use crate::filter::Filter;
use crate::store::{ChunkKey, FetchedChunk};

/// pgvector caps `hnsw.ef_search` at 1000.
const MAX_EF_SEARCH: usize = 1000;

/// BM25 parameters, the same as the embedded store's (tantivy's defaults).
const BM25_K1: f64 = 1.2;
const BM25_B: f64 = 0.75;

pub struct PgSnapshot {
    client: Mutex<PooledClient>,
    describe: String,
    generation: u64,
    live_documents: u64,
    live_chunks: u64,
    total_lexemes: u64,
    embedding: Option<EmbeddingInfo>,
}

impl PgSnapshot {
    pub(crate) fn open(pool: &Arc<Pool>) -> Result<PgSnapshot> {
        let mut client = pool.get()?;
        let describe = client.describe().to_string();
        client
            .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .map_err(|e| pg_error(&describe, "starting a read transaction", e))?;
        client.in_transaction = true;
        let row = client
            .query_one(
                "SELECT generation, live_documents, live_chunks, total_lexemes FROM state",
                &[],
            )
            .map_err(|e| pg_error(&describe, "reading the collection state", e))?;
        let embedding = schema::read_embedding(&mut *client, &describe)?;
        Ok(PgSnapshot {
            generation: row.get::<_, i64>(0) as u64,
            live_documents: row.get::<_, i64>(1) as u64,
            live_chunks: row.get::<_, i64>(2) as u64,
            total_lexemes: row.get::<_, i64>(3) as u64,
            embedding,
            describe,
            client: Mutex::new(client),
        })
    }

    pub fn describe(&self) -> &str {
        &self.describe
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    pub fn embedding(&self) -> Option<&EmbeddingInfo> {
        self.embedding.as_ref()
    }

    pub fn num_documents(&self) -> u64 {
        self.live_documents
    }

    pub fn num_live_chunks(&self) -> u64 {
        self.live_chunks
    }

    fn client(&self) -> MutexGuard<'_, PooledClient> {
        self.client.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn error(&self, context: &str, e: postgres::Error) -> IndexError {
        pg_error(&self.describe, context, e)
    }

    pub fn document(&self, id: &str) -> Result<Option<DocEntry>> {
        let row = self
            .client()
            .query_opt(
                "SELECT id, source, title, content_hash, metadata, num_chunks FROM documents
                 WHERE id = $1",
                &[&id],
            )
            .map_err(|e| self.error("reading a document", e))?;
        Ok(row.map(|row| {
            let metadata: serde_json::Value = row.get(4);
            DocEntry {
                id: row.get(0),
                source: row.get(1),
                title: row.get(2),
                content_hash: row.get(3),
                metadata: metadata.as_object().cloned().unwrap_or_default(),
                segment: None,
                first_row: 0,
                rows: row.get::<_, i32>(5) as u32,
            }
        }))
    }

    pub fn document_chunks(&self, id: &str) -> Result<Vec<StoredChunk>> {
        if self.embedding.is_none() {
            return Ok(Vec::new());
        }
        let rows = self
            .client()
            .query(
                "SELECT chunk_id, doc_id, ordinal, text, start_byte, end_byte FROM chunks
                 WHERE doc_id = $1 ORDER BY ordinal",
                &[&id],
            )
            .map_err(|e| self.error("reading a document's chunks", e))?;
        Ok(rows.iter().map(|row| stored_chunk(row, 0)).collect())
    }

    /// Dense search, one statement per query, all in this snapshot's transaction.
    pub fn search(
        &self,
        queries: &[f32],
        k: usize,
        exact: bool,
        ef: Option<usize>,
        filter: Option<&Filter>,
    ) -> Result<Vec<Vec<ChunkHit>>> {
        let Some(embedding) = &self.embedding else {
            return Ok(vec![Vec::new(); usize::from(!queries.is_empty())]);
        };
        let dim = embedding.dim;
        if dim == 0 || !queries.len().is_multiple_of(dim) {
            return Err(IndexError::DimensionMismatch {
                doc_id: "<query>".into(),
                expected: dim,
                found: queries.len(),
            });
        }
        if k == 0 {
            return Ok(vec![Vec::new(); queries.len() / dim]);
        }
        let ef = ef.unwrap_or(DEFAULT_EF).max(2 * k).min(MAX_EF_SEARCH);
        // Exact: no index scan, so the planner reads every row and sorts (a top-N heap).
        // Approximate under a filter: pgvector's iterative scan keeps walking the graph until
        // k rows pass, in exact distance order, rather than filtering a fixed candidate list.
        let settings = format!(
            "SET LOCAL enable_indexscan = {}; SET LOCAL hnsw.ef_search = {ef};
             SET LOCAL hnsw.iterative_scan = strict_order;",
            if exact { "off" } else { "on" }
        );
        let (condition, params) = filter_sql(filter, 3);
        let sql = format!(
            "SELECT id, -(embedding <#> $1) FROM chunks {condition}
             ORDER BY embedding <#> $1 LIMIT $2"
        );
        let mut client = self.client();
        client
            .batch_execute(&settings)
            .map_err(|e| self.error("setting up a dense search", e))?;
        let statement = client
            .prepare(&sql)
            .map_err(|e| self.error("preparing a dense search", e))?;
        let limit = k as i64;
        let mut out = Vec::with_capacity(queries.len() / dim);
        for query in queries.chunks_exact(dim) {
            let vector = PgVectorRef(query);
            let mut args: Vec<&(dyn ToSql + Sync)> = vec![&vector, &limit];
            args.extend(params.iter().map(|p| p as &(dyn ToSql + Sync)));
            let rows = client
                .query(&statement, &args)
                .map_err(|e| self.error("running a dense search", e))?;
            out.push(
                rows.iter()
                    .map(|row| hit(row.get::<_, i64>(0), row.get::<_, f64>(1)))
                    .collect(),
            );
        }
        Ok(out)
    }

    /// BM25 over the chunk text, in SQL (see the module doc of `store::postgres`).
    pub fn bm25_search(
        &self,
        query: &str,
        k: usize,
        filter: Option<&Filter>,
    ) -> Result<Vec<ChunkHit>> {
        if k == 0 || self.embedding.is_none() || self.live_chunks == 0 {
            return Ok(Vec::new());
        }
        let n = self.live_chunks as f64;
        let avgdl = (self.total_lexemes as f64 / n).max(1.0);
        let (condition, params) = filter_sql(filter, 5);
        let condition = condition.replacen("WHERE", "AND", 1);
        // df counts every live chunk (corpus statistics), the filter only limits candidates.
        // MATERIALIZED: inlined, the df subquery would run once per (candidate, term) pair.
        let sql = format!(
            "WITH q AS MATERIALIZED (
                 SELECT DISTINCT lexeme FROM unnest(to_tsvector('english'::regconfig, $1))
             ), qa AS MATERIALIZED (
                 SELECT array_agg(lexeme) AS lexemes,
                        string_agg(quote_literal(lexeme), ' | ')::tsquery AS query
                 FROM q
             ), df AS MATERIALIZED (
                 SELECT q.lexeme,
                        (SELECT count(*) FROM chunks c
                          WHERE c.lexemes @@ quote_literal(q.lexeme)::tsquery) AS n
                 FROM q
             ), cand AS MATERIALIZED (
                 -- Only the query's own lexemes of each candidate: marked with weight A and
                 -- filtered in C, rather than unnesting every lexeme of every candidate.
                 SELECT c.id, c.lexeme_count,
                        ts_filter(setweight(c.lexemes, 'A', qa.lexemes), '{{a}}') AS matched
                 FROM chunks c, qa
                 WHERE c.lexemes @@ qa.query
                 {condition}
             )
             SELECT cand.id,
                    sum(ln(1 + ($2::float8 - df.n + 0.5) / (df.n + 0.5))
                        * t.tf * ({k1} + 1)
                        / (t.tf + {k1} * (1 - {b} + {b} * cand.lexeme_count / $3::float8))) AS score
             FROM cand
             CROSS JOIN LATERAL (
                 SELECT u.lexeme, coalesce(array_length(u.positions, 1), 1)::float8 AS tf
                 FROM unnest(cand.matched) u
             ) t
             JOIN df ON df.lexeme = t.lexeme
             GROUP BY cand.id
             ORDER BY score DESC, cand.id
             LIMIT $4::bigint",
            k1 = BM25_K1,
            b = BM25_B,
        );
        let limit = k as i64;
        let mut args: Vec<&(dyn ToSql + Sync)> = vec![&query, &n, &avgdl, &limit];
        args.extend(params.iter().map(|p| p as &(dyn ToSql + Sync)));
        let rows = self
            .client()
            .query(&sql, &args)
            .map_err(|e| self.error("running a BM25 search", e))?;
        Ok(rows
            .iter()
            .map(|row| hit(row.get::<_, i64>(0), row.get::<_, f64>(1)))
            .collect())
    }

    /// The chunks behind `keys`, with their documents' title and source and their vectors.
    pub fn fetch(&self, keys: &[ChunkKey]) -> Result<Vec<FetchedChunk>> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<i64> = keys.iter().map(|k| k.to_u64() as i64).collect();
        let rows = self
            .client()
            .query(
                "SELECT c.id, c.chunk_id, c.doc_id, c.ordinal, c.text, c.start_byte, c.end_byte,
                        c.embedding, d.title, d.source
                 FROM chunks c JOIN documents d ON d.id = c.doc_id
                 WHERE c.id = ANY($1)",
                &[&ids],
            )
            .map_err(|e| self.error("reading chunks", e))?;
        let mut by_id: HashMap<i64, FetchedChunk> = HashMap::with_capacity(rows.len());
        for row in &rows {
            let id: i64 = row.get(0);
            let vector: PgVector = row.get(7);
            by_id.insert(
                id,
                FetchedChunk {
                    key: ChunkKey::from_u64(id as u64),
                    chunk: stored_chunk(row, 1),
                    vector: vector.0,
                    title: row.get(8),
                    source: row.get(9),
                },
            );
        }
        ids.iter()
            .map(|id| {
                by_id.get(id).cloned().ok_or_else(|| IndexError::Database {
                    database: self.describe.clone(),
                    message: format!("chunk {id} is not in this snapshot"),
                })
            })
            .collect()
    }
}

/// A chunk from six columns starting at `first`: chunk_id, doc_id, ordinal, text, start_byte,
/// end_byte (the order every chunk query here selects them in).
fn stored_chunk(row: &postgres::Row, first: usize) -> StoredChunk {
    StoredChunk {
        chunk_id: row.get(first),
        doc_id: row.get(first + 1),
        ordinal: row.get::<_, i32>(first + 2) as u32,
        text: row.get(first + 3),
        start_byte: row.get::<_, i64>(first + 4) as usize,
        end_byte: row.get::<_, i64>(first + 5) as usize,
    }
}

fn hit(id: i64, score: f64) -> ChunkHit {
    let key = ChunkKey::from_u64(id as u64);
    ChunkHit {
        segment: key.segment,
        row: key.row,
        score: score as f32,
    }
}

/// A filter as SQL over `chunks` (a `WHERE doc_id IN (...)` clause, empty without
/// conditions) and its parameters, numbered from `$first`. Globs become LIKE patterns: `*` →
/// `%`, `?` → `_`, with `%`, `_` and `\` escaped.
pub(crate) fn filter_sql(filter: Option<&Filter>, first: usize) -> (String, Vec<String>) {
    let Some(filter) = filter.filter(|f| !f.is_empty()) else {
        return (String::new(), Vec::new());
    };
    let mut params = Vec::new();
    let mut conditions = Vec::new();
    for (key, pattern) in filter.conditions() {
        let like = glob_to_like(pattern);
        let column = match key {
            "source" => "source".to_string(),
            "id" | "doc_id" => "id".to_string(),
            "title" => "title".to_string(),
            field => {
                params.push(field.to_string());
                format!("metadata ->> ${}", first + params.len() - 1)
            }
        };
        params.push(like);
        conditions.push(format!(
            "{column} LIKE ${} ESCAPE '\\'",
            first + params.len() - 1
        ));
    }
    (
        format!(
            "WHERE doc_id IN (SELECT id FROM documents WHERE {})",
            conditions.join(" AND ")
        ),
        params,
    )
}

fn glob_to_like(glob: &str) -> String {
    let mut out = String::with_capacity(glob.len() + 4);
    for c in glob.chars() {
        match c {
            '*' => out.push('%'),
            '?' => out.push('_'),
            '%' | '_' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_become_escaped_like_patterns() {
        assert_eq!(glob_to_like("docs/*.md"), "docs/%.md");
        assert_eq!(glob_to_like("a?c"), "a_c");
        assert_eq!(glob_to_like("100%_x\\"), "100\\%\\_x\\\\");
        let filter = Filter::parse(&["source=*.md", "lang=en"]).unwrap();
        let (sql, params) = filter_sql(Some(&filter), 3);
        assert_eq!(
            sql,
            "WHERE doc_id IN (SELECT id FROM documents WHERE source LIKE $3 ESCAPE '\\' AND metadata ->> $4 LIKE $5 ESCAPE '\\')"
        );
        assert_eq!(params, vec!["%.md", "lang", "en"]);
        assert_eq!(filter_sql(None, 3), (String::new(), Vec::new()));
    }
}
