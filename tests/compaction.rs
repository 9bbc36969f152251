//! Compaction of the exported Iceberg tables, checked from the outside: after
//! 200 small export cycles the small files of each partition become one and
//! the manifests few, in one `replace` snapshot, and DuckDB and PyIceberg
//! (tests/iceberg/read.py) read the same rows as before, now and at the
//! snapshots before it; the exporter killed while compacting loses and
//! duplicates nothing; a compaction fenced out by a new exporter, or computed
//! on a snapshot that is no longer current, commits nothing.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::iceberg::{read_tables, tables};
use common::{spawn_app_with, unique_ns, EventLoad, EventLoadShape, Process, TestApp, TestDatabase};
use iceberg::spec::{ManifestStatus, Operation};
use iceberg::table::Table;
use iceberg::{NamespaceIdent, TableIdent};
use serde_json::{json, Value};
use statehouse::analytics::{compact, singleton, CompactionPolicy, LibsqlCatalog, WarehouseStorage, OUTBOX_THROUGH};
use statehouse::guard::HeldLease;

const HOUR: Duration = Duration::from_secs(3600);

async fn ok_json(response: reqwest::Response) -> Value {
    let status = response.status();
    let body = response.text().await.unwrap();
    assert!(status.is_success(), "{status}: {body}");
    serde_json::from_str(&body).unwrap()
}

async fn export_now(app: &TestApp) -> Value {
    ok_json(app.client.post(app.url("/v1/admin/export")).send().await.unwrap()).await
}

