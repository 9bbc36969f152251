//! A fenced write, planned against what the owner knows of the object and
//! committed with the writer's group: a fence assertion (the object row still
//! has this replica's fence and the version the plan started from), then
//! multi-row statements whatever the number of ops: the object's row, the
//! final value of each key, and the outbox rows.

use std::collections::HashMap;

use libsql::Value;

use super::resident::{Change as ResidentChange, Head, ResidentState, Slot};
use super::{Committed, Entry, Event, Mutation, ObjectRef, Op, OpResult, Rejection};
use crate::blobs::meta as blobs;
use crate::db::batch::Stmt;
use crate::db::{numbered, Shape, StoreError};
use crate::guard::fence_assertion;
use crate::writer::{BoxFuture, Planner, Settled, Work, Writes};

pub struct WriteJob {
    pub object: ObjectRef,
    /// The fencing token this replica holds for the object.
    pub fence: i64,
    pub owner: String,
    pub mutation: Mutation,
    pub now_ms: i64,
    /// Change rows carry a value's bytes up to this many; longer ones are truncated and flagged.
    pub value_cap: usize,
    planned: Option<Planned>,
}

/// What planning decided, kept until the group settles.
struct Planned {
    answer: Result<Committed, Rejection>,
    /// What the resident state becomes once this commits.
    change: Option<ResidentChange>,
    /// Delete-all: its counts come from the statements' results.
    counted: Option<DeleteAllCounts>,
}

/// Where a delete-all's counts are among its statements.
struct DeleteAllCounts {
    blobs_statement: usize,
    keys_statement: usize,
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

    fn whole(op: &'static str, key: Option<&'a str>) -> Change<'a> {
        Change { op, key, content_type: None, size: None, value: None }
    }
}

/// An object as the writes of one group leave it, for planning the next.
pub struct Draft {
    head: Head,
    /// Keys known to this group: from memory, from the database, or as
    /// earlier work of the group leaves them (values always kept here).
    keys: HashMap<String, Slot>,
    /// A delete-all earlier in the group: every key not in `keys` is absent.
    /// (Otherwise a key not in `keys` is as committed: in memory or the database.)
    cleared: bool,
}

/// The drafts of one group.
#[derive(Default)]
pub struct Drafts {
    objects: HashMap<ObjectRef, Draft>,
}

impl Drafts {
    pub fn objects(&self) -> impl Iterator<Item = &ObjectRef> {
        self.objects.keys()
    }
}

impl WriteJob {
    pub fn new(
        object: ObjectRef,
        fence: i64,
        owner: String,
        mutation: Mutation,
        now_ms: i64,
        value_cap: usize,
    ) -> Self {
        WriteJob { object, fence, owner, mutation, now_ms, value_cap, planned: None }
    }
}

impl Work for WriteJob {
    type Output = Result<Committed, Rejection>;

    fn weight(&self) -> usize {
        self.mutation.weight()
    }

    fn reads_rows_of(&self) -> Option<&ObjectRef> {
        // Blob rows are not resident: planning reads them.
        (!matches!(self.mutation, Mutation::Ops { .. })).then_some(&self.object)
    }

