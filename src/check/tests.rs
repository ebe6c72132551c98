//! Probe tests against fake servers on 127.0.0.1, and malformed-input tests
//! for every parser.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sha1::{Digest, Sha1};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use super::fixtures::*;
use super::*;
use crate::config::{Credentials, Expect, HttpCheck, Pattern, PostgresCheck, Secret, Step};

// ---------------------------------------------------------------- helpers

/// A listener that serves exactly one connection with `f`.
async fn one<T, F, Fut>(f: F) -> (SocketAddr, JoinHandle<T>)
where
    T: Send + 'static,
    F: FnOnce(TcpStream) -> Fut + Send + 'static,
    Fut: Future<Output = T> + Send,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let handle = tokio::spawn(async move {
        let (stream, _) = listener.accept().await.expect("accept");
        f(stream).await
    });
    (addr, handle)
}

/// A peer that writes `reply` at once, closes its side and drains what comes.
async fn blurt(reply: Vec<u8>) -> SocketAddr {
    one(|mut s| async move {
        let _ = s.write_all(&reply).await;
        let _ = s.shutdown().await;
        let mut sink = [0u8; 4096];
        while matches!(s.read(&mut sink).await, Ok(n) if n > 0) {}
    })
    .await
    .0
}

/// A peer that answers each request read with the next of `replies`, then
/// drains until the client closes. Returns what it read.
async fn scripted(replies: Vec<Vec<u8>>) -> (SocketAddr, JoinHandle<Vec<Vec<u8>>>) {
    one(|mut s| async move {
        let mut seen = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        for reply in replies {
            let n = s.read(&mut buf).await.unwrap_or(0);
            if n == 0 {
                return seen;
            }
            seen.push(buf.get(..n).unwrap_or_default().to_vec());
            if s.write_all(&reply).await.is_err() {
                return seen;
            }
        }
        while let Ok(n) = s.read(&mut buf).await {
            if n == 0 {
                break;
            }
            seen.push(buf.get(..n).unwrap_or_default().to_vec());
        }
        seen
    })
    .await
}

/// An address with nothing listening.
async fn refused_addr() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    listener.local_addr().expect("addr")
}

async fn run(kind: &CheckKind, addr: SocketAddr) -> Result<Option<Role>, ProbeError> {
    run_host(kind, addr, "backend.test").await
}

async fn run_host(
    kind: &CheckKind,
    addr: SocketAddr,
    host: &str,
) -> Result<Option<Role>, ProbeError> {
    tokio::time::timeout(Duration::from_secs(5), probe(kind, addr, host))
        .await
        .expect("probe hung")
}

fn secret(s: &str) -> Option<Secret> {
    Some(Secret::new(s.to_string()))
}

fn creds(user: Option<&str>, password: Option<&str>) -> Credentials {
    Credentials {
        user: user.map(str::to_string),
        password: password.and_then(secret),
    }
}

/// xorshift64: reproducible noise without another crate.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next() as u8).collect()
    }

    /// Random bytes, or `valid` cut short, or `valid` with bytes flipped.
    fn noise(&mut self, valid: &[u8]) -> Vec<u8> {
        match self.below(3) {
            0 => {
                let len = self.below(300);
                self.bytes(len)
            }
            1 => valid
                .get(..self.below(valid.len()))
                .unwrap_or_default()
                .to_vec(),
            _ => {
                let mut v = valid.to_vec();
                for _ in 0..=self.below(4) {
                    let i = self.below(v.len());
                    if let Some(b) = v.get_mut(i) {
                        *b = self.next() as u8;
                    }
                }
                v
            }
        }
    }
}

// ------------------------------------------------------------ shared bits

#[test]
fn role_names() {
    assert_eq!(Role::Primary.as_str(), "primary");
    assert_eq!(Role::Replica.as_str(), "replica");
}

#[test]
fn local_errors_are_told_apart() {
    for errno in [
        nix::libc::EMFILE,
        nix::libc::ENFILE,
        nix::libc::ENOBUFS,
        nix::libc::ENOMEM,
    ] {
        assert!(
            crate::sys::is_local_exhaustion(&io::Error::from_raw_os_error(errno)),
            "{errno}"
        );
    }
    assert!(!crate::sys::is_local_exhaustion(
        &io::Error::from_raw_os_error(nix::libc::ECONNREFUSED)
    ));
    assert!(ProbeError::Local(io::Error::from_raw_os_error(nix::libc::EMFILE)).is_local());
    assert!(!ProbeError::Failed("x".into()).is_local());
}

#[test]
fn preview_escapes_and_cuts() {
    assert_eq!(preview(b"a\r\n\x00\xff"), "\"a\\r\\n\\x00\\xff\"");
    let long = preview(&[b'x'; 200]);
    assert!(long.ends_with("\"…"));
    assert_eq!(long.matches('x').count(), 80);
}

#[tokio::test]
async fn tcp_connects_or_refuses() {
    let (addr, _h) = one(|_s| async {}).await;
    assert_eq!(run(&CheckKind::Tcp, addr).await.expect("up"), None);
    let err = run(&CheckKind::Tcp, refused_addr().await)
        .await
        .expect_err("refused");
    assert!(matches!(err, ProbeError::Connect(_)), "{err:?}");
    assert!(err.to_string().starts_with("connect failed: "), "{err}");
}

// ------------------------------------------------------------ send_expect

fn pattern(re: &str) -> Expect {
    Expect::Pattern(Pattern::new(re).expect("regex"))
}

#[tokio::test]
async fn send_expect_matches_in_order() {
    let (addr, h) = one(|mut s| async move {
        s.write_all(b"* OK ready\r\n").await.expect("write");
        let mut buf = [0u8; 64];
        let n = s.read(&mut buf).await.expect("read");
        s.write_all(b"PO").await.expect("write");
        tokio::time::sleep(Duration::from_millis(20)).await;
        s.write_all(b"NG\r\n").await.expect("write");
        buf.get(..n).unwrap_or_default().to_vec()
    })
    .await;
    let kind = CheckKind::SendExpect(vec![
        Step::Expect(pattern(r"^\* OK")),
        Step::Send(b"PING\r\n".to_vec()),
        Step::Expect(pattern("PONG")),
    ]);
    assert_eq!(run(&kind, addr).await.expect("pass"), None);
    assert_eq!(h.await.expect("server"), b"PING\r\n");
}

