//! Blobs of one object: streamed uploads, ranged downloads, listing,
//! presigned URLs. The bytes go to the object store under a key unique to the
//! upload; the metadata becomes visible only through a fenced commit.

use std::collections::BTreeMap;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{FromRequestParts, Path, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use futures::TryStreamExt;
use object_store::GetRange;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::error::{ApiError, Problem};
use super::extract::{
    etag, header_condition, list_limit, precondition, read_condition, stored_content_type, ApiQuery, ObjectPath,
};
use super::kv::DeletedBody;
use super::{written, SharedState, FORWARDED_BY};
use crate::blobs::{
    new_storage_key, object_prefix, stored_path, upload, upload_prefix, validate_name, BlobMeta, UploadError,
};
use crate::objects::{decode_cursor, encode_cursor, Committed, Mutation, ObjectRef, OpResult};
use crate::routing::{CommitError, Replay, Routed};

const USER_META_PREFIX: &str = "x-statehouse-meta-";
const SHA256_HEADER: HeaderName = HeaderName::from_static("x-statehouse-sha256");
const MAX_PRESIGN_SECONDS: u64 = 7 * 24 * 3600;

/// `/v1/objects/{ns}/{id}/blobs/{name}`: the name arrives percent-decoded.
pub struct BlobPath(pub ObjectRef, pub String);

impl<S: Send + Sync> FromRequestParts<S> for BlobPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let (object, name) = super::extract::object_and_name(parts, state, validate_name).await?;
        Ok(BlobPath(object, name))
    }
}

#[derive(Serialize, ToSchema)]
pub struct BlobWritten {
    name: String,
    size: u64,
    /// Lowercase hex SHA-256 of the bytes.
    sha256: String,
    /// The ETag (quoted version).
    etag: String,
    /// The object's version after the write.
    version: i64,
}

fn blob_written(committed: &Committed, blob: &BlobMeta) -> Response {
    let body = BlobWritten {
        name: blob.name.clone(),
        size: blob.size,
        sha256: blob.sha256.clone(),
        etag: format!("\"{}\"", committed.version),
        version: committed.version,
    };
    let mut response = written(committed, StatusCode::OK, body);
    response.headers_mut().insert(header::ETAG, etag(committed.version));
    response
}

/// Upload a blob (streamed; multipart above 8 MiB).
#[utoipa::path(put, path = "/v1/objects/{ns}/{id}/blobs/{name}", tag = "blobs",
    params(("ns" = String, Path), ("id" = String, Path), ("name" = String, Path, description = "a relative path, up to 1024 bytes"),
           ("If-Match" = Option<String>, Header), ("If-None-Match" = Option<String>, Header)),
    request_body(content = Vec<u8>, content_type = "application/octet-stream",
                 description = "the bytes; Content-Type, Cache-Control, Content-Disposition and x-statehouse-meta-* headers are kept"),
    responses((status = 200, body = BlobWritten), (status = 400, body = Problem), (status = 412, body = Problem),
              (status = 413, body = Problem), (status = 503, body = Problem)))]
pub async fn put_blob(
    State(state): State<SharedState>,
    BlobPath(object, name): BlobPath,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let pre = precondition(&headers)?;
    let content_type = stored_content_type(&headers)?;
    let cache_control = optional_header(&headers, header::CACHE_CONTROL)?;
    let content_disposition = optional_header(&headers, header::CONTENT_DISPOSITION)?;
    let user_meta = user_metadata(&headers)?;
    if let Some(length) = headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok()) {
        if length > state.settings.max_blob_bytes {
            return Err(too_large(state.settings.max_blob_bytes));
        }
    }
    // A condition that fails now would fail at commit too: refuse before streaming the body.
    let current = crate::blobs::meta::get(&state.db, &object, &name).await?;
    if !pre.holds(current.map(|b| b.version)) {
        return Err(header_condition(ApiError::PreconditionFailed { detail: String::new(), op_index: None }));
    }

    let key = new_storage_key(&object, &name);
    let stream = body.into_data_stream();
    let uploaded = match state.storage.put_stream(&key, stream, state.settings.max_blob_bytes).await {
        Ok(uploaded) => uploaded,
        Err(UploadError::TooLarge { limit }) => return Err(too_large(limit)),
        Err(UploadError::Body(e)) => {
            return Err(ApiError::BadRequest(format!("the request body could not be read: {e}")))
        }
        Err(UploadError::Store(e)) => return Err(e.into()),
    };
    let blob = BlobMeta {
        name,
        storage_key: key.to_string(),
        size: uploaded.size,
        sha256: uploaded.sha256,
        content_type,
        cache_control,
        content_disposition,
        user_meta,
        version: 0,
    };
    // Only the commit needs the owner: a peer receives the metadata, not the bytes.
    let replay = Replay {
        method: Method::POST,
        uri: internal_commit_uri(&object),
        headers: commit_headers(&headers),
        body: serde_json::to_vec(&blob).expect("blob metadata serialises").into(),
        forwarded_by: headers.get(FORWARDED_BY).and_then(|v| v.to_str().ok()).map(str::to_string),
    };
    let outcome = state.routing.commit(&object, Mutation::PutBlob { blob: blob.clone(), pre }, replay).await;
    if certainly_not_committed(&outcome) {
        // Never visible: remove the bytes now. When the outcome is unknown
        // (a timeout, a lost answer) they stay, and the sweeper removes them
        // after the grace period only if no row refers to them.
        upload::discard(&state.storage, &key).await;
    }
    match outcome.map_err(header_condition)? {
        Routed::Local(committed) => Ok(blob_written(&committed, &blob)),
        Routed::Forwarded(forwarded) => Ok(forwarded.into_response()),
    }
}

