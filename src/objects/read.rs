//! Reads. Any replica serves them straight from the database; they never
//! take a lease and never wait behind the writer.

use bytes::Bytes;
use libsql::{params, Value};

use super::encoding::prefix_successor;
use super::ObjectRef;
use crate::db::{Database, Session, StoreError};

#[derive(Debug, Clone)]
pub struct Entry {
    pub key: String,
    /// Empty when the listing asked for keys only.
    pub value: Bytes,
    pub content_type: String,
    /// The object version at which this key was last written.
    pub version: i64,
}

pub async fn get_entry(db: &Database, object: &ObjectRef, key: &str) -> Result<Option<Entry>, StoreError> {
    db.read(|conn| async move { get_entry_on(&conn, object, key).await }).await
}

pub(super) async fn get_entry_on(conn: &Session, object: &ObjectRef, key: &str) -> Result<Option<Entry>, StoreError> {
    conn.first_row(
        "SELECT value, content_type, version FROM kv WHERE ns = ?1 AND id = ?2 AND key = ?3",
        params![object.ns.as_str(), object.id.as_str(), key.as_bytes()],
        |row| {
            Ok(Entry {
                key: key.to_string(),
                value: Bytes::from(row.get::<Vec<u8>>(0)?),
                content_type: row.get(1)?,
                version: row.get(2)?,
            })
        },
    )
    .await
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

    let mut entries = db
        .read(|conn| {
            let (sql, args) = (&sql, args.clone());
            async move {
                let mut rows = conn.query(sql, args).await?;
                let mut entries = Vec::new();
                while let Some(row) = rows.next().await? {
                    let key = String::from_utf8(row.get::<Vec<u8>>(0)?)
                        .map_err(|_| StoreError::Internal(format!("a stored key of {object} is not UTF-8")))?;
                    let value = if range.with_values { Bytes::from(row.get::<Vec<u8>>(3)?) } else { Bytes::new() };
                    entries.push(Entry { key, version: row.get(1)?, content_type: row.get(2)?, value });
                }
                Ok(entries)
            }
        })
        .await?;
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
    db.read(|conn| async move {
        let mut rows = conn
            .query(
                "SELECT version, key_count, bytes, fence, owner, owner_url, lease_expires_at
                 FROM objects WHERE ns = ?1 AND id = ?2 AND version > 0",
                params![object.ns.as_str(), object.id.as_str()],
            )
            .await?;
        let Some(row) = rows.next().await? else { return Ok(None) };
        Ok(Some(ObjectInfo {
            version: row.get(0)?,
            keys: row.get(1)?,
            bytes: row.get(2)?,
            fence: row.get(3)?,
            owner: row.get(4)?,
            owner_url: row.get(5)?,
            lease_expires_at_ms: row.get(6)?,
        }))
    })
    .await
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
    let mut objects = db
        .read(|conn| {
            let (sql, args) = (&sql, args.clone());
            async move {
                let mut rows = conn.query(sql, args).await?;
                let mut objects = Vec::new();
                while let Some(row) = rows.next().await? {
                    objects.push(ObjectSummary {
                        id: row.get(0)?,
                        version: row.get(1)?,
                        keys: row.get(2)?,
                        bytes: row.get(3)?,
                    });
                }
                Ok(objects)
            }
        })
        .await?;
    let more = objects.len() > limit;
    objects.truncate(limit);
    Ok((objects, more))
}
