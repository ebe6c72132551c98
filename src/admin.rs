//! The admin HTTP listener: metrics, liveness, readiness, the pools API and
//! the endpoints that change things, behind a token.
//!
//! | request | answer |
//! | --- | --- |
//! | `GET /metrics` | Prometheus text format |
//! | `GET /healthz` | 200 while the process runs |
//! | `GET /readyz` | 200 when ready, else 503 with the reason |
//! | `GET /api/v1/pools` | JSON state of every pool and backend |
//! | `POST /api/v1/pools/{pool}/active?backend=ADDR` | make ADDR the active backend of a `failback: manual` pool |
//! | `POST /api/v1/reload` | re-read the configuration file (like SIGHUP); 200 with a summary, or 422 with every problem |
//!
//! Who may do what ([`Access`]): a `POST` needs `Authorization: Bearer
//! <admin token>`; without a token configured, it is allowed only when the
//! admin listener is bound to loopback. Reads need the token too with
//! `protect_reads`. Requests a web page could make on someone's behalf are
//! refused: a `Host` that is neither an IP address, `localhost` nor one of
//! `admin.hosts` (DNS rebinding), a cross-origin `Origin`, and the form
//! content types a page may `POST` without asking. [`server`] is the
//! bounded HTTP server that carries it.

pub mod server;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use http::{Method, Response, StatusCode};
use serde_json::{Value, json};
use subtle::ConstantTimeEq;

use crate::config::edge::AdminAccess;
use crate::metrics;
use crate::pool::{AdminState, Health, MoveError, Pool};
use crate::state::State;

/// A request refused, with its answer.
type Refused = Box<Response<Vec<u8>>>;

/// The longest grace a `maint` request may give established sessions.
const MAX_GRACE: Duration = Duration::from_secs(86_400);

/// How long `POST /api/v1/reload` waits for the reload it asked for.
const RELOAD_WAIT: Duration = Duration::from_secs(30);

/// Reloads asked for over the API: a token bucket of this many...
const RELOAD_BURST: f64 = 10.0;
/// ...refilled at this many a second. Each reload reads and parses the
/// file; a flood of requests must not turn into a flood of reloads.
const RELOAD_RATE: f64 = 2.0;

/// One request, as far as the admin API reads it.
#[derive(Debug, Default)]
pub struct Request {
    /// The method.
    pub method: Method,
    /// The path, without the query.
    pub path: String,
    /// The query, if any.
    pub query: Option<String>,
    /// The `Authorization` header.
    pub authorization: Option<String>,
    /// The `Host` header.
    pub host: Option<String>,
    /// The `Origin` header.
    pub origin: Option<String>,
    /// The `Content-Type` header.
    pub content_type: Option<String>,
}

/// Who may use the admin API, from `admin` in the configuration and the
/// address it is bound to.
pub struct Access {
    token: Option<Vec<u8>>,
    protect_reads: bool,
    hosts: Vec<String>,
    loopback: bool,
}

impl Access {
    /// The rules of `access` for a listener on `bind`.
    pub fn new(access: &AdminAccess, bind: SocketAddr) -> Access {
        Access {
            token: access
                .token
                .as_ref()
                .map(|t| t.expose().as_bytes().to_vec()),
            protect_reads: access.protect_reads,
            hosts: access.hosts.clone(),
            loopback: bind.ip().is_loopback(),
        }
    }

    /// What start-up should say about it, if anything.
    pub fn warning(&self, bind: SocketAddr) -> Option<String> {
        (self.token.is_none() && !self.loopback).then(|| {
            format!(
                "admin listener on {bind} has no token (admin.token_file or admin.token_env): \
                 reload and pool moves are refused; reads are open to anyone who can reach it"
            )
        })
    }

    fn token_matches(&self, authorization: Option<&str>) -> bool {
        let Some(token) = &self.token else {
            return false;
        };
        let given = authorization
            .and_then(|a| {
                a.strip_prefix("Bearer ")
                    .or_else(|| a.strip_prefix("bearer "))
            })
            .map(str::trim)
            .unwrap_or("");
        // Constant time: how much of a guess matched must not show in timing.
        bool::from(given.as_bytes().ct_eq(token))
    }

