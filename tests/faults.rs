//! Fault injection with the real binary and real wire protocols: the
//! database's write lock held by another process, the database file read-only
//! (at start, and made immutable while the server runs), and the object store
//! stopped in the middle of blob uploads. Every client-visible failure must be
//! a 503 problem+json with Retry-After, nothing refused may be stored, and
//! everything acknowledged must be.
//!
//! Covered elsewhere, not repeated here: an object-store outage during the
//! Iceberg export (tests/analytics.rs), owners SIGKILLed or SIGSTOPped
//! mid-request (tests/fencing.rs: every answer is a commit or an error, and
//! acknowledged ⊆ stored), and a blob whose commit fails after its bytes were
//! uploaded (tests/blobs.rs).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::ledger::stored_keys;
use common::s3::S3Server;
use common::{unique_ns, Process, TestDatabase};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

const NOBODY: (u32, u32) = (65534, 65534);

fn client() -> reqwest::Client {
    reqwest::Client::builder().timeout(Duration::from_secs(60)).build().unwrap()
}

/// A 503 problem+json with Retry-After; returns its detail.
async fn expect_unavailable(response: reqwest::Response, what: &str) -> String {
    let status = response.status();
    let headers = response.headers().clone();
    let body = response.text().await.unwrap_or_default();
    assert_eq!(status, 503, "{what}: expected 503, got {status}: {body}");
    assert_eq!(headers.get("content-type").map(|v| v.to_str().unwrap()), Some("application/problem+json"), "{what}");
    let retry_after: u64 = headers
        .get("retry-after")
        .unwrap_or_else(|| panic!("{what}: a 503 without Retry-After"))
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry_after >= 1, "{what}: Retry-After {retry_after}");
    let problem: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(problem["type"], "https://statehouse.dev/problems/unavailable", "{what}: {problem}");
    problem["detail"].as_str().unwrap_or_default().to_string()
}

/// One write a client can make to an object, with what it leaves in the database.
#[derive(Debug, Clone)]
enum Op {
    Put {
        key: String,
        value: String,
    },
    /// Three puts in one atomic batch.
    Batch {
        keys: [String; 3],
    },
    Event {
        marker: String,
    },
    Delete {
        key: String,
    },
}

impl Op {
    /// The `i`-th write of a mixed workload; deletes take seeded keys in turn.
    fn nth(i: usize) -> Op {
        match i % 4 {
            0 => Op::Put { key: format!("p-{i}"), value: format!("value-{i}") },
            1 => Op::Batch { keys: [0, 1, 2].map(|j| format!("b-{i}-{j}")) },
            2 => Op::Event { marker: format!("e-{i}") },
            _ => Op::Delete { key: format!("seed-{}", i / 4) },
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            Op::Put { .. } => "put",
            Op::Batch { .. } => "batch",
            Op::Event { .. } => "event",
            Op::Delete { .. } => "delete",
        }
    }

    async fn send(
        &self,
        client: &reqwest::Client,
        base: &str,
        ns: &str,
        id: &str,
    ) -> reqwest::Result<reqwest::Response> {
        let object = format!("{base}/v1/objects/{ns}/{id}");
        match self {
            Op::Put { key, value } => client.put(format!("{object}/kv/{key}")).body(value.clone()).send().await,
            Op::Batch { keys } => {
                let ops: Vec<Value> = keys.iter().map(|k| json!({"op": "put", "key": k, "value": k})).collect();
                client.post(format!("{object}/batch")).json(&json!({ "ops": ops })).send().await
            }
            Op::Event { marker } => {
                let events = json!({"events": [{"type": "FaultProbe", "data": {"marker": marker}}]});
                client.post(format!("{object}/events")).json(&events).send().await
            }
            Op::Delete { key } => client.delete(format!("{object}/kv/{key}")).send().await,
        }
    }

    /// Whether the database holds this write's effect. A batch is all or
    /// nothing, and an event is recorded at most once: anything else panics.
    fn applied(&self, state: &ObjectState) -> bool {
        match self {
            Op::Put { key, value } => state.keys.get(key).is_some_and(|stored| stored == value.as_bytes()),
            Op::Batch { keys } => {
                let present = keys.iter().filter(|k| state.keys.contains_key(*k)).count();
                assert!(present == 0 || present == 3, "a partial batch is stored: {present} of {keys:?}");
                present == 3
            }
            Op::Event { marker } => {
                let n = state.events.iter().filter(|m| *m == marker).count();
                assert!(n <= 1, "event {marker} recorded {n} times");
                n == 1
            }
            Op::Delete { key } => !state.keys.contains_key(key),
        }
    }
}

/// What the database file holds for one object, read with a connection of
/// the test's own (the ground truth, not the server's answers).
#[derive(Debug, Default)]
struct ObjectState {
    version: i64,
    keys: BTreeMap<String, Vec<u8>>,
    /// Markers of the object's events in the outbox (the export is off).
    events: Vec<String>,
}

