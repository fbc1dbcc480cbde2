//! Token buckets for a device's I/O (Firecracker's rate limiter idea, our
//! own code): one for bytes, one for operations, each refilled at its rate
//! and holding at most its burst. A device asks `admit` before it takes a
//! request from the guest and reports the request's size with `consume`
//! after serving it; the bucket may go into debt by that one request, so
//! the long-run rate is exact whatever the request sizes. While a bucket
//! is empty the device stops taking requests and the limiter's timerfd,
//! armed for the moment the tokens are back, wakes its worker: no
//! busy-waiting.
//!
//! The limiter also counts what passed (bytes, operations) and how long
//! the device was held back, for the stats.

use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nix::sys::time::TimeSpec;
use nix::sys::timerfd::{ClockId, Expiration, TimerFd, TimerFlags, TimerSetTimeFlags};

pub use berth_proto::vmm_process::config::{BucketConfig, LimitConfig};

/// Tokens a full bucket holds: its burst, or a tenth of a second's worth.
fn capacity(config: BucketConfig) -> f64 {
    if config.burst > 0 {
        config.burst as f64
    } else {
        (config.rate_per_s / 10).max(1) as f64
    }
}

#[derive(Debug)]
struct Bucket {
    config: BucketConfig,
    tokens: f64,
}

impl Bucket {
    fn new(config: BucketConfig) -> Bucket {
        Bucket {
            config,
            tokens: capacity(config),
        }
    }

    fn refill(&mut self, elapsed: Duration) {
        if self.config.rate_per_s > 0 {
            let added = self.config.rate_per_s as f64 * elapsed.as_secs_f64();
            self.tokens = (self.tokens + added).min(capacity(self.config));
        }
    }

    /// How long until a request may go; None if one may go now.
    fn wait(&self) -> Option<Duration> {
        if self.config.rate_per_s == 0 || self.tokens > 0.0 {
            return None;
        }
        let secs = (-self.tokens + 1.0) / self.config.rate_per_s as f64;
        Some(Duration::from_secs_f64(secs).max(Duration::from_micros(100)))
    }

    fn take(&mut self, n: u64) {
        if self.config.rate_per_s > 0 {
            self.tokens -= n as f64;
        }
    }
}

struct State {
    bytes: Bucket,
    ops: Bucket,
    refilled_at: Instant,
    blocked_since: Option<Instant>,
}

impl State {
    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.refilled_at);
        self.bytes.refill(elapsed);
        self.ops.refill(elapsed);
        self.refilled_at = now;
    }
}

/// What a limiter let through, and for how long it held the device back.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LimiterStats {
    pub bytes: u64,
    pub ops: u64,
    pub throttled_ns: u64,
}

pub struct RateLimiter {
    state: Mutex<State>,
    /// Non-blocking, so a read after the timer was re-armed cannot hang.
    timer: TimerFd,
    bytes: AtomicU64,
    ops: AtomicU64,
    throttled_ns: AtomicU64,
}

