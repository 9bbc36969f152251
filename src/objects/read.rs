//! Reads. Any replica serves them straight from the database; they never
//! take a lease and never wait behind the writer.

use bytes::Bytes;
use libsql::Value;

use super::ObjectRef;
use crate::db::batch::Stmt;
use crate::db::cells::Cells;
use crate::db::{numbered, Database, Shape, StoreError};
use crate::model::{prefix_successor, Entry};
use crate::resident::{Head, Lookup, ResidentState, Slot, MAX_RESIDENT_VALUE};

pub async fn get_entry(db: &Database, object: &ObjectRef, key: &str) -> Result<Option<Entry>, StoreError> {
    let rows = db
        .query(Stmt::query(
            "SELECT value, content_type, version FROM kv WHERE ns = ?1 AND id = ?2 AND key = ?3",
            vec![object.ns.as_str().into(), object.id.as_str().into(), key.as_bytes().into()],
        ))
        .await?;
    let Some(row) = rows.first() else { return Ok(None) };
    let row = Cells(row);
    Ok(Some(Entry {
        key: key.to_string(),
        value: Bytes::from(row.bytes(0)?),
        content_type: row.text(1)?,
        version: row.int(2)?,
    }))
}

/// Which keys a listing covers, in byte order of their UTF-8 encoding.
#[derive(Debug, Clone, Default)]
pub struct KeyRange {
    pub prefix: Option<String>,
    /// Inclusive.
    pub start: Option<String>,
    /// Exclusive.
    pub end: Option<String>,
    /// The last key of the previous page (exclusive, in the listing's direction).
    pub after: Option<Vec<u8>>,
    pub reverse: bool,
    pub limit: usize,
    pub with_values: bool,
}

/// Up to `limit` entries, and whether more follow.
pub async fn list_keys(db: &Database, object: &ObjectRef, range: &KeyRange) -> Result<(Vec<Entry>, bool), StoreError> {
    let mut sql = String::from(if range.with_values {
        "SELECT key, version, content_type, value FROM kv WHERE ns = ?1 AND id = ?2"
    } else {
        "SELECT key, version, content_type FROM kv WHERE ns = ?1 AND id = ?2"
    });
    let mut args: Vec<Value> = vec![object.ns.clone().into(), object.id.clone().into()];
    let mut bound = |op: &str, value: Vec<u8>| {
        args.push(Value::Blob(value));
        sql.push_str(&format!(" AND key {op} ?{}", args.len()));
    };
    if let Some(prefix) = &range.prefix {
        bound(">=", prefix.as_bytes().to_vec());
        if let Some(upper) = prefix_successor(prefix.as_bytes()) {
            bound("<", upper);
        }
    }
    if let Some(start) = &range.start {
        bound(">=", start.as_bytes().to_vec());
    }
    if let Some(end) = &range.end {
        bound("<", end.as_bytes().to_vec());
    }
    if let Some(after) = &range.after {
        bound(if range.reverse { "<" } else { ">" }, after.clone());
    }
    sql.push_str(if range.reverse { " ORDER BY key DESC" } else { " ORDER BY key ASC" });
    args.push(Value::Integer(range.limit as i64 + 1));
    sql.push_str(&format!(" LIMIT ?{}", args.len()));

    let mut entries = Vec::new();
    for row in db.query(Stmt::query_once(sql, args)).await? {
        let row = Cells(&row);
        let key = String::from_utf8(row.bytes(0)?)
            .map_err(|_| StoreError::Internal(format!("a stored key of {object} is not UTF-8")))?;
        let value = if range.with_values { Bytes::from(row.bytes(3)?) } else { Bytes::new() };
        entries.push(Entry { key, version: row.int(1)?, content_type: row.text(2)?, value });
    }
    let more = entries.len() > range.limit;
    entries.truncate(range.limit);
    Ok((entries, more))
}

#[derive(Debug, Clone)]
pub struct ObjectInfo {
    pub version: i64,
    pub keys: i64,
    pub bytes: i64,
    pub fence: i64,
    pub owner: Option<String>,
    pub owner_url: Option<String>,
    pub lease_expires_at_ms: i64,
}

/// The object's counters and lease, or None if nothing was ever committed to it.
pub async fn object_info(db: &Database, object: &ObjectRef) -> Result<Option<ObjectInfo>, StoreError> {
    let rows = db
        .query(Stmt::query(
            "SELECT version, key_count, bytes, fence, owner, owner_url, lease_expires_at
             FROM objects WHERE ns = ?1 AND id = ?2 AND version > 0",
            vec![object.ns.as_str().into(), object.id.as_str().into()],
        ))
        .await?;
    let Some(row) = rows.first() else { return Ok(None) };
    let row = Cells(row);
    Ok(Some(ObjectInfo {
        version: row.int(0)?,
        keys: row.int(1)?,
        bytes: row.int(2)?,
        fence: row.int(3)?,
        owner: row.opt_text(4)?,
        owner_url: row.opt_text(5)?,
        lease_expires_at_ms: row.int(6)?,
    }))
}

#[derive(Debug, Clone)]
pub struct ObjectSummary {
    pub id: String,
    pub version: i64,
    pub keys: i64,
    pub bytes: i64,
}

