//! Fuzz targets for the health-check probes, one per protocol a peer can
//! lie in: PostgreSQL, MySQL, Redis, HTTP, send/expect. Each runs the real
//! probe against a fake peer on 127.0.0.1 that plays an adversarial script:
//! random bytes, mutated copies of a valid exchange (flipped, inserted,
//! deleted and repeated bytes, extreme length fields, cut short), a valid
//! start followed by an endless stream of tiny or huge frames, and the valid
//! exchange split into pieces that arrive one by one (and, in a separate
//! test, split at every byte boundary). Every case must:
//!
//! - end by itself, within [`DEADLINE`] (the peer always hangs up in the
//!   end, so a probe that does not return is stuck);
//! - stay within [`MEMORY_LIMIT`] bytes of heap at its peak, and leave
//!   nothing allocated behind (counted per thread by `allocation-counter`);
//! - not panic, and fail with a message fit for one log line;
//! - never hand the password to a peer that must not get it;
//! - pass, with the right role, whenever the exchange is only split up.
//!
//! `make test` runs [`cases`] per target (`SLUICE_FUZZ_CASES`, default 40);
//! `make fuzz` runs many more. Proptest shrinks a failing script and prints it.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

#[path = "../src/check/fixtures.rs"]
mod fixtures;

use std::cell::Cell;
use std::fmt::{self, Write as _};
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use fixtures::*;
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use sluice::check::{Budget, READ_BUDGET, Role, probe_within};
use sluice::config::{
    CheckKind, Credentials, Expect, HttpCheck, Pattern, PostgresCheck, Secret, Step,
};
use tokio::runtime::Runtime;

/// The longest a probe may take against a peer that always hangs up in the
/// end (within seconds). A case takes milliseconds; this is generous because
/// the test machine is shared, and a shared machine has been seen to stall
/// every process on it for many seconds.
const DEADLINE: Duration = Duration::from_secs(60);

/// Most heap one probe may hold at once. The read budget (1 MiB) plus what
/// the protocol code keeps around it: a read buffer, one message copied out,
/// the driver's parsed messages.
const MEMORY_LIMIT: u64 = 8 * 1024 * 1024;

/// Heap a finished probe may leave behind (the runtime's own lazily grown
/// tables); a probe that kept what a peer sent would leave far more.
const RETAINED_LIMIT: i64 = 16 * 1024;

/// Most bytes a flood sends before giving up on a probe that never hangs
/// up (a probe without a read budget reads it all).
const FLOOD_CAP: usize = 64 * 1024 * 1024;

/// The monitor password: must reach no peer that should not get it.
const SECRET: &str = "fuzz-s3cret-pw";

/// How long a mutated script's peer waits for the client's next request
/// before it plays on: short, because a bent reply often leaves the client
/// waiting for more.
const SHORT_WAIT: Duration = Duration::from_millis(40);

/// How long a valid script's peer waits: the client always asks.
const LONG_WAIT: Duration = Duration::from_secs(5);

/// Cases per fuzz target: `SLUICE_FUZZ_CASES`, default 40.
fn cases() -> u32 {
    std::env::var("SLUICE_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(40)
}

// ------------------------------------------------------------- the peer

/// One move of the fake peer.
#[derive(Clone)]
enum Move {
    /// Wait (at most this long) for the client's next request.
    Read(Duration),
    /// Write these pieces one after another, with a short pause between
    /// them so that the client reads each separately.
    Write(Vec<Vec<u8>>),
    /// Write this unit over and over until the client hangs up.
    Flood(Vec<u8>),
}

/// Short, for proptest's report of a failing case: lengths and a preview.
impl fmt::Debug for Move {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let show = |b: &[u8]| {
            let head: String = b
                .iter()
                .take(48)
                .flat_map(|&c| std::ascii::escape_default(c))
                .map(char::from)
                .collect();
            format!("{} bytes \"{head}\"", b.len())
        };
        match self {
            Move::Read(wait) => write!(f, "Read({wait:?})"),
            Move::Write(pieces) => {
                let pieces: Vec<String> = pieces.iter().map(|p| show(p)).collect();
                write!(f, "Write[{}]", pieces.join(", "))
            }
            Move::Flood(unit) => write!(f, "Flood({})", show(unit)),
        }
    }
}

