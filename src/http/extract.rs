//! Request extractors whose every rejection is a problem+json 4xx.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{FromRequest, FromRequestParts, Path, Query, Request};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode, Uri};
use serde::de::DeserializeOwned;

use super::error::ApiError;
use super::FORWARDED_BY;
use crate::objects::{validate_key, validate_ns, ObjectRef, Precondition, VersionMatch};

fn path_error(err: axum::extract::rejection::PathRejection) -> ApiError {
    ApiError::BadRequest(format!("invalid path: {}", err.body_text()))
}

/// `/v1/objects/{ns}`
pub struct NamespacePath(pub String);

impl<S: Send + Sync> FromRequestParts<S> for NamespacePath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let Path(ns) = Path::<String>::from_request_parts(parts, state).await.map_err(path_error)?;
        validate_ns(&ns)?;
        Ok(NamespacePath(ns))
    }
}

/// `/v1/objects/{ns}/{id}/...`
pub struct ObjectPath(pub ObjectRef);

impl<S: Send + Sync> FromRequestParts<S> for ObjectPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let Path((ns, id)) = Path::<(String, String)>::from_request_parts(parts, state).await.map_err(path_error)?;
        Ok(ObjectPath(ObjectRef::new(&ns, &id)?))
    }
}

/// `/v1/objects/{ns}/{id}/kv/{key}`: the key arrives percent-decoded.
pub struct KeyPath(pub ObjectRef, pub String);

impl<S: Send + Sync> FromRequestParts<S> for KeyPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let Path((ns, id, key)) =
            Path::<(String, String, String)>::from_request_parts(parts, state).await.map_err(path_error)?;
        let object = ObjectRef::new(&ns, &id)?;
        validate_key(&key)?;
        Ok(KeyPath(object, key))
    }
}

/// Query parameters; a malformed query string is a 400 naming the parameter.
pub struct ApiQuery<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let Query(value) = Query::<T>::from_request_parts(parts, state)
            .await
            .map_err(|e| ApiError::BadRequest(format!("invalid query string: {}", e.body_text())))?;
        Ok(ApiQuery(value))
    }
}

pub const DEFAULT_CONTENT_TYPE: &str = "application/octet-stream";
const MAX_CONTENT_TYPE_BYTES: usize = 255;
const DEFAULT_LIST_LIMIT: usize = 1000;
const MAX_LIST_LIMIT: usize = 10_000;

/// A listing's page size: 1-10000, default 1000.
pub fn list_limit(limit: Option<usize>) -> Result<usize, ApiError> {
    let limit = limit.unwrap_or(DEFAULT_LIST_LIMIT);
    if (1..=MAX_LIST_LIMIT).contains(&limit) {
        Ok(limit)
    } else {
        Err(ApiError::BadRequest(format!("limit must be between 1 and {MAX_LIST_LIMIT}, got {limit}")))
    }
}

/// A whole write request, kept as it arrived so that it can be replayed on the
/// owner replica if this one does not hold the object's lease.
#[derive(Clone)]
pub struct Replay {
    pub method: Method,
    pub uri: Uri,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// Set when a peer already forwarded this request (one hop only).
    pub forwarded_by: Option<String>,
}

impl<S: Send + Sync> FromRequest<S> for Replay {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let (parts, body) = req.into_parts();
        let forwarded_by = parts.headers.get(FORWARDED_BY).and_then(|v| v.to_str().ok()).map(str::to_string);
        let body = Bytes::from_request(Request::from_parts(parts.clone(), body), state).await.map_err(body_error)?;
        Ok(Replay { method: parts.method, uri: parts.uri, headers: parts.headers, body, forwarded_by })
    }
}

fn body_error(err: BytesRejection) -> ApiError {
    if err.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::PayloadTooLarge(format!("the request body is larger than this route allows: {}", err.body_text()))
    } else {
        ApiError::BadRequest(format!("could not read the request body: {}", err.body_text()))
    }
}

