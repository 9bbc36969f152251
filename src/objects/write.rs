//! A fenced write: the SQL run inside the writer's transaction.

use std::collections::HashMap;

use libsql::{params, Value};

use super::{Committed, Entry, Event, Mutation, ObjectRef, Op, OpResult, Rejection};
use crate::blobs::meta as blobs;
use crate::db::{numbered, Session, Shape, StoreError};
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
        matches!(self.mutation, Mutation::Ops { .. })
    }
}

/// Where a key named by a batch stands as its ops are checked in order.
#[derive(Clone, Copy)]
enum KeyState {
    /// As stored before this write: its version and size (key + value bytes).
    Stored {
        version: i64,
        size: i64,
    },
    /// Put by the op at this index of this write.
    Written(usize),
    Absent,
}

impl WriteJob {
    async fn run(&self, conn: &Session) -> Result<Result<Committed, Rejection>, StoreError> {
        match &self.mutation {
            Mutation::Ops { ops, events } => self.run_ops(conn, ops, events).await,
            _ => self.run_general(conn).await,
        }
    }

    /// Key operations and events. Every check (the fence, each op's
    /// condition against the state the ops before it leave) happens before the
    /// first change, so a refusal leaves nothing to undo and needs no
    /// savepoint; the changes are then a handful of multi-row statements
    /// whatever the number of ops: the object's row, the final value of each
    /// key, and the outbox rows.
    async fn run_ops(
        &self,
        conn: &Session,
        ops: &[Op],
        events: &[Event],
    ) -> Result<Result<Committed, Rejection>, StoreError> {
        // Keys in the order they are first named, so that writes are deterministic.
        let mut named: Vec<&str> = Vec::new();
        let mut keys: HashMap<&str, KeyState> = HashMap::new();
        for op in ops {
            if let Op::Put { key, .. } | Op::Delete { key, .. } = op {
                if keys.insert(key, KeyState::Absent).is_none() {
                    named.push(key);
                }
            }
        }
        let Some(stored_version) = self.current(conn, &named, &mut keys).await? else {
            return Ok(Err(Rejection::Fenced));
        };
        let before = keys.clone();
        let version = stored_version + 1;
        let state_version = |state: KeyState| match state {
            KeyState::Stored { version, .. } => Some(version),
            KeyState::Written(_) => Some(version),
            KeyState::Absent => None,
        };
        let state_size = |state: KeyState| match state {
            KeyState::Stored { size, .. } => Some(size),
            KeyState::Written(index) => match &ops[index] {
                Op::Put { key, value, .. } => Some((key.len() + value.len()) as i64),
                _ => unreachable!("only puts write"),
            },
            KeyState::Absent => None,
        };

        let (mut keys_delta, mut bytes_delta) = (0i64, 0i64);
        let mut results = Vec::with_capacity(ops.len());
        let mut changes = Vec::new();
        for (op_index, op) in ops.iter().enumerate() {
            match op {
                Op::Put { key, value, content_type, pre } => {
                    let state = keys[key.as_str()];
                    if !pre.holds(state_version(state)) {
                        return Ok(Err(Rejection::PreconditionFailed { op_index, key: key.clone() }));
                    }
                    let size = (key.len() + value.len()) as i64;
                    match state_size(state) {
                        Some(old) => bytes_delta += size - old,
                        None => {
                            keys_delta += 1;
                            bytes_delta += size;
                        }
                    }
                    keys.insert(key, KeyState::Written(op_index));
                    results.push(OpResult::Put { key: key.clone(), version });
                    changes.push(Change::put(key, content_type, value));
                }
                Op::Delete { key, pre } => {
                    let state = keys[key.as_str()];
                    if !pre.holds(state_version(state)) {
                        return Ok(Err(Rejection::PreconditionFailed { op_index, key: key.clone() }));
                    }
                    let old = state_size(state);
                    if let Some(old) = old {
                        keys_delta -= 1;
                        bytes_delta -= old;
                        keys.insert(key, KeyState::Absent);
                        changes.push(Change::delete(key));
                    }
                    results.push(OpResult::Delete { key: key.clone(), deleted: old.is_some() });
                }
                Op::Get { key } => {
                    let entry = match keys.get(key.as_str()) {
                        Some(KeyState::Written(index)) => match &ops[*index] {
                            Op::Put { key, value, content_type, .. } => Some(Entry {
                                key: key.clone(),
                                value: value.clone(),
                                content_type: content_type.clone(),
                                version,
                            }),
                            _ => unreachable!("only puts write"),
                        },
                        Some(KeyState::Absent) => None,
                        // Nothing is written yet: the database has the key as it was.
                        Some(KeyState::Stored { .. }) | None => {
                            super::read::get_entry_on(conn, &self.object, key).await?
                        }
                    };
                    results.push(OpResult::Get { key: key.clone(), entry });
                }
            }
        }
        if changes.is_empty() && events.is_empty() {
            // Nothing changes, but the answer still comes from the owner.
            return Ok(Ok(Committed { version: stored_version, fence: self.fence, changed: false, results }));
        }

        let ObjectRef { ns, id } = &self.object;
        let bumped = conn
            .exec(
                "UPDATE objects SET version = ?5, updated_at = ?6, key_count = key_count + ?7, bytes = bytes + ?8
                 WHERE ns = ?1 AND id = ?2 AND fence = ?3 AND owner = ?4",
                params![
                    ns.as_str(),
                    id.as_str(),
                    self.fence,
                    self.owner.as_str(),
                    version,
                    self.now_ms,
                    keys_delta,
                    bytes_delta
                ],
            )
            .await?;
        if bumped != 1 {
            // The fence was read in this transaction, under the write lock.
            return Err(StoreError::Internal(format!("the object's row changed within a transaction ({bumped} rows)")));
        }
        let mut written = Vec::new();
        let mut deleted = Vec::new();
        for key in named {
            match (before[key], keys[key]) {
                (_, KeyState::Written(index)) => written.push(&ops[index]),
                (KeyState::Stored { .. }, KeyState::Absent) => deleted.push(key),
                _ => {}
            }
        }
        self.upsert(conn, &written, version).await?;
        self.remove(conn, &deleted).await?;
        // The outbox rows, in the same transaction: a write that rolls back or
        // is fenced out leaves none.
        self.record_changes(conn, version, &changes).await?;
        self.record_events(conn, version, events).await?;
        Ok(Ok(Committed { version, fence: self.fence, changed: true, results }))
    }

