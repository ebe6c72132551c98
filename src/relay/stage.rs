//! Where bytes wait between reading one socket and writing the other.
//!
//! A [`Stage`] holds nothing while its direction is idle. Bytes move in one
//! of two ways:
//! - [`Stage::pass`]: read into a per-thread scratch buffer and write straight
//!   on; only what the destination does not take at once is kept, in a buffer
//!   from a per-thread pool. Two system calls per message, which suits
//!   request/response traffic.
//! - [`Stage::fill`] / [`Stage::drain`] with a pipe: `splice(2)` moves the
//!   bytes socket → pipe → socket without copying them into user space, which
//!   suits bulk transfers.
//!
//! Pipes and buffers come from per-thread pools and go back the moment they
//! are empty, so an idle connection holds none. A pipe that still holds bytes
//! when its connection dies is closed, never pooled.

use std::cell::RefCell;
use std::io;
use std::os::fd::{AsFd, OwnedFd};

use nix::fcntl::{FcntlArg, OFlag, SpliceFFlags, fcntl, splice};
use std::io::{Read, Write};
use std::net::TcpStream;

/// Requested pipe capacity: enough to keep a fast stream flowing with few
/// calls; the kernel may grant less.
const PIPE_SIZE: i32 = 256 * 1024;
/// Size of the per-thread scratch buffer and of pooled buffers. A read that
/// fills it means more is waiting: a bulk transfer.
pub const CHUNK: usize = 64 * 1024;
/// Idle pipes and buffers kept per thread.
const POOL_LIMIT: usize = 32;

/// A pipe used as a zero-copy stage.
struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    capacity: usize,
}

enum Held {
    Nothing,
    Pipe {
        pipe: Pipe,
        len: usize,
    },
    Buffer {
        buf: Box<[u8]>,
        pos: usize,
        len: usize,
    },
}

/// Bytes in transit for one direction.
pub struct Stage {
    held: Held,
}

/// What one [`Stage::pass`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pass {
    /// Bytes read; 0 means the source reached its end.
    pub read: usize,
    /// Of those, bytes already written to the destination.
    pub written: usize,
}

thread_local! {
    static PIPES: RefCell<Vec<Pipe>> = const { RefCell::new(Vec::new()) };
    static BUFFERS: RefCell<Vec<Box<[u8]>>> = const { RefCell::new(Vec::new()) };
    static SCRATCH: RefCell<Box<[u8]>> = RefCell::new(vec![0; CHUNK].into_boxed_slice());
}

fn errno(e: nix::Error) -> io::Error {
    io::Error::from(e)
}

fn new_pipe() -> io::Result<Pipe> {
    let (read, write) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC).map_err(errno)?;
    // A larger pipe means fewer calls per byte; keep the default if refused.
    let capacity = fcntl(&write, FcntlArg::F_SETPIPE_SZ(PIPE_SIZE))
        .or_else(|_| fcntl(&write, FcntlArg::F_GETPIPE_SZ))
        .map_err(errno)? as usize;
    Ok(Pipe {
        read,
        write,
        capacity,
    })
}

fn take_pipe() -> io::Result<Pipe> {
    match PIPES.with(|p| p.borrow_mut().pop()) {
        Some(p) => Ok(p),
        None => new_pipe(),
    }
}

fn take_buffer() -> Box<[u8]> {
    BUFFERS
        .with(|b| b.borrow_mut().pop())
        .unwrap_or_else(|| vec![0; CHUNK].into_boxed_slice())
}

fn give_back(held: Held) {
    match held {
        // Only an empty pipe may be reused.
        Held::Pipe { pipe, len: 0 } => PIPES.with(|p| {
            let mut p = p.borrow_mut();
            if p.len() < POOL_LIMIT {
                p.push(pipe);
            }
        }),
        Held::Buffer { buf, .. } => BUFFERS.with(|b| {
            let mut b = b.borrow_mut();
            if b.len() < POOL_LIMIT {
                b.push(buf);
            }
        }),
        Held::Pipe { .. } | Held::Nothing => {}
    }
}

fn flags() -> SpliceFFlags {
    SpliceFFlags::SPLICE_F_NONBLOCK | SpliceFFlags::SPLICE_F_MOVE
}

impl Stage {
    /// An empty stage.
    pub fn new() -> Self {
        Stage {
            held: Held::Nothing,
        }
    }

    /// Bytes waiting to be written.
    pub fn held(&self) -> usize {
        match &self.held {
            Held::Nothing => 0,
            Held::Pipe { len, .. } => *len,
            Held::Buffer { pos, len, .. } => len - pos,
        }
    }

