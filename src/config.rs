//! The YAML configuration: schema, defaults and validation.
//!
//! `Config::load` turns a file into validated, typed settings or into a list of
//! every problem found, each named by its YAML path (`pools.web.health_check.rise`)
//! and, where the parser knows it, its line and column. Nothing here binds or
//! connects: `sluice -t` runs exactly this code.

mod binds;
pub mod check;
mod decode;
pub mod edge;
pub mod http;
mod locate;
mod read;
pub mod tls;

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_yaml::Value;

pub use self::http::{BackendHttp, Forwarded, Hsts, HttpRoute, HttpSettings, Protocol};
pub use binds::{binds_overlap, ipv6_only_by_default};
pub use check::{
    CheckKind, Credentials, Expect, HttpCheck, Pattern, PostgresCheck, RoleRequirement, Secret,
    Step,
};
use decode::{Decoder, join};
pub use locate::Location;
use locate::Locations;
pub use read::{MAX_CONFIG_BYTES, MAX_SECRET_BYTES};
pub use tls::{BackendTls, ClientAuth, ListenerTls, Route, ServerTls, TlsMode, TlsVersion};

/// Default configuration file.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/sluice/sluice.yaml";
/// Default worker threads per listener.
pub const DEFAULT_THREADS: usize = 1;
/// Default time listeners keep accepting after SIGTERM.
pub const DEFAULT_GRACE_PERIOD: Duration = Duration::from_secs(1);
/// Default time open connections get to finish once listeners are closed.
pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(10);
/// Default pid file (written in daemon mode).
pub const DEFAULT_PID_FILE: &str = "/tmp/sluice.pid";
/// Default socket used to hand listeners to a new process on upgrade.
pub const DEFAULT_UPGRADE_SOCK: &str = "/tmp/sluice_upgrade.sock";
/// Default time allowed for a TCP connect to a backend.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Default number of backends tried per client connection.
pub const DEFAULT_CONNECT_ATTEMPTS: u32 = 3;
/// Default time between health-check rounds.
pub const DEFAULT_CHECK_INTERVAL: Duration = Duration::from_secs(2);
/// Default limit for one health check.
pub const DEFAULT_CHECK_TIMEOUT: Duration = Duration::from_secs(1);
/// Default consecutive successes that mark a backend up.
pub const DEFAULT_RISE: u32 = 2;
/// Default consecutive failures that mark a backend down.
pub const DEFAULT_FALL: u32 = 3;

/// The most backends one pool may hold (pingora's selector indexes with `u16`).
const MAX_BACKENDS: usize = 4096;
/// The shortest health-check interval, so a typo cannot make checks spin.
const MIN_CHECK_INTERVAL: Duration = Duration::from_millis(10);

/// The most problems listed for one file; past it they are only counted,
/// and a last entry says how many more there were.
pub const MAX_PROBLEMS: usize = 100;
/// The deepest nesting of YAML collections read (a configuration needs 6).
pub const MAX_DEPTH: usize = 32;
/// The most values (scalars and collections, aliases expanded) a file may
/// hold: ten pools of 4,096 backends written out in full take about 200,000.
pub const MAX_NODES: u64 = 1_000_000;

// The longest value of each duration key. Far past any useful setting, they
// keep every deadline computed from them (`now + value`) far from overflow.
const HOUR: Duration = Duration::from_secs(3_600);
const DAY: Duration = Duration::from_secs(86_400);
/// `server.grace_period`: a load balancer in front notices an unready
/// backend within seconds; an hour is already a stuck shutdown.
pub const MAX_GRACE_PERIOD: Duration = HOUR;
/// `server.shutdown_timeout`: long-lived connections (database sessions,
/// tunnels) may deserve hours to finish; a day bounds it.
pub const MAX_SHUTDOWN_TIMEOUT: Duration = DAY;
/// `listeners.*.idle_timeout`: idle database sessions are commonly kept for
/// hours (MySQL's default `wait_timeout` is 8 h); without a key, never.
pub const MAX_IDLE_TIMEOUT: Duration = DAY;
/// `pools.*.connect_timeout`: the kernel gives up a connect after about two
/// minutes of SYN retries anyway.
pub const MAX_CONNECT_TIMEOUT: Duration = Duration::from_secs(300);
/// `health_check.interval`: with `rise` and `fall` counted in rounds, rounds
/// further apart than an hour would notice a failure hours late.
pub const MAX_CHECK_INTERVAL: Duration = HOUR;
/// `health_check.timeout`: a check that has no answer in five minutes has
/// failed (and the timeout is at most `interval` too).
pub const MAX_CHECK_TIMEOUT: Duration = Duration::from_secs(300);
/// The longest `primary_hold`: a day (refusing writes longer than that is
/// an outage, not a guard).
pub const MAX_PRIMARY_HOLD: Duration = DAY;

/// A validated configuration.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    /// Process-wide settings.
    pub server: ServerSettings,
    /// The admin listener, if any.
    pub admin: Option<AdminSettings>,
    /// Listeners in file order.
    pub listeners: Vec<ListenerSettings>,
    /// Pools in file order.
    pub pools: Vec<PoolSettings>,
    /// The access log, if on.
    pub access_log: Option<crate::access_log::Settings>,
    /// Things that are valid but probably not what was meant.
    pub warnings: Vec<String>,
}

/// The `server` section.
#[derive(Clone, Debug, PartialEq)]
pub struct ServerSettings {
    /// Worker threads per listener.
    pub threads: usize,
    /// After SIGTERM, how long listeners keep accepting before they close.
    pub grace_period: Duration,
    /// After listeners close, how long open connections may run before they are cut.
    pub shutdown_timeout: Duration,
    /// Pid file, written in daemon mode.
    pub pid_file: String,
    /// Unix socket used for graceful upgrades.
    pub upgrade_sock: String,
}

