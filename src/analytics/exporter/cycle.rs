//! One export cycle: each table's outbox rows past its last snapshot, as
//! Parquet, appended as snapshots through the fenced catalog.

use std::collections::HashMap;
use std::time::Instant;

use iceberg::table::Table;
use iceberg::transaction::{ApplyTransactionAction, Transaction};
use iceberg::{Catalog, NamespaceIdent, TableCreation, TableIdent};
use libsql::params;

use crate::analytics::catalog::{LibsqlCatalog, OUTBOX_THROUGH};
use crate::analytics::tables::{ExportTable, NAMESPACE};
use crate::guard::{HeldLease, Route};

use super::compact::{last_compaction, manifest_count, total};
use super::data_files::write_data_files;
use super::{
    singleton, CommittedSnapshot, CycleReport, ExportError, Exporter, TableInfo, MAX_SNAPSHOTS_PER_TABLE_PER_CYCLE,
};

impl Exporter {
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
            let mut kept = Vec::new();
            for (table, current) in ExportTable::ALL.into_iter().zip(latest) {
                self.guard.touch(lease);
                // Compaction first, so that expiry and orphan removal work on
                // the table it leaves.
                let current = self.compact_table(&catalog, table, current, lease).await?;
                let current = self.expire_snapshots(&catalog, current, &mut report).await?;
                report.orphan_files_deleted += self.delete_orphans(&current).await?;
                kept.push(current);
            }
            latest = kept;
            self.metrics.orphans_deleted.inc_by(report.orphan_files_deleted as u64);
        }
        for (table, current) in ExportTable::ALL.into_iter().zip(&latest) {
            let location = current.metadata_location().map(str::to_string);
            if self.observed.lock().expect("observed tables lock").get(table.name()) != Some(&location) {
                match self.observe_table(table, current).await {
                    Ok(()) => drop(self.observed.lock().expect("observed tables lock").insert(table.name(), location)),
                    Err(err) => tracing::warn!(table = table.name(), error = %err, "cannot count the table's files"),
                }
            }
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
                    manifests: 0,
                    last_compaction: None,
                    last_updated_ms: None,
                    exported_through_seq: 0,
                    pending_rows: pending as u64,
                });
                continue;
            };
            let metadata = loaded.metadata();
            let manifests = manifest_count(&loaded).await?;
            infos.push(TableInfo {
                name,
                exists: true,
                metadata_location: loaded.metadata_location().map(str::to_string),
                location: Some(metadata.location().to_string()),
                current_snapshot_id: metadata.current_snapshot_id(),
                snapshots: metadata.snapshots().len(),
                rows: total(&loaded, "total-records"),
                data_files: total(&loaded, "total-data-files"),
                manifests,
                last_compaction: last_compaction(&loaded),
                last_updated_ms: Some(metadata.last_updated_ms()),
                exported_through_seq: exported_through(&loaded),
                pending_rows: pending as u64,
            });
        }
        Ok(infos)
    }
}

/// The last outbox seq in the table's current snapshot (0 before the first).
pub(crate) fn exported_through(table: &Table) -> i64 {
    table
        .metadata()
        .current_snapshot()
        .and_then(|s| s.summary().additional_properties.get(OUTBOX_THROUGH).and_then(|v| v.parse().ok()))
        .unwrap_or(0)
}
