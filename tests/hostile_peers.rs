//! Hostile peers at a backend's address, against the real binary: a server
//! posing as PostgreSQL that floods the health check, and one that asks for
//! the monitor password in cleartext or as MD5. The check must give up at its
//! read budget (memory stays bounded), and never hand the password out.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A backend message: tag, length, body.
fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    out.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
    out.extend_from_slice(body);
    out
}

fn auth(code: u32, extra: &[u8]) -> Vec<u8> {
    let mut body = code.to_be_bytes().to_vec();
    body.extend_from_slice(extra);
    msg(b'R', &body)
}

/// The rest of a login after AuthenticationOk.
fn ready() -> Vec<u8> {
    [
        msg(b'S', b"server_version\x0016.0\x00"),
        msg(b'K', &[0, 0, 0, 1, 0, 0, 0, 2]),
        msg(b'Z', b"I"),
    ]
    .concat()
}

/// The answer to `SELECT pg_is_in_recovery()`: `f`, a primary.
fn primary() -> Vec<u8> {
    let mut desc = 1u16.to_be_bytes().to_vec();
    desc.extend_from_slice(b"pg_is_in_recovery\0");
    desc.extend_from_slice(&[
        0, 0, 0, 0, 0, 0, 0, 0, 0, 16, 0, 1, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0,
    ]);
    let mut row = 1u16.to_be_bytes().to_vec();
    row.extend_from_slice(&1u32.to_be_bytes());
    row.push(b'f');
    [
        msg(b'T', &desc),
        msg(b'D', &row),
        msg(b'C', b"SELECT 1\0"),
        msg(b'Z', b"I"),
    ]
    .concat()
}

/// What a fake PostgreSQL server does with each connection.
#[derive(Clone, Copy)]
enum Act {
    /// Log in, then answer the query with endless 4 KB rows.
    Rows,
    /// Log in, then send endless notices before ReadyForQuery.
    Notices,
    /// Log in, then send endless parameters, each with a new name.
    Parameters,
    /// Ask for the password in cleartext.
    Cleartext,
    /// Ask for an MD5 password; accept whatever comes and serve a primary.
    Md5,
}

/// Most bytes one flooding connection sends: far more than a check may
/// read, small enough for the test machine if a check reads it all.
const FLOOD: usize = 32 * 1024 * 1024;

/// One connection to a fake server: the bytes its flood got out, and
/// everything it read.
type Served = (usize, Vec<u8>);

/// A fake PostgreSQL server, recording each connection.
struct FakePg {
    addr: SocketAddr,
    conns: Arc<Mutex<Vec<Served>>>,
}

impl FakePg {
    async fn start(act: Act) -> FakePg {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let conns = Arc::new(Mutex::new(Vec::new()));
        let record = Arc::clone(&conns);
        tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                let record = Arc::clone(&record);
                tokio::spawn(async move {
                    let seen = serve(s, act).await;
                    record.lock().unwrap().push(seen);
                });
            }
        });
        FakePg { addr, conns }
    }

    fn connections(&self) -> Vec<Served> {
        self.conns.lock().unwrap().clone()
    }
}

/// Read once (what the client sent next), appending to `got`.
async fn read_some(s: &mut TcpStream, got: &mut Vec<u8>) -> bool {
    let mut buf = vec![0u8; 16 * 1024];
    match tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await {
        Ok(Ok(n)) if n > 0 => {
            got.extend_from_slice(&buf[..n]);
            true
        }
        _ => false,
    }
}

/// Write `unit` (or `make(i)`) until `FLOOD` bytes went out or the client
/// is gone; the bytes that went out.
async fn flood(s: &mut TcpStream, make: impl Fn(u64) -> Vec<u8>) -> usize {
    let mut sent = 0;
    let mut i = 0;
    while sent < FLOOD {
        let m = make(i);
        if s.write_all(&m).await.is_err() {
            break;
        }
        sent += m.len();
        i += 1;
    }
    sent
}

