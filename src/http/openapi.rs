//! The OpenAPI document, generated from the handlers' annotations, plus what
//! the handlers do not declare because every route shares it: bearer
//! authentication (as the access table requires it), the problem+json answers
//! of the layers around the handlers, and the grammar of namespaces and ids.

use std::sync::OnceLock;

use axum::http::Method;
use utoipa::openapi::path::{Operation, ParameterIn, PathItem};
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{Content, HeaderBuilder, ObjectBuilder, Ref, RefOr, Response, Type};
use utoipa::OpenApi;

use super::{iceberg, Need, Problem};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Statehouse",
        description = "Durable-Object-style state: per-object transactional key-value storage with fenced single writers."
    ),
    components(schemas(Problem, iceberg::IcebergErrorResponse)),
    tags((name = "iceberg", description = "The Apache Iceberg REST catalog protocol, read-only: point DuckDB, \
        PyIceberg, Spark or Trino at `<server>/iceberg` with warehouse `statehouse`. Its errors take the protocol's \
        shape, `{\"error\": {message, type, code}}`; every write operation of the protocol answers 406 \
        UnsupportedOperationException.")),
)]
struct ApiDoc;

/// What the document says before the route list adds its operations.
pub(super) fn base() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

pub fn openapi_json() -> &'static str {
    static DOC: OnceLock<String> = OnceLock::new();
    DOC.get_or_init(|| super::routes::document().to_pretty_json().expect("the OpenAPI document serialises"))
}

const BEARER: &str = "bearerAuth";

/// How a route family answers errors: problem+json, or the Iceberg REST protocol's error model.
struct ErrorShape {
    content_type: &'static str,
    schema: &'static str,
}

const PROBLEMS: ErrorShape =
    ErrorShape { content_type: "application/problem+json", schema: "#/components/schemas/Problem" };
const ICEBERG_ERRORS: ErrorShape =
    ErrorShape { content_type: "application/json", schema: "#/components/schemas/IcebergErrorResponse" };

/// Completes the document with what every route shares: bearer
/// authentication where `need` asks for a caller, and the error answers.
pub(super) fn complete(doc: &mut utoipa::openapi::OpenApi, need: impl Fn(&Method, &str) -> Option<Need>) {
    doc.components
        .get_or_insert_with(Default::default)
        .add_security_scheme(BEARER, SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)));
    doc.security = Some(vec![SecurityRequirement::new(BEARER, Vec::<String>::new())]);
    for (path, item) in doc.paths.paths.iter_mut() {
        let shape = if path.starts_with(iceberg::MOUNT) { &ICEBERG_ERRORS } else { &PROBLEMS };
        for (method, operation) in operations(item) {
            if let Some(operation) = operation {
                let open = need(&method, path) == Some(Need::Nothing);
                // Handlers of the other methods read the request body.
                let reads_body = !matches!(method, Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE);
                complete_operation(operation, open, reads_body, shape);
            }
        }
    }
}

/// A path's operations by method, each present or not.
pub(super) fn operations(item: &mut PathItem) -> [(Method, &mut Option<Operation>); 8] {
    [
        (Method::GET, &mut item.get),
        (Method::HEAD, &mut item.head),
        (Method::PUT, &mut item.put),
        (Method::POST, &mut item.post),
        (Method::DELETE, &mut item.delete),
        (Method::PATCH, &mut item.patch),
        (Method::OPTIONS, &mut item.options),
        (Method::TRACE, &mut item.trace),
    ]
}

/// Adds the error responses `operation` can give without its handler
/// saying so, and gives every error response its family's content type
/// (utoipa labels any body `application/json`).
fn complete_operation(operation: &mut Operation, open: bool, reads_body: bool, shape: &ErrorShape) {
    let mut statuses = vec![400, 429, 503];
    if open {
        // An empty list overrides the document's global requirement.
        operation.security = Some(Vec::new());
    } else {
        statuses.extend([401, 403]);
    }
    let mut has_path_params = false;
    for parameter in operation.parameters.iter_mut().flatten() {
        if matches!(parameter.parameter_in, ParameterIn::Path) {
            has_path_params = true;
            if let Some(pattern) = name_pattern(&parameter.name) {
                parameter.schema = Some(ObjectBuilder::new().schema_type(Type::String).pattern(Some(pattern)).into());
            }
        }
    }
    // An empty segment matches no route: the fallback answers 404.
    if has_path_params {
        statuses.push(404);
    }
    if reads_body {
        // Every write can be fenced (409) and every body has a size limit (413).
        statuses.extend([409, 413]);
    }
    for status in statuses {
        let status = status.to_string();
        let description = problem_description(&status);
        operation.responses.responses.entry(status).or_insert_with(|| {
            let mut response = Response::new(description);
            response.content.insert(shape.content_type.into(), Content::new(Some(Ref::new(shape.schema))));
            RefOr::T(response)
        });
    }
    for (status, response) in operation.responses.responses.iter_mut() {
        if let RefOr::T(response) = response {
            describe_error(status, response, shape);
        }
    }
}

/// The grammar of namespaces and object ids (objects::names), the same on
/// every route; `.` and `..` match the id pattern but are refused.
fn name_pattern(parameter: &str) -> Option<&'static str> {
    match parameter {
        "ns" => Some("^[a-z0-9][a-z0-9._-]{0,62}$"),
        "id" => Some("^[A-Za-z0-9._~-]{1,256}$"),
        _ => None,
    }
}

fn describe_error(status: &str, response: &mut Response, shape: &ErrorShape) {
    let is_error = |content: &Content| matches!(&content.schema, Some(RefOr::Ref(r)) if r.ref_location == shape.schema);
    if shape.content_type != "application/json" && response.content.get("application/json").is_some_and(is_error) {
        let content = response.content.shift_remove("application/json").expect("just found");
        response.content.insert(shape.content_type.into(), content);
    }
    if !response.content.get(shape.content_type).is_some_and(is_error) {
        return;
    }
    if response.description.is_empty() {
        response.description = problem_description(status).into();
    }
    let header = match status {
        "401" => Some(("WWW-Authenticate", Type::String, "the scheme to authenticate with: Bearer")),
        "429" | "503" => Some(("Retry-After", Type::Integer, "seconds to wait before retrying")),
        _ => None,
    };
    if let Some((name, kind, description)) = header {
        response.headers.entry(name.into()).or_insert_with(|| {
            HeaderBuilder::new().schema(ObjectBuilder::new().schema_type(kind)).description(Some(description)).build()
        });
    }
}

fn problem_description(status: &str) -> &'static str {
    match status {
        "400" => "invalid namespace, id, key, query, header or body",
        "401" => "missing or invalid credential",
        "403" => "the credential does not allow this namespace or operation",
        "404" => "no such object, key, blob or route",
        "409" => {
            "ownership of the object moved while the write was queued (retry it), or a conflict with the configuration"
        }
        "412" => "If-Match, If-None-Match, if_version or if_absent does not hold",
        "413" => "the body is larger than this route allows",
        "416" => "the range starts past the blob's end",
        "429" => "too many requests from this caller",
        "503" => "database, object store or owner replica unreachable or busy, or the request timed out",
        _ => "see the problem's type and detail",
    }
}
