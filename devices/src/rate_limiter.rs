//! Token buckets that keep one guest from starving the host's disk (and, later, network): a
//! bucket of bytes and a bucket of operations, each refilled continuously at its rate.
//!
//! A request is let through whenever its buckets are not in debt, and then charged in full,
//! possibly going into debt: a request larger than a bucket's capacity still passes (after the
//! bucket refilled to zero), so no request size can wedge a device, and over time the rate
//! holds. A device that is refused retries when [`RateLimiter::wait_time`] says the buckets
//! are out of debt.

use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// Limits for one device; `None` is unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    /// Sustained bytes per second.
    #[serde(default)]
    pub bytes_per_sec: Option<u64>,
    /// Sustained operations (requests) per second.
    #[serde(default)]
    pub ops_per_sec: Option<u64>,
}

impl RateLimit {
    /// Whether anything is limited.
    pub fn is_limited(&self) -> bool {
        self.bytes_per_sec.is_some() || self.ops_per_sec.is_some()
    }
}

/// One bucket: `tokens` may go negative (debt); it refills at `rate` per second up to
/// `capacity` (one second's worth: the burst a device may take after idling).
#[derive(Debug, Clone)]
struct TokenBucket {
    rate: u64,
    capacity: i128,
    /// Tokens, in units of 1/`rate` nanoseconds of refill: kept as `tokens * 1e9` so refills of
    /// a few nanoseconds are not lost to rounding.
    scaled_tokens: i128,
    last_refill: Instant,
}

const NANOS: i128 = 1_000_000_000;

impl TokenBucket {
    fn new(rate: u64, now: Instant) -> TokenBucket {
        let rate = rate.max(1);
        let capacity = i128::from(rate);
        TokenBucket {
            rate,
            capacity,
            scaled_tokens: capacity * NANOS,
            last_refill: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last_refill).as_nanos();
        self.last_refill = now;
        let added = i128::try_from(elapsed).unwrap_or(i128::MAX / 4) * i128::from(self.rate);
        self.scaled_tokens = self
            .scaled_tokens
            .saturating_add(added)
            .min(self.capacity * NANOS);
    }

    fn in_debt(&self) -> bool {
        self.scaled_tokens < 0
    }

    fn charge(&mut self, cost: u64) {
        self.scaled_tokens = self.scaled_tokens.saturating_sub(i128::from(cost) * NANOS);
    }

    /// How long until the debt is paid (zero if there is none).
    fn wait_time(&self) -> Duration {
        if self.scaled_tokens >= 0 {
            return Duration::ZERO;
        }
        // debt / rate seconds = debt_scaled / rate nanoseconds, rounded up.
        let nanos = (-self.scaled_tokens + i128::from(self.rate) - 1) / i128::from(self.rate);
        Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
    }
}

/// The bytes and operations buckets of one device.
#[derive(Debug, Clone)]
pub struct RateLimiter {
    bytes: Option<TokenBucket>,
    ops: Option<TokenBucket>,
    /// Requests refused so far (each retried later).
    throttled: u64,
}

impl RateLimiter {
    pub fn new(limit: RateLimit) -> RateLimiter {
        RateLimiter::new_at(limit, Instant::now())
    }

    fn new_at(limit: RateLimit, now: Instant) -> RateLimiter {
        RateLimiter {
            bytes: limit.bytes_per_sec.map(|rate| TokenBucket::new(rate, now)),
            ops: limit.ops_per_sec.map(|rate| TokenBucket::new(rate, now)),
            throttled: 0,
        }
    }

    /// An unlimited limiter (lets everything through).
    pub fn unlimited() -> RateLimiter {
        RateLimiter::new(RateLimit::default())
    }

    /// Lets a request of `bytes` through (charging both buckets) unless a bucket is in debt.
    pub fn try_consume(&mut self, bytes: u64) -> bool {
        self.try_consume_at(bytes, Instant::now())
    }

