//! The one error type of zrag-server, and how each error becomes an HTTP response.

use std::time::Duration;

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use zrag_index::IndexError;
use zrag_rag::RagError;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The request is malformed or asks for more than the limits allow.
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    PayloadTooLarge(String),
    #[error("missing or wrong bearer token (send `Authorization: Bearer <key>`)")]
    Unauthorized,
    #[error("{0}")]
    NotFound(String),
    /// The collection cannot serve this now (empty, or another process holds the writer lock).
    #[error("{0}")]
    Conflict(String),
    /// Every slot of a concurrency limit is taken; the client should retry.
    #[error("server busy: all {limit} {what} slots are in use; retry shortly")]
    Busy { what: &'static str, limit: usize },
    #[error("the request took longer than the limit of {} s", .0.as_secs_f64())]
    Timeout(Duration),
    /// A feature this server was started without (e.g. no generator installed).
    #[error("{0}")]
    Unavailable(String),
    #[error(transparent)]
    Rag(#[from] RagError),
    #[error(transparent)]
    Index(#[from] IndexError),
    #[error("internal error: {0}")]
    Internal(String),
    /// The server cannot start as configured.
    #[error("{0}")]
    Config(String),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

impl ServerError {
    pub fn status(&self) -> StatusCode {
        match self {
            ServerError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ServerError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ServerError::Unauthorized => StatusCode::UNAUTHORIZED,
            ServerError::NotFound(_) => StatusCode::NOT_FOUND,
            ServerError::Conflict(_) => StatusCode::CONFLICT,
            ServerError::Busy { .. } | ServerError::Unavailable(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ServerError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
            ServerError::Rag(e) => match e {
                RagError::EmptyCollection => StatusCode::CONFLICT,
                RagError::Cancelled => StatusCode::SERVICE_UNAVAILABLE,
                RagError::DuplicateDocument(_) | RagError::InvalidGenerationInput(_) => {
                    StatusCode::BAD_REQUEST
                }
                RagError::Index(IndexError::Locked { .. }) => StatusCode::CONFLICT,
                RagError::Index(IndexError::ModelMismatch { .. }) => StatusCode::CONFLICT,
                RagError::Index(e) if e.is_unavailable() => StatusCode::SERVICE_UNAVAILABLE,
                _ => StatusCode::INTERNAL_SERVER_ERROR,
            },
            ServerError::Index(IndexError::Locked { .. }) => StatusCode::CONFLICT,
            // The database is restarting or out of pooled connections: try again shortly.
            ServerError::Index(e) if e.is_unavailable() => StatusCode::SERVICE_UNAVAILABLE,
            ServerError::Index(_)
            | ServerError::Internal(_)
            | ServerError::Config(_)
            | ServerError::Io(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The OpenAI error `type` field, so that OpenAI clients raise their usual exceptions.
    fn kind(&self) -> &'static str {
        match self.status() {
            StatusCode::UNAUTHORIZED => "authentication_error",
            StatusCode::NOT_FOUND => "not_found_error",
            StatusCode::SERVICE_UNAVAILABLE | StatusCode::GATEWAY_TIMEOUT => "server_error",
            s if s.is_client_error() => "invalid_request_error",
            _ => "server_error",
        }
    }
}

/// Error bodies follow OpenAI's shape, `{"error": {"message", "type", "code"}}`, on every
/// endpoint, so one client-side handler covers both APIs.
impl IntoResponse for ServerError {
    fn into_response(self) -> Response {
        let status = self.status();
        let body = json!({"error": {
            "message": self.to_string(),
            "type": self.kind(),
            "code": status.as_u16(),
        }});
        let mut response = (status, axum::Json(body)).into_response();
        if matches!(self, ServerError::Busy { .. }) {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        if matches!(self, ServerError::Unauthorized) {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}
