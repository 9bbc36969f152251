//! Several replicas in one process on one database: forwarding to the owner,
//! the one-hop rule, fly-replay, lease hand-over, and the fence itself.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{spawn_app_with, unique_ns, TestDatabase};
use serde_json::Value;
use statehouse::config::Settings;
use statehouse::guard::{Guard, HeldLease, Replica, Route};
use statehouse::objects::{Mutation, ObjectRef, Op, Precondition, Rejection, WriteJob};
use statehouse::resident::ResidentState;
use statehouse::telemetry::Metrics;
use statehouse::writer::Writer;

fn header(r: &reqwest::Response, name: &str) -> String {
    r.headers().get(name).map(|v| v.to_str().unwrap().to_string()).unwrap_or_default()
}

#[tokio::test]
async fn writes_to_a_non_owner_are_forwarded_and_handed_over_on_shutdown() {
    let db = TestDatabase::new();
    let a = spawn_app_with(&db, |s| s.lease = Duration::from_millis(10_000)).await;
    let b = spawn_app_with(&db, |s| s.lease = Duration::from_millis(10_000)).await;
    let ns = unique_ns("fwd");
    let path = format!("/v1/objects/{ns}/o/kv/k");

    let r = a.client.put(a.url(&path)).body("from-a").send().await.unwrap();
    assert_eq!(r.status(), 200);
    let a_instance = header(&r, "statehouse-instance");
    let fence = header(&r, "statehouse-fence");

    // B is not the owner: it relays A's answer.
    let r = b.client.put(b.url(&path)).header("if-match", "\"1\"").body("via-b").send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "statehouse-instance"), a_instance, "committed by the owner");
    assert_eq!(header(&r, "statehouse-fence"), fence);
    assert_eq!(header(&r, "etag"), "\"2\"");
    let b_instance = header(&r, "statehouse-via");
    assert!(!b_instance.is_empty() && b_instance != a_instance);
    // Conditions and errors travel too.
    let r = b.client.put(b.url(&path)).header("if-match", "\"1\"").body("stale").send().await.unwrap();
    assert_eq!(r.status(), 412);
    assert_eq!(header(&r, "content-type"), "application/problem+json");
    let r = b
        .client
        .post(b.url(&format!("/v1/objects/{ns}/o/batch")))
        .body(r#"{"ops":[{"op":"get","key":"k"}]}"#)
        .send()
        .await
        .unwrap();
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["results"][0]["value"], "via-b");

    // A request a peer already forwarded is not forwarded again.
    let r = b.client.put(b.url(&path)).header("statehouse-forwarded-by", "someone").body("loop").send().await.unwrap();
    assert_eq!(r.status(), 503);
    assert!(r.headers().contains_key("retry-after"));
    // Marked as certainly not applied, so a forwarding replica may route it again.
    assert_eq!(header(&r, "statehouse-not-applied"), "lease-moved");
    assert_eq!(a.client.get(a.url(&path)).send().await.unwrap().text().await.unwrap(), "via-b");

    // A graceful stop releases the lease: B takes over at once with a new fence.
    a.stop().await;
    let started = Instant::now();
    let r = b.client.put(b.url(&path)).body("b-owns").send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(header(&r, "statehouse-instance"), b_instance);
    assert_eq!(header(&r, "statehouse-fence").parse::<i64>().unwrap(), fence.parse::<i64>().unwrap() + 1);
    b.stop().await;
}

