//! Edge keys: source allow/deny lists, per-source limits and the PROXY
//! protocol on listeners, the PROXY protocol towards a pool's backends,
//! and the admin listener's token and host names.

use std::net::IpAddr;

use ipnet::IpNet;
use serde_yaml::Value;

use super::Secret;
use super::decode::{Decoder, Fields, kind};

/// Most prefixes one `allow` or `deny` list may hold.
pub const MAX_PREFIXES: usize = 1_000_000;

/// A listener's `per_source` limits.
#[derive(Clone, Debug, PartialEq)]
pub struct PerSource {
    /// Connections open at once from one client address.
    pub max_connections: Option<u32>,
    /// New connections per second from one client address (token bucket).
    pub rate: Option<f64>,
    /// How many new connections one client address may open at once
    /// before `rate` applies (the bucket's size).
    pub burst: u32,
}

/// A PROXY protocol version.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProxyVersion {
    /// The text header.
    V1,
    /// The binary header.
    V2,
}

impl ProxyVersion {
    /// The name used in the YAML file.
    pub fn as_str(self) -> &'static str {
        match self {
            ProxyVersion::V1 => "v1",
            ProxyVersion::V2 => "v2",
        }
    }
}

/// A listener's `proxy_protocol`: which headers it accepts, from whom.
#[derive(Clone, Debug, PartialEq)]
pub struct ProxyAccept {
    /// `None`: either version.
    pub version: Option<ProxyVersion>,
    /// The sources that must send a header (trusted proxies); others may not.
    pub from: Vec<IpNet>,
}

/// Parse `value` as a list of CIDR prefixes; a bare address is a /32 or
/// /128. Every bad entry is reported with its path.
pub(super) fn prefixes(d: &mut Decoder, v: &Value, path: &str) -> Option<Vec<IpNet>> {
    let items: Vec<(String, &Value)> = match v {
        Value::Sequence(items) => items
            .iter()
            .enumerate()
            .map(|(i, item)| (format!("{path}[{i}]"), item))
            .collect(),
        // A single prefix may stand alone.
        Value::String(_) => vec![(path.to_string(), v)],
        other => {
            d.problem(
                path,
                format!(
                    "must be a list of addresses or CIDR prefixes (like 10.0.0.0/8), found {}",
                    kind(other)
                ),
            );
            return None;
        }
    };
    if items.len() > MAX_PREFIXES {
        d.problem(path, format!("must list at most {MAX_PREFIXES} prefixes"));
        return None;
    }
    let mut out = Vec::with_capacity(items.len());
    let mut ok = true;
    for (item_path, item) in items {
        match prefix(d, item, &item_path) {
            Some(p) => out.push(p),
            None => ok = false,
        }
    }
    ok.then_some(out)
}

fn prefix(d: &mut Decoder, v: &Value, path: &str) -> Option<IpNet> {
    let s = d.string(v, path)?.trim();
    if let Ok(net) = s.parse::<IpNet>() {
        if net.trunc() != net {
            d.problem(
                path,
                format!(
                    "`{s}` has host bits set; the prefix is {} (write that, or the address alone)",
                    net.trunc()
                ),
            );
            return None;
        }
        return Some(net);
    }
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Some(IpNet::from(ip));
    }
    d.problem(
        path,
        format!("`{s}` is not an IP address or CIDR prefix (like 10.0.0.0/8 or 2001:db8::/32)"),
    );
    None
}

pub(super) fn per_source(d: &mut Decoder, v: &Value, path: &str) -> Option<PerSource> {
    let f = d.mapping(v, path, &["max_connections", "rate", "burst"])?;
    let max_connections = f
        .get("max_connections")
        .and_then(|v| d.integer(v, &f.path("max_connections"), 1, 10_000_000))
        .map(|n| n as u32);
    let rate = f.get("rate").and_then(|v| rate(d, v, &f.path("rate")));
    let burst = f
        .get("burst")
        .and_then(|v| d.integer(v, &f.path("burst"), 1, 10_000_000))
        .map(|n| n as u32);
    if burst.is_some() && f.get("rate").is_none() {
        d.problem(f.path("burst"), "only applies with rate");
    }
    if f.get("max_connections").is_none() && f.get("rate").is_none() {
        d.problem(path, "needs max_connections, rate, or both");
        return None;
    }
    // Without a burst, a client may open a second's worth at once.
    let burst = burst.unwrap_or_else(|| rate.map_or(1, |r| r.ceil().max(1.0) as u32));
    Some(PerSource {
        max_connections,
        rate,
        burst,
    })
}

