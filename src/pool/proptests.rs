//! Property tests of the decision core: random pools, random event
//! sequences, and the invariants checked after every step.
//!
//! A write pool (`role: primary`) and a read pool (`role: replica` with
//! `fallback_to_primary`) over the same backends get the same check
//! results, as two pools of one process over the same database nodes do;
//! the read pool follows where the write pool sends its writes. A plain pool
//! (`role: any`) with random mode, failback and backups gets the same
//! events. At least 10,000 sequences run in `make test`
//! (`SLUICE_PROPTEST_CASES` raises it).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use proptest::prelude::*;

use super::core::{self, AdminState, Event, Health, Key, MemberSpec, Spec, State, step};
use super::roles::RoleRecord;
use crate::check::Role;
use crate::config::{Failback, Mode, RoleRequirement, SessionPolicy};

/// What happens next, as generated.
#[derive(Clone, Debug)]
enum Step {
    /// A check of backend `i`: passes (reporting `role`) or fails.
    Check {
        i: usize,
        ok: bool,
        role: Option<Role>,
    },
    ConnectFailed(usize),
    ConnectSucceeded(usize),
    MakeActive(usize),
    /// An operator sets backend `i`'s state.
    Admin(usize, AdminState),
    FirstRoundDone,
    /// Time passes.
    Wait(Duration),
}

fn role() -> impl Strategy<Value = Option<Role>> {
    prop_oneof![
        1 => Just(None),
        3 => Just(Some(Role::Primary)),
        4 => Just(Some(Role::Replica)),
    ]
}

fn steps(n: usize) -> impl Strategy<Value = Vec<Step>> {
    let one = prop_oneof![
        10 => (0..n, prop::bool::weighted(0.7), role()).prop_map(|(i, ok, role)| Step::Check { i, ok, role }),
        2 => (0..n).prop_map(Step::ConnectFailed),
        1 => (0..n).prop_map(Step::ConnectSucceeded),
        1 => (0..n).prop_map(Step::MakeActive),
        1 => (0..n, prop_oneof![
            2 => Just(AdminState::Ready),
            1 => Just(AdminState::Drain),
            1 => Just(AdminState::Maint),
        ]).prop_map(|(i, a)| Step::Admin(i, a)),
        1 => Just(Step::FirstRoundDone),
        2 => (0u64..3000).prop_map(|ms| Step::Wait(Duration::from_millis(ms))),
    ];
    prop::collection::vec(one, 1..60)
}

#[derive(Clone, Debug)]
struct Setup {
    n: usize,
    mode: Mode,
    failback: Failback,
    backups: Vec<bool>,
    rise: u32,
    fall: u32,
    hold: Duration,
}

fn setup() -> impl Strategy<Value = Setup> {
    (
        1usize..=4,
        prop::bool::ANY,
        prop::bool::ANY,
        prop::collection::vec(prop::bool::weighted(0.3), 4),
        1u32..=3,
        1u32..=3,
        0u64..4000,
    )
        .prop_map(
            |(n, passive_mode, manual, backups, rise, fall, hold)| Setup {
                n,
                mode: if passive_mode {
                    Mode::ActivePassive
                } else {
                    Mode::ActiveActive
                },
                failback: if manual && passive_mode {
                    Failback::Manual
                } else {
                    Failback::Auto
                },
                backups: backups[..n].to_vec(),
                rise,
                fall,
                hold: Duration::from_millis(hold),
            },
        )
}

fn key(i: usize) -> Key {
    Arc::from(format!("10.0.0.{}:5432", i + 1).as_str())
}

fn addr(i: usize) -> SocketAddr {
    format!("10.0.0.{}:5432", i + 1).parse().unwrap()
}

