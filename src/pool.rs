//! A pool of backends at run time: feeds observations to the decision core
//! and carries out what it decides.
//!
//! Every decision (health, who serves, who takes the writes, which sessions
//! close) is made by the pure [`core::step`]. [`Pool::handle`] runs it under
//! the pool's lock and applies its effects: it mirrors the state into plain
//! atomics that the data path reads without a lock (a backend's health and
//! role, a member's serving flag), publishes the serving set to the
//! pingora-load-balancing selector ([`selection`]), updates metrics (which
//! only mirror the state, never drive it), writes the log, and wakes the
//! sessions that must close. Changes that concern other pools (a role seen
//! on a shared address, where the writes go) reach them after the lock is
//! released, through the process-wide [`roles::RoleBook`].
//!
//! When every serving backend refuses a client, [`Pool::pick`] falls back to
//! any other up backend (pools without a role requirement), so one bad
//! connect is never a client-visible failure while something healthy remains.
//!
//! A pool outlives reloads: [`Pool::reconfigure`] swaps in a new
//! [`Generation`] (settings and members) and keeps each [`Backend`] whose
//! address stays, with its health, counters and open connections.

pub mod core;
pub mod roles;
pub mod selection;

#[cfg(test)]
mod proptests;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU8, AtomicU32, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use arc_swap::ArcSwap;
use tokio::sync::{Notify, watch};

use crate::check::Role;
use crate::config::{HostPort, Mode, PoolSettings, RoleRequirement};
use crate::metrics::{BackendMetrics, Metrics, PoolMetrics};
use crate::sys::lock;
pub use core::{AdminState, CloseCause, Health, Key, MoveError};
use core::{Effect, Event, Spec};
use roles::RoleBook;
use selection::Selector;

fn health_from_u8(v: u8) -> Health {
    match v {
        1 => Health::Up,
        2 => Health::Down,
        _ => Health::Unknown,
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
    /// The same, as the decision core names it.
    pub key: Key,
    /// Labelled metric handles.
    pub metrics: BackendMetrics,
    resolved: Mutex<Option<SocketAddr>>,
    health: AtomicU8,
    /// [`role_code`] of the role shown.
    role: AtomicU8,
    /// Whether failed connects are being counted (successes must reset them).
    passive_counting: AtomicBool,
    /// [`AdminState`] as `u8`, mirrored from the decision core.
    admin: AtomicU8,
    /// Connections open or being opened to it (least-connections reads it).
    open: AtomicI64,
    /// Changes each time the pool closes this backend's sessions. A session
    /// subscribes before it connects, so a close decided while it connects
    /// still reaches it.
    closing: watch::Sender<Option<CloseCause>>,
}

/// One connection to a backend, counted while it lives.
pub struct OpenConnection<'a>(&'a Backend);

impl Drop for OpenConnection<'_> {
    fn drop(&mut self) {
        self.0.closed_one();
    }
}

/// One connection or HTTP request to a backend, counted while it lives;
/// it holds the backend, so it can live in per-request state.
pub struct OpenRequest(Arc<Backend>);

impl Drop for OpenRequest {
    fn drop(&mut self) {
        self.0.closed_one();
    }
}

impl Backend {
    fn new(pool: &str, address: &HostPort, metrics: &Metrics) -> Arc<Backend> {
        Arc::new(Backend {
            address: address.clone(),
            key: Arc::from(address.as_str()),
            metrics: metrics.backend(pool, address.as_str()),
            resolved: Mutex::new(address.socket_addr()),
            health: AtomicU8::new(Health::Unknown as u8),
            role: AtomicU8::new(ROLE_UNKNOWN),
            passive_counting: AtomicBool::new(false),
            admin: AtomicU8::new(AdminState::Ready as u8),
            open: AtomicI64::new(0),
            closing: watch::Sender::new(None),
        })
    }

    /// Current health.
    pub fn health(&self) -> Health {
        health_from_u8(self.health.load(Relaxed))
    }

    /// The role it reports, when its check tells one and it is up.
    pub fn role(&self) -> Option<Role> {
        match self.role.load(Relaxed) {
            ROLE_PRIMARY => Some(Role::Primary),
            ROLE_REPLICA => Some(Role::Replica),
            _ => None,
        }
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

    /// The operator's state.
    pub fn admin_state(&self) -> AdminState {
        match self.admin.load(Relaxed) {
            1 => AdminState::Drain,
            2 => AdminState::Maint,
            _ => AdminState::Ready,
        }
    }

    /// The operator's state as shown: `drained` once a draining backend
    /// has no connection left.
    pub fn admin_label(&self) -> &'static str {
        match self.admin_state() {
            AdminState::Drain if self.open_connections() <= 0 => "drained",
            other => other.as_str(),
        }
    }

