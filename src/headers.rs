//! Statehouse's own HTTP headers, the same to clients and between replicas.

use axum::http::HeaderName;

/// Names a request in the logs and in its answer; a client's own value is kept.
pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
/// The replica that answered.
pub const INSTANCE: HeaderName = HeaderName::from_static("statehouse-instance");
/// The fence a write committed under.
pub const FENCE: HeaderName = HeaderName::from_static("statehouse-fence");
/// Marks a request one replica forwarded to the owner (value: the forwarder's id).
pub const FORWARDED_BY: HeaderName = HeaderName::from_static("statehouse-forwarded-by");
/// On a refused second hop: the request was certainly not applied (the lease
/// moved while it travelled), so the replica that forwarded it may route again.
pub const NOT_APPLIED: HeaderName = HeaderName::from_static("statehouse-not-applied");
/// The replica that relayed an owner's answer.
pub const VIA: HeaderName = HeaderName::from_static("statehouse-via");
