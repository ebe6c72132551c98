use super::*;

const MINIMAL: &str = "
listeners:
  web: { bind: 127.0.0.1:8080, pool: app }
pools:
  app:
    backends: [127.0.0.1:9001]
";

fn problems(src: &str) -> Vec<String> {
    match Config::from_yaml(src) {
        Ok(c) => panic!("expected problems, got {c:?}"),
        Err(ConfigError::Invalid(p)) => p.into_iter().map(|p| p.to_string()).collect(),
        Err(e) => panic!("unexpected error {e}"),
    }
}

#[test]
fn minimal_file_gets_the_documented_defaults() {
    let c = Config::from_yaml(MINIMAL).unwrap();
    assert_eq!(c.server, ServerSettings::default());
    assert_eq!(c.admin, None);
    let p = &c.pools[0];
    assert_eq!(p.algorithm, Algorithm::RoundRobin);
    assert_eq!(p.mode, Mode::ActiveActive);
    assert_eq!(p.failback, Failback::Auto);
    assert_eq!(p.connect_timeout, Duration::from_secs(2));
    assert_eq!(p.connect_attempts, 3);
    assert_eq!(p.health_check, HealthCheckSettings::default());
    assert_eq!(p.backends[0].weight, 1);
    assert!(!p.backends[0].backup);
    let l = &c.listeners[0];
    assert_eq!(l.bind, vec!["127.0.0.1:8080".parse().unwrap()]);
    assert_eq!((l.max_connections, l.idle_timeout), (None, None));
}

#[test]
fn full_file_is_read() {
    let c = Config::from_yaml(
        "
server: { threads: 4, grace_period: 250ms, shutdown_timeout: 5s, pid_file: /run/s.pid, upgrade_sock: /run/s.sock }
admin: { bind: '[::1]:9100' }
listeners:
  db:
    bind: [127.0.0.1:3306, '[::1]:3306']
    pool: mysql
    max_connections: 10
    idle_timeout: 10m
pools:
  mysql:
    mode: active_passive
    failback: manual
    connect_timeout: 500ms
    connect_attempts: 2
    health_check: { kind: tcp, interval: 1s, timeout: 1s, rise: 1, fall: 5 }
    backends:
      - address: db1.internal:3306
      - address: '[fd00::2]:3306'
",
    )
    .unwrap();
    assert_eq!(c.server.threads, 4);
    assert_eq!(c.server.grace_period, Duration::from_millis(250));
    assert_eq!(c.admin.unwrap().bind, "[::1]:9100".parse().unwrap());
    assert_eq!(c.listeners[0].bind.len(), 2);
    assert_eq!(c.listeners[0].idle_timeout, Some(Duration::from_secs(600)));
    let p = &c.pools[0];
    assert_eq!(
        (p.mode, p.failback),
        (Mode::ActivePassive, Failback::Manual)
    );
    assert_eq!(p.backends[0].address.host(), "db1.internal");
    assert_eq!(p.backends[0].address.socket_addr(), None);
    assert_eq!(
        p.backends[1].address.socket_addr(),
        Some("[fd00::2]:3306".parse().unwrap())
    );
}

#[test]
fn every_problem_is_reported_with_its_path_and_line() {
    let got = problems(
        "listeners:
  web:
    bind: 0.0.0.0:80
    pool: missing
    max_conections: 5
pools:
  app:
    algorithm: round_robbin
    health_check:
      rise: 0
      fall: 101
    backends:
      - address: 10.0.0.1:80
        weight: 0
      - 10.0.0.1
",
    );
    assert_eq!(
        got,
        [
            "listeners.web.pool: no pool is named `missing` (pools: app) (line 4, column 5)",
            "listeners.web.max_conections: unknown key `max_conections` (did you mean `max_connections`?) (line 5, column 5)",
            "pools.app.algorithm: `round_robbin` is not one of: round_robin, least_connections, random, source_hash (did you mean `round_robin`?) (line 8, column 5)",
            "pools.app.health_check.rise: must be at least 1 (line 10, column 7)",
            "pools.app.health_check.fall: must be at most 100 (line 11, column 7)",
            "pools.app.backends[0].weight: must be at least 1 (line 14, column 9)",
            "pools.app.backends[1]: `10.0.0.1` has no port; write it as host:port (line 15, column 9)",
        ]
    );
}

