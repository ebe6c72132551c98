//! Real servers on 127.0.0.1 for integration tests: MariaDB, Redis and
//! PostgreSQL, each alone or as a primary with a replica, and a Prometheus
//! server.
//!
//! The servers come from the Debian packages (`mariadb-server`,
//! `mariadb-client`, `redis-server`, `redis-tools`, `postgresql`,
//! `prometheus`; `make deps` installs them). A missing binary is a panic that
//! names the package.
//!
//! Every server:
//! - lives in its own [`tempfile::TempDir`] under `/tmp` (data, sockets, logs,
//!   pid files; nothing is written elsewhere; `/tmp` rather than `$TMPDIR`
//!   keeps unix socket paths short and traversable for the `postgres` user);
//! - listens on a free loopback port (found by binding `127.0.0.1:0`), and
//!   is started again on a fresh port if another process took that one first;
//! - is the direct child of the test process, so it is stopped by its own
//!   PID and nothing else: on `Drop` (also when an assertion unwinds) it gets
//!   its stop signal, up to [`STOP_DEADLINE`] to exit, then `SIGKILL`, and is
//!   reaped;
//! - is polled for readiness every [`POLL`] until [`START_DEADLINE`];
//!   nothing sleeps for a fixed time to wait for a state.
//!
//! Every client command (`mariadb`, `redis-cli`, `psql`, the set-up tools)
//! is killed after [`COMMAND_DEADLINE`], so each call here is bounded in
//! time. The functions are synchronous (`std::process`): call them directly
//! from `#[test]`s or through `tokio::task::spawn_blocking`.
//!
//! PostgreSQL refuses to run as root: when the tests run as root, every
//! PostgreSQL program runs as the `postgres` system user (set as the child's
//! uid/gid, so the PID we hold is the postmaster's own) and the temporary
//! directory is given to that user. `mariadbd` as root needs `--user=root`.
//! As any other user everything simply runs as that user.

#![allow(dead_code)]

use std::fs::File;
use std::io::Read;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tempfile::TempDir;

/// The MySQL/MariaDB and PostgreSQL user for health checks (MariaDB: plugin
/// `mysql_native_password`, no privileges beyond `USAGE`; PostgreSQL: a
/// `LOGIN` role with a SCRAM-SHA-256 password).
pub const MONITOR_USER: &str = "monitor";
/// [`MONITOR_USER`]'s password.
pub const MONITOR_PASSWORD: &str = "monitor-secret";
/// The MariaDB application user: `ALL` on database `shop`
/// (`mysql_native_password`).
pub const APP_USER: &str = "app";
/// [`APP_USER`]'s password.
pub const APP_PASSWORD: &str = "app-secret";
/// The user replicas log in as (MariaDB: `REPLICATION SLAVE`; PostgreSQL:
/// `REPLICATION LOGIN`).
pub const REPL_USER: &str = "repl";
/// [`REPL_USER`]'s password.
pub const REPL_PASSWORD: &str = "repl-secret";

/// How long a server may take to start, or a replica to catch up.
pub const START_DEADLINE: Duration = Duration::from_secs(30);
/// How long a server may take to exit after its stop signal before `SIGKILL`.
pub const STOP_DEADLINE: Duration = Duration::from_secs(10);
/// How long one client or set-up command may run before it is killed.
pub const COMMAND_DEADLINE: Duration = Duration::from_secs(30);
/// How long one readiness probe may take: a port taken by a foreign
/// process may accept and never answer.
pub const PROBE_DEADLINE: Duration = Duration::from_secs(2);
/// How often a state is polled.
pub const POLL: Duration = Duration::from_millis(25);

/// How many ports a server tries when another process takes its port
/// between our probe and its bind.
const PORT_ATTEMPTS: usize = 5;

// ---------------------------------------------------------------------------
// Shared plumbing
// ---------------------------------------------------------------------------

/// A free TCP port on 127.0.0.1: bind port 0, read the port, let it go.
/// Another process may take it before the server binds it; the starters
/// below retry on a clash.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local_addr").port()
}

/// Whether the tests run as root (then PostgreSQL is run as `postgres`).
fn is_root() -> bool {
    // nix's `geteuid` needs its `user` feature; `/proc/self` belongs to
    // the effective uid.
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// The full path of `name`, searched in `$PATH` and the sbin directories
/// (which a non-root `$PATH` often lacks); panics naming `package`.
fn binary(name: &str, package: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let extra = [
        "/usr/local/sbin",
        "/usr/sbin",
        "/sbin",
        "/usr/local/bin",
        "/usr/bin",
    ];
    std::env::split_paths(&path)
        .chain(extra.iter().map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("{name} not found: install {package} (make deps installs it)"))
}

/// Poll `ready` every [`POLL`] until it gives `Some`, for at most `deadline`.
/// Returns `None` on timeout.
fn poll<T>(deadline: Duration, mut ready: impl FnMut() -> Option<T>) -> Option<T> {
    let start = Instant::now();
    loop {
        if let Some(v) = ready() {
            return Some(v);
        }
        if start.elapsed() >= deadline {
            return None;
        }
        std::thread::sleep(POLL);
    }
}

/// Wait for `child` up to `deadline`; kill and reap it on timeout.
fn wait_bounded(child: &mut Child, deadline: Duration) -> Result<ExitStatus, String> {
    let done = poll(deadline, || child.try_wait().ok().flatten());
    match done {
        Some(status) => Ok(status),
        None => {
            let _ = child.kill();
            let _ = child.wait();
            Err(format!("killed after {deadline:?}"))
        }
    }
}

/// The result of a finished command.
struct Output {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

/// Run `cmd` with piped output, killing it after `deadline`. `Err` only
/// when it could not be started or ran too long.
fn run(cmd: &mut Command, deadline: Duration) -> Result<Output, String> {
    let shown = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {shown}: {e}"))?;
    let out = drain(child.stdout.take());
    let err = drain(child.stderr.take());
    let status = wait_bounded(&mut child, deadline).map_err(|e| format!("{shown}: {e}"))?;
    Ok(Output {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    })
}

/// Read `pipe` to its end on a thread (so that a full pipe cannot block
/// the child while we wait for it).
fn drain<R: Read + Send + 'static>(pipe: Option<R>) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(mut p) = pipe {
            let _ = p.read_to_end(&mut buf);
        }
        String::from_utf8_lossy(&buf).into_owned()
    })
}

