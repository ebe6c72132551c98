//! The access log: one line per client connection at its end (per request
//! on `protocol: http` listeners, with its method, path and status), as
//! JSON or logfmt, to a file or stdout.
//!
//! The data path never waits for it, and does little for it: where a
//! connection ends, its record (a few counters and shared names) goes to a
//! bounded queue; a thread of its own formats and writes the queue out. That
//! thread takes what is waiting, writes it in one go, then pauses
//! [`BATCH_PAUSE`] before it looks again, so a busy balancer wakes it a few
//! dozen times a second rather than once per connection (a wake-up is a
//! system call on the data path). When the disk cannot keep up and the
//! queue is full, lines are dropped and counted
//! (`sluice_access_log_dropped_total`) rather than held. SIGUSR1 reopens
//! the file (after logrotate has moved it); at exit the queue is flushed.

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

/// How long the writer rests after writing a batch: lines wait at most this
/// long (plus the write), and with [`QUEUE`] the log takes up to ~1.6 million
/// lines a second before it drops any.
pub const BATCH_PAUSE: Duration = Duration::from_millis(10);

/// What the writer thread is sent.
enum Message {
    /// A finished connection (or request) and when it ended.
    Line(Box<Record>, SystemTime),
    /// Wake up (a reopen is flagged).
    Wake,
    /// Write out everything before this, then say so.
    Flush(std::sync::mpsc::Sender<()>),
}

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

    /// The line of a connection that ends now, ending in a newline.
    pub fn line(&self, format: Format) -> String {
        self.line_at(format, SystemTime::now())
    }

    /// The line of a connection that ended at `ended`, ending in a newline.
    pub fn line_at(&self, format: Format, ended: SystemTime) -> String {
        let time = humantime::format_rfc3339_millis(self.start);
        let duration = ended.duration_since(self.start).unwrap_or_default();
        let mut out = String::with_capacity(256);
        match format {
            Format::Json => {
                // Written field by field: no map of values per line (this
                // runs for every connection). Strings that need no escaping
                // (the usual case) go as they are.
                let _ = write!(out, "{{\"time\":\"{time}\",\"listener\":");
                json_str(&mut out, &self.listener);
                out.push_str(",\"client\":");
                match self.client {
                    Some(c) => {
                        let _ = write!(out, "\"{c}\"");
                    }
                    None => out.push_str("null"),
                }
                out.push_str(",\"pool\":");
                json_opt(&mut out, self.pool.as_deref());
                out.push_str(",\"backend\":");
                json_opt(&mut out, self.backend.as_deref());
                out.push_str(",\"connect_ms\":");
                match self.connect {
                    Some(c) => millis(&mut out, c),
                    None => out.push_str("null"),
                }
                out.push_str(",\"duration_ms\":");
                millis(&mut out, duration);
                let _ = write!(
                    out,
                    ",\"bytes_in\":{},\"bytes_out\":{},\"attempts\":{},\"cause\":\"{}\"",
                    self.bytes_in,
                    self.bytes_out,
                    self.attempts,
                    self.cause.as_str()
                );
                if let Some(h) = &self.http {
                    out.push_str(",\"method\":");
                    json_str(&mut out, &h.method);
                    out.push_str(",\"path\":");
                    json_str(&mut out, &h.path);
                    let _ = write!(out, ",\"status\":{}", h.status);
                }
                out.push('}');
            }
            Format::Logfmt => {
                let client = self.client.map(|c| c.to_string());
                let opt = |s: Option<&str>| s.map_or("-".to_string(), str::to_string);
                let ms = |d: Duration| {
                    let mut s = String::with_capacity(12);
                    millis(&mut s, d);
                    s
                };
                let _ = write!(
                    out,
                    "time={time} listener={} client={} pool={} backend={} connect_ms={} duration_ms={} bytes_in={} bytes_out={} attempts={} cause={}",
                    self.listener,
                    opt(client.as_deref()),
                    opt(self.pool.as_deref()),
                    opt(self.backend.as_deref()),
                    self.connect.map_or("-".to_string(), ms),
                    ms(duration),
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

/// `d` in milliseconds with three decimals (integer arithmetic: float
/// formatting is the dearest part of a line).
fn millis(out: &mut String, d: Duration) {
    let micros = d.as_micros();
    let _ = write!(out, "{}.{:03}", micros / 1000, micros % 1000);
}

/// `s` as a JSON string.
fn json_str(out: &mut String, s: &str) {
    if s.bytes()
        .all(|b| b >= 0x20 && b != b'"' && b != b'\\' && b != 0x7f)
    {
        out.push('"');
        out.push_str(s);
        out.push('"');
    } else {
        out.push_str(&serde_json::Value::from(s).to_string());
    }
}

/// `s` as a JSON string, or `null`.
fn json_opt(out: &mut String, s: Option<&str>) {
    match s {
        Some(s) => json_str(out, s),
        None => out.push_str("null"),
    }
}

/// The access log of the process.
pub struct AccessLog {
    queue: SyncSender<Message>,
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
            format: settings.format,
            out,
            reopen: Arc::clone(&reopen),
        };
        std::thread::Builder::new()
            .name("sluice-access-log".to_string())
            .spawn(move || writer.run(lines))?;
        Ok(Arc::new(AccessLog {
            queue,
            dropped,
            reopen,
        }))
    }

    /// Log `record`; never waits.
    pub fn log(&self, record: &Record) {
        let line = Message::Line(Box::new(record.clone()), SystemTime::now());
        match self.queue.try_send(line) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => self.dropped.inc(),
        }
    }

    /// Reopen the file before the next line (SIGUSR1, after a rotation).
    pub fn reopen(&self) {
        self.reopen.store(true, Relaxed);
        // Wake the writer even if nothing else is logged.
        let _ = self.queue.try_send(Message::Wake);
    }

    /// Write out every line logged so far, waiting at most `limit` (at exit).
    /// Whether it was done in time.
    pub fn flush(&self, limit: Duration) -> bool {
        let deadline = std::time::Instant::now() + limit;
        let (done, wait) = std::sync::mpsc::channel();
        // A full queue: wait for room, but never past the limit (a writer
        // stuck on a stdout nobody reads must not keep the process alive).
        let mut request = Message::Flush(done);
        loop {
            match self.queue.try_send(request) {
                Ok(()) => break,
                Err(TrySendError::Disconnected(_)) => return false,
                Err(TrySendError::Full(back)) => {
                    if std::time::Instant::now() >= deadline {
                        return false;
                    }
                    request = back;
                    std::thread::sleep(BATCH_PAUSE);
                }
            }
        }
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        wait.recv_timeout(left).is_ok()
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
    format: Format,
    out: Out,
    reopen: Arc<AtomicBool>,
}

impl Writer {
    fn run(mut self, lines: Receiver<Message>) {
        while let Ok(first) = lines.recv() {
            self.maybe_reopen();
            let mut flushed = Vec::new();
            // Whatever else is waiting, then one write to the file.
            for message in std::iter::once(first).chain(lines.try_iter()) {
                match message {
                    Message::Line(record, ended) => {
                        let line = record.line_at(self.format, ended);
                        self.write(&line);
                    }
                    Message::Wake => {}
                    Message::Flush(done) => flushed.push(done),
                }
            }
            let _ = match &mut self.out {
                Out::Stdout(s) => s.flush(),
                Out::File(f) => f.flush(),
            };
            for done in flushed {
                let _ = done.send(());
            }
            std::thread::sleep(BATCH_PAUSE);
        }
    }

    fn write(&mut self, line: &str) {
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

    #[test]
    fn flush_writes_every_line_logged_before_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("access.log");
        let settings = Settings {
            target: Target::File(path.clone()),
            format: Format::Json,
        };
        let dropped = IntCounter::new("dropped", "test").unwrap();
        let log = AccessLog::start(&settings, dropped.clone()).unwrap();
        for _ in 0..1000 {
            log.log(&Record::new(Arc::from("web")));
        }
        assert!(log.flush(Duration::from_secs(10)));
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(
            text.lines().count() as u64 + dropped.get(),
            1000,
            "every line is written or counted as dropped"
        );
        assert_eq!(dropped.get(), 0);
    }

    #[test]
    fn json_lines_escape_what_needs_it_and_say_null_for_what_is_missing() {
        let mut r = Record::new(Arc::from("we\"b"));
        r.http = Some(Box::new(HttpFields::new(
            "GET",
            "/a\"b\\c\n\u{1}é?token=x",
            200,
        )));
        let line = r.line(Format::Json);
        assert!(line.ends_with("}\n"), "{line}");
        let j: serde_json::Value = serde_json::from_str(line.trim()).unwrap();
        assert_eq!(j["listener"], "we\"b");
        assert_eq!(j["path"], "/a\"b\\c\n\u{1}é");
        assert_eq!(j["status"], 200);
        for missing in ["client", "pool", "backend", "connect_ms"] {
            assert!(j[missing].is_null(), "{missing} in {line}");
        }
        assert_eq!(j["cause"], "client_closed");
        assert!(j["duration_ms"].as_f64().is_some(), "{line}");
    }
}
