//! Point-in-time restore and fork, checked against a model: a random workload
//! of puts, deletes, batches, delete-alls, events and blob puts/deletes over a
//! few objects, with export cycles at random points, then restores to 50
//! random versions and instants, each compared key by key and byte by byte
//! with the model's state at that point. Also: fork, `If-Match`, the
//! retention, refusals, and SIGKILL of the restoring replica.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use common::iceberg::tables;
use common::{spawn_app_with, unique_ns, Process, TestApp, TestDatabase};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

/// The largest value these servers accept: the workload writes some of exactly this size.
const MAX_VALUE: usize = 256 * 1024;

/// An object's keys and blobs: bytes and content type of each.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct State {
    keys: BTreeMap<String, (Bytes, String)>,
    blobs: BTreeMap<String, (Bytes, String)>,
}

/// Every version of one object, as the model has it.
#[derive(Default)]
struct Model {
    versions: BTreeMap<i64, State>,
}

impl Model {
    fn current(&self) -> (i64, State) {
        self.versions.last_key_value().map(|(v, s)| (*v, s.clone())).unwrap_or_default()
    }
}

fn seed() -> u64 {
    let seed = std::env::var("STATEHOUSE_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random);
    println!("seed {seed} (STATEHOUSE_TEST_SEED={seed} repeats this run)");
    seed
}

async fn ok_json(response: reqwest::Response) -> Value {
    let status = response.status();
    let body = response.text().await.unwrap();
    assert!(status.is_success(), "{status}: {body}");
    serde_json::from_str(&body).unwrap()
}

async fn problem(response: reqwest::Response, status: u16, kind: &str) -> Value {
    let got = response.status().as_u16();
    let content_type = response.headers().get("content-type").cloned();
    let body: Value = response.json().await.unwrap();
    assert_eq!(got, status, "{body}");
    assert_eq!(content_type.unwrap(), "application/problem+json");
    assert_eq!(body["type"], format!("https://statehouse.dev/problems/{kind}"), "{body}");
    body
}

/// A value of one of three kinds (JSON, text, binary), mostly small, some
/// of the largest size allowed; its bytes and content type.
fn random_value(rng: &mut StdRng, max: usize) -> (Bytes, String) {
    let size = match rng.random_range(0..100) {
        0..80 => rng.random_range(0..200),
        80..95 => rng.random_range(1024..32 * 1024).min(max),
        _ => max,
    };
    match rng.random_range(0..3) {
        0 => {
            let pad = "j".repeat(size.saturating_sub(24));
            let text = json!({"n": rng.random_range(0..1_000_000), "pad": pad}).to_string();
            (Bytes::from(text), "application/json".to_string())
        }
        1 => {
            let text: String = (0..size).map(|_| rng.random_range(b'a'..=b'z') as char).collect();
            (Bytes::from(text), "text/plain; charset=utf-8".to_string())
        }
        _ => {
            let bytes: Vec<u8> = (0..size).map(|_| rng.random()).collect();
            (Bytes::from(bytes), "application/octet-stream".to_string())
        }
    }
}

fn random_key(rng: &mut StdRng) -> String {
    format!("k{:02}", rng.random_range(0..24))
}

struct Run {
    app: TestApp,
    ns: String,
    rng: StdRng,
}

impl Run {
    fn object(&self, id: &str) -> String {
        self.app.url(&format!("/v1/objects/{}/{id}", self.ns))
    }

    /// One random write to `id`; the model gets the state it leaves.
    async fn random_write(&mut self, id: &str, model: &mut Model) {
        let c = self.app.client.clone();
        let object = self.object(id);
        let (_, mut state) = model.current();
        let version = match self.rng.random_range(0..100) {
            0..35 => {
                let key = random_key(&mut self.rng);
                let (value, content_type) = random_value(&mut self.rng, MAX_VALUE);
                let r = c.put(format!("{object}/kv/{key}")).header("content-type", &content_type).body(value.clone());
                let body = ok_json(r.send().await.unwrap()).await;
                state.keys.insert(key, (value, content_type));
                body["version"].as_i64().unwrap()
            }
            35..45 => {
                let key = random_key(&mut self.rng);
                let body = ok_json(c.delete(format!("{object}/kv/{key}")).send().await.unwrap()).await;
                if state.keys.remove(&key).is_none() {
                    return; // Nothing changed, no version.
                }
                body["version"].as_i64().unwrap()
            }
            45..70 => {
                let mut ops = Vec::new();
                for _ in 0..self.rng.random_range(1..=5) {
                    let key = random_key(&mut self.rng);
                    if self.rng.random_bool(0.3) {
                        state.keys.remove(&key);
                        ops.push(json!({"op": "delete", "key": key}));
                        continue;
                    }
                    let (value, content_type) = random_value(&mut self.rng, 16 * 1024);
                    if content_type == "application/json" {
                        let parsed: Value = serde_json::from_slice(&value).unwrap();
                        let stored = Bytes::from(serde_json::to_vec(&parsed).unwrap());
                        ops.push(json!({"op": "put", "key": key, "value": parsed}));
                        state.keys.insert(key, (stored, content_type));
                    } else {
                        let encoded = base64::engine::general_purpose::STANDARD.encode(&value);
                        ops.push(
                            json!({"op": "put", "key": key, "value_base64": encoded, "content_type": content_type}),
                        );
                        state.keys.insert(key, (value, content_type));
                    }
                }
                let body =
                    ok_json(c.post(format!("{object}/batch")).json(&json!({"ops": ops})).send().await.unwrap()).await;
                body["version"].as_i64().unwrap()
            }
            70..74 => {
                let r = c.delete(&object).send().await.unwrap();
                if r.status() == 404 {
                    return;
                }
                state = State::default();
                ok_json(r).await["version"].as_i64().unwrap()
            }
            74..79 => {
                // Events bump the version without changing keys or blobs.
                let events = json!({"events": [{"type": "tick", "data": {"n": 1}}]});
                let body = ok_json(c.post(format!("{object}/events")).json(&events).send().await.unwrap()).await;
                body["version"].as_i64().unwrap()
            }
            79..93 => {
                let name = format!("b{}/f{}.bin", self.rng.random_range(0..2), self.rng.random_range(0..4));
                let (value, content_type) = random_value(&mut self.rng, 4096);
                let r =
                    c.put(format!("{object}/blobs/{name}")).header("content-type", &content_type).body(value.clone());
                let body = ok_json(r.send().await.unwrap()).await;
                state.blobs.insert(name, (value, content_type));
                body["version"].as_i64().unwrap()
            }
            _ => {
                let Some(name) = state.blobs.keys().next().cloned() else { return };
                let body = ok_json(c.delete(format!("{object}/blobs/{name}")).send().await.unwrap()).await;
                state.blobs.remove(&name);
                body["version"].as_i64().unwrap()
            }
        };
        let (previous, before) = model.current();
        if version == previous {
            // Deletes of absent keys only: nothing changed, no version.
            assert_eq!(state, before);
            return;
        }
        assert_eq!(version, previous + 1, "each write bumps the version once");
        model.versions.insert(version, state);
    }

    async fn export_now(&self) {
        ok_json(self.app.client.post(self.app.url("/v1/admin/export")).send().await.unwrap()).await;
    }

    /// The object's state as the server has it, byte by byte.
    async fn read_state(&self, id: &str) -> (i64, State) {
        read_state(&self.app.client, &self.object(id)).await
    }
}

async fn read_state(c: &reqwest::Client, object: &str) -> (i64, State) {
    let info = c.get(object).send().await.unwrap();
    let version = if info.status() == 404 { 0 } else { ok_json(info).await["version"].as_i64().unwrap() };
    let mut state = State::default();
    let listed = ok_json(c.get(format!("{object}/kv?values=false&limit=10000")).send().await.unwrap()).await;
    for item in listed["items"].as_array().unwrap() {
        let key = item["key"].as_str().unwrap();
        let r = c.get(format!("{object}/kv/{key}")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        let content_type = r.headers()["content-type"].to_str().unwrap().to_string();
        state.keys.insert(key.to_string(), (r.bytes().await.unwrap(), content_type));
    }
    let listed = ok_json(c.get(format!("{object}/blobs?limit=1000")).send().await.unwrap()).await;
    for item in listed["items"].as_array().unwrap() {
        let name = item["name"].as_str().unwrap();
        let r = c.get(format!("{object}/blobs/{name}")).send().await.unwrap();
        assert_eq!(r.status(), 200, "blob {name} listed but its bytes do not read");
        let content_type = r.headers()["content-type"].to_str().unwrap().to_string();
        state.blobs.insert(name.to_string(), (r.bytes().await.unwrap(), content_type));
    }
    (version, state)
}

/// Commit time (Unix ms) of every version that changed something, from the history.
async fn commit_times(c: &reqwest::Client, object: &str) -> BTreeMap<i64, i64> {
    let body = ok_json(c.get(format!("{object}/history?limit=1000")).send().await.unwrap()).await;
    body["versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            let at = chrono::DateTime::parse_from_rfc3339(v["committed_at"].as_str().unwrap()).unwrap();
            (v["version"].as_i64().unwrap(), at.timestamp_millis())
        })
        .collect()
}

fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms).unwrap().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

