//! HTTP mode (`protocol: http`) over real sockets: sluice in front of small
//! HTTP/1.1 backends (tokio tasks in the test that answer with their name,
//! the path and the headers they got, as JSON), with `curl` as the client
//! and raw sockets for the hostile ones.
//!
//! Per-request round robin over one kept-alive connection, weights, a
//! backend killed mid-run, forwarded headers (and spoofed ones replaced),
//! 503/502/504, a request-smuggling probe, slow headers, host and path
//! routes, redirect to https, HSTS and HTTP/2 over TLS, the access log,
//! and a reload that adds an HTTP listener.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod common;
#[path = "tls/pki.rs"]
#[allow(dead_code)]
mod pki;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// MiB moved by the large upload and download tests: 512, or
/// `SLUICE_LARGE_MIB` (for a 1 GiB run by hand:
/// `SLUICE_LARGE_MIB=1024 cargo test --release --test http_mode large -- --nocapture`).
fn large_mib() -> usize {
    std::env::var("SLUICE_LARGE_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(512)
}

#[tokio::test]
async fn a_large_download_to_a_slow_client_streams_without_growing_memory() {
    let a = App::start("a", Duration::ZERO).await;
    let port = reserve_port();
    let s = Sluice::start(&config(port, "", "", &plain(&[&a]))).await;
    let _ = get(&format!("http://127.0.0.1:{port}/"), &[]).await;
    let before = s.rss_kib();
    let size = large_mib() << 20;
    let mut c = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    c.write_all(format!("GET /bytes/{size} HTTP/1.1\r\nHost: a\r\n\r\n").as_bytes())
        .await
        .unwrap();
    // Read the header, then stall: the backend keeps writing, and sluice
    // must hold back rather than gather the body in memory.
    let mut buf = vec![0u8; 65536];
    let mut head = Vec::new();
    let body_start = loop {
        let n = c.read(&mut buf).await.unwrap();
        assert!(n > 0, "closed before the header");
        head.extend_from_slice(&buf[..n]);
        if let Some(i) = head.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
    };
    let header = String::from_utf8_lossy(&head[..body_start]).to_string();
    assert!(header.starts_with("HTTP/1.1 200"), "{header}");
    assert!(
        header
            .to_ascii_lowercase()
            .contains(&format!("content-length: {size}")),
        "{header}"
    );
    let mut got = head.len() - body_start;
    let mut peak = before;
    // A stalled reader for a while (the test throttles its own reading; it
    // waits for no state of sluice's).
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        peak = peak.max(s.rss_kib());
    }
    let stalled = peak.saturating_sub(before);
    let mut reads = 0u64;
    while got < size {
        let n = tokio::time::timeout(Duration::from_secs(30), c.read(&mut buf))
            .await
            .expect("the download stalls")
            .unwrap();
        assert!(n > 0, "closed after {got} of {size} bytes");
        got += n;
        reads += 1;
        if reads % 256 == 0 {
            peak = peak.max(s.rss_kib());
        }
    }
    assert_eq!(got, size, "every byte arrived, no more");
    let grew = peak.saturating_sub(before);
    println!(
        "RSS before {before} KiB, +{stalled} KiB while the client stalled, peak {peak} KiB during a {} MiB download",
        size >> 20
    );
    assert!(
        stalled < 16 * 1024,
        "RSS grew by {stalled} KiB while the client stalled"
    );
    assert!(
        grew < 64 * 1024,
        "RSS grew by {grew} KiB for a {} MiB download",
        size >> 20
    );
}

/// A small HTTP/1.1 backend with keep-alive.
struct App {
    addr: SocketAddr,
    /// Requests it answered.
    requests: Arc<AtomicUsize>,
    tasks: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl App {
    /// Start one named `name`; `/slow` paths are answered after `delay`.
    async fn start(name: &str, delay: Duration) -> App {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(AtomicUsize::new(0));
        let tasks: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let (name, count, list) = (name.to_string(), Arc::clone(&requests), Arc::clone(&tasks));
        let accept = tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                let (name, count) = (name.clone(), Arc::clone(&count));
                let t = tokio::spawn(serve_app(conn, name, count, delay));
                list.lock().unwrap().push(t);
            }
        });
        tasks.lock().unwrap().push(accept);
        App {
            addr,
            requests,
            tasks,
        }
    }

    /// Stop accepting: its port refuses connects (checks fail), while the
    /// connections it has go on.
    fn close_port(&self) {
        // The accept loop is the first task (no connection comes before start returns).
        if let Some(accept) = self.tasks.lock().unwrap().first() {
            accept.abort();
        }
    }

    /// Stop it at once: its port refuses connects, its connections close.
    fn kill(&self) {
        for t in self.tasks.lock().unwrap().drain(..) {
            t.abort();
        }
    }
}

impl Drop for App {
    fn drop(&mut self) {
        self.kill();
    }
}

