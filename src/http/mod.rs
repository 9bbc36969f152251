//! The HTTP surface: a pure `app(state) -> Router` and its middleware.
//! Handlers parse a request, hand writes to `routing`, and format the answer.

mod access;
mod alarms;
mod analytics;
mod blobs;
mod error;
mod events;
mod extract;
mod forward;
mod iceberg;
mod kv;
mod objects;
mod openapi;
mod ops;
mod restore;
mod routes;

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::MethodRouter;
use axum::Router;
use tower::ServiceBuilder;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::cors::{AllowHeaders, AllowOrigin, CorsLayer};
use tower_http::request_id::{MakeRequestId, PropagateRequestIdLayer, RequestId, SetRequestIdLayer};
use tower_http::set_header::SetResponseHeaderLayer;
use tower_http::trace::{DefaultOnResponse, TraceLayer};
use tracing::Level;

pub use access::{Access, Need};
pub use error::{ApiError, Problem, PROBLEM_BASE};
pub use openapi::openapi_json;
pub use routes::need;

use crate::analytics::readers::ReaderAccess;
use crate::analytics::Exporter;
use crate::blobs::Storage;
use crate::config::Settings;
use crate::db::Database;
use crate::guard::Guard;
use crate::objects::Committed;
use crate::routing::Routing;
use crate::telemetry::Metrics;
use crate::writer::Writer;

pub use crate::headers::{FENCE, FORWARDED_BY, INSTANCE, REQUEST_ID};

pub struct AppState {
    pub settings: Settings,
    pub db: Arc<Database>,
    pub storage: Storage,
    pub writer: Writer,
    pub guard: Arc<Guard>,
    pub metrics: Arc<Metrics>,
    /// Commits a write here or hands it to the object's owner.
    pub routing: Routing,
    pub exporter: Arc<Exporter>,
    /// What the Iceberg REST catalog tells readers about the warehouse's storage.
    pub readers: ReaderAccess,
    pub access: Access,
    /// Where alarms may be delivered (setting one elsewhere is refused).
    pub alarms: Arc<crate::alarms::Alarms>,
}

pub type SharedState = Arc<AppState>;

pub fn app(state: SharedState) -> Router {
    let instance = HeaderValue::from_str(&state.guard.me().instance).expect("instance ids are header-safe");
    let timeout = state.settings.request_timeout;
    let cors = cors_layer(state.settings.access.cors_origins.as_deref());

    let limits = routes::BodyLimits {
        value: state.settings.max_value_bytes as usize,
        batch: state.settings.max_batch_bytes as usize,
    };
    let api = routes::route_list(limits)
        .into_router()
        .route_layer(middleware::from_fn_with_state(state.clone(), access::authorize))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(timeout, enforce_timeout))
        .layer(middleware::from_fn(iceberg::error_model))
        .layer(middleware::from_fn_with_state(state.clone(), record_metrics));

    api.layer(
        ServiceBuilder::new()
            .layer(SetRequestIdLayer::new(REQUEST_ID, NewRequestId))
            .layer(
                TraceLayer::new_for_http()
                    .make_span_with(|req: &Request| {
                        let request_id = req.headers().get(REQUEST_ID).and_then(|v| v.to_str().ok()).unwrap_or("");
                        tracing::info_span!(
                            "request",
                            method = %req.method(),
                            path = %req.uri().path(),
                            request_id,
                            caller = tracing::field::Empty
                        )
                    })
                    .on_request(())
                    .on_response(DefaultOnResponse::new().level(Level::INFO)),
            )
            .layer(PropagateRequestIdLayer::new(REQUEST_ID))
            .layer(SetResponseHeaderLayer::if_not_present(INSTANCE, instance))
            .layer(CatchPanicLayer::custom(|_| {
                ApiError::Internal("the request handler panicked".into()).into_response()
            }))
            // Outermost: a browser's preflight carries no credentials and must be answered before access control.
            .option_layer(cors),
    )
    .with_state(state)
}