/// The `admin` section.
#[derive(Clone, Debug, PartialEq)]
pub struct AdminSettings {
    /// Address of the admin HTTP listener.
    pub bind: SocketAddr,
    /// Who may use it: the token and the host names it answers to.
    pub access: edge::AdminAccess,
}

/// One entry of `listeners`.
#[derive(Clone, Debug, PartialEq)]
pub struct ListenerSettings {
    /// The listener's name (a metric label).
    pub name: String,
    /// Addresses to listen on.
    pub bind: Vec<SocketAddr>,
    /// Name of the pool connections are forwarded to. With SNI `routes`,
    /// the one the listener waits for before it opens: `default_pool`, or
    /// the first route's.
    pub pool: String,
    /// Beyond this many open connections, new clients are refused.
    pub max_connections: Option<usize>,
    /// Close a connection when no byte has moved either way for this long.
    pub idle_timeout: Option<Duration>,
    /// Relay plain TCP with `splice(2)` (zero-copy) rather than through buffers.
    pub splice: bool,
    /// Only these sources may connect (`None`: any not denied).
    pub allow: Option<Vec<ipnet::IpNet>>,
    /// These sources may not connect; wins over `allow`.
    pub deny: Vec<ipnet::IpNet>,
    /// Limits per client address.
    pub per_source: Option<edge::PerSource>,
    /// PROXY protocol headers required from trusted proxies.
    pub proxy_protocol: Option<edge::ProxyAccept>,
    /// Move established connections' bytes inside the kernel (`fast_path`).
    pub fast_path: FastPath,
    /// TLS termination or passthrough, with SNI routes.
    pub tls: Option<ListenerTls>,
    /// `tcp` (bytes relayed) or `http` (requests proxied).
    pub protocol: Protocol,
    /// With `protocol: http`: its settings (`Some` exactly then).
    pub http: Option<Box<HttpSettings>>,
}

/// The listener key `fast_path`: where an established connection's bytes move.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum FastPath {
    /// In sluice's own relay (user space).
    #[default]
    Off,
    /// In the kernel: a BPF sockhash redirects each socket's data to its
    /// peer; falls back to `Off` where the kernel refuses BPF or fails
    /// sluice's start-up checks (see `relay::sockmap`).
    Sockmap,
}

/// How a pool spreads connections over its backends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Algorithm {
    /// Weighted round robin.
    RoundRobin,
    /// Fewest open connections relative to weight.
    LeastConnections,
    /// Weighted random.
    Random,
    /// Consistent hash of the client address.
    SourceHash,
}

/// Whether all healthy backends serve, or one at a time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Every healthy non-backup backend takes connections.
    ActiveActive,
    /// Exactly one backend takes connections: the first healthy in list order.
    ActivePassive,
}

/// What happens when a preferred backend recovers in `active_passive` mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failback {
    /// Traffic returns to the earlier backend once it is up.
    Auto,
    /// Traffic stays on the current backend until it fails or an operator moves it.
    Manual,
}

/// What happens to established connections when their backend stops serving.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SessionPolicy {
    /// They run on until they end.
    Keep,
    /// They are closed, so clients reconnect to a backend that serves.
    Close,
}

impl SessionPolicy {
    /// The name used in the YAML file.
    pub fn as_str(self) -> &'static str {
        match self {
            SessionPolicy::Keep => "keep",
            SessionPolicy::Close => "close",
        }
    }
}

/// One entry of `pools`.
#[derive(Clone, Debug, PartialEq)]
pub struct PoolSettings {
    /// The pool's name (a metric label).
    pub name: String,
    /// Selection algorithm among serving backends.
    pub algorithm: Algorithm,
    /// active_active or active_passive.
    pub mode: Mode,
    /// Failback policy (meaningful in active_passive mode).
    pub failback: Failback,
    /// Limit for one connect to a backend.
    pub connect_timeout: Duration,
    /// Backends tried per client connection.
    pub connect_attempts: u32,
    /// Connections to a backend that is marked down.
    pub on_backend_down: SessionPolicy,
    /// Connections on a standby when traffic fails back (active_passive, failback auto).
    pub on_failback: SessionPolicy,
    /// Active health checking.
    pub health_check: HealthCheckSettings,
    /// The role a backend must report to take traffic.
    pub role: RoleRequirement,
    /// `role: replica`: send reads to the primary while no replica is up.
    pub fallback_to_primary: bool,
    /// How long a backend that claimed primary while another held the
    /// writes must be the only claimant before it gets them.
    pub primary_hold: Duration,
    /// Write a PROXY protocol header with the client's address to each
    /// backend connection first.
    pub proxy_protocol: Option<edge::ProxyVersion>,
    /// Backends in priority order.
    pub backends: Vec<BackendSettings>,
    /// TLS to the backends.
    pub tls: Option<BackendTls>,
    /// The HTTP version HTTP listeners speak to the backends; `None`: not
    /// set (HTTP/1.1).
    pub http_version: Option<BackendHttp>,
}

/// A pool's `health_check` section.
#[derive(Clone, Debug, PartialEq)]
pub struct HealthCheckSettings {
    /// Check protocol.
    pub kind: CheckKind,
    /// Time between rounds.
    pub interval: Duration,
    /// Limit for one check (name resolution included).
    pub timeout: Duration,
    /// Consecutive successes that mark a backend up.
    pub rise: u32,
    /// Consecutive failures that mark a backend down.
    pub fall: u32,
    /// Whether failed connects of real traffic count as failures too.
    pub passive: bool,
}

