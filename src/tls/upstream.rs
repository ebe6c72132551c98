//! TLS to a backend: the handshake after the TCP connect, and the
//! connection it gives.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use rustls::ClientConfig;
use rustls::pki_types::ServerName;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use crate::config::{HostPort, PoolSettings};
use crate::relay::Socket;
use crate::relay::stream::{Io, TcpIo};

/// Most encrypted bytes rustls queues for a slow peer (its default is
/// 64 KiB); the relay holds back the rest.
pub const BUFFER_LIMIT: usize = 32 * 1024;

/// The connection to a backend.
pub enum Upstream {
    /// Plain TCP.
    Plain(Socket),
    /// TLS over TCP.
    Tls(Box<TlsStream<TcpIo>>),
}

impl Upstream {
    /// The TCP socket underneath.
    pub fn socket(&self) -> &Socket {
        match self {
            Upstream::Plain(s) => s,
            Upstream::Tls(t) => t.get_ref().0.socket(),
        }
    }

    /// The connection as one side of a relay.
    pub fn io(&mut self) -> Io<'_> {
        match self {
            Upstream::Plain(s) => Io::Tcp(s),
            Upstream::Tls(t) => Io::Stream(&mut **t),
        }
    }
}

/// A pool's TLS, as its connects need it.
#[derive(Clone)]
pub struct Dial {
    config: Arc<ClientConfig>,
    sni: Option<String>,
}

impl Dial {
    /// The TLS of the pool `settings`, if it has any.
    pub fn of(settings: &PoolSettings) -> Option<Dial> {
        settings.tls.as_ref().map(|t| Dial {
            config: Arc::clone(&t.config),
            sni: t.sni.clone(),
        })
    }
}

/// The connection to `backend` on `socket`: plain without `dial`, else
/// after a TLS handshake within `timeout` (as `sni`, or the backend's host).
pub async fn establish(
    socket: Socket,
    dial: Option<&Dial>,
    backend: &HostPort,
    timeout: Duration,
) -> io::Result<Upstream> {
    let Some(dial) = dial else {
        return Ok(Upstream::Plain(socket));
    };
    let host = dial.sni.as_deref().unwrap_or(backend.host());
    let name = ServerName::try_from(host.to_string()).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("`{host}` is not a TLS server name ({e}); set the pool's tls.sni"),
        )
    })?;
    handshake(socket, Arc::clone(&dial.config), name, timeout).await
}

/// Handshake with the backend on `socket` as `name`, within `timeout`.
pub async fn handshake(
    socket: Socket,
    config: Arc<ClientConfig>,
    name: ServerName<'static>,
    timeout: Duration,
) -> io::Result<Upstream> {
    let connect = TlsConnector::from(config).connect_with(name, TcpIo(socket), |c| {
        c.set_buffer_limit(Some(BUFFER_LIMIT));
    });
    match tokio::time::timeout(timeout, connect).await {
        Ok(Ok(stream)) => Ok(Upstream::Tls(Box::new(stream))),
        Ok(Err(e)) => Err(describe(e)),
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "TLS handshake timed out",
        )),
    }
}

/// The handshake error with what went wrong said plainly.
pub fn describe(e: io::Error) -> io::Error {
    let text = match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
        Some(rustls::Error::InvalidCertificate(c)) => {
            format!("TLS handshake failed: the backend's certificate is not trusted ({c:?})")
        }
        Some(rustls::Error::AlertReceived(a)) => {
            format!("TLS handshake failed: the backend refused it ({a:?})")
        }
        Some(other) => format!("TLS handshake failed: {other}"),
        None if e.kind() == io::ErrorKind::UnexpectedEof => {
            "TLS handshake failed: the backend closed the connection".to_string()
        }
        None => format!("TLS handshake failed: {e}"),
    };
    io::Error::new(e.kind(), text)
}
