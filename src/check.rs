//! Health-check protocols beyond a TCP connect: send/expect, HTTP, Redis,
//! MySQL/MariaDB and PostgreSQL, and the role (primary or replica) that a
//! backend reports. One [`probe`] runs one check; the caller bounds it with
//! a timeout and may drop it at any point: every socket lives inside the
//! probe's future and nothing is spawned.
//!
//! Each protocol has its own file under `check/`; the shared pieces (connect
//! with local-resource classification, the read budget, bounded reads,
//! printable previews of what a peer sent) live here. For a pool with `tls`,
//! [`connect`] also does the TLS handshake, so every protocol runs inside
//! TLS unchanged; the `tls` kind is that connect and handshake alone.
//!
//! # The read budget
//!
//! Every byte a check reads from its peer passes through one [`Metered`]
//! stream, and all the connections of one check draw on one [`Budget`] of
//! [`READ_BUDGET`] bytes. A peer that sends more (endless rows, notices,
//! parameters, huge replies made of pieces each under a protocol's own
//! limits) makes the read fail with [`ProbeError::TooMuch`]: the probe
//! returns, which drops the connection. So what a check can hold is bounded
//! by the budget whatever the protocol code keeps, and nothing outlives the
//! probe's future.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll, ready};

use rustls::ClientConfig;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::config::CheckKind;

mod http;
mod mysql;
mod postgres;
mod redis;
mod send_expect;

#[cfg(test)]
mod fixtures;
#[cfg(test)]
mod tests;

/// The role a database backend reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Writable.
    Primary,
    /// Read-only.
    Replica,
}

impl Role {
    /// The name used in the YAML file and in logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Primary => "primary",
            Role::Replica => "replica",
        }
    }
}

/// Why one probe failed.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// The TCP connect failed (refused, unreachable, reset).
    #[error("connect failed: {0}")]
    Connect(io::Error),
    /// Reading or writing failed during the exchange.
    #[error("I/O error: {0}")]
    Io(io::Error),
    /// The peer does not speak the protocol.
    #[error("{0}")]
    Protocol(String),
    /// The server refused the login; holds the server's message.
    #[error("authentication failed: {0}")]
    Auth(String),
    /// The peer speaks the protocol but the check did not pass.
    #[error("{0}")]
    Failed(String),
    /// This process ran out of file descriptors or memory: no verdict on
    /// the backend.
    #[error("local resources exhausted: {0}")]
    Local(io::Error),
    /// The peer sent more than the check's read budget (in bytes); the
    /// connection was dropped.
    #[error("the peer sent more than {} KiB in one check; connection dropped", .0 / 1024)]
    TooMuch(usize),
    /// The TLS handshake failed (an untrusted certificate, say).
    #[error("{0}")]
    Tls(String),
}

/// TLS for a check: the pool's client configuration and the name to send
/// and verify.
#[derive(Clone, Debug)]
pub struct TlsDial {
    /// The pool's rustls client configuration.
    pub config: Arc<ClientConfig>,
    /// The backend's server name.
    pub name: ServerName<'static>,
}

/// Where a check connects, and whether through TLS.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Target<'a> {
    addr: SocketAddr,
    tls: Option<&'a TlsDial>,
}

impl Target<'_> {
    /// The same target on another port.
    fn with_port(self, port: u16) -> Self {
        Target {
            addr: SocketAddr::new(self.addr.ip(), port),
            ..self
        }
    }
}

impl ProbeError {
    /// Whether the failure is this process's own (out of fds or memory), so
    /// it says nothing about the backend.
    pub fn is_local(&self) -> bool {
        matches!(self, ProbeError::Local(_))
    }
}

/// Run one check of `kind` against `addr`. `host` is the backend's
/// configured host name (default HTTP `Host` header).
///
/// Returns the role the backend reports, or `None` for kinds that report
/// none. Has no timeout of its own; dropping the future closes everything.
pub async fn probe(
    kind: &CheckKind,
    addr: SocketAddr,
    host: &str,
) -> Result<Option<Role>, ProbeError> {
    probe_within(kind, addr, host, &Budget::new(READ_BUDGET)).await
}

/// [`probe`] drawing on `budget` (which tells afterwards how much was read)
/// instead of a fresh one of [`READ_BUDGET`].
pub async fn probe_within(
    kind: &CheckKind,
    addr: SocketAddr,
    host: &str,
    budget: &Budget,
) -> Result<Option<Role>, ProbeError> {
    probe_over(kind, addr, host, None, budget).await
}

