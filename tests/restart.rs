//! Writes survive stopping and restarting the server on the same data.

mod common;

use std::time::{Duration, Instant};

use common::ledger::{stored_keys, Ledger, Outcome};
use common::{unique_ns, Process, TestDatabase};

#[tokio::test]
async fn writes_survive_graceful_and_abrupt_restarts() {
    let db = TestDatabase::new();
    let ns = unique_ns("restart");
    // A fresh client per process: a pooled connection to the old one is dead.
    let new_client = || reqwest::Client::builder().timeout(Duration::from_secs(5)).build().unwrap();
    let client = new_client();
    let ledger = Ledger::default();
    let objects = vec!["a".to_string(), "b".to_string()];

    let mut first = Process::start(&db.url, 0, &[]);
    let port = first.port;
    for i in 0..50 {
        assert!(matches!(
            ledger.put(&client, &first.base, &ns, &objects[i % 2], &format!("one-{i}")).await,
            Outcome::Acked(_)
        ));
    }
    first.terminate();
    assert!(first.log().contains("released leases"), "graceful stop releases its leases");

    // Same port, same data: everything is there, and writes continue at once.
    let mut second = Process::start(&db.url, port, &[]);
    let client = new_client();
    assert_eq!(stored_keys(&client, &second.base, &ns, "a").await.len(), 25);
    for i in 0..50 {
        assert!(matches!(
            ledger.put(&client, &second.base, &ns, &objects[i % 2], &format!("two-{i}")).await,
            Outcome::Acked(_)
        ));
    }
    second.kill();

    // After SIGKILL the lease is still recorded for the dead process; a new
    // process at the same address may take it over at once.
    let third = Process::start(&db.url, port, &[]);
    let client = new_client();
    let started = Instant::now();
    assert!(matches!(ledger.put(&client, &third.base, &ns, "a", "three-0").await, Outcome::Acked(_)));
    let waited = started.elapsed();
    assert!(waited < Duration::from_secs(2), "took {waited:?} to write after restarting at the same address");
    ledger.verify("restart", &client, &third.base, &ns, &objects).await;
    third.assert_no_panic();
}

