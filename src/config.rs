//! Typed settings. Every setting is an environment variable and a flag of the
//! same meaning; a bad value stops the process at start with one line naming it.

use std::net::SocketAddr;
use std::time::Duration;

use clap::builder::TypedValueParser as _;
use clap::{Args, Parser, Subcommand, ValueEnum};
use serde::Serialize;

#[derive(Debug, Parser)]
#[command(
    name = "statehouse",
    version,
    about = "Durable-Object-style state for stateless servers: fenced per-object key-value storage on libSQL"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,

    /// Settings used when no subcommand is given (same as `serve`).
    #[command(flatten)]
    pub serve: Settings,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the HTTP server (the default).
    Serve(Box<Settings>),
    /// Apply pending database migrations and exit.
    Migrate(DatabaseSettings),
    /// Create a random bearer token and print it with its line for STATEHOUSE_AUTH_TOKENS.
    Token(TokenRequest),
}

/// `statehouse token`: the token is printed once; only its hash goes into the configuration.
#[derive(Debug, Clone, Args)]
pub struct TokenRequest {
    /// A name for the token, shown in logs and used for its rate limit (not secret).
    #[arg(long)]
    pub name: String,
    /// Namespace patterns the token may touch: `*`, `orders`, `payments.*` (comma-separated).
    #[arg(long, default_value = "*")]
    pub namespaces: String,
    /// Rights: any of read, write, admin, analytics (comma-separated; admin and analytics need namespaces `*`).
    #[arg(long, default_value = "read,write")]
    pub rights: String,
}

/// Who may call, how often, and from which browser origins.
#[derive(Debug, Clone, Args, Serialize)]
pub struct AccessSettings {
    /// Bearer tokens, one per line or `;`: `<name> sha256:<hex> <namespaces> <rights> [rate=<per-sec>[/<burst>]]`.
    #[arg(long = "auth-tokens", env = "STATEHOUSE_AUTH_TOKENS", hide_env_values = true)]
    pub auth_tokens: Option<Secret>,

    /// A file with more token lines in the same format (e.g. a mounted secret).
    #[arg(long = "auth-file", env = "STATEHOUSE_AUTH_FILE")]
    pub auth_file: Option<std::path::PathBuf>,

    /// Shared secret (at least 32 bytes) that verifies HS256 JWTs.
    #[arg(long = "jwt-hs256-secret", env = "STATEHOUSE_JWT_HS256_SECRET", hide_env_values = true)]
    pub jwt_hs256_secret: Option<Secret>,

    /// A JWKS file whose RSA (RS256) and P-256 (ES256) keys verify JWTs.
    #[arg(long = "jwt-jwks-file", env = "STATEHOUSE_JWT_JWKS_FILE")]
    pub jwt_jwks_file: Option<std::path::PathBuf>,

    /// The `aud` every JWT must carry (required when JWTs are accepted).
    #[arg(long = "jwt-audience", env = "STATEHOUSE_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,

    /// The `iss` every JWT must carry (required when JWTs are accepted).
    #[arg(long = "jwt-issuer", env = "STATEHOUSE_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,

    /// Secret (at least 32 bytes, the same on every replica) that signs writes forwarded between replicas.
    #[arg(long = "peer-secret", env = "STATEHOUSE_PEER_SECRET", hide_env_values = true)]
    pub peer_secret: Option<Secret>,

    /// Serve without authentication on a non-loopback address (never in production).
    #[arg(long = "insecure", env = "STATEHOUSE_INSECURE", default_value_t = false, action = clap::ArgAction::Set)]
    pub insecure: bool,

    /// Requests per second each caller may make (token bucket; 0 = unlimited).
    #[arg(long = "rate-limit-per-sec", env = "STATEHOUSE_RATE_LIMIT_PER_SEC", default_value_t = 0,
          value_parser = clap::value_parser!(u64).range(0..=10_000_000))]
    pub rate_limit_per_sec: u64,

    /// Requests a caller may make at once above its rate (0 = one second's worth).
    #[arg(long = "rate-limit-burst", env = "STATEHOUSE_RATE_LIMIT_BURST", default_value_t = 0,
          value_parser = clap::value_parser!(u64).range(0..=10_000_000))]
    pub rate_limit_burst: u64,

    /// Most client connections served at once; more wait in the listen backlog.
    #[arg(long = "max-connections", env = "STATEHOUSE_MAX_CONNECTIONS", default_value_t = 4096,
          value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub max_connections: u64,

    /// Browser origins allowed by CORS: `*` or a comma-separated list of origins (unset = CORS off).
    #[arg(long = "cors-origins", env = "STATEHOUSE_CORS_ORIGINS", value_parser = parse_cors_origins)]
    pub cors_origins: Option<String>,
}

/// Where the state lives. Shared by `serve` and `migrate`.
#[derive(Debug, Clone, Args, Serialize)]
pub struct DatabaseSettings {
    /// libSQL URL: `file:<path>`, `libsql://...`, `http(s)://...`.
    #[arg(long = "turso-url", env = "TURSO_URL", default_value = "file:./data/statehouse.db",
          value_parser = parse_database_url)]
    pub turso_url: DatabaseUrl,

    /// Auth token for a remote libSQL server (Turso or sqld with JWT auth).
    #[arg(long = "turso-token", env = "TURSO_TOKEN", hide_env_values = true)]
    pub turso_token: Option<Secret>,

    /// Durability of each commit on a local file: `full` fsyncs every commit.
    #[arg(long = "sync", env = "STATEHOUSE_SYNC", value_enum, default_value_t = SyncMode::Full)]
    pub sync: SyncMode,
}

