//! The delivery pass: due alarms by due time, fired by the owner of their
//! object, each outcome recorded by a fenced write of that object.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::{sign, Alarms};
use crate::clock::{now_ms, rfc3339_ms};
use crate::db::{Database, StoreError};
use crate::guard::{Guard, HeldLease, Route};
use crate::model::{Alarm, AlarmSpec, Event, Mutation, ObjectRef, Op, Precondition, Rejection, VersionMatch};
use crate::objects::{self, DueAlarm, DueCursor, WriteJob};
use crate::writer::Writer;

/// What a receiver gets, as JSON.
#[derive(Debug, Serialize, serde::Deserialize)]
pub struct Delivery {
    pub ns: String,
    pub id: String,
    pub name: String,
    /// RFC 3339: the time the alarm was for.
    pub scheduled_at: String,
    /// RFC 3339: when this attempt was made.
    pub fired_at: String,
    /// 1 for the first attempt at this scheduled time, then 2, 3, ...
    pub attempt: i64,
    pub payload: Option<serde_json::Value>,
    /// The object version at which this arming was set: with `attempt`, what receivers deduplicate by.
    pub alarm_version: i64,
}

/// Alarms handed out (called, or waiting for a call or for their outcome to
/// be recorded) per call allowed at once.
const IN_FLIGHT_PER_CALL: usize = 4;
/// Rows read per query of a pass.
const PAGE: usize = 1000;
/// Pages one pass reads at most, looking past alarms already in flight.
const PAGES_PER_PASS: usize = 8;
/// How long a recorded outcome is remembered, to skip reads made before it was recorded.
const REMEMBER: Duration = Duration::from_secs(60);
/// How often the pending and due counts are refreshed.
const COUNT_EVERY: Duration = Duration::from_secs(1);

type AlarmKey = (ObjectRef, String);

struct Pass {
    alarms: Arc<Alarms>,
    db: Arc<Database>,
    writer: Writer,
    guard: Arc<Guard>,
    value_cap: usize,
    client: reqwest::Client,
    permits: Arc<Semaphore>,
    /// Alarms handed to a task and not yet recorded.
    busy: Mutex<HashSet<AlarmKey>>,
    /// Outcomes recorded here lately: the (arming, attempt) they ended. A row
    /// read before its outcome was recorded shows that pair and is skipped.
    done: Mutex<HashMap<AlarmKey, (i64, i64, Instant)>>,
    /// Objects a live peer owns, until its lease ends: its pass fires them.
    elsewhere: Mutex<HashMap<ObjectRef, Instant>>,
    /// Where a sweep through a backlog continues: the last alarm handed out.
    /// Everything due before it was handed out already (or left to a peer),
    /// so a backlog is read once, not again from its start on every pass.
    /// Each sweep that reaches the end of what is due starts over, so an
    /// alarm whose outcome was not recorded is found again.
    resume: Mutex<Option<DueCursor>>,
    /// Once the server stops, no more leases are taken: shutdown releases them.
    stop: CancellationToken,
}

