//! The publish rate per client: a token bucket per key (the token's subject, else the peer's
//! IP). Applied per publish by the transports (`POST`, WebSocket `publish` frames, Durable
//! Streams appends), which is why it sits below them rather than in the gate.

use std::{
    collections::HashMap,
    sync::{Mutex, PoisonError},
    time::{Duration, Instant},
};

use crate::error::Error;

/// A token bucket per key: `rate` publishes per second, in bursts of up to `rate`.
#[derive(Debug)]
pub struct RateLimiter {
    rate: f64,
    buckets: Mutex<HashMap<String, Bucket>>,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    updated: Instant,
}

/// Keys tracked before full buckets are forgotten (a full bucket is the same as no bucket).
const BUCKETS_BEFORE_SWEEP: usize = 10_000;

impl RateLimiter {
    /// `rate` actions per second per key; `0` allows everything.
    pub fn new(rate: u32) -> Self {
        Self {
            rate: f64::from(rate),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one action for `key`, or says when to retry.
    pub fn check(&self, key: &str) -> Result<(), Error> {
        self.check_at(key, Instant::now())
    }

    fn check_at(&self, key: &str, now: Instant) -> Result<(), Error> {
        if self.rate == 0.0 {
            return Ok(());
        }
        let mut buckets = self.buckets.lock().unwrap_or_else(PoisonError::into_inner);
        if buckets.len() >= BUCKETS_BEFORE_SWEEP && !buckets.contains_key(key) {
            let rate = self.rate;
            buckets.retain(|_, b| refill(b, rate, now) < rate);
        }
        let bucket = buckets.entry(key.to_owned()).or_insert(Bucket {
            tokens: self.rate,
            updated: now,
        });
        let tokens = refill(bucket, self.rate, now);
        if tokens >= 1.0 {
            bucket.tokens = tokens - 1.0;
            bucket.updated = now;
            Ok(())
        } else {
            let wait = Duration::from_secs_f64((1.0 - tokens) / self.rate);
            Err(Error::TooManyRequests {
                what: "publish rate limit",
                retry_after: wait.as_secs().max(1),
            })
        }
    }
}

fn refill(bucket: &Bucket, rate: f64, now: Instant) -> f64 {
    let elapsed = now.saturating_duration_since(bucket.updated).as_secs_f64();
    (bucket.tokens + elapsed * rate).min(rate)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_limiter_allows_bursts_then_refills() {
        let limiter = RateLimiter::new(5);
        let start = Instant::now();
        for _ in 0..5 {
            limiter.check_at("ana", start).unwrap();
        }
        assert!(matches!(
            limiter.check_at("ana", start),
            Err(Error::TooManyRequests { retry_after: 1, .. })
        ));
        limiter.check_at("bob", start).unwrap();
        let later = start + Duration::from_millis(400);
        limiter.check_at("ana", later).unwrap();
        limiter.check_at("ana", later).unwrap();
        assert!(limiter.check_at("ana", later).is_err());
        assert!(RateLimiter::new(0).check("x").is_ok());
    }
}
