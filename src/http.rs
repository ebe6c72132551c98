//! HTTP mode (`protocol: http`): a pingora-proxy `ProxyHttp` service per
//! listener that picks a backend for every request.
//!
//! The listener's accept loop, edge rules (allow/deny, per-source limits,
//! PROXY protocol from trusted proxies), `max_connections` and TLS
//! handshake are the TCP mode's ([`crate::listener`]); then the client's
//! connection is handed to pingora's HTTP server ([`HttpFront::serve`]):
//! HTTP/1.1 with keep-alive, or HTTP/2 when TLS ALPN chose `h2`. For each
//! request [`Service`] routes by host and path ([`routes`]) to a pool and
//! asks the pool for a backend, exactly as a TCP client would: health,
//! roles, active-passive, backups, drain/maint and weights all come from
//! [`crate::pool`]. Connections to backends are kept alive and reused by
//! pingora's connector (one connection pool per listener, keyed per pool):
//! HTTP/1.1, or HTTP/2 as the pool's `http_version` says (over TLS by
//! ALPN, or h2c by prior knowledge); a pool's `tls` is handed to pingora's
//! rustls connector ([`crate::tls::upstream::HttpTls`]).
//!
//! Failures: no backend to try -> 503; every connect failed -> 502 (a
//! failed connect is retried on another backend, up to the pool's
//! `connect_attempts`, for any request: nothing reached the backend); a
//! backend that does not answer within `backend_timeout` -> 504; a request
//! with both `Content-Length` and `Transfer-Encoding` -> 400 and the
//! connection closed, never forwarded. Each comes with a short text body
//! and is counted in `sluice_http_requests_total`. A kept-alive backend
//! connection that turns out closed is retried for idempotent requests
//! (pingora's policy), within the same bound.

pub mod forwarded;
pub mod io;
pub mod routes;

use std::net::SocketAddr;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use log::{debug, warn};
use pingora::apps::{HttpServerApp, HttpServerOptions, ServerApp};
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::listeners::ALPN;
use pingora::protocols::Digest;
use pingora::proxy::{FailToProxy, HttpProxy, ProxyHttp, Session};
use pingora::server::ShutdownWatch;
use pingora::server::configuration::ServerConf;
use pingora::upstreams::peer::HttpPeer;
use pingora::{Error, ErrorSource, ErrorType};
use tokio::sync::watch;

use crate::access_log::{AccessLog, Cause, HttpFields, Record};
use crate::config::{BackendHttp, Forwarded, HttpSettings, ListenerSettings};
use crate::edge::acl::Prefixes;
use crate::listener::LogLimiter;
use crate::metrics::{ConnectErrorKind, HttpMetrics, ListenerMetrics};
use crate::pool::{CloseCause, Member, OpenRequest, Pool};
use crate::tls::front::PoolLookup;
use io::{BackendClose, ClientIo, HeaderClock, Transport};
use routes::Router;

/// The pool label of requests that had none.
const NO_POOL: &str = "none";
/// The status logged for a client that went away before its answer (as NGINX does).
const CLIENT_GONE: u16 = 499;
/// Most requests in flight on one HTTP/2 connection to a backend (less when
/// the backend's SETTINGS say so).
const MAX_H2_STREAMS: usize = 100;

/// A pool's share of the key pingora keeps backend connections under.
fn pool_key(name: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    name.hash(&mut h);
    h.finish()
}

/// What one HTTP listener shares with pingora's HTTP server.
pub struct HttpFront {
    proxy: Arc<HttpProxy<Service>>,
    header_timeout: Duration,
    metrics: HttpMetrics,
    listener: Arc<str>,
}

