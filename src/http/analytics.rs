//! The analytics surface: run an export cycle now, and describe the Iceberg tables.

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

use super::error::{ApiError, Problem};
use super::SharedState;
use crate::analytics::readers::WAREHOUSE;
use crate::analytics::{CommittedSnapshot, ExportError, TableInfo, CATALOG_NAME};
use crate::db::StoreError;
use crate::routing::Replay;

#[derive(Serialize, ToSchema)]
pub struct ExportBody {
    /// True when there was nothing to export.
    nothing_to_do: bool,
    /// Snapshots this cycle committed, oldest first.
    snapshots: Vec<CommittedSnapshot>,
    expired_snapshots: usize,
    orphan_files_deleted: usize,
}

fn export_failed(err: ExportError) -> ApiError {
    match err {
        ExportError::Database(StoreError::Internal(detail)) => ApiError::Internal(detail),
        // The object store or the database is unavailable, or the lease moved
        // mid-cycle: nothing was published, the rows wait in the outbox.
        other => ApiError::unavailable(format!("the export cycle did not complete: {other}"), 1),
    }
}

/// Export the outbox to the Iceberg tables now (on the replica that is the exporter).
#[utoipa::path(post, path = "/v1/admin/export", tag = "analytics",
    responses((status = 200, body = ExportBody, description = "the snapshots committed, if any"),
              (status = 503, body = Problem)))]
pub async fn export_now(State(state): State<SharedState>, replay: Replay) -> Result<Response, ApiError> {
    if !state.settings.export_enabled {
        return Err(ApiError::Conflict(
            "exporting is disabled on this replica (STATEHOUSE_EXPORT_ENABLED=false); ask a replica that exports"
                .into(),
        ));
    }
    match state.exporter.run_cycle_now().await {
        Ok(report) => Ok(axum::Json(ExportBody {
            nothing_to_do: report.snapshots.is_empty(),
            snapshots: report.snapshots,
            expired_snapshots: report.expired_snapshots,
            orphan_files_deleted: report.orphan_files_deleted,
        })
        .into_response()),
        Err(ExportError::NotOwner(owner)) => Ok(state.routing.forward(&owner, replay).await.into_response()),
        Err(err) => Err(export_failed(err)),
    }
}

#[derive(Serialize, ToSchema)]
pub struct TablesBody {
    /// The Iceberg catalog name (for PyIceberg's `SqlCatalog`).
    catalog: &'static str,
    /// Where the tables live: a folder or `s3://bucket/warehouse`.
    warehouse: String,
    /// The Iceberg REST catalog that serves these tables to DuckDB, PyIceberg, Spark and Trino.
    rest_catalog: RestCatalogInfo,
    tables: Vec<TableInfo>,
}

#[derive(Serialize, ToSchema)]
pub struct RestCatalogInfo {
    /// The catalog's path on this server: its URI is this server's base URL plus this path.
    path: &'static str,
    /// The warehouse name to attach.
    warehouse: &'static str,
}

/// The exported Iceberg tables: current snapshot, rows, files, metadata location.
#[utoipa::path(get, path = "/v1/analytics/tables", tag = "analytics",
    responses((status = 200, body = TablesBody), (status = 503, body = Problem)))]
pub async fn list_tables(State(state): State<SharedState>) -> Result<Response, ApiError> {
    let tables = state.exporter.describe().await.map_err(export_failed)?;
    Ok(axum::Json(TablesBody {
        catalog: CATALOG_NAME,
        warehouse: state.exporter.catalog().warehouse().to_string(),
        rest_catalog: RestCatalogInfo { path: super::iceberg::MOUNT, warehouse: WAREHOUSE },
        tables,
    })
    .into_response())
}
