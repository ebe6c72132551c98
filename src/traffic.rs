//! The L4 service: sluice's listeners, hosted in the pingora server.
//!
//! [`Traffic`] owns every listening socket and its accept loop, so a reload
//! can add, change and remove listeners in place while established
//! connections run on. Each socket is also entered in pingora's listener-fd
//! table, so SIGQUIT still hands every listener to a process started with
//! `-u` (which finds them there and takes them over instead of binding).
//!
//! Accepted connections go straight to [`ListenerApp::serve`] on a task of
//! their own. Out of file descriptors, a listener keeps one spare descriptor
//! in reserve: it frees it to accept and close one waiting client at a time
//! (counted as `rejected{reason="fd_limit"}`), so clients are refused rather
//! than left hanging, and accepting resumes as soon as descriptors free up.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use log::{debug, error, info, warn};
use pingora::server::{ListenFds, ShutdownWatch};
use pingora::services::{ServiceReadyNotifier, ServiceWithDependents};
use tokio::io::unix::AsyncFd;
use tokio::runtime::Handle;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::{Config, ListenerSettings};
use crate::listener::{ListenerApp, LogLimiter, OpenConnections};
use crate::metrics::Metrics;
use crate::pool::Pool;
use crate::relay::socket;

/// Accepts per readiness event before other tasks get a turn.
const ACCEPT_BATCH: usize = 64;
/// Pause before retrying when no descriptor is left even for a refusal.
const FD_RETRY: Duration = Duration::from_millis(100);
/// Listen backlog (the kernel caps it at net.core.somaxconn).
const BACKLOG: i32 = 65_535;

/// Why a listener could not start.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {addr} (listeners.{listener}.bind): {source}")]
pub struct BindError {
    /// The listener.
    pub listener: String,
    /// The address.
    pub addr: SocketAddr,
    /// Why.
    #[source]
    pub source: io::Error,
}

struct Running {
    settings: ListenerSettings,
    app: Arc<ArcSwap<ListenerApp>>,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

/// What the service gets from pingora when it starts.
struct Context {
    fds: Option<ListenFds>,
    handle: Handle,
    shutdown: ShutdownWatch,
}

/// Every listener of the process.
pub struct Traffic {
    metrics: Arc<Metrics>,
    open: Arc<OpenConnections>,
    context: OnceLock<Context>,
    running: Mutex<HashMap<String, Running>>,
    initial: Mutex<Vec<(ListenerSettings, Arc<Pool>)>>,
    started: AtomicBool,
    spare: Mutex<Option<File>>,
    fd_log: LogLimiter,
    /// Addresses whose socket sluice keeps in pingora's listener-fd table.
    held: Mutex<HashSet<String>>,
    /// Set once shutdown has stopped every accept loop and closed the sockets.
    closed: watch::Sender<bool>,
}

/// The pingora service that hosts [`Traffic`].
pub struct TrafficService(pub Arc<Traffic>);

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn is_out_of_fds(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(nix::libc::EMFILE | nix::libc::ENFILE | nix::libc::ENOBUFS | nix::libc::ENOMEM)
    )
}

impl Traffic {
    /// Listeners to open when the service starts.
    pub fn new(metrics: Arc<Metrics>, initial: Vec<(ListenerSettings, Arc<Pool>)>) -> Arc<Self> {
        Arc::new(Traffic {
            metrics,
            open: Arc::new(OpenConnections::default()),
            context: OnceLock::new(),
            running: Mutex::new(HashMap::new()),
            initial: Mutex::new(initial),
            started: AtomicBool::new(false),
            spare: Mutex::new(File::open("/dev/null").ok()),
            fd_log: LogLimiter::new(),
            held: Mutex::new(HashSet::new()),
            closed: watch::Sender::new(false),
        })
    }

    /// Turns true once shutdown has stopped every accept loop: from then on
    /// no client can be accepted, so the open count only falls.
    pub fn listeners_closed(&self) -> watch::Receiver<bool> {
        self.closed.subscribe()
    }

    /// Connections open through any listener, removed ones included.
    pub fn open_connections(&self) -> Arc<OpenConnections> {
        Arc::clone(&self.open)
    }

    /// Whether the initial listeners are bound.
    pub fn is_started(&self) -> bool {
        self.started.load(Relaxed)
    }

    /// Names of the running listeners.
    pub fn names(&self) -> Vec<String> {
        lock(&self.running).keys().cloned().collect()
    }

    /// Bind a listening socket: take it from the sockets inherited on upgrade
    /// when there is one for `addr`, else bind anew; enter a copy in
    /// pingora's table for the next upgrade.
    fn bind(&self, addr: SocketAddr) -> io::Result<std::net::TcpListener> {
        let key = addr.to_string();
        let fds = self.context.get().and_then(|c| c.fds.as_ref());
        if let Some(fds) = fds {
            let inherited = fds.lock().get(&key).copied();
            if let Some(fd) = inherited {
                lock(&self.held).insert(key);
                return socket::listener_from_inherited(fd);
            }
        }
        let s = socket2::Socket::new(
            socket2::Domain::for_address(addr),
            socket2::Type::STREAM.nonblocking().cloexec(),
            None,
        )?;
        s.set_reuse_address(true)?;
        s.bind(&addr.into())?;
        s.listen(BACKLOG)?;
        let listener: std::net::TcpListener = s.into();
        if let Some(fds) = fds {
            socket::enter_in_table(fds, key.clone(), &listener)?;
            lock(&self.held).insert(key);
        }
        Ok(listener)
    }

