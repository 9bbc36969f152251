//! A whole batch as one HTTP request to a libSQL server (Hrana's
//! `/v2/pipeline`: the batch, then closing the stream). The server runs the
//! steps under their conditions and answers every step's outcome; nothing is
//! held open between requests, so a replica that dies mid-request leaves no
//! transaction (and no write lock) behind.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use libsql::Value;
use libsql_hrana::proto::{
    Batch, BatchStep, BatchStreamReq, CloseStreamReq, PipelineReqBody, PipelineRespBody, StreamRequest, StreamResponse,
    StreamResult,
};

use super::batch::{Outcome, Step, StepError};
use super::StoreError;

/// How long one batch may take on the wire and on the server before the
/// writer gives up on it (its outcome is then unknown; see the writer).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone)]
pub struct Pipeline {
    http: reqwest::Client,
    endpoint: Arc<str>,
    token: Option<Arc<str>>,
}

impl Pipeline {
    pub fn new(base_url: &str, token: Option<&str>) -> Result<Pipeline, StoreError> {
        let http = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .tcp_nodelay(true)
            .pool_idle_timeout(Duration::from_secs(30))
            .build()
            .map_err(|e| StoreError::Internal(format!("cannot build the database HTTP client: {e}")))?;
        let endpoint = format!("{}/v2/pipeline", base_url.trim_end_matches('/'));
        Ok(Pipeline { http, endpoint: endpoint.into(), token: token.filter(|t| !t.is_empty()).map(Into::into) })
    }

    /// Sends `steps` as one batch. An error means the outcome is unknown or
    /// nothing ran (the server or the network failed); otherwise one outcome per step.
    pub async fn run(&self, steps: &[Step]) -> Result<Vec<Outcome>, StoreError> {
        let batch = Batch {
            steps: steps
                .iter()
                .map(|step| BatchStep { condition: step.cond.clone(), stmt: hrana_stmt(step) })
                .collect(),
            replication_index: None,
        };
        let body = PipelineReqBody {
            baton: None,
            requests: vec![StreamRequest::Batch(BatchStreamReq { batch }), StreamRequest::Close(CloseStreamReq {})],
        };
        let mut request = self.http.post(&*self.endpoint).json(&body);
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await.map_err(|e| unavailable(format!("database request failed: {e}")))?;
        let status = response.status();
        let bytes = response.bytes().await.map_err(|e| unavailable(format!("database answer cut short: {e}")))?;
        if !status.is_success() {
            let text = String::from_utf8_lossy(&bytes[..bytes.len().min(512)]).into_owned();
            // 4xx other than auth/limits means we sent something the server cannot take: a bug.
            return Err(if status.is_server_error() || status.as_u16() == 429 || status.as_u16() == 401 {
                unavailable(format!("database answered {status}: {text}"))
            } else {
                StoreError::Internal(format!("database answered {status}: {text}"))
            });
        }
        let answer: PipelineRespBody = serde_json::from_slice(&bytes)
            .map_err(|e| StoreError::Internal(format!("unreadable database answer: {e}")))?;
        let result = match answer.results.into_iter().next() {
            Some(StreamResult::Ok { response: StreamResponse::Batch(batch) }) => batch.result,
            Some(StreamResult::Error { error }) => {
                return Err(unavailable(format!("database refused the batch: {} ({})", error.message, error.code)))
            }
            _ => return Err(StoreError::Internal("the database answered no batch result".into())),
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
        Ok(outcomes)
    }
}

fn unavailable(message: String) -> StoreError {
    StoreError::Unavailable(message)
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