type Script = Vec<Move>;

/// Everything the peer writes, in order (a flood's unit once).
fn written(script: &Script) -> Vec<u8> {
    let mut out = Vec::new();
    for m in script {
        match m {
            Move::Read(_) => {}
            Move::Write(pieces) => pieces.iter().for_each(|p| out.extend_from_slice(p)),
            Move::Flood(unit) => out.extend_from_slice(unit),
        }
    }
    out
}

/// A fake peer serving up to `conns` connections, each with the script.
struct Peer {
    addr: SocketAddr,
    done: Arc<AtomicBool>,
    thread: JoinHandle<Vec<u8>>,
}

impl Peer {
    fn start(script: Script, conns: usize) -> Peer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let done = Arc::new(AtomicBool::new(false));
        let stop = Arc::clone(&done);
        let thread = std::thread::spawn(move || {
            let mut read = Vec::new();
            for _ in 0..conns {
                let Ok((s, _)) = listener.accept() else {
                    break;
                };
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                play(s, &script, &mut read);
            }
            read
        });
        Peer { addr, done, thread }
    }

    /// Stop and return everything the client sent.
    fn finish(self) -> Vec<u8> {
        self.done.store(true, Ordering::SeqCst);
        // Wake a peer waiting for a connection that will not come.
        let _ = TcpStream::connect(self.addr);
        self.thread.join().unwrap()
    }
}

fn timed_out(e: &std::io::Error) -> bool {
    matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)
}

/// Play `script` on one connection, appending what the client sends to
/// `read`; then hang up.
fn play(mut s: TcpStream, script: &Script, read: &mut Vec<u8>) {
    let _ = s.set_nodelay(true);
    let _ = s.set_write_timeout(Some(DEADLINE));
    let mut buf = [0u8; 16 * 1024];
    let keep = |read: &mut Vec<u8>, data: &[u8]| {
        // What a client sends is small; keep enough to search it.
        if read.len() < 1024 * 1024 {
            read.extend_from_slice(data);
        }
    };
    for m in script {
        match m {
            Move::Read(wait) => {
                let _ = s.set_read_timeout(Some(*wait));
                match s.read(&mut buf) {
                    Ok(0) => return,
                    Ok(n) => keep(read, &buf[..n]),
                    Err(e) if timed_out(&e) => {}
                    Err(_) => return,
                }
            }
            Move::Write(pieces) => {
                for (i, piece) in pieces.iter().enumerate() {
                    if i > 0 {
                        // Not a wait for a state: spacing the pieces so
                        // that the client reads them one at a time.
                        std::thread::sleep(Duration::from_millis(2));
                    }
                    if s.write_all(piece).is_err() {
                        return;
                    }
                }
            }
            Move::Flood(unit) => {
                let mut sent = 0;
                while sent < FLOOD_CAP {
                    if s.write_all(unit).is_err() {
                        return;
                    }
                    sent += unit.len().max(1);
                }
            }
        }
    }
    // Hang up our side, and take what the client still sends until it
    // closes too.
    let _ = s.shutdown(Shutdown::Write);
    let _ = s.set_read_timeout(Some(Duration::from_millis(100)));
    let end = Instant::now() + Duration::from_secs(2);
    while Instant::now() < end {
        match s.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => keep(read, &buf[..n]),
            Err(e) if timed_out(&e) => {}
            Err(_) => return,
        }
    }
}

// ------------------------------------------------------------ one case

