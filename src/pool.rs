//! A pool of backends: health state, who serves, and picking one per client.
//!
//! Health results arrive from the active checks ([`crate::health`]) and from
//! real traffic (failed connects, when `health_check.passive` is on). After
//! each change the pool works out which backends serve new connections (its
//! *serving set*) according to its mode:
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
//!
//! A pool outlives reloads: [`Pool::reconfigure`] swaps in a new
//! [`Generation`] (settings and members) and keeps each [`Backend`] whose
//! address stays, with its health, counters and open connections.

pub mod selection;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};

use arc_swap::ArcSwap;
use log::{error, info, warn};
use tokio::sync::Notify;

use crate::config::{Failback, HostPort, Mode, PoolSettings, SessionPolicy};
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
    /// Record one result; returns the new state when it changed. The first
    /// result decides; after that `fall` failures in a row mark down and
    /// `rise` successes in a row mark up.
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

    /// Force a state (a passive mark-down), starting the streaks afresh.
    fn force(&mut self, state: Health) {
        *self = Tracker {
            state,
            successes: 0,
            failures: 0,
        };
    }

    /// Consecutive results that agree with the last one.
    pub fn streak(&self) -> u32 {
        self.successes.max(self.failures)
    }
}

/// A backend, kept across reloads while its address stays in the pool.
pub struct Backend {
    /// The address as configured.
    pub address: HostPort,
    /// Labelled metric handles.
    pub metrics: BackendMetrics,
    resolved: Mutex<Option<SocketAddr>>,
    health: AtomicU8,
    tracker: Mutex<Tracker>,
    passive_failures: AtomicU32,
    /// Wakes the connections to this backend that must close.
    pub closer: Notify,
}

impl Backend {
    fn new(pool: &str, address: &HostPort, metrics: &Metrics) -> Arc<Backend> {
        Arc::new(Backend {
            address: address.clone(),
            metrics: metrics.backend(pool, address.as_str()),
            resolved: Mutex::new(address.socket_addr()),
            health: AtomicU8::new(Health::Unknown as u8),
            tracker: Mutex::new(Tracker::default()),
            passive_failures: AtomicU32::new(0),
            closer: Notify::new(),
        })
    }

    /// Current health.
    pub fn health(&self) -> Health {
        Health::from_u8(self.health.load(Relaxed))
    }

    /// The address it resolved to at the last check.
    pub fn resolved(&self) -> Option<SocketAddr> {
        *lock(&self.resolved)
    }

    fn usable(&self) -> bool {
        self.health() == Health::Up && self.resolved().is_some()
    }

    /// Identity for "already tried" lists.
    pub fn id(self: &Arc<Self>) -> usize {
        Arc::as_ptr(self) as usize
    }
}

/// A backend's place in one generation of its pool.
pub struct Member {
    /// Position in the pool's list (its priority in active_passive mode).
    pub index: usize,
    /// Relative share of connections.
    pub weight: u32,
    /// Serves only while no non-backup backend is up.
    pub backup: bool,
    /// The backend.
    pub backend: Arc<Backend>,
    serving: AtomicBool,
}

impl Member {
    /// Whether it takes new connections now.
    pub fn is_serving(&self) -> bool {
        self.serving.load(Relaxed)
    }
}

/// A pool's settings and members; replaced as a whole on reload.
pub struct Generation {
    /// The pool's settings.
    pub settings: PoolSettings,
    /// Members in configured order.
    pub members: Vec<Arc<Member>>,
    selector: Selector,
}

impl Generation {
    /// The member for `backend`, if it is in this generation.
    pub fn member(&self, backend: &Backend) -> Option<&Arc<Member>> {
        self.members
            .iter()
            .find(|m| std::ptr::eq(&*m.backend, backend))
    }

    /// Whether selection needs the client address.
    pub fn needs_client_key(&self) -> bool {
        self.settings.algorithm == crate::config::Algorithm::SourceHash
            && self.settings.mode == Mode::ActiveActive
    }

