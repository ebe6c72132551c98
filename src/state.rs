//! What the running process knows: its pools, listeners, health checks and
//! configuration, shared by the admin API, the signal handler and reloads.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;

use crate::config::Config;
use crate::health::HealthChecks;
use crate::metrics::Metrics;
use crate::pool::Pool;
use crate::pool::roles::RoleBook;
use crate::traffic::Traffic;

/// The process's shared state.
pub struct State {
    /// Every metric.
    pub metrics: Arc<Metrics>,
    /// The listeners.
    pub traffic: Arc<Traffic>,
    /// The health-check loops.
    pub health: Arc<HealthChecks>,
    pub(crate) pools: ArcSwap<Vec<Arc<Pool>>>,
    /// The role view every pool shares.
    pub(crate) roles: Arc<RoleBook>,
    /// The configuration in force; its lock also keeps reloads one at a time.
    pub(crate) config: Mutex<Config>,
    pub(crate) path: PathBuf,
    draining: AtomicBool,
    /// The reload thread, once started.
    reloader: std::sync::OnceLock<crate::reload::Reloader>,
}

impl State {
    /// State for `config`, read from `path`.
    pub fn new(
        path: PathBuf,
        config: Config,
        metrics: Arc<Metrics>,
        pools: Vec<Arc<Pool>>,
        roles: Arc<RoleBook>,
        traffic: Arc<Traffic>,
        health: Arc<HealthChecks>,
    ) -> Arc<State> {
        Arc::new(State {
            metrics,
            traffic,
            health,
            pools: ArcSwap::from_pointee(pools),
            roles,
            config: Mutex::new(config),
            path,
            draining: AtomicBool::new(false),
            reloader: std::sync::OnceLock::new(),
        })
    }

    /// Start the thread that runs reloads.
    pub fn start_reloader(self: &Arc<Self>) -> std::io::Result<()> {
        let reloader = crate::reload::Reloader::start(self)?;
        let _ = self.reloader.set(reloader);
        Ok(())
    }

    /// Ask for a reload off the calling thread; the receiver gets its outcome.
    pub fn request_reload(&self) -> tokio::sync::oneshot::Receiver<crate::reload::Outcome> {
        match self.reloader.get() {
            Some(r) => r.request(),
            None => {
                let (tx, rx) = tokio::sync::oneshot::channel();
                let _ = tx.send(Err(crate::reload::ReloadError::Unavailable));
                rx
            }
        }
    }

    /// The current pools, in configuration order.
    pub fn pools(&self) -> Arc<Vec<Arc<Pool>>> {
        self.pools.load_full()
    }

    /// A shutdown or upgrade began: not ready any more, and no reloads.
    pub fn begin_drain(&self) {
        self.draining.store(true, Relaxed);
    }

    /// Whether a shutdown or upgrade began.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Relaxed)
    }

    /// `Ok` when sluice should receive traffic: every listener bound and
    /// every pool past its first health-check round, and no shutdown begun.
    pub fn readiness(&self) -> Result<(), String> {
        if self.is_draining() {
            return Err("shutting down".to_string());
        }
        let waiting = self.pools().iter().filter(|p| !p.is_ready()).count();
        if waiting > 0 {
            return Err(format!(
                "{waiting} pool(s) still running their first health-check round"
            ));
        }
        if !self.traffic.is_started() {
            return Err("listeners not bound yet".to_string());
        }
        Ok(())
    }
}