fn spec(s: &Setup, role: RoleRequirement) -> Spec {
    let plain = role == RoleRequirement::Any;
    Spec {
        mode: if plain { s.mode } else { Mode::ActiveActive },
        failback: if plain { s.failback } else { Failback::Auto },
        role,
        fallback_to_primary: role == RoleRequirement::Replica,
        rise: s.rise,
        fall: s.fall,
        passive: true,
        on_backend_down: SessionPolicy::Keep,
        on_failback: SessionPolicy::Keep,
        primary_hold: s.hold,
        members: (0..s.n)
            .map(|i| MemberSpec {
                key: key(i),
                backup: plain && s.backups[i],
                weight: 1,
            })
            .collect(),
    }
}

fn serving_keys(st: &State) -> Vec<Key> {
    st.serving.iter().map(|(k, _, _)| Arc::clone(k)).collect()
}

/// Backends that may take new connections: up and in rotation.
fn usable_keys(st: &State) -> Vec<Key> {
    st.backends
        .iter()
        .filter(|b| b.in_rotation())
        .map(|b| Arc::clone(&b.key))
        .collect()
}

fn claimants(st: &State) -> Vec<Key> {
    st.backends
        .iter()
        .filter(|b| b.usable() && b.role == Some(Role::Primary))
        .map(|b| Arc::clone(&b.key))
        .collect()
}

/// The invariants of a plain pool after a step.
fn check_plain(spec: &Spec, before: &State, after: &State, event: &Event) -> Result<(), String> {
    let serving = serving_keys(after);
    let usable = usable_keys(after);
    if let Some(k) = serving.iter().find(|k| !usable.contains(k)) {
        return Err(format!("{k} serves but is not usable"));
    }
    match spec.mode {
        Mode::ActiveActive => {
            let tier = |backup: bool| -> Vec<Key> {
                spec.members
                    .iter()
                    .filter(|m| m.backup == backup && usable.contains(&m.key))
                    .map(|m| Arc::clone(&m.key))
                    .collect()
            };
            let primaries = tier(false);
            let want = if primaries.is_empty() {
                tier(true)
            } else {
                primaries
            };
            if serving != want {
                return Err(format!(
                    "active_active serves {serving:?}, expected {want:?}"
                ));
            }
        }
        Mode::ActivePassive => {
            if serving.len() != usize::from(!usable.is_empty()) {
                return Err(format!(
                    "active_passive serves {serving:?} with {usable:?} usable"
                ));
            }
            let first = spec
                .members
                .iter()
                .find(|m| usable.contains(&m.key))
                .map(|m| Arc::clone(&m.key));
            match spec.failback {
                Failback::Auto if serving.first() != first.as_ref() => {
                    return Err(format!("failback auto serves {serving:?}, not {first:?}"));
                }
                Failback::Manual => {
                    let was = serving_keys(before);
                    let moved = matches!(event, Event::MakeActive { .. } | Event::Admin { .. });
                    if let Some(prev) = was.first().filter(|_| before.ready) {
                        if usable.contains(prev) && !moved && serving.first() != Some(prev) {
                            return Err(format!(
                                "failback manual moved from {prev} to {serving:?} on its own"
                            ));
                        }
                    }
                }
                _ => {}
            }
        }
    }
    Ok(())
}