    /// Whether `host` (a `Host` header) names this listener: an IP literal,
    /// `localhost`, or a configured name, with any port.
    fn host_allowed(&self, host: &str) -> bool {
        let host = host.trim().to_ascii_lowercase();
        let name = match host.strip_prefix('[') {
            // [v6]:port
            Some(rest) => rest.split(']').next().unwrap_or(""),
            None => host.rsplit_once(':').map_or(host.as_str(), |(h, _)| h),
        };
        name.parse::<std::net::IpAddr>().is_ok()
            || name == "localhost"
            || self.hosts.iter().any(|h| h == name)
    }

    /// Refuse `req` with a response, or let it through.
    fn check(&self, req: &Request, mutating: bool) -> Result<(), Box<Response<Vec<u8>>>> {
        if let Some(host) = &req.host {
            if !self.host_allowed(host) {
                return Err(Box::new(json_error(
                    StatusCode::FORBIDDEN,
                    "Host is not this admin listener's (an IP address, localhost, or admin.hosts)",
                )));
            }
        }
        if mutating {
            if let (Some(origin), Some(host)) = (&req.origin, &req.host) {
                let origin_host = origin
                    .split_once("://")
                    .map_or(origin.as_str(), |(_, rest)| rest)
                    .trim_end_matches('/');
                if !origin_host.eq_ignore_ascii_case(host.trim()) {
                    return Err(Box::new(json_error(
                        StatusCode::FORBIDDEN,
                        "cross-origin requests are refused",
                    )));
                }
            }
            if let Some(ct) = &req.content_type {
                let ct = ct
                    .split(';')
                    .next()
                    .unwrap_or("")
                    .trim()
                    .to_ascii_lowercase();
                if matches!(
                    ct.as_str(),
                    "application/x-www-form-urlencoded" | "multipart/form-data" | "text/plain"
                ) {
                    return Err(Box::new(json_error(
                        StatusCode::UNSUPPORTED_MEDIA_TYPE,
                        "form content types are refused (a web page could send them); send no body",
                    )));
                }
            }
        }
        let needs_token = mutating || self.protect_reads;
        if !needs_token {
            return Ok(());
        }
        if self.token.is_none() {
            // Only reachable with a mutating request (protect_reads needs a token).
            if self.loopback {
                return Ok(());
            }
            return Err(Box::new(json_error(
                StatusCode::FORBIDDEN,
                "this endpoint needs admin.token_file (or token_env) when the admin listener is not bound to loopback",
            )));
        }
        if self.token_matches(req.authorization.as_deref()) {
            return Ok(());
        }
        let mut r = json_error(StatusCode::UNAUTHORIZED, "a valid bearer token is required");
        r.headers_mut().insert(
            http::header::WWW_AUTHENTICATE,
            http::HeaderValue::from_static("Bearer realm=\"sluice admin\""),
        );
        Err(Box::new(r))
    }
}

/// The admin application.
pub struct AdminApp {
    state: Arc<State>,
    access: Access,
    /// Reload tokens left and when they were counted.
    reload_tokens: Mutex<(f64, Instant)>,
}

/// The `endpoint` label of `sluice_admin_requests_total`: a fixed set.
fn endpoint_label(path: &str) -> &'static str {
    match path {
        "/metrics" => "/metrics",
        "/healthz" => "/healthz",
        "/readyz" => "/readyz",
        "/api/v1/pools" => "/api/v1/pools",
        "/api/v1/reload" => "/api/v1/reload",
        p if p.starts_with("/api/v1/pools/") && p.ends_with("/active") => {
            "/api/v1/pools/{pool}/active"
        }
        p if p.starts_with("/api/v1/pools/") && p.ends_with("/state") => {
            "/api/v1/pools/{pool}/state"
        }
        p if p.starts_with("/api/v1/pools/") && p.ends_with("/weight") => {
            "/api/v1/pools/{pool}/weight"
        }
        _ => "other",
    }
}

