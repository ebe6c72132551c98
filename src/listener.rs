//! The L4 service: one pingora `ServerApp` per listener.
//!
//! For each client: admit it (or refuse at `max_connections`), pick a backend
//! from the pool, connect within `connect_timeout`, try another candidate on
//! failure up to `connect_attempts`, then relay bytes until both sides are
//! done (see [`crate::relay`]). Nothing here panics on network input; every
//! refusal is counted and logged without flooding.
//!
//! [`ListenerService`] wraps pingora's listening service to learn when the
//! sockets are bound (for `/readyz`) and to stop the process when binding
//! fails, which pingora would otherwise only log from a dead task.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use log::{debug, error, warn};
use pingora::apps::ServerApp;
use pingora::listeners::ListenerConfig;
use pingora::protocols::Stream;
use pingora::protocols::l4::socket::SocketAddr as PingoraAddr;
use pingora::protocols::l4::stream::L4BufferSettings;
use pingora::server::{ListenFds, ShutdownWatch};
use pingora::services::Service as ServiceTrait;
use pingora::services::listening::Service;
use prometheus::IntGauge;
use tokio::net::TcpStream;

use crate::config::ListenerSettings;
use crate::lifecycle::Readiness;
use crate::metrics::{ConnectErrorKind, ListenerMetrics};
use crate::pool::{BackendState, Pool};
use crate::relay::socket::{self, Socket};
use crate::relay::{self, End, Meter};

/// Logs a repeated event at most once per interval, with a count of the rest.
pub struct LogLimiter {
    start: Instant,
    next_ms: AtomicU64,
    suppressed: AtomicU64,
}

/// The shortest gap between two lines from one [`LogLimiter`].
const LOG_INTERVAL: Duration = Duration::from_secs(1);

