//! The admin HTTP listener: metrics, liveness, readiness and the pools API.
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
//! It is served by pingora's HTTP server on its own single-threaded service.

use std::sync::Arc;

use async_trait::async_trait;
use http::{Method, Response, StatusCode};
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use serde_json::{Value, json};

use crate::metrics;
use crate::pool::{Health, MoveError, Pool};
use crate::state::State;

/// How long `POST /api/v1/reload` waits for the reload it asked for.
const RELOAD_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// The admin application.
pub struct AdminApp {
    state: Arc<State>,
}

impl AdminApp {
    /// Serve the process's `state`.
    pub fn new(state: Arc<State>) -> Self {
        AdminApp { state }
    }

    /// Answer one request.
    pub async fn handle(
        &self,
        method: &Method,
        path: &str,
        query: Option<&str>,
    ) -> Response<Vec<u8>> {
        let get = method == Method::GET || method == Method::HEAD;
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
            "/api/v1/reload" if method == Method::POST => self.reload().await,
            "/api/v1/reload" => method_not_allowed("POST"),
            "/metrics" | "/healthz" | "/readyz" | "/api/v1/pools" => method_not_allowed("GET"),
            _ => match path
                .strip_prefix("/api/v1/pools/")
                .and_then(|r| r.strip_suffix("/active"))
            {
                Some(pool) if method == Method::POST => self.make_active(pool, query),
                Some(_) => method_not_allowed("POST"),
                None => text(StatusCode::NOT_FOUND, "not found\n"),
            },
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

    async fn reload(&self) -> Response<Vec<u8>> {
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
                "weight": m.weight,
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

#[async_trait]
impl ServeHttp for AdminApp {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let req = session.req_header();
        let (method, uri) = (req.method.clone(), req.uri.clone());
        self.handle(&method, uri.path(), uri.query()).await
    }
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
