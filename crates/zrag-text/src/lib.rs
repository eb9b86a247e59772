//! zrag-text: the first step of zrag's data flow.
//!
//! It turns files into [`Document`]s (plain text, Markdown, HTML, PDF and
//! BEIR-style JSONL corpora), normalises their text, gives each document a
//! stable id and a content hash (so that re-indexing can skip unchanged
//! documents), and cuts documents into token-bounded, overlapping [`Chunk`]s
//! that respect paragraph, heading and sentence boundaries.
//!
//! Nothing here panics on bad input: every loader returns a [`TextError`] that
//! names the file (and the line, for JSONL), and [`load_paths`] carries on past
//! bad files and reports them in its [`LoadReport`].
//!
//! Modules:
//! - [`document`]: [`Document`], [`Format`] and the content hash.
//! - [`normalize`]: the text normalisation every loader applies.
//! - [`load`]: reading files and directories ([`load_file`], [`load_paths`]).
//! - [`formats`]: the per-format extractors (Markdown, HTML, PDF, JSONL).
//! - [`chunk`]: the token-aware [`Chunker`].
//! - `segment` (private): paragraph / sentence / word boundaries for the chunker.

pub mod chunk;
pub mod document;
pub mod error;
pub mod formats;
pub mod load;
pub mod normalize;
mod segment;

pub use chunk::{Chunk, Chunker, ChunkerConfig, TokenCounter, WhitespaceCounter};
pub use document::{content_hash, Document, Format};
pub use error::TextError;
pub use load::{
    discover, load_bytes, load_file, load_file_with, load_paths, load_paths_with, Discovery,
    LoadFailure, LoadOptions, LoadReport, SkipReason, Skipped,
};
pub use normalize::{normalize_text, normalize_title};
