//! The kernel calls the in-kernel fast path needs ([`super::sockmap`]), and
//! the second audited home of `unsafe` in sluice: `bpf(2)` has no safe
//! wrapper in the crates sluice uses (nix, socket2, libc), and a userspace
//! BPF loader crate (aya, libbpf-rs) would bring an ELF loader, BTF and a C
//! build for a program of 27 instructions. Each call here passes the kernel a
//! `#[repr(C)]` attribute block that lives on the stack for the whole call,
//! plus pointers into buffers that outlive the call; every descriptor the
//! kernel returns gets exactly one owner at once.
//!
//! Only what the fast path uses is here: creating maps, loading and
//! attaching one program, map element update/lookup/delete, a socket's
//! cookie (`SO_COOKIE`) and its TCP counters (`TCP_INFO`, `SIOCOUTQ`).

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use nix::libc;

/// `enum bpf_cmd` values used here.
const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_ATTACH: libc::c_long = 8;

/// `enum bpf_map_type`.
pub const MAP_HASH: u32 = 1;
/// `enum bpf_map_type`.
pub const MAP_SOCKHASH: u32 = 18;
/// `BPF_F_NO_PREALLOC`: hash map elements are allocated on insert.
pub const F_NO_PREALLOC: u32 = 1;
/// `BPF_PROG_TYPE_SK_SKB`.
pub const PROG_SK_SKB: u32 = 14;
/// `BPF_SK_SKB_STREAM_VERDICT`.
pub const ATTACH_STREAM_VERDICT: u32 = 5;
/// `BPF_NOEXIST`: insert only.
pub const NOEXIST: u64 = 1;
/// `SO_COOKIE` (not in every libc build).
const SO_COOKIE: libc::c_int = 57;

/// One eBPF instruction (`struct bpf_insn`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Insn {
    /// Opcode.
    pub code: u8,
    /// Destination register (low nibble) and source register (high nibble).
    pub regs: u8,
    /// Signed offset.
    pub off: i16,
    /// Signed immediate.
    pub imm: i32,
}

/// The attribute block of every `bpf(2)` command: 128 bytes of which each
/// command reads its own leading fields; the rest must be zero.
#[repr(C, align(8))]
struct Attr([u8; 128]);

impl Attr {
    fn new() -> Self {
        Attr([0; 128])
    }

    fn u32(&mut self, at: usize, v: u32) -> &mut Self {
        self.0[at..at + 4].copy_from_slice(&v.to_ne_bytes());
        self
    }

    fn u64(&mut self, at: usize, v: u64) -> &mut Self {
        self.0[at..at + 8].copy_from_slice(&v.to_ne_bytes());
        self
    }

    /// Run `cmd` with this block.
    #[allow(unsafe_code)]
    fn call(&mut self, cmd: libc::c_long) -> io::Result<libc::c_long> {
        // SAFETY: `self` is a live, 8-aligned, 128-byte block for the whole
        // call, and its size is passed with it. Every pointer stored in it
        // points into a buffer borrowed for the duration of this call, of
        // the length the kernel will use: element calls check key and value
        // lengths against the map's sizes first ([`Map`]), program loads
        // pass the instruction count and log size of their slices, and
        // strings are NUL-terminated `CString`s. The kernel writes back only
        // into the block, a lookup's value buffer and the log buffer.
        let r = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                cmd,
                self.0.as_mut_ptr(),
                std::mem::size_of::<Attr>() as libc::c_uint,
            )
        };
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(r)
        }
    }

    /// Run `cmd`, which returns a new descriptor.
    #[allow(unsafe_code)]
    fn call_fd(&mut self, cmd: libc::c_long) -> io::Result<OwnedFd> {
        let fd = self.call(cmd)?;
        // SAFETY: BPF_MAP_CREATE and BPF_PROG_LOAD return a descriptor that
        // the kernel just installed in this process for this call only.
        Ok(unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) })
    }
}

/// A BPF map this process created, with the key and value sizes it was
/// created with: every element call checks its buffers against them, since
/// the kernel reads (and, on lookup, writes) exactly that many bytes.
#[derive(Debug)]
pub struct Map {
    fd: OwnedFd,
    key_size: usize,
    value_size: usize,
}

