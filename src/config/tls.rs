//! The TLS keys: a listener's `tls`, `routes` and `default_pool`, and a
//! pool's `tls`.
//!
//! Certificate, key and CA files are read and checked here, while the file
//! is decoded ([`crate::tls::load`]): at start-up, by `-t` and on every
//! reload. So a file that cannot be read, a key that does not match its
//! certificate or an expired certificate is a problem at the key that names
//! the file, and a reload with one changes nothing. The decoded settings
//! hold the ready rustls configuration; two of them compare equal when
//! their keys are equal and their files hold the same certificates, so a
//! reload after a certificate was renewed applies it to new connections.

use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::ServerName;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use serde_yaml::Value;

use super::decode::{Decoder, Fields, kind};
use super::{ListenerSettings, PoolSettings};
use crate::tls::load::{self, Certified, ClientSpec, LoadError, ServerSpec};
use crate::tls::names;

/// The largest certificate, key or CA file read (a CA bundle of every
/// public root is about 200 KB).
pub const MAX_PEM_BYTES: u64 = 1 << 20;
/// Default `handshake_timeout`.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest `handshake_timeout`.
pub const MAX_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(300);
/// The most certificates one listener serves, and routes it has.
const MAX_ENTRIES: usize = 4096;

/// A listener's TLS: what it does with the client's TLS and where names go.
#[derive(Clone, Debug, PartialEq)]
pub struct ListenerTls {
    /// Terminate, or pass through.
    pub mode: TlsMode,
    /// A client that has not finished its handshake (or, passed through,
    /// sent its ClientHello) in this long is closed.
    pub handshake_timeout: Duration,
    /// Server names to pools, in file order.
    pub routes: Vec<Route>,
    /// Where names no route takes go; without it they are refused.
    pub default_pool: Option<String>,
}

/// What a TLS listener does with the client's TLS.
#[derive(Clone, Debug, PartialEq)]
pub enum TlsMode {
    /// Handshake here; the pool gets the decrypted stream.
    Terminate(Box<ServerTls>),
    /// Read the ClientHello's server name, then relay the bytes untouched.
    Passthrough,
}

/// One `routes` entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    /// A server name, or `*.` and a name.
    pub sni: String,
    /// The pool it goes to.
    pub pool: String,
}

/// The lowest TLS version allowed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum TlsVersion {
    /// TLS 1.2 and 1.3.
    #[default]
    Tls12,
    /// TLS 1.3 only.
    Tls13,
}

/// Whether clients must present a certificate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientAuth {
    /// A client may present one; one it presents must verify.
    Optional,
    /// A client without a valid certificate is refused.
    Required,
}

/// A terminating listener's certificates and settings.
#[derive(Clone)]
pub struct ServerTls {
    /// Certificates, the first served to names that match none.
    pub certificates: Vec<Certified>,
    /// ALPN protocols offered, in preference order.
    pub alpn: Vec<String>,
    /// The lowest version allowed.
    pub min_version: TlsVersion,
    /// The CA file client certificates are verified against.
    pub client_ca: Option<String>,
    /// With `client_ca`: whether a certificate is required.
    pub client_auth: Option<ClientAuth>,
    /// What rustls serves.
    pub config: Arc<ServerConfig>,
    /// Every certificate read (chains and CA), to tell a renewed file.
    material: Vec<Vec<u8>>,
}

impl PartialEq for ServerTls {
    fn eq(&self, o: &Self) -> bool {
        let files = |s: &ServerTls| {
            s.certificates
                .iter()
                .map(|c| (c.cert_file.clone(), c.key_file.clone()))
                .collect::<Vec<_>>()
        };
        files(self) == files(o)
            && self.alpn == o.alpn
            && self.min_version == o.min_version
            && self.client_ca == o.client_ca
            && self.client_auth == o.client_auth
            && self.material == o.material
    }
}

impl fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerTls")
            .field("certificates", &self.certificates)
            .field("alpn", &self.alpn)
            .field("min_version", &self.min_version)
            .field("client_ca", &self.client_ca)
            .field("client_auth", &self.client_auth)
            .finish_non_exhaustive()
    }
}

