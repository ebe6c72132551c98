//! The access log: one line per client connection at its end (per request
//! on `protocol: http` listeners, with its method, path and status), as
//! JSON or logfmt, to a file or stdout.
//!
//! The data path never waits for it: a line is formatted where the
//! connection ends and handed to a bounded queue; a thread of its own writes
//! the queue out. When the disk cannot keep up and the queue is full, lines
//! are dropped and counted (`sluice_access_log_dropped_total`) rather than
//! held. SIGUSR1 reopens the file (after logrotate has moved it).

use std::fmt::Write as _;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::time::{Duration, SystemTime};

use prometheus::IntCounter;

/// Lines waiting for the writer at most.
const QUEUE: usize = 16_384;

/// Where the lines go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// Standard output.
    Stdout,
    /// A file, appended to.
    File(PathBuf),
}

/// How a line is written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// One JSON object a line.
    Json,
    /// `key=value` pairs.
    Logfmt,
}

/// The `access_log` section.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    /// Where.
    pub target: Target,
    /// How.
    pub format: Format,
}

/// How a connection ended: a small fixed set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cause {
    /// The client finished first (its EOF); the session ended normally.
    ClientClosed,
    /// The backend finished first.
    BackendClosed,
    /// The client's side failed (reset, error).
    ClientError,
    /// The backend's side failed.
    BackendError,
    /// Nothing moved for `idle_timeout`.
    IdleTimeout,
    /// Refused by `allow`/`deny`.
    RefusedAcl,
    /// Refused by `per_source` limits.
    RefusedLimit,
    /// Refused at the listener's `max_connections`.
    RefusedMaxConnections,
    /// No backend could take it (none serving).
    RefusedNoBackend,
    /// A missing, malformed or forged PROXY protocol header.
    RefusedProxyProtocol,
    /// A proxy loop.
    RefusedLoop,
    /// sluice was out of file descriptors.
    RefusedFdLimit,
    /// Refused during the TLS handshake or SNI routing.
    RefusedTls,
    /// Every connect to a backend failed.
    ConnectFailed,
    /// Closed because its backend went down or lost the writes, or traffic
    /// failed back (the pool's session policy).
    ClosedFailover,
    /// Closed by an operator's maintenance.
    ClosedAdmin,
    /// Cut at shutdown (`shutdown_timeout`).
    ClosedShutdown,
    /// HTTP: the request was answered (by a backend or by sluice itself:
    /// a redirect, a 404 without a route); `status` tells which.
    Completed,
    /// HTTP: the backend did not answer within `backend_timeout` (504).
    BackendTimeout,
}

impl Cause {
    /// The name in the log.
    pub fn as_str(self) -> &'static str {
        match self {
            Cause::ClientClosed => "client_closed",
            Cause::BackendClosed => "backend_closed",
            Cause::ClientError => "client_error",
            Cause::BackendError => "backend_error",
            Cause::IdleTimeout => "idle_timeout",
            Cause::RefusedAcl => "refused_acl",
            Cause::RefusedLimit => "refused_limit",
            Cause::RefusedMaxConnections => "refused_max_connections",
            Cause::RefusedNoBackend => "refused_no_backend",
            Cause::RefusedProxyProtocol => "refused_proxy_protocol",
            Cause::RefusedLoop => "refused_loop",
            Cause::RefusedFdLimit => "refused_fd_limit",
            Cause::RefusedTls => "refused_tls",
            Cause::ConnectFailed => "connect_failed",
            Cause::ClosedFailover => "closed_failover",
            Cause::ClosedAdmin => "closed_admin",
            Cause::ClosedShutdown => "closed_shutdown",
            Cause::Completed => "completed",
            Cause::BackendTimeout => "backend_timeout",
        }
    }
}

/// One connection's line, filled in as it goes.
#[derive(Clone, Debug)]
pub struct Record {
    /// When it was accepted.
    pub start: SystemTime,
    /// The listener.
    pub listener: Arc<str>,
    /// The client (the real one when a trusted proxy told it).
    pub client: Option<SocketAddr>,
    /// The pool it was for.
    pub pool: Option<Arc<str>>,
    /// The backend it reached.
    pub backend: Option<Arc<str>>,
    /// Time to connect to that backend.
    pub connect: Option<Duration>,
    /// Backend connects tried.
    pub attempts: u32,
    /// Bytes client to backend.
    pub bytes_in: u64,
    /// Bytes backend to client.
    pub bytes_out: u64,
    /// How it ended.
    pub cause: Cause,
    /// An HTTP request's own fields (`protocol: http` listeners).
    pub http: Option<Box<HttpFields>>,
}