#[tokio::test]
async fn a_crashed_owner_gets_503_with_retry_after_until_its_lease_ends() {
    let db = TestDatabase::new();
    let lease = 600;
    let a = spawn_app_with(&db, |s| s.lease = Duration::from_millis(lease)).await;
    let b = spawn_app_with(&db, |s| {
        s.lease = Duration::from_millis(lease);
        s.forward_timeout = Duration::from_millis(200);
    })
    .await;
    let ns = unique_ns("crash");
    let path = format!("/v1/objects/{ns}/o/kv/k");
    assert_eq!(a.client.put(a.url(&path)).body("a").send().await.unwrap().status(), 200);
    a.crash();
    let crashed_at = Instant::now();

    let mut refusals = 0;
    loop {
        let r = b.client.put(b.url(&path)).body("b").send().await.unwrap();
        if r.status() == 200 {
            break;
        }
        assert_eq!(r.status(), 503);
        assert!(r.headers()["retry-after"].to_str().unwrap().parse::<u64>().unwrap() >= 1);
        refusals += 1;
        assert!(crashed_at.elapsed() < Duration::from_secs(5), "B never took over");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let took = crashed_at.elapsed();
    assert!(refusals >= 1, "the lease was still live right after the crash");
    assert!(took >= Duration::from_millis(lease / 2), "took over before the lease could have ended: {took:?}");
    let metrics = b.client.get(b.url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("statehouse_forwarded_requests_total{outcome=\"owner_unreachable\"}"));
    b.stop().await;
}

#[tokio::test]
async fn on_fly_a_write_for_another_machine_answers_with_fly_replay() {
    let db = TestDatabase::new();
    let a = spawn_app_with(&db, |s| s.fly_machine_id = Some("machine-a".into())).await;
    let b = spawn_app_with(&db, |s| s.fly_machine_id = Some("machine-b".into())).await;
    let ns = unique_ns("fly");
    let path = format!("/v1/objects/{ns}/o/kv/k");
    assert_eq!(a.client.put(a.url(&path)).body("a").send().await.unwrap().status(), 200);
    let r = b.client.put(b.url(&path)).body("b").send().await.unwrap();
    assert_eq!(header(&r, "fly-replay"), "instance=machine-a");
    assert_eq!(r.status(), 409, "a client outside fly's proxy sees a retryable conflict, not a success");
    assert_eq!(a.client.get(a.url(&path)).send().await.unwrap().text().await.unwrap(), "a");
    a.stop().await;
    b.stop().await;
}

/// The safety property itself, below HTTP: once another replica holds a
/// higher fence, a write under the old one cannot commit, whatever the old
/// replica believes about its lease.
#[tokio::test]
async fn a_stale_fence_can_never_commit() {
    let test_db = TestDatabase::new();
    let settings = Settings::for_database(&test_db.url).unwrap();
    let db = Arc::new(statehouse::server::open_database(&settings.database).await.unwrap());
    let metrics = Arc::new(Metrics::new("test", "full"));
    let resident = Arc::new(ResidentState::new(1 << 20, &metrics));
    let writer = Writer::spawn(db.clone(), resident.clone(), metrics.clone());
    let lease = Duration::from_millis(100);
    let margin = Duration::from_millis(10);
    let replica = |name: &str| Replica { instance: name.into(), url: format!("http://{name}.invalid"), machine: None };
    let guard =
        |name: &str| Guard::new(replica(name), lease, margin, writer.clone(), resident.clone(), metrics.clone());
    let (old, new) = (guard("old"), guard("new"));
    let object = ObjectRef::new(&unique_ns("fence"), "o").unwrap();

    let Route::Local(HeldLease { fence: old_fence, .. }) = old.route(&object).await.unwrap() else {
        panic!("old did not get the lease")
    };
    let put = |key: &str| {
        Mutation::ops(vec![Op::Put {
            key: key.into(),
            value: bytes::Bytes::from_static(b"v"),
            content_type: "text/plain".into(),
            pre: Precondition::default(),
        }])
    };
    // Any (owner, fence) claim, as a paused or confused replica might make it.
    let job = |owner: &str, fence: i64, key: &str| {
        let claim = HeldLease { object: object.clone(), owner: owner.into(), fence };
        WriteJob::new(claim, put(key), statehouse::clock::now_ms(), 1024)
    };
    assert!(writer.run(job("old", old_fence, "before")).await.unwrap().is_ok());

    // While the lease is live, the other replica is told to forward.
    assert!(matches!(new.route(&object).await.unwrap(), Route::Remote(owner) if owner.instance == "old"));
    tokio::time::sleep(lease + Duration::from_millis(20)).await;
    let Route::Local(HeldLease { fence: new_fence, .. }) = new.route(&object).await.unwrap() else {
        panic!("new did not take over")
    };
    assert_eq!(new_fence, old_fence + 1);

    // The old owner's write is refused by the fence check and leaves no trace.
    assert_eq!(writer.run(job("old", old_fence, "after")).await.unwrap().unwrap_err(), Rejection::Fenced);
    // Claiming the new fence under the wrong name is refused as well.
    assert_eq!(writer.run(job("old", new_fence, "after")).await.unwrap().unwrap_err(), Rejection::Fenced);
    assert!(statehouse::objects::get_entry(&db, &object, "after").await.unwrap().is_none());
    let committed = writer.run(job("new", new_fence, "new-owner")).await.unwrap().unwrap();
    assert_eq!(committed.version, 2, "the refused writes did not bump the version");

    // Renewal by the old owner fails and drops its lease.
    old.renew().await.unwrap();
    assert!(matches!(old.route(&object).await.unwrap(), Route::Remote(owner) if owner.instance == "new"));
}

/// The fence assertion bites: the database's row moves to another owner
/// behind the back of a replica that still believes (by its lease) that it
/// owns the object. Its next write, committed in one group with writes to
/// another object, is refused: nothing of it is stored or acknowledged, the
/// other object's writes commit, and the replica drops what it held in
/// memory, so it reads the new owner's value from the database.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_moved_fence_refuses_the_write_and_drops_the_resident_state() {
    let db = TestDatabase::new();
    let app = spawn_app_with(&db, |s| {
        s.lease = Duration::from_millis(60_000);
        // Outbox rows stay where the test counts them.
        s.export_interval = Duration::from_millis(3_600_000);
    })
    .await;
    let ns = unique_ns("forged");
    let forged = format!("/v1/objects/{ns}/forged/kv/k");
    let r = app.client.put(app.url(&forged)).body("mine").send().await.unwrap();
    assert_eq!(r.status(), 200);
    let fence: i64 = header(&r, "statehouse-fence").parse().unwrap();
    assert_eq!(app.client.get(app.url(&forged)).send().await.unwrap().text().await.unwrap(), "mine");
    let resident_before = metric(&app, "statehouse_resident_objects").await;
    assert!(resident_before >= 1.0, "the owner holds the object in memory");

    // Another replica took the object over and wrote (forged straight into the database).
    let settings = Settings::for_database(&db.url).unwrap();
    let database = statehouse::db::Database::open(&settings.database).await.unwrap();
    let conn = database.connect().await.unwrap();
    let moved = conn
        .execute(
            "UPDATE objects SET fence = fence + 1, owner = 'forger', owner_url = 'http://127.0.0.1:9',
                    lease_expires_at = ?2, version = version + 1
             WHERE ns = ?1 AND id = 'forged'",
            libsql::params![ns.as_str(), statehouse::clock::now_ms() + 60_000],
        )
        .await
        .unwrap();
    assert_eq!(moved, 1);
    conn.execute(
        "UPDATE kv SET value = CAST('theirs' AS BLOB), version = version + 1 WHERE ns = ?1 AND id = 'forged'",
        libsql::params![ns.as_str()],
    )
    .await
    .unwrap();
    let outbox_rows = |conn: libsql::Connection, ns: String, id: &'static str| async move {
        let mut rows =
            conn.query("SELECT count(*) FROM outbox WHERE ns = ?1 AND id = ?2", libsql::params![ns, id]).await.unwrap();
        rows.next().await.unwrap().unwrap().get::<i64>(0).unwrap()
    };
    assert_eq!(outbox_rows(conn.clone(), ns.clone(), "forged").await, 1, "the first write's change row");

    // The stale owner's write and 20 writes to an object it really owns, all at once.
    let other = format!("/v1/objects/{ns}/other/kv/");
    assert_eq!(app.client.put(app.url(&format!("{other}warm"))).body("x").send().await.unwrap().status(), 200);
    let stale = app.client.put(app.url(&forged)).body("stale-write").send();
    let others: Vec<_> =
        (0..20).map(|i| app.client.put(app.url(&format!("{other}k{i}"))).body(format!("v{i}")).send()).collect();
    let (stale, others) = tokio::join!(stale, futures::future::join_all(others));
    let stale = stale.unwrap();
    assert!(!stale.status().is_success(), "a write under a moved fence was acknowledged: {}", stale.status());
    assert!(stale.status().is_server_error() || stale.status() == 409, "refused as retryable, not {}", stale.status());
    for r in others {
        assert_eq!(r.unwrap().status(), 200, "writes to another object are not held back");
    }

    // Nothing of the refused write is stored: value, version, fence and outbox are the forger's.
    let mut rows = conn
        .query(
            "SELECT o.fence, o.owner, o.version, kv.value FROM objects o JOIN kv ON kv.ns = o.ns AND kv.id = o.id
             WHERE o.ns = ?1 AND o.id = 'forged' AND kv.key = CAST('k' AS BLOB)",
            libsql::params![ns.as_str()],
        )
        .await
        .unwrap();
    let row = rows.next().await.unwrap().unwrap();
    assert_eq!(row.get::<i64>(0).unwrap(), fence + 1);
    assert_eq!(row.get::<String>(1).unwrap(), "forger");
    assert_eq!(row.get::<i64>(2).unwrap(), 2, "the forged version, not bumped again");
    assert_eq!(row.get::<Vec<u8>>(3).unwrap(), b"theirs");
    drop(rows);
    // The refused write left no outbox row; the other object's 21 writes did.
    assert_eq!(outbox_rows(conn.clone(), ns.clone(), "forged").await, 1);
    assert_eq!(outbox_rows(conn.clone(), ns.clone(), "other").await, 21);

    // The replica dropped what it held: it reads the new owner's value, not its memory.
    assert_eq!(app.client.get(app.url(&forged)).send().await.unwrap().text().await.unwrap(), "theirs");
    assert!(metric(&app, "statehouse_fence_rejections_total").await >= 1.0);
    app.stop().await;
}

