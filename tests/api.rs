//! Black-box HTTP tests of every endpoint and error case, against the server
//! running in-process on port 0 with a fresh database.

mod common;

use common::{spawn_app, spawn_app_with, unique_ns, TestApp, TestDatabase};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

async fn put(app: &TestApp, path: &str, body: &'static [u8]) -> reqwest::Response {
    app.client.put(app.url(path)).body(body).send().await.unwrap()
}

async fn json_of(response: reqwest::Response) -> Value {
    response.json().await.unwrap()
}

/// A client error must be problem+json with a stable type and change nothing.
async fn assert_problem(response: reqwest::Response, status: u16, kind: &str) -> Value {
    assert_eq!(response.status().as_u16(), status, "unexpected status");
    assert_eq!(response.headers()["content-type"], "application/problem+json");
    assert!(response.headers().contains_key("x-request-id"));
    let problem: Value = response.json().await.unwrap();
    assert_eq!(problem["type"], format!("https://statehouse.dev/problems/{kind}"), "{problem}");
    assert_eq!(problem["status"], status);
    assert!(problem["detail"].as_str().is_some_and(|d| !d.is_empty()));
    problem
}

async fn object_version(app: &TestApp, ns: &str, id: &str) -> Option<i64> {
    let r = app.client.get(app.url(&format!("/v1/objects/{ns}/{id}"))).send().await.unwrap();
    if r.status() == 404 {
        return None;
    }
    Some(json_of(r).await["version"].as_i64().unwrap())
}

#[tokio::test]
async fn put_get_head_round_trip_with_versions_and_headers() {
    let db = TestDatabase::new();
    let app = spawn_app(&db).await;
    let ns = unique_ns("kv");
    let path = format!("/v1/objects/{ns}/user-1/kv/greeting");

    let r = app
        .client
        .put(app.url(&path))
        .header("content-type", "text/plain; charset=utf-8")
        .body("hello")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["etag"], "\"1\"");
    assert!(r.headers()["statehouse-fence"].to_str().unwrap().parse::<i64>().unwrap() >= 1);
    assert!(r.headers().contains_key("statehouse-instance"));
    assert!(r.headers().contains_key("x-request-id"));
    assert_eq!(json_of(r).await, json!({"version": 1}));

    let r = app.client.get(app.url(&path)).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "text/plain; charset=utf-8");
    assert_eq!(r.headers()["etag"], "\"1\"");
    assert!(!r.headers().contains_key("statehouse-fence"), "reads carry no fence");
    assert_eq!(r.text().await.unwrap(), "hello");

    let r = app.client.head(app.url(&path)).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["etag"], "\"1\"");
    assert_eq!(r.headers()["content-length"], "5");
    assert_eq!(r.bytes().await.unwrap().len(), 0);

    // Another key bumps the object's version; the first key keeps its own.
    let r = put(&app, &format!("/v1/objects/{ns}/user-1/kv/other"), b"\x00\xff").await;
    assert_eq!(json_of(r).await["version"], 2);
    let r = app.client.get(app.url(&format!("/v1/objects/{ns}/user-1/kv/other"))).send().await.unwrap();
    assert_eq!(r.headers()["content-type"], "application/octet-stream");
    assert_eq!(r.headers()["etag"], "\"2\"");
    assert_eq!(r.bytes().await.unwrap().as_ref(), b"\x00\xff");
    assert_eq!(app.client.get(app.url(&path)).send().await.unwrap().headers()["etag"], "\"1\"");

    // A client's request id is kept.
    let r = app.client.get(app.url(&path)).header("x-request-id", "abc-123").send().await.unwrap();
    assert_eq!(r.headers()["x-request-id"], "abc-123");
    app.stop().await;
}