/// The conditions of a read of something at `version`: a failed If-Match is
/// 412; a matching If-None-Match answers 304 (returned as `Some`).
pub fn read_condition(pre: Precondition, version: i64) -> Result<Option<axum::response::Response>, ApiError> {
    use axum::response::IntoResponse;
    if let Some(if_match) = pre.if_match {
        if !(Precondition { if_match: Some(if_match), if_none_match: None }).holds(Some(version)) {
            return Err(ApiError::PreconditionFailed {
                detail: format!("If-Match does not match the current version {version}"),
                op_index: None,
            });
        }
    }
    if let Some(if_none_match) = pre.if_none_match {
        if !(Precondition { if_match: None, if_none_match: Some(if_none_match) }).holds(Some(version)) {
            return Ok(Some((StatusCode::NOT_MODIFIED, [(header::ETAG, etag(version))]).into_response()));
        }
    }
    Ok(None)
}

/// Parses `If-Match` / `If-None-Match`: `*` or a list of strong entity-tags `"N"`.
pub fn precondition(headers: &HeaderMap) -> Result<Precondition, ApiError> {
    Ok(Precondition {
        if_match: version_match(headers, "if-match")?,
        if_none_match: version_match(headers, "if-none-match")?,
    })
}

fn version_match(headers: &HeaderMap, name: &str) -> Result<Option<VersionMatch>, ApiError> {
    let mut values = headers.get_all(name).iter().peekable();
    if values.peek().is_none() {
        return Ok(None);
    }
    let mut versions = Vec::new();
    for value in values {
        let text = value.to_str().map_err(|_| ApiError::BadRequest(format!("{name} is not ASCII")))?;
        for tag in text.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            if tag == "*" {
                return Ok(Some(VersionMatch::Any));
            }
            // Weak tags compare equal for If-None-Match; versions are exact either way.
            let tag = tag.strip_prefix("W/").unwrap_or(tag);
            let version = tag
                .strip_prefix('"')
                .and_then(|t| t.strip_suffix('"'))
                .and_then(|t| t.parse::<i64>().ok())
                .ok_or_else(|| {
                ApiError::BadRequest(format!("{name} must be * or a list of entity-tags like \"42\", got {tag:?}"))
            })?;
            versions.push(version);
        }
    }
    if versions.is_empty() {
        return Err(ApiError::BadRequest(format!("{name} is empty")));
    }
    Ok(Some(VersionMatch::OneOf(versions)))
}

/// The Content-Type a PUT stores: the request's, or application/octet-stream.
pub fn stored_content_type(headers: &HeaderMap) -> Result<String, ApiError> {
    match headers.get(header::CONTENT_TYPE) {
        None => Ok(DEFAULT_CONTENT_TYPE.into()),
        Some(value) => {
            let text =
                value.to_str().map_err(|_| ApiError::BadRequest("Content-Type must be visible ASCII".into()))?.trim();
            check_content_type(text)?;
            Ok(text.to_string())
        }
    }
}

pub fn check_content_type(content_type: &str) -> Result<(), ApiError> {
    let ok = !content_type.is_empty()
        && content_type.len() <= MAX_CONTENT_TYPE_BYTES
        && content_type.contains('/')
        && content_type.bytes().all(|b| (0x20..0x7f).contains(&b));
    if ok {
        Ok(())
    } else {
        Err(ApiError::BadRequest(format!(
            "content type must look like type/subtype, in at most {MAX_CONTENT_TYPE_BYTES} visible ASCII characters"
        )))
    }
}

/// On single-key routes the condition came from a header, not a batch op.
pub fn header_condition(err: ApiError) -> ApiError {
    match err {
        ApiError::PreconditionFailed { .. } => ApiError::PreconditionFailed {
            detail: "If-Match / If-None-Match does not hold for the key's current version".into(),
            op_index: None,
        },
        other => other,
    }
}

pub fn etag(version: i64) -> HeaderValue {
    HeaderValue::from_str(&format!("\"{version}\"")).expect("digits are a valid header")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in pairs {
            map.append(*k, v.parse().unwrap());
        }
        map
    }

    #[test]
    fn entity_tags() {
        let p = precondition(&headers(&[("if-match", "\"3\", \"5\"")])).unwrap();
        assert_eq!(p.if_match, Some(VersionMatch::OneOf(vec![3, 5])));
        let p = precondition(&headers(&[("if-none-match", "*")])).unwrap();
        assert_eq!(p.if_none_match, Some(VersionMatch::Any));
        assert!(precondition(&headers(&[("if-match", "3")])).is_err());
        assert!(precondition(&headers(&[("if-match", "\"x\"")])).is_err());
        assert!(precondition(&headers(&[("if-match", ",")])).is_err());
    }
}