    fn try_consume_at(&mut self, bytes: u64, now: Instant) -> bool {
        let mut blocked = false;
        for bucket in self.bytes.iter_mut().chain(self.ops.iter_mut()) {
            bucket.refill(now);
            blocked |= bucket.in_debt();
        }
        if blocked {
            self.throttled += 1;
            return false;
        }
        if let Some(b) = self.bytes.as_mut() {
            b.charge(bytes);
        }
        if let Some(b) = self.ops.as_mut() {
            b.charge(1);
        }
        true
    }

    /// How long until a refused request may be tried again.
    pub fn wait_time(&self) -> Duration {
        self.bytes
            .iter()
            .chain(self.ops.iter())
            .map(TokenBucket::wait_time)
            .max()
            .unwrap_or(Duration::ZERO)
    }

    /// Requests refused so far.
    pub fn throttled(&self) -> u64 {
        self.throttled
    }

    /// Whether any bucket is configured.
    pub fn is_limited(&self) -> bool {
        self.bytes.is_some() || self.ops.is_some()
    }
}

/// A rate-limited queue of a device: its [`RateLimiter`], the timer that resumes the queue once
/// the buckets allow, and whether the queue waits for that timer (kicks and other readiness
/// then change nothing). The device registers [`Throttle::timer`] with its event loop and calls
/// [`Throttle::expired`] when it fires.
#[derive(Debug)]
pub struct Throttle {
    limiter: RateLimiter,
    /// Exists when limited.
    timer: Option<vmm_sys_util::timerfd::TimerFd>,
    waiting: bool,
    /// Device and queue, for log lines.
    name: &'static str,
}

impl Throttle {
    /// A throttle for `limit`; `name` says whose (e.g. "virtio-net transmit").
    pub fn new(limit: RateLimit, name: &'static str) -> std::io::Result<Throttle> {
        let timer = if limit.is_limited() {
            Some(vmm_sys_util::timerfd::TimerFd::new().map_err(std::io::Error::from)?)
        } else {
            None
        };
        Ok(Throttle {
            limiter: RateLimiter::new(limit),
            timer,
            waiting: false,
            name,
        })
    }

    /// An unlimited throttle (no timer; never waits).
    pub fn unlimited(name: &'static str) -> Throttle {
        Throttle {
            limiter: RateLimiter::unlimited(),
            timer: None,
            waiting: false,
            name,
        }
    }

    /// The buckets, for code that charges them itself (then [`Throttle::hold`] on a refusal).
    pub fn limiter_mut(&mut self) -> &mut RateLimiter {
        &mut self.limiter
    }

    /// Lets a request of `bytes` through, or holds the queue until the timer fires.
    pub fn admit(&mut self, bytes: u64) -> bool {
        self.limiter.try_consume(bytes) || !self.hold()
    }

    /// After the buckets refused a request: arms the timer for when they allow again and
    /// marks the queue waiting. Returns whether it waits: without a working timer the queue
    /// would wait for an event that may not come, so it does not (and the request goes on).
    pub fn hold(&mut self) -> bool {
        // At least a millisecond: a timer of zero would disarm it.
        let wait = self.limiter.wait_time().max(Duration::from_millis(1));
        match self.timer.as_mut().map(|t| t.reset(wait, None)) {
            Some(Ok(())) => self.waiting = true,
            Some(Err(e)) => {
                log::error!("{}: cannot arm the rate limiter's timer: {e}", self.name);
                self.waiting = false;
            }
            None => {
                log::error!("{}: throttled without a timer", self.name);
                self.waiting = false;
            }
        }
        self.waiting
    }

    /// Whether the queue waits for the timer.
    pub fn waiting(&self) -> bool {
        self.waiting
    }

    /// Stops waiting (the queue was reset or restored and is processed now anyway).
    pub fn release(&mut self) {
        self.waiting = false;
    }

    /// The timer to register with the event loop (none when unlimited).
    pub fn timer(&self) -> Option<&vmm_sys_util::timerfd::TimerFd> {
        self.timer.as_ref()
    }

    /// If `fd` is this throttle's timer: clears its expiry and stops waiting; returns whether
    /// it was.
    pub fn expired(&mut self, fd: i32) -> bool {
        match self.timer.as_mut().filter(|t| t.as_raw_fd() == fd) {
            Some(timer) => {
                // Readable: it expired, and the read does not block.
                let _ = timer.wait();
                self.waiting = false;
                true
            }
            None => false,
        }
    }