/// What an access-log line of an HTTP request adds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpFields {
    /// The method, at most [`MAX_METHOD`] bytes.
    pub method: String,
    /// The path without its query (which often carries tokens), at most
    /// [`MAX_PATH`] bytes.
    pub path: String,
    /// The status sent to the client (499: it went away first).
    pub status: u16,
}

/// The longest method logged.
pub const MAX_METHOD: usize = 16;
/// The longest path logged.
pub const MAX_PATH: usize = 1024;

impl HttpFields {
    /// The fields of a request `method path?query` answered `status`.
    pub fn new(method: &str, target: &str, status: u16) -> HttpFields {
        let path = target.split(['?', '#']).next().unwrap_or("");
        HttpFields {
            method: truncate(method, MAX_METHOD).to_string(),
            path: truncate(path, MAX_PATH).to_string(),
            status,
        }
    }
}

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// A logfmt value: bare when it is plain, else quoted with escapes.
fn logfmt_value(v: &str) -> String {
    if !v.is_empty()
        && v.bytes()
            .all(|b| b.is_ascii_graphic() && b != b'"' && b != b'=' && b != b'\\')
    {
        v.to_string()
    } else {
        format!("{v:?}")
    }
}

impl Record {
    /// A record for a client of `listener` accepted now.
    pub fn new(listener: Arc<str>) -> Record {
        Record {
            start: SystemTime::now(),
            listener,
            client: None,
            pool: None,
            backend: None,
            connect: None,
            attempts: 0,
            bytes_in: 0,
            bytes_out: 0,
            cause: Cause::ClientClosed,
            http: None,
        }
    }

    /// The line, ending in a newline.
    pub fn line(&self, format: Format) -> String {
        let time = humantime::format_rfc3339_millis(self.start);
        let duration_ms = SystemTime::now()
            .duration_since(self.start)
            .unwrap_or_default()
            .as_secs_f64()
            * 1000.0;
        let client = self.client.map(|c| c.to_string());
        let connect_ms = self.connect.map(|c| c.as_secs_f64() * 1000.0);
        let mut out = String::with_capacity(256);
        match format {
            Format::Json => {
                let v = serde_json::json!({
                    "time": time.to_string(),
                    "listener": &*self.listener,
                    "client": client,
                    "pool": self.pool.as_deref(),
                    "backend": self.backend.as_deref(),
                    "connect_ms": connect_ms.map(round3),
                    "duration_ms": round3(duration_ms),
                    "bytes_in": self.bytes_in,
                    "bytes_out": self.bytes_out,
                    "attempts": self.attempts,
                    "cause": self.cause.as_str(),
                });
                let mut v = v;
                if let (Some(h), Some(map)) = (&self.http, v.as_object_mut()) {
                    map.insert("method".into(), h.method.clone().into());
                    map.insert("path".into(), h.path.clone().into());
                    map.insert("status".into(), h.status.into());
                }
                out.push_str(&v.to_string());
            }
            Format::Logfmt => {
                let opt = |s: Option<&str>| s.map_or("-".to_string(), str::to_string);
                let _ = write!(
                    out,
                    "time={time} listener={} client={} pool={} backend={} connect_ms={} duration_ms={:.3} bytes_in={} bytes_out={} attempts={} cause={}",
                    self.listener,
                    opt(client.as_deref()),
                    opt(self.pool.as_deref()),
                    opt(self.backend.as_deref()),
                    connect_ms.map_or("-".to_string(), |c| format!("{c:.3}")),
                    duration_ms,
                    self.bytes_in,
                    self.bytes_out,
                    self.attempts,
                    self.cause.as_str(),
                );
                if let Some(h) = &self.http {
                    let _ = write!(
                        out,
                        " method={} path={} status={}",
                        logfmt_value(&h.method),
                        logfmt_value(&h.path),
                        h.status
                    );
                }
            }
        }
        out.push('\n');
        out
    }
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// The access log of the process.
pub struct AccessLog {
    format: Format,
    queue: SyncSender<String>,
    dropped: IntCounter,
    reopen: Arc<AtomicBool>,
}

impl AccessLog {
    /// Open `settings`' target and start its writer thread; `dropped`
    /// counts the lines the writer could not keep up with.
    pub fn start(settings: &Settings, dropped: IntCounter) -> io::Result<Arc<AccessLog>> {
        let out = open(&settings.target)?;
        let (queue, lines) = sync_channel(QUEUE);
        let reopen = Arc::new(AtomicBool::new(false));
        let writer = Writer {
            target: settings.target.clone(),
            out,
            reopen: Arc::clone(&reopen),
        };
        std::thread::Builder::new()
            .name("sluice-access-log".to_string())
            .spawn(move || writer.run(lines))?;
        Ok(Arc::new(AccessLog {
            format: settings.format,
            queue,
            dropped,
            reopen,
        }))
    }

