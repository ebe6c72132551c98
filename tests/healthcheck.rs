//! `sluice healthcheck`, the container HEALTHCHECK and keepalived track
//! script: against a real sluice (ready, draining), against nothing, and
//! against peers that are not sluice (silent, not HTTP, flooding).

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::Signal;

/// Run `sluice ARGS`: exit code, stdout, stderr, and how long it took.
fn sluice(args: &[&str]) -> (i32, String, String, Duration) {
    let started = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        started.elapsed(),
    )
}

async fn ready_sluice(server: &str) -> (Sluice, Backend) {
    let backend = Backend::start("app", Behavior::Name).await;
    let port = reserve_port();
    let yaml = format!(
        "{server}{}",
        front_to_app(port, "", &format!("backends: [{}]", backend.addr))
    );
    (Sluice::start(&yaml).await, backend)
}

#[tokio::test]
async fn ready_sluice_is_healthy_by_flag_and_by_configuration() {
    let (s, _backend) = ready_sluice("").await;
    let admin = s.admin.to_string();

    let (code, out, err, _) = sluice(&["healthcheck", "--admin", &admin]);
    assert_eq!(code, 0, "stdout: {out} stderr: {err}");
    assert_eq!(out.trim(), format!("{admin}/readyz: 200 ready"));

    // No --admin: admin.bind of the configuration file, as in the image.
    let conf = s.config_path.to_str().unwrap();
    let (code, out, err, _) = sluice(&["healthcheck", "-c", conf]);
    assert_eq!(code, 0, "stdout: {out} stderr: {err}");
    assert!(out.contains("200 ready"), "{out}");
    // -c before the subcommand works too.
    let (code, out, _, _) = sluice(&["-c", conf, "healthcheck", "--path", "/healthz"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("/healthz: 200 ok"), "{out}");

    // A path that answers 404 is not healthy.
    let (code, out, _, _) = sluice(&["healthcheck", "--admin", &admin, "--path", "/nope"]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains(": 404 "), "{out}");
}

#[tokio::test]
async fn draining_sluice_is_unhealthy_at_once() {
    // A long grace period: listeners (and the admin answering 503) stay.
    let (s, _backend) = ready_sluice("server: { grace_period: 20s, shutdown_timeout: 1s }\n").await;
    let admin = s.admin.to_string();
    s.signal(Signal::SIGTERM);
    let mut last = String::new();
    wait_until("healthcheck to report the drain", || {
        let (code, out, _, _) = sluice(&["healthcheck", "--admin", &admin]);
        last = out.clone();
        async move { code == 1 && out.contains("503 not ready") }
    })
    .await;
    assert!(last.contains("shut"), "the reason is printed: {last}");
}

#[test]
fn nothing_listening_is_unhealthy_with_the_reason() {
    let port = reserve_port();
    let (code, out, _, took) = sluice(&["healthcheck", "--admin", &format!("127.0.0.1:{port}")]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.starts_with("unhealthy: cannot connect to 127.0.0.1:"),
        "{out}"
    );
    assert!(out.contains("refused"), "{out}");
    assert!(took < Duration::from_secs(2), "{took:?}");
}

/// A peer on 127.0.0.1 that accepts one connection at a time and does
/// `answer` with it; counts the bytes it got.
fn fake_peer(answer: fn(&mut std::net::TcpStream)) -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let received = Arc::new(AtomicUsize::new(0));
    let seen = Arc::clone(&received);
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let mut buf = [0u8; 1024];
            conn.set_read_timeout(Some(Duration::from_millis(200)))
                .unwrap();
            if let Ok(n) = conn.read(&mut buf) {
                seen.fetch_add(n, Ordering::Relaxed);
            }
            answer(&mut conn);
        }
    });
    (addr, received)
}

#[test]
fn silent_peer_times_out_within_the_limit() {
    let (addr, received) = fake_peer(|c| {
        // Hold the connection open, say nothing.
        std::thread::sleep(Duration::from_secs(5));
        let _ = c.flush();
    });
    let (code, out, _, took) = sluice(&[
        "healthcheck",
        "--admin",
        &addr.to_string(),
        "--timeout",
        "300ms",
    ]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("gave no complete answer within 300ms"),
        "{out}"
    );
    assert!(took < Duration::from_secs(3), "{took:?}");
    assert!(received.load(Ordering::Relaxed) > 0, "the request was sent");
}

#[test]
fn a_peer_that_is_not_http_is_unhealthy() {
    let (addr, _) = fake_peer(|c| {
        let _ = c.write_all(b"SSH-2.0-OpenSSH_9.2\r\n");
    });
    let (code, out, _, _) = sluice(&["healthcheck", "--admin", &addr.to_string()]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("did not answer HTTP"), "{out}");
}

#[test]
fn a_flooding_peer_is_cut_off_after_16_kib() {
    let (addr, _) = fake_peer(|c| {
        let _ = c.write_all(b"HTTP/1.1 200 OK\r\n");
        let line = b"X-Flood: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n";
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(5) && c.write_all(line).is_ok() {}
    });
    let (code, out, _, took) = sluice(&["healthcheck", "--admin", &addr.to_string()]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("did not answer HTTP"), "{out}");
    assert!(took < Duration::from_secs(3), "{took:?}");
}

#[test]
fn without_an_admin_listener_it_says_what_to_pass() {
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("sluice.yaml");
    std::fs::write(
        &conf,
        "listeners: { web: { bind: 127.0.0.1:1, pool: app } }\npools: { app: { backends: [127.0.0.1:2] } }\n",
    )
    .unwrap();
    let (code, _, err, _) = sluice(&["healthcheck", "-c", conf.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(err.contains("no `admin` section"), "{err}");
    assert!(err.contains("--admin ADDR"), "{err}");

    std::fs::write(&conf, "admin: { bind: nowhere }\n").unwrap();
    let (code, _, err, _) = sluice(&["healthcheck", "-c", conf.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(
        err.contains("admin.bind"),
        "the problem names its path: {err}"
    );
    assert!(err.contains("pass --admin ADDR"), "{err}");
}

#[test]
fn healthcheck_does_not_mix_with_the_run_flags() {
    let (code, _, err, _) = sluice(&["-t", "healthcheck", "--admin", "127.0.0.1:1"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("cannot be used with"), "{err}");
}
