//! How much one caller, and all of them together, may ask of a replica:
//! a token bucket per caller, and a cap on open connections.

use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use prometheus::IntGauge;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Buckets idle this long are full again and can be forgotten.
const IDLE_BUCKET: Duration = Duration::from_secs(300);
/// Above this many buckets, idle ones are dropped (bounds memory under many callers).
const MAX_BUCKETS: usize = 100_000;

/// Requests per second, and how many may come at once above that pace.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    per_sec: f64,
    burst: f64,
}

impl Rate {
    /// `burst` 0 means one second's worth.
    pub fn new(per_sec: u64, burst: u64) -> Rate {
        let burst = if burst == 0 { per_sec } else { burst };
        Rate { per_sec: per_sec as f64, burst: burst.max(1) as f64 }
    }
}

struct Bucket {
    tokens: f64,
    refilled: Instant,
}

/// One token bucket per caller name.
pub struct RateLimiter {
    default: Option<Rate>,
    buckets: Mutex<HashMap<String, Bucket>>,
}

impl RateLimiter {
    /// `default` applies to callers without a rate of their own; `None` = unlimited.
    pub fn new(default: Option<Rate>) -> RateLimiter {
        RateLimiter { default, buckets: Mutex::new(HashMap::new()) }
    }

    /// Takes one request from `caller`'s bucket, or says how long until one is there.
    pub fn check(&self, caller: &str, own: Option<Rate>) -> Result<(), Duration> {
        let Some(rate) = own.or(self.default) else { return Ok(()) };
        let now = Instant::now();
        let mut buckets = self.buckets.lock().expect("rate limiter lock");
        if buckets.len() >= MAX_BUCKETS && !buckets.contains_key(caller) {
            buckets.retain(|_, b| now.duration_since(b.refilled) < IDLE_BUCKET);
        }
        let bucket = buckets.entry(caller.to_string()).or_insert(Bucket { tokens: rate.burst, refilled: now });
        let elapsed = now.duration_since(bucket.refilled).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * rate.per_sec).min(rate.burst);
        bucket.refilled = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - bucket.tokens) / rate.per_sec))
        }
    }
}

/// A listener that serves at most `max` connections at once; further ones wait
/// in the kernel's backlog until one closes, instead of exhausting memory or descriptors.
pub struct LimitedListener {
    inner: TcpListener,
    permits: Arc<Semaphore>,
    open: IntGauge,
}

impl LimitedListener {
    /// `open` counts the connections being served.
    pub fn new(inner: TcpListener, max: usize, open: IntGauge) -> LimitedListener {
        LimitedListener { inner, permits: Arc::new(Semaphore::new(max)), open }
    }
}

impl axum::serve::Listener for LimitedListener {
    type Io = Limited;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Limited, std::net::SocketAddr) {
        let permit = self.permits.clone().acquire_owned().await.expect("the semaphore is never closed");
        let (stream, addr) = axum::serve::Listener::accept(&mut self.inner).await;
        // Responses are small and latency-bound: do not wait to coalesce them.
        let _ = stream.set_nodelay(true);
        self.open.inc();
        (Limited { stream, open: self.open.clone(), _permit: permit }, addr)
    }

    fn local_addr(&self) -> io::Result<std::net::SocketAddr> {
        self.inner.local_addr()
    }
}

/// A connection holding its slot until it is dropped.
pub struct Limited {
    stream: TcpStream,
    open: IntGauge,
    _permit: OwnedSemaphorePermit,
}

impl Drop for Limited {
    fn drop(&mut self) {
        self.open.dec();
    }
}

impl AsyncRead for Limited {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Limited {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_refill_at_the_rate() {
        let limiter = RateLimiter::new(Some(Rate::new(10, 3)));
        for _ in 0..3 {
            assert!(limiter.check("a", None).is_ok());
        }
        let wait = limiter.check("a", None).unwrap_err();
        assert!(wait > Duration::from_millis(50) && wait <= Duration::from_millis(100), "{wait:?}");
        assert!(limiter.check("b", None).is_ok(), "callers have their own buckets");
        std::thread::sleep(Duration::from_millis(120));
        assert!(limiter.check("a", None).is_ok());
        assert!(RateLimiter::new(None).check("a", None).is_ok());
        let own = RateLimiter::new(None);
        assert!(own.check("c", Some(Rate::new(1, 1))).is_ok());
        assert!(own.check("c", Some(Rate::new(1, 1))).is_err(), "a caller's own rate applies without a default");
    }
}
