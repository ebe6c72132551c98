//! One client of a TLS listener, up to the moment it has a pool.
//!
//! Terminating: read the ClientHello (rustls' lazy acceptor), pick the pool
//! by its server name, finish the handshake with the certificate for that
//! name. Passthrough: peek at the ClientHello ([`super::hello`]) and pick
//! the pool; nothing is consumed. Either within `handshake_timeout`. Every
//! outcome is counted in `sluice_tls_handshakes_total{result}`; a client
//! that fails is closed, and nothing of it outlives this call.

use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::{debug, warn};
use rustls::ServerConfig;
use rustls::server::Acceptor;
use tokio_rustls::LazyConfigAcceptor;
use tokio_rustls::server::TlsStream;

use super::hello::{self, HelloError};
use super::names::NameTable;
use super::upstream::BUFFER_LIMIT;
use crate::config::{ListenerTls, TlsMode};
use crate::listener::LogLimiter;
use crate::metrics::{HandshakeResult, ListenerMetrics, TlsMetrics};
use crate::pool::Pool;
use crate::relay::Socket;
use crate::relay::stream::TcpRef;

/// Finds a pool by name (the pools in force).
pub type PoolLookup = Arc<dyn Fn(&str) -> Option<Arc<Pool>> + Send + Sync>;

/// A client's TLS, terminated here, over its socket (which the session keeps).
pub type ClientTls<'a> = TlsStream<TcpRef<'a>>;

enum Mode {
    Terminate(Arc<ServerConfig>),
    Passthrough,
}

/// Where names go.
struct Routes {
    by_name: NameTable<Arc<Pool>>,
    default: Option<Arc<Pool>>,
}

/// The TLS side of one listener.
pub struct Front {
    listener: String,
    mode: Mode,
    timeout: Duration,
    /// `None`: every client goes to the listener's pool.
    routes: Option<Routes>,
    metrics: TlsMetrics,
    log: LogLimiter,
}

/// Why a client was not accepted.
struct Failure {
    result: HandshakeResult,
    why: String,
}

impl Failure {
    fn new(result: HandshakeResult, why: impl Into<String>) -> Self {
        Failure {
            result,
            why: why.into(),
        }
    }
}

impl Front {
    /// The TLS side of listener `listener` as `tls` says; route pools are
    /// found with `pools`.
    pub fn new(
        listener: &str,
        tls: &ListenerTls,
        metrics: &ListenerMetrics,
        pools: Option<&PoolLookup>,
    ) -> Front {
        let mode = match &tls.mode {
            TlsMode::Terminate(server) => Mode::Terminate(Arc::clone(&server.config)),
            TlsMode::Passthrough => Mode::Passthrough,
        };
        let find = |name: &str| {
            let pool = pools.and_then(|p| p(name));
            if pool.is_none() {
                warn!(
                    "listener {listener}: route to pool {name}, which is not running; its names are refused"
                );
            }
            pool
        };
        let routes = (!tls.routes.is_empty()).then(|| {
            let mut by_name = NameTable::default();
            for r in &tls.routes {
                if let Some(pool) = find(&r.pool) {
                    by_name.insert(&r.sni, pool);
                }
            }
            Routes {
                by_name,
                default: tls.default_pool.as_deref().and_then(find),
            }
        });
        Front {
            listener: listener.to_string(),
            mode,
            timeout: tls.handshake_timeout,
            routes,
            metrics: metrics.tls(),
            log: LogLimiter::new(),
        }
    }

    /// The pool for a client that sent `name`.
    fn route(&self, name: Option<&str>, listener_pool: &Arc<Pool>) -> Result<Arc<Pool>, Failure> {
        let Some(routes) = &self.routes else {
            return Ok(Arc::clone(listener_pool));
        };
        name.and_then(|n| routes.by_name.get(n))
            .or(routes.default.as_ref())
            .cloned()
            .ok_or_else(|| {
                Failure::new(
                    HandshakeResult::UnknownSni,
                    match name {
                        Some(n) => format!("no route for server name `{}`", n.escape_default()),
                        None => "no server name sent, and no default_pool".to_string(),
                    },
                )
            })
    }