fn describe(state: &State) -> String {
    let keys: Vec<String> = state.keys.iter().map(|(k, (v, ct))| format!("{k}={}B {ct}", v.len())).collect();
    let blobs: Vec<String> = state.blobs.iter().map(|(k, (v, ct))| format!("{k}={}B {ct}", v.len())).collect();
    format!("keys [{}] blobs [{}]", keys.join(", "), blobs.join(", "))
}

fn assert_same(seen: &State, expected: &State, what: &str) {
    if seen != expected {
        panic!(
            "{what}: the restored state differs from the model\n seen:     {}\n expected: {}",
            describe(seen),
            describe(expected)
        );
    }
}

#[tokio::test]
async fn restores_match_the_model_at_50_points_of_a_random_history() {
    let db = TestDatabase::new();
    let app = spawn_app_with(&db, |s| {
        s.max_value_bytes = MAX_VALUE as u64;
        s.max_batch_bytes = 4 * 1024 * 1024;
        // Exports happen when the test says; the sweeper and the orphan pass
        // run often, and must keep every replaced blob's bytes (retention).
        s.export_interval = Duration::from_secs(3600);
        s.sweep_interval = Duration::from_millis(200);
        s.orphan_grace = Duration::from_millis(300);
    })
    .await;
    let seed = seed();
    let mut run = Run { app, ns: unique_ns("restore"), rng: StdRng::seed_from_u64(seed) };
    let ids = ["o0", "o1", "o2"];
    let mut models: BTreeMap<&str, Model> = ids.iter().map(|id| (*id, Model::default())).collect();
    for _ in 0..150 {
        let id = ids[run.rng.random_range(0..ids.len())];
        run.random_write(id, models.get_mut(id).unwrap()).await;
        if run.rng.random_bool(0.08) {
            run.export_now().await;
        }
    }
    for id in ids {
        let (version, state) = run.read_state(id).await;
        let (expected_version, expected) = models[id].current();
        assert_eq!(version, expected_version);
        assert_same(&state, &expected, &format!("{id} before any restore"));
    }

    let c = run.app.client.clone();
    let (mut by_version, mut by_time, mut forks, mut split) = (0, 0, 0, 0);
    for point in 0..50 {
        let id = ids[run.rng.random_range(0..ids.len())];
        let object = run.object(id);
        let model = models.get_mut(id).unwrap();
        let (current, _) = model.current();
        if current == 0 {
            continue;
        }
        let changes = tables(&c, &run.app.base).await["changes"].clone();
        let history_split = changes["rows"].as_i64().unwrap() > 0 && changes["pending_rows"].as_i64().unwrap() > 0;
        // A point by version (any, restores' own included), or by time.
        let (request, expected_version) = if run.rng.random_bool(0.5) {
            let versions: Vec<i64> = model.versions.keys().copied().filter(|v| *v >= 1).collect();
            let version = versions[run.rng.random_range(0..versions.len())];
            by_version += 1;
            (json!({"version": version}), version)
        } else {
            let times = commit_times(&c, &object).await;
            let listed: Vec<(i64, i64)> = times.into_iter().collect();
            let pick = run.rng.random_range(0..listed.len());
            let (_, at) = listed[pick];
            let gap = listed.get(pick + 1).map_or(1, |(_, next)| (next - at).max(1));
            let at = at + run.rng.random_range(0..gap);
            // The newest version committed at or before that instant.
            let resolved = listed.iter().filter(|(_, t)| *t <= at).map(|(v, _)| *v).max().unwrap();
            by_time += 1;
            (json!({"at": rfc3339(at)}), resolved)
        };
        let expected = model.versions.range(..=expected_version).next_back().unwrap().1.clone();
        let fork = run.rng.random_bool(0.2);
        let mut request = request;
        let written_id = if fork {
            forks += 1;
            let into = format!("fork-{point}");
            request["into"] = json!(into);
            into
        } else {
            id.to_string()
        };
        let answer = ok_json(c.post(format!("{object}/restore")).json(&request).send().await.unwrap()).await;
        assert_eq!(answer["restored_from"]["version"], expected_version, "{request} -> {answer}");
        assert_eq!(answer["restored_from"]["id"], id);
        assert_eq!(answer["id"], written_id.as_str());
        assert_eq!(answer["keys"], expected.keys.len());
        assert_eq!(answer["blobs"], expected.blobs.len());
        split += usize::from(history_split);

        let (version, seen) = run.read_state(&written_id).await;
        assert_same(&seen, &expected, &format!("point {point}: {request} of {id} into {written_id}"));
        assert_eq!(answer["version"], version);
        if fork {
            assert_eq!(version, 1, "a fork into a new object is its first version");
            let (unchanged_version, unchanged) = run.read_state(id).await;
            assert_eq!((unchanged_version, &unchanged), (current, &model.current().1), "the source is untouched");
        } else {
            assert_eq!(version, current + 1, "a restore is one new version");
            model.versions.insert(version, expected);
        }
        if run.rng.random_bool(0.2) {
            run.export_now().await;
        }
        // Writes go on between restores, on top of what was restored.
        let id = ids[run.rng.random_range(0..ids.len())];
        run.random_write(id, models.get_mut(id).unwrap()).await;
    }
    println!("restores: {by_version} by version, {by_time} by time, {forks} forks, {split} with history split between the tables and the outbox");
    assert!(by_version >= 10 && by_time >= 10 && forks >= 3, "the points cover versions, instants and forks");
    assert!(split >= 5, "some restores read history split between the tables and the outbox");

    // After a final export, every version restores the same from the tables alone.
    run.export_now().await;
    let object = run.object("o0");
    let (current, _) = models["o0"].current();
    let target = models["o0"].versions.keys().copied().rfind(|v| *v >= 1 && *v < current);
    if let Some(target) = target {
        let answer =
            ok_json(c.post(format!("{object}/restore")).json(&json!({"version": target})).send().await.unwrap()).await;
        let (_, seen) = run.read_state("o0").await;
        assert_same(&seen, &models["o0"].versions[&target], "o0 restored from the tables alone");
        assert_eq!(answer["restored_from"]["version"], target);
    }
    run.app.stop().await;
}