    /// Whether the bytes held are in a pipe.
    pub fn is_pipe(&self) -> bool {
        matches!(self.held, Held::Pipe { .. })
    }

    /// Whether [`Stage::fill`] can take more now.
    pub fn has_room(&self) -> bool {
        match &self.held {
            Held::Nothing => true,
            Held::Pipe { pipe, len } => *len < pipe.capacity,
            Held::Buffer { .. } => false,
        }
    }

    /// Read from `src` and write straight to `dst`, keeping what `dst` does
    /// not take. The stage must be empty. Both sockets are non-blocking;
    /// `WouldBlock` means `src` had nothing. A failed write keeps the bytes:
    /// the caller's next [`Stage::drain`] meets the error and blames `dst`.
    pub fn pass(&mut self, mut src: &TcpStream, mut dst: &TcpStream) -> io::Result<Pass> {
        debug_assert_eq!(self.held(), 0);
        SCRATCH.with(|scratch| {
            let mut scratch = scratch.borrow_mut();
            let read = src.read(&mut scratch)?;
            if read == 0 {
                return Ok(Pass { read, written: 0 });
            }
            let written = dst.write(&scratch[..read]).unwrap_or(0);
            if written < read {
                let mut buf = take_buffer();
                let rest = read - written;
                buf[..rest].copy_from_slice(&scratch[written..read]);
                give_back(std::mem::replace(
                    &mut self.held,
                    Held::Buffer {
                        buf,
                        pos: 0,
                        len: rest,
                    },
                ));
            }
            Ok(Pass { read, written })
        })
    }

    /// Take a pipe for [`Stage::fill`]; an error means none can be had (out
    /// of descriptors, say), and the caller copies instead.
    pub fn take_pipe(&mut self) -> io::Result<()> {
        if matches!(self.held, Held::Nothing) {
            self.held = Held::Pipe {
                pipe: take_pipe()?,
                len: 0,
            };
        }
        Ok(())
    }

    /// Room left in the pipe.
    pub fn room(&self) -> usize {
        match &self.held {
            Held::Pipe { pipe, len } => pipe.capacity - len,
            _ => 0,
        }
    }

    /// Splice from `src` into the pipe taken with [`Stage::take_pipe`];
    /// `Ok(0)` means `src` reached its end, `WouldBlock` that it had nothing.
    pub fn fill(&mut self, src: &TcpStream) -> io::Result<usize> {
        let Held::Pipe { pipe, len } = &mut self.held else {
            return Err(io::Error::other("fill without a pipe"));
        };
        let n = splice(
            src.as_fd(),
            None,
            &pipe.write,
            None,
            pipe.capacity - *len,
            flags(),
        )
        .map_err(errno)?;
        *len += n;
        Ok(n)
    }

    /// Write from the stage to `dst`; `WouldBlock` means not ready.
    pub fn drain(&mut self, mut dst: &TcpStream) -> io::Result<usize> {
        match &mut self.held {
            Held::Pipe { pipe, len } => {
                let n =
                    splice(&pipe.read, None, dst.as_fd(), None, *len, flags()).map_err(errno)?;
                *len -= n;
                Ok(n)
            }
            Held::Buffer { buf, pos, len } => {
                let n = dst.write(&buf[*pos..*len])?;
                if n == 0 {
                    return Err(io::ErrorKind::WriteZero.into());
                }
                *pos += n;
                Ok(n)
            }
            Held::Nothing => Ok(0),
        }
    }

    /// Give the pipe or buffer back to the pool if nothing is in it.
    pub fn release(&mut self) {
        if self.held() == 0 {
            give_back(std::mem::replace(&mut self.held, Held::Nothing));
        }
    }
}

impl Default for Stage {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Stage {
    fn drop(&mut self) {
        // A pipe with bytes left is closed rather than pooled.
        give_back(std::mem::replace(&mut self.held, Held::Nothing));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pipes_are_reused_only_when_empty() {
        let p = new_pipe().unwrap();
        assert!(p.capacity >= 64 * 1024);
        give_back(Held::Pipe { pipe: p, len: 0 });
        assert_eq!(PIPES.with(|p| p.borrow().len()), 1);
        let q = take_pipe().unwrap();
        give_back(Held::Pipe { pipe: q, len: 5 });
        assert_eq!(
            PIPES.with(|p| p.borrow().len()),
            0,
            "a pipe with bytes left is closed"
        );
    }
}