    /// Whether sluice holds a listening socket for `addr` (its own or inherited).
    fn holds(&self, addr: SocketAddr) -> bool {
        self.context
            .get()
            .and_then(|c| c.fds.as_ref())
            .is_some_and(|fds| fds.lock().get(&addr.to_string()).is_some())
    }

    /// Check that every address of `settings` that sluice does not hold yet
    /// can be bound.
    pub fn check_binds(&self, settings: &ListenerSettings) -> Result<(), BindError> {
        for &addr in &settings.bind {
            if self.holds(addr) {
                continue;
            }
            probe_bind(addr).map_err(|source| BindError {
                listener: settings.name.clone(),
                addr,
                source,
            })?;
        }
        Ok(())
    }

    /// Close the sockets held for addresses `config` no longer listens on.
    pub fn release_unused(&self, config: &Config) {
        let wanted: HashSet<String> = config
            .listeners
            .iter()
            .flat_map(|l| l.bind.iter().map(ToString::to_string))
            .collect();
        self.release(|addr| !wanted.contains(addr));
    }

    /// Close and forget the held sockets whose address `unused` says so of.
    fn release(&self, unused: impl Fn(&str) -> bool) {
        let Some(fds) = self.context.get().and_then(|c| c.fds.as_ref()) else {
            return;
        };
        let mut held = lock(&self.held);
        let gone: HashSet<String> = held.iter().filter(|a| unused(a)).cloned().collect();
        if !gone.is_empty() {
            socket::forget_in_table(fds, &gone);
            held.retain(|a| !gone.contains(a));
        }
    }

    /// Open the listener `settings` for `pool`; its accept loops start once
    /// the pool has finished its first health-check round. All addresses are
    /// bound before any loop starts, so a failure leaves nothing half-open.
    pub fn start(
        self: &Arc<Self>,
        settings: &ListenerSettings,
        pool: Arc<Pool>,
    ) -> Result<(), BindError> {
        let Some(context) = self.context.get() else {
            lock(&self.initial).push((settings.clone(), pool));
            return Ok(());
        };
        let mut sockets = Vec::with_capacity(settings.bind.len());
        for &addr in &settings.bind {
            let bound = self.bind(addr).and_then(socket::register_listener);
            sockets.push(bound.map_err(|source| BindError {
                listener: settings.name.clone(),
                addr,
                source,
            })?);
        }
        let app = Arc::new(ArcSwap::from_pointee(self.app(settings, pool)));
        let (stop, stopped) = watch::channel(false);
        let tasks = sockets
            .into_iter()
            .map(|listener| {
                let run = Arc::clone(self).accept_loop(
                    listener,
                    Arc::clone(&app),
                    stopped.clone(),
                    context.shutdown.clone(),
                );
                context.handle.spawn(run)
            })
            .collect();
        let previous = lock(&self.running).insert(
            settings.name.clone(),
            Running {
                settings: settings.clone(),
                app,
                stop,
                tasks,
            },
        );
        if let Some(previous) = previous {
            Self::halt(previous);
        }
        Ok(())
    }

    /// Apply new settings or a new pool to a running listener with the same
    /// addresses; connections already open keep what they started with.
    pub fn update(&self, settings: &ListenerSettings, pool: Arc<Pool>) {
        let mut running = lock(&self.running);
        if let Some(r) = running.get_mut(&settings.name) {
            r.app.store(Arc::new(self.app(settings, pool)));
            r.settings = settings.clone();
        }
    }

    /// Close the listener `name`; its open connections run on.
    pub fn stop(&self, name: &str) {
        if let Some(r) = lock(&self.running).remove(name) {
            Self::halt(r);
        }
    }

    fn halt(r: Running) {
        let _ = r.stop.send(true);
        // The loops drop their sockets when they see the flag; nothing else
        // holds them, so the ports close.
        drop(r.tasks);
    }

    fn app(&self, settings: &ListenerSettings, pool: Arc<Pool>) -> ListenerApp {
        ListenerApp::new(settings, pool, self.metrics.listener(&settings.name))
    }

