//! The in-kernel fast path (`fast_path: sockmap`): once the backend
//! connect succeeds, the client and backend sockets go into a BPF sockhash
//! whose stream-verdict program hands every segment that arrives on one
//! socket to the other's send queue (`bpf_sk_redirect_hash`), so payload
//! never reaches user space. User space keeps what the kernel cannot do:
//! passing a half-close on, the idle timeout, byte counts, aborts.
//!
//! # How it keeps the relay's semantics
//!
//! - **Ordering at entry.** sluice has read nothing from either socket when
//!   it gets here, so every byte is still in a kernel receive queue. Both
//!   sockets first go into `peers`, a sockhash with no program (so nothing
//!   changes for them yet) that is the redirect *target*; only then does each
//!   go into `verdict`, the sockhash with the program. A segment that arrives
//!   in between finds its peer already there, and data queued before the
//!   insert is verdicted in order by the first `recv` (the kernel runs the
//!   verdict on the queue then), which is also how EOF is watched.
//! - **Half-close.** The kernel does not pass a FIN through a redirect. The
//!   program drops a zero-length segment (a bare FIN; passed to its own
//!   socket instead, it can queue behind redirected data, where the kernel's
//!   send worker takes its zero length for a broken pipe), and `recv` still
//!   reads EOF. The redirected bytes may still sit in the peer's queue (the
//!   kernel sends them from a work item), so the peer's write half is shut
//!   only once the peer's TCP send sequence has moved by as many bytes as
//!   the program counted (`TCP_INFO` acknowledged bytes + `SIOCOUTQ`).
//! - **Byte counts and idleness.** The program adds each segment's length to
//!   its socket's entry in `state`; user space reads the entries on the idle
//!   timer, on every metrics scrape ([`flush`]) and at the end.
//! - **Leaving.** Taking a socket out of a sockhash drops whatever the kernel
//!   still holds for it, so sockets leave only when the session is over, or,
//!   for a backend that closed before a byte moved (another backend may take
//!   the client), after the verdict has stopped and the counters say no byte
//!   was moved.
//!
//! # What it cannot keep, and the checks
//!
//! **Backpressure.** A redirected segment leaves the receiving socket's
//! accounting at once (it is orphaned when read off the queue), so however
//! slowly the peer reads, the sender's window stays open and the kernel
//! queues without bound; a verdict program cannot hold a segment back. On
//! Linux 6.18 [`probe`] measures 44 MiB held for a peer that read nothing.
//! So before any connection uses it, [`probe`] checks on loopback that the
//! kernel holds a sender back, delivers everything once the peer reads, and
//! carries 8 MiB both ways intact; where it does not (or BPF is refused:
//! no root, `CAP_BPF`, `CAP_NET_ADMIN`), every connection takes the normal
//! relay and one log line says why.

use std::collections::HashMap;
use std::future::{Future, poll_fn};
use std::io::{self, Read};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::Poll;
use std::time::{Duration, Instant};

use log::{info, warn};
use prometheus::IntCounter;

use super::bpf::{self, Insn};
use super::{End, Meter, Options, Side, Socket, Totals};

/// Sockets the maps hold at most (two per connection); past it, new
/// connections take the normal relay.
const MAX_SOCKETS: u32 = 1 << 18;

/// The kernel objects: created once per process, when the first listener
/// that asks for the fast path is set up; they go away with the process.
pub struct Kernel {
    /// Socket cookie → [`Entry`].
    state: bpf::Map,
    /// Socket cookie → socket: where the program sends data (no program of its own).
    peers: bpf::Map,
    /// Socket cookie → socket: the sockets whose data the program redirects.
    verdict: bpf::Map,
    /// The stream-verdict program (attached to `verdict`).
    _program: OwnedFd,
}

/// A socket's entry in `state`: its peer's cookie, then the bytes the
/// program has moved from it to the peer.
const ENTRY_SIZE: usize = 16;

/// `bpf_map_lookup_elem`, `bpf_get_socket_cookie`, `bpf_sk_redirect_hash`.
const HELPER_MAP_LOOKUP: i32 = 1;
const HELPER_SOCKET_COOKIE: i32 = 46;
const HELPER_SK_REDIRECT_HASH: i32 = 72;
/// `SK_PASS`, `SK_DROP`.
const SK_PASS: i32 = 1;
const SK_DROP: i32 = 0;

/// Instruction builders (the eBPF encoding, `linux/bpf_common.h`).
mod asm {
    use super::Insn;

