//! The benchmark suite: starts the release server on a fresh data dir, drives
//! it over HTTP, and prints one line per workload, with the physical limit of
//! the same disk (raw libSQL commits) measured in the same run.
//!
//!   cargo build --release && cargo run --release --example bench -- [--seconds 10] [--connections 32,256]
//!   ... --database sqld     # also on a libSQL server (sqld from SQLD_BIN), side by side with the file
//!
//! The load generator runs on the same machine as the server and shares its cores.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

mod alarms;

struct Args {
    seconds: u64,
    connections: Vec<usize>,
    workloads: Vec<String>,
    binary: String,
    export_events: usize,
    /// Alarms the `alarms` workload arms, due evenly over `alarms_over` seconds.
    alarms: usize,
    alarms_over: u64,
    /// `file`, or `sqld`: the file and a libSQL server side by side.
    database: String,
    /// The raw-libSQL limits and the fence cost (file only).
    baselines: bool,
    /// sqld as if this far away: each direction of every connection to it is held this long.
    database_latency_ms: u64,
    /// Small export cycles before the compaction bench (0: skip it).
    compaction_cycles: usize,
    /// The Python venv with DuckDB (scripts/test builds it) the compaction bench queries with.
    venv: Option<String>,
    /// Versions of history the restore bench writes before restoring (0: skip it).
    restore_versions: usize,
}

/// The server binary of the same build: the bench runs as
/// `<target>/release/examples/bench`, wherever `CARGO_TARGET_DIR` put it.
fn server_beside_the_bench() -> String {
    std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.parent()?.join("statehouse")))
        .map_or_else(|| "target/release/statehouse".into(), |path| path.display().to_string())
}

fn args() -> Args {
    let mut args = Args {
        seconds: 10,
        connections: vec![32, 256],
        workloads: WORKLOADS.iter().map(|w| w.to_string()).collect(),
        binary: server_beside_the_bench(),
        export_events: 200_000,
        alarms: 100_000,
        alarms_over: 10,
        database: "file".into(),
        baselines: true,
        database_latency_ms: 0,
        compaction_cycles: 1000,
        venv: std::env::var("STATEHOUSE_TEST_VENV").ok(),
        restore_versions: 10_000,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "--help" || flag == "-h" {
            println!(
                "bench [--seconds N] [--connections 32,256] [--workloads {}] [--binary PATH] [--export-events N (0: skip the export benches)] [--alarms N (alarms armed by the alarms workload, default 100000)] [--alarms-over S (due evenly over S seconds, default 10)] [--database file|sqld (sqld: also on a libSQL server from SQLD_BIN, side by side)] [--baselines false] [--database-latency-ms N (sqld behind a proxy holding each direction N ms)] [--compaction-cycles N (0: skip the compaction bench)] [--venv PATH (DuckDB for it; default $STATEHOUSE_TEST_VENV)] [--restore-versions N (0: skip the restore bench)]",
                WORKLOADS.join(",")
            );
            std::process::exit(0);
        }
        let value = it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--seconds" => args.seconds = value.parse().expect("--seconds takes a number"),
            "--connections" => args.connections = value.split(',').map(|c| c.parse().expect("numbers")).collect(),
            "--workloads" => args.workloads = value.split(',').filter(|w| !w.is_empty()).map(str::to_string).collect(),
            "--binary" => args.binary = value,
            "--export-events" => args.export_events = value.parse().expect("--export-events takes a number"),
            "--alarms" => args.alarms = value.parse().expect("--alarms takes a number"),
            "--alarms-over" => args.alarms_over = value.parse().expect("--alarms-over takes seconds"),
            "--database" => {
                assert!(["file", "sqld"].contains(&value.as_str()), "--database takes file or sqld");
                args.database = value
            }
            "--baselines" => args.baselines = value.parse().expect("--baselines takes true or false"),
            "--database-latency-ms" => {
                args.database_latency_ms = value.parse().expect("--database-latency-ms takes a number")
            }
            "--compaction-cycles" => {
                args.compaction_cycles = value.parse().expect("--compaction-cycles takes a number")
            }
            "--venv" => args.venv = Some(value),
            "--restore-versions" => args.restore_versions = value.parse().expect("--restore-versions takes a number"),
            other => panic!("unknown flag {other}"),
        }
    }
    args
}

const WORKLOADS: &[&str] =
    &["get_hot", "put_one_object", "put_many_objects", "batch_10", "list_100", "mixed", "catalog_load", "alarms"];

/// Workloads that are not requests at a number of connections, run once each.
const SEPARATE: &[&str] = &["alarms"];

