//! The one error type of zrag-eval.
//!
//! Every variant that concerns a file names it (and the line, where there is one), so that a
//! user who sees the message knows which input to fix.

use std::path::PathBuf;

/// Everything that can go wrong while reading benchmark files, building the reverse-dictionary
/// benchmark or writing a report.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// One line of a line-oriented file (jsonl, tsv, dictd index, WordNet data) is malformed.
    #[error("{path}:{line}: {reason}")]
    Parse {
        path: PathBuf,
        line: usize,
        reason: String,
    },
    /// A file is well-formed line by line but its content is unusable as a whole.
    #[error("{path}: {reason}")]
    Data { path: PathBuf, reason: String },
    /// A source file of the reverse-dictionary benchmark is missing.
    #[error(
        "{path}: not found; run scripts/fetch-revdict-data.sh (it unpacks Debian's dict-gcide and \
         wordnet-base under ${{ZRAG_HOME:-~/.cache/zrag}}/data/debian)"
    )]
    MissingSource { path: PathBuf },
    /// A configuration value is out of range.
    #[error("invalid configuration: {0}")]
    Config(String),
}

impl EvalError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        EvalError::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn parse(path: impl Into<PathBuf>, line: usize, reason: impl Into<String>) -> Self {
        EvalError::Parse {
            path: path.into(),
            line,
            reason: reason.into(),
        }
    }

    pub(crate) fn data(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        EvalError::Data {
            path: path.into(),
            reason: reason.into(),
        }
    }
}