#[test]
fn cross_references_are_checked() {
    let got = problems(
        "admin: { bind: 127.0.0.1:9100 }
listeners:
  a: { bind: 0.0.0.0:80, pool: nope }
  b: { bind: [127.0.0.1:80, 127.0.0.1:9100], pool: app }
pools:
  app: { backends: [127.0.0.1:1] }
",
    );
    assert_eq!(
        got,
        [
            "listeners.a.pool: no pool is named `nope` (pools: app) (line 3, column 26)",
            "listeners.b.bind[0]: 127.0.0.1:80 overlaps with listeners.a.bind (line 4, column 15)",
            "listeners.b.bind[1]: 127.0.0.1:9100 overlaps with admin.bind (line 4, column 29)",
        ]
    );
}

#[test]
fn mode_specific_keys_are_rejected_where_they_mean_nothing() {
    let got = problems(
        "listeners: { web: { bind: 0.0.0.0:80, pool: ap } }
pools:
  ap:
    mode: active_passive
    algorithm: random
    backends:
      - { address: a.example:80, weight: 2 }
      - { address: b.example:80, backup: true }
  aa:
    failback: manual
    backends: [{ address: c.example:80, backup: true }]
",
    );
    let paths: Vec<&str> = got.iter().map(|m| m.split(':').next().unwrap()).collect();
    assert_eq!(
        paths,
        [
            "pools.ap.algorithm",
            "pools.ap.backends[0].weight",
            "pools.ap.backends[1].backup",
            "pools.aa.failback",
            "pools.aa.backends",
        ]
    );
}

#[test]
fn addresses_are_validated() {
    for (addr, want) in [
        ("10.0.0.1", "has no port"),
        ("10.0.0.1:0", "is not a port"),
        ("10.0.0.1:70000", "is not a port"),
        ("::1:80", "needs brackets"),
        ("[::1:80", "without a closing"),
        ("[zz]:80", "is not an IPv6 address"),
        ("bad host:80", "neither an IP address nor a DNS name"),
        ("1.2.3:80", "neither an IP address nor a DNS name"),
    ] {
        let err = HostPort::parse(addr).unwrap_err();
        assert!(err.contains(want), "{addr}: {err}");
    }
    assert_eq!(
        HostPort::parse("app-1.svc.local:8080").unwrap().port(),
        8080
    );
    assert_eq!(HostPort::parse("app_1:80").unwrap().host(), "app_1");
}

#[test]
fn listener_bind_must_be_an_ip_literal() {
    let got = problems(
        "listeners: { web: { bind: localhost:80, pool: app } }
pools: { app: { backends: [127.0.0.1:1] } }",
    );
    assert_eq!(got.len(), 1);
    assert!(
        got[0].starts_with("listeners.web.bind: `localhost:80` must be an IP address and port"),
        "{}",
        got[0]
    );
    assert!(got[0].contains("host names are not allowed"));
}

#[test]
fn health_timeout_may_not_exceed_interval() {
    let got = problems(
        "listeners: { web: { bind: 0.0.0.0:80, pool: app } }
pools:
  app:
    health_check: { interval: 500ms, timeout: 2s }
    backends: [127.0.0.1:1]",
    );
    assert_eq!(
        got,
        ["pools.app.health_check.timeout: must not exceed interval (500ms) (line 4, column 38)"]
    );
}

