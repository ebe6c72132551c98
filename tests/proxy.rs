//! Byte relaying through sluice: both directions, large transfers with
//! checksums, half-close, a backend that closes first, idle timeout and
//! `max_connections`.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

fn config(port: u16, backend: SocketAddr, listener: &str) -> String {
    front_to_app(
        port,
        listener,
        &format!(
            "health_check: {{ interval: 200ms, timeout: 100ms, rise: 1, fall: 1 }}\nbackends: ['{backend}']"
        ),
    )
}

/// Deterministic pseudo-random bytes.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_flow_both_ways() {
    let echo = Backend::start("echo", Behavior::Echo).await;
    let port = reserve_port();
    let sluice = Sluice::start(&config(port, echo.addr, "")).await;
    let mut c = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    for round in 0..3 {
        let msg = format!("ping {round}\n");
        c.write_all(msg.as_bytes()).await.unwrap();
        let mut got = vec![0u8; msg.len()];
        c.read_exact(&mut got).await.unwrap();
        assert_eq!(got, msg.as_bytes());
    }
    // Server-first protocols work too: the backend speaks before the client.
    let named = Backend::start("banner", Behavior::Name).await;
    let port2 = reserve_port();
    let _s2 = Sluice::start(&config(port2, named.addr, "")).await;
    assert_eq!(
        read_all(format!("127.0.0.1:{port2}").parse().unwrap()).await,
        "banner\n"
    );
    drop(sluice);
}

/// A backend that, per connection, hashes everything it receives while
/// sending `len` bytes of its own (once the client has sent its first byte,
/// so health checks get nothing), then reports what it received.
async fn exchange_backend(
    len: usize,
) -> (SocketAddr, tokio::sync::mpsc::Receiver<(usize, Vec<u8>)>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let data = std::sync::Arc::new(pattern(2, len));
    tokio::spawn(async move {
        loop {
            let (sock, _) = listener.accept().await.unwrap();
            let (tx, data) = (tx.clone(), std::sync::Arc::clone(&data));
            tokio::spawn(async move {
                let (mut r, mut w) = sock.into_split();
                let mut buf = vec![0u8; 64 * 1024];
                let mut hash = Sha256::new();
                let first = match r.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(k) => k,
                };
                hash.update(&buf[..first]);
                let send = tokio::spawn(async move {
                    w.write_all(&data).await.unwrap();
                    w.shutdown().await.unwrap();
                });
                let mut n = first;
                loop {
                    let k = r.read(&mut buf).await.unwrap();
                    if k == 0 {
                        break;
                    }
                    n += k;
                    hash.update(&buf[..k]);
                }
                send.await.unwrap();
                let _ = tx.send((n, hash.finalize().to_vec())).await;
            });
        }
    });
    (addr, rx)
}

/// Listener settings for the relay engines: splice (the default), the
/// buffer copy, and the in-kernel fast path (which falls back to splice
/// where the kernel fails its checks; [`start`] says so loudly).
const ENGINES: [&str; 3] = ["", ", splice: false", ", fast_path: sockmap"];

