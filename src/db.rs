//! The libSQL database: opening it (embedded file or remote server), the read
//! connections, migrations, and what its errors mean for a client.

use std::collections::HashMap;
use std::hash::BuildHasherDefault;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use libsql::params::IntoParams;
use libsql::{Connection, Row, Statement, TransactionBehavior, Value};
use tokio::sync::Mutex;

use crate::config::{DatabaseSettings, DatabaseUrl, SyncMode};
use crate::threads::{self, Priority};

pub mod batch;
pub mod cells;
mod remote;

use batch::{Outcome, Step, Stmt};

/// How long a local connection waits for another process's write lock
/// before giving up with SQLITE_BUSY.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// Read connections on a local file: reads take microseconds, and SQLite
/// serves them beside the writer.
const READ_CONNECTIONS: usize = 4;
/// On a remote server the hot reads go through `query` (its own bounded
/// streams); these serve the rest (the exporter, the sweeper, blob rows,
/// readiness). Each may keep a stream, and so one of the server's
/// connections, between queries: few of them.
const REMOTE_READ_CONNECTIONS: usize = 8;
/// Write transactions (group commits) sent at once to a remote server, each
/// on a stream of its own; see the writer's `Line` for how two are kept apart.
pub const REMOTE_WRITES_IN_FLIGHT: usize = 2;
/// Reads sent at once to a remote server through `Database::query`, each on a
/// stream kept between requests: a read takes about one round trip, and the
/// server counts every open stream against its connection limit.
const REMOTE_READ_STREAMS: usize = 16;
/// Of those, kept open between reads. Each kept stream holds one of the
/// server's connections (for 10 s after a crash, until it expires), and the
/// server's limit is shared by every replica: a few save most of the cost.
const REMOTE_READ_STREAMS_KEPT: usize = 2;
/// A remote server expires an idle Hrana stream after 10 s, and a read
/// connection keeps its stream open between queries: renew it well before.
const REMOTE_STREAM_MAX_IDLE: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The database could not be reached or is busy; nothing was committed and
    /// the request may be retried.
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// The database answered with something that is a bug or corruption.
    #[error("database error: {0}")]
    Internal(String),
}

impl From<libsql::Error> for StoreError {
    fn from(err: libsql::Error) -> Self {
        classify(err)
    }
}

/// SQLite primary result codes that mean "try again later" rather than "bug".
fn is_transient_sqlite_code(code: i32) -> bool {
    const BUSY: i32 = 5;
    const LOCKED: i32 = 6;
    const NOMEM: i32 = 7;
    const READONLY: i32 = 8;
    const INTERRUPT: i32 = 9;
    const IOERR: i32 = 10;
    const FULL: i32 = 13;
    const CANTOPEN: i32 = 14;
    const PROTOCOL: i32 = 15;
    matches!(code & 0xff, BUSY | LOCKED | NOMEM | READONLY | INTERRUPT | IOERR | FULL | CANTOPEN | PROTOCOL)
}

fn classify(err: libsql::Error) -> StoreError {
    use libsql::Error as E;
    let text = err.to_string();
    match &err {
        E::SqliteFailure(code, _) if is_transient_sqlite_code(*code) => StoreError::Unavailable(text),
        E::RemoteSqliteFailure(code, ext, _) if is_transient_sqlite_code(*code) || is_transient_sqlite_code(*ext) => {
            StoreError::Unavailable(text)
        }
        // Transport-level failures of the remote protocol (connection refused,
        // TRANSACTION_TIMEOUT, STREAM_EXPIRED, ...): the server rolled back.
        E::ConnectionFailed(_) | E::Hrana(_) | E::WriteDelegation(_) => StoreError::Unavailable(text),
        _ if text.contains("TRANSACTION_TIMEOUT") || text.contains("STREAM_EXPIRED") => StoreError::Unavailable(text),
        _ => StoreError::Internal(text),
    }
}

pub struct Database {
    inner: libsql::Database,
    url: DatabaseUrl,
    sync: SyncMode,
    readers: Vec<Mutex<Reader>>,
    next_reader: AtomicUsize,
    /// Shared with the checkpointer thread. Local files only.
    wal: Option<Arc<WalState>>,
    /// Remote servers only: how the writer sends a transaction as one request.
    pipeline: Option<remote::Pipeline>,
    /// Remote servers only: single-statement reads (`query`).
    read_pipeline: Option<remote::Pipeline>,
}

