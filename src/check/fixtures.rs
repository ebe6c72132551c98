//! Byte builders for fake peers: valid replies of each protocol the checks
//! speak. Shared by the probe unit tests (`check/tests.rs`) and the fuzz
//! targets (`tests/check_fuzz.rs`, which includes this file by path), so
//! both start from the same known-good answers. Only `std`.

#![allow(dead_code)]

/// An HTTP response with status `code` and the body `ok`.
pub fn status(code: u16) -> Vec<u8> {
    format!("HTTP/1.1 {code} X\r\nContent-Length: 2\r\nConnection: keep-alive\r\n\r\nok")
        .into_bytes()
}

/// Redis replies to PING and ROLE.
pub const PONG: &[u8] = b"+PONG\r\n";
pub const ROLE_MASTER: &[u8] = b"*3\r\n$6\r\nmaster\r\n:0\r\n*0\r\n";
pub const ROLE_SLAVE: &[u8] =
    b"*5\r\n$5\r\nslave\r\n$9\r\n127.0.0.1\r\n:6379\r\n$9\r\nconnected\r\n:14\r\n";

/// The nonce and plugin of the fake MySQL server.
pub const NONCE: [u8; 20] = *b"abcdefghij0123456789";
pub const NATIVE: &str = "mysql_native_password";

/// A MySQL packet: length, sequence number, payload.
pub fn packet(seq: u8, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut out = len.to_le_bytes()[..3].to_vec();
    out.push(seq);
    out.extend_from_slice(payload);
    out
}

/// A MySQL 5.7-like initial handshake packet.
pub fn greeting(nonce: &[u8; 20], plugin: &str) -> Vec<u8> {
    let caps: u32 = 0x0000_0001 | 0x200 | 0x2000 | 0x8000 | 0x8_0000 | 0x8;
    let mut p = vec![10];
    p.extend_from_slice(b"5.7.44-fake\0");
    p.extend_from_slice(&42u32.to_le_bytes());
    p.extend_from_slice(&nonce[..8]);
    p.push(0);
    p.extend_from_slice(&(caps as u16).to_le_bytes());
    p.push(33);
    p.extend_from_slice(&2u16.to_le_bytes());
    p.extend_from_slice(&((caps >> 16) as u16).to_le_bytes());
    p.push(21);
    p.extend_from_slice(&[0; 10]);
    p.extend_from_slice(&nonce[8..]);
    p.push(0);
    p.extend_from_slice(plugin.as_bytes());
    p.push(0);
    packet(0, &p)
}

/// A MySQL OK packet.
pub fn ok_packet(seq: u8) -> Vec<u8> {
    packet(seq, &[0x00, 0, 0, 2, 0, 0, 0])
}

/// A MySQL ERR packet.
pub fn err_packet(seq: u8, code: u16, message: &str) -> Vec<u8> {
    let mut p = vec![0xFF];
    p.extend_from_slice(&code.to_le_bytes());
    p.extend_from_slice(b"#28000");
    p.extend_from_slice(message.as_bytes());
    packet(seq, &p)
}

/// The result set of `SELECT @@global.read_only` holding `value`.
pub fn result_set(value: &[u8]) -> Vec<u8> {
    let mut col = Vec::new();
    for s in ["def", "", "", "", "@@global.read_only", ""] {
        col.push(s.len() as u8);
        col.extend_from_slice(s.as_bytes());
    }
    col.extend_from_slice(&[0x0c, 63, 0, 1, 0, 0, 0, 0x08, 0x80, 0, 0, 0, 0]);
    let mut row = vec![value.len() as u8];
    row.extend_from_slice(value);
    let eof = [0xFE, 0, 0, 2, 0];
    [
        packet(1, &[1]),
        packet(2, &col),
        packet(3, &eof),
        packet(4, &row),
        packet(5, &eof),
    ]
    .concat()
}

/// A PostgreSQL backend message: tag, length, body.
pub fn pg_msg(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    out.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
    out.extend_from_slice(body);
    out
}

/// A PostgreSQL FATAL ErrorResponse.
pub fn pg_error(code: &str, message: &str) -> Vec<u8> {
    let mut body = Vec::new();
    for (field, value) in [
        (b'S', "FATAL"),
        (b'V', "FATAL"),
        (b'C', code),
        (b'M', message),
    ] {
        body.push(field);
        body.extend_from_slice(value.as_bytes());
        body.push(0);
    }
    body.push(0);
    pg_msg(b'E', &body)
}

/// A PostgreSQL login without a password, up to ReadyForQuery.
pub fn pg_login_ok() -> Vec<u8> {
    [
        pg_msg(b'R', &0u32.to_be_bytes()),
        pg_msg(b'S', b"server_version\x0015.0\x00"),
        pg_msg(b'K', &[0, 0, 0, 1, 0, 0, 0, 2]),
        pg_msg(b'Z', b"I"),
    ]
    .concat()
}

/// The answer to `SELECT pg_is_in_recovery()`.
pub fn pg_result(value: &str) -> Vec<u8> {
    let mut desc = 1u16.to_be_bytes().to_vec();
    desc.extend_from_slice(b"pg_is_in_recovery\0");
    desc.extend_from_slice(&[
        0, 0, 0, 0, 0, 0, 0, 0, 0, 16, 0, 1, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0,
    ]);
    let mut row = 1u16.to_be_bytes().to_vec();
    row.extend_from_slice(&(value.len() as u32).to_be_bytes());
    row.extend_from_slice(value.as_bytes());
    [
        pg_msg(b'T', &desc),
        pg_msg(b'D', &row),
        pg_msg(b'C', b"SELECT 1\0"),
        pg_msg(b'Z', b"I"),
    ]
    .concat()
}