/// What one probe did.
struct Outcome {
    /// `None`: still running at the deadline.
    result: Option<Result<Option<Role>, String>>,
    /// Heap of this thread during the probe.
    memory: allocation_counter::AllocationInfo,
    took: Duration,
    /// What the peer received.
    read: Vec<u8>,
    /// What the probe read from the peer.
    received: usize,
}

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Run the probe of `target` against a peer playing `script`. The peer is
/// started before and stopped after the measured stretch, on its own
/// thread: only the probe's own heap is counted.
fn run_case(rt: &Runtime, target: &Target, script: &Script) -> Outcome {
    let peer = Peer::start(script.clone(), target.conns);
    let addr = peer.addr;
    // Room for any message, so that writing it allocates nothing.
    let mut message = String::with_capacity(16 * 1024);
    let mut result = None;
    let budget = Budget::new(READ_BUDGET);
    let start = Instant::now();
    let memory = allocation_counter::measure(|| {
        let probe = probe_within(&target.kind, addr, "fuzz.test", &budget);
        result = match rt.block_on(async { tokio::time::timeout(DEADLINE, probe).await }) {
            Err(_) => None,
            Ok(Ok(role)) => Some(Ok(role)),
            Ok(Err(e)) => {
                let _ = write!(message, "{e}");
                Some(Err(()))
            }
        };
    });
    let took = start.elapsed();
    let read = peer.finish();
    Outcome {
        result: result.map(|r| r.map_err(|()| message)),
        memory,
        took,
        read,
        received: budget.used(),
    }
}

/// What every case must satisfy, whatever the peer did.
fn check(target: &Target, script: &Script, o: &Outcome) -> Result<(), TestCaseError> {
    let Some(result) = &o.result else {
        return Err(TestCaseError::fail(format!(
            "{}: the probe was still running after {DEADLINE:?}",
            target.name
        )));
    };
    prop_assert!(
        o.received <= READ_BUDGET + 1,
        "{}: the probe read {} bytes, past its budget",
        target.name,
        o.received
    );
    prop_assert!(
        o.memory.bytes_max <= MEMORY_LIMIT,
        "{}: the probe held {} bytes at its peak (limit {MEMORY_LIMIT}); {:?}",
        target.name,
        o.memory.bytes_max,
        result
    );
    prop_assert!(
        o.memory.bytes_current <= RETAINED_LIMIT,
        "{}: the probe left {} bytes allocated behind",
        target.name,
        o.memory.bytes_current
    );
    if let Err(message) = result {
        prop_assert!(!message.is_empty());
        prop_assert!(
            message.len() <= 2048 && !message.chars().any(char::is_control),
            "{}: an error unfit for one log line: {message:?}",
            target.name
        );
    }
    let leaked = o.read.windows(SECRET.len()).any(|w| w == SECRET.as_bytes());
    prop_assert!(
        !leaked || (target.may_get_password)(&written(script)),
        "{}: the password went to this peer; the probe said {result:?}",
        target.name
    );
    for (bytes, what) in target.forbidden {
        prop_assert!(
            !o.read.windows(bytes.len()).any(|w| w == *bytes),
            "{}: {what} went to this peer; the probe said {result:?}",
            target.name
        );
    }
    Ok(())
}

// ------------------------------------------------------------- targets

/// One fuzz target: a probe, the exchange it passes, and what to flood with.
struct Target {
    name: &'static str,
    kind: CheckKind,
    /// A valid exchange (reads wait [`LONG_WAIT`]).
    valid: Script,
    /// The role the valid exchange reports.
    role: Option<Role>,
    /// Connections the probe opens (HTTP: one per request).
    conns: usize,
    /// Frames to flood with: tiny, huge, valid-looking.
    units: Vec<Vec<u8>>,
    /// Known-hostile scripts, run before the generated ones.
    corpus: Vec<Script>,
    /// Whether a peer that wrote these bytes may receive the password.
    may_get_password: fn(&[u8]) -> bool,
    /// Bytes no peer may receive, and what they would be.
    forbidden: &'static [(&'static [u8], &'static str)],
}

fn never(_: &[u8]) -> bool {
    false
}

fn read() -> Move {
    Move::Read(LONG_WAIT)
}

fn write(bytes: Vec<u8>) -> Move {
    Move::Write(vec![bytes])
}

fn secret() -> Option<Secret> {
    Some(Secret::new(SECRET.to_string()))
}

