//! How a write handed to its owner is answered: the owner's answer relayed
//! as it came, or a 503 that says whether it may have been applied.

use axum::body::Body;
use axum::http::{HeaderName, HeaderValue};
use axum::response::{IntoResponse, Response};

use super::ApiError;
use crate::headers::NOT_APPLIED;
use crate::routing::{Forwarded, NotApplied, Relayed, Unknown};

const FLY_REPLAY: HeaderName = HeaderName::from_static("fly-replay");

impl IntoResponse for Forwarded {
    fn into_response(self) -> Response {
        match self {
            Forwarded::Answered(answer) | Forwarded::NotApplied(NotApplied::LeaseMoved(answer)) => relay(answer),
            Forwarded::NotApplied(NotApplied::ReplayOn { machine }) => {
                let mut response =
                    ApiError::Fenced(format!("object owned by machine {machine}; replaying there")).into_response();
                if let Ok(value) = HeaderValue::from_str(&format!("instance={machine}")) {
                    response.headers_mut().insert(FLY_REPLAY, value);
                }
                response
            }
            Forwarded::NotApplied(NotApplied::SecondHop { forwarded_by, owner }) => {
                let mut response = ApiError::unavailable(
                    format!(
                        "forwarded by {forwarded_by}, but the object is owned by {} here too; not forwarding twice",
                        owner.instance
                    ),
                    owner.retry_after_secs(),
                )
                .into_response();
                // Tells the replica that forwarded it that it may route it again.
                response.headers_mut().insert(NOT_APPLIED, HeaderValue::from_static("lease-moved"));
                response
            }
            Forwarded::NotApplied(NotApplied::NoUrl { owner }) => ApiError::unavailable(
                format!("the object is owned by {}, which advertised no URL", owner.instance),
                owner.retry_after_secs(),
            )
            .into_response(),
            Forwarded::NotApplied(NotApplied::Unreachable { owner, url })
            | Forwarded::Unknown(Unknown::NoAnswer { owner, url }) => ApiError::unavailable(
                format!("the object's owner {} at {url} did not answer; retry after its lease ends", owner.instance),
                owner.retry_after_secs(),
            )
            .into_response(),
            Forwarded::Unknown(Unknown::CutOff { error }) => ApiError::unavailable(
                format!("the owner's answer was cut off ({error}); the write may or may not have been applied"),
                1,
            )
            .into_response(),
        }
    }
}

fn relay(answer: Relayed) -> Response {
    let mut response = Response::new(Body::from(answer.body));
    *response.status_mut() = answer.status;
    for (name, value) in answer.headers {
        response.headers_mut().append(name, value);
    }
    response
}
