//! The binary's command line: subcommands, settings, and start-up errors.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::s3::{S3Server, ACCESS_KEY, SECRET_KEY};
use common::sqld::Sqld;
use common::Process;

/// Runs the binary to its end. One that serves instead of stopping (a start-up
/// check gone) is killed after 30 s and fails the test rather than hanging it.
fn statehouse(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    // A folder of its own, so a default ./data/ never lands in the checkout.
    let cwd = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_statehouse"));
    cmd.env_clear().env("PATH", std::env::var("PATH").unwrap_or_default()).current_dir(cwd.path()).args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("run statehouse");
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!("statehouse {args:?} with {env:?} still ran after 30 s:\n{}", String::from_utf8_lossy(&out.stderr));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("run statehouse")
}

#[test]
fn a_bad_setting_fails_at_start_with_one_line_naming_it() {
    let cases = [
        ("STATEHOUSE_LEASE_MS", "abc"),
        ("STATEHOUSE_LEASE_MS", "5"),
        ("TURSO_URL", "postgres://db"),
        ("STATEHOUSE_LISTEN", "not-an-address"),
        ("STATEHOUSE_ADVERTISE_URL", "ftp://x"),
        ("STATEHOUSE_INSTANCE_ID", "has space"),
        ("STATEHOUSE_SYNC", "sometimes"),
        ("STATEHOUSE_MAX_VALUE_BYTES", "0"),
    ];
    for (name, value) in cases {
        let out = statehouse(&["serve"], &[(name, value)]);
        assert_eq!(out.status.code(), Some(2), "{name}={value} should fail");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(stderr.trim_end().lines().count(), 1, "{name}={value}: {stderr}");
        assert!(stderr.contains(name), "{name}={value}: the error must name the setting: {stderr}");
    }
}

#[test]
fn an_unusable_database_or_address_fails_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let blocker = dir.path().join("file");
    std::fs::write(&blocker, b"").unwrap();
    let url = format!("file:{}/sub/statehouse.db", blocker.display());
    let out = statehouse(&["serve", "--listen", "127.0.0.1:0"], &[("TURSO_URL", &url), ("STATEHOUSE_LOG", "off")]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.starts_with("error: cannot open the database at TURSO_URL="), "{stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");

    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let db = format!("file:{}/ok.db", dir.path().display());
    let out = statehouse(&["serve"], &[("TURSO_URL", &db), ("STATEHOUSE_LISTEN", &addr), ("STATEHOUSE_LOG", "off")]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("STATEHOUSE_LISTEN"), "{stderr}");
}

#[test]
fn migrate_help_and_dump_config() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file:{}/m.db", dir.path().display());
    for _ in 0..2 {
        let out = statehouse(&["migrate"], &[("TURSO_URL", &url)]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert!(String::from_utf8_lossy(&out.stdout).contains("is migrated"));
    }

    let out = statehouse(&["--help"], &[]);
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for word in ["serve", "migrate"] {
        assert!(help.contains(word), "{help}");
    }
    let out = statehouse(&["serve", "--help"], &[]);
    let help = String::from_utf8_lossy(&out.stdout);
    for var in statehouse::config::ENV_VARS {
        assert!(help.contains(var), "serve --help does not mention {var}");
    }

    let out = statehouse(&["--dump-config"], &[("TURSO_TOKEN", "s3cret-token"), ("STATEHOUSE_LEASE_MS", "1234")]);
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    let config: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(config["lease_ms"], 1234);
    assert_eq!(config["turso_url"], "file:./data/statehouse.db");
    assert_eq!(config["turso_token"], "<redacted>");
    assert!(!stdout.contains("s3cret"), "secrets never appear in dumped config");
}

/// What `fly storage create` (Tigris) sets on a fly.io app, as documented by fly.io.
const TIGRIS: [(&str, &str); 5] = [
    ("AWS_ENDPOINT_URL_S3", "https://fly.storage.tigris.dev"),
    ("BUCKET_NAME", "statehouse-tigris"),
    ("AWS_ACCESS_KEY_ID", "tid_tigris_key_id"),
    ("AWS_SECRET_ACCESS_KEY", "tsec_tigris_s3cret"),
    ("AWS_REGION", "auto"),
];