fn send_expect() -> Target {
    Target {
        name: "send_expect",
        kind: CheckKind::SendExpect(vec![
            Step::Send(b"HELLO\r\n".to_vec()),
            Step::Expect(Expect::Pattern(Pattern::new("^OK ready\r\n").unwrap())),
            Step::Send(b"STATUS\r\n".to_vec()),
            Step::Expect(Expect::Bytes(b"+UP".to_vec())),
        ]),
        valid: vec![
            read(),
            write(b"OK ready\r\n".to_vec()),
            read(),
            write(b"+UP\r\n".to_vec()),
        ],
        role: None,
        conns: 1,
        units: vec![
            b"x".to_vec(),
            b"OK".to_vec(),
            b"OK ready".to_vec(),
            vec![b'z'; 64 * 1024],
        ],
        corpus: vec![],
        may_get_password: never,
        forbidden: &[],
    }
}

fn http() -> Target {
    let ok =
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n".to_vec();
    Target {
        name: "http",
        kind: CheckKind::Http(HttpCheck {
            path: "/health".to_string(),
            body: Some(Pattern::new("hel+o").unwrap()),
            primary_path: Some("/primary".to_string()),
            ..HttpCheck::default()
        }),
        valid: vec![read(), write(ok)],
        role: Some(Role::Primary),
        conns: 2,
        units: vec![
            b"X-Fill: aaaaaaaa\r\n".to_vec(),
            b"HTTP/1.1 100 Continue\r\n\r\n".to_vec(),
            b"4\r\nabcd\r\n".to_vec(),
            b"\r\n".to_vec(),
            vec![b'a'; 64 * 1024],
        ],
        corpus: vec![],
        may_get_password: never,
        forbidden: &[],
    }
}

fn redis() -> Target {
    Target {
        name: "redis",
        kind: CheckKind::Redis(Credentials {
            user: Some("mon".to_string()),
            password: secret(),
        }),
        valid: vec![
            read(),
            write(b"-NOAUTH Authentication required.\r\n".to_vec()),
            read(),
            write(b"+OK\r\n".to_vec()),
            read(),
            write(PONG.to_vec()),
            read(),
            write(ROLE_SLAVE.to_vec()),
        ],
        role: Some(Role::Replica),
        conns: 1,
        units: vec![
            PONG.to_vec(),
            b"+".to_vec(),
            vec![b'a'; 4096],
            b"*1\r\n".to_vec(),
            b":1\r\n".to_vec(),
            [b"$1048576\r\n".as_slice(), &[b'b'; 4096]].concat(),
            b"*3\r\n$6\r\nmaster\r\n$1000\r\n".to_vec(),
        ],
        corpus: vec![],
        // AUTH goes only to a peer whose first reply is RESP's +… or
        // -NOAUTH.
        may_get_password: |w| w.starts_with(b"+") || w.starts_with(b"-NOAUTH"),
        forbidden: &[],
    }
}

/// A server that asks to switch to each plugin, known or not: only
/// `mysql_native_password` is answered, and never with the password itself.
fn mysql_switches() -> Vec<Script> {
    let plugins: [&[u8]; 9] = [
        b"mysql_clear_password",
        b"dialog",
        b"sha256_password",
        b"caching_sha2_password",
        b"client_ed25519",
        b"auth_gssapi_client",
        b"mysql_native_password",
        b"",
        b"\xff\nforged log line",
    ];
    let mut corpus: Vec<Script> = plugins
        .iter()
        .map(|plugin| {
            let switch = [&[0xFE][..], plugin, b"\0", &NONCE, b"\0"].concat();
            vec![
                write(greeting(&NONCE, NATIVE)),
                read(),
                write(packet(2, &switch)),
                read(),
                write(ok_packet(4)),
                read(),
                write(result_set(b"1")),
            ]
        })
        .collect();
    // The pre-4.1 switch (0xFE alone), more-data packets, and a greeting
    // that names the cleartext plugin from the start.
    for reply in [vec![0xFE], vec![0x01, 0x03], vec![0x01, 0x04]] {
        corpus.push(vec![
            write(greeting(&NONCE, NATIVE)),
            read(),
            write(packet(2, &reply)),
            read(),
            write(ok_packet(4)),
        ]);
    }
    corpus.push(vec![
        write(greeting(&NONCE, "mysql_clear_password")),
        read(),
        write(ok_packet(2)),
        read(),
        write(result_set(b"1")),
    ]);
    corpus
}

