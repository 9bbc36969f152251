//! The two exported tables: their Iceberg schemas and partition specs, and
//! how outbox rows become Arrow record batches.

use std::sync::Arc;

use arrow_array::builder::{
    BooleanBuilder, Int64Builder, LargeBinaryBuilder, StringBuilder, TimestampMicrosecondBuilder,
};
use arrow_array::{ArrayRef, RecordBatch};
use iceberg::arrow::{schema_to_arrow_schema, UTC_TIME_ZONE};
use iceberg::spec::{NestedField, PrimitiveType, Schema, Transform, Type, UnboundPartitionSpec};
use libsql::params;

use crate::db::{Session, StoreError};

/// The Iceberg namespace both tables live in (also the catalog's name).
pub const NAMESPACE: &str = "statehouse";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ExportTable {
    Events,
    Changes,
}

impl ExportTable {
    pub const ALL: [ExportTable; 2] = [ExportTable::Events, ExportTable::Changes];

    pub fn name(self) -> &'static str {
        match self {
            ExportTable::Events => "events",
            ExportTable::Changes => "changes",
        }
    }

    /// The outbox `kind` this table is fed from.
    pub fn outbox_kind(self) -> &'static str {
        match self {
            ExportTable::Events => "event",
            ExportTable::Changes => "change",
        }
    }

    pub fn schema(self) -> Schema {
        let string = || Type::Primitive(PrimitiveType::String);
        let long = || Type::Primitive(PrimitiveType::Long);
        let timestamptz = || Type::Primitive(PrimitiveType::Timestamptz);
        let fields = match self {
            ExportTable::Events => vec![
                NestedField::required(1, "seq", long()).with_doc("Commit order across all objects"),
                NestedField::required(2, "event_id", string()).with_doc("UUID v7, unique"),
                NestedField::required(3, "ns", string()),
                NestedField::required(4, "id", string()),
                NestedField::required(5, "type", string()),
                NestedField::required(6, "ts", timestamptz()).with_doc("When it happened (client's ts or arrival)"),
                NestedField::required(7, "data", string()).with_doc("The event's data as JSON text"),
                NestedField::required(8, "version", long()).with_doc("Object version the event was committed at"),
                NestedField::required(9, "fence", long()),
                NestedField::required(10, "instance", string()).with_doc("Replica that committed it"),
                NestedField::required(11, "committed_at", timestamptz()),
            ],
            ExportTable::Changes => vec![
                NestedField::required(1, "seq", long()).with_doc("Commit order across all objects"),
                NestedField::required(2, "ns", string()),
                NestedField::required(3, "id", string()),
                NestedField::required(4, "op", string()).with_doc("put, delete, delete_all, blob_put or blob_delete"),
                NestedField::optional(5, "key", string()).with_doc("The key or blob name; null for delete_all"),
                NestedField::required(6, "version", long()).with_doc("Object version after the change"),
                NestedField::required(7, "fence", long()),
                NestedField::required(8, "instance", string()),
                NestedField::required(9, "ts", timestamptz()).with_doc("Commit time"),
                NestedField::optional(10, "content_type", string()),
                NestedField::optional(11, "size", long()).with_doc("Full size of the value in bytes"),
                NestedField::optional(12, "value", Type::Primitive(PrimitiveType::Binary))
                    .with_doc("The value's bytes, up to the export cap"),
                NestedField::optional(13, "value_truncated", Type::Primitive(PrimitiveType::Boolean)),
            ],
        };
        Schema::builder()
            .with_schema_id(0)
            .with_fields(fields.into_iter().map(Arc::new))
            .build()
            .expect("the export schemas are valid")
    }

    pub fn partition_spec(self) -> UnboundPartitionSpec {
        let (ns, ts) = match self {
            ExportTable::Events => (3, 6),
            ExportTable::Changes => (2, 9),
        };
        let mut spec = UnboundPartitionSpec::builder().with_spec_id(0);
        spec = spec.add_partition_field(ns, "ns", Transform::Identity).expect("valid partition field");
        if self == ExportTable::Events {
            spec = spec.add_partition_field(5, "type", Transform::Identity).expect("valid partition field");
        }
        spec.add_partition_field(ts, "ts_day", Transform::Day).expect("valid partition field").build()
    }

    /// Reads up to `limit` outbox rows of this table past `after_seq`, as one
    /// record batch, and the last seq read. `None` when there is nothing.
    pub async fn read_outbox(
        self,
        conn: &Session,
        after_seq: i64,
        limit: usize,
    ) -> Result<Option<(RecordBatch, i64)>, StoreError> {
        let schema = Arc::new(schema_to_arrow_schema(&self.schema()).map_err(|e| StoreError::Internal(e.to_string()))?);
        let sql = match self {
            ExportTable::Events => {
                "SELECT seq, event_id, ns, id, type, ts, data, version, fence, instance, COALESCE(committed_ms * 1000, ts)
                 FROM outbox WHERE kind = 'event' AND seq > ?1 ORDER BY seq LIMIT ?2"
            }
            ExportTable::Changes => {
                "SELECT seq, ns, id, op, key, version, fence, instance, ts, content_type, size, value, value_truncated
                 FROM outbox WHERE kind = 'change' AND seq > ?1 ORDER BY seq LIMIT ?2"
            }
        };
        let mut columns = Columns::new(self);
        let mut last_seq = None;
        conn.rows(sql, params![after_seq, limit as i64], |row| {
            last_seq = Some(columns.push(row)?);
            Ok::<(), StoreError>(())
        })
        .await?;
        let Some(last_seq) = last_seq else { return Ok(None) };
        let batch = RecordBatch::try_new(schema, columns.finish())
            .map_err(|e| StoreError::Internal(format!("building the {} batch: {e}", self.name())))?;
        Ok(Some((batch, last_seq)))
    }
}