/// CORS for `STATEHOUSE_CORS_ORIGINS` (`*` or a list of origins); `None` leaves it off.
fn cors_layer(origins: Option<&str>) -> Option<CorsLayer> {
    let origins = origins?.trim();
    let allow_origin = if origins == "*" {
        AllowOrigin::any()
    } else {
        // The setting was validated at start (config::parse_cors_origins).
        AllowOrigin::list(origins.split(',').filter_map(|o| HeaderValue::from_str(o.trim()).ok()))
    };
    Some(
        CorsLayer::new()
            .allow_origin(allow_origin)
            .allow_methods([Method::GET, Method::HEAD, Method::PUT, Method::POST, Method::DELETE])
            // Blob uploads carry their own x-statehouse-meta-* headers: allow what the preflight asks for.
            .allow_headers(AllowHeaders::mirror_request())
            .expose_headers([
                header::ETAG,
                header::RETRY_AFTER,
                header::CONTENT_RANGE,
                header::LOCATION,
                REQUEST_ID,
                INSTANCE,
                FENCE,
            ])
            .max_age(Duration::from_secs(600)),
    )
}

/// Bodies of the routes that take only a small JSON document.
const SMALL_BODY_LIMIT: usize = 64 * 1024;

/// A route's body limit: a body announced (Content-Length) over it is refused
/// at once, before anything is read; one without a length is cut off at it.
fn body_limit(route: MethodRouter<SharedState>, limit: usize) -> MethodRouter<SharedState> {
    route
        .layer::<_, std::convert::Infallible>(middleware::from_fn_with_state(limit, refuse_announced_oversize))
        .layer(DefaultBodyLimit::max(limit))
}

async fn refuse_announced_oversize(State(limit): State<usize>, req: Request, next: Next) -> Response {
    let announced = req.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if let Some(length) = announced.filter(|length| *length > limit as u64) {
        return ApiError::PayloadTooLarge(format!("the body is {length} bytes; this route takes at most {limit}"))
            .into_response();
    }
    next.run(req).await
}

#[derive(Clone)]
struct NewRequestId;

impl MakeRequestId for NewRequestId {
    fn make_request_id<B>(&mut self, _: &axum::http::Request<B>) -> Option<RequestId> {
        HeaderValue::from_str(&uuid::Uuid::now_v7().to_string()).ok().map(RequestId::new)
    }
}

async fn not_found() -> ApiError {
    ApiError::NotFound("no such route; see /openapi.json".into())
}

async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed("this route does not take that method; see /openapi.json".into())
}

async fn enforce_timeout(State(timeout): State<Duration>, req: Request, next: Next) -> Response {
    match tokio::time::timeout(timeout, next.run(req)).await {
        Ok(response) => response,
        // A write already queued may still commit: the client learns "unknown", never a false success.
        Err(_) => {
            ApiError::unavailable(format!("the request took longer than {} ms", timeout.as_millis()), 1).into_response()
        }
    }
}

async fn record_metrics(State(state): State<SharedState>, req: Request, next: Next) -> Response {
    let started = Instant::now();
    let route = req.extensions().get::<MatchedPath>().map_or("unmatched", |p| p.as_str()).to_string();
    let method = req.method().as_str().to_string();
    let response = next.run(req).await;
    state.metrics.http_requests.with_label_values(&[&route, &method, response.status().as_str()]).inc();
    state.metrics.http_duration.with_label_values(&[&route, &method]).observe(started.elapsed().as_secs_f64());
    response
}

/// A successful write's response: its JSON body, with the fence it committed under.
fn written(committed: &Committed, status: StatusCode, body: impl serde::Serialize) -> Response {
    let mut response = (status, axum::Json(body)).into_response();
    response.headers_mut().insert(FENCE, HeaderValue::from(committed.fence));
    response
}