/// Run `cmd`: trimmed stdout on success, trimmed stderr (or the status)
/// on failure.
fn run_text(cmd: &mut Command) -> Result<String, String> {
    let out = run(cmd, COMMAND_DEADLINE)?;
    if out.status.success() {
        Ok(out.stdout.trim().to_owned())
    } else if out.stderr.trim().is_empty() {
        Err(format!("{}: {}", out.status, out.stdout.trim()))
    } else {
        Err(out.stderr.trim().to_owned())
    }
}

/// Run a set-up tool whose output goes to `log`; panic with that log if it
/// fails or runs too long.
fn run_logged(cmd: &mut Command, log: &Path) {
    let file = File::create(log).expect("create set-up log");
    let shown = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(file.try_clone().expect("dup log"))
        .stderr(file)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {shown}: {e}"));
    let status = wait_bounded(&mut child, COMMAND_DEADLINE);
    if !matches!(status, Ok(s) if s.success()) {
        panic!("{shown} failed ({status:?}):\n{}", read_log(log));
    }
}

/// A log file's contents, or why it cannot be read.
fn read_log(path: &Path) -> String {
    match std::fs::read(path) {
        Ok(b) => String::from_utf8_lossy(&b).into_owned(),
        Err(e) => format!("<cannot read {}: {e}>", path.display()),
    }
}

/// The length of a file, 0 if it does not exist.
fn log_len(path: &Path) -> usize {
    std::fs::metadata(path).map_or(0, |m| m.len() as usize)
}

/// A fresh temporary directory under `/tmp` named after `what`.
fn temp_dir(what: &str) -> TempDir {
    tempfile::Builder::new()
        .prefix(&format!("sluice-test-{what}-"))
        .tempdir_in("/tmp")
        .expect("create temporary directory")
}

/// What a server's log says when its port was taken.
fn port_clash(log: &str) -> bool {
    log.contains("Address already in use")
        || log.contains("address already in use")
        || log.contains("errno: 98")
        || log.contains("error: 98")
}

/// A server process that we started, stopped and reaped on drop.
struct Server {
    name: &'static str,
    child: Option<Child>,
    log: PathBuf,
    stop_signal: Signal,
}

impl Server {
    /// Spawn `cmd` (stdin closed; stdout and stderr appended to `log`), then
    /// poll `ready` (given the PID) until it holds. `Some` when ready;
    /// `None` when the process exited because its port was taken (the
    /// caller retries on another port); panics on any other failure, with
    /// the log.
    fn spawn(
        name: &'static str,
        cmd: &mut Command,
        log: &Path,
        stop_signal: Signal,
        mut ready: impl FnMut(u32) -> bool,
    ) -> Option<Server> {
        let start = log_len(log);
        let out = File::options()
            .create(true)
            .append(true)
            .open(log)
            .expect("open server log");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("dup log"))
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name} ({cmd:?}): {e}"));
        let pid = child.id();
        let mut server = Server {
            name,
            child: Some(child),
            log: log.to_owned(),
            stop_signal,
        };
        let outcome = poll(START_DEADLINE, || {
            if let Some(status) = server
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                return Some(Err(status));
            }
            ready(pid).then_some(Ok(()))
        });
        match outcome {
            Some(Ok(())) => Some(server),
            Some(Err(status)) => {
                server.child = None;
                let bytes = std::fs::read(log).unwrap_or_default();
                let this_attempt = bytes.get(start..).unwrap_or(&bytes);
                if port_clash(&String::from_utf8_lossy(this_attempt)) {
                    return None;
                }
                let text = String::from_utf8_lossy(&bytes);
                panic!(
                    "{name} exited during start-up ({status}); log {}:\n{text}",
                    log.display()
                );
            }
            None => {
                drop(server);
                panic!(
                    "{name} not ready after {START_DEADLINE:?}; log {}:\n{}",
                    log.display(),
                    read_log(log)
                );
            }
        }
    }

    /// The server's PID.
    fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Stop the server: its stop signal, up to [`STOP_DEADLINE`] to exit,
    /// then `SIGKILL`; reap it. Only ever signals the PID of our own
    /// unreaped child, which cannot have been reused. Idempotent.
    fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        let pid = Pid::from_raw(child.id() as i32);
        let _ = kill(pid, self.stop_signal);
        if poll(STOP_DEADLINE, || child.try_wait().ok().flatten()).is_none() {
            eprintln!(
                "{} (pid {pid}) ignored {:?} for {STOP_DEADLINE:?}: SIGKILL",
                self.name, self.stop_signal
            );
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The socket address of 127.0.0.1:`port`.
fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, port))
}

