//! zrag-index: where vectors live and how they are searched.
//!
//! - [`exact`]: exact maximum-inner-product search (SIMD dot products, multi-threaded top-k,
//!   batched queries through a blocked matrix multiply).
//! - [`collection`]: the on-disk collection: a manifest plus immutable segments (mmap-able
//!   vectors, chunk text and metadata), atomic commits, upserts, deletes and snapshots.
//!
//! - [`hnsw`]: the HNSW proximity graph for approximate MIPS.
//! - [`bm25`], [`fusion`], [`filter`]: lexical search, rank fusion, metadata filters.
//! - [`store`]: where a collection lives, the embedded collection or PostgreSQL + pgvector,
//!   behind one snapshot / writer interface.

pub mod bm25;
pub mod collection;
mod error;
pub mod exact;
pub mod filter;
pub mod fusion;
pub mod hnsw;
pub mod store;
pub mod testing;

pub use error::{IndexError, Result};
