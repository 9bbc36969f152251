//! Request extractors whose every rejection is a problem+json 4xx.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{FromRequest, FromRequestParts, Path, Query, Request};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use serde::de::DeserializeOwned;

use super::error::ApiError;
use super::FORWARDED_BY;
use crate::model::{validate_key, validate_ns, InvalidName, ObjectRef, Precondition, VersionMatch};
use crate::routing::Replay;

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
        let (object, key) = object_and_name(parts, state, validate_key).await?;
        Ok(KeyPath(object, key))
    }
}

/// `/v1/objects/{ns}/{id}/<kind>/{name}` (a key, a blob, an alarm): the object,
/// and the name, percent-decoded and checked by its kind's `rule`.
pub(super) async fn object_and_name<S: Send + Sync>(
    parts: &mut Parts,
    state: &S,
    rule: fn(&str) -> Result<(), InvalidName>,
) -> Result<(ObjectRef, String), ApiError> {
    let Path((ns, id, name)) =
        Path::<(String, String, String)>::from_request_parts(parts, state).await.map_err(path_error)?;
    let object = ObjectRef::new(&ns, &id)?;
    rule(&name)?;
    Ok((object, name))
}

/// Path parameters with no grammar of their own (the Iceberg catalog's);
/// a segment that does not decode is a 400.
pub struct ApiPath<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for ApiPath<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let Path(value) = Path::<T>::from_request_parts(parts, state).await.map_err(path_error)?;
        Ok(ApiPath(value))
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

/// Parses `If-Match` / `If-None-Match` as RFC 9110 defines them: `*`, or a
/// list of entity-tags, each `"opaque"` or weak `W/"opaque"`. Entity-tags are
/// opaque to clients, and caches and proxies send ones we never made: a
/// well-formed tag that is not one of our versions simply matches nothing.
/// If-Match compares strongly (a weak tag never matches), If-None-Match
/// weakly. Only a header that is not a valid list is a 400.
pub fn precondition(headers: &HeaderMap) -> Result<Precondition, ApiError> {
    Ok(Precondition {
        if_match: version_match(headers, "if-match", Comparison::Strong)?,
        if_none_match: version_match(headers, "if-none-match", Comparison::Weak)?,
    })
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Comparison {
    Strong,
    Weak,
}

fn version_match(headers: &HeaderMap, name: &str, comparison: Comparison) -> Result<Option<VersionMatch>, ApiError> {
    Ok(tag_list(headers, name, comparison)?.map(|list| match list {
        TagList::Any => VersionMatch::Any,
        // Ours are a version in decimal; anything else matches nothing.
        TagList::Tags(tags) => VersionMatch::OneOf(
            tags.into_iter()
                .filter_map(|opaque| std::str::from_utf8(opaque).ok().filter(|t| is_our_version(t))?.parse().ok())
                .collect(),
        ),
    }))
}

/// Whether `If-None-Match` is `*` or names the entity-tag `"opaque"` (weak
/// comparison, so `W/"opaque"` too); false without the header.
pub fn none_match(headers: &HeaderMap, opaque: &str) -> Result<bool, ApiError> {
    Ok(match tag_list(headers, "if-none-match", Comparison::Weak)? {
        None => false,
        Some(TagList::Any) => true,
        Some(TagList::Tags(tags)) => tags.contains(&opaque.as_bytes()),
    })
}

/// A conditional header's list: `*`, or the opaque parts of the entity-tags
/// that can match under the comparison (a weak tag never matches strongly).
enum TagList<'a> {
    Any,
    Tags(Vec<&'a [u8]>),
}

fn tag_list<'a>(headers: &'a HeaderMap, name: &str, comparison: Comparison) -> Result<Option<TagList<'a>>, ApiError> {
    let mut values = headers.get_all(name).iter().peekable();
    if values.peek().is_none() {
        return Ok(None);
    }
    let broken = |why: &str| {
        ApiError::BadRequest(format!("{name} must be * or a list of entity-tags like \"42\" or W/\"42\": {why}"))
    };
    let mut any = false;
    let mut tags = 0;
    let mut matchable = Vec::new();
    for value in values {
        for element in list_elements(value.as_bytes()).map_err(|why| broken(&why))? {
            if element == b"*" {
                any = true;
                continue;
            }
            let (weak, opaque) = entity_tag(element).map_err(|why| broken(&why))?;
            tags += 1;
            if !(weak && comparison == Comparison::Strong) {
                matchable.push(opaque);
            }
        }
    }
    match (any, tags) {
        (true, 0) => Ok(Some(TagList::Any)),
        (true, _) => Err(broken("* stands alone")),
        (false, 0) => Err(broken("it is empty")),
        (false, _) => Ok(Some(TagList::Tags(matchable))),
    }
}

