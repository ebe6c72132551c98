//! Serving one client: admission, backend connect with retries, relay.
//!
//! For each client: admit it (or refuse at `max_connections`), pick a backend
//! from the pool, connect within `connect_timeout`, try another candidate on
//! failure up to `connect_attempts`, then relay bytes until both sides are
//! done (see [`crate::relay`]). Failed connects count against the backend
//! (passive health); a connect that fails for lack of local resources does
//! not. Nothing here panics on network input; every refusal is counted and
//! logged without flooding. A TLS listener first hands the client to its
//! [`Front`] (handshake or passthrough peek, and the pool its server name
//! routes to); a TLS pool's connect includes the handshake to the backend.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use log::{debug, error, warn};
use prometheus::IntGauge;
use tokio::sync::watch;

use crate::access_log::{AccessLog, Cause, Record};
use crate::config::ListenerSettings;
use crate::config::edge::{PerSource, ProxyVersion};
use crate::edge::acl::{Acl, Prefixes};
use crate::edge::limits::{self, SourceLimiter, SourceSlot};
use crate::edge::proxy;
use crate::loops;
use crate::metrics::{ConnectErrorKind, ListenerMetrics};
use crate::pool::{Backend, CloseCause, Member, Pool};
use crate::relay::socket::{self, Socket};
use crate::relay::stream::Io;
use crate::relay::{self, End, Meter};
use crate::tls::front::{Front, PoolLookup};
use crate::tls::upstream::{self, Upstream};

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

/// Client connections open through every listener of the process, removed
/// listeners included: what a shutdown waits for.
#[derive(Debug, Default)]
pub struct OpenConnections(AtomicI64);

impl OpenConnections {
    /// How many are open.
    pub fn get(&self) -> i64 {
        self.0.load(Relaxed)
    }

    /// Count a client as open from the moment it is accepted, before its
    /// task first runs, so a drain never sees it missing.
    pub fn admit(self: &Arc<Self>) -> Admitted {
        self.0.fetch_add(1, Relaxed);
        Admitted(Arc::clone(self))
    }
}

/// One accepted client, counted in [`OpenConnections`] until dropped.
pub struct Admitted(Arc<OpenConnections>);

impl Drop for Admitted {
    fn drop(&mut self) {
        self.0.0.fetch_sub(1, Relaxed);
    }
}

/// The edge rules of one listener: who may connect, how much, and who
/// must send a PROXY protocol header.
struct EdgeRules {
    acl: Option<Acl>,
    per_source: Option<PerSource>,
    /// Kept across reloads with the listener.
    limiter: Arc<SourceLimiter>,
    /// Accepted header version (`None`: either) and the trusted proxies.
    proxy: Option<(Option<ProxyVersion>, Prefixes)>,
}

impl EdgeRules {
    fn of(settings: &ListenerSettings, limiter: Arc<SourceLimiter>) -> Option<EdgeRules> {
        let acl = Acl::new(settings.allow.as_deref(), &settings.deny);
        let proxy = settings
            .proxy_protocol
            .as_ref()
            .map(|p| (p.version, Prefixes::new(&p.from)));
        (acl.is_some() || settings.per_source.is_some() || proxy.is_some()).then(|| EdgeRules {
            acl,
            per_source: settings.per_source.clone(),
            limiter,
            proxy,
        })
    }

    fn trusts(&self, ip: IpAddr) -> bool {
        self.proxy.as_ref().is_some_and(|(_, from)| from.covers(ip))
    }
}

/// What the accept loop learned about a client before its task runs.
#[derive(Default)]
pub struct Entry {
    /// The client's address (the socket's peer).
    peer: Option<SocketAddr>,
    /// The address it reached, when its listening socket has only one.
    local: Option<SocketAddr>,
    /// A trusted proxy: its PROXY header comes first.
    needs_header: bool,
    /// The client's place in its address's connection count.
    slot: Option<SourceSlot>,
}