    /// Handshake with (or peek at) the client on `socket`, and pick its
    /// pool (`listener_pool` without routes): the TLS stream (none for
    /// passthrough, whose bytes stay queued on the socket) and the pool.
    /// `None`: the client failed, was counted, and is to be closed.
    pub async fn accept<'a>(
        &self,
        socket: &'a Socket,
        listener_pool: &Arc<Pool>,
    ) -> Option<(Option<Box<ClientTls<'a>>>, Arc<Pool>)> {
        let started = Instant::now();
        let peer = log::log_enabled!(log::Level::Debug)
            .then(|| socket.get_ref().peer_addr().ok())
            .flatten();
        let work = async {
            match &self.mode {
                Mode::Passthrough => {
                    let name = hello::peek(socket).await.map_err(|e| match e {
                        HelloError::NotTls(_) => {
                            Failure::new(HandshakeResult::NotTls, e.to_string())
                        }
                        HelloError::Closed => Failure::new(HandshakeResult::Closed, e.to_string()),
                        HelloError::Io(e) => Failure::new(HandshakeResult::Closed, e.to_string()),
                    })?;
                    let pool = self.route(name.as_deref(), listener_pool)?;
                    Ok((None, pool))
                }
                Mode::Terminate(config) => {
                    let lazy = LazyConfigAcceptor::new(Acceptor::default(), TcpRef(socket));
                    let start = lazy.await.map_err(|e| classify(&e, true))?;
                    let pool = self.route(start.client_hello().server_name(), listener_pool)?;
                    let stream = start
                        .into_stream_with(Arc::clone(config), |c| {
                            c.set_buffer_limit(Some(BUFFER_LIMIT));
                        })
                        .await
                        .map_err(|e| classify(&e, false))?;
                    Ok((Some(Box::new(stream)), pool))
                }
            }
        };
        let outcome = self.within_timeout(work).await;
        let (client, pool) = self.settle(outcome, started, peer)?;
        if !pool.is_ready() {
            // A pool a reload just added: its first verdict is moments
            // away, and refusing for want of it helps no one.
            let _ = tokio::time::timeout(self.timeout, pool.wait_ready()).await;
        }
        Some((client, pool))
    }

    /// Serve TLS for HTTP mode: without ALPN protocols configured, offer
    /// `h2` and `http/1.1`, so browsers get HTTP/2.
    pub fn for_http(mut self) -> Front {
        if let Mode::Terminate(config) = &self.mode {
            if config.alpn_protocols.is_empty() {
                let mut c = (**config).clone();
                c.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
                self.mode = Mode::Terminate(Arc::new(c));
            }
        }
        self
    }

    /// Terminate the TLS of a client whose socket is handed over whole
    /// (HTTP mode, which owns the connection from here on): the handshake
    /// within `handshake_timeout`, counted as [`accept`](Self::accept)
    /// counts it. `None`: the client failed, was counted, and is closed.
    pub async fn terminate_owned(
        &self,
        tcp: tokio::net::TcpStream,
    ) -> Option<Box<TlsStream<tokio::net::TcpStream>>> {
        let started = Instant::now();
        let peer = log::log_enabled!(log::Level::Debug)
            .then(|| tcp.peer_addr().ok())
            .flatten();
        let Mode::Terminate(config) = &self.mode else {
            // Refused by the configuration check: HTTP mode terminates.
            return None;
        };
        let work = async {
            let lazy = LazyConfigAcceptor::new(Acceptor::default(), tcp);
            let start = lazy.await.map_err(|e| classify(&e, true))?;
            let stream = start
                .into_stream_with(Arc::clone(config), |c| {
                    c.set_buffer_limit(Some(BUFFER_LIMIT));
                })
                .await
                .map_err(|e| classify(&e, false))?;
            Ok((Box::new(stream), ()))
        };
        let outcome = self.within_timeout(work).await;
        self.settle(outcome, started, peer).map(|(s, ())| s)
    }

    async fn within_timeout<T>(
        &self,
        work: impl std::future::Future<Output = Result<T, Failure>>,
    ) -> Result<T, Failure> {
        match tokio::time::timeout(self.timeout, work).await {
            Ok(r) => r,
            Err(_) => Err(Failure::new(
                HandshakeResult::Timeout,
                format!(
                    "no complete handshake within {}",
                    humantime::format_duration(self.timeout)
                ),
            )),
        }
    }

    /// Count and log how a handshake ended.
    fn settle<T>(
        &self,
        outcome: Result<T, Failure>,
        started: Instant,
        peer: Option<std::net::SocketAddr>,
    ) -> Option<T> {
        match outcome {
            Ok(done) => {
                self.metrics.result(HandshakeResult::Ok).inc();
                self.metrics
                    .duration
                    .observe(started.elapsed().as_secs_f64());
                Some(done)
            }
            Err(f) => {
                self.metrics.result(f.result).inc();
                if f.result == HandshakeResult::UnknownSni {
                    if let Some(skipped) = self.log.allow() {
                        warn!(
                            "listener {}: {}; client refused (sluice_tls_handshakes_total{{result=\"unknown_sni\"}}){}",
                            self.listener,
                            f.why,
                            match skipped {
                                0 => String::new(),
                                n => format!(" ({n} more since the last such line)"),
                            }
                        );
                    }
                }
                debug!(
                    "listener {}: TLS client {} refused ({}): {}",
                    self.listener,
                    peer.map_or_else(|| "?".to_string(), |a| a.to_string()),
                    f.result.as_str(),
                    f.why
                );
                None
            }
        }
    }
}

