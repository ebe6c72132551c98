//! Active health checks: a background service probing every backend.
//!
//! Each pool runs rounds every `interval`. A round checks all current
//! members in parallel; each check (name resolution included) is bounded by
//! `timeout`, and its result goes to the pool as soon as it arrives (the pool
//! applies rise/fall, see [`crate::pool::core`]). `tcp` checks connect as
//! the data path does (not with pingora's `TcpHealthCheck`: each one builds
//! a TLS connector, reading every system CA certificate); the other kinds
//! speak their protocol ([`crate::check`]) and may report the backend's
//! role. Names are resolved on every round, so a backend whose name does
//! not resolve yet is simply down.
//! A check that fails for lack of local resources (out of file descriptors)
//! says nothing about the backend and is not counted.
//!
//! Pools come and go with reloads ([`HealthChecks::start`], [`HealthChecks::stop`]);
//! a pool's loop reads its current settings every round, so a changed
//! interval or member list applies without restarting it. The service reports
//! ready to pingora once every pool of the initial configuration has finished
//! its first round; the traffic service depends on it, so listeners open only
//! then.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use log::info;
use pingora::server::ShutdownWatch;
use pingora::services::ServiceReadyNotifier;
use pingora::services::background::BackgroundService;
use tokio::runtime::Handle;
use tokio::task::JoinHandle;

use crate::check::{self, Role};
use crate::config::edge::ProxyVersion;
use crate::config::{BackendTls, CheckKind};
use crate::listener::LogLimiter;
use crate::pool::{Backend, Pool};
use crate::sys::lock;

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
    /// No (complete) answer in time.
    #[error("{kind} check: no answer within {}", humantime::format_duration(*.limit))]
    Timeout {
        /// The check kind.
        kind: &'static str,
        /// The check timeout.
        limit: Duration,
    },
    /// This process ran out of something (file descriptors): no verdict.
    #[error("local resources exhausted: {0}")]
    Local(String),
}

/// The running health-check loops, one per pool.
pub struct HealthChecks {
    inner: Mutex<Loops>,
    local_errors: LogLimiter,
}

#[derive(Default)]
struct Loops {
    /// The runtime, once the service runs.
    handle: Option<Handle>,
    /// Per pool, the pool and the task that supervises its loop.
    running: HashMap<String, (Arc<Pool>, JoinHandle<()>)>,
    /// Pools to start when the service starts (the initial configuration,
    /// changed by any reload that came first).
    pending: Vec<Arc<Pool>>,
}

/// The pingora background service that hosts the loops.
pub struct HealthService(pub Arc<HealthChecks>);

/// Aborts a task when dropped, so that stopping a supervisor stops its loop.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Pause before a loop that died is started again.
const RESTART_DELAY: Duration = Duration::from_secs(1);

impl HealthChecks {
    /// Checks for `pools`, started when the service starts.
    pub fn new(pools: Vec<Arc<Pool>>) -> Arc<Self> {
        Arc::new(HealthChecks {
            inner: Mutex::new(Loops {
                pending: pools,
                ..Loops::default()
            }),
            local_errors: LogLimiter::new(),
        })
    }

    /// Start checking `pool` (replacing a loop of the same name).
    pub fn start(self: &Arc<Self>, pool: Arc<Pool>) {
        let mut loops = lock(&self.inner);
        let Some(handle) = loops.handle.clone() else {
            loops.pending.retain(|p| p.name != pool.name);
            loops.pending.push(pool);
            return;
        };
        let task = handle.spawn(Arc::clone(self).supervise(Arc::clone(&pool)));
        if let Some((_, old)) = loops.running.insert(pool.name.clone(), (pool, task)) {
            old.abort();
        }
    }

