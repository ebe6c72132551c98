//! The PROXY protocol (HAProxy's, v1 text and v2 binary): reading the
//! header a trusted proxy in front of sluice sends, and writing the one
//! sluice sends to backends. Parsing is the `ppp` crate's.
//!
//! A header is read by peeking: sluice looks at the bytes waiting on the
//! socket without taking them, and takes exactly the header once it is
//! complete, so the client's own bytes stay in the socket for the relay
//! (and its zero-copy path). The read is bounded in time (the caller's
//! timeout) and in size ([`MAX_HEADER`]).

use std::io;
use std::net::{IpAddr, SocketAddr};

use ppp::{HeaderResult, PartialResult, v1, v2};

use crate::config::edge::ProxyVersion;
use crate::relay::socket::Socket;

/// The longest header accepted: a v1 header is at most 107 bytes; a v2
/// header may carry TLVs, which sluice does not use, up to this much.
pub const MAX_HEADER: usize = 1024;

/// The first bytes of every v2 header.
const V2_SIGNATURE: &[u8] = b"\r\n\r\n\0\r\nQUIT\n";

/// Why no usable header was read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HeaderError {
    /// The bytes are not a valid header.
    #[error("malformed PROXY protocol header: {0}")]
    Malformed(String),
    /// A header of the version the listener does not accept.
    #[error("PROXY protocol {0} header, but the listener accepts {1} only")]
    WrongVersion(&'static str, &'static str),
    /// The client closed before a whole header arrived.
    #[error("connection closed before a whole PROXY protocol header arrived")]
    Closed,
    /// More than [`MAX_HEADER`] bytes without a complete header.
    #[error("PROXY protocol header longer than {MAX_HEADER} bytes")]
    TooLong,
    /// Reading failed.
    #[error("reading the PROXY protocol header failed: {0}")]
    Io(String),
}

/// What a header said.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Received {
    /// The client's address and port, and the address it connected to;
    /// `None` for a v2 LOCAL or v1 UNKNOWN header (the proxy's own
    /// connection, such as its health check): the connection's own
    /// addresses stand.
    pub addresses: Option<(SocketAddr, SocketAddr)>,
    /// The header's length in bytes.
    pub len: usize,
}

/// Judge `bytes`, the start of what a client sent: a complete header,
/// `Ok(None)` when more bytes are needed, or an error.
pub fn parse(bytes: &[u8], accept: Option<ProxyVersion>) -> Result<Option<Received>, HeaderError> {
    if bytes.is_empty() {
        return Ok(None);
    }
    // A v1 header is one line: judge it only once its CRLF is there (the
    // parser takes some cut-off lines for whole ones with a bad field).
    if bytes.starts_with(b"PROXY") || b"PROXY".starts_with(&bytes[..bytes.len().min(5)]) {
        let crlf = bytes.windows(2).position(|w| w == b"\r\n");
        let lf = bytes.iter().position(|&b| b == b'\n');
        if lf.is_some_and(|lf| crlf.is_none_or(|c| lf < c + 1)) {
            return Err(HeaderError::Malformed(
                "a v1 header line must end in CRLF".to_string(),
            ));
        }
        match crlf {
            Some(end) => return parse_line(&bytes[..end + 2], accept),
            None if bytes.len() >= V1_MAX => {
                return Err(HeaderError::Malformed(format!(
                    "a v1 header is one line of at most {V1_MAX} bytes"
                )));
            }
            None => return Ok(None),
        }
    }
    parse_complete(bytes, accept)
}

/// The longest v1 header, CRLF included (the spec's 107 bytes).
const V1_MAX: usize = 107;

fn parse_line(line: &[u8], accept: Option<ProxyVersion>) -> Result<Option<Received>, HeaderError> {
    match parse_complete(line, accept)? {
        Some(r) => Ok(Some(r)),
        // A whole line the parser still finds short is malformed.
        None => Err(HeaderError::Malformed(
            "incomplete v1 header line".to_string(),
        )),
    }
}

fn parse_complete(
    bytes: &[u8],
    accept: Option<ProxyVersion>,
) -> Result<Option<Received>, HeaderError> {
    let result = HeaderResult::parse(bytes);
    if result.is_incomplete() {
        return if bytes.len() >= MAX_HEADER {
            Err(HeaderError::TooLong)
        } else {
            Ok(None)
        };
    }
    let (version, received) = match result {
        HeaderResult::V1(Ok(h)) => {
            let addresses = match h.addresses {
                v1::Addresses::Tcp4(a) => Some((
                    SocketAddr::new(IpAddr::V4(a.source_address), a.source_port),
                    SocketAddr::new(IpAddr::V4(a.destination_address), a.destination_port),
                )),
                v1::Addresses::Tcp6(a) => Some((
                    SocketAddr::new(IpAddr::V6(a.source_address), a.source_port),
                    SocketAddr::new(IpAddr::V6(a.destination_address), a.destination_port),
                )),
                v1::Addresses::Unknown => None,
            };
            let len = h.header.len();
            (ProxyVersion::V1, Received { addresses, len })
        }
        HeaderResult::V2(Ok(h)) => {
            let addresses = match (h.command, h.addresses) {
                (v2::Command::Local, _) => None,
                (v2::Command::Proxy, v2::Addresses::IPv4(a)) => Some((
                    SocketAddr::new(IpAddr::V4(a.source_address), a.source_port),
                    SocketAddr::new(IpAddr::V4(a.destination_address), a.destination_port),
                )),
                (v2::Command::Proxy, v2::Addresses::IPv6(a)) => Some((
                    SocketAddr::new(IpAddr::V6(a.source_address), a.source_port),
                    SocketAddr::new(IpAddr::V6(a.destination_address), a.destination_port),
                )),
                (v2::Command::Proxy, other) => {
                    return Err(HeaderError::Malformed(format!(
                        "a PROXY command needs TCP over IPv4 or IPv6, got {}",
                        match other {
                            v2::Addresses::Unix(_) => "a Unix socket",
                            _ => "no address",
                        }
                    )));
                }
            };
            if h.protocol != v2::Protocol::Stream && addresses.is_some() {
                return Err(HeaderError::Malformed(
                    "a PROXY command over a datagram protocol".to_string(),
                ));
            }
            let len = h.header.len();
            (ProxyVersion::V2, Received { addresses, len })
        }
        HeaderResult::V1(Err(e)) => return Err(HeaderError::Malformed(e.to_string())),
        HeaderResult::V2(Err(e)) => return Err(HeaderError::Malformed(e.to_string())),
    };
    if let Some(want) = accept {
        if want != version {
            return Err(HeaderError::WrongVersion(version.as_str(), want.as_str()));
        }
    }
    Ok(Some(received))
}

