//! A fenced write, planned against what the owner knows of the object and
//! committed with the writer's group: a fence assertion (the object row still
//! has this replica's fence and the version the plan started from), then
//! multi-row statements whatever the number of ops: the object's row, the
//! final value of each key, and the outbox rows.

mod restore;

use std::collections::HashMap;

use libsql::Value;

use super::{Committed, Entry, Event, Mutation, ObjectRef, Op, OpResult, Rejection};
use crate::blobs::meta as blobs;
use crate::db::batch::Stmt;
use crate::db::{numbered, Shape, StoreError};
use crate::guard::{fence_assertion, HeldLease};
use crate::resident::{Change as ResidentChange, Head, ResidentState, Slot};
use crate::writer::{BoxFuture, CarriedDraft, GroupDrafts, Planner, Settled, Touches, Work, Writes};

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

    /// A blob made visible: its metadata is the row's value (see `restore::blob_record`).
    fn blob_put(blob: &'a crate::model::BlobMeta, record: &'a [u8]) -> Change<'a> {
        Change {
            op: "blob_put",
            key: Some(&blob.name),
            content_type: Some(&blob.content_type),
            size: Some(blob.size as i64),
            value: Some(record),
        }
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
    /// Keys written by this group or by the groups in flight it was planned
    /// on, each with the group that wrote it last.
    written: HashMap<String, u64>,
    /// Key writes planned since the last statements were placed for this object.
    segment: Option<Segment>,
}

impl Draft {
    fn new(head: Head, keys: HashMap<String, Slot>) -> Draft {
        Draft { head, keys, cleared: false, written: HashMap::new(), segment: None }
    }
}

/// The drafts of one group.
#[derive(Default)]
pub struct Drafts {
    group: u64,
    objects: HashMap<ObjectRef, Draft>,
}

impl Drafts {
    fn for_group(group: u64) -> Drafts {
        Drafts { group, objects: HashMap::new() }
    }

    /// The drafts of the group `planner` plans, created with its first draft.
    fn of(planner: &mut Planner) -> &mut Drafts {
        let group = planner.group;
        let drafts = planner.drafts.get_or_insert_with(|| Box::new(Drafts::for_group(group)));
        drafts.as_any_mut().downcast_mut().expect("a group's drafts are objects' drafts")
    }
}

impl GroupDrafts for Drafts {
    fn objects(&self) -> Vec<ObjectRef> {
        self.objects.keys().cloned().collect()
    }

    fn close_segment(&mut self, object: &ObjectRef) -> Option<Writes> {
        self.segment_writes(object)
    }

    /// Keys this group (or a group in flight before it) wrote. `None` after a
    /// delete-all, which later groups cannot plan on.
    fn carry(&self, object: &ObjectRef) -> Option<CarriedDraft> {
        let draft = self.objects.get(object)?;
        if draft.cleared || draft.segment.is_some() {
            return None;
        }
        Some(std::sync::Arc::new(draft.written_since(0)))
    }

    fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
        self
    }
}

impl Draft {
    /// The head, and the keys written by groups after `group`.
    fn written_since(&self, group: u64) -> Draft {
        let written: HashMap<String, u64> =
            self.written.iter().filter(|(_, by)| **by > group).map(|(key, by)| (key.clone(), *by)).collect();
        let keys = written.keys().filter_map(|key| Some((key.clone(), self.keys.get(key)?.clone()))).collect();
        Draft { written, ..Draft::new(self.head, keys) }
    }
}

impl WriteJob {
    /// A write of `mutation` under `lease`.
    pub fn new(lease: HeldLease, mutation: Mutation, now_ms: i64, value_cap: usize) -> Self {
        let HeldLease { object, owner, fence } = lease;
        WriteJob { object, fence, owner, mutation, now_ms, value_cap, planned: None }
    }
}

impl Work for WriteJob {
    type Output = Result<Committed, Rejection>;

    fn weight(&self) -> usize {
        self.mutation.weight()
    }

    fn joins(&self) -> Option<&ObjectRef> {
        matches!(self.mutation, Mutation::Ops { .. }).then_some(&self.object)
    }