async fn serve_app(mut conn: TcpStream, name: String, count: Arc<AtomicUsize>, delay: Duration) {
    let mut buf = Vec::new();
    loop {
        // Read one request header.
        let (path, headers, body_len, used) = loop {
            let mut hs = [httparse::EMPTY_HEADER; 64];
            let mut req = httparse::Request::new(&mut hs);
            if let Ok(httparse::Status::Complete(n)) = req.parse(&buf) {
                let mut headers: HashMap<String, String> = HashMap::new();
                let mut len = 0usize;
                for h in req.headers.iter() {
                    let k = h.name.to_ascii_lowercase();
                    let v = String::from_utf8_lossy(h.value).to_string();
                    if k == "content-length" {
                        len = v.trim().parse().unwrap_or(0);
                    }
                    headers
                        .entry(k)
                        .and_modify(|e| {
                            e.push_str(", ");
                            e.push_str(&v);
                        })
                        .or_insert(v);
                }
                break (req.path.unwrap_or("").to_string(), headers, len, n);
            }
            let mut chunk = [0u8; 4096];
            match conn.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        buf.drain(..used);
        if headers
            .get("upgrade")
            .is_some_and(|u| u.eq_ignore_ascii_case("websocket"))
        {
            // A tunnel from here on: echo every byte back.
            let head = "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n";
            if conn.write_all(head.as_bytes()).await.is_err() {
                return;
            }
            if !buf.is_empty() && conn.write_all(&buf).await.is_err() {
                return;
            }
            let (mut r, mut w) = conn.split();
            let _ = tokio::io::copy(&mut r, &mut w).await;
            return;
        }
        // The body is counted and dropped as it arrives (a large upload
        // must not grow the test either).
        let mut left = body_len;
        let take = left.min(buf.len());
        buf.drain(..take);
        left -= take;
        while left > 0 {
            let mut chunk = [0u8; 65536];
            match conn.read(&mut chunk[..left.min(65536)]).await {
                Ok(0) | Err(_) => return,
                Ok(n) => left -= n,
            }
        }
        count.fetch_add(1, Ordering::SeqCst);
        if let Some(n) = path.strip_prefix("/bytes/") {
            // A large download: n zero bytes, written as fast as the proxy takes them.
            let mut left: usize = n.parse().unwrap_or(0);
            let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {left}\r\n\r\n");
            if conn.write_all(head.as_bytes()).await.is_err() {
                return;
            }
            let chunk = [0u8; 65536];
            while left > 0 {
                let n = left.min(chunk.len());
                if conn.write_all(&chunk[..n]).await.is_err() {
                    return;
                }
                left -= n;
            }
            continue;
        }
        if path.starts_with("/slow") {
            tokio::time::sleep(delay).await;
        }
        let body =
            serde_json::json!({ "name": name, "path": path, "headers": headers, "len": body_len })
                .to_string();
        let resp = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        if conn.write_all(resp.as_bytes()).await.is_err() {
            return;
        }
    }
}

/// Run curl with `args`; its stdout.
async fn curl(args: &[&str]) -> String {
    let out = tokio::process::Command::new("curl")
        .args(["-sS", "--max-time", "20"])
        .args(args)
        .output()
        .await
        .expect("curl runs (apt-get install curl)");
    assert!(
        out.status.success(),
        "curl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A GET through curl: status and body.
async fn get(url: &str, extra: &[&str]) -> (u16, String) {
    let mut args = vec!["-w", "\n%{http_code}"];
    args.extend_from_slice(extra);
    args.push(url);
    let out = curl(&args).await;
    let (body, code) = out.rsplit_once('\n').unwrap();
    (code.parse().unwrap(), body.to_string())
}

fn json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

/// A configuration: listener `web` on `port` with `protocol: http` and
/// `listener` (extra keys, one per line, unindented), pool `app` of
/// `backends` (YAML list items) with `pool` keys.
fn config(port: u16, listener: &str, pool: &str, backends: &[String]) -> String {
    let indent = |s: &str, n: usize| -> String {
        s.lines()
            .map(|l| format!("{}{l}\n", " ".repeat(n)))
            .collect()
    };
    format!(
        "admin: {{ bind: '{{admin}}' }}\n\
         listeners:\n  web:\n    bind: 127.0.0.1:{port}\n    protocol: http\n    pool: app\n{}\
         pools:\n  app:\n    health_check: {{ interval: 200ms, timeout: 150ms }}\n{}    backends:\n{}",
        indent(listener, 4),
        indent(pool, 4),
        backends
            .iter()
            .map(|b| format!("      - {b}\n"))
            .collect::<String>()
    )
}

fn plain(apps: &[&App]) -> Vec<String> {
    apps.iter().map(|a| format!("'{}'", a.addr)).collect()
}

/// `n` GETs of `url` over one curl invocation: the names that answered,
/// in order, and how many connections curl opened.
async fn many_gets(url: &str, n: usize) -> (Vec<String>, u64) {
    let mut args = vec!["--http1.1", "-w", "\n%{num_connects} %{http_code}\n"];
    let urls = vec![url; n];
    args.extend(urls.iter().copied());
    let out = curl(&args).await;
    let lines: Vec<&str> = out.lines().filter(|l| !l.is_empty()).collect();
    assert_eq!(lines.len(), 2 * n, "{out}");
    let mut names = Vec::new();
    let mut connects = 0;
    for pair in lines.chunks(2) {
        let (c, code) = pair[1].split_once(' ').unwrap();
        assert_eq!(code, "200", "{}", pair[0]);
        connects += c.parse::<u64>().unwrap();
        names.push(json(pair[0])["name"].as_str().unwrap().to_string());
    }
    (names, connects)
}

fn tally(names: &[String]) -> HashMap<&str, usize> {
    let mut t = HashMap::new();
    for n in names {
        *t.entry(n.as_str()).or_default() += 1;
    }
    t
}

#[tokio::test]
async fn one_keepalive_connection_alternates_backends_50_50() {
    let (a, b) = (
        App::start("a", Duration::ZERO).await,
        App::start("b", Duration::ZERO).await,
    );
    let port = reserve_port();
    let s = Sluice::start(&config(port, "", "", &plain(&[&a, &b]))).await;
    let (names, connects) = many_gets(&format!("http://127.0.0.1:{port}/"), 100).await;
    assert_eq!(connects, 1, "curl kept one connection to sluice");
    let t = tally(&names);
    assert_eq!((t["a"], t["b"]), (50, 50), "{t:?}");
    // Round robin per request: consecutive requests never hit the same one.
    assert!(names.windows(2).all(|w| w[0] != w[1]), "{names:?}");
    wait_counted(
        &s,
        &[("listener", "web"), ("pool", "app"), ("code", "200")],
        100.0,
    )
    .await;
    let m = s.metrics().await;
    // Backend connections are kept alive: two new ones, the rest reused.
    let new = m.value(
        "sluice_http_upstream_requests_total",
        &[("listener", "web"), ("connection", "new")],
    );
    let reused = m.value(
        "sluice_http_upstream_requests_total",
        &[("listener", "web"), ("connection", "reused")],
    );
    assert_eq!(new + reused, 100.0);
    assert!(
        new <= 4.0,
        "backend connections reused: new {new}, reused {reused}"
    );
}

#[tokio::test]
async fn weights_3_to_1_give_75_25() {
    let (a, b) = (
        App::start("a", Duration::ZERO).await,
        App::start("b", Duration::ZERO).await,
    );
    let port = reserve_port();
    let backends = vec![
        format!("{{ address: '{}', weight: 3 }}", a.addr),
        format!("{{ address: '{}', weight: 1 }}", b.addr),
    ];
    let _s = Sluice::start(&config(port, "", "", &backends)).await;
    let (names, _) = many_gets(&format!("http://127.0.0.1:{port}/"), 100).await;
    let t = tally(&names);
    assert_eq!((t["a"], t["b"]), (75, 25), "{t:?}");
}

#[tokio::test]
async fn a_backend_killed_mid_run_fails_no_idempotent_request() {
    let (a, b) = (
        App::start("a", Duration::ZERO).await,
        App::start("b", Duration::ZERO).await,
    );
    let port = reserve_port();
    // Checks too slow to notice during the run: only retries can save it.
    let s = Sluice::start(&config(port, "", "connect_attempts: 3", &plain(&[&a, &b]))).await;
    let url = format!("http://127.0.0.1:{port}/");
    let (before, _) = many_gets(&url, 20).await;
    assert_eq!(tally(&before).len(), 2);
    b.kill();
    // Kept-alive connections to b are dead now, and its port refuses.
    let mut names = Vec::new();
    for _ in 0..4 {
        let (n, _) = many_gets(&url, 20).await;
        names.extend(n);
    }
    assert_eq!(names.len(), 80);
    assert!(names.iter().all(|n| n == "a"), "{names:?}");
    wait_counted(
        &s,
        &[("listener", "web"), ("pool", "app"), ("code", "200")],
        100.0,
    )
    .await;
    let m = s.metrics().await;
    assert_eq!(
        m.get(
            "sluice_http_requests_total",
            &[("listener", "web"), ("pool", "app"), ("code", "502")]
        ),
        None
    );
}

#[tokio::test]
async fn forwarded_headers_reach_the_backend_and_spoofed_ones_are_replaced() {
    let a = App::start("a", Duration::ZERO).await;
    let port = reserve_port();
    let _s = Sluice::start(&config(port, "", "", &plain(&[&a]))).await;
    let url = format!("http://127.0.0.1:{port}/p?q=1");
    let (code, body) = get(
        &url,
        &[
            "-H",
            "X-Forwarded-For: 6.6.6.6",
            "-H",
            "X-Forwarded-Proto: https",
            "-H",
            "Forwarded: for=6.6.6.6",
            "-H",
            "Host: www.example.com",
            // Hop-by-hop: neither this nor what it names may reach the backend.
            "-H",
            "Connection: keep-alive, X-Secret-Hop",
            "-H",
            "X-Secret-Hop: 1",
            "-H",
            "Proxy-Authorization: Basic Zm9vOmJhcg==",
        ],
    )
    .await;
    assert_eq!(code, 200);
    let h = &json(&body)["headers"];
    assert_eq!(h["x-forwarded-for"], "127.0.0.1", "{h}");
    assert_eq!(h["x-forwarded-proto"], "http");
    assert_eq!(h["x-forwarded-host"], "www.example.com");
    assert_eq!(h["host"], "www.example.com");
    // Not chosen by default, and removed from an untrusted client.
    assert!(h.get("forwarded").is_none(), "{h}");
    for hop in ["x-secret-hop", "proxy-authorization", "connection"] {
        assert!(h.get(hop).is_none(), "{hop} forwarded: {h}");
    }
}

#[tokio::test]
async fn a_trusted_proxy_keeps_its_forwarded_headers_and_gets_ours_appended() {
    let a = App::start("a", Duration::ZERO).await;
    let port = reserve_port();
    let listener = "http:\n  trusted_proxies: [127.0.0.0/8]\n  forwarded: [x-forwarded-for, x-forwarded-proto, forwarded]";
    let _s = Sluice::start(&config(port, listener, "", &plain(&[&a]))).await;
    let (_, body) = get(
        &format!("http://127.0.0.1:{port}/"),
        &[
            "-H",
            "X-Forwarded-For: 203.0.113.9",
            "-H",
            "X-Forwarded-Proto: https",
            "-H",
            "Forwarded: for=203.0.113.9;proto=https",
            "-H",
            "X-Forwarded-Host: kept.example",
        ],
    )
    .await;
    let h = &json(&body)["headers"];
    assert_eq!(h["x-forwarded-for"], "203.0.113.9, 127.0.0.1", "{h}");
    assert_eq!(h["x-forwarded-proto"], "https");
    assert_eq!(
        h["forwarded"],
        format!("for=203.0.113.9;proto=https, for=127.0.0.1;host=\"127.0.0.1:{port}\";proto=http")
    );
    // Not written by sluice here, and a trusted proxy's own is kept.
    assert_eq!(h["x-forwarded-host"], "kept.example");
}

#[tokio::test]
async fn no_backend_is_503_every_connect_failed_is_502_a_silent_backend_is_504() {
    // 503: the only backend is down.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let port = reserve_port();
    let s = Sluice::start(&config(port, "", "", &[format!("'{dead}'")])).await;
    let (code, body) = get(&format!("http://127.0.0.1:{port}/"), &[]).await;
    assert_eq!(
        (code, body.as_str()),
        (503, "503 Service Unavailable: no backend is available\n")
    );
    wait_counted(
        &s,
        &[("listener", "web"), ("pool", "app"), ("code", "503")],
        1.0,
    )
    .await;
    drop(s);

    // 502: checks say up, then the port refuses (checks far apart).
    let a = App::start("a", Duration::ZERO).await;
    let port = reserve_port();
    let yaml = config(port, "", "", &plain(&[&a])).replace(
        "interval: 200ms, timeout: 150ms",
        "interval: 60s, timeout: 1s, passive: false",
    );
    let s = Sluice::start(&yaml).await;
    a.kill();
    let (code, body) = get(&format!("http://127.0.0.1:{port}/"), &[]).await;
    assert_eq!(
        (code, body.as_str()),
        (502, "502 Bad Gateway: no backend accepted the connection\n")
    );
    wait_counted(
        &s,
        &[("listener", "web"), ("pool", "app"), ("code", "502")],
        1.0,
    )
    .await;
    let m = s.metrics().await;
    let backend = a.addr.to_string();
    assert!(
        m.value(
            "sluice_backend_connect_errors_total",
            &[
                ("pool", "app"),
                ("backend", backend.as_str()),
                ("kind", "refused")
            ]
        ) >= 1.0
    );
    drop(s);

    // 504: the backend takes the request and does not answer in time.
    let slow = App::start("slow", Duration::from_secs(30)).await;
    let port = reserve_port();
    let s = Sluice::start(&config(
        port,
        "http:\n  backend_timeout: 500ms",
        "",
        &plain(&[&slow]),
    ))
    .await;
    let started = Instant::now();
    let (code, body) = get(&format!("http://127.0.0.1:{port}/slow"), &[]).await;
    assert_eq!(
        (code, body.as_str()),
        (
            504,
            "504 Gateway Timeout: the backend did not answer in time\n"
        )
    );
    assert!(started.elapsed() < Duration::from_secs(10));
    wait_counted(
        &s,
        &[("listener", "web"), ("pool", "app"), ("code", "504")],
        1.0,
    )
    .await;
}

/// Wait until `sluice_http_requests_total` with `labels` is `want`: a
/// request is counted just after its answer leaves, so a client may see the
/// answer a moment before the count moves.
async fn wait_counted(s: &Sluice, labels: &[(&str, &str)], want: f64) {
    wait_until(
        &format!("sluice_http_requests_total {labels:?} == {want}"),
        || async { s.metrics().await.get("sluice_http_requests_total", labels) == Some(want) },
    )
    .await;
}

/// Send `bytes` raw and read until the server closes (or 10 s pass).
async fn raw_exchange(addr: SocketAddr, bytes: &[u8]) -> (String, bool) {
    let mut c = TcpStream::connect(addr).await.unwrap();
    c.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(10), c.read_to_end(&mut out))
        .await
        .is_ok();
    (String::from_utf8_lossy(&out).to_string(), closed)
}

#[tokio::test]
async fn request_smuggling_probes_are_refused_and_never_forwarded() {
    let a = App::start("a", Duration::ZERO).await;
    let port = reserve_port();
    let s = Sluice::start(&config(port, "", "", &plain(&[&a]))).await;
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let probes: [&[u8]; 3] = [
        // CL.TE: a front that believes Content-Length forwards the smuggled GET.
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n",
        // TE.CL, names in another case.
        b"POST / HTTP/1.1\r\nHost: a\r\ntransfer-encoding: chunked\r\ncontent-length: 3\r\n\r\n8\r\nSMUGGLED\r\n0\r\n\r\n",
        // Two lengths that disagree.
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nContent-Length: 40\r\n\r\nabcd",
    ];
    for probe in probes {
        let (answer, closed) = raw_exchange(addr, probe).await;
        assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
        assert!(closed, "the connection is closed after a 400");
    }
    assert_eq!(
        a.requests.load(Ordering::SeqCst),
        0,
        "nothing reached the backend"
    );
    wait_counted(
        &s,
        &[("listener", "web"), ("pool", "none"), ("code", "400")],
        3.0,
    )
    .await;
    // A well-framed chunked request still passes.
    let (answer, _) = raw_exchange(
        addr,
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n4\r\nabcd\r\n0\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}

#[tokio::test]
async fn requests_pingora_refuses_before_any_hook_are_answered_400_and_counted() {
    let a = App::start("a", Duration::ZERO).await;
    let port = reserve_port();
    let s = Sluice::start(&config(port, "", "", &plain(&[&a]))).await;
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let probes: [&[u8]; 2] = [
        // A header name with a space in it.
        b"GET / HTTP/1.1\r\nHost: a\r\nBad Header: x\r\n\r\n",
        // Not a request line.
        b"\x01\x02 garbage\r\n\r\n",
    ];
    for probe in probes {
        let (answer, closed) = raw_exchange(addr, probe).await;
        assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
        assert!(closed, "the connection is closed after a 400");
    }
    // A good request, answered, then a bad one on the same kept-alive
    // connection: one 200 (counted by the hooks), one 400.
    let mut c = TcpStream::connect(addr).await.unwrap();
    c.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    let mut first = Vec::new();
    while !String::from_utf8_lossy(&first).contains("\"path\":\"/\"}") {
        let mut buf = [0u8; 4096];
        let n = c.read(&mut buf).await.unwrap();
        assert!(n > 0, "closed before the first answer");
        first.extend_from_slice(&buf[..n]);
    }
    assert!(first.starts_with(b"HTTP/1.1 200"));
    c.write_all(b"GET / HTTP/1.1\r\nHost a\r\n\r\n")
        .await
        .unwrap();
    let mut second = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), c.read_to_end(&mut second))
        .await
        .expect("closed after the 400")
        .unwrap();
    let second = String::from_utf8_lossy(&second);
    assert!(second.starts_with("HTTP/1.1 400"), "{second}");
    assert_eq!(
        a.requests.load(Ordering::SeqCst),
        1,
        "only the good request reached the backend"
    );
    // Each refusal counted once.
    wait_counted(
        &s,
        &[("listener", "web"), ("pool", "none"), ("code", "400")],
        3.0,
    )
    .await;
    wait_counted(
        &s,
        &[("listener", "web"), ("pool", "app"), ("code", "200")],
        1.0,
    )
    .await;
}

#[tokio::test]
async fn slow_request_headers_are_cut_at_header_timeout() {
    let a = App::start("a", Duration::ZERO).await;
    let port = reserve_port();
    let s = Sluice::start(&config(
        port,
        "http:\n  header_timeout: 1s",
        "",
        &plain(&[&a]),
    ))
    .await;
    let mut c = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let started = Instant::now();
    c.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n").await.unwrap();
    // A byte every 200 ms: each read is quick, the header never ends.
    let cut = loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        if c.write_all(b"X").await.is_err() {
            break started.elapsed();
        }
        let mut probe = [0u8; 1];
        if let Ok(Ok(0) | Err(_)) =
            tokio::time::timeout(Duration::from_millis(1), c.read(&mut probe)).await
        {
            break started.elapsed();
        }
        assert!(started.elapsed() < Duration::from_secs(10), "never cut");
    };
    assert!(cut >= Duration::from_millis(900), "cut after {cut:?}");
    assert_eq!(a.requests.load(Ordering::SeqCst), 0);
    wait_counted(
        &s,
        &[("listener", "web"), ("pool", "none"), ("code", "408")],
        1.0,
    )
    .await;
    // A kept-alive client that idles longer than it between requests is
    // not cut: the keep-alive limit applies then (the idle time is the
    // stimulus here, not a wait for a state).
    let mut c = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    for round in 0..2 {
        c.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
            .await
            .unwrap();
        let mut got = Vec::new();
        while !String::from_utf8_lossy(&got).contains("\"name\":\"a\"") {
            let mut chunk = [0u8; 4096];
            let n = tokio::time::timeout(Duration::from_secs(10), c.read(&mut chunk))
                .await
                .unwrap()
                .unwrap();
            assert!(n > 0, "closed in round {round}");
            got.extend_from_slice(&chunk[..n]);
        }
        if round == 0 {
            tokio::time::sleep(Duration::from_millis(1500)).await;
        }
    }
}

