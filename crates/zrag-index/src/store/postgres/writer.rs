//! Writing to a PostgreSQL store: upserts and deletes are buffered and applied in one
//! transaction by [`PgWriter::commit`], retried on a new connection if the database went away
//! (the transaction either committed or left nothing, and replaying it is harmless: a
//! document is replaced, never added twice).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use postgres::binary_copy::BinaryCopyInWriter;
use postgres::types::{ToSql, Type};
use postgres::Transaction;

use super::pool::{Pool, PooledClient};
use super::schema::{self, AnnSettings};
use super::vector::PgVectorRef;
use super::{is_connection_error, pg_error};
use crate::collection::{CommitStats, EmbeddingInfo, NewDocument, VectorPrecision};
use crate::error::{IndexError, Result};
use crate::store::KnownDocument;

pub struct PgWriter {
    pool: Arc<Pool>,
    describe: String,
    embedding: Option<EmbeddingInfo>,
    ann: AnnSettings,
    /// `set_ann_settings` was called: a collection whose index differs is an error.
    ann_requested: bool,
    /// Upserts by id (a later upsert of the same id replaces an earlier one).
    upserts: BTreeMap<String, NewDocument>,
    deletes: BTreeSet<String>,
    retry_for: Duration,
    retried: usize,
}

impl PgWriter {
    pub(crate) fn open(pool: Arc<Pool>, retry_for: Duration) -> Result<PgWriter> {
        let mut client = pool.get()?;
        let describe = client.describe().to_string();
        let embedding = schema::read_embedding(&mut *client, &describe)?;
        Ok(PgWriter {
            pool,
            describe,
            embedding,
            ann: AnnSettings::default(),
            ann_requested: false,
            upserts: BTreeMap::new(),
            deletes: BTreeSet::new(),
            retry_for,
            retried: 0,
        })
    }

    pub fn embedding(&self) -> Option<&EmbeddingInfo> {
        self.embedding.as_ref()
    }

    pub fn ensure_embedding(&mut self, info: &EmbeddingInfo) -> Result<()> {
        let mut client = self.pool.get()?;
        self.embedding = Some(schema::ensure_chunks_table(
            &mut client,
            &self.describe,
            info,
            self.ann,
            self.ann_requested,
        )?);
        Ok(())
    }

    /// Settings for the HNSW index the chunks table gets when it is created (they cannot
    /// change afterwards without a re-index).
    pub fn set_ann_settings(&mut self, enabled: bool, m: usize, ef_construction: usize) {
        self.ann = AnnSettings {
            enabled,
            m,
            ef_construction,
        };
        self.ann_requested = true;
    }

    pub fn check_precision(&self, precision: VectorPrecision) -> Result<()> {
        if precision == VectorPrecision::F32 {
            return Ok(());
        }
        Err(IndexError::Database {
            database: self.describe.clone(),
            message: format!(
                "precision {precision:?} applies to the embedded store; PostgreSQL keeps vector(dim) in f32"
            ),
        })
    }

    pub fn known_documents(&mut self, ids: &[&str]) -> Result<HashMap<String, KnownDocument>> {
        let mut known = HashMap::new();
        if !ids.is_empty() {
            let mut client = self.pool.get()?;
            let rows = client
                .query(
                    "SELECT id, source, content_hash FROM documents WHERE id = ANY($1)",
                    &[&ids],
                )
                .map_err(|e| pg_error(&self.describe, "reading documents", e))?;
            for row in rows {
                let doc = KnownDocument {
                    id: row.get(0),
                    source: row.get(1),
                    content_hash: row.get(2),
                };
                known.insert(doc.id.clone(), doc);
            }
        }
        for id in ids {
            if self.deletes.contains(*id) {
                known.remove(*id);
            }
            if let Some(doc) = self.upserts.get(*id) {
                known.insert(
                    doc.id.clone(),
                    KnownDocument {
                        id: doc.id.clone(),
                        source: doc.source.clone(),
                        content_hash: doc.content_hash.clone(),
                    },
                );
            }
        }
        Ok(known)
    }

    pub fn all_documents(&mut self) -> Result<Vec<KnownDocument>> {
        let mut client = self.pool.get()?;
        let rows = client
            .query(
                "SELECT id, source, content_hash FROM documents ORDER BY id",
                &[],
            )
            .map_err(|e| pg_error(&self.describe, "listing documents", e))?;
        Ok(rows
            .iter()
            .map(|row| KnownDocument {
                id: row.get(0),
                source: row.get(1),
                content_hash: row.get(2),
            })
            .collect())
    }

