//! The `mysql` check (MySQL and MariaDB), written against the client/server
//! protocol directly: handshake, `mysql_native_password` login, then
//! `SELECT @@global.read_only` for the role. No TLS, no other auth plugins.
//!
//! Every length a server sends is checked before use: malformed packets give
//! [`ProbeError::Protocol`], never a panic.

use std::io;

use sha1::{Digest, Sha1};
use tokio::io::AsyncWriteExt;

use super::{
    Budget, CheckStream, ProbeError, Role, Target, closed_before, connect, preview, read_some,
};
use crate::config::Credentials;

/// Largest packet accepted from the server.
const MAX_PACKET: usize = 1024 * 1024;

const CLIENT_LONG_PASSWORD: u32 = 0x1;
const CLIENT_PROTOCOL_41: u32 = 0x200;
const CLIENT_TRANSACTIONS: u32 = 0x2000;
const CLIENT_SECURE_CONNECTION: u32 = 0x8000;
const CLIENT_PLUGIN_AUTH: u32 = 0x8_0000;

const NATIVE_PASSWORD: &str = "mysql_native_password";
/// `utf8_general_ci`.
const CHARSET: u8 = 33;
const COM_QUIT: u8 = 0x01;
const COM_QUERY: u8 = 0x03;
/// Access denied: for the user, to the database, or (1698) for a user that
/// must log in another way (MariaDB `unix_socket`).
const AUTH_ERRORS: [u16; 3] = [1045, 1044, 1698];
/// Auth switches tolerated before giving up on a looping server.
const MAX_SWITCHES: usize = 2;
const QUERY: &str = "SELECT @@global.read_only";

/// Log in, read `@@global.read_only`, and say goodbye.
pub(super) async fn probe(
    credentials: &Credentials,
    addr: Target<'_>,
    budget: &Budget,
) -> Result<Option<Role>, ProbeError> {
    let mut conn = Conn {
        stream: connect(addr, budget).await?,
        buf: Vec::new(),
        seq: 0,
    };
    let greeting = conn.read_greeting().await?;
    login(&mut conn, &greeting, credentials).await?;
    let role = read_only(&mut conn).await;
    // Best effort: a clean goodbye keeps "Aborted connection" out of the
    // server's log.
    conn.seq = 0;
    let _ = conn.write_packet(&[COM_QUIT]).await;
    role.map(Some)
}

/// What the initial handshake packet says.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Greeting {
    pub(super) server_version: String,
    pub(super) connection_id: u32,
    pub(super) capabilities: u32,
    pub(super) charset: u8,
    pub(super) status: u16,
    /// Auth plugin data, both parts, without the trailing NUL.
    pub(super) nonce: Vec<u8>,
    pub(super) plugin: Option<String>,
}

/// Parse the initial handshake packet's payload.
pub(super) fn parse_greeting(payload: &[u8]) -> Result<Greeting, ProbeError> {
    let not_mysql =
        || ProbeError::Protocol(format!("not a MySQL server: got {}", preview(payload)));
    if payload.first() == Some(&0xFF) {
        // Refused before the handshake: "Host is blocked", "Too many connections".
        let (code, message) = parse_err(payload).ok_or_else(not_mysql)?;
        return Err(ProbeError::Failed(format!("MySQL error {code}: {message}")));
    }
    let mut r = Reader::new(payload);
    if r.u8() != Some(10) {
        return Err(not_mysql());
    }
    let server_version = String::from_utf8_lossy(r.cstr().ok_or_else(not_mysql)?).into_owned();
    let connection_id = r.u32().ok_or_else(not_mysql)?;
    let mut nonce = r.take(8).ok_or_else(not_mysql)?.to_vec();
    r.u8().ok_or_else(not_mysql)?; // filler
    let mut capabilities = u32::from(r.u16().ok_or_else(not_mysql)?);
    let mut greeting = Greeting {
        server_version,
        connection_id,
        capabilities,
        charset: 0,
        status: 0,
        nonce: Vec::new(),
        plugin: None,
    };
    if r.is_empty() {
        // Pre-4.1 servers stop here.
        greeting.nonce = nonce;
        return Ok(greeting);
    }
    greeting.charset = r.u8().ok_or_else(not_mysql)?;
    greeting.status = r.u16().ok_or_else(not_mysql)?;
    capabilities |= u32::from(r.u16().ok_or_else(not_mysql)?) << 16;
    greeting.capabilities = capabilities;
    let data_len = usize::from(r.u8().ok_or_else(not_mysql)?);
    r.take(10).ok_or_else(not_mysql)?; // reserved
    if capabilities & CLIENT_SECURE_CONNECTION != 0 {
        let part2 = r
            .take(data_len.saturating_sub(8).max(13))
            .ok_or_else(not_mysql)?;
        nonce.extend_from_slice(part2.strip_suffix(&[0]).unwrap_or(part2));
    }
    greeting.nonce = nonce;
    if capabilities & CLIENT_PLUGIN_AUTH != 0 {
        // Some 5.5 servers omit the final NUL.
        let name = r.cstr().unwrap_or_else(|| r.rest());
        greeting.plugin = Some(String::from_utf8_lossy(name).into_owned());
    }
    Ok(greeting)
}

