//! Every Prometheus metric sluice exports, in one place.
//!
//! Metric families live in a registry owned by [`Metrics`]; the data path
//! never looks a label up. Each listener, pool and backend gets its labelled
//! handles once at start ([`ListenerMetrics`], [`PoolMetrics`],
//! [`BackendMetrics`]), and counting a byte is one relaxed atomic add.
//! Label values are bounded: listener and pool names, configured backend
//! addresses and fixed enums, never a client address.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use prometheus::core::Collector;
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Connection lifetimes, from a quick request to a long-lived tunnel.
const CONNECTION_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0,
];
/// Backend connect times, from loopback to a slow WAN link.
const CONNECT_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

/// Why a client connection was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RejectReason {
    /// No backend was available or none accepted the connection.
    NoBackend,
    /// The listener's `max_connections` was reached.
    MaxConnections,
    /// The process ran out of file descriptors.
    FdLimit,
    /// The backend picked was this listener itself (a proxy loop).
    Loop,
    /// The source address is not allowed (`allow`/`deny`).
    Acl,
    /// The source address has `per_source.max_connections` open.
    SourceLimit,
    /// The source address is over `per_source.rate`.
    SourceRate,
    /// A missing, malformed or forged PROXY protocol header.
    ProxyProtocol,
}

impl RejectReason {
    /// Every reason, in the order the metric lists them.
    pub const ALL: [RejectReason; 8] = [
        RejectReason::NoBackend,
        RejectReason::MaxConnections,
        RejectReason::FdLimit,
        RejectReason::Loop,
        RejectReason::Acl,
        RejectReason::SourceLimit,
        RejectReason::SourceRate,
        RejectReason::ProxyProtocol,
    ];
}

impl RejectReason {
    /// The `reason` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::NoBackend => "no_backend",
            RejectReason::MaxConnections => "max_connections",
            RejectReason::FdLimit => "fd_limit",
            RejectReason::Loop => "loop",
            RejectReason::Acl => "acl",
            RejectReason::SourceLimit => "source_limit",
            RejectReason::SourceRate => "source_rate",
            RejectReason::ProxyProtocol => "proxy_protocol",
        }
    }
}

/// TLS handshake durations, from a resumed loopback handshake to a slow client.
const HANDSHAKE_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// How a client's TLS handshake (or, passed through, its ClientHello) ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HandshakeResult {
    /// Done; the client goes to its pool.
    Ok,
    /// No cipher suite, key exchange group or signature scheme in common.
    NoSharedCipher,
    /// The client offered only versions below the listener's minimum.
    ProtocolVersion,
    /// A client certificate was required and missing, or did not verify.
    BadCertificate,
    /// No route and no `default_pool` for the client's server name.
    UnknownSni,
    /// No ALPN protocol in common.
    NoAlpn,
    /// Not finished within `handshake_timeout`.
    Timeout,
    /// The client does not speak TLS (a plain HTTP request, garbage).
    NotTls,
    /// The client went away during the handshake.
    Closed,
    /// Any other failure (a malformed message, an alert from the client).
    Other,
}

impl HandshakeResult {
    /// Every result, in label order.
    pub const ALL: [HandshakeResult; 10] = [
        HandshakeResult::Ok,
        HandshakeResult::NoSharedCipher,
        HandshakeResult::ProtocolVersion,
        HandshakeResult::BadCertificate,
        HandshakeResult::UnknownSni,
        HandshakeResult::NoAlpn,
        HandshakeResult::Timeout,
        HandshakeResult::NotTls,
        HandshakeResult::Closed,
        HandshakeResult::Other,
    ];

    /// The `result` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            HandshakeResult::Ok => "ok",
            HandshakeResult::NoSharedCipher => "no_shared_cipher",
            HandshakeResult::ProtocolVersion => "protocol_version",
            HandshakeResult::BadCertificate => "bad_certificate",
            HandshakeResult::UnknownSni => "unknown_sni",
            HandshakeResult::NoAlpn => "no_alpn",
            HandshakeResult::Timeout => "timeout",
            HandshakeResult::NotTls => "not_tls",
            HandshakeResult::Closed => "closed",
            HandshakeResult::Other => "other",
        }
    }
}

