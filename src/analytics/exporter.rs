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

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow_array::RecordBatch;
use futures::StreamExt;
use iceberg::arrow::RecordBatchPartitionSplitter;
use iceberg::spec::{DataFile, DataFileFormat, PartitionKey};
use iceberg::table::Table;
use iceberg::transaction::{ApplyTransactionAction, Transaction};
use iceberg::writer::base_writer::data_file_writer::DataFileWriterBuilder;
use iceberg::writer::file_writer::location_generator::{DefaultFileNameGenerator, LocationGenerator};
use iceberg::writer::file_writer::rolling_writer::RollingFileWriterBuilder;
use iceberg::writer::file_writer::ParquetWriterBuilder;
use iceberg::writer::partitioning::fanout_writer::FanoutWriter;
use iceberg::writer::partitioning::PartitioningWriter;
use iceberg::{Catalog, NamespaceIdent, TableCreation, TableIdent};
use libsql::params;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::{EnabledStatistics, WriterProperties};
use prometheus::{Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use super::catalog::{LibsqlCatalog, OUTBOX_THROUGH};
use super::storage::WarehouseStorage;
use super::tables::{ExportTable, NAMESPACE};
use crate::db::batch::Stmt;
use crate::db::{Database, StoreError};
use crate::guard::{Guard, HeldLease, Owner, Route};
use crate::objects::resident::ResidentState;
use crate::objects::ObjectRef;
use crate::telemetry::Metrics;
use crate::threads::{self, Priority};
use crate::writer::{BoxFuture, Planner, Settled, Touches, Work, Writer, Writes};

/// Snapshots a cycle may append per table before it lets the next cycle go on.
const MAX_SNAPSHOTS_PER_TABLE_PER_CYCLE: usize = 8;
const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// Parquet row groups: large enough for good compression and statistics.
const ROW_GROUP_ROWS: usize = 128 * 1024;

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
    /// Rows and data files in the current snapshot.
    pub rows: u64,
    pub data_files: u64,
    pub last_updated_ms: Option<i64>,
    /// The last outbox seq exported into this table.
    pub exported_through_seq: i64,
    /// Rows committed but not exported yet.
    pub pending_rows: u64,
}

struct ExportMetrics {
    outbox_rows: IntGauge,
    lag_seconds: Gauge,
    rows: IntCounterVec,
    files: IntCounterVec,
    snapshots: IntCounterVec,
    cycle_seconds: Histogram,
    failures: IntCounter,
    orphans_deleted: IntCounter,
}

impl ExportMetrics {
    fn new(metrics: &Metrics) -> ExportMetrics {
        let m = ExportMetrics {
            outbox_rows: IntGauge::new(
                "statehouse_export_outbox_rows",
                "Outbox rows waiting to be exported (reported by the exporting replica; 0 elsewhere)",
            )
            .unwrap(),
            lag_seconds: Gauge::new(
                "statehouse_export_lag_seconds",
                "Age of the oldest outbox row not yet exported (reported by the exporting replica; 0 elsewhere)",
            )
            .unwrap(),
            rows: IntCounterVec::new(
                Opts::new("statehouse_export_rows_total", "Rows exported to Iceberg by this replica, by table"),
                &["table"],
            )
            .unwrap(),
            files: IntCounterVec::new(
                Opts::new("statehouse_export_files_total", "Parquet data files committed by this replica, by table"),
                &["table"],
            )
            .unwrap(),
            snapshots: IntCounterVec::new(
                Opts::new("statehouse_export_snapshots_total", "Iceberg snapshots committed by this replica, by table"),
                &["table"],
            )
            .unwrap(),
            cycle_seconds: Histogram::with_opts(
                HistogramOpts::new("statehouse_export_cycle_seconds", "Duration of export cycles that exported rows")
                    .buckets(vec![0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]),
            )
            .unwrap(),
            failures: IntCounter::new("statehouse_export_failures_total", "Export cycles that failed (retried)")
                .unwrap(),
            orphans_deleted: IntCounter::new(
                "statehouse_export_orphan_files_deleted_total",
                "Unreferenced warehouse files deleted after the grace period",
            )
            .unwrap(),
        };
        metrics.register(Box::new(m.outbox_rows.clone()));
        metrics.register(Box::new(m.lag_seconds.clone()));
        metrics.register(Box::new(m.rows.clone()));
        metrics.register(Box::new(m.files.clone()));
        metrics.register(Box::new(m.snapshots.clone()));
        metrics.register(Box::new(m.cycle_seconds.clone()));
        metrics.register(Box::new(m.failures.clone()));
        metrics.register(Box::new(m.orphans_deleted.clone()));
        m
    }
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