impl Alarms {
    /// Runs the delivery pass until `stop` (nothing to do without targets).
    pub fn spawn(
        self: Arc<Self>,
        db: Arc<Database>,
        writer: Writer,
        guard: Arc<Guard>,
        value_cap: usize,
        stop: CancellationToken,
    ) -> Result<tokio::task::JoinHandle<()>, reqwest::Error> {
        let client = reqwest::Client::builder()
            .pool_idle_timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(self.concurrency)
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        let pass = Arc::new(Pass {
            permits: Arc::new(Semaphore::new(self.concurrency)),
            alarms: self,
            db,
            writer,
            guard,
            value_cap,
            client,
            busy: Mutex::new(HashSet::new()),
            done: Mutex::new(HashMap::new()),
            elsewhere: Mutex::new(HashMap::new()),
            resume: Mutex::new(None),
            stop: stop.clone(),
        });
        Ok(tokio::spawn(async move {
            if pass.alarms.targets.is_empty() {
                return;
            }
            let mut counted = Instant::now() - COUNT_EVERY;
            loop {
                let full = match pass.clone().run_once().await {
                    Ok(full) => full,
                    Err(err) => {
                        tracing::warn!(error = %err, "alarm pass failed; will retry");
                        false
                    }
                };
                if counted.elapsed() >= COUNT_EVERY {
                    counted = Instant::now();
                    match objects::count_alarms(&pass.db, now_ms()).await {
                        Ok((pending, due)) => {
                            pass.alarms.metrics.pending.set(pending);
                            pass.alarms.metrics.due.set(due);
                        }
                        Err(err) => tracing::debug!(error = %err, "could not count alarms"),
                    }
                }
                let wait = if full { Duration::from_millis(5) } else { pass.alarms.poll };
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(wait) => {}
                }
            }
        }))
    }
}

impl Pass {
    /// Hands the due alarms not in flight to tasks, by object. True when it
    /// found as many as it had room for (more may be due at once).
    async fn run_once(self: Arc<Self>) -> Result<bool, StoreError> {
        let room = (IN_FLIGHT_PER_CALL * self.alarms.concurrency).saturating_sub(self.busy.lock().unwrap().len());
        if room == 0 {
            return Ok(true);
        }
        let now = now_ms();
        {
            let instant = Instant::now();
            self.done.lock().unwrap().retain(|_, (_, _, at)| instant.duration_since(*at) < REMEMBER);
            self.elsewhere.lock().unwrap().retain(|_, until| *until > instant);
        }
        let mut picked: Vec<DueAlarm> = Vec::new();
        let mut cursor: Option<DueCursor> = self.resume.lock().unwrap().take();
        let mut reached_end = false;
        for _ in 0..PAGES_PER_PASS {
            let (page, more) = objects::due_alarms(&self.db, now + 1, cursor.as_ref(), PAGE).await?;
            reached_end = !more;
            if let Some(last) = page.last() {
                let (object, alarm) = (&last.object, &last.alarm);
                cursor = Some((alarm.spec.due_at_ms, object.ns.clone(), object.id.clone(), alarm.name.clone()));
            }
            let busy = self.busy.lock().unwrap();
            let done = self.done.lock().unwrap();
            let elsewhere = self.elsewhere.lock().unwrap();
            for due in page {
                let key = (due.object.clone(), due.alarm.name.clone());
                let stale = done.get(&key).is_some_and(|(armed, attempt, _)| {
                    (*armed, *attempt) == (due.alarm.armed_version, due.alarm.spec.attempt)
                });
                if !busy.contains(&key) && !stale && !elsewhere.contains_key(&due.object) {
                    picked.push(due);
                }
            }
            drop((busy, done, elsewhere));
            if !more || picked.len() >= room {
                break;
            }
        }
        picked.truncate(room);
        let full = picked.len() >= room;
        if full {
            let last = picked.last().map(|due| {
                let (object, alarm) = (&due.object, &due.alarm);
                (alarm.spec.due_at_ms, object.ns.clone(), object.id.clone(), alarm.name.clone())
            });
            *self.resume.lock().unwrap() = last;
        } else if !reached_end {
            *self.resume.lock().unwrap() = cursor;
        }
        let mut by_object: indexmap::IndexMap<ObjectRef, Vec<Alarm>> = indexmap::IndexMap::new();
        {
            let mut busy = self.busy.lock().unwrap();
            for due in picked {
                busy.insert((due.object.clone(), due.alarm.name.clone()));
                by_object.entry(due.object).or_default().push(due.alarm);
            }
        }
        for (object, alarms) in by_object {
            let pass = self.clone();
            tokio::spawn(async move { pass.fire_object(object, alarms).await });
        }
        Ok(full)
    }

