//! Objects: per-object ordered key-value maps with versions. This module owns
//! the SQL for them; writes run inside the writer's transactions under a fence.

mod encoding;
mod names;
mod read;
pub mod resident;
mod write;

pub use encoding::{decode_cursor, embed_value, encode_cursor, is_json_content_type, prefix_successor, EmbeddedValue};
pub use names::{validate_id, validate_id_prefix, validate_key, validate_ns, InvalidName, ObjectRef, MAX_KEY_BYTES};
pub use read::{
    get_entry, get_entry_at_owner, list_keys, list_objects, load_statements, loaded, object_info, Entry, KeyRange,
    ObjectInfo, ObjectSummary,
};
pub use write::{Draft, Drafts, WriteJob};

use bytes::Bytes;

/// The most key operations one write may carry.
pub const MAX_BATCH_OPS: usize = 128;

use crate::blobs::BlobMeta;

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
    fn matches(&self, current: Option<i64>) -> bool {
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
}

impl Mutation {
    /// Key operations alone, with no events.
    pub fn ops(ops: Vec<Op>) -> Mutation {
        Mutation::Ops { ops, events: Vec::new() }
    }

    fn weight(&self) -> usize {
        match self {
            Mutation::DeleteAll | Mutation::DeleteBlob { .. } => 64,
            Mutation::PutBlob { blob, .. } => 512 + blob.name.len(),
            Mutation::Ops { ops, events } => {
                ops.iter()
                    .map(|op| match op {
                        Op::Put { key, value, .. } => 2 * (key.len() + value.len()) + 128,
                        Op::Delete { key, .. } | Op::Get { key } => key.len() + 128,
                    })
                    .sum::<usize>()
                    + events.iter().map(|e| e.data.len() + e.event_type.len() + 128).sum::<usize>()
            }
        }
    }
}

#[derive(Debug, Clone)]
pub enum OpResult {
    Put {
        key: String,
        version: i64,
    },
    Delete {
        key: String,
        deleted: bool,
    },
    Get {
        key: String,
        entry: Option<Entry>,
    },
    DeleteAll {
        deleted_keys: i64,
        deleted_blobs: i64,
    },
    PutBlob {
        name: String,
        version: i64,
    },
    /// `storage_key` of the deleted blob, for prompt removal from the store.
    DeleteBlob {
        name: String,
        deleted: Option<String>,
    },
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
}
