//! The OpenAPI document, generated from the handlers' annotations.

use std::sync::OnceLock;

use utoipa::OpenApi;

use super::{analytics, blobs, events, kv, objects, ops, Problem};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Statehouse",
        description = "Durable-Object-style state: per-object transactional key-value storage with fenced single writers."
    ),
    paths(
        kv::put_key,
        kv::get_key,
        kv::delete_key,
        kv::list_keys,
        kv::batch,
        events::post_events,
        objects::get_object,
        objects::delete_object,
        objects::list_objects,
        blobs::put_blob,
        blobs::get_blob,
        blobs::delete_blob,
        blobs::list_blobs,
        blobs::post_blob_action,
        analytics::export_now,
        analytics::list_tables,
        ops::healthz,
        ops::readyz,
        ops::metrics,
        ops::openapi,
    ),
    components(schemas(Problem))
)]
struct ApiDoc;

pub fn openapi_json() -> &'static str {
    static DOC: OnceLock<String> = OnceLock::new();
    DOC.get_or_init(|| ApiDoc::openapi().to_pretty_json().expect("the OpenAPI document serialises"))
}
