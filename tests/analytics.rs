//! The Iceberg export, checked from the outside: a workload of puts, deletes,
//! batches and events over several namespaces and export cycles, then DuckDB
//! and PyIceberg (independent readers, tests/iceberg/read.py) must each return
//! exactly the acknowledged events and changes, at the current snapshot and at
//! older ones; on the local folder and on S3; through crashes of the exporter;
//! and an exporter whose lease moved cannot publish.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::iceberg::{read_tables, read_through_catalog, tables};
use common::s3::S3Server;
use common::{
    spawn_app_with, token, unique_ns, with_tokens, EventLoad, EventLoadShape, Process, TestApp, TestDatabase,
};
use serde_json::{json, Value};

/// What the server acknowledged, as the readers must show it.
/// A change as the tables hold it: (ns, id, op, key, version, value as hex).
type ChangeRow = (String, String, String, Option<String>, i64, Option<String>);

#[derive(Default, Clone)]
struct Expected {
    /// event_id -> (ns, id, type, data, version)
    events: BTreeMap<String, (String, String, String, String, i64)>,
    /// (ns, id, op, key, version, value as hex)
    changes: BTreeSet<ChangeRow>,
}

impl Expected {
    fn change(&mut self, ns: &str, id: &str, op: &str, key: &str, version: i64, value: Option<&[u8]>) {
        self.changes.insert((ns.into(), id.into(), op.into(), Some(key.into()), version, value.map(hex::encode)));
    }

    fn events_from(&mut self, ns: &str, id: &str, version: i64, ids: &Value, sent: &[Value]) {
        for (event_id, event) in ids.as_array().unwrap().iter().zip(sent) {
            self.events.insert(
                event_id.as_str().unwrap().to_string(),
                (ns.into(), id.into(), event["type"].as_str().unwrap().into(), event["data"].to_string(), version),
            );
        }
    }
}

async fn ok_json(response: reqwest::Response) -> Value {
    let status = response.status();
    let body = response.text().await.unwrap();
    assert!(status.is_success(), "{status}: {body}");
    serde_json::from_str(&body).unwrap()
}

/// One round of writes on `objects` objects in each namespace.
async fn workload(app: &TestApp, namespaces: &[String], objects: usize, round: usize, expected: &mut Expected) {
    let c = &app.client;
    for ns in namespaces {
        for o in 0..objects {
            let id = format!("o{o}");
            let base = app.url(&format!("/v1/objects/{ns}/{id}"));
            for j in 0..4 {
                let key = format!("k{round}-{j}");
                let value = format!("value {ns}/{id}/{key}");
                let r = ok_json(c.put(format!("{base}/kv/{key}")).body(value.clone()).send().await.unwrap()).await;
                expected.change(ns, &id, "put", &key, r["version"].as_i64().unwrap(), Some(value.as_bytes()));
            }
            let key = format!("k{round}-0");
            let r = ok_json(c.delete(format!("{base}/kv/{key}")).send().await.unwrap()).await;
            assert_eq!(r["deleted"], true);
            expected.change(ns, &id, "delete", &key, r["version"].as_i64().unwrap(), None);

            let batch_events = vec![
                json!({"type": "CartUpdated", "data": {"round": round, "object": o}}),
                json!({"type": "weird/../type ünï", "data": null}),
            ];
            let put_value = json!({"n": round});
            let r = ok_json(
                c.post(format!("{base}/batch"))
                    .json(&json!({
                        "ops": [
                            {"op": "put", "key": format!("b{round}"), "value": put_value},
                            {"op": "delete", "key": format!("k{round}-1")},
                        ],
                        "events": batch_events,
                    }))
                    .send()
                    .await
                    .unwrap(),
            )
            .await;
            let version = r["version"].as_i64().unwrap();
            expected.change(
                ns,
                &id,
                "put",
                &format!("b{round}"),
                version,
                Some(&serde_json::to_vec(&put_value).unwrap()),
            );
            expected.change(ns, &id, "delete", &format!("k{round}-1"), version, None);
            expected.events_from(ns, &id, version, &r["event_ids"], &batch_events);

            let events: Vec<Value> = (0..3)
                .map(|e| json!({"type": if e % 2 == 0 {"OrderPlaced"} else {"OrderShipped"}, "data": {"e": e, "s": "ü\"'\\"}}))
                .collect();
            let r =
                ok_json(c.post(format!("{base}/events")).json(&json!({"events": events})).send().await.unwrap()).await;
            expected.events_from(ns, &id, r["version"].as_i64().unwrap(), &r["event_ids"], &events);
        }
    }
}

async fn export_now(app: &TestApp) -> Value {
    ok_json(app.client.post(app.url("/v1/admin/export")).send().await.unwrap()).await
}

