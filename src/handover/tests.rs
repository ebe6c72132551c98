//! The handover over real Unix and TCP sockets: every socket arrives, and
//! each way it can fail is an error on both ends with nothing left open.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::net::TcpStream;
use std::os::fd::{AsFd, IntoRawFd};
use std::thread;

use super::*;

/// Limits short enough for tests that wait them out.
const QUICK: Timing = Timing {
    connect: Duration::from_millis(300),
    io: Duration::from_secs(2),
    reply: Duration::from_millis(600),
    accept: Duration::from_secs(5),
    complete: Duration::from_millis(400),
    feed: Duration::from_secs(3),
};

/// Generous limits, for tests where nothing should wait.
const ROOMY: Timing = Timing {
    accept: Duration::from_secs(10),
    complete: Duration::from_secs(10),
    reply: Duration::from_secs(12),
    ..Timing::DEFAULT
};

fn listeners(n: usize) -> Vec<TcpListener> {
    (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect()
}

fn keyed(ls: &[TcpListener]) -> Vec<(String, BorrowedFd<'_>)> {
    ls.iter()
        .map(|l| (l.local_addr().unwrap().to_string(), l.as_fd()))
        .collect()
}

fn wanted(ls: &[TcpListener]) -> Vec<Wanted> {
    ls.iter()
        .map(|l| Wanted {
            path: "listeners.x.bind".to_string(),
            addr: l.local_addr().unwrap(),
        })
        .collect()
}

/// Whether nothing listens on `addr` any more (the socket was closed in
/// every process that had it).
fn refused(addr: SocketAddr) -> bool {
    matches!(TcpStream::connect(addr), Err(e) if e.kind() == io::ErrorKind::ConnectionRefused)
}

struct NewProcess {
    ours: PathBuf,
    pingora: PathBuf,
    thread: JoinHandle<Result<Option<Inherited>, HandoverError>>,
    stop: Arc<AtomicBool>,
}

/// The new process's end, listening in `dir`.
fn new_process(dir: &Path, wanted: Vec<Wanted>, timing: Timing) -> NewProcess {
    let ours = dir.join("up.sock.listeners");
    let pingora = dir.join("up.sock");
    let listening = listen_at(&ours).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let (o, p, s) = (ours.clone(), pingora.clone(), Arc::clone(&stop));
    let opened = Instant::now();
    let thread = thread::spawn(move || {
        let at = Endpoints {
            ours: &o,
            pingora: &p,
        };
        receive(listening, &at, &wanted, &s, opened, &timing)
    });
    NewProcess {
        ours,
        pingora,
        thread,
        stop,
    }
}

fn send_all(
    path: &Path,
    sockets: &[(String, BorrowedFd<'_>)],
    pingora: usize,
    timing: &Timing,
) -> Result<Sent, HandoverError> {
    let refs: Vec<(&str, BorrowedFd<'_>)> = sockets.iter().map(|(a, f)| (a.as_str(), *f)).collect();
    send(path, &refs, pingora, timing)
}

/// A hand-made old process: connected, ready to send raw messages.
fn old_process(path: &Path) -> OwnedFd {
    connect(path, &ROOMY).unwrap()
}

#[test]
fn carries_more_sockets_than_one_message_holds() {
    let dir = tempfile::tempdir().unwrap();
    let ls = listeners(150);
    let new = new_process(dir.path(), wanted(&ls), ROOMY);
    let start = Instant::now();
    let sent = send_all(&new.ours, &keyed(&ls), 1, &ROOMY).unwrap();
    println!(
        "150 listening sockets handed over and confirmed in {:?}",
        start.elapsed()
    );
    assert_eq!(sent.sockets, 150);
    assert_eq!(sent.batches, 3, "150 sockets in batches of {BATCH}");
    assert_eq!(sent.pid, i32::try_from(std::process::id()).unwrap());

    let inherited = new.thread.join().unwrap().unwrap().unwrap();
    assert_eq!(inherited.sockets.len(), 150);
    assert_eq!(inherited.batches, 3);
    for l in &ls {
        let addr = l.local_addr().unwrap();
        let got = &inherited.sockets[&addr.to_string()];
        assert_eq!(got.local_addr().unwrap(), addr);
    }
    // The copies are the same sockets: with the sender's closed, they still
    // accept what is sent to those addresses.
    drop(ls);
    for (addr, l) in &inherited.sockets {
        let _client = TcpStream::connect(addr.as_str()).unwrap();
        l.accept().unwrap();
    }
    // The handover socket is gone with the handover.
    assert!(!new.ours.exists());
}

#[test]
fn ends_pingoras_wait_when_pingora_has_nothing_to_send() {
    let dir = tempfile::tempdir().unwrap();
    let ls = listeners(2);
    let new = new_process(dir.path(), wanted(&ls), ROOMY);
    // pingora's bootstrap in the new process: it must see a transfer, even an empty one.
    let bootstrap = std::os::unix::net::UnixListener::bind(&new.pingora).unwrap();
    send_all(&new.ours, &keyed(&ls), 0, &ROOMY).unwrap();
    let (mut conn, _) = bootstrap.accept().unwrap();
    let mut rest = Vec::new();
    io::Read::read_to_end(&mut conn, &mut rest).unwrap();
    assert!(rest.is_empty(), "an empty transfer");
    assert_eq!(
        new.thread.join().unwrap().unwrap().unwrap().sockets.len(),
        2
    );
}

#[test]
fn with_nobody_waiting_the_old_process_gives_up_after_the_connect_window() {
    let dir = tempfile::tempdir().unwrap();
    let ls = listeners(1);
    let start = Instant::now();
    let e = send_all(&dir.path().join("nobody.listeners"), &keyed(&ls), 1, &QUICK).unwrap_err();
    assert!(matches!(e, HandoverError::NoReceiver { .. }), "{e}");
    assert!(start.elapsed() >= QUICK.connect);
    assert!(e.to_string().contains("start `sluice -u`"), "{e}");
    // A socket file left behind by a process that is gone: the same.
    let stale = dir.path().join("stale.listeners");
    drop(listen_at(&stale).unwrap());
    let e = send_all(&stale, &keyed(&ls), 1, &QUICK).unwrap_err();
    assert!(matches!(e, HandoverError::NoReceiver { .. }), "{e}");
}

#[test]
fn a_new_process_that_dies_mid_transfer_fails_the_handover() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dies.listeners");
    let listening = listen_at(&path).unwrap();
    let dying = thread::spawn(move || {
        let conn = loop {
            match fds::accept_unix(&listening.fd) {
                Ok(c) => break c,
                Err(_) => thread::sleep(POLL),
            }
        };
        let mut buf = vec![0u8; MAX_MESSAGE];
        // The first batch arrives; then the process is gone.
        let (n, got) = receive_message(&conn, &mut buf, Path::new("test")).unwrap();
        assert!(n > 0);
        assert_eq!(got.len(), BATCH);
    });
    let ls = listeners(BATCH * 3);
    let e = send_all(&path, &keyed(&ls), 1, &ROOMY).unwrap_err();
    dying.join().unwrap();
    assert!(
        matches!(e, HandoverError::Closed { .. }),
        "an error that says the other end closed: {e}"
    );
    // The old process still has every socket.
    for l in &ls {
        let _client = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        l.accept().unwrap();
    }
}

#[test]
fn a_new_process_that_never_answers_times_out() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("silent.listeners");
    let listening = listen_at(&path).unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let silent = thread::spawn(move || {
        let conn = loop {
            match fds::accept_unix(&listening.fd) {
                Ok(c) => break c,
                Err(_) => thread::sleep(POLL),
            }
        };
        // Hold the connection open, read nothing, answer nothing.
        let _ = rx.recv();
        drop(conn);
    });
    let ls = listeners(3);
    let start = Instant::now();
    let e = send_all(&path, &keyed(&ls), 1, &QUICK).unwrap_err();
    assert!(matches!(e, HandoverError::Timeout { .. }), "{e}");
    assert!(start.elapsed() >= QUICK.reply);
    tx.send(()).unwrap();
    silent.join().unwrap();
}

#[test]
fn a_partial_handover_is_refused_and_nothing_is_kept() {
    let dir = tempfile::tempdir().unwrap();
    let ls = listeners(3);
    let addrs: Vec<SocketAddr> = ls.iter().map(|l| l.local_addr().unwrap()).collect();
    let new = new_process(dir.path(), wanted(&ls), ROOMY);
    let conn = old_process(&new.ours);
    let two = Message::Batch {
        addrs: addrs[..2].iter().map(ToString::to_string).collect(),
    };
    let raw: Vec<RawFd> = ls[..2].iter().map(AsRawFd::as_raw_fd).collect();
    send_message(&conn, &two, &raw, &new.ours, ROOMY.io).unwrap();
    let done = Message::Done {
        sockets: 3,
        pingora_sockets: 1,
    };
    send_message(&conn, &done, &[], &new.ours, ROOMY.io).unwrap();

    let e = new.thread.join().unwrap().unwrap_err();
    assert!(matches!(e, HandoverError::Protocol { .. }), "{e}");
    assert!(e.to_string().contains("sent 3 socket(s); 2 arrived"), "{e}");
    let mut buf = vec![0u8; MAX_MESSAGE];
    let n = socket::recv(conn.as_raw_fd(), &mut buf, MsgFlags::empty()).unwrap();
    let reply: Reply = serde_json::from_slice(&buf[..n]).unwrap();
    assert!(matches!(reply, Reply::Refused { .. }), "{reply:?}");
    // The new process closed what it received: once the old one closes
    // its sockets, nobody listens there.
    drop(ls);
    for a in addrs {
        assert!(refused(a), "{a} still listened on");
    }
}

#[test]
fn an_old_process_that_stops_mid_transfer_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let ls = listeners(2);
    let new = new_process(dir.path(), wanted(&ls), ROOMY);
    let conn = old_process(&new.ours);
    let one = Message::Batch {
        addrs: vec![ls[0].local_addr().unwrap().to_string()],
    };
    send_message(&conn, &one, &[ls[0].as_raw_fd()], &new.ours, ROOMY.io).unwrap();
    drop(conn);
    let e = new.thread.join().unwrap().unwrap_err();
    assert!(matches!(e, HandoverError::Closed { .. }), "{e}");
}

#[test]
fn a_handover_that_does_not_complete_in_time_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let new = new_process(dir.path(), Vec::new(), QUICK);
    // Connected, then silent: the new process must not wait past `complete`.
    let conn = old_process(&new.ours);
    let start = Instant::now();
    let e = new.thread.join().unwrap().unwrap_err();
    assert!(matches!(e, HandoverError::Refused(_)), "{e}");
    assert!(e.to_string().contains("did not complete in time"), "{e}");
    assert!(start.elapsed() < QUICK.complete + Duration::from_secs(1));
    drop(conn);
}

