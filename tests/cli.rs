//! The binary's command line: subcommands, settings, and start-up errors.

use std::process::Command;

fn statehouse(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_statehouse"));
    cmd.env_clear().env("PATH", std::env::var("PATH").unwrap_or_default()).args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run statehouse")
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