    /// Log `record`; never waits.
    pub fn log(&self, record: &Record) {
        match self.queue.try_send(record.line(self.format)) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => self.dropped.inc(),
        }
    }

    /// Reopen the file before the next line (SIGUSR1, after a rotation).
    pub fn reopen(&self) {
        self.reopen.store(true, Relaxed);
        // Wake the writer even if nothing else is logged.
        let _ = self.queue.try_send(String::new());
    }
}

enum Out {
    Stdout(io::Stdout),
    File(io::BufWriter<File>),
}

fn open(target: &Target) -> io::Result<Out> {
    Ok(match target {
        Target::Stdout => Out::Stdout(io::stdout()),
        Target::File(path) => Out::File(io::BufWriter::with_capacity(
            64 * 1024,
            OpenOptions::new().create(true).append(true).open(path)?,
        )),
    })
}

struct Writer {
    target: Target,
    out: Out,
    reopen: Arc<AtomicBool>,
}

impl Writer {
    fn run(mut self, lines: Receiver<String>) {
        while let Ok(first) = lines.recv() {
            self.maybe_reopen();
            self.write(&first);
            // Whatever else is waiting, then one flush.
            for line in lines.try_iter() {
                self.write(&line);
            }
            let _ = match &mut self.out {
                Out::Stdout(s) => s.flush(),
                Out::File(f) => f.flush(),
            };
        }
    }

    fn write(&mut self, line: &str) {
        if line.is_empty() {
            return;
        }
        let result = match &mut self.out {
            Out::Stdout(s) => s.write_all(line.as_bytes()),
            Out::File(f) => f.write_all(line.as_bytes()),
        };
        if let Err(e) = result {
            log::warn!("access log: cannot write: {e}");
        }
    }

    fn maybe_reopen(&mut self) {
        if !self.reopen.swap(false, Relaxed) {
            return;
        }
        if let Out::File(f) = &mut self.out {
            let _ = f.flush();
        }
        match open(&self.target) {
            Ok(out) => {
                self.out = out;
                log::info!("access log reopened");
            }
            Err(e) => log::error!("access log: cannot reopen: {e}; writing on to the old file"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_formats_carry_every_field() {
        let mut r = Record::new(Arc::from("web"));
        r.client = Some("192.0.2.1:40000".parse().unwrap());
        r.pool = Some(Arc::from("app"));
        r.backend = Some(Arc::from("10.0.0.1:80"));
        r.connect = Some(Duration::from_micros(1500));
        r.attempts = 2;
        r.bytes_in = 10;
        r.bytes_out = 20;
        r.cause = Cause::BackendClosed;
        let j: serde_json::Value = serde_json::from_str(r.line(Format::Json).trim()).unwrap();
        assert_eq!(j["client"], "192.0.2.1:40000");
        assert_eq!(j["backend"], "10.0.0.1:80");
        assert_eq!(j["connect_ms"], 1.5);
        assert_eq!(j["cause"], "backend_closed");
        assert_eq!(j["attempts"], 2);
        assert!(j["time"].as_str().unwrap().ends_with('Z'));
        let l = r.line(Format::Logfmt);
        for part in [
            "listener=web",
            "client=192.0.2.1:40000",
            "pool=app",
            "backend=10.0.0.1:80",
            "connect_ms=1.500",
            "bytes_in=10",
            "bytes_out=20",
            "attempts=2",
            "cause=backend_closed",
        ] {
            assert!(l.contains(part), "{part} in {l}");
        }
        let refused = Record::new(Arc::from("web")).line(Format::Logfmt);
        assert!(refused.contains("backend=- connect_ms=-"), "{refused}");
    }
}
