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
//! in flight (see `Line`); groups settle in the order they were sent.

use std::any::Any;
use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, Mutex};

use crate::db::batch::{all, any, failed, not, ok, Cond, Outcome, Steps, Stmt};
use crate::db::{Database, Session, StoreError};
use crate::model::ObjectRef;
use crate::resident::ResidentState;
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

/// A queued job with what the writer needs to order it.
struct Queued {
    job: Box<dyn Job>,
    /// Arrival order: jobs of one object are planned in this order.
    arrival: u64,
    touches: Touched,
    chains: bool,
    /// Refused once because the group it was planned on did not commit as
    /// planned: planned again, never on a group in flight.
    retried: bool,
}

/// `Touches`, owned.
enum Touched {
    Nothing,
    Object(ObjectRef),
    Everything,
}

/// A group sent (or being sent) to the database.
struct Flight {
    seq: u64,
    group: Vec<Queued>,
    placed: Vec<Placed>,
    /// The COMMIT step; `None` when the group had nothing to write.
    commit: Option<u32>,
    /// Objects counted in `Line::touching` for this group.
    touched: Vec<ObjectRef>,
    /// Objects the group drafted: unknown if it fails.
    drafted: Vec<ObjectRef>,
    /// Objects this group was planned on as a group before it leaves them.
    chained: HashSet<ObjectRef>,
    /// It touches shared rows: no other group is in flight with it.
    alone: bool,
    started: Instant,
    sent: Sent,
}

enum Sent {
    Running(tokio::task::JoinHandle<Result<Vec<Outcome>, StoreError>>),
    Done(Result<Vec<Outcome>, StoreError>),
}

impl Flight {
    /// Waits for the database's answer (cancel-safe: the request runs on).
    async fn finish(&mut self) {
        if let Sent::Running(handle) = &mut self.sent {
            let answer = handle.await.unwrap_or_else(|err| {
                Err(StoreError::Unavailable(format!("the request to the database was lost: {err}")))
            });
            self.sent = Sent::Done(answer);
        }
    }

    fn finished(&self) -> bool {
        match &self.sent {
            Sent::Running(handle) => handle.is_finished(),
            Sent::Done(_) => true,
        }
    }
}

/// The write loop's state between groups.
///
/// Groups in flight together must not depend on their order on the server,
/// except in one planned way. So a job waits (`deferred`) while a group in
/// flight touches its object, unless it is a key operation and that group's
/// draft of the object is known (`carried`): then it is planned on that
/// draft, and its fence assertion names the version the earlier group
/// leaves. If the earlier group did not commit as planned (or the server ran
/// the later one first), that assertion fails and the job is planned again
/// once the object has settled, instead of being answered as refused.
/// Work that touches shared rows (lease renewals, garbage, the catalog) goes
/// alone. On a local file one group is in flight at a time.
struct Line {
    db: Arc<Database>,
    resident: Arc<ResidentState>,
    metrics: Arc<Metrics>,
    depth: usize,
    /// Local files: the connection with the statements prepared on it.
    conn: Option<Session>,
    /// Jobs waiting for an object in flight, by arrival.
    deferred: Vec<Queued>,
    in_flight: VecDeque<Flight>,
    /// Groups in flight per object.
    touching: HashMap<ObjectRef, usize>,
    /// Each object in flight as its latest group leaves it, with that group.
    carried: HashMap<ObjectRef, (u64, CarriedDraft)>,
    arrivals: u64,
    next_group: u64,
    /// Every group up to this one has settled.
    settled_through: u64,
    queue_open: bool,
}

async fn write_loop(context: Context, receiver: Receiver) {
    let Context { db, resident, metrics } = context;
    let mut receiver = receiver.lock().await;
    // Two overlap one group's commit on the server with the next one's trip
    // over the network and its planning here; the server runs them one after
    // the other (each holds its write lock), in either order.
    let depth = if db.is_remote() { crate::db::REMOTE_WRITES_IN_FLIGHT } else { 1 };
    let mut line = Line {
        db,
        resident,
        metrics,
        depth,
        conn: None,
        deferred: Vec::new(),
        in_flight: VecDeque::new(),
        touching: HashMap::new(),
        carried: HashMap::new(),
        arrivals: 0,
        next_group: 1,
        settled_through: 0,
        queue_open: true,
    };
    loop {
        while line.in_flight.front().is_some_and(Flight::finished) {
            line.settle_oldest().await;
        }
        let group = if line.worth_sending(receiver.len()) { line.gather(&mut receiver) } else { Vec::new() };
        if !group.is_empty() {
            line.send(group).await;
            continue;
        }
        // Nothing to send now: wait for new work or for the oldest group.
        let can_take = line.queue_open && line.deferred.len() < QUEUE_DEPTH;
        match line.in_flight.front_mut() {
            None if !can_take => return,
            None => match receiver.recv().await {
                Some(job) => line.defer(job),
                None => line.queue_open = false,
            },
            Some(oldest) => {
                tokio::select! {
                    job = receiver.recv(), if can_take => match job {
                        Some(job) => line.defer(job),
                        None => line.queue_open = false,
                    },
                    () = oldest.finish() => line.settle_oldest().await,
                }
            }
        }
    }
}

