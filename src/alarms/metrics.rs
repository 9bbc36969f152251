//! What `/metrics` shows of alarms.

use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts};

use crate::telemetry::Metrics;

pub(super) struct AlarmMetrics {
    pub(super) pending: IntGauge,
    pub(super) due: IntGauge,
    pub(super) lateness: Histogram,
    pub(super) deliveries: IntCounterVec,
    pub(super) retries: IntCounter,
    pub(super) unrecorded: IntCounter,
}

impl AlarmMetrics {
    pub(super) fn new(metrics: &Metrics) -> AlarmMetrics {
        let m = AlarmMetrics {
            pending: IntGauge::new("statehouse_alarms_pending", "Alarms set, across all objects").unwrap(),
            due: IntGauge::new("statehouse_alarms_due", "Alarms due but not yet delivered, across all objects")
                .unwrap(),
            lateness: Histogram::with_opts(
                HistogramOpts::new(
                    "statehouse_alarm_lateness_seconds",
                    "Time from an alarm's scheduled time to its first delivery attempt",
                )
                .buckets(vec![0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]),
            )
            .unwrap(),
            deliveries: IntCounterVec::new(
                Opts::new(
                    "statehouse_alarm_deliveries_total",
                    "Alarm delivery attempts by this replica, by outcome (delivered, retry, failed)",
                ),
                &["outcome"],
            )
            .unwrap(),
            retries: IntCounter::new("statehouse_alarm_retries_total", "Alarm deliveries scheduled for a retry")
                .unwrap(),
            unrecorded: IntCounter::new(
                "statehouse_alarm_unrecorded_total",
                "Deliveries made whose outcome the fence refused to record (the next owner delivers again)",
            )
            .unwrap(),
        };
        for collector in [
            Box::new(m.pending.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(m.due.clone()),
            Box::new(m.lateness.clone()),
            Box::new(m.deliveries.clone()),
            Box::new(m.retries.clone()),
            Box::new(m.unrecorded.clone()),
        ] {
            metrics.register(collector);
        }
        m
    }
}
