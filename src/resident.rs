//! Owner-resident state: what the replica holding an object's lease knows of
//! it. The owner is the object's only writer, so once it has read the object
//! (when it takes the lease, or on a miss) every later change passes through
//! its own writer, which applies it here after the commit. Conditions are
//! checked against this state without a read, and reads are answered from
//! it while the lease is certainly ours (see `Guard::readable`).
//!
//! Only the writer adds, changes or evicts entries, in commit order; readers
//! look up and mark entries as used; the guard drops an object when its
//! lease goes. Every entry is tied to the fence it was read under, and every
//! change checks that it applies to the version it was planned on, so a gap
//! can only make the state absent, never stale.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use libsql::Value;
use prometheus::{IntCounter, IntGauge};

use crate::db::batch::Stmt;
use crate::db::StoreError;
use crate::model::{Entry, ObjectRef};
use crate::telemetry::Metrics;

/// Values above this size are not kept (their version and size are): a read
/// of one goes to the database.
pub const MAX_RESIDENT_VALUE: usize = 64 * 1024;
/// Keys read when a lease is taken; an object with more is resident in part
/// (keys not yet seen are read when a write names them).
pub const LOAD_KEYS: usize = 4096;
/// Bookkeeping per object and per key, beyond the bytes of keys and values.
const OBJECT_OVERHEAD: usize = 256;
const KEY_OVERHEAD: usize = 96;

/// What is known of one key.
#[derive(Debug, Clone)]
pub enum Slot {
    Present {
        version: i64,
        /// Key and value bytes, as the object's `bytes` counts them.
        size: i64,
        /// The value and its content type, unless it is too large to keep.
        value: Option<(Bytes, Arc<str>)>,
    },
    Absent,
}

impl Slot {
    pub fn version(&self) -> Option<i64> {
        match self {
            Slot::Present { version, .. } => Some(*version),
            Slot::Absent => None,
        }
    }

    pub fn size(&self) -> Option<i64> {
        match self {
            Slot::Present { size, .. } => Some(*size),
            Slot::Absent => None,
        }
    }

    /// A slot for a value just written or read.
    pub fn written(version: i64, key: &str, value: &Bytes, content_type: &str) -> Slot {
        let kept = (value.len() <= MAX_RESIDENT_VALUE).then(|| (value.clone(), Arc::from(content_type)));
        Slot::Present { version, size: (key.len() + value.len()) as i64, value: kept }
    }

    fn memory(&self, key: &str) -> usize {
        KEY_OVERHEAD
            + key.len()
            + match self {
                Slot::Present { value: Some((value, content_type)), .. } => value.len() + content_type.len(),
                _ => 0,
            }
    }
}

/// The object row as the owner knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Head {
    pub fence: i64,
    pub version: i64,
    pub key_count: i64,
    pub bytes: i64,
}

/// An object as read from the database: its row and some (or all) keys.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub head: Head,
    pub keys: Vec<(String, Slot)>,
    /// Whether `keys` are all the object's keys (so any other key is absent).
    pub complete: bool,
}

/// One committed write, to apply to the resident copy.
#[derive(Debug, Clone)]
pub struct Change {
    pub fence: i64,
    /// The version the write was planned on; the change applies only on top of it.
    pub from_version: i64,
    pub head: Head,
    /// Every key is gone first (delete-all).
    pub cleared: bool,
    pub keys: Vec<(String, Slot)>,
}

struct Resident {
    head: Head,
    keys: HashMap<String, Slot>,
    complete: bool,
    memory: usize,
    used: u64,
}

#[derive(Default)]
struct Inner {
    objects: HashMap<ObjectRef, Resident>,
    /// Least recently used first.
    by_use: BTreeMap<u64, ObjectRef>,
    tick: u64,
    memory: usize,
}

/// What a read found in memory.
pub enum Lookup {
    Found(Entry),
    Absent,
}

pub struct ResidentState {
    inner: Mutex<Inner>,
    budget: usize,
    hits: IntCounter,
    misses: IntCounter,
    evictions: IntCounter,
    bytes: IntGauge,
    objects: IntGauge,
}

