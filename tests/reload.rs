//! Hot reload: SIGHUP and `POST /api/v1/reload` under load, with
//! connections held open across every reload, and invalid files that must
//! change nothing.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::time::{SystemTime, UNIX_EPOCH};

use common::*;
use nix::sys::signal::Signal;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// One configuration of the reload sequence.
struct Shape<'a> {
    backends: &'a [(SocketAddr, u32)],
    interval_ms: u64,
    extra: Option<u16>,
}

fn config(port: u16, shape: &Shape<'_>) -> String {
    let mut listeners = format!("  front: {{ bind: 127.0.0.1:{port}, pool: app }}\n");
    if let Some(extra) = shape.extra {
        listeners += &format!("  extra: {{ bind: 127.0.0.1:{extra}, pool: app }}\n");
    }
    let backends: String = shape
        .backends
        .iter()
        .map(|(a, w)| format!("      - {{ address: '{a}', weight: {w} }}\n"))
        .collect();
    format!(
        "admin: {{ bind: '{{admin}}' }}\n\
         listeners:\n{listeners}\
         pools:\n  app:\n    algorithm: round_robin\n    \
         health_check: {{ interval: {}ms, timeout: 100ms, rise: 1, fall: 2 }}\n    \
         backends:\n{backends}",
        shape.interval_ms
    )
}

