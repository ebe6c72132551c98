use super::*;
use crate::config::Config;
use roles::RoleBook;

fn pool(yaml_pool: &str) -> Arc<Pool> {
    let src =
        format!("listeners: {{ l: {{ bind: 127.0.0.1:99, pool: p }} }}\npools:\n  p:\n{yaml_pool}");
    let config = Config::from_yaml(&src).unwrap();
    Pool::new(&config.pools[0], &Metrics::new(), &RoleBook::new())
}

fn set(p: &Pool, index: usize, h: Health) {
    p.force(index, h);
}

fn serving(p: &Pool) -> Vec<usize> {
    p.generation()
        .members
        .iter()
        .filter(|m| m.is_serving())
        .map(|m| m.index)
        .collect()
}

fn picks(p: &Pool, n: usize) -> Vec<usize> {
    (0..n).map(|_| p.pick(b"", &[]).unwrap().0.index).collect()
}

#[test]
fn nothing_serves_before_any_result() {
    let p = pool("    backends: [127.0.0.1:1, 127.0.0.1:2]");
    assert_eq!(serving(&p), Vec::<usize>::new());
    assert!(p.pick(b"", &[]).is_none());
}

#[test]
fn active_active_backups_serve_only_when_every_primary_is_down() {
    let p = pool(
        "    backends:
      - 127.0.0.1:1
      - 127.0.0.1:2
      - { address: 127.0.0.1:3, backup: true }
      - { address: 127.0.0.1:4, backup: true }",
    );
    for i in 0..4 {
        set(&p, i, Health::Up);
    }
    assert_eq!(serving(&p), [0, 1]);
    set(&p, 0, Health::Down);
    assert_eq!(serving(&p), [1]);
    set(&p, 1, Health::Down);
    assert_eq!(serving(&p), [2, 3], "all live backups share the load");
    assert_eq!(p.metrics.failovers.get(), 1);
    set(&p, 0, Health::Up);
    assert_eq!(serving(&p), [0]);
}

#[test]
fn a_failed_connect_moves_on_to_any_other_up_backend() {
    let p = pool(
        "    backends:
      - 127.0.0.1:1
      - { address: 127.0.0.1:2, backup: true }",
    );
    set(&p, 0, Health::Up);
    set(&p, 1, Health::Up);
    assert_eq!(p.pick(b"", &[]).unwrap().0.index, 0);
    // The primary refused this client: the up backup is the next candidate.
    assert_eq!(p.pick(b"", &[p.backend(0).id()]).unwrap().0.index, 1);
    assert!(
        p.pick(b"", &[p.backend(0).id(), p.backend(1).id()])
            .is_none()
    );
    set(&p, 1, Health::Down);
    assert!(
        p.pick(b"", &[p.backend(0).id()]).is_none(),
        "down backends are never candidates"
    );
}

#[test]
fn round_robin_honours_weights() {
    let p = pool(
        "    backends:
      - { address: 127.0.0.1:1, weight: 3 }
      - { address: 127.0.0.1:2, weight: 1 }",
    );
    set(&p, 0, Health::Up);
    set(&p, 1, Health::Up);
    let got = picks(&p, 400);
    assert_eq!(got.iter().filter(|&&i| i == 0).count(), 300);
}

#[test]
fn active_passive_auto_returns_to_the_first() {
    let p = pool(
        "    mode: active_passive
    backends: [127.0.0.1:1, 127.0.0.1:2, 127.0.0.1:3]",
    );
    for i in 0..3 {
        set(&p, i, Health::Up);
    }
    assert_eq!(serving(&p), [0]);
    set(&p, 0, Health::Down);
    assert_eq!(serving(&p), [1]);
    set(&p, 1, Health::Down);
    assert_eq!(serving(&p), [2]);
    assert_eq!(p.metrics.failovers.get(), 2);
    set(&p, 1, Health::Up);
    assert_eq!(serving(&p), [1], "failback to the earlier backend");
    assert_eq!(p.metrics.failovers.get(), 2, "a failback is not a failover");
    assert_eq!(picks(&p, 5), [1; 5]);
}