#[test]
fn a_socket_for_another_address_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ls = listeners(2);
    let new = new_process(dir.path(), wanted(&ls), ROOMY);
    let conn = old_process(&new.ours);
    // The first socket, sent under the second one's address.
    let lie = Message::Batch {
        addrs: vec![ls[1].local_addr().unwrap().to_string()],
    };
    send_message(&conn, &lie, &[ls[0].as_raw_fd()], &new.ours, ROOMY.io).unwrap();
    let e = new.thread.join().unwrap().unwrap_err();
    assert!(e.to_string().contains("listens on"), "{e}");
}

#[test]
fn sockets_the_configuration_does_not_listen_on_are_closed() {
    let dir = tempfile::tempdir().unwrap();
    let ls = listeners(3);
    let gone = ls[2].local_addr().unwrap();
    let new = new_process(dir.path(), wanted(&ls[..2]), ROOMY);
    let sent = send_all(&new.ours, &keyed(&ls), 1, &ROOMY).unwrap();
    assert_eq!(sent.sockets, 3, "the old process hands over all it has");
    let inherited = new.thread.join().unwrap().unwrap().unwrap();
    assert_eq!(inherited.sockets.len(), 2);
    assert!(!inherited.sockets.contains_key(&gone.to_string()));
    drop(ls);
    assert!(refused(gone), "{gone} still listened on");
}