#[tokio::test]
async fn routes_by_host_and_path_and_a_default() {
    let (web, api, stat) = (
        App::start("web", Duration::ZERO).await,
        App::start("api", Duration::ZERO).await,
        App::start("static", Duration::ZERO).await,
    );
    let port = reserve_port();
    let yaml = format!(
        "admin: {{ bind: '{{admin}}' }}\n\
         listeners:\n  web:\n    bind: 127.0.0.1:{port}\n    protocol: http\n    pool: web\n    http:\n      routes:\n\
         \x20       - {{ host: api.example.com, pool: api }}\n\
         \x20       - {{ host: '*.example.org', pool: api }}\n\
         \x20       - {{ path: /static/, pool: static }}\n\
         \x20       - {{ host: api.example.com, path: /static/, pool: static }}\n\
         pools:\n\
         \x20 web: {{ health_check: {{ interval: 200ms, timeout: 150ms }}, backends: ['{}'] }}\n\
         \x20 api: {{ health_check: {{ interval: 200ms, timeout: 150ms }}, backends: ['{}'] }}\n\
         \x20 static: {{ health_check: {{ interval: 200ms, timeout: 150ms }}, backends: ['{}'] }}\n",
        web.addr, api.addr, stat.addr
    );
    let s = Sluice::start(&yaml).await;
    let url = |path: &str| format!("http://127.0.0.1:{port}{path}");
    for (host, path, want) in [
        ("api.example.com", "/v1/x", "api"),
        ("API.Example.com:8080", "/", "api"),
        ("api.example.com", "/static/logo.png", "static"),
        ("www.example.org", "/", "api"),
        ("a.b.example.org", "/", "web"),
        ("www.example.com", "/static/app.js", "static"),
        ("www.example.com", "/index.html", "web"),
    ] {
        let (code, body) = get(&url(path), &["-H", &format!("Host: {host}")]).await;
        assert_eq!(code, 200, "{host}{path}: {body}");
        assert_eq!(json(&body)["name"], want, "{host}{path}");
    }
    wait_counted(
        &s,
        &[("listener", "web"), ("pool", "static"), ("code", "200")],
        2.0,
    )
    .await;
}