    fn show_admin(&self) {
        let label = self.admin_label();
        let index = crate::metrics::ADMIN_LABELS
            .iter()
            .position(|l| *l == label)
            .unwrap_or(0);
        self.metrics.set_admin(index);
    }

    /// Connections open or being opened to it.
    pub fn open_connections(&self) -> i64 {
        self.open.load(Relaxed)
    }

    /// Watch for the pool closing this backend's sessions: the receiver
    /// sees every close from now on.
    pub fn watch_closing(&self) -> watch::Receiver<Option<CloseCause>> {
        self.closing.subscribe()
    }

    /// Why its sessions were last told to close, if ever.
    pub fn last_close_cause(&self) -> Option<CloseCause> {
        *self.closing.borrow()
    }

    /// Close every session to it that watches.
    pub fn close_sessions(&self, cause: CloseCause) {
        self.closing.send_replace(Some(cause));
    }

    /// Count a connection (being opened) until the guard drops.
    pub fn open_connection(&self) -> OpenConnection<'_> {
        self.open.fetch_add(1, Relaxed);
        self.metrics.connections_active.inc();
        OpenConnection(self)
    }

    /// Count an HTTP request to it until the guard drops (in HTTP mode,
    /// requests in flight are what least_connections and drain count).
    pub fn open_request(self: &Arc<Self>) -> OpenRequest {
        self.open.fetch_add(1, Relaxed);
        self.metrics.connections_active.inc();
        OpenRequest(Arc::clone(self))
    }

    fn closed_one(&self) {
        let left = self.open.fetch_sub(1, Relaxed) - 1;
        self.metrics.connections_active.dec();
        if left == 0 && self.admin.load(Relaxed) == AdminState::Drain as u8 {
            // The last one of a draining backend: shown as drained now.
            self.show_admin();
        }
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
    /// The same, as the decision core reads them.
    pub spec: Spec,
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

    fn member_by_key(&self, key: &str) -> Option<&Arc<Member>> {
        self.members.iter().find(|m| &*m.backend.key == key)
    }

    /// Whether selection needs the client address.
    pub fn needs_client_key(&self) -> bool {
        self.settings.algorithm == crate::config::Algorithm::SourceHash
            && self.settings.mode == Mode::ActiveActive
    }
}

/// A pool of backends.
pub struct Pool {
    /// The pool's name.
    pub name: String,
    metrics: PoolMetrics,
    generation: ArcSwap<Generation>,
    core: Mutex<core::State>,
    roles: Arc<RoleBook>,
    ready: AtomicBool,
    ready_notify: Notify,
    conflicts: AtomicU32,
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
        spec: Spec::of(settings),
        members,
        selector: Selector::new(settings.algorithm),
    }
}

/// What a step leaves to do once the pool's lock is released.
#[derive(Default)]
struct After {
    writes: Option<Option<Key>>,
}

impl Pool {
    /// A pool for `settings`; every backend starts `unknown` and nothing
    /// serves until health checks report. `roles` is the process's role view.
    pub fn new(settings: &PoolSettings, metrics: &Metrics, roles: &Arc<RoleBook>) -> Arc<Pool> {
        let generation = generation(settings, metrics, &HashMap::new());
        let pool = Arc::new(Pool {
            name: settings.name.clone(),
            metrics: metrics.pool(&settings.name),
            core: Mutex::new(core::State::new(&generation.spec)),
            generation: ArcSwap::from_pointee(generation),
            roles: Arc::clone(roles),
            ready: AtomicBool::new(false),
            ready_notify: Notify::new(),
            conflicts: AtomicU32::new(0),
        });
        roles.register(&pool);
        pool.adopt_shared_view();
        pool
    }

    /// The current settings and members.
    pub fn generation(&self) -> Arc<Generation> {
        self.generation.load_full()
    }

    /// Run the decision core on `event` and carry out its effects.
    fn handle(&self, event: Event) {
        let after = {
            let mut state = lock(&self.core);
            let generation = self.generation.load_full();
            self.step(&mut state, &generation, event)
        };
        self.finish(after);
    }

