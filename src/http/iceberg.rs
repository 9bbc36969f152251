//! The Apache Iceberg REST catalog protocol at `/iceberg`, read-only, so that
//! DuckDB (`ATTACH ... (TYPE iceberg)`), PyIceberg's `RestCatalog`, Spark and
//! Trino reach the exported tables in one line, whatever database Statehouse
//! runs on. The exporter stays their only writer: every write operation of
//! the protocol is answered with its read-only error. Errors here take the
//! protocol's shape (`{"error": {message, type, code}}`), not problem+json.

use std::collections::HashMap;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use iceberg::{ErrorKind, NamespaceIdent, TableIdent};
use iceberg_catalog_rest::{ListNamespaceResponse, ListTablesResponse, NamespaceResponse};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use utoipa::{IntoParams, ToSchema};

use super::extract::{none_match, ApiPath, ApiQuery};
use super::SharedState;
use crate::analytics::readers::{self, WAREHOUSE};
use crate::analytics::NAMESPACE;

/// Where the catalog is mounted; its clients' `uri`/`ENDPOINT`.
pub const MOUNT: &str = "/iceberg";

/// The operations this catalog serves, in the protocol's notation (clients
/// that read the list call nothing else).
const ENDPOINTS: [&str; 6] = [
    "GET /v1/{prefix}/namespaces",
    "GET /v1/{prefix}/namespaces/{namespace}",
    "HEAD /v1/{prefix}/namespaces/{namespace}",
    "GET /v1/{prefix}/namespaces/{namespace}/tables",
    "GET /v1/{prefix}/namespaces/{namespace}/tables/{table}",
    "HEAD /v1/{prefix}/namespaces/{namespace}/tables/{table}",
];

/// An error in the protocol's model. Handlers build the specific ones; the
/// [`error_model`] layer turns every other refusal on these routes (access,
/// timeouts, unknown routes) into one.
#[derive(Debug)]
pub struct IcebergError {
    status: StatusCode,
    kind: &'static str,
    message: String,
    retry_after_secs: Option<u64>,
}

/// The protocol's error document. (`iceberg_catalog_rest::ErrorResponse`
/// cannot be built outside its crate, and this one also describes itself.)
#[derive(Serialize, ToSchema)]
pub struct IcebergErrorResponse {
    error: IcebergErrorModel,
}

#[derive(Serialize, ToSchema)]
pub struct IcebergErrorModel {
    message: String,
    /// The exception's name, e.g. `NoSuchTableException`.
    #[serde(rename = "type")]
    kind: String,
    code: u16,
}

impl IcebergErrorResponse {
    fn new(status: StatusCode, kind: &str, message: String) -> IcebergErrorResponse {
        IcebergErrorResponse { error: IcebergErrorModel { message, kind: kind.to_string(), code: status.as_u16() } }
    }
}

impl IcebergError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> IcebergError {
        IcebergError { status, kind, message: message.into(), retry_after_secs: None }
    }

    fn no_such_namespace(namespace: &str) -> IcebergError {
        IcebergError::new(
            StatusCode::NOT_FOUND,
            "NoSuchNamespaceException",
            format!("no namespace {namespace:?}: this catalog has one, `{NAMESPACE}`"),
        )
    }

    fn no_such_table(namespace: &str, table: &str) -> IcebergError {
        IcebergError::new(
            StatusCode::NOT_FOUND,
            "NoSuchTableException",
            format!(
                "no table {namespace}.{table}: the tables are {NAMESPACE}.events and {NAMESPACE}.changes, \
                 from the exporter's first cycle on"
            ),
        )
    }

    fn bad_request(message: impl Into<String>) -> IcebergError {
        IcebergError::new(StatusCode::BAD_REQUEST, "BadRequestException", message)
    }

    /// The exception name a status stands for, for refusals made before a handler ran.
    fn kind_of(status: StatusCode) -> &'static str {
        match status.as_u16() {
            400 | 413 => "BadRequestException",
            401 => "NotAuthorizedException",
            403 => "ForbiddenException",
            404 => "NotFoundException",
            405 | 406 => "UnsupportedOperationException",
            429 => "TooManyRequestsException",
            503 => "ServiceUnavailableException",
            _ if status.is_server_error() => "InternalServerError",
            _ => "RESTException",
        }
    }
}