/// Where blobs (and the Iceberg export) go: a local folder, or an
/// S3-compatible store when all four R2_* credentials are set.
#[derive(Debug, Clone, Args, Serialize)]
pub struct ObjectStoreSettings {
    /// The local folder used when no S3-compatible store is configured.
    #[arg(long = "objects-dir", env = "STATEHOUSE_OBJECTS_DIR", default_value = "./data/objects")]
    pub objects_dir: std::path::PathBuf,

    /// S3-compatible endpoint (R2, S3, Tigris, MinIO), e.g. https://<account>.r2.cloudflarestorage.com.
    #[arg(long = "r2-endpoint", env = "R2_ENDPOINT", value_parser = parse_http_url)]
    pub r2_endpoint: Option<String>,

    /// Bucket for blobs and the Iceberg warehouse.
    #[arg(long = "r2-bucket", env = "R2_BUCKET", value_parser = parse_bucket)]
    pub r2_bucket: Option<String>,

    #[arg(long = "r2-access-key-id", env = "R2_ACCESS_KEY_ID", hide_env_values = true)]
    pub r2_access_key_id: Option<Secret>,

    #[arg(long = "r2-secret-access-key", env = "R2_SECRET_ACCESS_KEY", hide_env_values = true)]
    pub r2_secret_access_key: Option<Secret>,

    /// Region to sign requests for (`auto` suits R2; MinIO accepts any).
    #[arg(long = "r2-region", env = "R2_REGION", default_value = "auto")]
    pub r2_region: String,

    /// Create the bucket at start when it is missing (development stacks).
    #[arg(long = "create-bucket", env = "STATEHOUSE_CREATE_BUCKET", default_value_t = false, action = clap::ArgAction::Set)]
    pub create_bucket: bool,
}

/// What the Iceberg REST catalog (`/iceberg`) tells analysts' engines about
/// the warehouse's storage. The server's own store keys are never handed out:
/// readers bring their own, or get the read-only pair an operator sets here.
#[derive(Debug, Clone, Args, Serialize)]
pub struct IcebergReaderSettings {
    /// S3 endpoint the catalog gives readers, when they reach the bucket by another address than the server does.
    #[arg(long = "iceberg-s3-endpoint", env = "STATEHOUSE_ICEBERG_S3_ENDPOINT", value_parser = parse_http_url)]
    #[serde(rename = "iceberg_s3_endpoint")]
    pub s3_endpoint: Option<String>,

    /// Read-only S3 access key the catalog vends to analysts with each table (never the server's own).
    #[arg(
        long = "iceberg-reader-access-key-id",
        env = "STATEHOUSE_ICEBERG_READER_ACCESS_KEY_ID",
        hide_env_values = true
    )]
    #[serde(rename = "iceberg_reader_access_key_id")]
    pub access_key_id: Option<Secret>,

    /// The secret of STATEHOUSE_ICEBERG_READER_ACCESS_KEY_ID.
    #[arg(
        long = "iceberg-reader-secret-access-key",
        env = "STATEHOUSE_ICEBERG_READER_SECRET_ACCESS_KEY",
        hide_env_values = true
    )]
    #[serde(rename = "iceberg_reader_secret_access_key")]
    pub secret_access_key: Option<Secret>,
}

/// Where else the object store's settings may come from: fly.io Tigris's
/// variables (`fly storage create` sets them), used when no R2_* store setting
/// is given; and whether a local objects folder is storage every replica shares.
#[derive(Debug, Clone, Args, Serialize)]
pub struct StoreFallbacks {
    /// The local objects folder is storage every replica shares (a network volume), so a remote TURSO_URL may use it.
    #[arg(long = "objects-dir-shared", env = "STATEHOUSE_OBJECTS_DIR_SHARED", default_value_t = false,
          action = clap::ArgAction::Set)]
    pub objects_dir_shared: bool,

    /// Tigris/S3 endpoint; stands in for R2_ENDPOINT when no R2_* store setting is given.
    #[arg(long = "aws-endpoint-url-s3", env = "AWS_ENDPOINT_URL_S3", value_parser = parse_http_url)]
    pub aws_endpoint_url_s3: Option<String>,

    /// Bucket; stands in for R2_BUCKET when no R2_* store setting is given.
    #[arg(long = "bucket-name", env = "BUCKET_NAME", value_parser = parse_bucket)]
    pub bucket_name: Option<String>,

    /// Stands in for R2_ACCESS_KEY_ID with AWS_ENDPOINT_URL_S3 / BUCKET_NAME.
    #[arg(long = "aws-access-key-id", env = "AWS_ACCESS_KEY_ID", hide_env_values = true)]
    pub aws_access_key_id: Option<Secret>,

    /// Stands in for R2_SECRET_ACCESS_KEY with AWS_ENDPOINT_URL_S3 / BUCKET_NAME.
    #[arg(long = "aws-secret-access-key", env = "AWS_SECRET_ACCESS_KEY", hide_env_values = true)]
    pub aws_secret_access_key: Option<Secret>,

    /// Stands in for R2_REGION (when R2_REGION is not given) with AWS_ENDPOINT_URL_S3 / BUCKET_NAME.
    #[arg(long = "aws-region", env = "AWS_REGION")]
    pub aws_region: Option<String>,
}

