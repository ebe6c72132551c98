//! The real-server fixtures of `tests/servers` work: each primary/replica
//! pair starts, replicates, reports its role to the monitoring user, and
//! flips roles on promotion. Start-up times are printed (`--nocapture`).

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod servers;

use std::time::Instant;

use servers::*;

/// Print how long `what` took, and return its result.
fn timed<T>(what: &str, f: impl FnOnce() -> T) -> T {
    let start = Instant::now();
    let v = f();
    eprintln!("{what}: {:?}", start.elapsed());
    v
}

#[test]
fn mariadb_primary_and_replica() {
    let primary = timed("MariaDB primary start", Mariadb::primary);
    let replica = timed("MariaDB replica start", || Mariadb::replica_of(&primary));
    let read_only = "SELECT @@global.read_only";

    // The monitor logs in over TCP with its password and sees the roles.
    assert_eq!(
        primary
            .sql_as(MONITOR_USER, MONITOR_PASSWORD, read_only)
            .unwrap(),
        "0"
    );
    assert_eq!(
        replica
            .sql_as(MONITOR_USER, MONITOR_PASSWORD, read_only)
            .unwrap(),
        "1"
    );
    let plugin = primary
        .sql("SELECT plugin FROM mysql.user WHERE user = 'monitor'")
        .unwrap();
    assert_eq!(plugin, "mysql_native_password");
    let wrong = primary
        .sql_as(MONITOR_USER, "wrong", read_only)
        .unwrap_err();
    assert!(wrong.contains("Access denied"), "{wrong}");

    // The app writes on the primary; the row reaches the replica; the
    // replica refuses the app's writes.
    primary
        .sql_as(
            APP_USER,
            APP_PASSWORD,
            "INSERT INTO shop.items (name) VALUES ('apple')",
        )
        .unwrap();
    replica.wait_replicated("SELECT name FROM shop.items", "apple");
    let refused = replica
        .sql_as(
            APP_USER,
            APP_PASSWORD,
            "INSERT INTO shop.items (name) VALUES ('pear')",
        )
        .unwrap_err();
    assert!(refused.contains("read-only"), "{refused}");

    // Failover: the replica becomes the writable primary, the old one
    // read-only.
    timed("MariaDB promote+demote", || {
        replica.promote();
        primary.demote();
    });
    assert_eq!(
        replica
            .sql_as(MONITOR_USER, MONITOR_PASSWORD, read_only)
            .unwrap(),
        "0"
    );
    assert_eq!(
        primary
            .sql_as(MONITOR_USER, MONITOR_PASSWORD, read_only)
            .unwrap(),
        "1"
    );
    assert_eq!(replica.slave_status(), "");
    replica
        .sql_as(
            APP_USER,
            APP_PASSWORD,
            "INSERT INTO shop.items (name) VALUES ('pear')",
        )
        .unwrap();

    // The free function reaches the same server.
    assert_eq!(
        mariadb_query(
            replica.addr,
            APP_USER,
            APP_PASSWORD,
            "SELECT COUNT(*) FROM shop.items"
        )
        .unwrap(),
        "2"
    );
    timed("MariaDB stop both", || drop((replica, primary)));
}

#[test]
fn redis_primary_and_replica() {
    let pw = Some("redis-secret");
    let primary = timed("Redis primary start", || Redis::start(pw));
    let replica = timed("Redis replica start", || Redis::replica_of(&primary, pw));

    assert_eq!(primary.role(), "master");
    assert_eq!(replica.role(), "slave");
    assert_eq!(primary.cli(&["SET", "k", "v1"]), "OK");
    replica.wait_value("k", "v1");

    // Without the password the server says NOAUTH.
    let noauth = std::process::Command::new("redis-cli")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &primary.addr.port().to_string(),
            "GET",
            "k",
        ])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&noauth.stdout).contains("NOAUTH"));

    timed("Redis promote", || replica.promote());
    assert_eq!(replica.role(), "master");
    assert_eq!(replica.cli(&["SET", "k", "v2"]), "OK");

    // And back: the old primary follows the new one.
    timed("Redis replicate_from", || primary.replicate_from(&replica));
    assert_eq!(primary.role(), "slave");
    primary.wait_value("k", "v2");
    timed("Redis stop both", || drop((replica, primary)));
}

#[test]
fn postgres_primary_and_standby() {
    let primary = timed("PostgreSQL primary start", Postgres::primary);
    let standby = timed("PostgreSQL standby start", || {
        Postgres::standby_of(&primary)
    });
    let recovery = "SELECT pg_is_in_recovery()";

    // The monitor logs in over TCP (SCRAM) and sees the roles.
    assert_eq!(
        primary
            .psql_as(MONITOR_USER, MONITOR_PASSWORD, recovery)
            .unwrap(),
        "f"
    );
    assert_eq!(
        standby
            .psql_as(MONITOR_USER, MONITOR_PASSWORD, recovery)
            .unwrap(),
        "t"
    );
    let wrong = primary
        .psql_as(MONITOR_USER, "wrong", recovery)
        .unwrap_err();
    assert!(wrong.contains("password authentication failed"), "{wrong}");

    primary
        .psql("CREATE TABLE t (v text); INSERT INTO t VALUES ('x')")
        .unwrap();
    standby.wait_query("SELECT v FROM t", "x");

    timed("PostgreSQL promote", || standby.promote());
    assert_eq!(
        pg_query(standby.addr, MONITOR_USER, MONITOR_PASSWORD, recovery).unwrap(),
        "f"
    );
    standby.psql("INSERT INTO t VALUES ('y')").unwrap();
    timed("PostgreSQL stop both", || drop((standby, primary)));
}

#[test]
fn servers_are_stopped_and_removed_when_a_test_panics() {
    let mut started = Vec::new();
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let redis = Redis::start(None);
        let postgres = Postgres::primary();
        let mariadb = Mariadb::primary();
        started = vec![
            (redis.pid().unwrap(), redis.dir().to_owned()),
            (postgres.pid().unwrap(), postgres.dir().to_owned()),
            (mariadb.pid().unwrap(), mariadb.dir().to_owned()),
        ];
        panic!("a failing assertion");
    }));
    assert!(outcome.is_err());
    assert_eq!(started.len(), 3);
    for (pid, dir) in started {
        // Reaped, so the PID is gone (not a zombie), and the files too.
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "pid {pid} left"
        );
        assert!(!dir.exists(), "{} left", dir.display());
    }
}
