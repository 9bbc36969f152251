//! The `alarms` workload: arms 100,000 alarms (10 on each of 10,000 objects,
//! by batch) due evenly over 10 s, and receives them on a webhook receiver
//! in this process, on the same machine as the server: delivered/s, and the
//! lateness of each alarm's first delivery (arrival minus scheduled time).

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;

const SECRET: &str = "bench-alarm-secret-0123456789abcdef-0123";

#[derive(serde::Deserialize)]
struct Delivery {
    id: String,
    name: String,
    scheduled_at: String,
}

/// Arrivals: (object id, alarm name, lateness ms, arrival ms).
type Arrivals = Arc<Mutex<Vec<(String, String, i64, i64)>>>;

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64
}

async fn receiver() -> (String, Arrivals) {
    let arrivals: Arrivals = Arc::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/alarms", listener.local_addr().unwrap());
    let recorded = arrivals.clone();
    let app = axum::Router::new().route(
        "/alarms",
        axum::routing::post(move |body: axum::body::Bytes| {
            let recorded = recorded.clone();
            async move {
                let at = now_ms();
                let delivery: Delivery = serde_json::from_slice(&body).expect("a delivery is JSON");
                let scheduled =
                    chrono::DateTime::parse_from_rfc3339(&delivery.scheduled_at).unwrap().timestamp_millis();
                recorded.lock().unwrap().push((delivery.id, delivery.name, at - scheduled, at));
                axum::http::StatusCode::NO_CONTENT
            }
        }),
    );
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, arrivals)
}

pub async fn alarms(
    binary: &str,
    dir: &std::path::Path,
    client: &reqwest::Client,
    database: &str,
    extra_env: &[(&str, String)],
    total: usize,
    seconds: u64,
) {
    let (target, arrivals) = receiver().await;
    let mut env =
        vec![("STATEHOUSE_ALARM_TARGETS", format!("*={target}")), ("STATEHOUSE_ALARM_SECRET", SECRET.to_string())];
    env.extend(extra_env.iter().cloned());
    let (server, base) = super::start_server(binary, dir, &format!("alarms-{database}"), &env, client).await;
    let objects = 10_000.min(total).max(1);
    let per_object = total.div_ceil(objects);
    let span_ms = seconds as i64 * 1000;
    let lead_ms = 20_000;
    let first = now_ms() + lead_ms;
    let armed_at = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    for _ in 0..64 {
        let (client, base, next) = (client.clone(), base.clone(), next.clone());
        tasks.spawn(async move {
            loop {
                let o = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if o >= objects {
                    return;
                }
                // Alarm i is due at first + i/total of the span; object o holds
                // alarms o, o + objects, ...: one object's alarms are a second apart.
                let ops: Vec<_> = (0..per_object)
                    .map(|a| o + a * objects)
                    .filter(|i| *i < total)
                    .map(|i| {
                        let at = first + (i as i64 * span_ms) / total as i64;
                        json!({"op": "set_alarm", "name": format!("a{i}"), "at": rfc3339(at)})
                    })
                    .collect();
                let r = client
                    .post(format!("{base}/v1/objects/bench-alarms/o{o}/batch"))
                    .json(&json!({"ops": ops}))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    let arming = armed_at.elapsed().as_secs_f64();
    assert!(
        now_ms() < first,
        "arming took {arming:.1} s, longer than the {lead_ms} ms lead: the lateness would be meaningless"
    );
    let deadline = Instant::now() + Duration::from_millis((first - now_ms()) as u64 + span_ms as u64 + 120_000);
    while arrivals.lock().unwrap().len() < total && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let arrived = arrivals.lock().unwrap().clone();
    let mut seen = HashSet::new();
    let mut lateness: Vec<i64> =
        arrived.iter().filter(|(id, name, ..)| seen.insert((id.clone(), name.clone()))).map(|a| a.2).collect();
    lateness.sort();
    let last = arrived.iter().map(|a| a.3).max().unwrap_or(first);
    let pct =
        |p: f64| lateness.get(((lateness.len() as f64 * p).ceil() as usize).saturating_sub(1)).copied().unwrap_or(-1);
    let window = (last - first).max(1) as f64 / 1000.0;
    println!(
        "database={database} workload=alarms alarms={total} objects={objects} due_over_s={seconds} armed_in_s={arming:.1} armed_per_s={:.0} delivered={} duplicates={} delivered_per_s={:.0} (first due to last arrival: {window:.1} s) lateness_p50_ms={} lateness_p99_ms={} lateness_max_ms={}",
        total as f64 / arming,
        seen.len(),
        arrived.len() - seen.len(),
        seen.len() as f64 / window,
        pct(0.5),
        pct(0.99),
        lateness.last().copied().unwrap_or(-1),
    );
    super::stop(server);
}

fn rfc3339(unix_ms: i64) -> String {
    let at = std::time::UNIX_EPOCH + Duration::from_millis(unix_ms as u64);
    humantime::format_rfc3339_millis(at).to_string()
}
