//! The generator's tokenizer and chat template.
//!
//! A GGUF file carries its tokenizer only as metadata (token strings, BPE merges, token types,
//! special ids, pre-tokenizer name, chat template). [`GeneratorTokenizer::from_gguf`] turns
//! that into the Hugging Face `tokenizer.json` form and lets the `tokenizers` crate build a
//! real byte-level BPE tokenizer from it, so GGUF and safetensors models share one code path.
//!
//! Prompts are assembled from [`Segment`]s: control tokens are inserted by id and text is
//! encoded with special-token matching turned off, so a document or question that happens to
//! contain `<|im_start|>` cannot inject a turn into the prompt.

use std::path::{Path, PathBuf};

use serde_json::{json, Value as Json};
use tokenizers::Tokenizer;

use super::gguf::GgufFile;
use crate::ModelError;

/// Split patterns of the pre-tokenizers that are not GPT-2's (which the byte-level
/// pre-tokenizer applies itself), as llama.cpp and the models' tokenizer.json spell them.
const LLAMA3_PATTERN: &str = "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";
const QWEN2_PATTERN: &str = "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";

/// A piece of a prompt: a control token by id, or text to be tokenized as plain text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Segment {
    Special(u32),
    Text(String),
}

/// One chat turn.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: &str, content: impl Into<String>) -> Self {
        ChatMessage {
            role: role.to_string(),
            content: content.into(),
        }
    }
}

/// The chat formats zrag knows. A model's Jinja template is recognised by its markers; zrag
/// does not run Jinja, it renders the recognised format itself (and falls back to plain text
/// for templates it does not recognise).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChatTemplate {
    /// `<|im_start|>role\ncontent<|im_end|>\n` (SmolLM2, Qwen2), with the system message the
    /// template inserts when the conversation has none.
    ChatMl { default_system: Option<String> },
    /// `<|start_header_id|>role<|end_header_id|>\n\ncontent<|eot_id|>` (Llama 3).
    Llama3,
    /// No chat format: the messages' contents, one per line.
    Plain,
}

impl ChatTemplate {
    /// Recognises a Jinja chat template by its markers.
    pub fn detect(template: Option<&str>) -> ChatTemplate {
        let Some(template) = template else {
            return ChatTemplate::Plain;
        };
        if template.contains("<|im_start|>") {
            ChatTemplate::ChatMl {
                default_system: chatml_default_system(template),
            }
        } else if template.contains("<|start_header_id|>") {
            ChatTemplate::Llama3
        } else {
            ChatTemplate::Plain
        }
    }
}

/// The literal system message a ChatML template inserts when the first message is not a
/// system message (SmolLM2: "You are a helpful AI assistant named SmolLM, ...").
fn chatml_default_system(template: &str) -> Option<String> {
    let marker = "<|im_start|>system\n";
    let start = template.find(marker)? + marker.len();
    let end = start + template[start..].find("<|im_end|>")?;
    let text = &template[start..end];
    let guarded =
        template[..start].contains("!= 'system'") || template[..start].contains("!= \"system\"");
    (guarded && !text.contains("{{") && !text.contains("{%")).then(|| text.to_string())
}

/// A generator's tokenizer: BPE, the control tokens, and the chat format.
pub struct GeneratorTokenizer {
    /// Matches control-token strings as plain text (for untrusted text).
    tokenizer: Tokenizer,
    /// Matches control-token strings as control tokens (for trusted, pre-formatted prompts).
    with_special: Tokenizer,
    source: PathBuf,
    template: ChatTemplate,
    bos: Option<u32>,
    add_bos: bool,
    stop_tokens: Vec<u32>,
    special_ids: Vec<u32>,
}