// ---------------------------------------------------------------------------
// MariaDB
// ---------------------------------------------------------------------------

/// A MariaDB server (`mariadbd`) in its own temporary directory, with
/// binary logging and GTIDs. Stopped (SIGTERM) and deleted on drop.
pub struct Mariadb {
    /// Where it listens: 127.0.0.1 and a free port.
    pub addr: SocketAddr,
    /// Its `server_id`: 1 for a primary; 2 for the first replica started in
    /// this test process, 3 for the next (ids of a primary's replicas must
    /// differ).
    pub server_id: u32,
    /// Its unix socket, for root access.
    socket: PathBuf,
    // Declared before `dir`: the server stops before its directory goes.
    server: Server,
    dir: TempDir,
}

impl Mariadb {
    /// A primary: `server_id` 1, `log-bin`, writable. Has users
    /// [`MONITOR_USER`] (`USAGE` only), [`APP_USER`] (`ALL` on `shop`) and
    /// [`REPL_USER`] (`REPLICATION SLAVE`), all `mysql_native_password` at
    /// host `%`, and database `shop` with table
    /// `items(id INT AUTO_INCREMENT PRIMARY KEY, name VARCHAR(64))`.
    pub fn primary() -> Mariadb {
        let db = Mariadb::start(1, false);
        let setup = format!(
            "CREATE USER '{MONITOR_USER}'@'%' IDENTIFIED VIA mysql_native_password \
                 USING PASSWORD('{MONITOR_PASSWORD}');
             CREATE USER '{APP_USER}'@'%' IDENTIFIED VIA mysql_native_password \
                 USING PASSWORD('{APP_PASSWORD}');
             CREATE USER '{REPL_USER}'@'%' IDENTIFIED VIA mysql_native_password \
                 USING PASSWORD('{REPL_PASSWORD}');
             GRANT REPLICATION SLAVE ON *.* TO '{REPL_USER}'@'%';
             CREATE DATABASE shop;
             GRANT ALL ON shop.* TO '{APP_USER}'@'%';
             CREATE TABLE shop.items (id INT AUTO_INCREMENT PRIMARY KEY, name VARCHAR(64));"
        );
        db.sql(&setup)
            .unwrap_or_else(|e| panic!("MariaDB primary set-up failed: {e}"));
        db
    }

    /// A replica of `primary`: `server_id` 2 (3, 4, … for later replicas
    /// in this process), `read_only` on, `log-bin` and
    /// `log-slave-updates` (so it can be promoted), replicating with
    /// `MASTER_USE_GTID=slave_pos` from the primary's first event, so it
    /// gets the primary's users and `shop` too. Returns once both
    /// replication threads run and `shop.items` exists.
    pub fn replica_of(primary: &Mariadb) -> Mariadb {
        static NEXT_ID: AtomicU32 = AtomicU32::new(2);
        let db = Mariadb::start(NEXT_ID.fetch_add(1, Ordering::Relaxed), true);
        let change = format!(
            "CHANGE MASTER TO MASTER_HOST='127.0.0.1', MASTER_PORT={}, \
                 MASTER_USER='{REPL_USER}', MASTER_PASSWORD='{REPL_PASSWORD}', \
                 MASTER_CONNECT_RETRY=1, MASTER_USE_GTID=slave_pos;
             START SLAVE;",
            primary.addr.port()
        );
        db.sql(&change)
            .unwrap_or_else(|e| panic!("MariaDB replica set-up failed: {e}"));
        let running = poll(START_DEADLINE, || {
            let status = db.slave_status();
            (status.contains("Slave_IO_Running: Yes") && status.contains("Slave_SQL_Running: Yes"))
                .then_some(())
        });
        if running.is_none() {
            panic!(
                "MariaDB replica not replicating after {START_DEADLINE:?}:\n{}\nlog:\n{}",
                db.slave_status(),
                db.log()
            );
        }
        db.wait_replicated(
            "SELECT COUNT(*) FROM information_schema.tables \
             WHERE table_schema = 'shop' AND table_name = 'items'",
            "1",
        );
        db
    }