fn rate(d: &mut Decoder, v: &Value, path: &str) -> Option<f64> {
    let n = match v {
        Value::Number(n) => n.as_f64(),
        _ => None,
    };
    match n {
        Some(r) if r > 0.0 && r <= 1e9 && r.is_finite() => Some(r),
        _ => {
            d.problem(
                path,
                format!(
                    "must be a number of new connections per second above 0 (like 20 or 0.5), found {}",
                    kind(v)
                ),
            );
            None
        }
    }
}

fn version(d: &mut Decoder, v: &Value, path: &str, any: bool) -> Option<Option<ProxyVersion>> {
    let mut choices = vec![
        ("v1", Some(ProxyVersion::V1)),
        ("v2", Some(ProxyVersion::V2)),
    ];
    if any {
        choices.push(("any", None));
    }
    d.choice(v, path, &choices)
}

pub(super) fn proxy_accept(d: &mut Decoder, v: &Value, path: &str) -> Option<ProxyAccept> {
    let f = d.mapping(v, path, &["accept", "from"])?;
    let version = match f.get("accept") {
        Some(v) => version(d, v, &f.path("accept"), true),
        None => {
            d.problem(f.path("accept"), "is required: v1, v2 or any");
            None
        }
    };
    let from = match f.get("from") {
        Some(v) => prefixes(d, v, &f.path("from")),
        None => {
            d.problem(
                f.path("from"),
                "is required: the addresses of the proxies that send the header \
                 (a header from anyone else could forge a client address)",
            );
            None
        }
    };
    if from.as_ref().is_some_and(Vec::is_empty) {
        d.problem(f.path("from"), "must list at least one proxy address");
        return None;
    }
    Some(ProxyAccept {
        version: version?,
        from: from?,
    })
}

pub(super) fn proxy_send(d: &mut Decoder, v: &Value, path: &str) -> Option<ProxyVersion> {
    version(d, v, path, false).flatten()
}

/// The admin listener's protection.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct AdminAccess {
    /// The bearer token mutating endpoints require (and reads too, with
    /// `protect_reads`).
    pub token: Option<Secret>,
    /// Whether reads need the token too.
    pub protect_reads: bool,
    /// Host names the admin API answers to besides IP literals and
    /// `localhost` (a guard against DNS rebinding).
    pub hosts: Vec<String>,
}

pub(super) fn admin_access(d: &mut Decoder, f: &Fields<'_>) -> AdminAccess {
    let token = super::check::decode_secret(d, f, "token_env", "token_file");
    if let Some(t) = &token {
        if t.expose().len() < 16 {
            d.problem(
                if f.get("token_file").is_some() {
                    f.path("token_file")
                } else {
                    f.path("token_env")
                },
                "the token is shorter than 16 characters; use a long random one \
                 (for example: openssl rand -hex 32)",
            );
        }
    }
    let protect_reads = f
        .get("protect_reads")
        .and_then(|v| d.boolean(v, &f.path("protect_reads")))
        .unwrap_or(false);
    if protect_reads && token.is_none() {
        d.problem(
            f.path("protect_reads"),
            "needs a token: set token_file or token_env",
        );
    }
    let hosts = match f.get("hosts") {
        Some(Value::Sequence(items)) => items
            .iter()
            .enumerate()
            .filter_map(|(i, v)| {
                let path = format!("{}[{i}]", f.path("hosts"));
                d.string(v, &path).map(|s| s.trim().to_ascii_lowercase())
            })
            .collect(),
        Some(other) => {
            d.problem(
                f.path("hosts"),
                format!("must be a list of host names, found {}", kind(other)),
            );
            Vec::new()
        }
        None => Vec::new(),
    };
    AdminAccess {
        token,
        protect_reads,
        hosts,
    }
}
