//! Blobs over HTTP, on the local folder and on a real S3 wire protocol
//! (s3s-fs in-process): streaming, ranges, conditions, metadata, listing,
//! presigned URLs, forwarding, and the sweeper that removes unreferenced bytes.

mod common;

use std::time::{Duration, Instant};

use common::s3::{local_settings, S3Server};
use common::{spawn_app_with, unique_ns, TestApp, TestDatabase};
use object_store::path::Path;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use statehouse::blobs::Storage;
use statehouse::config::ObjectStoreSettings;

enum Backend {
    Local(tempfile::TempDir),
    S3(S3Server),
}

impl Backend {
    async fn new(s3: bool) -> Backend {
        if s3 {
            Backend::S3(S3Server::start(Some("blobs-test")).await)
        } else {
            Backend::Local(tempfile::tempdir().unwrap())
        }
    }

    fn settings(&self) -> ObjectStoreSettings {
        match self {
            Backend::Local(dir) => local_settings(dir.path()),
            Backend::S3(server) => server.settings("blobs-test"),
        }
    }

    async fn app(&self, db: &TestDatabase, max_blob: u64) -> TestApp {
        let objects = self.settings();
        spawn_app_with(db, move |s| {
            s.objects = objects;
            s.max_blob_bytes = max_blob;
            s.sweep_interval = Duration::from_millis(200);
            s.orphan_grace = Duration::from_millis(1500);
            // Replaced bytes stay 2 s (the retention, and as long again) for restores.
            s.history_retention = Duration::from_secs(1);
        })
        .await
    }

    /// Every key under blobs/ in the store.
    async fn stored(&self) -> Vec<String> {
        let storage = Storage::open(&self.settings()).await.unwrap();
        let mut keys: Vec<String> =
            storage.list(&Path::from("blobs")).await.unwrap().into_iter().map(|m| m.location.to_string()).collect();
        keys.sort();
        keys
    }

