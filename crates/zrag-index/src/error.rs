//! The one error type of zrag-index.

use std::path::PathBuf;

/// Everything that can go wrong while reading or writing a collection.
///
/// Every variant that concerns a file names it, so that a user who sees the message knows
/// which file is damaged or missing.
#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a zrag collection ({reason})")]
    NotACollection { path: PathBuf, reason: String },
    #[error(
        "{path}: collection format version {found} is not supported by this zrag (it reads version {supported})"
    )]
    UnsupportedVersion {
        path: PathBuf,
        found: u32,
        supported: u32,
    },
    #[error("{path}: corrupt collection file: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error(
        "collection {path} was built with embedding model {stored}, but {requested} was requested; \
         re-index into a new collection (or pass the same model)"
    )]
    ModelMismatch {
        path: PathBuf,
        stored: String,
        requested: String,
    },
    #[error("vector of dimension {found} given where the collection holds dimension {expected} (document {doc_id})")]
    DimensionMismatch {
        doc_id: String,
        expected: usize,
        found: usize,
    },
    #[error("document {doc_id}: {n_chunks} chunks but {n_vectors} vectors")]
    ChunkVectorMismatch {
        doc_id: String,
        n_chunks: usize,
        n_vectors: usize,
    },
    #[error("{path}: another process is writing to this collection (lock held)")]
    Locked { path: PathBuf },
    /// The BM25 (tantivy) index of a collection could not be opened, read or written; `path`
    /// is its directory.
    #[error("{path}: BM25 index: {message}")]
    Bm25 { path: PathBuf, message: String },
    /// A quantised vector image (f16 / int8) whose header or length is wrong; the collection
    /// adds the file name when it reads one from disk.
    #[error("malformed quantised vectors: {reason}")]
    MalformedVectors { reason: String },
    /// A PostgreSQL store's query failed; `database` is the URL without its password.
    #[error("{database}: {context}: {}", postgres_message(source))]
    Postgres {
        database: String,
        context: String,
        #[source]
        source: postgres::Error,
    },
    /// Every pooled connection stayed busy for the whole wait.
    #[error("{database}: all {size} pooled connections stayed busy for {waited:?} (raise --pg-pool-size)")]
    PoolExhausted {
        database: String,
        size: usize,
        waited: std::time::Duration,
    },
    /// A PostgreSQL store is not in a state zrag can use (schema too new, no pgvector, ...).
    #[error("{database}: {message}")]
    Database { database: String, message: String },
}

/// The server's own message (with detail) rather than the client's generic "db error".
fn postgres_message(e: &postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => match db.detail() {
            Some(detail) => format!("{} ({}; {detail})", db.message(), db.code().code()),
            None => format!("{} ({})", db.message(), db.code().code()),
        },
        None => e.to_string(),
    }
}

impl IndexError {
    /// A PostgreSQL store that cannot be reached right now (restarting, connections lost,
    /// pool exhausted): worth retrying, unlike a damaged file or a bad request.
    pub fn is_unavailable(&self) -> bool {
        match self {
            IndexError::Postgres { source, .. } => {
                crate::store::postgres::is_connection_error(source)
            }
            IndexError::PoolExhausted { .. } => true,
            _ => false,
        }
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        IndexError::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn corrupt(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        IndexError::Corrupt {
            path: path.into(),
            reason: reason.into(),
        }
    }
}

pub type Result<T, E = IndexError> = std::result::Result<T, E>;