    /// Blobs and deleting a whole object.
    async fn run_general(&self, conn: &Session) -> Result<Result<Committed, Rejection>, StoreError> {
        let ObjectRef { ns, id } = &self.object;
        // The fence check, in the same transaction as the change: exactly one
        // row must match, or another replica owns the object now.
        let version = conn
            .first_row(
                "UPDATE objects SET version = version + 1, updated_at = ?5
                 WHERE ns = ?1 AND id = ?2 AND fence = ?3 AND owner = ?4
                 RETURNING version",
                params![ns.as_str(), id.as_str(), self.fence, self.owner.as_str(), self.now_ms],
                |row| row.get::<i64>(0),
            )
            .await?;
        let Some(version) = version else {
            return Ok(Err(Rejection::Fenced));
        };

        let (result, change) = match &self.mutation {
            Mutation::DeleteAll => {
                if version == 1 {
                    return Ok(Err(Rejection::NotFound));
                }
                let deleted =
                    conn.execute("DELETE FROM kv WHERE ns = ?1 AND id = ?2", params![ns.as_str(), id.as_str()]).await?;
                let deleted_blobs = blobs::delete_all_on(conn, &self.object, self.now_ms).await?;
                conn.exec(
                    "UPDATE objects SET key_count = 0, bytes = 0 WHERE ns = ?1 AND id = ?2",
                    params![ns.as_str(), id.as_str()],
                )
                .await?;
                let result = OpResult::DeleteAll { deleted_keys: deleted as i64, deleted_blobs };
                (result, Some(Change { op: "delete_all", key: None, content_type: None, size: None, value: None }))
            }
            Mutation::PutBlob { blob, pre } => {
                let current = blobs::get_on(conn, &self.object, &blob.name).await?;
                if !pre.holds(current.as_ref().map(|b| b.version)) {
                    return Ok(Err(Rejection::PreconditionFailed { op_index: 0, key: blob.name.clone() }));
                }
                let replaced = current.as_ref().map(|b| b.storage_key.as_str());
                blobs::put_on(conn, &self.object, blob, version, replaced, self.now_ms).await?;
                let change = Change {
                    op: "blob_put",
                    key: Some(&blob.name),
                    content_type: Some(&blob.content_type),
                    size: Some(blob.size as i64),
                    value: None,
                };
                (OpResult::PutBlob { name: blob.name.clone(), version }, Some(change))
            }
            Mutation::DeleteBlob { name, pre } => {
                let current = blobs::get_on(conn, &self.object, name).await?;
                if !pre.holds(current.as_ref().map(|b| b.version)) {
                    return Ok(Err(Rejection::PreconditionFailed { op_index: 0, key: name.clone() }));
                }
                let change = match &current {
                    Some(current) => {
                        blobs::delete_on(conn, &self.object, name, &current.storage_key, self.now_ms).await?;
                        Some(Change { op: "blob_delete", key: Some(name), content_type: None, size: None, value: None })
                    }
                    None => None,
                };
                (OpResult::DeleteBlob { name: name.clone(), deleted: current.map(|b| b.storage_key) }, change)
            }
            Mutation::Ops { .. } => unreachable!("key operations take run_ops"),
        };
        let changed = change.is_some();
        self.record_changes(conn, version, change.as_slice()).await?;
        // When nothing changed the writer rolls the version bump back.
        let version = if changed { version } else { version - 1 };
        Ok(Ok(Committed { version, fence: self.fence, changed, results: vec![result] }))
    }

