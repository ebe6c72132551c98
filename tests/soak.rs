//! Soak run (`make soak`, not part of `make test`): minutes of steady load
//! with churn, short connections, long-lived connections opened and closed
//! all the time, periodic reloads and a backend restarted now and then.
//! RSS and open file descriptors are sampled throughout; at the end they
//! must be back where they started.
//!
//! `SOAK_SECS` sets the length (default 300, at most 600).

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::Signal;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn config(port: u16, backends: &[SocketAddr], weight: u32) -> String {
    let list: String = backends
        .iter()
        .map(|a| format!("      - {{ address: '{a}', weight: {weight} }}\n"))
        .collect();
    format!(
        "admin: {{ bind: '{{admin}}' }}\n\
         listeners:\n  front: {{ bind: 127.0.0.1:{port}, pool: app, idle_timeout: 2m }}\n\
         pools:\n  app:\n    algorithm: least_connections\n    \
         health_check: {{ interval: 500ms, timeout: 200ms, rise: 2, fall: 2 }}\n    \
         backends:\n{list}"
    )
}

/// Keep `n` long-lived connections open, replacing a few every 100 ms; each
/// does an echo round trip when opened and before it is closed.
fn churn_long_lived(
    to: SocketAddr,
    n: usize,
    stop: Arc<AtomicBool>,
    failed: Arc<AtomicUsize>,
) -> tokio::task::JoinHandle<usize> {
    tokio::spawn(async move {
        let mut open: Vec<TcpStream> = Vec::new();
        let mut opened = 0;
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        while !stop.load(Ordering::Relaxed) {
            while open.len() < n && !stop.load(Ordering::Relaxed) {
                let mut c = match TcpStream::connect(to).await {
                    Ok(c) => c,
                    Err(_) => {
                        failed.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                };
                if round_trip(&mut c, b"hello\n").await {
                    open.push(c);
                    opened += 1;
                } else {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
            }
            for _ in 0..5.min(open.len()) {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                let mut c = open.swap_remove(rng as usize % open.len());
                if !round_trip(&mut c, b"bye\n").await {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        opened
    })
}

async fn round_trip(c: &mut TcpStream, msg: &[u8]) -> bool {
    let exchange = async {
        c.write_all(msg).await?;
        let mut back = vec![0u8; msg.len()];
        c.read_exact(&mut back).await?;
        Ok::<_, std::io::Error>(back == msg)
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(5), exchange).await,
        Ok(Ok(true))
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "minutes long; run with `make soak`"]
async fn soak_keeps_rss_and_fds_flat() {
    let secs: u64 = std::env::var("SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(300)
        .clamp(30, 600);
    let mut backends = [
        Backend::start("a", Behavior::Echo).await,
        Backend::start("b", Behavior::Echo).await,
        Backend::start("c", Behavior::Echo).await,
    ];
    let addrs: Vec<SocketAddr> = backends.iter().map(|b| b.addr).collect();
    let port = reserve_port();
    let front = SocketAddr::from(([127, 0, 0, 1], port));
    let sluice = Sluice::start(&config(port, &addrs, 1)).await;
    let idle_fds = sluice.open_fds();
    let idle_rss = sluice.rss_kib();

    let load = Load::start(front, 6, usize::MAX, Exchange::Echo);
    let stop = Arc::new(AtomicBool::new(false));
    let long_failed = Arc::new(AtomicUsize::new(0));
    let long = churn_long_lived(front, 300, Arc::clone(&stop), Arc::clone(&long_failed));

    println!("soak: {secs} s; idle before load: RSS {idle_rss} KiB, {idle_fds} fds");
    println!(
        "{:>6} {:>10} {:>6} {:>12} {:>8}",
        "t (s)", "RSS (KiB)", "fds", "connections", "reloads"
    );
    let started = Instant::now();
    let warm_up = Duration::from_secs(secs / 10);
    let (mut warm_rss, mut warm_fds, mut last_rss, mut last_fds) = (0, 0, 0, 0);
    let (mut reloads, mut restarts) = (0, 0);
    let mut tick = 0u64;
    while started.elapsed() < Duration::from_secs(secs) {
        tokio::time::sleep(Duration::from_secs(1)).await;
        tick += 1;
        if tick % 15 == 0 {
            sluice.rewrite_config(&config(port, &addrs, 1 + (tick / 15 % 3) as u32));
            sluice.signal(Signal::SIGHUP);
            reloads += 1;
        }
        if tick % 45 == 0 {
            // A backend restarts; with least_connections and retries no client notices.
            let b = &mut backends[(tick / 45 % 3) as usize];
            b.stop_and_wait().await;
            b.restart().await;
            restarts += 1;
        }
        if tick % 10 == 0 {
            (last_rss, last_fds) = (sluice.rss_kib(), sluice.open_fds());
            if warm_rss == 0 && started.elapsed() >= warm_up {
                (warm_rss, warm_fds) = (last_rss, last_fds);
            }
            println!(
                "{tick:>6} {last_rss:>10} {last_fds:>6} {:>12} {reloads:>8}",
                load.ok()
            );
        }
    }
    stop.store(true, Ordering::Relaxed);
    let opened = long.await.unwrap();
    let (ok, failed, errors) = load.finish().await;
    let long_failed = long_failed.load(Ordering::Relaxed);

    // Once every connection has ended, sluice holds what it held at idle.
    wait_until("connections drained", || async {
        sluice.metrics().await.value(
            "sluice_listener_connections_active",
            &[("listener", "front")],
        ) == 0.0
    })
    .await;
    let m = sluice.metrics().await;
    let successful_reloads = m.value("sluice_config_reloads_total", &[("result", "success")]);
    let end_fds = sluice.open_fds();
    let end_rss = sluice.rss_kib();
    println!(
        "soak result: {ok} short connections ({failed} failed), {opened} long-lived ({long_failed} failed), \
         {successful_reloads} reloads, {restarts} backend restarts; RSS {idle_rss} KiB idle -> {warm_rss} KiB warm -> {last_rss} KiB at the end \
         of load -> {end_rss} KiB idle; fds {idle_fds} idle -> {warm_fds} warm -> {last_fds} end of load -> {end_fds} idle"
    );
    // A restarting backend resets the connections waiting in its accept
    // queue: those clients' bytes already reached it, so sluice cannot
    // replay them elsewhere. At most a few per restart; nothing else fails.
    assert!(
        failed <= 2 * restarts,
        "{failed} failures, {restarts} restarts: {errors:?}"
    );
    assert_eq!(long_failed, 0);
    assert_eq!(successful_reloads, f64::from(reloads));
    // Health-check sockets come and go, so allow a few.
    assert!(
        end_fds <= idle_fds + 4,
        "fds {idle_fds} -> {end_fds}: a leak"
    );
    assert!(
        last_rss <= warm_rss + warm_rss / 4 + 2048,
        "RSS grew under steady load: {warm_rss} -> {last_rss} KiB"
    );
}