/// The elements of a comma-separated header list (RFC 9110 5.6.1), empty
/// ones skipped; commas inside an entity-tag's quotes do not separate.
fn list_elements(value: &[u8]) -> Result<Vec<&[u8]>, String> {
    let mut elements = Vec::new();
    let mut at = 0;
    while at < value.len() {
        match value[at] {
            b' ' | b'\t' | b',' => at += 1,
            _ => {
                let start = at;
                let mut quoted = false;
                while at < value.len() && (quoted || value[at] != b',') {
                    if value[at] == b'"' {
                        quoted = !quoted;
                    }
                    at += 1;
                }
                if quoted {
                    return Err("an entity-tag's closing quote is missing".into());
                }
                let element = &value[start..at];
                let end = element.iter().rposition(|b| !matches!(b, b' ' | b'\t')).map_or(0, |i| i + 1);
                elements.push(&element[..end]);
            }
        }
    }
    Ok(elements)
}

/// `W/"opaque"` or `"opaque"`: whether it is weak, and the opaque part.
fn entity_tag(element: &[u8]) -> Result<(bool, &[u8]), String> {
    let (weak, quoted) = match element.strip_prefix(b"W/") {
        Some(rest) => (true, rest),
        None => (false, element),
    };
    let opaque = quoted
        .strip_prefix(b"\"")
        .and_then(|rest| rest.strip_suffix(b"\""))
        .ok_or_else(|| format!("{:?} is not a quoted entity-tag", String::from_utf8_lossy(element)))?;
    // etagc: %x21 / %x23-7E / obs-text (no spaces, no quotes inside).
    if opaque.iter().any(|&b| b != 0x21 && !(0x23..=0x7e).contains(&b) && b < 0x80) {
        return Err(format!("{:?} has a character an entity-tag cannot hold", String::from_utf8_lossy(element)));
    }
    Ok((weak, opaque))
}

/// The entity-tags this server makes: a version in plain decimal.
fn is_our_version(tag: &str) -> bool {
    !tag.is_empty()
        && tag.len() <= 18
        && tag.bytes().all(|b| b.is_ascii_digit())
        && (tag == "0" || !tag.starts_with('0'))
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
/// A refused condition given in If-Match / If-None-Match, worded for the headers.
pub fn header_condition(err: impl Into<ApiError>) -> ApiError {
    match err.into() {
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
        // Tags we did not make are well-formed: they match nothing.
        let p = precondition(&headers(&[("if-match", "\"x\", \"a,b\", \"007\", \"3\"")])).unwrap();
        assert_eq!(p.if_match, Some(VersionMatch::OneOf(vec![3])));
        // Weak tags: never for If-Match (strong comparison), by version for If-None-Match.
        let p = precondition(&headers(&[("if-match", "W/\"3\""), ("if-none-match", "W/\"3\", \"4\"")])).unwrap();
        assert_eq!(p.if_match, Some(VersionMatch::OneOf(vec![])));
        assert_eq!(p.if_none_match, Some(VersionMatch::OneOf(vec![3, 4])));
        // Several header lines make one list.
        let p = precondition(&headers(&[("if-none-match", "\"1\""), ("if-none-match", "\"2\"")])).unwrap();
        assert_eq!(p.if_none_match, Some(VersionMatch::OneOf(vec![1, 2])));
        for broken in ["3", ",", "", "\"3", "W/3", "\"a b\"", "*, \"3\"", "\"3\" \"4\"", "w/\"3\""] {
            assert!(precondition(&headers(&[("if-match", broken)])).is_err(), "{broken:?} is not a valid list");
        }
    }
}
