//! A whole batch as one HTTP request to a libSQL server (Hrana's
//! `/v3/pipeline`). The server runs the steps under their conditions and
//! answers every step's outcome. Every batch ends its own transaction
//! (COMMIT, or ROLLBACK when anything failed), and one last step rolls back
//! if a transaction is somehow still open, so nothing is held open between
//! requests: a replica that dies mid-request leaves no transaction (and no
//! write lock) behind.
//!
//! A few streams are kept between requests (their batons): a new stream is a
//! new connection on the server, which parses the schema and prepares every
//! statement again, about 1 ms of the server's CPU per request on sqld. But
//! the server counts every open stream against its connection limit (sqld:
//! 128 across all its clients, then 429), and a stream outlives a killed
//! replica until it expires (10 s idle). So a pipeline has at most `streams`
//! requests in flight, keeps at most `idle` streams between requests, and
//! closes every other stream in the request that used it. A kept stream idle
//! longer than `KEEP_STREAM_FOR` is closed; a request whose stream the server
//! no longer has (expired, restarted, another instance behind a balancer) ran
//! nothing and is sent again on a new stream.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use libsql::Value;
use libsql_hrana::proto::{
    Batch, BatchStep, BatchStreamReq, CloseStreamReq, PipelineReqBody, PipelineRespBody, StreamRequest, StreamResponse,
    StreamResult,
};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::batch::{Cond, Outcome, Step, StepError};
use super::StoreError;

/// How long one batch may take on the wire and on the server before the
/// writer gives up on it (its outcome is then unknown; see the writer).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// How long an idle stream is used again: well inside sqld's 10 s expiry.
const KEEP_STREAM_FOR: Duration = Duration::from_secs(5);

#[derive(Clone)]
pub struct Pipeline {
    http: reqwest::Client,
    endpoint: Arc<str>,
    token: Option<Arc<str>>,
    /// Idle streams, the most recently used last.
    kept: Arc<Mutex<Vec<KeptStream>>>,
    /// Requests in flight at most (and so streams open at most).
    in_flight: Arc<Semaphore>,
    /// Streams kept at most, idle or in use: a stream holds one of these.
    keep: Arc<Semaphore>,
}

struct KeptStream {
    baton: String,
    /// Where the server asked this stream's requests to go (`base_url`).
    endpoint: Arc<str>,
    last_used: Instant,
    slot: OwnedSemaphorePermit,
}

/// Why a request failed.
enum Failure {
    /// The server no longer has the stream the request named; nothing ran.
    StreamGone(String),
    Other(StoreError),
}

impl Pipeline {
    pub fn new(base_url: &str, token: Option<&str>, streams: usize, idle: usize) -> Result<Pipeline, StoreError> {
        let http = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .tcp_nodelay(true)
            .pool_idle_timeout(Duration::from_secs(30))
            .build()
            .map_err(|e| StoreError::Internal(format!("cannot build the database HTTP client: {e}")))?;
        let endpoint = format!("{}/v3/pipeline", base_url.trim_end_matches('/'));
        Ok(Pipeline {
            http,
            endpoint: endpoint.into(),
            token: token.filter(|t| !t.is_empty()).map(Into::into),
            kept: Arc::default(),
            in_flight: Arc::new(Semaphore::new(streams)),
            keep: Arc::new(Semaphore::new(idle)),
        })
    }

    /// Sends `steps` as one batch. An error means the outcome is unknown or
    /// nothing ran (the server or the network failed); otherwise one outcome per step.
    pub async fn run(&self, steps: &[Step]) -> Result<Vec<Outcome>, StoreError> {
        let _permit =
            self.in_flight.acquire().await.map_err(|_| unavailable("the database client is closed".into()))?;
        // Taken, not borrowed: a stream serves one request at a time.
        let (kept, stale) = {
            let mut kept = self.kept.lock().expect("kept streams");
            let (fresh, stale): (Vec<_>, Vec<_>) =
                kept.drain(..).partition(|stream| stream.last_used.elapsed() < KEEP_STREAM_FOR);
            *kept = fresh;
            (kept.pop(), stale)
        };
        for stream in stale {
            // Closed rather than left to expire: until then the server counts its connection.
            self.close_later(stream.baton, stream.endpoint);
        }
        let (stream, slot) = match kept {
            Some(KeptStream { baton, endpoint, slot, .. }) => (Some((baton, endpoint)), Some(slot)),
            None => (None, self.keep.clone().try_acquire_owned().ok()),
        };
        let answer = match self.send(steps, stream, slot).await {
            Err((Failure::StreamGone(message), slot)) => {
                tracing::debug!(%message, "the database no longer has the kept stream; sending on a new one");
                self.send(steps, None, slot).await
            }
            answer => answer,
        };
        answer.map_err(|(failure, _)| match failure {
            Failure::StreamGone(message) => unavailable(format!("database refused a new stream: {message}")),
            Failure::Other(err) => err,
        })
    }

