//! The stream relay over real loopback sockets with real TLS (rustls on
//! both ends): large transfers with checksums both ways, half-close (TLS
//! `close_notify` then FIN), a backend closing first, a peer gone without
//! `close_notify`, the idle timeout and the unused-backend window, like
//! `relay/tests.rs` for the TCP relay.

use std::sync::Arc;
use std::time::Duration;

use prometheus::IntCounter;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

use super::*;
use crate::relay::socket;

fn counter() -> IntCounter {
    IntCounter::new("c", "c").unwrap()
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

async fn socket_pair() -> (TcpStream, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
    let (b, _) = l.accept().await.unwrap();
    (a, b)
}

/// A server and a client configuration that trust each other, for `localhost`.
fn configs() -> (Arc<rustls::ServerConfig>, Arc<rustls::ClientConfig>) {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let der = CertificateDer::from(cert.cert.der().to_vec());
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(cert.key_pair.serialize_der()));
    let provider = crate::tls::provider();
    let server = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![der.clone()], key)
        .unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(der).unwrap();
    let client = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    (Arc::new(server), Arc::new(client))
}

type ClientEnd = tokio_rustls::client::TlsStream<TcpStream>;
type ServerEnd = tokio_rustls::server::TlsStream<TcpStream>;

/// A TLS connection whose server end is sluice's (over [`TcpIo`]).
async fn tls_pair(
    server: &Arc<rustls::ServerConfig>,
    client: &Arc<rustls::ClientConfig>,
) -> (ClientEnd, tokio_rustls::server::TlsStream<TcpIo>) {
    let (c, s) = socket_pair().await;
    let s = TcpIo(socket::register(s.into_std().unwrap()).unwrap());
    let connector = tokio_rustls::TlsConnector::from(Arc::clone(client));
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::clone(server));
    let name = ServerName::try_from("localhost").unwrap();
    let (c, s) = tokio::join!(connector.connect(name, c), acceptor.accept(s));
    (c.unwrap(), s.unwrap())
}

/// A TLS connection whose client end is sluice's.
async fn tls_pair_to_backend(
    server: &Arc<rustls::ServerConfig>,
    client: &Arc<rustls::ClientConfig>,
) -> (tokio_rustls::client::TlsStream<TcpIo>, ServerEnd) {
    let (c, s) = socket_pair().await;
    let c = TcpIo(socket::register(c.into_std().unwrap()).unwrap());
    let connector = tokio_rustls::TlsConnector::from(Arc::clone(client));
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::clone(server));
    let name = ServerName::try_from("localhost").unwrap();
    let (c, s) = tokio::join!(connector.connect(name, c), acceptor.accept(s));
    (c.unwrap(), s.unwrap())
}

type Outcome = (End, Totals, (u64, u64));

/// client (TLS) <-> [sluice: TLS server end | relay | plain socket] <-> backend (plain)
async fn terminating_relay(
    options: Options,
) -> (ClientEnd, TcpStream, tokio::task::JoinHandle<Outcome>) {
    let (server, client) = configs();
    let (client_end, mut proxy_client) = tls_pair(&server, &client).await;
    let (proxy_backend, backend_end) = socket_pair().await;
    let proxy_backend = socket::register(proxy_backend.into_std().unwrap()).unwrap();
    let task = tokio::spawn(async move {
        let (up, down, other) = (counter(), counter(), counter());
        let counters = relay_counters();
        let (end, totals) = relay(
            &mut Io::Stream(&mut proxy_client),
            &mut Io::Tcp(&proxy_backend),
            options,
            Meter {
                listener: &up,
                backend: &other,
                relay: &counters,
            },
            Meter {
                listener: &down,
                backend: &other,
                relay: &counters,
            },
            std::future::pending(),
        )
        .await;
        (end, totals, (up.get(), down.get()))
    });
    (client_end, backend_end, task)
}

fn options() -> Options {
    Options {
        idle_timeout: None,
        splice: true,
        unused_window: Duration::from_secs(5),
        fast_path: crate::config::FastPath::Off,
    }
}

