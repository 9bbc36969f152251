//! The vocabulary every layer shares: names and object identities, the
//! changes a write makes and what became of them, blob metadata. It imports
//! nothing of the crate, so any module may use it without a cycle.

mod alarm;
mod names;

use std::collections::BTreeMap;

use bytes::Bytes;

pub use alarm::{
    validate_alarm_name, Alarm, AlarmSpec, DEFAULT_ALARM_NAME, MAX_ALARM_NAME_BYTES, MAX_ALARM_PAYLOAD_BYTES,
    MIN_ALARM_EVERY_MS,
};
pub use names::{
    validate_id, validate_id_prefix, validate_key, validate_ns, InvalidName, ObjectRef, MAX_ID_BYTES, MAX_KEY_BYTES,
    MAX_NS_BYTES,
};

/// The most key operations one write may carry.
pub const MAX_BATCH_OPS: usize = 128;

/// An entity-tag condition (`If-Match` / `If-None-Match`, or a batch op's
/// `if_version` / `if_absent`) on a key's version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VersionMatch {
    /// `*`: the key exists.
    Any,
    /// The key's version is one of these.
    OneOf(Vec<i64>),
}

impl VersionMatch {
    pub fn matches(&self, current: Option<i64>) -> bool {
        match (self, current) {
            (_, None) => false,
            (VersionMatch::Any, Some(_)) => true,
            (VersionMatch::OneOf(versions), Some(v)) => versions.contains(&v),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Precondition {
    pub if_match: Option<VersionMatch>,
    pub if_none_match: Option<VersionMatch>,
}

impl Precondition {
    pub fn holds(&self, current: Option<i64>) -> bool {
        self.if_match.as_ref().is_none_or(|m| m.matches(current))
            && self.if_none_match.as_ref().is_none_or(|m| !m.matches(current))
    }
}

#[derive(Debug, Clone)]
pub enum Op {
    Put { key: String, value: Bytes, content_type: String, pre: Precondition },
    Delete { key: String, pre: Precondition },
    Get { key: String },
    SetAlarm { name: String, alarm: AlarmSpec, pre: Precondition },
    DeleteAlarm { name: String, pre: Precondition },
}

impl Op {
    /// Alarm ops (`SetAlarm` sets or replaces one) carry conditions on the alarm's version.
    pub fn is_alarm(&self) -> bool {
        matches!(self, Op::SetAlarm { .. } | Op::DeleteAlarm { .. })
    }
}

/// An application event, recorded with the change it travels with.
#[derive(Debug, Clone)]
pub struct Event {
    pub event_id: uuid::Uuid,
    pub event_type: String,
    /// The client's JSON data, serialised.
    pub data: String,
    /// Unix microseconds: the client's `ts`, or the time the request arrived.
    pub ts_micros: i64,
}

/// A change to one object, committed atomically with one version bump.
#[derive(Debug, Clone)]
pub enum Mutation {
    /// Key operations and events, all or nothing.
    Ops {
        ops: Vec<Op>,
        events: Vec<Event>,
    },
    /// Every key and every blob of the object.
    DeleteAll,
    /// Make an uploaded blob visible (its bytes are already in the store).
    PutBlob {
        blob: BlobMeta,
        pre: Precondition,
    },
    DeleteBlob {
        name: String,
        pre: Precondition,
    },
    /// Replace every key and blob with a state from the object's history (or
    /// another object's, for a fork), as one write.
    Restore(std::sync::Arc<Restore>),
}

/// A restore or fork: the state to write, where it came from, and its conditions.
#[derive(Debug, Clone)]
pub struct Restore {
    pub keys: Vec<RestoredKey>,
    pub blobs: Vec<BlobMeta>,
    pub source: RestoreSource,
    /// `If-Match`: the object's version must be one of these.
    pub if_version: Option<VersionMatch>,
    /// A fork without `overwrite`: the object must have no keys and no blobs.
    pub require_empty: bool,
}

#[derive(Debug, Clone)]
pub struct RestoredKey {
    pub key: String,
    pub value: Bytes,
    pub content_type: String,
}

/// The version a restore's state is that of.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RestoreSource {
    pub ns: String,
    pub id: String,
    pub version: i64,
}

impl Mutation {
    /// Key operations alone, with no events.
    pub fn ops(ops: Vec<Op>) -> Mutation {
        Mutation::Ops { ops, events: Vec::new() }
    }

    /// Roughly how many bytes this change writes, to bound a group commit.
    pub fn weight(&self) -> usize {
        match self {
            Mutation::DeleteAll | Mutation::DeleteBlob { .. } => 64,
            Mutation::PutBlob { blob, .. } => 512 + blob.name.len(),
            Mutation::Restore(restore) => {
                restore.keys.iter().map(|k| 2 * (k.key.len() + k.value.len()) + 128).sum::<usize>()
                    + restore.blobs.len() * 1024
            }
            Mutation::Ops { ops, events } => {
                ops.iter()
                    .map(|op| match op {
                        Op::Put { key, value, .. } => 2 * (key.len() + value.len()) + 128,
                        Op::Delete { key, .. } | Op::Get { key } => key.len() + 128,
                        Op::SetAlarm { name, alarm, .. } => {
                            name.len() + alarm.payload.as_ref().map_or(0, String::len) + 256
                        }
                        Op::DeleteAlarm { name, .. } => name.len() + 128,
                    })
                    .sum::<usize>()
                    + events.iter().map(|e| e.data.len() + e.event_type.len() + 128).sum::<usize>()
            }
        }
    }
}

#[derive(Debug, Clone)]
pub enum OpResult {
    Put { key: String, version: i64 },
    Delete { key: String, deleted: bool },
    Get { key: String, entry: Option<Entry> },
    DeleteAll { deleted_keys: i64, deleted_blobs: i64 },
    PutBlob { name: String, version: i64 },
    DeleteBlob { name: String, deleted: bool },
    SetAlarm { name: String, version: i64 },
    DeleteAlarm { name: String, deleted: bool },
    Restore { keys: i64, blobs: i64 },
}

/// What a committed (or harmlessly empty) write did.
#[derive(Debug, Clone)]
pub struct Committed {
    /// The object's version after the write (unchanged when nothing changed).
    pub version: i64,
    /// The fence under which it was checked.
    pub fence: i64,
    pub changed: bool,
    pub results: Vec<OpResult>,
}

/// Why a write was refused. Nothing of it was applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rejection {
    /// The fence no longer matches: another replica took the object over.
    Fenced,
    /// A condition failed; `op_index` is the failing op in a batch.
    PreconditionFailed { op_index: usize, key: String },
    /// The object was never written.
    NotFound,
    /// A fork without `overwrite` into an object that has keys or blobs.
    NotEmpty,
}

/// A key as stored.
#[derive(Debug, Clone)]
pub struct Entry {
    pub key: String,
    /// Empty when the listing asked for keys only.
    pub value: Bytes,
    pub content_type: String,
    /// The object version at which this key was last written.
    pub version: i64,
}

/// A blob's metadata row (its bytes live in the object store).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BlobMeta {
    pub name: String,
    pub storage_key: String,
    pub size: u64,
    pub sha256: String,
    pub content_type: String,
    pub cache_control: Option<String>,
    pub content_disposition: Option<String>,
    pub user_meta: BTreeMap<String, String>,
    /// The object version at which it was written (0 until committed).
    pub version: i64,
}

/// The smallest byte string greater than every string starting with `prefix`,
/// or None when there is none (the prefix is empty or all 0xFF).
pub fn prefix_successor(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut upper = prefix.to_vec();
    while let Some(last) = upper.pop() {
        if last < 0xFF {
            upper.push(last + 1);
            return Some(upper);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::prefix_successor;

    #[test]
    fn successors() {
        assert_eq!(prefix_successor(b"ab"), Some(b"ac".to_vec()));
        assert_eq!(prefix_successor(&[b'a', 0xff]), Some(b"b".to_vec()));
        assert_eq!(prefix_successor(&[0xff]), None);
        assert_eq!(prefix_successor(b""), None);
    }
}