    /// Stop checking `pool`, which left the configuration, once every pool
    /// in `successors` has finished its first round (listeners that move
    /// from it to them use it until then); then retire it.
    pub fn stop_after(self: &Arc<Self>, pool: Arc<Pool>, successors: Vec<Arc<Pool>>) {
        let Some(handle) = lock(&self.inner).handle.clone() else {
            self.stop(&pool.name);
            pool.retire();
            return;
        };
        let checks = Arc::clone(self);
        handle.spawn(async move {
            futures::future::join_all(successors.iter().map(|p| p.wait_ready())).await;
            let mut loops = lock(&checks.inner);
            // Unless a later reload brought a pool of that name back.
            if loops
                .running
                .get(&pool.name)
                .is_some_and(|(p, _)| Arc::ptr_eq(p, &pool))
            {
                if let Some((_, task)) = loops.running.remove(&pool.name) {
                    task.abort();
                }
            }
            drop(loops);
            pool.retire();
        });
    }

    /// Stop checking the pool `name`.
    pub fn stop(&self, name: &str) {
        let mut loops = lock(&self.inner);
        loops.pending.retain(|p| p.name != name);
        if let Some((_, task)) = loops.running.remove(name) {
            task.abort();
        }
    }

    /// Keep `pool`'s loop running: a loop that dies (a bug) is logged and
    /// started again, never left silently stopped with its backends frozen
    /// in their last state.
    async fn supervise(self: Arc<Self>, pool: Arc<Pool>) {
        loop {
            let mut task = AbortOnDrop(tokio::spawn(Arc::clone(&self).run_pool(Arc::clone(&pool))));
            let outcome = (&mut task.0).await;
            match outcome {
                Err(e) if e.is_panic() => {
                    let panic = e.into_panic();
                    let what = panic
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| panic.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "unknown cause".to_string());
                    log::error!(
                        "pool {}: the health-check loop failed ({what}); restarting it in {}",
                        pool.name,
                        humantime::format_duration(RESTART_DELAY)
                    );
                }
                _ => log::error!(
                    "pool {}: the health-check loop stopped; restarting it in {}",
                    pool.name,
                    humantime::format_duration(RESTART_DELAY)
                ),
            }
            tokio::time::sleep(RESTART_DELAY).await;
        }
    }

    /// Check `pool` forever.
    async fn run_pool(self: Arc<Self>, pool: Arc<Pool>) {
        let mut interval = pool.generation().settings.health_check.interval;
        let mut ticker = ticker(interval, tokio::time::Instant::now());
        loop {
            ticker.tick().await;
            let generation = pool.generation();
            let hc = generation.settings.health_check.clone();
            if hc.interval != interval {
                interval = hc.interval;
                ticker = ticker_after(interval);
            }
            let mut checks: FuturesUnordered<_> = generation
                .members
                .iter()
                .map(|m| {
                    let kind = &hc.kind;
                    let tls = generation.settings.tls.as_ref();
                    let proxy = generation.settings.proxy_protocol;
                    async move {
                        let result = check(&m.backend, kind, tls, hc.timeout, proxy).await;
                        (&m.backend, result)
                    }
                })
                .collect();
            while let Some((backend, result)) = checks.next().await {
                match result {
                    Err(CheckError::Local(e)) => {
                        if let Some(skipped) = self.local_errors.allow() {
                            log::warn!(
                                "pool {}: cannot check {}: {e}; not counted ({skipped} more since the last line)",
                                pool.name,
                                backend.address
                            );
                        }
                    }
                    result => pool.observe_check(backend, result.map_err(|e| e.to_string())),
                }
            }
            // Also the pool's clock: hold times are checked once a round.
            pool.round_done();
        }
    }
}

fn ticker(period: Duration, start: tokio::time::Instant) -> tokio::time::Interval {
    let mut t = tokio::time::interval_at(start, period);
    t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    t
}

fn ticker_after(period: Duration) -> tokio::time::Interval {
    let now = tokio::time::Instant::now();
    // A period too long to add means "not for a very long time".
    let start = now
        .checked_add(period)
        .unwrap_or_else(|| now + Duration::from_secs(86_400 * 365 * 30));
    ticker(period, start)
}

