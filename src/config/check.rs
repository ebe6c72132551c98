//! The `health_check` kinds and their settings: `tcp`, `send_expect`,
//! `http`, `redis`, `mysql`, `postgres`, and how each is decoded.
//!
//! Credentials come from `password_env` or `password_file`, never from the
//! file itself, and are held in a [`Secret`] that no log or `Debug` shows.

use std::fmt;

/// The health-check protocol and its own settings.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub enum CheckKind {
    /// A TCP connect.
    #[default]
    Tcp,
    /// Connect, then send bytes and expect answers, step by step.
    SendExpect(Vec<Step>),
    /// An HTTP/1.1 GET.
    Http(HttpCheck),
    /// Redis `PING` then `ROLE`.
    Redis(Credentials),
    /// MySQL/MariaDB login, then `SELECT @@global.read_only`.
    Mysql(Credentials),
    /// PostgreSQL login, then `SELECT pg_is_in_recovery()`.
    Postgres(PostgresCheck),
    /// A TCP connect and a TLS handshake, with the pool's `tls`.
    Tls,
}

impl CheckKind {
    /// The name used in the YAML file.
    pub fn name(&self) -> &'static str {
        match self {
            CheckKind::Tcp => "tcp",
            CheckKind::SendExpect(_) => "send_expect",
            CheckKind::Http(_) => "http",
            CheckKind::Redis(_) => "redis",
            CheckKind::Mysql(_) => "mysql",
            CheckKind::Postgres(_) => "postgres",
            CheckKind::Tls => "tls",
        }
    }

    /// Whether a successful check also tells the backend's role.
    pub fn reports_role(&self) -> bool {
        match self {
            CheckKind::Tcp | CheckKind::SendExpect(_) | CheckKind::Tls => false,
            CheckKind::Http(h) => h.primary_path.is_some() || h.replica_path.is_some(),
            CheckKind::Redis(_) | CheckKind::Mysql(_) | CheckKind::Postgres(_) => true,
        }
    }
}

/// One step of a `send_expect` check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Write these bytes.
    Send(Vec<u8>),
    /// Read until the bytes received since the previous `expect` match.
    Expect(Expect),
}

/// What a `send_expect` step waits for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Expect {
    /// A regular expression, matched against the bytes received so far.
    Pattern(Pattern),
    /// These exact bytes at the start of what is received.
    Bytes(Vec<u8>),
}

/// A compiled regular expression over bytes, compared by its source.
#[derive(Clone)]
pub struct Pattern(regex::bytes::Regex);

impl Pattern {
    /// Compile `source`.
    pub fn new(source: &str) -> Result<Pattern, regex::Error> {
        regex::bytes::Regex::new(source).map(Pattern)
    }

    /// Whether it matches somewhere in `haystack`.
    pub fn is_match(&self, haystack: &[u8]) -> bool {
        self.0.is_match(haystack)
    }

    /// The source text.
    pub fn as_str(&self) -> &str {
        self.0.as_str()
    }
}

impl PartialEq for Pattern {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Eq for Pattern {}

impl fmt::Debug for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "/{}/", self.as_str())
    }
}

/// Settings of an `http` check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpCheck {
    /// Path of the health request (`/` by default).
    pub path: String,
    /// Port to send it to; the backend's own port when unset.
    pub port: Option<u16>,
    /// `Host` header; the backend's address when unset.
    pub host: Option<String>,
    /// Statuses that pass, inclusive (`200..=399` by default).
    pub status: (u16, u16),
    /// A pattern the body must match, when set.
    pub body: Option<Pattern>,
    /// A path that answers 2xx only on the primary (Patroni: `/primary`).
    pub primary_path: Option<String>,
    /// A path that answers 2xx only on a replica (Patroni: `/replica`).
    pub replica_path: Option<String>,
}

impl Default for HttpCheck {
    fn default() -> Self {
        HttpCheck {
            path: "/".to_string(),
            port: None,
            host: None,
            status: (200, 399),
            body: None,
            primary_path: None,
            replica_path: None,
        }
    }
}

/// Who a database check logs in as.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Credentials {
    /// User name (required for mysql and postgres; optional for redis ACLs).
    pub user: Option<String>,
    /// Password, read from `password_env` or `password_file`.
    pub password: Option<Secret>,
}