/// Handles for one TLS listener's handshakes.
#[derive(Clone)]
pub struct TlsMetrics {
    results: [IntCounter; 10],
    /// Time from accept to a finished handshake (or a routed ClientHello).
    pub duration: Histogram,
}

impl TlsMetrics {
    /// The counter for one outcome.
    pub fn result(&self, r: HandshakeResult) -> &IntCounter {
        &self.results[r as usize]
    }
}

/// A certificate sluice presents, for `sluice_tls_certificate_expiry_timestamp_seconds`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertificateExpiry {
    /// `listener` (served to clients) or `pool` (presented to backends).
    pub scope: &'static str,
    /// The listener's or pool's name.
    pub name: String,
    /// The certificate file.
    pub file: String,
    /// Its leaf's `notAfter`, as a Unix time.
    pub not_after: i64,
}

/// Why a connect to a backend failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnectErrorKind {
    /// The backend refused the connection.
    Refused,
    /// No answer within `connect_timeout`.
    Timeout,
    /// Anything else (unreachable, out of resources, ...).
    Other,
    /// The TLS handshake with the backend failed (an untrusted or expired
    /// certificate, a wrong name, a client certificate refused, ...).
    Tls,
}

impl ConnectErrorKind {
    /// The `kind` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            ConnectErrorKind::Refused => "refused",
            ConnectErrorKind::Timeout => "timeout",
            ConnectErrorKind::Other => "other",
            ConnectErrorKind::Tls => "tls",
        }
    }
}

/// The registry and all metric families.
pub struct Metrics {
    registry: Registry,
    listener_connections: IntCounterVec,
    listener_active: IntGaugeVec,
    listener_rejected: IntCounterVec,
    listener_bytes: IntCounterVec,
    listener_spliced: IntCounterVec,
    listener_relayed: IntCounterVec,
    connection_duration: HistogramVec,
    backend_up: IntGaugeVec,
    backend_active: IntGaugeVec,
    backend_connections: IntCounterVec,
    backend_connections_active: IntGaugeVec,
    backend_connect_errors: IntCounterVec,
    backend_connect_duration: HistogramVec,
    backend_health_checks: IntCounterVec,
    backend_state_changes: IntCounterVec,
    backend_bytes: IntCounterVec,
    pool_failovers: IntCounterVec,
    pool_conflicts: IntGaugeVec,
    backend_role: IntGaugeVec,
    backend_admin_state: IntGaugeVec,
    config_reloads: IntCounterVec,
    admin_requests: IntCounterVec,
    /// Access-log lines dropped because the writer could not keep up.
    pub access_log_dropped: IntCounter,
    config_last_reload_success: prometheus::Gauge,
    tls_handshakes: IntCounterVec,
    tls_handshake_duration: HistogramVec,
    tls_certificate_expiry: IntGaugeVec,
    http: HttpFamilies,
}

/// The HTTP-mode families, shared by every HTTP listener's handles.
#[derive(Clone)]
struct HttpFamilies {
    requests: IntCounterVec,
    duration: HistogramVec,
    upstream: IntCounterVec,
    /// The `(pool, code)` series made for each listener, so that removing
    /// the listener removes them.
    made: Arc<Mutex<SeriesMade>>,
}

/// Per listener, the `(pool, code)` pairs that have a series.
type SeriesMade = HashMap<String, Vec<(String, &'static str)>>;

/// HTTP request durations, from a cached answer to a slow report.
const REQUEST_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];

/// The status codes counted one by one in `sluice_http_requests_total`;
/// every other code is counted in its class (`2xx` ...), so the label set
/// stays bounded whatever backends answer.
const COUNTED_CODES: &[(u16, &str)] = &[
    (101, "101"),
    (200, "200"),
    (201, "201"),
    (204, "204"),
    (206, "206"),
    (301, "301"),
    (302, "302"),
    (304, "304"),
    (307, "307"),
    (308, "308"),
    (400, "400"),
    (401, "401"),
    (403, "403"),
    (404, "404"),
    (405, "405"),
    (408, "408"),
    (413, "413"),
    (429, "429"),
    (499, "499"),
    (500, "500"),
    (502, "502"),
    (503, "503"),
    (504, "504"),
];

