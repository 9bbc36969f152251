//! Access control, black-box: bearer tokens and JWTs scoped to namespaces and
//! rights, every OpenAPI operation checked across namespaces, signed
//! replica-to-replica forwarding, rate limits, connection limits, CORS, and
//! the start-up rules that keep an unauthenticated server off the network.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{spawn_app_with, token, unique_ns, with_tokens, Process, TestApp, TestDatabase, Token, PEER_SECRET};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use statehouse::auth::{hash_token, new_token};

const HS256_SECRET: &str = "hs256-secret-for-tests-0123456789abcdef";
const AUDIENCE: &str = "statehouse-test";
const ISSUER: &str = "https://issuer.test";

fn bearer(secret: &str) -> String {
    format!("Bearer {secret}")
}

async fn send(app: &TestApp, method: Method, path: &str, auth: Option<&str>, body: &str) -> reqwest::Response {
    let mut request = app.client.request(method, app.url(path)).body(body.to_string());
    if let Some(secret) = auth {
        request = request.header("authorization", bearer(secret));
    }
    request.send().await.unwrap()
}

async fn problem(response: reqwest::Response, status: u16) -> Value {
    assert_eq!(response.status().as_u16(), status);
    assert_eq!(response.headers()["content-type"], "application/problem+json");
    response.json().await.unwrap()
}

#[tokio::test]
async fn tokens_grant_rights_on_namespace_patterns_only() {
    let db = TestDatabase::new();
    let writer = token("writer", "a.*", "read,write");
    let reader = token("reader", "a.*,shared", "read");
    let admin = token("ops", "*", "read,write,admin");
    let app = spawn_app_with(&db, |s| with_tokens(s, &[&writer, &reader, &admin])).await;
    let a = format!("a.{}", unique_ns("x"));
    let key = format!("/v1/objects/{a}/o/kv/k");

    // No credential, a wrong one, another scheme: 401 with a challenge, nothing written.
    for auth in [None, Some("Bearer wrong"), Some("Basic d3JpdGVyOng="), Some("Bearer "), Some("bearer")] {
        let mut request = app.client.put(app.url(&key)).body("v");
        if let Some(value) = auth {
            request = request.header("authorization", value);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.headers()["www-authenticate"], "Bearer realm=\"statehouse\"", "{auth:?}");
        let body = problem(response, 401).await;
        assert_eq!(body["type"], "https://statehouse.dev/problems/unauthorized");
    }
    assert_eq!(send(&app, Method::GET, &key, Some(&admin.secret), "").await.status(), 404);

    assert_eq!(send(&app, Method::PUT, &key, Some(&writer.secret), "v1").await.status(), 200);
    assert_eq!(send(&app, Method::GET, &key, Some(&reader.secret), "").await.text().await.unwrap(), "v1");
    let denied = problem(send(&app, Method::PUT, &key, Some(&reader.secret), "v2").await, 403).await;
    assert!(denied["detail"].as_str().unwrap().contains("\"reader\" is not granted write"), "{denied}");
    let b = unique_ns("b");
    problem(send(&app, Method::PUT, &format!("/v1/objects/{b}/o/kv/k"), Some(&writer.secret), "v").await, 403).await;
    problem(send(&app, Method::GET, &format!("/v1/objects/{b}"), Some(&reader.secret), "").await, 403).await;
    // `a.*` is a prefix: `a` itself, and `ab`, are other namespaces.
    problem(send(&app, Method::GET, "/v1/objects/a", Some(&writer.secret), "").await, 403).await;
    problem(send(&app, Method::GET, "/v1/objects/ab", Some(&writer.secret), "").await, 403).await;
    assert_eq!(send(&app, Method::GET, "/v1/objects/shared", Some(&reader.secret), "").await.status(), 200);
    // Refused writes changed nothing.
    assert_eq!(send(&app, Method::GET, &key, Some(&admin.secret), "").await.text().await.unwrap(), "v1");
    let listed: Value =
        send(&app, Method::GET, &format!("/v1/objects/{b}"), Some(&admin.secret), "").await.json().await.unwrap();
    assert_eq!(listed["items"], json!([]));

    // Server-wide routes need admin; health, readiness and the API description are open.
    for path in ["/metrics", "/v1/analytics/tables"] {
        problem(send(&app, Method::GET, path, Some(&writer.secret), "").await, 403).await;
        problem(send(&app, Method::GET, path, None, "").await, 401).await;
        assert_eq!(send(&app, Method::GET, path, Some(&admin.secret), "").await.status(), 200, "{path}");
    }
    problem(send(&app, Method::POST, "/v1/admin/export", Some(&writer.secret), "").await, 403).await;
    for path in ["/healthz", "/readyz", "/openapi.json"] {
        assert_eq!(send(&app, Method::GET, path, None, "").await.status(), 200, "{path}");
    }
    let metrics = send(&app, Method::GET, "/metrics", Some(&admin.secret), "").await.text().await.unwrap();
    assert!(metrics.contains("statehouse_access_refused_total{reason=\"forbidden\"}"), "{metrics}");
    assert!(metrics.contains("statehouse_access_refused_total{reason=\"unknown_token\"}"));
    app.stop().await;
}

