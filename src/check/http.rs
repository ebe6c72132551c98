//! The `http` check: an HTTP/1.1 GET with a status range and an optional
//! body pattern, and the role from `primary_path`/`replica_path` (Patroni's
//! `/primary` and `/replica`). Each request uses its own connection.

use tokio::io::AsyncWriteExt;

use super::{
    Budget, ProbeError, Role, TEXT_CAP, Target, closed_before, connect, preview, read_some,
};
use crate::config::HttpCheck;

/// Run the check, then ask for the role when paths for it are set.
pub(super) async fn probe(
    check: &HttpCheck,
    addr: Target<'_>,
    host: &str,
    budget: &Budget,
) -> Result<Option<Role>, ProbeError> {
    let addr = match check.port {
        Some(port) => addr.with_port(port),
        None => addr,
    };
    let host = check.host.as_deref().unwrap_or(host);

    let resp = get(addr, host, &check.path, budget).await?;
    let (lo, hi) = check.status;
    if !(lo..=hi).contains(&resp.status) {
        return Err(ProbeError::Failed(format!(
            "GET {}: status {}",
            check.path, resp.status
        )));
    }
    if let Some(pattern) = &check.body {
        if !pattern.is_match(&resp.body) {
            return Err(ProbeError::Failed(format!(
                "GET {}: body does not match /{}/, got: {}",
                check.path,
                pattern.as_str(),
                preview(&resp.body)
            )));
        }
    }

    let mut primary_status = None;
    if let Some(path) = &check.primary_path {
        let status = get(addr, host, path, budget).await?.status;
        if is_2xx(status) {
            return Ok(Some(Role::Primary));
        }
        primary_status = Some((path, status));
    }
    let Some(path) = &check.replica_path else {
        // Not the primary, by its own path's answer.
        return Ok(primary_status.map(|_| Role::Replica));
    };
    let status = get(addr, host, path, budget).await?.status;
    if is_2xx(status) {
        return Ok(Some(Role::Replica));
    }
    // Neither path claims the backend: it may be a lagging replica or a
    // primary mid-failover; guessing would route writes wrongly.
    Err(ProbeError::Failed(match primary_status {
        Some((p, ps)) => {
            format!("neither primary (GET {p}: {ps}) nor replica (GET {path}: {status})")
        }
        None => format!("not a replica (GET {path}: {status})"),
    }))
}

fn is_2xx(status: u16) -> bool {
    (200..300).contains(&status)
}

/// A final response.
#[derive(Debug)]
pub(super) struct Response {
    pub(super) status: u16,
    /// Decoded (de-chunked), possibly cut at the read cap.
    pub(super) body: Vec<u8>,
}

