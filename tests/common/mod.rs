//! Test harness: the server in-process on port 0, or the real binary as a
//! separate process, on a fresh database. Written once for every database
//! mode: `STATEHOUSE_TEST_DATABASE=sqld` runs the same tests on a libSQL server.
#![allow(dead_code)]

pub mod iceberg;
pub mod ledger;
pub mod s3;
pub mod sqld;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use statehouse::config::Settings;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

/// A fresh database for one test: a libSQL file in a temp dir, or, when
/// `STATEHOUSE_TEST_DATABASE=sqld`, a libSQL server of its own (sqld on a free
/// loopback port, stopped when the test ends).
pub struct TestDatabase {
    pub url: String,
    pub dir: tempfile::TempDir,
    pub server: Option<sqld::Sqld>,
}

impl TestDatabase {
    pub fn new() -> TestDatabase {
        match std::env::var("STATEHOUSE_TEST_DATABASE").as_deref() {
            Ok("sqld") => {
                let dir = tempfile::tempdir().expect("a temp dir");
                let server = sqld::Sqld::start(&dir.path().join("sqld"), &[]);
                TestDatabase { url: server.url(), dir, server: Some(server) }
            }
            Ok("file") | Err(_) => TestDatabase::file(),
            Ok(other) => panic!("STATEHOUSE_TEST_DATABASE must be `file` or `sqld`, not {other:?}"),
        }
    }

    /// A libSQL file whatever the mode: for faults that need the file itself.
    pub fn file() -> TestDatabase {
        let dir = tempfile::tempdir().expect("a temp dir");
        let url = format!("file:{}", dir.path().join("statehouse.db").display());
        TestDatabase { url, dir, server: None }
    }

    pub fn is_file(&self) -> bool {
        self.url.starts_with("file:")
    }

    pub fn file_path(&self) -> Option<std::path::PathBuf> {
        self.url.strip_prefix("file:").map(Into::into)
    }

    /// Which database the test ran on, for printed counts.
    pub fn mode(&self) -> &'static str {
        if self.is_file() {
            "file"
        } else {
            "sqld"
        }
    }
}

/// The peer secret of servers configured with `with_tokens`.
pub const PEER_SECRET: &str = "peer-secret-for-tests-0123456789abcdef";

/// A token and the configuration line that grants it.
pub struct Token {
    pub secret: String,
    pub line: String,
}

pub fn token(name: &str, namespaces: &str, rights: &str) -> Token {
    let secret = statehouse::auth::new_token();
    let line = format!("{name} {} {namespaces} {rights}", statehouse::auth::hash_token(&secret));
    Token { secret, line }
}

/// Authentication on, with these tokens (and the peer secret it then needs).
pub fn with_tokens(settings: &mut Settings, tokens: &[&Token]) {
    settings.access.auth_tokens = Some(tokens.iter().map(|t| t.line.as_str()).collect::<Vec<_>>().join(";").into());
    settings.access.peer_secret = Some(PEER_SECRET.into());
}

/// A namespace no other test (or earlier run against a shared server) uses.
pub fn unique_ns(label: &str) -> String {
    format!("{label}-{}", uuid::Uuid::now_v7().simple())
}

pub struct TestApp {
    pub addr: SocketAddr,
    pub base: String,
    pub client: reqwest::Client,
    shutdown: Option<oneshot::Sender<()>>,
    handle: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// Graceful stop: in-flight requests finish, leases are released.
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(handle) = self.handle.take() {
            handle.await.expect("server task").expect("server stopped cleanly");
        }
    }

    /// Abrupt stop: the listener disappears, nothing is released.
    pub fn crash(mut self) {
        if let Some(handle) = self.handle.take() {
            handle.abort();
        }
    }
}

pub async fn spawn_app(db: &TestDatabase) -> TestApp {
    spawn_app_with(db, |_| {}).await
}

pub async fn spawn_app_with(db: &TestDatabase, configure: impl FnOnce(&mut Settings)) -> TestApp {
    let mut settings = Settings::for_database(&db.url).expect("test settings");
    settings.objects.objects_dir = db.dir.path().join("objects");
    configure(&mut settings);
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind port 0");
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = oneshot::channel::<()>();
    let handle = tokio::spawn(statehouse::server::run(settings, listener, async move {
        let _ = rx.await;
    }));
    let app = TestApp {
        addr,
        base: format!("http://{addr}"),
        client: reqwest::Client::new(),
        shutdown: Some(tx),
        handle: Some(handle),
    };
    wait_ready(&app.client, &app.base).await;
    app
}

