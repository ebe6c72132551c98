//! Certificate, key and CA files into rustls configurations.
//!
//! Everything here runs while a configuration is decoded (start-up, `-t`
//! and every reload), so a file that cannot serve is a configuration error
//! naming the file, and a reload with one changes nothing: a file that
//! cannot be read or holds no PEM certificate, a key that is not a private
//! key or does not match its certificate, a certificate past its
//! `notAfter`. The caller reads the files (bounded, regular files only) and
//! hands their text here.
//!
//! Private keys are handed to the provider at once and kept only inside
//! rustls' signing keys, which print nothing of them; no type here keeps or
//! shows the key's bytes.

use std::fmt;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};

use super::names::NameTable;

/// Why a TLS file cannot be used. Each names the file.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// No usable PEM block.
    #[error("`{file}` holds no PEM {what}")]
    Missing {
        /// The file.
        file: String,
        /// What was looked for.
        what: &'static str,
    },
    /// A PEM block that does not parse, or a key the provider refuses.
    #[error("`{file}`: {reason}")]
    Invalid {
        /// The file.
        file: String,
        /// Why.
        reason: String,
    },
    /// The private key belongs to another certificate.
    #[error("the key in `{key}` does not match the certificate in `{cert}`")]
    Mismatch {
        /// The certificate file.
        cert: String,
        /// The key file.
        key: String,
    },
    /// The certificate's validity has ended.
    #[error("the certificate in `{file}` expired on {when}")]
    Expired {
        /// The certificate file.
        file: String,
        /// Its `notAfter`, as RFC 3339.
        when: String,
    },
}

/// A certificate chain with its private key, ready to be served.
#[derive(Clone)]
pub struct Certified {
    /// The chain's file.
    pub cert_file: String,
    /// The key's file (its name only; the key lives in `key`).
    pub key_file: String,
    /// What rustls serves.
    pub key: Arc<CertifiedKey>,
    /// The private key as read (DER), for pingora's connector in HTTP mode
    /// (a pool's client certificate). Never printed.
    pub key_der: Arc<PrivateKeyDer<'static>>,
    /// The DNS names of the leaf (subjectAltName, else its common name).
    pub names: Vec<String>,
    /// The leaf's `notAfter`, as a Unix time.
    pub not_after: i64,
}

impl fmt::Debug for Certified {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Certified")
            .field("cert_file", &self.cert_file)
            .field("key_file", &self.key_file)
            .field("names", &self.names)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

/// Now, as a Unix time.
pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// Every certificate in the PEM text of `file`.
pub fn certificates(file: &str, pem: &str) -> Result<Vec<CertificateDer<'static>>, LoadError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| LoadError::Invalid {
            file: file.to_string(),
            reason: format!("not valid PEM: {e}"),
        })?;
    if certs.is_empty() {
        return Err(LoadError::Missing {
            file: file.to_string(),
            what: "certificate",
        });
    }
    Ok(certs)
}

/// The chain in `cert_pem` with the key in `key_pem`: the key must be a
/// private key the provider takes and match the leaf, and the leaf must not
/// have expired at `now`.
pub fn certified(
    cert_file: &str,
    cert_pem: &str,
    key_file: &str,
    key_pem: &str,
    now: i64,
) -> Result<Certified, LoadError> {
    let chain = certificates(cert_file, cert_pem)?;
    let (names, not_after) = leaf_facts(cert_file, &chain[0])?;
    if not_after < now {
        return Err(LoadError::Expired {
            file: cert_file.to_string(),
            when: rfc3339(not_after),
        });
    }
    // The error of the PEM reader names no key material.
    let der = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => LoadError::Missing {
            file: key_file.to_string(),
            what: "private key",
        },
        e => LoadError::Invalid {
            file: key_file.to_string(),
            reason: format!("not a valid PEM private key: {e}"),
        },
    })?;
    let key_der = Arc::new(der.clone_key());
    let signing = super::provider()
        .key_provider
        .load_private_key(der)
        .map_err(|e| LoadError::Invalid {
            file: key_file.to_string(),
            reason: format!("unusable private key: {e}"),
        })?;
    let key = CertifiedKey::new(chain, signing);
    key.keys_match().map_err(|_| LoadError::Mismatch {
        cert: cert_file.to_string(),
        key: key_file.to_string(),
    })?;
    Ok(Certified {
        cert_file: cert_file.to_string(),
        key_file: key_file.to_string(),
        key: Arc::new(key),
        key_der,
        names,
        not_after,
    })
}

/// The DNS names and `notAfter` of a leaf certificate.
fn leaf_facts(file: &str, der: &CertificateDer<'_>) -> Result<(Vec<String>, i64), LoadError> {
    let (_, cert) =
        x509_parser::parse_x509_certificate(der.as_ref()).map_err(|e| LoadError::Invalid {
            file: file.to_string(),
            reason: format!("not an X.509 certificate: {e}"),
        })?;
    let mut names = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::DNSName(n) = name {
                names.push(n.to_string());
            }
        }
    }
    if names.is_empty() {
        names.extend(
            cert.subject()
                .iter_common_name()
                .filter_map(|cn| cn.as_str().ok())
                .map(str::to_string),
        );
    }
    Ok((names, cert.validity().not_after.timestamp()))
}

/// A Unix time as RFC 3339, UTC.
pub fn rfc3339(t: i64) -> String {
    let at = std::time::UNIX_EPOCH + std::time::Duration::from_secs(t.max(0) as u64);
    humantime::format_rfc3339_seconds(at).to_string()
}