/// The per-listener `ProxyHttp` logic.
pub struct Service {
    listener: Arc<str>,
    router: Router<Arc<Pool>>,
    forwarded: Vec<Forwarded>,
    trusted: Option<Prefixes>,
    https: bool,
    redirect_https: Option<u16>,
    hsts: Option<String>,
    keepalive_timeout: Duration,
    body_timeout: Duration,
    backend_timeout: Duration,
    backend_idle_timeout: Duration,
    metrics: HttpMetrics,
    listener_metrics: ListenerMetrics,
    access_log: Option<Arc<AccessLog>>,
    log: LogLimiter,
}

/// Why sluice answered a request itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Refused {
    /// No backend of the pool could be tried.
    NoBackend,
    /// Every backend tried failed to connect.
    ConnectFailed,
}

/// One request's state.
pub struct Ctx {
    started: Instant,
    client: Option<SocketAddr>,
    clock: Option<Arc<HeaderClock>>,
    /// HTTP/1: the close of the request's backend ends the client's
    /// connection.
    backend_close: Option<Arc<BackendClose>>,
    /// HTTP/2: the close of the request's backend, seen as body bytes move
    /// either way, ends the stream alone (the connection carries others).
    stream_close: Option<watch::Receiver<Option<CloseCause>>>,
    /// The stream was ended because of `stream_close`.
    stream_cut: bool,
    pool: Option<Arc<Pool>>,
    /// Backend ids tried.
    tried: Vec<usize>,
    attempts_left: u32,
    made: u32,
    member: Option<Arc<Member>>,
    open: Option<OpenRequest>,
    connect_started: Option<Instant>,
    connect: Option<Duration>,
    /// Set when sluice answered itself, or when an error decided the status.
    status: Option<u16>,
    cause: Option<Cause>,
    refused: Option<Refused>,
}

/// An error that ends an HTTP/2 request's stream once its backend's
/// sessions were told to close; checked as body bytes move either way (a
/// stream whose backend sends nothing ends at `backend_timeout`).
fn cut_stream_if_closed(ctx: &mut Ctx) -> pingora::Result<()> {
    let closed = ctx
        .stream_close
        .as_ref()
        // An error: the backend left the configuration; nothing closes it.
        .is_some_and(|r| r.has_changed().unwrap_or(false));
    if !closed {
        return Ok(());
    }
    ctx.stream_cut = true;
    ctx.stream_close = None;
    Err(Error::explain(
        ErrorType::ConnectionClosed,
        "the backend of the request closed its sessions",
    ))
}

/// The text of a status sluice answers itself.
fn body_of(code: u16) -> &'static str {
    match code {
        400 => "400 Bad Request: malformed or ambiguous request\n",
        404 => "404 Not Found: no route for this host and path\n",
        408 => "408 Request Timeout\n",
        502 => "502 Bad Gateway: no backend accepted the connection\n",
        503 => "503 Service Unavailable: no backend is available\n",
        504 => "504 Gateway Timeout: the backend did not answer in time\n",
        _ => "error\n",
    }
}

/// The `Host` a request asked for: the header, or the URI's authority (HTTP/2).
fn host_of(req: &RequestHeader) -> Option<&str> {
    req.headers
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| req.uri.authority().map(|a| a.as_str()))
        .filter(|h| !h.is_empty())
}

/// Whether the raw HTTP/1 header `raw` frames its body ambiguously: a
/// `Transfer-Encoding` with any `Content-Length`, or `Content-Length`
/// lines that disagree. pingora drops the `Content-Length` of such a
/// request before sluice sees it, so the raw bytes are what tell.
pub fn ambiguous_framing(raw: &[u8]) -> bool {
    let mut te = false;
    let mut lengths: Vec<&[u8]> = Vec::new();
    // The request line never has a colon-separated name; header names
    // have no spaces, so a line's name is what precedes its colon.
    for line in raw.split(|&b| b == b'\n').skip(1) {
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let name = line[..colon].trim_ascii();
        let value = line[colon + 1..].trim_ascii();
        if name.eq_ignore_ascii_case(b"transfer-encoding") {
            te = true;
        } else if name.eq_ignore_ascii_case(b"content-length") {
            for v in value.split(|&b| b == b',') {
                lengths.push(v.trim_ascii());
            }
        }
    }
    (te && !lengths.is_empty()) || lengths.windows(2).any(|w| w[0] != w[1])
}

