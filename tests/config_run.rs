//! The property that `-t` promises: every configuration it accepts can be
//! started, reloaded to and shut down from, without a panic, by the real
//! binary. Durations are drawn at the edges of what each key allows and past
//! them (where `-t` must refuse), numbers at their limits, and the documents
//! are written in block or flow style, with or without a byte order mark,
//! sharing settings through anchors and merge keys.
//!
//! Each case that `-t` accepts costs a start, a reload and a shutdown (about
//! a second), so the case count is small; the edges are drawn often.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::*;
use nix::sys::signal::Signal;
use proptest::prelude::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A duration key's range as humantime text, and its maximum in ms.
struct Range {
    min: &'static str,
    max: &'static str,
    max_ms: u64,
}

const GRACE: Range = Range {
    min: "0s",
    max: "1h",
    max_ms: 3_600_000,
};
const SHUTDOWN: Range = Range {
    min: "0s",
    max: "24h",
    max_ms: 86_400_000,
};
const IDLE: Range = Range {
    min: "1ms",
    max: "24h",
    max_ms: 86_400_000,
};
const CONNECT: Range = Range {
    min: "1ms",
    max: "5m",
    max_ms: 300_000,
};
const INTERVAL: Range = Range {
    min: "10ms",
    max: "1h",
    max_ms: 3_600_000,
};
const CHECK_TIMEOUT: Range = Range {
    min: "1ms",
    max: "5m",
    max_ms: 300_000,
};

/// A value for a key with `range`: its limits and what lies between them,
/// and now and then something past its maximum.
fn duration(range: &'static Range) -> BoxedStrategy<String> {
    prop_oneof![
        3 => Just(range.min.to_string()),
        3 => Just(range.max.to_string()),
        2 => (1..=range.max_ms).prop_map(|ms| format!("{ms}ms")),
        2 => prop::sample::select(vec![
            format!("{} 1ns", range.max),
            "18446744073709551615s".to_string(),
            "300000000000y".to_string(),
            "584542046091y".to_string(),
        ]),
    ]
    .boxed()
}

/// Everything a generated configuration varies.
#[derive(Clone, Debug)]
struct Case {
    threads: u32,
    grace: String,
    shutdown: String,
    idle: Option<String>,
    max_connections: u64,
    splice: bool,
    connect_timeout: String,
    connect_attempts: u32,
    interval: String,
    timeout: String,
    rise: u32,
    fall: u32,
    weight: u32,
    flow_style: bool,
    bom: bool,
}