struct Reader {
    session: Session,
    last_used: Instant,
}

/// A connection and the statements prepared on it, and the only way SQL is
/// run on it: `first_row`, `rows`, `rows_of` and the writer's batches
/// (`batch.rs`) run statements prepared once (on a local file), which matters
/// on the hot paths: SQLite takes longer to parse and plan their small
/// statements than to run them.
#[derive(Clone)]
pub struct Session {
    conn: Connection,
    prepared: Arc<Prepared>,
}

impl Session {
    /// The first row a statement returns, read by `read` (an `UPDATE ... RETURNING`
    /// has made all its changes by then).
    pub async fn first_row<T>(
        &self,
        sql: &'static str,
        params: impl IntoParams,
        read: impl FnOnce(&Row) -> Result<T, libsql::Error>,
    ) -> Result<Option<T>, StoreError> {
        let mut first = None;
        let mut read = Some(read);
        self.each_row(Sql::Fixed(sql), params, |row| {
            if let Some(read) = read.take() {
                first = Some(read(row)?);
            }
            Ok::<bool, libsql::Error>(false)
        })
        .await?;
        Ok(first)
    }

    /// Every row of a statement, each given to `read`.
    pub async fn rows<E>(
        &self,
        sql: &'static str,
        params: impl IntoParams,
        mut read: impl FnMut(&Row) -> Result<(), E>,
    ) -> Result<(), StoreError>
    where
        E: From<libsql::Error>,
        StoreError: From<E>,
    {
        self.each_row(Sql::Fixed(sql), params, |row| read(row).map(|()| true)).await
    }

    /// Every row of a statement built for this one use (never kept prepared).
    pub async fn rows_once<E>(
        &self,
        sql: String,
        params: impl IntoParams,
        mut read: impl FnMut(&Row) -> Result<(), E>,
    ) -> Result<(), StoreError>
    where
        E: From<libsql::Error>,
        StoreError: From<E>,
    {
        self.each_row(Sql::Once(sql.into()), params, |row| read(row).map(|()| true)).await
    }

    /// False while a transaction is open on the connection (a failed batch may leave one).
    pub fn is_autocommit(&self) -> bool {
        self.conn.is_autocommit()
    }

    /// Every row of a statement shaped for `rows` rows, each given to `read`.
    pub async fn rows_of(
        &self,
        shape: &'static Shape,
        rows: usize,
        params: Vec<Value>,
        mut read: impl FnMut(&Row) -> Result<(), libsql::Error>,
    ) -> Result<(), StoreError> {
        self.each_row(Sql::Shaped(shape, rows), params, |row| read(row).map(|()| true)).await
    }

    /// Gives rows to `read` until it answers false or they run out.
    async fn each_row<E>(
        &self,
        sql: Sql,
        params: impl IntoParams,
        mut read: impl FnMut(&Row) -> Result<bool, E>,
    ) -> Result<(), StoreError>
    where
        E: From<libsql::Error>,
        StoreError: From<E>,
    {
        let statement = self.prepared.get(&self.conn, &sql).await?;
        let all = async {
            let mut rows = match &statement {
                Some(statement) => statement.query(params).await?,
                None => self.conn.query(&sql.text(), params).await?,
            };
            while let Some(row) = rows.next().await? {
                if !read(&row)? {
                    break;
                }
            }
            Ok::<(), E>(())
        }
        .await;
        // Reset at once: a statement left mid-step would hold its read open.
        if let Some(statement) = statement {
            statement.reset();
        }
        Ok(all?)
    }
}

/// A statement whose text depends on how many rows it carries (a `VALUES`
/// list, an `IN` list): prepared once per row count that occurs.
pub struct Shape {
    /// The statement's text for this many rows.
    pub text: fn(usize) -> String,
}

/// `?first, ?first+1, ...`: `count` numbered parameters.
pub fn numbered(first: usize, count: usize) -> String {
    (first..first + count).map(|n| format!("?{n}")).collect::<Vec<_>>().join(", ")
}