#[tokio::test]
async fn conditional_writes_and_reads() {
    let db = TestDatabase::new();
    let app = spawn_app(&db).await;
    let ns = unique_ns("cond");
    let path = format!("/v1/objects/{ns}/o/kv/k");
    let send = |method: Method, header: Option<(&'static str, &'static str)>, body: &'static str| {
        let mut req = app.client.request(method, app.url(&path)).body(body);
        if let Some((k, v)) = header {
            req = req.header(k, v);
        }
        req.send()
    };

    // If-Match on an absent key fails, If-None-Match: * creates it.
    assert_problem(send(Method::PUT, Some(("if-match", "*")), "x").await.unwrap(), 412, "precondition-failed").await;
    assert_problem(send(Method::PUT, Some(("if-match", "\"1\"")), "x").await.unwrap(), 412, "precondition-failed")
        .await;
    assert_eq!(object_version(&app, &ns, "o").await, None, "failed conditions change nothing");
    assert_eq!(send(Method::PUT, Some(("if-none-match", "*")), "v1").await.unwrap().status(), 200);
    assert_problem(send(Method::PUT, Some(("if-none-match", "*")), "v2").await.unwrap(), 412, "precondition-failed")
        .await;

    // If-Match with the current version succeeds; a stale one fails and changes nothing.
    assert_eq!(send(Method::PUT, Some(("if-match", "\"1\"")), "v2").await.unwrap().status(), 200);
    assert_problem(send(Method::PUT, Some(("if-match", "\"1\"")), "v3").await.unwrap(), 412, "precondition-failed")
        .await;
    assert_eq!(send(Method::GET, None, "").await.unwrap().text().await.unwrap(), "v2");
    assert_eq!(object_version(&app, &ns, "o").await, Some(2));
    assert_eq!(send(Method::PUT, Some(("if-match", "\"7\", \"2\"")), "v3").await.unwrap().status(), 200);

    // Reads: If-None-Match gives 304 on a match, the value otherwise.
    let r = send(Method::GET, Some(("if-none-match", "\"3\"")), "").await.unwrap();
    assert_eq!(r.status(), StatusCode::NOT_MODIFIED);
    assert_eq!(r.headers()["etag"], "\"3\"");
    let r = send(Method::GET, Some(("if-none-match", "\"2\"")), "").await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "v3");
    assert_problem(send(Method::GET, Some(("if-match", "\"2\"")), "").await.unwrap(), 412, "precondition-failed").await;

    // Malformed entity-tags are a 400.
    assert_problem(send(Method::PUT, Some(("if-match", "3")), "x").await.unwrap(), 400, "bad-request").await;

    // Deletes honour If-Match.
    assert_problem(send(Method::DELETE, Some(("if-match", "\"1\"")), "").await.unwrap(), 412, "precondition-failed")
        .await;
    let r = send(Method::DELETE, Some(("if-match", "\"3\"")), "").await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers().contains_key("statehouse-fence"));
    assert_eq!(json_of(r).await, json!({"deleted": true, "version": 4}));
    // Deleting what is not there changes nothing, not even the version.
    let r = send(Method::DELETE, None, "").await.unwrap();
    assert_eq!(json_of(r).await, json!({"deleted": false, "version": 4}));
    assert_problem(send(Method::GET, None, "").await.unwrap(), 404, "not-found").await;
    app.stop().await;
}

/// Entity-tags as RFC 9110 has them: opaque to clients, so a well-formed tag
/// we never made matches nothing (412 for If-Match, the body for
/// If-None-Match); lists, `*`, weak tags (never for If-Match, by version for
/// If-None-Match); only a broken header is 400. Each refusal changes nothing.
#[tokio::test]
async fn entity_tags_follow_rfc_9110_on_keys() {
    let db = TestDatabase::new();
    let app = spawn_app(&db).await;
    let ns = unique_ns("etags");
    let path = format!("/v1/objects/{ns}/o/kv/k");
    let send = |method: Method, header: (&'static str, &'static str), body: &'static str| {
        app.client.request(method, app.url(&path)).header(header.0, header.1).body(body).send()
    };
    assert_eq!(put(&app, &path, b"v1").await.status(), 200);

    for foreign in ["\"abc\"", "\"a,b\", \"x\"", "W/\"1\"", "\"01\""] {
        let r = send(Method::PUT, ("if-match", foreign), "changed").await.unwrap();
        assert_problem(r, 412, "precondition-failed").await;
        let r = send(Method::DELETE, ("if-match", foreign), "").await.unwrap();
        assert_problem(r, 412, "precondition-failed").await;
        let r = send(Method::GET, ("if-match", foreign), "").await.unwrap();
        assert_problem(r, 412, "precondition-failed").await;
    }
    assert_eq!(object_version(&app, &ns, "o").await, Some(1), "refused conditions change nothing");

    for foreign in ["\"abc\"", "\"2\", \"xyz\"", "W/\"7\""] {
        let r = send(Method::GET, ("if-none-match", foreign), "").await.unwrap();
        assert_eq!(r.status(), 200, "If-None-Match: {foreign}");
        assert_eq!(r.text().await.unwrap(), "v1");
    }
    for matching in ["\"1\"", "W/\"1\"", "\"abc\", \"1\"", "*"] {
        let r = send(Method::GET, ("if-none-match", matching), "").await.unwrap();
        assert_eq!(r.status(), StatusCode::NOT_MODIFIED, "If-None-Match: {matching}");
        assert_eq!(r.headers()["etag"], "\"1\"");
    }
    let r = send(Method::PUT, ("if-none-match", "W/\"1\""), "changed").await.unwrap();
    assert_problem(r, 412, "precondition-failed").await;
    // A list holding the current version matches; so does a list of several lines.
    assert_eq!(send(Method::PUT, ("if-match", "\"abc\", \"1\""), "v2").await.unwrap().status(), 200);
    let r = app.client.put(app.url(&path)).header("if-match", "\"7\"").header("if-match", "\"2\"").body("v3");
    assert_eq!(r.send().await.unwrap().status(), 200);

    for broken in ["abc", "\"unterminated", "W/abc", "*, \"3\"", "\"a b\"", ""] {
        let r = send(Method::PUT, ("if-match", broken), "changed").await.unwrap();
        assert_problem(r, 400, "bad-request").await;
        let r = send(Method::GET, ("if-none-match", broken), "").await.unwrap();
        assert_problem(r, 400, "bad-request").await;
    }
    assert_eq!(object_version(&app, &ns, "o").await, Some(3));
    assert_eq!(send(Method::GET, ("accept", "*/*"), "").await.unwrap().text().await.unwrap(), "v3");
    app.stop().await;
}

