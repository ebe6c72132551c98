//! Signals and draining: the process's life from start to exit.
//!
//! - [`Signals`] replaces pingora's signal watcher. SIGTERM makes sluice
//!   unready at once but keeps listeners open for `grace_period` (so a load
//!   balancer in front can stop sending), then closes them; SIGINT exits at
//!   once; SIGQUIT hands listeners to a new process (`sluice -u`) and drains
//!   only once that process holds them all (else it logs why and serves on);
//!   SIGHUP reloads the configuration file.
//! - [`DrainService`] exits the process as soon as the last open connection
//!   finishes after listeners closed, or when `shutdown_timeout` runs out.
//!   pingora's own grace sleep is only a backstop behind it.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use log::{error, info, warn};
use pingora::server::{ShutdownSignal, ShutdownSignalWatch, ShutdownWatch};
use pingora::services::background::BackgroundService;
use tokio::signal::unix::{SignalKind, signal};

use crate::config::DEFAULT_UPGRADE_SOCK;
use crate::handover::{self, HandoverError, Sent};
use crate::state::State;
use crate::traffic::Traffic;

/// sluice's signal handling, given to pingora's main loop.
pub struct Signals {
    state: Arc<State>,
    grace_period: Duration,
    shutdown_timeout: Duration,
    /// Where a new process waits for the listening sockets.
    handover: PathBuf,
}

impl Signals {
    /// Handle signals with the configured drain times.
    pub fn new(state: Arc<State>, grace_period: Duration, shutdown_timeout: Duration) -> Self {
        Signals {
            state,
            grace_period,
            shutdown_timeout,
            handover: handover::path_for(DEFAULT_UPGRADE_SOCK),
        }
    }

    /// Hand listeners over next to pingora's `upgrade_sock` (`server.upgrade_sock`).
    pub fn upgrade_sock(mut self, upgrade_sock: &str) -> Self {
        self.handover = handover::path_for(upgrade_sock);
        self
    }

    /// Hand every listening socket to the new process; draining begins only
    /// once it holds them all. No reload may add or close a listener from the
    /// first socket sent on: the new process would miss it.
    async fn hand_over(&self) -> Result<Sent, HandoverError> {
        let state = Arc::clone(&self.state);
        let path = self.handover.clone();
        let blocking = tokio::task::spawn_blocking(move || {
            let _no_reload = crate::sys::lock(&state.config);
            let sent = state.traffic.hand_over(&path)?;
            state.begin_drain();
            Ok(sent)
        });
        match blocking.await {
            Ok(outcome) => outcome,
            Err(e) => Err(HandoverError::Task(e.to_string())),
        }
    }
}

#[async_trait]
impl ShutdownSignalWatch for Signals {
    async fn recv(&self) -> ShutdownSignal {
        let listen =
            |kind: SignalKind| signal(kind).expect("installing a signal handler on Unix succeeds");
        let mut term = listen(SignalKind::terminate());
        let mut int = listen(SignalKind::interrupt());
        let mut quit = listen(SignalKind::quit());
        let mut hup = listen(SignalKind::hangup());
        let mut usr1 = listen(SignalKind::user_defined1());
        loop {
            tokio::select! {
                _ = usr1.recv() => {
                    // logrotate's convention: the file was moved; write a new one.
                    match self.state.traffic.access_log() {
                        Some(log) => {
                            info!("SIGUSR1 received: reopening the access log");
                            log.reopen();
                        }
                        None => info!("SIGUSR1 received: no access log to reopen"),
                    }
                }
                _ = hup.recv() => {
                    info!("SIGHUP received: reloading the configuration");
                    // On the reload thread; its outcome is logged and counted there.
                    drop(self.state.request_reload());
                }
                _ = int.recv() => {
                    info!("SIGINT received: exiting now");
                            crate::systemd::stopping();
                    return ShutdownSignal::FastShutdown;
                }
                _ = quit.recv() => {
                    info!(
                        "SIGQUIT received: handing listeners to the new process over {}",
                        self.handover.display()
                    );
                    let outcome = tokio::select! {
                        outcome = self.hand_over() => outcome,
                        _ = int.recv() => {
                            info!("SIGINT received: exiting now");
                            crate::systemd::stopping();
                            return ShutdownSignal::FastShutdown;
                        }
                    };
                    match outcome {
                        Ok(sent) => {
                            info!(
                                "handed {} listening socket(s) to process {} in {} batch(es); draining",
                                sent.sockets, sent.pid, sent.batches
                            );
                            // pingora hands over its own table (the admin socket) next.
                            return ShutdownSignal::GracefulUpgrade;
                        }
                        Err(e) => error!(
                            "upgrade failed: {e}; this process keeps its listeners and serves on"
                        ),
                    }
                }
                _ = term.recv() => {
                    self.state.begin_drain();
                    crate::systemd::stopping();
                    info!(
                        "SIGTERM received: not ready any more; listeners close in {}",
                        humantime::format_duration(self.grace_period)
                    );
                    tokio::select! {
                        _ = tokio::time::sleep(self.grace_period) => {}
                        _ = int.recv() => {
                            info!("SIGINT received: exiting now");
                            crate::systemd::stopping();
                            return ShutdownSignal::FastShutdown;
                        }
                    }
                    info!(
                        "closing listeners; open connections have {} to finish",
                        humantime::format_duration(self.shutdown_timeout)
                    );
                    return ShutdownSignal::GracefulTerminate;
                }
            }
        }
    }
}

