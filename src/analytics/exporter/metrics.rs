//! What `/metrics` shows of the exporter.

use prometheus::{Gauge, GaugeVec, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts};

use crate::telemetry::Metrics;

pub(super) struct ExportMetrics {
    pub(super) outbox_rows: IntGauge,
    pub(super) lag_seconds: Gauge,
    pub(super) rows: IntCounterVec,
    pub(super) files: IntCounterVec,
    pub(super) snapshots: IntCounterVec,
    pub(super) cycle_seconds: Histogram,
    pub(super) failures: IntCounter,
    pub(super) orphans_deleted: IntCounter,
    pub(super) data_files: IntGaugeVec,
    pub(super) manifests: IntGaugeVec,
    pub(super) compactions: IntCounterVec,
    pub(super) compaction_failures: IntCounter,
    pub(super) last_compaction: GaugeVec,
    pub(super) last_compaction_files: IntGaugeVec,
}

impl ExportMetrics {
    pub(super) fn new(metrics: &Metrics) -> ExportMetrics {
        let m = ExportMetrics {
            outbox_rows: IntGauge::new(
                "statehouse_export_outbox_rows",
                "Outbox rows waiting to be exported (reported by the exporting replica; 0 elsewhere)",
            )
            .unwrap(),
            lag_seconds: Gauge::new(
                "statehouse_export_lag_seconds",
                "Age of the oldest outbox row not yet exported (reported by the exporting replica; 0 elsewhere)",
            )
            .unwrap(),
            rows: IntCounterVec::new(
                Opts::new("statehouse_export_rows_total", "Rows exported to Iceberg by this replica, by table"),
                &["table"],
            )
            .unwrap(),
            files: IntCounterVec::new(
                Opts::new("statehouse_export_files_total", "Parquet data files committed by this replica, by table"),
                &["table"],
            )
            .unwrap(),
            snapshots: IntCounterVec::new(
                Opts::new("statehouse_export_snapshots_total", "Iceberg snapshots committed by this replica, by table"),
                &["table"],
            )
            .unwrap(),
            cycle_seconds: Histogram::with_opts(
                HistogramOpts::new("statehouse_export_cycle_seconds", "Duration of export cycles that exported rows")
                    .buckets(vec![0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]),
            )
            .unwrap(),
            failures: IntCounter::new("statehouse_export_failures_total", "Export cycles that failed (retried)")
                .unwrap(),
            orphans_deleted: IntCounter::new(
                "statehouse_export_orphan_files_deleted_total",
                "Unreferenced warehouse files deleted after the grace period",
            )
            .unwrap(),
            data_files: IntGaugeVec::new(
                Opts::new(
                    "statehouse_iceberg_data_files",
                    "Data files in the table's current snapshot (reported by the exporting replica)",
                ),
                &["table"],
            )
            .unwrap(),
            manifests: IntGaugeVec::new(
                Opts::new(
                    "statehouse_iceberg_manifests",
                    "Manifests in the table's current snapshot (reported by the exporting replica)",
                ),
                &["table"],
            )
            .unwrap(),
            compactions: IntCounterVec::new(
                Opts::new(
                    "statehouse_compaction_runs_total",
                    "Compaction snapshots committed by this replica, by table",
                ),
                &["table"],
            )
            .unwrap(),
            compaction_failures: IntCounter::new(
                "statehouse_compaction_failures_total",
                "Compactions that failed and committed nothing (tried again at the next maintenance pass)",
            )
            .unwrap(),
            last_compaction: GaugeVec::new(
                Opts::new(
                    "statehouse_compaction_last_timestamp_seconds",
                    "When this replica last committed a compaction of the table (Unix time)",
                ),
                &["table"],
            )
            .unwrap(),
            last_compaction_files: IntGaugeVec::new(
                Opts::new(
                    "statehouse_compaction_last_data_files",
                    "Data files of the table before and after this replica's last compaction",
                ),
                &["table", "stage"],
            )
            .unwrap(),
        };
        metrics.register(Box::new(m.outbox_rows.clone()));
        metrics.register(Box::new(m.lag_seconds.clone()));
        metrics.register(Box::new(m.rows.clone()));
        metrics.register(Box::new(m.files.clone()));
        metrics.register(Box::new(m.snapshots.clone()));
        metrics.register(Box::new(m.cycle_seconds.clone()));
        metrics.register(Box::new(m.failures.clone()));
        metrics.register(Box::new(m.orphans_deleted.clone()));
        metrics.register(Box::new(m.data_files.clone()));
        metrics.register(Box::new(m.manifests.clone()));
        metrics.register(Box::new(m.compactions.clone()));
        metrics.register(Box::new(m.compaction_failures.clone()));
        metrics.register(Box::new(m.last_compaction.clone()));
        metrics.register(Box::new(m.last_compaction_files.clone()));
        m
    }
}