async fn object_state(db_path: &Path, ns: &str, id: &str) -> ObjectState {
    let db = libsql::Builder::new_local(db_path).build().await.unwrap();
    let conn = db.connect().unwrap();
    conn.busy_timeout(Duration::from_secs(10)).unwrap();
    let mut state = ObjectState::default();
    let mut rows = conn.query("SELECT version FROM objects WHERE ns = ?1 AND id = ?2", [ns, id]).await.unwrap();
    if let Some(row) = rows.next().await.unwrap() {
        state.version = row.get(0).unwrap();
    }
    let mut rows = conn.query("SELECT key, value FROM kv WHERE ns = ?1 AND id = ?2", [ns, id]).await.unwrap();
    while let Some(row) = rows.next().await.unwrap() {
        let key: Vec<u8> = row.get(0).unwrap();
        state.keys.insert(String::from_utf8(key).unwrap(), row.get(1).unwrap());
    }
    let mut rows =
        conn.query("SELECT data FROM outbox WHERE kind = 'event' AND ns = ?1 AND id = ?2", [ns, id]).await.unwrap();
    while let Some(row) = rows.next().await.unwrap() {
        let data: String = row.get(0).unwrap();
        let data: Value = serde_json::from_str(&data).unwrap();
        state.events.push(data["marker"].as_str().unwrap().to_string());
    }
    state
}

