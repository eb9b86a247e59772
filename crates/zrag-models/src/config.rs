//! The configuration files of a Hugging Face / sentence-transformers BERT directory.
//!
//! `config.json` gives the architecture, `1_Pooling/config.json` the pooling mode (default:
//! mean) and `sentence_bert_config.json` the sequence length the model was trained with.
//! Unsupported values are rejected here, with the file and field named, rather than producing
//! silently wrong embeddings later.

use std::path::Path;

use serde::Deserialize;

use crate::ModelError;

/// Sequence length used when the directory has no `sentence_bert_config.json`: the
/// sentence-transformers value for all-MiniLM-L6-v2.
pub const DEFAULT_MAX_SEQ_LENGTH: usize = 256;

/// The activation in the feed-forward block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// Exact GELU, `x * Φ(x)` (BERT's "gelu").
    GeluErf,
    /// The tanh approximation of GELU ("gelu_new", "gelu_pytorch_tanh").
    GeluTanh,
    Relu,
}

/// The architecture fields of `config.json` that the forward pass needs.
#[derive(Clone, Debug, PartialEq)]
pub struct BertConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub max_position_embeddings: usize,
    pub type_vocab_size: usize,
    pub layer_norm_eps: f64,
    pub activation: Activation,
}

impl BertConfig {
    /// Size of one attention head.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// Reads and validates `config.json`.
    pub fn from_file(path: &Path) -> Result<Self, ModelError> {
        #[derive(Deserialize)]
        struct Raw {
            vocab_size: usize,
            hidden_size: usize,
            num_hidden_layers: usize,
            num_attention_heads: usize,
            intermediate_size: usize,
            max_position_embeddings: usize,
            #[serde(default = "default_type_vocab_size")]
            type_vocab_size: usize,
            #[serde(default = "default_layer_norm_eps")]
            layer_norm_eps: f64,
            #[serde(default = "default_hidden_act")]
            hidden_act: String,
            #[serde(default = "default_position_embedding_type")]
            position_embedding_type: String,
        }
        fn default_type_vocab_size() -> usize {
            2
        }
        fn default_layer_norm_eps() -> f64 {
            1e-12
        }
        fn default_hidden_act() -> String {
            "gelu".into()
        }
        fn default_position_embedding_type() -> String {
            "absolute".into()
        }

        let raw: Raw = read_json(path)?;
        let bad = |field: &str, message: String| ModelError::Config {
            path: path.to_path_buf(),
            field: field.into(),
            message,
        };
        let activation = match raw.hidden_act.as_str() {
            "gelu" => Activation::GeluErf,
            "gelu_new" | "gelu_pytorch_tanh" => Activation::GeluTanh,
            "relu" => Activation::Relu,
            other => {
                return Err(bad(
                    "hidden_act",
                    format!("unsupported activation {other:?} (supported: gelu, gelu_new, relu)"),
                ))
            }
        };
        if raw.position_embedding_type != "absolute" {
            return Err(bad(
                "position_embedding_type",
                format!(
                    "only \"absolute\" is supported, got {:?}",
                    raw.position_embedding_type
                ),
            ));
        }
        for (field, value) in [
            ("vocab_size", raw.vocab_size),
            ("hidden_size", raw.hidden_size),
            ("num_hidden_layers", raw.num_hidden_layers),
            ("num_attention_heads", raw.num_attention_heads),
            ("intermediate_size", raw.intermediate_size),
            ("max_position_embeddings", raw.max_position_embeddings),
            ("type_vocab_size", raw.type_vocab_size),
        ] {
            if value == 0 {
                return Err(bad(field, "must be positive".into()));
            }
        }
        if !raw.hidden_size.is_multiple_of(raw.num_attention_heads) {
            return Err(bad(
                "num_attention_heads",
                format!(
                    "hidden_size {} is not divisible by {} heads",
                    raw.hidden_size, raw.num_attention_heads
                ),
            ));
        }
        Ok(Self {
            vocab_size: raw.vocab_size,
            hidden_size: raw.hidden_size,
            num_hidden_layers: raw.num_hidden_layers,
            num_attention_heads: raw.num_attention_heads,
            intermediate_size: raw.intermediate_size,
            max_position_embeddings: raw.max_position_embeddings,
            type_vocab_size: raw.type_vocab_size,
            layer_norm_eps: raw.layer_norm_eps,
            activation,
        })
    }
}

/// How token states become one sentence vector.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pooling {
    /// Average of the token states under the attention mask (sentence-transformers default).
    Mean,
    /// The state of the first token, `[CLS]`.
    Cls,
}

impl Pooling {
    /// Reads `1_Pooling/config.json` if the directory has one; mean pooling otherwise.
    pub fn from_model_dir(dir: &Path) -> Result<Self, ModelError> {
        let path = dir.join("1_Pooling").join("config.json");
        if !path.exists() {
            return Ok(Pooling::Mean);
        }
        #[derive(Deserialize)]
        struct Raw {
            #[serde(default)]
            pooling_mode_cls_token: bool,
            #[serde(default)]
            pooling_mode_mean_tokens: bool,
            #[serde(default)]
            pooling_mode_max_tokens: bool,
            #[serde(default)]
            pooling_mode_mean_sqrt_len_tokens: bool,
        }
        let raw: Raw = read_json(&path)?;
        let bad = |field: &str, message: &str| ModelError::Config {
            path: path.clone(),
            field: field.into(),
            message: message.into(),
        };
        if raw.pooling_mode_max_tokens {
            return Err(bad(
                "pooling_mode_max_tokens",
                "max pooling is not supported",
            ));
        }
        if raw.pooling_mode_mean_sqrt_len_tokens {
            return Err(bad(
                "pooling_mode_mean_sqrt_len_tokens",
                "mean-sqrt-len pooling is not supported",
            ));
        }
        match (raw.pooling_mode_mean_tokens, raw.pooling_mode_cls_token) {
            (true, false) => Ok(Pooling::Mean),
            (false, true) => Ok(Pooling::Cls),
            (true, true) => Err(bad(
                "pooling_mode_cls_token",
                "combined CLS + mean pooling is not supported",
            )),
            (false, false) => Err(bad(
                "pooling_mode_mean_tokens",
                "no pooling mode is enabled",
            )),
        }
    }
}

/// The sequence length (special tokens included) the model reads: `max_seq_length` from
/// `sentence_bert_config.json`, else [`DEFAULT_MAX_SEQ_LENGTH`], never more than the
/// position table.
pub fn max_seq_length(dir: &Path, config: &BertConfig) -> Result<usize, ModelError> {
    let path = dir.join("sentence_bert_config.json");
    let from_file = if path.exists() {
        #[derive(Deserialize)]
        struct Raw {
            max_seq_length: Option<usize>,
        }
        let raw: Raw = read_json(&path)?;
        match raw.max_seq_length {
            Some(n) if n < 2 => {
                return Err(ModelError::Config {
                    path,
                    field: "max_seq_length".into(),
                    message: format!("{n} leaves no room for [CLS] and [SEP]"),
                })
            }
            other => other,
        }
    } else {
        None
    };
    Ok(from_file
        .unwrap_or(DEFAULT_MAX_SEQ_LENGTH)
        .min(config.max_position_embeddings))
}

pub(crate) fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, ModelError> {
    let text = std::fs::read_to_string(path).map_err(|source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|source| ModelError::Json {
        path: path.to_path_buf(),
        source,
    })
}
