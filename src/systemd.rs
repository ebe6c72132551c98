//! Readiness, reloads and shutdown reported to systemd (`Type=notify`,
//! `conf/sluice.service`) through `sd_notify(3)`, with the `sd-notify` crate.
//!
//! Without `NOTIFY_SOCKET` in the environment (not started by systemd)
//! every call here does nothing. A failed send is logged once and otherwise
//! ignored: the balancer serves traffic whether or not systemd hears of it.
//!
//! The order systemd expects: `READY=1` once every listener is open (after
//! the first health-check round), then around each reload `RELOADING=1`
//! (with `MONOTONIC_USEC`, as `Type=notify-reload` wants) and `READY=1`
//! again whatever its outcome, and `STOPPING=1` when a drain begins. A
//! reload that runs before the first `READY=1` (during start-up) sends
//! nothing: the start-up's own `READY=1` follows it.

use std::sync::atomic::{AtomicBool, Ordering::Relaxed};

use log::{debug, warn};
use sd_notify::NotifyState;

/// Whether `READY=1` went out: reloads and drains report only after it.
static READY_SENT: AtomicBool = AtomicBool::new(false);
/// Whether a failed send was logged already (one line, not one per reload).
static FAILURE_LOGGED: AtomicBool = AtomicBool::new(false);

fn send(what: &str, states: &[NotifyState<'_>]) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    match sd_notify::notify(states) {
        Ok(()) => debug!("told systemd: {what}"),
        Err(e) => {
            if !FAILURE_LOGGED.swap(true, Relaxed) {
                warn!("cannot tell systemd {what} over $NOTIFY_SOCKET: {e}");
            }
        }
    }
}

/// Every listener is open: sluice takes traffic. `MAINPID` goes with it, so
/// that with `NotifyAccess=all` a process started by `sluice -u` becomes the
/// unit's main process when it takes over.
pub fn ready(status: &str) {
    READY_SENT.store(true, Relaxed);
    send(
        "ready",
        &[
            NotifyState::MainPid(std::process::id()),
            NotifyState::Ready,
            NotifyState::Status(status),
        ],
    );
}

/// A reload begins.
pub fn reloading() {
    if !READY_SENT.load(Relaxed) {
        return;
    }
    let mut states = vec![NotifyState::Reloading, NotifyState::Status("reloading")];
    // systemd (253+) checks the reload's timestamp; older ones ignore it.
    if let Ok(now) = NotifyState::monotonic_usec_now() {
        states.push(now);
    }
    send("reloading", &states);
}

/// A reload ended (applied or refused: either way the process serves).
pub fn reloaded(status: &str) {
    if !READY_SENT.load(Relaxed) {
        return;
    }
    send(
        "reload done",
        &[NotifyState::Ready, NotifyState::Status(status)],
    );
}

/// A shutdown began: listeners close and connections drain. Not sent on a
/// binary upgrade, whose new process is the unit's main process by then.
pub fn stopping() {
    send(
        "stopping",
        &[NotifyState::Stopping, NotifyState::Status("draining")],
    );
}
