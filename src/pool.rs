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

use crate::check::Role;
use crate::config::{Failback, HostPort, Mode, PoolSettings, RoleRequirement, SessionPolicy};
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
    /// The role in force, and a different one being confirmed with its streak.
    role: Option<Role>,
    candidate: Option<(Role, u32)>,
}

impl Default for Tracker {
    fn default() -> Self {
        Tracker {
            state: Health::Unknown,
            successes: 0,
            failures: 0,
            role: None,
            candidate: None,
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
            ..Tracker::default()
        };
    }

    /// Record the role a successful check reported; returns the role in
    /// force when it changed. The first report decides. Giving up `primary`
    /// takes effect at once (writes must stop); taking it on needs `rise`
    /// reports in a row, so a flapping node cannot grab the writes.
    pub fn observe_role(&mut self, reported: Option<Role>, rise: u32) -> Option<Option<Role>> {
        let Some(reported) = reported else {
            self.candidate = None;
            return self.role.take().map(|_| None);
        };
        if self.role == Some(reported) {
            self.candidate = None;
            return None;
        }
        let streak = match self.candidate {
            Some((r, n)) if r == reported => n.saturating_add(1),
            _ => 1,
        };
        let at_once = self.role.is_none() || self.role == Some(Role::Primary);
        if at_once || streak >= rise {
            self.role = Some(reported);
            self.candidate = None;
            Some(self.role)
        } else {
            self.candidate = Some((reported, streak));
            None
        }
    }

    /// Forget the role (the backend went down: its next answer decides).
    fn clear_role(&mut self) -> bool {
        self.candidate = None;
        self.role.take().is_some()
    }

    /// Consecutive results that agree with the last one.
    pub fn streak(&self) -> u32 {
        self.successes.max(self.failures)
    }
}

// Role codes, also the index into `metrics::ROLE_LABELS`.
const ROLE_PRIMARY: u8 = 0;
const ROLE_REPLICA: u8 = 1;
const ROLE_UNKNOWN: u8 = 2;

