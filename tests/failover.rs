//! Failover: backups in active_active, ordered standby in active_passive
//! with automatic and manual failback, and skipping a refusing backend.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;

use common::*;

const CHECK: &str = "health_check: { interval: 100ms, timeout: 100ms, rise: 2, fall: 2 }";

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn names(counts: &HashMap<String, usize>) -> Vec<&str> {
    let mut v: Vec<&str> = counts.keys().map(String::as_str).collect();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_serves_only_while_every_primary_is_down() {
    let mut a = Backend::start("a", Behavior::Name).await;
    let mut b = Backend::start("b", Behavior::Name).await;
    let c = Backend::start("c", Behavior::Name).await;
    let port = reserve_port();
    let sluice = Sluice::start(&front_to_app(
        port,
        "",
        &format!(
            "{CHECK}\nbackends:\n  - address: '{}'\n  - address: '{}'\n  - {{ address: '{}', backup: true }}",
            a.addr, b.addr, c.addr
        ),
    ))
    .await;

    assert_eq!(
        names(&tally(addr(port), 30).await),
        ["a", "b"],
        "backup idle while primaries are up"
    );

    a.stop_and_wait().await;
    sluice.wait_active("app", &[b.addr]).await;
    assert_eq!(
        names(&tally(addr(port), 20).await),
        ["b"],
        "one primary left: still no backup"
    );

    b.stop_and_wait().await;
    sluice.wait_active("app", &[c.addr]).await;
    assert_eq!(
        names(&tally(addr(port), 20).await),
        ["c"],
        "every primary down: the backup serves"
    );
    let m = sluice.metrics().await;
    assert_eq!(
        m.value("sluice_pool_failovers_total", &[("pool", "app")]),
        1.0
    );

    a.restart().await;
    sluice.wait_active("app", &[a.addr]).await;
    assert_eq!(
        names(&tally(addr(port), 20).await),
        ["a"],
        "a primary is back: the backup stops"
    );
}

fn active_passive(port: u16, failback: &str, backends: &[SocketAddr]) -> String {
    let list: Vec<String> = backends
        .iter()
        .map(|a| format!("  - address: '{a}'"))
        .collect();
    let pool = format!(
        "mode: active_passive\nfailback: {failback}\n{CHECK}\nbackends:\n{}",
        list.join("\n")
    );
    front_to_app(port, "", &pool)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn active_passive_fails_over_and_back_automatically() {
    let mut first = Backend::start("first", Behavior::Name).await;
    let second = Backend::start("second", Behavior::Name).await;
    let port = reserve_port();
    let sluice = Sluice::start(&active_passive(port, "auto", &[first.addr, second.addr])).await;

    assert_eq!(names(&tally(addr(port), 20).await), ["first"]);
    first.stop_and_wait().await;
    sluice.wait_active("app", &[second.addr]).await;
    assert_eq!(names(&tally(addr(port), 20).await), ["second"]);
    first.restart().await;
    sluice.wait_active("app", &[first.addr]).await;
    assert_eq!(names(&tally(addr(port), 20).await), ["first"]);
    sluice
        .wait_log(&format!(
            "is the active backend again (was {})",
            second.addr
        ))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn active_passive_manual_failback_stays_until_told() {
    let mut first = Backend::start("first", Behavior::Name).await;
    let second = Backend::start("second", Behavior::Name).await;
    let port = reserve_port();
    let sluice = Sluice::start(&active_passive(port, "manual", &[first.addr, second.addr])).await;

    assert_eq!(names(&tally(addr(port), 10).await), ["first"]);
    first.stop_and_wait().await;
    sluice.wait_active("app", &[second.addr]).await;
    first.restart().await;
    wait_until("first is up again", || async {
        sluice.backend_state("app", first.addr).await == "up"
    })
    .await;
    assert_eq!(
        sluice.active_backends("app").await,
        [second.addr.to_string()]
    );
    assert_eq!(
        names(&tally(addr(port), 20).await),
        ["second"],
        "manual failback: traffic stays"
    );

    // An operator moves traffic back.
    let (status, body) = http_request(
        sluice.admin,
        "POST",
        &format!("/api/v1/pools/app/active?backend={}", first.addr),
    )
    .await
    .unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        sluice.active_backends("app").await,
        [first.addr.to_string()]
    );
    assert_eq!(names(&tally(addr(port), 10).await), ["first"]);

    // Refusals name the reason.
    let (status, body) = http_request(
        sluice.admin,
        "POST",
        "/api/v1/pools/app/active?backend=127.0.0.1:1",
    )
    .await
    .unwrap();
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("has no backend `127.0.0.1:1`"), "{body}");
}

/// A pool whose active checks are too slow to notice anything during a test.
fn slow_checks(port: u16, extra: &str, backends: &[SocketAddr]) -> String {
    let list: Vec<String> = backends.iter().map(|a| format!("'{a}'")).collect();
    front_to_app(
        port,
        "",
        &format!(
            "health_check: {{ interval: 1m, timeout: 1s, fall: 3{extra} }}\nbackends: [{}]",
            list.join(", ")
        ),
    )
}

fn refused(m: &Scrape, backend: SocketAddr) -> f64 {
    m.value(
        "sluice_backend_connect_errors_total",
        &[
            ("pool", "app"),
            ("backend", &backend.to_string()),
            ("kind", "refused"),
        ],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusing_backend_is_skipped_and_marked_down_by_real_traffic() {
    let mut bad = Backend::start("bad", Behavior::Name).await;
    let good = Backend::start("good", Behavior::Name).await;
    let port = reserve_port();
    let sluice = Sluice::start(&slow_checks(port, "", &[bad.addr, good.addr])).await;
    bad.stop_and_wait().await;
    assert_eq!(
        sluice.active_backends("app").await.len(),
        2,
        "checks have not noticed yet"
    );

    let counts = tally(addr(port), 20).await;
    assert_eq!(
        counts,
        HashMap::from([("good".to_string(), 20)]),
        "no client saw the failures"
    );
    // Passive health: `fall` (3) refused connects mark it down without a check.
    assert_eq!(sluice.backend_state("app", bad.addr).await, "down");
    assert_eq!(sluice.active_backends("app").await, [good.addr.to_string()]);
    let m = sluice.metrics().await;
    assert_eq!(
        refused(&m, bad.addr),
        3.0,
        "no connect tried once it was down"
    );
    assert_eq!(
        m.value(
            "sluice_listener_rejected_total",
            &[("listener", "front"), ("reason", "no_backend")]
        ),
        0.0
    );
    sluice
        .wait_log(&format!(
            "backend {} is DOWN after 3 failed connects of real traffic",
            bad.addr
        ))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passive_health_off_keeps_trying_until_the_checks_notice() {
    let mut bad = Backend::start("bad", Behavior::Name).await;
    let good = Backend::start("good", Behavior::Name).await;
    let port = reserve_port();
    let sluice = Sluice::start(&slow_checks(
        port,
        ", passive: false",
        &[bad.addr, good.addr],
    ))
    .await;
    bad.stop_and_wait().await;
    let counts = tally(addr(port), 20).await;
    assert_eq!(counts, HashMap::from([("good".to_string(), 20)]));
    assert_eq!(sluice.backend_state("app", bad.addr).await, "up");
    assert!(refused(&sluice.metrics().await, bad.addr) >= 10.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_backend_means_immediate_close_and_a_count() {
    let mut only = Backend::start("only", Behavior::Name).await;
    let port = reserve_port();
    // A long connect timeout: "immediate" must mean no connect is even tried.
    let sluice = Sluice::start(&front_to_app(
        port,
        "",
        &format!("connect_timeout: 30s\n{CHECK}\nbackends: ['{}']", only.addr),
    ))
    .await;
    only.stop_and_wait().await;
    sluice.wait_active("app", &[]).await;
    let started = std::time::Instant::now();
    assert_eq!(read_all(addr(port)).await, "", "closed without data");
    let took = started.elapsed();
    assert!(
        took < std::time::Duration::from_secs(5),
        "closed at once, not after a connect attempt: {took:?}"
    );
    let m = sluice.metrics().await;
    assert_eq!(
        m.value(
            "sluice_listener_rejected_total",
            &[("listener", "front"), ("reason", "no_backend")]
        ),
        1.0
    );
    sluice.wait_log("no backend is available").await;
}

/// Issue 13, item 6: one client retrying the only backend while it
/// restarts does not mark it down; the next client is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_client_retrying_cannot_mark_the_only_backend_down() {
    let mut only = Backend::start("only", Behavior::Name).await;
    let port = reserve_port();
    let sluice = Sluice::start(&front_to_app(
        port,
        "",
        &format!(
            "connect_attempts: 3\nhealth_check: {{ interval: 1m, timeout: 1s, fall: 3 }}\nbackends: ['{}']",
            only.addr
        ),
    ))
    .await;
    // A restart: the port refuses for a moment.
    only.stop_and_wait().await;
    assert_eq!(read_all(addr(port)).await, "", "refused while it restarts");
    assert_eq!(
        refused(&sluice.metrics().await, only.addr),
        3.0,
        "the client tried three times"
    );
    only.restart().await;
    // The one client's three refusals counted once, and the last healthy
    // backend is left to the active checks anyway.
    assert_eq!(sluice.backend_state("app", only.addr).await, "up");
    assert_eq!(
        read_all(addr(port)).await,
        "only\n",
        "the next client is served"
    );
    // Many clients failing still do not take out the last backend.
    only.stop_and_wait().await;
    for _ in 0..5 {
        assert_eq!(read_all(addr(port)).await, "");
    }
    assert_eq!(sluice.backend_state("app", only.addr).await, "up");
    sluice.wait_log("last healthy backend").await;
    only.restart().await;
    assert_eq!(read_all(addr(port)).await, "only\n");
}