fn dump_config(env: &[(&str, &str)]) -> serde_json::Value {
    let out = statehouse(&["--dump-config"], env);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{env:?}: {stderr}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    for (name, value) in env {
        if name.contains("SECRET") || name.contains("KEY_ID") || name.contains("TOKEN") {
            assert!(!stdout.contains(value), "{name}'s value appears in the dumped config");
        }
    }
    serde_json::from_str(&stdout).unwrap()
}

#[test]
fn a_shared_database_with_an_unshared_local_folder_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let objects = dir.path().join("objects");
    let objects = objects.to_str().unwrap();
    // Never contacted: the refusal comes before the database is opened.
    let remote = "http://127.0.0.1:9";
    let cases: [&[(&str, &str)]; 5] = [
        &[("TURSO_URL", remote)],
        &[("TURSO_URL", "libsql://db-example.turso.io"), ("STATEHOUSE_OBJECTS_DIR", objects)],
        &[("TURSO_URL", remote), ("STATEHOUSE_OBJECTS_DIR", objects), ("STATEHOUSE_OBJECTS_DIR_SHARED", "false")],
        // AWS keys and a region alone (common on laptops and CI machines) are no store.
        &[
            ("TURSO_URL", remote),
            ("AWS_ACCESS_KEY_ID", "AKIAEXAMPLE"),
            ("AWS_SECRET_ACCESS_KEY", "aws-s3cret"),
            ("AWS_REGION", "eu-west-1"),
        ],
        &[("TURSO_URL", remote), ("STATEHOUSE_OBJECTS_DIR", objects), ("STATEHOUSE_LOG", "off")],
    ];
    for env in cases {
        for args in [&["serve", "--listen", "127.0.0.1:0"][..], &[][..], &["--dump-config"][..]] {
            let out = statehouse(args, env);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{args:?} {env:?} must be refused: {stderr}");
            assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
            for named in ["TURSO_URL", "R2_*", "STATEHOUSE_OBJECTS_DIR_SHARED=true"] {
                assert!(stderr.contains(named), "{env:?}: the refusal must name {named}: {stderr}");
            }
            assert!(!stderr.contains("aws-s3cret"), "{stderr}");
        }
        assert!(!Path::new(objects).exists(), "a refused start created its objects folder");
    }
}

#[test]
fn tigris_variables_stand_in_for_r2_and_r2_wins() {
    let remote = [("TURSO_URL", "libsql://db-example.turso.io")];
    let config = dump_config(&[&remote[..], &TIGRIS[..]].concat());
    assert_eq!(config["r2_endpoint"], "https://fly.storage.tigris.dev");
    assert_eq!(config["r2_bucket"], "statehouse-tigris");
    assert_eq!(config["r2_access_key_id"], "<redacted>");
    assert_eq!(config["r2_secret_access_key"], "<redacted>");
    assert_eq!(config["r2_region"], "auto");

    let eu = [("AWS_REGION", "eu-central-1")];
    assert_eq!(dump_config(&[&TIGRIS[..], &eu[..]].concat())["r2_region"], "eu-central-1");
    let r2_region = [("AWS_REGION", "eu-central-1"), ("R2_REGION", "us-east-1")];
    assert_eq!(dump_config(&[&TIGRIS[..], &r2_region[..]].concat())["r2_region"], "us-east-1");

    // Any R2_* store setting means R2_* alone: never half from one source, half from the other.
    let r2 = [
        ("R2_ENDPOINT", "https://account.r2.cloudflarestorage.com"),
        ("R2_BUCKET", "statehouse-r2"),
        ("R2_ACCESS_KEY_ID", "r2-key-id"),
        ("R2_SECRET_ACCESS_KEY", "r2-s3cret"),
    ];
    let config = dump_config(&[&remote[..], &TIGRIS[..], &r2[..]].concat());
    assert_eq!(config["r2_endpoint"], "https://account.r2.cloudflarestorage.com");
    assert_eq!(config["r2_bucket"], "statehouse-r2");
    let config = dump_config(&[&TIGRIS[..], &r2[1..2]].concat());
    assert_eq!(config["r2_bucket"], "statehouse-r2");
    assert!(config["r2_endpoint"].is_null(), "{config}");

    // Without them the local folder stays the default.
    assert!(dump_config(&[])["r2_endpoint"].is_null());
}

