//! Hands a write to the replica that owns the object: one hop, and what
//! became of it, typed by whether it may have been applied.

use axum::body::Bytes;
use axum::http::{header, HeaderName, HeaderValue, StatusCode};

use super::{Replay, Routing};
use crate::auth::{Signed, PEER_SIGNATURE};
use crate::guard::Owner;
use crate::headers::{FENCE, FORWARDED_BY, INSTANCE, NOT_APPLIED, REQUEST_ID, VIA};

/// What became of a write handed to its owner. Only `Answered` and
/// `Unknown` may have committed anything.
pub enum Forwarded {
    /// The owner's answer, to relay as it is (a refusal among them).
    Answered(Relayed),
    /// Certainly not applied.
    NotApplied(NotApplied),
    /// Sent, but the answer was cut off or never came: the owner may have
    /// committed it.
    Unknown(Unknown),
}

/// An owner's answer as it came back: its status, the headers worth
/// relaying (and which replica relayed it), its body.
pub struct Relayed {
    pub status: StatusCode,
    pub headers: Vec<(HeaderName, HeaderValue)>,
    pub body: Bytes,
}

pub enum NotApplied {
    /// On fly.io the platform's proxy replays the request on the owner's machine.
    ReplayOn { machine: String },
    /// The request was already forwarded once, and here too another replica
    /// owns the object: refused rather than sent on a second hop.
    SecondHop { forwarded_by: String, owner: Owner },
    /// The owner advertised no URL to reach it at.
    NoUrl { owner: Owner },
    /// No connection to the owner could be made.
    Unreachable { owner: Owner, url: String },
    /// The owner refused it unapplied because the lease had moved on again:
    /// routing it once more, from a fresh look at the owner, may succeed.
    LeaseMoved(Relayed),
}

pub enum Unknown {
    /// Sent, and no answer came (timeout, or the connection broke).
    NoAnswer { owner: Owner, url: String },
    /// The answer began but its body was cut off.
    CutOff { error: String },
}

impl Forwarded {
    /// Whether the write surely left nothing behind: never delivered, or
    /// refused by the owner (a 4xx other than a timeout).
    pub fn certainly_not_applied(&self) -> bool {
        match self {
            Forwarded::NotApplied(_) => true,
            Forwarded::Answered(answer) => {
                answer.status.is_client_error() && answer.status != StatusCode::REQUEST_TIMEOUT
            }
            Forwarded::Unknown(_) => false,
        }
    }

    pub fn route_again(&self) -> bool {
        matches!(self, Forwarded::NotApplied(NotApplied::LeaseMoved(_)))
    }
}

/// Request headers that carry meaning to the owner; the rest are hop-specific.
static FORWARDED_REQUEST_HEADERS: [HeaderName; 6] =
    [header::CONTENT_TYPE, header::IF_MATCH, header::IF_NONE_MATCH, header::AUTHORIZATION, header::ACCEPT, REQUEST_ID];

/// Response headers relayed back to the client.
static RELAYED_RESPONSE_HEADERS: [HeaderName; 5] =
    [header::CONTENT_TYPE, header::ETAG, header::RETRY_AFTER, FENCE, INSTANCE];

pub(super) async fn forward(routing: &Routing, owner: &Owner, replay: Replay) -> Forwarded {
    let me = routing.guard.me();
    let forwarded = &routing.metrics.forwarded;
    if let (Some(_), Some(machine)) = (&me.machine, &owner.machine) {
        forwarded.with_label_values(&["fly_replay"]).inc();
        return Forwarded::NotApplied(NotApplied::ReplayOn { machine: machine.clone() });
    }
    if let Some(from) = &replay.forwarded_by {
        forwarded.with_label_values(&["second_hop_refused"]).inc();
        return Forwarded::NotApplied(NotApplied::SecondHop { forwarded_by: from.clone(), owner: owner.clone() });
    }
    let Some(base) = &owner.url else {
        return Forwarded::NotApplied(NotApplied::NoUrl { owner: owner.clone() });
    };
    let path = replay.uri.path_and_query().map_or("/", |p| p.as_str());
    let url = format!("{base}{path}");
    let mut request = routing
        .peers
        .request(replay.method.clone(), &url)
        .timeout(routing.forward_timeout)
        .header(FORWARDED_BY, me.instance.as_str())
        .body(replay.body.clone());
    for name in &FORWARDED_REQUEST_HEADERS {
        for value in replay.headers.get_all(name) {
            request = request.header(name, value);
        }
    }
    if let Some(key) = &routing.peer_key {
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
            forwarded.with_label_values(&["owner_unreachable"]).inc();
            tracing::info!(owner = %owner.instance, url = %url, error = %err, "owner did not answer a forwarded write");
            let (owner, url) = (owner.clone(), base.clone());
            // A timeout is not "not delivered": the owner may still commit what it received.
            return if err.is_connect() {
                Forwarded::NotApplied(NotApplied::Unreachable { owner, url })
            } else {
                Forwarded::Unknown(Unknown::NoAnswer { owner, url })
            };
        }
    };
    let status = StatusCode::from_u16(answer.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
    let mut headers = Vec::new();
    for name in &RELAYED_RESPONSE_HEADERS {
        for value in answer.headers().get_all(name) {
            headers.push((name.clone(), value.clone()));
        }
    }
    if let Ok(value) = HeaderValue::from_str(&me.instance) {
        headers.push((VIA, value));
    }
    let lease_moved = answer.headers().get(NOT_APPLIED).is_some_and(|v| v == "lease-moved");
    let body = match answer.bytes().await {
        Ok(body) => body,
        Err(err) => {
            // The owner may have committed: say so rather than guess.
            forwarded.with_label_values(&["answer_lost"]).inc();
            return Forwarded::Unknown(Unknown::CutOff { error: err.to_string() });
        }
    };
    forwarded.with_label_values(&["relayed"]).inc();
    let relayed = Relayed { status, headers, body };
    if lease_moved {
        Forwarded::NotApplied(NotApplied::LeaseMoved(relayed))
    } else {
        Forwarded::Answered(relayed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(status: StatusCode) -> Relayed {
        Relayed { status, headers: Vec::new(), body: Bytes::new() }
    }

    #[test]
    fn only_undelivered_writes_and_owner_refusals_are_certainly_not_applied() {
        let owner = Owner { instance: "b".into(), url: None, machine: None, lease_expires_at_ms: 0 };
        let never_sent = || Forwarded::NotApplied(NotApplied::NoUrl { owner: owner.clone() });
        let lease_moved = || Forwarded::NotApplied(NotApplied::LeaseMoved(answer(StatusCode::SERVICE_UNAVAILABLE)));
        assert!(never_sent().certainly_not_applied() && !never_sent().route_again());
        assert!(lease_moved().certainly_not_applied() && lease_moved().route_again());
        assert!(Forwarded::Answered(answer(StatusCode::PRECONDITION_FAILED)).certainly_not_applied());
        // The owner may still be committing what timed out, or what it answered 5xx to.
        assert!(!Forwarded::Answered(answer(StatusCode::REQUEST_TIMEOUT)).certainly_not_applied());
        assert!(!Forwarded::Answered(answer(StatusCode::SERVICE_UNAVAILABLE)).certainly_not_applied());
        assert!(!Forwarded::Answered(answer(StatusCode::OK)).certainly_not_applied());
        let no_answer = Forwarded::Unknown(Unknown::NoAnswer { owner, url: "http://b".into() });
        assert!(!no_answer.certainly_not_applied() && !no_answer.route_again());
        assert!(!Forwarded::Answered(answer(StatusCode::OK)).route_again());
    }
}