fn mysql() -> Target {
    let mut def = Vec::new();
    for s in ["def", "", "", "", "@@global.read_only", ""] {
        def.push(s.len() as u8);
        def.extend_from_slice(s.as_bytes());
    }
    Target {
        name: "mysql",
        kind: CheckKind::Mysql(Credentials {
            user: Some("m".to_string()),
            password: secret(),
        }),
        valid: vec![
            write(greeting(&NONCE, NATIVE)),
            read(),
            write(ok_packet(2)),
            read(),
            write(result_set(b"1")),
        ],
        role: Some(Role::Replica),
        conns: 1,
        units: vec![
            packet(2, &def),
            packet(3, &[1, b'1']),
            packet(0, &[]),
            packet(1, &vec![b'c'; 1000]),
            packet(4, &vec![b'd'; 1024 * 1024 - 1]),
            vec![0xFF, 0xFF, 0xFF, 0x01],
        ],
        corpus: mysql_switches(),
        // Only a scramble ever goes out, never the password.
        may_get_password: never,
        forbidden: &[],
    }
}

fn postgres(allow_md5: bool) -> Target {
    let mut row = 1u16.to_be_bytes().to_vec();
    row.extend_from_slice(&1u32.to_be_bytes());
    row.push(b't');
    let mut notice = b"SNOTICE\0C00000\0M".to_vec();
    notice.extend_from_slice(&[b'n'; 2000]);
    notice.extend_from_slice(b"\0\0");
    let mut huge = vec![b'D'];
    huge.extend_from_slice(&(1024u32 * 1024).to_be_bytes());
    huge.extend_from_slice(&[0; 4096]);
    let mut desc = 1u16.to_be_bytes().to_vec();
    desc.extend_from_slice(b"pg_is_in_recovery\0");
    desc.extend_from_slice(&[0; 18]);
    let login_ok = pg_msg(b'R', &0u32.to_be_bytes());
    // An authentication request as a server sends it: MD5 with its salt,
    // SASL with its mechanism list.
    let asks = |code: u32| {
        let extra: &[u8] = match code {
            5 => b"salt",
            10 => b"SCRAM-SHA-256\0\0",
            _ => b"",
        };
        Move::Write(vec![pg_msg(
            b'R',
            &[&code.to_be_bytes()[..], extra].concat(),
        )])
    };
    let mut param = Vec::new();
    for i in 0..200 {
        param.extend(pg_msg(
            b'S',
            format!("p{i}\0{}\0", "v".repeat(100)).as_bytes(),
        ));
    }
    let corpus = vec![
        // Rows after the description: tiny ones cost the driver most.
        vec![
            read(),
            write(pg_login_ok()),
            read(),
            write(pg_msg(b'T', &desc)),
            Move::Flood(pg_msg(b'D', &[0, 0])),
        ],
        vec![
            read(),
            write(pg_login_ok()),
            read(),
            write(pg_msg(b'T', &desc)),
            Move::Flood(pg_msg(b'D', &row)),
        ],
        // Big rows: the driver keeps every one until the query ends.
        vec![
            read(),
            write(pg_login_ok()),
            read(),
            write(pg_msg(b'T', &desc)),
            Move::Flood(pg_msg(
                b'D',
                &[&[0, 1, 0, 4, 0, 0][..], &[b'f'; 256 * 1024]].concat(),
            )),
        ],
        vec![
            read(),
            write(login_ok.clone()),
            Move::Flood(pg_msg(b'N', &notice)),
        ],
        vec![read(), write(login_ok.clone()), Move::Flood(param)],
        vec![
            read(),
            write(pg_login_ok()),
            read(),
            write(pg_result("t")),
            Move::Flood(pg_msg(b'N', &notice)),
        ],
        // Every authentication request, answered or not.
        (0..=12).flat_map(|code| [read(), asks(code)]).collect(),
        vec![
            read(),
            asks(3),
            read(),
            write(pg_login_ok()),
            read(),
            write(pg_result("t")),
        ],
        vec![
            read(),
            asks(5),
            read(),
            write(pg_login_ok()),
            read(),
            write(pg_result("t")),
        ],
        vec![
            read(),
            asks(10),
            read(),
            asks(3),
            read(),
            write(pg_login_ok()),
        ],
    ];
    let (valid, role) = if allow_md5 {
        let mut md5 = 5u32.to_be_bytes().to_vec();
        md5.extend_from_slice(b"salt");
        let valid = vec![
            read(),
            write(pg_msg(b'R', &md5)),
            read(),
            write(pg_login_ok()),
            read(),
            write(pg_result("f")),
        ];
        (valid, Role::Primary)
    } else {
        let valid = vec![read(), write(pg_login_ok()), read(), write(pg_result("t"))];
        (valid, Role::Replica)
    };
    Target {
        name: if allow_md5 {
            "postgres_md5"
        } else {
            "postgres"
        },
        kind: CheckKind::Postgres(PostgresCheck {
            credentials: Credentials {
                user: Some("mon".to_string()),
                password: secret(),
            },
            database: "postgres".to_string(),
            allow_md5,
        }),
        valid,
        role: Some(role),
        conns: 1,
        units: vec![
            pg_msg(b'D', &row),
            pg_msg(b'D', &[0, 0]),
            pg_msg(b'D', &vec![0; 64 * 1024]),
            pg_msg(b'N', &notice),
            pg_msg(b'S', b"application_name\0fuzz\0"),
            pg_msg(b'A', b"\0\0\0\x01chan\0payload\0"),
            pg_msg(b'R', &0u32.to_be_bytes()),
            huge,
        ],
        corpus,
        // Cleartext is never answered; MD5 (when allowed) sends a hash.
        may_get_password: never,
        // A PasswordMessage holding an MD5 hash: `p`, length 40, `md5`.
        forbidden: if allow_md5 {
            &[]
        } else {
            &[(b"p\0\0\0\x28md5", "an MD5 password answer")]
        },
    }
}

