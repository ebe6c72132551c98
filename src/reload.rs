//! Hot reload: apply a new configuration file without dropping a connection.
//!
//! On SIGHUP or `POST /api/v1/reload` the file is read and validated again.
//! An invalid file changes nothing: every problem is logged and returned. A
//! valid one is applied in place:
//! - pools keep their identity by name; a changed pool gets its new settings
//!   and members, and every backend whose address stays keeps its health
//!   state, counters and open connections (no flap back to `unknown`);
//! - new pools start their health checks; their listeners open after the
//!   first round;
//! - listeners with the same addresses pick up new settings for new
//!   connections; changed addresses reuse the sockets sluice already holds
//!   (no moment where a kept port is closed); removed listeners close, while
//!   their open connections run to their end.
//!
//! Addresses that must be newly bound are tried before anything changes, so
//! a port conflict rejects the reload as a whole. `server` and `admin`
//! settings need a restart; a change to them is reported and not applied.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use log::{error, info, warn};

use crate::config::{Config, ConfigError};
use crate::pool::Pool;
use crate::state::State;
use crate::traffic::{BindError, Prepared};

/// Why a reload changed nothing.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The file could not be read or is invalid.
    #[error("{0}")]
    Config(#[from] ConfigError),
    /// A new listener address cannot be bound.
    #[error("{0}")]
    Bind(#[from] BindError),
    /// A shutdown has begun.
    #[error("shutting down; reload refused")]
    Draining,
    /// The reload thread is gone (the process is exiting).
    #[error("reloads are not available")]
    Unavailable,
    /// An error reported to a second waiter of the same reload.
    #[error("{0}")]
    Other(String),
}

impl ReloadError {
    /// Every problem, one per line.
    pub fn problems(&self) -> Vec<String> {
        match self {
            ReloadError::Config(ConfigError::Invalid(problems)) => {
                problems.iter().map(ToString::to_string).collect()
            }
            other => vec![other.to_string()],
        }
    }
}

/// What a reload changed, as counts.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Summary {
    /// Listeners added, removed and changed.
    pub listeners: (usize, usize, usize),
    /// Pools added, removed and changed.
    pub pools: (usize, usize, usize),
    /// Settings that need a restart and were left as they are.
    pub needs_restart: Vec<String>,
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (la, lr, lc) = self.listeners;
        let (pa, pr, pc) = self.pools;
        write!(f, "listeners +{la} -{lr} ~{lc}, pools +{pa} -{pr} ~{pc}")?;
        if !self.needs_restart.is_empty() {
            write!(
                f,
                "; not applied until a restart: {}",
                self.needs_restart.join(", ")
            )?;
        }
        Ok(())
    }
}

/// The outcome of one reload, for whoever asked for it.
pub type Outcome = Result<Summary, ReloadError>;

/// Reloads run one at a time on a thread of their own, so that reading and
/// parsing a file never holds up signal handling (SIGTERM acts at once, even
/// during a slow reload) or the admin listener (`/metrics` keeps answering).
/// Requests that arrive while one runs are served together by the next run:
/// it reads the file as it is then.
pub struct Reloader {
    queue: std::sync::mpsc::Sender<tokio::sync::oneshot::Sender<Outcome>>,
}

impl Reloader {
    /// Start the reload thread for `state`; it ends with the process.
    pub fn start(state: &Arc<State>) -> std::io::Result<Reloader> {
        let (queue, requests) = std::sync::mpsc::channel::<tokio::sync::oneshot::Sender<Outcome>>();
        let state = Arc::downgrade(state);
        std::thread::Builder::new()
            .name("sluice-reload".to_string())
            .spawn(move || {
                while let Ok(first) = requests.recv() {
                    let mut waiting = vec![first];
                    waiting.extend(requests.try_iter());
                    let Some(state) = state.upgrade() else {
                        return;
                    };
                    let outcome = state.reload();
                    for w in waiting {
                        let again = match &outcome {
                            Ok(summary) => Ok(summary.clone()),
                            Err(e) => Err(e.duplicate()),
                        };
                        let _ = w.send(again);
                    }
                }
            })?;
        Ok(Reloader { queue })
    }

