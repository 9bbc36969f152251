//! An object's history: its versions, newest first, each with when, under
//! which fence and by which replica it was committed, and what it changed.
//! Read from the `changes` table (its current snapshot, pruned to the
//! object's namespace partition and filtered by id and version) plus the
//! outbox rows that snapshot does not hold yet, so a change is listed the
//! moment it is acknowledged, before any export.

use std::collections::BTreeMap;

use arrow_array::cast::AsArray;
use arrow_array::types::{Int64Type, TimestampMicrosecondType};
use arrow_array::{Array, RecordBatch};
use arrow_schema::DataType;
use futures::TryStreamExt;
use iceberg::expr::Reference;
use iceberg::spec::Datum;
use iceberg::{NamespaceIdent, TableIdent};

use super::catalog::LibsqlCatalog;
use super::exporter::{exported_through, ExportError};
use super::tables::{ExportTable, NAMESPACE};
use crate::db::batch::Stmt;
use crate::db::cells::Cells;
use crate::db::Database;
use crate::model::ObjectRef;

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
    let before = before.unwrap_or(i64::MAX);
    // The outbox first, the snapshot second: rows leave the outbox only once a
    // snapshot holds them, so this order leaves no gap between the two.
    let pending = db
        .query(Stmt::query(
            "SELECT seq, version, ts, fence, instance, op, key FROM outbox
             WHERE kind = 'change' AND ns = ?1 AND id = ?2 AND version < ?3 ORDER BY seq",
            vec![object.ns.as_str().into(), object.id.as_str().into(), before.into()],
        ))
        .await?;
    let mut rows: BTreeMap<i64, ChangeRow> = BTreeMap::new();
    for row in &pending {
        let row = Cells(row);
        let change = ChangeRow {
            version: row.int(1)?,
            ts_micros: row.int(2)?,
            fence: row.int(3)?,
            instance: row.text(4)?,
            op: row.text(5)?,
            key: row.opt_text(6)?,
        };
        rows.insert(row.int(0)?, change);
    }
    let ident = TableIdent::new(NamespaceIdent::new(NAMESPACE.to_string()), ExportTable::Changes.name().to_string());
    if let Some(table) = catalog.load_existing(&ident).await? {
        let through = exported_through(&table);
        rows.retain(|seq, _| *seq > through);
        if table.metadata().current_snapshot().is_some() {
            let filter = Reference::new("ns")
                .equal_to(Datum::string(&object.ns))
                .and(Reference::new("id").equal_to(Datum::string(&object.id)))
                .and(Reference::new("version").less_than(Datum::long(before)));
            let scan = table
                .scan()
                .select(["seq", "ns", "id", "version", "ts", "fence", "instance", "op", "key"])
                .with_filter(filter)
                .build()?;
            let batches: Vec<RecordBatch> = scan.to_arrow().await?.try_collect().await?;
            for batch in &batches {
                exported_rows(batch, object, before, &mut rows);
            }
        }
    }
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

struct ChangeRow {
    version: i64,
    ts_micros: i64,
    fence: i64,
    instance: String,
    op: String,
    key: Option<String>,
}

/// The rows of one scanned batch that belong to `object` below `before`
/// (the scan's filter already says so; this does not rely on it).
fn exported_rows(batch: &RecordBatch, object: &ObjectRef, before: i64, rows: &mut BTreeMap<i64, ChangeRow>) {
    let column = |name: &str| batch.column_by_name(name).expect("the scan selected it");
    let (ns, id, instance, op, key) = (column("ns"), column("id"), column("instance"), column("op"), column("key"));
    let seq = column("seq").as_primitive::<Int64Type>();
    let version = column("version").as_primitive::<Int64Type>();
    let ts = column("ts").as_primitive::<TimestampMicrosecondType>();
    let fence = column("fence").as_primitive::<Int64Type>();
    for row in 0..batch.num_rows() {
        let ours = text(ns, row).as_deref() == Some(object.ns.as_str()) && text(id, row).as_deref() == Some(&object.id);
        if !ours || version.value(row) >= before {
            continue;
        }
        let change = ChangeRow {
            version: version.value(row),
            ts_micros: ts.value(row),
            fence: fence.value(row),
            instance: text(instance, row).unwrap_or_default(),
            op: text(op, row).unwrap_or_default(),
            key: text(key, row),
        };
        rows.insert(seq.value(row), change);
    }
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