// ---------------------------------------------------------- strategies

/// Ways to bend one write of a valid exchange.
#[derive(Clone, Debug)]
enum Bend {
    Flip(u8),
    Insert(Vec<u8>),
    Delete(usize),
    /// Overwrite up to four bytes: a length field at an extreme.
    Extreme([u8; 4]),
    /// Repeat the bytes from here, `len` of them, `times` over.
    Repeat {
        len: usize,
        times: usize,
    },
    /// Cut the write here and hang up.
    Cut,
}

fn bend() -> impl Strategy<Value = Bend> {
    prop_oneof![
        any::<u8>().prop_map(Bend::Flip),
        prop::collection::vec(any::<u8>(), 1..64).prop_map(Bend::Insert),
        (1usize..32).prop_map(Bend::Delete),
        prop_oneof![
            Just([0xFF; 4]),
            Just([0x7F, 0xFF, 0xFF, 0xFF]),
            Just([0; 4]),
            Just([0, 0, 0, 4]),
            Just([0, 0x10, 0, 0]),
            Just([0xFC, 0xFF, 0xFF, 0x00]),
            Just([0xFE; 4]),
        ]
        .prop_map(Bend::Extreme),
        (1usize..64, 2usize..40_000).prop_map(|(len, times)| Bend::Repeat { len, times }),
        Just(Bend::Cut),
    ]
}

/// `script` with every read waiting only [`SHORT_WAIT`].
fn impatient(script: Script) -> Script {
    script
        .into_iter()
        .map(|m| match m {
            Move::Read(_) => Move::Read(SHORT_WAIT),
            other => other,
        })
        .collect()
}

