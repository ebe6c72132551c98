//! The admin API: the token on everything that changes state, requests a
//! web page could forge, a bound on connections that slow clients cannot
//! exhaust, and secrets that never show.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const TOKEN: &str = "0123456789abcdef0123456789abcdef";

/// Send a raw request; the status and the whole response.
async fn raw(admin: SocketAddr, request: String) -> (u16, String) {
    let mut s = TcpStream::connect(admin).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(DEADLINE, s.read_to_end(&mut out))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, text)
}

fn request(method: &str, path: &str, host: SocketAddr, extra: &str) -> String {
    format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\n{extra}\r\n")
}

fn token_file(dir: &tempfile::TempDir) -> String {
    let path = dir.path().join("token");
    std::fs::write(&path, format!("{TOKEN}\n")).unwrap();
    path.display().to_string()
}

fn with_admin(admin_keys: &str, port: u16, backend: SocketAddr) -> String {
    front_to_app(port, "", &format!("backends: ['{backend}']")).replace(
        "admin: { bind: '{admin}' }",
        &format!("admin: {{ bind: '{{admin}}'{admin_keys} }}"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutating_endpoints_need_the_token_and_reads_do_not() {
    let a = Backend::start("a", Behavior::Name).await;
    let dir = tempfile::tempdir().unwrap();
    let yaml = with_admin(
        &format!(", token_file: '{}'", token_file(&dir)),
        reserve_port(),
        a.addr,
    );
    let sluice = Sluice::start(&yaml).await;
    let admin = sluice.admin;
    for path in ["/api/v1/reload", "/api/v1/pools/app/active?backend=x"] {
        let (status, text) = raw(admin, request("POST", path, admin, "")).await;
        assert_eq!(status, 401, "{path}: {text}");
        assert!(
            text.to_ascii_lowercase()
                .contains("www-authenticate: bearer"),
            "{text}"
        );
        let wrong = "Authorization: Bearer 0123456789abcdef0123456789abcdeX\r\n";
        let (status, _) = raw(admin, request("POST", path, admin, wrong)).await;
        assert_eq!(status, 401, "{path}: a wrong token");
    }
    let good = format!("Authorization: Bearer {TOKEN}\r\n");
    let (status, text) = raw(admin, request("POST", "/api/v1/reload", admin, &good)).await;
    assert_eq!(status, 200, "{text}");
    // Reads are open without protect_reads.
    for path in ["/metrics", "/healthz", "/readyz", "/api/v1/pools"] {
        let (status, _) = raw(admin, request("GET", path, admin, "")).await;
        assert_eq!(status, 200, "{path}");
    }
    let m = sluice.metrics().await;
    assert!(
        m.value(
            "sluice_admin_requests_total",
            &[("endpoint", "/api/v1/reload"), ("code", "401")]
        ) >= 2.0
    );
    // With protect_reads, reads need it too.
    sluice.rewrite_config(&yaml.replace("token_file:", "protect_reads: true, token_file:"));
    let (status, _) = raw(admin, request("POST", "/api/v1/reload", admin, &good)).await;
    assert_eq!(status, 200);
    // A change to `admin` needs a restart: start one with it.
    drop(sluice);
    let sluice = Sluice::spawn(&yaml.replace("token_file:", "protect_reads: true, token_file:"));
    let admin = sluice.admin;
    wait_until("the admin answers", || async {
        TcpStream::connect(admin).await.is_ok()
    })
    .await;
    let (status, _) = raw(admin, request("GET", "/metrics", admin, "")).await;
    assert_eq!(status, 401);
    let (status, _) = raw(admin, request("GET", "/metrics", admin, &good)).await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_token_only_a_loopback_admin_may_change_things() {
    let a = Backend::start("a", Behavior::Name).await;
    // Bound to every address (reached here over loopback): no token, no POST.
    let wide = reserve_port();
    let yaml = front_to_app(reserve_port(), "", &format!("backends: ['{}']", a.addr))
        .replace("'{admin}'", &format!("'0.0.0.0:{wide}'"));
    let sluice = Sluice::spawn(&yaml);
    let admin: SocketAddr = format!("127.0.0.1:{wide}").parse().unwrap();
    wait_until("the admin answers", || async {
        matches!(http_get(admin, "/readyz").await, Ok((200, _)))
    })
    .await;
    let (status, text) = raw(admin, request("POST", "/api/v1/reload", admin, "")).await;
    assert_eq!(status, 403, "{text}");
    assert!(text.contains("token_file"), "{text}");
    sluice.wait_log("has no token").await;
    // Bound to loopback: allowed, as before.
    let local = Sluice::start(&front_to_app(
        reserve_port(),
        "",
        &format!("backends: ['{}']", a.addr),
    ))
    .await;
    assert_eq!(local.reload().await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_a_web_page_could_forge_are_refused() {
    let a = Backend::start("a", Behavior::Name).await;
    let dir = tempfile::tempdir().unwrap();
    let sluice = Sluice::start(&with_admin(
        &format!(
            ", token_file: '{}', hosts: [sluice.internal]",
            token_file(&dir)
        ),
        reserve_port(),
        a.addr,
    ))
    .await;
    let admin = sluice.admin;
    let good = format!("Authorization: Bearer {TOKEN}\r\n");
    // DNS rebinding: a name that is not this listener's.
    let rebound = "GET /api/v1/pools HTTP/1.1\r\nHost: attacker.example\r\n\r\n".to_string();
    assert_eq!(raw(admin, rebound).await.0, 403);
    let named = "GET /api/v1/pools HTTP/1.1\r\nHost: sluice.internal:9100\r\n\r\n".to_string();
    assert_eq!(raw(admin, named).await.0, 200, "a configured name is fine");
    // A cross-site POST, even with the token (a browser may hold none, but
    // the check does not depend on it).
    let cross = format!("{good}Origin: http://attacker.example\r\n");
    assert_eq!(
        raw(admin, request("POST", "/api/v1/reload", admin, &cross))
            .await
            .0,
        403
    );
    // A form post: the content types a page may send without asking.
    for ct in [
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
    ] {
        let form = format!("{good}Content-Type: {ct}\r\nContent-Length: 0\r\n");
        assert_eq!(
            raw(admin, request("POST", "/api/v1/reload", admin, &form))
                .await
                .0,
            415,
            "{ct}"
        );
    }
    // The same origin is fine.
    let same = format!("{good}Origin: http://{admin}\r\n");
    assert_eq!(
        raw(admin, request("POST", "/api/v1/reload", admin, &same))
            .await
            .0,
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_cannot_lock_out_a_scrape() {
    let a = Backend::start("a", Behavior::Name).await;
    let port = reserve_port();
    let sluice = Sluice::start(&front_to_app(
        port,
        "",
        &format!("backends: ['{}']", a.addr),
    ))
    .await;
    let admin = sluice.admin;
    let fds_before = sluice.open_fds();
    // 500 slowloris connections: a request line, then nothing.
    let mut slow = Vec::new();
    for _ in 0..500 {
        if let Ok(mut s) = TcpStream::connect(admin).await {
            let _ = s.write_all(b"GET /metrics HTTP/1.1\r\nX-Slow: ").await;
            slow.push(s);
        }
    }
    let started = Instant::now();
    let (status, _) = tokio::time::timeout(Duration::from_secs(5), http_get(admin, "/metrics"))
        .await
        .expect("answered")
        .unwrap();
    let took = started.elapsed();
    println!("/metrics under 500 slowloris connections: {took:?}");
    assert_eq!(status, 200);
    assert!(took < Duration::from_secs(1), "{took:?}");
    // The admin port holds at most its cap of descriptors, whatever comes.
    let fds = sluice.open_fds();
    assert!(
        fds <= fds_before + sluice::admin::server::MAX_CONNECTIONS + 8,
        "{fds} fds, {fds_before} before"
    );
    // The data path is untouched.
    assert_eq!(
        read_all(SocketAddr::from(([127, 0, 0, 1], port))).await,
        "a\n"
    );
    drop(slow);
}

/// No token, password or key shows in the log (at trace level), the
/// metrics, the pools API or `-t`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_never_show() {
    let a = Backend::start("a", Behavior::Name).await;
    let dir = tempfile::tempdir().unwrap();
    let password = "pw-ZYXWVUTSRQ-never-shown";
    let pw_file = dir.path().join("pw");
    std::fs::write(&pw_file, password).unwrap();
    let yaml = with_admin(
        &format!(", token_file: '{}'", token_file(&dir)),
        reserve_port(),
        a.addr,
    )
    .replace(
        "backends:",
        &format!(
            "health_check: {{ kind: redis, password_file: '{}' }}\n    backends:",
            pw_file.display()
        ),
    );
    let sluice = Sluice::spawn_with_env(&yaml, &[("RUST_LOG", "trace")]);
    wait_until("the admin answers", || async {
        TcpStream::connect(sluice.admin).await.is_ok()
    })
    .await;
    let admin = sluice.admin;
    let good = format!("Authorization: Bearer {TOKEN}\r\n");
    let mut seen = String::new();
    for path in ["/metrics", "/api/v1/pools", "/readyz"] {
        seen += &raw(admin, request("GET", path, admin, &good)).await.1;
    }
    seen += &raw(admin, request("POST", "/api/v1/reload", admin, &good))
        .await
        .1;
    // Let a few checks run (each sends the password to the backend, which
    // answers no Redis: they fail, with the reason logged).
    wait_until("checks ran", || async {
        let text = raw(admin, request("GET", "/metrics", admin, &good)).await.1;
        text.lines().any(|l| {
            l.starts_with("sluice_backend_health_checks_total")
                && l.contains("failure")
                && !l.ends_with(" 0")
                && !l.ends_with(" 1")
        })
    })
    .await;
    seen += &sluice.log();
    let check = std::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["-t", "-c"])
        .arg(&sluice.config_path)
        .env("RUST_LOG", "trace")
        .output()
        .unwrap();
    seen += &String::from_utf8_lossy(&check.stdout);
    seen += &String::from_utf8_lossy(&check.stderr);
    assert!(seen.len() > 1000, "something was read");
    for secret in [TOKEN, password] {
        assert!(!seen.contains(secret), "`{secret}` showed");
    }
}
