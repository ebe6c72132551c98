use super::*;
use crate::config::Config;

fn pool(yaml_pool: &str) -> Arc<Pool> {
    let src =
        format!("listeners: {{ l: {{ bind: 127.0.0.1:1, pool: p }} }}\npools:\n  p:\n{yaml_pool}");
    let config = Config::from_yaml(&src).unwrap();
    Pool::new(&config.pools[0], &Metrics::new())
}

fn set(p: &Pool, index: usize, h: Health) {
    p.update_backend(index, Some(h), None);
}

fn serving(p: &Pool) -> Vec<usize> {
    p.backends
        .iter()
        .filter(|b| b.is_serving())
        .map(|b| b.index)
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
    assert_eq!(p.pick(b"", &[0]).unwrap().0.index, 1);
    assert!(p.pick(b"", &[0, 1]).is_none());
    set(&p, 1, Health::Down);
    assert!(
        p.pick(b"", &[0]).is_none(),
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
    set(&p, 0, Health::Up);
    set(&p, 1, Health::Up);
    assert_eq!(serving(&p), [0]);
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
    p.backends[0].metrics.connections_active.set(3);
    p.backends[1].metrics.connections_active.set(2);
    // 3/2 < 2/1: the heavier-weighted backend is relatively less loaded.
    assert_eq!(picks(&p, 3), [0, 0, 0]);
    p.backends[0].metrics.connections_active.set(5);
    assert_eq!(picks(&p, 2), [1, 1]);
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