/// A metric's value from `/metrics` (development mode: no token needed).
async fn metric(app: &common::TestApp, name: &str) -> f64 {
    let text = app.client.get(app.url("/metrics")).send().await.unwrap().text().await.unwrap();
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no metric {name} in /metrics"))
}

/// Renewals keep every lease in use, however many: a replica holding more
/// objects than one renewal statement carries keeps them all across many
/// renewals (a lost renewal would drop the lease and show in the gauge).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewals_keep_hundreds_of_leases_in_use() {
    let db = TestDatabase::new();
    // Long enough that a debug build on a busy 2-core machine renews in time
    // (a renewal every third of it); the property is the count, not the speed.
    let lease = 2_000;
    // Without the exporter, whose lease the gauge would count too.
    let app = spawn_app_with(&db, |s| {
        s.lease = Duration::from_millis(lease);
        s.export_enabled = false;
    })
    .await;
    let ns = unique_ns("renew");
    let objects = 300;
    let urls: Vec<String> = (0..objects).map(|o| app.url(&format!("/v1/objects/{ns}/o{o}/kv/k"))).collect();
    let client = &app.client;
    let fences = futures::future::join_all(urls.iter().map(|url| async move {
        let r = client.put(url).body("v").send().await.unwrap();
        assert_eq!(r.status(), 200);
        header(&r, "statehouse-fence")
    }))
    .await;
    // Several renewal periods (a third of the lease each), every object in use.
    let until = Instant::now() + Duration::from_millis(lease * 3);
    while Instant::now() < until {
        for url in &urls {
            assert_eq!(app.client.get(url).send().await.unwrap().status(), 200);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(metric(&app, "statehouse_leases_held").await, objects as f64, "leases were lost");
    // Still the same leases: a write needs no new one.
    for (url, fence) in urls.iter().zip(&fences) {
        let r = app.client.put(url).body("w").send().await.unwrap();
        assert_eq!(&header(&r, "statehouse-fence"), fence);
    }
    app.stop().await;
}