impl From<iceberg::Error> for IcebergError {
    fn from(err: iceberg::Error) -> Self {
        tracing::warn!(error = %err, "the Iceberg catalog could not load a table");
        match err.kind() {
            // The database or the object store did not answer: try again.
            ErrorKind::Unexpected => IcebergError {
                retry_after_secs: Some(1),
                ..IcebergError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "ServiceUnavailableException",
                    "the catalog's database or the object store did not answer; retry later",
                )
            },
            _ => IcebergError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "InternalServerError",
                "a table's metadata could not be read; see the server's log",
            ),
        }
    }
}

impl IntoResponse for IcebergError {
    fn into_response(self) -> Response {
        let body = IcebergErrorResponse::new(self.status, self.kind, self.message);
        let mut response = (self.status, Json(body)).into_response();
        if let Some(secs) = self.retry_after_secs {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

/// Rewrites every other error answer on the catalog's routes (access, rate
/// limits, timeouts, unknown routes: problem+json; anything else a layer may
/// answer in plain text) into the protocol's error model, keeping status and
/// headers.
pub async fn error_model(req: Request, next: Next) -> Response {
    let path = req.uri().path();
    if path != MOUNT && !path.starts_with("/iceberg/") {
        return next.run(req).await;
    }
    let response = next.run(req).await;
    let content_type = response.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    let is_problem = content_type == "application/problem+json";
    let already = content_type == "application/json" || response.status() == StatusCode::NOT_MODIFIED;
    if !(response.status().is_client_error() || response.status().is_server_error()) || already {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    let text = axum::body::to_bytes(body, 64 * 1024).await.unwrap_or_default();
    let message = if is_problem {
        serde_json::from_slice::<serde_json::Value>(&text)
            .ok()
            .and_then(|problem| problem["detail"].as_str().map(str::to_string))
            .unwrap_or_default()
    } else {
        String::from_utf8_lossy(&text).trim().to_string()
    };
    let body = IcebergErrorResponse::new(parts.status, IcebergError::kind_of(parts.status), message);
    parts.headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    parts.headers.remove(header::CONTENT_LENGTH);
    Response::from_parts(parts, Body::from(serde_json::to_vec(&body).expect("an error model serialises")))
}

/// The catalog's configuration for a client: the path prefix to use, and
/// what it serves.
#[derive(Serialize, ToSchema)]
pub struct CatalogConfig {
    defaults: HashMap<String, String>,
    overrides: HashMap<String, String>,
    endpoints: Vec<&'static str>,
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ConfigQuery {
    /// The warehouse to attach: `statehouse` (or the warehouse's location); optional.
    warehouse: Option<String>,
}

/// Iceberg REST catalog: configuration (`GET /v1/config`), the first call of every client.
#[utoipa::path(get, path = "/iceberg/v1/config", tag = "iceberg", operation_id = "iceberg_config", params(ConfigQuery),
    responses((status = 200, body = CatalogConfig, description = "defaults, overrides (the path prefix) and endpoints"),
              (status = 400, body = IcebergErrorResponse, description = "an unknown warehouse")))]
pub async fn config(
    State(state): State<SharedState>,
    ApiQuery(query): ApiQuery<ConfigQuery>,
) -> Result<Response, IcebergError> {
    if let Some(warehouse) = query.warehouse.filter(|w| !w.is_empty()) {
        if warehouse != WAREHOUSE && warehouse != state.exporter.catalog().warehouse() {
            return Err(IcebergError::bad_request(format!(
                "no warehouse {warehouse:?}: this server has one, `{WAREHOUSE}`"
            )));
        }
    }
    Ok(Json(CatalogConfig {
        defaults: HashMap::new(),
        overrides: HashMap::from([("prefix".to_string(), WAREHOUSE.to_string())]),
        endpoints: ENDPOINTS.to_vec(),
    })
    .into_response())
}

fn check_prefix(prefix: &str) -> Result<(), IcebergError> {
    if prefix == WAREHOUSE {
        return Ok(());
    }
    Err(IcebergError::new(
        StatusCode::NOT_FOUND,
        "NoSuchWarehouseException",
        format!("no warehouse {prefix:?}: this server has one, `{WAREHOUSE}` (GET /iceberg/v1/config)"),
    ))
}

/// A namespace path parameter (levels joined by the unit separator), if it names ours.
fn check_namespace(namespace: &str) -> Result<NamespaceIdent, IcebergError> {
    if namespace == NAMESPACE {
        return Ok(NamespaceIdent::new(NAMESPACE.to_string()));
    }
    Err(IcebergError::no_such_namespace(&namespace.replace('\u{1f}', ".")))
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListNamespacesQuery {
    /// List the namespaces under this one (levels joined by %1F).
    parent: Option<String>,
}

/// Iceberg REST catalog: list namespaces (there is one, `statehouse`).
#[utoipa::path(get, path = "/iceberg/v1/{prefix}/namespaces", tag = "iceberg", operation_id = "iceberg_list_namespaces",
    params(("prefix" = String, Path, description = "the warehouse: statehouse"), ListNamespacesQuery),
    responses((status = 200, body = Object, description = "ListNamespacesResponse: {namespaces, next-page-token}"),
              (status = 404, body = IcebergErrorResponse, description = "no such warehouse or parent namespace")))]
pub async fn list_namespaces(
    ApiPath(prefix): ApiPath<String>,
    ApiQuery(query): ApiQuery<ListNamespacesQuery>,
) -> Result<Response, IcebergError> {
    check_prefix(&prefix)?;
    let namespaces = match query.parent.filter(|p| !p.is_empty()) {
        None => vec![NamespaceIdent::new(NAMESPACE.to_string())],
        Some(parent) => {
            check_namespace(&parent)?;
            Vec::new()
        }
    };
    Ok(Json(ListNamespaceResponse { namespaces, next_page_token: None }).into_response())
}

/// Iceberg REST catalog: a namespace and its properties.
#[utoipa::path(get, path = "/iceberg/v1/{prefix}/namespaces/{namespace}", tag = "iceberg", operation_id = "iceberg_get_namespace",
    params(("prefix" = String, Path, description = "the warehouse: statehouse"),
           ("namespace" = String, Path, description = "the namespace: statehouse")),
    responses((status = 200, body = Object, description = "GetNamespaceResponse: {namespace, properties}"),
              (status = 404, body = IcebergErrorResponse, description = "no such warehouse or namespace")))]
