//! Reads the exported Iceberg tables with DuckDB and PyIceberg (tests/iceberg/read.py),
//! from the Python venv `scripts/test` prepares. Missing readers fail the test.

use std::process::Stdio;

use tokio::io::AsyncWriteExt;
use tokio::process::Command;

use serde_json::Value;

fn python() -> std::path::PathBuf {
    let venv = std::env::var("STATEHOUSE_TEST_VENV").unwrap_or_else(|_| {
        panic!(
            "STATEHOUSE_TEST_VENV is not set: the Iceberg interop tests need DuckDB and PyIceberg. \
             Run scripts/test (it builds the venv), or point STATEHOUSE_TEST_VENV at a venv with \
             tests/iceberg/requirements.txt installed."
        )
    });
    let python = std::path::Path::new(&venv).join("bin/python");
    assert!(python.is_file(), "STATEHOUSE_TEST_VENV={venv} has no bin/python");
    python
}

/// Runs both readers on `request` (see read.py) and returns `{"duckdb": .., "pyiceberg": ..}`.
/// Async: an in-process S3 server must keep serving while they read.
pub async fn read_tables(request: &Value) -> Value {
    run_readers("read.py", request).await
}

/// Both readers through the server's Iceberg REST catalog (see rest.py):
/// `{"duckdb": .., "pyiceberg": .., "refused": ..}`.
pub async fn read_through_catalog(request: &Value) -> Value {
    run_readers("rest.py", request).await
}

async fn run_readers(script: &str, request: &Value) -> Value {
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/iceberg").join(script);
    let mut child = Command::new(python())
        .arg(&script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run the Iceberg readers");
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(request.to_string().as_bytes()).await.unwrap();
    drop(stdin);
    let out = child.wait_with_output().await.unwrap();
    assert!(
        out.status.success(),
        "the Iceberg readers ({}) failed on {request}:\n{}",
        script.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("the readers print JSON")
}

/// Current state of the export tables, from `GET /v1/analytics/tables`, by table name.
pub async fn tables(client: &reqwest::Client, base: &str) -> std::collections::HashMap<String, Value> {
    let body: Value = client.get(format!("{base}/v1/analytics/tables")).send().await.unwrap().json().await.unwrap();
    body["tables"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| (t["name"].as_str().unwrap().trim_start_matches("statehouse.").to_string(), t.clone()))
        .collect()
}
