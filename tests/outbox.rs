//! The outbox: every committed change and every event gets exactly one row,
//! written in the same transaction; refused writes leave none.

mod common;

use std::time::Duration;

use common::{spawn_app_with, unique_ns, TestDatabase};
use serde_json::{json, Value};

#[derive(Debug, PartialEq)]
struct Row {
    kind: String,
    version: i64,
    op: Option<String>,
    key: Option<String>,
    size: Option<i64>,
    value: Option<Vec<u8>>,
    truncated: Option<i64>,
    event_id: Option<String>,
    event_type: Option<String>,
    data: Option<String>,
    ts: i64,
    fence: i64,
}

async fn outbox(db: &TestDatabase, ns: &str) -> Vec<Row> {
    let database = match db.file_path() {
        Some(path) => libsql::Builder::new_local(path).build().await.unwrap(),
        None => libsql::Builder::new_remote(db.url.clone(), String::new()).build().await.unwrap(),
    };
    let conn = database.connect().unwrap();
    let mut rows = conn
        .query(
            "SELECT kind, version, op, key, size, value, value_truncated, event_id, type, data, ts, fence
             FROM outbox WHERE ns = ?1 ORDER BY seq",
            [ns],
        )
        .await
        .unwrap();
    let mut out = Vec::new();
    while let Some(r) = rows.next().await.unwrap() {
        out.push(Row {
            kind: r.get(0).unwrap(),
            version: r.get(1).unwrap(),
            op: r.get(2).unwrap(),
            key: r.get(3).unwrap(),
            size: r.get(4).unwrap(),
            value: r.get(5).unwrap(),
            truncated: r.get(6).unwrap(),
            event_id: r.get(7).unwrap(),
            event_type: r.get(8).unwrap(),
            data: r.get(9).unwrap(),
            ts: r.get(10).unwrap(),
            fence: r.get(11).unwrap(),
        });
    }
    out
}