#[test]
fn a_configured_address_that_cannot_be_bound_refuses_the_handover() {
    let dir = tempfile::tempdir().unwrap();
    let ls = listeners(1);
    // Listened on by someone else, and not part of the handover.
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut want = wanted(&ls);
    want.push(Wanted {
        path: "listeners.new.bind".to_string(),
        addr: taken.local_addr().unwrap(),
    });
    let new = new_process(dir.path(), want, ROOMY);
    let e = send_all(&new.ours, &keyed(&ls), 1, &ROOMY).unwrap_err();
    assert!(matches!(e, HandoverError::Refused(_)), "{e}");
    assert!(e.to_string().contains("listeners.new.bind"), "{e}");
    assert!(new.thread.join().unwrap().is_err());
}

#[test]
fn without_a_handover_the_new_process_stops_waiting() {
    let dir = tempfile::tempdir().unwrap();
    // pingora's bootstrap ended (an older sluice sent everything through it).
    let new = new_process(dir.path(), Vec::new(), ROOMY);
    new.stop.store(true, Relaxed);
    assert!(new.thread.join().unwrap().unwrap().is_none());
    // Nobody came within the window.
    let late = Timing {
        accept: Duration::from_millis(200),
        ..ROOMY
    };
    let new = new_process(dir.path(), Vec::new(), late);
    assert!(new.thread.join().unwrap().unwrap().is_none());
}

#[test]
fn only_a_socket_file_is_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("file.listeners");
    std::fs::write(&path, "not a socket").unwrap();
    assert!(matches!(
        listen_at(&path),
        Err(HandoverError::NotASocket { .. })
    ));
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "not a socket");
}

#[test]
fn a_listener_in_pingoras_table_is_taken_out_of_it() {
    // A sluice from before its own handover left its listeners in pingora's table.
    let original = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = original.local_addr().unwrap();
    let table: pingora::server::ListenFds = Arc::new(pingora::server::Fds::new().into());
    let admin = TcpListener::bind("127.0.0.1:0").unwrap();
    {
        let mut t = table.lock();
        t.add(
            addr.to_string(),
            original.as_fd().try_clone_to_owned().unwrap().into_raw_fd(),
        );
        t.add("admin".to_string(), admin.as_raw_fd());
    }
    let taken = fds::take_from_table(&table, &addr.to_string())
        .unwrap()
        .unwrap();
    assert_eq!(taken.local_addr().unwrap(), addr);
    assert!(table.lock().get(&addr.to_string()).is_none());
    assert_eq!(fds::table_len(&table), 1, "the admin entry stays");
    assert!(
        fds::take_from_table(&table, "127.0.0.1:1")
            .unwrap()
            .is_none()
    );
    // Ours and the original are the only copies left: the table's is closed.
    drop(original);
    let _client = TcpStream::connect(addr).unwrap();
    taken.accept().unwrap();
    drop(taken);
    assert!(refused(addr), "{addr} still listened on");
}