    /// Runs one cycle now if this replica is (or can become) the exporter.
    pub async fn run_cycle(&self) -> Result<CycleReport, ExportError> {
        let mut last_maintenance = self.cycle.lock().await;
        let lease = match self.guard.route(&singleton()).await? {
            Route::Local(lease) => lease,
            Route::Remote(owner) => return Err(ExportError::NotOwner(owner)),
        };
        let result = self.cycle_under(&lease, &mut last_maintenance).await;
        if result.as_ref().is_err_and(ExportError::is_refused) {
            // Whoever moved the lease (another replica, or this one after its
            // lease ran out) exports from now on; the next cycle asks again.
            self.guard.lost(&lease);
        }
        result
    }

    async fn cycle_under(
        &self,
        lease: &HeldLease,
        last_maintenance: &mut Option<Instant>,
    ) -> Result<CycleReport, ExportError> {
        let fence = lease.fence;
        let catalog = self.catalog.fenced(lease.clone());
        let started = Instant::now();
        let mut report = CycleReport::default();
        let mut latest = Vec::new();
        for table in ExportTable::ALL {
            let mut current = self.ensure_table(&catalog, table).await?;
            for _ in 0..MAX_SNAPSHOTS_PER_TABLE_PER_CYCLE {
                // A cycle of many snapshots can outlast two lease terms, after
                // which an unused lease is released as idle: keep it marked used.
                self.guard.touch(lease);
                let Some((next, committed)) = self.export_batch(&catalog, current.clone(), table, fence).await? else {
                    break;
                };
                current = next;
                let full = committed.rows >= self.policy.batch_rows;
                report.snapshots.push(committed);
                if !full {
                    break;
                }
            }
            latest.push(current);
        }
        if !report.snapshots.is_empty() {
            self.metrics.cycle_seconds.observe(started.elapsed().as_secs_f64());
        }
        // Also what a crash between publishing and forgetting left behind.
        let exported: Vec<_> = ExportTable::ALL
            .into_iter()
            .zip(&latest)
            .map(|(t, current)| (t.outbox_kind(), exported_through(current)))
            .collect();
        self.exported.lock().expect("exported seqs lock").extend(exported.iter().copied());
        self.forget_in_background(exported);
        if last_maintenance.is_none_or(|at| at.elapsed() >= self.policy.maintenance_interval) {
            *last_maintenance = Some(Instant::now());
            for current in latest {
                self.guard.touch(lease);
                let current = self.expire_snapshots(&catalog, current, &mut report).await?;
                report.orphan_files_deleted += self.delete_orphans(&current).await?;
            }
            self.metrics.orphans_deleted.inc_by(report.orphan_files_deleted as u64);
        }
        let _ = self.observe_outbox().await;
        Ok(report)
    }

    fn ident(table: ExportTable) -> TableIdent {
        TableIdent::new(NamespaceIdent::new(NAMESPACE.to_string()), table.name().to_string())
    }

    async fn ensure_table(&self, catalog: &LibsqlCatalog, table: ExportTable) -> Result<Table, ExportError> {
        let ident = Self::ident(table);
        if let Some(existing) = catalog.load_existing(&ident).await? {
            return Ok(existing);
        }
        let creation = TableCreation::builder()
            .name(table.name().to_string())
            .schema(table.schema())
            .partition_spec(table.partition_spec())
            .properties([
                ("write.format.default".to_string(), "parquet".to_string()),
                ("write.parquet.compression-codec".to_string(), "zstd".to_string()),
                ("write.metadata.previous-versions-max".to_string(), "20".to_string()),
            ])
            .build();
        let created = catalog.create_table(ident.namespace(), creation).await?;
        tracing::info!(table = %ident, location = created.metadata().location(), "created the Iceberg table");
        Ok(created)
    }

