//! Wall-clock time: lease expiry (liveness), and the times the server records
//! and answers (commit and event timestamps, blob ages, presigned URLs, token
//! expiry). The safety of writes never reads it: the fence decides.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO).as_millis() as i64
}

/// RFC 3339 with milliseconds, for unix-millisecond timestamps in responses.
pub fn rfc3339_ms(unix_ms: i64) -> String {
    let at = UNIX_EPOCH + Duration::from_millis(unix_ms.max(0) as u64);
    humantime::format_rfc3339_millis(at).to_string()
}
