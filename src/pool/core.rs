//! The pool's decision core: one pure function, [`step`], from an
//! observation and the previous [`State`] to the next state and the
//! [`Effect`]s to carry out.
//!
//! Everything a pool decides is decided here: rise/fall of active checks,
//! passive health, who serves (active-active tiers, active-passive with
//! failback, operator moves), which backend takes the writes of a
//! role-aware pool (the split-brain guard and its hold time), and which
//! sessions must close. Nothing here touches a socket, a clock, a lock, a
//! metric or the log: time comes in as an argument, and logging, metrics,
//! publishing the serving set and closing sessions are effects that
//! [`super::Pool`] applies after each step. That keeps every decision
//! testable without sockets or time (see `pool/proptests.rs`).
//!
//! # Writes: who may take them
//!
//! A role-aware pool that needs the primary (`role: primary`, or a read
//! pool falling back to it) gives the writes to one backend, the *holder*:
//! - the first backend seen claiming primary while nobody holds them takes
//!   them at once (start-up, or a real failover: the old primary gone
//!   before the new one claims);
//! - a backend seen claiming primary while another held the writes is
//!   *refused*: it gets them only once it has been the sole claimant for
//!   `primary_hold`; if the holder comes back claiming within that time,
//!   the writes stay with it or return to it;
//! - a holder that reports `replica` stepped down (a planned switchover):
//!   refusals are forgotten and the next sole claimant takes over at once;
//! - several claimants with no holder among them and none that may take
//!   over: writes are refused. Never two.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::Level;

use crate::check::Role;
use crate::config::{Failback, Mode, PoolSettings, RoleRequirement, SessionPolicy};

/// A backend's identity within a pool: its address as configured.
pub type Key = Arc<str>;

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
    /// Lower-case name, as shown by the admin API.
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Unknown => "unknown",
            Health::Up => "up",
            Health::Down => "down",
        }
    }
}

/// The settings the core decides by.
#[derive(Clone, Debug, PartialEq)]
pub struct Spec {
    /// active_active or active_passive.
    pub mode: Mode,
    /// active_passive: whether traffic returns to an earlier backend.
    pub failback: Failback,
    /// The role a backend needs to serve.
    pub role: RoleRequirement,
    /// `role: replica`: reads go to the primary while no replica is up.
    pub fallback_to_primary: bool,
    /// Successes in a row that mark a backend up.
    pub rise: u32,
    /// Failures in a row that mark a backend down.
    pub fall: u32,
    /// Whether failed connects of real traffic count.
    pub passive: bool,
    /// Sessions of a backend marked down.
    pub on_backend_down: SessionPolicy,
    /// Sessions of a standby when traffic fails back.
    pub on_failback: SessionPolicy,
    /// How long a refused claimant must be the only one claiming primary.
    pub primary_hold: Duration,
    /// Members in configured order.
    pub members: Vec<MemberSpec>,
}

/// One member as the core sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemberSpec {
    /// Its address as configured.
    pub key: Key,
    /// Serves only while no non-backup backend is up.
    pub backup: bool,
    /// Its configured share of connections.
    pub weight: u32,
}

/// What an operator says about a backend, beside what checks say.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AdminState {
    /// In rotation when healthy.
    #[default]
    Ready,
    /// No new connections; established ones run to their end.
    Drain,
    /// No new connections; established ones are closed (after a grace).
    Maint,
}

impl AdminState {
    /// The name used by the API and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            AdminState::Ready => "ready",
            AdminState::Drain => "drain",
            AdminState::Maint => "maint",
        }
    }
}

impl Spec {
    /// The core's view of `settings`.
    pub fn of(settings: &PoolSettings) -> Spec {
        let hc = &settings.health_check;
        Spec {
            mode: settings.mode,
            failback: settings.failback,
            role: settings.role,
            fallback_to_primary: settings.fallback_to_primary,
            rise: hc.rise,
            fall: hc.fall,
            passive: hc.passive,
            on_backend_down: settings.on_backend_down,
            on_failback: settings.on_failback,
            primary_hold: settings.primary_hold,
            members: settings
                .backends
                .iter()
                .map(|b| MemberSpec {
                    key: Arc::from(b.address.as_str()),
                    backup: b.backup,
                    weight: b.weight,
                })
                .collect(),
        }
    }
}

