//! The HTTP-mode keys: a listener's `protocol` and its `http` section.
//!
//! `protocol: http` makes a listener an HTTP proxy (see [`crate::http`]):
//! each request picks a backend. Its `http` section says which forwarded
//! headers go to the backends and whom to believe for incoming ones, how
//! requests are routed by host and path, whether a plain listener sends
//! every client to https, the HSTS header of a TLS listener and the
//! timeouts against slow clients and backends; a pool's `http_version`
//! towards its backends. Checks that need other listeners or pools (route
//! pools exist, what of a pool's TLS HTTP mode can honour) are in [`check`].

use std::time::Duration;

use serde_yaml::Value;

use super::decode::{Decoder, Fields, kind};
use super::{ListenerSettings, PoolSettings, TlsMode};
use crate::tls::names;

/// Default `http.header_timeout`.
pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Default time a client connection may wait idle for its next request.
pub const DEFAULT_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(60);
/// Default `http.body_timeout`.
pub const DEFAULT_BODY_TIMEOUT: Duration = Duration::from_secs(60);
/// Default `http.backend_timeout`.
pub const DEFAULT_BACKEND_TIMEOUT: Duration = Duration::from_secs(60);
/// Default `http.backend_idle_timeout`.
pub const DEFAULT_BACKEND_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Default HSTS `max_age`: one year, as browsers' preload lists ask.
pub const DEFAULT_HSTS_MAX_AGE: Duration = Duration::from_secs(31_536_000);
/// The longest value of any HTTP timeout key.
pub const MAX_HTTP_TIMEOUT: Duration = Duration::from_secs(3_600);
/// The most routes one listener has.
const MAX_ROUTES: usize = 4096;

/// A listener's `protocol`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Protocol {
    /// Bytes are relayed as they are, one backend per client connection.
    #[default]
    Tcp,
    /// HTTP/1.1 (and HTTP/2 over TLS): one backend per request.
    Http,
}

impl Protocol {
    /// The name used in the YAML file.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Http => "http",
        }
    }
}

/// A pool's `http_version`: what HTTP listeners speak to its backends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendHttp {
    /// HTTP/1.1 (the default).
    Http1,
    /// HTTP/2: over TLS with ALPN `h2`; without TLS by prior knowledge (h2c).
    Http2,
    /// Over TLS, what the backend picks by ALPN (`h2`, else HTTP/1.1).
    Auto,
}

/// Decode a pool's `http_version` (`f` is the pool's mapping): `"1.1"`,
/// `"2"` or `auto` (YAML numbers 1.1 and 2 too); `auto` needs the pool's
/// `tls`, since only ALPN can tell.
pub(super) fn decode_backend_http(
    d: &mut Decoder,
    v: &Value,
    path: &str,
    f: &Fields<'_>,
) -> Option<BackendHttp> {
    let text = match v {
        Value::Number(n) => n.to_string(),
        v => d.string(v, path)?.to_string(),
    };
    let version = match text.as_str() {
        "1.1" => BackendHttp::Http1,
        "2" | "2.0" => BackendHttp::Http2,
        "auto" => BackendHttp::Auto,
        other => {
            d.problem(
                path,
                format!("`{other}` is not one of: \"1.1\", \"2\", auto"),
            );
            return None;
        }
    };
    let tls = f.get("tls").is_some_and(|t| t != &Value::Bool(false));
    if version == BackendHttp::Auto && !tls {
        d.problem(
            path,
            "auto lets the backend choose by TLS ALPN: it needs the pool's tls \
             (without TLS, say \"2\" for HTTP/2 by prior knowledge, h2c)",
        );
        return None;
    }
    Some(version)
}

/// A forwarded header sluice can write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Forwarded {
    /// `X-Forwarded-For`: the client's address, appended.
    XForwardedFor,
    /// `X-Forwarded-Proto`: `http` or `https`.
    XForwardedProto,
    /// `X-Forwarded-Host`: the `Host` the client asked for.
    XForwardedHost,
    /// `Forwarded` (RFC 7239): `for`, `proto` and `host` in one element, appended.
    Forwarded,
}

