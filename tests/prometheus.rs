//! A real Prometheus (Debian's `prometheus` package) scrapes sluice's admin
//! `/metrics` while traffic flows and a backend dies and comes back, and the
//! test asks its HTTP API what an operator would see:
//!
//! - `up == 1` and `rate(sluice_listener_connections_total[1m]) > 0`;
//! - every query of every panel of the Grafana dashboard
//!   (`docker/grafana/sluice-dashboard.json`) and of its variables returns
//!   data, so no panel is silently broken by a renamed metric or label;
//! - the shipped alert rules (`docker/alerts.yml`) load and evaluate without
//!   error, and `SluiceBackendDown` fires in Prometheus' own rule evaluation
//!   after a backend is killed and resolves after it returns.
//!
//! The rules run with every `for:` shortened to [`SHORT_FOR`] (the shipped
//! `for: 2m` would make the test take minutes); the expressions are the
//! shipped ones. Without `/usr/bin/prometheus` the tests say SKIPPED loudly
//! and return.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod common;
#[path = "tls/pki.rs"]
#[allow(dead_code)]
mod pki;
mod servers;

use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::*;
use percent_encoding::{NON_ALPHANUMERIC, utf8_percent_encode};
use serde_json::Value;
use servers::{PROMETHEUS_BIN, Prometheus};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The `for:` every shipped rule gets here; long enough that an alert goes
/// through `pending` first, as in production.
const SHORT_FOR: &str = "2s";
/// What the dashboard's `$__rate_interval` becomes (Grafana makes it at
/// least four scrape intervals; the test scrapes every second).
const RATE_WINDOW: &str = "30s";
/// How long Prometheus may take to show a state (scrape, evaluation, `for`).
const PROM_DEADLINE: Duration = Duration::from_secs(30);
/// The shipped dashboard and rules.
const DASHBOARD: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/docker/grafana/sluice-dashboard.json"
);
const ALERTS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/docker/alerts.yml");

/// Say loudly (past the test harness' capture) that the tests did not run.
fn skipped() -> bool {
    if Prometheus::installed() {
        return false;
    }
    let _ = writeln!(
        std::io::stderr(),
        "SKIPPED: {PROMETHEUS_BIN} is missing (Debian package `prometheus`; `make deps` installs it): \
         the real-Prometheus tests did NOT run"
    );
    true
}

/// A line for the test log that shows without `--nocapture`.
fn report(line: &str) {
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// `GET path` on Prometheus' HTTP API over HTTP/1.0 (never chunked): the
/// `data` of a `"status": "success"` answer.
async fn api(prom: SocketAddr, path: &str) -> Result<Value, String> {
    let exchange = async {
        let mut s = TcpStream::connect(prom).await?;
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {prom}\r\n\r\n").as_bytes())
            .await?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).await?;
        Ok::<_, std::io::Error>(raw)
    };
    let raw = tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .map_err(|_| format!("GET {path}: no answer within 10 s"))?
        .map_err(|e| format!("GET {path}: {e}"))?;
    let text = String::from_utf8_lossy(&raw);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b)
        .ok_or_else(|| format!("GET {path}: bad answer {text:?}"))?;
    let v: Value =
        serde_json::from_str(body).map_err(|e| format!("GET {path}: {e} in {body:?}"))?;
    if v["status"] != "success" {
        return Err(format!("GET {path}: {v}"));
    }
    Ok(v["data"].clone())
}

/// An instant query: the series of its vector result.
async fn query(prom: SocketAddr, expr: &str) -> Result<Vec<Value>, String> {
    let path = format!(
        "/api/v1/query?query={}",
        utf8_percent_encode(expr, NON_ALPHANUMERIC)
    );
    let data = api(prom, &path).await?;
    match data["resultType"].as_str() {
        Some("vector") => Ok(data["result"].as_array().cloned().unwrap_or_default()),
        other => Err(format!("{expr}: result type {other:?}, not a vector")),
    }
}

/// A series' value as a number (`"NaN"` and `"+Inf"` included).
fn sample(series: &Value) -> f64 {
    series["value"][1]
        .as_str()
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::NAN)
}