    /// Install a data directory and start `mariadbd` on a free port.
    fn start(server_id: u32, read_only: bool) -> Mariadb {
        let mariadbd = binary("mariadbd", "mariadb-server");
        let install_db = binary("mariadb-install-db", "mariadb-server");
        binary("mariadb", "mariadb-client");
        let dir = temp_dir("mariadb");
        let data = dir.path().join("data");
        let socket = dir.path().join("mariadbd.sock");
        let log = dir.path().join("mariadbd.log");
        // InnoDB settings shared by install and server, so that the server
        // does not resize the redo log on its first start.
        let innodb = [
            "--innodb-buffer-pool-size=16M",
            "--innodb-log-file-size=8M",
            // io_uring/libaio can be refused in containers; tests need no AIO.
            "--innodb-use-native-aio=0",
        ];
        let root = is_root().then_some("--user=root");
        let mut install = Command::new(install_db);
        install
            .arg("--no-defaults")
            .arg(format!("--datadir={}", data.display()))
            .args(root)
            .args([
                "--auth-root-authentication-method=normal",
                "--skip-test-db",
                "--skip-name-resolve",
            ])
            .args(innodb)
            .current_dir(dir.path());
        run_logged(&mut install, &dir.path().join("install.log"));

        for _ in 0..PORT_ATTEMPTS {
            let port = free_port();
            let mut cmd = Command::new(&mariadbd);
            cmd.arg("--no-defaults")
                .args(root)
                .arg(format!("--datadir={}", data.display()))
                .arg(format!("--socket={}", socket.display()))
                .arg(format!("--port={port}"))
                .arg("--bind-address=127.0.0.1")
                .arg(format!(
                    "--pid-file={}",
                    dir.path().join("mariadbd.pid").display()
                ))
                .arg(format!("--log-error={}", log.display()))
                .arg(format!("--tmpdir={}", dir.path().display()))
                .arg(format!("--server-id={server_id}"))
                .args([
                    "--log-bin=mysql-bin",
                    "--relay-log=relay-bin",
                    "--log-slave-updates",
                    "--skip-name-resolve",
                ])
                .args(innodb)
                .args(read_only.then_some("--read-only"))
                .current_dir(dir.path());
            let ready = |_pid: u32| root_sql(&socket, "SELECT 1").is_ok();
            match Server::spawn("mariadbd", &mut cmd, &log, Signal::SIGTERM, ready) {
                Some(server) => {
                    return Mariadb {
                        addr: loopback(port),
                        server_id,
                        socket,
                        server,
                        dir,
                    };
                }
                None => continue,
            }
        }
        panic!(
            "mariadbd: every port tried was taken; log:\n{}",
            read_log(&log)
        );
    }

    /// Run `sql` (one or more `;`-separated statements) as root over the
    /// unix socket: `mariadb -N -B -e`. Trimmed stdout, or stderr on error.
    pub fn sql(&self, sql: &str) -> Result<String, String> {
        root_sql(&self.socket, sql)
    }

    /// Run `sql` as `user` over TCP to [`Mariadb::addr`]; see
    /// [`mariadb_query`].
    pub fn sql_as(&self, user: &str, password: &str, sql: &str) -> Result<String, String> {
        mariadb_query(self.addr, user, password, sql)
    }

    /// Make a replica a writable primary: `STOP SLAVE; RESET SLAVE ALL;
    /// SET GLOBAL read_only = OFF`. Panics on error.
    pub fn promote(&self) {
        self.sql("STOP SLAVE; RESET SLAVE ALL; SET GLOBAL read_only = OFF")
            .unwrap_or_else(|e| panic!("promote MariaDB {}: {e}", self.addr));
    }

    /// Make the server read-only: `SET GLOBAL read_only = ON` (replication,
    /// if any, is left alone). Panics on error.
    pub fn demote(&self) {
        self.sql("SET GLOBAL read_only = ON")
            .unwrap_or_else(|e| panic!("demote MariaDB {}: {e}", self.addr));
    }

    /// Poll `sql_check` (as root) until it returns `expect`; panic after
    /// [`START_DEADLINE`] with the last answer and the replication status.
    pub fn wait_replicated(&self, sql_check: &str, expect: &str) {
        let mut last = Err(String::new());
        let got = poll(START_DEADLINE, || {
            last = self.sql(sql_check);
            (last.as_deref() == Ok(expect)).then_some(())
        });
        if got.is_none() {
            panic!(
                "MariaDB {}: {sql_check:?} gave {last:?}, not {expect:?}, for {START_DEADLINE:?}\n{}",
                self.addr,
                self.slave_status()
            );
        }
    }

    /// `SHOW SLAVE STATUS` in vertical form (`Field: value` lines); empty
    /// when not a replica; the error text on error.
    pub fn slave_status(&self) -> String {
        let mut cmd = mariadb_client();
        cmd.arg(format!("--socket={}", self.socket.display()))
            .args([
                "--protocol=SOCKET",
                "-uroot",
                "-E",
                "-e",
                "SHOW SLAVE STATUS",
            ]);
        run_text(&mut cmd).unwrap_or_else(|e| e)
    }

    /// The server's error log.
    pub fn log(&self) -> String {
        read_log(&self.server.log)
    }

    /// The server's PID (`None` once stopped).
    pub fn pid(&self) -> Option<u32> {
        self.server.pid()
    }

    /// Stop the server now (SIGTERM, then SIGKILL after
    /// [`STOP_DEADLINE`]); its directory stays until drop. Idempotent.
    pub fn stop(&mut self) {
        self.server.stop();
    }

    /// The temporary directory that holds everything of this server.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

/// The `mariadb` client with no option files read.
fn mariadb_client() -> Command {
    let mut cmd = Command::new(binary("mariadb", "mariadb-client"));
    cmd.args(["--no-defaults", "--connect-timeout=5"]);
    cmd
}

/// `sql` as root over the unix socket `socket`.
fn root_sql(socket: &Path, sql: &str) -> Result<String, String> {
    let mut cmd = mariadb_client();
    cmd.arg(format!("--socket={}", socket.display())).args([
        "--protocol=SOCKET",
        "-uroot",
        "-N",
        "-B",
        "-e",
        sql,
    ]);
    run_text(&mut cmd)
}

/// Run `sql` on the MySQL/MariaDB server at `addr` (a server, or a proxy
/// in front of one) as `user`/`password` over TCP: `mariadb -N -B -e`,
/// no default database. Trimmed stdout, or stderr on error (refused
/// connection, bad password, SQL error, ...).
pub fn mariadb_query(
    addr: SocketAddr,
    user: &str,
    password: &str,
    sql: &str,
) -> Result<String, String> {
    let mut cmd = mariadb_client();
    cmd.args(["--protocol=TCP", "-N", "-B"])
        .arg(format!("--host={}", addr.ip()))
        .arg(format!("--port={}", addr.port()))
        .arg(format!("--user={user}"))
        .arg(format!("--password={password}"))
        .args(["-e", sql]);
    run_text(&mut cmd)
}

// ---------------------------------------------------------------------------
// Redis
// ---------------------------------------------------------------------------

/// A Redis server (`redis-server`, no persistence) in its own temporary
/// directory. Stopped (SIGTERM) and deleted on drop.
pub struct Redis {
    /// Where it listens: 127.0.0.1 and a free port.
    pub addr: SocketAddr,
    /// Its `requirepass`, if any; [`Redis::cli`] logs in with it.
    pub password: Option<String>,
    // Declared before `dir`: the server stops before its directory goes.
    server: Server,
    dir: TempDir,
}

impl Redis {
    /// A primary, with `requirepass` when `password` is given.
    pub fn start(password: Option<&str>) -> Redis {
        Redis::launch(password, None)
    }

