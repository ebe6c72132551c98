//! The edge: source allow/deny lists, per-source limits and the PROXY
//! protocol, over real sockets from distinct loopback sources (every
//! 127.x.y.z is a source a test can bind).

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use sluice::config::edge::ProxyVersion;
use sluice::edge::proxy;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// Connect to `to` from the loopback address `from`.
async fn connect_from(from: &str, to: SocketAddr) -> TcpStream {
    let s = TcpSocket::new_v4().unwrap();
    s.bind(SocketAddr::new(from.parse().unwrap(), 0)).unwrap();
    s.connect(to).await.unwrap()
}

/// What a client from `from` reads until the connection ends.
async fn read_from(from: &str, to: SocketAddr) -> String {
    let mut c = connect_from(from, to).await;
    let mut out = String::new();
    tokio::time::timeout(DEADLINE, c.read_to_string(&mut out))
        .await
        .expect("the connection ended")
        .unwrap_or_default();
    out
}

fn rejected(m: &Scrape, reason: &str) -> f64 {
    m.value(
        "sluice_listener_rejected_total",
        &[("listener", "front"), ("reason", reason)],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allow_and_deny_lists_refuse_at_accept_and_reload_without_dropping_anyone() {
    let echo = Backend::start("echo", Behavior::Echo).await;
    let port = reserve_port();
    let rules = |deny: &str| {
        front_to_app(
            port,
            &format!(", allow: [127.0.0.0/24, '::1'], deny: [{deny}]"),
            &format!("backends: ['{}']", echo.addr),
        )
    };
    let sluice = Sluice::start(&rules("127.0.0.3")).await;
    // Allowed: served; the connection is held across the reload below.
    let mut held = connect_from("127.0.0.2", addr(port)).await;
    held.write_all(b"ping").await.unwrap();
    let mut got = [0u8; 4];
    held.read_exact(&mut got).await.unwrap();
    // Denied (deny wins), and outside the allow list: closed at once.
    assert_eq!(read_from("127.0.0.3", addr(port)).await, "");
    assert_eq!(read_from("127.0.1.5", addr(port)).await, "");
    let m = sluice.metrics().await;
    assert_eq!(rejected(&m, "acl"), 2.0);
    assert_eq!(
        m.value(
            "sluice_backend_connections_total",
            &[("pool", "app"), ("backend", &echo.addr.to_string())]
        ),
        1.0,
        "refused clients never reach a backend"
    );

    // Reload: now 127.0.0.2 is denied, 127.0.0.3 allowed.
    sluice.rewrite_config(&rules("127.0.0.2"));
    assert_eq!(sluice.reload().await.0, 200);
    held.write_all(b"pong").await.unwrap();
    held.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"pong", "the established connection runs on");
    assert_eq!(read_from("127.0.0.2", addr(port)).await, "");
    let mut c = connect_from("127.0.0.3", addr(port)).await;
    c.write_all(b"x").await.unwrap();
    let mut one = [0u8; 1];
    c.read_exact(&mut one).await.unwrap();
    assert_eq!(rejected(&sluice.metrics().await, "acl"), 3.0);

    // An invalid prefix is a configuration error with its path.
    sluice.rewrite_config(&rules("127.0.0.300/24"));
    let (status, body) = sluice.reload().await;
    assert_eq!(status, 422);
    assert!(
        body["problems"][0]
            .as_str()
            .unwrap()
            .contains("listeners.front.deny[0]"),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_source_limits_refuse_only_the_address_over_them() {
    let echo = Backend::start("echo", Behavior::Echo).await;
    let port = reserve_port();
    let sluice = Sluice::start(&front_to_app(
        port,
        ", per_source: { max_connections: 2, rate: 0.1, burst: 2 }",
        &format!("backends: ['{}']", echo.addr),
    ))
    .await;
    let hold = |from: &'static str| async move {
        let mut c = connect_from(from, addr(port)).await;
        c.write_all(b"x").await.unwrap();
        let mut one = [0u8; 1];
        c.read_exact(&mut one).await.unwrap();
        c
    };
    let a = hold("127.0.0.4").await;
    let _b = hold("127.0.0.4").await;
    // A third at once from the same address: over max_connections.
    assert_eq!(read_from("127.0.0.4", addr(port)).await, "");
    // Another address is not affected.
    let _c = hold("127.0.0.5").await;
    let m = sluice.metrics().await;
    assert_eq!(rejected(&m, "source_limit"), 1.0);
    // One closes: a slot frees, but the burst (2) is spent, and the next
    // token comes in 10 s: over the rate.
    drop(a);
    wait_until("the closed connection is counted out", || async {
        sluice.metrics().await.value(
            "sluice_listener_connections_active",
            &[("listener", "front")],
        ) == 2.0
    })
    .await;
    assert_eq!(read_from("127.0.0.4", addr(port)).await, "");
    let m = sluice.metrics().await;
    assert_eq!(rejected(&m, "source_rate"), 1.0);
    assert_eq!(rejected(&m, "source_limit"), 1.0);
}

/// Memory stays bounded under a flood from many distinct addresses, each
/// tracked by the per-source limits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_from_many_sources_keeps_memory_bounded() {
    let sources: usize = std::env::var("SLUICE_FLOOD_SOURCES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let echo = Backend::start("echo", Behavior::Name).await;
    let port = reserve_port();
    let sluice = Sluice::start(&front_to_app(
        port,
        ", per_source: { max_connections: 4, rate: 1, burst: 2 }",
        &format!("backends: ['{}']", echo.addr),
    ))
    .await;
    let before = sluice.rss_kib();
    let target = addr(port);
    let started = std::time::Instant::now();
    let workers = 16;
    let tasks: Vec<_> = (0..workers)
        .map(|w| {
            tokio::spawn(async move {
                let mut served = 0usize;
                for i in (w..sources).step_by(workers) {
                    let n = i + 1;
                    let from = format!("127.{}.{}.{}", (n >> 16) & 255, (n >> 8) & 255, n & 255);
                    let s = TcpSocket::new_v4().unwrap();
                    s.bind(SocketAddr::new(from.parse().unwrap(), 0)).unwrap();
                    let Ok(mut c) = s.connect(target).await else {
                        continue;
                    };
                    let mut out = Vec::new();
                    if tokio::time::timeout(Duration::from_secs(10), c.read_to_end(&mut out))
                        .await
                        .is_ok_and(|r| r.is_ok())
                        && out == b"echo\n"
                    {
                        served += 1;
                    }
                }
                served
            })
        })
        .collect();
    let mut served = 0;
    for t in tasks {
        served += t.await.unwrap();
    }
    let after = sluice.rss_kib();
    println!(
        "{sources} distinct sources in {:?}: {served} served, RSS {before} KiB -> {after} KiB",
        started.elapsed()
    );
    assert!(served * 100 >= sources * 99, "{served} of {sources} served");
    // Each source costs a rate bucket of a few dozen bytes at most.
    assert!(
        after < before + 64 * 1024,
        "RSS grew from {before} KiB to {after} KiB"
    );
}

/// A backend that expects a PROXY protocol header, then answers with the
/// client address it learned from it ("LOCAL" for a v2 LOCAL / v1 UNKNOWN
/// header, such as a health check's).
async fn proxy_aware_backend() -> (SocketAddr, tokio::sync::mpsc::UnboundedReceiver<String>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let at = l.local_addr().unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                continue;
            };
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 256];
                let said = loop {
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => break "no header".to_string(),
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                    match proxy::parse(&buf, None) {
                        Ok(Some(h)) => {
                            break h
                                .addresses
                                .map_or("LOCAL".to_string(), |(c, _)| c.ip().to_string());
                        }
                        Ok(None) => {}
                        Err(e) => break format!("bad header: {e}"),
                    }
                };
                let _ = tx.send(said.clone());
                let _ = s.write_all(format!("{said}\n").as_bytes()).await;
            });
        }
    });
    (at, rx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_protocol_is_required_from_trusted_proxies_and_refused_from_others() {
    for version in [ProxyVersion::V1, ProxyVersion::V2] {
        let (backend, mut seen) = proxy_aware_backend().await;
        let port = reserve_port();
        let v = version.as_str();
        let sluice = Sluice::start(&front_to_app(
            port,
            &format!(
                ", proxy_protocol: {{ accept: {v}, from: [127.0.0.10] }}, deny: [203.0.113.66]"
            ),
            &format!("proxy_protocol: {v}\nbackends: ['{backend}']"),
        ))
        .await;
        // The health check's header says LOCAL.
        let first = tokio::time::timeout(DEADLINE, seen.recv()).await.unwrap();
        assert_eq!(first.as_deref(), Some("LOCAL"), "{v}: checks send LOCAL");

        // A trusted proxy tells who the client is; the backend hears it.
        let client: SocketAddr = "203.0.113.9:40000".parse().unwrap();
        let mut c = connect_from("127.0.0.10", addr(port)).await;
        c.write_all(&proxy::header(version, client, addr(port)))
            .await
            .unwrap();
        let mut out = String::new();
        c.read_to_string(&mut out).await.unwrap();
        assert_eq!(
            out, "203.0.113.9\n",
            "{v}: the backend sees the real client"
        );

        // The client address from the header is what the rules judge.
        let denied: SocketAddr = "203.0.113.66:40000".parse().unwrap();
        let mut c = connect_from("127.0.0.10", addr(port)).await;
        c.write_all(&proxy::header(version, denied, addr(port)))
            .await
            .unwrap();
        let mut out = String::new();
        c.read_to_string(&mut out).await.unwrap();
        assert_eq!(out, "", "{v}: the header's client is denied");

        // A header from anyone else is a forgery: never honoured. It is
        // refused when it is already there at accept, and otherwise it is
        // only payload after sluice's own header, which names the sender.
        let mut c = connect_from("127.0.0.11", addr(port)).await;
        c.write_all(&proxy::header(version, client, addr(port)))
            .await
            .unwrap();
        let mut out = String::new();
        let _ = c.read_to_string(&mut out).await;
        assert!(
            out.is_empty() || out == "127.0.0.11\n",
            "{v}: a forged header is not believed: {out:?}"
        );

        // A trusted proxy that sends garbage instead of a header.
        let mut c = connect_from("127.0.0.10", addr(port)).await;
        c.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut out = String::new();
        let _ = c.read_to_string(&mut out).await;
        assert_eq!(out, "");

        // The proxy's own health check (v2 LOCAL / v1 UNKNOWN) is served,
        // as the proxy's own address.
        let mut c = connect_from("127.0.0.10", addr(port)).await;
        c.write_all(&proxy::check_header(version)).await.unwrap();
        let mut out = String::new();
        c.read_to_string(&mut out).await.unwrap();
        assert_eq!(out, "127.0.0.10\n", "{v}");

        let m = sluice.metrics().await;
        assert_eq!(rejected(&m, "acl"), 1.0, "{v}");
        assert!(rejected(&m, "proxy_protocol") >= 1.0, "{v}");
    }
}