#[tokio::test]
async fn fork_if_match_retention_and_refusals() {
    let db = TestDatabase::new();
    let app = spawn_app_with(&db, |s| s.history_retention = Duration::from_secs(3)).await;
    let c = &app.client;
    let ns = unique_ns("restore-rules");
    let object = app.url(&format!("/v1/objects/{ns}/a"));
    let put = |key: &str, value: &str| c.put(format!("{object}/kv/{key}")).body(value.to_string()).send();
    ok_json(put("x", "1").await.unwrap()).await; // version 1
    ok_json(put("y", "2").await.unwrap()).await; // version 2
    ok_json(put("x", "3").await.unwrap()).await; // version 3
    let restore = |body: Value| c.post(format!("{object}/restore")).json(&body).send();

    // If-Match on the object's version: a stale one changes nothing.
    let stale = c.post(format!("{object}/restore")).header("if-match", "\"2\"").json(&json!({"version": 1}));
    problem(stale.send().await.unwrap(), 412, "precondition-failed").await;
    assert_eq!(read_state(c, &object).await.0, 3);
    let fresh = c.post(format!("{object}/restore")).header("if-match", "\"3\"").json(&json!({"version": 1}));
    let answer = ok_json(fresh.send().await.unwrap()).await;
    assert_eq!((answer["version"].as_i64(), answer["restored_from"]["version"].as_i64()), (Some(4), Some(1)));
    let (_, state) = read_state(c, &object).await;
    assert_eq!(state.keys.keys().collect::<Vec<_>>(), ["x"]);
    assert_eq!(state.keys["x"].0, "1");
    // Undone by restoring again.
    ok_json(restore(json!({"version": 3})).await.unwrap()).await;
    let (version, state) = read_state(c, &object).await;
    assert_eq!((version, state.keys["x"].0.as_ref(), state.keys["y"].0.as_ref()), (5, &b"3"[..], &b"2"[..]));

    // Fork: into an empty object; into one with keys only with overwrite.
    let fork = app.url(&format!("/v1/objects/{ns}/b"));
    let answer = ok_json(restore(json!({"version": 2, "into": "b"})).await.unwrap()).await;
    assert_eq!((answer["id"].as_str(), answer["version"].as_i64()), (Some("b"), Some(1)));
    let (_, forked) = read_state(c, &fork).await;
    assert_eq!(forked.keys.len(), 2);
    assert_eq!(forked.keys["x"].0, "1");
    problem(restore(json!({"version": 3, "into": "b"})).await.unwrap(), 409, "conflict").await;
    assert_eq!(read_state(c, &fork).await.1, forked, "a refused fork changes nothing");
    let guarded = c
        .post(format!("{object}/restore"))
        .header("if-match", "\"7\"")
        .json(&json!({"version": 3, "into": "b", "overwrite": true}));
    problem(guarded.send().await.unwrap(), 412, "precondition-failed").await;
    ok_json(restore(json!({"version": 3, "into": "b", "overwrite": true})).await.unwrap()).await;
    assert_eq!(read_state(c, &fork).await.1.keys["x"].0, "3");
    assert_eq!(read_state(c, &object).await.0, 5, "forking leaves the source as it was");

    // Bad requests change nothing.
    for (body, status, kind) in [
        (json!({}), 400, "bad-request"),
        (json!({"version": 1, "at": "2026-01-01T00:00:00Z"}), 400, "bad-request"),
        (json!({"version": 0}), 400, "bad-request"),
        (json!({"version": -4}), 400, "bad-request"),
        (json!({"version": "1"}), 400, "bad-request"),
        (json!({"version": 1, "extra": true}), 400, "bad-request"),
        (json!({"at": "yesterday"}), 400, "bad-request"),
        (json!({"version": 1, "overwrite": true}), 400, "bad-request"),
        (json!({"version": 1, "into": "a"}), 400, "bad-request"),
        (json!({"version": 1, "into": "bad/id"}), 400, "bad-request"),
        (json!({"version": 99}), 404, "not-found"),
        (json!({"at": "2000-01-01T00:00:00Z"}), 422, "beyond-retention"),
    ] {
        problem(restore(body.clone()).await.unwrap(), status, kind).await;
    }
    let r = c.post(format!("{object}/restore")).body("not json").send().await.unwrap();
    problem(r, 400, "bad-request").await;
    let never = app.url(&format!("/v1/objects/{ns}/never/restore"));
    problem(c.post(never).json(&json!({"version": 1})).send().await.unwrap(), 404, "not-found").await;
    assert_eq!(read_state(c, &object).await.0, 5);

    // Past the retention: refused by version and by time.
    tokio::time::sleep(Duration::from_millis(3200)).await;
    ok_json(put("z", "new").await.unwrap()).await; // version 6, inside the retention
    problem(restore(json!({"version": 2})).await.unwrap(), 422, "beyond-retention").await;
    let old = rfc3339(chrono::Utc::now().timestamp_millis() - 3500);
    problem(restore(json!({"at": old})).await.unwrap(), 422, "beyond-retention").await;
    let answer = ok_json(restore(json!({"version": 6})).await.unwrap()).await;
    assert_eq!(answer["version"], 7);
    app.stop().await;
}

