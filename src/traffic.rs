//! The L4 service: sluice's listeners, hosted in the pingora server.
//!
//! [`Traffic`] owns every listening socket and its accept loop, so a reload
//! can add, change and remove listeners in place while established
//! connections run on. It also keeps a copy of each socket by address, which
//! SIGQUIT hands to a process started with `-u` ([`crate::handover`], any
//! number of them); that process takes the sockets it inherited instead of
//! binding. pingora's own listener-fd table carries only pingora's sockets.
//!
//! Accepted connections go straight to [`ListenerApp::serve`] on a task of
//! their own. Out of file descriptors, a listener keeps one spare descriptor
//! in reserve: it frees it to accept and close one waiting client at a time
//! (counted as `rejected{reason="fd_limit"}`), so clients are refused rather
//! than left hanging, and accepting resumes as soon as descriptors free up.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::AsFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering::Relaxed};
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
use crate::edge::limits::SourceLimiter;
use crate::handover::{self, HandoverError, Sent};
use crate::listener::{ListenerApp, LogLimiter, OpenConnections};
use crate::metrics::Metrics;
use crate::pool::Pool;
use crate::relay::socket;
use crate::sys::{fd_limit, is_local_exhaustion, lock};

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
    /// Counts updates, so a deferred switch to a new pool yields to a later one.
    wanted: Arc<AtomicU64>,
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
    /// A copy of every listening socket, by address, for the next upgrade.
    held: Mutex<HashMap<String, TcpListener>>,
    /// Sockets taken over from the previous process, not claimed yet.
    inherited: Mutex<HashMap<String, TcpListener>>,
    /// Set once shutdown has stopped every accept loop and closed the sockets.
    closed: watch::Sender<bool>,
    /// Clients being served, per listener name.
    client_counts: Mutex<HashMap<String, Arc<AtomicI64>>>,
    /// Per-source limit state, per listener name (kept across reloads).
    source_limits: Mutex<HashMap<String, Arc<SourceLimiter>>>,
    /// The admin listener's address, among the held sockets.
    admin: Mutex<Option<String>>,
    /// The access log, when configured.
    access_log: OnceLock<Arc<crate::access_log::AccessLog>>,
    /// Turns true when the shutdown timeout cuts the sessions left.
    cut: watch::Sender<bool>,
    /// Finds the pools SNI routes name.
    pool_lookup: OnceLock<crate::tls::front::PoolLookup>,
}

/// A listener's sockets, bound but not accepting yet.
pub struct Prepared {
    settings: ListenerSettings,
    /// Address, the copy kept for upgrades, the socket the loop accepts on;
    /// `None` before the service starts (then it starts with the others).
    bound: Option<Vec<(String, TcpListener, AsyncFd<TcpListener>)>>,
}