    /// Deletes each kind's outbox rows up to its exported seq (they are in the
    /// table's current snapshot, and no cycle reads them again), a slice at a
    /// time so that client writes queued meanwhile wait for one slice at most,
    /// and after the cycle, which does not wait for it. One deletion at a
    /// time: while one runs, the next cycle's call is skipped, and the one
    /// after covers its rows.
    fn forget_in_background(&self, exported: Vec<(&'static str, i64)>) {
        let Ok(busy) = self.forgetting.clone().try_lock_owned() else {
            return;
        };
        let writer = self.writer.clone();
        tokio::spawn(async move {
            let _busy = busy;
            for (kind, through) in exported {
                loop {
                    match writer.run(ForgetExported { kind, through }).await {
                        Ok(0) => break,
                        Ok(_) => {}
                        Err(err) => {
                            // The rows stay (nothing reads them again); the next cycle retries.
                            tracing::warn!(error = %err, kind, "cannot delete exported outbox rows");
                            return;
                        }
                    }
                }
            }
        });
    }

    /// Exports one bounded batch of `table`'s outbox rows as one snapshot.
    async fn export_batch(
        &self,
        catalog: &LibsqlCatalog,
        current: Table,
        table: ExportTable,
        fence: i64,
    ) -> Result<Option<(Table, CommittedSnapshot)>, ExportError> {
        let after = exported_through(&current);
        let limit = self.policy.batch_rows;
        let started = Instant::now();
        let Some((batch, through)) =
            self.db.read(move |conn| async move { table.read_outbox(&conn, after, limit).await }).await?
        else {
            return Ok(None);
        };
        let rows = batch.num_rows();
        let read = started.elapsed();
        let files = write_data_files(&current, batch).await?;
        let written = started.elapsed();
        let data_files = files.len();
        let properties = HashMap::from([
            (OUTBOX_THROUGH.to_string(), through.to_string()),
            ("statehouse.fence".to_string(), fence.to_string()),
            ("statehouse.instance".to_string(), self.guard.me().instance.clone()),
        ]);
        let transaction = Transaction::new(&current);
        // File names are fresh UUIDs, so the duplicate check (which reads every manifest) is not needed.
        let append = transaction
            .fast_append()
            .with_check_duplicate(false)
            .add_data_files(files)
            .set_snapshot_properties(properties);
        let committed = append.apply(transaction)?.commit(catalog).await?;
        let snapshot_id = committed.metadata().current_snapshot_id().unwrap_or_default();
        tracing::info!(
            table = table.name(),
            rows,
            data_files,
            snapshot_id,
            read_ms = read.as_millis() as u64,
            parquet_ms = (written - read).as_millis() as u64,
            commit_ms = (started.elapsed() - written).as_millis() as u64,
            "committed an export snapshot"
        );
        self.metrics.rows.with_label_values(&[table.name()]).inc_by(rows as u64);
        self.metrics.files.with_label_values(&[table.name()]).inc_by(data_files as u64);
        self.metrics.snapshots.with_label_values(&[table.name()]).inc();
        Ok(Some((
            committed,
            CommittedSnapshot {
                table: format!("{NAMESPACE}.{}", table.name()),
                snapshot_id,
                rows,
                data_files,
                through_seq: through,
            },
        )))
    }

    async fn expire_snapshots(
        &self,
        catalog: &LibsqlCatalog,
        current: Table,
        report: &mut CycleReport,
    ) -> Result<Table, ExportError> {
        let cutoff = crate::clock::now_ms() - self.policy.max_snapshot_age.as_millis() as i64;
        let current_id = current.metadata().current_snapshot_id();
        let mut snapshots: Vec<(i64, i64)> =
            current.metadata().snapshots().map(|s| (s.timestamp_ms(), s.snapshot_id())).collect();
        snapshots.sort_unstable();
        let keep_from = snapshots.len().saturating_sub(self.policy.min_snapshots);
        let expired = snapshots[..keep_from].iter().filter(|(at, id)| *at < cutoff && Some(*id) != current_id).count();
        if expired == 0 {
            return Ok(current);
        }
        let transaction = Transaction::new(&current);
        let expire = transaction.expire_snapshots().retain_last(self.policy.min_snapshots).expire_older_than_ms(cutoff);
        let updated = expire.apply(transaction)?.commit(catalog).await?;
        report.expired_snapshots += current.metadata().snapshots().len() - updated.metadata().snapshots().len();
        Ok(updated)
    }

    /// Deletes files under the table's location that no live metadata refers
    /// to and that are older than the grace period: data files of failed
    /// cycles, manifests of expired snapshots, old metadata files.
    async fn delete_orphans(&self, current: &Table) -> Result<usize, ExportError> {
        let mut referenced: HashSet<String> = HashSet::new();
        if let Some(location) = current.metadata_location() {
            referenced.insert(location.to_string());
        }
        for entry in current.metadata().metadata_log() {
            referenced.insert(entry.metadata_file.clone());
        }
        let mut manifests_seen = HashSet::new();
        for snapshot in current.metadata().snapshots() {
            referenced.insert(snapshot.manifest_list().to_string());
            let list = current.manifest_list_reader(snapshot).load().await?;
            for manifest_file in list.entries() {
                if !manifests_seen.insert(manifest_file.manifest_path.clone()) {
                    continue;
                }
                referenced.insert(manifest_file.manifest_path.clone());
                let manifest = manifest_file.load_manifest(current.file_io()).await?;
                for entry in manifest.entries() {
                    referenced.insert(entry.file_path().to_string());
                }
            }
        }
        let prefix = self.storage.key(current.metadata().location())?;
        let cutoff = chrono::Utc::now() - self.policy.orphan_grace;
        let mut deleted = 0;
        let mut listed = self.store.list(Some(&prefix));
        let mut doomed: Vec<Path> = Vec::new();
        while let Some(meta) = listed.next().await {
            let meta = meta.map_err(|e| iceberg::Error::new(iceberg::ErrorKind::Unexpected, e.to_string()))?;
            if meta.last_modified < cutoff && !referenced.contains(&self.storage.location(&meta.location)) {
                doomed.push(meta.location);
            }
        }
        for key in doomed {
            match self.store.delete(&key).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => deleted += 1,
                Err(err) => return Err(iceberg::Error::new(iceberg::ErrorKind::Unexpected, err.to_string()).into()),
            }
        }
        if deleted > 0 {
            tracing::info!(table = %current.identifier(), deleted, "deleted unreferenced warehouse files");
        }
        Ok(deleted)
    }

