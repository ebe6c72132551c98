//! Relaying when one side (or both) is not a plain socket: a TLS stream
//! that sluice terminates, or one it opened to a backend.
//!
//! Same contract as [`super::relay_tcp`]: both directions run in one task;
//! a side's end of stream is passed on as a half-close (for TLS, a
//! `close_notify` and then the TCP half-close) while the other direction
//! keeps running; an error on either side ends both; every byte written is
//! counted; the idle timeout, the abort future and the "unused backend"
//! window behave alike. A TLS peer that closes its TCP connection without a
//! `close_notify` ends its direction like a plain end of stream: at Layer 4
//! a FIN is the end, as it is for HAProxy and NGINX stream.
//!
//! Bytes move through one buffer per direction taken from a per-thread pool
//! only while they move, so an idle connection holds none (what rustls
//! itself holds per connection is bounded by the caller).

use std::cell::RefCell;
use std::future::{Future, poll_fn};
use std::io::{self, Read, Write};
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::{End, IdleTimer, Meter, Options, Side, Socket, Totals};

/// Size of a pooled buffer: four TLS records.
const BUFFER: usize = 64 * 1024;
/// Idle buffers kept per thread.
const POOL_LIMIT: usize = 32;

thread_local! {
    static BUFFERS: RefCell<Vec<Box<[u8]>>> = const { RefCell::new(Vec::new()) };
}

fn take_buffer() -> Box<[u8]> {
    BUFFERS
        .with(|b| b.borrow_mut().pop())
        .unwrap_or_else(|| vec![0; BUFFER].into_boxed_slice())
}

fn give_back(buf: Box<[u8]>) {
    BUFFERS.with(|b| {
        let mut b = b.borrow_mut();
        if b.len() < POOL_LIMIT {
            b.push(buf);
        }
    });
}

/// A registered socket as a tokio stream: the transport under a TLS stream.
#[derive(Debug)]
pub struct TcpIo(pub Socket);

impl TcpIo {
    /// The socket.
    pub fn socket(&self) -> &Socket {
        &self.0
    }
}

fn read_socket(s: &Socket, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
    loop {
        let mut guard = ready!(s.poll_read_ready(cx))?;
        let unfilled = buf.initialize_unfilled();
        let wanted = unfilled.len();
        match guard.try_io(|inner| inner.get_ref().read(unfilled)) {
            Ok(Ok(n)) => {
                if n < wanted {
                    // Drained: clear now instead of paying for EAGAIN.
                    guard.clear_ready();
                }
                buf.advance(n);
                return Poll::Ready(Ok(()));
            }
            Ok(Err(e)) => return Poll::Ready(Err(e)),
            Err(_would_block) => {}
        }
    }
}

fn write_socket(s: &Socket, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
    loop {
        let mut guard = ready!(s.poll_write_ready(cx))?;
        match guard.try_io(|inner| inner.get_ref().write(buf)) {
            Ok(Ok(n)) => {
                if n < buf.len() {
                    guard.clear_ready();
                }
                return Poll::Ready(Ok(n));
            }
            Ok(Err(e)) => return Poll::Ready(Err(e)),
            Err(_would_block) => {}
        }
    }
}

fn write_socket_vectored(
    s: &Socket,
    cx: &mut Context<'_>,
    bufs: &[io::IoSlice<'_>],
) -> Poll<io::Result<usize>> {
    let wanted: usize = bufs.iter().map(|b| b.len()).sum();
    loop {
        let mut guard = ready!(s.poll_write_ready(cx))?;
        match guard.try_io(|inner| inner.get_ref().write_vectored(bufs)) {
            Ok(Ok(n)) => {
                if n < wanted {
                    guard.clear_ready();
                }
                return Poll::Ready(Ok(n));
            }
            Ok(Err(e)) => return Poll::Ready(Err(e)),
            Err(_would_block) => {}
        }
    }
}

fn shutdown_socket(s: &Socket) -> Poll<io::Result<()>> {
    Poll::Ready(match s.get_ref().shutdown(std::net::Shutdown::Write) {
        Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(()),
        other => other,
    })
}

/// A registered socket, borrowed, as a tokio stream: the transport under a
/// client's TLS, which leaves the socket where the session keeps it.
#[derive(Clone, Copy, Debug)]
pub struct TcpRef<'a>(pub &'a Socket);