/// One backend's state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendState {
    /// Its address as configured.
    pub key: Key,
    /// What the checks say.
    pub health: Health,
    successes: u32,
    failures: u32,
    /// The role the process-wide role view holds for this address.
    pub role: Option<Role>,
    /// Where it resolved at the last successful check.
    pub addr: Option<SocketAddr>,
    /// Failed connects of real traffic since the last success.
    pub passive_failures: u32,
    /// The operator's state (kept across reloads while the backend stays).
    pub admin: AdminState,
    /// A weight an operator set at run time, over the configured one.
    pub weight: Option<u32>,
    /// The configured weight the override was set against: a reload that
    /// changes it drops the override.
    configured_weight: u32,
}

impl BackendState {
    fn new(key: Key) -> Self {
        BackendState {
            key,
            health: Health::Unknown,
            successes: 0,
            failures: 0,
            role: None,
            addr: None,
            passive_failures: 0,
            admin: AdminState::Ready,
            weight: None,
            configured_weight: 0,
        }
    }

    /// Up, with an address to connect to.
    pub fn usable(&self) -> bool {
        self.health == Health::Up && self.addr.is_some()
    }

    /// Usable, and in rotation by the operator's say.
    pub fn in_rotation(&self) -> bool {
        self.usable() && self.admin == AdminState::Ready
    }

    /// The role shown for it: none while it is not up.
    pub fn shown_role(&self) -> Option<Role> {
        self.role.filter(|_| self.health == Health::Up)
    }

    fn claims_primary(&self) -> bool {
        self.usable() && self.role == Some(Role::Primary)
    }
}

/// The tier serving an active_active pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Tier {
    Primary,
    Backup,
}

/// A claimant refused the writes, and since when it has been the only one
/// claiming primary.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Refused {
    key: Key,
    sole_since: Option<Instant>,
}

/// Everything a pool has decided.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct State {
    /// Backends in configured order.
    pub backends: Vec<BackendState>,
    /// active_passive: the serving backend.
    pub active: Option<Key>,
    /// The last serving backend (active_passive) or tier (active_active),
    /// kept across an outage so that recovering elsewhere counts as a failover.
    last_active: Option<Key>,
    last_tier: Option<Tier>,
    /// The backend the writes were last given to, kept while it is down.
    pub holder: Option<Key>,
    refused: Vec<Refused>,
    /// Claimants when a conflict was last reported (to log changes only).
    conflict: Vec<Key>,
    /// Why writes are refused, as last logged.
    writes_note: Option<String>,
    /// Claimants refused the writes now.
    pub conflicts: u32,
    /// Where the writes go now, as this pool decided (role-aware pools).
    pub writes: Option<Key>,
    /// A read pool over addresses a write pool decides for follows that
    /// pool: `Some(where its writes go)`. `None`: decide here.
    pub follow: Option<Option<Key>>,
    /// Who takes new connections, with the address to connect to and
    /// the weight in force.
    pub serving: Vec<(Key, SocketAddr, u32)>,
    /// Whether the first health-check round has finished.
    pub ready: bool,
    reported_empty: bool,
}

impl State {
    /// The initial state for `spec`.
    pub fn new(spec: &Spec) -> State {
        State {
            backends: spec
                .members
                .iter()
                .map(|m| BackendState::new(Arc::clone(&m.key)))
                .collect(),
            ..State::default()
        }
    }

    /// The backend with address `key`.
    pub fn backend(&self, key: &str) -> Option<&BackendState> {
        self.backends.iter().find(|b| &*b.key == key)
    }

    fn backend_mut(&mut self, key: &str) -> Option<&mut BackendState> {
        self.backends.iter_mut().find(|b| &*b.key == key)
    }

    fn usable(&self, key: &str) -> bool {
        self.backend(key).is_some_and(BackendState::usable)
    }

    /// Whether `key` is refused the writes.
    pub fn is_refused(&self, key: &str) -> bool {
        self.refused.iter().any(|r| &*r.key == key)
    }
}

/// Why sessions are closed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseCause {
    /// Its backend was marked down (`on_backend_down: close`).
    BackendDown,
    /// Traffic failed back to an earlier backend (`on_failback: close`).
    Failback,
    /// The backend no longer takes the writes.
    PrimaryMoved,
    /// An operator put the backend in maintenance.
    Maintenance,
}