#[test]
fn incomplete_tigris_variables_fail_with_one_line_naming_what_is_missing() {
    for (missing, env) in [
        ("AWS_ENDPOINT_URL_S3", &TIGRIS[1..]),
        ("BUCKET_NAME", &[TIGRIS[0], TIGRIS[2], TIGRIS[3]][..]),
        ("AWS_SECRET_ACCESS_KEY", &TIGRIS[..3]),
    ] {
        let out = statehouse(&["serve", "--listen", "127.0.0.1:0"], env);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
        assert!(stderr.contains(&format!("missing {missing}")), "{stderr}");
        assert!(!stderr.contains("tsec_tigris_s3cret"), "{stderr}");
    }
}

/// The keys the Iceberg catalog hands analysts: a pair, for an S3 store, and
/// never the server's own; each mistake stops the start with one line.
#[test]
fn iceberg_reader_keys_are_a_pair_for_an_s3_store_and_never_the_servers_own() {
    let store = [
        ("R2_ENDPOINT", "https://account.r2.cloudflarestorage.com"),
        ("R2_BUCKET", "statehouse-r2"),
        ("R2_ACCESS_KEY_ID", "server-key-id"),
        ("R2_SECRET_ACCESS_KEY", "server-s3cret"),
    ];
    let reader_id = ("STATEHOUSE_ICEBERG_READER_ACCESS_KEY_ID", "reader-key-id");
    let reader_secret = ("STATEHOUSE_ICEBERG_READER_SECRET_ACCESS_KEY", "reader-s3cret");
    let own_id = ("STATEHOUSE_ICEBERG_READER_ACCESS_KEY_ID", "server-key-id");
    let endpoint = ("STATEHOUSE_ICEBERG_S3_ENDPOINT", "http://localhost:9000");
    let cases: [(Vec<(&str, &str)>, &str); 4] = [
        ([&store[..], &[reader_id]].concat(), "set together or not at all"),
        (vec![reader_id, reader_secret], "for a warehouse on S3/R2"),
        ([&store[..], &[own_id, reader_secret]].concat(), "the server's own store key"),
        (vec![endpoint], "R2_ENDPOINT is not set"),
    ];
    for (env, complaint) in cases {
        let out = statehouse(&["serve", "--listen", "127.0.0.1:0"], &env);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{env:?} must be refused: {stderr}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
        assert!(stderr.contains(complaint), "{env:?}: {stderr}");
        assert!(!stderr.contains("s3cret"), "a secret in the refusal: {stderr}");
    }
    let config = dump_config(&[&store[..], &[reader_id, reader_secret, endpoint]].concat());
    assert_eq!(config["iceberg_s3_endpoint"], "http://localhost:9000");
    assert_eq!(config["iceberg_reader_access_key_id"], "<redacted>");
    assert_eq!(config["iceberg_reader_secret_access_key"], "<redacted>");
}

/// fly.toml's [env], the secrets deploy/fly/README.md sets, what `fly storage
/// create` and the platform set: the configuration a fly.io Machine starts
/// with must resolve to the shared Tigris bucket and pass the start-up checks.
#[test]
fn the_fly_io_environment_configures_a_shared_store() {
    let fly_toml = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/fly/fly.toml")).unwrap();
    let mut env: Vec<(String, String)> = Vec::new();
    let mut in_env = false;
    for line in fly_toml.lines().map(str::trim) {
        if line.starts_with('[') {
            in_env = line == "[env]";
        } else if let (true, Some((name, value))) = (in_env, line.split_once(" = ")) {
            if !name.starts_with('#') {
                env.push((name.trim().to_string(), value.trim().trim_matches('"').to_string()));
            }
        }
    }
    assert!(env.iter().any(|(name, _)| name == "TURSO_URL"), "no TURSO_URL in fly.toml [env]: {env:?}");
    let token_line = format!("ops {} * read,write,admin", statehouse::auth::hash_token("sh_example"));
    let platform = [
        ("TURSO_TOKEN", "turso-token"),
        ("STATEHOUSE_AUTH_TOKENS", token_line.as_str()),
        ("STATEHOUSE_PEER_SECRET", "0123456789abcdef0123456789abcdef"),
        ("FLY_MACHINE_ID", "148e21e5a4d189"),
        ("FLY_APP_NAME", "statehouse"),
        ("FLY_REGION", "ams"),
        ("PRIMARY_REGION", "ams"),
    ];
    let mut all: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    all.extend(platform);
    all.extend(TIGRIS);
    let config = dump_config(&all);
    assert!(config["turso_url"].as_str().unwrap().starts_with("https://"), "{config}");
    assert_eq!(config["r2_endpoint"], "https://fly.storage.tigris.dev", "fly.toml must leave the store to Tigris");
    assert_eq!(config["r2_bucket"], "statehouse-tigris");
    assert_eq!(config["fly_machine_id"], "148e21e5a4d189");
}