/// Whether `bytes` start like a PROXY header of either version (a client
/// that is not a trusted proxy trying to pass one).
pub fn looks_like_header(bytes: &[u8]) -> bool {
    let n = bytes.len().min(V2_SIGNATURE.len());
    (n > 0 && bytes[..n] == V2_SIGNATURE[..n] && n >= 6) || bytes.starts_with(b"PROXY ")
}

/// Read a header from `client`, taking exactly its bytes. The caller
/// bounds the time.
pub async fn read(client: &Socket, accept: Option<ProxyVersion>) -> Result<Received, HeaderError> {
    let mut buf = vec![0u8; MAX_HEADER];
    loop {
        let mut guard = client
            .readable()
            .await
            .map_err(|e| HeaderError::Io(e.to_string()))?;
        let peeked = match guard.try_io(|s| s.get_ref().peek(&mut buf)) {
            Ok(Ok(0)) => return Err(HeaderError::Closed),
            Ok(Ok(n)) => n,
            Ok(Err(e)) => return Err(HeaderError::Io(e.to_string())),
            Err(_would_block) => continue,
        };
        match parse(&buf[..peeked], accept)? {
            Some(received) => {
                take(client, received.len)?;
                return Ok(received);
            }
            None if peeked >= MAX_HEADER => return Err(HeaderError::TooLong),
            // Incomplete, and the client has shut down its side: no more
            // will come.
            None if guard.ready().is_read_closed() => return Err(HeaderError::Closed),
            // Incomplete: the bytes stay; wait for more. Peeking leaves the
            // socket readable, so clear that before waiting again.
            None => guard.clear_ready(),
        }
    }
}

/// Take `len` bytes that are known to be waiting (they were peeked).
fn take(client: &Socket, len: usize) -> Result<(), HeaderError> {
    let mut sink = vec![0u8; len];
    let mut got = 0;
    while got < len {
        match io::Read::read(&mut client.get_ref(), &mut sink[got..]) {
            Ok(0) => return Err(HeaderError::Closed),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(HeaderError::Io(e.to_string())),
        }
    }
    Ok(())
}

/// Whether the bytes already waiting on `client` start like a PROXY header
/// (without waiting for any, and without taking them).
pub fn peek_for_header(client: &Socket) -> bool {
    let mut buf = [0u8; 12];
    match client.get_ref().peek(&mut buf) {
        Ok(n) => looks_like_header(&buf[..n]),
        Err(_) => false,
    }
}

/// The header that tells a backend about `client`, who connected to `local`.
pub fn header(version: ProxyVersion, client: SocketAddr, local: SocketAddr) -> Vec<u8> {
    // One family for both: an IPv4 client on an IPv6 socket is IPv4-mapped.
    let (client, local) = same_family(client, local);
    match version {
        ProxyVersion::V1 => match (client, local) {
            (SocketAddr::V4(c), SocketAddr::V4(l)) => {
                v1::Addresses::new_tcp4(*c.ip(), *l.ip(), c.port(), l.port())
            }
            (SocketAddr::V6(c), SocketAddr::V6(l)) => {
                v1::Addresses::new_tcp6(*c.ip(), *l.ip(), c.port(), l.port())
            }
            _ => v1::Addresses::Unknown,
        }
        .to_string()
        .into_bytes(),
        ProxyVersion::V2 => v2::Builder::with_addresses(
            v2::Version::Two | v2::Command::Proxy,
            v2::Protocol::Stream,
            (client, local),
        )
        .build()
        .unwrap_or_default(),
    }
}

/// The header a health check sends: v2 LOCAL, or v1 UNKNOWN, so backends
/// neither log a broken header nor count the check as a client.
pub fn check_header(version: ProxyVersion) -> Vec<u8> {
    match version {
        ProxyVersion::V1 => b"PROXY UNKNOWN\r\n".to_vec(),
        ProxyVersion::V2 => v2::Builder::with_addresses(
            v2::Version::Two | v2::Command::Local,
            v2::Protocol::Unspecified,
            v2::Addresses::Unspecified,
        )
        .build()
        .unwrap_or_default(),
    }
}

fn same_family(a: SocketAddr, b: SocketAddr) -> (SocketAddr, SocketAddr) {
    let (a, b) = (
        SocketAddr::new(a.ip().to_canonical(), a.port()),
        SocketAddr::new(b.ip().to_canonical(), b.port()),
    );
    let v6 = |s: SocketAddr| match s.ip() {
        IpAddr::V4(ip) => SocketAddr::new(IpAddr::V6(ip.to_ipv6_mapped()), s.port()),
        IpAddr::V6(_) => s,
    };
    if a.is_ipv4() == b.is_ipv4() {
        (a, b)
    } else {
        (v6(a), v6(b))
    }
}

#[cfg(test)]
mod tests;
