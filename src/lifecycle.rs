//! Readiness, signals and draining: the process's life from start to exit.
//!
//! - [`Readiness`] answers `/readyz`: ready once every listener is bound and
//!   every pool has finished its first health-check round; not ready again
//!   from the moment a shutdown begins.
//! - [`Signals`] replaces pingora's signal watcher. SIGTERM makes sluice
//!   unready at once but keeps listeners open for `grace_period` (so a load
//!   balancer in front can stop sending), then closes them; SIGINT exits at
//!   once; SIGQUIT hands listeners to a new process (`sluice -u`); SIGHUP is
//!   logged and ignored until reload exists.
//! - [`DrainService`] exits the process as soon as the last open connection
//!   finishes after listeners closed, or when `shutdown_timeout` runs out.
//!   pingora's own grace sleep is only a backstop behind it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::time::Duration;

use async_trait::async_trait;
use log::{info, warn};
use pingora::server::{ShutdownSignal, ShutdownSignalWatch, ShutdownWatch};
use pingora::services::background::BackgroundService;
use prometheus::IntGauge;
use tokio::signal::unix::{SignalKind, signal};

/// Whether sluice should receive traffic.
pub struct Readiness {
    pools_pending: AtomicUsize,
    listeners_pending: AtomicUsize,
    draining: AtomicBool,
}

impl Readiness {
    /// Ready once `pools` first rounds and `listeners` binds are reported.
    pub fn new(pools: usize, listeners: usize) -> Self {
        Readiness {
            pools_pending: AtomicUsize::new(pools),
            listeners_pending: AtomicUsize::new(listeners),
            draining: AtomicBool::new(false),
        }
    }

    /// A pool finished its first health-check round.
    pub fn pool_ready(&self) {
        let _ = self
            .pools_pending
            .fetch_update(Relaxed, Relaxed, |n| n.checked_sub(1));
    }

    /// A listener is bound.
    pub fn listener_bound(&self) {
        let _ = self
            .listeners_pending
            .fetch_update(Relaxed, Relaxed, |n| n.checked_sub(1));
    }

    /// A shutdown or upgrade began.
    pub fn begin_drain(&self) {
        self.draining.store(true, Relaxed);
    }

    /// `Ok` when ready, else why not.
    pub fn check(&self) -> Result<(), String> {
        if self.draining.load(Relaxed) {
            return Err("shutting down".to_string());
        }
        let pools = self.pools_pending.load(Relaxed);
        if pools > 0 {
            return Err(format!(
                "{pools} pool(s) still running their first health-check round"
            ));
        }
        let listeners = self.listeners_pending.load(Relaxed);
        if listeners > 0 {
            return Err(format!("{listeners} listener(s) not bound yet"));
        }
        Ok(())
    }
}

/// sluice's signal handling, given to pingora's main loop.
pub struct Signals {
    readiness: Arc<Readiness>,
    grace_period: Duration,
    shutdown_timeout: Duration,
}

impl Signals {
    /// Handle signals with the configured drain times.
    pub fn new(
        readiness: Arc<Readiness>,
        grace_period: Duration,
        shutdown_timeout: Duration,
    ) -> Self {
        Signals {
            readiness,
            grace_period,
            shutdown_timeout,
        }
    }
}

#[async_trait]
impl ShutdownSignalWatch for Signals {
    async fn recv(&self) -> ShutdownSignal {
        let listen =
            |kind: SignalKind| signal(kind).expect("installing a signal handler on Unix succeeds");
        let mut term = listen(SignalKind::terminate());
        let mut int = listen(SignalKind::interrupt());
        let mut quit = listen(SignalKind::quit());
        let mut hup = listen(SignalKind::hangup());
        loop {
            tokio::select! {
                _ = hup.recv() => {
                    warn!("SIGHUP received: configuration reload is not supported yet; still running the loaded configuration");
                }
                _ = int.recv() => {
                    info!("SIGINT received: exiting now");
                    return ShutdownSignal::FastShutdown;
                }
                _ = quit.recv() => {
                    self.readiness.begin_drain();
                    info!("SIGQUIT received: handing listeners to the new process");
                    return ShutdownSignal::GracefulUpgrade;
                }
                _ = term.recv() => {
                    self.readiness.begin_drain();
                    info!(
                        "SIGTERM received: not ready any more; listeners close in {}",
                        humantime::format_duration(self.grace_period)
                    );
                    tokio::select! {
                        _ = tokio::time::sleep(self.grace_period) => {}
                        _ = int.recv() => {
                            info!("SIGINT received: exiting now");
                            return ShutdownSignal::FastShutdown;
                        }
                    }
                    info!(
                        "closing listeners; open connections have {} to finish",
                        humantime::format_duration(self.shutdown_timeout)
                    );
                    return ShutdownSignal::GracefulTerminate;
                }
            }
        }
    }
}

/// Ends the process once connections have drained after listeners closed.
pub struct DrainService {
    open: Vec<IntGauge>,
    timeout: Duration,
}

impl DrainService {
    /// Watch the `open` connection gauges; give them `timeout` at most.
    pub fn new(open: Vec<IntGauge>, timeout: Duration) -> Self {
        DrainService { open, timeout }
    }

    fn open_connections(&self) -> i64 {
        self.open.iter().map(IntGauge::get).sum()
    }
}

/// How often the drain checks for the last connection.
const DRAIN_POLL: Duration = Duration::from_millis(25);

#[async_trait]
impl BackgroundService for DrainService {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        while !*shutdown.borrow() {
            if shutdown.changed().await.is_err() {
                return;
            }
        }
        let deadline = tokio::time::Instant::now() + self.timeout;
        let mut open = self.open_connections();
        if open > 0 {
            info!("waiting for {open} open connection(s) to finish");
        }
        while open > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(DRAIN_POLL).await;
            open = self.open_connections();
        }
        if open > 0 {
            warn!(
                "shutdown timeout ({}) reached: closing {open} open connection(s)",
                humantime::format_duration(self.timeout)
            );
        } else {
            info!("all connections finished; exiting");
        }
        std::process::exit(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_needs_pools_and_listeners_and_ends_with_drain() {
        let r = Readiness::new(2, 1);
        assert!(r.check().unwrap_err().contains("2 pool(s)"));
        r.pool_ready();
        r.pool_ready();
        assert!(r.check().unwrap_err().contains("1 listener(s)"));
        r.listener_bound();
        assert_eq!(r.check(), Ok(()));
        r.begin_drain();
        assert_eq!(r.check(), Err("shutting down".to_string()));
    }
}
