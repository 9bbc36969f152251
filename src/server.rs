//! Wiring: open the database, migrate, start the writer and the lease
//! renewer, serve HTTP until the shutdown future resolves, then release every
//! lease so peers take over at once.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::alarms::Alarms;
use crate::analytics::readers::ReaderAccess;
use crate::analytics::{CompactionPolicy, ExportPolicy, Exporter};
use crate::blobs::{Storage, Sweeper};
use crate::config::{DatabaseSettings, Settings, SyncMode};
use crate::db::{self, Database};
use crate::guard::{Guard, Replica};
use crate::http::{self, Access, AppState};
use crate::limits::LimitedListener;
use crate::resident::ResidentState;
use crate::routing::Routing;
use crate::telemetry::Metrics;
use crate::writer::Writer;

/// Opens the database and applies pending migrations; errors name the setting to fix.
pub async fn open_database(settings: &DatabaseSettings) -> anyhow::Result<Database> {
    let url = String::from(settings.turso_url.clone());
    let db = Database::open(settings).await.with_context(|| format!("cannot open the database at TURSO_URL={url}"))?;
    let conn = db.connect().await.with_context(|| format!("cannot connect to TURSO_URL={url}"))?;
    let applied = match db::migrate(&conn).await {
        Ok(applied) => applied,
        Err(err) if settings.turso_url.is_remote() && err.to_string().contains("status=401") => {
            let problem = if settings.turso_token.is_some() {
                "refused TURSO_TOKEN"
            } else {
                "needs a token and TURSO_TOKEN is not set"
            };
            anyhow::bail!("the libSQL server at TURSO_URL={url} {problem} (401 Unauthorized): set TURSO_TOKEN to a valid token for it");
        }
        Err(err) => {
            let hint =
                if settings.turso_url.is_remote() { " (is the server up, and is TURSO_TOKEN right?)" } else { "" };
            return Err(
                anyhow::Error::new(err).context(format!("cannot migrate the database at TURSO_URL={url}{hint}"))
            );
        }
    };
    for name in applied {
        tracing::info!(migration = name, "applied migration");
    }
    Ok(db)
}

