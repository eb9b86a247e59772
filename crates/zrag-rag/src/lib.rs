//! zrag-rag: the retrieval-augmented layer on top of text, models and index.
//!
//! - [`ingest`]: files → documents → chunks → E_D embeddings → collection commits, incremental
//!   by content hash, with pruning of vanished documents.
//! - [`retriever`]: E_Q(x) · E_D(z) over the collection, and p_η(z|x) as a softmax over the
//!   top-k scores (the top-k approximation of Lewis et al.'s softmax over the whole corpus).
//! - [`generate`]: RAG-Sequence and RAG-Token scoring and decoding over the k retrieved
//!   documents (one batch), with document posteriors for citations; plain generation is its
//!   k = 1 case.
//! - [`prompt`]: the fixed templates that make z ∘ x (and the retrieve-then-read and
//!   closed-book prompts) from chunks and a question.
//! - [`remote`]: an OpenAI-compatible HTTP generator for retrieve-then-read.
//! - [`rerank`]: reordering the top-n chunks by the generator (log p(x|z), UPR) or the
//!   bi-encoder, with the probabilities recomputed over the new scores.
//! - [`answer`]: the whole loop for one question: retrieve, prompt, decode, cite by posterior.

pub mod answer;
mod error;
pub mod generate;
pub mod ingest;
pub mod prompt;
pub mod remote;
pub mod rerank;
pub mod retriever;

pub use error::RagError;
pub use generate::{
    decode, score_sequence, score_token, CancelFlag, DecodeOptions, Decoded, Finish, Marginalize,
    Sampling, Search, SequenceDecoding, SequenceScore, TokenScore,
};
pub use ingest::{
    apply_documents, ingest, AnnSettings, DocumentChanges, IngestOptions, IngestProgress,
    IngestReport, Shard,
};
pub use retriever::{
    softmax, FusionMethod, Rerank, RerankInput, RetrievalMode, RetrievalSettings, RetrievedChunk,
    RetrievedDocument, Retriever,
};
