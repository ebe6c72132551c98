//! Reading a client's ClientHello without consuming it, for `tls: passthrough`.
//!
//! The bytes stay in the socket's receive queue (`MSG_PEEK`), so the
//! backend later gets them untouched, and the relay can splice. Records
//! and the handshake message are parsed by `tls-parser`; this file only
//! joins the handshake fragments of several records (a ClientHello may be
//! split across records, and arrive in pieces of any size).

use std::io;

use tls_parser::{
    SNIType, TlsExtension, TlsMessage, TlsMessageHandshake, TlsRecordType,
    parse_tls_client_hello_extensions, parse_tls_message_handshake, parse_tls_raw_record,
};

use crate::relay::Socket;

/// The most bytes looked at for a ClientHello (the largest real ones, with
/// post-quantum key shares, take under 2 KiB).
pub const MAX_HELLO_BYTES: usize = 16 * 1024;

/// Why no server name came.
#[derive(Debug, thiserror::Error)]
pub enum HelloError {
    /// The bytes are not a TLS ClientHello.
    #[error("not a TLS ClientHello: {0}")]
    NotTls(&'static str),
    /// The client closed before its ClientHello was whole.
    #[error("closed before the ClientHello was complete")]
    Closed,
    /// Reading the socket failed.
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// What the bytes so far say.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// A whole ClientHello, with its server name if it sent one.
    Hello(Option<String>),
    /// A valid beginning: more bytes are needed.
    Partial,
}

/// Parse the start of a client's byte stream.
pub fn parse(bytes: &[u8]) -> Result<Parsed, HelloError> {
    let mut rest = bytes;
    let mut handshake: Vec<u8> = Vec::new();
    loop {
        // The first byte alone already tells a non-TLS client.
        if let Some(&t) = rest.first() {
            if t != u8::from(TlsRecordType::Handshake) {
                return Err(HelloError::NotTls(if handshake.is_empty() {
                    "the first record is not a handshake record"
                } else {
                    "the ClientHello is interrupted by another record"
                }));
            }
        }
        if rest.len() >= 2 && rest[1] != 3 {
            return Err(HelloError::NotTls("unknown record version"));
        }
        let record = match parse_tls_raw_record(rest) {
            Ok((after, record)) => {
                rest = after;
                record
            }
            Err(tls_parser::Err::Incomplete(_)) => return Ok(Parsed::Partial),
            Err(_) => return Err(HelloError::NotTls("malformed record")),
        };
        if record.data.is_empty() {
            return Err(HelloError::NotTls("empty handshake record"));
        }
        handshake.extend_from_slice(record.data);
        if handshake.len() < 4 {
            continue;
        }
        if handshake[0] != 1 {
            return Err(HelloError::NotTls(
                "the first handshake message is not a ClientHello",
            ));
        }
        let len = usize::from(handshake[1]) << 16
            | usize::from(handshake[2]) << 8
            | usize::from(handshake[3]);
        if len + 4 > MAX_HELLO_BYTES {
            return Err(HelloError::NotTls("ClientHello too large"));
        }
        if handshake.len() < len + 4 {
            continue;
        }
        return match parse_tls_message_handshake(&handshake[..len + 4]) {
            Ok((_, TlsMessage::Handshake(TlsMessageHandshake::ClientHello(hello)))) => {
                Ok(Parsed::Hello(server_name(hello.ext)?))
            }
            _ => Err(HelloError::NotTls("malformed ClientHello")),
        };
    }
}

/// The host name of the `server_name` extension, if there is one.
fn server_name(extensions: Option<&[u8]>) -> Result<Option<String>, HelloError> {
    let Some(ext) = extensions else {
        return Ok(None);
    };
    let Ok((_, extensions)) = parse_tls_client_hello_extensions(ext) else {
        return Err(HelloError::NotTls("malformed ClientHello extensions"));
    };
    for e in extensions {
        if let TlsExtension::SNI(names) = e {
            for (t, name) in names {
                if t == SNIType::HostName {
                    return match std::str::from_utf8(name) {
                        Ok(n) if n.is_ascii() => Ok(Some(n.to_string())),
                        _ => Err(HelloError::NotTls("a server name that is not ASCII")),
                    };
                }
            }
        }
    }
    Ok(None)
}

/// Wait until `socket` holds a whole ClientHello, and return its server
/// name; nothing is consumed. The caller bounds the wait.
pub async fn peek(socket: &Socket) -> Result<Option<String>, HelloError> {
    let mut buf = vec![0u8; MAX_HELLO_BYTES + 5];
    loop {
        let mut guard = socket.readable().await?;
        let peeked = guard.try_io(|s| s.get_ref().peek(&mut buf));
        match peeked {
            Ok(Ok(0)) => return Err(HelloError::Closed),
            Ok(Ok(n)) => match parse(&buf[..n])? {
                Parsed::Hello(name) => return Ok(name),
                // Everything queued has been seen: wait for more to arrive.
                Parsed::Partial if n < buf.len() => guard.clear_ready(),
                Parsed::Partial => return Err(HelloError::NotTls("ClientHello too large")),
            },
            Ok(Err(e)) => return Err(HelloError::Io(e)),
            Err(_would_block) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A real ClientHello, made by rustls, for `name`.
    pub(crate) fn client_hello(name: &str) -> Vec<u8> {
        let roots = rustls::RootCertStore::empty();
        let config = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let mut conn = rustls::ClientConnection::new(
            std::sync::Arc::new(config),
            rustls::pki_types::ServerName::try_from(name.to_string()).unwrap(),
        )
        .unwrap();
        let mut out = Vec::new();
        conn.write_tls(&mut out).unwrap();
        out
    }

    /// The same ClientHello re-framed into records of `size` bytes each.
    fn refragment(hello: &[u8], size: usize) -> Vec<u8> {
        let body = &hello[5..];
        let mut out = Vec::new();
        for chunk in body.chunks(size) {
            out.extend_from_slice(&[22, 3, 1]);
            out.extend_from_slice(&(chunk.len() as u16).to_be_bytes());
            out.extend_from_slice(chunk);
        }
        out
    }

    #[test]
    fn a_whole_client_hello_gives_its_name_and_every_prefix_asks_for_more() {
        let hello = client_hello("db.example.com");
        assert_eq!(
            parse(&hello).unwrap(),
            Parsed::Hello(Some("db.example.com".to_string()))
        );
        for cut in 0..hello.len() {
            assert_eq!(
                parse(&hello[..cut]).unwrap(),
                Parsed::Partial,
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn a_client_hello_split_over_records_is_joined() {
        let hello = client_hello("a.example.com");
        for size in [1, 3, 100] {
            let split = refragment(&hello, size);
            assert_eq!(
                parse(&split).unwrap(),
                Parsed::Hello(Some("a.example.com".to_string())),
                "records of {size}"
            );
        }
    }

    #[test]
    fn other_protocols_are_not_tls() {
        for bytes in [
            &b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..],
            &b"\x16\x02\x00\x00\x05hello"[..],
            // A handshake record that holds a ServerHello.
            &b"\x16\x03\x03\x00\x04\x02\x00\x00\x00"[..],
            // An empty handshake record.
            &b"\x16\x03\x01\x00\x00"[..],
        ] {
            assert!(
                matches!(parse(bytes), Err(HelloError::NotTls(_))),
                "{bytes:?}: {:?}",
                parse(bytes)
            );
        }
    }

    #[test]
    fn a_client_hello_without_a_name_routes_as_nameless() {
        // rustls sends no SNI for an IP address.
        let roots = rustls::RootCertStore::empty();
        let config = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let mut conn = rustls::ClientConnection::new(
            std::sync::Arc::new(config),
            rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap(),
        )
        .unwrap();
        let mut out = Vec::new();
        conn.write_tls(&mut out).unwrap();
        assert_eq!(parse(&out).unwrap(), Parsed::Hello(None));
    }
}
