//! zrag-index: where vectors live and how they are searched.
//!
//! - [`exact`]: exact maximum-inner-product search (SIMD dot products, multi-threaded top-k,
//!   batched queries through a blocked matrix multiply).
//! - [`collection`]: the on-disk collection: a manifest plus immutable segments (mmap-able
//!   vectors, chunk text and metadata), atomic commits, upserts, deletes and snapshots.
//!
//! - [`hnsw`]: the HNSW proximity graph (in memory so far) for approximate MIPS.
//!
//! BM25 and persisted approximate indexes plug in beside `exact` behind the same hit type.

pub mod bm25;
pub mod collection;
mod error;
pub mod exact;
pub mod filter;
pub mod fusion;
pub mod hnsw;

pub use error::{IndexError, Result};
