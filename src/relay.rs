//! Moving bytes between a client and a backend until both are done.
//!
//! Two one-way directions run in one task. When one side finishes sending
//! (EOF), its direction delivers what it holds, shuts down the write half of
//! the other side, and the opposite direction keeps running: a client that
//! half-closes still gets the whole reply. An error on either side ends both.
//! Every byte written is counted on the way (one relaxed atomic add per write
//! per counter, no lock), and an optional idle timeout closes the connection
//! when nothing moved either way for that long.
//!
//! Messages are copied straight from one socket to the other through a
//! per-thread scratch buffer; a read that fills it marks a bulk transfer,
//! which then moves socket → pipe → socket with `splice(2)` and never enters
//! user space. Pipes and leftover buffers come from per-thread pools only
//! while bytes move, so an idle connection holds none (see [`stage`]).

pub mod bpf;
pub mod socket;
pub mod sockmap;
pub mod stage;
pub mod stream;

use std::future::{Future, poll_fn};
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use prometheus::IntCounter;
use tokio::time::Sleep;

pub use socket::Socket;
use stage::{Pass, Stage};

pub use crate::config::FastPath;

/// Counters that one direction's bytes are added to.
pub struct Meter<'a> {
    /// The listener's counter.
    pub listener: &'a IntCounter,
    /// The backend's counter.
    pub backend: &'a IntCounter,
    /// The listener's relay counters (bytes through pipes, connections on
    /// each path).
    pub relay: &'a RelayCounters,
}

/// A listener's counters of how its connections were relayed.
#[derive(Clone, Debug)]
pub struct RelayCounters {
    /// Bytes that went through a pipe (never copied into user space).
    pub spliced: IntCounter,
    /// Connections relayed in user space.
    pub normal: IntCounter,
    /// Connections relayed in the kernel (`fast_path: sockmap`).
    pub sockmap: IntCounter,
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
    /// Closed on purpose: the backend was marked down, or traffic failed back.
    Aborted,
    /// The backend closed or failed before a single byte was exchanged and
    /// while the client was still there: another backend may take over.
    Unused(io::Error),
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
    /// The side that finished sending first (the access log's "client
    /// closed" or "backend closed"), where the relay saw it.
    pub first_to_close: Option<Side>,
}

/// A failed step, named by the side whose socket failed.
type Step = Result<(), (Side, io::Error)>;

/// Detects a connection on which nothing moved for `limit`, checking in
/// eighths of it, so a wake-up costs neither a clock read nor a timer
/// update. The connection closes between `limit` and `limit * 9/8` after
/// its last byte.
struct IdleTimer {
    tick: Duration,
    quiet_ticks: u32,
    moved: bool,
    /// Polled since the last reset, so the timer knows the task's waker.
    armed: bool,
    sleep: Pin<Box<Sleep>>,
}

/// Checks per idle timeout.
const IDLE_TICKS: u32 = 8;

impl IdleTimer {
    fn new(limit: Duration) -> Self {
        let tick = (limit / IDLE_TICKS).max(Duration::from_millis(1));
        IdleTimer {
            tick,
            quiet_ticks: 0,
            moved: false,
            armed: false,
            sleep: Box::pin(tokio::time::sleep(tick)),
        }
    }

    /// Whether the connection has been idle too long; registers the waker otherwise.
    fn poll_expired(&mut self, cx: &mut Context<'_>, moved: bool) -> bool {
        self.moved |= moved;
        if self.armed && !self.sleep.is_elapsed() {
            return false;
        }
        while self.sleep.as_mut().poll(cx).is_ready() {
            if std::mem::take(&mut self.moved) {
                self.quiet_ticks = 0;
            } else {
                self.quiet_ticks += 1;
                if self.quiet_ticks >= IDLE_TICKS {
                    return true;
                }
            }
            // From the last deadline, not from now: no clock read needed.
            let next = self.sleep.deadline() + self.tick;
            self.sleep.as_mut().reset(next);
        }
        self.armed = true;
        false
    }
}

/// One direction of a TCP relay: bytes from `src` wait in a stage until
/// `dst` takes them.
struct Direction {
    stage: Stage,
    /// Whether splicing is allowed.
    splice: bool,
    /// Whether the last read found a bulk transfer: then splice.
    bulk: bool,
    eof: bool,
    done: bool,
    /// Bytes read from the source.
    read: u64,
    /// Bytes written to the destination.
    total: u64,
    /// Report the source's EOF as an error instead of passing it on: set
    /// while nothing has been exchanged, so the session can still be retried.
    hold_eof: bool,
}