/// Poll `check` every 100 ms until it gives `Ok`; panic after `limit` with
/// its last complaint.
async fn poll<T, F, Fut>(what: &str, limit: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let start = Instant::now();
    loop {
        match check().await {
            Ok(v) => return v,
            Err(last) => assert!(
                start.elapsed() < limit,
                "timed out after {limit:?} waiting for {what}; last: {last}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The active alerts (pending or firing) named `name`.
async fn alerts(prom: SocketAddr, name: &str) -> Result<Vec<Value>, String> {
    let data = api(prom, "/api/v1/alerts").await?;
    Ok(data["alerts"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter(|a| a["labels"]["alertname"] == name)
        .collect())
}

/// `docker/alerts.yml` with every `for:` set to [`SHORT_FOR`], and the
/// alerts whose `for:` changed with their shipped value.
fn shortened_rules(shipped: &str) -> (String, Vec<(String, String)>) {
    let mut doc: serde_yaml::Value = serde_yaml::from_str(shipped).expect("docker/alerts.yml");
    let mut changed = Vec::new();
    let groups = doc
        .get_mut("groups")
        .and_then(serde_yaml::Value::as_sequence_mut)
        .expect("alerts.yml has groups");
    for group in groups {
        let rules = group
            .get_mut("rules")
            .and_then(serde_yaml::Value::as_sequence_mut)
            .expect("each group has rules");
        for rule in rules {
            let name = rule["alert"].as_str().unwrap_or("?").to_string();
            if let Some(f) = rule.get_mut("for") {
                changed.push((name, f.as_str().unwrap_or("?").to_string()));
                *f = SHORT_FOR.into();
            }
        }
    }
    (serde_yaml::to_string(&doc).unwrap(), changed)
}

/// A dashboard expression as Grafana would send it with every variable at
/// "All" and `$__rate_interval` at [`RATE_WINDOW`]; an unknown variable
/// fails the test (extend this when the dashboard gets one).
fn grafana_expr(expr: &str) -> String {
    let mut e = expr.replace("$__rate_interval", RATE_WINDOW);
    // The variables' allValue.
    for var in ["$job", "$instance", "$listener", "$pool"] {
        e = e.replace(var, ".*");
    }
    assert!(
        !e.contains('$'),
        "unknown Grafana variable in `{expr}`: teach grafana_expr() its value"
    );
    e
}

/// Every panel query of the dashboard: (panel title, refId, expression as
/// sent), rows' nested panels included. Also checks what Grafana needs:
/// each panel has a query, and each query uses the `$datasource` variable.
fn dashboard_queries(dashboard: &Value) -> Vec<(String, String, String)> {
    fn walk(panels: &[Value], out: &mut Vec<(String, String, String)>) {
        for p in panels {
            let title = p["title"].as_str().unwrap_or("?").to_string();
            if p["type"] == "row" {
                walk(p["panels"].as_array().map_or(&[], Vec::as_slice), out);
                continue;
            }
            let targets = p["targets"].as_array().map_or(&[][..], Vec::as_slice);
            assert!(!targets.is_empty(), "panel `{title}` has no query");
            for t in targets {
                let expr = t["expr"].as_str().unwrap_or_default();
                assert!(!expr.is_empty(), "panel `{title}` has an empty query");
                assert_eq!(
                    t["datasource"]["uid"], "${datasource}",
                    "panel `{title}`: queries use the $datasource variable"
                );
                let ref_id = t["refId"].as_str().unwrap_or("?").to_string();
                out.push((title.clone(), ref_id, grafana_expr(expr)));
            }
        }
    }
    let mut out = Vec::new();
    walk(
        dashboard["panels"].as_array().expect("dashboard panels"),
        &mut out,
    );
    out
}

/// The dashboard's query variables, `label_values(SELECTOR, LABEL)`, as
/// (name, PromQL that lists the label's values, label).
fn variable_queries(dashboard: &Value) -> Vec<(String, String, String)> {
    dashboard["templating"]["list"]
        .as_array()
        .expect("dashboard variables")
        .iter()
        .filter(|v| v["type"] == "query")
        .map(|v| {
            let name = v["name"].as_str().unwrap_or("?").to_string();
            let def = v["query"]["query"].as_str().unwrap_or_default();
            let (selector, label) = def
                .strip_prefix("label_values(")
                .and_then(|d| d.strip_suffix(')'))
                .and_then(|d| d.rsplit_once(','))
                .unwrap_or_else(|| panic!("variable {name}: not label_values(m, l): {def}"));
            let label = label.trim().to_string();
            let expr = grafana_expr(&format!("count by ({label}) ({selector})"));
            (name, expr, label)
        })
        .collect()
}

/// Paced client traffic (one connection every 20 ms, at most
/// [`Traffic::MAX`]): plain echo exchanges through `front`, and every tenth
/// through the TLS listener `secure`.
struct Traffic {
    ok: AtomicUsize,
    failed: AtomicUsize,
    stop: AtomicBool,
}

impl Traffic {
    const MAX: usize = 3_000;

    fn start(
        plain: SocketAddr,
        tls: SocketAddr,
        client: Arc<rustls::ClientConfig>,
    ) -> (Arc<Traffic>, tokio::task::JoinHandle<()>) {
        let t = Arc::new(Traffic {
            ok: AtomicUsize::new(0),
            failed: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
        });
        let me = Arc::clone(&t);
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(20));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            for n in 0..Traffic::MAX {
                if me.stop.load(Ordering::Relaxed) {
                    break;
                }
                tick.tick().await;
                let payload = format!("connection {n}\n").repeat(16);
                let exchange = async {
                    let mut got = vec![0u8; payload.len()];
                    if n % 10 == 0 {
                        let tcp = TcpStream::connect(tls).await?;
                        let name = rustls::pki_types::ServerName::try_from("www.example.com")
                            .map_err(std::io::Error::other)?;
                        let mut s = tokio_rustls::TlsConnector::from(Arc::clone(&client))
                            .connect(name, tcp)
                            .await?;
                        s.write_all(payload.as_bytes()).await?;
                        s.read_exact(&mut got).await?;
                    } else {
                        let mut s = TcpStream::connect(plain).await?;
                        s.write_all(payload.as_bytes()).await?;
                        s.shutdown().await?;
                        s.read_exact(&mut got).await?;
                    }
                    Ok::<_, std::io::Error>(got == payload.as_bytes())
                };
                match tokio::time::timeout(Duration::from_secs(5), exchange).await {
                    Ok(Ok(true)) => me.ok.fetch_add(1, Ordering::Relaxed),
                    _ => me.failed.fetch_add(1, Ordering::Relaxed),
                };
            }
        });
        (t, task)
    }
}

/// A rustls client that trusts `ca`.
fn client_config(ca: &pki::Pki) -> Arc<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    let pem = std::fs::read(&ca.ca_file).unwrap();
    for c in rustls::pki_types::CertificateDer::pem_slice_iter(&pem) {
        roots.add(c.unwrap()).unwrap();
    }
    Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth(),
    )
}

