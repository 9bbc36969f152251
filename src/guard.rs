//! Object leases and fencing tokens, and the owner's resident state they guard.
//!
//! Safety of writes comes from the fence check every write runs inside its
//! own transaction (`fence_assertion`): a replica whose fence is stale can
//! never commit. Leases and clocks decide *who should* write (liveness), so
//! that writes go to one replica instead of fighting over the fence, and
//! when the owner may answer reads from memory (`readable`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use libsql::Value;
use tokio_util::sync::CancellationToken;

use crate::clock::now_ms;
use crate::db::batch::Stmt;
use crate::db::{numbered, Shape, StoreError};
use crate::model::ObjectRef;
use crate::resident::ResidentState;
use crate::telemetry::Metrics;
use crate::writer::{BoxFuture, Planner, Settled, Touches, Work, Writer, Writes};

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
    /// We hold the lease: write under it.
    Local(HeldLease),
    /// A live peer holds it.
    Remote(Owner),
}

/// A lease this replica holds: the object, this replica as its owner, and
/// the fencing token. Whatever is written under it (key writes, the
/// exporter's catalog changes) carries its `assertion`, so it commits only
/// while the lease is still this one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldLease {
    pub object: ObjectRef,
    pub owner: String,
    pub fence: i64,
}

impl HeldLease {
    /// The fence check, in the transaction of the write it guards; with
    /// `version`, the object must also still be at that version.
    pub fn assertion(&self, version: Option<i64>) -> Stmt {
        fence_assertion(&self.object, &self.owner, self.fence, version)
    }
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
    /// How long before its end a lease stops vouching for resident reads.
    read_margin: Duration,
    leases: Mutex<HashMap<ObjectRef, Lease>>,
    writer: Writer,
    resident: Arc<ResidentState>,
    metrics: Arc<Metrics>,
}

impl Guard {
    pub fn new(
        me: Replica,
        lease: Duration,
        read_margin: Duration,
        writer: Writer,
        resident: Arc<ResidentState>,
        metrics: Arc<Metrics>,
    ) -> Guard {
        Guard { me, lease, read_margin, leases: Mutex::new(HashMap::new()), writer, resident, metrics }
    }

    pub fn resident(&self) -> &ResidentState {
        &self.resident
    }

    /// Whether this replica may answer a read of `object` from the state
    /// resident under `fence`: it holds that lease, and by its own monotonic
    /// clock the lease is still valid for longer than the read margin. The
    /// lease was measured from before its acquire or renewal was sent, so
    /// another replica can only take the object over after it ends (given
    /// the clock assumption in docs/design.md). A lease that is gone takes
    /// the resident state with it.
    pub fn readable(&self, object: &ObjectRef, fence: i64) -> bool {
        let mut leases = self.leases.lock().unwrap();
        match leases.get_mut(object) {
            Some(lease) if lease.fence == fence => {
                let now = Instant::now();
                // Reads keep a lease in use, like writes: a hot object stays resident.
                lease.last_used = now;
                now + self.read_margin < lease.valid_until
            }
            _ => {
                drop(leases);
                self.resident.drop_object(object);
                false
            }
        }
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
            return Ok(Route::Local(self.held_lease(object, fence)));
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
                Ok(Route::Local(self.held_lease(object, fence)))
            }
            Acquired::HeldBy(owner) => Ok(Route::Remote(owner)),
        }
    }

    fn held_lease(&self, object: &ObjectRef, fence: i64) -> HeldLease {
        HeldLease { object: object.clone(), owner: self.me.instance.clone(), fence }
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

    /// Marks a lease as in use by long work under it (an export cycle of many
    /// snapshots): renewals keep a lease only while it is used, and would
    /// otherwise let it go as idle in the middle of that work.
    pub fn touch(&self, lease: &HeldLease) {
        let mut leases = self.leases.lock().unwrap();
        if let Some(held) = leases.get_mut(&lease.object).filter(|held| held.fence == lease.fence) {
            held.last_used = Instant::now();
        }
    }

    /// A write under `fence` was refused: the object moved. Forget the lease.
    pub fn lost(&self, lease: &HeldLease) {
        let (object, fence) = (&lease.object, lease.fence);
        self.metrics.fence_rejections.inc();
        let mut leases = self.leases.lock().unwrap();
        if leases.get(object).is_some_and(|l| l.fence == fence) {
            leases.remove(object);
        }
        self.resident.drop_under(object, fence);
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
                    self.resident.drop_object(object);
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
                self.resident.drop_object(object);
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
            self.resident.drop_all();
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
    /// The lease is ours under this fence (and what the object held is resident).
    Ours {
        fence: i64,
    },
    HeldBy(Owner),
}

/// The statement that fails unless `object`'s row still names `owner` and
/// `fence` (and, when given, is at `version`): the fence check every write
/// runs in its own transaction. It is an assertion (a statement that errors)
/// rather than a conditional UPDATE because a batch sent as one request can
/// make later steps depend on a step's success, not on its row count. The
/// insert targets `write_assertions`, whose CHECK refuses every row.
pub(crate) fn fence_assertion(object: &ObjectRef, owner: &str, fence: i64, version: Option<i64>) -> Stmt {
    let mut args: Vec<Value> = vec![object.ns.as_str().into(), object.id.as_str().into(), fence.into(), owner.into()];
    match version {
        Some(version) => {
            args.push(version.into());
            Stmt::exec(
                "INSERT INTO write_assertions (failed) SELECT 'fence' WHERE NOT EXISTS (
                     SELECT 1 FROM objects WHERE ns = ?1 AND id = ?2 AND fence = ?3 AND owner = ?4 AND version = ?5)",
                args,
            )
        }
        None => Stmt::exec(
            "INSERT INTO write_assertions (failed) SELECT 'fence' WHERE NOT EXISTS (
                 SELECT 1 FROM objects WHERE ns = ?1 AND id = ?2 AND fence = ?3 AND owner = ?4)",
            args,
        ),
    }
}

