//! The tables as the Iceberg REST catalog serves them to analysts' engines
//! (DuckDB, PyIceberg, Spark, Trino): read-only, each load a committed
//! snapshot, with what a reader needs to open the files itself.
//!
//! A load reads the table's pointer once and then the metadata file it names.
//! The exporter writes a metadata file in full before it moves the pointer,
//! and old metadata files outlive the orphan grace, so a load during an export
//! cycle answers the old snapshot or the new one, never a file in the making.

use std::collections::HashMap;

use iceberg::{Result, TableIdent};
use iceberg_catalog_rest::{LoadTableResult, StorageCredential};

use super::catalog::LibsqlCatalog;
use super::tables::{ExportTable, NAMESPACE};
use crate::config::Settings;

/// The one warehouse the catalog serves; also the path prefix it tells clients to use.
pub const WAREHOUSE: &str = NAMESPACE;

/// Storage settings every table load carries: where the bucket is, and the
/// read-only keys an operator chose to hand out, if any.
#[derive(Debug, Clone, Default)]
pub struct ReaderAccess {
    /// FileIO properties in Iceberg's names (`s3.endpoint`, ...), as PyIceberg and DuckDB read them.
    config: HashMap<String, String>,
    /// The vended keys, for clients that read `storage-credentials` first.
    credentials: Option<StorageCredential>,
}

impl ReaderAccess {
    /// Nothing for a local folder (readers open the paths as they are); the
    /// endpoint, region and path style for an S3-compatible store.
    pub fn from_settings(settings: &Settings, warehouse: &str) -> ReaderAccess {
        let store = &settings.objects;
        let readers = &settings.iceberg_readers;
        let Some(endpoint) = readers.s3_endpoint.as_ref().or(store.r2_endpoint.as_ref()) else {
            return ReaderAccess::default();
        };
        let mut config = HashMap::from([
            ("s3.endpoint".to_string(), endpoint.clone()),
            ("s3.region".to_string(), store.r2_region.clone()),
            ("client.region".to_string(), store.r2_region.clone()),
            // The server addresses its bucket path-style (R2, MinIO and most S3-compatible stores want it).
            ("s3.path-style-access".to_string(), "true".to_string()),
        ]);
        let mut credentials = None;
        if let (Some(id), Some(secret)) = (&readers.access_key_id, &readers.secret_access_key) {
            config.insert("s3.access-key-id".to_string(), id.expose().to_string());
            config.insert("s3.secret-access-key".to_string(), secret.expose().to_string());
            credentials = Some(StorageCredential { prefix: warehouse.to_string(), config: config.clone() });
        }
        ReaderAccess { config, credentials }
    }

    /// Whether loads hand out keys (logged at start, so an operator sees it).
    pub fn vends_credentials(&self) -> bool {
        self.credentials.is_some()
    }
}

/// The export table called `name`, if there is one by that name.
pub fn export_table(name: &str) -> Option<ExportTable> {
    ExportTable::ALL.into_iter().find(|table| table.name() == name)
}

/// The table's current committed metadata, or None before the exporter first created it.
pub async fn load_table(
    catalog: &LibsqlCatalog,
    access: &ReaderAccess,
    table: ExportTable,
) -> Result<Option<LoadTableResult>> {
    let ident = TableIdent::from_strs([NAMESPACE, table.name()])?;
    let Some(loaded) = catalog.load_existing(&ident).await? else { return Ok(None) };
    Ok(Some(LoadTableResult {
        metadata_location: Some(loaded.metadata_location_result()?.to_string()),
        metadata: loaded.metadata().clone(),
        config: access.config.clone(),
        storage_credentials: access.credentials.clone().map(|c| vec![c]),
    }))
}

/// Whether the exporter has created `table` yet.
pub async fn exists(catalog: &LibsqlCatalog, table: ExportTable) -> Result<bool> {
    Ok(catalog.pointer(&TableIdent::from_strs([NAMESPACE, table.name()])?).await?.is_some())
}

/// The tables that exist now, in a fixed order.
pub async fn existing_tables(catalog: &LibsqlCatalog) -> Result<Vec<ExportTable>> {
    let mut tables = Vec::new();
    for table in ExportTable::ALL {
        if exists(catalog, table).await? {
            tables.push(table);
        }
    }
    Ok(tables)
}