impl Forwarded {
    /// Every one, as written in the file.
    pub const ALL: [(&'static str, Forwarded); 4] = [
        ("x-forwarded-for", Forwarded::XForwardedFor),
        ("x-forwarded-proto", Forwarded::XForwardedProto),
        ("x-forwarded-host", Forwarded::XForwardedHost),
        ("forwarded", Forwarded::Forwarded),
    ];
}

/// One `http.routes` entry: requests whose host and path match go to `pool`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpRoute {
    /// A host name, or `*.` and a name; `None`: any host.
    pub host: Option<String>,
    /// A path prefix, starting with `/`; `None`: any path.
    pub path: Option<String>,
    /// The pool.
    pub pool: String,
}

/// The `Strict-Transport-Security` header of a TLS listener.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hsts {
    /// How long browsers remember to use https only.
    pub max_age: Duration,
    /// The rule covers subdomains too.
    pub include_subdomains: bool,
    /// Ask to be put on browsers' preload lists.
    pub preload: bool,
}

impl Hsts {
    /// The header value.
    pub fn value(&self) -> String {
        let mut v = format!("max-age={}", self.max_age.as_secs());
        if self.include_subdomains {
            v.push_str("; includeSubDomains");
        }
        if self.preload {
            v.push_str("; preload");
        }
        v
    }
}

/// A listener's HTTP-mode settings.
#[derive(Clone, Debug, PartialEq)]
pub struct HttpSettings {
    /// Where requests no route takes go (the listener's `pool`); `None`:
    /// they are answered 404.
    pub default_pool: Option<String>,
    /// Host and path routes, in file order: the most specific match wins.
    pub routes: Vec<HttpRoute>,
    /// The forwarded headers written, in no particular order.
    pub forwarded: Vec<Forwarded>,
    /// Clients whose forwarded headers are kept (and appended to); from
    /// anyone else they are replaced.
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// Answer every request with a redirect to https on this port.
    pub redirect_https: Option<u16>,
    /// HSTS on every response of a TLS listener.
    pub hsts: Option<Hsts>,
    /// A request's header must arrive whole within this, from its first byte
    /// (from the connect for the first request).
    pub header_timeout: Duration,
    /// How long a client connection may wait idle for its next request
    /// (the listener's `idle_timeout`).
    pub keepalive_timeout: Duration,
    /// The longest wait for the next piece of a request body.
    pub body_timeout: Duration,
    /// The longest wait for a backend's response (and each read of it).
    pub backend_timeout: Duration,
    /// How long an unused keep-alive connection to a backend is kept.
    pub backend_idle_timeout: Duration,
}

impl HttpSettings {
    /// Every pool the listener may forward to.
    pub fn pools(&self) -> impl Iterator<Item = &str> {
        self.routes
            .iter()
            .map(|r| r.pool.as_str())
            .chain(self.default_pool.as_deref())
    }
}

/// The keys of a listener's `http` section.
const HTTP_KEYS: &[&str] = &[
    "forwarded",
    "trusted_proxies",
    "routes",
    "redirect_https",
    "hsts",
    "header_timeout",
    "body_timeout",
    "backend_timeout",
    "backend_idle_timeout",
];

/// Decode a listener's `protocol`; a problem (naming the key) when it is
/// not `tcp` or `http`.
pub(super) fn decode_protocol(d: &mut Decoder, f: &Fields<'_>) -> Option<Protocol> {
    match f.get("protocol") {
        None => Some(Protocol::Tcp),
        Some(v) => d.choice(
            v,
            &f.path("protocol"),
            &[("tcp", Protocol::Tcp), ("http", Protocol::Http)],
        ),
    }
}