/// Seeds `object` with `seed-0..n` (value `old-i`); the object's version is then n.
async fn seed(client: &reqwest::Client, base: &str, ns: &str, id: &str, n: usize) {
    for i in 0..n {
        let r = client
            .put(format!("{base}/v1/objects/{ns}/{id}/kv/seed-{i}"))
            .body(format!("old-{i}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "seeding {id}/seed-{i}");
    }
}

/// One answer to one write.
#[derive(Debug, Clone)]
struct Attempt {
    writer: usize,
    op: usize,
    status: u16,
    sent: Instant,
    answered: Instant,
    detail: String,
}

// ---------------------------------------------------------------------------
// 1. The write lock held by another process.
// ---------------------------------------------------------------------------

/// Another process holds the database's write lock for longer than the
/// server's busy timeout. Writes of every kind answer 503 (never 2xx while
/// the lock is held, never 500), reads go on answering the old values, and
/// once the lock is released the database holds exactly the acknowledged
/// writes; the refused ones then succeed when sent again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_locked_database_answers_503_and_keeps_exactly_the_acknowledged_writes() {
    // Holding the write lock from outside needs the database file itself.
    let db = TestDatabase::file();
    const WRITERS: usize = 8;
    const SEEDS: usize = 64;
    let path = db.file_path().unwrap();
    let server = Process::start(&db.url, 0, &[("STATEHOUSE_EXPORT_ENABLED", "false".to_string())]);
    let base = server.base.clone();
    let client = client();
    let ns = unique_ns("locked");
    for w in 0..WRITERS {
        seed(&client, &base, &ns, &format!("w{w}"), SEEDS).await;
    }

    // Another process takes the write lock: a connection of the test process.
    let locker_db = libsql::Builder::new_local(&path).build().await.unwrap();
    let locker = locker_db.connect().unwrap();
    locker.busy_timeout(Duration::from_secs(10)).unwrap();
    locker.execute("BEGIN EXCLUSIVE", ()).await.unwrap();
    // A change of the locker's own, rolled back at the end: never visible to anyone.
    locker
        .execute(
            "INSERT INTO kv (ns, id, key, value, content_type, version)
             VALUES (?1, 'w0', CAST('locker' AS BLOB), CAST('uncommitted' AS BLOB), 'text/plain', 0)",
            [ns.as_str()],
        )
        .await
        .unwrap();
    let locked_at = Instant::now();

    let attempts: Arc<Mutex<Vec<Attempt>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let (attempts, stop, client, base, ns) =
            (attempts.clone(), stop.clone(), client.clone(), base.clone(), ns.clone());
        writers.push(tokio::spawn(async move {
            // Writer w keeps to one kind of write (op i has kind i % 4).
            let mut i = w;
            while !stop.load(Ordering::Relaxed) {
                let op = Op::nth(i);
                let sent = Instant::now();
                let (status, detail, retry_after) = match op.send(&client, &base, &ns, &format!("w{w}")).await {
                    Ok(r) => {
                        let status = r.status().as_u16();
                        let retry_after = r.headers().get("retry-after").map(|v| v.to_str().unwrap().to_string());
                        let is_problem =
                            r.headers().get("content-type").is_some_and(|v| v == "application/problem+json");
                        let body = r.text().await.unwrap_or_default();
                        let detail =
                            if status == 503 && !is_problem { format!("NOT problem+json: {body}") } else { body };
                        (status, detail, retry_after)
                    }
                    Err(err) => (0, format!("transport error: {err}"), None),
                };
                let answered = Instant::now();
                attempts.lock().unwrap().push(Attempt { writer: w, op: i, status, sent, answered, detail });
                if status == 503 {
                    // A polite client waits as long as it is told before its next write.
                    let secs: u64 = retry_after.as_deref().and_then(|v| v.parse().ok()).unwrap_or(0);
                    assert!(secs >= 1, "503 without a usable Retry-After ({retry_after:?})");
                    tokio::time::sleep(Duration::from_secs(secs)).await;
                }
                i += WRITERS;
            }
        }));
    }
    // Readers meanwhile: keys written before the lock, never touched by the writers.
    let reads: Arc<Mutex<Vec<(u16, String, Duration)>>> = Arc::default();
    let reader = {
        let (reads, stop, client, base, ns) = (reads.clone(), stop.clone(), client.clone(), base.clone(), ns.clone());
        tokio::spawn(async move {
            let mut n = 0usize;
            while !stop.load(Ordering::Relaxed) {
                let key = SEEDS - 1 - n % 8;
                let started = Instant::now();
                let r =
                    client.get(format!("{base}/v1/objects/{ns}/w{}/kv/seed-{key}", n % WRITERS)).send().await.unwrap();
                let status = r.status().as_u16();
                let body = r.text().await.unwrap();
                assert_eq!((status, body.as_str()), (200, format!("old-{key}").as_str()), "a read during the lock");
                reads.lock().unwrap().push((status, body, started.elapsed()));
                n += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };

    // Hold the lock until every writer has been refused at least once.
    let deadline = locked_at + Duration::from_secs(60);
    loop {
        let refused: BTreeSet<usize> =
            attempts.lock().unwrap().iter().filter(|a| a.status == 503).map(|a| a.writer).collect();
        if refused.len() == WRITERS {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "after 60 s of lock only writers {refused:?} were refused; answers: {:#?}",
            attempts.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let release_started = Instant::now();
    locker.execute("ROLLBACK", ()).await.unwrap();
    let held = release_started - locked_at;
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.await.unwrap();
    }
    reader.await.unwrap();

    let attempts = attempts.lock().unwrap().clone();
    let unexpected: Vec<&Attempt> = attempts.iter().filter(|a| a.status != 200 && a.status != 503).collect();
    assert!(unexpected.is_empty(), "answers other than 200 and 503: {unexpected:#?}");
    let bad_503: Vec<&Attempt> = attempts.iter().filter(|a| a.detail.starts_with("NOT problem+json")).collect();
    assert!(bad_503.is_empty(), "503s that are not problem+json: {bad_503:#?}");
    let early_acks: Vec<&Attempt> =
        attempts.iter().filter(|a| a.status == 200 && a.answered < release_started).collect();
    assert!(early_acks.is_empty(), "writes acknowledged while another process held the write lock: {early_acks:#?}");
    let first_503 = attempts.iter().filter(|a| a.status == 503).map(|a| a.answered - a.sent).min().unwrap();
    // One busy timeout (5 s), not several in a row: the refusal comes when the lock wait gives up.
    assert!(first_503 < Duration::from_secs(10), "the first 503 took {first_503:?}");
    // Refused for the lock, not for a request timeout (whose write may still commit later).
    let details: BTreeSet<&str> = attempts.iter().filter(|a| a.status == 503).map(|a| a.detail.as_str()).collect();
    assert!(details.iter().all(|d| d.contains("database is locked")), "{details:#?}");
    let reads = reads.lock().unwrap().clone();
    let slowest_read = reads.iter().map(|r| r.2).max().unwrap_or_default();
    assert!(reads.len() >= 5, "only {} reads while the lock was held", reads.len());
    assert!(slowest_read < Duration::from_secs(2), "a read waited {slowest_read:?} behind the lock");

    // Quiescent now: the database holds exactly the acknowledged writes.
    let mut stored = 0;
    for w in 0..WRITERS {
        let state = object_state(&path, &ns, &format!("w{w}")).await;
        let mut acked = 0i64;
        for a in attempts.iter().filter(|a| a.writer == w) {
            let applied = Op::nth(a.op).applied(&state);
            assert_eq!(
                applied,
                a.status == 200,
                "writer {w} op {} ({}) answered {}: {}",
                a.op,
                Op::nth(a.op).kind(),
                a.status,
                a.detail
            );
            stored += usize::from(applied);
            acked += i64::from(a.status == 200);
        }
        assert_eq!(state.version, SEEDS as i64 + acked, "w{w}: version != seeds + acknowledged writes");
        assert!(!state.keys.contains_key("locker"), "the locker's rolled-back write is visible");
    }
    let acknowledged = attempts.iter().filter(|a| a.status == 200).count();
    let refused: Vec<&Attempt> = attempts.iter().filter(|a| a.status == 503).collect();
    assert_eq!(stored, acknowledged);

    // The refused writes, sent again, now succeed.
    for a in &refused {
        let r = Op::nth(a.op).send(&client, &base, &ns, &format!("w{}", a.writer)).await.unwrap();
        let status = r.status();
        assert_eq!(status, 200, "retrying writer {} op {}: {}", a.writer, a.op, r.text().await.unwrap());
    }
    let mut stored_after = 0;
    for w in 0..WRITERS {
        let state = object_state(&path, &ns, &format!("w{w}")).await;
        let mine: Vec<&Attempt> = attempts.iter().filter(|a| a.writer == w).collect();
        for a in &mine {
            assert!(Op::nth(a.op).applied(&state), "writer {w} op {} missing after its retry", a.op);
        }
        stored_after += mine.len();
        assert_eq!(state.version, (SEEDS + mine.len()) as i64, "w{w}: version after the retries");
    }
    let kinds: BTreeMap<&str, (usize, usize)> = attempts.iter().fold(BTreeMap::new(), |mut m, a| {
        let e = m.entry(Op::nth(a.op).kind()).or_insert((0, 0));
        e.0 += 1;
        e.1 += usize::from(a.status == 503);
        m
    });
    println!(
        "faults: locked tried={} acknowledged={acknowledged} refused_503={} stored={stored} \
         (after release, refused writes retried={} acknowledged={} stored={stored_after}); \
         lock held {:.1}s, first 503 after {:.1}s, acks while locked=0, \
         reads during the lock={} (slowest {} ms); tried/503 by kind {kinds:?}",
        attempts.len(),
        refused.len(),
        refused.len(),
        refused.len(),
        held.as_secs_f64(),
        first_503.as_secs_f64(),
        reads.len(),
        slowest_read.as_millis()
    );
    server.assert_no_panic();
}

// ---------------------------------------------------------------------------
// 2. The database file read-only.
// ---------------------------------------------------------------------------

/// The file names SQLite uses for `db`: itself, its WAL and its shared-memory index.
fn database_files(db: &Path) -> [PathBuf; 3] {
    let name = db.file_name().unwrap().to_string_lossy().to_string();
    [db.to_path_buf(), db.with_file_name(format!("{name}-wal")), db.with_file_name(format!("{name}-shm"))]
}

fn sha_of_files(files: &[PathBuf]) -> BTreeMap<String, String> {
    files
        .iter()
        .filter(|f| f.exists())
        .map(|f| {
            (
                f.file_name().unwrap().to_string_lossy().to_string(),
                hex::encode(Sha256::digest(std::fs::read(f).unwrap())),
            )
        })
        .collect()
}

/// Makes the database's folder and files read-only (mode 0555/0444) until dropped.
/// Root ignores modes: the server then runs as another user (`NOBODY`).
struct ReadOnly {
    dir: PathBuf,
}

impl ReadOnly {
    fn apply(dir: &Path) -> ReadOnly {
        use std::os::unix::fs::PermissionsExt;
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_file() {
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o444)).unwrap();
            }
        }
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o555)).unwrap();
        ReadOnly { dir: dir.to_path_buf() }
    }
}