/// The `code` label for an HTTP status.
pub fn code_label(code: u16) -> &'static str {
    if let Some((_, label)) = COUNTED_CODES.iter().find(|(c, _)| *c == code) {
        return label;
    }
    match code {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        500..=599 => "5xx",
        _ => "other",
    }
}

/// One listener's `(pool, code)` series, kept so that a request finds its
/// handles without building label hashes or a listener-name string.
struct RequestSeries {
    pool: String,
    code: &'static str,
    requests: IntCounter,
    duration: Histogram,
}

/// Handles for one HTTP listener's requests.
#[derive(Clone)]
pub struct HttpMetrics {
    listener: String,
    families: HttpFamilies,
    /// Bounded like the labels: pools times codes.
    series: Arc<Mutex<Vec<RequestSeries>>>,
    /// Requests sent over a new backend connection.
    pub upstream_new: IntCounter,
    /// Requests sent over a kept-alive backend connection.
    pub upstream_reused: IntCounter,
}

impl HttpMetrics {
    /// Count a request of `pool` (`none` when it had none) answered `code`
    /// after `seconds`.
    pub fn request(&self, pool: &str, code: u16, seconds: f64) {
        let label = code_label(code);
        let mut series = crate::sys::lock(&self.series);
        let i = match series
            .iter()
            .position(|s| s.code == label && s.pool == pool)
        {
            Some(i) => i,
            None => {
                let listener = self.listener.as_str();
                series.push(RequestSeries {
                    pool: pool.to_string(),
                    code: label,
                    requests: self
                        .families
                        .requests
                        .with_label_values(&[listener, pool, label]),
                    duration: self.families.duration.with_label_values(&[listener, pool]),
                });
                // Remembered so that removing the listener removes them.
                let mut made = crate::sys::lock(&self.families.made);
                let made = made.entry(self.listener.clone()).or_default();
                if !made.iter().any(|(p, c)| p == pool && *c == label) {
                    made.push((pool.to_string(), label));
                }
                series.len() - 1
            }
        };
        series[i].requests.inc();
        series[i].duration.observe(seconds);
    }
}

/// Handles for one listener.
#[derive(Clone)]
pub struct ListenerMetrics {
    /// Accepted client connections, refused ones included.
    pub connections: IntCounter,
    /// Client connections being served now.
    pub active: IntGauge,
    /// Refused for lack of a backend.
    pub rejected_no_backend: IntCounter,
    /// Refused at `max_connections`.
    pub rejected_max_connections: IntCounter,
    /// Refused for lack of file descriptors.
    pub rejected_fd_limit: IntCounter,
    /// Refused because the backend was sluice itself.
    pub rejected_loop: IntCounter,
    /// Refused by the source rules.
    pub rejected_acl: IntCounter,
    /// Refused at the per-source connection limit.
    pub rejected_source_limit: IntCounter,
    /// Refused at the per-source rate.
    pub rejected_source_rate: IntCounter,
    /// Refused for a missing, malformed or forged PROXY header.
    pub rejected_proxy_protocol: IntCounter,
    /// Bytes from clients to backends.
    pub bytes_in: IntCounter,
    /// Bytes from backends to clients.
    pub bytes_out: IntCounter,
    /// Lifetime of proxied connections.
    pub duration: Histogram,
    /// Bytes relayed with `splice(2)` and connections on each relay path.
    pub relay: crate::relay::RelayCounters,
    name: String,
    tls_handshakes: IntCounterVec,
    tls_handshake_duration: HistogramVec,
}

impl ListenerMetrics {
    /// Handles for this listener's TLS handshakes; its series exist from
    /// this call on (only TLS listeners make it).
    pub fn tls(&self) -> TlsMetrics {
        TlsMetrics {
            results: HandshakeResult::ALL.map(|r| {
                self.tls_handshakes
                    .with_label_values(&[self.name.as_str(), r.as_str()])
            }),
            duration: self
                .tls_handshake_duration
                .with_label_values(&[self.name.as_str()]),
        }
    }
}

