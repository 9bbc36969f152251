//! The exporter: moves outbox rows into the Iceberg tables exactly once.
//!
//! One replica exports at a time: the one holding the lease of the reserved
//! object `_system/exporter`. A cycle reads each table's outbox rows past the
//! last exported seq (bounded), writes them as partitioned zstd Parquet, and
//! appends a snapshot through the catalog, whose commit checks the fence and
//! moves the metadata pointer by compare-and-set; the snapshot names the last
//! seq it holds, and the next cycle reads past it. A crash or a lost lease at
//! any point leaves either the previous snapshot (its rows read again, the
//! written files orphaned) or the new one, never both or neither. Rows at or
//! below a table's seq are deleted after the cycle, in the background, in
//! slices of `FORGET_SLICE` seqs, each its own short write: deleting a whole
//! cycle's rows inside the publishing transaction held every client write
//! behind it for 100-300 ms.
//!
//! Here: what the exporter is and when it runs (the loop, its backoff, the
//! outbox gauges). `cycle` is one export cycle, `data_files` the Parquet files,
//! `compact` the rewrite of small files and manifests, `upkeep` snapshot
//! expiry, orphan files and the exported rows' deletion, `metrics` what
//! `/metrics` shows of it.

mod compact;
mod cycle;
mod data_files;
mod metrics;
mod upkeep;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use libsql::params;
use object_store::ObjectStore;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use super::catalog::LibsqlCatalog;
use super::storage::WarehouseStorage;
use super::tables::ExportTable;
use crate::db::{Database, StoreError};
use crate::guard::{Guard, Owner};
use crate::model::ObjectRef;
use crate::telemetry::Metrics;
use crate::threads::{self, Priority};
use crate::writer::Writer;
use metrics::ExportMetrics;

pub use compact::{compact, last_compaction, CompactionError, CompactionInfo, CompactionPolicy};
pub(crate) use cycle::exported_through;

/// Snapshots a cycle may append per table before it lets the next cycle go on.
const MAX_SNAPSHOTS_PER_TABLE_PER_CYCLE: usize = 8;
const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// The reserved object whose lease makes one replica the exporter.
pub fn singleton() -> ObjectRef {
    ObjectRef::singleton("exporter")
}