/// Decode a listener's `http` section for a listener in `protocol: http`
/// (`pool` is its `pool` key, `idle_timeout` its `idle_timeout`).
pub(super) fn decode(
    d: &mut Decoder,
    f: &Fields<'_>,
    pool: Option<String>,
    idle_timeout: Option<Duration>,
    tls: bool,
) -> Option<HttpSettings> {
    let before = d.problems.len();
    let empty = Value::Mapping(Default::default());
    let v = f.get("http").unwrap_or(&empty);
    let path = f.path("http");
    let h = d.mapping(v, &path, HTTP_KEYS)?;
    let timeout = |d: &mut Decoder, key: &str, default: Duration| {
        h.get(key)
            .and_then(|v| {
                d.duration_within(v, &h.path(key), Duration::from_millis(1), MAX_HTTP_TIMEOUT)
            })
            .unwrap_or(default)
    };
    let header_timeout = timeout(d, "header_timeout", DEFAULT_HEADER_TIMEOUT);
    let body_timeout = timeout(d, "body_timeout", DEFAULT_BODY_TIMEOUT);
    let backend_timeout = timeout(d, "backend_timeout", DEFAULT_BACKEND_TIMEOUT);
    let backend_idle_timeout = timeout(d, "backend_idle_timeout", DEFAULT_BACKEND_IDLE_TIMEOUT);

    let forwarded = match h.get("forwarded") {
        None => vec![
            Forwarded::XForwardedFor,
            Forwarded::XForwardedProto,
            Forwarded::XForwardedHost,
        ],
        Some(v) => decode_forwarded(d, v, &h.path("forwarded")),
    };
    let trusted_proxies = h
        .get("trusted_proxies")
        .and_then(|v| super::edge::prefixes(d, v, &h.path("trusted_proxies")))
        .unwrap_or_default();
    let routes = h
        .get("routes")
        .map(|v| decode_routes(d, v, &h.path("routes")))
        .unwrap_or_default();
    if pool.is_none() && routes.is_empty() && f.get("pool").is_none() {
        d.problem(
            f.path("pool"),
            "is required (the pool requests go to), unless http.routes name the pools",
        );
    }
    let redirect_https = match h.get("redirect_https") {
        None | Some(Value::Bool(false)) => None,
        Some(Value::Bool(true)) => Some(443),
        Some(v @ Value::Number(_)) => d
            .integer(v, &h.path("redirect_https"), 1, 65_535)
            .map(|p| p as u16),
        Some(other) => {
            d.problem(
                h.path("redirect_https"),
                format!(
                    "must be true, false or the https port (like 8443), found {}",
                    kind(other)
                ),
            );
            None
        }
    };
    if redirect_https.is_some() && tls {
        d.problem(
            h.path("redirect_https"),
            "this listener serves https already; redirect_https belongs on the plain http listener",
        );
    }
    let hsts = h
        .get("hsts")
        .and_then(|v| decode_hsts(d, v, &h.path("hsts")));
    if hsts.is_some() && !tls {
        d.problem(
            h.path("hsts"),
            "browsers ignore Strict-Transport-Security over plain http: it needs tls on this listener",
        );
    }
    if d.problems.len() != before {
        return None;
    }
    Some(HttpSettings {
        default_pool: pool,
        routes,
        forwarded,
        trusted_proxies,
        redirect_https,
        hsts,
        header_timeout,
        keepalive_timeout: idle_timeout.unwrap_or(DEFAULT_KEEPALIVE_TIMEOUT),
        body_timeout,
        backend_timeout,
        backend_idle_timeout,
    })
}