fn role_code(role: Option<Role>) -> u8 {
    match role {
        Some(Role::Primary) => ROLE_PRIMARY,
        Some(Role::Replica) => ROLE_REPLICA,
        None => ROLE_UNKNOWN,
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
    /// [`role_code`] of the role in force.
    role: AtomicU8,
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
            role: AtomicU8::new(ROLE_UNKNOWN),
            tracker: Mutex::new(Tracker::default()),
            passive_failures: AtomicU32::new(0),
            closer: Notify::new(),
        })
    }

    /// Current health.
    pub fn health(&self) -> Health {
        Health::from_u8(self.health.load(Relaxed))
    }

    /// The role it reports, when its check tells one and it is up.
    pub fn role(&self) -> Option<Role> {
        match self.role.load(Relaxed) {
            ROLE_PRIMARY => Some(Role::Primary),
            ROLE_REPLICA => Some(Role::Replica),
            _ => None,
        }
    }

    fn store_role(&self, role: Option<Role>) {
        let code = role_code(role);
        self.role.store(code, Relaxed);
        self.metrics.set_role(usize::from(code));
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
            || s.role == RoleRequirement::Primary
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
    /// The backend writes go to (role-aware pools), kept while it is down so
    /// that a returning old primary cannot take over from it.
    primary: Option<Arc<Backend>>,
    /// Backends claiming primary when the conflict was last reported.
    conflict: Vec<String>,
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
        if ctl
            .primary
            .as_ref()
            .is_some_and(|p| self.generation.load().member(p).is_none())
        {
            ctl.primary = None;
        }
        self.recompute(&mut ctl);
        gone
    }

    /// Backends claiming primary that the pool refuses to route to.
    pub fn conflicts(&self) -> i64 {
        self.metrics.conflicts.get()
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
    pub fn observe_check(
        &self,
        backend: &Arc<Backend>,
        result: Result<(SocketAddr, Option<Role>), String>,
    ) {
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
        if let Ok((addr, _)) = &result {
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
        let role_change = match &result {
            Ok((_, role)) => tracker.observe_role(*role, hc.rise),
            Err(_) => None,
        };
        if let Some(role) = role_change {
            let name = |r: Option<Role>| r.map_or("unknown", Role::as_str);
            let before = backend.role();
            backend.store_role(role);
            if before.is_some() || role.is_some() {
                info!(
                    "pool {}: backend {} reports role {} (was {})",
                    self.name,
                    backend.address,
                    name(role),
                    name(before)
                );
            }
            changed = true;
        }
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
        if now == Health::Down {
            // Its next answer decides its role afresh.
            lock(&backend.tracker).clear_role();
            backend.store_role(None);
        }
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
        let eligible = self.eligible(&generation, ctl);
        let serving: Vec<usize> = match generation.settings.mode {
            Mode::ActiveActive => self.recompute_active_active(&generation, ctl, &eligible),
            Mode::ActivePassive => self
                .recompute_active_passive(&generation, ctl, &eligible)
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

    /// Which members may serve, by index: up, and for role-aware pools
    /// reporting the role the pool needs.
    fn eligible(&self, generation: &Generation, ctl: &mut Control) -> Vec<bool> {
        let settings = &generation.settings;
        let with_role = |role: Role| -> Vec<bool> {
            generation
                .members
                .iter()
                .map(|m| m.backend.usable() && m.backend.role() == Some(role))
                .collect()
        };
        let eligible = match settings.role {
            RoleRequirement::Any => generation
                .members
                .iter()
                .map(|m| m.backend.usable())
                .collect(),
            RoleRequirement::Primary => return self.guard_primary(generation, ctl),
            RoleRequirement::Replica => {
                let replicas = with_role(Role::Replica);
                if replicas.contains(&true) || !settings.fallback_to_primary {
                    replicas
                } else {
                    return self.guard_primary(generation, ctl);
                }
            }
        };
        // No primary is chosen here, so no conflict is being refused.
        ctl.conflict.clear();
        self.metrics.conflicts.set(0);
        eligible
    }

    /// The one member writes may go to. With several claiming `primary`
    /// (split brain), keep the one that was primary before, or none when
    /// none of them was: never two.
    fn guard_primary(&self, generation: &Generation, ctl: &mut Control) -> Vec<bool> {
        let claimants: Vec<&Arc<Member>> = generation
            .members
            .iter()
            .filter(|m| m.backend.usable() && m.backend.role() == Some(Role::Primary))
            .collect();
        let chosen = match claimants.as_slice() {
            [] => None,
            [only] => Some(Arc::clone(only)),
            several => several
                .iter()
                .find(|m| {
                    ctl.primary
                        .as_ref()
                        .is_some_and(|p| Arc::ptr_eq(p, &m.backend))
                })
                .map(|m| Arc::clone(m)),
        };
        let names: Vec<String> = if claimants.len() > 1 {
            claimants
                .iter()
                .map(|m| m.backend.address.to_string())
                .collect()
        } else {
            Vec::new()
        };
        if names != ctl.conflict {
            if names.is_empty() {
                info!(
                    "pool {}: split brain over: one backend claims primary",
                    self.name
                );
            } else {
                match &chosen {
                    Some(m) => error!(
                        "pool {}: SPLIT BRAIN: {} all claim to be primary; writes stay on {}, the primary before; fix the others",
                        self.name,
                        names.join(", "),
                        m.backend.address
                    ),
                    None => error!(
                        "pool {}: SPLIT BRAIN: {} all claim to be primary and none was primary before; refusing writes until only one claims it",
                        self.name,
                        names.join(", ")
                    ),
                }
            }
            ctl.conflict = names;
        }
        let refused = claimants.len() - usize::from(chosen.is_some());
        self.metrics
            .conflicts
            .set(i64::try_from(refused).unwrap_or(i64::MAX));
        if let Some(m) = &chosen {
            let previous = ctl.primary.replace(Arc::clone(&m.backend));
            if let Some(old) = previous.filter(|old| !Arc::ptr_eq(old, &m.backend)) {
                // Writes on the node that gave up the role would fail; end them.
                warn!(
                    "pool {}: primary moved from {} to {}; closing connections to {}",
                    self.name, old.address, m.backend.address, old.address
                );
                old.closer.notify_waiters();
            }
        } else if ctl
            .primary
            .as_ref()
            .is_some_and(|old| old.usable() && old.role() != Some(Role::Primary))
        {
            // It stepped down with no successor yet. (A primary that is merely
            // down stays on record, so that it cannot take over from a
            // successor when it returns.)
            if let Some(old) = ctl.primary.take() {
                warn!(
                    "pool {}: {} is no longer primary; closing its connections",
                    self.name, old.address
                );
                old.closer.notify_waiters();
            }
        }
        generation
            .members
            .iter()
            .map(|m| chosen.as_ref().is_some_and(|c| Arc::ptr_eq(c, m)))
            .collect()
    }

    fn recompute_active_active(
        &self,
        generation: &Generation,
        ctl: &mut Control,
        eligible: &[bool],
    ) -> Vec<usize> {
        let up = |backup: bool| -> Vec<usize> {
            generation
                .members
                .iter()
                .filter(|m| m.backup == backup && eligible[m.index])
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
        eligible: &[bool],
    ) -> Option<usize> {
        let settings = &generation.settings;
        let first_up = generation.members.iter().find(|m| eligible[m.index]);
        let current = ctl
            .active
            .as_ref()
            .and_then(|a| generation.member(a))
            .filter(|m| eligible[m.index]);
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
                let prev_qualifies = generation.member(prev).is_some_and(|m| eligible[m.index]);
                if prev.usable() && !prev_qualifies {
                    // Up, but without the role the pool needs (a promotion).
                    self.metrics.failovers.inc();
                    warn!(
                        "pool {}: failover from {} (now {}) to {to}",
                        self.name,
                        prev.address,
                        prev.role().map_or("unknown", Role::as_str)
                    );
                } else if prev.usable() {
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
        if generation.settings.role != RoleRequirement::Any {
            // Only the serving set has the role the pool needs.
            return None;
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
