//! Spreading connections: weighted round robin, least connections, random
//! and source hash.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;

use common::*;
use tokio::io::AsyncReadExt;

fn config(listen: u16, algorithm: &str, backends: &[(SocketAddr, u32)]) -> String {
    let list: Vec<String> = backends
        .iter()
        .map(|(a, w)| format!("  - {{ address: '{a}', weight: {w} }}"))
        .collect();
    let pool = format!(
        "algorithm: {algorithm}\nhealth_check: {{ interval: 1s, timeout: 500ms, rise: 1, fall: 1 }}\nbackends:\n{}",
        list.join("\n")
    );
    front_to_app(listen, "", &pool)
}

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_splits_evenly_and_by_weight() {
    let a = Backend::start("a", Behavior::Name).await;
    let b = Backend::start("b", Behavior::Name).await;

    let port = reserve_port();
    let _even = Sluice::start(&config(port, "round_robin", &[(a.addr, 1), (b.addr, 1)])).await;
    let counts = tally(addr(port), 100).await;
    assert_eq!(
        counts,
        HashMap::from([("a".to_string(), 50), ("b".to_string(), 50)])
    );

    let port = reserve_port();
    let _weighted = Sluice::start(&config(port, "round_robin", &[(a.addr, 3), (b.addr, 1)])).await;
    let counts = tally(addr(port), 100).await;
    assert_eq!(
        counts,
        HashMap::from([("a".to_string(), 75), ("b".to_string(), 25)])
    );
}

/// A connection held open through sluice, and the backend that greeted it.
async fn hold_named(to: SocketAddr) -> (String, tokio::net::TcpStream) {
    let mut c = tokio::net::TcpStream::connect(to).await.unwrap();
    let mut name = Vec::new();
    let mut byte = [0u8; 1];
    while name.last() != Some(&b'\n') {
        tokio::time::timeout(DEADLINE, c.read_exact(&mut byte))
            .await
            .expect("the backend greets")
            .unwrap();
        name.push(byte[0]);
    }
    (String::from_utf8(name).unwrap().trim().to_string(), c)
}

/// Least connections sends new clients to the backend holding fewer, where
/// round robin would alternate: with two clients closed on `b`, the next
/// two both go to `b`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_connections_avoids_the_busy_backend() {
    let a = Backend::start("a", Behavior::Stream).await;
    let b = Backend::start("b", Behavior::Stream).await;
    let port = reserve_port();
    let sluice = Sluice::start(&config(
        port,
        "least_connections",
        &[(a.addr, 1), (b.addr, 1)],
    ))
    .await;
    let busy = |m: &Scrape, b: &Backend| {
        m.value(
            "sluice_backend_connections_active",
            &[("pool", "app"), ("backend", &b.addr.to_string())],
        )
    };
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(hold_named(addr(port)).await);
    }
    let on = |held: &[(String, tokio::net::TcpStream)], name: &str| {
        held.iter().filter(|(n, _)| n == name).count()
    };
    assert_eq!((on(&held, "a"), on(&held, "b")), (2, 2), "an even spread");
    // Free b entirely: a holds two, b none.
    held.retain(|(n, _)| n == "a");
    wait_until("b's connections are gone", || async {
        busy(&sluice.metrics().await, &b) == 0.0
    })
    .await;
    for _ in 0..2 {
        held.push(hold_named(addr(port)).await);
    }
    assert_eq!(
        (on(&held, "a"), on(&held, "b")),
        (2, 2),
        "both new clients went to the idle backend"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_uses_every_backend() {
    let a = Backend::start("a", Behavior::Name).await;
    let b = Backend::start("b", Behavior::Name).await;
    let port = reserve_port();
    let _s = Sluice::start(&config(port, "random", &[(a.addr, 1), (b.addr, 1)])).await;
    let counts = tally(addr(port), 200).await;
    // Each side gets 100 ± 40 unless selection is broken (p < 1e-8).
    for name in ["a", "b"] {
        let n = counts.get(name).copied().unwrap_or(0);
        assert!((60..=140).contains(&n), "{counts:?}");
    }
}

/// Read the name a backend sends, connecting from source address `src`.
async fn name_from(src: [u8; 4], to: SocketAddr) -> String {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind(SocketAddr::from((src, 0))).unwrap();
    let mut s = sock.connect(to).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out.trim().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_hash_keeps_each_client_on_one_backend() {
    let a = Backend::start("a", Behavior::Name).await;
    let b = Backend::start("b", Behavior::Name).await;
    let port = reserve_port();
    let _s = Sluice::start(&config(port, "source_hash", &[(a.addr, 1), (b.addr, 1)])).await;
    let mut spread = HashMap::new();
    // Loopback answers on all of 127.0.0.0/8, so each source is a distinct client.
    for host in 2..34u8 {
        let src = [127, 0, 0, host];
        let first = name_from(src, addr(port)).await;
        for _ in 0..4 {
            assert_eq!(
                name_from(src, addr(port)).await,
                first,
                "client 127.0.0.{host} moved"
            );
        }
        *spread.entry(first).or_insert(0) += 1;
    }
    assert_eq!(
        spread.len(),
        2,
        "32 clients all hashed to one backend: {spread:?}"
    );
}