    fn plan<'a>(
        &'a mut self,
        planner: &'a mut Planner,
    ) -> BoxFuture<'a, Result<Result<Writes, Self::Output>, StoreError>> {
        Box::pin(async move {
            let named = self.named_keys();
            if !ensure_draft(planner, &self.object, self.fence, &self.owner, &named).await? {
                return Ok(Err(Err(Rejection::Fenced)));
            }
            let (writes, planned) = match &self.mutation {
                Mutation::Ops { ops, events } => {
                    let big = big_values_read(planner, &self.object, ops).await?;
                    let draft = planner.drafts.objects.get_mut(&self.object).expect("ensured");
                    self.plan_ops(draft, ops, events, big)
                }
                _ => {
                    planner.reads += 1;
                    let current = match &self.mutation {
                        Mutation::PutBlob { blob, .. } => blobs::get(&planner.db, &self.object, &blob.name).await?,
                        Mutation::DeleteBlob { name, .. } => blobs::get(&planner.db, &self.object, name).await?,
                        _ => None,
                    };
                    let draft = planner.drafts.objects.get_mut(&self.object).expect("ensured");
                    self.plan_general(draft, current)
                }
            };
            self.planned = Some(planned);
            Ok(Ok(writes))
        })
    }

    fn settle(&mut self, settled: Settled<'_>, resident: &ResidentState) -> Self::Output {
        let planned = self.planned.take().expect("settled after planning");
        match settled {
            Settled::Refused(_) => {
                resident.drop_object(&self.object);
                Err(Rejection::Fenced)
            }
            Settled::Committed(outcomes) => {
                if let Some(change) = planned.change {
                    resident.apply(&self.object, change);
                }
                let mut answer = planned.answer;
                if let (Some(counts), Ok(committed)) = (&planned.counted, &mut answer) {
                    let count = |i: usize| outcomes.get(i).map_or(0, |o| o.changed() as i64);
                    committed.results = vec![OpResult::DeleteAll {
                        deleted_keys: count(counts.keys_statement),
                        deleted_blobs: count(counts.blobs_statement),
                    }];
                }
                answer
            }
        }
    }
}

/// Makes sure the group has a draft of `object` that knows `keys`, reading
/// from memory first and from the database for what memory lacks. False when
/// this replica's fence no longer holds.
async fn ensure_draft(
    planner: &mut Planner,
    object: &ObjectRef,
    fence: i64,
    owner: &str,
    keys: &[&str],
) -> Result<bool, StoreError> {
    if !planner.drafts.objects.contains_key(object) {
        if let Some((head, slots)) = planner.resident.view(object, fence, keys) {
            planner.resident.count_hit();
            planner
                .drafts
                .objects
                .insert(object.clone(), Draft { head, keys: slots.into_iter().collect(), cleared: false });
        }
    }
    let missing: Vec<&str> = match planner.drafts.objects.get_mut(object) {
        Some(draft) if draft.head.fence != fence => return Ok(false),
        Some(draft) => {
            let mut missing = Vec::new();
            for key in keys {
                if draft.keys.contains_key(*key) {
                    continue;
                }
                if draft.cleared {
                    draft.keys.insert(key.to_string(), Slot::Absent);
                    continue;
                }
                match planner.resident.view(object, fence, &[key]).and_then(|(_, mut slots)| slots.pop()) {
                    Some((key, slot)) => {
                        draft.keys.insert(key, slot);
                    }
                    None => missing.push(*key),
                }
            }
            if missing.is_empty() {
                return Ok(true);
            }
            missing
        }
        None => keys.to_vec(),
    };
    planner.resident.count_miss();
    planner.reads += 1;
    let Some(loaded) = super::read::load_keys(&planner.db, object, &missing).await? else {
        return Ok(false);
    };
    if loaded.head.fence != fence || loaded.owner.as_deref() != Some(owner) {
        planner.resident.drop_object(object);
        return Ok(false);
    }
    planner.resident.learn(object, loaded.head, loaded.keys.clone());
    let draft = planner.drafts.objects.entry(object.clone()).or_insert_with(|| Draft {
        head: loaded.head,
        keys: HashMap::new(),
        cleared: false,
    });
    for (key, slot) in loaded.keys {
        draft.keys.entry(key).or_insert(slot);
    }
    Ok(true)
}

