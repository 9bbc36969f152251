//! Application events: recorded in the outbox atomically with the object's
//! changes, for export to the Iceberg `events` table.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::error::{ApiError, Problem};
use super::extract::ObjectPath;
use super::{written, SharedState};
use crate::model::{Event, Mutation};
use crate::routing::{Replay, Routed};

pub const MAX_EVENTS_PER_CALL: usize = 1000;
const MAX_TYPE_BYTES: usize = 256;

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EventIn {
    /// What happened, e.g. `OrderPlaced`: 1-256 bytes, no control characters.
    #[serde(rename = "type")]
    event_type: String,
    /// Any JSON.
    #[serde(default)]
    data: serde_json::Value,
    /// RFC 3339; when it happened. Defaults to the time the request arrived.
    ts: Option<String>,
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EventsRequest {
    /// 1-1000 events.
    events: Vec<EventIn>,
}

/// Validates events and gives each a UUID v7 `event_id`.
pub fn accept(events: Vec<EventIn>) -> Result<Vec<Event>, ApiError> {
    if events.len() > MAX_EVENTS_PER_CALL {
        return Err(ApiError::BadRequest(format!(
            "at most {MAX_EVENTS_PER_CALL} events per call, this one has {}",
            events.len()
        )));
    }
    let now_micros = crate::clock::now_ms() * 1000;
    events
        .into_iter()
        .enumerate()
        .map(|(index, event)| {
            let bad = |why: String| ApiError::BadRequest(format!("event {index}: {why}"));
            if event.event_type.is_empty()
                || event.event_type.len() > MAX_TYPE_BYTES
                || event.event_type.chars().any(char::is_control)
            {
                return Err(bad(format!("type must be 1-{MAX_TYPE_BYTES} bytes without control characters")));
            }
            let ts_micros = match &event.ts {
                None => now_micros,
                Some(ts) => chrono::DateTime::parse_from_rfc3339(ts)
                    .map_err(|e| bad(format!("ts {ts:?} is not RFC 3339 ({e})")))?
                    .timestamp_micros(),
            };
            Ok(Event {
                event_id: uuid::Uuid::now_v7(),
                event_type: event.event_type,
                data: serde_json::to_string(&event.data).expect("a JSON value serialises"),
                ts_micros,
            })
        })
        .collect()
}

/// The answer to a recorded batch of events.
#[derive(Serialize, ToSchema)]
pub struct EventsRecorded {
    /// The object's version after the commit.
    version: i64,
    /// The ids given to the events, in request order (UUID v7).
    event_ids: Vec<String>,
}

/// Record application events on an object (bumps its version once).
#[utoipa::path(post, path = "/v1/objects/{ns}/{id}/events", tag = "events",
    params(("ns" = String, Path), ("id" = String, Path)),
    request_body = EventsRequest,
    responses((status = 200, body = EventsRecorded, description = "the object's new version and the events' ids, after the commit"),
              (status = 400, body = Problem), (status = 413, body = Problem), (status = 503, body = Problem)))]
pub async fn post_events(
    State(state): State<SharedState>,
    ObjectPath(object): ObjectPath,
    replay: Replay,
) -> Result<Response, ApiError> {
    let request: EventsRequest =
        serde_json::from_slice(&replay.body).map_err(|e| ApiError::BadRequest(format!("invalid events JSON: {e}")))?;
    if request.events.is_empty() {
        return Err(ApiError::BadRequest("events must hold 1 to 1000 events".into()));
    }
    let events = accept(request.events)?;
    let event_ids: Vec<String> = events.iter().map(|e| e.event_id.to_string()).collect();
    let committed = match state.routing.commit(&object, Mutation::Ops { ops: Vec::new(), events }, replay).await? {
        Routed::Forwarded(forwarded) => return Ok(forwarded.into_response()),
        Routed::Local(committed) => committed,
    };
    let recorded = EventsRecorded { version: committed.version, event_ids };
    Ok(written(&committed, StatusCode::OK, recorded))
}
