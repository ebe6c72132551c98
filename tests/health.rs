//! Health checks: rise/fall thresholds, readiness before and after the first
//! round, unresolvable names, and blackholed backends.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;

fn checks(m: &Scrape, backend: SocketAddr, result: &str) -> f64 {
    m.value(
        "sluice_backend_health_checks_total",
        &[
            ("pool", "app"),
            ("backend", &backend.to_string()),
            ("result", result),
        ],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fall_failures_mark_down_and_rise_successes_mark_up() {
    let mut b = Backend::start("b", Behavior::Name).await;
    let port = reserve_port();
    // Slow rounds leave plenty of time to look between two checks.
    let sluice = Sluice::start(&front_to_app(
        port,
        "",
        &format!(
            "health_check: {{ interval: 400ms, timeout: 200ms, rise: 3, fall: 2 }}\nbackends: ['{}']",
            b.addr
        ),
    ))
    .await;
    assert_eq!(sluice.backend_state("app", b.addr).await, "up");

    b.stop_and_wait().await;
    let f0 = checks(&sluice.metrics().await, b.addr, "failure");
    wait_until("one failed check", || async {
        checks(&sluice.metrics().await, b.addr, "failure") >= f0 + 1.0
    })
    .await;
    assert_eq!(
        sluice.backend_state("app", b.addr).await,
        "up",
        "one failure is below fall = 2"
    );
    wait_until("marked down", || async {
        sluice.backend_state("app", b.addr).await == "down"
    })
    .await;
    assert_eq!(
        checks(&sluice.metrics().await, b.addr, "failure"),
        f0 + 2.0,
        "down after exactly fall failures"
    );

    b.restart().await;
    let s0 = checks(&sluice.metrics().await, b.addr, "success");
    wait_until("two good checks", || async {
        checks(&sluice.metrics().await, b.addr, "success") >= s0 + 2.0
    })
    .await;
    assert_eq!(
        sluice.backend_state("app", b.addr).await,
        "down",
        "two successes are below rise = 3"
    );
    wait_until("marked up", || async {
        sluice.backend_state("app", b.addr).await == "up"
    })
    .await;
    assert_eq!(
        checks(&sluice.metrics().await, b.addr, "success"),
        s0 + 3.0,
        "up after exactly rise successes"
    );

    let m = sluice.metrics().await;
    let changes = |to| {
        m.value(
            "sluice_backend_state_changes_total",
            &[
                ("pool", "app"),
                ("backend", &b.addr.to_string()),
                ("to", to),
            ],
        )
    };
    assert_eq!((changes("down"), changes("up")), (1.0, 1.0));
    sluice
        .wait_log(&format!(
            "backend {} is DOWN after 2 failed checks: tcp check: connection refused",
            b.addr
        ))
        .await;
    sluice
        .wait_log(&format!(
            "backend {} is UP after 3 successful checks",
            b.addr
        ))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_ready_and_not_listening_until_the_first_round_ends() {
    let hole = Blackhole::new();
    assert!(
        hole.holds(Duration::from_millis(300)),
        "the blackhole completes no handshake"
    );
    let good = Backend::start("good", Behavior::Name).await;
    let port = reserve_port();
    // The blackholed backend makes the first round last the full 1.5 s timeout.
    let sluice = Sluice::spawn(&front_to_app(
        port,
        "",
        &format!(
            "health_check: {{ interval: 2s, timeout: 1500ms }}\nbackends: ['{}', '{}']",
            hole.addr, good.addr
        ),
    ));
    wait_until("admin answers", || async {
        http_get(sluice.admin, "/healthz").await.is_ok()
    })
    .await;
    let (status, body) = http_get(sluice.admin, "/readyz").await.unwrap();
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("first health-check round"), "{body}");
    assert!(
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err(),
        "the listener must not accept before the first round"
    );
    sluice.wait_ready().await;
    assert_eq!(
        read_all(SocketAddr::from(([127, 0, 0, 1], port))).await,
        "good\n"
    );
    assert_eq!(sluice.backend_state("app", hole.addr).await, "down");
    sluice
        .wait_log(&format!(
            "backend {} is down: tcp check: no answer within 1s 500ms",
            hole.addr
        ))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unresolvable_names_are_down_not_fatal() {
    let good = Backend::start("good", Behavior::Name).await;
    let port = reserve_port();
    let sluice = Sluice::start(&front_to_app(
        port,
        "",
        &format!(
            "health_check: {{ interval: 1s, timeout: 1s }}\nbackends: ['not-started-yet.invalid:80', 'localhost:{}']",
            good.addr.port()
        ),
    ))
    .await;
    let v = sluice.pools().await;
    let backends = v["pools"]["app"]["backends"].as_array().unwrap();
    assert_eq!(backends[0]["state"], "down");
    assert_eq!(backends[0]["resolved"], serde_json::Value::Null);
    assert_eq!(backends[1]["state"], "up");
    assert_eq!(
        read_all(SocketAddr::from(([127, 0, 0, 1], port))).await,
        "good\n"
    );
    // The reason depends on the resolver: an answer, or none in time.
    sluice
        .wait_log("backend not-started-yet.invalid:80 is down: ")
        .await;
    let log = sluice.log();
    assert!(
        log.contains("is down: cannot resolve not-started-yet.invalid")
            || log.contains("is down: tcp check: no answer within"),
        "{log}"
    );
}
