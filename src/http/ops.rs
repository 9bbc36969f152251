//! Operational endpoints: liveness, readiness, metrics, the API description.

use std::time::Duration;

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

use super::error::{ApiError, Problem};
use super::SharedState;
use crate::db;

#[derive(Serialize, ToSchema)]
pub struct HealthBody {
    /// Always `ok`.
    status: &'static str,
}

#[derive(Serialize, ToSchema)]
pub struct ReadyBody {
    /// Always `ready`.
    status: &'static str,
    /// The database's migration, the one this binary needs.
    schema_version: i64,
}

/// The process is alive.
#[utoipa::path(get, path = "/healthz", tag = "operations", responses((status = 200, description = "alive", body = HealthBody)))]
pub async fn healthz() -> Response {
    axum::Json(HealthBody { status: "ok" }).into_response()
}

/// The database is reachable and fully migrated, and the object store answers.
#[utoipa::path(get, path = "/readyz", tag = "operations",
    responses((status = 200, description = "ready", body = ReadyBody), (status = 503, body = Problem)))]
pub async fn readyz(State(state): State<SharedState>) -> Result<Response, ApiError> {
    let check = state.db.read(|conn| async move { db::schema_version(&conn).await });
    let version = tokio::time::timeout(Duration::from_secs(2), check)
        .await
        .map_err(|_| ApiError::unavailable("the database did not answer within 2 s", 1))??;
    if version != db::latest_migration() {
        return Err(ApiError::unavailable(
            format!("database schema is at migration {version}, this binary needs {}", db::latest_migration()),
            5,
        ));
    }
    tokio::time::timeout(Duration::from_secs(2), state.storage.check())
        .await
        .map_err(|_| ApiError::unavailable("the object store did not answer within 2 s", 1))?
        .map_err(|e| ApiError::unavailable(e.to_string(), 1))?;
    Ok(axum::Json(ReadyBody { status: "ready", schema_version: version }).into_response())
}

/// Prometheus metrics.
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "Prometheus text format", content_type = "text/plain")))]
pub async fn metrics(State(state): State<SharedState>) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], state.metrics.render()).into_response()
}

/// This document.
#[utoipa::path(get, path = "/openapi.json", tag = "operations",
    responses((status = 200, description = "the OpenAPI 3.1 description of this API")))]
pub async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], super::openapi_json()).into_response()
}