/// Whether a commit attempt surely left no row behind: a refusal (condition,
/// fence, bad input) here or at the owner, or a request the owner never got.
fn certainly_not_committed(outcome: &Result<Routed, CommitError>) -> bool {
    match outcome {
        Ok(Routed::Local(_)) => false,
        Ok(Routed::Forwarded(forwarded)) => forwarded.certainly_not_applied(),
        Err(CommitError::Refused(_)) => true,
        // The database did not answer, or answered oddly: the commit may have landed.
        Err(CommitError::Store(_)) => false,
    }
}

fn internal_commit_uri(object: &ObjectRef) -> Uri {
    format!("/v1/internal/objects/{}/{}/blob-commit", object.ns, object.id).parse().expect("ns and id are URL-safe")
}

/// The headers a blob commit carries to the owner: its conditions and the request id.
fn commit_headers(headers: &HeaderMap) -> HeaderMap {
    let mut out = HeaderMap::new();
    for name in [header::IF_MATCH, header::IF_NONE_MATCH, header::AUTHORIZATION, super::REQUEST_ID] {
        for value in headers.get_all(&name) {
            out.append(name.clone(), value.clone());
        }
    }
    out.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    out
}

/// Peer-only: commits the metadata of a blob a peer already uploaded.
pub async fn commit_forwarded_blob(
    State(state): State<SharedState>,
    ObjectPath(object): ObjectPath,
    replay: Replay,
) -> Result<Response, ApiError> {
    if replay.forwarded_by.is_none() {
        return Err(ApiError::NotFound("no such route; see /openapi.json".into()));
    }
    let blob: BlobMeta =
        serde_json::from_slice(&replay.body).map_err(|e| ApiError::BadRequest(format!("invalid blob commit: {e}")))?;
    validate_name(&blob.name)?;
    if !blob.storage_key.starts_with(&object_prefix(&object)) {
        return Err(ApiError::BadRequest("the storage key does not belong to this object".into()));
    }
    let pre = precondition(&replay.headers)?;
    match state
        .routing
        .commit(&object, Mutation::PutBlob { blob: blob.clone(), pre }, replay)
        .await
        .map_err(header_condition)?
    {
        Routed::Local(committed) => Ok(blob_written(&committed, &blob)),
        Routed::Forwarded(forwarded) => Ok(forwarded.into_response()),
    }
}

/// Download a blob, or a byte range of it.
#[utoipa::path(get, path = "/v1/objects/{ns}/{id}/blobs/{name}", tag = "blobs",
    params(("ns" = String, Path), ("id" = String, Path), ("name" = String, Path),
           ("Range" = Option<String>, Header, description = "bytes=a-b, bytes=a- or bytes=-n"),
           ("If-None-Match" = Option<String>, Header), ("If-Match" = Option<String>, Header)),
    responses((status = 200, description = "the bytes", content_type = "application/octet-stream", body = Vec<u8>),
              (status = 206, description = "the requested range", content_type = "application/octet-stream", body = Vec<u8>),
              (status = 304, description = "not modified"), (status = 400, body = Problem), (status = 404, body = Problem),
              (status = 412, body = Problem), (status = 416, body = Problem)))]