    const fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
        Insn {
            code,
            regs: (src << 4) | dst,
            off,
            imm,
        }
    }
    /// `dst = src` (64-bit).
    pub const fn mov(dst: u8, src: u8) -> Insn {
        insn(0xbf, dst, src, 0, 0)
    }
    /// `dst = imm` (64-bit).
    pub const fn mov_imm(dst: u8, imm: i32) -> Insn {
        insn(0xb7, dst, 0, 0, imm)
    }
    /// `dst += imm` (64-bit).
    pub const fn add_imm(dst: u8, imm: i32) -> Insn {
        insn(0x07, dst, 0, 0, imm)
    }
    /// `dst = *(u32 *)(src + off)`.
    pub const fn load32(dst: u8, src: u8, off: i16) -> Insn {
        insn(0x61, dst, src, off, 0)
    }
    /// `dst = *(u64 *)(src + off)`.
    pub const fn load64(dst: u8, src: u8, off: i16) -> Insn {
        insn(0x79, dst, src, off, 0)
    }
    /// `*(u64 *)(dst + off) = src`.
    pub const fn store64(dst: u8, off: i16, src: u8) -> Insn {
        insn(0x7b, dst, src, off, 0)
    }
    /// `lock *(u64 *)(dst + off) += src` (`BPF_ATOMIC | BPF_ADD`).
    pub const fn atomic_add64(dst: u8, off: i16, src: u8) -> Insn {
        insn(0xdb, dst, src, off, 0)
    }
    /// `if dst == imm goto +off`.
    pub const fn jeq_imm(dst: u8, imm: i32, off: i16) -> Insn {
        insn(0x15, dst, 0, off, imm)
    }
    /// Call helper `id`.
    pub const fn call(id: i32) -> Insn {
        insn(0x85, 0, 0, 0, id)
    }
    /// Return `r0`.
    pub const fn exit() -> Insn {
        insn(0x95, 0, 0, 0, 0)
    }
    /// `dst = map` (`BPF_LD | BPF_IMM | BPF_DW` with `BPF_PSEUDO_MAP_FD`): two slots.
    pub const fn load_map(dst: u8, fd: i32) -> [Insn; 2] {
        [insn(0x18, dst, 1, 0, fd), insn(0, 0, 0, 0, 0)]
    }
}

/// The stream-verdict program, for the maps `state` and `peers`:
///
/// ```c
/// int verdict(struct __sk_buff *skb) {
///     if (skb->len == 0)       /* a bare FIN: dropped, user space reads EOF */
///         return SK_DROP;      /* (passed on, it breaks the socket: EPIPE) */
///     __u64 me = bpf_get_socket_cookie(skb);
///     struct entry *e = bpf_map_lookup_elem(&state, &me);
///     if (!e)                  /* not (or no longer) paired */
///         return SK_PASS;
///     __sync_fetch_and_add(&e->bytes, skb->len);
///     __u64 peer = e->peer;
///     return bpf_sk_redirect_hash(skb, &peers, &peer, 0);   /* egress */
/// }
/// ```
fn program(state: i32, peers: i32) -> Vec<Insn> {
    use asm::*;
    // Jumps are patched once the exits' places are known.
    let mut p = vec![
        mov(6, 1),        // r6 = skb
        load32(2, 6, 0),  // r2 = skb->len
        jeq_imm(2, 0, 0), // bare FIN: drop
        mov(1, 6),        //
        call(HELPER_SOCKET_COOKIE),
        store64(10, -8, 0), // key = cookie
    ];
    let to_drop = 2;
    p.extend(load_map(1, state));
    p.extend([mov(2, 10), add_imm(2, -8), call(HELPER_MAP_LOOKUP)]);
    let to_pass = p.len();
    p.extend([
        jeq_imm(0, 0, 0), // not paired: pass
        mov(7, 0),
        load32(2, 6, 0),
        atomic_add64(7, 8, 2), // e->bytes += len
        load64(1, 7, 0),       // peer
        store64(10, -16, 1),
        mov(1, 6),
    ]);
    p.extend(load_map(2, peers));
    p.extend([
        mov(3, 10),
        add_imm(3, -16),
        mov_imm(4, 0),
        call(HELPER_SK_REDIRECT_HASH),
        exit(),
    ]);
    let pass = p.len();
    p.extend([mov_imm(0, SK_PASS), exit()]);
    let drop = p.len();
    p.extend([mov_imm(0, SK_DROP), exit()]);
    for (at, target) in [(to_drop, drop), (to_pass, pass)] {
        p[at].off = (target - at - 1) as i16;
    }
    p
}

