//! A client connection as pingora's HTTP server reads it, and the clock that
//! cuts slow request headers.
//!
//! pingora's HTTP/1 server bounds each read of a request header, not the
//! header as a whole: a client that sends one byte a minute (slowloris)
//! would hold its connection for ever. [`ClientIo`] wraps the client's
//! socket (plain or TLS) and fails reads once the [`HeaderClock`] runs out:
//! the clock runs from the connect for the first request, from the first
//! byte for later ones, and stops when a request's header is complete.
//! Between requests it allows the keep-alive wait instead. An HTTP/2
//! client must start speaking within it; then it stops for good.
//!
//! It also ends the connection when the backend of the request in flight
//! closes its sessions ([`BackendClose`]: `on_backend_down: close`,
//! `on_failback: close`, a primary that lost the writes, maintenance), as
//! a TCP session to that backend would end.
//!
//! It also tells pingora who the client is (the address a trusted proxy's
//! PROXY header gave, else the socket's peer) and which protocol ALPN chose.

use std::future::Future;
use std::io;
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering::Relaxed};
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use pingora::protocols::raw_connect::ProxyDigest;
use pingora::protocols::tls::SslDigest;
use pingora::protocols::{
    ALPN, GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, SocketDigest, Ssl,
    TimingDigest, UniqueID, UniqueIDType,
};
use tokio::io::{AsyncRead, AsyncWrite, BufWriter, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};
use tokio_rustls::server::TlsStream;

const OFF: u8 = 0;
/// Waiting for a request to start: the keep-alive limit applies.
const IDLE: u8 = 1;
/// A request header is arriving: the header limit applies.
const HEADER: u8 = 2;
/// The client has been cut; every later read fails too.
const EXPIRED: u8 = 3;

/// When reads of one client connection must fail, shared by the connection
/// and the requests on it.
#[derive(Debug)]
pub struct HeaderClock {
    base: Instant,
    state: AtomicU8,
    /// Milliseconds after `base`.
    deadline_ms: AtomicU64,
    header_timeout: Duration,
}

impl HeaderClock {
    /// A clock for a client that connected now: its first request header
    /// is due within `header_timeout`.
    pub fn new(header_timeout: Duration) -> Arc<HeaderClock> {
        let clock = HeaderClock {
            base: Instant::now(),
            state: AtomicU8::new(HEADER),
            deadline_ms: AtomicU64::new(0),
            header_timeout,
        };
        clock.set_deadline(header_timeout);
        Arc::new(clock)
    }

    fn set_deadline(&self, after: Duration) {
        let at = self.base.elapsed().saturating_add(after);
        self.deadline_ms
            .store(u64::try_from(at.as_millis()).unwrap_or(u64::MAX), Relaxed);
    }

    fn deadline(&self) -> Instant {
        self.base + Duration::from_millis(self.deadline_ms.load(Relaxed))
    }

    /// A request header is complete: nothing more to cut.
    pub fn stop(&self) {
        let _ = self
            .state
            .compare_exchange(HEADER, OFF, Relaxed, Relaxed)
            .or_else(|_| self.state.compare_exchange(IDLE, OFF, Relaxed, Relaxed));
    }

    /// A request is done: the next one may keep the client waiting `keepalive`.
    pub fn idle(&self, keepalive: Duration) {
        if self.state.load(Relaxed) != EXPIRED {
            self.set_deadline(keepalive);
            self.state.store(IDLE, Relaxed);
        }
    }

    /// Bytes arrived: while idle, they start a request header.
    fn bytes_arrived(&self) {
        if self.state.load(Relaxed) == IDLE {
            self.set_deadline(self.header_timeout);
            self.state.store(HEADER, Relaxed);
        }
    }

    /// Whether the clock cut a request header that had begun.
    pub fn cut_a_header(&self) -> bool {
        self.state.load(Relaxed) == EXPIRED
    }
}

/// The close of the backend serving the request in flight on one client
/// connection: set when the request picks a backend, cleared when it ends.
/// Once the backend's sessions are told to close, the connection's reads
/// and writes fail, which ends the request (and a tunnel) at once.
#[derive(Default)]
pub struct BackendClose {
    waiting: std::sync::Mutex<Option<Pin<Box<dyn Future<Output = ()> + Send>>>>,
    /// Whether `waiting` holds a close to wait for (spares the lock on
    /// every read and write while it does not).
    armed: std::sync::atomic::AtomicBool,
    fired: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for BackendClose {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackendClose")
            .field("fired", &self.fired())
            .finish()
    }
}