    /// A replica of `primary` (`--replicaof`, `--masterauth` = the
    /// primary's password), with `requirepass` when `password` is given.
    /// Returns once `INFO replication` shows `master_link_status:up`.
    pub fn replica_of(primary: &Redis, password: Option<&str>) -> Redis {
        let replica = Redis::launch(password, Some(primary));
        replica.wait_link_up();
        replica
    }

    /// Start `redis-server` on a free port.
    fn launch(password: Option<&str>, primary: Option<&Redis>) -> Redis {
        let redis_server = binary("redis-server", "redis-server");
        binary("redis-cli", "redis-tools");
        let dir = temp_dir("redis");
        let log = dir.path().join("redis.log");
        for _ in 0..PORT_ATTEMPTS {
            let port = free_port();
            let mut cmd = Command::new(&redis_server);
            cmd.args(["--port", &port.to_string()])
                .args(["--bind", "127.0.0.1"])
                .args(["--save", ""])
                .args(["--appendonly", "no"])
                .args(["--daemonize", "no"])
                .arg("--dir")
                .arg(dir.path())
                .arg("--logfile")
                .arg(&log)
                // Full syncs go over the socket at once (the default waits 5 s
                // for more replicas).
                .args(["--repl-diskless-sync", "yes"])
                .args(["--repl-diskless-sync-delay", "0"])
                // On SIGTERM, exit at once rather than wait (up to 10 s) for
                // replicas to acknowledge the last writes.
                .args(["--shutdown-timeout", "0"])
                .current_dir(dir.path());
            if let Some(pw) = password {
                cmd.args(["--requirepass", pw]);
            }
            if let Some(p) = primary {
                cmd.args(["--replicaof", "127.0.0.1", &p.addr.port().to_string()]);
                if let Some(pw) = &p.password {
                    cmd.args(["--masterauth", pw]);
                }
            }
            let addr = loopback(port);
            // Ready when the server on that port is ours: its process_id.
            let ready = |pid: u32| {
                redis_cli(addr, password, &["INFO", "server"], PROBE_DEADLINE).is_ok_and(|info| {
                    info.lines()
                        .any(|l| l.trim() == format!("process_id:{pid}"))
                })
            };
            match Server::spawn("redis-server", &mut cmd, &log, Signal::SIGTERM, ready) {
                Some(server) => {
                    return Redis {
                        addr,
                        password: password.map(str::to_owned),
                        server,
                        dir,
                    };
                }
                None => continue,
            }
        }
        panic!(
            "redis-server: every port tried was taken; log:\n{}",
            read_log(&log)
        );
    }

    /// `redis-cli -h 127.0.0.1 -p P [-a password --no-auth-warning] args…`:
    /// the trimmed output (replies in redis-cli's raw form, one element a
    /// line; error replies as their text, e.g. `NOAUTH …`). Panics only if
    /// redis-cli cannot run or hangs.
    pub fn cli(&self, args: &[&str]) -> String {
        match redis_cli(self.addr, self.password.as_deref(), args, COMMAND_DEADLINE) {
            Ok(out) | Err(out) => out,
        }
    }

    /// `REPLICAOF NO ONE`, then wait until `ROLE` says `master`.
    pub fn promote(&self) {
        let reply = self.cli(&["REPLICAOF", "NO", "ONE"]);
        assert_eq!(reply, "OK", "REPLICAOF NO ONE on {}", self.addr);
        self.wait_role("master");
    }

    /// Replicate from `primary` (`CONFIG SET masterauth`, then `REPLICAOF
    /// 127.0.0.1 port`), and wait until the link is up.
    pub fn replicate_from(&self, primary: &Redis) {
        let auth = primary.password.as_deref().unwrap_or("");
        let reply = self.cli(&["CONFIG", "SET", "masterauth", auth]);
        assert_eq!(reply, "OK", "CONFIG SET masterauth on {}", self.addr);
        let port = primary.addr.port().to_string();
        let reply = self.cli(&["REPLICAOF", "127.0.0.1", &port]);
        assert!(
            reply.starts_with("OK"),
            "REPLICAOF on {}: {reply}",
            self.addr
        );
        self.wait_link_up();
    }

    /// The first line of `ROLE`: `master` or `slave`.
    pub fn role(&self) -> String {
        self.cli(&["ROLE"]).lines().next().unwrap_or("").to_owned()
    }

