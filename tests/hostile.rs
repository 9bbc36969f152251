//! Hostile input against the real binary. Schemathesis generates over 10,000
//! requests from `/openapi.json`, valid and invalid, across every operation;
//! hand-written requests go where generators rarely do: `..` and encoded
//! slashes in names, NUL and invalid UTF-8, 10 MB headers, deeply nested
//! JSON, negative and huge numbers. No answer may be a 5xx, every refusal is
//! a 4xx problem+json, what is refused changes nothing, and the process never
//! panics.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use base64::Engine;
use common::{unique_ns, Process, TestDatabase};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A request to refuse: its method, path, and headers (name, raw bytes).
type HeaderCase<'a> = (&'a str, &'a str, Vec<(&'a str, &'a [u8])>);

/// A random token the server accepts for everything, and the environment that configures it.
fn credentials() -> (String, Vec<(&'static str, String)>) {
    let token = hex::encode(rand::random::<[u8; 32]>());
    let digest = hex::encode(Sha256::digest(token.as_bytes()));
    let env = vec![
        ("STATEHOUSE_AUTH_TOKENS", format!("fuzz sha256:{digest} * read,write,admin")),
        ("STATEHOUSE_PEER_SECRET", hex::encode(rand::random::<[u8; 20]>())),
        // Alarms may be set in every namespace, so fuzzed alarms are stored, listed and fired;
        // nothing listens on the discard port, so each delivery fails and is retried.
        ("STATEHOUSE_ALARM_TARGETS", "*=http://127.0.0.1:9/alarms".to_string()),
        ("STATEHOUSE_ALARM_SECRET", hex::encode(rand::random::<[u8; 32]>())),
    ];
    (token, env)
}

fn schemathesis() -> PathBuf {
    let venv = std::env::var("STATEHOUSE_TEST_VENV").unwrap_or_else(|_| {
        panic!(
            "STATEHOUSE_TEST_VENV is not set: the fuzz test needs schemathesis. Run scripts/test (it builds \
             the venv), or point STATEHOUSE_TEST_VENV at a venv with tests/fuzz/requirements.txt installed."
        )
    });
    let program = Path::new(&venv).join("bin/schemathesis");
    assert!(
        program.is_file(),
        "STATEHOUSE_TEST_VENV={venv} has no bin/schemathesis: install tests/fuzz/requirements.txt"
    );
    program
}

const CHECKS: [&str; 4] =
    ["not_a_server_error", "status_code_conformance", "content_type_conformance", "response_schema_conformance"];
/// Fuzzing examples per operation: 14 operations take parameters, so with the
/// coverage (about 600) and stateful phases the run makes about 11,000 requests.
const MAX_EXAMPLES: u32 = 700;
const MIN_REQUESTS: usize = 10_000;
/// Two runs at once, one per core (schemathesis generates on one thread), of
/// about the same number of fuzzed operations: blobs, events, the namespace
/// listing and the Iceberg catalog, and the rest. A resource's writes and
/// reads stay in one run, so that its stateful phase can chain them.
const SHARD: &str = r"/blobs|/events|^/v1/objects/\{ns\}$|^/iceberg/";

/// The served document with every object schema closed
/// (`additionalProperties: false` where it says nothing else), so that a
/// response carrying a field the document does not name fails the schema
/// check instead of passing unseen.
fn closed(mut document: Value) -> Value {
    fn close(schema: &mut Value) {
        match schema {
            Value::Object(map) => {
                let is_object = map.get("type") == Some(&json!("object")) || map.contains_key("properties");
                if is_object && map.contains_key("properties") && !map.contains_key("additionalProperties") {
                    map.insert("additionalProperties".into(), json!(false));
                }
                for value in map.values_mut() {
                    close(value);
                }
            }
            Value::Array(items) => items.iter_mut().for_each(close),
            _ => {}
        }
    }
    close(&mut document);
    document
}

/// Requests and answers may hold megabytes of names; a line each is enough to find them.
fn short(text: &str) -> String {
    text.chars().take(300).collect()
}

/// What the run's NDJSON report says was sent, answered and checked.
#[derive(Default)]
struct Tally {
    requests: usize,
    by_status: BTreeMap<u16, usize>,
    by_phase: BTreeMap<String, usize>,
    /// Check name → (passed, failed).
    checks: BTreeMap<String, (usize, usize)>,
    server_errors: Vec<String>,
    unanswered: Vec<String>,
}

impl Tally {
    fn add(&mut self, report: &Path) {
        let text = std::fs::read_to_string(report).expect("schemathesis wrote its NDJSON report");
        for line in text.lines() {
            let event: Value = serde_json::from_str(line).expect("an NDJSON event");
            let Some(scenario) = event.get("ScenarioFinished") else { continue };
            let phase = scenario["phase"].as_str().unwrap_or("?").to_string();
            let recorder = &scenario["recorder"];
            for interaction in recorder["interactions"].as_object().into_iter().flat_map(|m| m.values()) {
                self.requests += 1;
                *self.by_phase.entry(phase.clone()).or_default() += 1;
                let request = &interaction["request"];
                let uri = request["uri"].as_str().unwrap_or("?");
                let described = format!("{} {}", request["method"].as_str().unwrap_or("?"), short(uri));
                match interaction["response"]["status_code"].as_u64() {
                    Some(status) => {
                        *self.by_status.entry(status as u16).or_default() += 1;
                        if status >= 500 {
                            let body = interaction["response"]["content"]["$base64"].as_str().unwrap_or_default();
                            let body = base64::engine::general_purpose::STANDARD.decode(body).unwrap_or_default();
                            let body = String::from_utf8_lossy(&body);
                            self.server_errors.push(format!("{described} -> {status} {}", short(&body)));
                        }
                    }
                    None => self.unanswered.push(described),
                }
            }
            for results in recorder["checks"].as_object().into_iter().flat_map(|m| m.values()) {
                for result in results.as_array().into_iter().flatten() {
                    let counts = self.checks.entry(result["name"].as_str().unwrap_or("?").to_string()).or_default();
                    match result["status"].as_str() {
                        Some("success") => counts.0 += 1,
                        Some("failure") => counts.1 += 1,
                        _ => {}
                    }
                }
            }
        }
    }
}

#[tokio::test]
async fn schemathesis_finds_no_server_error_and_nothing_the_spec_does_not_say() {
    let schemathesis = schemathesis();
    let db = TestDatabase::new();
    let (token, env) = credentials();
    let server = Process::start(&db.url, 0, &env);
    let work = tempfile::tempdir().unwrap();
    let served: Value = reqwest::get(format!("{}/openapi.json", server.base)).await.unwrap().json().await.unwrap();
    let document = work.path().join("openapi.closed.json");
    let strict = closed(served);
    assert_eq!(strict["components"]["schemas"]["Problem"]["additionalProperties"], json!(false));
    std::fs::write(&document, strict.to_string()).unwrap();

    let started = Instant::now();
    let mut runs = Vec::new();
    for (shard, selection) in ["--include-path-regex", "--exclude-path-regex"].into_iter().enumerate() {
        let report = work.path().join(format!("run-{shard}.ndjson"));
        let output = work.path().join(format!("output-{shard}.txt"));
        let log = std::fs::File::create(&output).unwrap();
        let mut run = tokio::process::Command::new(&schemathesis);
        run.arg("--config-file")
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fuzz/schemathesis.toml"))
            .arg("run")
            .arg(&document)
            .args(["--url", &server.base])
            .args([selection, SHARD])
            .args(["--checks", &CHECKS.join(",")])
            .args(["--max-examples", &MAX_EXAMPLES.to_string()])
            .args(["--header", &format!("Authorization: Bearer {token}")])
            // Above the server's own 30 s limit: a slow answer shows up as the server's 503, not as a client timeout.
            .args(["--request-timeout", "60"])
            // Timing-based: it would fail the run on a busy machine, not on a bad schema.
            .args(["--suppress-health-check", "too_slow"])
            .args(["--generation-database", "none"])
            .args(["--report", "ndjson", "--report-ndjson-path"])
            .arg(&report)
            .arg("--no-color")
            .current_dir(work.path())
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .kill_on_drop(true);
        runs.push((format!("{selection} {SHARD}"), run.spawn().expect("start schemathesis"), report, output));
    }
    let mut tally = Tally::default();
    let mut failed_runs = Vec::new();
    for (shard, mut run, report, output) in runs {
        let status = tokio::time::timeout(Duration::from_secs(20 * 60), run.wait())
            .await
            .expect("schemathesis finishes within 20 minutes")
            .expect("wait for schemathesis");
        println!("{}", std::fs::read_to_string(&output).unwrap_or_default());
        if !status.success() {
            failed_runs.push(format!("{shard}: {status}"));
        }
        tally.add(&report);
    }
    let elapsed = started.elapsed();

    println!(
        "schemathesis ({}): {} requests in {:.0} s ({:.0}/s); by phase {:?}; by status {:?}",
        db.mode(),
        tally.requests,
        elapsed.as_secs_f64(),
        tally.requests as f64 / elapsed.as_secs_f64(),
        tally.by_phase,
        tally.by_status
    );
    for (check, (passed, failed)) in &tally.checks {
        println!("  {check}: {passed} passed, {failed} failed");
    }
    assert!(tally.server_errors.is_empty(), "5xx answers:\n{}", tally.server_errors.join("\n"));
    assert!(tally.unanswered.is_empty(), "requests without an answer:\n{}", tally.unanswered.join("\n"));
    for check in CHECKS {
        let (passed, failed) = tally.checks.get(check).copied().unwrap_or_default();
        assert!(passed > 0, "the check {check} never ran");
        assert_eq!(failed, 0, "the check {check} failed; see schemathesis's output above");
    }
    assert!(failed_runs.is_empty(), "schemathesis reported failures or errors; see its output above: {failed_runs:?}");
    assert!(tally.requests >= MIN_REQUESTS, "only {} requests, at least {MIN_REQUESTS} wanted", tally.requests);

    let ready = reqwest::get(format!("{}/readyz", server.base)).await.expect("the server still answers");
    assert_eq!(ready.status(), 200, "the server is still ready after the run");
    server.assert_no_panic();
}

/// An answer read off the wire.
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Writes requests byte for byte on fresh connections, so that nothing on the
/// client side resolves `..`, decodes `%2F` or refuses a NUL: the server sees
/// exactly what an attacker would send.
struct Wire {
    addr: String,
    token: String,
}

impl Wire {
    async fn send(
        &self,
        method: &str,
        target: impl AsRef<[u8]>,
        headers: &[(&str, &[u8])],
        body: &[u8],
    ) -> Option<Answer> {
        let mut request = format!("{method} ").into_bytes();
        request.extend_from_slice(target.as_ref());
        request.extend_from_slice(
            format!(" HTTP/1.1\r\nhost: statehouse\r\nconnection: close\r\nauthorization: Bearer {}\r\n", self.token)
                .as_bytes(),
        );
        if !headers.iter().any(|(name, _)| name.eq_ignore_ascii_case("content-length")) {
            request.extend_from_slice(format!("content-length: {}\r\n", body.len()).as_bytes());
        }
        for (name, value) in headers {
            request.extend_from_slice(name.as_bytes());
            request.extend_from_slice(b": ");
            request.extend_from_slice(value);
            request.extend_from_slice(b"\r\n");
        }
        request.extend_from_slice(b"\r\n");
        request.extend_from_slice(body);
        self.exchange(&request).await
    }

    /// `None` when the server closed the connection without answering.
    async fn exchange(&self, request: &[u8]) -> Option<Answer> {
        let mut stream = TcpStream::connect(&self.addr).await.expect("connect to the server");
        // A server may answer and close before it has read all of an oversized request.
        let _ = stream.write_all(request).await;
        let mut raw = Vec::new();
        let read = stream.read_to_end(&mut raw);
        // A reset after the answer arrived loses nothing already read.
        let _ =
            tokio::time::timeout(Duration::from_secs(60), read).await.expect("the server answers or closes in 60 s");
        let end = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
        let head = String::from_utf8_lossy(&raw[..end]).into_owned();
        let mut lines = head.split("\r\n");
        let status = lines.next()?.split(' ').nth(1)?.parse().ok()?;
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        let mut body = raw[end + 4..].to_vec();
        if let Some(length) = headers.iter().find(|(n, _)| n == "content-length").and_then(|(_, v)| v.parse().ok()) {
            body.truncate(length);
        }
        Some(Answer { status, headers, body })
    }
}

/// The outcome of every hand-written case, so that one run lists every case the server gets wrong.
#[derive(Default)]
struct Verdicts {
    cases: usize,
    failures: Vec<String>,
}

impl Verdicts {
    fn fail(&mut self, case: &str, why: String) {
        self.failures.push(format!("{}: {}", short(case), short(&why)));
    }

    /// Refused by the application: a 4xx problem+json whose document agrees with the status.
    fn refused(&mut self, case: &str, answer: Option<Answer>) {
        self.cases += 1;
        let Some(answer) = answer else { return self.fail(case, "the connection closed without an answer".into()) };
        let problem = serde_json::from_slice::<Value>(&answer.body).unwrap_or(Value::Null);
        let is_problem = answer.header("content-type") == Some("application/problem+json")
            && problem["status"] == answer.status
            && problem["type"].as_str().is_some_and(|t| t.starts_with("https://statehouse.dev/problems/"));
        if !(400..500).contains(&answer.status) || !is_problem {
            self.fail(case, format!("{} {:?} {}", answer.status, answer.header("content-type"), answer.text()));
        }
    }

    /// Refused by the HTTP parser before any handler ran: a 4xx, or the connection closed.
    fn refused_by_http(&mut self, case: &str, answer: Option<Answer>) {
        self.cases += 1;
        if let Some(answer) = answer.filter(|a| !(400..500).contains(&a.status)) {
            self.fail(case, format!("{} {}", answer.status, answer.text()));
        }
    }

    /// Legal input: a 2xx, whose body is returned when it is `expected` (if given).
    fn accepted(&mut self, case: &str, answer: Option<Answer>, expected: Option<&[u8]>) -> Option<Vec<u8>> {
        self.cases += 1;
        let Some(answer) = answer else {
            self.fail(case, "the connection closed without an answer".into());
            return None;
        };
        if !(200..300).contains(&answer.status) {
            self.fail(case, format!("{} {}", answer.status, answer.text()));
            return None;
        }
        if expected.is_some_and(|e| e != answer.body) {
            self.fail(case, format!("answered {:?}, not {:?}", answer.text(), expected.map(String::from_utf8_lossy)));
            return None;
        }
        Some(answer.body)
    }
}

/// Everything a refused request could have changed in namespace `ns`.
async fn state_of(client: &reqwest::Client, base: &str, token: &str, ns: &str) -> Value {
    let mut state = json!({});
    for path in [format!("/v1/objects/{ns}"), format!("/v1/objects/{ns}/o/kv"), format!("/v1/objects/{ns}/o/blobs")] {
        let r = client.get(format!("{base}{path}")).bearer_auth(token).send().await.unwrap();
        assert_eq!(r.status(), 200, "{path}");
        state[path] = r.json().await.unwrap();
    }
    state
}

#[tokio::test]
async fn hostile_requests_are_refused_with_problems_and_change_nothing() {
    let db = TestDatabase::new();
    let (token, env) = credentials();
    let server = Process::start(&db.url, 0, &env);
    let client = reqwest::Client::new();
    let wire = Wire { addr: server.base.trim_start_matches("http://").to_string(), token: token.clone() };
    let ns = unique_ns("hostile");
    let o = format!("/v1/objects/{ns}/o");
    let mut verdicts = Verdicts::default();
    verdicts.accepted("seed key", wire.send("PUT", format!("{o}/kv/k"), &[], b"v").await, None);
    verdicts.accepted("seed blob", wire.send("PUT", format!("{o}/blobs/b"), &[], b"blob bytes").await, None);
    assert!(verdicts.failures.is_empty(), "{:?}", verdicts.failures);
    let before = state_of(&client, &server.base, &token, &ns).await;

    // Names that break the grammar: `..` and `.` segments, encoded slashes, NUL and
    // other control characters, invalid UTF-8 (bare bytes, overlong forms, surrogates), and lengths.
    let long_ns = "n".repeat(64);
    let long_id = "i".repeat(257);
    let long_key = "k".repeat(2049);
    let long_name = "b".repeat(1025);
    let bad_namespaces = ["..", ".", "%2E%2E", "a%2Fb", "a%00b", "%FF", "Upper", &long_ns];
    let bad_ids = ["..", ".", "%2E%2E", ".%2e", "a%2Fb", "%2F", "a%00b", "%00", "%FF%FE", "%C0%AF", &long_id];
    let bad_keys = ["%FF%FE", "%C0%AE%C0%AE", "%ED%A0%80", "a%FFb", &long_key];
    let bad_blob_names = [
        "..",
        ".",
        "../../etc/passwd",
        "..%2F..%2Fetc%2Fpasswd",
        "%2E%2E%2Fetc%2Fpasswd",
        "a/../b",
        "a/%2E%2E/b",
        "%2Fetc%2Fpasswd",
        "a//b",
        "a/./b",
        "a/",
        "a%00b",
        "%00",
        "a%0Ab",
        "a%1Fb",
        "%FF",
        "%C0%AF",
        &long_name,
    ];
    for bad in bad_namespaces {
        verdicts.refused(&format!("list ns {bad:?}"), wire.send("GET", format!("/v1/objects/{bad}"), &[], b"").await);
    }
    for (ns_part, id) in bad_namespaces.iter().map(|n| (*n, "o")).chain(bad_ids.iter().map(|i| (ns.as_str(), *i))) {
        let object = format!("/v1/objects/{ns_part}/{id}");
        for (method, path, body) in [
            ("GET", object.clone(), &b""[..]),
            ("DELETE", object.clone(), b""),
            ("PUT", format!("{object}/kv/k"), b"x"),
            ("GET", format!("{object}/kv/k"), b""),
            ("DELETE", format!("{object}/kv/k"), b""),
            ("GET", format!("{object}/kv"), b""),
            ("POST", format!("{object}/batch"), br#"{"ops":[{"op":"put","key":"k","value":1}]}"#),
            ("POST", format!("{object}/events"), br#"{"events":[{"type":"T"}]}"#),
            ("PUT", format!("{object}/blobs/b"), b"x"),
            ("GET", format!("{object}/blobs"), b""),
        ] {
            verdicts.refused(&format!("{method} {path}"), wire.send(method, &path, &[], body).await);
        }
    }
    for key in bad_keys {
        for (method, body) in [("PUT", &b"x"[..]), ("GET", b""), ("DELETE", b"")] {
            verdicts
                .refused(&format!("{method} key {key:?}"), wire.send(method, format!("{o}/kv/{key}"), &[], body).await);
        }
    }
    for name in bad_blob_names {
        for (method, path, body) in [
            ("PUT", format!("{o}/blobs/{name}"), &b"x"[..]),
            ("GET", format!("{o}/blobs/{name}"), b""),
            ("DELETE", format!("{o}/blobs/{name}"), b""),
            ("POST", format!("{o}/blobs/{name}/presign"), br#"{"method":"PUT"}"#),
            ("POST", format!("{o}/blobs/{name}/commit"), br#"{"upload_key":"x"}"#),
        ] {
            verdicts.refused(&format!("{method} {path}"), wire.send(method, &path, &[], body).await);
        }
    }

    // Headers: huge and negative entity-tags, bytes that are not ASCII, oversized metadata.
    let key = format!("{o}/kv/k");
    let blob = format!("{o}/blobs/b");
    let batch = format!("{o}/batch");
    let long_meta = "m".repeat(2000);
    let big_meta: Vec<(String, String)> =
        (0..40).map(|i| (format!("x-statehouse-meta-m{i}"), "v".repeat(250))).collect();
    let header_cases: Vec<HeaderCase> = vec![
        ("PUT", &key, vec![("if-match", b"\"99999999999999999999\"")]),
        ("PUT", &key, vec![("if-match", b"\"-1\"")]),
        ("PUT", &key, vec![("if-match", b"\"-99999999999999999999\"")]),
        ("PUT", &key, vec![("if-match", b"\"\xff\"")]),
        ("PUT", &key, vec![("if-none-match", b"1e400")]),
        ("PUT", &key, vec![("if-none-match", b" , ")]),
        ("DELETE", &key, vec![("if-match", b"\"0x1\"")]),
        ("GET", &key, vec![("if-match", b"\"18446744073709551616\"")]),
        ("PUT", &key, vec![("content-type", b"text/\xff")]),
        ("PUT", &key, vec![("content-type", b"nonsense")]),
        ("PUT", &blob, vec![("if-match", b"\"-1\"")]),
        ("PUT", &blob, vec![("x-statehouse-meta-a", long_meta.as_bytes())]),
        ("PUT", &blob, vec![("x-statehouse-meta-a", b"\xff")]),
        ("PUT", &blob, vec![("cache-control", b"\xfe\xff")]),
        ("PUT", &blob, vec![("x-statehouse-meta-", b"empty name")]),
        ("PUT", &blob, big_meta.iter().map(|(n, v)| (n.as_str(), v.as_bytes())).collect()),
        ("GET", &blob, vec![("range", b"bytes=18446744073709551615-")]),
        // Larger than any limit: refused on the announcement, before the body is read.
        ("PUT", &blob, vec![("content-length", b"9999999999999")]),
        ("PUT", &key, vec![("content-length", b"9999999999999")]),
        ("POST", &batch, vec![("content-length", b"9999999999999")]),
    ];
    for (method, path, headers) in header_cases {
        let (name, value) = headers[0];
        let case = format!("{method} {path} with {name}: {}", String::from_utf8_lossy(&value[..value.len().min(40)]));
        verdicts.refused(&case, wire.send(method, path, &headers, b"x").await);
    }

    // Bodies: nesting far past any parser's recursion limit, numbers out of every range.
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    let deep_object = format!("{}1{}", r#"{"a":"#.repeat(100_000), "}".repeat(100_000));
    let ops = |op: &str| format!(r#"{{"ops":[{op}]}}"#);
    let too_many_ops = format!(r#"{{"ops":[{}]}}"#, vec![r#"{"op":"get","key":"k"}"#; 129].join(","));
    let too_many_events = format!(r#"{{"events":[{}]}}"#, vec![r#"{"type":"T"}"#; 1001].join(","));
    let events = format!("{o}/events");
    let presign = format!("{o}/blobs/b/presign");
    let body_cases: Vec<(&str, String)> = vec![
        (&batch, ops(&format!(r#"{{"op":"put","key":"k","value":{deep}}}"#))),
        (&batch, ops(&format!(r#"{{"op":"put","key":"k","value":{deep_object}}}"#))),
        (&batch, deep.clone()),
        (&batch, ops(r#"{"op":"put","key":"k","value":1,"if_version":-1}"#)),
        (&batch, ops(r#"{"op":"put","key":"k","value":1,"if_version":0}"#)),
        (&batch, ops(r#"{"op":"put","key":"k","value":1,"if_version":9223372036854775808}"#)),
        (&batch, ops(r#"{"op":"put","key":"k","value":1,"if_version":-9223372036854775809}"#)),
        (&batch, ops(r#"{"op":"put","key":"k","value":1,"if_version":1e400}"#)),
        (&batch, ops(r#"{"op":"put","key":"k","value":1,"if_version":1.5}"#)),
        (&batch, ops(r#"{"op":"delete","key":"k","if_version":-9223372036854775808}"#)),
        (&batch, ops(r#"{"op":"put","key":"","value":1}"#)),
        (&batch, ops(&format!(r#"{{"op":"put","key":"{long_key}","value":1}}"#))),
        (&batch, ops(r#"{"op":"put","key":"k","value_base64":"%%%"}"#)),
        (&batch, ops(r#"{"op":"put","key":"k","value":1,"content_type":"x\u0000/y"}"#)),
        (&batch, r#"{"ops":[],"ops":[{"op":"get","key":"k"}]}"#.into()),
        (&batch, too_many_ops),
        (&batch, "{\"ops\":[{\"op\":\"get\",\"key\":\"\u{0}\u{0}".into()),
        (&events, format!(r#"{{"events":[{{"type":"T","data":{deep}}}]}}"#)),
        (&events, r#"{"events":[{"type":"a\u0000b"}]}"#.into()),
        (&events, r#"{"events":[{"type":"T","ts":"+275760-09-13T00:00:00Z"}]}"#.into()),
        (&events, r#"{"events":[{"type":"T","ts":"10000-01-01T00:00:00Z"}]}"#.into()),
        (&events, r#"{"events":[{"type":"T","ts":-1}]}"#.into()),
        (&events, too_many_events),
        (&presign, format!(r#"{{"method":"GET","expires_in":{deep}}}"#)),
        (&presign, r#"{"method":"GET","expires_in":-1}"#.into()),
        (&presign, r#"{"method":"GET","expires_in":0}"#.into()),
        (&presign, r#"{"method":"GET","expires_in":18446744073709551616}"#.into()),
        (&presign, r#"{"method":"GET","expires_in":1e400}"#.into()),
        (&presign, r#"{"method":"\u0000"}"#.into()),
    ];
    for (path, body) in &body_cases {
        let case = format!("POST {path} {}", &body[..body.len().min(120)]);
        verdicts.refused(&case, wire.send("POST", path, &[], body.as_bytes()).await);
    }
    let invalid_utf8 = [&br#"{"ops":[{"op":"get","key":""#[..], b"\xff\xfe", br#""}]}"#].concat();
    verdicts.refused("batch with invalid UTF-8", wire.send("POST", &batch, &[], &invalid_utf8).await);

    // Query strings: negative, zero, huge, fractional and non-numeric limits; bad booleans and cursors; long bounds.
    let lists = [format!("/v1/objects/{ns}"), format!("{o}/kv"), format!("{o}/blobs")];
    let long_bound = "p".repeat(3000);
    for list in &lists {
        for query in [
            "limit=-1",
            "limit=0",
            "limit=10001",
            "limit=-9223372036854775809",
            "limit=18446744073709551616",
            "limit=99999999999999999999999999999999999999",
            "limit=1e3",
            "limit=1.5",
            "limit=0x10",
            "limit=NaN",
            "limit=",
            "limit=%00",
            "limit=%FF",
            "limit=1&limit=2",
            "cursor=!!!",
            "cursor=%FF%FE",
            "cursor=AAAA",
            &format!("prefix={long_bound}"),
        ] {
            verdicts
                .refused(&format!("GET {list}?{query}"), wire.send("GET", format!("{list}?{query}"), &[], b"").await);
        }
    }
    for query in ["reverse=2", "reverse=%FF", "values=maybe", "cursor=cg", &format!("start={long_bound}")] {
        verdicts.refused(&format!("GET kv?{query}"), wire.send("GET", format!("{o}/kv?{query}"), &[], b"").await);
    }
    verdicts
        .refused("objects with prefix %2F", wire.send("GET", format!("/v1/objects/{ns}?prefix=%2F"), &[], b"").await);

    // Reads whose odd input is documented as ignored: a malformed or multi-part Range means the whole blob.
    for range in
        [&b"bytes=99999999999999999999999-"[..], b"bytes=-99999999999999999999", b"bytes=\xff-1", b"bytes=0-1,2-3"]
    {
        let case = format!("GET {blob} with range {}", String::from_utf8_lossy(range));
        verdicts.accepted(&case, wire.send("GET", &blob, &[("range", range)], b"").await, Some(b"blob bytes"));
    }

    // What the HTTP parser refuses before any handler runs: raw NUL, control and
    // non-ASCII bytes in the request line or headers, lengths no body can have, and 10 MB of headers.
    let ten_mb = vec![b'a'; 10 * 1024 * 1024];
    let many_headers: Vec<u8> = (0..10_000).flat_map(|i| format!("x-h{i}: v\r\n").into_bytes()).collect();
    let long_target = [format!("{o}/kv/").as_bytes(), &ten_mb[..]].concat();
    let raw_cases: Vec<(&str, Vec<u8>)> = vec![
        ("NUL in the path", [b"GET ", format!("{o}/kv/a").as_bytes(), b"\0b HTTP/1.1\r\nhost: s\r\n\r\n"].concat()),
        ("0xFF in the path", [b"GET ", format!("{o}/kv/a").as_bytes(), b"\xffb HTTP/1.1\r\nhost: s\r\n\r\n"].concat()),
        ("a space in the path", [b"GET ", format!("{o}/kv/a").as_bytes(), b" b HTTP/1.1\r\nhost: s\r\n\r\n"].concat()),
        ("NUL in a header", [b"GET ", key.as_bytes(), b" HTTP/1.1\r\nhost: s\r\nif-match: \"1\0\"\r\n\r\n"].concat()),
        ("CR in a header", [b"GET ", key.as_bytes(), b" HTTP/1.1\r\nhost: s\r\nif-match: a\rb\r\n\r\n"].concat()),
        ("a bad header name", [b"GET ", key.as_bytes(), b" HTTP/1.1\r\nhost: s\r\nx(y): 1\r\n\r\n"].concat()),
        (
            "a negative content-length",
            [b"PUT ", key.as_bytes(), b" HTTP/1.1\r\nhost: s\r\ncontent-length: -1\r\n\r\n"].concat(),
        ),
        (
            "content-length u64::MAX",
            [b"PUT ", blob.as_bytes(), b" HTTP/1.1\r\nhost: s\r\ncontent-length: 18446744073709551615\r\n\r\n"]
                .concat(),
        ),
        (
            "a content-length past u64",
            [b"PUT ", key.as_bytes(), b" HTTP/1.1\r\nhost: s\r\ncontent-length: 99999999999999999999999\r\n\r\n"]
                .concat(),
        ),
        (
            "a 10 MB header",
            [b"GET ", key.as_bytes(), b" HTTP/1.1\r\nhost: s\r\nx-big: ", &ten_mb[..], b"\r\n\r\n"].concat(),
        ),
        ("10,000 headers", [b"GET ", key.as_bytes(), b" HTTP/1.1\r\nhost: s\r\n", &many_headers[..], b"\r\n"].concat()),
        ("a 10 MB request target", [b"GET ", &long_target[..], b" HTTP/1.1\r\nhost: s\r\n\r\n"].concat()),
    ];
    for (case, request) in raw_cases {
        verdicts.refused_by_http(case, wire.exchange(&request).await);
        let health = client.get(format!("{}/healthz", server.base)).send().await;
        assert!(health.is_ok_and(|r| r.status() == 200), "the server no longer answers after {case}");
    }

    // Legal after all: keys may hold `..`, encoded slashes, NUL and any UTF-8; blob
    // names may hold encoded slashes and any printable UTF-8; ids may hold `~`. Each round-trips exactly.
    let legal = format!("/v1/objects/{}/legal", unique_ns("hostile-legal"));
    let legal_keys = [
        ("..", ".."),
        ("../../etc/passwd", "../../etc/passwd"),
        ("%2E%2E%2Fx", "../x"),
        ("a%2Fb", "a/b"),
        ("%2F", "/"),
        ("a%00b", "a\0b"),
        ("%F0%9F%92%A3", "\u{1F4A3}"),
        ("%E2%80%AE", "\u{202E}"),
    ];
    for (wire_key, decoded) in legal_keys {
        let path = format!("{legal}/kv/{wire_key}");
        verdicts.accepted(&format!("PUT {path}"), wire.send("PUT", &path, &[], decoded.as_bytes()).await, None);
        verdicts.accepted(&format!("GET {path}"), wire.send("GET", &path, &[], b"").await, Some(decoded.as_bytes()));
    }
    let listed = verdicts.accepted(
        "list the legal keys",
        wire.send("GET", format!("{legal}/kv?values=false"), &[], b"").await,
        None,
    );
    let listed: Value = serde_json::from_slice(&listed.unwrap_or_default()).unwrap_or_default();
    let keys: Vec<&str> = listed["items"].as_array().into_iter().flatten().filter_map(|i| i["key"].as_str()).collect();
    let mut expected: Vec<&str> = legal_keys.iter().map(|(_, decoded)| *decoded).collect();
    expected.sort();
    if keys != expected {
        verdicts.fail("list the legal keys", format!("listed {keys:?}, stored {expected:?}"));
    }

    // Names at the length limits: a 256-byte segment, 1023 bytes in four segments, a 256-byte id.
    let long_segment = "s".repeat(256);
    let four_segments = vec!["f".repeat(255); 4].join("/");
    let legal_ns = unique_ns("hostile-legal");
    let tilde_id = format!("/v1/objects/{legal_ns}/a~b");
    let longest_id = format!("/v1/objects/{legal_ns}/{}", "i".repeat(256));
    let legal_blobs = [
        (legal.as_str(), "a%2Fb", "a/b"),
        (&legal, "..a/b..", "..a/b.."),
        (&legal, "r%C3%A9sum%C3%A9.pdf", "r\u{e9}sum\u{e9}.pdf"),
        (&legal, "a%23b%25c", "a#b%c"),
        (&legal, &long_segment, &long_segment),
        (&legal, &four_segments, &four_segments),
        (&tilde_id, "x", "x"),
        (&longest_id, "x", "x"),
    ];
    for (object, wire_name, decoded) in legal_blobs {
        let path = format!("{object}/blobs/{wire_name}");
        verdicts.accepted(&format!("PUT {path}"), wire.send("PUT", &path, &[], decoded.as_bytes()).await, None);
        verdicts.accepted(&format!("GET {path}"), wire.send("GET", &path, &[], b"").await, Some(decoded.as_bytes()));
    }

    // A JSON value nested too deeply to parse is kept as it came and listed as text.
    let nested = format!("{legal}/kv/nested");
    verdicts.accepted(
        "PUT deep JSON",
        wire.send("PUT", &nested, &[("content-type", b"application/json")], deep.as_bytes()).await,
        None,
    );
    let listed = verdicts.accepted(
        "list deep JSON",
        wire.send("GET", format!("{legal}/kv?prefix=nested"), &[], b"").await,
        None,
    );
    let listed: Value = serde_json::from_slice(&listed.unwrap_or_default()).unwrap_or_default();
    if listed["items"][0]["value"] != deep.as_str() {
        verdicts.fail("list deep JSON", format!("listed {:.200}", listed.to_string()));
    }

    // Events at the ends of the RFC 3339 range are legal and must not trip the exporter.
    let edges =
        br#"{"events":[{"type":"T","ts":"0000-01-01T00:00:00Z"},{"type":"T","ts":"9999-12-31T23:59:59.999999Z"}]}"#;
    verdicts.accepted(
        "events at the ends of time",
        wire.send("POST", format!("{legal}/events"), &[], edges).await,
        None,
    );
    verdicts.accepted("export them", wire.send("POST", "/v1/admin/export", &[], b"").await, None);

    let after = state_of(&client, &server.base, &token, &ns).await;
    if after != before {
        verdicts.fail("refused requests changed nothing", format!("before {before}\nafter {after}"));
    }
    server.assert_no_panic();
    println!("{} hand-written cases, {} wrong", verdicts.cases, verdicts.failures.len());
    assert!(verdicts.failures.is_empty(), "wrong answers:\n{}", verdicts.failures.join("\n"));
}