/// Handles for one pool.
#[derive(Clone)]
pub struct PoolMetrics {
    /// Times traffic moved off a failed backend or tier.
    pub failovers: IntCounter,
    /// Backends claiming `primary` that sluice refuses to route to.
    pub conflicts: IntGauge,
}

/// Handles for one backend of one pool.
#[derive(Clone)]
pub struct BackendMetrics {
    /// 1 while health checks say up.
    pub up: IntGauge,
    /// 1 while it takes new connections.
    pub active: IntGauge,
    /// Connections established to it.
    pub connections: IntCounter,
    /// Connections open or being opened to it.
    pub connections_active: IntGauge,
    connect_errors: [IntCounter; 4],
    /// Time to establish a connection.
    pub connect_duration: Histogram,
    /// Successful health checks.
    pub checks_success: IntCounter,
    /// Failed health checks.
    pub checks_failure: IntCounter,
    /// Transitions to up.
    pub to_up: IntCounter,
    /// Transitions to down.
    pub to_down: IntCounter,
    /// Bytes sent to it.
    pub bytes_in: IntCounter,
    /// Bytes received from it.
    pub bytes_out: IntCounter,
    /// `sluice_backend_role` for `primary`, `replica`, `unknown`.
    role: [IntGauge; 3],
    /// `sluice_backend_admin_state` for each of [`ADMIN_LABELS`].
    admin: [IntGauge; 4],
}

/// The `state` label values of `sluice_backend_admin_state`, in
/// [`BackendMetrics`] order.
pub const ADMIN_LABELS: [&str; 4] = ["ready", "drain", "drained", "maint"];

/// The `role` label values of `sluice_backend_role`, in [`BackendMetrics`] order.
pub const ROLE_LABELS: [&str; 3] = ["primary", "replica", "unknown"];

impl BackendMetrics {
    /// Show `state` (an index into [`ADMIN_LABELS`]) as the current one.
    pub fn set_admin(&self, state: usize) {
        for (i, g) in self.admin.iter().enumerate() {
            g.set(i64::from(i == state));
        }
    }

    /// Show `role` (an index into [`ROLE_LABELS`]) as the current one.
    pub fn set_role(&self, role: usize) {
        for (i, g) in self.role.iter().enumerate() {
            g.set(i64::from(i == role));
        }
    }

    /// The counter for one kind of connect failure.
    pub fn connect_errors(&self, kind: ConnectErrorKind) -> &IntCounter {
        &self.connect_errors[kind as usize]
    }
}

fn counter(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    register(registry, IntCounterVec::new(Opts::new(name, help), labels))
}

fn gauge(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    register(registry, IntGaugeVec::new(Opts::new(name, help), labels))
}

fn histogram(
    registry: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
    buckets: &[f64],
) -> HistogramVec {
    let opts = HistogramOpts::new(name, help).buckets(buckets.to_vec());
    register(registry, HistogramVec::new(opts, labels))
}

/// Register a collector built from constant, valid options.
fn register<C: Collector + Clone + 'static>(
    registry: &Registry,
    built: prometheus::Result<C>,
) -> C {
    let c = built.expect("metric options are constants and valid");
    registry
        .register(Box::new(c.clone()))
        .expect("each metric name is registered once");
    c
}