/// A pool's TLS to its backends.
#[derive(Clone)]
pub struct BackendTls {
    /// The CA file backends' certificates must chain to; `None`: the system's.
    pub ca: Option<String>,
    /// The name sent and verified; `None`: each backend's host.
    pub sni: Option<String>,
    /// Whether the backend's certificate and name are verified.
    pub verify: bool,
    /// The certificate presented to backends (mTLS).
    pub certificate: Option<Certified>,
    /// ALPN protocols offered.
    pub alpn: Vec<String>,
    /// The lowest version allowed.
    pub min_version: TlsVersion,
    /// What rustls connects with.
    pub config: Arc<ClientConfig>,
    /// The same for pingora's connector (HTTP mode).
    pub http: Arc<crate::tls::upstream::HttpTls>,
    material: Vec<Vec<u8>>,
}

impl PartialEq for BackendTls {
    fn eq(&self, o: &Self) -> bool {
        let files = |s: &BackendTls| {
            s.certificate
                .as_ref()
                .map(|c| (c.cert_file.clone(), c.key_file.clone()))
        };
        self.ca == o.ca
            && self.sni == o.sni
            && self.verify == o.verify
            && files(self) == files(o)
            && self.alpn == o.alpn
            && self.min_version == o.min_version
            && self.material == o.material
    }
}

impl fmt::Debug for BackendTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BackendTls")
            .field("ca", &self.ca)
            .field("sni", &self.sni)
            .field("verify", &self.verify)
            .field("certificate", &self.certificate)
            .field("alpn", &self.alpn)
            .field("min_version", &self.min_version)
            .finish_non_exhaustive()
    }
}

impl BackendTls {
    /// The server name for a backend whose configured host is `host`:
    /// `sni` when set, else the host (an IP literal is verified as an IP).
    pub fn server_name(&self, host: &str) -> Option<ServerName<'static>> {
        let name = self.sni.as_deref().unwrap_or(host);
        ServerName::try_from(name.to_string()).ok()
    }
}

impl ListenerTls {
    /// Every pool this listener may forward to, beside its `pool`.
    pub fn pools(&self) -> impl Iterator<Item = &str> {
        self.routes
            .iter()
            .map(|r| r.pool.as_str())
            .chain(self.default_pool.as_deref())
    }
}

/// The text of `file`, bounded; a problem at `path` otherwise.
fn read(d: &mut Decoder, file: &str, path: &str) -> Option<String> {
    match super::read::read_bounded(Path::new(file), MAX_PEM_BYTES) {
        Ok(text) => Some(text),
        Err(e) => {
            d.problem(path, format!("cannot read `{file}`: {e}"));
            None
        }
    }
}

/// A non-empty file name at `key`.
fn file_name<'v>(d: &mut Decoder, f: &Fields<'v>, key: &str) -> Option<&'v str> {
    let v = f.get(key)?;
    let s = d.string(v, &f.path(key))?;
    if s.is_empty() {
        d.problem(f.path(key), "must not be empty");
        return None;
    }
    Some(s)
}

/// A certificate and its key, from the `cert` and `key` keys of `f`.
fn certified(d: &mut Decoder, f: &Fields<'_>, now: i64) -> Option<Certified> {
    let cert = file_name(d, f, "cert");
    let key = file_name(d, f, "key");
    let (cert, key) = match (cert, key) {
        (Some(c), Some(k)) => (c, k),
        (None, None) if f.get("cert").is_none() && f.get("key").is_none() => {
            d.problem(f.path("cert"), "is required, with key");
            return None;
        }
        (c, k) => {
            if c.is_none() && f.get("cert").is_none() {
                d.problem(f.path("cert"), "is required with key");
            }
            if k.is_none() && f.get("key").is_none() {
                d.problem(f.path("key"), "is required with cert");
            }
            return None;
        }
    };
    let cert_pem = read(d, cert, &f.path("cert"))?;
    let key_pem = read(d, key, &f.path("key"))?;
    match load::certified(cert, &cert_pem, key, &key_pem, now) {
        Ok(c) => Some(c),
        Err(e) => {
            let at = match e {
                LoadError::Invalid { ref file, .. } | LoadError::Missing { ref file, .. }
                    if file == key =>
                {
                    "key"
                }
                _ => "cert",
            };
            d.problem(f.path(at), e.to_string());
            None
        }
    }
}

