//! The `postgres` check: log in with `tokio-postgres` over a socket of our
//! own, then `SELECT pg_is_in_recovery()` for the role.
//!
//! The driver's `Connection` is polled inside the probe's own future, never
//! spawned, so dropping the probe closes everything. Reads pass through
//! [`Guard`], which checks the framing of backend messages before the driver
//! sees them: the driver reserves whatever length a peer announces, so a
//! non-PostgreSQL peer could otherwise make it allocate gigabytes.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use futures::FutureExt;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::config::SslMode;
use tokio_postgres::error::SqlState;
use tokio_postgres::{NoTls, SimpleQueryMessage};

use super::{ProbeError, Role, closed_before, connect, preview};
use crate::config::PostgresCheck;

/// Largest backend message accepted.
const MAX_MESSAGE: usize = 1024 * 1024;

/// Log in, ask whether the server is in recovery, and terminate.
pub(super) async fn probe(
    check: &PostgresCheck,
    addr: SocketAddr,
) -> Result<Option<Role>, ProbeError> {
    let stream = Guard::new(connect(addr).await?);
    let credentials = &check.credentials;
    let mut config = tokio_postgres::Config::new();
    config
        .user(credentials.user.as_deref().unwrap_or("postgres"))
        .dbname(&check.database)
        .application_name("sluice-health-check")
        .ssl_mode(SslMode::Disable);
    if let Some(password) = &credentials.password {
        config.password(password.expose());
    }

    let (client, mut connection) = config.connect_raw(stream, NoTls).await.map_err(map_error)?;
    let messages = {
        let query = client.simple_query("SELECT pg_is_in_recovery()");
        tokio::pin!(query);
        // The connection does the socket work for the query: poll both.
        tokio::select! {
            biased;
            r = &mut query => r.map_err(map_error)?,
            r = &mut connection => {
                // It may have handed over the whole answer before it saw
                // the peer close.
                match (&mut query).now_or_never() {
                    Some(Ok(messages)) => messages,
                    _ => {
                        r.map_err(map_error)?;
                        return Err(closed_before("the query result"));
                    }
                }
            }
        }
    };
    // Dropping the client makes the connection send Terminate and finish.
    drop(client);
    let _ = connection.await;

    let mut value = None;
    for message in &messages {
        if let SimpleQueryMessage::Row(row) = message {
            value = Some(row.try_get(0).map_err(map_error)?);
        }
    }
    match value {
        Some(Some("f")) => Ok(Some(Role::Primary)),
        Some(Some("t")) => Ok(Some(Role::Replica)),
        Some(other) => Err(ProbeError::Protocol(format!(
            "unexpected pg_is_in_recovery(): {other:?}"
        ))),
        None => Err(ProbeError::Protocol(
            "pg_is_in_recovery() returned no row".to_string(),
        )),
    }
}

/// Sort a driver error into the probe's kinds.
fn map_error(e: tokio_postgres::Error) -> ProbeError {
    if let Some(db) = e.as_db_error() {
        let message = db.message().to_string();
        let code = db.code();
        return if *code == SqlState::INVALID_PASSWORD
            || *code == SqlState::INVALID_AUTHORIZATION_SPECIFICATION
        {
            ProbeError::Auth(message)
        } else {
            ProbeError::Failed(message)
        };
    }
    if e.is_closed() {
        return closed_before("the server answered");
    }
    let text = e.to_string();
    let source = e.into_source();
    let detail = source.as_ref().map(|s| s.to_string()).unwrap_or_default();
    match source.map(|s| s.downcast::<io::Error>()) {
        Some(Ok(io)) => {
            if let Some(NotPostgres(m)) = io.get_ref().and_then(|i| i.downcast_ref::<NotPostgres>())
            {
                return ProbeError::Protocol(m.clone());
            }
            match io.kind() {
                // The driver's own parse errors arrive as I/O errors too.
                io::ErrorKind::InvalidData | io::ErrorKind::InvalidInput => {
                    ProbeError::Protocol(format!("not a PostgreSQL server: {text}: {detail}"))
                }
                _ => ProbeError::Io(*io),
            }
        }
        // "password missing", an unsupported auth method: the login cannot work.
        _ if text.starts_with("authentication error")
            || text.starts_with("invalid configuration") =>
        {
            ProbeError::Auth(format!("{text}: {detail}"))
        }
        _ if detail.is_empty() => ProbeError::Protocol(format!("PostgreSQL: {text}")),
        _ => ProbeError::Protocol(format!("PostgreSQL: {text}: {detail}")),
    }
}

/// The guard's verdict, carried inside an `io::Error` through the driver.
#[derive(Debug)]
struct NotPostgres(String);

impl fmt::Display for NotPostgres {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for NotPostgres {}

/// A stream that checks backend message framing (tag byte, length) as bytes
/// are read.
pub(super) struct Guard<S> {
    inner: S,
    /// The current message's header, while it is being read.
    header: [u8; 5],
    have: usize,
    /// Body bytes of the current message still to come.
    skip: usize,
    /// The first bytes received, for the error message.
    seen: Vec<u8>,
    failed: Option<String>,
}

impl<S> Guard<S> {
    pub(super) fn new(inner: S) -> Self {
        Guard {
            inner,
            header: [0; 5],
            have: 0,
            skip: 0,
            seen: Vec::new(),
            failed: None,
        }
    }

    /// Follow the framing through `data`; the reason when it is broken.
    pub(super) fn check(&mut self, mut data: &[u8]) -> Result<(), String> {
        if let Some(reason) = &self.failed {
            return Err(reason.clone());
        }
        let keep = data.len().min(80usize.saturating_sub(self.seen.len()));
        self.seen
            .extend_from_slice(data.get(..keep).unwrap_or_default());
        while let Some((&byte, rest)) = data.split_first() {
            if self.skip > 0 {
                let n = self.skip.min(data.len());
                self.skip -= n;
                data = data.get(n..).unwrap_or_default();
                continue;
            }
            data = rest;
            if let Some(slot) = self.header.get_mut(self.have) {
                *slot = byte;
            }
            self.have += 1;
            if self.have == 1 && !is_backend_tag(byte) {
                return Err(self.fail());
            }
            if self.have == 5 {
                self.have = 0;
                let [_, a, b, c, d] = self.header;
                let len = u32::from_be_bytes([a, b, c, d]) as usize;
                if !(4..=MAX_MESSAGE).contains(&len) {
                    return Err(self.fail());
                }
                self.skip = len - 4;
            }
        }
        Ok(())
    }

    fn fail(&mut self) -> String {
        let reason = format!("not a PostgreSQL server: got {}", preview(&self.seen));
        self.failed = Some(reason.clone());
        reason
    }
}

/// Message types a backend sends.
fn is_backend_tag(tag: u8) -> bool {
    b"RKSZTDCENAI123nstGHWdcvV".contains(&tag)
}

impl<S: AsyncRead + Unpin> AsyncRead for Guard<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
        let fresh = buf.filled().get(before..).unwrap_or_default();
        match this.check(fresh) {
            Ok(()) => Poll::Ready(Ok(())),
            Err(reason) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::InvalidData,
                NotPostgres(reason),
            ))),
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Guard<S> {
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
