//! `sluice ctl`: runtime control from the command line, so nobody has to
//! hand-craft curl lines. It finds the admin listener and the token in the
//! configuration file (`admin.bind`, `admin.token_file` / `token_env`), or
//! takes them from `--admin` and `--token-file`; the token never goes on the
//! command line, where `ps` would show it.
//!
//! Each action is one request to the admin API (see README, "Runtime
//! control"); `status` prints the pools as a table, the rest print what the
//! API answered and exit 0 on 2xx, 1 otherwise.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Subcommand};
use serde_json::Value;

use crate::config::Config;
use crate::healthcheck::{self, ProbeError, Reply};

/// The most of an answer read: `/api/v1/pools` of a large configuration.
const MAX_REPLY: usize = 16 * 1024 * 1024;

/// `sluice ctl` flags.
#[derive(Debug, Args)]
pub struct CtlArgs {
    /// Admin listener [default: `admin.bind` of the configuration file,
    /// where 0.0.0.0 and [::] mean this host's loopback].
    #[arg(long, value_name = "ADDR", global = true)]
    pub admin: Option<SocketAddr>,
    /// File holding the admin token [default: the configuration's
    /// `admin.token_file` or `admin.token_env`].
    #[arg(long, value_name = "FILE", global = true)]
    pub token_file: Option<PathBuf>,
    /// Give up after this long.
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = humantime::parse_duration, global = true)]
    pub timeout: Duration,
    /// What to do.
    #[command(subcommand)]
    pub action: Action,
}

/// What `sluice ctl` does.
#[derive(Debug, Subcommand)]
pub enum Action {
    /// Every pool and backend: health, role, operator state, weight, connections.
    Status {
        /// Only this pool.
        pool: Option<String>,
    },
    /// No new connections to BACKEND; established ones run to their end.
    Drain {
        /// The pool.
        pool: String,
        /// The backend's address as configured (host:port).
        backend: String,
    },
    /// No new connections to BACKEND; established ones closed (after --grace).
    Maint {
        /// The pool.
        pool: String,
        /// The backend's address as configured (host:port).
        backend: String,
        /// Let established connections run this long before closing them.
        #[arg(long, value_name = "DURATION")]
        grace: Option<String>,
    },
    /// Put BACKEND back in rotation (once a health check passes if it was down).
    Ready {
        /// The pool.
        pool: String,
        /// The backend's address as configured (host:port).
        backend: String,
    },
    /// Set BACKEND's weight (1..=256) at run time, or `config` for the configured one.
    Weight {
        /// The pool.
        pool: String,
        /// The backend's address as configured (host:port).
        backend: String,
        /// The weight, or `config`.
        weight: String,
    },
    /// Make BACKEND the active one of a `failback: manual` active_passive pool.
    Activate {
        /// The pool.
        pool: String,
        /// The backend's address as configured (host:port).
        backend: String,
    },
    /// Re-read the configuration file (like SIGHUP) and print the outcome.
    Reload,
}