/// One backend of a pool.
#[derive(Clone, Debug, PartialEq)]
pub struct BackendSettings {
    /// Where the backend listens.
    pub address: HostPort,
    /// Relative share of connections, 1..=256.
    pub weight: u32,
    /// Serves only while no non-backup backend is up.
    pub backup: bool,
}

/// A `host:port` address whose host may be an IP literal or a DNS name.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct HostPort {
    text: String,
    host: String,
    port: u16,
}

/// One problem found in a configuration file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// YAML path, such as `pools.web.health_check.rise`; empty for the whole file.
    pub path: String,
    /// What is wrong.
    pub message: String,
    /// Where the path starts in the file, where known.
    pub location: Option<Location>,
}

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file was read and is invalid; every problem is listed, up to
    /// [`MAX_PROBLEMS`]: past it, one last entry without a path says how
    /// many more there were.
    #[error("{}", ProblemList(.0))]
    Invalid(Vec<Problem>),
}

struct ProblemList<'a>(&'a [Problem]);

impl fmt::Display for ProblemList<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{p}")?;
        }
        Ok(())
    }
}

impl Problem {
    pub(crate) fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        Problem {
            path: path.into(),
            message: message.into(),
            location: None,
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            write!(f, "{}", self.message)?;
        } else {
            write!(f, "{}: {}", self.path, self.message)?;
        }
        if let Some(l) = self.location {
            write!(f, " (line {}, column {})", l.line, l.column)?;
        }
        Ok(())
    }
}

impl HostPort {
    /// Parse `host:port`; IPv6 hosts go in brackets (`[::1]:80`).
    pub fn parse(text: &str) -> Result<Self, String> {
        let (host, port) = if let Some(rest) = text.strip_prefix('[') {
            let (host, after) = rest
                .split_once(']')
                .ok_or_else(|| format!("`{text}` has `[` without a closing `]`"))?;
            let port = after
                .strip_prefix(':')
                .ok_or_else(|| format!("`{text}` has no port; write it as [host]:port"))?;
            if host.parse::<std::net::Ipv6Addr>().is_err() {
                return Err(format!("`{host}` in `{text}` is not an IPv6 address"));
            }
            (host, port)
        } else {
            let (host, port) = text
                .rsplit_once(':')
                .ok_or_else(|| format!("`{text}` has no port; write it as host:port"))?;
            if host.contains(':') {
                return Err(format!(
                    "`{text}`: an IPv6 address needs brackets, like [::1]:80"
                ));
            }
            if host.parse::<std::net::Ipv4Addr>().is_err() && !is_dns_name(host) {
                return Err(format!(
                    "`{host}` in `{text}` is neither an IP address nor a DNS name"
                ));
            }
            (host, port)
        };
        let port: u16 = port
            .parse()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("`{port}` in `{text}` is not a port (1-65535)"))?;
        Ok(HostPort {
            text: text.to_string(),
            host: host.to_string(),
            port,
        })
    }

    /// The host part, without brackets.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The address when the host is an IP literal.
    pub fn socket_addr(&self) -> Option<SocketAddr> {
        self.host
            .parse::<IpAddr>()
            .ok()
            .map(|ip| SocketAddr::new(ip, self.port))
    }

    /// The text as written in the file.
    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl fmt::Display for HostPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

fn is_dns_name(host: &str) -> bool {
    let host = host.strip_suffix('.').unwrap_or(host);
    !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        })
        // An all-numeric name is a malformed IPv4 address, not a host name.
        && !host.split('.').all(|l| l.chars().all(|c| c.is_ascii_digit()))
}

fn is_valid_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
}

impl Default for ServerSettings {
    fn default() -> Self {
        ServerSettings {
            threads: DEFAULT_THREADS,
            grace_period: DEFAULT_GRACE_PERIOD,
            shutdown_timeout: DEFAULT_SHUTDOWN_TIMEOUT,
            pid_file: DEFAULT_PID_FILE.to_string(),
            upgrade_sock: DEFAULT_UPGRADE_SOCK.to_string(),
        }
    }
}

impl Default for HealthCheckSettings {
    fn default() -> Self {
        HealthCheckSettings {
            kind: CheckKind::Tcp,
            interval: DEFAULT_CHECK_INTERVAL,
            timeout: DEFAULT_CHECK_TIMEOUT,
            rise: DEFAULT_RISE,
            fall: DEFAULT_FALL,
            passive: true,
        }
    }
}

impl Algorithm {
    /// The name used in the YAML file.
    pub fn as_str(self) -> &'static str {
        match self {
            Algorithm::RoundRobin => "round_robin",
            Algorithm::LeastConnections => "least_connections",
            Algorithm::Random => "random",
            Algorithm::SourceHash => "source_hash",
        }
    }
}

impl Mode {
    /// The name used in the YAML file.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::ActiveActive => "active_active",
            Mode::ActivePassive => "active_passive",
        }
    }
}

impl Failback {
    /// The name used in the YAML file.
    pub fn as_str(self) -> &'static str {
        match self {
            Failback::Auto => "auto",
            Failback::Manual => "manual",
        }
    }
}