/// Send the handshake response and follow auth switches to the end.
async fn login(
    conn: &mut Conn,
    greeting: &Greeting,
    credentials: &Credentials,
) -> Result<(), ProbeError> {
    let needed = CLIENT_PROTOCOL_41 | CLIENT_SECURE_CONNECTION;
    if greeting.capabilities & needed != needed {
        return Err(ProbeError::Failed(format!(
            "server {} is too old: no protocol 4.1 authentication",
            greeting.server_version
        )));
    }
    let password = credentials
        .password
        .as_ref()
        .map_or("", |p| p.expose())
        .as_bytes();
    let user = credentials.user.as_deref().unwrap_or_default();
    let plugin_auth = greeting.capabilities & CLIENT_PLUGIN_AUTH;
    let response = handshake_response(user, &scramble(password, &greeting.nonce), plugin_auth != 0);
    conn.write_packet(&response).await?;

    for _ in 0..=MAX_SWITCHES {
        let packet = conn.read_packet("the login result").await?;
        match packet.first() {
            Some(0x00) => return Ok(()),
            Some(0xFF) => return Err(err_packet(&packet, true)),
            Some(0xFE) => {
                let (plugin, nonce) = parse_auth_switch(&packet)?;
                if plugin != NATIVE_PASSWORD {
                    return Err(ProbeError::Failed(format!(
                        "authentication plugin {plugin} is not supported; create the monitoring user with {NATIVE_PASSWORD}"
                    )));
                }
                conn.write_packet(&scramble(password, &nonce)).await?;
            }
            _ => {
                return Err(ProbeError::Protocol(format!(
                    "unexpected MySQL login reply: {}",
                    preview(&packet)
                )));
            }
        }
    }
    Err(ProbeError::Protocol(
        "MySQL server keeps switching authentication".to_string(),
    ))
}

/// HandshakeResponse41 for `mysql_native_password`.
pub(super) fn handshake_response(user: &str, auth: &[u8], plugin_auth: bool) -> Vec<u8> {
    let mut caps =
        CLIENT_LONG_PASSWORD | CLIENT_PROTOCOL_41 | CLIENT_SECURE_CONNECTION | CLIENT_TRANSACTIONS;
    if plugin_auth {
        caps |= CLIENT_PLUGIN_AUTH;
    }
    let mut out = Vec::with_capacity(64 + user.len());
    out.extend_from_slice(&caps.to_le_bytes());
    out.extend_from_slice(&(16u32 << 20).to_le_bytes()); // max packet
    out.push(CHARSET);
    out.extend_from_slice(&[0; 23]);
    out.extend_from_slice(user.as_bytes());
    out.push(0);
    // A scramble is 20 bytes or none.
    out.push(u8::try_from(auth.len()).unwrap_or(0));
    out.extend_from_slice(auth.get(..255).unwrap_or(auth));
    if plugin_auth {
        out.extend_from_slice(NATIVE_PASSWORD.as_bytes());
        out.push(0);
    }
    out
}

/// `mysql_native_password`: SHA1(pw) XOR SHA1(nonce + SHA1(SHA1(pw))).
pub(super) fn scramble(password: &[u8], nonce: &[u8]) -> Vec<u8> {
    if password.is_empty() {
        return Vec::new();
    }
    let stage1 = Sha1::digest(password);
    let stage2 = Sha1::digest(stage1);
    let mut hasher = Sha1::new();
    hasher.update(nonce);
    hasher.update(stage2);
    let mask = hasher.finalize();
    stage1.iter().zip(mask.iter()).map(|(a, b)| a ^ b).collect()
}