    /// Poll until `ROLE` gives `role`.
    fn wait_role(&self, role: &str) {
        if poll(START_DEADLINE, || (self.role() == role).then_some(())).is_none() {
            panic!(
                "Redis {}: ROLE never became {role}: {}",
                self.addr,
                self.cli(&["ROLE"])
            );
        }
    }

    /// Poll until `INFO replication` shows `master_link_status:up`.
    fn wait_link_up(&self) {
        let up = poll(START_DEADLINE, || {
            let info = self.cli(&["INFO", "replication"]);
            info.lines()
                .any(|l| l.trim() == "master_link_status:up")
                .then_some(())
        });
        if up.is_none() {
            panic!(
                "Redis replica {}: link not up after {START_DEADLINE:?}:\n{}\nlog:\n{}",
                self.addr,
                self.cli(&["INFO", "replication"]),
                self.log()
            );
        }
    }

    /// Poll `GET key` until it gives `value` (for replication checks).
    pub fn wait_value(&self, key: &str, value: &str) {
        let mut last = String::new();
        let got = poll(START_DEADLINE, || {
            last = self.cli(&["GET", key]);
            (last == value).then_some(())
        });
        if got.is_none() {
            panic!(
                "Redis {}: GET {key} gave {last:?}, not {value:?}",
                self.addr
            );
        }
    }

    /// The server's log file.
    pub fn log(&self) -> String {
        read_log(&self.server.log)
    }

    /// The server's PID (`None` once stopped).
    pub fn pid(&self) -> Option<u32> {
        self.server.pid()
    }

    /// Stop the server now (SIGTERM, then SIGKILL after
    /// [`STOP_DEADLINE`]). Idempotent.
    pub fn stop(&mut self) {
        self.server.stop();
    }

    /// The temporary directory that holds everything of this server.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

/// redis-cli against `addr`: `Ok(output)` when it exits 0, `Err(output)`
/// otherwise (both trimmed; stderr if stdout is empty).
fn redis_cli(
    addr: SocketAddr,
    password: Option<&str>,
    args: &[&str],
    deadline: Duration,
) -> Result<String, String> {
    let mut cmd = Command::new(binary("redis-cli", "redis-tools"));
    cmd.args(["-h", &addr.ip().to_string(), "-p", &addr.port().to_string()]);
    if let Some(pw) = password {
        cmd.args(["-a", pw, "--no-auth-warning"]);
    }
    cmd.args(args);
    let out = run(&mut cmd, deadline)?;
    let text = if out.stdout.trim().is_empty() {
        out.stderr.trim().to_owned()
    } else {
        out.stdout.trim().to_owned()
    };
    if out.status.success() && !text.starts_with("Could not connect") {
        Ok(text)
    } else {
        Err(text)
    }
}

// ---------------------------------------------------------------------------
// PostgreSQL
// ---------------------------------------------------------------------------

/// A PostgreSQL server (`postgres`) in its own temporary directory, which
/// is also its unix socket directory. `fsync=off`. Stopped with SIGINT (a
/// fast shutdown: SIGTERM would wait for every client, a proxy's included)
/// and deleted on drop.
pub struct Postgres {
    /// Where it listens: 127.0.0.1 and a free port.
    pub addr: SocketAddr,
    // Declared before `dir`: the server stops before its directory goes.
    server: Server,
    dir: TempDir,
}

impl Postgres {
    /// A primary: `initdb` (`scram-sha-256` over TCP, `trust` over the unix
    /// socket, superuser `postgres`), `wal_level=replica`; roles
    /// [`MONITOR_USER`] (`LOGIN PASSWORD`) and [`REPL_USER`] (`REPLICATION
    /// LOGIN PASSWORD`), passwords SCRAM-hashed.
    pub fn primary() -> Postgres {
        let dir = pg_dir();
        let data = dir.path().join("data");
        let mut initdb = pg_command("initdb", dir.path());
        initdb.arg("-D").arg(&data).args([
            "--auth-host=scram-sha-256",
            "--auth-local=trust",
            "--username=postgres",
            "--encoding=UTF8",
            "--locale=C",
            "--no-sync",
            "--no-instructions",
        ]);
        run_logged(&mut initdb, &dir.path().join("initdb.log"));
        let pg = Postgres::launch(dir);
        let setup = format!(
            "CREATE ROLE {MONITOR_USER} LOGIN PASSWORD '{MONITOR_PASSWORD}';
             CREATE ROLE {REPL_USER} REPLICATION LOGIN PASSWORD '{REPL_PASSWORD}';"
        );
        pg.psql(&setup)
            .unwrap_or_else(|e| panic!("PostgreSQL primary set-up failed: {e}"));
        pg
    }

    /// A hot standby of `primary`: `pg_basebackup -R -X stream` as
    /// [`REPL_USER`] over TCP, then started. Returns once
    /// `pg_is_in_recovery()` is true and the WAL receiver is streaming.
    pub fn standby_of(primary: &Postgres) -> Postgres {
        let dir = pg_dir();
        let conninfo = format!(
            "host=127.0.0.1 port={} user={REPL_USER} password={REPL_PASSWORD}",
            primary.addr.port()
        );
        let mut backup = pg_command("pg_basebackup", dir.path());
        backup
            .arg("--pgdata")
            .arg(dir.path().join("data"))
            .arg(format!("--dbname={conninfo}"))
            .args([
                "--write-recovery-conf",
                "--wal-method=stream",
                "--checkpoint=fast",
                "--no-sync",
            ]);
        run_logged(&mut backup, &dir.path().join("basebackup.log"));
        let pg = Postgres::launch(dir);
        pg.wait_query("SELECT pg_is_in_recovery()", "t");
        pg.wait_query("SELECT status FROM pg_stat_wal_receiver", "streaming");
        pg
    }