/// One echo round trip of `len` bytes patterned by `seed`; the bytes that
/// came back must be the bytes sent.
async fn round_trip(c: &mut TcpStream, seed: usize, len: usize) {
    let sent: Vec<u8> = (0..len).map(|i| (i * 31 + seed * 7) as u8).collect();
    c.write_all(&sent).await.unwrap();
    let mut back = vec![0u8; len];
    tokio::time::timeout(DEADLINE, c.read_exact(&mut back))
        .await
        .expect("echo within the deadline")
        .expect("the held connection still works");
    assert_eq!(back, sent, "bytes of round {seed}");
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_reloads_under_load_drop_nothing() {
    let a = Backend::start("a", Behavior::Echo).await;
    let b = Backend::start("b", Behavior::Echo).await;
    let c = Backend::start("c", Behavior::Echo).await;
    let (port, extra) = (reserve_port(), reserve_port());
    // Backends added, removed and re-weighted; health settings changed; a
    // listener added and removed.
    let shapes = [
        Shape {
            backends: &[(a.addr, 1), (b.addr, 1)],
            interval_ms: 200,
            extra: None,
        },
        Shape {
            backends: &[(a.addr, 1), (b.addr, 1), (c.addr, 1)],
            interval_ms: 200,
            extra: Some(extra),
        },
        Shape {
            backends: &[(a.addr, 3), (b.addr, 1), (c.addr, 2)],
            interval_ms: 300,
            extra: Some(extra),
        },
        Shape {
            backends: &[(b.addr, 1), (c.addr, 1)],
            interval_ms: 300,
            extra: None,
        },
        Shape {
            backends: &[(a.addr, 2), (c.addr, 1)],
            interval_ms: 200,
            extra: None,
        },
    ];
    let sluice = Sluice::start(&config(port, &shapes[0])).await;
    let started = now();

    // Held connections, spread over a and b by round robin.
    let mut held = Vec::new();
    for i in 0..12 {
        let mut conn = TcpStream::connect(addr(port)).await.unwrap();
        round_trip(&mut conn, i, 1000).await;
        held.push(conn);
    }
    let load = Load::start(addr(port), 4, 100_000, Exchange::Echo);

    let mut previous = &shapes[0];
    for round in 1..=20 {
        let shape = &shapes[round % shapes.len()];
        // Everything checked in before the reload, so "kept its state" means up.
        for (backend, _) in previous.backends {
            wait_until("backend up before the reload", || async {
                sluice.backend_state("app", *backend).await == "up"
            })
            .await;
        }
        sluice.rewrite_config(&config(port, shape));
        if round % 2 == 0 {
            let (status, body) = sluice.reload().await;
            assert_eq!(status, 200, "reload {round}: {body}");
            assert_eq!(body["result"], "success");
        } else {
            sluice.signal(Signal::SIGHUP);
            wait_until(&format!("SIGHUP reload {round} counted"), || async {
                sluice
                    .metrics()
                    .await
                    .value("sluice_config_reloads_total", &[("result", "success")])
                    == round as f64
            })
            .await;
        }
        // Backends kept from the previous configuration keep their state.
        for (kept, _) in shape
            .backends
            .iter()
            .filter(|(a, _)| previous.backends.iter().any(|(p, _)| p == a))
        {
            assert_eq!(
                sluice.backend_state("app", *kept).await,
                "up",
                "reload {round}: {kept} kept its health"
            );
        }
        // Every held connection still carries the right bytes, including
        // those to a backend the pool no longer lists.
        for (i, conn) in held.iter_mut().enumerate() {
            round_trip(conn, round * 100 + i, 4096).await;
        }
        match (previous.extra, shape.extra) {
            (_, Some(p)) => {
                let mut conn = TcpStream::connect(addr(p)).await.unwrap();
                round_trip(&mut conn, round, 512).await;
            }
            (Some(p), None) => {
                wait_until("removed listener closed", || async move {
                    TcpStream::connect(addr(p)).await.is_err()
                })
                .await;
            }
            (None, None) => {}
        }
        previous = shape;
    }
    let (ok, failed, errors) = load.finish().await;
    for (i, mut conn) in held.into_iter().enumerate() {
        round_trip(&mut conn, 9000 + i, 100).await;
        conn.shutdown().await.unwrap();
        let mut rest = Vec::new();
        conn.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty(), "held connection {i} ends cleanly");
    }
    println!(
        "20 reloads under load: {ok} connections served, {failed} failed, 12 held connections intact"
    );
    assert_eq!(failed, 0, "client failures across reloads: {errors:?}");
    assert!(ok > 100, "load was applied: {ok}");

    // The pool now has the last shape's backends and weights.
    let pools = sluice.pools().await;
    let listed: Vec<(String, u64)> = pools["pools"]["app"]["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            (
                b["address"].as_str().unwrap().to_string(),
                b["weight"].as_u64().unwrap(),
            )
        })
        .collect();
    let want: Vec<(String, u64)> = previous
        .backends
        .iter()
        .map(|(a, w)| (a.to_string(), u64::from(*w)))
        .collect();
    assert_eq!(listed, want);
    let m = sluice.metrics().await;
    assert_eq!(
        m.value("sluice_config_reloads_total", &[("result", "success")]),
        20.0
    );
    assert_eq!(
        m.value("sluice_config_reloads_total", &[("result", "failure")]),
        0.0
    );
    assert!(m.value("sluice_config_last_reload_success_timestamp_seconds", &[]) >= started);
    // Series of a removed listener are gone; no client was refused.
    assert!(
        m.get(
            "sluice_listener_connections_total",
            &[("listener", "extra")]
        )
        .is_none()
    );
    assert_eq!(
        m.value(
            "sluice_listener_rejected_total",
            &[("listener", "front"), ("reason", "no_backend")]
        ),
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_file_changes_nothing() {
    let a = Backend::start("a", Behavior::Name).await;
    let port = reserve_port();
    let good = front_to_app(port, "", &format!("backends: ['{}']", a.addr));
    let sluice = Sluice::start(&good).await;

    // Two problems at once: both are reported, with their paths.
    sluice.rewrite_config(&good.replace("pool: app", "pool: nope").replace(
        &format!("backends: ['{}']", a.addr),
        &format!("backends: [{{ address: '{}', weight: 0 }}]", a.addr),
    ));
    let (status, body) = sluice.reload().await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["result"], "failure");
    let problems: Vec<&str> = body["problems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    assert!(
        problems.iter().any(|p| p.contains("listeners.front.pool")),
        "{problems:?}"
    );
    assert!(
        problems
            .iter()
            .any(|p| p.contains("pools.app.backends[0].weight")),
        "{problems:?}"
    );

    // The same file by SIGHUP: logged, counted, not applied.
    sluice.signal(Signal::SIGHUP);
    wait_until("second failure counted", || async {
        sluice
            .metrics()
            .await
            .value("sluice_config_reloads_total", &[("result", "failure")])
            == 2.0
    })
    .await;
    sluice
        .wait_log("the running configuration stays in force")
        .await;
    sluice.wait_log("pools.app.backends[0].weight").await;

    // A new listener on a port something else holds: the whole reload is refused.
    let squatter = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = squatter.local_addr().unwrap();
    sluice.rewrite_config(&good.replace(
        "listeners: {",
        &format!("listeners: {{ taken: {{ bind: '{taken}', pool: app }}, "),
    ));
    let (status, body) = sluice.reload().await;
    assert_eq!(status, 422, "{body}");
    assert!(
        body["problems"][0]
            .as_str()
            .unwrap()
            .contains(&taken.to_string()),
        "{body}"
    );

    // A file that is gone.
    std::fs::remove_file(&sluice.config_path).unwrap();
    let (status, body) = sluice.reload().await;
    assert_eq!(status, 422, "{body}");

    // Through all of it the old configuration kept serving.
    assert_eq!(read_all(addr(port)).await, "a\n");
    assert_eq!(
        sluice.active_backends("app").await,
        vec![a.addr.to_string()]
    );
    let m = sluice.metrics().await;
    assert_eq!(
        m.value("sluice_config_reloads_total", &[("result", "failure")]),
        4.0
    );
    assert_eq!(
        m.value("sluice_config_reloads_total", &[("result", "success")]),
        0.0
    );

    // And a good file is taken again.
    sluice.rewrite_config(&good);
    let (status, body) = sluice.reload().await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_that_need_a_restart_are_reported_not_applied() {
    let a = Backend::start("a", Behavior::Name).await;
    let port = reserve_port();
    let good = front_to_app(port, "", &format!("backends: ['{}']", a.addr));
    let sluice = Sluice::start(&good).await;
    // Move the admin listener: a restart would; a reload must not.
    let moved = reserve_port();
    sluice.rewrite_config(&good.replace("{admin}", &format!("127.0.0.1:{moved}")));
    let (status, body) = sluice.reload().await;
    assert_eq!(status, 200, "{body}");
    assert!(
        body["summary"]
            .as_str()
            .unwrap()
            .contains("not applied until a restart: admin"),
        "{body}"
    );
    sluice.wait_log("need a restart").await;
    assert!(
        http_get(sluice.admin, "/healthz").await.is_ok(),
        "the admin listener stays where it was"
    );
    assert!(
        TcpStream::connect(addr(moved)).await.is_err(),
        "nothing listens on the new admin address"
    );
    assert_eq!(read_all(addr(port)).await, "a\n");
}

/// A removed backend's open connection runs to its end; new connections no
/// longer reach it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_backend_gets_no_new_connections() {
    let a = Backend::start("a", Behavior::Echo).await;
    let b = Backend::start("b", Behavior::Echo).await;
    let port = reserve_port();
    let both = Shape {
        backends: &[(a.addr, 1), (b.addr, 1)],
        interval_ms: 200,
        extra: None,
    };
    let only_b = Shape {
        backends: &[(b.addr, 1)],
        interval_ms: 200,
        extra: None,
    };
    let sluice = Sluice::start(&config(port, &both)).await;
    // Round robin: one held connection on each backend, so one is on `a`.
    let mut held = Vec::new();
    for i in 0..2 {
        let mut c = TcpStream::connect(addr(port)).await.unwrap();
        round_trip(&mut c, i, 100).await;
        held.push(c);
    }
    let active_on = |m: &Scrape, b: SocketAddr| {
        m.value(
            "sluice_backend_connections_active",
            &[("pool", "app"), ("backend", &b.to_string())],
        )
    };
    let m = sluice.metrics().await;
    assert_eq!((active_on(&m, a.addr), active_on(&m, b.addr)), (1.0, 1.0));
    sluice.rewrite_config(&config(port, &only_b));
    assert_eq!(sluice.reload().await.0, 200);
    let b_label = b.addr.to_string();
    let to_b = |m: &Scrape| {
        m.value(
            "sluice_backend_connections_total",
            &[("pool", "app"), ("backend", &b_label)],
        )
    };
    let before = to_b(&sluice.metrics().await);
    for i in 0..10 {
        let mut c = TcpStream::connect(addr(port)).await.unwrap();
        round_trip(&mut c, i, 100).await;
    }
    for (i, c) in held.iter_mut().enumerate() {
        // The one on the removed backend too: it runs to its end.
        round_trip(c, 20 + i, 100).await;
    }
    let m = sluice.metrics().await;
    assert_eq!(to_b(&m), before + 10.0, "every new connection went to b");
    let a_label = a.addr.to_string();
    assert!(
        m.get(
            "sluice_backend_up",
            &[("pool", "app"), ("backend", &a_label)]
        )
        .is_none()
    );
    assert_eq!(
        sluice.active_backends("app").await,
        vec![b.addr.to_string()]
    );
}