/// How long a trusted proxy has to send its PROXY protocol header.
pub const PROXY_HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves the clients of one listener.
pub struct ListenerApp {
    name: String,
    pool: Arc<Pool>,
    edge: Option<EdgeRules>,
    max_connections: Option<usize>,
    /// Clients being served, kept across reloads (`max_connections` reads it).
    active: Arc<AtomicI64>,
    relay: relay::Options,
    metrics: ListenerMetrics,
    no_backend_log: LogLimiter,
    limit_log: LogLimiter,
    loop_log: LogLimiter,
    edge_log: LogLimiter,
    /// TLS termination or passthrough, with SNI routes.
    tls: Option<Box<Front>>,
    /// The access log and the shutdown cut.
    ends: SessionEnds,
    /// The name as the access log shares it.
    log_name: Arc<str>,
    /// `protocol: http`: the HTTP proxy, and the shutdown that ends
    /// kept-alive connections.
    http: Option<(Arc<crate::http::HttpFront>, pingora::server::ShutdownWatch)>,
}

/// Counts a client in the listener's count and gauge until dropped.
struct Held<'a>(&'a AtomicI64, &'a IntGauge);

impl<'a> Held<'a> {
    /// Count one more; the count including it.
    fn new(count: &'a AtomicI64, gauge: &'a IntGauge) -> (Self, i64) {
        let n = count.fetch_add(1, Relaxed) + 1;
        gauge.inc();
        (Held(count, gauge), n)
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
        self.1.dec();
    }
}

/// The backends tried for one client, and how many tries are left.
struct Attempts {
    left: usize,
    tried: Vec<Arc<Member>>,
    ids: Vec<usize>,
    /// Backends whose failure this client already counted for passive health.
    blamed: Vec<usize>,
    turn: usize,
    /// Connects tried.
    made: u32,
}

impl Attempts {
    fn new(limit: usize) -> Self {
        Attempts {
            left: limit,
            tried: Vec::new(),
            ids: Vec::new(),
            blamed: Vec::new(),
            turn: 0,
            made: 0,
        }
    }

    fn record(&mut self, member: &Arc<Member>) {
        let id = member.backend.id();
        if !self.ids.contains(&id) {
            self.ids.push(id);
            self.tried.push(Arc::clone(member));
        }
    }

    /// Whether this is the first failure of `backend` for this client: a
    /// client retrying one backend counts once for passive health.
    fn first_failure(&mut self, backend: &Arc<Backend>) -> bool {
        let id = backend.id();
        if self.blamed.contains(&id) {
            return false;
        }
        self.blamed.push(id);
        true
    }

    /// With every candidate tried, the tried ones that still serve, in turn.
    fn again(&mut self) -> Option<(Arc<Member>, SocketAddr)> {
        for _ in 0..self.tried.len() {
            let m = &self.tried[self.turn % self.tried.len()];
            self.turn += 1;
            if m.is_serving() {
                if let Some(addr) = m.backend.resolved() {
                    return Some((Arc::clone(m), addr));
                }
            }
        }
        None
    }
}

/// Why no backend connection was made.
enum Refusal {
    /// Every candidate failed, or there was none.
    NoBackend,
    /// The client is sluice itself, too many hops deep.
    Loop,
    /// The source address is not allowed.
    Acl,
    /// The source address has `per_source.max_connections` open.
    SourceLimit,
    /// The source address opens connections faster than `per_source.rate`.
    SourceRate,
    /// A missing, malformed or forged PROXY protocol header.
    ProxyProtocol(String),
    /// This process is out of file descriptors.
    OutOfFds,
}

impl Refusal {
    /// The access log's name for it.
    fn cause(&self) -> Cause {
        match self {
            Refusal::NoBackend => Cause::RefusedNoBackend,
            Refusal::Loop => Cause::RefusedLoop,
            Refusal::Acl => Cause::RefusedAcl,
            Refusal::SourceLimit | Refusal::SourceRate => Cause::RefusedLimit,
            Refusal::ProxyProtocol(_) => Cause::RefusedProxyProtocol,
            Refusal::OutOfFds => Cause::RefusedFdLimit,
        }
    }
}

/// What every session shares at its end: the access log, and the cut
/// that ends it at shutdown.
#[derive(Clone, Default)]
pub struct SessionEnds {
    /// The access log, when configured.
    pub access_log: Option<Arc<AccessLog>>,
    /// Turns true when `shutdown_timeout` runs out.
    pub cut: Option<watch::Receiver<bool>>,
}