impl AsFd for Map {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// Create a map (`BPF_MAP_CREATE`); `name` is at most 15 bytes of `[A-Za-z0-9_]`.
pub fn map_create(
    kind: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    flags: u32,
    name: &str,
) -> io::Result<Map> {
    let mut a = Attr::new();
    a.u32(0, kind)
        .u32(4, key_size)
        .u32(8, value_size)
        .u32(12, max_entries)
        .u32(16, flags);
    // map_name: after map_flags (16), inner_map_fd (20), numa_node (24).
    let n = name.len().min(15);
    a.0[28..28 + n].copy_from_slice(&name.as_bytes()[..n]);
    Ok(Map {
        fd: a.call_fd(BPF_MAP_CREATE)?,
        key_size: key_size as usize,
        value_size: value_size as usize,
    })
}

/// Load a program (`BPF_PROG_LOAD`). On a verifier refusal, the error
/// carries the verifier's log.
pub fn prog_load(kind: u32, insns: &[Insn], license: &str, name: &str) -> io::Result<OwnedFd> {
    let license = std::ffi::CString::new(license)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "license has a NUL"))?;
    let mut log = vec![0u8; 64 * 1024];
    let mut a = Attr::new();
    a.u32(0, kind)
        .u32(4, insns.len() as u32)
        .u64(8, insns.as_ptr() as u64)
        .u64(16, license.as_ptr() as u64)
        .u32(24, 1) // log_level
        .u32(28, log.len() as u32)
        .u64(32, log.as_mut_ptr() as u64);
    // prog_name: after kern_version (40) and prog_flags (44).
    let n = name.len().min(15);
    a.0[48..48 + n].copy_from_slice(&name.as_bytes()[..n]);
    a.call_fd(BPF_PROG_LOAD).map_err(|e| {
        let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
        let text = String::from_utf8_lossy(&log[..end]);
        let tail: String = text.lines().rev().take(4).collect::<Vec<_>>().join(" / ");
        if tail.is_empty() {
            e
        } else {
            io::Error::new(e.kind(), format!("{e}; verifier: {tail}"))
        }
    })
}

/// Attach `prog` to the map `target` (`BPF_PROG_ATTACH`).
pub fn prog_attach(target: BorrowedFd<'_>, prog: BorrowedFd<'_>, kind: u32) -> io::Result<()> {
    let mut a = Attr::new();
    a.u32(0, target.as_raw_fd() as u32)
        .u32(4, prog.as_raw_fd() as u32)
        .u32(8, kind);
    a.call(BPF_PROG_ATTACH).map(drop)
}

impl Map {
    fn elem(
        &self,
        key: &[u8],
        value: Option<usize>,
        value_ptr: u64,
        flags: u64,
    ) -> io::Result<Attr> {
        if key.len() != self.key_size || value.is_some_and(|n| n != self.value_size) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a map key or value of the wrong size",
            ));
        }
        let mut a = Attr::new();
        a.u32(0, self.fd.as_raw_fd() as u32)
            .u64(8, key.as_ptr() as u64)
            .u64(16, value_ptr)
            .u64(24, flags);
        Ok(a)
    }

    /// Set `key` to `value` (`BPF_MAP_UPDATE_ELEM`). For a sockhash, `value`
    /// is the socket's descriptor as a native `u64`.
    pub fn update(&self, key: &[u8], value: &[u8], flags: u64) -> io::Result<()> {
        self.elem(key, Some(value.len()), value.as_ptr() as u64, flags)?
            .call(BPF_MAP_UPDATE_ELEM)
            .map(drop)
    }

    /// Read `key` into `value` (`BPF_MAP_LOOKUP_ELEM`); `Ok(false)` when absent.
    pub fn lookup(&self, key: &[u8], value: &mut [u8]) -> io::Result<bool> {
        let mut a = self.elem(key, Some(value.len()), value.as_mut_ptr() as u64, 0)?;
        match a.call(BPF_MAP_LOOKUP_ELEM) {
            Ok(_) => Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Remove `key` (`BPF_MAP_DELETE_ELEM`); `Ok(false)` when it was absent.
    pub fn delete(&self, key: &[u8]) -> io::Result<bool> {
        match self.elem(key, None, 0, 0)?.call(BPF_MAP_DELETE_ELEM) {
            Ok(_) => Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
            Err(e) => Err(e),
        }
    }
}

/// Read a fixed-size socket option into `out`.
#[allow(unsafe_code)]
fn getsockopt<T: Copy>(
    fd: BorrowedFd<'_>,
    level: libc::c_int,
    name: libc::c_int,
    out: &mut T,
) -> io::Result<usize> {
    let mut len = std::mem::size_of::<T>() as libc::socklen_t;
    // SAFETY: `out` is a live, writable `T` and `len` says its size; the
    // kernel writes at most `len` bytes into it and the new length back.
    let r = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (out as *mut T).cast(),
            &mut len,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(len as usize)
    }
}