async fn send_and_hash<R, W>(mut w: W, mut r: R, data: Vec<u8>) -> (usize, Vec<u8>)
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let writer = tokio::spawn(async move {
        w.write_all(&data).await.unwrap();
        w.shutdown().await.unwrap();
    });
    let mut hash = Sha256::new();
    let mut n = 0;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let k = r.read(&mut buf).await.unwrap();
        if k == 0 {
            break;
        }
        n += k;
        hash.update(&buf[..k]);
    }
    writer.await.unwrap();
    (n, hash.finalize().to_vec())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminated_tls_moves_large_transfers_intact_both_ways() {
    const LEN: usize = 8 << 20;
    let (client_end, backend_end, relay) = terminating_relay(options()).await;
    let (cr, cw) = tokio::io::split(client_end);
    let (br, bw) = backend_end.into_split();
    let (to_client, to_backend) = (pattern(1, LEN), pattern(2, LEN));
    let want_c = Sha256::digest(&to_client).to_vec();
    let want_b = Sha256::digest(&to_backend).to_vec();
    let at_backend = tokio::spawn(send_and_hash(bw, br, to_client));
    let (n, got) = send_and_hash(cw, cr, to_backend).await;
    assert_eq!((n, got), (LEN, want_c), "backend to client");
    assert_eq!(
        at_backend.await.unwrap(),
        (LEN, want_b),
        "client to backend"
    );
    let (end, totals, counted) = relay.await.unwrap();
    assert!(matches!(end, End::Done), "{end:?}");
    assert_eq!(
        (totals.to_backend, totals.to_client),
        (LEN as u64, LEN as u64)
    );
    assert_eq!(
        counted,
        (LEN as u64, LEN as u64),
        "every plaintext byte counted"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_close_notify_reaches_the_backend_as_a_half_close() {
    let (mut client_end, mut backend_end, relay) = terminating_relay(options()).await;
    client_end.write_all(b"request").await.unwrap();
    // close_notify, then FIN.
    client_end.shutdown().await.unwrap();
    let mut got = Vec::new();
    backend_end.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, b"request", "the backend sees the request and then EOF");
    let reply = pattern(3, 1 << 20);
    backend_end.write_all(&reply).await.unwrap();
    backend_end.shutdown().await.unwrap();
    let mut back = Vec::new();
    client_end.read_to_end(&mut back).await.unwrap();
    assert_eq!(
        back.len(),
        reply.len(),
        "the whole reply after the half-close"
    );
    assert!(back == reply);
    assert!(matches!(relay.await.unwrap().0, End::Done));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_closing_first_reaches_the_tls_client_as_close_notify() {
    let (mut client_end, mut backend_end, relay) = terminating_relay(options()).await;
    client_end.write_all(b"x").await.unwrap();
    let mut one = [0u8; 1];
    backend_end.read_exact(&mut one).await.unwrap();
    backend_end.write_all(b"bye").await.unwrap();
    drop(backend_end);
    let mut got = Vec::new();
    // read_to_end fails on a close without close_notify: this proves one came.
    client_end.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, b"bye");
    drop(client_end);
    let (end, ..) = relay.await.unwrap();
    assert!(matches!(end, End::Done | End::Error(..)), "{end:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_client_gone_without_close_notify_ends_its_direction() {
    let (mut client_end, mut backend_end, relay) = terminating_relay(options()).await;
    // A round trip first, so the client has read everything sent to it
    // (session tickets): closing with unread bytes would be a reset.
    client_end.write_all(b"x").await.unwrap();
    let mut one = [0u8; 1];
    backend_end.read_exact(&mut one).await.unwrap();
    backend_end.write_all(b"y").await.unwrap();
    client_end.read_exact(&mut one).await.unwrap();
    let (tcp, _) = client_end.into_inner();
    // FIN without close_notify.
    drop(tcp);
    let mut got = Vec::new();
    backend_end.read_to_end(&mut got).await.unwrap();
    assert!(got.is_empty(), "the backend sees the end of stream");
    drop(backend_end);
    let (end, ..) = relay.await.unwrap();
    assert!(!matches!(end, End::Error(Side::Client, _)), "{end:?}");
}

#[tokio::test(start_paused = true)]
async fn idle_tls_sessions_time_out() {
    let mut o = options();
    o.idle_timeout = Some(Duration::from_secs(30));
    let (_client_end, _backend_end, relay) = terminating_relay(o).await;
    let started = Instant::now();
    let (end, ..) = relay.await.unwrap();
    assert!(matches!(end, End::IdleTimeout), "{end:?}");
    let idle = started.elapsed();
    assert!(
        idle >= Duration::from_secs(30) && idle <= Duration::from_millis(33_750),
        "{idle:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_gone_before_the_session_began_is_unused() {
    let (client_end, backend_end, relay) = terminating_relay(options()).await;
    drop(backend_end);
    let (end, totals, _) = relay.await.unwrap();
    assert!(matches!(end, End::Unused(_)), "{end:?}");
    assert_eq!((totals.to_backend, totals.to_client), (0, 0));
    drop(client_end);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_on_both_sides() {
    const LEN: usize = 4 << 20;
    let (server, client) = configs();
    let (client_end, mut proxy_client) = tls_pair(&server, &client).await;
    let (mut proxy_backend, backend_end) = tls_pair_to_backend(&server, &client).await;
    let relay = tokio::spawn(async move {
        let c = counter();
        let counters = relay_counters();
        relay(
            &mut Io::Stream(&mut proxy_client),
            &mut Io::Stream(&mut proxy_backend),
            options(),
            Meter {
                listener: &c,
                backend: &c,
                relay: &counters,
            },
            Meter {
                listener: &c,
                backend: &c,
                relay: &counters,
            },
            std::future::pending(),
        )
        .await
    });
    let (cr, cw) = tokio::io::split(client_end);
    let (br, bw) = tokio::io::split(backend_end);
    let (to_client, to_backend) = (pattern(4, LEN), pattern(5, LEN));
    let want_c = Sha256::digest(&to_client).to_vec();
    let want_b = Sha256::digest(&to_backend).to_vec();
    let at_backend = tokio::spawn(send_and_hash(bw, br, to_client));
    assert_eq!(send_and_hash(cw, cr, to_backend).await, (LEN, want_c));
    assert_eq!(at_backend.await.unwrap(), (LEN, want_b));
    let (end, totals) = relay.await.unwrap();
    assert!(matches!(end, End::Done), "{end:?}");
    assert_eq!(totals.to_backend, LEN as u64);
}

fn relay_counters() -> crate::relay::RelayCounters {
    crate::relay::RelayCounters {
        spliced: counter(),
        normal: counter(),
        sockmap: counter(),
    }
}
