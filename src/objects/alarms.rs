//! The SQL of alarms: the statements fenced writes run for them, and reads
//! (an object's alarms, and the due ones across objects by `alarms_by_due`).

use libsql::Value;

use super::ObjectRef;
use crate::db::batch::Stmt;
use crate::db::cells::Cells;
use crate::db::{numbered, Database, StoreError};
use crate::model::{Alarm, AlarmSpec};

const COLUMNS: &str = "name, scheduled_at, due_at, every_ms, payload, attempt, armed_version, version";

fn alarm_of(row: &[Value], first: usize) -> Result<Alarm, StoreError> {
    let cells = Cells(row);
    let every_ms = if cells.is_null(first + 3)? { None } else { Some(cells.int(first + 3)?) };
    let armed_version = cells.int(first + 6)?;
    Ok(Alarm {
        name: cells.text(first)?,
        spec: AlarmSpec {
            scheduled_at_ms: cells.int(first + 1)?,
            due_at_ms: cells.int(first + 2)?,
            every_ms,
            payload: cells.opt_text(first + 4)?,
            attempt: cells.int(first + 5)?,
            armed_version: Some(armed_version),
        },
        armed_version,
        version: cells.int(first + 7)?,
    })
}

/// The named alarms of `object` that exist.
pub async fn read_alarms(db: &Database, object: &ObjectRef, names: &[&str]) -> Result<Vec<Alarm>, StoreError> {
    if names.is_empty() {
        return Ok(Vec::new());
    }
    let mut args: Vec<Value> = vec![object.ns.as_str().into(), object.id.as_str().into()];
    args.extend(names.iter().map(|name| Value::from(*name)));
    let sql =
        format!("SELECT {COLUMNS} FROM alarms WHERE ns = ?1 AND id = ?2 AND name IN ({})", numbered(3, names.len()));
    db.query(Stmt::query_once(sql, args)).await?.iter().map(|row| alarm_of(row, 0)).collect()
}

pub async fn get_alarm(db: &Database, object: &ObjectRef, name: &str) -> Result<Option<Alarm>, StoreError> {
    Ok(read_alarms(db, object, &[name]).await?.pop())
}

/// Up to `limit` alarms of `object` by name, after `after`, and whether more follow.
pub async fn list_alarms(
    db: &Database,
    object: &ObjectRef,
    after: Option<&str>,
    limit: usize,
) -> Result<(Vec<Alarm>, bool), StoreError> {
    let rows = db
        .query(Stmt::query_once(
            format!("SELECT {COLUMNS} FROM alarms WHERE ns = ?1 AND id = ?2 AND name > ?3 ORDER BY name LIMIT ?4"),
            vec![
                object.ns.as_str().into(),
                object.id.as_str().into(),
                after.unwrap_or("").into(),
                (limit as i64 + 1).into(),
            ],
        ))
        .await?;
    let mut alarms = rows.iter().map(|row| alarm_of(row, 0)).collect::<Result<Vec<_>, _>>()?;
    let more = alarms.len() > limit;
    alarms.truncate(limit);
    Ok((alarms, more))
}

/// An alarm with its object, as the delivery pass and the admin listing see it.
#[derive(Debug, Clone)]
pub struct DueAlarm {
    pub object: ObjectRef,
    pub alarm: Alarm,
}

/// Where a listing of due alarms continues: after this (due time, ns, id, name).
pub type DueCursor = (i64, String, String, String);

/// Alarms due before `before_ms` across all objects, in due order, after
/// `after`; up to `limit`, and whether more follow.
pub async fn due_alarms(
    db: &Database,
    before_ms: i64,
    after: Option<&DueCursor>,
    limit: usize,
) -> Result<(Vec<DueAlarm>, bool), StoreError> {
    let mut args: Vec<Value> = vec![before_ms.into(), (limit as i64 + 1).into()];
    let mut sql = format!("SELECT ns, id, {COLUMNS} FROM alarms WHERE due_at < ?1");
    if let Some((due, ns, id, name)) = after {
        args.extend([(*due).into(), ns.as_str().into(), id.as_str().into(), name.as_str().into()]);
        sql.push_str(" AND (due_at, ns, id, name) > (?3, ?4, ?5, ?6)");
    }
    sql.push_str(" ORDER BY due_at, ns, id, name LIMIT ?2");
    let rows = db.query(Stmt::query_once(sql, args)).await?;
    let mut due = rows
        .iter()
        .map(|row| {
            let cells = Cells(row);
            Ok(DueAlarm { object: ObjectRef { ns: cells.text(0)?, id: cells.text(1)? }, alarm: alarm_of(row, 2)? })
        })
        .collect::<Result<Vec<_>, StoreError>>()?;
    let more = due.len() > limit;
    due.truncate(limit);
    Ok((due, more))
}

/// How many alarms exist, and how many of them are due by `now_ms`.
pub async fn count_alarms(db: &Database, now_ms: i64) -> Result<(i64, i64), StoreError> {
    let rows = db
        .query(Stmt::query(
            "SELECT (SELECT COUNT(*) FROM alarms), (SELECT COUNT(*) FROM alarms WHERE due_at <= ?1)",
            vec![now_ms.into()],
        ))
        .await?;
    let row = rows.first().ok_or_else(|| StoreError::Internal("a count answered no row".into()))?;
    let cells = Cells(row);
    Ok((cells.int(0)?, cells.int(1)?))
}

/// Sets alarm `name` of `object` at `version` (arming anew unless the spec continues an arming).
pub(super) fn upsert_statement(object: &ObjectRef, name: &str, spec: &AlarmSpec, version: i64) -> Stmt {
    Stmt::exec(
        "INSERT INTO alarms (ns, id, name, scheduled_at, due_at, every_ms, payload, attempt, armed_version, version)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)
         ON CONFLICT (ns, id, name) DO UPDATE SET
           scheduled_at = excluded.scheduled_at, due_at = excluded.due_at, every_ms = excluded.every_ms,
           payload = excluded.payload, attempt = excluded.attempt, armed_version = excluded.armed_version,
           version = excluded.version",
        vec![
            object.ns.as_str().into(),
            object.id.as_str().into(),
            name.into(),
            spec.scheduled_at_ms.into(),
            spec.due_at_ms.into(),
            spec.every_ms.into(),
            spec.payload.clone().into(),
            spec.attempt.into(),
            spec.armed_version.unwrap_or(version).into(),
            version.into(),
        ],
    )
}

pub(super) fn delete_statement(object: &ObjectRef, name: &str) -> Stmt {
    Stmt::exec(
        "DELETE FROM alarms WHERE ns = ?1 AND id = ?2 AND name = ?3",
        vec![object.ns.as_str().into(), object.id.as_str().into(), name.into()],
    )
}

pub(super) fn delete_all_statement(object: &ObjectRef) -> Stmt {
    Stmt::exec(
        "DELETE FROM alarms WHERE ns = ?1 AND id = ?2",
        vec![object.ns.as_str().into(), object.id.as_str().into()],
    )
}