#[derive(Debug, Clone, Args, Serialize)]
pub struct Settings {
    #[command(flatten)]
    #[serde(flatten)]
    pub database: DatabaseSettings,

    #[command(flatten)]
    #[serde(flatten)]
    pub objects: ObjectStoreSettings,

    #[command(flatten)]
    #[serde(flatten)]
    pub store_fallbacks: StoreFallbacks,

    #[command(flatten)]
    #[serde(flatten)]
    pub access: AccessSettings,

    #[command(flatten)]
    #[serde(flatten)]
    pub iceberg_readers: IcebergReaderSettings,

    /// Largest blob accepted by `PUT .../blobs/{name}`, in bytes.
    #[arg(long = "max-blob-bytes", env = "STATEHOUSE_MAX_BLOB_BYTES", default_value_t = 5 * 1024 * 1024 * 1024,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub max_blob_bytes: u64,

    /// Change-log rows carry a value's bytes up to this many; longer values are truncated and flagged, and
    /// a restore that needs one is refused. Default: the largest value allowed, so every value is restorable.
    #[arg(long = "change-value-cap-bytes", env = "STATEHOUSE_CHANGE_VALUE_CAP_BYTES",
          value_parser = clap::value_parser!(u64).range(0..=(1u64 << 30)))]
    pub change_value_cap_bytes: Option<u64>,

    /// How far back objects can be restored (e.g. `30d`, `12h`, `90s`): replaced and deleted blob bytes
    /// are kept this long (and as long again, at most an hour more), and a restore to an older point is refused.
    #[arg(long = "history-retention", env = "STATEHOUSE_HISTORY_RETENTION", value_name = "DURATION",
          default_value = "30d", value_parser = parse_retention)]
    #[serde(serialize_with = "as_human")]
    pub history_retention: Duration,

    /// How often unreferenced blob bytes are deleted and Iceberg snapshots expired and orphan files removed, in ms.
    #[arg(long = "sweep-interval-ms", env = "STATEHOUSE_SWEEP_INTERVAL_MS", value_name = "MS", default_value = "300000",
          value_parser = clap::value_parser!(u64).range(100..).map(Duration::from_millis))]
    #[serde(rename = "sweep_interval_ms", serialize_with = "as_millis")]
    pub sweep_interval: Duration,

    /// Uploads never committed, and warehouse files no snapshot refers to, are deleted once this old, in ms.
    #[arg(long = "orphan-grace-ms", env = "STATEHOUSE_ORPHAN_GRACE_MS", value_name = "MS", default_value = "3600000",
          value_parser = clap::value_parser!(u64).range(0..).map(Duration::from_millis))]
    #[serde(rename = "orphan_grace_ms", serialize_with = "as_millis")]
    pub orphan_grace: Duration,

    /// Whether this replica takes part in exporting the outbox to Iceberg (one replica exports at a time).
    #[arg(long = "export-enabled", env = "STATEHOUSE_EXPORT_ENABLED", default_value_t = true,
          action = clap::ArgAction::Set)]
    pub export_enabled: bool,

    /// How often the outbox is exported to the Iceberg tables, in milliseconds.
    #[arg(long = "export-interval-ms", env = "STATEHOUSE_EXPORT_INTERVAL_MS", value_name = "MS", default_value = "5000",
          value_parser = clap::value_parser!(u64).range(100..).map(Duration::from_millis))]
    #[serde(rename = "export_interval_ms", serialize_with = "as_millis")]
    pub export_interval: Duration,

    /// Most outbox rows in one Iceberg snapshot; a backlog this large is exported without waiting for the interval.
    #[arg(long = "export-batch-rows", env = "STATEHOUSE_EXPORT_BATCH_ROWS", default_value_t = 100_000,
          value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    pub export_batch_rows: u64,

    /// Snapshots older than this are expired (their unreferenced files deleted after the orphan grace), in milliseconds.
    #[arg(long = "export-snapshot-max-age-ms", env = "STATEHOUSE_EXPORT_SNAPSHOT_MAX_AGE_MS", value_name = "MS", default_value = "86400000",
          value_parser = clap::value_parser!(u64).range(0..).map(Duration::from_millis))]
    #[serde(rename = "export_snapshot_max_age_ms", serialize_with = "as_millis")]
    pub export_snapshot_max_age: Duration,

    /// The most recent snapshots of each table are kept whatever their age.
    #[arg(long = "export-min-snapshots", env = "STATEHOUSE_EXPORT_MIN_SNAPSHOTS", default_value_t = 10,
          value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub export_min_snapshots: u64,

    /// Whether the exporter compacts the Iceberg tables in its maintenance pass (every sweep interval).
    #[arg(long = "compaction-enabled", env = "STATEHOUSE_COMPACTION_ENABLED", default_value_t = true,
          action = clap::ArgAction::Set)]
    pub compaction_enabled: bool,

    /// Size compaction rewrites small data files into, in bytes; files under 3/4 of it count as small.
    #[arg(long = "compaction-target-bytes", env = "STATEHOUSE_COMPACTION_TARGET_BYTES", default_value_t = 128 * 1024 * 1024,
          value_parser = clap::value_parser!(u64).range(1024..=(1u64 << 40)))]
    pub compaction_target_bytes: u64,

    /// A partition's small data files are rewritten once it has at least this many.
    #[arg(long = "compaction-min-files", env = "STATEHOUSE_COMPACTION_MIN_FILES", default_value_t = 5,
          value_parser = clap::value_parser!(u64).range(2..=1_000_000))]
    pub compaction_min_files: u64,

    /// A table with more manifests than this has them merged, whether or not files are rewritten.
    #[arg(long = "compaction-max-manifests", env = "STATEHOUSE_COMPACTION_MAX_MANIFESTS", default_value_t = 8,
          value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub compaction_max_manifests: u64,

    #[command(flatten)]
    #[serde(flatten)]
    pub alarms: AlarmSettings,

    /// Address to bind the HTTP server to (`0.0.0.0:8080` in container images).
    #[arg(long = "listen", env = "STATEHOUSE_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,

    /// URL other replicas use to reach this one; derived from the bound address when unset.
    #[arg(long = "advertise-url", env = "STATEHOUSE_ADVERTISE_URL", value_parser = parse_http_url)]
    pub advertise_url: Option<String>,

    /// How long an object lease lasts without renewal, in milliseconds.
    #[arg(long = "lease-ms", env = "STATEHOUSE_LEASE_MS", value_name = "MS", default_value = "10000",
          value_parser = clap::value_parser!(u64).range(100..=600_000).map(Duration::from_millis))]
    #[serde(rename = "lease_ms", serialize_with = "as_millis")]
    pub lease: Duration,

    /// How long before its lease ends an owner stops answering reads from
    /// memory, in milliseconds (default: a quarter of the lease). It must
    /// exceed how far replicas' clocks may disagree over one lease.
    #[arg(long = "lease-read-margin-ms", env = "STATEHOUSE_LEASE_READ_MARGIN_MS", value_name = "MS",
          value_parser = clap::value_parser!(u64).range(0..=600_000).map(Duration::from_millis))]
    #[serde(rename = "lease_read_margin_ms", serialize_with = "as_optional_millis")]
    pub lease_read_margin: Option<Duration>,

    /// Memory for owner-resident object state (keys' versions and sizes,
    /// small values), in bytes; 0 turns it off (every check and read goes to the database).
    #[arg(long = "cache-bytes", env = "STATEHOUSE_CACHE_BYTES", default_value_t = 256 * 1024 * 1024,
          value_parser = clap::value_parser!(u64).range(0..=1 << 40))]
    pub cache_bytes: u64,

    /// This replica's identity for its lifetime; a fresh UUID v7 when unset.
    #[arg(long = "instance-id", env = "STATEHOUSE_INSTANCE_ID", value_parser = parse_instance_id)]
    pub instance_id: Option<String>,

    /// Largest value accepted by `PUT .../kv/{key}`, in bytes.
    #[arg(long = "max-value-bytes", env = "STATEHOUSE_MAX_VALUE_BYTES", default_value_t = 2 * 1024 * 1024,
          value_parser = clap::value_parser!(u64).range(1..=(1u64 << 30)))]
    pub max_value_bytes: u64,

    /// Largest JSON body accepted by the batch endpoint, in bytes.
    #[arg(long = "max-batch-bytes", env = "STATEHOUSE_MAX_BATCH_BYTES", default_value_t = 16 * 1024 * 1024,
          value_parser = clap::value_parser!(u64).range(1024..=(1u64 << 31)))]
    pub max_batch_bytes: u64,

    /// Upper bound on the handling time of one request, in milliseconds.
    #[arg(long = "request-timeout-ms", env = "STATEHOUSE_REQUEST_TIMEOUT_MS", value_name = "MS", default_value = "30000",
          value_parser = clap::value_parser!(u64).range(100..=3_600_000).map(Duration::from_millis))]
    #[serde(rename = "request_timeout_ms", serialize_with = "as_millis")]
    pub request_timeout: Duration,

    /// How long to wait for the owner replica when forwarding a write, in milliseconds.
    #[arg(long = "forward-timeout-ms", env = "STATEHOUSE_FORWARD_TIMEOUT_MS", value_name = "MS", default_value = "5000",
          value_parser = clap::value_parser!(u64).range(50..=600_000).map(Duration::from_millis))]
    #[serde(rename = "forward_timeout_ms", serialize_with = "as_millis")]
    pub forward_timeout: Duration,

    /// Log format: `json` (one object per line) or `text`.
    #[arg(long = "log-format", env = "STATEHOUSE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Json)]
    pub log_format: LogFormat,

    /// Log filter in `tracing` syntax, e.g. `info` or `statehouse=debug`.
    #[arg(long = "log", env = "STATEHOUSE_LOG", default_value = "info")]
    pub log_filter: String,

    /// Set by fly.io on every machine; makes writes for objects owned elsewhere answer with `fly-replay`.
    #[arg(long = "fly-machine-id", env = "FLY_MACHINE_ID")]
    pub fly_machine_id: Option<String>,

    /// Print the effective settings as JSON (secrets redacted) and exit.
    #[arg(long = "dump-config")]
    #[serde(skip)]
    pub dump_config: bool,
}

