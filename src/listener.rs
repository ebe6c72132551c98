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

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use log::{debug, error, warn};
use pingora::apps::ServerApp;
use pingora::connectors::TransportConnector;
use pingora::listeners::ListenerConfig;
use pingora::protocols::Stream;
use pingora::protocols::l4::socket::SocketAddr as PingoraAddr;
use pingora::protocols::l4::stream::L4BufferSettings;
use pingora::server::{ListenFds, ShutdownWatch};
use pingora::services::Service as ServiceTrait;
use pingora::services::listening::Service;
use pingora::upstreams::peer::BasicPeer;
use prometheus::IntGauge;

use crate::config::ListenerSettings;
use crate::lifecycle::Readiness;
use crate::metrics::{ConnectErrorKind, ListenerMetrics};
use crate::pool::{BackendState, Pool};
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
    idle_timeout: Option<Duration>,
    metrics: ListenerMetrics,
    connector: TransportConnector,
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
            idle_timeout: settings.idle_timeout,
            metrics,
            connector: TransportConnector::new(None),
            no_backend_log: LogLimiter::new(),
            limit_log: LogLimiter::new(),
        }
    }

    async fn serve(&self, mut client: Stream) {
        let m = &self.metrics;
        m.connections.inc();
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
        let key = if self.pool.needs_client_key() {
            client_ip_key(&client)
        } else {
            Vec::new()
        };
        let started = Instant::now();
        let Some((backend, mut upstream)) = self.connect(&key).await else {
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
        };
        let down = Meter {
            listener: &m.bytes_out,
            backend: &backend.metrics.bytes_out,
        };
        let (end, totals) =
            relay::relay(&mut client, &mut upstream, self.idle_timeout, up, down).await;
        m.duration.observe(started.elapsed().as_secs_f64());
        if log::log_enabled!(log::Level::Debug) {
            let client_text = peer_addr(&client).map_or_else(|| "?".to_string(), |a| a.to_string());
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
    async fn connect(&self, key: &[u8]) -> Option<(Arc<BackendState>, Stream)> {
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

    async fn connect_to(
        &self,
        addr: SocketAddr,
    ) -> Result<Stream, (ConnectErrorKind, Box<pingora::Error>)> {
        let mut peer = peer_for(addr);
        peer.options.connection_timeout = Some(self.pool.connect_timeout);
        // The connector's own timeout also bounds the whole connect.
        self.connector.new_stream(&peer).await.map_err(|e| {
            use pingora::ErrorType::*;
            let kind = match e.etype() {
                ConnectRefused => ConnectErrorKind::Refused,
                ConnectTimedout => ConnectErrorKind::Timeout,
                _ => ConnectErrorKind::Other,
            };
            (kind, e)
        })
    }
}

/// The tail of a rate-limited log line.
fn since_last(skipped: u64) -> String {
    match skipped {
        0 => String::new(),
        n => format!(" ({n} more since the last such line)"),
    }
}

/// The client's address.
fn peer_addr(client: &Stream) -> Option<SocketAddr> {
    match client.get_socket_digest()?.peer_addr()? {
        PingoraAddr::Inet(a) => Some(*a),
        _ => None,
    }
}

/// The bytes of the client's IP, the key for hash-based selection.
fn client_ip_key(client: &Stream) -> Vec<u8> {
    match peer_addr(client).map(|a| a.ip()) {
        Some(std::net::IpAddr::V4(ip)) => ip.octets().to_vec(),
        Some(std::net::IpAddr::V6(ip)) => ip.octets().to_vec(),
        None => Vec::new(),
    }
}

/// A peer for `addr`. (`BasicPeer::new` parses a string and panics on bad
/// input; the constant placeholder here always parses.)
fn peer_for(addr: SocketAddr) -> BasicPeer {
    let mut peer = BasicPeer::new("0.0.0.0:1");
    peer._address = PingoraAddr::Inet(addr);
    peer
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
        self.serve(client).await;
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
