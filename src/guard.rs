//! The ConsistencyGuard: object leases and fencing tokens.
//!
//! Safety comes from the fence check every write runs inside its own
//! transaction (see `objects::WriteJob`): a replica whose fence is stale can
//! never commit. Leases and clocks only decide *who should* write (liveness),
//! so that writes go to one replica instead of fighting over the fence.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use libsql::params;
use tokio_util::sync::CancellationToken;

use crate::clock::now_ms;
use crate::db::{Session, StoreError};
use crate::objects::ObjectRef;
use crate::telemetry::Metrics;
use crate::writer::{BoxFuture, Work, Writer};

/// This replica, as its peers see it.
#[derive(Debug, Clone)]
pub struct Replica {
    pub instance: String,
    pub url: String,
    /// fly.io machine id, for `fly-replay`.
    pub machine: Option<String>,
}

/// The replica that holds an object's lease.
#[derive(Debug, Clone)]
pub struct Owner {
    pub instance: String,
    pub url: Option<String>,
    pub machine: Option<String>,
    pub lease_expires_at_ms: i64,
}

impl Owner {
    /// Whole seconds until the lease runs out (at least 1), for `Retry-After`.
    pub fn retry_after_secs(&self) -> u64 {
        let remaining = self.lease_expires_at_ms - now_ms();
        (remaining.max(0) as u64).div_ceil(1000).max(1)
    }
}

pub enum Route {
    /// We hold the lease: write under this fence.
    Local { fence: i64 },
    /// A live peer holds it.
    Remote(Owner),
}

struct Lease {
    fence: i64,
    /// Measured from before the acquire or renew was sent, so it is never later than the row says.
    valid_until: Instant,
    last_used: Instant,
}

pub struct Guard {
    me: Replica,
    lease: Duration,
    leases: Mutex<HashMap<ObjectRef, Lease>>,
    writer: Writer,
    metrics: Arc<Metrics>,
}

impl Guard {
    pub fn new(me: Replica, lease: Duration, writer: Writer, metrics: Arc<Metrics>) -> Guard {
        Guard { me, lease, leases: Mutex::new(HashMap::new()), writer, metrics }
    }

    pub fn me(&self) -> &Replica {
        &self.me
    }

    /// A lease is used only while comfortably inside its term; near the end the
    /// next write re-acquires (cheap when it is still ours).
    fn margin(&self) -> Duration {
        self.lease / 4
    }

    /// Where a write to `object` must go, taking the lease if it is free or expired.
    pub async fn route(&self, object: &ObjectRef) -> Result<Route, StoreError> {
        if let Some(fence) = self.held(object) {
            return Ok(Route::Local { fence });
        }
        let sent_at = Instant::now();
        let now = now_ms();
        let acquire = Acquire {
            object: object.clone(),
            me: self.me.clone(),
            now_ms: now,
            expires_at_ms: now + self.lease.as_millis() as i64,
        };
        match self.writer.run(acquire).await? {
            Acquired::Ours { fence } => {
                let mut leases = self.leases.lock().unwrap();
                leases.insert(object.clone(), Lease { fence, valid_until: sent_at + self.lease, last_used: sent_at });
                self.metrics.leases_held.set(leases.len() as i64);
                Ok(Route::Local { fence })
            }
            Acquired::HeldBy(owner) => Ok(Route::Remote(owner)),
        }
    }

    fn held(&self, object: &ObjectRef) -> Option<i64> {
        let now = Instant::now();
        let mut leases = self.leases.lock().unwrap();
        let lease = leases.get_mut(object)?;
        if lease.valid_until > now + self.margin() {
            lease.last_used = now;
            Some(lease.fence)
        } else {
            None
        }
    }