fn decode_forwarded(d: &mut Decoder, v: &Value, path: &str) -> Vec<Forwarded> {
    let names: Vec<&str> = Forwarded::ALL.iter().map(|(n, _)| *n).collect();
    let Value::Sequence(items) = v else {
        d.problem(
            path,
            format!(
                "must be a list of headers from: {} (an empty list writes none), found {}",
                names.join(", "),
                kind(v)
            ),
        );
        return Vec::new();
    };
    let mut out = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let p = format!("{path}[{i}]");
        // Header names are case-insensitive; so is this list.
        let lower = item.as_str().map(str::to_ascii_lowercase);
        let Some(found) = (match &lower {
            Some(s) => d.choice(&Value::String(s.clone()), &p, &Forwarded::ALL),
            None => d.choice(item, &p, &Forwarded::ALL),
        }) else {
            continue;
        };
        if out.contains(&found) {
            d.problem(&p, "is listed twice");
        } else {
            out.push(found);
        }
    }
    out
}

fn decode_hsts(d: &mut Decoder, v: &Value, path: &str) -> Option<Hsts> {
    let default = Hsts {
        max_age: DEFAULT_HSTS_MAX_AGE,
        include_subdomains: false,
        preload: false,
    };
    match v {
        Value::Bool(true) => return Some(default),
        Value::Bool(false) => return None,
        Value::Mapping(_) => {}
        other => {
            d.problem(
                path,
                format!(
                    "must be true or a mapping like {{ max_age: 1y, include_subdomains: true }}, found {}",
                    kind(other)
                ),
            );
            return None;
        }
    }
    let m = d.mapping(v, path, &["max_age", "include_subdomains", "preload"])?;
    let mut hsts = default;
    if let Some(v) = m.get("max_age") {
        // Two years is what preload lists accept at most in practice;
        // ten bounds a typo.
        hsts.max_age = d.duration_within(
            v,
            &m.path("max_age"),
            Duration::ZERO,
            Duration::from_secs(10 * 31_536_000),
        )?;
    }
    if let Some(v) = m.get("include_subdomains") {
        hsts.include_subdomains = d.boolean(v, &m.path("include_subdomains"))?;
    }
    if let Some(v) = m.get("preload") {
        hsts.preload = d.boolean(v, &m.path("preload"))?;
    }
    Some(hsts)
}

fn decode_routes(d: &mut Decoder, v: &Value, path: &str) -> Vec<HttpRoute> {
    let Value::Sequence(items) = v else {
        d.problem(
            path,
            format!(
                "must be a list like [{{ host: api.example.com, path: /v1/, pool: api }}], found {}",
                kind(v)
            ),
        );
        return Vec::new();
    };
    if items.is_empty() || items.len() > MAX_ROUTES {
        d.problem(path, format!("must list 1 to {MAX_ROUTES} routes"));
        return Vec::new();
    }
    let mut routes: Vec<HttpRoute> = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let ipath = format!("{path}[{i}]");
        let Some(r) = d.mapping(item, &ipath, &["host", "path", "pool"]) else {
            continue;
        };
        let host = r.get("host").and_then(|v| {
            let s = d.string(v, &r.path("host"))?;
            if names::is_valid_pattern(s) {
                Some(names::normalize(s))
            } else {
                d.problem(
                    r.path("host"),
                    format!(
                        "`{s}` is not a host name or *.name (like www.example.com or *.example.com; no port)"
                    ),
                );
                None
            }
        });
        let prefix = r.get("path").and_then(|v| {
            let s = d.string(v, &r.path("path"))?;
            if !s.starts_with('/') || s.bytes().any(|b| b.is_ascii_whitespace() || b == b'?' || b == b'#') {
                d.problem(
                    r.path("path"),
                    format!("`{s}` is not a path prefix: it starts with `/` and has no space, `?` or `#`"),
                );
                None
            } else {
                Some(s.to_string())
            }
        });
        if r.get("host").is_none() && r.get("path").is_none() {
            d.problem(
                &ipath,
                "needs host, path or both (requests no route takes go to the listener's pool)",
            );
        }
        let pool = match r.get("pool") {
            None => {
                d.problem(r.path("pool"), "is required");
                None
            }
            Some(v) => d.string(v, &r.path("pool")).map(str::to_string),
        };
        let (Some(pool), true, true) = (
            pool,
            host.is_some() == r.get("host").is_some(),
            prefix.is_some() == r.get("path").is_some(),
        ) else {
            continue;
        };
        if routes.iter().any(|o| o.host == host && o.path == prefix) {
            d.problem(&ipath, "routes the same host and path as an earlier route");
            continue;
        }
        routes.push(HttpRoute {
            host,
            path: prefix,
            pool,
        });
    }
    routes
}