/// Ends the process once connections have drained after listeners closed.
pub struct DrainService {
    traffic: Arc<Traffic>,
    timeout: Duration,
}

impl DrainService {
    /// Watch the open connections of `traffic` once its listeners are
    /// closed; give them `timeout` at most.
    pub fn new(traffic: Arc<Traffic>, timeout: Duration) -> Self {
        DrainService { traffic, timeout }
    }
}

/// How long the sessions cut at the shutdown timeout get to end.
const CUT_WAIT: Duration = Duration::from_millis(500);

/// How often the drain checks for the last connection.
const DRAIN_POLL: Duration = Duration::from_millis(25);

/// `timeout` from `now`, or a time decades away where that is past what an
/// `Instant` can hold (validation keeps timeouts far smaller; this keeps
/// the drain thread from panicking whatever it is given).
fn deadline_after(now: tokio::time::Instant, timeout: Duration) -> tokio::time::Instant {
    const DECADES: Duration = Duration::from_secs(30 * 365 * 86_400);
    now.checked_add(timeout)
        .or_else(|| now.checked_add(DECADES))
        .unwrap_or(now)
}

#[async_trait]
impl BackgroundService for DrainService {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        if shutdown.wait_for(|s| *s).await.is_err() {
            return;
        }
        let deadline = deadline_after(tokio::time::Instant::now(), self.timeout);
        // Count only once nothing can be accepted any more (listeners that
        // never opened have nothing to close).
        if self.traffic.is_started() {
            let mut closed = self.traffic.listeners_closed();
            let _ = tokio::time::timeout_at(deadline, closed.wait_for(|c| *c)).await;
        }
        let open_connections = self.traffic.open_connections();
        let mut open = open_connections.get();
        if open > 0 {
            info!("waiting for {open} open connection(s) to finish");
        }
        while open > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(DRAIN_POLL).await;
            open = open_connections.get();
        }
        if open > 0 {
            warn!(
                "shutdown timeout ({}) reached: closing {open} open connection(s)",
                humantime::format_duration(self.timeout)
            );
            // End them through their sessions, so each says so in the
            // access log, and give the writer a moment to write it.
            self.traffic.cut_sessions();
            let stop = tokio::time::Instant::now() + CUT_WAIT;
            while open_connections.get() > 0 && tokio::time::Instant::now() < stop {
                tokio::time::sleep(DRAIN_POLL).await;
            }
        } else {
            info!("all connections finished; exiting");
        }
        if let Some(log) = self.traffic.access_log() {
            // Every line so far, the cut connections' included, reaches the file.
            let log = std::sync::Arc::clone(log);
            let written = tokio::task::spawn_blocking(move || log.flush(Duration::from_secs(2)))
                .await
                .unwrap_or(false);
            if !written {
                warn!("access log: the last lines could not be written within 2s");
            }
        }
        std::process::exit(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_deadline_never_overflows() {
        let now = tokio::time::Instant::now();
        assert_eq!(
            deadline_after(now, Duration::from_secs(5)),
            now + Duration::from_secs(5)
        );
        for huge in [Duration::MAX, Duration::from_secs(u64::MAX / 2)] {
            assert!(deadline_after(now, huge) > now + Duration::from_secs(86_400 * 365));
        }
    }
}
