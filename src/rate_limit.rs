//! A per-key rate limit (`RATE_LIMIT_ORDERS_PER_MINUTE`): order creation per user and per
//! client address, against scalpers and runaway clients (OWASP API4 and API6).
//!
//! Each key has a token bucket holding at most a minute's worth of requests and refilled
//! continuously at the per-minute rate, so a client may burst up to the limit and then goes at
//! the rate. A request that names several keys (its user and its address) goes through only if
//! every key has a token, and then takes one from each: refusing on one key never spends
//! another's. The state is in memory, per replica: N replicas allow up to N times the limit,
//! which the README says. Buckets that have refilled completely carry no information and are
//! dropped, so the map holds only the keys seen within the last minute or so.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::Mutex,
    time::{Duration, Instant},
};

/// What a bucket is kept for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Key {
    User(i32),
    Address(IpAddr),
}

/// Entries examined for dropping when the map has grown past this since the last sweep.
const SWEEP_AFTER: usize = 4_096;

pub struct RateLimiter {
    per_minute: u32,
    buckets: Mutex<Buckets>,
}

#[derive(Default)]
struct Buckets {
    by_key: HashMap<Key, Bucket>,
    /// Map size after the last sweep; the next one runs when the map is `SWEEP_AFTER` larger.
    swept_at_len: usize,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    updated: Instant,
}

impl RateLimiter {
    /// `per_minute` requests per key and minute; `None` for 0 (no limit).
    pub fn new(per_minute: u32) -> Option<RateLimiter> {
        (per_minute > 0).then(|| RateLimiter { per_minute, buckets: Mutex::new(Buckets::default()) })
    }

    fn capacity(&self) -> f64 {
        f64::from(self.per_minute)
    }

    fn refill_per_second(&self) -> f64 {
        self.capacity() / 60.0
    }

    /// Takes a token from each key's bucket, or none and says how long until every one has one.
    pub fn take(&self, keys: &[Key], now: Instant) -> Result<(), Duration> {
        let mut buckets = crate::sync::lock(&self.buckets);
        let refilled: Vec<Bucket> = keys
            .iter()
            .map(|key| {
                let bucket =
                    buckets.by_key.get(key).copied().unwrap_or(Bucket { tokens: self.capacity(), updated: now });
                let elapsed = now.saturating_duration_since(bucket.updated).as_secs_f64();
                Bucket {
                    tokens: (bucket.tokens + elapsed * self.refill_per_second()).min(self.capacity()),
                    updated: now,
                }
            })
            .collect();
        let wait = refilled
            .iter()
            .filter(|bucket| bucket.tokens < 1.0)
            .map(|bucket| Duration::from_secs_f64((1.0 - bucket.tokens) / self.refill_per_second()))
            .max();
        if let Some(wait) = wait {
            return Err(wait);
        }
        for (key, bucket) in keys.iter().zip(refilled) {
            buckets.by_key.insert(*key, Bucket { tokens: bucket.tokens - 1.0, ..bucket });
        }
        if buckets.by_key.len() >= buckets.swept_at_len + SWEEP_AFTER {
            let full_after = Duration::from_secs_f64(60.0);
            buckets.by_key.retain(|_, bucket| now.saturating_duration_since(bucket.updated) < full_after);
            buckets.swept_at_len = buckets.by_key.len();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_gets_its_burst_then_the_rate() {
        let limiter = RateLimiter::new(6).unwrap();
        let start = Instant::now();
        let user = [Key::User(1)];
        for _ in 0..6 {
            assert!(limiter.take(&user, start).is_ok());
        }
        let wait = limiter.take(&user, start).unwrap_err();
        assert!((9.9..=10.1).contains(&wait.as_secs_f64()), "{wait:?}");
        // 6 a minute: one more token every 10 s.
        assert!(limiter.take(&user, start + Duration::from_secs(10)).is_ok());
        assert!(limiter.take(&user, start + Duration::from_secs(11)).is_err());
        // Another key is not affected.
        assert!(limiter.take(&[Key::User(2)], start).is_ok());
    }

    #[test]
    fn a_refusal_on_one_key_spends_no_other_key() {
        let limiter = RateLimiter::new(2).unwrap();
        let now = Instant::now();
        let address = Key::Address([127, 0, 0, 1].into());
        assert!(limiter.take(&[Key::User(1), address], now).is_ok());
        assert!(limiter.take(&[Key::User(1), address], now).is_ok());
        // User 2 from the same address: the address is spent, so user 2's bucket stays full.
        assert!(limiter.take(&[Key::User(2), address], now).is_err());
        assert!(limiter.take(&[Key::User(2)], now).is_ok());
        assert!(limiter.take(&[Key::User(2)], now).is_ok());
    }

    #[test]
    fn zero_means_no_limit() {
        assert!(RateLimiter::new(0).is_none());
    }
}
