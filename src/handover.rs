//! sluice's own handover of its listening sockets on upgrade, beside pingora's.
//!
//! pingora's handover sends its whole listener-fd table in one `SCM_RIGHTS`
//! message, and its receiver has room for 32 descriptors: more, and the new
//! process fails with `ENOBUFS` while the old one drains anyway. So sluice
//! carries its own listening sockets itself, any number of them, and leaves
//! pingora's table to what pingora owns (the admin listener).
//!
//! The new process (`sluice -u`) listens on a `SOCK_SEQPACKET` Unix socket,
//! `<server.upgrade_sock>.listeners` ([`path_for`]), before pingora's
//! bootstrap blocks for pingora's table ([`Receiver`]). On SIGQUIT the old
//! process connects and sends ([`send`]):
//!
//! 1. batches of at most [`BATCH`] sockets, each one message whose JSON body
//!    names the addresses of the descriptors it carries, in order;
//! 2. `done`, with the total and how many sockets pingora's handover will
//!    carry after this one.
//!
//! The new process checks every socket (a listening TCP socket bound to the
//! address it was sent for), checks that it can bind every configured
//! address it did not receive, and answers `taken` or `refused`. Only after
//! `taken` does the old process let pingora hand over its table and drain;
//! on any failure it keeps serving, and the new process exits. When pingora's
//! table is empty pingora sends nothing at all, so the new process then ends
//! its own bootstrap wait itself (an empty transfer).
//!
//! Both ends check that the other runs as the same user, and every step has
//! a time limit, chosen so that a `taken` always arrives while pingora's
//! bootstrap (which gives up about six seconds after it starts) still waits.

use std::collections::HashMap;
use std::io::{self, IoSlice, IoSliceMut};
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use log::{error, info, warn};
use nix::errno::Errno;
use nix::sys::socket::{
    self, AddressFamily, Backlog, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag,
    SockType, UnixAddr, sockopt,
};
use nix::sys::time::TimeVal;
use serde::{Deserialize, Serialize};

use crate::relay::socket as fds;

/// Sockets per message. Linux takes up to 253 descriptors in one message
/// (`SCM_MAX_FD`); smaller batches keep each message small.
pub const BATCH: usize = 64;
/// The most descriptors one received message may carry (`SCM_MAX_FD`). The
/// receive buffer has room for all of them, so none is ever cut off.
const MAX_FDS_PER_MESSAGE: usize = 253;
/// The largest message body: a batch of addresses as JSON.
const MAX_MESSAGE: usize = 64 * 1024;
/// How often a waiting side looks again.
const POLL: Duration = Duration::from_millis(50);

/// The Unix socket of sluice's handover, next to pingora's `upgrade_sock`.
pub fn path_for(upgrade_sock: &str) -> PathBuf {
    PathBuf::from(format!("{upgrade_sock}.listeners"))
}

/// Time limits of the handover.
#[derive(Clone, Copy, Debug)]
pub struct Timing {
    /// Old process: how long to retry connecting to a new process that is
    /// not listening yet.
    pub connect: Duration,
    /// Old process: limit of each send.
    pub io: Duration,
    /// Old process: how long to wait for `taken` after `done`. Longer than
    /// `complete` so the old process never gives up on a new process that
    /// will still answer.
    pub reply: Duration,
    /// New process: how long after it starts listening a handover may begin.
    pub accept: Duration,
    /// New process: by when (after it starts listening) the handover must be
    /// complete and answered, else it is refused. pingora's bootstrap waits
    /// about six seconds from its start (later than ours): the old process's
    /// pingora needs a moment after `taken` to connect.
    pub complete: Duration,
    /// New process: by when it must have ended pingora's bootstrap wait itself
    /// when pingora's table has nothing to carry.
    pub feed: Duration,
}

impl Timing {
    /// The limits sluice runs with.
    pub const DEFAULT: Timing = Timing {
        connect: Duration::from_secs(5),
        io: Duration::from_secs(2),
        reply: Duration::from_secs(6),
        accept: Duration::from_secs(4),
        complete: Duration::from_millis(4_500),
        feed: Duration::from_millis(6_500),
    };
}