impl AsyncRead for TcpRef<'_> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        read_socket(self.0, cx, buf)
    }
}

impl AsyncWrite for TcpRef<'_> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        write_socket(self.0, cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        write_socket_vectored(self.0, cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        shutdown_socket(self.0)
    }
}

impl AsyncRead for TcpIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        read_socket(&self.0, cx, buf)
    }
}

impl AsyncWrite for TcpIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        write_socket(&self.0, cx, buf)
    }

    // rustls hands over its queued records together: one writev for them all.
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        write_socket_vectored(&self.0, cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        shutdown_socket(&self.0)
    }
}

/// A byte stream the relay can drive (a TLS stream over a socket).
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}

impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// One side of a relay: a plain socket, or a TLS stream over one.
pub enum Io<'a> {
    /// A plain socket.
    Tcp(&'a Socket),
    /// A TLS stream (terminated here, or opened to a backend).
    Stream(&'a mut (dyn Stream + 'a)),
}

impl AsyncRead for Io<'_> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Tcp(s) => read_socket(s, cx, buf),
            Io::Stream(s) => Pin::new(&mut **s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Io<'_> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Io::Tcp(s) => write_socket(s, cx, buf),
            Io::Stream(s) => Pin::new(&mut **s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Tcp(_) => Poll::Ready(Ok(())),
            Io::Stream(s) => Pin::new(&mut **s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Tcp(s) => shutdown_socket(s),
            Io::Stream(s) => Pin::new(&mut **s).poll_shutdown(cx),
        }
    }
}

/// A failed step, named by the side whose stream failed.
type Step = Result<(), (Side, io::Error)>;

/// One direction: bytes read from the source wait in `held` until the
/// destination takes them.
struct Flow {
    held: Option<Box<[u8]>>,
    pos: usize,
    len: usize,
    /// Written since the last flush.
    dirty: bool,
    eof: bool,
    done: bool,
    read: u64,
    total: u64,
    /// Report the source's end as an error instead of passing it on (see
    /// [`End::Unused`]).
    hold_eof: bool,
}

impl Flow {
    fn new() -> Self {
        Flow {
            held: None,
            pos: 0,
            len: 0,
            dirty: false,
            eof: false,
            done: false,
            read: 0,
            total: 0,
            hold_eof: false,
        }
    }

    fn release(&mut self) {
        if let Some(buf) = self.held.take() {
            give_back(buf);
        }
        self.pos = 0;
        self.len = 0;
    }

