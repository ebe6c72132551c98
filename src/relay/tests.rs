//! The relay over real loopback sockets: half-close,
//! large transfers with checksums both ways, backend closing first, idle
//! timeout, and the splice and buffer stages and the in-kernel fast path
//! alike (the fast path where this machine allows BPF; a loud line says
//! when it does not).

use super::*;
use prometheus::IntCounter;
use sha2::{Digest, Sha256};
use std::sync::Arc;
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
async fn tcp_relay(run: Run) -> (TcpStream, TcpStream, RelayTask, Arc<RelayCounters>) {
    tcp_relay_after(run, b"", b"").await
}

type RelayTask = tokio::task::JoinHandle<(End, Totals, (u64, u64), u64)>;

/// [`tcp_relay`], with `early_client` and `early_backend` already sent by
/// each end (and so waiting in the proxy's sockets) when the relay starts.
async fn tcp_relay_after(
    run: Run,
    early_client: &[u8],
    early_backend: &[u8],
) -> (TcpStream, TcpStream, RelayTask, Arc<RelayCounters>) {
    let options = run.options;
    let relay = Arc::new(RelayCounters {
        spliced: counter(),
        normal: counter(),
        sockmap: counter(),
    });
    let counters = Arc::clone(&relay);
    let (mut client_end, proxy_client) = socket_pair().await;
    let (proxy_backend, mut backend_end) = socket_pair().await;
    client_end.write_all(early_client).await.unwrap();
    backend_end.write_all(early_backend).await.unwrap();
    // Loopback delivers within the write: the bytes wait in the proxy's queues.
    let as_socket = |s: TcpStream| socket::register(s.into_std().unwrap()).unwrap();
    let (proxy_client, proxy_backend) = (as_socket(proxy_client), as_socket(proxy_backend));
    let task = tokio::spawn(async move {
        let (up, down) = (counter(), counter());
        let (l, b) = (counter(), counter());
        let meters = (
            Meter {
                listener: &up,
                backend: &l,
                relay: &relay,
            },
            Meter {
                listener: &down,
                backend: &b,
                relay: &relay,
            },
        );
        let forced = if run.force {
            let k = sockmap::kernel().unwrap();
            let (up, down) = (&meters.0, &meters.1);
            let abort = std::future::pending();
            // Refused (a socket closed before it could enter): the normal relay.
            sockmap::relay_on(k, &proxy_client, &proxy_backend, options, up, down, abort)
                .await
                .ok()
        } else {
            None
        };
        let (end, totals) = if let Some(ended) = forced {
            ended
        } else {
            let (up, down) = meters;
            relay_tcp(
                &proxy_client,
                &proxy_backend,
                options,
                up,
                down,
                std::future::pending(),
            )
            .await
        };
        // The path asked for is the path taken (the probe decides when not forced).
        let path = (relay.normal.get(), relay.sockmap.get());
        match options.fast_path {
            FastPath::Off if !run.force => assert_eq!(path, (1, 0), "{run:?}"),
            _ => assert_eq!(path.0 + path.1, 1, "{run:?}"),
        }
        (end, totals, (up.get(), down.get()), relay.spliced.get())
    });
    (client_end, backend_end, task, counters)
}

/// Wait until the relay has chosen its path; on a fast-path run, that it
/// took the fast path (the sockets were established when it began).
async fn entered(run: Run, counters: &RelayCounters) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while counters.normal.get() + counters.sockmap.get() == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the relay never began"
        );
        tokio::task::yield_now().await;
    }
    if run.fast_path == FastPath::Sockmap && (run.force || sockmap::verdict().is_ok()) {
        assert_eq!(counters.sockmap.get(), 1, "took the fast path: {run:?}");
    }
}

/// Straight to stderr, once per message: the test harness hides the
/// `eprintln!` of passing tests, and this must be seen.
fn loud(line: &str) {
    use std::io::Write;
    static SAID: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
    let mut said = SAID.lock().unwrap_or_else(|e| e.into_inner());
    if !said.iter().any(|l| l == line) {
        let _ = writeln!(std::io::stderr(), "{line}");
        said.push(line.to_string());
    }
}