#[tokio::test]
async fn plain_listener_redirects_to_https_and_tls_listener_adds_hsts_over_http2() {
    let a = App::start("a", Duration::ZERO).await;
    let pki = pki::Pki::new("http-mode-ca");
    let leaf = pki.leaf("www", &["www.example.com"]);
    let (plain_port, tls_port) = (reserve_port(), reserve_port());
    let yaml = format!(
        "admin: {{ bind: '{{admin}}' }}\n\
         listeners:\n\
         \x20 http:\n    bind: 127.0.0.1:{plain_port}\n    protocol: http\n    pool: app\n    http: {{ redirect_https: {tls_port} }}\n\
         \x20 https:\n    bind: 127.0.0.1:{tls_port}\n    protocol: http\n    pool: app\n\
         \x20   tls: {{ cert: '{}', key: '{}' }}\n\
         \x20   http: {{ hsts: {{ max_age: 1d, include_subdomains: true }} }}\n\
         pools:\n  app: {{ health_check: {{ interval: 200ms, timeout: 150ms }}, backends: ['{}'] }}\n",
        leaf.cert(),
        leaf.key(),
        a.addr
    );
    let _s = Sluice::start(&yaml).await;
    let head = curl(&[
        "-i",
        "-H",
        "Host: www.example.com",
        &format!("http://127.0.0.1:{plain_port}/shop/cart?id=7"),
    ])
    .await;
    assert!(head.starts_with("HTTP/1.1 301"), "{head}");
    assert!(
        head.contains(&format!(
            "location: https://www.example.com:{tls_port}/shop/cart?id=7"
        )) || head.contains(&format!(
            "Location: https://www.example.com:{tls_port}/shop/cart?id=7"
        )),
        "{head}"
    );
    assert_eq!(
        a.requests.load(Ordering::SeqCst),
        0,
        "a redirect is answered by sluice"
    );

    let resolve = format!("www.example.com:{tls_port}:127.0.0.1");
    let url = format!("https://www.example.com:{tls_port}/secure");
    let out = curl(&[
        "--http2",
        "--cacert",
        &pki.ca(),
        "--resolve",
        &resolve,
        "-i",
        "-w",
        "\nversion=%{http_version}\n",
        &url,
    ])
    .await;
    assert!(out.starts_with("HTTP/2 200"), "{out}");
    assert!(
        out.to_ascii_lowercase()
            .contains("strict-transport-security: max-age=86400; includesubdomains"),
        "{out}"
    );
    assert!(out.contains("version=2"), "{out}");
    let body = out
        .split("\r\n\r\n")
        .nth(1)
        .unwrap()
        .lines()
        .next()
        .unwrap();
    let h = &json(body)["headers"];
    assert_eq!(h["x-forwarded-proto"], "https", "{h}");
    assert_eq!(h["x-forwarded-for"], "127.0.0.1");
    // HTTP/1.1 over TLS too, on one connection, alternating nothing (one backend).
    let out = curl(&[
        "--http1.1",
        "--cacert",
        &pki.ca(),
        "--resolve",
        &resolve,
        "-w",
        "\n%{http_version}\n",
        &url,
    ])
    .await;
    assert!(out.trim_end().ends_with("1.1"), "{out}");
}