/// A session's access-log line, written when dropped (whatever return
/// path ends the session).
struct Logged<'a> {
    log: &'a AccessLog,
    record: Record,
    /// Cleared when the lines are written per request instead (HTTP mode).
    armed: bool,
}

impl Drop for Logged<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.log.log(&self.record);
        }
    }
}

/// Fill in `log`'s record, if there is one.
fn note(log: &mut Option<Logged<'_>>, f: impl FnOnce(&mut Record)) {
    if let Some(l) = log {
        f(&mut l.record);
    }
}

/// A backend connection ready for a session.
struct Connected {
    member: Arc<Member>,
    upstream: Upstream,
    /// Sees the pool close the backend's sessions, from before the connect.
    closing: Option<watch::Receiver<Option<CloseCause>>>,
    /// Registered while it lives when it leads back into sluice.
    _into_sluice: Option<loops::Registration>,
    /// How long the connect took.
    took: Duration,
}

/// Write `bytes` whole to a just-connected socket (a PROXY header: its
/// send buffer is empty, so this takes one write). With `more`, the kernel
/// holds them for the write that follows (`MSG_MORE`), so that header and
/// the client's first bytes leave in one segment: on loopback a segment of
/// its own cost ~11 µs of CPU per connection (measured with churn). Only
/// when more is sure to follow at once: a TLS pool's ClientHello, or the
/// client's bytes that already wait.
async fn write_all(socket: &Socket, mut bytes: &[u8], more: bool) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let flags = if more {
        nix::sys::socket::MsgFlags::from_bits_retain(nix::libc::MSG_MORE)
    } else {
        nix::sys::socket::MsgFlags::empty()
    };
    while !bytes.is_empty() {
        let mut guard = socket.writable().await?;
        match guard.try_io(|s| {
            nix::sys::socket::send(s.get_ref().as_raw_fd(), bytes, flags).map_err(io::Error::from)
        }) {
            Ok(Ok(0)) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(Ok(n)) => bytes = &bytes[n..],
            Ok(Err(e)) => return Err(e),
            Err(_would_block) => {}
        }
    }
    Ok(())
}

/// The longest time after a connect in which a backend closing a session
/// the client has not used yet moves the client to another backend.
pub const UNUSED_WINDOW_MAX: Duration = Duration::from_millis(500);

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

impl ListenerApp {
    /// Serve the listener `settings` from `pool`. `active` counts its
    /// clients and outlives reloads.
    pub fn new(
        settings: &ListenerSettings,
        pool: Arc<Pool>,
        metrics: ListenerMetrics,
        active: Arc<AtomicI64>,
        limiter: Arc<SourceLimiter>,
    ) -> Self {
        let connect_timeout = pool.generation().settings.connect_timeout;
        if settings.fast_path == crate::config::FastPath::Sockmap {
            relay::sockmap::prepare();
        }
        ListenerApp {
            name: settings.name.clone(),
            pool,
            edge: EdgeRules::of(settings, limiter),
            max_connections: settings.max_connections,
            active,
            relay: relay::Options {
                idle_timeout: settings.idle_timeout,
                splice: settings.splice,
                unused_window: connect_timeout.min(UNUSED_WINDOW_MAX),
                fast_path: settings.fast_path,
            },
            metrics,
            no_backend_log: LogLimiter::new(),
            limit_log: LogLimiter::new(),
            loop_log: LogLimiter::new(),
            edge_log: LogLimiter::new(),
            tls: None,
            ends: SessionEnds::default(),
            log_name: Arc::from(settings.name.as_str()),
            http: None,
        }
    }

    /// Serve HTTP (`protocol: http`) with `front`; `shutdown` ends
    /// kept-alive client connections. A TLS listener's handshake offers
    /// HTTP/2 and HTTP/1.1 unless its `alpn` says otherwise.
    pub fn with_http(
        mut self,
        front: Arc<crate::http::HttpFront>,
        shutdown: pingora::server::ShutdownWatch,
    ) -> Self {
        self.tls = self.tls.map(|t| Box::new(t.for_http()));
        self.http = Some((front, shutdown));
        self
    }

    /// End sessions as `ends` says (access log, shutdown cut).
    pub fn with_ends(mut self, ends: SessionEnds) -> Self {
        self.ends = ends;
        self
    }