/// Where alarms are delivered, how they are signed, and how deliveries are retried.
#[derive(Debug, Clone, Args, Serialize)]
pub struct AlarmSettings {
    /// Webhook targets by namespace pattern: `carts=https://app/alarms;*=https://other/alarms` (unset = alarms off).
    #[arg(long = "alarm-targets", env = "STATEHOUSE_ALARM_TARGETS")]
    pub alarm_targets: Option<String>,

    /// Secret (at least 32 bytes) that signs every alarm delivery (HMAC-SHA256); required with targets.
    #[arg(long = "alarm-secret", env = "STATEHOUSE_ALARM_SECRET", hide_env_values = true)]
    pub alarm_secret: Option<Secret>,

    /// Wait before the first retry of a failed delivery, in ms; each further retry waits twice as long.
    #[arg(long = "alarm-retry-base-ms", env = "STATEHOUSE_ALARM_RETRY_BASE_MS", value_name = "MS", default_value = "2000",
          value_parser = clap::value_parser!(u64).range(1..=3_600_000).map(Duration::from_millis))]
    #[serde(rename = "alarm_retry_base_ms", serialize_with = "as_millis")]
    pub alarm_retry_base: Duration,

    /// Retries of a failed delivery before the alarm is dropped and recorded as failed.
    #[arg(long = "alarm-max-retries", env = "STATEHOUSE_ALARM_MAX_RETRIES", default_value_t = 6,
          value_parser = clap::value_parser!(u64).range(0..=100))]
    pub alarm_max_retries: u64,

    /// How long a delivery may take before it counts as failed, in ms.
    #[arg(long = "alarm-timeout-ms", env = "STATEHOUSE_ALARM_TIMEOUT_MS", value_name = "MS", default_value = "10000",
          value_parser = clap::value_parser!(u64).range(10..=600_000).map(Duration::from_millis))]
    #[serde(rename = "alarm_timeout_ms", serialize_with = "as_millis")]
    pub alarm_timeout: Duration,

    /// Deliveries this replica makes at once.
    #[arg(long = "alarm-concurrency", env = "STATEHOUSE_ALARM_CONCURRENCY", default_value_t = 512,
          value_parser = clap::value_parser!(u64).range(1..=65_536))]
    pub alarm_concurrency: u64,

    /// How often the delivery pass looks for due alarms, in ms.
    #[arg(long = "alarm-poll-ms", env = "STATEHOUSE_ALARM_POLL_MS", value_name = "MS", default_value = "100",
          value_parser = clap::value_parser!(u64).range(5..=60_000).map(Duration::from_millis))]
    #[serde(rename = "alarm_poll_ms", serialize_with = "as_millis")]
    pub alarm_poll: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SyncMode {
    /// fsync on every commit: an acknowledged write survives power loss.
    Full,
    /// WAL without fsync per commit: survives a process crash, not power loss.
    Normal,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Json,
    Text,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(into = "String")]