#[tokio::test]
async fn access_log_writes_one_line_per_request() {
    let a = App::start("a", Duration::ZERO).await;
    let port = reserve_port();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let yaml = format!(
        "access_log: {{ path: '{}', format: json }}\n{}",
        log.display(),
        config(port, "", "", &plain(&[&a]))
    );
    let _s = Sluice::start(&yaml).await;
    let (names, connects) =
        many_gets(&format!("http://127.0.0.1:{port}/page?token=secret"), 3).await;
    assert_eq!((names.len(), connects), (3, 1));
    let mut lines = Vec::new();
    wait_until("three access-log lines", || {
        lines = std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect();
        std::future::ready(lines.len() >= 3)
    })
    .await;
    assert_eq!(lines.len(), 3, "{lines:?}");
    for l in &lines {
        let v = json(l);
        assert_eq!(v["method"], "GET");
        assert_eq!(v["path"], "/page", "the query is not logged: {l}");
        assert_eq!(v["status"], 200);
        assert_eq!(v["pool"], "app");
        assert_eq!(v["backend"], a.addr.to_string());
        assert_eq!(v["cause"], "completed");
        assert!(!l.contains("secret"));
    }
}

#[tokio::test]
async fn reload_adds_an_http_listener_next_to_a_tcp_one() {
    let a = App::start("a", Duration::ZERO).await;
    let (tcp_port, http_port) = (reserve_port(), reserve_port());
    let base = format!(
        "admin: {{ bind: '{{admin}}' }}\n\
         listeners:\n  tcp: {{ bind: 127.0.0.1:{tcp_port}, pool: app }}\n\
         pools:\n  app: {{ health_check: {{ interval: 200ms, timeout: 150ms }}, backends: ['{}'] }}\n",
        a.addr
    );
    let s = Sluice::start(&base).await;
    // The TCP listener relays HTTP as bytes: one backend connection per client.
    let (code, _) = get(&format!("http://127.0.0.1:{tcp_port}/"), &[]).await;
    assert_eq!(code, 200);
    s.rewrite_config(&base.replace(
        "pools:",
        &format!("  web: {{ bind: 127.0.0.1:{http_port}, protocol: http, pool: app }}\npools:"),
    ));
    let (status, body) = s.reload().await;
    assert_eq!(status, 200, "{body}");
    let (code, body) = get(&format!("http://127.0.0.1:{http_port}/after"), &[]).await;
    assert_eq!(code, 200);
    let h = &json(&body)["headers"];
    assert_eq!(
        h["x-forwarded-for"], "127.0.0.1",
        "the new listener speaks HTTP"
    );
    let (code, body) = get(&format!("http://127.0.0.1:{tcp_port}/"), &[]).await;
    assert_eq!(code, 200);
    assert!(
        json(&body)["headers"].get("x-forwarded-for").is_none(),
        "the TCP listener is unchanged"
    );
}