/// The invariants of the write pool after a step.
fn check_writes(
    spec: &Spec,
    before: &State,
    after: &State,
    sole_since: &[Option<Instant>],
    now: Instant,
) -> Result<(), String> {
    let serving = serving_keys(after);
    if serving.len() > 1 {
        return Err(format!("two backends take writes: {serving:?}"));
    }
    if let Some(k) = serving.first() {
        let b = after.backend(k).ok_or("serving a non-member")?;
        if !(b.usable() && b.role == Some(Role::Primary)) {
            return Err(format!("{k} takes writes but does not claim primary"));
        }
        if b.admin != AdminState::Ready {
            return Err(format!("{k} takes writes while in {}", b.admin.as_str()));
        }
        if after.is_refused(k) {
            return Err(format!("{k} takes writes while refused"));
        }
        if after.writes.as_ref() != Some(k) {
            return Err("published writes differ from the serving set".to_string());
        }
        // Whoever takes the writes, every other claimant is refused: split
        // brain with no holder refuses all rather than pick one.
        if let Some(other) = claimants(after)
            .iter()
            .find(|c| *c != k && !after.is_refused(c))
        {
            return Err(format!(
                "{k} takes the writes while {other} also claims primary and is not refused"
            ));
        }
        let newly = before.writes.as_ref() != Some(k);
        // A claimant refused before this step takes over only after being
        // the sole claimant for the hold time, or when the holder stepped
        // down (reports replica).
        if newly && before.is_refused(k) {
            let stepped_down = before.holder.as_ref().is_some_and(|h| {
                after
                    .backend(h)
                    .is_some_and(|b| b.usable() && b.role == Some(Role::Replica))
            });
            let i = spec.members.iter().position(|m| m.key == *k).unwrap_or(0);
            let held = sole_since[i].is_some_and(|t| now.duration_since(t) >= spec.primary_hold);
            if !stepped_down && !held {
                return Err(format!(
                    "{k} took the writes it was refused before the hold time ({:?}) ran out",
                    spec.primary_hold
                ));
            }
        }
    } else if let Some(w) = &after.writes {
        // Only an operator taking the holder out leaves it without writes.
        if after
            .backend(w)
            .is_none_or(|b| b.admin == AdminState::Ready)
        {
            return Err("writes published while nothing serves".to_string());
        }
    }
    let claim = claimants(after);
    let refused = claim.len() - usize::from(after.writes.is_some());
    if after.conflicts as usize != refused {
        return Err(format!(
            "conflicts {} but {refused} claimants are refused",
            after.conflicts
        ));
    }
    Ok(())
}

/// The invariants of the read pool after a step.
fn check_reads(writes: &State, reads: &State) -> Result<(), String> {
    let serving = serving_keys(reads);
    let replicas: Vec<Key> = reads
        .backends
        .iter()
        .filter(|b| b.in_rotation() && b.role == Some(Role::Replica))
        .map(|b| Arc::clone(&b.key))
        .collect();
    if replicas.is_empty() {
        // Falling back: only ever where the writes go.
        if serving.len() > 1 || serving.first() != writes.writes.as_ref() && !serving.is_empty() {
            return Err(format!(
                "reads fall back to {serving:?} while writes go to {:?}",
                writes.writes
            ));
        }
        if reads.conflicts != 0 {
            return Err("a read pool that follows counts conflicts".to_string());
        }
    } else if serving != replicas {
        return Err(format!(
            "reads go to {serving:?}, replicas are {replicas:?}"
        ));
    }
    Ok(())
}