#[test]
fn active_passive_manual_stays_until_failure_or_operator() {
    let p = pool(
        "    mode: active_passive
    failback: manual
    backends: [127.0.0.1:1, 127.0.0.1:2]",
    );
    set(&p, 1, Health::Up);
    set(&p, 0, Health::Up);
    assert_eq!(
        serving(&p),
        [0],
        "before the first round ends, list order decides"
    );
    p.round_done();
    set(&p, 0, Health::Down);
    set(&p, 0, Health::Up);
    assert_eq!(serving(&p), [1], "manual: no failback");
    assert_eq!(p.make_active("127.0.0.1:1"), Ok(()));
    assert_eq!(serving(&p), [0]);
    set(&p, 1, Health::Down);
    assert_eq!(
        p.make_active("127.0.0.1:2"),
        Err(MoveError::NotUp("127.0.0.1:2".into()))
    );
    assert!(matches!(
        p.make_active("127.0.0.1:9"),
        Err(MoveError::UnknownBackend { .. })
    ));
}

#[test]
fn operator_moves_are_refused_where_meaningless() {
    let aa = pool("    backends: [127.0.0.1:1]");
    assert_eq!(
        aa.make_active("127.0.0.1:1"),
        Err(MoveError::NotActivePassive("p".into()))
    );
    let auto = pool("    mode: active_passive\n    backends: [127.0.0.1:1]");
    assert_eq!(
        auto.make_active("127.0.0.1:1"),
        Err(MoveError::AutoFailback("p".into()))
    );
}

#[test]
fn least_connections_prefers_the_least_loaded_relative_to_weight() {
    let p = pool(
        "    algorithm: least_connections
    backends:
      - { address: 127.0.0.1:1, weight: 2 }
      - { address: 127.0.0.1:2, weight: 1 }",
    );
    set(&p, 0, Health::Up);
    set(&p, 1, Health::Up);
    let (a, b) = (p.backend(0), p.backend(1));
    let mut open: Vec<_> = (0..3).map(|_| a.open_connection()).collect();
    open.extend((0..2).map(|_| b.open_connection()));
    // 3/2 < 2/1: the heavier-weighted backend is relatively less loaded.
    assert_eq!(picks(&p, 3), [0, 0, 0]);
    open.extend((0..2).map(|_| a.open_connection()));
    assert_eq!(picks(&p, 2), [1, 1]);
    assert_eq!(
        a.metrics.connections_active.get(),
        5,
        "the gauge mirrors the count"
    );
    drop(open);
    assert_eq!(a.open_connections(), 0);
    assert_eq!(a.metrics.connections_active.get(), 0);
}

#[test]
fn source_hash_is_stable_per_client() {
    let p = pool(
        "    algorithm: source_hash
    backends: [127.0.0.1:1, 127.0.0.1:2, 127.0.0.1:3]",
    );
    for i in 0..3 {
        set(&p, i, Health::Up);
    }
    let mut seen = std::collections::HashSet::new();
    for client in 0..64u8 {
        let key = [10, 0, 0, client];
        let first = p.pick(&key, &[]).unwrap().0.index;
        for _ in 0..3 {
            assert_eq!(p.pick(&key, &[]).unwrap().0.index, first);
        }
        seen.insert(first);
    }
    assert_eq!(seen.len(), 3);
}

#[test]
fn first_result_decides_then_thresholds_apply() {
    let p = pool("    health_check: { rise: 2, fall: 3 }\n    backends: [127.0.0.1:1]");
    let b = p.backend(0);
    let mut seen = Vec::new();
    for ok in [
        true, false, false, true, false, false, false, true, false, true, true,
    ] {
        let result = match ok {
            true => Ok(("127.0.0.1:1".parse().unwrap(), None)),
            false => Err("refused".into()),
        };
        p.observe_check(&b, result);
        seen.push(b.health());
    }
    use Health::{Down, Up};
    assert_eq!(
        seen,
        [Up, Up, Up, Up, Up, Up, Down, Down, Down, Down, Up],
        "first result decides; a success resets the failure streak; fall 3 down, rise 2 up"
    );
    let p = pool("    health_check: { rise: 1, fall: 1 }\n    backends: [127.0.0.1:1]");
    let b = p.backend(0);
    p.observe_check(&b, Err("refused".into()));
    assert_eq!(b.health(), Health::Down);
    p.observe_check(&b, Ok(("127.0.0.1:1".parse().unwrap(), None)));
    assert_eq!(b.health(), Health::Up);
}