    /// Whether new connections should watch for their backend closing.
    pub fn closes_sessions(&self) -> bool {
        let s = &self.settings;
        s.on_backend_down == SessionPolicy::Close
            || (s.on_failback == SessionPolicy::Close && s.mode == Mode::ActivePassive)
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
    active: Option<Arc<Backend>>,
    /// The last serving backend (active_passive) or tier (active_active), kept
    /// across an outage so that recovering elsewhere counts as a failover.
    last_active: Option<Arc<Backend>>,
    last_tier: Option<Tier>,
    /// Serving set as published to the selector, as (backend id, address).
    published: Vec<(usize, SocketAddr)>,
    /// Whether an empty serving set was already reported.
    reported_empty: bool,
}

/// A pool of backends.
pub struct Pool {
    /// The pool's name.
    pub name: String,
    metrics: PoolMetrics,
    generation: ArcSwap<Generation>,
    control: Mutex<Control>,
    first_round_done: AtomicBool,
    ready: Notify,
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

fn generation(
    settings: &PoolSettings,
    metrics: &Metrics,
    keep: &HashMap<String, Arc<Backend>>,
) -> Generation {
    let members = settings
        .backends
        .iter()
        .enumerate()
        .map(|(index, b)| {
            let backend = keep
                .get(b.address.as_str())
                .cloned()
                .unwrap_or_else(|| Backend::new(&settings.name, &b.address, metrics));
            Arc::new(Member {
                index,
                weight: b.weight,
                backup: b.backup,
                backend,
                serving: AtomicBool::new(false),
            })
        })
        .collect();
    Generation {
        settings: settings.clone(),
        members,
        selector: Selector::new(settings.algorithm),
    }
}

impl Pool {
    /// Build a pool from its settings; every backend starts `Unknown`.
    pub fn new(settings: &PoolSettings, metrics: &Metrics) -> Arc<Pool> {
        Arc::new(Pool {
            name: settings.name.clone(),
            metrics: metrics.pool(&settings.name),
            generation: ArcSwap::from_pointee(generation(settings, metrics, &HashMap::new())),
            control: Mutex::new(Control::default()),
            first_round_done: AtomicBool::new(false),
            ready: Notify::new(),
        })
    }

    /// The current settings and members.
    pub fn generation(&self) -> Arc<Generation> {
        self.generation.load_full()
    }

    /// Apply new settings, keeping every backend whose address stays (with
    /// its health, counters and connections). Returns the backends that left.
    pub fn reconfigure(&self, settings: &PoolSettings, metrics: &Metrics) -> Vec<Arc<Backend>> {
        let mut ctl = lock(&self.control);
        let old = self.generation.load_full();
        let keep: HashMap<String, Arc<Backend>> = old
            .members
            .iter()
            .map(|m| {
                (
                    m.backend.address.as_str().to_string(),
                    Arc::clone(&m.backend),
                )
            })
            .collect();
        let next = generation(settings, metrics, &keep);
        let gone = old
            .members
            .iter()
            .filter(|m| next.member(&m.backend).is_none())
            .map(|m| Arc::clone(&m.backend))
            .collect();
        self.generation.store(Arc::new(next));
        // The new selector starts empty: publish afresh.
        ctl.published.clear();
        if ctl
            .active
            .as_ref()
            .is_some_and(|a| self.generation.load().member(a).is_none())
        {
            ctl.active = None;
        }
        self.recompute(&mut ctl);
        gone
    }

    /// Whether the first health-check round has finished.
    pub fn is_ready(&self) -> bool {
        self.first_round_done.load(Relaxed)
    }

    /// Record that the first health-check round has finished.
    pub fn mark_ready(&self) {
        let mut ctl = lock(&self.control);
        if !self.first_round_done.swap(true, Relaxed) {
            // `recompute` stays quiet before this point; report an empty start once here.
            if ctl.published.is_empty() {
                error!(
                    "pool {}: no backend is available; clients are refused",
                    self.name
                );
                ctl.reported_empty = true;
            }
            self.ready.notify_waiters();
        }
    }

    /// Wait until the first health-check round has finished.
    pub async fn wait_ready(&self) {
        loop {
            let notified = self.ready.notified();
            if self.is_ready() {
                return;
            }
            notified.await;
        }
    }

