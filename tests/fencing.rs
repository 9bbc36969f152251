//! The single-writer guarantee with real processes: three `statehouse`
//! binaries on one database, short leases, writes round-robin, an owner paused
//! past its lease (SIGSTOP) and owners killed at random points (SIGKILL).

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use common::ledger::{summarize, Ledger, Outcome};
use common::{unique_ns, Process, TestDatabase};
use rand::Rng;

const LEASE_MS: u64 = 400;
const PEER_SECRET: &str = "fencing-test-peer-secret-0123456789abcdef";
/// Authentication is on, so every write one replica forwards to another is signed and re-checked.
static TOKEN: std::sync::LazyLock<String> = std::sync::LazyLock::new(statehouse::auth::new_token);

/// A replica that gives up on an unresponsive owner after 300 ms, so that
/// clients learn quickly about a paused or killed one.
fn replica(db: &TestDatabase) -> Process {
    replica_with_forward_timeout(db, 300)
}

fn replica_with_forward_timeout(db: &TestDatabase, forward_timeout_ms: u64) -> Process {
    Process::start(
        &db.url,
        0,
        &[
            ("STATEHOUSE_LEASE_MS", LEASE_MS.to_string()),
            ("STATEHOUSE_FORWARD_TIMEOUT_MS", forward_timeout_ms.to_string()),
            ("STATEHOUSE_REQUEST_TIMEOUT_MS", "20000".to_string()),
            // Admin too: the lease-read test reads /metrics.
            ("STATEHOUSE_AUTH_TOKENS", format!("fencing {} * read,write,admin", statehouse::auth::hash_token(&TOKEN))),
            ("STATEHOUSE_PEER_SECRET", PEER_SECRET.to_string()),
        ],
    )
}

fn client() -> reqwest::Client {
    client_with_timeout(Duration::from_millis(1500))
}

