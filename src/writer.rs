//! The single write path. Every change to the database goes through one
//! writer task. While one group commits, new work queues; the next group
//! takes everything queued (bounded) and runs in three steps:
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

use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, Mutex};

use crate::db::batch::{all, any, failed, not, ok, Cond, Outcome, Steps, Stmt};
use crate::db::{Database, Session, StoreError};
use crate::objects::resident::ResidentState;
use crate::objects::ObjectRef;
use crate::telemetry::Metrics;
use crate::threads::{self, Priority};

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

    /// After planning: the object whose group segment this work joined (its
    /// writes are merged with the group's other writes to that object, see
    /// `objects::Drafts`), instead of steps of its own.
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

/// What planning may use: the database for misses, the resident state, and
/// what earlier work of the same group will have written.
pub struct Planner {
    pub db: Arc<Database>,
    pub resident: Arc<ResidentState>,
    pub drafts: crate::objects::Drafts,
    /// Database reads planning made (misses), counted as round trips on a server.
    pub reads: u64,
    /// Whether the group's batch was sent.
    pub sent: bool,
}

/// Object-safe form of a queued `Work` with its reply channel.
trait Job: Send {
    fn weight(&self) -> usize;
    fn reads_rows_of(&self) -> Option<ObjectRef>;
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
                // What the lost group planned may or may not have committed.
                context.resident.drop_all();
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn write_loop(context: Context, receiver: Receiver) {
    let Context { db, resident, metrics } = context;
    let mut receiver = receiver.lock().await;
    // Local files: the connection with the statements prepared on it.
    let mut conn: Option<Session> = None;
    // A job that had to wait for the next group.
    let mut held_over: Option<Box<dyn Job>> = None;
    loop {
        let first = match held_over.take() {
            Some(job) => job,
            None => match receiver.recv().await {
                Some(job) => job,
                None => return,
            },
        };
        let mut weight = first.weight();
        let mut reading: HashSet<ObjectRef> = first.reads_rows_of().into_iter().collect();
        let mut group = vec![first];
        while group.len() < MAX_JOBS_PER_TRANSACTION && weight < MAX_BYTES_PER_TRANSACTION {
            let Ok(job) = receiver.try_recv() else { break };
            if let Some(object) = job.reads_rows_of() {
                if !reading.insert(object) {
                    held_over = Some(job);
                    break;
                }
            }
            weight += job.weight();
            group.push(job);
        }

        let session = if db.is_remote() {
            None
        } else {
            match &conn {
                Some(session) => Some(session.clone()),
                None => match db.session().await {
                    Ok(session) => {
                        conn = Some(session.clone());
                        Some(session)
                    }
                    Err(err) => {
                        tracing::warn!(error = %err, "writer cannot connect to the database");
                        fail_all(group, err);
                        continue;
                    }
                },
            }
        };
        let started = Instant::now();
        metrics.write_batch_size.observe(group.len() as f64);
        let mut planner =
            Planner { db: db.clone(), resident: resident.clone(), drafts: Default::default(), reads: 0, sent: false };
        let committed = commit_group(&db, session.as_ref(), &mut planner, &mut group, &metrics).await;
        if db.is_remote() {
            metrics.write_round_trips.inc_by(planner.reads + u64::from(planner.sent));
        }
        match committed {
            Ok(()) => metrics.commit_seconds.observe(started.elapsed().as_secs_f64()),
            Err(err) => {
                tracing::warn!(error = %err, jobs = group.len(), "write transaction failed; nothing in it was committed");
                // What these objects hold is unknown now (the outcome may be unknown too).
                for object in planner.drafts.objects() {
                    resident.drop_object(object);
                }
                if let Some(session) = &session {
                    if !session.is_autocommit() {
                        // Left inside a transaction: start over on a fresh connection.
                        conn = None;
                    }
                }
                for job in group.iter_mut().filter(|job| !job.answered()) {
                    job.fail(err.clone());
                }
            }
        }
        for job in group {
            job.finish();
        }
        // After the answers: a checkpoint the writer finishes delays the next group only.
        if let Some(session) = &session {
            db.committed(session).await;
        }
    }
}

fn fail_all(group: Vec<Box<dyn Job>>, err: StoreError) {
    for mut job in group {
        job.fail(err.clone());
        job.finish();
    }
}

/// Where some jobs' steps are in the batch: one job's own, or the merged
/// segment of the jobs that wrote to one object.
struct Placed {
    jobs: Vec<usize>,
    assertions: Vec<u32>,
    statements: std::ops::Range<usize>,
}

/// The batch being built.
struct Batch {
    steps: Steps,
    /// Holds when everything placed so far either succeeded or was refused by an assertion.
    healthy: Cond,
    placed: Vec<Placed>,
}

impl Batch {
    /// Appends `writes` for `jobs`: the first step runs only if everything
    /// before it succeeded or was refused; each later step only if the one
    /// before it succeeded.
    fn place(&mut self, writes: Writes, jobs: Vec<usize>) {
        let mut previous: Option<u32> = None;
        let mut assertions = Vec::with_capacity(writes.assertions.len());
        for stmt in writes.assertions {
            let cond = previous.map_or_else(|| self.healthy.clone(), ok);
            let step = self.steps.push(stmt, Some(cond));
            assertions.push(step);
            previous = Some(step);
        }
        let first_statement = self.steps.steps.len();
        for stmt in writes.statements {
            let cond = previous.map_or_else(|| self.healthy.clone(), ok);
            previous = Some(self.steps.push(stmt, Some(cond)));
        }
        let last = previous.expect("placed writes have steps");
        let mut ends = vec![ok(last)];
        ends.extend(assertions.iter().map(|a| failed(*a)));
        self.healthy = any(ends);
        self.placed.push(Placed { jobs, assertions, statements: first_statement..self.steps.steps.len() });
    }