    pub fn upsert(&mut self, doc: NewDocument) -> Result<()> {
        let embedding = self
            .embedding
            .as_ref()
            .ok_or_else(|| IndexError::Database {
                database: self.describe.clone(),
                message: "documents added before the embedding model was recorded".into(),
            })?;
        if doc.vectors.len() != doc.chunks.len() * embedding.dim {
            if !doc.vectors.len().is_multiple_of(embedding.dim.max(1)) {
                return Err(IndexError::DimensionMismatch {
                    doc_id: doc.id.clone(),
                    expected: embedding.dim,
                    found: doc.vectors.len(),
                });
            }
            return Err(IndexError::ChunkVectorMismatch {
                doc_id: doc.id.clone(),
                n_chunks: doc.chunks.len(),
                n_vectors: doc.vectors.len() / embedding.dim.max(1),
            });
        }
        let mut doc = doc;
        // PostgreSQL text cannot hold NUL; a space keeps every byte offset.
        for chunk in &mut doc.chunks {
            if chunk.text.contains('\0') {
                chunk.text = chunk.text.replace('\0', " ");
            }
        }
        if let Some(title) = doc.title.as_mut().filter(|t| t.contains('\0')) {
            *title = title.replace('\0', " ");
        }
        self.deletes.remove(&doc.id);
        self.upserts.insert(doc.id.clone(), doc);
        Ok(())
    }

    pub fn delete(&mut self, id: &str) -> Result<bool> {
        let pending = self.upserts.remove(id).is_some();
        let mut client = self.pool.get()?;
        let stored = client
            .query_opt("SELECT 1 FROM documents WHERE id = $1", &[&id])
            .map_err(|e| pg_error(&self.describe, "looking up a document", e))?
            .is_some();
        if stored {
            self.deletes.insert(id.to_string());
        }
        Ok(stored || pending)
    }

    /// Commit attempts repeated because the connection was lost.
    pub fn retried_commits(&self) -> usize {
        self.retried
    }

    pub fn has_changes(&self) -> bool {
        !self.upserts.is_empty() || !self.deletes.is_empty()
    }

    pub fn generation(&mut self) -> Result<u64> {
        let mut client = self.pool.get()?;
        let row = client
            .query_one("SELECT generation FROM state", &[])
            .map_err(|e| pg_error(&self.describe, "reading the generation", e))?;
        Ok(row.get::<_, i64>(0) as u64)
    }