/// Path parameters for an OpenAPI path template.
fn fill(template: &str, ns: &str) -> String {
    template
        .replace("{ns}", ns)
        .replace("{id}", "o")
        .replace("{key}", "k")
        .replace("{name}", "f")
        // The Iceberg catalog's: warehouse, namespace and table.
        .replace("{prefix}", "statehouse")
        .replace("{namespace}", "statehouse")
        .replace("{table}", "events")
}

/// A refusal in the Iceberg REST catalog's error model (HEAD answers carry no body).
async fn iceberg_refusal(response: reqwest::Response, method: &Method, status: u16) {
    assert_eq!(response.status().as_u16(), status);
    if method != Method::HEAD {
        assert_eq!(response.headers()["content-type"], "application/json");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"]["code"], status, "{body}");
    }
}

#[tokio::test]
async fn every_operation_refuses_other_namespaces_and_non_admins() {
    let db = TestDatabase::new();
    let scoped = token("scoped", "a.*", "read,write");
    let admin = token("ops", "*", "admin");
    let everything = token("all", "*", "read");
    let analyst = token("analyst", "*", "analytics");
    let app = spawn_app_with(&db, |s| with_tokens(s, &[&scoped, &admin, &everything, &analyst])).await;
    let spec: Value = app.client.get(app.url("/openapi.json")).send().await.unwrap().json().await.unwrap();
    let own = format!("a.{}", unique_ns("own"));
    let other = unique_ns("b");
    let mut checked = 0;
    for (template, operations) in spec["paths"].as_object().unwrap() {
        for method in operations.as_object().unwrap().keys() {
            let method = Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
            let need = statehouse::http::need(&method, template)
                .unwrap_or_else(|| panic!("{method} {template} has no access rule"));
            let body = "{}";
            match need {
                statehouse::http::Need::Nothing => {
                    let status = send(&app, method.clone(), template, None, body).await.status();
                    assert!(status.is_success(), "{method} {template} is open: {status}");
                }
                statehouse::http::Need::Namespace(_) => {
                    let theirs = fill(template, &other);
                    problem(send(&app, method.clone(), &theirs, Some(&scoped.secret), body).await, 403).await;
                    problem(send(&app, method.clone(), &theirs, Some(&admin.secret), body).await, 403).await;
                    problem(send(&app, method.clone(), &fill(template, &own), None, body).await, 401).await;
                    let status =
                        send(&app, method.clone(), &fill(template, &own), Some(&scoped.secret), body).await.status();
                    assert!(
                        status != StatusCode::UNAUTHORIZED
                            && status != StatusCode::FORBIDDEN
                            && !status.is_server_error(),
                        "{method} {template} in its own namespace: {status}"
                    );
                }
                statehouse::http::Need::Admin => {
                    problem(send(&app, method.clone(), template, Some(&scoped.secret), body).await, 403).await;
                    problem(send(&app, method.clone(), template, None, body).await, 401).await;
                    let status = send(&app, method.clone(), template, Some(&admin.secret), body).await.status();
                    assert!(status.is_success(), "{method} {template} as admin: {status}");
                }
                statehouse::http::Need::Analytics => {
                    let path = fill(template, &own);
                    let refuse = |response, status| iceberg_refusal(response, &method, status);
                    if template.starts_with("/iceberg/") {
                        refuse(send(&app, method.clone(), &path, Some(&everything.secret), body).await, 403).await;
                        refuse(send(&app, method.clone(), &path, None, body).await, 401).await;
                    } else {
                        problem(send(&app, method.clone(), &path, Some(&everything.secret), body).await, 403).await;
                        problem(send(&app, method.clone(), &path, None, body).await, 401).await;
                    }
                    for granted in [&analyst, &admin] {
                        let status = send(&app, method.clone(), &path, Some(&granted.secret), body).await.status();
                        assert!(
                            status != StatusCode::UNAUTHORIZED
                                && status != StatusCode::FORBIDDEN
                                && !status.is_server_error(),
                            "{method} {template} with analytics or admin: {status}"
                        );
                    }
                }
                statehouse::http::Need::Peer(_) => {
                    panic!("{template} is internal and must not be in the OpenAPI document")
                }
            }
            checked += 1;
        }
    }
    println!("access: {checked} operations checked across namespaces");
    assert!(checked >= 19, "the OpenAPI document lists only {checked} operations");
    // Nothing of `other` was created by the refused requests.
    let listed: Value = send(&app, Method::GET, &format!("/v1/objects/{other}"), Some(&everything.secret), "")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(listed["items"], json!([]));

    // The peer-only route is not there for clients, and a forged peer mark is refused.
    let internal = format!("/v1/internal/objects/{own}/o/blob-commit");
    problem(send(&app, Method::POST, &internal, Some(&scoped.secret), "{}").await, 404).await;
    let forged = app
        .client
        .post(app.url(&internal))
        .header("authorization", bearer(&scoped.secret))
        .header("statehouse-forwarded-by", "someone")
        .body("{}")
        .send()
        .await
        .unwrap();
    let body = problem(forged, 401).await;
    assert!(body["detail"].as_str().unwrap().contains("no peer signature"), "{body}");
    app.stop().await;
}

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(format!("{}/tests/fixtures/jwt/{name}", env!("CARGO_MANIFEST_DIR"))).unwrap()
}

