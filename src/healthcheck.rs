//! Asking a running sluice's admin listener: `sluice healthcheck` (whether
//! it is ready; container images without curl — `docker/Dockerfile` ships
//! sluice and glibc, nothing else — and keepalived track scripts run it) and
//! the HTTP client under `sluice ctl`.
//!
//! One request over a fresh connection, bounded in time and in bytes read.
//! For the health check, 2xx is healthy, anything else (another status, a
//! refused connection, a timeout, an answer that is not HTTP) is not, with
//! the reason printed.

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

/// At most this much of an answer is read; `/readyz` answers one line.
pub const MAX_ANSWER: usize = 16 * 1024;

/// At most this many header lines are accepted in an answer.
const MAX_HEADERS: usize = 32;

/// Why no status could be read.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// The path would not make a well-formed request line.
    #[error(
        "`{0}` is not a request path (it must start with `/` and hold no spaces or control characters)"
    )]
    BadPath(String),
    /// The connection could not be made.
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        /// Where.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The whole exchange took longer than the limit.
    #[error("{addr} gave no complete answer within {limit:?}")]
    Timeout {
        /// Where.
        addr: SocketAddr,
        /// The limit.
        limit: Duration,
    },
    /// Sending or receiving failed.
    #[error("{addr}: {source}")]
    Io {
        /// Where.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The token holds a character that cannot go in a header.
    #[error("the admin token holds whitespace or control characters")]
    BadToken,
    /// The peer answered something that is not an HTTP/1.x response.
    #[error("{addr} did not answer HTTP: {why}")]
    NotHttp {
        /// Where.
        addr: SocketAddr,
        /// What was wrong.
        why: String,
    },
}

/// A status and the start of the body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// The HTTP status code.
    pub status: u16,
    /// The body's first line, control characters escaped, at most 200 characters.
    pub first_line: String,
}

impl Answer {
    /// Whether the status is 2xx.
    pub fn healthy(&self) -> bool {
        (200..300).contains(&self.status)
    }
}

/// The address to connect to for a listener bound to `bind`: the wildcard
/// addresses mean this host, reached over loopback.
pub fn dial_address(bind: SocketAddr) -> SocketAddr {
    match bind.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), bind.port())
        }
        IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), bind.port())
        }
        _ => bind,
    }
}

/// `GET path` from `addr`, all of it within `limit`.
pub fn probe(addr: SocketAddr, path: &str, limit: Duration) -> Result<Answer, ProbeError> {
    let reply = request(addr, "GET", path, None, limit, MAX_ANSWER)?;
    Ok(Answer {
        status: reply.status,
        first_line: first_line(&reply.body),
    })
}

/// A whole answer of [`request`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The HTTP status code.
    pub status: u16,
    /// The body, at most the `max` given (less the header).
    pub body: Vec<u8>,
    /// Whether the answer went past `max` and the rest was not read.
    pub truncated: bool,
}

