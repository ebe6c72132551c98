//! The `redis` check: `PING`, `AUTH` when a password is set, then `ROLE`,
//! over RESP2 with a small reader that bounds every length it is told.
//!
//! `AUTH` sends the password in cleartext (RESP has no other way, and the
//! check speaks no TLS); it is sent only after the peer has answered `PING`
//! in RESP.

use std::io;

use tokio::io::AsyncWriteExt;

use super::{
    Budget, CheckStream, ProbeError, Role, Target, closed_before, connect, preview, read_some,
};
use crate::config::Credentials;

/// Longest bulk string accepted.
const MAX_BULK: usize = 1024 * 1024;
/// Most elements in one array.
const MAX_ARRAY: usize = 1024;
/// Deepest nesting of arrays.
const MAX_DEPTH: usize = 4;
/// Longest `+`, `-` or `:` line.
const MAX_LINE: usize = 64 * 1024;
/// Most bytes buffered for one reply.
const REPLY_CAP: usize = 2 * 1024 * 1024;

/// Log in when a password is set, then `PING` and `ROLE`.
pub(super) async fn probe(
    credentials: &Credentials,
    addr: Target<'_>,
    budget: &Budget,
) -> Result<Option<Role>, ProbeError> {
    let mut conn = Conn {
        stream: connect(addr, budget).await?,
        buf: Vec::new(),
    };

    // PING before AUTH: AUTH carries the password in cleartext, so it goes
    // only to a peer that has answered in RESP (+PONG, or -NOAUTH when it
    // wants a login), never to whatever else sits at the address.
    let mut pong = conn.command(&[b"PING"]).await?;
    if let Some(password) = &credentials.password {
        match &pong {
            Value::Simple(_) => {}
            Value::Error(e) if e.starts_with("NOAUTH") => {}
            _ => return Err(ping_error(pong)),
        }
        let password = password.expose().as_bytes();
        let reply = match &credentials.user {
            Some(user) => conn.command(&[b"AUTH", user.as_bytes(), password]).await?,
            None => conn.command(&[b"AUTH", password]).await?,
        };
        match reply {
            Value::Simple(_) => {}
            Value::Error(e) if is_busy(&e) => return Err(ProbeError::Failed(format!("AUTH: {e}"))),
            Value::Error(e) => return Err(ProbeError::Auth(e)),
            other => return Err(unexpected("AUTH", &other)),
        }
        if matches!(&pong, Value::Error(_)) {
            pong = conn.command(&[b"PING"]).await?;
        }
    }
    match pong {
        Value::Simple(s) if s == b"PONG" => {}
        other => return Err(ping_error(other)),
    }

    match conn.command(&[b"ROLE"]).await? {
        Value::Array(Some(items)) => match items.first() {
            Some(Value::Bulk(Some(role))) => match role.as_slice() {
                b"master" => Ok(Some(Role::Primary)),
                b"slave" | b"replica" => Ok(Some(Role::Replica)),
                other => Err(ProbeError::Failed(format!(
                    "ROLE: {} is neither a primary nor a replica",
                    preview(other)
                ))),
            },
            _ => Err(ProbeError::Protocol(
                "not a Redis server: ROLE reply has no role".to_string(),
            )),
        },
        Value::Error(e) if e.starts_with("NOAUTH") => Err(ProbeError::Auth(e)),
        Value::Error(e) => Err(ProbeError::Failed(format!("ROLE: {e}"))),
        other => Err(unexpected("ROLE", &other)),
    }
}

/// Why a reply to PING fails the check.
fn ping_error(reply: Value) -> ProbeError {
    match reply {
        Value::Error(e) if e.starts_with("NOAUTH") => ProbeError::Auth(e),
        Value::Error(e) => ProbeError::Failed(format!("PING: {e}")),
        other => unexpected("PING", &other),
    }
}

/// Errors that say the server is not ready, not that the login is wrong.
fn is_busy(e: &str) -> bool {
    [
        "LOADING",
        "BUSY",
        "MASTERDOWN",
        "DENIED",
        "ERR max number of clients",
    ]
    .iter()
    .any(|p| e.starts_with(p))
}

fn unexpected(command: &str, reply: &Value) -> ProbeError {
    ProbeError::Protocol(format!(
        "not a Redis server: {command} answered {}",
        show(reply)
    ))
}

/// A reply as text for messages, cut short.
fn show(value: &Value) -> String {
    match value {
        Value::Simple(s) => format!("+{}", preview(s)),
        Value::Error(e) => format!("-{}", preview(e.as_bytes())),
        Value::Int(i) => format!(":{i}"),
        Value::Bulk(None) | Value::Array(None) => "null".to_string(),
        Value::Bulk(Some(b)) => format!("${}", preview(b)),
        Value::Array(Some(items)) => format!("an array of {}", items.len()),
    }
}

/// One connection and what was read ahead.
struct Conn {
    stream: CheckStream,
    buf: Vec<u8>,
}

impl Conn {
    /// Send `args` as an array of bulk strings and read the reply.
    async fn command(&mut self, args: &[&[u8]]) -> Result<Value, ProbeError> {
        let mut out = format!("*{}\r\n", args.len()).into_bytes();
        for arg in args {
            out.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
            out.extend_from_slice(arg);
            out.extend_from_slice(b"\r\n");
        }
        self.stream.write_all(&out).await.map_err(ProbeError::Io)?;
        self.reply().await
    }