#[tokio::main]
async fn main() {
    let args = args();
    let dir = tempfile::tempdir().expect("a temp dir");
    println!(
        "# statehouse bench: {} s per workload, connections {:?}, data in {}",
        args.seconds,
        args.connections,
        dir.path().display()
    );

    let (single, batched) = if args.baselines {
        let (single, batched) = baseline(dir.path()).await;
        println!(
            "baseline=raw_libsql_single_commit rows_per_s={single:.0} (one row per fsync'd commit, synchronous=FULL)"
        );
        println!("baseline=raw_libsql_batched rows_per_s={batched:.0} (1000 rows per commit)");
        fence_cost(dir.path()).await;
        (single, batched)
    } else {
        (f64::NAN, f64::NAN)
    };

    let client = reqwest::Client::builder().pool_max_idle_per_host(1024).build().unwrap();
    let databases: &[&str] = if args.database == "sqld" { &["file", "sqld"] } else { &["file"] };
    let mut table: Vec<(String, usize, &str, Outcome)> = Vec::new();
    let mut rtt_ms = f64::NAN;
    for &database in databases {
        let (mut sqld, url) = match database {
            "sqld" => {
                let (sqld, mut url) = start_sqld(dir.path());
                if args.database_latency_ms > 0 {
                    let upstream = url.trim_start_matches("http://").to_string();
                    let port = latency_proxy(upstream, Duration::from_millis(args.database_latency_ms)).await;
                    url = format!("http://127.0.0.1:{port}");
                    println!(
                        "database=sqld latency_ms={} (each direction, through a proxy: the server, the round trips and the raw baseline all see it)",
                        args.database_latency_ms
                    );
                }
                rtt_ms = pipeline_round_trip_ms(&client, &url, true).await;
                let new_stream_ms = pipeline_round_trip_ms(&client, &url, false).await;
                println!(
                    "database=sqld round_trip_ms={rtt_ms:.3} new_stream_round_trip_ms={new_stream_ms:.3} (median of 200 `SELECT 1` requests to /v3/pipeline on a keep-alive connection: on a kept stream, as the writer sends, and on a new stream each)"
                );
                (Some(sqld), url)
            }
            _ => (None, format!("file:{}/bench.db", dir.path().display())),
        };
        let env = [("TURSO_URL", url.clone())];
        let (mut server, base) =
            start_server(&args.binary, dir.path(), &format!("bench-{database}"), &env, &client).await;
        // Fixtures: a hot key, and an object with 1000 keys for listing.
        client.put(format!("{base}/v1/objects/bench/hot/kv/k")).body("hot value of some length").send().await.unwrap();
        for chunk in 0..8 {
            let ops: Vec<_> =
                (0..125).map(|i| json!({"op": "put", "key": format!("k{:04}", chunk * 125 + i), "value": i})).collect();
            client
                .post(format!("{base}/v1/objects/bench/listed/batch"))
                .json(&json!({"ops": ops}))
                .send()
                .await
                .unwrap();
        }
        if args.workloads.iter().any(|w| w == "catalog_load") {
            wait_for_export_tables(&client, &base).await;
        }

        for workload in args.workloads.iter().filter(|w| !SEPARATE.contains(&w.as_str())) {
            for &connections in &args.connections {
                let before = writer_counters(&client, &base).await;
                let result = run(&base, workload, connections, Duration::from_secs(args.seconds)).await;
                let after = writer_counters(&client, &base).await;
                let writes_per_s = result.rps * writes_per_request(workload);
                let ratio = if writes_per_request(workload) > 0.0 && database == "file" && args.baselines {
                    format!(
                        " writes_per_s={writes_per_s:.0} x_single_commit_limit={:.2} x_batched_limit={:.2}",
                        writes_per_s / single,
                        writes_per_s / batched
                    )
                } else if writes_per_request(workload) > 0.0 {
                    format!(" writes_per_s={writes_per_s:.0}")
                } else {
                    String::new()
                };
                let groups = after.groups - before.groups;
                let group_line = if groups > 0.0 {
                    let trips = if database == "sqld" {
                        format!(
                            " round_trips_per_group={:.2} sent_while_one_in_flight={:.2}",
                            (after.round_trips - before.round_trips) / groups,
                            (after.overlapped - before.overlapped) / groups
                        )
                    } else {
                        String::new()
                    };
                    format!(" groups={groups:.0} mean_group_size={:.1}{trips}", (after.jobs - before.jobs) / groups)
                } else {
                    String::new()
                };
                println!(
                    "database={database} workload={workload} connections={connections} rps={:.0} p50_ms={:.2} p99_ms={:.2} errors={}{ratio}{group_line}",
                    result.rps, result.p50_ms, result.p99_ms, result.errors
                );
                if let Some(error) = &result.first_error {
                    println!("  first error: {}", error.chars().take(400).collect::<String>());
                }
                table.push((workload.clone(), connections, database, result));
            }
        }
        // One PUT at a time: its latency against the round trip to the database.
        let single_put = run(&base, "put_one_object", 1, Duration::from_secs(args.seconds.min(5))).await;
        let trips = if database == "sqld" {
            format!(" = {:.1} round trips of {rtt_ms:.3} ms", single_put.p50_ms / rtt_ms)
        } else {
            String::new()
        };
        println!("database={database} workload=single_put connections=1 p50_ms={:.3}{trips}", single_put.p50_ms);
        table.push(("single_put".into(), 1, database, single_put));
        let _ = server.kill();
        let _ = server.wait();
        if let Some(sqld) = sqld.as_mut() {
            raw_sqld_limit(&client, &url, args.seconds.min(3)).await;
            let _ = sqld.kill();
            let _ = sqld.wait();
        }
    }
    if databases.len() > 1 {
        println!("\n| workload | connections | file rps | sqld rps | sqld/file | file p99 ms | sqld p99 ms |");
        println!("|---|---|---|---|---|---|---|");
        for (workload, connections, database, file) in &table {
            if *database != "file" {
                continue;
            }
            let Some((.., sqld)) = table.iter().find(|(w, c, d, _)| w == workload && c == connections && *d == "sqld")
            else {
                continue;
            };
            println!(
                "| {workload} | {connections} | {:.0} | {:.0} | {:.2} | {:.2} | {:.2} |",
                file.rps,
                sqld.rps,
                sqld.rps / file.rps,
                file.p99_ms,
                sqld.p99_ms
            );
        }
    }

    if args.workloads.iter().any(|w| w == "alarms") {
        for &database in databases {
            let mut sqld = None;
            let mut env = Vec::new();
            if database == "sqld" {
                let (child, url) = start_sqld(&dir.path().join("alarms-sqld"));
                sqld = Some(child);
                env.push(("TURSO_URL", url));
            }
            alarms::alarms(&args.binary, dir.path(), &client, database, &env, args.alarms, args.alarms_over).await;
            if let Some(mut sqld) = sqld {
                let _ = sqld.kill();
                let _ = sqld.wait();
            }
        }
    }
    if args.export_events > 0 && args.database == "file" {
        export_throughput(&args, dir.path(), &client).await;
        export_lag(&args, dir.path(), &client).await;
    }
    if args.compaction_cycles > 0 && args.database == "file" {
        compaction(&args, dir.path(), &client).await;
    }
    if args.restore_versions > 0 {
        for &database in databases {
            restore(&args, dir.path(), &client, database).await;
        }
    }
}