/// `drop_for_reads[n]`: the read pool misses event `n` (pools check on
/// their own schedules, so their histories differ).
fn run(setup: &Setup, script: &[Step], drop_for_reads: &[bool]) -> Result<(), String> {
    let plain_spec = spec(setup, RoleRequirement::Any);
    let write_spec = spec(setup, RoleRequirement::Primary);
    let read_spec = spec(setup, RoleRequirement::Replica);
    let mut plain = State::new(&plain_spec);
    let mut writes = State::new(&write_spec);
    let mut reads = State::new(&read_spec);
    let mut roles = vec![RoleRecord::default(); setup.n];
    let mut sole_since: Vec<Option<Instant>> = vec![None; setup.n];
    let mut now = Instant::now();
    for (n, s) in script.iter().enumerate() {
        let event = match s {
            Step::Wait(d) => {
                now += *d;
                Event::Tick
            }
            Step::Check { i, ok, role } => {
                if *ok {
                    roles[*i].observe("writes", *role, setup.rise);
                }
                Event::Check {
                    key: key(*i),
                    result: if *ok {
                        Ok(addr(*i))
                    } else {
                        Err("down".into())
                    },
                    role: roles[*i].role(),
                }
            }
            Step::ConnectFailed(i) => Event::ConnectFailed {
                key: key(*i),
                reason: "refused".into(),
            },
            Step::ConnectSucceeded(i) => Event::ConnectSucceeded { key: key(*i) },
            Step::MakeActive(i) => Event::MakeActive { key: key(*i) },
            Step::Admin(i, state) => Event::Admin {
                key: key(*i),
                state: *state,
                grace: Duration::ZERO,
            },
            Step::FirstRoundDone => Event::FirstRoundDone,
        };
        let at = |e: String| format!("step {n} ({s:?}): {e}");
        // The plain pool.
        let before = plain.clone();
        let (next, _) = step("plain", &plain_spec, plain, event.clone(), now);
        plain = next;
        check_plain(&plain_spec, &before, &plain, &event).map_err(at)?;
        // The write pool; its sole-claimant clocks as the model sees them.
        let before = writes.clone();
        let (next, fx) = step("writes", &write_spec, writes, event.clone(), now);
        writes = next;
        let claim = claimants(&writes);
        for (i, since) in sole_since.iter_mut().enumerate() {
            if claim.len() == 1 && claim[0] == key(i) {
                since.get_or_insert(now);
            } else {
                *since = None;
            }
        }
        check_writes(&write_spec, &before, &writes, &sole_since, now).map_err(at)?;
        // The read pool gets most of the same observations and follows the writes.
        if !drop_for_reads.get(n).copied().unwrap_or(false) {
            let (next, _) = step("reads", &read_spec, reads, event, now);
            reads = next;
        }
        if fx.iter().any(|e| matches!(e, core::Effect::Writes(_))) || reads.follow.is_none() {
            let (next, _) = step(
                "reads",
                &read_spec,
                reads,
                Event::Follow(Some(writes.writes.clone())),
                now,
            );
            reads = next;
        }
        check_reads(&writes, &reads).map_err(at)?;
        // Whatever the pool, nobody an operator took out takes new connections.
        for st in [&plain, &writes, &reads] {
            for k in serving_keys(st) {
                if st.backend(&k).is_some_and(|b| b.admin != AdminState::Ready) {
                    return Err(at(format!("{k} serves while taken out by the operator")));
                }
            }
        }
    }
    Ok(())
}

