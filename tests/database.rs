//! The database tier against real servers: MariaDB primary + GTID replica,
//! Redis primary + replica, PostgreSQL primary + streaming standby. Writes
//! must reach the current primary, reads the replicas; promotions are
//! followed without a restart; split brain keeps the earlier primary; bad
//! credentials and wrong protocols make a backend down with a clear reason.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod common;
mod servers;

use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use servers::*;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// Check timing for every test here: a promotion is followed within
/// rise x interval after the nodes changed.
const INTERVAL_MS: u64 = 250;
const RISE: u64 = 2;

/// Two listeners, `write` (role primary, active_passive) and `read` (role
/// replica), over `backends`, with `check` as the health check's kind-specific
/// keys.
fn tier(write: u16, read: u16, check: &str, backends: &[SocketAddr], fallback: bool) -> String {
    let list: Vec<String> = backends.iter().map(|a| format!("'{a}'")).collect();
    let list = list.join(", ");
    format!(
        "admin: {{ bind: '{{admin}}' }}\n\
         listeners:\n  write: {{ bind: 127.0.0.1:{write}, pool: primary }}\n  read: {{ bind: 127.0.0.1:{read}, pool: replicas }}\n\
         pools:\n  \
           primary:\n    mode: active_passive\n    role: primary\n    \
             health_check: &check {{ {check}, interval: {INTERVAL_MS}ms, timeout: {INTERVAL_MS}ms, rise: {RISE}, fall: 2 }}\n    \
             backends: [{list}]\n  \
           replicas:\n    role: replica\n    fallback_to_primary: {fallback}\n    health_check: *check\n    backends: [{list}]\n"
    )
}

/// A file holding `password`, for `password_file`.
fn password_file(dir: &tempfile::TempDir, password: &str) -> String {
    let path = dir.path().join("password");
    std::fs::write(&path, format!("{password}\n")).unwrap();
    path.display().to_string()
}

/// Wait until `pool` routes to exactly `backend`; returns how long it took.
async fn wait_routed(sluice: &Sluice, pool: &str, backend: SocketAddr) -> Duration {
    let start = Instant::now();
    sluice.wait_active(pool, &[backend]).await;
    start.elapsed()
}

/// Hold a connection through `listener` that has received at least a byte
/// (a database greeting), and return it.
async fn hold_greeted(listener: SocketAddr) -> TcpStream {
    let mut c = TcpStream::connect(listener).await.unwrap();
    let mut first = [0u8; 1];
    tokio::time::timeout(DEADLINE, c.read_exact(&mut first))
        .await
        .unwrap()
        .unwrap();
    c
}

