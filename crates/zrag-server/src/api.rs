//! zrag's own endpoints: search, ask (JSON or server-sent events), documents, health, metrics.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::header;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use zrag_index::filter::Filter;
use zrag_rag::answer::{answer, Answer, AnswerEvent, AnswerMode, AnswerOptions, Source};
use zrag_rag::generate::{CancelFlag, Sampling, Search, SequenceDecoding};
use zrag_rag::{
    apply_documents, DocumentChanges, RagError, RetrievalMode, RetrievalSettings, RetrievedChunk,
};
use zrag_text::Document;

use crate::extract::ApiJson;
use crate::state::AppState;
use crate::ServerError;

/// Runs blocking work (encoders, search, generation) off the async workers, bounded by the
/// request time limit. Work that outlives the limit finishes in the background, still holding
/// its concurrency slot, so the limits keep describing what the CPU is doing.
pub(crate) async fn blocking<T: Send + 'static>(
    state: &AppState,
    work: impl FnOnce() -> Result<T, ServerError> + Send + 'static,
) -> Result<T, ServerError> {
    let limit = state.limits.request_timeout;
    match tokio::time::timeout(limit, tokio::task::spawn_blocking(work)).await {
        Err(_) => Err(ServerError::Timeout(limit)),
        Ok(Err(join)) => Err(ServerError::Internal(format!("worker failed: {join}"))),
        Ok(Ok(result)) => result,
    }
}

/// Retrieval choices a request may make (the rest comes from the server's flags).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetrievalRequest {
    /// `dense`, `bm25` or `hybrid`.
    pub mode: Option<String>,
    /// Field → glob, all required (as `--filter key=glob`).
    #[serde(default)]
    pub filter: BTreeMap<String, String>,
    /// Exact dense search even when the collection has an HNSW graph.
    pub exact: Option<bool>,
}

impl RetrievalRequest {
    pub fn settings(&self, defaults: &RetrievalSettings) -> Result<RetrievalSettings, ServerError> {
        let mut settings = defaults.clone();
        if let Some(mode) = &self.mode {
            settings.mode = match mode.as_str() {
                "dense" => RetrievalMode::Dense,
                "bm25" => RetrievalMode::Bm25,
                "hybrid" => RetrievalMode::Hybrid,
                other => {
                    return Err(ServerError::BadRequest(format!(
                        "mode: unknown retrieval mode {other:?} (dense, bm25 or hybrid)"
                    )))
                }
            };
        }
        if let Some(exact) = self.exact {
            settings.exact = exact;
        }
        if !self.filter.is_empty() {
            let specs: Vec<String> = self
                .filter
                .iter()
                .map(|(key, glob)| format!("{key}={glob}"))
                .collect();
            let filter = Filter::parse(&specs)
                .map_err(|e| ServerError::BadRequest(format!("filter: {e}")))?;
            // The request's conditions add to the server's own (a server may be scoped).
            settings.filter = Some(match defaults.filter.clone() {
                Some(scope) => scope.and(filter),
                None => filter,
            });
        }
        Ok(settings)
    }
}

pub fn check_k(state: &AppState, k: usize) -> Result<usize, ServerError> {
    if k == 0 || k > state.limits.max_k {
        return Err(ServerError::BadRequest(format!(
            "k: must be between 1 and {} (got {k})",
            state.limits.max_k
        )));
    }
    Ok(k)
}