fn now_secs() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64
}

/// Claims granting `rights` on `namespaces`, valid for an hour; `edit` changes them.
fn claims(namespaces: &[&str], rights: &[&str], edit: impl FnOnce(&mut Value)) -> Value {
    let mut claims = json!({
        "sub": "user-42", "aud": AUDIENCE, "iss": ISSUER, "exp": now_secs() + 3600, "nbf": now_secs() - 10,
        "statehouse": {"namespaces": namespaces, "rights": rights}
    });
    edit(&mut claims);
    claims
}

fn sign(alg: Algorithm, kid: Option<&str>, key: &EncodingKey, claims: &Value) -> String {
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_string);
    jsonwebtoken::encode(&header, claims, key).unwrap()
}

#[tokio::test]
async fn jwts_are_verified_by_algorithm_key_time_audience_and_issuer() {
    let db = TestDatabase::new();
    let dir = tempfile::tempdir().unwrap();
    let jwks = dir.path().join("jwks.json");
    std::fs::write(&jwks, fixture("jwks.json")).unwrap();
    let app = spawn_app_with(&db, |s| {
        s.access.jwt_hs256_secret = Some(HS256_SECRET.into());
        s.access.jwt_jwks_file = Some(jwks.clone());
        s.access.jwt_audience = Some(AUDIENCE.into());
        s.access.jwt_issuer = Some(ISSUER.into());
        s.access.peer_secret = Some(PEER_SECRET.into());
    })
    .await;
    let hs = EncodingKey::from_secret(HS256_SECRET.as_bytes());
    let rsa = EncodingKey::from_rsa_pem(&fixture("rsa.pem")).unwrap();
    let ec = EncodingKey::from_ec_pem(&fixture("ec.pem")).unwrap();
    let a = format!("a.{}", unique_ns("jwt"));
    let key = format!("/v1/objects/{a}/o/kv/k");
    let writer = claims(&["a.*"], &["read", "write"], |_| {});

    for (label, jwt) in [
        ("HS256", sign(Algorithm::HS256, None, &hs, &writer)),
        ("RS256", sign(Algorithm::RS256, Some("rsa-1"), &rsa, &writer)),
        ("ES256", sign(Algorithm::ES256, Some("ec-1"), &ec, &writer)),
        // One key of its kind: the kid may be left out.
        ("RS256 without kid", sign(Algorithm::RS256, None, &rsa, &writer)),
    ] {
        assert_eq!(send(&app, Method::PUT, &key, Some(&jwt), label).await.status(), 200, "{label}");
        problem(send(&app, Method::PUT, "/v1/objects/b/o/kv/k", Some(&jwt), "x").await, 403).await;
    }

    let other_secret = EncodingKey::from_secret(b"another-secret-that-is-long-enough-0123");
    let expired = claims(&["a.*"], &["write"], |c| c["exp"] = json!(now_secs() - 120));
    let early = claims(&["a.*"], &["write"], |c| c["nbf"] = json!(now_secs() + 120));
    let foreign_aud = claims(&["a.*"], &["write"], |c| c["aud"] = json!("another-service"));
    let foreign_iss = claims(&["a.*"], &["write"], |c| c["iss"] = json!("https://elsewhere.test"));
    let no_exp = claims(&["a.*"], &["write"], |c| {
        c.as_object_mut().unwrap().remove("exp");
    });
    let bad_grant = claims(&["A B"], &["write"], |_| {});
    // An HS256 token keyed with the RSA public modulus: the classic algorithm confusion.
    let jwks_doc: Value = serde_json::from_slice(&fixture("jwks.json")).unwrap();
    let public_as_secret = EncodingKey::from_secret(jwks_doc["keys"][0]["n"].as_str().unwrap().as_bytes());
    let unsigned =
        format!("{}.{}.", base64_url(br#"{"alg":"none","typ":"JWT"}"#), base64_url(writer.to_string().as_bytes()));
    for (label, jwt, why) in [
        ("expired", sign(Algorithm::HS256, None, &hs, &expired), "expired"),
        ("not yet valid", sign(Algorithm::HS256, None, &hs, &early), "not valid yet"),
        ("other audience", sign(Algorithm::HS256, None, &hs, &foreign_aud), "aud"),
        ("other issuer", sign(Algorithm::HS256, None, &hs, &foreign_iss), "iss"),
        ("no exp", sign(Algorithm::HS256, None, &hs, &no_exp), "exp"),
        ("other secret", sign(Algorithm::HS256, None, &other_secret, &writer), "signature"),
        ("unknown kid", sign(Algorithm::RS256, Some("rsa-9"), &rsa, &writer), "kid"),
        ("RS256 key claimed as ES256 kid", sign(Algorithm::RS256, Some("ec-1"), &rsa, &writer), "kid"),
        ("public key as HS256 secret", sign(Algorithm::HS256, Some("rsa-1"), &public_as_secret, &writer), "signature"),
        ("alg none", unsigned, "refused"),
        ("bad grant", sign(Algorithm::HS256, None, &hs, &bad_grant), "namespace pattern"),
    ] {
        let body = problem(send(&app, Method::PUT, &key, Some(&jwt), label).await, 401).await;
        let detail = body["detail"].as_str().unwrap();
        assert!(detail.contains(why) || detail.contains("malformed"), "{label}: {detail}");
        assert!(!detail.contains(&jwt[..20]), "{label}: the error quotes the token");
    }
    // A valid token without grants authenticates but may do nothing.
    let no_grants = claims(&[], &[], |c| {
        c.as_object_mut().unwrap().remove("statehouse");
    });
    problem(send(&app, Method::GET, &key, Some(&sign(Algorithm::HS256, None, &hs, &no_grants)), "").await, 403).await;
    let value = send(&app, Method::GET, &key, Some(&sign(Algorithm::ES256, Some("ec-1"), &ec, &writer)), "").await;
    assert_eq!(value.text().await.unwrap(), "RS256 without kid", "only the accepted writes landed");
    app.stop().await;
}

fn base64_url(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

#[tokio::test]
async fn forwarded_writes_are_signed_and_act_as_the_caller() {
    let db = TestDatabase::new();
    let writer = token("writer", "a.*", "read,write");
    let reader = token("reader", "a.*", "read");
    let owner = spawn_app_with(&db, |s| with_tokens(s, &[&writer, &reader])).await;
    let other = spawn_app_with(&db, |s| with_tokens(s, &[&writer, &reader])).await;
    let a = format!("a.{}", unique_ns("fwd"));
    let key = format!("/v1/objects/{a}/o/kv/k");
    assert_eq!(send(&owner, Method::PUT, &key, Some(&writer.secret), "first").await.status(), 200);

    // Through the replica that does not own the object: forwarded, signed, accepted.
    let response = send(&other, Method::PUT, &key, Some(&writer.secret), "second").await;
    assert_eq!(response.status(), 200);
    assert!(response.headers().contains_key("statehouse-via"), "the write was forwarded");
    let blob = other
        .client
        .put(other.url(&format!("/v1/objects/{a}/o/blobs/photo")))
        .header("authorization", bearer(&writer.secret))
        .body(vec![7u8; 100_000])
        .send()
        .await
        .unwrap();
    assert_eq!(blob.status(), 200, "a blob commit is forwarded to the owner");
    // The caller's own rights decide, wherever the request arrives.
    problem(send(&other, Method::PUT, &key, Some(&reader.secret), "third").await, 403).await;

    // Straight to the owner, pretending to be a peer: refused without a valid signature.
    let forge = |signature: Option<&str>, body: &'static str| {
        let mut request = owner
            .client
            .put(owner.url(&key))
            .header("authorization", bearer(&writer.secret))
            .header("statehouse-forwarded-by", "mallory")
            .body(body);
        if let Some(signature) = signature {
            request = request.header("statehouse-peer-signature", signature.to_string());
        }
        request.send()
    };
    problem(forge(None, "forged").await.unwrap(), 401).await;
    let stale = format!("t={},v1={}", statehouse::clock::now_ms() - 120_000, "00".repeat(32));
    let body = problem(forge(Some(&stale), "forged").await.unwrap(), 401).await;
    assert!(body["detail"].as_str().unwrap().contains("too old"), "{body}");
    let wrong = format!("t={},v1={}", statehouse::clock::now_ms(), "00".repeat(32));
    let body = problem(forge(Some(&wrong), "forged").await.unwrap(), 401).await;
    assert!(body["detail"].as_str().unwrap().contains("does not verify"), "{body}");
    // A real signature lifted onto another body.
    let key_of_peers = statehouse::auth::PeerKey::from_secret(PEER_SECRET).unwrap();
    let path = format!("/v1/objects/{a}/o/kv/k");
    let auth_header = bearer(&writer.secret);
    let signed = statehouse::auth::Signed {
        method: &Method::PUT,
        path_and_query: &path,
        forwarded_by: "mallory",
        authorization: Some(auth_header.as_bytes()),
        body: b"signed",
    };
    let signature = key_of_peers.sign(&signed, statehouse::clock::now_ms());
    problem(forge(Some(signature.to_str().unwrap()), "forged").await.unwrap(), 401).await;
    assert_eq!(forge(Some(signature.to_str().unwrap()), "signed").await.unwrap().status(), 200, "the genuine one");

    // A replica with another peer secret cannot get its forwarded writes applied.
    let stranger = spawn_app_with(&db, |s| {
        with_tokens(s, &[&writer]);
        s.access.peer_secret = Some("a-different-peer-secret-0123456789abcdef".into());
    })
    .await;
    let refused = send(&stranger, Method::PUT, &key, Some(&writer.secret), "stranger").await;
    assert_eq!(refused.status(), 401);
    let stored = send(&owner, Method::GET, &key, Some(&reader.secret), "").await.text().await.unwrap();
    assert_eq!(stored, "signed");
    stranger.stop().await;
    other.stop().await;
    owner.stop().await;
}

#[tokio::test]
async fn rate_limits_answer_429_with_retry_after() {
    let db = TestDatabase::new();
    let secret = new_token();
    let limited = Token { line: format!("limited {} * read,write rate=2/2", hash_token(&secret)), secret };
    let other = token("other", "*", "read");
    let app = spawn_app_with(&db, |s| {
        with_tokens(s, &[&limited, &other]);
        s.access.rate_limit_per_sec = 1000;
    })
    .await;
    let path = format!("/v1/objects/{}", unique_ns("rate"));
    let mut statuses = Vec::new();
    for _ in 0..4 {
        let response = send(&app, Method::GET, &path, Some(&limited.secret), "").await;
        if response.status() == 429 {
            let retry: u64 = response.headers()["retry-after"].to_str().unwrap().parse().unwrap();
            assert_eq!(retry, 1, "half a second to the next token, rounded up");
        }
        statuses.push(response.status().as_u16());
    }
    assert_eq!(statuses, [200, 200, 429, 429], "a burst of 2, then refused");
    assert_eq!(send(&app, Method::GET, &path, Some(&other.secret), "").await.status(), 200, "buckets are per caller");
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(send(&app, Method::GET, &path, Some(&limited.secret), "").await.status(), 200, "refilled at 2/s");
    app.stop().await;
}

// Blocking sockets in the test: the server needs threads of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_limit_wait_for_a_free_slot() {
    let db = TestDatabase::new();
    let mut app = spawn_app_with(&db, |s| s.access.max_connections = 2).await;
    // The readiness probe's pooled connection would hold a slot: close it.
    app.client = reqwest::Client::new();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let ask = |stream: &mut TcpStream| {
        stream.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n").unwrap();
    };
    let answered = |stream: &mut TcpStream, wait: Duration| -> bool {
        stream.set_read_timeout(Some(wait)).unwrap();
        let mut buf = [0u8; 512];
        matches!(stream.read(&mut buf), Ok(n) if n > 0 && buf.starts_with(b"HTTP/1.1 200"))
    };
    let mut first = TcpStream::connect(app.addr).unwrap();
    let mut second = TcpStream::connect(app.addr).unwrap();
    ask(&mut first);
    ask(&mut second);
    assert!(answered(&mut first, Duration::from_secs(5)));
    assert!(answered(&mut second, Duration::from_secs(5)));
    let mut third = TcpStream::connect(app.addr).unwrap();
    ask(&mut third);
    assert!(!answered(&mut third, Duration::from_millis(700)), "a third connection is not served while two are open");
    drop(first);
    let started = Instant::now();
    assert!(answered(&mut third, Duration::from_secs(5)), "served once a slot is free");
    println!("access: third connection served {:?} after the first closed", started.elapsed());
    app.stop().await;
}

#[tokio::test]
async fn cors_is_off_unless_origins_are_configured() {
    let db = TestDatabase::new();
    let preflight = |app: &TestApp, origin: &str| {
        app.client
            .request(Method::OPTIONS, app.url("/v1/objects/a/o/kv/k"))
            .header("origin", origin)
            .header("access-control-request-method", "PUT")
            .header("access-control-request-headers", "authorization,x-statehouse-meta-colour")
            .send()
    };
    let off = spawn_app_with(&db, |_| {}).await;
    let response = preflight(&off, "https://app.example.com").await.unwrap();
    assert!(response.headers().get("access-control-allow-origin").is_none());
    off.stop().await;

    let writer = token("writer", "*", "read,write");
    let on = spawn_app_with(&db, |s| {
        with_tokens(s, &[&writer]);
        s.access.cors_origins = Some("https://app.example.com,http://localhost:3000".into());
    })
    .await;
    let response = preflight(&on, "https://app.example.com").await.unwrap();
    assert!(response.status().is_success(), "a preflight needs no credentials: {}", response.status());
    assert_eq!(response.headers()["access-control-allow-origin"], "https://app.example.com");
    let allowed = response.headers()["access-control-allow-headers"].to_str().unwrap().to_lowercase();
    assert!(allowed.contains("authorization") && allowed.contains("x-statehouse-meta-colour"), "{allowed}");
    let response = preflight(&on, "https://evil.example.com").await.unwrap();
    assert!(response.headers().get("access-control-allow-origin").is_none());
    // Answers (refusals included) carry the headers a browser needs to read them.
    let refused =
        on.client.get(on.url("/v1/objects/a")).header("origin", "https://app.example.com").send().await.unwrap();
    assert_eq!(refused.status(), 401);
    assert_eq!(refused.headers()["access-control-allow-origin"], "https://app.example.com");
    on.stop().await;
}

fn statehouse(env: &[(&str, &str)]) -> std::process::Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_statehouse"));
    cmd.env_clear().env("PATH", std::env::var("PATH").unwrap_or_default()).arg("serve");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run statehouse")
}