async fn serve(mut s: TcpStream, act: Act) -> Served {
    let mut got = Vec::new();
    if !read_some(&mut s, &mut got).await {
        return (0, got);
    }
    let sent = match act {
        Act::Rows => {
            if s.write_all(&[auth(0, b""), ready()].concat())
                .await
                .is_err()
                || !read_some(&mut s, &mut got).await
            {
                return (0, got);
            }
            let mut desc = 1u16.to_be_bytes().to_vec();
            desc.extend_from_slice(b"pg_is_in_recovery\0");
            desc.extend_from_slice(&[
                0, 0, 0, 0, 0, 0, 0, 0, 0, 16, 0, 1, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0,
            ]);
            let _ = s.write_all(&msg(b'T', &desc)).await;
            let mut row = 1u16.to_be_bytes().to_vec();
            row.extend_from_slice(&4000u32.to_be_bytes());
            row.extend_from_slice(&[b'f'; 4000]);
            let row = msg(b'D', &row);
            flood(&mut s, |_| row.clone()).await
        }
        Act::Notices => {
            let _ = s.write_all(&auth(0, b"")).await;
            let mut body = b"SNOTICE\0VNOTICE\0C00000\0M".to_vec();
            body.extend_from_slice(&[b'n'; 4000]);
            body.extend_from_slice(b"\0\0");
            let notice = msg(b'N', &body);
            flood(&mut s, |_| notice.clone()).await
        }
        Act::Parameters => {
            let _ = s.write_all(&auth(0, b"")).await;
            flood(&mut s, |i| {
                let mut body = format!("param_{i}\0").into_bytes();
                body.extend_from_slice(&[b'v'; 4000]);
                body.push(0);
                msg(b'S', &body)
            })
            .await
        }
        Act::Cleartext => {
            let _ = s.write_all(&auth(3, b"")).await;
            read_some(&mut s, &mut got).await;
            0
        }
        Act::Md5 => {
            let _ = s.write_all(&auth(5, b"salt")).await;
            if read_some(&mut s, &mut got).await && got.ends_with(b"\0") {
                // A notice whose text would forge a log line if logged.
                let notice = msg(b'N', b"SNOTICE\0C00000\0MPEER-NOTICE\nforged line\0\0");
                let _ = s.write_all(&[auth(0, b""), notice, ready()].concat()).await;
                if read_some(&mut s, &mut got).await {
                    let _ = s.write_all(&primary()).await;
                }
            }
            0
        }
    };
    // Drain until the client hangs up.
    while read_some(&mut s, &mut got).await {}
    (sent, got)
}