/// [`probe_within`] through TLS when `tls` is given: the protocol runs
/// inside it.
pub async fn probe_over(
    kind: &CheckKind,
    addr: SocketAddr,
    host: &str,
    tls: Option<&TlsDial>,
    budget: &Budget,
) -> Result<Option<Role>, ProbeError> {
    let addr = Target { addr, tls };
    let result = match kind {
        CheckKind::Tcp => connect(Target { tls: None, ..addr }, budget)
            .await
            .map(|_| None),
        CheckKind::Tls => connect(addr, budget).await.map(|_| None),
        CheckKind::SendExpect(steps) => send_expect::probe(steps, addr, budget).await,
        CheckKind::Http(check) => http::probe(check, addr, host, budget).await,
        CheckKind::Redis(credentials) => redis::probe(credentials, addr, budget).await,
        CheckKind::Mysql(credentials) => mysql::probe(credentials, addr, budget).await,
        CheckKind::Postgres(check) => postgres::probe(check, addr, budget).await,
    };
    result.map_err(ProbeError::for_log)
}

impl ProbeError {
    /// The same error with any text that came from the peer made safe for
    /// one log line: control characters escaped, cut at [`MESSAGE_LEN`].
    fn for_log(self) -> ProbeError {
        match self {
            ProbeError::Protocol(m) => ProbeError::Protocol(printable(&m)),
            ProbeError::Auth(m) => ProbeError::Auth(printable(&m)),
            ProbeError::Failed(m) => ProbeError::Failed(printable(&m)),
            ProbeError::Tls(m) => ProbeError::Tls(printable(&m)),
            other => other,
        }
    }
}

/// Most bytes one check may read from its peer, all its connections
/// together. A real answer is a few KiB (the largest, an HTTP check with
/// both role paths, reads at most 3 × [`TEXT_CAP`]); a peer that sends more
/// is flooding the check.
pub const READ_BUDGET: usize = 1024 * 1024;

/// Most bytes the text protocols (send/expect, HTTP) keep of a reply.
const TEXT_CAP: usize = 64 * 1024;

/// How many bytes of a peer's reply go into an error message.
const PREVIEW_LEN: usize = 80;

/// Most characters of an error message (server messages included).
const MESSAGE_LEN: usize = 300;

/// What one check may read, shared by all its connections, and what each
/// of them writes before anything else (a PROXY protocol header, for a
/// pool whose backends expect one).
#[derive(Clone, Debug)]
pub struct Budget {
    limit: usize,
    used: Arc<AtomicUsize>,
    preamble: Option<Arc<[u8]>>,
}

impl Budget {
    /// A budget of `limit` bytes.
    pub fn new(limit: usize) -> Budget {
        Budget {
            limit,
            used: Arc::new(AtomicUsize::new(0)),
            preamble: None,
        }
    }

    /// The same budget, and `bytes` written first on every connection.
    pub fn with_preamble(mut self, bytes: Vec<u8>) -> Budget {
        self.preamble = Some(bytes.into());
        self
    }

    /// Bytes read from the peer so far: at most the limit, plus the one
    /// byte that proved the peer was sending more.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    /// How many bytes the next read may take: what is left, and one more
    /// to tell a peer that stops exactly at the limit from one that goes on.
    fn allowance(&self) -> io::Result<usize> {
        let used = self.used();
        if used > self.limit {
            return Err(self.exceeded());
        }
        Ok(self.limit - used + 1)
    }

    /// Count `n` more bytes read; the error once past the limit.
    fn spend(&self, n: usize) -> io::Result<()> {
        let used = self.used.fetch_add(n, Ordering::Relaxed).saturating_add(n);
        if used > self.limit {
            return Err(self.exceeded());
        }
        Ok(())
    }

    fn exceeded(&self) -> io::Error {
        io::Error::other(OverBudget(self.limit))
    }
}

/// The budget's verdict, carried inside an `io::Error` through drivers.
#[derive(Debug, thiserror::Error)]
#[error("read budget of {0} bytes exceeded")]
pub(crate) struct OverBudget(pub(crate) usize);

/// A stream whose reads draw on a [`Budget`]. A read never takes more from
/// the socket than the budget allows (plus one byte); once the peer has sent
/// more, every read fails, and the bytes past the budget never reach the
/// caller.
pub(crate) struct Metered<S> {
    inner: S,
    budget: Budget,
}

impl<S: AsyncRead + Unpin> AsyncRead for Metered<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let room = buf.remaining().min(this.budget.allowance()?);
        if room == 0 {
            return Poll::Ready(Ok(()));
        }
        // Read into at most `room` bytes of the caller's buffer (made
        // initialized first, so that handing them on needs no `unsafe`).
        let mut part = ReadBuf::new(buf.initialize_unfilled_to(room));
        ready!(Pin::new(&mut this.inner).poll_read(cx, &mut part))?;
        let n = part.filled().len();
        this.budget.spend(n)?;
        buf.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Metered<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// A read error as a probe error: [`ProbeError::TooMuch`] when it is the