/// Takes the object's row if it is free, expired, already ours, or held by an
/// earlier process at our own address (it cannot be alive: we hold the port).
/// Taking it from anyone else bumps the fence. In the same transaction it
/// reads what the object holds, which becomes the owner's resident state.
struct Acquire {
    object: ObjectRef,
    me: Replica,
    now_ms: i64,
    expires_at_ms: i64,
}

impl Work for Acquire {
    type Output = Acquired;

    fn touches(&self) -> Touches<'_> {
        Touches::Object(&self.object)
    }

    fn plan<'a>(&'a mut self, _: &'a mut Planner) -> BoxFuture<'a, Result<Result<Writes, Acquired>, StoreError>> {
        let ObjectRef { ns, id } = &self.object;
        let take = Stmt::query(
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
            vec![
                ns.as_str().into(),
                id.as_str().into(),
                self.me.instance.as_str().into(),
                self.me.url.as_str().into(),
                self.me.machine.clone().into(),
                self.expires_at_ms.into(),
                self.now_ms.into(),
            ],
        );
        let holder = Stmt::query(
            "SELECT owner, owner_url, owner_machine, lease_expires_at FROM objects WHERE ns = ?1 AND id = ?2",
            vec![ns.as_str().into(), id.as_str().into()],
        );
        let [row, keys] = crate::resident::load_statements(&self.object, &self.me.instance);
        Box::pin(async move { Ok(Ok(Writes { assertions: vec![], statements: vec![take, holder, row, keys] })) })
    }

    fn settle(&mut self, settled: Settled<'_>, resident: &ResidentState) -> Acquired {
        let Settled::Committed(outcomes) = settled else { unreachable!("acquiring asserts nothing") };
        let text = |value: &Value| match value {
            Value::Text(text) => Some(text.clone()),
            _ => None,
        };
        if let Some([Value::Integer(fence)]) = outcomes[0].rows().first().map(Vec::as_slice) {
            let loaded = match crate::resident::loaded(outcomes[2].rows(), outcomes[3].rows()) {
                Ok(loaded) => loaded.filter(|l| l.head.fence == *fence),
                Err(err) => {
                    tracing::warn!(error = %err, object = %self.object, "could not read the object's state with its lease");
                    None
                }
            };
            match loaded {
                Some(loaded) => resident.install(&self.object, loaded),
                None => resident.drop_object(&self.object),
            }
            return Acquired::Ours { fence: *fence };
        }
        let row = outcomes[1].rows().first();
        let field = |i: usize| row.and_then(|r| r.get(i));
        Acquired::HeldBy(Owner {
            instance: field(0).and_then(text).unwrap_or_default(),
            url: field(1).and_then(text),
            machine: field(2).and_then(text),
            lease_expires_at_ms: match field(3) {
                Some(Value::Integer(at)) => *at,
                _ => 0,
            },
        })
    }
}

