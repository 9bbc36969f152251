//! The write loop: which queued work goes into the next group, groups in
//! flight (two at most on a server), and settling them in the order sent.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc;

use crate::db::batch::Outcome;
use crate::db::{Database, Session, StoreError};
use crate::model::ObjectRef;
use crate::resident::ResidentState;
use crate::telemetry::Metrics;

use super::batch::{committed, is_refusal, plan_group, run_with_retries, Placed};
use super::{
    CarriedDraft, Context, Job, Planner, Receiver, Settled, Touches, MAX_BYTES_PER_TRANSACTION,
    MAX_JOBS_PER_TRANSACTION, QUEUE_DEPTH,
};

/// A queued job with what the writer needs to order it.
pub(super) struct Queued {
    pub(super) job: Box<dyn Job>,
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

pub(super) async fn write_loop(context: Context, receiver: Receiver) {
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
