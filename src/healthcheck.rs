//! `sluice healthcheck`: ask a running sluice's admin listener whether it is
//! ready. Container images without curl (`docker/Dockerfile` ships sluice and
//! glibc, nothing else) and keepalived track scripts run it.
//!
//! One `GET` over a fresh connection, bounded in time and in bytes read:
//! 2xx is healthy, anything else (another status, a refused connection, a
//! timeout, an answer that is not HTTP) is not, with the reason printed.

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
    if !path.starts_with('/') || path.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(ProbeError::BadPath(path.escape_debug().to_string()));
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
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: sluice-healthcheck\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).map_err(io)?;

    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 2048];
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
                let line_done = body.contains(&b'\n');
                let body_done = length.is_some_and(|n| body.len() >= n);
                if eof || line_done || body_done || buf.len() >= MAX_ANSWER {
                    return Ok(Answer {
                        status,
                        first_line: first_line(body),
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
            Ok(httparse::Status::Partial) if buf.len() >= MAX_ANSWER => {
                return Err(ProbeError::NotHttp {
                    addr,
                    why: format!("no end of header in the first {MAX_ANSWER} bytes"),
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
        let room = (MAX_ANSWER - buf.len()).min(chunk.len());
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
