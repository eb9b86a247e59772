//! Per-format text extraction. Each extractor takes decoded text (or bytes,
//! for PDF) and returns the document's title and text; the loaders in
//! [`load`](crate::load) handle files, sizes, encodings and errors.
//!
//! These functions are total: any input gives some output or an error, never
//! a panic, which is what their future fuzz targets will check.

pub(crate) mod encoding;
pub mod html;
pub mod jsonl;
pub mod markdown;
pub mod pdf;

/// The title and text an extractor found in one file.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Extracted {
    /// The title, already whitespace-normalised; `None` when there is none.
    pub title: Option<String>,
    /// The text, already normalised with [`normalize_text`](crate::normalize_text).
    pub text: String,
}
