//! Shared fixtures for the integration tests: a sluice process, backends on
//! 127.0.0.1, port reservation, polling with deadlines and metric scraping.
//!
//! Every test starts the real `sluice` binary with a generated YAML file and
//! talks to it over real sockets. Backends are tokio tasks in the test.

#![allow(dead_code)]

use std::collections::HashMap;
use std::io::Write as _;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// How long any state may take to appear before a test fails.
pub const DEADLINE: Duration = Duration::from_secs(15);

/// Poll `cond` every 20 ms until it holds; panic with `what` after `DEADLINE`.
pub async fn wait_until<F, Fut>(what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while !cond().await {
        assert!(start.elapsed() < DEADLINE, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A port for sluice to listen on. It comes from below the kernel's
/// ephemeral range (where backends bound to port 0 land), offset by process
/// id so parallel test processes rarely meet, and is probed before use.
pub fn reserve_port() -> u16 {
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let base = 20_000 + (std::process::id() % 400) as u16 * 30;
    loop {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = 20_000 + (base - 20_000 + n * 7) % 12_000;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// A configuration with the admin listener and one listener, `front` on
/// 127.0.0.1:`port`, forwarding to pool `app`. `listener` is appended to the
/// listener's settings (`", idle_timeout: 1s"`); `pool` holds the pool's keys,
/// one per line, unindented.
pub fn front_to_app(port: u16, listener: &str, pool: &str) -> String {
    let body: String = pool.lines().map(|l| format!("    {l}\n")).collect();
    format!(
        "admin: {{ bind: '{{admin}}' }}\n\
         listeners: {{ front: {{ bind: 127.0.0.1:{port}, pool: app{listener} }} }}\n\
         pools:\n  app:\n{body}"
    )
}

/// A running sluice process; killed when dropped.
pub struct Sluice {
    child: Mutex<Child>,
    /// The admin listener.
    pub admin: SocketAddr,
    log: Arc<Mutex<String>>,
    _dir: tempfile::TempDir,
    /// The configuration file it runs with.
    pub config_path: std::path::PathBuf,
}

impl Sluice {
    /// Start sluice with `yaml`, which must contain `{admin}` where the admin
    /// bind address goes; does not wait for readiness.
    pub fn spawn(yaml: &str) -> Sluice {
        let admin: SocketAddr = format!("127.0.0.1:{}", reserve_port()).parse().unwrap();
        let yaml = yaml.replace("{admin}", &admin.to_string());
        let dir = tempfile::tempdir().unwrap();
        let config_path = dir.path().join("sluice.yaml");
        std::fs::write(&config_path, &yaml).unwrap();
        Sluice::launch(admin, dir, config_path, &[], None)
    }

    /// Start another sluice on the same configuration file and admin
    /// address, with extra flags (`-u` for an upgrade).
    pub fn spawn_next(&self, flags: &[&str]) -> Sluice {
        let dir = tempfile::tempdir().unwrap();
        let config_path = dir.path().join("sluice.yaml");
        std::fs::copy(&self.config_path, &config_path).unwrap();
        Sluice::launch(self.admin, dir, config_path, flags, None)
    }

    /// Start sluice with at most `fds` open file descriptors.
    pub fn spawn_with_fd_limit(yaml: &str, fds: u32) -> Sluice {
        let admin: SocketAddr = format!("127.0.0.1:{}", reserve_port()).parse().unwrap();
        let yaml = yaml.replace("{admin}", &admin.to_string());
        let dir = tempfile::tempdir().unwrap();
        let config_path = dir.path().join("sluice.yaml");
        std::fs::write(&config_path, &yaml).unwrap();
        Sluice::launch(admin, dir, config_path, &[], Some(fds))
    }

    /// Start sluice with `yaml` and extra environment variables (they win
    /// over the defaults, `RUST_LOG` included); does not wait for readiness.
    pub fn spawn_with_env(yaml: &str, env: &[(&str, &str)]) -> Sluice {
        let admin: SocketAddr = format!("127.0.0.1:{}", reserve_port()).parse().unwrap();
        let yaml = yaml.replace("{admin}", &admin.to_string());
        let dir = tempfile::tempdir().unwrap();
        let config_path = dir.path().join("sluice.yaml");
        std::fs::write(&config_path, &yaml).unwrap();
        Sluice::launch_with(admin, dir, config_path, &[], None, env)
    }

    fn launch(
        admin: SocketAddr,
        dir: tempfile::TempDir,
        config_path: std::path::PathBuf,
        flags: &[&str],
        fd_limit: Option<u32>,
    ) -> Sluice {
        Sluice::launch_with(admin, dir, config_path, flags, fd_limit, &[])
    }

    fn launch_with(
        admin: SocketAddr,
        dir: tempfile::TempDir,
        config_path: std::path::PathBuf,
        flags: &[&str],
        fd_limit: Option<u32>,
        env: &[(&str, &str)],
    ) -> Sluice {
        let bin = env!("CARGO_BIN_EXE_sluice");
        let mut command = match fd_limit {
            // The shell lowers the limit, then becomes sluice (same PID).
            Some(n) => {
                let mut c = Command::new("sh");
                c.arg("-c")
                    .arg(format!("ulimit -n {n} && exec \"$0\" \"$@\""))
                    .arg(bin);
                c
            }
            None => Command::new(bin),
        };
        let mut child = command
            .args(flags)
            .arg("-c")
            .arg(&config_path)
            .env("RUST_LOG", "info,sluice=debug")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start sluice");
        let log = Arc::new(Mutex::new(String::new()));
        let stderr = child.stderr.take().unwrap();
        let sink = Arc::clone(&log);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let mut l = sink.lock().unwrap();
                l.push_str(&line);
                l.push('\n');
            }
        });
        Sluice {
            child: Mutex::new(child),
            admin,
            log,
            _dir: dir,
            config_path,
        }
    }

    /// Replace the configuration file (for a reload); `{admin}` is filled in.
    pub fn rewrite_config(&self, yaml: &str) {
        let yaml = yaml.replace("{admin}", &self.admin.to_string());
        std::fs::write(&self.config_path, yaml).unwrap();
    }

    /// `POST /api/v1/reload`: the status and the JSON body.
    pub async fn reload(&self) -> (u16, serde_json::Value) {
        let (status, body) = http_request(self.admin, "POST", "/api/v1/reload")
            .await
            .expect("POST /api/v1/reload");
        (
            status,
            serde_json::from_str(&body).unwrap_or(serde_json::Value::Null),
        )
    }

    /// Open file descriptors of the process.
    pub fn open_fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    /// Resident memory of the process, in KiB.
    pub fn rss_kib(&self) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("VmRSS:"))
                    .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
            })
            .unwrap_or(0)
    }

    /// Start sluice and wait until `/readyz` answers 200.
    pub async fn start(yaml: &str) -> Sluice {
        let s = Sluice::spawn(yaml);
        s.wait_ready().await;
        s
    }

    /// Wait until `/readyz` answers 200.
    pub async fn wait_ready(&self) {
        let start = Instant::now();
        loop {
            if let Ok((200, _)) = http_get(self.admin, "/readyz").await {
                return;
            }
            if let Some(status) = self.try_wait() {
                panic!(
                    "sluice exited ({status}) before it was ready; log:\n{}",
                    self.log()
                );
            }
            assert!(
                start.elapsed() < DEADLINE,
                "sluice did not become ready; log:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Everything sluice wrote to stderr so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Wait until the log contains `needle`.
    pub async fn wait_log(&self, needle: &str) {
        wait_until(&format!("log line `{needle}`"), || async {
            self.log().contains(needle)
        })
        .await;
    }

    /// With a `fast_path: sockmap` listener: wait for sluice's verdict on
    /// this kernel; whether it relays in the kernel. Says loudly when not.
    pub async fn fast_path_verdict(&self) -> bool {
        const PASSED: &str = "fast_path: sockmap passed its checks";
        const REFUSED: &str = "fast_path: sockmap is not used on this machine";
        wait_until("the fast path's verdict", || async {
            let log = self.log();
            log.contains(PASSED) || log.contains(REFUSED)
        })
        .await;
        let log = self.log();
        if log.contains(PASSED) {
            return true;
        }
        let line = log.lines().find(|l| l.contains(REFUSED)).unwrap_or(REFUSED);
        // Straight to stderr: the test harness hides eprintln! of passing tests.
        let _ = writeln!(
            std::io::stderr(),
            "WARNING: fast_path: sockmap NOT TESTED here (sluice fell back): {line}"
        );
        false
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.lock().unwrap().id()
    }

    /// Send `sig` to this sluice process.
    pub fn signal(&self, sig: Signal) {
        kill(Pid::from_raw(self.pid() as i32), sig).unwrap();
    }

    /// The exit status, if it has exited.
    pub fn try_wait(&self) -> Option<ExitStatus> {
        self.child.lock().unwrap().try_wait().unwrap()
    }

    /// Wait for the process to exit, failing after `limit`.
    pub async fn wait_exit(&self, limit: Duration) -> ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(status) = self.try_wait() {
                return status;
            }
            assert!(
                start.elapsed() < limit,
                "sluice did not exit within {limit:?}; log:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Scrape `/metrics`.
    pub async fn metrics(&self) -> Scrape {
        let (status, body) = http_get(self.admin, "/metrics")
            .await
            .expect("scrape /metrics");
        assert_eq!(status, 200);
        Scrape::parse(&body)
    }

    /// `GET /api/v1/pools`, parsed.
    pub async fn pools(&self) -> serde_json::Value {
        let (status, body) = http_get(self.admin, "/api/v1/pools")
            .await
            .expect("GET /api/v1/pools");
        assert_eq!(status, 200);
        serde_json::from_str(&body).unwrap()
    }

    /// The `active` flags of `pool`'s backends, by configured address.
    pub async fn active_backends(&self, pool: &str) -> Vec<String> {
        let v = self.pools().await;
        v["pools"][pool]["backends"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|b| b["active"].as_bool() == Some(true))
            .map(|b| b["address"].as_str().unwrap().to_string())
            .collect()
    }

    /// Wait until exactly `want` are the active backends of `pool`.
    pub async fn wait_active(&self, pool: &str, want: &[SocketAddr]) {
        let mut want: Vec<String> = want.iter().map(ToString::to_string).collect();
        want.sort();
        wait_until(&format!("pool {pool} active = {want:?}"), || async {
            let mut got = self.active_backends(pool).await;
            got.sort();
            got == want
        })
        .await;
    }

    /// The health state (`up`, `down`, `unknown`) of backend `addr` in `pool`.
    pub async fn backend_state(&self, pool: &str, addr: SocketAddr) -> String {
        let v = self.pools().await;
        v["pools"][pool]["backends"]
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["address"] == addr.to_string())
            .map(|b| b["state"].as_str().unwrap().to_string())
            .unwrap()
    }
}

impl Drop for Sluice {
    fn drop(&mut self) {
        let child = self.child.get_mut().unwrap_or_else(|p| p.into_inner());
        if child.try_wait().ok().flatten().is_none() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!("---- sluice log ----\n{}", self.log());
        }
    }
}

/// A minimal HTTP/1.1 GET; returns status and body.
pub async fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    http_request(addr, "GET", path).await
}