/// Why a handover failed.
#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    /// Nobody listens on the handover socket.
    #[error(
        "no new process is waiting on {} (start `sluice -u` with the same server.upgrade_sock first, then send SIGQUIT within {}): {source}",
        path.display(),
        humantime::format_duration(Timing::DEFAULT.accept)
    )]
    NoReceiver {
        /// The handover socket.
        path: PathBuf,
        /// The last connect error.
        source: io::Error,
    },
    /// The process at the other end runs as another user.
    #[error(
        "the process on {} runs as uid {peer}, this one as uid {ours}: refusing the handover",
        path.display()
    )]
    ForeignPeer {
        /// The handover socket.
        path: PathBuf,
        /// The other process's user.
        peer: u32,
        /// Ours.
        ours: u32,
    },
    /// A system call failed.
    #[error("{what} ({}): {source}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// The handover socket.
        path: PathBuf,
        /// Why it failed.
        source: io::Error,
    },
    /// The other process did not go on within the time limit.
    #[error("{what} ({}): nothing within {}", path.display(), humantime::format_duration(*limit))]
    Timeout {
        /// What was being waited for.
        what: &'static str,
        /// The handover socket.
        path: PathBuf,
        /// The limit.
        limit: Duration,
    },
    /// The other process closed the connection early.
    #[error("the other process closed {} {when} (did it exit? see its log)", path.display())]
    Closed {
        /// The handover socket.
        path: PathBuf,
        /// At which point.
        when: String,
    },
    /// The new process refused the sockets.
    #[error("the new process refused the handover: {0}")]
    Refused(String),
    /// A message that does not fit the protocol.
    #[error("handover over {}: {detail}", path.display())]
    Protocol {
        /// The handover socket.
        path: PathBuf,
        /// What was wrong.
        detail: String,
    },
    /// The handover task itself failed (a panic).
    #[error("the handover task failed: {0}")]
    Task(String),
    /// Something else is in the way of the handover socket.
    #[error("{} exists and is not a socket: not replacing it", path.display())]
    NotASocket {
        /// The path.
        path: PathBuf,
    },
}

/// A message from the old process.
#[derive(Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
enum Message {
    /// The addresses of the descriptors this message carries, in order.
    Batch { addrs: Vec<String> },
    /// Everything was sent: `sockets` in all; pingora's own handover then
    /// carries `pingora_sockets`.
    Done {
        sockets: usize,
        pingora_sockets: usize,
    },
}

/// The new process's answer.
#[derive(Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
enum Reply {
    /// It holds all `sockets` now.
    Taken { sockets: usize },
    /// It will not take over.
    Refused { reason: String },
}

/// What the old process handed over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sent {
    /// Listening sockets.
    pub sockets: usize,
    /// Messages they went in.
    pub batches: usize,
    /// The new process.
    pub pid: i32,
}