/// `alpn`: a list of protocol names.
fn alpn(d: &mut Decoder, f: &Fields<'_>) -> Vec<String> {
    let Some(v) = f.get("alpn") else {
        return Vec::new();
    };
    let path = f.path("alpn");
    let Value::Sequence(items) = v else {
        d.problem(
            &path,
            format!("must be a list like [h2, http/1.1], found {}", kind(v)),
        );
        return Vec::new();
    };
    let mut out = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let p = format!("{path}[{i}]");
        if let Some(s) = d.string(item, &p) {
            if s.is_empty() || s.len() > 255 {
                d.problem(&p, "must be 1 to 255 bytes");
            } else {
                out.push(s.to_string());
            }
        }
    }
    out
}

/// `min_version`: `1.2` or `1.3` (a number or a string).
fn min_version(d: &mut Decoder, f: &Fields<'_>) -> TlsVersion {
    let Some(v) = f.get("min_version") else {
        return TlsVersion::default();
    };
    let text = match v {
        Value::Number(n) => n.to_string(),
        Value::String(s) => s.clone(),
        other => format!("<{}>", kind(other)),
    };
    match text.as_str() {
        "1.2" => TlsVersion::Tls12,
        "1.3" => TlsVersion::Tls13,
        _ => {
            d.problem(
                f.path("min_version"),
                format!("`{text}` is not a TLS version sluice allows: 1.2 or 1.3"),
            );
            TlsVersion::default()
        }
    }
}

/// Decode a listener's `tls`, `routes` and `default_pool`; `None` when it
/// has no `tls` (or it is invalid: the problems are recorded).
pub(super) fn decode_listener(d: &mut Decoder, f: &Fields<'_>) -> Option<ListenerTls> {
    let before = d.problems.len();
    let routes = decode_routes(d, f);
    let default_pool = f
        .get("default_pool")
        .and_then(|v| d.string(v, &f.path("default_pool")))
        .map(str::to_string);
    if routes.is_none() && f.get("default_pool").is_some() {
        d.problem(f.path("default_pool"), "only applies with routes");
    }
    if routes.is_some() && f.get("pool").is_some() {
        d.problem(
            f.path("pool"),
            "with routes, the pool for names no route takes is default_pool",
        );
    }
    let Some(v) = f.get("tls") else {
        if f.get("routes").is_some() {
            d.problem(
                f.path("routes"),
                "routes choose by the TLS server name: they need tls (terminate or passthrough)",
            );
        }
        return None;
    };
    let path = f.path("tls");
    let (mode, handshake_timeout) = match v {
        Value::String(s) if s == "passthrough" => (Some(TlsMode::Passthrough), None),
        Value::Mapping(_) => decode_tls_mapping(d, v, &path)?,
        other => {
            d.problem(
                &path,
                format!(
                    "must be `passthrough` or a mapping with certificates, found {}",
                    match other {
                        Value::String(s) => format!("`{s}`"),
                        o => kind(o).to_string(),
                    }
                ),
            );
            return None;
        }
    };
    if d.problems.len() != before {
        return None;
    }
    Some(ListenerTls {
        mode: mode?,
        handshake_timeout: handshake_timeout.unwrap_or(DEFAULT_HANDSHAKE_TIMEOUT),
        routes: routes.unwrap_or_default(),
        default_pool,
    })
}