    /// The fence check and the current state of `named` keys, in one read per
    /// chunk of keys: the object's version if this replica still holds the
    /// fence, and `states` updated for each key that is stored.
    async fn current<'k>(
        &self,
        conn: &Session,
        named: &[&'k str],
        states: &mut HashMap<&'k str, KeyState>,
    ) -> Result<Option<i64>, StoreError> {
        let ObjectRef { ns, id } = &self.object;
        let mut object_version = None;
        // An empty chunk still checks the fence.
        let chunks: Vec<&[&str]> =
            if named.is_empty() { vec![&[]] } else { named.chunks(ROWS_PER_STATEMENT).collect() };
        for chunk in chunks {
            let mut params: Vec<Value> =
                vec![ns.as_str().into(), id.as_str().into(), self.fence.into(), self.owner.as_str().into()];
            params.extend(chunk.iter().map(|key| Value::from(key.as_bytes())));
            let mut found = Vec::new();
            conn.rows_of(&CURRENT_KEYS, chunk.len(), params, |row| {
                object_version = Some(row.get::<i64>(0)?);
                if let Value::Blob(key) = row.get_value(1)? {
                    found.push((key, row.get::<i64>(2)?, row.get::<i64>(3)?));
                }
                Ok(())
            })
            .await?;
            for (key, version, size) in found {
                let key =
                    String::from_utf8(key).ok().and_then(|key| states.get_key_value(key.as_str()).map(|(k, _)| *k));
                let key =
                    key.ok_or_else(|| StoreError::Internal("the database answered a key not asked for".into()))?;
                states.insert(key, KeyState::Stored { version, size });
            }
            if object_version.is_none() {
                return Ok(None);
            }
        }
        Ok(object_version)
    }

    /// Stores each put's value at `version`.
    async fn upsert(&self, conn: &Session, puts: &[&Op], version: i64) -> Result<(), StoreError> {
        for chunk in puts.chunks(ROWS_PER_STATEMENT) {
            let mut params = self.object_params();
            params.push(version.into());
            for op in chunk {
                let Op::Put { key, value, content_type, .. } = op else { unreachable!("only puts are upserted") };
                params.extend([key.as_bytes().into(), Value::Blob(value.to_vec()), content_type.as_str().into()]);
            }
            conn.exec_rows(&UPSERT_KV, chunk.len(), params).await?;
        }
        Ok(())
    }

    async fn remove(&self, conn: &Session, keys: &[&str]) -> Result<(), StoreError> {
        for chunk in keys.chunks(ROWS_PER_STATEMENT) {
            let mut params = self.object_params();
            params.extend(chunk.iter().map(|key| Value::from(key.as_bytes())));
            conn.exec_rows(&DELETE_KV, chunk.len(), params).await?;
        }
        Ok(())
    }

