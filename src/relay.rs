//! Moving bytes between a client and a backend until both are done.
//!
//! Two one-way pipes run in one task. When one side finishes sending (EOF),
//! its pipe flushes and shuts down the write half of the other side and the
//! opposite pipe keeps running: a client that half-closes still gets the whole
//! reply. An error on either side ends both. Every byte written is counted on
//! the way (one atomic add per write, no lock), and an optional idle timeout
//! closes the connection when nothing moved either way for that long.

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use prometheus::IntCounter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// Bytes buffered per direction.
pub const BUFFER_SIZE: usize = 32 * 1024;

/// Counters that one direction's bytes are added to.
pub struct Meter<'a> {
    /// The listener's counter.
    pub listener: &'a IntCounter,
    /// The backend's counter.
    pub backend: &'a IntCounter,
}

impl Meter<'_> {
    fn add(&self, n: usize) {
        self.listener.inc_by(n as u64);
        self.backend.inc_by(n as u64);
    }
}

/// Which end of the connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// The client.
    Client,
    /// The backend.
    Backend,
}

/// How a relay ended.
#[derive(Debug)]
pub enum End {
    /// Both directions finished.
    Done,
    /// Nothing moved for the idle timeout.
    IdleTimeout,
    /// An I/O error on one side.
    Error(Side, io::Error),
}

/// Bytes moved each way.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    /// Client to backend.
    pub to_backend: u64,
    /// Backend to client.
    pub to_client: u64,
}

struct Pipe {
    buf: Box<[u8]>,
    pos: usize,
    cap: usize,
    eof: bool,
    done: bool,
    unflushed: bool,
    total: u64,
}

/// A failed step, named by the side whose socket failed.
type Step = Result<(), (Side, io::Error)>;

impl Pipe {
    fn new() -> Self {
        Pipe {
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
pub async fn relay<C, B>(
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
    let mut c2b = Pipe::new();
    let mut b2c = Pipe::new();
    let mut last_move = Instant::now();
    let mut timer: Option<Pin<Box<Sleep>>> = idle.map(|d| Box::pin(tokio::time::sleep(d)));

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
        if let (Some(limit), Some(sleep)) = (idle, timer.as_mut()) {
            if moved {
                last_move = Instant::now();
            }
            // The timer is re-armed lazily: it fires at the old deadline, then
            // moves to `last_move + limit` if bytes moved meanwhile.
            while sleep.as_mut().poll(cx).is_ready() {
                let deadline = last_move + limit;
                if Instant::now() >= deadline {
                    return Poll::Ready(End::IdleTimeout);
                }
                sleep.as_mut().reset(deadline);
            }
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

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, duplex};

    type Ends = (tokio::io::DuplexStream, tokio::io::DuplexStream);

    /// A relay between two in-memory pipes; returns the client's end, the
    /// backend's end and the relay task.
    fn spawn_relay(idle: Option<Duration>) -> (Ends, tokio::task::JoinHandle<(End, Totals)>) {
        let (client_end, mut proxy_client) = duplex(64);
        let (mut proxy_backend, backend_end) = duplex(64);
        let task = tokio::spawn(async move {
            let (l, b) = (
                IntCounter::new("l", "l").unwrap(),
                IntCounter::new("b", "b").unwrap(),
            );
            let meter = || Meter {
                listener: &l,
                backend: &b,
            };
            relay(
                &mut proxy_client,
                &mut proxy_backend,
                idle,
                meter(),
                meter(),
            )
            .await
        });
        ((client_end, backend_end), task)
    }

    #[tokio::test]
    async fn half_close_still_delivers_the_reply() {
        let ((mut client_end, mut backend_end), relay) = spawn_relay(None);
        client_end.write_all(b"question").await.unwrap();
        client_end.shutdown().await.unwrap();
        let mut got = Vec::new();
        backend_end.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"question");
        let reply = vec![7u8; 100_000];
        let sent = reply.clone();
        let writer = tokio::spawn(async move {
            backend_end.write_all(&sent).await.unwrap();
        });
        let mut got = Vec::new();
        client_end.read_to_end(&mut got).await.unwrap();
        writer.await.unwrap();
        assert_eq!(got, reply);
        let (end, totals) = relay.await.unwrap();
        assert!(matches!(end, End::Done), "{end:?}");
        assert_eq!(
            totals,
            Totals {
                to_backend: 8,
                to_client: 100_000
            }
        );
    }

    #[tokio::test(start_paused = true)]
    async fn idle_timeout_fires_only_after_silence() {
        let ((mut client_end, mut backend_end), relay) = spawn_relay(Some(Duration::from_secs(10)));
        // Traffic every 6 s keeps the connection open past the 10 s limit.
        for _ in 0..3 {
            tokio::time::sleep(Duration::from_secs(6)).await;
            client_end.write_all(b"x").await.unwrap();
            let mut one = [0u8; 1];
            backend_end.read_exact(&mut one).await.unwrap();
        }
        let started = Instant::now();
        let (end, _) = relay.await.unwrap();
        assert!(matches!(end, End::IdleTimeout), "{end:?}");
        assert_eq!(started.elapsed(), Duration::from_secs(10));
    }
}
