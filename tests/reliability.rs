//! Faults provoked for real: backends killed under load and mid-transfer,
//! sessions closed by policy, file descriptors exhausted, silent and
//! unreachable backends, garbage bytes.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn backends(list: &[SocketAddr]) -> String {
    let l: Vec<String> = list.iter().map(|a| format!("'{a}'")).collect();
    format!("backends: [{}]", l.join(", "))
}

/// A small deterministic generator, so a failing run can be replayed.
struct Rng(u64);

impl Rng {
    fn next(&mut self, bound: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % bound
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_under_load_loses_no_client() {
    let mut pool = [
        Backend::start("a", Behavior::Name).await,
        Backend::start("b", Behavior::Name).await,
        Backend::start("c", Behavior::Name).await,
    ];
    let port = reserve_port();
    let addrs: Vec<SocketAddr> = pool.iter().map(|b| b.addr).collect();
    let sluice = Sluice::start(&front_to_app(
        port,
        "",
        &format!(
            "connect_attempts: 4\nhealth_check: {{ interval: 200ms, timeout: 100ms, rise: 2, fall: 2 }}\n{}",
            backends(&addrs)
        ),
    ))
    .await;

    let load = Load::start(addr(port), 6, 200_000, Exchange::Name);
    let seed = u64::from(std::process::id()) | 1;
    let mut rng = Rng(seed);
    // When each backend last came up; sluice trusts it after rise x interval.
    let mut up_since: [Option<Instant>; 3] = [Some(Instant::now()); 3];
    let trusted =
        |since: &Option<Instant>| since.is_some_and(|t| t.elapsed() > Duration::from_secs(1));
    let (mut kills, mut restarts) = (0, 0);
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(30) {
        tokio::time::sleep(Duration::from_millis(200 + rng.next(600))).await;
        let i = rng.next(3) as usize;
        // Keep at least one other backend up, and up long enough to be trusted.
        let others_trusted = (0..3).filter(|&j| j != i).any(|j| trusted(&up_since[j]));
        if up_since[i].is_some() && others_trusted {
            pool[i].kill().await;
            up_since[i] = None;
            kills += 1;
        } else if up_since[i].is_none() {
            pool[i].restart().await;
            up_since[i] = Some(Instant::now());
            restarts += 1;
        }
    }
    let (ok, failed, errors) = load.finish().await;
    println!(
        "failover under load (seed {seed}): {ok} connections served, {failed} failed, {kills} kills, {restarts} restarts in 30 s"
    );
    assert!(kills >= 10, "the chaos did happen");
    assert_eq!(
        failed, 0,
        "client failures while a backend was up: {errors:?}"
    );
    assert!(ok > 1000, "load was applied: {ok}");
    let m = sluice.metrics().await;
    assert_eq!(
        m.value(
            "sluice_listener_rejected_total",
            &[("listener", "front"), ("reason", "no_backend")]
        ),
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_killed_mid_transfer_ends_the_client_connection() {
    let mut streamer = Backend::start("streamer", Behavior::Stream).await;
    let port = reserve_port();
    let _sluice = Sluice::start(&front_to_app(port, "", &backends(&[streamer.addr]))).await;
    let mut c = TcpStream::connect(addr(port)).await.unwrap();
    let mut buf = vec![0u8; 8192];
    let mut got = 0;
    while got < 10_000 {
        got += c.read(&mut buf).await.unwrap();
    }
    streamer.kill().await;
    let ended = tokio::time::timeout(DEADLINE, async {
        loop {
            match c.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the client connection must end, not hang");
}

/// Hold `n` idle connections through `to` that reached the backend.
async fn hold(to: SocketAddr, n: usize) -> Vec<TcpStream> {
    let mut held = Vec::new();
    for _ in 0..n {
        let mut c = TcpStream::connect(to).await.unwrap();
        let mut first = [0u8; 1];
        c.read_exact(&mut first).await.unwrap();
        held.push(c);
    }
    held
}

async fn wait_closed(conns: Vec<TcpStream>) -> Duration {
    let started = Instant::now();
    for mut c in conns {
        let mut buf = [0u8; 4096];
        tokio::time::timeout(DEADLINE, async {
            loop {
                match c.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await
        .expect("connection closed by sluice");
    }
    started.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_backend_down_close_ends_sessions_within_fall_times_interval() {
    // Both relay paths: the fast path where this kernel passes its checks
    // (it says loudly when not).
    for listener in ["", ", fast_path: sockmap"] {
        backend_down_closes(listener).await;
    }
}

async fn backend_down_closes(listener: &str) {
    let mut hung = Backend::start("hung", Behavior::Stream).await;
    let port = reserve_port();
    let sluice = Sluice::start(&front_to_app(
        port,
        listener,
        &format!(
            "on_backend_down: close\nhealth_check: {{ interval: 200ms, timeout: 100ms, fall: 2 }}\n{}",
            backends(&[hung.addr])
        ),
    ))
    .await;
    if !listener.is_empty() {
        sluice.fast_path_verdict().await;
    }
    let held = hold(addr(port), 5).await;
    // The backend stops accepting (its checks fail) but keeps its sessions
    // open, like a hung server: sluice must close them itself.
    hung.stop_and_wait().await;
    let took = wait_closed(held).await;
    println!(
        "on_backend_down: close{listener}: 5 sessions closed {took:?} after the backend stopped (fall 2 x interval 200ms)"
    );
    assert!(
        took < Duration::from_secs(3),
        "within fall x interval plus slack: {took:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_backend_down_keep_leaves_sessions_alone() {
    let mut hung = Backend::start("hung", Behavior::Stream).await;
    let port = reserve_port();
    let sluice = Sluice::start(&front_to_app(
        port,
        "",
        &format!(
            "health_check: {{ interval: 200ms, timeout: 100ms, fall: 2 }}\n{}",
            backends(&[hung.addr])
        ),
    ))
    .await;
    let mut held = hold(addr(port), 2).await;
    hung.stop_and_wait().await;
    wait_until("marked down", || async {
        sluice.backend_state("app", hung.addr).await == "down"
    })
    .await;
    let mut buf = [0u8; 1024];
    for c in &mut held {
        assert!(
            c.read(&mut buf).await.unwrap() > 0,
            "the session still streams"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_failback_close_moves_sessions_back_to_the_primary() {
    let mut first = Backend::start("first", Behavior::Stream).await;
    let second = Backend::start("second", Behavior::Stream).await;
    let port = reserve_port();
    let sluice = Sluice::start(&front_to_app(
        port,
        "",
        &format!(
            "mode: active_passive\non_failback: close\nhealth_check: {{ interval: 100ms, timeout: 100ms, rise: 2, fall: 1 }}\n{}",
            backends(&[first.addr, second.addr])
        ),
    ))
    .await;
    first.stop_and_wait().await;
    sluice.wait_active("app", &[second.addr]).await;
    let on_standby = hold(addr(port), 3).await;
    first.restart().await;
    sluice.wait_active("app", &[first.addr]).await;
    wait_closed(on_standby).await;
    assert_eq!(read_first_line(addr(port)).await, "first");
}

async fn read_first_line(to: SocketAddr) -> String {
    let mut c = TcpStream::connect(to).await.unwrap();
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while c.read_exact(&mut b).await.is_ok() && b[0] != b'\n' {
        line.push(b[0]);
    }
    String::from_utf8(line).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_file_descriptors_refuses_logs_briefly_and_recovers() {
    let echo = Backend::start("echo", Behavior::Echo).await;
    let port = reserve_port();
    let yaml = front_to_app(
        port,
        "",
        &format!(
            "health_check: {{ interval: 200ms, timeout: 100ms }}\n{}",
            backends(&[echo.addr])
        ),
    );
    // How many descriptors sluice needs when idle, then room for a few connections.
    let baseline = {
        let probe =
            Sluice::start(&yaml.replace(&port.to_string(), &reserve_port().to_string())).await;
        probe.open_fds()
    };
    let limit = baseline as u32 + 10;
    let sluice = Sluice::spawn_with_fd_limit(&yaml, limit);
    sluice.wait_ready().await;

    let started = Instant::now();
    let (mut served, mut refused) = (Vec::new(), 0);
    for i in 0..40u32 {
        let Ok(mut c) = TcpStream::connect(addr(port)).await else {
            refused += 1;
            continue;
        };
        let msg = i.to_be_bytes();
        let echoed = async {
            c.write_all(&msg).await?;
            let mut back = [0u8; 4];
            c.read_exact(&mut back).await?;
            Ok::<_, std::io::Error>(back)
        };
        match tokio::time::timeout(Duration::from_secs(3), echoed).await {
            Ok(Ok(back)) if back == msg => served.push(c),
            _ => refused += 1,
        }
    }
    assert!(
        !served.is_empty(),
        "some clients were served under the limit"
    );
    assert!(refused > 0, "the rest were refused, not left hanging");
    assert!(sluice.try_wait().is_none(), "sluice keeps running");
    // The limit is named (it was always `?`: reading it took a descriptor).
    sluice
        .wait_log(&format!("out of file descriptors (limit {limit})"))
        .await;

    // Descriptors free up: service resumes.
    drop(served);
    wait_until("new clients served again", || async {
        let Ok(mut c) = TcpStream::connect(addr(port)).await else {
            return false;
        };
        if c.write_all(b"back").await.is_err() {
            return false;
        }
        let mut b = [0u8; 4];
        matches!(
            tokio::time::timeout(Duration::from_secs(1), c.read_exact(&mut b)).await,
            Ok(Ok(_))
        ) && &b == b"back"
    })
    .await;
    let m = sluice.metrics().await;
    assert!(
        m.value(
            "sluice_listener_rejected_total",
            &[("listener", "front"), ("reason", "fd_limit")]
        ) >= 1.0
    );
    assert_eq!(
        sluice.backend_state("app", echo.addr).await,
        "up",
        "running out of fds is not the backend's fault"
    );
    let lines = sluice.log().matches("out of file descriptors").count();
    let seconds = started.elapsed().as_secs() as usize + 1;
    println!(
        "fd exhaustion (limit {limit}): {refused} of 40 refused, {lines} log lines in {seconds} s"
    );
    assert!(
        lines <= 2 * seconds + 2,
        "logged without flooding: {lines} lines in {seconds} s"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_backend_is_cut_by_the_idle_timeout() {
    let silent = Backend::start("silent", Behavior::Silent).await;
    let port = reserve_port();
    let _sluice = Sluice::start(&front_to_app(
        port,
        ", idle_timeout: 500ms",
        &backends(&[silent.addr]),
    ))
    .await;
    let mut c = TcpStream::connect(addr(port)).await.unwrap();
    c.write_all(b"anyone there?").await.unwrap();
    let started = Instant::now();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(DEADLINE, c.read(&mut buf))
        .await
        .expect("closed by the idle timeout");
    assert!(matches!(n, Ok(0) | Err(_)));
    assert!(
        started.elapsed() >= Duration::from_millis(450),
        "not before the timeout"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_backend_costs_at_most_connect_timeout() {
    let mut doomed = Backend::start("doomed", Behavior::Name).await;
    let good = Backend::start("good", Behavior::Name).await;
    let port = reserve_port();
    let sluice = Sluice::start(&front_to_app(
        port,
        "",
        &format!(
            "connect_timeout: 300ms\nhealth_check: {{ interval: 1m, timeout: 1s, fall: 2 }}\n{}",
            backends(&[doomed.addr, good.addr])
        ),
    ))
    .await;
    // Checked up at start, then it stops completing handshakes.
    doomed.stop_and_wait().await;
    let hole = Blackhole::at(doomed.addr);
    assert!(hole.holds(Duration::from_millis(200)));
    let mut slowest = Duration::ZERO;
    for _ in 0..6 {
        let started = Instant::now();
        assert_eq!(read_all(addr(port)).await, "good\n");
        slowest = slowest.max(started.elapsed());
    }
    println!("unreachable backend: slowest client waited {slowest:?} (connect_timeout 300ms)");
    assert!(
        slowest < Duration::from_millis(1300),
        "one connect timeout, then the next candidate: {slowest:?}"
    );
    // Two timeouts (fall) marked it down: later clients do not wait at all.
    assert_eq!(sluice.backend_state("app", doomed.addr).await, "down");
    let m = sluice.metrics().await;
    let timeouts = m.value(
        "sluice_backend_connect_errors_total",
        &[
            ("pool", "app"),
            ("backend", &doomed.addr.to_string()),
            ("kind", "timeout"),
        ],
    );
    assert_eq!(timeouts, 2.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_bytes_pass_through_and_crash_nothing() {
    let echo = Backend::start("echo", Behavior::Echo).await;
    let port = reserve_port();
    let sluice = Sluice::start(&front_to_app(port, "", &backends(&[echo.addr]))).await;
    let mut rng = Rng(0x5eed);
    for round in 0..20 {
        let len = 1 + rng.next(200_000) as usize;
        let data: Vec<u8> = (0..len).map(|_| rng.next(256) as u8).collect();
        let c = TcpStream::connect(addr(port)).await.unwrap();
        let (mut r, mut w) = c.into_split();
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            w.write_all(&sent).await.unwrap();
            w.shutdown().await.unwrap();
        });
        let mut back = Vec::new();
        r.read_to_end(&mut back).await.unwrap();
        writer.await.unwrap();
        assert_eq!(back, data, "round {round}");
    }
    // Clients that vanish mid-write (reset) leave sluice serving.
    for _ in 0..20 {
        let mut c = TcpStream::connect(addr(port)).await.unwrap();
        c.write_all(&[0xff; 70_000]).await.unwrap();
        // Linger 0: close sends a reset.
        socket2::SockRef::from(&c)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        drop(c);
    }
    let (status, _) = http_get(sluice.admin, "/healthz").await.unwrap();
    assert_eq!(status, 200);
    assert!(sluice.try_wait().is_none());
}

/// A backend that accepts, stays silent, and closes each connection after
/// `after` (Redis `timeout`, MySQL `wait_timeout`); a task until dropped.
async fn idle_closer(after: Duration) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let at = l.local_addr().unwrap();
    let task = tokio::spawn(async move {
        loop {
            let Ok((sock, _)) = l.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                tokio::time::sleep(after).await;
                drop(sock);
            });
        }
    });
    (at, task)
}

/// Issue 13, item 1: a backend closing an idle connection on purpose is
/// the end of that session, passed to the client, not a failed connect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_closing_an_idle_session_ends_it_and_is_not_a_failed_connect() {
    let (closer, _task) = idle_closer(Duration::from_secs(1)).await;
    let other = Backend::start("other", Behavior::Name).await;
    let port = reserve_port();
    let sluice = Sluice::start(&front_to_app(
        port,
        "",
        &format!(
            "on_backend_down: close\nhealth_check: {{ interval: 5s, timeout: 1s, fall: 2 }}\n{}",
            backends(&[closer, other.addr])
        ),
    ))
    .await;
    let label = closer.to_string();
    let on_closer = [("pool", "app"), ("backend", label.as_str())];
    // Three silent clients in a row land on the idle closer (round robin
    // alternates, so take every other one) and wait for it to close them.
    let mut ended = 0;
    while ended < 3 {
        let mut c = TcpStream::connect(addr(port)).await.unwrap();
        let mut got = Vec::new();
        let read = tokio::time::timeout(DEADLINE, c.read_to_end(&mut got)).await;
        assert!(read.is_ok(), "the session ended");
        if got.is_empty() {
            ended += 1;
        } else {
            assert_eq!(
                got, b"other\n",
                "a client of the idle closer was moved elsewhere"
            );
        }
    }
    let m = sluice.metrics().await;
    for kind in ["refused", "timeout", "other"] {
        let mut labels = on_closer.to_vec();
        labels.push(("kind", kind));
        assert_eq!(
            m.value("sluice_backend_connect_errors_total", &labels),
            0.0,
            "an idle close is not a connect error ({kind})"
        );
    }
    assert_eq!(
        m.value("sluice_backend_connections_total", &on_closer),
        3.0,
        "each session counted once"
    );
    assert_eq!(sluice.backend_state("app", closer).await, "up");
    assert_eq!(m.value("sluice_backend_up", &on_closer), 1.0);
}

/// A host name other than `localhost` that this machine's /etc/hosts maps
/// to a loopback address (Debian maps its own host name so), if any.
fn loopback_name() -> Option<String> {
    let hosts = std::fs::read_to_string("/etc/hosts").ok()?;
    hosts.lines().find_map(|line| {
        let mut fields = line.split('#').next()?.split_whitespace();
        let ip: std::net::IpAddr = fields.next()?.parse().ok()?;
        if !ip.is_ipv4() || !ip.is_loopback() {
            return None;
        }
        fields
            .find(|name| !name.eq_ignore_ascii_case("localhost") && !name.ends_with(".localhost"))
            .map(str::to_string)
    })
}

/// Issue 9, item 6 (at run time): two listeners that forward to each other
/// through a host name that resolves to this machine make a loop that
/// validation cannot see; the chain is followed and cut after a few hops,
/// with the client refused rather than the fd table filled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_loop_through_two_listeners_is_cut_and_counted() {
    let Some(name) = loopback_name() else {
        eprintln!("SKIPPED: /etc/hosts maps no name but localhost to a loopback address");
        return;
    };
    let (pa, pb) = (reserve_port(), reserve_port());
    let check = "health_check: { interval: 100ms, timeout: 100ms }";
    let yaml = format!(
        "admin: {{ bind: '{{admin}}' }}\n\
         listeners:\n  a: {{ bind: 0.0.0.0:{pa}, pool: to_b }}\n  b: {{ bind: 0.0.0.0:{pb}, pool: to_a }}\n\
         pools:\n  to_b: {{ {check}, backends: ['{name}:{pb}'] }}\n  \
         to_a: {{ {check}, backends: ['{name}:{pa}'] }}\n"
    );
    let sluice = Sluice::start(&yaml).await;
    // Each pool's backend is the other listener, open only after the
    // first round: wait until the checks see them up.
    wait_until("both pools see the other listener up", || async {
        sluice.active_backends("to_b").await.len() == 1
            && sluice.active_backends("to_a").await.len() == 1
    })
    .await;
    let fds_before = sluice.open_fds();
    let mut c = TcpStream::connect(addr(pa)).await.unwrap();
    c.write_all(b"hello").await.unwrap();
    let mut got = Vec::new();
    let ended = tokio::time::timeout(DEADLINE, c.read_to_end(&mut got)).await;
    assert!(ended.is_ok(), "the looping client is closed");
    assert!(got.is_empty());
    let m = sluice.metrics().await;
    let loops: f64 = ["a", "b"]
        .iter()
        .map(|l| {
            m.value(
                "sluice_listener_rejected_total",
                &[("listener", l), ("reason", "loop")],
            )
        })
        .sum();
    // The health checks of both pools loop too (they reach the listeners).
    assert!(loops >= 1.0, "the chain is cut by a refusal");
    sluice.wait_log("proxy loop").await;
    // Bounded: a few chains of at most MAX_HOPS connections (the checks'
    // included), never the fd table filling up.
    let fds = sluice.open_fds();
    assert!(fds < fds_before + 100, "{fds} fds, {fds_before} before");
}