/// Whether `alert` is about `backend` of pool `app` and in `state`.
fn about(alert: &Value, backend: SocketAddr, state: &str) -> bool {
    alert["labels"]["backend"] == backend.to_string()
        && alert["labels"]["pool"] == "app"
        && alert["state"] == state
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_sluice_runs_every_dashboard_query_and_fires_backend_down() {
    if skipped() {
        return;
    }
    let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(DASHBOARD).unwrap())
        .expect("the dashboard is JSON");
    let panel_queries = dashboard_queries(&dashboard);
    let var_queries = variable_queries(&dashboard);
    let (rules, shortened) = shortened_rules(&std::fs::read_to_string(ALERTS).unwrap());
    let shipped_for = shortened
        .iter()
        .find(|(a, _)| a == "SluiceBackendDown")
        .map(|(_, f)| f.clone())
        .expect("docker/alerts.yml has SluiceBackendDown with a `for:`");

    // An active_passive pool, so the kill is also a failover; a TLS
    // listener, so the TLS panels have data.
    let mut first = Backend::start("first", Behavior::Echo).await;
    let second = Backend::start("second", Behavior::Echo).await;
    let pki = pki::Pki::new("prometheus-test");
    let leaf = pki.leaf("www", &["www.example.com"]);
    let (port, tls_port) = (reserve_port(), reserve_port());
    let yaml = format!(
        "admin: {{ bind: '{{admin}}' }}\n\
         listeners:\n  \
           front: {{ bind: 127.0.0.1:{port}, pool: app }}\n  \
           secure: {{ bind: 127.0.0.1:{tls_port}, pool: app, tls: {{ certificates: [{{ cert: '{}', key: '{}' }}] }} }}\n\
         pools:\n  app:\n    mode: active_passive\n    \
           health_check: {{ interval: 200ms, timeout: 200ms, rise: 1, fall: 1 }}\n    \
           backends: ['{}', '{}']\n",
        leaf.cert(),
        leaf.key(),
        first.addr,
        second.addr
    );
    let sluice = Sluice::start(&yaml).await;
    let config = format!(
        "global: {{ scrape_interval: 1s, scrape_timeout: 1s, evaluation_interval: 1s }}\n\
         rule_files: [alerts.yml]\n\
         scrape_configs:\n  \
           - job_name: sluice\n    static_configs: [{{ targets: ['{}'] }}]\n",
        sluice.admin
    );
    let prom = tokio::task::spawn_blocking(move || {
        Prometheus::start(&config, &[("alerts.yml", rules.as_str())])
    })
    .await
    .unwrap();
    let p = prom.addr;
    let (traffic, traffic_task) = Traffic::start(
        SocketAddr::from(([127, 0, 0, 1], port)),
        SocketAddr::from(([127, 0, 0, 1], tls_port)),
        client_config(&pki),
    );

    // Prometheus scrapes sluice.
    let up = poll("up == 1", PROM_DEADLINE, || async {
        let r = query(p, r#"up{job="sluice"} == 1"#).await?;
        if r.len() == 1 {
            Ok(r)
        } else {
            Err(format!("{r:?}"))
        }
    })
    .await;
    assert_eq!(up[0]["metric"]["instance"], sluice.admin.to_string());

    // And sees the clients.
    poll("connections rate > 0", PROM_DEADLINE, || async {
        let r = query(
            p,
            r#"rate(sluice_listener_connections_total{job="sluice"}[1m]) > 0"#,
        )
        .await?;
        let listeners: Vec<&str> = r
            .iter()
            .filter_map(|s| s["metric"]["listener"].as_str())
            .collect();
        if listeners.contains(&"front") && listeners.contains(&"secure") {
            Ok(())
        } else {
            Err(format!("listeners with traffic: {listeners:?}"))
        }
    })
    .await;

    // Every shipped rule loaded and evaluates without error.
    poll(
        "every rule evaluated with health ok",
        PROM_DEADLINE,
        || async {
            let data = api(p, "/api/v1/rules").await?;
            let rules: Vec<Value> = data["groups"]
                .as_array()
                .into_iter()
                .flatten()
                .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
                .collect();
            let bad: Vec<String> = rules
                .iter()
                .filter(|r| r["health"] != "ok")
                .map(|r| format!("{}: {} {}", r["name"], r["health"], r["lastError"]))
                .collect();
            if rules.len() >= shortened.len() && bad.is_empty() {
                Ok(())
            } else {
                Err(format!("{} rules; not ok: {bad:?}", rules.len()))
            }
        },
    )
    .await;

    // Every dashboard variable lists values.
    for (name, expr, label) in &var_queries {
        poll(
            &format!("variable ${name}: {expr}"),
            PROM_DEADLINE,
            || async {
                let r = query(p, expr).await?;
                if r.iter().any(|s| s["metric"][label.as_str()].is_string()) {
                    Ok(())
                } else {
                    Err(format!("{r:?}"))
                }
            },
        )
        .await;
    }

    // Kill the active backend: SluiceBackendDown goes pending, then firing.
    let killed = Instant::now();
    first.kill().await;
    sluice.wait_active("app", &[second.addr]).await;
    let gone = first.addr;
    let saw_pending = std::cell::Cell::new(false);
    poll("SluiceBackendDown firing", PROM_DEADLINE, || async {
        let a = alerts(p, "SluiceBackendDown").await?;
        if a.iter().any(|x| about(x, gone, "pending")) {
            saw_pending.set(true);
        }
        if a.iter().any(|x| about(x, gone, "firing")) {
            Ok(())
        } else {
            Err(format!("{a:?}"))
        }
    })
    .await;
    let to_firing = killed.elapsed();
    let saw_pending = saw_pending.get();
    report(&format!(
        "prometheus: backend killed -> SluiceBackendDown firing in {:.1} s \
         (scrape and evaluation every 1 s, health checks every 200 ms, `for: {SHORT_FOR}` \
         instead of the shipped `for: {shipped_for}`; pending seen: {saw_pending})",
        to_firing.as_secs_f64()
    ));
    let down = alerts(p, "SluiceBackendDown").await.unwrap();
    assert!(
        down.iter()
            .all(|a| a["labels"]["backend"] == gone.to_string()),
        "only the killed backend is down: {down:?}"
    );
    // The kill moved the active_passive pool over: SluiceFailover (no `for:`).
    poll("SluiceFailover firing", PROM_DEADLINE, || async {
        let a = alerts(p, "SluiceFailover").await?;
        if a.iter()
            .any(|x| x["labels"]["pool"] == "app" && x["state"] == "firing")
        {
            Ok(())
        } else {
            Err(format!("{a:?}"))
        }
    })
    .await;

    // Every panel query returns at least one series with a number in it
    // (a NaN-only answer is a panel showing nothing).
    let start = Instant::now();
    let mut pending = panel_queries.clone();
    loop {
        let mut still = Vec::new();
        for (title, ref_id, expr) in pending {
            let answer = query(p, &expr).await;
            let shown = match &answer {
                Ok(series) if series.iter().any(|s| sample(s).is_finite()) => continue,
                Ok(series) => format!("{} series, no finite value: {series:?}", series.len()),
                Err(e) => e.clone(),
            };
            still.push((title, ref_id, expr, shown));
        }
        if still.is_empty() {
            break;
        }
        assert!(
            start.elapsed() < PROM_DEADLINE,
            "{} of {} dashboard queries return no data:\n{}",
            still.len(),
            panel_queries.len(),
            still
                .iter()
                .map(|(t, r, e, why)| format!("- panel `{t}` query {r}: {e}\n  -> {why}"))
                .collect::<Vec<_>>()
                .join("\n")
        );
        pending = still.into_iter().map(|(t, r, e, _)| (t, r, e)).collect();
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    report(&format!(
        "prometheus: all {} dashboard queries ({} variables) return data",
        panel_queries.len(),
        var_queries.len()
    ));

    // The backend returns: the alert resolves (leaves the active alerts).
    let back = Instant::now();
    first.restart().await;
    poll("SluiceBackendDown resolved", PROM_DEADLINE, || async {
        let a = alerts(p, "SluiceBackendDown").await?;
        if a.is_empty() {
            Ok(())
        } else {
            Err(format!("{a:?}"))
        }
    })
    .await;
    report(&format!(
        "prometheus: backend back -> SluiceBackendDown resolved in {:.1} s",
        back.elapsed().as_secs_f64()
    ));
    let up_again = query(p, "sluice_backend_up == 1").await.unwrap();
    assert_eq!(up_again.len(), 2, "both backends up again: {up_again:?}");

    traffic.stop.store(true, Ordering::Relaxed);
    traffic_task.await.unwrap();
    let (ok, failed) = (
        traffic.ok.load(Ordering::Relaxed),
        traffic.failed.load(Ordering::Relaxed),
    );
    report(&format!(
        "prometheus: traffic {ok} exchanges ok, {failed} failed"
    ));
    assert!(ok > 50, "the clients were served: {ok} ok, {failed} failed");
}

/// Prometheus is stopped by its PID and its directory removed when a test
/// fails while it runs.
#[test]
fn prometheus_is_stopped_and_removed_when_a_test_panics() {
    if skipped() {
        return;
    }
    let mut started = None;
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let prom = Prometheus::start("global: { scrape_interval: 1s }\n", &[]);
        started = Some((prom.pid().unwrap(), prom.dir().to_owned()));
        panic!("a failing assertion");
    }));
    assert!(outcome.is_err());
    let (pid, dir) = started.expect("prometheus started");
    // Reaped, so the PID is gone (not a zombie), and the files too.
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "prometheus pid {pid} left"
    );
    assert!(!dir.exists(), "{} left", dir.display());
}