impl Kernel {
    fn load() -> io::Result<Kernel> {
        let state = bpf::map_create(
            bpf::MAP_HASH,
            8,
            ENTRY_SIZE as u32,
            MAX_SOCKETS,
            bpf::F_NO_PREALLOC,
            "sluice_state",
        )?;
        let peers = bpf::map_create(bpf::MAP_SOCKHASH, 8, 8, MAX_SOCKETS, 0, "sluice_peers")?;
        let verdict = bpf::map_create(bpf::MAP_SOCKHASH, 8, 8, MAX_SOCKETS, 0, "sluice_verdict")?;
        let insns = program(fd_imm(&state), fd_imm(&peers));
        let program = bpf::prog_load(bpf::PROG_SK_SKB, &insns, "Dual MIT/GPL", "sluice_verdict")?;
        bpf::prog_attach(verdict.as_fd(), program.as_fd(), bpf::ATTACH_STREAM_VERDICT)?;
        Ok(Kernel {
            state,
            peers,
            verdict,
            _program: program,
        })
    }

    fn set_entry(&self, cookie: u64, peer: u64) -> io::Result<()> {
        let mut value = [0u8; ENTRY_SIZE];
        value[..8].copy_from_slice(&peer.to_ne_bytes());
        self.state
            .update(&cookie.to_ne_bytes(), &value, bpf::NOEXIST)
    }

    /// The bytes the program moved from the socket `cookie` to its peer.
    fn moved(&self, cookie: u64) -> io::Result<u64> {
        let mut value = [0u8; ENTRY_SIZE];
        if !self.state.lookup(&cookie.to_ne_bytes(), &mut value)? {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                "fast path: a socket's counter is gone",
            ));
        }
        let mut bytes = [0u8; 8];
        bytes.copy_from_slice(&value[8..]);
        Ok(u64::from_ne_bytes(bytes))
    }

    fn insert(&self, map: &bpf::Map, cookie: u64, socket: BorrowedFd<'_>) -> io::Result<()> {
        let fd = std::os::fd::AsRawFd::as_raw_fd(&socket) as u64;
        map.update(&cookie.to_ne_bytes(), &fd.to_ne_bytes(), bpf::NOEXIST)
    }

    fn remove(&self, map: &bpf::Map, cookie: u64) {
        // Absent already (a closed socket leaves its sockhashes by itself).
        let _ = map.delete(&cookie.to_ne_bytes());
    }
}

fn fd_imm(fd: &impl AsFd) -> i32 {
    std::os::fd::AsRawFd::as_raw_fd(&fd.as_fd())
}

static KERNEL: OnceLock<Result<Kernel, String>> = OnceLock::new();

/// The kernel objects, loaded on first use; `Err` says why the kernel
/// refused them.
pub fn kernel() -> Result<&'static Kernel, &'static str> {
    KERNEL
        .get_or_init(|| {
            Kernel::load().map_err(|e| match e.raw_os_error() {
                Some(nix::libc::EPERM) => {
                    format!("BPF refused: {e} (needs root, or CAP_BPF and CAP_NET_ADMIN)")
                }
                _ => format!("BPF refused: {e}"),
            })
        })
        .as_ref()
        .map_err(String::as_str)
}

/// The probe's verdict on this kernel: `Ok` when the kernel keeps the
/// relay's semantics, `Err` with the reason (logged once) when not.
static VERDICT: OnceLock<Result<(), String>> = OnceLock::new();
static PROBE_STARTED: std::sync::Once = std::sync::Once::new();

/// Whether the fast path may be used here: loads the kernel objects and
/// runs [`probe`] once (blocking; the relay runs it on a thread of its own).
pub fn verdict() -> Result<&'static Kernel, &'static str> {
    let v = VERDICT.get_or_init(|| {
        let v = kernel().map_err(str::to_string).and_then(probe);
        match &v {
            Ok(()) => info!("fast_path: sockmap passed its checks; those listeners relay in the kernel"),
            Err(why) => warn!(
                "fast_path: sockmap is not used on this machine: {why}; those listeners relay in user space"
            ),
        }
        v
    });
    match v {
        Ok(()) => kernel(),
        Err(why) => Err(why),
    }
}

