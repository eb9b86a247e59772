//! Tiny random-weight BERT model directories for tests (SPEC §3: tests that need a model but
//! not its knowledge build one in-process).
//!
//! [`write_tiny_bert`] writes a complete Hugging Face-format directory (config.json,
//! model.safetensors, tokenizer.json, 1_Pooling/config.json, sentence_bert_config.json) that
//! [`crate::BertEncoder::load`] reads like a real model. Weights come from a fixed-seed
//! generator, so the same spec always gives the same model. The tokenizer is a real BERT
//! WordPiece tokenizer over a small vocabulary: special tokens, letters, digits, punctuation,
//! a few whole words, and `##`-continuations of every letter and digit, so any ASCII text
//! tokenises without `[UNK]`.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use serde_json::json;

use crate::ModelError;

/// Shape of a tiny model.
#[derive(Clone, Debug)]
pub struct TinyBertSpec {
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub max_position_embeddings: usize,
    /// `max_seq_length` written to sentence_bert_config.json.
    pub max_seq_length: usize,
    pub seed: u64,
}

impl Default for TinyBertSpec {
    fn default() -> Self {
        Self {
            hidden_size: 32,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            intermediate_size: 64,
            max_position_embeddings: 64,
            max_seq_length: 48,
            seed: 7,
        }
    }
}

const SPECIAL_TOKENS: [&str; 5] = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"];
const WORDS: [&str; 12] = [
    "the", "cat", "dog", "sat", "on", "mat", "a", "is", "of", "and", "to", "in",
];

fn vocabulary() -> Vec<String> {
    let mut vocab: Vec<String> = SPECIAL_TOKENS.iter().map(|s| s.to_string()).collect();
    let symbols = ('a'..='z').chain('0'..='9');
    for c in symbols.clone() {
        vocab.push(c.to_string());
    }
    for c in symbols {
        vocab.push(format!("##{c}"));
    }
    for c in ".,;:!?'\"()[]{}-_+=*/\\&%$#@<>|~`^".chars() {
        vocab.push(c.to_string());
    }
    for w in WORDS {
        if !vocab.iter().any(|v| v == w) {
            vocab.push(w.to_string());
        }
    }
    vocab
}

/// Deterministic pseudo-random numbers (SplitMix64), roughly N(0, std) via the sum of uniforms.
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Self {
        Rng(seed)
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }

    pub(crate) fn normal(&mut self, std: f32) -> f32 {
        // Irwin-Hall: the sum of 12 uniforms minus 6 has unit variance.
        let sum: f32 = (0..12).map(|_| self.uniform()).sum();
        (sum - 6.0) * std
    }

    fn tensor(&mut self, shape: &[usize], mean: f32, std: f32) -> candle_core::Result<Tensor> {
        let n: usize = shape.iter().product();
        let data: Vec<f32> = (0..n).map(|_| mean + self.normal(std)).collect();
        Tensor::from_vec(data, shape, &Device::Cpu)
    }
}