#[derive(Clone)]
enum Sql {
    Fixed(&'static str),
    Shaped(&'static Shape, usize),
    /// Built for one use (a listing's bounds): never kept prepared.
    Once(Arc<str>),
}

impl Sql {
    fn text(&self) -> std::borrow::Cow<'static, str> {
        match self {
            Sql::Fixed(sql) => (*sql).into(),
            Sql::Shaped(shape, rows) => (shape.text)(*rows).into(),
            Sql::Once(sql) => sql.to_string().into(),
        }
    }

    /// Identifies the text by where it lives, which is cheaper than hashing
    /// it; equal keys always mean equal texts (both are `'static`). None:
    /// not to be kept.
    fn key(&self) -> Option<StatementKey> {
        match self {
            Sql::Fixed(sql) => Some(StatementKey(sql.as_ptr() as usize, sql.len(), false)),
            Sql::Shaped(shape, rows) => Some(StatementKey(*shape as *const Shape as usize, *rows, true)),
            Sql::Once(_) => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct StatementKey(usize, usize, bool);

/// Hashes a `StatementKey`'s few words by multiplication: its input is
/// addresses and counts, not anything a client chooses.
#[derive(Default)]
struct AddressHasher(u64);

impl std::hash::Hasher for AddressHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for byte in bytes {
            self.write_u64(u64::from(*byte));
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }

    fn write_usize(&mut self, n: usize) {
        self.write_u64(n as u64);
    }
}

/// Statements prepared on one connection. Only on a local file: a remote
/// server parses every statement anyway, and a remote statement belongs to
/// the stream of one transaction.
struct Prepared {
    local: bool,
    statements: std::sync::Mutex<HashMap<StatementKey, Arc<Statement>, BuildHasherDefault<AddressHasher>>>,
}

impl Prepared {
    /// The prepared statement for `sql`; `None` on a remote server.
    async fn get(&self, conn: &Connection, sql: &Sql) -> Result<Option<Arc<Statement>>, StoreError> {
        if !self.local {
            return Ok(None);
        }
        Ok(Some(self.statement(conn, sql).await?))
    }

    /// The statement for `sql`, prepared on first use (local connections only).
    async fn statement(&self, conn: &Connection, sql: &Sql) -> Result<Arc<Statement>, libsql::Error> {
        let Some(key) = sql.key() else {
            return Ok(Arc::new(conn.prepare(&sql.text()).await?));
        };
        // Every use resets its statement when done, so a cached one is ready for new parameters.
        if let Some(statement) = self.statements.lock().expect("statement cache lock").get(&key) {
            return Ok(statement.clone());
        }
        let statement = Arc::new(conn.prepare(&sql.text()).await?);
        self.statements.lock().expect("statement cache lock").insert(key, statement.clone());
        Ok(statement)
    }
}

impl Database {
    pub async fn open(settings: &DatabaseSettings) -> Result<Database, StoreError> {
        let inner = match &settings.turso_url {
            DatabaseUrl::File(path) => {
                if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                    std::fs::create_dir_all(dir)
                        .map_err(|e| StoreError::Unavailable(format!("cannot create {}: {e}", dir.display())))?;
                }
                libsql::Builder::new_local(path).build().await?
            }
            DatabaseUrl::Remote(url) => {
                libsql::Builder::new_remote(
                    url.clone(),
                    settings.turso_token.as_ref().map_or_else(String::new, |token| token.expose().to_string()),
                )
                .build()
                .await?
            }
        };
        let turso_token = settings.turso_token.as_ref().map(crate::config::Secret::expose);
        let mut db = Database {
            inner,
            url: settings.turso_url.clone(),
            sync: settings.sync,
            readers: Vec::new(),
            next_reader: AtomicUsize::new(0),
            wal: None,
            pipeline: match &settings.turso_url {
                DatabaseUrl::Remote(url) => {
                    let streams = REMOTE_WRITES_IN_FLIGHT;
                    Some(remote::Pipeline::new(url, turso_token, streams, streams)?)
                }
                DatabaseUrl::File(_) => None,
            },
            read_pipeline: match &settings.turso_url {
                DatabaseUrl::Remote(url) => {
                    Some(remote::Pipeline::new(url, turso_token, REMOTE_READ_STREAMS, REMOTE_READ_STREAMS_KEPT)?)
                }
                DatabaseUrl::File(_) => None,
            },
        };
        let first = db.connect().await?;
        if let DatabaseUrl::File(_) = db.url {
            // WAL is a property of the file: set once, it lets readers run beside the writer.
            pragma(&first, "PRAGMA journal_mode=WAL").await?;
            db.wal = Some(Checkpointer::spawn(db.connect().await?)?);
        }
        db.readers.push(Mutex::new(Reader { session: db.session_on(first), last_used: Instant::now() }));
        let readers = if db.is_remote() { REMOTE_READ_CONNECTIONS } else { READ_CONNECTIONS };
        for _ in 1..readers {
            let session = db.session().await?;
            db.readers.push(Mutex::new(Reader { session, last_used: Instant::now() }));
        }
        Ok(db)
    }

    /// A new connection, configured for this database's mode.
    pub async fn connect(&self) -> Result<Connection, StoreError> {
        let conn = self.inner.connect()?;
        if !self.url.is_remote() {
            conn.busy_timeout(BUSY_TIMEOUT)?;
            let sync = match self.sync {
                SyncMode::Full => "PRAGMA synchronous=FULL",
                SyncMode::Normal => "PRAGMA synchronous=NORMAL",
            };
            conn.execute(sync, ()).await?;
            // Most checkpointing happens on a thread of its own (`Checkpointer`);
            // this is the backstop that keeps the WAL bounded (see there).
            pragma(&conn, &format!("PRAGMA wal_autocheckpoint={}", Checkpointer::BACKSTOP_PAGES)).await?;
            // A WAL that is started over is cut back to this size: one burst
            // does not keep its disk space for good. (It is the connection
            // that restarts the WAL, the writer, that truncates it.)
            pragma(&conn, &format!("PRAGMA journal_size_limit={}", Checkpointer::WAL_SIZE_LIMIT)).await?;
        }
        Ok(conn)
    }

    /// A new connection that keeps the statements it prepares.
    pub async fn session(&self) -> Result<Session, StoreError> {
        Ok(self.session_on(self.connect().await?))
    }

    fn session_on(&self, conn: Connection) -> Session {
        let prepared = Prepared { local: !self.is_remote(), statements: Default::default() };
        Session { conn, prepared: Arc::new(prepared) }
    }

    /// Called by the writer after each commit, outside any transaction: tells
    /// the checkpointer, and finishes a checkpoint it asked for (see `Checkpointer`).
    pub async fn committed(&self, writer: &Session) {
        let Some(wal) = &self.wal else { return };
        wal.commits.fetch_add(1, Ordering::Relaxed);
        if wal.restart_wanted.swap(false, Ordering::Relaxed) {
            if let Err(err) = Checkpointer::checkpoint(&writer.conn).await {
                tracing::warn!(error = %err, "WAL checkpoint failed; will retry");
            }
        }
    }

    pub fn is_remote(&self) -> bool {
        self.url.is_remote()
    }

    /// Runs a transaction's steps: on a remote server as one request, on a
    /// local file through `local` (the writer's connection). An error means
    /// the batch as a whole failed to run or its outcome is unknown.
    pub async fn run_batch(&self, local: Option<&Session>, steps: &mut [Step]) -> Result<Vec<Outcome>, StoreError> {
        match (&self.pipeline, local) {
            (Some(pipeline), _) => pipeline.run(steps).await,
            (None, Some(session)) => Ok(batch::run_local(session, steps).await),
            (None, None) => Err(StoreError::Internal("a local batch needs the writer's connection".into())),
        }
    }

    /// The rows of one read-only statement, outside any transaction. On a
    /// remote server it is one request on a kept stream (the libsql client's
    /// `query` is two, a `describe` and a cursor, each on a new stream); on a
    /// file, a read connection runs it prepared. A read that failed on the
    /// way is tried once more: it changes nothing.
    pub async fn query(&self, stmt: Stmt) -> Result<Vec<Vec<Value>>, StoreError> {
        let rows = |outcome: Option<Outcome>| match outcome {
            Some(Outcome::Done { rows, .. }) => Ok(rows),
            Some(Outcome::Failed(err)) => Err(err.class),
            _ => Err(StoreError::Internal("a read did not run".into())),
        };
        if let Some(pipeline) = &self.read_pipeline {
            let steps = [Step { stmt, cond: None }];
            return match pipeline.run(&steps).await {
                Err(StoreError::Unavailable(_)) => rows(pipeline.run(&steps).await?.into_iter().next()),
                answer => rows(answer?.into_iter().next()),
            };
        }
        self.read(|session| {
            let stmt = stmt.clone();
            async move {
                let mut steps = [Step { stmt, cond: None }];
                rows(batch::run_local(&session, &mut steps).await.into_iter().next())
            }
        })
        .await
    }

    /// Runs `read` on one of the read connections. Reads never wait behind
    /// the writer: a local file runs in WAL mode, and a remote server serves
    /// reads itself. A remote connection whose stream went stale (idle expiry,
    /// server restart) is replaced and the read tried once more.
    pub async fn read<T, F, Fut>(&self, read: F) -> Result<T, StoreError>
    where
        F: Fn(Session) -> Fut,
        Fut: std::future::Future<Output = Result<T, StoreError>>,
    {
        let start = self.next_reader.fetch_add(1, Ordering::Relaxed);
        let mut slot = None;
        for offset in 0..self.readers.len() {
            if let Ok(guard) = self.readers[(start + offset) % self.readers.len()].try_lock() {
                slot = Some(guard);
                break;
            }
        }
        let mut reader = match slot {
            Some(guard) => guard,
            None => self.readers[start % self.readers.len()].lock().await,
        };
        if self.is_remote() && reader.last_used.elapsed() > REMOTE_STREAM_MAX_IDLE {
            reader.session = self.session().await?;
        }
        reader.last_used = Instant::now();
        match read(reader.session.clone()).await {
            Err(StoreError::Unavailable(_)) if self.is_remote() => {
                reader.session = self.session().await?;
                read(reader.session.clone()).await
            }
            result => result,
        }
    }
}

/// Copies committed pages from the WAL back into the database file, on a
/// thread of its own. SQLite's automatic checkpoint does it inside the commit
/// that crosses 1000 WAL pages, holding up every write queued behind that
/// commit (a fifth of the writer's time under load). A PASSIVE checkpoint
/// never waits for the writer or for readers: it copies what no reader still
/// needs.
///
/// It cannot start the WAL over, though: that needs a moment when every frame
/// is copied and a writer begins, and under steady writes new frames arrive
/// while it copies (two processes writing one file grew the WAL to 300 MB).
/// So once the WAL holds `RESTART_AFTER_PAGES`, the checkpointer asks the
/// writer to finish the job between two transactions: a checkpoint that finds
/// nearly everything copied, after which the next transaction starts the WAL
/// over. SQLite's own automatic checkpoint stays on at `BACKSTOP_PAGES`, in
/// case this thread falls behind.
struct Checkpointer;

/// What the writer and the checkpointer thread share.
struct WalState {
    /// Commits since the database opened.
    commits: AtomicU64,
    /// Set by the checkpointer when the WAL should be started over.
    restart_wanted: std::sync::atomic::AtomicBool,
}

impl Checkpointer {
    /// How often the WAL is checkpointed while writes come in.
    const INTERVAL: Duration = Duration::from_millis(200);
    /// WAL pages (4 KiB) after which the writer is asked to finish a checkpoint.
    const RESTART_AFTER_PAGES: i64 = 2048;
    /// WAL pages after which a commit checkpoints by itself (SQLite's automatic checkpoint).
    const BACKSTOP_PAGES: u32 = 16384;
    /// A WAL that is started over is cut back to this size, so one burst does
    /// not keep its disk space for good.
    const WAL_SIZE_LIMIT: i64 = 64 * 1024 * 1024;

    /// Starts the thread; it stops once the returned state has no other owner
    /// (the database was dropped).
    fn spawn(conn: Connection) -> Result<Arc<WalState>, StoreError> {
        let wal = Arc::new(WalState { commits: AtomicU64::new(0), restart_wanted: Default::default() });
        let watched = wal.clone();
        // Normal priority: a checkpointer starved by busy request threads would let the WAL grow.
        threads::spawn("statehouse-ckpt", Priority::Normal, move |_| Checkpointer::run(conn, watched))
            .map_err(|err| StoreError::Internal(format!("cannot start the checkpoint thread: {err}")))?;
        Ok(wal)
    }

    async fn run(conn: Connection, wal: Arc<WalState>) {
        let mut checkpointed = 0;
        while Arc::strong_count(&wal) > 1 {
            std::thread::sleep(Self::INTERVAL);
            let now = wal.commits.load(Ordering::Relaxed);
            if now == checkpointed {
                continue;
            }
            match Self::checkpoint(&conn).await {
                Ok(pages) => {
                    checkpointed = now;
                    if pages >= Self::RESTART_AFTER_PAGES {
                        wal.restart_wanted.store(true, Ordering::Relaxed);
                    }
                }
                // Nothing is lost: the pages stay in the WAL, and the next round tries again.
                Err(err) => tracing::warn!(error = %err, "WAL checkpoint failed; will retry"),
            }
        }
        // The last connection to close checkpoints what is left.
    }

    /// A PASSIVE checkpoint; the number of pages in the WAL.
    async fn checkpoint(conn: &Connection) -> Result<i64, StoreError> {
        let mut rows = conn.query("PRAGMA wal_checkpoint(PASSIVE)", ()).await?;
        let pages = match rows.next().await? {
            Some(row) => row.get::<i64>(1)?,
            None => 0,
        };
        while rows.next().await?.is_some() {}
        Ok(pages)
    }
}

/// Runs a pragma, whether or not it answers with a row.
async fn pragma(conn: &Connection, sql: &str) -> Result<(), StoreError> {
    let mut rows = conn.query(sql, ()).await?;
    while rows.next().await?.is_some() {}
    Ok(())
}

pub struct Migration {
    pub version: i64,
    pub name: &'static str,
    pub sql: &'static str,
}

/// The schema, in order. `migrations/` holds the same files; a test keeps them in step.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "0001_objects_and_kv.sql",
        sql: include_str!("../migrations/0001_objects_and_kv.sql"),
    },
    Migration { version: 2, name: "0002_blobs.sql", sql: include_str!("../migrations/0002_blobs.sql") },
    Migration { version: 3, name: "0003_outbox.sql", sql: include_str!("../migrations/0003_outbox.sql") },
    Migration {
        version: 4,
        name: "0004_iceberg_catalog.sql",
        sql: include_str!("../migrations/0004_iceberg_catalog.sql"),
    },
    Migration {
        version: 5,
        name: "0005_write_assertions.sql",
        sql: include_str!("../migrations/0005_write_assertions.sql"),
    },
    Migration { version: 6, name: "0006_history.sql", sql: include_str!("../migrations/0006_history.sql") },
    Migration { version: 7, name: "0007_alarms.sql", sql: include_str!("../migrations/0007_alarms.sql") },
];