/// One observation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// An active check's result; `role` is the role view's role for the
    /// address after it.
    Check {
        /// The backend.
        key: Key,
        /// The address it resolved to, or why the check failed.
        result: Result<SocketAddr, String>,
        /// The role view's role.
        role: Option<Role>,
    },
    /// The role view changed for `key` (another pool's check).
    Role {
        /// The backend.
        key: Key,
        /// The role now.
        role: Option<Role>,
    },
    /// A client's connect to `key` failed (counted once per client).
    ConnectFailed {
        /// The backend.
        key: Key,
        /// Why.
        reason: String,
    },
    /// A client connected to `key`.
    ConnectSucceeded {
        /// The backend.
        key: Key,
    },
    /// An operator moved traffic to `key` (checked by [`check_make_active`]).
    MakeActive {
        /// The backend.
        key: Key,
    },
    /// Where the writes of the pool this one follows go now.
    Follow(Option<Option<Key>>),
    /// An operator set a backend's state; for `maint`, established
    /// sessions close after `grace`.
    Admin {
        /// The backend.
        key: Key,
        /// Its state now.
        state: AdminState,
        /// Maintenance: how long established sessions may run on.
        grace: Duration,
    },
    /// An operator set a backend's weight (`None`: back to the configured one).
    Weight {
        /// The backend.
        key: Key,
        /// The weight.
        weight: Option<u32>,
    },
    /// The first health-check round ended.
    FirstRoundDone,
    /// The spec changed (reload): members may have come and gone.
    Reconfigured,
    /// Time passed (hold times may have run out).
    Tick,
}

/// Something to carry out after a step.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Effect {
    /// A log line.
    Log(Level, String),
    /// A backend's health changed; `transition` when it is a change between
    /// two known states (counted), not the first result.
    Health {
        /// The backend.
        key: Key,
        /// Its health now.
        health: Health,
        /// Counted as a state change.
        transition: bool,
    },
    /// The role to show for a backend.
    Role {
        /// The backend.
        key: Key,
        /// Its role, none while not up.
        role: Option<Role>,
    },
    /// The serving set changed.
    Serving(Vec<(Key, SocketAddr, u32)>),
    /// Close the open sessions to a backend.
    Close {
        /// The backend.
        key: Key,
        /// Why.
        cause: CloseCause,
    },
    /// Close the open sessions to a backend once `after` has passed (unless
    /// it is back in rotation by then).
    CloseLater {
        /// The backend.
        key: Key,
        /// The grace.
        after: Duration,
    },
    /// A backend's operator state changed.
    Admin {
        /// The backend.
        key: Key,
        /// Its state now.
        state: AdminState,
    },
    /// Traffic moved off a failed backend or tier.
    Failover,
    /// Claimants refused the writes now.
    Conflicts(u32),
    /// Where this pool's writes go changed.
    Writes(Option<Key>),
    /// The first round ended.
    Ready,
    /// Whether failed connects are being counted for a backend (so that
    /// successes, the common case, can skip the core when none are).
    Passive {
        /// The backend.
        key: Key,
        /// Failures are counted.
        counting: bool,
    },
}

/// Why an operator's request to move traffic was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MoveError {
    /// The pool does not pick one active backend.
    #[error("pool `{0}` is active_active; only active_passive pools have one active backend")]
    NotActivePassive(String),
    /// With automatic failback the first healthy backend always serves.
    #[error("pool `{0}` has failback: auto; only failback: manual pools can be moved")]
    AutoFailback(String),
    /// No such backend in the pool.
    #[error("pool `{pool}` has no backend `{backend}`")]
    UnknownBackend {
        /// The pool.
        pool: String,
        /// The address asked for.
        backend: String,
    },
    /// The backend cannot take traffic now.
    #[error("backend `{0}` is not up")]
    NotUp(String),
}

/// Whether an operator may make `key` the active backend of pool `name`.
pub fn check_make_active(
    name: &str,
    spec: &Spec,
    state: &State,
    key: &str,
) -> Result<(), MoveError> {
    if spec.mode != Mode::ActivePassive {
        return Err(MoveError::NotActivePassive(name.to_string()));
    }
    if spec.failback == Failback::Auto {
        return Err(MoveError::AutoFailback(name.to_string()));
    }
    let b = state
        .backend(key)
        .ok_or_else(|| MoveError::UnknownBackend {
            pool: name.to_string(),
            backend: key.to_string(),
        })?;
    if !b.in_rotation() {
        return Err(MoveError::NotUp(key.to_string()));
    }
    Ok(())
}

