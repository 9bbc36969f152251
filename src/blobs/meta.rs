//! Blob metadata rows in libSQL: the SQL run inside fenced writes, and reads.

use libsql::{params, Value};
use object_store::path::Path;
use sha2::{Digest, Sha256};

use super::StorageError;
use crate::db::batch::Stmt;
use crate::db::{Database, Session, StoreError};
use crate::model::{BlobMeta, InvalidName, ObjectRef};

pub const MAX_NAME_BYTES: usize = 1024;
/// Total bytes of user metadata (names and values), like S3's 2 KiB, a bit roomier.
pub const MAX_USER_META_BYTES: usize = 8 * 1024;

/// A relative path of 1-1024 bytes: no empty, `.` or `..` segments, no
/// leading slash, no control characters.
pub fn validate_name(name: &str) -> Result<(), InvalidName> {
    let problem = if name.is_empty() {
        Some("it is empty".to_string())
    } else if name.len() > MAX_NAME_BYTES {
        Some(format!("{} bytes, at most {MAX_NAME_BYTES} allowed", name.len()))
    } else if name.starts_with('/') {
        Some("absolute paths are not allowed".into())
    } else if name.chars().any(char::is_control) {
        Some("control characters are not allowed".into())
    } else if name.split('/').any(|s| s.is_empty() || s == "." || s == "..") {
        Some("empty, `.` and `..` path segments are not allowed".into())
    } else {
        None
    };
    match problem {
        None => Ok(()),
        Some(p) => Err(InvalidName(format!("invalid blob name: {p}"))),
    }
}

/// A key no other upload uses: `blobs/<ns>/<object digest>/<name digest>/<uuid v7>`.
/// Uploads never overwrite each other, so a failed or fenced one cannot
/// clobber data. Ids and names enter only as digests: they may be longer than
/// a file name (255 bytes) or, percent-encoded, than an S3 key (1,024 bytes).
pub fn new_storage_key(object: &ObjectRef, name: &str) -> Path {
    Path::parse(format!("{}{}", upload_prefix(object, name), uuid::Uuid::now_v7()))
        .expect("digests and a UUID are valid path segments")
}

/// Where every upload of `object` is stored (and where a committed key must be).
pub fn object_prefix(object: &ObjectRef) -> String {
    format!("blobs/{}/{}/", object.ns, digest(object.id.as_bytes()))
}

/// Where every upload of blob `name` of `object` is stored.
pub fn upload_prefix(object: &ObjectRef, name: &str) -> String {
    format!("{}{}/", object_prefix(object), digest(name.as_bytes()))
}

/// 64 bits: enough to keep objects and names apart (the UUID makes each key
/// unique), short enough that keys stay far below every store's limits.
fn digest(bytes: &[u8]) -> String {
    hex::encode(&Sha256::digest(bytes)[..8])
}

/// A storage key as it was stored (already in object_store's encoded form).
pub fn stored_path(key: &str) -> Result<Path, StorageError> {
    Path::parse(key).map_err(|e| StorageError::Unavailable(format!("stored key {key:?} is not a valid path: {e}")))
}

fn row_to_meta(row: &libsql::Row) -> Result<BlobMeta, StoreError> {
    let name =
        String::from_utf8(row.get::<Vec<u8>>(0)?).map_err(|_| StoreError::Internal("blob name not UTF-8".into()))?;
    let user_meta: String = row.get(7)?;
    Ok(BlobMeta {
        name,
        storage_key: row.get(1)?,
        size: row.get::<i64>(2)? as u64,
        sha256: row.get(3)?,
        content_type: row.get(4)?,
        cache_control: row.get(5)?,
        content_disposition: row.get(6)?,
        user_meta: serde_json::from_str(&user_meta).unwrap_or_default(),
        version: row.get(8)?,
    })
}

/// The columns `row_to_meta` reads, in its order (a macro, so statements can `concat!` it).
macro_rules! blob_columns {
    () => {
        "name, storage_key, size, sha256, content_type, cache_control, content_disposition, user_meta, version"
    };
}
const COLUMNS: &str = blob_columns!();