    /// Applies everything buffered in one transaction. A lost connection (the database
    /// restarting) is retried on a new one for up to `retry_for`; any other error is returned
    /// with nothing applied and the changes still buffered.
    pub fn commit(&mut self) -> Result<CommitStats> {
        if !self.has_changes() {
            return Ok(CommitStats {
                generation: self.generation()?,
                ..CommitStats::default()
            });
        }
        let started = Instant::now();
        let mut wait = Duration::from_millis(200);
        loop {
            let attempt = self
                .pool
                .get()
                .and_then(|mut client| self.try_commit(&mut client));
            match attempt {
                Ok(stats) => {
                    self.upserts.clear();
                    self.deletes.clear();
                    return Ok(stats);
                }
                Err(IndexError::Postgres { source, .. })
                    if is_connection_error(&source) && started.elapsed() < self.retry_for =>
                {
                    self.retried += 1;
                    std::thread::sleep(wait);
                    wait = (wait * 2).min(Duration::from_secs(2));
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn try_commit(&self, client: &mut PooledClient) -> Result<CommitStats> {
        let describe = self.describe.as_str();
        let err = |context: &'static str| move |e| pg_error(describe, context, e);
        let mut tx = client.transaction().map_err(err("starting a commit"))?;
        // Taking the state row first serialises concurrent writers' commits.
        let generation: i64 = tx
            .query_one(
                "UPDATE state SET generation = generation + 1 RETURNING generation",
                &[],
            )
            .map_err(err("advancing the generation"))?
            .get(0);
        let deleted: Vec<&str> = self.deletes.iter().map(String::as_str).collect();
        let upserted: Vec<&str> = self.upserts.keys().map(String::as_str).collect();
        let (removed_chunks, removed_lexemes) = if self.embedding.is_some() {
            let row = tx
                .query_one(
                    "SELECT count(*), coalesce(sum(lexeme_count), 0)::bigint FROM chunks
                     WHERE doc_id = ANY($1) OR doc_id = ANY($2)",
                    &[&deleted, &upserted],
                )
                .map_err(err("counting replaced chunks"))?;
            (row.get::<_, i64>(0), row.get::<_, i64>(1))
        } else {
            (0, 0)
        };
        // Chunks go with their documents (ON DELETE CASCADE).
        let documents_deleted = tx
            .execute("DELETE FROM documents WHERE id = ANY($1)", &[&deleted])
            .map_err(err("deleting documents"))?;
        let replaced = tx
            .execute("DELETE FROM documents WHERE id = ANY($1)", &[&upserted])
            .map_err(err("removing replaced documents"))?;
        let removed_docs = (documents_deleted + replaced) as i64;

        let chunks_written = self.copy_documents(&mut tx, generation)?;
        let new_ids = upserted;
        let added_lexemes: i64 = if new_ids.is_empty() || self.embedding.is_none() {
            0
        } else {
            tx.query_one(
                "SELECT coalesce(sum(lexeme_count), 0)::bigint FROM chunks WHERE doc_id = ANY($1)",
                &[&new_ids],
            )
            .map_err(err("counting new lexemes"))?
            .get(0)
        };
        tx.execute(
            "UPDATE state SET live_documents = live_documents + $1,
                              live_chunks = live_chunks + $2,
                              total_lexemes = total_lexemes + $3",
            &[
                &(new_ids.len() as i64 - removed_docs),
                &(chunks_written as i64 - removed_chunks),
                &(added_lexemes - removed_lexemes),
            ],
        )
        .map_err(err("updating the counters"))?;
        tx.commit().map_err(err("committing"))?;
        Ok(CommitStats {
            generation: generation as u64,
            documents_written: new_ids.len(),
            documents_deleted: documents_deleted as usize,
            chunks_written,
        })
    }

    /// Inserts the buffered documents and their chunks by binary COPY.
    fn copy_documents(&self, tx: &mut Transaction<'_>, generation: i64) -> Result<usize> {
        let describe = self.describe.as_str();
        let err = |context: &'static str| move |e| pg_error(describe, context, e);
        if self.upserts.is_empty() {
            return Ok(0);
        }
        let sink = tx
            .copy_in(
                "COPY documents (id, source, title, content_hash, metadata, num_chunks, generation)
                 FROM STDIN BINARY",
            )
            .map_err(err("starting to copy documents"))?;
        let mut writer = BinaryCopyInWriter::new(
            sink,
            &[
                Type::TEXT,
                Type::TEXT,
                Type::TEXT,
                Type::TEXT,
                Type::JSONB,
                Type::INT4,
                Type::INT8,
            ],
        );
        for doc in self.upserts.values() {
            let metadata = serde_json::Value::Object(doc.metadata.clone());
            let num_chunks = doc.chunks.len() as i32;
            let row: [&(dyn ToSql + Sync); 7] = [
                &doc.id,
                &doc.source,
                &doc.title,
                &doc.content_hash,
                &metadata,
                &num_chunks,
                &generation,
            ];
            writer.write(&row).map_err(err("copying documents"))?;
        }
        writer.finish().map_err(err("copying documents"))?;

        let Some(embedding) = &self.embedding else {
            return Ok(0);
        };
        let dim = embedding.dim;
        let vector_type = tx
            .prepare("SELECT $1::vector")
            .map_err(err("looking up the vector type"))?
            .params()[0]
            .clone();
        let sink = tx
            .copy_in(
                "COPY chunks (doc_id, ordinal, chunk_id, text, start_byte, end_byte, embedding)
                 FROM STDIN BINARY",
            )
            .map_err(err("starting to copy chunks"))?;
        let mut writer = BinaryCopyInWriter::new(
            sink,
            &[
                Type::TEXT,
                Type::INT4,
                Type::TEXT,
                Type::TEXT,
                Type::INT8,
                Type::INT8,
                vector_type,
            ],
        );
        let mut written = 0;
        for doc in self.upserts.values() {
            for (chunk, vector) in doc.chunks.iter().zip(doc.vectors.chunks_exact(dim)) {
                let ordinal = chunk.ordinal as i32;
                let (start, end) = (chunk.start_byte as i64, chunk.end_byte as i64);
                let vector = PgVectorRef(vector);
                let row: [&(dyn ToSql + Sync); 7] = [
                    &doc.id,
                    &ordinal,
                    &chunk.chunk_id,
                    &chunk.text,
                    &start,
                    &end,
                    &vector,
                ];
                writer.write(&row).map_err(err("copying chunks"))?;
                written += 1;
            }
        }
        writer.finish().map_err(err("copying chunks"))?;
        Ok(written)
    }
}