#[test]
fn syntax_errors_carry_a_location() {
    let got = problems("listeners:\n  web: [unclosed\n");
    assert_eq!(got.len(), 1);
    assert!(got[0].starts_with("not valid YAML:"), "{}", got[0]);
    assert!(got[0].contains("(line "), "{}", got[0]);
}

#[test]
fn missing_sections_and_bad_names() {
    assert_eq!(
        problems(""),
        ["the file is empty; it needs at least `listeners` and `pools`"]
    );
    let got =
        problems("listeners: { Web: { bind: 0.0.0.0:80, pool: app } }\npools: {}\nextra: 1\n");
    assert_eq!(
        got,
        [
            "listeners.Web: names may only use a-z, 0-9, `_` and `-` (line 1, column 14)",
            "pools: must have at least one entry (line 2, column 1)",
            "extra: unknown key `extra` (expected one of: server, admin, listeners, pools, access_log) (line 3, column 1)",
        ]
    );
}

#[test]
fn merge_keys_share_settings() {
    let c = Config::from_yaml(
        "
x-check: &check { interval: 1s, timeout: 500ms, rise: 1, fall: 1 }
listeners: { web: { bind: 0.0.0.0:80, pool: app } }
pools:
  app:
    health_check: { <<: *check, fall: 2 }
    backends: [127.0.0.1:1]
",
    );
    // Unknown top-level keys stay errors, even as anchor holders.
    assert!(c.is_err());
    let c = Config::from_yaml(
        "
listeners: { web: { bind: 0.0.0.0:80, pool: app } }
pools:
  base: &base { backends: [127.0.0.1:1], health_check: { interval: 1s, timeout: 500ms } }
  app: { <<: *base, connect_attempts: 1 }
",
    )
    .unwrap();
    let app = c.pool("app").unwrap();
    assert_eq!(app.health_check.interval, Duration::from_secs(1));
    assert_eq!(app.connect_attempts, 1);
    assert_eq!(c.warnings, ["pools.base: no listener uses this pool"]);
}

/// `MINIMAL` with `keys` (one per line, unindented) added to pool `app`.
fn with_pool_keys(keys: &str) -> String {
    let body: String = keys.lines().map(|l| format!("    {l}\n")).collect();
    format!("{MINIMAL}{body}")
}

#[test]
fn database_checks_and_roles_are_read() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("pw");
    std::fs::write(&secret, "s3cret\n").unwrap();
    let c = Config::from_yaml(&with_pool_keys(&format!(
        "role: replica\nfallback_to_primary: true\nhealth_check: {{ kind: postgres, user: monitor, password_file: '{}', database: app }}",
        secret.display()
    )))
    .unwrap();
    let p = &c.pools[0];
    assert_eq!(p.role, RoleRequirement::Replica);
    assert!(p.fallback_to_primary);
    let CheckKind::Postgres(pg) = &p.health_check.kind else {
        panic!("{:?}", p.health_check.kind)
    };
    assert_eq!(pg.database, "app");
    assert_eq!(pg.credentials.user.as_deref(), Some("monitor"));
    assert_eq!(
        pg.credentials.password.as_ref().map(Secret::expose),
        Some("s3cret")
    );
    // The password shows in no debug output.
    assert!(!format!("{c:?}").contains("s3cret"));
}

