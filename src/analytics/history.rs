//! An object's history, and its state at any point of it. Both read the
//! change log: the `changes` table (its current snapshot, pruned to the
//! object's namespace partition and filtered by id and version) plus the
//! outbox rows that snapshot does not hold yet, so a change is listed, and
//! can be restored to, the moment it is acknowledged, before any export.

use std::collections::{BTreeMap, BTreeSet};

use arrow_array::cast::AsArray;
use arrow_array::types::{Int64Type, TimestampMicrosecondType};
use arrow_array::{Array, RecordBatch};
use arrow_schema::DataType;
use bytes::Bytes;
use futures::TryStreamExt;
use iceberg::expr::{Predicate, Reference};
use iceberg::spec::Datum;
use iceberg::table::Table;
use iceberg::{NamespaceIdent, TableIdent};
use libsql::Value;

use super::catalog::LibsqlCatalog;
use super::exporter::{exported_through, ExportError};
use super::tables::{ExportTable, NAMESPACE};
use crate::db::batch::Stmt;
use crate::db::cells::Cells;
use crate::db::{numbered, Database, Shape};
use crate::model::{BlobMeta, ObjectRef, RestoredKey};

/// One version of an object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Version {
    pub version: i64,
    /// Commit time, unix microseconds.
    pub ts_micros: i64,
    pub fence: i64,
    pub instance: String,
    /// What it changed, in commit order: the op and the key or blob name.
    pub changes: Vec<(String, Option<String>)>,
}

/// Up to `limit` versions below `before` (all when `None`), newest first,
/// and whether older ones follow.
pub async fn history(
    db: &Database,
    catalog: &LibsqlCatalog,
    object: &ObjectRef,
    before: Option<i64>,
    limit: usize,
) -> Result<(Vec<Version>, bool), ExportError> {
    let rows = read_log(db, catalog, object, before.unwrap_or(i64::MAX)).await?;
    let mut versions: BTreeMap<i64, Version> = BTreeMap::new();
    // In seq order, so each version's changes come in commit order.
    for change in rows.into_values() {
        let version = versions.entry(change.version).or_insert_with(|| Version {
            version: change.version,
            ts_micros: change.ts_micros,
            fence: change.fence,
            instance: change.instance.clone(),
            changes: Vec::new(),
        });
        version.changes.push((change.op, change.key));
    }
    let more = versions.len() > limit;
    Ok((versions.into_values().rev().take(limit).collect(), more))
}

/// The most a restore writes (keys and values, and blob rows at `BLOB_ROW_BYTES`):
/// it is one write, held in memory and sent to the database as one request.
pub const MAX_RESTORE_BYTES: i64 = 256 * 1024 * 1024;
const BLOB_ROW_BYTES: i64 = 1024;

/// A point of an object's history.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Point {
    /// Just after this version was committed.
    Version(i64),
    /// The newest version committed at or before this instant (unix
    /// microseconds, by the clocks of the replicas that committed them).
    At(i64),
}

/// An object's keys and blobs as they were at a point of its history.
#[derive(Debug, Clone)]
pub struct PastState {
    /// The version whose state this is.
    pub version: i64,
    /// When that version's last change was committed (unix microseconds).
    pub committed_micros: i64,
    /// In key order.
    pub keys: Vec<RestoredKey>,
    /// In name order; `version` is the version that wrote each.
    pub blobs: Vec<BlobMeta>,
}