/// pingora's TLS connector panics when the system's CA certificates cannot
/// be loaded (here SSL_CERT_FILE adds one that is no certificate): sluice
/// builds one for an HTTP listener only after checking that they load, and
/// its health checks build none. The listener serves, the checks run, a
/// warning says why.
#[tokio::test]
async fn unloadable_system_certificates_neither_stop_http_listeners_nor_checks() {
    let a = App::start("a", Duration::ZERO).await;
    let port = reserve_port();
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("ca.pem");
    // PEM around a DER SEQUENCE that is no certificate.
    std::fs::write(
        &bad,
        "-----BEGIN CERTIFICATE-----\nMAMCAQA=\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let s = Sluice::spawn_with_env(
        &config(port, "", "", &plain(&[&a])),
        &[("SSL_CERT_FILE", bad.to_str().unwrap())],
    );
    s.wait_ready().await;
    let (code, body) = get(&format!("http://127.0.0.1:{port}/"), &[]).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(json(&body)["name"], "a");
    // More check rounds (200ms apart): the backend stays up, nothing panics.
    let backend = a.addr.to_string();
    let checks = [
        ("pool", "app"),
        ("backend", backend.as_str()),
        ("result", "success"),
    ];
    let before = s
        .metrics()
        .await
        .value("sluice_backend_health_checks_total", &checks);
    wait_until("three more health check rounds", || async {
        s.metrics()
            .await
            .value("sluice_backend_health_checks_total", &checks)
            >= before + 3.0
    })
    .await;
    assert_eq!(s.backend_state("app", a.addr).await, "up");
    let log = s.log();
    assert!(!log.contains("panicked"), "{log}");
    assert!(
        log.contains("the system's CA certificates cannot be loaded"),
        "{log}"
    );
}

