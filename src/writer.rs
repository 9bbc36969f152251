//! The single write path. Every change to the database goes through one
//! writer task that owns the write connection. While one transaction commits,
//! new work queues; the next transaction takes everything queued (bounded),
//! runs each piece so that one failed condition or lost fence undoes only that
//! piece (inside its own SAVEPOINT, unless the piece checks everything before
//! its first change, as key operations do), commits once, and only then
//! answers each caller. Nothing is acknowledged before the commit returns.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use libsql::{Connection, TransactionBehavior};
use tokio::sync::{mpsc, oneshot, Mutex};

use crate::db::{Database, Session, StoreError};
use crate::telemetry::Metrics;
use crate::threads::{self, Priority};

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Bounds on one transaction, so a burst cannot hold the write lock for long
/// (a remote server rolls back transactions held for more than 5 s).
const MAX_JOBS_PER_TRANSACTION: usize = 512;
const MAX_BYTES_PER_TRANSACTION: usize = 32 * 1024 * 1024;
const QUEUE_DEPTH: usize = 4096;
const BEGIN_ATTEMPTS: u32 = 3;

/// A unit of work run inside the writer's transaction.
pub trait Work: Send + 'static {
    type Output: Send + 'static;

    /// Roughly how many bytes this work writes, to bound transactions.
    fn weight(&self) -> usize {
        0
    }

    /// Runs inside an open transaction. Errors mean the database failed;
    /// a refusal the caller should see (a failed condition) is an `Output`.
    fn apply<'a>(&'a mut self, tx: &'a Session) -> BoxFuture<'a, Result<Self::Output, StoreError>>;

    /// Whether the changes made by `apply` are kept. Refusals roll back their savepoint.
    fn keep(output: &Self::Output) -> bool;

    /// True when `apply` refuses only before changing anything, so it needs no
    /// savepoint; if it fails with an error midway, the whole transaction is abandoned.
    fn refuses_before_writing(&self) -> bool {
        false
    }
}

/// Object-safe form of a queued `Work` with its reply channel.
trait Job: Send {
    fn weight(&self) -> usize;
    fn refuses_before_writing(&self) -> bool;
    fn apply<'a>(&'a mut self, tx: &'a Session) -> BoxFuture<'a, Result<bool, StoreError>>;
    fn finish(self: Box<Self>, fate: Result<(), StoreError>);
}

struct Pending<W: Work> {
    work: W,
    outcome: Option<Result<W::Output, StoreError>>,
    reply: oneshot::Sender<Result<W::Output, StoreError>>,
}

impl<W: Work> Job for Pending<W> {
    fn weight(&self) -> usize {
        self.work.weight()
    }

    fn refuses_before_writing(&self) -> bool {
        self.work.refuses_before_writing()
    }

    fn apply<'a>(&'a mut self, tx: &'a Session) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(async move {
            match self.work.apply(tx).await {
                Ok(output) => {
                    let keep = W::keep(&output);
                    self.outcome = Some(Ok(output));
                    Ok(keep)
                }
                Err(err) => {
                    self.outcome = Some(Err(err.clone()));
                    Err(err)
                }
            }
        })
    }

    fn finish(self: Box<Self>, fate: Result<(), StoreError>) {
        let answer = match (fate, self.outcome) {
            (Err(err), _) => Err(err),
            (Ok(()), Some(outcome)) => outcome,
            (Ok(()), None) => Err(StoreError::Internal("work finished without running".into())),
        };
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
    pub fn spawn(db: Arc<Database>, metrics: Arc<Metrics>) -> Writer {
        let (queue, receiver) = mpsc::channel(QUEUE_DEPTH);
        let receiver = Arc::new(Mutex::new(receiver));
        if db.is_remote() {
            tokio::spawn(supervise(db, receiver, metrics));
        } else {
            threads::spawn("statehouse-writer", Priority::Normal, move |_| supervise(db, receiver, metrics))
                .expect("spawn the writer thread");
        }
        Writer { queue }
    }

    /// Queues `work` for the next transaction and waits until it committed (or not).
    pub async fn run<W: Work>(&self, work: W) -> Result<W::Output, StoreError> {
        let (reply, answer) = oneshot::channel();
        let job: Box<dyn Job> = Box::new(Pending { work, outcome: None, reply });
        self.queue.send(job).await.map_err(|_| StoreError::Unavailable("the writer has stopped".into()))?;
        answer.await.map_err(|_| StoreError::Unavailable("the writer restarted before committing".into()))?
    }
}

