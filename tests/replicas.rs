//! Several replicas in one process on one database: forwarding to the owner,
//! the one-hop rule, fly-replay, lease hand-over, and the fence itself.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{spawn_app_with, unique_ns, TestDatabase};
use serde_json::Value;
use statehouse::config::Settings;
use statehouse::guard::{Guard, Replica, Route};
use statehouse::objects::{Mutation, ObjectRef, Op, Precondition, Rejection, WriteJob};
use statehouse::telemetry::Metrics;
use statehouse::writer::Writer;

fn header(r: &reqwest::Response, name: &str) -> String {
    r.headers().get(name).map(|v| v.to_str().unwrap().to_string()).unwrap_or_default()
}

#[tokio::test]
async fn writes_to_a_non_owner_are_forwarded_and_handed_over_on_shutdown() {
    let db = TestDatabase::new();
    let a = spawn_app_with(&db, |s| s.lease_ms = 10_000).await;
    let b = spawn_app_with(&db, |s| s.lease_ms = 10_000).await;
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
    let a = spawn_app_with(&db, |s| s.lease_ms = lease).await;
    let b = spawn_app_with(&db, |s| {
        s.lease_ms = lease;
        s.forward_timeout_ms = 200;
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
    let writer = Writer::spawn(db.clone(), metrics.clone());
    let lease = Duration::from_millis(100);
    let replica = |name: &str| Replica { instance: name.into(), url: format!("http://{name}.invalid"), machine: None };
    let old = Guard::new(replica("old"), lease, writer.clone(), metrics.clone());
    let new = Guard::new(replica("new"), lease, writer.clone(), metrics.clone());
    let object = ObjectRef::new(&unique_ns("fence"), "o").unwrap();

    let Route::Local { fence: old_fence } = old.route(&object).await.unwrap() else {
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
    let job = |owner: &str, fence: i64, key: &str| WriteJob {
        object: object.clone(),
        fence,
        owner: owner.into(),
        mutation: put(key),
        now_ms: statehouse::clock::now_ms(),
        value_cap: 1024,
    };
    assert!(writer.run(job("old", old_fence, "before")).await.unwrap().is_ok());

    // While the lease is live, the other replica is told to forward.
    assert!(matches!(new.route(&object).await.unwrap(), Route::Remote(owner) if owner.instance == "old"));
    tokio::time::sleep(lease + Duration::from_millis(20)).await;
    let Route::Local { fence: new_fence } = new.route(&object).await.unwrap() else { panic!("new did not take over") };
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