pub fn check_max_tokens(state: &AppState, max_tokens: usize) -> Result<usize, ServerError> {
    if max_tokens == 0 || max_tokens > state.limits.max_tokens {
        return Err(ServerError::BadRequest(format!(
            "max_tokens: must be between 1 and {} (got {max_tokens})",
            state.limits.max_tokens
        )));
    }
    Ok(max_tokens)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SearchRequest {
    pub query: String,
    pub k: Option<usize>,
    #[serde(flatten)]
    pub retrieval: RetrievalRequest,
}

#[derive(Serialize)]
pub struct SearchResponse {
    pub query: String,
    /// The collection generation the hits come from.
    pub generation: u64,
    /// Documents in that generation.
    pub documents: usize,
    pub hits: Vec<RetrievedChunk>,
}

pub async fn search(
    State(state): State<Arc<AppState>>,
    ApiJson(request): ApiJson<SearchRequest>,
) -> Result<Json<SearchResponse>, ServerError> {
    let k = check_k(&state, request.k.unwrap_or(10))?;
    let settings = request.retrieval.settings(&state.engine.retrieval)?;
    let slot = state.search_slot()?;
    let shared = state.clone();
    let response = blocking(&state, move || {
        let _slot = slot;
        let retriever = shared.retriever(settings)?;
        let hits = retriever.retrieve(&request.query, k)?;
        Ok(SearchResponse {
            query: request.query,
            generation: retriever.snapshot().generation(),
            documents: retriever.snapshot().num_documents() as usize,
            hits,
        })
    })
    .await?;
    Ok(Json(response))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AskRequest {
    pub question: String,
    pub k: Option<usize>,
    /// `sequence` (default), `token`, `none` (retrieve-then-read) or `closed-book`.
    pub marginalize: Option<String>,
    pub max_tokens: Option<usize>,
    /// Sample at this temperature (absent or 0: greedy).
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub seed: Option<u64>,
    #[serde(default)]
    pub stream: bool,
    #[serde(flatten)]
    pub retrieval: RetrievalRequest,
}

/// What a generation request asks for, checked against the limits.
pub struct GenerationRequest {
    pub question: String,
    pub options: AnswerOptions,
    pub settings: RetrievalSettings,
}

pub fn parse_marginalize(name: &str) -> Option<AnswerMode> {
    Some(match name {
        "sequence" => AnswerMode::Sequence(SequenceDecoding::Thorough),
        "sequence-fast" => AnswerMode::Sequence(SequenceDecoding::Fast),
        "token" => AnswerMode::Token,
        "none" => AnswerMode::RetrieveThenRead,
        "closed-book" => AnswerMode::ClosedBook,
        _ => return None,
    })
}

/// Decoding options from request fields over the server's defaults.
pub fn answer_options(
    state: &AppState,
    mode: Option<AnswerMode>,
    k: Option<usize>,
    max_tokens: Option<usize>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    seed: Option<u64>,
) -> Result<AnswerOptions, ServerError> {
    let mut options = state.engine.answer.clone();
    if let Some(mode) = mode {
        options.mode = mode;
    }
    options.k = check_k(state, k.unwrap_or(options.k))?;
    options.decode.max_new_tokens = check_max_tokens(
        state,
        max_tokens.unwrap_or(options.decode.max_new_tokens.min(state.limits.max_tokens)),
    )?;
    let top_p = top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ServerError::BadRequest(format!(
            "top_p: must be in (0, 1] (got {top_p})"
        )));
    }
    match temperature {
        Some(t) if !(0.0..=10.0).contains(&t) => {
            return Err(ServerError::BadRequest(format!(
                "temperature: must be between 0 and 10 (got {t})"
            )))
        }
        Some(t) if t > 0.0 => {
            options.decode.search = Search::Sample(Sampling {
                temperature: t,
                top_p,
                seed: seed.unwrap_or(0),
            })
        }
        Some(_) => options.decode.search = Search::Greedy,
        None => {}
    }
    Ok(options)
}

/// What a running generation reports to the request that started it.
pub enum AnswerUpdate {
    /// The retrieved chunks (posterior = retrieval probability), from this generation.
    Sources(Vec<Source>, u64),
    Text(String),
    Done(Box<Result<(Answer, u64), ServerError>>),
}