    fn touches(&self) -> Touches<'_> {
        Touches::Object(&self.object)
    }

    fn chains(&self) -> bool {
        matches!(self.mutation, Mutation::Ops { .. }) && !self.sets_alarms()
    }

    fn reads_rows_of(&self) -> Option<&ObjectRef> {
        // Blob and alarm rows are not resident: planning reads them.
        (!matches!(self.mutation, Mutation::Ops { .. }) || self.sets_alarms()).then_some(&self.object)
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
                    let alarms = alarms_read(planner, &self.object, ops).await?;
                    let drafts = Drafts::of(planner);
                    let draft = drafts.objects.get_mut(&self.object).expect("ensured");
                    self.plan_ops(draft, drafts.group, ops, events, big, alarms)
                }
                Mutation::Restore(restore) => {
                    let has_blobs = if restore.require_empty {
                        planner.reads += 1;
                        blobs::any(&planner.db, &self.object).await?
                    } else {
                        false
                    };
                    let draft = Drafts::of(planner).objects.get_mut(&self.object).expect("ensured");
                    self.plan_restore(draft, restore, has_blobs)
                }
                _ => {
                    planner.reads += 1;
                    let current = match &self.mutation {
                        Mutation::PutBlob { blob, .. } => blobs::get(&planner.db, &self.object, &blob.name).await?,
                        Mutation::DeleteBlob { name, .. } => blobs::get(&planner.db, &self.object, name).await?,
                        _ => None,
                    };
                    let draft = Drafts::of(planner).objects.get_mut(&self.object).expect("ensured");
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
                resident.drop_under(&self.object, self.fence);
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
    let resident = planner.resident.clone();
    let settled_through = planner.settled_through;
    let carried = planner.carried.get(object).cloned();
    let drafts = Drafts::of(planner);
    if !drafts.objects.contains_key(object) {
        // An object a group in flight writes to: as that group leaves it.
        if let Some(draft) = carried.as_deref().and_then(|carried| carried.downcast_ref::<Draft>()) {
            drafts.objects.insert(object.clone(), draft.written_since(settled_through));
        } else if let Some((head, slots)) = resident.view(object, fence, keys) {
            resident.count_hit();
            drafts.objects.insert(object.clone(), Draft::new(head, slots.into_iter().collect()));
        }
    }
    let missing: Vec<&str> = match drafts.objects.get_mut(object) {
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
                match resident.view(object, fence, &[key]).and_then(|(_, mut slots)| slots.pop()) {
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
    let draft =
        Drafts::of(planner).objects.entry(object.clone()).or_insert_with(|| Draft::new(loaded.head, HashMap::new()));
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
    let draft = &Drafts::of(planner).objects[object];
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

/// The versions of the alarms a write names, as stored: alarm rows are not
/// resident, and writes naming alarms of one object never share a group
/// (`reads_rows_of`), so the database has what earlier writes left.
async fn alarms_read(
    planner: &mut Planner,
    object: &ObjectRef,
    ops: &[Op],
) -> Result<HashMap<String, Option<i64>>, StoreError> {
    let mut names: Vec<&str> = Vec::new();
    for op in ops {
        if let Op::SetAlarm { name, .. } | Op::DeleteAlarm { name, .. } = op {
            if !names.contains(&name.as_str()) {
                names.push(name);
            }
        }
    }
    if names.is_empty() {
        return Ok(HashMap::new());
    }
    planner.reads += 1;
    let stored = super::alarms::read_alarms(&planner.db, object, &names).await?;
    let mut versions: HashMap<String, Option<i64>> = names.iter().map(|name| (name.to_string(), None)).collect();
    for alarm in stored {
        versions.insert(alarm.name, Some(alarm.version));
    }
    Ok(versions)
}

impl WriteJob {
    fn sets_alarms(&self) -> bool {
        matches!(&self.mutation, Mutation::Ops { ops, .. } if ops.iter().any(Op::is_alarm))
    }

    /// Every key the mutation reads or writes.
    fn named_keys(&self) -> Vec<&str> {
        let mut named: Vec<&str> = Vec::new();
        if let Mutation::Ops { ops, .. } = &self.mutation {
            for op in ops {
                let (Op::Put { key, .. } | Op::Delete { key, .. } | Op::Get { key }) = op else { continue };
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
        group: u64,
        ops: &[Op],
        events: &[Event],
        big: HashMap<String, Option<Entry>>,
        mut alarms: HashMap<String, Option<i64>>,
    ) -> (Writes, Planned) {
        let from = draft.head;
        let version = from.version + 1;
        // Every answer, refusals and no-ops included, holds only if the fence
        // does at commit: each joins its object's segment, which asserts it.
        draft.join(self);
        let refuse =
            |answer: Rejection| (Writes::default(), Planned { answer: Err(answer), change: None, counted: None });

        // Keys as this write leaves them, on top of the draft.
        let mut now: HashMap<&str, Slot> = HashMap::new();
        let slot_of = |now: &HashMap<&str, Slot>, key: &str| -> Slot {
            now.get(key).cloned().or_else(|| draft.keys.get(key).cloned()).unwrap_or(Slot::Absent)
        };
        let (mut keys_delta, mut bytes_delta) = (0i64, 0i64);
        let mut results = Vec::with_capacity(ops.len());
        let mut changes = Vec::new();
        let mut alarm_statements = Vec::new();
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
                Op::SetAlarm { name, alarm, pre } => {
                    let current = alarms.get(name.as_str()).copied().flatten();
                    if !pre.holds(current) {
                        return refuse(Rejection::PreconditionFailed { op_index, key: name.clone() });
                    }
                    alarms.insert(name.clone(), Some(version));
                    alarm_statements.push(super::alarms::upsert_statement(&self.object, name, alarm, version));
                    results.push(OpResult::SetAlarm { name: name.clone(), version });
                    changes.push(Change::whole("alarm_set", Some(name)));
                }
                Op::DeleteAlarm { name, pre } => {
                    let current = alarms.get(name.as_str()).copied().flatten();
                    if !pre.holds(current) {
                        return refuse(Rejection::PreconditionFailed { op_index, key: name.clone() });
                    }
                    if current.is_some() {
                        alarms.insert(name.clone(), None);
                        alarm_statements.push(super::alarms::delete_statement(&self.object, name));
                        changes.push(Change::whole("alarm_delete", Some(name)));
                    }
                    results.push(OpResult::DeleteAlarm { name: name.clone(), deleted: current.is_some() });
                }
            }
        }
        if changes.is_empty() && events.is_empty() {
            let answer = Ok(Committed { version: from.version, fence: self.fence, changed: false, results });
            return (Writes::default(), Planned { answer, change: None, counted: None });
        }

        // Final states in the order keys were first named, so writes are deterministic.
        let mut resident_keys = Vec::new();
        let segment = draft.segment.as_mut().expect("joined above");
        for key in self.named_keys() {
            let Some(slot) = now.get(key) else { continue };
            match slot {
                Slot::Present { value: Some((value, content_type)), .. } => {
                    segment.keys.insert(key.to_string(), Some((version, value.clone(), content_type.clone())));
                    resident_keys.push((key.to_string(), Slot::written(version, key, value, content_type)));
                }
                Slot::Present { value: None, .. } => unreachable!("a write keeps its value"),
                Slot::Absent => {
                    segment.keys.insert(key.to_string(), None);
                    resident_keys.push((key.to_string(), Slot::Absent));
                }
            }
        }
        segment.alarms.extend(alarm_statements);
        // The outbox rows, in the same transaction: a write that is refused leaves none.
        segment.changes.extend(changes.iter().map(|change| self.change_row(version, change)));
        segment.events.extend(events.iter().map(|event| EventRow {
            version,
            ts_micros: event.ts_micros,
            event_id: event.event_id.to_string(),
            event_type: event.event_type.clone(),
            data: event.data.clone(),
        }));
        segment.now_ms = segment.now_ms.max(self.now_ms);

        let head = Head {
            fence: self.fence,
            version,
            key_count: from.key_count + keys_delta,
            bytes: from.bytes + bytes_delta,
        };
        draft.head = head;
        for (key, slot) in now {
            draft.written.insert(key.to_string(), group);
            draft.keys.insert(key.to_string(), slot);
        }
        let change =
            ResidentChange { fence: self.fence, from_version: from.version, head, cleared: false, keys: resident_keys };
        let answer = Ok(Committed { version, fence: self.fence, changed: true, results });
        (Writes::default(), Planned { answer, change: Some(change), counted: None })
    }

    /// Blobs and deleting a whole object. `current`: the blob as stored.
    fn plan_general(&self, draft: &mut Draft, current: Option<crate::model::BlobMeta>) -> (Writes, Planned) {
        let from = draft.head;
        let version = from.version + 1;
        let assertion = fence_assertion(&self.object, &self.owner, self.fence, Some(from.version));
        let only_check = |answer: Result<Committed, Rejection>| answer_under_fence(&assertion, answer);
        let mut statements = Vec::new();
        let bump = |key_count: i64, bytes: i64| self.object_row(version, key_count, bytes);
        let mut head = Head { version, ..from };
        let mut cleared = false;
        let mut counted = None;
        let record;
        let (result, change) = match &self.mutation {
            Mutation::DeleteAll => {
                if from.version == 0 {
                    return only_check(Err(Rejection::NotFound));
                }
                statements.extend(self.clearing_statements());
                statements.push(bump(0, 0));
                statements.push(super::alarms::delete_all_statement(&self.object));
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
                record = restore::blob_record(blob, version);
                (OpResult::PutBlob { name: blob.name.clone(), version }, Change::blob_put(blob, &record))
            }
            Mutation::DeleteBlob { name, pre } => {
                if !pre.holds(current.as_ref().map(|b| b.version)) {
                    return only_check(Err(Rejection::PreconditionFailed { op_index: 0, key: name.clone() }));
                }
                let Some(current) = current else {
                    let result = OpResult::DeleteBlob { name: name.clone(), deleted: false };
                    return only_check(Ok(Committed {
                        version: from.version,
                        fence: self.fence,
                        changed: false,
                        results: vec![result],
                    }));
                };
                statements.push(bump(from.key_count, from.bytes));
                statements.extend(blobs::delete_statements(&self.object, name, &current.storage_key, self.now_ms));
                let result = OpResult::DeleteBlob { name: name.clone(), deleted: true };
                (result, Change::whole("blob_delete", Some(name)))
            }
            Mutation::Ops { .. } | Mutation::Restore(_) => unreachable!("planned on their own"),
        };
        let row = self.change_row(version, &change);
        statements.extend(outbox_statements(&self.object, self.fence, &self.owner, self.now_ms, &[row], &[]));
        draft.head = head;
        if cleared {
            draft.keys.clear();
            draft.cleared = true;
        }
        let resident = ResidentChange { fence: self.fence, from_version: from.version, head, cleared, keys: vec![] };
        let answer = Ok(Committed { version, fence: self.fence, changed: true, results: vec![result] });
        (Writes { assertions: vec![assertion], statements }, Planned { answer, change: Some(resident), counted })
    }

    /// The statements that empty the object, in this order (a delete-all's
    /// counts are the changes of the second and third): its blobs' storage
    /// keys become garbage, its blob rows go, its keys go.
    fn clearing_statements(&self) -> [Stmt; 3] {
        let ObjectRef { ns, id } = &self.object;
        [
            blobs::garbage_all_statement(&self.object, self.now_ms),
            blobs::delete_all_statement(&self.object),
            Stmt::exec("DELETE FROM kv WHERE ns = ?1 AND id = ?2", vec![ns.as_str().into(), id.as_str().into()]),
        ]
    }

    /// The object's row at `version` with these counts.
    fn object_row(&self, version: i64, key_count: i64, bytes: i64) -> Stmt {
        let ObjectRef { ns, id } = &self.object;
        Stmt::exec(
            "UPDATE objects SET version = ?3, updated_at = ?4, key_count = ?5, bytes = ?6 WHERE ns = ?1 AND id = ?2",
            vec![
                ns.as_str().into(),
                id.as_str().into(),
                version.into(),
                self.now_ms.into(),
                key_count.into(),
                bytes.into(),
            ],
        )
    }

    /// The outbox row of one change at `version`.
    fn change_row(&self, version: i64, change: &Change<'_>) -> ChangeRow {
        ChangeRow {
            version,
            ts_micros: self.now_ms * 1000,
            op: change.op,
            key: change.key.map(str::to_string),
            content_type: change.content_type.map(str::to_string),
            size: change.size,
            value: change.value.map(|v| v[..v.len().min(self.value_cap)].to_vec()),
            truncated: change.value.map(|v| i64::from(v.len() > self.value_cap)),
        }
    }
}

/// An answer that writes nothing yet holds only if the fence does: the
/// assertion alone.
fn answer_under_fence(assertion: &Stmt, answer: Result<Committed, Rejection>) -> (Writes, Planned) {
    let writes = Writes { assertions: vec![assertion.clone()], statements: vec![] };
    (writes, Planned { answer, change: None, counted: None })
}

/// The key writes of one object in one group, merged into one run of
/// statements under one fence assertion: every write of the object in the
/// group shares its fence, so they stand or fall together anyway, and
/// merging makes a group of N writes to one object four statements, not 4N.
struct Segment {
    /// The object as the segment's first write found it: what the assertion checks.
    start: Head,
    owner: String,
    now_ms: i64,
    /// Each key's final state: its value at its version, or deleted.
    keys: indexmap::IndexMap<String, Option<(i64, bytes::Bytes, std::sync::Arc<str>)>>,
    /// Alarm rows set or deleted, in op order.
    alarms: Vec<Stmt>,
    changes: Vec<ChangeRow>,
    events: Vec<EventRow>,
}

struct ChangeRow {
    version: i64,
    ts_micros: i64,
    op: &'static str,
    key: Option<String>,
    content_type: Option<String>,
    size: Option<i64>,
    value: Option<Vec<u8>>,
    truncated: Option<i64>,
}

struct EventRow {
    version: i64,
    ts_micros: i64,
    event_id: String,
    event_type: String,
    data: String,
}

impl Draft {
    /// Adds `job` to the object's open segment, opening one at the current state.
    fn join(&mut self, job: &WriteJob) {
        if self.segment.is_none() {
            self.segment = Some(Segment {
                start: self.head,
                owner: job.owner.clone(),
                now_ms: job.now_ms,
                keys: Default::default(),
                alarms: Vec::new(),
                changes: Vec::new(),
                events: Vec::new(),
            });
        }
    }
}

impl Drafts {
    /// Closes `object`'s segment: its assertion and statements. Later writes
    /// to the object in the same group open a new one.
    fn segment_writes(&mut self, object: &ObjectRef) -> Option<Writes> {
        let draft = self.objects.get_mut(object)?;
        let segment = draft.segment.take()?;
        let end = draft.head;
        let assertion = fence_assertion(object, &segment.owner, end.fence, Some(segment.start.version));
        if end.version == segment.start.version {
            // Only answers that depend on the fence: nothing to write.
            return Some(Writes { assertions: vec![assertion], statements: vec![] });
        }
        let ObjectRef { ns, id } = object;
        let object_params = || -> Vec<Value> { vec![ns.as_str().into(), id.as_str().into()] };
        let mut statements = vec![Stmt::exec(
            "UPDATE objects SET version = ?5, updated_at = ?6, key_count = key_count + ?7, bytes = bytes + ?8
             WHERE ns = ?1 AND id = ?2 AND fence = ?3 AND owner = ?4",
            vec![
                ns.as_str().into(),
                id.as_str().into(),
                end.fence.into(),
                segment.owner.as_str().into(),
                end.version.into(),
                segment.now_ms.into(),
                (end.key_count - segment.start.key_count).into(),
                (end.bytes - segment.start.bytes).into(),
            ],
        )];
        let (written, deleted): (Vec<_>, Vec<_>) = segment.keys.iter().partition(|(_, state)| state.is_some());
        for chunk in written.chunks(ROWS_PER_STATEMENT) {
            let mut params = object_params();
            for (key, state) in chunk {
                let (version, value, content_type) = state.as_ref().expect("partitioned");
                params.extend([
                    key.as_bytes().into(),
                    Value::Blob(value.to_vec()),
                    content_type.as_ref().into(),
                    (*version).into(),
                ]);
            }
            statements.push(Stmt::exec_rows(&UPSERT_KV, chunk.len(), params));
        }
        for chunk in deleted.chunks(ROWS_PER_STATEMENT) {
            let mut params = object_params();
            params.extend(chunk.iter().map(|(key, _)| Value::from(key.as_bytes())));
            statements.push(Stmt::exec_rows(&DELETE_KV, chunk.len(), params));
        }
        statements.extend(segment.alarms);
        statements.extend(outbox_statements(
            object,
            end.fence,
            &segment.owner,
            segment.now_ms,
            &segment.changes,
            &segment.events,
        ));
        Some(Writes { assertions: vec![assertion], statements })
    }
}

/// The outbox rows of changes and events, a few multi-row INSERTs.
fn outbox_statements(
    object: &ObjectRef,
    fence: i64,
    owner: &str,
    now_ms: i64,
    changes: &[ChangeRow],
    events: &[EventRow],
) -> Vec<Stmt> {
    let shared = || -> Vec<Value> {
        vec![object.ns.as_str().into(), object.id.as_str().into(), fence.into(), owner.into(), now_ms.into()]
    };
    let mut statements = Vec::new();
    for chunk in changes.chunks(ROWS_PER_STATEMENT) {
        let mut params = shared();
        for row in chunk {
            params.extend([
                row.version.into(),
                row.ts_micros.into(),
                row.op.into(),
                row.key.clone().into(),
                row.content_type.clone().into(),
                row.size.into(),
                row.value.clone().into(),
                row.truncated.into(),
            ]);
        }
        statements.push(Stmt::exec_rows(&OUTBOX_CHANGES, chunk.len(), params));
    }
    for chunk in events.chunks(ROWS_PER_STATEMENT) {
        let mut params = shared();
        for row in chunk {
            params.extend([
                row.version.into(),
                row.ts_micros.into(),
                row.event_id.as_str().into(),
                row.event_type.as_str().into(),
                row.data.as_str().into(),
            ]);
        }
        statements.push(Stmt::exec_rows(&OUTBOX_EVENTS, chunk.len(), params));
    }
    statements
}

/// Rows per multi-row statement: as many as a batch holds ops, so a batch's
/// keys take one statement each (events calls carry up to 1000, in chunks).
/// 128 outbox rows bind 774 parameters, far below SQLite's 32,766.
const ROWS_PER_STATEMENT: usize = super::MAX_BATCH_OPS;

/// `?1`, `?2`: the object; then key, value, content type and version per row.
static UPSERT_KV: Shape = Shape {
    text: |rows| {
        let values: Vec<String> = (0..rows).map(|row| format!("(?1, ?2, {})", numbered(3 + 4 * row, 4))).collect();
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

/// `?1` to `?5`: ns, id, fence, instance, commit time; then 8 values per row.
static OUTBOX_CHANGES: Shape = Shape {
    text: |rows| {
        let values: Vec<String> = (0..rows)
            .map(|row| {
                let n = 6 + 8 * row;
                format!("('change', ?1, ?2, ?{}, ?3, ?4, ?{}, {}, ?5)", n, n + 1, numbered(n + 2, 6))
            })
            .collect();
        format!(
            "INSERT INTO outbox (kind, ns, id, version, fence, instance, ts, op, key, content_type, size, value, value_truncated, committed_ms)
             VALUES {}",
            values.join(", ")
        )
    },
};

/// `?1` to `?5`: ns, id, fence, instance, commit time; then 5 values per row.
static OUTBOX_EVENTS: Shape = Shape {
    text: |rows| {
        let values: Vec<String> = (0..rows)
            .map(|row| {
                let n = 6 + 5 * row;
                format!("('event', ?1, ?2, ?{}, ?3, ?4, {}, ?5)", n, numbered(n + 1, 4))
            })
            .collect();
        format!(
            "INSERT INTO outbox (kind, ns, id, version, fence, instance, ts, event_id, type, data, committed_ms) VALUES {}",
            values.join(", ")
        )
    },
};
