//! Objects: per-object ordered key-value maps with versions. This module owns
//! the SQL for them; writes run inside the writer's transactions under a fence.

mod alarms;
mod encoding;
mod read;
mod write;

pub use alarms::{count_alarms, due_alarms, get_alarm, list_alarms, DueAlarm, DueCursor};
pub use encoding::{decode_cursor, embed_value, encode_cursor, is_json_content_type, EmbeddedValue};
pub use read::{
    get_entry, get_entry_at_owner, list_keys, list_objects, object_info, KeyRange, ObjectInfo, ObjectSummary,
};
pub use write::WriteJob;

pub use crate::model::prefix_successor;
pub use crate::model::{
    validate_alarm_name, validate_id, validate_id_prefix, validate_key, validate_ns, Alarm, AlarmSpec, Committed,
    Entry, Event, InvalidName, Mutation, ObjectRef, Op, OpResult, Precondition, Rejection, VersionMatch, MAX_BATCH_OPS,
    MAX_KEY_BYTES,
};
