//! The admin listener's HTTP/1.1 server: small and bounded, so that no
//! client of the admin port can starve the data path.
//!
//! - One request per connection (`Connection: close`); the request head is
//!   parsed by `httparse`, at most [`MAX_HEAD`] bytes, and must arrive
//!   within [`HEAD_TIMEOUT`]; a request body is never read.
//! - At most [`MAX_CONNECTIONS`] connections at once, so the admin port can
//!   hold only that many descriptors and buffers. When all are taken, the
//!   one that has waited longest for its request head is cut to make room:
//!   slow or idle connections (a slowloris) cannot lock out a scrape.
//! - The listening socket is sluice's own and goes with the other listeners
//!   to a new process on upgrade.

use std::collections::VecDeque;
use std::net::{SocketAddr, TcpListener};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use http::{Method, Response, StatusCode};
use log::{debug, warn};
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::AbortHandle;

use super::{AdminApp, Request};
use crate::sys::lock;
use crate::traffic::Traffic;

/// Most admin connections open at once.
pub const MAX_CONNECTIONS: usize = 64;
/// Longest request head (request line and headers).
pub const MAX_HEAD: usize = 16 * 1024;
/// Time a client has to send its whole request head.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(5);
/// Time a client has to take the response.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Most headers a request may have.
const MAX_HEADERS: usize = 64;

/// The connections being served, oldest first.
#[derive(Default)]
struct Slots {
    next: u64,
    live: VecDeque<(u64, AbortHandle)>,
}

/// The pingora background service that runs the admin listener.
pub struct AdminService {
    app: Arc<AdminApp>,
    bind: SocketAddr,
    traffic: Arc<Traffic>,
    slots: Arc<Mutex<Slots>>,
}

/// Pause between tries to bind an admin address that is still taken.
const BIND_RETRY: Duration = Duration::from_millis(200);

impl AdminService {
    /// Serve `app` on `bind`, with a socket [`Traffic`] keeps for upgrades
    /// (the one inherited from the previous process, if any).
    pub fn new(app: AdminApp, bind: SocketAddr, traffic: Arc<Traffic>) -> AdminService {
        AdminService {
            app: Arc::new(app),
            bind,
            traffic,
            slots: Arc::new(Mutex::new(Slots::default())),
        }
    }

    /// The listening socket: taken over, or bound. An address still held
    /// by another process (one that hands over only through pingora, from
    /// before sluice's own handover) is retried until it is free.
    async fn listen(&self, shutdown: &mut ShutdownWatch) -> Option<TcpListener> {
        let mut said = false;
        loop {
            match self.traffic.admin_socket(self.bind) {
                Ok(l) => return Some(l),
                Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
                    if !said {
                        warn!(
                            "admin address {} is still in use; retrying until it is free",
                            self.bind
                        );
                        said = true;
                    }
                }
                Err(e) => {
                    warn!("admin listener cannot listen on {}: {e}", self.bind);
                    return None;
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(BIND_RETRY) => {}
                _ = shutdown.changed() => return None,
            }
        }
    }

    /// Start serving `stream`, cutting the oldest connection when full.
    fn admit(&self, stream: TcpStream) {
        let mut slots = lock(&self.slots);
        if slots.live.len() >= MAX_CONNECTIONS {
            if let Some((_, oldest)) = slots.live.pop_front() {
                oldest.abort();
            }
        }
        let id = slots.next;
        slots.next += 1;
        let (app, registry) = (Arc::clone(&self.app), Arc::clone(&self.slots));
        let task = tokio::spawn(async move {
            serve_one(&app, stream).await;
            lock(&registry).live.retain(|(i, _)| *i != id);
        });
        slots.live.push_back((id, task.abort_handle()));
    }
}