    /// Closes a stream in the background. Closing also rolls back a
    /// transaction left open on it. Best effort: a stream not closed expires
    /// on the server anyway.
    fn close_later(&self, baton: String, endpoint: Arc<str>) {
        let body = PipelineReqBody { baton: Some(baton), requests: vec![StreamRequest::Close(CloseStreamReq {})] };
        let mut request = self.http.post(&*endpoint).json(&body);
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        tokio::spawn(async move {
            let _ = request.send().await;
        });
    }

    /// Sends on `stream` (a baton and where it goes), or a new one. With a
    /// `slot` the stream is kept afterwards; without, the request closes it.
    /// A failure gives the slot back for a retry.
    async fn send(
        &self,
        steps: &[Step],
        stream: Option<(String, Arc<str>)>,
        slot: Option<OwnedSemaphorePermit>,
    ) -> Result<Vec<Outcome>, (Failure, Option<OwnedSemaphorePermit>)> {
        match self.send_inner(steps, stream, slot.is_some()).await {
            Ok((outcomes, Some(kept))) => {
                if let Some(slot) = slot {
                    let (baton, endpoint) = kept;
                    let stream = KeptStream { baton, endpoint, last_used: Instant::now(), slot };
                    self.kept.lock().expect("kept streams").push(stream);
                }
                Ok(outcomes)
            }
            Ok((outcomes, None)) => Ok(outcomes),
            Err(failure) => Err((failure, slot)),
        }
    }

    /// The outcomes, and the stream to keep (when `keep` and it is clean).
    #[allow(clippy::type_complexity)]
    async fn send_inner(
        &self,
        steps: &[Step],
        stream: Option<(String, Arc<str>)>,
        keep: bool,
    ) -> Result<(Vec<Outcome>, Option<(String, Arc<str>)>), Failure> {
        let mut batch_steps: Vec<BatchStep> =
            steps.iter().map(|step| BatchStep { condition: step.cond.clone(), stmt: hrana_stmt(step) }).collect();
        // Whatever happened above, the stream leaves with no transaction open.
        batch_steps.push(BatchStep {
            condition: Some(Cond::Not { cond: Box::new(Cond::IsAutocommit {}) }),
            stmt: libsql_hrana::proto::Stmt::new("ROLLBACK", false),
        });
        let batch = Batch { steps: batch_steps, replication_index: None };
        let (baton, endpoint) = match stream {
            Some((baton, endpoint)) => (Some(baton), endpoint),
            None => (None, self.endpoint.clone()),
        };
        let reusing = baton.is_some();
        let mut requests = vec![StreamRequest::Batch(BatchStreamReq { batch })];
        if !keep {
            requests.push(StreamRequest::Close(CloseStreamReq {}));
        }
        let body = PipelineReqBody { baton, requests };
        let mut request = self.http.post(&*endpoint).json(&body);
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await.map_err(|e| other(unavailable(format!("database request failed: {e}"))))?;
        let status = response.status();
        let bytes =
            response.bytes().await.map_err(|e| other(unavailable(format!("database answer cut short: {e}"))))?;
        if !status.is_success() {
            let text = String::from_utf8_lossy(&bytes[..bytes.len().min(512)]).into_owned();
            // The server checks the baton before it runs anything.
            if reusing && status.as_u16() == 400 && names_a_lost_stream(&text) {
                return Err(Failure::StreamGone(text));
            }
            // 4xx other than auth/limits means we sent something the server cannot take: a bug.
            return Err(other(if status.is_server_error() || status.as_u16() == 429 || status.as_u16() == 401 {
                unavailable(format!("database answered {status}: {text}"))
            } else {
                StoreError::Internal(format!("database answered {status}: {text}"))
            }));
        }
        let answer: PipelineRespBody = serde_json::from_slice(&bytes)
            .map_err(|e| other(StoreError::Internal(format!("unreadable database answer: {e}"))))?;
        let result = match answer.results.into_iter().next() {
            Some(StreamResult::Ok { response: StreamResponse::Batch(batch) }) => batch.result,
            Some(StreamResult::Error { error }) => {
                return Err(other(unavailable(format!(
                    "database refused the batch: {} ({})",
                    error.message, error.code
                ))))
            }
            _ => return Err(other(StoreError::Internal("the database answered no batch result".into()))),
        };
        let guard_failed = result.step_errors.get(steps.len()).is_some_and(Option::is_some);
        let endpoint = match answer.base_url {
            Some(base) => format!("{}/v3/pipeline", base.trim_end_matches('/')).into(),
            None => endpoint,
        };
        let kept = match (answer.baton, guard_failed) {
            (Some(baton), false) => Some((baton, endpoint)),
            (Some(baton), true) => {
                // A transaction may still be open on it (and hold the write lock): closed, never kept.
                self.close_later(baton, endpoint);
                None
            }
            (None, _) => None,
        };
        let mut outcomes = Vec::with_capacity(steps.len());
        for index in 0..steps.len() {
            let done = result.step_results.get(index).cloned().flatten();
            let failed = result.step_errors.get(index).cloned().flatten();
            outcomes.push(match (done, failed) {
                (Some(done), _) => Outcome::Done {
                    rows: done.rows.into_iter().map(|row| row.values.into_iter().map(from_hrana).collect()).collect(),
                    changed: done.affected_row_count,
                },
                (None, Some(error)) => Outcome::Failed(StepError {
                    class: classify(&error.code, &error.message),
                    message: format!("{} ({})", error.message, error.code),
                }),
                (None, None) => Outcome::Skipped,
            });
        }
        Ok((outcomes, kept))
    }
}