    /// Wait for the pool, then accept until stopped or shut down.
    async fn accept_loop(
        self: Arc<Self>,
        listener: AsyncFd<std::net::TcpListener>,
        app: Arc<ArcSwap<ListenerApp>>,
        mut stopped: watch::Receiver<bool>,
        mut shutdown: ShutdownWatch,
    ) {
        let pool = app.load().pool();
        tokio::select! {
            _ = pool.wait_ready() => {}
            _ = raised(&mut stopped) => return,
            _ = raised(&mut shutdown) => return,
        }
        loop {
            tokio::select! {
                biased;
                _ = raised(&mut stopped) => break,
                _ = raised(&mut shutdown) => break,
                ready = listener.readable() => {
                    let mut guard = match ready {
                        Ok(g) => g,
                        Err(e) => {
                            error!("accept on {:?} failed: {e}", listener.get_ref().local_addr());
                            break;
                        }
                    };
                    for _ in 0..ACCEPT_BATCH {
                        match guard.try_io(|l| socket::accept(l.get_ref())) {
                            Ok(Ok(client)) => {
                                let app = app.load_full();
                                let admitted = self.open.admit();
                                tokio::spawn(async move { app.serve_accepted(client, admitted).await });
                            }
                            Ok(Err(e)) if is_out_of_fds(&e) => {
                                if !self.refuse_one(&listener, &app.load()) {
                                    // Not even a refusal is possible: wait for
                                    // descriptors to free up, then try again.
                                    tokio::time::sleep(FD_RETRY).await;
                                }
                                break;
                            }
                            Ok(Err(e)) => {
                                debug!("accept failed: {e}");
                            }
                            Err(_would_block) => break,
                        }
                    }
                }
            }
        }
        debug!(
            "listener {} on {:?} closed",
            app.load().name(),
            listener.get_ref().local_addr()
        );
    }

    /// Out of descriptors: free the spare one, accept a waiting client and
    /// close it at once, then take the spare back. Whether a client was refused.
    fn refuse_one(&self, listener: &AsyncFd<std::net::TcpListener>, app: &ListenerApp) -> bool {
        let mut spare = lock(&self.spare);
        let had_spare = spare.take().is_some();
        let refused = socket::accept(listener.get_ref()).is_ok();
        *spare = File::open("/dev/null").ok();
        if refused {
            app.count_fd_refusal();
        }
        if let Some(skipped) = self.fd_log.allow() {
            warn!(
                "out of file descriptors (limit {}): refusing new clients on listener {}{}{}",
                fd_limit(),
                app.name(),
                if had_spare {
                    ""
                } else {
                    " (no spare descriptor left)"
                },
                if skipped > 0 {
                    format!(" ({skipped} more since the last line)")
                } else {
                    String::new()
                }
            );
        }
        refused
    }
}

/// Whether `addr` can be bound now: bind a throwaway socket the way
/// listeners are bound (SO_REUSEADDR, so only a live listener conflicts).
pub fn probe_bind(addr: SocketAddr) -> io::Result<()> {
    let s = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        None,
    )?;
    s.set_reuse_address(true)?;
    s.bind(&addr.into())
}

/// Wait until the flag is set (or its sender is gone).
async fn raised(flag: &mut watch::Receiver<bool>) {
    let _ = flag.wait_for(|set| *set).await;
}

/// The process's open-file limit, for log lines. A system call rather than
/// `/proc/self/limits`: this is asked when no descriptor is left to open it.
fn fd_limit() -> String {
    use nix::sys::resource::{RLIM_INFINITY, Resource, getrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, _)) if soft == RLIM_INFINITY => "unlimited".to_string(),
        Ok((soft, _)) => soft.to_string(),
        Err(_) => "?".to_string(),
    }
}

#[async_trait]
impl ServiceWithDependents for TrafficService {
    async fn start_service(
        &mut self,
        fds: Option<ListenFds>,
        mut shutdown: ShutdownWatch,
        _listeners_per_fd: usize,
        ready: ServiceReadyNotifier,
    ) {
        let traffic = &self.0;
        let _ = traffic.context.set(Context {
            fds,
            handle: Handle::current(),
            shutdown: shutdown.clone(),
        });
        let initial = std::mem::take(&mut *lock(&traffic.initial));
        for (settings, pool) in initial {
            if let Err(e) = traffic.start(&settings, pool) {
                error!("{e}");
                std::process::exit(1);
            }
            info!(
                "listener {} open on {}",
                settings.name,
                settings
                    .bind
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        traffic.started.store(true, Relaxed);
        ready.notify_ready();
        raised(&mut shutdown).await;
        let running: Vec<Running> = lock(&traffic.running).drain().map(|(_, r)| r).collect();
        for r in running {
            let _ = r.stop.send(true);
            // The loops see the flag at their next turn; wait for them, so that
            // no accept is still under way when the drain counts.
            for task in r.tasks {
                let _ = task.await;
            }
        }
        // On an upgrade the new process has its copies by now; ours must go,
        // or the ports would keep accepting into a backlog nobody reads.
        traffic.release(|_| true);
        info!("listeners closed; no new connections accepted");
        traffic.closed.send_replace(true);
    }

    fn name(&self) -> &str {
        "listeners"
    }

    fn listen_addresses(&self) -> Option<Vec<String>> {
        Some(
            lock(&self.0.initial)
                .iter()
                .flat_map(|(s, _)| s.bind.iter().map(ToString::to_string))
                .collect(),
        )
    }
}