#[test]
fn send_expect_and_http_checks_are_read() {
    let c = Config::from_yaml(&with_pool_keys(
        "health_check:\n  kind: send_expect\n  steps: [{ send: \"PING\\r\\n\" }, { expect: '^\\+PONG' }, { send_hex: '0a 0b' }, { expect_hex: '0A0B' }]",
    ))
    .unwrap();
    let CheckKind::SendExpect(steps) = &c.pools[0].health_check.kind else {
        panic!()
    };
    assert_eq!(steps.len(), 4);
    assert_eq!(steps[0], Step::Send(b"PING\r\n".to_vec()));
    assert!(matches!(&steps[1], Step::Expect(Expect::Pattern(p)) if p.is_match(b"+PONG\r\n")));
    assert_eq!(steps[2], Step::Send(vec![0x0a, 0x0b]));
    assert_eq!(steps[3], Step::Expect(Expect::Bytes(vec![0x0a, 0x0b])));

    let c = Config::from_yaml(&with_pool_keys(
        "role: primary\nhealth_check: { kind: http, port: 8008, path: /health, expect_status: 200-299, expect_body: ok, primary_path: /primary, replica_path: /replica }",
    ))
    .unwrap();
    let CheckKind::Http(h) = &c.pools[0].health_check.kind else {
        panic!()
    };
    assert_eq!(
        (h.port, h.status, h.path.as_str()),
        (Some(8008), (200, 299), "/health")
    );
    assert_eq!(h.primary_path.as_deref(), Some("/primary"));
    assert!(c.pools[0].health_check.kind.reports_role());
}

#[test]
fn database_check_mistakes_are_reported_with_paths() {
    let p = problems(&with_pool_keys(
        "role: primary\nfallback_to_primary: true\nhealth_check: { kind: mysql, password: hunter2, steps: [] }",
    ));
    let joined = p.join("\n");
    assert!(
        joined.contains("pools.app.fallback_to_primary: only applies to role: replica"),
        "{joined}"
    );
    assert!(
        joined.contains("pools.app.health_check.password: a password is never written"),
        "{joined}"
    );
    assert!(
        joined.contains("pools.app.health_check.steps: only applies to kind send_expect"),
        "{joined}"
    );
    assert!(
        joined.contains("pools.app.health_check.user: is required"),
        "{joined}"
    );
    assert!(
        !joined.contains("hunter2"),
        "the password is not echoed: {joined}"
    );

    let p = problems(&with_pool_keys("role: primary"));
    assert!(
        p[0].contains("pools.app.role: `primary` needs a health check that reports roles"),
        "{p:?}"
    );

    let p = problems(&with_pool_keys(
        "health_check: { kind: redis, password_env: SLUICE_TEST_SURELY_UNSET }",
    ));
    assert!(
        p[0].contains("environment variable `SLUICE_TEST_SURELY_UNSET` is not set"),
        "{p:?}"
    );

    let p = problems(&with_pool_keys(
        "health_check: { kind: send_expect, steps: [{ expect: '(' }, { send_hex: 'abc' }, { send: a, expect: b }] }",
    ));
    assert!(
        p[0].contains("steps[0].expect: not a valid regular expression"),
        "{p:?}"
    );
    assert!(
        p[1].contains("steps[1].send_hex: hex bytes need an even number of digits"),
        "{p:?}"
    );
    assert!(p[2].contains("steps[2]: must hold exactly one of"), "{p:?}");

    let p = problems(&with_pool_keys(
        "health_check: { kind: http, path: health, expect_status: 700 }",
    ));
    assert!(
        p[0].contains("health_check.path: `health` must be a path starting with `/`"),
        "{p:?}"
    );
    assert!(
        p[1].contains("health_check.expect_status: must be an HTTP status"),
        "{p:?}"
    );
}

#[test]
fn primary_hold_defaults_from_the_checks_and_applies_only_where_a_primary_is_chosen() {
    let c = Config::from_yaml(&with_pool_keys(
        "role: primary\nhealth_check: { kind: redis, interval: 500ms, timeout: 200ms, rise: 3 }",
    ))
    .unwrap();
    assert_eq!(c.pools[0].primary_hold, Duration::from_millis(2500));
    let c = Config::from_yaml(&with_pool_keys(
        "role: replica\nfallback_to_primary: true\nprimary_hold: 1m\nhealth_check: { kind: redis }",
    ))
    .unwrap();
    assert_eq!(c.pools[0].primary_hold, Duration::from_secs(60));
    let p = problems(&with_pool_keys("primary_hold: 10s")).join("\n");
    assert!(
        p.contains("pools.app.primary_hold: only applies to role: primary"),
        "{p}"
    );
    let p = problems(&with_pool_keys(
        "role: primary\nprimary_hold: soon\nhealth_check: { kind: redis }",
    ))
    .join("\n");
    assert!(p.contains("pools.app.primary_hold: "), "{p}");
}