#[test]
fn failed_connects_of_real_traffic_mark_down_after_fall() {
    let p = pool(
        "    health_check: { fall: 3 }
    backends: [127.0.0.1:1, 127.0.0.1:2]",
    );
    set(&p, 0, Health::Up);
    set(&p, 1, Health::Up);
    let b = p.backend(0);
    p.observe_connect(&b, false, &"refused");
    p.observe_connect(&b, false, &"refused");
    p.observe_connect(&b, true, &"");
    p.observe_connect(&b, false, &"refused");
    p.observe_connect(&b, false, &"refused");
    assert_eq!(
        b.health(),
        Health::Up,
        "a success in between resets the count"
    );
    p.observe_connect(&b, false, &"refused");
    assert_eq!(b.health(), Health::Down);
    assert_eq!(serving(&p), [1]);
    assert_eq!(b.metrics.to_down.get(), 1);
    // Only active checks bring it back: `rise` (2) successes.
    p.observe_check(&b, Ok(("127.0.0.1:1".parse().unwrap(), None)));
    assert_eq!(b.health(), Health::Down);
    p.observe_check(&b, Ok(("127.0.0.1:1".parse().unwrap(), None)));
    assert_eq!(b.health(), Health::Up);
}

#[test]
fn passive_health_can_be_turned_off() {
    let p = pool(
        "    health_check: { fall: 1, passive: false }
    backends: [127.0.0.1:1]",
    );
    set(&p, 0, Health::Up);
    let b = p.backend(0);
    for _ in 0..5 {
        p.observe_connect(&b, false, &"refused");
    }
    assert_eq!(b.health(), Health::Up);
}

#[test]
fn reconfigure_keeps_the_health_of_backends_that_stay() {
    let p = pool("    backends: [127.0.0.1:1, 127.0.0.1:2, 127.0.0.1:3]");
    set(&p, 0, Health::Up);
    set(&p, 1, Health::Down);
    set(&p, 2, Health::Up);
    let (kept, gone) = (p.backend(1), p.backend(2));
    let src = "listeners: { l: { bind: 127.0.0.1:99, pool: p } }
pools:
  p:
    backends: [127.0.0.1:2, { address: 127.0.0.1:1, weight: 3 }, 127.0.0.1:4]";
    let next = Config::from_yaml(src).unwrap();
    let left = p.reconfigure(&next.pools[0], &Metrics::new());
    assert_eq!(left.len(), 1);
    assert!(Arc::ptr_eq(&left[0], &gone));
    let g = p.generation();
    assert!(
        Arc::ptr_eq(&g.members[0].backend, &kept),
        "127.0.0.1:2 kept its state"
    );
    assert_eq!(g.members[0].backend.health(), Health::Down);
    assert_eq!(g.members[1].backend.health(), Health::Up);
    assert_eq!(g.members[1].weight, 3);
    assert_eq!(
        g.members[2].backend.health(),
        Health::Unknown,
        "a new backend is not trusted yet"
    );
    assert_eq!(serving(&p), [1]);
}

#[tokio::test]
async fn marking_down_closes_sessions_when_the_pool_says_so() {
    let p = pool(
        "    on_backend_down: close
    backends: [127.0.0.1:1, 127.0.0.1:2]",
    );
    set(&p, 0, Health::Up);
    set(&p, 1, Health::Up);
    let b = p.backend(0);
    let mut closing = b.watch_closing();
    set(&p, 0, Health::Down);
    tokio::time::timeout(std::time::Duration::from_secs(1), closing.changed())
        .await
        .expect("sessions told to close")
        .unwrap();
    assert_eq!(*closing.borrow(), Some(CloseCause::BackendDown));
}

/// A role-aware pool over `n` backends 127.0.0.1:1..=n.
fn role_pool(keys: &str, n: usize) -> Arc<Pool> {
    let list: Vec<String> = (1..=n).map(|i| format!("127.0.0.1:{i}")).collect();
    pool(&format!(
        "    health_check: {{ kind: redis, rise: 2 }}\n{keys}\n    backends: [{}]",
        list.join(", ")
    ))
}

