//! Limits per client address: connections open at once, and new
//! connections per second as a token bucket (`rate` tokens a second, at
//! most `burst` saved up).
//!
//! The state is exact, kept in 64 shards keyed by a hash of the address so
//! that clients from different addresses rarely contend. Memory stays
//! bounded under a flood from many addresses: a source appears in the
//! concurrency table only while it has a connection open (so at most one
//! entry per open connection), and a rate bucket is dropped once it has
//! refilled (a full bucket is the same as no bucket). A shard that still
//! grows past [`SHARD_BUCKETS`] after dropping its full buckets forgets its
//! oldest half: a flood from more addresses than that costs the limits some
//! precision (those sources start afresh), never unbounded memory.
//!
//! Pingora's `pingora-limits` was the first candidate. Its `Inflight` and
//! `Rate` are count-min estimators of fixed size, built for Cloudflare's
//! scale; they over-count when keys collide, so under exactly the flood these
//! limits are for they would refuse innocent clients that share a slot with
//! attackers, and `Rate` counts per window rather than giving a burst. An
//! exact table refuses only the address that is over its limit, and its
//! memory is bounded as above.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::config::edge::PerSource;
use crate::sys::lock;

/// Shards of the tables.
const SHARDS: usize = 64;
/// Rate buckets one shard keeps before it forgets the oldest half.
pub const SHARD_BUCKETS: usize = 4_096;

/// Why a client was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    /// Its address has `max_connections` open already.
    Limit,
    /// Its address opened connections faster than `rate` allows.
    Rate,
}

#[derive(Clone, Copy, Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

#[derive(Default)]
struct Shard {
    open: HashMap<IpAddr, u32>,
    buckets: HashMap<IpAddr, Bucket>,
    /// Bucket count after the last sweep: sweep again once it doubles.
    swept_at: usize,
}

/// One listener's per-source state; it outlives reloads, so connections
/// open before a reload still count after it.
pub struct SourceLimiter {
    shards: Box<[Mutex<Shard>]>,
    hasher: std::collections::hash_map::RandomState,
}

/// A client's place in its address's count of open connections.
pub struct SourceSlot {
    limiter: Arc<SourceLimiter>,
    ip: IpAddr,
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        let mut shard = lock(self.limiter.shard(self.ip));
        if let Some(n) = shard.open.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                shard.open.remove(&self.ip);
            }
        }
    }
}

impl SourceLimiter {
    /// Empty tables.
    pub fn new() -> Arc<SourceLimiter> {
        Arc::new(SourceLimiter {
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
            hasher: std::collections::hash_map::RandomState::new(),
        })
    }

    fn shard(&self, ip: IpAddr) -> &Mutex<Shard> {
        &self.shards[(self.hasher.hash_one(ip) as usize) % SHARDS]
    }

    /// Admit one new connection from `ip` under `rules` at `now`: a slot
    /// that counts it while it lives (when `max_connections` is set), or
    /// why not.
    pub fn admit(
        self: &Arc<Self>,
        ip: IpAddr,
        rules: &PerSource,
        now: Instant,
    ) -> Result<Option<SourceSlot>, Refused> {
        let ip = ip.to_canonical();
        let mut shard = lock(self.shard(ip));
        if let Some(max) = rules.max_connections {
            if shard.open.get(&ip).copied().unwrap_or(0) >= max {
                return Err(Refused::Limit);
            }
        }
        if let Some(rate) = rules.rate {
            let burst = f64::from(rules.burst);
            let bucket = shard.buckets.entry(ip).or_insert(Bucket {
                tokens: burst,
                at: now,
            });
            let refill = now.saturating_duration_since(bucket.at).as_secs_f64() * rate;
            bucket.tokens = (bucket.tokens + refill).min(burst);
            bucket.at = now;
            if bucket.tokens < 1.0 {
                return Err(Refused::Rate);
            }
            bucket.tokens -= 1.0;
            if shard.buckets.len() > (2 * shard.swept_at).max(1024) {
                sweep(&mut shard, rate, burst, now);
            }
        }
        if rules.max_connections.is_none() {
            return Ok(None);
        }
        *shard.open.entry(ip).or_insert(0) += 1;
        Ok(Some(SourceSlot {
            limiter: Arc::clone(self),
            ip,
        }))
    }