impl GeneratorTokenizer {
    /// Builds the tokenizer from a GGUF file's `tokenizer.*` metadata (`tokenizer.ggml.model`
    /// must be `gpt2`, i.e. byte-level BPE).
    pub fn from_gguf(gguf: &GgufFile) -> Result<Self, ModelError> {
        let model = gguf.string("tokenizer.ggml.model")?;
        if model != "gpt2" {
            return Err(gguf.config_error(
                "tokenizer.ggml.model",
                format!("`{model}` tokenizers are not supported (only byte-level BPE, `gpt2`)"),
            ));
        }
        let tokens = gguf.string_array("tokenizer.ggml.tokens")?;
        let merges = gguf.string_array("tokenizer.ggml.merges")?;
        let types = if gguf.has("tokenizer.ggml.token_type") {
            gguf.int_array("tokenizer.ggml.token_type")?
        } else {
            vec![1; tokens.len()]
        };
        if types.len() != tokens.len() {
            return Err(gguf.config_error(
                "tokenizer.ggml.token_type",
                format!("{} entries for {} tokens", types.len(), tokens.len()),
            ));
        }
        let pre = if gguf.has("tokenizer.ggml.pre") {
            gguf.string("tokenizer.ggml.pre")?
        } else {
            "default"
        };
        let pre_tokenizer = pre_tokenizer_json(pre).ok_or_else(|| {
            gguf.config_error(
                "tokenizer.ggml.pre",
                format!("unsupported pre-tokenizer `{pre}`"),
            )
        })?;

        let mut vocab = serde_json::Map::with_capacity(tokens.len());
        let mut added = Vec::new();
        let mut special_ids = Vec::new();
        for (id, (token, kind)) in tokens.iter().zip(&types).enumerate() {
            vocab.insert(token.to_string(), json!(id));
            // llama.cpp token types: 3 = control, 4 = user-defined; both are matched whole.
            if *kind == 3 || *kind == 4 {
                added.push(json!({
                    "id": id, "content": token, "single_word": false, "lstrip": false,
                    "rstrip": false, "normalized": false, "special": *kind == 3,
                }));
                if *kind == 3 {
                    special_ids.push(id as u32);
                }
            }
        }
        let spec = json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": null,
            "pre_tokenizer": pre_tokenizer,
            "post_processor": null,
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {
                "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                "ignore_merges": pre == "llama-bpe" || pre == "llama3",
                "vocab": vocab, "merges": merges,
            },
        });
        let tokenizer = Tokenizer::from_bytes(spec.to_string().as_bytes()).map_err(|e| {
            ModelError::Tokenizer {
                path: gguf.path().to_path_buf(),
                message: format!("cannot build a tokenizer from the GGUF metadata: {e}"),
            }
        })?;

        let id = |key: &str| -> Result<Option<u32>, ModelError> {
            Ok(gguf.optional_usize(key)?.map(|v| v as u32))
        };
        let bos = id("tokenizer.ggml.bos_token_id")?;
        let eos = id("tokenizer.ggml.eos_token_id")?;
        let eot = id("tokenizer.ggml.eot_token_id")?;
        let add_bos = gguf.has("tokenizer.ggml.add_bos_token")
            && gguf.bool("tokenizer.ggml.add_bos_token")?;
        let template = if gguf.has("tokenizer.chat_template") {
            Some(gguf.string("tokenizer.chat_template")?)
        } else {
            None
        };
        Self::assemble(tokenizer, gguf.path(), template, bos, add_bos, [eos, eot])
    }

    /// Loads `tokenizer.json` (and the chat template and special tokens from
    /// `tokenizer_config.json`, when present) from a Hugging Face model directory.
    pub fn from_hf_dir(dir: &Path, eos_from_config: &[u32]) -> Result<Self, ModelError> {
        let path = dir.join("tokenizer.json");
        if !path.is_file() {
            return Err(ModelError::MissingFile {
                path,
                hint: "a Hugging Face model directory needs its tokenizer.json".into(),
            });
        }
        let tokenizer = Tokenizer::from_file(&path).map_err(|e| ModelError::Tokenizer {
            path: path.clone(),
            message: e.to_string(),
        })?;
        let config_path = dir.join("tokenizer_config.json");
        let config: Json = if config_path.is_file() {
            let text = std::fs::read_to_string(&config_path).map_err(|source| ModelError::Io {
                path: config_path.clone(),
                source,
            })?;
            serde_json::from_str(&text).map_err(|source| ModelError::Json {
                path: config_path.clone(),
                source,
            })?
        } else {
            Json::Null
        };
        let token_id = |field: &str| -> Option<u32> {
            let value = config.get(field)?;
            let text = value.as_str().or_else(|| value.get("content")?.as_str())?;
            tokenizer.token_to_id(text)
        };
        let bos = token_id("bos_token");
        let eos = token_id("eos_token");
        let add_bos = config
            .get("add_bos_token")
            .and_then(Json::as_bool)
            .unwrap_or(false);
        let template = config.get("chat_template").and_then(Json::as_str);
        let mut stops: Vec<Option<u32>> = eos_from_config.iter().map(|&id| Some(id)).collect();
        stops.push(eos);
        Self::assemble(tokenizer, &path, template, bos, add_bos, stops)
    }

    fn assemble(
        tokenizer: Tokenizer,
        source: &Path,
        template: Option<&str>,
        bos: Option<u32>,
        add_bos: bool,
        stops: impl IntoIterator<Item = Option<u32>>,
    ) -> Result<Self, ModelError> {
        let template = ChatTemplate::detect(template);
        let mut stop_tokens: Vec<u32> = stops.into_iter().flatten().collect();
        // The end-of-turn marker of the chat format ends an answer even when the file's eos
        // id points elsewhere (common in converted GGUFs).
        let turn_end = match template {
            ChatTemplate::ChatMl { .. } => Some("<|im_end|>"),
            ChatTemplate::Llama3 => Some("<|eot_id|>"),
            ChatTemplate::Plain => None,
        };
        stop_tokens.extend(turn_end.and_then(|t| tokenizer.token_to_id(t)));
        stop_tokens.sort_unstable();
        stop_tokens.dedup();
        let special_ids = tokenizer
            .get_added_tokens_decoder()
            .iter()
            .filter(|(_, token)| token.special)
            .map(|(&id, _)| id)
            .collect();
        let with_special = tokenizer.clone();
        let mut tokenizer = tokenizer;
        // Text is never allowed to produce control tokens; those go in by id (see Segment).
        tokenizer.set_encode_special_tokens(true);
        Ok(GeneratorTokenizer {
            tokenizer,
            with_special,
            source: source.to_path_buf(),
            template,
            bos,
            add_bos,
            stop_tokens,
            special_ids,
        })
    }

    /// The tokenizer in Hugging Face `tokenizer.json` form (control tokens as added tokens).
    pub fn to_tokenizer_json(&self) -> Result<String, ModelError> {
        self.with_special
            .to_string(true)
            .map_err(|e| self.error(format!("cannot serialise the tokenizer: {e}")))
    }

    pub fn chat_template(&self) -> &ChatTemplate {
        &self.template
    }

    pub fn stop_tokens(&self) -> &[u32] {
        &self.stop_tokens
    }

    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.tokenizer.token_to_id(token)
    }

    fn error(&self, message: String) -> ModelError {
        ModelError::Tokenizer {
            path: self.source.clone(),
            message,
        }
    }

    /// Tokenizes plain text. Strings that look like control tokens are tokenized as text.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, ModelError> {
        let encoding = self
            .tokenizer
            .encode_fast(text, false)
            .map_err(|e| self.error(format!("cannot tokenize: {e}")))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Tokenizes a pre-formatted prompt in which control-token strings (`<|im_start|>`) *are*
    /// control tokens. Only for trusted text; see [`GeneratorTokenizer::encode`].
    pub fn encode_trusted(&self, text: &str) -> Result<Vec<u32>, ModelError> {
        let encoding = self
            .with_special
            .encode_fast(text, false)
            .map_err(|e| self.error(format!("cannot tokenize: {e}")))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Tokenizes a sequence of segments: control tokens by id, text as plain text.
    pub fn encode_segments(&self, segments: &[Segment]) -> Result<Vec<u32>, ModelError> {
        let mut ids = Vec::new();
        if self.add_bos {
            ids.extend(self.bos);
        }
        let mut text = String::new();
        for segment in segments {
            match segment {
                Segment::Text(t) => text.push_str(t),
                Segment::Special(id) => {
                    if !text.is_empty() {
                        ids.extend(self.encode(&text)?);
                        text.clear();
                    }
                    ids.push(*id);
                }
            }
        }
        if !text.is_empty() {
            ids.extend(self.encode(&text)?);
        }
        Ok(ids)
    }

    /// Renders a conversation in the model's chat format, ending with the opening of the
    /// assistant's turn.
    pub fn chat_prompt(&self, messages: &[ChatMessage]) -> Result<Vec<u32>, ModelError> {
        let special = |name: &str| {
            self.token_to_id(name).map(Segment::Special).ok_or_else(|| {
                self.error(format!(
                    "chat template needs token {name}, not in the vocabulary"
                ))
            })
        };
        let mut segments = Vec::new();
        match &self.template {
            ChatTemplate::ChatMl { default_system } => {
                let (start, end) = (special("<|im_start|>")?, special("<|im_end|>")?);
                let mut turn = |role: &str, content: &str| {
                    segments.push(start.clone());
                    segments.push(Segment::Text(format!("{role}\n{content}")));
                    segments.push(end.clone());
                    segments.push(Segment::Text("\n".into()));
                };
                if let Some(system) = default_system {
                    if messages.first().is_none_or(|m| m.role != "system") {
                        turn("system", system);
                    }
                }
                for m in messages {
                    turn(&m.role, &m.content);
                }
                segments.push(start);
                segments.push(Segment::Text("assistant\n".into()));
            }
            ChatTemplate::Llama3 => {
                let (header, header_end, eot) = (
                    special("<|start_header_id|>")?,
                    special("<|end_header_id|>")?,
                    special("<|eot_id|>")?,
                );
                if !self.add_bos {
                    segments.extend(self.token_to_id("<|begin_of_text|>").map(Segment::Special));
                }
                for m in messages {
                    segments.push(header.clone());
                    segments.push(Segment::Text(m.role.clone()));
                    segments.push(header_end.clone());
                    segments.push(Segment::Text(format!("\n\n{}", m.content)));
                    segments.push(eot.clone());
                }
                segments.push(header);
                segments.push(Segment::Text("assistant".into()));
                segments.push(header_end);
                segments.push(Segment::Text("\n\n".into()));
            }
            ChatTemplate::Plain => {
                for m in messages {
                    segments.push(Segment::Text(format!("{}\n", m.content)));
                }
            }
        }
        self.encode_segments(&segments)
    }

    /// Turns ids back into text, leaving out control tokens.
    pub fn decode(&self, ids: &[u32]) -> Result<String, ModelError> {
        let kept: Vec<u32> = ids
            .iter()
            .copied()
            .filter(|id| !self.special_ids.contains(id))
            .collect();
        self.tokenizer
            .decode(&kept, false)
            .map_err(|e| self.error(format!("cannot decode: {e}")))
    }

    /// Turns ids back into text, control tokens included (for tests and debugging).
    pub fn decode_with_special(&self, ids: &[u32]) -> Result<String, ModelError> {
        self.tokenizer
            .decode(ids, false)
            .map_err(|e| self.error(format!("cannot decode: {e}")))
    }
}

