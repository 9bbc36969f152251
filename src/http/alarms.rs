//! Alarms of one object (set, get, delete, list) and, for operators, the
//! pending alarms of every object by due time.

use axum::extract::{FromRequestParts, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::error::{ApiError, Problem};
use super::extract::{etag, list_limit, precondition, read_condition, ApiQuery, ObjectPath};
use super::{written, SharedState};
use crate::clock::{now_ms, rfc3339_ms};
use crate::model::{
    validate_alarm_name, Alarm, AlarmSpec, Mutation, ObjectRef, Op, OpResult, MAX_ALARM_PAYLOAD_BYTES,
    MIN_ALARM_EVERY_MS,
};
use crate::objects::{self, decode_cursor, encode_cursor, DueCursor};
use crate::routing::{CommitError, Replay, Routed};

/// The latest time an alarm may be set for, and its longest period: ten years.
const MAX_AHEAD_MS: i64 = 10 * 366 * 24 * 3600 * 1000;

/// `/v1/objects/{ns}/{id}/alarms/{name}`: the name arrives percent-decoded.
pub struct AlarmPath(pub ObjectRef, pub String);

impl<S: Send + Sync> FromRequestParts<S> for AlarmPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let (object, name) = super::extract::object_and_name(parts, state, validate_alarm_name).await?;
        Ok(AlarmPath(object, name))
    }
}

/// When an alarm fires: exactly one of `at` and `in_ms`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AlarmRequest {
    /// RFC 3339 time to fire at (a time already past fires at once).
    at: Option<String>,
    /// Milliseconds from now to fire in.
    in_ms: Option<i64>,
    /// Repeat every this many milliseconds (at least 1000), counted from the scheduled time, without drift.
    every_ms: Option<i64>,
    /// Any JSON (up to 4096 bytes serialised), delivered with the alarm.
    payload: Option<serde_json::Value>,
}

/// Turns a client's `at`/`in_ms`/`every_ms`/`payload` into an arming.
pub(super) fn alarm_spec(
    at: Option<String>,
    in_ms: Option<i64>,
    every_ms: Option<i64>,
    payload: Option<serde_json::Value>,
) -> Result<AlarmSpec, ApiError> {
    let now = now_ms();
    let at_ms = match (at, in_ms) {
        (Some(at), None) => {
            let parsed = chrono::DateTime::parse_from_rfc3339(at.trim())
                .map_err(|e| ApiError::BadRequest(format!("`at` is not an RFC 3339 time ({e}): {at:?}")))?;
            let ms = parsed.timestamp_millis();
            if !(0..=now + MAX_AHEAD_MS).contains(&ms) {
                return Err(ApiError::BadRequest("`at` must be after 1970 and at most ten years ahead".into()));
            }
            ms
        }
        (None, Some(in_ms)) => {
            if !(0..=MAX_AHEAD_MS).contains(&in_ms) {
                return Err(ApiError::BadRequest(format!(
                    "`in_ms` must be between 0 and {MAX_AHEAD_MS} (ten years), got {in_ms}"
                )));
            }
            now + in_ms
        }
        _ => return Err(ApiError::BadRequest("an alarm needs exactly one of `at` and `in_ms`".into())),
    };
    if let Some(every) = every_ms {
        if !(MIN_ALARM_EVERY_MS..=MAX_AHEAD_MS).contains(&every) {
            return Err(ApiError::BadRequest(format!(
                "`every_ms` must be between {MIN_ALARM_EVERY_MS} and {MAX_AHEAD_MS}, got {every}"
            )));
        }
    }
    let payload = match payload {
        None | Some(serde_json::Value::Null) => None,
        Some(value) => {
            let text = value.to_string();
            if text.len() > MAX_ALARM_PAYLOAD_BYTES {
                return Err(ApiError::PayloadTooLarge(format!(
                    "an alarm's payload is {} bytes serialised, at most {MAX_ALARM_PAYLOAD_BYTES} allowed",
                    text.len()
                )));
            }
            Some(text)
        }
    };
    Ok(AlarmSpec::armed(at_ms, every_ms, payload))
}

/// Refuses an alarm that could not be delivered: its namespace has no target.
pub(super) fn check_target(state: &SharedState, ns: &str) -> Result<(), ApiError> {
    state.alarms.check_target(ns).map_err(ApiError::NoAlarmTarget)
}

#[derive(Serialize, ToSchema)]
pub struct AlarmBody {
    name: String,
    /// RFC 3339: the time it is set for.
    scheduled_at: String,
    /// RFC 3339: when it is delivered next (later than `scheduled_at` while retrying).
    due_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    every_ms: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    payload: Option<serde_json::Value>,
    /// Deliveries already attempted for this scheduled time.
    attempt: i64,
    /// The object version at which this arming was set (sent to receivers as `alarm_version`).
    alarm_version: i64,
    /// The object version at which the alarm was last written (its ETag).
    version: i64,
}

