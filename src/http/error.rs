//! Every error a client can see, and the one table that maps each kind to a
//! status code and a stable problem `type` (RFC 9457 problem+json).

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

use crate::blobs::StorageError;
use crate::db::StoreError;
use crate::model::{InvalidName, Rejection};
use crate::routing::CommitError;

pub const PROBLEM_BASE: &str = "https://statehouse.dev/problems/";

#[derive(Debug, Clone, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    MethodNotAllowed(String),
    #[error("{detail}")]
    PreconditionFailed { detail: String, op_index: Option<usize> },
    #[error("{0}")]
    Fenced(String),
    #[error("{0}")]
    PayloadTooLarge(String),
    #[error("{0}")]
    UnsupportedMediaType(String),
    #[error("{detail}")]
    RangeNotSatisfiable { detail: String, size: u64 },
    #[error("{0}")]
    Conflict(String),
    /// A restore to a point older than the history retention.
    #[error("{0}")]
    BeyondRetention(String),
    /// A restore the change log cannot make exactly.
    #[error("{0}")]
    HistoryIncomplete(String),
    /// An alarm in a namespace with no configured delivery target.
    #[error("{0}")]
    NoAlarmTarget(String),
    #[error("{detail}")]
    TooManyRequests { detail: String, retry_after_secs: u64 },
    #[error("{detail}")]
    Unavailable { detail: String, retry_after_secs: Option<u64> },
    #[error("{0}")]
    Internal(String),
}

/// The problem document. `op_index` is present for a failed batch condition.
#[derive(Debug, Serialize, ToSchema)]
pub struct Problem {
    #[serde(rename = "type")]
    pub kind: String,
    pub title: &'static str,
    pub status: u16,
    pub detail: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub op_index: Option<usize>,
}

impl ApiError {
    pub fn unavailable(detail: impl Into<String>, retry_after_secs: u64) -> ApiError {
        ApiError::Unavailable { detail: detail.into(), retry_after_secs: Some(retry_after_secs) }
    }

    /// The table: status, problem type slug, title.
    fn kind(&self) -> (StatusCode, &'static str, &'static str) {
        match self {
            ApiError::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad-request", "Bad request"),
            ApiError::Unauthorized(_) => (StatusCode::UNAUTHORIZED, "unauthorized", "Unauthorized"),
            ApiError::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden", "Forbidden"),
            ApiError::NotFound(_) => (StatusCode::NOT_FOUND, "not-found", "Not found"),
            ApiError::MethodNotAllowed(_) => {
                (StatusCode::METHOD_NOT_ALLOWED, "method-not-allowed", "Method not allowed")
            }
            ApiError::PreconditionFailed { .. } => {
                (StatusCode::PRECONDITION_FAILED, "precondition-failed", "Precondition failed")
            }
            ApiError::Fenced(_) => (StatusCode::CONFLICT, "fenced", "Ownership of the object moved"),
            ApiError::PayloadTooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "payload-too-large", "Payload too large"),
            ApiError::UnsupportedMediaType(_) => {
                (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported-media-type", "Unsupported media type")
            }
            ApiError::RangeNotSatisfiable { .. } => {
                (StatusCode::RANGE_NOT_SATISFIABLE, "range-not-satisfiable", "Range not satisfiable")
            }
            ApiError::Conflict(_) => (StatusCode::CONFLICT, "conflict", "Conflict"),
            ApiError::BeyondRetention(_) => {
                (StatusCode::UNPROCESSABLE_ENTITY, "beyond-retention", "Beyond the history retention")
            }
            ApiError::HistoryIncomplete(_) => {
                (StatusCode::UNPROCESSABLE_ENTITY, "history-incomplete", "The history cannot restore this exactly")
            }
            ApiError::NoAlarmTarget(_) => {
                (StatusCode::UNPROCESSABLE_ENTITY, "no-alarm-target", "No alarm target for the namespace")
            }
            ApiError::TooManyRequests { .. } => (StatusCode::TOO_MANY_REQUESTS, "rate-limited", "Too many requests"),
            ApiError::Unavailable { .. } => (StatusCode::SERVICE_UNAVAILABLE, "unavailable", "Service unavailable"),
            ApiError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal", "Internal error"),
        }
    }