impl Config {
    /// Read and validate the file at `path`: a regular file of at most
    /// [`MAX_CONFIG_BYTES`] (anything else is refused at once, never waited on).
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let src =
            read::read_bounded(path, MAX_CONFIG_BYTES).map_err(|source| ConfigError::Read {
                path: path.to_path_buf(),
                source,
            })?;
        Config::from_yaml(&src)
    }

    /// Validate a YAML document.
    ///
    /// ```
    /// use sluice::config::{Config, ConfigError};
    ///
    /// let ok = Config::from_yaml(
    ///     "listeners: { web: { bind: 0.0.0.0:8080, pool: app } }\n\
    ///      pools: { app: { backends: [10.0.0.1:80, 10.0.0.2:80] } }",
    /// )
    /// .unwrap();
    /// assert_eq!(ok.pools[0].backends.len(), 2);
    ///
    /// let Err(ConfigError::Invalid(problems)) = Config::from_yaml(
    ///     "listeners: { web: { bind: 0.0.0.0:8080, pool: app } }\n\
    ///      pools: { app: { health_check: { rise: 0 }, backends: [10.0.0.1:80] } }",
    /// ) else {
    ///     panic!("rise 0 is invalid")
    /// };
    /// assert_eq!(problems[0].to_string(), "pools.app.health_check.rise: must be at least 1 (line 2, column 33)");
    /// ```
    pub fn from_yaml(src: &str) -> Result<Config, ConfigError> {
        // Editors on Windows start files with a byte order mark; it is no content.
        let src = src.strip_prefix('\u{feff}').unwrap_or(src);
        // Before serde_yaml, which takes time quadratic in the nesting depth
        // and memory in the aliases expanded. Its syntax errors are
        // yaml-rust2's: past one, the shape of the rest is unknown.
        if let Err(e) = locate::check_shape(src, MAX_DEPTH, MAX_NODES) {
            return Err(ConfigError::Invalid(vec![Problem {
                path: String::new(),
                message: e.message,
                location: Some(e.location),
            }]));
        }
        let mut value: Value = match serde_yaml::from_str(src) {
            Ok(v) => v,
            Err(e) => {
                let location = e.location().map(|l| Location {
                    line: l.line(),
                    column: l.column(),
                });
                // serde_yaml appends " at line L column C"; the location says it already.
                let mut message = e.to_string();
                if let Some(cut) = message.find(" at line ") {
                    message.truncate(cut);
                }
                return Err(ConfigError::Invalid(vec![Problem {
                    path: String::new(),
                    message: format!("not valid YAML: {message}"),
                    location,
                }]));
            }
        };
        if let Err(e) = value.apply_merge() {
            return Err(ConfigError::Invalid(vec![Problem::new(
                "",
                format!("bad merge key: {e}"),
            )]));
        }
        let mut d = Decoder::default();
        let config = decode_config(&mut d, &value);
        if d.problems.is_empty() {
            if let Some(config) = config {
                return Ok(config);
            }
            d.problem("", "invalid configuration");
        }
        let (mut problems, more) = d.problems.into_parts();
        let locations = Locations::of(src, problems.iter().map(|p| p.path.as_str()));
        for p in &mut problems {
            p.location = locations.find(&p.path);
        }
        // Report in file order; problems without a position go last.
        problems.sort_by_key(|p| p.location.map_or((usize::MAX, 0), |l| (l.line, l.column)));
        if more > 0 {
            problems.push(Problem::new(
                "",
                format!(
                    "and {more} more problem{} (only the first {MAX_PROBLEMS} are listed)",
                    if more == 1 { "" } else { "s" }
                ),
            ));
        }
        Err(ConfigError::Invalid(problems))
    }

    /// The pool named `name`.
    pub fn pool(&self, name: &str) -> Option<&PoolSettings> {
        self.pools.iter().find(|p| p.name == name)
    }
}

fn decode_config(d: &mut Decoder, root: &Value) -> Option<Config> {
    if root.is_null() {
        d.problem(
            "",
            "the file is empty; it needs at least `listeners` and `pools`",
        );
        return None;
    }
    let top = d.mapping(
        root,
        "",
        &["server", "admin", "listeners", "pools", "access_log"],
    )?;
    let access_log = top.get("access_log").and_then(|v| decode_access_log(d, v));

    let server = match top.get("server") {
        Some(v) => decode_server(d, v),
        None => Some(ServerSettings::default()),
    };
    let admin = top.get("admin").map(|v| decode_admin(d, v));

    let (pools, pool_names) = named_entries(d, &top, "pools", decode_pool);
    let (listeners, _) = named_entries(d, &top, "listeners", decode_listener);

    let mut warnings = Vec::new();
    for l in &listeners {
        // With no pools at all, that is the problem already reported; a
        // routed listener's pools are checked with its routes.
        let routed = l.tls.as_ref().is_some_and(|t| !t.routes.is_empty())
            || l.http.as_ref().is_some_and(|h| h.default_pool.is_none());
        if !routed && !pool_names.is_empty() && !pool_names.contains(&l.pool) {
            // A file may name thousands of pools: the message lists a few.
            const LISTED: usize = 10;
            let mut names = pool_names[..pool_names.len().min(LISTED)].join(", ");
            if pool_names.len() > LISTED {
                names.push_str(&format!(" and {} more", pool_names.len() - LISTED));
            }
            d.problem(
                format!("listeners.{}.pool", l.name),
                format!("no pool is named `{}` (pools: {names})", l.pool),
            );
        }
    }
    tls::check(d, &listeners, &pools, &pool_names, &mut warnings);
    http::check(d, &listeners, &pools, &pool_names);
    for p in &pools {
        if !listeners.iter().any(|l| tls::uses_pool(l, &p.name)) {
            warnings.push(format!("pools.{}: no listener uses this pool", p.name));
        }
    }
    let binds = binds::check_conflicts(d, &listeners, admin.as_ref().and_then(|a| a.as_ref()));
    binds::check_loops(d, &listeners, &pools, &binds);

    // Callers only use the result when no problem was recorded.
    Some(Config {
        server: server?,
        admin: admin.flatten(),
        listeners,
        pools,
        access_log,
        warnings,
    })
}