/// Wait until sluice closes `c` (EOF or reset).
async fn wait_closed(c: &mut TcpStream) {
    let closed = tokio::time::timeout(DEADLINE, async {
        let mut buf = [0u8; 4096];
        loop {
            match c.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "the connection to the old primary was closed"
    );
}

fn metric(m: &Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    m.value(name, labels)
}

/// sluice in front of a `primary` and a `replica` database, checked with
/// `kind` as the monitoring user, ready and routing: the write and read
/// listener addresses.
struct Tier {
    sluice: Sluice,
    write: SocketAddr,
    read: SocketAddr,
    _secrets: tempfile::TempDir,
}

async fn start_tier(kind: &str, primary: SocketAddr, replica: SocketAddr) -> Tier {
    let dir = tempfile::tempdir().unwrap();
    let check = format!(
        "kind: {kind}, user: {MONITOR_USER}, password_file: '{}'",
        password_file(&dir, MONITOR_PASSWORD)
    );
    let (w, r) = (reserve_port(), reserve_port());
    let sluice = Sluice::start(&tier(w, r, &check, &[primary, replica], false)).await;
    sluice.wait_active("primary", &[primary]).await;
    sluice.wait_active("replicas", &[replica]).await;
    Tier {
        sluice,
        write: addr(w),
        read: addr(r),
        _secrets: dir,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mariadb_writes_follow_the_primary_and_reads_go_to_the_replica() {
    let db1 = Mariadb::primary();
    let db2 = Mariadb::replica_of(&db1);
    let Tier {
        sluice,
        write,
        read,
        ..
    } = &start_tier("mysql", db1.addr, db2.addr).await;
    let (w, r) = (write.port(), read.port());
    let m = sluice.metrics().await;
    let (b1, b2) = (db1.addr.to_string(), db2.addr.to_string());
    assert_eq!(
        metric(
            &m,
            "sluice_backend_role",
            &[("pool", "primary"), ("backend", &b1), ("role", "primary")]
        ),
        1.0
    );
    assert_eq!(
        metric(
            &m,
            "sluice_backend_role",
            &[("pool", "primary"), ("backend", &b2), ("role", "replica")]
        ),
        1.0
    );

    // An INSERT through the write listener lands on the primary; a SELECT
    // through the read listener is served by the replica and sees it.
    let written = mariadb_query(
        addr(w),
        APP_USER,
        APP_PASSWORD,
        "INSERT INTO shop.items (name) VALUES ('via-sluice'); SELECT @@server_id",
    )
    .unwrap();
    assert_eq!(written, "1");
    wait_until(
        "the insert replicated and is read through the read listener",
        || async {
            mariadb_query(
                addr(r),
                APP_USER,
                APP_PASSWORD,
                "SELECT @@server_id, COUNT(*) FROM shop.items WHERE name = 'via-sluice'",
            )
            .is_ok_and(|out| out == "2\t1")
        },
    )
    .await;
    // The replica refuses writes: the read listener is read-only in effect.
    assert!(
        mariadb_query(
            addr(r),
            APP_USER,
            APP_PASSWORD,
            "INSERT INTO shop.items (name) VALUES ('nope')"
        )
        .is_err()
    );

    // A client on the primary, to be closed when it steps down.
    let mut held = hold_greeted(addr(w)).await;

    // Promote: stop replication on the replica, make it writable, make the
    // old primary read-only.
    db2.promote();
    db1.demote();
    let took = wait_routed(sluice, "primary", db2.addr).await;
    println!(
        "mariadb: write listener followed the promotion in {took:?} (rise {RISE} x interval {INTERVAL_MS} ms)"
    );
    assert!(
        took < Duration::from_millis((RISE + 2) * INTERVAL_MS + 1000),
        "followed within about rise x interval: {took:?}"
    );
    wait_closed(&mut held).await;
    sluice.wait_active("replicas", &[db1.addr]).await;

    // Every write through sluice now lands on the new primary; none reaches
    // the read-only node.
    for i in 0..10 {
        let out = mariadb_query(
            addr(w),
            APP_USER,
            APP_PASSWORD,
            &format!("INSERT INTO shop.items (name) VALUES ('after-{i}'); SELECT @@server_id"),
        )
        .unwrap();
        assert_eq!(out, "2");
    }
    assert_eq!(
        db1.sql("SELECT COUNT(*) FROM shop.items WHERE name LIKE 'after-%'")
            .unwrap(),
        "0"
    );
    assert_eq!(
        metric(
            &sluice.metrics().await,
            "sluice_pool_conflicts",
            &[("pool", "primary")]
        ),
        0.0
    );
}

/// `redis-cli` against any address (a sluice listener included).
fn redis_at(to: SocketAddr, password: &str, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &to.port().to_string(),
            "-a",
            password,
            "--no-auth-warning",
        ])
        .args(args)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

const REDIS_PASSWORD: &str = "redis-secret";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_writes_follow_the_primary_and_split_brain_keeps_the_earlier_one() {
    let r1 = Redis::start(Some(REDIS_PASSWORD));
    let r2 = Redis::replica_of(&r1, Some(REDIS_PASSWORD));
    let dir = tempfile::tempdir().unwrap();
    let check = format!(
        "kind: redis, password_file: '{}'",
        password_file(&dir, REDIS_PASSWORD)
    );
    let (w, r) = (reserve_port(), reserve_port());
    let sluice = Sluice::start(&tier(w, r, &check, &[r1.addr, r2.addr], false)).await;
    sluice.wait_active("primary", &[r1.addr]).await;
    sluice.wait_active("replicas", &[r2.addr]).await;
    let port_of =
        |listener: u16| redis_at(addr(listener), REDIS_PASSWORD, &["CONFIG", "GET", "port"]);

    assert_eq!(redis_at(addr(w), REDIS_PASSWORD, &["SET", "k", "v1"]), "OK");
    assert!(port_of(w).ends_with(&r1.addr.port().to_string()));
    wait_until("the write replicated", || async {
        redis_at(addr(r), REDIS_PASSWORD, &["GET", "k"]) == "v1"
    })
    .await;
    assert!(redis_at(addr(r), REDIS_PASSWORD, &["SET", "k", "x"]).starts_with("READONLY"));

    // Split brain: the replica is promoted while the primary still claims
    // the role. Writes stay on the earlier primary; the conflict is counted.
    r2.promote();
    sluice.wait_log("SPLIT BRAIN").await;
    wait_until("conflict gauge reads 1", || async {
        metric(
            &sluice.metrics().await,
            "sluice_pool_conflicts",
            &[("pool", "primary")],
        ) == 1.0
    })
    .await;
    assert_eq!(
        sluice.active_backends("primary").await,
        vec![r1.addr.to_string()]
    );
    for _ in 0..5 {
        assert!(
            port_of(w).ends_with(&r1.addr.port().to_string()),
            "writes stay on the earlier primary"
        );
    }
    let pools = sluice.pools().await;
    assert_eq!(pools["pools"]["primary"]["conflicts"], 1);

    // The old primary steps down (replicates from the new one): the write
    // listener follows, its open connections are closed, the conflict ends.
    let mut held = hold_greeted_redis(addr(w)).await;
    r1.replicate_from(&r2);
    let took = wait_routed(&sluice, "primary", r2.addr).await;
    println!("redis: write listener followed the promotion in {took:?}");
    wait_closed(&mut held).await;
    assert_eq!(
        metric(
            &sluice.metrics().await,
            "sluice_pool_conflicts",
            &[("pool", "primary")]
        ),
        0.0
    );
    assert_eq!(redis_at(addr(w), REDIS_PASSWORD, &["SET", "k", "v2"]), "OK");
    assert!(port_of(w).ends_with(&r2.addr.port().to_string()));
    sluice.wait_active("replicas", &[r1.addr]).await;
    wait_until("read from the new replica", || async {
        redis_at(addr(r), REDIS_PASSWORD, &["GET", "k"]) == "v2"
    })
    .await;
}

/// A connection through `listener` that a Redis server answered (PING).
async fn hold_greeted_redis(listener: SocketAddr) -> TcpStream {
    use tokio::io::AsyncWriteExt;
    let mut c = TcpStream::connect(listener).await.unwrap();
    c.write_all(b"PING\r\n").await.unwrap();
    let mut first = [0u8; 1];
    tokio::time::timeout(DEADLINE, c.read_exact(&mut first))
        .await
        .unwrap()
        .unwrap();
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_reads_fall_back_to_the_primary_when_asked() {
    let r1 = Redis::start(None);
    let r2 = Redis::replica_of(&r1, None);
    let (w, r) = (reserve_port(), reserve_port());
    let sluice = Sluice::start(&tier(w, r, "kind: redis", &[r1.addr, r2.addr], true)).await;
    sluice.wait_active("replicas", &[r2.addr]).await;
    drop(r2);
    let took = wait_routed(&sluice, "replicas", r1.addr).await;
    println!("redis: reads fell back to the primary in {took:?}");
    let pools = sluice.pools().await;
    assert_eq!(pools["pools"]["replicas"]["fallback_to_primary"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_writes_follow_a_promoted_standby() {
    let pg1 = Postgres::primary();
    let pg2 = Postgres::standby_of(&pg1);
    let Tier {
        sluice,
        write,
        read,
        ..
    } = &start_tier("postgres", pg1.addr, pg2.addr).await;
    let (w, r) = (write.port(), read.port());

    // Through the listeners, the server's own view of itself.
    let recovery_via = |listener: u16| {
        pg_query(
            addr(listener),
            MONITOR_USER,
            MONITOR_PASSWORD,
            "SELECT pg_is_in_recovery()",
        )
    };
    assert_eq!(recovery_via(w).unwrap(), "f");
    assert_eq!(recovery_via(r).unwrap(), "t");

    // Failover: the primary dies, the standby is promoted.
    drop(pg1);
    pg2.promote();
    let took = wait_routed(sluice, "primary", pg2.addr).await;
    println!("postgres: write listener followed the promotion in {took:?}");
    assert_eq!(recovery_via(w).unwrap(), "f");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_credentials_and_wrong_protocols_make_a_backend_down_with_the_reason() {
    let redis = Redis::start(Some(REDIS_PASSWORD));
    let pg = Postgres::primary();
    let http = Backend::start("web", Behavior::Name).await;
    let gone = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let dir = tempfile::tempdir().unwrap();
    let wrong = password_file(&dir, "wrong-password");
    let port = reserve_port();
    let yaml = format!(
        "admin: {{ bind: '{{admin}}' }}\n\
         listeners:\n  a: {{ bind: 127.0.0.1:{port}, pool: redis_wrong_password }}\n\
         pools:\n  \
           redis_wrong_password:\n    health_check: {{ kind: redis, password_file: '{wrong}', interval: 200ms, timeout: 200ms }}\n    backends: ['{}']\n  \
           postgres_wrong_password:\n    health_check: {{ kind: postgres, user: {MONITOR_USER}, password_file: '{wrong}', interval: 200ms, timeout: 200ms }}\n    backends: ['{}']\n  \
           mysql_on_redis:\n    health_check: {{ kind: mysql, user: monitor, interval: 200ms, timeout: 200ms }}\n    backends: ['{}']\n  \
           postgres_on_http:\n    health_check: {{ kind: postgres, user: monitor, interval: 200ms, timeout: 200ms }}\n    backends: ['{}']\n  \
           redis_down:\n    health_check: {{ kind: redis, interval: 200ms, timeout: 200ms }}\n    backends: ['{gone}']\n",
        redis.addr, pg.addr, redis.addr, http.addr
    );
    let sluice = Sluice::start(&yaml).await;
    for (pool, backend) in [
        ("redis_wrong_password", redis.addr),
        ("postgres_wrong_password", pg.addr),
        ("mysql_on_redis", redis.addr),
        ("postgres_on_http", http.addr),
        ("redis_down", gone),
    ] {
        assert_eq!(sluice.backend_state(pool, backend).await, "down", "{pool}");
    }
    let log = sluice.log();
    for reason in [
        "pool redis_wrong_password: backend",
        "redis check: authentication failed",
        "postgres check: authentication failed",
        // MySQL servers speak first; Redis waits for the client.
        "pool mysql_on_redis: backend",
        "mysql check: no answer within 200ms",
        "postgres check: not a PostgreSQL server",
        "redis check: connect failed: Connection refused",
    ] {
        assert!(
            log.contains(reason),
            "the log names the reason `{reason}`:\n{log}"
        );
    }
    assert!(!log.contains("wrong-password"), "no password in the log");
    assert!(!log.contains("panicked"));
    assert!(sluice.try_wait().is_none());
}

/// Issue 13, item 2: with a stale claimant refused (split brain), a blip of
/// the real primary (one failed check, `fall: 1`) does not hand it the
/// writes: they are refused for `primary_hold` and return to the primary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_a_blip_of_the_primary_does_not_hand_the_writes_to_a_stale_claimant() {
    let r1 = Redis::start(None);
    let r2 = Redis::replica_of(&r1, None);
    let w = reserve_port();
    let list = format!("['{}', '{}']", r1.addr, r2.addr);
    let sluice = Sluice::start(&format!(
        "admin: {{ bind: '{{admin}}' }}\n\
         listeners: {{ write: {{ bind: 127.0.0.1:{w}, pool: primary }} }}\n\
         pools:\n  primary:\n    role: primary\n    primary_hold: 30s\n    \
         health_check: {{ kind: redis, interval: {INTERVAL_MS}ms, timeout: {INTERVAL_MS}ms, rise: {RISE}, fall: 1 }}\n    \
         backends: {list}\n"
    ))
    .await;
    sluice.wait_active("primary", &[r1.addr]).await;
    // The replica is wrongly promoted while the primary still claims it.
    r2.promote();
    wait_until("the stale claimant is refused", || async {
        metric(
            &sluice.metrics().await,
            "sluice_pool_conflicts",
            &[("pool", "primary")],
        ) == 1.0
    })
    .await;
    // A blip: the primary answers nothing for 1.2 s (one failed check, and
    // with fall 1 it is down), then is back, still primary.
    assert_eq!(r1.cli(&["CLIENT", "PAUSE", "1200", "ALL"]), "OK");
    wait_until("the primary is marked down", || async {
        sluice.backend_state("primary", r1.addr).await == "down"
    })
    .await;
    // Until it is back, writes go nowhere rather than to the stale claimant.
    let stale = r2.addr.to_string();
    loop {
        let active = sluice.active_backends("primary").await;
        assert!(
            !active.contains(&stale),
            "writes went to the stale claimant"
        );
        if sluice.backend_state("primary", r1.addr).await == "up" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    sluice.wait_active("primary", &[r1.addr]).await;
    let port = redis_at(addr(w), "", &["CONFIG", "GET", "port"]);
    assert!(
        port.ends_with(&r1.addr.port().to_string()),
        "writes are back on the real primary: {port}"
    );
    sluice.wait_log("writes refused").await;
}

/// Issue 13, item 3: a read pool falling back to the primary during a
/// split brain goes where the write pool sends its writes, counts no
/// conflict of its own and speaks of reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_reads_follow_the_write_decision_during_a_split_brain() {
    let r1 = Redis::start(None);
    let r2 = Redis::replica_of(&r1, None);
    let (w, r) = (reserve_port(), reserve_port());
    let sluice = Sluice::start(&tier(w, r, "kind: redis", &[r1.addr, r2.addr], true)).await;
    sluice.wait_active("primary", &[r1.addr]).await;
    sluice.wait_active("replicas", &[r2.addr]).await;
    // The only replica is promoted: both claim primary, nobody is a replica.
    r2.promote();
    wait_until("the write pool refuses the late claimant", || async {
        metric(
            &sluice.metrics().await,
            "sluice_pool_conflicts",
            &[("pool", "primary")],
        ) == 1.0
    })
    .await;
    sluice.wait_active("replicas", &[r1.addr]).await;
    let port = redis_at(addr(r), "", &["CONFIG", "GET", "port"]);
    assert!(port.ends_with(&r1.addr.port().to_string()), "{port}");
    let m = sluice.metrics().await;
    assert_eq!(
        metric(&m, "sluice_pool_conflicts", &[("pool", "replicas")]),
        0.0,
        "the conflict is counted once, by the pool that decides"
    );
    assert_eq!(
        sluice.active_backends("primary").await,
        vec![r1.addr.to_string()]
    );
    assert!(
        !sluice.log().contains("pool replicas: SPLIT BRAIN"),
        "the read pool follows; it does not decide on its own"
    );
}
