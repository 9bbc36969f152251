//! Alarms: durable timers of an object, set and deleted by its fenced writes.

use super::InvalidName;

/// Alarm names follow the key rules, shorter: they are path segments of
/// webhook payloads and admin listings, and an object holds few of them.
pub const MAX_ALARM_NAME_BYTES: usize = 128;

/// The Durable-Object-compatible single alarm's name.
pub const DEFAULT_ALARM_NAME: &str = "alarm";

/// The shortest period of a repeating alarm.
pub const MIN_ALARM_EVERY_MS: i64 = 1000;

/// The largest payload (serialised JSON) an alarm carries.
pub const MAX_ALARM_PAYLOAD_BYTES: usize = 4096;

/// Any UTF-8 string of 1-128 bytes without control characters.
pub fn validate_alarm_name(name: &str) -> Result<(), InvalidName> {
    let problem = if name.is_empty() {
        Some("it must not be empty".to_string())
    } else if name.len() > MAX_ALARM_NAME_BYTES {
        Some(format!("{} bytes, at most {MAX_ALARM_NAME_BYTES} allowed", name.len()))
    } else if name.chars().any(char::is_control) {
        Some("control characters are not allowed".into())
    } else {
        None
    };
    match problem {
        None => Ok(()),
        Some(problem) => Err(InvalidName(format!("invalid alarm name: {problem}"))),
    }
}

/// What an alarm is set to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AlarmSpec {
    /// Unix ms: the time it is for.
    pub scheduled_at_ms: i64,
    /// Unix ms: when to deliver next (the scheduled time, or a retry's).
    pub due_at_ms: i64,
    pub every_ms: Option<i64>,
    /// Serialised JSON.
    pub payload: Option<String>,
    /// Deliveries already attempted for this scheduled time.
    pub attempt: i64,
    /// The arming this write continues (a retry, the next period); `None`
    /// arms anew at the write's own version.
    pub armed_version: Option<i64>,
}

impl AlarmSpec {
    /// A new arming by a client, due at `at_ms`.
    pub fn armed(at_ms: i64, every_ms: Option<i64>, payload: Option<String>) -> AlarmSpec {
        AlarmSpec { scheduled_at_ms: at_ms, due_at_ms: at_ms, every_ms, payload, attempt: 0, armed_version: None }
    }
}

/// An alarm as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Alarm {
    pub name: String,
    pub spec: AlarmSpec,
    /// The object version at which this arming was set.
    pub armed_version: i64,
    /// The object version at which the row was last written (its ETag).
    pub version: i64,
}
