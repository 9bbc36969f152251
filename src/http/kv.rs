//! Keys of one object: put, get, delete, list, and atomic batches.

use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use bytes::Bytes;
use serde::{Deserialize, Deserializer, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::error::{ApiError, Problem};
use super::extract::{
    check_content_type, etag, header_condition, list_limit, precondition, read_condition, stored_content_type,
    ApiQuery, KeyPath, ObjectPath,
};
use super::{written, SharedState};
use crate::objects::{
    self, decode_cursor, embed_value, encode_cursor, is_json_content_type, validate_alarm_name, validate_key, Entry,
    KeyRange, Mutation, Op, OpResult, Precondition, VersionMatch, MAX_BATCH_OPS,
};
use crate::routing::{Replay, Routed};

#[derive(Serialize, ToSchema)]
pub struct VersionBody {
    /// The object's version after the write.
    version: i64,
}

#[derive(Serialize, ToSchema)]
pub struct DeletedBody {
    pub deleted: bool,
    /// The object's version after the delete (unchanged when nothing was deleted).
    pub version: i64,
}

/// Store a value under a key.
#[utoipa::path(put, path = "/v1/objects/{ns}/{id}/kv/{key}", tag = "kv",
    params(("ns" = String, Path), ("id" = String, Path), ("key" = String, Path, description = "percent-encoded UTF-8, up to 2048 bytes"),
           ("If-Match" = Option<String>, Header), ("If-None-Match" = Option<String>, Header)),
    request_body(content = Vec<u8>, content_type = "application/octet-stream", description = "the raw value; its Content-Type is kept"),
    responses((status = 200, body = VersionBody), (status = 400, body = Problem), (status = 412, body = Problem),
              (status = 413, body = Problem), (status = 503, body = Problem)))]
pub async fn put_key(
    State(state): State<SharedState>,
    KeyPath(object, key): KeyPath,
    replay: Replay,
) -> Result<Response, ApiError> {
    let content_type = stored_content_type(&replay.headers)?;
    let pre = precondition(&replay.headers)?;
    let put = Op::Put { key, value: replay.body.clone(), content_type, pre };
    let committed =
        match state.routing.commit(&object, Mutation::ops(vec![put]), replay).await.map_err(header_condition)? {
            Routed::Forwarded(forwarded) => return Ok(forwarded.into_response()),
            Routed::Local(committed) => committed,
        };
    let mut response = written(&committed, StatusCode::OK, VersionBody { version: committed.version });
    response.headers_mut().insert(header::ETAG, etag(committed.version));
    Ok(response)
}

/// Read a key's value.
#[utoipa::path(get, path = "/v1/objects/{ns}/{id}/kv/{key}", tag = "kv",
    params(("ns" = String, Path), ("id" = String, Path), ("key" = String, Path),
           ("If-None-Match" = Option<String>, Header), ("If-Match" = Option<String>, Header)),
    responses((status = 200, description = "the raw value, with its Content-Type and ETag", content_type = "application/octet-stream", body = Vec<u8>),
              (status = 304, description = "not modified"), (status = 400, body = Problem), (status = 404, body = Problem), (status = 412, body = Problem)))]
pub async fn get_key(
    State(state): State<SharedState>,
    KeyPath(object, key): KeyPath,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let pre = precondition(&headers)?;
    let guard = &state.guard;
    let entry =
        objects::get_entry_at_owner(&state.db, guard.resident(), &object, &key, |fence| guard.readable(&object, fence))
            .await?
            .ok_or_else(|| ApiError::NotFound(format!("no key {key:?} in object {object}")))?;
    if let Some(not_modified) = read_condition(pre, entry.version)? {
        return Ok(not_modified);
    }
    let content_type = HeaderValue::from_str(&entry.content_type)
        .unwrap_or_else(|_| HeaderValue::from_static(super::extract::DEFAULT_CONTENT_TYPE));
    Ok((StatusCode::OK, [(header::CONTENT_TYPE, content_type), (header::ETAG, etag(entry.version))], entry.value)
        .into_response())
}

/// Delete a key.
#[utoipa::path(delete, path = "/v1/objects/{ns}/{id}/kv/{key}", tag = "kv",
    params(("ns" = String, Path), ("id" = String, Path), ("key" = String, Path), ("If-Match" = Option<String>, Header)),
    responses((status = 200, body = DeletedBody), (status = 400, body = Problem), (status = 412, body = Problem), (status = 503, body = Problem)))]