fn alarm_body(alarm: Alarm) -> AlarmBody {
    AlarmBody {
        name: alarm.name,
        scheduled_at: rfc3339_ms(alarm.spec.scheduled_at_ms),
        due_at: rfc3339_ms(alarm.spec.due_at_ms),
        every_ms: alarm.spec.every_ms,
        payload: alarm.spec.payload.as_deref().and_then(|p| serde_json::from_str(p).ok()),
        attempt: alarm.spec.attempt,
        alarm_version: alarm.armed_version,
        version: alarm.version,
    }
}

/// On single-alarm routes the condition came from a header.
fn alarm_condition(err: CommitError) -> ApiError {
    match ApiError::from(err) {
        ApiError::PreconditionFailed { .. } => ApiError::PreconditionFailed {
            detail: "If-Match / If-None-Match does not hold for the alarm's current version".into(),
            op_index: None,
        },
        other => other,
    }
}

/// Set (or replace) an alarm of an object.
#[utoipa::path(put, path = "/v1/objects/{ns}/{id}/alarms/{name}", tag = "alarms",
    params(("ns" = String, Path), ("id" = String, Path),
           ("name" = String, Path, description = "percent-encoded UTF-8, up to 128 bytes; `alarm` is the Durable-Object-style single alarm"),
           ("If-Match" = Option<String>, Header), ("If-None-Match" = Option<String>, Header)),
    request_body = AlarmRequest,
    responses((status = 200, body = AlarmBody), (status = 400, body = Problem), (status = 412, body = Problem),
              (status = 413, body = Problem), (status = 422, body = Problem), (status = 503, body = Problem)))]
pub async fn put_alarm(
    State(state): State<SharedState>,
    AlarmPath(object, name): AlarmPath,
    replay: Replay,
) -> Result<Response, ApiError> {
    let pre = precondition(&replay.headers)?;
    let request: AlarmRequest =
        serde_json::from_slice(&replay.body).map_err(|e| ApiError::BadRequest(format!("invalid alarm JSON: {e}")))?;
    let spec = alarm_spec(request.at, request.in_ms, request.every_ms, request.payload)?;
    check_target(&state, &object.ns)?;
    let set = Op::SetAlarm { name: name.clone(), alarm: spec.clone(), pre };
    let committed =
        match state.routing.commit(&object, Mutation::ops(vec![set]), replay).await.map_err(alarm_condition)? {
            Routed::Forwarded(forwarded) => return Ok(forwarded.into_response()),
            Routed::Local(committed) => committed,
        };
    let version = committed.version;
    let body = alarm_body(Alarm { name, spec, armed_version: version, version });
    let mut response = written(&committed, StatusCode::OK, body);
    response.headers_mut().insert(header::ETAG, etag(version));
    Ok(response)
}

/// Read an alarm.
#[utoipa::path(get, path = "/v1/objects/{ns}/{id}/alarms/{name}", tag = "alarms",
    params(("ns" = String, Path), ("id" = String, Path), ("name" = String, Path),
           ("If-None-Match" = Option<String>, Header), ("If-Match" = Option<String>, Header)),
    responses((status = 200, body = AlarmBody), (status = 304, description = "not modified"),
              (status = 400, body = Problem), (status = 404, body = Problem), (status = 412, body = Problem)))]
pub async fn get_alarm(
    State(state): State<SharedState>,
    AlarmPath(object, name): AlarmPath,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let pre = precondition(&headers)?;
    let alarm = objects::get_alarm(&state.db, &object, &name)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no alarm {name:?} in object {object}")))?;
    if let Some(not_modified) = read_condition(pre, alarm.version)? {
        return Ok(not_modified);
    }
    let version = alarm.version;
    Ok(([(header::ETAG, etag(version))], axum::Json(alarm_body(alarm))).into_response())
}

#[derive(Serialize, ToSchema)]
pub struct AlarmDeletedBody {
    deleted: bool,
    /// The object's version after the delete (unchanged when there was no such alarm).
    version: i64,
}

/// Delete an alarm.
#[utoipa::path(delete, path = "/v1/objects/{ns}/{id}/alarms/{name}", tag = "alarms",
    params(("ns" = String, Path), ("id" = String, Path), ("name" = String, Path), ("If-Match" = Option<String>, Header)),
    responses((status = 200, body = AlarmDeletedBody), (status = 400, body = Problem), (status = 412, body = Problem),
              (status = 503, body = Problem)))]