impl Line {
    fn queued(&mut self, job: Box<dyn Job>) -> Queued {
        self.arrivals += 1;
        let touches = match job.touches() {
            Touches::Nothing => Touched::Nothing,
            Touches::Object(object) => Touched::Object(object.clone()),
            Touches::Everything => Touched::Everything,
        };
        let chains = job.chains();
        Queued { job, arrival: self.arrivals, touches, chains, retried: false }
    }

    fn defer(&mut self, job: Box<dyn Job>) {
        let queued = self.queued(job);
        self.requeue(queued);
    }

    /// Back among the waiting jobs, in arrival order.
    fn requeue(&mut self, queued: Queued) {
        let at = self.deferred.partition_point(|q| q.arrival < queued.arrival);
        self.deferred.insert(at, queued);
    }

    /// Whether to send a group now, with `queued` jobs in the queue. With a
    /// group in flight, only one at least as large: every group costs the
    /// server a commit (its CPU and fsyncs), so on a busy server splitting
    /// the same writes into more, smaller groups is slower, while a group as
    /// large as the one in flight overlaps its trip with that one's commit.
    fn worth_sending(&self, queued: usize) -> bool {
        let Some(newest) = self.in_flight.back() else { return true };
        let waiting = self.deferred.len() + queued;
        self.in_flight.len() < self.depth
            && !newest.alone
            && waiting >= newest.group.len().min(MAX_JOBS_PER_TRANSACTION)
    }

    /// The next group: waiting jobs first (they arrived earlier), then the
    /// queue, up to the group's bounds. Jobs that must wait stay deferred.
    fn gather(&mut self, receiver: &mut mpsc::Receiver<Box<dyn Job>>) -> Vec<Queued> {
        let alone_possible = self.in_flight.is_empty();
        let mut group: Vec<Queued> = Vec::new();
        let mut weight = 0;
        // Objects with a job left waiting in this pass: later jobs of theirs wait too.
        let mut blocked: HashSet<ObjectRef> = HashSet::new();
        // Objects whose rows a job of this group reads while planning.
        let mut reading: HashSet<ObjectRef> = HashSet::new();
        let mut barrier = false;
        let mut waiting = std::mem::take(&mut self.deferred).into_iter();
        let mut kept = Vec::new();
        loop {
            if barrier || group.len() >= MAX_JOBS_PER_TRANSACTION || weight >= MAX_BYTES_PER_TRANSACTION {
                kept.extend(waiting);
                break;
            }
            let queued = match waiting.next() {
                Some(queued) => queued,
                None if kept.len() >= QUEUE_DEPTH || !self.queue_open => break,
                None => match receiver.try_recv() {
                    Ok(job) => self.queued(job),
                    Err(_) => break,
                },
            };
            let goes = match &queued.touches {
                Touched::Nothing => true,
                Touched::Everything => {
                    barrier = !alone_possible;
                    alone_possible
                }
                Touched::Object(object) => {
                    let reads = queued.job.reads_rows_of();
                    // A second read of one object's rows in a group would not see the first's writes.
                    let reads_again = reads.is_some() && reading.contains(object);
                    let in_flight = self.touching.contains_key(object);
                    let may_chain = queued.chains && !queued.retried && self.carried.contains_key(object);
                    let goes = !blocked.contains(object) && !reads_again && (!in_flight || may_chain);
                    if goes {
                        reading.extend(reads);
                    } else {
                        blocked.insert(object.clone());
                    }
                    goes
                }
            };
            if goes {
                weight += queued.job.weight();
                group.push(queued);
            } else {
                kept.push(queued);
            }
        }
        self.deferred = kept;
        group
    }