/// A minimal HTTP/1.1 request; returns status and body.
pub async fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(
        format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut raw))
        .await
        .map_err(|_| std::io::Error::other("admin did not answer"))??;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad response: {text:?}")))?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// `name{b="2",a="1"}` as `name{a="1",b="2"}`, so lookups ignore label order.
/// (Label values here never contain `",`.)
fn normalize(series: &str) -> String {
    let Some((name, rest)) = series.split_once('{') else {
        return series.to_string();
    };
    let inner = rest.trim_end_matches('}');
    let mut pairs: Vec<String> = inner
        .split("\",")
        .filter(|p| !p.is_empty())
        .map(|p| {
            if p.ends_with('"') {
                p.to_string()
            } else {
                format!("{p}\"")
            }
        })
        .collect();
    pairs.sort();
    format!("{name}{{{}}}", pairs.join(","))
}

/// A parsed `/metrics` scrape.
pub struct Scrape {
    /// The raw text.
    pub text: String,
    samples: HashMap<String, f64>,
}

impl Scrape {
    fn parse(text: &str) -> Scrape {
        let samples = text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .filter_map(|l| {
                let (series, value) = l.rsplit_once(' ')?;
                Some((normalize(series), value.parse().ok()?))
            })
            .collect();
        Scrape {
            text: text.to_string(),
            samples,
        }
    }