    /// One step under the lock: the core decides, the effects are mirrored.
    fn step(&self, state: &mut core::State, generation: &Generation, event: Event) -> After {
        let (next, effects) = core::step(
            &self.name,
            &generation.spec,
            std::mem::take(state),
            event,
            Instant::now(),
        );
        *state = next;
        let mut after = After::default();
        for effect in effects {
            self.apply(generation, effect, &mut after);
        }
        after
    }

    fn apply(&self, generation: &Generation, effect: Effect, after: &mut After) {
        let backend = |key: &str| generation.member_by_key(key).map(|m| &m.backend);
        match effect {
            Effect::Log(level, line) => log::log!(level, "{line}"),
            Effect::Health {
                key,
                health,
                transition,
            } => {
                if let Some(b) = backend(&key) {
                    b.health.store(health as u8, Relaxed);
                    b.metrics.up.set(i64::from(health == Health::Up));
                    if transition {
                        match health {
                            Health::Up => b.metrics.to_up.inc(),
                            Health::Down => b.metrics.to_down.inc(),
                            Health::Unknown => {}
                        }
                    }
                }
            }
            Effect::Role { key, role } => {
                if let Some(b) = backend(&key) {
                    let code = role_code(role);
                    b.role.store(code, Relaxed);
                    b.metrics.set_role(usize::from(code));
                }
            }
            Effect::Serving(serving) => {
                for m in &generation.members {
                    let on = serving.iter().any(|(k, _, _)| *k == m.backend.key);
                    m.serving.store(on, Relaxed);
                    m.backend.metrics.active.set(i64::from(on));
                }
                generation.selector.publish(
                    serving
                        .iter()
                        .filter_map(|(k, addr, weight)| {
                            generation
                                .member_by_key(k)
                                .map(|m| (*addr, Arc::clone(m), *weight))
                        })
                        .collect(),
                );
            }
            Effect::Admin { key, state } => {
                if let Some(b) = backend(&key) {
                    b.admin.store(state as u8, Relaxed);
                    b.show_admin();
                }
            }
            Effect::CloseLater { key, after } => {
                if let Some(b) = backend(&key) {
                    let b = Arc::clone(b);
                    // Sessions that outlast the grace are closed, unless the
                    // backend is back in rotation by then.
                    let close = async move {
                        tokio::time::sleep(after).await;
                        if b.admin_state() == AdminState::Maint {
                            b.close_sessions(CloseCause::Maintenance);
                        }
                    };
                    match tokio::runtime::Handle::try_current() {
                        Ok(handle) => {
                            handle.spawn(close);
                        }
                        Err(_) => {
                            std::thread::spawn(move || {
                                if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                                    .enable_time()
                                    .build()
                                {
                                    rt.block_on(close);
                                }
                            });
                        }
                    }
                }
            }
            Effect::Close { key, cause } => {
                if let Some(b) = backend(&key) {
                    b.close_sessions(cause);
                }
            }
            Effect::Failover => self.metrics.failovers.inc(),
            Effect::Conflicts(n) => {
                self.conflicts.store(n, Relaxed);
                self.metrics.conflicts.set(i64::from(n));
            }
            Effect::Writes(to) => after.writes = Some(to),
            Effect::Ready => {
                self.ready.store(true, Relaxed);
                self.ready_notify.notify_waiters();
            }
            Effect::Passive { key, counting } => {
                if let Some(b) = backend(&key) {
                    b.passive_counting.store(counting, Relaxed);
                }
            }
        }
    }

    /// What a step left for after the lock: tell the read pools that follow
    /// this pool's writes.
    fn finish(&self, after: After) {
        let Some(to) = after.writes else {
            return;
        };
        let members: Vec<Key> = self
            .generation()
            .members
            .iter()
            .map(|m| Arc::clone(&m.backend.key))
            .collect();
        self.roles.set_writes(&self.name, members, to);
        for pool in self.roles.pools() {
            if !std::ptr::eq(&*pool, self) && pool.follows_writes() {
                pool.refresh_follow();
            }
        }
    }

    fn follows_writes(&self) -> bool {
        let s = &self.generation().settings;
        s.role == RoleRequirement::Replica && s.fallback_to_primary
    }