pub async fn wait_ready(client: &reqwest::Client, base: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(r) = client.get(format!("{base}/readyz")).send().await {
            if r.status() == 200 {
                return;
            }
        }
        assert!(Instant::now() < deadline, "{base} never became ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The real `statehouse` binary in its own process.
pub struct Process {
    pub child: Child,
    pub base: String,
    pub instance: String,
    pub port: u16,
    logs: Arc<Mutex<Vec<String>>>,
    _objects: tempfile::TempDir,
    _program: Option<tempfile::TempDir>,
}

/// The `statehouse` binary, to be run as `user` (uid, gid) when given: then it
/// is linked (or copied) into a directory that user can reach, since the build
/// folder may not be (e.g. under /root). Faults that root would not notice,
/// such as a read-only database file, need another user.
pub fn statehouse_command(user: Option<(u32, u32)>) -> (Command, Option<tempfile::TempDir>) {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    let built = std::path::Path::new(env!("CARGO_BIN_EXE_statehouse"));
    let Some((uid, gid)) = user else { return (Command::new(built), None) };
    let dir = tempfile::tempdir().expect("a temp dir for the binary");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let program = dir.path().join("statehouse");
    if std::fs::hard_link(built, &program).is_err() {
        std::fs::copy(built, &program).expect("copy the statehouse binary");
    }
    let mut cmd = Command::new(&program);
    cmd.uid(uid).gid(gid);
    (cmd, Some(dir))
}

impl Process {
    /// Starts the binary on `db` with extra environment, on `port` (0 = any),
    /// and waits for its "listening" log line.
    pub fn start(db_url: &str, port: u16, env: &[(&str, String)]) -> Process {
        Process::start_as(db_url, port, env, None)
    }

    /// `start`, as another user when `user` (uid, gid) is given; the objects folder is theirs.
    pub fn start_as(db_url: &str, port: u16, env: &[(&str, String)], user: Option<(u32, u32)>) -> Process {
        let objects = tempfile::tempdir().expect("a temp dir for objects");
        if let Some((uid, gid)) = user {
            std::os::unix::fs::chown(objects.path(), Some(uid), Some(gid)).expect("chown the objects folder");
        }
        let (mut cmd, program) = statehouse_command(user);
        cmd.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("TURSO_URL", db_url)
            .env("STATEHOUSE_LISTEN", format!("127.0.0.1:{port}"))
            .env("STATEHOUSE_LOG_FORMAT", "json")
            .env("STATEHOUSE_LOG", "info,tower_http=warn")
            .env("STATEHOUSE_OBJECTS_DIR", objects.path())
            // One machine: every process can reach every folder, also with a
            // libSQL server (tests that share blobs give one folder to all).
            .env("STATEHOUSE_OBJECTS_DIR_SHARED", "true")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("start the statehouse binary");
        let stderr = child.stderr.take().unwrap();
        let logs = Arc::new(Mutex::new(Vec::new()));
        let (found_tx, found_rx) = std::sync::mpsc::channel();
        let sink = logs.clone();
        std::thread::spawn(move || {
            let mut found_tx = Some(found_tx);
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Ok(event) = serde_json::from_str::<serde_json::Value>(&line) {
                    if event["message"] == "listening" {
                        if let Some(tx) = found_tx.take() {
                            let _ = tx.send((
                                event["addr"].as_str().unwrap_or("").to_string(),
                                event["instance"].as_str().unwrap_or("").to_string(),
                            ));
                        }
                    }
                }
                sink.lock().unwrap().push(line);
            }
        });
        let (addr, instance) = match found_rx.recv_timeout(Duration::from_secs(60)) {
            Ok(found) => found,
            Err(_) => {
                let _ = child.kill();
                panic!("statehouse did not start; its log:\n{}", logs.lock().unwrap().join("\n"));
            }
        };
        let port = addr.rsplit(':').next().unwrap().parse().unwrap();
        Process { child, base: format!("http://{addr}"), instance, port, logs, _objects: objects, _program: program }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on our own child's pid.
        let rc = unsafe { libc::kill(self.pid(), signal) };
        assert_eq!(rc, 0, "kill({}, {signal})", self.pid());
        if signal == libc::SIGSTOP {
            // kill(2) returns before the process has stopped; wait until it has,
            // so that what the test does next happens while it is really paused.
            let deadline = Instant::now() + Duration::from_secs(5);
            while !self.is_stopped() {
                assert!(Instant::now() < deadline, "process {} did not stop", self.pid());
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }

    fn is_stopped(&self) -> bool {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).unwrap_or_default();
        // The state is the first field after the parenthesised command name.
        stat.rsplit_once(')').map(|(_, rest)| rest.trim_start().starts_with('T')).unwrap_or(false)
    }

    pub fn kill(&mut self) {
        self.signal(libc::SIGKILL);
        let _ = self.child.wait();
    }

    /// SIGTERM and wait for a clean exit.
    pub fn terminate(&mut self) {
        self.signal(libc::SIGTERM);
        let status = self.child.wait().expect("wait for statehouse");
        assert!(status.success(), "statehouse exited with {status}; log:\n{}", self.log());
    }

    pub fn log(&self) -> String {
        self.logs.lock().unwrap().join("\n")
    }

    /// Fails the test if the process logged a panic.
    pub fn assert_no_panic(&self) {
        let log = self.log();
        assert!(!log.contains("panicked"), "statehouse panicked:\n{log}");
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = unsafe { libc::kill(self.pid(), libc::SIGCONT) };
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Clients posting events to one replica until stopped, keeping the ids of
/// what was acknowledged and counting the requests whose outcome is unknown
/// (an error or a non-200: each may or may not have been stored).
pub struct EventLoad {
    acked: Arc<Mutex<std::collections::BTreeSet<String>>>,
    unknown: Arc<std::sync::atomic::AtomicUsize>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    writers: Vec<tokio::task::JoinHandle<()>>,
}

/// The shape of an [`EventLoad`].
pub struct EventLoadShape {
    pub writers: usize,
    pub events_per_post: usize,
    /// Each writer's posts go round its own objects `w<writer>-<0..objects>`.
    pub objects: usize,
    /// Event `e` of a post has type `types[e % types.len()]`.
    pub types: &'static [&'static str],
    pub pause: Duration,
}

impl EventLoad {
    pub fn start(base: &str, ns: &str, shape: EventLoadShape) -> EventLoad {
        let client = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().unwrap();
        let acked = Arc::new(Mutex::new(std::collections::BTreeSet::new()));
        let unknown = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let shape = Arc::new(shape);
        let writers = (0..shape.writers)
            .map(|w| {
                let (client, url) = (client.clone(), format!("{base}/v1/objects/{ns}"));
                let (acked, unknown, stop, shape) = (acked.clone(), unknown.clone(), stop.clone(), shape.clone());
                tokio::spawn(async move {
                    let mut n = 0;
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        let events: Vec<serde_json::Value> = (0..shape.events_per_post)
                            .map(|e| {
                                let kind = shape.types[e % shape.types.len()];
                                serde_json::json!({"type": kind, "data": {"w": w, "n": n, "e": e}})
                            })
                            .collect();
                        let sent = client
                            .post(format!("{url}/w{w}-{}/events", n % shape.objects))
                            .json(&serde_json::json!({"events": events}))
                            .send()
                            .await;
                        match sent {
                            Ok(r) if r.status() == 200 => {
                                let body: serde_json::Value = r.json().await.unwrap();
                                let mut acked = acked.lock().unwrap();
                                for id in body["event_ids"].as_array().unwrap() {
                                    acked.insert(id.as_str().unwrap().to_string());
                                }
                            }
                            _ => {
                                unknown.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            }
                        }
                        n += 1;
                        tokio::time::sleep(shape.pause).await;
                    }
                })
            })
            .collect();
        EventLoad { acked, unknown, stop, writers }
    }

    /// Stops the writers and answers the acknowledged event ids and the count of unknown outcomes.
    pub async fn stop(self) -> (std::collections::BTreeSet<String>, usize) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for writer in self.writers {
            writer.await.unwrap();
        }
        let acked = self.acked.lock().unwrap().clone();
        (acked, self.unknown.load(std::sync::atomic::Ordering::Relaxed))
    }
}
