//! Wiring: a validated [`Config`] becomes a running pingora `Server`.
//!
//! ```text
//! pingora Server (our signal handling: lifecycle::Signals; SIGHUP reloads)
//!  ├─ BG admin   admin::server::AdminService -> admin::AdminApp (optional)
//!  ├─ BG health  health::HealthService (a loop per pool)
//!  ├─ listeners  traffic::TrafficService (every listener; waits for BG health)
//!  └─ BG drain   lifecycle::DrainService
//! ```
//!
//! With `-u`, sluice's own handover ([`crate::handover`]) waits for the old
//! process's listening sockets while pingora's bootstrap waits for pingora's.

use std::net::SocketAddr;
use std::sync::Arc;

use log::{info, warn};
use pingora::server::configuration::{Opt, ServerConf};
use pingora::server::{RunArgs, Server};
use pingora::services::background::background_service;

use crate::access_log::AccessLog;
use crate::admin::server::AdminService;
use crate::admin::{Access, AdminApp};
use crate::config::Config;
use crate::handover::{self, HandoverError, Receiver};
use crate::health::{HealthChecks, HealthService};
use crate::lifecycle::{DrainService, Signals};
use crate::metrics::Metrics;
use crate::pool::Pool;
use crate::pool::roles::RoleBook;
use crate::state::State;
use crate::traffic::{Traffic, TrafficService};

/// How the process was asked to start.
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    /// The configuration file (re-read on reload).
    pub config_path: std::path::PathBuf,
    /// Fork into the background (`-d`).
    pub daemon: bool,
    /// Take the listening sockets of a running instance (`-u`).
    pub upgrade: bool,
}