impl Service {
    fn log_record(&self, ctx: &Ctx, session: &Session, status: u16) -> Record {
        let mut r = Record::new(Arc::clone(&self.listener));
        r.client = ctx.client;
        r.pool = ctx.pool.as_ref().map(|p| Arc::from(p.name.as_str()));
        r.backend = ctx.member.as_ref().map(|m| Arc::clone(&m.backend.key));
        r.connect = ctx.connect;
        r.attempts = ctx.made;
        r.bytes_in = session.body_bytes_read() as u64;
        r.bytes_out = session.body_bytes_sent() as u64;
        let req = session.req_header();
        r.http = Some(Box::new(HttpFields::new(
            req.method.as_str(),
            &String::from_utf8_lossy(req.raw_path()),
            status,
        )));
        r.cause = ctx.cause.unwrap_or(match status {
            CLIENT_GONE => Cause::ClientError,
            _ => Cause::Completed,
        });
        r
    }

    /// Answer the request with `code` and a short body; the connection
    /// stays open when `keep` (nothing of the request is left unread).
    async fn answer(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
        code: u16,
        extra: Option<(&str, String)>,
    ) -> pingora::Result<()> {
        let body = body_of(code);
        let mut resp = ResponseHeader::build(code, Some(4))?;
        resp.insert_header(http::header::CONTENT_TYPE, "text/plain")?;
        resp.insert_header(http::header::CONTENT_LENGTH, body.len().to_string())?;
        if let Some((name, value)) = extra {
            resp.insert_header(name.to_string(), value)?;
        }
        ctx.status = Some(code);
        let head = session.req_header().method == http::Method::HEAD;
        session.write_response_header(Box::new(resp), head).await?;
        if !head {
            session
                .write_response_body(Some(Bytes::from_static(body.as_bytes())), true)
                .await?;
        }
        Ok(())
    }

    /// A redirect to the same host and path over https.
    async fn redirect(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
        port: u16,
    ) -> pingora::Result<()> {
        let req = session.req_header();
        let host = host_of(req).map(routes::strip_port).unwrap_or("");
        let target = String::from_utf8_lossy(req.raw_path()).into_owned();
        // An absolute-form target carries its own authority: keep its path only.
        let path = match target.find("://") {
            Some(i) => target[i + 3..]
                .find('/')
                .map_or("/".to_string(), |p| target[i + 3 + p..].to_string()),
            None => target,
        };
        let location = match port {
            443 => format!("https://{host}{path}"),
            p => format!("https://{host}:{p}{path}"),
        };
        // 308 keeps the method and body; browsers treat 301 for GET alike.
        let code = match req.method {
            http::Method::GET | http::Method::HEAD => 301,
            _ => 308,
        };
        let mut resp = ResponseHeader::build(code, Some(3))?;
        resp.insert_header(http::header::LOCATION, location)?;
        resp.insert_header(http::header::CONTENT_LENGTH, "0")?;
        ctx.status = Some(code);
        session.write_response_header(Box::new(resp), true).await
    }
}

#[async_trait]
impl ProxyHttp for Service {
    type CTX = Ctx;

    fn new_ctx(&self) -> Ctx {
        Ctx {
            started: Instant::now(),
            client: None,
            clock: None,
            backend_close: None,
            stream_close: None,
            stream_cut: false,
            pool: None,
            tried: Vec::new(),
            attempts_left: 0,
            made: 0,
            member: None,
            open: None,
            connect_started: None,
            connect: None,
            status: None,
            cause: None,
            refused: None,
        }
    }

