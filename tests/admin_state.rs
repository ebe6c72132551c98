//! Taking backends out of rotation at run time: drain, maintenance with a
//! grace, back to ready, and runtime weights, through the admin API.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

async fn post(sluice: &Sluice, path: &str) -> (u16, String) {
    http_request(sluice.admin, "POST", path).await.unwrap()
}

fn backend_json(pools: &serde_json::Value, b: SocketAddr) -> &serde_json::Value {
    pools["pools"]["app"]["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["address"] == b.to_string())
        .unwrap()
}

async fn admin_label(sluice: &Sluice, b: SocketAddr) -> String {
    let pools = sluice.pools().await;
    backend_json(&pools, b)["admin_state"]
        .as_str()
        .unwrap()
        .to_string()
}

async fn echo_round(c: &mut TcpStream) -> bool {
    if c.write_all(b"x").await.is_err() {
        return false;
    }
    let mut one = [0u8; 1];
    matches!(
        tokio::time::timeout(DEADLINE, c.read(&mut one)).await,
        Ok(Ok(1))
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_lets_sessions_finish_and_takes_no_new_ones() {
    let a = Backend::start("a", Behavior::Echo).await;
    let b = Backend::start("b", Behavior::Echo).await;
    let port = reserve_port();
    let sluice = Sluice::start(&front_to_app(
        port,
        "",
        &format!("backends: ['{}', '{}']", a.addr, b.addr),
    ))
    .await;
    // Round robin: one held connection on each.
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut c = TcpStream::connect(addr(port)).await.unwrap();
        assert!(echo_round(&mut c).await);
        held.push(c);
    }
    let (status, body) = post(
        &sluice,
        &format!("/api/v1/pools/app/state?backend={}&state=drain", a.addr),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(admin_label(&sluice, a.addr).await, "drain");
    let to = |m: &Scrape, x: SocketAddr| {
        m.value(
            "sluice_backend_connections_total",
            &[("pool", "app"), ("backend", &x.to_string())],
        )
    };
    let before = sluice.metrics().await;
    for _ in 0..10 {
        let mut c = TcpStream::connect(addr(port)).await.unwrap();
        assert!(echo_round(&mut c).await);
    }
    let after = sluice.metrics().await;
    assert_eq!(
        to(&after, a.addr),
        to(&before, a.addr),
        "no new connection to a"
    );
    assert_eq!(to(&after, b.addr), to(&before, b.addr) + 10.0);
    // The established ones run on.
    for c in &mut held {
        assert!(echo_round(c).await, "a drained backend keeps its sessions");
    }
    // Once a's last connection ends, it shows as drained.
    held.clear();
    wait_until("a is drained", || async {
        admin_label(&sluice, a.addr).await == "drained"
    })
    .await;
    let m = sluice.metrics().await;
    let state = |s: &str| {
        m.value(
            "sluice_backend_admin_state",
            &[
                ("pool", "app"),
                ("backend", &a.addr.to_string()),
                ("state", s),
            ],
        )
    };
    assert_eq!(
        (state("drained"), state("drain"), state("ready")),
        (1.0, 0.0, 0.0)
    );
    // Health checks go on: the backend is still up.
    assert_eq!(sluice.backend_state("app", a.addr).await, "up");
    // Ready: back in rotation.
    let (status, _) = post(
        &sluice,
        &format!("/api/v1/pools/app/state?backend={}&state=ready", a.addr),
    )
    .await;
    assert_eq!(status, 200);
    sluice.wait_active("app", &[a.addr, b.addr]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maintenance_closes_sessions_after_the_grace_and_survives_a_reload() {
    let a = Backend::start("a", Behavior::Echo).await;
    let b = Backend::start("b", Behavior::Echo).await;
    let port = reserve_port();
    let yaml = |weight: u32| {
        front_to_app(
            port,
            "",
            &format!(
                "backends: ['{}', {{ address: '{}', weight: {weight} }}]",
                a.addr, b.addr
            ),
        )
    };
    let sluice = Sluice::start(&yaml(1)).await;
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut c = TcpStream::connect(addr(port)).await.unwrap();
        assert!(echo_round(&mut c).await);
        held.push(c);
    }
    let started = std::time::Instant::now();
    let (status, body) = post(
        &sluice,
        &format!(
            "/api/v1/pools/app/state?backend={}&state=maint&grace=700ms",
            a.addr
        ),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    // Within the grace the sessions still work; after it a's is closed.
    assert!(echo_round(&mut held[0]).await && echo_round(&mut held[1]).await);
    let mut closed = None;
    for (i, c) in held.iter_mut().enumerate() {
        let mut buf = [0u8; 8];
        if let Ok(Ok(0)) = tokio::time::timeout(DEADLINE, c.read(&mut buf)).await {
            closed = Some(i);
            break;
        }
    }
    assert!(closed.is_some(), "the session on a was closed");
    assert!(
        started.elapsed() >= std::time::Duration::from_millis(700),
        "not before the grace"
    );
    assert_eq!(admin_label(&sluice, a.addr).await, "maint");
    sluice.wait_active("app", &[b.addr]).await;

    // A reload that keeps the backend keeps its state.
    sluice.rewrite_config(&yaml(2));
    assert_eq!(sluice.reload().await.0, 200);
    assert_eq!(admin_label(&sluice, a.addr).await, "maint");
    assert_eq!(sluice.active_backends("app").await, [b.addr.to_string()]);

    // Unknown backend, bad state: clear errors.
    let (status, body) = post(
        &sluice,
        "/api/v1/pools/app/state?backend=127.0.0.1:1&state=drain",
    )
    .await;
    assert_eq!(status, 404, "{body}");
    let (status, body) = post(
        &sluice,
        &format!("/api/v1/pools/app/state?backend={}&state=off", a.addr),
    )
    .await;
    assert_eq!(status, 400);
    assert!(body.contains("ready, drain or maint"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weights_change_at_run_time() {
    let a = Backend::start("a", Behavior::Name).await;
    let b = Backend::start("b", Behavior::Name).await;
    let port = reserve_port();
    let sluice = Sluice::start(&front_to_app(
        port,
        "",
        &format!("backends: ['{}', '{}']", a.addr, b.addr),
    ))
    .await;
    let (status, body) = post(
        &sluice,
        &format!("/api/v1/pools/app/weight?backend={}&weight=3", a.addr),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        tally(addr(port), 100).await,
        HashMap::from([("a".to_string(), 75), ("b".to_string(), 25)])
    );
    let pools = sluice.pools().await;
    assert_eq!(backend_json(&pools, a.addr)["weight"], 3);
    let (status, _) = post(
        &sluice,
        &format!("/api/v1/pools/app/weight?backend={}&weight=config", a.addr),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(
        tally(addr(port), 100).await,
        HashMap::from([("a".to_string(), 50), ("b".to_string(), 50)])
    );
    let (status, _) = post(
        &sluice,
        &format!("/api/v1/pools/app/weight?backend={}&weight=0", a.addr),
    )
    .await;
    assert_eq!(status, 400);
}