#[async_trait]
impl BackgroundService for AdminService {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let Some(listener) = self.listen(&mut shutdown).await else {
            return;
        };
        let listener = match listener
            .set_nonblocking(true)
            .and_then(|()| tokio::net::TcpListener::from_std(listener))
        {
            Ok(l) => l,
            Err(e) => {
                warn!("admin listener cannot start: {e}");
                return;
            }
        };
        loop {
            tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => self.admit(stream),
                    Err(e) if crate::sys::is_local_exhaustion(&e) => {
                        // Out of descriptors: the data path needs them more.
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    Err(e) => debug!("admin accept failed: {e}"),
                },
                _ = shutdown.changed() => {
                    if *shutdown.borrow() {
                        break;
                    }
                }
            }
        }
    }
}

/// Read one request from `stream`, answer it, close.
async fn serve_one(app: &AdminApp, mut stream: TcpStream) {
    let response = match tokio::time::timeout(HEAD_TIMEOUT, read_head(&mut stream)).await {
        Ok(Ok(req)) => {
            let head_only = req.method == Method::HEAD;
            let response = app.handle(&req).await;
            (response, head_only)
        }
        Ok(Err(status)) => (plain(status), false),
        Err(_) => (plain(StatusCode::REQUEST_TIMEOUT), false),
    };
    let bytes = encode(&response.0, response.1);
    let _ = tokio::time::timeout(WRITE_TIMEOUT, async {
        stream.write_all(&bytes).await?;
        stream.shutdown().await
    })
    .await;
}

fn plain(status: StatusCode) -> Response<Vec<u8>> {
    let mut r =
        Response::new(format!("{}\n", status.canonical_reason().unwrap_or("error")).into_bytes());
    *r.status_mut() = status;
    r
}

/// Read and parse a request head: the request, or the status to refuse it with.
async fn read_head(stream: &mut TcpStream) -> Result<Request, StatusCode> {
    let mut buf = Vec::with_capacity(1024);
    loop {
        let mut chunk = [0u8; 2048];
        let n = stream
            .read(&mut chunk)
            .await
            .map_err(|_| StatusCode::BAD_REQUEST)?;
        if n == 0 {
            return Err(StatusCode::BAD_REQUEST);
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut parsed = httparse::Request::new(&mut headers);
        match parsed.parse(&buf) {
            Ok(httparse::Status::Complete(_)) => return request(&parsed),
            Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD => {
                return Err(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
            }
            Ok(httparse::Status::Partial) => {}
            Err(httparse::Error::TooManyHeaders) => {
                return Err(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
            }
            Err(_) => return Err(StatusCode::BAD_REQUEST),
        }
    }
}

fn request(parsed: &httparse::Request<'_, '_>) -> Result<Request, StatusCode> {
    let method = parsed
        .method
        .and_then(|m| Method::from_bytes(m.as_bytes()).ok())
        .ok_or(StatusCode::BAD_REQUEST)?;
    let target = parsed.path.ok_or(StatusCode::BAD_REQUEST)?;
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p, Some(q.to_string())),
        None => (target, None),
    };
    let header = |name: &str| {
        parsed
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .and_then(|h| std::str::from_utf8(h.value).ok())
            .map(str::to_string)
    };
    Ok(Request {
        method,
        path: path.to_string(),
        query,
        authorization: header("authorization"),
        host: header("host"),
        origin: header("origin"),
        content_type: header("content-type"),
    })
}

/// The bytes of `response` (its body left out for a HEAD request).
fn encode(response: &Response<Vec<u8>>, head_only: bool) -> Vec<u8> {
    let status = response.status();
    let mut out = format!(
        "HTTP/1.1 {} {}\r\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or("")
    )
    .into_bytes();
    for (name, value) in response.headers() {
        if name == http::header::CONTENT_LENGTH || name == http::header::CONNECTION {
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    let body = response.body();
    out.extend_from_slice(
        format!(
            "content-length: {}\r\nconnection: close\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    );
    if !head_only {
        out.extend_from_slice(body);
    }
    out
}