/// Each combination the start-up check allows really serves, and blobs go
/// where the settings say: S3 (R2_* or Tigris's variables) or the folder.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_starts_with_each_valid_combination_of_database_and_store() {
    let sqld_dir = tempfile::tempdir().unwrap();
    let sqld = Sqld::start(&sqld_dir.path().join("sqld"), &[]);
    let sqld_url = sqld.url();
    let file_dir = tempfile::tempdir().unwrap();
    let file_url = format!("file:{}", file_dir.path().join("statehouse.db").display());
    let bucket = "statehouse-cli";
    let s3 = S3Server::start(Some(bucket)).await;
    let s = |v: &str| v.to_string();
    let r2 = vec![
        ("R2_ENDPOINT", s3.endpoint.clone()),
        ("R2_BUCKET", s(bucket)),
        ("R2_ACCESS_KEY_ID", s(ACCESS_KEY)),
        ("R2_SECRET_ACCESS_KEY", s(SECRET_KEY)),
        ("R2_REGION", s("us-east-1")),
    ];
    let tigris = vec![
        ("AWS_ENDPOINT_URL_S3", s3.endpoint.clone()),
        ("BUCKET_NAME", s(bucket)),
        ("AWS_ACCESS_KEY_ID", s(ACCESS_KEY)),
        ("AWS_SECRET_ACCESS_KEY", s(SECRET_KEY)),
        ("AWS_REGION", s("us-east-1")),
    ];
    // Process::start declares its folder shared (tests on one machine): take that back.
    let unshared = ("STATEHOUSE_OBJECTS_DIR_SHARED", s("false"));
    let shared = ("STATEHOUSE_OBJECTS_DIR_SHARED", s("true"));
    let cases = [
        ("file, local folder", file_url.as_str(), vec![unshared.clone()], false),
        ("file, R2_*", file_url.as_str(), [r2.clone(), vec![unshared.clone()]].concat(), true),
        ("sqld, R2_*", sqld_url.as_str(), [r2.clone(), vec![unshared.clone()]].concat(), true),
        ("sqld, Tigris variables", sqld_url.as_str(), [tigris, vec![unshared]].concat(), true),
        ("sqld, shared folder", sqld_url.as_str(), vec![shared], false),
    ];
    let client = reqwest::Client::new();
    for (label, url, env, on_s3) in cases {
        let env: Vec<(&str, String)> = env.into_iter().collect();
        let before = files_under(&s3.root.join(bucket).join("blobs"));
        let server = Process::start(url, 0, &env);
        let ready = client.get(format!("{}/readyz", server.base)).send().await.unwrap();
        assert_eq!(ready.status(), 200, "{label}: {}", ready.text().await.unwrap());
        let blob = format!("{}/v1/objects/cli/{}/blobs/b", server.base, label.replace([' ', ',', '*'], "-"));
        let put = client.put(&blob).body("bytes of a blob").send().await.unwrap();
        assert_eq!(put.status(), 200, "{label}: {}", put.text().await.unwrap());
        assert_eq!(client.get(&blob).send().await.unwrap().text().await.unwrap(), "bytes of a blob", "{label}");
        let added = files_under(&s3.root.join(bucket).join("blobs")) - before;
        assert_eq!(
            added > 0,
            on_s3,
            "{label}: the blob's bytes went to the {} store",
            if added > 0 { "S3" } else { "folder" }
        );
        server.assert_no_panic();
        println!("{label}: started, ready, blob stored on {}", if on_s3 { "S3" } else { "the folder" });
    }
}

fn files_under(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries.map(|e| e.unwrap().path()).map(|p| if p.is_dir() { files_under(&p) } else { 1 }).sum()
}