/// Apply one event: the next state and what to carry out. `now` only
/// matters for hold times; `name` only for log lines.
pub fn step(
    name: &str,
    spec: &Spec,
    mut state: State,
    event: Event,
    now: Instant,
) -> (State, Vec<Effect>) {
    let mut fx = Vec::new();
    match event {
        Event::Check { key, result, role } => {
            observe_check(name, spec, &mut state, &key, result, role, &mut fx)
        }
        Event::Role { key, role } => {
            if let Some(b) = state.backend_mut(&key) {
                if b.role != role {
                    b.role = role;
                    fx.push(Effect::Role {
                        key,
                        role: b.shown_role(),
                    });
                }
            }
        }
        Event::ConnectFailed { key, reason } => {
            connect_failed(name, spec, &mut state, &key, &reason, &mut fx)
        }
        Event::ConnectSucceeded { key } => {
            if let Some(b) = state.backend_mut(&key) {
                if b.passive_failures != 0 {
                    b.passive_failures = 0;
                    fx.push(Effect::Passive {
                        key,
                        counting: false,
                    });
                }
            }
        }
        Event::MakeActive { key } => {
            if check_make_active(name, spec, &state, &key).is_ok()
                && state.active.as_deref() != Some(&*key)
            {
                fx.push(Effect::Log(
                    Level::Info,
                    format!("pool {name}: operator made {key} the active backend"),
                ));
                state.active = Some(key);
            }
        }
        Event::Follow(follow) => state.follow = follow,
        Event::Admin {
            key,
            state: to,
            grace,
        } => {
            if let Some(b) = state.backend_mut(&key) {
                if b.admin != to {
                    let was = b.admin;
                    b.admin = to;
                    fx.push(Effect::Admin {
                        key: Arc::clone(&key),
                        state: to,
                    });
                    fx.push(Effect::Log(
                        Level::Info,
                        format!(
                            "pool {name}: operator set backend {key} to {} (was {})",
                            to.as_str(),
                            was.as_str()
                        ),
                    ));
                }
                if to == AdminState::Maint {
                    fx.push(if grace.is_zero() {
                        Effect::Close {
                            key,
                            cause: CloseCause::Maintenance,
                        }
                    } else {
                        Effect::CloseLater { key, after: grace }
                    });
                }
            }
        }
        Event::Weight { key, weight } => {
            let configured = spec
                .members
                .iter()
                .find(|m| m.key == key)
                .map_or(1, |m| m.weight);
            if let Some(b) = state.backend_mut(&key) {
                b.weight = weight;
                b.configured_weight = configured;
                fx.push(Effect::Log(
                    Level::Info,
                    format!(
                        "pool {name}: operator set backend {key}'s weight to {}",
                        weight.map_or_else(
                            || format!("the configured {configured}"),
                            |w| w.to_string()
                        )
                    ),
                ));
            }
        }
        Event::FirstRoundDone => {
            if !state.ready {
                state.ready = true;
                fx.push(Effect::Ready);
                if state.serving.is_empty() {
                    fx.push(Effect::Log(
                        Level::Error,
                        format!("pool {name}: no backend is available; clients are refused"),
                    ));
                    state.reported_empty = true;
                }
            }
        }
        Event::Reconfigured => reconfigure(spec, &mut state, &mut fx),
        Event::Tick => {}
    }
    decide(name, spec, &mut state, now, &mut fx);
    (state, fx)
}

/// Keep the state of members that stay, start new ones unknown.
fn reconfigure(spec: &Spec, state: &mut State, fx: &mut Vec<Effect>) {
    let mut old = std::mem::take(&mut state.backends);
    state.backends = spec
        .members
        .iter()
        .map(|m| match old.iter().position(|b| b.key == m.key) {
            Some(i) => {
                let mut b = old.swap_remove(i);
                // A weight set at run time yields to a newly configured one.
                if b.weight.is_some() && b.configured_weight != m.weight {
                    b.weight = None;
                }
                b
            }
            None => BackendState::new(Arc::clone(&m.key)),
        })
        .collect();
    let member = |k: &Option<Key>| {
        k.as_ref()
            .is_some_and(|k| spec.members.iter().any(|m| &m.key == k))
    };
    if !member(&state.active) {
        state.active = None;
    }
    if !member(&state.last_active) {
        state.last_active = None;
    }
    if !member(&state.holder) {
        state.holder = None;
    }
    state
        .refused
        .retain(|r| spec.members.iter().any(|m| m.key == r.key));
    // A new selector starts empty: publish afresh.
    state.serving.clear();
    fx.push(Effect::Serving(Vec::new()));
}