    #[allow(clippy::too_many_arguments)]
    fn poll_move<S, D>(
        &mut self,
        cx: &mut Context<'_>,
        src: &mut S,
        dst: &mut D,
        (from, to): (Side, Side),
        meter: &Meter<'_>,
        other_done: bool,
        moved: &mut bool,
    ) -> Poll<Step>
    where
        S: AsyncRead + Unpin,
        D: AsyncWrite + Unpin,
    {
        loop {
            if self.pos < self.len {
                let Some(buf) = &self.held else {
                    return Poll::Ready(Err((to, io::Error::other("relay buffer lost"))));
                };
                match Pin::new(&mut *dst).poll_write(cx, &buf[self.pos..self.len]) {
                    Poll::Ready(Ok(0)) => {
                        return Poll::Ready(Err((to, io::ErrorKind::WriteZero.into())));
                    }
                    Poll::Ready(Ok(n)) => {
                        self.pos += n;
                        self.total += n as u64;
                        meter.add(n);
                        self.dirty = true;
                        *moved = true;
                        continue;
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err((to, e))),
                    Poll::Pending => return Poll::Pending,
                }
            }
            // Nothing held: the buffer goes back to the pool.
            self.release();
            if !self.eof {
                let mut buf = take_buffer();
                let mut rb = ReadBuf::new(&mut buf);
                match Pin::new(&mut *src).poll_read(cx, &mut rb) {
                    Poll::Ready(Ok(())) if rb.filled().is_empty() => {
                        give_back(buf);
                        self.eof = true;
                    }
                    Poll::Ready(Ok(())) => {
                        let n = rb.filled().len();
                        self.read += n as u64;
                        self.len = n;
                        self.held = Some(buf);
                        *moved = true;
                        continue;
                    }
                    // A TLS peer gone without close_notify: its end of stream.
                    Poll::Ready(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => {
                        give_back(buf);
                        self.eof = true;
                    }
                    Poll::Ready(Err(e)) => {
                        give_back(buf);
                        return Poll::Ready(Err((from, e)));
                    }
                    Poll::Pending => {
                        give_back(buf);
                        // Bytes a TLS stream still holds go out while we wait.
                        if self.dirty {
                            match Pin::new(&mut *dst).poll_flush(cx) {
                                Poll::Ready(Ok(())) => self.dirty = false,
                                Poll::Ready(Err(e)) => return Poll::Ready(Err((to, e))),
                                Poll::Pending => {}
                            }
                        }
                        return Poll::Pending;
                    }
                }
            }
            // The source ended and everything was written. Held back only
            // while nothing came from it at all.
            if self.hold_eof && self.read == 0 {
                return Poll::Ready(Err((from, io::ErrorKind::UnexpectedEof.into())));
            }
            // Pass the end on. With the other direction done too, a peer
            // already gone is no error: the other direction decided.
            return match Pin::new(&mut *dst).poll_shutdown(cx) {
                Poll::Ready(Ok(())) => {
                    self.done = true;
                    Poll::Ready(Ok(()))
                }
                Poll::Ready(Err(e)) if other_done || e.kind() == io::ErrorKind::NotConnected => {
                    self.done = true;
                    Poll::Ready(Ok(()))
                }
                Poll::Ready(Err(e)) => Poll::Ready(Err((to, e))),
                Poll::Pending => Poll::Pending,
            };
        }
    }
}

impl Drop for Flow {
    fn drop(&mut self) {
        self.release();
    }
}

/// Relay between two streams until both directions end, one side fails,
/// nothing moves for the idle timeout, or `abort` completes (see the
/// module documentation). `options.splice` does not apply.
pub async fn relay<C, B>(
    client: &mut C,
    backend: &mut B,
    options: Options,
    up: Meter<'_>,
    down: Meter<'_>,
    abort: impl Future<Output = ()>,
) -> (End, Totals)
where
    C: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let mut abort = std::pin::pin!(abort);
    // Relayed in user space, like the plain relay's normal path.
    up.relay.normal.inc();
    let mut c2b = Flow::new();
    let mut b2c = Flow::new();
    let mut timer = options.idle_timeout.map(IdleTimer::new);
    let mut first_to_close = None;
    let unused_until = std::time::Instant::now() + options.unused_window;
    let end = poll_fn(|cx| {
        let mut moved = false;
        let unused = |c2b: &Flow, b2c: &Flow| {
            c2b.read == 0 && !c2b.eof && b2c.read == 0 && std::time::Instant::now() < unused_until
        };
        let failure = |side: Side, e: io::Error, unused: bool| match side {
            Side::Backend if unused => End::Unused(e),
            _ => End::Error(side, e),
        };
        if !c2b.done {
            let sides = (Side::Client, Side::Backend);
            if let Poll::Ready(Err((side, e))) =
                c2b.poll_move(cx, client, backend, sides, &up, b2c.done, &mut moved)
            {
                return Poll::Ready(failure(side, e, unused(&c2b, &b2c)));
            }
        }
        if !b2c.done {
            b2c.hold_eof = unused(&c2b, &b2c);
            let sides = (Side::Backend, Side::Client);
            if let Poll::Ready(Err((side, e))) =
                b2c.poll_move(cx, backend, client, sides, &down, c2b.done, &mut moved)
            {
                return Poll::Ready(failure(side, e, unused(&c2b, &b2c)));
            }
        }
        if c2b.done && b2c.done {
            return Poll::Ready(End::Done);
        }
        if timer.as_mut().is_some_and(|t| t.poll_expired(cx, moved)) {
            return Poll::Ready(End::IdleTimeout);
        }
        if abort.as_mut().poll(cx).is_ready() {
            return Poll::Ready(End::Aborted);
        }
        super::note_first_eof(&mut first_to_close, c2b.eof, b2c.eof);
        Poll::Pending
    })
    .await;
    super::note_first_eof(&mut first_to_close, c2b.eof, b2c.eof);
    (
        end,
        Totals {
            to_backend: c2b.total,
            to_client: b2c.total,
            first_to_close,
        },
    )
}

#[cfg(test)]
mod tests;