pub async fn delete_alarm(
    State(state): State<SharedState>,
    AlarmPath(object, name): AlarmPath,
    replay: Replay,
) -> Result<Response, ApiError> {
    let pre = precondition(&replay.headers)?;
    let delete = Op::DeleteAlarm { name, pre };
    let committed =
        match state.routing.commit(&object, Mutation::ops(vec![delete]), replay).await.map_err(alarm_condition)? {
            Routed::Forwarded(forwarded) => return Ok(forwarded.into_response()),
            Routed::Local(committed) => committed,
        };
    let deleted = matches!(committed.results.first(), Some(OpResult::DeleteAlarm { deleted: true, .. }));
    Ok(written(&committed, StatusCode::OK, AlarmDeletedBody { deleted, version: committed.version }))
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListAlarmsQuery {
    /// 1-10000, default 1000.
    limit: Option<usize>,
    /// From a previous page's `cursor`.
    cursor: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct ListAlarmsBody {
    /// By name.
    items: Vec<AlarmBody>,
    /// Pass as `cursor` for the next page; null on the last page.
    cursor: Option<String>,
}

/// List an object's alarms, by name.
#[utoipa::path(get, path = "/v1/objects/{ns}/{id}/alarms", tag = "alarms",
    params(("ns" = String, Path), ("id" = String, Path), ListAlarmsQuery),
    responses((status = 200, body = ListAlarmsBody), (status = 400, body = Problem)))]
pub async fn list_alarms(
    State(state): State<SharedState>,
    ObjectPath(object): ObjectPath,
    ApiQuery(query): ApiQuery<ListAlarmsQuery>,
) -> Result<Response, ApiError> {
    let limit = list_limit(query.limit)?;
    let after = match query.cursor.as_deref() {
        None => None,
        Some(cursor) => Some(
            decode_cursor(cursor, false)
                .ok()
                .and_then(|bytes| String::from_utf8(bytes).ok())
                .ok_or_else(|| ApiError::BadRequest("invalid cursor: not one this server issued".into()))?,
        ),
    };
    let (alarms, more) = objects::list_alarms(&state.db, &object, after.as_deref(), limit).await?;
    let cursor = if more { alarms.last().map(|a| encode_cursor(a.name.as_bytes(), false)) } else { None };
    Ok(axum::Json(ListAlarmsBody { items: alarms.into_iter().map(alarm_body).collect(), cursor }).into_response())
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PendingAlarmsQuery {
    /// RFC 3339: only alarms due before this (default: every alarm).
    due_before: Option<String>,
    /// 1-10000, default 1000.
    limit: Option<usize>,
    /// From a previous page's `cursor`.
    cursor: Option<String>,
}

/// An alarm with its object.
#[derive(Serialize, ToSchema)]
pub struct PendingAlarm {
    ns: String,
    id: String,
    name: String,
    /// RFC 3339: the time it is set for.
    scheduled_at: String,
    /// RFC 3339: when it is delivered next.
    due_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    every_ms: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    payload: Option<serde_json::Value>,
    attempt: i64,
    alarm_version: i64,
    version: i64,
}

#[derive(Serialize, ToSchema)]
pub struct PendingAlarmsBody {
    /// By due time.
    items: Vec<PendingAlarm>,
    /// Pass as `cursor` for the next page; null on the last page.
    cursor: Option<String>,
}

/// Pending alarms of every object, by due time (for operators).
#[utoipa::path(get, path = "/v1/alarms", tag = "alarms",
    params(PendingAlarmsQuery),
    responses((status = 200, body = PendingAlarmsBody), (status = 400, body = Problem)))]
pub async fn pending_alarms(
    State(state): State<SharedState>,
    ApiQuery(query): ApiQuery<PendingAlarmsQuery>,
) -> Result<Response, ApiError> {
    let limit = list_limit(query.limit)?;
    let before = match query.due_before.as_deref() {
        None => i64::MAX,
        Some(text) => chrono::DateTime::parse_from_rfc3339(text.trim())
            .map_err(|e| ApiError::BadRequest(format!("`due_before` is not an RFC 3339 time ({e}): {text:?}")))?
            .timestamp_millis(),
    };
    let after = query.cursor.as_deref().map(pending_cursor).transpose()?;
    let (due, more) = objects::due_alarms(&state.db, before, after.as_ref(), limit).await?;
    let cursor = if more {
        due.last().map(|last| {
            let key = serde_json::json!([last.alarm.spec.due_at_ms, last.object.ns, last.object.id, last.alarm.name]);
            encode_cursor(key.to_string().as_bytes(), false)
        })
    } else {
        None
    };
    let items = due
        .into_iter()
        .map(|due| {
            let alarm = alarm_body(due.alarm);
            PendingAlarm {
                ns: due.object.ns,
                id: due.object.id,
                name: alarm.name,
                scheduled_at: alarm.scheduled_at,
                due_at: alarm.due_at,
                every_ms: alarm.every_ms,
                payload: alarm.payload,
                attempt: alarm.attempt,
                alarm_version: alarm.alarm_version,
                version: alarm.version,
            }
        })
        .collect();
    Ok(axum::Json(PendingAlarmsBody { items, cursor }).into_response())
}

fn pending_cursor(cursor: &str) -> Result<DueCursor, ApiError> {
    decode_cursor(cursor, false)
        .ok()
        .and_then(|bytes| serde_json::from_slice::<DueCursor>(&bytes).ok())
        .ok_or_else(|| ApiError::BadRequest("invalid cursor: not one this server issued".into()))
}