    pub fn status(&self) -> StatusCode {
        self.kind().0
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, slug, title) = self.kind();
        if status.is_server_error() {
            tracing::warn!(status = status.as_u16(), error = %self, "request failed");
        }
        let retry_after = match &self {
            ApiError::Unavailable { retry_after_secs, .. } => *retry_after_secs,
            ApiError::TooManyRequests { retry_after_secs, .. } => Some(*retry_after_secs),
            _ => None,
        };
        let op_index = match &self {
            ApiError::PreconditionFailed { op_index, .. } => *op_index,
            _ => None,
        };
        let problem = Problem {
            kind: format!("{PROBLEM_BASE}{slug}"),
            title,
            status: status.as_u16(),
            detail: self.to_string(),
            op_index,
        };
        let body = serde_json::to_vec(&problem).expect("a problem serialises");
        let mut response = (status, body).into_response();
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/problem+json"));
        if let Some(secs) = retry_after {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if let ApiError::Unauthorized(_) = &self {
            headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer realm=\"statehouse\""));
        }
        if let ApiError::RangeNotSatisfiable { size, .. } = &self {
            if let Ok(value) = HeaderValue::from_str(&format!("bytes */{size}")) {
                headers.insert(header::CONTENT_RANGE, value);
            }
        }
        response
    }
}

impl From<StoreError> for ApiError {
    fn from(err: StoreError) -> Self {
        match err {
            StoreError::Unavailable(detail) => ApiError::unavailable(detail, 1),
            StoreError::Internal(detail) => ApiError::Internal(detail),
        }
    }
}

impl From<crate::blobs::upload::UploadRefused> for ApiError {
    fn from(err: crate::blobs::upload::UploadRefused) -> Self {
        use crate::blobs::upload::UploadRefused;
        match err {
            UploadRefused::BadInput(detail) => ApiError::BadRequest(detail),
            UploadRefused::NothingUploaded => ApiError::NotFound(err.to_string()),
            UploadRefused::TooOld => ApiError::Conflict(err.to_string()),
            UploadRefused::TooLarge(_) => ApiError::PayloadTooLarge(err.to_string()),
            UploadRefused::Store(err) => err.into(),
        }
    }
}

impl From<StorageError> for ApiError {
    fn from(err: StorageError) -> Self {
        // The store's own messages name its endpoint, bucket and keys: they go
        // to the log, and the client learns only what happened.
        tracing::warn!(error = %err, "object store request failed");
        match err {
            StorageError::NotFound(_) => {
                // Metadata said it exists: the store lost it or is out of step; not the client's fault.
                ApiError::unavailable("the blob's data is missing from the object store", 5)
            }
            StorageError::NotSupported(detail) => ApiError::Conflict(detail),
            StorageError::Unavailable(_) | StorageError::Config(_) => {
                ApiError::unavailable("the object store did not answer; retry later", 1)
            }
        }
    }
}

impl From<CommitError> for ApiError {
    fn from(err: CommitError) -> Self {
        match err {
            CommitError::Store(err) => err.into(),
            CommitError::Refused(rejection) => rejection.into(),
        }
    }
}

impl From<InvalidName> for ApiError {
    fn from(err: InvalidName) -> Self {
        ApiError::BadRequest(err.0)
    }
}

impl From<Rejection> for ApiError {
    fn from(rejection: Rejection) -> Self {
        match rejection {
            Rejection::Fenced => {
                ApiError::Fenced("another replica took the object over before this write committed; retry it".into())
            }
            Rejection::PreconditionFailed { op_index, key } => ApiError::PreconditionFailed {
                detail: format!("the condition on key {key:?} (op {op_index}) does not hold"),
                op_index: Some(op_index),
            },
            Rejection::NotFound => ApiError::NotFound("the object was never written".into()),
            Rejection::NotEmpty => ApiError::Conflict(
                "the object to fork into has keys or blobs; pass \"overwrite\": true to replace them".into(),
            ),
        }
    }
}
