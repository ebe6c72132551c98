//! Active health checks: a background service probing every backend.
//!
//! Each pool runs rounds every `interval`. A round checks all backends in
//! parallel; each check (name resolution included) is bounded by `timeout`,
//! and its result is applied as soon as it arrives. A backend's first result
//! decides its state (nothing is trusted before it); after that it takes
//! `fall` consecutive failures to go down and `rise` consecutive successes to
//! come back. Names are resolved on every round, so a backend whose name does
//! not resolve yet is simply down.
//!
//! The service reports ready to pingora once every pool has finished its first
//! round; listeners depend on it, so they bind only then.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use log::{info, warn};
use pingora::server::ShutdownWatch;
use pingora::services::ServiceReadyNotifier;
use pingora::services::background::BackgroundService;
use pingora_load_balancing::Backend;
use pingora_load_balancing::health_check::{HealthCheck, TcpHealthCheck};
use tokio::sync::mpsc;

use crate::lifecycle::Readiness;
use crate::pool::{BackendState, Health, Pool};

/// Consecutive-result tracking for one backend.
#[derive(Clone, Debug)]
pub struct Tracker {
    state: Health,
    successes: u32,
    failures: u32,
}

impl Default for Tracker {
    fn default() -> Self {
        Tracker {
            state: Health::Unknown,
            successes: 0,
            failures: 0,
        }
    }
}

impl Tracker {
    /// Record one check result; returns the new state when it changed.
    pub fn observe(&mut self, ok: bool, rise: u32, fall: u32) -> Option<Health> {
        if ok {
            self.successes = self.successes.saturating_add(1);
            self.failures = 0;
        } else {
            self.failures = self.failures.saturating_add(1);
            self.successes = 0;
        }
        let next = match self.state {
            Health::Unknown if ok => Health::Up,
            Health::Unknown => Health::Down,
            Health::Up if !ok && self.failures >= fall => Health::Down,
            Health::Down if ok && self.successes >= rise => Health::Up,
            same => same,
        };
        (next != self.state).then(|| {
            self.state = next;
            next
        })
    }

    /// Consecutive results that agree with the last one.
    pub fn streak(&self) -> u32 {
        self.successes.max(self.failures)
    }
}

/// Why one check failed.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    /// The name did not resolve.
    #[error("cannot resolve {host}: {reason}")]
    Resolve {
        /// The host name.
        host: String,
        /// The resolver's answer.
        reason: String,
    },
    /// The probe failed.
    #[error("{0}")]
    Probe(String),
    /// No answer in time.
    #[error("no answer within {}", humantime::format_duration(*.0))]
    Timeout(Duration),
}

/// The background service that runs every pool's checks.
pub struct HealthService {
    pools: Vec<Arc<Pool>>,
    readiness: Arc<Readiness>,
}

impl HealthService {
    /// Check `pools`, reporting progress to `readiness`.
    pub fn new(pools: Vec<Arc<Pool>>, readiness: Arc<Readiness>) -> Self {
        HealthService { pools, readiness }
    }
}

#[async_trait]
impl BackgroundService for HealthService {
    async fn start_with_ready_notifier(
        &self,
        mut shutdown: ShutdownWatch,
        ready: ServiceReadyNotifier,
    ) {
        let (first_round_tx, mut first_round_rx) = mpsc::channel(self.pools.len().max(1));
        let mut tasks = tokio::task::JoinSet::new();
        for pool in &self.pools {
            tasks.spawn(run_pool(Arc::clone(pool), first_round_tx.clone()));
        }
        drop(first_round_tx);
        let mut pending = self.pools.len();
        let mut ready = Some(ready);
        loop {
            tokio::select! {
                done = first_round_rx.recv(), if pending > 0 => {
                    if done.is_some() {
                        pending -= 1;
                        self.readiness.pool_ready();
                    }
                    if pending == 0 {
                        info!("first health-check round done for every pool; opening listeners");
                        if let Some(r) = ready.take() {
                            r.notify_ready();
                        }
                    }
                }
                changed = shutdown.changed() => {
                    if changed.is_err() || *shutdown.borrow() {
                        break;
                    }
                }
            }
        }
        tasks.abort_all();
    }
}