/// A generation running on a blocking thread. Dropping it (the client went away, the time
/// limit passed, the answer was read) cancels the decoding at its next step, which frees the
/// generation slot.
pub struct RunningAnswer {
    pub updates: mpsc::Receiver<AnswerUpdate>,
    cancel: CancelFlag,
}

impl Drop for RunningAnswer {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// Starts answering on a blocking thread; updates arrive on the returned channel. The
/// generation slot is taken here (503 when none is free) and held until decoding ends.
pub fn start_answer(
    state: &Arc<AppState>,
    mut request: GenerationRequest,
) -> Result<RunningAnswer, ServerError> {
    let generator = state.generator()?;
    let slot = state.generation_slot()?;
    let (tx, rx) = mpsc::channel(256);
    let cancel = CancelFlag::default();
    request.options.decode.cancel = cancel.clone();
    let state = state.clone();
    tokio::task::spawn_blocking(move || {
        let result = (|| {
            let retriever = match request.options.mode {
                AnswerMode::ClosedBook => None,
                _ => Some(state.retriever(request.settings)?),
            };
            let generation = retriever.as_ref().map_or(0, |r| r.snapshot().generation());
            let cancel = request.options.decode.cancel.clone();
            let mut on_event = |event: AnswerEvent<'_>| {
                let sent = match event {
                    AnswerEvent::Sources(sources) => {
                        tx.blocking_send(AnswerUpdate::Sources(sources.to_vec(), generation))
                    }
                    AnswerEvent::Text(text) => tx.blocking_send(AnswerUpdate::Text(text.into())),
                };
                // Nobody is listening any more: stop decoding.
                if sent.is_err() {
                    cancel.cancel();
                }
            };
            let answer = answer(
                retriever.as_ref(),
                &generator,
                &request.question,
                &request.options,
                &mut on_event,
            )?;
            state
                .metrics
                .generated_tokens
                .fetch_add(answer.tokens as u64, Ordering::Relaxed);
            Ok((answer, generation))
        })();
        if matches!(result, Err(ServerError::Rag(RagError::Cancelled))) {
            state
                .metrics
                .generations_cancelled
                .fetch_add(1, Ordering::Relaxed);
        }
        // Free the slot before the answer can reach the client: a client that asks again as
        // soon as it has its answer must not find its own previous request still holding it.
        drop(slot);
        let _ = tx.blocking_send(AnswerUpdate::Done(Box::new(result)));
    });
    Ok(RunningAnswer {
        updates: rx,
        cancel,
    })
}

/// Waits for the final answer, within the request time limit.
pub async fn finish_answer(
    state: &AppState,
    mut running: RunningAnswer,
) -> Result<(Answer, u64), ServerError> {
    let limit = state.limits.request_timeout;
    let wait = async {
        while let Some(update) = running.updates.recv().await {
            if let AnswerUpdate::Done(result) = update {
                return *result;
            }
        }
        Err(ServerError::Internal(
            "the generation worker stopped".into(),
        ))
    };
    tokio::time::timeout(limit, wait)
        .await
        .map_err(|_| ServerError::Timeout(limit))?
}

/// Forwards a generation's updates to the client as server-sent events (`to_events` makes
/// zero or more events of each update) until the answer is done or the request time limit
/// passes, then sends `last`. A client that disconnects stops the forwarding, not the answer.
pub fn sse_events(
    state: &AppState,
    mut running: RunningAnswer,
    mut to_events: impl FnMut(AnswerUpdate) -> Vec<Event> + Send + 'static,
    last: Option<Event>,
) -> Response {
    let limit = state.limits.request_timeout;
    let deadline = tokio::time::Instant::now() + limit;
    let (tx, rx) = mpsc::channel::<Event>(64);
    tokio::spawn(async move {
        loop {
            let update = match tokio::time::timeout_at(deadline, running.updates.recv()).await {
                Ok(Some(update)) => update,
                Ok(None) => AnswerUpdate::Done(Box::new(Err(ServerError::Internal(
                    "the generation worker stopped".into(),
                )))),
                Err(_) => AnswerUpdate::Done(Box::new(Err(ServerError::Timeout(limit)))),
            };
            let done = matches!(update, AnswerUpdate::Done(_));
            for event in to_events(update) {
                if tx.send(event).await.is_err() {
                    return;
                }
            }
            if done {
                break;
            }
        }
        if let Some(last) = last {
            let _ = tx.send(last).await;
        }
    });
    Sse::new(ReceiverStream::new(rx).map(Ok::<_, Infallible>))
        .keep_alive(KeepAlive::default())
        .into_response()
}