    /// Record an active check result for `backend`: `Ok` with the address it
    /// resolved to, or `Err` with the reason.
    pub fn observe_check(&self, backend: &Arc<Backend>, result: Result<SocketAddr, String>) {
        let mut ctl = lock(&self.control);
        let generation = self.generation.load();
        let hc = &generation.settings.health_check;
        let ok = result.is_ok();
        if ok {
            backend.metrics.checks_success.inc();
        } else {
            backend.metrics.checks_failure.inc();
        }
        let mut changed = false;
        if let Ok(addr) = &result {
            let mut slot = lock(&backend.resolved);
            if *slot != Some(*addr) {
                if let Some(old) = *slot {
                    info!(
                        "pool {}: backend {} now resolves to {addr} (was {old})",
                        self.name, backend.address
                    );
                }
                *slot = Some(*addr);
                changed = true;
            }
        }
        let mut tracker = lock(&backend.tracker);
        let was = tracker.state;
        if let Some(now) = tracker.observe(ok, hc.rise, hc.fall) {
            let streak = tracker.streak();
            drop(tracker);
            match (was, now, &result) {
                (Health::Unknown, Health::Up, _) => {
                    info!("pool {}: backend {} is up", self.name, backend.address)
                }
                (Health::Unknown, _, Err(e)) => warn!(
                    "pool {}: backend {} is down: {e}",
                    self.name, backend.address
                ),
                (_, Health::Up, _) => info!(
                    "pool {}: backend {} is UP after {streak} successful checks",
                    self.name, backend.address
                ),
                (_, _, Err(e)) => warn!(
                    "pool {}: backend {} is DOWN after {streak} failed checks: {e}",
                    self.name, backend.address
                ),
                _ => {}
            }
            self.set_health(&mut ctl, backend, now, was != Health::Unknown);
            changed = true;
        } else if let Err(e) = &result {
            drop(tracker);
            if backend.health() == Health::Up {
                log::debug!(
                    "pool {}: check of {} failed ({e}); still up",
                    self.name,
                    backend.address
                );
            }
        }
        if changed {
            self.recompute(&mut ctl);
        }
    }

    /// Record the outcome of a real connect to `backend` (passive health):
    /// `fall` failures in a row mark an up backend down at once; the active
    /// checks bring it back.
    pub fn observe_connect(
        &self,
        backend: &Arc<Backend>,
        ok: bool,
        reason: &dyn std::fmt::Display,
    ) {
        if ok {
            // The common case costs one load.
            if backend.passive_failures.load(Relaxed) != 0 {
                backend.passive_failures.store(0, Relaxed);
            }
            return;
        }
        let generation = self.generation.load();
        let hc = &generation.settings.health_check;
        if !hc.passive {
            return;
        }
        let failures = backend.passive_failures.fetch_add(1, Relaxed) + 1;
        if failures < hc.fall || backend.health() != Health::Up {
            return;
        }
        let mut ctl = lock(&self.control);
        if backend.health() != Health::Up {
            return;
        }
        lock(&backend.tracker).force(Health::Down);
        backend.passive_failures.store(0, Relaxed);
        warn!(
            "pool {}: backend {} is DOWN after {failures} failed connects of real traffic: {reason}",
            self.name, backend.address
        );
        self.set_health(&mut ctl, backend, Health::Down, true);
        self.recompute(&mut ctl);
    }

    /// Store a new health state, count the transition and close sessions the
    /// pool's policy says must go.
    fn set_health(&self, _ctl: &mut Control, backend: &Backend, now: Health, transition: bool) {
        backend.health.store(now as u8, Relaxed);
        backend.metrics.up.set(i64::from(now == Health::Up));
        if transition {
            match now {
                Health::Up => backend.metrics.to_up.inc(),
                Health::Down => backend.metrics.to_down.inc(),
                Health::Unknown => {}
            }
        }
        if now == Health::Down
            && self.generation.load().settings.on_backend_down == SessionPolicy::Close
        {
            backend.closer.notify_waiters();
        }
    }

    /// Make `backend` (a configured address) the active one of a
    /// `failback: manual` active_passive pool.
    pub fn make_active(&self, backend: &str) -> Result<(), MoveError> {
        let mut ctl = lock(&self.control);
        let generation = self.generation.load();
        let s = &generation.settings;
        if s.mode != Mode::ActivePassive {
            return Err(MoveError::NotActivePassive(self.name.clone()));
        }
        if s.failback == Failback::Auto {
            return Err(MoveError::AutoFailback(self.name.clone()));
        }
        let m = generation
            .members
            .iter()
            .find(|m| m.backend.address.as_str() == backend)
            .ok_or_else(|| MoveError::UnknownBackend {
                pool: self.name.clone(),
                backend: backend.to_string(),
            })?;
        if !m.backend.usable() {
            return Err(MoveError::NotUp(backend.to_string()));
        }
        if !ctl
            .active
            .as_ref()
            .is_some_and(|a| Arc::ptr_eq(a, &m.backend))
        {
            info!(
                "pool {}: operator made {} the active backend",
                self.name, m.backend.address
            );
            ctl.active = Some(Arc::clone(&m.backend));
            self.recompute(&mut ctl);
        }
        Ok(())
    }