    /// What `GET /v1/analytics/tables` shows; any replica can answer.
    pub async fn describe(&self) -> Result<Vec<TableInfo>, ExportError> {
        let mut infos = Vec::new();
        for table in ExportTable::ALL {
            let ident = Self::ident(table);
            let name = format!("{NAMESPACE}.{}", table.name());
            let loaded = self.catalog.load_existing(&ident).await?;
            // Rows already exported may linger a moment before they are forgotten.
            let (kind, through) = (table.outbox_kind(), loaded.as_ref().map_or(0, exported_through));
            let pending: i64 = self
                .db
                .read(move |conn| async move {
                    let count = conn
                        .first_row(
                            "SELECT count(*) FROM outbox WHERE kind = ?1 AND seq > ?2",
                            params![kind, through],
                            |row| row.get::<i64>(0),
                        )
                        .await?;
                    Ok(count.unwrap_or(0))
                })
                .await?;
            let Some(loaded) = loaded else {
                infos.push(TableInfo {
                    name,
                    exists: false,
                    metadata_location: None,
                    location: None,
                    current_snapshot_id: None,
                    snapshots: 0,
                    rows: 0,
                    data_files: 0,
                    last_updated_ms: None,
                    exported_through_seq: 0,
                    pending_rows: pending as u64,
                });
                continue;
            };
            let metadata = loaded.metadata();
            let total = |key: &str| {
                metadata
                    .current_snapshot()
                    .and_then(|s| s.summary().additional_properties.get(key).and_then(|v| v.parse().ok()))
                    .unwrap_or(0)
            };
            infos.push(TableInfo {
                name,
                exists: true,
                metadata_location: loaded.metadata_location().map(str::to_string),
                location: Some(metadata.location().to_string()),
                current_snapshot_id: metadata.current_snapshot_id(),
                snapshots: metadata.snapshots().len(),
                rows: total("total-records"),
                data_files: total("total-data-files"),
                last_updated_ms: Some(metadata.last_updated_ms()),
                exported_through_seq: exported_through(&loaded),
                pending_rows: pending as u64,
            });
        }
        Ok(infos)
    }
}