/// Peak resident memory (`VmHWM`) of a process, in KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn failures(m: &Scrape, pool: &str, backend: SocketAddr) -> f64 {
    m.value(
        "sluice_backend_health_checks_total",
        &[
            ("pool", pool),
            ("backend", &backend.to_string()),
            ("result", "failure"),
        ],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flooding_postgres_peers_are_down_for_the_read_budget_and_memory_stays_bounded() {
    let rows = FakePg::start(Act::Rows).await;
    let notices = FakePg::start(Act::Notices).await;
    let parameters = FakePg::start(Act::Parameters).await;
    let pools = [
        ("rows", rows.addr),
        ("notices", notices.addr),
        ("parameters", parameters.addr),
    ];
    let port = reserve_port();
    let mut yaml = format!(
        "admin: {{ bind: '{{admin}}' }}\n\
         listeners: {{ front: {{ bind: 127.0.0.1:{port}, pool: rows }} }}\n\
         pools:\n"
    );
    for (name, addr) in pools {
        // The timing: a check may run 1.5 s.
        yaml.push_str(&format!(
            "  {name}:\n    health_check: {{ kind: postgres, user: monitor, interval: 1600ms, timeout: 1500ms, fall: 1 }}\n    backends: ['{addr}']\n"
        ));
    }
    let sluice = Sluice::start(&yaml).await;
    // Three checks of each, so that anything kept between checks adds up.
    wait_until("three failed checks of every flooding backend", || async {
        let m = sluice.metrics().await;
        pools.iter().all(|(p, a)| failures(&m, p, *a) >= 3.0)
    })
    .await;
    let peak = peak_rss_kib(sluice.pid());
    println!("peak RSS of sluice with three flooding PostgreSQL backends: {peak} KiB");
    for (pool, addr) in pools {
        assert_eq!(sluice.backend_state(pool, addr).await, "down", "{pool}");
        let needle = format!("pool {pool}: backend {addr} is down: postgres check: ");
        let log = sluice.log();
        let line = log
            .lines()
            .find(|l| l.contains(&needle))
            .unwrap_or_default();
        assert!(
            line.contains("in one check"),
            "{pool}: the log line names the read budget: `{line}`"
        );
    }
    for (name, fake) in [
        ("rows", &rows),
        ("notices", &notices),
        ("parameters", &parameters),
    ] {
        let conns = fake.connections();
        assert!(conns.len() >= 2, "{name}: {} connections", conns.len());
        for (sent, _) in conns {
            assert!(
                sent < FLOOD,
                "{name}: a check read the whole {sent}-byte flood instead of hanging up"
            );
        }
    }
    // Debug build, three hostile backends: tens of MiB at most, where the
    // unbounded check took gigabytes.
    assert!(
        peak < 64 * 1024,
        "peak RSS {peak} KiB: a check held what the peer sent"
    );
    assert!(sluice.try_wait().is_none());
}

/// A PasswordMessage (`p`, then a length under 64 KiB) in what a server read.
fn has_password_message(read: &[u8]) -> bool {
    read.windows(3).any(|w| w == [b'p', 0, 0])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_postgres_monitor_password_never_goes_out_in_cleartext_nor_as_md5_unless_allowed() {
    const PASSWORD: &str = "monitor-s3cret";
    let dir = tempfile::tempdir().unwrap();
    let password_file = dir.path().join("pw");
    std::fs::write(&password_file, format!("{PASSWORD}\n")).unwrap();
    let cleartext = FakePg::start(Act::Cleartext).await;
    let md5 = FakePg::start(Act::Md5).await;
    let port = reserve_port();
    let config = |allow_md5: &str| {
        format!(
            "admin: {{ bind: '{{admin}}' }}\n\
             listeners: {{ front: {{ bind: 127.0.0.1:{port}, pool: cleartext }} }}\n\
             pools:\n  \
               cleartext:\n    health_check: {{ kind: postgres, user: monitor, password_file: '{pw}', interval: 200ms, timeout: 200ms, fall: 1 }}\n    backends: ['{c}']\n  \
               md5:\n    health_check: {{ kind: postgres, user: monitor, password_file: '{pw}', interval: 200ms, timeout: 200ms, fall: 1, rise: 1{allow_md5} }}\n    backends: ['{m}']\n",
            pw = password_file.display(),
            c = cleartext.addr,
            m = md5.addr,
        )
    };
    let sluice = Sluice::start(&config("")).await;
    assert_eq!(
        sluice.backend_state("cleartext", cleartext.addr).await,
        "down"
    );
    assert_eq!(sluice.backend_state("md5", md5.addr).await, "down");
    sluice
        .wait_log(&format!(
            "pool cleartext: backend {} is down: postgres check: ",
            cleartext.addr
        ))
        .await;
    let log = sluice.log();
    let line = |pool: &str, addr: SocketAddr| {
        let needle = format!("pool {pool}: backend {addr} is down: ");
        log.lines()
            .find(|l| l.contains(&needle))
            .unwrap_or_default()
            .to_string()
    };
    let refused = line("cleartext", cleartext.addr);
    assert!(refused.contains("cleartext"), "{refused}");
    let refused = line("md5", md5.addr);
    assert!(
        refused.contains("MD5") && refused.contains("allow_md5"),
        "{refused}"
    );
    for (name, fake) in [("cleartext", &cleartext), ("md5", &md5)] {
        for (_, read) in fake.connections() {
            assert!(
                !has_password_message(&read),
                "{name}: the check answered with a password message: {:?}",
                String::from_utf8_lossy(&read)
            );
            assert!(!String::from_utf8_lossy(&read).contains(PASSWORD));
        }
    }

    // Allowed by the reloaded configuration: MD5 logs in (hashed, never
    // the password itself).
    sluice.rewrite_config(&config(", allow_md5: true"));
    let (status, body) = sluice.reload().await;
    assert_eq!(status, 200, "{body}");
    wait_until("the MD5 backend is up", || async {
        sluice.backend_state("md5", md5.addr).await == "up"
    })
    .await;
    let read = md5.connections();
    let answered = read
        .iter()
        .filter(|(_, r)| has_password_message(r))
        .map(|(_, r)| String::from_utf8_lossy(r).into_owned())
        .collect::<Vec<_>>();
    assert!(!answered.is_empty(), "an MD5 answer went out once allowed");
    for r in answered {
        assert!(r.contains("md5"), "{r}");
        assert!(!r.contains(PASSWORD), "{r}");
    }
    assert_eq!(
        sluice.backend_state("cleartext", cleartext.addr).await,
        "down"
    );
    let log = sluice.log();
    assert!(!log.contains(PASSWORD), "the password is in the log");
    assert!(
        !log.contains("PEER-NOTICE"),
        "a server's notice text is in the log"
    );
    assert!(!log.contains("panicked"));
}