/// One builder per column, in schema order; column types follow the SQL above.
enum Columns {
    Events {
        seq: Int64Builder,
        event_id: StringBuilder,
        ns: StringBuilder,
        id: StringBuilder,
        event_type: StringBuilder,
        ts: TimestampMicrosecondBuilder,
        data: StringBuilder,
        version: Int64Builder,
        fence: Int64Builder,
        instance: StringBuilder,
        committed_at: TimestampMicrosecondBuilder,
    },
    Changes {
        seq: Int64Builder,
        ns: StringBuilder,
        id: StringBuilder,
        op: StringBuilder,
        key: StringBuilder,
        version: Int64Builder,
        fence: Int64Builder,
        instance: StringBuilder,
        ts: TimestampMicrosecondBuilder,
        content_type: StringBuilder,
        size: Int64Builder,
        value: LargeBinaryBuilder,
        value_truncated: BooleanBuilder,
    },
}

fn utc_micros() -> TimestampMicrosecondBuilder {
    TimestampMicrosecondBuilder::new().with_timezone(UTC_TIME_ZONE)
}

impl Columns {
    fn new(table: ExportTable) -> Columns {
        match table {
            ExportTable::Events => Columns::Events {
                seq: Int64Builder::new(),
                event_id: StringBuilder::new(),
                ns: StringBuilder::new(),
                id: StringBuilder::new(),
                event_type: StringBuilder::new(),
                ts: utc_micros(),
                data: StringBuilder::new(),
                version: Int64Builder::new(),
                fence: Int64Builder::new(),
                instance: StringBuilder::new(),
                committed_at: utc_micros(),
            },
            ExportTable::Changes => Columns::Changes {
                seq: Int64Builder::new(),
                ns: StringBuilder::new(),
                id: StringBuilder::new(),
                op: StringBuilder::new(),
                key: StringBuilder::new(),
                version: Int64Builder::new(),
                fence: Int64Builder::new(),
                instance: StringBuilder::new(),
                ts: utc_micros(),
                content_type: StringBuilder::new(),
                size: Int64Builder::new(),
                value: LargeBinaryBuilder::new(),
                value_truncated: BooleanBuilder::new(),
            },
        }
    }

    /// Appends one row; returns its seq.
    fn push(&mut self, row: &libsql::Row) -> Result<i64, StoreError> {
        let seq: i64 = row.get(0)?;
        match self {
            Columns::Events {
                seq: s,
                event_id,
                ns,
                id,
                event_type,
                ts,
                data,
                version,
                fence,
                instance,
                committed_at,
            } => {
                s.append_value(seq);
                event_id.append_value(row.get::<String>(1)?);
                ns.append_value(row.get::<String>(2)?);
                id.append_value(row.get::<String>(3)?);
                event_type.append_value(row.get::<String>(4)?);
                ts.append_value(row.get::<i64>(5)?);
                data.append_value(row.get::<String>(6)?);
                version.append_value(row.get::<i64>(7)?);
                fence.append_value(row.get::<i64>(8)?);
                instance.append_value(row.get::<String>(9)?);
                committed_at.append_value(row.get::<i64>(10)?);
            }
            Columns::Changes {
                seq: s,
                ns,
                id,
                op,
                key,
                version,
                fence,
                instance,
                ts,
                content_type,
                size,
                value,
                value_truncated,
            } => {
                s.append_value(seq);
                ns.append_value(row.get::<String>(1)?);
                id.append_value(row.get::<String>(2)?);
                op.append_value(row.get::<String>(3)?);
                key.append_option(row.get::<Option<String>>(4)?);
                version.append_value(row.get::<i64>(5)?);
                fence.append_value(row.get::<i64>(6)?);
                instance.append_value(row.get::<String>(7)?);
                ts.append_value(row.get::<i64>(8)?);
                content_type.append_option(row.get::<Option<String>>(9)?);
                size.append_option(row.get::<Option<i64>>(10)?);
                value.append_option(row.get::<Option<Vec<u8>>>(11)?);
                value_truncated.append_option(row.get::<Option<i64>>(12)?.map(|t| t != 0));
            }
        }
        Ok(seq)
    }

    fn finish(self) -> Vec<ArrayRef> {
        fn a(array: impl arrow_array::Array + 'static) -> ArrayRef {
            Arc::new(array)
        }
        match self {
            Columns::Events {
                mut seq,
                mut event_id,
                mut ns,
                mut id,
                mut event_type,
                mut ts,
                mut data,
                mut version,
                mut fence,
                mut instance,
                mut committed_at,
            } => vec![
                a(seq.finish()),
                a(event_id.finish()),
                a(ns.finish()),
                a(id.finish()),
                a(event_type.finish()),
                a(ts.finish()),
                a(data.finish()),
                a(version.finish()),
                a(fence.finish()),
                a(instance.finish()),
                a(committed_at.finish()),
            ],
            Columns::Changes {
                mut seq,
                mut ns,
                mut id,
                mut op,
                mut key,
                mut version,
                mut fence,
                mut instance,
                mut ts,
                mut content_type,
                mut size,
                mut value,
                mut value_truncated,
            } => vec![
                a(seq.finish()),
                a(ns.finish()),
                a(id.finish()),
                a(op.finish()),
                a(key.finish()),
                a(version.finish()),
                a(fence.finish()),
                a(instance.finish()),
                a(ts.finish()),
                a(content_type.finish()),
                a(size.finish()),
                a(value.finish()),
                a(value_truncated.finish()),
            ],
        }
    }
}