    /// Fires `alarms` of `object` if this replica owns it (taking a free lease).
    async fn fire_object(self: Arc<Self>, object: ObjectRef, alarms: Vec<Alarm>) {
        let route = if self.stop.is_cancelled() { None } else { Some(self.guard.route(&object).await) };
        match route {
            None => {}
            Some(Ok(Route::Local(lease))) => {
                let fired = alarms.iter().map(|alarm| self.fire(&lease, alarm));
                futures::future::join_all(fired).await;
            }
            Some(Ok(Route::Remote(owner))) => {
                let remaining = Duration::from_millis((owner.lease_expires_at_ms - now_ms()).max(0) as u64);
                self.elsewhere.lock().unwrap().insert(object.clone(), Instant::now() + remaining);
            }
            Some(Err(err)) => {
                tracing::warn!(object = %object, error = %err, "could not take an object's lease to fire its alarms")
            }
        }
        let mut busy = self.busy.lock().unwrap();
        for alarm in &alarms {
            busy.remove(&(object.clone(), alarm.name.clone()));
        }
    }

    /// One delivery attempt of `alarm`, and its outcome recorded under `lease`.
    async fn fire(&self, lease: &HeldLease, alarm: &Alarm) {
        // The permit bounds the calls in flight; recording is bounded by the writer's groups.
        let Ok(permit) = self.permits.acquire().await else { return };
        let object = &lease.object;
        let alarms = &self.alarms;
        let attempt = alarm.spec.attempt + 1;
        let fired_at = now_ms();
        let lateness_ms = (fired_at - alarm.spec.scheduled_at_ms).max(0);
        if attempt == 1 {
            alarms.metrics.lateness.observe(lateness_ms as f64 / 1000.0);
        }
        let delivery = Delivery {
            ns: object.ns.clone(),
            id: object.id.clone(),
            name: alarm.name.clone(),
            scheduled_at: rfc3339_ms(alarm.spec.scheduled_at_ms),
            fired_at: rfc3339_ms(fired_at),
            attempt,
            payload: alarm.spec.payload.as_deref().and_then(|p| serde_json::from_str(p).ok()),
            alarm_version: alarm.armed_version,
        };
        let started = Instant::now();
        let status = self.post(object, &delivery).await;
        drop(permit);
        let latency_ms = started.elapsed().as_millis() as i64;
        let delivered = status.is_some_and(|s| (200..300).contains(&s));

        let mut events = Vec::new();
        let event = |event_type: &str, data: serde_json::Value| Event {
            event_id: uuid::Uuid::now_v7(),
            event_type: event_type.to_string(),
            data: data.to_string(),
            ts_micros: fired_at * 1000,
        };
        let outcome = if delivered {
            "delivered"
        } else if attempt <= alarms.max_retries {
            "retry"
        } else {
            "failed"
        };
        events.push(event(
            "alarm.fired",
            serde_json::json!({
                "name": alarm.name, "scheduled_at": delivery.scheduled_at, "fired_at": delivery.fired_at,
                "attempt": attempt, "alarm_version": alarm.armed_version, "status": status, "outcome": outcome,
                "latency_ms": latency_ms, "lateness_ms": lateness_ms,
            }),
        ));
        let pre = Precondition { if_match: Some(VersionMatch::OneOf(vec![alarm.version])), if_none_match: None };
        let next_period = |from: &AlarmSpec| {
            from.every_ms.map(|every| {
                // No drift: the next time is a whole number of periods after
                // the scheduled one; periods already past are fired once.
                let behind = (fired_at - from.scheduled_at_ms).max(0) / every;
                let at = from.scheduled_at_ms + (behind + 1) * every;
                AlarmSpec::armed(at, Some(every), from.payload.clone())
            })
        };
        let op = match outcome {
            "retry" => {
                let wait = alarms.backoff(attempt).as_millis() as i64;
                let retry = AlarmSpec {
                    due_at_ms: now_ms() + wait,
                    attempt,
                    armed_version: Some(alarm.armed_version),
                    ..alarm.spec.clone()
                };
                Op::SetAlarm { name: alarm.name.clone(), alarm: retry, pre }
            }
            _ => {
                if outcome == "failed" {
                    events.push(event(
                        "alarm.failed",
                        serde_json::json!({
                            "name": alarm.name, "scheduled_at": delivery.scheduled_at, "attempts": attempt,
                            "alarm_version": alarm.armed_version, "status": status, "latency_ms": latency_ms,
                        }),
                    ));
                }
                match next_period(&alarm.spec) {
                    Some(next) => Op::SetAlarm { name: alarm.name.clone(), alarm: next, pre },
                    None => Op::DeleteAlarm { name: alarm.name.clone(), pre },
                }
            }
        };
        alarms.metrics.deliveries.with_label_values(&[outcome]).inc();
        if outcome == "retry" {
            alarms.metrics.retries.inc();
        }
        self.record(lease, alarm, vec![op], events).await;
    }