/// Settings of a `postgres` check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PostgresCheck {
    /// Who logs in.
    pub credentials: Credentials,
    /// Database to connect to (`postgres` by default).
    pub database: String,
    /// Whether to answer a server that asks for an MD5 password hash
    /// (`allow_md5`, off by default). Cleartext is never answered.
    pub allow_md5: bool,
}

/// A password: shown by no `Debug` or `Display`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wrap a password.
    pub fn new(s: String) -> Secret {
        Secret(s)
    }

    /// The password itself, for the wire only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// Which role a pool's backends must report to take traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum RoleRequirement {
    /// Any backend that is up.
    #[default]
    Any,
    /// Only the primary (writable) one.
    Primary,
    /// Only replicas (read-only).
    Replica,
}

impl RoleRequirement {
    /// The name used in the YAML file.
    pub fn as_str(self) -> &'static str {
        match self {
            RoleRequirement::Any => "any",
            RoleRequirement::Primary => "primary",
            RoleRequirement::Replica => "replica",
        }
    }
}

use serde_yaml::Value;

use super::decode::{Decoder, Fields, kind};

/// Keys of `health_check` that every kind takes.
pub(super) const COMMON_KEYS: &[&str] = &["kind", "interval", "timeout", "rise", "fall", "passive"];

/// Keys that belong to one kind (or several), with the kinds they apply to.
const KIND_KEYS: &[(&str, &[&str])] = &[
    ("steps", &["send_expect"]),
    ("path", &["http"]),
    ("port", &["http"]),
    ("host", &["http"]),
    ("expect_status", &["http"]),
    ("expect_body", &["http"]),
    ("primary_path", &["http"]),
    ("replica_path", &["http"]),
    ("user", &["redis", "mysql", "postgres"]),
    ("password_env", &["redis", "mysql", "postgres"]),
    ("password_file", &["redis", "mysql", "postgres"]),
    ("database", &["postgres"]),
    ("allow_md5", &["postgres"]),
    // Recognised only to say where a password belongs instead.
    ("password", &[]),
];

/// Every key a `health_check` mapping may hold.
pub(super) fn all_keys() -> Vec<&'static str> {
    COMMON_KEYS
        .iter()
        .copied()
        .chain(KIND_KEYS.iter().map(|(k, _)| *k))
        .collect()
}

const KINDS: &[(&str, &str)] = &[
    ("tcp", "tcp"),
    ("send_expect", "send_expect"),
    ("http", "http"),
    ("redis", "redis"),
    ("mysql", "mysql"),
    ("postgres", "postgres"),
    ("tls", "tls"),
];

/// Decode `kind` and the keys that belong to it; report keys that belong to
/// another kind.
pub(super) fn decode_kind(d: &mut Decoder, f: &Fields<'_>) -> Option<CheckKind> {
    let name = match f.get("kind") {
        Some(v) => d.choice(v, &f.path("kind"), KINDS)?,
        None => "tcp",
    };
    if f.get("password").is_some() {
        d.problem(
            f.path("password"),
            "a password is never written in the configuration: name an environment variable with \
             password_env, or a file with password_file",
        );
    }
    for (key, kinds) in KIND_KEYS {
        if *key != "password" && f.get(key).is_some() && !kinds.contains(&name) {
            d.problem(
                f.path(key),
                format!(
                    "only applies to kind {} (this check is `{name}`)",
                    kinds.join(", ")
                ),
            );
        }
    }
    Some(match name {
        "send_expect" => CheckKind::SendExpect(decode_steps(d, f)?),
        "http" => CheckKind::Http(decode_http(d, f)?),
        "redis" => CheckKind::Redis(decode_credentials(d, f, false)?),
        "mysql" => CheckKind::Mysql(decode_credentials(d, f, true)?),
        "postgres" => CheckKind::Postgres(PostgresCheck {
            credentials: decode_credentials(d, f, true)?,
            database: match f.get("database") {
                Some(v) => non_empty(d, v, &f.path("database"))?.to_string(),
                None => "postgres".to_string(),
            },
            allow_md5: match f.get("allow_md5") {
                Some(v) => d.boolean(v, &f.path("allow_md5"))?,
                None => false,
            },
        }),
        "tls" => CheckKind::Tls,
        _ => CheckKind::Tcp,
    })
}