    async fn early_request_filter(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
    ) -> pingora::Result<()> {
        ctx.started = Instant::now();
        let downstream = session.as_downstream_mut();
        ctx.client = downstream.client_addr().and_then(|a| a.as_inet()).copied();
        if let Some(stream) = downstream.stream() {
            // HTTP/1: the header is in; the clock stops until the next request.
            if let Some(io) = stream.as_any().downcast_ref::<ClientIo>() {
                io.clock().stop();
                ctx.clock = Some(Arc::clone(io.clock()));
                ctx.backend_close = Some(Arc::clone(io.backend_close()));
            }
        }
        downstream.set_read_timeout(Some(self.body_timeout));
        downstream.set_write_timeout(Some(self.body_timeout));
        let ambiguous = downstream
            .as_http1()
            .is_some_and(|h1| ambiguous_framing(&h1.get_headers_raw_bytes()));
        if ambiguous {
            // Never forwarded, and the connection is closed: what follows
            // the header cannot be told apart from a smuggled request.
            downstream.set_keepalive(None);
            return Err(Error::explain(
                ErrorType::HTTPStatus(400),
                "both Content-Length and Transfer-Encoding, or Content-Length values that differ",
            ));
        }
        // The next request on this connection may idle this long.
        let keepalive = self.keepalive_timeout.as_secs().max(1);
        if downstream.get_keepalive().is_some() {
            downstream.set_keepalive(Some(keepalive));
        }
        Ok(())
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut Ctx) -> pingora::Result<bool> {
        if let Some(port) = self.redirect_https {
            self.redirect(session, ctx, port).await?;
            return Ok(true);
        }
        let req = session.req_header();
        let pool = self.router.route(host_of(req), req.uri.path()).cloned();
        let Some(pool) = pool else {
            self.answer(session, ctx, 404, None).await?;
            return Ok(true);
        };
        if !pool.is_ready() {
            // A pool a reload just added: its first verdict is moments away.
            let _ = tokio::time::timeout(self.backend_timeout, pool.wait_ready()).await;
        }
        ctx.attempts_left = pool.generation().settings.connect_attempts;
        ctx.pool = Some(pool);
        Ok(false)
    }