/// The socket's cookie: a number unique to it for the kernel's uptime.
pub fn socket_cookie(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let mut cookie = 0u64;
    getsockopt(fd, libc::SOL_SOCKET, SO_COOKIE, &mut cookie)?;
    Ok(cookie)
}

/// How far a TCP socket's send sequence has come, in bytes: acknowledged
/// plus still queued. Never more than the truth: the acknowledged count is
/// read first, so an acknowledgment that lands between the two reads is
/// missed in the sum, not counted twice.
pub fn tcp_sent(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let acked = tcp_acked(fd)?;
    Ok(acked + tcp_outq(fd)?)
}

/// Like [`tcp_sent`], but never less than the truth (queued bytes first):
/// the baseline that later progress is measured from.
pub fn tcp_sent_baseline(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let queued = tcp_outq(fd)?;
    Ok(tcp_acked(fd)? + queued)
}

/// The kernel's `TCP_INFO` of a TCP socket, and how many of its bytes the
/// kernel filled (older kernels fill fewer fields; the rest stay zero).
pub fn tcp_info(fd: BorrowedFd<'_>) -> io::Result<(libc::tcp_info, usize)> {
    let mut info = zeroed_tcp_info();
    let len = getsockopt(fd, libc::IPPROTO_TCP, libc::TCP_INFO, &mut info)?;
    Ok((info, len as usize))
}

fn tcp_acked(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let (info, len) = tcp_info(fd)?;
    let need = std::mem::offset_of!(libc::tcp_info, tcpi_bytes_acked) + 8;
    if len < need {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "TCP_INFO lacks tcpi_bytes_acked (kernel older than 4.1)",
        ));
    }
    Ok(info.tcpi_bytes_acked)
}

#[allow(unsafe_code)]
fn zeroed_tcp_info() -> libc::tcp_info {
    // SAFETY: `tcp_info` is a C struct of integers (and padding): all zero
    // bits is a valid value of it.
    unsafe { std::mem::zeroed() }
}

#[allow(unsafe_code)]
fn tcp_outq(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let mut n: libc::c_int = 0;
    // SAFETY: SIOCOUTQ writes one int into `n`, which lives through the call.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCOUTQ, &mut n) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n.max(0) as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A buffer of the wrong size never reaches the kernel (it would read or
    /// write past it).
    #[test]
    fn element_calls_refuse_buffers_of_the_wrong_size() {
        let map = match map_create(MAP_HASH, 8, 16, 4, F_NO_PREALLOC, "sluice_test") {
            Ok(map) => map,
            Err(e) => {
                use std::io::Write as _;
                let _ = writeln!(std::io::stderr(), "WARNING: BPF maps NOT TESTED here: {e}");
                return;
            }
        };
        let key = 7u64.to_ne_bytes();
        let wrong =
            |r: io::Result<bool>| matches!(r, Err(e) if e.kind() == io::ErrorKind::InvalidInput);
        assert!(wrong(map.update(&key, &[0u8; 8], 0).map(|()| true)));
        assert!(wrong(map.lookup(&key, &mut [0u8; 8])));
        assert!(wrong(map.delete(&[0u8; 4])));
        assert!(wrong(map.lookup(&[0u8; 16], &mut [0u8; 16])));
        // The right sizes work.
        let value = [9u8; 16];
        map.update(&key, &value, NOEXIST).expect("insert");
        let mut got = [0u8; 16];
        assert!(map.lookup(&key, &mut got).expect("lookup"));
        assert_eq!(got, value);
        assert!(map.delete(&key).expect("delete"));
        assert!(!map.lookup(&key, &mut got).expect("lookup after delete"));
    }
}