    /// Start `postgres` on the data directory in `dir` on a free port.
    fn launch(dir: TempDir) -> Postgres {
        let data = dir.path().join("data");
        let log = dir.path().join("postgres.log");
        for _ in 0..PORT_ATTEMPTS {
            let port = free_port();
            let mut cmd = pg_command("postgres", dir.path());
            cmd.arg("-D")
                .arg(&data)
                .args(["-p", &port.to_string()])
                .args(["-c", "listen_addresses=127.0.0.1"])
                .arg("-c")
                .arg(format!("unix_socket_directories={}", dir.path().display()))
                .args(["-c", "wal_level=replica"])
                .args(["-c", "fsync=off"])
                .args(["-c", "shared_buffers=16MB"])
                .args(["-c", "max_connections=50"])
                .args(["-c", "hot_standby=on"]);
            let ready = |_pid: u32| pg_socket_query(dir.path(), port, "SELECT 1").is_ok();
            match Server::spawn("postgres", &mut cmd, &log, Signal::SIGINT, ready) {
                Some(server) => {
                    return Postgres {
                        addr: loopback(port),
                        server,
                        dir,
                    };
                }
                None => continue,
            }
        }
        panic!(
            "postgres: every port tried was taken; log:\n{}",
            read_log(&log)
        );
    }

    /// Run `sql` as the `postgres` superuser over the unix socket:
    /// `psql -X -At -v ON_ERROR_STOP=1 -c`, database `postgres`. Trimmed
    /// stdout (rows one a line, columns split by `|`), or stderr on error.
    pub fn psql(&self, sql: &str) -> Result<String, String> {
        pg_socket_query(self.dir.path(), self.addr.port(), sql)
    }

    /// Run `sql` as `user` over TCP to [`Postgres::addr`]; see
    /// [`pg_query`].
    pub fn psql_as(&self, user: &str, password: &str, sql: &str) -> Result<String, String> {
        pg_query(self.addr, user, password, sql)
    }

    /// `SELECT pg_promote()` (which waits for the promotion), then wait
    /// until `pg_is_in_recovery()` is false.
    pub fn promote(&self) {
        let reply = self
            .psql("SELECT pg_promote()")
            .unwrap_or_else(|e| panic!("promote PostgreSQL {}: {e}", self.addr));
        assert_eq!(reply, "t", "pg_promote() on {}", self.addr);
        self.wait_query("SELECT pg_is_in_recovery()", "f");
    }

    /// Poll `sql` (as superuser) until it returns `expect`; panic after
    /// [`START_DEADLINE`] with the last answer and the log.
    pub fn wait_query(&self, sql: &str, expect: &str) {
        let mut last = Err(String::new());
        let got = poll(START_DEADLINE, || {
            last = self.psql(sql);
            (last.as_deref() == Ok(expect)).then_some(())
        });
        if got.is_none() {
            panic!(
                "PostgreSQL {}: {sql:?} gave {last:?}, not {expect:?}, for {START_DEADLINE:?}\nlog:\n{}",
                self.addr,
                self.log()
            );
        }
    }

    /// The server's log (its stderr).
    pub fn log(&self) -> String {
        read_log(&self.server.log)
    }

    /// The server's (postmaster's) PID (`None` once stopped).
    pub fn pid(&self) -> Option<u32> {
        self.server.pid()
    }

    /// Stop the server now (SIGINT, then SIGKILL after
    /// [`STOP_DEADLINE`]). Idempotent.
    pub fn stop(&mut self) {
        self.server.stop();
    }

    /// The temporary directory (also the unix socket directory).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

/// Run `sql` on the PostgreSQL server at `addr` (a server, or a proxy in
/// front of one) as `user`/`password` over TCP, database `postgres`:
/// `psql -X -At`. Trimmed stdout, or stderr on error.
pub fn pg_query(addr: SocketAddr, user: &str, password: &str, sql: &str) -> Result<String, String> {
    let mut cmd = Command::new(pg_binary("psql"));
    without_pg_env(&mut cmd);
    cmd.arg(format!(
        "--dbname=host={} port={} user={user} dbname=postgres connect_timeout=5",
        addr.ip(),
        addr.port()
    ))
    .env("PGPASSWORD", password)
    .args(["-X", "-At", "-v", "ON_ERROR_STOP=1", "-c", sql]);
    run_text(&mut cmd)
}

/// `sql` as superuser over the unix socket in `dir`.
fn pg_socket_query(dir: &Path, port: u16, sql: &str) -> Result<String, String> {
    let mut cmd = pg_command("psql", dir);
    cmd.arg(format!(
        "--dbname=host={} port={port} user=postgres dbname=postgres connect_timeout=5",
        dir.display()
    ))
    .args(["-X", "-At", "-v", "ON_ERROR_STOP=1", "-c", sql]);
    run_text(&mut cmd)
}

/// A temporary directory that the PostgreSQL programs can own.
fn pg_dir() -> TempDir {
    let dir = temp_dir("postgres");
    if is_root() {
        let (uid, gid) = postgres_ids();
        std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid))
            .expect("chown the PostgreSQL directory to postgres");
    }
    dir
}

/// A PostgreSQL program run in `dir`, as the `postgres` user when we are
/// root, with no `PG*` variables from the environment.
fn pg_command(program: &str, dir: &Path) -> Command {
    let mut cmd = Command::new(pg_binary(program));
    without_pg_env(&mut cmd);
    cmd.current_dir(dir).env("HOME", dir);
    if is_root() {
        let (uid, gid) = postgres_ids();
        cmd.uid(uid).gid(gid);
    }
    cmd
}

/// Keep the test's `PG*` variables (`PGHOST`, `PGSSLMODE`, …) from `cmd`.
fn without_pg_env(cmd: &mut Command) {
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("PG") {
            cmd.env_remove(key);
        }
    }
}