    async fn upstream_peer(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
    ) -> pingora::Result<Box<HttpPeer>> {
        // A request that tried a backend before counts it no more.
        ctx.open = None;
        let refuse = |ctx: &mut Ctx| {
            let (code, why) = if ctx.made > 0 {
                ctx.refused = Some(Refused::ConnectFailed);
                ctx.cause = Some(Cause::ConnectFailed);
                (502, "no backend accepted the connection")
            } else {
                ctx.refused = Some(Refused::NoBackend);
                ctx.cause = Some(Cause::RefusedNoBackend);
                (503, "no backend is available")
            };
            Err(Error::explain(ErrorType::HTTPStatus(code), why))
        };
        let Some(pool) = ctx.pool.clone() else {
            return refuse(ctx);
        };
        if ctx.attempts_left == 0 {
            return refuse(ctx);
        }
        let generation = pool.generation();
        let key: Vec<u8> = match (generation.needs_client_key(), ctx.client) {
            (true, Some(addr)) => match addr.ip() {
                std::net::IpAddr::V4(ip) => ip.octets().to_vec(),
                std::net::IpAddr::V6(ip) => ip.octets().to_vec(),
            },
            _ => Vec::new(),
        };
        let connect_timeout = generation.settings.connect_timeout;
        let dial = generation
            .settings
            .tls
            .as_ref()
            .map(|t| (t.sni.clone(), t.verify, Arc::clone(&t.http)));
        let version = generation
            .settings
            .http_version
            .unwrap_or(BackendHttp::Http1);
        drop(generation);
        let Some((member, addr)) = pool.pick(&key, &ctx.tried) else {
            return refuse(ctx);
        };
        ctx.attempts_left -= 1;
        ctx.made += 1;
        ctx.tried.push(member.backend.id());
        ctx.open = Some(member.backend.open_request());
        // Before the connect, as for a TCP session: a close decided while
        // it runs still reaches this request.
        match &ctx.backend_close {
            Some(close) => close.watch(member.backend.watch_closing()),
            None => ctx.stream_close = Some(member.backend.watch_closing()),
        }
        let name = match &dial {
            // Never empty: pingora skips verification without a name.
            Some((sni, _, _)) => sni
                .clone()
                .unwrap_or_else(|| member.backend.address.host().to_string()),
            None => String::new(),
        };
        ctx.member = Some(member);
        ctx.connect_started = Some(Instant::now());
        let mut peer = match dial {
            None => HttpPeer::new(addr, false, name),
            Some((_, verify, tls)) => {
                let mut peer = HttpPeer::new(addr, true, name);
                peer.options.verify_cert = verify;
                peer.options.verify_hostname = verify;
                peer.options.ca = tls.ca.clone();
                peer.client_cert_key = tls.cert_key.clone();
                // Connections made under an earlier reload's TLS settings
                // are not reused.
                peer.group_key = tls.id;
                peer
            }
        };
        // Backend connections are kept per pool: pools may differ in TLS
        // and HTTP version towards the same address.
        peer.group_key ^= pool_key(&pool.name);
        peer.options.alpn = match version {
            // An Upgrade (WebSocket) exists in HTTP/1.1 only.
            _ if session.is_upgrade_req() => ALPN::H1,
            BackendHttp::Http1 => ALPN::H1,
            BackendHttp::Http2 => ALPN::H2,
            BackendHttp::Auto => ALPN::H2H1,
        };
        if version != BackendHttp::Http1 {
            // Requests share an HTTP/2 connection, up to what the backend allows.
            peer.options.max_h2_streams = MAX_H2_STREAMS;
        }
        peer.options.connection_timeout = Some(connect_timeout);
        peer.options.read_timeout = Some(self.backend_timeout);
        peer.options.write_timeout = Some(self.backend_timeout);
        peer.options.idle_timeout = Some(self.backend_idle_timeout);
        Ok(Box::new(peer))
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream_request: &mut RequestHeader,
        ctx: &mut Ctx,
    ) -> pingora::Result<()> {
        let Some(client) = ctx.client else {
            return Ok(());
        };
        let trusted = self.trusted.as_ref().is_some_and(|t| t.covers(client.ip()));
        let host = host_of(session.req_header()).map(str::to_string);
        let hop = forwarded::Hop {
            client: client.ip(),
            trusted,
            proto: if self.https { "https" } else { "http" },
            host: host.as_deref(),
        };
        forwarded::apply(upstream_request, &self.forwarded, &hop)
    }

    async fn connected_to_upstream(
        &self,
        _session: &mut Session,
        reused: bool,
        _peer: &HttpPeer,
        _fd: std::os::unix::io::RawFd,
        _digest: Option<&Digest>,
        ctx: &mut Ctx,
    ) -> pingora::Result<()> {
        let took = ctx.connect_started.map(|s| s.elapsed());
        ctx.connect = took;
        if reused {
            self.metrics.upstream_reused.inc();
            return Ok(());
        }
        self.metrics.upstream_new.inc();
        if let (Some(member), Some(pool)) = (&ctx.member, &ctx.pool) {
            let backend = &member.backend;
            backend.metrics.connections.inc();
            if let Some(t) = took {
                backend.metrics.connect_duration.observe(t.as_secs_f64());
            }
            pool.observe_connect(backend, true, &"");
        }
        Ok(())
    }

    async fn request_body_filter(
        &self,
        _session: &mut Session,
        _body: &mut Option<Bytes>,
        _end_of_stream: bool,
        ctx: &mut Ctx,
    ) -> pingora::Result<()> {
        cut_stream_if_closed(ctx)
    }

    fn upstream_response_body_filter(
        &self,
        _session: &mut Session,
        _body: &mut Option<Bytes>,
        _end_of_stream: bool,
        ctx: &mut Ctx,
    ) -> pingora::Result<Option<Duration>> {
        cut_stream_if_closed(ctx).map(|()| None)
    }