impl Drop for ReadOnly {
    fn drop(&mut self) {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(&self.dir, std::fs::Permissions::from_mode(0o700));
        if let Ok(entries) = std::fs::read_dir(&self.dir) {
            for entry in entries.flatten() {
                if entry.path().is_file() {
                    let _ = std::fs::set_permissions(entry.path(), std::fs::Permissions::from_mode(0o644));
                }
            }
        }
    }
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Who runs the server on a read-only file: root would write anyway.
fn read_only_user(db_dir: &Path) -> Option<(u32, u32)> {
    if !is_root() {
        return None;
    }
    use std::os::unix::fs::PermissionsExt;
    // The other user must reach the folder: every ancestor searchable by others.
    for ancestor in db_dir.ancestors().skip(1) {
        let mode = std::fs::metadata(ancestor).unwrap().permissions().mode();
        assert!(
            mode & 0o001 != 0,
            "{} is not searchable by other users (mode {mode:o}): set TMPDIR to a world-searchable folder",
            ancestor.display()
        );
    }
    Some(NOBODY)
}

/// The writes tried against a read-only database; all must be refused.
fn read_only_writes() -> Vec<Op> {
    vec![
        Op::Put { key: "new".into(), value: "new-value".into() },
        Op::Put { key: "seed-0".into(), value: "overwritten".into() },
        Op::Batch { keys: ["rb-0", "rb-1", "rb-2"].map(String::from) },
        Op::Event { marker: "ro-event".into() },
        Op::Delete { key: "seed-1".into() },
    ]
}

/// The server started on a database file it cannot write. With the WAL and
/// its index present (as a crashed server leaves them) it starts, serves
/// reads, refuses every write with 503 + Retry-After, and changes no byte of
/// any database file. Without them (a checkpointed, closed database) SQLite
/// cannot open the WAL database read-only, and the server exits at once with
/// a one-line error naming TURSO_URL. Writable again, the same writes succeed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_database_file_serves_reads_and_refuses_writes() {
    let db = TestDatabase::file();
    const SEEDS: usize = 8;
    let path = db.file_path().unwrap();
    let dir = db.dir.path().to_path_buf();
    let files = database_files(&path);
    // Short leases: the killed server's lease on the object must have run out
    // before the writable server takes it (until then writes are forwarded to
    // the dead owner and answer 503, rightly).
    const LEASE_MS: u64 = 500;
    let env = [("STATEHOUSE_EXPORT_ENABLED", "false".to_string()), ("STATEHOUSE_LEASE_MS", LEASE_MS.to_string())];
    let client = client();
    let ns = unique_ns("readonly");

