//! A real S3 wire protocol in-process: s3s-fs serving a temp folder on a
//! loopback port, with SigV4 auth, path-style buckets.

use std::path::PathBuf;

use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder as ConnBuilder;
use s3s::auth::SimpleAuth;
use s3s::service::S3ServiceBuilder;
use statehouse::config::ObjectStoreSettings;

pub const ACCESS_KEY: &str = "statehouse-test";
pub const SECRET_KEY: &str = "statehouse-test-secret";
/// A second key pair, as an operator would create for analysts (s3s-fs
/// cannot make it read-only; what matters here is that it is not the server's).
pub const READER_ACCESS_KEY: &str = "statehouse-test-reader";
pub const READER_SECRET_KEY: &str = "statehouse-test-reader-secret";

pub struct S3Server {
    pub endpoint: String,
    pub root: PathBuf,
    _dir: tempfile::TempDir,
    task: tokio::task::JoinHandle<()>,
}

impl S3Server {
    /// Starts the server; `bucket`, if given, exists from the start.
    pub async fn start(bucket: Option<&str>) -> S3Server {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        if let Some(bucket) = bucket {
            std::fs::create_dir(root.join(bucket)).unwrap();
        }
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let task = serve(listener, &root);
        S3Server { endpoint, root, _dir: dir, task }
    }

    /// Serves again on the same address and folder after `stop`.
    pub async fn restart(&mut self) {
        self.task.abort();
        let addr = self.endpoint.trim_start_matches("http://").to_string();
        let listener = tokio::net::TcpListener::bind(&addr).await.expect("rebind the S3 address");
        self.task = serve(listener, &self.root);
    }

    /// Object-store settings pointing at this server.
    pub fn settings(&self, bucket: &str) -> ObjectStoreSettings {
        ObjectStoreSettings {
            objects_dir: self.root.join("unused-local-folder"),
            r2_endpoint: Some(self.endpoint.clone()),
            r2_bucket: Some(bucket.to_string()),
            r2_access_key_id: Some(ACCESS_KEY.into()),
            r2_secret_access_key: Some(SECRET_KEY.into()),
            r2_region: "us-east-1".to_string(),
            create_bucket: false,
        }
    }

    /// The server stops answering (connections refused from now on).
    pub fn stop(&self) {
        self.task.abort();
    }
}

fn serve(listener: tokio::net::TcpListener, root: &std::path::Path) -> tokio::task::JoinHandle<()> {
    let fs = s3s_fs::FileSystem::new(root).unwrap();
    let mut builder = S3ServiceBuilder::new(fs);
    let mut auth = SimpleAuth::from_single(ACCESS_KEY, SECRET_KEY);
    auth.register(READER_ACCESS_KEY.into(), READER_SECRET_KEY.into());
    builder.set_auth(auth);
    let service = builder.build();
    tokio::spawn(async move {
        let http = ConnBuilder::new(TokioExecutor::new());
        // Connections live in this task's set: stopping the server drops them all.
        let mut connections = tokio::task::JoinSet::new();
        loop {
            let Ok((socket, _)) = listener.accept().await else { continue };
            let conn = http.serve_connection(TokioIo::new(socket), service.clone()).into_owned();
            connections.spawn(async move {
                let _ = conn.await;
            });
            while connections.try_join_next().is_some() {}
        }
    })
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Settings for the local-folder backend in `dir`.
pub fn local_settings(dir: &std::path::Path) -> ObjectStoreSettings {
    ObjectStoreSettings {
        objects_dir: dir.to_path_buf(),
        r2_endpoint: None,
        r2_bucket: None,
        r2_access_key_id: None,
        r2_secret_access_key: None,
        r2_region: "auto".to_string(),
        create_bucket: false,
    }
}
