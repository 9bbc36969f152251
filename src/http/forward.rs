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

/// What became of a write handed to its owner. Only `Answered` and
/// `Unknown` may have committed anything.
pub enum Forwarded {
    /// The owner's answer, relayed as it is (a refusal among them).
    Answered(Response),
    /// Certainly not applied: the owner never received it, or refused it
    /// unapplied because the lease had moved on again; in that case
    /// (`route_again`) the forwarder may route it once more, from a fresh
    /// look at the owner.
    NotApplied { response: Response, route_again: bool },
    /// Sent, but the answer was cut off or never came: the owner may have
    /// committed it.
    Unknown(Response),
}

impl Forwarded {
    /// Whether the write surely left nothing behind: never delivered, or
    /// refused by the owner (a 4xx other than a timeout).
    pub fn certainly_not_applied(&self) -> bool {
        match self {
            Forwarded::NotApplied { .. } => true,
            Forwarded::Answered(response) => {
                response.status().is_client_error() && response.status() != StatusCode::REQUEST_TIMEOUT
            }
            Forwarded::Unknown(_) => false,
        }
    }

    pub fn route_again(&self) -> bool {
        matches!(self, Forwarded::NotApplied { route_again: true, .. })
    }
}

impl IntoResponse for Forwarded {
    fn into_response(self) -> Response {
        match self {
            Forwarded::Answered(response) | Forwarded::NotApplied { response, .. } | Forwarded::Unknown(response) => {
                response
            }
        }
    }
}

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

/// An answer given without the owner ever receiving the request.
fn not_delivered(response: Response) -> Forwarded {
    Forwarded::NotApplied { response, route_again: false }
}

pub async fn forward(state: &AppState, owner: &Owner, replay: Replay) -> Forwarded {
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
        .timeout(state.settings.forward_timeout)
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
            // A timeout is not "not delivered": the owner may still commit what it received.
            return if err.is_connect() { not_delivered(response) } else { Forwarded::Unknown(response) };
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
            return Forwarded::Unknown(
                ApiError::unavailable(
                    format!("the owner's answer was cut off ({err}); the write may or may not have been applied"),
                    1,
                )
                .into_response(),
            );
        }
    };
    state.metrics.forwarded.with_label_values(&["relayed"]).inc();
    let mut response = Response::new(Body::from(body));
    *response.status_mut() = status;
    for (name, value) in headers {
        response.headers_mut().append(name, value);
    }
    if let Ok(value) = HeaderValue::from_str(&me.instance) {
        response.headers_mut().insert(VIA, value);
    }
    if route_again {
        Forwarded::NotApplied { response, route_again: true }
    } else {
        Forwarded::Answered(response)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(status: StatusCode) -> Response {
        let mut response = Response::new(Body::empty());
        *response.status_mut() = status;
        response
    }

    #[test]
    fn only_undelivered_writes_and_owner_refusals_are_certainly_not_applied() {
        let not_applied =
            |route_again| Forwarded::NotApplied { response: answer(StatusCode::SERVICE_UNAVAILABLE), route_again };
        assert!(not_applied(false).certainly_not_applied());
        assert!(not_applied(true).certainly_not_applied() && not_applied(true).route_again());
        assert!(!not_applied(false).route_again());
        assert!(Forwarded::Answered(answer(StatusCode::PRECONDITION_FAILED)).certainly_not_applied());
        // The owner may still be committing what timed out, or what it answered 5xx to.
        assert!(!Forwarded::Answered(answer(StatusCode::REQUEST_TIMEOUT)).certainly_not_applied());
        assert!(!Forwarded::Answered(answer(StatusCode::SERVICE_UNAVAILABLE)).certainly_not_applied());
        assert!(!Forwarded::Answered(answer(StatusCode::OK)).certainly_not_applied());
        assert!(!Forwarded::Unknown(answer(StatusCode::SERVICE_UNAVAILABLE)).certainly_not_applied());
        assert!(!Forwarded::Answered(answer(StatusCode::OK)).route_again());
    }
}