/// What a replica taking an object's lease (as `owner`) reads of it, in the same
/// transaction (`Acquire`): the row, and its first `LOAD_KEYS` keys with
/// values up to `LOAD_VALUE_BYTES`.
pub fn load_statements(object: &ObjectRef, owner: &str) -> [Stmt; 2] {
    let ns_id = || -> Vec<Value> { vec![object.ns.as_str().into(), object.id.as_str().into()] };
    let mut keys = ns_id();
    keys.extend([(LOAD_VALUE_BYTES as i64).into(), (LOAD_KEYS as i64 + 1).into(), owner.into()]);
    [
        Stmt::query("SELECT fence, version, key_count, bytes FROM objects WHERE ns = ?1 AND id = ?2", ns_id()),
        // Only when the lease was taken: a replica that finds the object held
        // (every write it forwards asks again) reads no keys.
        Stmt::query(
            "SELECT key, version, length(key) + length(value), CASE WHEN length(value) <= ?3 THEN value END, content_type
             FROM kv WHERE ns = ?1 AND id = ?2
               AND EXISTS (SELECT 1 FROM objects WHERE ns = ?1 AND id = ?2 AND owner = ?5)
             ORDER BY key LIMIT ?4",
            keys,
        ),
    ]
}

/// Values read with the keys when a lease is taken (larger ones on first read).
const LOAD_VALUE_BYTES: usize = 4096;

/// The state `load_statements` read.
pub fn loaded(object_row: &[Vec<Value>], key_rows: &[Vec<Value>]) -> Result<Option<Loaded>, StoreError> {
    let int = |value: &Value| match value {
        Value::Integer(n) => Ok(*n),
        other => Err(StoreError::Internal(format!("expected an integer, the database answered {other:?}"))),
    };
    let Some(row) = object_row.first() else { return Ok(None) };
    let [fence, version, key_count, bytes] = row.as_slice() else {
        return Err(StoreError::Internal("unexpected object row shape".into()));
    };
    let head = Head { fence: int(fence)?, version: int(version)?, key_count: int(key_count)?, bytes: int(bytes)? };
    let complete = key_rows.len() <= LOAD_KEYS;
    let mut keys = Vec::with_capacity(key_rows.len().min(LOAD_KEYS));
    for row in key_rows.iter().take(LOAD_KEYS) {
        let [Value::Blob(key), version, size, value, content_type] = row.as_slice() else {
            return Err(StoreError::Internal("unexpected kv row shape".into()));
        };
        let key =
            String::from_utf8(key.clone()).map_err(|_| StoreError::Internal("a stored key is not UTF-8".into()))?;
        let value = match (value, content_type) {
            (Value::Blob(value), Value::Text(content_type)) => {
                Some((Bytes::from(value.clone()), std::sync::Arc::from(content_type.as_str())))
            }
            _ => None,
        };
        keys.push((key, Slot::Present { version: int(version)?, size: int(size)?, value }));
    }
    Ok(Some(Loaded { head, keys, complete }))
}

impl ResidentState {
    pub fn new(budget: usize, metrics: &Metrics) -> ResidentState {
        let hits = IntCounter::new(
            "statehouse_resident_hits_total",
            "Reads and write checks answered from the owner's memory",
        )
        .unwrap();
        let misses = IntCounter::new(
            "statehouse_resident_misses_total",
            "Reads and write checks that had to read the database (not resident, evicted, or the lease not certain)",
        )
        .unwrap();
        let evictions =
            IntCounter::new("statehouse_resident_evictions_total", "Objects dropped from memory to stay in budget")
                .unwrap();
        let bytes = IntGauge::new("statehouse_resident_bytes", "Memory held by owner-resident object state").unwrap();
        let objects = IntGauge::new("statehouse_resident_objects", "Objects whose state this replica holds").unwrap();
        for collector in [&hits, &misses, &evictions] {
            metrics.register(Box::new(collector.clone()));
        }
        metrics.register(Box::new(bytes.clone()));
        metrics.register(Box::new(objects.clone()));
        ResidentState { inner: Mutex::new(Inner::default()), budget, hits, misses, evictions, bytes, objects }
    }