fn decode_tls_mapping(
    d: &mut Decoder,
    v: &Value,
    path: &str,
) -> Option<(Option<TlsMode>, Option<Duration>)> {
    let t = d.mapping(
        v,
        path,
        &[
            "mode",
            "certificates",
            "cert",
            "key",
            "alpn",
            "min_version",
            "client_ca",
            "client_auth",
            "handshake_timeout",
        ],
    )?;
    let handshake_timeout = t.get("handshake_timeout").and_then(|v| {
        d.duration_within(
            v,
            &t.path("handshake_timeout"),
            Duration::from_millis(1),
            MAX_HANDSHAKE_TIMEOUT,
        )
    });
    let passthrough = match t.get("mode") {
        None => false,
        Some(v) => d.choice(
            v,
            &t.path("mode"),
            &[("terminate", false), ("passthrough", true)],
        )?,
    };
    if passthrough {
        for key in [
            "certificates",
            "cert",
            "key",
            "alpn",
            "min_version",
            "client_ca",
            "client_auth",
        ] {
            if t.get(key).is_some() {
                d.problem(
                    t.path(key),
                    "does not apply to mode passthrough: the backend does the handshake",
                );
            }
        }
        return Some((Some(TlsMode::Passthrough), handshake_timeout));
    }
    let now = load::now();
    let mut certificates = Vec::new();
    match (t.get("certificates"), t.get("cert").or(t.get("key"))) {
        (Some(_), Some(_)) => d.problem(
            t.path("cert"),
            "give cert and key for one certificate, or a certificates list, not both",
        ),
        (None, None) => d.problem(
            t.path("certificates"),
            "is required to terminate TLS: a list like [{ cert: site.pem, key: site.key }] \
             (or write tls: passthrough)",
        ),
        (None, Some(_)) => certificates.extend(certified(d, &t, now)),
        (Some(list), None) => {
            let lpath = t.path("certificates");
            match list {
                Value::Sequence(items) if !items.is_empty() && items.len() <= MAX_ENTRIES => {
                    for (i, item) in items.iter().enumerate() {
                        if let Some(c) = d.mapping(item, &format!("{lpath}[{i}]"), &["cert", "key"])
                        {
                            certificates.extend(certified(d, &c, now));
                        }
                    }
                }
                Value::Sequence(_) => {
                    d.problem(&lpath, format!("must list 1 to {MAX_ENTRIES} certificates"))
                }
                other => d.problem(
                    &lpath,
                    format!("must be a list of {{cert, key}}, found {}", kind(other)),
                ),
            }
        }
    }
    let alpn = alpn(d, &t);
    let min_version = min_version(d, &t);
    let client_ca_file = file_name(d, &t, "client_ca").map(str::to_string);
    let client_auth = t.get("client_auth").and_then(|v| {
        d.choice(
            v,
            &t.path("client_auth"),
            &[
                ("optional", ClientAuth::Optional),
                ("required", ClientAuth::Required),
            ],
        )
    });
    if client_auth.is_some() && t.get("client_ca").is_none() {
        d.problem(
            t.path("client_auth"),
            "needs client_ca: the CA client certificates are verified against",
        );
    }
    let mut material: Vec<Vec<u8>> = certificates
        .iter()
        .flat_map(|c| c.key.cert.iter().map(|der| der.to_vec()))
        .collect();
    let client_ca = match &client_ca_file {
        Some(file) => {
            let p = t.path("client_ca");
            let pem = read(d, file, &p)?;
            match load::roots(file, &pem) {
                Ok(roots) => {
                    material.extend(
                        load::certificates(file, &pem)
                            .ok()?
                            .iter()
                            .map(|c| c.to_vec()),
                    );
                    Some((roots, client_auth != Some(ClientAuth::Optional)))
                }
                Err(e) => {
                    d.problem(p, e.to_string());
                    return None;
                }
            }
        }
        None => None,
    };
    if certificates.is_empty() {
        return None;
    }
    let spec = ServerSpec {
        certificates: &certificates,
        alpn: &alpn,
        min_tls13: min_version == TlsVersion::Tls13,
        client_ca,
    };
    let config = match load::server_config(&spec) {
        Ok(c) => c,
        Err(e) => {
            d.problem(path, e);
            return None;
        }
    };
    let client_auth = client_ca_file
        .as_ref()
        .map(|_| client_auth.unwrap_or(ClientAuth::Required));
    Some((
        Some(TlsMode::Terminate(Box::new(ServerTls {
            certificates,
            alpn,
            min_version,
            client_ca: client_ca_file,
            client_auth,
            config,
            material,
        }))),
        handshake_timeout,
    ))
}

