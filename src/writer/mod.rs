//! The single write path. Every change to the database goes through one
//! writer task. While a group commits, new work queues; the next group takes
//! everything queued (bounded) and runs in three steps:
//!
//! 1. **Plan.** Each piece of work decides, from the owner's resident state
//!    (reading the database only on a miss), what it will write and what must
//!    hold for it: assertions, such as "this object's fence and version are
//!    still these", each a statement that fails when it does not hold.
//! 2. **Commit** the group as one transaction of statements with conditions
//!    (`db::batch`): on a libSQL server one request, on a local file the same
//!    steps on the writer's connection. A piece whose assertion fails is
//!    skipped and refused alone; the others commit.
//! 3. **Settle.** Each piece learns its fate and the results of its
//!    statements, updates the resident state, and only then is its caller
//!    answered. Nothing is acknowledged before the commit returns.
//!
//! On a libSQL server the next group is planned and sent while one is still
//! in flight (`line.rs`); groups settle in the order they were sent.
//! `batch.rs` turns one group into one batch of conditioned statements.

use std::any::Any;
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, Mutex};

use crate::db::batch::{Outcome, Stmt};
use crate::db::{Database, StoreError};
use crate::model::ObjectRef;
use crate::resident::ResidentState;
use crate::telemetry::Metrics;
use crate::threads::{self, Priority};

mod batch;
mod line;

use line::write_loop;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Bounds on one group, so a burst cannot make one transaction (or one
/// request to a libSQL server) arbitrarily large.
const MAX_JOBS_PER_TRANSACTION: usize = 512;
const MAX_BYTES_PER_TRANSACTION: usize = 16 * 1024 * 1024;
const QUEUE_DEPTH: usize = 4096;
const BEGIN_ATTEMPTS: u32 = 3;

/// The message of a failed assertion (the CHECK constraint of migration 0005).
pub const ASSERTION_FAILED: &str = "assertion_failed";

/// What a piece of work writes, and what must hold for it to be written.
#[derive(Default)]
pub struct Writes {
    /// Each fails (and so skips this work's statements) when what it checks
    /// does not hold. They run before the statements, in order.
    pub assertions: Vec<Stmt>,
    pub statements: Vec<Stmt>,
}

/// How a piece of work ended, for `Work::settle`.
pub enum Settled<'a> {
    /// The transaction committed with its statements: their outcomes, in order.
    Committed(&'a [Outcome]),
    /// The assertion at this index failed; nothing of this work was written.
    Refused(usize),
}

/// A unit of work the writer plans, commits with others, and settles.
pub trait Work: Send + 'static {
    type Output: Send + 'static;

    /// Roughly how many bytes this work writes, to bound groups.
    fn weight(&self) -> usize {
        0
    }

    /// An object whose rows this work reads from the database while planning
    /// (beyond its resident state): two such pieces of work on one object go
    /// into different groups, so the second reads what the first wrote.
    fn reads_rows_of(&self) -> Option<&ObjectRef> {
        None
    }

    /// Whose rows this work writes, so that groups in flight together never
    /// depend on the order the database runs them in. By default shared
    /// rows: its group is the only one in flight.
    fn touches(&self) -> Touches<'_> {
        Touches::Everything
    }

    /// Whether this work may be planned on what a group still in flight
    /// leaves its object as: only work that reads nothing of the object but
    /// what a draft holds (key operations). Anything else waits for that
    /// group to settle.
    fn chains(&self) -> bool {
        false
    }

    /// After planning: the object whose group segment this work joined (its
    /// writes are merged with the group's other writes to that object, see
    /// `GroupDrafts`), instead of steps of its own.
    fn joins(&self) -> Option<&ObjectRef> {
        None
    }

    /// Decides what to write. `Err(output)`: answered without writing.
    fn plan<'a>(
        &'a mut self,
        planner: &'a mut Planner,
    ) -> BoxFuture<'a, Result<Result<Writes, Self::Output>, StoreError>>;

    /// The answer, once the group committed or this work was refused.
    fn settle(&mut self, settled: Settled<'_>, resident: &ResidentState) -> Self::Output;
}

/// See `Work::touches`.
pub enum Touches<'a> {
    /// Rows no other work writes (exported outbox rows).
    Nothing,
    /// One object's rows.
    Object(&'a ObjectRef),
    /// Rows of many objects, or rows shared by all.
    Everything,
}

/// A group's drafts: what its key writes leave each object as. Kept by the
/// work that plans key writes (`objects`); the writer places their merged
/// segments, and carries a draft to the groups planned while this one is in
/// flight.
pub trait GroupDrafts: Send {
    fn objects(&self) -> Vec<ObjectRef>;
    /// Closes `object`'s open segment: its assertion and statements. Later
    /// writes to the object in the same group open a new one.
    fn close_segment(&mut self, object: &ObjectRef) -> Option<Writes>;
    /// `object` as this group leaves it; `None` when later groups cannot plan on it.
    fn carry(&self, object: &ObjectRef) -> Option<CarriedDraft>;
    fn as_any_mut(&mut self) -> &mut dyn Any;
}

/// An object's draft as a group in flight leaves it (see `GroupDrafts::carry`).
pub type CarriedDraft = Arc<dyn Any + Send + Sync>;