/// Runs the server on `listener` until `shutdown` resolves.
pub async fn run(
    settings: Settings,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let addr = listener.local_addr()?;
    let instance = settings.instance_id.clone().unwrap_or_else(|| uuid::Uuid::now_v7().to_string());
    let advertise_url = settings.advertise_url.clone().unwrap_or_else(|| derive_advertise_url(addr));
    let sync = match settings.database.sync {
        SyncMode::Full => "full",
        SyncMode::Normal => "normal",
    };

    let metrics = Arc::new(Metrics::new(&instance, sync));
    let access = Access::from_settings(&settings, &metrics).map_err(anyhow::Error::msg)?;
    check_exposure(&access, &settings, addr)?;
    let alarms = Arc::new(Alarms::from_settings(&settings.alarms, &metrics).map_err(anyhow::Error::msg)?);
    let db = Arc::new(open_database(&settings.database).await?);
    let storage = Storage::open(&settings.objects).await.context("cannot open the object store")?;
    let resident = Arc::new(ResidentState::new(settings.cache_bytes as usize, &metrics));
    let writer = Writer::spawn(db.clone(), resident.clone(), metrics.clone());
    let me =
        Replica { instance: instance.clone(), url: advertise_url.clone(), machine: settings.fly_machine_id.clone() };
    let guard =
        Arc::new(Guard::new(me, settings.lease, settings.read_margin(), writer.clone(), resident, metrics.clone()));

    let stop = CancellationToken::new();
    // Every background task ends with the server, also when the server's
    // future is dropped without a graceful shutdown.
    let _stop_on_drop = stop.clone().drop_guard();
    let renewal = guard.clone().spawn_renewal(stop.child_token());
    let sweeper = Sweeper {
        db: db.clone(),
        writer: writer.clone(),
        storage: storage.clone(),
        guard: guard.clone(),
        interval: settings.sweep_interval,
        orphan_grace: settings.orphan_grace,
        keep_garbage: crate::blobs::kept_for(settings.history_retention),
    }
    .spawn(stop.child_token());
    let exporter = Arc::new(Exporter::new(
        db.clone(),
        writer.clone(),
        guard.clone(),
        &storage,
        ExportPolicy {
            enabled: settings.export_enabled,
            interval: settings.export_interval,
            batch_rows: settings.export_batch_rows as usize,
            min_snapshots: settings.export_min_snapshots as usize,
            max_snapshot_age: settings.export_snapshot_max_age,
            maintenance_interval: settings.sweep_interval,
            orphan_grace: settings.orphan_grace,
            compaction: CompactionPolicy {
                enabled: settings.compaction_enabled,
                target_file_bytes: settings.compaction_target_bytes,
                min_files: settings.compaction_min_files as usize,
                max_manifests: settings.compaction_max_manifests as usize,
            },
        },
        &metrics,
    ));
    let exporting = exporter.clone().spawn(stop.child_token());
    let routing = Routing::new(
        guard.clone(),
        writer.clone(),
        metrics.clone(),
        access.peer.clone(),
        settings.forward_timeout,
        settings.change_value_cap() as usize,
    )
    .context("cannot build the HTTP client for peer replicas")?;
    let alarming = alarms
        .clone()
        .spawn(db.clone(), writer.clone(), guard.clone(), settings.change_value_cap() as usize, stop.child_token())
        .context("cannot build the HTTP client for alarm deliveries")?;
    let readers = ReaderAccess::from_settings(&settings, exporter.catalog().warehouse());
    let state = Arc::new(AppState {
        settings: settings.clone(),
        db,
        storage: storage.clone(),
        writer,
        guard: guard.clone(),
        metrics,
        routing,
        exporter,
        readers,
        access,
        alarms,
    });

    tracing::info!(
        addr = %addr,
        advertise_url = %advertise_url,
        instance = %instance,
        database = %String::from(settings.database.turso_url.clone()),
        objects = %storage.location,
        sync,
        lease_ms = settings.lease.as_millis() as u64,
        iceberg_reader_keys = state.readers.vends_credentials(),
        "listening"
    );
    let signal = stop.clone();
    tokio::spawn(async move {
        shutdown.await;
        signal.cancel();
    });
    let max_connections = settings.access.max_connections as usize;
    let listener = LimitedListener::new(listener, max_connections, state.access.connections_open.clone());
    let serving = axum::serve(listener, http::app(state)).with_graceful_shutdown(stop.clone().cancelled_owned());
    let served = serving.await;

    stop.cancel();
    let _ = renewal.await;
    let _ = sweeper.await;
    let _ = exporting.await;
    let _ = alarming.await;
    match guard.release_all().await {
        Ok(n) => tracing::info!(released = n, "released leases; stopped"),
        Err(err) => tracing::warn!(error = %err, "could not release leases; peers take over when they expire"),
    }
    served.context("the HTTP server failed")
}

/// Without credentials anyone who reaches the port owns every namespace:
/// allowed on loopback (a laptop), elsewhere only when asked for explicitly.
fn check_exposure(access: &Access, settings: &Settings, addr: SocketAddr) -> anyhow::Result<()> {
    if access.authenticator.is_some() {
        return Ok(());
    }
    if !addr.ip().is_loopback() && !settings.access.insecure {
        anyhow::bail!(
            "refusing to serve {addr} without authentication: set STATEHOUSE_AUTH_TOKENS, STATEHOUSE_AUTH_FILE or \
             STATEHOUSE_JWT_* (see `statehouse token`), listen on 127.0.0.1, or set STATEHOUSE_INSECURE=true"
        );
    }
    tracing::warn!(
        addr = %addr,
        "DEVELOPMENT MODE: no authentication is configured, so anyone who can reach {addr} may read, write and \
         administer every namespace"
    );
    Ok(())
}

/// Peers reach us at our bound address; a wildcard bind needs a host name instead.
fn derive_advertise_url(addr: SocketAddr) -> String {
    if !addr.ip().is_unspecified() {
        return format!("http://{addr}");
    }
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty());
    match host {
        Some(host) => format!("http://{host}:{}", addr.port()),
        None => {
            tracing::warn!("listening on a wildcard address with no host name: set STATEHOUSE_ADVERTISE_URL so peers can forward writes here");
            format!("http://127.0.0.1:{}", addr.port())
        }
    }
}