pub async fn get_blob(
    State(state): State<SharedState>,
    BlobPath(object, name): BlobPath,
    method: Method,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let pre = precondition(&headers)?;
    let blob = crate::blobs::meta::get(&state.db, &object, &name)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no blob {name:?} in object {object}")))?;
    if let Some(not_modified) = read_condition(pre, blob.version)? {
        return Ok(not_modified);
    }
    let range = parse_range(headers.get(header::RANGE), blob.size)?;
    let (status, start, end) = match range {
        Some((start, end)) => (StatusCode::PARTIAL_CONTENT, start, end),
        None => (StatusCode::OK, 0, blob.size),
    };
    let mut response = if method == Method::HEAD || end == start {
        Response::new(Body::empty())
    } else {
        let key = stored_path(&blob.storage_key)?;
        let got = state.storage.get(&key, Some(GetRange::Bounded(start..end))).await?;
        let stream = got.into_stream().map_err(std::io::Error::other);
        Response::new(Body::from_stream(stream))
    };
    *response.status_mut() = status;
    let out = response.headers_mut();
    describe(out, &blob);
    out.insert(header::CONTENT_LENGTH, HeaderValue::from(end - start));
    out.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    if status == StatusCode::PARTIAL_CONTENT {
        let value = format!("bytes {start}-{}/{}", end - 1, blob.size);
        out.insert(header::CONTENT_RANGE, HeaderValue::from_str(&value).expect("digits"));
    }
    Ok(response)
}

/// The headers that describe a stored blob.
fn describe(out: &mut HeaderMap, blob: &BlobMeta) {
    let text = |v: &str| HeaderValue::from_str(v).ok();
    if let Some(v) = text(&blob.content_type) {
        out.insert(header::CONTENT_TYPE, v);
    }
    out.insert(header::ETAG, etag(blob.version));
    if let Some(v) = blob.cache_control.as_deref().and_then(text) {
        out.insert(header::CACHE_CONTROL, v);
    }
    if let Some(v) = blob.content_disposition.as_deref().and_then(text) {
        out.insert(header::CONTENT_DISPOSITION, v);
    }
    if let Some(v) = text(&blob.sha256) {
        out.insert(SHA256_HEADER, v);
    }
    for (k, v) in &blob.user_meta {
        if let (Ok(name), Some(value)) = (HeaderName::try_from(format!("{USER_META_PREFIX}{k}")), text(v)) {
            out.insert(name, value);
        }
    }
}

/// `Range: bytes=...` as a half-open byte range. A missing, malformed or
/// multi-range header means the whole blob (RFC 9110 lets a server ignore it);
/// a range that starts past the end is 416.
fn parse_range(value: Option<&HeaderValue>, size: u64) -> Result<Option<(u64, u64)>, ApiError> {
    let Some(spec) = value.and_then(|v| v.to_str().ok()).and_then(|v| v.trim().strip_prefix("bytes=")) else {
        return Ok(None);
    };
    if spec.contains(',') {
        return Ok(None);
    }
    let Some((first, last)) = spec.trim().split_once('-') else { return Ok(None) };
    let unsatisfiable = || ApiError::RangeNotSatisfiable {
        detail: format!("the range {spec:?} is outside the blob's {size} bytes"),
        size,
    };
    match (first.trim(), last.trim()) {
        ("", "") => Ok(None),
        ("", suffix) => {
            let Ok(n) = suffix.parse::<u64>() else { return Ok(None) };
            if n == 0 || size == 0 {
                return Err(unsatisfiable());
            }
            Ok(Some((size.saturating_sub(n), size)))
        }
        (start, end) => {
            let Ok(start) = start.parse::<u64>() else { return Ok(None) };
            let end = if end.is_empty() {
                size.saturating_sub(1)
            } else {
                match end.parse::<u64>() {
                    Ok(end) if end >= start => end.min(size.saturating_sub(1)),
                    _ => return Ok(None),
                }
            };
            if start >= size {
                return Err(unsatisfiable());
            }
            Ok(Some((start, end + 1)))
        }
    }
}

/// Delete a blob.
#[utoipa::path(delete, path = "/v1/objects/{ns}/{id}/blobs/{name}", tag = "blobs",
    params(("ns" = String, Path), ("id" = String, Path), ("name" = String, Path), ("If-Match" = Option<String>, Header)),
    responses((status = 200, body = DeletedBody), (status = 400, body = Problem), (status = 412, body = Problem), (status = 503, body = Problem)))]
