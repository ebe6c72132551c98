//! The `postgres` check: log in with `tokio-postgres` over a socket of our
//! own, then `SELECT pg_is_in_recovery()` for the role.
//!
//! The driver's `Connection` is polled inside the probe's own future, never
//! spawned, so dropping the probe closes everything; its notices are
//! dropped, not logged (their text is the peer's). Reads pass through
//! [`Guard`], which checks the framing of backend messages before the driver
//! sees them: the driver reserves whatever length a peer announces, so a
//! non-PostgreSQL peer could otherwise make it allocate gigabytes. Under the
//! guard, the check's read budget bounds the total.
//!
//! The guard also decides which password exchanges the driver may answer:
//! never cleartext (`AuthenticationCleartextPassword` would hand the monitor
//! password to whoever sits at the backend's address), MD5 only with
//! `allow_md5` (its answer can be replayed through a relay and cracked
//! offline); SCRAM and trust always.

use std::fmt;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use futures::FutureExt;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::config::SslMode;
use tokio_postgres::error::SqlState;
use tokio_postgres::{Connection, NoTls, SimpleQueryMessage};

use super::{Budget, OverBudget, ProbeError, Role, Target, closed_before, connect, preview};
use crate::config::PostgresCheck;

/// Largest backend message accepted.
const MAX_MESSAGE: usize = 1024 * 1024;

/// Most backend messages one check reads. A login and the query take about
/// twenty; the driver keeps each row, notice and parameter it is sent as a
/// parsed object many times the size of a tiny message, so the byte budget
/// alone would let a peer make it hold 17 times that budget.
const MAX_MESSAGES: usize = 1000;

/// Authentication request codes (the first field of an `R` message).
const AUTH_CLEARTEXT: u32 = 3;
const AUTH_MD5: u32 = 5;

/// Log in, ask whether the server is in recovery, and terminate.
pub(super) async fn probe(
    check: &PostgresCheck,
    addr: Target<'_>,
    budget: &Budget,
) -> Result<Option<Role>, ProbeError> {
    let mut stream = Guard::new(connect(addr, budget).await?);
    stream.allow_md5 = check.allow_md5;
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
    let mut ended = false;
    let messages = {
        let query = client.simple_query("SELECT pg_is_in_recovery()");
        tokio::pin!(query);
        // The connection does the socket work for the query: poll both.
        tokio::select! {
            biased;
            r = &mut query => r.map_err(map_error)?,
            r = drive(&mut connection) => {
                ended = true;
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
    if !ended {
        let _ = drive(&mut connection).await;
    }

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

/// Run the connection until it ends, dropping notices and notifications:
/// the driver's own loop (its `Future`) would log every notice at info level,
/// with whatever text the peer chose.
async fn drive<S, T>(connection: &mut Connection<S, T>) -> Result<(), tokio_postgres::Error>
where
    S: AsyncRead + AsyncWrite + Unpin,
    T: AsyncRead + AsyncWrite + Unpin,
{
    futures::future::poll_fn(|cx| {
        loop {
            match ready!(connection.poll_message(cx)) {
                Some(Ok(_)) => {}
                Some(Err(e)) => return Poll::Ready(Err(e)),
                None => return Poll::Ready(Ok(())),
            }
        }
    })
    .await
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
            let inner = io.get_ref();
            match inner.and_then(|i| i.downcast_ref::<Refusal>()) {
                Some(Refusal::NotPostgres(m)) => return ProbeError::Protocol(m.clone()),
                Some(Refusal::Auth(m)) => return ProbeError::Auth(m.clone()),
                None => {}
            }
            if let Some(OverBudget(limit)) = inner.and_then(|i| i.downcast_ref::<OverBudget>()) {
                return ProbeError::TooMuch(*limit);
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
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Refusal {
    /// The bytes are not PostgreSQL's framing.
    NotPostgres(String),
    /// The server asks for a password exchange the check does not answer.
    Auth(String),
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::NotPostgres(m) | Refusal::Auth(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for Refusal {}

/// A stream that checks backend message framing (tag byte, length) and
/// authentication requests as bytes are read, before the driver sees them.
pub(super) struct Guard<S> {
    inner: S,
    /// Whether an MD5 password exchange may be answered.
    pub(super) allow_md5: bool,
    /// The current message's header and, for an authentication request,
    /// its code, while they are being read.
    header: [u8; 9],
    have: usize,
    /// How many bytes of `header` this message has (5, or 9 for `R`).
    want: usize,
    /// Body bytes of the current message still to come.
    skip: usize,
    /// Messages begun so far.
    messages: usize,
    /// The first bytes received, for the error message.
    seen: Vec<u8>,
    failed: Option<Refusal>,
}

impl<S> Guard<S> {
    pub(super) fn new(inner: S) -> Self {
        Guard {
            inner,
            allow_md5: false,
            header: [0; 9],
            have: 0,
            want: 5,
            skip: 0,
            messages: 0,
            seen: Vec::new(),
            failed: None,
        }
    }

    /// Follow the framing through `data`; the reason when it is broken or
    /// asks for a password exchange that is refused. A refused request is
    /// caught by its last byte, so the driver never holds it whole.
    pub(super) fn check(&mut self, mut data: &[u8]) -> Result<(), Refusal> {
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
            if self.have == 1 {
                if !is_backend_tag(byte) {
                    return Err(self.not_postgres());
                }
                self.messages += 1;
                if self.messages > MAX_MESSAGES {
                    let reason = Refusal::NotPostgres(format!(
                        "PostgreSQL: more than {MAX_MESSAGES} messages in one check; connection dropped"
                    ));
                    self.failed = Some(reason.clone());
                    return Err(reason);
                }
            }
            let [tag, a, b, c, d, e, f, g, h] = self.header;
            let len = u32::from_be_bytes([a, b, c, d]) as usize;
            if self.have == 5 {
                if !(4..=MAX_MESSAGE).contains(&len) {
                    return Err(self.not_postgres());
                }
                // An authentication request: read its code too.
                self.want = if tag == b'R' && len >= 8 { 9 } else { 5 };
            }
            if self.have == self.want {
                if self.want == 9 {
                    self.refuse(u32::from_be_bytes([e, f, g, h]))?;
                }
                self.skip = len + 1 - self.have;
                self.have = 0;
                self.want = 5;
            }
        }
        Ok(())
    }

    /// Refuse authentication request `code` when the check must not answer it.
    fn refuse(&mut self, code: u32) -> Result<(), Refusal> {
        let reason = match code {
            AUTH_CLEARTEXT => {
                "the server asks for the password in cleartext; sluice never sends it \
                 (use scram-sha-256 for the monitoring user)"
            }
            AUTH_MD5 if !self.allow_md5 => {
                "the server asks for an MD5 password hash, refused by default \
                 (use scram-sha-256, or set allow_md5: true on this check)"
            }
            _ => return Ok(()),
        };
        let refusal = Refusal::Auth(reason.to_string());
        self.failed = Some(refusal.clone());
        Err(refusal)
    }

    fn not_postgres(&mut self) -> Refusal {
        let reason = Refusal::NotPostgres(format!(
            "not a PostgreSQL server: got {}",
            preview(&self.seen)
        ));
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
            Err(reason) => Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, reason))),
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
