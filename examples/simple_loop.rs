//! A rough PUT/GET loop: N clients, each writing its own keys (or reading one
//! hot key) for a few seconds, against an in-process server on a fresh
//! database (or `--url` of a running one). Prints requests/s and latencies.
//!
//!   cargo run --release --example simple_loop -- [--url http://127.0.0.1:8080] [--seconds 5] [--database file:/tmp/x.db]
//!
//! The client shares the machine's cores with the server: numbers are a floor.

use std::sync::Arc;
use std::time::{Duration, Instant};

use statehouse::config::Settings;

struct Args {
    url: Option<String>,
    database: Option<String>,
    seconds: u64,
}

fn args() -> Args {
    let mut args = Args { url: None, database: None, seconds: 5 };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--url" => args.url = Some(value),
            "--database" => args.database = Some(value),
            "--seconds" => args.seconds = value.parse().expect("--seconds takes a number"),
            other => panic!("unknown flag {other}"),
        }
    }
    args
}

#[tokio::main]
async fn main() {
    let args = args();
    let _dir = tempfile::tempdir().unwrap();
    let base = match &args.url {
        Some(url) => url.clone(),
        None => {
            let db = args.database.clone().unwrap_or_else(|| format!("file:{}/loop.db", _dir.path().display()));
            let mut settings = Settings::for_database(&db).unwrap();
            settings.log_filter = "warn".into();
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            tokio::spawn(statehouse::server::run(settings, listener, std::future::pending()));
            format!("http://{addr}")
        }
    };
    let client = reqwest::Client::builder().pool_max_idle_per_host(512).build().unwrap();
    for _ in 0..100 {
        if client.get(format!("{base}/readyz")).send().await.is_ok_and(|r| r.status() == 200) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let ns = format!("loop-{}", uuid::Uuid::now_v7().simple());
    client.put(format!("{base}/v1/objects/{ns}/hot/kv/k")).body("hot value").send().await.unwrap();
    let duration = Duration::from_secs(args.seconds);
    for (workload, connections) in
        [("put_one_object", 1), ("put_one_object", 32), ("put_many_objects", 32), ("get_hot", 1), ("get_hot", 32)]
    {
        run(&client, &base, &ns, workload, connections, duration).await;
    }
}

async fn run(
    client: &reqwest::Client,
    base: &str,
    ns: &str,
    workload: &'static str,
    connections: usize,
    duration: Duration,
) {
    let deadline = Instant::now() + duration;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..connections {
        let (client, base, ns) = (client.clone(), Arc::new(base.to_string()), ns.to_string());
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut errors = 0u64;
            let mut i = 0u64;
            while Instant::now() < deadline {
                let t = Instant::now();
                let result = match workload {
                    "get_hot" => client.get(format!("{base}/v1/objects/{ns}/hot/kv/k")).send().await,
                    "put_one_object" => {
                        client.put(format!("{base}/v1/objects/{ns}/one/kv/c{c}-{i}")).body("value").send().await
                    }
                    _ => {
                        client
                            .put(format!("{base}/v1/objects/{ns}/o{}/kv/c{c}-{i}", i % 1000))
                            .body("value")
                            .send()
                            .await
                    }
                };
                match result {
                    Ok(r) if r.status().is_success() => {
                        let _ = r.bytes().await;
                        latencies.push(t.elapsed());
                    }
                    _ => errors += 1,
                }
                i += 1;
            }
            (latencies, errors)
        }));
    }
    let mut all = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (l, e) = t.await.unwrap();
        all.extend(l);
        errors += e;
    }
    let elapsed = started.elapsed().as_secs_f64();
    all.sort();
    let pct = |p: f64| {
        all.get(((all.len() as f64 * p) as usize).min(all.len().saturating_sub(1)))
            .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
    };
    println!(
        "workload={workload} connections={connections} rps={:.0} p50_ms={:.2} p99_ms={:.2} errors={errors}",
        all.len() as f64 / elapsed,
        pct(0.50),
        pct(0.99)
    );
}