/// Decode a mapping of name -> entry such as `listeners` or `pools`, returning
/// the entries that decoded and every name written, valid or not.
fn named_entries<T>(
    d: &mut Decoder,
    top: &decode::Fields<'_>,
    section: &str,
    decode_one: fn(&mut Decoder, &str, &Value, &str) -> Option<T>,
) -> (Vec<T>, Vec<String>) {
    let (mut out, mut names) = (Vec::new(), Vec::new());
    let Some(value) = top.get(section) else {
        d.problem(section, "is required");
        return (out, names);
    };
    let Value::Mapping(map) = value else {
        d.problem(
            section,
            format!(
                "must be a mapping of name to settings, found {}",
                decode::kind(value)
            ),
        );
        return (out, names);
    };
    if map.is_empty() {
        d.problem(section, "must have at least one entry");
    }
    for (key, entry) in map {
        let Some(name) = key.as_str() else {
            d.problem(
                section,
                format!("names must be strings, found {}", decode::kind(key)),
            );
            continue;
        };
        let path = join(section, name);
        if !is_valid_name(name) {
            d.problem(&path, "names may only use a-z, 0-9, `_` and `-`");
        }
        names.push(name.to_string());
        if let Some(v) = decode_one(d, name, entry, &path) {
            out.push(v);
        }
    }
    (out, names)
}

fn decode_server(d: &mut Decoder, v: &Value) -> Option<ServerSettings> {
    let f = d.mapping(
        v,
        "server",
        &[
            "threads",
            "grace_period",
            "shutdown_timeout",
            "pid_file",
            "upgrade_sock",
        ],
    )?;
    let before = d.problems.len();
    let mut s = ServerSettings::default();
    if let Some(v) = f.get("threads") {
        s.threads = d.integer(v, &f.path("threads"), 1, 1024).unwrap_or(1) as usize;
    }
    if let Some(v) = f.get("grace_period") {
        s.grace_period = d
            .duration_within(v, &f.path("grace_period"), Duration::ZERO, MAX_GRACE_PERIOD)
            .unwrap_or_default();
    }
    if let Some(v) = f.get("shutdown_timeout") {
        s.shutdown_timeout = d
            .duration_within(
                v,
                &f.path("shutdown_timeout"),
                Duration::ZERO,
                MAX_SHUTDOWN_TIMEOUT,
            )
            .unwrap_or_default();
    }
    for (key, slot) in [
        ("pid_file", &mut s.pid_file),
        ("upgrade_sock", &mut s.upgrade_sock),
    ] {
        if let Some(v) = f.get(key) {
            match d.string(v, &f.path(key)) {
                Some("") => d.problem(f.path(key), "must not be empty"),
                Some(p) => *slot = p.to_string(),
                None => {}
            }
        }
    }
    (d.problems.len() == before).then_some(s)
}

fn decode_access_log(d: &mut Decoder, v: &Value) -> Option<crate::access_log::Settings> {
    use crate::access_log::{Format, Settings, Target};
    let f = d.mapping(v, "access_log", &["path", "format"])?;
    let target = match f.get("path") {
        None => {
            d.problem(f.path("path"), "is required: a file, or stdout");
            None
        }
        Some(v) => d.string(v, &f.path("path")).and_then(|p| match p.trim() {
            "stdout" | "-" => Some(Target::Stdout),
            "" => {
                d.problem(f.path("path"), "must not be empty");
                None
            }
            p => Some(Target::File(PathBuf::from(p))),
        }),
    };
    let format = match f.get("format") {
        None => Some(Format::Json),
        Some(v) => d.choice(
            v,
            &f.path("format"),
            &[("json", Format::Json), ("logfmt", Format::Logfmt)],
        ),
    };
    Some(Settings {
        target: target?,
        format: format?,
    })
}

fn decode_admin(d: &mut Decoder, v: &Value) -> Option<AdminSettings> {
    let f = d.mapping(
        v,
        "admin",
        &["bind", "token_file", "token_env", "protect_reads", "hosts"],
    )?;
    let access = edge::admin_access(d, &f);
    let Some(bind) = f.get("bind") else {
        d.problem(f.path("bind"), "is required");
        return None;
    };
    let bind = decode_bind_addr(d, bind, &f.path("bind"))?;
    Some(AdminSettings { bind, access })
}

fn decode_bind_addr(d: &mut Decoder, v: &Value, path: &str) -> Option<SocketAddr> {
    let s = d.string(v, path)?;
    match s.parse::<SocketAddr>() {
        Ok(a) if a.port() == 0 => {
            d.problem(path, format!("`{s}` needs a port (1-65535)"));
            None
        }
        Ok(a) => Some(a),
        Err(_) => {
            let hint = match HostPort::parse(s) {
                Ok(_) => " (host names are not allowed here)".to_string(),
                Err(e) => format!(" ({e})"),
            };
            d.problem(
                path,
                format!(
                    "`{s}` must be an IP address and port, like 0.0.0.0:8080 or [::]:8080{hint}"
                ),
            );
            None
        }
    }
}