#[test]
fn without_credentials_the_server_stays_on_loopback() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("file:{}/s.db", dir.path().display());
    let objects = dir.path().join("objects");
    let base =
        [("TURSO_URL", db.as_str()), ("STATEHOUSE_OBJECTS_DIR", objects.to_str().unwrap()), ("STATEHOUSE_LOG", "warn")];
    let line = token("t", "*", "read").line;
    let cases: [(&[(&str, &str)], &str); 6] = [
        (&[("STATEHOUSE_LISTEN", "0.0.0.0:0")], "refusing to serve 0.0.0.0:"),
        (&[("STATEHOUSE_LISTEN", "127.0.0.1:0"), ("STATEHOUSE_AUTH_TOKENS", &line)], "set STATEHOUSE_PEER_SECRET"),
        (
            &[
                ("STATEHOUSE_LISTEN", "127.0.0.1:0"),
                ("STATEHOUSE_AUTH_TOKENS", &line),
                ("STATEHOUSE_PEER_SECRET", "short"),
            ],
            "STATEHOUSE_PEER_SECRET must be at least 32 bytes",
        ),
        (&[("STATEHOUSE_AUTH_TOKENS", "t plaintext * read")], "STATEHOUSE_AUTH_TOKENS, entry 1"),
        (&[("STATEHOUSE_JWT_HS256_SECRET", HS256_SECRET)], "STATEHOUSE_JWT_AUDIENCE and STATEHOUSE_JWT_ISSUER"),
        (&[("STATEHOUSE_AUTH_FILE", "/nonexistent/tokens")], "cannot read STATEHOUSE_AUTH_FILE=/nonexistent/tokens"),
    ];
    for (env, expected) in cases {
        let out = statehouse(&[&base[..], env].concat());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{env:?}: {stderr}");
        assert!(stderr.contains(expected), "{env:?}: expected {expected:?} in {stderr}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
        assert!(!stderr.contains(HS256_SECRET), "{stderr}");
    }
}