/// Restoring an object of 1,000 keys from `--restore-versions` versions of
/// history (one PUT each, 32 at a time): to a version in the middle while all
/// of it is in the outbox, and again once it was exported (read from the
/// Iceberg table alone). Each the median of 5 restores.
async fn restore(args: &Args, dir: &std::path::Path, client: &reqwest::Client, database: &str) {
    const KEYS: usize = 1000;
    let mut env = vec![("STATEHOUSE_EXPORT_INTERVAL_MS", "3600000".to_string())];
    let sqld = (database == "sqld").then(|| start_sqld(&dir.join("restore")));
    if let Some((_, url)) = &sqld {
        env.push(("TURSO_URL", url.clone()));
    }
    let (server, base) = start_server(&args.binary, dir, &format!("restore-{database}"), &env, client).await;
    let object = format!("{base}/v1/objects/bench/restore");
    let versions = args.restore_versions;
    let written = Instant::now();
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let writers: Vec<_> = (0..32)
        .map(|_| {
            let (client, object, next) = (client.clone(), object.clone(), next.clone());
            tokio::spawn(async move {
                loop {
                    let n = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if n >= versions {
                        return;
                    }
                    let value = json!({"n": n, "sku": "ABC-123", "note": "x".repeat(64)});
                    let r = client.put(format!("{object}/kv/key-{:04}", n % KEYS)).json(&value).send().await.unwrap();
                    assert_eq!(r.status(), 200);
                }
            })
        })
        .collect();
    for writer in writers {
        writer.await.unwrap();
    }
    let write_s = written.elapsed().as_secs_f64();
    let target = versions as i64 / 2;
    let time_restores = |label: &'static str| {
        let (client, object) = (client.clone(), object.clone());
        async move {
            let mut took = Vec::new();
            for _ in 0..5 {
                let started = Instant::now();
                let r =
                    client.post(format!("{object}/restore")).json(&json!({"version": target})).send().await.unwrap();
                let status = r.status();
                let body: serde_json::Value = r.json().await.unwrap();
                assert_eq!(status, 200, "{label}: {body}");
                assert_eq!(body["keys"].as_u64(), Some(KEYS.min(target as usize) as u64), "{body}");
                took.push(started.elapsed().as_secs_f64() * 1000.0);
            }
            took.sort_by(f64::total_cmp);
            took[2]
        }
    };
    let from_outbox = time_restores("from the outbox").await;
    let exported = Instant::now();
    let r = client.post(format!("{base}/v1/admin/export")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let export_s = exported.elapsed().as_secs_f64();
    let changes = changes_table(client, &base).await;
    assert_eq!(changes["pending_rows"], 0, "the history is all in the table now: {changes}");
    let exported_rows = changes["rows"].as_i64().unwrap_or_default();
    let from_tables = time_restores("from the tables").await;
    println!(
        "database={database} bench=restore keys={KEYS} versions={versions} restore_ms_from_outbox={from_outbox:.1} restore_ms_from_tables={from_tables:.1} (median of 5, to version {target}; writing the history took {write_s:.1} s, exporting its {exported_rows} rows {export_s:.2} s)"
    );
    stop(server);
    if let Some((mut sqld, _)) = sqld {
        let _ = sqld.kill();
        let _ = sqld.wait();
    }
}