/// Hand `sockets` (address, listening socket) to the new process listening
/// on `path`; `pingora_sockets` is how many pingora's handover carries next.
/// `Ok` once the new process confirmed it holds every one of them.
pub fn send(
    path: &Path,
    sockets: &[(&str, BorrowedFd<'_>)],
    pingora_sockets: usize,
    timing: &Timing,
) -> Result<Sent, HandoverError> {
    let conn = connect(path, timing)?;
    let pid = check_peer(&conn, path)?;
    set_timeout(&conn, sockopt::SendTimeout, timing.io, path)?;
    let mut batches = 0;
    for chunk in sockets.chunks(BATCH) {
        let addrs = chunk.iter().map(|(a, _)| (*a).to_string()).collect();
        let raw: Vec<RawFd> = chunk.iter().map(|(_, fd)| fd.as_raw_fd()).collect();
        send_message(&conn, &Message::Batch { addrs }, &raw, path, timing.io)?;
        batches += 1;
    }
    let done = Message::Done {
        sockets: sockets.len(),
        pingora_sockets,
    };
    send_message(&conn, &done, &[], path, timing.io)?;
    set_timeout(&conn, sockopt::ReceiveTimeout, timing.reply, path)?;
    let mut buf = vec![0u8; MAX_MESSAGE];
    let n = match socket::recv(conn.as_raw_fd(), &mut buf, MsgFlags::empty()) {
        Ok(n) => n,
        Err(e) => {
            return Err(sys_error(
                e,
                "waiting for the new process's answer",
                path,
                timing.reply,
            ));
        }
    };
    if n == 0 {
        return Err(HandoverError::Closed {
            path: path.to_path_buf(),
            when: format!("after {} socket(s), before confirming", sockets.len()),
        });
    }
    match serde_json::from_slice(&buf[..n]) {
        Ok(Reply::Taken { sockets: taken }) if taken == sockets.len() => Ok(Sent {
            sockets: taken,
            batches,
            pid,
        }),
        Ok(Reply::Taken { sockets: taken }) => Err(protocol(
            path,
            format!(
                "the new process took {taken} socket(s) of {}",
                sockets.len()
            ),
        )),
        Ok(Reply::Refused { reason }) => Err(HandoverError::Refused(reason)),
        Err(e) => Err(protocol(path, format!("unreadable answer: {e}"))),
    }
}

/// Connect to the new process, waiting for it to listen.
fn connect(path: &Path, timing: &Timing) -> Result<OwnedFd, HandoverError> {
    let addr = UnixAddr::new(path).map_err(|e| io_error(e, "the handover socket path", path))?;
    let start = Instant::now();
    loop {
        let conn = socket::socket(
            AddressFamily::Unix,
            SockType::SeqPacket,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .map_err(|e| io_error(e, "creating a Unix socket", path))?;
        set_timeout(&conn, sockopt::SendTimeout, timing.io, path)?;
        match socket::connect(conn.as_raw_fd(), &addr) {
            Ok(()) => return Ok(conn),
            // Not listening yet (or a socket file left behind): wait a little.
            Err(e @ (Errno::ENOENT | Errno::ECONNREFUSED | Errno::EAGAIN)) => {
                if start.elapsed() >= timing.connect {
                    return Err(HandoverError::NoReceiver {
                        path: path.to_path_buf(),
                        source: e.into(),
                    });
                }
                std::thread::sleep(POLL);
            }
            Err(e) => return Err(io_error(e, "connecting to the new process", path)),
        }
    }
}

/// The peer's process id, once it is known to run as our user.
fn check_peer(conn: &OwnedFd, path: &Path) -> Result<i32, HandoverError> {
    let creds = socket::getsockopt(conn, sockopt::PeerCredentials)
        .map_err(|e| io_error(e, "reading the other process's credentials", path))?;
    let ours = nix::unistd::geteuid().as_raw();
    if creds.uid() != ours {
        return Err(HandoverError::ForeignPeer {
            path: path.to_path_buf(),
            peer: creds.uid(),
            ours,
        });
    }
    Ok(creds.pid())
}

fn send_message<T: Serialize>(
    conn: &OwnedFd,
    message: &T,
    raw_fds: &[RawFd],
    path: &Path,
    limit: Duration,
) -> Result<(), HandoverError> {
    let body = serde_json::to_vec(message).map_err(|e| protocol(path, e.to_string()))?;
    let iov = [IoSlice::new(&body)];
    let rights = [ControlMessage::ScmRights(raw_fds)];
    let cmsgs: &[ControlMessage<'_>] = if raw_fds.is_empty() { &[] } else { &rights };
    // MSG_NOSIGNAL: a new process that died is an error here, not a SIGPIPE.
    match socket::sendmsg::<()>(conn.as_raw_fd(), &iov, cmsgs, MsgFlags::MSG_NOSIGNAL, None) {
        Ok(n) if n == body.len() => Ok(()),
        Ok(n) => Err(protocol(path, format!("sent {n} of {} bytes", body.len()))),
        Err(e) => Err(sys_error(e, "sending listening sockets", path, limit)),
    }
}

/// The new process's end: a socket listening for the old process, and a
/// thread that takes the sockets over while pingora's bootstrap waits for
/// pingora's own.
pub struct Receiver {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Option<Inherited>>>,
}

/// An address the new configuration listens on.
#[derive(Clone, Debug)]
pub struct Wanted {
    /// Where it is configured (`listeners.front.bind`).
    pub path: String,
    /// The address.
    pub addr: SocketAddr,
}

/// Listening sockets taken over from the old process.
#[derive(Debug)]
pub struct Inherited {
    /// By address (`SocketAddr`'s display form).
    pub sockets: HashMap<String, TcpListener>,
    /// The old process.
    pub from_pid: i32,
    /// Messages they came in.
    pub batches: usize,
}

impl Receiver {
    /// Listen on [`path_for`]`(upgrade_sock)`, then wait on a thread of its own
    /// for the old process. `wanted` are the addresses the configuration
    /// listens on. A handover that starts and fails ends the process: the old
    /// one then keeps serving.
    pub fn listen(upgrade_sock: &str, wanted: Vec<Wanted>) -> Result<Receiver, HandoverError> {
        let path = path_for(upgrade_sock);
        let pingora = PathBuf::from(upgrade_sock);
        let opened = Instant::now();
        let listening = listen_at(&path)?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("handover".to_string())
            .spawn(move || {
                let at = Endpoints {
                    ours: &path,
                    pingora: &pingora,
                };
                let outcome = receive(listening, &at, &wanted, &stopped, opened, &Timing::DEFAULT);
                match outcome {
                    Ok(inherited) => inherited,
                    Err(e) => {
                        error!(
                            "upgrade failed: {e}; exiting, the running process keeps its listeners"
                        );
                        std::process::exit(1);
                    }
                }
            })
            .map_err(|source| HandoverError::Io {
                what: "starting the handover thread",
                path: path_for(upgrade_sock),
                source,
            })?;
        Ok(Receiver {
            stop,
            thread: Some(thread),
        })
    }

    /// Stop waiting (pingora's bootstrap is over) and return what came over:
    /// `None` when no handover of sluice's came (an older sluice hands its
    /// listeners over through pingora's table only).
    pub fn finish(mut self) -> Option<Inherited> {
        self.stop.store(true, Relaxed);
        self.thread.take().and_then(|t| t.join().ok().flatten())
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.stop.store(true, Relaxed);
    }
}

/// The two Unix sockets of an upgrade.
struct Endpoints<'a> {
    /// sluice's handover socket.
    ours: &'a Path,
    /// pingora's `upgrade_sock`.
    pingora: &'a Path,
}

/// The new process's listening handover socket.
struct Listening {
    fd: OwnedFd,
    /// Of the socket file, to remove only our own.
    inode: u64,
}

impl Listening {
    /// Close the socket and remove its file, unless another process bound
    /// the path since: nobody else can connect.
    fn close(self, path: &Path) {
        drop(self.fd);
        if std::fs::symlink_metadata(path).is_ok_and(|m| m.ino() == self.inode) {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Bind the listening handover socket (only we may connect), replacing a
/// socket file left behind by an earlier process.
fn listen_at(path: &Path) -> Result<Listening, HandoverError> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            std::fs::remove_file(path).map_err(|source| HandoverError::Io {
                what: "removing an old handover socket",
                path: path.to_path_buf(),
                source,
            })?;
        }
        Ok(_) => {
            return Err(HandoverError::NotASocket {
                path: path.to_path_buf(),
            });
        }
        Err(_) => {}
    }
    let addr = UnixAddr::new(path).map_err(|e| io_error(e, "the handover socket path", path))?;
    let listener = socket::socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )
    .map_err(|e| io_error(e, "creating a Unix socket", path))?;
    socket::bind(listener.as_raw_fd(), &addr)
        .map_err(|e| io_error(e, "binding the handover socket", path))?;
    let perm = std::os::unix::fs::PermissionsExt::from_mode(0o600);
    std::fs::set_permissions(path, perm).map_err(|source| HandoverError::Io {
        what: "restricting the handover socket to this user",
        path: path.to_path_buf(),
        source,
    })?;
    let inode = std::fs::symlink_metadata(path)
        .map(|m| m.ino())
        .map_err(|source| HandoverError::Io {
            what: "reading the handover socket",
            path: path.to_path_buf(),
            source,
        })?;
    socket::listen(&listener, Backlog::new(4).unwrap_or(Backlog::MAXCONN))
        .map_err(|e| io_error(e, "listening on the handover socket", path))?;
    Ok(Listening {
        fd: listener,
        inode,
    })
}

/// Wait for the old process (until `timing.accept` after `opened`, or until
/// `stop`), take its sockets and answer. `Ok(None)`: no handover came.
fn receive(
    listening: Listening,
    at: &Endpoints<'_>,
    wanted: &[Wanted],
    stop: &AtomicBool,
    opened: Instant,
    timing: &Timing,
) -> Result<Option<Inherited>, HandoverError> {
    let path = at.ours;
    let accepted = wait_for_old(&listening.fd, path, stop, opened + timing.accept);
    // One handover at a time: from here on nobody else can connect.
    listening.close(path);
    let Some((conn, from_pid)) = accepted? else {
        return Ok(None);
    };
    // The old process is committed now: any failure refuses the handover.
    let taken = take(&conn, path, wanted, opened + timing.complete);
    let (mut sockets, batches, pingora_sockets) = match taken {
        Ok(t) => t,
        Err(e) => {
            let reason = Reply::Refused {
                reason: e.to_string(),
            };
            let _ = send_message(&conn, &reason, &[], path, timing.io);
            return Err(e);
        }
    };
    let unused: Vec<String> = sockets
        .keys()
        .filter(|a| !wanted.iter().any(|w| w.addr.to_string() == **a))
        .cloned()
        .collect();
    for a in &unused {
        sockets.remove(a);
    }
    let reply = Reply::Taken {
        sockets: sockets.len() + unused.len(),
    };
    send_message(&conn, &reply, &[], path, timing.io)?;
    info!(
        "took over {} listening socket(s) from process {from_pid} in {batches} batch(es)",
        sockets.len() + unused.len()
    );
    if !unused.is_empty() {
        warn!(
            "closed {} inherited listening socket(s) the configuration does not listen on: {}",
            unused.len(),
            unused.join(", ")
        );
    }
    if pingora_sockets == 0 {
        end_pingora_wait(at.pingora, opened + timing.feed)?;
    }
    Ok(Some(Inherited {
        sockets,
        from_pid,
        batches,
    }))
}

/// The old process's connection and process id, once one running as our
/// user connects; `None` once `stop` is set or `until` has passed.
fn wait_for_old(
    listener: &OwnedFd,
    path: &Path,
    stop: &AtomicBool,
    until: Instant,
) -> Result<Option<(OwnedFd, i32)>, HandoverError> {
    loop {
        if stop.load(Relaxed) || Instant::now() >= until {
            return Ok(None);
        }
        match fds::accept_unix(listener) {
            Ok(conn) => match check_peer(&conn, path) {
                Ok(pid) => return Ok(Some((conn, pid))),
                Err(e) => warn!("{e}"),
            },
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::sleep(POLL),
            Err(source) => {
                return Err(HandoverError::Io {
                    what: "accepting the old process",
                    path: path.to_path_buf(),
                    source,
                });
            }
        }
    }
}

/// Read every batch up to `done`; check each socket and that every wanted
/// address the old process did not send can be bound. Returns the sockets,
/// the batch count and how many sockets pingora's handover carries.
fn take(
    conn: &OwnedFd,
    path: &Path,
    wanted: &[Wanted],
    by: Instant,
) -> Result<(HashMap<String, TcpListener>, usize, usize), HandoverError> {
    let mut sockets = HashMap::new();
    let mut batches = 0;
    let mut buf = vec![0u8; MAX_MESSAGE];
    loop {
        let left = by.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(too_late(path));
        }
        set_timeout(conn, sockopt::ReceiveTimeout, left, path)?;
        let (n, received) = match receive_message(conn, &mut buf, path) {
            Ok(m) => m,
            Err(HandoverError::Timeout { .. }) => return Err(too_late(path)),
            Err(e) => return Err(e),
        };
        if n == 0 {
            return Err(HandoverError::Closed {
                path: path.to_path_buf(),
                when: format!("after {} socket(s), before it was done", sockets.len()),
            });
        }
        let message: Message = serde_json::from_slice(&buf[..n])
            .map_err(|e| protocol(path, format!("unreadable message: {e}")))?;
        match message {
            Message::Batch { addrs } => {
                if addrs.is_empty() || addrs.len() != received.len() {
                    return Err(protocol(
                        path,
                        format!(
                            "a batch named {} address(es) and carried {} socket(s)",
                            addrs.len(),
                            received.len()
                        ),
                    ));
                }
                for (addr, fd) in addrs.into_iter().zip(received) {
                    let listener = listening_socket(&addr, fd, path)?;
                    if sockets.insert(addr.clone(), listener).is_some() {
                        return Err(protocol(path, format!("{addr} came twice")));
                    }
                }
                batches += 1;
            }
            Message::Done {
                sockets: total,
                pingora_sockets,
            } => {
                if !received.is_empty() || total != sockets.len() {
                    return Err(protocol(
                        path,
                        format!(
                            "the old process says it sent {total} socket(s); {} arrived",
                            sockets.len() + received.len()
                        ),
                    ));
                }
                for w in wanted {
                    let key = w.addr.to_string();
                    if !sockets.contains_key(&key) {
                        crate::traffic::probe_bind(w.addr).map_err(|e| {
                            HandoverError::Refused(format!(
                                "the new configuration listens on {key} ({}), which the old process does not, and it cannot be bound: {e}",
                                w.path
                            ))
                        })?;
                    }
                }
                return Ok((sockets, batches, pingora_sockets));
            }
        }
    }
}

fn too_late(path: &Path) -> HandoverError {
    HandoverError::Refused(format!(
        "the handover over {} did not complete in time: pingora's own handover would time out; start `sluice -u` again and send SIGQUIT at once",
        path.display()
    ))
}

/// One message and the descriptors it carried (owned: closed on every
/// error path). `0` bytes: the other end closed.
fn receive_message(
    conn: &OwnedFd,
    buf: &mut [u8],
    path: &Path,
) -> Result<(usize, Vec<OwnedFd>), HandoverError> {
    let mut cmsg = nix::cmsg_space!([RawFd; MAX_FDS_PER_MESSAGE]);
    let mut iov = [IoSliceMut::new(buf)];
    let msg = socket::recvmsg::<()>(
        conn.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .map_err(|e| sys_error(e, "receiving listening sockets", path, Duration::ZERO))?;
    let mut received = Vec::new();
    // The buffer holds SCM_MAX_FD descriptors, the most one message can
    // carry, so the kernel never cuts the list short (MSG_CTRUNC).
    let cmsgs = msg
        .cmsgs()
        .map_err(|e| io_error(e, "receiving listening sockets", path))?;
    for c in cmsgs {
        if let ControlMessageOwned::ScmRights(raw) = c {
            received.extend(fds::own_received(raw));
        }
    }
    if msg.flags.contains(MsgFlags::MSG_TRUNC) {
        return Err(protocol(path, "a message larger than 64 KiB".to_string()));
    }
    Ok((msg.bytes, received))
}

/// `fd` as the listening TCP socket bound to `addr` it must be.
fn listening_socket(addr: &str, fd: OwnedFd, path: &Path) -> Result<TcpListener, HandoverError> {
    let want: SocketAddr = addr
        .parse()
        .map_err(|_| protocol(path, format!("{addr:?} is not a socket address")))?;
    let listening = socket::getsockopt(&fd, sockopt::AcceptConn).unwrap_or(false);
    let stream = socket::getsockopt(&fd, sockopt::SockType).ok() == Some(SockType::Stream);
    if !(listening && stream) {
        return Err(protocol(
            path,
            format!("the socket sent for {addr} is not a listening TCP socket"),
        ));
    }
    let listener = TcpListener::from(fd);
    match listener.local_addr() {
        Ok(got) if got == want => Ok(listener),
        Ok(got) => Err(protocol(
            path,
            format!("the socket sent for {addr} listens on {got}"),
        )),
        Err(e) => Err(protocol(
            path,
            format!("the socket sent for {addr} has no TCP address: {e}"),
        )),
    }
}

/// pingora's table in the old process is empty, so pingora there sends
/// nothing and pingora's bootstrap here would wait in vain: connect to it
/// and close, an empty transfer.
fn end_pingora_wait(pingora: &Path, by: Instant) -> Result<(), HandoverError> {
    loop {
        match std::os::unix::net::UnixStream::connect(pingora) {
            Ok(s) => {
                drop(s);
                return Ok(());
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
                ) && Instant::now() < by =>
            {
                std::thread::sleep(POLL);
            }
            Err(source) => {
                return Err(HandoverError::Io {
                    what: "ending pingora's bootstrap wait (the old process has no admin socket to send)",
                    path: pingora.to_path_buf(),
                    source,
                });
            }
        }
    }
}

fn set_timeout<O>(conn: &OwnedFd, opt: O, limit: Duration, path: &Path) -> Result<(), HandoverError>
where
    O: nix::sys::socket::SetSockOpt<Val = TimeVal>,
{
    // A zero timeval means "no limit": never set that.
    let limit = limit.max(Duration::from_millis(1));
    let tv = TimeVal::new(
        limit.as_secs().try_into().unwrap_or(i64::MAX),
        limit.subsec_micros().into(),
    );
    socket::setsockopt(conn, opt, &tv)
        .map_err(|e| io_error(e, "setting a time limit on the handover socket", path))
}

fn io_error(e: Errno, what: &'static str, path: &Path) -> HandoverError {
    HandoverError::Io {
        what,
        path: path.to_path_buf(),
        source: e.into(),
    }
}

/// A failed send or receive: a time limit, a closed peer, or another error.
fn sys_error(e: Errno, what: &'static str, path: &Path, limit: Duration) -> HandoverError {
    match e {
        Errno::EAGAIN => HandoverError::Timeout {
            what,
            path: path.to_path_buf(),
            limit,
        },
        Errno::EPIPE | Errno::ECONNRESET => HandoverError::Closed {
            path: path.to_path_buf(),
            when: format!("while {what}"),
        },
        e => io_error(e, what, path),
    }
}

fn protocol(path: &Path, detail: String) -> HandoverError {
    HandoverError::Protocol {
        path: path.to_path_buf(),
        detail,
    }
}

#[cfg(test)]
mod tests;