impl LogLimiter {
    /// A limiter that allows one line now.
    pub fn new() -> Self {
        LogLimiter {
            start: Instant::now(),
            next_ms: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// `Some(n)` when a line may be written now, `n` lines having been skipped since the last.
    pub fn allow(&self) -> Option<u64> {
        let now = self.start.elapsed().as_millis() as u64;
        let next = self.next_ms.load(Relaxed);
        if now >= next
            && self
                .next_ms
                .compare_exchange(
                    next,
                    now + LOG_INTERVAL.as_millis() as u64,
                    Relaxed,
                    Relaxed,
                )
                .is_ok()
        {
            return Some(self.suppressed.swap(0, Relaxed));
        }
        self.suppressed.fetch_add(1, Relaxed);
        None
    }
}

impl Default for LogLimiter {
    fn default() -> Self {
        Self::new()
    }
}

/// Serves the clients of one listener.
pub struct ListenerApp {
    name: String,
    pool: Arc<Pool>,
    max_connections: Option<usize>,
    relay: relay::Options,
    metrics: ListenerMetrics,
    no_backend_log: LogLimiter,
    limit_log: LogLimiter,
}

/// Decrements a gauge when dropped.
struct Held<'a>(&'a IntGauge);

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl ListenerApp {
    /// Serve the listener `settings` from `pool`.
    pub fn new(settings: &ListenerSettings, pool: Arc<Pool>, metrics: ListenerMetrics) -> Self {
        ListenerApp {
            name: settings.name.clone(),
            pool,
            max_connections: settings.max_connections,
            relay: relay::Options {
                idle_timeout: settings.idle_timeout,
                splice: settings.splice,
            },
            metrics,
            no_backend_log: LogLimiter::new(),
            limit_log: LogLimiter::new(),
        }
    }

    /// Admit a client, connect it to a backend and relay until it is done.
    async fn serve(&self, client: Client) {
        let m = &self.metrics;
        m.active.inc();
        let _held = Held(&m.active);
        if let Some(max) = self.max_connections {
            if m.active.get() > max as i64 {
                m.rejected_max_connections.inc();
                if let Some(skipped) = self.limit_log.allow() {
                    warn!(
                        "listener {}: max_connections ({max}) reached; refusing clients{}",
                        self.name,
                        since_last(skipped)
                    );
                }
                return;
            }
        }
        let client_addr = (self.pool.needs_client_key() || log::log_enabled!(log::Level::Debug))
            .then(|| client.peer_addr())
            .flatten();
        let key = match client_addr.filter(|_| self.pool.needs_client_key()) {
            Some(a) => ip_key(a),
            None => Vec::new(),
        };
        let started = Instant::now();
        // Boxed: the connect state is short-lived and must not size the
        // future every idle connection keeps.
        let Some((backend, upstream)) = Box::pin(self.connect(&key)).await else {
            m.rejected_no_backend.inc();
            if let Some(skipped) = self.no_backend_log.allow() {
                warn!(
                    "listener {}: no backend of pool {} accepted the connection; client refused{}",
                    self.name,
                    self.pool.name,
                    since_last(skipped)
                );
            }
            return;
        };
        let _backend_held = Held(&backend.metrics.connections_active);
        let up = Meter {
            listener: &m.bytes_in,
            backend: &backend.metrics.bytes_in,
            spliced: &m.spliced,
        };
        let down = Meter {
            listener: &m.bytes_out,
            backend: &backend.metrics.bytes_out,
            spliced: &m.spliced,
        };
        let (end, totals) = match client {
            Client::Tcp(tcp) => relay::relay_tcp(tcp, upstream, self.relay, up, down).await,
            Client::Other(mut stream) => {
                // This engine wants tokio's stream type; re-register the socket as one.
                let mut upstream = match TcpStream::from_std(upstream.into_inner()) {
                    Ok(u) => u,
                    Err(e) => {
                        debug!(
                            "listener {}: cannot register a backend socket: {e}",
                            self.name
                        );
                        return;
                    }
                };
                relay::relay_io(
                    &mut stream,
                    &mut upstream,
                    self.relay.idle_timeout,
                    up,
                    down,
                )
                .await
            }
        };
        m.duration.observe(started.elapsed().as_secs_f64());
        if log::log_enabled!(log::Level::Debug) {
            let client_text = client_addr.map_or_else(|| "?".to_string(), |a| a.to_string());
            let how = match end {
                End::Done => "closed".to_string(),
                End::IdleTimeout => "idle timeout".to_string(),
                End::Error(side, e) => format!("{side:?} side error: {e}"),
            };
            debug!(
                "listener {}: {client_text} -> {}: {how} after {:?}, {} bytes in, {} out",
                self.name,
                backend.address,
                started.elapsed(),
                totals.to_backend,
                totals.to_client
            );
        }
    }

    /// Connect to a backend, trying up to `connect_attempts` candidates.
    async fn connect(&self, key: &[u8]) -> Option<(Arc<BackendState>, Socket)> {
        let pool = &self.pool;
        let mut tried: Vec<usize> = Vec::with_capacity(pool.connect_attempts as usize);
        for attempt in 0..pool.connect_attempts as usize {
            // Prefer a backend not tried yet; with none left, retry the tried ones in turn.
            let pick = pool.pick(key, &tried).or_else(|| {
                let again = *tried.get(attempt % tried.len().max(1))?;
                let b = &pool.backends[again];
                b.is_serving()
                    .then(|| b.resolved().map(|a| (Arc::clone(b), a)))
                    .flatten()
            });
            let Some((backend, addr)) = pick else { break };
            if !tried.contains(&backend.index) {
                tried.push(backend.index);
            }
            backend.metrics.connections_active.inc();
            let started = Instant::now();
            match self.connect_to(addr).await {
                Ok(stream) => {
                    backend
                        .metrics
                        .connect_duration
                        .observe(started.elapsed().as_secs_f64());
                    backend.metrics.connections.inc();
                    return Some((backend, stream));
                }
                Err((kind, e)) => {
                    backend.metrics.connections_active.dec();
                    backend.metrics.connect_errors(kind).inc();
                    debug!(
                        "listener {}: connect to {} ({addr}) failed ({}): {e}",
                        self.name,
                        backend.address,
                        kind.as_str()
                    );
                }
            }
        }
        None
    }

    /// One connect to `addr` within the pool's `connect_timeout`.
    async fn connect_to(&self, addr: SocketAddr) -> Result<Socket, (ConnectErrorKind, io::Error)> {
        match tokio::time::timeout(self.pool.connect_timeout, socket::connect(addr)).await {
            Ok(Ok(socket)) => Ok(socket),
            Ok(Err(e)) => {
                let kind = match e.kind() {
                    io::ErrorKind::ConnectionRefused => ConnectErrorKind::Refused,
                    io::ErrorKind::TimedOut => ConnectErrorKind::Timeout,
                    _ => ConnectErrorKind::Other,
                };
                Err((kind, e))
            }
            Err(_) => Err((ConnectErrorKind::Timeout, io::ErrorKind::TimedOut.into())),
        }
    }
}

/// The tail of a rate-limited log line.
fn since_last(skipped: u64) -> String {
    match skipped {
        0 => String::new(),
        n => format!(" ({n} more since the last such line)"),
    }
}

/// The bytes of a client's IP, the key for hash-based selection.
fn ip_key(addr: SocketAddr) -> Vec<u8> {
    match addr.ip() {
        std::net::IpAddr::V4(ip) => ip.octets().to_vec(),
        std::net::IpAddr::V6(ip) => ip.octets().to_vec(),
    }
}

/// A client stream, ready for the relay.
enum Client {
    /// A plain TCP socket, taken out of pingora's stream.
    Tcp(Socket),
    /// Any other stream, as pingora gave it.
    Other(Stream),
}

impl Client {
    fn peer_addr(&self) -> Option<SocketAddr> {
        match self {
            Client::Tcp(tcp) => tcp.get_ref().peer_addr().ok(),
            Client::Other(stream) => match stream.get_socket_digest()?.peer_addr()? {
                PingoraAddr::Inet(a) => Some(*a),
                _ => None,
            },
        }
    }
}

/// The client as the relay wants it: a registered socket when it is plain
/// TCP, so the relay can wait for readiness without holding a buffer, and
/// splice.
fn into_client(stream: Stream) -> io::Result<Client> {
    match socket::take_from_pingora(stream) {
        Ok(tcp) => socket::register(tcp).map(Client::Tcp),
        Err(other) => Ok(Client::Other(other)),
    }
}

#[async_trait]
impl ServerApp for ListenerApp {
    async fn process_new(
        self: &Arc<Self>,
        client: Stream,
        _shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        // Open connections run to their end after shutdown starts; the drain
        // service bounds how long that may take.
        self.metrics.connections.inc();
        match into_client(client) {
            // A task of its own: pingora's per-connection task, sized for
            // every kind of stream, ends here, and an idle connection keeps
            // only this smaller one.
            Ok(tcp @ Client::Tcp(_)) => {
                let app = Arc::clone(self);
                tokio::spawn(async move { app.serve(tcp).await });
            }
            Ok(other) => self.serve(other).await,
            Err(e) => debug!(
                "listener {}: cannot take over a client socket: {e}",
                self.name
            ),
        }
        None
    }
}

/// pingora's listening service for one listener, plus bind supervision.
pub struct ListenerService {
    name: String,
    addrs: Vec<SocketAddr>,
    inner: Option<Service<ListenerApp>>,
    readiness: Arc<Readiness>,
    threads: usize,
}

impl ListenerService {
    /// A service for `settings` served by `app` on `threads` threads.
    pub fn new(
        settings: &ListenerSettings,
        app: ListenerApp,
        threads: usize,
        readiness: Arc<Readiness>,
    ) -> Self {
        let mut inner = Service::new(settings.name.clone(), app);
        for addr in &settings.bind {
            // Unbuffered: bytes go straight from the socket to the relay.
            inner.add_listener(
                ListenerConfig::tcp(addr.to_string()).l4_buffer(L4BufferSettings::unbuffered()),
            );
        }
        inner.threads = Some(threads);
        ListenerService {
            name: format!("listener {}", settings.name),
            addrs: settings.bind.clone(),
            inner: Some(inner),
            readiness,
            threads,
        }
    }
}

/// How often bind progress is checked while a listener starts.
const BIND_POLL: Duration = Duration::from_millis(10);

#[async_trait]
impl ServiceTrait for ListenerService {
    async fn start_service(
        &mut self,
        fds: Option<ListenFds>,
        shutdown: ShutdownWatch,
        listeners_per_fd: usize,
    ) {
        let Some(mut inner) = self.inner.take() else {
            return;
        };
        let mut task =
            tokio::spawn(async move { inner.start_service(fds, shutdown, listeners_per_fd).await });
        let mut bound = false;
        loop {
            tokio::select! {
                res = &mut task => {
                    if let Err(e) = res {
                        if e.is_panic() {
                            let why = panic_text(e.into_panic());
                            error!("{}: cannot listen on {:?}: {why}", self.name, self.addrs);
                            std::process::exit(1);
                        }
                    }
                    return;
                }
                _ = tokio::time::sleep(BIND_POLL), if !bound => {
                    if self.addrs.iter().all(|a| sockets::is_listening(*a)) {
                        bound = true;
                        self.readiness.listener_bound();
                    }
                }
            }
        }
    }

