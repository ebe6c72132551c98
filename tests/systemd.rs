//! systemd: `conf/sluice.service` passes `systemd-analyze verify`, and a
//! running sluice reports readiness, reloads and its drain over a real
//! `$NOTIFY_SOCKET` (a datagram socket this test listens on, as systemd's).

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod common;

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::Signal;

const UNIT: &str = include_str!("../conf/sluice.service");

/// `systemd-analyze verify` on `unit` (with the binary and configuration
/// paths pointed at this build): its exit code and output.
fn verify(unit: &str, dir: &Path) -> (bool, String) {
    let conf = dir.join("sluice.yaml");
    std::fs::write(
        &conf,
        "listeners: { web: { bind: 127.0.0.1:1, pool: app } }\npools: { app: { backends: [127.0.0.1:2] } }\n",
    )
    .unwrap();
    let unit = unit
        .replace("/usr/local/bin/sluice", env!("CARGO_BIN_EXE_sluice"))
        .replace("/etc/sluice/sluice.yaml", conf.to_str().unwrap());
    let path = dir.join("sluice.service");
    std::fs::write(&path, unit).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .expect("systemd-analyze (Debian package systemd) runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // Lines about this unit only: verify also loads the units it names
    // (network-online.target), which a container may lack.
    let ours: String = text
        .lines()
        .filter(|l| l.contains("sluice.service"))
        .map(|l| format!("{l}\n"))
        .collect();
    (out.status.success() && ours.is_empty(), text)
}

#[test]
fn the_unit_file_passes_systemd_analyze_verify() {
    let dir = tempfile::tempdir().unwrap();
    let (ok, out) = verify(UNIT, dir.path());
    assert!(ok, "systemd-analyze verify complained:\n{out}");
    for key in [
        "Type=notify",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "KillSignal=SIGTERM",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "CapabilityBoundingSet=CAP_NET_BIND_SERVICE",
        "ExecStartPre=/usr/local/bin/sluice -t",
    ] {
        assert!(
            UNIT.lines().any(|l| l == key || l.starts_with(key)),
            "{key}"
        );
    }
    // The check can fail: a misspelt setting is caught.
    let (ok, out) = verify(&UNIT.replace("Type=notify", "Type=notfy"), dir.path());
    assert!(!ok, "a bad Type= passed verify:\n{out}");
}

/// The next datagram on `sock`, within the deadline.
fn next_message(sock: &UnixDatagram, what: &str) -> String {
    let mut buf = [0u8; 4096];
    sock.set_read_timeout(Some(DEADLINE)).unwrap();
    match sock.recv(&mut buf) {
        Ok(n) => String::from_utf8_lossy(&buf[..n]).into_owned(),
        Err(e) => panic!("no notification ({what}) within {DEADLINE:?}: {e}"),
    }
}

#[tokio::test]
async fn readiness_reloads_and_the_drain_are_reported_to_systemd() {
    let dir = tempfile::tempdir().unwrap();
    let notify = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&notify).unwrap();

    // READY=1 waits for the first health-check round and the listeners.
    let backend = Backend::start("app", Behavior::Name).await;
    let port = reserve_port();
    let yaml = front_to_app(
        port,
        "",
        &format!(
            "backends: [{}]\nhealth_check: {{ interval: 300ms, timeout: 300ms }}",
            backend.addr
        ),
    );
    let started = Instant::now();
    let s = Sluice::spawn_with_env(&yaml, &[("NOTIFY_SOCKET", notify.to_str().unwrap())]);

    let ready = next_message(&sock, "READY=1 at start");
    assert!(ready.lines().any(|l| l == "READY=1"), "{ready:?}");
    assert!(
        ready.lines().any(|l| l == format!("MAINPID={}", s.pid())),
        "{ready:?}"
    );
    // Sent once listeners are open: a client gets through at once.
    let got = read_all(format!("127.0.0.1:{port}").parse().unwrap()).await;
    let got = got.trim();
    assert_eq!(got, "app", "READY=1 came before the listener served");
    let (status, _) = http_get(s.admin, "/readyz").await.unwrap();
    assert_eq!(status, 200);
    eprintln!("READY=1 after {:?}", started.elapsed());

    // SIGHUP: RELOADING=1 (with the monotonic time systemd 253+ checks),
    // then READY=1 once the file is applied.
    s.signal(Signal::SIGHUP);
    let reloading = next_message(&sock, "RELOADING=1");
    assert!(
        reloading.lines().any(|l| l == "RELOADING=1"),
        "{reloading:?}"
    );
    assert!(
        reloading.lines().any(|l| l.starts_with("MONOTONIC_USEC=")),
        "{reloading:?}"
    );
    let done = next_message(&sock, "READY=1 after the reload");
    assert!(done.lines().any(|l| l == "READY=1"), "{done:?}");

    // A bad file: the reload fails, and systemd still hears it is over
    // (or it would wait for READY=1 until its timeout).
    s.rewrite_config("listeners: [");
    let (status, _) = s.reload().await;
    assert_eq!(status, 422);
    let reloading = next_message(&sock, "RELOADING=1 (bad file)");
    assert!(
        reloading.lines().any(|l| l == "RELOADING=1"),
        "{reloading:?}"
    );
    let done = next_message(&sock, "READY=1 after the failed reload");
    assert!(done.lines().any(|l| l == "READY=1"), "{done:?}");
    assert!(
        done.contains("STATUS=serving; the last reload failed"),
        "{done:?}"
    );

    // SIGTERM: STOPPING=1 when the drain begins, not when the process ends.
    s.signal(Signal::SIGTERM);
    let stopping = next_message(&sock, "STOPPING=1");
    assert!(stopping.lines().any(|l| l == "STOPPING=1"), "{stopping:?}");
    let status = s.wait_exit(Duration::from_secs(30)).await;
    assert!(status.success(), "{status}");
    drop(backend);
}

#[tokio::test]
async fn without_notify_socket_nothing_is_sent_and_a_dead_socket_is_harmless() {
    let dir = tempfile::tempdir().unwrap();
    // A path where nobody listens: sends fail, sluice serves on.
    let notify = dir.path().join("nobody.sock");
    let backend = Backend::start("app", Behavior::Name).await;
    let port = reserve_port();
    let yaml = front_to_app(port, "", &format!("backends: [{}]", backend.addr));
    let s = Sluice::spawn_with_env(&yaml, &[("NOTIFY_SOCKET", notify.to_str().unwrap())]);
    s.wait_ready().await;
    s.wait_log("cannot tell systemd ready").await;
    let got = read_all(format!("127.0.0.1:{port}").parse().unwrap()).await;
    let got = got.trim();
    assert_eq!(got, "app");
    s.signal(Signal::SIGHUP);
    s.wait_log("configuration reloaded").await;
    // One warning, not one per notification.
    assert_eq!(
        s.log().matches("cannot tell systemd").count(),
        1,
        "{}",
        s.log()
    );
}
