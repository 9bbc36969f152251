//! A fenced write: the SQL run inside the writer's transaction.

use libsql::{params, Connection};

use super::{Committed, Mutation, ObjectRef, Op, OpResult, Rejection};
use crate::blobs::meta as blobs;
use crate::db::StoreError;
use crate::writer::{BoxFuture, Work};

pub struct WriteJob {
    pub object: ObjectRef,
    /// The fencing token this replica holds for the object.
    pub fence: i64,
    pub owner: String,
    pub mutation: Mutation,
    pub now_ms: i64,
}

impl Work for WriteJob {
    type Output = Result<Committed, Rejection>;

    fn weight(&self) -> usize {
        self.mutation.weight()
    }

    fn apply<'a>(&'a mut self, conn: &'a Connection) -> BoxFuture<'a, Result<Self::Output, StoreError>> {
        Box::pin(self.run(conn))
    }

    fn keep(output: &Self::Output) -> bool {
        matches!(output, Ok(committed) if committed.changed)
    }
}

struct Totals {
    keys: i64,
    bytes: i64,
}

impl WriteJob {
    async fn run(&self, conn: &Connection) -> Result<Result<Committed, Rejection>, StoreError> {
        let ObjectRef { ns, id } = &self.object;
        // The fence check, in the same transaction as the change: exactly one
        // row must match, or another replica owns the object now.
        let mut rows = conn
            .query(
                "UPDATE objects SET version = version + 1, updated_at = ?5
                 WHERE ns = ?1 AND id = ?2 AND fence = ?3 AND owner = ?4
                 RETURNING version, key_count, bytes",
                params![ns.as_str(), id.as_str(), self.fence, self.owner.as_str(), self.now_ms],
            )
            .await?;
        let Some(row) = rows.next().await? else {
            return Ok(Err(Rejection::Fenced));
        };
        let version: i64 = row.get(0)?;
        let mut totals = Totals { keys: row.get(1)?, bytes: row.get(2)? };
        drop(rows);

        let mut changed = false;
        let mut results = Vec::new();
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
            }
            Mutation::DeleteBlob { name, pre } => {
                let current = blobs::get_on(conn, &self.object, name).await?;
                if !pre.holds(current.as_ref().map(|b| b.version)) {
                    return Ok(Err(Rejection::PreconditionFailed { op_index: 0, key: name.clone() }));
                }
                if let Some(current) = &current {
                    blobs::delete_on(conn, &self.object, name, &current.storage_key, self.now_ms).await?;
                    changed = true;
                }
                results.push(OpResult::DeleteBlob { name: name.clone(), deleted: current.map(|b| b.storage_key) });
            }
            Mutation::Ops(ops) => {
                for (op_index, op) in ops.iter().enumerate() {
                    match op {
                        Op::Put { key, value, content_type, pre } => {
                            let current = self.current(conn, key).await?;
                            if !pre.holds(current.map(|(v, _)| v)) {
                                return Ok(Err(Rejection::PreconditionFailed { op_index, key: key.clone() }));
                            }
                            conn.execute(
                                "INSERT INTO kv (ns, id, key, value, content_type, version) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                                 ON CONFLICT (ns, id, key) DO UPDATE SET
                                   value = excluded.value, content_type = excluded.content_type, version = excluded.version",
                                params![ns.as_str(), id.as_str(), key.as_bytes(), value.as_ref(), content_type.as_str(), version],
                            )
                            .await?;
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
                        }
                        Op::Delete { key, pre } => {
                            let current = self.current(conn, key).await?;
                            if !pre.holds(current.map(|(v, _)| v)) {
                                return Ok(Err(Rejection::PreconditionFailed { op_index, key: key.clone() }));
                            }
                            if let Some((_, old_size)) = current {
                                conn.execute(
                                    "DELETE FROM kv WHERE ns = ?1 AND id = ?2 AND key = ?3",
                                    params![ns.as_str(), id.as_str(), key.as_bytes()],
                                )
                                .await?;
                                totals.keys -= 1;
                                totals.bytes -= old_size;
                                changed = true;
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
            conn.execute(
                "UPDATE objects SET key_count = ?3, bytes = ?4 WHERE ns = ?1 AND id = ?2",
                params![ns.as_str(), id.as_str(), totals.keys, totals.bytes],
            )
            .await?;
        }
        // When nothing changed the writer rolls the version bump back.
        let version = if changed { version } else { version - 1 };
        Ok(Ok(Committed { version, fence: self.fence, changed, results }))
    }

    /// The key's version and stored size (key + value bytes), if it exists.
    async fn current(&self, conn: &Connection, key: &str) -> Result<Option<(i64, i64)>, StoreError> {
        let mut rows = conn
            .query(
                "SELECT version, length(key) + length(value) FROM kv WHERE ns = ?1 AND id = ?2 AND key = ?3",
                params![self.object.ns.as_str(), self.object.id.as_str(), key.as_bytes()],
            )
            .await?;
        match rows.next().await? {
            Some(row) => Ok(Some((row.get(0)?, row.get(1)?))),
            None => Ok(None),
        }
    }
}