/// Check `pool` forever; send on `first_round` after the first round.
async fn run_pool(pool: Arc<Pool>, first_round: mpsc::Sender<()>) {
    let settings = pool.health_check.clone();
    let mut probe = TcpHealthCheck::new();
    probe.peer_template.options.connection_timeout = Some(settings.timeout);
    let probe: Arc<dyn HealthCheck + Send + Sync> =
        Arc::from(probe as Box<dyn HealthCheck + Send + Sync>);
    let mut trackers = vec![Tracker::default(); pool.backends.len()];
    let mut ticker = tokio::time::interval(settings.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut first = true;
    loop {
        ticker.tick().await;
        let mut checks: FuturesUnordered<_> = pool
            .backends
            .iter()
            .map(|b| {
                let probe = Arc::clone(&probe);
                let b = Arc::clone(b);
                async move {
                    let result = check(&b, probe.as_ref(), settings.timeout).await;
                    (b, result)
                }
            })
            .collect();
        while let Some((b, result)) = checks.next().await {
            apply(&pool, &b, &mut trackers[b.index], result);
        }
        if first {
            first = false;
            pool.mark_ready();
            // The receiver only goes away at shutdown.
            let _ = first_round.send(()).await;
        }
    }
}

/// Run one check of `b`, name resolution included, within `timeout`.
async fn check(
    b: &BackendState,
    probe: &(dyn HealthCheck + Send + Sync),
    timeout: Duration,
) -> Result<SocketAddr, CheckError> {
    let attempt = async {
        let addr = resolve(b).await?;
        let target = Backend {
            addr: pingora::protocols::l4::socket::SocketAddr::Inet(addr),
            weight: 1,
            ext: Default::default(),
        };
        probe.check(&target).await.map_err(|e| match e.etype() {
            // The probe's own connect timeout equals ours; report both alike.
            pingora::ErrorType::ConnectTimedout => CheckError::Timeout(timeout),
            _ => CheckError::Probe(describe(&e)),
        })?;
        Ok(addr)
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(r) => r,
        Err(_) => Err(CheckError::Timeout(timeout)),
    }
}

/// A short reason from a pingora connect error, for log lines.
fn describe(e: &pingora::Error) -> String {
    use pingora::ErrorType::*;
    match e.etype() {
        ConnectRefused => "connection refused".to_string(),
        ConnectNoRoute => "no route to host".to_string(),
        _ => e.to_string(),
    }
}

async fn resolve(b: &BackendState) -> Result<SocketAddr, CheckError> {
    if let Some(addr) = b.address.socket_addr() {
        return Ok(addr);
    }
    let host = b.address.host();
    let fail = |reason: String| CheckError::Resolve {
        host: host.to_string(),
        reason,
    };
    let mut addrs = tokio::net::lookup_host((host, b.address.port()))
        .await
        .map_err(|e| fail(e.to_string()))?;
    addrs.next().ok_or_else(|| fail("no addresses".to_string()))
}

fn apply(
    pool: &Pool,
    b: &BackendState,
    tracker: &mut Tracker,
    result: Result<SocketAddr, CheckError>,
) {
    let (ok, resolved) = match &result {
        Ok(addr) => (true, Some(*addr)),
        Err(_) => (false, None),
    };
    if ok {
        b.metrics.checks_success.inc();
    } else {
        b.metrics.checks_failure.inc();
    }
    let was = b.health();
    let hc = &pool.health_check;
    let changed = tracker.observe(ok, hc.rise, hc.fall);
    if let Some(now) = changed {
        match (was, now, &result) {
            (Health::Unknown, Health::Up, _) => {
                info!("pool {}: backend {} is up", pool.name, b.address)
            }
            (Health::Unknown, _, Err(e)) => {
                warn!("pool {}: backend {} is down: {e}", pool.name, b.address)
            }
            (_, Health::Up, _) => {
                b.metrics.to_up.inc();
                info!(
                    "pool {}: backend {} is UP after {} successful checks",
                    pool.name,
                    b.address,
                    tracker.streak()
                );
            }
            (_, _, Err(e)) => {
                b.metrics.to_down.inc();
                warn!(
                    "pool {}: backend {} is DOWN after {} failed checks: {e}",
                    pool.name,
                    b.address,
                    tracker.streak()
                );
            }
            _ => {}
        }
    } else if let Err(e) = &result {
        if b.health() == Health::Up {
            log::debug!(
                "pool {}: check of {} failed ({e}); still up",
                pool.name,
                b.address
            );
        }
    }
    pool.update_backend(b.index, changed, resolved);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_result_decides_then_thresholds_apply() {
        let mut t = Tracker::default();
        assert_eq!(t.observe(true, 2, 3), Some(Health::Up));
        assert_eq!(t.observe(false, 2, 3), None);
        assert_eq!(t.observe(false, 2, 3), None);
        assert_eq!(
            t.observe(true, 2, 3),
            None,
            "a success resets the failure streak"
        );
        assert_eq!(t.observe(false, 2, 3), None);
        assert_eq!(t.observe(false, 2, 3), None);
        assert_eq!(t.observe(false, 2, 3), Some(Health::Down));
        assert_eq!(t.observe(true, 2, 3), None);
        assert_eq!(t.observe(false, 2, 3), None);
        assert_eq!(t.observe(true, 2, 3), None);
        assert_eq!(t.observe(true, 2, 3), Some(Health::Up));

        let mut t = Tracker::default();
        assert_eq!(t.observe(false, 1, 1), Some(Health::Down));
        assert_eq!(t.observe(true, 1, 1), Some(Health::Up));
    }
}