/// `MINIMAL`'s pool and listener, with `server` keys, listener keys and
/// health-check keys added (each a flow-mapping body, possibly empty).
fn with_durations(server: &str, listener: &str, pool: &str, check: &str) -> String {
    format!(
        "server: {{ {server} }}
listeners:
  web: {{ bind: 127.0.0.1:8080, pool: app{listener} }}
pools:
  app:
    health_check: {{ {check} }}
    backends: [127.0.0.1:9001]
{pool}"
    )
}

#[test]
fn every_duration_has_a_maximum_named_by_its_path() {
    for huge in ["18446744073709551615s", "300000000000y", "25h"] {
        let got = problems(&with_durations(
            &format!("grace_period: {huge}, shutdown_timeout: {huge}"),
            &format!(", idle_timeout: {huge}"),
            &format!("    connect_timeout: {huge}\n"),
            &format!("interval: {huge}, timeout: {huge}"),
        ));
        let paths: Vec<&str> = got.iter().map(|m| m.split(": ").next().unwrap()).collect();
        assert_eq!(
            paths,
            [
                "server.grace_period",
                "server.shutdown_timeout",
                "listeners.web.idle_timeout",
                "pools.app.health_check.interval",
                "pools.app.health_check.timeout",
                "pools.app.connect_timeout",
            ],
            "{huge}: {got:#?}"
        );
        for m in &got {
            assert!(m.contains(": must be at most "), "{m}");
        }
    }
    // The limits themselves are accepted.
    let c = Config::from_yaml(&with_durations(
        "grace_period: 1h, shutdown_timeout: 24h",
        ", idle_timeout: 24h",
        "    connect_timeout: 5m\n",
        "interval: 1h, timeout: 5m",
    ))
    .unwrap();
    assert_eq!(c.server.shutdown_timeout, Duration::from_secs(86_400));
    assert_eq!(
        c.listeners[0].idle_timeout,
        Some(Duration::from_secs(86_400))
    );
    assert_eq!(c.pools[0].health_check.interval, Duration::from_secs(3_600));
}

#[test]
fn deep_nesting_is_rejected_at_once() {
    // N `[` then N `]`, and N nested flow mappings, took seconds to minutes.
    let n = 50_000;
    for doc in [
        format!("{}{}", "[".repeat(n), "]".repeat(n)),
        format!("a: {}1{}", "{a: ".repeat(n), "}".repeat(n)),
        format!("a:\n{}", "- ".repeat(n)),
    ] {
        let started = std::time::Instant::now();
        let got = problems(&doc);
        let took = started.elapsed();
        assert_eq!(got.len(), 1, "{got:?}");
        assert!(got[0].contains("nested more than"), "{got:?}");
        assert!(took < Duration::from_secs(2), "took {took:?}");
    }
    // A depth the schema can use is fine.
    Config::from_yaml(
        "listeners: { web: { bind: 127.0.0.1:8080, pool: app } }
pools: { app: { health_check: { kind: send_expect, steps: [{ send: a }, { expect: b }] }, backends: [{ address: 127.0.0.1:9001 }] } }",
    )
    .unwrap();
}

#[test]
fn a_leading_byte_order_mark_is_accepted() {
    let c = Config::from_yaml(&format!("\u{feff}{MINIMAL}")).unwrap();
    assert_eq!(c.pools[0].name, "app");
    // Line numbers still count from the first line.
    let got = problems(&format!("\u{feff}{MINIMAL}    colour: red\n"));
    assert_eq!(
        got,
        [
            "pools.app.colour: unknown key `colour` (expected one of: algorithm, mode, failback, connect_timeout, connect_attempts, on_backend_down, on_failback, health_check, role, fallback_to_primary, primary_hold, proxy_protocol, backends, tls, http_version) (line 7, column 5)"
        ]
    );
}