/// Apply `bends` (at positions `at`) to the writes of `valid`.
fn bent(valid: &Script, bends: Vec<(Index, Index, Bend)>) -> Script {
    let mut script = valid.clone();
    let writes: Vec<usize> = (0..script.len())
        .filter(|&i| matches!(script[i], Move::Write(_)))
        .collect();
    let mut end = script.len();
    for (which, at, bend) in bends {
        let i = *which.get(&writes);
        let Move::Write(pieces) = &mut script[i] else {
            continue;
        };
        let mut bytes = pieces.concat();
        let pos = at.index(bytes.len() + 1);
        match bend {
            Bend::Flip(b) => {
                if let Some(x) = bytes.get_mut(pos) {
                    *x ^= b.max(1);
                }
            }
            Bend::Insert(new) => {
                bytes.splice(pos..pos, new);
            }
            Bend::Delete(n) => {
                bytes.drain(pos..(pos + n).min(bytes.len()));
            }
            Bend::Extreme(v) => {
                for (k, b) in v.into_iter().enumerate() {
                    if let Some(x) = bytes.get_mut(pos + k) {
                        *x = b;
                    }
                }
            }
            Bend::Repeat { len, times } => {
                let seg = bytes[pos..(pos + len).min(bytes.len())].to_vec();
                let more: Vec<u8> = seg
                    .iter()
                    .copied()
                    .cycle()
                    .take((seg.len() * times).min(2 * 1024 * 1024))
                    .collect();
                bytes.splice(pos..pos, more);
            }
            Bend::Cut => {
                bytes.truncate(pos);
                end = end.min(i + 1);
            }
        }
        *pieces = vec![bytes];
    }
    script.truncate(end);
    impatient(script)
}

/// `valid` with each write split at up to five places.
fn split(valid: &Script, cuts: Vec<Vec<Index>>) -> Script {
    let mut cuts = cuts.into_iter();
    valid
        .iter()
        .map(|m| match m {
            Move::Write(pieces) => {
                let bytes = pieces.concat();
                let mut at: Vec<usize> = cuts
                    .next()
                    .unwrap_or_default()
                    .iter()
                    .map(|i| i.index(bytes.len() + 1))
                    .collect();
                at.sort_unstable();
                at.dedup();
                Move::Write(pieces_at(&bytes, &at))
            }
            other => other.clone(),
        })
        .collect()
}

fn pieces_at(bytes: &[u8], at: &[usize]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut from = 0;
    for &a in at {
        out.push(bytes[from..a].to_vec());
        from = a;
    }
    out.push(bytes[from..].to_vec());
    out.retain(|p| !p.is_empty());
    out
}

/// The cases of one target, and whether each is only a split of the valid
/// exchange (then it must pass).
fn scripts(t: &Target) -> BoxedStrategy<(Script, bool)> {
    let valid = t.valid.clone();
    let units = t.units.clone();
    let writes = valid.iter().filter(|m| matches!(m, Move::Write(_))).count();
    let random = (
        any::<bool>(),
        prop::collection::vec(any::<u8>(), 0..4096),
        any::<bool>(),
    )
        .prop_map(|(read_first, bytes, flood)| {
            let mut s = Vec::new();
            if read_first {
                s.push(Move::Read(SHORT_WAIT));
            }
            match bytes.is_empty() || !flood {
                true => s.push(Move::Write(vec![bytes])),
                false => s.push(Move::Flood(bytes)),
            }
            (s, false)
        });
    let v = valid.clone();
    let mutated = prop::collection::vec((any::<Index>(), any::<Index>(), bend()), 1..4)
        .prop_map(move |bends| (bent(&v, bends), false));
    let v = valid.clone();
    let endless =
        (0..=v.len(), any::<Index>(), any::<bool>()).prop_map(move |(keep, unit, read_first)| {
            let mut s = impatient(v[..keep].to_vec());
            if read_first {
                s.push(Move::Read(SHORT_WAIT));
            }
            s.push(Move::Flood(unit.get(&units).clone()));
            (s, false)
        });
    let v = valid;
    let pieces = prop::collection::vec(prop::collection::vec(any::<Index>(), 1..6), writes)
        .prop_map(move |cuts| (split(&v, cuts), true));
    prop_oneof![
        1 => random,
        4 => mutated,
        2 => endless,
        2 => pieces,
    ]
    .boxed()
}

