//! Every route of the API in one list: its path, the handlers that serve it
//! (whose annotations are its operations in the OpenAPI document), what a
//! caller needs, and the largest body it reads. The router, the document
//! and the access table are all built from this list, so none of them can
//! name a route the others lack.

use std::collections::HashMap;
use std::sync::OnceLock;

use axum::handler::Handler;
use axum::http::Method;
use axum::routing::{MethodFilter, MethodRouter};
use axum::Router;
use utoipa::openapi::path::PathItem;
use utoipa::openapi::OpenApi;
use utoipa_axum::router::UtoipaMethodRouter;
use utoipa_axum::routes;

use super::access::Need;
use super::{
    alarms, analytics, blobs, body_limit, events, iceberg, kv, objects, ops, restore, SharedState, SMALL_BODY_LIMIT,
};
use crate::auth::Right;

/// How large a body a route reads.
#[derive(Clone, Copy)]
enum Body {
    /// No body of its own (axum's default limit applies to what is read anyway).
    Unread,
    /// A small JSON document.
    Small,
    /// A value: `STATEHOUSE_MAX_VALUE_BYTES`.
    Value,
    /// A batch or events: `STATEHOUSE_MAX_BATCH_BYTES`.
    Batch,
    /// Streamed by its handler, which enforces `STATEHOUSE_MAX_BLOB_BYTES` itself.
    Streamed,
}

/// The body limits of this replica's settings.
#[derive(Clone, Copy)]
pub(super) struct BodyLimits {
    pub value: usize,
    pub batch: usize,
}

/// The list.
pub(super) fn route_list(limits: BodyLimits) -> RouteList {
    use Body::*;
    use Need::{Admin, Analytics, Namespace, Nothing, Peer};
    use Right::{Read, Write};
    const KEY: &str = "/v1/objects/{ns}/{id}/kv/{*key}";
    const BLOB: &str = "/v1/objects/{ns}/{id}/blobs/{*name}";
    const ALARM: &str = "/v1/objects/{ns}/{id}/alarms/{*name}";
    const ICEBERG_NAMESPACE: &str = "/iceberg/v1/{prefix}/namespaces/{namespace}";
    const ICEBERG_TABLES: &str = "/iceberg/v1/{prefix}/namespaces/{namespace}/tables";
    const ICEBERG_TABLE: &str = "/iceberg/v1/{prefix}/namespaces/{namespace}/tables/{table}";
    RouteList::new(limits)
        .add("/v1/objects/{ns}", Namespace(Read), Unread, routes!(objects::list_objects))
        .add("/v1/objects/{ns}/{id}", Namespace(Read), Unread, routes!(objects::get_object))
        .add("/v1/objects/{ns}/{id}", Namespace(Write), Unread, routes!(objects::delete_object))
        .add("/v1/objects/{ns}/{id}/history", Namespace(Read), Unread, routes!(objects::get_history))
        .add("/v1/objects/{ns}/{id}/restore", Namespace(Write), Small, routes!(restore::restore))
        .add("/v1/objects/{ns}/{id}/kv", Namespace(Read), Unread, routes!(kv::list_keys))
        .add(KEY, Namespace(Read), Unread, routes!(kv::get_key))
        .add(KEY, Namespace(Write), Value, routes!(kv::put_key, kv::delete_key))
        .add("/v1/objects/{ns}/{id}/batch", Namespace(Write), Batch, routes!(kv::batch))
        .add("/v1/objects/{ns}/{id}/events", Namespace(Write), Batch, routes!(events::post_events))
        .add("/v1/objects/{ns}/{id}/alarms", Namespace(Read), Unread, routes!(alarms::list_alarms))
        .add(ALARM, Namespace(Read), Unread, routes!(alarms::get_alarm))
        .add(ALARM, Namespace(Write), Small, routes!(alarms::put_alarm, alarms::delete_alarm))
        .add("/v1/objects/{ns}/{id}/blobs", Namespace(Read), Unread, routes!(blobs::list_blobs))
        .add(BLOB, Namespace(Read), Unread, routes!(blobs::get_blob))
        .add(BLOB, Namespace(Write), Streamed, routes!(blobs::put_blob, blobs::delete_blob))
        // Blob names hold slashes, so one handler takes every POST under a blob
        // path (`.../presign`, `.../commit`); the commit has its own operation.
        .add(
            BLOB,
            Namespace(Write),
            Small,
            also_documents::<blobs::__path_commit_presigned_route>(routes!(blobs::post_blob_action)),
        )
        .undocumented(
            "/v1/internal/objects/{ns}/{id}/blob-commit",
            Peer(Write),
            Small,
            &[Method::POST],
            blobs::commit_forwarded_blob,
        )
        .add("/v1/admin/export", Admin, Small, routes!(analytics::export_now))
        .add("/v1/alarms", Admin, Unread, routes!(alarms::pending_alarms))
        .add("/v1/analytics/tables", Analytics, Unread, routes!(analytics::list_tables))
        .add("/iceberg/v1/config", Analytics, Unread, routes!(iceberg::config))
        .add("/iceberg/v1/{prefix}/namespaces", Analytics, Unread, routes!(iceberg::list_namespaces))
        .add(ICEBERG_NAMESPACE, Analytics, Unread, routes!(iceberg::get_namespace, iceberg::namespace_exists))
        .add(ICEBERG_TABLES, Analytics, Unread, routes!(iceberg::list_tables))
        .add(ICEBERG_TABLE, Analytics, Unread, routes!(iceberg::load_table, iceberg::table_exists))
        // The protocol's write operations: answered 406, the catalog is read-only.
        .undocumented("/iceberg/v1/{prefix}/namespaces", Analytics, Small, &[Method::POST], iceberg::read_only)
        .undocumented(ICEBERG_NAMESPACE, Analytics, Small, &[Method::DELETE], iceberg::read_only)
        .undocumented(
            "/iceberg/v1/{prefix}/namespaces/{namespace}/properties",
            Analytics,
            Small,
            &[Method::POST],
            iceberg::read_only,
        )
        .undocumented(
            "/iceberg/v1/{prefix}/namespaces/{namespace}/register",
            Analytics,
            Small,
            &[Method::POST],
            iceberg::read_only,
        )
        .undocumented(ICEBERG_TABLES, Analytics, Small, &[Method::POST], iceberg::read_only)
        .undocumented(ICEBERG_TABLE, Analytics, Small, &[Method::POST, Method::DELETE], iceberg::read_only)
        .undocumented("/iceberg/v1/{prefix}/tables/rename", Analytics, Small, &[Method::POST], iceberg::read_only)
        .undocumented("/iceberg/v1/{prefix}/transactions/commit", Analytics, Small, &[Method::POST], iceberg::read_only)
        .add("/healthz", Nothing, Unread, routes!(ops::healthz))
        .add("/readyz", Nothing, Unread, routes!(ops::readyz))
        .add("/metrics", Admin, Unread, routes!(ops::metrics))
        .add("/openapi.json", Nothing, Unread, routes!(ops::openapi))
}