    /// A write under `fence` was refused: the object moved. Forget the lease.
    pub fn lost(&self, object: &ObjectRef, fence: i64) {
        self.metrics.fence_rejections.inc();
        let mut leases = self.leases.lock().unwrap();
        if leases.get(object).is_some_and(|l| l.fence == fence) {
            leases.remove(object);
        }
        self.metrics.leases_held.set(leases.len() as i64);
        tracing::info!(object = %object, fence, "lease lost: another replica owns the object now");
    }

    /// Renews the leases used recently; lets idle ones go so any replica can
    /// take them at once.
    pub async fn renew(&self) -> Result<(), StoreError> {
        let idle_after = self.lease * 2;
        let now = Instant::now();
        let (keep, idle): (Vec<_>, Vec<_>) = {
            let leases = self.leases.lock().unwrap();
            leases
                .iter()
                .map(|(object, lease)| (object.clone(), lease.fence, now.duration_since(lease.last_used) < idle_after))
                .partition(|(_, _, recent)| *recent)
        };
        if !idle.is_empty() {
            let idle: Vec<_> = idle.into_iter().map(|(o, f, _)| (o, f)).collect();
            self.forget(&idle);
            self.writer.run(Release { me: self.me.instance.clone(), leases: idle }).await?;
        }
        if keep.is_empty() {
            return Ok(());
        }
        let keep: Vec<_> = keep.into_iter().map(|(o, f, _)| (o, f)).collect();
        let sent_at = Instant::now();
        let renewed = self
            .writer
            .run(Renew {
                me: self.me.instance.clone(),
                leases: keep.clone(),
                expires_at_ms: now_ms() + self.lease.as_millis() as i64,
            })
            .await?;
        let mut leases = self.leases.lock().unwrap();
        for ((object, fence), ok) in keep.iter().zip(renewed) {
            match leases.get_mut(object) {
                Some(lease) if lease.fence == *fence && ok => lease.valid_until = sent_at + self.lease,
                Some(lease) if lease.fence == *fence => {
                    tracing::info!(object = %object, fence, "lease could not be renewed: another replica took it");
                    leases.remove(object);
                }
                _ => {}
            }
        }
        self.metrics.leases_held.set(leases.len() as i64);
        Ok(())
    }

    fn forget(&self, objects: &[(ObjectRef, i64)]) {
        let mut leases = self.leases.lock().unwrap();
        for (object, fence) in objects {
            if leases.get(object).is_some_and(|l| l.fence == *fence) {
                leases.remove(object);
            }
        }
        self.metrics.leases_held.set(leases.len() as i64);
    }

    /// Gives every lease back (graceful shutdown), so peers take over at once.
    pub async fn release_all(&self) -> Result<usize, StoreError> {
        let held: Vec<(ObjectRef, i64)> = {
            let mut leases = self.leases.lock().unwrap();
            let held = leases.iter().map(|(o, l)| (o.clone(), l.fence)).collect();
            leases.clear();
            held
        };
        self.metrics.leases_held.set(0);
        let count = held.len();
        if count > 0 {
            self.writer.run(Release { me: self.me.instance.clone(), leases: held }).await?;
        }
        Ok(count)
    }

    /// Renews leases every third of a term until `shutdown`.
    pub fn spawn_renewal(self: Arc<Self>, shutdown: CancellationToken) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(self.lease / 3);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tick.tick() => {
                        if let Err(err) = self.renew().await {
                            tracing::warn!(error = %err, "lease renewal failed; will retry");
                        }
                    }
                }
            }
        })
    }
}

enum Acquired {
    Ours { fence: i64 },
    HeldBy(Owner),
}

/// Takes the object's row if it is free, expired, already ours, or held by an
/// earlier process at our own address (it cannot be alive: we hold the port).
/// Taking it from anyone else bumps the fence.
struct Acquire {
    object: ObjectRef,
    me: Replica,
    now_ms: i64,
    expires_at_ms: i64,
}

impl Work for Acquire {
    type Output = Acquired;