fn observe_check(
    name: &str,
    spec: &Spec,
    state: &mut State,
    key: &Key,
    result: Result<SocketAddr, String>,
    role: Option<Role>,
    fx: &mut Vec<Effect>,
) {
    let Some(b) = state.backend_mut(key) else {
        return;
    };
    let ok = result.is_ok();
    if let Ok(addr) = &result {
        if let Some(old) = b.addr.filter(|old| old != addr) {
            fx.push(Effect::Log(
                Level::Info,
                format!("pool {name}: backend {key} now resolves to {addr} (was {old})"),
            ));
        }
        b.addr = Some(*addr);
    }
    if ok {
        b.successes = b.successes.saturating_add(1);
        b.failures = 0;
    } else {
        b.failures = b.failures.saturating_add(1);
        b.successes = 0;
    }
    let was = b.health;
    let next = match was {
        Health::Unknown if ok => Health::Up,
        Health::Unknown => Health::Down,
        Health::Up if !ok && b.failures >= spec.fall => Health::Down,
        Health::Down if ok && b.successes >= spec.rise => Health::Up,
        same => same,
    };
    let shown = b.shown_role();
    if ok {
        b.role = role;
    }
    if next != was {
        b.health = next;
        let streak = b.successes.max(b.failures);
        let line = match (was, next, &result) {
            (Health::Unknown, Health::Up, _) => {
                (Level::Info, format!("pool {name}: backend {key} is up"))
            }
            (Health::Unknown, _, Err(e)) => (
                Level::Warn,
                format!("pool {name}: backend {key} is down: {e}"),
            ),
            (_, Health::Up, _) => (
                Level::Info,
                format!("pool {name}: backend {key} is UP after {streak} successful checks"),
            ),
            (_, _, Err(e)) => (
                Level::Warn,
                format!("pool {name}: backend {key} is DOWN after {streak} failed checks: {e}"),
            ),
            _ => (
                Level::Debug,
                format!("pool {name}: backend {key} is {}", next.as_str()),
            ),
        };
        fx.push(Effect::Log(line.0, line.1));
        health_changed(spec, b, was, fx);
    } else if let Err(e) = &result {
        if b.health == Health::Up {
            fx.push(Effect::Log(
                Level::Debug,
                format!("pool {name}: check of {key} failed ({e}); still up"),
            ));
        }
    }
    if b.shown_role() != shown {
        fx.push(Effect::Role {
            key: Arc::clone(key),
            role: b.shown_role(),
        });
    }
}

/// Effects of `b` having just changed health from `was`.
fn health_changed(spec: &Spec, b: &mut BackendState, was: Health, fx: &mut Vec<Effect>) {
    fx.push(Effect::Health {
        key: Arc::clone(&b.key),
        health: b.health,
        transition: was != Health::Unknown,
    });
    if b.passive_failures != 0 {
        b.passive_failures = 0;
        fx.push(Effect::Passive {
            key: Arc::clone(&b.key),
            counting: false,
        });
    }
    if b.health == Health::Down && spec.on_backend_down == SessionPolicy::Close {
        fx.push(Effect::Close {
            key: Arc::clone(&b.key),
            cause: CloseCause::BackendDown,
        });
    }
}

fn connect_failed(
    name: &str,
    spec: &Spec,
    state: &mut State,
    key: &Key,
    reason: &str,
    fx: &mut Vec<Effect>,
) {
    if !spec.passive {
        return;
    }
    // Passive health alone never takes out the last healthy backend: a
    // client's view of one blip is not worth refusing everyone until the
    // active checks bring it back. The active checks decide then.
    let others_up = state
        .backends
        .iter()
        .any(|o| o.key != *key && o.health == Health::Up);
    let Some(b) = state.backend_mut(key) else {
        return;
    };
    if b.health != Health::Up {
        return;
    }
    b.passive_failures = b.passive_failures.saturating_add(1);
    if b.passive_failures == 1 {
        fx.push(Effect::Passive {
            key: Arc::clone(key),
            counting: true,
        });
    }
    if b.passive_failures < spec.fall {
        return;
    }
    if !others_up {
        if b.passive_failures == spec.fall {
            fx.push(Effect::Log(
                Level::Warn,
                format!(
                    "pool {name}: {} failed connects of real traffic to {key} ({reason}), \
                     but it is the pool's last healthy backend: the active checks decide",
                    b.passive_failures
                ),
            ));
        }
        return;
    }
    let failures = b.passive_failures;
    b.health = Health::Down;
    b.successes = 0;
    b.failures = 0;
    fx.push(Effect::Log(
        Level::Warn,
        format!(
            "pool {name}: backend {key} is DOWN after {failures} failed connects of real traffic: {reason}"
        ),
    ));
    health_changed(spec, b, Health::Up, fx);
    if b.role.is_some() {
        fx.push(Effect::Role {
            key: Arc::clone(key),
            role: None,
        });
    }
}