fn decode_routes(d: &mut Decoder, f: &Fields<'_>) -> Option<Vec<Route>> {
    let v = f.get("routes")?;
    let path = f.path("routes");
    let Value::Sequence(items) = v else {
        d.problem(
            &path,
            format!(
                "must be a list like [{{ sni: db.example.com, pool: db }}], found {}",
                kind(v)
            ),
        );
        return None;
    };
    if items.is_empty() || items.len() > MAX_ENTRIES {
        d.problem(&path, format!("must list 1 to {MAX_ENTRIES} routes"));
        return None;
    }
    let mut routes = Vec::with_capacity(items.len());
    let mut seen = names::NameTable::default();
    for (i, item) in items.iter().enumerate() {
        let ipath = format!("{path}[{i}]");
        let Some(r) = d.mapping(item, &ipath, &["sni", "pool"]) else {
            continue;
        };
        let sni = match r.get("sni") {
            None => {
                d.problem(r.path("sni"), "is required: a server name or *.name");
                None
            }
            Some(v) => d.string(v, &r.path("sni")).and_then(|s| {
                if !names::is_valid_pattern(s) {
                    d.problem(
                        r.path("sni"),
                        format!("`{s}` is not a server name or *.name (like db.example.com or *.example.com)"),
                    );
                    None
                } else if !seen.insert(s, i) {
                    d.problem(r.path("sni"), format!("`{s}` is routed twice"));
                    None
                } else {
                    Some(names::normalize(s))
                }
            }),
        };
        let pool = match r.get("pool") {
            None => {
                d.problem(r.path("pool"), "is required");
                None
            }
            Some(v) => d.string(v, &r.path("pool")).map(str::to_string),
        };
        if let (Some(sni), Some(pool)) = (sni, pool) {
            routes.push(Route { sni, pool });
        }
    }
    Some(routes)
}

/// Decode a pool's `tls`: `true`, or a mapping.
pub(super) fn decode_pool(d: &mut Decoder, f: &Fields<'_>) -> Option<BackendTls> {
    let v = f.get("tls")?;
    let path = f.path("tls");
    let empty = Value::Mapping(Default::default());
    let v = match v {
        Value::Bool(true) => &empty,
        Value::Bool(false) => return None,
        v => v,
    };
    let before = d.problems.len();
    let t = d.mapping(
        v,
        &path,
        &[
            "ca",
            "sni",
            "verify",
            "insecure_skip_verify",
            "cert",
            "key",
            "alpn",
            "min_version",
        ],
    )?;
    let ca = file_name(d, &t, "ca").map(str::to_string);
    let sni = t
        .get("sni")
        .and_then(|v| d.string(v, &t.path("sni")))
        .and_then(|s| {
            if ServerName::try_from(s).is_err() || s.starts_with("*.") {
                d.problem(t.path("sni"), format!("`{s}` is not a server name"));
                None
            } else {
                Some(s.to_string())
            }
        });
    let verify = t
        .get("verify")
        .and_then(|v| d.boolean(v, &t.path("verify")))
        .unwrap_or(true);
    let insecure = t
        .get("insecure_skip_verify")
        .and_then(|v| d.boolean(v, &t.path("insecure_skip_verify")))
        .unwrap_or(false);
    match (verify, insecure) {
        (false, false) => d.problem(
            t.path("verify"),
            "turning verification off lets anyone on the path read and change the traffic: \
             it also needs insecure_skip_verify: true",
        ),
        (true, true) if t.get("verify").is_some() => {
            d.problem(t.path("insecure_skip_verify"), "contradicts verify: true")
        }
        (_, true) if ca.is_some() => {
            d.problem(t.path("ca"), "has no use with insecure_skip_verify")
        }
        _ => {}
    }
    let verify = verify && !insecure;
    let now = load::now();
    let certificate = if t.get("cert").is_some() || t.get("key").is_some() {
        certified(d, &t, now)
    } else {
        None
    };
    let alpn = alpn(d, &t);
    let min_version = min_version(d, &t);
    let mut material: Vec<Vec<u8>> = certificate
        .iter()
        .flat_map(|c| c.key.cert.iter().map(|der| der.to_vec()))
        .collect();
    let mut ca_certificates = Vec::new();
    let roots: Option<RootCertStore> = if !verify {
        None
    } else if let Some(file) = &ca {
        let p = t.path("ca");
        let pem = read(d, file, &p)?;
        match load::roots(file, &pem) {
            Ok(r) => {
                ca_certificates = load::certificates(file, &pem).ok()?;
                material.extend(ca_certificates.iter().map(|c| c.to_vec()));
                Some(r)
            }
            Err(e) => {
                d.problem(p, e.to_string());
                return None;
            }
        }
    } else {
        match load::system_roots() {
            Ok(r) => Some(r),
            Err(e) => {
                d.problem(&path, format!("{e}; name a CA file with ca"));
                return None;
            }
        }
    };
    if d.problems.len() != before {
        return None;
    }
    let config = match load::client_config(ClientSpec {
        roots,
        verify,
        certificate: certificate.clone(),
        alpn: alpn.clone(),
        min_tls13: min_version == TlsVersion::Tls13,
    }) {
        Ok(c) => c,
        Err(e) => {
            d.problem(&path, e);
            return None;
        }
    };
    // Checked against HTTP mode's needs only where an HTTP listener uses the pool.
    let http = Arc::new(crate::tls::upstream::HttpTls::new(
        &ca_certificates,
        certificate.as_ref(),
    ));
    Some(BackendTls {
        ca,
        sni,
        verify,
        certificate,
        alpn,
        min_version,
        config,
        http,
        material,
    })
}