#[derive(Serialize)]
struct AskResponse {
    #[serde(flatten)]
    answer: Answer,
    generation: u64,
}

pub async fn ask(
    State(state): State<Arc<AppState>>,
    ApiJson(request): ApiJson<AskRequest>,
) -> Result<Response, ServerError> {
    let mode = match &request.marginalize {
        None => None,
        Some(name) => Some(parse_marginalize(name).ok_or_else(|| {
            ServerError::BadRequest(format!(
                "marginalize: unknown mode {name:?} (sequence, sequence-fast, token, none or closed-book)"
            ))
        })?),
    };
    let options = answer_options(
        &state,
        mode,
        request.k,
        request.max_tokens,
        request.temperature,
        request.top_p,
        request.seed,
    )?;
    let settings = request.retrieval.settings(&state.engine.retrieval)?;
    let running = start_answer(
        &state,
        GenerationRequest {
            question: request.question,
            options,
            settings,
        },
    )?;
    if !request.stream {
        let (answer, generation) = finish_answer(&state, running).await?;
        return Ok(Json(AskResponse { answer, generation }).into_response());
    }
    // Server-sent events: `sources` (retrieval probabilities), `token`…, then `answer` (the
    // whole answer with each source's posterior) or `error`.
    let to_events = |update| {
        vec![match update {
            AnswerUpdate::Sources(sources, generation) => Event::default()
                .event("sources")
                .data(json!({"sources": sources, "generation": generation}).to_string()),
            AnswerUpdate::Text(text) => Event::default()
                .event("token")
                .data(json!({ "text": text }).to_string()),
            AnswerUpdate::Done(result) => match *result {
                Ok((answer, generation)) => {
                    let mut value = serde_json::to_value(&answer).unwrap_or(Value::Null);
                    value["generation"] = json!(generation);
                    Event::default().event("answer").data(value.to_string())
                }
                Err(e) => Event::default().event("error").data(
                    json!({"error": {"message": e.to_string(), "code": e.status().as_u16()}})
                        .to_string(),
                ),
            },
        }]
    };
    Ok(sse_events(&state, running, to_events, None))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewDocumentRequest {
    pub id: String,
    pub text: String,
    pub title: Option<String>,
    #[serde(default)]
    pub metadata: Map<String, Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpsertRequest {
    pub documents: Vec<NewDocumentRequest>,
}

/// Where API documents say they came from (documents from files carry their path).
pub const API_SOURCE: &str = "api";

fn check_id(id: &str, field: &str) -> Result<(), ServerError> {
    if id.is_empty() || id.len() > 512 || id.chars().any(char::is_control) {
        return Err(ServerError::BadRequest(format!(
            "{field}: a document id must be 1 to 512 bytes without control characters"
        )));
    }
    Ok(())
}

/// Upserts documents by id: new ids are added, changed ones replaced, unchanged ones (same
/// title, text and metadata) left as they are; all in one commit.
pub async fn upsert_documents(
    State(state): State<Arc<AppState>>,
    ApiJson(request): ApiJson<UpsertRequest>,
) -> Result<Json<DocumentChanges>, ServerError> {
    if request.documents.is_empty() || request.documents.len() > state.limits.max_batch {
        return Err(ServerError::BadRequest(format!(
            "documents: send between 1 and {} documents per request (got {})",
            state.limits.max_batch,
            request.documents.len()
        )));
    }
    let mut documents = Vec::with_capacity(request.documents.len());
    for (i, doc) in request.documents.into_iter().enumerate() {
        check_id(&doc.id, &format!("documents[{i}].id"))?;
        let title = doc.title.and_then(|t| zrag_text::normalize_title(&t));
        documents.push(Document::new(
            doc.id,
            API_SOURCE,
            title,
            zrag_text::normalize_text(&doc.text),
            doc.metadata,
        ));
    }
    let changes = write(&state, documents, Vec::new()).await?;
    state
        .metrics
        .documents_upserted
        .fetch_add((changes.added + changes.updated) as u64, Ordering::Relaxed);
    Ok(Json(changes))
}

pub async fn delete_document(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Json<DocumentChanges>, ServerError> {
    check_id(&id, "id")?;
    let changes = write(&state, Vec::new(), vec![id.clone()]).await?;
    if changes.deleted == 0 {
        return Err(no_such_document(&id));
    }
    state
        .metrics
        .documents_deleted
        .fetch_add(changes.deleted as u64, Ordering::Relaxed);
    Ok(Json(changes))
}

fn no_such_document(id: &str) -> ServerError {
    ServerError::NotFound(format!("no document with id {id:?}"))
}

/// One write: embed, commit, then serve the new generation. Not cut by the request time
/// limit: a write either commits or fails, and the client learns which.
async fn write(
    state: &Arc<AppState>,
    documents: Vec<Document>,
    delete_ids: Vec<String>,
) -> Result<DocumentChanges, ServerError> {
    let _write = state.writes.lock().await;
    let shared = state.clone();
    tokio::task::spawn_blocking(move || {
        let engine = &shared.engine;
        let changes = apply_documents(
            &engine.store,
            &engine.doc_encoder,
            documents,
            &delete_ids,
            engine.chunker,
        )?;
        // With a read replica, answer only once the replica shows the change, so that a
        // client's next search sees its own write.
        if let zrag_index::store::Store::Postgres(store) = &engine.store {
            store.wait_for_replica(shared.limits.request_timeout)?;
        }
        shared.refresh()?;
        Ok(changes)
    })
    .await
    .map_err(|e| ServerError::Internal(format!("write worker failed: {e}")))?
}

#[derive(Serialize)]
pub struct StoredDocument {
    id: String,
    source: String,
    title: Option<String>,
    metadata: Map<String, Value>,
    content_hash: String,
    generation: u64,
    chunks: Vec<zrag_index::collection::StoredChunk>,
}

pub async fn get_document(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Json<StoredDocument>, ServerError> {
    let shared = state.clone();
    let document = blocking(&state, move || {
        let snapshot = shared.snapshot()?.ok_or_else(|| no_such_document(&id))?;
        let entry = snapshot
            .document(&id)?
            .ok_or_else(|| no_such_document(&id))?;
        let chunks = snapshot.document_chunks(&id)?;
        Ok(StoredDocument {
            id: entry.id,
            source: entry.source,
            title: entry.title,
            metadata: entry.metadata,
            content_hash: entry.content_hash,
            generation: snapshot.generation(),
            chunks,
        })
    })
    .await?;
    Ok(Json(document))
}

pub async fn healthz(State(state): State<Arc<AppState>>) -> Json<Value> {
    let gauges = state.gauges();
    Json(json!({
        "status": "ok",
        "generation": gauges.generation,
        "documents": gauges.documents,
        "chunks": gauges.chunks,
        "generator": state.engine.generator.as_ref().map(|g| g.name().to_string()),
        "encoder": state.engine.query_encoder.identity().name,
        "uptime_seconds": state.started.elapsed().as_secs_f64(),
    }))
}

pub async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let text = state.metrics.render(&state.gauges());
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
}
