//! Where a write is committed: here, under this replica's lease on the
//! object, or at the replica that holds it, one hop away. Handlers turn a
//! request into a `Mutation`, hand it here with the request as it arrived
//! (`Replay`, for the owner), and match on the `Routed` they get back.

mod forward;

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::http::{HeaderMap, Method, Uri};

pub use forward::{Forwarded, NotApplied, Relayed, Unknown};

use crate::auth::PeerKey;
use crate::db::StoreError;
use crate::guard::{Guard, Owner, Route};
use crate::model::{Mutation, ObjectRef, Rejection};
use crate::objects::{Committed, WriteJob};
use crate::telemetry::Metrics;
use crate::writer::Writer;

/// A whole write request, kept as it arrived so that it can be replayed on the
/// owner replica if this one does not hold the object's lease.
#[derive(Clone)]
pub struct Replay {
    pub method: Method,
    pub uri: Uri,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// Set when a peer already forwarded this request (one hop only).
    pub forwarded_by: Option<String>,
}

/// A write that was committed here, or what became of it at its owner.
pub enum Routed {
    Local(Committed),
    Forwarded(Forwarded),
}

#[derive(Debug, thiserror::Error)]
pub enum CommitError {
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Refused by a condition, or by the fence twice: nothing was committed.
    #[error("refused: {0:?}")]
    Refused(Rejection),
}

impl From<Rejection> for CommitError {
    fn from(rejection: Rejection) -> Self {
        CommitError::Refused(rejection)
    }
}

/// What routing a write needs: who owns what, the one writer, and the way to peers.
pub struct Routing {
    guard: Arc<Guard>,
    writer: Writer,
    metrics: Arc<Metrics>,
    peers: reqwest::Client,
    /// Signs what this replica forwards (required when authentication is on).
    peer_key: Option<PeerKey>,
    forward_timeout: Duration,
    /// How much of a value the change log keeps inline.
    change_value_cap: usize,
}

impl Routing {
    pub fn new(
        guard: Arc<Guard>,
        writer: Writer,
        metrics: Arc<Metrics>,
        peer_key: Option<PeerKey>,
        forward_timeout: Duration,
        change_value_cap: usize,
    ) -> Result<Routing, reqwest::Error> {
        // Idle connections to peers outlive a burst of forwarded writes, not much more.
        let peers = reqwest::Client::builder().pool_idle_timeout(Duration::from_secs(30)).build()?;
        Ok(Routing { guard, writer, metrics, peers, peer_key, forward_timeout, change_value_cap })
    }

    /// Commits `mutation` if this replica owns the object (taking the lease if
    /// it is free), or hands the request to the owner. A write refused by the
    /// fence (the lease moved while it queued), or refused unapplied by an
    /// owner that lost the lease meanwhile, is routed once more.
    pub async fn commit(&self, object: &ObjectRef, mutation: Mutation, replay: Replay) -> Result<Routed, CommitError> {
        let mut attempts_left = 2;
        loop {
            attempts_left -= 1;
            match self.guard.route(object).await? {
                Route::Remote(owner) => {
                    let forwarded = self.forward(&owner, replay.clone()).await;
                    if attempts_left > 0 && forwarded.route_again() {
                        self.metrics.transaction_retries.inc();
                        continue;
                    }
                    return Ok(Routed::Forwarded(forwarded));
                }
                Route::Local(lease) => {
                    let job =
                        WriteJob::new(lease.clone(), mutation.clone(), crate::clock::now_ms(), self.change_value_cap);
                    match self.writer.run(job).await? {
                        Ok(committed) => return Ok(Routed::Local(committed)),
                        Err(Rejection::Fenced) => {
                            self.guard.lost(&lease);
                            if attempts_left == 0 {
                                return Err(Rejection::Fenced.into());
                            }
                            self.metrics.transaction_retries.inc();
                        }
                        Err(rejection) => return Err(rejection.into()),
                    }
                }
            }
        }
    }

    /// For a write that is costly to build (a restore reads the object's
    /// history): the owner's answer when another replica holds the object,
    /// or `None` when this replica holds it (taking the lease if it is free)
    /// and should build the write and `commit` it.
    pub async fn forward_unless_owned(
        &self,
        object: &ObjectRef,
        replay: &Replay,
    ) -> Result<Option<Forwarded>, CommitError> {
        match self.guard.route(object).await? {
            Route::Local(_) => Ok(None),
            Route::Remote(owner) => {
                let forwarded = self.forward(&owner, replay.clone()).await;
                // The owner let go meanwhile: build here, and `commit` routes again.
                Ok((!forwarded.route_again()).then_some(forwarded))
            }
        }
    }

    /// Hands a request to `owner` as it arrived (or, on fly.io, asks the
    /// platform to replay it there).
    pub async fn forward(&self, owner: &Owner, replay: Replay) -> Forwarded {
        forward::forward(self, owner, replay).await
    }
}
