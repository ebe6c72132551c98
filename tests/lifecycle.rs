//! Signals: SIGTERM drains (unready, then listeners close, then open
//! connections finish or are cut at the timeout), SIGINT exits at once,
//! SIGHUP reloads and does not kill; `-d` daemonizes.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::Signal;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn config(port: u16, backend: SocketAddr, grace: &str, timeout: &str) -> String {
    config_with(port, backend, grace, timeout, "")
}

fn config_with(
    port: u16,
    backend: SocketAddr,
    grace: &str,
    timeout: &str,
    listener: &str,
) -> String {
    let pool = format!(
        "health_check: {{ interval: 200ms, timeout: 100ms, rise: 1, fall: 1 }}\nbackends: ['{backend}']"
    );
    format!(
        "server: {{ grace_period: {grace}, shutdown_timeout: {timeout} }}\n{}",
        front_to_app(port, listener, &pool)
    )
}

async fn echo_once(c: &mut TcpStream, msg: &[u8]) {
    c.write_all(msg).await.unwrap();
    let mut got = vec![0u8; msg.len()];
    c.read_exact(&mut got).await.unwrap();
    assert_eq!(got, msg);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_an_open_connection_finish_then_exits_zero() {
    // Both relay paths: the fast path where this kernel passes its checks.
    for listener in ["", ", fast_path: sockmap"] {
        open_connection_finishes(listener).await;
    }
}

async fn open_connection_finishes(listener: &str) {
    let echo = Backend::start("echo", Behavior::Echo).await;
    let port = reserve_port();
    let sluice = Sluice::start(&config_with(port, echo.addr, "500ms", "20s", listener)).await;
    if !listener.is_empty() {
        sluice.fast_path_verdict().await;
    }
    let mut c = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    echo_once(&mut c, b"before").await;

    sluice.signal(Signal::SIGTERM);
    wait_until("unready after SIGTERM", || async {
        matches!(
            http_get(sluice.admin, "/readyz").await,
            Ok((503, _)) | Err(_)
        )
    })
    .await;
    // After the grace period the listener is closed...
    wait_until("listener closed", || async {
        TcpStream::connect(("127.0.0.1", port)).await.is_err()
    })
    .await;
    // ...while the open connection keeps working.
    echo_once(&mut c, b"during shutdown").await;
    assert!(
        sluice.try_wait().is_none(),
        "still running while a connection is open"
    );

    let closed = Instant::now();
    c.shutdown().await.unwrap();
    let mut rest = Vec::new();
    c.read_to_end(&mut rest).await.unwrap();
    drop(c);
    let status = sluice.wait_exit(Duration::from_secs(10)).await;
    assert_eq!(status.code(), Some(0), "{}", sluice.log());
    assert!(
        closed.elapsed() < Duration::from_secs(10),
        "exited well before the 20s timeout"
    );
    sluice.wait_log("all connections finished; exiting").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_cuts_connections_that_outlive_the_timeout() {
    let echo = Backend::start("echo", Behavior::Echo).await;
    let port = reserve_port();
    let sluice = Sluice::start(&config(port, echo.addr, "0s", "1s")).await;
    let mut c = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    echo_once(&mut c, b"hello").await;
    let started = Instant::now();
    sluice.signal(Signal::SIGTERM);
    let status = sluice.wait_exit(Duration::from_secs(10)).await;
    assert_eq!(status.code(), Some(0));
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "the connection got its full timeout"
    );
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(DEADLINE, c.read_to_end(&mut rest))
        .await
        .expect("connection closed");
    sluice
        .wait_log("shutdown timeout (1s) reached: closing 1 open connection(s)")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_exits_at_once() {
    let echo = Backend::start("echo", Behavior::Echo).await;
    let port = reserve_port();
    let sluice = Sluice::start(&config(port, echo.addr, "5s", "30s")).await;
    let mut c = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    echo_once(&mut c, b"hello").await;
    sluice.signal(Signal::SIGINT);
    // Well under the 5 s grace period and 30 s timeout.
    let status = sluice.wait_exit(Duration::from_secs(3)).await;
    assert_eq!(status.code(), Some(0), "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_does_not_kill() {
    let named = Backend::start("still-here", Behavior::Name).await;
    let port = reserve_port();
    let sluice = Sluice::start(&config(port, named.addr, "1s", "5s")).await;
    sluice.signal(Signal::SIGHUP);
    sluice.wait_log("SIGHUP received").await;
    assert!(sluice.try_wait().is_none());
    assert_eq!(
        read_all(SocketAddr::from(([127, 0, 0, 1], port))).await,
        "still-here\n"
    );
    let (status, _) = http_get(sluice.admin, "/readyz").await.unwrap();
    assert_eq!(status, 200);
}

/// `-d`: the command returns at once, the daemon writes its pid file,
/// serves, and drains on SIGTERM like the foreground process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_mode_writes_its_pid_file_serves_and_stops_on_sigterm() {
    use nix::sys::signal::kill;
    use nix::unistd::Pid;
    let b = Backend::start("b", Behavior::Name).await;
    let (port, admin) = (reserve_port(), reserve_port());
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("sluice.pid");
    let yaml = config(port, b.addr, "0s", "5s")
        .replace(
            "server: {",
            &format!("server: {{ pid_file: '{}', ", pid_file.display()),
        )
        .replace("{admin}", &format!("127.0.0.1:{admin}"));
    let config_path = dir.path().join("sluice.yaml");
    std::fs::write(&config_path, yaml).unwrap();
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
        .arg("-d")
        .arg("-c")
        .arg(&config_path)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(
        status.success(),
        "the foreground command returns once daemonized"
    );
    let mut pid = None;
    wait_until("pid file written", || {
        let text = std::fs::read_to_string(&pid_file).unwrap_or_default();
        pid = text.trim().parse::<i32>().ok();
        async move { pid.is_some() }
    })
    .await;
    let pid = Pid::from_raw(pid.unwrap());
    // Stop the daemon even if an assertion below fails.
    struct Stop(Pid);
    impl Drop for Stop {
        fn drop(&mut self) {
            let _ = kill(self.0, Signal::SIGKILL);
        }
    }
    let _guard = Stop(pid);
    let admin = SocketAddr::from(([127, 0, 0, 1], admin));
    wait_until("daemon ready", || async {
        matches!(http_get(admin, "/readyz").await, Ok((200, _)))
    })
    .await;
    assert_eq!(
        read_all(SocketAddr::from(([127, 0, 0, 1], port))).await,
        "b\n"
    );
    kill(pid, Signal::SIGTERM).unwrap();
    // Gone, or a zombie waiting for whoever reaps orphans here.
    let exited = move || {
        kill(pid, None).is_err()
            || std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
                s.rsplit(") ")
                    .next()
                    .is_some_and(|rest| rest.starts_with('Z'))
            })
    };
    wait_until("daemon exited", || async move { exited() }).await;
}