fn case() -> impl Strategy<Value = Case> {
    (
        (
            prop::sample::select(vec![1u32, 2, 64]),
            duration(&GRACE),
            duration(&SHUTDOWN),
            proptest::option::of(duration(&IDLE)),
            prop::sample::select(vec![1u64, 2, 10_000_000]),
            any::<bool>(),
        ),
        (
            duration(&CONNECT),
            prop::sample::select(vec![1u32, 3, 100]),
            duration(&INTERVAL),
            duration(&CHECK_TIMEOUT),
            prop::sample::select(vec![1u32, 100]),
            prop::sample::select(vec![1u32, 100]),
            prop::sample::select(vec![1u32, 256]),
        ),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(
            |(
                (threads, grace, shutdown, idle, max_connections, splice),
                (connect_timeout, connect_attempts, interval, mut timeout, rise, fall, weight),
                flow_style,
                bom,
            )| {
                // A check timeout longer than the interval is refused; keep
                // most cases runnable by clipping a valid one to the interval.
                let (t, i) = (duration_of(&timeout), duration_of(&interval));
                if t > i && t <= Duration::from_secs(300) {
                    timeout = interval.clone();
                }
                Case {
                    threads,
                    grace,
                    shutdown,
                    idle,
                    max_connections,
                    splice,
                    connect_timeout,
                    connect_attempts,
                    interval,
                    timeout,
                    rise,
                    fall,
                    weight,
                    flow_style,
                    bom,
                }
            },
        )
}

/// `case` as a configuration file for a listener on `port` in front of
/// `backends`; the admin address is left as `{admin}`.
fn render(case: &Case, port: u16, backends: &[SocketAddr]) -> String {
    let idle = case
        .idle
        .as_ref()
        .map(|d| format!(", idle_timeout: '{d}'"))
        .unwrap_or_default();
    let backends: Vec<String> = backends
        .iter()
        .map(|b| format!("{{ address: '{b}', weight: {} }}", case.weight))
        .collect();
    // The check settings are shared through an anchor and a merge key.
    let check = format!(
        "{{ interval: '{}', timeout: '{}', rise: {}, fall: {} }}",
        case.interval, case.timeout, case.rise, case.fall
    );
    let body = if case.flow_style {
        format!(
            "{{ server: {{ threads: {}, grace_period: '{}', shutdown_timeout: '{}' }}, \
             admin: {{ bind: '{{admin}}' }}, \
             listeners: {{ front: {{ bind: '127.0.0.1:{port}', pool: app, max_connections: {}, splice: {}{idle} }} }}, \
             pools: {{ app: {{ connect_timeout: '{}', connect_attempts: {}, health_check: &check {check}, backends: [{}] }}, \
             spare: {{ health_check: {{ <<: *check, passive: false }}, backends: ['127.0.0.1:1'] }} }} }}\n",
            case.threads,
            case.grace,
            case.shutdown,
            case.max_connections,
            case.splice,
            case.connect_timeout,
            case.connect_attempts,
            backends.join(", ")
        )
    } else {
        format!(
            "server:\n  threads: {}\n  grace_period: '{}'\n  shutdown_timeout: '{}'\n\
             admin:\n  bind: '{{admin}}'\n\
             listeners:\n  front:\n    bind: ['127.0.0.1:{port}']\n    pool: app\n    max_connections: {}\n    splice: {}\n{}\
             pools:\n  app:\n    connect_timeout: '{}'\n    connect_attempts: {}\n    health_check: &check {check}\n    backends:\n{}\
             \x20 spare:\n    health_check:\n      <<: *check\n      passive: false\n    backends:\n      - 127.0.0.1:1\n",
            case.threads,
            case.grace,
            case.shutdown,
            case.max_connections,
            case.splice,
            case.idle
                .as_ref()
                .map(|d| format!("    idle_timeout: '{d}'\n"))
                .unwrap_or_default(),
            case.connect_timeout,
            case.connect_attempts,
            backends
                .iter()
                .map(|b| format!("      - {b}\n"))
                .collect::<String>()
        )
    };
    if case.bom {
        format!("\u{feff}{body}")
    } else {
        body
    }
}

/// Whether `sluice -t` accepts `file`.
fn accepted(file: &Path) -> bool {
    let out = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .arg("-t")
        .arg("-c")
        .arg(file)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "-t panicked: {stderr}");
    match out.status.code() {
        Some(0) => true,
        Some(1) => false,
        other => panic!("-t exited with {other:?}: {stderr}"),
    }
}

fn duration_of(text: &str) -> Duration {
    humantime::parse_duration(text).unwrap_or(Duration::MAX)
}

/// Whether clients can be served with these settings on a busy machine:
/// a check timeout of 1 ms may mark a working backend down.
fn comfortable(case: &Case) -> bool {
    let at_least = |t: &str| duration_of(t) >= Duration::from_millis(200);
    at_least(&case.timeout)
        && at_least(&case.connect_timeout)
        && case.idle.as_deref().is_none_or(at_least)
}

async fn echo_through(port: u16) -> bool {
    let attempt = async {
        let mut c = TcpStream::connect(("127.0.0.1", port)).await?;
        c.write_all(b"ping").await?;
        let mut back = [0u8; 4];
        c.read_exact(&mut back).await?;
        Ok::<_, std::io::Error>(&back == b"ping")
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(2), attempt).await,
        Ok(Ok(true))
    )
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
    })
}

/// Cases that got as far as a start, of all cases tried.
static STARTED: AtomicUsize = AtomicUsize::new(0);
static TRIED: AtomicUsize = AtomicUsize::new(0);