impl RateLimiter {
    pub fn new(config: LimitConfig) -> std::io::Result<RateLimiter> {
        let flags = TimerFlags::TFD_NONBLOCK | TimerFlags::TFD_CLOEXEC;
        let timer = TimerFd::new(ClockId::CLOCK_MONOTONIC, flags)?;
        Ok(RateLimiter {
            timer,
            state: Mutex::new(State {
                bytes: Bucket::new(config.bytes),
                ops: Bucket::new(config.ops),
                refilled_at: Instant::now(),
                blocked_since: None,
            }),
            bytes: AtomicU64::new(0),
            ops: AtomicU64::new(0),
            throttled_ns: AtomicU64::new(0),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The fd that becomes readable when a held-back device may go on; the
    /// worker watches it and calls `timer_fired` then.
    pub fn timer_fd(&self) -> RawFd {
        self.timer.as_fd().as_raw_fd()
    }

    /// Takes the expiry off the fd (nothing to take if it was re-armed).
    pub fn timer_fired(&self) {
        let _ = self.timer.wait();
    }

    fn arm(&self, after: Duration) -> nix::Result<()> {
        let when = Expiration::OneShot(TimeSpec::from(after));
        self.timer.set(when, TimerSetTimeFlags::empty())
    }

    /// May the device take one more request now? If not, the timer is
    /// armed for when it may.
    pub fn admit(&self) -> bool {
        let now = Instant::now();
        let mut state = self.lock();
        state.refill(now);
        let wait = match (state.bytes.wait(), state.ops.wait()) {
            (None, None) => None,
            (a, b) => a.max(b),
        };
        match wait {
            None => {
                if let Some(since) = state.blocked_since.take() {
                    let held = now.saturating_duration_since(since).as_nanos() as u64;
                    self.throttled_ns.fetch_add(held, Ordering::Relaxed);
                }
                true
            }
            Some(wait) => {
                state.blocked_since.get_or_insert(now);
                if let Err(e) = self.arm(wait) {
                    // Without the timer the device would stall for good:
                    // better to let the request through.
                    eprintln!("berth-vmm: rate limiter timer failed ({e}); not limiting");
                    return true;
                }
                false
            }
        }
    }

    /// One request of `bytes` was served.
    pub fn consume(&self, bytes: u64) {
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
        self.ops.fetch_add(1, Ordering::Relaxed);
        let mut state = self.lock();
        state.bytes.take(bytes);
        state.ops.take(1);
    }

    /// New limits, effective at once. The buckets keep their debt (so a
    /// change cannot be used to skip a wait) but no more than the new
    /// burst; the timer fires right away so a held-back device re-checks.
    pub fn update(&self, config: LimitConfig) {
        let now = Instant::now();
        let mut guard = self.lock();
        let state = &mut *guard;
        state.refill(now);
        for (bucket, new) in [
            (&mut state.bytes, config.bytes),
            (&mut state.ops, config.ops),
        ] {
            let was_unlimited = bucket.config.rate_per_s == 0;
            bucket.config = new;
            bucket.tokens = if was_unlimited {
                capacity(new)
            } else {
                bucket.tokens.min(capacity(new))
            };
        }
        if state.blocked_since.is_some() {
            let _ = self.arm(Duration::from_micros(1));
        }
    }

    pub fn config(&self) -> LimitConfig {
        let state = self.lock();
        LimitConfig {
            bytes: state.bytes.config,
            ops: state.ops.config,
        }
    }

    pub fn stats(&self) -> LimiterStats {
        let mut throttled_ns = self.throttled_ns.load(Ordering::Relaxed);
        if let Some(since) = self.lock().blocked_since {
            throttled_ns += since.elapsed().as_nanos() as u64;
        }
        LimiterStats {
            bytes: self.bytes.load(Ordering::Relaxed),
            ops: self.ops.load(Ordering::Relaxed),
            throttled_ns,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::epoll::{Epoll, EpollEvent};

    fn limit(bytes: u64, burst: u64) -> LimitConfig {
        LimitConfig {
            bytes: BucketConfig {
                rate_per_s: bytes,
                burst,
            },
            ops: BucketConfig::default(),
        }
    }

    #[test]
    fn unlimited_always_admits_and_counts() {
        let l = RateLimiter::new(LimitConfig::default()).unwrap();
        for _ in 0..1000 {
            assert!(l.admit());
            l.consume(1 << 20);
        }
        let s = l.stats();
        assert_eq!((s.bytes, s.ops, s.throttled_ns), (1000 << 20, 1000, 0));
    }

    #[test]
    fn the_long_run_rate_is_the_configured_one() {
        // 1 MiB/s, burst 64 KiB, 64 KiB requests: 1 MiB more takes ~1 s.
        let l = RateLimiter::new(limit(1 << 20, 64 << 10)).unwrap();
        let epoll = Epoll::new().unwrap();
        crate::devices::virtio::worker::watch(&epoll, l.timer_fd(), 0).unwrap();
        let start = Instant::now();
        let mut served = 0u64;
        while served < (1 << 20) + (64 << 10) {
            if l.admit() {
                l.consume(64 << 10);
                served += 64 << 10;
            } else {
                // What the worker's epoll does: sleep until the timer fires.
                let mut events = [EpollEvent::default()];
                assert_eq!(epoll.wait(5000, &mut events).unwrap(), 1);
                l.timer_fired();
            }
        }
        let secs = start.elapsed().as_secs_f64();
        assert!((0.9..1.2).contains(&secs), "took {secs} s");
        assert!(l.stats().throttled_ns > 800_000_000, "{:?}", l.stats());
    }

    #[test]
    fn an_update_applies_at_once_and_keeps_the_debt() {
        let l = RateLimiter::new(limit(1000, 1000)).unwrap();
        assert!(l.admit());
        l.consume(5000);
        assert!(!l.admit(), "4000 bytes in debt");
        l.update(limit(0, 0));
        assert!(l.admit(), "unlimited now");
        l.update(limit(1000, 100));
        assert!(l.admit(), "a fresh bucket after unlimited");
        assert_eq!(l.config(), limit(1000, 100));
    }
}