#[test]
fn bad_protocol_and_misplaced_http_keys_are_named() {
    use sluice::config::{Config, ConfigError};
    let problems = |yaml: &str| match Config::from_yaml(yaml) {
        Err(ConfigError::Invalid(p)) => p.iter().map(ToString::to_string).collect::<Vec<_>>(),
        Ok(_) => panic!("accepted: {yaml}"),
        Err(e) => panic!("{e}"),
    };
    let pools = "pools: { app: { backends: ['127.0.0.1:9'] } }\n";
    let web = "listeners: { web: { bind: 127.0.0.1:80, pool: app, protocol: http } }\n";
    let app =
        |keys: &str| format!("{web}pools: {{ app: {{ {keys}, backends: ['127.0.0.1:9'] }} }}\n");
    // Each file, and a problem it must be refused with (the start of the line).
    let cases: Vec<(String, &str)> = vec![
        (
            format!(
                "listeners: {{ web: {{ bind: 127.0.0.1:80, pool: app, protocol: htp }} }}\n{pools}"
            ),
            "listeners.web.protocol: `htp` is not one of: tcp, http",
        ),
        (
            format!(
                "listeners: {{ web: {{ bind: 127.0.0.1:80, pool: app, http: {{ redirect_https: true }} }} }}\n{pools}"
            ),
            "listeners.web.http: only applies with protocol: http",
        ),
        (
            format!(
                "listeners: {{ web: {{ bind: 127.0.0.1:80, pool: app, protocol: http, http: {{ hsts: true }} }} }}\n{pools}"
            ),
            "listeners.web.http.hsts: browsers ignore",
        ),
        (
            format!(
                "listeners: {{ web: {{ bind: 127.0.0.1:80, protocol: http, http: {{ routes: [{{ host: 'a b', pool: nope }}] }} }} }}\n{pools}"
            ),
            "listeners.web.http.routes[0].host: `a b` is not a host name",
        ),
        // A pool's http_version: auto needs TLS; only for pools HTTP
        // listeners use; a TLS pool's own ALPN and TLS 1.3-only are
        // TCP-mode keys.
        (
            app("http_version: auto"),
            "pools.app.http_version: auto lets the backend choose by TLS ALPN",
        ),
        (
            app("http_version: 3"),
            "pools.app.http_version: `3` is not one of",
        ),
        (
            "listeners: { db: { bind: 127.0.0.1:80, pool: app } }\n\
             pools: { app: { http_version: 2, backends: ['127.0.0.1:9'] } }\n"
                .to_string(),
            "pools.app.http_version: only applies to pools that listeners with protocol: http use",
        ),
        (
            app("tls: { insecure_skip_verify: true, alpn: [h2] }"),
            "pools.app.tls.alpn: listener web (protocol http) offers",
        ),
        (
            app("tls: { insecure_skip_verify: true, min_version: '1.3' }"),
            "pools.app.tls.min_version: listener web (protocol http)",
        ),
    ];
    for (yaml, want) in &cases {
        let p = problems(yaml);
        assert!(p.iter().any(|l| l.starts_with(want)), "{want}: {p:?}");
    }
    let ok = Config::from_yaml(&app("http_version: 2")).unwrap();
    assert_eq!(
        ok.pools[0].http_version,
        Some(sluice::config::BackendHttp::Http2)
    );
    let ok = Config::from_yaml(&format!(
        "listeners: {{ web: {{ bind: 127.0.0.1:80, pool: app }} }}\n{pools}"
    ))
    .unwrap();
    assert_eq!(
        ok.listeners[0].protocol,
        sluice::config::Protocol::Tcp,
        "tcp by default"
    );
}

#[tokio::test]
async fn websocket_upgrade_passes_through_as_a_tunnel() {
    let a = App::start("a", Duration::ZERO).await;
    let port = reserve_port();
    let _s = Sluice::start(&config(port, "", "", &plain(&[&a]))).await;
    let mut c = websocket(port).await;
    // Bytes both ways through the tunnel, several times.
    for msg in [&b"hello"[..], b"\x81\x05frame", &[0u8; 3000][..]] {
        c.write_all(msg).await.unwrap();
        let mut echo = vec![0u8; msg.len()];
        tokio::time::timeout(Duration::from_secs(10), c.read_exact(&mut echo))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(echo, msg);
    }
}

/// Open a WebSocket tunnel through sluice at `port`.
async fn websocket(port: u16) -> TcpStream {
    let mut c = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    c.write_all(
        b"GET /chat HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
          Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    )
    .await
    .unwrap();
    let mut got = Vec::new();
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        let mut chunk = [0u8; 1024];
        let n = tokio::time::timeout(Duration::from_secs(10), c.read(&mut chunk))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "closed before the upgrade");
        got.extend_from_slice(&chunk[..n]);
    }
    assert!(got.starts_with(b"HTTP/1.1 101"));
    c
}

#[tokio::test]
async fn on_backend_down_close_ends_requests_in_flight_and_tunnels_on_that_backend() {
    // The backend takes 30 s over /slow; checks every 200 ms.
    let a = App::start("a", Duration::from_secs(30)).await;
    let port = reserve_port();
    let s = Sluice::start(&config(port, "", "on_backend_down: close", &plain(&[&a]))).await;
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut slow = TcpStream::connect(addr).await.unwrap();
    slow.write_all(b"GET /slow HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    let mut tunnel = websocket(port).await;
    tunnel.write_all(b"ping").await.unwrap();
    let mut echo = [0u8; 4];
    tunnel.read_exact(&mut echo).await.unwrap();
    // (The tunnel is not counted as a request by the backend.)
    wait_until("the slow request reaches the backend", || async {
        a.requests.load(Ordering::SeqCst) == 1
    })
    .await;
    // Checks now fail; the connections the backend has stay open.
    let started = Instant::now();
    a.close_port();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), slow.read_to_end(&mut answer))
        .await
        .expect("the request in flight is ended when its backend goes down")
        .ok();
    assert!(answer.is_empty(), "{}", String::from_utf8_lossy(&answer));
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), tunnel.read_to_end(&mut rest))
        .await
        .expect("the tunnel is ended when its backend goes down")
        .ok();
    assert!(started.elapsed() < Duration::from_secs(20));
    wait_counted(
        &s,
        &[("listener", "web"), ("pool", "app"), ("code", "502")],
        1.0,
    )
    .await;
}