/// Start [`verdict`] on a thread of its own, once per process: a listener
/// with `fast_path: sockmap` calls this when it is set up, so the verdict
/// is usually known before its first client.
pub fn prepare() {
    PROBE_STARTED.call_once(|| {
        let spawned = std::thread::Builder::new()
            .name("sluice-sockmap-probe".into())
            .spawn(|| {
                let _ = verdict();
            });
        if let Err(e) = spawned {
            let _ = VERDICT.set(Err(format!("cannot start the probe: {e}")));
        }
    });
}

/// [`verdict`] without waiting: until the probe has run, connections take
/// the normal relay.
fn usable() -> Result<&'static Kernel, Refused> {
    match VERDICT.get() {
        Some(Ok(())) => kernel().map_err(Refused::Kernel),
        Some(Err(why)) => Err(Refused::Kernel(why)),
        None => {
            prepare();
            Err(Refused::Probing)
        }
    }
}

/// Most bytes the kernel may hold for a peer that reads nothing, beyond
/// what the peer's own TCP queue took: what the receiving socket's buffer
/// may grow to (`tcp_rmem`'s maximum), as if the bytes still counted there.
/// Past it, a slow reader no longer holds a fast sender back, and memory
/// grows with what the sender sends.
fn receive_buffer_max() -> u64 {
    std::fs::read_to_string("/proc/sys/net/ipv4/tcp_rmem")
        .ok()
        .and_then(|s| s.split_whitespace().nth(2)?.parse().ok())
        .unwrap_or(6 << 20)
}

/// Check, on loopback, that this kernel keeps what the relay promises
/// before any client relies on it: a sender is held back by a peer that
/// does not read (backpressure), and everything moved reaches the peer once
/// it reads (no stall), both ways at once, intact. Takes well under a
/// second; a kernel without backpressure holds `tcp_rmem`'s maximum plus
/// 16 MiB for it meanwhile, freed when it ends.
pub fn probe(k: &'static Kernel) -> Result<(), String> {
    probe_inner(k).map_err(|e| format!("the kernel's sockmap redirect failed a check: {e}"))
}

fn probe_inner(k: &'static Kernel) -> io::Result<()> {
    use std::io::Write;
    let pair = || -> io::Result<(std::net::TcpStream, std::net::TcpStream)> {
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        let a = std::net::TcpStream::connect(l.local_addr()?)?;
        Ok((a, l.accept()?.0))
    };
    let (a, x) = pair()?;
    let (y, b) = pair()?;
    let mut p = Pair::enter(k, [x.as_fd(), y.as_fd()]).map_err(|r| match r {
        Refused::Socket(e) | Refused::Broken(e) => e,
        other => io::Error::other(other.to_string()),
    })?;
    // 1. A peer that reads nothing holds the sender back: the kernel holds
    // no more for it than a receive buffer may (pushing 16 MiB past that).
    let max = receive_buffer_max();
    let cap = (max + (16 << 20)) as usize;
    a.set_nonblocking(true)?;
    let chunk = vec![0x5a_u8; 256 << 10];
    let mut written = 0usize;
    let deadline = Instant::now() + Duration::from_millis(500);
    while written < cap && Instant::now() < deadline {
        match (&a).write(&chunk) {
            Ok(n) => written += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(5))
            }
            Err(e) => return Err(e),
        }
    }
    let moved = k.moved(p.cookies[0])?;
    let taken = bpf::tcp_sent(y.as_fd())?.saturating_sub(p.base[1]);
    let held = moved.saturating_sub(taken);
    if held > max {
        return Err(io::Error::other(format!(
            "no backpressure: it took {} MiB from a sender and holds {} MiB of it for a peer that read nothing, more than a receive buffer may hold ({} MiB); the normal relay holds at most one 64 KiB buffer or pipe",
            moved >> 20,
            held >> 20,
            max >> 20
        )));
    }
    // 2. Once the peer reads, everything arrives.
    a.set_nonblocking(false)?;
    b.set_read_timeout(Some(Duration::from_millis(1500)))?;
    let mut got = 0usize;
    let mut buf = vec![0u8; 256 << 10];
    while got < written {
        match (&b).read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(_) => break,
        }
    }
    if got < written {
        return Err(io::Error::other(format!(
            "stall: {got} of {written} bytes arrived within 1.5 s of the peer reading"
        )));
    }
    // 3. Both ways at once, intact and without an error.
    const EACH: usize = 8 << 20;
    let sender = |mut s: std::net::TcpStream| {
        std::thread::spawn(move || -> io::Result<()> {
            let data: Vec<u8> = (0..EACH).map(|i| (i % 251) as u8).collect();
            s.write_all(&data)
        })
    };
    let receiver = |mut s: std::net::TcpStream| {
        std::thread::spawn(move || -> io::Result<bool> {
            s.set_read_timeout(Some(Duration::from_secs(3)))?;
            let mut buf = vec![0u8; 256 << 10];
            let mut at = 0usize;
            while at < EACH {
                let n = s.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                if buf[..n]
                    .iter()
                    .enumerate()
                    .any(|(i, &v)| v != ((at + i) % 251) as u8)
                {
                    return Ok(false);
                }
                at += n;
            }
            Ok(at == EACH)
        })
    };
    let threads = [
        (sender(a.try_clone()?), receiver(b.try_clone()?)),
        (sender(b.try_clone()?), receiver(a.try_clone()?)),
    ];
    for (send, recv) in threads {
        let sent = send
            .join()
            .map_err(|_| io::Error::other("probe thread panicked"))?;
        let intact = recv
            .join()
            .map_err(|_| io::Error::other("probe thread panicked"))?;
        match (sent, intact) {
            (Ok(()), Ok(true)) => {}
            (s, r) => {
                return Err(io::Error::other(format!(
                    "8 MiB each way at once did not arrive intact (send: {s:?}, receive: {r:?}, errors: {:?} / {:?})",
                    x.take_error(),
                    y.take_error()
                )));
            }
        }
    }
    p.leave();
    Ok(())
}