impl BackendClose {
    /// Watch `closing` (subscribed before the connect, so that a close
    /// decided meanwhile counts) for the request now in flight.
    pub fn watch<T: Send + Sync + 'static>(&self, mut closing: tokio::sync::watch::Receiver<T>) {
        let wait = Box::pin(async move {
            if closing.changed().await.is_err() {
                // The backend is gone from the configuration: nothing closes.
                std::future::pending::<()>().await;
            }
        });
        *crate::sys::lock(&self.waiting) = Some(wait);
        self.armed.store(true, Relaxed);
    }

    /// The request ended: its backend's close no longer concerns the connection.
    pub fn clear(&self) {
        if self.armed.swap(false, Relaxed) {
            *crate::sys::lock(&self.waiting) = None;
        }
    }

    /// Whether a backend's close ended the connection.
    pub fn fired(&self) -> bool {
        self.fired.load(Relaxed)
    }

    /// An error once the watched backend closed its sessions.
    fn poll_closed(&self, cx: &mut Context<'_>) -> Option<io::Error> {
        if !self.fired() {
            if !self.armed.load(Relaxed) {
                return None;
            }
            let mut waiting = crate::sys::lock(&self.waiting);
            let closed = waiting
                .as_mut()
                .is_some_and(|w| w.as_mut().poll(cx).is_ready());
            if !closed {
                return None;
            }
            *waiting = None;
            self.armed.store(false, Relaxed);
            self.fired.store(true, Relaxed);
        }
        Some(io::Error::new(
            io::ErrorKind::ConnectionAborted,
            "the backend of the request closed its sessions",
        ))
    }
}

/// The client's transport.
#[derive(Debug)]
pub enum Transport {
    /// Plain TCP.
    Plain(TcpStream),
    /// TLS, terminated here.
    Tls(Box<TlsStream<TcpStream>>),
}

/// What sluice writes to a client is gathered up to this many bytes until
/// pingora flushes (the size pingora gives the sockets it accepts itself):
/// a response's header and a small body leave in one segment (one TLS
/// record), not one each.
const WRITE_BUFFER: usize = 1460;

/// A client connection handed to pingora's HTTP server.
#[derive(Debug)]
pub struct ClientIo {
    inner: BufWriter<Transport>,
    clock: Arc<HeaderClock>,
    backend_close: Arc<BackendClose>,
    sleep: Pin<Box<Sleep>>,
    digest: Arc<SocketDigest>,
    ssl: Option<Arc<SslDigest>>,
    alpn: Option<ALPN>,
    fd: UniqueIDType,
    /// Told the status of every answer no request hook saw: 408 when the
    /// clock cuts a request header that had begun, and the errors pingora
    /// answers on its own (a 400 for a header it cannot parse).
    unhooked: Unhooked,
}

/// What counts the answers sluice's request hooks never saw.
pub type UnhookedAnswer = Box<dyn Fn(u16) + Send + Sync>;

struct Unhooked(UnhookedAnswer);

impl std::fmt::Debug for Unhooked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Unhooked")
    }
}

/// The status of an HTTP/1 response that `bytes` begin, if they begin one.
fn status_line_code(bytes: &[u8]) -> Option<u16> {
    let rest = bytes.strip_prefix(b"HTTP/1.")?;
    let code = rest.get(2..5)?;
    if rest.get(1) != Some(&b' ') || !code.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(code).ok()?.parse().ok()
}

impl ClientIo {
    /// Wrap `inner`, whose client is `client` (the real one) and which
    /// arrived at `local`.
    pub fn new(
        inner: Transport,
        clock: Arc<HeaderClock>,
        client: Option<std::net::SocketAddr>,
        local: Option<std::net::SocketAddr>,
        unhooked: UnhookedAnswer,
    ) -> ClientIo {
        let (fd, ssl, alpn) = match &inner {
            Transport::Plain(s) => (s.as_raw_fd(), None, None),
            Transport::Tls(s) => {
                let (tcp, conn) = s.get_ref();
                let version = conn
                    .protocol_version()
                    .and_then(|v| v.as_str())
                    .unwrap_or("TLS");
                let cipher = conn
                    .negotiated_cipher_suite()
                    .and_then(|c| c.suite().as_str())
                    .unwrap_or("unknown");
                let alpn = match conn.alpn_protocol() {
                    Some(b"h2") => Some(ALPN::H2),
                    Some(b"http/1.1") => Some(ALPN::H1),
                    _ => None,
                };
                let digest = SslDigest::new(
                    cipher.to_string(),
                    version.to_string(),
                    None,
                    None,
                    Vec::new(),
                );
                (tcp.as_raw_fd(), Some(Arc::new(digest)), alpn)
            }
        };
        let digest = SocketDigest::from_raw_fd(fd);
        let _ = digest.peer_addr.set(client.map(Into::into));
        let _ = digest.local_addr.set(local.map(Into::into));
        let sleep = Box::pin(tokio::time::sleep_until(clock.deadline()));
        ClientIo {
            inner: BufWriter::with_capacity(WRITE_BUFFER, inner),
            backend_close: Arc::default(),
            clock,
            sleep,
            digest: Arc::new(digest),
            ssl,
            alpn,
            fd,
            unhooked: Unhooked(unhooked),
        }
    }