    /// Plans `group` and sends it: on a server without waiting for the answer.
    async fn send(&mut self, mut group: Vec<Queued>) {
        let seq = self.next_group;
        self.next_group += 1;
        let started = Instant::now();
        self.metrics.write_batch_size.observe(group.len() as f64);
        if !self.in_flight.is_empty() {
            self.metrics.write_groups_overlapped.inc();
        }
        let session = if self.db.is_remote() {
            None
        } else {
            match self.local_session().await {
                Ok(session) => Some(session),
                Err(err) => {
                    tracing::warn!(error = %err, "writer cannot connect to the database");
                    for queued in &mut group {
                        queued.job.fail(err.clone());
                    }
                    finish(group);
                    self.settled_through = seq;
                    return;
                }
            }
        };
        let mut touched: Vec<ObjectRef> = Vec::new();
        let mut chained = HashSet::new();
        // Objects touched by work that cannot be planned on a draft: nothing chains on them.
        let mut unchainable = HashSet::new();
        let mut alone = false;
        for queued in &group {
            match &queued.touches {
                Touched::Object(object) => {
                    if self.touching.contains_key(object) {
                        chained.insert(object.clone());
                    }
                    if !queued.chains {
                        unchainable.insert(object.clone());
                    }
                    if !touched.contains(object) {
                        touched.push(object.clone());
                    }
                }
                Touched::Everything => alone = true,
                Touched::Nothing => {}
            }
        }
        let carried = chained.iter().map(|object| (object.clone(), self.carried[object].1.clone())).collect();
        let mut planner = Planner {
            db: self.db.clone(),
            resident: self.resident.clone(),
            group: seq,
            settled_through: self.settled_through,
            carried,
            drafts: None,
            reads: 0,
            sent: false,
        };
        let (steps, placed, commit) = plan_group(&mut planner, &mut group).await;
        let drafted = planner.drafts.as_ref().map(|drafts| drafts.objects()).unwrap_or_default();
        for object in &drafted {
            match planner.drafts.as_ref().and_then(|drafts| drafts.carry(object)) {
                Some(draft) if !unchainable.contains(object) => {
                    self.carried.insert(object.clone(), (seq, draft));
                }
                _ => {
                    self.carried.remove(object);
                }
            }
        }
        for object in &unchainable {
            self.carried.remove(object);
        }
        for object in &touched {
            *self.touching.entry(object.clone()).or_default() += 1;
        }
        if self.db.is_remote() {
            self.metrics.write_round_trips.inc_by(planner.reads + u64::from(planner.sent));
        }
        let sent = match (steps, &session) {
            (None, _) => Sent::Done(Ok(Vec::new())),
            (Some(mut steps), None) => {
                let (db, metrics) = (self.db.clone(), self.metrics.clone());
                Sent::Running(tokio::spawn(async move { run_with_retries(&db, None, &mut steps, &metrics).await }))
            }
            (Some(mut steps), Some(session)) => {
                Sent::Done(run_with_retries(&self.db, Some(session), &mut steps, &self.metrics).await)
            }
        };
        self.in_flight.push_back(Flight {
            seq,
            group,
            placed,
            commit,
            touched,
            drafted,
            chained,
            alone,
            started,
            sent,
        });
    }

    async fn local_session(&mut self) -> Result<Session, StoreError> {
        if let Some(session) = &self.conn {
            return Ok(session.clone());
        }
        let session = self.db.session().await?;
        self.conn = Some(session.clone());
        Ok(session)
    }

    /// Settles the oldest group in flight: answers its jobs (or plans again
    /// those refused only because of the group before them), updates the
    /// resident state, and lets waiting jobs of its objects go.
    async fn settle_oldest(&mut self) {
        let Some(mut flight) = self.in_flight.pop_front() else { return };
        flight.finish().await;
        let Flight { seq, mut group, placed, commit, touched, drafted, chained, started, sent, .. } = flight;
        let Sent::Done(answer) = sent else { unreachable!("finished above") };
        self.settled_through = seq;
        for object in &touched {
            if let Some(count) = self.touching.get_mut(object) {
                *count -= 1;
                if *count == 0 {
                    self.touching.remove(object);
                }
            }
        }
        for object in &drafted {
            if self.carried.get(object).is_some_and(|(by, _)| *by == seq) {
                self.carried.remove(object);
            }
        }
        let outcome = answer.and_then(|outcomes| match commit {
            None => Ok(outcomes),
            Some(commit) => committed(outcomes, commit, &placed),
        });
        let mut retry = Vec::new();
        match outcome {
            Ok(outcomes) => {
                self.metrics.commit_seconds.observe(started.elapsed().as_secs_f64());
                for place in placed {
                    let refused =
                        place.assertions.iter().enumerate().find_map(|(index, step)| match &outcomes[*step as usize] {
                            Outcome::Failed(err) => Some((index, err)),
                            _ => None,
                        });
                    if refused.is_some() {
                        // The objects of a refused segment are not as any later group planned them.
                        for object in place.object.iter() {
                            self.carried.remove(object);
                        }
                    }
                    let replan = refused.is_some_and(|(_, err)| is_refusal(&err.message))
                        && place.object.as_ref().is_some_and(|object| chained.contains(object));
                    for job in place.jobs {
                        let queued = &mut group[job];
                        match refused {
                            _ if replan => retry.push(job),
                            None => queued
                                .job
                                .settle(Settled::Committed(&outcomes[place.statements.clone()]), &self.resident),
                            Some((index, err)) if is_refusal(&err.message) => {
                                queued.job.settle(Settled::Refused(index), &self.resident)
                            }
                            // The assertion itself could not run: these jobs did not apply, the others did.
                            Some((_, err)) => queued.job.fail(err.class.clone()),
                        }
                    }
                }
            }
            Err(err) => {
                tracing::warn!(error = %err, jobs = group.len(), "write transaction failed; nothing in it was committed");
                // What these objects hold is unknown now (the outcome may be unknown too).
                for object in &drafted {
                    self.resident.drop_object(object);
                    self.carried.remove(object);
                }
                if self.conn.as_ref().is_some_and(|session| !session.is_autocommit()) {
                    // Left inside a transaction: start over on a fresh connection.
                    self.conn = None;
                }
                for queued in group.iter_mut().filter(|queued| !queued.job.answered()) {
                    queued.job.fail(err.clone());
                }
            }
        }
        if !retry.is_empty() {
            self.metrics.write_replans.inc_by(retry.len() as u64);
            retry.sort_unstable();
            for index in retry.into_iter().rev() {
                let mut queued = group.swap_remove(index);
                queued.retried = true;
                self.requeue(queued);
            }
        }
        finish(group);
        // After the answers: a checkpoint the writer finishes delays the next group only.
        if let Some(session) = &self.conn {
            self.db.committed(session).await;
        }
    }
}