/// The uid and gid of the `postgres` system user (from `/etc/passwd`).
fn postgres_ids() -> (u32, u32) {
    let passwd = std::fs::read_to_string("/etc/passwd").expect("read /etc/passwd");
    passwd
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|f| f.len() > 3 && f[0] == "postgres")
        .and_then(|f| Some((f[2].parse().ok()?, f[3].parse().ok()?)))
        .expect("no postgres system user: install postgresql (make deps installs it)")
}

/// `name` from the newest `/usr/lib/postgresql/<version>/bin`, else from
/// `$PATH`.
fn pg_binary(name: &str) -> PathBuf {
    let newest = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version: u32 = e.file_name().to_str()?.split('.').next()?.parse().ok()?;
            let path = e.path().join("bin").join(name);
            path.is_file().then_some((version, path))
        })
        .max_by_key(|(v, _)| *v);
    match newest {
        Some((_, path)) => path,
        None => binary(name, "postgresql"),
    }
}

// ---------------------------------------------------------------------------
// Prometheus
// ---------------------------------------------------------------------------

/// Where Debian's `prometheus` package puts the server.
pub const PROMETHEUS_BIN: &str = "/usr/bin/prometheus";

/// A Prometheus server (`/usr/bin/prometheus`) with its configuration, rule
/// files and TSDB in its own temporary directory, its web API on 127.0.0.1
/// and a free port. Stopped (SIGTERM, by PID) and deleted on drop.
pub struct Prometheus {
    /// Its web and HTTP API address.
    pub addr: SocketAddr,
    // Declared before `dir`: the server stops before its directory goes.
    server: Server,
    dir: TempDir,
}

impl Prometheus {
    /// Whether Debian's Prometheus server is installed.
    pub fn installed() -> bool {
        Path::new(PROMETHEUS_BIN).is_file()
    }

    /// Start Prometheus with `config` as `prometheus.yml` and `files`
    /// (name, contents) beside it (rule files named in `config` resolve
    /// there). Returns once `/-/ready` answers 200 and the server on the
    /// port is this one (its TSDB path is our directory).
    pub fn start(config: &str, files: &[(&str, &str)]) -> Prometheus {
        let dir = temp_dir("prometheus");
        let config_file = dir.path().join("prometheus.yml");
        std::fs::write(&config_file, config).expect("write prometheus.yml");
        for (name, contents) in files {
            std::fs::write(dir.path().join(name), contents)
                .unwrap_or_else(|e| panic!("write {name}: {e}"));
        }
        let data = dir.path().join("data");
        let log = dir.path().join("prometheus.log");
        for _ in 0..PORT_ATTEMPTS {
            let addr = loopback(free_port());
            let mut cmd = Command::new(PROMETHEUS_BIN);
            cmd.arg(format!("--config.file={}", config_file.display()))
                .arg(format!("--storage.tsdb.path={}", data.display()))
                .arg(format!("--web.listen-address={addr}"))
                .arg("--storage.tsdb.retention.time=1h")
                .current_dir(dir.path());
            let tsdb = format!("\"{}\"", data.display());
            let ready = |_pid: u32| {
                matches!(blocking_get(addr, "/-/ready"), Some((200, _)))
                    && blocking_get(addr, "/api/v1/status/flags")
                        .is_some_and(|(code, body)| code == 200 && body.contains(&tsdb))
            };
            match Server::spawn("prometheus", &mut cmd, &log, Signal::SIGTERM, ready) {
                Some(server) => return Prometheus { addr, server, dir },
                None => continue,
            }
        }
        panic!(
            "prometheus: every port tried was taken; log:\n{}",
            read_log(&log)
        );
    }

    /// Everything Prometheus logged so far.
    pub fn log(&self) -> String {
        read_log(&self.dir.path().join("prometheus.log"))
    }

    /// The server's PID.
    pub fn pid(&self) -> Option<u32> {
        self.server.pid()
    }

    /// Its temporary directory (configuration, rules, TSDB, log).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        // The fields drop after this: the server stops, then its directory goes.
        if std::thread::panicking() {
            eprintln!("---- prometheus log ----\n{}", self.log());
        }
    }
}

/// An HTTP/1.0 GET (so the answer is never chunked) bounded by
/// [`PROBE_DEADLINE`]: the status and body, or `None` on any failure.
pub fn blocking_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    use std::io::Write as _;
    let mut s = std::net::TcpStream::connect_timeout(&addr, PROBE_DEADLINE).ok()?;
    s.set_read_timeout(Some(PROBE_DEADLINE)).ok()?;
    s.set_write_timeout(Some(PROBE_DEADLINE)).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).ok()?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n")?;
    let code = head.split(' ').nth(1)?.parse().ok()?;
    Some((code, body.to_owned()))
}