/// What planning may use: the database for misses, the resident state, and
/// what earlier work of the same group (or of a group in flight) will have written.
pub struct Planner {
    pub db: Arc<Database>,
    pub resident: Arc<ResidentState>,
    /// This group's number.
    pub group: u64,
    /// Every group up to this one has settled.
    pub settled_through: u64,
    /// Objects that groups in flight write to, as the latest of them leaves
    /// them: this group's key writes to them are planned on these.
    pub carried: HashMap<ObjectRef, CarriedDraft>,
    pub drafts: Option<Box<dyn GroupDrafts>>,
    /// Database reads planning made (misses), counted as round trips on a server.
    pub reads: u64,
    /// Whether the group's batch was sent.
    pub sent: bool,
}

/// Object-safe form of a queued `Work` with its reply channel.
trait Job: Send {
    fn weight(&self) -> usize;
    fn reads_rows_of(&self) -> Option<ObjectRef>;
    fn touches(&self) -> Touches<'_>;
    fn chains(&self) -> bool;
    fn joins(&self) -> Option<ObjectRef>;
    /// `Ok(None)`: answered already.
    fn plan<'a>(&'a mut self, planner: &'a mut Planner) -> BoxFuture<'a, Result<Option<Writes>, StoreError>>;
    fn settle(&mut self, settled: Settled<'_>, resident: &ResidentState);
    fn fail(&mut self, err: StoreError);
    fn answered(&self) -> bool;
    fn finish(self: Box<Self>);
}

struct Pending<W: Work> {
    work: W,
    answer: Option<Result<W::Output, StoreError>>,
    reply: oneshot::Sender<Result<W::Output, StoreError>>,
}

impl<W: Work> Job for Pending<W> {
    fn weight(&self) -> usize {
        self.work.weight()
    }

    fn reads_rows_of(&self) -> Option<ObjectRef> {
        self.work.reads_rows_of().cloned()
    }

    fn touches(&self) -> Touches<'_> {
        self.work.touches()
    }

    fn chains(&self) -> bool {
        self.work.chains()
    }

    fn joins(&self) -> Option<ObjectRef> {
        self.work.joins().cloned()
    }

    fn plan<'a>(&'a mut self, planner: &'a mut Planner) -> BoxFuture<'a, Result<Option<Writes>, StoreError>> {
        Box::pin(async move {
            match self.work.plan(planner).await? {
                Ok(writes) => Ok(Some(writes)),
                Err(output) => {
                    self.answer = Some(Ok(output));
                    Ok(None)
                }
            }
        })
    }

    fn settle(&mut self, settled: Settled<'_>, resident: &ResidentState) {
        self.answer = Some(Ok(self.work.settle(settled, resident)));
    }

    fn fail(&mut self, err: StoreError) {
        self.answer = Some(Err(err));
    }

    fn answered(&self) -> bool {
        self.answer.is_some()
    }

    fn finish(self: Box<Self>) {
        let answer = self.answer.unwrap_or_else(|| Err(StoreError::Internal("work finished without an answer".into())));
        // The caller may have gone (timeout, disconnect); the commit stands regardless.
        let _ = self.reply.send(answer);
    }
}

#[derive(Clone)]
pub struct Writer {
    queue: mpsc::Sender<Box<dyn Job>>,
}

impl Writer {
    /// Starts the writer. On a local file it runs on a thread of its own, so
    /// fsyncs and lock waits never block the threads that serve requests.
    pub fn spawn(db: Arc<Database>, resident: Arc<ResidentState>, metrics: Arc<Metrics>) -> Writer {
        let (queue, receiver) = mpsc::channel(QUEUE_DEPTH);
        let receiver = Arc::new(Mutex::new(receiver));
        let context = Context { db: db.clone(), resident, metrics };
        if db.is_remote() {
            tokio::spawn(supervise(context, receiver));
        } else {
            threads::spawn("statehouse-writer", Priority::Normal, move |_| supervise(context, receiver))
                .expect("spawn the writer thread");
        }
        Writer { queue }
    }

    /// Queues `work` for the next group and waits until it committed (or not).
    pub async fn run<W: Work>(&self, work: W) -> Result<W::Output, StoreError> {
        let (reply, answer) = oneshot::channel();
        let job: Box<dyn Job> = Box::new(Pending { work, answer: None, reply });
        self.queue.send(job).await.map_err(|_| StoreError::Unavailable("the writer has stopped".into()))?;
        answer.await.map_err(|_| StoreError::Unavailable("the writer restarted before committing".into()))?
    }
}

#[derive(Clone)]
struct Context {
    db: Arc<Database>,
    resident: Arc<ResidentState>,
    metrics: Arc<Metrics>,
}

type Receiver = Arc<Mutex<mpsc::Receiver<Box<dyn Job>>>>;

/// Restarts the write loop if it ever panics, so one bad group cannot stop
/// all writes. Ends when every `Writer` is dropped.
async fn supervise(context: Context, receiver: Receiver) {
    loop {
        let task = tokio::spawn(write_loop(context.clone(), receiver.clone()));
        match task.await {
            Ok(()) => return,
            Err(err) => {
                tracing::error!(error = %err, "writer task failed; restarting it");
                // What the lost groups planned may or may not have committed.
                context.resident.drop_all();
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}