/// A change log that truncates values cannot restore them exactly: refused.
#[tokio::test]
async fn a_point_whose_values_the_log_truncated_is_refused() {
    let db = TestDatabase::new();
    let app = spawn_app_with(&db, |s| s.change_value_cap_bytes = Some(8)).await;
    let c = &app.client;
    let object = app.url(&format!("/v1/objects/{}/o", unique_ns("truncated")));
    ok_json(c.put(format!("{object}/kv/short")).body("tiny").send().await.unwrap()).await;
    ok_json(c.put(format!("{object}/kv/long")).body("longer than eight bytes").send().await.unwrap()).await;
    ok_json(c.delete(format!("{object}/kv/long")).send().await.unwrap()).await;
    let restore = |version: i64| c.post(format!("{object}/restore")).json(&json!({"version": version})).send();
    let refused = problem(restore(2).await.unwrap(), 422, "history-incomplete").await;
    assert!(refused["detail"].as_str().unwrap().contains("\"long\""), "{refused}");
    assert_eq!(read_state(c, &object).await.0, 3, "nothing changed");
    // Version 1 needs only the short value, and version 3 no long one.
    ok_json(restore(1).await.unwrap()).await;
    ok_json(restore(3).await.unwrap()).await;
    app.stop().await;
}

/// The restoring replica killed with SIGKILL at random moments: after each
/// kill the object is wholly as before or wholly restored, never a mix (and
/// wholly restored when the restore was answered before the kill).
#[tokio::test]
async fn a_restore_killed_midway_is_all_or_nothing() {
    let db = TestDatabase::new();
    let ns = unique_ns("restore-kill");
    // Every replica shares one object store, as deployed replicas do.
    let env = [
        ("STATEHOUSE_LEASE_MS", "1000".to_string()),
        ("STATEHOUSE_EXPORT_INTERVAL_MS", "300".to_string()),
        ("STATEHOUSE_OBJECTS_DIR", db.dir.path().join("objects").display().to_string()),
    ];
    let mut process = Process::start(&db.url, 0, &env);
    let c = reqwest::Client::new();
    let object = format!("{}/v1/objects/{ns}/big", process.base);
    // Two states of 2,000 keys each, with different values.
    let write_all = |tag: &'static str| {
        let c = c.clone();
        let object = object.clone();
        async move {
            let mut version = 0;
            for chunk in 0..16 {
                let ops: Vec<Value> = (0..125)
                    .map(|i| {
                        let n = chunk * 125 + i;
                        json!({"op": "put", "key": format!("key-{n:05}"), "value": format!("{tag}-{n}-{}", "v".repeat(1000))})
                    })
                    .collect();
                version = ok_json(c.post(format!("{object}/batch")).json(&json!({"ops": ops})).send().await.unwrap())
                    .await["version"]
                    .as_i64()
                    .unwrap();
            }
            version
        }
    };
    let version_a = write_all("a").await;
    let version_b = write_all("b").await;
    let digest = |c: reqwest::Client, object: String| async move {
        let listed = ok_json(c.get(format!("{object}/kv?limit=10000")).send().await.unwrap()).await;
        let items = listed["items"].as_array().unwrap().clone();
        let tags: std::collections::BTreeSet<String> =
            items.iter().map(|i| i["value"].as_str().unwrap().split('-').next().unwrap().to_string()).collect();
        (items.len(), tags)
    };
    let timed = std::time::Instant::now();
    ok_json(c.post(format!("{object}/restore")).json(&json!({"version": version_a})).send().await.unwrap()).await;
    let took = timed.elapsed();
    println!("a restore of 2,000 keys took {took:?}");
    let mut rng = StdRng::seed_from_u64(seed());
    let (mut applied, mut not_applied) = (0, 0);
    let mut expected_tag = "a".to_string();
    for round in 0..12 {
        let target = if expected_tag == "a" { version_b } else { version_a };
        let other = if expected_tag == "a" { "b" } else { "a" };
        let object = format!("{}/v1/objects/{ns}/big", process.base);
        // The killed replica's lease runs out first, so that the restore runs
        // here (taking the lease) rather than being refused at a dead owner.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !ok_json(c.get(&object).send().await.unwrap()).await["owner"].is_null() {
            assert!(std::time::Instant::now() < deadline, "the killed replica's lease never ran out");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let request = c.post(format!("{object}/restore")).json(&json!({"version": target})).send();
        let request = tokio::spawn(request);
        // Kills early, around the commit, and (every third round) right after
        // the answer, which must then survive; each restore reads a longer
        // history than the last, so the windows grow with the round.
        let span = (took.as_micros() as u64).max(1000) * (1 + round as u64 / 3);
        if round % 3 == 2 {
            let answer = request.await.unwrap().unwrap();
            assert_eq!(answer.status(), 200, "round {round}: {}", answer.text().await.unwrap());
            process.kill();
        } else {
            let window = [0..span / 2, span / 2..span * 2][round % 3].clone();
            tokio::time::sleep(Duration::from_micros(rng.random_range(window))).await;
            process.kill();
            let _ = request.await;
        }
        process = Process::start(&db.url, 0, &env);
        let object_now = format!("{}/v1/objects/{ns}/big", process.base);
        let (count, tags) = digest(c.clone(), object_now).await;
        assert_eq!(count, 2000, "round {round}: every key is there");
        assert_eq!(tags.len(), 1, "round {round}: a mix of two states: {tags:?}");
        let tag = tags.into_iter().next().unwrap();
        assert!(round % 3 != 2 || tag == other, "round {round}: a restore answered before the kill was lost");
        if tag == other {
            applied += 1;
        } else {
            assert_eq!(tag, expected_tag, "round {round}");
            not_applied += 1;
        }
        expected_tag = tag;
    }
    println!("killed restores: {applied} applied whole, {not_applied} not applied, 0 mixed");
    assert!(applied > 0 && not_applied > 0, "the kills fell both before and after commits");
    process.assert_no_panic();
}