impl AdminApp {
    /// Serve the process's `state` under `access`.
    pub fn new(state: Arc<State>, access: Access) -> Self {
        AdminApp {
            state,
            access,
            reload_tokens: Mutex::new((RELOAD_BURST, Instant::now())),
        }
    }

    /// Answer one request (and count it).
    pub async fn handle(&self, req: &Request) -> Response<Vec<u8>> {
        let response = self.route(req).await;
        self.state
            .metrics
            .admin_request(endpoint_label(&req.path), response.status().as_u16());
        response
    }

    async fn route(&self, req: &Request) -> Response<Vec<u8>> {
        let method = &req.method;
        let path = req.path.as_str();
        let get = method == Method::GET || method == Method::HEAD;
        let post = method == Method::POST;
        if get || post {
            if let Err(refused) = self.access.check(req, post) {
                return *refused;
            }
        }
        match path {
            "/metrics" if get => reply(
                StatusCode::OK,
                metrics::CONTENT_TYPE,
                self.state.metrics.render(),
            ),
            "/healthz" if get => text(StatusCode::OK, "ok\n"),
            "/readyz" if get => match self.state.readiness() {
                Ok(()) => text(StatusCode::OK, "ready\n"),
                Err(why) => text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    &format!("not ready: {why}\n"),
                ),
            },
            "/api/v1/pools" if get => json_reply(StatusCode::OK, &self.pools_json()),
            "/api/v1/reload" if post => self.reload().await,
            "/api/v1/reload" => method_not_allowed("POST"),
            "/metrics" | "/healthz" | "/readyz" | "/api/v1/pools" => method_not_allowed("GET"),
            _ => {
                let action = path.strip_prefix("/api/v1/pools/").and_then(|rest| {
                    rest.rsplit_once('/')
                        .filter(|(pool, _)| !pool.is_empty() && !pool.contains('/'))
                });
                let query = req.query.as_deref();
                match action {
                    Some((pool, "active")) if post => self.make_active(pool, query),
                    Some((pool, "state")) if post => self.set_state(pool, query),
                    Some((pool, "weight")) if post => self.set_weight(pool, query),
                    Some((_, "active" | "state" | "weight")) => method_not_allowed("POST"),
                    _ => text(StatusCode::NOT_FOUND, "not found\n"),
                }
            }
        }
    }

    fn make_active(&self, pool: &str, query: Option<&str>) -> Response<Vec<u8>> {
        let pools = self.state.pools();
        let Some(p) = pools.iter().find(|p| p.name == pool) else {
            return json_error(StatusCode::NOT_FOUND, &format!("no pool is named `{pool}`"));
        };
        let backend = query
            .into_iter()
            .flat_map(|q| q.split('&'))
            .find_map(|kv| kv.strip_prefix("backend="))
            .map(percent_decode);
        let Some(backend) = backend else {
            return json_error(StatusCode::BAD_REQUEST, "missing query parameter `backend`");
        };
        match p.make_active(&backend) {
            Ok(()) => json_reply(StatusCode::OK, &pool_json(p)),
            Err(e @ MoveError::UnknownBackend { .. }) => {
                json_error(StatusCode::NOT_FOUND, &e.to_string())
            }
            Err(e) => json_error(StatusCode::CONFLICT, &e.to_string()),
        }
    }

    /// The pool named `pool` and the `backend` query parameter, or the error
    /// response.
    fn pool_and_backend(
        &self,
        pool: &str,
        query: Option<&str>,
    ) -> Result<(Arc<Pool>, String), Refused> {
        let pools = self.state.pools();
        let Some(p) = pools.iter().find(|p| p.name == pool) else {
            return Err(Box::new(json_error(
                StatusCode::NOT_FOUND,
                &format!("no pool is named `{pool}`"),
            )));
        };
        let Some(backend) = param(query, "backend") else {
            return Err(Box::new(json_error(
                StatusCode::BAD_REQUEST,
                "missing query parameter `backend`",
            )));
        };
        Ok((Arc::clone(p), backend))
    }

    /// `POST /api/v1/pools/{pool}/state?backend=ADDR&state=ready|drain|maint[&grace=DURATION]`.
    fn set_state(&self, pool: &str, query: Option<&str>) -> Response<Vec<u8>> {
        let (p, backend) = match self.pool_and_backend(pool, query) {
            Ok(found) => found,
            Err(r) => return *r,
        };
        let state = match param(query, "state").as_deref() {
            Some("ready") => AdminState::Ready,
            Some("drain") => AdminState::Drain,
            Some("maint") => AdminState::Maint,
            other => {
                return json_error(
                    StatusCode::BAD_REQUEST,
                    &format!(
                        "query parameter `state` must be ready, drain or maint, not {}",
                        other.map_or("missing".to_string(), |s| format!("`{s}`"))
                    ),
                );
            }
        };
        let grace = match param(query, "grace") {
            None => Duration::ZERO,
            Some(_) if state != AdminState::Maint => {
                return json_error(StatusCode::BAD_REQUEST, "`grace` only applies to maint");
            }
            Some(g) => match humantime::parse_duration(&g) {
                Ok(d) if d <= MAX_GRACE => d,
                _ => {
                    return json_error(
                        StatusCode::BAD_REQUEST,
                        &format!(
                            "`grace` must be a duration with a unit up to {}, like 30s",
                            humantime::format_duration(MAX_GRACE)
                        ),
                    );
                }
            },
        };
        match p.set_admin_state(&backend, state, grace) {
            Ok(()) => json_reply(StatusCode::OK, &pool_json(&p)),
            Err(e) => json_error(StatusCode::NOT_FOUND, &e.to_string()),
        }
    }

    /// `POST /api/v1/pools/{pool}/weight?backend=ADDR&weight=N|config`.
    fn set_weight(&self, pool: &str, query: Option<&str>) -> Response<Vec<u8>> {
        let (p, backend) = match self.pool_and_backend(pool, query) {
            Ok(found) => found,
            Err(r) => return *r,
        };
        let weight = match param(query, "weight").as_deref() {
            Some("config") => None,
            Some(w) => match w.parse::<u32>() {
                Ok(n @ 1..=256) => Some(n),
                _ => {
                    return json_error(
                        StatusCode::BAD_REQUEST,
                        "query parameter `weight` must be 1..=256, or `config` for the configured one",
                    );
                }
            },
            None => {
                return json_error(StatusCode::BAD_REQUEST, "missing query parameter `weight`");
            }
        };
        match p.set_weight(&backend, weight) {
            Ok(()) => json_reply(StatusCode::OK, &pool_json(&p)),
            Err(e) => json_error(StatusCode::NOT_FOUND, &e.to_string()),
        }
    }

    async fn reload(&self) -> Response<Vec<u8>> {
        {
            let mut bucket = crate::sys::lock(&self.reload_tokens);
            let now = Instant::now();
            let refill = now.saturating_duration_since(bucket.1).as_secs_f64() * RELOAD_RATE;
            *bucket = ((bucket.0 + refill).min(RELOAD_BURST), now);
            if bucket.0 < 1.0 {
                let mut r = json_error(
                    StatusCode::TOO_MANY_REQUESTS,
                    "too many reloads asked for; try again in a second",
                );
                r.headers_mut().insert(
                    http::header::RETRY_AFTER,
                    http::HeaderValue::from_static("1"),
                );
                return r;
            }
            bucket.0 -= 1.0;
        }
        let outcome = match tokio::time::timeout(RELOAD_WAIT, self.state.request_reload()).await {
            Ok(Ok(outcome)) => outcome,
            Ok(Err(_)) => Err(crate::reload::ReloadError::Unavailable),
            Err(_) => {
                return json_reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    &json!({ "result": "pending", "problems": [format!(
                        "the reload is still running after {}; its outcome will be logged",
                        humantime::format_duration(RELOAD_WAIT)
                    )] }),
                );
            }
        };
        match outcome {
            Ok(summary) => json_reply(
                StatusCode::OK,
                &json!({ "result": "success", "summary": summary.to_string() }),
            ),
            Err(e) => json_reply(
                StatusCode::UNPROCESSABLE_ENTITY,
                &json!({ "result": "failure", "problems": e.problems() }),
            ),
        }
    }

    fn pools_json(&self) -> Value {
        let pools: serde_json::Map<String, Value> = self
            .state
            .pools()
            .iter()
            .map(|p| (p.name.clone(), pool_json(p)))
            .collect();
        json!({ "pools": pools })
    }
}