/// One `method target` request to `addr` over a fresh connection, with a
/// bearer token when given, all of it within `limit`, reading at most `max`
/// bytes of answer. The body ends at its `Content-Length`, at the close, or
/// at `max` (then `truncated`).
pub fn request(
    addr: SocketAddr,
    method: &str,
    target: &str,
    token: Option<&str>,
    limit: Duration,
    max: usize,
) -> Result<Reply, ProbeError> {
    let clean = |s: &str| !s.chars().any(|c| c.is_whitespace() || c.is_control());
    if !target.starts_with('/') || !clean(target) {
        return Err(ProbeError::BadPath(target.escape_debug().to_string()));
    }
    let deadline = Instant::now() + limit;
    let timeout = || ProbeError::Timeout { addr, limit };
    let io = |source: std::io::Error| match source.kind() {
        ErrorKind::WouldBlock | ErrorKind::TimedOut => ProbeError::Timeout { addr, limit },
        _ => ProbeError::Io { addr, source },
    };
    let mut stream = TcpStream::connect_timeout(&addr, limit).map_err(|source| {
        if source.kind() == ErrorKind::TimedOut {
            timeout()
        } else {
            ProbeError::Connect { addr, source }
        }
    })?;
    let remaining = || {
        deadline
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
    };
    stream
        .set_write_timeout(Some(remaining().ok_or_else(timeout)?))
        .map_err(io)?;
    let authorization = match token {
        // A token with a line break would split the header: never sent.
        Some(t) if clean(t) => format!("Authorization: Bearer {t}\r\n"),
        Some(_) => return Err(ProbeError::BadToken),
        None => String::new(),
    };
    let request = format!(
        "{method} {target} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: sluice\r\n{authorization}Content-Length: 0\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).map_err(io)?;

    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 8192];
    let mut eof = false;
    loop {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut response = httparse::Response::new(&mut headers);
        match response.parse(&buf) {
            Ok(httparse::Status::Complete(head)) => {
                let status = response.code.unwrap_or(0);
                let length = response
                    .headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                    .and_then(|h| std::str::from_utf8(h.value).ok())
                    .and_then(|v| v.trim().parse::<usize>().ok());
                let body = &buf[head..];
                let body_done = length.is_some_and(|n| body.len() >= n);
                let truncated = buf.len() >= max && !body_done;
                if eof || body_done || truncated {
                    let end = length.map_or(body.len(), |n| n.min(body.len()));
                    return Ok(Reply {
                        status,
                        body: body[..end].to_vec(),
                        truncated,
                    });
                }
            }
            Ok(httparse::Status::Partial) if eof => {
                return Err(ProbeError::NotHttp {
                    addr,
                    why: if buf.is_empty() {
                        "the connection closed before any answer".to_string()
                    } else {
                        "the connection closed in the middle of the header".to_string()
                    },
                });
            }
            Ok(httparse::Status::Partial) if buf.len() >= max.min(MAX_ANSWER) => {
                return Err(ProbeError::NotHttp {
                    addr,
                    why: format!("no end of header in the first {} bytes", buf.len()),
                });
            }
            Ok(httparse::Status::Partial) => {}
            Err(e) => {
                return Err(ProbeError::NotHttp {
                    addr,
                    why: e.to_string(),
                });
            }
        }
        stream
            .set_read_timeout(Some(remaining().ok_or_else(timeout)?))
            .map_err(io)?;
        let room = (max - buf.len()).min(chunk.len());
        match stream.read(&mut chunk[..room]) {
            Ok(0) => eof = true,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(io(e)),
        }
    }
}

/// The body's first line, printable and short.
fn first_line(body: &[u8]) -> String {
    let line = body.split(|&b| b == b'\n').next().unwrap_or_default();
    let text = String::from_utf8_lossy(line);
    let text = text.trim_end_matches('\r');
    let escaped: String = text.chars().flat_map(char::escape_debug).collect();
    escaped.chars().take(200).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards_are_dialled_on_loopback() {
        let v4: SocketAddr = "0.0.0.0:9100".parse().unwrap_or_else(|_| unreachable!());
        let v6: SocketAddr = "[::]:9100".parse().unwrap_or_else(|_| unreachable!());
        let other: SocketAddr = "10.1.2.3:9100".parse().unwrap_or_else(|_| unreachable!());
        assert_eq!(dial_address(v4).to_string(), "127.0.0.1:9100");
        assert_eq!(dial_address(v6).to_string(), "[::1]:9100");
        assert_eq!(dial_address(other), other);
    }

    #[test]
    fn request_paths_cannot_smuggle_lines() {
        let addr: SocketAddr = "127.0.0.1:1".parse().unwrap_or_else(|_| unreachable!());
        for bad in ["readyz", "/readyz HTTP/1.1\r\nX: y", "/a b", "/\u{7f}"] {
            assert!(
                matches!(
                    probe(addr, bad, Duration::from_millis(100)),
                    Err(ProbeError::BadPath(_))
                ),
                "{bad:?} was accepted"
            );
        }
    }

    #[test]
    fn first_line_is_escaped_and_cut() {
        assert_eq!(first_line(b"not ready: x\r\nmore"), "not ready: x");
        assert_eq!(first_line(b"a\x1bb"), "a\\u{1b}b");
        assert_eq!(first_line(&[b'x'; 500]).len(), 200);
    }
}
