//! The one error type of zrag-rag.

#[derive(Debug, thiserror::Error)]
pub enum RagError {
    #[error(transparent)]
    Text(#[from] zrag_text::TextError),
    #[error(transparent)]
    Model(#[from] zrag_models::ModelError),
    #[error(transparent)]
    Index(#[from] zrag_index::IndexError),
    #[error(
        "the collection has no embeddings yet (index some documents first with `zrag index PATH`)"
    )]
    EmptyCollection,
    #[error(
        "the query encoder produces {query_dim}-dimensional vectors but the collection stores {index_dim} dimensions ({model})"
    )]
    DimensionMismatch {
        query_dim: usize,
        index_dim: usize,
        model: String,
    },
    /// Bad arguments to generation or scoring (prompt/prior mismatch, unnormalised prior,
    /// beam width 0, ...).
    #[error("invalid generation input: {0}")]
    InvalidGenerationInput(String),
    /// The generator broke the `CausalLm` contract (wrong row length, NaN log-probabilities,
    /// wrong number of scores).
    #[error("the generator returned unusable output: {0}")]
    GeneratorOutput(String),
    /// Bad arguments to a reranker (a missing or mismatched vector, a score count that does
    /// not match the chunks).
    #[error("invalid reranking input: {0}")]
    InvalidRerankInput(String),
    /// A remote (OpenAI-compatible) generator failed or answered something unusable.
    /// Decoding stopped because its [`crate::generate::CancelFlag`] was set.
    #[error("generation was cancelled")]
    Cancelled,
    /// The same document id twice in one upsert.
    #[error("document id {0:?} appears more than once in one request")]
    DuplicateDocument(String),
    #[error("remote generator {url}: {message}")]
    Remote { url: String, message: String },
}