/// Outbox seqs one `ForgetExported` slice spans: at most this many rows, about
/// a millisecond of the writer. (512 cost 1.6 us a row, 1024 1.3 us, one
/// statement for all 0.9 us; the difference is per-commit work.)
const FORGET_SLICE: i64 = 1024;

/// Deletes one slice of exported outbox rows: those of `kind` at or below
/// `through`, within `FORGET_SLICE` seqs of the oldest. No fence: the rows are
/// in a published snapshot, whoever deletes them.
struct ForgetExported {
    kind: &'static str,
    through: i64,
}

impl Work for ForgetExported {
    type Output = usize;

    /// Exported rows: nothing else writes them.
    fn touches(&self) -> Touches<'_> {
        Touches::Nothing
    }

    fn plan<'a>(&'a mut self, _: &'a mut Planner) -> BoxFuture<'a, Result<Result<Writes, usize>, StoreError>> {
        // One upper bound, so that the index range is the slice: with two
        // (`seq <= ?2 AND seq < min + slice`) SQLite ranged over the first and
        // filtered every row up to `through`, 10x slower per slice.
        let delete = Stmt::exec(
            "DELETE FROM outbox WHERE kind = ?1
               AND seq <= min(?2, (SELECT min(seq) FROM outbox WHERE kind = ?1) + ?3 - 1)",
            vec![self.kind.into(), self.through.into(), FORGET_SLICE.into()],
        );
        Box::pin(async move { Ok(Ok(Writes { assertions: vec![], statements: vec![delete] })) })
    }

    fn settle(&mut self, settled: Settled<'_>, _: &ResidentState) -> usize {
        match settled {
            Settled::Committed(outcomes) => outcomes.first().map_or(0, |o| o.changed() as usize),
            Settled::Refused(_) => 0,
        }
    }
}

/// The last outbox seq in the table's current snapshot (0 before the first).
fn exported_through(table: &Table) -> i64 {
    table
        .metadata()
        .current_snapshot()
        .and_then(|s| s.summary().additional_properties.get(OUTBOX_THROUGH).and_then(|v| v.parse().ok()))
        .unwrap_or(0)
}

/// Writes `batch` as zstd Parquet, one file (or more, rolling) per partition.
async fn write_data_files(table: &Table, batch: RecordBatch) -> Result<Vec<DataFile>, iceberg::Error> {
    let metadata = table.metadata();
    let schema = metadata.current_schema().clone();
    let spec = metadata.default_partition_spec().clone();
    let properties = WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::try_new(3).expect("zstd level 3 is valid")))
        .set_max_row_group_row_count(Some(ROW_GROUP_ROWS))
        .set_statistics_enabled(EnabledStatistics::Page)
        .set_created_by(format!("statehouse {}", env!("CARGO_PKG_VERSION")))
        .build();
    let rolling = RollingFileWriterBuilder::new_with_default_file_size(
        ParquetWriterBuilder::new(properties, schema.clone()),
        table.file_io().clone(),
        PartitionDirectories { data_location: format!("{}/data", metadata.location()) },
        // A fresh prefix per attempt: a retried cycle never overwrites a file a reader may hold.
        DefaultFileNameGenerator::new(uuid::Uuid::now_v7().to_string(), None, DataFileFormat::Parquet),
    );
    let mut writer = FanoutWriter::new(DataFileWriterBuilder::new(rolling));
    let splitter = RecordBatchPartitionSplitter::try_new_with_computed_values(schema, spec)?;
    for (key, part) in splitter.split(&batch)? {
        writer.write(key, part).await?;
    }
    writer.close().await
}