    let mut server = Process::start(&db.url, 0, &env);
    seed(&client, &server.base, &ns, "o", SEEDS).await;
    // Killed, it leaves the WAL and its index behind, as a crash would (a clean
    // stop may checkpoint and remove them: that is case (b) below).
    server.kill();
    let killed_at = Instant::now();
    let before = sha_of_files(&files);
    assert!(before.len() == 3, "a killed server leaves the database, its WAL and its index: {:?}", before.keys());
    let user = read_only_user(&dir);

    // (a) Read-only, with the WAL and index present.
    let started = Instant::now();
    let mut tried = 0;
    {
        let _read_only = ReadOnly::apply(&dir);
        let mut server = Process::start_as(&db.url, 0, &env, user);
        let base = server.base.clone();
        let check_reads = |label: &'static str| {
            let (client, base, ns) = (client.clone(), base.clone(), ns.clone());
            async move {
                for i in 0..SEEDS {
                    let r = client.get(format!("{base}/v1/objects/{ns}/o/kv/seed-{i}")).send().await.unwrap();
                    assert_eq!(r.status(), 200, "{label}: read of seed-{i}");
                    assert_eq!(r.text().await.unwrap(), format!("old-{i}"), "{label}");
                }
                let info: Value =
                    client.get(format!("{base}/v1/objects/{ns}/o")).send().await.unwrap().json().await.unwrap();
                assert_eq!(info["version"], SEEDS as i64, "{label}: {info}");
                let keys = stored_keys(&client, &base, &ns, "o").await;
                assert_eq!(keys.len(), SEEDS, "{label}: {keys:?}");
            }
        };
        check_reads("before the writes").await;
        // Reachable and migrated: ready, so that reads are still routed to it.
        assert_eq!(client.get(format!("{base}/readyz")).send().await.unwrap().status(), 200);
        let mut details = BTreeSet::new();
        for op in read_only_writes() {
            tried += 1;
            let r = op.send(&client, &base, &ns, "o").await.unwrap();
            details.insert(expect_unavailable(r, &format!("read-only {}", op.kind())).await);
        }
        tried += 1;
        let r = client.delete(format!("{base}/v1/objects/{ns}/o")).send().await.unwrap();
        details.insert(expect_unavailable(r, "read-only delete-all").await);
        tried += 1;
        let r = client.put(format!("{base}/v1/objects/{ns}/o/blobs/b")).body(vec![7u8; 4096]).send().await.unwrap();
        details.insert(expect_unavailable(r, "read-only blob upload").await);
        assert!(details.iter().all(|d| d.contains("readonly")), "{details:?}");
        check_reads("after the refused writes").await;
        let r = client.get(format!("{base}/v1/objects/{ns}/o/blobs/b")).send().await.unwrap();
        assert_eq!(r.status(), 404, "the refused blob is visible");
        server.terminate();
        server.assert_no_panic();
        println!("faults: read-only (WAL present): server ran as {user:?}, refusals: {details:?}");
    }
    assert_eq!(sha_of_files(&files), before, "the read-only server changed a database file");
    let state = object_state(&path, &ns, "o").await;
    assert_eq!(state.version, SEEDS as i64);
    let stored_while_read_only = read_only_writes().iter().filter(|op| op.applied(&state)).count();
    assert_eq!(stored_while_read_only, 0);
    assert!(state.keys.keys().all(|k| k.starts_with("seed-")), "{:?}", state.keys.keys());

    // (b) Read-only, checkpointed and closed: no WAL, no index, and no right to create them.
    {
        let conn = libsql::Builder::new_local(&path).build().await.unwrap().connect().unwrap();
        let mut rows = conn.query("PRAGMA wal_checkpoint(TRUNCATE)", ()).await.unwrap();
        let row = rows.next().await.unwrap().unwrap();
        assert_eq!(row.get::<i64>(0).unwrap(), 0, "the checkpoint was blocked");
    }
    for extra in &files[1..] {
        let _ = std::fs::remove_file(extra);
    }
    let (exit, stderr) = {
        let _read_only = ReadOnly::apply(&dir);
        let (mut cmd, _program) = common::statehouse_command(user);
        let objects = tempfile::tempdir().unwrap();
        if let Some((uid, gid)) = user {
            std::os::unix::fs::chown(objects.path(), Some(uid), Some(gid)).unwrap();
        }
        let mut child = cmd
            .env_clear()
            .env("TURSO_URL", &db.url)
            .env("STATEHOUSE_LISTEN", "127.0.0.1:0")
            .env("STATEHOUSE_OBJECTS_DIR", objects.path())
            .env("STATEHOUSE_LOG_FORMAT", "json")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("run statehouse");
        let deadline = Instant::now() + Duration::from_secs(60);
        let exit = loop {
            if let Some(exit) = child.try_wait().unwrap() {
                break exit;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("the server neither started nor exited within 60 s on a read-only database without its WAL");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut stderr = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
        (exit, stderr)
    };
    assert!(!exit.success(), "the server started on a database it can neither write nor open read-only");
    let last = stderr.trim_end().lines().last().unwrap_or_default().to_string();
    assert!(
        last.starts_with(&format!("error: cannot open the database at TURSO_URL={}", db.url)),
        "expected a one-line error naming TURSO_URL, got:\n{stderr}"
    );
    println!("faults: read-only (checkpointed, no WAL): exit code {:?}, {last}", exit.code());

    // Writable again: the same writes succeed.
    tokio::time::sleep_until((killed_at + Duration::from_millis(2 * LEASE_MS)).into()).await;
    let server = Process::start(&db.url, 0, &env);
    let mut acknowledged = 0;
    for op in read_only_writes() {
        let r = op.send(&client, &server.base, &ns, "o").await.unwrap();
        if r.status() != 200 {
            panic!("{} after the file became writable again: {} {}", op.kind(), r.status(), r.text().await.unwrap());
        }
        acknowledged += 1;
    }
    let state = object_state(&path, &ns, "o").await;
    let stored = read_only_writes().iter().filter(|op| op.applied(&state)).count();
    assert_eq!(stored, acknowledged);
    assert_eq!(state.version, (SEEDS + acknowledged) as i64);
    println!(
        "faults: read-only tried={tried} acknowledged=0 stored=0 (database files byte-identical), \
         then writable: tried={acknowledged} acknowledged={acknowledged} stored={stored}; {:.1}s",
        started.elapsed().as_secs_f64()
    );
    server.assert_no_panic();
}

// ---------------------------------------------------------------------------
// 2b. The database file made immutable while the server runs.
// ---------------------------------------------------------------------------

/// The Linux immutable attribute (chattr +i) on a set of files, cleared when dropped.
/// Unlike a mode change it also stops writes through descriptors already open.
struct Immutable {
    files: Vec<PathBuf>,
}

const FS_IMMUTABLE_FL: libc::c_long = 0x10;

fn set_immutable(path: &Path, on: bool) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let file = std::fs::File::open(path)?;
    let mut flags: libc::c_long = 0;
    // SAFETY: FS_IOC_GETFLAGS/SETFLAGS read and write one long through a valid pointer.
    unsafe {
        if libc::ioctl(file.as_raw_fd(), libc::FS_IOC_GETFLAGS, &mut flags) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        flags = if on { flags | FS_IMMUTABLE_FL } else { flags & !FS_IMMUTABLE_FL };
        if libc::ioctl(file.as_raw_fd(), libc::FS_IOC_SETFLAGS, &flags) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

impl Immutable {
    fn set(files: &[PathBuf]) -> std::io::Result<Immutable> {
        let mut done = Immutable { files: Vec::new() };
        for f in files {
            set_immutable(f, true)?;
            done.files.push(f.clone());
        }
        Ok(done)
    }
}

impl Drop for Immutable {
    fn drop(&mut self) {
        for f in &self.files {
            if let Err(e) = set_immutable(f, false) {
                eprintln!("could not clear the immutable flag of {}: {e}; run chattr -i on it", f.display());
            }
        }
    }
}

/// The database file and its WAL become immutable under a running server (a
/// mode change would not do: the server's descriptors are already open).
/// Writes answer 503 + Retry-After, reads answer the old values, and once
/// the flag is cleared the same writes succeed; stored = acknowledged.
/// Needs CAP_LINUX_IMMUTABLE and a file system with the attribute (ext4,
/// xfs, btrfs); without them it fails, saying what is missing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_file_made_immutable_under_a_running_server_answers_503() {
    let db = TestDatabase::file();
    const SEEDS: usize = 8;
    let path = db.file_path().unwrap();
    let files = database_files(&path);
    let server = Process::start(&db.url, 0, &[("STATEHOUSE_EXPORT_ENABLED", "false".to_string())]);
    let client = client();
    let ns = unique_ns("immutable");
    seed(&client, &server.base, &ns, "o", SEEDS).await;
    let probe = db.dir.path().join("probe");
    std::fs::write(&probe, b"probe").unwrap();
    if let Err(e) = set_immutable(&probe, true) {
        panic!(
            "cannot set the immutable attribute here ({e}): this test needs CAP_LINUX_IMMUTABLE (root) and a \
             file system with the flag (ext4, xfs, btrfs) under TMPDIR"
        );
    }
    set_immutable(&probe, false).unwrap();

    let started = Instant::now();
    let ops = read_only_writes();
    let mut details = BTreeSet::new();
    {
        let _immutable = Immutable::set(&files[..2]).unwrap();
        for op in &ops {
            let r = op.send(&client, &server.base, &ns, "o").await.unwrap();
            details.insert(expect_unavailable(r, &format!("immutable {}", op.kind())).await);
        }
        for i in 0..SEEDS {
            let r = client.get(format!("{}/v1/objects/{ns}/o/kv/seed-{i}", server.base)).send().await.unwrap();
            assert_eq!(r.status(), 200);
            assert_eq!(r.text().await.unwrap(), format!("old-{i}"));
        }
        let state = object_state(&path, &ns, "o").await;
        assert_eq!(state.version, SEEDS as i64);
        assert_eq!(ops.iter().filter(|op| op.applied(&state)).count(), 0, "a refused write is stored");
    }
    let mut acknowledged = 0;
    for op in &ops {
        let r = op.send(&client, &server.base, &ns, "o").await.unwrap();
        assert_eq!(r.status(), 200, "{} once the file is writable again", op.kind());
        acknowledged += 1;
    }
    let state = object_state(&path, &ns, "o").await;
    let stored = ops.iter().filter(|op| op.applied(&state)).count();
    assert_eq!(stored, acknowledged);
    assert_eq!(state.version, (SEEDS + acknowledged) as i64);
    println!(
        "faults: immutable tried={} acknowledged=0 stored=0 while immutable ({details:?}), \
         then tried={acknowledged} acknowledged={acknowledged} stored={stored}; {:.1}s",
        ops.len(),
        started.elapsed().as_secs_f64()
    );
    server.assert_no_panic();
}

// ---------------------------------------------------------------------------
// 3. The object store stopped during blob uploads.
// ---------------------------------------------------------------------------

fn pattern(seed: u8, size: usize) -> Vec<u8> {
    (0..size).map(|i| (i as u64 * 31 + seed as u64 * 7 + (i as u64 >> 12)) as u8).collect()
}

fn sha(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Files s3s-fs keeps for multipart uploads still open (neither completed nor aborted).
fn open_multipart_uploads(root: &Path) -> (Vec<String>, Vec<(String, u64)>) {
    let mut uploads = Vec::new();
    let mut parts = Vec::new();
    for entry in std::fs::read_dir(root).unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        if name.starts_with(".upload-") && name.ends_with(".json") {
            uploads.push(name);
        } else if name.starts_with(".upload_id-") {
            parts.push((name, entry.metadata().map(|m| m.len()).unwrap_or(0)));
        }
    }
    (uploads, parts)
}

/// Every object s3s-fs stores under `prefix` in `bucket`.
fn stored_objects(root: &Path, bucket: &str, prefix: &str) -> Vec<String> {
    fn walk(dir: &Path, base: &Path, out: &mut Vec<String>) {
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                walk(&path, base, out);
            } else {
                let name = entry.file_name().to_string_lossy().to_string();
                // s3s-fs keeps metadata beside the data in dot-files.
                if !name.starts_with('.') {
                    out.push(path.strip_prefix(base).unwrap().display().to_string());
                }
            }
        }
    }
    let mut out = Vec::new();
    let bucket_root = root.join(bucket);
    walk(&bucket_root.join(prefix), &bucket_root, &mut out);
    out.sort();
    out
}