#[test]
fn insecure_mode_and_development_mode_say_so_loudly() {
    let db = TestDatabase::new();
    let insecure = Process::start(&db.url, 0, &[("STATEHOUSE_INSECURE", "true".into())]);
    assert!(insecure.log().contains("DEVELOPMENT MODE"), "{}", insecure.log());
    drop(insecure);
    let wide = {
        let dir = tempfile::tempdir().unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_statehouse"));
        cmd.env_clear()
            .env("TURSO_URL", &db.url)
            .env("STATEHOUSE_OBJECTS_DIR", dir.path())
            .env("STATEHOUSE_OBJECTS_DIR_SHARED", "true")
            .env("STATEHOUSE_LISTEN", "0.0.0.0:0")
            .env("STATEHOUSE_INSECURE", "true")
            .env("STATEHOUSE_ADVERTISE_URL", "http://127.0.0.1:1")
            .stderr(std::process::Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        std::thread::sleep(Duration::from_secs(2));
        let _ = child.kill();
        let out = child.wait_with_output().unwrap();
        String::from_utf8_lossy(&out.stderr).to_string()
    };
    assert!(wide.contains("DEVELOPMENT MODE") && wide.contains("listening"), "{wide}");
}

#[tokio::test]
async fn secrets_never_appear_in_logs_errors_or_metrics() {
    let db = TestDatabase::new();
    let admin = token("ops", "*", "read,write,admin");
    let server = Process::start(
        &db.url,
        0,
        &[
            ("STATEHOUSE_AUTH_TOKENS", admin.line.clone()),
            ("STATEHOUSE_PEER_SECRET", PEER_SECRET.into()),
            ("STATEHOUSE_JWT_HS256_SECRET", HS256_SECRET.into()),
            ("STATEHOUSE_JWT_AUDIENCE", AUDIENCE.into()),
            ("STATEHOUSE_JWT_ISSUER", ISSUER.into()),
            ("STATEHOUSE_LOG", "debug".into()),
        ],
    );
    let client = reqwest::Client::new();
    let hs = EncodingKey::from_secret(HS256_SECRET.as_bytes());
    let expired = sign(Algorithm::HS256, None, &hs, &claims(&["*"], &["read"], |c| c["exp"] = json!(1)));
    let near_miss = format!("{}x", admin.secret);
    let mut bodies = String::new();
    for credential in [admin.secret.as_str(), near_miss.as_str(), expired.as_str(), PEER_SECRET] {
        for path in ["/v1/objects/ns/o/kv/k", "/metrics", "/v1/objects/Bad/o/kv/k"] {
            let response = client
                .put(format!("{}{path}", server.base))
                .header("authorization", bearer(credential))
                .header("statehouse-forwarded-by", "x")
                .body("v")
                .send()
                .await
                .unwrap();
            bodies.push_str(&response.text().await.unwrap());
        }
    }
    let metrics = client
        .get(format!("{}/metrics", server.base))
        .header("authorization", bearer(&admin.secret))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let hash = hash_token(&admin.secret);
    // The answer can arrive before the line that logs it is read from the process's output.
    let logged = Instant::now();
    while !server.log().contains("\"caller\":\"ops\"") && logged.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let log = server.log();
    assert!(log.contains("\"caller\":\"ops\""), "requests are logged with the caller's name");
    for secret in [admin.secret.as_str(), &hash[7..], PEER_SECRET, HS256_SECRET, &expired[expired.len() - 20..]] {
        for (place, text) in [("log", &log), ("error bodies", &bodies), ("metrics", &metrics)] {
            assert!(!text.contains(secret), "a secret appears in the {place}");
        }
    }
    server.assert_no_panic();
}