fn non_empty<'v>(d: &mut Decoder, v: &'v Value, path: &str) -> Option<&'v str> {
    let s = d.string(v, path)?;
    if s.is_empty() {
        d.problem(path, "must not be empty");
        return None;
    }
    Some(s)
}

fn decode_steps(d: &mut Decoder, f: &Fields<'_>) -> Option<Vec<Step>> {
    let path = f.path("steps");
    let Some(v) = f.get("steps") else {
        d.problem(
            &path,
            "is required for kind send_expect: a list like [{ send: \"PING\\r\\n\" }, { expect: \"^\\\\+PONG\" }]",
        );
        return None;
    };
    let Value::Sequence(items) = v else {
        d.problem(&path, format!("must be a list of steps, found {}", kind(v)));
        return None;
    };
    if items.is_empty() {
        d.problem(&path, "must list at least one step");
        return None;
    }
    let mut steps = Vec::with_capacity(items.len());
    let before = d.problems.len();
    for (i, item) in items.iter().enumerate() {
        let item_path = format!("{path}[{i}]");
        let Some(step) = d.mapping(
            item,
            &item_path,
            &["send", "send_hex", "expect", "expect_hex"],
        ) else {
            continue;
        };
        let present: Vec<&str> = ["send", "send_hex", "expect", "expect_hex"]
            .into_iter()
            .filter(|k| step.get(k).is_some())
            .collect();
        let [key] = present.as_slice() else {
            d.problem(
                &item_path,
                "must hold exactly one of send, send_hex, expect, expect_hex",
            );
            continue;
        };
        let key_path = step.path(key);
        let Some(text) = step.get(key).and_then(|v| d.string(v, &key_path)) else {
            continue;
        };
        let decoded = match *key {
            "send" => Some(Step::Send(text.as_bytes().to_vec())),
            "send_hex" => hex(d, text, &key_path).map(Step::Send),
            "expect" => match Pattern::new(text) {
                Ok(p) => Some(Step::Expect(Expect::Pattern(p))),
                Err(e) => {
                    d.problem(&key_path, format!("not a valid regular expression: {e}"));
                    None
                }
            },
            _ => hex(d, text, &key_path).map(|b| Step::Expect(Expect::Bytes(b))),
        };
        if let Some(step) = decoded {
            if matches!(&step, Step::Send(b) | Step::Expect(Expect::Bytes(b)) if b.is_empty()) {
                d.problem(&key_path, "must not be empty");
            }
            steps.push(step);
        }
    }
    (d.problems.len() == before).then_some(steps)
}

/// Bytes written as hex digits; spaces between them are allowed.
fn hex(d: &mut Decoder, text: &str, path: &str) -> Option<Vec<u8>> {
    let digits: Vec<char> = text.chars().filter(|c| !c.is_whitespace()).collect();
    if digits.len() % 2 != 0 {
        d.problem(path, "hex bytes need an even number of digits");
        return None;
    }
    let mut out = Vec::with_capacity(digits.len() / 2);
    for pair in digits.chunks(2) {
        let byte: String = pair.iter().collect();
        match u8::from_str_radix(&byte, 16) {
            Ok(b) => out.push(b),
            Err(_) => {
                d.problem(path, format!("`{byte}` is not a hex byte"));
                return None;
            }
        }
    }
    Some(out)
}