#[test]
fn problem_lists_stop_at_a_cap_and_say_how_many_more() {
    let mut doc = String::from(MINIMAL);
    doc.push_str("server:\n");
    for i in 0..1000 {
        doc.push_str(&format!("  unknown_{i}: 1\n"));
    }
    let got = problems(&doc);
    assert_eq!(got.len(), 101, "{:?}", &got[..3]);
    assert!(
        got[0].starts_with("server.unknown_0: unknown key"),
        "{}",
        got[0]
    );
    assert!(
        got[99].starts_with("server.unknown_99: unknown key"),
        "{}",
        got[99]
    );
    assert_eq!(
        got[100],
        "and 900 more problems (only the first 100 are listed)"
    );
}

#[test]
fn a_backend_that_leads_back_to_its_own_listener_is_rejected() {
    for (bind, backend) in [
        ("127.0.0.1:8080", "127.0.0.1:8080"),
        ("0.0.0.0:8080", "127.0.0.1:8080"),
        ("0.0.0.0:8080", "127.0.0.9:8080"),
        ("0.0.0.0:8080", "0.0.0.0:8080"),
        ("127.0.0.1:8080", "localhost:8080"),
        ("'[::1]:8080'", "localhost:8080"),
        ("'[::]:8080'", "'[::1]:8080'"),
    ] {
        let got = problems(&format!(
            "listeners: {{ web: {{ bind: {bind}, pool: app }} }}
pools: {{ app: {{ backends: [127.0.0.1:9001, {backend}] }} }}"
        ));
        assert_eq!(got.len(), 1, "{bind} -> {backend}: {got:?}");
        assert!(
            got[0].starts_with("pools.app.backends[1]: ")
                && got[0].contains("is listener `web` of this sluice (listeners.web.bind)")
                && got[0].contains("loop"),
            "{bind} -> {backend}: {}",
            got[0]
        );
    }
    // Through another listener and pool and back.
    let got = problems(
        "listeners:
  a: { bind: 127.0.0.1:8080, pool: one }
  b: { bind: 127.0.0.1:8081, pool: two }
pools:
  one: { backends: [127.0.0.1:8081] }
  two: { backends: [127.0.0.1:8080] }",
    );
    assert_eq!(got.len(), 2, "{got:?}");
    assert!(got[0].starts_with("pools.one.backends[0]: "), "{got:?}");
    assert!(got[1].starts_with("pools.two.backends[0]: "), "{got:?}");
    // A chain that ends at a real backend is no loop; neither is another port or address.
    Config::from_yaml(
        "listeners:
  a: { bind: 127.0.0.1:8080, pool: one }
  b: { bind: 127.0.0.1:8081, pool: two }
  c: { bind: 127.0.0.2:8082, pool: two }
pools:
  one: { backends: [127.0.0.1:8081] }
  two: { backends: [127.0.0.1:9001, 127.0.0.1:8082, db.example:8080] }",
    )
    .unwrap();
}

#[test]
fn dual_stack_wildcards_overlap_unless_bindv6only() {
    let v6only =
        std::fs::read_to_string("/proc/sys/net/ipv6/bindv6only").is_ok_and(|s| s.trim() == "1");
    let docs = [
        "listeners:
  a: { bind: 0.0.0.0:8080, pool: app }
  b: { bind: '[::]:8080', pool: app }
pools: { app: { backends: [127.0.0.1:9001] } }",
        "listeners:
  a: { bind: [127.0.0.1:8080, '[::]:8080'], pool: app }
pools: { app: { backends: [127.0.0.1:9001] } }",
    ];
    for doc in docs {
        match Config::from_yaml(doc) {
            Ok(_) => assert!(v6only, "with bindv6only=0, [::] covers IPv4 too:\n{doc}"),
            Err(ConfigError::Invalid(p)) => {
                assert!(!v6only, "{p:?}");
                assert_eq!(p.len(), 1, "{p:?}");
                assert!(p[0].to_string().contains("overlaps with"), "{p:?}");
            }
            Err(e) => panic!("{e}"),
        }
    }
}