#[async_trait]
impl BackgroundService for HealthService {
    async fn start_with_ready_notifier(
        &self,
        mut shutdown: ShutdownWatch,
        ready: ServiceReadyNotifier,
    ) {
        let checks = &self.0;
        let initial = {
            let mut loops = lock(&checks.inner);
            loops.handle = Some(Handle::current());
            std::mem::take(&mut loops.pending)
        };
        for pool in &initial {
            checks.start(Arc::clone(pool));
        }
        // A pool a reload removes meanwhile is retired: it counts as ready.
        let first_rounds = futures::future::join_all(initial.iter().map(|p| p.wait_ready()));
        tokio::select! {
            _ = first_rounds => {
                info!("first health-check round done for every pool; opening listeners");
                ready.notify_ready();
            }
            _ = shutdown.changed() => {}
        }
        while !*shutdown.borrow() {
            if shutdown.changed().await.is_err() {
                break;
            }
        }
        for (_, (_, task)) in lock(&checks.inner).running.drain() {
            task.abort();
        }
    }
}

/// Run one check of `b`, name resolution included, within `timeout`: the
/// address it resolved to and the role it reported.
async fn check(
    b: &Backend,
    kind: &CheckKind,
    tls: Option<&BackendTls>,
    timeout: Duration,
    proxy: Option<ProxyVersion>,
) -> Result<(SocketAddr, Option<Role>), CheckError> {
    let attempt = async {
        let addr = resolve(b).await?;
        // Backends that expect a PROXY header get one on checks too: v2
        // LOCAL or v1 UNKNOWN, so they neither log a broken header nor count
        // the check as a client.
        if *kind != CheckKind::Tcp || proxy.is_some() {
            // A TLS pool's protocol checks run inside TLS, as its clients' traffic does.
            let dial = match tls {
                None => None,
                Some(t) => Some(check::TlsDial {
                    config: Arc::clone(&t.config),
                    name: t.server_name(b.address.host()).ok_or_else(|| {
                        CheckError::Probe(format!(
                            "`{}` is not a TLS server name; set the pool's tls.sni",
                            b.address.host()
                        ))
                    })?,
                }),
            };
            let mut budget = check::Budget::new(check::READ_BUDGET);
            if let Some(version) = proxy {
                budget = budget.with_preamble(crate::edge::proxy::check_header(version));
            }
            let host = b.address.host();
            return match check::probe_over(kind, addr, host, dial.as_ref(), &budget).await {
                Ok(role) => Ok((addr, role)),
                Err(e) if e.is_local() => Err(CheckError::Local(e.to_string())),
                Err(e) => Err(CheckError::Probe(format!("{} check: {e}", kind.name()))),
            };
        }
        // A plain TCP connect, said as briefly as the log line wants.
        let budget = check::Budget::new(check::READ_BUDGET);
        match check::probe_over(kind, addr, b.address.host(), None, &budget).await {
            Ok(_) => Ok((addr, None)),
            Err(check::ProbeError::Local(e)) => Err(CheckError::Local(e.to_string())),
            Err(check::ProbeError::Connect(e)) => Err(CheckError::Probe(match e.kind() {
                std::io::ErrorKind::ConnectionRefused => {
                    "tcp check: connection refused".to_string()
                }
                std::io::ErrorKind::HostUnreachable | std::io::ErrorKind::NetworkUnreachable => {
                    "tcp check: no route to host".to_string()
                }
                _ => format!("tcp check: {e}"),
            })),
            Err(e) => Err(CheckError::Probe(format!("tcp check: {e}"))),
        }
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(r) => r,
        Err(_) => Err(CheckError::Timeout {
            kind: kind.name(),
            limit: timeout,
        }),
    }
}

async fn resolve(b: &Backend) -> Result<SocketAddr, CheckError> {
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
