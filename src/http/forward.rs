//! Hands a write to the replica that owns the object: one hop, then 503.

use axum::body::Body;
use axum::http::{header, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use super::extract::Replay;
use super::{ApiError, AppState, FORWARDED_BY};
use crate::auth::{Signed, PEER_SIGNATURE};
use crate::guard::Owner;

const FLY_REPLAY: HeaderName = HeaderName::from_static("fly-replay");
const VIA: HeaderName = HeaderName::from_static("statehouse-via");
/// On a refused second hop: the request was certainly not applied (the lease
/// moved while it travelled), so the replica that forwarded it may route again.
const NOT_APPLIED: HeaderName = HeaderName::from_static("statehouse-not-applied");

/// A forwarded write came back unapplied because the lease had moved on: the
/// forwarder may route it again, once, from a fresh look at the owner.
#[derive(Debug, Clone, Copy)]
pub struct RouteAgain;

/// Request headers that carry meaning to the owner; the rest are hop-specific.
static FORWARDED_REQUEST_HEADERS: [HeaderName; 6] = [
    header::CONTENT_TYPE,
    header::IF_MATCH,
    header::IF_NONE_MATCH,
    header::AUTHORIZATION,
    header::ACCEPT,
    super::REQUEST_ID,
];

/// Response headers relayed back to the client.
static RELAYED_RESPONSE_HEADERS: [HeaderName; 5] =
    [header::CONTENT_TYPE, header::ETAG, header::RETRY_AFTER, super::FENCE, super::INSTANCE];

/// Marks a forwarding answer given without the owner ever receiving the
/// request: it certainly committed nothing. (A timeout is not marked: the
/// owner may still commit what it received.)
#[derive(Debug, Clone, Copy)]
pub struct NotDelivered;

fn not_delivered(mut response: Response) -> Response {
    response.extensions_mut().insert(NotDelivered);
    response
}

pub async fn forward(state: &AppState, owner: &Owner, replay: Replay) -> Response {
    let me = state.guard.me();
    // On fly.io the platform proxy replays the request on the owner machine itself.
    if let (Some(_), Some(machine)) = (&me.machine, &owner.machine) {
        state.metrics.forwarded.with_label_values(&["fly_replay"]).inc();
        let mut response =
            ApiError::Fenced(format!("object owned by machine {machine}; replaying there")).into_response();
        if let Ok(value) = HeaderValue::from_str(&format!("instance={machine}")) {
            response.headers_mut().insert(FLY_REPLAY, value);
        }
        return not_delivered(response);
    }
    if let Some(from) = &replay.forwarded_by {
        state.metrics.forwarded.with_label_values(&["second_hop_refused"]).inc();
        let mut response = ApiError::unavailable(
            format!(
                "forwarded by {from}, but the object is owned by {} here too; not forwarding twice",
                owner.instance
            ),
            owner.retry_after_secs(),
        )
        .into_response();
        response.headers_mut().insert(NOT_APPLIED, HeaderValue::from_static("lease-moved"));
        return not_delivered(response);
    }
    let Some(base) = &owner.url else {
        return not_delivered(
            ApiError::unavailable(
                format!("the object is owned by {}, which advertised no URL", owner.instance),
                owner.retry_after_secs(),
            )
            .into_response(),
        );
    };
    let path = replay.uri.path_and_query().map_or("/", |p| p.as_str());
    let url = format!("{base}{path}");
    let mut request = state
        .peers
        .request(replay.method.clone(), &url)
        .timeout(state.settings.forward_timeout())
        .header(FORWARDED_BY, me.instance.as_str())
        .body(replay.body.clone());
    for name in &FORWARDED_REQUEST_HEADERS {
        for value in replay.headers.get_all(name) {
            request = request.header(name, value);
        }
    }
    if let Some(key) = &state.access.peer {
        let signed = Signed {
            method: &replay.method,
            path_and_query: path,
            forwarded_by: &me.instance,
            authorization: replay.headers.get(header::AUTHORIZATION).map(|v| v.as_bytes()),
            body: &replay.body,
        };
        request = request.header(PEER_SIGNATURE, key.sign(&signed, crate::clock::now_ms()));
    }
    let answer = match request.send().await {
        Ok(answer) => answer,
        Err(err) => {
            state.metrics.forwarded.with_label_values(&["owner_unreachable"]).inc();
            tracing::info!(owner = %owner.instance, url = %url, error = %err, "owner did not answer a forwarded write");
            let response = ApiError::unavailable(
                format!("the object's owner {} at {base} did not answer; retry after its lease ends", owner.instance),
                owner.retry_after_secs(),
            )
            .into_response();
            return if err.is_connect() { not_delivered(response) } else { response };
        }
    };
    let status = StatusCode::from_u16(answer.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
    let mut headers = Vec::new();
    for name in &RELAYED_RESPONSE_HEADERS {
        for value in answer.headers().get_all(name) {
            headers.push((name.clone(), value.clone()));
        }
    }
    let route_again = answer.headers().get(NOT_APPLIED).is_some_and(|v| v == "lease-moved");
    let body = match answer.bytes().await {
        Ok(body) => body,
        Err(err) => {
            // The owner may have committed: say so rather than guess.
            state.metrics.forwarded.with_label_values(&["answer_lost"]).inc();
            return ApiError::unavailable(
                format!("the owner's answer was cut off ({err}); the write may or may not have been applied"),
                1,
            )
            .into_response();
        }
    };
    state.metrics.forwarded.with_label_values(&["relayed"]).inc();
    let mut response = Response::new(Body::from(body));
    if route_again {
        response.extensions_mut().insert(RouteAgain);
        response.extensions_mut().insert(NotDelivered);
    }
    *response.status_mut() = status;
    for (name, value) in headers {
        response.headers_mut().append(name, value);
    }
    if let Ok(value) = HeaderValue::from_str(&me.instance) {
        response.headers_mut().insert(VIA, value);
    }
    response
}
