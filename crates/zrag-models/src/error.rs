//! The crate's single error type, [`ModelError`].
//!
//! Every variant that comes from a file carries the file's path (and, where it applies, the
//! field or tensor at fault), so a user who points zrag at a broken model directory is told
//! exactly what to fix.

use std::path::PathBuf;

/// Everything that can go wrong while loading or running a model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A file the model needs is not there.
    #[error("missing model file {}: {hint}", path.display())]
    MissingFile { path: PathBuf, hint: String },

    /// A file exists but could not be read (or written, for the checksum sidecar).
    #[error("cannot read {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A JSON file (config.json, 1_Pooling/config.json, ...) is not valid JSON or lacks a field.
    #[error("invalid JSON in {}: {source}", path.display())]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },

    /// A configuration value is present but unusable (e.g. hidden_size not divisible by heads).
    #[error("bad value for `{field}` in {}: {message}", path.display())]
    Config {
        path: PathBuf,
        field: String,
        message: String,
    },

    /// tokenizer.json could not be parsed, or the tokenizer failed on an input.
    #[error("tokenizer {}: {message}", path.display())]
    Tokenizer { path: PathBuf, message: String },

    /// A tensor in model.safetensors is missing or has the wrong shape or type.
    #[error("weights {}: tensor `{tensor}`: {message}", path.display())]
    Weights {
        path: PathBuf,
        tensor: String,
        message: String,
    },

    /// The default model directory does not exist.
    #[error(
        "model directory {} not found; run `scripts/fetch-models.sh` to download the default \
         models (or set ZRAG_HOME to where they are)", path.display()
    )]
    ModelNotInstalled { path: PathBuf },

    /// A tensor operation failed during the forward pass (a bug or out of memory, not bad
    /// input).
    #[error("model computation failed: {0}")]
    Compute(#[from] candle_core::Error),
}