/// One way of relaying under test: relay options, and whether the fast
/// path is taken even where the kernel failed the probe.
#[derive(Clone, Copy, Debug)]
struct Run {
    options: Options,
    force: bool,
}

impl std::ops::Deref for Run {
    type Target = Options;
    fn deref(&self) -> &Options {
        &self.options
    }
}

impl std::ops::DerefMut for Run {
    fn deref_mut(&mut self) -> &mut Options {
        &mut self.options
    }
}

const NORMAL: Options = Options {
    idle_timeout: None,
    splice: true,
    unused_window: Duration::from_secs(5),
    fast_path: FastPath::Off,
};

/// The two user-space stages, and the fast path where this machine passes
/// its probe (a loud line says when it does not): every relay semantic.
fn both_stages() -> Vec<Run> {
    let mut all = vec![
        Run {
            options: NORMAL,
            force: false,
        },
        Run {
            options: Options {
                splice: false,
                ..NORMAL
            },
            force: false,
        },
    ];
    match sockmap::verdict() {
        Ok(_) => all.push(Run {
            options: Options {
                fast_path: FastPath::Sockmap,
                ..NORMAL
            },
            force: false,
        }),
        Err(why) => loud(&format!(
            "WARNING: fast_path: sockmap NOT TESTED with bulk transfers on this machine: {why}"
        )),
    }
    all
}