    /// Ask for a reload; the receiver gets its outcome (logged and counted
    /// either way, so a caller may drop it).
    pub fn request(&self) -> tokio::sync::oneshot::Receiver<Outcome> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        if let Err(e) = self.queue.send(tx) {
            let _ = e.0.send(Err(ReloadError::Unavailable));
        }
        rx
    }
}

impl ReloadError {
    /// The same error for a second waiter (I/O errors are not `Clone`).
    fn duplicate(&self) -> ReloadError {
        match self {
            ReloadError::Draining => ReloadError::Draining,
            ReloadError::Unavailable => ReloadError::Unavailable,
            ReloadError::Config(ConfigError::Invalid(p)) => {
                ReloadError::Config(ConfigError::Invalid(p.clone()))
            }
            other => ReloadError::Other(other.to_string()),
        }
    }
}

impl State {
    /// Re-read the configuration file and apply it, on the calling thread.
    /// The running configuration stays in force when this fails. A shutdown
    /// that begins while the file is read wins: nothing is applied.
    pub fn reload(&self) -> Result<Summary, ReloadError> {
        crate::systemd::reloading();
        let outcome = self.reload_now();
        crate::systemd::reloaded(match &outcome {
            Ok(_) => "serving; configuration reloaded",
            Err(_) => "serving; the last reload failed (see the log)",
        });
        outcome
    }

    fn reload_now(&self) -> Result<Summary, ReloadError> {
        let mut current = crate::sys::lock(&self.config);
        let result = if self.is_draining() {
            Err(ReloadError::Draining)
        } else {
            Config::load(&self.path)
                .map_err(ReloadError::from)
                .and_then(|next| {
                    // Reading may have taken a while: a shutdown since wins.
                    if self.is_draining() {
                        return Err(ReloadError::Draining);
                    }
                    self.bind_new(&current, &next)
                        .map(|bound| (next, bound))
                        .map_err(ReloadError::from)
                })
        };
        match result {
            Ok((next, bound)) => {
                let summary = self.apply(&current, &next, bound);
                crate::loops::set_listen_ports(
                    next.listeners
                        .iter()
                        .flat_map(|l| l.bind.iter().map(|a| a.port())),
                );
                *current = next;
                crate::tls::publish_expiry(&self.metrics, &current);
                self.metrics.reloaded(true);
                for w in &current.warnings {
                    warn!("{w}");
                }
                if !summary.needs_restart.is_empty() {
                    warn!(
                        "reload: {} changed but need a restart to apply",
                        summary.needs_restart.join(", ")
                    );
                }
                info!(
                    "configuration reloaded from {}: {summary}",
                    self.path.display()
                );
                Ok(summary)
            }
            Err(e) => {
                self.metrics.reloaded(false);
                error!(
                    "reload of {} failed; the running configuration stays in force:",
                    self.path.display()
                );
                for p in e.problems() {
                    error!("  {p}");
                }
                Err(e)
            }
        }
    }

    /// Bind every listener that is new or has new addresses, before anything
    /// changes: either all of them can be bound, or the reload is refused
    /// and what was bound is closed again (nothing half-added).
    fn bind_new(
        &self,
        current: &Config,
        next: &Config,
    ) -> Result<HashMap<String, Prepared>, BindError> {
        let mut bound = HashMap::new();
        for l in &next.listeners {
            let same = current
                .listeners
                .iter()
                .any(|c| c.name == l.name && c.bind == l.bind);
            if !same {
                bound.insert(l.name.clone(), self.traffic.prepare(l)?);
            }
        }
        Ok(bound)
    }