/// The pingora service that hosts [`Traffic`].
pub struct TrafficService(pub Arc<Traffic>);

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
            held: Mutex::new(HashMap::new()),
            inherited: Mutex::new(HashMap::new()),
            closed: watch::Sender::new(false),
            client_counts: Mutex::new(HashMap::new()),
            source_limits: Mutex::new(HashMap::new()),
            admin: Mutex::new(None),
            access_log: OnceLock::new(),
            cut: watch::Sender::new(false),
            pool_lookup: OnceLock::new(),
        })
    }

    /// How listeners with SNI routes find the pools in force.
    pub fn set_pool_lookup(&self, lookup: crate::tls::front::PoolLookup) {
        let _ = self.pool_lookup.set(lookup);
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

    /// The listening sockets taken over from the previous process (`-u`),
    /// by address; [`start`](Self::start) uses them instead of binding.
    pub fn inherit(&self, sockets: HashMap<String, TcpListener>) {
        lock(&self.inherited).extend(sockets);
    }

    /// A listening socket for `addr`: a copy of the one sluice already
    /// holds (a listener that keeps an address across a reload), the one
    /// inherited on upgrade, or a new one.
    fn socket_for(&self, addr: SocketAddr) -> io::Result<TcpListener> {
        let key = addr.to_string();
        if let Some(held) = lock(&self.held).get(&key) {
            return held.try_clone();
        }
        if let Some(inherited) = self.take_inherited(&key)? {
            return Ok(inherited);
        }
        let s = socket2::Socket::new(
            socket2::Domain::for_address(addr),
            socket2::Type::STREAM.nonblocking().cloexec(),
            None,
        )?;
        s.set_reuse_address(true)?;
        s.bind(&addr.into())?;
        s.listen(BACKLOG)?;
        Ok(s.into())
    }

    /// The socket for `key` inherited through sluice's handover or, from a
    /// sluice before it, through pingora's table.
    fn take_inherited(&self, key: &str) -> io::Result<Option<TcpListener>> {
        if let Some(inherited) = lock(&self.inherited).remove(key) {
            return Ok(Some(inherited));
        }
        match self.context.get().and_then(|c| c.fds.as_ref()) {
            Some(fds) => socket::take_from_table(fds, key),
            None => Ok(None),
        }
    }

    /// Whether sluice holds a listening socket for `addr` (its own or inherited).
    fn holds(&self, addr: SocketAddr) -> bool {
        let key = addr.to_string();
        lock(&self.held).contains_key(&key)
            || lock(&self.inherited).contains_key(&key)
            || self
                .context
                .get()
                .and_then(|c| c.fds.as_ref())
                .is_some_and(|fds| fds.lock().get(&key).is_some())
    }

    /// SIGQUIT: hand every listening socket to the new process waiting on
    /// `path` ([`handover::send`]); `Ok` once it confirmed it holds them all.
    /// Listeners cannot be added or closed meanwhile.
    pub fn hand_over(&self, path: &Path) -> Result<Sent, HandoverError> {
        let held = lock(&self.held);
        let mut sockets: Vec<(&str, std::os::fd::BorrowedFd<'_>)> =
            held.iter().map(|(a, l)| (a.as_str(), l.as_fd())).collect();
        sockets.sort_unstable_by_key(|(a, _)| *a);
        let pingora = self
            .context
            .get()
            .and_then(|c| c.fds.as_ref())
            .map_or(0, socket::table_len);
        handover::send(path, &sockets, pingora, &handover::Timing::DEFAULT)
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

    /// The admin listener's socket for `addr`: inherited or bound, with a
    /// copy kept (and handed over on upgrade) like the listeners'.
    pub fn admin_socket(&self, addr: SocketAddr) -> io::Result<TcpListener> {
        let listener = self.socket_for(addr)?;
        let key = addr.to_string();
        lock(&self.held).insert(key.clone(), listener.try_clone()?);
        *lock(&self.admin) = Some(key);
        Ok(listener)
    }

    /// Close the sockets held for addresses `config` no longer listens on
    /// (the admin listener's stays: it needs a restart to move).
    pub fn release_unused(&self, config: &Config) {
        let mut wanted: HashSet<String> = config
            .listeners
            .iter()
            .flat_map(|l| l.bind.iter().map(ToString::to_string))
            .collect();
        wanted.extend(lock(&self.admin).clone());
        self.release(|addr| !wanted.contains(addr));
    }

    /// Close and forget the held sockets whose address `unused` says so of.
    fn release(&self, unused: impl Fn(&str) -> bool) {
        lock(&self.held).retain(|a, _| !unused(a));
    }

    /// Bind every address of `settings` (or, before the service starts,
    /// check that it can be bound), without accepting yet. Nothing is kept
    /// when this fails, and dropping the result closes what it bound: a
    /// reload binds every new listener first and applies only if all worked.
    pub fn prepare(&self, settings: &ListenerSettings) -> Result<Prepared, BindError> {
        let Some(context) = self.context.get() else {
            self.check_binds(settings)?;
            return Ok(Prepared {
                settings: settings.clone(),
                bound: None,
            });
        };
        // Registering with the runtime needs its context; reloads run on a
        // thread of their own.
        let _runtime = context.handle.enter();
        let mut bound = Vec::with_capacity(settings.bind.len());
        for &addr in &settings.bind {
            let socket = self.socket_for(addr).and_then(|listener| {
                let copy = listener.try_clone()?;
                Ok((copy, socket::register_listener(listener)?))
            });
            match socket {
                Ok((copy, registered)) => bound.push((addr.to_string(), copy, registered)),
                Err(source) => {
                    return Err(BindError {
                        listener: settings.name.clone(),
                        addr,
                        source,
                    });
                }
            }
        }
        Ok(Prepared {
            settings: settings.clone(),
            bound: Some(bound),
        })
    }

    /// Start accepting on sockets [`prepare`](Self::prepare) bound, for
    /// `pool` (once it has finished its first health-check round); replaces
    /// a running listener of the same name.
    pub fn launch(self: &Arc<Self>, prepared: Prepared, pool: Arc<Pool>) {
        let Prepared { settings, bound } = prepared;
        let (Some(context), Some(bound)) = (self.context.get(), bound) else {
            let mut initial = lock(&self.initial);
            initial.retain(|(s, _)| s.name != settings.name);
            initial.push((settings, pool));
            return;
        };
        let mut sockets = Vec::with_capacity(bound.len());
        {
            let mut held = lock(&self.held);
            for (key, copy, registered) in bound {
                // The copy the next upgrade hands over.
                held.insert(key, copy);
                sockets.push(registered);
            }
        }
        let app = Arc::new(ArcSwap::from_pointee(self.app(&settings, pool)));
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
                settings,
                app,
                wanted: Arc::new(AtomicU64::new(0)),
                stop,
                tasks,
            },
        );
        if let Some(previous) = previous {
            Self::halt(previous);
        }
    }

    /// Open the listener `settings` for `pool`: [`prepare`](Self::prepare),
    /// then [`launch`](Self::launch).
    pub fn start(
        self: &Arc<Self>,
        settings: &ListenerSettings,
        pool: Arc<Pool>,
    ) -> Result<(), BindError> {
        let prepared = self.prepare(settings)?;
        self.launch(prepared, pool);
        Ok(())
    }

    /// Apply new settings or a new pool to a running listener with the same
    /// addresses; connections already open keep what they started with.
    ///
    /// A new pool that has not finished its first health-check round yet
    /// takes over only once it has: until then the listener keeps its
    /// current pool, so no client is refused for want of a verdict.
    pub fn update(&self, settings: &ListenerSettings, pool: Arc<Pool>) {
        {
            // Not started yet: it will start with these settings.
            let mut initial = lock(&self.initial);
            if let Some(entry) = initial.iter_mut().find(|(s, _)| s.name == settings.name) {
                *entry = (settings.clone(), pool);
                return;
            }
        }
        let mut running = lock(&self.running);
        let Some(r) = running.get_mut(&settings.name) else {
            return;
        };
        r.settings = settings.clone();
        let wanted = r.wanted.fetch_add(1, Relaxed) + 1;
        let app = Arc::new(self.app(settings, Arc::clone(&pool)));
        let switching = !Arc::ptr_eq(&r.app.load().pool(), &pool);
        match self.context.get() {
            Some(context) if switching && !pool.is_ready() => {
                let (slot, latest) = (Arc::clone(&r.app), Arc::clone(&r.wanted));
                let name = settings.name.clone();
                context.handle.spawn(async move {
                    pool.wait_ready().await;
                    // A later reload may have changed the listener again.
                    if latest.load(Relaxed) == wanted {
                        slot.store(app);
                        info!("listener {name} now forwards to pool {}", pool.name);
                    }
                });
            }
            _ => r.app.store(app),
        }
    }

    /// Close the listener `name`; its open connections run on.
    pub fn stop(&self, name: &str) {
        {
            let mut initial = lock(&self.initial);
            let before = initial.len();
            initial.retain(|(s, _)| s.name != name);
            if initial.len() != before {
                return;
            }
        }
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
        // The client count outlives the app, which a reload replaces.
        let active = Arc::clone(
            lock(&self.client_counts)
                .entry(settings.name.clone())
                .or_default(),
        );
        let limiter = Arc::clone(
            lock(&self.source_limits)
                .entry(settings.name.clone())
                .or_insert_with(SourceLimiter::new),
        );
        let http = settings.http.as_ref().map(|http| {
            Arc::new(crate::http::HttpFront::new(
                settings,
                http,
                &pool,
                self.pool_lookup.get(),
                self.metrics.http(&settings.name),
                self.metrics.listener(&settings.name),
                self.access_log.get().cloned(),
            ))
        });
        let app = ListenerApp::new(
            settings,
            pool,
            self.metrics.listener(&settings.name),
            active,
            limiter,
        )
        .with_tls(settings, self.pool_lookup.get())
        .with_ends(crate::listener::SessionEnds {
            access_log: self.access_log.get().cloned(),
            cut: Some(self.cut.subscribe()),
        });
        match http {
            None => app,
            Some(front) => {
                // Before the service starts there is no shutdown to watch
                // yet (apps are only built once it has); `closed` stands in.
                let shutdown = match self.context.get() {
                    Some(context) => {
                        front.close_idle_on(context.shutdown.clone(), &context.handle);
                        context.shutdown.clone()
                    }
                    None => self.closed.subscribe(),
                };
                app.with_http(front, shutdown)
            }
        }
    }

    /// Write an access-log line for every connection (set before start).
    pub fn set_access_log(&self, log: Arc<crate::access_log::AccessLog>) {
        let _ = self.access_log.set(log);
    }

    /// The access log, if any.
    pub fn access_log(&self) -> Option<&Arc<crate::access_log::AccessLog>> {
        self.access_log.get()
    }

    /// The shutdown timeout ran out: end every session left, so that each
    /// says so in the access log before the process exits.
    pub fn cut_sessions(&self) {
        self.cut.send_replace(true);
    }

    /// Wait for the pool, then accept until stopped or shut down.
    async fn accept_loop(
        self: Arc<Self>,
        listener: AsyncFd<TcpListener>,
        app: Arc<ArcSwap<ListenerApp>>,
        mut stopped: watch::Receiver<bool>,
        mut shutdown: ShutdownWatch,
    ) {
        // Clients of a socket bound to one address reach that address:
        // no getsockname(2) per client (a wildcard bind still asks).
        let local = listener
            .get_ref()
            .local_addr()
            .ok()
            .filter(|a| !a.ip().is_unspecified());
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
                            Ok(Ok((client, peer))) => {
                                let app = app.load_full();
                                // Source rules before any other work: a refused
                                // client is closed here, no task spawned.
                                let Some(entry) = app.screen(&client, peer, local) else {
                                    continue;
                                };
                                let admitted = self.open.admit();
                                tokio::spawn(async move {
                                    app.serve_accepted(client, entry, admitted).await
                                });
                            }
                            Ok(Err(e)) if is_local_exhaustion(&e) => {
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
    fn refuse_one(&self, listener: &AsyncFd<TcpListener>, app: &ListenerApp) -> bool {
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
        {
            // Held while the listeners start, so that a reload in between
            // changes either the list (before) or the running listeners (after).
            let mut pending = lock(&traffic.initial);
            let _ = traffic.context.set(Context {
                fds,
                handle: Handle::current(),
                shutdown: shutdown.clone(),
            });
            let initial = std::mem::take(&mut *pending);
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
            // Inherited sockets no listener took (removed by a reload before
            // the start) would accept into a backlog nobody reads.
            let unused: Vec<String> = lock(&traffic.inherited).drain().map(|(a, _)| a).collect();
            if !unused.is_empty() {
                warn!(
                    "closed {} inherited listening socket(s) no listener uses: {}",
                    unused.len(),
                    unused.join(", ")
                );
            }
            traffic.started.store(true, Relaxed);
            crate::systemd::ready("serving");
        }
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
