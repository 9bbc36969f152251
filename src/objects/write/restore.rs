//! A restore (or fork) as one fenced write: every key and blob the object has
//! goes, the past state is written in their place, and the change log gets a
//! `restore` row followed by a row per key and blob written. Replaying the
//! log therefore needs no other rule than "a `restore` row clears the object",
//! and the restore itself can be undone by restoring again.

use std::collections::HashMap;

use libsql::Value;

use super::{answer_under_fence, numbered, outbox_statements, Change, Draft, Planned, WriteJob, UPSERT_KV};
use crate::blobs::meta as blobs;
use crate::db::batch::Stmt;
use crate::db::Shape;
use crate::guard::fence_assertion;
use crate::model::{Committed, ObjectRef, OpResult, Rejection, Restore};
use crate::resident::{Change as ResidentChange, Head, Slot};
use crate::writer::Writes;

/// Blob rows per statement (12 parameters each).
const BLOBS_PER_STATEMENT: usize = 64;

impl WriteJob {
    /// `has_blobs`: whether the object has blobs now (read only for a fork that
    /// must find the object empty).
    pub(super) fn plan_restore(&self, draft: &mut Draft, restore: &Restore, has_blobs: bool) -> (Writes, Planned) {
        let from = draft.head;
        let version = from.version + 1;
        let assertion = fence_assertion(&self.object, &self.owner, self.fence, Some(from.version));
        let refuse = |rejection: Rejection| answer_under_fence(&assertion, Err(rejection));
        if restore.if_version.as_ref().is_some_and(|wanted| !wanted.matches(Some(from.version))) {
            return refuse(Rejection::PreconditionFailed { op_index: 0, key: String::new() });
        }
        if restore.require_empty && (from.key_count > 0 || has_blobs) {
            return refuse(Rejection::NotEmpty);
        }

        let ObjectRef { ns, id } = &self.object;
        let object = || -> Vec<Value> { vec![ns.as_str().into(), id.as_str().into()] };
        let key_count = restore.keys.len() as i64;
        let bytes: i64 = restore.keys.iter().map(|k| (k.key.len() + k.value.len()) as i64).sum();
        // What the object has goes first; its blobs' bytes become garbage
        // unless the restored state refers to them again (un-listed below).
        let mut statements = Vec::from(self.clearing_statements());
        statements.push(self.object_row(version, key_count, bytes));
        for chunk in restore.keys.chunks(super::ROWS_PER_STATEMENT) {
            let mut params = object();
            for key in chunk {
                params.extend([
                    key.key.as_bytes().into(),
                    Value::Blob(key.value.to_vec()),
                    key.content_type.as_str().into(),
                    version.into(),
                ]);
            }
            statements.push(Stmt::exec_rows(&UPSERT_KV, chunk.len(), params));
        }
        for chunk in restore.blobs.chunks(BLOBS_PER_STATEMENT) {
            let mut params = object();
            let mut kept = Vec::with_capacity(chunk.len());
            for blob in chunk {
                params.extend(blobs::row_values(blob, version, self.now_ms));
                kept.push(Value::from(blob.storage_key.as_str()));
            }
            statements.push(Stmt::exec_rows(&INSERT_BLOBS, chunk.len(), params));
            statements.push(Stmt::exec_rows(&UNLIST_GARBAGE, chunk.len(), kept));
        }

        let marker = serde_json::to_vec(&restore.source).expect("a restore source serialises");
        let blob_records: Vec<Vec<u8>> = restore.blobs.iter().map(|blob| blob_record(blob, version)).collect();
        let mut changes = vec![Change { op: "restore", key: None, content_type: None, size: None, value: None }];
        changes.extend(restore.keys.iter().map(|k| Change::put(&k.key, &k.content_type, &k.value)));
        changes.extend(restore.blobs.iter().zip(&blob_records).map(|(blob, record)| Change::blob_put(blob, record)));
        let mut rows: Vec<_> = changes.iter().map(|change| self.change_row(version, change)).collect();
        // The marker names the source in full, whatever the value cap.
        rows[0].value = Some(marker);
        statements.extend(outbox_statements(&self.object, self.fence, &self.owner, self.now_ms, &rows, &[]));

        let head = Head { fence: self.fence, version, key_count, bytes };
        let slots: Vec<(String, Slot)> = restore
            .keys
            .iter()
            .map(|k| (k.key.clone(), Slot::written(version, &k.key, &k.value, &k.content_type)))
            .collect();
        draft.head = head;
        draft.cleared = true;
        // The draft keeps every value it knows (memory may not).
        draft.keys = restore
            .keys
            .iter()
            .map(|k| {
                let size = (k.key.len() + k.value.len()) as i64;
                let value = Some((k.value.clone(), k.content_type.as_str().into()));
                (k.key.clone(), Slot::Present { version, size, value })
            })
            .collect::<HashMap<_, _>>();
        let change = ResidentChange { fence: self.fence, from_version: from.version, head, cleared: true, keys: slots };
        let result = OpResult::Restore { keys: key_count, blobs: restore.blobs.len() as i64 };
        let answer = Ok(Committed { version, fence: self.fence, changed: true, results: vec![result] });
        (Writes { assertions: vec![assertion], statements }, Planned { answer, change: Some(change), counted: None })
    }
}

/// What a `blob_put` change row keeps as its value: the blob's metadata as
/// JSON, so that a restore can bring the blob back (its bytes stay in the
/// store for the history retention).
pub(super) fn blob_record(blob: &crate::model::BlobMeta, version: i64) -> Vec<u8> {
    let record = crate::model::BlobMeta { version, ..blob.clone() };
    serde_json::to_vec(&record).expect("blob metadata serialises")
}

/// `?1`, `?2`: the object; then 10 values per blob row.
static INSERT_BLOBS: Shape = Shape {
    text: |rows| {
        let values: Vec<String> = (0..rows).map(|row| format!("(?1, ?2, {})", numbered(3 + 10 * row, 10))).collect();
        format!(
            "INSERT INTO blobs (ns, id, name, storage_key, size, sha256, content_type, cache_control,
                                content_disposition, user_meta, version, created_at) VALUES {}",
            values.join(", ")
        )
    },
};

/// Storage keys the restored state refers to are no longer garbage.
static UNLIST_GARBAGE: Shape =
    Shape { text: |keys| format!("DELETE FROM blob_garbage WHERE storage_key IN ({})", numbered(1, keys)) };