pub async fn get(db: &Database, object: &ObjectRef, name: &str) -> Result<Option<BlobMeta>, StoreError> {
    db.read(|conn| async move { get_on(&conn, object, name).await }).await
}

async fn get_on(conn: &Session, object: &ObjectRef, name: &str) -> Result<Option<BlobMeta>, StoreError> {
    const GET: &str = concat!("SELECT ", blob_columns!(), " FROM blobs WHERE ns = ?1 AND id = ?2 AND name = ?3");
    let mut found = None;
    conn.rows(GET, params![object.ns.as_str(), object.id.as_str(), name.as_bytes()], |row| {
        found = Some(row_to_meta(row)?);
        Ok::<(), StoreError>(())
    })
    .await?;
    Ok(found)
}

/// Whether the object has any blob.
pub async fn any(db: &Database, object: &ObjectRef) -> Result<bool, StoreError> {
    db.read(|conn| async move {
        let found = conn
            .first_row(
                "SELECT 1 FROM blobs WHERE ns = ?1 AND id = ?2 LIMIT 1",
                params![object.ns.as_str(), object.id.as_str()],
                |_| Ok(()),
            )
            .await?;
        Ok(found.is_some())
    })
    .await
}

/// Blobs of an object in name order after `after`; and whether more follow.
pub async fn list(
    db: &Database,
    object: &ObjectRef,
    prefix: Option<&str>,
    after: Option<&[u8]>,
    limit: usize,
) -> Result<(Vec<BlobMeta>, bool), StoreError> {
    let mut sql = format!("SELECT {COLUMNS} FROM blobs WHERE ns = ?1 AND id = ?2");
    let mut args: Vec<Value> = vec![object.ns.clone().into(), object.id.clone().into()];
    if let Some(prefix) = prefix {
        args.push(Value::Blob(prefix.as_bytes().to_vec()));
        sql.push_str(&format!(" AND name >= ?{}", args.len()));
        if let Some(upper) = crate::model::prefix_successor(prefix.as_bytes()) {
            args.push(Value::Blob(upper));
            sql.push_str(&format!(" AND name < ?{}", args.len()));
        }
    }
    if let Some(after) = after {
        args.push(Value::Blob(after.to_vec()));
        sql.push_str(&format!(" AND name > ?{}", args.len()));
    }
    args.push(Value::Integer(limit as i64 + 1));
    sql.push_str(&format!(" ORDER BY name LIMIT ?{}", args.len()));
    let mut blobs = db
        .read(|conn| {
            let (sql, args) = (&sql, args.clone());
            async move {
                let mut out = Vec::new();
                conn.rows_once(sql.clone(), args, |row| {
                    out.push(row_to_meta(row)?);
                    Ok::<(), StoreError>(())
                })
                .await?;
                Ok(out)
            }
        })
        .await?;
    let more = blobs.len() > limit;
    blobs.truncate(limit);
    Ok((blobs, more))
}

/// In a fenced write: store `meta` at `version`; the key it replaces becomes garbage.
pub(crate) fn put_statements(
    object: &ObjectRef,
    meta: &BlobMeta,
    version: i64,
    replaced: Option<&str>,
    now_ms: i64,
) -> Vec<Stmt> {
    let mut params = vec![object.ns.as_str().into(), object.id.as_str().into()];
    params.extend(row_values(meta, version, now_ms));
    let mut statements = vec![Stmt::exec(
        "INSERT INTO blobs (ns, id, name, storage_key, size, sha256, content_type, cache_control,
                            content_disposition, user_meta, version, created_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)
         ON CONFLICT (ns, id, name) DO UPDATE SET
           storage_key = excluded.storage_key, size = excluded.size, sha256 = excluded.sha256,
           content_type = excluded.content_type, cache_control = excluded.cache_control,
           content_disposition = excluded.content_disposition, user_meta = excluded.user_meta,
           version = excluded.version, created_at = excluded.created_at",
        params,
    )];
    if let Some(old) = replaced.filter(|old| *old != meta.storage_key) {
        statements.push(garbage_statement(old, now_ms));
    }
    statements
}