    /// Look up whom this read pool follows again.
    fn refresh_follow(&self) {
        if !self.follows_writes() {
            return;
        }
        let after = {
            let mut state = lock(&self.core);
            let generation = self.generation.load_full();
            let keys: Vec<Key> = generation
                .spec
                .members
                .iter()
                .map(|m| Arc::clone(&m.key))
                .collect();
            let follow = self.roles.follow(&self.name, &keys);
            if state.follow == follow {
                return;
            }
            self.step(&mut state, &generation, Event::Follow(follow))
        };
        self.finish(after);
    }

    /// Take the roles the process already knows for this pool's members,
    /// and whom to follow.
    fn adopt_shared_view(&self) {
        let generation = self.generation();
        for m in &generation.members {
            let role = self.roles.role(&m.backend.key);
            if role.is_some() {
                self.handle(Event::Role {
                    key: Arc::clone(&m.backend.key),
                    role,
                });
            }
        }
        self.refresh_follow();
    }

    /// Apply new settings, keeping every backend whose address stays (with
    /// its health, counters and connections). Returns the backends that left.
    pub fn reconfigure(&self, settings: &PoolSettings, metrics: &Metrics) -> Vec<Arc<Backend>> {
        let (gone, after) = {
            let mut state = lock(&self.core);
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
            let next = Arc::new(generation(settings, metrics, &keep));
            let gone = old
                .members
                .iter()
                .filter(|m| next.member(&m.backend).is_none())
                .map(|m| Arc::clone(&m.backend))
                .collect();
            self.generation.store(Arc::clone(&next));
            let after = self.step(&mut state, &next, Event::Reconfigured);
            (gone, after)
        };
        self.finish(after);
        if settings.role != RoleRequirement::Primary {
            self.roles.forget_writes(&self.name);
            for pool in self.roles.pools() {
                pool.refresh_follow();
            }
        }
        self.adopt_shared_view();
        gone
    }

    /// The pool left the configuration: it decides nothing for others any
    /// more, and nobody waits for its first round.
    pub fn retire(&self) {
        self.roles.forget(self);
        for pool in self.roles.pools() {
            pool.refresh_follow();
        }
        self.ready.store(true, Relaxed);
        self.ready_notify.notify_waiters();
    }

    /// Backends claiming primary that the pool refuses to route to.
    pub fn conflicts(&self) -> i64 {
        i64::from(self.conflicts.load(Relaxed))
    }