fn client_with_timeout(timeout: Duration) -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert("authorization", format!("Bearer {}", *TOKEN).parse().unwrap());
    reqwest::Client::builder().timeout(timeout).default_headers(headers).build().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn round_robin_writes_through_three_replicas() {
    let db = TestDatabase::new();
    // Nobody is down: a slow owner (a loaded libSQL server) is waited for, not given up on.
    let replicas: Vec<Process> = (0..3).map(|_| replica_with_forward_timeout(&db, 15_000)).collect();
    let bases: Vec<String> = replicas.iter().map(|r| r.base.clone()).collect();
    let ns = unique_ns("rr");
    let objects: Vec<String> = (0..4).map(|i| format!("obj-{i}")).collect();
    let ledger = Arc::new(Ledger::default());
    let started = Instant::now();

    let mut tasks = Vec::new();
    for writer in 0..6 {
        let (ledger, bases, objects, ns) = (ledger.clone(), bases.clone(), objects.clone(), ns.clone());
        tasks.push(tokio::spawn(async move {
            // Every replica is alive: nothing should hang, so wait as long as a slow server needs.
            let client = client_with_timeout(Duration::from_secs(15));
            for i in 0..150 {
                let base = &bases[(writer + i) % bases.len()];
                let object = &objects[i % objects.len()];
                ledger.put(&client, base, &ns, object, &format!("w{writer}-{i}")).await;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let elapsed = started.elapsed();
    ledger.verify(&format!("{} round-robin", db.mode()), &client(), &bases[0], &ns, &objects).await;
    let acked = ledger.acked().len();
    assert_eq!(
        acked,
        900,
        "with every replica alive, every write is acknowledged; the others: {:#?}",
        ledger.unknown_reasons.lock().unwrap()
    );
    println!(
        "{} round-robin: {acked} writes through 3 replicas in {:.2}s ({:.0}/s)",
        db.mode(),
        elapsed.as_secs_f64(),
        acked as f64 / elapsed.as_secs_f64()
    );
    for r in &replicas {
        r.assert_no_panic();
    }
}

/// Streams writes to `object` through the live replicas until `stop`.
fn spawn_stream(
    ledger: Arc<Ledger>,
    live: Arc<RwLock<Vec<String>>>,
    ns: String,
    object: String,
    stop: Arc<AtomicBool>,
    seq: Arc<AtomicU64>,
    label: &'static str,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let client = client();
        let mut i = 0usize;
        while !stop.load(Ordering::Relaxed) {
            let base = {
                let live = live.read().unwrap();
                live[i % live.len()].clone()
            };
            i += 1;
            let key = format!("{label}-{}", seq.fetch_add(1, Ordering::Relaxed));
            if !matches!(ledger.put(&client, &base, &ns, &object, &key).await, Outcome::Acked(_)) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    })
}

/// True when no process holds the database's write lock right now.
async fn write_lock_free(db: &TestDatabase) -> bool {
    let Some(path) = db.file_path() else { return true };
    let conn = libsql::Builder::new_local(path).build().await.unwrap().connect().unwrap();
    conn.busy_timeout(Duration::from_millis(100)).unwrap();
    match conn.execute("BEGIN IMMEDIATE", ()).await {
        Ok(_) => {
            conn.execute("ROLLBACK", ()).await.unwrap();
            true
        }
        Err(_) => false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn paused_owner_is_fenced_out_after_takeover() {
    let db = TestDatabase::new();
    let a = replica(&db);
    let b = replica(&db);
    let c = replica(&db);
    let ns = unique_ns("pause");
    let object = "paused".to_string();
    let ledger = Arc::new(Ledger::default());

    // A takes the object.
    let first = match ledger.put(&client(), &a.base, &ns, &object, "first").await {
        Outcome::Acked(ack) => ack,
        _ => panic!("first write failed"),
    };
    assert_eq!(first.instance, a.instance);
    let old_fence = first.fence;

    let live = Arc::new(RwLock::new(vec![a.base.clone(), b.base.clone(), c.base.clone()]));
    let stop = Arc::new(AtomicBool::new(false));
    let seq = Arc::new(AtomicU64::new(0));
    let streams: Vec<_> = (0..3)
        .map(|_| spawn_stream(ledger.clone(), live.clone(), ns.clone(), object.clone(), stop.clone(), seq.clone(), "s"))
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Pause A while it is not inside a transaction: a process stopped while
    // holding a local file's write lock stalls every writer until it resumes
    // (a libSQL server rolls such a transaction back after its timeout instead).
    let mut attempts = 0;
    let paused_at = loop {
        attempts += 1;
        a.signal(libc::SIGSTOP);
        let at = Instant::now();
        if write_lock_free(&db).await {
            break at;
        }
        a.signal(libc::SIGCONT);
        assert!(attempts < 200, "could not pause the owner outside a transaction");
        tokio::time::sleep(Duration::from_millis(rand::rng().random_range(1..15))).await;
    };
    // Clients keep writing through B and C; a few writes sent to A hang in
    // its socket and queues until it resumes.
    live.write().unwrap().retain(|base| base != &a.base);
    let in_flight: Vec<_> = (0..3)
        .map(|i| {
            let (ledger, base, ns, object) = (ledger.clone(), a.base.clone(), ns.clone(), object.clone());
            tokio::spawn(async move {
                let patient = client_with_timeout(Duration::from_secs(20));
                ledger.put(&patient, &base, &ns, &object, &format!("in-flight-{i}")).await
            })
        })
        .collect();
    // A stays paused until another replica has taken over (bounded), and a
    // little longer while writes continue through the new owner. (On a libSQL
    // server no transaction stays open between requests, so a pause holds no lock.)
    let deadline = paused_at + Duration::from_millis(LEASE_MS * 5) + Duration::from_secs(5);
    let taken_over =
        |ack: &common::ledger::Ack| ack.at > paused_at && ack.fence > old_fence && ack.instance != a.instance;
    while !ledger.acked().iter().any(taken_over) {
        assert!(
            Instant::now() < deadline,
            "no replica took over while the owner was paused ({} acks during the pause)",
            ledger.acked().iter().filter(|ack| ack.at > paused_at).count()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(LEASE_MS * 2)).await;
    let during_pause: Vec<_> = ledger.acked().into_iter().filter(|ack| ack.at > paused_at).collect();
    a.signal(libc::SIGCONT);
    let resumed_at = Instant::now();
    live.write().unwrap().push(a.base.clone());
    let new_fence = during_pause.iter().map(|a| a.fence).max().unwrap();
    // Acks of writes A committed just before the pause can arrive after it: count only the new fence.
    let takeover = during_pause.iter().filter(|ack| ack.fence > old_fence).map(|ack| ack.at).min().unwrap() - paused_at;
    assert!(
        takeover >= Duration::from_millis(LEASE_MS / 2),
        "took over after {takeover:?}, before the lease could end"
    );

    // The writes that waited inside A are re-routed to the new owner (or
    // refused): A never commits them under its old fence.
    for task in in_flight {
        match task.await.unwrap() {
            Outcome::Acked(ack) => {
                assert_ne!(ack.instance, a.instance, "the paused owner committed an in-flight write");
                assert!(ack.fence > old_fence);
            }
            Outcome::Refused | Outcome::Unknown => {}
        }
    }
    // After resuming, A routes new writes to the new owner too.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let direct = ledger.put(&client(), &a.base, &ns, &object, "via-a-after-resume").await;
    match direct {
        Outcome::Acked(ack) => {
            assert_ne!(ack.instance, a.instance, "the old owner committed after losing its lease");
            assert!(ack.fence >= new_fence);
        }
        _ => panic!("a write through the resumed old owner was not re-routed"),
    }
    stop.store(true, Ordering::Relaxed);
    for s in streams {
        s.await.unwrap();
    }

    // Nothing committed under the old fence after the takeover.
    let acks = ledger.acked();
    let first_new = acks.iter().filter(|x| x.fence > old_fence).map(|x| x.version).min().unwrap();
    for ack in &acks {
        if ack.fence == old_fence {
            assert!(
                ack.version < first_new,
                "old fence committed version {} after the takeover at {first_new}",
                ack.version
            );
        }
    }
    let after_resume_by_a = acks.iter().filter(|x| x.at > resumed_at && x.instance == a.instance).count();
    println!(
        "{} pause: paused after {attempts} attempt(s); takeover {}ms after SIGSTOP with fence {old_fence} -> {new_fence}; acks by A after resume: {after_resume_by_a}",
        db.mode(),
        takeover.as_millis()
    );
    ledger.verify(&format!("{} sigstop", db.mode()), &client(), &b.base, &ns, &[object]).await;
    for r in [&a, &b, &c] {
        r.assert_no_panic();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killed_owners_are_replaced_without_losing_writes() {
    let db = TestDatabase::new();
    let mut replicas: Vec<Process> = (0..3).map(|_| replica(&db)).collect();
    let ns = unique_ns("kill");
    let object = "target".to_string();
    let ledger = Arc::new(Ledger::default());
    let live = Arc::new(RwLock::new(replicas.iter().map(|r| r.base.clone()).collect::<Vec<_>>()));
    let stop = Arc::new(AtomicBool::new(false));
    let seq = Arc::new(AtomicU64::new(0));
    let streams: Vec<_> = (0..3)
        .map(|_| spawn_stream(ledger.clone(), live.clone(), ns.clone(), object.clone(), stop.clone(), seq.clone(), "k"))
        .collect();
    let probe = client();
    let mut takeovers = Vec::new();

    for round in 0..20 {
        // Find the owner from the object's row.
        let deadline = Instant::now() + Duration::from_secs(10);
        let owner_index = loop {
            let base = live.read().unwrap()[0].clone();
            if let Ok(r) = probe.get(format!("{base}/v1/objects/{ns}/{object}")).send().await {
                if let Ok(info) = r.json::<serde_json::Value>().await {
                    if let Some(owner) = info["owner"].as_str() {
                        if let Some(i) = replicas.iter().position(|p| p.instance == owner) {
                            break i;
                        }
                    }
                }
            }
            assert!(Instant::now() < deadline, "round {round}: no owner found");
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        tokio::time::sleep(Duration::from_millis(rand::rng().random_range(0..150))).await;
        let mut victim = replicas.remove(owner_index);
        live.write().unwrap().retain(|b| b != &victim.base);
        victim.kill();
        let killed_at = Instant::now();
        victim.assert_no_panic();

        // Takeover: the first write acknowledged by another replica after the kill.
        let deadline = killed_at + Duration::from_secs(10);
        let takeover = loop {
            let later = ledger
                .acked()
                .into_iter()
                .filter(|a| a.at > killed_at && a.instance != victim.instance)
                .map(|a| a.at)
                .min();
            if let Some(at) = later {
                break at - killed_at;
            }
            assert!(Instant::now() < deadline, "round {round}: nobody took over within 10 s");
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        takeovers.push(takeover);
        let fresh = replica(&db);
        live.write().unwrap().push(fresh.base.clone());
        replicas.push(fresh);
    }
    stop.store(true, Ordering::Relaxed);
    for s in streams {
        s.await.unwrap();
    }
    println!("{} sigkill: 20 owners killed; takeover after kill: {}", db.mode(), summarize(&takeovers));
    let base = replicas[0].base.clone();
    ledger.verify(&format!("{} sigkill", db.mode()), &client(), &base, &ns, &[object]).await;
    // A process killed inside a write transaction holds a local file's lock
    // only until the kernel closes its files; on a libSQL server every
    // transaction is one request, so a dead replica holds nothing at all.
    let bound = Duration::from_millis(LEASE_MS + 1000);
    for (round, t) in takeovers.iter().enumerate() {
        assert!(*t <= bound, "round {round}: takeover took {t:?}, more than lease + 1 s");
    }
    for r in &replicas {
        r.assert_no_panic();
    }
}

/// Reads from the owner's memory never outlive its lease. In each round the
/// owner holds a value in memory and answers reads of it (a reader keeps
/// asking, so reads are in flight at every moment); it is paused with SIGSTOP
/// at a random point past its lease, the other replica takes the object over
/// and writes a new value, and the owner is resumed. Every read the old owner
/// answers after it was sent later than the new value's acknowledgement must
/// show the new value (or not answer), including the reads that waited in its
/// socket while it was stopped and the one sent right after it resumed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_paused_owner_never_answers_reads_from_stale_memory() {
    const ROUNDS: usize = 20;
    let db = TestDatabase::new();
    let replicas = [replica(&db), replica(&db)];
    let ns = unique_ns("lease-read");
    let object = "read".to_string();
    let key_path = |base: &str| format!("{base}/v1/objects/{ns}/{object}/kv/k");
    let writer = client();
    let (mut from_memory, mut stale, mut after_resume_new) = (0usize, 0usize, 0usize);

    // Round r: the owner is replicas[r % 2]; it is paused, the other takes over.
    for round in 0..ROUNDS {
        let (owner, other) = (&replicas[round % 2], &replicas[(round + 1) % 2]);
        let old_value = format!("r{round}-old");
        // The owner writes (taking the object once the other's lease has lapsed) ...
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let r = writer.put(key_path(&owner.base)).body(old_value.clone()).send().await;
            if let Ok(r) = r {
                if r.status() == 200 && r.headers()["statehouse-instance"] == owner.instance.as_str() {
                    break;
                }
            }
            assert!(Instant::now() < deadline, "round {round}: the owner-to-be never took the object");
            // Forwarded to the previous owner, which keeps its lease while it is used: leave the
            // object alone until that lease is released as idle (after two terms).
            tokio::time::sleep(Duration::from_millis(LEASE_MS * 3)).await;
        }
        // ... and answers reads of it from memory.
        let hits_before = resident_hits(&writer, &owner.base).await;
        for _ in 0..5 {
            let r = writer.get(key_path(&owner.base)).send().await.unwrap();
            assert_eq!(r.text().await.unwrap(), old_value);
        }
        assert!(resident_hits(&writer, &owner.base).await > hits_before, "round {round}: reads did not hit memory");
        from_memory += 1;

        // A reader keeps asking the owner; each answer is kept with the time its request was sent.
        let stop = Arc::new(AtomicBool::new(false));
        let reader = {
            let (stop, url) = (stop.clone(), key_path(&owner.base));
            tokio::spawn(async move {
                let patient = client_with_timeout(Duration::from_secs(20));
                let mut answers = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let sent = Instant::now();
                    let answer = match patient.get(&url).send().await {
                        Ok(r) if r.status() == 200 => Some(r.text().await.unwrap_or_default()),
                        _ => None,
                    };
                    answers.push((sent, answer));
                }
                answers
            })
        };
        tokio::time::sleep(Duration::from_millis(rand::rng().random_range(0..100))).await;
        let mut attempts = 0;
        loop {
            attempts += 1;
            owner.signal(libc::SIGSTOP);
            if write_lock_free(&db).await {
                break;
            }
            owner.signal(libc::SIGCONT);
            assert!(attempts < 200, "round {round}: could not pause the owner outside a transaction");
            tokio::time::sleep(Duration::from_millis(rand::rng().random_range(1..15))).await;
        }
        // More reads go to the stopped owner; they wait in its socket.
        let waiting: Vec<_> = (0..3)
            .map(|_| {
                let url = key_path(&owner.base);
                let delay = Duration::from_millis(rand::rng().random_range(0..LEASE_MS));
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    let sent = Instant::now();
                    let r = client_with_timeout(Duration::from_secs(20)).get(&url).send().await;
                    let answer = match r {
                        Ok(r) if r.status() == 200 => Some(r.text().await.unwrap_or_default()),
                        _ => None,
                    };
                    (sent, answer)
                })
            })
            .collect();

        // The other replica takes over and writes a new value.
        let new_value = format!("r{round}-new");
        let deadline = Instant::now() + Duration::from_millis(LEASE_MS * 5) + Duration::from_secs(5);
        let acked_at = loop {
            let r = writer.put(key_path(&other.base)).body(new_value.clone()).send().await;
            if let Ok(r) = r {
                if r.status() == 200 && r.headers()["statehouse-instance"] == other.instance.as_str() {
                    break Instant::now();
                }
            }
            assert!(Instant::now() < deadline, "round {round}: no takeover while the owner was paused");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        tokio::time::sleep(Duration::from_millis(rand::rng().random_range(0..LEASE_MS))).await;
        owner.signal(libc::SIGCONT);
        // Sent right after the resume.
        let r = writer.get(key_path(&owner.base)).send().await;
        if let Ok(r) = r {
            if r.status() == 200 {
                let text = r.text().await.unwrap();
                assert_eq!(text, new_value, "round {round}: the resumed owner answered from stale memory");
                after_resume_new += 1;
            }
        }
        stop.store(true, Ordering::Relaxed);
        let mut answers = reader.await.unwrap();
        for task in waiting {
            answers.push(task.await.unwrap());
        }
        for (sent, answer) in answers {
            if sent > acked_at && answer.as_deref() == Some(old_value.as_str()) {
                stale += 1;
            }
        }
        assert_eq!(stale, 0, "round {round}: a read sent after the new value was acknowledged saw the old one");
    }
    println!(
        "{} lease reads: {ROUNDS} rounds, owner answered from memory before each pause: {from_memory}, stale answers after takeover: {stale}, new value right after resume: {after_resume_new}/{ROUNDS}",
        db.mode()
    );
    for r in &replicas {
        r.assert_no_panic();
    }
}

/// `statehouse_resident_hits_total` of a replica.
async fn resident_hits(client: &reqwest::Client, base: &str) -> f64 {
    let text = client.get(format!("{base}/metrics")).send().await.unwrap().text().await.unwrap();
    text.lines()
        .find_map(|line| line.strip_prefix("statehouse_resident_hits_total ")?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no resident hits in /metrics of {base}: {text}"))
}
