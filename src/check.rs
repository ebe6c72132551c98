//! Health-check protocols beyond a TCP connect: send/expect, HTTP, Redis,
//! MySQL/MariaDB and PostgreSQL, and the role (primary or replica) that a
//! backend reports. One [`probe`] runs one check; the caller bounds it with
//! a timeout and may drop it at any point: every socket lives inside the
//! probe's future and nothing is spawned.
//!
//! Each protocol has its own file under `check/`; the shared pieces (connect
//! with local-resource classification, bounded reads, printable previews of
//! what a peer sent) live here.

use std::io;
use std::net::SocketAddr;

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

use crate::config::CheckKind;

mod http;
mod mysql;
mod postgres;
mod redis;
mod send_expect;

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
    match kind {
        CheckKind::Tcp => connect(addr).await.map(|_| None),
        CheckKind::SendExpect(steps) => send_expect::probe(steps, addr).await,
        CheckKind::Http(check) => http::probe(check, addr, host).await,
        CheckKind::Redis(credentials) => redis::probe(credentials, addr).await,
        CheckKind::Mysql(credentials) => mysql::probe(credentials, addr).await,
        CheckKind::Postgres(check) => postgres::probe(check, addr).await,
    }
}

/// Most bytes the text protocols (send/expect, HTTP) keep of a reply.
const TEXT_CAP: usize = 64 * 1024;

/// How many bytes of a peer's reply go into an error message.
const PREVIEW_LEN: usize = 80;

/// Connect to `addr`, telling this process's own shortage apart from the
/// backend's refusal.
async fn connect(addr: SocketAddr) -> Result<TcpStream, ProbeError> {
    let stream = TcpStream::connect(addr).await.map_err(|e| {
        if is_local_error(&e) {
            ProbeError::Local(e)
        } else {
            ProbeError::Connect(e)
        }
    })?;
    // Requests are small and written whole; do not wait on Nagle.
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

/// Whether `e` is this process running out of descriptors or buffers.
fn is_local_error(e: &io::Error) -> bool {
    use nix::errno::Errno;
    matches!(
        e.raw_os_error().map(Errno::from_raw),
        Some(Errno::EMFILE | Errno::ENFILE | Errno::ENOBUFS | Errno::ENOMEM)
    )
}

/// Read once from `stream`, appending to `buf` but never past `cap` bytes.
/// Returns how many bytes came: 0 means end of stream (or `buf` is full).
async fn read_some(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    cap: usize,
) -> Result<usize, ProbeError> {
    let old = buf.len();
    let room = cap.saturating_sub(old).min(16 * 1024);
    if room == 0 {
        return Ok(0);
    }
    buf.resize(old + room, 0);
    let read = stream.read(&mut buf[old..]).await;
    let n = *read.as_ref().unwrap_or(&0);
    buf.truncate(old + n);
    read.map_err(ProbeError::Io)
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