fn pool_json(p: &Pool) -> Value {
    let generation = p.generation();
    let settings = &generation.settings;
    let backends: Vec<Value> = generation
        .members
        .iter()
        .map(|m| {
            let b = &m.backend;
            json!({
                "address": b.address.as_str(),
                "resolved": b.resolved().map(|a| a.to_string()),
                "state": b.health().as_str(),
                "up": b.health() == Health::Up,
                "role": b.role().map_or("unknown", |r| r.as_str()),
                "active": m.is_serving(),
                "weight": p.weight_of(m),
                "admin_state": b.admin_label(),
                "backup": m.backup,
                "connections": b.open_connections(),
            })
        })
        .collect();
    let mut v = json!({
        "mode": settings.mode.as_str(),
        "algorithm": settings.algorithm.as_str(),
        "on_backend_down": settings.on_backend_down.as_str(),
        "health_check": settings.health_check.kind.name(),
        "role": settings.role.as_str(),
        "conflicts": p.conflicts(),
        "ready": p.is_ready(),
        "backends": backends,
    });
    if settings.role == crate::config::RoleRequirement::Replica {
        v["fallback_to_primary"] = json!(settings.fallback_to_primary);
    }
    if settings.mode == crate::config::Mode::ActivePassive {
        v["failback"] = json!(settings.failback.as_str());
        v["on_failback"] = json!(settings.on_failback.as_str());
    }
    v
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok());
        match (bytes[i], hex.and_then(|h| u8::from_str_radix(h, 16).ok())) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b'+', _) => {
                out.push(b' ');
                i += 1;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn reply(status: StatusCode, content_type: &str, body: Vec<u8>) -> Response<Vec<u8>> {
    let mut r = Response::new(body);
    *r.status_mut() = status;
    if let Ok(v) = content_type.parse() {
        r.headers_mut().insert(http::header::CONTENT_TYPE, v);
    }
    let len = r.body().len();
    r.headers_mut()
        .insert(http::header::CONTENT_LENGTH, len.into());
    r
}

fn text(status: StatusCode, body: &str) -> Response<Vec<u8>> {
    reply(
        status,
        "text/plain; charset=utf-8",
        body.as_bytes().to_vec(),
    )
}

fn json_reply(status: StatusCode, v: &Value) -> Response<Vec<u8>> {
    let mut body = serde_json::to_vec_pretty(v).unwrap_or_default();
    body.push(b'\n');
    reply(status, "application/json", body)
}

fn json_error(status: StatusCode, message: &str) -> Response<Vec<u8>> {
    json_reply(status, &json!({ "error": message }))
}

fn method_not_allowed(allow: &str) -> Response<Vec<u8>> {
    let mut r = text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
    if let Ok(v) = allow.parse() {
        r.headers_mut().insert(http::header::ALLOW, v);
    }
    r
}

/// The percent-decoded value of query parameter `name`.
fn param(query: Option<&str>, name: &str) -> Option<String> {
    query
        .into_iter()
        .flat_map(|q| q.split('&'))
        .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
        .map(percent_decode)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_query_values() {
        assert_eq!(percent_decode("%5B%3A%3A1%5D%3A80"), "[::1]:80");
        assert_eq!(percent_decode("a+b%zz"), "a b%zz");
    }
}