/// Writes a tiny random-weight BERT model directory into `dir` (created if needed).
pub fn write_tiny_bert(dir: &Path, spec: &TinyBertSpec) -> Result<(), ModelError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ModelError::Io { path, source }
    };
    std::fs::create_dir_all(dir.join("1_Pooling")).map_err(io(dir))?;
    let vocab = vocabulary();
    let h = spec.hidden_size;

    let config = json!({
        "architectures": ["BertModel"],
        "model_type": "bert",
        "vocab_size": vocab.len(),
        "hidden_size": h,
        "num_hidden_layers": spec.num_hidden_layers,
        "num_attention_heads": spec.num_attention_heads,
        "intermediate_size": spec.intermediate_size,
        "hidden_act": "gelu",
        "max_position_embeddings": spec.max_position_embeddings,
        "type_vocab_size": 2,
        "layer_norm_eps": 1e-12,
        "pad_token_id": 0,
        "position_embedding_type": "absolute",
    });
    write_json(&dir.join("config.json"), &config)?;
    write_json(
        &dir.join("1_Pooling").join("config.json"),
        &json!({"word_embedding_dimension": h, "pooling_mode_mean_tokens": true}),
    )?;
    write_json(
        &dir.join("sentence_bert_config.json"),
        &json!({"max_seq_length": spec.max_seq_length, "do_lower_case": false}),
    )?;
    write_json(&dir.join("tokenizer.json"), &tokenizer_json(&vocab))?;

    // (name, shape, mean, std) of every parameter, in Hugging Face BERT naming.
    let mut params: Vec<(String, Vec<usize>, f32, f32)> = vec![
        (
            "embeddings.word_embeddings.weight".into(),
            vec![vocab.len(), h],
            0.0,
            0.5,
        ),
        (
            "embeddings.position_embeddings.weight".into(),
            vec![spec.max_position_embeddings, h],
            0.0,
            0.5,
        ),
        (
            "embeddings.token_type_embeddings.weight".into(),
            vec![2, h],
            0.0,
            0.5,
        ),
        ("embeddings.LayerNorm.weight".into(), vec![h], 1.0, 0.1),
        ("embeddings.LayerNorm.bias".into(), vec![h], 0.0, 0.1),
    ];
    for layer in 0..spec.num_hidden_layers {
        let prefix = format!("encoder.layer.{layer}");
        let inner = spec.intermediate_size;
        for (name, out_dim, in_dim) in [
            ("attention.self.query", h, h),
            ("attention.self.key", h, h),
            ("attention.self.value", h, h),
            ("attention.output.dense", h, h),
            ("intermediate.dense", inner, h),
            ("output.dense", h, inner),
        ] {
            let std = 1.0 / (in_dim as f32).sqrt();
            params.push((
                format!("{prefix}.{name}.weight"),
                vec![out_dim, in_dim],
                0.0,
                std,
            ));
            params.push((format!("{prefix}.{name}.bias"), vec![out_dim], 0.0, 0.1));
        }
        for norm in ["attention.output.LayerNorm", "output.LayerNorm"] {
            params.push((format!("{prefix}.{norm}.weight"), vec![h], 1.0, 0.1));
            params.push((format!("{prefix}.{norm}.bias"), vec![h], 0.0, 0.1));
        }
    }
    let mut rng = Rng(spec.seed);
    let tensors = params
        .into_iter()
        .map(|(name, shape, mean, std)| Ok((name, rng.tensor(&shape, mean, std)?)))
        .collect::<candle_core::Result<HashMap<String, Tensor>>>()?;
    let weights_path = dir.join("model.safetensors");
    candle_core::safetensors::save(&tensors, &weights_path).map_err(|err| ModelError::Weights {
        path: weights_path.clone(),
        tensor: "(all)".into(),
        message: err.to_string(),
    })?;
    Ok(())
}

fn tokenizer_json(vocab: &[String]) -> serde_json::Value {
    let id = |token: &str| vocab.iter().position(|v| v == token).unwrap();
    let added_tokens: Vec<_> = SPECIAL_TOKENS
        .iter()
        .map(|t| {
            json!({"id": id(t), "content": t, "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    let vocab_map: serde_json::Map<String, serde_json::Value> = vocab
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), json!(i)))
        .collect();
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added_tokens,
        "normalizer": {"type": "BertNormalizer", "clean_text": true,
                       "handle_chinese_chars": true, "strip_accents": null, "lowercase": true},
        "pre_tokenizer": {"type": "BertPreTokenizer"},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "[CLS]", "type_id": 0}},
                       {"Sequence": {"id": "A", "type_id": 0}},
                       {"SpecialToken": {"id": "[SEP]", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "[CLS]", "type_id": 0}},
                     {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": "[SEP]", "type_id": 0}},
                     {"Sequence": {"id": "B", "type_id": 1}},
                     {"SpecialToken": {"id": "[SEP]", "type_id": 1}}],
            "special_tokens": {
                "[CLS]": {"id": "[CLS]", "ids": [id("[CLS]")], "tokens": ["[CLS]"]},
                "[SEP]": {"id": "[SEP]", "ids": [id("[SEP]")], "tokens": ["[SEP]"]}
            }
        },
        "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": true},
        "model": {"type": "WordPiece", "unk_token": "[UNK]", "continuing_subword_prefix": "##",
                  "max_input_chars_per_word": 100, "vocab": vocab_map}
    })
}

fn write_json(path: &Path, value: &serde_json::Value) -> Result<(), ModelError> {
    let text = serde_json::to_string_pretty(value).map_err(|source| ModelError::Json {
        path: path.to_path_buf(),
        source,
    })?;
    std::fs::write(path, text).map_err(|source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// The shape of the tiny random llama used by decoder and RAG tests: 2 layers, 4 query heads
/// over 2 KV heads of 16 dims, 64 positions.
pub fn tiny_llama_config(vocab_size: usize) -> crate::generator::LlamaConfig {
    crate::generator::LlamaConfig {
        vocab_size,
        hidden_size: 64,
        intermediate_size: 96,
        num_layers: 2,
        num_heads: 4,
        num_kv_heads: 2,
        head_dim: 16,
        rope_dim: 16,
        rope_theta: 10_000.0,
        rms_norm_eps: 1e-5,
        rope_interleaved: true,
        max_positions: 64,
    }
}