/// Checks across listeners and pools: routes name pools that exist, and a
/// passthrough listener's pools do not add TLS of their own. Pools that do
/// not verify their backends are warned about (at start and every reload).
pub(super) fn check(
    d: &mut Decoder,
    listeners: &[ListenerSettings],
    pools: &[PoolSettings],
    pool_names: &[String],
    warnings: &mut Vec<String>,
) {
    for p in pools {
        if p.tls.as_ref().is_some_and(|t| !t.verify) {
            warnings.push(format!(
                "pools.{}.tls: insecure_skip_verify: the backends' certificates are NOT verified; \
                 anyone on the path to them can read and change the traffic",
                p.name
            ));
        }
    }
    for l in listeners {
        let Some(tls) = &l.tls else { continue };
        for (i, r) in tls.routes.iter().enumerate() {
            if !pool_names.is_empty() && !pool_names.contains(&r.pool) {
                d.problem(
                    format!("listeners.{}.routes[{i}].pool", l.name),
                    format!("no pool is named `{}`", r.pool),
                );
            }
        }
        if let Some(p) = &tls.default_pool {
            if !pool_names.is_empty() && !pool_names.contains(p) {
                d.problem(
                    format!("listeners.{}.default_pool", l.name),
                    format!("no pool is named `{p}`"),
                );
            }
        }
        if tls.mode == TlsMode::Passthrough {
            let used = std::iter::once(l.pool.as_str()).chain(tls.pools());
            for name in used {
                if pools.iter().any(|p| p.name == name && p.tls.is_some()) {
                    d.problem(
                        format!("listeners.{}.tls", l.name),
                        format!(
                            "passthrough relays the client's own TLS, but pool {name} adds TLS to \
                             its backends; remove pools.{name}.tls or terminate here"
                        ),
                    );
                }
            }
        }
    }
}

/// Whether `listener` forwards to the pool `pool` (its `pool`, an SNI
/// route or an HTTP route).
pub fn uses_pool(listener: &ListenerSettings, pool: &str) -> bool {
    listener.pool == pool
        || listener
            .tls
            .as_ref()
            .is_some_and(|t| t.pools().any(|p| p == pool))
        || listener
            .http
            .as_ref()
            .is_some_and(|h| h.pools().any(|p| p == pool))
}

#[cfg(test)]
mod tests;