impl Direction {
    fn new(splice: bool) -> Self {
        Direction {
            stage: Stage::new(),
            splice,
            bulk: false,
            eof: false,
            done: false,
            read: 0,
            total: 0,
            hold_eof: false,
        }
    }

    fn wrote(&mut self, n: usize, meter: &Meter<'_>) {
        self.total += n as u64;
        meter.add(n);
    }

    /// Move bytes until both sockets would block; `Ready(Ok)` once the
    /// source ended and everything reached the destination.
    ///
    /// Readiness is handled here, not by trial: a short read or write means
    /// the socket is drained or full, so its readiness is cleared at once
    /// (race-free: tokio clears it only if no new event came since the guard
    /// was taken) instead of spending a system call to learn `EAGAIN`.
    fn poll_move(
        &mut self,
        cx: &mut Context<'_>,
        (src, dst): (&Socket, &Socket),
        (from, to): (Side, Side),
        meter: &Meter<'_>,
        other_done: bool,
        moved: &mut bool,
    ) -> Poll<Step> {
        loop {
            // Each readiness check below registers the waker when it says
            // Pending; a cleared readiness loops back to register it.
            let mut again = false;
            let held = self.stage.held();
            if held > 0 {
                match dst.poll_write_ready(cx) {
                    Poll::Ready(Ok(mut guard)) => {
                        let piped = self.stage.is_pipe();
                        match guard.try_io(|d| self.stage.drain(d.get_ref())) {
                            Ok(Ok(n)) => {
                                if n < held {
                                    guard.clear_ready();
                                }
                                if piped {
                                    meter.relay.spliced.inc_by(n as u64);
                                }
                                self.wrote(n, meter);
                                *moved = true;
                                again = true;
                            }
                            Ok(Err(e)) => return Poll::Ready(Err((to, e))),
                            Err(_would_block) => again = true,
                        }
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err((to, e))),
                    Poll::Pending => {}
                }
            }
            if self.bulk && self.stage.held() == 0 && self.stage.take_pipe().is_err() {
                // No pipe to be had (out of descriptors): copy instead.
                self.bulk = false;
            }
            let can_read = if self.bulk {
                self.stage.room() > 0
            } else {
                self.stage.held() == 0
            };
            if !self.eof && can_read {
                match src.poll_read_ready(cx) {
                    Poll::Ready(Ok(mut guard)) => {
                        let (wanted, step) = if self.bulk {
                            let room = self.stage.room();
                            (
                                room,
                                guard.try_io(|s| {
                                    self.stage.fill(s.get_ref()).map(|n| Pass {
                                        read: n,
                                        written: 0,
                                    })
                                }),
                            )
                        } else {
                            self.stage.release();
                            (
                                stage::CHUNK,
                                guard.try_io(|s| self.stage.pass(s.get_ref(), dst.get_ref())),
                            )
                        };
                        match step {
                            Ok(Ok(Pass { read: 0, .. })) => {
                                self.eof = true;
                                again = true;
                            }
                            Ok(Ok(Pass { read, written })) => {
                                self.read += read as u64;
                                if read < wanted {
                                    guard.clear_ready();
                                }
                                self.wrote(written, meter);
                                *moved = true;
                                again = true;
                                // A full read means more is waiting: splice the rest;
                                // short reads mean messages: copy them straight on.
                                self.bulk = self.splice
                                    && read >= stage::CHUNK / if self.bulk { 4 } else { 1 };
                            }
                            Ok(Err(e)) => return Poll::Ready(Err((from, e))),
                            Err(_would_block) => again = true,
                        }
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err((from, e))),
                    Poll::Pending => {}
                }
            }
            if self.stage.held() == 0 {
                // Idle or finished: the pipe or buffer goes back to the pool.
                self.stage.release();
                // Only while nothing came from this side: bytes that arrived in
                // the same wake-up as the EOF make the session a used one.
                if self.eof && self.hold_eof && self.read == 0 {
                    return Poll::Ready(Err((from, io::ErrorKind::UnexpectedEof.into())));
                }
                if self.eof {
                    // Pass the half-close on, unless the other direction is
                    // done too: then closing the sockets says it. A peer that
                    // already went away is not an error: the other direction
                    // decides the outcome.
                    if !other_done {
                        if let Err(e) = dst.get_ref().shutdown(std::net::Shutdown::Write) {
                            if e.kind() != io::ErrorKind::NotConnected {
                                return Poll::Ready(Err((to, e)));
                            }
                        }
                    }
                    self.done = true;
                    return Poll::Ready(Ok(()));
                }
            }
            if !again {
                return Poll::Pending;
            }
        }
    }
}