/// budget's.
fn read_error(e: io::Error) -> ProbeError {
    match e.get_ref().and_then(|i| i.downcast_ref::<OverBudget>()) {
        Some(OverBudget(limit)) => ProbeError::TooMuch(*limit),
        None => ProbeError::Io(e),
    }
}

/// A check's connection: plain, or TLS over it. Either way every byte
/// read from the socket (TLS records included) draws on the budget.
pub(crate) enum CheckStream {
    Plain(Metered<TcpStream>),
    Tls(Box<tokio_rustls::client::TlsStream<Metered<TcpStream>>>),
}

impl AsyncRead for CheckStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            CheckStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            CheckStream::Tls(s) => Pin::new(&mut **s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for CheckStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            CheckStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            CheckStream::Tls(s) => Pin::new(&mut **s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            CheckStream::Plain(s) => Pin::new(s).poll_flush(cx),
            CheckStream::Tls(s) => Pin::new(&mut **s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            CheckStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            CheckStream::Tls(s) => Pin::new(&mut **s).poll_shutdown(cx),
        }
    }
}

/// Connect to `target`, telling this process's own shortage apart from the
/// backend's refusal, and handshake when it has TLS; reads from the
/// connection draw on `budget`.
async fn connect(target: Target<'_>, budget: &Budget) -> Result<CheckStream, ProbeError> {
    let plain = connect_tcp(target.addr, budget).await?;
    let Some(dial) = target.tls else {
        return Ok(CheckStream::Plain(plain));
    };
    tokio_rustls::TlsConnector::from(Arc::clone(&dial.config))
        .connect(dial.name.clone(), plain)
        .await
        .map(|s| CheckStream::Tls(Box::new(s)))
        .map_err(|e| match read_error(e) {
            ProbeError::Io(e) => ProbeError::Tls(crate::tls::upstream::describe(e).to_string()),
            too_much => too_much,
        })
}

/// Connect to `addr` over TCP.
async fn connect_tcp(addr: SocketAddr, budget: &Budget) -> Result<Metered<TcpStream>, ProbeError> {
    let classify = |e: std::io::Error| {
        if crate::sys::is_local_exhaustion(&e) {
            ProbeError::Local(e)
        } else {
            ProbeError::Connect(e)
        }
    };
    // The data path's connect (non-blocking, close-on-exec, no Nagle: requests
    // are small and written whole), handed to tokio's stream type.
    let socket = crate::relay::socket::connect(addr)
        .await
        .map_err(classify)?;
    let mut stream = TcpStream::from_std(socket.into_inner()).map_err(classify)?;
    if let Some(preamble) = &budget.preamble {
        tokio::io::AsyncWriteExt::write_all(&mut stream, preamble)
            .await
            .map_err(ProbeError::Io)?;
    }
    Ok(Metered {
        inner: stream,
        budget: budget.clone(),
    })
}

/// Read once from `stream`, appending to `buf` but never past `cap` bytes.
/// Returns how many bytes came: 0 means end of stream (or `buf` is full).
async fn read_some(
    stream: &mut (impl AsyncRead + Unpin),
    buf: &mut Vec<u8>,
    cap: usize,
) -> Result<usize, ProbeError> {
    let old = buf.len();
    let room = cap.saturating_sub(old).min(16 * 1024);
    if room == 0 {
        return Ok(0);
    }
    buf.resize(old + room, 0);
    let read = stream.read(buf.get_mut(old..).unwrap_or_default()).await;
    let n = *read.as_ref().unwrap_or(&0);
    buf.truncate(old + n);
    read.map_err(read_error)
}

/// `text` (often a server's own message) for one log line: control
/// characters escaped, at most [`MESSAGE_LEN`] characters.
fn printable(text: &str) -> String {
    let mut out = String::new();
    for (i, c) in text.chars().enumerate() {
        if i == MESSAGE_LEN {
            out.push('…');
            break;
        }
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// The first bytes of `bytes`, quoted and escaped for an error message.
fn preview(bytes: &[u8]) -> String {
    let mut out = String::from("\"");
    for &b in bytes.iter().take(PREVIEW_LEN) {
        out.extend(std::ascii::escape_default(b).map(char::from));
    }
    out.push('"');
    if bytes.len() > PREVIEW_LEN {
        out.push('…');
    }
    out
}

/// An `UnexpectedEof` error saying what was awaited.
fn closed_before(what: &str) -> ProbeError {
    ProbeError::Io(io::Error::new(
        io::ErrorKind::UnexpectedEof,
        format!("connection closed before {what}"),
    ))
}