    fn logged(&self) -> Option<Logged<'_>> {
        self.ends.access_log.as_deref().map(|log| Logged {
            log,
            record: Record::new(Arc::clone(&self.log_name)),
            armed: true,
        })
    }

    /// Serve TLS as `settings.tls` says, finding route pools with `pools`.
    pub fn with_tls(mut self, settings: &ListenerSettings, pools: Option<&PoolLookup>) -> Self {
        self.tls = settings
            .tls
            .as_ref()
            .map(|tls| Box::new(Front::new(&self.name, tls, &self.metrics, pools)));
        self
    }

    /// The listener's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The pool it forwards to.
    pub fn pool(&self) -> Arc<Pool> {
        Arc::clone(&self.pool)
    }

    /// Count a client accepted and closed for lack of file descriptors.
    pub fn count_fd_refusal(&self) {
        self.metrics.connections.inc();
        self.metrics.rejected_fd_limit.inc();
    }

    /// Screen a client the moment it is accepted, before its task exists:
    /// the source rules, unless it is a trusted proxy whose header must be
    /// read first. `None`: refused, counted, and closed when dropped.
    pub fn screen(
        &self,
        client: &Socket,
        peer: Option<SocketAddr>,
        local: Option<SocketAddr>,
    ) -> Option<Entry> {
        let Some(edge) = &self.edge else {
            return Some(Entry {
                peer,
                local,
                ..Entry::default()
            });
        };
        let Some(peer) = peer.or_else(|| client.get_ref().peer_addr().ok()) else {
            // Gone already (reset before it was looked at).
            self.metrics.connections.inc();
            return None;
        };
        if edge.trusts(peer.ip()) {
            return Some(Entry {
                peer: Some(peer),
                local,
                needs_header: true,
                slot: None,
            });
        }
        let refusal = if edge.proxy.is_some() && proxy::peek_for_header(client) {
            // Anyone else's header would forge a client address.
            Err(Refusal::ProxyProtocol(format!(
                "{peer} sent a PROXY protocol header but is not a trusted proxy"
            )))
        } else {
            self.admit_source(edge, peer)
        };
        match refusal {
            Ok(slot) => Some(Entry {
                peer: Some(peer),
                local,
                needs_header: false,
                slot,
            }),
            Err(refusal) => {
                self.metrics.connections.inc();
                let mut log = self.logged();
                note(&mut log, |r| {
                    r.client = Some(peer);
                    r.cause = refusal.cause();
                });
                self.refuse(refusal, &self.pool);
                None
            }
        }
    }

    /// The source rules for a client from `addr`.
    fn admit_source(
        &self,
        edge: &EdgeRules,
        addr: SocketAddr,
    ) -> Result<Option<SourceSlot>, Refusal> {
        if edge.acl.as_ref().is_some_and(|acl| !acl.admits(addr.ip())) {
            return Err(Refusal::Acl);
        }
        match &edge.per_source {
            Some(rules) => edge
                .limiter
                .admit(addr.ip(), rules, Instant::now())
                .map_err(|r| match r {
                    limits::Refused::Limit => Refusal::SourceLimit,
                    limits::Refused::Rate => Refusal::SourceRate,
                }),
            None => Ok(None),
        }
    }

    /// Serve a client the listener just accepted and [`screen`](Self::screen)ed.
    pub async fn serve_accepted(
        self: Arc<Self>,
        client: Socket,
        entry: Entry,
        _admitted: Admitted,
    ) {
        self.metrics.connections.inc();
        self.serve(client, entry).await;
    }

    /// Admit a client, connect it to a backend and relay until it is done.
    async fn serve(&self, client: Socket, entry: Entry) {
        let m = &self.metrics;
        let mut log = self.logged();
        // A trusted proxy's header first: it says who the client is.
        let Entry {
            peer,
            local,
            needs_header,
            slot,
        } = entry;
        let mut origin = peer.map(|p| (p, None));
        let mut _slot = slot;
        if needs_header {
            let header = tokio::time::timeout(
                PROXY_HEADER_TIMEOUT,
                proxy::read(
                    &client,
                    self.edge
                        .as_ref()
                        .and_then(|e| e.proxy.as_ref())
                        .and_then(|p| p.0),
                ),
            )
            .await;
            let found = match header {
                Ok(Ok(received)) => received.addresses,
                Ok(Err(e)) => {
                    let from = peer.map_or_else(|| "?".to_string(), |p| p.to_string());
                    note(&mut log, |r| {
                        r.client = peer;
                        r.cause = Cause::RefusedProxyProtocol;
                    });
                    self.refuse(
                        Refusal::ProxyProtocol(format!("from {from}: {e}")),
                        &self.pool,
                    );
                    return;
                }
                Err(_) => {
                    let from = peer.map_or_else(|| "?".to_string(), |p| p.to_string());
                    note(&mut log, |r| {
                        r.client = peer;
                        r.cause = Cause::RefusedProxyProtocol;
                    });
                    self.refuse(
                        Refusal::ProxyProtocol(format!(
                            "from {from}: no complete PROXY protocol header within {}",
                            humantime::format_duration(PROXY_HEADER_TIMEOUT)
                        )),
                        &self.pool,
                    );
                    return;
                }
            };
            // LOCAL (the proxy's own health check): the connection's addresses stand.
            if let Some((from, to)) = found {
                origin = Some((from, Some(to)));
            }
            let client_addr = origin.map(|(a, _)| a);
            if let (Some(edge), Some(addr)) = (&self.edge, client_addr) {
                match self.admit_source(edge, addr) {
                    Ok(slot) => _slot = slot,
                    Err(refusal) => {
                        note(&mut log, |r| {
                            r.client = Some(addr);
                            r.cause = refusal.cause();
                        });
                        self.refuse(refusal, &self.pool);
                        return;
                    }
                }
            }
        }
        let (_held, open) = Held::new(&self.active, &m.active);
        if let Some(max) = self.max_connections {
            if open > max as i64 {
                note(&mut log, |r| {
                    r.client = origin.map(|(a, _)| a).or(peer);
                    r.cause = Cause::RefusedMaxConnections;
                });
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
        // A client that is sluice itself, many hops deep: a proxy loop.
        let hops = loops::hops_of(|| {
            let c = client.get_ref();
            peer.or_else(|| c.peer_addr().ok())
                .zip(local.or_else(|| c.local_addr().ok()))
        });
        if hops >= loops::MAX_HOPS {
            note(&mut log, |r| r.cause = Cause::RefusedLoop);
            self.refuse(Refusal::Loop, &self.pool);
            return;
        }
        if let Some((front, shutdown)) = &self.http {
            let client_addr = origin
                .map(|(a, _)| a)
                .or(peer)
                .or_else(|| client.get_ref().peer_addr().ok());
            let local = origin
                .and_then(|(_, to)| to)
                .or(local)
                .or_else(|| client.get_ref().local_addr().ok());
            let started = Instant::now();
            let tcp = match tokio::net::TcpStream::from_std(client.into_inner()) {
                Ok(tcp) => tcp,
                Err(e) => {
                    debug!("listener {}: client lost before serving: {e}", self.name);
                    return;
                }
            };
            let transport = match &self.tls {
                None => crate::http::io::Transport::Plain(tcp),
                Some(tls) => match Box::pin(tls.terminate_owned(tcp)).await {
                    Some(stream) => crate::http::io::Transport::Tls(stream),
                    None => {
                        note(&mut log, |r| {
                            r.client = client_addr;
                            r.cause = Cause::RefusedTls;
                        });
                        return;
                    }
                },
            };
            // One access-log line per request from here on.
            if let Some(l) = &mut log {
                l.armed = false;
            }
            Box::pin(front.serve(
                transport,
                client_addr,
                local,
                shutdown,
                self.ends.cut.clone(),
            ))
            .await;
            m.duration.observe(started.elapsed().as_secs_f64());
            return;
        }
        // TLS listeners: the handshake (or passthrough's peek), and the
        // pool the client's server name routes to.
        // Boxed: plain clients must not carry its state.
        let (mut tls, pool) = match &self.tls {
            None => (None, Arc::clone(&self.pool)),
            Some(front) => match Box::pin(front.accept(&client, &self.pool)).await {
                Some(accepted) => accepted,
                None => {
                    note(&mut log, |r| {
                        r.client = origin.map(|(a, _)| a).or(peer);
                        r.cause = Cause::RefusedTls;
                    });
                    return;
                }
            },
        };
        let generation = pool.generation();
        let needs_key = generation.needs_client_key();
        let sends_proxy = generation.settings.proxy_protocol;
        // The client's own address, and the one it connected to, when the
        // header or the socket tells and something needs them.
        let client_addr = match origin {
            Some((addr, _)) => Some(addr),
            None => (needs_key
                || sends_proxy.is_some()
                || log.is_some()
                || log::log_enabled!(log::Level::Debug))
            .then(|| peer.or_else(|| client.get_ref().peer_addr().ok()))
            .flatten(),
        };
        note(&mut log, |r| {
            r.client = client_addr;
            r.pool = Some(Arc::from(pool.name.as_str()));
        });
        let proxy_header = match (sends_proxy, client_addr) {
            (Some(version), Some(from)) => {
                let to = origin
                    .and_then(|(_, to)| to)
                    .or(local)
                    .or_else(|| client.get_ref().local_addr().ok());
                to.map(|to| proxy::header(version, from, to))
            }
            _ => None,
        };
        let key = match client_addr.filter(|_| needs_key) {
            Some(a) => ip_key(a),
            None => Vec::new(),
        };
        // A PROXY header may wait for the client's first bytes and leave
        // with them, but not behind TLS, where what waits may be part of a
        // record that is not relayed at once.
        let plain_client = tls.is_none().then_some(&client);
        let started = Instant::now();
        let mut attempts = Attempts::new(generation.settings.connect_attempts as usize);
        drop(generation);
        loop {
            // Boxed: the connect state is short-lived and must not size the
            // future every idle connection keeps.
            let connected = match Box::pin(self.connect(
                &pool,
                &key,
                &mut attempts,
                hops,
                proxy_header.as_deref(),
                plain_client,
            ))
            .await
            {
                Ok(connected) => connected,
                Err(refusal) => {
                    let cause = match refusal {
                        // Candidates were tried and failed.
                        Refusal::NoBackend if attempts.made > 0 => Cause::ConnectFailed,
                        ref other => other.cause(),
                    };
                    note(&mut log, |r| {
                        r.cause = cause;
                        r.attempts = attempts.made;
                    });
                    self.refuse(refusal, &pool);
                    return;
                }
            };
            let Connected {
                member,
                mut upstream,
                closing,
                _into_sluice,
                took,
            } = connected;
            note(&mut log, |r| {
                r.backend = Some(Arc::clone(&member.backend.key));
                r.connect = Some(took);
                r.attempts = attempts.made;
            });
            let backend = &member.backend;
            let _open = backend.open_connection();
            let up = Meter {
                listener: &m.bytes_in,
                backend: &backend.metrics.bytes_in,
                relay: &m.relay,
            };
            let down = Meter {
                listener: &m.bytes_out,
                backend: &backend.metrics.bytes_out,
                relay: &m.relay,
            };
            let mut cut = self.ends.cut.clone();
            let abort = async move {
                let closed = async {
                    match closing {
                        // A close since the subscription counts too.
                        Some(mut closing) => {
                            let _ = closing.changed().await;
                        }
                        None => std::future::pending().await,
                    }
                };
                let shutdown = async {
                    match &mut cut {
                        Some(cut) => {
                            let _ = cut.wait_for(|c| *c).await;
                        }
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    _ = closed => {}
                    _ = shutdown => {}
                }
            };
            let (end, totals) = match (&mut tls, &mut upstream) {
                (None, Upstream::Plain(u)) => {
                    relay::relay_tcp(&client, u, self.relay, up, down, abort).await
                }
                // TLS on either side. Boxed: plain sessions must not carry its state.
                (tls, u) => {
                    let mut c = match tls {
                        Some(t) => Io::Stream(&mut **t),
                        None => Io::Tcp(&client),
                    };
                    let mut u = u.io();
                    Box::pin(relay::stream::relay(
                        &mut c, &mut u, self.relay, up, down, abort,
                    ))
                    .await
                }
            };
            if let End::Unused(e) = &end {
                // The backend closed right after the connect, before the
                // client sent a byte: the client never noticed, so another
                // backend may take it. It was counted as a connection; the
                // failure counts once per client for passive health.
                if attempts.first_failure(backend) {
                    pool.observe_connect(backend, false, e);
                }
                debug!(
                    "listener {}: {} closed the connection before the session began ({e}); trying another",
                    self.name, backend.address
                );
                continue;
            }
            m.duration.observe(started.elapsed().as_secs_f64());
            if log.is_some() {
                let cause = match &end {
                    End::Done => match totals.first_to_close {
                        Some(relay::Side::Backend) => Cause::BackendClosed,
                        _ => Cause::ClientClosed,
                    },
                    End::IdleTimeout => Cause::IdleTimeout,
                    End::Aborted if self.ends.cut.as_ref().is_some_and(|c| *c.borrow()) => {
                        Cause::ClosedShutdown
                    }
                    End::Aborted => match backend.last_close_cause() {
                        Some(CloseCause::Maintenance) => Cause::ClosedAdmin,
                        _ => Cause::ClosedFailover,
                    },
                    End::Error(relay::Side::Client, _) => Cause::ClientError,
                    End::Error(relay::Side::Backend, _) | End::Unused(_) => Cause::BackendError,
                };
                note(&mut log, |r| {
                    r.cause = cause;
                    r.bytes_in = totals.to_backend;
                    r.bytes_out = totals.to_client;
                });
            }
            if log::log_enabled!(log::Level::Debug) {
                let client_text = client_addr.map_or_else(|| "?".to_string(), |a| a.to_string());
                let how = match end {
                    End::Done => "closed".to_string(),
                    End::IdleTimeout => "idle timeout".to_string(),
                    End::Aborted => "closed by the pool's session policy".to_string(),
                    End::Unused(e) | End::Error(relay::Side::Backend, e) => {
                        format!("backend error: {e}")
                    }
                    End::Error(relay::Side::Client, e) => format!("client error: {e}"),
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
            return;
        }
    }

    fn refuse(&self, refusal: Refusal, pool: &Pool) {
        match refusal {
            Refusal::NoBackend => {
                self.metrics.rejected_no_backend.inc();
                if let Some(skipped) = self.no_backend_log.allow() {
                    warn!(
                        "listener {}: no backend of pool {} accepted the connection; client refused{}",
                        self.name,
                        pool.name,
                        since_last(skipped)
                    );
                }
            }
            Refusal::Acl => {
                self.metrics.rejected_acl.inc();
                debug!("listener {}: client refused by the source rules", self.name);
            }
            Refusal::SourceLimit | Refusal::SourceRate => {
                let (counter, what) = if matches!(refusal, Refusal::SourceLimit) {
                    (
                        &self.metrics.rejected_source_limit,
                        "per_source.max_connections",
                    )
                } else {
                    (&self.metrics.rejected_source_rate, "per_source.rate")
                };
                counter.inc();
                if let Some(skipped) = self.edge_log.allow() {
                    warn!(
                        "listener {}: a client address is over its {what}; refusing it{}",
                        self.name,
                        since_last(skipped)
                    );
                }
            }
            Refusal::ProxyProtocol(why) => {
                self.metrics.rejected_proxy_protocol.inc();
                if let Some(skipped) = self.edge_log.allow() {
                    warn!(
                        "listener {}: client refused: {why}{}",
                        self.name,
                        since_last(skipped)
                    );
                }
            }
            Refusal::Loop => {
                self.metrics.rejected_loop.inc();
                if let Some(skipped) = self.loop_log.allow() {
                    error!(
                        "listener {}: a client came through sluice itself {} times: pool {} leads back to sluice (a proxy loop); refused{}",
                        self.name,
                        loops::MAX_HOPS,
                        pool.name,
                        since_last(skipped)
                    );
                }
            }
            Refusal::OutOfFds => {
                self.metrics.rejected_fd_limit.inc();
                if let Some(skipped) = self.no_backend_log.allow() {
                    warn!(
                        "listener {}: out of file descriptors; cannot connect to a backend, client refused{}",
                        self.name,
                        since_last(skipped)
                    );
                }
            }
        }
    }

    /// Connect to a backend, trying candidates while `attempts` last.
    async fn connect(
        &self,
        pool: &Pool,
        key: &[u8],
        attempts: &mut Attempts,
        hops: u8,
        preamble: Option<&[u8]>,
        plain_client: Option<&Socket>,
    ) -> Result<Connected, Refusal> {
        let generation = pool.generation();
        let timeout = generation.settings.connect_timeout;
        let tls = upstream::Dial::of(&generation.settings);
        drop(generation);
        while attempts.left > 0 {
            attempts.left -= 1;
            // Prefer a backend not tried yet; with none left, retry the tried ones in turn.
            let pick = pool.pick(key, &attempts.ids).or_else(|| attempts.again());
            let Some((member, addr)) = pick else { break };
            attempts.record(&member);
            attempts.made += 1;
            let backend = Arc::clone(&member.backend);
            let backend = &backend;
            // Before connecting: a close decided while the connect runs must
            // still reach this session. Every session watches: an operator
            // may put any backend in maintenance.
            let closing = Some(backend.watch_closing());
            let _opening = backend.open_connection();
            let started = Instant::now();
            // Into one of sluice's own ports: follow the hops.
            let into_sluice = loops::is_listen_port(addr.port());
            let mut registration = None;
            let connected = match socket::Outgoing::new(addr, into_sluice) {
                Ok(outgoing) => {
                    registration = outgoing
                        .local_port()
                        .filter(|_| into_sluice)
                        .map(|port| loops::register(port, hops.saturating_add(1)));
                    Self::connect_to(outgoing, addr, timeout).await
                }
                Err(e) => Err((ConnectErrorKind::Other, e)),
            };
            // The PROXY protocol header goes first, on the TCP connection,
            // before any client byte and before a TLS handshake.
            let connected = match (connected, preamble) {
                (Ok(socket), Some(bytes)) => {
                    // A TLS pool's ClientHello follows at once; else the
                    // client's first bytes may already wait (client-speaks-
                    // first protocols, checked now that the connect took its
                    // round trip): the header leaves with them.
                    let more = tls.is_some()
                        || plain_client
                            .is_some_and(|c| c.get_ref().peek(&mut [0u8; 1]).is_ok_and(|n| n > 0));
                    match write_all(&socket, bytes, more).await {
                        Ok(()) => Ok(socket),
                        Err(e) => Err((ConnectErrorKind::Other, e)),
                    }
                }
                (other, _) => other,
            };
            // A TLS pool: the connect includes the handshake.
            let connected = match connected {
                Ok(socket) => upstream::establish(socket, tls.as_ref(), &backend.address, timeout)
                    .await
                    .map_err(|e| (ConnectErrorKind::Tls, e)),
                Err(e) => Err(e),
            };
            match connected {
                Ok(upstream) => {
                    let took = started.elapsed();
                    backend.metrics.connect_duration.observe(took.as_secs_f64());
                    backend.metrics.connections.inc();
                    pool.observe_connect(backend, true, &"");
                    return Ok(Connected {
                        member,
                        upstream,
                        closing,
                        _into_sluice: registration,
                        took,
                    });
                }
                Err((_, e)) if crate::sys::is_local_exhaustion(&e) => {
                    // Says nothing about the backend, and every other would fail alike.
                    return Err(Refusal::OutOfFds);
                }
                Err((kind, e)) => {
                    backend.metrics.connect_errors(kind).inc();
                    debug!(
                        "listener {}: connect to {} ({addr}) failed ({}): {e}",
                        self.name,
                        backend.address,
                        kind.as_str()
                    );
                    if attempts.first_failure(backend) {
                        pool.observe_connect(backend, false, &e);
                    }
                }
            }
        }
        Err(Refusal::NoBackend)
    }

    /// One connect to `addr` within `timeout`.
    async fn connect_to(
        outgoing: socket::Outgoing,
        addr: SocketAddr,
        timeout: Duration,
    ) -> Result<Socket, (ConnectErrorKind, io::Error)> {
        match tokio::time::timeout(timeout, outgoing.connect(addr)).await {
            Ok(Ok(socket)) => Ok(socket),
            Ok(Err(e)) => {
                let kind = match e.kind() {
                    io::ErrorKind::ConnectionRefused => ConnectErrorKind::Refused,
                    io::ErrorKind::TimedOut => ConnectErrorKind::Timeout,
                    _ => ConnectErrorKind::Other,
                };
                Err((kind, e))
            }
            Err(_) => Err((
                ConnectErrorKind::Timeout,
                io::Error::new(io::ErrorKind::TimedOut, "connect timed out"),
            )),
        }
    }
}