pub enum DatabaseUrl {
    /// An embedded libSQL file.
    File(std::path::PathBuf),
    /// A libSQL server reached over Hrana (Turso, sqld); stored as an http(s) URL.
    Remote(String),
}

impl From<DatabaseUrl> for String {
    fn from(url: DatabaseUrl) -> String {
        match url {
            DatabaseUrl::File(path) => format!("file:{}", path.display()),
            DatabaseUrl::Remote(url) => url,
        }
    }
}

impl DatabaseUrl {
    pub fn is_remote(&self) -> bool {
        matches!(self, DatabaseUrl::Remote(_))
    }
}

fn parse_database_url(raw: &str) -> Result<DatabaseUrl, String> {
    if let Some(path) = raw.strip_prefix("file:") {
        let path = path.strip_prefix("//").unwrap_or(path);
        if path.is_empty() {
            return Err("a file: URL needs a path, e.g. file:./data/statehouse.db".into());
        }
        return Ok(DatabaseUrl::File(path.into()));
    }
    let url =
        url::Url::parse(raw).map_err(|e| format!("not a URL ({e}); expected file:, libsql://, http:// or https://"))?;
    if url.host_str().is_none() {
        return Err("the URL has no host".into());
    }
    // The libsql client speaks Hrana over HTTP; `libsql://` is Turso's alias for https.
    let remote = match url.scheme() {
        "http" | "https" => raw.to_string(),
        "libsql" => format!("https://{}", &raw["libsql://".len()..]),
        other => return Err(format!("unsupported scheme `{other}`; expected file:, libsql://, http:// or https://")),
    };
    Ok(DatabaseUrl::Remote(remote))
}

fn parse_http_url(raw: &str) -> Result<String, String> {
    let url = url::Url::parse(raw).map_err(|e| format!("not a URL ({e})"))?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err("expected an http(s) URL with a host, e.g. http://10.0.0.5:8080".into());
    }
    Ok(raw.trim_end_matches('/').to_string())
}

fn parse_cors_origins(raw: &str) -> Result<String, String> {
    let raw = raw.trim();
    if raw == "*" {
        return Ok(raw.to_string());
    }
    for origin in raw.split(',').map(str::trim) {
        let url =
            url::Url::parse(origin).map_err(|_| format!("{origin:?} is not an origin like https://app.example.com"))?;
        let bare = url.path() == "/" && !origin.ends_with('/') && url.query().is_none();
        if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() || !bare {
            return Err(format!("{origin:?} is not an origin (scheme://host[:port], no path)"));
        }
    }
    Ok(raw.to_string())
}

fn parse_bucket(raw: &str) -> Result<String, String> {
    let ok = (3..=63).contains(&raw.len())
        && raw.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-.".contains(&b));
    if ok {
        Ok(raw.to_string())
    } else {
        Err("3-63 characters of [a-z0-9.-]".into())
    }
}

fn parse_instance_id(raw: &str) -> Result<String, String> {
    let ok =
        !raw.is_empty() && raw.len() <= 128 && raw.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b));
    if ok {
        Ok(raw.to_string())
    } else {
        Err("1-128 characters of [A-Za-z0-9-_.:]".into())
    }
}