/// Replace `path` by a FIFO nobody writes to: opening it for reading blocks.
fn make_fifo(path: &std::path::Path) {
    std::fs::remove_file(path).unwrap();
    let status = std::process::Command::new("mkfifo")
        .arg(path)
        .status()
        .unwrap();
    assert!(status.success(), "mkfifo");
}

/// Issue 9, item 3: a reload that cannot finish (the config path became a
/// FIFO) holds up neither the admin listener nor SIGTERM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_a_reload_that_cannot_finish_still_drains_at_once() {
    let echo = Backend::start("echo", Behavior::Echo).await;
    let port = reserve_port();
    let sluice = Sluice::start(&config(port, echo.addr, "1s", "2s")).await;
    make_fifo(&sluice.config_path);
    sluice.signal(Signal::SIGHUP);
    let admin = sluice.admin;
    let post = tokio::spawn(async move { http_request(admin, "POST", "/api/v1/reload").await });
    // The admin listener still answers at once.
    let metrics = tokio::time::timeout(Duration::from_secs(5), http_get(admin, "/metrics")).await;
    assert!(
        matches!(metrics, Ok(Ok((200, _)))),
        "/metrics answers during the reload: {metrics:?}"
    );
    let started = Instant::now();
    sluice.signal(Signal::SIGTERM);
    wait_until("unready at once after SIGTERM", || async {
        matches!(http_get(admin, "/readyz").await, Ok((503, _)) | Err(_))
    })
    .await;
    let status = sluice.wait_exit(DEADLINE).await;
    assert!(status.success(), "{status:?}");
    let took = started.elapsed();
    // grace_period + shutdown_timeout, with room for a slow machine.
    assert!(took < Duration::from_secs(3 + 5), "exit took {took:?}");
    // The POST got an answer or lost its connection when the process
    // exited; either way it did not hang the admin.
    let _ = tokio::time::timeout(DEADLINE, post).await.unwrap();
}

/// A shutdown during start-up (the first check round still running) drains
/// and exits like any other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_start_up_exits_within_the_drain_times() {
    let hole = Blackhole::new();
    let port = reserve_port();
    let yaml = format!(
        "server: {{ grace_period: 1s, shutdown_timeout: 2s }}\n{}",
        front_to_app(
            port,
            "",
            &format!(
                "health_check: {{ interval: 9s, timeout: 8s }}\nbackends: ['{}']",
                hole.addr
            )
        )
    );
    let sluice = Sluice::spawn(&yaml);
    wait_until("the admin answers", || async {
        http_get(sluice.admin, "/healthz").await.is_ok()
    })
    .await;
    let started = Instant::now();
    sluice.signal(Signal::SIGTERM);
    let status = sluice.wait_exit(DEADLINE).await;
    assert!(status.success(), "{status:?}");
    let took = started.elapsed();
    assert!(took < Duration::from_secs(3 + 5), "exit took {took:?}");
}