#[tokio::test]
async fn invalid_names_are_rejected_and_change_nothing() {
    let db = TestDatabase::new();
    let app = spawn_app(&db).await;
    let ns = unique_ns("names");
    let long_key = "k".repeat(2049);
    let long_id = "i".repeat(257);
    let bad_paths = [
        "/v1/objects/Upper/o/kv/k".to_string(),
        "/v1/objects/.dot/o/kv/k".to_string(),
        format!("/v1/objects/{}/o/kv/k", "n".repeat(64)),
        format!("/v1/objects/{ns}/a%20b/kv/k"),
        format!("/v1/objects/{ns}/a%2Fb/kv/k"),
        format!("/v1/objects/{ns}/{long_id}/kv/k"),
        format!("/v1/objects/{ns}/o/kv/{long_key}"),
        format!("/v1/objects/{ns}/o/kv/%FF%FE"),
    ];
    for path in &bad_paths {
        for method in [Method::PUT, Method::GET, Method::DELETE] {
            let r = app.client.request(method.clone(), app.url(path)).body("x").send().await.unwrap();
            assert_problem(r, 400, "bad-request").await;
        }
    }
    let r = app
        .client
        .post(app.url(&format!("/v1/objects/{ns}/bad%20id/batch")))
        .body(r#"{"ops":[]}"#)
        .send()
        .await
        .unwrap();
    assert_problem(r, 400, "bad-request").await;
    let r = app.client.get(app.url("/v1/objects/BAD")).send().await.unwrap();
    assert_problem(r, 400, "bad-request").await;
    let r = app.client.get(app.url(&format!("/v1/objects/{ns}"))).send().await.unwrap();
    assert_eq!(json_of(r).await["items"], json!([]), "nothing was created");

    // Keys may hold slashes, spaces, %2F and any UTF-8; a 2048-byte key is fine.
    let max_key = "m".repeat(2048);
    for (encoded, decoded) in [
        ("a/b/c", "a/b/c"),
        ("a%2Fb", "a/b"),
        ("sp%20ace", "sp ace"),
        ("%C3%BC%E2%9C%93", "ü✓"),
        ("a..b", "a..b"),
        (max_key.as_str(), max_key.as_str()),
    ] {
        let path = format!("/v1/objects/{ns}/o/kv/{encoded}");
        assert_eq!(
            app.client.put(app.url(&path)).body(decoded.to_string()).send().await.unwrap().status(),
            200,
            "{encoded}"
        );
        assert_eq!(app.client.get(app.url(&path)).send().await.unwrap().text().await.unwrap(), decoded);
    }
    let r = app.client.get(app.url(&format!("/v1/objects/{ns}/o/kv?values=false&prefix=a"))).send().await.unwrap();
    let keys: Vec<String> =
        json_of(r).await["items"].as_array().unwrap().iter().map(|i| i["key"].as_str().unwrap().to_string()).collect();
    assert_eq!(keys, vec!["a..b", "a/b", "a/b/c"]);

    // A bad Content-Type is refused.
    let r = app
        .client
        .put(app.url(&format!("/v1/objects/{ns}/o/kv/ct")))
        .header("content-type", "nonsense")
        .body("x")
        .send()
        .await
        .unwrap();
    assert_problem(r, 400, "bad-request").await;
    app.stop().await;
}

#[tokio::test]
async fn bodies_over_the_limits_are_413() {
    let db = TestDatabase::new();
    let app = spawn_app_with(&db, |s| {
        s.max_value_bytes = 1024;
        s.max_batch_bytes = 4096;
    })
    .await;
    let ns = unique_ns("limits");
    let path = format!("/v1/objects/{ns}/o/kv/k");
    let r = app.client.put(app.url(&path)).body(vec![b'x'; 1025]).send().await.unwrap();
    assert_problem(r, 413, "payload-too-large").await;
    assert_eq!(app.client.put(app.url(&path)).body(vec![b'x'; 1024]).send().await.unwrap().status(), 200);

    let big = json!({"ops": [{"op": "put", "key": "k", "value": "x".repeat(5000)}]});
    let r = app.client.post(app.url(&format!("/v1/objects/{ns}/o/batch"))).json(&big).send().await.unwrap();
    assert_problem(r, 413, "payload-too-large").await;
    // A value over the value limit inside a batch that fits is refused too.
    let over = json!({"ops": [{"op": "put", "key": "k", "value_base64": base64_of(&[7u8; 1500])}]});
    let r = app.client.post(app.url(&format!("/v1/objects/{ns}/o/batch"))).json(&over).send().await.unwrap();
    let problem = assert_problem(r, 413, "payload-too-large").await;
    assert!(problem["detail"].as_str().unwrap().starts_with("op 0"));
    assert_eq!(object_version(&app, &ns, "o").await, Some(1));
    app.stop().await;
}

fn base64_of(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

#[tokio::test]
async fn batches_are_atomic_and_validated() {
    let db = TestDatabase::new();
    let app = spawn_app(&db).await;
    let ns = unique_ns("batch");
    let url = app.url(&format!("/v1/objects/{ns}/o/batch"));
    let post = |body: Value| app.client.post(&url).json(&body).send();

    let r = post(json!({"ops": [
        {"op": "put", "key": "json", "value": {"a": [1, 2]}},
        {"op": "put", "key": "text", "value": "plain words", "content_type": "text/plain"},
        {"op": "put", "key": "bin", "value_base64": base64_of(&[0, 159, 255])},
        {"op": "put", "key": "null", "value": null},
        {"op": "get", "key": "json"},
        {"op": "get", "key": "missing"},
        {"op": "delete", "key": "missing"},
    ]}))
    .await
    .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers().contains_key("statehouse-fence"));
    let body = json_of(r).await;
    assert_eq!(body["version"], 1, "one version bump for the whole batch");
    let results = body["results"].as_array().unwrap();
    assert_eq!(results[0], json!({"op": "put", "key": "json", "version": 1}));
    assert_eq!(results[4]["value"], json!({"a": [1, 2]}), "a get sees the earlier put of its batch");
    assert_eq!(results[4]["found"], true);
    assert_eq!(results[5], json!({"op": "get", "key": "missing", "found": false}));
    assert_eq!(results[6], json!({"op": "delete", "key": "missing", "deleted": false}));

    let r = app.client.get(app.url(&format!("/v1/objects/{ns}/o/kv/text"))).send().await.unwrap();
    assert_eq!(r.headers()["content-type"], "text/plain");
    assert_eq!(r.text().await.unwrap(), "plain words");
    let r = app.client.get(app.url(&format!("/v1/objects/{ns}/o/kv/null"))).send().await.unwrap();
    assert_eq!(r.text().await.unwrap(), "null");

    // A failed condition at op 2 fails the whole batch with its index.
    let r = post(json!({"ops": [
        {"op": "put", "key": "new", "value": 1},
        {"op": "delete", "key": "json", "if_version": 1},
        {"op": "put", "key": "text", "value": "x", "if_absent": true},
    ]}))
    .await
    .unwrap();
    let problem = assert_problem(r, 412, "precondition-failed").await;
    assert_eq!(problem["op_index"], 2);
    assert_eq!(object_version(&app, &ns, "o").await, Some(1), "nothing applied");
    assert_eq!(app.client.get(app.url(&format!("/v1/objects/{ns}/o/kv/new"))).send().await.unwrap().status(), 404);
    assert_eq!(app.client.get(app.url(&format!("/v1/objects/{ns}/o/kv/json"))).send().await.unwrap().status(), 200);

    // Conditions that hold.
    let r = post(json!({"ops": [
        {"op": "delete", "key": "json", "if_version": 1},
        {"op": "put", "key": "text", "value": "y", "content_type": "text/plain", "if_version": 1},
        {"op": "put", "key": "fresh", "value": true, "if_absent": true},
    ]}))
    .await
    .unwrap();
    let body = json_of(r).await;
    assert_eq!(body["version"], 2);
    assert_eq!(body["results"][0]["deleted"], true);

    // Malformed requests: 400 and nothing changes.
    let too_many: Vec<Value> = (0..129).map(|i| json!({"op": "put", "key": format!("k{i}"), "value": i})).collect();
    let cases = vec![
        json!({"ops": too_many}),
        json!({"ops": []}),
        json!({"ops": [{"op": "explode", "key": "k"}]}),
        json!({"ops": [{"op": "put", "key": "k"}]}),
        json!({"ops": [{"op": "put", "key": "k", "value": 1, "value_base64": "AA=="}]}),
        json!({"ops": [{"op": "put", "key": "k", "value_base64": "not base64!"}]}),
        json!({"ops": [{"op": "put", "key": "", "value": 1}]}),
        json!({"ops": [{"op": "put", "key": "k", "value": 1, "if_version": 0}]}),
        json!({"ops": [{"op": "put", "key": "k", "value": 1, "if_version": 1, "if_absent": true}]}),
        json!({"ops": [{"op": "put", "key": "k", "value": 1, "surprise": 1}]}),
        json!({"ops": [{"op": "get", "key": "k"}], "extra": true}),
        json!({"operations": []}),
        json!([1, 2, 3]),
    ];
    for case in cases {
        let r = post(case.clone()).await.unwrap();
        let problem = assert_problem(r, 400, "bad-request").await;
        assert!(!problem["detail"].as_str().unwrap().is_empty(), "{case}");
    }
    for raw in ["{", "", "null", "{\"ops\": [1]}", &"[".repeat(10_000)] {
        let r = app
            .client
            .post(&url)
            .header("content-type", "application/json")
            .body(raw.to_string())
            .send()
            .await
            .unwrap();
        assert_problem(r, 400, "bad-request").await;
    }
    assert_eq!(object_version(&app, &ns, "o").await, Some(2));
    app.stop().await;
}

#[tokio::test]
async fn listing_pages_through_ten_thousand_keys_both_ways() {
    let db = TestDatabase::new();
    let app = spawn_app(&db).await;
    let ns = unique_ns("list");
    let url = app.url(&format!("/v1/objects/{ns}/big/batch"));
    let total: usize = 10_000;
    let keys: Vec<String> = (0..total).map(|i| format!("key-{i:05}")).collect();
    for chunk in keys.chunks(128) {
        let ops: Vec<Value> =
            chunk.iter().map(|k| json!({"op": "put", "key": k, "value": k, "content_type": "text/plain"})).collect();
        assert_eq!(app.client.post(&url).json(&json!({"ops": ops})).send().await.unwrap().status(), 200);
    }

    for reverse in [false, true] {
        let mut seen = Vec::new();
        let mut cursor: Option<String> = None;
        let mut pages = 0;
        loop {
            let mut q = format!("/v1/objects/{ns}/big/kv?limit=777&reverse={reverse}");
            if let Some(c) = &cursor {
                q.push_str(&format!("&cursor={c}"));
            }
            let body = json_of(app.client.get(app.url(&q)).send().await.unwrap()).await;
            assert!(body["items"].is_array(), "{q}: {body}");
            pages += 1;
            for item in body["items"].as_array().unwrap() {
                assert_eq!(item["value"], item["key"]);
                seen.push(item["key"].as_str().unwrap().to_string());
            }
            match body["cursor"].as_str() {
                Some(c) => cursor = Some(c.to_string()),
                None => break,
            }
        }
        let mut expected = keys.clone();
        if reverse {
            expected.reverse();
        }
        assert_eq!(seen, expected, "reverse={reverse}");
        assert_eq!(pages, total.div_ceil(777));
    }

    // Default limit is 1000, the maximum 10000.
    let body =
        json_of(app.client.get(app.url(&format!("/v1/objects/{ns}/big/kv?values=false"))).send().await.unwrap()).await;
    assert_eq!(body["items"].as_array().unwrap().len(), 1000);
    assert!(body["items"][0].get("value").is_none());
    assert!(body["cursor"].is_string());
    let body =
        json_of(app.client.get(app.url(&format!("/v1/objects/{ns}/big/kv?limit=10000"))).send().await.unwrap()).await;
    assert_eq!(body["items"].as_array().unwrap().len(), 10_000);
    assert!(body["cursor"].is_null());

    // Ranges: start inclusive, end exclusive, prefix, and combinations.
    let list = |q: String| {
        let client = app.client.clone();
        let url = app.url(&format!("/v1/objects/{ns}/big/kv?values=false&{q}"));
        async move {
            let body: Value = client.get(url).send().await.unwrap().json().await.unwrap();
            body["items"].as_array().unwrap().iter().map(|i| i["key"].as_str().unwrap().to_string()).collect::<Vec<_>>()
        }
    };
    assert_eq!(list("start=key-00010&end=key-00013".into()).await, ["key-00010", "key-00011", "key-00012"]);
    assert_eq!(
        list("start=key-00010&end=key-00013&reverse=true".into()).await,
        ["key-00012", "key-00011", "key-00010"]
    );
    assert_eq!(list("prefix=key-0999".into()).await.len(), 10);
    assert_eq!(
        list("prefix=key-0999&start=key-09995".into()).await,
        ["key-09995", "key-09996", "key-09997", "key-09998", "key-09999"]
    );
    assert_eq!(list("prefix=nope".into()).await.len(), 0);
    assert_eq!(list("prefix=key-0999&reverse=true&limit=2".into()).await, ["key-09999", "key-09998"]);

    // Bad parameters.
    for q in ["limit=0", "limit=10001", "limit=-1", "limit=abc", "reverse=maybe", "cursor=%21%21", "values=2"] {
        let r = app.client.get(app.url(&format!("/v1/objects/{ns}/big/kv?{q}"))).send().await.unwrap();
        assert_problem(r, 400, "bad-request").await;
    }
    let forward_cursor = body_cursor(&app, &format!("/v1/objects/{ns}/big/kv?limit=1")).await;
    let r = app
        .client
        .get(app.url(&format!("/v1/objects/{ns}/big/kv?reverse=true&cursor={forward_cursor}")))
        .send()
        .await
        .unwrap();
    assert_problem(r, 400, "bad-request").await;
    app.stop().await;
}

async fn body_cursor(app: &TestApp, path: &str) -> String {
    let body = json_of(app.client.get(app.url(path)).send().await.unwrap()).await;
    body["cursor"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn list_values_are_embedded_by_content_type() {
    let db = TestDatabase::new();
    let app = spawn_app(&db).await;
    let ns = unique_ns("embed");
    let base = format!("/v1/objects/{ns}/o/kv");
    app.client
        .put(app.url(&format!("{base}/a-json")))
        .header("content-type", "application/json")
        .body(r#"{"n":1}"#)
        .send()
        .await
        .unwrap();
    app.client
        .put(app.url(&format!("{base}/b-text")))
        .header("content-type", "text/plain")
        .body("héllo")
        .send()
        .await
        .unwrap();
    app.client.put(app.url(&format!("{base}/c-bin"))).body(vec![0xffu8, 0x00]).send().await.unwrap();
    app.client
        .put(app.url(&format!("{base}/d-badjson")))
        .header("content-type", "application/json")
        .body("{oops")
        .send()
        .await
        .unwrap();
    let body = json_of(app.client.get(app.url(&base)).send().await.unwrap()).await;
    let items = body["items"].as_array().unwrap();
    assert_eq!(items[0]["value"], json!({"n": 1}));
    assert!(items[0].get("encoding").is_none());
    assert_eq!(items[1]["value"], "héllo");
    assert_eq!(items[2]["value"], "/wA=");
    assert_eq!(items[2]["encoding"], "base64");
    assert_eq!(items[2]["content_type"], "application/octet-stream");
    assert_eq!(items[3]["value"], "{oops");
    assert_eq!(items[3]["version"], 4);
    app.stop().await;
}

#[tokio::test]
async fn objects_info_delete_all_and_listing() {
    let db = TestDatabase::new();
    let app = spawn_app(&db).await;
    let ns = unique_ns("objs");
    assert_problem(app.client.get(app.url(&format!("/v1/objects/{ns}/o1"))).send().await.unwrap(), 404, "not-found")
        .await;
    assert_problem(app.client.delete(app.url(&format!("/v1/objects/{ns}/o1"))).send().await.unwrap(), 404, "not-found")
        .await;

    for id in ["o1", "o2", "o3", "p1", "p2"] {
        for key in ["a", "b"] {
            put(&app, &format!("/v1/objects/{ns}/{id}/kv/{key}"), b"12345").await;
        }
    }
    let info = json_of(app.client.get(app.url(&format!("/v1/objects/{ns}/o1"))).send().await.unwrap()).await;
    assert_eq!(info["ns"], ns);
    assert_eq!(info["id"], "o1");
    assert_eq!(info["version"], 2);
    assert_eq!(info["keys"], 2);
    assert_eq!(info["bytes"], 12);
    assert!(info["fence"].as_i64().unwrap() >= 1);
    assert!(info["owner"].is_string());
    assert!(info["lease_expires_at"].as_str().unwrap().ends_with('Z'));

    let r = app.client.delete(app.url(&format!("/v1/objects/{ns}/o1"))).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers().contains_key("statehouse-fence"));
    assert_eq!(json_of(r).await, json!({"deleted_keys": 2, "deleted_blobs": 0, "version": 3}));
    let info = json_of(app.client.get(app.url(&format!("/v1/objects/{ns}/o1"))).send().await.unwrap()).await;
    assert_eq!((info["version"].as_i64(), info["keys"].as_i64(), info["bytes"].as_i64()), (Some(3), Some(0), Some(0)));
    assert_eq!(app.client.get(app.url(&format!("/v1/objects/{ns}/o1/kv/a"))).send().await.unwrap().status(), 404);
    // Deleting an empty object is still a change: deleteAll always bumps.
    let r = app.client.delete(app.url(&format!("/v1/objects/{ns}/o1"))).send().await.unwrap();
    assert_eq!(json_of(r).await, json!({"deleted_keys": 0, "deleted_blobs": 0, "version": 4}));

    let body = json_of(app.client.get(app.url(&format!("/v1/objects/{ns}?limit=2"))).send().await.unwrap()).await;
    let ids: Vec<&str> = body["items"].as_array().unwrap().iter().map(|o| o["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["o1", "o2"]);
    assert_eq!(body["items"][1], json!({"id": "o2", "version": 2, "keys": 2, "bytes": 12}));
    let cursor = body["cursor"].as_str().unwrap();
    let body =
        json_of(app.client.get(app.url(&format!("/v1/objects/{ns}?limit=2&cursor={cursor}"))).send().await.unwrap())
            .await;
    let ids: Vec<&str> = body["items"].as_array().unwrap().iter().map(|o| o["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["o3", "p1"]);
    let body = json_of(app.client.get(app.url(&format!("/v1/objects/{ns}?prefix=p"))).send().await.unwrap()).await;
    assert_eq!(body["items"].as_array().unwrap().len(), 2);
    assert!(body["cursor"].is_null());
    // `.` is no valid id, but a valid prefix of one.
    put(&app, &format!("/v1/objects/{ns}/.dot/kv/k"), b"v").await;
    let body = json_of(app.client.get(app.url(&format!("/v1/objects/{ns}?prefix=."))).send().await.unwrap()).await;
    assert_eq!(body["items"][0]["id"], ".dot");
    for q in ["limit=0", "limit=x", "cursor=zz%21", "prefix=a%20b"] {
        assert_problem(
            app.client.get(app.url(&format!("/v1/objects/{ns}?{q}"))).send().await.unwrap(),
            400,
            "bad-request",
        )
        .await;
    }
    assert_problem(
        app.client.delete(app.url(&format!("/v1/objects/{ns}/o2"))).body("x").send().await.unwrap(),
        400,
        "bad-request",
    )
    .await;
    app.stop().await;
}

#[tokio::test]
async fn operational_endpoints_and_unknown_routes() {
    let db = TestDatabase::new();
    let app = spawn_app(&db).await;
    assert_eq!(json_of(app.client.get(app.url("/healthz")).send().await.unwrap()).await["status"], "ok");
    let ready = json_of(app.client.get(app.url("/readyz")).send().await.unwrap()).await;
    assert_eq!(ready["status"], "ready");

    let ns = unique_ns("ops");
    put(&app, &format!("/v1/objects/{ns}/o/kv/k"), b"v").await;
    let metrics = app.client.get(app.url("/metrics")).send().await.unwrap().text().await.unwrap();
    for name in [
        "statehouse_http_requests_total{method=\"PUT\",route=\"/v1/objects/{ns}/{id}/kv/{*key}\",status=\"200\"}",
        "statehouse_http_request_duration_seconds_bucket",
        "statehouse_fence_rejections_total 0",
        "statehouse_transaction_retries_total",
        "statehouse_write_batch_size_bucket",
        "statehouse_info{",
    ] {
        assert!(metrics.contains(name), "metrics lack {name}:\n{metrics}");
    }

    // The object just written, and the blob sweeper's reserved object.
    let leases: i64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("statehouse_leases_held "))
        .expect("statehouse_leases_held")
        .parse()
        .unwrap();
    assert!(leases >= 1, "{metrics}");

    let doc = json_of(app.client.get(app.url("/openapi.json")).send().await.unwrap()).await;
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    let paths = doc["paths"].as_object().unwrap();
    for path in [
        "/v1/objects/{ns}",
        "/v1/objects/{ns}/{id}",
        "/v1/objects/{ns}/{id}/kv",
        "/v1/objects/{ns}/{id}/kv/{key}",
        "/v1/objects/{ns}/{id}/batch",
        "/v1/objects/{ns}/{id}/blobs",
        "/v1/objects/{ns}/{id}/blobs/{name}",
        "/v1/objects/{ns}/{id}/blobs/{name}/presign",
        "/healthz",
        "/readyz",
        "/metrics",
        "/openapi.json",
    ] {
        assert!(paths.contains_key(path), "openapi lacks {path}");
    }
    assert!(paths["/v1/objects/{ns}/{id}/kv/{key}"].get("put").is_some());

    assert_problem(app.client.get(app.url("/nope")).send().await.unwrap(), 404, "not-found").await;
    assert_problem(app.client.get(app.url("/v1/objects/a/b/kv/")).send().await.unwrap(), 404, "not-found").await;
    assert_problem(
        app.client.post(app.url(&format!("/v1/objects/{ns}/o/kv/k"))).send().await.unwrap(),
        405,
        "method-not-allowed",
    )
    .await;
    assert_problem(app.client.put(app.url("/healthz")).send().await.unwrap(), 405, "method-not-allowed").await;
    app.stop().await;
}

#[tokio::test]
async fn readyz_is_503_when_the_database_is_not_migrated() {
    let db = TestDatabase::new();
    let app = spawn_app(&db).await;
    // Simulate a database from another binary generation: drop the record,
    // through the file or the server the app uses.
    let conn = match db.file_path() {
        Some(path) => {
            let conn = libsql::Builder::new_local(path).build().await.unwrap().connect().unwrap();
            conn.busy_timeout(std::time::Duration::from_secs(5)).unwrap();
            conn
        }
        None => libsql::Builder::new_remote(db.url.clone(), String::new()).build().await.unwrap().connect().unwrap(),
    };
    conn.execute("DELETE FROM schema_migrations", ()).await.unwrap();
    let r = app.client.get(app.url("/readyz")).send().await.unwrap();
    assert_problem(r, 503, "unavailable").await;
    app.stop().await;
}

/// Many writes to one object land in shared transactions, where refused and
/// no-op writes sit between accepted ones: the object's version, key count and
/// byte total must still equal exactly what was accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writes_with_refusals_keep_the_object_totals_exact() {
    let db = TestDatabase::new();
    let app = spawn_app(&db).await;
    let ns = unique_ns("totals");
    let base = format!("/v1/objects/{ns}/o/kv");
    for i in 0..20 {
        assert_eq!(put(&app, &format!("{base}/seed{i}"), b"seed").await.status(), 200);
    }
    let requests = (0..300).map(|i| {
        let client = app.client.clone();
        let url = app.url(&format!("{base}/{}", ["seed", "new", "gone"][i % 3].to_string() + &(i % 40).to_string()));
        async move {
            let request = match i % 3 {
                // Create-only on existing keys (seed0..19 exist; seed20..39 do not).
                0 => client.put(&url).header("if-none-match", "*").body(vec![b'v'; i % 17]),
                1 => client.put(&url).body(vec![b'w'; i % 23]),
                // Deletes of keys that never existed: no change.
                _ => client.delete(&url),
            };
            request.send().await.unwrap().status().as_u16()
        }
    });
    let statuses = futures::future::join_all(requests).await;
    let accepted_changes = statuses.iter().enumerate().filter(|(i, s)| **s == 200 && i % 3 != 2).count();
    assert!(statuses.iter().all(|s| [200, 412].contains(s)), "{statuses:?}");
    assert!(statuses.contains(&412) && accepted_changes > 0);

    let listed: Value =
        app.client.get(app.url(&format!("{base}?limit=1000"))).send().await.unwrap().json().await.unwrap();
    let items = listed["items"].as_array().unwrap();
    let bytes: usize = items
        .iter()
        .map(|item| {
            let key = item["key"].as_str().unwrap();
            key.len() + item["value"].as_str().map_or(0, str::len)
        })
        .sum();
    let info = json_of(app.client.get(app.url(&format!("/v1/objects/{ns}/o"))).send().await.unwrap()).await;
    assert_eq!(info["keys"].as_u64(), Some(items.len() as u64), "{info}");
    assert_eq!(info["bytes"].as_u64(), Some(bytes as u64), "{info}");
    assert_eq!(info["version"].as_u64(), Some(20 + accepted_changes as u64), "one version per accepted change");
    app.stop().await;
}

/// Random batches over four keys (puts, deletes and gets, with `if_absent` and
/// `if_version` conditions that hold or not, some carrying an event) against a
/// model of the batch semantics: ops apply in order, each seeing the ones
/// before it; every key written gets the batch's one new version; a failed
/// condition refuses the whole batch with its op index; a batch that changes
/// nothing leaves the version alone. Results, versions and the object's key
/// count and bytes must match the model after every batch.
#[tokio::test]
async fn batches_follow_the_sequential_model() {
    use rand::{Rng, SeedableRng};
    use std::collections::BTreeMap;

    let db = TestDatabase::new();
    let app = spawn_app(&db).await;
    let ns = unique_ns("model");
    let url = app.url(&format!("/v1/objects/{ns}/o/batch"));
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut version = 0i64;
    let mut stored: BTreeMap<String, (i64, Value)> = BTreeMap::new();
    let (mut applied, mut refused, mut unchanged) = (0, 0, 0);

    for round in 0..400 {
        let new_version = version + 1;
        let mut overlay = stored.clone();
        let mut ops = Vec::new();
        let mut expected_results = Vec::new();
        let mut refusal = None;
        let mut changed = false;
        for op_index in 0..rng.random_range(1..=6) {
            let key = ["a", "b", "c", "d"][rng.random_range(0..4)].to_string();
            let current = overlay.get(&key).map(|(v, _)| *v);
            let mut op = match rng.random_range(0..4) {
                0 | 1 => json!({"op": "put", "key": key, "value": format!("v{round}-{op_index}")}),
                2 => json!({"op": "delete", "key": key}),
                _ => json!({"op": "get", "key": key}),
            };
            if op["op"] != "get" {
                match rng.random_range(0..10) {
                    0 if op["op"] == "put" => op["if_absent"] = json!(true),
                    1 => op["if_version"] = json!(stored.get(&key).map_or(1, |(v, _)| *v)),
                    2 => op["if_version"] = json!(new_version),
                    3 => op["if_version"] = json!(rng.random_range(1..=new_version)),
                    _ => {}
                }
            }
            let holds = match (&op["if_absent"], &op["if_version"]) {
                (Value::Bool(true), _) => current.is_none(),
                (_, Value::Number(n)) => current == n.as_i64(),
                _ => true,
            };
            if refusal.is_none() {
                if !holds {
                    refusal = Some(op_index);
                } else {
                    match op["op"].as_str().unwrap() {
                        "put" => {
                            overlay.insert(key.clone(), (new_version, op["value"].clone()));
                            changed = true;
                            expected_results.push(json!({"op": "put", "key": key, "version": new_version}));
                        }
                        "delete" => {
                            let deleted = overlay.remove(&key).is_some();
                            changed |= deleted;
                            expected_results.push(json!({"op": "delete", "key": key, "deleted": deleted}));
                        }
                        _ => expected_results.push(match overlay.get(&key) {
                            Some((v, value)) => {
                                json!({"op": "get", "key": key, "found": true, "version": v, "value": value})
                            }
                            None => json!({"op": "get", "key": key, "found": false}),
                        }),
                    }
                }
            }
            ops.push(op);
        }
        let mut body = json!({ "ops": ops });
        if rng.random_range(0..10) == 0 {
            body["events"] = json!([{"type": "Tick", "data": {"round": round}}]);
            changed = true;
        }

        let response = app.client.post(&url).json(&body).send().await.unwrap();
        let status = response.status().as_u16();
        let answer = json_of(response).await;
        if let Some(op_index) = refusal {
            assert_eq!(
                (status, answer["op_index"].as_u64()),
                (412, Some(op_index as u64)),
                "round {round}: {body} -> {answer}"
            );
            refused += 1;
            continue;
        }
        assert_eq!(status, 200, "round {round}: {body} -> {answer}");
        let results: Vec<Value> = answer["results"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                let mut r = r.clone();
                if let Some(r) = r.as_object_mut() {
                    r.retain(|field, _| {
                        ["op", "key", "version", "deleted", "found", "value"].contains(&field.as_str())
                    });
                }
                r
            })
            .collect();
        assert_eq!(results, expected_results, "round {round}: {body}");
        if changed {
            version = new_version;
            stored = overlay;
            applied += 1;
        } else {
            unchanged += 1;
        }
        assert_eq!(answer["version"], json!(version), "round {round}: {body} -> {answer}");
        let info = json_of(app.client.get(app.url(&format!("/v1/objects/{ns}/o"))).send().await.unwrap()).await;
        let bytes: usize = stored.iter().map(|(k, (_, v))| k.len() + serde_json::to_vec(v).unwrap().len()).sum();
        assert_eq!(
            (info["version"].as_i64(), info["keys"].as_u64(), info["bytes"].as_u64()),
            (Some(version), Some(stored.len() as u64), Some(bytes as u64)),
            "round {round}: {body}"
        );
    }
    println!("model: {applied} batches applied, {refused} refused, {unchanged} changed nothing");
    assert!(applied > 50 && refused > 50 && unchanged > 5, "the random batches cover every outcome");
    app.stop().await;
}