/// Values a batch `get` needs that memory does not keep (large ones), read
/// from the database; keys written earlier in the group are in the draft.
async fn big_values_read(
    planner: &mut Planner,
    object: &ObjectRef,
    ops: &[Op],
) -> Result<HashMap<String, Option<Entry>>, StoreError> {
    let draft = &planner.drafts.objects[object];
    let mut wanted: Vec<&String> = Vec::new();
    for op in ops {
        if let Op::Get { key } = op {
            if matches!(draft.keys.get(key.as_str()), Some(Slot::Present { value: None, .. })) && !wanted.contains(&key)
            {
                wanted.push(key);
            }
        }
    }
    let mut read = HashMap::new();
    for key in wanted {
        read.insert(key.clone(), super::read::get_entry(&planner.db, object, key).await?);
        planner.reads += 1;
    }
    Ok(read)
}

impl WriteJob {
    /// Every key the mutation reads or writes.
    fn named_keys(&self) -> Vec<&str> {
        let mut named: Vec<&str> = Vec::new();
        if let Mutation::Ops { ops, .. } = &self.mutation {
            for op in ops {
                let (Op::Put { key, .. } | Op::Delete { key, .. } | Op::Get { key }) = op;
                if !named.contains(&key.as_str()) {
                    named.push(key);
                }
            }
        }
        named
    }