    /// The clock of this connection.
    pub fn clock(&self) -> &Arc<HeaderClock> {
        &self.clock
    }

    /// The close of the backend serving this connection's request.
    pub fn backend_close(&self) -> &Arc<BackendClose> {
        &self.backend_close
    }

    fn expire(&mut self) -> io::Error {
        let was = self.clock.state.swap(EXPIRED, Relaxed);
        if was == HEADER {
            (self.unhooked.0)(408);
        }
        io::Error::new(io::ErrorKind::TimedOut, "request header timeout")
    }
}

impl AsyncRead for ClientIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if let Some(e) = this.backend_close.poll_closed(cx) {
            return Poll::Ready(Err(e));
        }
        match this.clock.state.load(Relaxed) {
            OFF => {}
            EXPIRED => return Poll::Ready(Err(this.expire())),
            _ => {
                let deadline = this.clock.deadline();
                if this.sleep.deadline() != deadline {
                    this.sleep.as_mut().reset(deadline);
                }
                if this.sleep.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Err(this.expire()));
                }
            }
        }
        let before = buf.filled().len();
        let read = Pin::new(&mut this.inner).poll_read(cx, buf);
        if matches!(read, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            if this.alpn == Some(ALPN::H2) {
                // HTTP/2 requests never reach the hooks that stop the clock
                // for HTTP/1 ones: once the client speaks, pingora's HTTP/2
                // server (and its idle timeout) takes over, or the clock
                // would cut the connection and every stream on it.
                this.clock.stop();
            } else {
                this.clock.bytes_arrived();
            }
        }
        read
    }
}

impl AsyncWrite for ClientIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if let Some(e) = self.backend_close.poll_closed(cx) {
            return Poll::Ready(Err(e));
        }
        // The hooks stop the clock for every request they see (and restart
        // it when it is done): an HTTP/1 answer written while it runs is one
        // pingora gave on its own, before any hook, and counted here.
        let state = self.clock.state.load(Relaxed);
        if (state == HEADER || state == IDLE) && self.alpn != Some(ALPN::H2) {
            if let Some(code) = status_line_code(buf) {
                let written = Pin::new(&mut self.inner).poll_write(cx, buf);
                if matches!(written, Poll::Ready(Ok(n)) if n > 0) {
                    (self.unhooked.0)(code);
                }
                return written;
            }
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if let Some(e) = self.backend_close.poll_closed(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl AsyncRead for Transport {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Transport::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Transport::Tls(s) => Pin::new(&mut **s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Transport {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Transport::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Transport::Tls(s) => Pin::new(&mut **s).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Transport::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Transport::Tls(s) => Pin::new(&mut **s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Transport::Plain(s) => s.is_write_vectored(),
            Transport::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Transport::Plain(s) => Pin::new(s).poll_flush(cx),
            Transport::Tls(s) => Pin::new(&mut **s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Transport::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Transport::Tls(s) => Pin::new(&mut **s).poll_shutdown(cx),
        }
    }
}

#[async_trait]
impl Shutdown for ClientIo {
    async fn shutdown(&mut self) {
        let _ = tokio::io::AsyncWriteExt::shutdown(self).await;
    }
}

impl UniqueID for ClientIo {
    fn id(&self) -> UniqueIDType {
        self.fd
    }
}

impl Ssl for ClientIo {
    fn get_ssl_digest(&self) -> Option<Arc<SslDigest>> {
        self.ssl.clone()
    }

    fn selected_alpn_proto(&self) -> Option<ALPN> {
        self.alpn.clone()
    }
}

impl GetTimingDigest for ClientIo {
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        Vec::new()
    }
}

impl GetProxyDigest for ClientIo {
    fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
        None
    }
}

impl GetSocketDigest for ClientIo {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        Some(Arc::clone(&self.digest))
    }
}

#[async_trait]
impl Peek for ClientIo {}

#[cfg(test)]
mod tests {
    use super::status_line_code;

    #[test]
    fn a_status_line_gives_its_code_and_nothing_else_does() {
        assert_eq!(status_line_code(b"HTTP/1.1 400 Bad Request\r\n"), Some(400));
        assert_eq!(status_line_code(b"HTTP/1.0 200 OK\r\n"), Some(200));
        assert_eq!(status_line_code(b"HTTP/1.1 40"), None);
        assert_eq!(status_line_code(b"HTTP/1.1 4x0 Bad\r\n"), None);
        assert_eq!(status_line_code(b"HTTP/1.1400 Bad\r\n"), None);
        assert_eq!(status_line_code(b"hello"), None);
        assert_eq!(status_line_code(b""), None);
    }
}