pub async fn get_namespace(
    State(state): State<SharedState>,
    ApiPath((prefix, namespace)): ApiPath<(String, String)>,
) -> Result<Response, IcebergError> {
    check_prefix(&prefix)?;
    let namespace = check_namespace(&namespace)?;
    let location = format!("{}/{NAMESPACE}", state.exporter.catalog().warehouse());
    let properties = HashMap::from([
        ("location".to_string(), location),
        ("comment".to_string(), "Statehouse's exported changes and events (read-only)".to_string()),
    ]);
    Ok(Json(NamespaceResponse { namespace, properties }).into_response())
}

/// Iceberg REST catalog: whether a namespace exists (204 or 404, no body).
#[utoipa::path(head, path = "/iceberg/v1/{prefix}/namespaces/{namespace}", tag = "iceberg", operation_id = "iceberg_namespace_exists",
    params(("prefix" = String, Path, description = "the warehouse: statehouse"),
           ("namespace" = String, Path, description = "the namespace: statehouse")),
    responses((status = 204, description = "the namespace exists"),
              (status = 404, description = "no such warehouse or namespace")))]
pub async fn namespace_exists(ApiPath((prefix, namespace)): ApiPath<(String, String)>) -> StatusCode {
    match check_prefix(&prefix).and_then(|()| check_namespace(&namespace)) {
        Ok(_) => StatusCode::NO_CONTENT,
        Err(err) => err.status,
    }
}

/// Iceberg REST catalog: the tables of a namespace (those the exporter has created).
#[utoipa::path(get, path = "/iceberg/v1/{prefix}/namespaces/{namespace}/tables", tag = "iceberg", operation_id = "iceberg_list_tables",
    params(("prefix" = String, Path, description = "the warehouse: statehouse"),
           ("namespace" = String, Path, description = "the namespace: statehouse")),
    responses((status = 200, body = Object, description = "ListTablesResponse: {identifiers, next-page-token}"),
              (status = 404, body = IcebergErrorResponse, description = "no such warehouse or namespace")))]