    fn apply(
        &self,
        current: &Config,
        next: &Config,
        mut bound: HashMap<String, Prepared>,
    ) -> Summary {
        let mut summary = Summary::default();
        if current.server != next.server {
            summary.needs_restart.push("server".to_string());
        }
        if current.admin != next.admin {
            summary.needs_restart.push("admin".to_string());
        }
        if current.access_log != next.access_log {
            summary.needs_restart.push("access_log".to_string());
        }

        // Pools first, so listeners can point at them.
        let old: HashMap<String, Arc<Pool>> = self
            .pools()
            .iter()
            .map(|p| (p.name.clone(), Arc::clone(p)))
            .collect();
        let mut pools = Vec::with_capacity(next.pools.len());
        for settings in &next.pools {
            match old.get(&settings.name) {
                Some(pool) => {
                    if pool.generation().settings != *settings {
                        for gone in pool.reconfigure(settings, &self.metrics) {
                            self.metrics
                                .remove_backend(&pool.name, gone.address.as_str());
                        }
                        summary.pools.2 += 1;
                    }
                    pools.push(Arc::clone(pool));
                }
                None => {
                    let pool = Pool::new(settings, &self.metrics, &self.roles);
                    self.health.start(Arc::clone(&pool));
                    pools.push(pool);
                    summary.pools.0 += 1;
                }
            }
        }
        let kept: HashSet<&str> = next.pools.iter().map(|p| p.name.as_str()).collect();
        // Listeners moving to a pool that has no verdict yet stay on their
        // old pool until it has (see `Traffic::update`), so an old pool they
        // leave keeps its checks until then.
        let mut handovers: HashMap<String, Vec<Arc<Pool>>> = HashMap::new();
        for l in &next.listeners {
            let Some(c) = current.listeners.iter().find(|c| c.name == l.name) else {
                continue;
            };
            if let Some(new) = pools.iter().find(|p| p.name == l.pool) {
                if c.pool != l.pool && !new.is_ready() {
                    handovers
                        .entry(c.pool.clone())
                        .or_default()
                        .push(Arc::clone(new));
                }
            }
        }
        for (name, pool) in &old {
            if !kept.contains(name.as_str()) {
                match handovers.remove(name) {
                    Some(successors) => self.health.stop_after(Arc::clone(pool), successors),
                    None => {
                        self.health.stop(name);
                        pool.retire();
                    }
                }
                for m in &pool.generation().members {
                    self.metrics
                        .remove_backend(name, m.backend.address.as_str());
                }
                self.metrics.remove_pool(name);
                summary.pools.1 += 1;
            }
        }
        let by_name: HashMap<&str, Arc<Pool>> = pools
            .iter()
            .map(|p| (p.name.as_str(), Arc::clone(p)))
            .collect();
        self.pools.store(Arc::new(pools.clone()));

        // Listeners.
        for l in &next.listeners {
            let Some(pool) = by_name.get(l.pool.as_str()).cloned() else {
                continue;
            };
            match current.listeners.iter().find(|c| c.name == l.name) {
                Some(c) if c.bind == l.bind => {
                    let pool_replaced = !old.get(&l.pool).is_some_and(|p| Arc::ptr_eq(p, &pool));
                    if c != l || pool_replaced {
                        self.traffic.update(l, pool);
                        summary.listeners.2 += 1;
                    }
                }
                existing => {
                    // Bound by `bind_new`, which covers every such listener.
                    let Some(prepared) = bound.remove(&l.name) else {
                        continue;
                    };
                    self.traffic.launch(prepared, pool);
                    if existing.is_some() {
                        summary.listeners.2 += 1;
                    } else {
                        summary.listeners.0 += 1;
                    }
                }
            }
        }
        for c in &current.listeners {
            if !next.listeners.iter().any(|l| l.name == c.name) {
                self.traffic.stop(&c.name);
                self.metrics.remove_listener(&c.name);
                summary.listeners.1 += 1;
            }
        }
        self.traffic.release_unused(next);
        summary
    }
}