/// Start sluice; for the fast path, once its verdict on this kernel is in
/// (whether it relays in the kernel).
async fn start(yaml: &str, engine: &str) -> (Sluice, bool) {
    let sluice = Sluice::start(yaml).await;
    let in_kernel = engine.contains("sockmap") && sluice.fast_path_verdict().await;
    (sluice, in_kernel)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_mib_each_way_arrive_intact() {
    const LEN: usize = 64 << 20;
    let (backend, mut reports) = exchange_backend(LEN).await;
    for engine in ENGINES {
        sixty_four_mib_each_way(backend, &mut reports, engine).await;
    }
}

async fn sixty_four_mib_each_way(
    backend: SocketAddr,
    reports: &mut tokio::sync::mpsc::Receiver<(usize, Vec<u8>)>,
    engine: &str,
) {
    const LEN: usize = 64 << 20;
    let port = reserve_port();
    let (sluice, in_kernel) = start(&config(port, backend, engine), engine).await;

    let c = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let (mut r, mut w) = c.into_split();
    let sent = pattern(1, LEN);
    let sent_hash = Sha256::digest(&sent).to_vec();
    let writer = tokio::spawn(async move {
        w.write_all(&sent).await.unwrap();
        w.shutdown().await.unwrap();
    });
    let mut got_hash = Sha256::new();
    let mut got = 0;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let k = r.read(&mut buf).await.unwrap();
        if k == 0 {
            break;
        }
        got += k;
        got_hash.update(&buf[..k]);
    }
    writer.await.unwrap();
    assert_eq!(got, LEN, "backend to client length ({engine:?})");
    assert_eq!(
        got_hash.finalize().to_vec(),
        Sha256::digest(pattern(2, LEN)).to_vec(),
        "backend to client checksum ({engine:?})"
    );
    let (n, hash) = tokio::time::timeout(DEADLINE, reports.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(n, LEN, "client to backend length ({engine:?})");
    assert_eq!(hash, sent_hash, "client to backend checksum ({engine:?})");

    // Every byte is counted.
    let m = sluice.metrics().await;
    assert_eq!(
        m.value(
            "sluice_listener_bytes_total",
            &[("listener", "front"), ("direction", "in")]
        ),
        LEN as f64
    );
    assert_eq!(
        m.value(
            "sluice_listener_bytes_total",
            &[("listener", "front"), ("direction", "out")]
        ),
        LEN as f64
    );
    // The default engine splices bulk data; the copy engine never does;
    // the kernel path moves it without sluice.
    let spliced = m.value(
        "sluice_listener_spliced_bytes_total",
        &[("listener", "front")],
    );
    let relayed = |path| {
        m.value(
            "sluice_listener_relayed_connections_total",
            &[("listener", "front"), ("path", path)],
        )
    };
    let path = if in_kernel { "sockmap" } else { "normal" };
    assert_eq!(relayed(path), 1.0, "the connection went the {path} path");
    if in_kernel {
        assert_eq!(spliced, 0.0, "the kernel moved the bytes");
    } else if !engine.contains("splice: false") {
        assert!(
            spliced > LEN as f64,
            "most of 128 MiB went through pipes: {spliced}"
        );
    } else {
        assert_eq!(spliced, 0.0, "splice: false copies through buffers");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_closed_client_still_gets_the_whole_reply() {
    // Answers only after the request is complete (EOF), like many RPC servers.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let mut req = Vec::new();
                if s.read_to_end(&mut req).await.is_err() || req.is_empty() {
                    return;
                }
                let mut reply = format!("got {} bytes\n", req.len()).into_bytes();
                reply.extend(pattern(3, 1 << 20));
                let _ = s.write_all(&reply).await;
            });
        }
    });
    for engine in ENGINES {
        let port = reserve_port();
        let _sluice = start(&config(port, backend, engine), engine).await;
        let mut c = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        c.write_all(b"the whole request").await.unwrap();
        c.shutdown().await.unwrap();
        let mut reply = Vec::new();
        tokio::time::timeout(DEADLINE, c.read_to_end(&mut reply))
            .await
            .unwrap()
            .unwrap();
        let head = b"got 17 bytes\n";
        assert_eq!(&reply[..head.len()], head, "{engine:?}");
        assert_eq!(&reply[head.len()..], &pattern(3, 1 << 20)[..], "{engine:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_closing_first_ends_the_connection_cleanly() {
    let named = Backend::start("bye", Behavior::Name).await;
    for engine in ENGINES {
        let port = reserve_port();
        let (sluice, _) = start(&config(port, named.addr, engine), engine).await;
        let mut c = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let mut got = String::new();
        tokio::time::timeout(DEADLINE, c.read_to_string(&mut got))
            .await
            .expect("EOF after the backend closed")
            .unwrap();
        assert_eq!(got, "bye\n", "{engine:?}");
        drop(c);
        wait_until("no connection left open", || async {
            let m = sluice.metrics().await;
            m.value(
                "sluice_listener_connections_active",
                &[("listener", "front")],
            ) == 0.0
                && m.value(
                    "sluice_backend_connections_active",
                    &[("pool", "app"), ("backend", &named.addr.to_string())],
                ) == 0.0
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_closed_busy_ones_are_not() {
    let echo = Backend::start("echo", Behavior::Echo).await;
    for engine in ENGINES {
        idle_closed_busy_kept(&echo, engine).await;
    }
}

async fn idle_closed_busy_kept(echo: &Backend, engine: &str) {
    let port = reserve_port();
    let listener = format!(", idle_timeout: 400ms{engine}");
    let _sluice = start(&config(port, echo.addr, &listener), engine).await;

    let mut busy = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let mut idle = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let started = Instant::now();
    let idle_closed = tokio::spawn(async move {
        let mut buf = [0u8; 1];
        let n = tokio::time::timeout(DEADLINE, idle.read(&mut buf))
            .await
            .expect("idle connection closed");
        (n.map(|n| n == 0).unwrap_or(true), started.elapsed())
    });
    // Traffic every 100 ms keeps the busy one alive well past the limit.
    while !idle_closed.is_finished() || started.elapsed() < Duration::from_millis(1200) {
        busy.write_all(b"x").await.unwrap();
        let mut one = [0u8; 1];
        busy.read_exact(&mut one)
            .await
            .expect("busy connection still open");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (eof, after) = idle_closed.await.unwrap();
    assert!(eof, "idle connection ended with EOF or reset");
    assert!(
        after >= Duration::from_millis(400),
        "closed before the idle timeout: {after:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connections_refuses_and_counts() {
    let echo = Backend::start("echo", Behavior::Echo).await;
    let port = reserve_port();
    let sluice = Sluice::start(&config(port, echo.addr, ", max_connections: 2")).await;
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut c = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        c.write_all(b"hi").await.unwrap();
        let mut b = [0u8; 2];
        c.read_exact(&mut b).await.unwrap();
        held.push(c);
    }
    let mut third = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(DEADLINE, third.read_to_end(&mut buf))
        .await
        .expect("refused connection closed");
    assert!(buf.is_empty());
    let m = sluice.metrics().await;
    assert_eq!(
        m.value(
            "sluice_listener_rejected_total",
            &[("listener", "front"), ("reason", "max_connections")]
        ),
        1.0
    );
    // A slot frees up: the next client is served.
    drop(held.pop());
    wait_until("a slot is free", || async {
        sluice.metrics().await.value(
            "sluice_listener_connections_active",
            &[("listener", "front")],
        ) == 1.0
    })
    .await;
    let mut c = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    c.write_all(b"ok").await.unwrap();
    let mut b = [0u8; 2];
    c.read_exact(&mut b).await.unwrap();
    assert_eq!(&b, b"ok");
}

/// `fast_path: sockmap` says once, in the log, whether this kernel keeps the
/// relay's semantics, and the metrics say which path each connection took.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fast_path_reports_its_verdict_once_and_counts_each_path() {
    let echo = Backend::start("echo", Behavior::Echo).await;
    let port = reserve_port();
    let yaml = config(port, echo.addr, ", fast_path: sockmap");
    let (sluice, in_kernel) = start(&yaml, ", fast_path: sockmap").await;
    for round in 0..3 {
        let mut c = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let msg = format!("round {round}\n");
        c.write_all(msg.as_bytes()).await.unwrap();
        let mut got = vec![0u8; msg.len()];
        c.read_exact(&mut got).await.unwrap();
        assert_eq!(got, msg.as_bytes());
    }
    let m = sluice.metrics().await;
    let relayed = |path| {
        m.value(
            "sluice_listener_relayed_connections_total",
            &[("listener", "front"), ("path", path)],
        )
    };
    let (taken, other) = if in_kernel {
        ("sockmap", "normal")
    } else {
        ("normal", "sockmap")
    };
    assert_eq!((relayed(taken), relayed(other)), (3.0, 0.0));
    // Every byte counted on either path (the kernel's counters are read on
    // scrape; the relay counts a write once it returned, which may be just
    // after the client read it: polled).
    wait_until("24 bytes counted each way", || async {
        let m = sluice.metrics().await;
        let bytes = |d| {
            m.value(
                "sluice_listener_bytes_total",
                &[("listener", "front"), ("direction", d)],
            )
        };
        (bytes("in"), bytes("out")) == (24.0, 24.0)
    })
    .await;
    let verdicts = sluice
        .log()
        .lines()
        .filter(|l| l.contains("fast_path: sockmap"))
        .count();
    assert_eq!(verdicts, 1, "one line says why: {}", sluice.log());
}