    /// Requests held back so far.
    pub fn throttled(&self) -> u64 {
        self.limiter.throttled()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn limit(bytes: Option<u64>, ops: Option<u64>) -> RateLimit {
        RateLimit {
            bytes_per_sec: bytes,
            ops_per_sec: ops,
        }
    }

    #[test]
    fn unlimited_lets_everything_through() {
        let mut r = RateLimiter::unlimited();
        for _ in 0..10_000 {
            assert!(r.try_consume(u64::MAX));
        }
        assert_eq!(r.wait_time(), Duration::ZERO);
        assert!(!r.is_limited());
    }

    #[test]
    fn bytes_are_limited_to_the_rate_over_time() {
        let t0 = Instant::now();
        let mut r = RateLimiter::new_at(limit(Some(MIB), None), t0);
        // A full bucket: one second's worth passes at once, then the bucket is in debt.
        assert!(r.try_consume_at(MIB / 2, t0));
        assert!(r.try_consume_at(MIB / 2, t0));
        assert!(r.try_consume_at(1, t0));
        assert!(!r.try_consume_at(1, t0));
        assert_eq!(r.throttled(), 1);
        // The one byte of debt is paid within a microsecond.
        assert!(r.wait_time() <= Duration::from_micros(1));
        // Streaming 4 KiB requests for 10 simulated seconds moves ~10 MiB (+ the burst).
        let mut now = t0;
        let mut moved = 0u64;
        while now < t0 + Duration::from_secs(10) {
            if r.try_consume_at(4096, now) {
                moved += 4096;
            } else {
                now += r.wait_time().max(Duration::from_micros(1));
            }
        }
        assert!(
            (10 * MIB..=11 * MIB + 8192).contains(&moved),
            "moved {moved} bytes in 10 s at 1 MiB/s"
        );
    }

    #[test]
    fn a_request_larger_than_the_bucket_passes_and_is_paid_for_later() {
        let t0 = Instant::now();
        let mut r = RateLimiter::new_at(limit(Some(MIB), None), t0);
        assert!(r.try_consume_at(8 * MIB, t0));
        // 7 MiB of debt: 7 s at 1 MiB/s.
        let wait = r.wait_time();
        assert!(
            (Duration::from_millis(6990)..=Duration::from_millis(7010)).contains(&wait),
            "{wait:?}"
        );
        assert!(!r.try_consume_at(1, t0 + Duration::from_secs(6)));
        assert!(r.try_consume_at(1, t0 + Duration::from_secs(7) + Duration::from_millis(1)));
    }

    #[test]
    fn operations_are_limited_independently_of_size() {
        let t0 = Instant::now();
        let mut r = RateLimiter::new_at(limit(None, Some(100)), t0);
        let passed = (0..1000).filter(|_| r.try_consume_at(0, t0)).count();
        // The 100 in the bucket, and one more that takes it into debt.
        assert_eq!(passed, 101);
        assert_eq!(r.wait_time(), Duration::from_millis(10));
        let later = t0 + Duration::from_secs(1);
        let passed = (0..1000).filter(|_| r.try_consume_at(0, later)).count();
        assert_eq!(passed, 100, "one second refills 100 (one was owed)");
    }

    #[test]
    fn both_buckets_must_be_out_of_debt() {
        let t0 = Instant::now();
        let mut r = RateLimiter::new_at(limit(Some(MIB), Some(1000)), t0);
        assert!(r.try_consume_at(2 * MIB, t0));
        assert!(!r.try_consume_at(0, t0), "the bytes bucket is in debt");
        assert_eq!(r.wait_time(), Duration::from_secs(1));
    }

    #[test]
    fn a_zero_rate_is_treated_as_one_per_second_not_a_division_by_zero() {
        let t0 = Instant::now();
        let mut r = RateLimiter::new_at(limit(Some(0), Some(0)), t0);
        assert!(r.try_consume_at(1, t0));
        assert!(r.try_consume_at(1, t0));
        assert!(!r.try_consume_at(1, t0));
        assert!(r.wait_time() <= Duration::from_secs(1));
    }
}