fn finish(group: Vec<Queued>) {
    for queued in group {
        queued.job.finish();
    }
}

/// Where some jobs' steps are in the batch: one job's own, or the merged
/// segment of the jobs that wrote to one object.
struct Placed {
    jobs: Vec<usize>,
    /// The object whose rows these steps write, if one.
    object: Option<ObjectRef>,
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
    fn place(&mut self, writes: Writes, jobs: Vec<usize>, object: Option<ObjectRef>) {
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
        self.placed.push(Placed { jobs, object, assertions, statements: first_statement..self.steps.steps.len() });
    }

    /// Places the open segments of `joined` objects.
    fn close_segments(&mut self, planner: &mut Planner, joined: &mut Vec<(ObjectRef, Vec<usize>)>) {
        for (object, jobs) in joined.drain(..) {
            if let Some(writes) = planner.drafts.as_mut().and_then(|drafts| drafts.close_segment(&object)) {
                self.place(writes, jobs, Some(object));
            }
        }
    }
}

/// Plans every job of the group into one batch: the steps (none when
/// nothing is to be written), where each job's steps are, and the COMMIT
/// step. Jobs answered in planning (refusals, failed reads) keep their answers.
async fn plan_group(planner: &mut Planner, group: &mut [Queued]) -> (Option<Steps>, Vec<Placed>, Option<u32>) {
    let mut steps = Steps::default();
    let begin = steps.push(Stmt::exec("BEGIN IMMEDIATE", vec![]), None);
    let mut batch = Batch { steps, healthy: ok(begin), placed: Vec::with_capacity(group.len()) };
    // Objects whose key writes are being merged, in the order their segments opened.
    let mut joined: Vec<(ObjectRef, Vec<usize>)> = Vec::new();
    for (index, queued) in group.iter_mut().enumerate() {
        let job = &mut queued.job;
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
        let object = match job.touches() {
            Touches::Object(object) => Some(object.clone()),
            _ => None,
        };
        batch.place(writes, vec![index], object);
    }
    batch.close_segments(planner, &mut joined);
    let Batch { mut steps, healthy, placed } = batch;
    if placed.is_empty() {
        return (None, placed, None);
    }
    let commit = steps.push(Stmt::exec("COMMIT", vec![]), Some(healthy));
    steps.push(Stmt::exec("ROLLBACK", vec![]), Some(all(vec![ok(begin), not(ok(commit))])));
    planner.sent = true;
    (Some(steps), placed, Some(commit))
}

/// The outcomes if the transaction committed; otherwise why not: the first
/// step that failed for a reason other than a refusal.
fn committed(outcomes: Vec<Outcome>, commit: u32, placed: &[Placed]) -> Result<Vec<Outcome>, StoreError> {
    if outcomes[commit as usize].is_done() {
        return Ok(outcomes);
    }
    let assertion_steps: HashSet<u32> = placed.iter().flat_map(|p| p.assertions.iter().copied()).collect();
    let cause = outcomes.iter().enumerate().find_map(|(step, outcome)| match outcome {
        Outcome::Failed(err) if !assertion_steps.contains(&(step as u32)) || !is_refusal(&err.message) => {
            Some(err.class.clone())
        }
        _ => None,
    });
    Err(cause.unwrap_or_else(|| StoreError::Internal("the transaction did not commit".into())))
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