/// Work out who serves, and the effects of any change.
fn decide(name: &str, spec: &Spec, state: &mut State, now: Instant, fx: &mut Vec<Effect>) {
    // Drained and maintained backends take no new connections; their
    // health, roles and the write holder are still tracked.
    let eligible: Vec<bool> = eligible(name, spec, state, now, fx)
        .into_iter()
        .zip(&state.backends)
        .map(|(e, b)| e && b.admin == AdminState::Ready)
        .collect();
    let serving: Vec<usize> = match spec.mode {
        Mode::ActiveActive => active_active(name, spec, state, &eligible, fx),
        Mode::ActivePassive => active_passive(name, spec, state, &eligible, fx)
            .into_iter()
            .collect(),
    };
    let serving: Vec<(Key, SocketAddr, u32)> = serving
        .into_iter()
        .filter_map(|i| {
            let b = &state.backends[i];
            let weight = b.weight.unwrap_or(spec.members[i].weight);
            b.addr.map(|a| (Arc::clone(&b.key), a, weight))
        })
        .collect();
    if serving.is_empty() {
        if !state.reported_empty && state.ready {
            fx.push(Effect::Log(
                Level::Error,
                format!("pool {name}: no backend is available; clients are refused"),
            ));
        }
        state.reported_empty = true;
    } else {
        state.reported_empty = false;
    }
    if serving != state.serving {
        state.serving = serving.clone();
        fx.push(Effect::Serving(serving));
    }
}

/// Which members may serve, by index.
fn eligible(
    name: &str,
    spec: &Spec,
    state: &mut State,
    now: Instant,
    fx: &mut Vec<Effect>,
) -> Vec<bool> {
    let usable: Vec<bool> = state.backends.iter().map(BackendState::usable).collect();
    match spec.role {
        RoleRequirement::Any => usable,
        RoleRequirement::Primary => {
            let writes = elect(name, spec, state, now, Purpose::Writes, fx);
            set_writes(state, writes.clone(), true, fx);
            only(state, writes.as_deref())
        }
        RoleRequirement::Replica => {
            // A replica taken out by the operator counts as absent, so reads
            // may fall back to the primary when all are.
            let replicas: Vec<bool> = state
                .backends
                .iter()
                .map(|b| b.in_rotation() && b.role == Some(Role::Replica))
                .collect();
            if !spec.fallback_to_primary {
                set_conflicts(state, 0, fx);
                return replicas;
            }
            let falling_back = !replicas.contains(&true);
            let primary = match state.follow.clone() {
                // A write pool decides for these addresses: go where its writes go.
                Some(writes) => {
                    set_conflicts(state, 0, fx);
                    writes.filter(|k| state.usable(k))
                }
                None => {
                    let purpose = if falling_back {
                        Purpose::Reads
                    } else {
                        Purpose::Quiet
                    };
                    let chosen = elect(name, spec, state, now, purpose, fx);
                    if !falling_back {
                        set_conflicts(state, 0, fx);
                    }
                    chosen
                }
            };
            set_writes(state, primary.clone(), false, fx);
            if falling_back {
                only(state, primary.as_deref())
            } else {
                replicas
            }
        }
    }
}

fn only(state: &State, key: Option<&str>) -> Vec<bool> {
    state
        .backends
        .iter()
        .map(|b| Some(&*b.key) == key)
        .collect()
}

fn set_conflicts(state: &mut State, n: u32, fx: &mut Vec<Effect>) {
    if state.conflicts != n {
        state.conflicts = n;
        fx.push(Effect::Conflicts(n));
    }
}

fn set_writes(state: &mut State, writes: Option<Key>, publish: bool, fx: &mut Vec<Effect>) {
    if state.writes != writes {
        state.writes = writes.clone();
        if publish {
            fx.push(Effect::Writes(writes));
        }
    }
}

/// Why a pool elects a primary, which decides how it speaks of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Purpose {
    /// `role: primary`.
    Writes,
    /// A read pool falling back to the primary.
    Reads,
    /// A read pool that has replicas: keeps track, says nothing.
    Quiet,
}