    async fn reply(&mut self) -> Result<Value, ProbeError> {
        loop {
            match parse(&self.buf) {
                Ok(Some((value, used))) => {
                    self.buf.drain(..used.min(self.buf.len()));
                    return Ok(value);
                }
                Ok(None) => {}
                Err(Bad::NotResp) => {
                    return Err(ProbeError::Protocol(format!(
                        "not a Redis server: got {}",
                        preview(&self.buf)
                    )));
                }
                Err(Bad::Limit(what)) => {
                    return Err(ProbeError::Protocol(format!(
                        "Redis reply rejected: {what}"
                    )));
                }
            }
            if self.buf.len() >= REPLY_CAP {
                return Err(ProbeError::Protocol(format!(
                    "Redis reply rejected: longer than {} MiB",
                    REPLY_CAP >> 20
                )));
            }
            if read_some(&mut self.stream, &mut self.buf, REPLY_CAP).await? == 0 {
                if self.buf.is_empty() {
                    return Err(closed_before("a Redis reply"));
                }
                // Valid so far: cut off, not a stranger.
                return Err(ProbeError::Io(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("connection closed mid-reply: got {}", preview(&self.buf)),
                )));
            }
        }
    }
}

/// A RESP2 value.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Value {
    /// `+OK`
    Simple(Vec<u8>),
    /// `-ERR …`, as text.
    Error(String),
    /// `:1`
    Int(i64),
    /// `$3\r\nfoo`, or `$-1` (null).
    Bulk(Option<Vec<u8>>),
    /// `*2 …`, or `*-1` (null).
    Array(Option<Vec<Value>>),
}

/// Why bytes are not an acceptable reply.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Bad {
    /// Not RESP at all.
    NotResp,
    /// RESP, but past one of the bounds.
    Limit(String),
}

/// Parse one value from the start of `buf`: the value and the bytes it
/// took, or `None` when more bytes are needed.
pub(super) fn parse(buf: &[u8]) -> Result<Option<(Value, usize)>, Bad> {
    parse_at(buf, 0, 0)
}

fn parse_at(buf: &[u8], pos: usize, depth: usize) -> Result<Option<(Value, usize)>, Bad> {
    let Some(&kind) = buf.get(pos) else {
        return Ok(None);
    };
    // Judge the type byte before waiting for a whole line.
    if !matches!(kind, b'+' | b'-' | b':' | b'$' | b'*') {
        return Err(Bad::NotResp);
    }
    let Some((line, next)) = line_at(buf, pos + 1)? else {
        return Ok(None);
    };
    let value = match kind {
        b'+' => Value::Simple(line.to_vec()),
        b'-' => Value::Error(String::from_utf8_lossy(line).into_owned()),
        b':' => Value::Int(int(line)?),
        b'$' => {
            let n = int(line)?;
            if n == -1 {
                return Ok(Some((Value::Bulk(None), next)));
            }
            let n = usize::try_from(n).map_err(|_| Bad::NotResp)?;
            if n > MAX_BULK {
                return Err(Bad::Limit(format!(
                    "bulk string of {n} bytes (limit {MAX_BULK})"
                )));
            }
            let end = next + n;
            let Some(data) = buf.get(next..end) else {
                return Ok(None);
            };
            match buf.get(end..end + 2) {
                Some(b"\r\n") => return Ok(Some((Value::Bulk(Some(data.to_vec())), end + 2))),
                Some(_) => return Err(Bad::NotResp),
                None if buf.len() > end && buf.get(end) != Some(&b'\r') => {
                    return Err(Bad::NotResp);
                }
                None => return Ok(None),
            }
        }
        _ => {
            let n = int(line)?;
            if n == -1 {
                return Ok(Some((Value::Array(None), next)));
            }
            let n = usize::try_from(n).map_err(|_| Bad::NotResp)?;
            if n > MAX_ARRAY {
                return Err(Bad::Limit(format!(
                    "array of {n} elements (limit {MAX_ARRAY})"
                )));
            }
            if n > 0 && depth >= MAX_DEPTH {
                return Err(Bad::Limit(format!("arrays nested deeper than {MAX_DEPTH}")));
            }
            let mut items = Vec::with_capacity(n.min(16));
            let mut at = next;
            for _ in 0..n {
                let Some((item, after)) = parse_at(buf, at, depth + 1)? else {
                    return Ok(None);
                };
                items.push(item);
                at = after;
            }
            return Ok(Some((Value::Array(Some(items)), at)));
        }
    };
    Ok(Some((value, next)))
}

/// The line starting at `pos` (without CRLF) and where the next one starts.
fn line_at(buf: &[u8], pos: usize) -> Result<Option<(&[u8], usize)>, Bad> {
    let rest = buf.get(pos..).unwrap_or_default();
    match rest.windows(2).position(|w| w == b"\r\n") {
        Some(end) => {
            let line = rest.get(..end).unwrap_or_default();
            if line.contains(&b'\n') {
                return Err(Bad::NotResp);
            }
            Ok(Some((line, pos + end + 2)))
        }
        // A bare LF is never part of a RESP line.
        None if rest.contains(&b'\n') => Err(Bad::NotResp),
        None if rest.len() > MAX_LINE => {
            Err(Bad::Limit(format!("line longer than {MAX_LINE} bytes")))
        }
        None => Ok(None),
    }
}

fn int(line: &[u8]) -> Result<i64, Bad> {
    let digits = line.strip_prefix(b"-").unwrap_or(line);
    if digits.is_empty() || digits.len() > 19 || !digits.iter().all(u8::is_ascii_digit) {
        return Err(Bad::NotResp);
    }
    std::str::from_utf8(line)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or(Bad::NotResp)
}