/// A connection's byte counters as the metrics last saw them.
struct Live {
    client: u64,
    backend: u64,
    up: [IntCounter; 2],
    down: [IntCounter; 2],
    seen: Mutex<(u64, u64)>,
}

impl Live {
    /// Add what moved since the last look to the metrics; the totals.
    fn sync(&self, k: &Kernel) -> io::Result<(u64, u64)> {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        let up = k.moved(self.client)?;
        let down = k.moved(self.backend)?;
        for c in &self.up {
            c.inc_by(up.saturating_sub(seen.0));
        }
        for c in &self.down {
            c.inc_by(down.saturating_sub(seen.1));
        }
        *seen = (up.max(seen.0), down.max(seen.1));
        Ok(*seen)
    }
}

type Registry = HashMap<u64, Arc<Live>>;

/// Connections on the fast path, by client cookie, for [`flush`].
static LIVE: OnceLock<Mutex<Registry>> = OnceLock::new();

fn registry() -> std::sync::MutexGuard<'static, Registry> {
    LIVE.get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner())
}

/// Bring the byte counters of every fast-path connection up to date (a
/// metrics scrape calls this): one map lookup per socket.
pub fn flush() {
    let Some(Ok(k)) = KERNEL.get() else { return };
    let all: Vec<_> = registry().values().cloned().collect();
    for l in all {
        let _ = l.sync(k);
    }
}

/// Why a connection stays on the normal relay.
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    /// The kernel refused BPF, or failed the probe (logged once).
    #[error("{0}")]
    Kernel(&'static str),
    /// The probe has not finished yet.
    #[error("the fast path is still being checked")]
    Probing,
    /// This connection could not be inserted (for example, a socket no
    /// longer established, or the maps are full).
    #[error("{0}")]
    Socket(io::Error),
    /// Half inserted, and the way back failed: the connection must end.
    #[error("{0}")]
    Broken(io::Error),
}

/// Two sockets in the maps: index 0 is the client side, 1 the backend side.
struct Pair<'a> {
    k: &'static Kernel,
    fds: [BorrowedFd<'a>; 2],
    cookies: [u64; 2],
    /// Send progress of each socket when it entered.
    base: [u64; 2],
    inserted: [[bool; 2]; 3],
}

const STATE: usize = 0;
const PEERS: usize = 1;
const VERDICT_MAP: usize = 2;