/// The router, the document and the access table, as the list builds them.
pub(super) struct RouteList {
    limits: BodyLimits,
    router: Router<SharedState>,
    doc: OpenApi,
    /// What a caller needs, by route (as the router names it, and as the
    /// document does) and method.
    needs: AccessTable,
}

/// What a caller needs, by route and method.
type AccessTable = HashMap<String, Vec<(Method, Need)>>;

impl RouteList {
    fn new(limits: BodyLimits) -> RouteList {
        RouteList { limits, router: Router::new(), doc: super::openapi::base(), needs: HashMap::new() }
    }

    /// Routes `path` to the handlers of `route` and adds their operations to the document.
    fn add(mut self, path: &str, need: Need, body: Body, route: UtoipaMethodRouter<SharedState>) -> RouteList {
        let (schemas, paths, handlers) = route;
        let template = document_template(path);
        for (documented, mut item) in paths.paths {
            // A wildcard's handler may take routes below it (blob actions).
            let below_wildcard = path.contains("{*") && documented.starts_with(&format!("{template}/"));
            assert!(documented == template || below_wildcard, "{documented} is documented but routed as {path}");
            for method in methods(&mut item) {
                self.grant(path, method.clone(), need);
                if documented != path {
                    self.grant(&documented, method, need);
                }
            }
            match self.doc.paths.paths.get_mut(&documented) {
                Some(existing) => existing.merge_operations(item),
                None => {
                    self.doc.paths.paths.insert(documented, item);
                }
            }
        }
        let components = self.doc.components.get_or_insert_with(Default::default);
        for (name, schema) in schemas {
            // The document names schemas by type name alone: two types of one
            // name would silently describe one route with the other's fields.
            if let Some(known) = components.schemas.get(&name) {
                let same = serde_json::to_value(known).ok() == serde_json::to_value(&schema).ok();
                assert!(same, "two different types are named {name} in the OpenAPI document; rename one");
            }
            components.schemas.insert(name, schema);
        }
        let handlers = self.limited(handlers, body);
        self.router = self.router.route(path, handlers);
        self
    }

    /// Routes `path` to a handler that the document does not describe: the
    /// peers' own route, and the refusals of the Iceberg protocol's writes.
    fn undocumented<H, T>(mut self, path: &str, need: Need, body: Body, methods: &[Method], handler: H) -> RouteList
    where
        H: Handler<T, SharedState>,
        T: 'static,
    {
        let mut handlers = MethodRouter::new();
        for method in methods {
            self.grant(path, method.clone(), need);
            let filter = MethodFilter::try_from(method.clone()).expect("the list names only routable methods");
            handlers = handlers.on(filter, handler.clone());
        }
        let handlers = self.limited(handlers, body);
        self.router = self.router.route(path, handlers);
        self
    }

