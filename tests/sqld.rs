//! What only a libSQL server (sqld) can show: a paused replica holding no
//! lock on the server, the server restarting under a stream of
//! writes, and JWT authentication with TURSO_TOKEN. Each test starts its own
//! sqld (see `common::sqld`).

mod common;

use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use common::ledger::{Ledger, Outcome};
use common::sqld::Sqld;
use common::{unique_ns, Process};
use ed25519_dalek::Signer;
use rand::Rng;

const LEASE_MS: u64 = 400;

fn replica(url: &str, extra: &[(&str, String)]) -> Process {
    let mut env = vec![
        ("STATEHOUSE_LEASE_MS", LEASE_MS.to_string()),
        ("STATEHOUSE_FORWARD_TIMEOUT_MS", "300".to_string()),
        ("STATEHOUSE_REQUEST_TIMEOUT_MS", "20000".to_string()),
    ];
    env.extend(extra.iter().cloned());
    Process::start(url, 0, &env)
}

fn patient_client() -> reqwest::Client {
    reqwest::Client::builder().timeout(Duration::from_secs(30)).build().unwrap()
}

fn spawn_writes(
    ledger: Arc<Ledger>,
    bases: Vec<String>,
    ns: String,
    objects: Vec<String>,
    stop: Arc<AtomicBool>,
    label: String,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let client = reqwest::Client::builder().timeout(Duration::from_secs(3)).build().unwrap();
        let mut i = 0usize;
        while !stop.load(Ordering::Relaxed) {
            let base = &bases[i % bases.len()];
            let object = &objects[i % objects.len()];
            if !matches!(ledger.put(&client, base, &ns, object, &format!("{label}-{i}")).await, Outcome::Acked(_)) {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            i += 1;
        }
    })
}

/// Whether a writer can take the server's write lock within `within`. The
/// attempt is left to finish (and roll back) in the background either way,
/// so a waiting writer exists, which is what makes the server time out a
/// transaction held by a paused client.
async fn lock_free_within(url: &str, within: Duration) -> (bool, tokio::task::JoinHandle<()>) {
    let db = libsql::Builder::new_remote(url.to_string(), String::new()).build().await.unwrap();
    let conn = db.connect().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(async move {
        let _db = db;
        if let Ok(t) = conn.transaction_with_behavior(libsql::TransactionBehavior::Immediate).await {
            let _ = t.rollback().await;
        }
        let _ = tx.send(());
    });
    (tokio::time::timeout(within, rx).await.is_ok(), task)
}