#[test]
fn a_password_file_is_read_only_if_small_and_regular() {
    let dir = tempfile::tempdir().unwrap();
    let big = dir.path().join("big");
    std::fs::write(&big, vec![b'x'; 1 << 20]).unwrap();
    for (file, want) in [
        (big.display().to_string(), "bytes"),
        (dir.path().display().to_string(), "not a regular file"),
    ] {
        let got = problems(&with_pool_keys(&format!(
            "health_check: {{ kind: redis, password_file: '{file}' }}"
        )));
        assert_eq!(got.len(), 1, "{got:?}");
        assert!(
            got[0].starts_with("pools.app.health_check.password_file: ")
                && got[0].contains(&file)
                && got[0].contains(want),
            "{}",
            got[0]
        );
    }
}

#[test]
fn a_missing_pool_lists_a_few_of_the_others() {
    let pools: String = (0..12)
        .map(|i| format!("  p{i}: {{ backends: [127.0.0.1:9001] }}\n"))
        .collect();
    let got = problems(&format!(
        "listeners: {{ web: {{ bind: 127.0.0.1:8080, pool: app }} }}\npools:\n{pools}"
    ));
    assert_eq!(
        got,
        [
            "listeners.web.pool: no pool is named `app` (pools: p0, p1, p2, p3, p4, p5, p6, p7, p8, p9 and 2 more) (line 1, column 43)"
        ]
    );
}

#[test]
fn aliases_may_not_expand_a_small_file_into_a_huge_one() {
    // 8 KB: 2,000 aliases of a list of 1,000 values were 2 million values;
    // the count stops at the alias that passes a million.
    let list = vec!["1"; 1000].join(",");
    let aliases = vec!["*a"; 2000].join(",");
    let got = problems(&format!("{MINIMAL}server: &a [{list}]\nx: [{aliases}]\n"));
    assert_eq!(
        got,
        [
            "not accepted: the YAML holds more than 1000000 values once its aliases are expanded (line 8, column 2996)"
        ]
    );
    // Sharing settings through anchors stays fine.
    let c = Config::from_yaml(
        "listeners: { web: { bind: 127.0.0.1:8080, pool: a } }
pools:
  a: &pool { health_check: { interval: 1s, timeout: 500ms }, backends: [127.0.0.1:9001] }
  b: *pool
  c: { <<: *pool, connect_attempts: 1 }",
    )
    .unwrap();
    assert_eq!(c.pools.len(), 3);
}

/// `MINIMAL`'s listener with `keys` added (a flow-mapping tail).
fn with_listener_keys(keys: &str) -> String {
    MINIMAL.replace("pool: app }", &format!("pool: app, {keys} }}"))
}

#[test]
fn edge_keys_are_read() {
    let c = Config::from_yaml(&with_listener_keys(
        "allow: [10.0.0.0/8, '2001:db8::/32', 192.0.2.7], deny: 10.1.0.0/16, \
         per_source: { max_connections: 5, rate: 0.5 }, \
         proxy_protocol: { accept: any, from: [127.0.0.1] }",
    ))
    .unwrap();
    let l = &c.listeners[0];
    assert_eq!(l.allow.as_ref().unwrap().len(), 3);
    assert_eq!(l.deny[0].to_string(), "10.1.0.0/16");
    let ps = l.per_source.as_ref().unwrap();
    assert_eq!(
        (ps.max_connections, ps.rate, ps.burst),
        (Some(5), Some(0.5), 1)
    );
    let pp = l.proxy_protocol.as_ref().unwrap();
    assert_eq!(pp.version, None);
    let c = Config::from_yaml(&with_pool_keys("proxy_protocol: v1")).unwrap();
    assert_eq!(c.pools[0].proxy_protocol, Some(edge::ProxyVersion::V1));
}

