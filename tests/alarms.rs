//! Alarms, black-box: the API (set, get, list, replace, delete, conditions,
//! batches, delete-all, the allow-list), and delivery to a webhook receiver
//! in the test that records every call and checks every signature: lateness
//! of a thousand alarms due at once, retries with backoff, failure, repeats
//! without drift, owners killed at random points, and the events in Iceberg.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use common::iceberg::{read_tables, tables};
use common::{spawn_app_with, unique_ns, Process, TestApp, TestDatabase};
use hmac::{Hmac, Mac};
use rand::Rng;
use serde_json::{json, Value};
use sha2::Sha256;
use statehouse::clock::{now_ms, rfc3339_ms};

const SECRET: &str = "alarm-test-secret-0123456789abcdef-0123";

/// One call the receiver got.
#[derive(Debug, Clone)]
struct Call {
    /// Unix ms when it arrived.
    at_ms: i64,
    delivery: Value,
    /// The signature verified on the body as received.
    verified: bool,
    /// The same signature verified on the body with one byte changed.
    tampered_verified: bool,
    status: u16,
}

impl Call {
    fn alarm(&self) -> (String, String) {
        (self.delivery["id"].as_str().unwrap().to_string(), self.delivery["name"].as_str().unwrap().to_string())
    }

    fn scheduled_ms(&self) -> i64 {
        parse_ms(self.delivery["scheduled_at"].as_str().unwrap())
    }
}

fn parse_ms(rfc3339: &str) -> i64 {
    chrono::DateTime::parse_from_rfc3339(rfc3339).unwrap().timestamp_millis()
}

/// Statuses to answer per (object id, alarm name), in order.
type Script = HashMap<(String, String), VecDeque<u16>>;

/// A webhook receiver that verifies signatures as the README tells
/// receivers to, answers by script (per object id and alarm name; 200 by
/// default), and records every call.
#[derive(Clone, Default)]
struct Receiver {
    base: String,
    calls: Arc<Mutex<Vec<Call>>>,
    /// Statuses to answer, in order, per (id, name); then `fallback`.
    script: Arc<Mutex<Script>>,
    /// Ids whose every call fails.
    failing: Arc<Mutex<HashSet<String>>>,
}

/// `Statehouse-Signature: t=<unix>,v1=<hex>`: HMAC-SHA256 of `<t>.<body>`.
fn verify(secret: &str, header: &str, body: &[u8]) -> bool {
    let fields: HashMap<&str, &str> = header.split(',').filter_map(|part| part.split_once('=')).collect();
    let (Some(t), Some(v1)) = (fields.get("t"), fields.get("v1")) else { return false };
    let Ok(given) = hex::decode(v1) else { return false };
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(format!("{t}.").as_bytes());
    mac.update(body);
    mac.verify_slice(&given).is_ok()
}

impl Receiver {
    async fn start() -> Receiver {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut receiver =
            Receiver { base: format!("http://{}", listener.local_addr().unwrap()), ..Default::default() };
        let state = receiver.clone();
        let app = axum::Router::new().route(
            "/alarms",
            axum::routing::post(move |headers: HeaderMap, body: Bytes| {
                let state = state.clone();
                async move { state.receive(headers, body) }
            }),
        );
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        receiver.base.push_str("/alarms");
        receiver
    }

    fn receive(&self, headers: HeaderMap, body: Bytes) -> StatusCode {
        let at_ms = now_ms();
        let signature = headers.get("statehouse-signature").and_then(|v| v.to_str().ok()).unwrap_or("");
        let verified = verify(SECRET, signature, &body);
        let mut tampered = body.to_vec();
        let last = tampered.len() - 2;
        tampered[last] ^= 0x01;
        let tampered_verified = verify(SECRET, signature, &tampered);
        let delivery: Value = serde_json::from_slice(&body).expect("a delivery is JSON");
        let id = delivery["id"].as_str().unwrap_or_default().to_string();
        let name = delivery["name"].as_str().unwrap_or_default().to_string();
        let status = if self.failing.lock().unwrap().contains(&id) {
            500
        } else {
            self.script.lock().unwrap().get_mut(&(id, name)).and_then(VecDeque::pop_front).unwrap_or(200)
        };
        self.calls.lock().unwrap().push(Call { at_ms, delivery, verified, tampered_verified, status });
        StatusCode::from_u16(status).unwrap()
    }

    fn calls(&self) -> Vec<Call> {
        self.calls.lock().unwrap().clone()
    }

