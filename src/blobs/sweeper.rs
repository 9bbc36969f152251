//! Removes bytes nothing refers to: keys of replaced or deleted blobs (listed
//! in `blob_garbage` by the same transaction that dropped them) once the
//! history retention has passed, since a restore may refer to them again
//! until then; and orphans of uploads that were never committed (crash,
//! fenced, client gone), once they are older than the grace period. One
//! replica sweeps at a time: it holds the lease of a reserved object, like
//! any other writer.

use std::sync::Arc;
use std::time::Duration;

use libsql::params;
use object_store::path::Path;
use tokio_util::sync::CancellationToken;

use super::{Storage, StorageError};
use crate::db::batch::Stmt;
use crate::db::{Database, StoreError};
use crate::guard::{Guard, Route};
use crate::model::ObjectRef;
use crate::resident::ResidentState;
use crate::writer::{BoxFuture, Planner, Settled, Work, Writer, Writes};

const GARBAGE_BATCH: i64 = 1000;

/// Why a sweep stopped; the next one starts over (nothing is half-done: bytes
/// go first, then the rows that list them).
#[derive(Debug, thiserror::Error)]
pub enum SweepError {
    #[error("database: {0}")]
    Database(#[from] StoreError),
    #[error("blob storage: {0}")]
    Storage(#[from] StorageError),
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SweepReport {
    pub garbage_deleted: usize,
    pub orphans_deleted: usize,
}

pub struct Sweeper {
    pub db: Arc<Database>,
    pub writer: Writer,
    pub storage: Storage,
    pub guard: Arc<Guard>,
    pub interval: Duration,
    pub orphan_grace: Duration,
    /// How long listed garbage is kept before its bytes go.
    pub keep_garbage: Duration,
}

/// How long garbage is kept for a history retention: the retention and as
/// much again, up to an hour more, so that a restore checked just inside the
/// retention never finds the bytes it refers to swept while it commits.
pub fn kept_for(retention: Duration) -> Duration {
    retention + retention.min(Duration::from_secs(3600))
}

/// The reserved object whose lease makes one replica the sweeper. `_system`
/// is not a valid namespace, so no client can touch it.
fn singleton() -> ObjectRef {
    ObjectRef::singleton("blob-sweeper")
}

impl Sweeper {
    pub fn spawn(self, shutdown: CancellationToken) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(self.interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tick.tick() => {}
                }
                match self.guard.route(&singleton()).await {
                    Ok(Route::Local(_)) => match self.sweep_once().await {
                        Ok(report) if report != SweepReport::default() => {
                            tracing::info!(
                                garbage = report.garbage_deleted,
                                orphans = report.orphans_deleted,
                                "swept blobs"
                            );
                        }
                        Ok(_) => {}
                        Err(err) => tracing::warn!(error = %err, "blob sweep failed; will retry"),
                    },
                    Ok(Route::Remote(_)) => {}
                    Err(err) => tracing::warn!(error = %err, "cannot decide who sweeps blobs; will retry"),
                }
            }
        })
    }

    pub async fn sweep_once(&self) -> Result<SweepReport, SweepError> {
        let mut report = SweepReport::default();
        // Garbage past the retention: delete the bytes, then forget the rows.
        let kept_since = crate::clock::now_ms() - self.keep_garbage.as_millis() as i64;
        loop {
            let keys: Vec<String> = self
                .db
                .read(|conn| async move {
                    let mut keys = Vec::new();
                    conn.rows(
                        "SELECT storage_key FROM blob_garbage WHERE since <= ?2 ORDER BY since LIMIT ?1",
                        params![GARBAGE_BATCH, kept_since],
                        |row| {
                            keys.push(row.get::<String>(0)?);
                            Ok::<(), libsql::Error>(())
                        },
                    )
                    .await?;
                    Ok(keys)
                })
                .await?;
            if keys.is_empty() {
                break;
            }
            for key in &keys {
                let path = super::stored_path(key)?;
                self.storage.delete(&path).await?;
            }
            report.garbage_deleted += keys.len();
            let done = keys.len() < GARBAGE_BATCH as usize;
            self.writer.run(ForgetGarbage { keys }).await?;
            if done {
                break;
            }
        }
        // Orphans: bytes under blobs/ that no row names (neither a blob nor
        // garbage kept for the retention), older than the grace period.
        let cutoff = crate::clock::now_ms() - self.orphan_grace.as_millis() as i64;
        for meta in self.storage.list(&Path::from("blobs")).await? {
            if meta.last_modified.timestamp_millis() > cutoff {
                continue;
            }
            let key = meta.location.to_string();
            let referenced = self
                .db
                .read(|conn| {
                    let key = key.clone();
                    async move {
                        let found = conn
                            .first_row(
                                "SELECT 1 FROM blobs WHERE storage_key = ?1
                                 UNION ALL SELECT 1 FROM blob_garbage WHERE storage_key = ?1",
                                params![key],
                                |_| Ok(()),
                            )
                            .await?;
                        Ok(found.is_some())
                    }
                })
                .await?;
            if !referenced {
                self.storage.delete(&meta.location).await?;
                report.orphans_deleted += 1;
            }
        }
        Ok(report)
    }
}

struct ForgetGarbage {
    keys: Vec<String>,
}

impl Work for ForgetGarbage {
    type Output = ();

    fn plan<'a>(&'a mut self, _: &'a mut Planner) -> BoxFuture<'a, Result<Result<Writes, ()>, StoreError>> {
        let statements = self
            .keys
            .iter()
            .map(|key| Stmt::exec("DELETE FROM blob_garbage WHERE storage_key = ?1", vec![key.as_str().into()]))
            .collect();
        Box::pin(async move { Ok(Ok(Writes { assertions: vec![], statements })) })
    }

    fn settle(&mut self, _: Settled<'_>, _: &ResidentState) {}
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    #[test]
    fn garbage_is_kept_for_the_retention_and_a_margin() {
        let kept = |secs: u64| super::kept_for(Duration::from_secs(secs)).as_secs();
        assert_eq!(kept(0), 0);
        assert_eq!(kept(2), 4);
        assert_eq!(kept(30 * 86_400), 30 * 86_400 + 3600);
    }
}