    async fn record_changes(&self, conn: &Session, version: i64, changes: &[Change<'_>]) -> Result<(), StoreError> {
        for chunk in changes.chunks(ROWS_PER_STATEMENT) {
            let mut params = self.outbox_params(version);
            params.push((self.now_ms * 1000).into());
            for change in chunk {
                let capped = change.value.map(|v| &v[..v.len().min(self.value_cap)]);
                let truncated = change.value.map(|v| i64::from(v.len() > self.value_cap));
                params.extend([
                    change.op.into(),
                    change.key.into(),
                    change.content_type.into(),
                    change.size.into(),
                    capped.map(<[u8]>::to_vec).into(),
                    truncated.into(),
                ]);
            }
            conn.exec_rows(&OUTBOX_CHANGES, chunk.len(), params).await?;
        }
        Ok(())
    }

    async fn record_events(&self, conn: &Session, version: i64, events: &[Event]) -> Result<(), StoreError> {
        for chunk in events.chunks(ROWS_PER_STATEMENT) {
            let mut params = self.outbox_params(version);
            for event in chunk {
                params.extend([
                    event.ts_micros.into(),
                    event.event_id.to_string().into(),
                    event.event_type.as_str().into(),
                    event.data.as_str().into(),
                ]);
            }
            conn.exec_rows(&OUTBOX_EVENTS, chunk.len(), params).await?;
        }
        Ok(())
    }

    /// `?1` and `?2`: the object.
    fn object_params(&self) -> Vec<Value> {
        vec![self.object.ns.as_str().into(), self.object.id.as_str().into()]
    }

    /// `?1` to `?6`: what every outbox row of this write shares.
    fn outbox_params(&self, version: i64) -> Vec<Value> {
        let mut params = self.object_params();
        params.extend([version.into(), self.fence.into(), self.owner.as_str().into(), self.now_ms.into()]);
        params
    }
}

/// Rows per multi-row statement: as many as a batch holds ops, so a batch's
/// keys take one statement each (events calls carry up to 1000, in chunks).
/// 128 outbox rows bind 774 parameters, far below SQLite's 32,766.
const ROWS_PER_STATEMENT: usize = super::MAX_BATCH_OPS;

/// The fence check and the named keys' versions and sizes: one row per key
/// found, or one row of NULL key columns when none is; no row when the fence
/// does not match.
static CURRENT_KEYS: Shape = Shape {
    text: |keys| {
        if keys == 0 {
            // (`IN ()` would plan a scan of kv.)
            return "SELECT version, NULL, NULL, NULL FROM objects WHERE ns = ?1 AND id = ?2 AND fence = ?3 AND owner = ?4"
                .into();
        }
        format!(
            "SELECT o.version, kv.key, kv.version, length(kv.key) + length(kv.value)
             FROM objects o LEFT JOIN kv ON kv.ns = o.ns AND kv.id = o.id AND kv.key IN ({})
             WHERE o.ns = ?1 AND o.id = ?2 AND o.fence = ?3 AND o.owner = ?4",
            numbered(5, keys)
        )
    },
};

static UPSERT_KV: Shape = Shape {
    text: |rows| {
        let values: Vec<String> = (0..rows)
            .map(|row| format!("(?1, ?2, ?{}, ?{}, ?{}, ?3)", 4 + 3 * row, 5 + 3 * row, 6 + 3 * row))
            .collect();
        format!(
            "INSERT INTO kv (ns, id, key, value, content_type, version) VALUES {}
             ON CONFLICT (ns, id, key) DO UPDATE SET
               value = excluded.value, content_type = excluded.content_type, version = excluded.version",
            values.join(", ")
        )
    },
};

static DELETE_KV: Shape =
    Shape { text: |keys| format!("DELETE FROM kv WHERE ns = ?1 AND id = ?2 AND key IN ({})", numbered(3, keys)) };

static OUTBOX_CHANGES: Shape = Shape {
    text: |rows| {
        let values: Vec<String> = (0..rows)
            .map(|row| format!("('change', ?1, ?2, ?3, ?4, ?5, ?7, {}, ?6)", numbered(8 + 6 * row, 6)))
            .collect();
        format!(
            "INSERT INTO outbox (kind, ns, id, version, fence, instance, ts, op, key, content_type, size, value, value_truncated, committed_ms)
             VALUES {}",
            values.join(", ")
        )
    },
};

static OUTBOX_EVENTS: Shape = Shape {
    text: |rows| {
        let values: Vec<String> =
            (0..rows).map(|row| format!("('event', ?1, ?2, ?3, ?4, ?5, {}, ?6)", numbered(7 + 4 * row, 4))).collect();
        format!(
            "INSERT INTO outbox (kind, ns, id, version, fence, instance, ts, event_id, type, data, committed_ms) VALUES {}",
            values.join(", ")
        )
    },
};