    pub fn enabled(&self) -> bool {
        self.budget > 0
    }

    /// A key as memory knows it under `fence`: `None` when memory cannot tell.
    pub fn read(&self, object: &ObjectRef, key: &str) -> Option<(i64, Lookup)> {
        let mut inner = self.inner.lock().expect("resident lock");
        let found = inner.objects.get(object).and_then(|resident| {
            let lookup = match resident.keys.get(key) {
                Some(Slot::Present { version, value: Some((value, content_type)), .. }) => Lookup::Found(Entry {
                    key: key.to_string(),
                    value: value.clone(),
                    content_type: content_type.to_string(),
                    version: *version,
                }),
                Some(Slot::Present { value: None, .. }) => return None,
                Some(Slot::Absent) => Lookup::Absent,
                None if resident.complete => Lookup::Absent,
                None => return None,
            };
            Some((resident.head.fence, lookup))
        });
        if found.is_some() {
            inner.touch(object);
        }
        found
    }

    pub fn count_hit(&self) {
        self.hits.inc();
    }

    pub fn count_miss(&self) {
        self.misses.inc();
    }

    /// The object's row and the slots of `keys` known under `fence`; `None`
    /// when the object is not resident under that fence. Keys memory cannot
    /// answer for are left out.
    pub fn view(&self, object: &ObjectRef, fence: i64, keys: &[&str]) -> Option<(Head, Vec<(String, Slot)>)> {
        let mut inner = self.inner.lock().expect("resident lock");
        let resident = inner.objects.get(object)?;
        if resident.head.fence != fence {
            return None;
        }
        let slots = keys
            .iter()
            .filter_map(|key| {
                let slot = resident.keys.get(*key).cloned().or_else(|| resident.complete.then_some(Slot::Absent))?;
                Some((key.to_string(), slot))
            })
            .collect();
        let view = (resident.head, slots);
        inner.touch(object);
        Some(view)
    }

    /// The fence and version the object is resident at, before a database read that may `fill` it.
    pub fn head(&self, object: &ObjectRef) -> Option<(i64, i64)> {
        let inner = self.inner.lock().expect("resident lock");
        inner.objects.get(object).map(|r| (r.head.fence, r.head.version))
    }

    /// Records what a read found in the database, if nothing was committed to
    /// the object since `before` (from `head`): then it is the key's current
    /// state. Otherwise the read may be older than memory, and is not kept.
    pub fn fill(&self, object: &ObjectRef, before: (i64, i64), key: &str, entry: Option<&Entry>) {
        let mut inner = self.inner.lock().expect("resident lock");
        let Some(resident) = inner.objects.get_mut(object) else { return };
        if (resident.head.fence, resident.head.version) != before {
            return;
        }
        let slot = match entry {
            Some(entry) => Slot::written(entry.version, key, &entry.value, &entry.content_type),
            None => Slot::Absent,
        };
        let before = resident.memory;
        resident.memory += slot.memory(key);
        if let Some(old) = resident.keys.insert(key.to_string(), slot) {
            resident.memory -= old.memory(key);
        }
        let after = resident.memory;
        inner.memory = inner.memory + after - before;
        self.shrink(&mut inner);
    }

    /// Makes `loaded` the object's resident state (a lease was just taken).
    pub fn install(&self, object: &ObjectRef, loaded: Loaded) {
        if !self.enabled() {
            return;
        }
        let mut inner = self.inner.lock().expect("resident lock");
        inner.remove(object);
        let mut resident = Resident {
            head: loaded.head,
            keys: HashMap::with_capacity(loaded.keys.len()),
            complete: loaded.complete,
            memory: OBJECT_OVERHEAD,
            used: 0,
        };
        for (key, slot) in loaded.keys {
            resident.memory += slot.memory(&key);
            resident.keys.insert(key, slot);
        }
        inner.insert(object.clone(), resident);
        self.shrink(&mut inner);
    }