/// Objects of a namespace in id order, after `after`; and whether more follow.
pub async fn list_objects(
    db: &Database,
    ns: &str,
    prefix: Option<&str>,
    after: Option<&str>,
    limit: usize,
) -> Result<(Vec<ObjectSummary>, bool), StoreError> {
    let mut sql = String::from("SELECT id, version, key_count, bytes FROM objects WHERE ns = ?1 AND version > 0");
    let mut args: Vec<Value> = vec![ns.to_string().into()];
    if let Some(prefix) = prefix {
        args.push(prefix.to_string().into());
        sql.push_str(&format!(" AND id >= ?{}", args.len()));
        // Ids are ASCII, so the successor of the prefix is still text.
        if let Some(upper) = prefix_successor(prefix.as_bytes()).and_then(|u| String::from_utf8(u).ok()) {
            args.push(upper.into());
            sql.push_str(&format!(" AND id < ?{}", args.len()));
        }
    }
    if let Some(after) = after {
        args.push(after.to_string().into());
        sql.push_str(&format!(" AND id > ?{}", args.len()));
    }
    args.push(Value::Integer(limit as i64 + 1));
    sql.push_str(&format!(" ORDER BY id LIMIT ?{}", args.len()));
    let mut objects = Vec::new();
    for row in db.query(Stmt::query_once(sql, args)).await? {
        let row = Cells(&row);
        objects.push(ObjectSummary { id: row.text(0)?, version: row.int(1)?, keys: row.int(2)?, bytes: row.int(3)? });
    }
    let more = objects.len() > limit;
    objects.truncate(limit);
    Ok((objects, more))
}

/// The object's row and the named keys, read for planning a write when the
/// owner's memory lacks them: `None` when the object has no row.
pub(super) async fn load_keys(
    db: &Database,
    object: &ObjectRef,
    keys: &[&str],
) -> Result<Option<LoadedKeys>, StoreError> {
    let mut params: Vec<Value> =
        vec![object.ns.as_str().into(), object.id.as_str().into(), (MAX_RESIDENT_VALUE as i64).into()];
    params.extend(keys.iter().map(|key| Value::from(key.as_bytes())));
    let rows = db.query(Stmt::query_rows(&KEYS_FOR_PLANNING, keys.len(), params)).await?;
    let Some(first) = rows.first() else { return Ok(None) };
    let first = Cells(first);
    let head = Head { fence: first.int(0)?, version: first.int(2)?, key_count: first.int(3)?, bytes: first.int(4)? };
    let owner = first.opt_text(1)?;
    let mut slots: Vec<(String, Slot)> = keys.iter().map(|key| (key.to_string(), Slot::Absent)).collect();
    for row in &rows {
        let row = Cells(row);
        if row.is_null(5)? {
            continue;
        }
        let key = String::from_utf8(row.bytes(5)?)
            .map_err(|_| StoreError::Internal(format!("a stored key of {object} is not UTF-8")))?;
        let at = slots
            .iter()
            .position(|(named, _)| *named == key)
            .ok_or_else(|| StoreError::Internal("the database answered a key not asked for".into()))?;
        slots[at].1 = slot_from(&row, 6)?;
    }
    Ok(Some(LoadedKeys { head, owner, keys: slots }))
}

pub(super) struct LoadedKeys {
    pub head: Head,
    pub owner: Option<String>,
    pub keys: Vec<(String, Slot)>,
}

/// A key's slot from `version, size, value (when kept), content_type` at `first`.
fn slot_from(row: &Cells<'_>, first: usize) -> Result<Slot, StoreError> {
    let version = row.int(first)?;
    let size = row.int(first + 1)?;
    let value = match row.is_null(first + 2)? {
        false => Some((Bytes::from(row.bytes(first + 2)?), std::sync::Arc::from(row.text(first + 3)?))),
        true => None,
    };
    Ok(Slot::Present { version, size, value })
}

/// The named keys' versions, sizes and (small) values with the object's row:
/// one row per key found, or one row of NULL key columns when none is.
static KEYS_FOR_PLANNING: Shape = Shape {
    text: |keys| {
        if keys == 0 {
            // (`IN ()` would plan a scan of kv.)
            return "SELECT fence, owner, version, key_count, bytes, NULL, NULL, NULL, NULL, NULL
                    FROM objects WHERE ns = ?1 AND id = ?2 AND ?3 IS NOT NULL"
                .into();
        }
        format!(
            "SELECT o.fence, o.owner, o.version, o.key_count, o.bytes,
                    kv.key, kv.version, length(kv.key) + length(kv.value),
                    CASE WHEN length(kv.value) <= ?3 THEN kv.value END, kv.content_type
             FROM objects o LEFT JOIN kv ON kv.ns = o.ns AND kv.id = o.id AND kv.key IN ({})
             WHERE o.ns = ?1 AND o.id = ?2",
            numbered(4, keys)
        )
    },
};

/// A key's value: from the owner's memory when `readable` says the lease
/// under which it is resident is certainly still ours, else from the database.
pub async fn get_entry_at_owner(
    db: &Database,
    resident: &ResidentState,
    object: &ObjectRef,
    key: &str,
    readable: impl Fn(i64) -> bool,
) -> Result<Option<Entry>, StoreError> {
    // Looked up first, the lease checked after: if the lease still holds
    // afterwards, nobody else can have committed in between.
    if let Some((fence, lookup)) = resident.read(object, key) {
        if readable(fence) {
            resident.count_hit();
            return Ok(match lookup {
                Lookup::Found(entry) => Some(entry),
                Lookup::Absent => None,
            });
        }
    }
    resident.count_miss();
    let before = resident.head(object);
    let entry = get_entry(db, object, key).await?;
    if let Some(before) = before {
        resident.fill(object, before, key, entry.as_ref());
    }
    Ok(entry)
}