/// The result label for a failed handshake; `hello` while the ClientHello
/// was being read (then a malformed message means the client is not TLS).
fn classify(e: &io::Error, hello: bool) -> Failure {
    use rustls::{Error, PeerIncompatible as P};
    let result = match e.get_ref().and_then(|i| i.downcast_ref::<Error>()) {
        Some(Error::PeerIncompatible(
            P::NoCipherSuitesInCommon
            | P::NoKxGroupsInCommon
            | P::NoSignatureSchemesInCommon
            | P::NoEcPointFormatsInCommon
            | P::UncompressedEcPointsRequired,
        )) => HandshakeResult::NoSharedCipher,
        // A ClientHello without signature_algorithms comes from TLS 1.1
        // or older.
        Some(Error::PeerIncompatible(
            P::Tls12NotOffered
            | P::Tls12NotOfferedOrEnabled
            | P::SupportedVersionsExtensionRequired
            | P::ServerDoesNotSupportTls12Or13
            | P::SignatureAlgorithmsExtensionRequired,
        )) => HandshakeResult::ProtocolVersion,
        Some(Error::NoCertificatesPresented | Error::InvalidCertificate(_)) => {
            HandshakeResult::BadCertificate
        }
        Some(Error::NoApplicationProtocol) => HandshakeResult::NoAlpn,
        Some(
            Error::InvalidMessage(_)
            | Error::InappropriateMessage { .. }
            | Error::InappropriateHandshakeMessage { .. },
        ) if hello => HandshakeResult::NotTls,
        Some(_) => HandshakeResult::Other,
        None => match e.kind() {
            io::ErrorKind::UnexpectedEof
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionAborted => HandshakeResult::Closed,
            // rustls refuses a record it cannot frame before parsing it.
            io::ErrorKind::InvalidData if hello => HandshakeResult::NotTls,
            _ => HandshakeResult::Other,
        },
    };
    Failure::new(result, e.to_string())
}