pub async fn list_tables(
    State(state): State<SharedState>,
    ApiPath((prefix, namespace)): ApiPath<(String, String)>,
) -> Result<Response, IcebergError> {
    check_prefix(&prefix)?;
    let namespace = check_namespace(&namespace)?;
    let tables = readers::existing_tables(state.exporter.catalog()).await?;
    let identifiers =
        tables.into_iter().map(|table| TableIdent::new(namespace.clone(), table.name().to_string())).collect();
    Ok(Json(ListTablesResponse { identifiers, next_page_token: None }).into_response())
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct LoadTableQuery {
    /// `all` (the default) or `refs`; every snapshot kept is referenced, so both answer the same.
    #[param(pattern = "^(all|refs)$")]
    snapshots: Option<String>,
}

/// Iceberg REST catalog: load a table (its metadata location, full metadata,
/// and the storage settings a reader needs).
#[utoipa::path(get, path = "/iceberg/v1/{prefix}/namespaces/{namespace}/tables/{table}", tag = "iceberg", operation_id = "iceberg_load_table",
    params(("prefix" = String, Path, description = "the warehouse: statehouse"),
           ("namespace" = String, Path, description = "the namespace: statehouse"),
           ("table" = String, Path, description = "events or changes"),
           ("If-None-Match" = Option<String>, Header, description = "the ETag of a load: 304 while the table is unchanged"),
           LoadTableQuery),
    responses((status = 200, body = Object,
               description = "LoadTableResult: {metadata-location, metadata, config, storage-credentials}",
               headers(("ETag" = String, description = "names the committed metadata file"))),
              (status = 304, description = "the table has not changed since the ETag given"),
              (status = 404, body = IcebergErrorResponse, description = "no such warehouse, namespace or table")))]
pub async fn load_table(
    State(state): State<SharedState>,
    ApiPath((prefix, namespace, table)): ApiPath<(String, String, String)>,
    ApiQuery(query): ApiQuery<LoadTableQuery>,
    headers: HeaderMap,
) -> Result<Response, IcebergError> {
    check_prefix(&prefix)?;
    check_namespace(&namespace)?;
    if let Some(other) = query.snapshots.filter(|s| s != "all" && s != "refs") {
        return Err(IcebergError::bad_request(format!("snapshots must be `all` or `refs`, not {other:?}")));
    }
    let export_table = readers::export_table(&table).ok_or_else(|| IcebergError::no_such_table(&namespace, &table))?;
    let loaded = readers::load_table(state.exporter.catalog(), &state.readers, export_table)
        .await?
        .ok_or_else(|| IcebergError::no_such_table(&namespace, &table))?;
    let tag = metadata_tag(loaded.metadata_location.as_deref().unwrap_or_default());
    let unchanged = none_match(&headers, &tag).map_err(|err| IcebergError::bad_request(err.to_string()))?;
    let mut response = if unchanged { StatusCode::NOT_MODIFIED.into_response() } else { Json(loaded).into_response() };
    let etag = HeaderValue::from_str(&format!("\"{tag}\"")).expect("hex is a valid header");
    response.headers_mut().insert(header::ETAG, etag);
    Ok(response)
}

/// The entity-tag's opaque part: a metadata file is never rewritten, so its
/// location names its content.
fn metadata_tag(metadata_location: &str) -> String {
    hex::encode(&Sha256::digest(metadata_location.as_bytes())[..16])
}

/// Iceberg REST catalog: whether a table exists (204 or 404, no body).
#[utoipa::path(head, path = "/iceberg/v1/{prefix}/namespaces/{namespace}/tables/{table}", tag = "iceberg", operation_id = "iceberg_table_exists",
    params(("prefix" = String, Path, description = "the warehouse: statehouse"),
           ("namespace" = String, Path, description = "the namespace: statehouse"),
           ("table" = String, Path, description = "events or changes")),
    responses((status = 204, description = "the table exists"),
              (status = 404, description = "no such warehouse, namespace or table")))]
pub async fn table_exists(
    State(state): State<SharedState>,
    ApiPath((prefix, namespace, table)): ApiPath<(String, String, String)>,
) -> Result<StatusCode, IcebergError> {
    let found = check_prefix(&prefix).and_then(|()| check_namespace(&namespace)).is_ok()
        && match readers::export_table(&table) {
            Some(table) => readers::exists(state.exporter.catalog(), table).await?,
            None => false,
        };
    Ok(if found { StatusCode::NO_CONTENT } else { StatusCode::NOT_FOUND })
}

/// Every write operation of the protocol: the exporter is the tables' only writer.
pub async fn read_only() -> IcebergError {
    IcebergError::new(
        StatusCode::NOT_ACCEPTABLE,
        "UnsupportedOperationException",
        "the statehouse catalog is read-only: its tables are written only by Statehouse's exporter",
    )
}