#[derive(Debug, Clone)]
pub struct ExportPolicy {
    pub enabled: bool,
    pub interval: Duration,
    pub batch_rows: usize,
    pub min_snapshots: usize,
    pub max_snapshot_age: Duration,
    /// How often snapshots are expired and unreferenced files removed.
    pub maintenance_interval: Duration,
    /// Unreferenced files younger than this are kept (a cycle may still be
    /// committing them, or a reader still reading an older snapshot).
    pub orphan_grace: Duration,
    /// Small files and manifests rewritten in the maintenance pass.
    pub compaction: CompactionPolicy,
}

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// Another replica is the exporter.
    #[error("replica {} is the exporter", .0.instance)]
    NotOwner(Owner),
    #[error("database: {0}")]
    Database(#[from] StoreError),
    #[error("iceberg: {0}")]
    Iceberg(#[from] iceberg::Error),
    #[error("compaction: {0}")]
    Compaction(#[from] CompactionError),
}

impl ExportError {
    /// A publish refused because the exporter lease or a table's pointer
    /// moved: not an outage, nothing to back off from.
    pub fn is_refused(&self) -> bool {
        matches!(self, ExportError::Iceberg(err) if err.kind() == iceberg::ErrorKind::CatalogCommitConflicts)
    }
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct CommittedSnapshot {
    /// `statehouse.events` or `statehouse.changes`.
    pub table: String,
    pub snapshot_id: i64,
    pub rows: usize,
    pub data_files: usize,
    /// The last outbox seq this snapshot contains.
    pub through_seq: i64,
}

#[derive(Debug, Clone, Default, Serialize, utoipa::ToSchema)]
pub struct CycleReport {
    /// Snapshots committed by this cycle, oldest first; empty when there was nothing to export.
    pub snapshots: Vec<CommittedSnapshot>,
    pub expired_snapshots: usize,
    pub orphan_files_deleted: usize,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct TableInfo {
    /// `statehouse.events` or `statehouse.changes`.
    pub name: String,
    /// False until the exporter first runs.
    pub exists: bool,
    pub metadata_location: Option<String>,
    pub location: Option<String>,
    pub current_snapshot_id: Option<i64>,
    pub snapshots: usize,
    /// Rows, data files and manifests in the current snapshot.
    pub rows: u64,
    pub data_files: u64,
    pub manifests: u64,
    /// The latest compaction still in the table's history, if any.
    pub last_compaction: Option<CompactionInfo>,
    pub last_updated_ms: Option<i64>,
    /// The last outbox seq exported into this table.
    pub exported_through_seq: i64,
    /// Rows committed but not exported yet.
    pub pending_rows: u64,
}

pub struct Exporter {
    db: Arc<Database>,
    writer: Writer,
    guard: Arc<Guard>,
    catalog: LibsqlCatalog,
    storage: WarehouseStorage,
    store: Arc<dyn ObjectStore>,
    policy: ExportPolicy,
    metrics: ExportMetrics,
    /// One cycle at a time on this replica (the loop and `POST /v1/admin/export`).
    cycle: tokio::sync::Mutex<Option<Instant>>,
    /// Each outbox kind's last exported seq, as of this replica's last cycle.
    exported: std::sync::Mutex<HashMap<&'static str, i64>>,
    /// Each table's metadata location when its file gauges were last set.
    observed: std::sync::Mutex<HashMap<&'static str, Option<String>>>,
    /// Held while exported rows are being deleted in the background.
    forgetting: Arc<tokio::sync::Mutex<()>>,
    /// The exporter's own runtime, once `spawn` started it.
    runtime: std::sync::OnceLock<tokio::runtime::Handle>,
}

impl Exporter {
    pub fn new(
        db: Arc<Database>,
        writer: Writer,
        guard: Arc<Guard>,
        storage: &crate::blobs::Storage,
        policy: ExportPolicy,
        metrics: &Metrics,
    ) -> Exporter {
        let store = storage.object_store();
        let warehouse = WarehouseStorage::new(storage.iceberg_root(), store.clone());
        Exporter {
            catalog: LibsqlCatalog::new(db.clone(), writer.clone(), &warehouse),
            db,
            writer,
            guard,
            storage: warehouse,
            store,
            policy,
            metrics: ExportMetrics::new(metrics),
            cycle: tokio::sync::Mutex::new(None),
            exported: Default::default(),
            observed: Default::default(),
            forgetting: Default::default(),
            runtime: std::sync::OnceLock::new(),
        }
    }

    pub fn catalog(&self) -> &LibsqlCatalog {
        &self.catalog
    }

    /// Runs the export loop on a thread and runtime of its own: encoding
    /// Parquet is CPU work that must not hold up the threads serving requests.
    pub fn spawn(self: Arc<Self>, shutdown: CancellationToken) -> tokio::task::JoinHandle<()> {
        let (done, finished) = tokio::sync::oneshot::channel::<()>();
        threads::spawn("statehouse-export", Priority::Background, move |runtime| {
            let _ = self.runtime.set(runtime);
            async move {
                self.export_loop(shutdown).await;
                let _ = done.send(());
            }
        })
        .expect("spawn the exporter thread");
        tokio::spawn(async move {
            let _ = finished.await;
        })
    }

    /// Runs one cycle now on the exporter's own runtime (from an HTTP request).
    pub async fn run_cycle_now(self: &Arc<Self>) -> Result<CycleReport, ExportError> {
        let Some(runtime) = self.runtime.get() else {
            return self.run_cycle().await;
        };
        let me = self.clone();
        runtime
            .spawn(async move { me.run_cycle().await })
            .await
            .map_err(|_| ExportError::Database(StoreError::Unavailable("the exporter is shutting down".into())))?
    }

    async fn export_loop(self: &Arc<Self>, shutdown: CancellationToken) {
        if !self.policy.enabled {
            return;
        }
        // Between cycles only the exporting replica watches the outbox (one
        // query per poll), to start early on a large backlog; the others just
        // try for the lease once per interval.
        let poll = self.policy.interval.min(Duration::from_millis(500));
        let mut next_cycle = Instant::now();
        let mut backoff = self.policy.interval;
        let mut exporting_here = false;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(poll) => {}
            }
            let mut due = Instant::now() >= next_cycle;
            if exporting_here && !due {
                match self.observe_outbox().await {
                    Ok(backlog) => due = backlog >= self.policy.batch_rows as u64,
                    Err(err) => tracing::warn!(error = %err, "cannot read the outbox depth"),
                }
            }
            if !due {
                continue;
            }
            match self.run_cycle().await {
                Ok(report) => {
                    exporting_here = true;
                    backoff = self.policy.interval;
                    next_cycle = Instant::now() + self.policy.interval;
                    if !report.snapshots.is_empty() {
                        let rows: usize = report.snapshots.iter().map(|s| s.rows).sum();
                        tracing::info!(rows, snapshots = report.snapshots.len(), "exported the outbox to Iceberg");
                    }
                }
                Err(ExportError::NotOwner(_)) => {
                    exporting_here = false;
                    // Another replica reports the outbox.
                    self.metrics.outbox_rows.set(0);
                    self.metrics.lag_seconds.set(0.0);
                    next_cycle = Instant::now() + self.policy.interval;
                }
                Err(err) if err.is_refused() => {
                    self.metrics.failures.inc();
                    tracing::warn!(error = %err, "an export snapshot was refused; the next cycle starts from the tables as they are");
                    exporting_here = false;
                    next_cycle = Instant::now() + self.policy.interval;
                }
                Err(err) => {
                    self.metrics.failures.inc();
                    // Nothing is lost: the rows stay in the outbox until a cycle publishes them.
                    tracing::warn!(error = %err, retry_in_ms = backoff.as_millis() as u64, "export failed; will retry");
                    let _ = self.observe_outbox().await;
                    next_cycle = Instant::now() + backoff;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    /// Updates the outbox gauges; returns the number of rows waiting (rows
    /// already exported and not yet deleted are not waiting).
    async fn observe_outbox(&self) -> Result<u64, StoreError> {
        let exported = self.exported.lock().expect("exported seqs lock").clone();
        let through = |table: ExportTable| exported.get(table.outbox_kind()).copied().unwrap_or(0);
        let (events, changes) = (through(ExportTable::Events), through(ExportTable::Changes));
        let (rows, oldest_ms) = self
            .db
            .read(|conn| async move {
                conn.first_row(
                    "SELECT count(*), min(committed_ms) FROM outbox
                     WHERE (kind = ?1 AND seq > ?2) OR (kind = ?3 AND seq > ?4)",
                    params![ExportTable::Events.outbox_kind(), events, ExportTable::Changes.outbox_kind(), changes],
                    |row| Ok((row.get::<i64>(0)?, row.get::<Option<i64>>(1)?)),
                )
                .await?
                .ok_or_else(|| StoreError::Internal("count(*) gave no row".into()))
            })
            .await?;
        self.metrics.outbox_rows.set(rows);
        let lag_ms = oldest_ms.map_or(0, |oldest| (crate::clock::now_ms() - oldest).max(0));
        self.metrics.lag_seconds.set(lag_ms as f64 / 1000.0);
        Ok(rows as u64)
    }
}