    /// Work out the serving set, publish it, and log and count failovers.
    fn recompute(&self, ctl: &mut Control) {
        let generation = self.generation.load_full();
        let serving: Vec<usize> = match generation.settings.mode {
            Mode::ActiveActive => self.recompute_active_active(&generation, ctl),
            Mode::ActivePassive => self
                .recompute_active_passive(&generation, ctl)
                .into_iter()
                .collect(),
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
        for m in &generation.members {
            let on = serving.contains(&m.index);
            m.serving.store(on, Relaxed);
            m.backend.metrics.active.set(i64::from(on));
        }
        let members: Vec<(usize, SocketAddr)> = serving
            .iter()
            .filter_map(|&i| {
                let m = &generation.members[i];
                m.backend.resolved().map(|addr| (m.backend.id(), addr))
            })
            .collect();
        if members != ctl.published {
            generation.selector.publish(
                serving
                    .iter()
                    .filter_map(|&i| {
                        let m = &generation.members[i];
                        m.backend.resolved().map(|addr| (addr, Arc::clone(m)))
                    })
                    .collect(),
            );
            ctl.published = members;
        }
    }

    fn recompute_active_active(&self, generation: &Generation, ctl: &mut Control) -> Vec<usize> {
        let up = |backup: bool| -> Vec<usize> {
            generation
                .members
                .iter()
                .filter(|m| m.backup == backup && m.backend.usable())
                .map(|m| m.index)
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

    fn recompute_active_passive(
        &self,
        generation: &Generation,
        ctl: &mut Control,
    ) -> Option<usize> {
        let settings = &generation.settings;
        let first_up = generation.members.iter().find(|m| m.backend.usable());
        let current = ctl
            .active
            .as_ref()
            .and_then(|a| generation.member(a))
            .filter(|m| m.backend.usable());
        let next = match (settings.failback, current) {
            (Failback::Manual, Some(m)) => Some(m),
            _ => first_up,
        };
        ctl.active = next.map(|m| Arc::clone(&m.backend));
        let next = next?;
        let to = &next.backend.address;
        match &ctl.last_active {
            None => info!("pool {}: {to} is the active backend", self.name),
            Some(prev) if !Arc::ptr_eq(prev, &next.backend) => {
                if prev.usable() {
                    info!(
                        "pool {}: {to} is the active backend again (was {})",
                        self.name, prev.address
                    );
                    if settings.on_failback == SessionPolicy::Close {
                        prev.closer.notify_waiters();
                    }
                } else {
                    self.metrics.failovers.inc();
                    warn!(
                        "pool {}: failover from {} ({}) to {to}",
                        self.name,
                        prev.address,
                        prev.health().as_str()
                    );
                }
            }
            Some(_) => {}
        }
        ctl.last_active = Some(Arc::clone(&next.backend));
        Some(next.index)
    }

    /// Pick a backend for a client: from the serving set by the pool's
    /// algorithm, else any other up backend in priority order, skipping
    /// those in `tried` (backend ids).
    pub fn pick(&self, key: &[u8], tried: &[usize]) -> Option<(Arc<Member>, SocketAddr)> {
        let generation = self.generation.load();
        if let Some(found) = generation.selector.select(key, tried) {
            return Some(found);
        }
        let members = &generation.members;
        let priority = members
            .iter()
            .filter(|m| !m.backup)
            .chain(members.iter().filter(|m| m.backup));
        for m in priority {
            if !tried.contains(&m.backend.id()) && m.backend.usable() {
                if let Some(addr) = m.backend.resolved() {
                    return Some((Arc::clone(m), addr));
                }
            }
        }
        None
    }
}

#[cfg(test)]
impl Pool {
    /// Put backend `index` in state `health` directly.
    fn force(&self, index: usize, health: Health) {
        let mut ctl = lock(&self.control);
        let backend = Arc::clone(&self.generation.load().members[index].backend);
        lock(&backend.tracker).force(health);
        self.set_health(&mut ctl, &backend, health, true);
        self.recompute(&mut ctl);
    }

    fn backend(&self, index: usize) -> Arc<Backend> {
        Arc::clone(&self.generation.load().members[index].backend)
    }
}

#[cfg(test)]
mod tests;
