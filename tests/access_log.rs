//! The access log: one line per connection with how it ended, in JSON and
//! logfmt, reopened on SIGUSR1, and never waited for (lines dropped and
//! counted when the writer cannot keep up).

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::path::Path;

use common::*;
use nix::sys::signal::Signal;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn lines(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

async fn wait_lines(path: &Path, n: usize) -> Vec<serde_json::Value> {
    wait_until(&format!("{n} access-log lines"), || async {
        lines(path).len() >= n
    })
    .await;
    lines(path)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_connection_gets_one_line_saying_how_it_ended() {
    let name = Backend::start("named", Behavior::Name).await;
    let echo = Backend::start("echo", Behavior::Echo).await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let (p_name, p_echo) = (reserve_port(), reserve_port());
    let yaml = format!(
        "access_log: {{ path: '{}', format: json }}\n\
         admin: {{ bind: '{{admin}}' }}\n\
         listeners:\n  named: {{ bind: 127.0.0.1:{p_name}, pool: named, deny: [127.0.0.9] }}\n  \
         echo: {{ bind: 127.0.0.1:{p_echo}, pool: echo, idle_timeout: 300ms }}\n\
         pools:\n  named: {{ backends: ['{}'] }}\n  echo: {{ backends: ['{}'] }}\n",
        log.display(),
        name.addr,
        echo.addr
    );
    let sluice = Sluice::start(&yaml).await;

    // 1. The backend speaks and closes first.
    assert_eq!(read_all(addr(p_name)).await, "named\n");
    let l = &wait_lines(&log, 1).await[0];
    assert_eq!(l["listener"], "named");
    assert_eq!(l["pool"], "named");
    assert_eq!(l["backend"], name.addr.to_string());
    assert_eq!(l["cause"], "backend_closed", "{}", sluice.log());
    assert_eq!(l["bytes_out"], 6);
    assert_eq!(l["attempts"], 1);
    assert!(l["client"].as_str().unwrap().starts_with("127.0.0.1:"));
    assert!(l["connect_ms"].as_f64().unwrap() >= 0.0);
    assert!(l["time"].as_str().unwrap().ends_with('Z'));

    // 2. The client half-closes first.
    let mut c = TcpStream::connect(addr(p_echo)).await.unwrap();
    c.write_all(b"hello").await.unwrap();
    c.shutdown().await.unwrap();
    let mut back = Vec::new();
    c.read_to_end(&mut back).await.unwrap();
    let l = &wait_lines(&log, 2).await[1];
    assert_eq!(l["cause"], "client_closed");
    assert_eq!(
        (l["bytes_in"].as_u64(), l["bytes_out"].as_u64()),
        (Some(5), Some(5))
    );

    // 3. Idle timeout.
    let _idle = TcpStream::connect(addr(p_echo)).await.unwrap();
    assert_eq!(wait_lines(&log, 3).await[2]["cause"], "idle_timeout");

    // 4. Refused by the source rules, at accept: a line all the same.
    let s = TcpSocket::new_v4().unwrap();
    s.bind("127.0.0.9:0".parse().unwrap()).unwrap();
    let mut refused = s.connect(addr(p_name)).await.unwrap();
    let mut nothing = Vec::new();
    let _ = refused.read_to_end(&mut nothing).await;
    let l = &wait_lines(&log, 4).await[3];
    assert_eq!(l["cause"], "refused_acl");
    assert!(l["client"].as_str().unwrap().starts_with("127.0.0.9:"));
    assert!(l["backend"].is_null());

    // 5. Closed by an operator's maintenance.
    let mut held = TcpStream::connect(addr(p_echo)).await.unwrap();
    held.write_all(b"x").await.unwrap();
    let mut one = [0u8; 1];
    held.read_exact(&mut one).await.unwrap();
    let (status, _) = http_request(
        sluice.admin,
        "POST",
        &format!("/api/v1/pools/echo/state?backend={}&state=maint", echo.addr),
    )
    .await
    .unwrap();
    assert_eq!(status, 200);
    let l = &wait_lines(&log, 5).await[4];
    assert_eq!(l["cause"], "closed_admin");

    // 6. No backend at all.
    assert_eq!(read_all(addr(p_echo)).await, "");
    assert_eq!(wait_lines(&log, 6).await[5]["cause"], "refused_no_backend");

    // SIGUSR1 reopens the file (after a rotation moved it).
    let rotated = dir.path().join("access.log.1");
    std::fs::rename(&log, &rotated).unwrap();
    sluice.signal(Signal::SIGUSR1);
    sluice.wait_log("reopening the access log").await;
    assert_eq!(read_all(addr(p_name)).await, "named\n");
    let fresh = wait_lines(&log, 1).await;
    assert_eq!(fresh[0]["cause"], "backend_closed");
    assert_eq!(
        lines(&rotated).len(),
        6,
        "the rotated file got nothing more"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logfmt_lines_and_a_writer_that_cannot_keep_up() {
    // The log goes into a pipe nobody reads: the writer blocks, the queue
    // fills, and lines are dropped and counted while clients are served.
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("access.fifo");
    assert!(
        std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success()
    );
    // Open for reading (without blocking) so sluice's open for writing
    // does not wait; never read.
    let reader = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NONBLOCK)
        .open(&fifo)
        .unwrap();
    let port = reserve_port();
    let yaml = format!(
        "access_log: {{ path: '{}', format: logfmt }}\n{}",
        fifo.display(),
        front_to_app(port, ", deny: [127.0.0.0/8]", "backends: ['127.0.0.1:1']")
    );
    let sluice = Sluice::start(&yaml).await;
    let started = std::time::Instant::now();
    for _ in 0..20_000 {
        let mut c = TcpStream::connect(addr(port)).await.unwrap();
        let mut nothing = Vec::new();
        let _ = c.read_to_end(&mut nothing).await;
    }
    println!("20,000 refused connections in {:?}", started.elapsed());
    let m = sluice.metrics().await;
    let dropped = m.value("sluice_access_log_dropped_total", &[]);
    assert!(dropped > 0.0, "lines were dropped, not waited for");
    assert_eq!(
        m.value(
            "sluice_listener_rejected_total",
            &[("listener", "front"), ("reason", "acl")]
        ),
        20_000.0,
        "every client was still handled"
    );
    // What did reach the pipe is logfmt.
    let mut head = vec![0u8; 4096];
    let n = std::io::Read::read(&mut &reader, &mut head).unwrap();
    let text = String::from_utf8_lossy(&head[..n]);
    let first = text.lines().next().unwrap();
    assert!(first.starts_with("time="), "{first}");
    assert!(
        first.contains(" listener=front ") && first.contains(" cause=refused_acl"),
        "{first}"
    );
}

use std::os::unix::fs::OpenOptionsExt;