/// The backend the primary's traffic goes to, if any; see the module docs.
fn elect(
    name: &str,
    spec: &Spec,
    state: &mut State,
    now: Instant,
    purpose: Purpose,
    fx: &mut Vec<Effect>,
) -> Option<Key> {
    let what = if purpose == Purpose::Writes {
        "writes"
    } else {
        "reads"
    };
    let log = |fx: &mut Vec<Effect>, level: Level, line: String| {
        if purpose != Purpose::Quiet {
            fx.push(Effect::Log(level, format!("pool {name}: {line}")));
        }
    };
    let claimants: Vec<Key> = state
        .backends
        .iter()
        .filter(|b| b.claims_primary())
        .map(|b| Arc::clone(&b.key))
        .collect();
    let reports_replica = |state: &State, k: &str| {
        state
            .backend(k)
            .is_some_and(|b| b.usable() && b.role == Some(Role::Replica))
    };
    // A refused claimant that reports replica now has stepped down.
    let stepped_down: Vec<Key> = state
        .refused
        .iter()
        .filter(|r| reports_replica(state, &r.key))
        .map(|r| Arc::clone(&r.key))
        .collect();
    state.refused.retain(|r| !stepped_down.contains(&r.key));
    // Sessions on a node that no longer takes the writes would fail; reads
    // on it are fine.
    let close = |fx: &mut Vec<Effect>, key: Key| {
        if purpose == Purpose::Writes {
            fx.push(Effect::Close {
                key,
                cause: CloseCause::PrimaryMoved,
            });
        }
    };
    // The holder reports replica: a planned switchover. Nobody is delayed.
    if let Some(h) = state.holder.clone().filter(|h| reports_replica(state, h)) {
        state.holder = None;
        state.refused.clear();
        if purpose == Purpose::Writes {
            log(
                fx,
                Level::Warn,
                format!("{h} is no longer primary; closing its connections"),
            );
        }
        close(fx, h);
    }
    let holder_claims = state.holder.as_ref().is_some_and(|h| claimants.contains(h));
    let chosen = if holder_claims {
        for c in &claimants {
            if Some(c) != state.holder.as_ref() && !state.is_refused(c) {
                state.refused.push(Refused {
                    key: Arc::clone(c),
                    sole_since: None,
                });
            }
        }
        for r in &mut state.refused {
            r.sole_since = None;
        }
        state.holder.clone()
    } else {
        let sole = (claimants.len() == 1).then(|| Arc::clone(&claimants[0]));
        for r in &mut state.refused {
            if Some(&r.key) == sole.as_ref() {
                r.sole_since.get_or_insert(now);
            } else {
                r.sole_since = None;
            }
        }
        let free: Vec<&Key> = claimants.iter().filter(|c| !state.is_refused(c)).collect();
        match free.as_slice() {
            [only] => Some(Arc::clone(only)),
            [] => state
                .refused
                .iter()
                .find(|r| {
                    r.sole_since
                        .is_some_and(|t| now.saturating_duration_since(t) >= spec.primary_hold)
                })
                .map(|r| Arc::clone(&r.key)),
            _ => None,
        }
    };
    // Give the writes to the chosen one.
    if let Some(c) = &chosen {
        state.refused.retain(|r| r.key != *c);
        if state.holder.as_ref() != Some(c) {
            if let Some(old) = state.holder.replace(Arc::clone(c)) {
                let line = match purpose {
                    Purpose::Writes => {
                        format!("primary moved from {old} to {c}; closing connections to {old}")
                    }
                    _ => format!("primary moved from {old} to {c}; reads fall back to {c}"),
                };
                log(fx, Level::Warn, line);
                close(fx, old);
            }
        }
    }
    // Report conflicts as they change.
    let refused_now = claimants.len() - usize::from(chosen.is_some());
    let names: Vec<Key> = if refused_now > 0 {
        claimants.clone()
    } else {
        Vec::new()
    };
    if names != state.conflict {
        let list = names.iter().map(|k| &**k).collect::<Vec<_>>().join(", ");
        match (&chosen, names.len()) {
            (_, 0) if !state.conflict.is_empty() => log(
                fx,
                Level::Info,
                "split brain over: at most one backend claims primary".to_string(),
            ),
            (_, 0) => {}
            (Some(c), n) if n > 1 => log(
                fx,
                Level::Error,
                format!(
                    "SPLIT BRAIN: {list} all claim to be primary; {what} stay on {c}, which held them; fix the others"
                ),
            ),
            (None, n) if n > 1 => log(
                fx,
                Level::Error,
                format!(
                    "SPLIT BRAIN: {list} all claim to be primary and none may take the {what}; refusing {what} until only one claims it"
                ),
            ),
            _ => {}
        }
        state.conflict = names;
    }
    // Say why the writes are refused, once per reason.
    let note = match (&chosen, claimants.as_slice()) {
        (None, [c]) => Some(format!(
            "{what} refused: {c} claims primary but did so while {} held the {what}; it takes them once it has been the only claimant for {} (unless {} returns)",
            state.holder.as_deref().unwrap_or("another backend"),
            humantime::format_duration(spec.primary_hold),
            state.holder.as_deref().unwrap_or("that backend"),
        )),
        _ => None,
    };
    if note != state.writes_note {
        if let Some(n) = &note {
            log(fx, Level::Error, n.clone());
        }
        state.writes_note = note;
    }
    if purpose != Purpose::Quiet {
        set_conflicts(state, u32::try_from(refused_now).unwrap_or(u32::MAX), fx);
    }
    chosen
}