    /// Key operations and events: every condition is checked, in op order,
    /// against the state the ops before it leave.
    fn plan_ops(
        &self,
        draft: &mut Draft,
        ops: &[Op],
        events: &[Event],
        big: HashMap<String, Option<Entry>>,
    ) -> (Writes, Planned) {
        let from = draft.head;
        let version = from.version + 1;
        let assertion = fence_assertion(&self.object, &self.owner, self.fence, Some(from.version));
        let refuse = |answer: Rejection| {
            let writes = Writes { assertions: vec![assertion.clone()], statements: vec![] };
            (writes, Planned { answer: Err(answer), change: None, counted: None })
        };

        // Keys as this write leaves them, on top of the draft.
        let mut now: HashMap<&str, Slot> = HashMap::new();
        let slot_of = |now: &HashMap<&str, Slot>, key: &str| -> Slot {
            now.get(key).cloned().or_else(|| draft.keys.get(key).cloned()).unwrap_or(Slot::Absent)
        };
        let (mut keys_delta, mut bytes_delta) = (0i64, 0i64);
        let mut results = Vec::with_capacity(ops.len());
        let mut changes = Vec::new();
        for (op_index, op) in ops.iter().enumerate() {
            match op {
                Op::Put { key, value, content_type, pre } => {
                    let slot = slot_of(&now, key);
                    if !pre.holds(slot.version()) {
                        return refuse(Rejection::PreconditionFailed { op_index, key: key.clone() });
                    }
                    let size = (key.len() + value.len()) as i64;
                    match slot.size() {
                        Some(old) => bytes_delta += size - old,
                        None => {
                            keys_delta += 1;
                            bytes_delta += size;
                        }
                    }
                    let kept = Some((value.clone(), content_type.as_str().into()));
                    now.insert(key, Slot::Present { version, size, value: kept });
                    results.push(OpResult::Put { key: key.clone(), version });
                    changes.push(Change::put(key, content_type, value));
                }
                Op::Delete { key, pre } => {
                    let slot = slot_of(&now, key);
                    if !pre.holds(slot.version()) {
                        return refuse(Rejection::PreconditionFailed { op_index, key: key.clone() });
                    }
                    if let Some(old) = slot.size() {
                        keys_delta -= 1;
                        bytes_delta -= old;
                        now.insert(key, Slot::Absent);
                        changes.push(Change::delete(key));
                    }
                    results.push(OpResult::Delete { key: key.clone(), deleted: slot.size().is_some() });
                }
                Op::Get { key } => {
                    let entry = match slot_of(&now, key) {
                        Slot::Present { version, value: Some((value, content_type)), .. } => {
                            Some(Entry { key: key.clone(), value, content_type: content_type.to_string(), version })
                        }
                        Slot::Present { value: None, .. } => big.get(key.as_str()).cloned().flatten(),
                        Slot::Absent => None,
                    };
                    results.push(OpResult::Get { key: key.clone(), entry });
                }
            }
        }
        if changes.is_empty() && events.is_empty() {
            // Nothing changes, but the answer holds only if the fence does: it is checked at commit.
            let writes = Writes { assertions: vec![assertion], statements: vec![] };
            let answer = Ok(Committed { version: from.version, fence: self.fence, changed: false, results });
            return (writes, Planned { answer, change: None, counted: None });
        }

        let ObjectRef { ns, id } = &self.object;
        let mut statements = vec![Stmt::exec(
            "UPDATE objects SET version = ?5, updated_at = ?6, key_count = key_count + ?7, bytes = bytes + ?8
             WHERE ns = ?1 AND id = ?2 AND fence = ?3 AND owner = ?4",
            vec![
                ns.as_str().into(),
                id.as_str().into(),
                self.fence.into(),
                self.owner.as_str().into(),
                version.into(),
                self.now_ms.into(),
                keys_delta.into(),
                bytes_delta.into(),
            ],
        )];
        // Final states in the order keys were first named, so writes are deterministic.
        let mut written = Vec::new();
        let mut deleted = Vec::new();
        let mut resident_keys = Vec::new();
        for key in self.named_keys() {
            let Some(slot) = now.get(key) else { continue };
            match slot {
                Slot::Present { value: Some((value, content_type)), .. } => {
                    written.push((key, value.clone(), content_type.clone()));
                    resident_keys.push((key.to_string(), Slot::written(version, key, value, content_type)));
                }
                Slot::Present { value: None, .. } => unreachable!("a write keeps its value"),
                Slot::Absent => {
                    deleted.push(key);
                    resident_keys.push((key.to_string(), Slot::Absent));
                }
            }
        }
        for chunk in written.chunks(ROWS_PER_STATEMENT) {
            let mut params = self.object_params();
            params.push(version.into());
            for (key, value, content_type) in chunk {
                params.extend([key.as_bytes().into(), Value::Blob(value.to_vec()), content_type.as_ref().into()]);
            }
            statements.push(Stmt::exec_rows(&UPSERT_KV, chunk.len(), params));
        }
        for chunk in deleted.chunks(ROWS_PER_STATEMENT) {
            let mut params = self.object_params();
            params.extend(chunk.iter().map(|key| Value::from(key.as_bytes())));
            statements.push(Stmt::exec_rows(&DELETE_KV, chunk.len(), params));
        }
        // The outbox rows, in the same transaction: a write that is refused leaves none.
        self.record_changes(&mut statements, version, &changes);
        self.record_events(&mut statements, version, events);

        let head = Head {
            fence: self.fence,
            version,
            key_count: from.key_count + keys_delta,
            bytes: from.bytes + bytes_delta,
        };
        draft.head = head;
        for (key, slot) in now {
            draft.keys.insert(key.to_string(), slot);
        }
        let change =
            ResidentChange { fence: self.fence, from_version: from.version, head, cleared: false, keys: resident_keys };
        let answer = Ok(Committed { version, fence: self.fence, changed: true, results });
        (Writes { assertions: vec![assertion], statements }, Planned { answer, change: Some(change), counted: None })
    }