    fn fail_to_connect(
        &self,
        _session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut Ctx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        ctx.open = None;
        if let (Some(member), Some(pool)) = (&ctx.member, &ctx.pool) {
            let kind = match e.etype() {
                ErrorType::ConnectTimedout => ConnectErrorKind::Timeout,
                ErrorType::ConnectRefused => ConnectErrorKind::Refused,
                ErrorType::TLSHandshakeFailure
                | ErrorType::TLSHandshakeTimedout
                | ErrorType::InvalidCert
                | ErrorType::HandshakeError => ConnectErrorKind::Tls,
                _ => ConnectErrorKind::Other,
            };
            member.backend.metrics.connect_errors(kind).inc();
            debug!(
                "listener {}: connect to {} failed ({}): {e}",
                self.listener,
                member.backend.address,
                kind.as_str()
            );
            pool.observe_connect(&member.backend, false, &e);
        }
        // Nothing reached the backend: any request may go to another.
        e.set_retry(ctx.attempts_left > 0);
        e
    }

    fn error_while_proxy(
        &self,
        peer: &HttpPeer,
        session: &mut Session,
        e: Box<Error>,
        ctx: &mut Ctx,
        client_reused: bool,
    ) -> Box<Error> {
        ctx.open = None;
        let mut e = e.more_context(format!("backend {peer}"));
        if !session.req_header().method.is_idempotent() || session.as_ref().retry_buffer_truncated()
        {
            e.set_retry(false);
        } else {
            // A kept-alive connection the backend had closed: try again.
            e.retry.decide_reuse(client_reused);
        }
        if ctx.attempts_left == 0 {
            e.set_retry(false);
        }
        e
    }

    async fn response_filter(
        &self,
        _session: &mut Session,
        upstream_response: &mut ResponseHeader,
        _ctx: &mut Ctx,
    ) -> pingora::Result<()> {
        if let Some(hsts) = &self.hsts {
            upstream_response
                .insert_header(http::header::STRICT_TRANSPORT_SECURITY, hsts.as_str())?;
        }
        Ok(())
    }

    async fn fail_to_proxy(&self, session: &mut Session, e: &Error, ctx: &mut Ctx) -> FailToProxy {
        if ctx.stream_cut || ctx.backend_close.as_ref().is_some_and(|c| c.fired()) {
            // The backend closed its sessions (on_backend_down: close, ...):
            // the client's connection (HTTP/2: the stream) is cut, as a TCP
            // session would be; nothing more is written to it.
            ctx.cause = Some(
                match ctx
                    .member
                    .as_ref()
                    .and_then(|m| m.backend.last_close_cause())
                {
                    Some(CloseCause::Maintenance) => Cause::ClosedAdmin,
                    _ => Cause::ClosedFailover,
                },
            );
            ctx.status = Some(502);
            return FailToProxy {
                error_code: 0,
                can_reuse_downstream: false,
            };
        }
        let code = match (e.etype(), e.esource()) {
            (ErrorType::HTTPStatus(code), _) => *code,
            (ErrorType::ReadTimedout | ErrorType::WriteTimedout, ErrorSource::Upstream) => {
                ctx.cause = Some(Cause::BackendTimeout);
                504
            }
            (_, ErrorSource::Upstream) => {
                ctx.cause.get_or_insert(if ctx.refused.is_some() {
                    Cause::ConnectFailed
                } else {
                    Cause::BackendError
                });
                502
            }
            (ErrorType::ReadTimedout, ErrorSource::Downstream) => {
                ctx.cause = Some(Cause::ClientError);
                408
            }
            (
                ErrorType::ReadError | ErrorType::WriteError | ErrorType::ConnectionClosed,
                ErrorSource::Downstream,
            ) => {
                ctx.cause = Some(Cause::ClientError);
                0
            }
            (_, ErrorSource::Downstream) => 400,
            _ => 500,
        };
        if code > 0 && session.response_written().is_none() {
            // The backend's answer may have begun: then the connection is cut instead.
            let hsts = self
                .hsts
                .as_ref()
                .map(|v| (http::header::STRICT_TRANSPORT_SECURITY.as_str(), v.clone()));
            if let Err(err) = self.answer(session, ctx, code, hsts).await {
                debug!("listener {}: cannot send {code}: {err}", self.listener);
            }
        }
        ctx.status = Some(if code == 0 { CLIENT_GONE } else { code });
        if code >= 500 {
            if let Some(skipped) = self.log.allow() {
                warn!(
                    "listener {}: {code} for {} {}: {e}{}",
                    self.listener,
                    session.req_header().method,
                    session.req_header().uri.path(),
                    match skipped {
                        0 => String::new(),
                        n => format!(" ({n} more since the last such line)"),
                    }
                );
            }
        }
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }

