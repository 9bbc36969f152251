//! What `/metrics` shows of the exporter.

use prometheus::{Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts};

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
        };
        metrics.register(Box::new(m.outbox_rows.clone()));
        metrics.register(Box::new(m.lag_seconds.clone()));
        metrics.register(Box::new(m.rows.clone()));
        metrics.register(Box::new(m.files.clone()));
        metrics.register(Box::new(m.snapshots.clone()));
        metrics.register(Box::new(m.cycle_seconds.clone()));
        metrics.register(Box::new(m.failures.clone()));
        metrics.register(Box::new(m.orphans_deleted.clone()));
        m
    }
}