fn snapshot_of(report: &Value, table: &str) -> Option<i64> {
    report["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["table"] == format!("statehouse.{table}"))
        .map(|s| s["snapshot_id"].as_i64().unwrap())
        .next_back()
}

fn seen_events(rows: &Value, namespaces: &[String]) -> BTreeMap<String, (String, String, String, String, i64)> {
    let mut seen = BTreeMap::new();
    for row in rows.as_array().unwrap() {
        if !namespaces.iter().any(|ns| row["ns"] == ns.as_str()) {
            continue;
        }
        let event_id = row["event_id"].as_str().unwrap().to_string();
        let data: Value = serde_json::from_str(row["data"].as_str().unwrap()).unwrap();
        let previous = seen.insert(
            event_id.clone(),
            (
                row["ns"].as_str().unwrap().into(),
                row["id"].as_str().unwrap().into(),
                row["type"].as_str().unwrap().into(),
                data.to_string(),
                row["version"].as_i64().unwrap(),
            ),
        );
        assert!(previous.is_none(), "event {event_id} exported twice");
    }
    seen
}

fn seen_changes(rows: &Value, namespaces: &[String]) -> BTreeSet<ChangeRow> {
    let mut seen = BTreeSet::new();
    let mut count = 0;
    for row in rows.as_array().unwrap() {
        if !namespaces.iter().any(|ns| row["ns"] == ns.as_str()) {
            continue;
        }
        count += 1;
        seen.insert((
            row["ns"].as_str().unwrap().into(),
            row["id"].as_str().unwrap().into(),
            row["op"].as_str().unwrap().into(),
            row["key"].as_str().map(str::to_string),
            row["version"].as_i64().unwrap(),
            row["value"].as_str().map(str::to_string),
        ));
    }
    assert_eq!(count, seen.len(), "a change was exported twice");
    seen
}

struct ReadSetup {
    db_file: Option<String>,
    s3: Option<Value>,
}

impl ReadSetup {
    /// Readers of a warehouse in `s3`'s bucket, with the catalog in `db` when it is a file.
    fn on_s3(db: &TestDatabase, s3: &S3Server) -> ReadSetup {
        ReadSetup {
            db_file: db.file_path().map(|p| p.display().to_string()),
            s3: Some(json!({
                "endpoint": s3.endpoint,
                "access_key_id": common::s3::ACCESS_KEY,
                "secret_access_key": common::s3::SECRET_KEY,
                "region": "us-east-1",
            })),
        }
    }
}

/// Both readers, current and older snapshots, against what was acknowledged.
async fn check_readers(
    app: &TestApp,
    setup: &ReadSetup,
    namespaces: &[String],
    expected: &Expected,
    history: &[(i64, i64, Expected)],
) {
    let listed = tables(&app.client, &app.base).await;
    let body: Value = app.client.get(app.url("/v1/analytics/tables")).send().await.unwrap().json().await.unwrap();
    let warehouse = body["warehouse"].clone();
    for table in ["events", "changes"] {
        let info = &listed[table];
        assert_eq!(info["pending_rows"], 0, "{table}: rows left in the outbox after the export: {info}");
        let at: Vec<i64> = history.iter().map(|(e, c, _)| if table == "events" { *e } else { *c }).collect();
        let request = json!({
            "table": table,
            "metadata_location": info["metadata_location"],
            "db_file": setup.db_file,
            "warehouse": warehouse,
            "snapshot_ids": at,
            "s3": setup.s3,
        });
        let read = read_tables(&request).await;
        for reader in ["duckdb", "pyiceberg"] {
            let result = &read[reader];
            let rows = &result["rows"];
            assert_eq!(
                rows.as_array().unwrap().len() as u64,
                info["rows"].as_u64().unwrap(),
                "{reader} {table}: row count differs from the snapshot summary"
            );
            if table == "events" {
                let seen = seen_events(rows, namespaces);
                assert_eq!(seen.len(), expected.events.len(), "{reader}: event count");
                assert!(seen == expected.events, "{reader}: the exported events differ from the acknowledged ones");
            } else {
                let seen = seen_changes(rows, namespaces);
                assert_eq!(seen.len(), expected.changes.len(), "{reader}: change count");
                assert!(seen == expected.changes, "{reader}: the exported changes differ from the acknowledged ones");
            }
            // Time travel: each older snapshot holds exactly what had been exported then.
            for (i, (events_at, changes_at, then)) in history.iter().enumerate() {
                let id = if table == "events" { events_at } else { changes_at };
                let old = &result["at"][id.to_string()];
                if table == "events" {
                    assert!(seen_events(old, namespaces) == then.events, "{reader}: events at snapshot {i} ({id})");
                } else {
                    assert!(seen_changes(old, namespaces) == then.changes, "{reader}: changes at snapshot {i} ({id})");
                }
            }
            println!(
                "{reader} read {table}: {} rows now, {} snapshots, time travel to {} older snapshots checked",
                rows.as_array().unwrap().len(),
                result["snapshots"].as_array().unwrap().len(),
                history.len()
            );
        }
        assert_eq!(read["duckdb"]["rows"], read["pyiceberg"]["rows"], "{table}: DuckDB and PyIceberg disagree");
    }
}

/// The exporter's first cycle (soon after start) creates both tables; waiting
/// for it keeps that cycle from taking part of the first round's rows.
async fn wait_for_tables(app: &TestApp) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let listed = tables(&app.client, &app.base).await;
        if listed["events"]["exists"] == true && listed["changes"]["exists"] == true {
            return;
        }
        assert!(Instant::now() < deadline, "the exporter never created the tables: {listed:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// What was acknowledged, and per older snapshot (events, changes) what it holds.
type History = Vec<(i64, i64, Expected)>;

/// Rounds of the workload, each followed by an export cycle.
async fn export_rounds(app: &TestApp, namespaces: &[String], objects: usize, rounds: usize) -> (Expected, History) {
    wait_for_tables(app).await;
    let mut expected = Expected::default();
    let mut history = Vec::new();
    let started = Instant::now();
    for round in 0..rounds {
        workload(app, namespaces, objects, round, &mut expected).await;
        let report = export_now(app).await;
        assert_eq!(report["nothing_to_do"], false, "{report}");
        let events_at = snapshot_of(&report, "events").expect("an events snapshot");
        let changes_at = snapshot_of(&report, "changes").expect("a changes snapshot");
        history.push((events_at, changes_at, expected.clone()));
    }
    let again = export_now(app).await;
    assert_eq!(again["nothing_to_do"], true, "a second export with no new writes exported {again}");
    println!(
        "workload: {} events, {} changes in {rounds} export cycles ({:?})",
        expected.events.len(),
        expected.changes.len(),
        started.elapsed()
    );
    // The last snapshot is the current one; the ones before it are history.
    history.pop();
    (expected, history)
}

async fn interop(app: &TestApp, setup: ReadSetup, namespaces: Vec<String>, objects: usize, rounds: usize) {
    let (expected, history) = export_rounds(app, &namespaces, objects, rounds).await;
    check_readers(app, &setup, &namespaces, &expected, &history).await;
}

#[tokio::test]
async fn duckdb_and_pyiceberg_read_exactly_the_acknowledged_writes() {
    let db = TestDatabase::new();
    let app = spawn_app_with(&db, |s| s.export_interval = Duration::from_millis(3_600_000)).await;
    // PyIceberg opens the database file itself when there is one; on sqld it reads the metadata file.
    let db_file = db.file_path().map(|p| p.display().to_string());
    let namespaces = (0..3).map(|i| unique_ns(&format!("analytics{i}"))).collect();
    interop(&app, ReadSetup { db_file, s3: None }, namespaces, 20, 3).await;
    app.stop().await;
}

#[tokio::test]
async fn the_warehouse_on_s3_is_read_through_the_s3_api() {
    let db = TestDatabase::new();
    let s3 = S3Server::start(Some("lake")).await;
    let settings = s3.settings("lake");
    let app = spawn_app_with(&db, |s| {
        s.objects = settings;
        s.export_interval = Duration::from_millis(3_600_000);
    })
    .await;
    let listed: Value = app.client.get(app.url("/v1/analytics/tables")).send().await.unwrap().json().await.unwrap();
    assert_eq!(listed["warehouse"], "s3://lake/warehouse");
    let setup = ReadSetup::on_s3(&db, &s3);
    // Short namespaces: s3s-fs keeps each object's metadata in a file named by the
    // base64 of its key, so keys over ~180 bytes fail there (S3 and R2 allow 1024).
    let namespaces = vec!["s3a".to_string(), "s3b".to_string(), "s3c".to_string()];
    interop(&app, setup, namespaces, 8, 2).await;
    // Everything the tables name is really in the bucket.
    let files: Vec<_> = walk(&s3.root.join("lake/warehouse/statehouse"));
    assert!(files.iter().any(|f| f.ends_with(".parquet")), "no Parquet files in the bucket: {files:?}");
    assert!(files.iter().any(|f| f.contains("/events/data/ns=")), "events are not partitioned by ns: {files:?}");
    // Partition values are escaped as the Iceberg Java writer does, and read back as they were.
    assert!(
        files.iter().any(|f| f.contains("/type=weird%2F..%2Ftype+%C3%BCn%C3%AF/")),
        "the event type's directory is not URL-encoded: {files:?}"
    );
    app.stop().await;
}

fn walk(dir: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path.display().to_string());
        }
    }
    out
}