pub async fn delete_key(
    State(state): State<SharedState>,
    KeyPath(object, key): KeyPath,
    replay: Replay,
) -> Result<Response, ApiError> {
    let pre = precondition(&replay.headers)?;
    let delete = Op::Delete { key, pre };
    let committed =
        match state.routing.commit(&object, Mutation::ops(vec![delete]), replay).await.map_err(header_condition)? {
            Routed::Forwarded(forwarded) => return Ok(forwarded.into_response()),
            Routed::Local(committed) => committed,
        };
    let deleted = matches!(committed.results.first(), Some(OpResult::Delete { deleted: true, .. }));
    Ok(written(&committed, StatusCode::OK, DeletedBody { deleted, version: committed.version }))
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListKeysQuery {
    /// Only keys starting with this.
    prefix: Option<String>,
    /// First key (inclusive).
    start: Option<String>,
    /// Last key (exclusive).
    end: Option<String>,
    /// 1-10000, default 1000.
    limit: Option<usize>,
    /// Descending key order.
    reverse: Option<bool>,
    /// From a previous page's `cursor`.
    cursor: Option<String>,
    /// `false` lists keys without their values.
    values: Option<bool>,
}

#[derive(Serialize, ToSchema)]
pub struct ListedKey {
    key: String,
    version: i64,
    content_type: String,
    /// JSON when the content type is JSON, a string for UTF-8 text, else base64.
    #[serde(skip_serializing_if = "Option::is_none")]
    value: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    encoding: Option<&'static str>,
}

#[derive(Serialize, ToSchema)]
pub struct ListKeysBody {
    items: Vec<ListedKey>,
    /// Pass as `cursor` for the next page; null on the last page.
    cursor: Option<String>,
}

/// List keys in byte order.
#[utoipa::path(get, path = "/v1/objects/{ns}/{id}/kv", tag = "kv",
    params(("ns" = String, Path), ("id" = String, Path), ListKeysQuery),
    responses((status = 200, body = ListKeysBody), (status = 400, body = Problem)))]
pub async fn list_keys(
    State(state): State<SharedState>,
    ObjectPath(object): ObjectPath,
    ApiQuery(query): ApiQuery<ListKeysQuery>,
) -> Result<Response, ApiError> {
    let limit = list_limit(query.limit)?;
    let reverse = query.reverse.unwrap_or(false);
    let after = query.cursor.as_deref().map(|c| decode_cursor(c, reverse)).transpose().map_err(ApiError::BadRequest)?;
    for bound in [&query.prefix, &query.start, &query.end].into_iter().flatten() {
        if bound.len() > objects::MAX_KEY_BYTES {
            return Err(ApiError::BadRequest(format!(
                "range bounds are keys: at most {} bytes",
                objects::MAX_KEY_BYTES
            )));
        }
    }
    let range = KeyRange {
        prefix: query.prefix,
        start: query.start,
        end: query.end,
        after,
        reverse,
        limit,
        with_values: query.values.unwrap_or(true),
    };
    let (entries, more) = objects::list_keys(&state.db, &object, &range).await?;
    let cursor = if more { entries.last().map(|e| encode_cursor(e.key.as_bytes(), reverse)) } else { None };
    let items = entries.into_iter().map(|e| listed(e, range.with_values)).collect();
    Ok(axum::Json(ListKeysBody { items, cursor }).into_response())
}

