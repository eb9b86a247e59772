//! A JSON body extractor whose rejections are [`ServerError`]s, so that a malformed body gets
//! the same JSON error shape as every other error (axum's own answers in plain text).

use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use axum::Json;
use serde::de::DeserializeOwned;

use crate::ServerError;

pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ServerError;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        match Json::<T>::from_request(request, state).await {
            Ok(Json(value)) => Ok(ApiJson(value)),
            Err(rejection) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                Err(ServerError::PayloadTooLarge(format!(
                    "request body too large: {}",
                    rejection.body_text()
                )))
            }
            Err(rejection) => Err(ServerError::BadRequest(rejection.body_text())),
        }
    }
}
