//! Whole objects: their counters and lease, their history, delete-all, and listing a namespace.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::error::{ApiError, Problem};
use super::extract::{list_limit, ApiQuery, NamespacePath, ObjectPath};
use super::{written, SharedState};
use crate::analytics::{history, ExportError};
use crate::clock::{now_ms, rfc3339_ms};
use crate::objects::{self, validate_id_prefix, Mutation, OpResult};
use crate::routing::{Replay, Routed};

#[derive(Serialize, ToSchema)]
pub struct ObjectBody {
    ns: String,
    id: String,
    version: i64,
    keys: i64,
    /// Bytes of keys and values.
    bytes: i64,
    fence: i64,
    /// The replica holding the write lease, if the lease is live.
    owner: Option<String>,
    owner_url: Option<String>,
    /// RFC 3339; null when no replica holds the lease.
    lease_expires_at: Option<String>,
}

/// An object's version, size and lease.
#[utoipa::path(get, path = "/v1/objects/{ns}/{id}", tag = "objects",
    params(("ns" = String, Path), ("id" = String, Path)),
    responses((status = 200, body = ObjectBody), (status = 400, body = Problem), (status = 404, body = Problem)))]
pub async fn get_object(
    State(state): State<SharedState>,
    ObjectPath(object): ObjectPath,
) -> Result<Response, ApiError> {
    let info = objects::object_info(&state.db, &object)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("object {object} was never written")))?;
    let live = info.owner.is_some() && info.lease_expires_at_ms > now_ms();
    Ok(axum::Json(ObjectBody {
        ns: object.ns,
        id: object.id,
        version: info.version,
        keys: info.keys,
        bytes: info.bytes,
        fence: info.fence,
        owner: info.owner.filter(|_| live),
        owner_url: info.owner_url.filter(|_| live),
        lease_expires_at: live.then(|| rfc3339_ms(info.lease_expires_at_ms)),
    })
    .into_response())
}

#[derive(Serialize, ToSchema)]
pub struct DeleteAllBody {
    deleted_keys: i64,
    deleted_blobs: i64,
    version: i64,
}

/// Delete every key of an object (like `deleteAll`); the version bumps.
#[utoipa::path(delete, path = "/v1/objects/{ns}/{id}", tag = "objects",
    params(("ns" = String, Path), ("id" = String, Path)),
    responses((status = 200, body = DeleteAllBody), (status = 400, body = Problem), (status = 404, body = Problem), (status = 503, body = Problem)))]
pub async fn delete_object(
    State(state): State<SharedState>,
    ObjectPath(object): ObjectPath,
    replay: Replay,
) -> Result<Response, ApiError> {
    if !replay.body.is_empty() {
        return Err(ApiError::BadRequest("DELETE of an object takes no body".into()));
    }
    let committed = match state.routing.commit(&object, Mutation::DeleteAll, replay).await? {
        Routed::Forwarded(forwarded) => return Ok(forwarded.into_response()),
        Routed::Local(committed) => committed,
    };
    let (deleted_keys, deleted_blobs) = match committed.results.first() {
        Some(OpResult::DeleteAll { deleted_keys, deleted_blobs }) => (*deleted_keys, *deleted_blobs),
        _ => (0, 0),
    };
    Ok(written(&committed, StatusCode::OK, DeleteAllBody { deleted_keys, deleted_blobs, version: committed.version }))
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListObjectsQuery {
    /// Only ids starting with this.
    prefix: Option<String>,
    /// 1-10000, default 1000.
    limit: Option<usize>,
    /// From a previous page's `cursor`.
    cursor: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct ObjectSummaryBody {
    id: String,
    version: i64,
    keys: i64,
    bytes: i64,
}

#[derive(Serialize, ToSchema)]
pub struct ListObjectsBody {
    items: Vec<ObjectSummaryBody>,
    cursor: Option<String>,
}

/// List the objects of a namespace, by id.
#[utoipa::path(get, path = "/v1/objects/{ns}", tag = "objects",
    params(("ns" = String, Path), ListObjectsQuery),
    responses((status = 200, body = ListObjectsBody), (status = 400, body = Problem)))]
