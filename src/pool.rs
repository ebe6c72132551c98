//! A pool of backends: health state, who serves, and picking one per client.
//!
//! Health results arrive from [`crate::health`]; after each, the pool works
//! out which backends serve new connections (its *serving set*) according to
//! its mode:
//!
//! - `active_active`: every up non-backup backend; when none is up, every up
//!   backup.
//! - `active_passive`: one backend, the first up in list order; with
//!   `failback: manual` the current one keeps serving until it fails.
//!
//! The serving set is published to a pingora-load-balancing `LoadBalancer`
//! (see [`selection`]) that spreads clients over it by the pool's algorithm.
//! When every serving backend refuses a client, [`Pool::pick`] falls back to
//! any other up backend, so one bad connect is never a client-visible failure
//! while something healthy remains.

pub mod selection;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};

use log::{error, info, warn};

use crate::config::{Algorithm, Failback, HealthCheckSettings, HostPort, Mode, PoolSettings};
use crate::metrics::{BackendMetrics, Metrics, PoolMetrics};
use selection::Selector;

/// What health checks say about a backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Health {
    /// No result yet: not trusted.
    Unknown = 0,
    /// Passing its checks.
    Up = 1,
    /// Failing its checks.
    Down = 2,
}

impl Health {
    fn from_u8(v: u8) -> Health {
        match v {
            1 => Health::Up,
            2 => Health::Down,
            _ => Health::Unknown,
        }
    }

    /// Lower-case name, as shown by the admin API.
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Unknown => "unknown",
            Health::Up => "up",
            Health::Down => "down",
        }
    }
}

/// One configured backend and its live state.
pub struct BackendState {
    /// Position in the pool's list (its priority in active_passive mode).
    pub index: usize,
    /// The address as configured.
    pub address: HostPort,
    /// Relative share of connections.
    pub weight: u32,
    /// Serves only while no non-backup backend is up.
    pub backup: bool,
    /// Labelled metric handles.
    pub metrics: BackendMetrics,
    resolved: Mutex<Option<SocketAddr>>,
    health: AtomicU8,
    serving: AtomicBool,
}

impl BackendState {
    /// Current health.
    pub fn health(&self) -> Health {
        Health::from_u8(self.health.load(Relaxed))
    }

    /// Whether it takes new connections now.
    pub fn is_serving(&self) -> bool {
        self.serving.load(Relaxed)
    }

    /// The address it resolved to at the last check.
    pub fn resolved(&self) -> Option<SocketAddr> {
        *lock(&self.resolved)
    }

    fn usable(&self) -> bool {
        self.health() == Health::Up && self.resolved().is_some()
    }
}

/// The tier serving an active_active pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Tier {
    Primary,
    Backup,
}

/// Decisions that change only under the pool's lock.
#[derive(Default)]
struct Control {
    /// active_passive: the serving backend.
    active: Option<usize>,
    /// The last serving backend (active_passive) or tier (active_active), kept
    /// across an outage so that recovering elsewhere counts as a failover.
    last_active: Option<usize>,
    last_tier: Option<Tier>,
    /// Serving set as published to the selector.
    published: Vec<(usize, SocketAddr)>,
    /// Whether an empty serving set was already reported.
    reported_empty: bool,
}

/// A pool of backends.
pub struct Pool {
    /// The pool's name.
    pub name: String,
    /// active_active or active_passive.
    pub mode: Mode,
    /// Failback policy in active_passive mode.
    pub failback: Failback,
    /// Selection algorithm.
    pub algorithm: Algorithm,
    /// Limit for one connect.
    pub connect_timeout: std::time::Duration,
    /// Backends tried per client.
    pub connect_attempts: u32,
    /// Health-check settings.
    pub health_check: HealthCheckSettings,
    /// Backends in configured order.
    pub backends: Vec<Arc<BackendState>>,
    metrics: PoolMetrics,
    selector: Selector,
    control: Mutex<Control>,
    first_round_done: AtomicBool,
}

/// Why an operator's request to move traffic was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MoveError {
    /// The pool does not pick one active backend.
    #[error("pool `{0}` is active_active; only active_passive pools have one active backend")]
    NotActivePassive(String),
    /// Auto failback would undo the move at once.
    #[error(
        "pool `{0}` has failback: auto, so traffic always returns to the first healthy backend"
    )]
    AutoFailback(String),
    /// No backend has that address.
    #[error("pool `{pool}` has no backend `{backend}`")]
    UnknownBackend {
        /// The pool.
        pool: String,
        /// The requested address.
        backend: String,
    },
    /// The backend is not up.
    #[error("backend `{0}` is not up")]
    NotUp(String),
}