/// A successful check of backend `index` reporting `role`.
fn report(p: &Pool, index: usize, role: Role) {
    let b = p.backend(index);
    let addr = format!("127.0.0.1:{}", index + 1).parse().unwrap();
    p.observe_check(&b, Ok((addr, Some(role))));
}

#[test]
fn role_is_decided_by_the_first_report_and_primary_needs_rise_reports() {
    let mut t = roles::RoleRecord::default();
    let mut see = |pool: &str, r: Role, rise: u32| {
        t.observe(pool, Some(r), rise);
        t.role()
    };
    assert_eq!(see("a", Role::Replica, 3), Some(Role::Replica));
    assert_eq!(see("a", Role::Primary, 3), Some(Role::Replica));
    assert_eq!(see("a", Role::Primary, 3), Some(Role::Replica));
    assert_eq!(see("a", Role::Primary, 3), Some(Role::Primary));
    // Stepping down is believed at once.
    assert_eq!(see("a", Role::Replica, 3), Some(Role::Replica));
    // A broken streak starts again.
    assert_eq!(see("a", Role::Primary, 2), Some(Role::Replica));
    assert_eq!(see("a", Role::Replica, 2), Some(Role::Replica));
    assert_eq!(see("a", Role::Primary, 2), Some(Role::Replica));
    assert_eq!(see("a", Role::Primary, 2), Some(Role::Primary));
    // Two pools checking one node do not confirm twice as fast.
    assert_eq!(see("a", Role::Replica, 2), Some(Role::Replica));
    assert_eq!(see("a", Role::Primary, 2), Some(Role::Replica));
    assert_eq!(see("b", Role::Primary, 2), Some(Role::Replica));
    assert_eq!(see("b", Role::Primary, 2), Some(Role::Primary));
}

#[test]
fn a_primary_pool_serves_only_the_primary_and_follows_a_promotion() {
    let p = role_pool("    mode: active_passive\n    role: primary", 2);
    report(&p, 0, Role::Primary);
    report(&p, 1, Role::Replica);
    assert_eq!(serving(&p), [0]);
    assert!(
        p.pick(b"", &[p.backend(0).id()]).is_none(),
        "never a replica for writes"
    );
    // Promotion: the old primary steps down (at once), the replica claims
    // primary and is believed after rise (2) reports.
    report(&p, 0, Role::Replica);
    assert_eq!(serving(&p), Vec::<usize>::new());
    report(&p, 1, Role::Primary);
    assert_eq!(serving(&p), Vec::<usize>::new());
    report(&p, 1, Role::Primary);
    assert_eq!(serving(&p), [1]);
    assert_eq!(p.backend(1).metrics.up.get(), 1);
    assert_eq!(p.conflicts(), 0);
}

#[test]
fn split_brain_keeps_the_earlier_primary_and_counts_the_conflict() {
    let p = role_pool("    role: primary", 3);
    report(&p, 0, Role::Primary);
    report(&p, 1, Role::Replica);
    report(&p, 2, Role::Replica);
    assert_eq!(serving(&p), [0]);
    report(&p, 1, Role::Primary);
    report(&p, 1, Role::Primary);
    assert_eq!(serving(&p), [0], "writes stay on the earlier primary");
    assert_eq!(p.conflicts(), 1);
    report(&p, 2, Role::Primary);
    report(&p, 2, Role::Primary);
    assert_eq!(serving(&p), [0]);
    assert_eq!(p.conflicts(), 2);
    // The earlier primary steps down: still two claim it, and neither was
    // primary before, so writes stop rather than go to either.
    report(&p, 0, Role::Replica);
    assert_eq!(serving(&p), Vec::<usize>::new());
    assert_eq!(p.conflicts(), 2);
    report(&p, 2, Role::Replica);
    assert_eq!(serving(&p), [1]);
    assert_eq!(p.conflicts(), 0);
}

#[test]
fn a_returning_old_primary_does_not_take_over() {
    let p = role_pool("    role: primary", 2);
    report(&p, 0, Role::Primary);
    report(&p, 1, Role::Replica);
    set(&p, 0, Health::Down);
    assert_eq!(
        p.backend(0).role(),
        None,
        "a down backend's role is forgotten"
    );
    report(&p, 1, Role::Primary);
    report(&p, 1, Role::Primary);
    assert_eq!(serving(&p), [1]);
    // It comes back still believing it is primary.
    set(&p, 0, Health::Up);
    report(&p, 0, Role::Primary);
    assert_eq!(serving(&p), [1]);
    assert_eq!(p.conflicts(), 1);
}