fn cases() -> u32 {
    std::env::var("SLUICE_PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases()))]

    #[test]
    fn every_event_sequence_keeps_the_invariants(
        setup in setup(),
        script in steps(4),
        drop_for_reads in prop::collection::vec(prop::bool::weighted(0.2), 60),
    ) {
        let script: Vec<Step> = script
            .into_iter()
            .map(|s| match s {
                Step::Check { i, ok, role } => Step::Check { i: i % setup.n, ok, role },
                Step::ConnectFailed(i) => Step::ConnectFailed(i % setup.n),
                Step::ConnectSucceeded(i) => Step::ConnectSucceeded(i % setup.n),
                Step::MakeActive(i) => Step::MakeActive(i % setup.n),
                Step::Admin(i, a) => Step::Admin(i % setup.n, a),
                other => other,
            })
            .collect();
        if let Err(e) = run(&setup, &script, &drop_for_reads) {
            return Err(TestCaseError::fail(e));
        }
    }
}

/// The scenario of issue 13's item 2, step by step: a stale claimant does
/// not get the writes from a blip of the real primary.
#[test]
fn a_blip_of_the_primary_does_not_hand_the_writes_to_a_stale_claimant() {
    let s = Setup {
        n: 2,
        mode: Mode::ActiveActive,
        failback: Failback::Auto,
        backups: vec![false, false],
        rise: 2,
        fall: 1,
        hold: Duration::from_secs(10),
    };
    let spec = spec(&s, RoleRequirement::Primary);
    let mut st = State::new(&spec);
    let mut now = Instant::now();
    let go = |st: State, e: Event, now: Instant| step("db", &spec, st, e, now).0;
    let check = |i: usize, ok: bool, role: Role| Event::Check {
        key: key(i),
        result: if ok {
            Ok(addr(i))
        } else {
            Err("timeout".into())
        },
        role: Some(role),
    };
    st = go(st, check(0, true, Role::Primary), now);
    st = go(st, check(1, true, Role::Replica), now);
    assert_eq!(serving_keys(&st), [key(0)]);
    // B wrongly claims primary too: refused, writes stay on A.
    st = go(st, check(1, true, Role::Primary), now);
    assert_eq!(serving_keys(&st), [key(0)]);
    assert_eq!(st.conflicts, 1);
    // One failed check of A (fall 1): B is the only claimant, but refused.
    now += Duration::from_secs(2);
    st = go(st, check(0, false, Role::Primary), now);
    assert!(
        serving_keys(&st).is_empty(),
        "writes refused, not handed to B"
    );
    // A comes back within the hold time (rise 2 checks), still primary.
    now += Duration::from_secs(2);
    st = go(st, check(0, true, Role::Primary), now);
    now += Duration::from_secs(2);
    st = go(st, check(0, true, Role::Primary), now);
    assert_eq!(
        serving_keys(&st),
        [key(0)],
        "writes return to the real primary"
    );
    assert_eq!(st.conflicts, 1, "B is still refused");
    // A goes away for good: B gets the writes after being the sole claimant
    // for the hold time, not before.
    now += Duration::from_secs(2);
    st = go(st, check(0, false, Role::Primary), now);
    for _ in 0..4 {
        now += Duration::from_secs(2);
        st = go(st, check(1, true, Role::Primary), now);
        assert!(serving_keys(&st).is_empty());
    }
    now += Duration::from_secs(2);
    st = go(st, check(1, true, Role::Primary), now);
    assert_eq!(serving_keys(&st), [key(1)], "hold time over");
    // A returns still claiming: now it is the stale one.
    st = go(st, check(0, true, Role::Primary), now);
    st = go(st, check(0, true, Role::Primary), now);
    assert_eq!(serving_keys(&st), [key(1)]);
    assert_eq!(st.conflicts, 1);
}

#[test]
fn a_planned_switchover_and_a_real_failover_are_not_delayed() {
    let s = Setup {
        n: 2,
        mode: Mode::ActiveActive,
        failback: Failback::Auto,
        backups: vec![false, false],
        rise: 2,
        fall: 1,
        hold: Duration::from_secs(3600),
    };
    let spec = spec(&s, RoleRequirement::Primary);
    let now = Instant::now();
    let go = |st: State, e: Event| step("db", &spec, st, e, now).0;
    let up = |i: usize, role: Role| Event::Check {
        key: key(i),
        result: Ok(addr(i)),
        role: Some(role),
    };
    // Switchover, new primary promoted first: refused until the old one
    // reports replica, then it takes over at once.
    let mut st = State::new(&spec);
    st = go(st, up(0, Role::Primary));
    st = go(st, up(1, Role::Replica));
    st = go(st, up(1, Role::Primary));
    assert_eq!(serving_keys(&st), [key(0)]);
    st = go(st, up(0, Role::Replica));
    assert_eq!(serving_keys(&st), [key(1)], "switchover not delayed");
    // Failover: the old primary is gone before the new one claims.
    let mut st = State::new(&spec);
    st = go(st, up(0, Role::Primary));
    st = go(st, up(1, Role::Replica));
    st = go(
        st,
        Event::Check {
            key: key(0),
            result: Err("refused".into()),
            role: Some(Role::Primary),
        },
    );
    st = go(st, up(1, Role::Primary));
    assert_eq!(serving_keys(&st), [key(1)], "failover not delayed");
    let _ = Health::Up;
}
