//! Point-in-time restore and fork: an object's state at a version or an
//! instant of its history, written back as one fenced write, into the object
//! itself or into another one of its namespace.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::error::{ApiError, Problem};
use super::extract::{precondition, ObjectPath};
use super::objects::history_error;
use super::{written, SharedState};
use crate::analytics::history::{self, PastError, Point};
use crate::blobs::stored_path;
use crate::clock::{now_ms, rfc3339_ms};
use crate::model::{Mutation, ObjectRef, OpResult, Restore, RestoreSource};
use crate::objects;
use crate::routing::{Replay, Routed};

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RestoreRequest {
    /// The state just after this version was committed (one of `version` and `at`).
    #[schema(minimum = 1)]
    version: Option<i64>,
    /// RFC 3339: the state of the newest version committed at or before this instant.
    at: Option<String>,
    /// Fork: write the state into this object of the same namespace instead.
    into: Option<String>,
    /// With `into`: replace what that object holds (otherwise it must have no keys and no blobs).
    #[serde(default)]
    overwrite: bool,
}

#[derive(Serialize, ToSchema)]
pub struct RestoreBody {
    /// The object written: the restored one, or the fork.
    ns: String,
    id: String,
    /// Its version after the restore.
    version: i64,
    restored_from: RestoredFrom,
    /// Keys and blobs it now holds.
    keys: i64,
    blobs: i64,
}

#[derive(Serialize, ToSchema)]
pub struct RestoredFrom {
    id: String,
    version: i64,
    /// RFC 3339: when that version was committed.
    committed_at: String,
}

/// Restore an object to a past version or instant, or fork that state into
/// another object. The restore is one write: a new version whose changes
/// (a `restore` row, then every key and blob) reach the change log, so it
/// can itself be undone by restoring again. `If-Match` is on the version of
/// the object written.
#[utoipa::path(post, path = "/v1/objects/{ns}/{id}/restore", tag = "objects",
    params(("ns" = String, Path), ("id" = String, Path), ("If-Match" = Option<String>, Header)),
    request_body = RestoreRequest,
    responses((status = 200, body = RestoreBody), (status = 400, body = Problem), (status = 404, body = Problem),
              (status = 409, body = Problem), (status = 412, body = Problem), (status = 413, body = Problem),
              (status = 422, body = Problem),
              (status = 503, body = Problem)))]
pub async fn restore(
    State(state): State<SharedState>,
    ObjectPath(source): ObjectPath,
    replay: Replay,
) -> Result<Response, ApiError> {
    let request: RestoreRequest =
        serde_json::from_slice(&replay.body).map_err(|e| ApiError::BadRequest(format!("invalid restore JSON: {e}")))?;
    let not_before_micros = (now_ms() - state.settings.history_retention.as_millis() as i64) * 1000;
    let point = match (request.version, request.at.as_deref()) {
        (Some(version), None) if version >= 1 => Point::Version(version),
        (Some(version), None) => {
            return Err(ApiError::BadRequest(format!("version must be 1 or more, got {version}")));
        }
        (None, Some(at)) => {
            let at = chrono::DateTime::parse_from_rfc3339(at)
                .map_err(|e| ApiError::BadRequest(format!("at must be an RFC 3339 instant ({e}): {at:?}")))?;
            let micros = at.timestamp_micros();
            if micros < not_before_micros {
                return Err(ApiError::BeyondRetention(format!(
                    "{at} is older than the history retention ({}); it can no longer be restored",
                    humantime::format_duration(state.settings.history_retention)
                )));
            }
            Point::At(micros)
        }
        _ => return Err(ApiError::BadRequest("give exactly one of version and at".into())),
    };
    let target = match &request.into {
        Some(into) if *into == source.id => {
            return Err(ApiError::BadRequest("into names the object itself; leave it out to restore in place".into()))
        }
        Some(into) => ObjectRef::new(&source.ns, into)?,
        None if request.overwrite => return Err(ApiError::BadRequest("overwrite applies only with into".into())),
        None => source.clone(),
    };
    let pre = precondition(&replay.headers)?;
    if pre.if_none_match.is_some() {
        return Err(ApiError::BadRequest("a restore honours If-Match only".into()));
    }

    // Reading the history is the costly part: do it only at the owner.
    if let Some(forwarded) = state.routing.forward_unless_owned(&target, &replay).await? {
        return Ok(forwarded.into_response());
    }
    let current = objects::object_info(&state.db, &source)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("object {source} was never written")))?;
    let catalog = state.exporter.catalog();
    let past = history::past_state(&state.db, catalog, &source, point, current.version, not_before_micros)
        .await
        .map_err(|err| match err {
            PastError::NoSuchPoint(detail) => ApiError::NotFound(detail),
            PastError::BeyondRetention(detail) => ApiError::BeyondRetention(detail),
            PastError::Incomplete(detail) => ApiError::HistoryIncomplete(detail),
            PastError::TooLarge(detail) => ApiError::PayloadTooLarge(detail),
            PastError::Read(err) => history_error(&source, err),
        })?;
    // Bytes of blobs replaced or deleted within the retention are kept; a
    // blob whose bytes are gone anyway (swept by an older server) is refused
    // here rather than restored as a row without bytes.
    for blob in &past.blobs {
        if let Err(err) = state.storage.head(&stored_path(&blob.storage_key)?).await {
            return Err(match err {
                crate::blobs::StorageError::NotFound(_) => ApiError::HistoryIncomplete(format!(
                    "the bytes of blob {:?} as of version {} are no longer stored",
                    blob.name, past.version
                )),
                other => ApiError::from(other),
            });
        }
    }

    let restore = Restore {
        keys: past.keys,
        blobs: past.blobs,
        source: RestoreSource { ns: source.ns.clone(), id: source.id.clone(), version: past.version },
        if_version: pre.if_match,
        require_empty: request.into.is_some() && !request.overwrite,
    };
    let committed =
        match state.routing.commit(&target, Mutation::Restore(Arc::new(restore)), replay).await.map_err(|err| {
            match ApiError::from(err) {
                ApiError::PreconditionFailed { .. } => ApiError::PreconditionFailed {
                    detail: "If-Match does not hold for the object's current version".into(),
                    op_index: None,
                },
                other => other,
            }
        })? {
            Routed::Forwarded(forwarded) => return Ok(forwarded.into_response()),
            Routed::Local(committed) => committed,
        };
    let (keys, blobs) = match committed.results.first() {
        Some(OpResult::Restore { keys, blobs }) => (*keys, *blobs),
        _ => (0, 0),
    };
    let body = RestoreBody {
        ns: target.ns,
        id: target.id,
        version: committed.version,
        restored_from: RestoredFrom {
            id: source.id,
            version: past.version,
            committed_at: rfc3339_ms(past.committed_micros / 1000),
        },
        keys,
        blobs,
    };
    Ok(written(&committed, StatusCode::OK, body))
}