/// An AuthSwitchRequest: plugin name and its data (the new nonce).
fn parse_auth_switch(packet: &[u8]) -> Result<(String, Vec<u8>), ProbeError> {
    let mut r = Reader::new(packet);
    r.u8();
    if r.is_empty() {
        // The pre-4.1 switch request carries no name.
        return Ok(("mysql_old_password".to_string(), Vec::new()));
    }
    let name = r.cstr().ok_or_else(|| {
        ProbeError::Protocol(format!(
            "bad MySQL auth switch request: {}",
            preview(packet)
        ))
    })?;
    let data = r.rest();
    Ok((
        String::from_utf8_lossy(name).into_owned(),
        data.strip_suffix(&[0]).unwrap_or(data).to_vec(),
    ))
}

/// Run the query and read its single value.
async fn read_only(conn: &mut Conn) -> Result<Role, ProbeError> {
    conn.seq = 0;
    let mut query = vec![COM_QUERY];
    query.extend_from_slice(QUERY.as_bytes());
    conn.write_packet(&query).await?;

    let bad = |what: &str| ProbeError::Protocol(format!("bad MySQL result set: {what}"));
    let first = conn.read_packet("the query result").await?;
    let columns = match first.first() {
        Some(0xFF) => return Err(err_packet(&first, false)),
        Some(0x00) => return Err(bad("no rows")),
        _ => Reader::new(&first)
            .lenenc_int()
            .ok_or_else(|| bad("column count"))?,
    };
    if columns == 0 || columns > 64 {
        return Err(bad("column count"));
    }
    for _ in 0..columns {
        let def = conn.read_packet("a column definition").await?;
        if def.first() == Some(&0xFF) {
            return Err(err_packet(&def, false));
        }
    }
    if !is_eof(&conn.read_packet("the end of columns").await?) {
        return Err(bad("no EOF after the columns"));
    }
    let mut value = None;
    loop {
        let row = conn.read_packet("a row").await?;
        if is_eof(&row) {
            break;
        }
        if row.first() == Some(&0xFF) {
            return Err(err_packet(&row, false));
        }
        if value.is_some() {
            return Err(bad("more than one row"));
        }
        value = Some(parse_row_value(&row).ok_or_else(|| bad("row"))?);
    }
    match value.ok_or_else(|| bad("no rows"))? {
        Some(v) => role_of(&v),
        None => Err(ProbeError::Protocol(
            "@@global.read_only is NULL".to_string(),
        )),
    }
}

/// The first column of a text row: `Some(None)` for NULL.
pub(super) fn parse_row_value(row: &[u8]) -> Option<Option<Vec<u8>>> {
    if row.first() == Some(&0xFB) {
        return Some(None);
    }
    Reader::new(row).lenenc_str().map(|s| Some(s.to_vec()))
}

/// `@@global.read_only` → role.
pub(super) fn role_of(value: &[u8]) -> Result<Role, ProbeError> {
    match value.to_ascii_uppercase().as_slice() {
        b"0" | b"OFF" => Ok(Role::Primary),
        // NO_LOCK*: MariaDB's newer read-only modes, still read-only.
        b"1" | b"ON" | b"NO_LOCK" | b"NO_LOCK_NO_ADMIN" => Ok(Role::Replica),
        _ => Err(ProbeError::Protocol(format!(
            "unexpected @@global.read_only: {}",
            preview(value)
        ))),
    }
}

/// An EOF packet (0xFE, shorter than a row that starts with an 8-byte length).
fn is_eof(packet: &[u8]) -> bool {
    packet.first() == Some(&0xFE) && packet.len() < 9
}

/// An ERR packet → `Auth` (access denied during login) or `Failed`.
fn err_packet(packet: &[u8], login: bool) -> ProbeError {
    match parse_err(packet) {
        Some((code, message)) if login && AUTH_ERRORS.contains(&code) => ProbeError::Auth(message),
        Some((code, message)) => ProbeError::Failed(format!("MySQL error {code}: {message}")),
        None => ProbeError::Protocol(format!("bad MySQL error packet: {}", preview(packet))),
    }
}