#[derive(Debug, thiserror::Error)]
pub enum PastError {
    /// No version matches the point.
    #[error("{0}")]
    NoSuchPoint(String),
    /// The point is older than the history retention.
    #[error("{0}")]
    BeyondRetention(String),
    /// The state is larger than one write may carry.
    #[error("{0}")]
    TooLarge(String),
    /// The change log does not hold all the state needs (a value over the
    /// change-value cap, or a blob written before blob metadata was logged).
    #[error("{0}")]
    Incomplete(String),
    #[error(transparent)]
    Read(#[from] ExportError),
}

/// What the object held at `point`, replayed from its change log.
/// `current_version` bounds a version point; a point committed before
/// `not_before_micros` is refused as beyond the retention.
pub async fn past_state(
    db: &Database,
    catalog: &LibsqlCatalog,
    object: &ObjectRef,
    point: Point,
    current_version: i64,
    not_before_micros: i64,
) -> Result<PastState, PastError> {
    let before = match point {
        Point::Version(version) if version > current_version => {
            return Err(PastError::NoSuchPoint(format!(
                "object {object} is at version {current_version}; there is no version {version}"
            )));
        }
        Point::Version(version) => version + 1,
        Point::At(_) => i64::MAX,
    };
    let mut rows = read_log(db, catalog, object, before).await?;
    let version = match point {
        Point::Version(version) => version,
        Point::At(at) => {
            let found = rows.values().filter(|row| row.ts_micros <= at).map(|row| row.version).max();
            found.ok_or_else(|| {
                PastError::NoSuchPoint(format!("object {object} has no change committed at or before that time"))
            })?
        }
    };
    rows.retain(|_, row| row.version <= version);
    let Some(committed_micros) =
        rows.values().rev().find(|row| row.version == version).or(rows.values().last()).map(|row| row.ts_micros)
    else {
        return Err(PastError::NoSuchPoint(format!("object {object} has no change at or before version {version}")));
    };
    if committed_micros < not_before_micros {
        return Err(PastError::BeyondRetention(format!(
            "version {version} of {object} was committed before the history retention; it can no longer be restored"
        )));
    }

    // Which row last wrote each key and blob that exists at the point.
    let mut keys: BTreeMap<String, i64> = BTreeMap::new();
    let mut blobs: BTreeMap<String, i64> = BTreeMap::new();
    for (seq, row) in &rows {
        let named = || row.key.clone().unwrap_or_default();
        match row.op.as_str() {
            "put" => {
                keys.insert(named(), *seq);
            }
            "delete" => {
                keys.remove(&named());
            }
            "blob_put" => {
                blobs.insert(named(), *seq);
            }
            "blob_delete" => {
                blobs.remove(&named());
            }
            "delete_all" | "restore" => {
                keys.clear();
                blobs.clear();
            }
            // Other ops (alarms, say) do not touch keys or blobs.
            _ => {}
        }
    }
    for seq in keys.values().chain(blobs.values()) {
        let row = &rows[seq];
        if row.truncated {
            return Err(PastError::Incomplete(format!(
                "{} {:?} as of version {} is {} bytes, more than the change log keeps (STATEHOUSE_CHANGE_VALUE_CAP_BYTES); \
                 this point cannot be restored exactly",
                if row.op == "put" { "key" } else { "blob" },
                row.key.as_deref().unwrap_or_default(),
                row.version,
                row.size.unwrap_or_default(),
            )));
        }
    }

    let size: i64 = keys.iter().map(|(key, seq)| key.len() as i64 + rows[seq].size.unwrap_or_default()).sum::<i64>()
        + blobs.len() as i64 * BLOB_ROW_BYTES;
    if size > MAX_RESTORE_BYTES {
        return Err(PastError::TooLarge(format!(
            "the state of {object} at version {version} is {size} bytes; a restore writes at most {MAX_RESTORE_BYTES} in one write"
        )));
    }
    let wanted: BTreeSet<i64> = keys.values().chain(blobs.values()).copied().collect();
    let mut values = read_values(db, catalog, object, &wanted).await?;
    let mut missing = |seq: &i64| -> Result<Vec<u8>, PastError> {
        values.remove(seq).flatten().ok_or_else(|| {
            let row = &rows[seq];
            PastError::Incomplete(format!(
                "the change log has no value for {:?} as of version {}; this point cannot be restored exactly",
                row.key.as_deref().unwrap_or_default(),
                row.version
            ))
        })
    };
    let mut state = PastState { version, committed_micros, keys: Vec::new(), blobs: Vec::new() };
    for (key, seq) in &keys {
        let value = missing(seq)?;
        let content_type = rows[seq].content_type.clone().unwrap_or_else(|| "application/octet-stream".into());
        state.keys.push(RestoredKey { key: key.clone(), value: Bytes::from(value), content_type });
    }
    for (name, seq) in &blobs {
        let record = missing(seq)?;
        let blob: BlobMeta = serde_json::from_slice(&record).map_err(|_| {
            PastError::Incomplete(format!(
                "blob {name:?} as of version {} was logged without its metadata (written by an older server); \
                 this point cannot be restored exactly",
                rows[seq].version
            ))
        })?;
        state.blobs.push(blob);
    }
    Ok(state)
}

/// A change-log row, without its value.
struct LoggedChange {
    version: i64,
    ts_micros: i64,
    fence: i64,
    instance: String,
    op: String,
    key: Option<String>,
    content_type: Option<String>,
    size: Option<i64>,
    truncated: bool,
}

/// The object's change-log rows below `before`, by seq.
async fn read_log(
    db: &Database,
    catalog: &LibsqlCatalog,
    object: &ObjectRef,
    before: i64,
) -> Result<BTreeMap<i64, LoggedChange>, ExportError> {
    // The outbox first, the snapshot second: rows leave the outbox only once a
    // snapshot holds them, so this order leaves no gap between the two.
    let pending = db
        .query(Stmt::query(
            "SELECT seq, version, ts, fence, instance, op, key, content_type, size, value_truncated FROM outbox
             WHERE kind = 'change' AND ns = ?1 AND id = ?2 AND version < ?3 ORDER BY seq",
            vec![object.ns.as_str().into(), object.id.as_str().into(), before.into()],
        ))
        .await?;
    let mut rows: BTreeMap<i64, LoggedChange> = BTreeMap::new();
    for row in &pending {
        let row = Cells(row);
        let change = LoggedChange {
            version: row.int(1)?,
            ts_micros: row.int(2)?,
            fence: row.int(3)?,
            instance: row.text(4)?,
            op: row.text(5)?,
            key: row.opt_text(6)?,
            content_type: row.opt_text(7)?,
            size: if row.is_null(8)? { None } else { Some(row.int(8)?) },
            truncated: !row.is_null(9)? && row.int(9)? != 0,
        };
        rows.insert(row.int(0)?, change);
    }
    if let Some((table, through)) = changes_table(catalog).await? {
        rows.retain(|seq, _| *seq > through);
        let filter = of_object(object).and(Reference::new("version").less_than(Datum::long(before)));
        let columns = [
            "seq",
            "ns",
            "id",
            "version",
            "ts",
            "fence",
            "instance",
            "op",
            "key",
            "content_type",
            "size",
            "value_truncated",
        ];
        for batch in &scan(&table, &columns, filter).await? {
            let column = |name: &str| batch.column_by_name(name).expect("the scan selected it");
            let seq = column("seq").as_primitive::<Int64Type>();
            let version = column("version").as_primitive::<Int64Type>();
            let ts = column("ts").as_primitive::<TimestampMicrosecondType>();
            let fence = column("fence").as_primitive::<Int64Type>();
            let size = column("size").as_primitive::<Int64Type>();
            let truncated = column("value_truncated").as_boolean();
            for row in ours(batch, object) {
                if version.value(row) >= before {
                    continue;
                }
                let change = LoggedChange {
                    version: version.value(row),
                    ts_micros: ts.value(row),
                    fence: fence.value(row),
                    instance: text(column("instance"), row).unwrap_or_default(),
                    op: text(column("op"), row).unwrap_or_default(),
                    key: text(column("key"), row),
                    content_type: text(column("content_type"), row),
                    size: (!size.is_null(row)).then(|| size.value(row)),
                    truncated: !truncated.is_null(row) && truncated.value(row),
                };
                rows.insert(seq.value(row), change);
            }
        }
    }
    Ok(rows)
}

/// The values of the rows `seqs` of the object's change log (`None` for a
/// row logged without one).
async fn read_values(
    db: &Database,
    catalog: &LibsqlCatalog,
    object: &ObjectRef,
    seqs: &BTreeSet<i64>,
) -> Result<BTreeMap<i64, Option<Vec<u8>>>, ExportError> {
    let mut values = BTreeMap::new();
    if seqs.is_empty() {
        return Ok(values);
    }
    let wanted: Vec<i64> = seqs.iter().copied().collect();
    for chunk in wanted.chunks(500) {
        let mut params: Vec<Value> = vec![object.ns.as_str().into(), object.id.as_str().into()];
        params.extend(chunk.iter().map(|seq| Value::from(*seq)));
        for row in &db.query(Stmt::query_rows(&OUTBOX_VALUES, chunk.len(), params)).await? {
            let row = Cells(row);
            let value = if row.is_null(1)? { None } else { Some(row.bytes(1)?) };
            values.insert(row.int(0)?, value);
        }
    }
    if values.len() < seqs.len() {
        if let Some((table, _)) = changes_table(catalog).await? {
            let left: Vec<Datum> =
                seqs.iter().filter(|seq| !values.contains_key(seq)).map(|seq| Datum::long(*seq)).collect();
            let filter = of_object(object).and(Reference::new("seq").is_in(left));
            for batch in &scan(&table, &["seq", "ns", "id", "value"], filter).await? {
                let seq = batch.column_by_name("seq").expect("selected").as_primitive::<Int64Type>();
                let value = batch.column_by_name("value").expect("selected");
                for row in ours(batch, object) {
                    if seqs.contains(&seq.value(row)) {
                        values.insert(seq.value(row), binary(value, row));
                    }
                }
            }
        }
    }
    Ok(values)
}

/// `?1`, `?2`: the object; then the seqs whose values are wanted.
static OUTBOX_VALUES: Shape = Shape {
    text: |seqs| {
        format!(
            "SELECT seq, value FROM outbox WHERE kind = 'change' AND ns = ?1 AND id = ?2 AND seq IN ({})",
            numbered(3, seqs)
        )
    },
};

/// The `changes` table and the last outbox seq its snapshot holds, once it has a snapshot.
async fn changes_table(catalog: &LibsqlCatalog) -> Result<Option<(Table, i64)>, ExportError> {
    let ident = TableIdent::new(NamespaceIdent::new(NAMESPACE.to_string()), ExportTable::Changes.name().to_string());
    let Some(table) = catalog.load_existing(&ident).await? else { return Ok(None) };
    if table.metadata().current_snapshot().is_none() {
        return Ok(None);
    }
    let through = exported_through(&table);
    Ok(Some((table, through)))
}

/// The object's rows: its namespace's partition, then its id.
fn of_object(object: &ObjectRef) -> Predicate {
    Reference::new("ns")
        .equal_to(Datum::string(&object.ns))
        .and(Reference::new("id").equal_to(Datum::string(&object.id)))
}

async fn scan(table: &Table, columns: &[&str], filter: Predicate) -> Result<Vec<RecordBatch>, ExportError> {
    let scan = table.scan().select(columns.iter().copied()).with_filter(filter).build()?;
    Ok(scan.to_arrow().await?.try_collect().await?)
}

/// The rows of a scanned batch that belong to `object` (the scan's filter
/// already says so; this does not rely on it).
fn ours<'a>(batch: &'a RecordBatch, object: &'a ObjectRef) -> impl Iterator<Item = usize> + 'a {
    let ns = batch.column_by_name("ns").expect("selected");
    let id = batch.column_by_name("id").expect("selected");
    (0..batch.num_rows()).filter(move |row| {
        text(ns, *row).as_deref() == Some(object.ns.as_str()) && text(id, *row).as_deref() == Some(&object.id)
    })
}

/// A string cell, whichever string layout the reader chose.
fn text(array: &dyn Array, row: usize) -> Option<String> {
    if array.is_null(row) {
        return None;
    }
    match array.data_type() {
        DataType::Utf8 => Some(array.as_string::<i32>().value(row).to_string()),
        DataType::LargeUtf8 => Some(array.as_string::<i64>().value(row).to_string()),
        DataType::Utf8View => Some(array.as_string_view().value(row).to_string()),
        _ => None,
    }
}

/// A binary cell, whichever binary layout the reader chose.
fn binary(array: &dyn Array, row: usize) -> Option<Vec<u8>> {
    if array.is_null(row) {
        return None;
    }
    match array.data_type() {
        DataType::Binary => Some(array.as_binary::<i32>().value(row).to_vec()),
        DataType::LargeBinary => Some(array.as_binary::<i64>().value(row).to_vec()),
        DataType::BinaryView => Some(array.as_binary_view().value(row).to_vec()),
        _ => None,
    }
}