    fn name(&self) -> &str {
        &self.name
    }

    fn threads(&self) -> Option<usize> {
        Some(self.threads)
    }

    fn listen_addresses(&self) -> Option<Vec<String>> {
        Some(self.addrs.iter().map(ToString::to_string).collect())
    }
}

fn panic_text(payload: Box<dyn std::any::Any + Send>) -> String {
    payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "unknown error".to_string())
}

/// Which TCP addresses this process's network namespace is listening on.
pub mod sockets {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

    /// Whether a socket in LISTEN state is bound to `addr`. Without
    /// `/proc/net`, assume it is.
    pub fn is_listening(addr: SocketAddr) -> bool {
        let file = if addr.is_ipv4() {
            "/proc/self/net/tcp"
        } else {
            "/proc/self/net/tcp6"
        };
        match std::fs::read_to_string(file) {
            Ok(table) => table
                .lines()
                .skip(1)
                .filter_map(parse_listen_line)
                .any(|a| a == addr),
            Err(_) => true,
        }
    }

    /// The local address of a `/proc/net/tcp{,6}` line in LISTEN state.
    fn parse_listen_line(line: &str) -> Option<SocketAddr> {
        let mut fields = line.split_whitespace();
        let local = fields.nth(1)?;
        let state = fields.nth(1)?;
        if state != "0A" {
            return None;
        }
        let (ip_hex, port_hex) = local.split_once(':')?;
        let port = u16::from_str_radix(port_hex, 16).ok()?;
        // The kernel prints each 32-bit word of the address in host byte order.
        let words: Option<Vec<[u8; 4]>> = (0..ip_hex.len() / 8)
            .map(|i| {
                u32::from_str_radix(ip_hex.get(i * 8..i * 8 + 8)?, 16)
                    .ok()
                    .map(u32::to_ne_bytes)
            })
            .collect();
        let bytes: Vec<u8> = words?.concat();
        let ip = match bytes.len() {
            4 => IpAddr::V4(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3])),
            16 => {
                let mut b = [0u8; 16];
                b.copy_from_slice(&bytes);
                IpAddr::V6(Ipv6Addr::from(b))
            }
            _ => return None,
        };
        Some(SocketAddr::new(ip, port))
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn finds_a_listener_it_just_bound() {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            assert!(is_listening(l.local_addr().unwrap()));
            let addr = l.local_addr().unwrap();
            drop(l);
            assert!(!is_listening(addr));
            // IPv6 may be disabled where tests run.
            if let Ok(l6) = std::net::TcpListener::bind("[::1]:0") {
                assert!(is_listening(l6.local_addr().unwrap()));
            }
        }
    }
}
