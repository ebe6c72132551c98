//! `/metrics`: every metric of the spec with its labels, values that move,
//! and output that Prometheus's own checker accepts.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::process::Command;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_is_exported_with_its_labels_and_moves() {
    let good = Backend::start("good", Behavior::Echo).await;
    let mut gone = Backend::start("gone", Behavior::Echo).await;
    let port = reserve_port();
    let pool = format!(
        "health_check: {{ interval: 100ms, timeout: 100ms, rise: 1, fall: 1 }}\nbackends: ['{}', '{}']",
        good.addr, gone.addr
    );
    // A second listener terminates TLS, so the TLS families are exported too.
    let certs = tempfile::tempdir().unwrap();
    let made = rcgen::generate_simple_self_signed(vec!["www.example.com".to_string()]).unwrap();
    let (cert, key) = (certs.path().join("www.pem"), certs.path().join("www.key"));
    std::fs::write(&cert, made.cert.pem()).unwrap();
    std::fs::write(&key, made.key_pair.serialize_pem()).unwrap();
    let yaml = front_to_app(port, ", max_connections: 1", &pool).replace(
        "listeners: { front:",
        &format!(
            "listeners: {{ secure: {{ bind: 127.0.0.1:{}, pool: app, tls: {{ cert: '{}', key: '{}' }} }}, front:",
            reserve_port(),
            cert.display(),
            key.display()
        ),
    );
    let sluice = Sluice::start(&yaml).await;
    let listener = [("listener", "front")];
    let b = |addr: SocketAddr| {
        [
            ("pool", "app"),
            (
                "backend",
                Box::leak(addr.to_string().into_boxed_str()) as &str,
            ),
        ]
    };
    let before = sluice.metrics().await;
    for a in [good.addr, gone.addr] {
        assert_eq!(before.value("sluice_backend_up", &b(a)), 1.0);
        assert_eq!(before.value("sluice_backend_active", &b(a)), 1.0);
    }

    // One proxied connection that moves bytes both ways while a second is refused.
    gone.stop_and_wait().await;
    let mut c = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    c.write_all(b"12345").await.unwrap();
    let mut buf = [0u8; 5];
    c.read_exact(&mut buf).await.unwrap();
    let mid = sluice.metrics().await;
    assert_eq!(
        mid.value("sluice_listener_connections_active", &listener),
        1.0
    );
    assert_eq!(
        read_all(SocketAddr::from(([127, 0, 0, 1], port))).await,
        "",
        "refused at max_connections"
    );
    drop(c);
    sluice.wait_active("app", &[good.addr]).await;
    wait_until("connection closed", || async {
        sluice
            .metrics()
            .await
            .value("sluice_listener_connections_active", &listener)
            == 0.0
    })
    .await;
    // Passive health may have marked `gone` down before any check ran; let
    // the checks count a result each way too.
    let checks = |m: &Scrape, addr: SocketAddr, result: &str| {
        m.value(
            "sluice_backend_health_checks_total",
            &[
                ("pool", "app"),
                ("backend", &addr.to_string()),
                ("result", result),
            ],
        )
    };
    wait_until("checks counted", || async {
        let m = sluice.metrics().await;
        checks(&m, good.addr, "success") >= 2.0 && checks(&m, gone.addr, "failure") >= 1.0
    })
    .await;

    let m = sluice.metrics().await;
    assert_eq!(
        m.value(
            "sluice_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        1.0
    );
    assert_eq!(m.value("sluice_listener_connections_total", &listener), 2.0);
    assert_eq!(
        m.value(
            "sluice_listener_rejected_total",
            &[("listener", "front"), ("reason", "max_connections")]
        ),
        1.0
    );
    assert_eq!(
        m.value(
            "sluice_listener_rejected_total",
            &[("listener", "front"), ("reason", "no_backend")]
        ),
        0.0
    );
    assert_eq!(
        m.value(
            "sluice_listener_bytes_total",
            &[("listener", "front"), ("direction", "in")]
        ),
        5.0
    );
    assert_eq!(
        m.value(
            "sluice_listener_bytes_total",
            &[("listener", "front"), ("direction", "out")]
        ),
        5.0
    );
    // Five-byte messages are copied, not spliced.
    assert_eq!(
        m.value("sluice_listener_spliced_bytes_total", &listener),
        0.0
    );
    // The one connection took the normal relay (no `fast_path` asked).
    for (path, want) in [("normal", 1.0), ("sockmap", 0.0)] {
        let labels = [("listener", "front"), ("path", path)];
        assert_eq!(
            m.value("sluice_listener_relayed_connections_total", &labels),
            want,
            "{path}"
        );
    }
    assert_eq!(
        m.value("sluice_connection_duration_seconds_count", &listener),
        1.0
    );
    assert!(
        m.get(
            "sluice_connection_duration_seconds_bucket",
            &[("listener", "front"), ("le", "+Inf")]
        )
        .is_some()
    );

    let served = m.value("sluice_backend_connections_total", &b(good.addr))
        + m.value("sluice_backend_connections_total", &b(gone.addr));
    assert_eq!(served, 1.0);
    assert_eq!(
        m.value("sluice_backend_connections_active", &b(good.addr)),
        0.0
    );
    assert_eq!(m.value("sluice_backend_up", &b(gone.addr)), 0.0);
    assert_eq!(m.value("sluice_backend_active", &b(gone.addr)), 0.0);
    assert_eq!(m.value("sluice_backend_up", &b(good.addr)), 1.0);
    let mut gone_kind = b(gone.addr).to_vec();
    gone_kind.push(("kind", "refused"));
    // The relayed connection may or may not have tried `gone` first.
    assert!(
        m.get("sluice_backend_connect_errors_total", &gone_kind)
            .is_some()
    );
    for kind in ["timeout", "other"] {
        let mut l = b(good.addr).to_vec();
        l.push(("kind", kind));
        assert_eq!(m.value("sluice_backend_connect_errors_total", &l), 0.0);
    }
    let connects: f64 = [good.addr, gone.addr]
        .iter()
        .map(|a| m.value("sluice_backend_connect_duration_seconds_count", &b(*a)))
        .sum();
    assert_eq!(connects, 1.0);
    let mut ok = b(good.addr).to_vec();
    ok.push(("result", "success"));
    assert!(m.value("sluice_backend_health_checks_total", &ok) >= 2.0);
    let mut failed = b(gone.addr).to_vec();
    failed.push(("result", "failure"));
    assert!(m.value("sluice_backend_health_checks_total", &failed) >= 1.0);
    let mut down = b(gone.addr).to_vec();
    down.push(("to", "down"));
    assert_eq!(m.value("sluice_backend_state_changes_total", &down), 1.0);
    let mut up = b(gone.addr).to_vec();
    up.push(("to", "up"));
    assert_eq!(m.value("sluice_backend_state_changes_total", &up), 0.0);
    assert_eq!(
        m.value("sluice_pool_failovers_total", &[("pool", "app")]),
        0.0
    );
    assert!(m.get("process_resident_memory_bytes", &[]).is_some());
    // A tcp check reports no role.
    let mut role = b(good.addr).to_vec();
    role.push(("role", "unknown"));
    assert_eq!(m.value("sluice_backend_role", &role), 1.0);
    role.pop();
    role.push(("role", "primary"));
    assert_eq!(m.value("sluice_backend_role", &role), 0.0);
    assert_eq!(m.value("sluice_pool_conflicts", &[("pool", "app")]), 0.0);
    assert_eq!(
        m.value("sluice_config_reloads_total", &[("result", "failure")]),
        0.0
    );
    assert!(m.value("sluice_config_last_reload_success_timestamp_seconds", &[]) > 0.0);
    // The admin API counts its requests by endpoint and status (the pools
    // query above, and the scrapes).
    assert!(
        m.value(
            "sluice_admin_requests_total",
            &[("endpoint", "/api/v1/pools"), ("code", "200")]
        ) >= 1.0
    );

    // Every backend starts in rotation.
    assert_eq!(
        m.value(
            "sluice_backend_admin_state",
            &[
                ("pool", "app"),
                ("backend", &good.addr.to_string()),
                ("state", "ready")
            ]
        ),
        1.0
    );
    assert_eq!(m.value("sluice_access_log_dropped_total", &[]), 0.0);

    // Labels are bounded: only these names appear, so no client address can.
    let allowed = [
        "listener",
        "pool",
        "backend",
        "reason",
        "direction",
        "kind",
        "result",
        "to",
        "role",
        "path",
        "version",
        "le",
        "endpoint",
        "code",
        "state",
        // sluice_tls_certificate_expiry_timestamp_seconds: configured files.
        "scope",
        "name",
        "file",
    ];
    for line in m.text.lines().filter(|l| l.starts_with("sluice_")) {
        let Some((_, labels)) = line.split_once('{') else {
            continue;
        };
        for pair in labels.split("\",").filter(|p| p.contains('=')) {
            let name = pair.split('=').next().unwrap().trim_start_matches(',');
            assert!(
                allowed.contains(&name),
                "unexpected label `{name}` in {line}"
            );
        }
    }

    // The shipped alert rules use only metrics sluice exports: a renamed
    // metric would leave an alert that can never fire.
    let rules =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docker/alerts.yml")).unwrap();
    let mut used: Vec<&str> = rules
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("sluice_"))
        .collect();
    used.sort_unstable();
    used.dedup();
    assert!(used.len() >= 5, "{used:?}");
    for name in used {
        assert!(
            m.text.contains(&format!("# TYPE {name} ")),
            "docker/alerts.yml uses `{name}`, which sluice does not export"
        );
    }

    // Prometheus's own checker accepts the exposition.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("metrics.txt");
    std::fs::write(&file, &m.text).unwrap();
    let out = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::fs::File::open(&file).unwrap())
        .output()
        .expect("promtool runs (Debian package `prometheus`; `make test` installs it)");
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `promtool` accepts the shipped alert rules, and their unit tests
/// (docker/alerts_test.yml: which alert fires when) pass.
#[test]
fn shipped_alert_rules_are_valid_and_fire_as_specified() {
    let docker = concat!(env!("CARGO_MANIFEST_DIR"), "/docker");
    for args in [
        ["check", "rules", "alerts.yml"],
        ["test", "rules", "alerts_test.yml"],
    ] {
        let out = Command::new("promtool")
            .args(args)
            .current_dir(docker)
            .output()
            .expect("promtool runs (Debian package `prometheus`; `make test` installs it)");
        assert!(
            out.status.success(),
            "promtool {} failed:\n{}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
