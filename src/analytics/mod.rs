//! Analytics: every committed change and application event, exported exactly
//! once from the outbox into Apache Iceberg tables (`statehouse.events`,
//! `statehouse.changes`) of Parquet files in the warehouse (`warehouse/` in
//! the object store), with the catalog kept in our own libSQL database.

mod catalog;
mod exporter;
pub mod history;
pub mod readers;
mod storage;
mod tables;

pub use catalog::{LibsqlCatalog, CATALOG_NAME, OUTBOX_THROUGH};
pub use exporter::{
    compact, last_compaction, singleton, CommittedSnapshot, CompactionError, CompactionInfo, CompactionPolicy,
    CycleReport, ExportError, ExportPolicy, Exporter, TableInfo,
};
pub use storage::WarehouseStorage;
pub use tables::{ExportTable, NAMESPACE};
