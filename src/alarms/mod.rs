//! Alarms: durable timers of objects, delivered to the application as
//! signed webhooks, at least once.
//!
//! An alarm is a row written by its object's fenced writes. Every replica
//! runs a delivery pass that finds due alarms by their due time across all
//! objects and fires those of objects it owns, or can take the lease of;
//! objects a live peer owns are left to it. The outcome (deleted, moved to
//! its next period, or a retry's time) is a fenced write of the object: an
//! owner that lost the lease after delivering cannot record it, and the next
//! owner delivers again. So a delivery happens at least once; receivers
//! deduplicate by `alarm_version` and `attempt`.

mod deliver;
mod metrics;
pub mod sign;
pub mod targets;

use std::time::Duration;

use crate::config::{AlarmSettings, Secret};
use crate::telemetry::Metrics;

pub use deliver::Delivery;
pub use targets::Targets;

/// The shortest secret accepted, as for the other shared secrets.
const MIN_SECRET_BYTES: usize = 32;

pub struct Alarms {
    targets: Targets,
    secret: Option<Secret>,
    retry_base: Duration,
    max_retries: i64,
    timeout: Duration,
    concurrency: usize,
    poll: Duration,
    metrics: metrics::AlarmMetrics,
}

impl Alarms {
    pub fn from_settings(settings: &AlarmSettings, metrics: &Metrics) -> Result<Alarms, String> {
        let targets = settings.alarm_targets.as_deref().map(Targets::parse).transpose()?.unwrap_or_default();
        match &settings.alarm_secret {
            None if !targets.is_empty() => {
                return Err("STATEHOUSE_ALARM_TARGETS needs STATEHOUSE_ALARM_SECRET, which signs every delivery".into())
            }
            Some(secret) if secret.expose().len() < MIN_SECRET_BYTES => {
                return Err(format!("STATEHOUSE_ALARM_SECRET must be at least {MIN_SECRET_BYTES} bytes"))
            }
            _ => {}
        }
        Ok(Alarms {
            targets,
            secret: settings.alarm_secret.clone(),
            retry_base: settings.alarm_retry_base,
            max_retries: settings.alarm_max_retries as i64,
            timeout: settings.alarm_timeout,
            concurrency: settings.alarm_concurrency as usize,
            poll: settings.alarm_poll,
            metrics: metrics::AlarmMetrics::new(metrics),
        })
    }

    /// Whether alarms of `ns` can be delivered: setting one elsewhere is refused.
    pub fn check_target(&self, ns: &str) -> Result<(), String> {
        match self.targets.target(ns) {
            Some(_) => Ok(()),
            None if self.targets.is_empty() => {
                Err("alarms are off: no STATEHOUSE_ALARM_TARGETS is configured, so no alarm could be delivered".into())
            }
            None => Err(format!(
                "namespace {ns:?} has no alarm target: STATEHOUSE_ALARM_TARGETS names none of its patterns, \
                 so its alarms could not be delivered"
            )),
        }
    }

    /// The wait before retry number `retry` (1-based): the base, doubled for each retry before it.
    pub fn backoff(&self, retry: i64) -> Duration {
        let doublings = (retry - 1).clamp(0, 30) as u32;
        self.retry_base.saturating_mul(1u32 << doublings)
    }
}
