//! zrag-server: the HTTP service behind `zrag serve`.
//!
//! One process serves one collection with its encoders and generator:
//! - zrag's API ([`api`]): `POST /v1/search`, `POST /v1/ask` (JSON, or server-sent events:
//!   sources with retrieval probabilities, tokens, then the answer with posteriors),
//!   `POST /v1/documents`, `GET`/`DELETE /v1/documents/{id}`, `GET /healthz`, `GET /metrics`;
//! - OpenAI's ([`openai`]): `GET /v1/models`, `POST /v1/embeddings`,
//!   `POST /v1/chat/completions` (retrieval-augmented, streaming, sources in the response).
//!
//! Reads work on a snapshot of the last commit and writes swap in the next one ([`state`]);
//! [`Limits`] bound what one request may cost, and an API key is required whenever the
//! server listens beyond loopback.

pub mod api;
mod config;
mod error;
mod extract;
pub mod metrics;
pub mod openai;
pub mod state;

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::header::AUTHORIZATION;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;

pub use config::{check_access, Limits};
pub use error::ServerError;
pub use state::{AppState, Engine};

/// Every route, with authentication, metrics and the body limit.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/search", post(api::search))
        .route("/v1/ask", post(api::ask))
        .route("/v1/documents", post(api::upsert_documents))
        .route(
            "/v1/documents/{id}",
            get(api::get_document).delete(api::delete_document),
        )
        .route("/v1/models", get(openai::models))
        .route("/v1/embeddings", post(openai::embeddings))
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route("/metrics", get(api::metrics))
        .route("/healthz", get(api::healthz))
        .fallback(|| async {
            ServerError::NotFound("no such endpoint (see GET /v1/models and the README)".into())
        })
        .layer(middleware::from_fn_with_state(state.clone(), authenticate))
        .layer(middleware::from_fn_with_state(state.clone(), record))
        .layer(DefaultBodyLimit::max(state.limits.max_body_bytes))
        .with_state(state)
}

/// Serves until `shutdown` resolves; also follows commits made by other processes.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<AppState>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    let watcher = tokio::spawn(state.clone().watch_collection(Duration::from_secs(2)));
    let served = axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await;
    watcher.abort();
    Ok(served?)
}

/// Bearer-token check on every route but the health check (load balancers probe it without
/// credentials).
async fn authenticate(
    State(state): State<Arc<AppState>>,
    request: Request,
    next: Next,
) -> Response {
    let Some(key) = &state.api_key else {
        return next.run(request).await;
    };
    if request.uri().path() == "/healthz" {
        return next.run(request).await;
    }
    let presented = request
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match presented {
        Some(token) if constant_time_eq(token.as_bytes(), key.as_bytes()) => {
            next.run(request).await
        }
        _ => ServerError::Unauthorized.into_response(),
    }
}

/// Compares without an early exit, so response time does not reveal a key's prefix.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn record(State(state): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", |p| p.as_str())
        .to_string();
    let method = request.method().to_string();
    let start = Instant::now();
    let response = next.run(request).await;
    state
        .metrics
        .record(&route, &method, response.status().as_u16(), start.elapsed());
    response
}

#[cfg(test)]
mod tests {
    #[test]
    fn constant_time_eq_compares_whole_strings() {
        assert!(super::constant_time_eq(b"secret", b"secret"));
        assert!(!super::constant_time_eq(b"secret", b"secreT"));
        assert!(!super::constant_time_eq(b"secret", b"secret2"));
        assert!(!super::constant_time_eq(b"", b"x"));
    }
}