    /// POSTs `delivery` to its namespace's target: the status, or None when no answer came in time.
    async fn post(&self, object: &ObjectRef, delivery: &Delivery) -> Option<u16> {
        let alarms = &self.alarms;
        let Some(url) = alarms.targets.target(&object.ns) else {
            tracing::warn!(object = %object, "an alarm's namespace has no target any more; the attempt fails");
            return None;
        };
        let body = serde_json::to_vec(delivery).expect("a delivery serialises");
        let secret = alarms.secret.as_ref().map(|s| s.expose().as_bytes()).unwrap_or_default();
        let signature = sign::signature(secret, now_ms() / 1000, &body);
        let sent = self
            .client
            .post(url.clone())
            .timeout(alarms.timeout)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(sign::SIGNATURE_HEADER, signature)
            .body(body)
            .send()
            .await;
        match sent {
            Ok(response) => {
                let status = response.status().as_u16();
                // Read the answer through, so the connection is kept for the next delivery.
                let _ = tokio::time::timeout(alarms.timeout, response.bytes()).await;
                Some(status)
            }
            Err(err) => {
                tracing::debug!(object = %object, error = %err, "alarm delivery got no answer");
                None
            }
        }
    }

    /// Records an attempt's outcome by a fenced write of the object. A
    /// client that changed the alarm meanwhile wins: then only the events are recorded.
    async fn record(&self, lease: &HeldLease, alarm: &Alarm, ops: Vec<Op>, events: Vec<Event>) {
        let key = (lease.object.clone(), alarm.name.clone());
        let mut mutation = Mutation::Ops { ops, events: events.clone() };
        for _ in 0..2 {
            let job = WriteJob::new(lease.clone(), mutation, now_ms(), self.value_cap);
            match self.writer.run(job).await {
                Ok(Ok(_)) => {
                    self.done.lock().unwrap().insert(key, (alarm.armed_version, alarm.spec.attempt, Instant::now()));
                    return;
                }
                Ok(Err(Rejection::PreconditionFailed { .. })) => {
                    mutation = Mutation::Ops { ops: Vec::new(), events: events.clone() };
                }
                Ok(Err(Rejection::Fenced)) => {
                    self.guard.lost(lease);
                    self.alarms.metrics.unrecorded.inc();
                    tracing::info!(object = %lease.object, alarm = %alarm.name,
                        "an alarm was delivered but the object moved before the outcome was recorded; its new owner delivers it again");
                    return;
                }
                // Key and alarm ops are never refused for these.
                Ok(Err(Rejection::NotFound | Rejection::NotEmpty)) => return,
                Err(err) => {
                    self.alarms.metrics.unrecorded.inc();
                    tracing::warn!(object = %lease.object, alarm = %alarm.name, error = %err,
                        "could not record an alarm delivery; it is delivered again");
                    return;
                }
            }
        }
    }
}
