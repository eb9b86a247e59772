//! OpenAI-compatible endpoints, so that existing clients (the `openai` Python package, LangChain,
//! anything that speaks the Chat Completions API) can use zrag unchanged:
//!
//! - `GET /v1/models`: the chat "models" are the marginalisations (`zrag-rag-sequence`,
//!   `zrag-rag-token`, `zrag-retrieve-then-read`, `zrag-closed-book`); the embedding models
//!   are E_Q (`zrag-query`) and E_D (`zrag-document`).
//! - `POST /v1/embeddings`: float or base64 encoding, as the client asks.
//! - `POST /v1/chat/completions`: the last user message is the question, a system message
//!   replaces the instruction; `stream: true` sends chunks. Every response carries the
//!   retrieved `sources` (retrieval probability and posterior p(z|x,y)) beside the standard
//!   fields; the first streamed chunk carries them with their retrieval probabilities and the
//!   last with their posteriors. Extensions: `k`, `mode`, `filter`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::response::sse::Event;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use zrag_rag::answer::{Answer, AnswerMode};
use zrag_rag::generate::{Finish, SequenceDecoding};

use crate::api::{
    answer_options, blocking, finish_answer, sse_events, start_answer, AnswerUpdate,
    GenerationRequest, RetrievalRequest,
};
use crate::extract::ApiJson;
use crate::state::AppState;
use crate::ServerError;

const CHAT_MODELS: [(&str, AnswerMode); 4] = [
    (
        "zrag-rag-sequence",
        AnswerMode::Sequence(SequenceDecoding::Thorough),
    ),
    ("zrag-rag-token", AnswerMode::Token),
    ("zrag-retrieve-then-read", AnswerMode::RetrieveThenRead),
    ("zrag-closed-book", AnswerMode::ClosedBook),
];
const QUERY_MODEL: &str = "zrag-query";
const DOCUMENT_MODEL: &str = "zrag-document";

pub async fn models() -> Json<Value> {
    let data: Vec<Value> = CHAT_MODELS
        .iter()
        .map(|(id, _)| *id)
        .chain([QUERY_MODEL, DOCUMENT_MODEL])
        .map(|id| json!({"id": id, "object": "model", "created": 0, "owned_by": "zrag"}))
        .collect();
    Json(json!({"object": "list", "data": data}))
}

fn unknown_model(model: &str, known: &[&str]) -> ServerError {
    ServerError::NotFound(format!(
        "model: {model:?} does not exist here (use one of: {})",
        known.join(", ")
    ))
}

/// `input`: one string or a list of strings (token-id inputs are not accepted: the ids of
/// another tokenizer would mean nothing to E_Q).
#[derive(Deserialize)]
#[serde(untagged)]
pub enum EmbeddingInput {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
pub struct EmbeddingsRequest {
    pub model: String,
    pub input: EmbeddingInput,
    pub encoding_format: Option<String>,
    pub dimensions: Option<usize>,
}

pub async fn embeddings(
    State(state): State<Arc<AppState>>,
    ApiJson(request): ApiJson<EmbeddingsRequest>,
) -> Result<Json<Value>, ServerError> {
    let encoder = match request.model.as_str() {
        QUERY_MODEL => state.engine.query_encoder.clone(),
        DOCUMENT_MODEL => state.engine.doc_encoder.clone(),
        other => return Err(unknown_model(other, &[QUERY_MODEL, DOCUMENT_MODEL])),
    };
    let inputs = match request.input {
        EmbeddingInput::One(text) => vec![text],
        EmbeddingInput::Many(texts) => texts,
    };
    if inputs.is_empty() || inputs.len() > state.limits.max_batch {
        return Err(ServerError::BadRequest(format!(
            "input: send between 1 and {} texts (got {})",
            state.limits.max_batch,
            inputs.len()
        )));
    }
    let base64 = match request.encoding_format.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => {
            return Err(ServerError::BadRequest(format!(
                "encoding_format: {other:?} is not supported (float or base64)"
            )))
        }
    };
    if let Some(dimensions) = request.dimensions.filter(|&d| d != encoder.dim()) {
        return Err(ServerError::BadRequest(format!(
            "dimensions: this encoder produces {} dimensions, not {dimensions}",
            encoder.dim()
        )));
    }
    let slot = state.search_slot()?;
    let model = request.model;
    let (vectors, tokens) = blocking(&state, move || {
        let _slot = slot;
        let texts: Vec<&str> = inputs.iter().map(String::as_str).collect();
        let tokens: usize = texts.iter().map(|t| encoder.count_tokens(t)).sum();
        let vectors = encoder.embed(&texts).map_err(zrag_rag::RagError::from)?;
        Ok((vectors, tokens))
    })
    .await?;
    let data: Vec<Value> = vectors
        .iter()
        .enumerate()
        .map(|(index, vector)| {
            let embedding = if base64 {
                json!(base64_f32(vector))
            } else {
                json!(vector)
            };
            json!({"object": "embedding", "index": index, "embedding": embedding})
        })
        .collect();
    Ok(Json(json!({
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    })))
}