fn decode_listener(d: &mut Decoder, name: &str, v: &Value, path: &str) -> Option<ListenerSettings> {
    let f = d.mapping(
        v,
        path,
        &[
            "bind",
            "pool",
            "max_connections",
            "idle_timeout",
            "splice",
            "allow",
            "deny",
            "per_source",
            "proxy_protocol",
            "fast_path",
            "tls",
            "routes",
            "default_pool",
            "protocol",
            "http",
        ],
    )?;
    let tls = tls::decode_listener(d, &f);
    let protocol = http::decode_protocol(d, &f);
    let is_http = protocol == Some(Protocol::Http);
    if !is_http && f.get("http").is_some() {
        d.problem(f.path("http"), "only applies with protocol: http");
    }
    if is_http {
        for key in http::TCP_ONLY_KEYS {
            if f.get(key).is_some() {
                d.problem(
                    f.path(key),
                    "moves raw bytes; it has no meaning with protocol: http",
                );
            }
        }
    }

    let mut bind = Vec::new();
    match f.get("bind") {
        None => d.problem(f.path("bind"), "is required"),
        Some(Value::Sequence(items)) => {
            if items.is_empty() {
                d.problem(f.path("bind"), "must list at least one address");
            }
            for (i, item) in items.iter().enumerate() {
                if let Some(a) = decode_bind_addr(d, item, &format!("{}[{i}]", f.path("bind"))) {
                    bind.push(a);
                }
            }
        }
        Some(other) => {
            if let Some(a) = decode_bind_addr(d, other, &f.path("bind")) {
                bind.push(a);
            }
        }
    }

    let routed = tls.as_ref().filter(|t| !t.routes.is_empty());
    let pool = match f.get("pool") {
        // With routes, the listener waits for this pool before it opens.
        None if routed.is_some() => routed.and_then(|t| {
            t.default_pool
                .clone()
                .or(t.routes.first().map(|r| r.pool.clone()))
        }),
        None if f.get("routes").is_some() => None,
        None if is_http => None,
        None => {
            d.problem(f.path("pool"), "is required");
            None
        }
        Some(v) => d.string(v, &f.path("pool")).map(str::to_string),
    };
    let max_connections = f.get("max_connections").and_then(|v| {
        d.integer(v, &f.path("max_connections"), 1, 10_000_000)
            .map(|n| n as usize)
    });
    let idle_timeout = f.get("idle_timeout").and_then(|v| {
        d.duration_within(
            v,
            &f.path("idle_timeout"),
            Duration::from_millis(1),
            MAX_IDLE_TIMEOUT,
        )
    });

    let splice = f
        .get("splice")
        .and_then(|v| d.boolean(v, &f.path("splice")))
        .unwrap_or(true);
    let allow = f
        .get("allow")
        .and_then(|v| edge::prefixes(d, v, &f.path("allow")));
    if allow.as_ref().is_some_and(Vec::is_empty) {
        d.problem(
            f.path("allow"),
            "is empty, which would refuse everyone; remove the key to allow all",
        );
    }
    let deny = f
        .get("deny")
        .and_then(|v| edge::prefixes(d, v, &f.path("deny")))
        .unwrap_or_default();
    let per_source = f
        .get("per_source")
        .and_then(|v| edge::per_source(d, v, &f.path("per_source")));
    let proxy_protocol = f
        .get("proxy_protocol")
        .and_then(|v| edge::proxy_accept(d, v, &f.path("proxy_protocol")));
    // `off` is a string in YAML 1.2 and a boolean in 1.1: take both.
    let fast_path = match f.get("fast_path") {
        None | Some(Value::Bool(false)) => FastPath::Off,
        Some(v) => d
            .choice(
                v,
                &f.path("fast_path"),
                &[("sockmap", FastPath::Sockmap), ("off", FastPath::Off)],
            )
            .unwrap_or_default(),
    };

    let http = match is_http {
        true => Some(Box::new(http::decode(
            d,
            &f,
            pool.clone(),
            idle_timeout,
            tls.is_some(),
        )?)),
        false => None,
    };
    // An HTTP listener without `pool` waits for its first route's pool.
    let pool = pool.or_else(|| {
        http.as_ref()
            .and_then(|h| h.routes.first().map(|r| r.pool.clone()))
    });
    if bind.is_empty() {
        return None;
    }
    Some(ListenerSettings {
        name: name.to_string(),
        bind,
        pool: pool?,
        max_connections,
        idle_timeout,
        splice,
        allow,
        deny,
        per_source,
        proxy_protocol,
        fast_path,
        tls,
        protocol: protocol?,
        http,
    })
}