    fn suppress_error_log(&self, _session: &Session, _ctx: &Ctx, _error: &Error) -> bool {
        // Counted, and logged by fail_to_proxy without flooding.
        true
    }

    fn suppress_proxy_warn_log(
        &self,
        _session: &Session,
        _ctx: &Ctx,
        _error: &Error,
        _context: pingora::proxy::ProxyWarnLogContext,
    ) -> bool {
        true
    }

    async fn logging(&self, session: &mut Session, _e: Option<&Error>, ctx: &mut Ctx) {
        ctx.open = None;
        if let Some(close) = &ctx.backend_close {
            close.clear();
        }
        let status = session
            .response_written()
            .map(|r| r.status.as_u16())
            .or(ctx.status)
            .unwrap_or(CLIENT_GONE);
        let pool = ctx.pool.as_ref().map_or(NO_POOL, |p| p.name.as_str());
        self.metrics
            .request(pool, status, ctx.started.elapsed().as_secs_f64());
        self.listener_metrics
            .bytes_in
            .inc_by(session.body_bytes_read() as u64);
        self.listener_metrics
            .bytes_out
            .inc_by(session.body_bytes_sent() as u64);
        if let Some(log) = &self.access_log {
            log.log(&self.log_record(ctx, session, status));
        }
        if let Some(clock) = &ctx.clock {
            clock.idle(self.keepalive_timeout);
        }
    }
}

impl HttpFront {
    /// The HTTP side of listener `settings` (which has `protocol: http`);
    /// route pools are found with `pools`, the listener's own is `pool`.
    pub fn new(
        settings: &ListenerSettings,
        http: &HttpSettings,
        pool: &Arc<Pool>,
        pools: Option<&PoolLookup>,
        metrics: HttpMetrics,
        listener_metrics: ListenerMetrics,
        access_log: Option<Arc<AccessLog>>,
    ) -> HttpFront {
        let name = settings.name.as_str();
        let find = |pool_name: &str| {
            if pool_name == pool.name {
                return Some(Arc::clone(pool));
            }
            let found = pools.and_then(|p| p(pool_name));
            if found.is_none() {
                warn!(
                    "listener {name}: route to pool {pool_name}, which is not running; its requests get 404"
                );
            }
            found
        };
        let routes = http
            .routes
            .iter()
            .filter_map(|r| find(&r.pool).map(|p| (r.host.clone(), r.path.clone(), p)))
            .collect();
        let default = http.default_pool.as_deref().and_then(find);
        let listener: Arc<str> = Arc::from(name);
        let service = Service {
            listener: Arc::clone(&listener),
            router: Router::new(routes, default),
            forwarded: http.forwarded.clone(),
            trusted: (!http.trusted_proxies.is_empty())
                .then(|| Prefixes::new(&http.trusted_proxies)),
            https: settings.tls.is_some(),
            redirect_https: http.redirect_https,
            hsts: http.hsts.as_ref().map(|h| h.value()),
            keepalive_timeout: http.keepalive_timeout,
            body_timeout: http.body_timeout,
            backend_timeout: http.backend_timeout,
            backend_idle_timeout: http.backend_idle_timeout,
            metrics: metrics.clone(),
            listener_metrics,
            access_log,
            log: LogLimiter::new(),
        };
        let mut conf = ServerConf::default();
        // pingora's connector loads the system's CA certificates for pools
        // with `tls` but no `ca`, and panics when that fails (a bad
        // SSL_CERT_FILE, an unreadable certificate): then it gets none.
        let mut system = rustls::RootCertStore::empty();
        if let Err(e) = pingora::tls::load_platform_certs_incl_env_into_store(&mut system) {
            warn!(
                "listener {name}: the system's CA certificates cannot be loaded ({e}); \
                 in HTTP mode, backends of pools with tls but no ca will not be trusted"
            );
            conf.ca_file = Some("/dev/null".to_string());
        }
        let conf = Arc::new(conf);
        let mut proxy = pingora::proxy::http_proxy(&conf, service);
        let mut options = HttpServerOptions::default();
        options.h2_idle_timeout = Some(http.keepalive_timeout);
        proxy.server_options = Some(options);
        HttpFront {
            proxy: Arc::new(proxy),
            header_timeout: http.header_timeout,
            metrics,
            listener,
        }
    }