/// A write is one request to the server, so a replica stopped at any point
/// (SIGSTOP, a debugger, a frozen VM) holds no transaction and no lock there:
/// other writers go on at once, and once its lease ends another replica takes
/// the object over within the lease and a second, never committing under the
/// old fence afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replica_paused_mid_write_holds_no_lock_on_the_server() {
    const PAUSES: usize = 20;
    let dir = tempfile::tempdir().unwrap();
    let sqld = Sqld::start(&dir.path().join("sqld"), &[]);
    let a = replica(&sqld.url(), &[]);
    let b = replica(&sqld.url(), &[]);
    let ns = unique_ns("nolock");
    let object = "o".to_string();
    let ledger = Arc::new(Ledger::default());
    let first = match ledger.put(&patient_client(), &a.base, &ns, &object, "first").await {
        Outcome::Acked(ack) => ack,
        _ => panic!("first write failed"),
    };
    let old_fence = first.fence;

    // Keep A's writer busy, so that pauses land while it sends and commits.
    let stop = Arc::new(AtomicBool::new(false));
    let streams: Vec<_> = (0..3)
        .map(|s| {
            spawn_writes(
                ledger.clone(),
                vec![a.base.clone()],
                ns.clone(),
                vec![object.clone()],
                stop.clone(),
                format!("a{s}"),
            )
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut locked = 0;
    for _ in 0..PAUSES {
        tokio::time::sleep(Duration::from_millis(rand::rng().random_range(1..30))).await;
        a.signal(libc::SIGSTOP);
        let (free, waiter) = lock_free_within(&sqld.url(), Duration::from_millis(500)).await;
        locked += usize::from(!free);
        a.signal(libc::SIGCONT);
        let _ = waiter.await;
    }
    assert_eq!(locked, 0, "a paused replica held the server's write lock in {locked} of {PAUSES} pauses");

    // Paused for good: B takes over once A's lease has ended.
    a.signal(libc::SIGSTOP);
    let paused_at = Instant::now();
    stop.store(true, Ordering::Relaxed);
    let takeover = loop {
        let quick = reqwest::Client::builder().timeout(Duration::from_secs(2)).build().unwrap();
        if let Outcome::Acked(ack) = ledger.put(&quick, &b.base, &ns, &object, "b-after-pause").await {
            break ack;
        }
        assert!(paused_at.elapsed() < Duration::from_secs(10), "B never took over");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let took = paused_at.elapsed();
    assert_eq!(takeover.instance, b.instance);
    assert!(takeover.fence > old_fence);
    assert!(took <= Duration::from_millis(LEASE_MS + 1000), "takeover took {took:?}, more than lease + 1 s");
    tokio::time::sleep(Duration::from_secs(1)).await;
    a.signal(libc::SIGCONT);
    for s in streams {
        s.await.unwrap();
    }

    // Nothing A had in flight, nor anything after, committed under the old fence.
    let acks = ledger.acked();
    for ack in &acks {
        if ack.fence == old_fence {
            assert!(ack.version < takeover.version, "old fence committed version {} after the takeover", ack.version);
        }
    }
    let info: serde_json::Value = patient_client()
        .get(format!("{}/v1/objects/{ns}/{object}", b.base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    // B's takeover fence, or a newer one: writes that waited inside A through the
    // pause are routed again when it resumes and may take the object back once
    // B's idle lease has lapsed. Never the old fence (checked above).
    assert!(info["fence"].as_i64().unwrap() >= takeover.fence, "{info}");
    // A's next write succeeds under a fence newer than its old one: forwarded
    // to B, or (once B let its idle lease go) under a fence A took anew.
    match ledger.put(&patient_client(), &a.base, &ns, &object, "a-after-resume").await {
        Outcome::Acked(ack) => assert!(ack.fence >= takeover.fence, "A wrote under fence {} after resuming", ack.fence),
        _ => panic!("the resumed replica could not write"),
    }
    let metrics = patient_client().get(format!("{}/metrics", a.base)).send().await.unwrap().text().await.unwrap();
    let rejections =
        metrics.lines().find(|l| l.starts_with("statehouse_fence_rejections_total")).unwrap_or("").to_string();
    println!(
        "sqld pauses: the write lock was free in {} of {PAUSES} pauses of a busy replica; takeover {}ms after the last pause, fence {old_fence} -> {}; A: {rejections}",
        PAUSES - locked,
        took.as_millis(),
        takeover.fence
    );
    ledger.verify("sqld pauses", &patient_client(), &b.base, &ns, &[object]).await;
    a.assert_no_panic();
    b.assert_no_panic();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replicas_reconnect_after_the_server_restarts_and_lose_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut sqld = Sqld::start(&dir.path().join("sqld"), &[]);
    let a = replica(&sqld.url(), &[]);
    let b = replica(&sqld.url(), &[]);
    let ns = unique_ns("sqldrestart");
    let objects: Vec<String> = (0..2).map(|i| format!("o{i}")).collect();
    let ledger = Arc::new(Ledger::default());
    let stop = Arc::new(AtomicBool::new(false));
    let bases = vec![a.base.clone(), b.base.clone()];
    let streams: Vec<_> = (0..3)
        .map(|s| {
            spawn_writes(ledger.clone(), bases.clone(), ns.clone(), objects.clone(), stop.clone(), format!("s{s}"))
        })
        .collect();
    let probe = reqwest::Client::builder().timeout(Duration::from_secs(3)).build().unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;

    sqld.kill();
    let killed_at = Instant::now();
    for base in &bases {
        loop {
            let status = probe.get(format!("{base}/readyz")).send().await.map(|r| r.status().as_u16()).unwrap_or(0);
            if status == 503 {
                break;
            }
            assert!(killed_at.elapsed() < Duration::from_secs(10), "{base}/readyz still {status} with the server down");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let acked_while_down = ledger.acked().iter().filter(|x| x.at > killed_at + Duration::from_millis(100)).count();
    sqld.restart();
    let restarted_at = Instant::now();
    for base in &bases {
        loop {
            let status = probe.get(format!("{base}/readyz")).send().await.map(|r| r.status().as_u16()).unwrap_or(0);
            if status == 200 {
                break;
            }
            assert!(restarted_at.elapsed() < Duration::from_secs(20), "{base} did not reconnect");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let reconnected = restarted_at.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    for s in streams {
        s.await.unwrap();
    }
    let after = ledger.acked().iter().filter(|x| x.at > restarted_at).count();
    assert_eq!(acked_while_down, 0, "writes were acknowledged while the server was down");
    assert!(after > 0, "no write was acknowledged after the server came back");
    println!(
        "sqld restart: both replicas ready {}ms after the restart; {after} writes acknowledged after it",
        reconnected.as_millis()
    );
    ledger.verify("sqld restart", &probe, &a.base, &ns, &objects).await;
    a.assert_no_panic();
    b.assert_no_panic();
}

/// A JWT signed with Ed25519, as Turso and sqld accept.
fn jwt(key: &ed25519_dalek::SigningKey) -> String {
    let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"EdDSA","typ":"JWT"}"#);
    let exp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() + 3600;
    let claims = URL_SAFE_NO_PAD.encode(format!(r#"{{"a":"rw","exp":{exp}}}"#));
    let signing_input = format!("{header}.{claims}");
    let signature = URL_SAFE_NO_PAD.encode(key.sign(signing_input.as_bytes()).to_bytes());
    format!("{signing_input}.{signature}")
}

/// Every open stream is a connection the server counts against its limit
/// (sqld answers 429 past it). A burst of reads far larger than the limit
/// queues inside the replica instead of failing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_burst_of_reads_stays_within_the_servers_connection_limit() {
    let dir = tempfile::tempdir().unwrap();
    let sqld = Sqld::start(&dir.path().join("sqld"), &["--max-concurrent-requests".into(), "24".into()]);
    let a = replica(&sqld.url(), &[("STATEHOUSE_LEASE_MS", "60000".to_string())]);
    let ns = unique_ns("sqldburst");
    let client =
        reqwest::Client::builder().pool_max_idle_per_host(256).timeout(Duration::from_secs(30)).build().unwrap();
    let ops: Vec<_> =
        (0..100).map(|i| serde_json::json!({"op": "put", "key": format!("k{i:03}"), "value": i})).collect();
    let written = client
        .post(format!("{}/v1/objects/{ns}/o/batch", a.base))
        .json(&serde_json::json!({"ops": ops}))
        .send()
        .await
        .unwrap();
    assert_eq!(written.status(), 200);
    let reads: Vec<_> = (0..200)
        .map(|_| {
            let url = format!("{}/v1/objects/{ns}/o/kv?limit=100", a.base);
            let client = client.clone();
            tokio::spawn(async move {
                let answer = client.get(url).send().await.unwrap();
                (answer.status().as_u16(), answer.text().await.unwrap())
            })
        })
        .collect();
    let mut failed = Vec::new();
    for read in reads {
        let (status, body) = read.await.unwrap();
        if status != 200 {
            failed.push(format!("{status} {body}"));
        }
    }
    assert!(failed.is_empty(), "{} of 200 listings failed, first: {}", failed.len(), failed[0]);
    a.assert_no_panic();
}

/// The writer keeps its stream on the server between requests. A server that
/// restarts while the writer is idle no longer knows that stream: the next
/// write must go through on a new one, not fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_after_the_server_restarted_is_not_lost_to_a_stale_stream() {
    let dir = tempfile::tempdir().unwrap();
    let mut sqld = Sqld::start(&dir.path().join("sqld"), &[]);
    // A long lease: no renewal runs (and no write fails) while the server is down.
    let a = replica(&sqld.url(), &[("STATEHOUSE_LEASE_MS", "60000".to_string())]);
    let ns = unique_ns("sqldstream");
    let client = patient_client();
    let put = |key: &'static str| {
        let url = format!("{}/v1/objects/{ns}/o/kv/{key}", a.base);
        let client = client.clone();
        async move { client.put(url).json(&serde_json::json!({"k": key})).send().await.unwrap() }
    };
    assert_eq!(put("before").await.status(), 200);
    let written = Instant::now();
    sqld.restart();
    assert!(written.elapsed() < Duration::from_secs(4), "the restart took too long to reach a kept stream");
    let answer = put("after").await;
    let status = answer.status();
    assert_eq!(status, 200, "the first write after a restart: {}", answer.text().await.unwrap());
    for key in ["before", "after"] {
        let got = client.get(format!("{}/v1/objects/{ns}/o/kv/{key}", a.base)).send().await.unwrap();
        assert_eq!(got.status(), 200, "{key} is stored");
    }
    a.assert_no_panic();
}

/// A counter from a replica's `/metrics`.
async fn counter(base: &str, name: &str) -> u64 {
    let text = patient_client().get(format!("{base}/metrics")).send().await.unwrap().text().await.unwrap();
    let line = text.lines().find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '));
    line.and_then(|l| l.rsplit(' ').next()).map_or(0, |v| v.parse::<f64>().unwrap() as u64)
}

/// On a libSQL server the writer sends the next group while one is in
/// flight, planned on what the first leaves the object as. The test holds
/// the server's write lock, so that a first write (A) waits on the server and
/// a second (B) is sent behind it; then it moves the object's version under
/// both, as a group that did not commit as planned would. A is refused by its
/// fence assertion (and routed again, as any refused write); B was refused
/// only because of A, so it is planned again and commits without counting as
/// a lost lease. Then the same without the forged move: both commit, in
/// either order on the server.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_write_planned_on_a_group_in_flight_is_planned_again_when_that_group_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let sqld = Sqld::start(&dir.path().join("sqld"), &[]);
    // No export and a long lease: no other work of the writer's overlaps the rounds.
    let quiet = [("STATEHOUSE_LEASE_MS", "30000".to_string()), ("STATEHOUSE_EXPORT_ENABLED", "false".to_string())];
    let a = replica(&sqld.url(), &quiet);
    let ns = unique_ns("chained");
    let client = patient_client();
    let put = |key: String| {
        let url = format!("{}/v1/objects/{ns}/o/kv/{key}", a.base);
        let client = client.clone();
        tokio::spawn(async move {
            let answer = client.put(url).json(&serde_json::json!({"k": key})).send().await.unwrap();
            (answer.status().as_u16(), answer.text().await.unwrap())
        })
    };
    let version = |body: &str| serde_json::from_str::<serde_json::Value>(body).unwrap()["version"].as_i64().unwrap();
    assert_eq!(put("k0".into()).await.unwrap().0, 200);
    let db = libsql::Builder::new_remote(sqld.url(), String::new()).build().await.unwrap();
    let conn = db.connect().unwrap();

    for (round, forge) in [(1, true), (2, false), (3, true), (4, false)] {
        let rejections = counter(&a.base, "statehouse_fence_rejections_total").await;
        let replans = counter(&a.base, "statehouse_write_replans_total").await;
        let overlapped = counter(&a.base, "statehouse_write_groups_overlapped_total").await;
        let holder = conn.transaction_with_behavior(libsql::TransactionBehavior::Immediate).await.unwrap();
        let first = put(format!("a{round}"));
        tokio::time::sleep(Duration::from_millis(300)).await;
        let second = put(format!("b{round}"));
        tokio::time::sleep(Duration::from_millis(300)).await;
        if forge {
            holder
                .execute("UPDATE objects SET version = version + 5 WHERE ns = ?1 AND id = 'o'", [ns.as_str()])
                .await
                .unwrap();
        }
        holder.commit().await.unwrap();
        let (first, second) = (first.await.unwrap(), second.await.unwrap());
        assert_eq!(first.0, 200, "round {round}: A {}", first.1);
        assert_eq!(second.0, 200, "round {round}: B {}", second.1);
        assert_ne!(version(&first.1), version(&second.1));
        assert_eq!(
            counter(&a.base, "statehouse_write_groups_overlapped_total").await,
            overlapped + 1,
            "round {round}: B was not sent while A was in flight"
        );
        let rejected = counter(&a.base, "statehouse_fence_rejections_total").await - rejections;
        let replanned = counter(&a.base, "statehouse_write_replans_total").await - replans;
        if forge {
            assert_eq!(rejected, 1, "round {round}: only A counts as a refused write (B was refused because of A)");
            assert_eq!(replanned, 1, "round {round}: B is planned again");
        } else {
            assert_eq!(rejected, 0, "round {round}: nothing moved the object");
            // Planned again only if the server ran B before A.
            assert!(replanned <= 1, "round {round}: {replanned} writes planned again");
        }
        println!(
            "chained round {round} (forged move: {forge}): A v{} B v{}, planned again {replanned}",
            version(&first.1),
            version(&second.1)
        );
    }
    for key in ["k0", "a1", "b1", "a2", "b2", "a3", "b3", "a4", "b4"] {
        let got = client.get(format!("{}/v1/objects/{ns}/o/kv/{key}", a.base)).send().await.unwrap();
        assert_eq!(got.status(), 200, "{key} is stored");
    }
    let info: serde_json::Value =
        client.get(format!("{}/v1/objects/{ns}/o", a.base)).send().await.unwrap().json().await.unwrap();
    assert_eq!(info["keys"], 9, "{info}");
    a.assert_no_panic();
}

#[tokio::test]
async fn turso_token_is_checked_by_a_server_with_jwt_auth() {
    let dir = tempfile::tempdir().unwrap();
    let key = ed25519_dalek::SigningKey::from_bytes(&rand::random::<[u8; 32]>());
    let key_file = dir.path().join("jwt.pub");
    std::fs::write(&key_file, URL_SAFE_NO_PAD.encode(key.verifying_key().to_bytes())).unwrap();
    let sqld = Sqld::start(&dir.path().join("sqld"), &["--auth-jwt-key-file".into(), key_file.display().to_string()]);

    let good = jwt(&key);
    let app = replica(&sqld.url(), &[("TURSO_TOKEN", good)]);
    let client = patient_client();
    let ns = unique_ns("auth");
    let r = client.put(format!("{}/v1/objects/{ns}/o/kv/k", app.base)).body("v").send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        client.get(format!("{}/v1/objects/{ns}/o/kv/k", app.base)).send().await.unwrap().text().await.unwrap(),
        "v"
    );

    let other = ed25519_dalek::SigningKey::from_bytes(&rand::random::<[u8; 32]>());
    for (label, token) in
        [("wrong key", Some(jwt(&other))), ("garbage", Some("not-a-jwt".to_string())), ("missing", None)]
    {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_statehouse"));
        cmd.env_clear()
            .env("TURSO_URL", sqld.url())
            .env("STATEHOUSE_OBJECTS_DIR_SHARED", "true")
            .env("STATEHOUSE_LISTEN", "127.0.0.1:0")
            .env("STATEHOUSE_LOG", "off");
        if let Some(token) = token {
            cmd.env("TURSO_TOKEN", token);
        }
        let out = cmd.output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{label}: {stderr}");
        assert!(stderr.contains("TURSO_TOKEN"), "{label}: the error must name TURSO_TOKEN: {stderr}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "{label}: {stderr}");
        println!("sqld auth, {label} token: {}", stderr.trim_end());
    }
    app.assert_no_panic();
}