impl<'a> Pair<'a> {
    /// Put both sockets in the maps, in the order that keeps their bytes in
    /// order (see the module notes), or say why not.
    fn enter(k: &'static Kernel, fds: [BorrowedFd<'a>; 2]) -> Result<Pair<'a>, Refused> {
        let cookie = |fd| bpf::socket_cookie(fd).map_err(Refused::Socket);
        let cookies = [cookie(fds[0])?, cookie(fds[1])?];
        let base = |fd| bpf::tcp_sent_baseline(fd).map_err(Refused::Socket);
        let base = [base(fds[0])?, base(fds[1])?];
        let mut p = Pair {
            k,
            fds,
            cookies,
            base,
            inserted: [[false; 2]; 3],
        };
        // The backend's verdict first: a backend that speaks first (a
        // banner) is more common than a client that half-closes at once.
        let steps = [
            (STATE, 0),
            (STATE, 1),
            (PEERS, 0),
            (PEERS, 1),
            (VERDICT_MAP, 1),
            (VERDICT_MAP, 0),
        ];
        for (which, side) in steps {
            if let Err(e) = p.insert(which, side) {
                if which == VERDICT_MAP && side == 0 {
                    // The backend's verdict ran: what it moved must reach
                    // the client before the normal relay writes to it, and
                    // leaving the maps earlier would drop it.
                    p.remove(VERDICT_MAP, 1);
                    if let Err(e) = p.wait_delivered_blocking(1) {
                        return Err(Refused::Broken(e));
                    }
                }
                return Err(Refused::Socket(e));
            }
        }
        Ok(p)
    }

    fn map(&self, which: usize) -> &'static bpf::Map {
        match which {
            STATE => &self.k.state,
            PEERS => &self.k.peers,
            _ => &self.k.verdict,
        }
    }

    fn insert(&mut self, which: usize, side: usize) -> io::Result<()> {
        let cookie = self.cookies[side];
        match which {
            STATE => self.k.set_entry(cookie, self.cookies[1 - side])?,
            _ => self.k.insert(self.map(which), cookie, self.fds[side])?,
        }
        self.inserted[which][side] = true;
        Ok(())
    }

    fn remove(&mut self, which: usize, side: usize) {
        if std::mem::take(&mut self.inserted[which][side]) {
            self.k.remove(self.map(which), self.cookies[side]);
        }
    }

    /// Take both sockets out of every map: the verdict first, so nothing
    /// moves while the rest goes.
    fn leave(&mut self) {
        for which in [VERDICT_MAP, PEERS, STATE] {
            for side in [1, 0] {
                self.remove(which, side);
            }
        }
    }

    /// Whether `moved` bytes out of socket `from` have all reached the
    /// other socket's TCP send queue.
    fn delivered(&self, from: usize, moved: u64) -> io::Result<bool> {
        let to = 1 - from;
        let sent = bpf::tcp_sent(self.fds[to])?;
        Ok(sent.wrapping_sub(self.base[to]) >= moved)
    }

    /// After a failed entry: wait (briefly) until the bytes the backend's
    /// verdict moved, if any, reached the client's send queue.
    fn wait_delivered_blocking(&self, from: usize) -> io::Result<()> {
        let deadline = Instant::now() + Duration::from_millis(100);
        loop {
            let moved = self.k.moved(self.cookies[from])?;
            if moved == 0 || self.delivered(from, moved)? {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "fast path: the client left the fast path with bytes still queued for it",
                ));
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }
}

impl Drop for Pair<'_> {
    fn drop(&mut self) {
        self.leave();
    }
}

/// A relayed connection on the fast path.
struct Spliced<'a> {
    pair: Pair<'a>,
    sockets: [&'a Socket; 2],
    live: Arc<Live>,
}

impl Spliced<'_> {
    fn socket(&self, side: usize) -> &Socket {
        self.sockets[side]
    }

    /// Bytes moved from [client, backend] so far (and into the metrics).
    fn moved(&self) -> io::Result<(u64, u64)> {
        self.live.sync(self.pair.k)
    }

    fn delivered(&self, from: usize, moved: u64) -> io::Result<bool> {
        self.pair.delivered(from, moved)
    }
}

impl Drop for Spliced<'_> {
    fn drop(&mut self) {
        let _ = self.live.sync(self.pair.k);
        registry().remove(&self.pair.cookies[0]);
        self.pair.leave();
    }
}

/// Put the connection on the fast path, or say why it stays on the normal one.
fn enter<'a>(
    k: &'static Kernel,
    client: &'a Socket,
    backend: &'a Socket,
    up: &Meter<'_>,
    down: &Meter<'_>,
) -> Result<Spliced<'a>, Refused> {
    let pair = Pair::enter(k, [client.get_ref().as_fd(), backend.get_ref().as_fd()])?;
    let live = Arc::new(Live {
        client: pair.cookies[0],
        backend: pair.cookies[1],
        up: [up.listener.clone(), up.backend.clone()],
        down: [down.listener.clone(), down.backend.clone()],
        seen: Mutex::new((0, 0)),
    });
    registry().insert(pair.cookies[0], Arc::clone(&live));
    Ok(Spliced {
        pair,
        sockets: [client, backend],
        live,
    })
}