/// Extends leases that are still ours (same owner and fence); one bool per lease.
struct Renew {
    me: String,
    leases: Vec<(ObjectRef, i64)>,
    expires_at_ms: i64,
}

/// Leases per statement of a renewal or release: a replica holding thousands
/// of objects renews them in a handful of statements, not one each.
const LEASES_PER_STATEMENT: usize = 256;

/// `?1`: the new expiry, `?2`: this replica; then ns, id, fence per lease. The
/// rows it answers are the leases renewed.
static RENEW_LEASES: Shape = Shape {
    text: |leases| {
        format!(
            "UPDATE objects SET lease_expires_at = ?1 WHERE owner = ?2 AND (ns, id, fence) IN (VALUES {})
             RETURNING ns, id",
            lease_rows(3, leases)
        )
    },
};

/// `?1`: this replica; then ns, id, fence per lease.
static RELEASE_LEASES: Shape = Shape {
    text: |leases| {
        format!(
            "UPDATE objects SET owner = NULL, owner_url = NULL, owner_machine = NULL, lease_expires_at = 0
             WHERE owner = ?1 AND (ns, id, fence) IN (VALUES {})",
            lease_rows(2, leases)
        )
    },
};

/// `(?first, ?first+1, ?first+2), ...` for `leases` leases.
fn lease_rows(first: usize, leases: usize) -> String {
    (0..leases).map(|i| format!("({})", numbered(first + 3 * i, 3))).collect::<Vec<_>>().join(", ")
}

/// Each chunk of leases as parameters: ns, id, fence per lease, after `lead`.
fn lease_statements(
    shape: &'static Shape,
    lead: Vec<Value>,
    leases: &[(ObjectRef, i64)],
    returning: bool,
) -> Vec<Stmt> {
    leases
        .chunks(LEASES_PER_STATEMENT)
        .map(|chunk| {
            let mut args = lead.clone();
            for (object, fence) in chunk {
                args.extend([object.ns.as_str().into(), object.id.as_str().into(), (*fence).into()]);
            }
            if returning {
                Stmt::query_rows(shape, chunk.len(), args)
            } else {
                Stmt::exec_rows(shape, chunk.len(), args)
            }
        })
        .collect()
}

impl Work for Renew {
    type Output = Vec<bool>;

    fn plan<'a>(&'a mut self, _: &'a mut Planner) -> BoxFuture<'a, Result<Result<Writes, Vec<bool>>, StoreError>> {
        let lead = vec![self.expires_at_ms.into(), self.me.as_str().into()];
        let statements = lease_statements(&RENEW_LEASES, lead, &self.leases, true);
        Box::pin(async move { Ok(Ok(Writes { assertions: vec![], statements })) })
    }

    fn settle(&mut self, settled: Settled<'_>, _: &ResidentState) -> Vec<bool> {
        match settled {
            Settled::Committed(outcomes) => {
                let renewed: std::collections::HashSet<(String, String)> = outcomes
                    .iter()
                    .flat_map(|outcome| outcome.rows())
                    .filter_map(|row| match row.as_slice() {
                        [Value::Text(ns), Value::Text(id)] => Some((ns.clone(), id.clone())),
                        _ => None,
                    })
                    .collect();
                self.leases
                    .iter()
                    .map(|(object, _)| renewed.contains(&(object.ns.clone(), object.id.clone())))
                    .collect()
            }
            Settled::Refused(_) => vec![false; self.leases.len()],
        }
    }
}

/// Clears the owner of rows that are still ours, so the next acquirer need not wait.
struct Release {
    me: String,
    leases: Vec<(ObjectRef, i64)>,
}

impl Work for Release {
    type Output = ();

    fn plan<'a>(&'a mut self, _: &'a mut Planner) -> BoxFuture<'a, Result<Result<Writes, ()>, StoreError>> {
        let statements = lease_statements(&RELEASE_LEASES, vec![self.me.as_str().into()], &self.leases, false);
        Box::pin(async move { Ok(Ok(Writes { assertions: vec![], statements })) })
    }

    fn settle(&mut self, _: Settled<'_>, _: &ResidentState) {}
}
