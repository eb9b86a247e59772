//! The error type of loading documents.
//!
//! Every variant concerns one file and names it in its message (and the line,
//! for JSONL), because these messages end up in front of a user who indexed a
//! directory of thousands of files and needs to know which one to fix.

use std::path::{Path, PathBuf};

/// Why a file could not be turned into documents.
#[derive(Debug, thiserror::Error)]
pub enum TextError {
    /// Reading the file (or listing the directory) failed.
    #[error("{}: {source}", .path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// The path exists but is neither a regular file nor a directory (a FIFO,
    /// a socket, a device), or a directory was given to `load_file`.
    #[error("{}: not a regular file", .path.display())]
    NotAFile { path: PathBuf },

    /// The path cannot be used as a document id because it is not valid
    /// UTF-8 (ids are strings that qrels and search results refer to).
    #[error("{}: file name is not valid UTF-8; rename the file", .path.display())]
    NonUtf8Path { path: PathBuf },

    /// A file named explicitly has an extension that no loader handles.
    #[error(
        "{}: unsupported file type (known extensions: .txt .text .md .markdown .html .htm .pdf .jsonl)",
        .path.display()
    )]
    UnsupportedFormat { path: PathBuf },

    /// The file (or, for JSONL, one line) is larger than
    /// [`LoadOptions::max_file_bytes`](crate::LoadOptions::max_file_bytes).
    #[error("{}: {size} bytes is over the limit of {limit} bytes", .path.display())]
    TooLarge {
        path: PathBuf,
        size: u64,
        limit: u64,
    },

    /// A text format contains a NUL byte: it is a binary file with a text
    /// extension (or a UTF-16 file without a byte-order mark).
    #[error("{}: binary file (NUL byte at byte offset {offset})", .path.display())]
    Binary { path: PathBuf, offset: u64 },

    /// A text format is not valid UTF-8 (and no other encoding was declared).
    #[error(
        "{}:{line}: not valid UTF-8 (byte offset {offset}); convert the file to UTF-8",
        .path.display()
    )]
    InvalidUtf8 {
        path: PathBuf,
        line: usize,
        offset: u64,
    },

    /// A file with a UTF-16 byte-order mark holds an unpaired surrogate or an
    /// odd number of bytes.
    #[error("{}: invalid UTF-16 (byte offset {offset})", .path.display())]
    InvalidUtf16 { path: PathBuf, offset: u64 },

    /// The PDF could not be parsed (including a panic inside the PDF parser,
    /// which is caught).
    #[error("{}: cannot extract text from PDF: {message}", .path.display())]
    Pdf { path: PathBuf, message: String },

    /// A JSONL line is not a valid corpus record. The whole file fails: a
    /// corpus with silently missing ids would make its qrels wrong.
    #[error("{}:{line}: {message}", .path.display())]
    Jsonl {
        path: PathBuf,
        line: usize,
        message: String,
    },

    /// Two documents have the same id. Within one JSONL file the whole file
    /// fails; across files the later document is dropped and reported.
    #[error("{}: duplicate document id {id:?} (first seen {first})", location(.path, .line))]
    DuplicateId {
        path: PathBuf,
        line: Option<usize>,
        id: String,
        first: String,
    },
}

fn location(path: &Path, line: &Option<usize>) -> String {
    match line {
        Some(line) => format!("{}:{line}", path.display()),
        None => path.display().to_string(),
    }
}

impl TextError {
    /// The file this error is about.
    pub fn path(&self) -> &Path {
        match self {
            TextError::Io { path, .. }
            | TextError::NotAFile { path }
            | TextError::NonUtf8Path { path }
            | TextError::UnsupportedFormat { path }
            | TextError::TooLarge { path, .. }
            | TextError::Binary { path, .. }
            | TextError::InvalidUtf8 { path, .. }
            | TextError::InvalidUtf16 { path, .. }
            | TextError::Pdf { path, .. }
            | TextError::Jsonl { path, .. }
            | TextError::DuplicateId { path, .. } => path,
        }
    }

    /// The 1-based line the error is about, where there is one.
    pub fn line(&self) -> Option<usize> {
        match self {
            TextError::InvalidUtf8 { line, .. } | TextError::Jsonl { line, .. } => Some(*line),
            TextError::DuplicateId { line, .. } => *line,
            _ => None,
        }
    }
}