    /// The value of `name` with exactly `labels`, if present.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let mut sorted = labels.to_vec();
        sorted.sort();
        let series = if sorted.is_empty() {
            name.to_string()
        } else {
            let l: Vec<String> = sorted.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
            format!("{name}{{{}}}", l.join(","))
        };
        self.samples.get(&series).copied()
    }

    /// The value of `name` with `labels`; panics when absent.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels)
            .unwrap_or_else(|| panic!("no series {name} {labels:?} in:\n{}", self.text))
    }
}

/// What a test backend does with each connection.
#[derive(Clone, Copy, Debug)]
pub enum Behavior {
    /// Write its name and a newline, then close.
    Name,
    /// Echo everything until the client half-closes, then half-close.
    Echo,
    /// Write its name, then a 1 KiB chunk every 10 ms until killed.
    Stream,
    /// Read everything and never answer.
    Silent,
}

/// A backend on 127.0.0.1 that can be stopped and restarted on its port.
pub struct Backend {
    /// Its address.
    pub addr: SocketAddr,
    name: String,
    behavior: Behavior,
    task: Option<JoinHandle<()>>,
    /// Connections accepted (health checks included).
    pub accepted: Arc<AtomicUsize>,
    conns: Arc<Mutex<tokio::task::JoinSet<()>>>,
}

