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
use crate::traffic::BindError;

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

impl State {
    /// Re-read the configuration file and apply it. The running
    /// configuration stays in force when this fails.
    pub fn reload(&self) -> Result<Summary, ReloadError> {
        let mut current = self.config.lock().unwrap_or_else(|p| p.into_inner());
        let result = if self.is_draining() {
            Err(ReloadError::Draining)
        } else {
            Config::load(&self.path)
                .map_err(ReloadError::from)
                .and_then(|next| {
                    self.check_binds(&current, &next)
                        .map(|()| next)
                        .map_err(ReloadError::from)
                })
        };
        match result {
            Ok(next) => {
                let summary = self.apply(&current, &next);
                *current = next;
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

    /// Every address a changed or new listener needs and sluice does not hold yet can be bound.
    fn check_binds(&self, current: &Config, next: &Config) -> Result<(), BindError> {
        for l in &next.listeners {
            let same = current
                .listeners
                .iter()
                .any(|c| c.name == l.name && c.bind == l.bind);
            if !same {
                self.traffic.check_binds(l)?;
            }
        }
        Ok(())
    }

    fn apply(&self, current: &Config, next: &Config) -> Summary {
        let mut summary = Summary::default();
        if current.server != next.server {
            summary.needs_restart.push("server".to_string());
        }
        if current.admin != next.admin {
            summary.needs_restart.push("admin".to_string());
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
                    // Binds were checked above; a failure now is a race with another process.
                    if let Err(e) = self.traffic.start(l, pool) {
                        error!("reload: {e}");
                    } else if existing.is_some() {
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