/// Start with `first` if `-t` accepts it, reload to `second`, shut down.
async fn run(first: Case, second: Case) {
    TRIED.fetch_add(1, Ordering::Relaxed);
    let echo = Backend::start("echo", Behavior::Echo).await;
    let port = reserve_port();
    let dir = tempfile::tempdir().unwrap();
    let probe = dir.path().join("probe.yaml");
    // `-t` judges the file as it will run (any free admin port will do).
    let admin_for_probe = format!("127.0.0.1:{}", reserve_port());
    std::fs::write(
        &probe,
        render(&first, port, &[echo.addr]).replace("{admin}", &admin_for_probe),
    )
    .unwrap();
    if !accepted(&probe) {
        return;
    }
    STARTED.fetch_add(1, Ordering::Relaxed);
    let sluice = Sluice::spawn(&render(&first, port, &[echo.addr]));
    sluice.wait_ready().await;
    if comfortable(&first) {
        wait_until("a client served", || echo_through(port)).await;
    }

    // Reload: what `-t` accepts applies, what it refuses leaves things running.
    // The reloaded pool gains a backend: until clients are sent again below,
    // only health checks reach it.
    let added = Backend::start("added", Behavior::Echo).await;
    sluice.rewrite_config(&render(&second, port, &[echo.addr, added.addr]));
    let second_ok = accepted(&sluice.config_path);
    let (status, body) = sluice.reload().await;
    assert_eq!(status == 200, second_ok, "reload answered {status}: {body}");
    // The next round, due within the old interval, checks the new backend:
    // health checking survived the new settings.
    if second_ok && duration_of(&first.interval) <= Duration::from_secs(1) {
        wait_until("a health check of the added backend", || async {
            added.accepted.load(Ordering::Relaxed) > 0
        })
        .await;
    }
    sluice.wait_ready().await;
    let running = if second_ok { &second } else { &first };
    if comfortable(running) {
        wait_until("a client served after the reload", || echo_through(port)).await;
    }
    assert!(
        !sluice.log().contains("panicked"),
        "a panic while running:\n{}",
        sluice.log()
    );

    // Shut down: SIGTERM; a long grace period is cut short with SIGINT.
    sluice.signal(Signal::SIGTERM);
    wait_until("unready after SIGTERM", || async {
        !matches!(http_get(sluice.admin, "/readyz").await, Ok((200, _)))
    })
    .await;
    if duration_of(&first.grace) > Duration::from_secs(2) {
        sluice.signal(Signal::SIGINT);
    }
    let status = sluice.wait_exit(Duration::from_secs(20)).await;
    assert_eq!(status.code(), Some(0), "{status}; log:\n{}", sluice.log());
    assert!(
        !sluice.log().contains("panicked"),
        "a panic on the way out:\n{}",
        sluice.log()
    );
}

/// The limits of every key at once, both ways, then generated cases.
#[test]
fn every_configuration_that_t_accepts_starts_reloads_and_stops() {
    let edge = |max: bool| {
        let pick = |r: &Range| if max { r.max } else { r.min }.to_string();
        Case {
            threads: if max { 64 } else { 1 },
            grace: pick(&GRACE),
            shutdown: pick(&SHUTDOWN),
            idle: Some(pick(&IDLE)),
            max_connections: if max { 10_000_000 } else { 1 },
            splice: max,
            connect_timeout: pick(&CONNECT),
            connect_attempts: if max { 100 } else { 1 },
            interval: pick(&INTERVAL),
            timeout: pick(&CHECK_TIMEOUT),
            rise: if max { 100 } else { 1 },
            fall: if max { 100 } else { 1 },
            weight: if max { 256 } else { 1 },
            flow_style: max,
            bom: max,
        }
    };
    runtime().block_on(run(edge(false), edge(true)));
    runtime().block_on(run(edge(true), edge(false)));
    assert_eq!(STARTED.load(Ordering::Relaxed), 2, "both edges start");
    // Values that passed `-t` and then panicked: at start, in the drain
    // thread on SIGTERM, and in the health thread after a reload.
    let with = |f: fn(&mut Case)| {
        let mut c = edge(false);
        c.idle = None;
        f(&mut c);
        c
    };
    runtime().block_on(run(
        with(|c| c.shutdown = "18446744073709551615s".into()),
        edge(false),
    ));
    runtime().block_on(run(
        with(|c| c.shutdown = "300000000000y".into()),
        edge(false),
    ));
    runtime().block_on(run(
        edge(false),
        with(|c| c.interval = "300000000000y".into()),
    ));

    let config = ProptestConfig {
        cases: 48,
        failure_persistence: None,
        // Each run is a process start; shrinking stays short.
        max_shrink_iters: 20,
        ..ProptestConfig::default()
    };
    proptest!(config, |(first in case(), second in case())| {
        runtime().block_on(run(first, second));
    });
    let (started, tried) = (
        STARTED.load(Ordering::Relaxed),
        TRIED.load(Ordering::Relaxed),
    );
    println!("{started} of {tried} configurations were accepted and run");
    assert!(started >= 4, "too few cases ran: {started} of {tried}");
}
