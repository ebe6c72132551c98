//! TLS with real peers on loopback: termination for `curl`, `openssl
//! s_client` and `redis-cli --tls`; certificates and pools chosen by SNI;
//! client certificates; old versions refused; passthrough to two NGINX
//! HTTPS backends; TLS to NGINX backends (mTLS, untrusted certificates,
//! checks inside TLS); hostile clients (garbage, plain HTTP, a ClientHello
//! in 1-byte writes, a stalled handshake); certificate reloads; start-up
//! and `-t` errors. Every certificate is made by the test (rcgen).

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod common;
#[path = "tls/peers.rs"]
mod peers;
#[path = "tls/pki.rs"]
mod pki;
mod servers;

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use common::*;
use peers::*;
use pki::{Leaf, Pki};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

/// A pool's health check for these tests: quick, one check decides.
const CHECK: &str = "{ interval: 300ms, timeout: 300ms, rise: 1, fall: 1 }";

fn tls_ok(s: &Scrape, listener: &str, result: &str) -> f64 {
    s.get(
        "sluice_tls_handshakes_total",
        &[("listener", listener), ("result", result)],
    )
    .unwrap_or(0.0)
}

async fn wait_count(sluice: &Sluice, listener: &str, result: &str, at_least: f64) {
    wait_until(
        &format!("{listener} handshakes {result} >= {at_least}"),
        || async { tls_ok(&sluice.metrics().await, listener, result) >= at_least },
    )
    .await;
}

async fn wait_no_clients(sluice: &Sluice, listener: &str) {
    wait_until(
        &format!("listener {listener} has no client left"),
        || async {
            sluice.metrics().await.value(
                "sluice_listener_connections_active",
                &[("listener", listener)],
            ) == 0.0
        },
    )
    .await;
}

/// A rustls client that trusts `ca`.
fn client_config(ca: &Pki) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    let pem = std::fs::read(&ca.ca_file).unwrap();
    for c in rustls::pki_types::CertificateDer::pem_slice_iter(&pem) {
        roots.add(c.unwrap()).unwrap();
    }
    Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth(),
    )
}

use rustls::pki_types::pem::PemObject;