/// [`both_stages`], plus the fast path forced where BPF loads but the probe
/// failed: for exchanges small enough that socket buffers never fill (what
/// this kernel's sockmap does keep).
fn every_path() -> Vec<Run> {
    let mut all = both_stages();
    match (sockmap::kernel(), sockmap::verdict()) {
        (Ok(_), Err(_)) => all.push(Run {
            options: Options {
                fast_path: FastPath::Sockmap,
                ..NORMAL
            },
            force: true,
        }),
        (Err(why), _) => loud(&format!(
            "WARNING: fast_path: sockmap NOT TESTED on this machine: {why}"
        )),
        (Ok(_), Ok(_)) => {}
    }
    all
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
    for run in both_stages() {
        let (client_end, backend_end, relay, _) = tcp_relay(run).await;
        let (cr, cw) = client_end.into_split();
        let (br, bw) = backend_end.into_split();
        let (to_client, to_backend) = (pattern(1, LEN), pattern(2, LEN));
        let (want_c, want_b) = (
            Sha256::digest(&to_client).to_vec(),
            Sha256::digest(&to_backend).to_vec(),
        );
        let at_backend = tokio::spawn(send_and_hash(bw, br, to_client));
        let (n, got) = send_and_hash(cw, cr, to_backend).await;
        assert_eq!((n, got), (LEN, want_c), "backend to client, {run:?}");
        let (n, got) = at_backend.await.unwrap();
        assert_eq!((n, got), (LEN, want_b), "client to backend, {run:?}");
        let (end, totals, (up, down), spliced) = relay.await.unwrap();
        if run.fast_path == FastPath::Sockmap {
            assert_eq!(spliced, 0, "the kernel moved the bytes");
        } else if run.splice {
            assert!(
                spliced > LEN as u64,
                "bulk bytes went through pipes: {spliced}"
            );
        } else {
            assert_eq!(spliced, 0, "no pipe with splicing off");
        }
        assert!(matches!(end, End::Done), "{end:?}");
        assert_eq!(
            (totals.to_backend, totals.to_client),
            (LEN as u64, LEN as u64)
        );
        assert_eq!((up, down), (LEN as u64, LEN as u64), "every byte counted");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_relay_passes_half_close_on() {
    for run in both_stages() {
        let (mut client_end, mut backend_end, relay, _) = tcp_relay(run).await;
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
    for run in every_path() {
        let (mut client_end, mut backend_end, relay, _) = tcp_relay(run).await;
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
    for mut run in every_path() {
        run.idle_timeout = Some(Duration::from_secs(30));
        run.unused_window = Duration::ZERO;
        let (_client_end, _backend_end, relay, _) = tcp_relay(run).await;
        let started = Instant::now();
        let (end, ..) = relay.await.unwrap();
        assert!(matches!(end, End::IdleTimeout), "{end:?}");
        let idle = started.elapsed();
        assert!(
            idle >= Duration::from_secs(30) && idle <= Duration::from_millis(33_750),
            "{idle:?} {run:?}"
        );
    }
}

/// Traffic keeps a fast-path connection alive past its idle timeout: the
/// kernel's byte counters are the activity user space sees.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_relay_traffic_in_the_kernel_resets_the_idle_timer() {
    for mut run in every_path() {
        run.idle_timeout = Some(Duration::from_millis(400));
        let (mut client_end, mut backend_end, relay, counters) = tcp_relay(run).await;
        entered(run, &counters).await;
        let started = std::time::Instant::now();
        while started.elapsed() < Duration::from_millis(1200) {
            client_end.write_all(b"x").await.unwrap();
            let mut one = [0u8; 1];
            backend_end.read_exact(&mut one).await.unwrap();
            backend_end.write_all(b"y").await.unwrap();
            client_end.read_exact(&mut one).await.unwrap();
            assert!(!relay.is_finished(), "closed while busy: {run:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let (end, totals, ..) = relay.await.unwrap();
        assert!(matches!(end, End::IdleTimeout), "{end:?}");
        assert!(
            totals.to_backend >= 10 && totals.to_client >= 10,
            "{totals:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_gone_before_the_session_began_is_reported_as_unused() {
    for run in both_stages() {
        let (client_end, backend_end, relay, _) = tcp_relay(run).await;
        drop(backend_end);
        let (end, totals, ..) = relay.await.unwrap();
        assert!(matches!(end, End::Unused(_)), "{end:?}");
        assert_eq!((totals.to_backend, totals.to_client), (0, 0));
        drop(client_end);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_closing_an_idle_session_after_the_unused_window_ends_it() {
    for mut run in every_path() {
        run.unused_window = Duration::from_millis(100);
        let (mut client_end, backend_end, relay, _) = tcp_relay(run).await;
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
    for run in every_path() {
        once_bytes_moved(run).await;
    }
}

async fn once_bytes_moved(run: Run) {
    let (mut client_end, backend_end, relay, counters) = tcp_relay(run).await;
    entered(run, &counters).await;
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

/// Bytes that arrived before the relay began (a client's first request, a
/// backend's banner) go first, in order, on every path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_waiting_before_the_relay_began_arrive_first_and_in_order() {
    for run in every_path() {
        let (mut client_end, mut backend_end, relay, counters) =
            tcp_relay_after(run, b"early request;", b"banner;").await;
        entered(run, &counters).await;
        client_end.write_all(b"later").await.unwrap();
        client_end.shutdown().await.unwrap();
        backend_end.write_all(b"reply").await.unwrap();
        backend_end.shutdown().await.unwrap();
        let mut at_backend = Vec::new();
        backend_end.read_to_end(&mut at_backend).await.unwrap();
        let mut at_client = Vec::new();
        client_end.read_to_end(&mut at_client).await.unwrap();
        assert_eq!(at_backend, b"early request;later", "{run:?}");
        assert_eq!(at_client, b"banner;reply", "{run:?}");
        let (end, totals, ..) = relay.await.unwrap();
        assert!(matches!(end, End::Done), "{end:?}");
        assert_eq!((totals.to_backend, totals.to_client), (19, 12));
    }
}

/// A backend that does not read holds the client back: nothing piles up in
/// sluice (or in the kernel on its behalf) beyond the socket buffers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_that_does_not_read_holds_the_client_back() {
    const LEN: usize = 64 << 20;
    for run in both_stages() {
        let (client_end, backend_end, relay, _) = tcp_relay(run).await;
        let (mut cr, mut cw) = client_end.into_split();
        let data = pattern(7, LEN);
        let want = Sha256::digest(&data).to_vec();
        let writer = tokio::spawn(async move {
            cw.write_all(&data).await.unwrap();
            cw.shutdown().await.unwrap();
        });
        // Socket buffers on loopback hold a few MiB at most, not 64.
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(!writer.is_finished(), "64 MiB went nowhere: {run:?}");
        let (br, bw) = backend_end.into_split();
        let (n, hash) = send_and_hash(bw, br, Vec::new()).await;
        assert_eq!((n, hash), (LEN, want), "{run:?}");
        writer.await.unwrap();
        let mut rest = Vec::new();
        cr.read_to_end(&mut rest).await.unwrap();
        assert!(matches!(relay.await.unwrap().0, End::Done));
    }
}

/// Half-close both ways with a reply small enough for socket buffers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_relay_passes_half_close_on_both_ways() {
    for run in every_path() {
        let (mut client_end, mut backend_end, relay, counters) = tcp_relay(run).await;
        entered(run, &counters).await;
        client_end.write_all(b"request").await.unwrap();
        client_end.shutdown().await.unwrap();
        let mut got = Vec::new();
        backend_end.read_to_end(&mut got).await.unwrap();
        assert_eq!(
            got, b"request",
            "the backend sees the request, then EOF: {run:?}"
        );
        // The client's read half is still open.
        let reply = pattern(4, 16 << 10);
        backend_end.write_all(&reply).await.unwrap();
        backend_end.shutdown().await.unwrap();
        let mut at_client = Vec::new();
        client_end.read_to_end(&mut at_client).await.unwrap();
        assert_eq!(at_client, reply, "{run:?}");
        let (end, totals, (up, down), _) = relay.await.unwrap();
        assert!(matches!(end, End::Done), "{end:?} {run:?}");
        assert_eq!((totals.to_backend, totals.to_client), (7, 16 << 10));
        assert_eq!((up, down), (7, 16 << 10), "every byte counted: {run:?}");
    }
}

/// A backend that closes right after the connect, before a byte moved,
/// leaves the client to another backend, on the fast path too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_gone_right_after_entering_the_fast_path_is_unused() {
    for run in every_path() {
        let (client_end, backend_end, relay, counters) = tcp_relay(run).await;
        entered(run, &counters).await;
        drop(backend_end);
        let (end, totals, ..) = relay.await.unwrap();
        assert!(matches!(end, End::Unused(_)), "{end:?} {run:?}");
        assert_eq!((totals.to_backend, totals.to_client), (0, 0));
        drop(client_end);
    }
}

/// The probe's verdict on this machine, said out loud: either it passed and
/// the kernel objects are there, or it names the check that failed.
#[test]
fn the_fast_path_probe_names_its_verdict() {
    match sockmap::verdict() {
        Ok(_) => assert!(sockmap::kernel().is_ok()),
        Err(why) => {
            loud(&format!(
                "WARNING: fast_path: sockmap is refused on this machine: {why}"
            ));
            assert!(
                ["BPF refused", "no backpressure", "stall", "intact"]
                    .iter()
                    .any(|check| why.contains(check)),
                "{why}"
            );
        }
    }
}

/// A backend that answers and closes at once (a greeting, then EOF in the
/// same wake-up) before the client sent anything: a finished session, not
/// an error, and the client gets the greeting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_that_answers_and_closes_at_once_ends_the_session_cleanly() {
    for splice in [true, false] {
        let (mut client_end, proxy_client) = socket_pair().await;
        let (proxy_backend, mut backend_end) = socket_pair().await;
        // Greeting and FIN are both waiting when the relay first looks.
        backend_end.write_all(b"hello\n").await.unwrap();
        backend_end.shutdown().await.unwrap();
        let as_socket = |s: TcpStream| socket::register(s.into_std().unwrap()).unwrap();
        let (proxy_client, proxy_backend) = (as_socket(proxy_client), as_socket(proxy_backend));
        let relay = tokio::spawn(async move {
            let counters = RelayCounters {
                spliced: counter(),
                normal: counter(),
                sockmap: counter(),
            };
            let (a, b, c, d) = (counter(), counter(), counter(), counter());
            let options = Options { splice, ..NORMAL };
            relay_tcp(
                &proxy_client,
                &proxy_backend,
                options,
                Meter {
                    listener: &a,
                    backend: &b,
                    relay: &counters,
                },
                Meter {
                    listener: &c,
                    backend: &d,
                    relay: &counters,
                },
                std::future::pending(),
            )
            .await
        });
        let mut got = Vec::new();
        client_end.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"hello\n");
        drop((client_end, backend_end));
        let (end, totals) = relay.await.unwrap();
        assert!(matches!(end, End::Done), "{end:?}");
        assert_eq!(totals.first_to_close, Some(Side::Backend));
    }
}