    async fn wait_for_stored(&self, expected: usize) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let keys = self.stored().await;
            if keys.len() == expected || Instant::now() > deadline {
                return keys;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

fn sha(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

async fn json_of(r: reqwest::Response) -> Value {
    r.json().await.unwrap()
}

async fn problem(r: reqwest::Response, status: u16, kind: &str) {
    assert_eq!(r.status().as_u16(), status);
    assert_eq!(r.headers()["content-type"], "application/problem+json");
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["type"], format!("https://statehouse.dev/problems/{kind}"), "{body}");
}

async fn blob_lifecycle(s3: bool) {
    let db = TestDatabase::new();
    let backend = Backend::new(s3).await;
    let app = backend.app(&db, 64 * 1024 * 1024).await;
    let ns = unique_ns("blob");
    let url = |name: &str| app.url(&format!("/v1/objects/{ns}/o/blobs/{name}"));

    // Upload with metadata; the answer describes what was stored.
    let data = b"0123456789abcdefghij".to_vec();
    let r = app
        .client
        .put(url("docs/readme.txt"))
        .header("content-type", "text/plain")
        .header("cache-control", "max-age=60")
        .header("content-disposition", "attachment; filename=\"readme.txt\"")
        .header("x-statehouse-meta-owner", "alice")
        .header("x-statehouse-meta-Team", "core")
        .body(data.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["etag"], "\"1\"");
    assert!(r.headers().contains_key("statehouse-fence"));
    let body = json_of(r).await;
    assert_eq!(
        body,
        json!({"name": "docs/readme.txt", "size": 20, "sha256": sha(&data), "etag": "\"1\"", "version": 1})
    );

    let r = app.client.get(url("docs/readme.txt")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    for (k, v) in [
        ("content-type", "text/plain"),
        ("cache-control", "max-age=60"),
        ("content-disposition", "attachment; filename=\"readme.txt\""),
        ("x-statehouse-meta-owner", "alice"),
        ("x-statehouse-meta-team", "core"),
        ("etag", "\"1\""),
        ("accept-ranges", "bytes"),
        ("content-length", "20"),
    ] {
        assert_eq!(r.headers()[k], v, "{k}");
    }
    assert_eq!(r.headers()["x-statehouse-sha256"], sha(&data).as_str());
    assert_eq!(r.bytes().await.unwrap().as_ref(), data.as_slice());

    let r = app.client.head(url("docs/readme.txt")).send().await.unwrap();
    assert_eq!((r.status().as_u16(), r.headers()["content-length"].to_str().unwrap()), (200, "20"));
    assert!(r.bytes().await.unwrap().is_empty());

    // Ranges.
    let range = |spec: &'static str| app.client.get(url("docs/readme.txt")).header("range", spec).send();
    let r = range("bytes=2-5").await.unwrap();
    assert_eq!(r.status(), 206);
    assert_eq!(r.headers()["content-range"], "bytes 2-5/20");
    assert_eq!(r.headers()["content-length"], "4");
    assert_eq!(r.bytes().await.unwrap().as_ref(), b"2345");
    assert_eq!(range("bytes=-3").await.unwrap().bytes().await.unwrap().as_ref(), b"hij");
    assert_eq!(range("bytes=15-").await.unwrap().bytes().await.unwrap().as_ref(), b"fghij");
    let r = range("bytes=20-").await.unwrap();
    assert_eq!(r.headers()["content-range"], "bytes */20");
    problem(r, 416, "range-not-satisfiable").await;
    assert_eq!(range("bytes=0-1,4-5").await.unwrap().status(), 200, "several ranges: the whole blob");

    // Conditions.
    let r = app.client.get(url("docs/readme.txt")).header("if-none-match", "\"1\"").send().await.unwrap();
    assert_eq!(r.status(), 304);
    problem(
        app.client.put(url("docs/readme.txt")).header("if-none-match", "*").body("x").send().await.unwrap(),
        412,
        "precondition-failed",
    )
    .await;
    problem(
        app.client.put(url("docs/readme.txt")).header("if-match", "\"9\"").body("x").send().await.unwrap(),
        412,
        "precondition-failed",
    )
    .await;
    // Entity-tags we never made are well-formed (RFC 9110): they match nothing.
    problem(
        app.client.put(url("docs/readme.txt")).header("if-match", "\"abc\"").body("x").send().await.unwrap(),
        412,
        "precondition-failed",
    )
    .await;
    problem(
        app.client.put(url("docs/readme.txt")).header("if-match", "W/\"1\"").body("x").send().await.unwrap(),
        412,
        "precondition-failed",
    )
    .await;
    problem(
        app.client.delete(url("docs/readme.txt")).header("if-match", "\"abc\"").send().await.unwrap(),
        412,
        "precondition-failed",
    )
    .await;
    let r = app.client.get(url("docs/readme.txt")).header("if-none-match", "\"abc\"").send().await.unwrap();
    assert_eq!(r.status(), 200);
    let r = app.client.get(url("docs/readme.txt")).header("if-none-match", "\"x\", W/\"1\"").send().await.unwrap();
    assert_eq!(r.status(), 304);
    problem(
        app.client.get(url("docs/readme.txt")).header("if-none-match", "\"open").send().await.unwrap(),
        400,
        "bad-request",
    )
    .await;
    assert_eq!(
        app.client.get(url("docs/readme.txt")).send().await.unwrap().bytes().await.unwrap().as_ref(),
        data.as_slice()
    );

    // A large blob goes up as a multipart upload and comes back intact.
    let large: Vec<u8> = (0..20 * 1024 * 1024 + 7).map(|i| (i % 253) as u8).collect();
    let r = app.client.put(url("big.bin")).body(large.clone()).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(json_of(r).await["sha256"], sha(&large));
    let back = app.client.get(url("big.bin")).send().await.unwrap().bytes().await.unwrap();
    assert!(back.as_ref() == large.as_slice(), "large blob differs");
    let r = app.client.get(url("big.bin")).header("range", "bytes=8388600-8388615").send().await.unwrap();
    assert_eq!(r.bytes().await.unwrap().as_ref(), &large[8_388_600..8_388_616]);

    // Listing with prefix, limit and cursor.
    for name in ["docs/a", "docs/b", "img/c"] {
        app.client.put(url(name)).header("x-statehouse-meta-n", name).body(name.to_string()).send().await.unwrap();
    }
    let list = |q: &str| app.client.get(app.url(&format!("/v1/objects/{ns}/o/blobs?{q}"))).send();
    let body = json_of(list("prefix=docs/&limit=2").await.unwrap()).await;
    let names: Vec<&str> = body["items"].as_array().unwrap().iter().map(|b| b["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["docs/a", "docs/b"]);
    assert_eq!(body["items"][0]["metadata"], json!({"n": "docs/a"}));
    assert_eq!(body["items"][0]["size"], 6);
    let cursor = body["cursor"].as_str().unwrap().to_string();
    let body = json_of(list(&format!("prefix=docs/&limit=2&cursor={cursor}")).await.unwrap()).await;
    assert_eq!(body["items"][0]["name"], "docs/readme.txt");
    assert!(body["cursor"].is_null());
    problem(list("limit=0").await.unwrap(), 400, "bad-request").await;

    // Replacing a blob makes its old bytes garbage: kept for the history
    // retention (a restore may want them), then the sweeper removes them.
    assert_eq!(backend.wait_for_stored(5).await.len(), 5);
    app.client.put(url("docs/a")).body("second version").send().await.unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(backend.stored().await.len(), 6, "the replaced bytes are kept for the retention");
    let keys = backend.wait_for_stored(5).await;
    assert_eq!(keys.len(), 5, "the replaced bytes were swept: {keys:?}");
    assert_eq!(app.client.get(url("docs/a")).send().await.unwrap().text().await.unwrap(), "second version");

    // Delete a blob, then the whole object (keys and blobs).
    let r = app.client.delete(url("img/c")).send().await.unwrap();
    assert_eq!(json_of(r).await["deleted"], true);
    problem(app.client.get(url("img/c")).send().await.unwrap(), 404, "not-found").await;
    assert_eq!(json_of(app.client.delete(url("img/c")).send().await.unwrap()).await["deleted"], false);
    app.client.put(app.url(&format!("/v1/objects/{ns}/o/kv/k"))).body("v").send().await.unwrap();
    let r = app.client.delete(app.url(&format!("/v1/objects/{ns}/o"))).send().await.unwrap();
    let body = json_of(r).await;
    assert_eq!((body["deleted_keys"].as_i64(), body["deleted_blobs"].as_i64()), (Some(1), Some(4)));
    assert!(json_of(list("").await.unwrap()).await["items"].as_array().unwrap().is_empty());
    let keys = backend.wait_for_stored(0).await;
    assert!(keys.is_empty(), "deleting the object leaves no bytes: {keys:?}");

    // Bad names and bad headers: 400, nothing stored.
    for bad in ["a/..%2Fb", "%2Fabs", "a%01b", "a//b", &"n".repeat(1025)] {
        problem(app.client.put(url(bad)).body("x").send().await.unwrap(), 400, "bad-request").await;
    }
    problem(
        app.client.put(url("ok")).header("x-statehouse-meta-big", "v".repeat(9000)).body("x").send().await.unwrap(),
        400,
        "bad-request",
    )
    .await;
    problem(
        app.client.put(url("ok")).header("content-type", "nonsense").body("x").send().await.unwrap(),
        400,
        "bad-request",
    )
    .await;
    assert!(backend.stored().await.is_empty());

    let metrics = app.client.get(app.url("/readyz")).send().await.unwrap();
    assert_eq!(metrics.status(), 200);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blobs_on_the_local_folder() {
    blob_lifecycle(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blobs_on_s3() {
    blob_lifecycle(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_uploads_are_413_and_leave_nothing() {
    let db = TestDatabase::new();
    let backend = Backend::new(true).await;
    let app = backend.app(&db, 1024 * 1024).await;
    let ns = unique_ns("big");
    let url = app.url(&format!("/v1/objects/{ns}/o/blobs/too-big"));
    // Declared too large: refused before reading.
    problem(app.client.put(&url).body(vec![0u8; 1024 * 1024 + 1]).send().await.unwrap(), 413, "payload-too-large")
        .await;
    // Streamed without a length: refused when the limit is crossed (multipart path too).
    for size in [1024 * 1024 + 1, 12 * 1024 * 1024] {
        let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
            (0..size / 65536 + 1).map(|_| Ok(vec![1u8; 65536])).collect();
        let body = reqwest::Body::wrap_stream(futures::stream::iter(chunks));
        match app.client.put(&url).body(body).send().await {
            Ok(r) => problem(r, 413, "payload-too-large").await,
            Err(e) => assert!(e.is_request() || e.is_body(), "{e}"), // the server may close mid-body
        }
    }
    problem(app.client.get(&url).send().await.unwrap(), 404, "not-found").await;
    assert!(backend.stored().await.is_empty());
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presigned_urls_on_s3_and_409_on_a_folder() {
    let db = TestDatabase::new();
    let local = Backend::new(false).await;
    let app = local.app(&db, 1 << 20).await;
    let ns = unique_ns("presign");
    app.client.put(app.url(&format!("/v1/objects/{ns}/o/blobs/f"))).body("x").send().await.unwrap();
    let r = app
        .client
        .post(app.url(&format!("/v1/objects/{ns}/o/blobs/f/presign")))
        .json(&json!({"method": "GET"}))
        .send()
        .await
        .unwrap();
    problem(r, 409, "conflict").await;
    app.stop().await;

    let db = TestDatabase::new();
    let s3 = Backend::new(true).await;
    // S3 Last-Modified has whole seconds: give uploads a grace period that cannot look expired.
    let objects = s3.settings();
    let app = spawn_app_with(&db, |s| {
        s.objects = objects;
        s.orphan_grace = Duration::from_millis(60_000);
    })
    .await;
    let blob = app.url(&format!("/v1/objects/{ns}/o/blobs/f.txt"));
    app.client.put(&blob).body("stored bytes").send().await.unwrap();
    let presign = |body: Value| app.client.post(format!("{blob}/presign")).json(&body).send();
    let got = json_of(presign(json!({"method": "GET", "expires_in": 60})).await.unwrap()).await;
    let plain = reqwest::Client::new();
    assert_eq!(plain.get(got["url"].as_str().unwrap()).send().await.unwrap().text().await.unwrap(), "stored bytes");

    // PUT: upload straight to the store, then commit to make it the blob.
    let put = json_of(presign(json!({"method": "PUT"})).await.unwrap()).await;
    assert_eq!(plain.put(put["url"].as_str().unwrap()).body("direct upload").send().await.unwrap().status(), 200);
    assert_eq!(
        app.client.get(&blob).send().await.unwrap().text().await.unwrap(),
        "stored bytes",
        "not visible before commit"
    );
    for bad_meta in [json!({"a b": "x"}), json!({"ok": "line\nbreak"}), json!({"": "x"})] {
        let r = app
            .client
            .post(app.url(put["commit_url"].as_str().unwrap()))
            .json(&json!({"upload_key": put["upload_key"], "metadata": bad_meta}))
            .send()
            .await
            .unwrap();
        problem(r, 400, "bad-request").await;
    }
    let unchanged = app.client.get(&blob).send().await.unwrap().text().await.unwrap();
    assert_eq!(unchanged, "stored bytes", "a refused commit changes nothing");
    let r = app
        .client
        .post(app.url(put["commit_url"].as_str().unwrap()))
        .json(&json!({"upload_key": put["upload_key"], "content_type": "text/plain", "metadata": {"via": "presign"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(json_of(r).await["sha256"], sha(b"direct upload"));
    let r = app.client.get(&blob).send().await.unwrap();
    assert_eq!(r.headers()["x-statehouse-meta-via"], "presign");
    assert_eq!(r.text().await.unwrap(), "direct upload");

    for bad in [json!({"method": "DELETE"}), json!({"method": "GET", "expires_in": 0}), json!({"nope": 1})] {
        problem(presign(bad).await.unwrap(), 400, "bad-request").await;
    }
    let r = app
        .client
        .post(format!("{blob}/commit"))
        .json(&json!({"upload_key": "blobs/elsewhere/x"}))
        .send()
        .await
        .unwrap();
    problem(r, 400, "bad-request").await;
    problem(
        app.client
            .post(app.url(&format!("/v1/objects/{ns}/o/blobs/missing/presign")))
            .json(&json!({"method": "GET"}))
            .send()
            .await
            .unwrap(),
        404,
        "not-found",
    )
    .await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_owner_uploads_the_bytes_and_forwards_only_the_commit() {
    let db = TestDatabase::new();
    let backend = Backend::new(true).await;
    let a = backend.app(&db, 1 << 24).await;
    let b = backend.app(&db, 1 << 24).await;
    let ns = unique_ns("fwdblob");
    let r = a.client.put(a.url(&format!("/v1/objects/{ns}/o/kv/k"))).body("a owns it").send().await.unwrap();
    let owner = r.headers()["statehouse-instance"].to_str().unwrap().to_string();
    let data = vec![7u8; 3 * 1024 * 1024];
    let r = b.client.put(b.url(&format!("/v1/objects/{ns}/o/blobs/file"))).body(data.clone()).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["statehouse-instance"], owner.as_str(), "committed by the owner");
    assert_eq!(json_of(r).await["version"], 2);
    assert_eq!(
        a.client
            .get(a.url(&format!("/v1/objects/{ns}/o/blobs/file")))
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap()
            .len(),
        data.len()
    );
    // A condition that fails at the owner leaves no bytes behind.
    let r = b
        .client
        .put(b.url(&format!("/v1/objects/{ns}/o/blobs/file")))
        .header("if-match", "\"1\"")
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 412);
    assert_eq!(backend.wait_for_stored(1).await.len(), 1);
    // The internal commit route is not for clients.
    let r = b.client.post(b.url(&format!("/v1/internal/objects/{ns}/o/blob-commit"))).body("{}").send().await.unwrap();
    assert_eq!(r.status(), 404);
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orphans_of_uncommitted_uploads_are_swept_after_the_grace_period() {
    let db = TestDatabase::new();
    let backend = Backend::new(false).await;
    let app = backend.app(&db, 1 << 20).await;
    let ns = unique_ns("orphan");
    app.client.put(app.url(&format!("/v1/objects/{ns}/o/blobs/kept"))).body("referenced").send().await.unwrap();
    // Bytes as a crashed upload would leave them: under a blob key, with no row.
    let storage = Storage::open(&backend.settings()).await.unwrap();
    let orphan = Path::from(format!("blobs/{ns}/o/lost/{}", uuid::Uuid::now_v7()));
    storage.put(&orphan, bytes::Bytes::from_static(b"orphan")).await.unwrap();
    assert_eq!(backend.stored().await.len(), 2);
    let keys = backend.wait_for_stored(1).await;
    assert_eq!(keys.len(), 1, "{keys:?}");
    assert!(!keys[0].contains("/lost/"));
    assert_eq!(
        app.client.get(app.url(&format!("/v1/objects/{ns}/o/blobs/kept"))).send().await.unwrap().text().await.unwrap(),
        "referenced"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_checks_the_object_store() {
    let db = TestDatabase::new();
    let backend = Backend::new(true).await;
    let app = backend.app(&db, 1 << 20).await;
    assert_eq!(app.client.get(app.url("/readyz")).send().await.unwrap().status(), 200);
    if let Backend::S3(server) = &backend {
        server.stop();
    }
    problem(app.client.get(app.url("/readyz")).send().await.unwrap(), 503, "unavailable").await;
    app.stop().await;
}

/// Peak resident memory of a process (VmHWM), in MiB.
fn peak_rss_mib(pid: i32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).expect("VmHWM in /proc/<pid>/status");
    let kb: f64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kb / 1024.0
}

/// The real binary streams blobs: 0 B, 1 B, 10 MiB and 100 MiB round trips
/// on both backends, with the server's peak memory far below the body size.
async fn streaming_round_trips(s3: bool) {
    let db = TestDatabase::new();
    let backend = Backend::new(s3).await;
    let settings = backend.settings();
    let mut env = Vec::new();
    match &backend {
        Backend::Local(dir) => env.push(("STATEHOUSE_OBJECTS_DIR", dir.path().display().to_string())),
        Backend::S3(_) => {
            env.push(("R2_ENDPOINT", settings.r2_endpoint.clone().unwrap()));
            env.push(("R2_BUCKET", settings.r2_bucket.clone().unwrap()));
            env.push(("R2_ACCESS_KEY_ID", settings.r2_access_key_id.as_ref().unwrap().expose().to_string()));
            env.push(("R2_SECRET_ACCESS_KEY", settings.r2_secret_access_key.as_ref().unwrap().expose().to_string()));
            env.push(("R2_REGION", settings.r2_region.clone()));
        }
    }
    let env: Vec<(&str, String)> = env;
    let server = common::Process::start(&db.url, 0, &env);
    let client = reqwest::Client::builder().timeout(Duration::from_secs(300)).build().unwrap();
    let ns = unique_ns("stream");
    let label = if s3 { "s3s-fs" } else { "local folder" };
    let baseline = peak_rss_mib(server.pid());
    for size in [0usize, 1, 10 * 1024 * 1024, 100 * 1024 * 1024] {
        let url = format!("{}/v1/objects/{ns}/o/blobs/size-{size}", server.base);
        // Streamed in 256 KiB chunks without a Content-Length, generated on the fly.
        let chunk = 256 * 1024;
        let parts: Vec<Result<Vec<u8>, std::io::Error>> = (0..size.div_ceil(chunk))
            .map(|i| Ok((i * chunk..((i + 1) * chunk).min(size)).map(|b| (b % 251) as u8).collect()))
            .collect();
        let mut hasher = Sha256::new();
        for part in parts.iter().flatten() {
            hasher.update(part);
        }
        let expected_sha = hex::encode(hasher.finalize());
        let started = Instant::now();
        let r = client.put(&url).body(reqwest::Body::wrap_stream(futures::stream::iter(parts))).send().await.unwrap();
        let upload = started.elapsed();
        assert_eq!(r.status(), 200, "{label} {size}");
        let body = json_of(r).await;
        assert_eq!((body["size"].as_u64(), body["sha256"].as_str()), (Some(size as u64), Some(expected_sha.as_str())));

        let started = Instant::now();
        let mut r = client.get(&url).send().await.unwrap();
        assert_eq!(r.headers()["content-length"], size.to_string().as_str());
        let mut hasher = Sha256::new();
        let mut received = 0usize;
        while let Some(part) = r.chunk().await.unwrap() {
            received += part.len();
            hasher.update(&part);
        }
        let download = started.elapsed();
        assert_eq!((received, hex::encode(hasher.finalize())), (size, expected_sha));
        if size >= 10 * 1024 * 1024 {
            let mib = size as f64 / (1024.0 * 1024.0);
            println!(
                "blob streaming ({label}, {} build): {mib:.0} MiB up {:.1} MB/s, down {:.1} MB/s",
                if cfg!(debug_assertions) { "debug" } else { "release" },
                size as f64 / 1e6 / upload.as_secs_f64(),
                size as f64 / 1e6 / download.as_secs_f64()
            );
        }
        // Edges of the last blob: first byte, last byte, exactly all, one past the end.
        if size == 10 * 1024 * 1024 {
            let edge = |spec: String| client.get(&url).header("range", spec).send();
            assert_eq!(edge("bytes=0-0".into()).await.unwrap().bytes().await.unwrap().as_ref(), &[0u8]);
            let last = edge(format!("bytes={}-{}", size - 1, size - 1)).await.unwrap();
            assert_eq!(last.headers()["content-range"], format!("bytes {}-{}/{size}", size - 1, size - 1).as_str());
            assert_eq!(last.bytes().await.unwrap().as_ref(), &[((size - 1) % 251) as u8]);
            let all = edge(format!("bytes=0-{}", size - 1)).await.unwrap();
            assert_eq!((all.status().as_u16(), all.bytes().await.unwrap().len()), (206, size));
            assert_eq!(edge(format!("bytes={size}-")).await.unwrap().status(), 416);
        }
    }
    let peak = peak_rss_mib(server.pid());
    println!("blob streaming ({label}): server peak RSS {baseline:.1} MiB before, {peak:.1} MiB after a 100 MiB upload and download");
    assert!(
        peak - baseline < 50.0,
        "{label}: the server's memory grew by {:.1} MiB for a 100 MiB blob",
        peak - baseline
    );
    server.assert_no_panic();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_round_trips_on_the_local_folder() {
    streaming_round_trips(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_round_trips_on_s3() {
    streaming_round_trips(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_whose_commit_fails_leaves_no_blob_and_no_bytes() {
    let db = TestDatabase::new();
    let backend = Backend::new(true).await;
    let objects = backend.settings();
    let owner = spawn_app_with(&db, |s| {
        s.objects = objects.clone();
        s.lease = Duration::from_millis(10_000);
    })
    .await;
    let objects = backend.settings();
    let other = spawn_app_with(&db, |s| {
        s.objects = objects;
        s.forward_timeout = Duration::from_millis(200);
    })
    .await;
    let ns = unique_ns("failedcommit");
    owner.client.put(owner.url(&format!("/v1/objects/{ns}/o/kv/k"))).body("owned").send().await.unwrap();
    owner.crash();
    // The bytes are uploaded by `other`, but the owner cannot commit them.
    let url = other.url(&format!("/v1/objects/{ns}/o/blobs/f"));
    let r = other.client.put(&url).body(vec![1u8; 100_000]).send().await.unwrap();
    problem(r, 503, "unavailable").await;
    problem(other.client.get(&url).send().await.unwrap(), 404, "not-found").await;
    assert!(backend.stored().await.is_empty(), "the uncommitted bytes were removed");
    other.stop().await;
}