/// A blob row's columns after (ns, id): name, storage key, size, SHA-256,
/// content type, cache control, content disposition, user metadata, version
/// and creation time.
pub(crate) fn row_values(meta: &BlobMeta, version: i64, now_ms: i64) -> [libsql::Value; 10] {
    let user_meta = serde_json::to_string(&meta.user_meta).expect("a string map serialises");
    [
        meta.name.as_bytes().into(),
        meta.storage_key.as_str().into(),
        (meta.size as i64).into(),
        meta.sha256.as_str().into(),
        meta.content_type.as_str().into(),
        meta.cache_control.clone().into(),
        meta.content_disposition.clone().into(),
        user_meta.into(),
        version.into(),
        now_ms.into(),
    ]
}

/// In a fenced write: drop the row; its key becomes garbage.
pub(crate) fn delete_statements(object: &ObjectRef, name: &str, storage_key: &str, now_ms: i64) -> Vec<Stmt> {
    vec![
        Stmt::exec(
            "DELETE FROM blobs WHERE ns = ?1 AND id = ?2 AND name = ?3",
            vec![object.ns.as_str().into(), object.id.as_str().into(), name.as_bytes().into()],
        ),
        garbage_statement(storage_key, now_ms),
    ]
}

/// In a fenced write, before `delete_all_statement`: every blob's key becomes garbage.
pub(crate) fn garbage_all_statement(object: &ObjectRef, now_ms: i64) -> Stmt {
    Stmt::exec(
        "INSERT INTO blob_garbage (storage_key, since)
         SELECT storage_key, ?3 FROM blobs WHERE ns = ?1 AND id = ?2
         ON CONFLICT (storage_key) DO NOTHING",
        vec![object.ns.as_str().into(), object.id.as_str().into(), now_ms.into()],
    )
}

/// In a fenced write: every blob of the object goes (the statement's change count says how many).
pub(crate) fn delete_all_statement(object: &ObjectRef) -> Stmt {
    Stmt::exec(
        "DELETE FROM blobs WHERE ns = ?1 AND id = ?2",
        vec![object.ns.as_str().into(), object.id.as_str().into()],
    )
}

fn garbage_statement(storage_key: &str, now_ms: i64) -> Stmt {
    Stmt::exec(
        "INSERT INTO blob_garbage (storage_key, since) VALUES (?1, ?2) ON CONFLICT (storage_key) DO NOTHING",
        vec![storage_key.into(), now_ms.into()],
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["a", "photos/2024/cat.jpg", "ü ñ.txt", "a..b", ".hidden", &"n".repeat(1024)] {
            assert!(validate_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", "/abs", "a/../b", "..", ".", "a//b", "a/", "tab\there", "nul\0", &"n".repeat(1025)] {
            assert!(validate_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn storage_keys_are_unique_short_and_round_trip() {
        let object = ObjectRef::new("ns", "id").unwrap();
        let a = new_storage_key(&object, "dir/file.bin").to_string();
        let b = new_storage_key(&object, "dir/file.bin").to_string();
        assert_ne!(a, b);
        assert!(a.starts_with(&upload_prefix(&object, "dir/file.bin")), "{a}");
        assert!(!a.starts_with(&upload_prefix(&object, "dir/other.bin")));
        // The longest id (with `~`, which object_store encodes) and name still make a short key.
        let long = ObjectRef::new(&"n".repeat(63), &"~".repeat(256)).unwrap();
        let key = new_storage_key(&long, "é/".repeat(300).trim_end_matches('/'));
        assert!(key.to_string().len() <= 6 + 63 + 1 + 16 + 1 + 16 + 1 + 36, "{key}");
        assert!(key.to_string().starts_with(&object_prefix(&long)));
        assert_eq!(stored_path(key.as_ref()).unwrap(), key, "a stored key reads back as the same path");
    }
}