pub async fn delete_blob(
    State(state): State<SharedState>,
    BlobPath(object, name): BlobPath,
    replay: Replay,
) -> Result<Response, ApiError> {
    let pre = precondition(&replay.headers)?;
    let committed = match state
        .routing
        .commit(&object, Mutation::DeleteBlob { name, pre }, replay)
        .await
        .map_err(header_condition)?
    {
        Routed::Forwarded(forwarded) => return Ok(forwarded.into_response()),
        Routed::Local(committed) => committed,
    };
    // The bytes stay for the history retention (a restore may bring the blob
    // back); the sweeper deletes them after it.
    let deleted = matches!(committed.results.first(), Some(OpResult::DeleteBlob { deleted: true, .. }));
    Ok(written(&committed, StatusCode::OK, DeletedBody { deleted, version: committed.version }))
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListBlobsQuery {
    /// Only names starting with this.
    prefix: Option<String>,
    /// 1-10000, default 1000.
    limit: Option<usize>,
    /// From a previous page's `cursor`.
    cursor: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct ListedBlob {
    name: String,
    size: u64,
    sha256: String,
    etag: String,
    version: i64,
    content_type: String,
    cache_control: Option<String>,
    content_disposition: Option<String>,
    /// The x-statehouse-meta-* headers given at upload (names without the prefix).
    metadata: BTreeMap<String, String>,
}

#[derive(Serialize, ToSchema)]
pub struct ListBlobsBody {
    items: Vec<ListedBlob>,
    cursor: Option<String>,
}

/// List an object's blobs by name.
#[utoipa::path(get, path = "/v1/objects/{ns}/{id}/blobs", tag = "blobs",
    params(("ns" = String, Path), ("id" = String, Path), ListBlobsQuery),
    responses((status = 200, body = ListBlobsBody), (status = 400, body = Problem)))]
pub async fn list_blobs(
    State(state): State<SharedState>,
    ObjectPath(object): ObjectPath,
    ApiQuery(query): ApiQuery<ListBlobsQuery>,
) -> Result<Response, ApiError> {
    let limit = list_limit(query.limit)?;
    let after = query.cursor.as_deref().map(|c| decode_cursor(c, false)).transpose().map_err(ApiError::BadRequest)?;
    if query.prefix.as_ref().is_some_and(|p| p.len() > crate::blobs::meta::MAX_NAME_BYTES) {
        return Err(ApiError::BadRequest("prefix is longer than any blob name".into()));
    }
    let (blobs, more) =
        crate::blobs::meta::list(&state.db, &object, query.prefix.as_deref(), after.as_deref(), limit).await?;
    let cursor = if more { blobs.last().map(|b| encode_cursor(b.name.as_bytes(), false)) } else { None };
    let items = blobs
        .into_iter()
        .map(|b| ListedBlob {
            etag: format!("\"{}\"", b.version),
            name: b.name,
            size: b.size,
            sha256: b.sha256,
            version: b.version,
            content_type: b.content_type,
            cache_control: b.cache_control,
            content_disposition: b.content_disposition,
            metadata: b.user_meta,
        })
        .collect();
    Ok(axum::Json(ListBlobsBody { items, cursor }).into_response())
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PresignRequest {
    /// `GET` to download the blob, `PUT` to upload new bytes for it.
    method: String,
    /// Seconds the URL stays valid: 1 to 604800 (7 days), default 900.
    expires_in: Option<u64>,
}

#[derive(Serialize, ToSchema)]
pub struct PresignBody {
    method: String,
    url: String,
    expires_in: u64,
    /// For PUT: after uploading to `url`, POST `{"upload_key": ...}` to `commit_url` to make the bytes the blob.
    #[serde(skip_serializing_if = "Option::is_none")]
    upload_key: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    commit_url: Option<String>,
}

/// A presigned URL for a blob: GET to download it, PUT to upload new bytes (then commit them).
// This handler takes every POST under a blob path: `.../presign` and `.../commit`.
#[utoipa::path(post, path = "/v1/objects/{ns}/{id}/blobs/{name}/presign", tag = "blobs",
    params(("ns" = String, Path), ("id" = String, Path), ("name" = String, Path)),
    request_body = PresignRequest,
    responses((status = 200, body = PresignBody), (status = 400, body = Problem), (status = 404, body = Problem),
              (status = 409, body = Problem, description = "the store is a local folder: no presigned URLs")))]