    /// Blobs and deleting a whole object. `current`: the blob as stored.
    fn plan_general(&self, draft: &mut Draft, current: Option<blobs::BlobMeta>) -> (Writes, Planned) {
        let from = draft.head;
        let version = from.version + 1;
        let assertion = fence_assertion(&self.object, &self.owner, self.fence, Some(from.version));
        let only_check = |answer: Result<Committed, Rejection>| {
            let writes = Writes { assertions: vec![assertion.clone()], statements: vec![] };
            (writes, Planned { answer, change: None, counted: None })
        };
        let ObjectRef { ns, id } = &self.object;
        let mut statements = Vec::new();
        let bump = |key_count: i64, bytes: i64| {
            Stmt::exec(
                "UPDATE objects SET version = ?3, updated_at = ?4, key_count = ?5, bytes = ?6 WHERE ns = ?1 AND id = ?2",
                vec![ns.as_str().into(), id.as_str().into(), version.into(), self.now_ms.into(), key_count.into(), bytes.into()],
            )
        };
        let mut head = Head { version, ..from };
        let mut cleared = false;
        let mut counted = None;
        let (result, change) = match &self.mutation {
            Mutation::DeleteAll => {
                if from.version == 0 {
                    return only_check(Err(Rejection::NotFound));
                }
                statements.push(blobs::garbage_all_statement(&self.object, self.now_ms));
                statements.push(blobs::delete_all_statement(&self.object));
                statements.push(Stmt::exec(
                    "DELETE FROM kv WHERE ns = ?1 AND id = ?2",
                    vec![ns.as_str().into(), id.as_str().into()],
                ));
                statements.push(bump(0, 0));
                counted = Some(DeleteAllCounts { blobs_statement: 1, keys_statement: 2 });
                head.key_count = 0;
                head.bytes = 0;
                cleared = true;
                let result = OpResult::DeleteAll { deleted_keys: from.key_count, deleted_blobs: 0 };
                (result, Change::whole("delete_all", None))
            }
            Mutation::PutBlob { blob, pre } => {
                if !pre.holds(current.as_ref().map(|b| b.version)) {
                    return only_check(Err(Rejection::PreconditionFailed { op_index: 0, key: blob.name.clone() }));
                }
                statements.push(bump(from.key_count, from.bytes));
                let replaced = current.as_ref().map(|b| b.storage_key.as_str());
                statements.extend(blobs::put_statements(&self.object, blob, version, replaced, self.now_ms));
                let change = Change {
                    op: "blob_put",
                    key: Some(&blob.name),
                    content_type: Some(&blob.content_type),
                    size: Some(blob.size as i64),
                    value: None,
                };
                (OpResult::PutBlob { name: blob.name.clone(), version }, change)
            }
            Mutation::DeleteBlob { name, pre } => {
                if !pre.holds(current.as_ref().map(|b| b.version)) {
                    return only_check(Err(Rejection::PreconditionFailed { op_index: 0, key: name.clone() }));
                }
                let Some(current) = current else {
                    let result = OpResult::DeleteBlob { name: name.clone(), deleted: None };
                    return only_check(Ok(Committed {
                        version: from.version,
                        fence: self.fence,
                        changed: false,
                        results: vec![result],
                    }));
                };
                statements.push(bump(from.key_count, from.bytes));
                statements.extend(blobs::delete_statements(&self.object, name, &current.storage_key, self.now_ms));
                let result = OpResult::DeleteBlob { name: name.clone(), deleted: Some(current.storage_key) };
                (result, Change::whole("blob_delete", Some(name)))
            }
            Mutation::Ops { .. } => unreachable!("key operations take plan_ops"),
        };
        self.record_changes(&mut statements, version, std::slice::from_ref(&change));
        draft.head = head;
        if cleared {
            draft.keys.clear();
            draft.cleared = true;
        }
        let resident = ResidentChange { fence: self.fence, from_version: from.version, head, cleared, keys: vec![] };
        let answer = Ok(Committed { version, fence: self.fence, changed: true, results: vec![result] });
        (Writes { assertions: vec![assertion], statements }, Planned { answer, change: Some(resident), counted })
    }

    fn record_changes(&self, statements: &mut Vec<Stmt>, version: i64, changes: &[Change<'_>]) {
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
            statements.push(Stmt::exec_rows(&OUTBOX_CHANGES, chunk.len(), params));
        }
    }

    fn record_events(&self, statements: &mut Vec<Stmt>, version: i64, events: &[Event]) {
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
            statements.push(Stmt::exec_rows(&OUTBOX_EVENTS, chunk.len(), params));
        }
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