pub fn latest_migration() -> i64 {
    MIGRATIONS.last().map_or(0, |m| m.version)
}

/// Applies every migration not yet recorded, each exactly once, even when
/// several replicas start at the same moment (they serialise on the write lock).
/// Returns the names of the migrations this call applied.
pub async fn migrate(conn: &Connection) -> Result<Vec<&'static str>, StoreError> {
    conn.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations (
             version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at INTEGER NOT NULL)",
        (),
    )
    .await?;
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).await?;
    let mut applied = Vec::new();
    let mut rows = tx.query("SELECT version FROM schema_migrations", ()).await?;
    while let Some(row) = rows.next().await? {
        applied.push(row.get::<i64>(0)?);
    }
    drop(rows);
    if let Some(unknown) = applied.iter().find(|v| **v > latest_migration()) {
        tx.rollback().await?;
        return Err(StoreError::Internal(format!(
            "the database has migration {unknown}, newer than this binary knows (latest {}); upgrade statehouse",
            latest_migration()
        )));
    }
    let mut done = Vec::new();
    for migration in MIGRATIONS.iter().filter(|m| !applied.contains(&m.version)) {
        tx.execute_batch(migration.sql).await?;
        tx.execute(
            "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?1, ?2, ?3)",
            libsql::params![migration.version, migration.name, crate::clock::now_ms()],
        )
        .await?;
        done.push(migration.name);
    }
    tx.commit().await?;
    Ok(done)
}

/// The highest migration recorded, or an error when the table is missing or unreachable.
pub async fn schema_version(session: &Session) -> Result<i64, StoreError> {
    session
        .first_row("SELECT COALESCE(MAX(version), 0) FROM schema_migrations", (), |row| row.get::<i64>(0))
        .await?
        .ok_or_else(|| StoreError::Internal("no row from MAX(version)".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrations_match_the_folder() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/migrations");
        let mut files: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".sql"))
            .collect();
        files.sort();
        let listed: Vec<String> = MIGRATIONS.iter().map(|m| m.name.to_string()).collect();
        assert_eq!(files, listed, "every file in migrations/ must be listed in db::MIGRATIONS, in order");
        for (i, m) in MIGRATIONS.iter().enumerate() {
            assert_eq!(m.version, i as i64 + 1);
            assert!(m.name.starts_with(&format!("{:04}_", m.version)));
        }
    }
}