/// GET `path` from `addr` over a fresh connection.
async fn get(
    addr: Target<'_>,
    host: &str,
    path: &str,
    budget: &Budget,
) -> Result<Response, ProbeError> {
    // Config validation should keep these out; a CR/LF would split the request.
    if has_ctl(path) || has_ctl(host) {
        return Err(ProbeError::Failed(format!(
            "GET {}: control character in path or Host",
            path.escape_default()
        )));
    }
    // An IPv6 literal needs brackets in a Host header.
    let host = if host.parse::<std::net::Ipv6Addr>().is_ok() {
        format!("[{host}]")
    } else {
        host.to_string()
    };
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: sluice-health-check\r\nAccept: */*\r\nConnection: close\r\n\r\n"
    );

    let mut stream = connect(addr, budget).await?;
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(ProbeError::Io)?;
    let mut buf = Vec::new();
    loop {
        let full = buf.len() >= TEXT_CAP;
        if let Some(resp) = parse_response(&buf, full)? {
            return Ok(resp);
        }
        if full || read_some(&mut stream, &mut buf, TEXT_CAP).await? == 0 {
            if buf.is_empty() {
                return Err(closed_before("an HTTP response"));
            }
            // `parse_response` with `complete` always decides.
            return parse_response(&buf, true)?.ok_or_else(|| not_http(&buf));
        }
    }
}

fn has_ctl(s: &str) -> bool {
    s.bytes().any(|b| b.is_ascii_control())
}

fn not_http(buf: &[u8]) -> ProbeError {
    ProbeError::Protocol(format!("not an HTTP server: got {}", preview(buf)))
}

/// Parse a response from what was received. `complete`: nothing more will
/// come (end of stream or read cap), so take whatever body there is.
/// `Ok(None)`: need more bytes.
pub(super) fn parse_response(buf: &[u8], complete: bool) -> Result<Option<Response>, ProbeError> {
    let mut rest = buf;
    loop {
        // Decide on garbage early: a server that talks first (MySQL) and
        // then waits would otherwise hold the check until its timeout.
        let prefix = rest.len().min(5);
        if rest.get(..prefix) != b"HTTP/".get(..prefix) {
            return Err(not_http(rest));
        }
        let Some((head, body_start)) = split_head(rest) else {
            if complete {
                return Err(not_http(rest));
            }
            return Ok(None);
        };
        let mut lines = head
            .split(|&b| b == b'\n')
            .map(|l| l.strip_suffix(b"\r").unwrap_or(l));
        let status =
            parse_status_line(lines.next().unwrap_or_default()).ok_or_else(|| not_http(rest))?;
        let body = rest.get(body_start..).unwrap_or_default();
        // Interim responses (100 Continue, 103 Early Hints) precede the real one.
        if (100..200).contains(&status) && status != 101 {
            rest = body;
            if rest.is_empty() && !complete {
                return Ok(None);
            }
            continue;
        }

        let mut chunked = false;
        let mut length = None;
        for line in lines {
            let Some(colon) = line.iter().position(|&b| b == b':') else {
                continue;
            };
            let (name, value) = line.split_at(colon);
            let value = value.get(1..).unwrap_or_default().trim_ascii();
            if name.eq_ignore_ascii_case(b"transfer-encoding") {
                chunked = value.to_ascii_lowercase().ends_with(b"chunked");
            } else if name.eq_ignore_ascii_case(b"content-length") {
                let n = std::str::from_utf8(value)
                    .ok()
                    .and_then(|v| v.parse::<usize>().ok());
                length = Some(n.ok_or_else(|| {
                    ProbeError::Protocol(format!("bad HTTP Content-Length: {}", preview(value)))
                })?);
            }
        }

        let body = if status == 204 || status == 304 {
            Some(Vec::new())
        } else if chunked {
            match dechunk(body)? {
                (decoded, true) => Some(decoded),
                (decoded, false) if complete => Some(decoded),
                _ => None,
            }
        } else if let Some(n) = length {
            match body.get(..n) {
                Some(b) => Some(b.to_vec()),
                None if complete => Some(body.to_vec()),
                None => None,
            }
        } else if complete {
            Some(body.to_vec())
        } else {
            None
        };
        return Ok(body.map(|body| Response { status, body }));
    }
}

/// The head (status line and headers, without the blank line) and where the
/// body starts, once the blank line has arrived. Bare LFs are tolerated.
fn split_head(buf: &[u8]) -> Option<(&[u8], usize)> {
    let mut start = 0;
    while let Some(nl) = buf.get(start..)?.iter().position(|&b| b == b'\n') {
        let line = buf.get(start..start + nl)?;
        if line.is_empty() || line == b"\r" {
            return Some((buf.get(..start)?, start + nl + 1));
        }
        start += nl + 1;
    }
    None
}

/// `HTTP/1.x SSS reason` → `SSS`.
fn parse_status_line(line: &[u8]) -> Option<u16> {
    let rest = line.strip_prefix(b"HTTP/")?;
    let (version, rest) = rest.split_at_checked(3)?;
    if !matches!(version, [major, b'.', minor] if major.is_ascii_digit() && minor.is_ascii_digit())
    {
        return None;
    }
    let rest = rest.strip_prefix(b" ")?;
    let (code, rest) = rest.split_at_checked(3)?;
    if !code.iter().all(u8::is_ascii_digit) || !(rest.is_empty() || rest.starts_with(b" ")) {
        return None;
    }
    std::str::from_utf8(code).ok()?.parse().ok()
}

/// Decode a chunked body: the data so far and whether the last chunk came.
/// Trailers are ignored.
fn dechunk(mut data: &[u8]) -> Result<(Vec<u8>, bool), ProbeError> {
    let bad = || ProbeError::Protocol("bad HTTP chunked encoding".to_string());
    let mut out = Vec::new();
    loop {
        let Some(nl) = data.iter().position(|&b| b == b'\n') else {
            // A size line longer than this is not one.
            return if data.len() > 1024 {
                Err(bad())
            } else {
                Ok((out, false))
            };
        };
        let line = data.get(..nl).ok_or_else(bad)?;
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let size = line
            .split(|&b| b == b';')
            .next()
            .unwrap_or_default()
            .trim_ascii();
        let size = std::str::from_utf8(size)
            .ok()
            .and_then(|s| usize::from_str_radix(s, 16).ok())
            .ok_or_else(bad)?;
        if size == 0 {
            return Ok((out, true));
        }
        data = data.get(nl + 1..).unwrap_or_default();
        match data.get(..size) {
            Some(chunk) => out.extend_from_slice(chunk),
            None => {
                out.extend_from_slice(data);
                return Ok((out, false));
            }
        }
        data = data.get(size..).unwrap_or_default();
        data = data
            .strip_prefix(b"\r\n")
            .or_else(|| data.strip_prefix(b"\n"))
            .unwrap_or(data);
    }
}