#[test]
fn replicas_serve_reads_and_fall_back_to_the_primary_when_asked() {
    let p = role_pool("    role: replica", 3);
    report(&p, 0, Role::Primary);
    report(&p, 1, Role::Replica);
    report(&p, 2, Role::Replica);
    assert_eq!(serving(&p), [1, 2]);
    set(&p, 1, Health::Down);
    set(&p, 2, Health::Down);
    assert_eq!(serving(&p), Vec::<usize>::new(), "no fallback unless asked");

    let p = role_pool("    role: replica\n    fallback_to_primary: true", 2);
    report(&p, 0, Role::Primary);
    report(&p, 1, Role::Replica);
    assert_eq!(serving(&p), [1]);
    set(&p, 1, Health::Down);
    assert_eq!(
        serving(&p),
        [0],
        "reads go to the primary while no replica is up"
    );
    set(&p, 1, Health::Up);
    report(&p, 1, Role::Replica);
    assert_eq!(serving(&p), [1]);
}

#[test]
fn backend_role_metric_shows_the_current_role() {
    let m = Metrics::new();
    let src = "listeners: { l: { bind: 127.0.0.1:99, pool: p } }\npools:\n  p:\n    role: primary\n    health_check: { kind: redis }\n    backends: [127.0.0.1:1]";
    let config = Config::from_yaml(src).unwrap();
    let p = Pool::new(&config.pools[0], &m, &RoleBook::new());
    let text = || String::from_utf8(m.render()).unwrap();
    assert!(
        text()
            .contains("sluice_backend_role{backend=\"127.0.0.1:1\",pool=\"p\",role=\"unknown\"} 1")
    );
    report(&p, 0, Role::Primary);
    let t = text();
    assert!(
        t.contains("sluice_backend_role{backend=\"127.0.0.1:1\",pool=\"p\",role=\"primary\"} 1"),
        "{t}"
    );
    assert!(
        t.contains("sluice_backend_role{backend=\"127.0.0.1:1\",pool=\"p\",role=\"unknown\"} 0"),
        "{t}"
    );
    assert!(t.contains("sluice_pool_conflicts{pool=\"p\"} 0"), "{t}");
}

#[test]
fn a_read_pool_reports_a_conflict_only_while_it_falls_back() {
    let p = role_pool("    role: replica\n    fallback_to_primary: true", 3);
    report(&p, 2, Role::Replica);
    report(&p, 0, Role::Primary);
    report(&p, 1, Role::Primary);
    assert_eq!(serving(&p), [2]);
    assert_eq!(p.conflicts(), 0, "reads do not care who is primary");
    set(&p, 2, Health::Down);
    assert_eq!(
        serving(&p),
        [0],
        "reads fall back to the primary that claimed first, never to the late claimant"
    );
    assert_eq!(p.conflicts(), 1);
    set(&p, 2, Health::Up);
    report(&p, 2, Role::Replica);
    assert_eq!(serving(&p), [2]);
    assert_eq!(p.conflicts(), 0, "the gauge does not stay stale");
}

/// A session subscribes to its backend's closing before it connects: a
/// close decided while the connect is still under way reaches it once the
/// connect completes.
#[test]
fn a_close_decided_during_the_connect_still_reaches_the_session() {
    let p = role_pool("    role: primary", 2);
    report(&p, 0, Role::Primary);
    report(&p, 1, Role::Replica);
    let old = p.backend(0);
    // The listener subscribes, then starts connecting to the primary...
    let closing = old.watch_closing();
    // ...meanwhile the primary steps down and the other is promoted...
    report(&p, 0, Role::Replica);
    report(&p, 1, Role::Primary);
    report(&p, 1, Role::Primary);
    assert_eq!(serving(&p), [1]);
    // ...and the connect completes: the session sees the close at once.
    assert!(closing.has_changed().unwrap(), "the close was not missed");
    assert_eq!(*closing.borrow(), Some(CloseCause::PrimaryMoved));
}
