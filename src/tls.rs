//! TLS on listeners and to backends, with rustls.
//!
//! | file | owns |
//! | --- | --- |
//! | [`load`] | reading certificate, key and CA files into rustls configurations, with the checks that make a bad file a configuration error (unreadable, a key that does not match its certificate, an expired certificate) |
//! | [`names`] | server-name tables: exact names beat `*.` wildcards (certificates and SNI routes) |
//! | [`hello`] | reading a ClientHello without consuming it (`tls: passthrough`), with `tls-parser` |
//! | [`front`] | one client of a TLS listener: handshake or peek within `handshake_timeout`, the pool its name routes to, counting every outcome |
//! | [`upstream`] | the TLS handshake to a backend after its TCP connect |
//!
//! # Crypto provider
//!
//! rustls with its `aws-lc-rs` provider: AWS-LC carries the assembly of
//! BoringSSL/OpenSSL for P-256, RSA and AES-GCM, so handshakes and bulk
//! encryption cost about what they cost HAProxy and NGINX on OpenSSL, where
//! `ring` signs RSA noticeably slower. Its C build needs only a C compiler
//! and `cmake`, which pingora's zlib-ng build already needs. pingora's own
//! TLS feature stays off: it would size every accepted connection's task for
//! a handshake, plain listeners included (see Cargo.toml); TLS connections
//! here are served by tokio-rustls on sluice's own tasks, and plain ones never
//! touch this module.

pub mod front;
pub mod hello;
pub mod load;
pub mod names;
pub mod upstream;

use std::sync::Arc;

use rustls::crypto::CryptoProvider;

/// The crypto provider of every TLS configuration sluice builds.
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: std::sync::OnceLock<Arc<CryptoProvider>> = std::sync::OnceLock::new();
    Arc::clone(PROVIDER.get_or_init(|| Arc::new(rustls::crypto::aws_lc_rs::default_provider())))
}

/// Show the expiry of every certificate `config` presents in
/// `sluice_tls_certificate_expiry_timestamp_seconds` (and only those).
pub fn publish_expiry(metrics: &crate::metrics::Metrics, config: &crate::config::Config) {
    use crate::config::TlsMode;
    use crate::metrics::CertificateExpiry;
    let mut out = Vec::new();
    for l in &config.listeners {
        if let Some(TlsMode::Terminate(server)) = l.tls.as_ref().map(|t| &t.mode) {
            for c in &server.certificates {
                out.push(CertificateExpiry {
                    scope: "listener",
                    name: l.name.clone(),
                    file: c.cert_file.clone(),
                    not_after: c.not_after,
                });
            }
        }
    }
    for p in &config.pools {
        if let Some(c) = p.tls.as_ref().and_then(|t| t.certificate.as_ref()) {
            out.push(CertificateExpiry {
                scope: "pool",
                name: p.name.clone(),
                file: c.cert_file.clone(),
                not_after: c.not_after,
            });
        }
    }
    metrics.set_certificate_expiry(&out);
}