#[tokio::test]
async fn every_committed_change_and_event_has_one_outbox_row() {
    let db = TestDatabase::new();
    let app = spawn_app_with(&db, |s| {
        s.change_value_cap_bytes = Some(8);
        s.export_enabled = false;
    })
    .await;
    let ns = unique_ns("outbox");
    let base = app.url(&format!("/v1/objects/{ns}/o"));
    let c = &app.client;

    c.put(format!("{base}/kv/a")).header("content-type", "text/plain").body("short").send().await.unwrap();
    c.put(format!("{base}/kv/b")).body("this value is longer than eight bytes").send().await.unwrap();
    // Refused writes leave nothing: a failed condition, a bad batch, a failed batch with events.
    assert_eq!(c.put(format!("{base}/kv/a")).header("if-match", "\"9\"").body("x").send().await.unwrap().status(), 412);
    let r = c
        .post(format!("{base}/batch"))
        .json(&json!({"ops": [{"op": "put", "key": "z", "value": 1, "if_version": 5}], "events": [{"type": "Lost"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 412);
    // Deleting what is absent is no change.
    c.delete(format!("{base}/kv/absent")).send().await.unwrap();
    c.delete(format!("{base}/kv/a")).send().await.unwrap();
    let r = c
        .post(format!("{base}/batch"))
        .json(&json!({
            "ops": [{"op": "put", "key": "c", "value": {"n": 1}}, {"op": "get", "key": "c"}],
            "events": [{"type": "CartUpdated", "data": {"items": 2}, "ts": "2026-11-23T10:00:00+02:00"}]
        }))
        .send()
        .await
        .unwrap();
    let batch: Value = r.json().await.unwrap();
    let batch_event = batch["event_ids"][0].as_str().unwrap().to_string();
    let r = c
        .post(format!("{base}/events"))
        .json(&json!({"events": [{"type": "OrderPlaced", "data": {"total": 42.5}}, {"type": "Shipped"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers().contains_key("statehouse-fence"));
    let events: Value = r.json().await.unwrap();
    assert_eq!(events["version"], 5);
    let ids: Vec<String> =
        events["event_ids"].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_string()).collect();
    c.put(format!("{base}/blobs/pic.png"))
        .header("content-type", "image/png")
        .body(vec![0u8; 300])
        .send()
        .await
        .unwrap();
    c.delete(format!("{base}/blobs/pic.png")).send().await.unwrap();
    c.delete(&base).send().await.unwrap();

    let rows = outbox(&db, &ns).await;
    let summary: Vec<(String, i64, Option<String>, Option<String>)> = rows
        .iter()
        .map(|r| (r.kind.clone(), r.version, r.op.clone(), r.key.clone().or(r.event_type.clone())))
        .collect();
    let s = |v: &str| Some(v.to_string());
    assert_eq!(
        summary,
        vec![
            ("change".into(), 1, s("put"), s("a")),
            ("change".into(), 2, s("put"), s("b")),
            ("change".into(), 3, s("delete"), s("a")),
            ("change".into(), 4, s("put"), s("c")),
            ("event".into(), 4, None, s("CartUpdated")),
            ("event".into(), 5, None, s("OrderPlaced")),
            ("event".into(), 5, None, s("Shipped")),
            ("change".into(), 6, s("blob_put"), s("pic.png")),
            ("change".into(), 7, s("blob_delete"), s("pic.png")),
            ("change".into(), 8, s("delete_all"), None),
        ]
    );
    // Values up to the cap, flagged when cut.
    assert_eq!((rows[0].value.as_deref(), rows[0].size, rows[0].truncated), (Some(&b"short"[..]), Some(5), Some(0)));
    assert_eq!(
        (rows[1].value.as_deref(), rows[1].size, rows[1].truncated),
        (Some(&b"this val"[..]), Some(37), Some(1))
    );
    assert_eq!(rows[7].size, Some(300));
    // Events keep their ids, data and time.
    assert_eq!(rows[4].event_id.as_deref(), Some(batch_event.as_str()));
    assert_eq!(rows[4].data.as_deref(), Some(r#"{"items":2}"#));
    assert_eq!(rows[4].ts, 1_795_420_800_000_000, "10:00+02:00 is 08:00Z, in microseconds");
    assert_eq!(
        [rows[5].event_id.clone().unwrap(), rows[6].event_id.clone().unwrap()],
        [ids[0].clone(), ids[1].clone()]
    );
    assert_eq!(rows[6].data.as_deref(), Some("null"));
    assert!(rows.iter().all(|r| r.fence >= 1));
    app.stop().await;
}

#[tokio::test]
async fn bad_events_are_400_and_record_nothing() {
    let db = TestDatabase::new();
    let app = spawn_app_with(&db, |s| s.export_enabled = false).await;
    let ns = unique_ns("badevents");
    let url = app.url(&format!("/v1/objects/{ns}/o/events"));
    let many: Vec<Value> = (0..1001).map(|_| json!({"type": "E"})).collect();
    for body in [
        json!({"events": []}),
        json!({"events": many}),
        json!({"events": [{"type": ""}]}),
        json!({"events": [{"type": "a\u{0007}b"}]}),
        json!({"events": [{"type": "x".repeat(257)}]}),
        json!({"events": [{"type": "E", "ts": "yesterday"}]}),
        json!({"events": [{"type": "E", "extra": 1}]}),
        json!({"events": [{"data": {}}]}),
        json!({"items": []}),
    ] {
        let r = app.client.post(&url).json(&body).send().await.unwrap();
        assert_eq!(r.status(), 400, "{body}");
        assert_eq!(r.headers()["content-type"], "application/problem+json");
    }
    let thousand: Vec<Value> = (0..1000).map(|i| json!({"type": "E", "data": i})).collect();
    let r = app.client.post(&url).json(&json!({"events": thousand})).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(outbox(&db, &ns).await.len(), 1000);
    app.stop().await;
}

/// Exported rows leave the outbox: after an export they are deleted in the
/// background, a slice at a time, and no later export takes them again.
#[tokio::test]
async fn exported_rows_leave_the_outbox() {
    let db = TestDatabase::new();
    // Exports only on demand.
    let app = spawn_app_with(&db, |s| s.export_interval = Duration::from_millis(3_600_000)).await;
    let ns = unique_ns("forget");
    let base = app.url(&format!("/v1/objects/{ns}/o"));
    // 2,500 events: three slices of deletion.
    for chunk in 0..5 {
        let events: Vec<Value> = (0..500).map(|i| json!({"type": "Tick", "data": {"n": chunk * 500 + i}})).collect();
        let r = app.client.post(format!("{base}/events")).json(&json!({"events": events})).send().await.unwrap();
        assert_eq!(r.status(), 200);
    }
    assert_eq!(outbox(&db, &ns).await.len(), 2500);

    let export = |app: &common::TestApp| app.client.post(app.url("/v1/admin/export")).send();
    // (The exporter's first cycle at start may already have taken them.)
    assert_eq!(export(&app).await.unwrap().status(), 200);
    let started = std::time::Instant::now();
    loop {
        let left = outbox(&db, &ns).await.len();
        if left == 0 {
            break;
        }
        assert!(started.elapsed() < std::time::Duration::from_secs(10), "{left} exported rows still in the outbox");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let report: Value = export(&app).await.unwrap().json().await.unwrap();
    assert_eq!(report["nothing_to_do"], true, "nothing is exported twice: {report}");
    let tables: Value = app.client.get(app.url("/v1/analytics/tables")).send().await.unwrap().json().await.unwrap();
    let events = tables["tables"].as_array().unwrap().iter().find(|t| t["name"] == "statehouse.events").unwrap();
    assert_eq!((events["rows"].as_u64(), events["pending_rows"].as_u64()), (Some(2500), Some(0)), "{events}");
    app.stop().await;
}