/// Why sluice could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The access log cannot be opened.
    #[error("cannot open the access log {target}: {source}")]
    AccessLog {
        /// Where it should go.
        target: String,
        /// Why.
        source: std::io::Error,
    },
    /// A thread could not be started.
    #[error("cannot start the reload thread: {source}")]
    Thread {
        /// Why.
        source: std::io::Error,
    },
    /// An address cannot be listened on.
    #[error("cannot listen on {addr} ({path}): {source}")]
    Bind {
        /// Where it is configured.
        path: String,
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// `-u`: the listening sockets cannot be taken over.
    #[error("upgrade: {0}")]
    Handover(#[from] HandoverError),
}

/// Check that every configured address can be bound, so a port conflict is a
/// clear error now rather than a listener that silently never starts.
fn check_binds(config: &Config) -> Result<(), StartError> {
    let mut addrs: Vec<(String, SocketAddr)> = Vec::new();
    if let Some(a) = &config.admin {
        addrs.push(("admin.bind".to_string(), a.bind));
    }
    for l in &config.listeners {
        addrs.extend(
            l.bind
                .iter()
                .map(|a| (format!("listeners.{}.bind", l.name), *a)),
        );
    }
    for (path, addr) in addrs {
        crate::traffic::probe_bind(addr).map_err(|source| StartError::Bind {
            path,
            addr,
            source,
        })?;
    }
    Ok(())
}

/// Every address the listeners of `config` listen on.
fn wanted_addresses(config: &Config) -> Vec<handover::Wanted> {
    let admin = config.admin.iter().map(|a| handover::Wanted {
        path: "admin.bind".to_string(),
        addr: a.bind,
    });
    config
        .listeners
        .iter()
        .flat_map(|l| {
            l.bind.iter().map(|&addr| handover::Wanted {
                path: format!("listeners.{}.bind", l.name),
                addr,
            })
        })
        .chain(admin)
        .collect()
}

/// The pingora `ServerConf` for our settings.
fn server_conf(config: &Config, options: &RunOptions) -> ServerConf {
    let s = &config.server;
    let mut conf = ServerConf {
        threads: s.threads,
        daemon: options.daemon,
        pid_file: s.pid_file.clone(),
        upgrade_sock: s.upgrade_sock.clone(),
        ..ServerConf::default()
    };
    // pingora sleeps this long unconditionally after listeners close; the drain
    // service exits earlier once connections are done, so this only backstops it.
    conf.grace_period_seconds = Some(s.shutdown_timeout.as_secs().saturating_add(2));
    conf.graceful_shutdown_timeout_seconds = Some(1);
    conf
}

/// Build every service and run until shut down.
pub fn run(config: Config, options: RunOptions) -> Result<(), StartError> {
    if !options.upgrade {
        check_binds(&config)?;
    }
    crate::loops::set_listen_ports(
        config
            .listeners
            .iter()
            .flat_map(|l| l.bind.iter().map(|a| a.port())),
    );
    let metrics = Arc::new(Metrics::new());
    metrics.config_loaded_now();
    let roles = RoleBook::new();
    let pools: Vec<Arc<Pool>> = config
        .pools
        .iter()
        .map(|p| Pool::new(p, &metrics, &roles))
        .collect();
    let listeners = config
        .listeners
        .iter()
        .map(|l| {
            let pool = pools
                .iter()
                .find(|p| p.name == l.pool)
                .cloned()
                .expect("validation guarantees every listener's pool exists");
            (l.clone(), pool)
        })
        .collect();
    let traffic = Traffic::new(Arc::clone(&metrics), listeners);
    if let Some(settings) = &config.access_log {
        let log =
            AccessLog::start(settings, metrics.access_log_dropped.clone()).map_err(|source| {
                StartError::AccessLog {
                    target: format!("{:?}", settings.target),
                    source,
                }
            })?;
        traffic.set_access_log(log);
    }
    let health = HealthChecks::new(pools.clone());

    let opt = Opt {
        upgrade: options.upgrade,
        daemon: options.daemon,
        ..Opt::default()
    };
    let mut server = Server::new_with_opt_and_conf(opt, server_conf(&config, &options));
    // Listen for sluice's handover before pingora's bootstrap blocks for
    // pingora's: on SIGQUIT the old process sends ours first.
    let receiver = if options.upgrade {
        Some(Receiver::listen(
            &config.server.upgrade_sock,
            wanted_addresses(&config),
        )?)
    } else {
        None
    };
    server.bootstrap();
    match receiver.map(Receiver::finish) {
        Some(Some(inherited)) => traffic.inherit(inherited.sockets),
        Some(None) => info!(
            "no listening sockets came over {}: taking the listeners from pingora's handover (the old process is a sluice from before its own handover)",
            handover::path_for(&config.server.upgrade_sock).display()
        ),
        None => {}
    }

    for w in &config.warnings {
        warn!("{w}");
    }
    let (grace, timeout) = (config.server.grace_period, config.server.shutdown_timeout);
    let admin = config.admin.clone();
    let upgrade_sock = config.server.upgrade_sock.clone();
    let state = State::new(
        options.config_path.clone(),
        config,
        Arc::clone(&metrics),
        pools,
        roles,
        Arc::clone(&traffic),
        Arc::clone(&health),
    );

    {
        let state = Arc::downgrade(&state);
        traffic.set_pool_lookup(Arc::new(move |name: &str| {
            let state = state.upgrade()?;
            state.pools().iter().find(|p| p.name == name).cloned()
        }));
    }
    crate::tls::publish_expiry(&metrics, &crate::sys::lock(&state.config));
    state
        .start_reloader()
        .map_err(|source| StartError::Thread { source })?;

    if let Some(admin) = admin {
        let access = Access::new(&admin.access, admin.bind);
        if let Some(w) = access.warning(admin.bind) {
            warn!("{w}");
        }
        let app = AdminApp::new(Arc::clone(&state), access);
        // sluice's own socket, handed over with the listeners on upgrade.
        let svc = AdminService::new(app, admin.bind, Arc::clone(&traffic));
        server.add_service(background_service("admin", svc));
        info!("admin listening on http://{}", admin.bind);
    }
    let health_handle = server.add_service(background_service("health", HealthService(health)));
    let traffic_handle = server.add_service(TrafficService(Arc::clone(&traffic)));
    traffic_handle.add_dependency(&health_handle);
    info!("listeners open after the first health-check round");
    server.add_service(background_service(
        "drain",
        DrainService::new(Arc::clone(&traffic), timeout),
    ));

    server.run(RunArgs {
        shutdown_signal: Box::new(Signals::new(state, grace, timeout).upgrade_sock(&upgrade_sock)),
    });
    Ok(())
}
