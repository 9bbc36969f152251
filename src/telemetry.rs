//! Logs (JSON lines through `tracing`) and Prometheus metrics.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};
use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Installs the global subscriber. Logs go to stderr; stdout stays free for
/// commands that print results (`--dump-config`, `migrate`).
pub fn init_logging(format: LogFormat, filter: &str) -> Result<(), String> {
    let filter = EnvFilter::try_new(filter).map_err(|e| format!("invalid value for STATEHOUSE_LOG: {e}"))?;
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let result = match format {
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(true).try_init(),
        LogFormat::Text => builder.try_init(),
    };
    // A second call (tests start many servers in one process) keeps the first subscriber.
    let _ = result;
    Ok(())
}

pub struct Metrics {
    registry: Registry,
    pub http_requests: IntCounterVec,
    pub http_duration: HistogramVec,
    pub leases_held: IntGauge,
    pub fence_rejections: IntCounter,
    pub transaction_retries: IntCounter,
    pub forwarded: IntCounterVec,
    pub write_batch_size: Histogram,
    pub commit_seconds: Histogram,
    pub write_round_trips: IntCounter,
    pub write_groups_overlapped: IntCounter,
    pub write_replans: IntCounter,
}

impl Metrics {
    pub fn new(instance: &str, sync: &str) -> Metrics {
        let registry = Registry::new();
        let http_requests = IntCounterVec::new(
            Opts::new("statehouse_http_requests_total", "HTTP requests by route, method and status"),
            &["route", "method", "status"],
        )
        .unwrap();
        let http_duration = HistogramVec::new(
            HistogramOpts::new("statehouse_http_request_duration_seconds", "HTTP request latency by route and method")
                .buckets(vec![0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]),
            &["route", "method"],
        )
        .unwrap();
        let leases_held = IntGauge::new("statehouse_leases_held", "Object leases this replica holds").unwrap();
        let fence_rejections = IntCounter::new(
            "statehouse_fence_rejections_total",
            "Writes refused by the fence check because ownership had moved",
        )
        .unwrap();
        let transaction_retries = IntCounter::new(
            "statehouse_transaction_retries_total",
            "Transactions or writes retried (busy database, lost lease re-routed)",
        )
        .unwrap();
        let forwarded = IntCounterVec::new(
            Opts::new("statehouse_forwarded_requests_total", "Writes forwarded to the owner replica, by outcome"),
            &["outcome"],
        )
        .unwrap();
        let write_batch_size = Histogram::with_opts(
            HistogramOpts::new("statehouse_write_batch_size", "Writes committed together in one transaction")
                .buckets(vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0]),
        )
        .unwrap();
        let commit_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "statehouse_write_transaction_seconds",
                "Time from BEGIN to COMMIT of a write transaction",
            )
            .buckets(vec![0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0, 5.0]),
        )
        .unwrap();
        let write_round_trips = IntCounter::new(
            "statehouse_write_round_trips_total",
            "Requests the writer made to a libSQL server: one per group commit, plus reads on resident misses",
        )
        .unwrap();
        let write_groups_overlapped = IntCounter::new(
            "statehouse_write_groups_overlapped_total",
            "Group commits sent to a libSQL server while another was still in flight",
        )
        .unwrap();
        let write_replans = IntCounter::new(
            "statehouse_write_replans_total",
            "Writes planned again because the group in flight they were planned on did not commit as planned",
        )
        .unwrap();
        let info = IntGaugeVec::new(
            Opts::new("statehouse_info", "Build and durability settings of this replica"),
            &["version", "instance", "sync"],
        )
        .unwrap();
        info.with_label_values(&[env!("CARGO_PKG_VERSION"), instance, sync]).set(1);
        for collector in [
            Box::new(http_requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(http_duration.clone()),
            Box::new(leases_held.clone()),
            Box::new(fence_rejections.clone()),
            Box::new(transaction_retries.clone()),
            Box::new(forwarded.clone()),
            Box::new(write_batch_size.clone()),
            Box::new(commit_seconds.clone()),
            Box::new(write_round_trips.clone()),
            Box::new(write_groups_overlapped.clone()),
            Box::new(write_replans.clone()),
            Box::new(info),
        ] {
            registry.register(collector).expect("metric names are unique");
        }
        Metrics {
            registry,
            http_requests,
            http_duration,
            leases_held,
            fence_rejections,
            transaction_retries,
            forwarded,
            write_batch_size,
            commit_seconds,
            write_round_trips,
            write_groups_overlapped,
            write_replans,
        }
    }

    /// Adds the metrics of another module (the exporter) to what `/metrics` shows.
    pub fn register(&self, collector: Box<dyn prometheus::core::Collector>) {
        self.registry.register(collector).expect("metric names are unique");
    }

    pub fn render(&self) -> String {
        let mut out = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut out).expect("text encoding cannot fail");
        String::from_utf8(out).expect("prometheus text is UTF-8")
    }
}