/// An ERR packet's code and message.
pub(super) fn parse_err(packet: &[u8]) -> Option<(u16, String)> {
    let mut r = Reader::new(packet);
    if r.u8()? != 0xFF {
        return None;
    }
    let code = r.u16()?;
    let mut rest = r.rest();
    // `#` and a 5-character SQL state, absent from pre-handshake errors.
    if rest.first() == Some(&b'#') && rest.len() >= 6 {
        rest = rest.get(6..)?;
    }
    Some((code, String::from_utf8_lossy(rest).into_owned()))
}

/// One connection, what was read ahead, and the packet sequence number.
struct Conn {
    stream: CheckStream,
    buf: Vec<u8>,
    seq: u8,
}

impl Conn {
    async fn write_packet(&mut self, payload: &[u8]) -> Result<(), ProbeError> {
        let len = u32::try_from(payload.len())
            .unwrap_or(u32::MAX)
            .min(0xFF_FFFF);
        let mut out = Vec::with_capacity(4 + payload.len());
        out.extend_from_slice(len.to_le_bytes().get(..3).unwrap_or_default());
        out.push(self.seq);
        out.extend_from_slice(payload);
        self.seq = self.seq.wrapping_add(1);
        self.stream.write_all(&out).await.map_err(ProbeError::Io)
    }

    /// The greeting, where anything malformed means "not MySQL".
    async fn read_greeting(&mut self) -> Result<Greeting, ProbeError> {
        let payload = match self.read_packet("the greeting").await {
            // Anything but a whole packet means another protocol.
            Err(ProbeError::Protocol(_) | ProbeError::Io(_)) if !self.buf.is_empty() => {
                return Err(ProbeError::Protocol(format!(
                    "not a MySQL server: got {}",
                    preview(&self.buf)
                )));
            }
            other => other?,
        };
        parse_greeting(&payload)
    }

    /// Read one packet; `what` names it in errors.
    async fn read_packet(&mut self, what: &str) -> Result<Vec<u8>, ProbeError> {
        loop {
            if let Some((len, seq)) = header(&self.buf) {
                if len > MAX_PACKET {
                    return Err(ProbeError::Protocol(format!(
                        "MySQL packet of {len} bytes rejected reading {what}"
                    )));
                }
                if let Some(payload) = self.buf.get(4..4 + len) {
                    let payload = payload.to_vec();
                    self.buf.drain(..4 + len);
                    self.seq = seq.wrapping_add(1);
                    return Ok(payload);
                }
            }
            if read_some(&mut self.stream, &mut self.buf, 4 + MAX_PACKET).await? == 0 {
                if self.buf.is_empty() {
                    return Err(closed_before(what));
                }
                return Err(ProbeError::Io(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "connection closed mid-packet reading {what}: got {}",
                        preview(&self.buf)
                    ),
                )));
            }
        }
    }
}

/// A packet header: payload length and sequence number.
fn header(buf: &[u8]) -> Option<(usize, u8)> {
    match buf.get(..4)? {
        &[a, b, c, seq] => Some((
            usize::from(a) | usize::from(b) << 8 | usize::from(c) << 16,
            seq,
        )),
        _ => None,
    }
}

/// A cursor over a packet where every read is checked.
struct Reader<'a> {
    data: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(data: &'a [u8]) -> Self {
        Reader { data }
    }

    fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, rest) = self.data.split_at_checked(n)?;
        self.data = rest;
        Some(head)
    }

    fn u8(&mut self) -> Option<u8> {
        self.take(1)?.first().copied()
    }

    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_le_bytes(self.take(2)?.try_into().ok()?))
    }

    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }

    /// Up to the next NUL, which is consumed.
    fn cstr(&mut self) -> Option<&'a [u8]> {
        let end = self.data.iter().position(|&b| b == 0)?;
        let s = self.take(end)?;
        self.take(1)?;
        Some(s)
    }

    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.data)
    }

    /// A length-encoded integer (0xFB, NULL, is not one).
    fn lenenc_int(&mut self) -> Option<u64> {
        let n = |b: &[u8]| b.iter().rev().fold(0u64, |acc, &x| acc << 8 | u64::from(x));
        match self.u8()? {
            b @ 0..=0xFA => Some(u64::from(b)),
            0xFC => self.take(2).map(n),
            0xFD => self.take(3).map(n),
            0xFE => self.take(8).map(n),
            _ => None,
        }
    }

    fn lenenc_str(&mut self) -> Option<&'a [u8]> {
        let len = usize::try_from(self.lenenc_int()?).ok()?;
        self.take(len)
    }
}