impl Metrics {
    /// Create the registry with every family, build info and process metrics.
    pub fn new() -> Self {
        let r = Registry::new();
        #[cfg(target_os = "linux")]
        r.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))
        .expect("process collector is registered once");
        let build_info = gauge(
            &r,
            "sluice_build_info",
            "Build information; the value is 1.",
            &["version"],
        );
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        Metrics {
            listener_connections: counter(
                &r,
                "sluice_listener_connections_total",
                "Client connections accepted, refused ones included.",
                &["listener"],
            ),
            listener_active: gauge(
                &r,
                "sluice_listener_connections_active",
                "Client connections being served.",
                &["listener"],
            ),
            listener_rejected: counter(
                &r,
                "sluice_listener_rejected_total",
                "Client connections refused, by reason.",
                &["listener", "reason"],
            ),
            listener_bytes: counter(
                &r,
                "sluice_listener_bytes_total",
                "Bytes relayed; in = client to backend, out = backend to client.",
                &["listener", "direction"],
            ),
            listener_spliced: counter(
                &r,
                "sluice_listener_spliced_bytes_total",
                "Bytes relayed with splice(2), never copied into user space; a part of sluice_listener_bytes_total.",
                &["listener"],
            ),
            listener_relayed: counter(
                &r,
                "sluice_listener_relayed_connections_total",
                "Connections relayed, by path: normal (in sluice) or sockmap (in the kernel, fast_path: sockmap).",
                &["listener", "path"],
            ),
            connection_duration: histogram(
                &r,
                "sluice_connection_duration_seconds",
                "Lifetime of proxied client connections.",
                &["listener"],
                CONNECTION_BUCKETS,
            ),
            backend_up: gauge(
                &r,
                "sluice_backend_up",
                "1 when health checks report the backend up.",
                &["pool", "backend"],
            ),
            backend_active: gauge(
                &r,
                "sluice_backend_active",
                "1 when the backend takes new connections now.",
                &["pool", "backend"],
            ),
            backend_connections: counter(
                &r,
                "sluice_backend_connections_total",
                "Connections established to the backend.",
                &["pool", "backend"],
            ),
            backend_connections_active: gauge(
                &r,
                "sluice_backend_connections_active",
                "Connections open or being opened to the backend.",
                &["pool", "backend"],
            ),
            backend_connect_errors: counter(
                &r,
                "sluice_backend_connect_errors_total",
                "Failed connects to the backend, by kind.",
                &["pool", "backend", "kind"],
            ),
            backend_connect_duration: histogram(
                &r,
                "sluice_backend_connect_duration_seconds",
                "Time to establish a connection to the backend.",
                &["pool", "backend"],
                CONNECT_BUCKETS,
            ),
            backend_health_checks: counter(
                &r,
                "sluice_backend_health_checks_total",
                "Health checks run against the backend, by result.",
                &["pool", "backend", "result"],
            ),
            backend_state_changes: counter(
                &r,
                "sluice_backend_state_changes_total",
                "Health state transitions of the backend.",
                &["pool", "backend", "to"],
            ),
            backend_bytes: counter(
                &r,
                "sluice_backend_bytes_total",
                "Bytes relayed; in = to the backend, out = from the backend.",
                &["pool", "backend", "direction"],
            ),
            pool_failovers: counter(
                &r,
                "sluice_pool_failovers_total",
                "Times traffic moved off a failed backend (or off the primary tier).",
                &["pool"],
            ),
            pool_conflicts: gauge(
                &r,
                "sluice_pool_conflicts",
                "Backends claiming to be primary that sluice refuses to route to (split brain); 0 when at most one claims it.",
                &["pool"],
            ),
            backend_role: gauge(
                &r,
                "sluice_backend_role",
                "The role the backend reports (1 for the current one): primary, replica, or unknown (no role-aware check, or no answer yet).",
                &["pool", "backend", "role"],
            ),
            backend_admin_state: gauge(
                &r,
                "sluice_backend_admin_state",
                "1 for the operator's state of the backend: ready, drain (no new connections), drained (drain, and none left open) or maint (no new connections, open ones closed).",
                &["pool", "backend", "state"],
            ),
            config_reloads: {
                let c = counter(
                    &r,
                    "sluice_config_reloads_total",
                    "Configuration reloads, by result.",
                    &["result"],
                );
                // Both results exist from the start, so rate() and alerts see 0.
                for result in ["success", "failure"] {
                    c.with_label_values(&[result]);
                }
                c
            },
            access_log_dropped: {
                let c = IntCounter::new(
                    "sluice_access_log_dropped_total",
                    "Access-log lines dropped because the disk could not keep up (the data path never waits for it).",
                )
                .expect("metric options are constants and valid");
                r.register(Box::new(c.clone()))
                    .expect("each metric name is registered once");
                c
            },
            admin_requests: counter(
                &r,
                "sluice_admin_requests_total",
                "Requests to the admin API, by endpoint and status code.",
                &["endpoint", "code"],
            ),
            tls_handshakes: counter(
                &r,
                "sluice_tls_handshakes_total",
                "TLS handshakes of clients (with tls: passthrough, ClientHellos read), by result.",
                &["listener", "result"],
            ),
            tls_handshake_duration: histogram(
                &r,
                "sluice_tls_handshake_duration_seconds",
                "Time from accept to a finished TLS handshake (passthrough: to a routed ClientHello).",
                &["listener"],
                HANDSHAKE_BUCKETS,
            ),
            tls_certificate_expiry: gauge(
                &r,
                "sluice_tls_certificate_expiry_timestamp_seconds",
                "When each certificate sluice presents expires (its notAfter), as a Unix time; scope is listener (served to clients) or pool (presented to backends).",
                &["scope", "name", "file"],
            ),
            http: HttpFamilies {
                requests: counter(
                    &r,
                    "sluice_http_requests_total",
                    "HTTP requests answered (listeners with protocol: http), by pool (none: routed nowhere, redirected or refused before one was chosen) and status code (common codes one by one, others by class).",
                    &["listener", "pool", "code"],
                ),
                duration: histogram(
                    &r,
                    "sluice_http_request_duration_seconds",
                    "Time from a request's header to the end of its response.",
                    &["listener", "pool"],
                    REQUEST_BUCKETS,
                ),
                upstream: counter(
                    &r,
                    "sluice_http_upstream_requests_total",
                    "HTTP requests sent to backends, by connection: new or reused (kept alive).",
                    &["listener", "connection"],
                ),
                made: Arc::new(Mutex::new(HashMap::new())),
            },
            config_last_reload_success: {
                let g = prometheus::Gauge::new(
                    "sluice_config_last_reload_success_timestamp_seconds",
                    "When the configuration in force was loaded (start-up or the last successful reload), as a Unix time.",
                )
                .expect("metric options are constants and valid");
                r.register(Box::new(g.clone()))
                    .expect("each metric name is registered once");
                g
            },
            registry: r,
        }
    }

    /// Count a reload and, when it succeeded, note the time.
    pub fn reloaded(&self, ok: bool) {
        self.config_reloads
            .with_label_values(&[if ok { "success" } else { "failure" }])
            .inc();
        if ok {
            self.config_loaded_now();
        }
    }

    /// Count an admin request to `endpoint` (a fixed label) answered `code`.
    pub fn admin_request(&self, endpoint: &str, code: u16) {
        self.admin_requests
            .with_label_values(&[endpoint, &code.to_string()])
            .inc();
    }

    /// Record that the configuration in force was loaded now.
    pub fn config_loaded_now(&self) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        self.config_last_reload_success.set(now);
    }

    /// Handles for the listener `name`; every series exists from the start.
    pub fn listener(&self, name: &str) -> ListenerMetrics {
        ListenerMetrics {
            connections: self.listener_connections.with_label_values(&[name]),
            active: self.listener_active.with_label_values(&[name]),
            rejected_no_backend: self
                .listener_rejected
                .with_label_values(&[name, RejectReason::NoBackend.as_str()]),
            rejected_max_connections: self
                .listener_rejected
                .with_label_values(&[name, RejectReason::MaxConnections.as_str()]),
            rejected_fd_limit: self
                .listener_rejected
                .with_label_values(&[name, RejectReason::FdLimit.as_str()]),
            rejected_loop: self
                .listener_rejected
                .with_label_values(&[name, RejectReason::Loop.as_str()]),
            rejected_acl: self
                .listener_rejected
                .with_label_values(&[name, RejectReason::Acl.as_str()]),
            rejected_source_limit: self
                .listener_rejected
                .with_label_values(&[name, RejectReason::SourceLimit.as_str()]),
            rejected_source_rate: self
                .listener_rejected
                .with_label_values(&[name, RejectReason::SourceRate.as_str()]),
            rejected_proxy_protocol: self
                .listener_rejected
                .with_label_values(&[name, RejectReason::ProxyProtocol.as_str()]),
            bytes_in: self.listener_bytes.with_label_values(&[name, "in"]),
            bytes_out: self.listener_bytes.with_label_values(&[name, "out"]),
            duration: self.connection_duration.with_label_values(&[name]),
            relay: crate::relay::RelayCounters {
                spliced: self.listener_spliced.with_label_values(&[name]),
                normal: self.listener_relayed.with_label_values(&[name, "normal"]),
                sockmap: self.listener_relayed.with_label_values(&[name, "sockmap"]),
            },
            name: name.to_string(),
            tls_handshakes: self.tls_handshakes.clone(),
            tls_handshake_duration: self.tls_handshake_duration.clone(),
        }
    }

    /// Handles for the HTTP listener `name`.
    pub fn http(&self, name: &str) -> HttpMetrics {
        HttpMetrics {
            listener: name.to_string(),
            families: self.http.clone(),
            series: Arc::new(Mutex::new(Vec::new())),
            upstream_new: self.http.upstream.with_label_values(&[name, "new"]),
            upstream_reused: self.http.upstream.with_label_values(&[name, "reused"]),
        }
    }

    /// Handles for the pool `name`.
    pub fn pool(&self, name: &str) -> PoolMetrics {
        PoolMetrics {
            failovers: self.pool_failovers.with_label_values(&[name]),
            conflicts: self.pool_conflicts.with_label_values(&[name]),
        }
    }

    /// Handles for `backend` (its configured address) in `pool`.
    pub fn backend(&self, pool: &str, backend: &str) -> BackendMetrics {
        let l = [pool, backend];
        let err = |kind: ConnectErrorKind| {
            self.backend_connect_errors
                .with_label_values(&[pool, backend, kind.as_str()])
        };
        BackendMetrics {
            up: self.backend_up.with_label_values(&l),
            active: self.backend_active.with_label_values(&l),
            connections: self.backend_connections.with_label_values(&l),
            connections_active: self.backend_connections_active.with_label_values(&l),
            connect_errors: [
                err(ConnectErrorKind::Refused),
                err(ConnectErrorKind::Timeout),
                err(ConnectErrorKind::Other),
                err(ConnectErrorKind::Tls),
            ],
            connect_duration: self.backend_connect_duration.with_label_values(&l),
            checks_success: self
                .backend_health_checks
                .with_label_values(&[pool, backend, "success"]),
            checks_failure: self
                .backend_health_checks
                .with_label_values(&[pool, backend, "failure"]),
            to_up: self
                .backend_state_changes
                .with_label_values(&[pool, backend, "up"]),
            to_down: self
                .backend_state_changes
                .with_label_values(&[pool, backend, "down"]),
            bytes_in: self.backend_bytes.with_label_values(&[pool, backend, "in"]),
            bytes_out: self
                .backend_bytes
                .with_label_values(&[pool, backend, "out"]),
            role: ROLE_LABELS.map(|role| {
                let g = self.backend_role.with_label_values(&[pool, backend, role]);
                g.set(i64::from(role == "unknown"));
                g
            }),
            admin: ADMIN_LABELS.map(|state| {
                let g = self
                    .backend_admin_state
                    .with_label_values(&[pool, backend, state]);
                g.set(i64::from(state == "ready"));
                g
            }),
        }
    }

    /// Drop the series of a listener that was removed.
    pub fn remove_listener(&self, name: &str) {
        let _ = self.listener_connections.remove_label_values(&[name]);
        let _ = self.listener_active.remove_label_values(&[name]);
        for reason in RejectReason::ALL {
            let _ = self
                .listener_rejected
                .remove_label_values(&[name, reason.as_str()]);
        }
        for direction in ["in", "out"] {
            let _ = self.listener_bytes.remove_label_values(&[name, direction]);
        }
        let _ = self.listener_spliced.remove_label_values(&[name]);
        for path in ["normal", "sockmap"] {
            let _ = self.listener_relayed.remove_label_values(&[name, path]);
        }
        let _ = self.connection_duration.remove_label_values(&[name]);
        for r in HandshakeResult::ALL {
            let _ = self.tls_handshakes.remove_label_values(&[name, r.as_str()]);
        }
        let _ = self.tls_handshake_duration.remove_label_values(&[name]);
        for connection in ["new", "reused"] {
            let _ = self.http.upstream.remove_label_values(&[name, connection]);
        }
        let made = crate::sys::lock(&self.http.made).remove(name);
        for (pool, code) in made.into_iter().flatten() {
            let _ = self
                .http
                .requests
                .remove_label_values(&[name, pool.as_str(), code]);
            let _ = self
                .http
                .duration
                .remove_label_values(&[name, pool.as_str()]);
        }
    }

    /// Show exactly these certificates' expiry times.
    pub fn set_certificate_expiry(&self, certificates: &[CertificateExpiry]) {
        self.tls_certificate_expiry.reset();
        for c in certificates {
            self.tls_certificate_expiry
                .with_label_values(&[c.scope, c.name.as_str(), c.file.as_str()])
                .set(c.not_after);
        }
    }

    /// Drop the series of a pool that was removed (its backends separately).
    pub fn remove_pool(&self, name: &str) {
        let _ = self.pool_failovers.remove_label_values(&[name]);
        let _ = self.pool_conflicts.remove_label_values(&[name]);
    }

    /// Drop the series of a backend that left its pool.
    pub fn remove_backend(&self, pool: &str, backend: &str) {
        let l = [pool, backend];
        let _ = self.backend_up.remove_label_values(&l);
        let _ = self.backend_active.remove_label_values(&l);
        let _ = self.backend_connections.remove_label_values(&l);
        let _ = self.backend_connections_active.remove_label_values(&l);
        let _ = self.backend_connect_duration.remove_label_values(&l);
        for kind in [
            ConnectErrorKind::Refused,
            ConnectErrorKind::Timeout,
            ConnectErrorKind::Other,
            ConnectErrorKind::Tls,
        ] {
            let _ =
                self.backend_connect_errors
                    .remove_label_values(&[pool, backend, kind.as_str()]);
        }
        for result in ["success", "failure"] {
            let _ = self
                .backend_health_checks
                .remove_label_values(&[pool, backend, result]);
        }
        for to in ["up", "down"] {
            let _ = self
                .backend_state_changes
                .remove_label_values(&[pool, backend, to]);
        }
        for direction in ["in", "out"] {
            let _ = self
                .backend_bytes
                .remove_label_values(&[pool, backend, direction]);
        }
        for role in ROLE_LABELS {
            let _ = self
                .backend_role
                .remove_label_values(&[pool, backend, role]);
        }
        for state in ADMIN_LABELS {
            let _ = self
                .backend_admin_state
                .remove_label_values(&[pool, backend, state]);
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> Vec<u8> {
        // Connections on the kernel path count their bytes in BPF maps.
        crate::relay::sockmap::flush();
        let mut out = Vec::with_capacity(16 * 1024);
        // Encoding into a Vec cannot fail for well-formed families.
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            log::error!("cannot encode metrics: {e}");
        }
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// The content type of [`Metrics::render`]'s output.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn series_exist_before_anything_happens() {
        let m = Metrics::new();
        let _l = m.listener("web");
        let b = m.backend("app", "127.0.0.1:1");
        b.connect_errors(ConnectErrorKind::Timeout).inc();
        let text = String::from_utf8(m.render()).unwrap();
        for line in [
            "sluice_build_info{version=\"",
            "sluice_listener_rejected_total{listener=\"web\",reason=\"max_connections\"} 0",
            "sluice_listener_rejected_total{listener=\"web\",reason=\"no_backend\"} 0",
            "sluice_listener_bytes_total{direction=\"in\",listener=\"web\"} 0",
            "sluice_backend_connect_errors_total{backend=\"127.0.0.1:1\",kind=\"timeout\",pool=\"app\"} 1",
            "sluice_backend_connect_errors_total{backend=\"127.0.0.1:1\",kind=\"refused\",pool=\"app\"} 0",
        ] {
            assert!(text.contains(line), "missing {line}\n{text}");
        }
    }
}
