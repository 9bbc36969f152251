//! Upkeep after a cycle: expired snapshots, unreferenced files, and the
//! exported rows' deletion from the outbox.

use std::collections::HashSet;

use futures::StreamExt;
use iceberg::table::Table;
use iceberg::transaction::{ApplyTransactionAction, Transaction};
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};

use crate::analytics::catalog::LibsqlCatalog;
use crate::db::batch::Stmt;
use crate::db::StoreError;
use crate::resident::ResidentState;
use crate::writer::{BoxFuture, Planner, Settled, Touches, Work, Writes};

use super::{CycleReport, ExportError, Exporter};

impl Exporter {
    /// Deletes each kind's outbox rows up to its exported seq (they are in the
    /// table's current snapshot, and no cycle reads them again), a slice at a
    /// time so that client writes queued meanwhile wait for one slice at most,
    /// and after the cycle, which does not wait for it. One deletion at a
    /// time: while one runs, the next cycle's call is skipped, and the one
    /// after covers its rows.
    pub(super) fn forget_in_background(&self, exported: Vec<(&'static str, i64)>) {
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

    pub(super) async fn expire_snapshots(
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
    /// cycles and compactions, data files replaced by a compaction once no
    /// kept snapshot reads them, manifests of expired snapshots, old metadata
    /// files.
    pub(super) async fn delete_orphans(&self, current: &Table) -> Result<usize, ExportError> {
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
                // A DELETED entry names a file a compaction replaced: only the
                // snapshots that still list it as live read it, and once they
                // have expired, nothing does.
                for entry in manifest.entries().iter().filter(|e| e.is_alive()) {
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