#[tokio::test]
async fn send_expect_bytes_mismatch_fails_at_once() {
    // The peer keeps the connection open: the verdict must not wait for EOF.
    let (addr, _h) = one(|mut s| async move {
        s.write_all(b"-ERR nope\r\n").await.expect("write");
        tokio::time::sleep(Duration::from_secs(30)).await;
    })
    .await;
    let kind = CheckKind::SendExpect(vec![Step::Expect(Expect::Bytes(b"+OK".to_vec()))]);
    let err = run(&kind, addr).await.expect_err("mismatch");
    assert!(matches!(err, ProbeError::Failed(_)), "{err:?}");
    assert_eq!(err.to_string(), r#"expected "+OK", got: "-ERR nope\r\n""#);
}

#[tokio::test]
async fn send_expect_eof_before_match() {
    let addr = blurt(b"hello\n".to_vec()).await;
    let kind = CheckKind::SendExpect(vec![Step::Expect(pattern("^world"))]);
    let err = run(&kind, addr).await.expect_err("eof");
    assert_eq!(
        err.to_string(),
        r#"connection closed before /^world/ was received, got: "hello\n""#
    );
}

#[tokio::test]
async fn send_expect_binary_bytes() {
    let (addr, h) = one(|mut s| async move {
        let mut buf = [0u8; 3];
        s.read_exact(&mut buf).await.expect("read");
        s.write_all(&[0x00, 0x01, 0xff, 0x42]).await.expect("write");
        buf
    })
    .await;
    let kind = CheckKind::SendExpect(vec![
        Step::Send(vec![0xde, 0xad, 0x00]),
        Step::Expect(Expect::Bytes(vec![0x00, 0x01, 0xff])),
    ]);
    assert_eq!(run(&kind, addr).await.expect("pass"), None);
    assert_eq!(h.await.expect("server"), [0xde, 0xad, 0x00]);
}

#[tokio::test]
async fn send_expect_each_expect_sees_only_new_bytes() {
    // "A" matched the first expect; the second must not match it again.
    let addr = blurt(b"A".to_vec()).await;
    let kind = CheckKind::SendExpect(vec![Step::Expect(pattern("A")), Step::Expect(pattern("A"))]);
    let err = run(&kind, addr).await.expect_err("second expect");
    assert!(
        err.to_string().starts_with("connection closed before /A/"),
        "{err}"
    );
}

// ------------------------------------------------------------------- http

/// An HTTP server answering by path; records each request head.
async fn http_server(
    routes: Vec<(&'static str, Vec<u8>)>,
) -> (SocketAddr, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let log = Arc::new(Mutex::new(Vec::new()));
    let seen = log.clone();
    let routes = Arc::new(routes);
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let routes = routes.clone();
            let seen = seen.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(n) if n > 0 => head.extend_from_slice(buf.get(..n).unwrap_or_default()),
                        _ => return,
                    }
                }
                let head = String::from_utf8_lossy(&head).into_owned();
                let path = head.split(' ').nth(1).unwrap_or_default().to_string();
                seen.lock().expect("lock").push(head);
                let reply = routes
                    .iter()
                    .find(|(p, _)| *p == path)
                    .map(|(_, r)| r.clone())
                    .unwrap_or_else(|| {
                        b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n".to_vec()
                    });
                let _ = s.write_all(&reply).await;
            });
        }
    });
    (addr, log)
}

fn http(path: &str) -> HttpCheck {
    HttpCheck {
        path: path.to_string(),
        ..HttpCheck::default()
    }
}

#[tokio::test]
async fn http_200_passes_with_headers() {
    // Keep-alive reply with Content-Length: the probe must not wait for EOF.
    let (addr, log) = http_server(vec![("/health", status(200))]).await;
    let kind = CheckKind::Http(http("/health"));
    assert_eq!(run(&kind, addr).await.expect("pass"), None);
    let head = log
        .lock()
        .expect("lock")
        .first()
        .cloned()
        .unwrap_or_default();
    assert!(head.starts_with("GET /health HTTP/1.1\r\n"), "{head}");
    assert!(head.contains("\r\nHost: backend.test\r\n"), "{head}");
    assert!(
        head.contains("\r\nUser-Agent: sluice-health-check\r\n"),
        "{head}"
    );
    assert!(head.contains("\r\nConnection: close\r\n"), "{head}");
}

#[tokio::test]
async fn http_host_and_port_override() {
    let (addr, log) = http_server(vec![("/", status(204))]).await;
    let check = HttpCheck {
        port: Some(addr.port()),
        host: Some("example.org".to_string()),
        ..HttpCheck::default()
    };
    // The backend's own port is wrong; `port` must win.
    let backend = SocketAddr::new(addr.ip(), refused_addr().await.port());
    assert_eq!(
        run(&CheckKind::Http(check), backend).await.expect("pass"),
        None
    );
    let head = log
        .lock()
        .expect("lock")
        .first()
        .cloned()
        .unwrap_or_default();
    assert!(head.contains("\r\nHost: example.org\r\n"), "{head}");

    // An IPv6 literal gets brackets; a name with a port is left alone.
    for (given, sent) in [("::1", "[::1]"), ("db.test:8080", "db.test:8080")] {
        let (addr, log) = http_server(vec![("/", status(200))]).await;
        let got = run_host(&CheckKind::Http(http("/")), addr, given).await;
        assert_eq!(got.expect("pass"), None);
        let head = log
            .lock()
            .expect("lock")
            .first()
            .cloned()
            .unwrap_or_default();
        assert!(head.contains(&format!("\r\nHost: {sent}\r\n")), "{head}");
    }
}

#[tokio::test]
async fn http_503_fails() {
    let (addr, _) = http_server(vec![("/", status(503))]).await;
    let err = run(&CheckKind::Http(http("/")), addr)
        .await
        .expect_err("503");
    assert!(matches!(err, ProbeError::Failed(_)), "{err:?}");
    assert_eq!(err.to_string(), "GET /: status 503");
}