// ------------------------------------------------------------- runners

/// Run the valid exchange once (it must pass: the noise starts from
/// something real, and the runtime is warm before anything is measured).
fn warm_up(rt: &Runtime, t: &Target) {
    for _ in 0..2 {
        let o = run_case(rt, t, &t.valid);
        assert_eq!(
            o.result,
            Some(Ok(t.role)),
            "{}: the valid exchange fails",
            t.name
        );
    }
}

fn fuzz(t: Target) {
    let rt = runtime();
    warm_up(&rt, &t);
    let config = Config {
        cases: cases(),
        failure_persistence: None,
        // Shrinking replays a probe per step: keep it bounded.
        max_shrink_iters: 200,
        ..Config::default()
    };
    for script in &t.corpus {
        let o = run_case(&rt, &t, script);
        println!(
            "{}: corpus {script:?}: {:?}, peak heap {} bytes",
            t.name, o.result, o.memory.bytes_max
        );
        if let Err(e) = check(&t, script, &o) {
            panic!("{}: corpus script {script:?}: {e}", t.name);
        }
    }
    let mut runner = TestRunner::new(config);
    let slowest = Cell::new(Duration::ZERO);
    let peak = Cell::new(0);
    let result = runner.run(&scripts(&t), |(script, only_split)| {
        let o = run_case(&rt, &t, &script);
        check(&t, &script, &o)?;
        if only_split {
            prop_assert_eq!(
                o.result.as_ref().and_then(|r| r.as_ref().ok()),
                Some(&t.role),
                "{}: the valid exchange in pieces fails: {:?}",
                t.name,
                o.result
            );
        }
        slowest.set(slowest.get().max(o.took));
        peak.set(peak.get().max(o.memory.bytes_max));
        Ok(())
    });
    println!(
        "{}: {} cases, slowest {:?}, peak heap {} bytes",
        t.name,
        cases(),
        slowest.get(),
        peak.get()
    );
    if let Err(e) = result {
        panic!("{}: {e}", t.name);
    }
}

/// The valid exchange split in two at every byte boundary of every write:
/// it must pass each time, and stay bounded.
fn every_split(t: Target) {
    let rt = runtime();
    warm_up(&rt, &t);
    for (i, m) in t.valid.iter().enumerate() {
        let Move::Write(pieces) = m else { continue };
        let bytes = pieces.concat();
        for at in 1..bytes.len() {
            let mut script = t.valid.clone();
            script[i] = Move::Write(pieces_at(&bytes, &[at]));
            let o = run_case(&rt, &t, &script);
            if let Err(e) = check(&t, &script, &o) {
                panic!("{}: split at {at} of write {i}: {e}", t.name);
            }
            assert_eq!(
                o.result,
                Some(Ok(t.role)),
                "{}: split at {at} of write {i}",
                t.name
            );
        }
    }
}

#[test]
fn fuzz_postgres() {
    fuzz(postgres(false));
}

#[test]
fn fuzz_postgres_md5() {
    fuzz(postgres(true));
}

#[test]
fn fuzz_mysql() {
    fuzz(mysql());
}

#[test]
fn fuzz_redis() {
    fuzz(redis());
}

#[test]
fn fuzz_http() {
    fuzz(http());
}

#[test]
fn fuzz_send_expect() {
    fuzz(send_expect());
}

#[test]
fn every_split_postgres() {
    every_split(postgres(false));
}

#[test]
fn every_split_mysql() {
    every_split(mysql());
}

#[test]
fn every_split_redis() {
    every_split(redis());
}

#[test]
fn every_split_http() {
    every_split(http());
}

#[test]
fn every_split_send_expect() {
    every_split(send_expect());
}