pub async fn post_blob_action(
    State(state): State<SharedState>,
    Path((ns, id, path)): Path<(String, String, String)>,
    replay: Replay,
) -> Result<Response, ApiError> {
    let object = ObjectRef::new(&ns, &id)?;
    if let Some(name) = path.strip_suffix("/presign") {
        validate_name(name)?;
        return presign(&state, &object, name, &replay.body).await;
    }
    if let Some(name) = path.strip_suffix("/commit") {
        validate_name(name)?;
        return commit_presigned_upload(&state, &object, name.to_string(), replay).await;
    }
    Err(ApiError::MethodNotAllowed("POST on a blob takes .../{name}/presign or .../{name}/commit".into()))
}

async fn presign(state: &SharedState, object: &ObjectRef, name: &str, body: &[u8]) -> Result<Response, ApiError> {
    let request: PresignRequest =
        serde_json::from_slice(body).map_err(|e| ApiError::BadRequest(format!("invalid presign request: {e}")))?;
    let expires_in = request.expires_in.unwrap_or(900);
    if !(1..=MAX_PRESIGN_SECONDS).contains(&expires_in) {
        return Err(ApiError::BadRequest(format!("expires_in must be 1 to {MAX_PRESIGN_SECONDS} seconds")));
    }
    let ttl = Duration::from_secs(expires_in);
    let answer = match request.method.to_ascii_uppercase().as_str() {
        "GET" => {
            let blob = crate::blobs::meta::get(&state.db, object, name)
                .await?
                .ok_or_else(|| ApiError::NotFound(format!("no blob {name:?} in object {object}")))?;
            let key = stored_path(&blob.storage_key)?;
            let url = state.storage.presign(reqwest::Method::GET, &key, ttl).await?;
            PresignBody { method: "GET".into(), url, expires_in, upload_key: None, commit_url: None }
        }
        "PUT" => {
            let key = new_storage_key(object, name);
            let url = state.storage.presign(reqwest::Method::PUT, &key, ttl).await?;
            let commit_url = format!("/v1/objects/{}/{}/blobs/{}/commit", object.ns, object.id, name);
            PresignBody {
                method: "PUT".into(),
                url,
                expires_in,
                upload_key: Some(key.to_string()),
                commit_url: Some(commit_url),
            }
        }
        other => return Err(ApiError::BadRequest(format!("method must be GET or PUT, not {other:?}"))),
    };
    Ok(axum::Json(answer).into_response())
}

/// After a presigned PUT: which upload becomes the blob, and its headers.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CommitRequest {
    /// The `upload_key` the presign answer gave.
    upload_key: String,
    content_type: Option<String>,
    cache_control: Option<String>,
    content_disposition: Option<String>,
    /// Kept as `x-statehouse-meta-<name>` headers.
    #[serde(default)]
    metadata: BTreeMap<String, String>,
}

/// Make the bytes uploaded through a presigned PUT the blob.
///
/// Blob names hold slashes, so one handler (`post_blob_action`) takes every
/// POST under a blob path; this declaration only describes the commit route
/// in the OpenAPI document.
#[utoipa::path(post, path = "/v1/objects/{ns}/{id}/blobs/{name}/commit", tag = "blobs",
    params(("ns" = String, Path), ("id" = String, Path), ("name" = String, Path),
           ("If-Match" = Option<String>, Header), ("If-None-Match" = Option<String>, Header)),
    request_body = CommitRequest,
    responses((status = 200, body = BlobWritten), (status = 400, body = Problem), (status = 404, body = Problem),
              (status = 409, body = Problem, description = "the upload is too old to commit, or the store is a local folder"),
              (status = 412, body = Problem), (status = 503, body = Problem)))]
#[allow(dead_code)]
pub fn commit_presigned_route() {}