fn decode_pool(d: &mut Decoder, name: &str, v: &Value, path: &str) -> Option<PoolSettings> {
    let f = d.mapping(
        v,
        path,
        &[
            "algorithm",
            "mode",
            "failback",
            "connect_timeout",
            "connect_attempts",
            "on_backend_down",
            "on_failback",
            "health_check",
            "role",
            "fallback_to_primary",
            "primary_hold",
            "proxy_protocol",
            "backends",
            "tls",
            "http_version",
        ],
    )?;
    let tls = tls::decode_pool(d, &f);
    let http_version = f
        .get("http_version")
        .and_then(|v| http::decode_backend_http(d, v, &f.path("http_version"), &f));

    let algorithm_set = f.get("algorithm").map(|v| {
        d.choice(
            v,
            &f.path("algorithm"),
            &[
                ("round_robin", Algorithm::RoundRobin),
                ("least_connections", Algorithm::LeastConnections),
                ("random", Algorithm::Random),
                ("source_hash", Algorithm::SourceHash),
            ],
        )
    });
    let mode = match f.get("mode") {
        Some(v) => d.choice(
            v,
            &f.path("mode"),
            &[
                ("active_active", Mode::ActiveActive),
                ("active_passive", Mode::ActivePassive),
            ],
        ),
        None => Some(Mode::ActiveActive),
    };
    let failback_set = f.get("failback").map(|v| {
        d.choice(
            v,
            &f.path("failback"),
            &[("auto", Failback::Auto), ("manual", Failback::Manual)],
        )
    });
    let connect_timeout = match f.get("connect_timeout") {
        Some(v) => d.duration_within(
            v,
            &f.path("connect_timeout"),
            Duration::from_millis(1),
            MAX_CONNECT_TIMEOUT,
        ),
        None => Some(DEFAULT_CONNECT_TIMEOUT),
    };
    let connect_attempts = match f.get("connect_attempts") {
        Some(v) => d
            .integer(v, &f.path("connect_attempts"), 1, 100)
            .map(|n| n as u32),
        None => Some(DEFAULT_CONNECT_ATTEMPTS),
    };
    let policies = [
        ("keep", SessionPolicy::Keep),
        ("close", SessionPolicy::Close),
    ];
    let on_backend_down = f
        .get("on_backend_down")
        .and_then(|v| d.choice(v, &f.path("on_backend_down"), &policies))
        .unwrap_or(SessionPolicy::Keep);
    let on_failback_set = f
        .get("on_failback")
        .map(|v| d.choice(v, &f.path("on_failback"), &policies));
    let mut health_check = match f.get("health_check") {
        Some(v) => decode_health_check(d, v, &f.path("health_check")),
        None => Some(HealthCheckSettings::default()),
    };
    let kind_set = f
        .get("health_check")
        .is_some_and(|h| h.get("kind").is_some_and(|k| !k.is_null()));
    if let Some(hc) = &mut health_check {
        // A TLS pool's checks handshake too, unless told otherwise.
        if f.get("tls").is_some_and(|t| t != &Value::Bool(false)) && !kind_set {
            hc.kind = CheckKind::Tls;
        } else if hc.kind == CheckKind::Tls && f.get("tls").is_none_or(|t| t == &Value::Bool(false))
        {
            d.problem(
                format!("{}.kind", f.path("health_check")),
                "`tls` handshakes with the backends: the pool needs tls",
            );
        }
    }
    let role = f
        .get("role")
        .and_then(|v| {
            d.choice(
                v,
                &f.path("role"),
                &[
                    ("any", RoleRequirement::Any),
                    ("primary", RoleRequirement::Primary),
                    ("replica", RoleRequirement::Replica),
                ],
            )
        })
        .unwrap_or_default();
    let fallback_to_primary = f
        .get("fallback_to_primary")
        .and_then(|v| d.boolean(v, &f.path("fallback_to_primary")))
        .unwrap_or(false);
    if fallback_to_primary && role != RoleRequirement::Replica {
        d.problem(
            f.path("fallback_to_primary"),
            "only applies to role: replica",
        );
    }
    let primary_hold_set = f
        .get("primary_hold")
        .map(|v| d.duration_within(v, &f.path("primary_hold"), Duration::ZERO, MAX_PRIMARY_HOLD));
    let decides_primary = role == RoleRequirement::Primary
        || (role == RoleRequirement::Replica && fallback_to_primary);
    if primary_hold_set.is_some() && !decides_primary {
        d.problem(
            f.path("primary_hold"),
            "only applies to role: primary, or role: replica with fallback_to_primary",
        );
    }
    if let Some(hc) = &health_check {
        if role != RoleRequirement::Any && !hc.kind.reports_role() {
            d.problem(
                f.path("role"),
                format!(
                    "`{}` needs a health check that reports roles: kind redis, mysql or postgres, \
                     or http with primary_path (this pool's check is `{}`)",
                    role.as_str(),
                    hc.kind.name()
                ),
            );
        }
    }
    let backends = match f.get("backends") {
        None => {
            d.problem(
                f.path("backends"),
                "is required: a pool needs at least one backend",
            );
            None
        }
        Some(v) => decode_backends(d, v, &f.path("backends")),
    };

    if let Some(mode) = mode {
        if mode == Mode::ActiveActive && failback_set.is_some() {
            d.problem(f.path("failback"), "only applies to mode active_passive");
        }
        let auto_failback = !matches!(failback_set, Some(Some(Failback::Manual)));
        if on_failback_set.is_some() && (mode != Mode::ActivePassive || !auto_failback) {
            d.problem(
                f.path("on_failback"),
                "only applies to mode active_passive with failback: auto",
            );
        }
        if mode == Mode::ActivePassive && algorithm_set.is_some() {
            d.problem(
                f.path("algorithm"),
                "has no effect in mode active_passive: one backend serves at a time, in list order",
            );
        }
        if let Some(backends) = &backends {
            check_backend_roles(d, mode, &f.path("backends"), backends);
        }
    }

    let proxy_protocol = f
        .get("proxy_protocol")
        .and_then(|v| edge::proxy_send(d, v, &f.path("proxy_protocol")));
    let health_check = health_check.unwrap_or_default();
    let primary_hold = primary_hold_set
        .flatten()
        .unwrap_or_else(|| default_primary_hold(&health_check));
    // Bad values were reported; stand-ins keep the pool for cross-checks.
    Some(PoolSettings {
        name: name.to_string(),
        algorithm: algorithm_set.flatten().unwrap_or(Algorithm::RoundRobin),
        mode: mode.unwrap_or(Mode::ActiveActive),
        failback: failback_set.flatten().unwrap_or(Failback::Auto),
        connect_timeout: connect_timeout.unwrap_or(DEFAULT_CONNECT_TIMEOUT),
        connect_attempts: connect_attempts.unwrap_or(DEFAULT_CONNECT_ATTEMPTS),
        on_backend_down,
        on_failback: on_failback_set.flatten().unwrap_or(SessionPolicy::Keep),
        health_check,
        role,
        fallback_to_primary,
        primary_hold,
        proxy_protocol,
        backends: backends?.into_iter().map(|(b, _)| b).collect(),
        tls,
        http_version,
    })
}

/// The default `primary_hold`: `rise` + 2 check intervals, longer than a
/// blip of the real primary takes (marked down, then `rise` checks to come
/// back), so such a blip cannot hand the writes to a stale claimant.
pub fn default_primary_hold(hc: &HealthCheckSettings) -> Duration {
    hc.interval
        .saturating_mul(hc.rise.saturating_add(2))
        .min(MAX_PRIMARY_HOLD)
}