    fn grant(&mut self, path: &str, method: Method, need: Need) {
        // One handler may serve several documented operations (blob actions),
        // each granted on the handler's route; the router refuses a route
        // listed twice.
        let granted = self.needs.entry(path.to_string()).or_default();
        match granted.iter().find(|(m, _)| *m == method) {
            Some((_, granted)) => assert_eq!(*granted, need, "{method} {path} is listed with two different needs"),
            None => granted.push((method, need)),
        }
    }

    fn limited(&self, handlers: MethodRouter<SharedState>, body: Body) -> MethodRouter<SharedState> {
        match body {
            Body::Unread | Body::Streamed => handlers,
            Body::Small => body_limit(handlers, SMALL_BODY_LIMIT),
            Body::Value => body_limit(handlers, self.limits.value),
            Body::Batch => body_limit(handlers, self.limits.batch),
        }
    }

    /// The router of every route in the list.
    pub(super) fn into_router(self) -> Router<SharedState> {
        self.router
    }
}

/// What a caller needs for `method` on `route` (a route of the router or
/// of the document); `None` for a route not in the list.
pub fn need(method: &Method, route: &str) -> Option<Need> {
    let granted = access_table().get(route)?;
    let find = |method: &Method| granted.iter().find(|(m, _)| m == method).map(|(_, need)| *need);
    // The router answers HEAD with the GET handler where no HEAD handler is listed.
    find(method).or_else(|| (*method == Method::HEAD).then(|| find(&Method::GET)).flatten())
}

/// The access table and the (uncompleted) document, from one build of the
/// list; neither depends on the body limits.
fn described() -> &'static (AccessTable, OpenApi) {
    static DESCRIBED: OnceLock<(AccessTable, OpenApi)> = OnceLock::new();
    DESCRIBED.get_or_init(|| {
        let list = route_list(BodyLimits { value: 0, batch: 0 });
        (list.needs, list.doc)
    })
}

fn access_table() -> &'static AccessTable {
    &described().0
}

/// The OpenAPI document of every route in the list.
pub fn document() -> OpenApi {
    let mut doc = described().1.clone();
    super::openapi::complete(&mut doc, need);
    doc
}

/// `{*key}` is how the router names a wildcard segment, `{key}` how the document does.
fn document_template(path: &str) -> String {
    path.replace("{*", "{")
}

fn methods(item: &mut PathItem) -> Vec<Method> {
    let operations = super::openapi::operations(item);
    operations.into_iter().filter(|(_, operation)| operation.is_some()).map(|(method, _)| method).collect()
}

/// Adds the operation `P` declares to a route whose handler serves it too.
/// (What `routes!` does for a handler, which this is not.)
fn also_documents<P>(
    (mut schemas, mut paths, handlers): UtoipaMethodRouter<SharedState>,
) -> UtoipaMethodRouter<SharedState>
where
    P: utoipa::Path + utoipa::__dev::SchemaReferences + for<'t> utoipa::__dev::Tags<'t>,
{
    let mut operation = P::operation();
    operation.tags.get_or_insert_with(Vec::new).extend(P::tags().into_iter().map(str::to_string));
    paths.add_path_operation(P::path(), P::methods(), operation);
    P::schemas(&mut schemas);
    (schemas, paths, handlers)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_documented_operation_and_every_undocumented_route_has_its_need() {
        let mut doc = document();
        for (path, item) in doc.paths.paths.iter_mut() {
            for method in methods(item) {
                assert!(need(&method, path).is_some(), "{method} {path} has no need");
            }
        }
        let key = "/v1/objects/{ns}/{id}/kv/{*key}";
        assert_eq!(need(&Method::HEAD, key), Some(Need::Namespace(Right::Read)));
        assert_eq!(need(&Method::PUT, key), Some(Need::Namespace(Right::Write)));
        assert_eq!(need(&Method::PATCH, key), None);
        let presign = "/v1/objects/{ns}/{id}/blobs/{name}/presign";
        assert_eq!(need(&Method::POST, presign), Some(Need::Namespace(Right::Write)));
        assert_eq!(need(&Method::POST, "/iceberg/v1/{prefix}/transactions/commit"), Some(Need::Analytics));
        assert_eq!(need(&Method::POST, "/v1/internal/objects/{ns}/{id}/blob-commit"), Some(Need::Peer(Right::Write)));
        assert!(!doc.paths.paths.contains_key("/v1/internal/objects/{ns}/{id}/blob-commit"));
        assert_eq!(need(&Method::GET, "/nowhere"), None);
    }
}