/// Makes bytes uploaded through a presigned PUT the blob: reads them once to
/// learn their size and SHA-256, then commits the metadata like any upload.
async fn commit_presigned_upload(
    state: &SharedState,
    object: &ObjectRef,
    name: String,
    replay: Replay,
) -> Result<Response, ApiError> {
    let request: CommitRequest = serde_json::from_slice(&replay.body)
        .map_err(|e| ApiError::BadRequest(format!("invalid commit request: {e}")))?;
    let prefix = upload_prefix(object, &name);
    let upload = request.upload_key.strip_prefix(&prefix).filter(|rest| uuid::Uuid::parse_str(rest).is_ok());
    if upload.is_none() {
        return Err(ApiError::BadRequest("upload_key is not one issued for this blob by presign".into()));
    }
    for value in [&request.cache_control, &request.content_disposition].into_iter().flatten() {
        upload::check_field(value)?;
    }
    let user_meta = upload::user_metadata(request.metadata.iter().map(|(k, v)| (k.as_str(), v.as_str())))?;
    let content_type = match &request.content_type {
        Some(ct) => {
            super::extract::check_content_type(ct)?;
            ct.clone()
        }
        None => super::extract::DEFAULT_CONTENT_TYPE.into(),
    };
    let key = object_store::path::Path::parse(&request.upload_key)
        .map_err(|_| ApiError::BadRequest("upload_key is not one issued for this blob by presign".into()))?;
    // Refused past half the grace period, well before the sweeper may delete it.
    let max_age = state.settings.orphan_grace / 2;
    let (size, sha256) = upload::read_presigned(&state.storage, &key, max_age, state.settings.max_blob_bytes).await?;
    let blob = BlobMeta {
        name,
        storage_key: request.upload_key,
        size,
        sha256,
        content_type,
        cache_control: request.cache_control,
        content_disposition: request.content_disposition,
        user_meta,
        version: 0,
    };
    let pre = precondition(&replay.headers)?;
    let forward = Replay {
        uri: internal_commit_uri(object),
        headers: commit_headers(&replay.headers),
        body: serde_json::to_vec(&blob).expect("blob metadata serialises").into(),
        ..replay
    };
    match state
        .routing
        .commit(object, Mutation::PutBlob { blob: blob.clone(), pre }, forward)
        .await
        .map_err(header_condition)?
    {
        Routed::Local(committed) => Ok(blob_written(&committed, &blob)),
        Routed::Forwarded(forwarded) => Ok(forwarded.into_response()),
    }
}

fn too_large(limit: u64) -> ApiError {
    upload::UploadRefused::TooLarge(limit).into()
}

fn optional_header(headers: &HeaderMap, name: HeaderName) -> Result<Option<String>, ApiError> {
    match headers.get(&name) {
        None => Ok(None),
        Some(value) => {
            let text = value.to_str().map_err(|_| ApiError::BadRequest(format!("{name} must be visible ASCII")))?;
            upload::check_field(text)?;
            Ok(Some(text.to_string()))
        }
    }
}

/// The `x-statehouse-meta-*` headers, names without the prefix.
fn user_metadata(headers: &HeaderMap) -> Result<BTreeMap<String, String>, ApiError> {
    let mut pairs = Vec::new();
    for (name, value) in headers {
        let Some(key) = name.as_str().strip_prefix(USER_META_PREFIX) else { continue };
        let text = value.to_str().map_err(|_| ApiError::BadRequest(format!("{name} must be visible ASCII")))?;
        pairs.push((key, text));
    }
    Ok(upload::user_metadata(pairs)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(v: &str, size: u64) -> Result<Option<(u64, u64)>, ApiError> {
        parse_range(Some(&HeaderValue::from_str(v).unwrap()), size)
    }

    #[test]
    fn ranges() {
        assert_eq!(range("bytes=0-4", 10).unwrap(), Some((0, 5)));
        assert_eq!(range("bytes=5-", 10).unwrap(), Some((5, 10)));
        assert_eq!(range("bytes=-3", 10).unwrap(), Some((7, 10)));
        assert_eq!(range("bytes=-30", 10).unwrap(), Some((0, 10)));
        assert_eq!(range("bytes=8-100", 10).unwrap(), Some((8, 10)));
        assert!(matches!(range("bytes=10-", 10), Err(ApiError::RangeNotSatisfiable { size: 10, .. })));
        assert!(matches!(range("bytes=-0", 10), Err(ApiError::RangeNotSatisfiable { .. })));
        assert!(matches!(range("bytes=0-", 0), Err(ApiError::RangeNotSatisfiable { .. })));
        for ignored in ["items=0-1", "bytes=1-2,4-5", "bytes=x-1", "bytes=5-1", "bytes=-"] {
            assert_eq!(range(ignored, 10).unwrap(), None, "{ignored}");
        }
    }
}
