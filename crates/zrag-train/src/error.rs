//! The one error type of zrag-train.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Model(#[from] zrag_models::ModelError),
    #[error(transparent)]
    Index(#[from] zrag_index::IndexError),
    #[error(transparent)]
    Rag(#[from] zrag_rag::RagError),
    #[error(transparent)]
    Eval(#[from] zrag_eval::EvalError),
    #[error("tensor computation failed: {0}")]
    Tensor(#[from] candle_core::Error),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A setting that cannot work (named by its command-line flag).
    #[error("{setting}: {message}")]
    Setting { setting: String, message: String },
    /// Training data that cannot be used as given.
    #[error("{path}: {message}")]
    Data { path: PathBuf, message: String },
    /// A damaged or unreadable training index generation.
    #[error("training index {path}: {message}")]
    Generation { path: PathBuf, message: String },
    #[error("training diverged at step {step}: the loss is {loss}")]
    Diverged { step: usize, loss: f64 },
}

impl TrainError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        TrainError::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn setting(setting: &str, message: impl Into<String>) -> Self {
        TrainError::Setting {
            setting: setting.to_string(),
            message: message.into(),
        }
    }
}

pub type Result<T, E = TrainError> = std::result::Result<T, E>;