impl ObjectStoreSettings {
    /// Whether any of the R2_* store settings is given.
    fn any_s3_setting(&self) -> bool {
        self.r2_endpoint.is_some()
            || self.r2_bucket.is_some()
            || self.r2_access_key_id.is_some()
            || self.r2_secret_access_key.is_some()
    }
}

/// Durations are set and shown in milliseconds, as their names say.
fn parse_retention(raw: &str) -> Result<Duration, String> {
    let duration =
        humantime::parse_duration(raw.trim()).map_err(|e| format!("{e}: give a duration such as 30d, 12h or 90s"))?;
    // Kept blob bytes are compared in Unix milliseconds: stay far from overflow.
    if duration > Duration::from_secs(100 * 365 * 86_400) {
        return Err("at most 100 years".into());
    }
    Ok(duration)
}

fn as_human<S: serde::Serializer>(value: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&humantime::format_duration(*value).to_string())
}

fn as_millis<S: serde::Serializer>(value: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(value.as_millis() as u64)
}

fn as_optional_millis<S: serde::Serializer>(value: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match value {
        Some(value) => as_millis(value, s),
        None => s.serialize_none(),
    }
}

/// A credential from the settings. It prints and serialises as
/// `<redacted>` (logs, `--dump-config`, panics); `expose` is the one way to
/// its text, for the code that hands it on.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl From<String> for Secret {
    fn from(text: String) -> Secret {
        Secret(text)
    }
}

impl From<&str> for Secret {
    fn from(text: &str) -> Secret {
        Secret(text.to_string())
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("<redacted>")
    }
}

impl Settings {
    /// How many bytes of a value the change log keeps inline.
    pub fn change_value_cap(&self) -> u64 {
        self.change_value_cap_bytes.unwrap_or(self.max_value_bytes)
    }

    /// How long before its lease ends an owner stops answering reads from memory.
    pub fn read_margin(&self) -> Duration {
        self.lease_read_margin.unwrap_or(self.lease / 4)
    }

    /// Settings for tests and embedding: the defaults, with the database at `url`.
    pub fn for_database(url: &str) -> Result<Settings, String> {
        use clap::{CommandFactory, FromArgMatches};
        let matches =
            Cli::command().try_get_matches_from(["statehouse", "--turso-url", url]).map_err(|e| e.to_string())?;
        let mut cli = Cli::from_arg_matches(&matches).map_err(|e| e.to_string())?;
        cli.serve.resolve_object_store(given(&matches, "r2_region"))?;
        Ok(cli.serve)
    }

    /// fly.io Tigris's variables configure the store when no R2_* store setting
    /// is given and AWS_ENDPOINT_URL_S3 or BUCKET_NAME is: AWS keys and a
    /// region alone are too common in environments that mean nothing to us.
    /// R2_REGION, when given, beats AWS_REGION too.
    fn resolve_object_store(&mut self, r2_region_given: bool) -> Result<(), String> {
        let (store, aws) = (&mut self.objects, &self.store_fallbacks);
        if store.any_s3_setting() || (aws.aws_endpoint_url_s3.is_none() && aws.bucket_name.is_none()) {
            return Ok(());
        }
        let parts = [
            ("AWS_ENDPOINT_URL_S3", aws.aws_endpoint_url_s3.is_some()),
            ("BUCKET_NAME", aws.bucket_name.is_some()),
            ("AWS_ACCESS_KEY_ID", aws.aws_access_key_id.is_some()),
            ("AWS_SECRET_ACCESS_KEY", aws.aws_secret_access_key.is_some()),
        ];
        let missing: Vec<&str> = parts.iter().filter(|(_, given)| !given).map(|(n, _)| *n).collect();
        if !missing.is_empty() {
            return Err(format!(
                "a store from fly.io Tigris's variables needs AWS_ENDPOINT_URL_S3, BUCKET_NAME, AWS_ACCESS_KEY_ID and \
                 AWS_SECRET_ACCESS_KEY; missing {} (R2_ENDPOINT, R2_BUCKET, R2_ACCESS_KEY_ID and R2_SECRET_ACCESS_KEY, \
                 when set, are used instead)",
                missing.join(", ")
            ));
        }
        store.r2_endpoint = aws.aws_endpoint_url_s3.clone();
        store.r2_bucket = aws.bucket_name.clone();
        store.r2_access_key_id = aws.aws_access_key_id.clone();
        store.r2_secret_access_key = aws.aws_secret_access_key.clone();
        if let (false, Some(region)) = (r2_region_given, &aws.aws_region) {
            store.r2_region = region.clone();
        }
        Ok(())
    }

    /// Vended reader keys come as a pair, only with an S3 store, and never as
    /// the server's own (which can write and delete everything).
    fn check_iceberg_readers(&self) -> Result<(), String> {
        let readers = &self.iceberg_readers;
        let s3 = self.objects.r2_endpoint.is_some();
        match (&readers.access_key_id, &readers.secret_access_key) {
            (None, None) => {}
            (Some(_), None) | (None, Some(_)) => {
                return Err("STATEHOUSE_ICEBERG_READER_ACCESS_KEY_ID and STATEHOUSE_ICEBERG_READER_SECRET_ACCESS_KEY \
                            are set together or not at all"
                    .into())
            }
            (Some(_), Some(_)) if !s3 => {
                return Err("STATEHOUSE_ICEBERG_READER_* keys are for a warehouse on S3/R2; with a local objects \
                            folder readers open the files themselves"
                    .into())
            }
            (Some(id), Some(_)) if Some(id) == self.objects.r2_access_key_id.as_ref() => {
                return Err("STATEHOUSE_ICEBERG_READER_ACCESS_KEY_ID is the server's own store key: create a \
                            read-only key for analysts instead (the catalog hands it to every analytics caller)"
                    .into())
            }
            (Some(_), Some(_)) => {}
        }
        if readers.s3_endpoint.is_some() && !s3 {
            return Err("STATEHOUSE_ICEBERG_S3_ENDPOINT is for a warehouse on S3/R2 (R2_ENDPOINT is not set)".into());
        }
        Ok(())
    }

