//! Property tests of the configuration loader: generated documents (right
//! keys with right, wrong and odd values) and mutated copies of the shipped
//! files. The loader must never panic, every rejection must say where the
//! problem is, and whatever it accepts must be consistent.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use proptest::prelude::*;
use serde_yaml::{Mapping, Value};
use sluice::config::{Config, ConfigError};

/// Problems that concern the whole file and so have no path.
const WHOLE_FILE: &[&str] = &[
    "the file is empty",
    "not valid YAML",
    "bad merge key",
    "must be a mapping",
    "more problem",
];

/// Load `src`; on rejection, check that every problem says where it is.
fn check(src: &str) -> Option<Config> {
    match Config::from_yaml(src) {
        Ok(config) => Some(config),
        Err(ConfigError::Invalid(problems)) => {
            assert!(!problems.is_empty(), "a rejection lists its problems");
            for p in &problems {
                let whole_file =
                    p.path.is_empty() && WHOLE_FILE.iter().any(|w| p.message.contains(w));
                assert!(
                    !p.path.is_empty() || p.location.is_some() || whole_file,
                    "problem without a path or a location: {p:?}\n--- document ---\n{src}"
                );
                assert!(!p.message.is_empty(), "{p:?}");
            }
            None
        }
        Err(e) => panic!("from_yaml reads no file, yet: {e}"),
    }
}

/// What an accepted configuration must satisfy.
fn consistent(config: &Config) {
    for l in &config.listeners {
        assert!(
            config.pool(&l.pool).is_some(),
            "listener {} names a pool that exists",
            l.name
        );
        assert!(!l.bind.is_empty());
    }
    for p in &config.pools {
        assert!(!p.backends.is_empty(), "pool {} has backends", p.name);
        assert!(p.health_check.rise >= 1 && p.health_check.fall >= 1);
        assert!(p.health_check.timeout <= p.health_check.interval);
    }
}

fn scalar() -> BoxedStrategy<Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| Value::Number(n.into())),
        (-3i64..300).prop_map(|n| Value::Number(n.into())),
        any::<f64>().prop_map(|f| Value::Number(f.into())),
        "[ -~]{0,16}".prop_map(Value::String),
        prop::sample::select(vec![
            "1s",
            "250ms",
            "0s",
            "soon",
            "-1s",
            "10m",
            "1h",
            "2",
            "127.0.0.1:8080",
            "[::1]:80",
            "0.0.0.0:0",
            "::1:80",
            "app",
            "web",
            "round_robin",
            "least_connections",
            "random",
            "source_hash",
            "active_active",
            "active_passive",
            "auto",
            "manual",
            "keep",
            "close",
            "tcp",
            "localhost:9",
            "a.b:65536",
            "",
        ])
        .prop_map(|s| Value::String(s.to_string())),
    ]
    .boxed()
}

/// A plausible value; when `noisy`, sometimes anything.
fn field(plausible: BoxedStrategy<Value>, noisy: bool) -> BoxedStrategy<Value> {
    if !noisy {
        return plausible;
    }
    prop_oneof![
        6 => plausible,
        2 => scalar(),
        1 => prop::collection::vec(scalar(), 0..3).prop_map(Value::Sequence),
    ]
    .boxed()
}