/// HTTP/2: a connection lives past `header_timeout` (the slowloris clock
/// stops once the client speaks; it cut every HTTP/2 connection at that
/// age before), and a backend's close ends the streams it serves, not the
/// connection: a throttled download from a backend whose checks start
/// failing is reset at once.
#[tokio::test]
async fn http2_streams_outlive_the_header_timeout_and_end_with_their_backend() {
    let a = App::start("a", Duration::ZERO).await;
    let pki = pki::Pki::new("http-mode-ca");
    let leaf = pki.leaf("www", &["www.example.com"]);
    let port = reserve_port();
    let yaml = format!(
        "admin: {{ bind: '{{admin}}' }}\n\
         listeners:\n  web:\n    bind: 127.0.0.1:{port}\n    protocol: http\n    pool: app\n\
         \x20   tls: {{ cert: '{}', key: '{}' }}\n\
         \x20   http: {{ header_timeout: 1s }}\n\
         pools:\n  app: {{ on_backend_down: close, health_check: {{ interval: 200ms, timeout: 150ms }}, backends: ['{}'] }}\n",
        leaf.cert(),
        leaf.key(),
        a.addr
    );
    let s = Sluice::start(&yaml).await;
    // 512 MiB at 2 MB/s: over four minutes unless something ends it (slow
    // enough to stream, fast enough that what the socket buffers already
    // hold drains in seconds once the stream is reset).
    let mut download = tokio::process::Command::new("curl")
        .args(["-sS", "--http2", "--limit-rate", "2M", "-o", "/dev/null"])
        .args(["-w", "%{http_version} %{http_code}"])
        .arg("--cacert")
        .arg(pki.ca())
        .arg("--resolve")
        .arg(format!("www.example.com:{port}:127.0.0.1"))
        .arg(format!(
            "https://www.example.com:{port}/bytes/{}",
            512 << 20
        ))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    wait_until("the download reaches the backend", || async {
        a.requests.load(Ordering::SeqCst) == 1
    })
    .await;
    // Three header timeouts later the download still runs (a check of
    // elapsed time, not a wait for a state).
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        download.try_wait().unwrap().is_none(),
        "the HTTP/2 connection was cut"
    );
    let started = Instant::now();
    a.close_port();
    let done = tokio::time::timeout(Duration::from_secs(20), download.wait_with_output())
        .await
        .expect("the stream is ended when its backend goes down")
        .unwrap();
    let (status, out, err) = (
        done.status,
        String::from_utf8_lossy(&done.stdout),
        String::from_utf8_lossy(&done.stderr),
    );
    assert!(!status.success(), "{out} {err}");
    assert!(out.starts_with("2 200"), "over HTTP/2: {out} {err}");
    assert!(started.elapsed() < Duration::from_secs(20));
    // Counted with the status the client got.
    wait_counted(
        &s,
        &[("listener", "web"), ("pool", "app"), ("code", "200")],
        1.0,
    )
    .await;
}

#[tokio::test]
async fn a_large_upload_streams_without_growing_memory() {
    let a = App::start("a", Duration::ZERO).await;
    let port = reserve_port();
    let s = Sluice::start(&config(port, "", "", &plain(&[&a]))).await;
    // Warm up, then measure from here.
    let _ = get(&format!("http://127.0.0.1:{port}/"), &[]).await;
    let before = s.rss_kib();
    let size = (large_mib() as u64) << 20;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("upload.bin");
    std::fs::File::create(&file).unwrap().set_len(size).unwrap();
    let upload = tokio::spawn({
        let file = file.display().to_string();
        let url = format!("http://127.0.0.1:{port}/upload");
        async move { curl(&["-T", &file, "-w", "\n%{http_code}", &url]).await }
    });
    let mut peak = before;
    while !upload.is_finished() {
        peak = peak.max(s.rss_kib());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let out = upload.await.unwrap();
    let (body, code) = out.rsplit_once('\n').unwrap();
    assert_eq!(code, "200", "{out}");
    assert_eq!(json(body)["len"], size, "the backend got every byte");
    let grew = peak.saturating_sub(before);
    println!(
        "RSS before {before} KiB, peak {peak} KiB during a {} MiB upload",
        size >> 20
    );
    assert!(
        grew < 64 * 1024,
        "RSS grew by {grew} KiB for a {} MiB upload",
        size >> 20
    );
}

#[tokio::test]
async fn shutdown_closes_idle_keepalive_connections_without_waiting_out_the_timeout() {
    let a = App::start("a", Duration::ZERO).await;
    let port = reserve_port();
    let yaml = format!(
        "server: {{ shutdown_timeout: 60s, grace_period: 0s }}\n{}",
        config(port, "", "", &plain(&[&a]))
    );
    let s = Sluice::start(&yaml).await;
    let mut c = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    c.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    while !String::from_utf8_lossy(&got).contains("\"name\":\"a\"") {
        let mut chunk = [0u8; 4096];
        let n = c.read(&mut chunk).await.unwrap();
        assert!(n > 0);
        got.extend_from_slice(&chunk[..n]);
    }
    // The connection idles, kept alive; SIGTERM must end it at once rather
    // than wait for shutdown_timeout.
    s.signal(nix::sys::signal::Signal::SIGTERM);
    let status = s.wait_exit(Duration::from_secs(15)).await;
    assert!(status.success(), "{status:?}");
    let mut rest = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut rest))
        .await
        .unwrap()
        .unwrap_or(0);
    assert_eq!(n, 0, "closed without another byte");
}