/// The object store (S3 wire protocol, s3s-fs) stops while a 20 MiB upload
/// streams in (after its first multipart part is stored), and stays down for
/// new uploads, small (one PUT) and large (multipart). Each answers 503
/// problem+json with Retry-After; none becomes visible (GET 404, not listed,
/// no object in the store); an existing blob's bytes answer 503 (not 404, 416
/// or 500) while its metadata still reads. Once the store is back the same
/// uploads succeed and read back byte-identical; the store holds exactly one
/// object per acknowledged blob.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_object_store_outage_during_blob_uploads_loses_nothing() {
    const BUCKET: &str = "faults";
    const MIB: usize = 1024 * 1024;
    const CHUNK: usize = 256 * 1024;
    let db = TestDatabase::new();
    let mut s3 = S3Server::start(Some(BUCKET)).await;
    let settings = s3.settings(BUCKET);
    let env = [
        ("R2_ENDPOINT", settings.r2_endpoint.clone().unwrap()),
        ("R2_BUCKET", settings.r2_bucket.clone().unwrap()),
        ("R2_ACCESS_KEY_ID", settings.r2_access_key_id.as_ref().unwrap().expose().to_string()),
        ("R2_SECRET_ACCESS_KEY", settings.r2_secret_access_key.as_ref().unwrap().expose().to_string()),
        ("R2_REGION", settings.r2_region.clone()),
        ("STATEHOUSE_EXPORT_ENABLED", "false".to_string()),
    ];
    let server = Process::start(&db.url, 0, &env);
    let base = server.base.clone();
    let client = client();
    let ns = unique_ns("blobfault");
    let url = |name: &str| format!("{base}/v1/objects/{ns}/o/blobs/{name}");

    let existing = pattern(1, 300 * 1024);
    let r = client.put(url("existing")).body(existing.clone()).send().await.unwrap();
    assert_eq!(r.status(), 200);

    // The uploads of the outage: name -> bytes.
    let uploads: Vec<(&str, Vec<u8>)> =
        vec![("streamed", pattern(2, 20 * MIB)), ("small", pattern(3, 100 * 1024)), ("large", pattern(4, 12 * MIB))];
    let mut attempts = 0;
    let started = Instant::now();

    // The streamed upload: its body arrives chunk by chunk, as the test sends it.
    let (tx, rx) = tokio::sync::mpsc::channel::<Vec<u8>>(4);
    let body = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|chunk| (Ok::<_, std::io::Error>(chunk), rx))
    });
    let streamed = {
        let (client, url) = (client.clone(), url("streamed"));
        tokio::spawn(async move { client.put(url).body(reqwest::Body::wrap_stream(body)).send().await })
    };
    attempts += 1;
    let bytes = &uploads[0].1;
    let mut chunks = bytes.chunks(CHUNK);
    // A little over one part (8 MiB): the server starts a multipart upload and sends part 1.
    for chunk in chunks.by_ref().take(9 * MIB / CHUNK) {
        tx.send(chunk.to_vec()).await.unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (open, parts) = open_multipart_uploads(&s3.root);
        if open.len() == 1 && parts.iter().any(|(_, size)| *size as usize == 8 * MIB) {
            break;
        }
        assert!(Instant::now() < deadline, "the first part never reached the store: {open:?} {parts:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    s3.stop();
    let stopped_at = Instant::now();
    for chunk in chunks {
        tx.send(chunk.to_vec()).await.unwrap();
    }
    drop(tx);
    let response = streamed.await.unwrap().expect("the streamed upload got an answer, not a broken connection");
    let mut details = vec![expect_unavailable(response, "upload streaming when the store stopped").await];
    let first_answer = stopped_at.elapsed();

    // New uploads while the store is down.
    for (name, bytes) in &uploads[1..] {
        attempts += 1;
        let sent = Instant::now();
        let r = client.put(url(name)).body(bytes.clone()).send().await.unwrap();
        details.push(expect_unavailable(r, &format!("upload {name} while the store is down")).await);
        assert!(sent.elapsed() < Duration::from_secs(30), "{name}: took {:?}", sent.elapsed());
    }
    // The existing blob: its metadata reads, its bytes are unavailable.
    let r = client.head(url("existing")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let r = client.get(url("existing")).send().await.unwrap();
    details.push(expect_unavailable(r, "download while the store is down").await);
    let r = client.get(url("existing")).header("range", "bytes=0-99").send().await.unwrap();
    details.push(expect_unavailable(r, "ranged download while the store is down").await);
    // Nothing of the failed uploads is visible.
    for (name, _) in &uploads {
        let r = client.get(url(name)).send().await.unwrap();
        assert_eq!(r.status(), 404, "{name} is visible after a failed upload");
    }
    let listed: Value =
        client.get(format!("{base}/v1/objects/{ns}/o/blobs")).send().await.unwrap().json().await.unwrap();
    let names: Vec<&str> = listed["items"].as_array().unwrap().iter().map(|b| b["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["existing"], "{listed}");
    let outage = stopped_at.elapsed();

    s3.restart().await;
    assert_eq!(
        stored_objects(&s3.root, BUCKET, &format!("blobs/{ns}")).len(),
        1,
        "bytes of a failed upload are stored as an object"
    );
    // The upload streaming when the store stopped could not be aborted (the
    // store was down); nothing else may leave a multipart upload open.
    let (left_open, left_parts) = open_multipart_uploads(&s3.root);
    assert!(left_open.len() <= 1, "multipart uploads left open: {left_open:?}");

    // The same uploads, once the store is back.
    let mut acknowledged = 0;
    for (name, bytes) in &uploads {
        attempts += 1;
        let r = client.put(url(name)).body(bytes.clone()).send().await.unwrap();
        if r.status() != 200 {
            panic!("{name} after the store came back: {} {}", r.status(), r.text().await.unwrap());
        }
        let written: Value = r.json().await.unwrap();
        assert_eq!(written["size"], bytes.len());
        assert_eq!(written["sha256"], sha(bytes));
        acknowledged += 1;
    }
    for (name, bytes) in uploads.iter().chain([("existing", existing.clone())].iter()) {
        let r = client.get(url(name)).send().await.unwrap();
        assert_eq!(r.status(), 200);
        let got = r.bytes().await.unwrap();
        assert!(got.len() == bytes.len() && sha(&got) == sha(bytes), "{name} does not read back byte-identical");
    }
    let stored = stored_objects(&s3.root, BUCKET, &format!("blobs/{ns}"));
    assert_eq!(stored.len(), acknowledged + 1, "one object per acknowledged blob: {stored:?}");
    println!(
        "faults: blob-outage tried={} uploads in {attempts} attempts, acknowledged=0 while the store was down \
         ({} refusals, first {:.1}s after the stop, outage {:.1}s), then acknowledged={acknowledged} stored={} \
         (+1 from before); multipart uploads left open in the store by the outage: {} ({} parts); {:.1}s; \
         refusals: {:?}",
        uploads.len(),
        details.len(),
        first_answer.as_secs_f64(),
        outage.as_secs_f64(),
        stored.len() - 1,
        left_open.len(),
        left_parts.len(),
        started.elapsed().as_secs_f64(),
        details.iter().map(|d| d.chars().take(160).collect::<String>()).collect::<BTreeSet<_>>()
    );
    server.assert_no_panic();
}