fn text(choices: &[&'static str]) -> BoxedStrategy<Value> {
    prop::sample::select(choices.to_vec())
        .prop_map(|s| Value::String(s.to_string()))
        .boxed()
}

fn number(range: std::ops::Range<i64>) -> BoxedStrategy<Value> {
    range.prop_map(|n| Value::Number(n.into())).boxed()
}

/// A number in `clean`, or when `noisy` in the wider `any`.
fn num(
    clean: std::ops::Range<i64>,
    any: std::ops::Range<i64>,
    noisy: bool,
) -> BoxedStrategy<Value> {
    number(if noisy { any } else { clean })
}

fn duration() -> BoxedStrategy<Value> {
    text(&["100ms", "250ms", "1s", "2s", "5s", "0s", "1m"])
}

/// Short durations (check timeouts) and long ones (intervals), so that
/// clean documents keep `timeout <= interval`.
fn short(noisy: bool) -> BoxedStrategy<Value> {
    if noisy {
        duration()
    } else {
        text(&["100ms", "250ms", "1s"])
    }
}

fn long(noisy: bool) -> BoxedStrategy<Value> {
    if noisy {
        duration()
    } else {
        text(&["1s", "2s", "5s", "1m"])
    }
}

fn flag(noisy: bool) -> BoxedStrategy<Value> {
    if noisy {
        any::<bool>().prop_map(Value::Bool).boxed()
    } else {
        Just(Value::Bool(false)).boxed()
    }
}

fn address() -> BoxedStrategy<Value> {
    prop_oneof![
        (1u16..6).prop_map(|p| Value::String(format!("127.0.0.1:{}", 9000 + p))),
        Just(Value::String("[::1]:9001".into())),
        Just(Value::String("db.internal:5432".into())),
    ]
    .boxed()
}

/// A mapping of the `(key, value)` pairs that were generated, plus now and
/// then a key nobody knows.
fn mapping(entries: Vec<(&'static str, Option<Value>)>, unknown: Option<Value>) -> Value {
    let mut m = Mapping::new();
    for (k, v) in entries {
        if let Some(v) = v {
            m.insert(Value::String(k.to_string()), v);
        }
    }
    if let Some(v) = unknown {
        m.insert(Value::String("colour".into()), v);
    }
    Value::Mapping(m)
}

fn opt(s: BoxedStrategy<Value>, noisy: bool) -> impl Strategy<Value = Option<Value>> {
    proptest::option::weighted(0.6, field(s, noisy))
}

/// A key that a valid document needs: always there unless `noisy`.
fn req(s: BoxedStrategy<Value>, noisy: bool) -> BoxedStrategy<Option<Value>> {
    if noisy {
        opt(s, noisy).boxed()
    } else {
        s.prop_map(Some).boxed()
    }
}

/// The good choices, and when `noisy` the bad ones too.
fn pick(good: &[&'static str], bad: &[&'static str], noisy: bool) -> BoxedStrategy<Value> {
    let mut all = good.to_vec();
    if noisy {
        all.extend_from_slice(bad);
    }
    text(&all)
}

/// A key valid only with some others (`failback`, `on_failback`): left out
/// unless `noisy`.
fn noise_only(choices: &[&'static str], noisy: bool) -> BoxedStrategy<Option<Value>> {
    if noisy {
        opt(text(choices), noisy).boxed()
    } else {
        Just(None).boxed()
    }
}

/// Now and then, when `noisy`, a value for a key nobody knows.
fn rare(noisy: bool) -> BoxedStrategy<Option<Value>> {
    if noisy {
        proptest::option::weighted(0.05, scalar()).boxed()
    } else {
        Just(None).boxed()
    }
}

fn backend(noisy: bool) -> BoxedStrategy<Value> {
    prop_oneof![
        2 => address(),
        3 => (req(address(), noisy), opt(num(1..257, 0..300, noisy), noisy), opt(flag(noisy), noisy), rare(noisy))
            .prop_map(|(a, w, b, u)| mapping(vec![("address", a), ("weight", w), ("backup", b)], u)),
    ]
    .boxed()
}

/// A `send_expect` step: one of its four keys, with a good or bad value.
fn step() -> BoxedStrategy<Value> {
    (
        text(&["send", "send_hex", "expect", "expect_hex", "nope"]),
        text(&["PING\r\n", "^\\+PONG", "0a 0b", "zz", "(", ""]),
    )
        .prop_map(|(k, v)| {
            let mut m = Mapping::new();
            m.insert(k, v);
            Value::Mapping(m)
        })
        .boxed()
}

/// The keys that belong to one check kind or another.
fn kind_keys(noisy: bool) -> BoxedStrategy<Vec<(&'static str, Option<Value>)>> {
    (
        opt(text(&["monitor", ""]), noisy),
        opt(text(&["postgres", "app"]), noisy),
        opt(
            prop::collection::vec(step(), 0..4)
                .prop_map(Value::Sequence)
                .boxed(),
            noisy,
        ),
        opt(text(&["/", "/health", "health"]), noisy),
        opt(text(&["200", "200-399", "399-200", "700"]), noisy),
        opt(text(&["/primary", "primary"]), noisy),
        opt(text(&["SLUICE_FUZZ_UNSET", "PATH"]), noisy),
    )
        .prop_map(|(user, db, steps, path, status, primary, env)| {
            vec![
                ("user", user),
                ("database", db),
                ("steps", steps),
                ("path", path),
                ("expect_status", status),
                ("primary_path", primary),
                ("password_env", env),
            ]
        })
        .boxed()
}

fn health_check(noisy: bool) -> BoxedStrategy<Value> {
    (
        opt(
            pick(
                &["tcp", "http", "redis", "mysql", "postgres", "send_expect"],
                &["udp"],
                noisy,
            ),
            noisy,
        ),
        kind_keys(noisy),
        opt(long(noisy), noisy),
        opt(short(noisy), noisy),
        opt(num(1..101, 0..102, noisy), noisy),
        opt(num(1..101, 0..102, noisy), noisy),
        opt(any::<bool>().prop_map(Value::Bool).boxed(), noisy),
        rare(noisy),
    )
        .prop_map(|(k, keys, i, t, r, f, p, u)| {
            let mut entries = vec![
                ("kind", k),
                ("interval", i),
                ("timeout", t),
                ("rise", r),
                ("fall", f),
                ("passive", p),
            ];
            entries.extend(keys);
            mapping(entries, u)
        })
        .boxed()
}

fn pool(noisy: bool) -> BoxedStrategy<Value> {
    (
        opt(
            text(&["round_robin", "least_connections", "random", "source_hash"]),
            noisy,
        ),
        opt(text(&["active_active", "active_passive"]), noisy),
        noise_only(&["auto", "manual"], noisy),
        opt(duration(), noisy),
        opt(num(1..6, 0..6, noisy), noisy),
        opt(text(&["keep", "close"]), noisy),
        noise_only(&["keep", "close"], noisy),
        opt(health_check(noisy), noisy),
        (
            opt(text(&["any", "primary", "replica"]), noisy),
            opt(any::<bool>().prop_map(Value::Bool).boxed(), noisy),
        ),
        field(
            prop::collection::vec(backend(noisy), usize::from(!noisy)..4)
                .prop_map(Value::Sequence)
                .boxed(),
            noisy,
        ),
        rare(noisy),
    )
        .prop_map(
            |(al, mo, fb, ct, ca, obd, ofb, hc, (role, fallback), be, u)| {
                mapping(
                    vec![
                        ("role", role),
                        ("fallback_to_primary", fallback),
                        ("algorithm", al),
                        ("mode", mo),
                        ("failback", fb),
                        ("connect_timeout", ct),
                        ("connect_attempts", ca),
                        ("on_backend_down", obd),
                        ("on_failback", ofb),
                        ("health_check", hc),
                        ("backends", Some(be)),
                    ],
                    u,
                )
            },
        )
        .boxed()
}

fn listener(noisy: bool) -> BoxedStrategy<Value> {
    // Few ports when noisy (overlaps), many when clean.
    let ports = if noisy { 1u16..5 } else { 1u16..2000 };
    let bind = prop_oneof![
        ports
            .clone()
            .prop_map(|p| Value::String(format!("127.0.0.1:{}", 8000 + p))),
        prop::collection::vec(
            ports.prop_map(|p| Value::String(format!("127.0.0.2:{}", 8000 + p))),
            1..3
        )
        .prop_map(Value::Sequence),
    ];
    let bind = if noisy {
        prop_oneof![bind, Just(Value::String("0.0.0.0:8001".into()))].boxed()
    } else {
        bind.boxed()
    };
    (
        req(bind, noisy),
        req(pick(&["web", "db"], &["nope"], noisy), noisy),
        opt(num(1..5, 0..5, noisy), noisy),
        opt(long(noisy), noisy),
        opt(any::<bool>().prop_map(Value::Bool).boxed(), noisy),
        rare(noisy),
    )
        .prop_map(|(b, p, m, i, s, u)| {
            mapping(
                vec![
                    ("bind", b),
                    ("pool", p),
                    ("max_connections", m),
                    ("idle_timeout", i),
                    ("splice", s),
                ],
                u,
            )
        })
        .boxed()
}

fn named(entry: BoxedStrategy<Value>, names: &[&'static str]) -> BoxedStrategy<Value> {
    let names = names.to_vec();
    prop::collection::vec((prop::sample::select(names), entry), 1..3)
        .prop_map(|entries| {
            let mut m = Mapping::new();
            for (n, v) in entries {
                m.insert(Value::String(n.to_string()), v);
            }
            Value::Mapping(m)
        })
        .boxed()
}

fn document_with(noisy: bool) -> BoxedStrategy<Value> {
    let server = (
        opt(number(0..5), noisy),
        opt(duration(), noisy),
        opt(duration(), noisy),
        opt(pick(&["/tmp/x.pid"], &[""], noisy), noisy),
        rare(noisy),
    )
        .prop_map(|(t, g, s, p, u)| {
            mapping(
                vec![
                    ("threads", t),
                    ("grace_period", g),
                    ("shutdown_timeout", s),
                    ("pid_file", p),
                ],
                u,
            )
        })
        .boxed();
    let admin = req(
        pick(&["127.0.0.1:9100", "0.0.0.0:9100"], &["nowhere"], noisy),
        noisy,
    )
    .prop_map(|b| mapping(vec![("bind", b)], None))
    .boxed();
    (
        opt(server, noisy),
        opt(admin, noisy),
        req(
            named(
                listener(noisy),
                if noisy {
                    &["web", "db", "Bad Name", "a"]
                } else {
                    &["web", "db"]
                },
            ),
            noisy,
        ),
        req(named(pool(noisy), &["web", "db", "x"]), noisy),
        rare(noisy),
    )
        .prop_map(move |(s, a, l, p, u)| {
            let mut doc = mapping(
                vec![("server", s), ("admin", a), ("listeners", l), ("pools", p)],
                u,
            );
            if !noisy {
                make_coherent(&mut doc);
            }
            doc
        })
        .boxed()
}

/// Keep only the check keys its kind takes (filling in the required ones),
/// and a role only where the check reports one.
fn coherent_check(pool: &mut Mapping) {
    let role_aware = match pool.get_mut("health_check").and_then(Value::as_mapping_mut) {
        Some(hc) => {
            let kind = hc
                .get("kind")
                .and_then(Value::as_str)
                .unwrap_or("tcp")
                .to_string();
            let keeps: &[&str] = match kind.as_str() {
                "http" => &["path", "expect_status", "primary_path"],
                "redis" => &["user"],
                "mysql" => &["user"],
                "postgres" => &["user", "database"],
                "send_expect" => &["steps"],
                _ => &[],
            };
            for key in [
                "user",
                "database",
                "steps",
                "path",
                "expect_status",
                "primary_path",
                "password_env",
            ] {
                if !keeps.contains(&key) {
                    hc.remove(key);
                }
            }
            let mut set = |key: &str, value: Value| {
                hc.insert(Value::String(key.to_string()), value);
            };
            match kind.as_str() {
                "mysql" | "postgres" => set("user", Value::String("monitor".into())),
                "send_expect" => set(
                    "steps",
                    serde_yaml::from_str("[{ send: \"PING\\r\\n\" }, { expect: PONG }]").unwrap(),
                ),
                "http" => {
                    set("path", Value::String("/health".into()));
                    set("expect_status", Value::String("200-399".into()));
                }
                _ => {}
            }
            let role_aware = matches!(kind.as_str(), "redis" | "mysql" | "postgres")
                || (kind == "http" && hc.contains_key("primary_path"));
            if kind == "http" {
                if let Some(p) = hc.get_mut("primary_path") {
                    *p = Value::String("/primary".into());
                }
            }
            role_aware
        }
        None => false,
    };
    if !role_aware {
        pool.remove("role");
    }
    if pool.get("role").and_then(Value::as_str) != Some("replica") {
        pool.remove("fallback_to_primary");
    }
}

/// Settle what a clean document cannot get right by chance: every
/// listener's pool exists, active_passive pools carry no algorithm, weights
/// or backups, and no pool lists an address twice.
fn make_coherent(doc: &mut Value) {
    let Some(pools) = doc.get_mut("pools").and_then(Value::as_mapping_mut) else {
        return;
    };
    for (_, pool) in pools.iter_mut() {
        let Some(pool) = pool.as_mapping_mut() else {
            continue;
        };
        coherent_check(pool);
        let passive = pool.get("mode").and_then(Value::as_str) == Some("active_passive");
        if passive {
            pool.remove("algorithm");
        }
        if let Some(Value::Sequence(backends)) = pool.get_mut("backends") {
            let mut seen = Vec::new();
            backends.retain(|b| {
                let address = b.get("address").unwrap_or(b).clone();
                let new = !seen.contains(&address);
                seen.push(address);
                new
            });
            for b in backends.iter_mut().filter_map(Value::as_mapping_mut) {
                if passive {
                    b.remove("weight");
                    b.remove("backup");
                }
            }
        }
    }
    let Some(first) = pools.keys().next().cloned() else {
        return;
    };
    if let Some(listeners) = doc.get_mut("listeners").and_then(Value::as_mapping_mut) {
        for (_, l) in listeners.iter_mut() {
            if let Some(l) = l.as_mapping_mut() {
                l.insert(Value::String("pool".into()), first.clone());
            }
        }
    }
}

/// Documents with plausible values only (many are valid), and noisy ones.
fn document() -> impl Strategy<Value = Value> {
    prop_oneof![document_with(false), document_with(true)]
}

/// One edit of a text: delete, duplicate or replace a slice, or insert bytes.
#[derive(Debug, Clone)]
enum Edit {
    Delete(usize, usize),
    Duplicate(usize, usize),
    Insert(usize, String),
    Truncate(usize),
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        (any::<usize>(), 0usize..40).prop_map(|(a, n)| Edit::Delete(a, n)),
        (any::<usize>(), 0usize..80).prop_map(|(a, n)| Edit::Duplicate(a, n)),
        (
            any::<usize>(),
            prop_oneof![
                "[ -~]{1,8}",
                Just(":".to_string()),
                Just("\n  ".to_string()),
                Just("- ".to_string()),
                Just("&a ".to_string()),
                Just("*a".to_string()),
                Just("<<: *a\n".to_string()),
                Just("{".to_string()),
                Just("\t".to_string()),
                Just("\u{feff}".to_string()),
                Just("é".to_string()),
            ]
        )
            .prop_map(|(a, s)| Edit::Insert(a, s)),
        any::<usize>().prop_map(Edit::Truncate),
    ]
}

fn floor_char(s: &str, i: usize) -> usize {
    let mut i = i % (s.len() + 1);
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

fn apply(s: &mut String, e: &Edit) {
    match e {
        Edit::Delete(a, n) => {
            let a = floor_char(s, *a);
            let b = floor_char(s, (a + n).min(s.len()));
            s.replace_range(a..b.max(a), "");
        }
        Edit::Duplicate(a, n) => {
            let a = floor_char(s, *a);
            let b = floor_char(s, (a + n).min(s.len())).max(a);
            let slice = s[a..b].to_string();
            s.insert_str(b, &slice);
        }
        Edit::Insert(a, t) => {
            let a = floor_char(s, *a);
            s.insert_str(a, t);
        }
        Edit::Truncate(a) => {
            let a = floor_char(s, *a);
            s.truncate(a);
        }
    }
}

/// The files sluice ships and the broken fixtures, to mutate.
fn seeds() -> Vec<String> {
    let mut files = Vec::new();
    for dir in ["conf", "tests/fixtures/invalid"] {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "yaml") {
                files.push(std::fs::read_to_string(path).unwrap());
            }
        }
    }
    files.sort();
    files
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1500, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn generated_documents_never_panic_and_rejections_name_a_path(doc in document()) {
        let src = serde_yaml::to_string(&doc).unwrap();
        if let Some(config) = check(&src) {
            consistent(&config);
        }
    }

    #[test]
    fn mutated_files_never_panic_and_rejections_name_a_place(
        seed in any::<prop::sample::Index>(),
        edits in prop::collection::vec(edit(), 1..6),
    ) {
        let seeds = seeds();
        let mut src = seed.get(&seeds).clone();
        for e in &edits {
            apply(&mut src, e);
        }
        if let Some(config) = check(&src) {
            consistent(&config);
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        check(&String::from_utf8_lossy(&bytes));
    }
}

/// The generators do reach both outcomes, so the properties are not vacuous.
#[test]
fn the_generators_produce_valid_and_invalid_documents() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    let mut runner = TestRunner::deterministic();
    let strategy = document();
    let (mut valid, mut invalid) = (0, 0);
    for _ in 0..3000 {
        let doc = strategy.new_tree(&mut runner).unwrap().current();
        match check(&serde_yaml::to_string(&doc).unwrap()) {
            Some(_) => valid += 1,
            None => invalid += 1,
        }
    }
    println!("generated: {valid} valid, {invalid} invalid");
    assert!(
        valid >= 100 && invalid >= 100,
        "valid {valid}, invalid {invalid}"
    );
}

/// Files shaped to be slow or to grow in memory: deep nesting of every
/// kind, floods of keys, problems, binds, backends and aliases, each about
/// 1 MB.
/// Hostile files of about `size` bytes each (the shapes scale with it).
fn hostile_files(size: usize) -> Vec<(&'static str, String)> {
    #[allow(non_snake_case)]
    let MB = size;
    let head = "listeners: { web: { bind: 127.0.0.1:8080, pool: app } }\n";
    let pool = "pools: { app: { backends: [127.0.0.1:9001] } }\n";
    let mut files = vec![
        (
            "nested lists",
            format!("{}{}", "[".repeat(MB / 2), "]".repeat(MB / 2)),
        ),
        (
            "nested mappings",
            format!("a: {}1{}", "{a: ".repeat(MB / 5), "}".repeat(MB / 5)),
        ),
        (
            "nested block lists",
            format!("a:\n{}x\n", "- ".repeat(MB / 2)),
        ),
        (
            "one long string",
            format!("{head}{pool}server: {{ pid_file: '{}' }}\n", "x".repeat(MB)),
        ),
    ];
    let unknown: String = (0..MB / 10).map(|i| format!("  k{i}: 1\n")).collect();
    files.push(("unknown keys", format!("{head}{pool}server:\n{unknown}")));
    let weights: String = (0..MB / 40)
        .map(|i| {
            format!(
                "  - {{ address: 10.0.{}.{}:80, weight: 0 }}\n",
                i / 250,
                i % 250
            )
        })
        .collect();
    files.push((
        "bad backends",
        format!("{head}pools:\n app:\n  backends:\n{weights}"),
    ));
    let binds: String = (0..MB / 60)
        .map(|i| {
            format!(
                "  l{i}: {{ bind: 127.{}.{}.1:80, pool: app }}\n",
                i / 250,
                i % 250
            )
        })
        .collect();
    files.push((
        "listeners on one port",
        format!("listeners:\n{binds}{pool}"),
    ));
    let pools: String = (0..MB / 60)
        .map(|i| {
            format!(
                "  p{i}: {{ backends: ['127.0.0.1:{}'] }}\n",
                1000 + i % 60000
            )
        })
        .collect();
    files.push(("many pools", format!("{head}pools:\n{pools}")));
    let aliases = format!(
        "{head}{pool}server: &a {{ threads: 1 }}\nx: [{}]\n",
        vec!["*a"; MB / 4].join(", ")
    );
    files.push(("aliases", aliases));
    files
}

/// Any file is accepted or refused in time that grows with its size, not
/// faster: each shape is judged at 64 KiB and at 512 KiB, and eight times
/// the bytes may take about eight times as long (up to three times that
/// for noise), never the sixty-four times a quadratic parse takes (nested lists took 13 s per MB before the depth
/// cap). A ratio, not a time: a loaded CI machine slows both alike. In a
/// release build every shape takes under 0.3 s per MB.
#[test]
fn hostile_files_are_judged_in_bounded_time() {
    let judge = |src: &str| {
        let started = std::time::Instant::now();
        let result = Config::from_yaml(src);
        let took = started.elapsed();
        let listed = match &result {
            Ok(_) => 0,
            Err(ConfigError::Invalid(p)) => p.len(),
            Err(e) => panic!("{e}"),
        };
        (took, listed)
    };
    let small = hostile_files(64 << 10);
    let big = hostile_files(512 << 10);
    for ((what, small), (_, big)) in small.iter().zip(&big) {
        // The faster of two runs of each: noise only slows.
        let (t1, _) = judge(small);
        let (t2, _) = judge(small);
        let t_small = t1.min(t2);
        let (t3, listed) = judge(big);
        let (t4, _) = judge(big);
        let t_big = t3.min(t4);
        let ratio = t_big.as_secs_f64() / t_small.as_secs_f64().max(0.02);
        println!(
            "{what}: 64 KiB in {t_small:?}, 512 KiB in {t_big:?} (x{ratio:.1}), {listed} problems listed"
        );
        assert!(listed <= sluice::config::MAX_PROBLEMS + 1, "{what}");
        assert!(
            ratio < 24.0,
            "{what}: grows faster than its size: x{ratio:.1}"
        );
        // A hang is a failure whatever the load.
        assert!(t_big.as_secs() < 60, "{what}: {t_big:?}");
    }
}