/// Trust anchors from the certificates in `pem`.
pub fn roots(file: &str, pem: &str) -> Result<RootCertStore, LoadError> {
    let mut store = RootCertStore::empty();
    for cert in certificates(file, pem)? {
        store.add(cert).map_err(|e| LoadError::Invalid {
            file: file.to_string(),
            reason: format!("not a usable CA certificate: {e}"),
        })?;
    }
    Ok(store)
}

/// The system's trust anchors (`/etc/ssl/certs` and the like).
pub fn system_roots() -> Result<RootCertStore, String> {
    let found = rustls_native_certs::load_native_certs();
    let mut store = RootCertStore::empty();
    let (added, _) = store.add_parsable_certificates(found.certs);
    if added == 0 {
        let why = found
            .errors
            .first()
            .map_or_else(|| "none found".to_string(), ToString::to_string);
        return Err(format!("no system CA certificates could be loaded ({why})"));
    }
    Ok(store)
}

/// The TLS versions from `min_tls13` on.
fn versions(min_tls13: bool) -> &'static [&'static rustls::SupportedProtocolVersion] {
    static TLS13_ONLY: [&rustls::SupportedProtocolVersion; 1] = [&rustls::version::TLS13];
    static BOTH: [&rustls::SupportedProtocolVersion; 2] =
        [&rustls::version::TLS13, &rustls::version::TLS12];
    if min_tls13 { &TLS13_ONLY } else { &BOTH }
}

/// The server side of a terminating listener.
pub struct ServerSpec<'a> {
    /// Served by name; the first one also to clients whose name matches none.
    pub certificates: &'a [Certified],
    /// ALPN protocols, in preference order.
    pub alpn: &'a [String],
    /// Refuse TLS 1.2.
    pub min_tls13: bool,
    /// CAs client certificates must chain to, with whether one is required.
    pub client_ca: Option<(RootCertStore, bool)>,
}

/// A rustls server configuration for `spec`.
pub fn server_config(spec: &ServerSpec<'_>) -> Result<Arc<ServerConfig>, String> {
    let provider = super::provider();
    let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(versions(spec.min_tls13))
        .map_err(|e| e.to_string())?;
    let verifier = match &spec.client_ca {
        None => WebPkiClientVerifier::no_client_auth(),
        Some((roots, required)) => {
            let b = WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots.clone()),
                Arc::clone(&provider),
            );
            let b = if *required {
                b
            } else {
                b.allow_unauthenticated()
            };
            b.build().map_err(|e| format!("client_ca: {e}"))?
        }
    };
    let Some(default) = spec.certificates.first() else {
        return Err("no certificate".to_string());
    };
    let mut by_name = NameTable::default();
    for c in spec.certificates {
        for name in &c.names {
            // A name two certificates share goes to the first.
            by_name.insert(name, Arc::clone(&c.key));
        }
    }
    let mut config = builder
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(ByName {
            by_name,
            default: Arc::clone(&default.key),
        }));
    config.alpn_protocols = spec.alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    // Stateless resumption: a returning client skips the full handshake,
    // and the server keeps nothing per session.
    config.ticketer = rustls::crypto::aws_lc_rs::Ticketer::new().map_err(|e| e.to_string())?;
    Ok(Arc::new(config))
}

/// Picks the certificate for the client's server name.
struct ByName {
    by_name: NameTable<Arc<CertifiedKey>>,
    default: Arc<CertifiedKey>,
}

impl fmt::Debug for ByName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ByName")
    }
}

impl ResolvesServerCert for ByName {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let chosen = hello
            .server_name()
            .and_then(|n| self.by_name.get(n))
            .unwrap_or(&self.default);
        Some(Arc::clone(chosen))
    }
}

/// The client side of a pool's TLS.
pub struct ClientSpec {
    /// Trust anchors; `None` with `verify` off.
    pub roots: Option<RootCertStore>,
    /// Verify the backend's certificate and name.
    pub verify: bool,
    /// A certificate to present (mTLS).
    pub certificate: Option<Certified>,
    /// ALPN protocols to offer.
    pub alpn: Vec<String>,
    /// Refuse TLS 1.2.
    pub min_tls13: bool,
}

/// A rustls client configuration for `spec`.
pub fn client_config(spec: ClientSpec) -> Result<Arc<ClientConfig>, String> {
    let provider = super::provider();
    let builder = ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(versions(spec.min_tls13))
        .map_err(|e| e.to_string())?;
    let builder = match (spec.verify, spec.roots) {
        (true, Some(roots)) => builder.with_root_certificates(roots),
        (true, None) => return Err("no trust anchors".to_string()),
        (false, _) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerification(provider))),
    };
    let mut config = match spec.certificate {
        Some(c) => builder.with_client_cert_resolver(Arc::new(ClientCertificate(c.key))),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = spec.alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    Ok(Arc::new(config))
}

/// The certificate a pool presents to its backends.
struct ClientCertificate(Arc<CertifiedKey>);

impl fmt::Debug for ClientCertificate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ClientCertificate")
    }
}

impl rustls::client::ResolvesClientCert for ClientCertificate {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(&self.0))
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// `insecure_skip_verify`: any certificate for any name is taken, but the
/// handshake's signatures are still checked against the one presented.
#[derive(Debug)]
struct NoVerification(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