impl Backend {
    /// Start a backend on a new port.
    pub async fn start(name: &str, behavior: Behavior) -> Backend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut b = Backend {
            addr: listener.local_addr().unwrap(),
            name: name.to_string(),
            behavior,
            task: None,
            accepted: Arc::new(AtomicUsize::new(0)),
            conns: Arc::new(Mutex::new(tokio::task::JoinSet::new())),
        };
        b.serve(listener);
        b
    }

    fn serve(&mut self, listener: TcpListener) {
        let (name, behavior, accepted) =
            (self.name.clone(), self.behavior, Arc::clone(&self.accepted));
        let conns = Arc::clone(&self.conns);
        self.task = Some(tokio::spawn(async move {
            loop {
                let Ok((mut sock, _)) = listener.accept().await else {
                    continue;
                };
                accepted.fetch_add(1, Ordering::Relaxed);
                let name = name.clone();
                let mut set = conns.lock().unwrap();
                while set.try_join_next().is_some() {}
                set.spawn(async move {
                    match behavior {
                        Behavior::Name => {
                            let _ = sock.write_all(format!("{name}\n").as_bytes()).await;
                            let _ = sock.shutdown().await;
                        }
                        Behavior::Echo => {
                            let (mut r, mut w) = sock.split();
                            let _ = tokio::io::copy(&mut r, &mut w).await;
                            let _ = w.shutdown().await;
                        }
                        Behavior::Stream => {
                            if sock
                                .write_all(format!("{name}\n").as_bytes())
                                .await
                                .is_err()
                            {
                                return;
                            }
                            let chunk = [b'x'; 1024];
                            while sock.write_all(&chunk).await.is_ok() {
                                tokio::time::sleep(Duration::from_millis(10)).await;
                            }
                        }
                        Behavior::Silent => {
                            let mut sink = [0u8; 4096];
                            while matches!(sock.read(&mut sink).await, Ok(n) if n > 0) {}
                        }
                    }
                });
            }
        }));
    }

    /// Kill it: stop accepting and drop every open connection (as a crashed
    /// process would), then wait until the port refuses connections.
    pub async fn kill(&mut self) {
        self.stop();
        self.conns.lock().unwrap().abort_all();
        let addr = self.addr;
        wait_until("backend port closed", || async move {
            TcpStream::connect(addr).await.is_err()
        })
        .await;
    }

    /// Stop accepting; the port closes once the accept task has ended (see
    /// `stop_and_wait`).
    pub fn stop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }

    /// Wait until the port refuses connections (the accept task is gone).
    pub async fn stop_and_wait(&mut self) {
        self.stop();
        let addr = self.addr;
        wait_until("backend port closed", || async move {
            TcpStream::connect(addr).await.is_err()
        })
        .await;
    }

    /// Listen again on the same port.
    pub async fn restart(&mut self) {
        self.stop();
        let listener = loop {
            match TcpListener::bind(self.addr).await {
                Ok(l) => break l,
                // The aborted task may not have dropped its listener yet.
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        };
        self.serve(listener);
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Connect to `addr` and read until the peer closes; returns what was read.
pub async fn read_all(addr: SocketAddr) -> String {
    let mut s = TcpStream::connect(addr)
        .await
        .expect("connect through sluice");
    let mut out = String::new();
    tokio::time::timeout(DEADLINE, s.read_to_string(&mut out))
        .await
        .expect("the connection ended")
        .expect("read");
    out
}

/// Open `n` connections one after another; count the names received.
pub async fn tally(addr: SocketAddr, n: usize) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for _ in 0..n {
        let name = read_all(addr).await.trim().to_string();
        *counts.entry(name).or_insert(0) += 1;
    }
    counts
}

/// A listener whose accept queue is full, so new connects hang: a backend
/// that never completes the TCP handshake.
pub struct Blackhole {
    /// Its address.
    pub addr: SocketAddr,
    _listener: socket2::Socket,
    _fillers: Vec<std::net::TcpStream>,
}

impl Blackhole {
    /// Create one on 127.0.0.1.
    pub fn new() -> Blackhole {
        Blackhole::at("127.0.0.1:0".parse().unwrap())
    }

    /// Create one on `addr`.
    pub fn at(addr: SocketAddr) -> Blackhole {
        use socket2::{Domain, Socket, Type};
        let l = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        l.set_reuse_address(true).unwrap();
        l.bind(&addr.into()).unwrap();
        l.listen(0).unwrap();
        let addr = l.local_addr().unwrap().as_socket().unwrap();
        // Fill the accept queue until a handshake is dropped by the kernel
        // (a filler that merely took long under load does not count).
        let mut fillers = Vec::new();
        for _ in 0..16 {
            match std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(300)) {
                Ok(s) => fillers.push(s),
                Err(e) if e.kind() == std::io::ErrorKind::TimedOut => break,
                Err(e) => panic!("blackhole filler: {e}"),
            }
        }
        Blackhole {
            addr,
            _listener: l,
            _fillers: fillers,
        }
    }

    /// Whether a connect to it indeed does not complete within `wait`.
    pub fn holds(&self, wait: Duration) -> bool {
        std::net::TcpStream::connect_timeout(&self.addr, wait).is_err()
    }
}