fn listed(entry: Entry, with_value: bool) -> ListedKey {
    let (value, encoding) = if with_value {
        let embedded = embed_value(&entry.value, &entry.content_type);
        (Some(embedded.value), embedded.encoding)
    } else {
        (None, None)
    };
    ListedKey { key: entry.key, version: entry.version, content_type: entry.content_type, value, encoding }
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BatchRequest {
    /// 0-128 operations, applied in order, all or nothing (with the events, at least one of either).
    #[serde(default)]
    ops: Vec<BatchOp>,
    /// Up to 1000 application events, recorded atomically with the ops.
    #[serde(default)]
    events: Vec<super::events::EventIn>,
}

#[derive(Deserialize, ToSchema)]
#[serde(tag = "op", rename_all = "lowercase", deny_unknown_fields)]
pub enum BatchOp {
    Put {
        key: String,
        /// Any JSON value (stored as JSON, or as the raw string when `content_type` is not JSON).
        #[serde(default, deserialize_with = "present")]
        value: Option<serde_json::Value>,
        /// The value's bytes, base64 (instead of `value`).
        value_base64: Option<String>,
        content_type: Option<String>,
        /// Apply only if the key's current version is this.
        if_version: Option<i64>,
        /// Apply only if the key does not exist.
        #[serde(default)]
        if_absent: bool,
    },
    Delete {
        key: String,
        if_version: Option<i64>,
    },
    Get {
        key: String,
    },
    /// Set (or replace) an alarm, as `PUT .../alarms/{name}` does.
    #[serde(rename = "set_alarm")]
    SetAlarm {
        name: String,
        /// RFC 3339 time to fire at (exactly one of `at` and `in_ms`).
        at: Option<String>,
        in_ms: Option<i64>,
        every_ms: Option<i64>,
        payload: Option<serde_json::Value>,
        /// Apply only if the alarm's current version is this.
        if_version: Option<i64>,
        /// Apply only if there is no such alarm.
        #[serde(default)]
        if_absent: bool,
    },
    #[serde(rename = "delete_alarm")]
    DeleteAlarm {
        name: String,
        if_version: Option<i64>,
    },
}

/// Keeps an explicit `null` as `Some(Null)`, apart from a missing field.
fn present<'de, D: Deserializer<'de>>(d: D) -> Result<Option<serde_json::Value>, D::Error> {
    serde_json::Value::deserialize(d).map(Some)
}

#[derive(Serialize, ToSchema)]
pub struct BatchBody {
    /// The object's version after the batch (bumped once if anything changed).
    version: i64,
    /// What each op did, in op order.
    results: Vec<BatchResult>,
    /// The ids given to the batch's events, in order.
    event_ids: Vec<String>,
}

/// What one op of a batch did.
#[derive(Serialize, ToSchema)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum BatchResult {
    Put {
        key: String,
        /// The key's version now: the object's version after the batch.
        version: i64,
    },
    Delete {
        key: String,
        /// Whether the key existed.
        deleted: bool,
    },
    SetAlarm {
        name: String,
        /// The alarm's version now: the object's version after the batch.
        version: i64,
    },
    DeleteAlarm {
        name: String,
        /// Whether the alarm existed.
        deleted: bool,
    },
    Get {
        key: String,
        found: bool,
        #[serde(skip_serializing_if = "Option::is_none")]
        version: Option<i64>,
        #[serde(skip_serializing_if = "Option::is_none")]
        content_type: Option<String>,
        /// JSON when the content type is JSON, a string for UTF-8 text, else base64.
        #[serde(skip_serializing_if = "Option::is_none")]
        value: Option<serde_json::Value>,
        /// `base64` when `value` is the bytes in base64.
        #[serde(skip_serializing_if = "Option::is_none")]
        #[schema(value_type = Option<String>)]
        encoding: Option<&'static str>,
    },
}

/// Apply several operations atomically.
#[utoipa::path(post, path = "/v1/objects/{ns}/{id}/batch", tag = "kv",
    params(("ns" = String, Path), ("id" = String, Path)),
    request_body = BatchRequest,
    responses((status = 200, body = BatchBody), (status = 400, body = Problem), (status = 412, body = Problem),
              (status = 413, body = Problem), (status = 422, body = Problem), (status = 503, body = Problem)))]
pub async fn batch(
    State(state): State<SharedState>,
    ObjectPath(object): ObjectPath,
    replay: Replay,
) -> Result<Response, ApiError> {
    let request: BatchRequest =
        serde_json::from_slice(&replay.body).map_err(|e| ApiError::BadRequest(format!("invalid batch JSON: {e}")))?;
    if request.ops.len() > MAX_BATCH_OPS || (request.ops.is_empty() && request.events.is_empty()) {
        return Err(ApiError::BadRequest(format!(
            "a batch holds 1 to {MAX_BATCH_OPS} ops (or only events), this one has {}",
            request.ops.len()
        )));
    }
    let max_value = state.settings.max_value_bytes as usize;
    let ops = request
        .ops
        .into_iter()
        .enumerate()
        .map(|(index, op)| batch_op(op, max_value).map_err(|e| at_op(index, e)))
        .collect::<Result<Vec<_>, _>>()?;
    if ops.iter().any(Op::is_alarm) {
        super::alarms::check_target(&state, &object.ns)?;
    }
    let events = super::events::accept(request.events)?;
    let event_ids: Vec<String> = events.iter().map(|e| e.event_id.to_string()).collect();
    let committed = match state.routing.commit(&object, Mutation::Ops { ops, events }, replay).await? {
        Routed::Forwarded(forwarded) => return Ok(forwarded.into_response()),
        Routed::Local(committed) => committed,
    };
    let results = committed.results.iter().map(batch_result).collect();
    Ok(written(&committed, StatusCode::OK, BatchBody { version: committed.version, results, event_ids }))
}