/// Incremental detokenization for streaming: a token may end in the middle of a UTF-8
/// character, so text is released only once it decodes cleanly.
#[derive(Default)]
pub struct TextStream {
    ids: Vec<u32>,
    emitted: usize,
}

impl TextStream {
    /// Adds a token and returns the text that became final with it (possibly empty).
    pub fn push(&mut self, tokenizer: &GeneratorTokenizer, id: u32) -> Result<String, ModelError> {
        self.ids.push(id);
        let text = tokenizer.decode(&self.ids)?;
        if text.ends_with('\u{FFFD}')
            || text.len() < self.emitted
            || !text.is_char_boundary(self.emitted)
        {
            return Ok(String::new());
        }
        let fresh = text[self.emitted..].to_string();
        self.emitted = text.len();
        Ok(fresh)
    }
}

/// The `pre_tokenizer` JSON for llama.cpp's pre-tokenizer names.
fn pre_tokenizer_json(pre: &str) -> Option<Json> {
    let byte_level = |use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex});
    let split = |pattern: &str| json!({"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": false});
    Some(match pre {
        "default" | "gpt2" | "gpt-2" => byte_level(true),
        // StarCoder-family tokenizers (SmolLM, SmolLM2) split every digit on its own first.
        "smollm" | "starcoder" | "refact" | "codeshell" => {
            json!({"type": "Sequence", "pretokenizers": [
                {"type": "Digits", "individual_digits": true},
                byte_level(true),
            ]})
        }
        "llama-bpe" | "llama3" => {
            json!({"type": "Sequence", "pretokenizers": [split(LLAMA3_PATTERN), byte_level(false)]})
        }
        "qwen2" => {
            json!({"type": "Sequence", "pretokenizers": [split(QWEN2_PATTERN), byte_level(false)]})
        }
        _ => return None,
    })
}