    /// Adds keys read from the database at `head` (a miss). Creates a partial
    /// entry when the object is not resident.
    pub fn learn(&self, object: &ObjectRef, head: Head, keys: Vec<(String, Slot)>) {
        if !self.enabled() {
            return;
        }
        let mut inner = self.inner.lock().expect("resident lock");
        let current = inner.objects.get(object).map(|r| r.head);
        match current {
            Some(known) if known == head => {}
            Some(_) => {
                // Not the state it was read at: memory cannot be trusted for this object.
                inner.remove(object);
                self.publish(&inner);
                return;
            }
            None => {
                let resident =
                    Resident { head, keys: HashMap::new(), complete: false, memory: OBJECT_OVERHEAD, used: 0 };
                inner.insert(object.clone(), resident);
            }
        }
        let resident = inner.objects.get_mut(object).expect("just checked");
        let before = resident.memory;
        for (key, slot) in keys {
            resident.memory += slot.memory(&key);
            if let Some(old) = resident.keys.insert(key.clone(), slot) {
                resident.memory -= old.memory(&key);
            }
        }
        let after = resident.memory;
        inner.memory = inner.memory + after - before;
        self.shrink(&mut inner);
    }

    /// Applies a committed write. If memory is not at the version the write
    /// was planned on, the object is dropped instead (read again on next use).
    pub fn apply(&self, object: &ObjectRef, change: Change) {
        let mut inner = self.inner.lock().expect("resident lock");
        let Some(resident) = inner.objects.get_mut(object) else { return };
        if resident.head.fence != change.fence || resident.head.version != change.from_version {
            inner.remove(object);
            self.publish(&inner);
            return;
        }
        let before = resident.memory;
        if change.cleared {
            resident.keys.clear();
            resident.complete = true;
            resident.memory = OBJECT_OVERHEAD;
        }
        for (key, slot) in change.keys {
            resident.memory += slot.memory(&key);
            if let Some(old) = resident.keys.insert(key.clone(), slot) {
                resident.memory -= old.memory(&key);
            }
        }
        resident.head = change.head;
        let after = resident.memory;
        inner.memory = inner.memory + after - before;
        inner.touch(object);
        self.shrink(&mut inner);
    }

    /// Forgets the object (its lease went, or a write on it failed in a way
    /// that leaves its state unknown).
    pub fn drop_object(&self, object: &ObjectRef) {
        let mut inner = self.inner.lock().expect("resident lock");
        if inner.remove(object) {
            self.publish(&inner);
        }
    }

    /// Forgets the object if it is resident under `fence` (a write planned
    /// under that fence was refused); state read under a newer fence stays.
    pub fn drop_under(&self, object: &ObjectRef, fence: i64) {
        let mut inner = self.inner.lock().expect("resident lock");
        if inner.objects.get(object).is_some_and(|r| r.head.fence == fence) && inner.remove(object) {
            self.publish(&inner);
        }
    }

    pub fn drop_all(&self) {
        let mut inner = self.inner.lock().expect("resident lock");
        *inner = Inner::default();
        self.publish(&inner);
    }

    /// Evicts the least recently used objects until memory is within budget.
    fn shrink(&self, inner: &mut Inner) {
        while inner.memory > self.budget {
            let Some((_, oldest)) = inner.by_use.pop_first() else { break };
            if let Some(resident) = inner.objects.remove(&oldest) {
                inner.memory -= resident.memory;
                self.evictions.inc();
            }
        }
        self.publish(inner);
    }

    fn publish(&self, inner: &Inner) {
        self.bytes.set(inner.memory as i64);
        self.objects.set(inner.objects.len() as i64);
    }
}

impl Inner {
    fn insert(&mut self, object: ObjectRef, mut resident: Resident) {
        self.tick += 1;
        resident.used = self.tick;
        self.memory += resident.memory;
        self.by_use.insert(self.tick, object.clone());
        self.objects.insert(object, resident);
    }

    fn remove(&mut self, object: &ObjectRef) -> bool {
        match self.objects.remove(object) {
            Some(resident) => {
                self.by_use.remove(&resident.used);
                self.memory -= resident.memory;
                true
            }
            None => false,
        }
    }