/// Issue 13, item 4: a reload during the first health-check round that
/// removes the pool still checking (and its listener) leaves sluice ready,
/// with the removed listener never opened.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_during_the_first_round_can_remove_the_pool_it_waits_for() {
    let a = Backend::start("a", Behavior::Name).await;
    let hole = Blackhole::new();
    let (fast, slow) = (reserve_port(), reserve_port());
    let only_fast = format!(
        "admin: {{ bind: '{{admin}}' }}\n\
         listeners:\n  fast: {{ bind: 127.0.0.1:{fast}, pool: app }}\n\
         pools:\n  app:\n    backends: ['{}']\n",
        a.addr
    );
    // The first round of `stuck` lasts its 8 s check timeout.
    let both = format!(
        "{only_fast}  stuck:\n    health_check: {{ interval: 9s, timeout: 8s }}\n    backends: ['{}']\n",
        hole.addr
    )
    .replace(
        "pool: app }\n",
        &format!("pool: app }}\n  slow: {{ bind: 127.0.0.1:{slow}, pool: stuck }}\n"),
    );
    let sluice = Sluice::spawn(&both);
    wait_until("the admin answers", || async {
        http_get(sluice.admin, "/healthz").await.is_ok()
    })
    .await;
    let (status, why) = http_get(sluice.admin, "/readyz").await.unwrap();
    assert_eq!(status, 503, "still in the first round: {why}");
    sluice.rewrite_config(&only_fast);
    let (status, body) = sluice.reload().await;
    assert_eq!(status, 200, "{body}");
    wait_until("ready without the removed pool", || async {
        matches!(http_get(sluice.admin, "/readyz").await, Ok((200, _)))
    })
    .await;
    assert_eq!(read_all(addr(fast)).await, "a\n");
    assert!(
        TcpStream::connect(addr(slow)).await.is_err(),
        "the listener removed before it opened never opens"
    );
}