/// Restarts the write loop with a fresh connection if it ever panics, so one
/// bad transaction cannot stop all writes. Ends when every `Writer` is dropped.
async fn supervise(db: Arc<Database>, receiver: Arc<Mutex<mpsc::Receiver<Box<dyn Job>>>>, metrics: Arc<Metrics>) {
    loop {
        let task = tokio::spawn(write_loop(db.clone(), receiver.clone(), metrics.clone()));
        match task.await {
            Ok(()) => return,
            Err(err) => {
                tracing::error!(error = %err, "writer task failed; restarting it");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn write_loop(db: Arc<Database>, receiver: Arc<Mutex<mpsc::Receiver<Box<dyn Job>>>>, metrics: Arc<Metrics>) {
    let mut receiver = receiver.lock().await;
    // The connection with the statements prepared on it; replaced together.
    let mut conn: Option<Session> = None;
    while let Some(first) = receiver.recv().await {
        let mut weight = first.weight();
        let mut batch = vec![first];
        while batch.len() < MAX_JOBS_PER_TRANSACTION && weight < MAX_BYTES_PER_TRANSACTION {
            match receiver.try_recv() {
                Ok(job) => {
                    weight += job.weight();
                    batch.push(job);
                }
                Err(_) => break,
            }
        }
        let session = match &conn {
            Some(session) => session.clone(),
            None => match db.session().await {
                Ok(session) => {
                    conn = Some(session.clone());
                    session
                }
                Err(err) => {
                    tracing::warn!(error = %err, "writer cannot connect to the database");
                    fail_all(batch, err);
                    continue;
                }
            },
        };
        let started = Instant::now();
        metrics.write_batch_size.observe(batch.len() as f64);
        if let Err(err) = commit_batch(&session, &mut batch, &metrics, !db.is_remote()).await {
            tracing::warn!(error = %err, jobs = batch.len(), "write transaction failed; nothing in it was committed");
            // A fresh connection next time: the old one may be in a broken state.
            conn = None;
            fail_all(batch, err);
        } else {
            metrics.commit_seconds.observe(started.elapsed().as_secs_f64());
            for job in batch {
                job.finish(Ok(()));
            }
            // After the answers: a checkpoint the writer finishes delays the next transaction only.
            db.committed(&session).await;
        }
    }
}

fn fail_all(batch: Vec<Box<dyn Job>>, err: StoreError) {
    for job in batch {
        job.finish(Err(err.clone()));
    }
}

/// One transaction for the whole batch. Returns an error only when the
/// transaction as a whole did not commit.
async fn commit_batch(
    session: &Session,
    batch: &mut [Box<dyn Job>],
    metrics: &Metrics,
    local: bool,
) -> Result<(), StoreError> {
    let transaction = begin_immediate(session, metrics, local).await?;
    // Statements go through the transaction's own handle: on a remote server
    // each transaction is a stream of its own.
    let tx = session.within(&transaction);
    // Alone in its transaction, a job needs no savepoint: a refusal rolls the
    // whole transaction back. On a remote server that saves two round trips.
    if let [job] = batch {
        if job.apply(&tx).await.unwrap_or(false) {
            transaction.commit().await?;
        } else {
            transaction.rollback().await?;
        }
        return Ok(());
    }
    for job in batch.iter_mut() {
        if job.refuses_before_writing() {
            // No savepoint: a refusal changed nothing, and an error may have
            // changed something, so it abandons the transaction.
            job.apply(&tx).await?;
            continue;
        }
        tx.exec("SAVEPOINT job", ()).await?;
        // On an error the job recorded it: undo only its part and carry on. If
        // even that fails the transaction is unusable and `?` abandons it.
        let keep = job.apply(&tx).await.unwrap_or(false);
        if !keep {
            tx.exec("ROLLBACK TO job", ()).await?;
        }
        tx.exec("RELEASE job", ()).await?;
    }
    transaction.commit().await?;
    Ok(())
}

/// Takes the write lock. A quick transient failure is retried; a local file's
/// SQLITE_BUSY is not: its busy handler already waited `BUSY_TIMEOUT` for the
/// lock, and waiting again would multiply the time the whole queue waits for
/// its 503 (past the request timeout, where outcomes become unknown).
async fn begin_immediate(conn: &Connection, metrics: &Metrics, local: bool) -> Result<libsql::Transaction, StoreError> {
    const SQLITE_BUSY: i32 = 5;
    let mut attempt = 1;
    loop {
        match conn.transaction_with_behavior(TransactionBehavior::Immediate).await {
            Ok(tx) => return Ok(tx),
            Err(err) => {
                let waited =
                    local && matches!(&err, libsql::Error::SqliteFailure(code, _) if code & 0xff == SQLITE_BUSY);
                let err = StoreError::from(err);
                if waited || attempt >= BEGIN_ATTEMPTS || !matches!(err, StoreError::Unavailable(_)) {
                    return Err(err);
                }
                metrics.transaction_retries.inc();
                tokio::time::sleep(Duration::from_millis(20 * u64::from(attempt))).await;
                attempt += 1;
            }
        }
    }
}