    fn touch(&mut self, object: &ObjectRef) {
        self.tick += 1;
        let tick = self.tick;
        if let Some(resident) = self.objects.get_mut(object) {
            let old = std::mem::replace(&mut resident.used, tick);
            if let Some(key) = self.by_use.remove(&old) {
                self.by_use.insert(tick, key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(budget: usize) -> ResidentState {
        ResidentState::new(budget, &Metrics::new("test", "full"))
    }

    fn head(version: i64) -> Head {
        Head { fence: 3, version, key_count: 1, bytes: 2 }
    }

    fn value(version: i64, text: &'static str) -> Slot {
        Slot::written(version, "k", &Bytes::from_static(text.as_bytes()), "text/plain")
    }

    fn read(state: &ResidentState, object: &ObjectRef) -> Option<String> {
        match state.read(object, "k")? {
            (_, Lookup::Found(entry)) => Some(String::from_utf8(entry.value.to_vec()).unwrap()),
            (_, Lookup::Absent) => Some("<absent>".into()),
        }
    }

    #[test]
    fn a_change_applies_only_on_the_version_it_was_planned_on() {
        let state = state(1 << 20);
        let object = ObjectRef::new("ns", "o").unwrap();
        state.install(&object, Loaded { head: head(1), keys: vec![("k".into(), value(1, "a"))], complete: true });
        let change = |from, to, text| Change {
            fence: 3,
            from_version: from,
            head: head(to),
            cleared: false,
            keys: vec![("k".into(), value(to, text))],
        };
        state.apply(&object, change(1, 2, "b"));
        assert_eq!(read(&state, &object).as_deref(), Some("b"));
        assert_eq!(
            state.read(&object, "other").map(|(fence, l)| (fence, matches!(l, Lookup::Absent))),
            Some((3, true))
        );
        // Planned on a version memory is not at: memory cannot be trusted, the object goes.
        state.apply(&object, change(1, 3, "c"));
        assert_eq!(read(&state, &object), None);
    }

    #[test]
    fn a_read_fills_memory_only_if_nothing_committed_meanwhile() {
        let state = state(1 << 20);
        let object = ObjectRef::new("ns", "o").unwrap();
        state.install(&object, Loaded { head: head(1), keys: vec![], complete: false });
        assert_eq!(read(&state, &object), None, "an incomplete object cannot answer for an unseen key");
        let entry = |text: &'static str| Entry {
            key: "k".into(),
            value: Bytes::from_static(text.as_bytes()),
            content_type: "text/plain".into(),
            version: 1,
        };
        let before = state.head(&object).unwrap();
        state.apply(&object, Change { fence: 3, from_version: 1, head: head(2), cleared: false, keys: vec![] });
        state.fill(&object, before, "k", Some(&entry("old")));
        assert_eq!(read(&state, &object), None, "a read older than memory is not kept");
        let before = state.head(&object).unwrap();
        state.fill(&object, before, "k", Some(&entry("current")));
        assert_eq!(read(&state, &object).as_deref(), Some("current"));
    }

    #[test]
    fn memory_stays_within_budget_evicting_the_least_recently_used() {
        let state = state(3 * (OBJECT_OVERHEAD + KEY_OVERHEAD + 1 + 1 + "text/plain".len()));
        let objects: Vec<_> = (0..4).map(|i| ObjectRef::new("ns", &format!("o{i}")).unwrap()).collect();
        for object in &objects[..3] {
            state.install(object, Loaded { head: head(1), keys: vec![("k".into(), value(1, "v"))], complete: true });
        }
        assert!(read(&state, &objects[0]).is_some(), "o0 is used, so o1 is now the oldest");
        state.install(&objects[3], Loaded { head: head(1), keys: vec![("k".into(), value(1, "v"))], complete: true });
        let resident: Vec<bool> = objects.iter().map(|o| read(&state, o).is_some()).collect();
        assert_eq!(resident, [true, false, true, true]);
        assert_eq!(state.evictions.get(), 1);
        assert!(state.bytes.get() as usize <= state.budget);
    }
}