    /// Close idle kept-alive client connections once `shutdown` is raised
    /// (requests in flight finish; no new one starts on them).
    pub fn close_idle_on(
        self: &Arc<Self>,
        mut shutdown: ShutdownWatch,
        handle: &tokio::runtime::Handle,
    ) {
        let front: Weak<HttpFront> = Arc::downgrade(self);
        handle.spawn(async move {
            let _ = shutdown.wait_for(|s| *s).await;
            if let Some(front) = front.upgrade() {
                front.proxy.http_cleanup().await;
            }
        });
    }

    /// Serve one client connection until it closes, `shutdown` ends its
    /// keep-alive, or `cut` (the shutdown timeout) ends it.
    pub async fn serve(
        &self,
        transport: Transport,
        client: Option<SocketAddr>,
        local: Option<SocketAddr>,
        shutdown: &ShutdownWatch,
        cut: Option<watch::Receiver<bool>>,
    ) {
        let clock = HeaderClock::new(self.header_timeout);
        let metrics = self.metrics.clone();
        let unhooked = Box::new(move |code| metrics.request(NO_POOL, code, 0.0));
        let io = ClientIo::new(transport, clock, client, local, unhooked);
        let serve = self.proxy.process_new(Box::new(io), shutdown);
        match cut {
            Some(mut cut) => {
                tokio::select! {
                    _ = serve => {}
                    _ = cut.wait_for(|c| *c) => {
                        debug!("listener {}: HTTP connection cut at shutdown", self.listener);
                    }
                }
            }
            None => {
                serve.await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn framing_is_ambiguous_with_te_and_cl_or_differing_lengths() {
        let req = |h: &str| format!("POST / HTTP/1.1\r\nHost: a\r\n{h}\r\n").into_bytes();
        assert!(ambiguous_framing(&req(
            "Content-Length: 4\r\nTransfer-Encoding: chunked\r\n"
        )));
        assert!(ambiguous_framing(&req(
            "transfer-encoding: chunked\r\ncontent-length : 4\r\n"
        )));
        assert!(ambiguous_framing(&req(
            "Content-Length: 4\r\nContent-Length: 5\r\n"
        )));
        assert!(ambiguous_framing(&req("Content-Length: 4, 5\r\n")));
        assert!(!ambiguous_framing(&req(
            "Content-Length: 4\r\nContent-Length: 4\r\n"
        )));
        assert!(!ambiguous_framing(&req("Content-Length: 4\r\n")));
        assert!(!ambiguous_framing(&req("Transfer-Encoding: chunked\r\n")));
        assert!(!ambiguous_framing(&req(
            "X-Content-Length-Note: 4\r\nTransfer-Encoding: chunked\r\n"
        )));
    }
}
