//! zrag-rag: the retrieval-augmented layer on top of text, models and index.
//!
//! - [`ingest`]: files → documents → chunks → E_D embeddings → collection commits, incremental
//!   by content hash, with pruning of vanished documents.
//! - [`retriever`]: E_Q(x) · E_D(z) over the collection, and p_η(z|x) as a softmax over the
//!   top-k scores (the top-k approximation of Lewis et al.'s softmax over the whole corpus).
//!
//! Generation (RAG-Sequence, RAG-Token, posterior citations) builds on [`retriever`].

mod error;
pub mod ingest;
pub mod retriever;

pub use error::RagError;
pub use ingest::{ingest, IngestOptions, IngestProgress, IngestReport};
pub use retriever::{softmax, DenseRetriever, RetrievedChunk, RetrievedDocument};