fn decode_http(d: &mut Decoder, f: &Fields<'_>) -> Option<HttpCheck> {
    let before = d.problems.len();
    let mut h = HttpCheck::default();
    let url_path = |d: &mut Decoder, key: &str| -> Option<String> {
        let v = f.get(key)?;
        let s = non_empty(d, v, &f.path(key))?;
        if !s.starts_with('/') || s.chars().any(|c| c.is_whitespace() || c.is_control()) {
            d.problem(
                f.path(key),
                format!("`{s}` must be a path starting with `/`, without spaces"),
            );
            return None;
        }
        Some(s.to_string())
    };
    if let Some(p) = url_path(d, "path") {
        h.path = p;
    }
    h.primary_path = url_path(d, "primary_path");
    h.replica_path = url_path(d, "replica_path");
    if let Some(v) = f.get("port") {
        h.port = d.integer(v, &f.path("port"), 1, 65535).map(|p| p as u16);
    }
    if let Some(v) = f.get("host") {
        let path = f.path("host");
        if let Some(s) = non_empty(d, v, &path) {
            if s.chars().any(|c| c.is_whitespace() || c.is_control()) {
                d.problem(&path, "must not contain spaces or control characters");
            }
            h.host = Some(s.to_string());
        }
    }
    if let Some(v) = f.get("expect_status") {
        if let Some(range) = status_range(d, v, &f.path("expect_status")) {
            h.status = range;
        }
    }
    if let Some(v) = f.get("expect_body") {
        let path = f.path("expect_body");
        if let Some(s) = d.string(v, &path) {
            match Pattern::new(s) {
                Ok(p) => h.body = Some(p),
                Err(e) => d.problem(&path, format!("not a valid regular expression: {e}")),
            }
        }
    }
    (d.problems.len() == before).then_some(h)
}

/// `200`, or a range `200-299`.
fn status_range(d: &mut Decoder, v: &Value, path: &str) -> Option<(u16, u16)> {
    let parse = |s: &str| {
        s.trim()
            .parse::<u16>()
            .ok()
            .filter(|c| (100..=599).contains(c))
    };
    let range = match v {
        Value::Number(n) => n
            .as_u64()
            .and_then(|n| parse(&n.to_string()))
            .map(|c| (c, c)),
        Value::String(s) => match s.split_once('-') {
            Some((a, b)) => parse(a).zip(parse(b)).filter(|(a, b)| a <= b),
            None => parse(s).map(|c| (c, c)),
        },
        _ => None,
    };
    if range.is_none() {
        d.problem(
            path,
            "must be an HTTP status (100..=599) or a range like 200-399",
        );
    }
    range
}

fn decode_credentials(d: &mut Decoder, f: &Fields<'_>, user_required: bool) -> Option<Credentials> {
    let before = d.problems.len();
    let user = match f.get("user") {
        Some(v) => non_empty(d, v, &f.path("user")).map(str::to_string),
        None => {
            if user_required {
                d.problem(f.path("user"), "is required: the user the check logs in as");
            }
            None
        }
    };
    let password = decode_secret(d, f, "password_env", "password_file");
    (d.problems.len() == before).then_some(Credentials { user, password })
}

/// A secret from the environment variable named by `env_key` or the file
/// named by `file_key` (one of them; `None` when neither is given). The
/// file is read bounded, and one trailing newline is dropped.
pub(super) fn decode_secret(
    d: &mut Decoder,
    f: &Fields<'_>,
    env_key: &str,
    file_key: &str,
) -> Option<Secret> {
    match (f.get(env_key), f.get(file_key)) {
        (Some(_), Some(_)) => {
            d.problem(
                f.path(file_key),
                format!("give {env_key} or {file_key}, not both"),
            );
            None
        }
        (Some(v), None) => {
            let path = f.path(env_key);
            non_empty(d, v, &path).and_then(|name| match std::env::var(name) {
                Ok(p) => Some(Secret::new(p)),
                Err(std::env::VarError::NotPresent) => {
                    d.problem(&path, format!("environment variable `{name}` is not set"));
                    None
                }
                Err(std::env::VarError::NotUnicode(_)) => {
                    d.problem(
                        &path,
                        format!("environment variable `{name}` is not valid UTF-8"),
                    );
                    None
                }
            })
        }
        (None, Some(v)) => {
            let path = f.path(file_key);
            let read = |file: &str| {
                super::read::read_bounded(std::path::Path::new(file), super::MAX_SECRET_BYTES)
            };
            non_empty(d, v, &path).and_then(|file| match read(file) {
                Ok(p) => Some(Secret::new(
                    p.strip_suffix('\n')
                        .map(|p| p.strip_suffix('\r').unwrap_or(p))
                        .unwrap_or(&p)
                        .to_string(),
                )),
                Err(e) => {
                    d.problem(&path, format!("cannot read `{file}`: {e}"));
                    None
                }
            })
        }
        (None, None) => None,
    }
}