    /// Whether the first health-check round has finished.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Relaxed)
    }

    /// Record that a health-check round has finished: after the first,
    /// the pool is ready; after each, hold times may have run out.
    pub fn round_done(&self) {
        let event = if self.is_ready() {
            Event::Tick
        } else {
            Event::FirstRoundDone
        };
        self.handle(event);
    }

    /// Wait until the first health-check round has finished.
    pub async fn wait_ready(&self) {
        loop {
            let notified = self.ready_notify.notified();
            if self.is_ready() {
                return;
            }
            notified.await;
        }
    }

    /// Record an active check result for `backend`: `Ok` with the address it
    /// resolved to and the role it reported, or `Err` with the reason.
    pub fn observe_check(
        &self,
        backend: &Arc<Backend>,
        result: Result<(SocketAddr, Option<Role>), String>,
    ) {
        let generation = self.generation();
        let hc = &generation.settings.health_check;
        match &result {
            Ok(_) => backend.metrics.checks_success.inc(),
            Err(_) => backend.metrics.checks_failure.inc(),
        }
        let key = Arc::clone(&backend.key);
        let mut role_changed = false;
        let role = match &result {
            Ok((addr, reported)) if hc.kind.reports_role() => {
                *lock(&backend.resolved) = Some(*addr);
                let (before, role) = self.roles.observe(&self.name, &key, *reported, hc.rise);
                if before != role {
                    let name = |r: Option<Role>| r.map_or("unknown", Role::as_str);
                    log::info!(
                        "pool {}: backend {} reports role {} (was {})",
                        self.name,
                        key,
                        name(role),
                        name(before)
                    );
                    role_changed = true;
                }
                role
            }
            Ok((addr, _)) => {
                *lock(&backend.resolved) = Some(*addr);
                self.roles.role(&key)
            }
            Err(_) => self.roles.role(&key),
        };
        self.handle(Event::Check {
            key: Arc::clone(&key),
            result: result.map(|(addr, _)| addr),
            role,
        });
        if role_changed {
            for pool in self.roles.pools() {
                if !std::ptr::eq(&*pool, self) {
                    pool.role_changed(&key, role);
                }
            }
        }
    }

    /// The role view changed for `key` (another pool's check).
    fn role_changed(&self, key: &Key, role: Option<Role>) {
        if self.generation().member_by_key(key).is_some() {
            self.handle(Event::Role {
                key: Arc::clone(key),
                role,
            });
        }
    }

    /// Record the outcome of a real connect to `backend` (passive health).
    /// Count one failure per client, however many times it retried this
    /// backend; `fall` failures in a row mark an up backend down at once,
    /// unless it is the pool's last healthy one. The active checks bring
    /// it back.
    pub fn observe_connect(
        &self,
        backend: &Arc<Backend>,
        ok: bool,
        reason: &dyn std::fmt::Display,
    ) {
        let key = Arc::clone(&backend.key);
        if ok {
            // The common case costs one load.
            if backend.passive_counting.load(Relaxed) {
                self.handle(Event::ConnectSucceeded { key });
            }
            return;
        }
        if !self.generation().settings.health_check.passive {
            return;
        }
        self.handle(Event::ConnectFailed {
            key,
            reason: reason.to_string(),
        });
    }

    /// Set the operator's state of `backend` (a configured address); for
    /// `maint`, established sessions close after `grace`.
    pub fn set_admin_state(
        &self,
        backend: &str,
        state: AdminState,
        grace: std::time::Duration,
    ) -> Result<(), MoveError> {
        let key = self.key_of(backend)?;
        self.handle(Event::Admin { key, state, grace });
        Ok(())
    }

    /// Set `backend`'s weight at run time (`None`: the configured one).
    pub fn set_weight(&self, backend: &str, weight: Option<u32>) -> Result<(), MoveError> {
        let key = self.key_of(backend)?;
        self.handle(Event::Weight { key, weight });
        Ok(())
    }

    fn key_of(&self, backend: &str) -> Result<Key, MoveError> {
        self.generation()
            .member_by_key(backend)
            .map(|m| Arc::clone(&m.backend.key))
            .ok_or_else(|| MoveError::UnknownBackend {
                pool: self.name.clone(),
                backend: backend.to_string(),
            })
    }

    /// The weight in force for `backend` (the operator's, or the configured one).
    pub fn weight_of(&self, member: &Member) -> u32 {
        crate::sys::lock(&self.core)
            .backend(&member.backend.key)
            .and_then(|b| b.weight)
            .unwrap_or(member.weight)
    }

    /// Make `backend` (a configured address) the active one of a
    /// `failback: manual` active_passive pool.
    pub fn make_active(&self, backend: &str) -> Result<(), MoveError> {
        let after = {
            let mut state = lock(&self.core);
            let generation = self.generation.load_full();
            core::check_make_active(&self.name, &generation.spec, &state, backend)?;
            let key = Arc::clone(
                &generation
                    .member_by_key(backend)
                    .ok_or_else(|| MoveError::UnknownBackend {
                        pool: self.name.clone(),
                        backend: backend.to_string(),
                    })?
                    .backend
                    .key,
            );
            self.step(&mut state, &generation, Event::MakeActive { key })
        };
        self.finish(after);
        Ok(())
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
            if !tried.contains(&m.backend.id())
                && m.backend.usable()
                && m.backend.admin_state() == AdminState::Ready
            {
                if let Some(addr) = m.backend.resolved() {
                    return Some((Arc::clone(m), addr));
                }
            }
        }
        None
    }

    /// A copy of the decision core's state (for tests and the admin API).
    pub fn state(&self) -> core::State {
        lock(&self.core).clone()
    }
}

#[cfg(test)]
impl Pool {
    /// Put backend `index` in state `health` directly, through the core:
    /// as many results as it takes.
    fn force(&self, index: usize, health: Health) {
        let backend = Arc::clone(&self.generation.load().members[index].backend);
        let addr = backend
            .resolved()
            .unwrap_or_else(|| "127.0.0.1:1".parse().unwrap());
        let spec = self.generation().spec.clone();
        let ok = health == Health::Up;
        for _ in 0..spec.rise.max(spec.fall).max(1) {
            if backend.health() == health {
                break;
            }
            self.observe_check(
                &backend,
                if ok {
                    Ok((addr, self.roles.role(&backend.key)))
                } else {
                    Err("forced down".to_string())
                },
            );
        }
    }

    fn backend(&self, index: usize) -> Arc<Backend> {
        Arc::clone(&self.generation.load().members[index].backend)
    }
}

#[cfg(test)]
mod tests;