    fn calls_of(&self, ns: &str) -> Vec<Call> {
        self.calls().into_iter().filter(|c| c.delivery["ns"] == ns).collect()
    }

    /// Waits until `done` holds of the calls so far, or fails after `within`.
    async fn wait_for(&self, within: Duration, what: &str, done: impl Fn(&[Call]) -> bool) -> Vec<Call> {
        let deadline = Instant::now() + within;
        loop {
            let calls = self.calls();
            if done(&calls) {
                return calls;
            }
            assert!(Instant::now() < deadline, "timed out waiting for {what}; {} calls so far", calls.len());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// A server delivering alarms of namespaces `al-*` to `receiver`.
async fn alarm_app(db: &TestDatabase, receiver: &Receiver, retry_base_ms: u64) -> TestApp {
    let target = receiver.base.clone();
    spawn_app_with(db, move |settings| {
        settings.alarms.alarm_targets = Some(format!("al-*={target}"));
        settings.alarms.alarm_secret = Some(SECRET.into());
        settings.alarms.alarm_retry_base = Duration::from_millis(retry_base_ms);
        settings.alarms.alarm_poll = Duration::from_millis(20);
        settings.export_interval = Duration::from_secs(3600);
    })
    .await
}

async fn json_of(response: reqwest::Response) -> (u16, Value) {
    let status = response.status().as_u16();
    let body = response.text().await.unwrap();
    (status, serde_json::from_str(&body).unwrap_or(Value::String(body)))
}

async fn put_alarm(app: &TestApp, path: &str, body: Value, headers: &[(&str, &str)]) -> (u16, Value) {
    let mut request = app.client.put(app.url(path)).json(&body);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    json_of(request.send().await.unwrap()).await
}

async fn object_version(app: &TestApp, ns: &str, id: &str) -> Option<i64> {
    let (status, body) =
        json_of(app.client.get(app.url(&format!("/v1/objects/{ns}/{id}"))).send().await.unwrap()).await;
    (status == 200).then(|| body["version"].as_i64().unwrap())
}

fn percentile(sorted: &[i64], p: f64) -> i64 {
    sorted[((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_get_list_replace_delete_with_conditions() {
    let db = TestDatabase::new();
    let receiver = Receiver::start().await;
    let app = alarm_app(&db, &receiver, 2000).await;
    let ns = unique_ns("al");
    let one = format!("/v1/objects/{ns}/o1/alarms/alarm");

    // Set with If-None-Match: * creates; a second one is refused.
    let (status, set) =
        put_alarm(&app, &one, json!({"in_ms": 3_600_000, "payload": {"cart": 7}}), &[("if-none-match", "*")]).await;
    assert_eq!(status, 200, "{set}");
    let v1 = set["version"].as_i64().unwrap();
    assert_eq!(object_version(&app, &ns, "o1").await, Some(v1), "setting an alarm is a write of the object");
    let (status, again) = put_alarm(&app, &one, json!({"in_ms": 1000}), &[("if-none-match", "*")]).await;
    assert_eq!(status, 412, "{again}");
    assert_eq!(object_version(&app, &ns, "o1").await, Some(v1), "a refused set changes nothing");

    let got = app.client.get(app.url(&one)).send().await.unwrap();
    assert_eq!(got.headers()["etag"], format!("\"{v1}\"").as_str());
    let (_, got) = json_of(got).await;
    assert_eq!(got["name"], "alarm");
    assert_eq!(got["payload"], json!({"cart": 7}));
    assert_eq!(got["attempt"], 0);
    assert_eq!(got["alarm_version"], v1);
    let scheduled = parse_ms(got["scheduled_at"].as_str().unwrap());
    assert!((scheduled - (now_ms() + 3_600_000)).abs() < 60_000, "{got}");
    let not_modified = app.client.get(app.url(&one)).header("if-none-match", format!("\"{v1}\"")).send().await.unwrap();
    assert_eq!(not_modified.status(), 304);

    // Replace: a stale If-Match is refused, the current one applies.
    let at = "2035-01-02T03:04:05.678Z";
    let (status, _) = put_alarm(&app, &one, json!({"at": at}), &[("if-match", "\"999\"")]).await;
    assert_eq!(status, 412);
    let (status, replaced) = put_alarm(
        &app,
        &one,
        json!({"at": "2035-01-02T04:04:05.678+01:00", "every_ms": 60_000}),
        &[("if-match", &format!("\"{v1}\""))],
    )
    .await;
    assert_eq!(status, 200, "{replaced}");
    let v2 = replaced["version"].as_i64().unwrap();
    assert!(v2 > v1);
    let (_, got) = json_of(app.client.get(app.url(&one)).send().await.unwrap()).await;
    assert_eq!(got["scheduled_at"], at, "offsets are honoured");
    assert_eq!(got["every_ms"], 60_000);
    assert!(got.get("payload").is_none(), "a replacement replaces the payload too: {got}");

    // Names follow key rules (percent-decoded, any UTF-8), shorter.
    let named = format!("/v1/objects/{ns}/o1/alarms/reminders%2Fweekly%20%C3%A9");
    let (status, body) = put_alarm(&app, &named, json!({"in_ms": 7_200_000}), &[]).await;
    assert_eq!(status, 200, "{body}");
    let (_, list) =
        json_of(app.client.get(app.url(&format!("/v1/objects/{ns}/o1/alarms"))).send().await.unwrap()).await;
    let names: Vec<&str> = list["items"].as_array().unwrap().iter().map(|a| a["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["alarm", "reminders/weekly é"]);
    let (_, page) =
        json_of(app.client.get(app.url(&format!("/v1/objects/{ns}/o1/alarms?limit=1"))).send().await.unwrap()).await;
    assert_eq!(page["items"].as_array().unwrap().len(), 1);
    let cursor = page["cursor"].as_str().unwrap();
    let (_, next) = json_of(
        app.client.get(app.url(&format!("/v1/objects/{ns}/o1/alarms?limit=1&cursor={cursor}"))).send().await.unwrap(),
    )
    .await;
    assert_eq!(next["items"][0]["name"], "reminders/weekly é");
    assert!(next["cursor"].is_null());

    // The operators' listing, by due time, paged.
    let (status, pending) =
        json_of(app.client.get(app.url("/v1/alarms?limit=1&due_before=2036-01-01T00:00:00Z")).send().await.unwrap())
            .await;
    assert_eq!(status, 200, "{pending}");
    assert_eq!(pending["items"][0]["ns"], ns.as_str());
    assert_eq!(pending["items"][0]["id"], "o1");
    assert_eq!(pending["items"][0]["name"], "reminders/weekly é", "due first");
    let cursor = pending["cursor"].as_str().expect("a second page").to_string();
    let (_, rest) = json_of(
        app.client
            .get(app.url(&format!("/v1/alarms?limit=1&due_before=2036-01-01T00:00:00Z&cursor={cursor}")))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(rest["items"][0]["name"], "alarm", "{rest}");
    assert!(rest["cursor"].is_null(), "{rest}");
    let (_, early) =
        json_of(app.client.get(app.url("/v1/alarms?due_before=2034-01-01T00:00:00Z")).send().await.unwrap()).await;
    assert_eq!(early["items"].as_array().unwrap().len(), 1, "the 2035 alarm is not due before 2034: {early}");
    let (status, _) = json_of(app.client.get(app.url("/v1/alarms?cursor=nonsense")).send().await.unwrap()).await;
    assert_eq!(status, 400);

    // Bad input: 4xx problems, nothing changed.
    let before = object_version(&app, &ns, "o1").await;
    for (body, want) in [
        (json!({"in_ms": 1000, "at": at}), 400),
        (json!({}), 400),
        (json!({"in_ms": -1}), 400),
        (json!({"in_ms": 1000, "every_ms": 999}), 400),
        (json!({"at": "tomorrow"}), 400),
        (json!({"in_ms": 1000, "colour": "red"}), 400),
        (json!({"in_ms": 1000, "payload": "x".repeat(5000)}), 413),
    ] {
        let response = app.client.put(app.url(&one)).json(&body).send().await.unwrap();
        assert_eq!(response.status().as_u16(), want, "{body}");
        assert_eq!(response.headers()["content-type"], "application/problem+json");
    }
    let long = format!("/v1/objects/{ns}/o1/alarms/{}", "n".repeat(129));
    assert_eq!(put_alarm(&app, &long, json!({"in_ms": 1000}), &[]).await.0, 400);
    let garbage = app.client.put(app.url(&one)).body("{not json").send().await.unwrap();
    assert_eq!(garbage.status(), 400);
    assert_eq!(object_version(&app, &ns, "o1").await, before);

    // Delete: conditions, then gone.
    let delete = app.client.delete(app.url(&one)).header("if-match", "\"1\"").send().await.unwrap();
    assert_eq!(delete.status(), 412);
    let (status, deleted) = json_of(app.client.delete(app.url(&one)).send().await.unwrap()).await;
    assert_eq!((status, &deleted["deleted"]), (200, &json!(true)), "{deleted}");
    assert_eq!(app.client.get(app.url(&one)).send().await.unwrap().status(), 404);
    let (_, again) = json_of(app.client.delete(app.url(&one)).send().await.unwrap()).await;
    assert_eq!(again["deleted"], false);
    assert_eq!(again["version"], deleted["version"], "deleting nothing does not bump the version");

    // Changes go to the outbox (the history shows them).
    let (_, history) =
        json_of(app.client.get(app.url(&format!("/v1/objects/{ns}/o1/history"))).send().await.unwrap()).await;
    let ops: Vec<String> = history["versions"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|v| v["changes"].as_array().unwrap().iter().map(|c| c["op"].as_str().unwrap().to_string()))
        .collect();
    assert_eq!(ops, ["alarm_delete", "alarm_set", "alarm_set", "alarm_set"], "{history}");

    // A namespace with no target: refused, nothing written.
    let elsewhere = unique_ns("other");
    let response = app
        .client
        .put(app.url(&format!("/v1/objects/{elsewhere}/o1/alarms/alarm")))
        .json(&json!({"in_ms": 10}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 422);
    assert_eq!(response.headers()["content-type"], "application/problem+json");
    let (_, problem) = json_of(response).await;
    assert_eq!(problem["type"], "https://statehouse.dev/problems/no-alarm-target");
    assert!(problem["detail"].as_str().unwrap().contains("no alarm target"), "{problem}");
    let batch = json!({"ops": [{"op": "set_alarm", "name": "alarm", "in_ms": 10}]});
    let response =
        app.client.post(app.url(&format!("/v1/objects/{elsewhere}/o1/batch"))).json(&batch).send().await.unwrap();
    assert_eq!(response.status(), 422);
    assert_eq!(object_version(&app, &elsewhere, "o1").await, None);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(receiver.calls().is_empty(), "nothing was due, nothing may be called");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_with_alarm_ops_are_atomic_and_delete_all_clears_alarms() {
    let db = TestDatabase::new();
    let receiver = Receiver::start().await;
    let app = alarm_app(&db, &receiver, 2000).await;
    let ns = unique_ns("al");
    let batch_url = app.url(&format!("/v1/objects/{ns}/b/batch"));

    let first = json!({"ops": [
        {"op": "put", "key": "cart", "value": {"items": 1}},
        {"op": "set_alarm", "name": "expire", "in_ms": 3_600_000, "payload": {"why": "cart"}, "if_absent": true},
        {"op": "set_alarm", "name": "alarm", "at": "2035-01-01T00:00:00Z"},
    ]});
    let (status, body) = json_of(app.client.post(&batch_url).json(&first).send().await.unwrap()).await;
    assert_eq!(status, 200, "{body}");
    let version = body["version"].as_i64().unwrap();
    assert_eq!(body["results"][1], json!({"op": "set_alarm", "name": "expire", "version": version}));

    // A failing alarm condition refuses the whole batch, keys included.
    let refused = json!({"ops": [
        {"op": "put", "key": "cart", "value": {"items": 2}},
        {"op": "delete_alarm", "name": "alarm"},
        {"op": "set_alarm", "name": "expire", "in_ms": 10, "if_absent": true},
    ]});
    let (status, problem) = json_of(app.client.post(&batch_url).json(&refused).send().await.unwrap()).await;
    assert_eq!(status, 412, "{problem}");
    assert_eq!(problem["op_index"], 2);
    let (_, cart) =
        json_of(app.client.get(app.url(&format!("/v1/objects/{ns}/b/kv/cart"))).send().await.unwrap()).await;
    assert_eq!(cart, json!({"items": 1}));
    let (_, list) = json_of(app.client.get(app.url(&format!("/v1/objects/{ns}/b/alarms"))).send().await.unwrap()).await;
    assert_eq!(list["items"].as_array().unwrap().len(), 2, "{list}");
    assert_eq!(object_version(&app, &ns, "b").await, Some(version));

    // A bad alarm op in a batch is a 400 naming it; nothing applied.
    let bad = json!({"ops": [{"op": "put", "key": "k", "value": 1}, {"op": "set_alarm", "name": "x", "in_ms": 5, "every_ms": 10}]});
    let (status, problem) = json_of(app.client.post(&batch_url).json(&bad).send().await.unwrap()).await;
    assert_eq!(status, 400, "{problem}");
    assert!(problem["detail"].as_str().unwrap().starts_with("op 1:"), "{problem}");

    // Conditions on the alarm's version, and the ops applied together.
    let apply = json!({"ops": [
        {"op": "delete_alarm", "name": "alarm", "if_version": version},
        {"op": "set_alarm", "name": "expire", "in_ms": 7_200_000, "if_version": version},
        {"op": "put", "key": "cart", "value": {"items": 3}},
    ]});
    let (status, body) = json_of(app.client.post(&batch_url).json(&apply).send().await.unwrap()).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["results"][0], json!({"op": "delete_alarm", "name": "alarm", "deleted": true}));
    let (_, list) = json_of(app.client.get(app.url(&format!("/v1/objects/{ns}/b/alarms"))).send().await.unwrap()).await;
    let items = list["items"].as_array().unwrap();
    assert_eq!(items.len(), 1);
    assert_eq!(items[0]["version"], body["version"]);

    // Delete-all removes the alarms with the keys.
    let (status, _) = json_of(app.client.delete(app.url(&format!("/v1/objects/{ns}/b"))).send().await.unwrap()).await;
    assert_eq!(status, 200);
    let (_, list) = json_of(app.client.get(app.url(&format!("/v1/objects/{ns}/b/alarms"))).send().await.unwrap()).await;
    assert_eq!(list["items"], json!([]));
    let (_, pending) = json_of(app.client.get(app.url("/v1/alarms")).send().await.unwrap()).await;
    assert_eq!(pending["items"], json!([]), "no alarm left anywhere");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_thousand_alarms_due_within_a_second_are_all_delivered_signed() {
    let db = TestDatabase::new();
    let receiver = Receiver::start().await;
    let app = alarm_app(&db, &receiver, 2000).await;
    let ns = unique_ns("al");
    let (objects, per_object) = (100, 10);
    let start = now_ms() + 3000;
    let mut scheduled = HashMap::new();
    let mut writes = Vec::new();
    for o in 0..objects {
        let mut ops = Vec::new();
        for a in 0..per_object {
            let at = start + ((o * per_object + a) * 1000 / (objects * per_object)) as i64;
            scheduled.insert((format!("o{o}"), format!("a{a}")), at);
            ops.push(
                json!({"op": "set_alarm", "name": format!("a{a}"), "at": rfc3339_ms(at), "payload": {"o": o, "a": a}}),
            );
        }
        let request = app.client.post(app.url(&format!("/v1/objects/{ns}/o{o}/batch"))).json(&json!({"ops": ops}));
        writes.push(async move { request.send().await.unwrap().status() });
    }
    for status in futures::future::join_all(writes).await {
        assert_eq!(status, 200);
    }
    assert!(now_ms() < start, "arming took longer than the lead time; the lateness would be meaningless");
    let total = objects * per_object;
    let calls = receiver
        .wait_for(Duration::from_secs(60), "every alarm delivered", |calls| {
            calls.iter().map(Call::alarm).collect::<HashSet<_>>().len() >= total
        })
        .await;
    let mut first: HashMap<(String, String), &Call> = HashMap::new();
    for call in &calls {
        assert!(call.verified, "a delivery's signature does not verify: {:?}", call.delivery);
        assert!(!call.tampered_verified, "a tampered body verified");
        first.entry(call.alarm()).or_insert(call);
    }
    assert_eq!(first.len(), total);
    let mut lateness: Vec<i64> = first
        .iter()
        .map(|(key, call)| {
            assert_eq!(call.scheduled_ms(), scheduled[key], "scheduled_at as set");
            assert_eq!(call.delivery["attempt"], 1);
            let (o, a) = (&key.0[1..], &key.1[1..]);
            assert_eq!(
                call.delivery["payload"],
                json!({"o": o.parse::<i64>().unwrap(), "a": a.parse::<i64>().unwrap()})
            );
            call.at_ms - scheduled[key]
        })
        .collect();
    lateness.sort();
    let (p50, p99, max) = (percentile(&lateness, 0.5), percentile(&lateness, 0.99), *lateness.last().unwrap());
    println!(
        "{}: {total} alarms across {objects} objects due within 1 s: all delivered, {} calls; lateness p50 {p50} ms, p99 {p99} ms, max {max} ms",
        db.mode(),
        calls.len()
    );
    assert!(lateness[0] >= -50, "an alarm fired before its time: {} ms early", -lateness[0]);
    assert!(p99 < 3000, "p99 lateness {p99} ms");

    // Every one-shot alarm is gone once delivered and recorded.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, pending) = json_of(app.client.get(app.url("/v1/alarms?limit=10")).send().await.unwrap()).await;
        if pending["items"].as_array().unwrap().is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "delivered alarms are still pending: {pending}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let metrics = app.client.get(app.url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(
        metrics.contains(&format!("statehouse_alarm_deliveries_total{{outcome=\"delivered\"}} {}", calls.len())),
        "{metrics}"
    );
    assert!(metrics.contains("statehouse_alarm_lateness_seconds_bucket"));
    assert!(metrics.contains("statehouse_alarms_pending"));
    assert!(metrics.contains("statehouse_alarms_due"));
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_deliveries_are_retried_with_backoff_then_dropped_and_the_events_reach_iceberg() {
    // The defaults are those of Durable Objects: 2 s doubling, 6 retries.
    let defaults = statehouse::config::Settings::for_database("file:/tmp/unused.db").unwrap();
    assert_eq!(defaults.alarms.alarm_retry_base, Duration::from_secs(2));
    assert_eq!(defaults.alarms.alarm_max_retries, 6);

    let db = TestDatabase::new();
    let receiver = Receiver::start().await;
    let base_ms = 100;
    let app = alarm_app(&db, &receiver, base_ms).await;
    let ns = unique_ns("al");
    receiver.script.lock().unwrap().insert(("flaky".into(), "alarm".into()), VecDeque::from([500, 500, 200]));
    receiver.failing.lock().unwrap().insert("down".into());
    for id in ["flaky", "down"] {
        let (status, body) =
            put_alarm(&app, &format!("/v1/objects/{ns}/{id}/alarms/alarm"), json!({"in_ms": 200}), &[]).await;
        assert_eq!(status, 200, "{body}");
    }

    let of =
        |calls: &[Call], id: &str| -> Vec<Call> { calls.iter().filter(|c| c.delivery["id"] == id).cloned().collect() };
    let calls = receiver
        .wait_for(Duration::from_secs(30), "3 attempts at the flaky receiver", |c| of(c, "flaky").len() >= 3)
        .await;
    let flaky = of(&calls, "flaky");
    let attempts: Vec<i64> = flaky.iter().map(|c| c.delivery["attempt"].as_i64().unwrap()).collect();
    assert_eq!(attempts, [1, 2, 3]);
    assert_eq!(flaky.iter().map(|c| c.status).collect::<Vec<_>>(), [500, 500, 200]);
    assert!(
        flaky.iter().all(|c| c.delivery["alarm_version"] == flaky[0].delivery["alarm_version"]),
        "retries keep the arming"
    );
    assert!(flaky.iter().all(|c| c.scheduled_ms() == flaky[0].scheduled_ms()), "retries keep the scheduled time");
    let gaps: Vec<i64> = flaky.windows(2).map(|w| w[1].at_ms - w[0].at_ms).collect();
    println!("{}: flaky receiver: attempts {attempts:?}, gaps {gaps:?} ms (base {base_ms} ms)", db.mode());
    assert!(gaps[0] >= base_ms as i64, "first retry after the base: {gaps:?}");
    assert!(gaps[1] >= 2 * base_ms as i64 && gaps[1] > gaps[0], "the gaps grow: {gaps:?}");

    // Always failing: 1 + 6 retries, then dropped (100+200+...+3200 ms of backoff).
    let calls = receiver
        .wait_for(Duration::from_secs(40), "7 attempts at the failing receiver", |c| of(c, "down").len() >= 7)
        .await;
    let down = of(&calls, "down");
    assert_eq!(down.iter().map(|c| c.delivery["attempt"].as_i64().unwrap()).collect::<Vec<_>>(), [1, 2, 3, 4, 5, 6, 7]);
    let deadline = Instant::now() + Duration::from_secs(10);
    for id in ["flaky", "down"] {
        loop {
            let status =
                app.client.get(app.url(&format!("/v1/objects/{ns}/{id}/alarms/alarm"))).send().await.unwrap().status();
            if status == 404 {
                break;
            }
            assert!(Instant::now() < deadline, "{id}'s alarm is still set");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(of(&receiver.calls(), "down").len(), 7, "no attempt after the last retry");
    let metrics = app.client.get(app.url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("statehouse_alarm_deliveries_total{outcome=\"failed\"} 1"), "{metrics}");
    assert!(metrics.contains("statehouse_alarm_retries_total 8"), "2 + 6 retries: {metrics}");

    // The events of every attempt, and the failure, in statehouse.events, as DuckDB and PyIceberg read it.
    let (status, report) = json_of(app.client.post(app.url("/v1/admin/export")).send().await.unwrap()).await;
    assert_eq!(status, 200, "{report}");
    let listed = tables(&app.client, &app.base).await;
    let body: Value = app.client.get(app.url("/v1/analytics/tables")).send().await.unwrap().json().await.unwrap();
    let info = &listed["events"];
    assert_eq!(info["pending_rows"], 0, "{info}");
    let read = read_tables(&json!({
        "table": "events",
        "metadata_location": info["metadata_location"],
        "db_file": db.file_path().map(|p| p.display().to_string()),
        "warehouse": body["warehouse"],
        "snapshot_ids": [],
        "s3": null,
    }))
    .await;
    for reader in ["duckdb", "pyiceberg"] {
        let rows: Vec<&Value> =
            read[reader]["rows"].as_array().unwrap().iter().filter(|r| r["ns"] == ns.as_str()).collect();
        let mut seen: BTreeMap<(String, String), Vec<Value>> = BTreeMap::new();
        for row in &rows {
            let data: Value = serde_json::from_str(row["data"].as_str().unwrap()).unwrap();
            seen.entry((row["id"].as_str().unwrap().into(), row["type"].as_str().unwrap().into()))
                .or_default()
                .push(data);
        }
        let fired = |id: &str| seen.get(&(id.to_string(), "alarm.fired".to_string())).cloned().unwrap_or_default();
        assert_eq!(fired("flaky").len(), 3, "{reader}: {seen:?}");
        assert_eq!(fired("down").len(), 7, "{reader}: {seen:?}");
        let outcomes: Vec<String> = fired("flaky").iter().map(|d| d["outcome"].as_str().unwrap().to_string()).collect();
        assert_eq!(outcomes, ["retry", "retry", "delivered"], "{reader}");
        assert!(fired("down").iter().all(|d| d["latency_ms"].is_i64() && d["attempt"].is_i64()));
        let failed = seen.get(&("down".to_string(), "alarm.failed".to_string())).expect("alarm.failed exported");
        assert_eq!(failed.len(), 1);
        assert_eq!(failed[0]["attempts"], 7);
        assert!(!seen.contains_key(&("flaky".to_string(), "alarm.failed".to_string())));
        println!("{reader}: {} alarm events of the test read from statehouse.events", rows.len());
    }
    assert_eq!(read["duckdb"]["rows"], read["pyiceberg"]["rows"], "DuckDB and PyIceberg disagree");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeating_alarms_keep_their_schedule_without_drift() {
    let db = TestDatabase::new();
    let receiver = Receiver::start().await;
    let app = alarm_app(&db, &receiver, 2000).await;
    let ns = unique_ns("al");
    let path = format!("/v1/objects/{ns}/tick/alarms/alarm");
    let (status, body) = put_alarm(&app, &path, json!({"in_ms": 300, "every_ms": 1000, "payload": "tick"}), &[]).await;
    assert_eq!(status, 200, "{body}");
    let periods = 20;
    let calls = receiver.wait_for(Duration::from_secs(periods as u64 + 15), "21 periods", |c| c.len() > periods).await;
    let (_, deleted) = json_of(app.client.delete(app.url(&path)).send().await.unwrap()).await;
    assert_eq!(deleted["deleted"], true);
    let first = calls[0].scheduled_ms();
    let mut lateness = Vec::new();
    for (k, call) in calls.iter().take(periods + 1).enumerate() {
        assert_eq!(call.scheduled_ms(), first + 1000 * k as i64, "period {k} drifted: {:?}", call.delivery);
        assert_eq!(call.delivery["payload"], "tick");
        assert_eq!(call.delivery["attempt"], 1);
        lateness.push(call.at_ms - call.scheduled_ms());
    }
    let versions: HashSet<i64> = calls.iter().map(|c| c.delivery["alarm_version"].as_i64().unwrap()).collect();
    assert_eq!(versions.len(), calls.len(), "each period is an arming of its own, for deduplication");
    println!("{}: {periods} periods of 1 s: lateness per period {lateness:?} ms", db.mode());
    assert!(lateness.iter().all(|l| (0..1000).contains(l)), "lateness stays within a period: {lateness:?}");
    app.stop().await;
}

/// Three replicas; the owner of a round's alarms is killed at a random point.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killing_the_owner_at_random_points_loses_no_alarm() {
    let db = TestDatabase::new();
    let receiver = Receiver::start().await;
    let env = vec![
        ("STATEHOUSE_LEASE_MS", "1000".to_string()),
        ("STATEHOUSE_FORWARD_TIMEOUT_MS", "500".to_string()),
        ("STATEHOUSE_ALARM_TARGETS", format!("al-*={}", receiver.base)),
        ("STATEHOUSE_ALARM_SECRET", SECRET.to_string()),
        ("STATEHOUSE_ALARM_POLL_MS", "20".to_string()),
        ("STATEHOUSE_ALARM_RETRY_BASE_MS", "200".to_string()),
        ("STATEHOUSE_EXPORT_ENABLED", "false".to_string()),
    ];
    let mut replicas: Vec<Process> = (0..3).map(|_| Process::start(&db.url, 0, &env)).collect();
    let client = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().unwrap();
    let ns = unique_ns("al");
    let (rounds, objects, per_object) = (20, 4, 3);
    let mut expected: HashSet<(String, String)> = HashSet::new();
    let mut rng = rand::rng();
    let started = Instant::now();
    for round in 0..rounds {
        let victim = round % replicas.len();
        let base = replicas[victim].base.clone();
        let lead = rng.random_range(100..800);
        for o in 0..objects {
            let id = format!("r{round}-o{o}");
            let ops: Vec<Value> = (0..per_object)
                .map(|a| {
                    expected.insert((id.clone(), format!("a{a}")));
                    json!({"op": "set_alarm", "name": format!("a{a}"), "in_ms": lead + 50 * a})
                })
                .collect();
            let response = client
                .post(format!("{base}/v1/objects/{ns}/{id}/batch"))
                .json(&json!({"ops": ops}))
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 200, "{}", response.text().await.unwrap());
        }
        // Before the alarms are due, while they are delivered, or after.
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..1200))).await;
        replicas[victim].kill();
        replicas[victim] = Process::start(&db.url, 0, &env);
        let round_alarms: HashSet<(String, String)> =
            expected.iter().filter(|(id, _)| id.starts_with(&format!("r{round}-"))).cloned().collect();
        receiver
            .wait_for(Duration::from_secs(30), &format!("round {round}'s alarms"), |calls| {
                let seen: HashSet<(String, String)> = calls.iter().map(Call::alarm).collect();
                round_alarms.is_subset(&seen)
            })
            .await;
    }
    // Let outcomes recorded late settle, then compare.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let calls = receiver.calls_of(&ns);
    let seen: HashSet<(String, String)> = calls.iter().map(Call::alarm).collect();
    assert_eq!(seen, expected, "every alarm delivered at least once");
    assert!(calls.iter().all(|c| c.verified), "every delivery signed");
    let mut per_alarm: HashMap<(String, String), usize> = HashMap::new();
    for call in &calls {
        *per_alarm.entry(call.alarm()).or_default() += 1;
    }
    let duplicates: usize = per_alarm.values().map(|n| n - 1).sum();
    let duplicated = per_alarm.values().filter(|n| **n > 1).count();
    println!(
        "{}: {rounds} rounds, owner killed in each: {} alarms, {} deliveries, {duplicates} duplicates ({duplicated} alarms delivered more than once), {:.1} s",
        db.mode(),
        expected.len(),
        calls.len(),
        started.elapsed().as_secs_f64()
    );

    // Nothing is left, and every recorded outcome was recorded under the
    // fence of the time: per object, fences never go back as versions go
    // forward, and one fence is one replica.
    let base = replicas[0].base.clone();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, pending) = json_of(client.get(format!("{base}/v1/alarms?limit=5")).send().await.unwrap()).await;
        if pending["items"].as_array().unwrap().is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "alarms left pending: {pending}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut outcomes = 0;
    for round in 0..rounds {
        for o in 0..objects {
            let (status, history) =
                json_of(client.get(format!("{base}/v1/objects/{ns}/r{round}-o{o}/history")).send().await.unwrap())
                    .await;
            assert_eq!(status, 200, "{history}");
            let mut versions: Vec<&Value> = history["versions"].as_array().unwrap().iter().collect();
            versions.reverse();
            let mut instance_of: HashMap<i64, String> = HashMap::new();
            let mut last_fence = 0;
            for v in versions {
                let fence = v["fence"].as_i64().unwrap();
                assert!(fence >= last_fence, "a version recorded under an older fence: {history}");
                last_fence = fence;
                let instance = v["instance"].as_str().unwrap().to_string();
                assert_eq!(
                    instance_of.entry(fence).or_insert(instance.clone()),
                    &instance,
                    "two replicas under one fence"
                );
                outcomes += v["changes"].as_array().unwrap().iter().filter(|c| c["op"] == "alarm_delete").count();
            }
        }
    }
    assert_eq!(outcomes, expected.len(), "each alarm's delivery recorded exactly once");
    for replica in &replicas {
        replica.assert_no_panic();
    }
}
