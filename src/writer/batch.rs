//! One group as one batch: each job's assertions and statements placed
//! under conditions, COMMIT, and reading what became of them.

use std::collections::HashSet;
use std::time::Duration;

use crate::db::batch::{all, any, failed, not, ok, Cond, Outcome, Steps, Stmt};
use crate::db::{Database, Session, StoreError};
use crate::model::ObjectRef;
use crate::telemetry::Metrics;

use super::line::Queued;
use super::{Planner, Settled, Touches, Writes, ASSERTION_FAILED, BEGIN_ATTEMPTS};

/// Where some jobs' steps are in the batch: one job's own, or the merged
/// segment of the jobs that wrote to one object.
pub(super) struct Placed {
    pub(super) jobs: Vec<usize>,
    /// The object whose rows these steps write, if one.
    pub(super) object: Option<ObjectRef>,
    pub(super) assertions: Vec<u32>,
    pub(super) statements: std::ops::Range<usize>,
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
pub(super) async fn plan_group(
    planner: &mut Planner,
    group: &mut [Queued],
) -> (Option<Steps>, Vec<Placed>, Option<u32>) {
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
pub(super) fn committed(outcomes: Vec<Outcome>, commit: u32, placed: &[Placed]) -> Result<Vec<Outcome>, StoreError> {
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

pub(super) fn is_refusal(message: &str) -> bool {
    message.contains(ASSERTION_FAILED)
}

/// Runs the batch; a quick transient failure to start it is retried. A local
/// file's SQLITE_BUSY is not: its busy handler already waited for the lock,
/// and waiting again would multiply the time the whole queue waits for its
/// 503 (past the request timeout, where outcomes become unknown). A remote
/// request that failed on the wire is not retried either: it may have committed.
pub(super) async fn run_with_retries(
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