/// Why `sluice ctl` could not do what it was asked.
#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    /// The configuration could not be read to find the admin listener.
    #[error(
        "{path}: cannot read the configuration to find the admin listener ({why}); pass --admin ADDR (and --token-file FILE)"
    )]
    Config {
        /// The file.
        path: String,
        /// What went wrong, in one line.
        why: String,
    },
    /// The configuration has no admin listener.
    #[error("{0}: no `admin` section, so nothing to ask; pass --admin ADDR")]
    NoAdmin(String),
    /// The token file could not be read.
    #[error("cannot read the token from {path}: {source}")]
    Token {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The request failed.
    #[error(transparent)]
    Request(#[from] ProbeError),
    /// The answer was not the JSON the API sends.
    #[error("{0}")]
    Answer(String),
}

/// Where to send requests and with which token.
struct Target {
    addr: SocketAddr,
    token: Option<String>,
    limit: Duration,
}

impl Target {
    fn find(conf: &Path, args: &CtlArgs) -> Result<Target, CtlError> {
        let token_from_file = match &args.token_file {
            Some(path) => Some(read_token(path)?),
            None => None,
        };
        // The configuration is read only for what the flags leave out.
        let config = if args.admin.is_none() || token_from_file.is_none() {
            match Config::load(conf) {
                Ok(c) => Some(c),
                Err(e) if args.admin.is_none() => {
                    return Err(CtlError::Config {
                        path: conf.display().to_string(),
                        why: one_line(&e.to_string()),
                    });
                }
                // --admin given: a token-less request may still do (reads).
                Err(_) => None,
            }
        } else {
            None
        };
        let admin = config.as_ref().and_then(|c| c.admin.as_ref());
        let addr = match (args.admin, admin) {
            (Some(a), _) => a,
            (None, Some(a)) => healthcheck::dial_address(a.bind),
            (None, None) => return Err(CtlError::NoAdmin(conf.display().to_string())),
        };
        let token = token_from_file.or_else(|| {
            admin
                .and_then(|a| a.access.token.as_ref())
                .map(|t| t.expose().to_string())
        });
        Ok(Target {
            addr,
            token,
            limit: args.timeout,
        })
    }

    fn send(&self, method: &str, target: &str) -> Result<Reply, CtlError> {
        let reply = healthcheck::request(
            self.addr,
            method,
            target,
            self.token.as_deref(),
            self.limit,
            MAX_REPLY,
        )?;
        if reply.truncated {
            return Err(CtlError::Answer(format!(
                "{}{target}: the answer is larger than {MAX_REPLY} bytes",
                self.addr
            )));
        }
        Ok(reply)
    }
}

fn read_token(path: &Path) -> Result<String, CtlError> {
    let text = std::fs::read_to_string(path).map_err(|source| CtlError::Token {
        path: path.display().to_string(),
        source,
    })?;
    Ok(text.trim().to_string())
}

fn one_line(s: &str) -> String {
    s.lines().next().unwrap_or_default().to_string()
}

/// A query-string value: unreserved characters as they are, the rest as
/// `%XX` (an IPv6 backend's brackets and colons included).
fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// The request an action makes.
fn request_for(action: &Action) -> (&'static str, String) {
    let state = |pool: &str, backend: &str, state: &str| {
        format!(
            "/api/v1/pools/{}/state?backend={}&state={state}",
            encode(pool),
            encode(backend)
        )
    };
    match action {
        Action::Status { .. } => ("GET", "/api/v1/pools".to_string()),
        Action::Drain { pool, backend } => ("POST", state(pool, backend, "drain")),
        Action::Ready { pool, backend } => ("POST", state(pool, backend, "ready")),
        Action::Maint {
            pool,
            backend,
            grace,
        } => {
            let mut t = state(pool, backend, "maint");
            if let Some(g) = grace {
                let _ = write!(t, "&grace={}", encode(g));
            }
            ("POST", t)
        }
        Action::Weight {
            pool,
            backend,
            weight,
        } => (
            "POST",
            format!(
                "/api/v1/pools/{}/weight?backend={}&weight={}",
                encode(pool),
                encode(backend),
                encode(weight)
            ),
        ),
        Action::Activate { pool, backend } => (
            "POST",
            format!(
                "/api/v1/pools/{}/active?backend={}",
                encode(pool),
                encode(backend)
            ),
        ),
        Action::Reload => ("POST", "/api/v1/reload".to_string()),
    }
}

/// `sluice ctl`: do it, print the outcome, and say whether it worked.
pub fn run(conf: &Path, args: &CtlArgs) -> Result<bool, CtlError> {
    let target = Target::find(conf, args)?;
    let (method, path) = request_for(&args.action);
    let reply = target.send(method, &path)?;
    let ok = (200..300).contains(&reply.status);
    let body: Option<Value> = serde_json::from_slice(&reply.body).ok();
    match (&args.action, &body) {
        (Action::Status { pool }, Some(v)) if ok => {
            print!("{}", status_table(v, pool.as_deref())?);
        }
        (_, Some(v)) if !ok => {
            let why = v
                .get("error")
                .and_then(Value::as_str)
                .map(str::to_string)
                .or_else(|| {
                    v.get("problems").and_then(Value::as_array).map(|p| {
                        p.iter()
                            .filter_map(Value::as_str)
                            .collect::<Vec<_>>()
                            .join("\n  ")
                    })
                })
                .unwrap_or_else(|| v.to_string());
            eprintln!("{} {path}: {}: {why}", method, reply.status);
        }
        (Action::Reload, Some(v)) => {
            let summary = v.get("summary").and_then(Value::as_str).unwrap_or("");
            println!("reloaded: {summary}");
        }
        (Action::Status { .. } | Action::Activate { .. }, Some(_)) => {
            println!("{method} {path}: {}", reply.status);
        }
        (action, Some(v)) => {
            // The pool's JSON: show the backend the action was about.
            let backend = match action {
                Action::Drain { backend, .. }
                | Action::Maint { backend, .. }
                | Action::Ready { backend, .. }
                | Action::Weight { backend, .. } => backend.as_str(),
                _ => "",
            };
            match v
                .get("backends")
                .and_then(Value::as_array)
                .and_then(|bs| bs.iter().find(|b| b["address"] == backend))
            {
                Some(b) => println!(
                    "{backend}: admin_state {}, weight {}, {} connection(s), health {}",
                    b["admin_state"].as_str().unwrap_or("?"),
                    b["weight"],
                    b["connections"],
                    b["state"].as_str().unwrap_or("?")
                ),
                None => println!("{method} {path}: {}", reply.status),
            }
        }
        (_, None) => {
            let text = String::from_utf8_lossy(&reply.body);
            let text = one_line(&text);
            if ok {
                println!("{method} {path}: {} {text}", reply.status);
            } else {
                eprintln!("{method} {path}: {} {text}", reply.status);
            }
        }
    }
    Ok(ok)
}

/// `/api/v1/pools` as a table, one line per backend.
pub fn status_table(v: &Value, only: Option<&str>) -> Result<String, CtlError> {
    let pools = v
        .get("pools")
        .and_then(Value::as_object)
        .ok_or_else(|| CtlError::Answer("the answer has no `pools` object".to_string()))?;
    if let Some(name) = only {
        if !pools.contains_key(name) {
            return Err(CtlError::Answer(format!(
                "no pool `{name}` (pools: {})",
                pools.keys().cloned().collect::<Vec<_>>().join(", ")
            )));
        }
    }
    let mut rows = vec![
        [
            "POOL", "BACKEND", "HEALTH", "ROLE", "ADMIN", "ACTIVE", "WEIGHT", "CONNS",
        ]
        .map(str::to_string),
    ];
    for (name, pool) in pools {
        if only.is_some_and(|o| o != name) {
            continue;
        }
        for b in pool
            .get("backends")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let s = |k: &str| match &b[k] {
                Value::String(s) => s.clone(),
                Value::Null => "-".to_string(),
                other => other.to_string(),
            };
            let mut address = s("address");
            if b["backup"] == Value::Bool(true) {
                address.push_str(" (backup)");
            }
            rows.push([
                name.clone(),
                address,
                s("state"),
                s("role"),
                s("admin_state"),
                if b["active"] == Value::Bool(true) {
                    "yes".to_string()
                } else {
                    "no".to_string()
                },
                s("weight"),
                s("connections"),
            ]);
        }
    }
    let widths: Vec<usize> = (0..8)
        .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for r in &rows {
        let line: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        let _ = writeln!(out, "{}", line.join("  ").trim_end());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backends_and_pools_are_encoded_in_the_query() {
        assert_eq!(encode("10.0.0.1:80"), "10.0.0.1%3A80");
        assert_eq!(encode("[::1]:80"), "%5B%3A%3A1%5D%3A80");
        assert_eq!(encode("a&state=ready"), "a%26state%3Dready");
        let (m, t) = request_for(&Action::Maint {
            pool: "app".into(),
            backend: "app-1:80".into(),
            grace: Some("30s".into()),
        });
        assert_eq!(m, "POST");
        assert_eq!(
            t,
            "/api/v1/pools/app/state?backend=app-1%3A80&state=maint&grace=30s"
        );
    }

    #[test]
    fn the_status_table_lines_up_and_filters() {
        let v: Value = serde_json::json!({"pools": {
            "app": {"backends": [
                {"address": "10.0.0.1:80", "state": "up", "role": "unknown", "admin_state": "drain",
                 "active": false, "weight": 1, "connections": 3, "backup": false},
                {"address": "10.0.0.2:80", "state": "down", "role": "unknown", "admin_state": "ready",
                 "active": false, "weight": 2, "connections": 0, "backup": true}]},
            "db": {"backends": []}}});
        let t = status_table(&v, None).unwrap_or_default();
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 3, "{t}");
        assert!(lines[1].starts_with("app   10.0.0.1:80 "), "{t}");
        assert!(lines[1].contains("drain"), "{t}");
        assert!(lines[2].contains("10.0.0.2:80 (backup)"), "{t}");
        assert!(status_table(&v, Some("db")).is_ok());
        assert!(matches!(
            status_table(&v, Some("nope")),
            Err(CtlError::Answer(m)) if m.contains("pools: app, db")
        ));
    }
}