    /// Addresses with state now (open connections or a rate bucket), for
    /// tests and the memory figures.
    pub fn tracked(&self) -> usize {
        self.shards
            .iter()
            .map(|s| {
                let s = lock(s);
                s.open.len() + s.buckets.len()
            })
            .sum()
    }
}

/// Drop the buckets that have refilled by `now`; past the cap, the oldest
/// half too.
fn sweep(shard: &mut Shard, rate: f64, burst: f64, now: Instant) {
    shard.buckets.retain(|_, b| {
        let refill = now.saturating_duration_since(b.at).as_secs_f64() * rate;
        b.tokens + refill < burst
    });
    if shard.buckets.len() > SHARD_BUCKETS {
        let mut ages: Vec<Instant> = shard.buckets.values().map(|b| b.at).collect();
        let mid = ages.len() / 2;
        let (_, cut, _) = ages.select_nth_unstable(mid);
        let cut = *cut;
        shard.buckets.retain(|_, b| b.at > cut);
    }
    shard.swept_at = shard.buckets.len();
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn concurrency_is_counted_per_address_while_connections_live() {
        let l = SourceLimiter::new();
        let rules = PerSource {
            max_connections: Some(2),
            rate: None,
            burst: 1,
        };
        let now = Instant::now();
        let a = l.admit(ip("10.0.0.1"), &rules, now).unwrap();
        let b = l.admit(ip("10.0.0.1"), &rules, now).unwrap();
        assert_eq!(
            l.admit(ip("10.0.0.1"), &rules, now).err(),
            Some(Refused::Limit)
        );
        assert!(
            l.admit(ip("10.0.0.2"), &rules, now).is_ok(),
            "other addresses are apart"
        );
        drop(a);
        let c = l.admit(ip("::ffff:10.0.0.1"), &rules, now).unwrap();
        assert_eq!(
            l.admit(ip("10.0.0.1"), &rules, now).err(),
            Some(Refused::Limit),
            "an IPv4-mapped address is the same client"
        );
        drop((b, c));
        assert_eq!(l.tracked(), 0, "nothing kept once they closed");
    }

    #[test]
    fn the_rate_is_a_token_bucket_with_a_burst() {
        let l = SourceLimiter::new();
        let rules = PerSource {
            max_connections: None,
            rate: Some(2.0),
            burst: 3,
        };
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(l.admit(ip("10.0.0.1"), &rules, t0).is_ok());
        }
        assert_eq!(
            l.admit(ip("10.0.0.1"), &rules, t0).err(),
            Some(Refused::Rate)
        );
        // Half a second at 2/s earns one token.
        let t1 = t0 + Duration::from_millis(500);
        assert!(l.admit(ip("10.0.0.1"), &rules, t1).is_ok());
        assert_eq!(
            l.admit(ip("10.0.0.1"), &rules, t1).err(),
            Some(Refused::Rate)
        );
        // Long idle: the bucket is full again, never more than the burst.
        let t2 = t1 + Duration::from_secs(60);
        for _ in 0..3 {
            assert!(l.admit(ip("10.0.0.1"), &rules, t2).is_ok());
        }
        assert!(l.admit(ip("10.0.0.1"), &rules, t2).is_err());
    }

    #[test]
    fn a_flood_from_many_addresses_keeps_memory_bounded() {
        let l = SourceLimiter::new();
        let rules = PerSource {
            max_connections: None,
            rate: Some(1.0),
            burst: 2,
        };
        let t0 = Instant::now();
        for i in 0..1_500_000u32 {
            let a = IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            let now = t0 + Duration::from_micros(u64::from(i));
            assert!(l.admit(a, &rules, now).is_ok());
        }
        assert!(
            l.tracked() <= SHARDS * SHARD_BUCKETS * 2,
            "{} tracked",
            l.tracked()
        );
    }
}
