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