/// Backends with, for each, whether `weight` and `backup` were written out.
type DecodedBackend = (BackendSettings, (bool, bool));

fn decode_backends(d: &mut Decoder, v: &Value, path: &str) -> Option<Vec<DecodedBackend>> {
    let Value::Sequence(items) = v else {
        d.problem(
            path,
            format!("must be a list of backends, found {}", decode::kind(v)),
        );
        return None;
    };
    if items.is_empty() {
        d.problem(path, "must list at least one backend");
        return None;
    }
    if items.len() > MAX_BACKENDS {
        d.problem(path, format!("must list at most {MAX_BACKENDS} backends"));
        return None;
    }
    let mut out = Vec::with_capacity(items.len());
    let mut seen: HashMap<String, usize> = HashMap::new();
    for (i, item) in items.iter().enumerate() {
        let item_path = format!("{path}[{i}]");
        let Some(b) = decode_backend(d, item, &item_path) else {
            continue;
        };
        if let Some(first) = seen.insert(b.0.address.as_str().to_ascii_lowercase(), i) {
            d.problem(
                format!("{item_path}.address"),
                format!("`{}` is already listed as {path}[{first}]", b.0.address),
            );
        }
        out.push(b);
    }
    (out.len() == items.len()).then_some(out)
}

fn decode_backend(d: &mut Decoder, v: &Value, path: &str) -> Option<DecodedBackend> {
    // Shorthand: a plain `host:port` string.
    if let Value::String(s) = v {
        return match HostPort::parse(s) {
            Ok(address) => Some((
                BackendSettings {
                    address,
                    weight: 1,
                    backup: false,
                },
                (false, false),
            )),
            Err(e) => {
                d.problem(path, e);
                None
            }
        };
    }
    let f = d.mapping(v, path, &["address", "weight", "backup"])?;
    let address = match f.get("address") {
        None => {
            d.problem(f.path("address"), "is required");
            None
        }
        Some(v) => d
            .string(v, &f.path("address"))
            .and_then(|s| match HostPort::parse(s) {
                Ok(a) => Some(a),
                Err(e) => {
                    d.problem(f.path("address"), e);
                    None
                }
            }),
    };
    let weight = f
        .get("weight")
        .and_then(|v| d.integer(v, &f.path("weight"), 1, 256));
    let backup = f
        .get("backup")
        .and_then(|v| d.boolean(v, &f.path("backup")));
    // Bad weight or backup values were reported; keep the backend for the duplicate check.
    Some((
        BackendSettings {
            address: address?,
            weight: weight.unwrap_or(1) as u32,
            backup: backup.unwrap_or(false),
        },
        (f.get("weight").is_some(), f.get("backup").is_some()),
    ))
}

fn check_backend_roles(d: &mut Decoder, mode: Mode, path: &str, backends: &[DecodedBackend]) {
    match mode {
        Mode::ActivePassive => {
            for (i, (b, (weight_set, backup_set))) in backends.iter().enumerate() {
                if *backup_set && b.backup {
                    d.problem(
                        format!("{path}[{i}].backup"),
                        "has no effect in mode active_passive: list order already sets who stands by",
                    );
                }
                if *weight_set {
                    d.problem(
                        format!("{path}[{i}].weight"),
                        "has no effect in mode active_passive: one backend serves at a time",
                    );
                }
            }
        }
        Mode::ActiveActive => {
            if backends.iter().all(|(b, _)| b.backup) {
                d.problem(path, "every backend is a backup; at least one must not be");
            }
        }
    }
}

fn decode_health_check(d: &mut Decoder, v: &Value, path: &str) -> Option<HealthCheckSettings> {
    let f = d.mapping(v, path, &check::all_keys())?;
    let before = d.problems.len();
    let mut h = HealthCheckSettings::default();
    if let Some(kind) = check::decode_kind(d, &f) {
        h.kind = kind;
    }
    if let Some(v) = f.get("interval") {
        h.interval = d
            .duration_within(
                v,
                &f.path("interval"),
                MIN_CHECK_INTERVAL,
                MAX_CHECK_INTERVAL,
            )
            .unwrap_or(DEFAULT_CHECK_INTERVAL);
    }
    let timeout_set = f.get("timeout").is_some();
    if let Some(v) = f.get("timeout") {
        h.timeout = d
            .duration_within(
                v,
                &f.path("timeout"),
                Duration::from_millis(1),
                MAX_CHECK_TIMEOUT,
            )
            .unwrap_or(DEFAULT_CHECK_TIMEOUT);
    }
    if let Some(v) = f.get("rise") {
        h.rise = d.integer(v, &f.path("rise"), 1, 100).unwrap_or(1) as u32;
    }
    if let Some(v) = f.get("fall") {
        h.fall = d.integer(v, &f.path("fall"), 1, 100).unwrap_or(1) as u32;
    }
    if let Some(v) = f.get("passive") {
        h.passive = d.boolean(v, &f.path("passive")).unwrap_or(true);
    }
    if d.problems.len() == before && h.timeout > h.interval {
        // Only a written-out timeout can be blamed; otherwise the interval is too short.
        let (key, message) = if timeout_set {
            (
                "timeout",
                format!(
                    "must not exceed interval ({})",
                    humantime::format_duration(h.interval)
                ),
            )
        } else {
            (
                "interval",
                format!(
                    "must be at least the check timeout ({}); set timeout too",
                    humantime::format_duration(h.timeout)
                ),
            )
        };
        d.problem(f.path(key), message);
    }
    (d.problems.len() == before).then_some(h)
}

#[cfg(test)]
mod tests;