fn unavailable(message: String) -> StoreError {
    StoreError::Unavailable(message)
}

fn other(err: StoreError) -> Failure {
    Failure::Other(err)
}

/// sqld's answers to a baton it cannot use: expired, unknown (a restart, or
/// another instance), or already used (a request of ours it is still running
/// after we gave up on it).
fn names_a_lost_stream(answer: &str) -> bool {
    ["STREAM_EXPIRED", "baton", "Baton"].iter().any(|sign| answer.contains(sign))
}

/// A step's error as the writer sees it: busy, locked, full disk and the like
/// may pass; anything else is a bug or corruption.
fn classify(code: &str, message: &str) -> StoreError {
    let transient = ["BUSY", "LOCKED", "FULL", "IOERR", "READONLY", "TIMEOUT", "EXPIRED", "INTERRUPT", "NOMEM"];
    let text = format!("{message} ({code})");
    if transient.iter().any(|t| code.contains(t)) {
        StoreError::Unavailable(text)
    } else {
        StoreError::Internal(text)
    }
}

fn hrana_stmt(step: &Step) -> libsql_hrana::proto::Stmt {
    let mut stmt = libsql_hrana::proto::Stmt::new(step.stmt.sql.text().into_owned(), step.stmt.rows);
    stmt.args = step.stmt.args.iter().map(to_hrana).collect();
    stmt
}

fn to_hrana(value: &Value) -> libsql_hrana::proto::Value {
    use libsql_hrana::proto::Value as H;
    match value {
        Value::Null => H::Null,
        Value::Integer(value) => H::Integer { value: *value },
        Value::Real(value) => H::Float { value: *value },
        Value::Text(value) => H::Text { value: value.as_str().into() },
        Value::Blob(value) => H::Blob { value: Bytes::copy_from_slice(value) },
    }
}

fn from_hrana(value: libsql_hrana::proto::Value) -> Value {
    use libsql_hrana::proto::Value as H;
    match value {
        H::None | H::Null => Value::Null,
        H::Integer { value } => Value::Integer(value),
        H::Float { value } => Value::Real(value),
        H::Text { value } => Value::Text(value.to_string()),
        H::Blob { value } => Value::Blob(value.to_vec()),
    }
}