fn batch_op(op: BatchOp, max_value: usize) -> Result<Op, ApiError> {
    match op {
        BatchOp::Put { key, value, value_base64, content_type, if_version, if_absent } => {
            validate_key(&key)?;
            if let Some(ct) = &content_type {
                check_content_type(ct)?;
            }
            let (value, content_type) = match (value, value_base64) {
                (Some(value), None) => {
                    let content_type = content_type.unwrap_or_else(|| "application/json".into());
                    let bytes = match value {
                        serde_json::Value::String(text) if !is_json_content_type(&content_type) => text.into_bytes(),
                        other => serde_json::to_vec(&other).expect("a JSON value serialises"),
                    };
                    (Bytes::from(bytes), content_type)
                }
                (None, Some(encoded)) => {
                    let bytes = base64::engine::general_purpose::STANDARD
                        .decode(encoded.trim())
                        .map_err(|e| ApiError::BadRequest(format!("value_base64 is not base64: {e}")))?;
                    (Bytes::from(bytes), content_type.unwrap_or_else(|| super::extract::DEFAULT_CONTENT_TYPE.into()))
                }
                _ => return Err(ApiError::BadRequest("a put needs exactly one of `value` and `value_base64`".into())),
            };
            if value.len() > max_value {
                return Err(ApiError::PayloadTooLarge(format!(
                    "the value is {} bytes, at most {max_value} allowed",
                    value.len()
                )));
            }
            if if_absent && if_version.is_some() {
                return Err(ApiError::BadRequest("`if_version` and `if_absent` cannot both hold".into()));
            }
            let pre = Precondition {
                if_match: expected_version(if_version)?,
                if_none_match: if_absent.then_some(VersionMatch::Any),
            };
            Ok(Op::Put { key, value, content_type, pre })
        }
        BatchOp::Delete { key, if_version } => {
            validate_key(&key)?;
            Ok(Op::Delete { key, pre: Precondition { if_match: expected_version(if_version)?, if_none_match: None } })
        }
        BatchOp::Get { key } => {
            validate_key(&key)?;
            Ok(Op::Get { key })
        }
        BatchOp::SetAlarm { name, at, in_ms, every_ms, payload, if_version, if_absent } => {
            validate_alarm_name(&name)?;
            let alarm = super::alarms::alarm_spec(at, in_ms, every_ms, payload)?;
            if if_absent && if_version.is_some() {
                return Err(ApiError::BadRequest("`if_version` and `if_absent` cannot both hold".into()));
            }
            let pre = Precondition {
                if_match: expected_version(if_version)?,
                if_none_match: if_absent.then_some(VersionMatch::Any),
            };
            Ok(Op::SetAlarm { name, alarm, pre })
        }
        BatchOp::DeleteAlarm { name, if_version } => {
            validate_alarm_name(&name)?;
            Ok(Op::DeleteAlarm {
                name,
                pre: Precondition { if_match: expected_version(if_version)?, if_none_match: None },
            })
        }
    }
}

fn expected_version(if_version: Option<i64>) -> Result<Option<VersionMatch>, ApiError> {
    match if_version {
        None => Ok(None),
        Some(v) if v >= 1 => Ok(Some(VersionMatch::OneOf(vec![v]))),
        Some(v) => {
            Err(ApiError::BadRequest(format!("if_version must be 1 or more (use if_absent for a new key), got {v}")))
        }
    }
}

fn at_op(index: usize, err: ApiError) -> ApiError {
    match err {
        ApiError::BadRequest(detail) => ApiError::BadRequest(format!("op {index}: {detail}")),
        ApiError::PayloadTooLarge(detail) => ApiError::PayloadTooLarge(format!("op {index}: {detail}")),
        other => other,
    }
}

fn batch_result(result: &OpResult) -> BatchResult {
    match result {
        OpResult::Put { key, version } => BatchResult::Put { key: key.clone(), version: *version },
        OpResult::Delete { key, deleted } => BatchResult::Delete { key: key.clone(), deleted: *deleted },
        OpResult::Get { key, entry: None } => BatchResult::Get {
            key: key.clone(),
            found: false,
            version: None,
            content_type: None,
            value: None,
            encoding: None,
        },
        OpResult::Get { key, entry: Some(entry) } => {
            let embedded = embed_value(&entry.value, &entry.content_type);
            BatchResult::Get {
                key: key.clone(),
                found: true,
                version: Some(entry.version),
                content_type: Some(entry.content_type.clone()),
                value: Some(embedded.value),
                encoding: embedded.encoding,
            }
        }
        OpResult::SetAlarm { name, version } => BatchResult::SetAlarm { name: name.clone(), version: *version },
        OpResult::DeleteAlarm { name, deleted } => BatchResult::DeleteAlarm { name: name.clone(), deleted: *deleted },
        OpResult::DeleteAll { .. }
        | OpResult::PutBlob { .. }
        | OpResult::DeleteBlob { .. }
        | OpResult::Restore { .. } => {
            unreachable!("a batch holds only key operations")
        }
    }
}