/// One direction as user space watches it.
#[derive(Default)]
struct Watch {
    /// The source ended (EOF read).
    eof: bool,
    /// Everything reached the other side and the half-close was passed on.
    done: bool,
}

/// Relay on the fast path when it takes the pair; `Err` leaves the sockets
/// to the normal relay, with nothing moved that has not reached its peer.
pub async fn relay(
    client: &Socket,
    backend: &Socket,
    options: Options,
    up: &Meter<'_>,
    down: &Meter<'_>,
    abort: impl Future<Output = ()>,
) -> Result<(End, Totals), Refused> {
    let k = usable()?;
    relay_on(k, client, backend, options, up, down, abort).await
}

/// [`relay`] with the kernel objects given, probe or not (the tests use it
/// to check this module on a kernel that fails the probe).
pub(super) async fn relay_on(
    k: &'static Kernel,
    client: &Socket,
    backend: &Socket,
    options: Options,
    up: &Meter<'_>,
    down: &Meter<'_>,
    abort: impl Future<Output = ()>,
) -> Result<(End, Totals), Refused> {
    let mut s = match enter(k, client, backend, up, down) {
        Ok(s) => s,
        Err(Refused::Broken(e)) => return Ok((End::Error(Side::Client, e), Totals::default())),
        Err(refused) => return Err(refused),
    };
    up.relay.sockmap.inc();
    let mut abort = std::pin::pin!(abort);
    let unused_until = Instant::now() + options.unused_window;
    let mut w = [Watch::default(), Watch::default()];
    let mut scratch = [0u8; 64];
    // Rechecks while a direction waits for its bytes to be sent on.
    let mut recheck = Duration::from_millis(1);
    let mut recheck_timer = Box::pin(tokio::time::sleep(Duration::ZERO));
    let mut pending_delivery = false;
    // The idle timeout, in eighths (as the normal relay's).
    let tick = options
        .idle_timeout
        .map(|l| (l / super::IDLE_TICKS).max(Duration::from_millis(1)));
    let mut idle_timer = tick.map(|t| Box::pin(tokio::time::sleep(t)));
    let mut quiet_ticks = 0u32;
    let mut last_moved = (0u64, 0u64);

    let end = poll_fn(|cx| {
        let sides = [Side::Client, Side::Backend];
        let mut again = true;
        while again {
            again = false;
            for from in 0..2 {
                let socket = s.socket(from);
                let mut guard = match socket.poll_read_ready(cx) {
                    Poll::Ready(Ok(guard)) => guard,
                    Poll::Ready(Err(e)) => return Poll::Ready(End::Error(sides[from], e)),
                    Poll::Pending => continue,
                };
                if w[from].eof {
                    // Only an error can still come (the kernel's send to it
                    // failing): the next event wakes this again.
                    match socket.get_ref().take_error() {
                        Ok(None) => guard.clear_ready(),
                        Ok(Some(e)) | Err(e) => return Poll::Ready(End::Error(sides[from], e)),
                    }
                    again = true;
                    continue;
                }
                // Data never lands here (the program moves it): a read says
                // EOF, an error or nothing, and first runs the verdict on
                // anything queued before the insert.
                match guard.try_io(|sock| sock.get_ref().read(&mut scratch)) {
                    Ok(Ok(0)) => w[from].eof = true,
                    Ok(Ok(_)) => {
                        return Poll::Ready(End::Error(
                            sides[from],
                            io::Error::other("fast path: data bypassed the redirect"),
                        ));
                    }
                    Ok(Err(e)) => {
                        return Poll::Ready(error_end(&s, sides[from], e, &w, unused_until));
                    }
                    Err(_would_block) => {}
                }
                again = true;
            }
        }
        // A direction whose source ended: pass the half-close on once its
        // bytes are out.
        pending_delivery = false;
        let mut totals = None;
        for from in 0..2 {
            if !w[from].eof || w[from].done {
                continue;
            }
            let to = 1 - from;
            let (c, b) = match totals.map_or_else(|| s.moved(), Ok) {
                Ok(t) => *totals.insert(t),
                Err(e) => return Poll::Ready(End::Error(sides[from], e)),
            };
            // The backend closed before a byte moved either way, with the
            // client still there and soon after the connect: another
            // backend may take the client.
            if from == 1 && (c, b) == (0, 0) && !w[0].eof && Instant::now() < unused_until {
                return Poll::Ready(End::Unused(io::ErrorKind::UnexpectedEof.into()));
            }
            let moved = [c, b][from];
            match s.delivered(from, moved) {
                Ok(true) => {
                    if !w[to].done {
                        let peer = s.socket(to).get_ref();
                        if let Err(e) = peer.shutdown(std::net::Shutdown::Write) {
                            if e.kind() != io::ErrorKind::NotConnected {
                                return Poll::Ready(End::Error(sides[to], e));
                            }
                        }
                    }
                    w[from].done = true;
                }
                Ok(false) => {
                    // The peer may have failed while its queue waits.
                    match s.socket(to).get_ref().take_error() {
                        Ok(None) => pending_delivery = true,
                        Ok(Some(e)) | Err(e) => return Poll::Ready(End::Error(sides[to], e)),
                    }
                }
                Err(e) => return Poll::Ready(End::Error(sides[to], e)),
            }
        }
        if w[0].done && w[1].done {
            return Poll::Ready(End::Done);
        }
        if pending_delivery {
            loop {
                if recheck_timer.as_mut().poll(cx).is_pending() {
                    break;
                }
                let next = tokio::time::Instant::now() + recheck;
                recheck = (recheck * 2).min(Duration::from_millis(16));
                recheck_timer.as_mut().reset(next);
            }
        } else {
            recheck = Duration::from_millis(1);
        }
        if let (Some(timer), Some(tick)) = (idle_timer.as_mut(), tick) {
            while timer.as_mut().poll(cx).is_ready() {
                let now = match s.moved() {
                    Ok(m) => m,
                    Err(e) => return Poll::Ready(End::Error(Side::Client, e)),
                };
                if now != last_moved {
                    last_moved = now;
                    quiet_ticks = 0;
                } else {
                    quiet_ticks += 1;
                    if quiet_ticks >= super::IDLE_TICKS {
                        return Poll::Ready(End::IdleTimeout);
                    }
                }
                let next = timer.deadline() + tick;
                timer.as_mut().reset(next);
            }
        }
        if abort.as_mut().poll(cx).is_ready() {
            return Poll::Ready(End::Aborted);
        }
        Poll::Pending
    })
    .await;
    let (to_backend, to_client) = s.moved().unwrap_or(last_moved);
    let end = match end {
        End::Unused(e) => {
            // Stop the verdict before trusting the counters: after this no
            // byte moves, and none has if they still read zero.
            s.pair.remove(VERDICT_MAP, 0);
            s.pair.remove(VERDICT_MAP, 1);
            match s.moved() {
                Ok((0, 0)) => End::Unused(e),
                _ => End::Error(Side::Backend, e),
            }
        }
        other => other,
    };
    drop(s);
    Ok((
        end,
        Totals {
            to_backend,
            to_client,
            first_to_close: None,
        },
    ))
}

/// The end for a read error on `side`: a backend failing before a byte moved
/// may leave the client to another backend, as on the normal relay.
fn error_end(
    s: &Spliced<'_>,
    side: Side,
    e: io::Error,
    w: &[Watch; 2],
    unused_until: Instant,
) -> End {
    if side == Side::Backend
        && !w[0].eof
        && Instant::now() < unused_until
        && matches!(s.moved(), Ok((0, 0)))
    {
        End::Unused(e)
    } else {
        End::Error(side, e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jumps_land_on_their_exits() {
        let p = program(3, 4);
        let jumps: Vec<(usize, i64)> = p
            .iter()
            .enumerate()
            .filter(|(_, insn)| insn.code == 0x15)
            .map(|(i, insn)| (i, i as i64 + 1 + insn.off as i64))
            .collect();
        let (drop, pass) = (p.len() - 2, p.len() - 4);
        assert_eq!(jumps, [(2, drop as i64), (11, pass as i64)]);
        assert_eq!(p[drop], asm::mov_imm(0, SK_DROP));
        assert_eq!(p[pass], asm::mov_imm(0, SK_PASS));
        assert_eq!(p[drop + 1], asm::exit());
        assert_eq!(p[pass + 1], asm::exit());
    }
}