    /// Places the open segments of `joined` objects.
    fn close_segments(&mut self, planner: &mut Planner, joined: &mut Vec<(ObjectRef, Vec<usize>)>) {
        for (object, jobs) in joined.drain(..) {
            if let Some(writes) = planner.drafts.close_segment(&object) {
                self.place(writes, jobs);
            }
        }
    }
}

/// Plans every job, commits the group as one batch, and settles each job.
/// An error means nothing of the group committed (or its outcome is
/// unknown); jobs answered already (planning refusals, planning failures)
/// keep their answers.
async fn commit_group(
    db: &Database,
    session: Option<&Session>,
    planner: &mut Planner,
    group: &mut [Box<dyn Job>],
    metrics: &Metrics,
) -> Result<(), StoreError> {
    let mut steps = Steps::default();
    let begin = steps.push(Stmt::exec("BEGIN IMMEDIATE", vec![]), None);
    let mut batch = Batch { steps, healthy: ok(begin), placed: Vec::with_capacity(group.len()) };
    // Objects whose key writes are being merged, in the order their segments opened.
    let mut joined: Vec<(ObjectRef, Vec<usize>)> = Vec::new();
    for (index, job) in group.iter_mut().enumerate() {
        let writes = match job.plan(planner).await {
            Ok(Some(writes)) => writes,
            Ok(None) => continue,
            Err(err) => {
                // A read this job needed failed: it alone fails; its drafts were not touched.
                job.fail(err);
                continue;
            }
        };
        if let Some(object) = job.joins() {
            match joined.iter_mut().find(|(open, _)| *open == object) {
                Some((_, jobs)) => jobs.push(index),
                None => joined.push((object, vec![index])),
            }
            continue;
        }
        // Other work goes after the open segments, in case it touches their objects.
        batch.close_segments(planner, &mut joined);
        if writes.assertions.is_empty() && writes.statements.is_empty() {
            job.settle(Settled::Committed(&[]), &planner.resident);
            continue;
        }
        batch.place(writes, vec![index]);
    }
    batch.close_segments(planner, &mut joined);
    let Batch { mut steps, healthy, placed } = batch;
    if placed.is_empty() {
        return Ok(());
    }
    let commit = steps.push(Stmt::exec("COMMIT", vec![]), Some(healthy));
    steps.push(Stmt::exec("ROLLBACK", vec![]), Some(all(vec![ok(begin), not(ok(commit))])));

    planner.sent = true;
    let outcomes = run_with_retries(db, session, &mut steps, metrics).await?;
    if !outcomes[commit as usize].is_done() {
        // Why: the first step that failed for a reason other than a refusal.
        let assertion_steps: HashSet<u32> = placed.iter().flat_map(|p| p.assertions.iter().copied()).collect();
        let cause = outcomes.iter().enumerate().find_map(|(step, outcome)| match outcome {
            Outcome::Failed(err) if !assertion_steps.contains(&(step as u32)) || !is_refusal(&err.message) => {
                Some(err.class.clone())
            }
            _ => None,
        });
        return Err(cause.unwrap_or_else(|| StoreError::Internal("the transaction did not commit".into())));
    }
    for place in placed {
        let refused = place.assertions.iter().enumerate().find_map(|(index, step)| match &outcomes[*step as usize] {
            Outcome::Failed(err) => Some((index, err)),
            _ => None,
        });
        for job in place.jobs {
            let job = &mut group[job];
            match refused {
                None => job.settle(Settled::Committed(&outcomes[place.statements.clone()]), &planner.resident),
                Some((index, err)) if is_refusal(&err.message) => {
                    job.settle(Settled::Refused(index), &planner.resident)
                }
                // The assertion itself could not run: these jobs did not apply, the others did.
                Some((_, err)) => job.fail(err.class.clone()),
            }
        }
    }
    Ok(())
}

fn is_refusal(message: &str) -> bool {
    message.contains(ASSERTION_FAILED)
}

/// Runs the batch; a quick transient failure to start it is retried. A local
/// file's SQLITE_BUSY is not: its busy handler already waited for the lock,
/// and waiting again would multiply the time the whole queue waits for its
/// 503 (past the request timeout, where outcomes become unknown). A remote
/// request that failed on the wire is not retried either: it may have committed.
async fn run_with_retries(
    db: &Database,
    session: Option<&Session>,
    steps: &mut Steps,
    metrics: &Metrics,
) -> Result<Vec<Outcome>, StoreError> {
    let mut attempt = 1;
    loop {
        // (A retry only follows a failed BEGIN, after which no other step ran or gave up its parameters.)
        let outcomes = db.run_batch(session, &mut steps.steps).await?;
        let begin_failed = match &outcomes[0] {
            Outcome::Failed(err) => err.clone(),
            _ => return Ok(outcomes),
        };
        let waited = session.is_some() && begin_failed.message.contains("database is locked");
        if waited || attempt >= BEGIN_ATTEMPTS || !matches!(begin_failed.class, StoreError::Unavailable(_)) {
            return Err(begin_failed.class);
        }
        metrics.transaction_retries.inc();
        tokio::time::sleep(Duration::from_millis(20 * u64::from(attempt))).await;
        attempt += 1;
    }
}