#[test]
fn edge_mistakes_are_reported_with_paths() {
    let p = problems(&with_listener_keys(
        "allow: [10.0.0.300/8, 10.0.0.1/8], deny: 42, per_source: { burst: 3 }, \
         proxy_protocol: { accept: v3 }",
    ))
    .join("\n");
    for want in [
        "listeners.web.allow[0]: `10.0.0.300/8` is not an IP address or CIDR prefix",
        "listeners.web.allow[1]: `10.0.0.1/8` has host bits set; the prefix is 10.0.0.0/8",
        "listeners.web.deny: must be a list of addresses or CIDR prefixes",
        "listeners.web.per_source.burst: only applies with rate",
        "listeners.web.per_source: needs max_connections, rate, or both",
        "listeners.web.proxy_protocol.accept: ",
        "listeners.web.proxy_protocol.from: is required",
    ] {
        assert!(p.contains(want), "missing `{want}` in:\n{p}");
    }
    let p = problems(&with_listener_keys("allow: []")).join("\n");
    assert!(p.contains("listeners.web.allow: is empty"), "{p}");
    let p = problems(&with_pool_keys("proxy_protocol: v3")).join("\n");
    assert!(p.contains("pools.app.proxy_protocol: "), "{p}");
}

#[test]
fn the_admin_token_is_read_from_a_file_and_never_shown() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("token");
    std::fs::write(&path, "s3cret-token-0123456789\n").unwrap();
    let src = format!(
        "admin: {{ bind: 127.0.0.1:9100, token_file: '{}', protect_reads: true, hosts: [LB.internal] }}\n{MINIMAL}",
        path.display()
    );
    let c = Config::from_yaml(&src).unwrap();
    let a = &c.admin.as_ref().unwrap().access;
    assert_eq!(
        a.token.as_ref().unwrap().expose(),
        "s3cret-token-0123456789"
    );
    assert!(a.protect_reads);
    assert_eq!(a.hosts, ["lb.internal"]);
    assert!(!format!("{c:?}").contains("s3cret"), "Debug never shows it");
    std::fs::write(&path, "short\n").unwrap();
    let p = problems(&src).join("\n");
    assert!(
        p.contains("admin.token_file: the token is shorter than 16"),
        "{p}"
    );
    let p = problems(&format!(
        "admin: {{ bind: 127.0.0.1:9100, protect_reads: true }}\n{MINIMAL}"
    ))
    .join("\n");
    assert!(p.contains("admin.protect_reads: needs a token"), "{p}");
}

#[test]
fn fast_path_is_off_unless_asked_and_a_wrong_value_is_named() {
    let c = Config::from_yaml(MINIMAL).unwrap();
    assert_eq!(c.listeners[0].fast_path, FastPath::Off);
    for (value, want) in [
        ("sockmap", FastPath::Sockmap),
        ("off", FastPath::Off),
        ("false", FastPath::Off),
    ] {
        let src = MINIMAL.replace("pool: app }", &format!("pool: app, fast_path: {value} }}"));
        let c = Config::from_yaml(&src).unwrap();
        assert_eq!(c.listeners[0].fast_path, want, "{value}");
    }
    let src = MINIMAL.replace("pool: app }", "pool: app, fast_path: sockmaps }");
    let p = problems(&src);
    assert!(
        p.iter()
            .any(|p| p.contains("listeners.web.fast_path") && p.contains("did you mean `sockmap`")),
        "{p:?}"
    );
}