#[tokio::test]
async fn http_body_pattern() {
    let reply = b"HTTP/1.0 200 OK\r\n\r\n{\"status\":\"UP\"}".to_vec();
    let (addr, _) = http_server(vec![("/", reply)]).await;
    let mut check = http("/");
    check.body = Some(Pattern::new(r#""status":"UP""#).expect("re"));
    assert_eq!(
        run(&CheckKind::Http(check.clone()), addr)
            .await
            .expect("pass"),
        None
    );
    check.body = Some(Pattern::new("DOWN").expect("re"));
    let err = run(&CheckKind::Http(check), addr)
        .await
        .expect_err("no match");
    assert!(matches!(err, ProbeError::Failed(_)), "{err:?}");
    assert!(
        err.to_string().contains("body does not match /DOWN/"),
        "{err}"
    );
}

#[tokio::test]
async fn http_chunked_body() {
    let reply = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nall \r\n5;x=y\r\ngood!\r\n0\r\n\r\n".to_vec();
    let (addr, _) = http_server(vec![("/", reply)]).await;
    let mut check = http("/");
    check.body = Some(Pattern::new("^all good!$").expect("re"));
    assert_eq!(
        run(&CheckKind::Http(check), addr).await.expect("pass"),
        None
    );
}

#[tokio::test]
async fn http_role_paths() {
    let (primary, _) = http_server(vec![
        ("/", status(200)),
        ("/primary", status(200)),
        ("/replica", status(503)),
    ])
    .await;
    let (replica, _) = http_server(vec![
        ("/", status(200)),
        ("/primary", status(503)),
        ("/replica", status(200)),
    ])
    .await;
    let (neither, _) = http_server(vec![
        ("/", status(200)),
        ("/primary", status(503)),
        ("/replica", status(503)),
    ])
    .await;
    let both = CheckKind::Http(HttpCheck {
        primary_path: Some("/primary".into()),
        replica_path: Some("/replica".into()),
        ..HttpCheck::default()
    });
    assert_eq!(
        run(&both, primary).await.expect("primary"),
        Some(Role::Primary)
    );
    assert_eq!(
        run(&both, replica).await.expect("replica"),
        Some(Role::Replica)
    );
    let err = run(&both, neither).await.expect_err("neither");
    assert_eq!(
        err.to_string(),
        "neither primary (GET /primary: 503) nor replica (GET /replica: 503)"
    );

    // Only primary_path: not the primary means a replica.
    let primary_only = CheckKind::Http(HttpCheck {
        primary_path: Some("/primary".into()),
        ..HttpCheck::default()
    });
    assert_eq!(
        run(&primary_only, primary).await.expect("p"),
        Some(Role::Primary)
    );
    assert_eq!(
        run(&primary_only, neither).await.expect("r"),
        Some(Role::Replica)
    );

    // Only replica_path.
    let replica_only = CheckKind::Http(HttpCheck {
        replica_path: Some("/replica".into()),
        ..HttpCheck::default()
    });
    assert_eq!(
        run(&replica_only, replica).await.expect("r"),
        Some(Role::Replica)
    );
    let err = run(&replica_only, primary)
        .await
        .expect_err("not a replica");
    assert_eq!(err.to_string(), "not a replica (GET /replica: 503)");
}

#[tokio::test]
async fn http_garbage_is_protocol() {
    let addr = blurt(b"SSH-2.0-OpenSSH_9.2p1\r\n".to_vec()).await;
    let err = run(&CheckKind::Http(http("/")), addr)
        .await
        .expect_err("garbage");
    assert!(matches!(err, ProbeError::Protocol(_)), "{err:?}");
    assert!(
        err.to_string()
            .starts_with("not an HTTP server: got \"SSH-2.0"),
        "{err}"
    );

    // A server that talks first and then waits (MySQL) is judged at once.
    let (addr, _h) = one(|mut s| async move {
        let _ = s.write_all(b"J\x00\x00\x00\x0a5.7.0\x00").await;
        tokio::time::sleep(Duration::from_secs(30)).await;
    })
    .await;
    let err = run(&CheckKind::Http(http("/")), addr)
        .await
        .expect_err("mysql");
    assert!(matches!(err, ProbeError::Protocol(_)), "{err:?}");

    let addr = blurt(b"HTTP/1.1 2x0 OK\r\n\r\n".to_vec()).await;
    let err = run(&CheckKind::Http(http("/")), addr)
        .await
        .expect_err("bad status");
    assert!(matches!(err, ProbeError::Protocol(_)), "{err:?}");

    let addr = blurt(Vec::new()).await;
    let err = run(&CheckKind::Http(http("/")), addr)
        .await
        .expect_err("empty");
    assert!(matches!(err, ProbeError::Io(_)), "{err:?}");
}

#[test]
fn http_parser_cases() {
    use super::http::parse_response;
    let r = parse_response(
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc",
        false,
    )
    .expect("ok")
    .expect("complete");
    assert_eq!((r.status, r.body.as_slice()), (200, &b"abc"[..]));
    // Needs more.
    assert!(
        parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nab", false)
            .expect("ok")
            .is_none()
    );
    assert!(
        parse_response(b"HTTP/1.1 200 OK\r\n\r\nab", false)
            .expect("ok")
            .is_none()
    );
    assert!(parse_response(b"HTT", false).expect("ok").is_none());
    // Chunked, incomplete then complete.
    assert!(
        parse_response(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: Chunked\r\n\r\n3\r\nab",
            false
        )
        .expect("ok")
        .is_none()
    );
    let r = parse_response(
        b"HTTP/1.1 200 OK\nTransfer-Encoding: chunked\n\n3\nabc\n0\n\n",
        false,
    )
    .expect("ok")
    .expect("complete");
    assert_eq!(r.body, b"abc");
    // Bad framing.
    assert!(parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n", false).is_err());
    assert!(
        parse_response(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            false
        )
        .is_err()
    );
    assert!(
        parse_response(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffffffffff\r\n",
            false
        )
        .is_err()
    );
    for bad in [
        &b"HTTP/1.1 20 OK\r\n\r\n"[..],
        b"HTTP/11 200 OK\r\n\r\n",
        b"HTTP/1.1 2000 OK\r\n\r\n",
        b"HTTP/1.1\r\n\r\n",
    ] {
        assert!(
            matches!(parse_response(bad, true), Err(ProbeError::Protocol(_))),
            "{bad:?}"
        );
    }
}

// ------------------------------------------------------------------ redis

#[tokio::test]
async fn redis_roles() {
    let (addr, h) = scripted(vec![PONG.to_vec(), ROLE_MASTER.to_vec()]).await;
    assert_eq!(
        run(&CheckKind::Redis(creds(None, None)), addr)
            .await
            .expect("master"),
        Some(Role::Primary)
    );
    let seen = h.await.expect("server");
    assert_eq!(
        seen.first().map(Vec::as_slice),
        Some(&b"*1\r\n$4\r\nPING\r\n"[..])
    );
    assert_eq!(
        seen.get(1).map(Vec::as_slice),
        Some(&b"*1\r\n$4\r\nROLE\r\n"[..])
    );

    let (addr, _) = scripted(vec![PONG.to_vec(), ROLE_SLAVE.to_vec()]).await;
    assert_eq!(
        run(&CheckKind::Redis(creds(None, None)), addr)
            .await
            .expect("slave"),
        Some(Role::Replica)
    );

    let (addr, _) = scripted(vec![
        PONG.to_vec(),
        b"*2\r\n$8\r\nsentinel\r\n*0\r\n".to_vec(),
    ])
    .await;
    let err = run(&CheckKind::Redis(creds(None, None)), addr)
        .await
        .expect_err("sentinel");
    assert!(matches!(err, ProbeError::Failed(_)), "{err:?}");
}

#[tokio::test]
async fn redis_auth() {
    let noauth = b"-NOAUTH Authentication required.\r\n".to_vec();
    let (addr, h) = scripted(vec![
        noauth.clone(),
        b"+OK\r\n".to_vec(),
        PONG.to_vec(),
        ROLE_MASTER.to_vec(),
    ])
    .await;
    let kind = CheckKind::Redis(creds(Some("mon"), Some("s3cret")));
    assert_eq!(run(&kind, addr).await.expect("auth"), Some(Role::Primary));
    let seen = h.await.expect("server");
    assert_eq!(
        seen.first().map(Vec::as_slice),
        Some(&b"*1\r\n$4\r\nPING\r\n"[..])
    );
    assert_eq!(
        seen.get(1).map(Vec::as_slice),
        Some(&b"*3\r\n$4\r\nAUTH\r\n$3\r\nmon\r\n$6\r\ns3cret\r\n"[..])
    );

    // A server that answers PING without a login still gets AUTH (an ACL
    // user may have rights the default user lacks), and no second PING.
    let (addr, h) = scripted(vec![
        PONG.to_vec(),
        b"+OK\r\n".to_vec(),
        ROLE_SLAVE.to_vec(),
    ])
    .await;
    assert_eq!(run(&kind, addr).await.expect("auth"), Some(Role::Replica));
    let seen = h.await.expect("server");
    assert!(
        seen.get(1)
            .is_some_and(|c| c.starts_with(b"*3\r\n$4\r\nAUTH")),
        "{seen:?}"
    );

    let (addr, h) = scripted(vec![
        noauth,
        b"-WRONGPASS invalid username-password pair or user is disabled.\r\n".to_vec(),
    ])
    .await;
    let kind = CheckKind::Redis(creds(None, Some("s3cret")));
    let err = run(&kind, addr).await.expect_err("wrongpass");
    assert!(matches!(err, ProbeError::Auth(_)), "{err:?}");
    assert!(err.to_string().contains("WRONGPASS"), "{err}");
    assert!(!err.to_string().contains("s3cret"), "{err}");
    let seen = h.await.expect("server");
    assert_eq!(
        seen.get(1).map(Vec::as_slice),
        Some(&b"*2\r\n$4\r\nAUTH\r\n$6\r\ns3cret\r\n"[..])
    );

    // Busy before the login: no password is sent.
    let (addr, h) = scripted(vec![b"-LOADING Redis is loading\r\n".to_vec()]).await;
    let err = run(&kind, addr).await.expect_err("loading");
    assert!(matches!(err, ProbeError::Failed(_)), "{err:?}");
    let seen = h.await.expect("server").concat();
    assert!(!seen.windows(6).any(|w| w == b"s3cret"), "{seen:?}");
}

#[tokio::test]
async fn redis_noauth_and_loading() {
    let (addr, _) = scripted(vec![b"-NOAUTH Authentication required.\r\n".to_vec()]).await;
    let err = run(&CheckKind::Redis(creds(None, None)), addr)
        .await
        .expect_err("noauth");
    assert!(matches!(err, ProbeError::Auth(_)), "{err:?}");

    let (addr, _) = scripted(vec![
        b"-LOADING Redis is loading the dataset in memory\r\n".to_vec(),
    ])
    .await;
    let err = run(&CheckKind::Redis(creds(None, None)), addr)
        .await
        .expect_err("loading");
    assert!(matches!(err, ProbeError::Failed(_)), "{err:?}");
    assert!(err.to_string().contains("LOADING"), "{err}");
}

#[tokio::test]
async fn redis_garbage_is_protocol() {
    let (addr, _) = scripted(vec![b"HTTP/1.1 400 Bad Request\r\n\r\n".to_vec()]).await;
    let err = run(&CheckKind::Redis(creds(None, None)), addr)
        .await
        .expect_err("http");
    assert!(matches!(err, ProbeError::Protocol(_)), "{err:?}");
    assert!(
        err.to_string()
            .starts_with("not a Redis server: got \"HTTP/1.1"),
        "{err}"
    );

    // A MySQL greeting.
    let (addr, _) = scripted(vec![greeting(&NONCE, "mysql_native_password")]).await;
    let err = run(&CheckKind::Redis(creds(None, None)), addr)
        .await
        .expect_err("mysql");
    assert!(matches!(err, ProbeError::Protocol(_)), "{err:?}");

    // A huge bulk length is refused before anything is buffered.
    let (addr, _) = scripted(vec![PONG.to_vec(), b"*1\r\n$999999999\r\nmaster".to_vec()]).await;
    let err = run(&CheckKind::Redis(creds(None, None)), addr)
        .await
        .expect_err("huge");
    assert!(matches!(err, ProbeError::Protocol(_)), "{err:?}");
    assert!(
        err.to_string().contains("bulk string of 999999999 bytes"),
        "{err}"
    );
}

#[test]
fn resp_parser_bounds() {
    use super::redis::{Bad, Value, parse};
    assert_eq!(
        parse(b"+OK\r\n"),
        Ok(Some((Value::Simple(b"OK".to_vec()), 5)))
    );
    assert_eq!(parse(b"$-1\r\n"), Ok(Some((Value::Bulk(None), 5))));
    assert_eq!(parse(b":-12\r\n"), Ok(Some((Value::Int(-12), 6))));
    assert_eq!(parse(b"$3\r\nab"), Ok(None));
    assert_eq!(parse(b"*2\r\n+a\r\n"), Ok(None));
    assert_eq!(parse(b"$3\r\nabcX\r\n"), Err(Bad::NotResp));
    assert_eq!(parse(b"$2\r\nabX"), Err(Bad::NotResp));
    assert_eq!(parse(b":1x\r\n"), Err(Bad::NotResp));
    assert_eq!(parse(b"$-2\r\n"), Err(Bad::NotResp));
    assert_eq!(parse(b"+OK\n"), Err(Bad::NotResp));
    assert!(matches!(parse(b"$1048577\r\n"), Err(Bad::Limit(_))));
    assert!(matches!(parse(b"*1025\r\n"), Err(Bad::Limit(_))));
    assert!(matches!(
        parse(b"*1\r\n*1\r\n*1\r\n*1\r\n*1\r\n:1\r\n"),
        Err(Bad::Limit(_))
    ));
    assert!(matches!(
        parse(b"*1\r\n*1\r\n*1\r\n*1\r\n:1\r\n"),
        Ok(Some(_))
    ));
    assert!(matches!(parse(&[b'+'; 70 * 1024]), Err(Bad::Limit(_))));
    assert_eq!(parse(b":99999999999999999999\r\n"), Err(Bad::NotResp));
}

// ------------------------------------------------------------------ mysql

async fn read_packet(s: &mut TcpStream) -> Option<(u8, Vec<u8>)> {
    let mut head = [0u8; 4];
    s.read_exact(&mut head).await.ok()?;
    let len = u32::from_le_bytes([head[0], head[1], head[2], 0]) as usize;
    let mut payload = vec![0; len];
    s.read_exact(&mut payload).await.ok()?;
    Some((head[3], payload))
}

/// User, auth response and plugin of a HandshakeResponse41.
fn parse_handshake_response(p: &[u8]) -> (u32, String, Vec<u8>, String) {
    let caps = u32::from_le_bytes(p[..4].try_into().expect("caps"));
    assert_eq!(&p[4..8], &(16u32 << 20).to_le_bytes(), "max packet");
    assert_eq!(p[8], 33, "charset");
    assert!(p[9..32].iter().all(|&b| b == 0), "filler");
    let rest = &p[32..];
    let nul = rest.iter().position(|&b| b == 0).expect("user NUL");
    let user = String::from_utf8_lossy(&rest[..nul]).into_owned();
    let rest = &rest[nul + 1..];
    let n = rest[0] as usize;
    let auth = rest[1..1 + n].to_vec();
    let rest = &rest[1 + n..];
    let plugin = String::from_utf8_lossy(rest.strip_suffix(&[0]).expect("plugin NUL")).into_owned();
    (caps, user, auth, plugin)
}

/// What a server checks: SHA1(scramble XOR SHA1(nonce + stored)) == stored,
/// where stored = SHA1(SHA1(password)).
fn server_accepts(password: &str, nonce: &[u8], auth: &[u8]) -> bool {
    let stored = Sha1::digest(Sha1::digest(password.as_bytes()));
    let mut h = Sha1::new();
    h.update(nonce);
    h.update(stored);
    let mask = h.finalize();
    let candidate: Vec<u8> = auth.iter().zip(mask.iter()).map(|(a, b)| a ^ b).collect();
    auth.len() == 20 && Sha1::digest(&candidate) == stored
}

/// A fake MySQL server with user `m`, password `pw`, and `read_only` as
/// given; `switch` makes it ask for an auth switch to that plugin first.
async fn mysql_server(
    read_only: &'static [u8],
    switch: Option<&'static str>,
) -> (SocketAddr, JoinHandle<Vec<String>>) {
    one(move |mut s| async move {
        let mut notes = Vec::new();
        s.write_all(&greeting(&NONCE, NATIVE))
            .await
            .expect("greeting");
        let (seq, response) = read_packet(&mut s).await.expect("response");
        assert_eq!(seq, 1);
        let (caps, user, mut auth, plugin) = parse_handshake_response(&response);
        assert_eq!(
            caps,
            0x1 | 0x200 | 0x2000 | 0x8000 | 0x8_0000,
            "client capabilities"
        );
        assert_eq!(plugin, NATIVE);
        notes.push(format!("user={user}"));
        let mut nonce = NONCE.to_vec();
        let mut seq = 2;
        if let Some(plugin) = switch {
            nonce = b"ZYXWVUTSRQ9876543210".to_vec();
            let mut p = vec![0xFE];
            p.extend_from_slice(plugin.as_bytes());
            p.push(0);
            p.extend_from_slice(&nonce);
            p.push(0);
            s.write_all(&packet(2, &p)).await.expect("switch");
            let Some((seq3, again)) = read_packet(&mut s).await else {
                notes.push("closed after switch".into());
                return notes;
            };
            assert_eq!(seq3, 3);
            auth = again;
            seq = 4;
        }
        if user != "m" || !server_accepts("pw", &nonce, &auth) {
            let msg = format!("Access denied for user '{user}'@'localhost' (using password: YES)");
            s.write_all(&err_packet(seq, 1045, &msg))
                .await
                .expect("err");
            notes.push("denied".into());
            return notes;
        }
        s.write_all(&ok_packet(seq)).await.expect("ok");
        let (seq, query) = read_packet(&mut s).await.expect("query");
        assert_eq!(seq, 0);
        assert_eq!(query, b"\x03SELECT @@global.read_only");
        s.write_all(&result_set(read_only)).await.expect("rows");
        if let Some((0, quit)) = read_packet(&mut s).await {
            notes.push(format!("quit={quit:?}"));
        }
        notes
    })
    .await
}

#[test]
fn mysql_scramble_is_what_a_server_accepts() {
    let auth = super::mysql::scramble(b"pw", &NONCE);
    assert!(server_accepts("pw", &NONCE, &auth));
    assert!(!server_accepts("other", &NONCE, &auth));
    assert!(super::mysql::scramble(b"", &NONCE).is_empty());
}

#[tokio::test]
async fn mysql_read_only_gives_role() {
    for (value, role) in [
        (&b"0"[..], Role::Primary),
        (b"1", Role::Replica),
        (b"OFF", Role::Primary),
        (b"ON", Role::Replica),
    ] {
        let (addr, h) = mysql_server(value, None).await;
        let got = run(&CheckKind::Mysql(creds(Some("m"), Some("pw"))), addr).await;
        assert_eq!(got.expect("login"), Some(role));
        assert_eq!(h.await.expect("server"), ["user=m", "quit=[1]"]);
    }
}

#[tokio::test]
async fn mysql_wrong_password_is_auth() {
    let (addr, _) = mysql_server(b"0", None).await;
    let err = run(&CheckKind::Mysql(creds(Some("m"), Some("nope"))), addr)
        .await
        .expect_err("denied");
    assert!(matches!(err, ProbeError::Auth(_)), "{err:?}");
    assert!(
        err.to_string().contains("Access denied for user 'm'"),
        "{err}"
    );
    assert!(!err.to_string().contains("nope"), "{err}");
}

#[tokio::test]
async fn mysql_auth_switch() {
    let (addr, h) = mysql_server(b"1", Some(NATIVE)).await;
    let got = run(&CheckKind::Mysql(creds(Some("m"), Some("pw"))), addr).await;
    assert_eq!(got.expect("switched login"), Some(Role::Replica));
    assert_eq!(h.await.expect("server"), ["user=m", "quit=[1]"]);

    let (addr, _) = mysql_server(b"0", Some("caching_sha2_password")).await;
    let err = run(&CheckKind::Mysql(creds(Some("m"), Some("pw"))), addr)
        .await
        .expect_err("unsupported");
    assert!(matches!(err, ProbeError::Failed(_)), "{err:?}");
    assert_eq!(
        err.to_string(),
        "authentication plugin caching_sha2_password is not supported; create the monitoring user with mysql_native_password"
    );
}

#[tokio::test]
async fn mysql_err_greeting_fails() {
    let mut p = vec![0xFF];
    p.extend_from_slice(&1129u16.to_le_bytes());
    p.extend_from_slice(b"Host '127.0.0.1' is blocked because of many connection errors");
    let addr = blurt(packet(0, &p)).await;
    let err = run(&CheckKind::Mysql(creds(Some("m"), Some("pw"))), addr)
        .await
        .expect_err("blocked");
    assert!(matches!(err, ProbeError::Failed(_)), "{err:?}");
    assert!(err.to_string().contains("is blocked"), "{err}");
}

#[tokio::test]
async fn mysql_query_error_and_odd_values() {
    // ERR for the query.
    let reply = [
        greeting(&NONCE, NATIVE),
        ok_packet(2),
        err_packet(1, 1227, "Access denied; no"),
    ]
    .concat();
    let addr = blurt(reply).await;
    let err = run(&CheckKind::Mysql(creds(Some("m"), None)), addr)
        .await
        .expect_err("query err");
    assert!(matches!(err, ProbeError::Failed(_)), "{err:?}");
    assert!(err.to_string().contains("1227"), "{err}");

    let reply = [greeting(&NONCE, NATIVE), ok_packet(2), result_set(b"maybe")].concat();
    let err = run(
        &CheckKind::Mysql(creds(Some("m"), None)),
        blurt(reply).await,
    )
    .await
    .expect_err("odd");
    assert!(matches!(err, ProbeError::Protocol(_)), "{err:?}");

    // NULL.
    let mut rs = result_set(b"0");
    let row_at = rs.len() - 9 - 6;
    rs.splice(row_at..row_at + 6, packet(4, &[0xFB]));
    let reply = [greeting(&NONCE, NATIVE), ok_packet(2), rs].concat();
    let err = run(
        &CheckKind::Mysql(creds(Some("m"), None)),
        blurt(reply).await,
    )
    .await
    .expect_err("null");
    assert!(err.to_string().contains("NULL"), "{err}");
}

#[tokio::test]
async fn mysql_garbage_is_protocol() {
    for reply in [
        b"HTTP/1.1 400 Bad Request\r\n\r\n".to_vec(),
        b"SSH-2.0-OpenSSH\r\n".to_vec(),
        b"\x05\x00\x00".to_vec(),
        packet(0, b"\x0a5.7\x00\x01\x02"),
        packet(0, b"\x09old server\x00"),
        greeting(&NONCE, NATIVE)[..30].to_vec(),
    ] {
        let err = run(
            &CheckKind::Mysql(creds(Some("m"), None)),
            blurt(reply.clone()).await,
        )
        .await
        .expect_err("garbage");
        assert!(matches!(err, ProbeError::Protocol(_)), "{reply:?}: {err:?}");
        assert!(
            err.to_string().starts_with("not a MySQL server: got "),
            "{err}"
        );
    }
    let err = run(
        &CheckKind::Mysql(creds(Some("m"), None)),
        blurt(Vec::new()).await,
    )
    .await
    .expect_err("eof");
    assert!(matches!(err, ProbeError::Io(_)), "{err:?}");
}

#[test]
fn mysql_greeting_every_prefix_is_safe() {
    let full = greeting(&NONCE, NATIVE);
    let payload = &full[4..];
    let g = super::mysql::parse_greeting(payload).expect("full greeting");
    assert_eq!(g.server_version, "5.7.44-fake");
    assert_eq!(g.connection_id, 42);
    assert_eq!(g.nonce, NONCE);
    assert_eq!(g.plugin.as_deref(), Some(NATIVE));
    assert_eq!((g.charset, g.status), (33, 2));
    for n in 0..payload.len() {
        let _ = super::mysql::parse_greeting(&payload[..n]);
    }
    assert!(super::mysql::parse_greeting(&payload[..40]).is_err());
    assert!(super::mysql::parse_row_value(&[0xFC, 0xFF]).is_none());
    assert!(super::mysql::parse_row_value(&[0xFE, 1, 2]).is_none());
    assert!(super::mysql::parse_err(&[0xFF, 1]).is_none());
}

// --------------------------------------------------------------- postgres

fn pg_kind() -> CheckKind {
    CheckKind::Postgres(PostgresCheck {
        credentials: creds(Some("mon"), Some("pw")),
        database: "postgres".to_string(),
        allow_md5: false,
    })
}

#[tokio::test]
async fn postgres_fake_login_and_roles() {
    for (value, role) in [("f", Role::Primary), ("t", Role::Replica)] {
        let (addr, h) = scripted(vec![pg_login_ok(), pg_result(value)]).await;
        assert_eq!(run(&pg_kind(), addr).await.expect("login"), Some(role));
        let seen = h.await.expect("server");
        let startup = seen.first().cloned().unwrap_or_default();
        assert!(startup.windows(8).any(|w| w == b"user\0mon"), "{startup:?}");
        assert!(seen.get(1).is_some_and(|q| q.starts_with(b"Q")), "{seen:?}");
        // Terminate, sent on the way out.
        assert!(seen.last().is_some_and(|x| x.starts_with(b"X")), "{seen:?}");
    }
}

#[tokio::test]
async fn postgres_errors_are_sorted() {
    let (addr, _) = scripted(vec![pg_error(
        "28P01",
        "password authentication failed for user \"mon\"",
    )])
    .await;
    let err = run(&pg_kind(), addr).await.expect_err("auth");
    assert!(matches!(err, ProbeError::Auth(_)), "{err:?}");
    assert!(
        err.to_string().contains("password authentication failed"),
        "{err}"
    );

    let (addr, _) = scripted(vec![pg_error(
        "57P03",
        "the database system is starting up",
    )])
    .await;
    let err = run(&pg_kind(), addr).await.expect_err("starting");
    assert!(matches!(err, ProbeError::Failed(_)), "{err:?}");
    assert_eq!(err.to_string(), "the database system is starting up");
}

#[tokio::test]
async fn postgres_non_pg_peer() {
    let (addr, _) = scripted(vec![
        b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n".to_vec(),
    ])
    .await;
    let err = run(&pg_kind(), addr).await.expect_err("http");
    assert!(matches!(err, ProbeError::Protocol(_)), "{err:?}");
    assert!(
        err.to_string()
            .starts_with("not a PostgreSQL server: got \"HTTP/1.1"),
        "{err}"
    );

    // A valid tag with a 2 GB length: refused, not allocated.
    let (addr, _) = scripted(vec![b"E\x7f\xff\xff\xffxx".to_vec()]).await;
    let err = run(&pg_kind(), addr).await.expect_err("huge");
    assert!(matches!(err, ProbeError::Protocol(_)), "{err:?}");

    let addr = blurt(Vec::new()).await;
    let err = run(&pg_kind(), addr).await.expect_err("eof");
    assert!(
        matches!(err, ProbeError::Io(_) | ProbeError::Protocol(_)),
        "{err:?}"
    );

    let err = run(&pg_kind(), refused_addr().await)
        .await
        .expect_err("refused");
    assert!(matches!(err, ProbeError::Connect(_)), "{err:?}");
}

// ------------------------------------------------------- cancel, fuzzing

#[tokio::test]
async fn dropped_probe_closes_its_socket() {
    for kind in [
        pg_kind(),
        CheckKind::Mysql(creds(Some("m"), None)),
        CheckKind::Redis(creds(None, None)),
    ] {
        // A server that accepts and never answers; it sees EOF once the
        // probe is dropped.
        let (addr, h) = one(|mut s| async move {
            let mut buf = [0u8; 1024];
            tokio::time::timeout(Duration::from_secs(5), async {
                while matches!(s.read(&mut buf).await, Ok(n) if n > 0) {}
            })
            .await
            .is_ok()
        })
        .await;
        let r = tokio::time::timeout(Duration::from_millis(200), probe(&kind, addr, "h")).await;
        assert!(r.is_err(), "{kind:?} should still be waiting");
        assert!(h.await.expect("server"), "{kind:?} left its socket open");
    }
}

#[tokio::test]
async fn random_replies_never_panic() {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let http_ok =
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n".to_vec();
    let mysql_ok = [greeting(&NONCE, NATIVE), ok_packet(2), result_set(b"1")].concat();
    let pg_ok = [pg_login_ok(), pg_result("t")].concat();
    let mut http_check = http("/");
    http_check.body = Some(Pattern::new("hel+o").expect("re"));
    let cases = [
        (CheckKind::Http(http_check), http_ok),
        (
            CheckKind::Redis(creds(None, Some("pw"))),
            [PONG, b"+OK\r\n".as_slice(), ROLE_SLAVE].concat(),
        ),
        (CheckKind::Mysql(creds(Some("m"), None)), mysql_ok),
        (pg_kind(), pg_ok),
    ];
    for (kind, valid) in &cases {
        // PostgreSQL answers the login and then the query, never ahead.
        let split = if kind.name() == "postgres" {
            pg_login_ok().len()
        } else {
            0
        };
        let serve = |reply: Vec<u8>| {
            let (first, rest) = reply.split_at(split.min(reply.len()));
            let (first, rest) = (first.to_vec(), rest.to_vec());
            one(move |mut s| async move {
                let mut sink = [0u8; 4096];
                if split > 0 {
                    let _ = s.read(&mut sink).await;
                    let _ = s.write_all(&first).await;
                    // A cut or bent login leaves the client waiting too.
                    let wait = Duration::from_millis(200);
                    let _ = tokio::time::timeout(wait, s.read(&mut sink)).await;
                }
                let _ = s.write_all(&rest).await;
                let _ = s.shutdown().await;
                while matches!(s.read(&mut sink).await, Ok(n) if n > 0) {}
            })
        };
        // The unmutated reply passes: the noise starts from something real.
        let r = run(kind, serve(valid.clone()).await.0).await;
        assert!(r.is_ok(), "{kind:?}: {r:?}");
        for _ in 0..200 {
            let reply = rng.noise(valid);
            let addr = serve(reply.clone()).await.0;
            let r = tokio::time::timeout(Duration::from_secs(2), probe(kind, addr, "h")).await;
            assert!(r.is_ok(), "{} hung on {}", kind.name(), preview(&reply));
        }
    }
}

// ------------------------------------------- hostile peers: budget, secrets

/// One move of a scripted hostile peer.
enum Turn {
    /// Read once: wait for the client's next request.
    Read,
    /// Write these bytes.
    Write(Vec<u8>),
    /// Write `unit` over and over until `max` bytes went out or the client
    /// is gone.
    Flood(Vec<u8>, usize),
}

/// A peer that plays `turns`, then drains until the client closes. Returns
/// the bytes the flood got out, and everything it read.
async fn hostile(turns: Vec<Turn>) -> (SocketAddr, JoinHandle<(usize, Vec<u8>)>) {
    one(|mut s| async move {
        let mut got = Vec::new();
        let mut sent = 0;
        let mut buf = vec![0u8; 64 * 1024];
        for turn in turns {
            match turn {
                Turn::Read => match s.read(&mut buf).await {
                    Ok(n) if n > 0 => got.extend_from_slice(buf.get(..n).unwrap_or_default()),
                    _ => return (sent, got),
                },
                Turn::Write(bytes) => {
                    if s.write_all(&bytes).await.is_err() {
                        return (sent, got);
                    }
                }
                Turn::Flood(unit, max) => {
                    let mut this = 0;
                    while this < max {
                        if s.write_all(&unit).await.is_err() {
                            return (sent, got);
                        }
                        this += unit.len();
                        sent += unit.len();
                    }
                }
            }
        }
        let _ = s.shutdown().await;
        let drain = async {
            while let Ok(n) = s.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                got.extend_from_slice(buf.get(..n).unwrap_or_default());
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(5), drain).await;
        (sent, got)
    })
    .await
}

/// What a flood may send before the probe must have given up: far more than
/// a check may read, yet small enough for the test machine when a probe
/// reads it all.
const FLOOD: usize = 24 * 1024 * 1024;

/// The probe failed for reading too much, and the peer could not push the
/// whole flood (the connection was dropped).
async fn assert_over_budget(
    what: &str,
    r: Result<Option<Role>, ProbeError>,
    peer: JoinHandle<(usize, Vec<u8>)>,
) {
    let err = r.expect_err(what);
    assert!(
        err.to_string().contains("in one check"),
        "{what}: want the read budget as the reason, got: {err}"
    );
    let (sent, _) = peer.await.expect("peer");
    assert!(
        sent < FLOOD,
        "{what}: the peer pushed all {sent} bytes: the connection was not dropped"
    );
}

#[tokio::test]
async fn postgres_endless_rows_hit_the_read_budget() {
    let mut row = 1u16.to_be_bytes().to_vec();
    row.extend_from_slice(&4000u32.to_be_bytes());
    row.extend_from_slice(&[b'f'; 4000]);
    let (addr, peer) = hostile(vec![
        Turn::Read,
        Turn::Write(pg_login_ok()),
        Turn::Read,
        Turn::Write(pg_result("f")[..pg_result("f").len() - 6 - 14].to_vec()),
        Turn::Flood(pg_msg(b'D', &row), FLOOD),
    ])
    .await;
    assert_over_budget("rows", run(&pg_kind(), addr).await, peer).await;
}

#[tokio::test]
async fn postgres_endless_notices_hit_the_read_budget() {
    let mut notice = b"SNOTICE\0VNOTICE\0C00000\0M".to_vec();
    notice.extend_from_slice(&[b'n'; 4000]);
    notice.extend_from_slice(b"\0\0");
    // Notices after the login: the client keeps them until it is ready.
    let (addr, peer) = hostile(vec![
        Turn::Read,
        Turn::Write(pg_msg(b'R', &0u32.to_be_bytes())),
        Turn::Flood(pg_msg(b'N', &notice), FLOOD),
    ])
    .await;
    assert_over_budget("notices", run(&pg_kind(), addr).await, peer).await;
}

#[tokio::test]
async fn postgres_endless_parameters_hit_the_read_budget() {
    let (addr, peer) = one(|mut s| async move {
        let mut buf = vec![0u8; 64 * 1024];
        let _ = s.read(&mut buf).await;
        if s.write_all(&pg_msg(b'R', &0u32.to_be_bytes()))
            .await
            .is_err()
        {
            return (0, Vec::new());
        }
        // Every name new, so that a client keeping them keeps them all.
        let mut sent = 0;
        let mut i = 0u64;
        while sent < FLOOD {
            let mut body = format!("param_{i}\0").into_bytes();
            body.extend_from_slice(&[b'v'; 4000]);
            body.push(0);
            let msg = pg_msg(b'S', &body);
            if s.write_all(&msg).await.is_err() {
                break;
            }
            sent += msg.len();
            i += 1;
        }
        (sent, Vec::new())
    })
    .await;
    assert_over_budget("parameters", run(&pg_kind(), addr).await, peer).await;
}

#[tokio::test]
async fn mysql_endless_column_definitions_hit_the_read_budget() {
    // 64 columns (the most the probe takes), each definition just under
    // the 1 MiB packet limit: 64 MiB if read to the end.
    let mut turns = vec![
        Turn::Write(greeting(&NONCE, NATIVE)),
        Turn::Read,
        Turn::Write(ok_packet(2)),
        Turn::Read,
        Turn::Write(packet(1, &[64])),
    ];
    let def = vec![b'c'; 1000 * 1024];
    for seq in 2..66u8 {
        turns.push(Turn::Flood(packet(seq, &def), 1));
    }
    let (addr, peer) = hostile(turns).await;
    let r = run(&CheckKind::Mysql(creds(Some("m"), None)), addr).await;
    let err = r.expect_err("columns");
    assert!(
        err.to_string().contains("in one check"),
        "want the read budget as the reason, got: {err}"
    );
    let (sent, _) = peer.await.expect("peer");
    assert!(
        sent < 64 * def.len(),
        "the peer pushed all 64 column definitions"
    );
}

#[tokio::test]
async fn redis_oversized_role_reply_hits_the_read_budget() {
    // A ROLE reply of 1.8 MB: each bulk string under the 1 MiB limit.
    let big = vec![b'x'; 900_000];
    let mut role = b"*3\r\n$6\r\nmaster\r\n".to_vec();
    for _ in 0..2 {
        role.extend_from_slice(format!("${}\r\n", big.len()).as_bytes());
        role.extend_from_slice(&big);
        role.extend_from_slice(b"\r\n");
    }
    let (addr, _) = scripted(vec![PONG.to_vec(), role]).await;
    let err = run(&CheckKind::Redis(creds(None, None)), addr)
        .await
        .expect_err("a 1.8 MB ROLE reply is not a Redis server's");
    assert!(
        err.to_string().contains("in one check"),
        "want the read budget as the reason, got: {err}"
    );
}

/// A PostgreSQL peer that asks for a password with `auth` (an
/// Authentication message body), then accepts whatever comes; returns what
/// it read.
async fn pg_asking(auth: Vec<u8>) -> (SocketAddr, JoinHandle<(usize, Vec<u8>)>) {
    hostile(vec![
        Turn::Read,
        Turn::Write(pg_msg(b'R', &auth)),
        Turn::Read,
        Turn::Write(pg_login_ok()),
        Turn::Read,
        Turn::Write(pg_result("f")),
    ])
    .await
}

/// A PasswordMessage (`p`) in what a PostgreSQL server read.
fn has_password_message(read: &[u8]) -> bool {
    // The startup message comes first and has no tag; `p` then length.
    read.windows(5)
        .any(|w| w.first() == Some(&b'p') && w.get(1..3) == Some(&[0, 0]))
}

#[tokio::test]
async fn postgres_never_sends_the_password_in_cleartext() {
    let (addr, peer) = pg_asking(3u32.to_be_bytes().to_vec()).await;
    let err = run(&pg_kind(), addr)
        .await
        .expect_err("cleartext is refused");
    let (_, read) = peer.await.expect("peer");
    assert!(
        !read.windows(2).any(|w| w == b"pw"),
        "the password went out: {}",
        preview(&read)
    );
    assert!(!has_password_message(&read), "{}", preview(&read));
    assert!(matches!(err, ProbeError::Auth(_)), "{err:?}");
    assert!(err.to_string().contains("cleartext"), "{err}");
    assert!(!err.to_string().contains("pw"), "{err}");
}

#[tokio::test]
async fn postgres_refuses_md5_by_default() {
    let mut md5 = 5u32.to_be_bytes().to_vec();
    md5.extend_from_slice(b"salt");
    let (addr, peer) = pg_asking(md5).await;
    let err = run(&pg_kind(), addr).await.expect_err("md5 is refused");
    let (_, read) = peer.await.expect("peer");
    assert!(!has_password_message(&read), "{}", preview(&read));
    assert!(matches!(err, ProbeError::Auth(_)), "{err:?}");
    assert!(
        err.to_string().contains("MD5") && err.to_string().contains("allow_md5"),
        "{err}"
    );
}

#[tokio::test]
async fn mysql_never_answers_a_switch_to_a_cleartext_plugin() {
    for plugin in ["mysql_clear_password", "dialog", "auth_gssapi_client", ""] {
        let (addr, h) = mysql_server(b"0", Some(plugin)).await;
        let err = run(&CheckKind::Mysql(creds(Some("m"), Some("pw"))), addr)
            .await
            .expect_err("refused");
        assert!(matches!(err, ProbeError::Failed(_)), "{plugin}: {err:?}");
        assert!(
            err.to_string().contains("is not supported"),
            "{plugin}: {err}"
        );
        // The server saw no answer to its switch: the probe hung up.
        assert_eq!(
            h.await.expect("server"),
            ["user=m", "closed after switch"],
            "{plugin}"
        );
    }
}

#[tokio::test]
async fn redis_password_goes_only_to_a_peer_that_speaks_resp() {
    // Something else at the address (a web server) must not receive the
    // password, which AUTH sends in cleartext.
    let (addr, peer) = hostile(vec![
        Turn::Read,
        Turn::Write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n".to_vec()),
    ])
    .await;
    let err = run(&CheckKind::Redis(creds(None, Some("s3cret"))), addr)
        .await
        .expect_err("not redis");
    assert!(matches!(err, ProbeError::Protocol(_)), "{err:?}");
    let (_, read) = peer.await.expect("peer");
    assert!(
        !read.windows(6).any(|w| w == b"s3cret"),
        "the password went to a web server: {}",
        preview(&read)
    );
}

#[tokio::test]
async fn a_peer_cannot_forge_log_lines_or_flood_the_log() {
    let forged = format!(
        "bad password\n[2026-01-01T00:00:00Z INFO  sluice::pool] pool app: backend 10.0.0.1:5432 is UP\x1b[0m{}",
        "x".repeat(10_000)
    );
    let (addr, _) = scripted(vec![pg_error("28P01", &forged)]).await;
    let pg = run(&pg_kind(), addr)
        .await
        .expect_err("refused")
        .to_string();
    let addr = blurt([greeting(&NONCE, NATIVE), err_packet(2, 1045, &forged)].concat()).await;
    let my = run(&CheckKind::Mysql(creds(Some("m"), None)), addr)
        .await
        .expect_err("denied")
        .to_string();
    for message in [pg, my] {
        assert!(
            !message.chars().any(char::is_control),
            "control characters reach the log: {message:?}"
        );
        assert!(message.contains("bad password\\n[2026"), "{message}");
        assert!(message.chars().count() < 400, "{} chars", message.len());
    }
}

#[tokio::test]
async fn every_kind_reads_through_the_one_budget() {
    let http_ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok".to_vec();
    let cases: Vec<(CheckKind, Vec<Vec<u8>>)> = vec![
        (
            CheckKind::SendExpect(vec![
                Step::Send(b"HI\r\n".to_vec()),
                Step::Expect(pattern("^OK")),
            ]),
            vec![b"OK, and a long line after it\r\n".to_vec()],
        ),
        (CheckKind::Http(http("/")), vec![http_ok]),
        (
            CheckKind::Redis(creds(None, None)),
            vec![PONG.to_vec(), ROLE_MASTER.to_vec()],
        ),
        (pg_kind(), vec![pg_login_ok(), pg_result("f")]),
    ];
    for (kind, replies) in cases {
        // Each passes with the whole budget…
        let (addr, _) = scripted(replies.clone()).await;
        let budget = Budget::new(READ_BUDGET);
        let r = probe_within(&kind, addr, "h", &budget).await;
        assert!(r.is_ok(), "{}: {r:?}", kind.name());
        assert!(
            budget.used() > 16,
            "{}: read {}",
            kind.name(),
            budget.used()
        );
        // …and fails, reading one byte past it, with 16 bytes.
        let (addr, _) = scripted(replies).await;
        let budget = Budget::new(16);
        let err = probe_within(&kind, addr, "h", &budget)
            .await
            .expect_err("over budget");
        assert!(
            matches!(err, ProbeError::TooMuch(16)),
            "{}: {err:?}",
            kind.name()
        );
        assert_eq!(budget.used(), 17, "{}", kind.name());
    }
    // MySQL speaks first.
    let reply = [greeting(&NONCE, NATIVE), ok_packet(2), result_set(b"0")].concat();
    let budget = Budget::new(16);
    let err = probe_within(
        &CheckKind::Mysql(creds(Some("m"), None)),
        blurt(reply).await,
        "h",
        &budget,
    )
    .await
    .expect_err("over budget");
    assert!(matches!(err, ProbeError::TooMuch(16)), "mysql: {err:?}");
    assert_eq!(budget.used(), 17);
}