/// The snapshot a cycle committed last to `table`.
fn snapshot_of(report: &Value, table: &str) -> i64 {
    report["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["table"] == format!("statehouse.{table}"))
        .map(|s| s["snapshot_id"].as_i64().unwrap())
        .next_back()
        .unwrap_or_else(|| panic!("no {table} snapshot in {report}"))
}

async fn wait_for_tables(client: &reqwest::Client, base: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let listed = tables(client, base).await;
        if listed["events"]["exists"] == true && listed["changes"]["exists"] == true {
            return;
        }
        assert!(Instant::now() < deadline, "the exporter never created the tables: {listed:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The catalog and the warehouse as the server keeps them, opened beside it
/// (as a stale exporter would have them).
struct Warehouse {
    database: Arc<statehouse::db::Database>,
    catalog: LibsqlCatalog,
}

impl Warehouse {
    async fn open(db_url: &str, objects: &Path) -> Warehouse {
        let settings = statehouse::config::Settings::for_database(db_url).unwrap();
        let database = Arc::new(statehouse::db::Database::open(&settings.database).await.unwrap());
        let metrics = Arc::new(statehouse::telemetry::Metrics::new("test", "full"));
        let resident = Arc::new(statehouse::resident::ResidentState::new(0, &metrics));
        let writer = statehouse::writer::Writer::spawn(database.clone(), resident, metrics);
        let store = Arc::new(object_store::local::LocalFileSystem::new_with_prefix(objects).unwrap());
        let warehouse = WarehouseStorage::new(std::fs::canonicalize(objects).unwrap().display().to_string(), store);
        let catalog = LibsqlCatalog::new(database.clone(), writer, &warehouse);
        Warehouse { database, catalog }
    }

    async fn table(&self, name: &str) -> Table {
        self.catalog.load_existing(&ident(name)).await.unwrap().expect("the table exists")
    }

    /// The exporter lease as it is now (owner and fence).
    async fn lease(&self) -> HeldLease {
        let conn = self.database.connect().await.unwrap();
        let mut rows = conn
            .query("SELECT owner, fence FROM objects WHERE ns = ?1 AND id = ?2", [singleton().ns, singleton().id])
            .await
            .unwrap();
        let row = rows.next().await.unwrap().expect("the exporter lease row");
        HeldLease { object: singleton(), owner: row.get(0).unwrap(), fence: row.get(1).unwrap() }
    }
}

fn ident(name: &str) -> TableIdent {
    TableIdent::new(NamespaceIdent::new("statehouse".into()), name.into())
}

/// What one snapshot of a table is made of.
#[derive(Debug, Default)]
struct Layout {
    manifests: usize,
    /// Live data files per partition.
    files: BTreeMap<String, usize>,
    rows: u64,
    /// (status, data sequence number) of every manifest entry.
    entries: Vec<(ManifestStatus, i64)>,
    /// The live data files.
    paths: Vec<String>,
}

impl Layout {
    fn live_files(&self) -> usize {
        self.files.values().sum()
    }
}

async fn layout(table: &Table, snapshot_id: i64) -> Layout {
    let snapshot = table.metadata().snapshot_by_id(snapshot_id).expect("the snapshot is kept");
    let list = table.manifest_list_reader(snapshot).load().await.unwrap();
    let mut layout = Layout { manifests: list.entries().len(), ..Layout::default() };
    for manifest_file in list.entries() {
        let manifest = manifest_file.load_manifest(table.file_io()).await.unwrap();
        for entry in manifest.entries() {
            layout.entries.push((entry.status(), entry.sequence_number().expect("a sequence number")));
            if entry.is_alive() {
                *layout.files.entry(format!("{:?}", entry.data_file().partition())).or_default() += 1;
                layout.rows += entry.record_count();
                layout.paths.push(entry.file_path().to_string());
            }
        }
    }
    layout
}

/// Both readers over every column of `table`: each scan as {count, seqs, digest}.
async fn read_digests(
    base_info: &HashMap<String, Value>,
    db: &TestDatabase,
    warehouse: &Value,
    table: &str,
    at: &[i64],
) -> Value {
    read_tables(&json!({
        "table": table,
        "metadata_location": base_info[table]["metadata_location"],
        "db_file": db.file_path().map(|p| p.display().to_string()),
        "warehouse": warehouse,
        "snapshot_ids": at,
        "s3": null,
        "digest": true,
    }))
    .await
}

/// The readers agree with each other and hold `count` distinct rows; returns the digest.
fn agreed(read: &Value, scan: impl Fn(&Value) -> &Value, count: usize, what: &str) -> String {
    let (duckdb, pyiceberg) = (scan(&read["duckdb"]), scan(&read["pyiceberg"]));
    for (reader, seen) in [("duckdb", duckdb), ("pyiceberg", pyiceberg)] {
        let seqs: Vec<i64> = seen["seqs"].as_array().unwrap().iter().map(|s| s.as_i64().unwrap()).collect();
        let unique: BTreeSet<i64> = seqs.iter().copied().collect();
        assert_eq!(seqs.len(), unique.len(), "{reader} {what}: a row read twice");
        assert_eq!(seqs.len(), count, "{reader} {what}: row count");
    }
    assert_eq!(duckdb, pyiceberg, "{what}: DuckDB and PyIceberg disagree");
    duckdb["digest"].as_str().unwrap().to_string()
}

/// Waits for the exporter's first maintenance pass after start (its loop runs
/// the first cycle at once) to reach `done`, given the tables and `/metrics`.
/// Polled rather than run by `POST /v1/admin/export`: a pass over 200
/// snapshots in a debug build can outlast a request's timeout.
async fn maintained(app: &TestApp, done: impl Fn(&HashMap<String, Value>, &str) -> bool) -> HashMap<String, Value> {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let listed = tables(&app.client, &app.base).await;
        let metrics = app.client.get(app.url("/metrics")).send().await.unwrap().text().await.unwrap();
        if done(&listed, &metrics) {
            return listed;
        }
        assert!(Instant::now() < deadline, "the maintenance pass never finished: {listed:?}\n{metrics}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn orphans_deleted(metrics: &str) -> u64 {
    metric(metrics, "statehouse_export_orphan_files_deleted_total", &[]).unwrap_or(0.0) as u64
}

fn metric(metrics: &str, name: &str, labels: &[&str]) -> Option<f64> {
    metrics
        .lines()
        .filter(|l| l.starts_with(name) && labels.iter().all(|label| l.contains(label)))
        .find_map(|l| l.rsplit(' ').next().and_then(|v| v.parse().ok()))
}

#[tokio::test]
async fn two_hundred_small_exports_compact_into_one_file_per_partition_and_read_the_same() {
    let db = TestDatabase::new();
    let objects = db.dir.path().join("objects");
    let cycles = 200;
    let app = spawn_app_with(&db, |s| {
        s.export_interval = HOUR;
        s.compaction_enabled = false;
    })
    .await;
    wait_for_tables(&app.client, &app.base).await;
    let namespaces = [unique_ns("compact-a"), unique_ns("compact-b")];
    let started = Instant::now();
    let mut mid = (0, 0);
    let mut last = (0, 0);
    for round in 0..cycles {
        for ns in &namespaces {
            let object = app.url(&format!("/v1/objects/{ns}/o{}", round % 3));
            let events = json!({"events": [
                {"type": "Opened", "data": {"round": round, "s": "ü\"'\\"}},
                {"type": "Closed", "data": null},
            ]});
            ok_json(app.client.post(format!("{object}/events")).json(&events).send().await.unwrap()).await;
            let value = format!("value {round} of {ns}");
            ok_json(app.client.put(format!("{object}/kv/k{round}")).body(value).send().await.unwrap()).await;
        }
        let report = export_now(&app).await;
        last = (snapshot_of(&report, "events"), snapshot_of(&report, "changes"));
        if round == cycles / 2 {
            mid = last;
        }
    }
    let exporting = started.elapsed();
    let (events_rows, changes_rows) = (cycles * 4, cycles * 2);
    let (mid_events, mid_changes) = ((cycles / 2 + 1) * 4, (cycles / 2 + 1) * 2);
    let before = tables(&app.client, &app.base).await;
    let body: Value = app.client.get(app.url("/v1/analytics/tables")).send().await.unwrap().json().await.unwrap();
    let warehouse_location = body["warehouse"].clone();
    for (table, rows) in [("events", events_rows), ("changes", changes_rows)] {
        assert_eq!(before[table]["rows"], rows, "{table}: {}", before[table]);
        assert_eq!(before[table]["manifests"], cycles, "{table}: one manifest per cycle: {}", before[table]);
        assert!(before[table]["last_compaction"].is_null(), "{table} compacted while compaction was off");
    }
    let started = Instant::now();
    let events_before = read_digests(&before, &db, &warehouse_location, "events", &[mid.0]).await;
    let changes_before = read_digests(&before, &db, &warehouse_location, "changes", &[mid.1]).await;
    let reading_before = started.elapsed();
    let digests_before = [
        agreed(&events_before, |r| &r["rows"], events_rows, "events before"),
        agreed(&events_before, |r| &r["at"][mid.0.to_string()], mid_events, "events at the middle snapshot"),
        agreed(&changes_before, |r| &r["rows"], changes_rows, "changes before"),
        agreed(&changes_before, |r| &r["at"][mid.1.to_string()], mid_changes, "changes at the middle snapshot"),
    ];
    app.stop().await;

    // The same database and warehouse, compaction on (default thresholds): the
    // first cycle's maintenance pass compacts, then removes unreferenced files
    // at once (no grace): the replaced files stay, the older snapshots read them.
    let app = spawn_app_with(&db, |s| {
        s.export_interval = HOUR;
        s.orphan_grace = Duration::ZERO;
    })
    .await;
    let started = Instant::now();
    let after = maintained(&app, |after, metrics| {
        orphans_deleted(metrics) > 0 && after.values().all(|t| t["last_compaction"].is_object())
    })
    .await;
    let compacting = started.elapsed();
    let warehouse = Warehouse::open(&db.url, &objects).await;
    let (mut replaced, mut compacted_files) = (Vec::new(), Vec::new());
    for (table, (last_id, rows)) in [("events", (last.0, events_rows)), ("changes", (last.1, changes_rows))] {
        let info = &after[table];
        let compaction = &info["last_compaction"];
        assert!(compaction.is_object(), "{table} was not compacted: {info}");
        let loaded = warehouse.table(table).await;
        let current = loaded.metadata().current_snapshot().unwrap();
        let pre = loaded.metadata().snapshot_by_id(last_id).expect("the pre-compaction snapshot is kept");
        let (old, new) = (layout(&loaded, last_id).await, layout(&loaded, current.snapshot_id()).await);
        println!(
            "{table}: {} rows; before: {} data files in {} partitions ({} manifests); after: {} data files \
             ({} manifests, {} entries marked deleted)",
            rows,
            old.live_files(),
            old.files.len(),
            old.manifests,
            new.live_files(),
            new.manifests,
            new.entries.iter().filter(|(s, _)| *s == ManifestStatus::Deleted).count()
        );
        assert!(old.files.values().all(|n| *n >= cycles / 2), "{table}: the cycles' small files: {:?}", old.files);
        assert_eq!(old.manifests, cycles);
        assert_eq!(new.files.keys().collect::<Vec<_>>(), old.files.keys().collect::<Vec<_>>(), "{table}: partitions");
        assert!(new.files.values().all(|n| *n == 1), "{table}: one file per partition after: {:?}", new.files);
        assert_eq!(new.manifests, 2, "{table}: the kept/replaced entries and the added files");
        assert_eq!((old.rows, new.rows), (rows as u64, rows as u64), "{table}: rows in the manifests");
        let gone: Vec<_> = old.paths.iter().filter(|p| !Path::new(p).is_file()).collect();
        assert!(gone.is_empty(), "{table}: files a kept snapshot reads were deleted: {gone:?}");
        replaced.extend(old.paths.clone());
        compacted_files.extend(new.paths.clone());

        // One replace snapshot on top of the last export, counting what it did.
        let summary = current.summary();
        let get = |key: &str| summary.additional_properties.get(key).map(|v| v.parse::<u64>().unwrap());
        assert_eq!(summary.operation, Operation::Replace);
        assert_eq!(current.parent_snapshot_id(), Some(last_id));
        assert_eq!(current.sequence_number(), pre.sequence_number() + 1);
        assert_eq!(
            summary.additional_properties.get(OUTBOX_THROUGH),
            pre.summary().additional_properties.get(OUTBOX_THROUGH),
            "{table}: the outbox seq is carried unchanged"
        );
        assert_eq!(get("deleted-data-files"), Some(old.live_files() as u64));
        assert_eq!(get("added-data-files"), Some(new.live_files() as u64));
        assert_eq!(get("deleted-records"), Some(rows as u64));
        assert_eq!(get("added-records"), Some(rows as u64));
        assert_eq!(get("total-records"), Some(rows as u64));
        assert_eq!(get("total-data-files"), Some(new.live_files() as u64));
        let pre_total = |key: &str| pre.summary().additional_properties[key].parse::<u64>().unwrap();
        assert_eq!(
            get("total-files-size").unwrap(),
            pre_total("total-files-size") - get("removed-files-size").unwrap() + get("added-files-size").unwrap()
        );
        // Replaced entries keep their own sequence numbers; added ones take the new snapshot's.
        for (status, seq) in &new.entries {
            match status {
                ManifestStatus::Deleted => assert!(*seq >= 1 && *seq <= pre.sequence_number(), "{table}: {seq}"),
                ManifestStatus::Added => assert_eq!(*seq, current.sequence_number()),
                ManifestStatus::Existing => panic!("{table}: every file was small, none kept"),
            }
        }
        assert_eq!(compaction["snapshot_id"], current.snapshot_id());
        assert_eq!(compaction["data_files_before"], old.live_files());
        assert_eq!(compaction["data_files_after"], new.live_files());
        assert_eq!(compaction["manifests_before"], cycles);
        assert_eq!(compaction["manifests_after"], 2);
        assert_eq!(info["data_files"], new.live_files());
        assert_eq!(info["manifests"], 2);
        assert_eq!(info["snapshots"], cycles + 1, "{table}: no snapshot expired");
    }
    let metrics = app.client.get(app.url("/metrics")).send().await.unwrap().text().await.unwrap();
    let events_files = after["events"]["data_files"].as_f64().unwrap();
    assert_eq!(
        metric(&metrics, "statehouse_iceberg_data_files", &["table=\"events\""]),
        Some(events_files),
        "{metrics}"
    );
    assert_eq!(metric(&metrics, "statehouse_iceberg_manifests", &["table=\"changes\""]), Some(2.0), "{metrics}");
    assert_eq!(metric(&metrics, "statehouse_compaction_runs_total", &["table=\"events\""]), Some(1.0), "{metrics}");
    let before_files = after["events"]["last_compaction"]["data_files_before"].as_f64();
    let stage = |s: &str| metric(&metrics, "statehouse_compaction_last_data_files", &["table=\"events\"", s]);
    assert_eq!(stage("stage=\"before\""), before_files, "{metrics}");
    assert_eq!(stage("stage=\"after\""), Some(events_files), "{metrics}");

    // Both readers: the same rows now, and at the snapshots before compaction.
    let started = Instant::now();
    let events_after = read_digests(&after, &db, &warehouse_location, "events", &[mid.0, last.0]).await;
    let changes_after = read_digests(&after, &db, &warehouse_location, "changes", &[mid.1, last.1]).await;
    let reading_after = started.elapsed();
    let digests_after = [
        agreed(&events_after, |r| &r["rows"], events_rows, "events after"),
        agreed(&events_after, |r| &r["at"][mid.0.to_string()], mid_events, "events at the middle snapshot, after"),
        agreed(&changes_after, |r| &r["rows"], changes_rows, "changes after"),
        agreed(&changes_after, |r| &r["at"][mid.1.to_string()], mid_changes, "changes at the middle snapshot, after"),
    ];
    assert_eq!(digests_after, digests_before, "the rows changed with compaction");
    let last_events = agreed(&events_after, |r| &r["at"][last.0.to_string()], events_rows, "events before compaction");
    let last_changes = agreed(&changes_after, |r| &r["at"][last.1.to_string()], changes_rows, "changes before");
    assert_eq!((last_events, last_changes), (digests_before[0].clone(), digests_before[2].clone()));

    // Exporting goes on from where the replaced snapshot ended: each new row once.
    for ns in &namespaces {
        let events = json!({"events": [{"type": "Opened", "data": "after"}, {"type": "Closed", "data": "after"}]});
        let url = app.url(&format!("/v1/objects/{ns}/o0/events"));
        ok_json(app.client.post(url).json(&events).send().await.unwrap()).await;
    }
    let report = export_now(&app).await;
    assert_eq!(report["snapshots"].as_array().unwrap().len(), 1, "{report}");
    let now = tables(&app.client, &app.base).await;
    assert_eq!(now["events"]["rows"], events_rows + 4);
    assert_eq!(now["events"]["pending_rows"], 0);
    let read = read_digests(&now, &db, &warehouse_location, "events", &[]).await;
    agreed(&read, |r| &r["rows"], events_rows + 4, "events exported after compaction");
    app.stop().await;

    // Once the snapshots before the compaction expire, the files it replaced
    // are deleted; the rows are still all there.
    let app = spawn_app_with(&db, |s| {
        s.export_interval = HOUR;
        s.orphan_grace = Duration::ZERO;
        s.export_snapshot_max_age = Duration::ZERO;
        s.export_min_snapshots = 1;
    })
    .await;
    let expired =
        maintained(&app, |now, metrics| orphans_deleted(metrics) > 0 && now.values().all(|t| t["snapshots"] == 1))
            .await;
    let metrics = app.client.get(app.url("/metrics")).send().await.unwrap().text().await.unwrap();
    let deleted = orphans_deleted(&metrics);
    assert!(deleted >= replaced.len() as u64, "{deleted} files deleted, {} replaced", replaced.len());
    let kept: Vec<_> = replaced.iter().filter(|p| Path::new(p).exists()).collect();
    assert!(kept.is_empty(), "replaced files outlived every snapshot that read them: {kept:?}");
    let missing: Vec<_> = compacted_files.iter().filter(|p| !Path::new(p).is_file()).collect();
    assert!(missing.is_empty(), "the compacted files were deleted: {missing:?}");
    let now = tables(&app.client, &app.base).await;
    // The append after the compaction carried its DELETED entries on; this
    // pass merged them away (events), the table with no append kept them.
    assert_eq!((now["events"]["manifests"].as_u64(), now["changes"]["manifests"].as_u64()), (Some(1), Some(2)));
    assert_eq!(now["events"]["last_compaction"]["files_rewritten"], 0, "{}", now["events"]);
    let events = read_digests(&now, &db, &warehouse_location, "events", &[]).await;
    agreed(&events, |r| &r["rows"], events_rows + 4, "events once the replaced files are gone");
    let changes = read_digests(&now, &db, &warehouse_location, "changes", &[]).await;
    let changes_now = agreed(&changes, |r| &r["rows"], changes_rows, "changes once the replaced files are gone");
    assert_eq!(changes_now, digests_before[2], "the changes differ once the replaced files are gone");
    println!(
        "{cycles} export cycles in {exporting:?}; compaction (first cycle after restart) {compacting:?}; \
         both readers, both tables with time travel: {reading_before:?} before, {reading_after:?} after; \
         {} replaced files deleted once the older snapshots expired ({deleted} files in all, {} snapshots left)",
        replaced.len(),
        expired["events"]["snapshots"]
    );
    app.stop().await;
}

/// SIGKILL the exporter while it compacts (just after it logs that it
/// started, at a random point within about one compaction's time), 10
/// rounds, while writes go on through another replica and snapshots expire
/// and orphans are removed within a second: every acknowledged event is in
/// the table once, and the pointer always names a metadata file that exists.
#[tokio::test]
async fn killing_the_exporter_while_it_compacts_loses_and_duplicates_nothing() {
    let db = TestDatabase::new();
    let objects = db.dir.path().join("objects");
    let lease_ms = 600;
    let env = |export: bool| {
        vec![
            ("STATEHOUSE_OBJECTS_DIR", objects.display().to_string()),
            ("STATEHOUSE_LEASE_MS", lease_ms.to_string()),
            ("STATEHOUSE_EXPORT_ENABLED", export.to_string()),
            ("STATEHOUSE_EXPORT_INTERVAL_MS", "100".to_string()),
            ("STATEHOUSE_EXPORT_BATCH_ROWS", "150".to_string()),
            // A maintenance pass every 300 ms that compacts whatever the cycles since added ...
            ("STATEHOUSE_SWEEP_INTERVAL_MS", "300".to_string()),
            ("STATEHOUSE_COMPACTION_MIN_FILES", "2".to_string()),
            ("STATEHOUSE_COMPACTION_MAX_MANIFESTS", "2".to_string()),
            // ... and soon expires what it replaced and deletes what no snapshot reads.
            ("STATEHOUSE_EXPORT_SNAPSHOT_MAX_AGE_MS", "1000".to_string()),
            ("STATEHOUSE_EXPORT_MIN_SNAPSHOTS", "3".to_string()),
            ("STATEHOUSE_ORPHAN_GRACE_MS", "500".to_string()),
        ]
    };
    let writer = Process::start(&db.url, 0, &env(false));
    let ns = unique_ns("compact-kill");
    let client = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().unwrap();
    let load = EventLoad::start(
        &writer.base,
        &ns,
        EventLoadShape {
            writers: 2,
            events_per_post: 4,
            objects: 5,
            types: &["T0", "T1"],
            pause: Duration::from_millis(3),
        },
    );
    let rounds = 10;
    let (mut mid_compaction, mut committed, mut orphan_passes, mut durations) = (0, 0, 0, Vec::<u64>::new());
    for round in 0..rounds {
        let mut exporter = Process::start(&db.url, 0, &env(true));
        // Wait for this exporter to start its first or second compaction.
        let nth = rand::random_range(1..=2);
        let deadline = Instant::now() + Duration::from_secs(30);
        while exporter.log().matches("compacting an Iceberg table").count() < nth {
            assert!(Instant::now() < deadline, "round {round}: no compaction started:\n{}", exporter.log());
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        // Then a random point within about one compaction's time.
        let typical = durations.iter().copied().max().unwrap_or(40).max(2);
        tokio::time::sleep(Duration::from_millis(rand::random_range(0..=typical))).await;
        exporter.kill();
        let log = exporter.log();
        assert!(!log.contains("panicked"), "round {round}: the exporter panicked:\n{log}");
        let started = log.matches("compacting an Iceberg table").count();
        let finished = log.matches("compacted an Iceberg table").count() + log.matches("compaction failed").count();
        mid_compaction += usize::from(started > finished);
        committed += log.matches("compacted an Iceberg table").count();
        orphan_passes += log.matches("deleted unreferenced warehouse files").count();
        for line in log.lines().filter(|l| l.contains("compacted an Iceberg table")) {
            let event: Value = serde_json::from_str(line).unwrap();
            durations.push(event["ms"].as_u64().or_else(|| event["fields"]["ms"].as_u64()).unwrap_or(0));
        }
        // The pointer names a metadata file that exists, and the table loads.
        let listed = tables(&client, &writer.base).await;
        for table in ["events", "changes"] {
            let location = listed[table]["metadata_location"].as_str().unwrap();
            assert!(Path::new(location).is_file(), "round {round}: {table} points at a missing {location}");
        }
    }
    let (acked, unknown) = load.stop().await;
    let mut last = Process::start(&db.url, 0, &env(true));
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let listed = tables(&client, &last.base).await;
        if listed["events"]["pending_rows"] == 0 && listed["events"]["last_compaction"].is_object() {
            break;
        }
        assert!(Instant::now() < deadline, "the outbox never drained: {:?}\n{}", listed["events"], last.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Stopped, so that its maintenance passes (expiry, compaction) no longer
    // move the pointer while the readers read.
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
    durations.sort_unstable();
    for reader in ["duckdb", "pyiceberg"] {
        let rows = read[reader]["rows"].as_array().unwrap();
        let ids: Vec<&str> = rows.iter().map(|r| r["event_id"].as_str().unwrap()).collect();
        let unique: BTreeSet<String> = ids.iter().map(|s| s.to_string()).collect();
        let missing = acked.difference(&unique).count();
        let extra = unique.difference(&acked).count();
        println!(
            "{reader}: {rounds} exporter kills, {mid_compaction} in the middle of a compaction, {committed} compactions \
             committed by the killed exporters (median {} ms), {orphan_passes} passes deleting unreferenced \
             files; acknowledged {} events, {} requests unknown, stored {} \
             rows, {} unique, {} missing, {} not acknowledged; now {} data files, {} manifests",
            durations.get(durations.len() / 2).copied().unwrap_or(0),
            acked.len(),
            unknown,
            ids.len(),
            unique.len(),
            missing,
            extra,
            listed["events"]["data_files"],
            listed["events"]["manifests"],
        );
        assert_eq!(ids.len(), unique.len(), "{reader}: duplicated events");
        assert_eq!(missing, 0, "{reader}: acknowledged events missing");
        assert!(extra <= unknown * 4, "{reader}: {extra} events were never sent");
        assert_eq!(rows.len() as u64, listed["events"]["rows"].as_u64().unwrap(), "{reader}: the summary's rows");
    }
    assert!(acked.len() > 1000, "too little load to mean anything: {}", acked.len());
    assert!(committed > 0, "no compaction was ever committed");
    assert!(orphan_passes > 0, "no replaced or orphaned file was ever deleted");
    assert!(mid_compaction >= 3, "only {mid_compaction} of {rounds} kills landed inside a compaction");
    drop(writer);
    drop(last);
}

/// A compaction computed by an exporter whose lease moved is refused by the
/// fence; one computed on a snapshot that is no longer current is refused by
/// the compare-and-set, whoever commits it. Neither moves the pointer or
/// changes what readers see; the same compaction on the current snapshot
/// under the current lease commits.
#[tokio::test]
async fn a_compaction_fenced_out_or_computed_on_an_old_snapshot_commits_nothing() {
    let db = TestDatabase::new();
    let objects = db.dir.path().join("objects");
    let off = |s: &mut statehouse::config::Settings| {
        s.export_interval = HOUR;
        s.compaction_enabled = false;
    };
    let a = spawn_app_with(&db, off).await;
    wait_for_tables(&a.client, &a.base).await;
    let ns = unique_ns("fenced-compaction");
    let post = |app: &TestApp, n: usize| {
        let url = app.url(&format!("/v1/objects/{ns}/o/events"));
        let client = app.client.clone();
        async move {
            ok_json(client.post(url).json(&json!({"events": [{"type": "T", "data": n}]})).send().await.unwrap()).await;
        }
    };
    for n in 0..6 {
        post(&a, n).await;
        export_now(&a).await;
    }
    let warehouse = Warehouse::open(&db.url, &objects).await;
    let a_lease = warehouse.lease().await;
    let stale_view = warehouse.table("events").await;
    let policy = CompactionPolicy { enabled: true, target_file_bytes: 128 << 20, min_files: 2, max_manifests: 1 };

    // A stops; B takes the exporter lease (a new fence), with nothing to export yet.
    a.stop().await;
    let b = spawn_app_with(&db, off).await;
    assert_eq!(export_now(&b).await["nothing_to_do"], true);
    let b_lease = warehouse.lease().await;
    assert!(b_lease.fence > a_lease.fence, "B did not take the lease over: {a_lease:?} then {b_lease:?}");
    let pointer = warehouse.catalog.pointer(&ident("events")).await.unwrap();
    assert_eq!(pointer.as_deref(), stale_view.metadata_location(), "the table moved without a new export");
    let before = tables(&b.client, &b.base).await;

    // A's late compaction of the table as it still is: only the fence stands in its way.
    let late = warehouse.catalog.fenced(a_lease.clone());
    let refused = compact(&late, &stale_view, &policy, HashMap::new(), &|| {})
        .await
        .expect_err("a fenced-out exporter committed a compaction");
    assert!(refused.is_refused() && refused.to_string().contains("lease moved"), "{refused}");
    println!("compaction under the old fence {} refused: {refused}", a_lease.fence);
    assert_eq!(warehouse.catalog.pointer(&ident("events")).await.unwrap(), pointer, "the pointer moved");
    assert_eq!(tables(&b.client, &b.base).await["events"], before["events"], "a refused compaction changed the table");

    // B exports one more event; the view A had is now an old snapshot, and
    // compacting it is refused under the current lease too.
    post(&b, 6).await;
    export_now(&b).await;
    let before = tables(&b.client, &b.base).await;
    assert_eq!(before["events"]["rows"], 7);
    let pointer = warehouse.catalog.pointer(&ident("events")).await.unwrap();
    let current_lease = warehouse.catalog.fenced(b_lease.clone());
    let moved = compact(&current_lease, &stale_view, &policy, HashMap::new(), &|| {})
        .await
        .expect_err("a compaction of an old snapshot committed");
    assert!(moved.is_refused() && !moved.to_string().contains("lease"), "{moved}");
    println!("compaction of a snapshot no longer current refused: {moved}");
    assert_eq!(warehouse.catalog.pointer(&ident("events")).await.unwrap(), pointer, "the pointer moved");
    let unchanged = tables(&b.client, &b.base).await;
    assert_eq!(unchanged["events"], before["events"], "a refused compaction changed the table");
    let body: Value = b.client.get(b.url("/v1/analytics/tables")).send().await.unwrap().json().await.unwrap();
    let read = read_digests(&unchanged, &db, &body["warehouse"], "events", &[]).await;
    let digest = agreed(&read, |r| &r["rows"], 7, "events after the refused compactions");

    // The control: the current snapshot under the current lease compacts, and reads the same.
    let fresh = warehouse.table("events").await;
    let (compacted, info) = compact(&current_lease, &fresh, &policy, HashMap::new(), &|| {})
        .await
        .unwrap()
        .expect("a compaction with 7 small files to merge");
    assert_eq!((info.data_files_before, info.data_files_after), (7, 1), "{info:?}");
    let after = tables(&b.client, &b.base).await;
    assert_eq!(after["events"]["metadata_location"], compacted.metadata_location().unwrap());
    let read = read_digests(&after, &db, &body["warehouse"], "events", &[]).await;
    assert_eq!(agreed(&read, |r| &r["rows"], 7, "events compacted by the current exporter"), digest);
    b.stop().await;
}
