//! Access control in one place: the table of what each route needs, and the
//! middleware that authenticates the caller, checks the grant, verifies a
//! peer's signature on forwarded writes and applies the caller's rate limit.
//! It runs before any extractor, so a refused request is never read or parsed.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::rejection::RawPathParamsRejection;
use axum::extract::{MatchedPath, RawPathParams, Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts};

use super::{ApiError, SharedState, FORWARDED_BY};
use crate::auth::{Authenticator, Caller, PeerKey, Right, PEER_SIGNATURE};
use crate::config::Settings;
use crate::limits::{Rate, RateLimiter};
use crate::telemetry::Metrics;

/// What a route needs from its caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// Health, readiness and the API description.
    Nothing,
    /// A right on the namespace in the path.
    Namespace(Right),
    /// The server-wide admin right.
    Admin,
    /// Reading the exported tables: the analytics right (or admin), server-wide.
    Analytics,
    /// A signed request from a peer replica, on behalf of a caller holding the right.
    Peer(Right),
}

/// Credentials, the peer key and the rate limiter of this replica.
pub struct Access {
    /// `None`: development mode, every caller is anonymous and allowed everything.
    pub authenticator: Option<Authenticator>,
    pub peer: Option<PeerKey>,
    /// Who every request is in development mode.
    anonymous: Arc<Caller>,
    limiter: RateLimiter,
    refused: IntCounterVec,
    rate_limited: IntCounter,
    pub connections_open: IntGauge,
}

impl Access {
    pub fn from_settings(settings: &Settings, metrics: &Metrics) -> Result<Access, String> {
        let access = &settings.access;
        let authenticator = Authenticator::from_settings(access)?;
        let peer = access.peer_secret.as_ref().map(|secret| PeerKey::from_secret(secret.expose())).transpose()?;
        if authenticator.is_some() && peer.is_none() {
            return Err("authentication is on, so replicas must sign the writes they forward to each other: \
                        set STATEHOUSE_PEER_SECRET (at least 32 bytes, the same on every replica)"
                .into());
        }
        let rate =
            (access.rate_limit_per_sec > 0).then(|| Rate::new(access.rate_limit_per_sec, access.rate_limit_burst));
        let refused = IntCounterVec::new(
            Opts::new("statehouse_access_refused_total", "Requests refused by access control, by reason"),
            &["reason"],
        )
        .expect("a valid metric");
        let rate_limited =
            IntCounter::new("statehouse_rate_limited_total", "Requests answered 429 by a caller's rate limit")
                .expect("a valid metric");
        let connections_open =
            IntGauge::new("statehouse_connections_open", "Client connections being served").expect("a valid metric");
        metrics.register(Box::new(refused.clone()));
        metrics.register(Box::new(rate_limited.clone()));
        metrics.register(Box::new(connections_open.clone()));
        Ok(Access {
            authenticator,
            peer,
            anonymous: Arc::new(Caller::anonymous()),
            limiter: RateLimiter::new(rate),
            refused,
            rate_limited,
            connections_open,
        })
    }

    fn refuse(&self, reason: &str, error: ApiError) -> ApiError {
        self.refused.with_label_values(&[reason]).inc();
        error
    }
}

pub async fn authorize(
    State(state): State<SharedState>,
    params: Result<RawPathParams, RawPathParamsRejection>,
    req: Request,
    next: Next,
) -> Response {
    match admit(&state, params, req).await {
        Ok(req) => next.run(req).await,
        Err(err) => err.into_response(),
    }
}

async fn admit(
    state: &SharedState,
    params: Result<RawPathParams, RawPathParamsRejection>,
    req: Request,
) -> Result<Request, ApiError> {
    let access = &state.access;
    let route = req.extensions().get::<MatchedPath>().map_or("", |p| p.as_str());
    let Some(need) = super::routes::need(req.method(), route) else {
        tracing::error!(route, method = %req.method(), "a route has no access rule; refusing it");
        return Err(ApiError::Forbidden("this route has no access rule".into()));
    };
    if need == Need::Nothing {
        return Ok(req);
    }
    let (req, from_peer) = verify_peer(state, req).await?;
    if matches!(need, Need::Peer(_)) && !from_peer {
        return Err(ApiError::NotFound("no such route; see /openapi.json".into()));
    }

    let caller = match &access.authenticator {
        None => access.anonymous.clone(),
        Some(authenticator) => authenticator
            .authenticate(req.headers().get(header::AUTHORIZATION))
            .map_err(|e| access.refuse(e.reason(), ApiError::Unauthorized(e.to_string())))?,
    };
    tracing::Span::current().record("caller", caller.name.as_str());

    let (right, ns) = match need {
        Need::Namespace(right) | Need::Peer(right) => {
            let params = params.map_err(|e| ApiError::BadRequest(format!("invalid path: {}", e.body_text())))?;
            let ns = params.iter().find(|(name, _)| *name == "ns").map(|(_, value)| value.to_string());
            (right, ns)
        }
        Need::Analytics => (Right::Analytics, None),
        Need::Admin | Need::Nothing => (Right::Admin, None),
    };
    if !caller.may(right, ns.as_deref()) {
        let scope = ns.map_or_else(|| "this server".to_string(), |ns| format!("namespace {ns:?}"));
        let detail = format!("{:?} is not granted {} on {scope}", caller.name, right.as_str());
        return Err(access.refuse("forbidden", ApiError::Forbidden(detail)));
    }

    // A forwarded write was counted where it arrived.
    if !from_peer {
        if let Err(wait) = access.limiter.check(&caller.name, caller.rate) {
            access.rate_limited.inc();
            return Err(ApiError::TooManyRequests {
                detail: format!("{:?} is over its rate limit; retry later", caller.name),
                retry_after_secs: wait.as_secs_f64().ceil().max(1.0) as u64,
            });
        }
    }
    Ok(req)
}

/// For a request marked as forwarded by a peer: checks the peer's signature
/// (reading the body it covers) and says whether it came from a peer.
async fn verify_peer(state: &SharedState, req: Request) -> Result<(Request, bool), ApiError> {
    let access = &state.access;
    let Some(from) = req.headers().get(FORWARDED_BY) else {
        return Ok((req, false));
    };
    let Some(key) = &access.peer else {
        if access.authenticator.is_some() {
            return Err(access.refuse("peer", ApiError::Unauthorized("forwarded requests must be signed".into())));
        }
        // Development mode: nothing to verify against.
        return Ok((req, true));
    };
    let from =
        from.to_str().map_err(|_| ApiError::BadRequest("statehouse-forwarded-by is not ASCII".into()))?.to_string();
    let (parts, body) = req.into_parts();
    let limit = state.settings.max_value_bytes.max(state.settings.max_batch_bytes) as usize;
    let body = axum::body::to_bytes(body, limit)
        .await
        .map_err(|_| ApiError::PayloadTooLarge(format!("a forwarded body was cut off or is over {limit} bytes")))?;
    let signed = crate::auth::Signed {
        method: &parts.method,
        path_and_query: parts.uri.path_and_query().map_or("/", |p| p.as_str()),
        forwarded_by: &from,
        authorization: parts.headers.get(header::AUTHORIZATION).map(|v| v.as_bytes()),
        body: &body,
    };
    key.verify(parts.headers.get(PEER_SIGNATURE), &signed, crate::clock::now_ms()).map_err(|why| {
        access.refuse("peer", ApiError::Unauthorized(format!("a forwarded request was refused: {why}")))
    })?;
    Ok((Request::from_parts(parts, Body::from(body)), true))
}