/// Take a lock even if a panicking thread poisoned it; the data stays consistent
/// because every critical section here is panic-free.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Pool {
    /// Build a pool from its settings; every backend starts `Unknown`.
    pub fn new(settings: &PoolSettings, metrics: &Metrics) -> Arc<Pool> {
        let backends = settings
            .backends
            .iter()
            .enumerate()
            .map(|(index, b)| {
                Arc::new(BackendState {
                    index,
                    address: b.address.clone(),
                    weight: b.weight,
                    backup: b.backup,
                    metrics: metrics.backend(&settings.name, b.address.as_str()),
                    resolved: Mutex::new(b.address.socket_addr()),
                    health: AtomicU8::new(Health::Unknown as u8),
                    serving: AtomicBool::new(false),
                })
            })
            .collect();
        Arc::new(Pool {
            name: settings.name.clone(),
            mode: settings.mode,
            failback: settings.failback,
            algorithm: settings.algorithm,
            connect_timeout: settings.connect_timeout,
            connect_attempts: settings.connect_attempts,
            health_check: settings.health_check.clone(),
            backends,
            metrics: metrics.pool(&settings.name),
            selector: Selector::new(settings.algorithm),
            control: Mutex::new(Control::default()),
            first_round_done: AtomicBool::new(false),
        })
    }

    /// Whether the first health-check round has finished.
    pub fn is_ready(&self) -> bool {
        self.first_round_done.load(Relaxed)
    }

    /// Record that the first health-check round has finished.
    pub fn mark_ready(&self) {
        let mut ctl = lock(&self.control);
        self.first_round_done.store(true, Relaxed);
        // `recompute` stays quiet before this point; report an empty start once here.
        if ctl.published.is_empty() {
            error!(
                "pool {}: no backend is available; clients are refused",
                self.name
            );
            ctl.reported_empty = true;
        }
    }

    /// Whether selection needs the client address.
    pub fn needs_client_key(&self) -> bool {
        self.algorithm == Algorithm::SourceHash && self.mode == Mode::ActiveActive
    }

    /// Apply a health transition (and a fresh address) for backend `index`.
    ///
    /// Called by the health checker; recomputes the serving set when either
    /// changed.
    pub fn update_backend(
        &self,
        index: usize,
        health: Option<Health>,
        resolved: Option<SocketAddr>,
    ) {
        let mut ctl = lock(&self.control);
        let b = &self.backends[index];
        let mut changed = false;
        if let Some(addr) = resolved {
            let mut slot = lock(&b.resolved);
            if *slot != Some(addr) {
                if let Some(old) = *slot {
                    info!(
                        "pool {}: backend {} now resolves to {addr} (was {old})",
                        self.name, b.address
                    );
                }
                *slot = Some(addr);
                changed = true;
            }
        }
        if let Some(h) = health {
            if b.health() != h {
                b.health.store(h as u8, Relaxed);
                b.metrics.up.set(i64::from(h == Health::Up));
                changed = true;
            }
        }
        if changed {
            self.recompute(&mut ctl);
        }
    }

    /// Make `backend` (a configured address) the active one of a
    /// `failback: manual` active_passive pool.
    pub fn make_active(&self, backend: &str) -> Result<(), MoveError> {
        if self.mode != Mode::ActivePassive {
            return Err(MoveError::NotActivePassive(self.name.clone()));
        }
        if self.failback == Failback::Auto {
            return Err(MoveError::AutoFailback(self.name.clone()));
        }
        let b = self
            .backends
            .iter()
            .find(|b| b.address.as_str() == backend)
            .ok_or_else(|| MoveError::UnknownBackend {
                pool: self.name.clone(),
                backend: backend.to_string(),
            })?;
        if !b.usable() {
            return Err(MoveError::NotUp(backend.to_string()));
        }
        let mut ctl = lock(&self.control);
        if ctl.active != Some(b.index) {
            info!(
                "pool {}: operator made {} the active backend",
                self.name, b.address
            );
            ctl.active = Some(b.index);
            self.recompute(&mut ctl);
        }
        Ok(())
    }

    /// Work out the serving set, publish it, and log and count failovers.
    fn recompute(&self, ctl: &mut Control) {
        let serving: Vec<usize> = match self.mode {
            Mode::ActiveActive => self.recompute_active_active(ctl),
            Mode::ActivePassive => self.recompute_active_passive(ctl).into_iter().collect(),
        };
        if serving.is_empty() {
            // Before the first round ends, `mark_ready` reports it once.
            if !ctl.reported_empty && self.is_ready() {
                error!(
                    "pool {}: no backend is available; clients are refused",
                    self.name
                );
            }
            ctl.reported_empty = true;
        } else {
            ctl.reported_empty = false;
        }
        for b in &self.backends {
            let on = serving.contains(&b.index);
            b.serving.store(on, Relaxed);
            b.metrics.active.set(i64::from(on));
        }
        let members: Vec<(usize, SocketAddr)> = serving
            .iter()
            .filter_map(|&i| self.backends[i].resolved().map(|addr| (i, addr)))
            .collect();
        if members != ctl.published {
            self.selector.publish(
                members
                    .iter()
                    .map(|&(i, addr)| (addr, Arc::clone(&self.backends[i])))
                    .collect(),
            );
            ctl.published = members;
        }
    }

    fn recompute_active_active(&self, ctl: &mut Control) -> Vec<usize> {
        let up = |backup: bool| -> Vec<usize> {
            self.backends
                .iter()
                .filter(|b| b.backup == backup && b.usable())
                .map(|b| b.index)
                .collect()
        };
        let primaries = up(false);
        let (tier, serving) = if !primaries.is_empty() {
            (Some(Tier::Primary), primaries)
        } else {
            let backups = up(true);
            (
                if backups.is_empty() {
                    None
                } else {
                    Some(Tier::Backup)
                },
                backups,
            )
        };
        if tier.is_some() && tier != ctl.last_tier {
            match (ctl.last_tier, tier) {
                (Some(Tier::Primary), Some(Tier::Backup)) => {
                    self.metrics.failovers.inc();
                    warn!(
                        "pool {}: failover: every primary backend is down; backups now serve",
                        self.name
                    );
                }
                (Some(Tier::Backup), Some(Tier::Primary)) => {
                    info!(
                        "pool {}: failback: a primary backend is up again; backups stand by",
                        self.name
                    );
                }
                _ => {}
            }
            ctl.last_tier = tier;
        }
        serving
    }

    fn recompute_active_passive(&self, ctl: &mut Control) -> Option<usize> {
        let first_up = self.backends.iter().find(|b| b.usable()).map(|b| b.index);
        let next = match (self.failback, ctl.active) {
            (Failback::Manual, Some(i)) if self.backends[i].usable() => Some(i),
            _ => first_up,
        };
        ctl.active = next;
        if let Some(n) = next {
            let to = &self.backends[n].address;
            match ctl.last_active {
                None => info!("pool {}: {to} is the active backend", self.name),
                Some(p) if p != n => {
                    let from = &self.backends[p];
                    if from.usable() {
                        info!(
                            "pool {}: {to} is the active backend again (was {})",
                            self.name, from.address
                        );
                    } else {
                        self.metrics.failovers.inc();
                        warn!(
                            "pool {}: failover from {} ({}) to {to}",
                            self.name,
                            from.address,
                            from.health().as_str()
                        );
                    }
                }
                Some(_) => {}
            }
            ctl.last_active = Some(n);
        }
        next
    }

    /// Pick a backend for a client: from the serving set by the pool's
    /// algorithm, else any other up backend in priority order, skipping
    /// those in `tried`.
    pub fn pick(&self, key: &[u8], tried: &[usize]) -> Option<(Arc<BackendState>, SocketAddr)> {
        if let Some(found) = self.selector.select(key, tried) {
            return Some(found);
        }
        let priority = self
            .backends
            .iter()
            .filter(|b| !b.backup)
            .chain(self.backends.iter().filter(|b| b.backup));
        for b in priority {
            if !tried.contains(&b.index) && b.usable() {
                if let Some(addr) = b.resolved() {
                    return Some((Arc::clone(b), addr));
                }
            }
        }
        None
    }
}

#[cfg(test)]
mod tests;