/// DuckDB over the `changes` table after many small export cycles: before
/// compaction, just after it, and once the snapshots before it expired and the
/// next pass dropped its DELETED entries; against the same rows exported in
/// one cycle (one snapshot, one file per partition) and written as one Parquet
/// file. `count(*)` and a filtered aggregate, each the median of 5 runs
/// (bench/iceberg_query.py).
async fn compaction(args: &Args, dir: &std::path::Path, client: &reqwest::Client) {
    let venv = args.venv.clone().unwrap_or_else(|| {
        panic!(
            "the compaction bench queries with DuckDB: pass --venv or set STATEHOUSE_TEST_VENV to a venv with \
             tests/iceberg/requirements.txt (scripts/test builds one), or skip it with --compaction-cycles 0"
        )
    });
    let python = std::path::Path::new(&venv).join("bin/python");
    assert!(python.is_file(), "{} does not exist", python.display());
    let cycles = args.compaction_cycles;
    let hour = ("STATEHOUSE_EXPORT_INTERVAL_MS", "3600000".to_string());
    let off = ("STATEHOUSE_COMPACTION_ENABLED", "false".to_string());
    let (server, base) = start_server(&args.binary, dir, "compaction", &[hour.clone(), off.clone()], client).await;
    wait_for_export_tables(client, &base).await;
    let started = Instant::now();
    for cycle in 0..cycles {
        load_changes(client, &base, cycle).await;
        let r = client.post(format!("{base}/v1/admin/export")).send().await.unwrap();
        assert_eq!(r.status(), 200);
    }
    let exporting = started.elapsed().as_secs_f64();
    let small = changes_table(client, &base).await;
    stop(server);
    let query = |table: &serde_json::Value, one_file: Option<&std::path::Path>| {
        let request = json!({"metadata_location": table["metadata_location"], "one_file": one_file, "runs": 5});
        let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/iceberg_query.py");
        let mut child = std::process::Command::new(&python)
            .arg(script)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("run bench/iceberg_query.py");
        use std::io::Write as _;
        child.stdin.take().unwrap().write_all(request.to_string().as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "bench/iceberg_query.py failed");
        serde_json::from_slice::<serde_json::Value>(&out.stdout).expect("the query script prints JSON")
    };
    let before = query(&small, None);

    // The same warehouse with compaction on: the first cycle's maintenance pass compacts.
    let (server, base) = start_server(&args.binary, dir, "compaction", std::slice::from_ref(&hour), client).await;
    let started = Instant::now();
    let r = client.post(format!("{base}/v1/admin/export")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let compacting = started.elapsed().as_secs_f64();
    let compacted = changes_table(client, &base).await;
    assert!(compacted["last_compaction"].is_object(), "the changes table was not compacted: {compacted}");
    stop(server);
    let after = query(&compacted, None);

    // A day later: one more cycle, the snapshots before it expired, and the
    // next pass merged the compaction's DELETED entries away.
    let expire = [
        hour.clone(),
        ("STATEHOUSE_EXPORT_SNAPSHOT_MAX_AGE_MS", "0".to_string()),
        ("STATEHOUSE_EXPORT_MIN_SNAPSHOTS", "1".to_string()),
    ];
    let (server, base) = start_server(&args.binary, dir, "compaction", &expire, client).await;
    load_changes(client, &base, cycles).await;
    let r = client.post(format!("{base}/v1/admin/export")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let settled = changes_table(client, &base).await;
    stop(server);
    let one_file = dir.join("compaction-one-file.parquet");
    let later = query(&settled, Some(&one_file));

    // The same rows, exported in one cycle.
    let env = [hour, off, ("STATEHOUSE_EXPORT_BATCH_ROWS", "10000000".to_string())];
    let (server, base) = start_server(&args.binary, dir, "compaction-once", &env, client).await;
    wait_for_export_tables(client, &base).await;
    for cycle in 0..=cycles {
        load_changes(client, &base, cycle).await;
    }
    let r = client.post(format!("{base}/v1/admin/export")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let once = changes_table(client, &base).await;
    stop(server);
    let baseline = query(&once, None);
    assert_eq!(small["rows"], after["count"], "compaction changed the row count");
    assert_eq!(later["count"], baseline["count"], "the one-cycle table holds other rows");
    assert_eq!(later["filtered"], baseline["filtered"], "the one-cycle table holds other rows");

    let ms = |result: &serde_json::Value, key: &str| result[key].as_f64().unwrap_or(f64::NAN);
    let shape = |t: &serde_json::Value| {
        format!("data_files={} manifests={} snapshots={}", t["data_files"], t["manifests"], t["snapshots"])
    };
    println!(
        "compaction=changes cycles={cycles} rows={} exporting_s={exporting:.1} compaction_s={compacting:.2}",
        small["rows"]
    );
    for (stage, table, result) in [
        ("small_files", &small, &before),
        ("compacted", &compacted, &after),
        ("compacted_history_expired", &settled, &later),
        ("one_cycle", &once, &baseline),
    ] {
        println!(
            "compaction=changes stage={stage} {} count_ms={:.1} filtered_ms={:.1} x_one_cycle_count={:.2} \
             x_one_cycle_filtered={:.2} x_one_file_count={:.1} x_one_file_filtered={:.1}",
            shape(table),
            ms(result, "count_ms"),
            ms(result, "filtered_ms"),
            ms(result, "count_ms") / ms(&baseline, "count_ms"),
            ms(result, "filtered_ms") / ms(&baseline, "filtered_ms"),
            ms(result, "count_ms") / ms(&later, "one_file_count_ms"),
            ms(result, "filtered_ms") / ms(&later, "one_file_filtered_ms"),
        );
    }
    println!(
        "compaction=changes stage=one_parquet_file count_ms={:.1} filtered_ms={:.1}",
        ms(&later, "one_file_count_ms"),
        ms(&later, "one_file_filtered_ms")
    );
}

/// SIGTERM and wait: the exporter lease is released, so that the next server
/// on the same database exports at once (a killed one holds it for a lease).
fn stop(mut server: std::process::Child) {
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(server.id() as i32, libc::SIGTERM) };
    let _ = server.wait();
}

/// One cycle's writes for the compaction bench: 25 puts into each of 4 namespaces.
async fn load_changes(client: &reqwest::Client, base: &str, cycle: usize) {
    for ns in 0..4 {
        let ops: Vec<_> = (0..25)
            .map(|i| {
                let value = json!({"cycle": cycle, "i": i, "sku": "ABC-123"});
                json!({"op": "put", "key": format!("k{}", (cycle * 25 + i) % 5000), "value": value})
            })
            .collect();
        let r = client
            .post(format!("{base}/v1/objects/ns{ns}/obj{}/batch", cycle % 10))
            .json(&json!({"ops": ops}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
}

async fn changes_table(client: &reqwest::Client, base: &str) -> serde_json::Value {
    let body: serde_json::Value =
        client.get(format!("{base}/v1/analytics/tables")).send().await.unwrap().json().await.unwrap();
    body["tables"].as_array().unwrap().iter().find(|t| t["name"] == "statehouse.changes").unwrap().clone()
}

/// Starts the release binary on `<dir>/<name>.db` and waits until it is ready.
async fn start_server(
    binary: &str,
    dir: &std::path::Path,
    name: &str,
    env: &[(&str, String)],
    client: &reqwest::Client,
) -> (std::process::Child, String) {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut command = std::process::Command::new(binary);
    command
        .env("TURSO_URL", format!("file:{}/{name}.db", dir.display()))
        .env("STATEHOUSE_OBJECTS_DIR", dir.join(format!("{name}-objects")))
        // One machine: the folder is shared by whatever runs here, also with a libSQL server.
        .env("STATEHOUSE_OBJECTS_DIR_SHARED", "true")
        .env("STATEHOUSE_LISTEN", format!("127.0.0.1:{port}"))
        .env("STATEHOUSE_LOG", "warn");
    for (key, value) in env {
        command.env(key, value);
    }
    let server =
        command.spawn().unwrap_or_else(|e| panic!("cannot start {binary} ({e}); run `cargo build --release` first"));
    let base = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !client.get(format!("{base}/readyz")).send().await.is_ok_and(|r| r.status() == 200) {
        assert!(Instant::now() < deadline, "the server did not become ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    (server, base)
}

async fn events_table(client: &reqwest::Client, base: &str) -> serde_json::Value {
    let body: serde_json::Value =
        client.get(format!("{base}/v1/analytics/tables")).send().await.unwrap().json().await.unwrap();
    body["tables"].as_array().unwrap().iter().find(|t| t["name"] == "statehouse.events").unwrap().clone()
}

/// Events/s from the outbox to a committed Iceberg snapshot: a backlog of
/// events exported by one `POST /v1/admin/export` (read rows, encode Parquet,
/// write files and metadata, commit and delete the rows).
async fn export_throughput(args: &Args, dir: &std::path::Path, client: &reqwest::Client) {
    let env = [
        ("STATEHOUSE_EXPORT_INTERVAL_MS", "3600000".to_string()),
        ("STATEHOUSE_EXPORT_BATCH_ROWS", args.export_events.max(1).to_string()),
    ];
    let (mut server, base) = start_server(&args.binary, dir, "export", &env, client).await;
    while events_table(client, &base).await["exists"] != true {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let calls = args.export_events.div_ceil(1000);
    let loaded = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for call in 0..calls {
        let (client, base) = (client.clone(), base.clone());
        tasks.spawn(async move {
            let events: Vec<_> = (0..1000)
                .map(|i| {
                    let event_type = ["OrderPlaced", "OrderShipped", "CartUpdated"][i % 3];
                    json!({"type": event_type, "data": {"call": call, "i": i, "total": 42.5, "sku": "ABC-123"}})
                })
                .collect();
            let r = client
                .post(format!("{base}/v1/objects/ns{}/obj{}/events", call % 4, call % 100))
                .json(&json!({"events": events}))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
        });
        while tasks.len() >= 8 {
            tasks.join_next().await;
        }
    }
    while tasks.join_next().await.is_some() {}
    let load_s = loaded.elapsed().as_secs_f64();
    let cpu_before = cpu_seconds(server.id());
    let started = Instant::now();
    let report: serde_json::Value =
        client.post(format!("{base}/v1/admin/export")).send().await.unwrap().json().await.unwrap();
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = cpu_seconds(server.id()) - cpu_before;
    // The exported rows are deleted from the outbox after the cycle, in the
    // background: the CPU for that too, once the outbox is empty.
    let outbox = libsql::Builder::new_local(dir.join("export.db")).build().await.unwrap().connect().unwrap();
    loop {
        let mut rows = outbox.query("SELECT count(*) FROM outbox", ()).await.unwrap();
        if rows.next().await.unwrap().unwrap().get::<i64>(0).unwrap() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let cleanup_s = started.elapsed().as_secs_f64() - elapsed;
    let cpu_with_cleanup = cpu_seconds(server.id()) - cpu_before;
    let rows: u64 = report["snapshots"].as_array().unwrap().iter().map(|s| s["rows"].as_u64().unwrap()).sum();
    let files: u64 = report["snapshots"].as_array().unwrap().iter().map(|s| s["data_files"].as_u64().unwrap()).sum();
    let bytes: u64 = walk_sizes(&dir.join("export-objects/warehouse/statehouse/events/data"));
    println!(
        "export=throughput events={rows} seconds={elapsed:.2} events_per_s={:.0} server_cpu_s={cpu:.2} \
         events_per_cpu_s={:.0} data_files={files} parquet_bytes={bytes} bytes_per_event={:.1} \
         outbox_cleanup_s={cleanup_s:.2} events_per_cpu_s_with_cleanup={:.0} \
         (loading them took {load_s:.1} s, {:.0} events/s through the API)",
        rows as f64 / elapsed,
        rows as f64 / cpu.max(0.001),
        bytes as f64 / rows.max(1) as f64,
        rows as f64 / cpu_with_cleanup.max(0.001),
        rows as f64 / load_s
    );
    let _ = server.kill();
    let _ = server.wait();
}

/// User + system CPU time of a process so far (Linux), in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let fields: Vec<&str> = stat.rsplit_once(')').map_or("", |(_, rest)| rest).split_whitespace().collect();
    let ticks: f64 = fields.get(11..13).map_or(0.0, |f| f.iter().filter_map(|v| v.parse::<f64>().ok()).sum());
    ticks / 100.0
}

fn walk_sizes(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| if e.path().is_dir() { walk_sizes(&e.path()) } else { e.metadata().map_or(0, |m| m.len()) })
        .sum()
}

/// Event-to-queryable lag with a 1 s export interval: one client posts an
/// event every 10 ms; another polls the table's row count every 10 ms. Event
/// k is queryable once the current snapshot holds at least k rows.
async fn export_lag(args: &Args, dir: &std::path::Path, client: &reqwest::Client) {
    let env = [("STATEHOUSE_EXPORT_INTERVAL_MS", "1000".to_string())];
    let (mut server, base) = start_server(&args.binary, dir, "lag", &env, client).await;
    while events_table(client, &base).await["exists"] != true {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let seconds = args.seconds.max(5);
    let poller = {
        let (client, base) = (client.clone(), base.clone());
        tokio::spawn(async move {
            let mut seen: Vec<(Instant, u64)> = Vec::new();
            let stop_at = Instant::now() + Duration::from_secs(seconds + 5);
            while Instant::now() < stop_at {
                let rows = events_table(&client, &base).await["rows"].as_u64().unwrap_or(0);
                if seen.last().is_none_or(|(_, r)| *r != rows) {
                    seen.push((Instant::now(), rows));
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            seen
        })
    };
    let mut acked: Vec<Instant> = Vec::new();
    let stop_at = Instant::now() + Duration::from_secs(seconds);
    while Instant::now() < stop_at {
        let r = client
            .post(format!("{base}/v1/objects/lag/o/events"))
            .json(&json!({"events": [{"type": "Tick", "data": {"n": acked.len()}}]}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        acked.push(Instant::now());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let seen = poller.await.unwrap();
    let mut lags: Vec<f64> = acked
        .iter()
        .enumerate()
        .filter_map(|(k, at)| {
            seen.iter()
                .find(|(_, rows)| *rows as usize > k)
                .map(|(when, _)| when.duration_since(*at).as_secs_f64() * 1000.0)
        })
        .collect();
    let missing = acked.len() - lags.len();
    lags.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let q = |p: f64| lags.get(((lags.len() as f64 - 1.0) * p) as usize).copied().unwrap_or(f64::NAN);
    println!(
        "export=lag interval_ms=1000 events={} p50_ms={:.0} p99_ms={:.0} max_ms={:.0} not_visible_after_5s={missing}",
        acked.len(),
        q(0.5),
        q(0.99),
        q(1.0)
    );
    let _ = server.kill();
    let _ = server.wait();
}

/// The exporter creates the Iceberg tables in its first cycle, soon after start.
async fn wait_for_export_tables(client: &reqwest::Client, base: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let listed: serde_json::Value =
            client.get(format!("{base}/v1/analytics/tables")).send().await.unwrap().json().await.unwrap();
        if listed["tables"].as_array().is_some_and(|t| t.iter().all(|t| t["exists"] == true)) {
            return;
        }
        assert!(Instant::now() < deadline, "the exporter never created the tables: {listed}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn writes_per_request(workload: &str) -> f64 {
    match workload {
        "put_one_object" | "put_many_objects" => 1.0,
        "batch_10" => 10.0,
        "mixed" => 0.1,
        _ => 0.0,
    }
}

struct Outcome {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    errors: u64,
    /// What the first failed request answered.
    first_error: Option<String>,
}

async fn run(base: &str, workload: &str, connections: usize, duration: Duration) -> Outcome {
    // One client per connection: each task keeps its own keep-alive connection.
    let errors = Arc::new(AtomicU64::new(0));
    let first_error: Arc<std::sync::Mutex<Option<String>>> = Arc::default();
    let started = Instant::now();
    let deadline = started + duration;
    let mut tasks = Vec::new();
    for c in 0..connections {
        let (base, workload, errors) = (base.to_string(), workload.to_string(), errors.clone());
        let first_error = first_error.clone();
        tasks.push(tokio::spawn(async move {
            let client = reqwest::Client::builder().pool_max_idle_per_host(1).build().unwrap();
            let mut latencies = Vec::with_capacity(4096);
            let mut i: u64 = 0;
            while Instant::now() < deadline {
                i += 1;
                let request = match workload.as_str() {
                    "get_hot" => client.get(format!("{base}/v1/objects/bench/hot/kv/k")),
                    "put_one_object" => {
                        client.put(format!("{base}/v1/objects/bench/one/kv/c{c}-{i}")).body(format!("value {i}"))
                    }
                    "put_many_objects" => client
                        .put(format!("{base}/v1/objects/bench/o{}/kv/c{c}-{i}", (c as u64 * 7919 + i) % 1000))
                        .body(format!("value {i}")),
                    "batch_10" => {
                        let ops: Vec<_> =
                            (0..10).map(|j| json!({"op": "put", "key": format!("c{c}-{i}-{j}"), "value": j})).collect();
                        client.post(format!("{base}/v1/objects/bench/b{}/batch", c % 100)).json(&json!({"ops": ops}))
                    }
                    "list_100" => client.get(format!("{base}/v1/objects/bench/listed/kv?limit=100")),
                    "catalog_load" => {
                        client.get(format!("{base}/iceberg/v1/statehouse/namespaces/statehouse/tables/events"))
                    }
                    "mixed" if i % 10 == 0 => {
                        client.put(format!("{base}/v1/objects/bench/m{}/kv/c{c}-{i}", c % 100)).body("v")
                    }
                    "mixed" => client.get(format!("{base}/v1/objects/bench/hot/kv/k")),
                    other => panic!("unknown workload {other}"),
                };
                let t = Instant::now();
                match request.send().await {
                    Ok(r) if r.status().is_success() => {
                        let _ = r.bytes().await;
                        latencies.push(t.elapsed());
                    }
                    failed => {
                        errors.fetch_add(1, Ordering::Relaxed);
                        if first_error.lock().unwrap().is_none() {
                            let what = match failed {
                                Ok(r) => format!("{} {}", r.status(), r.text().await.unwrap_or_default()),
                                Err(e) => e.to_string(),
                            };
                            first_error.lock().unwrap().get_or_insert(what);
                        }
                    }
                }
            }
            latencies
        }));
    }
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.unwrap());
    }
    let elapsed = started.elapsed().as_secs_f64();
    all.sort();
    let pct = |p: f64| {
        all.get(((all.len() as f64 * p) as usize).min(all.len().saturating_sub(1)))
            .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
    };
    Outcome {
        rps: all.len() as f64 / elapsed,
        p50_ms: pct(0.50),
        p99_ms: pct(0.99),
        errors: errors.load(Ordering::Relaxed),
        first_error: first_error.lock().map(|first| first.clone()).unwrap_or_default(),
    }
}

/// What the fence costs: the same single-key puts (a kv row and an outbox row
/// each) committed through the writer as the server does it, without HTTP (fence
/// check, version, totals, group commit), and by raw libSQL (the same two
/// INSERTs per write, prepared, 512 writes per commit). Three rounds, each on
/// fresh files, alternating the two so that a noisy neighbour hurts both; the
/// median ratio is the figure.
async fn fence_cost(dir: &std::path::Path) {
    const ROUNDS: usize = 3;
    let mut ratios = Vec::new();
    for round in 0..ROUNDS {
        let (fenced, writer_us) = fenced_writes(&dir.join(format!("fenced-{round}.db"))).await;
        let raw = raw_same_rows(&dir.join(format!("raw-same-rows-{round}.db"))).await;
        let ratio = raw / fenced;
        println!(
            "baseline=fenced_writes round={round} writes_per_s={fenced:.0} writer_cpu_us_per_write={writer_us:.1} raw_same_rows_writes_per_s={raw:.0} fence_cost={ratio:.2}"
        );
        ratios.push(ratio);
    }
    ratios.sort_by(f64::total_cmp);
    println!(
        "baseline=fence_cost median={:.2} (raw libSQL writes/s of the same kv + outbox rows / fenced single-key puts through the writer; {FENCE_IN_FLIGHT} in flight, no HTTP)",
        ratios[ROUNDS / 2]
    );
}

const FENCE_WRITES: usize = 100_000;
const FENCE_IN_FLIGHT: usize = 512;

/// Single-key puts through the writer: writes per second, and the writer
/// thread's CPU microseconds per write.
async fn fenced_writes(file: &std::path::Path) -> (f64, f64) {
    use statehouse::guard::{Guard, Replica, Route};
    use statehouse::objects::{Mutation, ObjectRef, Op, Precondition, WriteJob};

    let settings = statehouse::config::Settings::for_database(&format!("file:{}", file.display())).unwrap();
    let db = Arc::new(statehouse::server::open_database(&settings.database).await.unwrap());
    let metrics = Arc::new(statehouse::telemetry::Metrics::new("bench", "full"));
    let resident = Arc::new(statehouse::resident::ResidentState::new(256 << 20, &metrics));
    let writer = statehouse::writer::Writer::spawn(db.clone(), resident.clone(), metrics.clone());
    let me = Replica { instance: "bench".into(), url: "http://127.0.0.1:1".into(), machine: None };
    let guard = Guard::new(me, Duration::from_secs(600), Duration::from_secs(1), writer.clone(), resident, metrics);
    let object = ObjectRef::new("bench", "fenced").unwrap();
    let Route::Local(lease) = guard.route(&object).await.unwrap() else { panic!("the lease is free") };
    let writer_cpu_before = thread_cpu_seconds("statehouse-writ");
    let started = Instant::now();
    let tasks: Vec<_> = (0..FENCE_IN_FLIGHT)
        .map(|task| {
            let (writer, lease) = (writer.clone(), lease.clone());
            tokio::spawn(async move {
                for i in 0..FENCE_WRITES / FENCE_IN_FLIGHT {
                    let put = Op::Put {
                        key: format!("k-{task}-{i}"),
                        value: bytes::Bytes::from_static(b"value"),
                        content_type: "application/octet-stream".into(),
                        pre: Precondition::default(),
                    };
                    let job = WriteJob::new(
                        lease.clone(),
                        Mutation::Ops { ops: vec![put], events: Vec::new() },
                        statehouse::clock::now_ms(),
                        65536,
                    );
                    writer.run(job).await.unwrap().unwrap();
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    let done = (FENCE_WRITES / FENCE_IN_FLIGHT * FENCE_IN_FLIGHT) as f64;
    let writes_per_s = done / started.elapsed().as_secs_f64();
    let writer_us = (thread_cpu_seconds("statehouse-writ") - writer_cpu_before) / done * 1e6;
    drop((guard, writer, db));
    // The writer's thread ends once nothing can send to it; wait, so that the
    // next round's CPU figure is its own thread's alone.
    for _ in 0..100 {
        if !thread_exists("statehouse-writ") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (writes_per_s, writer_us)
}

/// Raw libSQL writing the rows `fenced_writes` writes: writes per second.
async fn raw_same_rows(file: &std::path::Path) -> f64 {
    let settings = statehouse::config::Settings::for_database(&format!("file:{}", file.display())).unwrap();
    let raw_db = statehouse::server::open_database(&settings.database).await.unwrap();
    let conn = raw_db.connect().await.unwrap();
    // As anyone using libSQL directly would: SQLite checkpoints inside the commits.
    conn.query("PRAGMA wal_autocheckpoint=1000", ()).await.unwrap().next().await.unwrap();
    let started = Instant::now();
    // The same keys in the order the writer saw them: each transaction took
    // about one write from each of the tasks, whose keys are spread over the index.
    for round in 0..(FENCE_WRITES / FENCE_IN_FLIGHT) {
        let tx = conn.transaction().await.unwrap();
        let kv = tx
            .prepare("INSERT INTO kv (ns, id, key, value, content_type, version) VALUES (?1, ?2, ?3, ?4, ?5, ?6)")
            .await
            .unwrap();
        let outbox = tx
            .prepare(
                "INSERT INTO outbox (kind, ns, id, version, fence, instance, ts, op, key, content_type, size, value, value_truncated, committed_ms)
                 VALUES ('change', ?1, ?2, ?3, ?4, ?5, ?6, 'put', ?7, ?8, ?9, ?10, 0, ?11)",
            )
            .await
            .unwrap();
        for task in 0..FENCE_IN_FLIGHT {
            let key = format!("k-{task}-{round}");
            let version = (round * FENCE_IN_FLIGHT + task) as i64;
            let now = statehouse::clock::now_ms();
            kv.execute(libsql::params![
                "bench",
                "raw",
                key.as_bytes(),
                b"value".as_slice(),
                "application/octet-stream",
                version
            ])
            .await
            .unwrap();
            kv.reset();
            outbox
                .execute(libsql::params![
                    "bench",
                    "raw",
                    version,
                    1,
                    "bench",
                    now * 1000,
                    key.as_str(),
                    "application/octet-stream",
                    5,
                    b"value".as_slice(),
                    now
                ])
                .await
                .unwrap();
            outbox.reset();
        }
        tx.commit().await.unwrap();
    }
    (FENCE_WRITES / FENCE_IN_FLIGHT * FENCE_IN_FLIGHT) as f64 / started.elapsed().as_secs_f64()
}

fn thread_exists(name: &str) -> bool {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .flatten()
        .any(|task| std::fs::read_to_string(task.path().join("comm")).is_ok_and(|comm| comm.trim() == name))
}

/// CPU seconds (user + system) used so far by this process's thread named `name`.
fn thread_cpu_seconds(name: &str) -> f64 {
    let ticks_per_second = 100.0; // USER_HZ on Linux
    for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if comm.trim() == name {
            let stat = std::fs::read_to_string(task.path().join("stat")).unwrap();
            // Fields after the parenthesised name: state is 3rd, utime 14th, stime 15th.
            let fields: Vec<&str> = stat.rsplit_once(')').unwrap().1.split_whitespace().collect();
            let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
            return ticks / ticks_per_second;
        }
    }
    panic!("no thread named {name}")
}

/// Raw libSQL on the same disk: single-row commits, and the same rows batched.
async fn baseline(dir: &std::path::Path) -> (f64, f64) {
    let db = libsql::Builder::new_local(dir.join("baseline.db")).build().await.unwrap();
    let conn = db.connect().unwrap();
    let mut rows = conn.query("PRAGMA journal_mode=WAL", ()).await.unwrap();
    while rows.next().await.unwrap().is_some() {}
    conn.execute("PRAGMA synchronous=FULL", ()).await.unwrap();
    conn.execute("CREATE TABLE t (k BLOB PRIMARY KEY, v BLOB) WITHOUT ROWID", ()).await.unwrap();
    let n = 3000;
    let started = Instant::now();
    for i in 0..n {
        conn.execute("INSERT INTO t VALUES (?1, ?2)", libsql::params![format!("single-{i}"), "value"]).await.unwrap();
    }
    let single = n as f64 / started.elapsed().as_secs_f64();
    let n = 100_000;
    let started = Instant::now();
    for chunk in 0..(n / 1000) {
        let tx = conn.transaction().await.unwrap();
        for i in 0..1000 {
            tx.execute("INSERT INTO t VALUES (?1, ?2)", libsql::params![format!("batch-{chunk}-{i}"), "value"])
                .await
                .unwrap();
        }
        tx.commit().await.unwrap();
    }
    let batched = n as f64 / started.elapsed().as_secs_f64();
    (single, batched)
}

/// A TCP proxy to `upstream` that holds every chunk `delay` in each
/// direction, in order: a database that far away (another zone or region).
async fn latency_proxy(upstream: String, delay: Duration) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((inbound, _)) = listener.accept().await {
            let upstream = upstream.clone();
            tokio::spawn(async move {
                let Ok(outbound) = tokio::net::TcpStream::connect(&upstream).await else { return };
                let _ = (inbound.set_nodelay(true), outbound.set_nodelay(true));
                let (from_client, to_client) = inbound.into_split();
                let (from_server, to_server) = outbound.into_split();
                tokio::spawn(delayed_copy(from_client, to_server, delay));
                tokio::spawn(delayed_copy(from_server, to_client, delay));
            });
        }
    });
    port
}

async fn delayed_copy(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    delay: Duration,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (chunks, mut due) = tokio::sync::mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let writer = tokio::spawn(async move {
        while let Some((read_at, bytes)) = due.recv().await {
            tokio::time::sleep_until((read_at + delay).into()).await;
            if to.write_all(&bytes).await.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await;
    });
    let mut buffer = vec![0u8; 64 * 1024];
    while let Ok(n @ 1..) = from.read(&mut buffer).await {
        if chunks.send((Instant::now(), buffer[..n].to_vec())).is_err() {
            break;
        }
    }
    drop(chunks);
    let _ = writer.await;
}

/// A libSQL server of the bench's own, from `SQLD_BIN`: the process and its URL.
fn start_sqld(dir: &std::path::Path) -> (std::process::Child, String) {
    let binary = std::env::var("SQLD_BIN").expect("--database sqld needs SQLD_BIN, the path of a sqld binary");
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let child = std::process::Command::new(&binary)
        .arg("--http-listen-addr")
        .arg(format!("127.0.0.1:{port}"))
        .arg("-d")
        .arg(dir.join("sqld-data"))
        .arg("--no-welcome")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start SQLD_BIN={binary}: {e}"));
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "sqld did not listen within 30 s");
        std::thread::sleep(Duration::from_millis(20));
    }
    (child, format!("http://127.0.0.1:{port}"))
}

/// What the libSQL server itself does with the rows a group commit writes,
/// with nothing of Statehouse in between: transactions sent back to back on
/// kept streams (one, or two at once), each one request holding BEGIN
/// IMMEDIATE, the object rows' UPDATE, one multi-row upsert of new keys, one
/// multi-row insert of their outbox rows, and COMMIT. `rows` = 16 is a
/// `put_one_object` group of 16 writes, 16 over 16 objects a `put_many_objects`
/// group, 160 over 16 objects a `batch_10` group.
async fn raw_sqld_limit(client: &reqwest::Client, url: &str, seconds: u64) {
    let text = |v: String| json!({"type": "text", "value": v});
    let int = |v: i64| json!({"type": "integer", "value": v.to_string()});
    let stmt = |sql: String, args: Vec<Value>| json!({"stmt": {"sql": sql, "args": args}});
    let send = |body: Value| async move {
        let answer: Value =
            client.post(format!("{url}/v3/pipeline")).json(&body).send().await.unwrap().json().await.unwrap();
        answer
    };
    // The objects the transactions write to.
    for object in 0..16 {
        let sql = "INSERT OR IGNORE INTO objects (ns, id, created_at, updated_at) VALUES ('rawbench', ?1, 0, 0)";
        send(json!({"requests": [{"type": "execute", "stmt": {"sql": sql, "args": [text(format!("o{object}"))]}}, {"type": "close"}]}))
            .await;
    }
    for (rows, objects) in [(1usize, 1usize), (16, 1), (16, 16), (160, 16)] {
        for streams in [1usize, 2] {
            let deadline = Instant::now() + Duration::from_secs(seconds);
            let done = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
            let tasks: Vec<_> = (0..streams)
                .map(|stream| {
                    let done = done.clone();
                    async move {
                        let mut baton: Option<String> = None;
                        let mut n = 0u64;
                        while Instant::now() < deadline {
                            let mut kv = Vec::new();
                            let mut outbox = Vec::new();
                            for row in 0..rows {
                                let id = format!("o{}", row % objects);
                                let key = format!("s{stream}-{n}-{row}");
                                kv.extend([text("rawbench".into()), text(id.clone()), text(key.clone()), text("value of some length".into()), text("text/plain".into()), int(n as i64)]);
                                outbox.extend([text(id), int(n as i64), text(key), int(20), text("value of some length".into())]);
                            }
                            let kv_sql = format!(
                                "INSERT INTO kv (ns, id, key, value, content_type, version) VALUES {} ON CONFLICT (ns, id, key) DO UPDATE SET value = excluded.value, version = excluded.version",
                                vec!["(?, ?, ?, ?, ?, ?)"; rows].join(", ")
                            );
                            let outbox_sql = format!(
                                "INSERT INTO outbox (kind, ns, id, version, fence, instance, ts, op, key, content_type, size, value, value_truncated, committed_ms) VALUES {}",
                                vec!["('change', 'rawbench', ?, ?, 1, 'raw', 0, 'put', ?, 'text/plain', ?, ?, 0, 0)"; rows].join(", ")
                            );
                            let ids: Vec<Value> = (0..objects).map(|o| text(format!("o{o}"))).collect();
                            let update_sql = format!(
                                "UPDATE objects SET version = version + 1, updated_at = 1 WHERE ns = 'rawbench' AND id IN ({})",
                                vec!["?"; objects].join(", ")
                            );
                            let steps = vec![
                                stmt("BEGIN IMMEDIATE".into(), vec![]),
                                stmt(update_sql, ids),
                                stmt(kv_sql, kv),
                                stmt(outbox_sql, outbox),
                                stmt("COMMIT".into(), vec![]),
                            ];
                            let answer = send(json!({"baton": baton, "requests": [{"type": "batch", "batch": {"steps": steps}}]})).await;
                            let errors = &answer["results"][0]["response"]["result"]["step_errors"];
                            assert!(
                                errors.as_array().is_some_and(|e| e.iter().all(Value::is_null)),
                                "raw sqld transaction failed: {answer}"
                            );
                            baton = answer["baton"].as_str().map(str::to_string);
                            n += 1;
                        }
                        done.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
                    }
                })
                .collect();
            futures::future::join_all(tasks).await;
            let txn_per_s = done.load(std::sync::atomic::Ordering::Relaxed) as f64 / seconds as f64;
            println!(
                "baseline=raw_sqld rows_per_txn={rows} objects_per_txn={objects} streams={streams} txn_per_s={txn_per_s:.0} rows_per_s={:.0} (the server alone: BEGIN IMMEDIATE, UPDATE objects, upsert kv, insert outbox, COMMIT in one request on a kept stream)",
                txn_per_s * rows as f64
            );
        }
    }
}

/// The median time of one `/v3/pipeline` request (`SELECT 1`) on a
/// kept-alive connection: on a stream kept between requests (its baton, as
/// the writer sends its batches), or on a new stream each time.
async fn pipeline_round_trip_ms(client: &reqwest::Client, url: &str, kept_stream: bool) -> f64 {
    let mut baton: Option<String> = None;
    let mut times = Vec::new();
    for _ in 0..200 {
        let mut requests = vec![json!({"type": "execute", "stmt": {"sql": "SELECT 1"}})];
        if !kept_stream {
            requests.push(json!({"type": "close"}));
        }
        let body = json!({"baton": baton, "requests": requests});
        let t = Instant::now();
        let r = client.post(format!("{url}/v3/pipeline")).json(&body).send().await.unwrap();
        assert!(r.status().is_success());
        let answer: Value = r.json().await.unwrap();
        times.push(t.elapsed().as_secs_f64() * 1000.0);
        baton = answer["baton"].as_str().map(str::to_string);
    }
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

/// The writer's counters from `/metrics`: groups committed, jobs in them,
/// round trips to a server, groups sent while another was in flight.
struct WriterCounters {
    groups: f64,
    jobs: f64,
    round_trips: f64,
    overlapped: f64,
}

async fn writer_counters(client: &reqwest::Client, base: &str) -> WriterCounters {
    let text = client.get(format!("{base}/metrics")).send().await.unwrap().text().await.unwrap();
    let value = |name: &str| {
        text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse::<f64>().ok()).unwrap_or(0.0)
    };
    WriterCounters {
        groups: value("statehouse_write_batch_size_count"),
        jobs: value("statehouse_write_batch_size_sum"),
        round_trips: value("statehouse_write_round_trips_total"),
        overlapped: value("statehouse_write_groups_overlapped_total"),
    }
}
