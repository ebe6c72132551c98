//! The relay over real loopback sockets: half-close,
//! large transfers with checksums both ways, backend closing first, idle
//! timeout, and the splice and buffer stages alike.

use super::*;
use prometheus::IntCounter;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

fn counter() -> IntCounter {
    IntCounter::new("c", "c").unwrap()
}

/// Deterministic pseudo-random bytes.
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

/// A connected loopback socket pair.
async fn socket_pair() -> (TcpStream, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
    let (b, _) = l.accept().await.unwrap();
    (a, b)
}

/// client_end <-> [proxy_client | relay_tcp | proxy_backend] <-> backend_end
async fn tcp_relay(
    options: Options,
) -> (
    TcpStream,
    TcpStream,
    tokio::task::JoinHandle<(End, Totals, (u64, u64), u64)>,
) {
    let (client_end, proxy_client) = socket_pair().await;
    let (proxy_backend, backend_end) = socket_pair().await;
    let as_socket = |s: TcpStream| socket::register(s.into_std().unwrap()).unwrap();
    let (proxy_client, proxy_backend) = (as_socket(proxy_client), as_socket(proxy_backend));
    let task = tokio::spawn(async move {
        let (up, down) = (counter(), counter());
        let (l, b, spliced) = (counter(), counter(), counter());
        let (end, totals) = relay_tcp(
            &proxy_client,
            &proxy_backend,
            options,
            Meter {
                listener: &up,
                backend: &l,
                spliced: &spliced,
            },
            Meter {
                listener: &down,
                backend: &b,
                spliced: &spliced,
            },
            std::future::pending(),
        )
        .await;
        (end, totals, (up.get(), down.get()), spliced.get())
    });
    (client_end, backend_end, task)
}

fn both_stages() -> [Options; 2] {
    [true, false].map(|splice| Options {
        idle_timeout: None,
        splice,
        unused_window: Duration::from_secs(5),
    })
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
async fn tcp_relay_moves_large_transfers_intact_both_ways() {
    const LEN: usize = 24 << 20;
    for options in both_stages() {
        let (client_end, backend_end, relay) = tcp_relay(options).await;
        let (cr, cw) = client_end.into_split();
        let (br, bw) = backend_end.into_split();
        let (to_client, to_backend) = (pattern(1, LEN), pattern(2, LEN));
        let (want_c, want_b) = (
            Sha256::digest(&to_client).to_vec(),
            Sha256::digest(&to_backend).to_vec(),
        );
        let at_backend = tokio::spawn(send_and_hash(bw, br, to_client));
        let (n, got) = send_and_hash(cw, cr, to_backend).await;
        assert_eq!(
            (n, got),
            (LEN, want_c),
            "backend to client, splice={}",
            options.splice
        );
        let (n, got) = at_backend.await.unwrap();
        assert_eq!(
            (n, got),
            (LEN, want_b),
            "client to backend, splice={}",
            options.splice
        );
        let (end, totals, (up, down), spliced) = relay.await.unwrap();
        if options.splice {
            assert!(
                spliced > LEN as u64,
                "bulk bytes went through pipes: {spliced}"
            );
        } else {
            assert_eq!(spliced, 0, "no pipe with splicing off");
        }
        assert!(matches!(end, End::Done), "{end:?}");
        assert_eq!(
            totals,
            Totals {
                to_backend: LEN as u64,
                to_client: LEN as u64
            }
        );
        assert_eq!((up, down), (LEN as u64, LEN as u64), "every byte counted");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_relay_passes_half_close_on() {
    for options in both_stages() {
        let (mut client_end, mut backend_end, relay) = tcp_relay(options).await;
        client_end.write_all(b"request").await.unwrap();
        client_end.shutdown().await.unwrap();
        let mut got = Vec::new();
        backend_end.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"request", "the backend sees the request and then EOF");
        let reply = pattern(3, 3 << 20);
        let (n, hash) = send_and_hash(backend_end, client_end, reply.clone()).await;
        assert_eq!((n, hash), (reply.len(), Sha256::digest(&reply).to_vec()));
        assert!(matches!(relay.await.unwrap().0, End::Done));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_relay_backend_closing_first_reaches_the_client() {
    for options in both_stages() {
        let (mut client_end, mut backend_end, relay) = tcp_relay(options).await;
        backend_end.write_all(b"bye").await.unwrap();
        drop(backend_end);
        let mut got = Vec::new();
        client_end.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"bye");
        drop(client_end);
        let (end, ..) = relay.await.unwrap();
        assert!(matches!(end, End::Done | End::Error(..)), "{end:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn tcp_relay_idle_timeout() {
    let options = Options {
        idle_timeout: Some(Duration::from_secs(30)),
        splice: true,
        unused_window: Duration::ZERO,
    };
    let (_client_end, _backend_end, relay) = tcp_relay(options).await;
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
async fn a_backend_gone_before_the_session_began_is_reported_as_unused() {
    for options in both_stages() {
        let (client_end, backend_end, relay) = tcp_relay(options).await;
        drop(backend_end);
        let (end, totals, ..) = relay.await.unwrap();
        assert!(matches!(end, End::Unused(_)), "{end:?}");
        assert_eq!(totals, Totals::default());
        drop(client_end);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_closing_an_idle_session_after_the_unused_window_ends_it() {
    for splice in [true, false] {
        let options = Options {
            idle_timeout: None,
            splice,
            unused_window: Duration::from_millis(100),
        };
        let (mut client_end, backend_end, relay) = tcp_relay(options).await;
        // Redis `timeout`, MySQL `wait_timeout`: the backend closes a silent
        // client on purpose, well after the connect.
        tokio::time::sleep(Duration::from_millis(300)).await;
        drop(backend_end);
        let mut rest = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), client_end.read_to_end(&mut rest))
            .await
            .expect("the client is told the session ended")
            .unwrap();
        drop(client_end);
        let (end, ..) = relay.await.unwrap();
        assert!(!matches!(end, End::Unused(_)), "{end:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn once_bytes_moved_a_backend_close_is_passed_on() {
    let (mut client_end, backend_end, relay) = tcp_relay(both_stages()[0]).await;
    client_end.write_all(b"x").await.unwrap();
    let mut backend_end = backend_end;
    let mut one = [0u8; 1];
    backend_end.read_exact(&mut one).await.unwrap();
    drop(backend_end);
    let mut rest = Vec::new();
    client_end.read_to_end(&mut rest).await.unwrap();
    drop(client_end);
    let (end, ..) = relay.await.unwrap();
    assert!(!matches!(end, End::Unused(_)), "{end:?}");
}