/// Checks across listeners and pools for HTTP listeners: route pools exist;
/// the pools an HTTP listener uses send no PROXY header and leave TLS ALPN
/// and versions to HTTP mode; `http_version` only on pools HTTP listeners
/// use; no TLS passthrough or SNI routes.
pub(super) fn check(
    d: &mut Decoder,
    listeners: &[ListenerSettings],
    pools: &[PoolSettings],
    pool_names: &[String],
) {
    for l in listeners {
        let Some(http) = &l.http else { continue };
        for (i, r) in http.routes.iter().enumerate() {
            if !pool_names.is_empty() && !pool_names.contains(&r.pool) {
                d.problem(
                    format!("listeners.{}.http.routes[{i}].pool", l.name),
                    format!("no pool is named `{}`", r.pool),
                );
            }
        }
        if let Some(tls) = &l.tls {
            if tls.mode == TlsMode::Passthrough {
                d.problem(
                    format!("listeners.{}.tls", l.name),
                    "protocol http reads the requests, so it terminates TLS: passthrough relays \
                     bytes it cannot read (use protocol: tcp for passthrough)",
                );
            }
            if !tls.routes.is_empty() {
                d.problem(
                    format!("listeners.{}.routes", l.name),
                    "with protocol http, route by host and path with http.routes",
                );
            }
        }
        let mut seen: Vec<&str> = Vec::new();
        for name in http.pools() {
            if seen.contains(&name) {
                continue;
            }
            seen.push(name);
            let Some(p) = pools.iter().find(|p| p.name == name) else {
                continue;
            };
            if let Some(tls) = &p.tls {
                if let Some(why) = &tls.http.unusable {
                    d.problem(
                        format!("pools.{name}.tls"),
                        format!("listener {} (protocol http): {why}", l.name),
                    );
                }
                // pingora's connector speaks TLS to the backends in HTTP
                // mode: it offers TLS 1.2 and 1.3 and sets ALPN itself.
                if !tls.alpn.is_empty() {
                    d.problem(
                        format!("pools.{name}.tls.alpn"),
                        format!(
                            "listener {} (protocol http) offers the backends what the pool's \
                             http_version says; tls.alpn applies to protocol tcp only",
                            l.name
                        ),
                    );
                }
                if tls.min_version == super::tls::TlsVersion::Tls13 {
                    d.problem(
                        format!("pools.{name}.tls.min_version"),
                        format!(
                            "listener {} (protocol http) reaches the backends with TLS 1.2 or \
                             1.3; min_version 1.3 is not available in http mode yet",
                            l.name
                        ),
                    );
                }
            }
            if p.proxy_protocol.is_some() {
                d.problem(
                    format!("pools.{name}.proxy_protocol"),
                    format!(
                        "listener {} (protocol http) tells backends the client's address in \
                         forwarded headers, not a PROXY protocol header",
                        l.name
                    ),
                );
            }
        }
    }
    for p in pools {
        let used = listeners
            .iter()
            .filter_map(|l| l.http.as_ref())
            .any(|h| h.pools().any(|n| n == p.name));
        if p.http_version.is_some() && !used {
            d.problem(
                format!("pools.{}.http_version", p.name),
                "only applies to pools that listeners with protocol: http use",
            );
        }
    }
}

/// Keys of a listener that have no meaning with `protocol: http`.
pub(super) const TCP_ONLY_KEYS: &[&str] = &["splice", "fast_path"];