/// Little-endian f32 bytes in standard base64, as OpenAI's `encoding_format: base64`.
fn base64_f32(vector: &[f32]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let bytes: Vec<u8> = vector.iter().flat_map(|x| x.to_le_bytes()).collect();
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for group in bytes.chunks(3) {
        let b = [
            group[0],
            *group.get(1).unwrap_or(&0),
            *group.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for (i, shift) in [18, 12, 6, 0].into_iter().enumerate() {
            if i <= group.len() {
                out.push(ALPHABET[((n >> shift) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[derive(Deserialize)]
pub struct ChatMessageIn {
    pub role: String,
    pub content: Option<MessageContent>,
}

/// A message's content: a string or a list of parts, of which the text parts are read.
#[derive(Deserialize)]
#[serde(untagged)]
pub enum MessageContent {
    Text(String),
    Parts(Vec<Value>),
}

impl MessageContent {
    fn text(&self) -> Result<String, ServerError> {
        match self {
            MessageContent::Text(text) => Ok(text.clone()),
            MessageContent::Parts(parts) => parts
                .iter()
                .map(
                    |part| match (part["type"].as_str(), part["text"].as_str()) {
                        (Some("text"), Some(text)) => Ok(text),
                        _ => Err(ServerError::BadRequest(
                            "messages: only text content parts are supported".into(),
                        )),
                    },
                )
                .collect::<Result<Vec<_>, _>>()
                .map(|texts| texts.join("\n")),
        }
    }
}

#[derive(Deserialize, Default)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// The Chat Completions request. Fields zrag does not use (presence penalty, tools, ...) are
/// accepted and ignored, as most OpenAI-compatible servers do, except where ignoring them would
/// change the meaning (`n` > 1).
#[derive(Deserialize)]
pub struct ChatRequest {
    pub model: String,
    pub messages: Vec<ChatMessageIn>,
    pub max_tokens: Option<usize>,
    pub max_completion_tokens: Option<usize>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub seed: Option<u64>,
    pub n: Option<usize>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    /// zrag: chunks to retrieve.
    pub k: Option<usize>,
    /// zrag: dense, bm25 or hybrid.
    pub mode: Option<String>,
    /// zrag: field → glob.
    #[serde(default)]
    pub filter: std::collections::BTreeMap<String, String>,
}

static COMPLETIONS: AtomicU64 = AtomicU64::new(0);

fn completion_id() -> String {
    format!(
        "chatcmpl-zrag-{}-{}",
        std::process::id(),
        COMPLETIONS.fetch_add(1, Ordering::Relaxed)
    )
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn finish_reason(answer: &Answer) -> &'static str {
    match answer.finish {
        Some(Finish::Length) => "length",
        _ => "stop",
    }
}

fn usage(answer: &Answer) -> Value {
    json!({
        "prompt_tokens": answer.prompt_tokens,
        "completion_tokens": answer.tokens,
        "total_tokens": answer.prompt_tokens + answer.tokens,
    })
}

pub async fn chat_completions(
    State(state): State<Arc<AppState>>,
    ApiJson(request): ApiJson<ChatRequest>,
) -> Result<Response, ServerError> {
    let names: Vec<&str> = CHAT_MODELS.iter().map(|(name, _)| *name).collect();
    let mode = CHAT_MODELS
        .iter()
        .find(|(name, _)| *name == request.model)
        .map(|(_, mode)| *mode)
        .ok_or_else(|| unknown_model(&request.model, &names))?;
    if request.n.unwrap_or(1) != 1 {
        return Err(ServerError::BadRequest("n: only n = 1 is supported".into()));
    }
    let question = request
        .messages
        .iter()
        .rev()
        .find(|m| m.role == "user")
        .and_then(|m| m.content.as_ref())
        .ok_or_else(|| ServerError::BadRequest("messages: no user message to answer".into()))?
        .text()?;
    if question.trim().is_empty() {
        return Err(ServerError::BadRequest(
            "messages: the last user message is empty".into(),
        ));
    }
    let mut options = answer_options(
        &state,
        Some(mode),
        request.k,
        request.max_completion_tokens.or(request.max_tokens),
        request.temperature,
        request.top_p,
        request.seed,
    )?;
    // A system message is the instruction that follows the question in each prompt.
    if let Some(system) = request
        .messages
        .iter()
        .rfind(|m| m.role == "system" || m.role == "developer")
        .and_then(|m| m.content.as_ref())
    {
        options.template.instruction = system.text()?;
    }
    let settings = RetrievalRequest {
        mode: request.mode,
        filter: request.filter,
        exact: None,
    }
    .settings(&state.engine.retrieval)?;
    let running = start_answer(
        &state,
        GenerationRequest {
            question,
            options,
            settings,
        },
    )?;
    let (id, created, model) = (completion_id(), unix_now(), request.model);
    if !request.stream {
        let (answer, generation) = finish_answer(&state, running).await?;
        return Ok(Json(json!({
            "id": id,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": answer.answer},
                "finish_reason": finish_reason(&answer),
                "logprobs": null,
            }],
            "usage": usage(&answer),
            "sources": answer.sources,
            "log_prob": answer.log_prob,
            "generation": generation,
        }))
        .into_response());
    }
    let include_usage = request.stream_options.is_some_and(|o| o.include_usage);
    let chunk = move |delta: Value, finish: Option<&str>, extra: Value| {
        let mut chunk = json!({
            "id": id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": null}],
        });
        if let (Some(chunk), Value::Object(extra)) = (chunk.as_object_mut(), extra) {
            chunk.extend(extra);
        }
        chunk
    };
    let to_events = move |update| -> Vec<Event> {
        let chunks = match update {
            AnswerUpdate::Sources(sources, generation) => vec![chunk(
                json!({"role": "assistant", "content": ""}),
                None,
                json!({"sources": sources, "generation": generation}),
            )],
            AnswerUpdate::Text(text) => vec![chunk(json!({ "content": text }), None, json!({}))],
            AnswerUpdate::Done(result) => match *result {
                Ok((answer, generation)) => {
                    let mut last = vec![chunk(
                        json!({}),
                        Some(finish_reason(&answer)),
                        json!({
                            "sources": answer.sources,
                            "log_prob": answer.log_prob,
                            "generation": generation,
                        }),
                    )];
                    if include_usage {
                        let mut usage_chunk = chunk(json!({}), None, json!({}));
                        usage_chunk["choices"] = json!([]);
                        usage_chunk["usage"] = usage(&answer);
                        last.push(usage_chunk);
                    }
                    last
                }
                // The OpenAI clients raise an APIError for a chunk with an `error` field.
                Err(e) => vec![json!({"error": {
                    "message": e.to_string(),
                    "type": "server_error",
                    "code": e.status().as_u16(),
                }})],
            },
        };
        chunks
            .into_iter()
            .map(|value| Event::default().data(value.to_string()))
            .collect()
    };
    Ok(sse_events(
        &state,
        running,
        to_events,
        Some(Event::default().data("[DONE]")),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_the_standard_encoding() {
        // [1.0, -2.0] = 00 00 80 3f 00 00 00 c0 → "AACAPwAAAMA=" (Python: base64.b64encode).
        assert_eq!(base64_f32(&[1.0, -2.0]), "AACAPwAAAMA=");
        // 4 bytes: one full group and one of a single byte.
        assert_eq!(base64_f32(&[0.0]), "AAAAAA==");
        assert_eq!(base64_f32(&[]), "");
    }
}