    /// A remote database means replicas on several machines. Each would keep
    /// blobs and Iceberg files in its own local folder while the shared
    /// database lists them for every replica: refused unless the folder is
    /// declared shared storage.
    fn check_store_is_shared(&self) -> Result<(), String> {
        if !self.database.turso_url.is_remote()
            || self.objects.any_s3_setting()
            || self.store_fallbacks.objects_dir_shared
        {
            return Ok(());
        }
        Err(format!(
            "TURSO_URL is a database replicas on other machines share, but blobs and Iceberg files would stay in this \
             machine's folder STATEHOUSE_OBJECTS_DIR={}: set R2_* (R2_ENDPOINT, R2_BUCKET, R2_ACCESS_KEY_ID, \
             R2_SECRET_ACCESS_KEY) to an S3-compatible store, or STATEHOUSE_OBJECTS_DIR_SHARED=true if that folder is \
             storage every replica shares",
            self.objects.objects_dir.display()
        ))
    }
}

/// Whether the setting `id` came from a flag or the environment, not its default.
fn given(matches: &clap::ArgMatches, id: &str) -> bool {
    matches.value_source(id).is_some_and(|source| source != clap::parser::ValueSource::DefaultValue)
}

impl Cli {
    /// Parses flags and environment. On a bad value prints one line naming the
    /// setting (clap's first line names both the flag and the variable) and exits 2.
    pub fn parse_or_exit() -> Cli {
        use clap::{CommandFactory, FromArgMatches};
        let parsed = Cli::command()
            .try_get_matches()
            .and_then(|matches| Ok((Cli::from_arg_matches(&matches)?, matches)))
            .map_err(|err| err.format(&mut Cli::command()));
        match parsed {
            Ok((mut cli, matches)) => {
                if let Err(line) = cli.finish(&matches) {
                    eprintln!("error: {line}");
                    std::process::exit(2);
                }
                cli
            }
            Err(err) => {
                use clap::error::ErrorKind;
                match err.kind() {
                    ErrorKind::DisplayHelp
                    | ErrorKind::DisplayVersion
                    | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => err.exit(),
                    _ => {
                        eprintln!("{}", one_line_error(&err));
                        std::process::exit(2);
                    }
                }
            }
        }
    }
}

impl Cli {
    /// What one setting alone cannot say: where the store's settings come
    /// from, and whether the combination is safe to serve with.
    fn finish(&mut self, matches: &clap::ArgMatches) -> Result<(), String> {
        let (settings, matches) = match &mut self.command {
            None => (&mut self.serve, matches),
            Some(Command::Serve(settings)) => {
                (settings.as_mut(), matches.subcommand_matches("serve").unwrap_or(matches))
            }
            Some(_) => return Ok(()),
        };
        settings.resolve_object_store(given(matches, "r2_region"))?;
        settings.check_store_is_shared()?;
        settings.check_iceberg_readers()
    }
}

/// Clap's first line, with the flag replaced by the environment variable an
/// operator most likely set (`invalid value 'x' for STATEHOUSE_LEASE_MS (--lease-ms)`).
fn one_line_error(err: &clap::Error) -> String {
    use clap::error::{ContextKind, ContextValue};
    use clap::CommandFactory;
    let rendered = err.render().to_string();
    let mut line = rendered.lines().next().unwrap_or("error: invalid settings").to_string();
    if let Some(ContextValue::String(arg)) = err.get(ContextKind::InvalidArg) {
        let long = arg.split_whitespace().next().unwrap_or("").trim_start_matches("--");
        let cmd = Cli::command();
        let env = cmd
            .get_arguments()
            .chain(cmd.get_subcommands().flat_map(|s| s.get_arguments()))
            .find(|a| a.get_long() == Some(long))
            .and_then(|a| a.get_env().map(|e| e.to_string_lossy().into_owned()));
        if let Some(env) = env {
            line = line.replacen(&format!("'{arg}'"), &format!("{env} (--{long})"), 1);
        }
    }
    line
}