fn active_active(
    name: &str,
    spec: &Spec,
    state: &mut State,
    eligible: &[bool],
    fx: &mut Vec<Effect>,
) -> Vec<usize> {
    let tier = |backup: bool| -> Vec<usize> {
        spec.members
            .iter()
            .enumerate()
            .filter(|&(i, m)| m.backup == backup && eligible[i])
            .map(|(i, _)| i)
            .collect()
    };
    let primaries = tier(false);
    let (now, serving) = if !primaries.is_empty() {
        (Some(Tier::Primary), primaries)
    } else {
        let backups = tier(true);
        ((!backups.is_empty()).then_some(Tier::Backup), backups)
    };
    if now.is_some() && now != state.last_tier {
        match (state.last_tier, now) {
            (Some(Tier::Primary), Some(Tier::Backup)) => {
                fx.push(Effect::Failover);
                fx.push(Effect::Log(
                    Level::Warn,
                    format!(
                        "pool {name}: failover: every primary backend is down; backups now serve"
                    ),
                ));
            }
            (Some(Tier::Backup), Some(Tier::Primary)) => fx.push(Effect::Log(
                Level::Info,
                format!("pool {name}: failback: a primary backend is up again; backups stand by"),
            )),
            _ => {}
        }
        state.last_tier = now;
    }
    serving
}

fn active_passive(
    name: &str,
    spec: &Spec,
    state: &mut State,
    eligible: &[bool],
    fx: &mut Vec<Effect>,
) -> Option<usize> {
    let index = |k: &Key| state.backends.iter().position(|b| b.key == *k);
    let first_up = eligible.iter().position(|&e| e);
    let current = state
        .active
        .as_ref()
        .and_then(index)
        .filter(|&i| eligible[i]);
    // Manual failback keeps the current backend, once there is one to keep:
    // before the first round ends, the first in list order wins, whichever
    // check happened to answer first.
    let next = match (spec.failback, current) {
        (Failback::Manual, Some(i)) if state.ready => Some(i),
        _ => first_up,
    };
    state.active = next.map(|i| Arc::clone(&state.backends[i].key));
    let next = next?;
    let to = Arc::clone(&state.backends[next].key);
    match state.last_active.clone() {
        None => fx.push(Effect::Log(
            Level::Info,
            format!("pool {name}: {to} is the active backend"),
        )),
        Some(prev) if prev != to => {
            let prev_state = index(&prev).map(|i| (&state.backends[i], eligible[i]));
            match prev_state {
                Some((b, false)) if b.usable() && b.admin != AdminState::Ready => {
                    // Taken out by an operator: a handover, not a failure.
                    fx.push(Effect::Log(
                        Level::Info,
                        format!(
                            "pool {name}: {prev} is in {} by the operator; {to} is the active backend",
                            b.admin.as_str()
                        ),
                    ));
                }
                Some((b, false)) if b.usable() => {
                    // Up, but without the role the pool needs (a promotion).
                    fx.push(Effect::Failover);
                    fx.push(Effect::Log(
                        Level::Warn,
                        format!(
                            "pool {name}: failover from {prev} (now {}) to {to}",
                            b.role.map_or("unknown", Role::as_str)
                        ),
                    ));
                }
                Some((b, true)) if b.usable() => {
                    fx.push(Effect::Log(
                        Level::Info,
                        format!("pool {name}: {to} is the active backend again (was {prev})"),
                    ));
                    if spec.on_failback == SessionPolicy::Close {
                        fx.push(Effect::Close {
                            key: prev,
                            cause: CloseCause::Failback,
                        });
                    }
                }
                other => {
                    let health = other.map_or("removed", |(b, _)| b.health.as_str());
                    fx.push(Effect::Failover);
                    fx.push(Effect::Log(
                        Level::Warn,
                        format!("pool {name}: failover from {prev} ({health}) to {to}"),
                    ));
                }
            }
        }
        Some(_) => {}
    }
    state.last_active = Some(to);
    Some(next)
}