/// What each connection of a [`Load`] exchanges with the backend.
#[derive(Debug, Clone, Copy)]
pub enum Exchange {
    /// Read until the backend closes; expect its name ([`Behavior::Name`]).
    Name,
    /// Send a payload, half-close, expect it back ([`Behavior::Echo`]).
    Echo,
}

/// A bounded load generator: `workers` clients connecting one after another
/// until stopped or `max` connections were made; each connection that does
/// not complete its exchange within 5 s counts as failed.
pub struct Load {
    ok: AtomicUsize,
    failed: AtomicUsize,
    stop: std::sync::atomic::AtomicBool,
    tasks: Mutex<Vec<JoinHandle<Vec<String>>>>,
}

impl Load {
    /// Start the clients against `to`.
    pub fn start(to: SocketAddr, workers: usize, max: usize, exchange: Exchange) -> Arc<Load> {
        let load = Arc::new(Load {
            ok: AtomicUsize::new(0),
            failed: AtomicUsize::new(0),
            stop: std::sync::atomic::AtomicBool::new(false),
            tasks: Mutex::new(Vec::new()),
        });
        let tasks = (0..workers)
            .map(|worker| {
                let load = Arc::clone(&load);
                tokio::spawn(async move {
                    let mut errors = Vec::new();
                    let mut n = 0u64;
                    while !load.stop.load(Ordering::Relaxed) && load.ok() + load.failed() < max {
                        n += 1;
                        let payload = format!("worker {worker} connection {n}\n").repeat(8);
                        let attempt = async {
                            let mut s = TcpStream::connect(to).await?;
                            let mut got = Vec::new();
                            match exchange {
                                Exchange::Name => {
                                    s.read_to_end(&mut got).await?;
                                    Ok::<_, std::io::Error>(!got.is_empty())
                                }
                                Exchange::Echo => {
                                    s.write_all(payload.as_bytes()).await?;
                                    s.shutdown().await?;
                                    s.read_to_end(&mut got).await?;
                                    Ok(got == payload.as_bytes())
                                }
                            }
                        };
                        match tokio::time::timeout(Duration::from_secs(5), attempt).await {
                            Ok(Ok(true)) => {
                                load.ok.fetch_add(1, Ordering::Relaxed);
                            }
                            other => {
                                load.failed.fetch_add(1, Ordering::Relaxed);
                                if errors.len() < 10 {
                                    errors.push(format!("{other:?}"));
                                }
                            }
                        }
                    }
                    errors
                })
            })
            .collect();
        *load.tasks.lock().unwrap() = tasks;
        load
    }

    /// Connections completed so far.
    pub fn ok(&self) -> usize {
        self.ok.load(Ordering::Relaxed)
    }

    /// Connections failed so far.
    pub fn failed(&self) -> usize {
        self.failed.load(Ordering::Relaxed)
    }

    /// Stop the clients; the totals and the first errors.
    pub async fn finish(&self) -> (usize, usize, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        let tasks = std::mem::take(&mut *self.tasks.lock().unwrap());
        let mut errors = Vec::new();
        for t in tasks {
            errors.extend(t.await.unwrap());
        }
        (self.ok(), self.failed(), errors)
    }
}