/// The environment variables the server reads, for docs and the deploy checks.
pub const ENV_VARS: &[&str] = &[
    "TURSO_URL",
    "TURSO_TOKEN",
    "STATEHOUSE_SYNC",
    "STATEHOUSE_OBJECTS_DIR",
    "R2_ENDPOINT",
    "R2_BUCKET",
    "R2_ACCESS_KEY_ID",
    "R2_SECRET_ACCESS_KEY",
    "R2_REGION",
    "STATEHOUSE_CREATE_BUCKET",
    "STATEHOUSE_OBJECTS_DIR_SHARED",
    "AWS_ENDPOINT_URL_S3",
    "BUCKET_NAME",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_REGION",
    "STATEHOUSE_MAX_BLOB_BYTES",
    "STATEHOUSE_SWEEP_INTERVAL_MS",
    "STATEHOUSE_CHANGE_VALUE_CAP_BYTES",
    "STATEHOUSE_HISTORY_RETENTION",
    "STATEHOUSE_ORPHAN_GRACE_MS",
    "STATEHOUSE_EXPORT_ENABLED",
    "STATEHOUSE_EXPORT_INTERVAL_MS",
    "STATEHOUSE_EXPORT_BATCH_ROWS",
    "STATEHOUSE_EXPORT_SNAPSHOT_MAX_AGE_MS",
    "STATEHOUSE_EXPORT_MIN_SNAPSHOTS",
    "STATEHOUSE_COMPACTION_ENABLED",
    "STATEHOUSE_COMPACTION_TARGET_BYTES",
    "STATEHOUSE_COMPACTION_MIN_FILES",
    "STATEHOUSE_COMPACTION_MAX_MANIFESTS",
    "STATEHOUSE_ICEBERG_S3_ENDPOINT",
    "STATEHOUSE_ICEBERG_READER_ACCESS_KEY_ID",
    "STATEHOUSE_ICEBERG_READER_SECRET_ACCESS_KEY",
    "STATEHOUSE_AUTH_TOKENS",
    "STATEHOUSE_AUTH_FILE",
    "STATEHOUSE_JWT_HS256_SECRET",
    "STATEHOUSE_JWT_JWKS_FILE",
    "STATEHOUSE_JWT_AUDIENCE",
    "STATEHOUSE_JWT_ISSUER",
    "STATEHOUSE_PEER_SECRET",
    "STATEHOUSE_INSECURE",
    "STATEHOUSE_RATE_LIMIT_PER_SEC",
    "STATEHOUSE_RATE_LIMIT_BURST",
    "STATEHOUSE_MAX_CONNECTIONS",
    "STATEHOUSE_CORS_ORIGINS",
    "STATEHOUSE_LISTEN",
    "STATEHOUSE_ADVERTISE_URL",
    "STATEHOUSE_LEASE_MS",
    "STATEHOUSE_LEASE_READ_MARGIN_MS",
    "STATEHOUSE_CACHE_BYTES",
    "STATEHOUSE_INSTANCE_ID",
    "STATEHOUSE_MAX_VALUE_BYTES",
    "STATEHOUSE_MAX_BATCH_BYTES",
    "STATEHOUSE_REQUEST_TIMEOUT_MS",
    "STATEHOUSE_FORWARD_TIMEOUT_MS",
    "STATEHOUSE_LOG_FORMAT",
    "STATEHOUSE_LOG",
    "FLY_MACHINE_ID",
    "STATEHOUSE_ALARM_TARGETS",
    "STATEHOUSE_ALARM_SECRET",
    "STATEHOUSE_ALARM_RETRY_BASE_MS",
    "STATEHOUSE_ALARM_MAX_RETRIES",
    "STATEHOUSE_ALARM_TIMEOUT_MS",
    "STATEHOUSE_ALARM_CONCURRENCY",
    "STATEHOUSE_ALARM_POLL_MS",
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn history_retention_takes_durations_and_the_change_log_keeps_whole_values() {
        assert_eq!(parse_retention("30d"), Ok(Duration::from_secs(30 * 86_400)));
        assert_eq!(parse_retention("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_retention("0s"), Ok(Duration::ZERO));
        for bad in ["", "30", "soon", "-1d", "1000y"] {
            assert!(parse_retention(bad).is_err(), "{bad:?}");
        }
        let mut settings = Settings::for_database("file:./x.db").unwrap();
        assert_eq!(settings.history_retention, Duration::from_secs(30 * 86_400));
        assert_eq!(settings.change_value_cap(), settings.max_value_bytes);
        settings.change_value_cap_bytes = Some(10);
        assert_eq!(settings.change_value_cap(), 10);
        let dumped = serde_json::to_value(&settings).unwrap();
        assert_eq!(dumped["history_retention"], "30days");
    }

    #[test]
    fn secrets_never_print() {
        let mut settings = Settings::for_database("file:./x.db").unwrap();
        settings.database.turso_token = Some("turso-s3cret".into());
        settings.access.peer_secret = Some("peer-s3cret".into());
        settings.objects.r2_secret_access_key = Some("r2-s3cret".into());
        settings.alarms.alarm_secret = Some("alarm-s3cret".into());
        let shown = format!("{settings:?} {}", serde_json::to_string(&settings).unwrap());
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(shown.contains("<redacted>"));
        assert_eq!(settings.access.peer_secret.as_ref().map(Secret::expose), Some("peer-s3cret"));
    }

    #[test]
    fn database_urls() {
        assert_eq!(parse_database_url("file:./x.db").unwrap(), DatabaseUrl::File("./x.db".into()));
        assert_eq!(
            parse_database_url("libsql://db.example.turso.io").unwrap(),
            DatabaseUrl::Remote("https://db.example.turso.io".into())
        );
        assert!(parse_database_url("http://127.0.0.1:8081").unwrap().is_remote());
        assert!(parse_database_url("postgres://x").is_err());
        assert!(parse_database_url("file:").is_err());
    }

    #[test]
    fn every_env_var_is_a_setting() {
        use clap::CommandFactory;
        let cmd = Cli::command();
        let mut declared: Vec<String> =
            cmd.get_arguments().filter_map(|a| a.get_env().map(|e| e.to_string_lossy().into_owned())).collect();
        declared.sort();
        let mut listed: Vec<String> = ENV_VARS.iter().map(|s| s.to_string()).collect();
        listed.sort();
        assert_eq!(declared, listed);
    }
}
