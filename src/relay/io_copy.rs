//! The generic engine: a plain copy through two buffers, for any
//! `AsyncRead + AsyncWrite` stream (TLS streams, test pipes).

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::{End, IdleTimer, Meter, Side, Step, Totals};

/// Bytes buffered per direction.
const BUFFER_SIZE: usize = 32 * 1024;

/// One direction: a buffer between a reader and a writer.
struct Copy {
    buf: Box<[u8]>,
    pos: usize,
    cap: usize,
    eof: bool,
    done: bool,
    unflushed: bool,
    total: u64,
}

impl Copy {
    fn new() -> Self {
        Copy {
            buf: vec![0; BUFFER_SIZE].into_boxed_slice(),
            pos: 0,
            cap: 0,
            eof: false,
            done: false,
            unflushed: false,
            total: 0,
        }
    }

    /// Copy from `r` to `w` until `r` would block or ends.
    #[allow(clippy::too_many_arguments)]
    fn poll_copy<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        r: &mut R,
        w: &mut W,
        sides: (Side, Side),
        meter: &Meter<'_>,
        moved: &mut bool,
    ) -> Poll<Step>
    where
        R: AsyncRead + Unpin + ?Sized,
        W: AsyncWrite + Unpin + ?Sized,
    {
        let (from, to) = sides;
        loop {
            if self.pos == self.cap && !self.eof {
                let mut rb = ReadBuf::new(&mut self.buf);
                match Pin::new(&mut *r).poll_read(cx, &mut rb) {
                    Poll::Pending => {
                        // Nothing more to read for now: push out what was written.
                        if self.unflushed {
                            ready!(Pin::new(&mut *w).poll_flush(cx)).map_err(|e| (to, e))?;
                            self.unflushed = false;
                        }
                        return Poll::Pending;
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err((from, e))),
                    Poll::Ready(Ok(())) => {
                        let n = rb.filled().len();
                        if n == 0 {
                            self.eof = true;
                        } else {
                            self.pos = 0;
                            self.cap = n;
                            *moved = true;
                        }
                    }
                }
            }
            while self.pos < self.cap {
                let n = ready!(Pin::new(&mut *w).poll_write(cx, &self.buf[self.pos..self.cap]))
                    .map_err(|e| (to, e))?;
                if n == 0 {
                    return Poll::Ready(Err((to, io::ErrorKind::WriteZero.into())));
                }
                self.pos += n;
                self.total += n as u64;
                self.unflushed = true;
                meter.add(n);
                *moved = true;
            }
            if self.eof {
                ready!(Pin::new(&mut *w).poll_flush(cx)).map_err(|e| (to, e))?;
                // Pass the half-close on. A peer that already went away is not an
                // error worth reporting: the other direction decides the outcome.
                if let Err(e) = ready!(Pin::new(&mut *w).poll_shutdown(cx)) {
                    if e.kind() != io::ErrorKind::NotConnected {
                        return Poll::Ready(Err((to, e)));
                    }
                }
                self.done = true;
                return Poll::Ready(Ok(()));
            }
        }
    }
}

/// Relay between `client` and `backend` until both directions end, one side
/// fails, or nothing moves for `idle`.
pub async fn relay_io<C, B>(
    client: &mut C,
    backend: &mut B,
    idle: Option<Duration>,
    up: Meter<'_>,
    down: Meter<'_>,
) -> (End, Totals)
where
    C: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let mut c2b = Copy::new();
    let mut b2c = Copy::new();
    let mut timer = idle.map(IdleTimer::new);

    let end = poll_fn(|cx| {
        let mut moved = false;
        if !c2b.done {
            let step = c2b.poll_copy(
                cx,
                client,
                backend,
                (Side::Client, Side::Backend),
                &up,
                &mut moved,
            );
            if let Poll::Ready(Err((side, e))) = step {
                return Poll::Ready(End::Error(side, e));
            }
        }
        if !b2c.done {
            let step = b2c.poll_copy(
                cx,
                backend,
                client,
                (Side::Backend, Side::Client),
                &down,
                &mut moved,
            );
            if let Poll::Ready(Err((side, e))) = step {
                return Poll::Ready(End::Error(side, e));
            }
        }
        if c2b.done && b2c.done {
            return Poll::Ready(End::Done);
        }
        if timer.as_mut().is_some_and(|t| t.poll_expired(cx, moved)) {
            return Poll::Ready(End::IdleTimeout);
        }
        Poll::Pending
    })
    .await;
    (
        end,
        Totals {
            to_backend: c2b.total,
            to_client: b2c.total,
        },
    )
}