/// Options for [`relay_tcp`].
#[derive(Clone, Copy, Debug)]
pub struct Options {
    /// Close after this long without a byte moving either way.
    pub idle_timeout: Option<Duration>,
    /// Move bytes with `splice(2)` through a pipe instead of a buffer.
    pub splice: bool,
    /// How long after the start a backend that closes before a byte moved
    /// counts as [`End::Unused`] (its client can be moved elsewhere). After
    /// it, such a close is the end of the session, passed to the client:
    /// backends close idle connections on purpose (Redis `timeout`, MySQL
    /// `wait_timeout`).
    pub unused_window: Duration,
    /// Hand established connections to the kernel ([`sockmap`]) when it can.
    pub fast_path: FastPath,
}

/// Relay between two TCP sockets until both directions end, one side fails,
/// nothing moves for the idle timeout, or `abort` completes.
pub async fn relay_tcp(
    client: &Socket,
    backend: &Socket,
    options: Options,
    up: Meter<'_>,
    down: Meter<'_>,
    abort: impl Future<Output = ()>,
) -> (End, Totals) {
    let mut abort = std::pin::pin!(abort);
    if options.fast_path == FastPath::Sockmap {
        match sockmap::relay(client, backend, options, &up, &down, abort.as_mut()).await {
            Ok(ended) => return ended,
            Err(refused) => log::debug!("fast path not taken, relaying in user space: {refused}"),
        }
    }
    up.relay.normal.inc();
    let mut c2b = Direction::new(options.splice);
    let mut b2c = Direction::new(options.splice);
    let mut timer = options.idle_timeout.map(IdleTimer::new);
    let mut first_to_close = None;
    // One clock read per session; later ones only while nothing has moved.
    let unused_until = std::time::Instant::now() + options.unused_window;
    let end = poll_fn(|cx| {
        let mut moved = false;
        // Nothing exchanged yet, client still there, and soon after the
        // connect: a failing backend can be replaced.
        let unused = |c2b: &Direction, b2c: &Direction| {
            c2b.read == 0 && !c2b.eof && b2c.read == 0 && std::time::Instant::now() < unused_until
        };
        let failure = |side: Side, e: io::Error, unused: bool| match side {
            Side::Backend if unused => End::Unused(e),
            _ => End::Error(side, e),
        };
        if !c2b.done {
            let ends = (client, backend);
            let sides = (Side::Client, Side::Backend);
            if let Poll::Ready(Err((side, e))) =
                c2b.poll_move(cx, ends, sides, &up, b2c.done, &mut moved)
            {
                return Poll::Ready(failure(side, e, unused(&c2b, &b2c)));
            }
        }
        if !b2c.done {
            b2c.hold_eof = unused(&c2b, &b2c);
            let ends = (backend, client);
            let sides = (Side::Backend, Side::Client);
            if let Poll::Ready(Err((side, e))) =
                b2c.poll_move(cx, ends, sides, &down, c2b.done, &mut moved)
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
        note_first_eof(&mut first_to_close, c2b.eof, b2c.eof);
        Poll::Pending
    })
    .await;
    note_first_eof(&mut first_to_close, c2b.eof, b2c.eof);
    (
        end,
        Totals {
            to_backend: c2b.total,
            to_client: b2c.total,
            first_to_close,
        },
    )
}

/// Note which side finished sending first, the first time one has.
fn note_first_eof(first: &mut Option<Side>, client_eof: bool, backend_eof: bool) {
    if first.is_none() {
        *first = match (client_eof, backend_eof) {
            (true, _) => Some(Side::Client),
            (false, true) => Some(Side::Backend),
            _ => None,
        };
    }
}

#[cfg(test)]
mod tests;