pub async fn list_objects(
    State(state): State<SharedState>,
    NamespacePath(ns): NamespacePath,
    ApiQuery(query): ApiQuery<ListObjectsQuery>,
) -> Result<Response, ApiError> {
    let limit = list_limit(query.limit)?;
    if let Some(prefix) = &query.prefix {
        validate_id_prefix(prefix)?;
    }
    let after =
        query.cursor.as_deref().map(|c| objects::decode_cursor(c, false)).transpose().map_err(ApiError::BadRequest)?;
    let after = after
        .map(String::from_utf8)
        .transpose()
        .map_err(|_| ApiError::BadRequest("invalid cursor: not one this server issued".into()))?;
    let prefix = query.prefix.as_deref().filter(|p| !p.is_empty());
    let (items, more) = objects::list_objects(&state.db, &ns, prefix, after.as_deref(), limit).await?;
    let cursor = if more { items.last().map(|o| objects::encode_cursor(o.id.as_bytes(), false)) } else { None };
    let items = items
        .into_iter()
        .map(|o| ObjectSummaryBody { id: o.id, version: o.version, keys: o.keys, bytes: o.bytes })
        .collect();
    Ok(axum::Json(ListObjectsBody { items, cursor }).into_response())
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct HistoryQuery {
    /// 1-1000 versions, default 100.
    limit: Option<usize>,
    /// From a previous page's `cursor`: versions older than it.
    cursor: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct HistoryBody {
    /// Newest first.
    versions: Vec<HistoryVersion>,
    /// Pass as `cursor` for older versions; null on the last page.
    cursor: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct HistoryVersion {
    version: i64,
    /// RFC 3339: when the version was committed.
    committed_at: String,
    /// The fence it was committed under.
    fence: i64,
    /// The replica that committed it.
    instance: String,
    /// What it changed, in order.
    changes: Vec<HistoryChange>,
}

#[derive(Serialize, ToSchema)]
pub struct HistoryChange {
    /// put, delete, delete_all, blob_put, blob_delete or restore.
    op: String,
    /// The key or blob name; absent for delete_all.
    #[serde(skip_serializing_if = "Option::is_none")]
    key: Option<String>,
}

const DEFAULT_HISTORY_LIMIT: usize = 100;
const MAX_HISTORY_LIMIT: usize = 1000;

/// An object's versions, newest first: when, under which fence and by which
/// replica each was committed, and the keys and blobs it changed. Includes
/// changes not yet exported to the Iceberg tables.
#[utoipa::path(get, path = "/v1/objects/{ns}/{id}/history", tag = "objects",
    params(("ns" = String, Path), ("id" = String, Path), HistoryQuery),
    responses((status = 200, body = HistoryBody), (status = 400, body = Problem), (status = 404, body = Problem),
              (status = 503, body = Problem)))]
pub async fn get_history(
    State(state): State<SharedState>,
    ObjectPath(object): ObjectPath,
    ApiQuery(query): ApiQuery<HistoryQuery>,
) -> Result<Response, ApiError> {
    let limit = query.limit.unwrap_or(DEFAULT_HISTORY_LIMIT);
    if !(1..=MAX_HISTORY_LIMIT).contains(&limit) {
        return Err(ApiError::BadRequest(format!("limit must be between 1 and {MAX_HISTORY_LIMIT}, got {limit}")));
    }
    let before = match query.cursor.as_deref() {
        None => None,
        Some(cursor) => match cursor.parse::<i64>() {
            Ok(version) if version > 0 => Some(version),
            _ => return Err(ApiError::BadRequest("invalid cursor: not one this server issued".into())),
        },
    };
    if objects::object_info(&state.db, &object).await?.is_none() {
        return Err(ApiError::NotFound(format!("object {object} was never written")));
    }
    let catalog = state.exporter.catalog();
    let (versions, more) = history::history(&state.db, catalog, &object, before, limit)
        .await
        .map_err(|err| history_error(&object, err))?;
    let cursor = if more { versions.last().map(|v| v.version.to_string()) } else { None };
    let versions = versions
        .into_iter()
        .map(|v| HistoryVersion {
            version: v.version,
            committed_at: rfc3339_ms(v.ts_micros / 1000),
            fence: v.fence,
            instance: v.instance,
            changes: v.changes.into_iter().map(|(op, key)| HistoryChange { op, key }).collect(),
        })
        .collect();
    Ok(axum::Json(HistoryBody { versions, cursor }).into_response())
}

/// A failure to read an object's change log, as the client sees it.
pub(super) fn history_error(object: &objects::ObjectRef, err: ExportError) -> ApiError {
    match err {
        ExportError::Database(err) => ApiError::from(err),
        other => {
            tracing::warn!(object = %object, error = %other, "could not read an object's exported history");
            ApiError::unavailable("the exported history could not be read; retry later", 1)
        }
    }
}