fn terminating(port: u16, leaf: &Leaf, tls_extra: &str, pool_yaml: &str) -> String {
    format!(
        "admin: {{ bind: '{{admin}}' }}\n\
         listeners:\n  front:\n    bind: 127.0.0.1:{port}\n    pool: app\n    \
         tls: {{ certificates: [{{ cert: '{}', key: '{}' }}]{tls_extra} }}\n\
         pools:\n  app: {pool_yaml}\n",
        leaf.cert(),
        leaf.key()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_gets_https_from_a_plain_http_backend() {
    let pki = Pki::new("sluice test CA");
    let leaf = pki.leaf("www", &["www.example.com"]);
    let http = http_backend("hello over TLS").await;
    let port = reserve_port();
    let sluice = Sluice::start(&terminating(
        port,
        &leaf,
        ", alpn: [http/1.1]",
        &format!("{{ health_check: {CHECK}, backends: ['{http}'] }}"),
    ))
    .await;
    let r = curl("www.example.com", port, "/", &pki.ca_file, &[]).await;
    assert!(r.ok, "{r:?}");
    assert_eq!(r.out, "hello over TLS");
    let m = sluice.metrics().await;
    assert_eq!(tls_ok(&m, "front", "ok"), 1.0);
    assert_eq!(
        m.value(
            "sluice_tls_handshake_duration_seconds_count",
            &[("listener", "front")]
        ),
        1.0
    );
    // The certificate's notAfter, as the metric shows it.
    let pem = std::fs::read(&leaf.cert).unwrap();
    let der = rustls::pki_types::CertificateDer::from_pem_slice(&pem).unwrap();
    let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
    let not_after = cert.validity().not_after.timestamp() as f64;
    assert_eq!(
        m.value(
            "sluice_tls_certificate_expiry_timestamp_seconds",
            &[
                ("scope", "listener"),
                ("name", "front"),
                ("file", &leaf.cert())
            ]
        ),
        not_after
    );
    // ALPN: the listener's protocol is chosen; a client with none in
    // common is refused and counted.
    let alpn = |offer: &str| {
        format!(
            "s_client -connect 127.0.0.1:{port} -servername www.example.com -CAfile {} -alpn {offer}",
            pki.ca()
        )
        .split(' ')
        .map(String::from)
        .collect::<Vec<_>>()
    };
    let r = run("openssl", &alpn("h2,http/1.1")).await;
    assert!(r.out.contains("ALPN protocol: http/1.1"), "{r:?}");
    let r = run("openssl", &alpn("h2")).await;
    assert!(!r.out.contains("ALPN protocol"), "{r:?}");
    wait_count(&sluice, "front", "no_alpn", 1.0).await;
    // A plain request to the TLS port is refused and counted.
    let (status, _) = http_get(format!("127.0.0.1:{port}").parse().unwrap(), "/")
        .await
        .map_or((0, String::new()), |r| r);
    assert_ne!(status, 200);
    wait_count(&sluice, "front", "not_tls", 1.0).await;
    wait_no_clients(&sluice, "front").await;
    assert!(!sluice.log().contains("PRIVATE KEY"));
}

fn routed(port: u16, certs: &[&Leaf], routes: &str, default: &str, pools: &str) -> String {
    let certs: Vec<String> = certs
        .iter()
        .map(|l| format!("{{ cert: '{}', key: '{}' }}", l.cert(), l.key()))
        .collect();
    format!(
        "admin: {{ bind: '{{admin}}' }}\n\
         listeners:\n  front:\n    bind: 127.0.0.1:{port}\n    \
         tls: {{ certificates: [{}] }}\n    routes: {routes}\n{default}\
         pools:\n{pools}",
        certs.join(", ")
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_and_pools_are_chosen_by_server_name_exact_before_wildcard() {
    let pki = Pki::new("sluice test CA");
    let db_cert = pki.leaf("db", &["db.example.com"]);
    let wild = pki.leaf("wild", &["*.example.com"]);
    let db = Backend::start("db", Behavior::Name).await;
    let web = Backend::start("web", Behavior::Name).await;
    let port = reserve_port();
    let pools = format!(
        "  db: {{ health_check: {CHECK}, backends: ['{}'] }}\n  web: {{ health_check: {CHECK}, backends: ['{}'] }}\n",
        db.addr, web.addr
    );
    let sluice = Sluice::start(&routed(
        port,
        &[&wild, &db_cert],
        "[{ sni: '*.example.com', pool: web }, { sni: db.example.com, pool: db }]",
        "",
        &pools,
    ))
    .await;
    // db.example.com matches both; the exact route and certificate win.
    let r = s_client(port, Some("db.example.com"), &pki.ca_file, &[]).await;
    assert!(r.out.contains("\ndb\n"), "{r:?}");
    assert_eq!(subject(&r).as_deref(), Some("CN = db.example.com"), "{r:?}");
    let r = s_client(port, Some("www.example.com"), &pki.ca_file, &[]).await;
    assert!(r.out.contains("\nweb\n"), "{r:?}");
    assert_eq!(subject(&r).as_deref(), Some("CN = *.example.com"), "{r:?}");
    // A wrong name, and no name at all: no default_pool, refused and counted.
    let r = s_client(port, Some("db.example.org"), &pki.ca_file, &[]).await;
    assert!(
        !r.out.contains("\ndb\n") && !r.out.contains("\nweb\n"),
        "{r:?}"
    );
    let r = s_client(port, None, &pki.ca_file, &[]).await;
    assert!(
        !r.out.contains("\ndb\n") && !r.out.contains("\nweb\n"),
        "{r:?}"
    );
    wait_count(&sluice, "front", "unknown_sni", 2.0).await;
    assert_eq!(tls_ok(&sluice.metrics().await, "front", "ok"), 2.0);
    sluice
        .wait_log("no route for server name `db.example.org`")
        .await;

    // With a default_pool, unknown names go there (and get the first certificate).
    let port2 = reserve_port();
    let s2 = Sluice::start(&routed(
        port2,
        &[&wild, &db_cert],
        "[{ sni: db.example.com, pool: db }]",
        "    default_pool: web\n",
        &pools,
    ))
    .await;
    let r = s_client(port2, Some("other.example.com"), &pki.ca_file, &[]).await;
    assert!(r.out.contains("\nweb\n"), "{r:?}");
    let r = s_client(port2, Some("db.example.com"), &pki.ca_file, &[]).await;
    assert!(r.out.contains("\ndb\n"), "{r:?}");
    assert_eq!(tls_ok(&s2.metrics().await, "front", "unknown_sni"), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificates_required_optional_and_old_versions_refused() {
    let pki = Pki::new("sluice test CA");
    let leaf = pki.leaf("www", &["www.example.com"]);
    let clients = Pki::new("client CA");
    let client = clients.leaf("client", &["client.example.com"]);
    let other_ca = Pki::new("other CA");
    let stranger = other_ca.leaf("stranger", &["stranger.example.com"]);
    let named = Backend::start("open-sesame-42", Behavior::Name).await;
    let pool = format!("{{ health_check: {CHECK}, backends: ['{}'] }}", named.addr);
    let port = reserve_port();
    let sluice = Sluice::start(&terminating(
        port,
        &leaf,
        &format!(", client_ca: '{}', client_auth: required", clients.ca()),
        &pool,
    ))
    .await;
    let www = Some("www.example.com");
    let r = s_client(port, www, &pki.ca_file, &[]).await;
    assert!(
        !r.out.contains("open-sesame-42"),
        "no certificate, no data: {r:?}"
    );
    let cert = ["-cert", &client.cert(), "-key", &client.key()].map(String::from);
    let cert: Vec<&str> = cert.iter().map(String::as_str).collect();
    let r = s_client(port, www, &pki.ca_file, &cert).await;
    assert!(r.out.contains("open-sesame-42"), "{r:?}");
    let other = [
        "-cert".to_string(),
        stranger.cert(),
        "-key".to_string(),
        stranger.key(),
    ];
    let other: Vec<&str> = other.iter().map(String::as_str).collect();
    let r = s_client(port, www, &pki.ca_file, &other).await;
    assert!(
        !r.out.contains("open-sesame-42"),
        "a certificate from another CA: {r:?}"
    );
    wait_count(&sluice, "front", "bad_certificate", 2.0).await;
    assert_eq!(tls_ok(&sluice.metrics().await, "front", "ok"), 1.0);

    // TLS 1.0 (and 1.1) are refused, whatever the client's own settings.
    let old = ["-tls1", "-cipher", "DEFAULT:@SECLEVEL=0"];
    let r = s_client(port, www, &pki.ca_file, &old).await;
    assert!(!r.ok && !r.out.contains("open-sesame-42"), "{r:?}");
    wait_count(&sluice, "front", "protocol_version", 1.0).await;

    // optional: a client without a certificate is served.
    let port2 = reserve_port();
    let s2 = Sluice::start(&terminating(
        port2,
        &leaf,
        &format!(
            ", client_ca: '{}', client_auth: optional, min_version: 1.3",
            clients.ca()
        ),
        &pool,
    ))
    .await;
    let r = s_client(port2, www, &pki.ca_file, &[]).await;
    assert!(r.out.contains("open-sesame-42"), "{r:?}");
    // min_version 1.3: TLS 1.2 is refused.
    let r = s_client(port2, www, &pki.ca_file, &["-tls1_2"]).await;
    assert!(!r.out.contains("open-sesame-42"), "{r:?}");
    wait_count(&s2, "front", "protocol_version", 1.0).await;
    wait_no_clients(&sluice, "front").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cli_over_tls_to_a_plain_redis() {
    let redis = servers::Redis::start(None);
    let pki = Pki::new("sluice test CA");
    let leaf = pki.leaf("redis", &["redis.example.com"]);
    let port = reserve_port();
    let _sluice = Sluice::start(&terminating(
        port,
        &leaf,
        "",
        &format!("{{ health_check: {CHECK}, backends: ['{}'] }}", redis.addr),
    ))
    .await;
    let args = |cmd: &[&str]| -> Vec<String> {
        let mut a: Vec<String> = [
            "--tls",
            "--cacert",
            &pki.ca(),
            "--sni",
            "redis.example.com",
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        a.extend(cmd.iter().map(|s| s.to_string()));
        a
    };
    let r = run("redis-cli", &args(&["SET", "tls-key", "through sluice"])).await;
    assert_eq!(r.out.trim(), "OK", "{r:?}");
    let r = run("redis-cli", &args(&["GET", "tls-key"])).await;
    assert_eq!(r.out.trim(), "through sluice", "{r:?}");
    assert_eq!(redis.cli(&["GET", "tls-key"]), "through sluice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passthrough_reaches_the_backend_chosen_by_name_with_its_own_certificate() {
    let pki = Pki::new("sluice test CA");
    let a = pki.leaf("a", &["a.example.com"]);
    let b = pki.leaf("b", &["b.example.com"]);
    const BIG: usize = 8 << 20;
    let nginx_a = Nginx::start(&a.cert, &a.key, "backend A", "", BIG).await;
    let nginx_b = Nginx::start(&b.cert, &b.key, "backend B", "", 0).await;
    let port = reserve_port();
    // The pools check with a TCP connect: their backends' TLS is the clients'.
    let yaml = format!(
        "admin: {{ bind: '{{admin}}' }}\n\
         listeners:\n  front:\n    bind: 127.0.0.1:{port}\n    tls: passthrough\n    \
         routes: [{{ sni: a.example.com, pool: a }}, {{ sni: b.example.com, pool: b }}]\n\
         pools:\n  a: {{ health_check: {CHECK}, backends: ['{}'] }}\n  b: {{ health_check: {CHECK}, backends: ['{}'] }}\n",
        nginx_a.addr, nginx_b.addr
    );
    let sluice = Sluice::start(&yaml).await;
    let r = curl("a.example.com", port, "/", &pki.ca_file, &["-v"]).await;
    assert_eq!(r.out, "backend A\n", "{r:?}");
    assert!(r.err.contains("subject: CN=a.example.com"), "{}", r.err);
    let r = curl("b.example.com", port, "/", &pki.ca_file, &["-v"]).await;
    assert_eq!(r.out, "backend B\n", "{r:?}");
    assert!(r.err.contains("subject: CN=b.example.com"), "{}", r.err);
    // A bulk download: the untouched bytes go through pipes (splice).
    let r = curl(
        "a.example.com",
        port,
        "/big.bin",
        &pki.ca_file,
        &["-o", "/dev/null", "-w", "%{size_download}"],
    )
    .await;
    assert_eq!(r.out, BIG.to_string(), "{r:?}");
    let m = sluice.metrics().await;
    let spliced = m.value(
        "sluice_listener_spliced_bytes_total",
        &[("listener", "front")],
    );
    assert!(spliced > (BIG / 2) as f64, "spliced {spliced}");
    assert_eq!(tls_ok(&m, "front", "ok"), 3.0);
    // An unknown name is refused without a byte to any backend.
    let r = curl("c.example.com", port, "/", &pki.ca_file, &[]).await;
    assert!(!r.ok, "{r:?}");
    wait_count(&sluice, "front", "unknown_sni", 1.0).await;
    drop((nginx_a, nginx_b));
}

/// Writes at most one byte per call: a ClientHello in 1-byte segments.
struct OneByte(TcpStream);

impl AsyncRead for OneByte {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for OneByte {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let n = buf.len().min(1);
        Pin::new(&mut self.0).poll_write(cx, &buf[..n])
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// Hostile and broken clients against a terminating and a passthrough
/// listener: each ends as it should, is counted, and leaves no client behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_plain_http_split_hellos_and_stalls_are_counted_and_closed() {
    let pki = Pki::new("sluice test CA");
    let leaf = pki.leaf("www", &["www.example.com"]);
    let echo = Backend::start("echo", Behavior::Echo).await;
    let (term, pass) = (reserve_port(), reserve_port());
    let echo_tls = Nginx::start(&leaf.cert, &leaf.key, "nginx", "", 0).await;
    let yaml = format!(
        "admin: {{ bind: '{{admin}}' }}\n\
         listeners:\n  term:\n    bind: 127.0.0.1:{term}\n    pool: app\n    \
         tls: {{ certificates: [{{ cert: '{}', key: '{}' }}], handshake_timeout: 1s }}\n  \
         pass:\n    bind: 127.0.0.1:{pass}\n    pool: web\n    tls: {{ mode: passthrough, handshake_timeout: 1s }}\n\
         pools:\n  app: {{ health_check: {CHECK}, backends: ['{}'] }}\n  web: {{ health_check: {CHECK}, backends: ['{}'] }}\n",
        leaf.cert(),
        leaf.key(),
        echo.addr,
        echo_tls.addr
    );
    let sluice = Sluice::start(&yaml).await;
    for (listener, port) in [("term", term), ("pass", pass)] {
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        // Garbage: closed at once.
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(&[0x42; 64]).await.unwrap();
        let mut rest = Vec::new();
        let _ = tokio::time::timeout(DEADLINE, c.read_to_end(&mut rest))
            .await
            .unwrap();
        assert!(rest.len() < 64, "{listener}: no echo of garbage");
        // Plain HTTP.
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(b"GET / HTTP/1.1\r\nHost: www.example.com\r\n\r\n")
            .await
            .unwrap();
        let _ = tokio::time::timeout(DEADLINE, c.read_to_end(&mut rest))
            .await
            .unwrap();
        wait_count(&sluice, listener, "not_tls", 2.0).await;
        // A stall: half a record header, then nothing.
        let mut stalled = TcpStream::connect(addr).await.unwrap();
        stalled.write_all(&[0x16, 0x03]).await.unwrap();
        let started = std::time::Instant::now();
        let _ = tokio::time::timeout(DEADLINE, stalled.read_to_end(&mut rest))
            .await
            .unwrap();
        assert!(
            started.elapsed() >= Duration::from_millis(900),
            "{listener}: cut after the timeout"
        );
        wait_count(&sluice, listener, "timeout", 1.0).await;
        // A silent client: the same.
        let silent = TcpStream::connect(addr).await.unwrap();
        wait_count(&sluice, listener, "timeout", 2.0).await;
        drop(silent);
        // A ClientHello in 1-byte writes still makes it.
        let tcp = TcpStream::connect(addr).await.unwrap();
        tcp.set_nodelay(true).unwrap();
        let name = rustls::pki_types::ServerName::try_from("www.example.com").unwrap();
        let mut tls = tokio_rustls::TlsConnector::from(client_config(&pki))
            .connect(name, OneByte(tcp))
            .await
            .unwrap();
        if listener == "term" {
            tls.write_all(b"ping").await.unwrap();
            let mut got = [0u8; 4];
            tls.read_exact(&mut got).await.unwrap();
            assert_eq!(&got, b"ping");
        } else {
            tls.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .await
                .unwrap();
            let mut got = Vec::new();
            let _ = tls.read_to_end(&mut got).await;
            assert!(String::from_utf8_lossy(&got).contains("nginx"), "{got:?}");
        }
        drop(tls);
        wait_count(&sluice, listener, "ok", 1.0).await;
        wait_no_clients(&sluice, listener).await;
    }
}

/// Certificates for TLS to a backend that requires a client certificate.
struct Mutual {
    /// The backends' CA.
    pki: Pki,
    /// A backend's certificate, for backend.example.com.
    server: Leaf,
    /// The client CA (to be kept while NGINX reads its file).
    clients: Pki,
    /// sluice's client certificate.
    client: Leaf,
    /// NGINX server-block lines that require it.
    nginx: String,
}

fn mutual() -> Mutual {
    let pki = Pki::new("backend CA");
    let server = pki.leaf("backend", &["backend.example.com"]);
    let clients = Pki::new("client CA");
    let client = clients.leaf("sluice", &["sluice.example.com"]);
    let nginx = format!(
        "ssl_client_certificate {};\n  ssl_verify_client on;",
        clients.ca()
    );
    Mutual {
        pki,
        server,
        clients,
        client,
        nginx,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_to_backends_with_client_certificates_checks_inside_tls_and_untrusted_backends() {
    let Mutual {
        pki,
        server,
        clients: _clients,
        client,
        nginx: mtls,
    } = mutual();
    let nginx = Nginx::start(&server.cert, &server.key, "mutual TLS ok", &mtls, 0).await;
    let (p_ok, p_nocert, p_untrusted) = (reserve_port(), reserve_port(), reserve_port());
    let stranger_ca = Pki::new("stranger CA");
    // `ok` checks with HTTP inside TLS; the others handshake (the default
    // check for a TLS pool).
    let yaml = format!(
        "admin: {{ bind: '{{admin}}' }}\n\
         listeners:\n  ok: {{ bind: 127.0.0.1:{p_ok}, pool: ok }}\n  nocert: {{ bind: 127.0.0.1:{p_nocert}, pool: nocert }}\n  \
         untrusted: {{ bind: 127.0.0.1:{p_untrusted}, pool: untrusted }}\n\
         pools:\n  \
         ok:\n    tls: {{ ca: '{ca}', sni: backend.example.com, cert: '{cert}', key: '{key}' }}\n    \
         health_check: {{ kind: http, path: /, interval: 300ms, timeout: 300ms, rise: 1, fall: 1 }}\n    backends: ['{addr}']\n  \
         nocert:\n    tls: {{ ca: '{ca}', sni: backend.example.com }}\n    health_check: {CHECK}\n    backends: ['{addr}']\n  \
         untrusted:\n    tls: {{ ca: '{other}', sni: backend.example.com }}\n    health_check: {CHECK}\n    backends: ['{addr}']\n",
        ca = pki.ca(),
        cert = client.cert(),
        key = client.key(),
        addr = nginx.addr,
        other = stranger_ca.ca(),
    );
    let sluice = Sluice::spawn(&yaml);
    let get = |port: u16| async move {
        http_get(format!("127.0.0.1:{port}").parse().unwrap(), "/").await
    };
    wait_until("pool ok up", || async {
        http_get(sluice.admin, "/readyz")
            .await
            .is_ok_and(|(s, _)| s == 200)
            && sluice.backend_state("ok", nginx.addr).await == "up"
    })
    .await;
    let (status, body) = get(p_ok).await.unwrap();
    assert_eq!(
        (status, body.as_str()),
        (200, "mutual TLS ok\n"),
        "nginx log:\n{}",
        nginx.log()
    );
    // Without the client certificate the handshake succeeds (the check
    // passes) but NGINX refuses the request.
    let (status, _) = get(p_nocert).await.unwrap();
    assert_eq!(status, 400);
    // An untrusted certificate: down, with the reason in the log, and a
    // connect error of kind tls for a client that tries.
    wait_until("untrusted backend down", || async {
        sluice.backend_state("untrusted", nginx.addr).await == "down"
    })
    .await;
    sluice.wait_log("not trusted").await;
    let r = get(p_untrusted).await;
    assert!(
        r.is_err() || r.as_ref().is_ok_and(|(s, _)| *s == 0),
        "{r:?}"
    );
    let m = sluice.metrics().await;
    assert_eq!(
        m.value(
            "sluice_listener_rejected_total",
            &[("listener", "untrusted"), ("reason", "no_backend")]
        ),
        1.0
    );
    assert!(
        m.get(
            "sluice_backend_connect_errors_total",
            &[
                ("pool", "ok"),
                ("backend", &nginx.addr.to_string()),
                ("kind", "tls")
            ]
        )
        .is_some()
    );
    let expiry = m.value(
        "sluice_tls_certificate_expiry_timestamp_seconds",
        &[("scope", "pool"), ("name", "ok"), ("file", &client.cert())],
    );
    assert!(
        expiry > 4e9,
        "rcgen's default notAfter is in 4096: {expiry}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_connect_error_counts_as_kind_tls_and_tries_the_next_backend() {
    // Two backends, one presenting an untrusted certificate; active checks
    // off (interval long, tcp): the data path finds out by itself.
    let pki = Pki::new("backend CA");
    let good = pki.leaf("good", &["backend.example.com"]);
    let stranger = Pki::new("stranger CA");
    let bad = stranger.leaf("bad", &["backend.example.com"]);
    let good_nginx = Nginx::start(&good.cert, &good.key, "good", "", 0).await;
    let bad_nginx = Nginx::start(&bad.cert, &bad.key, "bad", "", 0).await;
    let port = reserve_port();
    let yaml = format!(
        "admin: {{ bind: '{{admin}}' }}\n\
         listeners: {{ front: {{ bind: 127.0.0.1:{port}, pool: app }} }}\n\
         pools:\n  app:\n    algorithm: round_robin\n    tls: {{ ca: '{}', sni: backend.example.com }}\n    \
         health_check: {{ kind: tcp, interval: 1h, timeout: 1s, rise: 1, fall: 5 }}\n    backends: ['{}', '{}']\n",
        pki.ca(),
        bad_nginx.addr,
        good_nginx.addr
    );
    let sluice = Sluice::start(&yaml).await;
    for _ in 0..4 {
        let (status, body) = http_get(format!("127.0.0.1:{port}").parse().unwrap(), "/")
            .await
            .unwrap();
        assert_eq!((status, body.as_str()), (200, "good\n"));
    }
    let m = sluice.metrics().await;
    let tls_errors = m.value(
        "sluice_backend_connect_errors_total",
        &[
            ("pool", "app"),
            ("backend", &bad_nginx.addr.to_string()),
            ("kind", "tls"),
        ],
    );
    assert!(tls_errors >= 1.0, "{tls_errors}");
}

/// HTTP mode to HTTPS backends: pingora's connector handshakes with the
/// pool's CA, server name and client certificate; `http_version` picks
/// HTTP/1.1, HTTP/2 (over TLS, or h2c by prior knowledge) or what ALPN
/// says; backend connections are reused; an untrusted backend is a 502 and
/// a connect error of kind tls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_mode_reaches_https_and_h2c_backends_over_http1_and_http2() {
    let Mutual {
        pki,
        server,
        clients: _clients,
        client,
        nginx: mtls,
    } = mutual();
    let said = "$server_protocol $ssl_client_verify";
    let both = Nginx::serve(
        Some((&server.cert, &server.key)),
        "ssl http2",
        said,
        &mtls,
        0,
    )
    .await;
    let h1_only = Nginx::serve(Some((&server.cert, &server.key)), "ssl", said, &mtls, 0).await;
    let h2c = Nginx::serve(None, "http2", "$server_protocol cleartext", "", 0).await;
    let stranger = Pki::new("stranger CA");
    let port = reserve_port();
    let tls = format!(
        "{{ ca: '{}', sni: backend.example.com, cert: '{}', key: '{}' }}",
        pki.ca(),
        client.cert(),
        client.key()
    );
    let yaml = format!(
        "admin: {{ bind: '{{admin}}' }}\n\
         listeners:\n  web:\n    bind: 127.0.0.1:{port}\n    protocol: http\n    pool: h1\n    http:\n      routes:\n\
         \x20       - {{ path: /h2/, pool: h2 }}\n\
         \x20       - {{ path: /auto/, pool: auto }}\n\
         \x20       - {{ path: /auto-h1/, pool: auto_h1 }}\n\
         \x20       - {{ path: /h2c/, pool: h2c }}\n\
         \x20       - {{ path: /untrusted/, pool: untrusted }}\n\
         pools:\n\
         \x20 h1: {{ tls: {tls}, health_check: {CHECK}, backends: ['{a}'] }}\n\
         \x20 h2: {{ tls: {tls}, http_version: 2, health_check: {CHECK}, backends: ['{a}'] }}\n\
         \x20 auto: {{ tls: {tls}, http_version: auto, health_check: {CHECK}, backends: ['{a}'] }}\n\
         \x20 auto_h1: {{ tls: {tls}, http_version: auto, health_check: {CHECK}, backends: ['{b}'] }}\n\
         \x20 h2c: {{ http_version: '2', health_check: {CHECK}, backends: ['{c}'] }}\n\
         \x20 untrusted:\n    tls: {{ ca: '{other}', sni: backend.example.com }}\n    \
         health_check: {{ kind: tcp, interval: 1h, timeout: 1s }}\n    backends: ['{a}']\n",
        a = both.addr,
        b = h1_only.addr,
        c = h2c.addr,
        other = stranger.ca(),
    );
    let sluice = Sluice::start(&yaml).await;
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    // The client certificate reached NGINX (SUCCESS) in each version.
    for (path, want) in [
        ("/x", "HTTP/1.1 SUCCESS"),
        ("/h2/x", "HTTP/2.0 SUCCESS"),
        ("/auto/x", "HTTP/2.0 SUCCESS"),
        ("/auto-h1/x", "HTTP/1.1 SUCCESS"),
        ("/h2c/x", "HTTP/2.0 cleartext"),
    ] {
        for _ in 0..3 {
            let (status, body) = http_get(addr, path).await.unwrap();
            assert_eq!(
                (status, body.trim_end()),
                (200, want),
                "{path}; nginx log:\n{}",
                both.log()
            );
        }
    }
    let m = sluice.metrics().await;
    for (pool, backend) in [
        ("h1", both.addr),
        ("h2", both.addr),
        ("auto", both.addr),
        ("auto_h1", h1_only.addr),
        ("h2c", h2c.addr),
    ] {
        // Three requests, one after another: one connection, kept alive.
        assert_eq!(
            m.value(
                "sluice_backend_connections_total",
                &[("pool", pool), ("backend", &backend.to_string())]
            ),
            1.0,
            "{pool}"
        );
    }
    assert_eq!(
        m.value(
            "sluice_http_upstream_requests_total",
            &[("listener", "web"), ("connection", "reused")]
        ),
        10.0
    );
    // An untrusted backend: a 502, counted as a TLS connect error.
    let (status, _) = http_get(addr, "/untrusted/x").await.unwrap();
    assert_eq!(status, 502);
    let m = sluice.metrics().await;
    assert_eq!(
        m.value(
            "sluice_backend_connect_errors_total",
            &[
                ("pool", "untrusted"),
                ("backend", &both.addr.to_string()),
                ("kind", "tls")
            ]
        ),
        1.0
    );
    let log = sluice.log();
    assert!(!log.contains("PRIVATE KEY"), "{log}");
}

/// A pool with both `proxy_protocol` and `tls`: the PROXY header goes
/// first on the TCP connection, the handshake after it, and NGINX
/// (`listen … ssl proxy_protocol`) learns the real client's address; the
/// header and the ClientHello leave in one segment (`MSG_MORE`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_pool_sends_the_proxy_header_before_the_handshake_in_one_segment() {
    let pki = Pki::new("backend CA");
    let server = pki.leaf("backend", &["backend.example.com"]);
    let nginx = Nginx::serve(
        Some((&server.cert, &server.key)),
        "ssl proxy_protocol",
        "$proxy_protocol_addr",
        "",
        0,
    )
    .await;
    // A backend that records what arrives and how: the first bytes, and in
    // how many data segments (TCP_INFO) once the whole ClientHello is in.
    let raw = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let raw_addr = raw.local_addr().unwrap();
    let segments = tokio::spawn(async move {
        // PROXY v2: 16 bytes + the address block; then a TLS record header
        // (5 bytes) and its body.
        let whole = |b: &[u8]| {
            if b.len() < 16 {
                return false;
            }
            let h = 16 + u16::from_be_bytes([b[14], b[15]]) as usize;
            b.len() >= h + 5 && b.len() >= h + 5 + u16::from_be_bytes([b[h + 3], b[h + 4]]) as usize
        };
        // Health checks (a LOCAL header, then closed) come and go first.
        let (s, got) = loop {
            let (mut s, _) = raw.accept().await.unwrap();
            let mut got = Vec::new();
            let mut buf = [0u8; 4096];
            while !whole(&got) {
                match s.read(&mut buf).await {
                    Ok(n) if n > 0 => got.extend_from_slice(&buf[..n]),
                    _ => break,
                }
            }
            if whole(&got) {
                break (s, got);
            }
        };
        use std::os::fd::AsFd;
        let (info, _) = sluice::relay::bpf::tcp_info(s.as_fd()).unwrap();
        (got, info.tcpi_data_segs_in)
    });
    let (p_nginx, p_raw) = (reserve_port(), reserve_port());
    let yaml = format!(
        "admin: {{ bind: '{{admin}}' }}\n\
         listeners:\n  a: {{ bind: 127.0.0.1:{p_nginx}, pool: nginx }}\n  b: {{ bind: 127.0.0.1:{p_raw}, pool: raw }}\n\
         pools:\n  \
         nginx: {{ proxy_protocol: v2, tls: {{ ca: '{ca}', sni: backend.example.com }}, health_check: {CHECK}, backends: ['{n}'] }}\n  \
         raw:\n    proxy_protocol: v2\n    tls: {{ ca: '{ca}', sni: backend.example.com }}\n    \
         health_check: {{ kind: tcp, interval: 1h, timeout: 1s }}\n    backends: ['{raw_addr}']\n",
        ca = pki.ca(),
        n = nginx.addr,
    );
    let sluice = Sluice::start(&yaml).await;
    // From another loopback address than sluice's own.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.7:0".parse().unwrap()).unwrap();
    let mut c = socket
        .connect(format!("127.0.0.1:{p_nginx}").parse().unwrap())
        .await
        .unwrap();
    c.write_all(b"GET / HTTP/1.0\r\nHost: backend.example.com\r\n\r\n")
        .await
        .unwrap();
    let mut answer = String::new();
    c.read_to_string(&mut answer).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        answer.ends_with("\r\n\r\n127.0.0.7\n"),
        "{answer}; nginx log:\n{}",
        nginx.log()
    );
    // The client says nothing first here: the header cannot wait for its
    // bytes, yet it leaves with the ClientHello.
    let _idle = TcpStream::connect(format!("127.0.0.1:{p_raw}"))
        .await
        .unwrap();
    let (got, segments) = tokio::time::timeout(Duration::from_secs(20), segments)
        .await
        .expect("the raw backend got header and ClientHello")
        .unwrap();
    assert!(got.starts_with(b"\r\n\r\n\0\r\nQUIT\n"), "{got:?}");
    assert_eq!(segments, 1, "header and ClientHello in one segment");
    drop(sluice);
}

fn reload_config(port: u16, leaf: &Leaf, echo: SocketAddr) -> String {
    terminating(
        port,
        leaf,
        "",
        &format!("{{ health_check: {CHECK}, backends: ['{echo}'] }}"),
    )
}

/// The subject of the certificate served for www.example.com (s_client
/// ends at its input's end: the backend here echoes).
async fn served_subject(port: u16, pki: &Pki) -> String {
    let args = format!(
        "s_client -connect 127.0.0.1:{port} -servername www.example.com -CAfile {} -verify_return_error",
        pki.ca()
    );
    let r = run(
        "openssl",
        &args.split(' ').map(String::from).collect::<Vec<_>>(),
    )
    .await;
    subject(&r).unwrap_or_else(|| panic!("no certificate: {r:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_reload_for_new_connections_and_bad_files_change_nothing() {
    let pki = Pki::new("sluice test CA");
    let first = pki.leaf("first", &["www.example.com", "first.example.com"]);
    let echo = Backend::start("echo", Behavior::Echo).await;
    let port = reserve_port();
    // The listener reads site.pem/site.key; the test swaps their contents.
    let site = Leaf {
        cert: pki.dir().join("site.pem"),
        key: pki.dir().join("site.key"),
    };
    let install = |from: &Leaf| {
        std::fs::copy(&from.cert, &site.cert).unwrap();
        std::fs::copy(&from.key, &site.key).unwrap();
    };
    install(&first);
    let sluice = Sluice::start(&reload_config(port, &site, echo.addr)).await;
    assert_eq!(served_subject(port, &pki).await, "CN = www.example.com");
    let serial = |pem: &std::path::Path| {
        let pem = std::fs::read(pem).unwrap();
        let der = rustls::pki_types::CertificateDer::from_pem_slice(&pem).unwrap();
        x509_parser::parse_x509_certificate(&der)
            .unwrap()
            .1
            .tbs_certificate
            .raw_serial_as_string()
    };

    // A connection opened before the reload keeps working across it.
    let tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("www.example.com").unwrap();
    let mut held = tokio_rustls::TlsConnector::from(client_config(&pki))
        .connect(name, tcp)
        .await
        .unwrap();
    held.write_all(b"before").await.unwrap();
    let mut got = [0u8; 6];
    held.read_exact(&mut got).await.unwrap();

    let second = pki.leaf("second", &["www.example.com", "second.example.com"]);
    install(&second);
    sluice.signal(nix::sys::signal::Signal::SIGHUP);
    sluice.wait_log("configuration reloaded").await;
    // The new certificate is served: its serial, as s_client shows it.
    let shown = run(
        "sh",
        &[
            "-c".to_string(),
            format!(
                "openssl s_client -connect 127.0.0.1:{port} -servername www.example.com -CAfile {} </dev/null 2>/dev/null | openssl x509 -noout -serial",
                pki.ca()
            ),
        ],
    )
    .await;
    assert_eq!(
        shown
            .out
            .trim()
            .trim_start_matches("serial=")
            .to_ascii_lowercase(),
        serial(&second.cert).replace(':', "").to_ascii_lowercase(),
        "{shown:?}"
    );
    held.write_all(b"after!").await.unwrap();
    held.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"after!", "the held connection kept its session");

    // Bad files: each reload fails naming the file, and the second
    // certificate stays in force.
    let mismatched = pki.leaf("third", &["www.example.com"]);
    std::fs::copy(&mismatched.cert, &site.cert).unwrap(); // key stays second's
    let (status, body) = sluice.reload().await;
    assert_ne!(status, 200);
    let text = body.to_string();
    assert!(
        text.contains("does not match the certificate in") && text.contains("site.pem"),
        "{text}"
    );
    let expired = pki.leaf_with("old", &["www.example.com"], true);
    install(&expired);
    let (status, body) = sluice.reload().await;
    assert_ne!(status, 200);
    assert!(body.to_string().contains("expired on 2020-12-31"), "{body}");
    std::fs::remove_file(&site.key).unwrap();
    let (status, body) = sluice.reload().await;
    assert_ne!(status, 200);
    assert!(
        body.to_string().contains("cannot read") && body.to_string().contains("site.key"),
        "{body}"
    );
    let shown = run(
        "sh",
        &[
            "-c".to_string(),
            format!(
                "openssl s_client -connect 127.0.0.1:{port} -servername www.example.com -CAfile {} </dev/null 2>/dev/null | openssl x509 -noout -serial",
                pki.ca()
            ),
        ],
    )
    .await;
    assert_eq!(
        shown
            .out
            .trim()
            .trim_start_matches("serial=")
            .to_ascii_lowercase(),
        serial(&second.cert).replace(':', "").to_ascii_lowercase(),
        "still the second certificate"
    );
    let m = sluice.metrics().await;
    assert_eq!(
        m.value("sluice_config_reloads_total", &[("result", "failure")]),
        3.0
    );
}

async fn check_config(yaml: &str) -> Run {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sluice.yaml");
    std::fs::write(&path, yaml).unwrap();
    run(
        env!("CARGO_BIN_EXE_sluice"),
        &[
            "-t".to_string(),
            "-c".to_string(),
            path.display().to_string(),
        ],
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_certificate_files_are_start_up_and_dash_t_errors_naming_the_file() {
    let pki = Pki::new("sluice test CA");
    let good = pki.leaf("good", &["www.example.com"]);
    let other = pki.leaf("other", &["www.example.com"]);
    let expired = pki.leaf_with("expired", &["www.example.com"], true);
    let pool = "{ backends: ['127.0.0.1:9'] }";
    let cases = [
        (
            Leaf {
                cert: good.cert.clone(),
                key: other.key.clone(),
            },
            format!(
                "listeners.front.tls.certificates[0].cert: the key in `{}` does not match the certificate in `{}`",
                other.key(),
                good.cert()
            ),
        ),
        (
            expired.clone(),
            format!(
                "listeners.front.tls.certificates[0].cert: the certificate in `{}` expired on 2020-12-31",
                expired.cert()
            ),
        ),
        (
            Leaf {
                cert: pki.dir().join("missing.pem"),
                key: good.key.clone(),
            },
            format!(
                "listeners.front.tls.certificates[0].cert: cannot read `{}`",
                pki.dir().join("missing.pem").display()
            ),
        ),
        (
            Leaf {
                cert: good.cert.clone(),
                key: good.cert.clone(),
            },
            format!(
                "listeners.front.tls.certificates[0].key: `{}` holds no PEM private key",
                good.cert()
            ),
        ),
    ];
    for (leaf, want) in cases {
        let yaml = terminating(reserve_port(), &leaf, "", pool).replace("{admin}", "127.0.0.1:1");
        let r = check_config(&yaml).await;
        assert!(!r.ok, "{r:?}");
        let all = format!("{}{}", r.out, r.err);
        assert!(all.contains(&want), "want {want}\ngot {all}");
        assert!(
            !all.contains("PRIVATE KEY"),
            "no key material in messages: {all}"
        );
        // Start-up says the same and exits 1.
        let s = Sluice::spawn(&terminating(reserve_port(), &leaf, "", pool));
        let status = s.wait_exit(DEADLINE).await;
        assert!(!status.success());
        assert!(s.log().contains(&want), "{}", s.log());
    }
    // verify: false needs insecure_skip_verify; with it, a warning.
    let yaml = |tls: &str| {
        format!(
            "listeners: {{ front: {{ bind: 127.0.0.1:1, pool: app }} }}\n\
             pools: {{ app: {{ tls: {tls}, backends: ['127.0.0.1:9'] }} }}\n"
        )
    };
    let r = check_config(&yaml("{ verify: false }")).await;
    assert!(
        !r.ok
            && format!("{}{}", r.out, r.err)
                .contains("pools.app.tls.verify: turning verification off"),
        "{r:?}"
    );
    let r = check_config(&yaml("{ insecure_skip_verify: true }")).await;
    assert!(r.ok, "{r:?}");
    assert!(
        format!("{}{}", r.out, r.err).contains("insecure_skip_verify"),
        "{r:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn insecure_skip_verify_warns_at_start_and_on_every_reload() {
    let pki = Pki::new("stranger CA");
    let leaf = pki.leaf("backend", &["backend.example.com"]);
    let nginx = Nginx::start(&leaf.cert, &leaf.key, "unverified", "", 0).await;
    let port = reserve_port();
    let yaml = format!(
        "admin: {{ bind: '{{admin}}' }}\n\
         listeners: {{ front: {{ bind: 127.0.0.1:{port}, pool: app }} }}\n\
         pools:\n  app: {{ tls: {{ insecure_skip_verify: true }}, health_check: {CHECK}, backends: ['{}'] }}\n",
        nginx.addr
    );
    let sluice = Sluice::start(&yaml).await;
    let warning =
        "pools.app.tls: insecure_skip_verify: the backends' certificates are NOT verified";
    assert_eq!(sluice.log().matches(warning).count(), 1, "{}", sluice.log());
    let (status, body) = http_get(format!("127.0.0.1:{port}").parse().unwrap(), "/")
        .await
        .unwrap();
    assert_eq!((status, body.as_str()), (200, "unverified\n"));
    let (status, _) = sluice.reload().await;
    assert_eq!(status, 200);
    wait_until("the warning again", || async {
        sluice.log().matches(warning).count() == 2
    })
    .await;
}