/// Checkpoints run on a thread of their own: committed pages reach the
/// database file while writes go on (without them the file would stay at its
/// first few pages and the WAL would grow without end), and a crash between
/// checkpoints loses nothing acknowledged.
#[tokio::test]
async fn committed_pages_reach_the_database_file_in_the_background() {
    let db = TestDatabase::file();
    let path = db.file_path().unwrap();
    let wal = path.with_extension("db-wal");
    let ns = unique_ns("checkpoint");
    let client = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().unwrap();
    // No exporter: its outbox cleanup (24 MiB of change rows here) would write,
    // and so checkpoint, during the rounds below that need a quiet file.
    let quiet = [("STATEHOUSE_EXPORT_ENABLED", "false".to_string())];
    let mut server = Process::start(&db.url, 0, &quiet);
    let size = |path: &std::path::Path| std::fs::metadata(path).map_or(0, |m| m.len());
    let before = size(&path);

    // 24 MiB in 96 writes of 256 KiB, faster than anything else would checkpoint.
    let value = "v".repeat(256 * 1024);
    for i in 0..96 {
        let response = client
            .put(format!("{}/v1/objects/{ns}/big/kv/k{i}", server.base))
            .body(value.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{}", response.text().await.unwrap());
    }
    let started = Instant::now();
    while size(&path) < before + 20 * 1024 * 1024 {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the database file is {} bytes (was {before}) 5 s after 24 MiB were committed; the WAL is {} bytes: nothing checkpoints",
            size(&path),
            size(&wal)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!(
        "checkpointed: database file {} bytes after {:?}, WAL {} bytes",
        size(&path),
        started.elapsed(),
        size(&wal)
    );

    // More writes, then SIGKILL while they are in the WAL only: the server is
    // frozen (SIGSTOP) before and after the writes, and the database file is
    // compared byte for byte; if a checkpoint copied anything into it in
    // between, the round is tried again with new keys.
    let mut small = 0;
    let mut in_wal_only = false;
    for _round in 0..10 {
        server.signal(libc::SIGSTOP);
        let file_before = std::fs::read(&path).unwrap();
        server.signal(libc::SIGCONT);
        for _ in 0..20 {
            let response = client
                .put(format!("{}/v1/objects/{ns}/small/kv/k{small}", server.base))
                .body(format!("{small}"))
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 200);
            small += 1;
        }
        server.signal(libc::SIGSTOP);
        if std::fs::read(&path).unwrap() == file_before {
            in_wal_only = true;
            break;
        }
        server.signal(libc::SIGCONT);
    }
    assert!(in_wal_only, "a checkpoint ran during each of 10 rounds of 20 writes");
    server.kill();
    let server = Process::start(&db.url, 0, &quiet);
    let client = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().unwrap();
    for (object, count) in [("big", 96), ("small", small)] {
        assert_eq!(stored_keys(&client, &server.base, &ns, object).await.len(), count, "{object} after the crash");
    }
    println!("killed with {small} small writes, the last 20 in the WAL only");
    server.assert_no_panic();
}

/// The exporter yields the CPU to requests (nice 10); the writer and the
/// checkpointer keep the process's priority.
#[cfg(target_os = "linux")]
#[tokio::test]
async fn background_threads_yield_to_request_work() {
    let db = TestDatabase::file();
    let server = Process::start(&db.url, 0, &[]);
    let nice_of = |thread: &str| -> Option<i64> {
        std::fs::read_dir(format!("/proc/{}/task", server.pid())).unwrap().flatten().find_map(|task| {
            let comm = std::fs::read_to_string(task.path().join("comm")).ok()?;
            if comm.trim() != thread {
                return None;
            }
            let stat = std::fs::read_to_string(task.path().join("stat")).ok()?;
            // After the parenthesised name: state is the 3rd field, nice the 19th.
            stat.rsplit_once(')')?.1.split_whitespace().nth(16)?.parse().ok()
        })
    };
    let started = Instant::now();
    while nice_of("statehouse-expo").is_none() && started.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Thread names are cut to 15 bytes. The process may itself run niced (a CI runner).
    let process = nice_of("statehouse").expect("the main thread");
    assert!(process < 10, "this test needs to run at a nice value below 10, not {process}");
    assert_eq!(nice_of("statehouse-expo"), Some(10), "the exporter");
    assert_eq!(nice_of("statehouse-writ"), Some(process), "the writer");
    assert_eq!(nice_of("statehouse-ckpt"), Some(process), "the checkpointer");
    server.assert_no_panic();
}

/// The WAL stays bounded under steady writes from two processes on one file.
/// Background (PASSIVE) checkpoints alone cannot start the WAL over while new
/// frames keep arriving: it grew to 300 MB for 12,000 writes that way.
#[tokio::test]
async fn the_wal_stays_bounded_under_steady_writes_from_two_processes() {
    let db = TestDatabase::file();
    let wal = db.file_path().unwrap().with_extension("db-wal");
    let ns = unique_ns("wal");
    let servers = [Process::start(&db.url, 0, &[]), Process::start(&db.url, 0, &[])];
    let client = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().unwrap();
    let largest = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let writers = (0..8).map(|w| {
        let (client, base, ns, wal, largest) =
            (client.clone(), servers[w % 2].base.clone(), ns.clone(), wal.clone(), largest.clone());
        async move {
            for i in 0..1000 {
                let url = format!("{base}/v1/objects/{ns}/o{w}-{}/kv/k{i}", i % 10);
                let response = client.put(url).body(vec![b'x'; 2000]).send().await.unwrap();
                assert_eq!(response.status(), 200);
                let size = std::fs::metadata(&wal).map_or(0, |m| m.len());
                largest.fetch_max(size, std::sync::atomic::Ordering::Relaxed);
            }
        }
    });
    futures::future::join_all(writers).await;
    let largest = largest.load(std::sync::atomic::Ordering::Relaxed);
    println!("8,000 writes of 2 kB from two processes: largest WAL {largest} bytes");
    // 64 MiB is where a commit checkpoints by itself whatever else happens;
    // with two writers the restart the checkpointer asks for at 8 MiB can miss.
    assert!(largest < 80 * 1024 * 1024, "the WAL grew to {largest} bytes");
    for server in &servers {
        server.assert_no_panic();
    }
}
