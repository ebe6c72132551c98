//! TLS to a backend: the handshake after the TCP connect, and the
//! connection it gives (TCP mode); what pingora's connector needs for the
//! same pool in HTTP mode ([`HttpTls`]).

use std::io;
use std::sync::Arc;
use std::time::Duration;

use rustls::ClientConfig;
use rustls::pki_types::ServerName;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use pingora::protocols::tls::CaType;
use pingora::utils::tls::{CertKey, WrappedX509, parse_x509};
use rustls::pki_types::CertificateDer;

use crate::config::{HostPort, PoolSettings};
use crate::relay::Socket;
use crate::relay::stream::{Io, TcpIo};
use crate::tls::load::Certified;

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

/// A pool's TLS as pingora's connector takes it (HTTP mode): the CA
/// certificates of the pool's `ca` file and its client certificate, parsed
/// once when the configuration is read. pingora builds the rustls client
/// from these for each new backend connection.
pub struct HttpTls {
    /// A digest of the certificates: backend connections made under other
    /// ones (before a reload that changed the files) are not reused.
    pub id: u64,
    /// The trust anchors; `None`: the system's (or no verification).
    pub ca: Option<Arc<CaType>>,
    /// The certificate and key presented to backends (mTLS).
    pub cert_key: Option<Arc<CertKey>>,
    /// Why pingora cannot take these files (then `ca` and `cert_key` are
    /// empty): a problem only for pools that HTTP listeners use.
    pub unusable: Option<String>,
}

/// The CA list and the client certificate, as pingora takes them.
type Parsed = (Option<Arc<CaType>>, Option<Arc<CertKey>>);

impl HttpTls {
    /// From the CA certificates `ca` (empty: the system's) and the client
    /// certificate, both already taken by rustls as they were loaded. A
    /// certificate pingora's X.509 parser cannot read, or a key ring cannot
    /// sign with (pingora would panic or fail on them), makes it `unusable`.
    pub fn new(ca: &[CertificateDer<'static>], certificate: Option<&Certified>) -> HttpTls {
        let id = {
            use std::hash::{Hash, Hasher};
            let mut h = std::collections::hash_map::DefaultHasher::new();
            ca.hash(&mut h);
            // The key matches the leaf, so the chain stands for both.
            certificate.map(|c| &c.key.cert).hash(&mut h);
            h.finish()
        };
        match Self::parse(ca, certificate) {
            Ok((ca, cert_key)) => HttpTls {
                id,
                ca,
                cert_key,
                unusable: None,
            },
            Err(why) => HttpTls {
                id,
                ca: None,
                cert_key: None,
                unusable: Some(why),
            },
        }
    }

    fn parse(
        ca: &[CertificateDer<'static>],
        certificate: Option<&Certified>,
    ) -> Result<Parsed, String> {
        let parsed = |what: &str, der: &[u8]| -> Result<WrappedX509, String> {
            x509_parser::parse_x509_certificate(der)
                .map_err(|e| format!("{what} is not an X.509 certificate pingora can read: {e}"))?;
            Ok(WrappedX509::new(der.to_vec(), parse_x509))
        };
        let ca = if ca.is_empty() {
            None
        } else {
            let certs = ca
                .iter()
                .map(|c| parsed("a CA certificate", c))
                .collect::<Result<Vec<_>, _>>()?;
            Some(Arc::<CaType>::from(certs.into_boxed_slice()))
        };
        let cert_key = match certificate {
            None => None,
            Some(c) => {
                for der in c.key.cert.iter() {
                    parsed(&format!("a certificate of {}", c.cert_file), der)?;
                }
                // pingora reads the key's format from its DER and signs with
                // ring: a key either cannot take would fail (or panic) there.
                let der = c.key_der.secret_der();
                let key = rustls::pki_types::PrivateKeyDer::try_from(der.to_vec())
                    .map_err(|e| format!("the key of {}: {e}", c.cert_file))?;
                rustls::crypto::ring::default_provider()
                    .key_provider
                    .load_private_key(key)
                    .map_err(|e| {
                        format!(
                            "the key of {} cannot sign for HTTP mode's TLS (ring): {e}",
                            c.cert_file
                        )
                    })?;
                let chain = c.key.cert.iter().map(|der| der.to_vec()).collect();
                Some(Arc::new(CertKey::new(
                    chain,
                    c.key_der.secret_der().to_vec(),
                )))
            }
        };
        Ok((ca, cert_key))
    }
}

impl std::fmt::Debug for HttpTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The key stays out: only whether there is one.
        f.debug_struct("HttpTls")
            .field("ca_certificates", &self.ca.as_ref().map_or(0, |c| c.len()))
            .field("client_certificate", &self.cert_key.is_some())
            .finish()
    }
}