    fn apply<'a>(&'a mut self, conn: &'a Session) -> BoxFuture<'a, Result<Acquired, StoreError>> {
        Box::pin(async move {
            let ObjectRef { ns, id } = &self.object;
            let mut rows = conn
                .query(
                    "INSERT INTO objects (ns, id, version, fence, owner, owner_url, owner_machine,
                                          lease_expires_at, created_at, updated_at)
                     VALUES (?1, ?2, 0, 1, ?3, ?4, ?5, ?6, ?7, ?7)
                     ON CONFLICT (ns, id) DO UPDATE SET
                       fence = CASE WHEN objects.owner IS ?3 THEN objects.fence ELSE objects.fence + 1 END,
                       owner = excluded.owner,
                       owner_url = excluded.owner_url,
                       owner_machine = excluded.owner_machine,
                       lease_expires_at = excluded.lease_expires_at
                     WHERE objects.owner IS NULL OR objects.owner = ?3
                        OR objects.lease_expires_at <= ?7 OR objects.owner_url = ?4
                     RETURNING fence",
                    params![
                        ns.as_str(),
                        id.as_str(),
                        self.me.instance.as_str(),
                        self.me.url.as_str(),
                        self.me.machine.clone(),
                        self.expires_at_ms,
                        self.now_ms
                    ],
                )
                .await?;
            if let Some(row) = rows.next().await? {
                return Ok(Acquired::Ours { fence: row.get(0)? });
            }
            drop(rows);
            let mut rows = conn
                .query(
                    "SELECT owner, owner_url, owner_machine, lease_expires_at FROM objects WHERE ns = ?1 AND id = ?2",
                    params![ns.as_str(), id.as_str()],
                )
                .await?;
            let row = rows
                .next()
                .await?
                .ok_or_else(|| StoreError::Internal(format!("object row {} vanished during acquire", self.object)))?;
            Ok(Acquired::HeldBy(Owner {
                instance: row.get::<Option<String>>(0)?.unwrap_or_default(),
                url: row.get(1)?,
                machine: row.get(2)?,
                lease_expires_at_ms: row.get(3)?,
            }))
        })
    }

    fn keep(output: &Acquired) -> bool {
        matches!(output, Acquired::Ours { .. })
    }
}

/// Extends leases that are still ours (same owner and fence); one bool per lease.
struct Renew {
    me: String,
    leases: Vec<(ObjectRef, i64)>,
    expires_at_ms: i64,
}

impl Work for Renew {
    type Output = Vec<bool>;

    fn apply<'a>(&'a mut self, conn: &'a Session) -> BoxFuture<'a, Result<Vec<bool>, StoreError>> {
        Box::pin(async move {
            let mut renewed = Vec::with_capacity(self.leases.len());
            for (object, fence) in &self.leases {
                let n = conn
                    .execute(
                        "UPDATE objects SET lease_expires_at = ?5
                         WHERE ns = ?1 AND id = ?2 AND owner = ?3 AND fence = ?4",
                        params![object.ns.as_str(), object.id.as_str(), self.me.as_str(), *fence, self.expires_at_ms],
                    )
                    .await?;
                renewed.push(n == 1);
            }
            Ok(renewed)
        })
    }

    fn keep(_: &Vec<bool>) -> bool {
        true
    }
}

/// Clears the owner of rows that are still ours, so the next acquirer need not wait.
struct Release {
    me: String,
    leases: Vec<(ObjectRef, i64)>,
}

impl Work for Release {
    type Output = ();

    fn apply<'a>(&'a mut self, conn: &'a Session) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            for (object, fence) in &self.leases {
                conn.execute(
                    "UPDATE objects SET owner = NULL, owner_url = NULL, owner_machine = NULL, lease_expires_at = 0
                     WHERE ns = ?1 AND id = ?2 AND owner = ?3 AND fence = ?4",
                    params![object.ns.as_str(), object.id.as_str(), self.me.as_str(), *fence],
                )
                .await?;
            }
            Ok(())
        })
    }

    fn keep(_: &()) -> bool {
        true
    }
}