/// Issue 13, item 7: a listener a reload moves to a new pool stays on its
/// old pool until the new one has finished its first round: no client is
/// refused in between.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_moved_to_a_new_pool_refuses_nobody_meanwhile() {
    let old = Backend::start("old", Behavior::Name).await;
    let new = Backend::start("new", Behavior::Name).await;
    let hole = Blackhole::new();
    let port = reserve_port();
    let before = front_to_app(port, "", &format!("backends: ['{}']", old.addr));
    // The new pool's first round takes its 3 s check timeout (the
    // blackholed member), during which it has no verdict on anyone.
    let after = format!(
        "admin: {{ bind: '{{admin}}' }}\n\
         listeners: {{ front: {{ bind: 127.0.0.1:{port}, pool: next }} }}\n\
         pools:\n  next:\n    health_check: {{ interval: 4s, timeout: 3s }}\n    backends: ['{}', '{}']\n",
        new.addr, hole.addr
    );
    let sluice = Sluice::start(&before).await;
    let load = Load::start(addr(port), 2, 100_000, Exchange::Name);
    wait_until("traffic flows", || async { load.ok() > 20 }).await;
    sluice.rewrite_config(&after);
    let (status, body) = sluice.reload().await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(read_all(addr(port)).await, "old\n", "still the old pool");
    wait_until("the new pool takes over", || async {
        read_all(addr(port)).await == "new\n"
    })
    .await;
    let (ok, failed, errors) = load.finish().await;
    assert_eq!(failed, 0, "{ok} ok, {failed} failed: {errors:?}");
    let m = sluice.metrics().await;
    assert_eq!(
        m.value(
            "sluice_listener_rejected_total",
            &[("listener", "front"), ("reason", "no_backend")]
        ),
        0.0
    );
    sluice
        .wait_log("listener front now forwards to pool next")
        .await;
}

/// Issue 13, item 5: a reload either applies completely or not at all. A
/// dual-stack overlap (`[::]:P` and `0.0.0.0:P`, one socket each way with
/// `bindv6only=0`) is refused, and no socket is left half-added.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_whose_binds_cannot_all_succeed_changes_nothing() {
    let a = Backend::start("a", Behavior::Name).await;
    let (port, p) = (reserve_port(), reserve_port());
    let before = front_to_app(port, "", &format!("backends: ['{}']", a.addr));
    let sluice = Sluice::start(&before).await;
    let after = before.replace(
        "listeners: {",
        &format!("listeners: {{ dual: {{ bind: ['[::]:{p}', '0.0.0.0:{p}'], pool: app }},"),
    );
    sluice.rewrite_config(&after);
    let (status, body) = sluice.reload().await;
    assert_eq!(status, 422, "{body}");
    assert!(
        body["problems"].to_string().contains(&p.to_string()),
        "the problem names the address: {body}"
    );
    assert!(
        TcpStream::connect(addr(p)).await.is_err(),
        "no socket half-added on 127.0.0.1:{p}"
    );
    assert!(
        TcpStream::connect(("::1", p)).await.is_err(),
        "no socket half-added on [::1]:{p}"
    );
    assert_eq!(
        read_all(addr(port)).await,
        "a\n",
        "the old configuration serves on"
    );
}