#[tokio::test]
async fn the_exporter_is_a_singleton_and_empty_tables_exist_from_the_start() {
    let db = TestDatabase::new();
    let a = spawn_app_with(&db, |s| s.export_interval = Duration::from_millis(3_600_000)).await;
    let b = spawn_app_with(&db, |s| {
        s.export_interval = Duration::from_millis(3_600_000);
        s.objects.objects_dir = db.dir.path().join("objects");
    })
    .await;
    // The exporter's own first cycle (it creates the tables) is over once this
    // returns: cycles take turns, so it cannot export the event below itself.
    export_now(&a).await;
    let ns = unique_ns("single");
    let r = a
        .client
        .post(a.url(&format!("/v1/objects/{ns}/o/events")))
        .json(&json!({"events": [{"type": "T"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // A exports: this request, or its loop's first cycle if that starts only
    // after the event (it waits half a second after start). B's request is
    // forwarded to A (the exporter), which finds nothing left; the event is in
    // the table once, exported by A (checked below).
    let first = export_now(&a).await;
    assert!(first["snapshots"].as_array().unwrap().len() <= 1, "{first}");
    let second = b.client.post(b.url("/v1/admin/export")).send().await.unwrap();
    assert_eq!(second.status(), 200);
    assert_eq!(
        second.headers()["statehouse-instance"],
        a.client.get(a.url("/healthz")).send().await.unwrap().headers()["statehouse-instance"]
    );
    let second: Value = second.json().await.unwrap();
    assert_eq!(second["nothing_to_do"], true, "{second}");
    let listed = tables(&b.client, &b.base).await;
    assert_eq!(listed["events"]["rows"], 1);
    assert_eq!(listed["changes"]["exists"], true);
    assert_eq!(listed["changes"]["rows"], 0);
    // Metrics show the outbox drained and what this replica exported.
    let metrics = a.client.get(a.url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("statehouse_export_outbox_rows 0"), "{metrics}");
    assert!(metrics.contains("statehouse_export_rows_total{table=\"events\"} 1"), "{metrics}");
    a.stop().await;
    b.stop().await;
}

/// SIGKILL the exporting process at random points while writes go on through
/// another replica; then the tables hold every acknowledged event exactly once.
#[tokio::test]
async fn killing_the_exporter_at_random_points_loses_and_duplicates_nothing() {
    let db = TestDatabase::new();
    let objects = db.dir.path().join("objects");
    let lease_ms = 600;
    let env = |export: bool| {
        vec![
            ("STATEHOUSE_OBJECTS_DIR", objects.display().to_string()),
            ("STATEHOUSE_LEASE_MS", lease_ms.to_string()),
            ("STATEHOUSE_EXPORT_ENABLED", export.to_string()),
            ("STATEHOUSE_EXPORT_INTERVAL_MS", "100".to_string()),
            // Small snapshots: each cycle commits several, so kills land between and inside them.
            ("STATEHOUSE_EXPORT_BATCH_ROWS", "150".to_string()),
        ]
    };
    let writer = Process::start(&db.url, 0, &env(false));
    let ns = unique_ns("crash");
    let client = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().unwrap();
    let load = EventLoad::start(
        &writer.base,
        &ns,
        EventLoadShape {
            writers: 3,
            events_per_post: 5,
            objects: 7,
            types: &["Tick"],
            pause: Duration::from_millis(2),
        },
    );
    let rounds = 20;
    let mut lived = Vec::new();
    for round in 0..rounds {
        let mut exporter = Process::start(&db.url, 0, &env(true));
        // Up to a lease to take the exporter lease from the killed one, then a random time exporting.
        let life = Duration::from_millis(rand::random_range(lease_ms / 2..lease_ms * 3) as u64);
        tokio::time::sleep(life).await;
        exporter.kill();
        lived.push(life);
        let log = exporter.log();
        assert!(!log.contains("panicked"), "round {round}: the exporter panicked:\n{log}");
    }
    let (acked, unknown) = load.stop().await;
    // A last exporter drains the outbox.
    let mut last = Process::start(&db.url, 0, &env(true));
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let listed = tables(&client, &last.base).await;
        if listed["events"]["pending_rows"] == 0 && listed["events"]["exists"] == true {
            break;
        }
        if Instant::now() > deadline {
            let log = last.log();
            let tail: Vec<&str> = log.lines().rev().take(30).collect();
            panic!(
                "the outbox never drained: {:?}\nthe last exporter's log, newest first:\n{}",
                listed["events"],
                tail.join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Stopped before reading: the maintenance pass of its first cycle may
    // still be compacting after the rows are in, and would move the pointer
    // between the listing and the readers.
    last.terminate();
    last.assert_no_panic();
    let listed = tables(&client, &writer.base).await;
    assert_eq!(listed["events"]["pending_rows"], 0);
    let read = read_tables(&json!({
        "table": "events",
        "metadata_location": listed["events"]["metadata_location"],
        "db_file": db.file_path().map(|p| p.display().to_string()),
        "warehouse": objects.join("warehouse").display().to_string(),
        "snapshot_ids": [],
        "s3": null,
    }))
    .await;
    for reader in ["duckdb", "pyiceberg"] {
        let rows = read[reader]["rows"].as_array().unwrap();
        let ids: Vec<&str> = rows.iter().map(|r| r["event_id"].as_str().unwrap()).collect();
        let unique: BTreeSet<String> = ids.iter().map(|s| s.to_string()).collect();
        let missing = acked.difference(&unique).count();
        let extra = unique.difference(&acked).count();
        println!(
            "{reader}: {rounds} exporter kills after {}; acknowledged {} events, {} requests unknown, \
             stored {} rows, {} unique, {} missing, {} not acknowledged, {} snapshots",
            common::ledger::summarize(&lived),
            acked.len(),
            unknown,
            ids.len(),
            unique.len(),
            missing,
            extra,
            read[reader]["snapshots"].as_array().unwrap().len()
        );
        assert_eq!(ids.len(), unique.len(), "{reader}: duplicated events");
        assert_eq!(missing, 0, "{reader}: acknowledged events missing");
        // Only requests whose answer was lost may add events nobody saw acknowledged.
        assert!(extra <= unknown * 5, "{reader}: {extra} events were never sent");
    }
    assert!(acked.len() > 1000, "too little load to mean anything: {}", acked.len());
    drop(writer);
    drop(last);
}

/// An exporter that lost the lease cannot publish: the catalog's fenced
/// compare-and-set refuses it, and the outbox rows stay for the new owner.
#[tokio::test]
async fn an_exporter_whose_lease_moved_cannot_commit() {
    use iceberg::transaction::{ApplyTransactionAction, Transaction};
    use iceberg::{Catalog, NamespaceIdent, TableIdent};
    use statehouse::analytics::{singleton, LibsqlCatalog, WarehouseStorage};

    let db = TestDatabase::new();
    // A stops gracefully and gives its leases up, so B takes over at once; a
    // lease long enough that A's own export outlasts no renewal on a slow sqld.
    let a = spawn_app_with(&db, |s| {
        s.export_interval = Duration::from_millis(3_600_000);
        s.lease = Duration::from_millis(3_000);
    })
    .await;
    let ns = unique_ns("fenced");
    let post = |app: &TestApp, n: usize| {
        let url = app.url(&format!("/v1/objects/{ns}/o/events"));
        let client = app.client.clone();
        async move {
            let r = client.post(url).json(&json!({"events": [{"type": "T", "data": n}]})).send().await.unwrap();
            assert_eq!(r.status(), 200);
        }
    };
    post(&a, 1).await;
    export_now(&a).await;
    let a_instance = a.client.get(a.url("/healthz")).send().await.unwrap().headers()["statehouse-instance"]
        .to_str()
        .unwrap()
        .to_string();

    // Open the same database and store as A did, and take A's view of the events table.
    let settings = statehouse::config::Settings::for_database(&db.url).unwrap();
    let database = Arc::new(statehouse::db::Database::open(&settings.database).await.unwrap());
    let conn = database.connect().await.unwrap();
    let mut rows = conn
        .query("SELECT fence FROM objects WHERE ns = ?1 AND id = ?2", [singleton().ns, singleton().id])
        .await
        .unwrap();
    let a_fence: i64 = rows.next().await.unwrap().unwrap().get(0).unwrap();
    let metrics = Arc::new(statehouse::telemetry::Metrics::new("test", "full"));
    let resident = Arc::new(statehouse::resident::ResidentState::new(0, &metrics));
    let writer = statehouse::writer::Writer::spawn(database.clone(), resident, metrics);
    let objects = db.dir.path().join("objects");
    let store = Arc::new(object_store::local::LocalFileSystem::new_with_prefix(&objects).unwrap());
    let warehouse = WarehouseStorage::new(std::fs::canonicalize(&objects).unwrap().display().to_string(), store);
    let catalog = LibsqlCatalog::new(database.clone(), writer, &warehouse);
    let ident = TableIdent::new(NamespaceIdent::new("statehouse".into()), "events".into());
    let stale_view = catalog.load_table(&ident).await.unwrap();

    // A stops; B takes the exporter lease (fence + 1) and exports a new event.
    a.stop().await;
    let b = spawn_app_with(&db, |s| s.export_interval = Duration::from_millis(3_600_000)).await;
    post(&b, 2).await;
    post(&b, 3).await;
    let pending_before = tables(&b.client, &b.base).await["events"]["pending_rows"].as_u64().unwrap();
    assert_eq!(pending_before, 2);

    // A's late commit, under its old fence: refused, nothing moves.
    let pointer_before = catalog.pointer(&ident).await.unwrap();
    let late = catalog.fenced(statehouse::guard::HeldLease { object: singleton(), owner: a_instance, fence: a_fence });
    let tx = Transaction::new(&stale_view);
    let append =
        tx.fast_append().with_check_duplicate(false).add_data_files(vec![]).set_snapshot_properties(
            [(statehouse::analytics::OUTBOX_THROUGH.to_string(), i64::MAX.to_string())].into(),
        );
    let refused = append.apply(tx).unwrap().commit(&late).await.expect_err("a fenced-out exporter committed");
    assert_eq!(refused.kind(), iceberg::ErrorKind::CatalogCommitConflicts, "{refused}");
    println!("late commit under fence {a_fence} refused: {refused}");
    assert_eq!(catalog.pointer(&ident).await.unwrap(), pointer_before, "the pointer moved");
    let listed = tables(&b.client, &b.base).await;
    assert_eq!(listed["events"]["pending_rows"], 2, "the refused commit deleted outbox rows");

    // B, the exporter now, publishes them.
    let report = export_now(&b).await;
    assert_eq!(report["snapshots"][0]["rows"], 2, "{report}");
    let listed = tables(&b.client, &b.base).await;
    assert_eq!(listed["events"]["rows"], 3);
    b.stop().await;
}

/// The object store goes away while the exporter runs: cycles fail and back
/// off, writes go on into the outbox, and once the store is back everything
/// is exported exactly once.
#[tokio::test]
async fn an_object_store_outage_delays_the_export_and_loses_nothing() {
    let db = TestDatabase::new();
    let mut s3 = S3Server::start(Some("lake")).await;
    let settings = s3.settings("lake");
    let app = spawn_app_with(&db, |s| {
        s.objects = settings;
        s.export_interval = Duration::from_millis(200);
    })
    .await;
    wait_for_tables(&app).await;
    let ns = "outage".to_string();
    let mut expected = Expected::default();
    let post_events = |n: usize| {
        let url = app.url(&format!("/v1/objects/{ns}/o{}/events", n % 3));
        let client = app.client.clone();
        async move {
            let events = vec![json!({"type": "DuringOutage", "data": {"n": n}})];
            let r = ok_json(client.post(url).json(&json!({"events": events})).send().await.unwrap()).await;
            (r, events, n % 3)
        }
    };
    s3.stop();
    for n in 0..60 {
        let (r, events, o) = post_events(n).await;
        expected.events_from(&ns, &format!("o{o}"), r["version"].as_i64().unwrap(), &r["event_ids"], &events);
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let forced = app.client.post(app.url("/v1/admin/export")).send().await.unwrap();
    assert_eq!(forced.status(), 503, "an export with the store down must fail cleanly");
    assert_eq!(forced.headers()["content-type"], "application/problem+json");
    let metrics = app.client.get(app.url("/metrics")).send().await.unwrap().text().await.unwrap();
    let failures: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("statehouse_export_failures_total "))
        .and_then(|v| v.parse().ok())
        .unwrap();
    assert!(failures >= 1, "no failed export cycles counted:\n{metrics}");
    assert!(metrics.contains("statehouse_export_outbox_rows 60"), "{metrics}");
    s3.restart().await;
    let started = Instant::now();
    let deadline = started + Duration::from_secs(60);
    loop {
        if let Ok(r) = app.client.get(app.url("/v1/analytics/tables")).send().await {
            if r.status() == 200 {
                let body: Value = r.json().await.unwrap();
                if body["tables"][0]["pending_rows"] == 0 {
                    break;
                }
            }
        }
        assert!(Instant::now() < deadline, "the export never caught up after the store came back");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "outage: {failures} failed cycles while the store was down, 60 events waited in the outbox, \
         exported {:?} after the store came back",
        started.elapsed()
    );
    let setup = ReadSetup::on_s3(&db, &s3);
    check_readers(&app, &setup, std::slice::from_ref(&ns), &expected, &[]).await;
    app.stop().await;
}

// ------------------------------------------------------------- the Iceberg REST catalog

/// How the catalog's readers authenticate and reach the files.
struct CatalogReaders {
    /// The analyst's token; None in development mode.
    token: Option<String>,
    /// Client-side S3 settings; None for a local folder, or when the catalog vends keys.
    s3: Option<Value>,
}

fn per_namespace(expected: &Expected, table: &str, ns: &str) -> usize {
    if table == "events" {
        expected.events.values().filter(|e| e.0 == ns).count()
    } else {
        expected.changes.iter().filter(|c| c.0 == ns).count()
    }
}

/// DuckDB (`ATTACH ... TYPE iceberg`) and PyIceberg (`RestCatalog`) through
/// `/iceberg`, against what was acknowledged, now and at older snapshots.
/// `refused`: tokens the catalog must turn away (None = no token), with what
/// DuckDB and PyIceberg must each show of the reason; it returns what they said.
async fn check_catalog_readers(
    app: &TestApp,
    readers: &CatalogReaders,
    namespaces: &[String],
    expected: &Expected,
    history: &History,
    refused: &[(Option<String>, [&str; 2])],
) -> Value {
    let listed = tables(&app.client, &app.base).await;
    let mut refusals = Value::Null;
    for table in ["events", "changes"] {
        let at: Vec<i64> = history.iter().map(|(e, c, _)| if table == "events" { *e } else { *c }).collect();
        let first_table = table == "events";
        let request = json!({
            "endpoint": app.url("/iceberg"),
            "token": readers.token,
            "table": table,
            "snapshot_ids": at,
            "filter_ns": namespaces[0],
            "s3": readers.s3,
            "refused_tokens": if first_table { refused.iter().map(|(t, _)| t.clone()).collect() } else { vec![] },
            "try_commit": first_table,
        });
        let read = read_through_catalog(&request).await;
        let pyiceberg = &read["pyiceberg"];
        assert_eq!(pyiceberg["namespaces"], json!([["statehouse"]]));
        assert_eq!(pyiceberg["tables"], json!(["statehouse.changes", "statehouse.events"]));
        assert_eq!(
            pyiceberg["metadata_location"], listed[table]["metadata_location"],
            "RestCatalog loaded another metadata file than the exporter's current one"
        );
        let duckdb_tables = read["duckdb"]["tables"].as_array().unwrap();
        assert!(duckdb_tables.contains(&json!(table)), "DuckDB's attached catalog lacks {table}: {duckdb_tables:?}");
        for reader in ["duckdb", "pyiceberg"] {
            let result = &read[reader];
            let rows = &result["rows"];
            let (seen, wanted) = if table == "events" {
                (seen_events(rows, namespaces).len(), expected.events.len())
            } else {
                (seen_changes(rows, namespaces).len(), expected.changes.len())
            };
            assert_eq!(seen, wanted, "{reader} {table} through the catalog: row count");
            if table == "events" {
                assert!(seen_events(rows, namespaces) == expected.events, "{reader}: events differ");
            } else {
                assert!(seen_changes(rows, namespaces) == expected.changes, "{reader}: changes differ");
            }
            assert_eq!(result["count"], json!(wanted), "{reader} {table}: count(*)");
            let in_ns = per_namespace(expected, table, &namespaces[0]);
            assert!(in_ns > 0);
            assert_eq!(result["filtered_count"], json!(in_ns), "{reader} {table}: rows of one namespace");
            for (i, (events_at, changes_at, then)) in history.iter().enumerate() {
                let id = if table == "events" { events_at } else { changes_at };
                let old = &result["at"][id.to_string()];
                if table == "events" {
                    assert!(seen_events(old, namespaces) == then.events, "{reader}: events at snapshot {i} ({id})");
                } else {
                    assert!(seen_changes(old, namespaces) == then.changes, "{reader}: changes at snapshot {i} ({id})");
                }
            }
            println!(
                "{reader} through the REST catalog, {table}: {wanted} rows, {in_ns} in one namespace, \
                 time travel to {} older snapshots checked",
                history.len()
            );
        }
        assert_eq!(read["duckdb"]["rows"], read["pyiceberg"]["rows"], "{table}: DuckDB and PyIceberg disagree");
        if first_table {
            refusals = read["refused"].clone();
        }
    }
    println!("refusals as the clients show them: {refusals}");
    for (i, (token, reasons)) in refused.iter().enumerate() {
        for (client, reason) in ["duckdb_attach", "pyiceberg_load"].into_iter().zip(reasons) {
            let said = refusals[client][i]
                .as_str()
                .unwrap_or_else(|| panic!("{client} with token {token:?} was let in: {refusals}"));
            assert!(said.contains(reason), "{client} with token {token:?}: the error does not say {reason:?}: {said}");
        }
    }
    // RestCatalog refuses by itself: the catalog's config lists no write endpoint
    // (a client that tries anyway gets 406, checked by hand below).
    let commit = refusals["pyiceberg_commit"].as_str().expect("a commit through RestCatalog was accepted");
    assert!(commit.contains("does not support endpoint: POST"), "the refused commit does not say why: {commit}");
    let after = tables(&app.client, &app.base).await;
    assert_eq!(after["events"]["metadata_location"], listed["events"]["metadata_location"], "a refused commit moved");
    refusals
}

/// A client that presents `secret` on every request.
fn client_with_token(secret: &str) -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(reqwest::header::AUTHORIZATION, format!("Bearer {secret}").parse().unwrap());
    reqwest::Client::builder().default_headers(headers).build().unwrap()
}

#[tokio::test]
async fn the_iceberg_rest_catalog_serves_duckdb_and_pyiceberg_exactly_the_acknowledged_rows() {
    let db = TestDatabase::new();
    let app_token = token("app", "*", "read,write,admin");
    let analyst = token("analyst", "*", "analytics");
    let writer = token("writer", "*", "read,write");
    let mut app = spawn_app_with(&db, |s| {
        s.export_interval = Duration::from_millis(3_600_000);
        with_tokens(s, &[&app_token, &analyst, &writer]);
    })
    .await;
    app.client = client_with_token(&app_token.secret);
    let namespaces: Vec<String> = (0..3).map(|i| unique_ns(&format!("rest{i}"))).collect();
    let (expected, history) = export_rounds(&app, &namespaces, 10, 3).await;
    let readers = CatalogReaders { token: Some(analyst.secret.clone()), s3: None };
    let refused = [
        // (PyIceberg without a token sends `Bearer None`.)
        (None, ["Unauthorized_401", "NotAuthorizedException"]),
        (
            Some("sh_not-a-token".to_string()),
            ["Unauthorized_401", "NotAuthorizedException: the bearer token is not known"],
        ),
        (Some(writer.secret.clone()), ["Forbidden_403", "ForbiddenException: \"writer\" is not granted analytics"]),
    ];
    check_catalog_readers(&app, &readers, &namespaces, &expected, &history, &refused).await;

    // The protocol, by hand: status codes, error model, ETag, HEAD, read-only writes.
    let analyst_client = client_with_token(&analyst.secret);
    let catalog = |path: &str| app.url(&format!("/iceberg/v1{path}"));
    let error =
        |body: &Value| (body["error"]["code"].as_u64().unwrap(), body["error"]["type"].as_str().unwrap().to_string());
    let config: Value =
        ok_json(analyst_client.get(catalog("/config?warehouse=statehouse")).send().await.unwrap()).await;
    assert_eq!(config["overrides"]["prefix"], "statehouse");
    let wrong = analyst_client.get(catalog("/config?warehouse=lake")).send().await.unwrap();
    assert_eq!(wrong.status(), 400);
    assert_eq!(error(&wrong.json().await.unwrap()), (400, "BadRequestException".into()));
    let table = catalog("/statehouse/namespaces/statehouse/tables/events");
    let loaded = analyst_client.get(&table).send().await.unwrap();
    let etag = loaded.headers()["etag"].to_str().unwrap().to_string();
    let loaded: Value = ok_json(loaded).await;
    assert_eq!(loaded["metadata-location"], tables(&app.client, &app.base).await["events"]["metadata_location"]);
    assert_eq!(loaded["metadata"]["format-version"], 2);
    let again = analyst_client.get(&table).header("if-none-match", &etag).send().await.unwrap();
    assert_eq!(again.status(), 304, "an unchanged table is not sent again");
    // If-None-Match compares weakly, in a list; another tag gets the table, a malformed list a 400.
    let weak = analyst_client.get(&table).header("if-none-match", format!("\"other\", W/{etag}")).send().await.unwrap();
    assert_eq!(weak.status(), 304);
    let other = analyst_client.get(&table).header("if-none-match", "\"other\"").send().await.unwrap();
    assert_eq!(other.status(), 200);
    let broken = analyst_client.get(&table).header("if-none-match", "\"unclosed").send().await.unwrap();
    assert_eq!(error(&broken.json().await.unwrap()), (400, "BadRequestException".into()));
    for (path, status, kind) in [
        ("/statehouse/namespaces/statehouse/tables/nope", 404, "NoSuchTableException"),
        ("/statehouse/namespaces/nope/tables", 404, "NoSuchNamespaceException"),
        ("/other/namespaces", 404, "NoSuchWarehouseException"),
        ("/statehouse/namespaces/statehouse/tables/events?snapshots=some", 400, "BadRequestException"),
        ("/statehouse/namespaces/statehouse/tables/events?snapshots=all&snapshots=refs", 400, "BadRequestException"),
        ("/statehouse/no-such-route", 404, "NotFoundException"),
    ] {
        let response = analyst_client.get(catalog(path)).send().await.unwrap();
        assert_eq!(response.status(), status, "{path}");
        assert_eq!(response.headers()["content-type"], "application/json", "{path}");
        assert_eq!(error(&response.json().await.unwrap()), (status as u64, kind.into()), "{path}");
    }
    for (path, status) in [
        ("/statehouse/namespaces/statehouse", 204),
        ("/statehouse/namespaces/nope", 404),
        ("/statehouse/namespaces/statehouse/tables/changes", 204),
        ("/statehouse/namespaces/statehouse/tables/nope", 404),
    ] {
        assert_eq!(analyst_client.head(catalog(path)).send().await.unwrap().status(), status, "HEAD {path}");
    }
    let refused = reqwest::Client::new().get(catalog("/config")).send().await.unwrap();
    assert_eq!(refused.status(), 401);
    assert!(refused.headers().contains_key("www-authenticate"));
    assert_eq!(error(&refused.json().await.unwrap()), (401, "NotAuthorizedException".into()));
    let forbidden = client_with_token(&writer.secret).get(catalog("/config")).send().await.unwrap();
    assert_eq!(error(&forbidden.json().await.unwrap()), (403, "ForbiddenException".into()));
    let before = tables(&app.client, &app.base).await;
    let commit = json!({"requirements": [], "updates": [{"action": "set-properties", "updates": {"x": "y"}}]});
    for (method, path) in [
        (reqwest::Method::POST, "/statehouse/namespaces/statehouse/tables/events"),
        (reqwest::Method::DELETE, "/statehouse/namespaces/statehouse/tables/events"),
        (reqwest::Method::POST, "/statehouse/namespaces/statehouse/tables"),
        (reqwest::Method::POST, "/statehouse/namespaces"),
        (reqwest::Method::POST, "/statehouse/tables/rename"),
        (reqwest::Method::POST, "/statehouse/transactions/commit"),
    ] {
        let response = analyst_client.request(method.clone(), catalog(path)).json(&commit).send().await.unwrap();
        assert_eq!(
            error(&response.json().await.unwrap()),
            (406, "UnsupportedOperationException".into()),
            "{method} {path}"
        );
    }
    let after = tables(&app.client, &app.base).await;
    for table in ["events", "changes"] {
        assert_eq!(
            after[table]["metadata_location"], before[table]["metadata_location"],
            "a refused write moved {table}"
        );
    }
    app.stop().await;
}

/// With the warehouse on S3, readers reach the files with their own keys and
/// the endpoint the catalog names; with read-only keys configured for
/// analysts, the catalog vends them and readers need nothing but the token.
#[tokio::test]
async fn the_iceberg_rest_catalog_on_s3_names_the_bucket_and_vends_only_the_readers_keys() {
    let db = TestDatabase::new();
    let s3 = S3Server::start(Some("lake")).await;
    let settings = s3.settings("lake");
    let app = spawn_app_with(&db, |s| {
        s.objects = settings.clone();
        s.export_interval = Duration::from_millis(3_600_000);
    })
    .await;
    let namespaces = vec!["resta".to_string(), "restb".to_string()];
    let (expected, history) = export_rounds(&app, &namespaces, 5, 2).await;
    let loaded: Value = ok_json(
        app.client.get(app.url("/iceberg/v1/statehouse/namespaces/statehouse/tables/events")).send().await.unwrap(),
    )
    .await;
    assert_eq!(loaded["config"]["s3.endpoint"], s3.endpoint);
    assert_eq!(loaded["config"]["s3.path-style-access"], "true");
    assert!(loaded["config"].get("s3.access-key-id").is_none(), "keys vended without being configured: {loaded}");
    assert!(!loaded.to_string().contains(common::s3::SECRET_KEY), "the server's own key was handed out");
    let own_keys = CatalogReaders {
        token: None,
        s3: Some(json!({
            "endpoint": s3.endpoint,
            "access_key_id": common::s3::READER_ACCESS_KEY,
            "secret_access_key": common::s3::READER_SECRET_KEY,
            "region": "us-east-1",
        })),
    };
    check_catalog_readers(&app, &own_keys, &namespaces, &expected, &history, &[]).await;
    app.stop().await;

    // The same tables, served by a replica that vends the analysts' keys.
    let app = spawn_app_with(&db, |s| {
        s.objects = settings;
        s.export_interval = Duration::from_millis(3_600_000);
        s.iceberg_readers.access_key_id = Some(common::s3::READER_ACCESS_KEY.into());
        s.iceberg_readers.secret_access_key = Some(common::s3::READER_SECRET_KEY.into());
    })
    .await;
    let loaded: Value = ok_json(
        app.client.get(app.url("/iceberg/v1/statehouse/namespaces/statehouse/tables/events")).send().await.unwrap(),
    )
    .await;
    assert_eq!(loaded["config"]["s3.access-key-id"], common::s3::READER_ACCESS_KEY);
    assert_eq!(loaded["storage-credentials"][0]["prefix"], "s3://lake/warehouse");
    assert!(!loaded.to_string().contains(common::s3::SECRET_KEY), "the server's own key was handed out");
    let vended = CatalogReaders { token: None, s3: None };
    check_catalog_readers(&app, &vended, &namespaces, &expected, &history, &[]).await;
    app.stop().await;
}

/// Loads while writers write and the exporter commits every 100 ms: each
/// answer names a metadata file that exists, holds what was served, and was
/// committed (it is the current pointer or in its metadata log right after).
#[tokio::test]
async fn catalog_loads_during_export_cycles_serve_only_committed_snapshots() {
    let db = TestDatabase::new();
    let app = spawn_app_with(&db, |s| s.export_interval = Duration::from_millis(100)).await;
    wait_for_tables(&app).await;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let ns = unique_ns("loads");
    let mut writers = Vec::new();
    for w in 0..4 {
        let (client, base, stop, ns) = (app.client.clone(), app.base.clone(), stop.clone(), ns.clone());
        writers.push(tokio::spawn(async move {
            let mut acknowledged = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let url = format!("{base}/v1/objects/{ns}/w{w}/events");
                let body = json!({"events": [{"type": "Tick", "data": {"n": acknowledged}}]});
                if client.post(url).json(&body).send().await.unwrap().status().is_success() {
                    acknowledged += 1;
                }
            }
            acknowledged
        }));
    }
    let mut loading = Duration::ZERO;
    let mut sequence = BTreeMap::<&str, i64>::new();
    let loads = 200;
    for i in 0..loads {
        let table = if i % 2 == 0 { "events" } else { "changes" };
        let url = app.url(&format!("/iceberg/v1/statehouse/namespaces/statehouse/tables/{table}"));
        let started = Instant::now();
        let served: Value = ok_json(app.client.get(&url).send().await.unwrap()).await;
        loading += started.elapsed();
        let location = served["metadata-location"].as_str().unwrap();
        let on_disk: Value = serde_json::from_slice(&std::fs::read(location).expect("the served metadata file exists"))
            .expect("the served metadata file is whole");
        let metadata = &served["metadata"];
        for field in ["current-snapshot-id", "last-sequence-number", "snapshot-log", "refs"] {
            assert_eq!(metadata[field], on_disk[field], "load {i}: the served {field} is not the file's");
        }
        // (A snapshot list's order carries no meaning.)
        let by_id = |m: &Value| {
            let snapshots = m["snapshots"].as_array().cloned().unwrap_or_default();
            snapshots.into_iter().map(|s| (s["snapshot-id"].as_i64().unwrap(), s)).collect::<BTreeMap<_, _>>()
        };
        assert_eq!(by_id(metadata), by_id(&on_disk), "load {i}: the served snapshots are not the file's");
        if let Some(current) = metadata["current-snapshot-id"].as_i64().filter(|id| *id != -1) {
            let ids: Vec<i64> =
                metadata["snapshots"].as_array().unwrap().iter().map(|s| s["snapshot-id"].as_i64().unwrap()).collect();
            assert!(ids.contains(&current), "load {i}: the current snapshot {current} is not among {ids:?}");
        }
        let last = metadata["last-sequence-number"].as_i64().unwrap();
        let previous = sequence.insert(table, last).unwrap_or(0);
        assert!(last >= previous, "load {i}: {table} went back from sequence {previous} to {last}");
        let now: Value = ok_json(app.client.get(&url).send().await.unwrap()).await;
        let committed = now["metadata-location"] == served["metadata-location"]
            || now["metadata"]["metadata-log"]
                .as_array()
                .unwrap()
                .iter()
                .any(|entry| entry["metadata-file"] == served["metadata-location"]);
        assert!(committed, "load {i}: {location} was never a committed pointer of {table}");
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut acknowledged = 0;
    for writer in writers {
        acknowledged += writer.await.unwrap();
    }
    let exported = tables(&app.client, &app.base).await["events"]["current_snapshot_id"].clone();
    println!(
        "catalog under export ({}): {loads} loads, each committed, {:.0} loads/s (mean {:.2} ms) while {acknowledged} \
         events were written and exported every 100 ms (now at snapshot {exported})",
        db.mode(),
        loads as f64 / loading.as_secs_f64(),
        loading.as_secs_f64() * 1000.0 / loads as f64
    );
    assert!(sequence["events"] > 1, "the exporter committed nothing during the loads");
    app.stop().await;
}

/// An object's history lists every version, newest first, whether its
/// changes are already in the `changes` table or still in the outbox, the
/// same before and after they are exported, page by page.
#[tokio::test]
async fn history_lists_every_version_from_the_tables_and_the_outbox_alike() {
    let db = TestDatabase::new();
    let app = spawn_app_with(&db, |s| s.export_interval = Duration::from_millis(3_600_000)).await;
    let c = &app.client;
    let ns = unique_ns("history");
    let object = app.url(&format!("/v1/objects/{ns}/o"));
    let put = |key: &str, value: &str| c.put(format!("{object}/kv/{key}")).body(value.to_string()).send();
    ok_json(put("k1", "one").await.unwrap()).await;
    ok_json(put("k2", "two").await.unwrap()).await;
    let batch = json!({"ops": [{"op": "put", "key": "a", "value": 1}, {"op": "delete", "key": "k1"}]});
    ok_json(c.post(format!("{object}/batch")).json(&batch).send().await.unwrap()).await;
    let exported = export_now(&app).await;
    assert!(snapshot_of(&exported, "changes").is_some(), "{exported}");
    // These stay in the outbox: the exporter's interval is an hour.
    ok_json(put("k3", "three").await.unwrap()).await;
    ok_json(c.delete(&object).send().await.unwrap()).await;
    let listed = tables(c, &app.base).await;
    assert_eq!(listed["changes"]["rows"], 4, "{:?}", listed["changes"]);
    assert_eq!(listed["changes"]["pending_rows"], 2, "{:?}", listed["changes"]);

    // Each version as "version: op key, op key".
    let expected = ["5: delete_all", "4: put k3", "3: put a, delete k1", "2: put k2", "1: put k1"];
    let instance = c.get(app.url("/healthz")).send().await.unwrap().headers()["statehouse-instance"].clone();
    let check = |versions: &[Value]| {
        let seen: Vec<String> = versions
            .iter()
            .map(|v| {
                assert_eq!(v["instance"], instance.to_str().unwrap(), "{v}");
                assert!(v["fence"].as_i64().unwrap() >= 1, "{v}");
                assert!(v["committed_at"].as_str().unwrap().ends_with('Z'), "{v}");
                let changes: Vec<String> = v["changes"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|c| {
                        let op = c["op"].as_str().unwrap();
                        c["key"].as_str().map_or(op.to_string(), |key| format!("{op} {key}"))
                    })
                    .collect();
                format!("{}: {}", v["version"], changes.join(", "))
            })
            .collect();
        assert_eq!(seen, expected);
    };
    let (split, pages) = read_history(c, &object, 2).await;
    assert_eq!(pages, 3);
    check(&split);
    let (whole, _) = read_history(c, &object, 100).await;
    check(&whole);

    // Exported now, and the outbox rows may linger until they are forgotten:
    // every version once, exactly as before.
    export_now(&app).await;
    let (exported, _) = read_history(c, &object, 100).await;
    check(&exported);
    assert_eq!(exported, whole);

    for bad in ["limit=0", "limit=1001", "cursor=abc", "cursor=0", "cursor=-3"] {
        let r = c.get(format!("{object}/history?{bad}")).send().await.unwrap();
        assert_eq!(r.status(), 400, "{bad}");
        assert_eq!(r.headers()["content-type"], "application/problem+json", "{bad}");
    }
    let never = c.get(app.url(&format!("/v1/objects/{ns}/never/history"))).send().await.unwrap();
    assert_eq!(never.status(), 404);
    app.stop().await;
}

/// Every version of an object's history, `page` at a time, and the pages it took.
async fn read_history(c: &reqwest::Client, object: &str, page: usize) -> (Vec<Value>, usize) {
    let mut versions = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let mut url = format!("{object}/history?limit={page}");
        if let Some(cursor) = &cursor {
            url.push_str(&format!("&cursor={cursor}"));
        }
        let body = ok_json(c.get(url).send().await.unwrap()).await;
        pages += 1;
        versions.extend(body["versions"].as_array().unwrap().iter().cloned());
        match body["cursor"].as_str() {
            Some(next) => cursor = Some(next.to_string()),
            None => break,
        }
    }
    (versions, pages)
}