/// `data/ns=<ns>/type=<type>/ts_day=<date>/`, each value escaped as the
/// Iceberg Java writer does (`URLEncoder`: `[A-Za-z0-9.*_-]` kept, a space as
/// `+`, every other byte as `%XX`), so distinct values never share a
/// directory. Every segment starts with `<field>=`, so no value can name a
/// path outside the table (`type=..` is a plain name). Readers use the
/// manifests' partition values and file paths, not these names.
#[derive(Debug, Clone)]
struct PartitionDirectories {
    data_location: String,
}

impl LocationGenerator for PartitionDirectories {
    fn generate_location(&self, partition_key: Option<&PartitionKey>, file_name: &str) -> String {
        let Some(key) = partition_key.filter(|k| !PartitionKey::is_effectively_none(Some(k))) else {
            return format!("{}/{file_name}", self.data_location);
        };
        let spec = key.spec();
        let types = spec.partition_type(key.schema()).map(|t| t.fields().to_vec()).unwrap_or_default();
        let mut path = self.data_location.clone();
        for (i, field) in spec.fields().iter().enumerate() {
            let value = match types.get(i) {
                Some(t) => field.transform.to_human_string(&t.field_type, key.data()[i].as_ref()),
                None => "null".to_string(),
            };
            path.push('/');
            path.push_str(&field.name);
            path.push('=');
            path.push_str(&directory_safe(&value));
        }
        format!("{path}/{file_name}")
    }
}

fn directory_safe(value: &str) -> String {
    let mut escaped = String::with_capacity(value.len());
    for byte in value.bytes() {
        match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'.' | b'*' | b'_' | b'-' => escaped.push(byte as char),
            b' ' => escaped.push('+'),
            _ => escaped.push_str(&format!("%{byte:02X}")),
        }
    }
    if escaped.len() <= MAX_PARTITION_NAME {
        return escaped;
    }
    // File systems refuse names over 255 bytes: a long value keeps a prefix
    // (never cut inside a %XX) and a digest of the whole, so it stays distinct.
    let mut cut = MAX_PARTITION_NAME - 17;
    while escaped.as_bytes()[cut - 1] == b'%' || escaped.as_bytes()[cut - 2] == b'%' {
        cut -= 1;
    }
    use sha2::Digest as _;
    let digest = sha2::Sha256::digest(value.as_bytes());
    format!("{}-{}", &escaped[..cut], &hex::encode(digest)[..16])
}

/// The longest escaped partition value kept whole (bytes).
const MAX_PARTITION_NAME: usize = 200;

#[cfg(test)]
mod tests {
    use super::{directory_safe, MAX_PARTITION_NAME};

    #[test]
    fn partition_directories_escape_as_iceberg_java_does() {
        assert_eq!(directory_safe("OrderPlaced"), "OrderPlaced");
        assert_eq!(directory_safe("payments.do"), "payments.do");
        assert_ne!(directory_safe("payments.do"), directory_safe("payments_do"));
        assert_eq!(directory_safe("../../etc"), "..%2F..%2Fetc");
        assert_eq!(directory_safe(".."), "..");
        assert_eq!(directory_safe("v1.2-beta_x*"), "v1.2-beta_x*");
        assert_eq!(directory_safe(""), "");
        assert_eq!(directory_safe("a/b c%2F"), "a%2Fb+c%252F");
        assert_eq!(directory_safe("ünï"), "%C3%BCn%C3%AF");
        let long = directory_safe(&"ü".repeat(300));
        assert!(long.len() <= MAX_PARTITION_NAME, "{}", long.len());
        assert_ne!(long, directory_safe(&format!("{}x", "ü".repeat(300))));
        assert!(!long.contains("%-") && !long.contains("%C-"), "no %XX is cut: {long}");
    }
}
