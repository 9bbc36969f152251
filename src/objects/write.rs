//! A fenced write: the SQL run inside the writer's transaction.

use libsql::params;

use super::{Committed, Event, Mutation, ObjectRef, Op, OpResult, Rejection};
use crate::blobs::meta as blobs;
use crate::db::{Session, StoreError};
use crate::writer::{BoxFuture, Work};

pub struct WriteJob {
    pub object: ObjectRef,
    /// The fencing token this replica holds for the object.
    pub fence: i64,
    pub owner: String,
    pub mutation: Mutation,
    pub now_ms: i64,
    /// Change rows carry a value's bytes up to this many; longer ones are truncated and flagged.
    pub value_cap: usize,
}

/// One row of the outbox: what a committed change did.
struct Change<'a> {
    op: &'static str,
    key: Option<&'a str>,
    content_type: Option<&'a str>,
    size: Option<i64>,
    value: Option<&'a [u8]>,
}

impl<'a> Change<'a> {
    fn put(key: &'a str, content_type: &'a str, value: &'a [u8]) -> Change<'a> {
        Change {
            op: "put",
            key: Some(key),
            content_type: Some(content_type),
            size: Some(value.len() as i64),
            value: Some(value),
        }
    }

    fn delete(key: &'a str) -> Change<'a> {
        Change { op: "delete", key: Some(key), content_type: None, size: None, value: None }
    }
}

impl Work for WriteJob {
    type Output = Result<Committed, Rejection>;

    fn weight(&self) -> usize {
        self.mutation.weight()
    }

    fn apply<'a>(&'a mut self, tx: &'a Session) -> BoxFuture<'a, Result<Self::Output, StoreError>> {
        Box::pin(self.run(tx))
    }

    fn keep(output: &Self::Output) -> bool {
        matches!(output, Ok(committed) if committed.changed)
    }

    fn refuses_before_writing(&self) -> bool {
        self.single_op().is_some()
    }
}

struct Totals {
    keys: i64,
    bytes: i64,
}

impl WriteJob {
    /// A put or delete of one key (with any events): the common write, which
    /// takes the short path below.
    fn single_op(&self) -> Option<(&Op, &[Event])> {
        match &self.mutation {
            Mutation::Ops { ops, events } => match ops.as_slice() {
                [op @ (Op::Put { .. } | Op::Delete { .. })] => Some((op, events)),
                _ => None,
            },
            _ => None,
        }
    }

    async fn run(&self, conn: &Session) -> Result<Result<Committed, Rejection>, StoreError> {
        match self.single_op() {
            Some((op, events)) => self.run_single(conn, op, events).await,
            None => self.run_general(conn).await,
        }
    }

    /// One key: every check (condition, fence) happens before the first
    /// change, so a refusal leaves nothing to undo and needs no savepoint, and
    /// the fence check, the version bump and the new totals are one statement.
    async fn run_single(
        &self,
        conn: &Session,
        op: &Op,
        events: &[Event],
    ) -> Result<Result<Committed, Rejection>, StoreError> {
        let ObjectRef { ns, id } = &self.object;
        let (key, pre) = match op {
            Op::Put { key, pre, .. } | Op::Delete { key, pre } => (key, pre),
            Op::Get { .. } => unreachable!("single_op is a put or a delete"),
        };
        let current = self.current(conn, key).await?;
        if !pre.holds(current.map(|(version, _)| version)) {
            return Ok(Err(Rejection::PreconditionFailed { op_index: 0, key: key.clone() }));
        }
        let (keys_delta, bytes_delta) = match (op, current) {
            (Op::Put { value, .. }, None) => (1, (key.len() + value.len()) as i64),
            (Op::Put { value, .. }, Some((_, old_size))) => (0, (key.len() + value.len()) as i64 - old_size),
            (_, Some((_, old_size))) => (-1, -old_size),
            (_, None) => (0, 0),
        };
        let deletes_nothing = matches!(op, Op::Delete { .. }) && current.is_none();
        if deletes_nothing && events.is_empty() {
            // Nothing changes, but the answer still comes from the owner.
            let version = conn
                .first_row(
                    "SELECT version FROM objects WHERE ns = ?1 AND id = ?2 AND fence = ?3 AND owner = ?4",
                    params![ns.as_str(), id.as_str(), self.fence, self.owner.as_str()],
                    |row| row.get::<i64>(0),
                )
                .await?;
            let Some(version) = version else { return Ok(Err(Rejection::Fenced)) };
            let results = vec![OpResult::Delete { key: key.clone(), deleted: false }];
            return Ok(Ok(Committed { version, fence: self.fence, changed: false, results }));
        }
        let version = conn
            .first_row(
                "UPDATE objects SET version = version + 1, updated_at = ?5,
                   key_count = key_count + ?6, bytes = bytes + ?7
                 WHERE ns = ?1 AND id = ?2 AND fence = ?3 AND owner = ?4
                 RETURNING version",
                params![
                    ns.as_str(),
                    id.as_str(),
                    self.fence,
                    self.owner.as_str(),
                    self.now_ms,
                    keys_delta,
                    bytes_delta
                ],
                |row| row.get::<i64>(0),
            )
            .await?;
        let Some(version) = version else { return Ok(Err(Rejection::Fenced)) };
        let result = match op {
            Op::Put { key, value, content_type, .. } => {
                self.upsert(conn, key, value, content_type, version).await?;
                self.record_change(conn, version, &Change::put(key, content_type, value)).await?;
                OpResult::Put { key: key.clone(), version }
            }
            _ => {
                if current.is_some() {
                    self.remove(conn, key).await?;
                    self.record_change(conn, version, &Change::delete(key)).await?;
                }
                OpResult::Delete { key: key.clone(), deleted: current.is_some() }
            }
        };
        for event in events {
            self.record_event(conn, version, event).await?;
        }
        Ok(Ok(Committed { version, fence: self.fence, changed: true, results: vec![result] }))
    }

    async fn run_general(&self, conn: &Session) -> Result<Result<Committed, Rejection>, StoreError> {
        let ObjectRef { ns, id } = &self.object;
        // The fence check, in the same transaction as the change: exactly one
        // row must match, or another replica owns the object now.
        let fenced = conn
            .first_row(
                "UPDATE objects SET version = version + 1, updated_at = ?5
                 WHERE ns = ?1 AND id = ?2 AND fence = ?3 AND owner = ?4
                 RETURNING version, key_count, bytes",
                params![ns.as_str(), id.as_str(), self.fence, self.owner.as_str(), self.now_ms],
                |row| Ok((row.get::<i64>(0)?, Totals { keys: row.get(1)?, bytes: row.get(2)? })),
            )
            .await?;
        let Some((version, mut totals)) = fenced else {
            return Ok(Err(Rejection::Fenced));
        };

        let mut changed = false;
        let mut results = Vec::new();
        let mut changes: Vec<Change> = Vec::new();
        let mut events: &[Event] = &[];
        match &self.mutation {
            Mutation::DeleteAll => {
                if version == 1 {
                    return Ok(Err(Rejection::NotFound));
                }
                let deleted =
                    conn.execute("DELETE FROM kv WHERE ns = ?1 AND id = ?2", params![ns.as_str(), id.as_str()]).await?;
                let deleted_blobs = blobs::delete_all_on(conn, &self.object, self.now_ms).await?;
                totals = Totals { keys: 0, bytes: 0 };
                changed = true;
                results.push(OpResult::DeleteAll { deleted_keys: deleted as i64, deleted_blobs });
                changes.push(Change { op: "delete_all", key: None, content_type: None, size: None, value: None });
            }
            Mutation::PutBlob { blob, pre } => {
                let current = blobs::get_on(conn, &self.object, &blob.name).await?;
                if !pre.holds(current.as_ref().map(|b| b.version)) {
                    return Ok(Err(Rejection::PreconditionFailed { op_index: 0, key: blob.name.clone() }));
                }
                let replaced = current.as_ref().map(|b| b.storage_key.as_str());
                blobs::put_on(conn, &self.object, blob, version, replaced, self.now_ms).await?;
                changed = true;
                results.push(OpResult::PutBlob { name: blob.name.clone(), version });
                changes.push(Change {
                    op: "blob_put",
                    key: Some(&blob.name),
                    content_type: Some(&blob.content_type),
                    size: Some(blob.size as i64),
                    value: None,
                });
            }
            Mutation::DeleteBlob { name, pre } => {
                let current = blobs::get_on(conn, &self.object, name).await?;
                if !pre.holds(current.as_ref().map(|b| b.version)) {
                    return Ok(Err(Rejection::PreconditionFailed { op_index: 0, key: name.clone() }));
                }
                if let Some(current) = &current {
                    blobs::delete_on(conn, &self.object, name, &current.storage_key, self.now_ms).await?;
                    changed = true;
                    changes.push(Change {
                        op: "blob_delete",
                        key: Some(name),
                        content_type: None,
                        size: None,
                        value: None,
                    });
                }
                results.push(OpResult::DeleteBlob { name: name.clone(), deleted: current.map(|b| b.storage_key) });
            }
            Mutation::Ops { ops, events: with } => {
                events = with;
                for (op_index, op) in ops.iter().enumerate() {
                    match op {
                        Op::Put { key, value, content_type, pre } => {
                            let current = self.current(conn, key).await?;
                            if !pre.holds(current.map(|(v, _)| v)) {
                                return Ok(Err(Rejection::PreconditionFailed { op_index, key: key.clone() }));
                            }
                            self.upsert(conn, key, value, content_type, version).await?;
                            let size = (key.len() + value.len()) as i64;
                            match current {
                                Some((_, old_size)) => totals.bytes += size - old_size,
                                None => {
                                    totals.keys += 1;
                                    totals.bytes += size;
                                }
                            }
                            changed = true;
                            results.push(OpResult::Put { key: key.clone(), version });
                            changes.push(Change::put(key, content_type, value));
                        }
                        Op::Delete { key, pre } => {
                            let current = self.current(conn, key).await?;
                            if !pre.holds(current.map(|(v, _)| v)) {
                                return Ok(Err(Rejection::PreconditionFailed { op_index, key: key.clone() }));
                            }
                            if let Some((_, old_size)) = current {
                                self.remove(conn, key).await?;
                                totals.keys -= 1;
                                totals.bytes -= old_size;
                                changed = true;
                                changes.push(Change::delete(key));
                            }
                            results.push(OpResult::Delete { key: key.clone(), deleted: current.is_some() });
                        }
                        Op::Get { key } => {
                            let entry = super::read::get_entry_on(conn, &self.object, key).await?;
                            results.push(OpResult::Get { key: key.clone(), entry });
                        }
                    }
                }
            }
        }
        if changed {
            conn.exec(
                "UPDATE objects SET key_count = ?3, bytes = ?4 WHERE ns = ?1 AND id = ?2",
                params![ns.as_str(), id.as_str(), totals.keys, totals.bytes],
            )
            .await?;
        }
        // The outbox rows, in the same transaction: a write that rolls back or
        // is fenced out leaves none.
        for change in &changes {
            self.record_change(conn, version, change).await?;
        }
        for event in events {
            self.record_event(conn, version, event).await?;
        }
        changed |= !events.is_empty();
        // When nothing changed the writer rolls the version bump back.
        let version = if changed { version } else { version - 1 };
        Ok(Ok(Committed { version, fence: self.fence, changed, results }))
    }

    async fn record_change(&self, conn: &Session, version: i64, change: &Change<'_>) -> Result<(), StoreError> {
        let capped = change.value.map(|v| &v[..v.len().min(self.value_cap)]);
        let truncated = change.value.map(|v| i64::from(v.len() > self.value_cap));
        conn.exec(
            "INSERT INTO outbox (kind, ns, id, version, fence, instance, ts, op, key, content_type, size, value, value_truncated, committed_ms)
             VALUES ('change', ?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
            params![
                self.object.ns.as_str(),
                self.object.id.as_str(),
                version,
                self.fence,
                self.owner.as_str(),
                self.now_ms * 1000,
                change.op,
                change.key,
                change.content_type,
                change.size,
                capped,
                truncated,
                self.now_ms
            ],
        )
        .await?;
        Ok(())
    }

    async fn record_event(&self, conn: &Session, version: i64, event: &Event) -> Result<(), StoreError> {
        conn.exec(
            "INSERT INTO outbox (kind, ns, id, version, fence, instance, ts, event_id, type, data, committed_ms)
             VALUES ('event', ?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
            params![
                self.object.ns.as_str(),
                self.object.id.as_str(),
                version,
                self.fence,
                self.owner.as_str(),
                event.ts_micros,
                event.event_id.to_string(),
                event.event_type.as_str(),
                event.data.as_str(),
                self.now_ms
            ],
        )
        .await?;
        Ok(())
    }

    async fn upsert(
        &self,
        conn: &Session,
        key: &str,
        value: &[u8],
        content_type: &str,
        version: i64,
    ) -> Result<(), StoreError> {
        conn.exec(
            "INSERT INTO kv (ns, id, key, value, content_type, version) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
             ON CONFLICT (ns, id, key) DO UPDATE SET
               value = excluded.value, content_type = excluded.content_type, version = excluded.version",
            params![self.object.ns.as_str(), self.object.id.as_str(), key.as_bytes(), value, content_type, version],
        )
        .await?;
        Ok(())
    }

    async fn remove(&self, conn: &Session, key: &str) -> Result<(), StoreError> {
        conn.exec(
            "DELETE FROM kv WHERE ns = ?1 AND id = ?2 AND key = ?3",
            params![self.object.ns.as_str(), self.object.id.as_str(), key.as_bytes()],
        )
        .await?;
        Ok(())
    }

    /// The key's version and stored size (key + value bytes), if it exists.
    async fn current(&self, conn: &Session, key: &str) -> Result<Option<(i64, i64)>, StoreError> {
        conn.first_row(
            "SELECT version, length(key) + length(value) FROM kv WHERE ns = ?1 AND id = ?2 AND key = ?3",
            params![self.object.ns.as_str(), self.object.id.as_str(), key.as_bytes()],
            |row| Ok((row.get(0)?, row.get(1)?)),
        )
        .await
    }
}
